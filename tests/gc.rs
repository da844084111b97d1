//! The agent's cache GC loop against the real buildkitd on a loop-device
//! volume: a free-space watermark crossed while Ready is answered by a
//! pressure run that prunes the least recently used builds first, and an
//! engine that cannot be read defers the run without hurting the agent.
//! Retention prunes records unused for too long whatever the free space; a
//! running build's records survive a full-disk run and the build succeeds; an
//! ext4 made with few inodes is collected by the inode watermark alone.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::engine::client::{CacheRecord, EngineClient};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use support::engine::{build_context, buildctl_build, readyz, small_files_context, unix_addr, wait_ready, World};
use support::{agent, engine_socket, eventually, http_get, metric_value};

async fn records(socket: &Path) -> Vec<CacheRecord> {
    EngineClient::connect(socket).await.unwrap().disk_usage().await.unwrap()
}

/// Builds one image (its own payload layer, and a RUN layer naming it) and
/// returns the records it added. The local-source records of the context are
/// shared by every build: they are the first build's, and used by each.
async fn build(w: &World, name: &str, payload_bytes: usize) -> Vec<CacheRecord> {
    let socket = engine_socket(&w.root);
    let before: BTreeSet<String> = records(&socket).await.into_iter().map(|r| r.id).collect();
    let ctx = build_context(&w.root, &format!("/bin/busybox echo {name} > /name"), payload_bytes);
    let out = buildctl_build(&unix_addr(w), &ctx, &w.root.join(format!("out-{name}")));
    assert!(out.status.success(), "build {name}: {}", String::from_utf8_lossy(&out.stderr));
    records(&socket).await.into_iter().filter(|r| !before.contains(&r.id)).collect()
}

/// The build's own layers: its payload COPY and its RUN step.
fn own_layers(added: &[CacheRecord]) -> Vec<String> {
    added.iter().filter(|r| r.description.contains("COPY payload") || r.description.contains("from exec")).map(|r| r.id.clone()).collect()
}

fn free_bytes(path: &Path) -> (u64, u64) {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    (s.blocks_available() * s.fragment_size(), s.blocks() * s.fragment_size())
}

#[tokio::test]
async fn crossing_the_free_space_watermark_prunes_the_least_recently_used_builds_until_the_stop_watermark() {
    let w = World::new();
    let start_below = 59;
    let stop_at = 60;
    let agent = agent(&w.config)
        .standalone(&w.task)
        .env("MACHINE_AGENT__GC__MIN_AGE_SECS", "0")
        .env("MACHINE_AGENT__GC__INTERVAL_SECS", "3600") // only pressure can trigger a run here
        .env("MACHINE_AGENT__GC__PRESSURE_CHECK_SECS", "1")
        .env("MACHINE_AGENT__GC__FREE_BYTES_START_BELOW_PERCENT", &start_below.to_string())
        .env("MACHINE_AGENT__GC__FREE_BYTES_STOP_AT_PERCENT", &stop_at.to_string())
        .env("MACHINE_AGENT__GC__FREE_INODES_START_BELOW_PERCENT", "0")
        .start();
    let base = wait_ready(&agent).await;
    agent.wait_for_log("gc run trigger=startup").await;

    let oldest = build(&w, "oldest", 48 << 20).await;
    let older = build(&w, "older", 48 << 20).await;
    let newest = build(&w, "newest", 48 << 20).await;
    let layer_bytes = |added: &[CacheRecord]| added.iter().filter(|r| r.description.contains("COPY payload")).map(|r| r.size_bytes).sum::<u64>();
    let (oldest_layers, older_layers, newest_layers) = (own_layers(&oldest), own_layers(&older), own_layers(&newest));
    assert_eq!((oldest_layers.len(), older_layers.len(), newest_layers.len()), (2, 2, 2), "{oldest:?} {older:?} {newest:?}");
    let payload = layer_bytes(&oldest);
    assert!(payload >= 48 << 20, "{oldest:?}");

    // Fill the volume (a file the GC cannot touch) so that freeing the oldest
    // build's payload and half the next one's is what it takes to reach the
    // stop watermark. The newest build must never be touched.
    let cache = w.cache();
    let (free, total) = free_bytes(&cache);
    let stop_bytes = total / 100 * stop_at;
    let want_free = stop_bytes - payload * 3 / 2;
    assert!(want_free < total / 100 * start_below, "the fill must cross the start watermark");
    // fallocate: the whole filler lands at once, so no pressure check can see
    // a partly written one and stop short of what this test expects.
    let filler = std::fs::File::create(cache.join("filler")).unwrap();
    let filler_len = i64::try_from(free - want_free).unwrap();
    nix::fcntl::fallocate(std::os::fd::AsRawFd::as_raw_fd(&filler), nix::fcntl::FallocateFlags::empty(), 0, filler_len).unwrap();
    drop(filler);

    let line = agent.wait_for_log("gc run trigger=pressure").await;
    assert!(line.contains("freed"), "{line}");
    let (free_after, _) = free_bytes(&cache);
    assert!(free_after >= stop_bytes, "free {free_after} is back above the stop watermark {stop_bytes}: {line}");
    let left: BTreeSet<String> = records(&engine_socket(&w.root)).await.into_iter().map(|r| r.id).collect();
    assert!(oldest_layers.iter().all(|id| !left.contains(id)), "the least recently used build went first: {line}");
    assert!(newest_layers.iter().all(|id| left.contains(id)), "the most recent build survives: {line}");

    let (_, scrape) = http_get(&base, "/metrics").await;
    assert_eq!(metric_value(&scrape, "machine_agent_gc_runs_total{outcome=\"ok\",trigger=\"pressure\"}"), Some(1.0), "{scrape}");
    assert!(metric_value(&scrape, "machine_agent_gc_freed_bytes_total").unwrap() >= payload as f64);
    // The log line is written by the GC loop; /readyz hears of the run a moment later, through the agent.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, json) = readyz(&base).await;
        if json["last_gc"].as_str().is_some_and(|l| l.starts_with("gc pressure")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "/readyz never showed the pressure run as last_gc: {json}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_engine_that_cannot_be_read_defers_the_run_and_the_agent_keeps_serving() {
    let w = World::new();
    let agent = agent(&w.config)
        .standalone(&w.task)
        .env("MACHINE_AGENT__GC__INTERVAL_SECS", "1")
        .env("MACHINE_AGENT__ENGINE__RESTART_INITIAL_MS", "3000") // long enough to see a run miss the engine
        .start();
    let base = wait_ready(&agent).await;
    agent.wait_for_log("gc run trigger=startup").await;
    let pid = support::engine_pid(&w.root).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();

    let line = agent.wait_for_log("gc run deferred").await;
    assert!(line.contains(&engine_socket(&w.root).display().to_string()), "the deferral names the engine socket: {line}");
    eventually("the engine back and a GC run after it", Duration::from_secs(30), || {
        let logs = agent.logs();
        let deferred = logs.find("gc run deferred").unwrap_or(usize::MAX);
        logs.rfind("gc run trigger=interval").is_some_and(|i| i > deferred)
    })
    .await;
    let (code, json) = readyz(&base).await;
    assert_eq!(code, 200, "{json}");
    let (_, scrape) = http_get(&base, "/metrics").await;
    assert!(metric_value(&scrape, "machine_agent_gc_runs_total{outcome=\"deferred\",trigger=\"interval\"}").unwrap() >= 1.0);
}

#[tokio::test]
async fn gc_dry_run_prints_what_the_next_real_run_prunes_and_prunes_nothing() {
    let w = World::new();
    let agent = agent(&w.config)
        .standalone(&w.task)
        .env("MACHINE_AGENT__GC__MIN_AGE_SECS", "0")
        .env("MACHINE_AGENT__GC__RETENTION_SECS", "2")
        .env("MACHINE_AGENT__GC__INTERVAL_SECS", "15")
        .start();
    wait_ready(&agent).await;
    agent.wait_for_log("gc run trigger=startup").await;
    let built = build(&w, "expiring", 1 << 20).await;
    let socket = engine_socket(&w.root);
    let all: BTreeSet<String> = records(&socket).await.into_iter().map(|r| r.id).collect();
    // Past the retention (2 s), well before the next interval run (15 s after startup).
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_machine-agent")).args(["gc", "--dry-run", "--config", w.config.to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("gc manual (dry run)"), "{stdout}");
    let planned: BTreeSet<String> = stdout.lines().filter_map(|l| l.split_whitespace().next()).filter(|id| all.contains(*id)).map(str::to_string).collect();
    assert!(own_layers(&built).iter().all(|id| planned.contains(id)), "expired layers are planned:\n{stdout}");
    assert!(stdout.lines().filter(|l| planned.iter().any(|id| l.starts_with(id.as_str()))).all(|l| l.contains("retention")), "{stdout}");
    let after_dry_run: BTreeSet<String> = records(&socket).await.into_iter().map(|r| r.id).collect();
    assert_eq!(after_dry_run, all, "a dry run prunes nothing");

    agent.wait_for_log("gc run trigger=interval").await;
    let left: BTreeSet<String> = records(&socket).await.into_iter().map(|r| r.id).collect();
    let pruned: BTreeSet<String> = all.difference(&left).cloned().collect();
    assert_eq!(pruned, planned, "the real run pruned exactly what the dry run printed");
}

#[tokio::test]
async fn the_usage_report_carries_the_cache_records_and_each_gc_run_once() {
    let w = World::new();
    let cp = support::control_plane::control_plane().start();
    w.use_control_plane(&cp);
    let agent = agent(&w.config).env("MACHINE_AGENT__GC__INTERVAL_SECS", "1").start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    cp.push(support::control_plane::buildkit_task("usage", &w.root.join("mnt")));
    wait_ready(&agent).await;
    build(&w, "reported", 4 << 20).await;

    let rec = cp.wait_for("a usage report with cache records", |r| r.usage.iter().any(|u| u.cache_used_bytes >= 4 << 20)).await;
    let with_records = rec.usage.iter().find(|u| u.cache_used_bytes >= 4 << 20).unwrap();
    assert!(with_records.cache_records >= 2, "{with_records:?}");
    assert!(with_records.cache_reclaimable_bytes <= with_records.cache_used_bytes);
    let rec = cp.wait_for("three usage reports with GC runs", |r| r.usage.iter().filter(|u| !u.gc_runs.is_empty()).count() >= 3).await;
    let runs: Vec<&machine_agent::proto::v1::GcRunReport> = rec.usage.iter().flat_map(|u| &u.gc_runs).collect();
    assert_eq!(runs.iter().filter(|r| r.trigger == "startup").count(), 1, "each run is reported once: {runs:?}");
    assert!(runs.iter().all(|r| r.outcome == "ok" && r.summary.starts_with("gc ")), "{runs:?}");
    let times: Vec<i64> = runs.iter().map(|r| r.unix_time_ms).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "in order, no run twice: {times:?}");
}

#[tokio::test]
async fn a_volume_over_the_watermark_at_start_is_collected_before_the_agent_turns_ready() {
    let w = World::new();
    let (start_below, stop_at) = (59, 60);
    let gc_env = |builder: support::AgentBuilder, enabled: &str| {
        builder
            .env("MACHINE_AGENT__GC__ENABLED", enabled)
            .env("MACHINE_AGENT__GC__MIN_AGE_SECS", "0")
            .env("MACHINE_AGENT__GC__INTERVAL_SECS", "3600")
            .env("MACHINE_AGENT__GC__FREE_BYTES_START_BELOW_PERCENT", &start_below.to_string())
            .env("MACHINE_AGENT__GC__FREE_BYTES_STOP_AT_PERCENT", &stop_at.to_string())
            .env("MACHINE_AGENT__GC__FREE_INODES_START_BELOW_PERCENT", "0")
    };

    // First run, GC off: two builds, then the volume is filled past the start watermark.
    let mut first = gc_env(agent(&w.config).standalone(&w.task), "false").start();
    wait_ready(&first).await;
    let oldest = build(&w, "oldest", 48 << 20).await;
    let newest = build(&w, "newest", 48 << 20).await;
    let payload: u64 = oldest.iter().filter(|r| r.description.contains("COPY payload")).map(|r| r.size_bytes).sum();
    let (free, total) = free_bytes(&w.cache());
    let stop_bytes = total / 100 * stop_at;
    let want_free = stop_bytes - payload * 3 / 4;
    assert!(want_free < total / 100 * start_below);
    std::fs::write(w.cache().join("filler"), vec![0x5a_u8; usize::try_from(free - want_free).unwrap()]).unwrap();
    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(first.wait_exit(Duration::from_secs(30)).await.code(), Some(0), "a clean drain keeps the cache");
    drop(first);

    // Second run, GC on: Ready only after the first GC run brought the volume back.
    let second = gc_env(agent(&w.config).standalone(&w.task), "true").start();
    wait_ready(&second).await;
    let logs = second.logs();
    let at = |needle: &str| logs.find(needle).unwrap_or_else(|| panic!("no {needle:?} in:\n{logs}"));
    assert!(at("collecting before ready") < at("gc run trigger=startup"), "{logs}");
    assert!(at("gc run trigger=startup") < at("to=ready"), "Ready waits for the GC run:\n{logs}");
    let (free_at_ready, _) = free_bytes(&w.cache());
    assert!(free_at_ready >= stop_bytes, "free {free_at_ready} >= stop watermark {stop_bytes}");
    let left: BTreeSet<String> = records(&engine_socket(&w.root)).await.into_iter().map(|r| r.id).collect();
    assert!(own_layers(&newest).iter().all(|id| left.contains(id)), "the newest build survives");
}

/// How many records a run freed for `reason` (`retention`, `keep-bytes`,
/// `free-bytes`, `free-inodes`), read from its summary line.
fn freed_for(summary: &str, reason: &str) -> u64 {
    let tail = &summary[summary.find("; retention ").unwrap_or_else(|| panic!("no reasons in {summary:?}")) + 2..];
    let words: Vec<&str> = tail.split([' ', ';']).filter(|w| !w.is_empty()).collect();
    let at = words.iter().position(|w| *w == reason).unwrap_or_else(|| panic!("no {reason} in {summary:?}"));
    words[at + 1].parse().unwrap_or_else(|_| panic!("{reason} count in {summary:?}"))
}

fn free_inodes(path: &Path) -> (u64, u64) {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    (s.files_available(), s.files())
}

#[test]
fn freed_for_reads_each_reason_from_a_summary() {
    let line = "gc interval: planned 2 records 10 bytes; freed 2 records 10 bytes, 3 inodes; free bytes 1 -> 2, free inodes 3 -> 4; \
                retention 2 keep-bytes 0 free-bytes 5 free-inodes 7; took 3ms";
    assert_eq!([freed_for(line, "retention"), freed_for(line, "keep-bytes"), freed_for(line, "free-bytes"), freed_for(line, "free-inodes")], [2, 0, 5, 7]);
}

#[tokio::test]
async fn records_unused_for_longer_than_retention_are_pruned_with_plenty_of_free_space() {
    let w = World::new();
    let cp = support::control_plane::control_plane().start();
    w.use_control_plane(&cp);
    // Retention from the agent's [gc] config; the interval from the task's gc block.
    let retention = Duration::from_secs(15);
    let agent = agent(&w.config).env("MACHINE_AGENT__GC__RETENTION_SECS", &retention.as_secs().to_string()).env("MACHINE_AGENT__GC__MIN_AGE_SECS", "1").start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    let mut task = support::control_plane::buildkit_task("retention", &w.root.join("mnt"));
    if let machine_agent::proto::v1::register_response::Task::Buildkit(t) = &mut task {
        t.gc = Some(machine_agent::proto::v1::GcPolicy { interval_secs: Some(1), ..Default::default() });
    }
    cp.push(task);
    let base = wait_ready(&agent).await;

    let old = own_layers(&build(&w, "old", 1 << 20).await);
    // The point of the test is time passing: the second build is used more
    // than half a retention later, so the run that expires the first finds
    // the second seconds away from expiring.
    tokio::time::sleep(retention / 2 + Duration::from_secs(1)).await;
    let new = own_layers(&build(&w, "new", 1 << 20).await);
    assert_eq!((old.len(), new.len()), (2, 2), "{old:?} {new:?}");

    let socket = engine_socket(&w.root);
    let deadline = tokio::time::Instant::now() + retention + Duration::from_secs(30);
    let left = loop {
        let left: BTreeSet<String> = records(&socket).await.into_iter().map(|r| r.id).collect();
        if old.iter().all(|id| !left.contains(id)) {
            break left;
        }
        assert!(tokio::time::Instant::now() < deadline, "the old build's layers {old:?} outlived retention {retention:?} by 30 s:\n{}", agent.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(new.iter().all(|id| left.contains(id)), "the build used more recently than retention survives: {new:?} not all in {left:?}");

    let rec = cp
        .wait_for("a usage report with the run that pruned by retention", |r| {
            r.usage.iter().flat_map(|u| &u.gc_runs).any(|g| g.freed_records > 0 && g.freed_by_reason.as_ref().is_some_and(|c| c.retention > 0))
        })
        .await;
    let run = rec.usage.iter().flat_map(|u| &u.gc_runs).find(|g| g.freed_records > 0).unwrap();
    assert_eq!((run.trigger.as_str(), run.outcome.as_str()), ("interval", "ok"), "{run:?}");
    let reasons = run.freed_by_reason.unwrap();
    assert!(reasons.retention >= old.len() as u64, "{run:?}");
    assert_eq!(run.freed_records, reasons.retention, "every record went for retention: {run:?}");
    assert_eq!(reasons.retention, freed_for(&run.summary, "retention"), "the summary line says the same: {run:?}");
    let (_, total) = free_bytes(&w.cache());
    assert!(run.free_bytes_before > total / 2, "free space far above the 10 % watermark: {run:?}");
    assert_eq!((reasons.keep_bytes, reasons.free_bytes, reasons.free_inodes), (0, 0, 0), "{run:?}");

    let (_, scrape) = http_get(&base, "/metrics").await;
    assert!(metric_value(&scrape, "machine_agent_gc_runs_total{outcome=\"ok\",trigger=\"interval\"}").unwrap() >= 1.0, "{scrape}");
    assert!(metric_value(&scrape, "machine_agent_gc_freed_records_total").unwrap() >= old.len() as f64, "{scrape}");
    // The latest run, a second old at most: an interval run (on a loaded
    // machine it may have been deferred: a DiskUsage past its timeout).
    let (_, json) = readyz(&base).await;
    let last = json["last_gc"].as_str().unwrap_or_else(|| panic!("no last_gc in {json}"));
    assert!(last.starts_with("gc interval") || last.starts_with("deferred (interval)"), "{json}");
}

/// A TCP listener the RUN step of a build dials: the accepted connection says
/// the step is running, and the step runs until the test writes "go".
struct StepGate {
    listener: tokio::net::TcpListener,
}

impl StepGate {
    async fn bind() -> Self {
        Self { listener: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() }
    }

    /// The step's script: wait for the gate (steps share the host's network
    /// here: no CNI is configured), then fail unless it said "go".
    fn script(&self) -> String {
        let port = self.listener.local_addr().unwrap().port();
        format!("/bin/busybox nc 127.0.0.1 {port} </dev/null >/go; /bin/busybox grep -q go /go")
    }

    async fn step_started(&self, within: Duration) -> tokio::net::TcpStream {
        let accepted = tokio::time::timeout(within, self.listener.accept()).await;
        accepted.unwrap_or_else(|_| panic!("the build's RUN step did not dial the gate within {within:?}")).unwrap().0
    }
}

#[tokio::test]
async fn a_running_builds_records_survive_a_full_disk_gc_and_the_build_succeeds() {
    use tokio::io::AsyncWriteExt;
    let w = World::new();
    let (start_below, stop_at) = (59, 60);
    let agent = agent(&w.config)
        .standalone(&w.task)
        .env("MACHINE_AGENT__GC__MIN_AGE_SECS", "0")
        .env("MACHINE_AGENT__GC__INTERVAL_SECS", "3600")
        .env("MACHINE_AGENT__GC__PRESSURE_CHECK_SECS", "1")
        .env("MACHINE_AGENT__GC__FREE_BYTES_START_BELOW_PERCENT", &start_below.to_string())
        .env("MACHINE_AGENT__GC__FREE_BYTES_STOP_AT_PERCENT", &stop_at.to_string())
        .env("MACHINE_AGENT__GC__FREE_INODES_START_BELOW_PERCENT", "0")
        .start();
    wait_ready(&agent).await;
    agent.wait_for_log("gc run trigger=startup").await;
    let socket = engine_socket(&w.root);
    let finished = own_layers(&build(&w, "finished", 48 << 20).await);
    let before: BTreeSet<String> = records(&socket).await.into_iter().map(|r| r.id).collect();

    let gate = StepGate::bind().await;
    let ctx = build_context(&w.root, &gate.script(), 48 << 20);
    let (addr, out) = (unix_addr(&w), w.root.join("out-running"));
    let running = tokio::task::spawn_blocking(move || buildctl_build(&addr, &ctx, &out));
    let mut step = gate.step_started(Duration::from_secs(120)).await;
    let in_flight: Vec<CacheRecord> = records(&socket).await.into_iter().filter(|r| !before.contains(&r.id)).collect();
    let payload = in_flight.iter().find(|r| r.description.contains("COPY payload")).unwrap_or_else(|| panic!("{in_flight:?}"));
    assert!(payload.size_bytes >= 48 << 20 && payload.in_use, "the running step holds its payload layer: {payload:?}");
    let in_flight: BTreeSet<String> = in_flight.iter().map(|r| r.id.clone()).collect();

    // Past the start watermark, and further from the stop watermark than
    // everything GC may prune: it frees the finished build and falls short.
    let cache = w.cache();
    let (free, total) = free_bytes(&cache);
    let want_free = total / 100 * stop_at - 3 * payload.size_bytes;
    std::fs::write(cache.join("filler"), vec![0x5a_u8; usize::try_from(free - want_free).unwrap()]).unwrap();
    nix::unistd::sync();

    // A run that fell short: one that saw the whole filler (a pressure check
    // during the write may catch the crossing with less of it written).
    let short = |logs: &str| logs.lines().find(|l| l.contains("gc run trigger=pressure") && l.contains("SHORT by")).map(str::to_string);
    let what = "a pressure run that frees what it can and says how far short it fell";
    eventually(what, Duration::from_secs(60), || short(&agent.logs()).is_some()).await;
    let line = short(&agent.logs()).unwrap();
    assert!(!running.is_finished(), "the run happened while the build was running: {line}");
    let left: BTreeSet<String> = records(&socket).await.into_iter().map(|r| r.id).collect();
    assert!(finished.iter().all(|id| !left.contains(id)), "the finished build was pruned: {line}");
    let missing: Vec<&String> = in_flight.iter().filter(|id| !left.contains(*id)).collect();
    assert!(missing.is_empty(), "the running build's records {missing:?} were pruned: {line}");
    // Still under pressure with nothing left to prune: the checks back off
    // (1 s, then 2 s, 4 s...) instead of a DiskUsage call every second.
    eventually("pressure checks backing off while runs free nothing", Duration::from_secs(30), || {
        agent.logs().contains("the pressure run freed nothing; checking less often until it can next_check_ms=4000")
    })
    .await;
    assert!(agent.logs().contains("next_check_ms=2000"), "the gap doubled from the configured 1 s");

    step.write_all(b"go\n").await.unwrap();
    drop(step);
    let out = tokio::time::timeout(Duration::from_secs(120), running).await.expect("the build did not finish within 120 s").unwrap();
    assert!(out.status.success(), "the build survived GC: {}", String::from_utf8_lossy(&out.stderr));
    assert!(w.root.join("out-running/go").exists(), "its result was exported");
    let runs = agent.logs().lines().filter(|l| l.contains("gc run trigger=pressure")).count();
    eprintln!("{runs} pressure runs while the build ran and since");
}

#[tokio::test]
async fn an_ext4_with_few_inodes_is_collected_by_the_inode_watermark_alone() {
    let w = World::new();
    // One inode per 128 KiB: 16384 on 2 GiB (mkfs's default would give
    // 131072), made by the agent's own mkfs. Builds of 3000 files exhaust
    // them long before the bytes.
    let agent = agent(&w.config)
        .standalone(&w.task)
        .env("MACHINE_AGENT__VOLUME__EXT4_BYTES_PER_INODE", "131072")
        .env("MACHINE_AGENT__GC__MIN_AGE_SECS", "0")
        .env("MACHINE_AGENT__GC__INTERVAL_SECS", "3600")
        .env("MACHINE_AGENT__GC__PRESSURE_CHECK_SECS", "1")
        .env("MACHINE_AGENT__GC__BATCH", "1") // statvfs after every record: the run stops as soon as the inodes are back
        .start();
    wait_ready(&agent).await;
    agent.wait_for_log("gc run trigger=startup").await;
    let cache = w.cache();
    let (_, total_inodes) = free_inodes(&cache);
    assert!((16384..20000).contains(&total_inodes), "mkfs.ext4 -i 131072 gave {total_inodes} inodes");

    let files = 3000;
    let socket = engine_socket(&w.root);
    let mut layers = vec![];
    for name in ["oldest", "newest"] {
        let before: BTreeSet<String> = records(&socket).await.into_iter().map(|r| r.id).collect();
        let ctx = small_files_context(&w.root, &format!("/bin/busybox echo {name} > /name"), files);
        let out = support::engine::buildctl_build_cache_only(&unix_addr(&w), &ctx);
        assert!(out.status.success(), "build {name}: {}", String::from_utf8_lossy(&out.stderr));
        let added: Vec<CacheRecord> = records(&socket).await.into_iter().filter(|r| !before.contains(&r.id)).collect();
        let own: Vec<String> =
            added.iter().filter(|r| r.description.contains("COPY files") || r.description.contains("from exec")).map(|r| r.id.clone()).collect();
        assert_eq!(own.len(), 2, "{name}: {added:?}");
        layers.push(own);
    }
    let (oldest, newest) = (&layers[0], &layers[1]);

    // Default watermarks: start below 10 %, stop at 20 % free inodes. Empty
    // files (which GC cannot touch) take free inodes below the start
    // watermark, to where freeing the oldest build's files reaches the stop
    // watermark and nothing newer needs to go.
    let (free_i, total_i) = free_inodes(&cache);
    let (start_i, stop_i) = (total_i / 10, total_i / 5);
    let want_free = stop_i - files as u64 * 2 / 3;
    assert!(want_free + 200 < start_i && want_free + files as u64 > stop_i + 500, "{want_free} of {total_i}");
    let fill = cache.join("inode-filler");
    std::fs::create_dir(&fill).unwrap();
    for i in 0..free_i - want_free {
        std::fs::File::create(fill.join(i.to_string())).unwrap();
    }
    nix::unistd::sync();
    let (free_b, total_b) = free_bytes(&cache);
    assert!(free_b > total_b / 2, "bytes stay plenty: {free_b} of {total_b}");

    let line = agent.wait_for_log("gc run trigger=pressure").await;
    assert!(freed_for(&line, "free-inodes") >= 1, "{line}");
    assert_eq!([freed_for(&line, "free-bytes"), freed_for(&line, "keep-bytes"), freed_for(&line, "retention")], [0, 0, 0], "inodes alone: {line}");
    assert!(!line.contains("SHORT"), "{line}");
    let (free_after, _) = free_inodes(&cache);
    assert!(free_after >= stop_i, "free inodes {free_after} back at the stop watermark {stop_i}: {line}");
    let left: BTreeSet<String> = records(&socket).await.into_iter().map(|r| r.id).collect();
    assert!(oldest.iter().all(|id| !left.contains(id)), "the least recently used build's files went: {line}");
    assert!(newest.iter().all(|id| left.contains(id)), "the newest build survives: {line}");
}
