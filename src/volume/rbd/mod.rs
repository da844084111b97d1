//! Ceph RBD cache volumes: the image's owner lock ([`lock`]), the credentials
//! the Ceph tools read ([`credentials`]), their command lines ([`cli`]), and
//! the mapper that turns the image into a block device: krbd, rbd-nbd, or
//! rbd-fuse plus a loop device.
//!
//! Attach: check the mapper is there, write the credentials, find (or create)
//! the image, take its lock, map it. Each step is undone when a later one
//! fails, so a failed attach leaves no lock, mapping or key behind. Detach
//! (after the manager unmounted): unmap, commit a clean primary (see
//! [`modes`]) while the lock still keeps other writers out, release the lock,
//! remove a clone's or an isolated volume's image, remove the keys. Both are
//! idempotent: an agent restarted mid-task finds its own lock and mapping
//! (and its own disposable image) and reuses them.

pub mod cli;
pub mod credentials;
pub mod lock;
pub mod modes;

use self::cli::{CephClient, DeviceType};
use self::credentials::{remove_credentials, write_credentials, CephFiles};
use self::lock::{fence_addresses, parse_locks, parse_watchers, plan_lock, ImageLock, LockPlan};
use super::device::{attach_image_file, detach_file, LoopAttachment};
use super::format::CommandLine;
use super::mountinfo::{find_mount, read_mountinfo, PROC_SELF_MOUNTINFO};
use super::tool::{run_tool, ToolError};
use crate::backoff::{poll_until, PollGaps};
use crate::task::{CacheMode, RbdImage};
use nix::mount::{umount2, MntFlags};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{info, warn};

/// Where agents on this machine lock an image they hold, whatever their
/// state dirs: the lock on the image names the machine, not the agent, so two
/// agents on one machine would both take it for their own.
const HOST_LOCK_DIR: &str = "/run/machine-agent/rbd";
/// Every Ceph tool run is bounded: the conf bounds the client's own waits
/// (monitor hunt, mon and OSD ops) below this, so this only catches a hang.
const CEPH_TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// rbd-fuse shows the image's file within a moment of mounting.
const FUSE_FILE_WAIT: Duration = Duration::from_secs(15);
const FUSE_FILE_POLL: Duration = Duration::from_millis(20);
/// How much of the image's name a directory name keeps.
const DIR_NAME_IMAGE_BYTES: usize = 24;

/// Which mapper turns an image into a block device (`volume.rbd_mapper`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MapperChoice {
    /// The first of krbd, nbd, fuse that this machine offers.
    #[default]
    Auto,
    Krbd,
    Nbd,
    Fuse,
}

/// What RBD volumes need from the agent's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSettings {
    pub mapper: MapperChoice,
    /// Who this agent is to other builders: the tag on the image locks it
    /// takes (`volume.owner_id`, by default the host's /etc/machine-id).
    pub owner_id: String,
    /// Per-mount keyrings, confs and fuse mount points (`<state_dir>/rbd`).
    pub dir: PathBuf,
    /// The newest committed snapshots of a primary image kept at each commit
    /// (`volume.keep_snapshots`); older ones are removed unless a clone uses them.
    pub keep_snapshots: u32,
}

/// The snapshots a primary keeps when the config does not say.
pub const DEFAULT_KEEP_SNAPSHOTS: u32 = 2;

/// A way to turn an image into a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapper {
    /// The kernel's rbd driver: `/dev/rbdN`, the production path.
    Krbd,
    /// rbd-nbd through the kernel's nbd driver: `/dev/nbdN`.
    Nbd,
    /// rbd-fuse shows the image as a file, a loop device makes it a block device.
    Fuse,
}

impl Mapper {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Krbd => "krbd",
            Self::Nbd => "nbd",
            Self::Fuse => "fuse",
        }
    }

    /// Why this machine cannot map with it, or None when it can.
    pub fn unavailable(self, sys_root: &Path) -> Option<String> {
        let missing = |path: &str| !sys_root.join(path).exists();
        match self {
            Self::Krbd if missing("sys/bus/rbd") => Some("rbd kernel module not available (no /sys/bus/rbd)".into()),
            Self::Nbd if missing("sys/module/nbd") => Some("nbd kernel module not available (no /sys/module/nbd)".into()),
            Self::Fuse if missing("dev/fuse") => Some("FUSE not available (no /dev/fuse)".into()),
            Self::Fuse if !Path::new(cli::RBD_FUSE).exists() => Some(format!("rbd-fuse is not installed ({})", cli::RBD_FUSE)),
            _ => None,
        }
    }
}

/// The mapper to use: the pinned one if this machine has it, or under `auto`
/// the first that it has. Pure but for the existence checks.
pub fn choose_mapper(choice: MapperChoice, sys_root: &Path) -> Result<Mapper, RbdError> {
    let pinned = match choice {
        MapperChoice::Auto => None,
        MapperChoice::Krbd => Some(Mapper::Krbd),
        MapperChoice::Nbd => Some(Mapper::Nbd),
        MapperChoice::Fuse => Some(Mapper::Fuse),
    };
    if let Some(mapper) = pinned {
        return match mapper.unavailable(sys_root) {
            None => Ok(mapper),
            Some(why) => Err(RbdError::MapperUnavailable { mapper: mapper.as_str(), why }),
        };
    }
    let mut reasons = vec![];
    for mapper in [Mapper::Krbd, Mapper::Nbd, Mapper::Fuse] {
        match mapper.unavailable(sys_root) {
            None => return Ok(mapper),
            Some(why) => reasons.push(format!("{}: {why}", mapper.as_str())),
        }
    }
    Err(RbdError::NoMapper { reasons: reasons.join("; ") })
}

/// Why an image could not be attached or detached. Each names the image.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum RbdError {
    /// no owner id for RBD locks: set volume.owner_id (the default, /etc/machine-id, is missing or invalid)
    NoOwnerId,
    /// the rbd mapper {mapper} cannot be used here: {why}
    MapperUnavailable { mapper: &'static str, why: String },
    /// no rbd mapper can be used here: {reasons}
    NoMapper { reasons: String },
    /// {spec}: rbd-fuse cannot open an image in a namespace; use krbd or nbd
    FuseNamespace { spec: String },
    /// {0}
    Credentials(#[from] credentials::CredentialsError),
    /// {spec}: the image does not exist and the task gives no size_bytes to create it
    NoImage { spec: String },
    /// {spec}: {source}
    Ceph {
        spec: String,
        #[source]
        source: ToolError,
    },
    /// {spec} is locked by {holder}; not mapping it (a task may name that owner in take_over_from)
    HeldBy { spec: String, holder: String },
    /// {spec} is held by another machine-agent on this machine: {source}
    HeldOnHost {
        spec: String,
        #[source]
        source: crate::instance::LockError,
    },
    /// {spec}: {what}
    Unexpected { spec: String, what: String },
    /// {spec}: {source}
    Device {
        spec: String,
        #[source]
        source: super::device::DeviceError,
    },
    /// {spec}: rbd-fuse at {mount_point} did not show the image within {waited:?}
    FuseFileMissing { spec: String, mount_point: PathBuf, waited: Duration },
    /// {spec}: cannot unmount rbd-fuse at {mount_point}: {source}
    FuseUnmount {
        spec: String,
        mount_point: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// the primary {spec} has no committed snapshot to clone; a primary must drain cleanly first
    NoCommit { spec: String },
    /// {what} must be a new image: {spec} already exists ({owner})
    NotNew { spec: String, what: &'static str, owner: String },
    /// {spec} is still open by a client ({watchers}) after {waited:?}; not snapshotting it
    StillOpen { spec: String, watchers: String, waited: Duration },
    /// {spec} is not this owner's disposable image ({owner}); never removing it
    NotDisposable { spec: String, owner: String },
    /// {spec}: cannot remove the credentials in {dir}: {source}
    RemoveCredentials {
        spec: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An attached image: what the manager mounts and what detach undoes.
#[derive(Debug, Clone, PartialEq)]
pub struct RbdAttachment {
    pub image: RbdImage,
    pub mapper: Mapper,
    /// The block device the filesystem is on.
    pub device: PathBuf,
    pub files: CephFiles,
    /// The image's header object, which carries the owner lock.
    pub header: String,
    /// The owner id this agent holds the image's lock under.
    pub owner_id: String,
    /// The image was created by this attach.
    pub created: bool,
    /// The owner whose lock was broken (after fencing its clients) by this attach.
    pub took_over_from: Option<String>,
    /// For the fuse mapper: where rbd-fuse is mounted, and the loop device on its file.
    pub fuse_mount: Option<PathBuf>,
    pub loop_attachment: Option<LoopAttachment>,
    /// This agent's hold on the image among the agents of this machine, released when the last copy drops.
    pub host_lock: HostLock,
}

/// A flock on the image's file under [`HOST_LOCK_DIR`], held for as long as
/// the agent holds the image (and dropped by the kernel if the agent dies).
#[derive(Debug, Clone)]
pub struct HostLock(Option<std::sync::Arc<crate::instance::InstanceLock>>);

impl PartialEq for HostLock {
    /// Two holds are the same hold: there is one per image and process.
    fn eq(&self, other: &Self) -> bool {
        self.0.is_some() == other.0.is_some()
    }
}

/// Takes this machine's lock on the image, so a second agent here (another
/// state dir, the same owner id) refuses it. This process's own hold is
/// shared, not refused: a prepare run again (a retry after a later mount
/// failed) finds the image held by itself. flock belongs to an open file, so
/// the process keeps one per image and hands out clones.
fn lock_on_host(image: &RbdImage) -> Result<HostLock, RbdError> {
    static HELD: std::sync::Mutex<std::collections::BTreeMap<PathBuf, std::sync::Weak<crate::instance::InstanceLock>>> =
        std::sync::Mutex::new(std::collections::BTreeMap::new());
    let dir = Path::new(HOST_LOCK_DIR).join(dir_name(image));
    let mut held = HELD.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(lock) = held.get(&dir).and_then(std::sync::Weak::upgrade) {
        return Ok(HostLock(Some(lock)));
    }
    crate::fsutil::create_private_dir(&dir)
        .map_err(|source| RbdError::HeldOnHost { spec: image.spec(), source: crate::instance::LockError::Open { path: dir.clone(), source } })?;
    let lock = std::sync::Arc::new(crate::instance::InstanceLock::acquire(&dir).map_err(|source| RbdError::HeldOnHost { spec: image.spec(), source })?);
    held.insert(dir, std::sync::Arc::downgrade(&lock));
    Ok(HostLock(Some(lock)))
}

/// The name of an image's credentials, fuse and host-lock directories: one
/// short path component (admin sockets beneath it must fit 108 bytes), the
/// start of the image's name for a reader and a hash of its whole spec for
/// uniqueness (`@` cannot occur in a name). Stable across agent versions: a
/// restarted agent finds its mapping by it.
fn dir_name(image: &RbdImage) -> String {
    // Names are ASCII (validated), so any byte is a char boundary.
    let start = &image.image[..image.image.len().min(DIR_NAME_IMAGE_BYTES)];
    format!("{start}@{:016x}", crate::volume::fnv1a64(image.spec().as_bytes()))
}

/// The systemd scope of an image's rbd-fuse: one per image spec, like its mount point.
fn fuse_scope_unit(image: &RbdImage) -> String {
    format!("machine-agent-rbd-fuse-{:016x}.scope", crate::volume::fnv1a64(image.spec().as_bytes()))
}

/// Where rbd-fuse is mounted for an image: beside the credentials, never
/// inside a directory that is removed recursively.
fn fuse_mount_point(settings: &RbdSettings, image: &RbdImage) -> PathBuf {
    settings.dir.join("fuse").join(dir_name(image))
}

/// Readies the image a mount of `mode` uses ([`modes`]: this owner's clone
/// of the task's primary, or the isolated volume's new image) and attaches
/// it. A clone never attaches, locks or writes the primary.
pub async fn prepare(settings: &RbdSettings, sys_root: &Path, image: &RbdImage, mode: CacheMode) -> Result<RbdAttachment, RbdError> {
    if mode == CacheMode::Primary {
        return attach(settings, sys_root, image).await;
    }
    let target = modes::attached_image(settings, image, mode)?;
    // Checked before anything is made: a clone this machine cannot map is not made.
    let mapper = choose_mapper(settings.mapper, sys_root)?;
    if mapper == Mapper::Fuse && target.namespace.is_some() {
        return Err(RbdError::FuseNamespace { spec: target.spec() });
    }
    let files = write_credentials(&settings.dir, &dir_name(&target), &target)?;
    let client = CephClient { conf: files.conf.clone(), client_id: image.client_id.clone() };
    if let Err(error) = modes::ready_image(settings, &client, image, mode).await {
        if let Err(e) = remove_credentials(&files) {
            warn!(error = %e, dir = %files.dir.display(), "cannot remove the credentials of a failed prepare");
        }
        return Err(error);
    }
    match attach(settings, sys_root, &target).await {
        Ok(attached) => Ok(attached),
        Err(error) => {
            // The image is this owner's and disposable; left, only a later
            // task of this owner would ever reuse or remove it.
            let removed = match write_credentials(&settings.dir, &dir_name(&target), &target) {
                Ok(files) => {
                    let client = CephClient { conf: files.conf.clone(), client_id: image.client_id.clone() };
                    let removed = modes::destroy(&client, &target, &settings.owner_id).await;
                    let _ = remove_credentials(&files);
                    removed
                }
                Err(e) => Err(e.into()),
            };
            if let Err(e) = removed {
                warn!(error = %e, image = %target.spec(), "cannot remove the disposable image of a failed attach");
            }
            Err(error)
        }
    }
}

/// Makes the image a block device this agent owns; see the module docs.
pub async fn attach(settings: &RbdSettings, sys_root: &Path, image: &RbdImage) -> Result<RbdAttachment, RbdError> {
    if settings.owner_id.is_empty() {
        return Err(RbdError::NoOwnerId);
    }
    let mapper = choose_mapper(settings.mapper, sys_root)?;
    if mapper == Mapper::Fuse && image.namespace.is_some() {
        return Err(RbdError::FuseNamespace { spec: image.spec() });
    }
    info!(image = %image.spec(), mapper = mapper.as_str(), owner = %settings.owner_id, "attaching an RBD image");
    let files = write_credentials(&settings.dir, &dir_name(image), image)?;
    let client = CephClient { conf: files.conf.clone(), client_id: image.client_id.clone() };
    match attach_steps(settings, &client, image, mapper, files.clone()).await {
        Ok(attached) => Ok(attached),
        Err(error) => {
            if let Err(e) = remove_credentials(&files) {
                warn!(error = %e, dir = %files.dir.display(), "cannot remove the credentials of a failed attach");
            }
            Err(error)
        }
    }
}

async fn attach_steps(settings: &RbdSettings, client: &CephClient, image: &RbdImage, mapper: Mapper, files: CephFiles) -> Result<RbdAttachment, RbdError> {
    let (header, created) = ensure_image(client, image).await?;
    let owner_id = settings.owner_id.clone();
    let (took_over_from, newly_locked) = acquire_lock(client, image, &header, &owner_id).await?;
    let host_lock = match lock_on_host(image) {
        Ok(lock) => lock,
        Err(error) => {
            if newly_locked {
                release_lock(client, image, &header, &owner_id).await.unwrap_or_else(|e| warn!(error = %e, "cannot release the lock of a failed attach"));
            }
            return Err(error);
        }
    };
    let fuse_mount = (mapper == Mapper::Fuse).then(|| fuse_mount_point(settings, image));
    let mapped = match &fuse_mount {
        Some(mount_point) => map_fuse(client, image, mount_point).await.map(|att| (att.device.clone(), Some(att))),
        None => map_kernel(client, image, kernel_device_type(mapper)).await.map(|device| (device, None)),
    };
    let (device, loop_attachment) = match mapped {
        Ok(mapped) => mapped,
        Err(error) => {
            if newly_locked {
                release_lock(client, image, &header, &owner_id).await.unwrap_or_else(|e| warn!(error = %e, "cannot release the lock of a failed attach"));
            }
            return Err(error);
        }
    };
    info!(image = %image.spec(), mapper = mapper.as_str(), device = %device.display(), created, took_over_from = ?took_over_from, "RBD image mapped");
    Ok(RbdAttachment { image: image.clone(), mapper, device, files, header, owner_id, created, took_over_from, fuse_mount, loop_attachment, host_lock })
}

/// Runs a Ceph tool for `image`; errors name the image.
async fn ceph(image: &RbdImage, line: CommandLine) -> Result<String, RbdError> {
    let out = run_tool(&line.program, &line.args, CEPH_TOOL_TIMEOUT).await.map_err(|source| RbdError::Ceph { spec: image.spec(), source })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The stderr of a failed tool run, if that is what `error` is.
fn tool_stderr(error: &RbdError) -> Option<&str> {
    match error {
        RbdError::Ceph { source: ToolError::Failed { stderr, .. }, .. } => Some(stderr),
        _ => None,
    }
}

/// True when rbd said the image (not its pool) does not exist.
pub fn is_missing_image(stderr: &str) -> bool {
    stderr.contains("error opening image") && stderr.contains("No such file or directory")
}

/// Finds the image, or creates it when the task gives a size. Returns its
/// header object and whether it created it.
async fn ensure_image(client: &CephClient, image: &RbdImage) -> Result<(String, bool), RbdError> {
    let (info, created) = match ceph(image, client.info(image)).await {
        Ok(info) => (info, false),
        Err(error) if tool_stderr(&error).is_some_and(is_missing_image) => {
            let Some(size_bytes) = image.create_size_bytes else { return Err(RbdError::NoImage { spec: image.spec() }) };
            ceph(image, client.create(image, size_bytes)).await?;
            info!(image = %image.spec(), size_bytes, "created the RBD image");
            (ceph(image, client.info(image)).await?, true)
        }
        Err(error) => return Err(error),
    };
    let header = header_object(&info).map_err(|what| RbdError::Unexpected { spec: image.spec(), what })?;
    Ok((header, created))
}

/// The header object of an image from `rbd info --format json`: `rbd_header.<id>`.
/// Only format 2 images have one (format 1 is long deprecated).
pub fn header_object(info_json: &str) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Info {
        #[serde(default)]
        id: String,
    }
    let info: Info = serde_json::from_str(info_json.trim()).map_err(|e| format!("unexpected `rbd info` output: {e}"))?;
    if info.id.is_empty() || !info.id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!("the image has no usable id ({:?}): only format 2 images can be locked", info.id));
    }
    Ok(format!("rbd_header.{}", info.id))
}

async fn list_locks(client: &CephClient, image: &RbdImage, header: &str) -> Result<Vec<ImageLock>, RbdError> {
    parse_locks(&ceph(image, client.lock_info(image, header)).await?).map_err(|what| RbdError::Unexpected { spec: image.spec(), what })
}

/// Takes the image's lock for `owner_id` (see [`lock`]). Returns the owner it
/// took over from, if any, and whether this call took the lock.
async fn acquire_lock(client: &CephClient, image: &RbdImage, header: &str, owner_id: &str) -> Result<(Option<String>, bool), RbdError> {
    let locks = list_locks(client, image, header).await?;
    match plan_lock(&locks, owner_id, image.take_over_from.as_deref()) {
        LockPlan::AlreadyOurs(_) => {
            info!(image = %image.spec(), "this owner holds the image's lock already");
            Ok((None, false))
        }
        LockPlan::Refuse(holder) => Err(RbdError::HeldBy { spec: image.spec(), holder: holder.describe() }),
        LockPlan::Take => match ceph(image, client.lock_get(image, header, owner_id)).await {
            Ok(_) => Ok((None, true)),
            // Another builder took it between our look and our get: name it.
            Err(error) if tool_stderr(&error).is_some_and(|e| e.contains("(16)")) => {
                let holder =
                    list_locks(client, image, header).await?.first().map_or_else(|| "another client (the lock was released since)".into(), ImageLock::describe);
                Err(RbdError::HeldBy { spec: image.spec(), holder })
            }
            Err(error) => Err(error),
        },
        LockPlan::TakeOver(stale) => {
            let watchers = parse_watchers(&ceph(image, client.status(image)).await?).map_err(|what| RbdError::Unexpected { spec: image.spec(), what })?;
            let fenced = fence_addresses(&stale, &watchers, &[]);
            for address in &fenced {
                ceph(image, client.blocklist(address)).await?;
            }
            warn!(image = %image.spec(), stale = %stale.describe(), fenced = ?fenced, "blocklisted the previous owner's clients; breaking its lock");
            ceph(image, client.lock_break(image, header, &stale.locker, &stale.owner)).await?;
            ceph(image, client.lock_get(image, header, owner_id)).await?;
            Ok((Some(stale.owner), true))
        }
    }
}

/// Removes this owner's lock from the image, if it is there.
async fn release_lock(client: &CephClient, image: &RbdImage, header: &str, owner_id: &str) -> Result<(), RbdError> {
    for held in list_locks(client, image, header).await?.into_iter().filter(|l| l.owner == owner_id) {
        ceph(image, client.lock_break(image, header, &held.locker, owner_id)).await?;
        info!(image = %image.spec(), "released the image's lock");
    }
    Ok(())
}

/// One entry of `rbd device list --format json`.
#[derive(Debug, Deserialize)]
struct MappedDevice {
    pool: String,
    #[serde(default)]
    namespace: String,
    name: String,
    #[serde(default)]
    snap: String,
    device: PathBuf,
}

/// The device the kernel has mapped for this image already (no snapshot), if any.
pub fn find_mapped(json: &str, image: &RbdImage) -> Result<Option<PathBuf>, String> {
    let devices: Vec<MappedDevice> = serde_json::from_str(json.trim()).map_err(|e| format!("unexpected `rbd device list` output: {e}"))?;
    Ok(devices
        .into_iter()
        .find(|d| {
            d.pool == image.pool && d.namespace == image.namespace.as_deref().unwrap_or("") && d.name == image.image && matches!(d.snap.as_str(), "" | "-")
        })
        .map(|d| d.device))
}

/// krbd or nbd: the mapping a previous agent left, or a new exclusive one.
async fn map_kernel(client: &CephClient, image: &RbdImage, kind: DeviceType) -> Result<PathBuf, RbdError> {
    let listed = ceph(image, client.device_list(kind)).await?;
    if let Some(device) = find_mapped(&listed, image).map_err(|what| RbdError::Unexpected { spec: image.spec(), what })? {
        info!(image = %image.spec(), device = %device.display(), "reusing the image's existing mapping");
        return Ok(device);
    }
    let out = ceph(image, client.device_map(kind, image)).await?;
    let device = PathBuf::from(out.trim());
    if !device.starts_with("/dev") {
        return Err(RbdError::Unexpected { spec: image.spec(), what: format!("`rbd device map` printed {:?}, not a device", out.trim()) });
    }
    Ok(device)
}

/// rbd-fuse at `mount_point` (reused if mounted already) and a loop device on the image's file.
async fn map_fuse(client: &CephClient, image: &RbdImage, mount_point: &Path) -> Result<LoopAttachment, RbdError> {
    let device_error = |source| RbdError::Device { spec: image.spec(), source };
    if !is_fuse_mounted(mount_point) {
        crate::fsutil::create_private_dir(mount_point)
            .map_err(|source| device_error(super::device::DeviceError::Backing { path: mount_point.into(), source }))?;
        // rbd-fuse mounts, then goes to the background: it outlives this run
        // and the agent. Under systemd, in a scope of its own: left in the
        // agent's unit, a handoff's restart would kill it (KillMode=mixed).
        let line = match (crate::systemd::booted(), crate::systemd::systemd_run()) {
            (true, Some(run)) => cli::in_scope(client.fuse(image, mount_point), run, &fuse_scope_unit(image)),
            _ => client.fuse(image, mount_point),
        };
        ceph(image, line).await?;
    } else {
        info!(image = %image.spec(), mount_point = %mount_point.display(), "reusing the rbd-fuse mount already there");
    }
    let file = mount_point.join(&image.image);
    let shown = poll_until(PollGaps::fixed(FUSE_FILE_POLL), FUSE_FILE_WAIT, || Ok::<_, std::convert::Infallible>(file.exists().then_some(()))).await;
    if !matches!(shown, Ok(Some(()))) {
        unmount_fuse(image, mount_point).unwrap_or_else(|e| warn!(error = %e, "cannot unmount rbd-fuse after a failed map"));
        return Err(RbdError::FuseFileMissing { spec: image.spec(), mount_point: mount_point.into(), waited: FUSE_FILE_WAIT });
    }
    match attach_image_file(&file).await {
        Ok((attachment, _new)) => Ok(attachment),
        Err(source) => {
            unmount_fuse(image, mount_point).unwrap_or_else(|e| warn!(error = %e, "cannot unmount rbd-fuse after a failed map"));
            Err(device_error(source))
        }
    }
}

fn is_fuse_mounted(mount_point: &Path) -> bool {
    read_mountinfo(Path::new(PROC_SELF_MOUNTINFO))
        .ok()
        .is_some_and(|table| find_mount(&table, mount_point).is_some_and(|e| e.mount_point == mount_point && e.fs_type.starts_with("fuse")))
}

fn unmount_fuse(image: &RbdImage, mount_point: &Path) -> Result<(), RbdError> {
    if !is_fuse_mounted(mount_point) {
        return Ok(());
    }
    // rbd-fuse exits by itself once its mount is gone.
    umount2(mount_point, MntFlags::UMOUNT_NOFOLLOW).map_err(|source| RbdError::FuseUnmount { spec: image.spec(), mount_point: mount_point.into(), source })?;
    let _ = std::fs::remove_dir(mount_point);
    info!(image = %image.spec(), mount_point = %mount_point.display(), "rbd-fuse unmounted");
    Ok(())
}

/// What a detach does besides unmapping and unlocking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// Nothing: the image stays as it is.
    Release,
    /// A primary's clean release: snapshot, protect and prune (see
    /// [`modes`]) after the unmap, while the lock still keeps other writers out.
    Commit { task_id: String, keep: u32 },
    /// A clone's or an isolated volume's: remove the image after the unlock,
    /// if it carries this owner's disposable mark.
    Destroy,
}

/// What a detach did.
#[derive(Debug, Default)]
pub struct Detached {
    pub errors: Vec<RbdError>,
    /// For [`Finish::Commit`]: `pool/image@snapshot`, or why no commit was made.
    pub commit: Option<Result<String, String>>,
    /// For [`Finish::Destroy`]: the image removed (`pool/image`).
    pub destroyed: Option<String>,
}

/// Unmaps the image, commits or destroys it as `finish` says, releases this
/// owner's lock and removes the credentials. Runs after the filesystem is
/// unmounted; every step runs even when one before it failed (except the
/// ones that need the image unmapped), and every failure is returned. A
/// failed commit is not an error of the release: it is reported in `commit`.
pub async fn detach(a: &RbdAttachment, finish: &Finish) -> Detached {
    let image = &a.image;
    let client = CephClient { conf: a.files.conf.clone(), client_id: image.client_id.clone() };
    let mut errors = vec![];
    match a.mapper {
        // No device: an abandoned attach that never mapped.
        Mapper::Krbd | Mapper::Nbd if a.device.as_os_str().is_empty() => {}
        Mapper::Krbd | Mapper::Nbd => {
            if let Err(e) = ceph(image, client.device_unmap(kernel_device_type(a.mapper), &a.device)).await {
                errors.push(e);
            }
        }
        Mapper::Fuse => {
            let detached = match &a.loop_attachment {
                Some(att) => detach_file(att).await.map_err(|source| RbdError::Device { spec: image.spec(), source }),
                None => Ok(()),
            };
            match detached {
                Ok(()) => {
                    if let Err(e) = a.fuse_mount.as_deref().map_or(Ok(()), |m| unmount_fuse(image, m)) {
                        errors.push(e);
                    }
                }
                Err(e) => errors.push(e),
            }
        }
    }
    // Unmapped (krbd's unmap, or the loop device gone and rbd-fuse unmounted):
    // every write is in RADOS, so a snapshot now holds all of them, and the
    // lock, still ours, keeps any other writer out until it is taken.
    let commit = match finish {
        Finish::Commit { task_id, keep } if errors.is_empty() => Some(modes::commit(&client, image, task_id, *keep).await.map_err(|error| {
            warn!(%error, image = %image.spec(), "the primary's commit failed; the release goes on");
            format!("commit failed: {error}")
        })),
        Finish::Commit { .. } => Some(Err("commit skipped: the image could not be unmapped".to_string())),
        Finish::Release | Finish::Destroy => None,
    };
    // The lock goes only once nothing of ours can write to the image any more.
    if errors.is_empty() {
        if let Err(e) = release_lock(&client, image, &a.header, &a.owner_id).await {
            errors.push(e);
        }
    }
    let mut destroyed = None;
    if *finish == Finish::Destroy && errors.is_empty() {
        match modes::destroy(&client, image, &a.owner_id).await {
            Ok(_) => destroyed = Some(image.spec()),
            Err(e) => errors.push(e),
        }
    }
    if let Err(source) = remove_credentials(&a.files) {
        errors.push(RbdError::RemoveCredentials { spec: image.spec(), dir: a.files.dir.clone(), source });
    }
    if errors.is_empty() {
        info!(image = %image.spec(), mapper = a.mapper.as_str(), "RBD image unmapped and its lock released");
    }
    Detached { errors, commit, destroyed }
}

/// Undoes what an attach cut short (its task aborted at drain) may have left:
/// a loop device and rbd-fuse mount, or a kernel mapping, of this image, and
/// this owner's lock. For a clone, the image is this owner's clone, never the
/// primary. Best effort; every failure is returned.
pub async fn abandon(settings: &RbdSettings, sys_root: &Path, image: &RbdImage, mode: CacheMode) -> Vec<RbdError> {
    let Ok(mapper) = choose_mapper(settings.mapper, sys_root) else { return vec![] };
    let image = &match modes::attached_image(settings, image, mode) {
        Ok(target) => target,
        Err(error) => return vec![error],
    };
    let files = match write_credentials(&settings.dir, &dir_name(image), image) {
        Ok(files) => files,
        Err(error) => return vec![error.into()],
    };
    let client = CephClient { conf: files.conf.clone(), client_id: image.client_id.clone() };
    let header =
        match ceph(image, client.info(image)).await.and_then(|info| header_object(&info).map_err(|what| RbdError::Unexpected { spec: image.spec(), what })) {
            Ok(header) => header,
            Err(error) => {
                let _ = remove_credentials(&files);
                return vec![error];
            }
        };
    let (mut device, mut fuse_mount, mut loop_attachment) = (PathBuf::new(), None, None);
    match mapper {
        Mapper::Fuse => {
            let mount_point = fuse_mount_point(settings, image);
            loop_attachment = super::device::find_attachment(&mount_point.join(&image.image)).ok().flatten();
            fuse_mount = Some(mount_point);
        }
        Mapper::Krbd | Mapper::Nbd => {
            let listed = ceph(image, client.device_list(kernel_device_type(mapper))).await.ok();
            if let Some(Ok(Some(mapped))) = listed.as_deref().map(|json| find_mapped(json, image)) {
                device = mapped;
            }
        }
    }
    let attachment = RbdAttachment {
        image: image.clone(),
        mapper,
        device,
        files,
        header,
        owner_id: settings.owner_id.clone(),
        created: false,
        took_over_from: None,
        fuse_mount,
        loop_attachment,
        host_lock: HostLock(None),
    };
    detach(&attachment, &Finish::Release).await.errors
}

fn kernel_device_type(mapper: Mapper) -> DeviceType {
    if mapper == Mapper::Nbd {
        DeviceType::Nbd
    } else {
        DeviceType::Krbd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> RbdImage {
        RbdImage {
            pool: "cache".into(),
            namespace: None,
            image: "proj".into(),
            client_id: "builder".into(),
            key: crate::secret::Secret::new("AQ"),
            monitors: vec!["127.0.0.1:6789".into()],
            conf: vec![],
            create_size_bytes: None,
            take_over_from: None,
        }
    }

    #[test]
    fn a_pinned_mapper_the_machine_lacks_is_a_clear_error_and_auto_falls_through() {
        let root = tempfile::tempdir().unwrap();
        let err = choose_mapper(MapperChoice::Krbd, root.path()).unwrap_err();
        assert_eq!(err.to_string(), "the rbd mapper krbd cannot be used here: rbd kernel module not available (no /sys/bus/rbd)");
        let err = choose_mapper(MapperChoice::Nbd, root.path()).unwrap_err();
        assert!(err.to_string().contains("nbd kernel module not available"), "{err}");
        let err = choose_mapper(MapperChoice::Auto, root.path()).unwrap_err();
        assert!(err.to_string().starts_with("no rbd mapper can be used here: krbd: rbd kernel module"), "{err}");
        std::fs::create_dir_all(root.path().join("sys/bus/rbd")).unwrap();
        assert_eq!(choose_mapper(MapperChoice::Auto, root.path()).unwrap(), Mapper::Krbd);
    }

    #[test]
    fn an_existing_mapping_is_found_by_pool_namespace_and_name_never_a_snapshot() {
        let json = r#"[{"id":"0","pool":"cache","namespace":"","name":"proj","snap":"snap1","device":"/dev/rbd0"},
                       {"id":"1","pool":"cache","namespace":"","name":"proj","snap":"-","device":"/dev/rbd1"},
                       {"id":"2","pool":"other","namespace":"","name":"proj","snap":"-","device":"/dev/rbd2"}]"#;
        assert_eq!(find_mapped(json, &image()).unwrap(), Some(PathBuf::from("/dev/rbd1")));
        assert_eq!(find_mapped("[]", &image()).unwrap(), None);
        assert!(find_mapped("rbd: nope", &image()).is_err());
    }

    #[test]
    fn this_process_shares_its_own_hold_on_an_image() {
        let mut img = image();
        img.image = format!("host-lock-test-{}", std::process::id());
        let first = lock_on_host(&img).unwrap();
        let again = lock_on_host(&img).expect("a prepare run again finds the image held by itself");
        assert_eq!(first, again);
        drop((first, again));
        let _ = std::fs::remove_dir_all(Path::new(HOST_LOCK_DIR).join(dir_name(&img)));
    }

    #[test]
    fn the_header_object_is_named_by_the_images_id() {
        let info = r#"{"name":"img","id":"104bcd9c27d8","size":268435456,"format":2,"features":["layering","exclusive-lock"]}"#;
        assert_eq!(header_object(info).unwrap(), "rbd_header.104bcd9c27d8");
        assert!(header_object(r#"{"name":"old","format":1}"#).unwrap_err().contains("format 2"));
        assert!(header_object(r#"{"id":"../x"}"#).is_err(), "an id is never a path");
    }

    #[test]
    fn only_a_missing_image_counts_as_missing() {
        assert!(is_missing_image("rbd: error opening image proj: (2) No such file or directory"));
        assert!(!is_missing_image("rbd: error opening pool 'cache': (2) No such file or directory"));
        assert!(!is_missing_image("rbd: couldn't connect to the cluster!"));
    }

    #[test]
    fn directory_names_are_one_component_stable_and_never_shared() {
        let mut a = image();
        assert_eq!(dir_name(&a), "proj@166b982f2ecd82dd");
        a.namespace = Some("team".into());
        assert_ne!(dir_name(&a), dir_name(&image()));
        let (mut b, mut c) = (image(), image());
        (b.pool, b.image, c.pool, c.image) = ("a.b".into(), "c".into(), "a".into(), "b.c".into());
        assert_ne!(dir_name(&b), dir_name(&c), "names with dots in them never collide");
        assert!(!dir_name(&a).contains('/'));
    }
}
