//! The cache volume. For now: filesystem figures for the health stream.
//! Device resolution, formatting, mounting and unmounting build on this module.

pub mod stats;
