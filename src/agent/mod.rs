//! The agent: one lifecycle and the one loop that drives it. Other modules
//! send [`Input`]s on a channel; only this module changes the state, publishes
//! it (to /readyz, the `machine_agent_state` metric and systemd's STATUS=),
//! and decides to drain and exit.
//!
//! Shutdown has one path: SIGTERM/SIGINT, `should_terminate` and a terminate
//! task all end the loop with a reason, and [`Agent::drain`] runs under the
//! configured deadline.

pub mod state;

use crate::config::Config;
use crate::control::health::HealthStream;
use crate::control::identity::IdentityProvider;
use crate::control::register::Registration;
use crate::control::usage::UsageReporter;
use crate::control::{ControlError, ControlPlane, Session};
use crate::engine::cgroup::EngineCgroup;
use crate::engine::supervise::{EngineEvent, Supervisor};
use crate::engine::{EngineState, StopOutcome};
use crate::observe::http::HttpError;
use crate::observe::liveness::Liveness;
use crate::observe::metrics::Metrics;
use crate::observe::oom_watch::{OomKill, OomWatch};
use crate::observe::sampler::{EngineTarget, Sample, Sampler};
use crate::proto::v1 as pb;
use crate::signal::ShutdownSignals;
use crate::systemd::Notifier;
use crate::task::{BuildkitTask, Task, TaskError, TaskLimits};
use crate::volume::manager::{prepare_mount, release_mount, PreparedMount};
use state::{next, Event, State};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn, Instrument};

/// The main loop wakes at least this often to beat its heartbeat and ping the
/// systemd watchdog; /healthz declares a loop stalled after MAX_SILENCE.
const MAIN_TICK: Duration = Duration::from_secs(1);
const MAX_SILENCE: Duration = Duration::from_secs(10);
/// Part of the drain deadline kept for the shutdown report, so a slow engine
/// stop cannot starve the one message that tells the control plane what happened.
const SHUTDOWN_REPORT_RESERVE: Duration = Duration::from_secs(2);
/// GC runs kept for the usage report (one a minute, a run a minute: plenty).
pub const RECENT_GC_RUNS: usize = 16;
/// OOM kills kept for /readyz and for health streams that were down when they
/// happened; a storm beyond this is still counted in the total and the metric.
pub const RECENT_OOM_KILLS: usize = 32;
/// How often the OOM watcher checks the kernel's counters against the lines it read.
const OOM_RECONCILE_INTERVAL: Duration = Duration::from_secs(5);

/// Where tasks come from.
#[derive(Debug)]
pub enum Mode {
    /// Register with the configured control plane and take tasks from it.
    ControlPlane,
    /// Serve this task, validated from a local file; no control plane.
    Standalone(Box<BuildkitTask>),
}

/// What the agent publishes about itself; every reader gets a consistent copy.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: State,
    /// Why the agent is in this state (empty when there is nothing to say).
    pub reason: String,
    pub engine: EngineState,
    /// The engine's pid while one runs.
    pub engine_pid: Option<u32>,
    /// Engine exits since the task started (each one was followed by a restart).
    pub engine_restarts: u64,
    /// How the engine last exited, for /readyz and the health stream.
    pub engine_last_exit: Option<String>,
    /// The last GC runs (at most RECENT_GC_RUNS), oldest first.
    pub recent_gc: std::collections::VecDeque<pb::GcRunReport>,
    /// GC runs since the agent started: the number of the newest in `recent_gc`.
    pub gc_runs: u64,
    /// The last OOM kills on this host (at most RECENT_OOM_KILLS), oldest first.
    pub recent_ooms: std::collections::VecDeque<OomKill>,
    /// Entries ever added to `recent_ooms`: the number of the newest.
    pub oom_entries: u64,
    /// Kills those entries stand for (an unattributed entry may be several).
    pub oom_kills_total: u64,
    /// The newest sample of the host and the engine's process tree.
    pub resources: Option<Sample>,
    pub task_id: Option<String>,
    /// Filesystems whose figures the health stream carries.
    pub watched_paths: Vec<PathBuf>,
    /// The cache volume's mount point, once a task names it.
    pub cache_mount: Option<PathBuf>,
    pub since: Instant,
}

impl Status {
    /// Starting, nothing known yet; the state dir is the first filesystem watched.
    pub fn initial(state_dir: &std::path::Path) -> Self {
        Self {
            state: State::Starting,
            reason: String::new(),
            engine: EngineState::NotStarted,
            engine_pid: None,
            engine_restarts: 0,
            engine_last_exit: None,
            recent_gc: std::collections::VecDeque::new(),
            gc_runs: 0,
            recent_ooms: std::collections::VecDeque::new(),
            oom_entries: 0,
            oom_kills_total: 0,
            resources: None,
            task_id: None,
            watched_paths: vec![state_dir.to_path_buf()],
            cache_mount: None,
            since: Instant::now(),
        }
    }

    /// The kills recorded after the first `sent` entries, oldest first; those
    /// pushed out of `recent_ooms` meanwhile are gone (and counted in the total).
    pub fn oom_kills_after(&self, sent: u64) -> impl Iterator<Item = &OomKill> {
        let unsent = usize::try_from(self.oom_entries.saturating_sub(sent)).unwrap_or(usize::MAX);
        self.recent_ooms.iter().skip(self.recent_ooms.len().saturating_sub(unsent))
    }
}

/// Everything that can happen to the agent, from any of its loops.
#[derive(Debug)]
pub enum Input {
    /// A validated task from the control plane.
    Task(Task),
    /// A task that failed validation: logged, counted, not acted on.
    TaskRejected(TaskError),
    /// The control plane answered the health stream with should_terminate.
    ShouldTerminate,
    /// The engine supervisor's news: spawned, ready, hung, exited.
    Engine(EngineEvent),
    /// A GC run finished (or was deferred).
    GcRun(pb::GcRunReport),
    /// The kernel's OOM killer killed a process (or a counter says it did).
    Oom(OomKill),
    /// A sample of the host and the engine's process tree.
    Sampled(Sample),
    /// The volume manager finished preparing the task's mounts: those it
    /// prepared (to release at drain), and the error that stopped it, if any.
    VolumesPrepared { prepared: Vec<PreparedMount>, error: Option<String> },
}

/// Why the agent could not run or finish cleanly.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum AgentError {
    /// {0}
    Http(#[from] HttpError),
    /// {0}
    Control(#[from] ControlError),
    /// `run` needs a [control_plane] section in the config, or --standalone TASK.toml
    NoControlPlane,
    /// cannot install signal handlers: {0}
    Signals(#[source] std::io::Error),
    /// cannot create the state directory {path}: {source}
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// the drain did not finish cleanly: {0}
    DrainIncomplete(String),
}

/// Runs the agent until it has drained. Ok means a clean drain (exit 0).
pub async fn run(config: Config, mode: Mode, notifier: Notifier) -> Result<(), AgentError> {
    // Signals first: a SIGTERM from here on starts a drain instead of killing us.
    let mut signals = ShutdownSignals::install().map_err(AgentError::Signals)?;
    create_state_dir(&config.state_dir)?;

    let metrics = Metrics::new();
    let liveness = Liveness::default();
    let (status_tx, status_rx) = watch::channel(Status::initial(&config.state_dir));

    let (addr, serve) = crate::observe::http::bind(config.listen, status_rx.clone(), metrics.clone(), liveness.clone()).await?;
    tokio::spawn(serve.instrument(tracing::info_span!("endpoints", listen = %addr)));
    info!(listen = %addr, version = env!("CARGO_PKG_VERSION"), "endpoints serving");
    let notifier = Arc::new(notifier);
    notifier.ready();

    let (inputs_tx, inputs_rx) = mpsc::channel(64);
    let (session_tx, session_rx) = watch::channel(None);
    let control = match (&mode, &config.control_plane) {
        (Mode::Standalone(_), _) => None,
        (Mode::ControlPlane, None) => return Err(AgentError::NoControlPlane),
        (Mode::ControlPlane, Some(cp)) => Some(ControlPlane::new(cp.clone(), metrics.clone())?),
    };

    let mut agent = Agent {
        config,
        metrics,
        notifier,
        status: status_tx,
        engine: None,
        engine_cgroup: None,
        engine_cgroup_watch: watch::Sender::new(None),
        gc: None,
        task: None,
        mounts: vec![],
        preparing: false,
        gc_before_ready: false,
        control,
        session: session_rx,
        inputs: inputs_tx,
    };
    // Bind the state first: publishing while a borrow of the watch is alive would deadlock.
    let initial = agent.state();
    agent.publish_state(initial, String::new());

    agent.start_oom_watch(&status_rx, &liveness);
    agent.start_sampler(&status_rx, &liveness);
    match mode {
        Mode::Standalone(task) => {
            info!(task_id = %task.id, "standalone mode: serving the task file, no control plane");
            agent.accept_task(*task);
        }
        Mode::ControlPlane => agent.start_control_loops(session_tx, &status_rx, &liveness),
    }

    let heartbeat = liveness.register("main", MAX_SILENCE);
    let tick = agent.notifier.watchdog_interval().map_or(MAIN_TICK, |w| w.min(MAIN_TICK));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ping = |notifier: &Notifier| {
        // The watchdog is fed only while every loop is alive: a stalled health
        // loop makes systemd restart us, as a stalled main loop would.
        if notifier.watchdog_interval().is_some() && liveness.stalled().is_empty() {
            notifier.watchdog();
        }
    };

    let mut inputs_rx = inputs_rx;
    let reason = loop {
        tokio::select! {
            Some(input) = inputs_rx.recv() => {
                if let Some(reason) = agent.handle(input) {
                    break reason;
                }
            }
            signal = signals.recv() => {
                info!(signal, "shutdown signal received");
                break signal.to_ascii_lowercase();
            }
            _ = ticker.tick() => {
                heartbeat.beat();
                ping(&agent.notifier);
            }
        }
    };

    // Keep feeding the watchdog through the drain: a long engine stop is not a hang.
    let notifier = agent.notifier.clone();
    let drain = agent.drain(reason, &mut inputs_rx);
    tokio::pin!(drain);
    loop {
        tokio::select! {
            result = &mut drain => return result,
            _ = ticker.tick() => {
                heartbeat.beat();
                ping(&notifier);
            }
        }
    }
}

fn create_state_dir(path: &std::path::Path) -> Result<(), AgentError> {
    crate::fsutil::create_private_dir(path).map_err(|source| AgentError::StateDir { path: path.into(), source })
}

#[derive(Debug)]
struct Agent {
    config: Config,
    metrics: Metrics,
    notifier: Arc<Notifier>,
    status: watch::Sender<Status>,
    engine: Option<Supervisor>,
    /// Removed at drain, once the engine is gone.
    engine_cgroup: Option<EngineCgroup>,
    /// The same, for the OOM watcher (its daemon counter).
    engine_cgroup_watch: watch::Sender<Option<EngineCgroup>>,
    /// The GC loop, started when the engine is first ready; aborted at drain.
    gc: Option<tokio::task::JoinHandle<()>>,
    task: Option<BuildkitTask>,
    /// Mounts the volume manager prepared; released at drain.
    mounts: Vec<PreparedMount>,
    /// A prepare is running; the drain waits for it before releasing.
    preparing: bool,
    /// The cache volume was over a GC watermark when the engine first became
    /// ready: Ready waits for that first GC run, so no build starts on a full disk.
    gc_before_ready: bool,
    control: Option<ControlPlane>,
    session: watch::Receiver<Option<Session>>,
    inputs: mpsc::Sender<Input>,
}

impl Agent {
    fn state(&self) -> State {
        self.status.borrow().state
    }

    /// Applies a lifecycle event; an illegal one is logged and changes nothing.
    fn transition(&mut self, event: Event, reason: impl Into<String>) {
        let from = self.state();
        let reason = reason.into();
        match next(from, event) {
            Ok(to) => {
                if to != from || self.status.borrow().reason != reason {
                    // Published first: whoever reads the log line finds /readyz already saying so.
                    self.publish_state(to, reason.clone());
                    info!(from = %from, to = %to, reason = %reason, "state changed");
                }
            }
            Err(illegal) => warn!(%illegal, "ignored"),
        }
    }

    /// The one place state is published: the watch (/readyz, health), the metric, STATUS=.
    fn publish_state(&self, state: State, reason: String) {
        let status_line = if reason.is_empty() { state.to_string() } else { format!("{state}: {reason}") };
        self.status.send_modify(|s| {
            if s.state != state {
                s.since = Instant::now();
            }
            s.state = state;
            s.reason = reason;
        });
        self.metrics.set_state(state);
        self.notifier.status(&status_line);
    }

    fn set_engine_state(&self, engine: EngineState) {
        self.status.send_modify(|s| s.engine = engine);
    }

    fn start_control_loops(&mut self, session_tx: watch::Sender<Option<Session>>, status: &watch::Receiver<Status>, liveness: &Liveness) {
        let Some(control) = self.control.clone() else { return };
        self.transition(Event::RegistrationStarted, "");
        let registration = Registration {
            control: control.clone(),
            identity: IdentityProvider::new(self.config.identity.clone()),
            limits: self.task_limits(),
            session: session_tx,
            inputs: self.inputs.clone(),
        };
        tokio::spawn(registration.run().instrument(tracing::info_span!("register")));
        let health = HealthStream {
            control: control.clone(),
            session: self.session.clone(),
            status: status.clone(),
            inputs: self.inputs.clone(),
            interval: self.config.health_interval,
            heartbeat: liveness.register("health", MAX_SILENCE.max(self.config.health_interval * 3)),
            oom_delivered: 0,
        };
        tokio::spawn(health.run().instrument(tracing::info_span!("health")));
        let usage = UsageReporter {
            control,
            session: self.session.clone(),
            status: status.clone(),
            interval: self.config.usage_interval,
            engine_socket: self.config.engine.socket.clone(),
        };
        tokio::spawn(usage.run().instrument(tracing::info_span!("usage")));
    }

    /// The OOM watcher runs from start to exit: a kill on this host is news
    /// whether or not an engine runs.
    fn start_oom_watch(&self, status: &watch::Receiver<Status>, liveness: &Liveness) {
        let (kills_tx, kills_rx) = mpsc::channel(16);
        let name = self.config.engine.cgroup.as_deref().unwrap_or_default().trim_matches('/');
        let watch = OomWatch {
            kmsg_path: "/dev/kmsg".into(),
            vmstat_path: "/proc/vmstat".into(),
            engine_cgroup_path: if name.is_empty() { String::new() } else { format!("/{name}") },
            engine_cgroup: self.engine_cgroup_watch.subscribe(),
            status: status.clone(),
            reconcile_interval: OOM_RECONCILE_INTERVAL,
            kills: kills_tx,
            metrics: self.metrics.clone(),
            heartbeat: liveness.register("oom", MAX_SILENCE.max(OOM_RECONCILE_INTERVAL * 3)),
        };
        tokio::spawn(watch.run().instrument(tracing::info_span!("oom")));
        forward(kills_rx, self.inputs.clone(), Input::Oom);
    }

    /// Samples the host and the engine's tree every `sample_interval`, and
    /// refreshes the gauges that come from a sample: resources and volumes.
    fn start_sampler(&self, status: &watch::Receiver<Status>, liveness: &Liveness) {
        let interval = self.config.sample_interval;
        let heartbeat = liveness.register("sampler", MAX_SILENCE.max(interval * 3));
        let (status, engine_cgroup, metrics, inputs) = (status.clone(), self.engine_cgroup_watch.subscribe(), self.metrics.clone(), self.inputs.clone());
        let sample_loop = async move {
            let mut sampler = Sampler::new();
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                heartbeat.beat();
                let (engine_pid, watched) = {
                    let s = status.borrow();
                    (s.engine_pid, s.watched_paths.clone())
                };
                let target = engine_pid.map(|pid| EngineTarget { pid, cgroup_dirs: engine_cgroup.borrow().iter().map(|c| c.dir.clone()).collect() });
                // /proc reads of a few dozen files: short enough for the runtime's thread.
                let sample = sampler.sample(target.as_ref());
                metrics.record_sample(&sample);
                let mounts: Vec<pb::MountStats> = watched.iter().filter_map(|p| crate::control::mount_stats(p).ok()).collect();
                metrics.record_mounts(&mounts);
                if inputs.send(Input::Sampled(sample)).await.is_err() {
                    return;
                }
            }
        };
        tokio::spawn(sample_loop.instrument(tracing::info_span!("sampler")));
    }

    fn task_limits(&self) -> TaskLimits {
        TaskLimits { allowed_mount_prefixes: self.config.allowed_mount_prefixes.clone() }
    }

    /// Handles one input; Some(reason) ends the main loop and starts the drain.
    fn handle(&mut self, input: Input) -> Option<String> {
        match input {
            Input::Task(Task::Pending) => {
                match &self.task {
                    // The engine keeps serving: a control plane that lost track of
                    // us must not cost a build. It can send terminate if it means it.
                    Some(task) => warn!(task_id = %task.id, "control plane sent pending while a task runs; keeping the task"),
                    None => self.transition(Event::TaskPending, "waiting for a task"),
                }
                None
            }
            Input::Task(Task::Buildkit(task)) => {
                match &self.task {
                    Some(current) if current.id == task.id => debug!(task_id = %task.id, "task re-sent after reconnect; nothing to do"),
                    Some(current) => warn!(
                        running = %current.id, offered = %task.id,
                        "a different task arrived while one runs; keeping the running task"
                    ),
                    None => self.accept_task(*task),
                }
                None
            }
            Input::Task(Task::Terminate { reason }) => Some(format!("terminate task: {reason}")),
            Input::ShouldTerminate => Some("should_terminate".into()),
            Input::TaskRejected(error) => {
                error!(%error, "task rejected; the agent keeps its current state");
                None
            }
            Input::VolumesPrepared { prepared, error } => {
                self.preparing = false;
                self.mounts = prepared;
                match (error, self.task.clone()) {
                    (Some(error), _) => {
                        error!(%error, "volume preparation failed; the engine is not started");
                        self.transition(Event::Degraded, format!("volume: {error}"));
                    }
                    (None, Some(task)) => {
                        self.transition(Event::VolumePrepared, "starting the engine");
                        self.start_engine(&task);
                    }
                    (None, None) => {}
                }
                None
            }
            Input::Engine(event) => {
                self.on_engine_event(event);
                None
            }
            Input::Sampled(sample) => {
                self.status.send_modify(|s| s.resources = Some(sample));
                None
            }
            Input::Oom(kill) => {
                warn!(
                    attribution = kill.attribution, pid = ?kill.pid, process = ?kill.process_name, container_id = ?kill.container_id,
                    scope = ?kill.scope, task_memcg = ?kill.task_memcg, anon_rss_bytes = ?kill.anon_rss_bytes, count = kill.count,
                    "OOM kill: {}", kill.summary()
                );
                self.metrics.oom_kills.with_label_values(&[kill.attribution]).inc_by(kill.count);
                self.status.send_modify(|s| {
                    s.oom_entries += 1;
                    s.oom_kills_total += kill.count;
                    s.recent_ooms.push_back(kill);
                    while s.recent_ooms.len() > RECENT_OOM_KILLS {
                        s.recent_ooms.pop_front();
                    }
                });
                None
            }
            Input::GcRun(report) => {
                if std::mem::take(&mut self.gc_before_ready) {
                    info!(outcome = %report.outcome, "first GC run done; the engine is ready");
                    self.transition(Event::EngineReady, "");
                }
                self.status.send_modify(|s| {
                    s.gc_runs += 1;
                    s.recent_gc.push_back(report);
                    while s.recent_gc.len() > RECENT_GC_RUNS {
                        s.recent_gc.pop_front();
                    }
                });
                None
            }
        }
    }

    fn on_engine_event(&mut self, event: EngineEvent) {
        match event {
            EngineEvent::Spawned { pid } => {
                self.status.send_modify(|s| {
                    s.engine = EngineState::Starting;
                    s.engine_pid = Some(pid);
                });
            }
            EngineEvent::Ready { .. } => {
                self.set_engine_state(EngineState::Running);
                self.metrics.engine_up.set(1);
                if self.gc.is_none() && self.start_gc() {
                    self.gc_before_ready = true;
                    let reason = "the cache volume is over a GC watermark: collecting before ready";
                    info!("{reason}");
                    let state = self.state();
                    self.publish_state(state, reason.into());
                    return;
                }
                self.transition(Event::EngineReady, "");
            }
            EngineEvent::Hung { pid, failures } => {
                error!(pid, failures, "engine stopped answering its liveness probe; it is being killed");
            }
            EngineEvent::Exited { exit, decision, .. } => {
                self.metrics.engine_restarts.with_label_values(&[exit.label()]).inc();
                self.engine_went_down(exit.to_string(), decision);
            }
            EngineEvent::SpawnFailed { error, decision } => {
                self.metrics.engine_restarts.with_label_values(&["spawn_failed"]).inc();
                self.engine_went_down(format!("could not be spawned: {error}"), decision);
            }
        }
    }

    /// Starts the GC loop once (it outlives engine restarts: a run against a
    /// restarting engine is deferred). True when the volume is over a
    /// watermark now, so the loop's first run is urgent.
    fn start_gc(&mut self) -> bool {
        let Some(task) = &self.task else { return false };
        if self.gc.is_some() || !self.config.gc.enabled {
            return false;
        }
        let Some(root) = task.mounts.first().map(|m| m.mount_path.clone()) else { return false };
        let (policy, interval) = crate::gc::schedule::effective_policy(&self.config.gc, task);
        let pressure = crate::gc::executor::read_stats(&root).is_ok_and(|fs| crate::gc::schedule::under_pressure(&fs, &policy));
        info!(
            retention_secs = policy.retention.as_secs(),
            keep_bytes = policy.keep_bytes,
            min_age_secs = policy.min_age.as_secs(),
            free_bytes_start_below_percent = policy.free_bytes_start_below_percent,
            free_bytes_stop_at_percent = policy.free_bytes_stop_at_percent,
            free_inodes_start_below_percent = policy.free_inodes_start_below_percent,
            free_inodes_stop_at_percent = policy.free_inodes_stop_at_percent,
            interval_secs = interval.as_secs(),
            "gc loop started"
        );
        let (reports_tx, reports_rx) = mpsc::channel(4);
        let run = crate::gc::executor::GcRun { fs_path: root, policy, batch: self.config.gc.batch, dry_run: false };
        // What `machine-agent gc --dry-run` plans with: exactly this loop's settings.
        let run_file = crate::engine::EngineFiles::under(&self.config.state_dir).gc_run;
        let written = serde_json::to_vec_pretty(&run).map_err(std::io::Error::other).and_then(|json| crate::fsutil::write_atomic(&run_file, &json, 0o600));
        if let Err(error) = written {
            warn!(path = %run_file.display(), %error, "cannot write the GC settings for gc --dry-run");
        }
        let schedule = crate::gc::schedule::GcSchedule {
            run,
            socket: self.config.engine.socket.clone(),
            interval,
            pressure_check: self.config.gc.pressure_check,
            metrics: self.metrics.clone(),
            reports: reports_tx,
        };
        forward(reports_rx, self.inputs.clone(), Input::GcRun);
        self.gc = Some(tokio::spawn(schedule.run_forever().instrument(tracing::info_span!("gc"))));
        pressure
    }

    /// The engine is gone and the supervisor will restart it: a single exit is
    /// a restart (StartingEngine), a crash loop is Degraded.
    fn engine_went_down(&mut self, how: String, decision: crate::engine::supervise::RestartDecision) {
        // The next ready engine is ready at once: the GC loop runs already.
        self.gc_before_ready = false;
        self.metrics.engine_up.set(0);
        self.status.send_modify(|s| {
            s.engine = EngineState::Restarting;
            s.engine_pid = None;
            s.engine_restarts += 1;
            s.engine_last_exit = Some(how.clone());
        });
        let delay = format!("{:.1}s", decision.delay.as_secs_f64());
        if decision.crash_loop {
            self.transition(
                Event::Degraded,
                format!("engine crash loop: {} exits in the window, last {how}; next restart in {delay}", decision.recent_crashes),
            );
        } else {
            self.transition(Event::EngineRestarting, format!("engine {how}; restarting in {delay}"));
        }
    }

    fn accept_task(&mut self, task: BuildkitTask) {
        info!(task_id = %task.id, mounts = task.mounts.len(), "task accepted");
        let mount_paths: Vec<PathBuf> = task.mounts.iter().map(|m| m.mount_path.clone()).collect();
        self.status.send_modify(|s| {
            s.task_id = Some(task.id.clone());
            s.cache_mount = mount_paths.first().cloned();
            s.watched_paths.extend(mount_paths);
        });
        self.transition(Event::TaskAccepted, format!("preparing volumes for task {}", task.id));
        self.preparing = true;
        let settings = self.config.volume.clone();
        let mounts = task.mounts.clone();
        let inputs = self.inputs.clone();
        // Off the main loop: waiting for a device or formatting a large disk
        // must not stop the agent from answering signals and the control plane.
        tokio::spawn(
            async move {
                let mut prepared = vec![];
                let mut error = None;
                for (i, m) in mounts.iter().enumerate() {
                    match prepare_mount(&settings, m, i == 0).await {
                        Ok(p) => {
                            info!(mount_path = %p.mount_path.display(), device = %p.device.display(), fs = %p.fs_type, formatted = p.formatted, grown = p.grown, "volume ready");
                            prepared.push(p);
                        }
                        Err(e) => {
                            error = Some(e.to_string());
                            break;
                        }
                    }
                }
                let _ = inputs.send(Input::VolumesPrepared { prepared, error }).await;
            }
            .instrument(tracing::info_span!("volume")),
        );
        self.task = Some(task);
    }

    fn start_engine(&mut self, task: &BuildkitTask) {
        self.set_engine_state(EngineState::Starting);
        let (events_tx, events_rx) = mpsc::channel(16);
        match crate::engine::start(&self.config.engine, &self.config.state_dir, task, events_tx) {
            Ok(started) => {
                info!(
                    binary = %self.config.engine.binary.display(), config = %started.config_path.display(),
                    cgroup = ?started.cgroup.as_ref().map(|c| c.dir.display().to_string()),
                    memory_limit_bytes = ?started.cgroup.as_ref().map(|c| c.limit_bytes),
                    "engine supervisor started"
                );
                forward(events_rx, self.inputs.clone(), Input::Engine);
                self.engine = Some(started.supervisor);
                self.engine_cgroup_watch.send_replace(started.cgroup.clone());
                self.engine_cgroup = started.cgroup;
            }
            Err(error) => {
                error!(%error, "engine not started");
                self.set_engine_state(EngineState::Stopped);
                self.transition(Event::Degraded, format!("engine: {error}"));
            }
        }
    }

    /// Stops the engine, reports shutdown, and ends in Stopped, all within the drain deadline.
    async fn drain(mut self, reason: String, inputs: &mut mpsc::Receiver<Input>) -> Result<(), AgentError> {
        let started = Instant::now();
        let deadline = started + self.config.drain_timeout;
        self.transition(Event::DrainRequested, reason.clone());
        self.notifier.stopping();
        info!(reason = %reason, deadline_secs = self.config.drain_timeout.as_secs(), "draining");

        // No GC while the engine stops: a prune cut halfway helps nobody.
        if let Some(gc) = self.gc.take() {
            gc.abort();
        }
        let mut errors = vec![];
        let mut engine_stopped_cleanly = true;
        if let Some(engine) = self.engine.take() {
            self.set_engine_state(EngineState::Stopping);
            let budget = deadline.saturating_duration_since(Instant::now()).saturating_sub(SHUTDOWN_REPORT_RESERVE);
            let grace = self.config.engine.stop_grace.min(budget);
            match tokio::time::timeout(budget.max(grace), engine.stop(grace)).await {
                Ok(StopOutcome::Clean) => {}
                Ok(StopOutcome::Killed) => {
                    engine_stopped_cleanly = false;
                    errors.push(format!("engine needed SIGKILL after {grace:?}"));
                }
                Err(_) => {
                    engine_stopped_cleanly = false;
                    errors.push("engine stop did not finish within the drain deadline".to_string());
                }
            }
            self.status.send_modify(|s| {
                s.engine = EngineState::Stopped;
                s.engine_pid = None;
            });
            self.metrics.engine_up.set(0);
        }
        if let Some(cgroup) = self.engine_cgroup.take() {
            if let Err(error) = cgroup.remove() {
                warn!(%error, "engine cgroup left in place");
            }
        }

        // A prepare in flight finishes first: killing mkfs or mount halfway helps nobody.
        while self.preparing {
            match tokio::time::timeout_at(deadline, inputs.recv()).await {
                Ok(Some(Input::VolumesPrepared { prepared, .. })) => {
                    self.preparing = false;
                    self.mounts = prepared;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    errors.push("volume preparation did not finish within the drain deadline".to_string());
                    break;
                }
            }
        }
        let mut unmounted = true;
        let mut trimmed_bytes = 0;
        // Release in reverse order of preparation.
        for mount in self.mounts.iter().rev() {
            let report = release_mount(&self.config.volume, mount).await;
            unmounted &= report.unmounted;
            trimmed_bytes += report.trimmed_bytes.unwrap_or(0);
            errors.extend(report.errors);
        }

        let session = self.session.borrow().clone();
        if let (Some(control), Some(session)) = (&self.control, session) {
            let report = pb::ShutdownReport {
                machine_id: session.machine_id.clone(),
                task_id: self.task.as_ref().map(|t| t.id.clone()).unwrap_or_default(),
                reason: reason.clone(),
                unmounted,
                errors: errors.clone(),
                drain_duration_ms: millis(started.elapsed()),
                engine_stopped_cleanly,
                trimmed_bytes,
            };
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(500));
            match control.report_shutdown(report, &session, left).await {
                Ok(()) => info!("shutdown reported to the control plane"),
                Err(error) => warn!(%error, "shutdown report not delivered"),
            }
        }

        let elapsed = started.elapsed();
        if elapsed > self.config.drain_timeout {
            warn!(elapsed_ms = millis(elapsed), "drain overran its deadline");
        }
        self.transition(Event::Drained, reason);
        info!(elapsed_ms = millis(elapsed), "stopped");
        if errors.is_empty() {
            Ok(())
        } else {
            Err(AgentError::DrainIncomplete(errors.join("; ")))
        }
    }
}

/// Hands what a loop reports to the main loop, as an [`Input`], until either side closes.
fn forward<T: Send + 'static>(mut from: mpsc::Receiver<T>, inputs: mpsc::Sender<Input>, wrap: fn(T) -> Input) {
    tokio::spawn(async move {
        while let Some(item) = from.recv().await {
            if inputs.send(wrap(item)).await.is_err() {
                return;
            }
        }
    });
}

/// Whole milliseconds, saturating (a drain never lasts 584 million years).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// === proto mapping ===

impl State {
    pub fn to_proto(self) -> pb::AgentState {
        match self {
            State::Starting => pb::AgentState::Starting,
            State::Registering => pb::AgentState::Registering,
            State::Pending => pb::AgentState::Pending,
            State::Preparing => pb::AgentState::Preparing,
            State::StartingEngine => pb::AgentState::StartingEngine,
            State::Ready => pb::AgentState::Ready,
            State::Degraded => pb::AgentState::Degraded,
            State::Draining => pb::AgentState::Draining,
            State::Stopped => pb::AgentState::Stopped,
        }
    }
}

impl EngineState {
    pub fn to_proto(self) -> pb::EngineState {
        match self {
            EngineState::NotStarted => pb::EngineState::NotStarted,
            EngineState::Starting => pb::EngineState::Starting,
            EngineState::Running => pb::EngineState::Running,
            EngineState::Restarting => pb::EngineState::Restarting,
            EngineState::Stopping => pb::EngineState::Stopping,
            EngineState::Stopped => pb::EngineState::Stopped,
        }
    }
}
