//! Exponential backoff with full jitter: the one retry schedule every loop uses.
//!
//! Attempt n waits a uniformly random time in `[0, min(max, initial * 2^n)]`
//! ("full jitter", so a fleet of agents that lost the control plane at the same
//! moment does not reconnect in lockstep). The RNG is a parameter so tests can
//! fix it; delays are plain `Duration`s so callers sleep with tokio's clock.

use rand::Rng;
use std::time::Duration;

/// The first retry comes fast: a blip should not cost a second.
pub const DEFAULT_INITIAL: Duration = Duration::from_millis(250);
/// The cap keeps a recovered control plane from waiting long for the fleet to come back.
pub const DEFAULT_MAX: Duration = Duration::from_secs(30);

/// Why a backoff could not be built.
#[derive(Debug, Clone, PartialEq, Eq, displaydoc::Display, thiserror::Error)]
pub enum BackoffError {
    /// initial delay must be above zero
    ZeroInitial,
    /// initial delay {initial:?} is above the cap {max:?}
    InitialAboveMax { initial: Duration, max: Duration },
}

/// A validated schedule; `next_delay` advances it, `reset` starts over after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: DEFAULT_INITIAL, max: DEFAULT_MAX, attempt: 0 }
    }
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Result<Self, BackoffError> {
        if initial.is_zero() {
            return Err(BackoffError::ZeroInitial);
        }
        if initial > max {
            return Err(BackoffError::InitialAboveMax { initial, max });
        }
        Ok(Self { initial, max, attempt: 0 })
    }

    /// The ceiling of the current attempt: `min(max, initial * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        // 2^31 * anything is past any sane cap; saturate instead of overflowing.
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt, drawn from `[0, ceiling]`.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }

    /// How many delays have been handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn rejects_nonsense() {
        assert_eq!(Backoff::new(Duration::ZERO, Duration::from_secs(1)).unwrap_err(), BackoffError::ZeroInitial);
        assert!(matches!(Backoff::new(Duration::from_secs(2), Duration::from_secs(1)), Err(BackoffError::InitialAboveMax { .. })));
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30)).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let mut ceilings = vec![];
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay(&mut rng);
        }
        assert_eq!(ceilings, vec![500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(500));
    }

    proptest! {
        #[test]
        fn delay_is_never_above_the_ceiling_or_the_cap(
            initial_ms in 1u64..10_000, extra_ms in 0u64..100_000, attempts in 0usize..200, seed: u64
        ) {
            let max = Duration::from_millis(initial_ms + extra_ms);
            let mut b = Backoff::new(Duration::from_millis(initial_ms), max).unwrap();
            let mut rng = StdRng::seed_from_u64(seed);
            for _ in 0..attempts {
                let ceiling = b.ceiling();
                let d = b.next_delay(&mut rng);
                prop_assert!(d <= ceiling);
                prop_assert!(d <= max);
            }
        }
    }
}
