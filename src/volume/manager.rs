//! The volume manager: the Preparing and Draining steps for each cache mount.
//!
//! Prepare: find (or attach) the device, refuse the system's own disks, probe
//! it, format it only if blank, mount it with mount(2), verify the mount in
//! mountinfo, grow the filesystem online if the device grew, and bind the
//! engine's executor dir onto the ephemeral disk. Every step is idempotent, so
//! an agent restarted mid-prepare (or after a crash with the volume mounted)
//! converges on the same mounted volume without formatting twice.
//!
//! Release: sync, fstrim, unmount everything beneath the mount point deepest
//! first, retry EBUSY with backoff while naming the processes that hold it,
//! kill them only when the config allows it, never lazy-unmount, and detach a
//! file-backed volume's loop device. A mount that another live agent holds is
//! left as it is at once: never waited for, never killed for.

use super::bounded::{blocking_until, BlockingError};
use super::device::{attach_file, detach_file, find_attachment, wait_for_device, LoopAttachment};
use super::file_modes;
use super::format::{mkfs_command, mount_options};
use super::holders::{find_holders, kill_holders};
use super::intent::{device_identity, same_device, DeviceIdentity, FormatIntent, IntentStore};
use super::mountinfo::{find_mount, mounts_beneath, read_mountinfo, MountEntry, PROC_SELF_MOUNTINFO};
use super::nofollow::{open_dir, remove_created};
use super::rbd::RbdAttachment;
use super::signature::{plan_prepare, read_device_signature, PrepareAction};
use super::stats::read_fs_stats;
use super::tool::run_tool;
use super::trim::{fstrim, TrimError};
use crate::backoff::PollGaps;
use crate::task::{CacheMode, FsType, VolumeMount, VolumeSource};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};

/// mkfs of a lazily initialised filesystem takes seconds even on a large disk;
/// ten minutes means the device is hung.
const MKFS_TIMEOUT: Duration = Duration::from_secs(600);
/// blkid reads a superblock.
const BLKID_TIMEOUT: Duration = Duration::from_secs(30);
/// Online grow touches metadata only.
const GROW_TIMEOUT: Duration = Duration::from_secs(300);
/// A busy mount is tried again soon (a straggler exits in milliseconds), then
/// every two seconds until the unmount timeout.
const UNMOUNT_RETRY_MIN: Duration = Duration::from_millis(50);
const UNMOUNT_RETRY_MAX: Duration = Duration::from_secs(2);
/// Paths whose devices the agent never touches, whatever the task says.
const SYSTEM_MOUNTS: &[&str] = &["/", "/boot", "/boot/efi", "/usr", "/var", "/home"];

/// The system paths of a real machine, for [`VolumeSettings::system_paths`].
pub fn default_system_paths() -> Vec<PathBuf> {
    SYSTEM_MOUNTS.iter().map(PathBuf::from).collect()
}
/// Where BuildKit's runc worker with the overlayfs snapshotter keeps build-step scratch.
pub const EXECUTOR_SUBDIR: &str = "runc-overlayfs/executor";

/// What the manager needs from the agent's config.
#[derive(Debug, Clone)]
pub struct VolumeSettings {
    /// `/` in production; a test may point sysfs lookups elsewhere.
    pub sys_root: PathBuf,
    pub device_wait: Duration,
    pub unmount_timeout: Duration,
    /// Kill processes that keep a mount busy once half the unmount timeout has passed.
    pub kill_holders: bool,
    /// If set, the engine's executor dir on the first mount is bound onto this disk.
    pub ephemeral_dir: Option<PathBuf>,
    /// mkfs.ext4 `-i` for a blank device formatted ext4; None: mkfs's default.
    pub ext4_bytes_per_inode: Option<u64>,
    /// Mount points whose devices (and the disks they sit on) are never
    /// touched: [`default_system_paths`] in production.
    pub system_paths: Vec<PathBuf>,
    /// Where the intent to format is recorded while mkfs runs (under the state dir).
    pub intent_dir: PathBuf,
    /// The only directories backing files of file-backed volumes may sit beneath.
    pub allowed_backing_dirs: Vec<PathBuf>,
    pub rbd: super::rbd::RbdSettings,
}

/// Why a mount could not be prepared or released. Each names the device or path.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum VolumeError {
    /// {0}
    Device(#[from] super::device::DeviceError),
    /// {0}
    Probe(#[from] super::signature::ProbeError),
    /// {0}
    Mountinfo(#[from] super::mountinfo::MountinfoError),
    /// refusing {device}: {why}
    Refused { device: PathBuf, why: String },
    /// {device} is already mounted at {elsewhere}, not at {wanted}
    MountedElsewhere { device: PathBuf, elsewhere: PathBuf, wanted: PathBuf },
    /// {mount_path} already holds another filesystem ({mounted})
    MountPointTaken { mount_path: PathBuf, mounted: String },
    /// {0}
    Tool(#[from] super::tool::ToolError),
    /// {0}
    Intent(#[from] super::intent::IntentError),
    /// cannot create {path}: {source}
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// cannot mount {device} on {mount_path} as {fs_type}: {source}
    Mount {
        device: PathBuf,
        mount_path: PathBuf,
        fs_type: String,
        #[source]
        source: nix::Error,
    },
    /// mounted {device} on {mount_path}, but mountinfo does not show it there
    NotVerified { device: PathBuf, mount_path: PathBuf },
    /// cannot stat {path}: {source}
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// {0}
    Walk(#[from] super::nofollow::WalkError),
    /// {0}
    Rbd(#[from] super::rbd::RbdError),
    /// {0}
    Mode(#[from] super::file_modes::ModeError),
    /// {cause}; rolled back: {undone}
    RolledBack { cause: Box<VolumeError>, undone: String },
}

impl VolumeError {
    /// The error behind a rolled-back prepare, or this one.
    pub fn cause(&self) -> &VolumeError {
        match self {
            VolumeError::RolledBack { cause, .. } => cause.cause(),
            other => other,
        }
    }
}

/// A mount the manager prepared and must release at drain.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedMount {
    pub mount_path: PathBuf,
    pub device: PathBuf,
    pub fs_type: String,
    /// The device was blank and was formatted by this prepare.
    pub formatted: bool,
    /// The filesystem was grown to a larger device.
    pub grown: bool,
    pub skip_trim: bool,
    pub loop_attachment: Option<LoopAttachment>,
    /// The mapped RBD image under the device, if the volume is one.
    pub rbd: Option<RbdAttachment>,
    /// The executor bind mount under this mount, if any.
    pub executor_bind: Option<PathBuf>,
    /// How the task uses the volume: what release does with it after the unmount.
    pub cache_mode: CacheMode,
    /// "device", "file" or "rbd".
    pub kind: &'static str,
    /// The filesystem's UUID, read after mounting (None if blkid could not say):
    /// the guard a cache reset must name.
    pub fs_uuid: Option<String>,
    /// The task the mount serves (names a primary's commits); set by the caller.
    pub task_id: String,
}

/// What a release did.
#[derive(Debug, Default)]
pub struct ReleaseReport {
    pub unmounted: bool,
    pub trimmed_bytes: Option<u64>,
    /// Every problem, each naming the mount and, for EBUSY, the holders.
    pub errors: Vec<ReleaseError>,
    /// The filesystem is known to hold errors (a failed flush, errors recorded by the kernel).
    pub dirty: bool,
    /// A primary's commit: the copy made, or why none was (None: not a primary,
    /// or the release did not get that far).
    pub commit: Option<Commit>,
    /// What a clone's or an isolated volume's destruction removed ("pool/image",
    /// the backing file, the discarded device), once done.
    pub destroyed: Option<String>,
}

/// A primary's point-in-time copy at a clean release, for clones to start from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// What was copied: "pool/image" or the backing file.
    pub source: String,
    /// The copy, "pool/image@snapshot" or the reflinked file; Err says why none was made.
    pub copy: Result<String, String>,
}

/// Why a release left a mount or a loop device behind.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ReleaseError {
    /// {0}
    Mountinfo(#[from] super::mountinfo::MountinfoError),
    /// flushing {mount_point} failed, so writes were lost: {source}; fsck the filesystem before trusting it
    Flush {
        mount_point: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// the filesystem at {mount_point} recorded {count} error(s); fsck it before trusting it
    FsErrors { mount_point: PathBuf, count: u64 },
    /// {step} on {mount_point} did not finish by its deadline (the drain's, or the unmount timeout) after {waited:?} and was abandoned; left mounted
    Overran { mount_point: PathBuf, step: &'static str, waited: Duration },
    /// {mount_point} is busy after {waited:?}; held by: {held_by}
    Busy { mount_point: PathBuf, waited: Duration, held_by: String },
    /// {mount_point} is in use by another live machine-agent (pid {agent_pid}); left mounted, never taken from it; held by: {held_by}
    HeldByAgent { mount_point: PathBuf, agent_pid: u32, held_by: String },
    /// cannot unmount {mount_point}: {source}
    Unmount {
        mount_point: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// {0}
    Detach(#[from] super::device::DeviceError),
    /// {0}
    Rbd(#[from] super::rbd::RbdError),
    /// cannot destroy the {mode} volume {what}: {source}
    Destroy {
        mode: &'static str,
        what: PathBuf,
        #[source]
        source: super::file_modes::ModeError,
    },
}

// === prepare ===

/// Something a prepare did that a failure later in the same prepare undoes.
#[derive(Debug)]
enum UndoStep {
    Unmount(PathBuf),
    Detach(LoopAttachment),
    RemoveFile(PathBuf),
    RemoveDirs(Vec<PathBuf>),
    /// With what the detach does after the unmap: a clone or an isolated
    /// volume this prepare readied is removed again (it is disposable).
    DetachRbd(Box<RbdAttachment>, super::rbd::Finish),
}

/// The steps a prepare took, undone last first when it fails: without this a
/// failed prepare left its mount and loop device where no drain looks.
#[derive(Debug, Default)]
struct UndoLog(Vec<UndoStep>);

impl UndoLog {
    fn push(&mut self, step: UndoStep) {
        self.0.push(step);
    }

    /// Runs every undo, last first, and says what each did or why it failed.
    async fn run(self, settings: &VolumeSettings) -> Vec<String> {
        let mut said = vec![];
        for step in self.0.into_iter().rev() {
            match step {
                UndoStep::Unmount(path) => match unmount_all_beneath(settings, &path, Instant::now() + settings.unmount_timeout).await {
                    Ok(()) => said.push(format!("unmounted {}", path.display())),
                    Err(error) => said.push(format!("FAILED to unmount {}: {error}", path.display())),
                },
                UndoStep::Detach(att) => match detach_file(&att).await {
                    Ok(()) => said.push(format!("detached {}", att.device.display())),
                    Err(error) => said.push(format!("FAILED to detach {}: {error}", att.device.display())),
                },
                UndoStep::RemoveFile(path) => match std::fs::remove_file(&path) {
                    Ok(()) => said.push(format!("removed {}", path.display())),
                    Err(error) => said.push(format!("FAILED to remove {}: {error}", path.display())),
                },
                UndoStep::DetachRbd(attachment, finish) => {
                    let detached = super::rbd::detach(&attachment, &finish).await;
                    if detached.errors.is_empty() {
                        said.push(format!("unmapped {} and released its lock", attachment.image.spec()));
                    }
                    said.extend(detached.destroyed.map(|image| format!("removed the disposable image {image}")));
                    said.extend(detached.errors.into_iter().map(|e| format!("FAILED: {e}")));
                }
                UndoStep::RemoveDirs(dirs) => {
                    let failures = remove_created(&dirs);
                    if failures.is_empty() {
                        said.extend(dirs.iter().rev().map(|d| format!("removed {}", d.display())));
                    } else {
                        said.extend(failures.into_iter().map(|f| format!("FAILED: {f}")));
                    }
                }
            }
        }
        said
    }
}

/// Prepares one mount. `first` marks the mount that holds the engine's root.
/// A failure undoes whatever this prepare did (unmounts, detaches, removes
/// what it created) and says so in the error.
pub async fn prepare_mount(settings: &VolumeSettings, m: &VolumeMount, first: bool) -> Result<PreparedMount, VolumeError> {
    let mut undo = UndoLog::default();
    match prepare_steps(settings, m, first, &mut undo).await {
        Ok(prepared) => Ok(prepared),
        Err(error) if undo.0.is_empty() => Err(error),
        Err(error) => {
            let said = undo.run(settings).await;
            warn!(%error, undone = %said.join(", "), "prepare failed; undid what it had done");
            Err(VolumeError::RolledBack { cause: Box::new(error), undone: said.join(", ") })
        }
    }
}

async fn prepare_steps(settings: &VolumeSettings, m: &VolumeMount, first: bool, undo: &mut UndoLog) -> Result<PreparedMount, VolumeError> {
    let (device, loop_attachment, rbd) = match &m.source {
        VolumeSource::Device { path, ebs_volume_id } => {
            (wait_for_device(&settings.sys_root, path, ebs_volume_id.as_deref(), settings.device_wait).await?, None, None)
        }
        VolumeSource::File { path, size_bytes } => {
            // The mode decides which file is attached: the task's, or a clone of its commit.
            let file = file_modes::prepare_file_async(&settings.allowed_backing_dirs, &settings.rbd.owner_id, path, m.cache_mode).await?;
            undo.push(UndoStep::RemoveDirs(file.created_dirs.clone()));
            if file.created {
                undo.push(UndoStep::RemoveFile(file.backing.clone()));
            }
            let attached = attach_file(&settings.allowed_backing_dirs, &file.backing, *size_bytes).await?;
            undo.push(UndoStep::RemoveDirs(attached.created_dirs.clone()));
            if attached.created_file {
                undo.push(UndoStep::RemoveFile(file.backing.clone()));
            }
            if attached.new_device {
                undo.push(UndoStep::Detach(attached.attachment.clone()));
            }
            // A fresh loop device: the clone is not mounted anywhere, so its UUID may change.
            if m.cache_mode == CacheMode::Clone && attached.new_device {
                file_modes::renew_clone_uuid(&attached.attachment.device).await?;
            }
            (attached.attachment.device.clone(), Some(attached.attachment), None)
        }
        VolumeSource::Rbd(image) => {
            let attached = super::rbd::prepare(&settings.rbd, &settings.sys_root, image, m.cache_mode).await?;
            let finish = if m.cache_mode.is_disposable() { super::rbd::Finish::Destroy } else { super::rbd::Finish::Release };
            undo.push(UndoStep::DetachRbd(Box::new(attached.clone()), finish));
            (attached.device.clone(), None, Some(attached))
        }
    };
    let rdev = block_rdev(&device)?;
    refuse_system_device(settings, &device, rdev)?;

    let table = read_mountinfo(Path::new(PROC_SELF_MOUNTINFO))?;
    let (fs_type, formatted) = match already_mounted(&table, &device, rdev, &m.mount_path)? {
        Some(fs_type) => {
            info!(device = %device.display(), mount_path = %m.mount_path.display(), "already mounted; nothing to format or mount");
            (fs_type, false)
        }
        None => {
            let (fs_type, formatted) = format_if_blank(settings, &device, rdev, m).await?;
            mount_device(&device, &m.mount_path, &fs_type, &m.options, undo)?;
            (fs_type, formatted)
        }
    };
    verify_mounted(&device, rdev, &m.mount_path)?;
    // A filesystem made just now already spans the device. An existing one may
    // sit on a device that was resized; a volume that cannot grow is still a
    // working cache: say so and carry on.
    let grown = !formatted
        && grow(&device, &m.mount_path, &fs_type).await.unwrap_or_else(|error| {
            warn!(%error, "online grow failed; the filesystem keeps its size");
            false
        });
    let executor_bind = match (&settings.ephemeral_dir, first) {
        (Some(ephemeral), true) => Some(bind_executor(ephemeral, &m.mount_path)?),
        _ => None,
    };
    let fs_uuid = read_fs_uuid(&device).await;
    Ok(PreparedMount {
        mount_path: m.mount_path.clone(),
        device,
        fs_type,
        formatted,
        grown,
        skip_trim: m.skip_trim,
        loop_attachment,
        rbd,
        executor_bind,
        cache_mode: m.cache_mode,
        kind: m.source.kind(),
        fs_uuid,
        task_id: String::new(),
    })
}

/// The UUID of the filesystem on `device`, by blkid's low-level probe (never its cache).
pub async fn read_fs_uuid(device: &Path) -> Option<String> {
    let args = ["-p".into(), "-s".into(), "UUID".into(), "-o".into(), "value".into(), device.as_os_str().to_owned()];
    match run_tool(Path::new("/usr/sbin/blkid"), &args, BLKID_TIMEOUT).await {
        Ok(out) => Some(String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|u| !u.is_empty()),
        Err(error) => {
            warn!(%error, device = %device.display(), "cannot read the filesystem's UUID");
            None
        }
    }
}

fn block_rdev(device: &Path) -> Result<u64, VolumeError> {
    let meta = std::fs::metadata(device).map_err(|source| VolumeError::Stat { path: device.into(), source })?;
    if !meta.file_type().is_block_device() {
        return Err(VolumeError::Refused { device: device.into(), why: "not a block device".into() });
    }
    Ok(meta.rdev())
}

/// The devices of `/`, `/boot`, `/usr`... and the disks they are partitions of
/// are never the cache, whatever the task says.
fn refuse_system_device(settings: &VolumeSettings, device: &Path, rdev: u64) -> Result<(), VolumeError> {
    let ours = sysfs_path(&settings.sys_root, rdev);
    for system in &settings.system_paths {
        let Ok(meta) = std::fs::metadata(system) else { continue };
        let theirs = sysfs_path(&settings.sys_root, meta.dev());
        if is_same_or_parent_disk(ours.as_deref(), theirs.as_deref()) || meta.dev() == rdev {
            return Err(VolumeError::Refused { device: device.into(), why: format!("it holds the system's {} filesystem", system.display()) });
        }
    }
    Ok(())
}

/// `/sys/devices/.../block/vda/vda1` for a device number, if sysfs knows it.
fn sysfs_path(sys_root: &Path, dev: u64) -> Option<PathBuf> {
    super::device::sysfs_block_dir(sys_root, dev).ok()
}

/// True when our device is the system device or the whole disk it is a partition of.
pub fn is_same_or_parent_disk(ours: Option<&Path>, system: Option<&Path>) -> bool {
    match (ours, system) {
        (Some(ours), Some(system)) => system.starts_with(ours),
        _ => false,
    }
}

/// Some(fs type) when the device is already mounted at the mount path; an error
/// when it is mounted elsewhere or the path holds something else.
fn already_mounted(table: &[MountEntry], device: &Path, rdev: u64, mount_path: &Path) -> Result<Option<String>, VolumeError> {
    let is_ours = |e: &MountEntry| is_device_entry(e, device, rdev);
    if let Some(entry) = find_mount(table, mount_path) {
        if is_ours(entry) {
            return Ok(Some(entry.fs_type.clone()));
        }
        return Err(VolumeError::MountPointTaken { mount_path: mount_path.into(), mounted: entry.source.clone() });
    }
    if let Some(elsewhere) = table.iter().find(|e| is_ours(e) && e.root == Path::new("/")) {
        return Err(VolumeError::MountedElsewhere { device: device.into(), elsewhere: elsewhere.mount_point.clone(), wanted: mount_path.into() });
    }
    Ok(None)
}

/// btrfs reports an anonymous device number in mountinfo, so match the source path too.
fn is_device_entry(e: &MountEntry, device: &Path, rdev: u64) -> bool {
    let same_number = u64::from(e.major) == nix::sys::stat::major(rdev) && u64::from(e.minor) == nix::sys::stat::minor(rdev);
    same_number || std::fs::canonicalize(&e.source).is_ok_and(|s| s == device)
}

/// Formats the device if it is blank, or if it holds this agent's own
/// unfinished format of the same device (see [`super::intent`]); mounts what
/// is there otherwise. Returns the filesystem type and whether it formatted.
async fn format_if_blank(settings: &VolumeSettings, device: &Path, rdev: u64, m: &VolumeMount) -> Result<(String, bool), VolumeError> {
    let intents = IntentStore::new(&settings.intent_dir);
    let identity = device_identity(&settings.sys_root, device, rdev)?;
    if let Some(intent) = intents.read(&m.mount_path)? {
        if same_device(&intent.identity, &identity) {
            let fs = [FsType::Ext4, FsType::Xfs, FsType::Btrfs].into_iter().find(|f| f.as_str() == intent.fs_type).unwrap_or(m.fs_type);
            warn!(
                device = %device.display(), fs = fs.as_str(), started_unix_ms = intent.started_unix_ms, by_pid = intent.agent_pid,
                "an earlier format of this device did not finish; formatting it again"
            );
            return format(settings, &intents, identity, fs, &m.mount_path, Redo::Overwrite).await;
        }
        warn!(recorded = %intent.identity.device.display(), device = %device.display(), "an intent to format another device is stale; forgetting it");
        intents.clear(&m.mount_path)?;
    }
    let found = read_device_signature(device).await?;
    match plan_prepare(found.as_ref(), m.fs_type) {
        PrepareAction::Refuse(why) => Err(VolumeError::Refused { device: device.into(), why }),
        PrepareAction::Mount { fs_type, .. } if m.cache_mode == CacheMode::Isolated => {
            Err(VolumeError::Refused { device: device.into(), why: format!("an isolated volume must start blank, and this one holds a {fs_type} filesystem") })
        }
        PrepareAction::Mount { fs_type, requested_differs } => {
            if requested_differs {
                warn!(device = %device.display(), found = fs_type, requested = m.fs_type.as_str(), "device holds another filesystem type than the task asked for; mounting it as it is, never reformatting");
            }
            Ok((fs_type.to_string(), false))
        }
        PrepareAction::Format(fs) => {
            info!(device = %device.display(), fs = fs.as_str(), "formatting blank device");
            format(settings, &intents, identity, fs, &m.mount_path, Redo::BlankOnly).await
        }
    }
}

/// Whether mkfs may overwrite what it finds: only over the agent's own unfinished format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Redo {
    BlankOnly,
    Overwrite,
}

/// mkfs, between recording the intent to format and clearing it.
async fn format(
    settings: &VolumeSettings,
    intents: &IntentStore,
    identity: DeviceIdentity,
    fs: FsType,
    mount_path: &Path,
    redo: Redo,
) -> Result<(String, bool), VolumeError> {
    let device = identity.device.clone();
    let intent = FormatIntent { identity, fs_type: fs.as_str().into(), started_unix_ms: crate::clock::unix_time_ms(), agent_pid: std::process::id() };
    intents.record(mount_path, &intent)?;
    let mut line = mkfs_command(fs, &device, settings.ext4_bytes_per_inode);
    if redo == Redo::Overwrite {
        line = line.overwriting(fs);
    }
    run_tool(&line.program, &line.args, MKFS_TIMEOUT).await?;
    // Cleared before anything is mounted: a cache that was ever used is never formatted again.
    intents.clear(mount_path)?;
    Ok((fs.as_str().to_string(), true))
}

fn create_dir(path: &Path) -> Result<(), VolumeError> {
    std::fs::create_dir_all(path).map_err(|source| VolumeError::CreateDir { path: path.into(), source })
}

/// Mounts onto the directory `mount_path` names without links, opened (and
/// created) component by component: mount(2) gets that open directory, so a
/// link planted in the path cannot move the mount elsewhere.
fn mount_device(device: &Path, mount_path: &Path, fs_type: &str, options: &[String], undo: &mut UndoLog) -> Result<(), VolumeError> {
    let target = open_dir(mount_path, Some(Mode::from_bits_truncate(0o755)))?;
    undo.push(UndoStep::RemoveDirs(target.created.clone()));
    let (flags, data) = mount_options(options);
    let data = (!data.is_empty()).then_some(data.as_str());
    mount(Some(device), &target.proc_path(), Some(fs_type), flags, data).map_err(|source| VolumeError::Mount {
        device: device.into(),
        mount_path: mount_path.into(),
        fs_type: fs_type.into(),
        source,
    })?;
    undo.push(UndoStep::Unmount(mount_path.into()));
    info!(device = %device.display(), mount_path = %mount_path.display(), fs = fs_type, "mounted");
    Ok(())
}

fn verify_mounted(device: &Path, rdev: u64, mount_path: &Path) -> Result<(), VolumeError> {
    let table = read_mountinfo(Path::new(PROC_SELF_MOUNTINFO))?;
    match find_mount(&table, mount_path) {
        Some(e) if is_device_entry(e, device, rdev) => Ok(()),
        _ => Err(VolumeError::NotVerified { device: device.into(), mount_path: mount_path.into() }),
    }
}

/// Runs the filesystem's online grow; a no-op when the device has not grown.
/// Reports whether the filesystem got bigger.
async fn grow(device: &Path, mount_path: &Path, fs_type: &str) -> Result<bool, VolumeError> {
    let before = read_fs_stats(mount_path).map(|s| s.total_bytes).unwrap_or(0);
    let (program, args): (&str, Vec<std::ffi::OsString>) = match fs_type {
        "ext4" | "ext3" | "ext2" => ("/usr/sbin/resize2fs", vec![device.into()]),
        "xfs" => ("/usr/sbin/xfs_growfs", vec![mount_path.into()]),
        "btrfs" => ("/usr/bin/btrfs", vec!["filesystem".into(), "resize".into(), "max".into(), mount_path.into()]),
        _ => return Ok(false),
    };
    run_tool(Path::new(program), &args, GROW_TIMEOUT).await?;
    let after = read_fs_stats(mount_path).map(|s| s.total_bytes).unwrap_or(0);
    if after > before {
        info!(device = %device.display(), before_bytes = before, after_bytes = after, "filesystem grown to the larger device");
    }
    Ok(after > before)
}

/// Build-step scratch goes to the ephemeral disk, never into the persistent cache.
fn bind_executor(ephemeral: &Path, mount_path: &Path) -> Result<PathBuf, VolumeError> {
    let source = ephemeral.join("buildkit-executor");
    let target = mount_path.join(EXECUTOR_SUBDIR);
    create_dir(&source)?;
    // The cache's contents are written by builds: a link planted there must
    // not move the bind mount out of the volume.
    let opened = open_dir(&target, Some(Mode::from_bits_truncate(0o755)))?;
    let table = read_mountinfo(Path::new(PROC_SELF_MOUNTINFO))?;
    if find_mount(&table, &target).is_none_or(|e| e.mount_point != target) {
        mount(Some(&source), &opened.proc_path(), None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(|e| VolumeError::Mount {
            device: source.clone(),
            mount_path: target.clone(),
            fs_type: "bind".into(),
            source: e,
        })?;
        info!(from = %source.display(), to = %target.display(), "executor dir bound to the ephemeral disk");
    }
    Ok(target)
}

// === reset ===

/// Wipes a prepared mount and prepares it again, empty: the cache reset.
/// The filesystem must still carry `expected_uuid` when looked at on the
/// device after the unmount, or nothing is wiped. The device keeps its
/// attachment (loop device, RBD mapping and lock): only the filesystem goes.
/// Discard first (so a thin device gives its blocks back), then mkfs under a
/// recorded intent, so a crash mid-format is finished by the next prepare.
/// The engine must be stopped.
pub async fn wipe_mount(settings: &VolumeSettings, m: &VolumeMount, p: &PreparedMount, expected_uuid: &str) -> Result<PreparedMount, VolumeError> {
    let refuse = |why: String| VolumeError::Refused { device: p.device.clone(), why };
    if p.fs_uuid.as_deref() != Some(expected_uuid) {
        return Err(refuse(format!("the filesystem mounted at {} is {:?}, not {expected_uuid}", p.mount_path.display(), p.fs_uuid)));
    }
    unmount_all_beneath(settings, &p.mount_path, Instant::now() + settings.unmount_timeout)
        .await
        .map_err(|e| refuse(format!("cannot unmount for the reset: {e}")))?;
    let rdev = block_rdev(&p.device)?;
    let on_device = read_fs_uuid(&p.device).await;
    if on_device.as_deref() != Some(expected_uuid) {
        return Err(refuse(format!("the device now holds filesystem {on_device:?}, not {expected_uuid}; not wiped")));
    }
    let fs = [FsType::Ext4, FsType::Xfs, FsType::Btrfs].into_iter().find(|f| f.as_str() == p.fs_type).unwrap_or(m.fs_type);
    warn!(device = %p.device.display(), mount_path = %p.mount_path.display(), uuid = expected_uuid, fs = fs.as_str(), "cache reset: wiping the filesystem");
    file_modes::wipe_device(&p.device).await?;
    let intents = IntentStore::new(&settings.intent_dir);
    let identity = device_identity(&settings.sys_root, &p.device, rdev)?;
    format(settings, &intents, identity, fs, &p.mount_path, Redo::Overwrite).await?;
    let mut undo = UndoLog::default();
    mount_device(&p.device, &p.mount_path, fs.as_str(), &m.options, &mut undo)?;
    verify_mounted(&p.device, rdev, &p.mount_path)?;
    let executor_bind = match (&settings.ephemeral_dir, &p.executor_bind) {
        (Some(ephemeral), Some(_)) => Some(bind_executor(ephemeral, &p.mount_path)?),
        _ => None,
    };
    let fs_uuid = read_fs_uuid(&p.device).await;
    info!(device = %p.device.display(), mount_path = %p.mount_path.display(), uuid = ?fs_uuid, "cache reset: new filesystem mounted");
    Ok(PreparedMount { fs_type: fs.as_str().into(), formatted: true, grown: false, executor_bind, fs_uuid, ..p.clone() })
}

// === release ===

/// A release with no caller's deadline still ends: an hour is longer than
/// any flush or trim of a healthy disk, and a hung one is reported, not waited for.
const RELEASE_WITHOUT_DEADLINE: Duration = Duration::from_secs(3600);

/// Syncs, trims, unmounts (deepest first) and detaches. Never lazy; reports
/// exactly what could not be done.
pub async fn release_mount(settings: &VolumeSettings, p: &PreparedMount) -> ReleaseReport {
    release_mount_by(settings, p, Instant::now() + RELEASE_WITHOUT_DEADLINE).await
}

/// [`release_mount`] within `deadline` (the drain's): the flush, the trim and
/// each unmount run on the blocking pool, and one still running at the
/// deadline is abandoned, logged and reported. The mount is then left mounted
/// (an unmount would wait for the same writeback) and never called clean.
pub async fn release_mount_by(settings: &VolumeSettings, p: &PreparedMount, deadline: Instant) -> ReleaseReport {
    let mut report = ReleaseReport::default();
    let overran = |step: &'static str, waited: Duration| {
        warn!(mount_path = %p.mount_path.display(), step, waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX), "abandoned at the deadline; left mounted");
        ReleaseError::Overran { mount_point: p.mount_path.clone(), step, waited }
    };
    // syncfs, not sync(2): a write the device failed must be an error here, not
    // lost silently; and only this filesystem's writeback is waited for.
    let mount_path = p.mount_path.clone();
    let mut abandoned = false;
    match blocking_until(deadline, move || super::health::flush(&mount_path)).await {
        Ok(Ok(())) => {}
        Ok(Err(source)) => {
            report.dirty = true;
            report.errors.push(ReleaseError::Flush { mount_point: p.mount_path.clone(), source });
        }
        Err(BlockingError::Overran(waited)) => {
            report.errors.push(overran("the flush (syncfs)", waited));
            abandoned = true;
        }
        Err(BlockingError::Panicked(join)) => {
            report.errors.push(ReleaseError::Flush { mount_point: p.mount_path.clone(), source: std::io::Error::other(join) })
        }
    }
    if let Some(count) = p.fs_type.starts_with("ext").then(|| super::health::read_ext4_errors(&settings.sys_root, &p.device)).flatten().filter(|&n| n > 0) {
        report.dirty = true;
        report.errors.push(ReleaseError::FsErrors { mount_point: p.mount_path.clone(), count });
    }
    if !p.skip_trim && !abandoned {
        let started = Instant::now();
        // fstrim runs on the blocking pool; dropping its wait at the deadline abandons it.
        match tokio::time::timeout_at(deadline, fstrim(&p.mount_path)).await {
            Ok(Ok(bytes)) => {
                info!(mount_path = %p.mount_path.display(), trimmed_bytes = bytes, "fstrim done");
                report.trimmed_bytes = Some(bytes);
            }
            Ok(Err(TrimError::NotSupported { .. })) => info!(mount_path = %p.mount_path.display(), "device does not support discard; no fstrim"),
            Ok(Err(error)) => warn!(%error, "fstrim failed; unmounting anyway"),
            Err(_) => {
                // The trim still holds the mount point open: an unmount would only find it busy.
                report.errors.push(overran("fstrim", started.elapsed()));
                abandoned = true;
            }
        }
    }
    report.unmounted = !abandoned
        && match unmount_all_beneath(settings, &p.mount_path, deadline).await {
            Ok(()) => true,
            Err(error) => {
                report.errors.push(error);
                false
            }
        };
    if let Some(att) = &p.loop_attachment {
        let detached = report.unmounted
            && match detach_file(att).await {
                Ok(()) => true,
                Err(error) => {
                    report.errors.push(error.into());
                    false
                }
            };
        release_file_mode(settings, p, att, detached, &mut report).await;
    }
    if p.kind == "device" {
        release_device_mode(p, &mut report).await;
    }
    if let Some(attachment) = &p.rbd {
        let (finish, skipped) = rbd_finish(p.cache_mode, &p.task_id, settings.rbd.keep_snapshots, &report);
        if let Some(why) = skipped {
            warn!(image = %attachment.image.spec(), why, "the primary is not committed");
            report.commit = Some(Commit { source: attachment.image.spec(), copy: Err(why.to_string()) });
        }
        if report.unmounted {
            let detached = super::rbd::detach(attachment, &finish).await;
            report.errors.extend(detached.errors.into_iter().map(ReleaseError::from));
            if let Some(copy) = detached.commit {
                report.commit = Some(Commit { source: attachment.image.spec(), copy });
            }
            report.destroyed = detached.destroyed;
        }
    }
    report
}

/// What the detach of an RBD mount does after the unmap: a primary is
/// committed only when everything before was clean (so the snapshot holds a
/// consistent filesystem; otherwise the reason it was not); a clone or an
/// isolated volume is destroyed.
fn rbd_finish(mode: CacheMode, task_id: &str, keep: u32, report: &ReleaseReport) -> (super::rbd::Finish, Option<&'static str>) {
    use super::rbd::Finish;
    match mode {
        CacheMode::Clone | CacheMode::Isolated => (Finish::Destroy, None),
        CacheMode::Primary if !report.unmounted => (Finish::Release, Some("commit skipped: the filesystem did not unmount cleanly")),
        CacheMode::Primary if report.dirty => (Finish::Release, Some("commit skipped: the filesystem is dirty (a flush failed or the kernel recorded errors)")),
        CacheMode::Primary if !report.errors.is_empty() => (Finish::Release, Some("commit skipped: the release had errors before the unmap")),
        CacheMode::Primary => (Finish::Commit { task_id: task_id.to_string(), keep }, None),
    }
}

/// Undoes what a prepare the drain had to cut short left behind (its task
/// aborted, mkfs killed): every mount at or below the mount point is unmounted
/// and a loop device attached to the mount's backing file is detached. It
/// never counts as a clean release. An intent to format stays where it is, so
/// the next agent formats the device again.
pub async fn abandon_mount(settings: &VolumeSettings, m: &VolumeMount) -> ReleaseReport {
    let mut report = ReleaseReport::default();
    if let Err(error) = unmount_all_beneath(settings, &m.mount_path, Instant::now() + settings.unmount_timeout).await {
        report.errors.push(error);
    }
    if let VolumeSource::File { path, .. } = &m.source {
        // A clone's loop device is on the clone, not on the primary's file the task names.
        let attached = file_modes::attached_path(path, m.cache_mode, &settings.rbd.owner_id).unwrap_or_else(|| path.clone());
        match find_attachment(&attached) {
            Ok(Some(att)) => {
                if let Err(error) = detach_file(&att).await {
                    report.errors.push(error.into());
                }
            }
            Ok(None) => {}
            Err(error) => report.errors.push(error.into()),
        }
        // Never a commit; a disposable volume this builder made is destroyed,
        // anything else (a file the prepare refused) is left as it is.
        if m.cache_mode.is_disposable() && report.errors.is_empty() {
            match file_modes::destroy_file_async(&settings.allowed_backing_dirs, &settings.rbd.owner_id, &attached).await {
                Ok(()) => report.destroyed = Some(attached.display().to_string()),
                Err(file_modes::ModeError::Refused { path, why }) => {
                    info!(backing = %path.display(), %why, "not destroyed: not this builder's disposable volume")
                }
                Err(source) => report.errors.push(ReleaseError::Destroy { mode: m.cache_mode.as_str(), what: attached, source }),
            }
        }
    }
    if let (VolumeSource::Rbd(image), true) = (&m.source, report.errors.is_empty()) {
        report.errors.extend(super::rbd::abandon(&settings.rbd, &settings.sys_root, image, m.cache_mode).await.into_iter().map(ReleaseError::from));
    }
    report
}

/// After a file-backed volume's loop device is (or could not be) detached: a
/// primary is committed if the release was clean, a clone or an isolated
/// volume is destroyed once detached.
async fn release_file_mode(settings: &VolumeSettings, p: &PreparedMount, att: &LoopAttachment, detached: bool, report: &mut ReleaseReport) {
    match p.cache_mode {
        CacheMode::Primary => {
            let unclean = if !report.unmounted {
                Some("the volume is still mounted".to_string())
            } else if !detached {
                Some("the loop device is still attached".to_string())
            } else if report.dirty {
                Some("the filesystem may hold errors".to_string())
            } else {
                report.errors.first().map(ToString::to_string)
            };
            report.commit = Some(file_modes::commit_file(&settings.allowed_backing_dirs, &att.backing, unclean).await);
        }
        CacheMode::Clone | CacheMode::Isolated if detached => {
            match file_modes::destroy_file_async(&settings.allowed_backing_dirs, &settings.rbd.owner_id, &att.backing).await {
                Ok(()) => report.destroyed = Some(att.backing.display().to_string()),
                Err(source) => report.errors.push(ReleaseError::Destroy { mode: p.cache_mode.as_str(), what: att.backing.clone(), source }),
            }
        }
        CacheMode::Clone | CacheMode::Isolated => warn!(backing = %att.backing.display(), "the disposable volume is still attached; not destroyed"),
    }
}

/// After a device volume's unmount: a primary reports that it has no commit,
/// an isolated device is wiped (never removed).
async fn release_device_mode(p: &PreparedMount, report: &mut ReleaseReport) {
    match p.cache_mode {
        CacheMode::Primary => report.commit = Some(file_modes::device_commit(&p.device)),
        CacheMode::Isolated if report.unmounted => match file_modes::wipe_device(&p.device).await {
            Ok(_) => report.destroyed = Some(p.device.display().to_string()),
            Err(source) => report.errors.push(ReleaseError::Destroy { mode: "isolated", what: p.device.clone(), source }),
        },
        // Still mounted: the unmount's error says so; a clone of a device is refused at validation.
        CacheMode::Isolated | CacheMode::Clone => {}
    }
}

/// Unmounts every mount at or below `path`, deepest first; each EBUSY is
/// retried with backoff until the unmount timeout.
/// `until` (the drain's deadline) cuts the unmount timeout short; an umount2
/// or a scan for holders still running then is abandoned on its thread.
async fn unmount_all_beneath(settings: &VolumeSettings, path: &Path, until: Instant) -> Result<(), ReleaseError> {
    let started = Instant::now();
    let deadline = (started + settings.unmount_timeout).min(until);
    let kill_after = started + settings.unmount_timeout / 2;
    let mut gaps = PollGaps::doubling(UNMOUNT_RETRY_MIN, UNMOUNT_RETRY_MAX);
    let mut killed = false;
    loop {
        let table = read_mountinfo(Path::new(PROC_SELF_MOUNTINFO))?;
        let beneath: Vec<PathBuf> = mounts_beneath(&table, path).into_iter().map(|e| e.mount_point.clone()).collect();
        let Some(next) = beneath.first() else { return Ok(()) };
        // Mount points come from mountinfo, link-free; a link swapped in at the
        // last component since must not turn this into someone else's unmount.
        // umount2 writes back what is still dirty and may wait as long as a flush.
        let target = next.clone();
        let unmounted = match blocking_until(until, move || umount2(target.as_path(), MntFlags::UMOUNT_NOFOLLOW)).await {
            Ok(result) => result,
            Err(BlockingError::Overran(waited)) => return Err(ReleaseError::Overran { mount_point: next.clone(), step: "umount2", waited }),
            Err(BlockingError::Panicked(join)) => return Err(ReleaseError::Unmount { mount_point: next.clone(), source: join_errno(&join) }),
        };
        match unmounted {
            Ok(()) => {
                info!(mount_point = %next.display(), "unmounted");
                gaps.reset();
            }
            Err(nix::Error::EBUSY) => {
                let target = next.clone();
                let holders = match blocking_until(until, move || find_holders(Path::new("/"), &target)).await {
                    Ok(holders) => holders,
                    Err(BlockingError::Overran(waited)) => {
                        return Err(ReleaseError::Overran { mount_point: next.clone(), step: "the scan of /proc for holders", waited })
                    }
                    Err(BlockingError::Panicked(join)) => return Err(ReleaseError::Unmount { mount_point: next.clone(), source: join_errno(&join) }),
                };
                let named: Vec<String> = holders.iter().map(|h| format!("{} ({})", h.pid, h.name)).collect();
                // Another agent runs on this mount (two agents given one task):
                // waiting cannot free it and killing would end that agent's builds.
                if let Some(agent_pid) = holders.iter().find_map(|h| h.agent) {
                    return Err(ReleaseError::HeldByAgent { mount_point: next.clone(), agent_pid, held_by: named.join(", ") });
                }
                warn!(mount_point = %next.display(), holders = %named.join(", "), "mount is busy");
                let now = Instant::now();
                if settings.kill_holders && !killed && now >= kill_after {
                    let pids = kill_holders(&holders, std::process::id());
                    warn!(mount_point = %next.display(), killed = ?pids, "killed the processes holding the mount (volume.kill_holders = true)");
                    killed = true;
                    gaps.reset();
                } else if now >= deadline {
                    let held_by = if named.is_empty() {
                        "no process found (a mount in another namespace, or a kernel user such as a loop device)".to_string()
                    } else {
                        named.join(", ")
                    };
                    return Err(ReleaseError::Busy { mount_point: next.clone(), waited: started.elapsed(), held_by });
                }
                // The last try lands on the deadline itself, and the kill time is not overslept.
                let mut wake = (now + gaps.next_gap()).min(deadline);
                if settings.kill_holders && !killed {
                    wake = wake.min(kill_after.max(now));
                }
                tokio::time::sleep_until(wake).await;
            }
            Err(source) => return Err(ReleaseError::Unmount { mount_point: next.clone(), source }),
        }
    }
}

/// A blocking task that panicked, as an errno for the unmount's error (it has no other source).
fn join_errno(join: &tokio::task::JoinError) -> nix::Error {
    warn!(%join, "a blocking unmount step panicked");
    nix::Error::EIO
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_is_refused_when_it_is_or_contains_a_system_partition() {
        let vda = Path::new("/sys/devices/pci0000:00/0000:00:04.0/virtio1/block/vda");
        let vda1 = vda.join("vda1");
        let nvme = Path::new("/sys/devices/pci0000:00/0000:00:1f.0/nvme/nvme1/nvme1n1");
        assert!(is_same_or_parent_disk(Some(vda), Some(&vda1)));
        assert!(is_same_or_parent_disk(Some(&vda1), Some(&vda1)));
        assert!(!is_same_or_parent_disk(Some(nvme), Some(&vda1)));
        assert!(!is_same_or_parent_disk(Some(&vda1), Some(vda)), "a partition does not contain its disk");
        assert!(!is_same_or_parent_disk(None, Some(vda)));
    }

    #[test]
    fn an_rbd_primary_is_committed_only_after_a_clean_release_and_a_disposable_volume_is_destroyed() {
        use super::super::rbd::Finish;
        let clean = ReleaseReport { unmounted: true, ..Default::default() };
        assert_eq!(rbd_finish(CacheMode::Primary, "t1", 2, &clean), (Finish::Commit { task_id: "t1".into(), keep: 2 }, None));
        let busy = ReleaseReport::default();
        assert_eq!(rbd_finish(CacheMode::Primary, "t1", 2, &busy), (Finish::Release, Some("commit skipped: the filesystem did not unmount cleanly")));
        let dirty = ReleaseReport { unmounted: true, dirty: true, ..Default::default() };
        assert!(matches!(rbd_finish(CacheMode::Primary, "t1", 2, &dirty), (Finish::Release, Some(why)) if why.contains("dirty")));
        let errors = ReleaseReport { unmounted: true, errors: vec![ReleaseError::FsErrors { mount_point: "/m".into(), count: 1 }], ..Default::default() };
        assert!(matches!(rbd_finish(CacheMode::Primary, "t1", 2, &errors), (Finish::Release, Some(_))));
        for mode in [CacheMode::Clone, CacheMode::Isolated] {
            assert_eq!(rbd_finish(mode, "t1", 2, &busy), (Finish::Destroy, None), "never committed; destroyed once unmounted");
        }
    }
}
