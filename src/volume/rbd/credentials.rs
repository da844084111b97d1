//! The keyring and ceph.conf the Ceph tools (`rbd`, `rbd-nbd`, `rbd-fuse`)
//! read for one mount, in a private directory of its own under `<state_dir>/rbd`.
//!
//! Rendering is pure; writing reuses [`crate::fsutil`]'s private directory and
//! atomic write, so a crash leaves the old file or the new one, and nothing is
//! ever written through a symbolic link planted at the directory or a file.
//! The conf points the tools' admin sockets and logs into the same directory,
//! so removing it leaves nothing of the mount behind.

use crate::fsutil::{ensure_private_dir, write_atomic, PrivateDirError};
use crate::secret::Secret;
use crate::task::RbdImage;
use std::io;
use std::path::{Path, PathBuf};

/// The keyring holds the key: root only.
const KEYRING_MODE: u32 = 0o600;
/// The conf names the keyring and may carry the cluster's fsid: root only too.
const CONF_MODE: u32 = 0o600;
const KEYRING_NAME: &str = "keyring";
const CONF_NAME: &str = "ceph.conf";
/// A mount's name is one path component and part of socket paths (108 bytes in all).
const MAX_NAME_BYTES: usize = 64;

/// The files the Ceph tools read for one mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephFiles {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub keyring: PathBuf,
}

/// Why a mount's Ceph files could not be written. Each names the path.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum CredentialsError {
    /// {name:?} is not a safe mount name: expected 1..=64 bytes of [A-Za-z0-9._-], not starting with '.' or '-'
    BadName { name: String },
    /// {path} holds a character Ceph's conf syntax would misread (whitespace, '#', ';', '$', '=', quotes or a backslash)
    UnsafePath { path: PathBuf },
    /// cannot prepare the private directory: {0}
    Dir(#[from] PrivateDirError),
    /// {path} is a symbolic link or not a regular file; refusing to replace it
    NotARegularFile { path: PathBuf },
    /// cannot write {path}: {source}
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Bounds on the client's waits for monitors, unless the task sets them.
/// OSD operations stay unbounded (Ceph's default): a slow OSD must stall the
/// cache's I/O, not fail it and abort the filesystem's journal.
const CLIENT_TIMEOUTS: [(&str, &str); 2] = [("client_mount_timeout", "15"), ("rados_mon_op_timeout", "15")];

/// A keyring with the one client's key. Pure.
pub fn render_keyring(client_id: &str, key: &Secret) -> String {
    format!("[client.{client_id}]\n\tkey = {}\n", key.expose())
}

/// The ceph.conf for one mount: the image's monitors and validated settings,
/// the keyring, and admin sockets and logs kept in `dir`. Pure.
pub fn render_conf(image: &RbdImage, dir: &Path, keyring: &Path) -> String {
    let mut conf = String::from("# Written by machine-agent for one mount; replaced on every prepare.\n[global]\n");
    conf.push_str(&format!("mon_host = {}\n", image.monitors.join(",")));
    conf.push_str(&format!("keyring = {}\n", keyring.display()));
    for (key, value) in &image.conf {
        conf.push_str(&format!("{key} = {value}\n"));
    }
    // The tools give up on unreachable monitors after this (Ceph's default is
    // 300 s), so a prepare with the monitors down fails and retries instead of hanging.
    for (key, value) in CLIENT_TIMEOUTS {
        if !image.conf.iter().any(|(set, _)| set == key) {
            conf.push_str(&format!("{key} = {value}\n"));
        }
    }
    // Logs and admin sockets where the mount's other files are: the host's
    // /var/run/ceph and /var/log/ceph may not exist, and removal finds them here.
    // $cluster, $name, $pid and $cctid are Ceph's own expansions.
    conf.push_str("[client]\n");
    conf.push_str(&format!("admin_socket = {}/$cluster-$name.$pid.$cctid.asok\n", dir.display()));
    conf.push_str(&format!("log_file = {}/$cluster-$name.$pid.log\n", dir.display()));
    conf
}

/// Writes the keyring and conf of mount `name` into `<rbd_dir>/<name>`
/// (both directories 0700, the files 0600, each replaced atomically).
pub fn write_credentials(rbd_dir: &Path, name: &str, image: &RbdImage) -> Result<CephFiles, CredentialsError> {
    if !is_mount_name(name) {
        return Err(CredentialsError::BadName { name: crate::fsutil::excerpt(name, 64) });
    }
    let dir = rbd_dir.join(name);
    // The paths land unquoted in the conf; the state dir is the operator's, still checked.
    if !is_conf_safe_path(&dir) {
        return Err(CredentialsError::UnsafePath { path: dir });
    }
    ensure_private_dir(rbd_dir)?;
    ensure_private_dir(&dir)?;
    let files = CephFiles { conf: dir.join(CONF_NAME), keyring: dir.join(KEYRING_NAME), dir };
    write_file(&files.keyring, render_keyring(&image.client_id, &image.key).as_bytes(), KEYRING_MODE)?;
    write_file(&files.conf, render_conf(image, &files.dir, &files.keyring).as_bytes(), CONF_MODE)?;
    Ok(files)
}

/// Removes a mount's keyring, conf, the admin sockets and logs the tools
/// left, and its directory. Files already gone are not an error; anything
/// else left in the directory makes its removal fail.
pub fn remove_credentials(files: &CephFiles) -> io::Result<()> {
    let ignore_missing = |r: io::Result<()>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    ignore_missing(std::fs::remove_file(&files.keyring))?;
    ignore_missing(std::fs::remove_file(&files.conf))?;
    let entries = match std::fs::read_dir(&files.dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "asok" || ext == "log") {
            ignore_missing(std::fs::remove_file(&path))?;
        }
    }
    ignore_missing(std::fs::remove_dir(&files.dir))
}

/// One path component, safe in a file name, a socket path and a conf. Pure.
fn is_mount_name(name: &str) -> bool {
    (1..=MAX_NAME_BYTES).contains(&name.len()) && !name.starts_with(['.', '-']) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
}

/// Nothing Ceph's conf parser would read as a comment, an expansion, a quote
/// or the end of a value. Pure.
fn is_conf_safe_path(path: &Path) -> bool {
    path.to_str().is_some_and(|s| !s.chars().any(|c| c.is_whitespace() || c.is_control() || "#;$=\"'\\[]".contains(c)))
}

/// A file may be replaced only if it is absent or a regular file: a link
/// planted there is refused, not silently swapped.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CredentialsError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_file() => return Err(CredentialsError::NotARegularFile { path: path.to_path_buf() }),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(CredentialsError::Write { path: path.to_path_buf(), source }),
    }
    write_atomic(path, contents, mode).map_err(|source| CredentialsError::Write { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const KEY: &str = "AQBMd0BlAAAAABAAb9Ih5QBoRGXmqrxl0QWUZQ==";

    fn image() -> RbdImage {
        RbdImage {
            pool: "builds".into(),
            namespace: None,
            image: "cache".into(),
            client_id: "buildkit".into(),
            key: Secret::new(KEY),
            monitors: vec!["10.0.0.1:6789".into(), "[v2:10.0.0.2:3300,v1:10.0.0.2:6789]".into()],
            conf: vec![("rbd_cache".into(), "false".into())],
            create_size_bytes: None,
            take_over_from: None,
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// A scratch dir whose own mode lets write_atomic's private-dir check pass.
    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        (tmp, root)
    }

    #[test]
    fn the_keyring_and_conf_say_what_the_tools_need() {
        assert_eq!(render_keyring("buildkit", &Secret::new(KEY)), format!("[client.buildkit]\n\tkey = {KEY}\n"));
        let conf = render_conf(&image(), Path::new("/s/rbd/m0"), Path::new("/s/rbd/m0/keyring"));
        assert_eq!(
            conf,
            "# Written by machine-agent for one mount; replaced on every prepare.\n[global]\n\
             mon_host = 10.0.0.1:6789,[v2:10.0.0.2:3300,v1:10.0.0.2:6789]\nkeyring = /s/rbd/m0/keyring\nrbd_cache = false\n\
             client_mount_timeout = 15\nrados_mon_op_timeout = 15\n\
             [client]\nadmin_socket = /s/rbd/m0/$cluster-$name.$pid.$cctid.asok\nlog_file = /s/rbd/m0/$cluster-$name.$pid.log\n"
        );
        assert!(!conf.contains(KEY));
    }

    #[test]
    fn writes_private_files_and_replaces_them_atomically() {
        let (_tmp, root) = scratch();
        let rbd_dir = root.join("rbd");
        let files = write_credentials(&rbd_dir, "mount-0", &image()).unwrap();
        assert_eq!(files.dir, rbd_dir.join("mount-0"));
        assert_eq!((mode(&rbd_dir), mode(&files.dir), mode(&files.keyring), mode(&files.conf)), (0o700, 0o700, 0o600, 0o600));
        assert_eq!(std::fs::read_to_string(&files.keyring).unwrap(), render_keyring("buildkit", &Secret::new(KEY)));
        assert_eq!(std::fs::read_to_string(&files.conf).unwrap(), render_conf(&image(), &files.dir, &files.keyring));

        // A second write replaces both, fixes a loosened mode, and leaves no temp file.
        std::fs::set_permissions(&files.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&files.keyring, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut other = image();
        other.client_id = "other".into();
        let again = write_credentials(&rbd_dir, "mount-0", &other).unwrap();
        assert_eq!(again, files);
        assert!(std::fs::read_to_string(&files.keyring).unwrap().starts_with("[client.other]"));
        assert_eq!((mode(&files.dir), mode(&files.keyring)), (0o700, 0o600));
        assert_eq!(names(&files.dir), ["ceph.conf", "keyring"]);
    }

    #[test]
    fn a_symlink_at_the_dir_or_a_file_is_refused_and_nothing_is_written_through_it() {
        let (_tmp, root) = scratch();
        let outside = root.join("outside");
        std::fs::create_dir(&outside).unwrap();
        let rbd_dir = root.join("rbd");
        std::fs::create_dir(&rbd_dir).unwrap();
        std::os::unix::fs::symlink(&outside, rbd_dir.join("m0")).unwrap();
        let err = write_credentials(&rbd_dir, "m0", &image()).unwrap_err();
        assert!(matches!(err, CredentialsError::Dir(PrivateDirError::NotADirectory { .. })), "{err}");
        assert!(err.to_string().contains("m0"), "{err}");

        let linked_rbd = root.join("linked-rbd");
        std::os::unix::fs::symlink(&outside, &linked_rbd).unwrap();
        assert!(write_credentials(&linked_rbd, "m1", &image()).is_err());

        let dir = rbd_dir.join("m2");
        std::fs::create_dir(&dir).unwrap();
        let target = outside.join("stolen");
        std::os::unix::fs::symlink(&target, dir.join("keyring")).unwrap();
        let err = write_credentials(&rbd_dir, "m2", &image()).unwrap_err();
        assert!(matches!(&err, CredentialsError::NotARegularFile { path } if *path == dir.join("keyring")), "{err}");
        assert!(!target.exists());
        assert!(names(&outside).is_empty(), "nothing written through a link");
        assert!(!err.to_string().contains(KEY));
    }

    #[test]
    fn bad_names_and_unsafe_dirs_are_refused_before_anything_is_made() {
        let (_tmp, root) = scratch();
        for name in ["", ".", "..", "a/b", "-x", ".hidden", "a b", &"a".repeat(65)] {
            assert!(matches!(write_credentials(&root.join("rbd"), name, &image()), Err(CredentialsError::BadName { .. })), "{name:?}");
        }
        for dir in ["state dir", "state#1", "st$ate"] {
            assert!(matches!(write_credentials(&root.join(dir), "m0", &image()), Err(CredentialsError::UnsafePath { .. })), "{dir}");
        }
        assert!(names(&root).is_empty());
    }

    #[test]
    fn remove_leaves_nothing_and_is_idempotent() {
        let (_tmp, root) = scratch();
        let rbd_dir = root.join("rbd");
        let files = write_credentials(&rbd_dir, "m0", &image()).unwrap();
        std::fs::write(files.dir.join("ceph-client.buildkit.42.94.asok"), "").unwrap();
        std::fs::write(files.dir.join("ceph-client.buildkit.42.log"), "log").unwrap();
        remove_credentials(&files).unwrap();
        assert!(!files.dir.exists());
        assert!(names(&rbd_dir).is_empty());
        remove_credentials(&files).unwrap();

        // Something the agent did not put there stops the removal rather than being deleted.
        let files = write_credentials(&rbd_dir, "m0", &image()).unwrap();
        std::fs::write(files.dir.join("unexpected"), "").unwrap();
        assert!(remove_credentials(&files).is_err());
        assert_eq!(names(&files.dir), ["unexpected"]);
    }
}
