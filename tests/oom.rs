//! Real OOM kills, witnessed by the agent: a real buildkitd in the engine
//! cgroup with a small memory limit runs a build whose RUN step (static
//! busybox `dd` with a buffer larger than the limit) makes the kernel's memcg
//! OOM killer act. The agent reads the kernel's lines from /dev/kmsg,
//! attributes the kill to the build step (or the engine), and reports it in
//! the log, /readyz, the metrics and the control plane's health stream.
//!
//! Other tests' kills (this file runs two in parallel) reach every agent on
//! the host too, attributed "other" there: assertions name their own kill.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::proto::v1 as pb;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::engine::{build_context, buildctl_build, readyz, unix_addr, wait_ready, World};
use support::{agent, eventually, metric_value, test_memory_cgroup};

/// The engine cgroup's limit: room for buildkitd and a small step, not for
/// the step's 256 MiB buffer.
const ENGINE_LIMIT_BYTES: u64 = 192 << 20;

/// A step that waits a moment (so the watcher below sees its pid), then asks
/// for a 256 MiB buffer and fills it from /dev/zero: the memcg OOM killer's
/// victim. `exec` keeps the pid the watcher saw.
const ALLOCATE_BEYOND_THE_LIMIT: &str = "/bin/busybox sleep 1; exec /bin/busybox dd if=/dev/zero of=/dev/null bs=256M count=1";

/// Every (step container id, pid) seen in the engine's `buildkit/` cgroups
/// while it runs: the truth the agent's report is checked against.
struct StepWatcher {
    seen: Arc<Mutex<BTreeSet<(String, u32)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StepWatcher {
    /// `doom_engine`: buildkitd's pid, made the OOM killer's first choice
    /// (oom_score_adj 1000) once the first step runs, during the step's first
    /// second. Not earlier: children inherit the score when they fork, and
    /// lowering it again needs CAP_SYS_RESOURCE.
    fn start(engine_cgroup: PathBuf, doom_engine: Option<u64>) -> Self {
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                for (id, pids) in step_pids(&engine_cgroup.join("buildkit")) {
                    let mut seen = seen2.lock().unwrap();
                    for pid in pids {
                        if seen.insert((id.clone(), pid)) {
                            if let Some(engine) = doom_engine {
                                std::fs::write(format!("/proc/{engine}/oom_score_adj"), "1000").unwrap();
                            }
                        }
                    }
                }
                // A poll, not a synchronisation: the step lives for over a second.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self { seen, stop, thread: Some(thread) }
    }

    fn saw(&self, container_id: &str, pid: u32) -> bool {
        self.seen.lock().unwrap().contains(&(container_id.to_string(), pid))
    }

    fn seen(&self) -> BTreeSet<(String, u32)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for StepWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn step_pids(buildkit: &Path) -> Vec<(String, Vec<u32>)> {
    let Ok(entries) = std::fs::read_dir(buildkit) else {
        return vec![];
    };
    entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let procs = std::fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), procs.lines().filter_map(|l| l.trim().parse().ok()).collect())
        })
        .collect()
}

/// An agent registered with a control-plane double, Ready with an engine
/// limited to ENGINE_LIMIT_BYTES.
async fn limited_engine_agent(w: &World, cp: &support::control_plane::ControlPlaneDouble, task_id: &str) -> (support::AgentProcess, String) {
    w.use_control_plane(cp);
    let reserve = support::mem_total_bytes() - ENGINE_LIMIT_BYTES;
    let agent = agent(&w.config).env("MACHINE_AGENT__ENGINE__MEMORY_RESERVE_BYTES", &reserve.to_string()).start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    cp.push(support::control_plane::buildkit_task(task_id, &w.root.join("mnt")));
    let base = wait_ready(&agent).await;
    (agent, base)
}

fn engine_memory_cgroup(w: &World) -> PathBuf {
    test_memory_cgroup(&w.root).expect("the engine's memory cgroup exists while it runs")
}

fn oom_kills_in(reports: &[pb::HealthReport]) -> Vec<pb::OomKill> {
    reports.iter().flat_map(|r| r.oom_kills.iter().cloned()).collect()
}

/// One agent's story: a step over the limit is killed and the engine keeps
/// serving; later buildkitd itself is the victim and is restarted, the
/// restart classified as OOM. One test, not two, so no other agent's kill
/// lands between a kill and the /readyz that shows it.
#[tokio::test]
async fn oom_kills_of_a_build_step_and_of_the_engine_are_reported_and_attributed() {
    let w = World::new();
    let cp = support::control_plane::control_plane().start();
    let (agent, base) = limited_engine_agent(&w, &cp, "oom").await;
    let (_, before) = readyz(&base).await;
    let engine_pid = before["engine_pid"].as_u64().unwrap();
    let cgroup = engine_memory_cgroup(&w);
    let limit: u64 = std::fs::read_to_string(cgroup.join("memory.limit_in_bytes"))
        .or_else(|_| std::fs::read_to_string(cgroup.join("memory.max")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(limit, ENGINE_LIMIT_BYTES, "the engine cgroup carries the configured limit");

    // --- a build step is the victim
    let steps = StepWatcher::start(cgroup.clone(), None);
    let ctx = build_context(&w.root, ALLOCATE_BEYOND_THE_LIMIT, 4096);
    let out = buildctl_build(&unix_addr(&w), &ctx, &w.root.join("out"));
    assert!(!out.status.success(), "a step over the memory limit cannot succeed");

    let rec = cp
        .wait_for("a health report with a build-step OOM kill", |r| {
            oom_kills_in(&r.health).iter().any(|k| k.attribution == pb::OomAttribution::BuildStep as i32)
        })
        .await;
    let kills = oom_kills_in(&rec.health);
    let ours: Vec<&pb::OomKill> = kills.iter().filter(|k| k.attribution == pb::OomAttribution::BuildStep as i32).collect();
    assert_eq!(ours.len(), 1, "one kill, reported once: {kills:#?}");
    let kill = ours[0];
    assert!(steps.saw(&kill.container_id, kill.pid), "the reported step {} pid {} is the one that ran; seen: {:?}", kill.container_id, kill.pid, steps.seen());
    drop(steps);
    assert_eq!(kill.process_name, "busybox");
    assert_eq!(kill.scope, "memcg");
    assert!(kill.task_memcg.ends_with(&format!("/buildkit/{}", kill.container_id)), "{kill:?}");
    assert!(kill.anon_rss_bytes > 64 << 20, "the victim's memory is reported: {kill:?}");
    assert!(kill.unix_time_ms > 0 && kill.count == 1, "{kill:?}");

    let scrape = support::http_get(&base, "/metrics").await.1;
    assert_eq!(metric_value(&scrape, "machine_agent_oom_kills_total{attribution=\"build_step\"}"), Some(1.0), "{scrape}");
    assert_eq!(metric_value(&scrape, "machine_agent_oom_kills_total{attribution=\"engine\"}"), Some(0.0));
    let (code, after) = readyz(&base).await;
    assert_eq!(code, 200, "the agent stays Ready: {after}");
    assert_eq!(after["engine_pid"].as_u64(), Some(engine_pid), "buildkitd was not touched: {after}");
    assert_eq!(after["engine_restarts"].as_u64(), Some(0), "{after}");
    assert_eq!(after["last_oom"]["attribution"], "build_step", "{after}");
    assert_eq!(after["last_oom"]["pid"].as_u64(), Some(u64::from(kill.pid)), "{after}");
    assert!(agent.logs().contains("OOM kill: busybox"), "the kill is logged");
    let ok = buildctl_build(&unix_addr(&w), &build_context(&w.root, "/bin/busybox true", 4096), &w.root.join("out2"));
    assert!(ok.status.success(), "the engine still builds: {}", String::from_utf8_lossy(&ok.stderr));

    // --- buildkitd is the victim: the killer's first choice in its cgroup.
    let steps = StepWatcher::start(cgroup, Some(engine_pid));
    let ctx = build_context(&w.root, ALLOCATE_BEYOND_THE_LIMIT, 4096);
    let out = buildctl_build(&unix_addr(&w), &ctx, &w.root.join("out3"));
    assert!(!out.status.success(), "the build cannot survive its engine's death");
    drop(steps);

    let rec = cp
        .wait_for("a health report with an engine OOM kill", |r| oom_kills_in(&r.health).iter().any(|k| k.attribution == pb::OomAttribution::Engine as i32))
        .await;
    let kills = oom_kills_in(&rec.health);
    let engine_kill = kills.iter().find(|k| k.attribution == pb::OomAttribution::Engine as i32).unwrap();
    assert_eq!(u64::from(engine_kill.pid), engine_pid, "{kills:#?}");
    assert_eq!(engine_kill.process_name, "buildkitd");

    eventually("the engine to be restarted and Ready again", Duration::from_secs(60), || agent.logs().matches("to=ready").count() >= 2).await;
    let (code, after) = readyz(&base).await;
    assert_eq!(code, 200, "{after}");
    assert_eq!(after["engine_restarts"].as_u64(), Some(1), "{after}");
    assert!(after["engine_last_exit"].as_str().unwrap().contains("OOM"), "the restart says why: {after}");
    assert_ne!(after["engine_pid"].as_u64(), Some(engine_pid), "a new engine runs: {after}");
    let scrape = support::http_get(&base, "/metrics").await.1;
    assert_eq!(metric_value(&scrape, "machine_agent_engine_restarts_total{reason=\"oom_killed\"}"), Some(1.0), "{scrape}");
    assert!(metric_value(&scrape, "machine_agent_oom_kills_total{attribution=\"engine\"}").unwrap() >= 1.0, "{scrape}");
}
