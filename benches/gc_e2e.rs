//! How long a full cache volume takes to recover: seconds from the moment
//! statvfs shows free bytes below the GC's start watermark (the high
//! watermark) until it shows them at or above the stop watermark (the low
//! watermark), with the real agent and a real buildkitd on a 2 GiB ext4 loop
//! volume, at the default watermarks (start below 10 %, stop at 20 %).
//!
//! Setup: the agent with `min_age_secs = 0` and its default pressure check
//! (every 250 ms; BENCH_PRESSURE_CHECK_MS to
//! change it), so the figure is detection (at most one check period) plus
//! the GC run itself. Builds put records
//! of 32 MiB each in the cache (a RUN step writing zeros: no context to
//! send); a file outside the cache takes the rest of the volume, so that
//! free bytes sit just above the start watermark. Each repetition tops the
//! cache up with builds so at least 1.5x the watermark gap is prunable,
//! resizes the filler to leave free bytes 4 MiB above the start watermark,
//! then allocates a 16 MiB file: the crossing. The bench polls statvfs every
//! millisecond from there until the volume is back at the stop watermark.
//!
//! `cargo bench --bench gc_e2e` (root, after scripts/install-buildkit.sh;
//! BENCH_RUNS to change the count of repetitions, default 10; under a
//! minute on 2 cores).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails loudly

#[path = "../tests/support/mod.rs"]
mod support;

use machine_agent::engine::client::EngineClient;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;
use support::engine::{buildctl_build_cache_only, rand_suffix, unix_addr, World};
use support::{agent, engine_socket, WAIT};
use tokio::time::Instant;

/// Bytes of zeros each build's RUN step writes: one cache record.
const RECORD_MIB: u64 = 32;
/// Free bytes above the start watermark before the crossing.
const MARGIN: u64 = 4 << 20;
/// What the crossing allocates; more than `MARGIN`.
const PUSH: u64 = 16 << 20;
/// Far above a healthy recovery (a second or two); a repetition that hits it fails the bench.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);

fn statvfs_free(path: &Path) -> (u64, u64) {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    (s.blocks_available() * s.fragment_size(), s.blocks() * s.fragment_size())
}

/// Prunable bytes in the cache: what DiskUsage reports not in use and not shared.
async fn prunable_bytes(socket: &Path) -> u64 {
    let records = EngineClient::connect(socket).await.unwrap().disk_usage().await.unwrap();
    records.iter().filter(|r| !r.in_use && !r.shared).map(|r| r.size_bytes).sum()
}

/// One build adding one `RECORD_MIB` record (its RUN layer) to the cache.
fn build_record(w: &World) {
    let ctx = w.root.join(format!("ctx-{}", rand_suffix()));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
    let script = format!("/bin/busybox dd if=/dev/zero of=/blob bs=1M count={RECORD_MIB} 2>/dev/null && echo {} > /name", rand_suffix());
    let dockerfile = format!("FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", {}]\n", serde_json::to_string(&script).unwrap());
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    let out = buildctl_build_cache_only(&unix_addr(w), &ctx);
    assert!(out.status.success(), "build: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&ctx).unwrap();
}

/// Grows (by fallocate: blocks allocated, nothing written) or shrinks the
/// filler so that free bytes on the volume are `want_free`.
fn set_free(cache: &Path, want_free: u64) {
    let path = cache.join("filler");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    let (free, _) = statvfs_free(cache);
    if free > want_free {
        let grow = i64::try_from(free - want_free).unwrap();
        nix::fcntl::fallocate(file.as_raw_fd(), nix::fcntl::FallocateFlags::empty(), i64::try_from(len).unwrap(), grow).unwrap();
    } else {
        file.set_len(len.saturating_sub(want_free - free)).unwrap();
    }
    file.sync_all().unwrap();
}

/// One repetition's figures.
struct Rep {
    needed: u64,
    freed_bytes: u64,
    freed_records: u64,
    /// From the crossing to the start of the GC run (the pressure check's period, at most).
    detect_secs: f64,
    run_secs: f64,
    recovery_secs: f64,
}

/// Seconds since midnight UTC, of now or of a log line's RFC 3339 timestamp.
fn day_secs_now() -> f64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    since.as_secs_f64() % 86_400.0
}

fn day_secs_of_log(line: &str) -> f64 {
    let stamp = line.split_whitespace().next().unwrap();
    let clock = stamp.split('T').nth(1).unwrap().trim_end_matches('Z');
    let parts: Vec<f64> = clock.split(':').map(|p| p.parse().unwrap()).collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

/// `freed N records M bytes` and `took D` from a pressure run's log line.
fn parse_run(line: &str) -> (u64, u64, f64) {
    let freed = line.split("; freed ").nth(1).unwrap();
    let words: Vec<&str> = freed.split_whitespace().collect();
    let records = words[0].parse().unwrap();
    let bytes = words[2].parse().unwrap();
    let took = line.rsplit("took ").next().unwrap().trim();
    let secs = if let Some(ms) = took.strip_suffix("ms") {
        ms.parse::<f64>().unwrap() / 1e3
    } else if let Some(us) = took.strip_suffix("µs") {
        us.parse::<f64>().unwrap() / 1e6
    } else {
        took.strip_suffix('s').unwrap().parse().unwrap()
    };
    (records, bytes, secs)
}

async fn pressure_lines(agent: &support::AgentProcess, at_least: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines: Vec<String> = agent.logs().lines().filter(|l| l.contains("gc run trigger=pressure")).map(str::to_string).collect();
        if lines.len() >= at_least {
            return lines;
        }
        assert!(Instant::now() < deadline, "no pressure run #{at_least} within {WAIT:?}; log:\n{}", agent.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let w = World::new();
    let mut builder = agent(&w.config)
        .standalone(&w.task)
        .env("MACHINE_AGENT_LOG", "info")
        .env("MACHINE_AGENT__GC__MIN_AGE_SECS", "0")
        .env("MACHINE_AGENT__GC__INTERVAL_SECS", "3600"); // only pressure triggers a run
                                                          // Unset: the agent's default check interval.
    if let Ok(ms) = std::env::var("BENCH_PRESSURE_CHECK_MS") {
        builder = builder.env("MACHINE_AGENT__GC__PRESSURE_CHECK_MS", &ms);
    }
    let agent = builder.start();
    let ready = Instant::now() + Duration::from_secs(60);
    while !agent.logs().contains("to=ready") {
        assert!(Instant::now() < ready, "the agent was not ready within 60 s; log:\n{}", agent.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cache = w.cache();
    let socket = engine_socket(&w.root);
    let (_, total) = statvfs_free(&cache);
    let (start_bytes, stop_bytes) = (total / 100 * 10, total / 100 * 20);
    let gap = stop_bytes - start_bytes;

    let mut reps = vec![];
    for rep in 1..=runs {
        let _ = std::fs::remove_file(cache.join("push"));
        // Room for the builds first, then enough prunable cache for this run.
        set_free(&cache, stop_bytes + gap);
        let mut builds = 0;
        while prunable_bytes(&socket).await < gap * 3 / 2 {
            build_record(&w);
            builds += 1;
        }
        set_free(&cache, start_bytes + MARGIN);
        let runs_before = agent.logs().matches("gc run trigger=pressure").count();

        let push = std::fs::File::create(cache.join("push")).unwrap();
        nix::fcntl::fallocate(push.as_raw_fd(), nix::fcntl::FallocateFlags::empty(), 0, i64::try_from(PUSH).unwrap()).unwrap();
        push.write_all_at(b"x", 0).unwrap();
        let deadline = Instant::now() + RECOVERY_TIMEOUT;
        let ((crossed, crossed_wall), free_at_crossing) = loop {
            let (free, _) = statvfs_free(&cache);
            if free < start_bytes {
                break ((Instant::now(), day_secs_now()), free);
            }
            assert!(Instant::now() < deadline, "free bytes {free} never fell below the start watermark {start_bytes}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let recovered = loop {
            let (free, _) = statvfs_free(&cache);
            if free >= stop_bytes {
                break Instant::now();
            }
            assert!(Instant::now() < deadline, "free bytes {free} not back at the stop watermark {stop_bytes} within {RECOVERY_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let lines = pressure_lines(&agent, runs_before + 1).await;
        let (freed_records, freed_bytes, run_secs) = parse_run(&lines[runs_before]);
        eprintln!("rep {rep}: {builds} builds topped the cache up; {}", lines[runs_before]);
        reps.push(Rep {
            needed: stop_bytes - free_at_crossing,
            freed_bytes,
            freed_records,
            // rem_euclid: a run that ends just after midnight
            detect_secs: (day_secs_of_log(&lines[runs_before]) - run_secs - crossed_wall).rem_euclid(86_400.0),
            run_secs,
            recovery_secs: recovered.duration_since(crossed).as_secs_f64(),
        });
    }

    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "gc end to end: 2 GiB ext4 loop volume, real buildkitd, start below 10 % / stop at 20 % free, pressure check {}, {RECORD_MIB} MiB records",
        std::env::var("BENCH_PRESSURE_CHECK_MS").map_or_else(|_| "the default (250 ms)".to_string(), |ms| format!("{ms} ms"))
    );
    println!("{:>4} {:>12} {:>12} {:>8} {:>10} {:>10} {:>14}", "rep", "needed MiB", "freed MiB", "records", "detect s", "gc run s", "cross->low s");
    for (i, r) in reps.iter().enumerate() {
        println!(
            "{:>4} {:>12.1} {:>12.1} {:>8} {:>10.3} {:>10.3} {:>14.3}",
            i + 1,
            mib(r.needed),
            mib(r.freed_bytes),
            r.freed_records,
            r.detect_secs,
            r.run_secs,
            r.recovery_secs
        );
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "median: crossing -> back at the stop watermark {:.3} s; crossing -> GC run starts {:.3} s; the GC run {:.3} s ({} repetitions)",
        median(reps.iter().map(|r| r.recovery_secs).collect()),
        median(reps.iter().map(|r| r.detect_secs).collect()),
        median(reps.iter().map(|r| r.run_secs).collect()),
        reps.len()
    );
    drop(agent);
}
