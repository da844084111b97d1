//! The engine against the real buildkitd (scripts/install-buildkit.sh): task ->
//! config, TLS and cgroup -> supervised engine on a loop-device volume -> an
//! mTLS build from a client; restarts after kill -9, a crash loop, a hang
//! (SIGSTOP), an agent killed under a running engine, and bad TLS material.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::engine::client::EngineClient;
use machine_agent::proto::v1 as pb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::control_plane::control_plane;
use support::engine::{build_context, buildctl_build, readyz, unix_addr, wait_ready, write_task, GatedBuild, World};
use support::{agent, engine_pid, engine_socket, eventually, http_get, metric_value, process_alive, test_memory_cgroup, TestPki, WAIT};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn a_task_ends_in_a_ready_engine_that_serves_mtls_builds_and_refuses_clients_without_a_cert() {
    let w = World::new();
    let agent = w.start();
    let base = wait_ready(&agent).await;

    // Config and TLS material written, private.
    let engine_dir = w.root.join("state/engine");
    assert_eq!(mode(&engine_dir), 0o700);
    assert_eq!(mode(&engine_dir.join("tls")), 0o700);
    let key =
        std::fs::read_dir(engine_dir.join("tls")).unwrap().map(|e| e.unwrap().path()).find(|p| std::fs::read_to_string(p).unwrap().contains("PRIVATE KEY"));
    assert_eq!(mode(&key.expect("a key file in the TLS dir")), 0o600);
    let config = std::fs::read_to_string(engine_dir.join("buildkitd.toml")).unwrap();
    assert!(config.contains(&format!("root = \"{}\"", w.cache().display())), "BuildKit's root is the cache volume:\n{config}");
    assert!(config.contains(&format!("tcp://127.0.0.1:{}", w.port)), "{config}");

    // The engine runs with the task's env, answers, and /readyz says so.
    let pid = engine_pid(&w.root).expect("a pidfile");
    assert_eq!(agent.children(), vec![pid]);
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(environ.split(|&b| b == 0).any(|kv| kv == b"ENGINE_MARKER=from-task"));
    let (code, json) = readyz(&base).await;
    assert_eq!(code, 200, "{json}");
    assert_eq!(json["engine"], "running");
    assert_eq!(json["engine_pid"], pid);

    // A real build over TCP with mTLS.
    let ctx = build_context(&w.root, "/bin/busybox cat /proc/self/cgroup > /step-cgroup", 64 << 10);
    let out = w.root.join("out");
    let built = buildctl_build(&w.buildctl_tls_args(true), &ctx, &out);
    assert!(built.status.success(), "mTLS build failed: {}", String::from_utf8_lossy(&built.stderr));
    assert_eq!(std::fs::read(out.join("payload")).unwrap().len(), 64 << 10);

    // No client certificate: refused.
    let refused = buildctl_build(&w.buildctl_tls_args(false), &ctx, &w.root.join("out2"));
    assert!(!refused.status.success(), "a client without a certificate must be refused");
    assert!(!w.root.join("out2/payload").exists());

    // The cgroup: the computed limit, buildkitd in daemon/, the RUN step under buildkit/<id>.
    let cgroup = test_memory_cgroup(&w.root).expect("the engine's memory cgroup");
    let limit_file = if cgroup.join("memory.max").exists() { "memory.max" } else { "memory.limit_in_bytes" };
    let limit: u64 = std::fs::read_to_string(cgroup.join(limit_file)).unwrap().trim().parse().unwrap();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total = machine_agent::engine::parse_mem_total(&meminfo).unwrap();
    // The kernel rounds a v1 limit down to a page.
    assert!(limit <= total - (1 << 30) && limit > total - (1 << 30) - 4096, "limit {limit}, total {total}");
    let name = cgroup.file_name().unwrap().to_string_lossy().into_owned();
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert_eq!(machine_agent::engine::cgroup::memory_cgroup_of(&own), Some(format!("/{name}/daemon").as_str()), "{own}");
    let step = std::fs::read_to_string(out.join("step-cgroup")).unwrap();
    let step_memcg = machine_agent::engine::cgroup::memory_cgroup_of(&step).unwrap();
    assert!(step_memcg.starts_with(&format!("/{name}/buildkit/")), "a RUN step must run under the engine's cgroup: {step}");
}

#[tokio::test]
async fn a_killed_engine_is_restarted_and_counted() {
    let w = World::new();
    let agent = w.start();
    let base = wait_ready(&agent).await;
    let first = engine_pid(&w.root).unwrap();

    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    eventually("a new engine pid", WAIT, || engine_pid(&w.root).is_some_and(|p| p != first)).await;
    agent.wait_for_log("engine exited").await;
    eventually("the restarted engine to be ready", WAIT, || agent.logs().lines().filter(|l| l.contains("engine ready")).count() >= 2).await;
    // The supervisor logs "engine ready" a moment before the agent's state follows.
    agent.wait_for_log("to=ready reason=").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let json = loop {
        let (code, json) = readyz(&base).await;
        if code == 200 && json["engine_restarts"] == 1 {
            break json;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready again after the restart: {code} {json}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(json["engine_restarts"], 1);
    assert_eq!(json["engine_last_exit"], "killed by signal 9 (SIGKILL)");
    let (_, scrape) = http_get(&base, "/metrics").await;
    assert_eq!(metric_value(&scrape, "machine_agent_engine_restarts_total{reason=\"signal\"}"), Some(1.0), "{scrape}");
    assert_eq!(metric_value(&scrape, "machine_agent_engine_up"), Some(1.0));
    assert!(!process_alive(first));
    assert_eq!(agent.children(), vec![engine_pid(&w.root).unwrap()], "exactly one engine");
}

#[tokio::test]
async fn an_engine_that_exits_at_once_is_a_crash_loop_reported_as_degraded_with_capped_backoff() {
    // The fake engine: what a real buildkitd cannot be made to do on demand.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("exit-3");
    std::fs::write(&fake, "#!/bin/sh\necho 'fake engine: exiting with 3' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let w = World::with_engine(fake.to_str().unwrap());

    let cp = control_plane().start();
    w.use_control_plane(&cp);
    let agent = agent(&w.config)
        .env("MACHINE_AGENT__ENGINE__RESTART_INITIAL_MS", "50")
        .env("MACHINE_AGENT__ENGINE__RESTART_MAX_MS", "400")
        .env("MACHINE_AGENT__ENGINE__CRASH_LOOP_RESTARTS", "3")
        .start();
    let base = agent.detail_endpoints().await;
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    cp.push(support::control_plane::buildkit_task("crashy", &w.root.join("mnt")));

    let rec = cp.wait_for("a degraded health report", |r| r.health.iter().any(|h| h.agent_state == pb::AgentState::Degraded as i32)).await;
    let degraded = rec.health.iter().find(|h| h.agent_state == pb::AgentState::Degraded as i32).unwrap();
    assert!(degraded.state_reason.contains("crash loop"), "{}", degraded.state_reason);
    assert_eq!(degraded.engine_last_exit, "exited with code 3");
    let (code, json) = readyz(&base).await;
    assert_eq!(code, 503);
    assert_eq!(json["state"], "degraded");
    assert!(json["reason"].as_str().unwrap().contains("exited with code 3"), "{json}");

    // The backoff doubles to its cap and stays there while the loop goes on.
    eventually("several capped restarts", WAIT, || agent.logs().matches("restart_in_ms=400").count() >= 2).await;
    let delays: Vec<u64> = agent
        .logs()
        .lines()
        .filter(|l| l.contains("engine exited"))
        .filter_map(|l| l.split("restart_in_ms=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(&delays[..4], &[50, 100, 200, 400], "{delays:?}");
    assert!(delays.iter().all(|d| *d <= 400), "{delays:?}");
    assert!(agent.logs().contains("fake engine: exiting with 3"), "the engine's stderr reaches the log");
}

#[tokio::test]
async fn a_stopped_engine_is_detected_as_hung_killed_and_restarted_without_a_zombie() {
    let w = World::new();
    let agent = agent(&w.config)
        .standalone(&w.task)
        .env("MACHINE_AGENT__ENGINE__PROBE_INTERVAL_MS", "200")
        .env("MACHINE_AGENT__ENGINE__PROBE_TIMEOUT_MS", "300")
        .env("MACHINE_AGENT__ENGINE__PROBE_FAILURES", "3")
        .start();
    let base = wait_ready(&agent).await;
    let hung = engine_pid(&w.root).unwrap();
    // A build step in flight: runc puts it in a cgroup of its own, outside the engine's process group.
    let tag = format!("hung-step-{}", support::engine::rand_suffix());
    let step = build_context(&w.root, &format!("sleep 600; echo {tag}"), 1024);
    let (addr, out) = (unix_addr(&w), w.root.join("out-hung"));
    let build = tokio::task::spawn_blocking(move || buildctl_build(&addr, &step, &out));
    eventually("the step to run", WAIT, || support::engine::step_running(&tag)).await;

    kill(Pid::from_raw(hung as i32), Signal::SIGSTOP).unwrap();
    // Bound: 3 probes 200 ms apart, each up to 300 ms; a generous margin for a loaded machine.
    let line = agent.wait_for_log("engine hung").await;
    assert!(line.contains(&format!("pid={hung}")), "{line}");
    eventually("a new engine", WAIT, || engine_pid(&w.root).is_some_and(|p| p != hung)).await;
    eventually("the new engine ready", WAIT, || agent.logs().lines().filter(|l| l.contains("engine ready")).count() >= 2).await;
    assert!(!Path::new(&format!("/proc/{hung}")).exists(), "the hung engine was reaped: no zombie");
    let (code, json) = readyz(&base).await;
    assert_eq!(code, 200, "{json}");
    assert_eq!(json["engine_last_exit"], "killed by the agent: not answering");
    for child in agent.children() {
        assert!(process_alive(child), "zombie child {child}");
    }
    assert!(!support::engine::step_running(&tag), "the hung engine's build step was killed with it");
    let failed = build.await.unwrap();
    assert!(!failed.status.success(), "the build on the hung engine failed rather than hung");
}

/// An agent of `w` ready after one build; its engine's socket and cache record ids.
async fn ready_after_a_build(w: &World) -> (support::AgentProcess, std::path::PathBuf, Vec<String>) {
    let agent = w.start();
    wait_ready(&agent).await;
    let ctx = build_context(&w.root, "/bin/busybox echo cached > /marker", 256 << 10);
    let built = buildctl_build(&unix_addr(w), &ctx, &w.root.join("out"));
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let socket = engine_socket(&w.root);
    let before = record_ids(&socket).await;
    assert!(!before.is_empty(), "the build left cache records");
    (agent, socket, before)
}

#[tokio::test]
async fn an_agent_killed_under_a_running_engine_is_succeeded_by_one_that_adopts_it_and_a_build_in_flight_finishes() {
    let w = World::new();
    let (mut first, socket, _) = ready_after_a_build(&w).await;
    // The layers, not the mutable records of local contexts, which BuildKit
    // itself replaces when the next build sends its context.
    let records = EngineClient::connect(&socket).await.unwrap().disk_usage().await.unwrap();
    let layers_before: Vec<String> = records.into_iter().filter(|r| !r.mutable).map(|r| r.id).collect();

    // A build in flight when the agent dies, held at a gate the test opens
    // only once the next agent has adopted the engine.
    let gate = GatedBuild::new(&w.root);
    let (addr, ctx, out) = (unix_addr(&w), gate.ctx.clone(), w.root.join("out-gated"));
    let build = tokio::task::spawn_blocking(move || buildctl_build(&addr, &ctx, &out));
    gate.wait_running().await;
    let engine = engine_pid(&w.root).unwrap();
    // Outside the agent's cgroup in every hierarchy, `name=systemd` and the
    // unified tree included: where systemd looks for a unit's processes to kill.
    let expected = format!("/{}/daemon", support::test_cgroup_name(&w.root));
    let placed = std::fs::read_to_string(format!("/proc/{engine}/cgroup")).unwrap();
    for line in placed.lines() {
        assert!(line.ends_with(&format!(":{expected}")), "the engine is outside {expected} in {line:?}:\n{placed}");
    }
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).await;
    first.keep_volumes();

    let second = w.start();
    let base = wait_ready(&second).await;
    let logs = second.logs();
    assert!(logs.contains("engine_adopted"), "{logs}");
    assert!(process_alive(engine), "the engine kept running");
    assert_eq!(engine_pid(&w.root), Some(engine), "the same engine, adopted");
    assert_eq!(buildkitd_processes_for(&w.root), vec![engine], "exactly one engine on this root");
    let (_, body) = readyz(&base).await;
    assert_eq!((body["engine_adopted"].as_bool(), body["engine_pid"].as_u64()), (Some(true), Some(u64::from(engine))), "{body}");
    assert!(gate.step_pid().is_some(), "the step waited at its gate through the crash");
    gate.open();
    let built = build.await.unwrap();
    assert!(built.status.success(), "the build in flight finished across the agent's crash: {}", String::from_utf8_lossy(&built.stderr));
    gate.assert_complete(&w.root.join("out-gated"));
    let after = record_ids(&socket).await;
    let lost: Vec<&String> = layers_before.iter().filter(|id| !after.contains(id)).collect();
    assert!(lost.is_empty(), "cache layers lost across the agent crash: {lost:?}");

    // The adopted engine is supervised as any: killed, it is restarted.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(engine as i32), Signal::SIGKILL).unwrap();
    eventually("the engine to be restarted", Duration::from_secs(60), || {
        engine_pid(&w.root).is_some_and(|p| p != engine) && second.logs().matches("to=ready").count() >= 2
    })
    .await;
    drop(first);
}

#[tokio::test]
async fn an_agent_killed_under_a_running_engine_comes_back_to_exactly_one_engine_with_the_cache_intact() {
    let w = World::new();
    let (mut first, socket, before) = ready_after_a_build(&w).await;

    let orphan = engine_pid(&w.root).unwrap();
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).await;
    assert!(process_alive(orphan), "killing the agent leaves the engine running");
    first.keep_volumes();

    // The next agent's task differs (another max_parallelism): the old engine is not adopted.
    let task = std::fs::read_to_string(&w.task).unwrap();
    std::fs::write(&w.task, task.replace("max_parallelism = 2", "max_parallelism = 3")).unwrap();
    let second = w.start();
    wait_ready(&second).await;
    let logs = second.logs();
    assert!(logs.contains("engine not adopted: it was started with another configuration"), "{logs}");
    assert!(logs.contains("an engine from a previous agent is still running"), "{logs}");
    assert!(!process_alive(orphan), "the orphan was stopped");
    let engines = buildkitd_processes_for(&w.root);
    assert_eq!(engines, vec![engine_pid(&w.root).unwrap()], "exactly one engine on this root");
    assert!(!logs.contains("orphan engine ignored SIGTERM"), "the orphan stopped on SIGTERM, flushing its state");
    assert_eq!(record_ids(&socket).await, before, "cache records intact across the agent crash");
    drop(first);
}

#[tokio::test]
async fn bad_tls_material_is_a_task_error_and_nothing_is_started_or_written() {
    let w = World::new();
    let other = TestPki::new("another ca");
    let expired = expired_cert(&w.pki);
    let cases: Vec<(&str, String, String, &str)> = vec![
        ("malformed cert", "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n".into(), w.pki.server_key_pem.clone(), "tls.cert_pem"),
        ("key of another cert", w.pki.server_cert_pem.clone(), other.server_key_pem.clone(), "tls.key_pem"),
        ("expired cert", expired.0, expired.1, "tls.cert_pem"),
        ("oversized PEM", format!("{}{}", w.pki.server_cert_pem, "#".repeat(70 << 10)), w.pki.server_key_pem.clone(), "tls.cert_file"),
    ];
    for (what, cert, key, field) in cases {
        write_task(&w.root, &w.pki, w.port, &cert, &key);
        let out = Command::new(env!("CARGO_BIN_EXE_machine-agent"))
            .args(["run", "--config", w.config.to_str().unwrap(), "--standalone", w.task.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: exit 2 for a bad task; stderr:\n{stderr}");
        assert!(stderr.contains(field), "{what}: the error names {field}:\n{stderr}");
        assert!(!stderr.contains("PRIVATE KEY"), "{what}: no key material in errors");
        assert!(!w.root.join("state/engine").exists(), "{what}: nothing written for the engine");
        assert!(!w.cache().exists(), "{what}: no volume prepared");
    }
}

fn expired_cert(pki: &TestPki) -> (String, String) {
    // Self-signed by a throwaway key is enough: expiry is checked before the chain.
    let _ = pki;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The ids of the engine's cache records, through the agent's own client.
async fn record_ids(socket: &Path) -> Vec<String> {
    let client = EngineClient::connect(socket).await.unwrap();
    let mut ids: Vec<String> = client.disk_usage().await.unwrap().into_iter().map(|r| r.id).collect();
    ids.sort();
    ids
}

/// buildkitd processes whose command line names this test's config.
fn buildkitd_processes_for(root: &Path) -> Vec<u32> {
    let config = root.join("state/engine/buildkitd.toml").display().to_string();
    let mut pids = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.first().is_some_and(|a| a.ends_with(b"buildkitd")) && args.contains(&config.as_bytes()) && process_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test]
async fn a_handoff_exits_at_once_leaving_engine_and_mounts_and_the_next_agent_adopts_them() {
    let w = World::new();
    let handoff = || Command::new(env!("CARGO_BIN_EXE_machine-agent")).args(["handoff", "--config", w.config.to_str().unwrap()]).output().unwrap();
    let mut first = w.start();
    wait_ready(&first).await;
    let engine = engine_pid(&w.root).unwrap();
    // A build in flight across the handoff, as in an upgrade, held at a gate
    // the test opens only once the next agent has adopted the engine.
    let gate = GatedBuild::new(&w.root);
    let (addr, ctx, out_dir) = (unix_addr(&w), gate.ctx.clone(), w.root.join("out-handoff"));
    let build = tokio::task::spawn_blocking(move || buildctl_build(&addr, &ctx, &out_dir));
    gate.wait_running().await;

    let out = handoff();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("handed off"), "{out:?}");
    let status = first.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(75), "the exit status the unit restarts: {status:?}");
    first.keep_volumes();
    let logs = first.logs();
    assert!(logs.contains("handoff: exiting at once"), "{logs}");
    assert!(!logs.contains("draining"), "a handoff never drains");
    assert!(process_alive(engine), "the engine runs on");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(mountinfo.contains(&format!(" {} ", w.cache().display())), "the cache stays mounted");

    let second = w.start();
    let base = wait_ready(&second).await;
    assert!(second.logs().contains("engine_adopted"), "{}", second.logs());
    assert_eq!(engine_pid(&w.root), Some(engine));
    let (_, body) = readyz(&base).await;
    assert_eq!((body["engine_adopted"].as_bool(), body["engine_pid"].as_u64()), (Some(true), Some(u64::from(engine))), "{body}");
    assert!(gate.step_pid().is_some(), "the step waited at its gate through the handoff");
    gate.open();
    let built = build.await.unwrap();
    assert!(built.status.success(), "the build in flight finished across the handoff: {}", String::from_utf8_lossy(&built.stderr));
    gate.assert_complete(&w.root.join("out-handoff"));
    drop(second);

    // With no agent running there is nothing to hand off, and it says so.
    let out = handoff();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to hand off"), "{out:?}");
    drop(first);
}

#[tokio::test]
async fn an_engine_killed_while_no_agent_runs_is_restarted_by_the_next_agent_which_says_why() {
    let w = World::new();
    let (mut first, socket, before) = ready_after_a_build(&w).await;
    let engine = engine_pid(&w.root).unwrap();
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).await;
    first.keep_volumes();
    kill(Pid::from_raw(engine as i32), Signal::SIGKILL).unwrap();
    eventually("the engine to be gone", Duration::from_secs(10), || !process_alive(engine)).await;

    let second = w.start();
    let base = wait_ready(&second).await;
    let logs = second.logs();
    assert!(logs.contains("ended while no agent ran"), "{logs}");
    assert!(!logs.contains("engine_adopted"), "{logs}");
    let (_, body) = readyz(&base).await;
    assert_eq!(body["engine_restarts"], 1, "{body}");
    assert_eq!(body["engine_last_exit"], "ended while not the agent's child (exit status unknown)", "{body}");
    assert_ne!(engine_pid(&w.root), Some(engine), "a new engine");
    let after = record_ids(&socket).await;
    assert!(before.iter().all(|id| after.contains(id)), "the cache survived the engine's kill");
    drop(second);
    drop(first);
}

/// An agent (a debug build, whose panic hook aborts as release's
/// `panic = "abort"` does) that panics in `place` ("main": its main task;
/// "task": a spawned task, which tokio alone would survive) while a build
/// waits at a gate: it dies by SIGABRT, leaving the engine; the next agent
/// adopts it and the build finishes once the gate opens.
async fn a_panicking_agent_is_succeeded_by_one_that_adopts_its_engine(place: &str) {
    let w = World::new();
    let trigger = w.root.join("panic-now");
    let mut first = support::agent(&w.config).standalone(&w.task).env("MACHINE_AGENT_DEBUG_PANIC_FILE", trigger.to_str().unwrap()).start();
    wait_ready(&first).await;
    let engine = engine_pid(&w.root).unwrap();
    let gate = GatedBuild::new(&w.root);
    let (addr, ctx, out) = (unix_addr(&w), gate.ctx.clone(), w.root.join("out-panic"));
    let build = tokio::task::spawn_blocking(move || buildctl_build(&addr, &ctx, &out));
    gate.wait_running().await;

    std::fs::write(&trigger, place).unwrap();
    let status = first.wait_exit(Duration::from_secs(10)).await;
    first.keep_volumes();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(Signal::SIGABRT as i32), "a panic aborts the agent: {status:?}\n{}", first.logs());
    assert!(first.logs().contains(&format!("debug panic in {}", if place == "main" { "the main task" } else { "a spawned task" })), "{}", first.logs());
    assert!(process_alive(engine), "the engine outlived the panic");

    let second = w.start();
    let base = wait_ready(&second).await;
    assert!(second.logs().contains("engine_adopted"), "{}", second.logs());
    let (_, body) = readyz(&base).await;
    assert_eq!((body["engine_adopted"].as_bool(), body["engine_pid"].as_u64()), (Some(true), Some(u64::from(engine))), "{body}");
    assert!(gate.step_pid().is_some(), "the step waited at its gate through the panic");
    gate.open();
    let built = build.await.unwrap();
    assert!(built.status.success(), "the build in flight finished across the agent's panic: {}", String::from_utf8_lossy(&built.stderr));
    gate.assert_complete(&w.root.join("out-panic"));
    assert_eq!(buildkitd_processes_for(&w.root), vec![engine], "exactly one engine on this root");
    drop(second);
    drop(first);
}

#[tokio::test]
async fn an_agent_that_panics_in_its_main_task_is_succeeded_by_one_that_adopts_its_engine_and_the_build_finishes() {
    a_panicking_agent_is_succeeded_by_one_that_adopts_its_engine("main").await;
}

#[tokio::test]
async fn an_agent_that_panics_in_a_spawned_task_aborts_and_is_succeeded_by_one_that_adopts_its_engine() {
    a_panicking_agent_is_succeeded_by_one_that_adopts_its_engine("task").await;
}
