//! The cache volume: the manager that prepares and releases each task mount
//! ([`manager`]), the pieces it is built from (device wait, blank probe, mkfs
//! and mount options, mountinfo, holders, fstrim), and the filesystem figures
//! the health stream carries.

pub mod backing;
pub mod bounded;
pub mod device;
pub mod file_modes;
pub mod format;
pub mod health;
pub mod holders;
pub mod intent;
pub mod manager;
pub mod mountinfo;
pub mod nofollow;
pub mod rbd;
pub mod reflink;
pub mod signature;
pub mod stats;
pub mod tool;
pub mod trim;

/// FNV-1a, 64 bits: short stable names from ids, fixed across releases
/// (std's hasher may change); never for security.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
