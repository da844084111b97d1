//! File writes that a crash or power cut never leaves half done, reads of
//! input files that a FIFO, a device or a huge file cannot hang or bloat, and
//! the check that a path from the config or a task is absolute and clean. A
//! leaf module: it uses nothing else from the crate, so config, task and
//! control can all use it.

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Why an input file (config, task, PEM, token, CA bundle) was not read.
/// Each names the file; none quotes its contents.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ReadError {
    /// cannot open {path}: {source}
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// {path} is not a regular file (it is {kind})
    NotRegular { path: PathBuf, kind: &'static str },
    /// {path} is larger than {max_bytes} bytes; refusing to read it
    TooLarge { path: PathBuf, max_bytes: u64 },
    /// cannot read {path}: {source}
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// {path} is not UTF-8 text
    NotUtf8 { path: PathBuf },
}

/// Reads a whole input file of at most `max_bytes`, refusing anything but a
/// regular file before reading a byte of it.
///
/// Opened with O_NONBLOCK, so a FIFO without a writer cannot block the open
/// (for a regular file the flag means nothing); then fstat on the open file,
/// not the path, so what is checked is what is read. The size is checked
/// before reading, and the read itself stops one byte past the cap, in case
/// the file grows meanwhile or reports no size (procfs).
pub fn read_regular_file(path: &Path, max_bytes: u64) -> Result<Vec<u8>, ReadError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        // O_NOCTTY: a terminal named as a config must not become our controlling terminal.
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|source| ReadError::Open { path: path.into(), source })?;
    let meta = file.metadata().map_err(|source| ReadError::Read { path: path.into(), source })?;
    if let Some(kind) = not_regular_kind(&meta.file_type()) {
        return Err(ReadError::NotRegular { path: path.into(), kind });
    }
    if meta.len() > max_bytes {
        return Err(ReadError::TooLarge { path: path.into(), max_bytes });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max_bytes.saturating_add(1)).read_to_end(&mut bytes).map_err(|source| ReadError::Read { path: path.into(), source })?;
    if bytes.len() as u64 > max_bytes {
        return Err(ReadError::TooLarge { path: path.into(), max_bytes });
    }
    Ok(bytes)
}

/// [`read_regular_file`], as UTF-8 text.
pub fn read_regular_text(path: &Path, max_bytes: u64) -> Result<String, ReadError> {
    String::from_utf8(read_regular_file(path, max_bytes)?).map_err(|_| ReadError::NotUtf8 { path: path.into() })
}

/// None for a regular file; else what it is, for the message.
fn not_regular_kind(t: &std::fs::FileType) -> Option<&'static str> {
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a file")
    }
}

/// At most `max_chars` characters of `s`, with `...` when cut: enough of a bad
/// value to recognise it in an error, never a whole file echoed back.
pub fn excerpt(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Writes `contents` to `path` with `mode`: a temp file in the same directory,
/// fsynced, renamed over `path`, then the directory fsynced. A reader sees the
/// old file or the new one, never a mix; the mode is set before any byte lands.
///
/// The temp file has a random name and is created `O_EXCL | O_NOFOLLOW`, so a
/// file or link planted at a guessed name fails the write instead of taking
/// the key; and the directory must be writable by its owner alone, so nobody
/// else can plant one or swap the file before the rename.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    check_private_dir(dir)?;
    let tmp = dir.join(temp_name(name, rand::random()));
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC).mode(mode).open(&tmp)?;
    let result = (|| {
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

/// `.<name>.tmp-<pid>-<random>`: unique per write, and not guessable ahead of it. Pure.
pub fn temp_name(name: &std::ffi::OsStr, random: u64) -> std::ffi::OsString {
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".tmp-{}-{random:016x}", std::process::id()));
    tmp
}

/// A directory the agent writes private files into must not be writable by
/// group or others (the state dir is 0700).
fn check_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir)?;
    if meta.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} may be written by group or others (mode {:o}); refusing to write a private file there", dir.display(), meta.mode() & 0o7777),
        ));
    }
    Ok(())
}

/// Creates `path` and any missing parents, each new one 0700 (an existing
/// directory keeps its mode).
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}

/// Why a private directory could not be made ready. Each names the path.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum PrivateDirError {
    /// cannot create {path} or set its mode: {source}
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// {path} is not a directory (a symbolic link or a file stands there); refusing to write through it
    NotADirectory { path: PathBuf },
}

/// Makes `path` a directory only its owner can use: created 0700 with any
/// missing parents, an existing one set to exactly 0700. A symbolic link
/// there is refused even if it points at a directory: it could send private
/// files anywhere.
pub fn ensure_private_dir(path: &Path) -> Result<(), PrivateDirError> {
    use std::os::unix::fs::PermissionsExt;
    let create = |source| PrivateDirError::Create { path: path.to_path_buf(), source };
    create_private_dir(path).map_err(create)?;
    let meta = std::fs::symlink_metadata(path).map_err(create)?;
    if !meta.is_dir() {
        return Err(PrivateDirError::NotADirectory { path: path.to_path_buf() });
    }
    // An existing dir keeps its old mode through create(); set it exactly.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(create)
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
    fn a_regular_file_is_read_whole_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "0123456789").unwrap();
        assert_eq!(read_regular_file(&path, 10).unwrap(), b"0123456789");
        assert_eq!(read_regular_text(&path, 64).unwrap(), "0123456789");
        let err = read_regular_file(&path, 9).unwrap_err();
        assert!(matches!(err, ReadError::TooLarge { max_bytes: 9, .. }), "{err}");
        assert!(err.to_string().contains("config.toml"), "{err}");
    }

    #[test]
    fn fifos_devices_and_directories_are_refused_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // A FIFO with no writer: a blocking open would never return.
        let cases: &[(&Path, &str)] = &[(&fifo, "a FIFO"), (Path::new("/dev/zero"), "a character device"), (dir.path(), "a directory")];
        for &(path, want) in cases {
            match read_regular_file(path, 1 << 20) {
                Err(ReadError::NotRegular { path: p, kind }) => {
                    assert_eq!((p.as_path(), kind), (path, want));
                }
                other => panic!("{}: {other:?}", path.display()),
            }
        }
        let err = read_regular_file(&dir.path().join("missing"), 10).unwrap_err();
        assert!(matches!(err, ReadError::Open { .. }) && err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn a_file_without_a_size_is_still_capped_while_reading() {
        // procfs reports size 0 for files that hold more.
        let err = read_regular_file(Path::new("/proc/self/status"), 16).unwrap_err();
        assert!(matches!(err, ReadError::TooLarge { max_bytes: 16, .. }), "{err}");
    }

    #[test]
    fn invalid_utf8_is_named_not_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert_eq!(read_regular_text(&path, 10).unwrap_err().to_string(), format!("{} is not UTF-8 text", path.display()));
    }

    #[test]
    fn excerpts_cut_on_characters() {
        assert_eq!(excerpt("short", 10), "short");
        assert_eq!(excerpt("0123456789abc", 10), "0123456789...");
        assert_eq!(excerpt("ééééé", 2), "éé...");
        assert_eq!(excerpt("", 0), "");
    }

    #[test]
    fn temp_names_differ_per_write() {
        assert_ne!(temp_name("key.pem".as_ref(), 1), temp_name("key.pem".as_ref(), 2));
        assert!(temp_name("key.pem".as_ref(), 1).to_string_lossy().starts_with(".key.pem.tmp-"));
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = write_atomic(&dir.path().join("key.pem"), b"x", 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_missing_directory_is_an_error_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_atomic(&dir.path().join("no/such/file"), b"x", 0o644).is_err());
    }
}
