//! PLACEHOLDER: replaced by the credentials writer on branch rbdtask.

use crate::task::RbdImage;
use std::path::{Path, PathBuf};

/// The files the Ceph tools read for one mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephFiles {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub keyring: PathBuf,
}

#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum CredentialsError {
    /// cannot write {path}: {source}
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub fn write_credentials(rbd_dir: &Path, name: &str, image: &RbdImage) -> Result<CephFiles, CredentialsError> {
    let dir = rbd_dir.join(name);
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CredentialsError::Write { path, source }
    };
    crate::fsutil::create_private_dir(rbd_dir).map_err(err(rbd_dir))?;
    crate::fsutil::create_private_dir(&dir).map_err(err(&dir))?;
    let (conf, keyring) = (dir.join("ceph.conf"), dir.join("keyring"));
    let key = format!("[client.{}]\n\tkey = {}\n", image.client_id, image.key.expose());
    crate::fsutil::write_atomic(&keyring, key.as_bytes(), 0o600).map_err(err(&keyring))?;
    let text = format!(
        "[global]\nmon_host = {}\nkeyring = {}\nclient_mount_timeout = 10\nrados_mon_op_timeout = 10\nrados_osd_op_timeout = 30\n[client]\nadmin_socket = {}/$cluster-$name.$pid.$cctid.asok\nlog_file = {}/$cluster-$name.$pid.log\n",
        image.monitors.join(","),
        keyring.display(),
        dir.display(),
        dir.display()
    );
    crate::fsutil::write_atomic(&conf, text.as_bytes(), 0o600).map_err(err(&conf))?;
    Ok(CephFiles { dir, conf, keyring })
}

pub fn remove_credentials(files: &CephFiles) -> std::io::Result<()> {
    std::fs::remove_file(&files.keyring)?;
    std::fs::remove_file(&files.conf)?;
    std::fs::remove_dir(&files.dir)
}
