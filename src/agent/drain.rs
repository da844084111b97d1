//! The one way out: stop GC and the engine, let a prepare in flight finish,
//! release every mount (sync, fstrim, unmount, detach), report to the control
//! plane, and end in Stopped - all within the configured deadline.

use super::{Agent, AgentError, Input};
use crate::engine::{EngineState, StopOutcome};
use crate::lifecycle::Event;
use crate::observe::status::SharedVolume;
use crate::proto::v1 as pb;
use crate::volume::manager::{abandon_mount, release_mount_by};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

/// Part of the drain deadline kept for the shutdown report, so a slow engine
/// stop cannot starve the one message that tells the control plane what happened.
const SHUTDOWN_REPORT_RESERVE: Duration = Duration::from_secs(2);
/// A SIGKILLed process is gone in milliseconds; one in uninterruptible I/O may take seconds.
const LEFTOVER_KILL_WAIT: Duration = Duration::from_secs(10);

/// What the drain did, for the shutdown report and the exit code.
#[derive(Debug, Default)]
struct Drained {
    engine_stopped_cleanly: bool,
    unmounted: bool,
    trimmed_bytes: u64,
    /// A cache filesystem is known to hold errors.
    filesystem_dirty: bool,
    /// One line per problem; empty means a clean drain.
    errors: Vec<String>,
    /// Shared volumes unmapped and unlocked without a problem.
    released_volumes: Vec<SharedVolume>,
    /// Each primary mount's commit (or why there was none).
    commits: Vec<pb::VolumeCommit>,
    /// Clone and isolated volumes destroyed.
    destroyed_volumes: Vec<String>,
}

impl Agent {
    /// Stops the engine, reports shutdown, and ends in Stopped, all within the drain deadline.
    pub(super) async fn drain(mut self, reason: String, inputs: &mut mpsc::Receiver<Input>) -> Result<(), AgentError> {
        let started = Instant::now();
        let deadline = started + self.config.drain_timeout;
        self.transition(Event::DrainRequested, reason.clone());
        self.notifier.stopping();
        info!(reason = %reason, deadline_secs = self.config.drain_timeout.as_secs(), "draining");

        // No GC while the engine stops: a prune cut halfway helps nobody.
        if let Some(gc) = self.gc.take() {
            gc.abort();
        }
        // No canary writes while the volumes are released.
        if let Some(watch) = self.volume_watch.take() {
            watch.abort();
        }
        let mut drained = Drained { engine_stopped_cleanly: true, unmounted: true, ..Drained::default() };
        if let Some(why) = &self.cache_failing {
            drained.filesystem_dirty = true;
            drained.errors.push(why.clone());
        }
        self.stop_engine(deadline, &mut drained).await;
        self.wait_for_prepare(deadline, inputs, &mut drained).await;
        self.release_mounts(deadline, &mut drained).await;
        // What the drain released is no longer held: /readyz and a last health report say so.
        let released: Vec<std::path::PathBuf> = drained.released_volumes.iter().map(|v| v.mount_path.clone()).collect();
        self.status.send_modify(|s| {
            s.shared_volumes.retain(|v| !released.contains(&v.mount_path));
            s.cache_volumes.clear();
        });
        self.metrics.set_cache_volumes(&[]);
        self.report_shutdown(&reason, started, deadline, &drained).await;

        let elapsed = started.elapsed();
        if elapsed > self.config.drain_timeout {
            warn!(elapsed_ms = millis(elapsed), "drain overran its deadline");
        }
        self.transition(Event::Drained, reason);
        info!(elapsed_ms = millis(elapsed), "stopped");
        if drained.errors.is_empty() {
            Ok(())
        } else {
            Err(AgentError::DrainIncomplete(drained.errors.join("; ")))
        }
    }

    /// SIGTERM, the grace, SIGKILL; the report's reserve is kept out of the budget.
    async fn stop_engine(&mut self, deadline: Instant, drained: &mut Drained) {
        let budget = deadline.saturating_duration_since(Instant::now()).saturating_sub(SHUTDOWN_REPORT_RESERVE);
        let grace = self.config.engine.stop_grace.min(budget);
        let problem = match tokio::time::timeout(budget.max(grace), self.stop_engine_within(grace)).await {
            Ok(problem) => problem,
            Err(_) => {
                self.set_engine_state(EngineState::Stopped);
                Some("engine stop did not finish within the drain deadline".to_string())
            }
        };
        if let Some(problem) = problem {
            drained.engine_stopped_cleanly = false;
            drained.errors.push(problem);
        }
    }

    /// Stops the engine with SIGTERM, `grace`, SIGKILL, kills the build steps
    /// left in its cgroup, and removes the cgroup. Returns what went wrong, if anything.
    pub(super) async fn stop_engine_within(&mut self, grace: std::time::Duration) -> Option<String> {
        let mut problem = None;
        if let Some(engine) = self.engine.take() {
            self.set_engine_state(EngineState::Stopping);
            if engine.stop(grace).await == StopOutcome::Killed {
                problem = Some(format!("engine needed SIGKILL after {grace:?}"));
            }
            self.status.send_modify(|s| {
                s.engine = EngineState::Stopped;
                s.engine_pid = None;
            });
            self.metrics.engine_up.set(0);
        }
        if let Some(cgroup) = self.engine_cgroup.take() {
            // The engine's build steps outlive it (runc puts them in cgroups of their own):
            // left running they would keep the cache busy and write to it.
            match cgroup.kill_leftovers(LEFTOVER_KILL_WAIT).await {
                Ok(killed) if killed.is_empty() => {}
                Ok(killed) => warn!(pids = ?killed, "build steps left in the engine cgroup were killed"),
                Err(left) => problem = Some(format!("processes {left:?} still in the engine cgroup after SIGKILL")),
            }
            if let Err(error) = cgroup.remove() {
                warn!(%error, "engine cgroup left in place");
            }
        }
        self.engine_cgroup_watch.send_replace(None);
        problem
    }

    /// A prepare in flight finishes first: killing mkfs or mount halfway helps nobody.
    async fn wait_for_prepare(&mut self, deadline: Instant, inputs: &mut mpsc::Receiver<Input>, drained: &mut Drained) {
        while self.preparing {
            match tokio::time::timeout_at(deadline, inputs.recv()).await {
                Ok(Some(Input::VolumesPrepared(outcome))) => {
                    self.preparing = false;
                    self.mounts = outcome.prepared;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    drained.errors.push("volume preparation did not finish within the drain deadline; abandoned".to_string());
                    self.abandon_prepare(drained).await;
                    break;
                }
            }
        }
    }

    /// Stops the prepare where it is (dropping its task kills mkfs) and undoes
    /// what it did: nothing stays mounted or attached, and nothing is called clean.
    async fn abandon_prepare(&mut self, drained: &mut Drained) {
        if let Some(task) = self.prepare_task.take() {
            task.abort();
            // Aborted at its next await; wait for the drop (and mkfs's kill) before undoing.
            let _ = task.await;
        }
        self.preparing = false;
        drained.unmounted = false;
        let mounts = self.task.as_ref().map(|t| t.mounts.clone()).unwrap_or_default();
        // Not cut at the drain deadline: the wait for the prepare already used
        // it, and a loop device left attached would strand the volume. Every
        // step is bounded on its own (the unmount timeout, the tool timeouts),
        // and none blocks the runtime.
        for mount in mounts.iter().rev() {
            let report = abandon_mount(&self.config.volume, mount).await;
            drained.errors.extend(report.errors.iter().map(ToString::to_string));
        }
        warn!(mounts = mounts.len(), "abandoned the unfinished volume preparation; what it attached or mounted is undone");
    }

    /// Releases in reverse order of preparation, keeping the report's reserve:
    /// a flush or an unmount still running then is abandoned and reported,
    /// so systemd's SIGKILL never comes before the shutdown report.
    async fn release_mounts(&self, deadline: Instant, drained: &mut Drained) {
        let by = deadline.checked_sub(SHUTDOWN_REPORT_RESERVE).unwrap_or(deadline);
        for mount in self.mounts.iter().rev() {
            // Every blocking step inside is bounded by `by`; this bound is the backstop for the rest.
            let Ok(report) = tokio::time::timeout_at(by, release_mount_by(&self.config.volume, mount, by)).await else {
                drained.unmounted = false;
                drained
                    .errors
                    .push(format!("releasing {} did not finish within the drain deadline and was abandoned; left as it was", mount.mount_path.display()));
                continue;
            };
            if let (true, Some(shared)) = (report.unmounted && report.errors.is_empty(), SharedVolume::of(mount)) {
                drained.released_volumes.push(shared);
            }
            drained.unmounted &= report.unmounted;
            drained.trimmed_bytes += report.trimmed_bytes.unwrap_or(0);
            drained.filesystem_dirty |= report.dirty;
            drained.errors.extend(report.errors.iter().map(ToString::to_string));
            if let Some(commit) = report.commit {
                drained.commits.push(pb::VolumeCommit {
                    mount_path: mount.mount_path.display().to_string(),
                    source: commit.source,
                    copy: commit.copy.clone().unwrap_or_default(),
                    skipped: commit.copy.err().unwrap_or_default(),
                });
            }
            drained.destroyed_volumes.extend(report.destroyed);
        }
    }

    /// Tells the control plane what happened, with whatever time the deadline has left.
    async fn report_shutdown(&self, reason: &str, started: Instant, deadline: Instant, drained: &Drained) {
        let session = self.session.borrow().clone();
        let (Some(control), Some(session)) = (&self.control, session) else { return };
        let report = pb::ShutdownReport {
            machine_id: session.machine_id.clone(),
            task_id: self.task.as_ref().map(|t| t.id.clone()).unwrap_or_default(),
            reason: reason.into(),
            unmounted: drained.unmounted,
            errors: drained.errors.clone(),
            drain_duration_ms: millis(started.elapsed()),
            engine_stopped_cleanly: drained.engine_stopped_cleanly,
            trimmed_bytes: drained.trimmed_bytes,
            filesystem_dirty: drained.filesystem_dirty,
            released_volumes: drained.released_volumes.iter().map(pb::SharedVolume::from).collect(),
            commits: drained.commits.clone(),
            destroyed_volumes: drained.destroyed_volumes.clone(),
        };
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(500));
        match control.report_shutdown(report, &session, left).await {
            Ok(()) => info!("shutdown reported to the control plane"),
            Err(error) => warn!(%error, "shutdown report not delivered"),
        }
    }
}

/// Whole milliseconds, saturating (a drain never lasts 584 million years).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
