//! CPU time per sampler tick: (a) host only, (b) with an engine tree of 50
//! processes in a real engine cgroup (a "buildkitd" shell in daemon/, five
//! build-step cgroups of nine sleeping processes each plus their shells),
//! (b') the same tree without its cgroup (the fallback: a full /proc scan on a
//! kernel without children files), and for contrast the same tree read through
//! sysinfo's per-pid refresh (memory + cpu, no tasks), and the naive ways:
//! sysinfo's `refresh_all` and every process with every attribute.
//!
//! Each tick is timed on its own, BENCH_TICKS times (default 20) with 250 ms
//! between ticks so the sampler's CPU-delta path runs as in production (it
//! skips the arithmetic for ticks closer than 200 ms). CPU time is the bench
//! thread's (CLOCK_THREAD_CPUTIME_ID: user and kernel time, and reading
//! /proc is kernel time); the first tick, which sets up
//! caches, is reported apart from the median. Goal: under 1 ms per tick.
//!
//! Measured on the 2-core dev VM (Debian 12, kernel 6.18 under Firecracker,
//! cgroup v1, about 130 processes on the host, other builds running), median
//! CPU per tick: host only 0.13 ms; host + the 51-process tree 1.0 ms (cgroup
//! listing 0.43 ms for 8 directories, 51 stat reads 0.76 ms: about 15 us per
//! process, a cold open+read+close of procfs in this VM); the same tree without
//! its cgroup 1.5 ms (full /proc scan); sysinfo's per-pid refresh of the tree
//! 2.7 ms; `refresh_all` 8.8 ms; every process with every attribute 9.0 ms.
//! `Sampler::new()` 0.06 ms. Per process, the tick costs about what one procfs
//! read costs, so a 5 s interval spends about 0.02% of a core on a 50-process tree.
//!
//! Needs root (it creates a memory cgroup). `cargo bench --bench sampler`
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench fails loudly
#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // wall-clock timing and paced ticks are the point of a bench

use machine_agent::engine::cgroup::EngineCgroup;
use machine_agent::observe::sampler::{read_cgroup_pids, read_stat, EngineTarget, Sampler};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::hint::black_box;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System};

const STEPS: usize = 5;
const SLEEPERS_PER_STEP: usize = 9;
/// The daemon shell, and per step its shell and sleepers.
const TREE_PROCESSES: usize = 1 + STEPS * (1 + SLEEPERS_PER_STEP);

/// Nanoseconds this thread has been on a CPU, user and kernel (the kernel
/// brings the count up to date on this call, unlike /proc/<pid>/schedstat).
fn thread_cpu_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
    u64::try_from(t.tv_sec()).unwrap() * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap()
}

/// The tree of TREE_PROCESSES sleeping processes in a fresh engine cgroup; killed and removed on drop.
struct Tree {
    cgroup: EngineCgroup,
    shell: Child,
}

impl Tree {
    fn start() -> Self {
        let name = format!("ma-sampler-bench-{}", std::process::id());
        let cgroup = EngineCgroup::create(&name, 1 << 30).expect("a memory cgroup: run the bench as root");
        let mut script = String::from("echo $$ > \"$1/daemon/cgroup.procs\"\n");
        for step in 0..STEPS {
            let dir = cgroup.dir.join(format!("buildkit/step-{step}"));
            std::fs::create_dir_all(&dir).unwrap();
            script.push_str(&format!(
                "sh -c 'echo $$ > \"$1/buildkit/step-{step}/cgroup.procs\"; for i in $(seq {SLEEPERS_PER_STEP}); do sleep 600 & done; wait' step \"$1\" &\n"
            ));
        }
        script.push_str("wait\n");
        let shell = Command::new("sh").args(["-c", &script, "engine"]).arg(&cgroup.dir).process_group(0).stdout(Stdio::null()).spawn().unwrap();
        let tree = Self { cgroup, shell };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut pids = Vec::new();
            read_cgroup_pids(&tree.dirs(), &mut pids);
            if pids.len() == TREE_PROCESSES {
                break;
            }
            assert!(Instant::now() < deadline, "the tree did not reach {TREE_PROCESSES} processes: {}", pids.len());
            std::thread::sleep(Duration::from_millis(20));
        }
        tree
    }

    fn dirs(&self) -> Vec<PathBuf> {
        vec![self.cgroup.dir.clone()]
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(i32::try_from(self.shell.id()).unwrap()), Signal::SIGKILL);
        let _ = self.shell.wait();
        for _ in 0..250 {
            if self.cgroup.remove().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("bench cgroup {} left behind", self.cgroup.dir.display());
    }
}

struct Timing {
    first_cpu_us: f64,
    median_cpu_us: f64,
    max_cpu_us: f64,
    median_wall_us: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `ticks` calls of `tick`, 250 ms apart.
fn time_ticks(ticks: usize, mut tick: impl FnMut() -> usize) -> (Timing, usize) {
    let (mut cpu, mut wall) = (Vec::with_capacity(ticks), Vec::with_capacity(ticks));
    let mut seen = 0;
    for i in 0..=ticks {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(250));
        }
        let (cpu_before, wall_before) = (thread_cpu_ns(), Instant::now());
        seen = black_box(tick());
        let wall_us = wall_before.elapsed().as_secs_f64() * 1e6;
        #[allow(clippy::cast_precision_loss)]
        let cpu_us = (thread_cpu_ns() - cpu_before) as f64 / 1e3;
        cpu.push(cpu_us);
        wall.push(wall_us);
    }
    let first_cpu_us = cpu.remove(0);
    wall.remove(0);
    let max_cpu_us = cpu.iter().copied().fold(0.0, f64::max);
    (Timing { first_cpu_us, median_cpu_us: median(cpu), max_cpu_us, median_wall_us: median(wall) }, seen)
}

fn main() {
    let ticks: usize = std::env::var("BENCH_TICKS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let tree = Tree::start();
    let target = EngineTarget { pid: tree.shell.id(), cgroup_dirs: tree.dirs() };
    let no_cgroup = EngineTarget { pid: tree.shell.id(), cgroup_dirs: vec![] };
    let host_processes =
        std::fs::read_dir("/proc").unwrap().filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())).count();

    let started = Instant::now();
    let new_cpu = thread_cpu_ns();
    let sampler = black_box(Sampler::new());
    #[allow(clippy::cast_precision_loss)]
    let new_cpu_us = (thread_cpu_ns() - new_cpu) as f64 / 1e3;
    let new_wall_us = started.elapsed().as_secs_f64() * 1e6;
    drop(sampler);

    let mut rows: Vec<(&str, Timing, usize)> = Vec::new();
    let mut sampler = Sampler::new();
    let (t, n) = time_ticks(ticks, || usize::from(sampler.sample(None).engine.is_some()));
    rows.push(("(a) host only", t, n));

    let mut sampler = Sampler::new();
    let (t, n) = time_ticks(ticks, || sampler.sample(Some(&target)).engine.map_or(0, |e| e.processes as usize));
    rows.push(("(b) host + engine tree, cgroup", t, n));

    let mut sampler = Sampler::new();
    let (t, n) = time_ticks(ticks, || sampler.sample(Some(&no_cgroup)).engine.map_or(0, |e| e.processes as usize));
    rows.push(("(b') host + engine tree, no cgroup", t, n));

    // The engine tick's two parts: listing the cgroup subtree, and reading each pid's stat.
    let (t, n) = time_ticks(ticks, || {
        let mut pids = Vec::new();
        read_cgroup_pids(&target.cgroup_dirs, &mut pids);
        pids.len()
    });
    rows.push(("  part: cgroup subtree listing", t, n));
    let mut pids = Vec::new();
    read_cgroup_pids(&target.cgroup_dirs, &mut pids);
    let mut buf = Vec::new();
    let (t, n) = time_ticks(ticks, || pids.iter().filter_map(|&pid| read_stat(Path::new("/proc"), pid, &mut buf)).count());
    rows.push(("  part: /proc/<pid>/stat reads", t, n));

    // The same tree through sysinfo: the cgroup listing, then its per-pid
    // refresh of memory and CPU (no threads), plus the same host refreshes.
    let mut system = System::new().unwrap();
    let (t, n) = time_ticks(ticks, || {
        let mut pids = Vec::new();
        read_cgroup_pids(&target.cgroup_dirs, &mut pids);
        let pids: Vec<sysinfo::Pid> = pids.into_iter().map(sysinfo::Pid::from_u32).collect();
        system.refresh_cpu_usage();
        system.refresh_memory();
        black_box(System::load_average().ok());
        system.refresh_processes_specifics(ProcessesToUpdate::Some(&pids), true, ProcessRefreshKind::nothing().without_tasks().with_memory().with_cpu());
        // Use what was read, as the sampler does.
        let figures: Vec<u64> = pids.iter().filter_map(|pid| system.process(*pid)).map(|p| p.memory() + p.accumulated_cpu_time()).collect();
        black_box(&figures).len()
    });
    rows.push(("(c1) sysinfo per-pid refresh of the tree", t, n));

    let mut system = System::new().unwrap();
    let (t, n) = time_ticks(ticks, || {
        system.refresh_all();
        system.processes().len()
    });
    rows.push(("(c2) naive: System::refresh_all", t, n));

    let mut system = System::new().unwrap();
    let (t, n) = time_ticks(ticks, || {
        system.refresh_processes_specifics(ProcessesToUpdate::All, true, ProcessRefreshKind::everything());
        system.processes().len()
    });
    rows.push(("(c3) naive: all processes, every attribute", t, n));
    drop(tree);

    println!("sampler tick cost, {ticks} ticks 250 ms apart, release build; {host_processes} processes on the host, engine tree of {TREE_PROCESSES}");
    println!("Sampler::new(): {new_cpu_us:.0} us CPU, {new_wall_us:.0} us wall");
    println!("{:<44} | {:>9} | {:>13} | {:>10} | {:>10} | {:>14}", "variant", "processes", "median CPU us", "max CPU us", "first CPU us", "median wall us");
    for (name, t, n) in rows {
        println!("{:<44} | {:>9} | {:>13.1} | {:>10.1} | {:>10.1} | {:>14.1}", name, n, t.median_cpu_us, t.max_cpu_us, t.first_cpu_us, t.median_wall_us);
    }
}
