//! The intent to format: recorded in the state dir before mkfs starts and
//! removed once it has finished, before anything is mounted.
//!
//! An agent killed mid-mkfs (or a drain that had to abandon it) leaves a
//! device that reads as neither blank nor a filesystem, and the blank probe
//! rightly refuses such a device. Only this record tells the next agent that
//! the bytes on it are its own unfinished format of the very same device
//! (same node, size, serial or backing file), never mounted and so holding no
//! cache: safe to format again. An intent for another device is stale and
//! changes nothing.

use serde::{Deserialize, Serialize};
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What identifies a device across agent restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIdentity {
    /// The device node (canonical), e.g. `/dev/nvme1n1`.
    pub device: PathBuf,
    pub size_bytes: u64,
    /// sysfs's serial or WWID of the disk, when it has one (NVMe, EBS, SCSI).
    pub serial: Option<String>,
    /// A loop device's backing file, with its filesystem's device number and its inode.
    pub backing: Option<BackingFile>,
}

/// The file behind a loop device, identified beyond its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingFile {
    pub path: PathBuf,
    pub dev: u64,
    pub inode: u64,
}

/// One format that started and has not been seen to finish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormatIntent {
    pub identity: DeviceIdentity,
    /// What mkfs was making: "ext4", "xfs" or "btrfs".
    pub fs_type: String,
    pub started_unix_ms: i64,
    pub agent_pid: u32,
}

/// Why an intent could not be read or written.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum IntentError {
    /// cannot record the intent to format in {path}: {source}
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// cannot read the intent to format {path}: {source}
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// {path} is not an intent to format this agent can read ({reason}); remove it if no format is running
    Unreadable { path: PathBuf, reason: String },
    /// cannot read sysfs for {device}: {source}
    Sysfs {
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Intents, one file per mount path, in a directory of the agent's state dir.
#[derive(Debug, Clone)]
pub struct IntentStore {
    dir: PathBuf,
}

impl IntentStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `<dir>/<mount path, '/' as %2F>.json`: readable, and one file per mount.
    pub fn path_for(&self, mount_path: &Path) -> PathBuf {
        let name = mount_path.display().to_string().replace('%', "%25").replace('/', "%2F");
        self.dir.join(format!("{name}.json"))
    }

    /// The unfinished format recorded for `mount_path`, if any.
    pub fn read(&self, mount_path: &Path) -> Result<Option<FormatIntent>, IntentError> {
        let path = self.path_for(mount_path);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IntentError::Read { path, source }),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| IntentError::Unreadable { path, reason: e.to_string() })
    }

    /// Records `intent` durably (written, synced, renamed) before mkfs may start.
    pub fn record(&self, mount_path: &Path, intent: &FormatIntent) -> Result<(), IntentError> {
        let path = self.path_for(mount_path);
        let write = |source| IntentError::Write { path: path.clone(), source };
        crate::fsutil::create_private_dir(&self.dir).map_err(write)?;
        let json = serde_json::to_vec_pretty(intent).map_err(|e| write(std::io::Error::other(e)))?;
        crate::fsutil::write_atomic(&path, &json, 0o600).map_err(write)
    }

    /// Forgets the intent: the format finished. Durable before anything is mounted.
    pub fn clear(&self, mount_path: &Path) -> Result<(), IntentError> {
        let path = self.path_for(mount_path);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(IntentError::Write { path, source }),
        }
        // The removal itself must survive a crash, or the next agent would format a used cache.
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|source| IntentError::Write { path, source })
    }
}

/// Reads what identifies `device` (block device number `rdev`) from sysfs under `sys_root`.
pub fn device_identity(sys_root: &Path, device: &Path, rdev: u64) -> Result<DeviceIdentity, IntentError> {
    let sysfs_err = |source| IntentError::Sysfs { device: device.into(), source };
    let block = super::device::sysfs_block_dir(sys_root, rdev).map_err(sysfs_err)?;
    let sectors = std::fs::read_to_string(block.join("size")).map_err(sysfs_err)?;
    let size_bytes = super::device::parse_sectors(&sectors)
        .ok_or_else(|| sysfs_err(std::io::Error::new(ErrorKind::InvalidData, format!("{:?} is not a sector count", sectors.trim()))))?;
    let read_trimmed = |rel: &str| std::fs::read_to_string(block.join(rel)).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let serial = read_trimmed("device/serial").or_else(|| read_trimmed("wwid")).or_else(|| read_trimmed("device/wwid"));
    let backing = match read_trimmed("loop/backing_file") {
        Some(path) => {
            let meta = std::fs::metadata(&path).map_err(sysfs_err)?;
            Some(BackingFile { path: path.into(), dev: meta.dev(), inode: meta.ino() })
        }
        None => None,
    };
    let device = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
    Ok(DeviceIdentity { device, size_bytes, serial, backing })
}

/// Whether an intent recorded earlier is for the device seen now. A loop
/// device's number may differ from one attach to the next: its backing file
/// (the same inode) is what identifies it.
pub fn same_device(recorded: &DeviceIdentity, now: &DeviceIdentity) -> bool {
    if recorded.size_bytes != now.size_bytes || recorded.serial != now.serial {
        return false;
    }
    match (&recorded.backing, &now.backing) {
        (Some(a), Some(b)) => a.dev == b.dev && a.inode == b.inode,
        (None, None) => recorded.device == now.device,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(device: &str) -> DeviceIdentity {
        DeviceIdentity { device: device.into(), size_bytes: 1 << 30, serial: Some("vol0123456789abcdef0".into()), backing: None }
    }

    fn looped(device: &str, inode: u64) -> DeviceIdentity {
        DeviceIdentity {
            device: device.into(),
            size_bytes: 1 << 30,
            serial: None,
            backing: Some(BackingFile { path: "/var/cache.img".into(), dev: 2049, inode }),
        }
    }

    #[test]
    fn an_intent_matches_only_the_same_device() {
        assert!(same_device(&disk("/dev/nvme1n1"), &disk("/dev/nvme1n1")));
        assert!(!same_device(&disk("/dev/nvme1n1"), &disk("/dev/nvme2n1")), "another node");
        let mut other = disk("/dev/nvme1n1");
        other.serial = Some("vol0fedcba9876543210".into());
        assert!(!same_device(&disk("/dev/nvme1n1"), &other), "another volume attached at the same node");
        let mut bigger = disk("/dev/nvme1n1");
        bigger.size_bytes *= 2;
        assert!(!same_device(&disk("/dev/nvme1n1"), &bigger), "another size");
        assert!(same_device(&looped("/dev/loop3", 12), &looped("/dev/loop7", 12)), "a loop device reattached under another number");
        assert!(!same_device(&looped("/dev/loop3", 12), &looped("/dev/loop3", 13)), "a new backing file at the same path");
        assert!(!same_device(&looped("/dev/loop3", 12), &disk("/dev/loop3")));
    }

    #[test]
    fn intents_are_recorded_read_and_cleared_per_mount_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = IntentStore::new(dir.path().join("intents"));
        let mount = Path::new("/var/lib/buildkit/cache");
        assert_eq!(store.read(mount).unwrap(), None);
        let intent = FormatIntent { identity: disk("/dev/nvme1n1"), fs_type: "ext4".into(), started_unix_ms: 1, agent_pid: 42 };
        store.record(mount, &intent).unwrap();
        assert_eq!(store.read(mount).unwrap(), Some(intent));
        assert_eq!(store.read(Path::new("/var/lib/buildkit/other")).unwrap(), None, "one file per mount path");
        assert!(store.path_for(mount).ends_with("%2Fvar%2Flib%2Fbuildkit%2Fcache.json"));
        store.clear(mount).unwrap();
        assert_eq!(store.read(mount).unwrap(), None);
        store.clear(mount).unwrap();
    }

    #[test]
    fn a_corrupt_intent_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = IntentStore::new(dir.path());
        let mount = Path::new("/cache");
        std::fs::write(store.path_for(mount), b"{not json").unwrap();
        let err = store.read(mount).unwrap_err().to_string();
        assert!(err.contains("%2Fcache.json"), "{err}");
    }
}
