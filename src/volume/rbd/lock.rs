//! Who owns an image: the advisory exclusive lock every agent takes on an RBD
//! image before its first write, named for the owner (`machine-agent:<owner
//! id>`), so a second builder finds the holder and refuses instead of
//! mounting the same filesystem twice.
//!
//! Why an advisory lock and not only the image's `exclusive-lock` feature:
//! that feature hands the lock to whichever client writes next (two plain
//! writers trade it back and forth and corrupt the filesystem). The advisory
//! lock is taken once, by a short `rbd lock add`, and stays until the owner
//! releases it at drain or a task names the owner in `take_over_from`. A take
//! over blocklists the old owner's clients first, so a half-dead builder can
//! never write again.
//!
//! Parsing and planning here are pure; the `rbd` runs are in [`super`].

use serde::Deserialize;

/// The prefix of every lock id this agent takes; what follows is the owner id.
const LOCK_ID_PREFIX: &str = "machine-agent:";

/// One lock on an image, as `rbd lock ls --format json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ImageLock {
    /// The lock id (cookie) given to `rbd lock add`.
    pub id: String,
    /// The client that took it, e.g. `client.4123`.
    pub locker: String,
    /// That client's address, e.g. `127.0.0.1:0/3012345`.
    pub address: String,
}

impl ImageLock {
    /// The owner id, when an agent took this lock.
    pub fn owner(&self) -> Option<&str> {
        self.id.strip_prefix(LOCK_ID_PREFIX)
    }

    /// Names the holder for an operator: the owner id, or the foreign lock id, and its client.
    pub fn describe(&self) -> String {
        match self.owner() {
            Some(owner) => format!("owner {owner} ({} at {})", self.locker, self.address),
            None => format!("a lock not taken by machine-agent: id {:?} ({} at {})", self.id, self.locker, self.address),
        }
    }
}

/// The lock id an owner takes.
pub fn lock_id(owner_id: &str) -> String {
    format!("{LOCK_ID_PREFIX}{owner_id}")
}

/// Parses `rbd lock ls --format json`: a list of locks (Pacific and later),
/// or an object keyed by lock id (older releases).
pub fn parse_locks(json: &str) -> Result<Vec<ImageLock>, String> {
    #[derive(Deserialize)]
    struct Keyed {
        locker: String,
        address: String,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Listing {
        List(Vec<ImageLock>),
        Keyed(std::collections::BTreeMap<String, Keyed>),
    }
    let listing: Listing = serde_json::from_str(json.trim()).map_err(|e| format!("unexpected `rbd lock ls` output: {e}"))?;
    Ok(match listing {
        Listing::List(locks) => locks,
        Listing::Keyed(map) => map.into_iter().map(|(id, k)| ImageLock { id, locker: k.locker, address: k.address }).collect(),
    })
}

/// What to do about the image's lock before mapping it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockPlan {
    /// Nobody holds it: take it.
    Take,
    /// This owner holds it already (an agent restarted mid-task): go on.
    AlreadyOurs(ImageLock),
    /// The task names the holder as a stale owner: fence its clients, break its lock, take it.
    TakeOver(ImageLock),
    /// Someone else holds it: refuse, naming them.
    Refuse(ImageLock),
}

/// Decides from the image's locks. A lock that is neither ours nor the one the
/// task may take over is never broken, whoever took it.
pub fn plan_lock(locks: &[ImageLock], owner_id: &str, take_over_from: Option<&str>) -> LockPlan {
    let Some(first) = locks.first() else { return LockPlan::Take };
    if let Some(ours) = locks.iter().find(|l| l.owner() == Some(owner_id)) {
        return LockPlan::AlreadyOurs(ours.clone());
    }
    match (first.owner(), take_over_from) {
        // An exclusive lock has one holder; a shared lock list is not ours to break.
        (Some(holder), Some(stale)) if holder == stale && locks.len() == 1 => LockPlan::TakeOver(first.clone()),
        _ => LockPlan::Refuse(first.clone()),
    }
}

/// The addresses to blocklist before breaking `stale`'s lock: its locker and
/// every client watching the image (the old builder's mapping), except ours.
pub fn fence_addresses(stale: &ImageLock, watchers: &[String], our_watchers: &[String]) -> Vec<String> {
    let mut addresses: Vec<String> = std::iter::once(stale.address.clone()).chain(watchers.iter().cloned()).filter(|a| !our_watchers.contains(a)).collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// Parses `rbd status --format json`: the addresses of the clients watching the image.
pub fn parse_watchers(json: &str) -> Result<Vec<String>, String> {
    #[derive(Deserialize)]
    struct Watcher {
        address: String,
    }
    #[derive(Deserialize)]
    struct Status {
        #[serde(default)]
        watchers: Vec<Watcher>,
    }
    let status: Status = serde_json::from_str(json.trim()).map_err(|e| format!("unexpected `rbd status` output: {e}"))?;
    Ok(status.watchers.into_iter().map(|w| w.address).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(id: &str) -> ImageLock {
        ImageLock { id: id.into(), locker: "client.4123".into(), address: "127.0.0.1:0/3012345".into() }
    }

    #[test]
    fn both_listing_shapes_parse() {
        let list = r#"[{"id":"machine-agent:a","locker":"client.4123","address":"127.0.0.1:0/3012345"}]"#;
        assert_eq!(parse_locks(list).unwrap(), vec![lock("machine-agent:a")]);
        let keyed = r#"{"machine-agent:a":{"locker":"client.4123","address":"127.0.0.1:0/3012345"}}"#;
        assert_eq!(parse_locks(keyed).unwrap(), vec![lock("machine-agent:a")]);
        assert_eq!(parse_locks("[]\n").unwrap(), vec![]);
        assert!(parse_locks("rbd: error").unwrap_err().contains("rbd lock ls"));
    }

    #[test]
    fn a_free_image_is_taken_and_our_own_lock_is_kept() {
        assert_eq!(plan_lock(&[], "a", None), LockPlan::Take);
        assert_eq!(plan_lock(&[lock("machine-agent:a")], "a", None), LockPlan::AlreadyOurs(lock("machine-agent:a")));
    }

    #[test]
    fn another_owner_is_refused_unless_the_task_names_it() {
        let theirs = lock("machine-agent:b");
        assert_eq!(plan_lock(&[theirs.clone()], "a", None), LockPlan::Refuse(theirs.clone()));
        assert_eq!(plan_lock(&[theirs.clone()], "a", Some("c")), LockPlan::Refuse(theirs.clone()));
        assert_eq!(plan_lock(&[theirs.clone()], "a", Some("b")), LockPlan::TakeOver(theirs));
    }

    #[test]
    fn a_lock_someone_else_took_is_never_broken() {
        let foreign = lock("backup-job");
        assert_eq!(plan_lock(&[foreign.clone()], "a", Some("backup-job")), LockPlan::Refuse(foreign.clone()));
        assert!(foreign.describe().contains("not taken by machine-agent"), "{}", foreign.describe());
        let shared = [lock("machine-agent:b"), lock("machine-agent:c")];
        assert!(matches!(plan_lock(&shared, "a", Some("b")), LockPlan::Refuse(_)));
    }

    #[test]
    fn the_fence_covers_the_locker_and_every_watcher_but_ours() {
        let stale = lock("machine-agent:b");
        let watchers = vec!["127.0.0.1:0/77".to_string(), "127.0.0.1:0/3012345".to_string(), "127.0.0.1:0/99".to_string()];
        assert_eq!(fence_addresses(&stale, &watchers, &["127.0.0.1:0/99".to_string()]), vec!["127.0.0.1:0/3012345", "127.0.0.1:0/77"]);
    }

    #[test]
    fn watchers_are_read_from_rbd_status() {
        let json = r#"{"watchers":[{"address":"127.0.0.1:0/3312","client":4155,"cookie":140}]}"#;
        assert_eq!(parse_watchers(json).unwrap(), vec!["127.0.0.1:0/3312"]);
        assert_eq!(parse_watchers(r#"{"watchers":[]}"#).unwrap(), Vec::<String>::new());
    }
}
