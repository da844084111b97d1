//! Wall-clock timestamps for what the agent reports.

/// Unix milliseconds now, for report timestamps.
pub fn unix_time_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or_default()
}
