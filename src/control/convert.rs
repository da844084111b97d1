//! The agent's own types as the protocol carries them: one `From` per message,
//! so every report that sends a state, a sample, an OOM kill or a mount's
//! figures sends it the same way.

use crate::engine::EngineState;
use crate::lifecycle::State;
use crate::observe::oom_watch::OomKill;
use crate::observe::sampler::{EngineSample, HostSample};
use crate::observe::status::{MountFigures, SharedVolume, TaskConflict};
use crate::observe::steps::StepRecord;
use crate::proto::v1 as pb;

impl From<State> for pb::AgentState {
    fn from(state: State) -> Self {
        match state {
            State::Starting => Self::Starting,
            State::Registering => Self::Registering,
            State::Pending => Self::Pending,
            State::Preparing => Self::Preparing,
            State::StartingEngine => Self::StartingEngine,
            State::Ready => Self::Ready,
            State::Degraded => Self::Degraded,
            State::Draining => Self::Draining,
            State::Stopped => Self::Stopped,
        }
    }
}

impl From<EngineState> for pb::EngineState {
    fn from(engine: EngineState) -> Self {
        match engine {
            EngineState::NotStarted => Self::NotStarted,
            EngineState::Starting => Self::Starting,
            EngineState::Running => Self::Running,
            EngineState::Restarting => Self::Restarting,
            EngineState::Stopping => Self::Stopping,
            EngineState::Stopped => Self::Stopped,
        }
    }
}

impl From<&MountFigures> for pb::MountStats {
    fn from(m: &MountFigures) -> Self {
        Self {
            path: m.path.display().to_string(),
            total_bytes: m.stats.total_bytes,
            free_bytes: m.stats.free_bytes,
            total_inodes: m.stats.total_inodes,
            free_inodes: m.stats.free_inodes,
            ..Self::default()
        }
    }
}

impl From<&HostSample> for pb::HostResources {
    fn from(h: &HostSample) -> Self {
        Self {
            cpu_utilisation: h.cpu_utilisation,
            cpus: h.cpus,
            load_1: h.load_1,
            load_5: h.load_5,
            load_15: h.load_15,
            memory_total_bytes: h.memory_total_bytes,
            memory_available_bytes: h.memory_available_bytes,
            memory_used_bytes: h.memory_used_bytes,
            swap_total_bytes: h.swap_total_bytes,
            swap_used_bytes: h.swap_used_bytes,
        }
    }
}

impl From<&EngineSample> for pb::EngineResources {
    fn from(e: &EngineSample) -> Self {
        Self { pid: e.pid, processes: e.processes, rss_bytes: e.rss_bytes, cpu_seconds_total: e.cpu_seconds_total, cpu_utilisation: e.cpu_utilisation }
    }
}

impl From<&SharedVolume> for pb::SharedVolume {
    fn from(v: &SharedVolume) -> Self {
        Self {
            mount_path: v.mount_path.display().to_string(),
            image: v.image.clone(),
            mapper: v.mapper.into(),
            owner_id: v.owner_id.clone(),
            took_over_from: v.took_over_from.clone().unwrap_or_default(),
            created: v.created,
        }
    }
}

impl From<&TaskConflict> for pb::TaskConflict {
    fn from(c: &TaskConflict) -> Self {
        Self { task_id: c.task_id.clone(), differing_fields: c.differing_fields.clone(), count: c.count, last_unix_time_ms: c.last_unix_time_ms }
    }
}

/// As the health stream carries it.
impl From<&StepRecord> for pb::StepRecord {
    fn from(r: &StepRecord) -> Self {
        Self {
            container_id: r.container_id.clone(),
            first_seen_unix_ms: r.first_seen_unix_ms,
            last_seen_unix_ms: r.last_seen_unix_ms,
            cpu_seconds: r.cpu_seconds,
            peak_memory_bytes: r.peak_memory_bytes,
            io_read_bytes: r.io_read_bytes,
            io_write_bytes: r.io_write_bytes,
            oom_killed: r.oom_killed,
            oom_kill_id: r.oom_kill_id.unwrap_or_default(),
            build_ref: r.build_ref.clone().unwrap_or_default(),
            overlapping_build_refs: r.overlapping_build_refs.clone(),
        }
    }
}

/// As the health stream carries it.
impl From<&OomKill> for pb::OomKill {
    fn from(kill: &OomKill) -> Self {
        use pb::OomAttribution as A;
        let attribution = match kill.attribution {
            "engine" => A::Engine,
            "build_step" => A::BuildStep,
            "other" => A::Other,
            "unknown" => A::Unknown,
            "unattributed" => A::Unattributed,
            _ => A::Unspecified,
        };
        Self {
            id: kill.id,
            unix_time_ms: kill.unix_time_ms,
            attribution: attribution as i32,
            container_id: kill.container_id.clone().unwrap_or_default(),
            pid: kill.pid.unwrap_or_default(),
            process_name: kill.process_name.clone().unwrap_or_default(),
            scope: kill.scope.unwrap_or_default().into(),
            task_memcg: kill.task_memcg.clone().unwrap_or_default(),
            oom_memcg: kill.oom_memcg.clone().unwrap_or_default(),
            total_vm_bytes: kill.total_vm_bytes.unwrap_or_default(),
            anon_rss_bytes: kill.anon_rss_bytes.unwrap_or_default(),
            file_rss_bytes: kill.file_rss_bytes.unwrap_or_default(),
            shmem_rss_bytes: kill.shmem_rss_bytes.unwrap_or_default(),
            count: kill.count,
        }
    }
}
