//! BuildKit's own GC policy, rendered into buildkitd.toml: a backstop behind
//! the agent's GC, derived from the same policy and looser on every axis, so
//! the agent normally acts first and BuildKit prunes only if the agent's GC is
//! stuck or too slow.

use super::planner::{DEFAULT_FREE_START_BELOW_PERCENT, DEFAULT_RETENTION};
use crate::engine::render::{DiskSpace, GcBackstopRule};
use crate::task::{BuildkitTask, VolumeSource};

/// The backstop keeps unused records this many times the agent's retention.
pub const BACKSTOP_RETENTION_FACTOR: u32 = 2;
/// The backstop lets the cache grow this much past the agent's keep-bytes.
pub const BACKSTOP_KEEP_HEADROOM_PERCENT: u64 = 10;
/// The backstop never prunes below this share of the agent's keep-bytes.
pub const BACKSTOP_RESERVED_PERCENT_OF_KEEP: u64 = 10;

/// BuildKit's own GC policy for `task`: a backstop behind the agent's GC,
/// looser than the agent's policy on every axis so the agent normally acts
/// first and BuildKit prunes only if the agent's GC is stuck or too slow.
///
/// With the agent's policy as retention R (task.gc.retention, default 14
/// days), keep-bytes K (task.gc.keep_bytes, default task.cache_size_bytes)
/// and free-space high watermark H% (task's, default 10%):
///
/// 1. `keepDuration` = 2R: records unused for twice the agent's retention go.
/// 2. `maxUsedSpace` = K + 10%, `minFreeSpace` = H/2 % of the filesystem
///    (at least 1%), `reservedSpace` = 10% of K: the size backstop, over
///    ordinary records (not internal, frontend or shared ones).
/// 3. The same sizes with `all = true`: the last resort, as in BuildKit's
///    own default policy, when ordinary records were not enough.
///
/// `minFreeSpace` is a percentage for a block device (its size is known only
/// once mounted). For a file-backed volume the size is in the task, and the
/// bytes are computed here: BuildKit rounds a percentage up to at least 1 GB
/// (see [`DiskSpace::Percent`]), which on a small test volume would exceed
/// the agent's own watermark and make the backstop act first.
pub fn backstop_policy(task: &BuildkitTask) -> Vec<GcBackstopRule> {
    let retention = task.gc.retention.unwrap_or(DEFAULT_RETENTION);
    let keep_bytes = task.gc.keep_bytes.unwrap_or(task.cache_size_bytes);
    let high_watermark = task.gc.free_bytes_watermarks_percent.map_or(u32::from(DEFAULT_FREE_START_BELOW_PERCENT), |(high, _)| high);
    let min_free_percent = (high_watermark / 2).max(1);
    let min_free = match task.mounts.first().map(|m| &m.source) {
        Some(VolumeSource::File { size_bytes, .. }) => DiskSpace::Bytes((size_bytes / 100).saturating_mul(u64::from(min_free_percent)).max(1)),
        Some(VolumeSource::Device { .. } | VolumeSource::Rbd(_)) | None => DiskSpace::Percent(u8::try_from(min_free_percent).unwrap_or(u8::MAX)),
    };
    let max_used = DiskSpace::Bytes(keep_bytes.saturating_add(keep_bytes / 100 * BACKSTOP_KEEP_HEADROOM_PERCENT));
    let reserved = DiskSpace::Bytes((keep_bytes / 100 * BACKSTOP_RESERVED_PERCENT_OF_KEEP).max(1));
    let by_size = |all| GcBackstopRule {
        all,
        filters: vec![],
        keep_duration: None,
        reserved_space: Some(reserved),
        max_used_space: Some(max_used),
        min_free_space: Some(min_free),
    };
    vec![
        GcBackstopRule { keep_duration: Some(retention.saturating_mul(BACKSTOP_RETENTION_FACTOR)), ..GcBackstopRule::default() },
        by_size(false),
        by_size(true),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::render::tests::task;
    use std::time::Duration;

    #[test]
    fn the_backstop_is_looser_than_the_agent_policy() {
        let t = task();
        let rules = backstop_policy(&t);
        assert_eq!(rules[0].keep_duration, Some(DEFAULT_RETENTION * 2));
        assert_eq!(rules[1].max_used_space, Some(DiskSpace::Bytes(t.cache_size_bytes + t.cache_size_bytes / 10)));
        assert_eq!(rules[1].reserved_space, Some(DiskSpace::Bytes(t.cache_size_bytes / 10)));
        assert_eq!(rules[1].min_free_space, Some(DiskSpace::Percent(5)));
        assert!(!rules[1].all && rules[2].all);
        assert_eq!(rules[1].max_used_space, rules[2].max_used_space);
    }

    #[test]
    fn the_backstop_follows_task_overrides() {
        let mut t = task();
        t.gc.retention = Some(Duration::from_secs(3600));
        t.gc.keep_bytes = Some(1000 << 20);
        t.gc.free_bytes_watermarks_percent = Some((1, 2));
        t.mounts[0].source = VolumeSource::File { path: "/var/lib/machine-agent/cache.img".into(), size_bytes: 1 << 30 };
        let rules = backstop_policy(&t);
        assert_eq!(rules[0].keep_duration, Some(Duration::from_secs(7200)));
        assert_eq!(rules[1].max_used_space, Some(DiskSpace::Bytes(1100 << 20)));
        assert_eq!(rules[1].reserved_space, Some(DiskSpace::Bytes(100 << 20)));
        // Half of a 1% watermark rounds to the 1% floor, in bytes of the file.
        assert_eq!(rules[1].min_free_space, Some(DiskSpace::Bytes((1 << 30) / 100)));
    }
}
