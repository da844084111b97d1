//! The sampler's loop: every interval, one sample of the host and the engine's
//! process tree and one statvfs of each watched filesystem. The gauges are set
//! here; the agent's main loop puts the tick into the status snapshot, where
//! health reports, usage reports and /readyz read it.

use super::liveness::Heartbeat;
use super::metrics::Metrics;
use super::sampler::{EngineTarget, Sample, Sampler};
use super::status::{MountFigures, Status};
use crate::engine::cgroup::EngineCgroup;
use crate::volume::stats::read_fs_stats;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::debug;

/// What one tick saw.
#[derive(Debug, Clone)]
pub struct Tick {
    pub sample: Sample,
    /// Every watched filesystem that could be read, in the order watched.
    pub mounts: Vec<MountFigures>,
}

/// Everything the loop needs, moved into its task.
#[derive(Debug)]
pub struct SampleLoop {
    pub interval: Duration,
    /// The engine's pid and the filesystems to watch come from here.
    pub status: watch::Receiver<Status>,
    pub engine_cgroup: watch::Receiver<Option<EngineCgroup>>,
    pub metrics: Metrics,
    pub heartbeat: Heartbeat,
    pub ticks: mpsc::Sender<Tick>,
}

impl SampleLoop {
    /// Runs until the receiver of the ticks goes away.
    pub async fn run(self) {
        let mut sampler = Sampler::new();
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.heartbeat.beat();
            let (engine_pid, watched) = {
                let s = self.status.borrow();
                (s.engine_pid, s.watched_paths.clone())
            };
            let target = engine_pid.map(|pid| EngineTarget { pid, cgroup_dirs: self.engine_cgroup.borrow().iter().map(|c| c.dir.clone()).collect() });
            // /proc reads of a few dozen files and a statvfs per mount: short enough for the runtime's thread.
            let sample = sampler.sample(target.as_ref());
            self.metrics.record_sample(&sample);
            let mounts = read_mounts(&watched);
            self.metrics.record_mounts(&mounts);
            if self.ticks.send(Tick { sample, mounts }).await.is_err() {
                return;
            }
        }
    }
}

/// The figures of each path that can be read; one that cannot is left out.
pub fn read_mounts(paths: &[std::path::PathBuf]) -> Vec<MountFigures> {
    paths
        .iter()
        .filter_map(|path| match read_fs_stats(path) {
            Ok(stats) => Some(MountFigures { path: path.clone(), stats }),
            Err(error) => {
                debug!(%error, "skipping a watched filesystem this tick");
                None
            }
        })
        .collect()
}
