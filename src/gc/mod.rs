//! Cache garbage collection.

/// The pure planner: which records to prune, and why.
pub mod planner;
/// One GC run against the live engine: plan, prune in batches, report.
pub mod executor;
/// When GC runs: startup, interval, pressure; and what it reports.
pub mod schedule;
