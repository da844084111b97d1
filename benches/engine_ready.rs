//! How long after buildkitd starts accepting on its unix socket the agent knows
//! the engine is ready: the native client's `wait_ready` (connect with a 1 to
//! 50 ms backoff cut short by inotify, then health and ListWorkers over gRPC)
//! against the usual shell approach, `buildctl debug workers` every 250 ms
//! until it succeeds.
//!
//! Each run starts a fresh buildkitd (own root and socket under /tmp/mab-*) and
//! starts waiting at once, as the supervisor does. A separate thread connects
//! to the socket in a tight loop; the moment its first connect succeeds is
//! "accepting", and each method's time is from there to its answer. Runs of the
//! two methods alternate, so drift on the machine hits both alike.
//!
//! `cargo bench --bench engine_ready` (root, after scripts/install-buildkit.sh;
//! BENCH_RUNS to change the count, default 30).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails loudly
#![allow(clippy::disallowed_types)] // wall-clock timing is the point of a bench; no paused clock here

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::bare_engine::{detect_accepting_and_serving, BareEngine};
use support::BUILDCTL;
/// Far above a healthy start; a run that hits it fails the bench.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The reference loop's period, as in `until buildctl debug workers; do sleep 0.25; done`.
const BUILDCTL_PERIOD: Duration = Duration::from_millis(250);

async fn native(socket: &Path) -> u32 {
    let ready = machine_agent::engine::client::wait_ready(socket, READY_TIMEOUT).await.unwrap();
    assert!(ready.workers >= 1);
    ready.attempts
}

/// Returns how many buildctl processes it took.
async fn buildctl_loop(socket: &Path) -> u32 {
    let give_up = Instant::now() + READY_TIMEOUT;
    let addr = format!("unix://{}", socket.display());
    let mut spawned = 0;
    loop {
        spawned += 1;
        let status = tokio::process::Command::new(BUILDCTL)
            .args(["--addr", &addr, "debug", "workers"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status()
            .await
            .unwrap();
        if status.success() {
            return spawned;
        }
        assert!(Instant::now() < give_up, "buildctl never succeeded on {addr}");
        tokio::time::sleep(BUILDCTL_PERIOD).await;
    }
}

#[derive(Default)]
struct Samples {
    after_accept: Vec<Duration>,
    after_serving: Vec<Duration>,
    spawn_to_accept: Vec<Duration>,
    accept_to_serving: Vec<Duration>,
    tries: Vec<u32>,
}

impl Samples {
    fn run(&mut self, rt: &tokio::runtime::Runtime, native_method: bool) {
        let engine = BareEngine::start(&[]);
        let spawned = Instant::now();
        let accepting = detect_accepting_and_serving(engine.socket.clone(), READY_TIMEOUT);
        let tries = if native_method { rt.block_on(native(&engine.socket)) } else { rt.block_on(buildctl_loop(&engine.socket)) };
        let ready = Instant::now();
        let (accepted, serving) = accepting.join().unwrap();
        self.after_accept.push(ready.saturating_duration_since(accepted));
        self.after_serving.push(ready.saturating_duration_since(serving));
        self.spawn_to_accept.push(accepted.saturating_duration_since(spawned));
        self.accept_to_serving.push(serving.saturating_duration_since(accepted));
        self.tries.push(tries);
        drop(engine);
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (mut ours, mut reference) = (Samples::default(), Samples::default());
    for _ in 0..runs {
        ours.run(&rt, true);
        reference.run(&rt, false);
    }

    println!("engine readiness, {runs} runs each (fresh buildkitd root per run)");
    println!("{:<36} {:>9} {:>9} {:>9} {:>9} {:>15} {:>15} {:>6}", "method", "median", "p95", "min", "max", "after serving", "after serving", "tries");
    println!("{:<36} {:>9} {:>9} {:>9} {:>9} {:>15} {:>15} {:>6}", "(ms after the socket accepts)", "", "", "", "", "median", "p95", "median");
    let mut engine = Samples::default();
    for (name, mut s) in [("wait_ready (native gRPC)", ours), ("buildctl debug workers every 250 ms", reference)] {
        s.after_accept.sort();
        s.after_serving.sort();
        s.tries.sort_unstable();
        println!(
            "{:<36} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>15.2} {:>15.2} {:>6}",
            name,
            ms(percentile(&s.after_accept, 0.5)),
            ms(percentile(&s.after_accept, 0.95)),
            ms(s.after_accept[0]),
            ms(s.after_accept[s.after_accept.len() - 1]),
            ms(percentile(&s.after_serving, 0.5)),
            ms(percentile(&s.after_serving, 0.95)),
            percentile(&s.tries, 0.5),
        );
        engine.spawn_to_accept.extend(s.spawn_to_accept);
        engine.accept_to_serving.extend(s.accept_to_serving);
    }
    engine.spawn_to_accept.sort();
    engine.accept_to_serving.sort();
    println!(
        "buildkitd itself, all {} runs: spawn -> accepting median {:.1} ms; accepting -> serving gRPC median {:.1} ms, p95 {:.1} ms",
        engine.spawn_to_accept.len(),
        ms(percentile(&engine.spawn_to_accept, 0.5)),
        ms(percentile(&engine.accept_to_serving, 0.5)),
        ms(percentile(&engine.accept_to_serving, 0.95)),
    );
}
