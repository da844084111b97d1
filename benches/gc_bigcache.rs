//! GC on a big cache, with the real buildkitd: `DiskUsage` time and bytes
//! through the agent's own client, and a GC run end to end (DiskUsage, plan,
//! prune in batches) on caches of 10,000 and 40,000 records.
//!
//! The caches are built once by `scripts/build-bigcache.sh <records>` (COPY
//! steps across many builds; about a minute per thousand records on 2 busy
//! cores) and kept under /var/cache/machine-agent-bigcache/<records>/root. A
//! size without a complete cache is skipped with the command that builds it.
//!
//! For each cache the bench starts buildkitd over it (its own GC off) and
//! prints:
//! - the first DiskUsage after the start. On a cache no DiskUsage has read
//!   yet, this is the cold figure: buildkitd sizes every record on disk, once,
//!   and keeps the sizes; later runs print a warm figure here too;
//! - BENCH_DU_RUNS (default 5) more DiskUsage calls: min, median, max;
//! - the answer's bytes (protobuf) and how many calls it took (1 unless paged);
//! - a dry-run GC (DiskUsage + plan over every record);
//! - with BENCH_GC_PRUNE=1, a real GC run pruning every unused record, on a
//!   copy of the cache (`cp -a`, removed after), so the kept cache stays whole;
//!   BENCH_GC_BATCH ids per Prune (default 64, the agent's default).
//!
//! `cargo bench --bench gc_bigcache` (root, after scripts/install-buildkit.sh);
//! BENCH_BIGCACHE_SIZES=10000,40000 to choose the caches. The DiskUsage calls
//! here wait up to BENCH_DU_TIMEOUT_SECS (3600), far past the agent's own
//! timeout, so that a cold figure is measured rather than cut off.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails loudly

use machine_agent::engine::client::EngineClient;
use machine_agent::gc::executor::{run_gc, Trigger};
use machine_agent::gc::planner::Policy;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

const BIGCACHE_DIR: &str = "/var/cache/machine-agent-bigcache";
const BUILDKITD: &str = "/usr/local/bin/buildkitd";
/// A 40,000-record cache loads in seconds; a minute means something is wrong.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// buildkitd over `root`, killed and reaped on drop.
struct Engine {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Engine {
    async fn start(root: &Path) -> Engine {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("buildkitd.sock");
        let config = dir.path().join("buildkitd.toml");
        std::fs::write(
            &config,
            format!(
                "root = \"{}\"\n[grpc]\naddress = [\"unix://{}\"]\n[worker.oci]\nenabled = true\ngc = false\n[worker.containerd]\nenabled = false\n",
                root.display(),
                socket.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("buildkitd.log")).unwrap();
        let child = Command::new(BUILDKITD).arg("--config").arg(&config).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let engine = Engine { child, socket, _dir: dir };
        machine_agent::engine::client::wait_ready(&engine.socket, START_TIMEOUT).await.expect("buildkitd ready");
        engine
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()), nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Every unused record is a retention victim: the whole cache goes, in plan order.
fn prune_everything() -> Policy {
    Policy { retention: Duration::from_secs(1), min_age: Duration::ZERO, ..Policy::new(u64::MAX) }
}

async fn measure(records: u64, root: &Path) {
    let engine = Engine::start(root).await;
    // The bench measures how long a cold DiskUsage takes, so it waits far past the agent's timeout.
    let client = EngineClient::connect(&engine.socket).await.unwrap().with_disk_usage_timeout(Duration::from_secs(env_or("BENCH_DU_TIMEOUT_SECS", 3600)));
    let started = Instant::now();
    let first = client.disk_usage_paged().await.expect("the first DiskUsage");
    let first_took = started.elapsed();
    println!(
        "cache {records}: first DiskUsage after start {:.0} ms: {} records, {} bytes ({:.2} MiB) in {} call(s)",
        ms(first_took),
        first.records.len(),
        first.bytes,
        first.bytes as f64 / f64::from(1 << 20),
        first.calls
    );
    let runs: usize = env_or("BENCH_DU_RUNS", 5);
    let mut took = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let usage = client.disk_usage_paged().await.expect("DiskUsage");
        took.push(started.elapsed());
        assert_eq!(usage.records.len(), first.records.len(), "nothing builds meanwhile");
    }
    took.sort();
    if let (Some(min), Some(max)) = (took.first(), took.last()) {
        println!("cache {records}: DiskUsage warm x{runs}: min {:.0} ms, median {:.0} ms, max {:.0} ms", ms(*min), ms(took[runs / 2]), ms(*max));
    }
    let dry = run_gc(&client, root, &prune_everything(), Trigger::Manual, 64, true).await.expect("dry run");
    println!("cache {records}: GC dry run (DiskUsage + plan): {:.0} ms, {} victims", ms(dry.duration), dry.planned_records);
    drop(client);
    drop(engine);

    if env_or("BENCH_GC_PRUNE", 0) == 1 {
        let scratch = tempfile::Builder::new().prefix("machine-agent-bigcache-").tempdir_in(root.parent().unwrap()).unwrap();
        let copy = scratch.path().join("root");
        let started = Instant::now();
        let status = Command::new("cp").arg("-a").arg(root).arg(&copy).status().unwrap();
        assert!(status.success(), "cp -a");
        println!("cache {records}: copied for the prune in {:.1} s", started.elapsed().as_secs_f64());
        let engine = Engine::start(&copy).await;
        let client = EngineClient::connect(&engine.socket).await.unwrap().with_disk_usage_timeout(Duration::from_secs(env_or("BENCH_DU_TIMEOUT_SECS", 3600)));
        let batch: usize = env_or("BENCH_GC_BATCH", 64);
        let report = run_gc(&client, &copy, &prune_everything(), Trigger::Manual, batch, false).await.expect("GC run");
        println!(
            "cache {records}: GC run end to end (DiskUsage + plan + prune, batches of {batch}): {:.1} s, planned {} freed {} records, error: {:?}",
            report.duration.as_secs_f64(),
            report.planned_records,
            report.freed_records,
            report.error
        );
        drop(client);
        drop(engine);
    }
}

#[tokio::main]
async fn main() {
    let sizes: String = env_or("BENCH_BIGCACHE_SIZES", "10000,40000".to_string());
    for records in sizes.split(',').filter_map(|s| s.trim().parse::<u64>().ok()) {
        let dir = Path::new(BIGCACHE_DIR).join(records.to_string());
        if !dir.join("done").exists() {
            println!("cache {records}: not built; run `sudo bash scripts/build-bigcache.sh {records}` first");
            continue;
        }
        measure(records, &dir.join("root")).await;
    }
}
