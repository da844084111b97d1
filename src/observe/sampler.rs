//! The resource sampler: host CPU, load, memory and swap, and the engine's
//! process tree (buildkitd, runc and the build steps) RSS and CPU, one cheap
//! tick at a time. It only reads; what a sample means (health, metrics,
//! pressure) is decided by its callers. It never scans the whole process table
//! when the engine's cgroup is known.
//!
//! # What a tick reads
//!
//! - Host: sysinfo's CPU-usage refresh (`/proc/stat`) and memory refresh
//!   (`/proc/meminfo`), and `/proc/loadavg`.
//! - Engine: the pids in `cgroup.procs` of every directory of the engine's
//!   cgroup subtree, then one read of `/proc/<pid>/stat` per process. That one
//!   file holds everything needed: parent, user+system time (all threads),
//!   reaped children's time, start time and RSS. sysinfo's per-pid refresh reads
//!   `status`, `stat` and `statm` for the same RSS and CPU, more for a pid it
//!   has not seen yet, and exposes neither reaped-children time nor start time;
//!   `cargo bench --bench sampler` measures both: for a 51-process tree, 0.76 ms
//!   of stat reads here against 2.7 ms for sysinfo's refresh of the same pids
//!   (numbers in the bench's doc).
//!
//! # Engine CPU between two ticks
//!
//! Summing the tree's cumulative CPU and taking the difference goes wrong both
//! ways: it drops (negative) when a build step exits, and it jumps (a spike)
//! when a long-lived process joins. Counting only the processes present in both
//! ticks is safe but misses every build step that starts and ends between
//! ticks, and `RUN make -j` is thousands of those. So each process (pid + start
//! time, which survives pid reuse) is charged as follows:
//!
//! - present in both ticks: its own CPU delta, plus the growth of the time it
//!   reaped from exited children, minus what those children had already been
//!   charged last tick (summed over the tree, so an orphan reaped by another
//!   ancestor still balances);
//! - new and started after the previous tick: everything it used, own and
//!   reaped (all of it happened in the interval);
//! - new but older than the previous tick (moved into the cgroup, or the first
//!   sight of the engine): nothing now, counted from here on;
//! - exited but not yet reaped (a zombie, which cgroup.procs no longer lists):
//!   still read and treated as present, so its time is subtracted only once it
//!   has moved into its parent's reaped time.
//!
//! Every term is non-negative, so the figure never goes below zero, and nothing
//! older than the interval is charged, so it does not spike. What is lost: a
//! process reaped outside the tree (buildkitd itself, by the agent) and
//! children of a parent that ignores SIGCHLD (the kernel does not add their
//! time anywhere). The first tick with an engine reports 0.

use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use sysinfo::System;

/// What to watch of the engine: buildkitd's pid, and the cgroup directories (one per hierarchy) whose
/// subtree holds buildkitd and its build steps (buildkitd runs in <engine>/daemon, steps in <engine>/buildkit/<id>).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineTarget {
    pub pid: u32,
    pub cgroup_dirs: Vec<PathBuf>,
}

/// The host as a whole.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HostSample {
    /// 0..=1 over all CPUs since the last tick; 0 on the first.
    pub cpu_utilisation: f64,
    pub cpus: u32,
    pub load_1: f64,
    pub load_5: f64,
    pub load_15: f64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    /// Total minus available (what the kernel could not hand out without reclaim or swap).
    pub memory_used_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_used_bytes: u64,
}

/// The engine's process tree: buildkitd, runc and the build steps.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EngineSample {
    pub pid: u32,
    pub processes: u32,
    /// Sum of the processes' resident sets (pages shared between them count once per process).
    pub rss_bytes: u64,
    /// Cumulative user+sys of the live tree: drops when a process exits.
    pub cpu_seconds_total: f64,
    /// Cores used since the last tick, e.g. 1.5 (see the module doc for the rule); 0 on the first.
    pub cpu_utilisation: f64,
    /// CPU seconds the trees used since this sampler first saw an engine, by the
    /// same rule: includes steps that lived and exited between ticks, and never
    /// decreases (what `machine_agent_engine_cpu_seconds_total` exports).
    pub cpu_seconds_accounted: f64,
}

/// One tick.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    pub unix_time_ms: i64,
    pub host: HostSample,
    pub engine: Option<EngineSample>,
}

/// Why part of a tick could not be read; logged at debug level, the sample
/// carries zeros for that part.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum SampleError {
    /// cannot read {path}: {source}
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// unexpected content in {path}: {content:?}
    Parse { path: PathBuf, content: String },
}

/// Shorter intervals report the previous utilisation and keep measuring from
/// the older tick: CPU times come in 10 ms ticks per process, so a 10 ms wall
/// window would be all rounding. sysinfo uses the same floor for host CPU.
const MIN_UTILISATION_INTERVAL_TICKS_AT_100HZ: u64 = 20;

/// Where `/proc` is; a parameter of the readers so tests can hand them a fake tree.
const PROC: &str = "/proc";

/// Samples the host and the engine's process tree; keep one for the agent's
/// life (it remembers the previous tick for CPU deltas).
#[derive(Debug)]
pub struct Sampler {
    /// None only if sysinfo cannot start on this platform (it always can on Linux).
    system: Option<System>,
    host_ticks: u64,
    page_size_bytes: u64,
    clock_ticks_per_second: u64,
    /// The tick CPU deltas are measured from.
    baseline: Option<TreeSnapshot>,
    last_engine_cpu_utilisation: f64,
    engine_cpu_ticks_accounted: u64,
    last_engine_pids: Vec<u32>,
    stat_buf: Vec<u8>,
}

impl Default for Sampler {
    fn default() -> Self {
        Self::new()
    }
}

impl Sampler {
    /// Cheap: reads `/proc/self/auxv` for the page size and clock tick rate, and nothing else.
    pub fn new() -> Self {
        let system = System::new().map_err(|error| tracing::warn!(%error, "sysinfo unavailable: host figures will be zero")).ok();
        let (page_size_bytes, clock_ticks_per_second) = fs::read(Path::new(PROC).join("self/auxv")).ok().map(|auxv| parse_auxv(&auxv)).unwrap_or((None, None));
        Self {
            system,
            host_ticks: 0,
            // 4 KiB pages and USER_HZ 100 are the defaults on amd64 and arm64; auxv always has both.
            page_size_bytes: page_size_bytes.unwrap_or(4096),
            clock_ticks_per_second: clock_ticks_per_second.unwrap_or(100),
            baseline: None,
            last_engine_cpu_utilisation: 0.0,
            engine_cpu_ticks_accounted: 0,
            last_engine_pids: Vec::new(),
            stat_buf: Vec::new(),
        }
    }

    /// One tick: the host, and the engine's tree when there is an engine.
    pub fn sample(&mut self, engine: Option<&EngineTarget>) -> Sample {
        let unix_time_ms = crate::clock::unix_time_ms();
        let host = self.sample_host();
        let engine = match engine {
            Some(target) => Some(self.sample_engine(target)),
            None => {
                // The next engine's first tick reports 0, not a delta against a tree long gone.
                self.baseline = None;
                self.last_engine_cpu_utilisation = 0.0;
                self.last_engine_pids.clear();
                None
            }
        };
        Sample { unix_time_ms, host, engine }
    }

    /// The pids the last engine sample counted, sorted (for tests and debugging).
    pub fn engine_pids(&self) -> &[u32] {
        &self.last_engine_pids
    }

    fn sample_host(&mut self) -> HostSample {
        let load = System::load_average().map_err(|error| tracing::debug!(%error, "cannot read the load average")).unwrap_or(sysinfo::LoadAvg {
            one: 0.0,
            five: 0.0,
            fifteen: 0.0,
        });
        let Some(system) = self.system.as_mut() else {
            return HostSample { load_1: load.one, load_5: load.five, load_15: load.fifteen, ..HostSample::default() };
        };
        system.refresh_cpu_usage();
        system.refresh_memory();
        self.host_ticks += 1;
        // sysinfo's first reading is usage since boot, not since a tick.
        let cpu_utilisation = if self.host_ticks == 1 { 0.0 } else { (f64::from(system.global_cpu_usage()) / 100.0).clamp(0.0, 1.0) };
        HostSample {
            cpu_utilisation,
            cpus: u32::try_from(system.cpus().len()).unwrap_or(u32::MAX),
            load_1: load.one,
            load_5: load.five,
            load_15: load.fifteen,
            memory_total_bytes: system.total_memory(),
            memory_available_bytes: system.available_memory(),
            memory_used_bytes: system.used_memory(),
            swap_total_bytes: system.total_swap(),
            swap_used_bytes: system.used_swap(),
        }
    }

    fn sample_engine(&mut self, target: &EngineTarget) -> EngineSample {
        let proc_root = Path::new(PROC);
        // Uptime before the listing: anything the listing finds that the
        // previous one did not, and that started after the previous uptime
        // reading, was born inside the interval.
        let uptime_ticks = read_uptime_ticks(proc_root, self.clock_ticks_per_second)
            .map_err(|error| tracing::debug!(%error, "cannot read the uptime: CPU figures kept from the last tick"))
            .ok();
        let mut now = TreeSnapshot { uptime_ticks: uptime_ticks.unwrap_or(0), procs: HashMap::new() };

        let mut pids = Vec::new();
        if read_cgroup_pids(&target.cgroup_dirs, &mut pids) {
            // buildkitd is in daemon/ already; named in case it was moved out.
            if let Err(missing) = pids.binary_search(&target.pid) {
                pids.insert(missing, target.pid);
            }
            for pid in pids {
                if let Some(stat) = read_stat(proc_root, pid, &mut self.stat_buf) {
                    now.procs.insert(pid, stat);
                }
            }
        } else {
            now.procs = read_tree_without_cgroup(proc_root, target.pid, &mut self.stat_buf);
        }
        if let Some(baseline) = &self.baseline {
            // Exited but unreaped members of the last tick stay until their
            // time has moved into their parent's (see the module doc).
            for (&pid, before) in &baseline.procs {
                if now.procs.contains_key(&pid) {
                    continue;
                }
                if let Some(stat) = read_stat(proc_root, pid, &mut self.stat_buf) {
                    if stat.state == 'Z' && stat.start_ticks == before.start_ticks {
                        now.procs.insert(pid, stat);
                    }
                }
            }
        }

        let hz = self.clock_ticks_per_second.max(1);
        let mut sample = EngineSample { pid: target.pid, ..EngineSample::default() };
        let mut own_ticks = 0u64;
        for stat in now.procs.values() {
            sample.rss_bytes = sample.rss_bytes.saturating_add(stat.rss_pages.saturating_mul(self.page_size_bytes));
            own_ticks = own_ticks.saturating_add(stat.own_ticks);
        }
        sample.processes = u32::try_from(now.procs.len()).unwrap_or(u32::MAX);
        sample.cpu_seconds_total = ticks_to_seconds(own_ticks, hz);

        match (&self.baseline, uptime_ticks) {
            // Without the clock no interval can be measured, nor a birth placed in one.
            (_, None) => {}
            (None, Some(_)) => {
                self.last_engine_cpu_utilisation = 0.0;
                self.baseline = Some(now.clone());
            }
            (Some(baseline), Some(_)) => {
                let elapsed_ticks = now.uptime_ticks.saturating_sub(baseline.uptime_ticks);
                if elapsed_ticks >= MIN_UTILISATION_INTERVAL_TICKS_AT_100HZ * hz / 100 {
                    let used_ticks = cpu_ticks_between(baseline, &now);
                    self.engine_cpu_ticks_accounted = self.engine_cpu_ticks_accounted.saturating_add(used_ticks);
                    self.last_engine_cpu_utilisation = cores_used(used_ticks, elapsed_ticks);
                    self.baseline = Some(now.clone());
                }
            }
        }
        sample.cpu_utilisation = self.last_engine_cpu_utilisation;
        sample.cpu_seconds_accounted = ticks_to_seconds(self.engine_cpu_ticks_accounted, hz);

        self.last_engine_pids = now.procs.into_keys().collect();
        self.last_engine_pids.sort_unstable();
        sample
    }
}

#[allow(clippy::cast_precision_loss)] // tick counts stay far below 2^52
fn ticks_to_seconds(ticks: u64, ticks_per_second: u64) -> f64 {
    ticks as f64 / ticks_per_second as f64
}

/// Cores used: CPU ticks over wall ticks of the same clock; 0 over an empty interval.
#[allow(clippy::cast_precision_loss)] // tick counts stay far below 2^52
pub fn cores_used(cpu_ticks: u64, wall_ticks: u64) -> f64 {
    if wall_ticks == 0 {
        return 0.0;
    }
    cpu_ticks as f64 / wall_ticks as f64
}

// === /proc/<pid>/stat ===

/// The fields of `/proc/<pid>/stat` the sampler uses; times in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `Z`, ...
    pub state: char,
    pub ppid: u32,
    /// utime + stime: the process's own CPU, all its threads, live and exited.
    pub own_ticks: u64,
    /// cutime + cstime: CPU of the children it has waited for (and theirs, recursively).
    pub reaped_ticks: u64,
    /// Since boot; with the pid, the identity of a process across ticks.
    pub start_ticks: u64,
    pub rss_pages: u64,
}

impl ProcStat {
    fn total_ticks(&self) -> u64 {
        self.own_ticks.saturating_add(self.reaped_ticks)
    }
}

/// Parses one `/proc/<pid>/stat` line (proc(5)). The command name may hold
/// spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let (_, rest) = text.rsplit_once(')')?;
    // Field numbers as in proc(5); the iterator starts at field 3.
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?; // 3
    let ppid = fields.next()?.parse().ok()?; // 4
    let utime: u64 = fields.nth(9)?.parse().ok()?; // 14, after pgrp .. cmajflt
    let stime: u64 = fields.next()?.parse().ok()?; // 15
                                                   // Signed in the kernel's format; never negative in practice.
    let cutime: i64 = fields.next()?.parse().ok()?; // 16
    let cstime: i64 = fields.next()?.parse().ok()?; // 17
    let start_ticks = fields.nth(4)?.parse().ok()?; // 22, after priority, nice, num_threads, itrealvalue
    let rss_pages: i64 = fields.nth(1)?.parse().ok()?; // 24, after vsize
    Some(ProcStat {
        state,
        ppid,
        own_ticks: utime.saturating_add(stime),
        reaped_ticks: u64::try_from(cutime.max(0)).unwrap_or(0).saturating_add(u64::try_from(cstime.max(0)).unwrap_or(0)),
        start_ticks,
        rss_pages: u64::try_from(rss_pages.max(0)).unwrap_or(0),
    })
}

/// Room for any stat line: 52 numbers and a command name of at most 16 bytes.
const STAT_READ_BYTES: usize = 2048;

/// `/proc/<pid>/stat`, or None when the process is gone (the normal race
/// between listing a pid and reading it). One open and one read: this runs
/// for every process of the tree on every tick, and in a VM each syscall counts.
pub fn read_stat(proc_root: &Path, pid: u32, buf: &mut Vec<u8>) -> Option<ProcStat> {
    let mut file = fs::File::open(proc_root.join(format!("{pid}/stat"))).ok()?;
    if buf.len() < STAT_READ_BYTES {
        buf.resize(STAT_READ_BYTES, 0);
    }
    let mut filled = 0;
    loop {
        let n = file.read(&mut buf[filled..]).ok()?;
        filled += n;
        // procfs hands over the whole line in one read when it fits.
        if n == 0 || filled < buf.len() {
            break;
        }
        buf.resize(buf.len() * 2, 0);
    }
    let line = &buf[..filled];
    // The command name may not be UTF-8; everything after it is ASCII.
    let after_command = line.iter().rposition(|&b| b == b')')?;
    parse_stat(std::str::from_utf8(&line[after_command..]).ok()?)
}

// === which processes ===

/// Whitespace-separated pids, as in `cgroup.procs` and `/proc/<pid>/task/<tid>/children`.
pub fn parse_pids(text: &str) -> impl Iterator<Item = u32> + '_ {
    text.split_ascii_whitespace().filter_map(|pid| pid.parse().ok())
}

/// Appends the pids of every cgroup in the subtrees of `dirs`; false when none
/// of `dirs` could be read (no cgroup given, or the engine's is gone).
pub fn read_cgroup_pids(dirs: &[PathBuf], pids: &mut Vec<u32>) -> bool {
    let mut any = false;
    let mut stack: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else { continue };
        any = true;
        pids.extend(parse_pids(&procs));
        push_subdirs(dir, &mut stack);
        while let Some(sub) = stack.pop() {
            // A step's cgroup removed between listing and reading is simply empty.
            if let Ok(procs) = fs::read_to_string(sub.join("cgroup.procs")) {
                pids.extend(parse_pids(&procs));
            }
            push_subdirs(&sub, &mut stack);
        }
    }
    if any {
        pids.sort_unstable();
        pids.dedup();
    }
    any
}

fn push_subdirs(dir: &Path, stack: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            stack.push(entry.path());
        }
    }
}

/// Descendants of `pid` from `<proc>/<pid>/task/<tid>/children`; None when the
/// kernel has no such files (built without CONFIG_PROC_CHILDREN).
pub fn read_descendants(proc_root: &Path, pid: u32) -> Option<Vec<u32>> {
    let mut seen = HashSet::from([pid]);
    let mut stack = vec![pid];
    let mut found_children_file = false;
    while let Some(parent) = stack.pop() {
        let Ok(tasks) = fs::read_dir(proc_root.join(parent.to_string()).join("task")) else { continue };
        for task in tasks.flatten() {
            let Ok(children) = fs::read_to_string(task.path().join("children")) else { continue };
            found_children_file = true;
            for child in parse_pids(&children) {
                if seen.insert(child) {
                    stack.push(child);
                }
            }
        }
    }
    if !found_children_file && proc_root.join(pid.to_string()).exists() {
        return None;
    }
    seen.remove(&pid);
    let mut descendants: Vec<u32> = seen.into_iter().collect();
    descendants.sort_unstable();
    Some(descendants)
}

/// `pid` and its descendants with their stats, without a cgroup: the children
/// files when the kernel has them, else one pass over every `/proc/<pid>/stat`
/// (the full scan, only when the engine's cgroup is unknown).
fn read_tree_without_cgroup(proc_root: &Path, pid: u32, buf: &mut Vec<u8>) -> HashMap<u32, ProcStat> {
    if let Some(descendants) = read_descendants(proc_root, pid) {
        return std::iter::once(pid).chain(descendants).filter_map(|p| read_stat(proc_root, p, buf).map(|stat| (p, stat))).collect();
    }
    let mut all = HashMap::new();
    if let Ok(entries) = fs::read_dir(proc_root) {
        for entry in entries.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
            if let Some(stat) = read_stat(proc_root, p, buf) {
                all.insert(p, stat);
            }
        }
    }
    descendants_by_parent(&all, pid).into_iter().filter_map(|p| all.get(&p).map(|stat| (p, *stat))).collect()
}

/// `root` and its descendants by following parent links.
pub fn descendants_by_parent(procs: &HashMap<u32, ProcStat>, root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, stat) in procs {
        children.entry(stat.ppid).or_default().push(pid);
    }
    let mut tree = vec![root];
    let mut i = 0;
    while let Some(&pid) = tree.get(i) {
        // pid 0's "children" are the kernel's roots, never part of a tree.
        if pid != 0 {
            tree.extend(children.get(&pid).into_iter().flatten().filter(|&&c| c != root));
        }
        i += 1;
    }
    tree.sort_unstable();
    tree.dedup();
    tree
}

// === the CPU rule ===

/// The tree at one tick: what CPU deltas are measured between.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TreeSnapshot {
    /// Time since boot in clock ticks, read before the processes.
    pub uptime_ticks: u64,
    pub procs: HashMap<u32, ProcStat>,
}

/// CPU ticks the tree used between `before` and `now`, by the rule in the module doc.
pub fn cpu_ticks_between(before: &TreeSnapshot, now: &TreeSnapshot) -> u64 {
    let same = |pid: &u32, stat: &ProcStat| before.procs.get(pid).filter(|b| b.start_ticks == stat.start_ticks);
    let mut own = 0u64;
    let mut reaped_growth = 0u64;
    let mut born = 0u64;
    for (pid, stat) in &now.procs {
        match same(pid, stat) {
            Some(b) => {
                own = own.saturating_add(stat.own_ticks.saturating_sub(b.own_ticks));
                reaped_growth = reaped_growth.saturating_add(stat.reaped_ticks.saturating_sub(b.reaped_ticks));
            }
            None if stat.start_ticks >= before.uptime_ticks => born = born.saturating_add(stat.total_ticks()),
            None => {} // older than the interval: counted from now on
        }
    }
    // Already charged last tick: the gone processes' time, which has moved into
    // some ancestor's reaped time (or out of the tree, and is then lost).
    let charged_before: u64 = before
        .procs
        .iter()
        .filter(|(pid, b)| now.procs.get(pid).is_none_or(|n| n.start_ticks != b.start_ticks))
        .map(|(_, b)| b.total_ticks())
        .fold(0, u64::saturating_add);
    own.saturating_add(reaped_growth.saturating_sub(charged_before)).saturating_add(born)
}

// === small /proc files ===

/// Time since boot from `/proc/uptime`, in clock ticks (the unit of stat's start time).
fn read_uptime_ticks(proc_root: &Path, ticks_per_second: u64) -> Result<u64, SampleError> {
    let path = proc_root.join("uptime");
    let text = fs::read_to_string(&path).map_err(|source| SampleError::Read { path: path.clone(), source })?;
    parse_uptime_ticks(&text, ticks_per_second).ok_or(SampleError::Parse { path, content: text })
}

/// `/proc/uptime`'s first field ("12345.67") in clock ticks, without going through a float.
pub fn parse_uptime_ticks(text: &str, ticks_per_second: u64) -> Option<u64> {
    let seconds = text.split_ascii_whitespace().next()?;
    let (whole, fraction) = seconds.split_once('.').unwrap_or((seconds, "0"));
    let whole: u64 = whole.parse().ok()?;
    let hundredths: u64 = format!("{fraction:0<2}").get(..2)?.parse().ok()?;
    Some(whole.saturating_mul(ticks_per_second).saturating_add(hundredths * ticks_per_second / 100))
}

/// The page size and the clock tick rate from the auxiliary vector
/// (`/proc/self/auxv`: native-endian word pairs, type then value).
pub fn parse_auxv(auxv: &[u8]) -> (Option<u64>, Option<u64>) {
    const AT_PAGESZ: u64 = 6;
    const AT_CLKTCK: u64 = 17;
    const WORD: usize = std::mem::size_of::<usize>();
    let word = |bytes: &[u8]| -> u64 {
        let mut buf = [0u8; WORD];
        buf.copy_from_slice(bytes);
        usize::from_ne_bytes(buf) as u64
    };
    let (mut page_size, mut clock_ticks) = (None, None);
    for pair in auxv.chunks_exact(2 * WORD) {
        match word(&pair[..WORD]) {
            AT_PAGESZ => page_size = Some(word(&pair[WORD..])).filter(|&v| v > 0),
            AT_CLKTCK => clock_ticks = Some(word(&pair[WORD..])).filter(|&v| v > 0),
            _ => {}
        }
    }
    (page_size, clock_ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(ppid: u32, own: u64, reaped: u64, start: u64) -> ProcStat {
        ProcStat { state: 'S', ppid, own_ticks: own, reaped_ticks: reaped, start_ticks: start, rss_pages: 0 }
    }

    fn snapshot(uptime: u64, procs: &[(u32, ProcStat)]) -> TreeSnapshot {
        TreeSnapshot { uptime_ticks: uptime, procs: procs.iter().copied().collect() }
    }

    #[test]
    fn parses_stat_with_a_command_name_holding_spaces_and_parens() {
        let line = "4242 (buildkitd (x) y) S 1 4242 4242 0 -1 4194560 1234 0 5 0 \
                    1500 300 42 8 20 0 17 0 98765 1234567890 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_stat(line), Some(ProcStat { state: 'S', ppid: 1, own_ticks: 1800, reaped_ticks: 50, start_ticks: 98765, rss_pages: 2560 }));
    }

    #[test]
    fn parses_this_processs_real_stat() {
        let text = fs::read_to_string("/proc/self/stat").unwrap();
        let own = parse_stat(&text).unwrap();
        assert_eq!(own.ppid, nix::unistd::getppid().as_raw() as u32);
        assert!(own.rss_pages > 0, "{text}");
        assert!(matches!(own.state, 'R' | 'S'), "{text}");
    }

    #[test]
    fn reads_stat_files_with_any_command_name_and_length() {
        let proc_root = tempfile::tempdir().unwrap();
        let mut line = b"7 (\xff\xfe) ".to_vec(); // a command name that is not UTF-8
        line.extend_from_slice(b"R 1 7 7 0 -1 0 0 0 0 0 11 22 3 4 20 0 1 0 500 0 9 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n");
        fs::create_dir_all(proc_root.path().join("7")).unwrap();
        fs::write(proc_root.path().join("7/stat"), &line).unwrap();
        let mut buf = Vec::new();
        let expected = ProcStat { state: 'R', ppid: 1, own_ticks: 33, reaped_ticks: 7, start_ticks: 500, rss_pages: 9 };
        assert_eq!(read_stat(proc_root.path(), 7, &mut buf), Some(expected));
        // Longer than the first read: the buffer grows.
        let mut long = b"8 (x) ".to_vec();
        long.extend_from_slice(&line[line.iter().position(|&b| b == b'R').unwrap()..line.len() - 1]);
        long.extend(b" 0".repeat(STAT_READ_BYTES));
        fs::create_dir_all(proc_root.path().join("8")).unwrap();
        fs::write(proc_root.path().join("8/stat"), &long).unwrap();
        assert_eq!(read_stat(proc_root.path(), 8, &mut buf), Some(expected));
        assert_eq!(read_stat(proc_root.path(), 9, &mut buf), None, "a gone process");
        // This process's real stat file: `parses_this_processs_real_stat`.
    }

    #[test]
    fn rejects_truncated_stat() {
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("12 (sh) S 1 12 12 0 -1 0 0 0 0 0 5 6"), None);
        assert_eq!(parse_stat("12 sh S 1"), None);
    }

    #[test]
    fn parses_pid_lists() {
        assert_eq!(parse_pids("12\n345\n").collect::<Vec<_>>(), [12, 345]);
        assert_eq!(parse_pids("7 8 ").collect::<Vec<_>>(), [7, 8]); // children files: space-separated
        assert_eq!(parse_pids("").count(), 0);
    }

    #[test]
    fn parses_uptime_in_clock_ticks() {
        assert_eq!(parse_uptime_ticks("15546.59 21630.44\n", 100), Some(1_554_659));
        assert_eq!(parse_uptime_ticks("10.5 1.0", 100), Some(1050));
        assert_eq!(parse_uptime_ticks("10 1", 250), Some(2500));
        assert_eq!(parse_uptime_ticks("", 100), None);
        assert_eq!(parse_uptime_ticks("x.5 1", 100), None);
    }

    #[test]
    fn reads_page_size_and_clock_ticks_from_the_aux_vector() {
        let mut auxv = Vec::new();
        for (key, value) in [(3usize, 0x40usize), (6, 16384), (17, 100), (0, 0)] {
            auxv.extend_from_slice(&key.to_ne_bytes());
            auxv.extend_from_slice(&value.to_ne_bytes());
        }
        assert_eq!(parse_auxv(&auxv), (Some(16384), Some(100)));
        assert_eq!(parse_auxv(&[]), (None, None));
        let real = parse_auxv(&fs::read("/proc/self/auxv").unwrap());
        assert!(matches!(real, (Some(4096 | 16384 | 65536), Some(100))), "{real:?}");
    }

    #[test]
    fn first_tick_charges_nothing_and_steady_processes_their_own_delta() {
        let a = snapshot(1000, &[(10, stat(1, 500, 0, 10)), (11, stat(10, 100, 0, 20))]);
        let b = snapshot(1500, &[(10, stat(1, 700, 0, 10)), (11, stat(10, 150, 0, 20))]);
        assert_eq!(cpu_ticks_between(&b, &b), 0);
        assert_eq!(cpu_ticks_between(&a, &b), 250);
        assert_eq!(cores_used(cpu_ticks_between(&a, &b), 500), 0.5);
    }

    #[test]
    fn a_step_that_exits_and_is_reaped_charges_only_its_last_interval() {
        // The step (11) used 1000 ticks before the first tick and 40 more before
        // exiting; its parent reaped it, so the parent's reaped time grew by 1040.
        let a = snapshot(1000, &[(10, stat(1, 500, 0, 10)), (11, stat(10, 1000, 0, 20))]);
        let b = snapshot(1500, &[(10, stat(1, 510, 1040, 10))]);
        assert_eq!(cpu_ticks_between(&a, &b), 10 + 40);
    }

    #[test]
    fn a_step_born_and_gone_between_ticks_is_charged_through_its_parent() {
        // `RUN make`: many short compilers, none ever seen by a tick.
        let a = snapshot(1000, &[(10, stat(1, 500, 0, 10))]);
        let b = snapshot(1500, &[(10, stat(1, 500, 300, 10))]);
        assert_eq!(cpu_ticks_between(&a, &b), 300);
    }

    #[test]
    fn a_process_born_in_the_interval_is_charged_all_it_used() {
        let a = snapshot(1000, &[(10, stat(1, 500, 0, 10))]);
        let b = snapshot(1500, &[(10, stat(1, 500, 0, 10)), (12, stat(10, 200, 30, 1200))]);
        assert_eq!(cpu_ticks_between(&a, &b), 230);
    }

    #[test]
    fn an_old_process_that_joins_does_not_spike() {
        // Moved into the cgroup with an hour of CPU behind it; or the engine's first sight.
        let a = snapshot(1000, &[(10, stat(1, 500, 0, 10))]);
        let b = snapshot(1500, &[(10, stat(1, 510, 0, 10)), (99, stat(1, 360_000, 5_000, 5))]);
        assert_eq!(cpu_ticks_between(&a, &b), 10);
    }

    #[test]
    fn a_reused_pid_is_a_new_process() {
        let a = snapshot(1000, &[(10, stat(1, 500, 0, 10)), (11, stat(10, 900, 0, 20))]);
        // 11 exited (reaped: +905) and the pid was reused by a process born at 1200 using 7 ticks.
        let b = snapshot(1500, &[(10, stat(1, 500, 905, 10)), (11, stat(10, 7, 0, 1200))]);
        assert_eq!(cpu_ticks_between(&a, &b), 5 + 7);
    }

    #[test]
    fn the_root_exiting_loses_its_time_but_never_goes_negative() {
        // buildkitd (10) is reaped by the agent, outside the tree; a step keeps running.
        let a = snapshot(1000, &[(10, stat(1, 50_000, 0, 10)), (11, stat(10, 100, 0, 20))]);
        let b = snapshot(1500, &[(11, stat(1, 160, 0, 20))]);
        assert_eq!(cpu_ticks_between(&a, &b), 60);
        let c = snapshot(1500, &[]);
        assert_eq!(cpu_ticks_between(&a, &c), 0);
    }

    #[test]
    fn an_orphan_reaped_by_another_ancestor_still_balances() {
        // 12's parent 11 exits first (reaped by 10); 12 is reparented to the
        // step's init 10 too and reaped there, all within one interval.
        let a = snapshot(1000, &[(10, stat(1, 0, 0, 10)), (11, stat(10, 100, 0, 20)), (12, stat(11, 400, 0, 30))]);
        let b = snapshot(1500, &[(10, stat(1, 0, 100 + 5 + 400 + 20, 10))]);
        assert_eq!(cpu_ticks_between(&a, &b), 25);
    }

    #[test]
    fn follows_parent_links_from_the_root_only() {
        let procs: HashMap<u32, ProcStat> =
            [(1, stat(0, 0, 0, 0)), (2, stat(0, 0, 0, 0)), (10, stat(1, 0, 0, 0)), (11, stat(10, 0, 0, 0)), (12, stat(11, 0, 0, 0)), (13, stat(1, 0, 0, 0))]
                .into_iter()
                .collect();
        assert_eq!(descendants_by_parent(&procs, 10), [10, 11, 12]);
        assert_eq!(descendants_by_parent(&procs, 42), [42]);
    }

    /// A fake cgroup subtree: `(relative dir, cgroup.procs content)`.
    fn cgroup_tree(layout: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (dir, procs) in layout {
            let dir = root.path().join(dir);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("cgroup.procs"), procs).unwrap();
        }
        root
    }

    #[test]
    fn collects_pids_of_every_cgroup_in_the_subtrees() {
        let v1_memory = cgroup_tree(&[
            ("engine", ""),
            ("engine/daemon", "100\n"),
            ("engine/buildkit/step-a", "200\n201\n"),
            ("engine/buildkit/step-b", "300\n"),
            ("engine/buildkit/step-b/nested", "301\n"),
        ]);
        // Another hierarchy (v1 cpu) where runc also placed step-a.
        let v1_cpu = cgroup_tree(&[("engine", ""), ("engine/buildkit/step-a", "201\n202\n")]);
        let mut pids = Vec::new();
        let dirs = [v1_memory.path().join("engine"), v1_cpu.path().join("engine")];
        assert!(read_cgroup_pids(&dirs, &mut pids));
        assert_eq!(pids, [100, 200, 201, 202, 300, 301]);
    }

    #[test]
    fn no_readable_cgroup_means_fall_back() {
        let tree = cgroup_tree(&[("engine", "")]);
        let mut pids = Vec::new();
        assert!(!read_cgroup_pids(&[], &mut pids));
        assert!(!read_cgroup_pids(&[tree.path().join("gone")], &mut pids));
        assert!(read_cgroup_pids(&[tree.path().join("gone"), tree.path().join("engine")], &mut pids));
        assert!(pids.is_empty());
    }

    #[test]
    fn follows_children_files_through_every_thread() {
        let proc_root = tempfile::tempdir().unwrap();
        let children = |pid: u32, tid: u32, kids: &str| {
            let dir = proc_root.path().join(format!("{pid}/task/{tid}"));
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("children"), kids).unwrap();
        };
        children(100, 100, "200 ");
        children(100, 101, "300 ");
        children(200, 200, "201 202 ");
        children(201, 201, "");
        children(202, 202, "100 "); // a reused pid cannot loop the walk
        children(300, 300, "");
        assert_eq!(read_descendants(proc_root.path(), 100), Some(vec![200, 201, 202, 300]));
        assert_eq!(read_descendants(proc_root.path(), 555), Some(vec![]), "a gone root has no descendants");
    }

    #[test]
    fn a_kernel_without_children_files_is_told_apart() {
        let proc_root = tempfile::tempdir().unwrap();
        fs::create_dir_all(proc_root.path().join("100/task/100")).unwrap();
        assert_eq!(read_descendants(proc_root.path(), 100), None);
    }

    #[test]
    fn sampler_is_send_so_a_blocking_task_can_own_it() {
        fn is_send<T: Send>() {}
        is_send::<Sampler>();
    }
}
