//! Opening the directories a task names (mount points, the directories of
//! backing files) one component at a time, never through a symbolic link.
//!
//! A task is untrusted input to a root daemon: `create_dir_all`, `mount(2)`
//! and `open(2)` follow a link planted anywhere in a path, so a link under an
//! allowed prefix could point the agent's mkdir, mount or file growth at any
//! place on the host. Here each component is opened with openat2(2)
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` relative to the directory opened
//! before it (openat(2) with `O_NOFOLLOW` where the kernel lacks openat2: the
//! same promise for one component, see [`crate::sys::open_beneath`]), so what the caller gets is the directory the clean path names,
//! and an `O_PATH` descriptor of it to act on (mount onto `/proc/self/fd/N`,
//! create a file in it) rather than the path, which could change meanwhile.
//!
//! Never: follows a link, crosses `..` (paths are checked clean first), or
//! removes anything but the empty directories it created itself.

use nix::errno::Errno;
use nix::fcntl::{OFlag, ResolveFlag};
use nix::sys::stat::Mode;
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

/// How every component is resolved: within its parent, and no link of any kind.
pub const NO_LINKS: ResolveFlag = ResolveFlag::RESOLVE_BENEATH.union(ResolveFlag::RESOLVE_NO_SYMLINKS).union(ResolveFlag::RESOLVE_NO_MAGICLINKS);

/// Why a path a task named could not be opened as a directory. Each names the
/// path and the component at fault.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum WalkError {
    /// {path} is not a clean absolute path: {why}
    NotClean { path: PathBuf, why: String },
    /// {component} is a symbolic link (in {path}); a path from a task is never followed through a link
    Symlink { path: PathBuf, component: PathBuf },
    /// {component} is not a directory (in {path})
    NotADirectory { path: PathBuf, component: PathBuf },
    /// cannot open {component} (in {path}): {source}
    Open {
        path: PathBuf,
        component: PathBuf,
        #[source]
        source: Errno,
    },
    /// cannot create the directory {component} (in {path}): {source}
    Create {
        path: PathBuf,
        component: PathBuf,
        #[source]
        source: Errno,
    },
}

/// A directory opened without following links, and the directories this
/// open created on the way (outermost first), for the caller's undo.
#[derive(Debug)]
pub struct OpenedDir {
    pub fd: OwnedFd,
    pub created: Vec<PathBuf>,
}

impl OpenedDir {
    /// The `/proc/self/fd/N` name of the open directory: mount(2) and losetup
    /// act on what was opened, not on whatever the path names by then.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// The components of a clean absolute path, or why it is not one. Pure.
pub fn clean_components(path: &Path) -> Result<Vec<&OsStr>, String> {
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.contains(&0) {
        return Err("the path contains a NUL byte".into());
    }
    if !path.is_absolute() {
        return Err("expected an absolute path".into());
    }
    if bytes.windows(2).any(|w| w == b"//") || bytes.split(|&b| b == b'/').any(|part| part == b"." || part == b"..") {
        return Err("expected a normalized path without '.', '..' or '//'".into());
    }
    let mut parts = vec![];
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(name) => parts.push(name),
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => return Err("expected a normalized path".into()),
        }
    }
    Ok(parts)
}

/// Opens the directory `path` component by component from `/`, never through
/// a link; a missing component is created with `create_mode` when given (and
/// listed in [`OpenedDir::created`]), else it is an error.
pub fn open_dir(path: &Path, create_mode: Option<Mode>) -> Result<OpenedDir, WalkError> {
    let parts = clean_components(path).map_err(|why| WalkError::NotClean { path: path.into(), why })?;
    let root = std::fs::File::open("/").map_err(|e| WalkError::Open {
        path: path.into(),
        component: "/".into(),
        source: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
    })?;
    let mut dir = OwnedFd::from(root);
    let mut so_far = PathBuf::from("/");
    let mut created = vec![];
    for name in parts {
        so_far.push(name);
        dir = match open_child_dir(&dir, name) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) if create_mode.is_some() => {
                let mode = create_mode.unwrap_or(Mode::S_IRWXU);
                match nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), name, mode) {
                    Ok(()) => created.push(so_far.clone()),
                    // Made by someone else between our look and mkdir: opened below like any other.
                    Err(Errno::EEXIST) => {}
                    Err(source) => return Err(WalkError::Create { path: path.into(), component: so_far, source }),
                }
                open_child_dir(&dir, name).map_err(|e| classify(path, &so_far, &dir, name, e))?
            }
            Err(e) => return Err(classify(path, &so_far, &dir, name, e)),
        };
    }
    Ok(OpenedDir { fd: dir, created })
}

/// One component below `parent`, as an `O_PATH` directory descriptor.
fn open_child_dir(parent: &OwnedFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    crate::sys::open_beneath(parent.as_fd(), Path::new(name), OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty(), NO_LINKS)
}

/// A failed open, told apart: a link, something other than a directory, or another error.
fn classify(path: &Path, component: &Path, parent: &OwnedFd, name: &OsStr, e: Errno) -> WalkError {
    let lstat = nix::sys::stat::fstatat(Some(parent.as_raw_fd()), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW);
    let kind = lstat.map(|st| st.st_mode & nix::libc::S_IFMT);
    match (e, kind) {
        (_, Ok(nix::libc::S_IFLNK)) | (Errno::ELOOP, _) => WalkError::Symlink { path: path.into(), component: component.into() },
        (Errno::ENOTDIR, _) => WalkError::NotADirectory { path: path.into(), component: component.into() },
        (source, _) => WalkError::Open { path: path.into(), component: component.into(), source },
    }
}

/// Removes the directories a walk created, innermost first; each only if it
/// is still an empty directory (rmdir never removes anything else). Returns
/// what could not be removed, each with why.
pub fn remove_created(created: &[PathBuf]) -> Vec<String> {
    let mut failures = vec![];
    for dir in created.iter().rev() {
        if let Err(e) = std::fs::remove_dir(dir) {
            failures.push(format!("cannot remove {}: {e}", dir.display()));
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn only_clean_absolute_paths_have_components() {
        assert_eq!(clean_components(Path::new("/a/b")).unwrap(), vec![OsStr::new("a"), OsStr::new("b")]);
        assert_eq!(clean_components(Path::new("/")).unwrap(), Vec::<&OsStr>::new());
        for bad in ["a/b", "/a/../b", "/a/./b", "/a//b", "/..", ""] {
            assert!(clean_components(Path::new(bad)).is_err(), "{bad}");
        }
        assert!(clean_components(Path::new(OsStr::from_bytes(b"/a/\0b"))).is_err());
        assert!(clean_components(Path::new(OsStr::from_bytes(b"/a/\xffb"))).is_ok(), "non-UTF-8 names are names");
    }

    #[test]
    fn a_symlink_anywhere_is_refused_naming_it_and_nothing_is_created_beyond_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("link")).unwrap();
        let err = open_dir(&root.join("link/x/y"), Some(Mode::S_IRWXU)).unwrap_err();
        assert!(matches!(&err, WalkError::Symlink { component, .. } if *component == root.join("link")), "{err}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "nothing made through the link");
        let made = open_dir(&root.join("a/b"), Some(Mode::S_IRWXU)).unwrap();
        assert_eq!(made.created, vec![root.join("a"), root.join("a/b")]);
        assert!(remove_created(&made.created).is_empty());
        assert!(!root.join("a").exists());
    }
}
