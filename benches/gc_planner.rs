//! The GC planner on 10k, 100k and 1M synthetic cache records: median wall time
//! of BENCH_RUNS runs (default 5), time per record (flat or slowly rising means
//! n log n, not n^2), and the peak RSS the planning adds, measured in a child
//! process per size so one size's freed heap cannot hide the next one's.
//!
//! The records look like a busy builder's cache: chains of 5 to 20 layers, half
//! of them branching off an existing layer (shared bases), a few merges with two
//! parents, 3% in use, 1% shared, last use spread over 16 days (so about 1 in 8
//! is past the 14-day retention), sizes from 4 KiB to 512 MiB, 10% with a known
//! inode count. The cache is 5% above keep_bytes, 5% of the bytes and 2% of the
//! inodes are free, so every kind of victim shows up.
//!
//! `cargo bench --bench gc_planner`

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails loudly
#![allow(clippy::disallowed_types)] // wall-clock timing is the point of a bench; no paused clock here

use machine_agent::gc::planner::{plan_prune, Plan, Policy, Reason, Record, RecordType};
use machine_agent::volume::stats::FsStats;
use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SIZES: [usize; 3] = [10_000, 100_000, 1_000_000];
/// Set in the child that measures one size's memory.
const CHILD_ENV: &str = "GC_PLANNER_BENCH_CHILD";

/// splitmix64: deterministic input without depending on rand's API.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// An index below `len`.
    fn pick(&mut self, len: usize) -> usize {
        usize::try_from(self.below(len as u64)).unwrap()
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A 25-character id like BuildKit's record ids.
    fn id(&mut self) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        (0..25).map(|_| char::from(ALPHABET[self.pick(ALPHABET.len())])).collect()
    }
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn records(n: usize) -> Vec<Record> {
    let mut rng = Rng(n as u64);
    let mut out: Vec<Record> = Vec::with_capacity(n);
    while out.len() < n {
        let depth = 5 + rng.pick(16);
        // Half the chains build on an existing layer: a shared base image.
        let mut parent = (!out.is_empty() && rng.chance(50)).then(|| rng.pick(out.len()));
        let chain_used_secs_ago = rng.below(16 * 24 * 3600);
        for layer in 0..depth {
            if out.len() == n {
                break;
            }
            let mut parents: Vec<String> = parent.map(|p| out[p].id.clone()).into_iter().collect();
            if !out.is_empty() && rng.chance(2) {
                parents.push(out[rng.pick(out.len())].id.clone());
            }
            let used = now() - Duration::from_secs(chain_used_secs_ago.saturating_sub(layer as u64 * 60));
            out.push(Record {
                id: rng.id(),
                // Log-uniform from 4 KiB to 512 MiB.
                size_bytes: 4096 << rng.below(18) | rng.below(4096),
                parents,
                last_used: (!rng.chance(5)).then_some(used),
                created_at: used - Duration::from_secs(rng.below(3600)),
                usage_count: rng.below(20),
                in_use: rng.chance(3),
                shared: rng.chance(1),
                record_type: RecordType::Regular,
                inodes: rng.chance(10).then(|| rng.below(600)),
            });
            parent = Some(out.len() - 1);
        }
    }
    out
}

fn setup(n: usize) -> (Vec<Record>, FsStats, Policy) {
    let records = records(n);
    let cache: u64 = records.iter().map(|r| r.size_bytes).sum();
    let total_bytes = cache / 90 * 100;
    let fs = FsStats { total_bytes, free_bytes: total_bytes / 20, total_inodes: n as u64 * 300, free_inodes: n as u64 * 300 / 50 };
    (records, fs, Policy::new(cache / 100 * 95))
}

fn status_kib(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap()
}

/// In the child: peak RSS that planning adds above the resident input, in KiB.
fn measure_memory(n: usize) {
    let (records, fs, policy) = setup(n);
    let before = status_kib("VmRSS:");
    // "5" resets the peak (VmHWM) to the current RSS (Linux 4.0+).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let plan = plan_prune(&records, &fs, &policy, now());
    let peak = status_kib("VmHWM:");
    black_box(&plan);
    println!("{before} {}", peak.saturating_sub(before));
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn describe(plan: &Plan) -> String {
    let count = |reason| plan.victims.iter().filter(|v| v.reason == reason).count();
    format!(
        "{} ret / {} keep / {} bytes / {} inodes{}",
        count(Reason::Retention),
        count(Reason::KeepBytes),
        count(Reason::FreeBytes),
        count(Reason::FreeInodes),
        if plan.shortfall.is_some() { ", short" } else { "" }
    )
}

fn main() {
    if let Ok(n) = std::env::var(CHILD_ENV) {
        measure_memory(n.parse().unwrap());
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    println!("gc planner, median of {runs} runs, release build");
    println!(
        "{:>9} | {:>8} | {:>10} | {:>10} | {:>9} | {:>13} | {:>11} | {:>10} | {:>11} | victims by reason",
        "records", "victims", "median ms", "min ms", "ns/record", "ns/(n log2 n)", "input MiB", "peak +MiB", "bytes/record"
    );
    for n in SIZES {
        let (records, fs, policy) = setup(n);
        let mut times = Vec::with_capacity(runs);
        let mut plan = Plan::default();
        for _ in 0..runs {
            let started = Instant::now();
            let planned = black_box(plan_prune(black_box(&records), &fs, &policy, now()));
            times.push(started.elapsed());
            plan = planned; // the previous plan drops outside the timed part
        }
        drop(records);
        let min = *times.iter().min().unwrap();
        let med = median(times);

        let child = Command::new(std::env::current_exe().unwrap()).env(CHILD_ENV, n.to_string()).output().unwrap();
        assert!(child.status.success(), "memory child: {}", String::from_utf8_lossy(&child.stderr));
        let out = String::from_utf8(child.stdout).unwrap();
        let mut kib = out.split_whitespace().map(|v| v.parse::<u64>().unwrap());
        let (input_kib, peak_kib) = (kib.next().unwrap(), kib.next().unwrap());

        let nf = n as f64;
        println!(
            "{:>9} | {:>8} | {:>10.2} | {:>10.2} | {:>9.1} | {:>13.2} | {:>11.1} | {:>10.1} | {:>11.0} | {}",
            n,
            plan.victims.len(),
            med.as_secs_f64() * 1e3,
            min.as_secs_f64() * 1e3,
            med.as_secs_f64() * 1e9 / nf,
            med.as_secs_f64() * 1e9 / (nf * nf.log2()),
            input_kib as f64 / 1024.0,
            peak_kib as f64 / 1024.0,
            peak_kib as f64 * 1024.0 / nf,
            describe(&plan),
        );
    }
    pressure_check_cost();
}

/// What one pressure check between GC runs costs: a statvfs of the cache
/// volume and the planner's watermark test with no records, as the GC loop
/// does it. Decides how short the default check interval can be.
fn pressure_check_cost() {
    let policy = Policy::new(1 << 30);
    let calls = 100_000u32;
    let started = Instant::now();
    let mut pressed = 0u32;
    for _ in 0..calls {
        let fs = machine_agent::volume::stats::read_fs_stats(std::path::Path::new("/")).unwrap();
        pressed += u32::from(machine_agent::gc::schedule::under_pressure(black_box(&fs), &policy));
    }
    let per_call = started.elapsed() / calls;
    black_box(pressed);
    println!(
        "pressure check (statvfs + watermark test): {:.2} us per check; every 200 ms that is {:.4} % of one core",
        per_call.as_secs_f64() * 1e6,
        per_call.as_secs_f64() / 0.2 * 100.0
    );
}
