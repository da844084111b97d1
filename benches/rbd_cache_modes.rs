//! RBD cache modes with a real single-node cluster and the fuse mapper:
//! the manager's prepare of a CLONE of an image holding DATA_BYTES of data
//! (list the primary's snapshots, clone the newest commit, mark it, map,
//! mount) against a PRIMARY prepare of that same image (map, probe, mount),
//! median of RUNS each; then a primary's commit alone (wait for no client,
//! snapshot, protect, prune to keep 2), median of RUNS.
//!
//! `cargo bench --bench rbd_cache_modes` (root; BENCH_RUNS to change the count).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails loudly
#![allow(clippy::disallowed_types)] // wall-clock timing is the point of a bench; no paused clock here

#[path = "../tests/support/mod.rs"]
mod support;

use machine_agent::secret::Secret;
use machine_agent::task::{CacheMode, FsType, RbdImage, VolumeMount, VolumeSource};
use machine_agent::volume::manager::{prepare_mount, release_mount};
use machine_agent::volume::rbd::cli::CephClient;
use machine_agent::volume::rbd::credentials::{remove_credentials, write_credentials};
use machine_agent::volume::rbd::{modes, MapperChoice};
use std::io::Write;
use std::time::{Duration, Instant};
use support::ceph::{cluster, unique_name};

const VOLUME_BYTES: u64 = 3 << 30;
const DATA_BYTES: usize = 2 << 30;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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
    let image = RbdImage {
        pool: pool.clone(),
        namespace: None,
        image: unique_name("cache"),
        client_id: client.clone(),
        key: Secret::new(key.clone()),
        monitors: vec![c.monitor_addrs()[0].clone()],
        conf: vec![],
        create_size_bytes: Some(VOLUME_BYTES),
        take_over_from: None,
    };
    let mount = |mode: CacheMode| VolumeMount {
        mount_path: root.join(format!("mnt/{}", mode.as_str())),
        source: VolumeSource::Rbd(image.clone()),
        fs_type: FsType::Ext4,
        options: vec!["noatime".into()],
        skip_trim: true,
        cache_mode: mode,
    };

    // The primary: formatted, DATA_BYTES written and synced, committed at release.
    let primary = mount(CacheMode::Primary);
    let mut prepared = rt.block_on(prepare_mount(&settings, &primary, false)).unwrap();
    prepared.task_id = "bench".into();
    let started = Instant::now();
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]).collect();
    let mut file = std::fs::File::create(primary.mount_path.join("data")).unwrap();
    for _ in 0..DATA_BYTES / chunk.len() {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    println!("wrote {} GiB to the primary in {:.1}s", DATA_BYTES >> 30, started.elapsed().as_secs_f64());
    let report = rt.block_on(release_mount(&settings, &prepared));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.commit.as_ref().is_some_and(|c| c.copy.is_ok()), "{:?}", report.commit);

    let (mut primary_times, mut clone_times) = (vec![], vec![]);
    for _ in 0..runs {
        for (mode, times) in [(CacheMode::Primary, &mut primary_times), (CacheMode::Clone, &mut clone_times)] {
            let m = mount(mode);
            let started = Instant::now();
            let mut p = rt.block_on(prepare_mount(&settings, &m, false)).unwrap();
            times.push(started.elapsed());
            assert!(!p.formatted);
            assert_eq!(std::fs::metadata(m.mount_path.join("data")).unwrap().len(), DATA_BYTES as u64);
            p.skip_trim = true;
            p.task_id = "bench".into();
            let report = rt.block_on(release_mount(&settings, &p));
            assert!(report.errors.is_empty(), "{mode:?}: {:?}", report.errors);
            assert_eq!(report.destroyed.is_some(), mode == CacheMode::Clone);
        }
    }

    // The commit alone, on the unmapped, unlocked primary: what a clean drain adds.
    let files = write_credentials(&root.join("rbd-bench-commit"), "commit", &image).unwrap();
    let ceph = CephClient { conf: files.conf.clone(), client_id: client.clone() };
    let mut commit_times = vec![];
    for _ in 0..runs {
        let started = Instant::now();
        rt.block_on(modes::commit(&ceph, &image, "bench", 2)).unwrap();
        commit_times.push(started.elapsed());
        // Snapshot names have one-second resolution.
        rt.block_on(tokio::time::sleep(Duration::from_secs(1).saturating_sub(started.elapsed())));
    }
    remove_credentials(&files).unwrap();

    println!("rbd (rbd-fuse + loop), {} GiB image holding {} GiB of data, median of {runs} runs", VOLUME_BYTES >> 30, DATA_BYTES >> 30);
    println!("{:<44} {:>10.0} ms", "prepare, primary (map, probe, mount)", ms(median(primary_times)));
    println!("{:<44} {:>10.0} ms", "prepare, clone (snap ls, clone, mark, map..)", ms(median(clone_times)));
    println!("{:<44} {:>10.0} ms", "commit (snapshot, protect, prune to 2)", ms(median(commit_times)));
}
