//! The cache reset: the control plane asks to wipe a cache mount of the
//! running task. A real agent, a real buildkitd on a loop-device volume, the
//! control-plane double over real TLS. The reset empties the cache (the
//! engine's DiskUsage and the filesystem) and the engine serves again; a
//! request naming the wrong filesystem UUID or task touches nothing; a reset
//! while a build runs is refused unless it cancels builds.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::proto::v1 as pb;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::control_plane::{buildkit_task, control_plane, ControlPlaneDouble};
use support::engine::{build_context, buildctl_build, readyz, step_running, unix_addr, wait_ready, World};
use support::{agent, eventually, http_get, metric_value, trace_init, AgentProcess, BUILDCTL};

const TASK_ID: &str = "task-reset";

/// An agent registered with `cp`, ready with the engine on a file-backed volume.
async fn ready_agent(w: &World, cp: &ControlPlaneDouble) -> (AgentProcess, String) {
    w.use_control_plane(cp);
    let agent = agent(&w.config).start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    cp.push(buildkit_task(TASK_ID, &w.root.join("mnt")));
    let base = wait_ready(&agent).await;
    (agent, base)
}

/// The cache mount's filesystem UUID, as /readyz names it (once the sampler has read the mount).
async fn cache_uuid(base: &str, cache: &Path) -> String {
    let path = cache.display().to_string();
    let mut body = serde_json::Value::Null;
    for _ in 0..100 {
        body = readyz(base).await.1;
        if body["volumes"].as_array().unwrap().iter().any(|v| v["path"] == path && v["filesystem_uuid"].is_string()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let volume = body["volumes"].as_array().unwrap().iter().find(|v| v["path"] == path).unwrap_or_else(|| panic!("no {cache:?} in {body}"));
    assert_eq!(volume["cache_mode"], "primary", "{volume}");
    assert_eq!(volume["kind"], "file", "{volume}");
    volume["filesystem_uuid"].as_str().unwrap_or_else(|| panic!("no UUID in {volume}")).to_string()
}

/// The engine's cache records, by `buildctl du`'s own count.
fn cache_records(w: &World) -> usize {
    let out = Command::new(BUILDCTL).args(unix_addr(w)).args(["du", "--format", "{{json .}}"]).output().unwrap();
    assert!(out.status.success(), "buildctl du: {}", String::from_utf8_lossy(&out.stderr));
    // One JSON array of the records (or one object per line, in older releases).
    let text = String::from_utf8_lossy(&out.stdout);
    match serde_json::from_str::<serde_json::Value>(text.trim()) {
        Ok(serde_json::Value::Array(records)) => records.len(),
        _ => text.lines().filter(|l| l.trim_start().starts_with('{')).count(),
    }
}

fn reset(request_id: &str, task_id: &str, mount: &Path, uuid: &str, cancel_builds: bool) -> pb::CacheReset {
    pb::CacheReset {
        request_id: request_id.into(),
        task_id: task_id.into(),
        mount_path: mount.display().to_string(),
        filesystem_uuid: uuid.into(),
        cancel_builds,
    }
}

/// Waits for the health stream to carry the result of `request_id`.
async fn result_of(cp: &ControlPlaneDouble, request_id: &str) -> pb::CacheResetResult {
    let rec = cp
        .wait_for_within(Duration::from_secs(120), &format!("the result of cache reset {request_id}"), |r| {
            r.health.iter().any(|h| h.cache_reset.as_ref().is_some_and(|c| c.request_id == request_id))
        })
        .await;
    rec.health.iter().rev().find_map(|h| h.cache_reset.clone().filter(|c| c.request_id == request_id)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_empties_the_cache_and_the_engine_serves_again_while_a_wrong_uuid_or_task_touches_nothing() {
    trace_init();
    let cp = control_plane().start();
    let w = World::new();
    let (agent, base) = ready_agent(&w, &cp).await;
    let ctx = build_context(&w.root, "echo built > /out.txt", 4096);
    let built = buildctl_build(&unix_addr(&w), &ctx, &w.root.join("out-1"));
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let records = cache_records(&w);
    assert!(records > 0, "the build left cache records");
    let marker = w.cache().join("written-before-the-reset");
    std::fs::write(&marker, "data").unwrap();
    let uuid = cache_uuid(&base, &w.cache()).await;
    let engine = agent.children();
    // The health stream names the mount's mode, kind and filesystem as /readyz does.
    let cache = w.cache().display().to_string();
    let rec = cp
        .wait_for("a health report naming the cache's filesystem", |r| {
            r.health.iter().any(|h| h.mounts.iter().any(|m| m.path == cache && !m.filesystem_uuid.is_empty()))
        })
        .await;
    let stats = rec.health.iter().rev().find_map(|h| h.mounts.iter().find(|m| m.path == cache)).unwrap();
    assert_eq!((stats.cache_mode.as_str(), stats.volume_kind.as_str(), stats.filesystem_uuid.as_str()), ("primary", "file", uuid.as_str()));
    let scrape = http_get(&base, "/metrics").await.1;
    let info = format!("machine_agent_volume_info{{kind=\"file\",mode=\"primary\",mount=\"{cache}\"}}");
    assert_eq!(metric_value(&scrape, &info), Some(1.0), "{info} in:\n{scrape}");

    // A UUID that is not the mounted filesystem's: stale or misrouted. Nothing moves.
    cp.push_reset(reset("r-wrong-uuid", TASK_ID, &w.cache(), "00000000-0000-4000-8000-000000000000", false));
    let refused = result_of(&cp, "r-wrong-uuid").await;
    assert_eq!(refused.outcome, "refused", "{refused:?}");
    assert!(refused.error.contains("stale or misrouted"), "{refused:?}");
    // Another task's request: refused too.
    cp.push_reset(reset("r-wrong-task", "task-other", &w.cache(), &uuid, false));
    let refused = result_of(&cp, "r-wrong-task").await;
    assert_eq!(refused.outcome, "refused", "{refused:?}");
    assert!(refused.error.contains("not task-other"), "{refused:?}");
    assert!(marker.exists(), "a refused reset touched the cache");
    assert_eq!(agent.children(), engine, "a refused reset restarted the engine");
    assert_eq!(cache_uuid(&base, &w.cache()).await, uuid);

    cp.push_reset(reset("r-1", TASK_ID, &w.cache(), &uuid, false));
    let done = result_of(&cp, "r-1").await;
    assert_eq!(done.outcome, "done", "{done:?}");
    assert!(!done.filesystem_uuid.is_empty() && done.filesystem_uuid != uuid, "a new filesystem: {done:?}");
    agent.wait_for_log("cache reset done").await;
    eventually("the agent to be ready on the reset cache", Duration::from_secs(60), || {
        agent.logs().rsplit("cache reset done").next().is_some_and(|after| after.contains("to=ready"))
    })
    .await;
    assert!(!marker.exists(), "the reset left the old filesystem's files");
    assert_eq!(cache_records(&w), 0, "the engine's cache is empty after the reset");
    assert_eq!(cache_uuid(&base, &w.cache()).await, done.filesystem_uuid, "/readyz names the new filesystem");
    let (_, body) = readyz(&base).await;
    assert_eq!(body["cache_reset"]["outcome"], "done", "{body}");
    assert!(body["last_gc"].is_null() || body["engine_restarts"] == 0, "the figures start over: {body}");
    assert_ne!(agent.children(), engine, "the engine was restarted on the new filesystem");

    // A repeat of a request id is not acted on again.
    cp.push_reset(reset("r-1", TASK_ID, &w.cache(), &done.filesystem_uuid, false));
    // The engine serves builds on the empty cache.
    let again = buildctl_build(&unix_addr(&w), &ctx, &w.root.join("out-2"));
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let output = String::from_utf8_lossy(&again.stderr);
    assert!(!output.contains("CACHED"), "nothing of the old cache is left to reuse:\n{output}");
    assert_eq!(agent.logs().matches("cache reset requested").count(), 3, "the repeat was ignored");
    let scrape = http_get(&base, "/metrics").await.1;
    for (outcome, count) in [("done", 1.0), ("refused", 2.0), ("failed", 0.0)] {
        let series = format!("machine_agent_cache_resets_total{{outcome=\"{outcome}\"}}");
        assert_eq!(metric_value(&scrape, &series), Some(count), "{series}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_during_a_build_is_refused_unless_it_cancels_builds() {
    trace_init();
    let cp = control_plane().start();
    let w = World::new();
    let (agent, base) = ready_agent(&w, &cp).await;
    let uuid = cache_uuid(&base, &w.cache()).await;
    let tag = format!("reset-step-{}", support::engine::rand_suffix());
    let ctx = build_context(&w.root, &format!("sleep 120; echo {tag}"), 1024);
    let mut build = Command::new(BUILDCTL)
        .args(unix_addr(&w))
        .args(["build", "--frontend", "dockerfile.v0", "--progress", "plain"])
        .arg(format!("--local=context={}", ctx.display()))
        .arg(format!("--local=dockerfile={}", ctx.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the build step to run", Duration::from_secs(60), || step_running(&tag)).await;

    cp.push_reset(reset("r-busy", TASK_ID, &w.cache(), &uuid, false));
    let refused = result_of(&cp, "r-busy").await;
    assert_eq!(refused.outcome, "refused", "{refused:?}");
    assert!(refused.error.contains("builds in flight"), "{refused:?}");
    assert!(step_running(&tag), "a refused reset stopped the build");
    assert!(build.try_wait().unwrap().is_none(), "the build is still running");

    cp.push_reset(reset("r-cancel", TASK_ID, &w.cache(), &uuid, true));
    let done = result_of(&cp, "r-cancel").await;
    assert_eq!(done.outcome, "done", "{done:?}");
    let status = tokio::task::spawn_blocking(move || build.wait()).await.unwrap().unwrap();
    assert!(!status.success(), "the build in flight was cancelled by the reset");
    assert!(!step_running(&tag), "no process of the cancelled step is left");
    eventually("the agent to be ready again", Duration::from_secs(60), || {
        agent.logs().rsplit("cache reset done").next().is_some_and(|after| after.contains("to=ready"))
    })
    .await;
}
