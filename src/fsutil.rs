//! File writes that a crash or power cut never leaves half done, and the check
//! that a path from the config or a task is absolute and clean. A leaf module:
//! it uses nothing else from the crate, so config and task can both use it.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path};

/// Writes `contents` to `path` with `mode`: a temp file in the same directory,
/// fsynced, renamed over `path`, then the directory fsynced. A reader sees the
/// old file or the new one, never a mix; the mode is set before any byte lands.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        // `mode` above is filtered by the umask; set it exactly.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates `path` and any missing parents, each new one 0700 (an existing
/// directory keeps its mode).
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}

/// An absolute path without `.`, `..` or empty components.
pub fn check_clean_absolute(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!("expected an absolute path, got {:?}", path.display().to_string()));
    }
    let s = path.as_os_str().as_encoded_bytes();
    let has_dot_parts = path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || s.windows(2).any(|w| w == b"//")
        || s.split(|&b| b == b'/').any(|part| part == b"." || part == b"..");
    if has_dot_parts {
        return Err(format!("expected a normalized path without '.', '..' or '//', got {:?}", path.display().to_string()));
    }
    if s.contains(&0) {
        return Err("path contains a NUL byte".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_the_file_with_the_exact_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, "old").unwrap();
        write_atomic(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("key.pem")]);
    }

    #[test]
    fn a_missing_directory_is_an_error_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_atomic(&dir.path().join("no/such/file"), b"x", 0o644).is_err());
    }
}
