//! The capabilities' loops, started by the agent: each gets what it needs
//! (settings, the status snapshot, a heartbeat) and reports on a channel of its
//! own that [`forward`] hands to the main loop.

use super::{forward, Agent, Input, MAX_SILENCE};
use crate::control::health::HealthStream;
use crate::control::identity::IdentityProvider;
use crate::control::register::Registration;
use crate::control::usage::UsageReporter;
use crate::control::Session;
use crate::gc::executor::GcRun;
use crate::gc::schedule::{effective_policy, under_pressure, GcSchedule};
use crate::lifecycle::Event;
use crate::observe::liveness::Liveness;
use crate::observe::oom_watch::OomWatch;
use crate::observe::sample_loop::SampleLoop;
use crate::observe::status::Status;
use crate::observe::step_watch::StepWatch;
use crate::volume::stats::read_fs_stats;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn, Instrument};

/// How often the OOM watcher checks the kernel's counters against the lines it read.
const OOM_RECONCILE_INTERVAL: Duration = Duration::from_secs(5);

/// The control plane's machine id, kept in the state dir for the next agent.
const MACHINE_ID_FILE: &str = "control-plane-machine-id";

impl Agent {
    /// Registration (the task stream), the health stream and usage reports.
    pub(super) fn start_control_loops(&mut self, session_tx: watch::Sender<Option<Session>>, status: &watch::Receiver<Status>, liveness: &Liveness) {
        let Some(control) = self.control.clone() else { return };
        self.transition(Event::RegistrationStarted, "");
        self.status.send_modify(|s| s.control_plane_error = Some("not registered yet: the first registration is under way".into()));
        let (events_tx, events_rx) = mpsc::channel(16);
        let registration = Registration {
            control: control.clone(),
            identity: IdentityProvider::new(self.config.identity.clone()),
            limits: self.config.task_limits(),
            session: session_tx,
            events: events_tx.clone(),
            machine_id_file: self.config.state_dir.join(MACHINE_ID_FILE),
        };
        tokio::spawn(registration.run().instrument(tracing::info_span!("register")));
        let health = HealthStream {
            control: control.clone(),
            session: self.session.clone(),
            status: status.clone(),
            events: events_tx,
            interval: self.config.health_interval,
            heartbeat: liveness.register("health", MAX_SILENCE.max(self.config.health_interval * 3)),
            oom_delivered: 0,
            thresholds: self.config.health_thresholds,
            steps_delivered: 0,
            steps: Default::default(),
        };
        tokio::spawn(health.run().instrument(tracing::info_span!("health")));
        forward(events_rx, self.inputs.clone(), Input::Control);
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
    pub(super) fn start_oom_watch(&self, status: &watch::Receiver<Status>, liveness: &Liveness) {
        let (kills_tx, kills_rx) = mpsc::channel(16);
        let name = self.config.engine.cgroup.as_deref().unwrap_or_default().trim_matches('/');
        let watch = OomWatch {
            kmsg_path: "/dev/kmsg".into(),
            vmstat_path: "/proc/vmstat".into(),
            // Under systemd, the engine's scope: where the kernel's memcg paths put it.
            engine_cgroup_path: if name.is_empty() { String::new() } else { crate::engine::cgroup::Placement::detect(name).relative(name) },
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

    /// Samples the host, the engine's tree and the watched filesystems every
    /// `sample_interval`; the loop sets the gauges, the main loop the status.
    pub(super) fn start_sampler(&self, status: &watch::Receiver<Status>, liveness: &Liveness) {
        let (ticks_tx, ticks_rx) = mpsc::channel(1);
        let sample_loop = SampleLoop {
            interval: self.config.sample_interval,
            status: status.clone(),
            engine_cgroup: self.engine_cgroup_watch.subscribe(),
            metrics: self.metrics.clone(),
            heartbeat: liveness.register("sampler", MAX_SILENCE.max(self.config.sample_interval * 3)),
            ticks: ticks_tx,
        };
        tokio::spawn(sample_loop.run().instrument(tracing::info_span!("sampler")));
        forward(ticks_rx, self.inputs.clone(), Input::Sampled);
    }

    /// The step watcher runs from start to exit, following the build steps of
    /// whichever engine runs (it waits for the engine's cgroup).
    pub(super) fn start_step_watch(&self, status: &watch::Receiver<Status>, liveness: &Liveness) {
        let (records_tx, records_rx) = mpsc::channel(64);
        let step_watch = StepWatch {
            engine_cgroup: self.engine_cgroup_watch.subscribe(),
            engine_socket: self.config.engine.socket.clone(),
            status: status.clone(),
            poll_interval: self.config.step_poll_interval,
            records: records_tx,
            heartbeat: liveness.register("steps", MAX_SILENCE),
        };
        tokio::spawn(step_watch.run().instrument(tracing::info_span!("steps")));
        forward(records_rx, self.inputs.clone(), Input::Step);
    }

    /// Starts the GC loop once (it outlives engine restarts: a run against a
    /// restarting engine is deferred). True when the volume is over a
    /// watermark now, so the loop's first run is urgent.
    pub(super) fn start_gc(&mut self) -> bool {
        if self.gc.is_some() || !self.config.gc.enabled {
            return false;
        }
        let (Some(task), Some(root)) = (&self.task, self.cache_root()) else { return false };
        let root = root.to_path_buf();
        let (policy, interval) = effective_policy(&self.config.gc, task);
        let pressure = read_fs_stats(&root).is_ok_and(|fs| under_pressure(&fs, &policy));
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
        let run = GcRun { fs_path: root, policy, batch: self.config.gc.batch, dry_run: false };
        // What `machine-agent gc --dry-run` plans with: exactly this loop's settings.
        let run_file = crate::engine::EngineFiles::under(&self.config.state_dir).gc_run;
        let written = serde_json::to_vec_pretty(&run).map_err(std::io::Error::other).and_then(|json| crate::fsutil::write_atomic(&run_file, &json, 0o600));
        if let Err(error) = written {
            warn!(path = %run_file.display(), %error, "cannot write the GC settings for gc --dry-run");
        }
        let schedule = GcSchedule {
            run,
            socket: self.config.engine.socket.clone(),
            interval,
            pressure_check: self.config.gc.pressure_check,
            metrics: self.metrics.clone(),
            reports: reports_tx,
            clock: crate::gc::clock::RetentionClock::new(
                crate::gc::clock::ClockSettings { sync_wait: self.config.gc.clock_sync_wait, max_jump: self.config.gc.clock_jump_max },
                tokio::time::Instant::now(),
                std::time::SystemTime::now(),
            ),
        };
        forward(reports_rx, self.inputs.clone(), Input::GcRun);
        self.gc = Some(tokio::spawn(schedule.run_forever().instrument(tracing::info_span!("gc"))));
        pressure
    }
}
