//! The usage report: every interval while a task runs, the cache volume's
//! figures (and, once the engine client lands, the engine's cache records).
//! Best effort: a failed report is logged and counted, and the next one follows.

use super::{mount_stats, unix_time_ms, ControlPlane, Session};
use crate::agent::Status;
use crate::proto::v1 as pb;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug)]
pub struct UsageReporter {
    pub control: ControlPlane,
    pub session: watch::Receiver<Option<Session>>,
    pub status: watch::Receiver<Status>,
    pub interval: Duration,
}

impl UsageReporter {
    pub async fn run(self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate; the first report comes one interval in
        loop {
            ticker.tick().await;
            let Some(session) = self.session.borrow().clone() else { continue };
            let Some(report) = usage_report(&self.status.borrow(), &session.machine_id) else { continue };
            if let Err(error) = self.control.report_usage(report, &session).await {
                tracing::warn!(%error, "usage report not delivered; the next one follows in one interval");
            }
        }
    }
}

/// The report for the current task's cache mount; None when no task runs.
fn usage_report(status: &Status, machine_id: &str) -> Option<pb::UsageReport> {
    let task_id = status.task_id.clone()?;
    let cache_mount = status.cache_mount.as_deref().and_then(|path| mount_stats(path).ok());
    Some(pb::UsageReport {
        machine_id: machine_id.into(),
        task_id,
        unix_time_ms: unix_time_ms(),
        cache_mount,
        ..Default::default()
    })
}
