//! The agent: the wiring and the one loop that drives the lifecycle. The
//! capabilities' loops report on channels of their own; [`forward`] hands what
//! they say to the main loop as an [`Input`], and only this module changes the
//! state, publishes it (to /readyz, the `machine_agent_state` metric and
//! systemd's STATUS=), and decides to drain and exit.
//!
//! Shutdown has one path: SIGTERM/SIGINT, `should_terminate` and a terminate
//! task all end the loop with a reason, and the drain runs under the
//! configured deadline.
//!
//! Files: this one wires and runs; `loops` starts the capabilities' loops;
//! `handle` says what each input does; `prepare` takes a task to a running
//! engine; `drain` ends it all.

mod drain;
mod handle;
mod loops;
mod prepare;
mod reset;

use crate::backoff::PollGaps;
use crate::config::Config;
use crate::control::{ControlError, ControlEvent, ControlPlane, Session};
use crate::engine::cgroup::EngineCgroup;
use crate::engine::supervise::{EngineEvent, Supervisor};
use crate::engine::EngineState;
use crate::lifecycle::{next, Event, State};
use crate::observe::http::HttpError;
use crate::observe::liveness::{Heartbeat, Liveness};
use crate::observe::log_limit::LogLimiter;
use crate::observe::metrics::Metrics;
use crate::observe::oom_watch::OomKill;
use crate::observe::sample_loop::Tick;
use crate::observe::status::Status;
use crate::observe::steps::StepRecord;
use crate::proto::v1 as pb;
use crate::signal::{ShutdownSignals, Stop};
use crate::systemd::Notifier;
use crate::task::BuildkitTask;
use crate::volume::manager::PreparedMount;
use prepare::{PrepareOutcome, Step};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

/// The main loop wakes at least this often to beat its heartbeat and ping the
/// systemd watchdog; /healthz declares a loop stalled after MAX_SILENCE.
const MAIN_TICK: Duration = Duration::from_secs(1);
const MAX_SILENCE: Duration = Duration::from_secs(10);

/// Where tasks come from.
#[derive(Debug)]
pub enum Mode {
    /// Register with the configured control plane and take tasks from it.
    ControlPlane,
    /// Serve this task, validated from a local file; no control plane.
    Standalone(Box<BuildkitTask>),
}

/// Everything that can happen to the agent, from any of its loops.
#[derive(Debug)]
pub enum Input {
    /// A task, a rejected task or should_terminate, from the control plane.
    Control(ControlEvent),
    /// The engine supervisor's news: spawned, ready, hung, exited.
    Engine(EngineEvent),
    /// A GC run finished (or was deferred).
    GcRun(pb::GcRunReport),
    /// The kernel's OOM killer killed a process (or a counter says it did).
    Oom(OomKill),
    /// A build step finished, with its figures.
    Step(StepRecord),
    /// A sample of the host, the engine's process tree and the watched filesystems.
    Sampled(Tick),
    /// The volume manager finished preparing the task's mounts.
    VolumesPrepared(PrepareOutcome),
    /// A step that failed is due to run again.
    RetryDue(Step),
    /// A cache filesystem is failing (write errors, kernel-recorded errors).
    CacheFailing(crate::volume::health::FsFailing),
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
    /// {0}
    Instance(#[from] crate::instance::LockError),
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
    /// handed off: the agent exited without a drain, for the next agent to adopt the engine
    HandedOff,
    /// {0}
    Task(crate::task::TaskError),
}

/// Runs the agent until it has drained. Ok means a clean drain (exit 0).
pub async fn run(config: Config, mode: Mode, notifier: Notifier) -> Result<(), AgentError> {
    // Signals first: a SIGTERM from here on starts a drain instead of killing us.
    let mut signals = ShutdownSignals::install().map_err(AgentError::Signals)?;
    crate::fsutil::create_private_dir(&config.state_dir).map_err(|source| AgentError::StateDir { path: config.state_dir.clone(), source })?;
    // One agent per machine, before anything else: a second one binds no port,
    // probes no device, stops no engine. Held until this function returns.
    let instance = crate::instance::InstanceLock::acquire(&config.state_dir)?;
    tracing::debug!(lock = %instance.path().display(), "state dir locked");

    let metrics = Metrics::new();
    let liveness = Liveness::default();
    let (status_tx, status_rx) = watch::channel(initial_status(&config));
    let (bound, serve) = crate::observe::http::bind(&config.endpoints, status_rx.clone(), metrics.clone(), liveness.clone()).await?;
    tokio::spawn(serve.instrument(tracing::info_span!("endpoints", listen = %bound.public, detail = %bound.detail)));
    // Tests find both addresses in this line: `listen=` first, then `detail=`.
    info!(listen = %bound.public, detail = %bound.detail, version = env!("CARGO_PKG_VERSION"), "endpoints serving");
    let notifier = Arc::new(notifier);
    notifier.ready();

    let control = control_plane(&mode, &config, &metrics)?;
    let (inputs_tx, mut inputs) = mpsc::channel(64);
    let (session_tx, session_rx) = watch::channel(None);
    let mut agent = Agent::new(config, metrics, notifier.clone(), status_tx, control, session_rx, inputs_tx);
    // Bind the state first: publishing while a borrow of the watch is alive would deadlock.
    let initial = agent.state();
    agent.publish_state(initial, String::new());

    agent.start_oom_watch(&status_rx, &liveness);
    agent.start_sampler(&status_rx, &liveness);
    // Before any task is taken: a task's devices are checked against the specs.
    prepare_cdi(&agent.config.engine.cdi).await;
    agent.start_step_watch(&status_rx, &liveness);
    match mode {
        Mode::Standalone(task) => {
            info!(task_id = %task.id, "standalone mode: serving the task file, no control plane");
            // A device no spec defines is the task file's error, like any other field's.
            crate::engine::cdi::check_devices(&task.devices, &agent.config.engine.cdi.spec_dirs).map_err(AgentError::Task)?;
            agent.accept_task(*task);
        }
        Mode::ControlPlane => agent.start_control_loops(session_tx, &status_rx, &liveness),
    }

    let mut pulse = Pulse::new(liveness, notifier);
    #[cfg(debug_assertions)]
    let mut debug_panic = debug_panic::Trigger::from_env();
    let reason = loop {
        tokio::select! {
            Some(input) = inputs.recv() => {
                if let Input::Control(ControlEvent::CacheReset(request)) = input {
                    // Awaited here with the heartbeat still beating: a reset stops and
                    // starts the engine, which the main loop owns.
                    let reset = agent.reset_cache(request);
                    tokio::pin!(reset);
                    loop {
                        tokio::select! {
                            () = &mut reset => break,
                            () = pulse.tick() => {}
                        }
                    }
                    continue;
                }
                if let Some(reason) = agent.handle(input) {
                    break reason;
                }
            }
            stop = signals.recv() => match stop {
                Stop::Drain(signal) => {
                    info!(signal, "shutdown signal received");
                    break signal.to_ascii_lowercase();
                }
                Stop::Handoff => {
                    // Nothing is stopped, unmounted or unlocked: the next agent adopts it all.
                    warn!(engine_pid = ?agent.status.borrow().engine_pid, "handoff: exiting at once; the engine, its mounts and cgroup stay for the next agent");
                    return Err(AgentError::HandedOff);
                }
            },
            () = pulse.tick() => {
                #[cfg(debug_assertions)]
                debug_panic.check();
            }
        }
    };

    // Keep feeding the watchdog through the drain: a long engine stop is not a hang.
    let drain = agent.drain(reason, &mut inputs);
    tokio::pin!(drain);
    loop {
        tokio::select! {
            result = &mut drain => return result,
            () = pulse.tick() => {}
        }
    }
}

/// Generates the NVIDIA CDI spec where the machine has GPUs and the toolkit,
/// and says what the spec dirs define. Tolerated when it fails: a builder
/// without the spec still serves tasks that ask for no GPU, and one that asks
/// is refused naming the device.
async fn prepare_cdi(cdi: &crate::engine::cdi::CdiSettings) {
    use crate::engine::cdi::{generate_nvidia_spec, read_spec_dirs, NvidiaSpec};
    match generate_nvidia_spec(cdi, Path::new("/")).await {
        NvidiaSpec::Disabled | NvidiaSpec::NoGpu => {}
        NvidiaSpec::NoToolkit(ctk) => {
            warn!(nvidia_ctk = %ctk.display(), "NVIDIA GPUs present but no nvidia-ctk: no GPU spec generated (install nvidia-container-toolkit-base)")
        }
        NvidiaSpec::Generated { path, devices } => info!(spec = %path.display(), ?devices, "NVIDIA CDI spec generated"),
        NvidiaSpec::Failed(error) => warn!(%error, "NVIDIA CDI spec not generated; tasks asking for GPUs will be refused"),
    }
    if !cdi.spec_dirs.is_empty() {
        let scan = read_spec_dirs(&cdi.spec_dirs);
        for problem in &scan.problems {
            warn!(%problem, "CDI spec not read");
        }
        info!(dirs = ?cdi.spec_dirs, devices = ?scan.devices, "CDI devices on this machine");
    }
}

/// A test's way to crash a debug build of the agent with a real panic (the
/// adoption tests: a crash is a handoff). Compiled out of release builds; in
/// a debug build it does nothing unless the agent's own environment names a
/// trigger file, which nothing the control plane sends can set.
#[cfg(debug_assertions)]
mod debug_panic {
    use std::path::PathBuf;

    /// The variable naming the trigger file. When the file appears, the agent
    /// panics at its next main-loop tick: in the main task if the file says
    /// `main`, else in a task spawned for it.
    pub const ENV: &str = "MACHINE_AGENT_DEBUG_PANIC_FILE";

    #[derive(Debug)]
    pub struct Trigger(Option<PathBuf>);

    impl Trigger {
        pub fn from_env() -> Self {
            Self(std::env::var_os(ENV).map(PathBuf::from))
        }

        pub fn check(&mut self) {
            let Some(path) = &self.0 else { return };
            let Ok(text) = std::fs::read_to_string(path) else { return };
            if text.trim() == "main" {
                panic!("debug panic in the main task ({ENV}={})", path.display());
            }
            let path = path.display().to_string();
            tokio::spawn(async move { panic!("debug panic in a spawned task ({ENV}={path})") });
            // Once: a spawned task's panic aborts the process on its own.
            self.0 = None;
        }
    }
}

/// Starting; the first reports carry the state dir's figures even before the sampler's first tick lands.
fn initial_status(config: &Config) -> Status {
    let mut status = Status::initial(&config.state_dir);
    status.step_capacity = config.step_records_kept;
    status.mounts = crate::observe::sample_loop::read_mounts(&status.watched_paths);
    status
}

/// The control-plane handle `mode` needs: none standalone, and the config must have one otherwise.
fn control_plane(mode: &Mode, config: &Config, metrics: &Metrics) -> Result<Option<ControlPlane>, AgentError> {
    match (mode, &config.control_plane) {
        (Mode::Standalone(_), _) => Ok(None),
        (Mode::ControlPlane, None) => Err(AgentError::NoControlPlane),
        (Mode::ControlPlane, Some(cp)) => Ok(Some(ControlPlane::new(cp.clone(), metrics.clone())?)),
    }
}

/// The main loop's own heartbeat and systemd's watchdog, beaten on one ticker.
struct Pulse {
    ticker: tokio::time::Interval,
    heartbeat: Heartbeat,
    liveness: Liveness,
    notifier: Arc<Notifier>,
}

impl Pulse {
    fn new(liveness: Liveness, notifier: Arc<Notifier>) -> Self {
        let heartbeat = liveness.register("main", MAX_SILENCE);
        // Never zero: tokio's interval panics on a zero period.
        let tick = notifier.watchdog_interval().map_or(MAIN_TICK, |w| w.min(MAIN_TICK)).max(crate::systemd::MIN_WATCHDOG_INTERVAL);
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { ticker, heartbeat, liveness, notifier }
    }

    /// Waits for the next tick, then beats and pings.
    async fn tick(&mut self) {
        self.ticker.tick().await;
        self.heartbeat.beat();
        // The watchdog is fed only while every loop is alive: a stalled health
        // loop makes systemd restart us, as a stalled main loop would.
        if self.notifier.watchdog_interval().is_some() && self.liveness.stalled().is_empty() {
            self.notifier.watchdog();
        }
    }
}

/// Lines per kind (rejected task, conflicting task) logged in a window:
/// one line per message is fine at a human pace; a control plane stuck in a
/// loop gets ten lines per 10 s and then one line with how many were not logged.
const IGNORED_TASK_LINES_PER_WINDOW: u32 = 10;
const IGNORED_TASK_LINES_WINDOW: Duration = Duration::from_secs(10);

/// The main loop's state: what it started and must stop.
#[derive(Debug)]
struct Agent {
    config: Config,
    metrics: Metrics,
    notifier: Arc<Notifier>,
    status: watch::Sender<Status>,
    engine: Option<Supervisor>,
    /// Removed at drain, once the engine is gone.
    engine_cgroup: Option<EngineCgroup>,
    /// The same, for the OOM watcher (its daemon counter) and the sampler.
    engine_cgroup_watch: watch::Sender<Option<EngineCgroup>>,
    /// The GC loop, started when the engine is first ready; aborted at drain.
    gc: Option<tokio::task::JoinHandle<()>>,
    task: Option<BuildkitTask>,
    /// Mounts the volume manager prepared; released at drain.
    mounts: Vec<PreparedMount>,
    /// A prepare is running; the drain waits for it before releasing.
    preparing: bool,
    /// The cache filesystems' health watch, started once the volumes are prepared; aborted at drain.
    volume_watch: Option<tokio::task::JoinHandle<()>>,
    /// The prepare's task, aborted (killing mkfs) if the drain must abandon it.
    prepare_task: Option<tokio::task::JoinHandle<()>>,
    /// The cache volume was over a GC watermark when the engine first became
    /// ready: Ready waits for that first GC run, so no build starts on a full disk.
    gc_before_ready: bool,
    /// Why a cache filesystem is failing, once one is: the agent stays Degraded.
    cache_failing: Option<String>,
    /// When a failed step (prepare, engine start) runs again, and why it failed.
    retry: PollGaps,
    retry_cause: String,
    control: Option<ControlPlane>,
    session: watch::Receiver<Option<Session>>,
    inputs: mpsc::Sender<Input>,
    /// Lines about task messages the agent ignores, which a control plane can
    /// send without bound: a few per window, then a count.
    log_limit: LogLimiter,
}

impl Agent {
    fn new(
        config: Config,
        metrics: Metrics,
        notifier: Arc<Notifier>,
        status: watch::Sender<Status>,
        control: Option<ControlPlane>,
        session: watch::Receiver<Option<Session>>,
        inputs: mpsc::Sender<Input>,
    ) -> Self {
        Self {
            config,
            metrics,
            notifier,
            status,
            engine: None,
            engine_cgroup: None,
            engine_cgroup_watch: watch::Sender::new(None),
            gc: None,
            task: None,
            mounts: vec![],
            preparing: false,
            prepare_task: None,
            volume_watch: None,
            gc_before_ready: false,
            retry: PollGaps::doubling(prepare::RETRY_FIRST, prepare::RETRY_MAX),
            retry_cause: String::new(),
            cache_failing: None,
            control,
            session,
            inputs,
            log_limit: LogLimiter::new(IGNORED_TASK_LINES_PER_WINDOW, IGNORED_TASK_LINES_WINDOW),
        }
    }

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

    /// The task's first mount: the engine's root and the GC's filesystem.
    fn cache_root(&self) -> Option<&Path> {
        self.task.as_ref()?.mounts.first().map(|m| m.mount_path.as_path())
    }
}

/// Hands what a loop reports to the main loop, as an [`Input`], until either
/// side closes; when the main loop stops listening, `from` closes too, so the
/// loop behind it sees its channel closed and ends.
fn forward<T: Send + 'static>(mut from: mpsc::Receiver<T>, inputs: mpsc::Sender<Input>, wrap: fn(T) -> Input) {
    tokio::spawn(async move {
        loop {
            let item = tokio::select! {
                item = from.recv() => item,
                () = inputs.closed() => None,
            };
            let Some(item) = item else { return };
            if inputs.send(wrap(item)).await.is_err() {
                return;
            }
        }
    });
}
