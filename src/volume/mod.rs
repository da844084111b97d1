//! The cache volume: filesystem figures for the health stream, and the pieces
//! the volume manager is built from (the blank-device probe and the
//! format-or-mount decision).

pub mod device;
pub mod format;
pub mod manager;
pub mod holders;
pub mod mountinfo;
pub mod signature;
pub mod stats;
pub mod trim;
