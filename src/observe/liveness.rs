//! Liveness of the agent's own loops. Each ticking loop holds a [`Heartbeat`]
//! and beats it every tick; /healthz and the systemd watchdog ping pass only
//! while every registered loop has beaten within its allowed silence. A loop
//! that ends drops its heartbeat and leaves the set.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct Liveness {
    beats: Arc<Mutex<BTreeMap<&'static str, (Instant, Duration)>>>,
}

/// One loop's heartbeat.
#[derive(Debug)]
pub struct Heartbeat {
    name: &'static str,
    beats: Arc<Mutex<BTreeMap<&'static str, (Instant, Duration)>>>,
}

impl Liveness {
    /// Registers a loop that must beat at least every `max_silence`.
    pub fn register(&self, name: &'static str, max_silence: Duration) -> Heartbeat {
        lock(&self.beats).insert(name, (Instant::now(), max_silence));
        Heartbeat { name, beats: self.beats.clone() }
    }

    /// The loops that have been silent for longer than they may be.
    pub fn stalled(&self) -> Vec<&'static str> {
        let now = Instant::now();
        lock(&self.beats).iter().filter(|(_, (last, max))| now.duration_since(*last) > *max).map(|(name, _)| *name).collect()
    }
}

impl Heartbeat {
    pub fn beat(&self) {
        if let Some(entry) = lock(&self.beats).get_mut(self.name) {
            entry.0 = Instant::now();
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        lock(&self.beats).remove(self.name);
    }
}

/// A poisoned lock only means a panic elsewhere mid-update of a timestamp; the map is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_loop_is_stalled_until_it_beats_or_ends() {
        let live = Liveness::default();
        let hb = live.register("health", Duration::from_secs(3));
        assert!(live.stalled().is_empty());
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(live.stalled(), vec!["health"]);
        hb.beat();
        assert!(live.stalled().is_empty());
        tokio::time::advance(Duration::from_secs(4)).await;
        drop(hb);
        assert!(live.stalled().is_empty());
    }
}
