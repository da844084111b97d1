//! Build-step records from a real buildkitd: each RUN step's container runs in
//! its own cgroup below the engine's, and the agent records its duration, CPU,
//! peak memory and I/O, the build it belonged to (from BuildKit's build
//! history), and an OOM kill; records reach the control plane at least once
//! across a broken health stream, /readyz and the step histograms.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::proto::v1 as pb;
use std::path::{Path, PathBuf};
use support::engine::{readyz, wait_ready, World};
use support::{agent, metric_value};

/// Busy for a second of wall time: about a second of CPU when a core is free.
const BURN_CPU: &str = "/bin/busybox timeout 1 /bin/busybox sh -c 'while :; do :; done' || true";
/// dd's buffer is one block: 100 MiB allocated, then filled from /dev/zero
/// five times over, so the step holds it for a few of the watcher's polls (a
/// peak reached in the last poll interval before the step exits can be missed
/// when runc removes the cgroup first: see the notes).
const ALLOCATE_100_MIB: &str = "/bin/busybox dd if=/dev/zero of=/dev/null bs=100M count=5";
const SHORT: &str = "/bin/busybox usleep 50000";

/// A context whose Dockerfile copies a static busybox into a scratch image
/// and runs each of `scripts` as a RUN step of its own; a fresh marker per
/// context keeps the steps out of the cache.
fn steps_context(dir: &Path, scripts: &[&str]) -> PathBuf {
    let ctx = dir.join(format!("ctx-{}", support::engine::rand_suffix()));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
    std::fs::write(ctx.join("marker"), support::engine::rand_suffix()).unwrap();
    let mut dockerfile = String::from("FROM scratch\nCOPY busybox /bin/busybox\nCOPY marker /marker\n");
    for script in scripts {
        dockerfile += &format!("RUN [\"/bin/busybox\", \"sh\", \"-c\", {}]\n", serde_json::to_string(script).unwrap());
    }
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    ctx
}

/// An agent registered with `cp`, Ready; `env` added to its environment.
async fn ready_agent(w: &World, cp: &support::control_plane::ControlPlaneDouble, task_id: &str, env: &[(&str, String)]) -> (support::AgentProcess, String) {
    w.use_control_plane(cp);
    let mut builder = agent(&w.config);
    for (k, v) in env {
        builder = builder.env(k, v);
    }
    let agent = builder.start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    cp.push(support::control_plane::buildkit_task(task_id, &w.root.join("mnt")));
    let base = wait_ready(&agent).await;
    (agent, base)
}

fn records_of(rec: &support::control_plane::Recorded, build_ref: &str) -> Vec<(pb::StepRecord, usize)> {
    let mut steps: Vec<_> = rec.step_records().into_values().filter(|(r, _)| r.overlapping_build_refs.iter().any(|b| b == build_ref)).collect();
    steps.sort_by_key(|(r, _)| r.first_seen_unix_ms);
    steps
}

#[allow(clippy::cast_precision_loss)]
fn seconds(r: &pb::StepRecord) -> f64 {
    (r.last_seen_unix_ms - r.first_seen_unix_ms) as f64 / 1000.0
}

#[tokio::test]
async fn three_steps_are_recorded_with_their_figures_and_build_and_reach_the_control_plane_across_a_broken_stream() {
    let w = World::new();
    let cp = support::control_plane::control_plane().start();
    let (_agent, base) = ready_agent(&w, &cp, "steps", &[]).await;

    let ctx = steps_context(&w.root, &[BURN_CPU, ALLOCATE_100_MIB, SHORT]);
    let (out, build_ref) = support::engine::build_with_ref(&w, &ctx);
    assert!(out.status.success(), "the build succeeds: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!build_ref.is_empty(), "buildctl wrote the build's ref");

    let rec = cp.wait_for("the build's three step records", |r| records_of(r, &build_ref).len() >= 3).await;
    let steps = records_of(&rec, &build_ref);
    assert_eq!(steps.len(), 3, "three RUN steps, three records: {steps:#?}");
    eprintln!("step records: {steps:#?}");
    let (cpu, memory, short) = (&steps[0].0, &steps[1].0, &steps[2].0);
    for (r, _) in &steps {
        assert_eq!(r.build_ref, build_ref, "one build ran throughout each step: {r:?}");
        assert_eq!(r.overlapping_build_refs, vec![build_ref.clone()], "{r:?}");
        assert!(!r.oom_killed && r.oom_kill_id == 0, "{r:?}");
    }
    // Orders of magnitude: a loaded 2-core machine (others compiling) stretches
    // time and gives a busy loop as little as a quarter of a core.
    assert!((0.8..10.0).contains(&seconds(cpu)), "the CPU step ran about a second: {cpu:?}");
    assert!((0.1..3.0).contains(&cpu.cpu_seconds), "and burned a good part of it: {cpu:?}");
    assert!(cpu.cpu_seconds > 4.0 * short.cpu_seconds && cpu.cpu_seconds > memory.cpu_seconds, "more than the others: {steps:#?}");
    // The order of magnitude: runc may remove the cgroup before the last poll
    // reads it, and then the record carries the poll before (up to 20 ms of
    // growth missed; see the README's step records).
    assert!((50 << 20..400 << 20).contains(&memory.peak_memory_bytes), "the allocating step peaked near 100 MiB: {memory:?}");
    assert!(cpu.peak_memory_bytes < 50 << 20, "the CPU step allocated little: {cpu:?}");
    assert!((0.04..5.0).contains(&seconds(short)), "the short step ran about 50 ms (and runc's setup): {short:?}");
    assert!(short.cpu_seconds < 0.5, "{short:?}");

    // The stream breaks; the next one carries every record again (at least once).
    let reports_before = rec.health.len();
    let opened_before = rec.health_streams_opened;
    cp.break_health_streams();
    let rec = cp
        .wait_for("the step records again on a new health stream", |r| {
            r.health_streams_opened > opened_before
                && r.health[reports_before.min(r.health.len())..].iter().flat_map(|h| &h.step_records).filter(|s| s.build_ref == build_ref).count() >= 3
        })
        .await;
    let again = records_of(&rec, &build_ref);
    assert_eq!(again.len(), 3, "deduplicated by container id, still three: {again:#?}");
    assert!(again.iter().all(|(_, arrivals)| *arrivals >= 2), "each was sent again after the break: {again:#?}");
    for ((first, _), (later, _)) in steps.iter().zip(&again) {
        assert_eq!(first, later, "the record resent is the record sent");
    }
    assert_eq!(rec.health.last().unwrap().step_records_dropped_total, 0);

    // /readyz's recent steps and the histograms.
    let (_, ready) = readyz(&base).await;
    let shown: Vec<&str> = ready["recent_steps"].as_array().unwrap().iter().map(|s| s["container_id"].as_str().unwrap()).collect();
    for (r, _) in &steps {
        assert!(shown.contains(&r.container_id.as_str()), "{} on /readyz: {ready}", r.container_id);
    }
    assert!(ready["step_records_total"].as_u64().unwrap() >= 3, "{ready}");
    let scrape = support::http_get(&base, "/metrics").await.1;
    for name in ["duration_seconds", "peak_memory_bytes", "cpu_seconds"] {
        let count = metric_value(&scrape, &format!("machine_agent_build_step_{name}_count")).unwrap_or(0.0);
        assert!(count >= 3.0, "machine_agent_build_step_{name} counts the steps: {scrape}");
    }
    support::promtool_check(&scrape);
}

/// The engine cgroup's limit: room for buildkitd and a small step, not for a 256 MiB buffer.
const ENGINE_LIMIT_BYTES: u64 = 192 << 20;

#[tokio::test]
async fn an_oom_killed_step_is_recorded_as_such_with_the_kills_container_id() {
    let w = World::new();
    let cp = support::control_plane::control_plane().start();
    let reserve = support::mem_total_bytes() - ENGINE_LIMIT_BYTES;
    let (_agent, _base) = ready_agent(&w, &cp, "steps-oom", &[("MACHINE_AGENT__ENGINE__MEMORY_RESERVE_BYTES", reserve.to_string())]).await;

    let ctx = steps_context(&w.root, &["/bin/busybox dd if=/dev/zero of=/dev/null bs=256M count=1"]);
    let (out, build_ref) = support::engine::build_with_ref(&w, &ctx);
    assert!(!out.status.success(), "a step over the memory limit cannot succeed");

    let rec = cp
        .wait_for("the OOM-killed step's record", |r| {
            r.step_records().values().any(|(s, _)| s.overlapping_build_refs.contains(&build_ref) && s.oom_kill_id != 0)
        })
        .await;
    let kills: Vec<pb::OomKill> = rec
        .health
        .iter()
        .flat_map(|h| h.oom_kills.iter().cloned())
        .filter(|k| k.attribution == pb::OomAttribution::BuildStep as i32 && k.task_memcg.contains(&support::test_cgroup_name(&w.root)))
        .collect();
    assert_eq!(kills.len().min(1), 1, "the kill is reported: {kills:#?}");
    let kill = &kills[0];
    let (step, _) = rec.step_records().remove(&kill.container_id).expect("a record for the killed step's container");
    assert!(step.oom_killed, "{step:?}");
    assert_eq!(step.oom_kill_id, kill.id, "the record names the kill: {step:?} {kill:?}");
    assert_eq!(step.build_ref, build_ref, "{step:?}");
}
