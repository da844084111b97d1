//! The engine's memory cgroup: a runaway build step is OOM-killed inside it and
//! never takes the agent, sshd or the kernel's own reserve with it.
//!
//! Layout, the same on both cgroup versions:
//!
//! ```text
//! <hierarchy>/<name>/              memory limit = total memory - reserve
//! <hierarchy>/<name>/daemon/       buildkitd itself
//! <hierarchy>/<name>/buildkit/<id> each build step (BuildKit's defaultCgroupParent = /<name>)
//! ```
//!
//! `daemon/` exists because cgroup v2 forbids processes in a cgroup that hands
//! controllers to its children; on v1 it keeps the two OOM attributions (the
//! engine, a step) readable from the memcg path alone.
//!
//! v2 is used when the unified hierarchy at /sys/fs/cgroup offers the memory
//! controller; otherwise the v1 memory hierarchy. The cgroup lives at the
//! hierarchy's root, outside the agent's own (systemd unit) cgroup, so an agent
//! restart does not take the engine down with it. On a v1 or hybrid host the
//! engine joins `<name>/daemon` in every other mounted hierarchy too
//! ([`EngineCgroup::other_daemon_procs`]): systemd finds a unit's processes in
//! `name=systemd` (v1) or the unified tree (hybrid), and would kill an engine
//! left there with the agent's unit (`KillMode=mixed`).
//!
//! Under systemd (it is PID 1: /run/systemd/system exists) the engine cgroup
//! is a transient scope of its own instead, `<name>.scope` in system.slice
//! ([`Placement`]): systemd knows the engine as a unit (`systemctl status
//! machine-agent-engine.scope`), neither `KillMode=` nor a restart of
//! machine-agent.service touches it, and with `Delegate=yes` the tree below
//! the scope is the agent's, so the layout above holds with
//! `<hierarchy>/system.slice/<name>.scope` as `<name>`. A scope needs a process
//! to exist: a holder (`sleep infinity`, in `<scope>/holder`) keeps it across
//! engine restarts and agent restarts, until the drain stops the scope.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Which cgroup interface the memory controller is reached through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

/// Where the memory controller is mounted, found in /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryHierarchy {
    pub version: CgroupVersion,
    pub mount_point: PathBuf,
}

/// Why the engine's cgroup could not be set up or read.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum CgroupError {
    /// no memory cgroup controller: neither cgroup v2 with `memory` in cgroup.controllers nor a v1 memory hierarchy is mounted
    NoMemoryController,
    /// cannot read the mount table: {0}
    Mountinfo(#[from] crate::volume::mountinfo::MountinfoError),
    /// the memory reserve ({reserve} bytes) leaves nothing for the engine out of {total} bytes of memory
    ReserveTooLarge { total: u64, reserve: u64 },
    /// cannot read {path}: {source}
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// cannot write {value:?} to {path}: {source}
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    /// cannot remove {path}: {source}
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// cannot start the engine's systemd scope {unit}: {detail}
    Scope { unit: String, detail: String },
    /// cannot create {path}: {source}
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Picks the memory hierarchy: v2 when the unified mount offers `memory`
/// (`v2_controllers` is that mount's cgroup.controllers), else v1's memory mount.
pub fn choose_hierarchy(mounts: &[crate::volume::mountinfo::MountEntry], v2_controllers: impl Fn(&Path) -> Option<String>) -> Option<MemoryHierarchy> {
    let v2 =
        mounts.iter().filter(|m| m.fs_type == "cgroup2").find(|m| v2_controllers(&m.mount_point).is_some_and(|c| c.split_whitespace().any(|c| c == "memory")));
    if let Some(m) = v2 {
        return Some(MemoryHierarchy { version: CgroupVersion::V2, mount_point: m.mount_point.clone() });
    }
    mounts
        .iter()
        .find(|m| m.fs_type == "cgroup" && m.super_options.split(',').any(|o| o == "memory"))
        .map(|m| MemoryHierarchy { version: CgroupVersion::V1, mount_point: m.mount_point.clone() })
}

/// The engine's memory limit: everything but the reserve kept for the agent and the system.
pub fn engine_memory_limit(total_bytes: u64, reserve_bytes: u64) -> Result<u64, CgroupError> {
    match total_bytes.checked_sub(reserve_bytes) {
        Some(limit) if limit > 0 => Ok(limit),
        _ => Err(CgroupError::ReserveTooLarge { total: total_bytes, reserve: reserve_bytes }),
    }
}

/// Where the engine cgroup is made: what the host's init was detected to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// `<hierarchy>/<name>` at each hierarchy's root, made by the agent: no
    /// systemd as init (tests, containers, CI), or no `systemd-run` to ask it.
    Root,
    /// A transient scope `<unit>` in `<slice>`, started through `systemd_run`
    /// with `Delegate=yes` and the memory limit.
    Scope { unit: String, slice: &'static str, systemd_run: PathBuf },
}

/// The slice transient engine scopes go in: system.slice, beside the agent's
/// own unit, so the engine's path is the same on every systemd host.
pub const ENGINE_SLICE: &str = "system.slice";

impl Placement {
    /// The placement for engine cgroup `name` given what was detected:
    /// whether systemd is PID 1 (`/run/systemd/system` is a directory, as
    /// sd_booted(3) checks) and where systemd-run is, if anywhere.
    pub fn choose(systemd_booted: bool, systemd_run: Option<&Path>, name: &str) -> Self {
        match (systemd_booted, systemd_run) {
            (true, Some(run)) => Self::Scope { unit: format!("{name}.scope"), slice: ENGINE_SLICE, systemd_run: run.to_path_buf() },
            _ => Self::Root,
        }
    }

    /// [`Placement::choose`] with this host's facts.
    pub fn detect(name: &str) -> Self {
        let (booted, run) = (crate::systemd::booted(), crate::systemd::systemd_run());
        if booted && run.is_none() {
            tracing::warn!("systemd is PID 1 but systemd-run is missing: the engine cgroup is made at the hierarchy's root, outside any unit");
        }
        Self::choose(booted, run, name)
    }

    /// The engine cgroup's path inside a hierarchy, `/`-rooted (BuildKit's
    /// defaultCgroupParent, the OOM killer's memcg paths).
    pub fn relative(&self, name: &str) -> String {
        match self {
            Self::Root => format!("/{name}"),
            Self::Scope { unit, slice, .. } => format!("/{slice}/{unit}"),
        }
    }

    /// systemd-run's arguments that start the scope, its memory limit and
    /// delegation set, around `holder`.
    pub fn scope_args(unit: &str, slice: &str, limit_bytes: u64, holder: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "--scope",
            "--quiet",
            "--collect",
            &format!("--unit={unit}"),
            &format!("--slice={slice}"),
            "--description=machine-agent's build engine (buildkitd and its build steps)",
            // The tree below the scope is the agent's: daemon/, buildkit/<id>, holder/.
            "--property=Delegate=yes",
            &format!("--property=MemoryMax={limit_bytes}"),
            "--",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        args.extend(holder.iter().map(ToString::to_string));
        args
    }
}

/// The scope's holder: keeps the scope (and its cgroup) while no engine runs
/// in it, between an engine's death and its restart. It says `ready` once
/// systemd-run has put it in the scope and exec'd it.
const SCOPE_HOLDER: [&str; 3] = ["/bin/sh", "-c", "echo ready; exec sleep infinity >/dev/null 2>&1"];

/// The holder's cgroup under the scope.
const HOLDER_DIR: &str = "holder";

/// The engine's cgroup, created and limited.
#[derive(Debug, Clone)]
pub struct EngineCgroup {
    pub version: CgroupVersion,
    /// `<hierarchy>/<name>`: the limited cgroup.
    pub dir: PathBuf,
    /// `/<name>`: the path inside the hierarchy, for BuildKit's defaultCgroupParent.
    pub relative: String,
    pub limit_bytes: u64,
    /// The transient scope holding it, under systemd; stopped by [`EngineCgroup::remove`].
    pub scope: Option<String>,
    /// The memory hierarchy's mount point.
    pub mount_point: PathBuf,
}

impl EngineCgroup {
    /// Finds the memory hierarchy, creates `<name>` (or its systemd scope) and
    /// `<name>/daemon`, and sets the limit.
    pub fn create(name: &str, limit_bytes: u64) -> Result<Self, CgroupError> {
        let mounts = crate::volume::mountinfo::read_mountinfo(Path::new("/proc/self/mountinfo"))?;
        let hierarchy = choose_hierarchy(&mounts, |mount| fs::read_to_string(mount.join("cgroup.controllers")).ok()).ok_or(CgroupError::NoMemoryController)?;
        let placement = Placement::detect(name);
        if let Placement::Scope { unit, slice, systemd_run } = &placement {
            let dir = hierarchy.mount_point.join(placement.relative(name).trim_start_matches('/'));
            ensure_scope(systemd_run, unit, slice, &dir, limit_bytes)?;
        }
        Self::create_placed(&hierarchy, name, &placement, limit_bytes)
    }

    /// As [`EngineCgroup::create`], in a known hierarchy, at its root.
    pub fn create_in(hierarchy: &MemoryHierarchy, name: &str, limit_bytes: u64) -> Result<Self, CgroupError> {
        Self::create_placed(hierarchy, name, &Placement::Root, limit_bytes)
    }

    fn create_placed(hierarchy: &MemoryHierarchy, name: &str, placement: &Placement, limit_bytes: u64) -> Result<Self, CgroupError> {
        let relative = placement.relative(name);
        let dir = hierarchy.mount_point.join(relative.trim_start_matches('/'));
        let scope = match placement {
            Placement::Root => None,
            Placement::Scope { unit, .. } => Some(unit.clone()),
        };
        let cgroup = Self { version: hierarchy.version, dir, relative, limit_bytes, scope, mount_point: hierarchy.mount_point.clone() };
        if cgroup.version == CgroupVersion::V2 {
            // The root (or parent) must hand the memory controller down before
            // the child's memory.max exists.
            enable_memory_controller(&hierarchy.mount_point)?;
        }
        make_dir(&cgroup.dir)?;
        match cgroup.version {
            CgroupVersion::V2 => {
                write_value(&cgroup.dir.join("memory.max"), &limit_bytes.to_string())?;
                // No swap for the engine: a step over the limit is killed, not swapped to a crawl.
                let _ = write_value(&cgroup.dir.join("memory.swap.max"), "0");
                enable_memory_controller(&cgroup.dir)?;
            }
            CgroupVersion::V1 => {
                write_value(&cgroup.dir.join("memory.limit_in_bytes"), &limit_bytes.to_string())?;
                // Limits and OOM accounting must cover the children (steps) too.
                let _ = write_value(&cgroup.dir.join("memory.use_hierarchy"), "1");
            }
        }
        make_dir(&cgroup.daemon_dir())?;
        Ok(cgroup)
    }

    /// Where buildkitd itself runs.
    pub fn daemon_dir(&self) -> PathBuf {
        self.dir.join("daemon")
    }

    /// Makes the cgroup again as [`EngineCgroup::create`] did (under systemd,
    /// a new scope), after it was removed from outside.
    pub fn recreate(&self) -> Result<Self, CgroupError> {
        let name = match &self.scope {
            Some(unit) => unit.trim_end_matches(".scope"),
            None => self.relative.trim_start_matches('/'),
        };
        Self::create(name, self.limit_bytes)
    }

    /// The file a process writes "0" to in order to join the daemon cgroup.
    pub fn daemon_procs_file(&self) -> PathBuf {
        self.daemon_dir().join("cgroup.procs")
    }

    /// The `cgroup.procs` of `<name>/daemon` in every mounted hierarchy other
    /// than the memory one, created as needed (a new cpuset cgroup gets its
    /// parent's CPUs and memory nodes, or nothing could join it). Returns the
    /// paths it could not prepare with why, beside those it did: a hierarchy
    /// the engine cannot join is a warning, never a failed start.
    pub fn other_daemon_procs(&self) -> (Vec<PathBuf>, Vec<String>) {
        let Ok(mounts) = crate::volume::mountinfo::read_mountinfo(Path::new("/proc/self/mountinfo")) else {
            return (vec![], vec!["cannot read /proc/self/mountinfo".into()]);
        };
        let name = self.relative.trim_start_matches('/');
        let memory_root = &self.mount_point;
        let (mut ready, mut failed) = (vec![], vec![]);
        for mount in mounts.iter().filter(|m| (m.fs_type == "cgroup" || m.fs_type == "cgroup2") && &m.mount_point != memory_root) {
            let engine = mount.mount_point.join(name);
            let daemon = engine.join("daemon");
            let prepared = [&engine, &daemon].into_iter().try_for_each(|dir| make_dir(dir).and_then(|()| inherit_cpuset(dir)));
            match prepared {
                Ok(()) => ready.push(daemon.join("cgroup.procs")),
                Err(error) => failed.push(error.to_string()),
            }
        }
        (ready, failed)
    }

    /// Every process in the engine's cgroup and its descendants, but for the
    /// scope's holder (`holder/`), which must outlive every engine.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut pids = Vec::new();
        collect_pids(&self.dir, &mut pids)?;
        let mut holders = Vec::new();
        collect_pids(&self.dir.join(HOLDER_DIR), &mut holders)?;
        pids.retain(|p| !holders.contains(p));
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// SIGKILLs every process left in the engine's cgroup tree (build steps
    /// run by runc in `buildkit/<id>` are not in the engine's process group,
    /// so stopping the engine leaves them running, holding the cache busy) and
    /// waits up to `limit` for the tree to empty, killing again what a dying
    /// step forked meanwhile. Returns the pids killed; Err with those left.
    pub async fn kill_leftovers(&self, limit: std::time::Duration) -> Result<Vec<i32>, Vec<i32>> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut killed = vec![];
        loop {
            let left = self.pids().unwrap_or_default();
            if left.is_empty() {
                return Ok(killed);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(left);
            }
            for pid in &left {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
            }
            killed.extend(left.into_iter().filter(|p| !killed.contains(p)).collect::<Vec<_>>());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// OOM kills in the whole engine cgroup: on v2 the subtree's kills; on v1
    /// only kills of processes placed directly in it (v1 counts locally).
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        self.oom_kills_in(&self.dir)
    }

    /// OOM kills of buildkitd itself (the daemon cgroup): on both versions the
    /// kernel counts a kill in the victim's own cgroup, so a build step's kill
    /// (in `buildkit/<id>`) never shows here.
    pub fn daemon_oom_kills(&self) -> Result<u64, CgroupError> {
        self.oom_kills_in(&self.daemon_dir())
    }

    fn oom_kills_in(&self, dir: &Path) -> Result<u64, CgroupError> {
        let file = match self.version {
            CgroupVersion::V2 => "memory.events",
            CgroupVersion::V1 => "memory.oom_control",
        };
        let path = dir.join(file);
        let text = fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source })?;
        Ok(parse_flat_keyed(&text, "oom_kill").unwrap_or(0))
    }

    /// Removes the cgroup tree once it is empty (after the engine stopped), in
    /// every hierarchy: runc creates `<name>/buildkit/<id>` in all of them on v1.
    /// Directories still holding processes stay, and are reported.
    pub fn remove(&self) -> Result<(), CgroupError> {
        if let Some(unit) = &self.scope {
            // Kills the holder; systemd then removes the scope's cgroups.
            match std::process::Command::new("systemctl").args(["stop", "--quiet", unit]).stdin(std::process::Stdio::null()).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => tracing::warn!(unit, stderr = %String::from_utf8_lossy(&out.stderr).trim(), "cannot stop the engine's scope"),
                Err(e) => tracing::warn!(unit, error = %e, "cannot run systemctl to stop the engine's scope"),
            }
        }
        let mounts = crate::volume::mountinfo::read_mountinfo(Path::new("/proc/self/mountinfo"))?;
        let name = self.relative.trim_start_matches('/');
        let mut first_error = None;
        for mount in mounts.iter().filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2") {
            if let Err(e) = remove_tree(&mount.mount_point.join(name)) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The limit the kernel enforces now, read back.
    pub fn read_limit(&self) -> Result<u64, CgroupError> {
        let file = match self.version {
            CgroupVersion::V2 => "memory.max",
            CgroupVersion::V1 => "memory.limit_in_bytes",
        };
        let path = self.dir.join(file);
        let text = fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source })?;
        // "max" (v2, unlimited) reads as u64::MAX.
        Ok(text.trim().parse().unwrap_or(u64::MAX))
    }
}

/// Starts the engine's transient scope unless its cgroup `dir` (in the memory
/// hierarchy) already exists: a previous agent's scope, with its holder and
/// maybe a running engine to adopt, is kept. The holder is spawned detached
/// (its own process group) and moved to `<scope>/holder`, so that on cgroup
/// v2 the scope itself holds no process and may hand the memory controller
/// down to daemon/ and the build steps.
fn ensure_scope(systemd_run: &Path, unit: &str, slice: &str, dir: &Path, limit_bytes: u64) -> Result<(), CgroupError> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    if dir.is_dir() {
        tracing::info!(unit, cgroup = %dir.display(), "the engine's systemd scope exists: kept");
        return Ok(());
    }
    let scope_error = |detail: String| CgroupError::Scope { unit: unit.to_string(), detail };
    let mut child = std::process::Command::new(systemd_run)
        .args(Placement::scope_args(unit, slice, limit_bytes, &SCOPE_HOLDER))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| scope_error(format!("cannot run {}: {e}", systemd_run.display())))?;
    let pid = child.id();
    // Blocks until systemd-run has started the scope and exec'd the holder
    // (`ready`), or has failed (end of file); systemd-run bounds its own D-Bus
    // calls, so this wait is bounded too.
    let mut line = String::new();
    let stdout = child.stdout.take().map(std::io::BufReader::new);
    let _ = stdout.map(|mut out| out.read_line(&mut line));
    if line.trim() != "ready" {
        let mut stderr = String::new();
        let _ = child.stderr.take().map(|mut e| std::io::Read::read_to_string(&mut e, &mut stderr));
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        return Err(scope_error(format!("systemd-run ended ({status}): {}", stderr.trim())));
    }
    // The holder runs on after this agent; never waited for, it is reaped by
    // init once this agent is gone (a restart) or by the drain's scope stop.
    drop(child);
    let holder = dir.join(HOLDER_DIR);
    make_dir(&holder)?;
    write_value(&holder.join("cgroup.procs"), &pid.to_string())?;
    tracing::info!(unit, cgroup = %dir.display(), holder_pid = pid, limit_bytes, "the engine's systemd scope started");
    Ok(())
}

/// `key value` lines (memory.events, memory.oom_control): the value of `key`.
pub fn parse_flat_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The cgroup path of `pid` in the memory hierarchy (v1 `memory` line, else the v2 `0::` line).
pub fn memory_cgroup_of(proc_cgroup: &str) -> Option<&str> {
    let mut v2 = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if controllers.split(',').any(|c| c == "memory") {
            return Some(path);
        }
        if id == "0" && controllers.is_empty() {
            v2 = Some(path);
        }
    }
    v2
}

fn collect_pids(dir: &Path, pids: &mut Vec<i32>) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    match fs::read_to_string(&procs) {
        Ok(text) => pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()), // removed meanwhile
        Err(source) => return Err(CgroupError::Read { path: procs, source }),
    }
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(CgroupError::Read { path: dir.to_path_buf(), source }),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_pids(&entry.path(), pids)?;
        }
    }
    Ok(())
}

/// Cgroup directories are removed with rmdir, deepest first (their control files go with them).
fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path())?;
            }
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CgroupError::Remove { path: dir.to_path_buf(), source }),
    }
}

fn enable_memory_controller(dir: &Path) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let current = fs::read_to_string(&path).map_err(|source| CgroupError::Read { path: path.clone(), source })?;
    if current.split_whitespace().any(|c| c == "memory") {
        return Ok(());
    }
    write_value(&path, "+memory")
}

/// A v1 cpuset cgroup starts with no CPUs and no memory nodes, and refuses
/// processes until given some: its parent's. Other hierarchies have no such files.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let path = dir.join(file);
        let Ok(current) = fs::read_to_string(&path) else { continue };
        if current.trim().is_empty() {
            let parent = dir.parent().map(|p| p.join(file)).unwrap_or_default();
            let value = fs::read_to_string(&parent).map_err(|source| CgroupError::Read { path: parent, source })?;
            write_value(&path, value.trim())?;
        }
    }
    Ok(())
}

fn make_dir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create { path: path.to_path_buf(), source }),
    }
}

/// Cgroup files take one write of the whole value; no truncate, no temp file.
fn write_value(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::OpenOptions::new().write(true).open(path).and_then(|mut f| f.write_all(value.as_bytes())).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::mountinfo::parse_mountinfo;

    const HYBRID: &str = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
34 30 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct
";
    const UNIFIED: &str = "\
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn unified_hierarchy_with_memory_is_v2() {
        let mounts = parse_mountinfo(UNIFIED).unwrap();
        let h = choose_hierarchy(&mounts, |_| Some("cpuset cpu io memory pids".into())).unwrap();
        assert_eq!(h, MemoryHierarchy { version: CgroupVersion::V2, mount_point: "/sys/fs/cgroup".into() });
    }

    #[test]
    fn hybrid_without_v2_memory_uses_the_v1_memory_hierarchy() {
        let mounts = parse_mountinfo(HYBRID).unwrap();
        let h = choose_hierarchy(&mounts, |_| Some(String::new())).unwrap();
        assert_eq!(h, MemoryHierarchy { version: CgroupVersion::V1, mount_point: "/sys/fs/cgroup/memory".into() });
    }

    #[test]
    fn no_memory_controller_anywhere_is_none() {
        let mounts = parse_mountinfo(UNIFIED).unwrap();
        assert_eq!(choose_hierarchy(&mounts, |_| Some("cpu io pids".into())), None);
    }

    #[test]
    fn the_engine_gets_a_scope_only_where_systemd_is_init_and_systemd_run_exists() {
        let run = Path::new("/usr/bin/systemd-run");
        let scope = Placement::choose(true, Some(run), "machine-agent-engine");
        assert_eq!(scope, Placement::Scope { unit: "machine-agent-engine.scope".into(), slice: "system.slice", systemd_run: run.into() });
        assert_eq!(scope.relative("machine-agent-engine"), "/system.slice/machine-agent-engine.scope");
        // systemd installed but not PID 1 (containers, CI, this machine), or no systemd-run: as before.
        for (booted, run) in [(false, Some(run)), (true, None), (false, None)] {
            let placement = Placement::choose(booted, run, "machine-agent-engine");
            assert_eq!(placement, Placement::Root, "booted={booted} run={run:?}");
            assert_eq!(placement.relative("machine-agent-engine"), "/machine-agent-engine");
        }
    }

    #[test]
    fn the_scope_is_delegated_limited_and_wraps_the_holder() {
        let args = Placement::scope_args("e.scope", "system.slice", 7 << 30, &["/bin/sh", "-c", "x"]);
        let joined = args.join(" ");
        for want in ["--scope", "--unit=e.scope", "--slice=system.slice", "--property=Delegate=yes", &format!("--property=MemoryMax={}", 7u64 << 30)] {
            assert!(args.iter().any(|a| a == want), "{want} in {joined}");
        }
        assert!(joined.ends_with("-- /bin/sh -c x"), "{joined}");
    }

    #[test]
    fn limit_is_total_minus_reserve_and_never_zero() {
        assert_eq!(engine_memory_limit(8 << 30, 1 << 30).unwrap(), 7 << 30);
        assert!(matches!(engine_memory_limit(1 << 30, 1 << 30), Err(CgroupError::ReserveTooLarge { .. })));
        assert!(matches!(engine_memory_limit(1 << 30, 2 << 30), Err(CgroupError::ReserveTooLarge { .. })));
    }

    #[test]
    fn oom_kill_counters_parse_from_v1_and_v2_files() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n";
        assert_eq!(parse_flat_keyed(v2, "oom_kill"), Some(2));
        assert_eq!(parse_flat_keyed(v1, "oom_kill"), Some(5));
        assert_eq!(parse_flat_keyed(v1, "oom_kill_disable"), Some(0));
        assert_eq!(parse_flat_keyed("", "oom_kill"), None);
    }

    #[test]
    fn memory_cgroup_of_a_process_on_either_version() {
        let v1 = "9:name=systemd:/\n4:memory:/machine-agent-engine/buildkit/abc\n0::/\n";
        assert_eq!(memory_cgroup_of(v1), Some("/machine-agent-engine/buildkit/abc"));
        assert_eq!(memory_cgroup_of("0::/machine-agent-engine/daemon\n"), Some("/machine-agent-engine/daemon"));
        assert_eq!(memory_cgroup_of("garbage"), None);
    }
}
