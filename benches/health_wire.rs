//! What the health stream costs on the wire and how soon the control plane
//! learns that a builder is ready.
//!
//! 1. Bytes a second between the agent and the control-plane double, counted
//!    by a TCP proxy between them (TLS, HTTP/2 and gRPC framing, keepalives,
//!    the task stream's keepalives, both directions; TCP/IP headers not
//!    included): idle pending, then idle ready (engine = `sleep`), each for
//!    BENCH_SECS (default 60), with full reports every second (what a control
//!    plane that does not ask for deltas gets, and what the previous release
//!    always sent) and with deltas.
//! 2. Control-plane-visible readiness: a real buildkitd started by the agent;
//!    from the moment its socket accepts (a thread connecting in a tight loop),
//!    and from the moment its gRPC server answers there (buildkitd accepts
//!    before its workers are up), to the arrival at the double of the first
//!    report that makes its state `ready`; BENCH_RUNS runs (default 30).
//!
//! `cargo bench --bench health_wire` (root, after scripts/install-buildkit.sh).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails loudly
#![allow(clippy::disallowed_types)] // wall-clock timing is the point of a bench; no paused clock here

#[path = "../tests/support/mod.rs"]
mod support;

use machine_agent::proto::v1 as pb;
use std::path::PathBuf;
use std::time::Duration;
use support::bare_engine::detect_accepting_and_serving;
use support::control_plane::{buildkit_task, control_plane, ControlPlaneDouble};
use support::engine::World;
use support::proxy::ChaosProxy;
use support::{agent, base_config, engine_socket, write_private};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// The agent config of the wire bench, dialling the control plane through `proxy`.
fn wire_config(dir: &std::path::Path, cp: &ControlPlaneDouble, proxy: &ChaosProxy) -> PathBuf {
    let token = dir.join("token");
    write_private(&token, "bench-bootstrap-token");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &cp.pki.ca_pem).unwrap();
    let config = dir.join("config.toml");
    let text = format!(
        "{}\n[control_plane]\nurl = \"{}\"\nca_bundle = \"{}\"\n[identity]\nmode = \"static_token\"\ntoken_file = \"{}\"\n",
        base_config(dir).replace("usage_interval_secs = 2", "usage_interval_secs = 60"),
        proxy.url(),
        ca.display(),
        token.display()
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// Wire bytes a second over `secs`; prints what the health reports of that time carried.
async fn rate(proxy: &ChaosProxy, cp: &ControlPlaneDouble, secs: u64, phase: &str) -> f64 {
    let (start, reports_before) = (proxy.wire_bytes(), cp.recorded().health.len());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let bytes = proxy.wire_bytes() - start;
    let rec = cp.recorded();
    let reports = &rec.health[reports_before..];
    let mut fields = std::collections::BTreeMap::<u32, usize>::new();
    for field in reports.iter().flat_map(|h| &h.changed_fields) {
        *fields.entry(*field).or_default() += 1;
    }
    let full = reports.iter().filter(|h| !h.delta).count();
    let protobuf: usize = rec.health_sizes[reports_before..].iter().sum();
    println!("  {phase}: {} reports ({full} full), {protobuf} protobuf bytes; fields changed (number: reports) {fields:?}", reports.len());
    bytes as f64 / secs as f64
}

/// (pending, ready) wire bytes a second, with or without deltas.
async fn wire(deltas: bool, secs: u64) -> (f64, f64) {
    let cp = control_plane().start();
    if deltas {
        cp.set_health_reporting(pb::HealthReporting { deltas: true, ..Default::default() });
    }
    let proxy = ChaosProxy::start(cp.addr);
    let dir = tempfile::tempdir().unwrap();
    let config = wire_config(dir.path(), &cp, &proxy);
    let _agent = agent(&config).env("MACHINE_AGENT_LOG", "warn").start();
    cp.wait_for("registration", |r| !r.registrations.is_empty()).await;
    cp.wait_for("pending", |r| r.health_state().is_some_and(|h| h.agent_state == pb::AgentState::Pending as i32)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pending = rate(&proxy, &cp, secs, "pending").await;
    cp.push(buildkit_task("bench", &dir.path().join("mnt")));
    cp.wait_for("ready", |r| r.health_state().is_some_and(|h| h.agent_state == pb::AgentState::Ready as i32)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = rate(&proxy, &cp, secs, "ready").await;
    assert!(cp.recorded().health_protocol_errors.is_empty());
    (pending, ready)
}

/// Socket accepts -> the control plane's state says ready, and gRPC serving
/// -> the same, one run.
async fn readiness_once() -> (Duration, Duration) {
    let w = World::new();
    let cp = control_plane().initial(vec![buildkit_task("bench-ready", &w.root.join("mnt"))]).start();
    cp.set_health_reporting(pb::HealthReporting { deltas: true, ..Default::default() });
    w.use_control_plane(&cp);
    let detector = detect_accepting_and_serving(engine_socket(&w.root), Duration::from_secs(60));
    let _agent = agent(&w.config).env("MACHINE_AGENT_LOG", "warn").start();
    let rec = cp.wait_for_within(Duration::from_secs(60), "ready", |r| r.health_state().is_some_and(|h| h.agent_state == pb::AgentState::Ready as i32)).await;
    let first_ready = rec.health_states.iter().position(|h| h.agent_state == pb::AgentState::Ready as i32).unwrap();
    let arrived = rec.health_arrivals[first_ready].into_std();
    let (accepting, serving) = detector.join().unwrap();
    (arrived.saturating_duration_since(accepting), arrived.saturating_duration_since(serving))
}

/// The `percent`th percentile of `sorted` (nearest rank).
fn percentile(sorted: &[Duration], percent: usize) -> Duration {
    sorted[((sorted.len() - 1) * percent + 50) / 100]
}

fn main() {
    let secs = env_or("BENCH_SECS", 60);
    let runs = usize::try_from(env_or("BENCH_RUNS", 30)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        println!("health stream on the wire, {secs} s per phase (bytes/s, both directions, TLS + HTTP/2 + gRPC)");
        println!("{:<34} {:>12} {:>12}", "", "idle pending", "idle ready");
        for deltas in [false, true] {
            let (pending, ready) = wire(deltas, secs).await;
            let name = if deltas { "deltas (HealthReporting.deltas)" } else { "full reports at 1 Hz (previous)" };
            println!("{name:<34} {pending:>12.1} {ready:>12.1}");
        }
        let (mut from_accepting, mut from_serving): (Vec<_>, Vec<_>) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
        for _ in 0..runs {
            let (a, s) = readiness_once().await;
            from_accepting.push(a);
            from_serving.push(s);
        }
        println!("the control plane has ready, {runs} runs (real buildkitd), ms:");
        println!("{:<34} {:>8} {:>8} {:>8} {:>8}", "after", "median", "p95", "min", "max");
        for (name, mut latencies) in [("the engine socket accepts", from_accepting), ("buildkitd serves gRPC", from_serving)] {
            latencies.sort_unstable();
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "{name:<34} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
                ms(percentile(&latencies, 50)),
                ms(percentile(&latencies, 95)),
                ms(latencies[0]),
                ms(latencies[runs - 1])
            );
        }
    });
}
