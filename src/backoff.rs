//! Exponential backoff with full jitter: the one retry schedule every loop
//! that calls something remote uses; and [`PollGaps`] with [`poll_until`], the
//! one schedule for polling state on this machine.
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

    /// The delay after an error that retrying soon will not fix (a refused
    /// credential, a missing method): drawn from `[max / 2, max]`, and the
    /// schedule stays at the cap until a reset. Still jittered, over half the
    /// window, so a fleet refused at once does not come back in lockstep.
    pub fn next_delay_at_cap(&mut self, rng: &mut impl Rng) -> Duration {
        while self.ceiling() < self.max {
            self.attempt = self.attempt.saturating_add(1);
        }
        self.attempt = self.attempt.saturating_add(1);
        let max = u64::try_from(self.max.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(max / 2..=max))
    }

    /// How many delays have been handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The gaps between looks at state on this machine (a device node, a socket,
/// a busy mount): doubling from `min` to `max`, exact. No jitter: the thing
/// polled is local, so there is no fleet to spread out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollGaps {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl PollGaps {
    /// `min`, `2 min`, `4 min`... up to `max`.
    pub const fn doubling(min: Duration, max: Duration) -> Self {
        Self { min, max, next: min }
    }

    /// The same gap every time.
    pub const fn fixed(gap: Duration) -> Self {
        Self::doubling(gap, gap)
    }

    /// The gap to wait now; the next is twice as long, up to the cap.
    pub fn next_gap(&mut self) -> Duration {
        let gap = self.next;
        self.next = gap.saturating_mul(2).min(self.max);
        gap
    }

    /// Starts over from `min`: what is polled just moved.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Calls `look` until it finds something (`Ok(Some)`), errs, or `timeout` has
/// passed, waiting `gaps` between looks; the last look is at the deadline.
/// `Ok(None)` means the deadline came first.
pub async fn poll_until<T, E>(mut gaps: PollGaps, timeout: Duration, mut look: impl FnMut() -> Result<Option<T>, E>) -> Result<Option<T>, E> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(found) = look()? {
            return Ok(Some(found));
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(gaps.next_gap().min(deadline - now)).await;
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

    #[test]
    fn a_delay_at_the_cap_is_in_its_upper_half_and_the_schedule_stays_there() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(2)).unwrap();
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..100 {
            let delay = b.next_delay_at_cap(&mut rng);
            assert!((Duration::from_secs(1)..=Duration::from_secs(2)).contains(&delay), "{delay:?}");
            assert_eq!(b.ceiling(), Duration::from_secs(2));
        }
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(200));
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

    #[tokio::test(start_paused = true)]
    async fn polling_backs_off_from_50ms_to_1s_and_stops_at_the_deadline() {
        let (min, max) = (Duration::from_millis(50), Duration::from_secs(1));
        let start = tokio::time::Instant::now();
        let mut looks = vec![];
        let found = poll_until(PollGaps::doubling(min, max), Duration::from_secs(30), || -> Result<Option<()>, ()> {
            looks.push(tokio::time::Instant::now() - start);
            Ok(None)
        })
        .await;
        assert_eq!(found, Ok(None));
        let ms: Vec<u128> = looks.iter().map(Duration::as_millis).collect();
        assert_eq!(&ms[..8], &[0, 50, 150, 350, 750, 1550, 2550, 3550]);
        assert_eq!(ms.last(), Some(&30_000), "the last look is at the deadline");
        assert_eq!(ms.len(), 35);
        for pair in looks.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap >= min || pair[1] == Duration::from_secs(30), "{gap:?}");
            assert!(gap <= max, "{gap:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn polling_returns_the_first_find_and_the_first_error() {
        let gaps = PollGaps::doubling(Duration::from_millis(50), Duration::from_secs(1));
        let mut n = 0;
        let found = poll_until(gaps, Duration::from_secs(5), || -> Result<Option<u32>, ()> {
            n += 1;
            Ok((n == 4).then_some(n))
        })
        .await;
        assert_eq!(found, Ok(Some(4)));
        let failed = poll_until(gaps, Duration::from_secs(5), || -> Result<Option<u32>, &str> { Err("boom") }).await;
        assert_eq!(failed, Err("boom"));
        let zero = poll_until(gaps, Duration::ZERO, || -> Result<Option<u32>, ()> { Ok(None) }).await;
        assert_eq!(zero, Ok(None));
    }

    #[test]
    fn poll_gaps_double_to_the_cap_and_reset() {
        let mut gaps = PollGaps::doubling(Duration::from_millis(1), Duration::from_millis(5));
        let seen: Vec<u128> = (0..5).map(|_| gaps.next_gap().as_millis()).collect();
        assert_eq!(seen, [1, 2, 4, 5, 5]);
        gaps.reset();
        assert_eq!(gaps.next_gap(), Duration::from_millis(1));
        let mut fixed = PollGaps::fixed(Duration::from_millis(20));
        assert_eq!((fixed.next_gap(), fixed.next_gap()), (Duration::from_millis(20), Duration::from_millis(20)));
    }
}
