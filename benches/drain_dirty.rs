//! How long a drain takes with dirty data on the cache: the real agent and
//! buildkitd over an ext4 loop device (a sparse file on the host's disk),
//! BENCH_DIRTY_MIB (default 1024) of unwritten page cache in the cache volume
//! at SIGTERM, and the drain's figure from the shutdown report the control
//! plane double receives (engine stop, syncfs, fstrim, unmount).
//!
//! With BENCH_THROTTLE_MIBPS set, the loop device's writes are throttled by
//! the cgroup-v1 blkio controller (as in tests/chaos_slow_flush.rs), to see a
//! drain that meets its deadline by abandoning the flush.
//!
//! `cargo bench --bench drain_dirty` (root, after scripts/install-buildkit.sh).
//! The drain deadline is 120 s here (BENCH_DRAIN_SECS), so an unthrottled
//! flush finishes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails loudly

#[path = "../tests/support/mod.rs"]
mod support;

use machine_agent::proto::v1 as pb;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;
use support::engine::World;
use tokio::time::Instant;

const THROTTLE: &str = "/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let dirty_mib = env_or("BENCH_DIRTY_MIB", 1024);
    let drain_secs = env_or("BENCH_DRAIN_SECS", 120);
    let throttle_mibps = env_or("BENCH_THROTTLE_MIBPS", 0);
    let w = World::new();
    let text = std::fs::read_to_string(&w.config).unwrap().replace("drain_timeout_secs = 15", &format!("drain_timeout_secs = {drain_secs}"));
    std::fs::write(&w.config, text).unwrap();
    let device = support::loopdev::LoopDevice::new((dirty_mib + 1024) << 20);
    let cp = support::control_plane::control_plane().start();
    w.use_control_plane(&cp);
    let mut agent = support::agent(&w.config).start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    let mut task = support::control_plane::buildkit_task("drain-bench", &w.root.join("mnt"));
    if let pb::register_response::Task::Buildkit(t) = &mut task {
        t.mounts[0].source = Some(pb::volume_mount::Source::Device(pb::BlockDevice { path: device.path.display().to_string(), ebs_volume_id: String::new() }));
    }
    cp.push(task);
    agent.wait_for_log_within("to=ready", Duration::from_secs(60)).await;

    let rule = {
        let rdev = std::fs::metadata(&device.path).unwrap().rdev();
        format!("{}:{}", nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))
    };
    if throttle_mibps > 0 {
        std::fs::write(THROTTLE, format!("{rule} {}", throttle_mibps << 20)).unwrap();
    }
    let started = Instant::now();
    let mut dirty = std::fs::File::create(w.cache().join("dirty")).unwrap();
    let block = vec![0x6bu8; 1 << 20];
    for _ in 0..dirty_mib {
        dirty.write_all(&block).unwrap();
    }
    drop(dirty);
    println!("wrote {dirty_mib} MiB to the page cache in {:.2} s", started.elapsed().as_secs_f64());

    let signalled = Instant::now();
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let rec = cp.wait_for_within(Duration::from_secs(drain_secs + 30), "the shutdown report", |r| !r.shutdowns.is_empty()).await;
    let report = &rec.shutdowns[0];
    println!(
        "drain with {dirty_mib} MiB dirty{}: {} ms by the report ({:.2} s from SIGTERM to the report's arrival); unmounted {}; errors {:?}",
        if throttle_mibps > 0 { format!(" (writes throttled to {throttle_mibps} MiB/s)") } else { String::new() },
        report.drain_duration_ms,
        signalled.elapsed().as_secs_f64(),
        report.unmounted,
        report.errors
    );
    if throttle_mibps > 0 {
        std::fs::write(THROTTLE, format!("{rule} 0")).unwrap();
    }
    let _ = agent.wait_exit(Duration::from_secs(120)).await;
}
