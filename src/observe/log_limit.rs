//! A pure limiter for log lines that can repeat without bound (a control plane
//! re-sending a bad task in a loop, user space writing into /dev/kmsg): at most
//! `burst` lines per `window` for each kind of line, then silence, counted.
//! The count is said later, on the next line of that kind that is let through
//! or by [`LogLimiter::flush`] once the window is over, so an operator reads
//! "N more suppressed" instead of losing them or drowning in them.
//!
//! Keys are `&'static str` on purpose: one per kind of line, a fixed set, so
//! the limiter's memory cannot grow with its input. It never logs or reads a
//! clock itself: the caller passes `now` and writes the lines.

use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed_before` lines of its kind were dropped since the
    /// last one logged (say so in the line when it is not 0).
    Log { suppressed_before: u64 },
    /// Drop it; it is counted.
    Suppress,
}

#[derive(Debug)]
struct KindWindow {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

/// At most `burst` lines per `window` per kind.
#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    kinds: HashMap<&'static str, KindWindow>,
}

impl LogLimiter {
    pub fn new(burst: u32, window: Duration) -> Self {
        Self { burst, window, kinds: HashMap::new() }
    }

    /// Whether a line of `kind` may be logged at `now`.
    pub fn check(&mut self, kind: &'static str, now: Instant) -> Verdict {
        let window = self.window;
        let entry = self.kinds.entry(kind).or_insert(KindWindow { started: now, logged: 0, suppressed: 0 });
        if now.saturating_duration_since(entry.started) >= window {
            entry.started = now;
            entry.logged = 0;
        }
        if entry.logged < self.burst {
            entry.logged += 1;
            Verdict::Log { suppressed_before: std::mem::take(&mut entry.suppressed) }
        } else {
            entry.suppressed += 1;
            Verdict::Suppress
        }
    }

    /// The kinds whose window is over with lines still unreported, and how
    /// many: for a periodic "N suppressed" line after a flood ends. Each count
    /// is returned once.
    pub fn flush(&mut self, now: Instant) -> Vec<(&'static str, u64)> {
        let mut out: Vec<(&'static str, u64)> = self
            .kinds
            .iter_mut()
            .filter(|(_, w)| w.suppressed > 0 && now.saturating_duration_since(w.started) >= self.window)
            .map(|(kind, w)| (*kind, std::mem::take(&mut w.suppressed)))
            .collect();
        out.sort_unstable();
        out
    }

    /// The window, for the "suppressed in the last ..." wording.
    pub fn window(&self) -> Duration {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn burst_then_suppressed_then_counted_on_the_next_window() {
        let t0 = Instant::now();
        let mut limiter = LogLimiter::new(3, 10 * SEC);
        let verdicts: Vec<Verdict> = (0..5).map(|_| limiter.check("rejected", t0)).collect();
        let log0 = Verdict::Log { suppressed_before: 0 };
        assert_eq!(verdicts, vec![log0, log0, log0, Verdict::Suppress, Verdict::Suppress]);
        // Still inside the window: still quiet.
        assert_eq!(limiter.check("rejected", t0 + 9 * SEC), Verdict::Suppress);
        // A new window: the first line carries the count, once.
        assert_eq!(limiter.check("rejected", t0 + 10 * SEC), Verdict::Log { suppressed_before: 3 });
        assert_eq!(limiter.check("rejected", t0 + 10 * SEC), log0);
    }

    #[test]
    fn kinds_are_limited_apart() {
        let t0 = Instant::now();
        let mut limiter = LogLimiter::new(1, SEC);
        assert_eq!(limiter.check("a", t0), Verdict::Log { suppressed_before: 0 });
        assert_eq!(limiter.check("a", t0), Verdict::Suppress);
        assert_eq!(limiter.check("b", t0), Verdict::Log { suppressed_before: 0 });
    }

    #[test]
    fn flush_reports_each_count_once_and_only_after_the_window() {
        let t0 = Instant::now();
        let mut limiter = LogLimiter::new(1, 10 * SEC);
        for _ in 0..100_001 {
            limiter.check("rejected", t0);
        }
        limiter.check("quiet", t0);
        assert_eq!(limiter.flush(t0 + 5 * SEC), vec![], "the window is not over");
        assert_eq!(limiter.flush(t0 + 10 * SEC), vec![("rejected", 100_000)]);
        assert_eq!(limiter.flush(t0 + 20 * SEC), vec![]);
        // Flushed lines are not counted again on the next logged line.
        assert_eq!(limiter.check("rejected", t0 + 20 * SEC), Verdict::Log { suppressed_before: 0 });
    }

    #[test]
    fn a_zero_burst_suppresses_everything_and_still_counts() {
        let t0 = Instant::now();
        let mut limiter = LogLimiter::new(0, SEC);
        assert_eq!(limiter.check("a", t0), Verdict::Suppress);
        assert_eq!(limiter.flush(t0 + SEC), vec![("a", 1)]);
    }

    proptest::proptest! {
        /// Over any sequence of lines, logged + suppressed (counted) = offered,
        /// and no window lets more than `burst` lines of one kind through.
        #[test]
        fn every_line_is_logged_or_counted_and_windows_hold(steps in proptest::collection::vec((0u64..3000, proptest::bool::ANY), 1..300), burst in 0u32..5) {
            let t0 = Instant::now();
            let mut limiter = LogLimiter::new(burst, Duration::from_millis(1000));
            let (mut now_ms, mut logged, mut reported) = (0u64, 0u64, 0u64);
            let mut logged_at: Vec<u64> = vec![];
            for (advance_ms, flush) in &steps {
                now_ms += advance_ms / 10;
                let now = t0 + Duration::from_millis(now_ms);
                match limiter.check("k", now) {
                    Verdict::Log { suppressed_before } => {
                        logged += 1;
                        reported += suppressed_before;
                        logged_at.push(now_ms);
                    }
                    Verdict::Suppress => {}
                }
                if *flush {
                    reported += limiter.flush(now).iter().map(|(_, n)| n).sum::<u64>();
                }
            }
            reported += limiter.flush(t0 + Duration::from_millis(now_ms + 1000)).iter().map(|(_, n)| n).sum::<u64>();
            proptest::prop_assert_eq!(logged + reported, steps.len() as u64);
            for (i, at) in logged_at.iter().enumerate() {
                let in_window = logged_at[i..].iter().take_while(|t| **t < at + 1000).count();
                // Windows start at a logged line or later, so any 1 s span holds at most 2 * burst.
                proptest::prop_assert!(in_window <= 2 * burst as usize);
            }
        }
    }
}
