//! Cache modes on RBD (see the proto's `CacheMode`): a primary's commit at a
//! clean drain (a protected snapshot, older ones pruned unless a clone uses
//! them), a clone's own image made from the primary's newest commit, an
//! isolated volume's new image, and the removal of those two at drain.
//!
//! What this module never does: take a lock on, map, or write to a primary
//! for a clone (it only lists the primary's snapshots and clones one), and
//! remove an image that does not carry this owner's disposable mark
//! ([`DISPOSABLE_KEY`]), set when the agent created it.

use super::cli::CephClient;
use super::{ceph, is_missing_image, tool_stderr, RbdError, RbdSettings};
use crate::task::{CacheMode, RbdImage};
use crate::volume::fnv1a64;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};

/// The names of the agent's commits start with this; no other snapshot is ever pruned.
pub const SNAP_PREFIX: &str = "machine-agent.";
/// Image metadata naming the owner that created the image to be removed at drain.
pub const DISPOSABLE_KEY: &str = "machine-agent.disposable";
/// How a clone's image is named after its primary: `<image>.clone.<owner hash>`.
const CLONE_INFIX: &str = ".clone.";
/// rbd-fuse exits a moment after its unmount and its watch on the image goes
/// with it; a client that died keeps its watch until the OSD times it out
/// (30 s by default). Past this, the image is left and the release says so.
const REMOVE_WAIT: Duration = Duration::from_secs(45);
const REMOVE_RETRY_MIN: Duration = Duration::from_millis(100);
const REMOVE_RETRY_MAX: Duration = Duration::from_secs(2);
/// How long a commit waits for the image to have no client: rbd-fuse exits
/// (closing the image, flushing librbd's cache to RADOS) a moment after its
/// unmount; the same 30 s watch timeout bounds a client that died.
const CLOSE_WAIT: Duration = Duration::from_secs(45);

/// One snapshot from `rbd snap ls --format json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Grows with every snapshot of the image: the newest has the largest.
    pub id: u64,
    pub name: String,
    pub protected: bool,
}

/// Parses `rbd snap ls --format json` (`protected` is the string "true" or "false").
pub fn parse_snapshots(json: &str) -> Result<Vec<Snapshot>, String> {
    #[derive(Deserialize)]
    struct Raw {
        id: u64,
        name: String,
        #[serde(default)]
        protected: String,
    }
    let raw: Vec<Raw> = serde_json::from_str(json.trim()).map_err(|e| format!("unexpected `rbd snap ls` output: {e}"))?;
    Ok(raw.into_iter().map(|r| Snapshot { id: r.id, name: r.name, protected: r.protected == "true" }).collect())
}

/// Parses `rbd children --format json`: the clones, as `pool/image` or `pool/namespace/image`.
pub fn parse_children(json: &str) -> Result<Vec<String>, String> {
    #[derive(Deserialize)]
    struct Child {
        pool: String,
        #[serde(default)]
        pool_namespace: String,
        image: String,
    }
    let children: Vec<Child> = serde_json::from_str(json.trim()).map_err(|e| format!("unexpected `rbd children` output: {e}"))?;
    Ok(children
        .into_iter()
        .map(|c| if c.pool_namespace.is_empty() { format!("{}/{}", c.pool, c.image) } else { format!("{}/{}/{}", c.pool, c.pool_namespace, c.image) })
        .collect())
}

/// The owner id in the image's disposable mark, from `rbd image-meta list
/// --format json` (which prints nothing at all for an image without metadata).
pub fn parse_disposable_owner(json: &str) -> Result<Option<String>, String> {
    if json.trim().is_empty() {
        return Ok(None);
    }
    let meta: BTreeMap<String, String> = serde_json::from_str(json.trim()).map_err(|e| format!("unexpected `rbd image-meta list` output: {e}"))?;
    Ok(meta.get(DISPOSABLE_KEY).cloned())
}

/// The snapshot a clone starts from: the newest protected commit. A commit
/// not yet protected is one whose drain stopped halfway; it is never cloned.
pub fn plan_clone_source(snapshots: &[Snapshot]) -> Option<&Snapshot> {
    snapshots.iter().filter(|s| s.name.starts_with(SNAP_PREFIX) && s.protected).max_by_key(|s| s.id)
}

/// The commits older than the newest `keep`: the ones a prune looks at. Oldest first.
pub fn prune_candidates(snapshots: &[Snapshot], keep: u32) -> Vec<&Snapshot> {
    let mut ours: Vec<&Snapshot> = snapshots.iter().filter(|s| s.name.starts_with(SNAP_PREFIX)).collect();
    ours.sort_by_key(|s| std::cmp::Reverse(s.id));
    let keep = usize::try_from(keep).unwrap_or(usize::MAX);
    let mut old: Vec<&Snapshot> = ours.into_iter().skip(keep).collect();
    old.reverse();
    old
}

/// Which old commits go and which stay because a clone was made from them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PrunePlan {
    pub remove: Vec<Snapshot>,
    /// Each with the clones that use it.
    pub in_use: Vec<(String, Vec<String>)>,
}

/// Of the commits past the newest `keep`, those without clones are removed.
/// `children` has each candidate's clones; a candidate missing from it (its
/// children could not be listed) stays: a snapshot is only removed when it is
/// known that no clone reads it.
pub fn plan_prune(snapshots: &[Snapshot], keep: u32, children: &BTreeMap<String, Vec<String>>) -> PrunePlan {
    let mut plan = PrunePlan::default();
    for snap in prune_candidates(snapshots, keep) {
        match children.get(&snap.name) {
            Some(clones) if clones.is_empty() => plan.remove.push(snap.clone()),
            Some(clones) => plan.in_use.push((snap.name.clone(), clones.clone())),
            None => plan.in_use.push((snap.name.clone(), vec!["(children unknown)".into()])),
        }
    }
    plan
}

/// `machine-agent.<task>.<yyyymmddThhmmssZ>` (UTC), "task" when the task has no id.
pub fn snapshot_name(task_id: &str, unix_secs: i64) -> String {
    let task = if task_id.is_empty() { "task" } else { task_id };
    let (days, secs) = (unix_secs.div_euclid(86_400), unix_secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{SNAP_PREFIX}{task}.{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// Howard Hinnant's days-to-date: the proleptic Gregorian (year, month, day) of a day since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The clone image of `primary` for `owner_id`: same pool and namespace,
/// named `<image>.clone.<12 hex digits of the owner's hash>`, stable across
/// restarts so an agent restarted mid-task finds its clone again.
pub fn clone_of(primary: &RbdImage, owner_id: &str) -> RbdImage {
    let mut clone = primary.clone();
    clone.image = format!("{}{CLONE_INFIX}{:012x}", primary.image, fnv1a64(owner_id.as_bytes()) >> 16);
    clone.create_size_bytes = None;
    clone.take_over_from = None;
    clone
}

/// The image a mount of `mode` attaches: the task's for a primary or an
/// isolated volume, this owner's clone of it for a clone. Pure.
pub fn attached_image(settings: &RbdSettings, image: &RbdImage, mode: CacheMode) -> Result<RbdImage, RbdError> {
    match mode {
        CacheMode::Primary | CacheMode::Isolated => Ok(image.clone()),
        CacheMode::Clone if settings.owner_id.is_empty() => Err(RbdError::NoOwnerId),
        CacheMode::Clone => Ok(clone_of(image, &settings.owner_id)),
    }
}

/// Readies the image a mount of `mode` attaches and returns it: nothing to do
/// for a primary; for a clone, this owner's clone of the primary's newest
/// commit (made, or found from before a restart); for an isolated volume,
/// the new image (made, or found from before a restart).
pub(super) async fn ready_image(settings: &RbdSettings, client: &CephClient, image: &RbdImage, mode: CacheMode) -> Result<RbdImage, RbdError> {
    let target = attached_image(settings, image, mode)?;
    match mode {
        CacheMode::Primary => {}
        CacheMode::Clone => {
            if !reuse_disposable(client, &target, &settings.owner_id, "a clone").await? {
                make_clone(client, image, &target, &settings.owner_id).await?;
            }
        }
        CacheMode::Isolated => {
            if !reuse_disposable(client, &target, &settings.owner_id, "an isolated volume").await? {
                let Some(size_bytes) = image.create_size_bytes else { return Err(RbdError::NoImage { spec: image.spec() }) };
                ceph(&target, client.create(&target, size_bytes)).await?;
                mark_disposable(client, &target, &settings.owner_id).await?;
                info!(image = %target.spec(), size_bytes, "created the isolated volume's image");
            }
        }
    }
    Ok(target)
}

/// True when `target` exists and is this owner's disposable image (an agent
/// restarted mid-task); false when it does not exist; refused when it exists
/// and is not ours.
async fn reuse_disposable(client: &CephClient, target: &RbdImage, owner_id: &str, what: &'static str) -> Result<bool, RbdError> {
    match ceph(target, client.meta_list(target)).await {
        Ok(json) => match parse_disposable_owner(&json).map_err(|what| RbdError::Unexpected { spec: target.spec(), what })? {
            Some(owner) if owner == owner_id => {
                info!(image = %target.spec(), "reusing this owner's disposable image from before");
                Ok(true)
            }
            owner => Err(RbdError::NotNew { spec: target.spec(), what, owner: owner.unwrap_or_else(|| "no disposable mark".into()) }),
        },
        Err(error) if tool_stderr(&error).is_some_and(is_missing_image) => Ok(false),
        Err(error) => Err(error),
    }
}

/// Clones the primary's newest commit into `clone` and marks it ours. Reads
/// the primary's snapshot list, nothing more: no lock on it, no write to it.
async fn make_clone(client: &CephClient, primary: &RbdImage, clone: &RbdImage, owner_id: &str) -> Result<(), RbdError> {
    let snapshots = parse_snapshots(&ceph(primary, client.snap_list(primary)).await?).map_err(|what| RbdError::Unexpected { spec: primary.spec(), what })?;
    let Some(source) = plan_clone_source(&snapshots) else { return Err(RbdError::NoCommit { spec: primary.spec() }) };
    // A primary pruning this very snapshot at the same moment makes this fail
    // (not protected, or gone); the prepare is retried and finds a newer one.
    ceph(clone, client.clone_image(primary, &source.name, clone)).await?;
    if let Err(error) = mark_disposable(client, clone, owner_id).await {
        // Unmarked, no agent would ever remove it: take it back now, while it is known to be ours.
        if let Err(e) = ceph(clone, client.remove(clone)).await {
            warn!(error = %e, image = %clone.spec(), "cannot remove a clone that could not be marked disposable");
        }
        return Err(error);
    }
    info!(image = %clone.spec(), from = %format!("{}@{}", primary.spec(), source.name), "cloned the primary's newest commit");
    Ok(())
}

async fn mark_disposable(client: &CephClient, image: &RbdImage, owner_id: &str) -> Result<(), RbdError> {
    ceph(image, client.meta_set(image, DISPOSABLE_KEY, owner_id)).await.map(drop)
}

/// A primary's commit, with the image unmapped (everything flushed to RADOS)
/// and this owner's lock still held: snapshot, protect, prune. Returns
/// `pool/image@snapshot`. A failed prune is only logged: the commit is made.
pub async fn commit(client: &CephClient, image: &RbdImage, task_id: &str, keep: u32) -> Result<String, RbdError> {
    // The unmount of rbd-fuse returns before rbd-fuse has closed the image
    // (seen here: its watch stays 100-200 ms longer), and writes still in
    // librbd's cache reach RADOS only at that close. No watcher left means
    // no client has the image open, so every write is in.
    wait_unwatched(client, image, CLOSE_WAIT).await?;
    let name = snapshot_name(task_id, crate::clock::unix_time_ms().div_euclid(1000));
    ceph(image, client.snap_create(image, &name)).await?;
    ceph(image, client.snap_protect(image, &name)).await?;
    let copy = format!("{}@{name}", image.spec());
    info!(image = %image.spec(), snapshot = %name, "committed the primary: snapshot made and protected");
    if let Err(error) = prune(client, image, keep).await {
        warn!(%error, image = %image.spec(), "cannot prune the primary's older commits; they stay");
    }
    Ok(copy)
}

/// Waits until no client watches the image (none has it open).
async fn wait_unwatched(client: &CephClient, image: &RbdImage, within: Duration) -> Result<(), RbdError> {
    let deadline = Instant::now() + within;
    let mut gaps = crate::backoff::PollGaps::doubling(REMOVE_RETRY_MIN, REMOVE_RETRY_MAX);
    loop {
        let watchers =
            super::lock::parse_watchers(&ceph(image, client.status(image)).await?).map_err(|what| RbdError::Unexpected { spec: image.spec(), what })?;
        if watchers.is_empty() {
            if Instant::now() + within > deadline + REMOVE_RETRY_MIN {
                info!(image = %image.spec(), waited_ms = (within - deadline.saturating_duration_since(Instant::now())).as_millis(), "the image's last client closed it");
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(RbdError::StillOpen { spec: image.spec(), watchers: watchers.join(", "), waited: within });
        }
        tokio::time::sleep(gaps.next_gap().min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// Removes the commits past the newest `keep` that no clone uses.
async fn prune(client: &CephClient, image: &RbdImage, keep: u32) -> Result<(), RbdError> {
    let snapshots = parse_snapshots(&ceph(image, client.snap_list(image)).await?).map_err(|what| RbdError::Unexpected { spec: image.spec(), what })?;
    let mut children = BTreeMap::new();
    for snap in prune_candidates(&snapshots, keep) {
        let listed = ceph(image, client.children(image, &snap.name))
            .await
            .and_then(|json| parse_children(&json).map_err(|what| RbdError::Unexpected { spec: image.spec(), what }));
        match listed {
            Ok(clones) => {
                children.insert(snap.name.clone(), clones);
            }
            Err(error) => warn!(%error, snapshot = %snap.name, "cannot list the snapshot's clones; keeping it"),
        }
    }
    let plan = plan_prune(&snapshots, keep, &children);
    for (name, clones) in &plan.in_use {
        info!(image = %image.spec(), snapshot = %name, clones = ?clones, "keeping an old commit a clone uses");
    }
    for snap in &plan.remove {
        if snap.protected {
            ceph(image, client.snap_unprotect(image, &snap.name)).await?;
        }
        ceph(image, client.snap_remove(image, &snap.name)).await?;
        info!(image = %image.spec(), snapshot = %snap.name, "pruned an old commit");
    }
    Ok(())
}

/// Removes a clone's or an isolated volume's image once it is unmapped and
/// unlocked, if (and only if) it carries this owner's disposable mark. A
/// watch left for a moment by the client that just let go is waited out.
/// Returns false when the image was already gone.
pub(super) async fn destroy(client: &CephClient, image: &RbdImage, owner_id: &str) -> Result<bool, RbdError> {
    let meta = match ceph(image, client.meta_list(image)).await {
        Ok(json) => json,
        Err(error) if tool_stderr(&error).is_some_and(is_missing_image) => return Ok(false),
        Err(error) => return Err(error),
    };
    match parse_disposable_owner(&meta).map_err(|what| RbdError::Unexpected { spec: image.spec(), what })? {
        Some(owner) if owner == owner_id => {}
        owner => return Err(RbdError::NotDisposable { spec: image.spec(), owner: owner.unwrap_or_else(|| "no disposable mark".into()) }),
    }
    let deadline = Instant::now() + REMOVE_WAIT;
    let mut gaps = crate::backoff::PollGaps::doubling(REMOVE_RETRY_MIN, REMOVE_RETRY_MAX);
    loop {
        match ceph(image, client.remove(image)).await {
            Ok(_) => {
                info!(image = %image.spec(), "removed the disposable image");
                return Ok(true);
            }
            Err(error) if tool_stderr(&error).is_some_and(is_missing_image) => return Ok(false),
            // "image still has watchers": exit 16 (EBUSY).
            Err(error) if tool_stderr(&error).is_some_and(|e| e.contains("watchers") || e.contains("(16)")) && Instant::now() < deadline => {
                info!(image = %image.spec(), "the image still has a watcher; trying its removal again");
                tokio::time::sleep(gaps.next_gap().min(deadline.saturating_duration_since(Instant::now()))).await;
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: u64, name: &str, protected: bool) -> Snapshot {
        Snapshot { id, name: name.into(), protected }
    }

    #[test]
    fn snapshot_lists_children_and_metadata_are_parsed_from_rbds_json() {
        let json = r#"[{"id":4,"name":"machine-agent.t.1","size":67108864,"protected":"true","timestamp":"Mon Nov 30 01:55:52 2026"},
                       {"id":5,"name":"mine","size":67108864,"protected":"false","timestamp":"Mon Nov 30 01:55:53 2026"}]"#;
        assert_eq!(parse_snapshots(json).unwrap(), vec![snap(4, "machine-agent.t.1", true), snap(5, "mine", false)]);
        assert_eq!(parse_snapshots("[]\n").unwrap(), vec![]);
        assert!(parse_snapshots("rbd: nope").is_err());
        let children = r#"[{"pool":"p","pool_namespace":"","image":"c1"},{"pool":"p","pool_namespace":"team","image":"c2"}]"#;
        assert_eq!(parse_children(children).unwrap(), ["p/c1", "p/team/c2"]);
        assert_eq!(parse_children("[]").unwrap(), Vec::<String>::new());
        assert_eq!(parse_disposable_owner(r#"{"machine-agent.disposable":"owner-x","other":"1"}"#).unwrap(), Some("owner-x".into()));
        assert_eq!(parse_disposable_owner(r#"{"other":"1"}"#).unwrap(), None);
        assert_eq!(parse_disposable_owner("").unwrap(), None, "rbd prints nothing for an image without metadata");
        assert!(parse_disposable_owner("garbage").is_err());
    }

    #[test]
    fn a_clone_starts_from_the_newest_protected_commit_only() {
        assert_eq!(plan_clone_source(&[]), None);
        let snaps = [
            snap(3, "machine-agent.a.1", true),
            snap(9, "machine-agent.a.2", true),
            snap(12, "someone-elses", true),
            snap(11, "machine-agent.a.3", false), // a drain stopped between create and protect
        ];
        assert_eq!(plan_clone_source(&snaps).map(|s| s.name.as_str()), Some("machine-agent.a.2"));
        assert_eq!(plan_clone_source(&snaps[2..]), None, "never another tool's snapshot");
    }

    #[test]
    fn pruning_keeps_the_newest_by_id_and_any_commit_a_clone_uses() {
        let snaps = [
            snap(7, "machine-agent.t.20260101T000003Z", true),
            snap(2, "machine-agent.t.20260101T000001Z", true),
            snap(5, "machine-agent.t.20260101T000002Z", true),
            snap(1, "manual", true),
            snap(9, "machine-agent.t.20260101T000004Z", true),
        ];
        let names = |v: Vec<&Snapshot>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
        assert_eq!(names(prune_candidates(&snaps, 2)), [2, 5], "oldest first; never a snapshot the agent did not make");
        assert_eq!(names(prune_candidates(&snaps, 4)), Vec::<u64>::new());
        assert_eq!(names(prune_candidates(&snaps, 0)), [2, 5, 7, 9]);
        let children = BTreeMap::from([
            ("machine-agent.t.20260101T000001Z".to_string(), vec![]),
            ("machine-agent.t.20260101T000002Z".to_string(), vec!["cache/proj.clone.abc".to_string()]),
        ]);
        let plan = plan_prune(&snaps, 2, &children);
        assert_eq!(plan.remove, vec![snap(2, "machine-agent.t.20260101T000001Z", true)]);
        assert_eq!(plan.in_use, vec![("machine-agent.t.20260101T000002Z".to_string(), vec!["cache/proj.clone.abc".to_string()])]);
        let unknown = plan_prune(&snaps, 2, &BTreeMap::new());
        assert!(unknown.remove.is_empty(), "a snapshot whose clones could not be listed stays");
    }

    #[test]
    fn commits_are_named_by_task_and_utc_time() {
        assert_eq!(snapshot_name("build-7", 0), "machine-agent.build-7.19700101T000000Z");
        assert_eq!(snapshot_name("", 1_798_765_432), "machine-agent.task.20270101T010352Z");
        assert_eq!(snapshot_name("t", 951_782_400), "machine-agent.t.20000229T000000Z", "a leap day");
    }

    #[test]
    fn a_clone_is_named_after_its_primary_and_owner_and_never_is_the_primary() {
        let primary = RbdImage {
            pool: "cache".into(),
            namespace: Some("team".into()),
            image: "proj".into(),
            client_id: "builder".into(),
            key: crate::secret::Secret::new("AQ"),
            monitors: vec!["127.0.0.1:6789".into()],
            conf: vec![],
            create_size_bytes: Some(1 << 30),
            take_over_from: None,
        };
        let a = clone_of(&primary, "owner-a");
        assert_eq!(a, clone_of(&primary, "owner-a"), "stable across restarts");
        assert_ne!(a.image, clone_of(&primary, "owner-b").image);
        assert!(a.image.starts_with("proj.clone.") && a.image.len() == "proj.clone.".len() + 12, "{}", a.image);
        assert_eq!((a.pool.as_str(), a.namespace.as_deref(), a.create_size_bytes), ("cache", Some("team"), None));
        let settings = RbdSettings { mapper: super::super::MapperChoice::Auto, owner_id: String::new(), dir: "/x".into(), keep_snapshots: 2 };
        assert!(matches!(attached_image(&settings, &primary, CacheMode::Clone), Err(RbdError::NoOwnerId)));
        assert_eq!(attached_image(&settings, &primary, CacheMode::Isolated).unwrap(), primary);
    }
}
