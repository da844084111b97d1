//! The agent against the control-plane double over real TLS: registration with
//! each identity mode, tasks, the health stream, reconnect after an outage,
//! a wrong CA, and termination.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::proto::v1 as pb;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use support::control_plane::{buildkit_task, control_plane, pending, ControlPlaneDouble, MACHINE_ID, MACHINE_TOKEN};
use support::{agent, base_config, eventually, http_get, metric_value, process_alive, trace_init, write_private, TestPki, WAIT};

const BOOTSTRAP_TOKEN: &str = "bootstrap-token-DO-NOT-LOG-91c2";

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

/// Writes a config pointing at `cp`, trusting `ca_pem`, with the identity section
/// `identity` writes given the test's directory.
fn setup(cp_url: &str, ca_pem: &str, identity: impl FnOnce(&Path) -> String) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let identity = identity(dir.path());
    let ca = dir.path().join("cp-ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let config = dir.path().join("config.toml");
    let text = format!(
        "{}\n[control_plane]\nurl = \"{cp_url}\"\nca_bundle = \"{}\"\nbackoff_initial_ms = 200\nbackoff_max_secs = 2\nconnect_timeout_secs = 2\n\n[identity]\n{identity}\n",
        base_config(dir.path()),
        ca.display()
    );
    std::fs::write(&config, text).unwrap();
    Setup { dir, config }
}

fn static_token(dir: &Path) -> String {
    let token_file = dir.join("token");
    write_private(&token_file, BOOTSTRAP_TOKEN);
    format!("mode = \"static_token\"\ntoken_file = \"{}\"", token_file.display())
}

fn static_token_setup(cp: &ControlPlaneDouble) -> Setup {
    setup(&cp.url(), &cp.pki.ca_pem, static_token)
}

fn assert_no_secrets(logs: &str) {
    for secret in [MACHINE_TOKEN, BOOTSTRAP_TOKEN, "BEGIN PRIVATE KEY", "imds-session-token"] {
        assert!(!logs.contains(secret), "the agent logged a secret ({secret})");
    }
}

#[tokio::test]
async fn registers_with_a_static_token_and_streams_health_at_1hz_with_real_statvfs() {
    trace_init();
    let cp = control_plane().expect_static_token(BOOTSTRAP_TOKEN).start();
    let s = static_token_setup(&cp);
    let agent = agent(&s.config).start();

    let rec = cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    let reg = &rec.registrations[0];
    assert_eq!(reg.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(reg.architecture, pb::Architecture::Amd64 as i32);
    assert!(uuid_like(&reg.connection_id), "connection id {:?}", reg.connection_id);
    match &reg.identity {
        Some(pb::register_request::Identity::StaticToken(t)) => assert_eq!(t.token, BOOTSTRAP_TOKEN),
        other => panic!("expected a static token identity, got {other:?}"),
    }
    assert!(rec.user_agents[0].starts_with(&format!("machine-agent/{}", env!("CARGO_PKG_VERSION"))), "{:?}", rec.user_agents);

    let state_dir = s.dir.path().join("state");
    let before = machine_agent::volume::stats::read_fs_stats(&state_dir).unwrap();
    let rec = cp.wait_for("5 health reports", |r| r.health.len() >= 5).await;
    assert_eq!(rec.unauthorized, 0, "health calls carried the bearer token");
    let fs = machine_agent::volume::stats::read_fs_stats(&state_dir).unwrap();
    // Free space moves between reads on a shared machine (other work writes
    // gigabytes at times): each report's figure lies between the reads taken
    // before and after the reports, give or take 1% of the disk.
    let slack = fs.total_bytes / 100;
    let (low, high) = (before.free_bytes.min(fs.free_bytes).saturating_sub(slack), before.free_bytes.max(fs.free_bytes) + slack);
    for report in &rec.health {
        assert_eq!(report.machine_id, MACHINE_ID);
        let m = report.mounts.iter().find(|m| Path::new(&m.path) == state_dir).expect("state dir in the report");
        assert_eq!(m.total_bytes, fs.total_bytes);
        assert_eq!(m.total_inodes, fs.total_inodes);
        assert!((low..=high).contains(&m.free_bytes), "free {} outside {low}..={high} (read before and after the reports)", m.free_bytes);
        assert!(m.free_inodes <= m.total_inodes);
    }
    assert_eq!(rec.health.last().unwrap().agent_state, pb::AgentState::Pending as i32);
    let stamps: Vec<i64> = rec.health.iter().map(|h| h.unix_time_ms).collect();
    let mut gaps: Vec<i64> = stamps.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    assert!((700..=1500).contains(&median), "median gap between health reports {median} ms, expected about 1000 ({stamps:?})");

    assert_no_secrets(&agent.logs());
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|&c| c == '-').count() == 4
}

#[tokio::test]
async fn registers_with_aws_imdsv2_identity() {
    trace_init();
    let cp = control_plane().start();
    let imds = support::metadata::imds().await;
    let s = setup(&cp.url(), &cp.pki.ca_pem, |_| format!("mode = \"aws\"\nimds_url = \"{}\"", imds.url));
    let agent = agent(&s.config).start();

    let rec = cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    match &rec.registrations[0].identity {
        Some(pb::register_request::Identity::Aws(aws)) => {
            assert_eq!(aws.document, support::metadata::IMDS_DOCUMENT);
            assert_eq!(aws.signature, support::metadata::IMDS_PKCS7);
        }
        other => panic!("expected an AWS identity, got {other:?}"),
    }
    let requests = imds.log.lock().unwrap().requests.clone();
    assert_eq!(
        requests,
        vec!["PUT /latest/api/token 200", "GET /latest/dynamic/instance-identity/document 200", "GET /latest/dynamic/instance-identity/pkcs7 200"]
    );
    assert_no_secrets(&agent.logs());
}

#[tokio::test]
async fn registers_with_a_fly_oidc_token() {
    trace_init();
    let cp = control_plane().start();
    let sock_dir = tempfile::tempdir().unwrap();
    let fly = support::metadata::fly_api(sock_dir.path()).await;
    let s = setup(&cp.url(), &cp.pki.ca_pem, |_| {
        format!("mode = \"fly\"\nfly_api_socket = \"{}\"\nfly_oidc_audience = \"builders.example\"", fly.socket.display())
    });
    let _agent = agent(&s.config).start();

    let rec = cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    match &rec.registrations[0].identity {
        Some(pb::register_request::Identity::Fly(f)) => assert_eq!(f.oidc_token, support::metadata::fly_token_for("builders.example")),
        other => panic!("expected a Fly identity, got {other:?}"),
    }
    assert_eq!(fly.audiences.lock().unwrap().as_slice(), ["builders.example"]);
}

#[tokio::test]
async fn pending_then_a_task_moves_the_agent_to_ready_and_the_engine_gets_the_task_env() {
    trace_init();
    let cp = control_plane().initial(vec![pending()]).start();
    let s = static_token_setup(&cp);
    let agent = agent(&s.config).start();
    let base = agent.endpoints().await;

    cp.wait_for("a pending health report", |r| r.health.iter().any(|h| h.agent_state == pb::AgentState::Pending as i32)).await;
    let (code, body) = http_get(&base, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("\"state\":\"pending\""), "{body}");

    // Kept whole: buildkit_task() makes fresh TLS material and a fresh port each call.
    let task = buildkit_task("task-42", &s.dir.path().join("mnt"));
    cp.push(task.clone());
    let rec = cp.wait_for("a ready health report", |r| r.health.iter().any(|h| h.agent_state == pb::AgentState::Ready as i32)).await;
    let ready = rec.health.iter().find(|h| h.agent_state == pb::AgentState::Ready as i32).unwrap();
    assert_eq!(ready.task_id, "task-42");
    assert_eq!(ready.engine_state, pb::EngineState::Running as i32);
    let (code, body) = http_get(&base, "/readyz").await;
    assert_eq!(code, 200, "{body}");

    let engine = agent.children();
    assert_eq!(engine.len(), 1, "one engine process");
    let environ = std::fs::read(format!("/proc/{}/environ", engine[0])).unwrap();
    assert!(environ.split(|&b| b == 0).any(|kv| kv == b"ENGINE_MARKER=from-task"), "the task's engine_env reached the engine");

    // The same task again (as after a reconnect) changes nothing.
    cp.push(task);
    agent.wait_for_log("task re-sent after reconnect").await;
    assert_eq!(agent.children(), engine);

    let rec = cp.wait_for("a usage report", |r| !r.usage.is_empty()).await;
    assert_eq!(rec.usage[0].task_id, "task-42");
}

#[tokio::test]
async fn a_bad_task_is_rejected_by_field_and_the_agent_keeps_waiting() {
    trace_init();
    let cp = control_plane().start();
    let s = static_token_setup(&cp);
    let agent = agent(&s.config).start();
    let base = agent.endpoints().await;
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;

    let mut bad = buildkit_task("task-bad", Path::new("/etc"));
    if let pb::register_response::Task::Buildkit(t) = &mut bad {
        t.listen_address = "not-an-address".into();
    }
    cp.push(bad);
    let line = agent.wait_for_log("task rejected").await;
    assert!(line.contains("buildkit.mounts[0].mount_path"), "{line}");
    assert!(line.contains("buildkit.listen_address"), "{line}");
    let (_, scrape) = http_get(&base, "/metrics").await;
    assert_eq!(metric_value(&scrape, "machine_agent_tasks_rejected_total"), Some(1.0));
    assert_eq!(metric_value(&scrape, "machine_agent_state{state=\"pending\"}"), Some(1.0));
    assert!(agent.children().is_empty(), "no engine for a rejected task");
}

#[tokio::test]
async fn control_plane_outage_is_survived_with_backoff_and_the_engine_is_left_alone() {
    trace_init();
    let cp = control_plane().initial(vec![pending()]).start();
    let s = static_token_setup(&cp);
    let agent = agent(&s.config).start();
    let base = agent.endpoints().await;
    cp.wait_for("registration", |r| !r.registrations.is_empty()).await;
    let task = buildkit_task("task-7", &s.dir.path().join("mnt"));
    cp.push(task.clone());
    cp.wait_for("ready", |r| r.health.iter().any(|h| h.agent_state == pb::AgentState::Ready as i32)).await;
    let engine = agent.children();
    assert_eq!(engine.len(), 1);

    // The control plane dies, every connection with it, for 10 s.
    let (port, pki): (u16, Arc<TestPki>) = cp.kill();
    let outage = tokio::time::Instant::now();
    agent.wait_for_log("reconnecting to the control plane after backoff").await;
    // The outage itself is the scenario: its length is what is being tested.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed())).await;

    let (_, scrape) = http_get(&base, "/metrics").await;
    let reconnects = metric_value(&scrape, "machine_agent_control_plane_reconnects_total").unwrap();
    assert!(reconnects >= 2.0, "several reconnect attempts during a 10 s outage with a 2 s cap, got {reconnects}");
    assert_eq!(metric_value(&scrape, "machine_agent_control_plane_connected"), Some(0.0));
    let (code, _) = http_get(&base, "/readyz").await;
    assert_eq!(code, 200, "the engine keeps serving while the control plane is away");
    let (code, _) = http_get(&base, "/healthz").await;
    assert_eq!(code, 200, "the agent's loops stay alive during the outage");
    assert_eq!(agent.children(), engine, "the engine was not touched");
    assert!(process_alive(engine[0]));
    let attempts = agent.logs().lines().filter(|l| l.contains("reconnecting to the control plane")).count();
    assert!(attempts >= 2, "each attempt is logged with its delay, got {attempts}");

    // It comes back on the same port: registration and health resume.
    let cp = control_plane().pki(pki).port(port).initial(vec![task]).start();
    let rec = cp.wait_for("registration and health after the outage", |r| !r.registrations.is_empty() && r.health.len() >= 2).await;
    assert_eq!(rec.registrations[0].previous_machine_id, MACHINE_ID, "the agent says which machine it was");
    assert_eq!(rec.health.last().unwrap().agent_state, pb::AgentState::Ready as i32);
    eventually("control_plane_connected back to 1", WAIT, || {
        let scrape = futures_lite_get(&base, "/metrics");
        metric_value(&scrape, "machine_agent_control_plane_connected") == Some(1.0)
    })
    .await;
    assert_eq!(agent.children(), engine, "still the same engine after the reconnect");
    let last = cp.recorded().health.last().cloned().unwrap();
    assert_eq!(last.task_conflict, None, "the same task re-sent after a reconnect is no conflict");
    assert_no_secrets(&agent.logs());
}

/// A blocking GET for use inside `eventually`'s synchronous condition.
fn futures_lite_get(base: &str, path: &str) -> String {
    let url = format!("{base}{path}");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() })
    })
    .join()
    .unwrap()
}

#[tokio::test]
async fn a_control_plane_with_an_untrusted_certificate_is_refused_without_plaintext_fallback() {
    trace_init();
    let cp = control_plane().start();
    let other_ca = TestPki::new("some other ca");
    let s = setup(&cp.url(), &other_ca.ca_pem, static_token);
    let agent = agent(&s.config).start();
    let base = agent.endpoints().await;

    let line = agent.wait_for_log("task stream failed").await;
    assert!(line.contains("certificate"), "the error names the certificate problem: {line}");
    agent.wait_for_log("reconnecting to the control plane after backoff").await;
    let (_, scrape) = http_get(&base, "/metrics").await;
    assert!(metric_value(&scrape, "machine_agent_control_plane_errors_total{call=\"RegisterMachine\"}").unwrap() >= 1.0);
    assert_eq!(metric_value(&scrape, "machine_agent_control_plane_connected"), Some(0.0));
    assert!(cp.recorded().registrations.is_empty(), "no registration may reach the server");
    assert!(!agent.logs().contains(BOOTSTRAP_TOKEN));
}

#[tokio::test]
async fn should_terminate_drains_stops_the_engine_reports_shutdown_and_exits_0() {
    trace_init();
    let cp = control_plane().start();
    let s = static_token_setup(&cp);
    let mut agent = agent(&s.config).start();
    cp.wait_for("registration", |r| !r.registrations.is_empty()).await;
    cp.push(buildkit_task("task-9", &s.dir.path().join("mnt")));
    cp.wait_for("ready", |r| r.health.iter().any(|h| h.agent_state == pb::AgentState::Ready as i32)).await;
    let engine = agent.children();
    assert_eq!(engine.len(), 1);

    cp.terminate();
    let status = agent.wait_exit(Duration::from_secs(15 + 5)).await;
    assert_eq!(status.code(), Some(0), "clean drain exits 0; log:\n{}", agent.logs());
    let rec = cp.recorded();
    assert_eq!(rec.shutdowns.len(), 1);
    let report = &rec.shutdowns[0];
    assert_eq!(report.reason, "should_terminate");
    assert_eq!(report.task_id, "task-9");
    assert_eq!(report.machine_id, MACHINE_ID);
    assert!(report.engine_stopped_cleanly);
    assert!(report.unmounted, "the cache volume was unmounted: {:?}", report.errors);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.trimmed_bytes > 0, "fstrim ran on the cache before unmounting");
    assert!(report.drain_duration_ms < 15_000, "within the 15 s deadline");
    assert!(!process_alive(engine[0]), "the engine was stopped");
}

#[tokio::test]
async fn sigterm_and_a_terminate_task_take_the_same_drain_path() {
    trace_init();
    for how in ["sigterm", "terminate task"] {
        let cp = control_plane().start();
        let s = static_token_setup(&cp);
        let mut agent = agent(&s.config).start();
        cp.wait_for("health", |r| !r.health.is_empty()).await;
        match how {
            "sigterm" => agent.signal(nix::sys::signal::Signal::SIGTERM),
            _ => cp.push(pb::register_response::Task::Terminate(pb::TerminateTask { reason: "scale-in".into() })),
        }
        let status = agent.wait_exit(Duration::from_secs(20)).await;
        assert_eq!(status.code(), Some(0), "{how}");
        let expected = if how == "sigterm" { "sigterm" } else { "terminate task: scale-in" };
        assert_eq!(cp.recorded().shutdowns.iter().map(|r| r.reason.as_str()).collect::<Vec<_>>(), vec![expected]);
    }
}

#[tokio::test]
async fn an_agent_after_a_crash_registers_as_the_machine_it_was() {
    trace_init();
    let cp = control_plane().initial(vec![pending()]).start();
    let s = static_token_setup(&cp);
    let mut first = agent(&s.config).start();
    let rec = cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    assert_eq!(rec.registrations[0].previous_machine_id, "", "a new machine");
    let kept = s.dir.path().join("state/control-plane-machine-id");
    eventually("the machine id to be kept in the state dir", Duration::from_secs(10), || kept.exists()).await;
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).await;

    let _second = agent(&s.config).start();
    let rec = cp.wait_for("a second registration", |r| r.registrations.len() >= 2).await;
    assert_eq!(rec.registrations[1].previous_machine_id, MACHINE_ID, "a reconnect of the same machine, not a new one");
}

#[tokio::test]
async fn every_state_change_reaches_the_control_plane_at_once_without_waiting_for_the_tick() {
    trace_init();
    let cp = control_plane().initial(vec![pending()]).start();
    let s = static_token_setup(&cp);
    // A tick so slow that any report within seconds of a change was sent for the change.
    let config = std::fs::read_to_string(&s.config).unwrap().replace("health_interval_ms = 1000", "health_interval_ms = 10000");
    std::fs::write(&s.config, config).unwrap();
    let agent = agent(&s.config).start();
    cp.wait_for("a pending report", |r| r.health.iter().any(|h| h.agent_state == pb::AgentState::Pending as i32)).await;

    let pushed = tokio::time::Instant::now();
    cp.push(buildkit_task("task-events", &s.dir.path().join("mnt")));
    let rec = cp
        .wait_for_within(Duration::from_secs(9), "a ready report well before the next 10 s tick", |r| {
            r.health.iter().any(|h| h.agent_state == pb::AgentState::Ready as i32)
        })
        .await;
    let ready_at = rec.health.iter().zip(&rec.health_arrivals).find(|(h, _)| h.agent_state == pb::AgentState::Ready as i32).map(|(_, at)| *at).unwrap();
    agent.wait_for_log("to=ready").await;
    // Every state on the way was reported as it came, each in its own report or coalesced.
    let states: Vec<i32> = rec.health.iter().map(|h| h.agent_state).collect();
    assert!(
        states.contains(&(pb::AgentState::Preparing as i32)) || states.contains(&(pb::AgentState::StartingEngine as i32)),
        "the states on the way: {states:?}"
    );
    assert!(ready_at.duration_since(pushed) < Duration::from_secs(9), "ready reported {:?} after the task", ready_at.duration_since(pushed));
    let before_ready = rec.health_arrivals.iter().filter(|at| **at >= pushed && **at <= ready_at).count();
    assert!(before_ready >= 2, "the change reports came without a tick in between: {before_ready} reports from the task to ready");
}

/// What /readyz (detail) says of the things the control plane schedules by,
/// and the same as the control plane's rebuilt state says it.
fn readyz_view(readyz: &serde_json::Value) -> (String, String, u64, String, u64, u64, bool) {
    (
        readyz["state"].as_str().unwrap_or_default().to_string(),
        readyz["engine"].as_str().unwrap_or_default().to_string(),
        readyz["engine_restarts"].as_u64().unwrap_or_default(),
        readyz["task_id"].as_str().unwrap_or_default().to_string(),
        readyz["oom_kills_total"].as_u64().unwrap_or_default(),
        readyz["tasks_rejected_total"].as_u64().unwrap_or_default(),
        readyz["engine_adopted"].as_bool().unwrap_or_default(),
    )
}

fn state_view(state: &pb::HealthReport) -> (String, String, u64, String, u64, u64, bool) {
    let agent_state = pb::AgentState::try_from(state.agent_state).unwrap().as_str_name().trim_start_matches("AGENT_STATE_").to_lowercase();
    let engine = pb::EngineState::try_from(state.engine_state).unwrap().as_str_name().trim_start_matches("ENGINE_STATE_").to_lowercase();
    (agent_state, engine, state.engine_restarts, state.task_id.clone(), state.oom_kills_total, state.tasks_rejected_total, state.engine_adopted)
}

/// Waits until the control plane's rebuilt state says what /readyz says, and /readyz satisfies `step_done`.
async fn agree(cp: &ControlPlaneDouble, detail: &str, step: &str, step_done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = http_get(detail, "/readyz").await;
        let readyz: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rec = cp.recorded();
        assert!(rec.health_protocol_errors.is_empty(), "{step}: {:?}", rec.health_protocol_errors);
        let rebuilt = rec.health_state().map(state_view);
        if step_done(&readyz) && rebuilt.as_ref() == Some(&readyz_view(&readyz)) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{step}: the control plane's state {rebuilt:?} never matched /readyz {:?}", readyz_view(&readyz));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Makes the kernel OOM-kill a process in a memory cgroup of its own below
/// `engine_memcg` (as a build step's), and removes the cgroup after.
fn oom_kill_a_step(engine_memcg: &Path) {
    let step = engine_memcg.join("buildkit/delta-step");
    std::fs::create_dir_all(&step).unwrap();
    let limit = if step.join("memory.max").exists() { "memory.max" } else { "memory.limit_in_bytes" };
    std::fs::write(step.join(limit), "33554432").unwrap();
    let script = format!("echo $$ > {}/cgroup.procs && exec dd if=/dev/zero of=/dev/null bs=128M count=1", step.display());
    let status = std::process::Command::new("sh").args(["-c", &script]).status().unwrap();
    assert!(!status.success(), "dd of 128 MiB under a 32 MiB limit was OOM-killed");
    std::fs::remove_dir(&step).unwrap();
}

#[tokio::test]
async fn a_delta_stream_rebuilds_the_state_readyz_shows_at_every_step_of_a_task() {
    trace_init();
    let cp = control_plane().initial(vec![pending()]).start();
    cp.set_health_reporting(pb::HealthReporting { deltas: true, ..Default::default() });
    let s = static_token_setup(&cp);
    let mut agent = agent(&s.config).start();
    let detail = agent.detail_endpoints().await;
    agree(&cp, &detail, "pending", |r| r["state"] == "pending").await;

    cp.push(buildkit_task("task-deltas", &s.dir.path().join("mnt")));
    agree(&cp, &detail, "ready", |r| r["state"] == "ready").await;

    let engine = agent.children();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(engine[0] as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    agree(&cp, &detail, "the engine killed and restarted", |r| r["state"] == "ready" && r["engine_restarts"] == 1).await;

    cp.push(pb::register_response::Task::Buildkit(pb::BuildkitTask { task_id: "not valid!".into(), ..Default::default() }));
    agree(&cp, &detail, "a task rejected", |r| r["tasks_rejected_total"] == 1).await;

    let engine_memcg = support::test_memory_cgroup(s.dir.path()).expect("the engine's memory cgroup");
    oom_kill_a_step(&engine_memcg);
    agree(&cp, &detail, "an OOM kill", |r| r["oom_kills_total"].as_u64() >= Some(1)).await;
    let rec = cp.recorded();
    assert!(rec.health.iter().flat_map(|h| &h.oom_kills).any(|k| k.container_id == "delta-step"), "the OOM kill itself was delivered");

    // Most reports were deltas, and an idle one is a few bytes.
    let deltas: Vec<_> = rec.health.iter().zip(&rec.health_sizes).filter(|(h, _)| h.delta).collect();
    assert!(deltas.len() * 2 > rec.health.len(), "{} deltas of {} reports", deltas.len(), rec.health.len());
    assert!(!rec.health[0].delta, "the stream opened with a full report");

    // A control plane that wants a full report gets one, once per request.
    cp.set_health_reporting(pb::HealthReporting { deltas: true, snapshot_request: 1, ..Default::default() });
    cp.wait_for("a full report for the request", |r| r.health.iter().any(|h| !h.delta && h.snapshot_request == 1)).await;
    // And one that wants full reports only gets nothing else.
    cp.set_health_reporting(pb::HealthReporting { deltas: false, ..Default::default() });
    let asked = cp.recorded().health.len();
    let rec = cp.wait_for("two reports after full reports were asked for", |r| r.health.len() >= asked + 3).await;
    assert!(rec.health[asked + 1..].iter().all(|h| !h.delta), "only full reports once deltas were turned off");
    cp.set_health_reporting(pb::HealthReporting { deltas: true, ..Default::default() });

    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let rec = cp.wait_for("the drain reported", |r| r.health_state().is_some_and(|h| h.agent_state == pb::AgentState::Draining as i32)).await;
    assert!(rec.health_protocol_errors.is_empty(), "{:?}", rec.health_protocol_errors);
    assert_eq!(agent.wait_exit(Duration::from_secs(20)).await.code(), Some(0));
}

#[tokio::test]
async fn after_a_broken_delta_stream_the_next_one_opens_with_a_full_report() {
    trace_init();
    let cp = control_plane().initial(vec![pending()]).start();
    cp.set_health_reporting(pb::HealthReporting { deltas: true, heartbeat_secs: 1, ..Default::default() });
    let proxy = support::proxy::ChaosProxy::start(cp.addr);
    let s = setup(&proxy.url(), &cp.pki.ca_pem, static_token);
    let _agent = agent(&s.config).start();
    cp.wait_for("a delta after the first report", |r| r.health.iter().any(|h| h.delta)).await;
    proxy.reset_established();
    let rec =
        cp.wait_for("a second health stream with a report", |r| r.health_streams_opened >= 2 && r.health.iter().filter(|h| h.sequence == 1).count() >= 2).await;
    assert!(rec.health.iter().filter(|h| h.sequence == 1).all(|h| !h.delta), "every stream opened with a full report");
    assert!(rec.health_protocol_errors.is_empty(), "{:?}", rec.health_protocol_errors);
    assert_eq!(rec.health_state().unwrap().agent_state, pb::AgentState::Pending as i32);
}
