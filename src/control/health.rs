//! The health stream: one report per interval on a client stream, reopened with
//! backoff whenever it breaks. The control plane answers the call only to say
//! `should_terminate`; that answer becomes a drain request.
//!
//! The loop ticks (and beats its heartbeat) whether or not the stream is open:
//! reports that cannot be sent during an outage are dropped, never queued, so
//! memory stays flat and the first report after a reconnect is current.
//!
//! A report also goes out at once, without waiting for the tick, when the
//! stream opens and whenever what the control plane schedules by changes
//! ([`StateMark`]: the agent's or the engine's state, an OOM kill, a cache
//! reset's result...). Changes within [`COALESCE`] of each other go in one
//! report. Figures that move all the time (CPU, memory, free bytes) wait for
//! the tick.

use super::health_delta::{self, Thresholds};
use super::{ControlError, ControlEvent, ControlPlane, Session};
use crate::clock::unix_time_ms;
use crate::observe::liveness::Heartbeat;
use crate::observe::status::Status;
use crate::proto::v1 as pb;
use prost::Message;
use rand::SeedableRng;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

/// A couple of reports may wait while HTTP/2 flow control catches up; more
/// than that means the stream is stuck, and a stale report is worth nothing.
const QUEUED_REPORTS: usize = 2;
/// Changes this close together (an engine exit and its restart, a state and
/// its reason) travel in one report.
pub const COALESCE: Duration = Duration::from_millis(5);

/// What the control plane acts on, as of one status: a report is sent as
/// soon as it differs from the last one sent. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateMark {
    state: crate::lifecycle::State,
    reason: String,
    engine: crate::engine::EngineState,
    engine_pid: Option<u32>,
    engine_restarts: u64,
    oom_entries: u64,
    task_id: Option<String>,
    tasks_rejected: u64,
    cache_reset: Option<String>,
    shared_volumes: usize,
}

impl StateMark {
    pub fn of(status: &Status) -> Self {
        Self {
            state: status.state,
            reason: status.reason.clone(),
            engine: status.engine,
            engine_pid: status.engine_pid,
            engine_restarts: status.engine_restarts,
            oom_entries: status.oom_entries,
            task_id: status.task_id.clone(),
            tasks_rejected: status.tasks_rejected,
            cache_reset: status.cache_reset.as_ref().map(|r| format!("{}:{}", r.request_id, r.outcome)),
            shared_volumes: status.shared_volumes.len(),
        }
    }
}

#[derive(Debug)]
pub struct HealthStream {
    pub control: ControlPlane,
    pub session: watch::Receiver<Option<Session>>,
    pub status: watch::Receiver<Status>,
    pub events: mpsc::Sender<ControlEvent>,
    pub interval: Duration,
    pub heartbeat: Heartbeat,
    /// OOM kills (counted as in `Status::oom_entries`) sent on a stream that
    /// then ended normally. A stream that fails sends its kills again on the
    /// next one: at least once, deduplicated by id on the other side.
    pub oom_delivered: u64,
    /// How far CPU, memory and free-space figures move before a delta carries them.
    pub thresholds: Thresholds,
    /// Step records, the same way (counted as in `Status::step_entries`).
    pub steps_delivered: u64,
    /// Step records the status's buffer dropped before any stream took them.
    pub steps: crate::observe::steps::StepDelivery,
}

impl HealthStream {
    pub async fn run(mut self) {
        let mut backoff = self.control.settings.backoff.clone();
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Registration hands us a session; until then there is nobody to report to.
            let session = loop {
                if let Some(s) = self.session.borrow_and_update().clone() {
                    break s;
                }
                tokio::select! {
                    _ = ticker.tick() => self.heartbeat.beat(),
                    changed = self.session.changed() => if changed.is_err() { return },
                }
            };
            let delay = match self.stream_once(&session, &mut ticker).await {
                Ok(true) => {
                    info!("control plane asked this machine to terminate");
                    let _ = self.events.send(ControlEvent::ShouldTerminate).await;
                    return;
                }
                Ok(false) => {
                    backoff.reset();
                    backoff.next_delay(&mut rng)
                }
                Err(error) if error.is_permanent() => {
                    warn!(%error, "health stream failed with a permanent error; backing off to the cap");
                    backoff.next_delay_at_cap(&mut rng)
                }
                Err(error) => {
                    warn!(%error, "health stream failed");
                    backoff.next_delay(&mut rng)
                }
            };
            if self.events.is_closed() {
                return;
            }
            // Wait out the backoff, still ticking so /healthz sees this loop alive.
            let resume = tokio::time::Instant::now() + delay;
            while tokio::time::Instant::now() < resume {
                tokio::select! {
                    _ = ticker.tick() => self.heartbeat.beat(),
                    _ = tokio::time::sleep_until(resume) => {}
                }
            }
        }
    }

    /// Streams until the call ends: Ok(should_terminate) when the control
    /// plane answered, Err when the stream failed or could not be opened.
    async fn stream_once(&mut self, session: &Session, ticker: &mut tokio::time::Interval) -> Result<bool, ControlError> {
        let (tx, rx) = mpsc::channel(QUEUED_REPORTS);
        let req = self.control.authorized(ReceiverStream::new(rx), session)?;
        // A dial may take the whole connect timeout (up to minutes): keep
        // beating meanwhile, so /healthz never mistakes a slow network for a stuck loop.
        let dial = self.control.connection();
        tokio::pin!(dial);
        let conn = loop {
            tokio::select! {
                conn = &mut dial => break conn,
                _ = ticker.tick() => self.heartbeat.beat(),
            }
        };
        let conn = conn.inspect_err(|_| self.control.metrics.control_plane_errors.with_label_values(&["ReportHealth"]).inc())?;
        let mut client = conn.client();
        let call = client.report_health(req);
        tokio::pin!(call);
        debug!(machine_id = %session.machine_id, "health stream opened");
        // Kept on self at every return: the dropped count spans streams.
        let mut steps = self.steps;
        // The first report goes at once: a new stream's control plane knows nothing yet.
        let mut sent = Sent { oom_sent: self.oom_delivered, steps_sent: self.steps_delivered, ..Sent::default() };
        let mut sent_mark: Option<StateMark> = None;
        let mut send_at = Some(tokio::time::Instant::now());
        let mut format = self.reporting();
        loop {
            let due = async {
                match send_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                result = &mut call => {
                    self.steps = steps;
                    return match result {
                        Ok(resp) => {
                            self.oom_delivered = sent.oom_sent;
                            self.steps_delivered = sent.steps_sent;
                            let should_terminate = resp.into_inner().should_terminate;
                            if !should_terminate {
                                warn!("control plane ended the health stream without should_terminate; reopening");
                            }
                            Ok(should_terminate)
                        }
                        Err(status) => {
                            self.control.metrics.control_plane_errors.with_label_values(&["ReportHealth"]).inc();
                            let error = ControlError::from_status("ReportHealth", &status);
                            if error.discards_connection() {
                                self.control.discard(&conn, &error);
                            }
                            Err(error)
                        }
                    };
                }
                changed = self.status.changed() => {
                    if changed.is_err() {
                        self.steps = steps;
                        return Ok(false); // the agent is gone
                    }
                    let mark = StateMark::of(&self.status.borrow_and_update());
                    if send_at.is_none() && sent_mark.as_ref() != Some(&mark) {
                        send_at = Some(tokio::time::Instant::now() + COALESCE);
                    }
                }
                changed = self.session.changed() => {
                    if changed.is_err() {
                        return Ok(false); // the agent is gone
                    }
                    // A new format or a snapshot request is answered at once.
                    let newest = self.reporting();
                    if newest != format {
                        format = newest;
                        send_at.get_or_insert_with(tokio::time::Instant::now);
                    }
                }
                () = due => {
                    send_at = None;
                    sent_mark = Some(self.send_report(&tx, session, &format, &mut sent, &mut steps));
                }
                _ = ticker.tick() => {
                    self.heartbeat.beat();
                    send_at = None;
                    sent_mark = Some(self.send_report(&tx, session, &format, &mut sent, &mut steps));
                }
            }
        }
    }

    /// The report format the control plane asked for on the newest registration.
    fn reporting(&self) -> pb::HealthReporting {
        self.session.borrow().as_ref().map(|s| s.reporting).unwrap_or_default()
    }

    /// Queues the next report of the stream, if there is anything to say;
    /// returns what the status said of the state.
    fn send_report(
        &self,
        tx: &mpsc::Sender<pb::HealthReport>,
        session: &Session,
        format: &pb::HealthReporting,
        sent: &mut Sent,
        steps: &mut crate::observe::steps::StepDelivery,
    ) -> StateMark {
        // The newest session (a re-registration may have renewed it) names the machine.
        let machine_id = self.session.borrow().as_ref().map_or_else(|| session.machine_id.clone(), |s| s.machine_id.clone());
        let (full, oom_through, steps_through, mark) = {
            let status = self.status.borrow();
            let steps_dropped = steps.account(status.step_entries, status.recent_steps.len());
            (build_report(&status, &machine_id, sent.oom_sent, sent.steps_sent, steps_dropped), status.oom_entries, status.step_entries, StateMark::of(&status))
        };
        let now = tokio::time::Instant::now();
        let Some(report) = next_report(format, sent, full, now, self.thresholds) else {
            return mark;
        };
        let kind = if report.delta { "delta" } else { "full" };
        let (bytes, shown) = (report.encoded_len(), report.clone());
        match tx.try_send(report) {
            Ok(()) => {
                self.control.metrics.health_reports_sent.inc();
                self.control.metrics.health_report_bytes.with_label_values(&[kind]).inc_by(bytes as u64);
                sent.record(&shown, now);
                sent.oom_sent = oom_through;
                sent.steps_sent = steps_through;
                steps.queued(steps_through);
            }
            Err(mpsc::error::TrySendError::Full(_)) => debug!("health stream is backed up; dropping this report"),
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
        mark
    }
}

/// What one health stream has sent so far: the state the control plane
/// holds (every report applied), for the next delta, and how far the event
/// lists went.
#[derive(Debug, Default)]
pub struct Sent {
    /// OOM kills and step records sent, counted as in `Status::oom_entries`
    /// and `Status::step_entries`.
    pub oom_sent: u64,
    pub steps_sent: u64,
    held: Option<pb::HealthReport>,
    sequence: u64,
    last_at: Option<tokio::time::Instant>,
    last_full_at: Option<tokio::time::Instant>,
    answered_request: u64,
}

impl Sent {
    pub fn record(&mut self, report: &pb::HealthReport, now: tokio::time::Instant) {
        self.sequence = report.sequence;
        self.last_at = Some(now);
        if !report.delta {
            self.last_full_at = Some(now);
            self.answered_request = report.snapshot_request;
        }
        health_delta::apply(self.held.get_or_insert_with(Default::default), report);
    }
}

/// A full report this often on a delta stream when the control plane names no interval.
pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(60);
/// An empty delta this often while nothing changes, when the control plane names no interval.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

/// The report to send now, given the status's `full` report, or None when a
/// delta stream has nothing to say yet. Without deltas every call is a full
/// report. With them: a full report first, every snapshot interval and for
/// each new snapshot request; otherwise what changed, or an empty delta
/// once a heartbeat interval passed in silence. The control plane's intervals
/// are bounded, so a bad one can neither flood nor starve the stream. Pure.
pub fn next_report(
    format: &pb::HealthReporting,
    sent: &Sent,
    full: pb::HealthReport,
    now: tokio::time::Instant,
    thresholds: Thresholds,
) -> Option<pb::HealthReport> {
    let sequence = sent.sequence + 1;
    let interval = |secs: u32, default: Duration, bounds: (u64, u64)| match secs {
        0 => default,
        s => Duration::from_secs(u64::from(s).clamp(bounds.0, bounds.1)),
    };
    let snapshot_every = interval(format.snapshot_interval_secs, DEFAULT_SNAPSHOT_INTERVAL, (5, 3600));
    let heartbeat = interval(format.heartbeat_secs, DEFAULT_HEARTBEAT, (1, 300));
    let elapsed = |at: Option<tokio::time::Instant>, bound: Duration| at.is_none_or(|at| now.duration_since(at) >= bound);
    let held = match &sent.held {
        Some(held) if format.deltas && !elapsed(sent.last_full_at, snapshot_every) && format.snapshot_request <= sent.answered_request => held,
        _ => return Some(pb::HealthReport { sequence, snapshot_request: format.snapshot_request, ..full }),
    };
    let report = health_delta::delta(held, &full, thresholds);
    if health_delta::is_empty(&report) && !elapsed(sent.last_at, heartbeat) {
        return None;
    }
    Some(pb::HealthReport { sequence, ..report })
}

/// A report of the agent's status now: the filesystem figures of the last
/// sampler tick, the OOM kills after the first `oom_sent` the agent recorded,
/// and the step records after the first `steps_sent`.
pub fn build_report(status: &Status, machine_id: &str, oom_sent: u64, steps_sent: u64, steps_dropped: u64) -> pb::HealthReport {
    pb::HealthReport {
        oom_kills: status.oom_kills_after(oom_sent).map(pb::OomKill::from).collect(),
        oom_kills_total: status.oom_kills_total,
        host: status.resources.as_ref().map(|r| pb::HostResources::from(&r.host)),
        engine_resources: status.resources.as_ref().and_then(|r| r.engine.as_ref()).map(pb::EngineResources::from),
        machine_id: machine_id.into(),
        unix_time_ms: unix_time_ms(),
        agent_state: pb::AgentState::from(status.state) as i32,
        state_reason: status.reason.clone(),
        engine_state: pb::EngineState::from(status.engine) as i32,
        engine_restarts: status.engine_restarts,
        engine_adopted: status.engine_adopted,
        engine_last_exit: status.engine_last_exit.clone().unwrap_or_default(),
        mounts: status.mounts.iter().map(|m| status.mount_stats(m)).collect(),
        task_id: status.task_id.clone().unwrap_or_default(),
        task_conflict: status.task_conflict.as_ref().map(pb::TaskConflict::from),
        tasks_rejected_total: status.tasks_rejected,
        last_task_rejection: status.last_task_rejection.clone().unwrap_or_default(),
        shared_volumes: status.shared_volumes.iter().map(pb::SharedVolume::from).collect(),
        cache_reset: status.cache_reset.clone(),
        step_records: status.steps_after(steps_sent).map(pb::StepRecord::from).collect(),
        step_records_dropped_total: steps_dropped,
        devices: status.engine_devices.clone(),
        sequence: 0,
        delta: false,
        changed_fields: Vec::new(),
        snapshot_request: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_report() -> pb::HealthReport {
        pb::HealthReport { machine_id: "m".into(), agent_state: pb::AgentState::Ready as i32, task_id: "t".into(), ..Default::default() }
    }

    /// Sends what next_report picks at `now`; returns it.
    fn step(format: &pb::HealthReporting, sent: &mut Sent, full: pb::HealthReport, now: tokio::time::Instant) -> Option<pb::HealthReport> {
        let report = next_report(format, sent, full, now, Thresholds::default())?;
        sent.record(&report, now);
        Some(report)
    }

    #[tokio::test(start_paused = true)]
    async fn without_deltas_every_call_is_a_full_report() {
        let (format, mut sent, t0) = (pb::HealthReporting::default(), Sent::default(), tokio::time::Instant::now());
        for n in 1..=3 {
            let r = step(&format, &mut sent, ready_report(), t0).expect("a report every tick");
            assert!(!r.delta);
            assert_eq!((r.sequence, r.task_id.as_str()), (n, "t"));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_delta_stream_opens_full_then_sends_changes_heartbeats_and_snapshots() {
        let mut format = pb::HealthReporting { deltas: true, ..Default::default() };
        let (mut sent, t0) = (Sent::default(), tokio::time::Instant::now());
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert!(!step(&format, &mut sent, ready_report(), at(0)).unwrap().delta, "the stream opens with a full report");
        assert_eq!(step(&format, &mut sent, ready_report(), at(1)), None, "nothing changed, heartbeat not due");
        let beat = step(&format, &mut sent, ready_report(), at(10)).expect("a heartbeat after 10 s of silence");
        assert!(beat.delta && beat.changed_fields.is_empty());
        assert_eq!(beat.sequence, 2);
        let draining = pb::HealthReport { agent_state: pb::AgentState::Draining as i32, state_reason: "terminate".into(), ..ready_report() };
        let change = step(&format, &mut sent, draining.clone(), at(11)).expect("a change goes out");
        assert_eq!((change.delta, change.changed_fields.clone(), change.sequence), (true, vec![3, 4], 3));
        assert_eq!(step(&format, &mut sent, draining.clone(), at(12)), None);
        let snapshot = step(&format, &mut sent, draining.clone(), at(60)).expect("a full report every 60 s");
        assert!(!snapshot.delta);
        format.snapshot_request = 1;
        let asked = step(&format, &mut sent, draining.clone(), at(61)).expect("a full report for a new request");
        assert_eq!((asked.delta, asked.snapshot_request), (false, 1));
        assert_eq!(step(&format, &mut sent, draining, at(62)), None, "a request is answered once");
    }

    #[tokio::test(start_paused = true)]
    async fn the_control_plane_intervals_are_bounded() {
        let format = pb::HealthReporting { deltas: true, heartbeat_secs: u32::MAX, snapshot_interval_secs: 1, ..Default::default() };
        let (mut sent, t0) = (Sent::default(), tokio::time::Instant::now());
        step(&format, &mut sent, ready_report(), t0);
        assert_eq!(step(&format, &mut sent, ready_report(), t0 + Duration::from_secs(4)), None, "snapshots at most every 5 s");
        assert!(!step(&format, &mut sent, ready_report(), t0 + Duration::from_secs(5)).unwrap().delta);
        assert!(step(&format, &mut sent, ready_report(), t0 + Duration::from_secs(9)).is_none());
    }

    #[test]
    fn the_mark_moves_with_what_the_control_plane_schedules_by_and_not_with_the_figures() {
        let mut status = Status::initial(std::path::Path::new("/var/lib/machine-agent"));
        let first = StateMark::of(&status);
        status.mounts.push(crate::observe::status::MountFigures { path: "/".into(), stats: Default::default() });
        status.engine_restarts = 0;
        assert_eq!(StateMark::of(&status), first, "new filesystem figures alone wait for the tick");
        status.state = crate::lifecycle::State::Ready;
        assert_ne!(StateMark::of(&status), first, "a state change goes at once");
        let ready = StateMark::of(&status);
        status.oom_entries += 1;
        assert_ne!(StateMark::of(&status), ready, "an OOM kill goes at once");
    }
}
