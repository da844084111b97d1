//! One agent per machine: an exclusive lock on `<state_dir>/agent.lock`,
//! taken before the agent binds a port or touches a device and held for the
//! process's life, and the one fact others read from it: which pid holds it.
//!
//! The lock is flock(2) on an open file: the kernel drops it when the process
//! dies, however it dies, so a crashed agent never leaves a stale lock for its
//! successor. The file records the holder's pid, for the second agent's
//! refusal and for the volume drain, which never kills or unmounts what
//! another live agent holds (`volume::holders`). The descriptor is
//! close-on-exec (std opens every file so): the engine never inherits the lock.
//!
//! A leaf module: it uses nothing else from the crate.

use fs2::FileExt;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The lock's file name in the state dir. Another agent is recognised by an
/// open descriptor on a file of this name that records that agent's own pid.
pub const LOCK_FILE_NAME: &str = "agent.lock";

/// The lock file records a pid and a newline; anything longer is not ours.
const MAX_LOCK_FILE_BYTES: u64 = 32;

/// The held lock; released when dropped or when the process ends.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

/// Why the state dir could not be locked.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum LockError {
    /// another machine-agent ({holder}) holds the state dir {state_dir} (lock {lock}): one agent per machine; this one touched nothing
    Held { state_dir: PathBuf, lock: PathBuf, holder: Holder },
    /// cannot open the state-dir lock {path}: {source}
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// cannot record this agent's pid in {path}: {source}
    Record {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The holder of a lock, as far as its file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder(pub Option<u32>);

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(pid) => write!(f, "pid {pid}"),
            // Between the holder's flock and its write of the pid.
            None => f.write_str("pid not yet recorded"),
        }
    }
}

impl InstanceLock {
    /// Takes the state dir's lock without waiting, and records our pid in it.
    /// The directory must exist.
    pub fn acquire(state_dir: &Path) -> Result<Self, LockError> {
        let path = state_dir.join(LOCK_FILE_NAME);
        let open_err = |source| LockError::Open { path: path.clone(), source };
        // Never truncated on open: until the flock is ours, the pid in it is the holder's.
        let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(&path).map_err(open_err)?;
        if let Err(error) = file.try_lock_exclusive() {
            if error.raw_os_error() == fs2::lock_contended_error().raw_os_error() {
                return Err(LockError::Held { state_dir: state_dir.into(), lock: path.clone(), holder: Holder(read_holder_pid(&path)) });
            }
            return Err(open_err(error));
        }
        let record_err = |source| LockError::Record { path: path.clone(), source };
        file.set_len(0).map_err(record_err)?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes()).map_err(record_err)?;
        Ok(Self { _file: file, path })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid of the live agent holding `state_dir`'s lock; None when no agent
/// holds it. Looks only: takes no lock that outlives the call, writes nothing.
pub fn running_agent(state_dir: &Path) -> io::Result<Option<u32>> {
    let path = state_dir.join(LOCK_FILE_NAME);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // A shared lock is refused only while an agent holds its exclusive one.
    match file.try_lock_shared() {
        Ok(()) => Ok(None),
        Err(std::fs::TryLockError::WouldBlock) => Ok(read_holder_pid(&path)),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The pid a lock file records, if it records one. `path` may be a
/// `/proc/<pid>/fd/<n>` link: that reads the file the process has open.
pub fn read_holder_pid(path: &Path) -> Option<u32> {
    let bytes = read_small_regular_file(path)?;
    parse_holder_pid(&bytes)
}

/// `<pid>\n`, as [`InstanceLock::acquire`] writes it: a positive decimal.
pub fn parse_holder_pid(bytes: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|&pid| pid > 0)
}

/// A small read of a regular file only: a path in /proc can name anything.
fn read_small_regular_file(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NONBLOCK).open(path).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(MAX_LOCK_FILE_BYTES).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_pids_are_positive_decimals() {
        let cases: &[(&[u8], Option<u32>)] = &[
            (b"123\n", Some(123)),
            (b"123", Some(123)),
            (b" 7 \n", Some(7)),
            (b"", None),
            (b"\n", None),
            (b"0\n", None),
            (b"-1\n", None),
            (b"12x\n", None),
            (b"99999999999\n", None),
        ];
        for &(bytes, want) in cases {
            assert_eq!(parse_holder_pid(bytes), want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn a_second_lock_on_one_state_dir_is_refused_naming_the_holder_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = InstanceLock::acquire(dir.path()).unwrap();
        assert_eq!(read_holder_pid(first.path()), Some(std::process::id()));
        // flock locks belong to the open file, so a second open in this process conflicts too.
        match InstanceLock::acquire(dir.path()) {
            Err(LockError::Held { holder, lock, .. }) => {
                assert_eq!(holder, Holder(Some(std::process::id())));
                assert_eq!(lock, dir.path().join(LOCK_FILE_NAME));
            }
            other => panic!("expected Held, got {other:?}"),
        }
        let message = InstanceLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(message.contains(&format!("pid {}", std::process::id())) && message.contains(&dir.path().display().to_string()), "{message}");
        drop(first);
        let again = InstanceLock::acquire(dir.path()).unwrap();
        assert_eq!(read_holder_pid(again.path()), Some(std::process::id()));
    }

    #[test]
    fn a_stale_pid_left_by_a_dead_agent_does_not_hold_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE_NAME), "4194304000\n").unwrap();
        let lock = InstanceLock::acquire(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(lock.path()).unwrap(), format!("{}\n", std::process::id()));
    }

    #[test]
    fn a_missing_state_dir_is_an_open_error_naming_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let err = InstanceLock::acquire(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, LockError::Open { .. }) && err.to_string().contains(LOCK_FILE_NAME), "{err}");
    }
}
