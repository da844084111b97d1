//! Cache garbage collection.

/// BuildKit's own GC rules: a looser backstop behind the agent's.
pub mod backstop;
/// Retention and the clock: wait for a synchronized clock, never trust a jump.
pub mod clock;
/// One GC run against the live engine: plan, prune in batches, report.
pub mod executor;
/// The pure planner: which records to prune, and why.
pub mod planner;
/// When GC runs: startup, interval, pressure; and what it reports.
pub mod schedule;

use std::time::Duration;

/// The agent's cache GC, before a task's overrides.
#[derive(Debug, Clone)]
pub struct GcSettings {
    pub enabled: bool,
    pub retention: Duration,
    pub min_age: Duration,
    pub interval: Duration,
    /// How often the free space is checked for pressure between runs.
    pub pressure_check: Duration,
    pub free_bytes_start_below_percent: u8,
    pub free_bytes_stop_at_percent: u8,
    pub free_inodes_start_below_percent: u8,
    pub free_inodes_stop_at_percent: u8,
    pub batch: usize,
    /// Retention waits for a synchronized clock at most this long after the GC schedule starts.
    pub clock_sync_wait: Duration,
    /// A pass whose wall-clock progress differs from the monotonic one by more skips retention.
    pub clock_jump_max: Duration,
}
