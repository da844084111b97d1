//! Is the cache filesystem failing? A disk whose writes start failing does
//! not stop a mounted filesystem from answering statvfs, and page-cache
//! writes keep succeeding until writeback fails, so the agent looks for it:
//!
//! - ext4 counts the errors it records (`/sys/fs/ext4/<device>/errors_count`);
//! - a canary: a small file at the top of the mount, rewritten and fsynced on
//!   every look, so a failing device (EIO) or a filesystem the kernel remounted
//!   read-only after errors (EROFS) shows within one look - xfs included,
//!   which answers EIO to everything once it has shut down.
//!
//! A full filesystem (ENOSPC, EDQUOT) is not a failing one: GC handles that.
//! [`assess`] is the pure rule; [`look`] does the I/O.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// At the top of the mount, outside BuildKit's root: never a cache record.
pub const CANARY_NAME: &str = ".machine-agent-canary";
/// One filesystem block: enough to go through allocation and writeback.
const CANARY_BYTES: usize = 4096;

/// What one look at a mounted cache filesystem found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signals {
    /// ext4's recorded error count; None for other filesystems or when unreadable.
    pub ext4_errors: Option<u64>,
    /// The canary's write or fsync error, if it failed.
    pub canary_error: Option<std::io::ErrorKind>,
    /// The raw errno of that error, for the message.
    pub canary_errno: Option<i32>,
}

/// A cache mount to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    pub mount_path: PathBuf,
    /// The device node, e.g. `/dev/nvme1n1`: its name keys ext4's sysfs directory.
    pub device: PathBuf,
    pub fs_type: String,
}

/// Why the filesystem is failing, or None while it looks healthy. Pure.
pub fn assess(signals: &Signals) -> Option<String> {
    let mut problems = vec![];
    if let Some(n) = signals.ext4_errors.filter(|&n| n > 0) {
        problems.push(format!("ext4 recorded {n} error(s)"));
    }
    if let Some(errno) = signals.canary_errno {
        let is_failure = matches!(errno, nix::libc::EIO | nix::libc::EROFS | nix::libc::EUCLEAN);
        if is_failure {
            problems.push(format!("a write and fsync on it failed: {}", std::io::Error::from_raw_os_error(errno)));
        }
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// Reads the signals of `w` (`sys_root` is `/` outside tests) and rewrites its canary.
pub fn look(sys_root: &Path, w: &Watched) -> Signals {
    let ext4_errors = (w.fs_type.starts_with("ext")).then(|| read_ext4_errors(sys_root, &w.device)).flatten();
    let (canary_error, canary_errno) = match write_canary(&w.mount_path) {
        Ok(()) => (None, None),
        Err(e) => (Some(e.kind()), e.raw_os_error()),
    };
    Signals { ext4_errors, canary_error, canary_errno }
}

/// `errors_count` of the ext4 on `device`, if sysfs has it.
pub fn read_ext4_errors(sys_root: &Path, device: &Path) -> Option<u64> {
    let name = std::fs::canonicalize(device).ok()?.file_name()?.to_owned();
    let path = sys_root.join("sys/fs/ext4").join(name).join("errors_count");
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Rewrites the canary and fsyncs it: the error of either, if any.
fn write_canary(mount_path: &Path) -> std::io::Result<()> {
    let path = mount_path.join(CANARY_NAME);
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).custom_flags(nix::libc::O_NOFOLLOW).open(path)?;
    file.write_all(&[0x5a; CANARY_BYTES])?;
    file.sync_all()
}

/// A cache filesystem found failing: reported once per mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsFailing {
    pub mount_path: PathBuf,
    pub why: String,
}

/// The loop: looks at every watched mount each interval and reports a mount
/// the first time it is found failing. A failing filesystem stays failing:
/// writes were lost, and only an fsck can say what else.
#[derive(Debug)]
pub struct HealthWatch {
    pub sys_root: PathBuf,
    pub mounts: Vec<Watched>,
    pub interval: std::time::Duration,
    pub reports: tokio::sync::mpsc::Sender<FsFailing>,
}

impl HealthWatch {
    /// Runs until the receiver of the reports goes away.
    pub async fn run(mut self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = self.reports.closed() => return,
            }
            let mut failing = vec![];
            for w in &self.mounts {
                // The canary's fsync can block on a sick device: off the runtime's threads.
                let (root, watched) = (self.sys_root.clone(), w.clone());
                let signals = tokio::task::spawn_blocking(move || look(&root, &watched)).await.unwrap_or_default();
                if let Some(why) = assess(&signals) {
                    failing.push(FsFailing { mount_path: w.mount_path.clone(), why });
                }
            }
            for report in failing {
                self.mounts.retain(|w| w.mount_path != report.mount_path);
                if self.reports.send(report).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Flushes one filesystem (syncfs), reporting the error a plain sync(2) would swallow.
pub fn flush(mount_path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(mount_path)?;
    nix::unistd::syncfs(dir.as_raw_fd()).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_and_failed_writes_count_not_a_full_disk() {
        assert_eq!(assess(&Signals::default()), None);
        assert_eq!(assess(&Signals { ext4_errors: Some(0), ..Signals::default() }), None);
        let full = Signals { canary_error: Some(std::io::ErrorKind::StorageFull), canary_errno: Some(nix::libc::ENOSPC), ..Signals::default() };
        assert_eq!(assess(&full), None, "a full cache is GC's business, not a failing disk");
        let eio = Signals { canary_error: Some(std::io::ErrorKind::Other), canary_errno: Some(nix::libc::EIO), ..Signals::default() };
        assert!(assess(&eio).unwrap().contains("Input/output error"));
        let ro = Signals { ext4_errors: Some(3), canary_errno: Some(nix::libc::EROFS), ..Signals::default() };
        let why = assess(&ro).unwrap();
        assert!(why.contains("ext4 recorded 3 error(s)") && why.contains("Read-only"), "{why}");
    }

    #[test]
    fn a_healthy_directory_passes_a_look() {
        let dir = tempfile::tempdir().unwrap();
        let w = Watched { mount_path: dir.path().into(), device: "/dev/null".into(), fs_type: "tmpfs".into() };
        assert_eq!(assess(&look(Path::new("/"), &w)), None);
        assert_eq!(std::fs::metadata(dir.path().join(CANARY_NAME)).unwrap().len(), CANARY_BYTES as u64);
        flush(dir.path()).unwrap();
    }
}
