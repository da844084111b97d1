//! Free and total bytes and inodes of a mounted filesystem, read with statvfs(2):
//! no subprocess, cheap enough to call every second.

use std::path::{Path, PathBuf};

/// One filesystem's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct FsStats {
    pub total_bytes: u64,
    /// Available to unprivileged writers (f_bavail): what a build step can use.
    pub free_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

/// Why a filesystem could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot statvfs {}: {source}", path.display())]
pub struct StatsError {
    pub path: PathBuf,
    #[source]
    pub source: nix::Error,
}

/// Reads the figures of the filesystem holding `path`.
pub fn read_fs_stats(path: &Path) -> Result<FsStats, StatsError> {
    let s = nix::sys::statvfs::statvfs(path).map_err(|source| StatsError { path: path.into(), source })?;
    let frsize = s.fragment_size();
    Ok(FsStats {
        total_bytes: s.blocks().saturating_mul(frsize),
        free_bytes: s.blocks_available().saturating_mul(frsize),
        total_inodes: s.files(),
        free_inodes: s.files_available(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_real_directory_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = read_fs_stats(dir.path()).unwrap();
        assert!(s.total_bytes > 0 && s.free_bytes <= s.total_bytes);
        let err = read_fs_stats(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
