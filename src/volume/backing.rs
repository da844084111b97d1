//! The backing files of file-backed volumes: where they may live and which
//! ones the agent may grow, format and attach.
//!
//! A task names the file, and the agent runs as root, so without limits a task
//! could make it grow `/etc/passwd` by 512 MiB of zeros and format it, or put
//! the cache in RAM under `/run`. So: the file must sit beneath one of
//! `volume.allowed_backing_dirs`; its directories are opened without following
//! links ([`super::nofollow`]); a new file is created `O_CREAT | O_EXCL |
//! O_NOFOLLOW` and marked with the [`MARKER_XATTR`] extended attribute; an
//! existing file is used only if it carries that mark, has one link, belongs
//! to the agent's user and sits in a directory nobody else can write to.
//! `trusted.*` attributes can be set only with CAP_SYS_ADMIN, so an
//! unprivileged user cannot forge the mark.
//!
//! Never: follows a link, touches a file it did not make, shrinks a file.

use super::nofollow::{open_dir, WalkError, NO_LINKS};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode};
use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// The mark the agent sets on every backing file it creates.
pub const MARKER_XATTR: &CStr = c"trusted.machine-agent.backing-file";
const MARKER_VALUE: &[u8] = b"1";

/// Why a backing file was refused or could not be made. Each names the file.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum BackingError {
    /// the backing file {path} is not beneath any of volume.allowed_backing_dirs ({allowed})
    NotAllowed { path: PathBuf, allowed: String },
    /// {0}
    Walk(#[from] WalkError),
    /// the backing file {path} is {kind}, not a regular file
    NotAFile { path: PathBuf, kind: &'static str },
    /// refusing the backing file {path}: {why}; the agent grows, formats and attaches only backing files it created itself
    NotOurs { path: PathBuf, why: String },
    /// refusing to keep a backing file in {dir}: {why}
    DirNotPrivate { dir: PathBuf, why: String },
    /// cannot create, mark or size the backing file {path}: {source}
    Io {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

/// A backing file ready to attach, and what opening it created.
#[derive(Debug)]
pub struct BackingFile {
    /// The file's path: clean and free of links, so it is what sysfs reports.
    pub path: PathBuf,
    pub bytes: u64,
    /// Directories made on the way, outermost first.
    pub created_dirs: Vec<PathBuf>,
    /// The file itself was made by this call.
    pub created_file: bool,
}

/// The allowed directory `path` sits strictly beneath, if any. Pure: `path`
/// is compared by components, so `/a/bc` is not beneath `/a/b`.
pub fn allowed_root<'a>(path: &Path, allowed_dirs: &'a [PathBuf]) -> Option<&'a Path> {
    allowed_dirs.iter().map(PathBuf::as_path).find(|dir| path.starts_with(dir) && path != *dir)
}

/// Opens (creating or growing, never shrinking) the backing file `path` of at
/// least `size_bytes`, refusing anything [this module](self) does not allow.
pub fn open_backing_file(allowed_dirs: &[PathBuf], path: &Path, size_bytes: u64) -> Result<BackingFile, BackingError> {
    if allowed_root(path, allowed_dirs).is_none() {
        let allowed = allowed_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
        return Err(BackingError::NotAllowed { path: path.into(), allowed });
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(BackingError::NotAFile { path: path.into(), kind: "a directory" });
    };
    let dir = open_dir(parent, Some(Mode::S_IRWXU))?;
    check_private_dir(parent, &dir.fd)?;
    let io = |source| BackingError::Io { path: path.into(), source };
    let create = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let (file, created_file) = match crate::sys::open_beneath(dir.fd.as_fd(), Path::new(name), create, Mode::S_IRUSR | Mode::S_IWUSR, NO_LINKS) {
        Ok(file) => {
            if let Err(source) = crate::sys::fsetxattr(file.as_fd(), MARKER_XATTR, MARKER_VALUE) {
                // An unmarked file would be refused next time; leave none behind.
                let _ = nix::unistd::unlinkat(Some(dir.fd.as_raw_fd()), name, nix::unistd::UnlinkatFlags::NoRemoveDir);
                return Err(io(source));
            }
            (file, true)
        }
        Err(Errno::EEXIST) => (open_existing(path, &dir.fd, name)?, false),
        Err(source) => return Err(io(source)),
    };
    let old_bytes = u64::try_from(nix::sys::stat::fstat(file.as_raw_fd()).map_err(io)?.st_size).unwrap_or(0);
    let bytes = if old_bytes < size_bytes {
        // ftruncate allocates nothing: the file stays sparse until written.
        nix::unistd::ftruncate(file.as_fd(), i64::try_from(size_bytes).unwrap_or(i64::MAX)).map_err(io)?;
        if created_file {
            info!(backing = %path.display(), bytes = size_bytes, "created a sparse backing file");
        } else {
            info!(backing = %path.display(), old_bytes, new_bytes = size_bytes, "growing the backing file");
        }
        size_bytes
    } else {
        if old_bytes > size_bytes {
            warn!(backing = %path.display(), file_bytes = old_bytes, requested_bytes = size_bytes, "backing file is larger than requested; never shrinking it");
        }
        old_bytes
    };
    nix::unistd::fsync(file.as_raw_fd()).map_err(io)?;
    Ok(BackingFile { path: path.into(), bytes, created_dirs: dir.created, created_file })
}

/// The directory holding backing files must be the agent's alone: anyone else
/// who can write there could swap the file between the checks and losetup.
pub(super) fn check_private_dir(dir_path: &Path, dir: &OwnedFd) -> Result<(), BackingError> {
    let st = nix::sys::stat::fstat(dir.as_raw_fd()).map_err(|source| BackingError::Io { path: dir_path.into(), source })?;
    let why = if st.st_uid != nix::unistd::geteuid().as_raw() {
        Some(format!("it belongs to uid {}, not to the agent", st.st_uid))
    } else if st.st_mode & 0o022 != 0 {
        Some(format!("group or others may write to it (mode {:o})", st.st_mode & 0o7777))
    } else {
        None
    };
    why.map_or(Ok(()), |why| Err(BackingError::DirNotPrivate { dir: dir_path.into(), why }))
}

/// An existing backing file, opened read-write only after it proved to be the agent's.
fn open_existing(path: &Path, dir: &OwnedFd, name: &std::ffi::OsStr) -> Result<OwnedFd, BackingError> {
    let io = |source| BackingError::Io { path: path.into(), source };
    // O_PATH first: opening a FIFO or a device for writing could block or act on it.
    let look = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let handle = crate::sys::open_beneath(dir.as_fd(), Path::new(name), look, Mode::empty(), NO_LINKS).map_err(io)?;
    let st = nix::sys::stat::fstat(handle.as_raw_fd()).map_err(io)?;
    if let Some(why) = refusal(&st, nix::unistd::geteuid().as_raw()) {
        return match file_kind(st.st_mode) {
            Some(kind) if kind != "a symbolic link" => Err(BackingError::NotAFile { path: path.into(), kind }),
            _ => Err(BackingError::NotOurs { path: path.into(), why }),
        };
    }
    // Reopened through the O_PATH handle: the very inode just checked, not
    // whatever the name points at by now.
    let proc_fd = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    let file =
        std::fs::OpenOptions::new().read(true).write(true).open(&proc_fd).map_err(|e| io(Errno::from_raw(e.raw_os_error().unwrap_or(nix::libc::EIO))))?;
    let file = OwnedFd::from(file);
    let mut mark = [0u8; 8];
    match crate::sys::fgetxattr(file.as_fd(), MARKER_XATTR, &mut mark) {
        Ok(n) if &mark[..n] == MARKER_VALUE => Ok(file),
        Ok(_) | Err(Errno::ENODATA) | Err(Errno::ERANGE) => {
            Err(BackingError::NotOurs { path: path.into(), why: format!("it does not carry the agent's {} mark", MARKER_XATTR.to_string_lossy()) })
        }
        Err(source) => Err(io(source)),
    }
}

/// Why an existing file is not one the agent made, judged on its stat alone. Pure.
pub fn refusal(st: &FileStat, agent_uid: u32) -> Option<String> {
    if st.st_mode & nix::libc::S_IFMT != nix::libc::S_IFREG {
        return Some(format!("it is {}", file_kind(st.st_mode).unwrap_or("not a file")));
    }
    if st.st_nlink != 1 {
        return Some(format!("it has {} hard links; another name could be the system's file", st.st_nlink));
    }
    if st.st_uid != agent_uid {
        return Some(format!("it belongs to uid {}, not to the agent", st.st_uid));
    }
    None
}

/// What a non-regular file is, for messages.
fn file_kind(mode: u32) -> Option<&'static str> {
    match mode & nix::libc::S_IFMT {
        nix::libc::S_IFREG => None,
        nix::libc::S_IFDIR => Some("a directory"),
        nix::libc::S_IFLNK => Some("a symbolic link"),
        nix::libc::S_IFIFO => Some("a FIFO"),
        nix::libc::S_IFCHR => Some("a character device"),
        nix::libc::S_IFBLK => Some("a block device"),
        nix::libc::S_IFSOCK => Some("a socket"),
        _ => Some("not a file"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_strictly_beneath_an_allowed_dir_are_allowed() {
        let allowed = vec![PathBuf::from("/var/lib/machine-agent/volumes"), PathBuf::from("/srv/cache")];
        assert!(allowed_root(Path::new("/var/lib/machine-agent/volumes/a.img"), &allowed).is_some());
        assert!(allowed_root(Path::new("/srv/cache/x/y.img"), &allowed).is_some());
        for outside in ["/srv/cache", "/srv/cachex/a.img", "/etc/passwd", "/run/a.img", "/srv"] {
            assert!(allowed_root(Path::new(outside), &allowed).is_none(), "{outside}");
        }
        assert!(allowed_root(Path::new("/a"), &[]).is_none());
    }
}
