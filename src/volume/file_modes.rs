//! What each cache mode does with a file-backed or a device volume (the rbd
//! half lives in [`super::rbd`]); see the proto's `CacheMode` table.
//!
//! - PRIMARY file: the task's file, as [`super::backing`] allows it; at a
//!   clean release, after the loop device is detached, it is reflinked to
//!   `<file>.committed` ([`commit_primary`]), atomically (a temporary name,
//!   fsync, rename, fsync of the directory).
//! - CLONE file: the task names the primary's file; the volume is
//!   `<file>.clone.<owner>`, reflinked from `<file>.committed`, marked
//!   disposable by this builder, and removed at release.
//! - ISOLATED file: a new file the agent creates, marked disposable, removed
//!   at release.
//! - ISOLATED device: blank at prepare (the manager probes it), discarded at
//!   release ([`wipe_device`]); a device is never removed, only wiped.
//! - PRIMARY device: no commit (a block device has no snapshots).
//!
//! A file is disposable only if it carries [`DISPOSABLE_XATTR`] naming this
//! builder (`volume.owner_id`): the agent removes nothing else. `trusted.*`
//! attributes need CAP_SYS_ADMIN, so a task's user cannot forge one.
//!
//! Never: opens the primary's file or its committed copy for writing when
//! cloning, removes a file it did not mark, or falls back to a byte copy.

use super::backing::{check_private_dir, refusal, BackingError, MARKER_XATTR};
use super::manager::Commit;
use super::nofollow::{open_dir, WalkError, NO_LINKS};
use super::reflink::{reflink, ReflinkError};
use super::tool::{run_tool, ToolError};
use crate::task::CacheMode;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use std::ffi::{CStr, OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{info, warn};

/// The mark of a volume file that is destroyed at release; its value is the owner id of the builder that made it.
pub const DISPOSABLE_XATTR: &CStr = c"trusted.machine-agent.disposable";
const MARKER_VALUE: &[u8] = b"1";
/// Owner ids are at most 64 bytes (see `task::rbd::MAX_OWNER_ID_BYTES`); room to spare.
const MAX_MARK_BYTES: usize = 256;

/// The suffix of a primary's committed copy.
const COMMITTED_SUFFIX: &str = ".committed";
/// The suffix of a commit being made, renamed over the committed copy when complete.
const COMMITTING_SUFFIX: &str = ".committed.tmp";
/// The infix of a clone's name, before the owner tag.
const CLONE_INFIX: &str = ".clone.";

/// blkdiscard of a whole device is one request per range the device splits
/// it into; a large SSD takes seconds, a thin-provisioned LUN maybe minutes.
const DISCARD_TIMEOUT: Duration = Duration::from_secs(600);
/// wipefs rewrites a few signature bytes.
const WIPEFS_TIMEOUT: Duration = Duration::from_secs(60);
const BLKDISCARD: &str = "/usr/sbin/blkdiscard";
const WIPEFS: &str = "/usr/sbin/wipefs";
const BLKID: &str = "/usr/sbin/blkid";
const XFS_ADMIN: &str = "/usr/sbin/xfs_admin";
const BTRFSTUNE: &str = "/usr/bin/btrfstune";
/// blkid reads a superblock; xfs_admin and btrfstune -m rewrite one (or a few).
const UUID_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a mode's step on a file or device failed. Each names the file, the directory or the device.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ModeError {
    /// refusing {path}: {why}
    Refused { path: PathBuf, why: String },
    /// no committed copy of {primary} to clone; a primary must drain cleanly first
    NoCommit { primary: PathBuf },
    /// cannot clone {primary} here: {source}
    CloneUnsupported {
        primary: PathBuf,
        #[source]
        source: ReflinkError,
    },
    /// {0}
    Reflink(ReflinkError),
    /// {0}
    Walk(#[from] WalkError),
    /// {0}
    Backing(#[from] BackingError),
    /// cannot {what} {path}: {source}
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Errno,
    },
    /// {0}
    Tool(#[from] ToolError),
    /// {what} of {path} did not finish: {source}
    Join {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// The file a file-backed mount attaches, and what preparing it made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedFile {
    /// The task's file (primary), the clone, or the isolated volume.
    pub backing: PathBuf,
    /// This prepare created `backing` (undo removes it).
    pub created: bool,
    /// Directories created on the way, outermost first.
    pub created_dirs: Vec<PathBuf>,
}

// === names (pure) ===

/// A short, stable tag of the builder's owner id for file names: 16 hex
/// digits of its 64-bit FNV-1a hash. None for an empty id. Pure.
pub fn owner_tag(owner_id: &str) -> Option<String> {
    if owner_id.is_empty() {
        return None;
    }
    Some(format!("{:016x}", super::fnv1a64(owner_id.as_bytes())))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

/// `<primary>.committed`. Pure.
pub fn committed_path(primary: &Path) -> PathBuf {
    with_suffix(primary, COMMITTED_SUFFIX)
}

/// `<primary>.clone.<tag>`. Pure.
pub fn clone_path(primary: &Path, tag: &str) -> PathBuf {
    with_suffix(primary, &format!("{CLONE_INFIX}{tag}"))
}

/// Whether `path` is one of the names the agent derives from a primary's
/// (its committed copy, a commit in progress, a clone): a task naming one
/// would write to what clones start from, or to another builder's clone. Pure.
pub fn is_derived_name(path: &Path) -> bool {
    let name = path.file_name().map(OsStr::as_bytes).unwrap_or_default();
    let is_tag = |t: &[u8]| t.len() == 16 && t.iter().all(u8::is_ascii_hexdigit);
    name.ends_with(COMMITTED_SUFFIX.as_bytes())
        || name.ends_with(COMMITTING_SUFFIX.as_bytes())
        || name.len() > 16 + CLONE_INFIX.len() && name[..name.len() - 16].ends_with(CLONE_INFIX.as_bytes()) && is_tag(&name[name.len() - 16..])
}

/// The file a file-backed mount in `mode` attaches for the task's `path`:
/// the clone for a clone, the task's file otherwise. None for a clone when
/// the owner id is empty. Pure.
pub fn attached_path(path: &Path, mode: CacheMode, owner_id: &str) -> Option<PathBuf> {
    match mode {
        CacheMode::Clone => owner_tag(owner_id).map(|tag| clone_path(path, &tag)),
        CacheMode::Primary | CacheMode::Isolated => Some(path.into()),
    }
}

/// Whether blkdiscard's failure means the device cannot discard at all. Pure.
pub fn discard_unsupported(stderr: &str) -> bool {
    stderr.contains("Operation not supported") || stderr.contains("not supported")
}

// === prepare ===

/// Readies the file a file-backed mount attaches (see [the module](self)).
/// Blocking: file system calls only; callers run it off the async runtime.
pub fn prepare_file(allowed_dirs: &[PathBuf], owner_id: &str, path: &Path, mode: CacheMode) -> Result<PreparedFile, ModeError> {
    if is_derived_name(path) {
        return Err(ModeError::Refused {
            path: path.into(),
            why: "the name is one the agent gives a committed copy or a clone; name the primary's file".into(),
        });
    }
    match mode {
        CacheMode::Primary => Ok(PreparedFile { backing: path.into(), created: false, created_dirs: vec![] }),
        CacheMode::Clone => prepare_clone(allowed_dirs, owner_id, path),
        CacheMode::Isolated => prepare_isolated(allowed_dirs, owner_id, path),
    }
}

fn prepare_clone(allowed_dirs: &[PathBuf], owner_id: &str, primary: &Path) -> Result<PreparedFile, ModeError> {
    let tag = owner_tag(owner_id).ok_or_else(|| ModeError::Refused {
        path: primary.into(),
        why: "volume.owner_id is empty, and a clone is named after its builder; set volume.owner_id".into(),
    })?;
    let (dir, _) = open_parent(allowed_dirs, primary, false)?;
    let committed = committed_path(primary);
    let source = match open_marked(&dir, &committed) {
        Ok(Some(file)) => file,
        Ok(None) => return Err(ModeError::NoCommit { primary: primary.into() }),
        Err(error) => return Err(error),
    };
    let clone = clone_path(primary, &tag);
    match create_marked(&dir, &clone, Some(owner_id)) {
        Ok(file) => {
            let parent = primary.parent().unwrap_or(Path::new("/"));
            let made = reflink(source.as_fd(), file.as_fd(), parent, &committed, &clone)
                .map_err(|source| match source {
                    ReflinkError::Unsupported { .. } => ModeError::CloneUnsupported { primary: primary.into(), source },
                    ReflinkError::Failed { .. } => ModeError::Reflink(source),
                })
                .and_then(|()| fsync(&file, &clone));
            if let Err(error) = made {
                // A half-made clone must not be taken for a complete one after a restart.
                unlink(&dir, &clone);
                return Err(error);
            }
            info!(clone = %clone.display(), from = %committed.display(), "cloned the primary's committed copy (reflink)");
            Ok(PreparedFile { backing: clone, created: true, created_dirs: vec![] })
        }
        Err(Errno::EEXIST) => {
            require_disposable(&dir, &clone, owner_id, "a clone")?;
            info!(clone = %clone.display(), "reusing this builder's clone (an agent restarted)");
            Ok(PreparedFile { backing: clone, created: false, created_dirs: vec![] })
        }
        Err(source) => Err(ModeError::Io { what: "create the clone", path: clone, source }),
    }
}

fn prepare_isolated(allowed_dirs: &[PathBuf], owner_id: &str, path: &Path) -> Result<PreparedFile, ModeError> {
    if owner_id.is_empty() {
        return Err(ModeError::Refused {
            path: path.into(),
            why: "volume.owner_id is empty, and an isolated volume is marked with its builder; set volume.owner_id".into(),
        });
    }
    let (dir, created_dirs) = open_parent(allowed_dirs, path, true)?;
    match create_marked(&dir, path, Some(owner_id)) {
        Ok(file) => {
            fsync(&file, path)?;
            info!(backing = %path.display(), "created the isolated volume's file");
            Ok(PreparedFile { backing: path.into(), created: true, created_dirs })
        }
        Err(Errno::EEXIST) => {
            let file = require_disposable(&dir, path, owner_id, "an isolated volume")?;
            // A disposable file no loop device holds was left by an agent that
            // died before destroying it: it must start blank again.
            if super::device::find_attachment(path).ok().flatten().is_none() {
                truncate_to_zero(path, &file)?;
                warn!(backing = %path.display(), "an isolated volume left by an earlier agent; emptied it to start blank");
            } else {
                info!(backing = %path.display(), "reusing this builder's isolated volume (an agent restarted)");
            }
            Ok(PreparedFile { backing: path.into(), created: false, created_dirs })
        }
        Err(source) => Err(ModeError::Io { what: "create the isolated volume", path: path.into(), source }),
    }
}

// === release ===

/// A primary's commit: reflinks the (detached) backing file to
/// `<backing>.committed` through a temporary name, so the committed copy is
/// always a whole one. Returns the committed copy's path.
pub fn commit_primary(allowed_dirs: &[PathBuf], backing: &Path) -> Result<PathBuf, ModeError> {
    let (dir, _) = open_parent(allowed_dirs, backing, false)?;
    let source = open_marked(&dir, backing)?.ok_or_else(|| ModeError::Io { what: "open", path: backing.into(), source: Errno::ENOENT })?;
    let committed = committed_path(backing);
    let temporary = with_suffix(backing, COMMITTING_SUFFIX);
    let file = match create_marked(&dir, &temporary, None) {
        Ok(file) => file,
        Err(Errno::EEXIST) => {
            // A commit cut short by a crash: only a file the agent marked is removed.
            open_marked(&dir, &temporary)?;
            unlink(&dir, &temporary);
            create_marked(&dir, &temporary, None).map_err(|source| ModeError::Io { what: "create", path: temporary.clone(), source })?
        }
        Err(source) => return Err(ModeError::Io { what: "create", path: temporary, source }),
    };
    let parent = backing.parent().unwrap_or(Path::new("/"));
    let made =
        reflink(source.as_fd(), file.as_fd(), parent, backing, &temporary).map_err(ModeError::Reflink).and_then(|()| fsync(&file, &temporary)).and_then(|()| {
            nix::fcntl::renameat(Some(dir.as_raw_fd()), leaf(&temporary), Some(dir.as_raw_fd()), leaf(&committed)).map_err(|source| ModeError::Io {
                what: "rename the commit to",
                path: committed.clone(),
                source,
            })
        });
    if let Err(error) = made {
        unlink(&dir, &temporary);
        return Err(error);
    }
    // The rename is durable only once the directory is.
    let dir_rw = crate::sys::open_beneath(dir.as_fd(), Path::new("."), OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty(), NO_LINKS)
        .map_err(|source| ModeError::Io { what: "open the directory", path: parent.into(), source })?;
    fsync(&dir_rw, parent)?;
    Ok(committed)
}

/// Removes a clone's or an isolated volume's (detached) file, only if it
/// carries this builder's disposable mark. A file already gone is done.
pub fn destroy_file(allowed_dirs: &[PathBuf], owner_id: &str, path: &Path) -> Result<(), ModeError> {
    let (dir, _) = open_parent(allowed_dirs, path, false)?;
    match open_regular(&dir, path) {
        Ok(_) => {}
        Err(ModeError::Io { source: Errno::ENOENT, .. }) => return Ok(()),
        Err(error) => return Err(error),
    }
    require_disposable(&dir, path, owner_id, "a disposable volume")?;
    nix::unistd::unlinkat(Some(dir.as_raw_fd()), leaf(path), nix::unistd::UnlinkatFlags::NoRemoveDir).map_err(|source| ModeError::Io {
        what: "remove",
        path: path.into(),
        source,
    })?;
    info!(backing = %path.display(), "removed the disposable volume's file");
    Ok(())
}

/// What wiping an isolated device did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wiped {
    /// Every block discarded (and any signature a device that keeps discarded data still shows, erased).
    Discarded,
    /// The device cannot discard: only its filesystem signatures were erased.
    SignaturesOnly,
}

/// Wipes an isolated (unmounted) device: blkdiscard of all of it, then
/// `wipefs --all`, because discarded blocks need not read back as zeros on
/// every device and the next isolated prepare must find it blank. A device
/// that cannot discard gets the wipefs alone.
pub async fn wipe_device(device: &Path) -> Result<Wiped, ModeError> {
    // blkdiscard opens the device O_EXCL (util-linux >= 2.36): it refuses a device still mounted or held.
    let wiped = match run_tool(Path::new(BLKDISCARD), &[device.as_os_str()], DISCARD_TIMEOUT).await {
        Ok(_) => Wiped::Discarded,
        Err(ToolError::Failed { stderr, .. }) if discard_unsupported(&stderr) => {
            warn!(device = %device.display(), "the device cannot discard; erasing its filesystem signatures only (the old data stays on it)");
            Wiped::SignaturesOnly
        }
        Err(error) => return Err(error.into()),
    };
    run_tool(Path::new(WIPEFS), &["--all".as_ref(), device.as_os_str()], WIPEFS_TIMEOUT).await?;
    info!(device = %device.display(), wiped = ?wiped, "wiped the isolated device");
    Ok(wiped)
}

/// Gives a new clone's filesystem its own UUID before its first mount. The
/// clone is a copy of the primary's filesystem, UUID included, and it lives on
/// the primary's machine (reflinks never leave a filesystem): xfs refuses to
/// mount a filesystem whose UUID is mounted already ("duplicate UUID"), and
/// btrfs would take the two for devices of one filesystem. ext4 mounts
/// duplicates, and `tune2fs -U` would first want a fresh fsck: left as it is.
/// Returns the filesystem type found.
pub async fn renew_clone_uuid(device: &Path) -> Result<Option<String>, ModeError> {
    let args = ["-p".as_ref(), "-s".as_ref(), "TYPE".as_ref(), "-o".as_ref(), "value".as_ref(), device.as_os_str()];
    let out = run_tool(Path::new(BLKID), &args, UUID_TIMEOUT).await?;
    let fs_type = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (program, args): (&str, Vec<&OsStr>) = match fs_type.as_str() {
        // Needs a clean log: the commit was made only after a clean unmount.
        "xfs" => (XFS_ADMIN, vec!["-U".as_ref(), "generate".as_ref(), device.as_os_str()]),
        // -m: a new fsid kept as metadata_uuid, without rewriting every block.
        "btrfs" => (BTRFSTUNE, vec!["-f".as_ref(), "-m".as_ref(), device.as_os_str()]),
        _ => return Ok(Some(fs_type).filter(|t| !t.is_empty())),
    };
    run_tool(Path::new(program), &args, UUID_TIMEOUT).await?;
    info!(device = %device.display(), fs = %fs_type, "gave the clone's filesystem a UUID of its own");
    Ok(Some(fs_type))
}

// === what release and prepare report (async edges for the manager) ===

/// [`prepare_file`], off the async runtime.
pub async fn prepare_file_async(allowed_dirs: &[PathBuf], owner_id: &str, path: &Path, mode: CacheMode) -> Result<PreparedFile, ModeError> {
    let (allowed, owner, file) = (allowed_dirs.to_vec(), owner_id.to_string(), path.to_path_buf());
    tokio::task::spawn_blocking(move || prepare_file(&allowed, &owner, &file, mode)).await.map_err(|source| ModeError::Join {
        what: "preparing",
        path: path.into(),
        source,
    })?
}

/// A primary file's commit at release: made when `unclean` is None (the
/// release was clean so far), else skipped saying why. Never an error of the
/// release: a cache without a fresh commit still works, its clones start older.
pub async fn commit_file(allowed_dirs: &[PathBuf], backing: &Path, unclean: Option<String>) -> Commit {
    let source = backing.display().to_string();
    if let Some(why) = unclean {
        warn!(backing = %source, %why, "commit skipped");
        return Commit { source, copy: Err(format!("commit skipped: {why}")) };
    }
    let (allowed, file) = (allowed_dirs.to_vec(), backing.to_path_buf());
    let started = tokio::time::Instant::now();
    let made = tokio::task::spawn_blocking(move || commit_primary(&allowed, &file))
        .await
        .unwrap_or_else(|source| Err(ModeError::Join { what: "committing", path: backing.into(), source }));
    let copy = match made {
        Ok(committed) => {
            info!(backing = %source, committed = %committed.display(), took = ?started.elapsed(), "primary committed (reflink)");
            Ok(committed.display().to_string())
        }
        Err(ModeError::Reflink(unsupported @ ReflinkError::Unsupported { .. })) => {
            warn!(backing = %source, why = %unsupported, "commit not supported here");
            Err(format!("commit not supported here: {unsupported}"))
        }
        Err(error) => {
            warn!(backing = %source, %error, "commit failed; the primary is released without one");
            Err(format!("commit failed: {error}"))
        }
    };
    Commit { source, copy }
}

/// A primary on a block device: never a commit, and why.
pub fn device_commit(device: &Path) -> Commit {
    let copy = Err("commit not supported here: a block device has no snapshots; use an rbd image or a file on xfs or btrfs".to_string());
    Commit { source: device.display().to_string(), copy }
}

/// [`destroy_file`], off the async runtime.
pub async fn destroy_file_async(allowed_dirs: &[PathBuf], owner_id: &str, path: &Path) -> Result<(), ModeError> {
    let (allowed, owner, file) = (allowed_dirs.to_vec(), owner_id.to_string(), path.to_path_buf());
    tokio::task::spawn_blocking(move || destroy_file(&allowed, &owner, &file)).await.map_err(|source| ModeError::Join {
        what: "destroying",
        path: path.into(),
        source,
    })?
}

// === file helpers ===

/// The last component of a path the caller already checked is a file in a directory.
fn leaf(path: &Path) -> &OsStr {
    path.file_name().unwrap_or_default()
}

/// Opens the directory holding `path` (beneath an allowed dir, without
/// links, private to the agent); returns it and the directories it created.
fn open_parent(allowed_dirs: &[PathBuf], path: &Path, create: bool) -> Result<(OwnedFd, Vec<PathBuf>), ModeError> {
    if super::backing::allowed_root(path, allowed_dirs).is_none() {
        let allowed = allowed_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
        return Err(BackingError::NotAllowed { path: path.into(), allowed }.into());
    }
    let (Some(parent), Some(_)) = (path.parent(), path.file_name()) else {
        return Err(ModeError::Refused { path: path.into(), why: "it names a directory, not a file".into() });
    };
    let dir = open_dir(parent, create.then_some(Mode::S_IRWXU))?;
    check_private_dir(parent, &dir.fd)?;
    Ok((dir.fd, dir.created))
}

/// Creates `path` in `dir` (O_EXCL, never through a link), marks it as a
/// backing file and, given an owner, as that owner's disposable volume.
/// A file that cannot be marked is removed again.
fn create_marked(dir: &OwnedFd, path: &Path, disposable_by: Option<&str>) -> Result<OwnedFd, Errno> {
    let create = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let file = crate::sys::open_beneath(dir.as_fd(), Path::new(leaf(path)), create, Mode::S_IRUSR | Mode::S_IWUSR, NO_LINKS)?;
    let marked = crate::sys::fsetxattr(file.as_fd(), MARKER_XATTR, MARKER_VALUE)
        .and_then(|()| disposable_by.map_or(Ok(()), |owner| crate::sys::fsetxattr(file.as_fd(), DISPOSABLE_XATTR, owner.as_bytes())));
    if let Err(errno) = marked {
        unlink(dir, path);
        return Err(errno);
    }
    Ok(file)
}

/// Opens `path` in `dir` read-only, without links, and only if it is a
/// regular file the agent could have made (see [`refusal`]).
fn open_regular(dir: &OwnedFd, path: &Path) -> Result<OwnedFd, ModeError> {
    // O_NONBLOCK: opening a FIFO planted here must not hang the agent.
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let file = crate::sys::open_beneath(dir.as_fd(), Path::new(leaf(path)), flags, Mode::empty(), NO_LINKS).map_err(|source| match source {
        Errno::ELOOP => ModeError::Refused { path: path.into(), why: "it is a symbolic link".into() },
        source => ModeError::Io { what: "open", path: path.into(), source },
    })?;
    let st = nix::sys::stat::fstat(file.as_raw_fd()).map_err(|source| ModeError::Io { what: "stat", path: path.into(), source })?;
    if let Some(why) = refusal(&st, nix::unistd::geteuid().as_raw()) {
        return Err(ModeError::Refused { path: path.into(), why });
    }
    Ok(file)
}

/// `path` opened read-only if it is a backing file the agent marked; None if there is no such name.
fn open_marked(dir: &OwnedFd, path: &Path) -> Result<Option<OwnedFd>, ModeError> {
    let file = match open_regular(dir, path) {
        Ok(file) => file,
        Err(ModeError::Io { source: Errno::ENOENT, .. }) => return Ok(None),
        Err(error) => return Err(error),
    };
    match read_mark(file.as_fd(), MARKER_XATTR, path)? {
        Some(value) if value == MARKER_VALUE => Ok(Some(file)),
        _ => Err(ModeError::Refused { path: path.into(), why: format!("it does not carry the agent's {} mark", MARKER_XATTR.to_string_lossy()) }),
    }
}

/// `path`, if it is a backing file this builder marked disposable; refused otherwise.
fn require_disposable(dir: &OwnedFd, path: &Path, owner_id: &str, what: &str) -> Result<OwnedFd, ModeError> {
    let refused = |why: String| ModeError::Refused { path: path.into(), why };
    let file = open_marked(dir, path)?.ok_or_else(|| refused("it vanished".into()))?;
    match read_mark(file.as_fd(), DISPOSABLE_XATTR, path)? {
        Some(value) if value == owner_id.as_bytes() => Ok(file),
        Some(value) => Err(refused(format!("it is a disposable volume of another builder ({:?}), not {what} of this one", String::from_utf8_lossy(&value)))),
        None if what == "an isolated volume" => Err(refused("an isolated volume must be a new file, and this one exists".into())),
        None => Err(refused(format!("it exists and is not {what} this builder made (no {} mark)", DISPOSABLE_XATTR.to_string_lossy()))),
    }
}

/// The value of the attribute `name` of `fd`, or None when it has none.
fn read_mark(fd: BorrowedFd<'_>, name: &CStr, path: &Path) -> Result<Option<Vec<u8>>, ModeError> {
    let mut buf = [0u8; MAX_MARK_BYTES];
    match crate::sys::fgetxattr(fd, name, &mut buf) {
        Ok(n) => Ok(Some(buf[..n].to_vec())),
        Err(Errno::ENODATA) => Ok(None),
        // Longer than any mark the agent writes: not one of ours.
        Err(Errno::ERANGE) => Ok(Some(vec![])),
        Err(source) => Err(ModeError::Io { what: "read the marks of", path: path.into(), source }),
    }
}

fn fsync(fd: &OwnedFd, path: &Path) -> Result<(), ModeError> {
    nix::unistd::fsync(fd.as_raw_fd()).map_err(|source| ModeError::Io { what: "fsync", path: path.into(), source })
}

/// Empties a disposable file of ours, opened read-write through the very inode just checked.
fn truncate_to_zero(path: &Path, checked: &OwnedFd) -> Result<(), ModeError> {
    let io = |source| ModeError::Io { what: "empty", path: path.into(), source };
    let proc_fd = PathBuf::from(format!("/proc/self/fd/{}", checked.as_raw_fd()));
    let file = std::fs::OpenOptions::new().write(true).open(&proc_fd).map_err(|e| io(Errno::from_raw(e.raw_os_error().unwrap_or(nix::libc::EIO))))?;
    nix::unistd::ftruncate(file.as_fd(), 0).map_err(io)?;
    nix::unistd::fsync(file.as_raw_fd()).map_err(io)
}

/// Removes a file the agent just made; a failure is only logged (the caller reports the first error).
fn unlink(dir: &OwnedFd, path: &Path) {
    if let Err(errno) = nix::unistd::unlinkat(Some(dir.as_raw_fd()), leaf(path), nix::unistd::UnlinkatFlags::NoRemoveDir) {
        if errno != Errno::ENOENT {
            warn!(path = %path.display(), %errno, "cannot remove a file the agent made");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_tag_is_short_stable_hex_and_none_for_no_owner() {
        let tag = owner_tag("builder-7.eu:1").unwrap();
        assert_eq!(tag.len(), 16);
        assert!(tag.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(owner_tag("builder-7.eu:1").unwrap(), tag, "stable");
        assert_ne!(owner_tag("builder-8.eu:1").unwrap(), tag);
        // FNV-1a 64 of "a", the published test vector.
        assert_eq!(owner_tag("a").unwrap(), "af63dc4c8601ec8c");
        assert_eq!(owner_tag(""), None);
    }

    #[test]
    fn derived_names_are_the_committed_copy_a_commit_and_clones() {
        let primary = Path::new("/srv/cache/project.img");
        assert_eq!(committed_path(primary), Path::new("/srv/cache/project.img.committed"));
        let clone = clone_path(primary, &owner_tag("b1").unwrap());
        assert!(clone.to_str().unwrap().starts_with("/srv/cache/project.img.clone."));
        for derived in [committed_path(primary), with_suffix(primary, COMMITTING_SUFFIX), clone.clone()] {
            assert!(is_derived_name(&derived), "{}", derived.display());
        }
        for plain in ["/srv/cache/project.img", "/srv/cache/a.clone.xyz", "/srv/cache/.clone.", "/srv/cache/committed"] {
            assert!(!is_derived_name(Path::new(plain)), "{plain}");
        }
        assert_eq!(attached_path(primary, CacheMode::Clone, "b1"), Some(clone));
        assert_eq!(attached_path(primary, CacheMode::Clone, ""), None);
        assert_eq!(attached_path(primary, CacheMode::Isolated, ""), Some(primary.into()));
    }

    #[test]
    fn only_a_not_supported_discard_falls_back_to_wipefs() {
        assert!(discard_unsupported("blkdiscard: /dev/sdb: BLKDISCARD ioctl failed: Operation not supported"));
        assert!(!discard_unsupported("blkdiscard: cannot open /dev/sdb: Device or resource busy"));
    }

    #[test]
    fn the_refusals_name_the_file_and_say_what_to_do() {
        let e = ModeError::NoCommit { primary: "/srv/c/p.img".into() };
        assert_eq!(e.to_string(), "no committed copy of /srv/c/p.img to clone; a primary must drain cleanly first");
        let e =
            ModeError::CloneUnsupported { primary: "/srv/c/p.img".into(), source: ReflinkError::Unsupported { dir: "/srv/c".into(), fs_type: "ext4".into() } };
        assert_eq!(e.to_string(), "cannot clone /srv/c/p.img here: /srv/c is on ext4, which has no reflinks");
    }
}
