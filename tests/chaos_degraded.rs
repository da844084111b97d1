//! Degraded is a state to leave: a step that failed (prepare, engine start)
//! runs again on a capped schedule while the task stands, and the agent gets
//! to Ready on its own once the cause goes away - no restart, no re-sent task.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use std::path::PathBuf;
use std::time::Duration;
use support::loopdev::LoopDevice;
use support::{agent, base_config, http_get, write_task_file};

const DEVICE_BYTES: u64 = 1 << 30;
/// The retry schedule doubles from 1 s; 1 + 2 + 4 + 8 s covers a cause fixed a few seconds in.
const RECOVERY: Duration = Duration::from_secs(60);

async fn readyz(base: &str) -> serde_json::Value {
    serde_json::from_str(&http_get(base, "/readyz").await.1).unwrap()
}

#[tokio::test]
async fn a_refused_device_is_prepared_without_a_restart_once_an_operator_wipes_it_as_advised() {
    let lo = LoopDevice::new(DEVICE_BYTES);
    run("mkswap", &[lo.path.to_str().unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, base_config(dir.path())).unwrap();
    let task = support::device_task_file(dir.path(), &lo.path);

    let agent = agent(&config).standalone(&task).start();
    let base = agent.detail_endpoints().await;
    agent.wait_for_log("to=degraded").await;
    let ready = readyz(&base).await;
    let reason = ready["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("swap") && reason.contains("retrying in"), "the reason names the cause and the retry: {ready}");
    assert!(reason.contains("blkdiscard -z <device>"), "the refusal gives the advice: {reason}");

    // The operator follows the advice; the agent notices by itself.
    run("blkdiscard", &["-z", lo.path.to_str().unwrap()]);
    agent.wait_for_log_within("to=ready", RECOVERY).await;
    assert_eq!(readyz(&base).await["state"], "ready");
    assert!(agent.logs().contains("retrying the volume preparation after: volume: refusing"), "the retry is logged with its cause");
}

#[tokio::test]
async fn a_device_that_appears_after_the_wait_is_prepared_without_a_restart() {
    let lo = LoopDevice::new(DEVICE_BYTES);
    let dir = tempfile::tempdir().unwrap();
    // A name of this test's own under /dev that points at the loop device only later.
    let late = PathBuf::from(format!("/dev/mar-late-{}", dir.path().file_name().unwrap().to_string_lossy().trim_start_matches('.')));
    let _link = Removed(late.clone());
    let config = dir.path().join("config.toml");
    std::fs::write(&config, base_config(dir.path()).replace("unmount_timeout_secs = 5", "unmount_timeout_secs = 5\ndevice_wait_secs = 1")).unwrap();
    let task = support::device_task_file(dir.path(), &late);

    let agent = agent(&config).standalone(&task).start();
    let base = agent.detail_endpoints().await;
    agent.wait_for_log("to=degraded").await;
    let ready = readyz(&base).await;
    assert!(ready["reason"].as_str().unwrap().contains(late.to_str().unwrap()), "the reason names the missing device: {ready}");

    std::os::unix::fs::symlink(&lo.path, &late).unwrap();
    agent.wait_for_log_within("to=ready", RECOVERY).await;
    assert!(agent.logs().contains("formatting blank device"), "the late device was prepared");
}

#[tokio::test]
async fn a_task_that_failed_on_a_full_state_dir_is_served_once_space_is_freed() {
    let w = support::engine::World::new();
    // The state dir is a small tmpfs of this test's own, filled after the agent started, before the task.
    let state = w.root.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let _tmpfs = support::loopdev::mount_tmpfs(&state, 1 << 20);
    let cp = support::control_plane::control_plane().start();
    w.use_control_plane(&cp);
    let agent = agent(&w.config).start();
    let base = agent.detail_endpoints().await;
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    let filler = state.join("filler");
    support::fill_filesystem(&filler);
    cp.push(support::control_plane::buildkit_task("full-state-dir", &w.root.join("mnt")));

    agent.wait_for_log("to=degraded").await;
    let ready = readyz(&base).await;
    assert!(ready["reason"].as_str().unwrap().contains("No space left on device"), "the reason names the full disk: {ready}");
    assert!(agent.children().is_empty(), "no engine was spawned");

    std::fs::remove_file(&filler).unwrap();
    agent.wait_for_log_within("to=ready", RECOVERY).await;
    assert!(agent.logs().contains("retrying the "), "the retry is logged");
}

#[tokio::test]
async fn an_engine_start_that_failed_writing_its_tls_files_succeeds_once_the_path_is_clear() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the engine's TLS directory goes: the write fails until it is removed.
    let blocker = dir.path().join("state/engine/tls");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"in the way").unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, base_config(dir.path())).unwrap();
    let task = write_task_file(dir.path(), &dir.path().join("mnt"));

    let agent = agent(&config).standalone(&task).start();
    let base = agent.detail_endpoints().await;
    agent.wait_for_log("to=degraded").await;
    let ready = readyz(&base).await;
    assert!(ready["reason"].as_str().unwrap().starts_with("engine: "), "the engine start failed: {ready}");
    assert!(agent.children().is_empty(), "no engine was spawned");

    std::fs::remove_file(&blocker).unwrap();
    agent.wait_for_log_within("to=ready", RECOVERY).await;
    assert!(agent.logs().contains("retrying the engine start after: engine: "), "the retry is logged with its cause");
}

fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A path of this test's own under /dev, removed on drop.
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
