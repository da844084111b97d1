//! Preparing a blank 100 GiB sparse loop device, ext4 and xfs: the agent's
//! whole prepare (probe, blkid, mkfs, mount, verify, grow check) against the
//! same mkfs + mount run by hand, median of RUNS each, and the ratio.
//!
//! `cargo bench --bench volume` (root; BENCH_GIB and BENCH_RUNS to change the size and count).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails loudly
#![allow(clippy::disallowed_types)] // wall-clock timing is the point of a bench; no paused clock here

#[path = "../tests/support/mod.rs"]
mod support;

use machine_agent::task::{FsType, VolumeMount, VolumeSource};
use machine_agent::volume::format::mkfs_command;
use machine_agent::volume::manager::{prepare_mount, release_mount};
use std::process::Command;
use std::time::Duration;
use support::loopdev::LoopDevice;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let gib: u64 = std::env::var("BENCH_GIB").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let settings =
        support::volume_settings(&std::env::temp_dir().join("machine-agent-volume-bench"), &std::env::temp_dir(), "volume-bench", Default::default());
    println!("prepare a blank {gib} GiB sparse loop device, median of {runs} runs");
    println!("{:<6} {:>12} {:>14} {:>8} {:>22}", "fs", "agent (ms)", "by hand (ms)", "ratio", "of which probe (ms)");
    for fs in [FsType::Ext4, FsType::Xfs] {
        let mut agent_times = vec![];
        let mut hand_times = vec![];
        let mut probe_times = vec![];
        for _ in 0..runs {
            // The agent's prepare.
            let lo = LoopDevice::new(gib << 30);
            let started = std::time::Instant::now();
            assert!(rt.block_on(machine_agent::volume::signature::read_device_signature(&lo.path)).unwrap().is_none());
            probe_times.push(started.elapsed());
            let dir = tempfile::tempdir().unwrap();
            let at = dir.path().canonicalize().unwrap().join("cache");
            let m = VolumeMount {
                mount_path: at.clone(),
                source: VolumeSource::Device { path: lo.path.clone(), ebs_volume_id: None },
                fs_type: fs,
                options: vec!["noatime".into()],
                skip_trim: true,
                cache_mode: Default::default(),
            };
            let started = std::time::Instant::now();
            let p = rt.block_on(prepare_mount(&settings, &m, true)).unwrap();
            agent_times.push(started.elapsed());
            assert!(rt.block_on(release_mount(&settings, &p)).unmounted);
            drop(lo);

            // The same mkfs and mount by hand.
            let lo = LoopDevice::new(gib << 30);
            let line = mkfs_command(fs, &lo.path, None);
            let at = dir.path().canonicalize().unwrap().join("by-hand");
            std::fs::create_dir_all(&at).unwrap();
            let started = std::time::Instant::now();
            assert!(Command::new(&line.program).args(&line.args).status().unwrap().success());
            assert!(Command::new("mount").args(["-o", "noatime"]).arg(&lo.path).arg(&at).status().unwrap().success());
            hand_times.push(started.elapsed());
            assert!(Command::new("umount").arg(&at).status().unwrap().success());
        }
        let (a, h, p) = (median(agent_times), median(hand_times), median(probe_times));
        println!(
            "{:<6} {:>12.1} {:>14.1} {:>8.3} {:>22.1}",
            fs.as_str(),
            a.as_secs_f64() * 1e3,
            h.as_secs_f64() * 1e3,
            a.as_secs_f64() / h.as_secs_f64(),
            p.as_secs_f64() * 1e3
        );
    }
}
