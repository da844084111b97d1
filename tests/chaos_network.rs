//! The agent against a broken network: a real TCP proxy (support::proxy)
//! between the real agent binary and the control-plane double (real TLS)
//! stalls handshakes, black-holes and resets connections; the double can also
//! keep a task stream silent or refuse the agent for good. In every case the
//! agent must reach the control plane again within a bound the test names,
//! and say in /readyz why it is not registered meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use std::path::PathBuf;
use std::time::Duration;
use support::control_plane::{control_plane, ControlPlaneDouble};
use support::proxy::ChaosProxy;
use support::{agent, control_plane_config, http_get, trace_init, WAIT};
use tokio::time::Instant;

const BOOTSTRAP_TOKEN: &str = "bootstrap-token-chaos-5d1e";
/// The connect timeout every test here configures: TCP, TLS and HTTP/2 setup together.
const CONNECT_TIMEOUT: Duration = support::CP_CONNECT_TIMEOUT;
/// The reconnect backoff cap every test here configures (the first delay is 200 ms).
const BACKOFF_CAP: Duration = support::CP_BACKOFF_CAP;
/// Room for a loaded 2-core machine: process start-up, identity, scheduling.
const SLACK: Duration = Duration::from_secs(3);

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
}

/// A config that dials `url`, trusts the double's CA and proves itself with a
/// static token; `extra` adds `[control_plane]` keys.
fn setup(url: &str, cp: &ControlPlaneDouble, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config = control_plane_config(dir.path(), url, &cp.pki.ca_pem, BOOTSTRAP_TOKEN, extra);
    Setup { _dir: dir, config }
}

async fn readyz(base: &str) -> serde_json::Value {
    let (_, body) = http_get(base, "/readyz").await;
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/readyz is not JSON ({e}): {body}"))
}

/// Waits (bounded by WAIT) until /readyz satisfies `pred`; returns that body.
async fn wait_for_readyz(base: &str, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let body = readyz(base).await;
        if pred(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "timed out after {WAIT:?} waiting for /readyz to show {what}; last body: {body}");
        // /readyz is polled: the agent has no way to push it to a test.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn control_plane_error(body: &serde_json::Value) -> String {
    body["control_plane_error"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn one_connection_stalled_in_the_tls_handshake_delays_registration_by_at_most_the_connect_timeout() {
    trace_init();
    let cp = control_plane().start();
    let proxy = ChaosProxy::start(cp.addr);
    proxy.stall_new_connections(true);
    // The request timeout: a stalled dial must not be bounded only by it.
    let s = setup(&proxy.url(), &cp, "request_timeout_secs = 15");
    let _agent = agent(&s.config).start();

    proxy.wait_for("the agent's first connection, stalled", |c| c.stalled >= 1).await;
    let stalled_at = Instant::now();
    proxy.stall_new_connections(false); // the healthy control plane is right behind it
    cp.wait_for("a registration through a second connection", |r| !r.registrations.is_empty()).await;
    let took = stalled_at.elapsed();
    eprintln!("MEASURED: registered {took:?} after the first connection stalled in its handshake");
    let bound = CONNECT_TIMEOUT + BACKOFF_CAP + SLACK;
    assert!(took <= bound, "registered {took:?} after the stall, expected within {bound:?} (connect timeout + backoff cap + slack)");
    let counts = proxy.counts();
    assert_eq!(counts.stalled, 1, "{counts:?}");
    assert!(counts.forwarded >= 1, "a new connection was dialled: {counts:?}");
}

#[tokio::test]
async fn readyz_says_why_the_agent_is_not_registered_while_every_handshake_stalls() {
    trace_init();
    let cp = control_plane().start();
    let proxy = ChaosProxy::start(cp.addr);
    proxy.stall_new_connections(true);
    let s = setup(&proxy.url(), &cp, "");
    let agent = agent(&s.config).start();
    let base = agent.detail_endpoints().await;

    let body = wait_for_readyz(&base, "a connect timeout as control_plane_error", |b| control_plane_error(b).contains("within")).await;
    let error = control_plane_error(&body);
    assert!(error.contains("connect"), "the error says it was the connection that failed: {error}");
    assert_eq!(body["state"], "registering", "{body}");
    assert_eq!(body["control_plane_connected"], false, "{body}");
    agent.wait_for_log("no connection to the control plane").await;
    proxy.wait_for("three dials, each abandoned at the connect timeout", |c| c.stalled >= 3).await;

    proxy.stall_new_connections(false);
    cp.wait_for("a registration once the network heals", |r| !r.registrations.is_empty()).await;
    let body = wait_for_readyz(&base, "control_plane_error: null once registered", |b| b.get("control_plane_error").is_some_and(|e| e.is_null())).await;
    assert_eq!(body["control_plane_connected"], true, "{body}");
    assert_eq!(body["state"], "pending", "{body}");
}

#[tokio::test]
async fn a_task_stream_silent_past_the_idle_deadline_is_logged_and_registered_again() {
    trace_init();
    let cp = control_plane().silent_task_streams().start();
    let s = setup(&cp.url(), &cp, "task_stream_idle_timeout_secs = 3");
    let agent = agent(&s.config).start();
    let base = agent.detail_endpoints().await;

    let rec = cp.wait_for("a second registration after the stream fell silent", |r| r.registrations.len() >= 2).await;
    assert_eq!(rec.registrations[0].keepalive_interval_secs, 1, "the agent asks for a keepalive a third of its idle deadline");
    let gap = rec.registration_attempts[1] - rec.registration_attempts[0];
    let idle = Duration::from_secs(3);
    assert!(gap >= idle, "re-registered after {gap:?}, before the {idle:?} deadline");
    assert!(gap <= idle + BACKOFF_CAP + SLACK, "re-registered only after {gap:?}");
    let line = agent.wait_for_log("task stream failed").await;
    assert!(line.contains("WARN") && line.contains("silent for 3s"), "the silence is logged as a warning: {line}");
    let body = wait_for_readyz(&base, "the silence as control_plane_error", |b| control_plane_error(b).contains("silent")).await;
    assert_eq!(body["control_plane_connected"], false, "{body}");
}

#[tokio::test]
async fn a_black_holed_connection_is_abandoned_at_the_idle_deadline_and_registration_resumes_on_a_new_one() {
    trace_init();
    let cp = control_plane().start();
    let proxy = ChaosProxy::start(cp.addr);
    let s = setup(&proxy.url(), &cp, "task_stream_idle_timeout_secs = 3");
    let _agent = agent(&s.config).start();
    let rec = cp.wait_for("a registration and health", |r| !r.registrations.is_empty() && !r.health.is_empty()).await;
    assert_eq!(rec.registrations[0].keepalive_interval_secs, 1);
    let before = proxy.counts();

    proxy.black_hole_established();
    let holed_at = Instant::now();
    cp.wait_for("a registration after the black hole", |r| r.registrations.len() >= 2).await;
    let took = holed_at.elapsed();
    eprintln!("MEASURED: registered again {took:?} after the connection was black-holed (idle deadline 3 s)");
    // HTTP/2 pings alone would take up to 15 s: the idle deadline must come first.
    let bound = Duration::from_secs(3) + BACKOFF_CAP + SLACK;
    assert!(took <= bound, "registered again {took:?} after the black hole, expected within {bound:?}");
    let after = proxy.counts();
    assert!(after.forwarded > before.forwarded, "on a new connection: {before:?} then {after:?}");
}

#[tokio::test]
async fn unanswered_http2_pings_tear_down_a_black_holed_connection_within_15_seconds() {
    trace_init();
    let cp = control_plane().start();
    let proxy = ChaosProxy::start(cp.addr);
    // An idle deadline far away: only the HTTP/2 pings (10 s interval, 5 s timeout) can notice.
    let s = setup(&proxy.url(), &cp, "task_stream_idle_timeout_secs = 600");
    let _agent = agent(&s.config).start();
    let rec = cp.wait_for("a registration and a health stream", |r| !r.registrations.is_empty() && r.health_streams_opened >= 1).await;
    let streams = rec.health_streams_opened;

    proxy.black_hole_established();
    let holed_at = Instant::now();
    let pings = Duration::from_secs(10 + 5);
    let bound = pings + BACKOFF_CAP + SLACK;
    cp.wait_for_within(bound + Duration::from_secs(5), "a registration and a new health stream after the black hole", |r| {
        r.registrations.len() >= 2 && r.health_streams_opened > streams
    })
    .await;
    let took = holed_at.elapsed();
    eprintln!("MEASURED: registration and health back {took:?} after the black hole, idle deadline out of reach");
    assert!(took <= bound, "back after {took:?}, expected within {bound:?} (ping interval + timeout + backoff cap + slack)");
}

#[tokio::test]
async fn reset_connections_are_redialled_and_registration_and_health_resume_within_the_backoff_cap() {
    trace_init();
    let cp = control_plane().start();
    let proxy = ChaosProxy::start(cp.addr);
    let s = setup(&proxy.url(), &cp, "");
    let agent = agent(&s.config).start();
    let base = agent.detail_endpoints().await;
    let rec = cp.wait_for("a registration and a health stream", |r| !r.registrations.is_empty() && r.health_streams_opened >= 1).await;
    let streams = rec.health_streams_opened;

    proxy.reset_established();
    let reset_at = Instant::now();
    cp.wait_for("a registration and a new health stream after the reset", |r| r.registrations.len() >= 2 && r.health_streams_opened > streams).await;
    let took = reset_at.elapsed();
    eprintln!("MEASURED: registration and health back {took:?} after a reset");
    let bound = BACKOFF_CAP + SLACK;
    assert!(took <= bound, "back after {took:?}, expected within {bound:?}");
    wait_for_readyz(&base, "connected again, no error", |b| b["control_plane_connected"] == true && b.get("control_plane_error").is_some_and(|e| e.is_null()))
        .await;
}

#[tokio::test]
async fn a_permanent_error_is_logged_as_permanent_and_retried_no_sooner_than_half_the_backoff_cap() {
    trace_init();
    // The double knows another bootstrap token: every registration is UNAUTHENTICATED.
    let cp = control_plane().expect_static_token("a-token-this-machine-does-not-have").start();
    let s = setup(&cp.url(), &cp, "");
    let agent = agent(&s.config).start();
    let base = agent.detail_endpoints().await;

    let rec = cp.wait_for("three refused registration attempts", |r| r.registration_attempts.len() >= 3).await;
    assert!(rec.registrations.is_empty(), "the double refused them all");
    let gaps: Vec<Duration> = rec.registration_attempts.windows(2).map(|w| w[1] - w[0]).collect();
    let least = BACKOFF_CAP / 2;
    for gap in &gaps {
        assert!(*gap >= least, "a permanent error was retried after {gap:?}, sooner than half the cap ({least:?}); gaps {gaps:?}");
    }
    let line = agent.wait_for_log("permanent").await;
    assert!(line.contains("Unauthenticated"), "the log names the status: {line}");
    let body = wait_for_readyz(&base, "the refusal as control_plane_error", |b| control_plane_error(b).contains("Unauthenticated")).await;
    assert!(control_plane_error(&body).contains("permanent"), "{body}");
    assert_eq!(body["state"], "registering", "{body}");
}
