//! How long a new agent takes to be `ready` when it adopts the running engine
//! (the agent was SIGKILLed under it), against a cold start of the engine on
//! the same cache (the agent drained before): from the new agent's process
//! start to its `to=ready` log line. Both include the volume prepare, which
//! finds the file-backed cache volume already mounted (adoption) or mounts it
//! again (cold). Runs alternate, so drift on the machine hits both alike.
//!
//! `cargo bench --bench adoption` (root, after scripts/install-buildkit.sh;
//! BENCH_RUNS to change the count, default 10).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails loudly
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // wall-clock timing is the point of a bench; no paused clock here

#[path = "../tests/support/mod.rs"]
mod support;

use nix::sys::signal::Signal;
use std::time::{Duration, Instant};
use support::engine::World;
use support::AgentProcess;

/// Starts an agent of `w` and times it to its `to=ready` line, polled every millisecond.
fn start_timed(w: &World) -> (AgentProcess, Duration) {
    let started = Instant::now();
    let agent = w.start();
    while !agent.logs().contains("to=ready") {
        assert!(started.elapsed() < Duration::from_secs(60), "no ready within a minute:\n{}", agent.logs());
        std::thread::sleep(Duration::from_millis(1));
    }
    (agent, started.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let w = World::new();
    let (mut cold, mut adopting) = (vec![], vec![]);
    let mut kept = vec![];
    for _ in 0..runs {
        // Cold: the previous agent drained, so the engine starts from nothing on the same cache.
        let (mut first, took) = start_timed(&w);
        cold.push(took);
        first.signal(Signal::SIGKILL);
        first.wait_exit(Duration::from_secs(10)).await;
        first.keep_volumes();
        kept.push(first);
        // Adopting: the engine the killed agent left runs on.
        let (mut second, took) = start_timed(&w);
        assert!(second.logs().contains("engine_adopted"), "{}", second.logs());
        adopting.push(took);
        second.signal(Signal::SIGTERM);
        assert!(second.wait_exit(Duration::from_secs(60)).await.success(), "{}", second.logs());
        second.keep_volumes();
        kept.push(second);
    }
    println!("agent start to ready, median of {runs}:");
    println!("  cold engine start on the same cache: {:>7.1} ms", median(cold).as_secs_f64() * 1e3);
    println!("  adopting the running engine:         {:>7.1} ms", median(adopting).as_secs_f64() * 1e3);
}
