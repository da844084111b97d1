//! Cache garbage collection.

/// BuildKit's own GC rules: a looser backstop behind the agent's.
pub mod backstop;
/// One GC run against the live engine: plan, prune in batches, report.
pub mod executor;
/// The pure planner: which records to prune, and why.
pub mod planner;
/// When GC runs: startup, interval, pressure; and what it reports.
pub mod schedule;
