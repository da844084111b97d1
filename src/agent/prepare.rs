//! From an accepted task to a supervised engine: the task's mounts are
//! prepared off the main loop (waiting for a device or formatting a large disk
//! must not stop the agent from answering signals and the control plane), and
//! the engine starts when every mount is ready.
//!
//! A step that fails (a device that comes late, a full state dir, a refused
//! device an operator then wipes) leaves the agent Degraded with the reason,
//! and runs again on a capped schedule while the task stands: the agent
//! recovers on its own when the cause goes away.

use super::{forward, Agent, Input};
use crate::engine::EngineState;
use crate::lifecycle::{Event, State};
use crate::observe::status::{CacheVolume, SharedVolume};
use crate::task::{BuildkitTask, VolumeMount};
use crate::volume::health::{HealthWatch, Watched};
use crate::volume::manager::{prepare_mount, PreparedMount, VolumeError, VolumeSettings};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{error, info, Instrument};

/// The first retry of a failed step comes soon (a device that attaches a
/// second late); later ones back off to one a minute, so a cause that lasts
/// (a refused device waiting for an operator) costs a look a minute.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// A step of the way to a running engine that can fail and be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Prepare,
    EngineStart,
}

/// What a prepare did: the mounts it prepared (released at drain, whatever
/// happened), and the error that stopped it, if any.
#[derive(Debug)]
pub struct PrepareOutcome {
    pub prepared: Vec<PreparedMount>,
    pub error: Option<VolumeError>,
}

impl Agent {
    /// Takes the task: watches its mounts, and starts preparing them.
    pub(super) fn accept_task(&mut self, task: BuildkitTask) {
        info!(task_id = %task.id, mounts = task.mounts.len(), "task accepted");
        let mount_paths: Vec<PathBuf> = task.mounts.iter().map(|m| m.mount_path.clone()).collect();
        self.status.send_modify(|s| {
            s.task_id = Some(task.id.clone());
            s.cache_mount = mount_paths.first().cloned();
            s.watched_paths.extend(mount_paths);
        });
        self.transition(Event::TaskAccepted, format!("preparing volumes for task {}", task.id));
        self.start_prepare(&task);
        self.task = Some(task);
    }

    fn start_prepare(&mut self, task: &BuildkitTask) {
        self.preparing = true;
        let (settings, mounts, inputs, task_id) = (self.config.volume.clone(), task.mounts.clone(), self.inputs.clone(), task.id.clone());
        let prepare = async move {
            let outcome = prepare_all(&settings, &mounts, &task_id).await;
            let _ = inputs.send(Input::VolumesPrepared(outcome)).await;
        };
        self.prepare_task = Some(tokio::spawn(prepare.instrument(tracing::info_span!("volume"))));
    }

    /// The prepare ended: start the engine, or say why not.
    pub(super) fn on_volumes_prepared(&mut self, outcome: PrepareOutcome) {
        self.preparing = false;
        self.mounts = outcome.prepared;
        let shared: Vec<SharedVolume> = self.mounts.iter().filter_map(SharedVolume::of).collect();
        let volumes: Vec<CacheVolume> = self.mounts.iter().map(CacheVolume::of).collect();
        self.status.send_modify(|s| {
            s.shared_volumes = shared;
            s.cache_volumes = volumes;
        });
        match (outcome.error, self.task.clone()) {
            (Some(error), _) => {
                let delay = self.retry_later(Step::Prepare, format!("volume: {error}"));
                error!(%error, retry_in_ms = delay.as_millis(), "volume preparation failed; the engine is not started");
                self.transition(Event::Degraded, format!("volume: {error}; retrying in {:.1}s", delay.as_secs_f64()));
            }
            (None, Some(task)) => {
                self.transition(Event::VolumePrepared, "starting the engine");
                self.start_volume_watch();
                self.start_engine(&task);
            }
            (None, None) => {}
        }
    }

    /// Watches the prepared mounts for a failing disk, for as long as the agent runs.
    fn start_volume_watch(&mut self) {
        if self.volume_watch.is_some() {
            return;
        }
        let (reports_tx, reports_rx) = mpsc::channel(4);
        let watch = HealthWatch {
            sys_root: self.config.volume.sys_root.clone(),
            mounts: self.mounts.iter().map(|m| Watched { mount_path: m.mount_path.clone(), device: m.device.clone(), fs_type: m.fs_type.clone() }).collect(),
            interval: self.config.sample_interval,
            reports: reports_tx,
        };
        forward(reports_rx, self.inputs.clone(), Input::CacheFailing);
        self.volume_watch = Some(tokio::spawn(watch.run().instrument(tracing::info_span!("volume_health"))));
    }

    /// Runs `step` again after the next gap of the retry schedule; the main
    /// loop gets [`Input::RetryDue`] then. `cause` is why it failed. Returns the gap.
    fn retry_later(&mut self, step: Step, cause: String) -> Duration {
        self.retry_cause = cause;
        let delay = self.retry.next_gap();
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = inputs.send(Input::RetryDue(step)).await;
        });
        delay
    }

    /// A retry came due: run the step again if it is still the one that failed.
    pub(super) fn on_retry_due(&mut self, step: Step) {
        // Draining, or recovered some other way: nothing to retry.
        if self.state() != State::Degraded || self.preparing || self.engine.is_some() {
            return;
        }
        let Some(task) = self.task.clone() else { return };
        // The reason keeps the failure being retried, so a reader between two tries still sees it.
        let last = self.retry_cause.clone();
        match step {
            Step::Prepare => {
                self.transition(Event::PrepareRetried, format!("retrying the volume preparation after: {last}"));
                self.start_prepare(&task);
            }
            Step::EngineStart => {
                self.transition(Event::EngineStartRetried, format!("retrying the engine start after: {last}"));
                self.start_engine(&task);
            }
        }
    }

    fn start_engine(&mut self, task: &BuildkitTask) {
        self.set_engine_state(EngineState::Starting);
        let (events_tx, events_rx) = mpsc::channel(16);
        let backstop = crate::gc::backstop::backstop_policy(task);
        match crate::engine::start(&self.config.engine, &self.config.state_dir, task, &backstop, events_tx) {
            Ok(started) => {
                info!(
                    binary = %self.config.engine.binary.display(), config = %started.config_path.display(),
                    cgroup = ?started.cgroup.as_ref().map(|c| c.dir.display().to_string()),
                    memory_limit_bytes = ?started.cgroup.as_ref().map(|c| c.limit_bytes),
                    "engine supervisor started"
                );
                forward(events_rx, self.inputs.clone(), Input::Engine);
                // Every step to a running engine succeeded: the next failure starts the schedule over.
                self.retry.reset();
                self.engine = Some(started.supervisor);
                self.engine_cgroup_watch.send_replace(started.cgroup.clone());
                self.engine_cgroup = started.cgroup;
            }
            Err(error) => {
                let delay = self.retry_later(Step::EngineStart, format!("engine: {error}"));
                error!(%error, retry_in_ms = delay.as_millis(), "engine not started");
                self.set_engine_state(EngineState::Stopped);
                self.transition(Event::Degraded, format!("engine: {error}; retrying in {:.1}s", delay.as_secs_f64()));
            }
        }
    }
}

/// Prepares the mounts in order, the first holding the engine's root; stops at the first error.
async fn prepare_all(settings: &VolumeSettings, mounts: &[VolumeMount], task_id: &str) -> PrepareOutcome {
    let mut prepared = vec![];
    for (i, m) in mounts.iter().enumerate() {
        match prepare_mount(settings, m, i == 0).await {
            Ok(mut p) => {
                p.task_id = task_id.to_string();
                info!(mount_path = %p.mount_path.display(), device = %p.device.display(), fs = %p.fs_type, formatted = p.formatted, grown = p.grown, mode = p.cache_mode.as_str(), uuid = ?p.fs_uuid, "volume ready");
                prepared.push(p);
            }
            Err(error) => return PrepareOutcome { prepared, error: Some(error) },
        }
    }
    PrepareOutcome { prepared, error: None }
}
