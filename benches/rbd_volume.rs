//! Preparing an RBD cache volume through the fuse mapper (rbd-fuse + loop)
//! against a file-backed volume of the same size, with a real single-node
//! cluster: the manager's whole prepare of a blank volume (map, probe, mkfs,
//! mount) and of one that holds a filesystem (map, probe, mount), median of
//! RUNS each; then the throughput of sequential cache writes (256 MiB,
//! fsync'd) onto each.
//!
//! `cargo bench --bench rbd_volume` (root; BENCH_RUNS to change the count).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails loudly
#![allow(clippy::disallowed_types)] // wall-clock timing is the point of a bench; no paused clock here

#[path = "../tests/support/mod.rs"]
mod support;

use machine_agent::secret::Secret;
use machine_agent::task::{FsType, RbdImage, VolumeMount, VolumeSource};
use machine_agent::volume::manager::{prepare_mount, release_mount};
use machine_agent::volume::rbd::MapperChoice;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};
use support::ceph::{cluster, unique_name};

const VOLUME_BYTES: u64 = 2 << 30;
const WRITE_BYTES: usize = 256 << 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Writes WRITE_BYTES in 1 MiB chunks under `dir` and fsyncs; MB/s.
fn write_throughput(dir: &Path) -> f64 {
    let chunk = vec![0x5au8; 1 << 20];
    let path = dir.join("throughput");
    let started = Instant::now();
    let mut file = std::fs::File::create(&path).unwrap();
    for _ in 0..WRITE_BYTES / chunk.len() {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
    let took = started.elapsed();
    std::fs::remove_file(&path).unwrap();
    WRITE_BYTES as f64 / 1e6 / took.as_secs_f64()
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let c = cluster();
    println!("cluster ready in {:?}", c.startup);
    let pool = unique_name("bench");
    c.create_pool(&pool);
    let client = unique_name("builder");
    let key = c.create_client(&client, &pool);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let settings = support::volume_settings(&root, &root, "rbd-bench", MapperChoice::Fuse);
    let rbd_mount = |image: &str| VolumeMount {
        mount_path: root.join("mnt/rbd"),
        source: VolumeSource::Rbd(RbdImage {
            pool: pool.clone(),
            namespace: None,
            image: image.into(),
            client_id: client.clone(),
            key: Secret::new(key.clone()),
            monitors: vec![c.monitor_addrs()[0].clone()],
            conf: vec![],
            create_size_bytes: None,
            take_over_from: None,
        }),
        fs_type: FsType::Ext4,
        options: vec!["noatime".into()],
        skip_trim: true,
        cache_mode: Default::default(),
    };
    let file_mount = |n: usize| VolumeMount {
        mount_path: root.join("mnt/file"),
        source: VolumeSource::File { path: root.join(format!("cache-{n}.img")), size_bytes: VOLUME_BYTES },
        fs_type: FsType::Ext4,
        options: vec!["noatime".into()],
        skip_trim: true,
        cache_mode: Default::default(),
    };

    let (mut rbd_blank, mut rbd_existing, mut file_blank, mut file_existing) = (vec![], vec![], vec![], vec![]);
    let (mut rbd_mbs, mut file_mbs) = (vec![], vec![]);
    for n in 0..runs {
        let image = unique_name("cache");
        c.create_image(&pool, &image, VOLUME_BYTES);
        for (mount, blank, existing, mbs) in
            [(rbd_mount(&image), &mut rbd_blank, &mut rbd_existing, &mut rbd_mbs), (file_mount(n), &mut file_blank, &mut file_existing, &mut file_mbs)]
        {
            let started = Instant::now();
            let prepared = rt.block_on(prepare_mount(&settings, &mount, false)).unwrap();
            blank.push(started.elapsed());
            assert!(prepared.formatted);
            mbs.push(write_throughput(&mount.mount_path));
            assert!(rt.block_on(release_mount(&settings, &prepared)).errors.is_empty());
            let started = Instant::now();
            let prepared = rt.block_on(prepare_mount(&settings, &mount, false)).unwrap();
            existing.push(started.elapsed());
            assert!(!prepared.formatted);
            assert!(rt.block_on(release_mount(&settings, &prepared)).errors.is_empty());
        }
        let _ = std::fs::remove_file(root.join(format!("cache-{n}.img")));
    }
    let median_mbs = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("prepare of a {} GiB ext4 cache volume, median of {runs} runs", VOLUME_BYTES >> 30);
    println!("{:<22} {:>16} {:>19} {:>22}", "volume", "blank (ms)", "existing fs (ms)", "256 MiB write (MB/s)");
    println!("{:<22} {:>16.0} {:>19.0} {:>22.0}", "rbd (rbd-fuse + loop)", ms(median(rbd_blank)), ms(median(rbd_existing)), median_mbs(rbd_mbs));
    println!("{:<22} {:>16.0} {:>19.0} {:>22.0}", "file (loop)", ms(median(file_blank)), ms(median(file_existing)), median_mbs(file_mbs));
}
