//! A failing cache disk is noticed: the agent goes degraded with the reason
//! within seconds, says so on the health stream, and its drain reports the
//! filesystem as known dirty instead of a clean exit.
//!
//! The failing disk is real: a loop device over a sparse file on a small tmpfs
//! that the test fills, so the device's writes start failing (EIO) under a
//! mounted ext4, as a dying EBS volume's would.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::proto::v1 as pb;
use nix::sys::signal::Signal;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::engine::World;

/// A loop device over `backing`, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(backing: &Path) -> Self {
        let out = std::process::Command::new("losetup").args(["--find", "--show"]).arg(backing).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Self(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_cache_disk_whose_writes_fail_makes_the_agent_degraded_and_the_drain_report_it_dirty() {
    let w = World::new();
    let disk_fs = w.root.join("disk-fs");
    std::fs::create_dir_all(&disk_fs).unwrap();
    let _tmpfs = support::loopdev::mount_tmpfs(&disk_fs, 192 << 20);
    let backing = disk_fs.join("disk.img");
    std::fs::File::create(&backing).unwrap().set_len(1 << 30).unwrap();
    let device = Loop::attach(&backing);

    let cp = support::control_plane::control_plane().start();
    w.use_control_plane(&cp);
    let mut agent = support::agent(&w.config).env("MACHINE_AGENT__AGENT__SAMPLE_INTERVAL_MS", "500").start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    let mut task = support::control_plane::buildkit_task("failing-disk", &w.root.join("mnt"));
    if let pb::register_response::Task::Buildkit(t) = &mut task {
        t.mounts[0].source = Some(pb::volume_mount::Source::Device(pb::BlockDevice { path: device.0.display().to_string(), ebs_volume_id: String::new() }));
    }
    cp.push(task);
    agent.wait_for_log_within("to=ready", Duration::from_secs(60)).await;

    // The device's writes start failing; a build keeps writing to the cache.
    support::fill_filesystem(&disk_fs.join("filler"));
    let cache = w.root.join("mnt/cache");
    let mut junk = std::fs::File::create(cache.join("junk")).unwrap();
    for _ in 0..64 {
        let _ = junk.write_all(&[0x3c; 1 << 20]);
    }
    drop(junk);

    agent.wait_for_log_within("cache filesystem is failing", Duration::from_secs(30)).await;
    let rec = cp
        .wait_for("a degraded health report naming the failing cache", |r| {
            r.health.iter().any(|h| h.agent_state == pb::AgentState::Degraded as i32 && h.state_reason.contains("is failing"))
        })
        .await;
    let report = rec.health.iter().rev().find(|h| h.agent_state == pb::AgentState::Degraded as i32).unwrap();
    assert!(report.state_reason.contains(&cache.display().to_string()), "the reason names the mount: {}", report.state_reason);

    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(40)).await;
    assert!(!status.success(), "a drain over a failing disk is not a clean exit");
    let rec = cp.wait_for("the shutdown report", |r| !r.shutdowns.is_empty()).await;
    let shutdown = &rec.shutdowns[0];
    assert!(shutdown.filesystem_dirty, "the shutdown report says the filesystem is dirty: {shutdown:?}");
    assert!(!shutdown.errors.is_empty(), "and why: {shutdown:?}");
}
