//! What each input does to the agent: the main loop's one `match`, with a
//! method per kind of news. Nothing here blocks: long work (a prepare, a GC
//! run) runs in its own task and comes back as another input.

use super::{Agent, Input};
use crate::control::ControlEvent;
use crate::engine::supervise::{EngineEvent, RestartDecision};
use crate::engine::EngineState;
use crate::lifecycle::Event;
use crate::observe::log_limit::Verdict;
use crate::observe::oom_watch::OomKill;
use crate::proto::v1 as pb;
use crate::task::{differing_fields, BuildkitTask, Task, TaskError};
use crate::volume::health::FsFailing;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// Log-limiter kinds: each kind of ignored task message is limited on its own.
const TASK_REJECTED: &str = "task_rejected";
const TASK_CONFLICT: &str = "task_conflict";

impl Agent {
    /// Handles one input; Some(reason) ends the main loop and starts the drain.
    pub(super) fn handle(&mut self, input: Input) -> Option<String> {
        match input {
            Input::Control(event) => return self.on_control(event),
            Input::VolumesPrepared(outcome) => self.on_volumes_prepared(outcome),
            Input::Engine(event) => self.on_engine_event(event),
            Input::Sampled(tick) => {
                self.status.send_modify(|s| {
                    s.resources = Some(tick.sample);
                    s.mounts = tick.mounts;
                });
                // The sampler's tick is the agent's clock: a flood that ended still gets its count said.
                self.say_suppressed_lines();
            }
            Input::Oom(kill) => self.on_oom_kill(kill),
            Input::Step(record) => {
                debug!(container_id = %record.container_id, build_ref = ?record.build_ref, "{}", record.summary());
                self.metrics.record_step(&record);
                self.status.send_modify(|s| s.record_step(record));
            }
            Input::GcRun(report) => self.on_gc_run(report),
            Input::RetryDue(step) => self.on_retry_due(step),
            Input::CacheFailing(failing) => self.on_cache_failing(failing),
        }
        None
    }

    /// Some(reason) when the control plane asks the agent to drain.
    fn on_control(&mut self, event: ControlEvent) -> Option<String> {
        match event {
            ControlEvent::Task(Task::Pending) => match &self.task {
                // The engine keeps serving: a control plane that lost track of
                // us must not cost a build. It can send terminate if it means it.
                Some(task) => warn!(task_id = %task.id, "control plane sent pending while a task runs; keeping the task"),
                None => self.transition(Event::TaskPending, "waiting for a task"),
            },
            ControlEvent::Task(Task::Buildkit(task)) => match &self.task {
                Some(current) if current.id == task.id => self.on_task_resent(&task),
                Some(current) => warn!(
                    running = %current.id, offered = %task.id,
                    "a different task arrived while one runs; keeping the running task"
                ),
                None => match crate::engine::cdi::check_devices(&task.devices, &self.config.engine.cdi.spec_dirs) {
                    Ok(()) => self.accept_task(*task),
                    // Refused like an invalid task: counted, reported, the agent stays as it is.
                    Err(error) => self.on_task_rejected(&error),
                },
            },
            ControlEvent::Task(Task::Terminate { reason }) => return Some(format!("terminate task: {reason}")),
            ControlEvent::ShouldTerminate => return Some("should_terminate".into()),
            ControlEvent::TaskRejected(error) => self.on_task_rejected(&error),
            ControlEvent::Registered => self.status.send_modify(|s| s.control_plane_error = None),
            ControlEvent::NotRegistered(why) => self.status.send_modify(|s| s.control_plane_error = Some(why)),
            // Handled by the main loop itself (it awaits the engine's stop and start).
            ControlEvent::CacheReset(_) => {}
        }
        None
    }

    /// A task under the running task's id. The same content is a resend after
    /// a reconnect. Other content is the control plane's error: the agent
    /// never reconfigures a running engine under one id, so it keeps the task
    /// it runs, says what differs, and reports the conflict on the health stream.
    fn on_task_resent(&mut self, offered: &BuildkitTask) {
        let Some(running) = &self.task else { return };
        let differs = differing_fields(running, offered);
        if differs.is_empty() {
            debug!(task_id = %offered.id, "task re-sent after reconnect; nothing to do");
            return;
        }
        self.metrics.task_conflicts.inc();
        let now_ms = crate::clock::unix_time_ms();
        let fields = differs.join(", ");
        self.status.send_modify(|s| s.record_task_conflict(&offered.id, differs, now_ms));
        if let Verdict::Log { suppressed_before } = self.log_limit.check(TASK_CONFLICT, Instant::now()) {
            warn!(
                task_id = %offered.id, differs = %fields, suppressed_before,
                "a task was re-sent under the running task's id with other content; keeping the running task (reported to the control plane)"
            );
        }
    }

    /// An invalid task message: counted and reported in full, logged at a bounded rate.
    fn on_task_rejected(&mut self, error: &TaskError) {
        let reason = error.to_string();
        if let Verdict::Log { suppressed_before } = self.log_limit.check(TASK_REJECTED, Instant::now()) {
            error!(error = %reason, suppressed_before, "task rejected; the agent keeps its current state");
        }
        self.status.send_modify(|s| s.record_task_rejection(reason));
    }

    /// One line per kind of ignored message whose window ended with lines not logged.
    fn say_suppressed_lines(&mut self) {
        let window = self.log_limit.window();
        for (kind, suppressed) in self.log_limit.flush(Instant::now()) {
            warn!(kind, suppressed, "{suppressed} more lines of this kind were not logged in the last {window:?}");
        }
    }

    fn on_engine_event(&mut self, event: EngineEvent) {
        match event {
            EngineEvent::Spawned { pid, adopted } => {
                if adopted {
                    self.metrics.engine_adoptions.inc();
                }
                self.status.send_modify(|s| {
                    s.engine = EngineState::Starting;
                    s.engine_pid = Some(pid);
                    s.engine_adopted = adopted;
                });
            }
            EngineEvent::Ready { devices, .. } => {
                self.status.send_modify(|s| s.engine_devices = devices);
                self.set_engine_state(EngineState::Running);
                self.metrics.engine_up.set(1);
                if self.cache_failing.is_some() {
                    // A restarted engine on a failing disk is not a ready builder.
                    return;
                }
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

    /// The engine is gone and the supervisor will restart it: a single exit is
    /// a restart (StartingEngine), a crash loop is Degraded.
    fn engine_went_down(&mut self, how: String, decision: RestartDecision) {
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

    fn on_oom_kill(&mut self, kill: OomKill) {
        warn!(
            attribution = kill.attribution, pid = ?kill.pid, process = ?kill.process_name, container_id = ?kill.container_id,
            scope = ?kill.scope, task_memcg = ?kill.task_memcg, anon_rss_bytes = ?kill.anon_rss_bytes, count = kill.count,
            "OOM kill: {}", kill.summary()
        );
        self.metrics.oom_kills.with_label_values(&[kill.attribution]).inc_by(kill.count);
        self.status.send_modify(|s| s.record_oom_kill(kill));
    }

    /// A failing cache disk: Degraded for good, with the reason, on every channel.
    fn on_cache_failing(&mut self, failing: FsFailing) {
        let why = format!("cache filesystem at {} is failing: {}", failing.mount_path.display(), failing.why);
        error!(mount_path = %failing.mount_path.display(), why = %failing.why, "cache filesystem is failing; the agent stays degraded until it is replaced or checked");
        self.cache_failing = Some(why.clone());
        self.transition(Event::Degraded, why);
    }

    fn on_gc_run(&mut self, report: pb::GcRunReport) {
        if std::mem::take(&mut self.gc_before_ready) && self.cache_failing.is_none() {
            info!(outcome = %report.outcome, "first GC run done; the engine is ready");
            self.transition(Event::EngineReady, "");
        }
        self.status.send_modify(|s| s.record_gc_run(report));
    }
}
