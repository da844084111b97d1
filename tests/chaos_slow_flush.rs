//! A drain over a cache whose flush is slow still tells the control plane
//! what happened before the drain deadline: a flush (or an unmount) that would
//! overrun is abandoned, logged and reported, and systemd's SIGKILL never
//! lands before `ReportShutdown`.
//!
//! The slow disk is real: a loop device over a sparse file, its writes
//! throttled by the cgroup-v1 blkio controller at the root of the hierarchy
//! (`blkio.throttle.write_bps_device` for that one device only), and the
//! cache filled with dirty pages the kernel has not written yet. Writeback is
//! done by kernel flusher threads in the root cgroup, so the root's throttle
//! is the one that applies; the throttle is removed on drop, before the loop
//! device is detached (its number may be someone else's next).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::proto::v1 as pb;
use nix::sys::signal::Signal;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::engine::World;

/// The cgroup-v1 blkio throttle of the root cgroup.
const THROTTLE: &str = "/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device";
/// The slow disk's write rate: 256 MiB of dirty data take 64 s to write back,
/// four times the 15 s drain deadline of the test config.
const SLOW_BPS: u64 = 4 << 20;
const DIRTY_BYTES: usize = 256 << 20;
/// The drain deadline `support::base_config` sets.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Writes to one block device throttled to a rate until dropped.
struct Throttle {
    rule: String,
}

impl Throttle {
    fn device(device: &Path, bps: u64) -> Self {
        assert!(Path::new(THROTTLE).exists(), "this test needs the cgroup-v1 blkio controller at /sys/fs/cgroup/blkio");
        let rdev = std::fs::metadata(device).unwrap().rdev();
        let rule = format!("{}:{}", nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        std::fs::write(THROTTLE, format!("{rule} {bps}")).unwrap();
        Self { rule }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        // A rate of 0 removes the rule.
        if let Err(error) = std::fs::write(THROTTLE, format!("{} 0", self.rule)) {
            eprintln!("cannot remove the blkio throttle {}: {error}", self.rule);
        }
    }
}

#[tokio::test]
async fn a_drain_over_a_slow_flush_reports_shutdown_before_its_deadline() {
    let w = World::new();
    let device = support::loopdev::LoopDevice::new(2 << 30);
    let cp = support::control_plane::control_plane().start();
    w.use_control_plane(&cp);
    let mut agent = support::agent(&w.config).start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    let mut task = support::control_plane::buildkit_task("slow-flush", &w.root.join("mnt"));
    if let pb::register_response::Task::Buildkit(t) = &mut task {
        t.mounts[0].source = Some(pb::volume_mount::Source::Device(pb::BlockDevice { path: device.path.display().to_string(), ebs_volume_id: String::new() }));
    }
    cp.push(task);
    agent.wait_for_log_within("to=ready", Duration::from_secs(60)).await;

    // Declared after the device: dropped (unthrottled) before it is detached.
    let throttle = Throttle::device(&device.path, SLOW_BPS);
    let cache: PathBuf = w.cache();
    let mut dirty = std::fs::File::create(cache.join("dirty")).unwrap();
    let block = vec![0x6bu8; 1 << 20];
    for _ in 0..DIRTY_BYTES / block.len() {
        dirty.write_all(&block).unwrap();
    }
    drop(dirty);

    agent.signal(Signal::SIGTERM);
    // The report must arrive within the deadline (a margin for the report's own round trip).
    let rec = cp.wait_for_within(DRAIN_TIMEOUT + Duration::from_secs(3), "the shutdown report, within the drain deadline", |r| !r.shutdowns.is_empty()).await;
    let shutdown = &rec.shutdowns[0];
    assert!(!shutdown.unmounted, "a cache whose flush did not finish is not called unmounted: {shutdown:?}");
    assert!(
        shutdown.errors.iter().any(|e| e.contains(&cache.display().to_string()) && e.contains("deadline") && e.contains("abandoned")),
        "the report says which mount overran the deadline: {:?}",
        shutdown.errors
    );
    assert!(shutdown.drain_duration_ms <= u64::try_from(DRAIN_TIMEOUT.as_millis()).unwrap(), "{shutdown:?}");
    agent.wait_for_log("abandoned").await;

    // Once the disk is fast again the abandoned flush finishes and the agent exits.
    drop(throttle);
    let status = agent.wait_exit(Duration::from_secs(60)).await;
    assert!(!status.success(), "an abandoned release is not a clean drain");
}
