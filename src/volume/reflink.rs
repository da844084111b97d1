//! Copy-on-write copies of whole files (reflinks), for a primary's commit and
//! a clone's start: FICLONE makes the copy share every extent of its source,
//! so a copy of a 100 GiB cache takes milliseconds and no space until either
//! side writes.
//!
//! Owns: the FICLONE call, telling "this filesystem has no reflinks" (ext4,
//! tmpfs...) apart from a real failure, and naming the filesystem in the error.
//!
//! Never: falls back to a byte copy. A copy of a whole cache would take
//! minutes, double its space, and read the source while it could change.

use nix::errno::Errno;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

/// Why a reflink was not made. Each names the directory or the files.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ReflinkError {
    /// {dir} is on {fs_type}, which has no reflinks
    Unsupported { dir: PathBuf, fs_type: String },
    /// cannot reflink {from} to {to}: {source}
    Failed {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: Errno,
    },
}

/// Whether FICLONE's errno means the filesystem (or this pair of files) cannot
/// share extents at all, rather than that this one copy failed. Pure.
///
/// EOPNOTSUPP: the filesystem has no reflinks (ext4, tmpfs, or xfs made with
/// `-m reflink=0`). EINVAL: the filesystem does not know the request or the
/// files' layout forbids it. EXDEV: the two files are on different
/// filesystems. ENOTTY: nothing below answers the ioctl at all.
pub fn is_unsupported(errno: Errno) -> bool {
    matches!(errno, Errno::EOPNOTSUPP | Errno::EINVAL | Errno::EXDEV | Errno::ENOTTY)
}

/// The name of a filesystem from statfs(2)'s `f_type` magic. Pure.
pub fn fs_type_name(magic: i64) -> String {
    // The magic numbers of <linux/magic.h>; f_type is a signed long, so a
    // magic with the top bit of 32 set may arrive sign-extended.
    let Ok(magic) = u32::try_from(magic & 0xffff_ffff) else { return format!("an unknown filesystem (f_type {magic:#x})") };
    let name = match magic {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs",
        0x794C_7630 => "overlayfs",
        0x6969 => "nfs",
        0x2FC1_2FC1 => "zfs",
        0xF2F5_2010 => "f2fs",
        0xCA45_1A4E => "bcachefs",
        0x6573_5546 => "fuse",
        0x8584_58F6 => "ramfs",
        0x5346_544E => "ntfs",
        0x4d44 => "vfat",
        _ => return format!("an unknown filesystem (f_type {magic:#x})"),
    };
    name.to_string()
}

/// The filesystem type of the open file or directory `fd`, named; for messages.
pub fn read_fs_type(fd: BorrowedFd<'_>) -> String {
    match nix::sys::statfs::fstatfs(fd) {
        // f_type is a C long: i64 here, i32 on 32-bit targets, where this widens.
        #[allow(clippy::useless_conversion)]
        Ok(st) => fs_type_name(i64::from(st.filesystem_type().0)),
        Err(errno) => format!("a filesystem statfs cannot name ({errno})"),
    }
}

/// Makes `dest` (open for writing, empty) a copy-on-write copy of all of
/// `src`. `dir` is the directory both sit in, named when the filesystem has
/// no reflinks; `from` and `to` name the files otherwise.
pub fn reflink(src: BorrowedFd<'_>, dest: BorrowedFd<'_>, dir: &Path, from: &Path, to: &Path) -> Result<(), ReflinkError> {
    match crate::sys::ficlone(dest, src) {
        Ok(()) => Ok(()),
        Err(errno) if is_unsupported(errno) => Err(ReflinkError::Unsupported { dir: dir.into(), fs_type: read_fs_type(dest) }),
        Err(source) => Err(ReflinkError::Failed { from: from.into(), to: to.into(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn filesystems_are_named_from_their_magic_even_sign_extended() {
        assert_eq!(fs_type_name(0xEF53), "ext4");
        assert_eq!(fs_type_name(0x5846_5342), "xfs");
        assert_eq!(fs_type_name(0x9123_683E), "btrfs");
        assert_eq!(fs_type_name(0x9123_683E_u32 as i32 as i64), "btrfs", "sign-extended");
        assert_eq!(fs_type_name(0x0102_1994), "tmpfs");
        assert_eq!(fs_type_name(0x1234), "an unknown filesystem (f_type 0x1234)");
    }

    #[test]
    fn only_the_no_reflinks_errnos_mean_unsupported() {
        for errno in [Errno::EOPNOTSUPP, Errno::EINVAL, Errno::EXDEV, Errno::ENOTTY] {
            assert!(is_unsupported(errno), "{errno}");
        }
        for errno in [Errno::EIO, Errno::ENOSPC, Errno::EBADF, Errno::EPERM, Errno::ETXTBSY] {
            assert!(!is_unsupported(errno), "{errno}");
        }
    }

    #[test]
    fn unsupported_names_the_directory_and_its_filesystem() {
        let err = ReflinkError::Unsupported { dir: "/srv/cache".into(), fs_type: "ext4".into() };
        assert_eq!(err.to_string(), "/srv/cache is on ext4, which has no reflinks");
    }

    #[test]
    fn a_reflink_between_pipes_is_refused_as_unsupported_not_a_crash() {
        let (read, write) = nix::unistd::pipe().unwrap();
        let err = reflink(read.as_fd(), write.as_fd(), Path::new("/pipe"), Path::new("a"), Path::new("b")).unwrap_err();
        assert!(matches!(err, ReflinkError::Unsupported { .. } | ReflinkError::Failed { .. }), "{err}");
    }
}
