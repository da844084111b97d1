//! Finding the cache volume's block device, and making one from a file.
//!
//! Owns: turning a task's device path (a `/dev` node, a `/dev/disk/by-id` link,
//! or an EBS volume id that Nitro exposes as an NVMe namespace) into the node
//! the kernel gave the device; waiting, bounded, for that device to appear; and
//! attaching, growing and detaching the loop device of a file-backed volume.
//!
//! Never: probes, formats, mounts or writes a device. It never shrinks a
//! backing file, never attaches a second loop device to a file that already
//! has one (an agent restarted after a crash reuses the first), and never
//! detaches a loop device that sysfs does not show backed by the caller's file.
//!
//! `/sys` and `/dev` are read under a root path parameter (`/` in production)
//! so tests point the lookups at a `TempDir` tree. Those reads go to sysfs and
//! devtmpfs, which answer from memory, so they run inline on the async runtime.

use super::backing::open_backing_file;
use super::tool::run_tool;
use crate::backoff::{poll_until, PollGaps};
use std::fmt;
use std::fs::FileType;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// util-linux's loop tool; an absolute path so PATH cannot change what runs.
pub const LOSETUP: &str = "/usr/sbin/losetup";

/// What `device/model` says on an NVMe namespace that is an EBS volume.
const EBS_MODEL: &str = "Amazon Elastic Block Store";

/// The first re-look at a missing device comes soon: udev makes a node and its
/// links within milliseconds of the kernel announcing the disk.
const POLL_MIN: Duration = Duration::from_millis(50);
/// The looks then slow down to one a second: an EBS attach takes seconds, and
/// a second's delay in noticing it is nothing next to that.
const POLL_MAX: Duration = Duration::from_secs(1);

/// The kernel may finish detaching after `losetup -d` returns (the rundown runs
/// on a workqueue), normally within milliseconds. Ten seconds leaves room for a
/// loaded machine; a device still attached then is held open or mounted.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);
const DETACH_POLL: Duration = Duration::from_millis(20);

/// losetup only issues a few ioctls; one still running after a minute is stuck
/// on a hung device, and is killed rather than waited on forever.
const LOSETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Sysfs counts block device sizes in 512-byte sectors, whatever the device's own sector size.
const SECTOR_BYTES: u64 = 512;

/// Why a device could not be found, attached or detached. Each names the device, path or command.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum DeviceError {
    /// cannot resolve the device path {path}: {source}
    Resolve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// {path} resolves to {resolved}, which is {kind}, not a block device
    NotBlockDevice { path: PathBuf, resolved: PathBuf, kind: &'static str },
    /// cannot read {path}: {source}
    Sysfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// no block device at {device}{ebs} after waiting {waited:?}
    Timeout { device: PathBuf, ebs: EbsHint, waited: Duration },
    /// cannot create or size the backing file {path}: {source}
    Backing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// {0}
    BackingRefused(#[from] super::backing::BackingError),
    /// {0}
    Tool(#[from] super::tool::ToolError),
    /// {command} printed {stdout:?}, not a loop device
    UnexpectedOutput { command: String, stdout: String },
    /// {device} still shows {backing} as its backing file {waited:?} after losetup -d; is it still mounted or held open?
    DetachTimeout { device: PathBuf, backing: PathBuf, waited: Duration },
}

/// The EBS volume id a wait also looked for, as a clause of [`DeviceError::Timeout`]'s message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EbsHint(pub Option<String>);

impl fmt::Display for EbsHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(id) => write!(f, " (nor an NVMe namespace for EBS volume {id})"),
            None => Ok(()),
        }
    }
}

// === finding a device ===

/// The EBS volume id in an NVMe controller serial, or `None` if the serial is
/// not an EBS one. Nitro reports `vol-0123456789abcdef0` as the serial
/// `vol0123456789abcdef0`, space padded to 20 characters (sysfs adds a newline).
/// Ids are 8 (older volumes) or 17 hex digits.
pub fn parse_ebs_serial(serial: &str) -> Option<String> {
    let hex = serial.trim().strip_prefix("vol")?;
    let valid = matches!(hex.len(), 8 | 17) && hex.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| format!("vol-{}", hex.to_ascii_lowercase()))
}

/// `nvme<controller>n<namespace>`: a namespace, the disk itself. Partitions
/// (`nvme0n1p1`) and the hidden per-path devices of native multipath
/// (`nvme0c0n1`) are not what a volume is mounted from.
fn is_nvme_namespace(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix("nvme").and_then(|rest| rest.split_once('n')).is_some_and(|(controller, namespace)| digits(controller) && digits(namespace))
}

/// The `/dev` node of the NVMe namespace whose controller serial is
/// `ebs_volume_id` (`vol-...`), found in `<sys_root>/sys/block`. A serial that
/// matches on a model other than EBS's is still taken, and logged at debug.
pub fn find_nvme_by_ebs_id(sys_root: &Path, ebs_volume_id: &str) -> Result<Option<PathBuf>, DeviceError> {
    let block = sys_root.join("sys/block");
    let wanted = ebs_volume_id.trim().to_ascii_lowercase();
    let mut matches = vec![];
    for name in read_dir_names(&block)?.into_iter().filter(|n| is_nvme_namespace(n)) {
        let controller = block.join(&name).join("device");
        let Some(serial) = read_attribute(&controller.join("serial"))? else {
            debug!(device = %name, "NVMe namespace without a controller serial in sysfs; skipped");
            continue;
        };
        if parse_ebs_serial(&serial).as_deref() != Some(wanted.as_str()) {
            continue;
        }
        let model = read_attribute(&controller.join("model"))?.unwrap_or_default();
        if !model.contains(EBS_MODEL) {
            debug!(device = %name, model = model.trim(), ebs_volume_id = %wanted, "serial names the EBS volume but the model is not EBS's");
        }
        matches.push(name);
    }
    let mut matches = matches.into_iter();
    let found = matches.next();
    if let Some(first) = &found {
        let others: Vec<String> = matches.collect();
        if !others.is_empty() {
            warn!(device = %first, others = ?others, ebs_volume_id = %wanted, "several NVMe namespaces carry the EBS volume's serial; taking the first");
        }
    }
    Ok(found.map(|name| Path::new("/dev").join(name)))
}

/// The block device node `path` names, or `None` if there is none (yet).
///
/// An existing `path` is resolved through its symlinks (`/dev/disk/by-id/...`)
/// and must end at a block device. A missing one, given `ebs_volume_id`, is
/// looked for as an NVMe namespace: on Nitro the `/dev/sdf` of an attach call
/// shows up as `/dev/nvme1n1`. A dangling symlink counts as missing.
pub fn resolve_device(sys_root: &Path, path: &Path, ebs_volume_id: Option<&str>) -> Result<Option<PathBuf>, DeviceError> {
    match std::fs::canonicalize(path) {
        Ok(resolved) => return check_block_device(path, resolved).map(Some),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(source) => return Err(DeviceError::Resolve { path: path.into(), source }),
    }
    let Some(id) = ebs_volume_id else {
        return Ok(None);
    };
    let Some(device) = find_nvme_by_ebs_id(sys_root, id)? else {
        return Ok(None);
    };
    // Sysfs shows a new disk a moment before devtmpfs makes its node; until the
    // node is there, the device has not appeared.
    let node = under_root(sys_root, &device);
    match std::fs::metadata(&node) {
        Ok(meta) if meta.file_type().is_block_device() => Ok(Some(device)),
        Ok(meta) => Err(DeviceError::NotBlockDevice { path: node.clone(), resolved: node, kind: kind_of(meta.file_type()) }),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            debug!(device = %device.display(), ebs_volume_id = id, "NVMe namespace in sysfs but no device node yet");
            Ok(None)
        }
        Err(source) => Err(DeviceError::Resolve { path: node, source }),
    }
}

fn check_block_device(path: &Path, resolved: PathBuf) -> Result<PathBuf, DeviceError> {
    let meta = std::fs::metadata(&resolved).map_err(|source| DeviceError::Resolve { path: path.into(), source })?;
    if meta.file_type().is_block_device() {
        Ok(resolved)
    } else {
        Err(DeviceError::NotBlockDevice { path: path.into(), resolved, kind: kind_of(meta.file_type()) })
    }
}

/// Waits, at most `timeout`, until [`resolve_device`] finds the device, and
/// returns its node. Looks again on a schedule that starts at 50 ms and backs
/// off to once a second; a device that is not there at the deadline is
/// [`DeviceError::Timeout`]. An error from a look (the path is not a block
/// device, sysfs unreadable) ends the wait at once: waiting would not fix it.
pub async fn wait_for_device(sys_root: &Path, path: &Path, ebs_volume_id: Option<&str>, timeout: Duration) -> Result<PathBuf, DeviceError> {
    if let Some(device) = resolve_device(sys_root, path, ebs_volume_id)? {
        return Ok(device);
    }
    info!(device = %path.display(), ebs_volume_id, timeout = ?timeout, "waiting for the device to appear");
    let started = Instant::now();
    match poll_until(PollGaps::doubling(POLL_MIN, POLL_MAX), timeout, || resolve_device(sys_root, path, ebs_volume_id)).await? {
        Some(device) => {
            info!(device = %device.display(), waited = ?started.elapsed(), "device appeared");
            Ok(device)
        }
        None => Err(DeviceError::Timeout { device: path.into(), ebs: EbsHint(ebs_volume_id.map(str::to_owned)), waited: timeout }),
    }
}

// === file-backed volumes ===

/// A loop device attached to a volume's backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopAttachment {
    /// `/dev/loopN`.
    pub device: PathBuf,
    /// The backing file, canonical (as sysfs reports it).
    pub backing: PathBuf,
}

/// What [`attach_file`] did: the attachment, and what it made on the way,
/// so a prepare that fails later can undo exactly that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedFile {
    pub attachment: LoopAttachment,
    /// A loop device was attached by this call (not one found attached).
    pub new_device: bool,
    /// The backing file was created by this call.
    pub created_file: bool,
    /// Directories created for the file, outermost first.
    pub created_dirs: Vec<PathBuf>,
}

/// Makes `backing` (beneath one of `allowed_dirs`) a sparse file of at least
/// `size_bytes` and returns its loop device; see [`super::backing`] for which
/// files it creates, grows and accepts. A device already attached to the file
/// is reused, after `losetup -c` if its size lags the file's, so calling this
/// again (an agent restarted after a crash) attaches nothing new.
pub async fn attach_file(allowed_dirs: &[PathBuf], backing: &Path, size_bytes: u64) -> Result<AttachedFile, DeviceError> {
    let (allowed, path) = (allowed_dirs.to_vec(), backing.to_path_buf());
    let file = tokio::task::spawn_blocking(move || open_backing_file(&allowed, &path, size_bytes))
        .await
        .map_err(|join| DeviceError::Backing { path: backing.into(), source: std::io::Error::other(join) })??;
    let (attachment, new_device) = attach_loop(&file.path, file.bytes).await?;
    Ok(AttachedFile { attachment, new_device, created_file: file.created_file, created_dirs: file.created_dirs })
}

/// A loop device for a file the agent did not make and must not change: an
/// RBD image that rbd-fuse shows as a file. The same reuse rules as
/// [`attach_file`]. Returns the attachment and whether it is new.
pub async fn attach_image_file(path: &Path) -> Result<(LoopAttachment, bool), DeviceError> {
    let meta = std::fs::metadata(path).map_err(|source| DeviceError::Backing { path: path.into(), source })?;
    attach_loop(path, meta.len()).await
}

/// The loop device for `canonical` (a file of `file_bytes`): the one attached
/// already, told the file's size if it lags, or a new one.
async fn attach_loop(canonical: &Path, file_bytes: u64) -> Result<(LoopAttachment, bool), DeviceError> {
    let root = Path::new("/");
    if let Some(device) = find_loop_by_backing(root, canonical)? {
        let device_bytes = read_device_bytes(root, &device)?;
        // Compared with the file rather than remembered from this call: a
        // previous agent may have grown the file and died before `losetup -c`.
        if device_bytes != file_bytes {
            info!(device = %device.display(), backing = %canonical.display(), device_bytes, file_bytes, "telling the loop device its file's new size");
            run_losetup(&["-c".as_ref(), device.as_os_str()]).await?;
        }
        info!(device = %device.display(), backing = %canonical.display(), "reusing the loop device already attached to the backing file");
        return Ok((LoopAttachment { device, backing: canonical.into() }, false));
    }
    // --nooverlap makes losetup itself reuse a device attached to the file
    // between our sysfs look and now, instead of attaching a second one.
    // losetup opens the path again; the directory is the agent's alone
    // (checked by the caller), so nobody else can swap the file in between.
    let args = ["--find".as_ref(), "--show".as_ref(), "--nooverlap".as_ref(), canonical.as_os_str()];
    let out = run_losetup(&args).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let device = parse_losetup_show(&stdout).ok_or_else(|| DeviceError::UnexpectedOutput { command: describe(&args), stdout: stdout.trim().to_owned() })?;
    info!(device = %device.display(), backing = %canonical.display(), "attached the backing file");
    Ok((LoopAttachment { device, backing: canonical.into() }, true))
}

/// The loop device attached to `backing` now, if any (none if the file is gone).
///
/// The path is compared as it is, never resolved: a task's backing path holds
/// no links (see [`super::backing`]), and resolving one could name another
/// file's loop device for the caller to detach.
pub fn find_attachment(backing: &Path) -> Result<Option<LoopAttachment>, DeviceError> {
    Ok(find_loop_by_backing(Path::new("/"), backing)?.map(|device| LoopAttachment { device, backing: backing.into() }))
}

/// Detaches the loop device and waits (bounded) until sysfs no longer shows it
/// backed by the file. A device no longer attached to the file is left alone:
/// detaching is done, or the device number now belongs to someone else.
pub async fn detach_file(att: &LoopAttachment) -> Result<(), DeviceError> {
    let root = Path::new("/");
    if !is_attached_to(root, &att.device, &att.backing)? {
        info!(device = %att.device.display(), backing = %att.backing.display(), "loop device already detached");
        return Ok(());
    }
    run_losetup(&["-d".as_ref(), att.device.as_os_str()]).await?;
    let gone =
        poll_until(PollGaps::fixed(DETACH_POLL), DETACH_TIMEOUT, || is_attached_to(root, &att.device, &att.backing).map(|attached| (!attached).then_some(())))
            .await?;
    if gone.is_none() {
        return Err(DeviceError::DetachTimeout { device: att.device.clone(), backing: att.backing.clone(), waited: DETACH_TIMEOUT });
    }
    info!(device = %att.device.display(), backing = %att.backing.display(), "detached the loop device");
    Ok(())
}

/// The loop device sysfs shows backed by `backing` (canonical), lowest number first.
fn find_loop_by_backing(sys_root: &Path, backing: &Path) -> Result<Option<PathBuf>, DeviceError> {
    let mut loops: Vec<(u32, String)> =
        read_dir_names(&sys_root.join("sys/block"))?.into_iter().filter_map(|name| Some((name.strip_prefix("loop")?.parse().ok()?, name))).collect();
    loops.sort();
    let mut found = vec![];
    for (_, name) in loops {
        let device = Path::new("/dev").join(&name);
        if is_attached_to(sys_root, &device, backing)? {
            found.push(device);
        }
    }
    let mut found = found.into_iter();
    let first = found.next();
    if let Some(first) = &first {
        let others: Vec<PathBuf> = found.collect();
        if !others.is_empty() {
            warn!(device = %first.display(), others = ?others, backing = %backing.display(), "several loop devices attached to the backing file; using the first");
        }
    }
    Ok(first)
}

/// Whether sysfs shows `device` (`/dev/loopN`) backed by `backing` right now.
fn is_attached_to(sys_root: &Path, device: &Path, backing: &Path) -> Result<bool, DeviceError> {
    let Some(name) = device.file_name() else {
        return Ok(false);
    };
    let path = sys_root.join("sys/block").join(name).join("loop/backing_file");
    match std::fs::read(&path) {
        Ok(text) => Ok(backing_matches(&text, backing)),
        // No loop/ directory: the device exists but nothing is attached.
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(source) => Err(DeviceError::Sysfs { path, source }),
    }
}

/// Whether a `loop/backing_file` attribute names `backing`. Compared whole, so
/// a file deleted since attaching (the kernel appends " (deleted)") is not the
/// file now at that path.
fn backing_matches(attribute: &[u8], backing: &Path) -> bool {
    attribute.strip_suffix(b"\n").unwrap_or(attribute) == backing.as_os_str().as_bytes()
}

/// The device's size in bytes, from `<sys_root>/sys/block/<name>/size`.
fn read_device_bytes(sys_root: &Path, device: &Path) -> Result<u64, DeviceError> {
    let path = sys_root.join("sys/block").join(device.file_name().unwrap_or_default()).join("size");
    let text = std::fs::read_to_string(&path).map_err(|source| DeviceError::Sysfs { path: path.clone(), source })?;
    parse_sectors(&text)
        .ok_or_else(|| DeviceError::Sysfs { path, source: std::io::Error::new(ErrorKind::InvalidData, format!("{:?} is not a sector count", text.trim())) })
}

/// A sysfs `size` attribute (512-byte sectors) in bytes.
pub(super) fn parse_sectors(text: &str) -> Option<u64> {
    text.trim().parse::<u64>().ok()?.checked_mul(SECTOR_BYTES)
}

/// `<sys_root>/sys/devices/.../block/<name>`: sysfs's directory of the block device numbered `dev`.
pub(super) fn sysfs_block_dir(sys_root: &Path, dev: u64) -> std::io::Result<PathBuf> {
    std::fs::canonicalize(sys_root.join(format!("sys/dev/block/{}:{}", nix::sys::stat::major(dev), nix::sys::stat::minor(dev))))
}

/// `losetup --show` prints the device it used, e.g. `/dev/loop7`.
fn parse_losetup_show(stdout: &str) -> Option<PathBuf> {
    let line = stdout.trim();
    let number = line.strip_prefix("/dev/loop")?;
    (!number.is_empty() && number.bytes().all(|b| b.is_ascii_digit())).then(|| PathBuf::from(line))
}

/// Runs losetup, bounded by [`LOSETUP_TIMEOUT`].
async fn run_losetup(args: &[&std::ffi::OsStr]) -> Result<std::process::Output, DeviceError> {
    Ok(run_tool(Path::new(LOSETUP), args, LOSETUP_TIMEOUT).await?)
}

/// The losetup command line as errors quote it.
fn describe(args: &[&std::ffi::OsStr]) -> String {
    super::tool::describe(Path::new(LOSETUP), args)
}

// === small helpers ===

/// The names in a directory, sorted. Names that are not UTF-8 are no device of ours.
fn read_dir_names(dir: &Path) -> Result<Vec<String>, DeviceError> {
    let err = |source| DeviceError::Sysfs { path: dir.into(), source };
    let mut names = vec![];
    for entry in std::fs::read_dir(dir).map_err(err)? {
        if let Ok(name) = entry.map_err(err)?.file_name().into_string() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// A sysfs attribute as text, or `None` if it does not exist.
fn read_attribute(path: &Path) -> Result<Option<String>, DeviceError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DeviceError::Sysfs { path: path.into(), source }),
    }
}

/// An absolute path such as `/dev/nvme1n1` under `root`.
fn under_root(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn kind_of(file_type: FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_file() {
        "a regular file"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_symlink() {
        "a symlink"
    } else {
        "of an unknown file type"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn ebs_serials_are_read_and_everything_else_is_not() {
        let cases: &[(&str, Option<&str>)] = &[
            ("vol0123456789abcdef0", Some("vol-0123456789abcdef0")),
            ("vol0123456789abcdef0\n", Some("vol-0123456789abcdef0")),
            ("vol0123456789abcdef0      \n", Some("vol-0123456789abcdef0")),
            ("  vol0123456789abcdef0", Some("vol-0123456789abcdef0")),
            ("vol0123456789ABCDEF0", Some("vol-0123456789abcdef0")),
            ("vol1234abcd", Some("vol-1234abcd")),
            ("vol-0123456789abcdef0", None),
            ("vol0123456789abcdef", None),
            ("vol0123456789abcdef01", None),
            ("vol0123456789abcdeg0", None),
            ("vol", None),
            ("", None),
            ("   \n", None),
            ("AWS1234567890ABCDEF0", None),
            ("S3ESNX0K123456", None),
            ("VOL0123456789abcdef0", None),
            ("xvol0123456789abcdef0", None),
            ("vol0123456789 abcdef0", None),
        ];
        for (serial, want) in cases {
            assert_eq!(parse_ebs_serial(serial).as_deref(), *want, "{serial:?}");
        }
    }

    #[test]
    fn only_nvme_namespaces_are_candidates() {
        for (name, want) in [
            ("nvme0n1", true),
            ("nvme12n3", true),
            ("nvme0n1p1", false),
            ("nvme0c0n1", false),
            ("nvme0", false),
            ("nvmen1", false),
            ("nvme0n", false),
            ("nvme-subsys0", false),
            ("sda", false),
            ("loop0", false),
        ] {
            assert_eq!(is_nvme_namespace(name), want, "{name}");
        }
    }

    /// A fake `/sys/block` entry: `<root>/sys/block/<name>/device/{serial,model}`.
    fn fake_nvme(root: &Path, name: &str, serial: Option<&str>, model: &str) {
        let device = root.join("sys/block").join(name).join("device");
        fs::create_dir_all(&device).unwrap();
        if let Some(serial) = serial {
            fs::write(device.join("serial"), format!("{serial:<20}\n")).unwrap();
        }
        fs::write(device.join("model"), format!("{model:<40}\n")).unwrap();
    }

    const EBS: &str = "Amazon Elastic Block Store";

    #[test]
    fn the_namespace_with_the_volumes_serial_is_found() {
        let root = tempfile::tempdir().unwrap();
        fake_nvme(root.path(), "nvme0n1", Some("vol0aaaaaaaaaaaaaaaa"), EBS);
        fake_nvme(root.path(), "nvme1n1", Some("vol0123456789abcdef0"), EBS);
        fake_nvme(root.path(), "nvme2n1", Some("AWS12345678901234567"), "Amazon EC2 NVMe Instance Storage");
        fake_nvme(root.path(), "nvme3n1", None, EBS);
        fs::create_dir_all(root.path().join("sys/block/sda")).unwrap();
        let find = |id| find_nvme_by_ebs_id(root.path(), id).unwrap();
        assert_eq!(find("vol-0123456789abcdef0"), Some(PathBuf::from("/dev/nvme1n1")));
        assert_eq!(find("vol-0aaaaaaaaaaaaaaaa"), Some(PathBuf::from("/dev/nvme0n1")));
        assert_eq!(find("vol-0fffffffffffffff0"), None);
        assert_eq!(find("vol0123456789abcdef0"), None, "an id is compared as an id, not as a serial");
    }

    #[test]
    fn partitions_and_multipath_paths_are_never_returned() {
        let root = tempfile::tempdir().unwrap();
        fake_nvme(root.path(), "nvme1c1n1", Some("vol0123456789abcdef0"), EBS);
        fake_nvme(root.path(), "nvme1n1p1", Some("vol0123456789abcdef0"), EBS);
        assert_eq!(find_nvme_by_ebs_id(root.path(), "vol-0123456789abcdef0").unwrap(), None);
    }

    #[test]
    fn a_matching_serial_on_another_model_is_still_taken() {
        let root = tempfile::tempdir().unwrap();
        fake_nvme(root.path(), "nvme4n1", Some("vol0123456789abcdef0"), "Some Other Disk");
        assert_eq!(find_nvme_by_ebs_id(root.path(), "vol-0123456789abcdef0").unwrap(), Some(PathBuf::from("/dev/nvme4n1")));
    }

    #[test]
    fn several_matches_give_the_first_by_name() {
        let root = tempfile::tempdir().unwrap();
        fake_nvme(root.path(), "nvme2n1", Some("vol0123456789abcdef0"), EBS);
        fake_nvme(root.path(), "nvme1n1", Some("vol0123456789abcdef0"), EBS);
        assert_eq!(find_nvme_by_ebs_id(root.path(), "vol-0123456789abcdef0").unwrap(), Some(PathBuf::from("/dev/nvme1n1")));
    }

    #[test]
    fn an_unreadable_sysfs_is_an_error_naming_it() {
        let root = tempfile::tempdir().unwrap();
        let err = find_nvme_by_ebs_id(root.path(), "vol-0123456789abcdef0").unwrap_err();
        assert!(matches!(err, DeviceError::Sysfs { .. }), "{err:?}");
        assert!(err.to_string().contains(&root.path().join("sys/block").display().to_string()), "{err}");
    }

    #[test]
    fn an_ebs_namespace_without_its_node_yet_has_not_appeared() {
        let root = tempfile::tempdir().unwrap();
        fake_nvme(root.path(), "nvme1n1", Some("vol0123456789abcdef0"), EBS);
        let missing = root.path().join("dev/sdf");
        assert_eq!(resolve_device(root.path(), &missing, Some("vol-0123456789abcdef0")).unwrap(), None);
        assert_eq!(resolve_device(root.path(), &missing, None).unwrap(), None);
    }

    #[test]
    fn an_ebs_node_that_is_not_a_block_device_is_an_error_naming_it() {
        let root = tempfile::tempdir().unwrap();
        fake_nvme(root.path(), "nvme1n1", Some("vol0123456789abcdef0"), EBS);
        fs::create_dir_all(root.path().join("dev")).unwrap();
        let node = root.path().join("dev/nvme1n1");
        fs::write(&node, "").unwrap();
        let err = resolve_device(root.path(), &root.path().join("dev/sdf"), Some("vol-0123456789abcdef0")).unwrap_err();
        assert!(matches!(err, DeviceError::NotBlockDevice { kind: "a regular file", .. }), "{err:?}");
        assert!(err.to_string().contains(&node.display().to_string()), "{err}");
    }

    #[test]
    fn loop_devices_are_found_by_their_backing_file() {
        let root = tempfile::tempdir().unwrap();
        let attach = |name: &str, backing: Option<&str>| {
            let dir = root.path().join("sys/block").join(name);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("size"), "2048\n").unwrap();
            if let Some(backing) = backing {
                fs::create_dir_all(dir.join("loop")).unwrap();
                fs::write(dir.join("loop/backing_file"), format!("{backing}\n")).unwrap();
            }
        };
        attach("loop0", None);
        attach("loop1", Some("/var/lib/cache.img (deleted)"));
        attach("loop10", Some("/var/lib/cache.img"));
        attach("loop9", Some("/var/lib/cache.img"));
        attach("loop2", Some("/var/lib/other.img"));
        attach("nvme0n1", None);
        let find = |p: &str| find_loop_by_backing(root.path(), Path::new(p)).unwrap();
        assert_eq!(find("/var/lib/cache.img"), Some(PathBuf::from("/dev/loop9")), "lowest number first, and never the deleted file's");
        assert_eq!(find("/var/lib/other.img"), Some(PathBuf::from("/dev/loop2")));
        assert_eq!(find("/var/lib/none.img"), None);
        assert!(!is_attached_to(root.path(), Path::new("/dev/loop0"), Path::new("/var/lib/cache.img")).unwrap());
        assert!(!is_attached_to(root.path(), Path::new("/dev/loop77"), Path::new("/var/lib/cache.img")).unwrap());
        assert_eq!(read_device_bytes(root.path(), Path::new("/dev/loop9")).unwrap(), 2048 * 512);
    }

    #[test]
    fn backing_file_attributes_are_compared_whole() {
        let p = Path::new("/var/lib/cache.img");
        for (attribute, want) in [
            (&b"/var/lib/cache.img\n"[..], true),
            (b"/var/lib/cache.img", true),
            (b"/var/lib/cache.img (deleted)\n", false),
            (b"/var/lib/cache.img2\n", false),
            (b"/var/lib/cache.im\n", false),
            (b"", false),
        ] {
            assert_eq!(backing_matches(attribute, p), want, "{:?}", String::from_utf8_lossy(attribute));
        }
        assert!(backing_matches(b"/x (deleted)\n", Path::new("/x (deleted)")), "a file really named so");
    }

    #[test]
    fn sector_counts_and_losetup_output_are_parsed_strictly() {
        assert_eq!(parse_sectors("2097152\n"), Some(1 << 30));
        assert_eq!(parse_sectors("0"), Some(0));
        assert_eq!(parse_sectors(""), None);
        assert_eq!(parse_sectors("-1"), None);
        assert_eq!(parse_sectors(&u64::MAX.to_string()), None, "overflow");
        assert_eq!(parse_losetup_show("/dev/loop7\n"), Some(PathBuf::from("/dev/loop7")));
        assert_eq!(parse_losetup_show("/dev/loop12"), Some(PathBuf::from("/dev/loop12")));
        for bad in ["", "\n", "/dev/loop", "/dev/loopx", "/dev/loop1\n/dev/loop2\n", "/dev/sda", "loop3", "/dev/loop-control"] {
            assert_eq!(parse_losetup_show(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn errors_name_what_they_are_about() {
        let timeout = DeviceError::Timeout { device: "/dev/sdf".into(), ebs: EbsHint(Some("vol-0123456789abcdef0".into())), waited: Duration::from_secs(30) };
        assert_eq!(timeout.to_string(), "no block device at /dev/sdf (nor an NVMe namespace for EBS volume vol-0123456789abcdef0) after waiting 30s");
        let timeout = DeviceError::Timeout { device: "/dev/sdf".into(), ebs: EbsHint(None), waited: Duration::from_millis(1500) };
        assert_eq!(timeout.to_string(), "no block device at /dev/sdf after waiting 1.5s");
        let failed = DeviceError::from(super::super::tool::ToolError::Failed {
            command: describe(&["-d".as_ref(), "/dev/loop3".as_ref()]),
            status: "exit code 1".into(),
            stderr: "No such device".into(),
        });
        assert_eq!(failed.to_string(), "/usr/sbin/losetup -d /dev/loop3 failed (exit code 1): No such device");
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_that_never_appears_times_out_naming_path_and_ebs_id() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("sys/block")).unwrap();
        let path = root.path().join("dev/sdf");
        let err = wait_for_device(root.path(), &path, Some("vol-0123456789abcdef0"), Duration::from_secs(10)).await.unwrap_err();
        assert!(matches!(err, DeviceError::Timeout { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()) && text.contains("vol-0123456789abcdef0") && text.contains("10s"), "{text}");
    }
}
