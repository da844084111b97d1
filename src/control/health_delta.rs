//! Delta health reports (`HealthReporting.deltas`): which fields of a
//! report differ from what the control plane already holds, and how a
//! delta applies to that state. Pure: the health stream decides when a
//! report goes out, this decides what it carries.
//!
//! The agent keeps the state the control plane holds by applying each report
//! it sends with [`apply`], the same function the control-plane double uses
//! to rebuild the state, so both sides agree by construction.
//!
//! Figures that move all the time (host CPU, memory, load; the engine's CPU
//! and memory; free bytes and inodes) count as changed only when they moved
//! by more than [`Thresholds`] from the value the control plane holds, so an
//! idle machine sends nothing but its heartbeat.

use crate::proto::v1 as pb;

/// How far a moving figure must go before it is worth a report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// CPU utilisation, in percentage points of the whole host (or, for the
    /// engine, of one core per host CPU); load averages by the same share of
    /// the CPU count.
    pub cpu_percent: f64,
    /// Memory, swap, free bytes and free inodes, in percent of their total.
    pub bytes_percent: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self { cpu_percent: 10.0, bytes_percent: 1.0 }
    }
}

/// The state fields of a HealthReport, by proto field number. Everything else
/// is framing (machine_id, unix_time_ms, sequence, delta, changed_fields,
/// snapshot_request) or an event list (oom_kills, step_records), which every
/// report carries as it is.
pub const STATE_FIELDS: [u32; 18] = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 21, 40, 41, 42, 50, 60, 71, 72];

/// The delta from `held` (what the control plane holds) to `next`: framing and
/// event lists from `next`, and the state fields that changed.
pub fn delta(held: &pb::HealthReport, next: &pb::HealthReport, thresholds: Thresholds) -> pb::HealthReport {
    let changed = changed_fields(held, next, thresholds);
    let mut report = pb::HealthReport {
        machine_id: next.machine_id.clone(),
        unix_time_ms: next.unix_time_ms,
        oom_kills: next.oom_kills.clone(),
        step_records: next.step_records.clone(),
        delta: true,
        ..Default::default()
    };
    for &field in &changed {
        copy_field(&mut report, next, field);
    }
    report.changed_fields = changed;
    report
}

/// A delta with nothing in it: no state changed and no event to deliver.
pub fn is_empty(report: &pb::HealthReport) -> bool {
    report.delta && report.changed_fields.is_empty() && report.oom_kills.is_empty() && report.step_records.is_empty()
}

/// Applies `report` to `held`: a full report replaces it, a delta overwrites
/// the fields it lists. The event lists are not state and are left empty.
/// Field numbers this build does not know are skipped (a newer agent's).
pub fn apply(held: &mut pb::HealthReport, report: &pb::HealthReport) {
    if report.delta {
        for &field in &report.changed_fields {
            copy_field(held, report, field);
        }
        held.machine_id.clone_from(&report.machine_id);
        held.unix_time_ms = report.unix_time_ms;
        held.sequence = report.sequence;
    } else {
        *held = pb::HealthReport { oom_kills: Vec::new(), step_records: Vec::new(), ..report.clone() };
    }
    held.delta = false;
    held.changed_fields.clear();
}

/// The state fields in which `next` differs from `held`, moving figures only
/// past their thresholds.
pub fn changed_fields(held: &pb::HealthReport, next: &pb::HealthReport, thresholds: Thresholds) -> Vec<u32> {
    let cpus = next.host.as_ref().map_or(1, |h| h.cpus.max(1));
    let memory_total = next.host.as_ref().map_or(0, |h| h.memory_total_bytes);
    STATE_FIELDS
        .into_iter()
        .filter(|&field| match field {
            6 => mounts_moved(&held.mounts, &next.mounts, thresholds),
            10 => host_moved(held.host.as_ref(), next.host.as_ref(), thresholds),
            11 => engine_moved(held.engine_resources.as_ref(), next.engine_resources.as_ref(), cpus, memory_total, thresholds),
            _ => {
                let mut probe = held.clone();
                copy_field(&mut probe, next, field);
                probe != *held
            }
        })
        .collect()
}

/// Copies one state field, by number, from `from` to `to`.
fn copy_field(to: &mut pb::HealthReport, from: &pb::HealthReport, field: u32) {
    match field {
        3 => to.agent_state = from.agent_state,
        4 => to.state_reason.clone_from(&from.state_reason),
        5 => to.engine_state = from.engine_state,
        6 => to.mounts.clone_from(&from.mounts),
        7 => to.task_id.clone_from(&from.task_id),
        8 => to.engine_restarts = from.engine_restarts,
        9 => to.engine_last_exit.clone_from(&from.engine_last_exit),
        10 => to.host.clone_from(&from.host),
        11 => to.engine_resources.clone_from(&from.engine_resources),
        12 => to.engine_adopted = from.engine_adopted,
        21 => to.oom_kills_total = from.oom_kills_total,
        40 => to.task_conflict.clone_from(&from.task_conflict),
        41 => to.tasks_rejected_total = from.tasks_rejected_total,
        42 => to.last_task_rejection.clone_from(&from.last_task_rejection),
        50 => to.shared_volumes.clone_from(&from.shared_volumes),
        60 => to.cache_reset.clone_from(&from.cache_reset),
        71 => to.step_records_dropped_total = from.step_records_dropped_total,
        72 => to.devices.clone_from(&from.devices),
        _ => {}
    }
}

/// `a` and `b` differ by more than `percent` of `total` (any change when the
/// total is unknown).
fn moved_bytes(a: u64, b: u64, total: u64, percent: f64) -> bool {
    if total == 0 {
        return a != b;
    }
    a.abs_diff(b) as f64 > total as f64 * percent / 100.0
}

fn moved_share(a: f64, b: f64, scale: f64, percent: f64) -> bool {
    (a - b).abs() > scale * percent / 100.0
}

fn host_moved(held: Option<&pb::HostResources>, next: Option<&pb::HostResources>, t: Thresholds) -> bool {
    let (a, b) = match (held, next) {
        (Some(a), Some(b)) => (a, b),
        (a, b) => return a.is_some() != b.is_some(),
    };
    let cpus = f64::from(b.cpus.max(1));
    a.cpus != b.cpus
        || a.memory_total_bytes != b.memory_total_bytes
        || a.swap_total_bytes != b.swap_total_bytes
        || moved_share(a.cpu_utilisation, b.cpu_utilisation, 1.0, t.cpu_percent)
        || moved_share(a.load_1, b.load_1, cpus, t.cpu_percent)
        || moved_bytes(a.memory_available_bytes, b.memory_available_bytes, b.memory_total_bytes, t.bytes_percent)
        || moved_bytes(a.memory_used_bytes, b.memory_used_bytes, b.memory_total_bytes, t.bytes_percent)
        || moved_bytes(a.swap_used_bytes, b.swap_used_bytes, b.swap_total_bytes, t.bytes_percent)
}

fn engine_moved(held: Option<&pb::EngineResources>, next: Option<&pb::EngineResources>, cpus: u32, memory_total: u64, t: Thresholds) -> bool {
    let (a, b) = match (held, next) {
        (Some(a), Some(b)) => (a, b),
        (a, b) => return a.is_some() != b.is_some(),
    };
    a.pid != b.pid
        || a.processes != b.processes
        || moved_share(a.cpu_utilisation, b.cpu_utilisation, f64::from(cpus), t.cpu_percent)
        || moved_bytes(a.rss_bytes, b.rss_bytes, memory_total, t.bytes_percent)
}

fn mounts_moved(held: &[pb::MountStats], next: &[pb::MountStats], t: Thresholds) -> bool {
    held.len() != next.len()
        || held.iter().zip(next).any(|(a, b)| {
            a.path != b.path
                || a.total_bytes != b.total_bytes
                || a.total_inodes != b.total_inodes
                || a.cache_mode != b.cache_mode
                || a.volume_kind != b.volume_kind
                || a.filesystem_uuid != b.filesystem_uuid
                || moved_bytes(a.free_bytes, b.free_bytes, b.total_bytes, t.bytes_percent)
                || moved_bytes(a.free_inodes, b.free_inodes, b.total_inodes, t.bytes_percent)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// A report with every field set to something other than its default.
    fn everything() -> pb::HealthReport {
        pb::HealthReport {
            machine_id: "m-1".into(),
            unix_time_ms: 1_700_000_000_000,
            agent_state: pb::AgentState::Ready as i32,
            state_reason: "why".into(),
            engine_state: pb::EngineState::Running as i32,
            mounts: vec![pb::MountStats {
                path: "/cache".into(),
                total_bytes: 100 << 30,
                free_bytes: 50 << 30,
                total_inodes: 1000,
                free_inodes: 900,
                ..Default::default()
            }],
            task_id: "task-1".into(),
            engine_restarts: 2,
            engine_last_exit: "killed by signal 9 (SIGKILL)".into(),
            host: Some(pb::HostResources { cpu_utilisation: 0.5, cpus: 2, memory_total_bytes: 24 << 30, memory_used_bytes: 1 << 30, ..Default::default() }),
            engine_resources: Some(pb::EngineResources { pid: 42, processes: 3, rss_bytes: 100 << 20, ..Default::default() }),
            engine_adopted: true,
            oom_kills: vec![pb::OomKill { id: 7, ..Default::default() }],
            oom_kills_total: 1,
            task_conflict: Some(pb::TaskConflict { task_id: "task-1".into(), count: 1, ..Default::default() }),
            tasks_rejected_total: 3,
            last_task_rejection: "bad".into(),
            shared_volumes: vec![pb::SharedVolume { image: "rbd/cache".into(), ..Default::default() }],
            cache_reset: Some(pb::CacheResetResult { request_id: "r".into(), ..Default::default() }),
            step_records: vec![pb::StepRecord { container_id: "c".into(), ..Default::default() }],
            step_records_dropped_total: 4,
            devices: vec!["vendor.example/thing=one".into()],
            sequence: 9,
            delta: false,
            changed_fields: Vec::new(),
            snapshot_request: 1,
        }
    }

    fn state_of(report: &pb::HealthReport) -> pb::HealthReport {
        let mut held = pb::HealthReport::default();
        apply(&mut held, report);
        held
    }

    #[test]
    fn a_delta_from_nothing_to_everything_rebuilds_every_state_field() {
        // Fails when a new state field is added to the proto but not to STATE_FIELDS and copy_field.
        let next = everything();
        let d = delta(&pb::HealthReport::default(), &next, Thresholds::default());
        assert_eq!(d.changed_fields, STATE_FIELDS.to_vec());
        let mut held = pb::HealthReport::default();
        apply(&mut held, &pb::HealthReport { sequence: next.sequence, ..d });
        let want = pb::HealthReport { snapshot_request: 0, ..state_of(&next) };
        assert_eq!(held, want);
    }

    #[test]
    fn an_unchanged_state_gives_an_empty_delta_and_events_still_travel() {
        let next = everything();
        let held = state_of(&next);
        let d = delta(&held, &next, Thresholds::default());
        assert!(d.changed_fields.is_empty());
        assert_eq!(d.oom_kills.len(), 1, "an OOM kill is an event, sent whatever changed");
        assert!(!is_empty(&d));
        let quiet = delta(&held, &pb::HealthReport { oom_kills: vec![], step_records: vec![], ..next }, Thresholds::default());
        assert!(is_empty(&quiet));
        assert!(quiet.encoded_len() < 40, "an empty delta is a few bytes: {}", quiet.encoded_len());
    }

    #[test]
    fn a_field_reset_to_its_default_is_listed_and_applies_as_a_reset() {
        let before = everything();
        let held = state_of(&before);
        let next = pb::HealthReport { state_reason: String::new(), engine_resources: None, cache_reset: None, ..before };
        let d = delta(&held, &next, Thresholds::default());
        assert_eq!(d.changed_fields, vec![4, 11, 60]);
        let mut rebuilt = held.clone();
        apply(&mut rebuilt, &d);
        assert_eq!(rebuilt.state_reason, "");
        assert_eq!(rebuilt.engine_resources, None);
        assert_eq!(rebuilt.cache_reset, None);
        assert_eq!(rebuilt.task_id, "task-1", "what was not listed stays");
    }

    #[test]
    fn moving_figures_count_only_past_their_threshold_against_what_was_sent() {
        let base = everything();
        let held = state_of(&base);
        let mut next = base.clone();
        let host = next.host.as_mut().unwrap();
        host.cpu_utilisation = 0.55; // 5 points: under 10
        host.memory_used_bytes += 100 << 20; // 0.4% of 24 GiB: under 1%
        next.mounts[0].free_bytes -= 500 << 20; // 0.5% of 100 GiB
        assert!(changed_fields(&held, &next, Thresholds::default()).is_empty());
        // Small steps add up: each is compared with what the control plane holds, not the last sample.
        next.mounts[0].free_bytes -= 600 << 20;
        assert_eq!(changed_fields(&held, &next, Thresholds::default()), vec![6]);
        next.host.as_mut().unwrap().cpu_utilisation = 0.65;
        assert_eq!(changed_fields(&held, &next, Thresholds::default()), vec![6, 10]);
        next.engine_resources.as_mut().unwrap().pid = 43;
        assert_eq!(changed_fields(&held, &next, Thresholds::default()), vec![6, 10, 11], "a new engine pid is a change whatever its figures");
    }

    #[test]
    fn unknown_field_numbers_in_a_delta_are_skipped() {
        let held = state_of(&everything());
        let mut rebuilt = held.clone();
        apply(&mut rebuilt, &pb::HealthReport { delta: true, changed_fields: vec![999], machine_id: "m-1".into(), sequence: 10, ..Default::default() });
        assert_eq!(rebuilt, pb::HealthReport { sequence: 10, unix_time_ms: 0, ..held });
    }
}
