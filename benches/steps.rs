//! What recording build steps costs, and the shortest step it still records.
//!
//! 1. One poll tick over 50 live step cgroups (real cgroups of this machine,
//!    each holding a sleeping process): the reads the watcher makes every
//!    `agent.step_poll_interval_ms` while steps run, CPU time per tick.
//! 2. A real agent and engine: 200 RUN steps of 10 to 100 ms (10 builds of
//!    20 steps, one after the other), how many were recorded, how their
//!    recorded durations compare with what they slept, how each end was seen
//!    (by `cgroup.events` or a poll: figures read after the last exit; the
//!    cgroup removed first: the previous read's), and the agent's CPU per
//!    step against the same agent idle.
//! 3. The same agent under one build of 50 parallel steps of 3 s each: the
//!    agent's CPU per second while 50 steps live, against idle.
//!
//! `cargo bench --bench steps` (root, after scripts/install-buildkit.sh;
//! BENCH_PARTS=12 to leave out the third).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails loudly
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // wall-clock timing is the point of a bench; no paused clock here

#[path = "../tests/support/mod.rs"]
mod support;

use machine_agent::engine::cgroup::{CgroupVersion, EngineCgroup};
use machine_agent::observe::step_watch::StepDirs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use support::engine::World;

fn cpu_of_self() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let us = |t: nix::sys::time::TimeVal| Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64);
    us(usage.user_time()) + us(usage.system_time())
}

/// 50 step cgroups in the v1 memory, cpuacct and blkio hierarchies, each
/// with a sleeping process; removed on drop.
struct FakeSteps {
    name: String,
    dirs: Vec<PathBuf>,
    sleepers: Vec<Child>,
}

impl FakeSteps {
    fn new(count: usize) -> (Self, StepDirs, Vec<String>) {
        let name = format!("ma-bench-steps-{}", support::engine::rand_suffix());
        let hierarchies = ["memory", "cpuacct", "blkio"].map(|h| Path::new("/sys/fs/cgroup").join(h));
        let mut fake = Self { name: name.clone(), dirs: vec![], sleepers: vec![] };
        let ids: Vec<String> = (0..count).map(|i| format!("benchstep{i:04}")).collect();
        for h in &hierarchies {
            for dir in [h.join(&name), h.join(&name).join("buildkit")] {
                std::fs::create_dir(&dir).unwrap();
                fake.dirs.push(dir);
            }
        }
        for id in &ids {
            let child = Command::new("sleep").arg("600").spawn().unwrap();
            for h in &hierarchies {
                let dir = h.join(&name).join("buildkit").join(id);
                std::fs::create_dir(&dir).unwrap();
                std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
                fake.dirs.push(dir);
            }
            fake.sleepers.push(child);
        }
        let engine = EngineCgroup {
            version: CgroupVersion::V1,
            dir: hierarchies[0].join(&name),
            relative: format!("/{name}"),
            limit_bytes: 0,
            scope: None,
            mount_point: hierarchies[0].clone(),
        };
        let mounts = machine_agent::volume::mountinfo::read_mountinfo(Path::new("/proc/self/mountinfo")).unwrap();
        (fake, StepDirs::of(&engine, &mounts), ids)
    }
}

impl Drop for FakeSteps {
    fn drop(&mut self) {
        for child in &mut self.sleepers {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
        let _ = &self.name;
    }
}

fn tick_cost() {
    const STEPS: usize = 50;
    const TICKS: u32 = 2000;
    let (_fake, dirs, ids) = FakeSteps::new(STEPS);
    assert!(dirs.cpu.is_some() && dirs.io.is_some(), "cpuacct and blkio hierarchies found: {dirs:?}");
    let mut files: Vec<_> = ids.iter().map(|id| dirs.open(id)).collect();
    let figures = files[0].read(true);
    assert!(figures.cpu_usec.is_some() && figures.peak_memory_bytes.is_some() && figures.oom_kills.is_some(), "{figures:?}");
    let (cpu0, wall0) = (cpu_of_self(), Instant::now());
    for tick in 0..TICKS {
        for f in &mut files {
            // As the watcher does: CPU and peak every poll, I/O and the OOM counter every fifth.
            std::hint::black_box(f.read(tick.is_multiple_of(5)));
            assert_eq!(f.is_empty(), Some(false));
        }
    }
    let cpu = cpu_of_self() - cpu0;
    let wall = wall0.elapsed();
    let per_tick = cpu / TICKS;
    println!("1. one poll tick over {STEPS} live steps (v1: cpuacct.usage and memory.max_usage_in_bytes kept open and read each poll, blkio and memory.oom_control every fifth, cgroup.procs opened each poll):");
    println!(
        "   {:>8.1} us CPU per tick ({:.2} us per step), {:.1} us wall",
        per_tick.as_secs_f64() * 1e6,
        per_tick.as_secs_f64() * 1e6 / STEPS as f64,
        (wall / TICKS).as_secs_f64() * 1e6
    );
    println!("   at the default 20 ms interval: {:.1}% of one core while {STEPS} steps live", per_tick.as_secs_f64() / 0.020 * 100.0);
}

/// A context of `scripts` as RUN steps, one after the other.
fn context(dir: &Path, scripts: &[String], parallel: bool) -> PathBuf {
    let ctx = dir.join(format!("ctx-{}", support::engine::rand_suffix()));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
    std::fs::write(ctx.join("marker"), support::engine::rand_suffix()).unwrap();
    let run = |s: &str| format!("RUN [\"/bin/busybox\", \"sh\", \"-c\", {}]\n", serde_json::to_string(s).unwrap());
    let mut df = String::from("FROM scratch AS base\nCOPY busybox /bin/busybox\nCOPY marker /marker\n");
    if parallel {
        for (i, s) in scripts.iter().enumerate() {
            df += &format!("FROM base AS s{i}\n{}", run(&format!("{s}; echo {i} > /done{i}")));
        }
        df += "FROM base\n";
        for i in 0..scripts.len() {
            df += &format!("COPY --from=s{i} /done{i} /done{i}\n");
        }
    } else {
        for s in scripts {
            df += &run(s);
        }
    }
    std::fs::write(ctx.join("Dockerfile"), df).unwrap();
    ctx
}

fn build(w: &World, ctx: &Path) -> String {
    let (out, build_ref) = support::engine::build_with_ref(w, ctx);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    build_ref
}

/// (duration s, cpu s, ended) of every step record of `build_ref` in the agent's log, in order of arrival.
fn recorded(logs: &str, build_ref: &str) -> Vec<(f64, f64)> {
    logs.lines()
        .filter(|l| l.contains("machine_agent::agent::handle: step ") && l.contains(&format!("build_ref=Some(\"{build_ref}\")")))
        .map(|l| {
            let after = l.split(" ran ").nth(1).unwrap();
            let duration: f64 = after.split(' ').next().unwrap().parse().unwrap();
            let cpu: f64 = after.split("cpu ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
            (duration, cpu)
        })
        .collect()
}

/// CPU seconds the agent used over `window`, doing nothing but being idle (or whatever runs).
fn agent_cpu_over(pid: u32, f: impl FnOnce()) -> (f64, Duration) {
    let (t0, w0) = (support::cpu_ticks(pid), Instant::now());
    f();
    ((support::cpu_ticks(pid) - t0) as f64 / 100.0, w0.elapsed())
}

async fn end_to_end(parallel: bool) {
    let w = World::new();
    let agent = w.start();
    let _base = support::engine::wait_ready(&agent).await;
    // Settle, then the idle baseline.
    std::thread::sleep(Duration::from_secs(2));
    let (idle_cpu, idle_wall) = agent_cpu_over(agent.pid, || std::thread::sleep(Duration::from_secs(10)));
    let idle_rate = idle_cpu / idle_wall.as_secs_f64();

    // 2. 200 short steps, 10 builds of 20.
    let mut rng_state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        10 + rng_state % 91
    };
    let mut asked = vec![]; // (ms, recorded duration, recorded cpu)
    let mut missed = vec![];
    let mut refs = vec![];
    let (busy_cpu, busy_wall) = agent_cpu_over(agent.pid, || {
        for _ in 0..10 {
            let ms: Vec<u64> = (0..20).map(|_| next()).collect();
            let scripts: Vec<String> = ms.iter().map(|m| format!("/bin/busybox usleep {}", m * 1000)).collect();
            let build_ref = build(&w, &context(&w.root, &scripts, false));
            refs.push((build_ref, ms));
        }
        // The last records wait out the attribution grace.
        std::thread::sleep(Duration::from_secs(1));
    });
    let logs = agent.logs();
    for (build_ref, ms) in &refs {
        let got = recorded(&logs, build_ref);
        if got.len() == ms.len() {
            asked.extend(ms.iter().zip(got).map(|(m, (d, c))| (*m, d, c)));
        } else {
            missed.push((build_ref.clone(), ms.len() - got.len().min(ms.len())));
        }
    }
    let ends = |how: &str| logs.matches(&format!("ended=\"{how}\"")).count();
    let total_recorded: usize = refs.iter().map(|(r, _)| recorded(&logs, r).len()).sum();
    println!("2. 200 RUN steps of 10-100 ms (10 builds of 20, in sequence):");
    println!("   recorded {total_recorded} of 200; builds with a step missing: {missed:?}");
    println!(
        "   ends seen: {} by cgroup.events, {} by a poll (both: figures read after the last exit); {} removed, {} gone at a poll (the previous read's figures)",
        ends("emptied_event"),
        ends("emptied"),
        ends("removed"),
        ends("gone")
    );
    for (lo, hi) in [(10, 30), (30, 60), (60, 101)] {
        let mut over: Vec<f64> = asked.iter().filter(|(m, _, _)| (lo..hi).contains(m)).map(|(m, d, _)| d * 1000.0 - *m as f64).collect();
        over.sort_by(f64::total_cmp);
        let shortest = asked.iter().filter(|(m, _, _)| (lo..hi).contains(m)).map(|(_, d, _)| *d).fold(f64::MAX, f64::min);
        if !over.is_empty() {
            println!(
                "   slept {lo:>2}-{:>3} ms: {:>3} steps, recorded duration minus sleep: median {:>5.0} ms, min {:>5.0}, max {:>5.0}; shortest recorded {:.3} s",
                hi - 1,
                over.len(),
                over[over.len() / 2],
                over[0],
                over[over.len() - 1],
                shortest
            );
        }
    }
    let per_step = (busy_cpu - idle_rate * busy_wall.as_secs_f64()) / 200.0;
    println!(
        "   agent CPU: {busy_cpu:.2} s over {:.1} s of builds against {:.3} s/s idle: {:.2} ms per step (everything: watch, ticks, history, status, metrics)",
        busy_wall.as_secs_f64(),
        idle_rate,
        per_step * 1000.0
    );

    if !parallel {
        return;
    }
    // 3. 50 parallel steps of 3 s.
    let scripts: Vec<String> = (0..50).map(|_| "/bin/busybox sleep 3".to_string()).collect();
    let ctx = context(&w.root, &scripts, true);
    let mut build_ref = String::new();
    let (cpu, wall) = agent_cpu_over(agent.pid, || build_ref = build(&w, &ctx));
    std::thread::sleep(Duration::from_secs(1));
    let logs = agent.logs();
    let got = logs.lines().filter(|l| l.contains("machine_agent::agent::handle: step ") && l.contains(&build_ref)).count();
    println!("3. one build of 50 parallel 3 s steps: {got} of 50 recorded (with {build_ref:?} among their builds)");
    println!("   agent CPU {cpu:.2} s over {:.1} s: {:.3} s/s against {idle_rate:.3} s/s idle", wall.as_secs_f64(), cpu / wall.as_secs_f64());
    drop(agent);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // BENCH_PARTS: which of 1, 2 (and 3) to run; all by default.
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "123".into());
    if parts.contains('1') {
        tick_cost();
    }
    if parts.contains('2') || parts.contains('3') {
        end_to_end(parts.contains('3')).await;
    }
}
