//! Keeps one buildkitd serving: spawn it in its cgroup and process group, wait
//! until it answers, probe it, classify every exit, restart with backoff, call
//! a crash loop a crash loop, and stop it cleanly when asked.
//!
//! The restart arithmetic ([`CrashHistory`]) and the exit classification
//! ([`classify_exit`]) are pure; [`run`] is the I/O loop around them. One task
//! owns the child process, so there is exactly one place that reaps it.

use super::cgroup::EngineCgroup;
use super::client::{self, EngineClient};
use super::StopOutcome;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// When to restart and when to give up calling it a blip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Delay before the first restart; doubles with each consecutive crash.
    pub initial: Duration,
    /// The delay never exceeds this, however long the crash loop.
    pub max: Duration,
    /// A run this long counts as stable: the next crash starts from `initial` again.
    pub stable_after: Duration,
    /// `crash_limit` crashes within `crash_window` make a crash loop (Degraded).
    pub crash_window: Duration,
    pub crash_limit: u32,
}

/// How the liveness probe decides the engine hangs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSettings {
    pub interval: Duration,
    /// One probe (a gRPC health check) gets this long.
    pub timeout: Duration,
    /// This many failed probes in a row: hung, killed, restarted.
    pub failures: u32,
}

/// What the supervisor decided after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartDecision {
    pub delay: Duration,
    /// Crashes within the window, this one included.
    pub recent_crashes: usize,
    pub crash_loop: bool,
}

/// The engine's recent crashes: the pure part of the restart policy.
#[derive(Debug, Default)]
pub struct CrashHistory {
    recent: VecDeque<Instant>,
    consecutive: u32,
}

impl CrashHistory {
    /// Records an exit at `now` after a run of `ran_for`, and says when to restart.
    pub fn record(&mut self, policy: &RestartPolicy, now: Instant, ran_for: Duration) -> RestartDecision {
        if ran_for >= policy.stable_after {
            self.consecutive = 0;
        }
        self.recent.push_back(now);
        while self.recent.front().is_some_and(|t| now.saturating_duration_since(*t) > policy.crash_window) {
            self.recent.pop_front();
        }
        let doublings = self.consecutive.min(20);
        let delay = policy.initial.saturating_mul(1 << doublings).min(policy.max);
        self.consecutive = self.consecutive.saturating_add(1);
        let limit = usize::try_from(policy.crash_limit).unwrap_or(usize::MAX);
        RestartDecision { delay, recent_crashes: self.recent.len(), crash_loop: self.recent.len() >= limit }
    }
}

/// How an engine run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineExit {
    Clean,
    Code(i32),
    Signal(i32),
    /// SIGKILL while the kernel recorded an OOM kill in the engine's own cgroup.
    OomKilled,
    /// Killed by the supervisor: it never became ready, or stopped answering probes.
    Unresponsive,
    /// An engine that was not the agent's child (adopted, or found dead at
    /// start) ended; its exit status went to its old parent.
    Vanished,
}

impl EngineExit {
    /// The `reason` label of `machine_agent_engine_restarts_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Clean => "clean_exit",
            Self::Code(_) => "exit_code",
            Self::Signal(_) => "signal",
            Self::OomKilled => "oom_killed",
            Self::Unresponsive => "unresponsive",
            Self::Vanished => "vanished",
        }
    }
}

impl std::fmt::Display for EngineExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Clean => f.write_str("exited with code 0"),
            Self::Code(code) => write!(f, "exited with code {code}"),
            Self::Signal(sig) => write!(f, "killed by {}", crate::describe::describe_signal(*sig)),
            Self::OomKilled => f.write_str("OOM-killed by the kernel"),
            Self::Unresponsive => f.write_str("killed by the agent: not answering"),
            Self::Vanished => f.write_str("ended while not the agent's child (exit status unknown)"),
        }
    }
}

/// An exit status plus the OOM kills seen in the engine's daemon cgroup during the run.
pub fn classify_exit(status: ExitStatus, oom_kills_during_run: u64) -> EngineExit {
    match (status.code(), status.signal()) {
        (Some(0), _) => EngineExit::Clean,
        (Some(code), _) => EngineExit::Code(code),
        (None, Some(9)) if oom_kills_during_run > 0 => EngineExit::OomKilled,
        (None, Some(sig)) => EngineExit::Signal(sig),
        (None, None) => EngineExit::Code(-1),
    }
}

/// What the supervisor tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// An engine runs: spawned now, or (`adopted`) found running for this task.
    Spawned { pid: u32, adopted: bool },
    /// The engine answers health checks and has a worker.
    Ready { pid: u32, version: String, workers: usize, devices: Vec<String> },
    /// Probes failed this many times in a row; the engine is being killed.
    Hung { pid: u32, failures: u32 },
    /// The engine is gone; the supervisor restarts it after `decision.delay`.
    Exited { pid: u32, exit: EngineExit, ran_for: Duration, decision: RestartDecision },
    /// It could not even be spawned; retried after `decision.delay`.
    SpawnFailed { error: String, decision: RestartDecision },
}

/// Everything the supervisor needs to run one engine.
#[derive(Debug, Clone)]
pub struct EngineSpec {
    pub binary: PathBuf,
    pub args: Vec<String>,
    /// The task's variables.
    pub env: BTreeMap<String, String>,
    /// The agent's own variables for this engine (its trace exporter), set last.
    pub agent_env: Vec<(String, String)>,
    /// BuildKit's root, on the cache volume; holds the agent's lock file.
    pub root: PathBuf,
    /// The unix socket the agent's client dials.
    pub socket: PathBuf,
    /// `<pid> <start time> <digest>` of the running engine, so a restarted
    /// agent finds it and knows what it was started with.
    pub pidfile: PathBuf,
    /// SHA-256 (hex) of everything the engine is started with: a restarted
    /// agent adopts a running engine only when its task gives the same one.
    pub digest: String,
    /// Where the engine's stdout and stderr go (see [`super::log_file`]).
    pub log_file: PathBuf,
    pub cgroup: Option<EngineCgroup>,
    pub ready_timeout: Duration,
    pub probe: ProbeSettings,
    pub restart: RestartPolicy,
}

/// Why supervision could not begin.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum SuperviseError {
    /// another machine-agent already runs an engine on {root} (lock {lock} is held)
    RootLocked { root: PathBuf, lock: PathBuf },
    /// cannot open the engine lock {path}: {source}
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// cannot create the engine socket directory {path}: {source}
    SocketDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The lock file in the engine's root; held by the supervisor for its whole life.
pub const LOCK_FILE: &str = "machine-agent.lock";

/// A supervised engine. Dropping it leaves the engine running: only
/// [`Supervisor::stop`] ends it, because an agent restart must not cost builds.
#[derive(Debug)]
pub struct Supervisor {
    stop_tx: mpsc::Sender<(Duration, oneshot::Sender<StopOutcome>)>,
}

impl Supervisor {
    /// Takes the root's lock and starts supervising: first any orphan engine a
    /// previous agent left is stopped, then the engine is spawned. Events arrive on `events`.
    pub fn start(spec: EngineSpec, events: mpsc::Sender<EngineEvent>, orphan_grace: Duration) -> Result<Self, SuperviseError> {
        let lock = lock_root(&spec.root)?;
        if let Some(parent) = spec.socket.parent() {
            crate::fsutil::create_private_dir(parent).map_err(|source| SuperviseError::SocketDir { path: parent.into(), source })?;
        }
        let (stop_tx, stop_rx) = mpsc::channel(1);
        let (tail_stop, tail_stopped) = oneshot::channel();
        tokio::spawn(super::log_file::tail(spec.log_file.clone(), tail_stopped));
        tokio::spawn(async move {
            let adopted = match adopt_or_stop_orphan(&spec, orphan_grace).await {
                Found::Adopt(engine) => Some(engine),
                Found::DiedUnwatched { pid, exit } => {
                    // Said as an exit, so the restart count and the last exit tell the operator.
                    let decision = RestartDecision { delay: Duration::ZERO, recent_crashes: 1, crash_loop: false };
                    let _ = events.send(EngineEvent::Exited { pid, exit, ran_for: Duration::ZERO, decision }).await;
                    None
                }
                Found::Nothing => None,
            };
            run(spec, events, stop_rx, adopted).await;
            drop(lock); // released only once the engine is gone
            let _ = tail_stop.send(());
        });
        Ok(Self { stop_tx })
    }

    /// SIGTERM to the engine's group, SIGKILL after `grace`, reaped; no restart after.
    pub async fn stop(self, grace: Duration) -> StopOutcome {
        let (done_tx, done_rx) = oneshot::channel();
        if self.stop_tx.send((grace, done_tx)).await.is_err() {
            return StopOutcome::Clean;
        }
        done_rx.await.unwrap_or(StopOutcome::Clean)
    }
}

type StopRequest = (Duration, oneshot::Sender<StopOutcome>);

/// The supervision loop: spawn, wait for ready, probe, restart; until a stop request.
async fn run(spec: EngineSpec, events: mpsc::Sender<EngineEvent>, mut stop_rx: mpsc::Receiver<StopRequest>, mut adopted: Option<Adopted>) {
    let mut history = CrashHistory::default();
    loop {
        let started = Instant::now();
        let oom_before = daemon_oom_kills(&spec);
        let spawned = match adopted.take() {
            Some(engine) => Ok(Engine::Adopted(engine)),
            None => spawn(&spec).map(Engine::Child),
        };
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) => {
                let decision = history.record(&spec.restart, Instant::now(), Duration::ZERO);
                tracing::error!(%error, restart_in_ms = decision.delay.as_millis(), "engine could not be spawned");
                let error = format!("{}: {error}", spec.binary.display());
                let _ = events.send(EngineEvent::SpawnFailed { error, decision }).await;
                if wait_or_stop(decision.delay, &mut stop_rx).await {
                    return;
                }
                continue;
            }
        };
        let pid = child.id();
        let adopted = matches!(child, Engine::Adopted(_));
        if !adopted {
            write_pidfile(&spec.pidfile, pid, &spec.digest, oom_before);
            tracing::info!(pid, binary = %spec.binary.display(), "engine spawned");
        }
        let _ = events.send(EngineEvent::Spawned { pid, adopted }).await;

        let end = watch_run(&spec, &mut child, pid, &events, &mut stop_rx).await;
        let status = match end {
            RunEnd::Exited(status) => status,
            RunEnd::Stop(grace, done) => {
                let outcome = terminate(&mut child, pid, grace).await;
                remove_pidfile(&spec.pidfile);
                let _ = done.send(outcome);
                return;
            }
            RunEnd::Unresponsive => {
                kill_group(pid, Signal::SIGKILL);
                let _ = child.wait().await;
                None
            }
        };
        remove_pidfile(&spec.pidfile);
        // Children of a dead engine (runc, build steps) must not outlive it:
        // its process group, and the steps runc put in cgroups of their own.
        kill_group(pid, Signal::SIGKILL);
        if let Some(cgroup) = &spec.cgroup {
            match cgroup.kill_leftovers(Duration::from_secs(10)).await {
                Ok(killed) if killed.is_empty() => {}
                Ok(killed) => tracing::warn!(pid, killed = ?killed, "build steps of the dead engine were killed"),
                Err(left) => tracing::error!(pid, left = ?left, "processes still in the engine cgroup after SIGKILL"),
            }
        }
        let oom_kills = daemon_oom_kills(&spec).saturating_sub(oom_before);
        let exit = match (status, adopted) {
            (Some(status), _) => classify_exit(status, oom_kills),
            (None, true) if oom_kills > 0 => EngineExit::OomKilled,
            (None, true) => EngineExit::Vanished,
            (None, false) => EngineExit::Unresponsive,
        };
        let ran_for = started.elapsed();
        let decision = history.record(&spec.restart, Instant::now(), ran_for);
        tracing::warn!(
            pid, exit = %exit, ran_for_ms = ran_for.as_millis(), restart_in_ms = decision.delay.as_millis(),
            recent_crashes = decision.recent_crashes, crash_loop = decision.crash_loop, "engine exited"
        );
        let _ = events.send(EngineEvent::Exited { pid, exit, ran_for, decision }).await;
        if wait_or_stop(decision.delay, &mut stop_rx).await {
            return;
        }
    }
}

/// The engine being watched: spawned by this supervisor, or adopted from an
/// agent before it (not our child: watched through a pidfd, its status unknown).
enum Engine {
    Child(Child),
    Adopted(Adopted),
}

impl Engine {
    fn id(&self) -> u32 {
        match self {
            Self::Child(child) => child.id().unwrap_or_default(),
            Self::Adopted(adopted) => u32::try_from(adopted.id.pid).unwrap_or_default(),
        }
    }

    /// Waits for the engine to end: the exit status of a child, None for an adopted engine.
    async fn wait(&mut self) -> Option<ExitStatus> {
        match self {
            Self::Child(child) => child.wait().await.ok(),
            Self::Adopted(adopted) => {
                // A pidfd turns readable when the process ends.
                let _ = adopted.pidfd.readable().await;
                None
            }
        }
    }
}

/// A running engine a previous agent started with what this task starts.
#[derive(Debug)]
struct Adopted {
    id: ProcessId,
    pidfd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

enum RunEnd {
    /// The engine ended (with its status, when it was our child).
    Exited(Option<ExitStatus>),
    Stop(Duration, oneshot::Sender<StopOutcome>),
    Unresponsive,
}

/// One run of the engine: wait until it is ready, then probe it, until it
/// exits, hangs, or a stop is requested.
async fn watch_run(spec: &EngineSpec, child: &mut Engine, pid: u32, events: &mpsc::Sender<EngineEvent>, stop_rx: &mut mpsc::Receiver<StopRequest>) -> RunEnd {
    let ready = tokio::select! {
        status = child.wait() => return RunEnd::Exited(status),
        Some((grace, done)) = stop_rx.recv() => return RunEnd::Stop(grace, done),
        ready = client::wait_ready(&spec.socket, spec.ready_timeout) => ready,
    };
    let mut client = match ready {
        Ok(ready) => {
            tracing::info!(pid, version = %ready.version, workers = ready.workers, devices = ?ready.devices, "engine ready");
            let _ = events.send(EngineEvent::Ready { pid, version: ready.version.clone(), workers: ready.workers, devices: ready.devices.clone() }).await;
            Some(ready.client)
        }
        Err(error) => {
            tracing::error!(pid, %error, timeout_secs = spec.ready_timeout.as_secs(), "engine did not become ready");
            return RunEnd::Unresponsive;
        }
    };
    let mut ticker = tokio::time::interval(spec.probe.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate; the engine just answered
    let mut failures = 0u32;
    loop {
        tokio::select! {
            status = child.wait() => return RunEnd::Exited(status),
            Some((grace, done)) = stop_rx.recv() => return RunEnd::Stop(grace, done),
            _ = ticker.tick() => {
                match probe(&spec.socket, &mut client, spec.probe.timeout).await {
                    Ok(()) => failures = 0,
                    Err(error) => {
                        failures += 1;
                        tracing::warn!(pid, failures, %error, "engine liveness probe failed");
                        if failures >= spec.probe.failures {
                            tracing::error!(pid, failures, "engine hung: killing it");
                            let _ = events.send(EngineEvent::Hung { pid, failures }).await;
                            return RunEnd::Unresponsive;
                        }
                    }
                }
            }
        }
    }
}

/// One health check, reconnecting if the last one broke the connection.
async fn probe(socket: &Path, client: &mut Option<EngineClient>, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        if client.is_none() {
            *client = Some(EngineClient::connect(socket).await.map_err(|e| e.to_string())?);
        }
        let Some(c) = client.as_ref() else { return Err("no client".to_string()) };
        match c.health().await {
            Ok(true) => Ok(()),
            Ok(false) => Err("health: NOT_SERVING".to_string()),
            Err(e) => {
                *client = None;
                Err(e.to_string())
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => {
            *client = None;
            Err(format!("no answer within {timeout:?}"))
        }
    }
}

/// Sleeps `delay` unless a stop arrives first (answered at once: nothing runs). True = stop.
async fn wait_or_stop(delay: Duration, stop_rx: &mut mpsc::Receiver<StopRequest>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        request = stop_rx.recv() => {
            if let Some((_, done)) = request {
                let _ = done.send(StopOutcome::Clean);
            }
            true
        }
    }
}

/// The engine's environment before any task variable: what buildkitd needs
/// to run as the root daemon it is, fixed here rather than inherited from the
/// agent (whose environment holds its own config overrides and systemd's variables).
pub const ENGINE_BASE_ENV: &[(&str, &str)] = &[
    // buildkitd finds runc, the CNI plugins, iptables and the mount helpers on PATH;
    // a fixed one, so neither the agent's environment nor a task picks which binary runs.
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    // Go's os.UserHomeDir (registry auth lookups, BuildKit's default paths) fails without it;
    // the engine runs as root.
    ("HOME", "/root"),
];

/// Variables systemd gives the agent alone. Removed last, whatever came before:
/// buildkitd would otherwise send its own READY=1 and STOPPING=1 as if it were
/// the agent, or take the agent's activated sockets.
pub const AGENT_ONLY_ENV: &[&str] = &["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

/// True for a variable the agent sets or removes for the engine itself; no task may set it,
/// and no config may allow a task to. `LD_*` change which code the engine loads;
/// `OTEL_*` where it sends its traces (the agent sets them from the task's
/// allow-listed `trace_endpoint`).
pub fn is_agent_owned_engine_variable(name: &str) -> bool {
    ENGINE_BASE_ENV.iter().any(|(base, _)| *base == name)
        || AGENT_ONLY_ENV.contains(&name)
        || name.starts_with("LD_")
        || name.starts_with(crate::task::OTEL_ENV_PREFIX)
}

/// The engine's whole environment: the fixed base, then the task's variables
/// (already checked against the allow-list by task validation) with the
/// agent's own variables dropped as a second line of defence, then the
/// agent's variables for this engine (`agent_env`).
pub fn engine_environment(task_env: &BTreeMap<String, String>, agent_env: &[(String, String)]) -> Vec<(String, String)> {
    let base = ENGINE_BASE_ENV.iter().map(|(name, value)| ((*name).to_string(), (*value).to_string()));
    let task = task_env.iter().map(|(name, value)| (name.clone(), value.clone()));
    base.chain(task.filter(|(name, _)| !is_agent_owned_engine_variable(name))).chain(agent_env.iter().cloned()).collect()
}

fn spawn(spec: &EngineSpec) -> io::Result<Child> {
    let log = super::log_file::open_for_engine(&spec.log_file)?;
    let mut cmd = Command::new(&spec.binary);
    cmd.args(&spec.args)
        // Nothing of the agent's environment reaches the engine.
        .env_clear()
        .envs(engine_environment(&spec.env, &spec.agent_env))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        // Its own process group: a stop reaches the engine and all it forked,
        // and a Ctrl-C in the agent's terminal does not hit it directly.
        .process_group(0)
        .kill_on_drop(false);
    if let Some(cgroup) = &spec.cgroup {
        // A systemd scope stopped from outside (`systemctl stop
        // machine-agent-engine.scope` ends the engine and its holder) takes
        // its cgroup with it: started again here, or no restart could place
        // the engine. Blocks on systemd-run, which bounds its own calls.
        if cgroup.scope.is_some() && !cgroup.daemon_dir().is_dir() {
            tracing::warn!(scope = ?cgroup.scope, "the engine's systemd scope is gone: starting it again");
            cgroup.recreate().map_err(io::Error::other)?;
        }
        let procs = std::fs::OpenOptions::new().write(true).open(cgroup.daemon_procs_file())?;
        let (others, failed) = cgroup.other_daemon_procs();
        if !failed.is_empty() {
            tracing::warn!(failed = %failed.join("; "), "the engine stays in the agent's cgroup in these hierarchies: a stop of the agent's unit may stop it too");
        }
        let also = others.iter().filter_map(|p| std::fs::OpenOptions::new().write(true).open(p).ok()).collect();
        crate::sys::join_cgroup_before_exec(&mut cmd, procs, also);
    }
    cmd.spawn()
}

async fn terminate(child: &mut Engine, pid: u32, grace: Duration) -> StopOutcome {
    tracing::info!(pid, grace_secs = grace.as_secs_f64(), "stopping engine: SIGTERM to its process group");
    kill_group(pid, Signal::SIGTERM);
    // A stopped (SIGSTOPped, hung) engine only acts on SIGTERM once continued.
    kill_group(pid, Signal::SIGCONT);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => {
            let exit = status.map(|s| classify_exit(s, 0).to_string()).unwrap_or_else(|| EngineExit::Vanished.to_string());
            tracing::info!(pid, exit = %exit, "engine stopped");
            kill_group(pid, Signal::SIGKILL); // children that ignored SIGTERM
            StopOutcome::Clean
        }
        Err(_) => {
            tracing::warn!(pid, "engine did not stop within its grace period: SIGKILL to its process group");
            kill_group(pid, Signal::SIGKILL);
            let _ = child.wait().await;
            StopOutcome::Killed
        }
    }
}

fn kill_group(pid: u32, signal: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        if raw > 0 {
            let _ = killpg(Pid::from_raw(raw), signal);
        }
    }
}

fn daemon_oom_kills(spec: &EngineSpec) -> u64 {
    spec.cgroup.as_ref().and_then(|c| c.daemon_oom_kills().ok()).unwrap_or(0)
}

// === one engine per root, and no orphans ===

fn lock_root(root: &Path) -> Result<std::fs::File, SuperviseError> {
    use fs2::FileExt;
    let path = root.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| SuperviseError::Lock { path: path.clone(), source })?;
    file.try_lock_exclusive().map_err(|_| SuperviseError::RootLocked { root: root.into(), lock: path })?;
    Ok(file)
}

/// A process's identity across pid reuse: its pid and its start time in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: i32,
    pub start_time: u64,
}

/// `<pid> <start time>` as written to the pidfile.
pub fn parse_pidfile(text: &str) -> Option<ProcessId> {
    let mut parts = text.split_whitespace();
    let pid = parts.next()?.parse().ok().filter(|p: &i32| *p > 0)?;
    let start_time = parts.next()?.parse().ok()?;
    Some(ProcessId { pid, start_time })
}

/// The digest after the pid and start time; None from agents that wrote none.
pub fn pidfile_digest(text: &str) -> Option<&str> {
    text.split_whitespace().nth(2)
}

/// The daemon cgroup's OOM kills when the engine was spawned (0 if not recorded).
pub fn pidfile_oom_kills(text: &str) -> u64 {
    text.split_whitespace().nth(3).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// From /proc/<pid>/stat: (state, start time). The command name may hold
/// spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_proc_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 of stat is the start time; `rest` begins at field 3.
    let start_time = fields.get(19)?.parse().ok()?;
    Some((state, start_time))
}

fn read_stat(pid: i32) -> Option<(char, u64)> {
    parse_proc_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn write_pidfile(path: &Path, pid: u32, digest: &str, oom_kills: u64) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let Some((_, start_time)) = read_stat(raw) else { return };
    if let Err(error) = crate::fsutil::write_atomic(path, format!("{pid} {start_time} {digest} {oom_kills}\n").as_bytes(), 0o600) {
        tracing::warn!(path = %path.display(), %error, "cannot write the engine pidfile");
    }
}

fn remove_pidfile(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// True while `id` names a live (not zombie) process.
fn is_alive(id: ProcessId) -> bool {
    matches!(read_stat(id.pid), Some((state, start)) if start == id.start_time && state != 'Z' && state != 'X')
}

/// Adopts the engine a previous agent left running when it was started with
/// exactly what this task starts (the digests match) and it can be watched;
/// otherwise stops it (SIGTERM, grace, SIGKILL) and kills whatever else still
/// sits in the engine's cgroup (orphaned build steps).
async fn adopt_or_stop_orphan(spec: &EngineSpec, grace: Duration) -> Found {
    let text = std::fs::read_to_string(&spec.pidfile).unwrap_or_default();
    let recorded = parse_pidfile(&text);
    if let Some(id) = recorded.filter(|id| !is_alive(*id)) {
        // Killed or crashed while no agent ran: what is known is the OOM counter.
        let oom_kills = daemon_oom_kills(spec).saturating_sub(pidfile_oom_kills(&text));
        let exit = if oom_kills > 0 { EngineExit::OomKilled } else { EngineExit::Vanished };
        tracing::warn!(pid = id.pid, exit = %exit, "the engine a previous agent started ended while no agent ran; starting a new one");
        remove_pidfile(&spec.pidfile);
        stop_orphans(spec, None, grace).await;
        return Found::DiedUnwatched { pid: u32::try_from(id.pid).unwrap_or_default(), exit };
    }
    let orphan = recorded;
    if let Some(id) = orphan {
        match pidfile_digest(&text) {
            Some(digest) if digest == spec.digest => match watch_pid(id) {
                Ok(pidfd) => {
                    tracing::info!(pid = id.pid, digest, "engine_adopted: the engine a previous agent started for this task keeps running");
                    return Found::Adopt(Adopted { id, pidfd });
                }
                Err(error) => tracing::warn!(pid = id.pid, %error, "engine not adopted: it cannot be watched; stopping it"),
            },
            Some(_) => tracing::warn!(pid = id.pid, "engine not adopted: it was started with another configuration than this task's; stopping it"),
            None => tracing::warn!(pid = id.pid, "engine not adopted: its pidfile records no configuration; stopping it"),
        }
    }
    stop_orphans(spec, orphan, grace).await;
    Found::Nothing
}

/// What a starting supervisor found of the engine a previous agent started.
enum Found {
    /// Running, started for this task: supervised from here on.
    Adopt(Adopted),
    /// It ended while no agent ran: a new one is started, and the exit said.
    DiedUnwatched { pid: u32, exit: EngineExit },
    /// None, or one started for another task (stopped by now).
    Nothing,
}

/// A pidfd for `id`, checked to still be that process (not a reused pid) once open.
fn watch_pid(id: ProcessId) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    let fd = crate::sys::pidfd_open(id.pid)?;
    if !is_alive(id) {
        return Err(io::Error::other("the process ended (or its pid was reused) while it was being adopted"));
    }
    crate::sys::async_fd(fd)
}

/// Stops an engine a previous agent left running (SIGTERM, grace, SIGKILL), then
/// kills whatever else still sits in the engine's cgroup (orphaned build steps).
async fn stop_orphans(spec: &EngineSpec, orphan: Option<ProcessId>, grace: Duration) {
    if let Some(id) = orphan {
        tracing::warn!(pid = id.pid, "an engine from a previous agent is still running: stopping it before starting a new one");
        let group = Pid::from_raw(id.pid);
        let _ = killpg(group, Signal::SIGTERM);
        let _ = killpg(group, Signal::SIGCONT);
        if !wait_gone(|| is_alive(id), grace).await {
            tracing::warn!(pid = id.pid, "orphan engine ignored SIGTERM: SIGKILL");
            let _ = killpg(group, Signal::SIGKILL);
            let _ = kill(group, Signal::SIGKILL);
            wait_gone(|| is_alive(id), Duration::from_secs(5)).await;
        }
    }
    remove_pidfile(&spec.pidfile);
    if let Some(cgroup) = &spec.cgroup {
        match cgroup.kill_leftovers(Duration::from_secs(5)).await {
            Ok(killed) if killed.is_empty() => {}
            Ok(killed) => tracing::warn!(pids = ?killed, "processes left in the engine cgroup were killed"),
            Err(left) => tracing::error!(pids = ?left, "processes still in the engine cgroup after SIGKILL"),
        }
    }
}

/// Polls `alive` every 20 ms until false or `limit` passes; true if it went false.
async fn wait_gone(alive: impl Fn() -> bool, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while alive() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_environment_is_the_base_then_the_task_without_the_agents_own_variables() {
        let task: BTreeMap<String, String> =
            [("HTTPS_PROXY", "http://proxy:3128"), ("PATH", "/tmp/evil"), ("NOTIFY_SOCKET", "/run/x"), ("LD_PRELOAD", "/x.so")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let env = engine_environment(&task, &[]);
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["PATH", "HOME", "HTTPS_PROXY"]);
        let mut task = task;
        task.insert("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".into(), "http://evil.example:4317".into());
        let agent = [("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".to_string(), "http://otel.internal:4317".to_string())];
        let env = engine_environment(&task, &agent);
        let otel: Vec<&str> = env.iter().filter(|(k, _)| k.starts_with("OTEL_")).map(|(_, v)| v.as_str()).collect();
        assert_eq!(otel, ["http://otel.internal:4317"], "only the agent's trace endpoint reaches the engine");
        assert_eq!(env[0].1, ENGINE_BASE_ENV[0].1, "a task never replaces the base PATH");
        for name in ["PATH", "HOME", "NOTIFY_SOCKET", "LISTEN_FDS", "WATCHDOG_USEC", "LD_LIBRARY_PATH", "OTEL_EXPORTER_OTLP_ENDPOINT"] {
            assert!(is_agent_owned_engine_variable(name), "{name}");
        }
        assert!(!is_agent_owned_engine_variable("HTTP_PROXY"));
    }

    fn policy() -> RestartPolicy {
        RestartPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            stable_after: Duration::from_secs(60),
            crash_window: Duration::from_secs(30),
            crash_limit: 3,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_its_cap_and_crash_loop_is_called_at_the_limit() {
        let p = policy();
        let mut h = CrashHistory::default();
        let t0 = Instant::now();
        let delays: Vec<_> = (0..7).map(|i| h.record(&p, t0 + Duration::from_millis(i), Duration::ZERO)).collect();
        let ms: Vec<u128> = delays.iter().map(|d| d.delay.as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(delays.iter().map(|d| d.crash_loop).collect::<Vec<_>>(), [false, false, true, true, true, true, true]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stable_run_resets_the_backoff_and_old_crashes_leave_the_window() {
        let p = policy();
        let mut h = CrashHistory::default();
        let t0 = Instant::now();
        h.record(&p, t0, Duration::ZERO);
        h.record(&p, t0, Duration::ZERO);
        let after_stable = h.record(&p, t0 + Duration::from_secs(100), Duration::from_secs(100));
        assert_eq!(after_stable.delay, p.initial);
        assert_eq!(after_stable.recent_crashes, 1, "the two crashes 100 s ago are outside the 30 s window");
        assert!(!after_stable.crash_loop);
    }

    #[test]
    fn exits_are_classified() {
        let code = |c: i32| ExitStatus::from_raw(c << 8);
        let signal = ExitStatus::from_raw;
        assert_eq!(classify_exit(code(0), 0), EngineExit::Clean);
        assert_eq!(classify_exit(code(3), 0), EngineExit::Code(3));
        assert_eq!(classify_exit(signal(9), 0), EngineExit::Signal(9));
        assert_eq!(classify_exit(signal(9), 1), EngineExit::OomKilled);
        assert_eq!(classify_exit(signal(15), 1), EngineExit::Signal(15), "only SIGKILL is the OOM killer's signal");
        assert_eq!(EngineExit::Signal(9).to_string(), "killed by signal 9 (SIGKILL)");
    }

    #[test]
    fn pidfiles_and_proc_stat_parse() {
        assert_eq!(parse_pidfile("1234 98765\n"), Some(ProcessId { pid: 1234, start_time: 98765 }));
        assert_eq!(parse_pidfile("0 1"), None);
        assert_eq!(parse_pidfile("garbage"), None);
        let written = "1234 98765 9f86d081884c7d65 3\n";
        assert_eq!(parse_pidfile(written), Some(ProcessId { pid: 1234, start_time: 98765 }));
        assert_eq!((pidfile_digest(written), pidfile_oom_kills(written)), (Some("9f86d081884c7d65"), 3));
        assert_eq!((pidfile_digest("1234 98765\n"), pidfile_oom_kills("1234 98765\n")), (None, 0), "an older agent's pidfile");
        let stat = "4242 (build kit) d) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 12 0 777123 1000 200";
        assert_eq!(parse_proc_stat(stat), Some(('S', 777_123)));
        assert_eq!(parse_proc_stat("1 (x"), None);
    }

    #[test]
    fn this_process_is_alive_by_its_own_start_time() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let (_, start_time) = read_stat(pid).unwrap();
        assert!(is_alive(ProcessId { pid, start_time }));
        assert!(!is_alive(ProcessId { pid, start_time: start_time + 1 }), "a reused pid is not our engine");
    }
}
