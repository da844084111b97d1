//! What the agent publishes about itself: one snapshot in a watch channel,
//! written only by the agent's main loop and copied by every reader (/readyz,
//! the health and usage streams, the OOM watcher, the sampler).
//!
//! It lives here, above `engine` and `volume` whose states and figures it
//! carries and below `control` and `gc` which read it, so no capability has to
//! reach up into the agent for it.

use super::oom_watch::OomKill;
use super::sampler::Sample;
use super::steps::StepRecord;
use crate::engine::EngineState;
use crate::lifecycle::State;
use crate::proto::v1 as pb;
use crate::volume::manager::PreparedMount;
use crate::volume::stats::FsStats;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use tokio::time::Instant;

/// GC runs kept for the usage report (one a minute, a run a minute: plenty).
pub const RECENT_GC_RUNS: usize = 16;
/// OOM kills kept for /readyz and for health streams that were down when they
/// happened; a storm beyond this is still counted in the total and the metric.
pub const RECENT_OOM_KILLS: usize = 32;
/// Finished build steps kept for health streams that were down when they
/// ended (and for /readyz), unless the config says otherwise: at about 200
/// bytes each, 1024 is 200 KiB, and over an hour of steps on a busy builder.
pub const DEFAULT_STEP_RECORDS: usize = 1024;

/// One watched filesystem's figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountFigures {
    pub path: PathBuf,
    pub stats: FsStats,
}

/// A shared cache volume (a Ceph RBD image) the agent holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SharedVolume {
    pub mount_path: PathBuf,
    /// `pool/image` or `pool/namespace/image`.
    pub image: String,
    /// `krbd`, `nbd` or `fuse`.
    pub mapper: &'static str,
    pub owner_id: String,
    pub took_over_from: Option<String>,
    pub created: bool,
}

impl SharedVolume {
    /// The shared volume under a prepared mount, if it is one.
    pub fn of(mount: &PreparedMount) -> Option<Self> {
        let rbd = mount.rbd.as_ref()?;
        Some(Self {
            mount_path: mount.mount_path.clone(),
            image: rbd.image.spec(),
            mapper: rbd.mapper.as_str(),
            owner_id: rbd.owner_id.clone(),
            took_over_from: rbd.took_over_from.clone(),
            created: rbd.created,
        })
    }
}

/// A prepared cache mount as the reports name it: its mode, kind and filesystem.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CacheVolume {
    pub mount_path: PathBuf,
    /// `primary`, `clone` or `isolated`.
    pub mode: &'static str,
    /// `device`, `file` or `rbd`.
    pub kind: &'static str,
    pub filesystem_uuid: Option<String>,
}

impl CacheVolume {
    pub fn of(mount: &PreparedMount) -> Self {
        Self { mount_path: mount.mount_path.clone(), mode: mount.cache_mode.as_str(), kind: mount.kind, filesystem_uuid: mount.fs_uuid.clone() }
    }
}

/// A task the control plane re-sent under the running task's id with other
/// content: which fields differed the last time, and how often it happened.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TaskConflict {
    pub task_id: String,
    pub differing_fields: Vec<String>,
    pub count: u64,
    pub last_unix_time_ms: i64,
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
    /// The running engine was started by an agent before this one, and adopted.
    pub engine_adopted: bool,
    /// Engine exits since the task started (each one was followed by a restart).
    pub engine_restarts: u64,
    /// How the engine last exited, for /readyz and the health stream.
    pub engine_last_exit: Option<String>,
    /// The CDI devices the engine's worker listed when it last became ready.
    pub engine_devices: Vec<String>,
    /// The last GC runs (at most RECENT_GC_RUNS), oldest first.
    pub recent_gc: VecDeque<pb::GcRunReport>,
    /// GC runs since the agent started: the number of the newest in `recent_gc`.
    pub gc_runs: u64,
    /// The last OOM kills on this host (at most RECENT_OOM_KILLS), oldest first.
    pub recent_ooms: VecDeque<OomKill>,
    /// Entries ever added to `recent_ooms`: the number of the newest.
    pub oom_entries: u64,
    /// Kills those entries stand for (an unattributed entry may be several).
    pub oom_kills_total: u64,
    /// The last finished build steps (at most `step_capacity`), oldest first.
    pub recent_steps: VecDeque<StepRecord>,
    /// Steps ever added to `recent_steps`: the number of the newest.
    pub step_entries: u64,
    /// How many `recent_steps` keeps.
    pub step_capacity: usize,
    /// The newest sample of the host and the engine's process tree.
    pub resources: Option<Sample>,
    pub task_id: Option<String>,
    /// Why the agent is not registered with the control plane (the last
    /// registration failure); None while registered, and in standalone mode.
    pub control_plane_error: Option<String>,
    /// Filesystems whose figures the health stream carries.
    pub watched_paths: Vec<PathBuf>,
    /// Their figures as the sampler last read them: the one statvfs per tick
    /// that health reports, usage reports, /readyz and the metrics share.
    pub mounts: Vec<MountFigures>,
    /// The cache volume's mount point, once a task names it.
    pub cache_mount: Option<PathBuf>,
    /// The RBD images the prepared mounts sit on.
    pub shared_volumes: Vec<SharedVolume>,
    /// The prepared cache mounts: mode, kind, filesystem UUID.
    pub cache_volumes: Vec<CacheVolume>,
    /// The last cache reset's result.
    pub cache_reset: Option<pb::CacheResetResult>,
    /// The last task re-sent under the running task's id with other content.
    pub task_conflict: Option<TaskConflict>,
    /// Task messages that failed validation since the agent started.
    pub tasks_rejected: u64,
    /// Why the last one failed.
    pub last_task_rejection: Option<String>,
    pub since: Instant,
}

impl Status {
    /// Starting, nothing known yet; the state dir is the first filesystem watched.
    pub fn initial(state_dir: &Path) -> Self {
        Self {
            state: State::Starting,
            reason: String::new(),
            engine: EngineState::NotStarted,
            engine_pid: None,
            engine_adopted: false,
            engine_restarts: 0,
            engine_last_exit: None,
            engine_devices: vec![],
            recent_gc: VecDeque::new(),
            gc_runs: 0,
            recent_ooms: VecDeque::new(),
            oom_entries: 0,
            oom_kills_total: 0,
            recent_steps: VecDeque::new(),
            step_entries: 0,
            step_capacity: DEFAULT_STEP_RECORDS,
            resources: None,
            task_id: None,
            control_plane_error: None,
            watched_paths: vec![state_dir.to_path_buf()],
            mounts: vec![],
            cache_mount: None,
            shared_volumes: vec![],
            cache_volumes: vec![],
            cache_reset: None,
            task_conflict: None,
            tasks_rejected: 0,
            last_task_rejection: None,
            since: Instant::now(),
        }
    }

    /// The kills recorded after the first `sent` entries, oldest first; those
    /// pushed out of `recent_ooms` meanwhile are gone (and counted in the total).
    pub fn oom_kills_after(&self, sent: u64) -> impl Iterator<Item = &OomKill> {
        let unsent = usize::try_from(self.oom_entries.saturating_sub(sent)).unwrap_or(usize::MAX);
        self.recent_ooms.iter().skip(self.recent_ooms.len().saturating_sub(unsent))
    }

    /// The steps recorded after the first `sent`, oldest first; those pushed
    /// out of `recent_steps` meanwhile are gone (see `StepDelivery`).
    pub fn steps_after(&self, sent: u64) -> impl Iterator<Item = &StepRecord> {
        let unsent = usize::try_from(self.step_entries.saturating_sub(sent)).unwrap_or(usize::MAX);
        self.recent_steps.iter().skip(self.recent_steps.len().saturating_sub(unsent))
    }

    /// Adds a finished step, forgetting the oldest beyond `step_capacity`.
    pub fn record_step(&mut self, record: StepRecord) {
        self.step_entries += 1;
        self.recent_steps.push_back(record);
        while self.recent_steps.len() > self.step_capacity {
            self.recent_steps.pop_front();
        }
    }

    /// The figures of a watched filesystem for the wire, named with the cache
    /// mode, kind and UUID when it is a prepared cache mount.
    pub fn mount_stats(&self, figures: &MountFigures) -> pb::MountStats {
        let mut stats = pb::MountStats::from(figures);
        if let Some(v) = self.cache_volumes.iter().find(|v| v.mount_path == figures.path) {
            stats.cache_mode = v.mode.into();
            stats.volume_kind = v.kind.into();
            stats.filesystem_uuid = v.filesystem_uuid.clone().unwrap_or_default();
        }
        stats
    }

    /// The figures of the filesystem watched at `path`, if the last tick read it.
    pub fn mount(&self, path: &Path) -> Option<&MountFigures> {
        self.mounts.iter().find(|m| m.path == path)
    }

    /// Adds a finished GC run, forgetting the oldest beyond [`RECENT_GC_RUNS`].
    pub fn record_gc_run(&mut self, report: pb::GcRunReport) {
        self.gc_runs += 1;
        self.recent_gc.push_back(report);
        while self.recent_gc.len() > RECENT_GC_RUNS {
            self.recent_gc.pop_front();
        }
    }

    /// Counts a conflicting task under `task_id`; the newest differences are kept.
    pub fn record_task_conflict(&mut self, task_id: &str, differing_fields: Vec<String>, unix_time_ms: i64) {
        let count = match &self.task_conflict {
            Some(c) if c.task_id == task_id => c.count + 1,
            _ => 1,
        };
        self.task_conflict = Some(TaskConflict { task_id: task_id.to_owned(), differing_fields, count, last_unix_time_ms: unix_time_ms });
    }

    /// Counts a rejected task message and keeps why.
    pub fn record_task_rejection(&mut self, reason: String) {
        self.tasks_rejected += 1;
        self.last_task_rejection = Some(reason);
    }

    /// Adds an OOM kill, forgetting the oldest beyond [`RECENT_OOM_KILLS`].
    pub fn record_oom_kill(&mut self, kill: OomKill) {
        self.oom_entries += 1;
        self.oom_kills_total += kill.count;
        self.recent_ooms.push_back(kill);
        while self.recent_ooms.len() > RECENT_OOM_KILLS {
            self.recent_ooms.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::steps::{build_record, StepFigures};

    #[test]
    fn steps_after_a_cursor_are_the_unsent_ones_still_kept() {
        let mut status = Status::initial(Path::new("/var/lib/machine-agent"));
        status.step_capacity = 3;
        for i in 0..5 {
            status.record_step(build_record(&format!("s{i}"), 0, 1, StepFigures::default()));
        }
        assert_eq!(status.step_entries, 5);
        let ids = |sent| status.steps_after(sent).map(|r| r.container_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(0), ["s2", "s3", "s4"], "the two oldest were dropped");
        assert_eq!(ids(3), ["s3", "s4"]);
        assert_eq!(ids(5), Vec::<String>::new());
    }
}
