//! A hostile task against the real agent (issue 14, holes 3, 4 and 7): the
//! engine's environment is the agent's base plus allowed task variables and
//! nothing else; floods of mount options or variables are refused with a
//! bounded error and bounded memory while the agent keeps answering; absurd
//! systemd and config values are reported, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::proto::v1 as pb;
use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::control_plane::{buildkit_task, control_plane, pending, ControlPlaneDouble};
use support::{agent, base_config, control_plane_config, http_get, proc_status_kib, process_alive, trace_init, AgentProcess};
use tokio::time::Instant;

const BOOTSTRAP_TOKEN: &str = "bootstrap-token-hostile-limits";
/// Set on the agent only: the engine must never see it.
const AGENT_ONLY_VARIABLE: &str = "MACHINE_AGENT_TEST_AGENT_ONLY";

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

fn setup(cp: &ControlPlaneDouble) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config = control_plane_config(dir.path(), &cp.url(), &cp.pki.ca_pem, BOOTSTRAP_TOKEN, "");
    Setup { dir, config }
}

fn buildkit(task: &mut pb::register_response::Task) -> &mut pb::BuildkitTask {
    match task {
        pb::register_response::Task::Buildkit(b) => b,
        other => panic!("expected a buildkit task, got {other:?}"),
    }
}

fn last_rejection(cp: &ControlPlaneDouble) -> String {
    cp.recorded().health.iter().rev().map(|h| h.last_task_rejection.clone()).find(|r| !r.is_empty()).unwrap_or_default()
}

async fn healthz_answers_quickly(base: &str) -> Duration {
    let started = Instant::now();
    let (code, _) = tokio::time::timeout(Duration::from_secs(5), http_get(base, "/healthz")).await.expect("/healthz answered within 5 s");
    assert_eq!(code, 200);
    started.elapsed()
}

fn environ_names(pid: u32) -> BTreeSet<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ
        .split(|&b| b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| String::from_utf8_lossy(kv.split(|&b| b == b'=').next().unwrap_or_default()).into_owned())
        .collect()
}

#[tokio::test]
async fn forbidden_engine_variables_are_refused_by_name_and_the_engine_sees_only_base_and_allowed() {
    trace_init();
    let cp = control_plane().initial(vec![pending()]).start();
    let s = setup(&cp);
    let agent = agent(&s.config).env(AGENT_ONLY_VARIABLE, "agent-only").env("GODEBUG", "http2debug=2").start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;

    let forbidden = ["GODEBUG", "SSL_CERT_FILE", "OTEL_EXPORTER_OTLP_ENDPOINT", "NOTIFY_SOCKET", "LISTEN_FDS", "PATH", "LD_PRELOAD", "http2debug"];
    let mut task = buildkit_task("task-hostile-env", &s.dir.path().join("mnt"));
    for name in forbidden {
        buildkit(&mut task).engine_env.insert(name.into(), "x".into());
    }
    cp.push(task);
    cp.wait_for("a task rejection in the health stream", |r| r.health.iter().any(|h| !h.last_task_rejection.is_empty())).await;
    let rejection = last_rejection(&cp);
    for name in forbidden {
        assert!(rejection.contains(&format!("buildkit.engine_env[{name}]")), "{name} not named in {rejection}");
    }

    // Allowed: the proxy settings in both cases, and ENGINE_MARKER, named in engine.allowed_task_env.
    let mut task = buildkit_task("task-allowed-env", &s.dir.path().join("mnt"));
    let env = &mut buildkit(&mut task).engine_env;
    env.insert("HTTPS_PROXY".into(), "http://127.0.0.1:9".into());
    env.insert("no_proxy".into(), "localhost".into());
    cp.push(task);
    cp.wait_for("a ready health report", |r| r.health.iter().any(|h| h.agent_state == pb::AgentState::Ready as i32)).await;
    let engine = agent.children();
    assert_eq!(engine.len(), 1, "one engine process");
    let names = environ_names(engine[0]);
    let expected: BTreeSet<String> = ["PATH", "HOME", "ENGINE_MARKER", "HTTPS_PROXY", "no_proxy"].into_iter().map(String::from).collect();
    assert_eq!(names, expected, "the engine's environment is the base plus the allowed task variables");
    let environ = std::fs::read(format!("/proc/{}/environ", engine[0])).unwrap();
    assert!(environ.split(|&b| b == 0).any(|kv| kv == b"ENGINE_MARKER=from-task"));
    drop(agent);
}

/// What a flood did to the agent: resident memory before and at its peak, and its log's growth.
struct Footprint {
    rss_before_kib: u64,
    hwm_before_kib: u64,
    hwm_after_kib: u64,
    rss_after_kib: u64,
    log_growth_bytes: usize,
}

impl Footprint {
    fn report(&self, what: &str) {
        eprintln!(
            "{what}: VmRSS {} -> {} KiB, VmHWM {} -> {} KiB, log +{} bytes",
            self.rss_before_kib, self.rss_after_kib, self.hwm_before_kib, self.hwm_after_kib, self.log_growth_bytes
        );
    }
}

/// Pushes `task` to a pending agent and waits until it was dealt with (refused, or its stream dropped).
async fn flood(cp: &ControlPlaneDouble, agent: &AgentProcess, task: pb::register_response::Task) -> Footprint {
    let log_before = agent.logs().len();
    let rss_before_kib = proc_status_kib(agent.pid, "VmRSS");
    let hwm_before_kib = proc_status_kib(agent.pid, "VmHWM");
    let registrations = cp.recorded().registrations.len();
    cp.push(task);
    cp.wait_for_within(Duration::from_secs(60), "the flood refused (a rejection) or its stream dropped (a new registration)", |r| {
        r.registrations.len() > registrations || r.health.iter().any(|h| !h.last_task_rejection.is_empty())
    })
    .await;
    // Give a slow path time to show itself in memory and the log.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(process_alive(agent.pid), "the agent survived the flood");
    Footprint {
        rss_before_kib,
        hwm_before_kib,
        hwm_after_kib: proc_status_kib(agent.pid, "VmHWM"),
        rss_after_kib: proc_status_kib(agent.pid, "VmRSS"),
        log_growth_bytes: agent.logs().len() - log_before,
    }
}

/// Peak memory a flood may add: the decoder's copy of the message and one bounded error list.
const MAX_FLOOD_GROWTH_KIB: u64 = 48 << 10;
const MAX_FLOOD_LOG_BYTES: usize = 64 << 10;

#[tokio::test]
async fn two_million_mount_options_are_refused_with_bounded_memory_and_the_agent_keeps_answering() {
    trace_init();
    let cp = control_plane().initial(vec![pending()]).start();
    let s = setup(&cp);
    let agent = agent(&s.config).start();
    let base = agent.endpoints().await;
    cp.wait_for("a pending health report", |r| r.health.iter().any(|h| h.agent_state == pb::AgentState::Pending as i32)).await;

    let mut task = buildkit_task("task-options-flood", &s.dir.path().join("mnt"));
    buildkit(&mut task).mounts[0].options = vec![String::new(); 2_000_000];
    let footprint = flood(&cp, &agent, task).await;
    footprint.report("2,000,000 empty mount options");
    assert!(healthz_answers_quickly(&base).await < Duration::from_secs(1));
    assert!(
        footprint.hwm_after_kib - footprint.hwm_before_kib < MAX_FLOOD_GROWTH_KIB,
        "peak memory grew by {} KiB",
        footprint.hwm_after_kib - footprint.hwm_before_kib
    );
    assert!(footprint.log_growth_bytes < MAX_FLOOD_LOG_BYTES, "the log grew by {} bytes", footprint.log_growth_bytes);
    assert!(last_rejection(&cp).len() < 8192, "the rejection is {} bytes", last_rejection(&cp).len());

    // Still a working agent: a good task after the flood runs.
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    let state = cp.recorded().health.last().map(|h| h.agent_state);
    assert_eq!(state, Some(pb::AgentState::Pending as i32), "the agent kept its state");
}

#[tokio::test]
async fn a_flood_of_variables_and_options_under_the_message_limit_gets_a_capped_error_list() {
    trace_init();
    let cp = control_plane().initial(vec![pending()]).start();
    let s = setup(&cp);
    let agent = agent(&s.config).start();
    let base = agent.endpoints().await;
    cp.wait_for("a pending health report", |r| r.health.iter().any(|h| h.agent_state == pb::AgentState::Pending as i32)).await;

    // About 600 KB on the wire: under the 1 MiB the agent decodes.
    let mut task = buildkit_task("task-env-flood", &s.dir.path().join("mnt"));
    let b = buildkit(&mut task);
    b.engine_env = (0..40_000).map(|i| (format!("V{i:05}"), String::new())).collect();
    b.mounts[0].options = vec!["exec".into(); 50_000];
    let footprint = flood(&cp, &agent, task).await;
    footprint.report("40,000 variables and 50,000 options");
    let rejection = cp
        .wait_for("a task rejection in the health stream", |r| r.health.iter().any(|h| !h.last_task_rejection.is_empty()))
        .await
        .health
        .iter()
        .rev()
        .map(|h| h.last_task_rejection.clone())
        .find(|r| !r.is_empty())
        .unwrap();
    eprintln!("rejection ({} bytes): {rejection}", rejection.len());
    assert!(rejection.len() < 8192, "the rejection is {} bytes", rejection.len());
    assert!(rejection.contains("buildkit.engine_env"), "{rejection}");
    assert!(rejection.contains("buildkit.mounts[0].options"), "{rejection}");
    assert!(healthz_answers_quickly(&base).await < Duration::from_secs(1));
    assert!(
        footprint.hwm_after_kib - footprint.hwm_before_kib < MAX_FLOOD_GROWTH_KIB,
        "peak memory grew by {} KiB",
        footprint.hwm_after_kib - footprint.hwm_before_kib
    );
    assert!(footprint.log_growth_bytes < MAX_FLOOD_LOG_BYTES, "the log grew by {} bytes", footprint.log_growth_bytes);
}

#[tokio::test]
async fn a_one_microsecond_watchdog_does_not_kill_the_agent() {
    trace_init();
    let cp = control_plane().initial(vec![pending()]).start();
    let s = setup(&cp);
    let socket_path = s.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let agent = agent(&s.config).env("NOTIFY_SOCKET", socket_path.to_str().unwrap()).env("WATCHDOG_USEC", "1").start();

    let mut buf = [0u8; 4096];
    let mut pings = 0;
    while pings < 3 {
        let n = socket.recv(&mut buf).unwrap_or_else(|e| panic!("no sd_notify datagram within 20 s ({e}); log:\n{}", agent.logs()));
        pings += usize::from(&buf[..n] == b"WATCHDOG=1");
    }
    let base = agent.endpoints().await;
    assert!(healthz_answers_quickly(&base).await < Duration::from_secs(1));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(process_alive(agent.pid), "the agent is alive; log:\n{}", agent.logs());
    assert!(!agent.logs().contains("panicked"), "{}", agent.logs());
}

fn check_config(dir: &Path, text: &str) -> std::process::Output {
    let config = dir.join("absurd.toml");
    std::fs::write(&config, text).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_machine-agent")).args(["check", "--config"]).arg(&config).output().unwrap()
}

#[test]
fn check_reports_absurd_config_values_instead_of_panicking() {
    let dir = tempfile::tempdir().unwrap();
    // The largest a TOML integer (or an environment override read as one) can be.
    let huge = i64::MAX;
    let cases = [
        ("stop_grace_secs = 5\n".to_string(), format!("stop_grace_secs = {huge}\n"), "engine.stop_grace_secs"),
        ("unmount_timeout_secs = 5\n".to_string(), format!("unmount_timeout_secs = {huge}\n"), "volume.unmount_timeout_secs"),
        (
            "[engine]\n".to_string(),
            "[engine]\nallowed_task_env = [\"PATH\", \"bad name\", \"LD_PRELOAD\", \"NOTIFY_SOCKET\"]\n".to_string(),
            "engine.allowed_task_env",
        ),
    ];
    let mut all = base_config(dir.path()).replace("allowed_task_env = [\"ENGINE_MARKER\"]\n", "");
    for (from, to, field) in cases {
        assert!(all.contains(&from), "{from:?} not in the base config");
        all = all.replacen(&from, &to, 1);
        let out = check_config(dir.path(), &all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{to}: exit {:?}, stderr:\n{stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains(field), "{field} not named in:\n{stderr}");
    }
}
