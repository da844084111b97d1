//! From an accepted task to a supervised engine: the task's mounts are
//! prepared off the main loop (waiting for a device or formatting a large disk
//! must not stop the agent from answering signals and the control plane), and
//! the engine starts when every mount is ready.

use super::{forward, Agent, Input};
use crate::engine::EngineState;
use crate::lifecycle::Event;
use crate::task::{BuildkitTask, VolumeMount};
use crate::volume::manager::{prepare_mount, PreparedMount, VolumeError, VolumeSettings};
use std::path::PathBuf;
use tokio::sync::mpsc;
use tracing::{error, info, Instrument};

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
        self.preparing = true;
        let (settings, mounts, inputs) = (self.config.volume.clone(), task.mounts.clone(), self.inputs.clone());
        let prepare = async move {
            let outcome = prepare_all(&settings, &mounts).await;
            let _ = inputs.send(Input::VolumesPrepared(outcome)).await;
        };
        tokio::spawn(prepare.instrument(tracing::info_span!("volume")));
        self.task = Some(task);
    }

    /// The prepare ended: start the engine, or say why not.
    pub(super) fn on_volumes_prepared(&mut self, outcome: PrepareOutcome) {
        self.preparing = false;
        self.mounts = outcome.prepared;
        match (outcome.error, self.task.clone()) {
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
}

/// Prepares the mounts in order, the first holding the engine's root; stops at the first error.
async fn prepare_all(settings: &VolumeSettings, mounts: &[VolumeMount]) -> PrepareOutcome {
    let mut prepared = vec![];
    for (i, m) in mounts.iter().enumerate() {
        match prepare_mount(settings, m, i == 0).await {
            Ok(p) => {
                info!(mount_path = %p.mount_path.display(), device = %p.device.display(), fs = %p.fs_type, formatted = p.formatted, grown = p.grown, "volume ready");
                prepared.push(p);
            }
            Err(error) => return PrepareOutcome { prepared, error: Some(error) },
        }
    }
    PrepareOutcome { prepared, error: None }
}
