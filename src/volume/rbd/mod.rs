//! Ceph RBD cache volumes: the image's owner lock, the credentials the Ceph
//! tools read, and the mapper that turns the image into a block device
//! (krbd, rbd-nbd, or rbd-fuse plus a loop device).

/// The keyring and ceph.conf written for one mount, and their removal.
pub mod credentials;

use std::path::PathBuf;

/// Which mapper turns an image into a block device (`volume.rbd_mapper`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MapperChoice {
    /// The first of krbd, nbd, fuse that this machine offers.
    #[default]
    Auto,
    Krbd,
    Nbd,
    Fuse,
}

/// What RBD volumes need from the agent's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSettings {
    pub mapper: MapperChoice,
    /// Who this agent is to other builders: the tag on the image locks it
    /// takes (`volume.owner_id`, by default the host's /etc/machine-id).
    pub owner_id: String,
    /// Per-mount keyrings, confs and fuse mount points (`<state_dir>/rbd`).
    pub dir: PathBuf,
}
