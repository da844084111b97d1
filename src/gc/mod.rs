//! Cache garbage collection.

/// The pure planner: which records to prune, and why.
pub mod planner;
