//! Who owns an image: an exclusive lock every agent takes on the image's
//! header object before the first write, its cookie the owner id, so a second
//! builder finds the holder and refuses instead of mounting the same
//! filesystem twice.
//!
//! Why this lock and not the image's own locks:
//! - the `exclusive-lock` feature hands its lock to whichever client writes
//!   next (two plain writers trade it back and forth and corrupt the
//!   filesystem);
//! - `rbd lock add` takes that same lock (`rbd_lock`) with a foreign tag, and
//!   librbd then waits forever for it before its first write: the mapper's
//!   own writes hang (verified here with rbd-fuse: losetup's fsync never
//!   returned).
//!
//! A lock of our own name on the header (`rados lock get ... machine-agent`)
//! sits beside librbd's and takes no part in its hand-offs. It is taken once,
//! by a short `rados` run, and stays until the owner releases it at drain or
//! a task names the owner in `take_over_from`. A take-over blocklists the old
//! owner's clients first, so a half-dead builder can never write again.
//!
//! Parsing and planning here are pure; the `rados` runs are in [`super`].

use serde::Deserialize;

/// The name of the lock on the image's header object.
pub const LOCK_NAME: &str = "machine-agent";

/// One holder of the lock, as `rados lock info --format json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ImageLock {
    /// The client that took it, e.g. `client.4123`.
    #[serde(rename = "name")]
    pub locker: String,
    /// The owner id of the agent that took it.
    #[serde(rename = "cookie")]
    pub owner: String,
    /// That client's address, e.g. `127.0.0.1:0/3012345`.
    #[serde(rename = "addr")]
    pub address: String,
}

impl ImageLock {
    /// Names the holder for an operator: the owner id and its client.
    pub fn describe(&self) -> String {
        format!("owner {} ({} at {})", self.owner, self.locker, self.address)
    }
}

/// Parses `rados lock info --format json <header> machine-agent`: the holders
/// (none when the lock was never taken or was released).
pub fn parse_locks(json: &str) -> Result<Vec<ImageLock>, String> {
    #[derive(Deserialize)]
    struct Info {
        #[serde(default)]
        lockers: Vec<ImageLock>,
    }
    let info: Info = serde_json::from_str(json.trim()).map_err(|e| format!("unexpected `rados lock info` output: {e}"))?;
    Ok(info.lockers)
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

/// Decides from the lock's holders. A lock held by another owner is broken
/// only when the task names that owner.
pub fn plan_lock(locks: &[ImageLock], owner_id: &str, take_over_from: Option<&str>) -> LockPlan {
    if let Some(ours) = locks.iter().find(|l| l.owner == owner_id) {
        return LockPlan::AlreadyOurs(ours.clone());
    }
    match (locks.first(), take_over_from) {
        (None, _) => LockPlan::Take,
        // An exclusive lock has one holder; anything else is not ours to break.
        (Some(holder), Some(stale)) if holder.owner == stale && locks.len() == 1 => LockPlan::TakeOver(holder.clone()),
        (Some(holder), _) => LockPlan::Refuse(holder.clone()),
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

    fn lock(owner: &str) -> ImageLock {
        ImageLock { locker: "client.4123".into(), owner: owner.into(), address: "127.0.0.1:0/3012345".into() }
    }

    #[test]
    fn holders_are_read_from_rados_lock_info() {
        let held = r#"{"name":"machine-agent","type":"exclusive","tag":"a","lockers":[{"name":"client.4123","cookie":"a","description":"machine-agent owner a","expiration":"0.000000","addr":"127.0.0.1:0/3012345"}]}"#;
        assert_eq!(parse_locks(held).unwrap(), vec![lock("a")]);
        assert_eq!(parse_locks(r#"{"name":"machine-agent","type":"none","tag":"","lockers":[]}"#).unwrap(), vec![]);
        assert!(parse_locks("ERROR: nope").unwrap_err().contains("rados lock info"));
    }

    #[test]
    fn a_free_image_is_taken_and_our_own_lock_is_kept() {
        assert_eq!(plan_lock(&[], "a", None), LockPlan::Take);
        assert_eq!(plan_lock(&[], "a", Some("b")), LockPlan::Take);
        assert_eq!(plan_lock(&[lock("a")], "a", None), LockPlan::AlreadyOurs(lock("a")));
    }

    #[test]
    fn another_owner_is_refused_unless_the_task_names_it() {
        let theirs = lock("b");
        assert_eq!(plan_lock(std::slice::from_ref(&theirs), "a", None), LockPlan::Refuse(theirs.clone()));
        assert_eq!(plan_lock(std::slice::from_ref(&theirs), "a", Some("c")), LockPlan::Refuse(theirs.clone()));
        assert_eq!(plan_lock(std::slice::from_ref(&theirs), "a", Some("b")), LockPlan::TakeOver(theirs.clone()));
        assert!(theirs.describe().starts_with("owner b (client.4123"), "{}", theirs.describe());
        assert!(matches!(plan_lock(&[lock("b"), lock("c")], "a", Some("b")), LockPlan::Refuse(_)), "several holders are never broken");
    }

    #[test]
    fn the_fence_covers_the_locker_and_every_watcher_but_ours() {
        let stale = lock("b");
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
