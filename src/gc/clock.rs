//! Retention and the clock. Retention compares record times with the wall
//! clock, and a wall clock that is wrong prunes what it should not: a VM that
//! boots with its clock a month ahead would see every unused record as a month
//! older and prune it at the startup run, before any time daemon corrects it.
//!
//! So retention waits, and never trusts a jump:
//!
//! - until the kernel says the clock is synchronized (`adjtimex`, see
//!   [`crate::sys::clock_synchronized`]) or a bounded delay has passed since the
//!   schedule started (a machine without a time daemon still gets retention);
//! - across a jump: between two passes the wall clock must advance like the
//!   monotonic clock, within a bound. A pass across a larger jump (a step by
//!   NTP, an operator's `date -s`, a restored snapshot) skips retention, and the
//!   next pass measures from the new time.
//!
//! Space targets (keep-bytes, watermarks) never wait: they order records by
//! LRU rank, which a clock offset does not change, and a full disk is worse.
//! [`RetentionClock::assess`] is pure; the caller passes both clocks and the
//! kernel's answer.

use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// Whether a GC pass may apply retention, and why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    Apply,
    /// The clock is not synchronized yet; retention waits at most `wait` from the start.
    Unsynchronized {
        waited: Duration,
        wait: Duration,
    },
    /// The wall clock moved `drift_ms` more (or, negative, less) than the
    /// monotonic clock since the last pass.
    Jumped {
        drift_ms: i64,
    },
}

impl Retention {
    pub fn applies(self) -> bool {
        self == Self::Apply
    }
}

impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Apply => f.write_str("retention applies"),
            Self::Unsynchronized { waited, wait } => {
                write!(f, "retention skipped: the clock is not synchronized yet (waited {}s of at most {}s)", waited.as_secs(), wait.as_secs())
            }
            Self::Jumped { drift_ms } => write!(f, "retention skipped: the wall clock jumped by {drift_ms} ms against the monotonic clock since the last pass"),
        }
    }
}

/// What the clock guard needs from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockSettings {
    /// The longest retention waits for a synchronized clock after the schedule starts.
    pub sync_wait: Duration,
    /// The largest difference between wall-clock and monotonic progress
    /// between two passes that is not a jump.
    pub max_jump: Duration,
}

/// The guard of one GC schedule: when it started, and both clocks at the last pass.
#[derive(Debug, Clone)]
pub struct RetentionClock {
    settings: ClockSettings,
    started: Instant,
    last: (Instant, SystemTime),
}

impl RetentionClock {
    /// A guard whose schedule starts at `mono`/`wall`: a jump before the first pass counts too.
    pub fn new(settings: ClockSettings, mono: Instant, wall: SystemTime) -> Self {
        Self { settings, started: mono, last: (mono, wall) }
    }

    /// Decides for a pass at `mono`/`wall`; `synchronized` is the kernel's
    /// answer (None when it could not be read: treated as not synchronized,
    /// so the bounded delay still applies). Pure, apart from remembering this pass.
    pub fn assess(&mut self, mono: Instant, wall: SystemTime, synchronized: Option<bool>) -> Retention {
        let (last_mono, last_wall) = std::mem::replace(&mut self.last, (mono, wall));
        let mono_ms = millis(mono.saturating_duration_since(last_mono));
        let wall_ms = match wall.duration_since(last_wall) {
            Ok(ahead) => millis(ahead),
            Err(behind) => -millis(behind.duration()),
        };
        let drift_ms = i64::try_from(wall_ms - mono_ms).unwrap_or(i64::MAX);
        if drift_ms.unsigned_abs() > u64::try_from(self.settings.max_jump.as_millis()).unwrap_or(u64::MAX) {
            return Retention::Jumped { drift_ms };
        }
        let waited = mono.saturating_duration_since(self.started);
        if synchronized == Some(true) || waited >= self.settings.sync_wait {
            Retention::Apply
        } else {
            Retention::Unsynchronized { waited, wait: self.settings.sync_wait }
        }
    }
}

fn millis(d: Duration) -> i128 {
    i128::try_from(d.as_millis()).unwrap_or(i128::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: ClockSettings = ClockSettings { sync_wait: Duration::from_secs(300), max_jump: Duration::from_secs(60) };
    const MIN: Duration = Duration::from_secs(60);

    fn start() -> (Instant, SystemTime, RetentionClock) {
        let (mono, wall) = (Instant::now(), SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        (mono, wall, RetentionClock::new(S, mono, wall))
    }

    #[test]
    fn retention_waits_for_a_synchronized_clock_but_only_as_long_as_the_bound() {
        let (mono, wall, mut clock) = start();
        assert_eq!(clock.assess(mono, wall, Some(false)), Retention::Unsynchronized { waited: Duration::ZERO, wait: S.sync_wait });
        assert!(!clock.assess(mono + 2 * MIN, wall + 2 * MIN, None).applies(), "an unreadable state is not synchronized");
        assert!(clock.assess(mono + 3 * MIN, wall + 3 * MIN, Some(true)).applies(), "synchronized: at once");
        let (mono, wall, mut clock) = start();
        assert!(clock.assess(mono + 5 * MIN, wall + 5 * MIN, Some(false)).applies(), "never synchronized: after the bounded delay");
    }

    #[test]
    fn a_pass_across_a_jump_skips_retention_and_the_next_one_measures_from_the_new_time() {
        let (mono, wall, mut clock) = start();
        // A clock a month ahead at boot is stepped back by the time daemon.
        let month = Duration::from_secs(30 * 86_400);
        assert!(clock.assess(mono + MIN, wall + MIN, Some(true)).applies());
        let jumped = clock.assess(mono + 2 * MIN, wall + 2 * MIN - month, Some(true));
        assert!(matches!(jumped, Retention::Jumped { drift_ms } if drift_ms < -2_500_000_000), "{jumped:?}");
        assert!(jumped.to_string().contains("jumped"), "{jumped}");
        assert!(clock.assess(mono + 3 * MIN, wall + 3 * MIN - month, Some(true)).applies(), "the next pass trusts the corrected clock");
        // Forward, too: a restored snapshot or an operator's `date -s`.
        assert!(matches!(clock.assess(mono + 4 * MIN, wall + 4 * MIN + month, Some(true)), Retention::Jumped { drift_ms } if drift_ms > 0));
    }

    #[test]
    fn slewing_and_scheduling_delays_are_not_jumps() {
        let (mono, wall, mut clock) = start();
        // A daemon slewing by 500 ppm, and a pass that runs late: progress still agrees within the bound.
        let day = Duration::from_secs(86_400);
        assert!(clock.assess(mono + day, wall + day + Duration::from_secs(43), Some(true)).applies());
        assert!(clock.assess(mono + day + 59 * MIN, wall + day + 59 * MIN + Duration::from_secs(43) - Duration::from_secs(59), Some(true)).applies());
    }

    #[test]
    fn a_jump_before_the_first_pass_counts() {
        let (mono, wall, mut clock) = start();
        let year = Duration::from_secs(365 * 86_400);
        assert!(matches!(clock.assess(mono + MIN, wall + MIN + year, Some(true)), Retention::Jumped { .. }));
    }
}
