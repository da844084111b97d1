//! Cache modes on a file-backed volume on xfs: task-to-mounted time of a
//! clone (reflink of the committed copy, attach, mount) against a primary on
//! the same data (attach, mount), median of RUNS each; and the commit (the
//! reflink at a primary's release) on its own, median of RUNS.
//!
//! `cargo bench --bench cache_modes` (root; BENCH_FILL_GIB and BENCH_RUNS to
//! change the data written and the count, BENCH_FILE_KIB to write it as many
//! files of that size, which fragments the backing file like a real cache).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails loudly
#![allow(clippy::disallowed_types)] // wall-clock timing is the point of a bench; no paused clock here

#[path = "../tests/support/mod.rs"]
mod support;

use machine_agent::task::{CacheMode, FsType, VolumeMount, VolumeSource};
use machine_agent::volume::file_modes::commit_primary;
use machine_agent::volume::manager::{prepare_mount, release_mount, VolumeSettings};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::loopdev::LoopDevice;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn settings(root: &Path, volumes: &Path, owner: &str) -> VolumeSettings {
    support::volume_settings(root, volumes, owner, Default::default())
}

fn mount_of(root: &Path, backing: &Path, mode: CacheMode, size_bytes: u64) -> VolumeMount {
    VolumeMount {
        mount_path: root.join("mnt").join(mode.as_str()),
        source: VolumeSource::File { path: backing.into(), size_bytes },
        fs_type: FsType::Ext4,
        options: vec![],
        skip_trim: true,
        cache_mode: mode,
    }
}

/// Writes `bytes` of varied data under `dir`: one file, or files of
/// `file_bytes` each (many small files scatter the backing file's extents
/// the way a real cache does), then syncs the filesystem.
fn fill(dir: &Path, bytes: u64, file_bytes: Option<u64>) {
    let chunk_len = file_bytes.unwrap_or(8 << 20).min(8 << 20) as usize;
    let mut chunk = vec![0u8; chunk_len];
    let mut f = std::fs::File::create(dir.join("data")).unwrap();
    let mut in_file = 0u64;
    for i in 0..bytes / chunk_len as u64 {
        if file_bytes.is_some_and(|n| in_file >= n) {
            f = std::fs::File::create(dir.join(format!("data-{i}"))).unwrap();
            in_file = 0;
        }
        for (j, b) in chunk.iter_mut().enumerate().step_by(4096) {
            *b = (i ^ j as u64).to_le_bytes()[0];
        }
        f.write_all(&chunk).unwrap();
        in_file += chunk_len as u64;
    }
    drop(f);
    nix::unistd::sync();
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        support::cleanup_volumes_under(&self.0);
    }
}

fn main() {
    let fill_gib: u64 = std::env::var("BENCH_FILL_GIB").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let file_bytes: Option<u64> = std::env::var("BENCH_FILE_KIB").ok().and_then(|s| s.parse::<u64>().ok()).map(|k| k << 10);
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let volume_bytes = (fill_gib + 2) << 30;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let host = LoopDevice::new(volume_bytes + (4 << 30));
    host.mkfs("xfs", &["-m", "reflink=1"]);
    let _cleanup = Cleanup(root.clone());
    let host_mount = support::loopdev::mount(&host.path, &root.join("host"), "xfs");
    let volumes = host_mount.path.join("volumes");
    std::fs::create_dir(&volumes).unwrap();
    std::fs::set_permissions(&volumes, std::fs::Permissions::from_mode(0o700)).unwrap();
    let backing = volumes.join("project.img");
    let primary_settings = settings(&root, &volumes, "bench-primary");
    let clone_settings = settings(&root, &volumes, "bench-clone");
    let primary = mount_of(&root, &backing, CacheMode::Primary, volume_bytes);
    let clone = mount_of(&root, &backing, CacheMode::Clone, volume_bytes);

    // The primary's data, then its first commit.
    let p = rt.block_on(prepare_mount(&primary_settings, &primary, true)).unwrap();
    let started = Instant::now();
    fill(&primary.mount_path, fill_gib << 30, file_bytes);
    let fill_time = started.elapsed();
    let report = rt.block_on(release_mount(&primary_settings, &p));
    assert!(report.commit.as_ref().is_some_and(|c| c.copy.is_ok()), "{report:?}");
    let extents = std::process::Command::new("xfs_bmap")
        .arg(&backing)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count().saturating_sub(1))
        .unwrap_or(0);

    let (mut primary_times, mut clone_times, mut commit_times) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        let started = Instant::now();
        let p = rt.block_on(prepare_mount(&primary_settings, &primary, true)).unwrap();
        primary_times.push(started.elapsed());
        let report = rt.block_on(release_mount(&primary_settings, &p));
        assert!(report.errors.is_empty(), "{report:?}");

        let started = Instant::now();
        let c = rt.block_on(prepare_mount(&clone_settings, &clone, true)).unwrap();
        clone_times.push(started.elapsed());
        let report = rt.block_on(release_mount(&clone_settings, &c));
        assert!(report.errors.is_empty() && report.destroyed.is_some(), "{report:?}");

        let started = Instant::now();
        commit_primary(&primary_settings.allowed_backing_dirs, &backing).unwrap();
        commit_times.push(started.elapsed());
    }
    let files = file_bytes.map_or("one file".to_string(), |n| format!("files of {} KiB", n >> 10));
    println!(
        "file-backed ext4 volume of {} GiB on xfs, {fill_gib} GiB written as {files} ({:.0} ms to write; backing file in {extents} extents), median of {runs} runs",
        volume_bytes >> 30,
        ms(fill_time)
    );
    println!("{:<34} {:>10}", "task to mounted: primary (ms)", format!("{:.1}", ms(median(primary_times))));
    println!("{:<34} {:>10}", "task to mounted: clone (ms)", format!("{:.1}", ms(median(clone_times))));
    println!("{:<34} {:>10}", "commit: reflink at release (ms)", format!("{:.1}", ms(median(commit_times))));
}
