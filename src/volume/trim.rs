//! fstrim for the cache volume: tells the device which blocks the filesystem
//! no longer uses (FITRIM), so a thin or cloud disk can release them after a
//! build deleted its cache.
//!
//! This module only asks the filesystem at a mount point to trim itself. It
//! never mounts, never changes mount options (the volume is mounted without
//! `discard`; trimming happens here, in one batch, at drain) and never decides
//! whether a failure matters: callers log [`TrimError::NotSupported`] and carry on.

use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a mount point could not be trimmed.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum TrimError {
    /// cannot open {mount_point} to trim it: {source}
    Open {
        mount_point: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// the filesystem at {mount_point} or its device does not support discard (FITRIM)
    NotSupported { mount_point: PathBuf },
    /// FITRIM on {mount_point} failed: {source}
    Trim {
        mount_point: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// the FITRIM task for {mount_point} did not finish: {source}
    Task {
        mount_point: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Trims every unused block of the filesystem mounted at `mount_point`, as
/// `fstrim <mount_point>` does, and returns the bytes the kernel reports trimmed.
///
/// The count is the filesystem's own figure: ext4 counts only groups it has not
/// trimmed since mount, so a second call soon after the first may return 0.
pub async fn fstrim(mount_point: &Path) -> Result<u64, TrimError> {
    let path = mount_point.to_path_buf();
    // A whole-volume FITRIM walks every free extent and waits for the device:
    // seconds on a large disk, so off the async threads.
    tokio::task::spawn_blocking(move || trim_blocking(&path)).await.map_err(|source| TrimError::Task { mount_point: mount_point.into(), source })?
}

fn trim_blocking(mount_point: &Path) -> Result<u64, TrimError> {
    // O_DIRECTORY: a mount point is a directory, and opening one must not
    // block or have side effects the way opening a device or FIFO could.
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECTORY.bits())
        .open(mount_point)
        .map_err(|source| TrimError::Open { mount_point: mount_point.into(), source })?;
    let mut range = crate::sys::FstrimRange { start: 0, len: u64::MAX, minlen: 0 };
    match crate::sys::fitrim(dir.as_fd(), &mut range) {
        Ok(()) => Ok(range.len),
        // EOPNOTSUPP: the filesystem knows FITRIM but the device cannot discard.
        // ENOTTY: the filesystem has no FITRIM at all (tmpfs, overlay). Both
        // mean there is nothing to trim, which is not a failure of the volume.
        Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOTTY) => Err(TrimError::NotSupported { mount_point: mount_point.into() }),
        Err(source) => Err(TrimError::Trim { mount_point: mount_point.into(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_mount_point_is_an_open_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = fstrim(&missing).await.unwrap_err();
        assert!(matches!(err, TrimError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains(&missing.display().to_string()), "{err}");
    }

    #[tokio::test]
    async fn a_file_is_not_a_mount_point() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = fstrim(&file).await.unwrap_err();
        match &err {
            TrimError::Open { source, .. } => assert_eq!(source.raw_os_error(), Some(nix::libc::ENOTDIR), "{err}"),
            other => panic!("expected an open error, got {other:?}"),
        }
    }

    #[test]
    fn not_supported_names_the_mount_point() {
        let err = TrimError::NotSupported { mount_point: "/var/lib/buildkit".into() };
        assert_eq!(err.to_string(), "the filesystem at /var/lib/buildkit or its device does not support discard (FITRIM)");
    }
}
