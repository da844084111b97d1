//! The GC executor: one GC run against a live engine. It reads BuildKit's
//! cache records and the cache volume's statvfs, asks the [`planner`] what to
//! prune, and prunes it through the engine in bounded batches.
//!
//! It owns the run and its report. It never deletes a file itself: everything
//! goes through BuildKit's Prune by id, so the engine's metadata and the disk
//! never disagree. When the engine cannot be read, the run is deferred
//! ([`GcError::Deferred`]) and nothing is touched; the caller retries later.
//!
//! # Behavior
//!
//! - Victims are pruned in plan order (children before parents), `batch` ids
//!   per Prune call. Keeping the order means a batch never holds a parent
//!   whose child is in a later batch; a child and its parent in one batch are
//!   both freed by that one call.
//! - What was freed is what the engine says it deleted, never what was asked
//!   for. A record asked for and not freed is read again by id: one still
//!   there (in use again since DiskUsage) stays, and then its parents are not
//!   asked for either (the engine would keep them for it); one already gone
//!   (BuildKit's own GC pruned it) holds no parent back.
//! - After each batch the volume's statvfs is read again. Once every
//!   triggered space target is met (keep-bytes by how much the private cache
//!   shrank, re-read at checkpoints so that BuildKit's own GC pruning at the
//!   same time counts, see [`KeepBytesProgress`]; free bytes and free inodes
//!   by statvfs), the remaining
//!   space victims are dropped; retention victims are still pruned, unless a
//!   child of theirs stays.
//! - A Prune that fails part way ends the run with what was freed so far and
//!   the failure in [`GcReport::error`]; the caller retries like a deferred run.
//!
//! # Limitations
//!
//! - statvfs sees the whole volume, so a build writing while GC runs can hide
//!   what GC freed: the figures are before/after differences, not attributions.

use crate::engine::client::{prune_filters, CacheRecord, ClientError, EngineClient};
use crate::gc::planner::{self, Plan, Policy, Reason, Record, RecordType, Shortfall, Targets, Victim};
use crate::volume::stats::{read_fs_stats, FsStats, StatsError};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// Ids per Prune call when the caller has no reason to choose: one call
/// stays well inside the client's prune timeout on a slow volume, and
/// statvfs is re-read often enough not to overshoot a target by much.
pub const DEFAULT_BATCH: usize = 64;

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// The periodic timer.
    Interval,
    /// Free bytes or inodes fell below a start watermark between intervals.
    Pressure,
    /// The first run after the engine became ready.
    Startup,
    /// An operator (`gc` on the CLI, or the control plane).
    Manual,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Interval => "interval",
            Self::Pressure => "pressure",
            Self::Startup => "startup",
            Self::Manual => "manual",
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a run did not happen.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum GcError {
    /// GC deferred, the engine cannot be read: {0}
    Deferred(#[from] ClientError),
    /// GC deferred, the cache volume cannot be read: {0}
    Volume(#[from] StatsError),
}

/// Records pruned (planned, for a dry run) per reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReasonCounts {
    pub retention: u64,
    pub keep_bytes: u64,
    pub free_bytes: u64,
    pub free_inodes: u64,
}

impl ReasonCounts {
    fn add(&mut self, reason: Reason) {
        let slot = match reason {
            Reason::Retention => &mut self.retention,
            Reason::KeepBytes => &mut self.keep_bytes,
            Reason::FreeBytes => &mut self.free_bytes,
            Reason::FreeInodes => &mut self.free_inodes,
        };
        *slot = slot.saturating_add(1);
    }
}

/// What one run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub trigger: Trigger,
    pub dry_run: bool,
    pub planned_records: u64,
    pub planned_bytes: u64,
    /// Records the engine reported deleted.
    pub freed_records: u64,
    /// Their sizes, as the engine reported them.
    pub freed_bytes: u64,
    /// Ids the engine reported deleted, in plan order.
    pub freed_ids: Vec<String>,
    /// `free_inodes_after - free_inodes_before`, 0 if writes outpaced the run.
    pub inodes_freed: u64,
    pub free_bytes_before: u64,
    pub free_bytes_after: u64,
    pub free_inodes_before: u64,
    pub free_inodes_after: u64,
    pub duration: Duration,
    /// Per reason: records freed (records planned, for a dry run).
    pub reasons: ReasonCounts,
    /// Every triggered target was met before the plan's space victims ran out.
    pub stopped_early: bool,
    /// How far the run ended short of each triggered target (the plan's, for a dry run).
    pub shortfall: Option<Shortfall>,
    /// A Prune or statvfs that failed part way; the run stopped there.
    pub error: Option<String>,
    /// What the planner decided.
    pub plan: Plan,
}

/// The settings of a GC run, held by whoever runs GC repeatedly.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GcRun {
    /// A path on the cache volume (BuildKit's root).
    pub fs_path: PathBuf,
    pub policy: Policy,
    /// Ids per Prune call; 0 counts as 1.
    pub batch: usize,
    pub dry_run: bool,
}

impl GcRun {
    pub async fn run(&self, client: &EngineClient, trigger: Trigger) -> Result<GcReport, GcError> {
        run_gc(client, &self.fs_path, &self.policy, trigger, self.batch, self.dry_run).await
    }
}

/// One GC run: plan from the engine's records and the volume at `fs_path`,
/// then (unless `dry_run`) prune in batches of `batch` ids (0 counts as 1).
pub async fn run_gc(client: &EngineClient, fs_path: &Path, policy: &Policy, trigger: Trigger, batch: usize, dry_run: bool) -> Result<GcReport, GcError> {
    let started = Instant::now();
    let cache = client.disk_usage().await?;
    run_gc_over(client, fs_path, &cache, started, policy, trigger, batch, dry_run).await
}

/// [`run_gc`] after its DiskUsage: `cache` is what the engine held then, and
/// the run (begun at `started`) plans and prunes from it. Whatever changed
/// since (a record pruned by BuildKit's own GC, or in use again) is found by
/// the Prune answers and the re-reads.
#[allow(clippy::too_many_arguments)] // run_gc's own, plus what it read first
pub async fn run_gc_over(
    client: &EngineClient,
    fs_path: &Path,
    cache: &[CacheRecord],
    started: Instant,
    policy: &Policy,
    trigger: Trigger,
    batch: usize,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    let before = read_fs_stats(fs_path)?;
    let now = SystemTime::now();
    let records: Vec<Record> = cache.iter().map(|r| record_for_planner(r, now)).collect();
    let plan = planner::plan_prune(&records, &before, policy, now);

    let mut report = GcReport {
        trigger,
        dry_run,
        planned_records: u64::try_from(plan.victims.len()).unwrap_or(u64::MAX),
        planned_bytes: plan.expected_freed_bytes,
        freed_records: 0,
        freed_bytes: 0,
        freed_ids: vec![],
        inodes_freed: 0,
        free_bytes_before: before.free_bytes,
        free_bytes_after: before.free_bytes,
        free_inodes_before: before.free_inodes,
        free_inodes_after: before.free_inodes,
        duration: Duration::ZERO,
        reasons: ReasonCounts::default(),
        stopped_early: false,
        shortfall: plan.shortfall,
        error: None,
        plan: Plan::default(),
    };
    if dry_run {
        for v in &plan.victims {
            report.reasons.add(v.reason);
        }
        report.plan = plan;
        report.duration = started.elapsed();
        return Ok(report);
    }

    let children = children_of(&records);
    let mut cursor = Cursor::new(&plan.victims, batch);
    let mut after = before;
    let mut keep = KeepBytesProgress::new(plan.targets.keep_bytes, private_bytes(cache));
    let mut met = targets_met(&plan.targets, 0, &before, &after);
    let mut sizer = BatchSizer::new(batch);
    cursor.set_limits(sizer.batch(), space_bytes_cap(&plan.targets, 0, &before, &after));
    while let Some(asked) = cursor.next_batch(&children, met) {
        let ids: Vec<String> = asked.iter().map(|v| v.id.clone()).collect();
        let call = Instant::now();
        let freed = match client.prune(&ids).await {
            Ok(freed) => {
                if ids.len() >= sizer.batch() {
                    sizer.after_call(call.elapsed());
                }
                freed
            }
            Err(error) => {
                tracing::warn!(%error, batch = ids.len(), "GC prune failed; stopping this run");
                report.error = Some(error.to_string());
                break;
            }
        };
        // The engine streams what one call deleted in its own order; the
        // report lists it in plan order, then anything it was not asked for.
        let mut freed_now: HashMap<&str, &CacheRecord> = freed.iter().map(|r| (r.id.as_str(), r)).collect();
        let mut not_freed = vec![];
        for v in &asked {
            match freed_now.remove(v.id.as_str()) {
                Some(r) => {
                    report.reasons.add(v.reason);
                    report.note_freed(r);
                }
                None => not_freed.push(v.id.clone()),
            }
        }
        // Not freed: in use again since DiskUsage (the engine keeps it, and it
        // keeps its parents), or already gone (BuildKit's own GC, an operator's
        // prune), which holds no parent. Only the engine can say which.
        for id in still_held(client, not_freed).await {
            cursor.kept.insert(id);
        }
        for r in freed.iter().filter(|r| freed_now.contains_key(r.id.as_str())) {
            tracing::warn!(id = %r.id, "the engine pruned a record GC did not ask for");
            report.note_freed(r);
        }
        match read_fs_stats(fs_path) {
            Ok(stats) => after = stats,
            Err(error) => {
                report.error = Some(error.to_string());
                break;
            }
        }
        tracing::debug!(asked = ids.len(), freed = freed.len(), free_bytes = after.free_bytes, "GC batch pruned");
        if keep.should_measure(report.freed_bytes) {
            match client.disk_usage().await {
                Ok(now) => keep.measure(private_bytes(&now), report.freed_bytes),
                // Our own count is still a lower bound of the progress; go on with it.
                Err(error) => tracing::warn!(%error, "cannot re-read the cache's size; keep-bytes progress counts this run's frees only"),
            }
        }
        met = targets_met(&plan.targets, keep.progress(report.freed_bytes), &before, &after);
        cursor.set_limits(sizer.batch(), space_bytes_cap(&plan.targets, keep.progress(report.freed_bytes), &before, &after));
    }
    report.stopped_early = cursor.dropped_for_targets > 0;
    report.free_bytes_after = after.free_bytes;
    report.free_inodes_after = after.free_inodes;
    report.inodes_freed = after.free_inodes.saturating_sub(before.free_inodes);
    report.shortfall = shortfall(&plan.targets, keep.progress(report.freed_bytes), &before, &after);
    report.plan = plan;
    report.duration = started.elapsed();
    Ok(report)
}

/// Of the records a Prune did not free, those the engine still holds (re-read
/// by id). When the re-read fails, all of them: keeping a parent for a child
/// that is gone only delays it to the next run; pruning under one in use cannot happen anyway.
async fn still_held(client: &EngineClient, not_freed: Vec<String>) -> Vec<String> {
    if not_freed.is_empty() {
        return not_freed;
    }
    match client.records(&not_freed).await {
        Ok(records) => {
            let held: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
            let (kept, gone): (Vec<String>, Vec<String>) = not_freed.into_iter().partition(|id| held.contains(id.as_str()));
            if !gone.is_empty() {
                tracing::info!(gone = gone.len(), "records GC asked to prune were already gone (BuildKit's own GC?); their parents may go");
            }
            kept
        }
        Err(error) => {
            tracing::warn!(%error, records = not_freed.len(), "cannot re-read the records a prune kept; they and their parents stay this run");
            not_freed
        }
    }
}

/// A BuildKit record as the planner needs it. Pure.
///
/// - Never used since creation: `last_used` stays `None`, so age counts from
///   creation. No creation time either: `now`, so the record is as young as
///   can be and `min_age` protects it (an unknown age must never look old).
/// - A record whose id the Prune filter cannot name is marked in use: it can
///   never be pruned, so it must also keep its parents.
pub fn record_for_planner(r: &CacheRecord, now: SystemTime) -> Record {
    let nameable = prune_filters(std::slice::from_ref(&r.id)).is_ok();
    Record {
        id: r.id.clone(),
        size_bytes: r.size_bytes,
        parents: r.parents.clone(),
        last_used: r.last_used_at,
        created_at: r.created_at.or(r.last_used_at).unwrap_or(now),
        usage_count: r.usage_count,
        in_use: r.in_use || !nameable,
        shared: r.shared,
        record_type: RecordType::from_buildkit(&r.record_type),
        inodes: None,
    }
}

/// Parent id -> ids of the records that list it.
fn children_of(records: &[Record]) -> HashMap<&str, Vec<&str>> {
    let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
    for r in records {
        for p in &r.parents {
            children.entry(p.as_str()).or_default().push(r.id.as_str());
        }
    }
    children
}

/// Every triggered target met: keep-bytes by what the engine freed, the
/// watermarks by statvfs now against statvfs before the run.
fn targets_met(targets: &Targets, freed_bytes: u64, before: &FsStats, now: &FsStats) -> bool {
    shortfall(targets, freed_bytes, before, now).is_none()
}

/// `keep_progress` is [`KeepBytesProgress::progress`]: the bytes the private
/// cache shrank by since the plan, as last measured plus what this run freed since.
fn shortfall(targets: &Targets, keep_progress: u64, before: &FsStats, now: &FsStats) -> Option<Shortfall> {
    let s = Shortfall {
        keep_bytes: targets.keep_bytes.map_or(0, |need| need.saturating_sub(keep_progress)),
        free_bytes: targets.free_bytes.map_or(0, |need| before.free_bytes.saturating_add(need).saturating_sub(now.free_bytes)),
        free_inodes: targets.free_inodes.map_or(0, |need| before.free_inodes.saturating_add(need).saturating_sub(now.free_inodes)),
    };
    (s != Shortfall::default()).then_some(s)
}

/// Keep-bytes progress against the cache's current size, not only against
/// what this run freed: BuildKit's own GC may prune at the same time (and
/// builds may add records), and counting only our own frees would prune past
/// the target. A DiskUsage is too dear to read after every batch on a big
/// cache (about a second at 40,000 records), so it is read at checkpoints:
/// whenever this run's own frees since the last measure reach half of what
/// was still missing then, so the reads are logarithmic in the target and an
/// overshoot is at most what the other side freed since the last one. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepBytesProgress {
    /// Bytes the target asks for (None: no keep-bytes target this run).
    need: Option<u64>,
    /// The private cache's size when the plan was made.
    private_before: u64,
    /// The cache's shrinkage at the last measure, and our own frees then.
    measured: u64,
    own_at_measure: u64,
}

impl KeepBytesProgress {
    pub fn new(need: Option<u64>, private_before: u64) -> Self {
        Self { need, private_before, measured: 0, own_at_measure: 0 }
    }

    /// The shrinkage now: as last measured, plus our own frees since.
    pub fn progress(&self, own_freed: u64) -> u64 {
        self.measured.saturating_add(own_freed.saturating_sub(self.own_at_measure))
    }

    /// True when the cache's size should be read again before going on.
    pub fn should_measure(&self, own_freed: u64) -> bool {
        let Some(need) = self.need else { return false };
        let missing_then = need.saturating_sub(self.measured);
        let since = own_freed.saturating_sub(self.own_at_measure);
        missing_then > 0 && since > 0 && since.saturating_mul(2) >= missing_then
    }

    /// The private cache now holds `private_now` bytes, after `own_freed` of ours.
    pub fn measure(&mut self, private_now: u64, own_freed: u64) {
        self.measured = self.private_before.saturating_sub(private_now);
        self.own_at_measure = own_freed;
    }
}

/// The bytes BuildKit counts against keep-bytes: every record not shared.
fn private_bytes(records: &[CacheRecord]) -> u64 {
    records.iter().filter(|r| !r.shared).fold(0u64, |sum, r| sum.saturating_add(r.size_bytes))
}

/// The ids per Prune call, adapted to what a call costs. Each Prune has a
/// fixed cost that grows with the cache (buildkitd scans every record and runs
/// its metadata GC after each call): measured with 10,200 records, pruning all
/// of them took 260 s in batches of 64 (160 calls) and 138 s in batches of
/// 1,024 (11 calls). So a batch doubles while calls are quick, up to
/// [`MAX_BATCH`], and halves (never below the configured size) when one is
/// slow, well inside the prune timeout. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSizer {
    min: usize,
    current: usize,
}

/// A call quicker than this is mostly fixed cost: ask for more next time.
const QUICK_PRUNE: Duration = Duration::from_secs(2);
/// A call slower than this is a quarter of the prune timeout: ask for less.
const SLOW_PRUNE: Duration = Duration::from_secs(30);
/// Ids per call at most: a filter list of this many ids is about 130 KiB.
pub const MAX_BATCH: usize = 4096;

impl BatchSizer {
    pub fn new(configured: usize) -> Self {
        let min = configured.clamp(1, MAX_BATCH);
        Self { min, current: min }
    }

    pub fn batch(&self) -> usize {
        self.current
    }

    /// A Prune of a full batch took `took`.
    pub fn after_call(&mut self, took: Duration) {
        if took < QUICK_PRUNE {
            self.current = self.current.saturating_mul(2).min(MAX_BATCH);
        } else if took > SLOW_PRUNE {
            self.current = (self.current / 2).max(self.min);
        }
    }
}

/// The bytes the space targets still miss, for [`Cursor::set_limits`]: no cap
/// while an inode target is open (a victim's inodes are not known).
fn space_bytes_cap(targets: &Targets, keep_progress: u64, before: &FsStats, now: &FsStats) -> u64 {
    match shortfall(targets, keep_progress, before, now) {
        Some(s) if s.free_inodes > 0 => u64::MAX,
        Some(s) => s.keep_bytes.max(s.free_bytes),
        None => 0,
    }
}

/// Walks the plan in order and hands out batches.
struct Cursor<'p> {
    victims: &'p [Victim],
    next: usize,
    batch: usize,
    /// A batch holds space victims of at most about this many bytes (the
    /// bytes the space targets still miss): one more victim at most, so a
    /// large batch cannot prune far past a target.
    space_bytes: u64,
    /// Victims that stay: dropped, or kept by the engine. Their parents stay too.
    kept: HashSet<String>,
    /// Space victims dropped because the targets were met.
    dropped_for_targets: usize,
}

impl<'p> Cursor<'p> {
    fn new(victims: &'p [Victim], batch: usize) -> Self {
        Self { victims, next: 0, batch: batch.max(1), space_bytes: u64::MAX, kept: HashSet::new(), dropped_for_targets: 0 }
    }

    /// Sets the next batches' size in records, and the cap on their space victims' bytes.
    fn set_limits(&mut self, batch: usize, space_bytes: u64) {
        self.batch = batch.max(1);
        self.space_bytes = space_bytes;
    }

    /// The next batch of at most `batch` victims, in plan order; `None` when
    /// nothing is left to prune. Once `met`, space victims are dropped, and a
    /// victim with a child that stays is dropped too (the engine would keep it).
    fn next_batch(&mut self, children: &HashMap<&str, Vec<&str>>, met: bool) -> Option<Vec<&'p Victim>> {
        let mut out = Vec::new();
        let mut space_bytes = 0u64;
        while out.len() < self.batch {
            let Some(v) = self.victims.get(self.next) else { break };
            if v.reason != Reason::Retention && !met && !out.is_empty() && space_bytes >= self.space_bytes {
                break;
            }
            self.next += 1;
            let child_stays = children.get(v.id.as_str()).is_some_and(|cs| cs.iter().any(|c| self.kept.contains(*c)));
            let not_needed = met && v.reason != Reason::Retention;
            if not_needed && !child_stays {
                self.dropped_for_targets += 1;
            }
            if child_stays || not_needed {
                self.kept.insert(v.id.clone());
                continue;
            }
            if v.reason != Reason::Retention {
                space_bytes = space_bytes.saturating_add(v.size_bytes);
            }
            out.push(v);
        }
        (!out.is_empty()).then_some(out)
    }
}

// === impl GcReport ===

impl GcReport {
    fn note_freed(&mut self, r: &CacheRecord) {
        self.freed_records = self.freed_records.saturating_add(1);
        self.freed_bytes = self.freed_bytes.saturating_add(r.size_bytes);
        self.freed_ids.push(r.id.clone());
    }

    /// One log line: what was planned and freed, the volume before and after, and why.
    pub fn summary(&self) -> String {
        self.to_string()
    }

    /// What `gc --dry-run` prints: the summary line, then the plan, one victim per line.
    pub fn explain(&self) -> String {
        format!("{self}\n{}", self.plan.explain())
    }
}

impl fmt::Display for GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = if self.dry_run { " (dry run)" } else { "" };
        write!(
            f,
            "gc {}{mode}: planned {} records {} bytes; freed {} records {} bytes, {} inodes; \
             free bytes {} -> {}, free inodes {} -> {}; retention {} keep-bytes {} free-bytes {} free-inodes {}",
            self.trigger,
            self.planned_records,
            self.planned_bytes,
            self.freed_records,
            self.freed_bytes,
            self.inodes_freed,
            self.free_bytes_before,
            self.free_bytes_after,
            self.free_inodes_before,
            self.free_inodes_after,
            self.reasons.retention,
            self.reasons.keep_bytes,
            self.reasons.free_bytes,
            self.reasons.free_inodes,
        )?;
        if self.stopped_early {
            f.write_str("; targets met early")?;
        }
        if let Some(s) = &self.shortfall {
            write!(f, "; SHORT by keep-bytes {} bytes, free-bytes {} bytes, free-inodes {} inodes", s.keep_bytes, s.free_bytes, s.free_inodes)?;
        }
        if let Some(e) = &self.error {
            write!(f, "; stopped by error: {e}")?;
        }
        write!(f, "; took {:?}", self.duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::from_secs(1_700_000_000);

    fn cache(id: &str) -> CacheRecord {
        CacheRecord {
            id: id.into(),
            size_bytes: 10,
            parents: vec![],
            created_at: Some(SystemTime::UNIX_EPOCH + T0),
            last_used_at: None,
            usage_count: 0,
            in_use: false,
            shared: false,
            mutable: false,
            record_type: "regular".into(),
            description: String::new(),
        }
    }

    fn victim(id: &str, reason: Reason) -> Victim {
        Victim { id: id.into(), size_bytes: 1, reason }
    }

    #[test]
    fn mapping_keeps_ids_sizes_parents_and_types() {
        let now = SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(100);
        let used = SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(50);
        let r = CacheRecord {
            parents: vec!["p1".into(), "p2".into()],
            last_used_at: Some(used),
            usage_count: 3,
            shared: true,
            record_type: "exec.cachemount".into(),
            ..cache("abc")
        };
        let m = record_for_planner(&r, now);
        assert_eq!(m.id, "abc");
        assert_eq!(m.size_bytes, 10);
        assert_eq!(m.parents, ["p1", "p2"]);
        assert_eq!(m.last_used, Some(used));
        assert_eq!(m.created_at, SystemTime::UNIX_EPOCH + T0);
        assert_eq!((m.usage_count, m.in_use, m.shared), (3, false, true));
        assert_eq!(m.record_type, RecordType::ExecCacheMount);
        assert_eq!(m.inodes, None);
        assert_eq!(record_for_planner(&cache("x"), now).record_type, RecordType::Regular);
        let odd = CacheRecord { record_type: "source.new".into(), ..cache("x") };
        assert_eq!(record_for_planner(&odd, now).record_type, RecordType::Unknown);
    }

    #[test]
    fn never_used_ages_from_creation_and_unknown_age_is_young() {
        let now = SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(100);
        let m = record_for_planner(&cache("a"), now);
        assert_eq!((m.last_used, m.created_at), (None, SystemTime::UNIX_EPOCH + T0));

        let used = SystemTime::UNIX_EPOCH + T0;
        let only_used = CacheRecord { created_at: None, last_used_at: Some(used), ..cache("b") };
        let m = record_for_planner(&only_used, now);
        assert_eq!((m.last_used, m.created_at), (Some(used), used));

        let neither = CacheRecord { created_at: None, ..cache("c") };
        let m = record_for_planner(&neither, now);
        assert_eq!((m.last_used, m.created_at), (None, now));
    }

    #[test]
    fn a_record_the_filter_cannot_name_is_protected() {
        let now = SystemTime::UNIX_EPOCH + T0;
        assert!(record_for_planner(&cache("a,inuse==true"), now).in_use);
        assert!(!record_for_planner(&cache("w5y1x2abc"), now).in_use);
        assert!(record_for_planner(&CacheRecord { in_use: true, ..cache("ok") }, now).in_use);
    }

    #[test]
    fn batches_keep_plan_order_and_size() {
        let victims: Vec<Victim> = ["a", "b", "c", "d", "e"].iter().map(|id| victim(id, Reason::KeepBytes)).collect();
        let mut cursor = Cursor::new(&victims, 2);
        let children = HashMap::new();
        let mut batches = vec![];
        while let Some(b) = cursor.next_batch(&children, false) {
            batches.push(b.iter().map(|v| v.id.as_str()).collect::<Vec<_>>());
        }
        assert_eq!(batches, [vec!["a", "b"], vec!["c", "d"], vec!["e"]]);
        let mut zero = Cursor::new(&victims, 0);
        assert_eq!(zero.next_batch(&children, false).map(|b| b.len()), Some(1));
    }

    #[test]
    fn batches_grow_while_prunes_are_quick_and_shrink_when_slow_never_below_the_config() {
        let mut sizer = BatchSizer::new(64);
        sizer.after_call(Duration::from_millis(800));
        assert_eq!(sizer.batch(), 128);
        for _ in 0..10 {
            sizer.after_call(Duration::from_millis(800));
        }
        assert_eq!(sizer.batch(), MAX_BATCH);
        sizer.after_call(Duration::from_secs(10));
        assert_eq!(sizer.batch(), MAX_BATCH, "between quick and slow: unchanged");
        sizer.after_call(Duration::from_secs(40));
        assert_eq!(sizer.batch(), MAX_BATCH / 2);
        let mut sizer = BatchSizer::new(64);
        sizer.after_call(Duration::from_secs(40));
        assert_eq!(sizer.batch(), 64);
        assert_eq!(BatchSizer::new(0).batch(), 1);
    }

    #[test]
    fn a_batch_of_space_victims_asks_for_about_what_the_targets_still_miss() {
        let victims: Vec<Victim> = ["a", "b", "c", "d"].iter().map(|id| Victim { id: (*id).into(), size_bytes: 100, reason: Reason::KeepBytes }).collect();
        let mut cursor = Cursor::new(&victims, 64);
        cursor.set_limits(64, 150);
        let first: Vec<&str> = cursor.next_batch(&HashMap::new(), false).unwrap().iter().map(|v| v.id.as_str()).collect();
        assert_eq!(first, ["a", "b"], "200 bytes cover the 150 still missing");
        let targets = Targets { keep_bytes: Some(250), free_bytes: None, free_inodes: None };
        let fs = FsStats { total_bytes: 10_000, free_bytes: 500, total_inodes: 100, free_inodes: 10 };
        assert_eq!(space_bytes_cap(&targets, 200, &fs, &fs), 50);
        assert_eq!(space_bytes_cap(&Targets { free_inodes: Some(5), ..targets }, 200, &fs, &fs), u64::MAX);
    }

    #[test]
    fn once_targets_are_met_only_retention_victims_with_all_children_gone_follow() {
        // "layer" is a space victim; "base" (expired) was unblocked by it;
        // "old" is an unrelated expired record.
        let victims =
            [victim("spare", Reason::KeepBytes), victim("layer", Reason::KeepBytes), victim("base", Reason::Retention), victim("old", Reason::Retention)];
        let children: HashMap<&str, Vec<&str>> = HashMap::from([("base", vec!["layer"])]);
        let mut cursor = Cursor::new(&victims, 1);
        let first = cursor.next_batch(&children, false).unwrap();
        assert_eq!(first[0].id, "spare");
        let rest = cursor.next_batch(&children, true).unwrap();
        assert_eq!(rest.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), ["old"]);
        assert_eq!(cursor.next_batch(&children, true), None);
        assert_eq!(cursor.dropped_for_targets, 1);
        assert!(cursor.kept.contains("layer") && cursor.kept.contains("base"));
    }

    #[test]
    fn a_record_the_engine_kept_keeps_its_parents_out_of_later_batches() {
        let victims = [victim("child", Reason::KeepBytes), victim("parent", Reason::KeepBytes), victim("x", Reason::KeepBytes)];
        let children: HashMap<&str, Vec<&str>> = HashMap::from([("parent", vec!["child"])]);
        let mut cursor = Cursor::new(&victims, 1);
        assert_eq!(cursor.next_batch(&children, false).unwrap()[0].id, "child");
        cursor.kept.insert("child".into());
        assert_eq!(cursor.next_batch(&children, false).unwrap()[0].id, "x");
        assert_eq!(cursor.dropped_for_targets, 0);
    }

    #[test]
    fn shortfall_measures_keep_bytes_by_freed_and_watermarks_by_statvfs() {
        let targets = Targets { keep_bytes: Some(100), free_bytes: Some(1000), free_inodes: None };
        let before = FsStats { total_bytes: 10_000, free_bytes: 500, total_inodes: 100, free_inodes: 10 };
        // A build wrote meanwhile: the volume gained less than the engine freed.
        let now = FsStats { free_bytes: 520, ..before };
        assert_eq!(shortfall(&targets, 40, &before, &now), Some(Shortfall { keep_bytes: 60, free_bytes: 980, free_inodes: 0 }));
        let now = FsStats { free_bytes: 1500, ..before };
        assert!(targets_met(&targets, 100, &before, &now));
        assert!(targets_met(&Targets::default(), 0, &before, &before));
    }

    #[test]
    fn bytes_buildkits_own_gc_frees_during_a_run_count_toward_keep_bytes() {
        // 1000 bytes of private cache, 400 to free.
        let mut keep = KeepBytesProgress::new(Some(400), 1000);
        assert!(!keep.should_measure(0));
        assert!(!keep.should_measure(150), "less than half of what is missing: no re-read yet");
        assert!(keep.should_measure(200), "half of it: re-read");
        // Meanwhile BuildKit's own GC freed 300: the cache is 500 bytes now.
        keep.measure(500, 200);
        assert_eq!(keep.progress(200), 500);
        let targets = Targets { keep_bytes: Some(400), free_bytes: None, free_inodes: None };
        let fs = FsStats { total_bytes: 10_000, free_bytes: 500, total_inodes: 100, free_inodes: 10 };
        assert!(targets_met(&targets, keep.progress(200), &fs, &fs), "already within keep-bytes: pruning more would go past it");
        assert!(!targets_met(&targets, 200, &fs, &fs), "counting only this run's frees would go on");
        // A build added 100 bytes instead: 200 still missing, re-read again after 100 more.
        let mut keep = KeepBytesProgress::new(Some(400), 1000);
        keep.measure(900, 200);
        assert_eq!(keep.progress(250), 150);
        assert!(!keep.should_measure(330) && keep.should_measure(330 + 20));
        assert!(!KeepBytesProgress::new(None, 1000).should_measure(1000), "no keep-bytes target: never re-read");
    }

    #[test]
    fn the_summary_is_one_line_and_explain_adds_the_plan() {
        let report = GcReport {
            trigger: Trigger::Pressure,
            dry_run: true,
            planned_records: 1,
            planned_bytes: 2048,
            freed_records: 0,
            freed_bytes: 0,
            freed_ids: vec![],
            inodes_freed: 0,
            free_bytes_before: 5,
            free_bytes_after: 5,
            free_inodes_before: 7,
            free_inodes_after: 7,
            duration: Duration::from_millis(3),
            reasons: ReasonCounts { retention: 1, ..ReasonCounts::default() },
            stopped_early: false,
            shortfall: None,
            error: Some("Prune on buildkitd at /s failed".into()),
            plan: Plan { victims: vec![Victim { id: "old".into(), size_bytes: 2048, reason: Reason::Retention }], ..Plan::default() },
        };
        let line = report.summary();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("gc pressure (dry run): planned 1 records 2048 bytes"), "{line}");
        assert!(line.contains("retention 1 keep-bytes 0") && line.contains("stopped by error: Prune"), "{line}");
        let text = report.explain();
        assert_eq!(text.lines().next(), Some(line.as_str()));
        assert!(text.lines().any(|l| l == "old 2048 retention"), "{text}");
    }

    #[test]
    fn deferred_errors_say_so_and_name_the_socket() {
        let err = GcError::from(ClientError::Connect { socket: "/run/b.sock".into(), reason: "refused".into() });
        let text = err.to_string();
        assert!(text.starts_with("GC deferred") && text.contains("/run/b.sock"), "{text}");
    }
}
