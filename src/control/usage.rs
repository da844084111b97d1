//! The usage report: every interval while a task runs, the cache volume's
//! figures (and, once the engine client lands, the engine's cache records).
//! Best effort: a failed report is logged and counted, and the next one follows.

use super::{ControlPlane, Session};
use crate::clock::unix_time_ms;
use crate::observe::status::Status;
use crate::proto::v1 as pb;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug)]
pub struct UsageReporter {
    pub control: ControlPlane,
    pub session: watch::Receiver<Option<Session>>,
    pub status: watch::Receiver<Status>,
    pub interval: Duration,
    /// The engine's socket: cache record figures come from its DiskUsage.
    pub engine_socket: std::path::PathBuf,
}

impl UsageReporter {
    pub async fn run(self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate; the first report comes one interval in
                             // GC runs up to this number were delivered; later ones go in the next report.
        let mut gc_runs_sent = 0;
        loop {
            ticker.tick().await;
            let Some(session) = self.session.borrow().clone() else { continue };
            let status = self.status.borrow().clone();
            let Some(mut report) = usage_report(&status, &session.machine_id, gc_runs_sent) else { continue };
            add_cache_records(&mut report, &self.engine_socket).await;
            match self.control.report_usage(report, &session).await {
                Ok(()) => gc_runs_sent = status.gc_runs,
                Err(error) => tracing::warn!(%error, permanent = error.is_permanent(), "usage report not delivered; the next one follows in one interval"),
            }
        }
    }
}

/// The report for the current task's cache mount; None when no task runs.
/// The report of `status`, with the GC runs numbered above `gc_runs_sent`.
fn usage_report(status: &Status, machine_id: &str, gc_runs_sent: u64) -> Option<pb::UsageReport> {
    let task_id = status.task_id.clone()?;
    let cache_mount = status.cache_mount.as_deref().and_then(|path| status.mount(path)).map(|m| status.mount_stats(m));
    let unsent = usize::try_from(status.gc_runs.saturating_sub(gc_runs_sent)).unwrap_or(usize::MAX);
    let skip = status.recent_gc.len().saturating_sub(unsent);
    Some(pb::UsageReport {
        machine_id: machine_id.into(),
        task_id,
        unix_time_ms: unix_time_ms(),
        cache_mount,
        gc_runs: status.recent_gc.iter().skip(skip).cloned().collect(),
        shared_volumes: status.shared_volumes.iter().map(pb::SharedVolume::from).collect(),
        ..Default::default()
    })
}

/// Used and reclaimable bytes of the engine's records. Saturating: the sizes are
/// the engine's word, and a record claiming u64::MAX must not wrap the total
/// (or panic, in a debug build).
fn cache_totals(records: &[crate::engine::client::CacheRecord]) -> (u64, u64) {
    let used = records.iter().fold(0u64, |sum, r| sum.saturating_add(r.size_bytes));
    let reclaimable = records.iter().filter(|r| !r.in_use && !r.shared).fold(0u64, |sum, r| sum.saturating_add(r.size_bytes));
    (used, reclaimable)
}

/// The engine's cache records, summed; left at zero while the engine cannot be read.
async fn add_cache_records(report: &mut pb::UsageReport, socket: &std::path::Path) {
    let records = match crate::engine::client::EngineClient::connect(socket).await {
        // A report is due every interval: it does not wait for a cold cache
        // to be sized (GC does, with its own timeout); that work is kept anyway.
        Ok(client) => client.with_disk_usage_timeout(crate::engine::client::DEFAULT_CALL_TIMEOUT).disk_usage().await,
        Err(error) => Err(error),
    };
    match records {
        Ok(records) => {
            report.cache_records = u64::try_from(records.len()).unwrap_or(u64::MAX);
            (report.cache_used_bytes, report.cache_reclaimable_bytes) = cache_totals(&records);
        }
        Err(error) => tracing::debug!(%error, "usage report without cache records: the engine cannot be read"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::client::CacheRecord;

    fn record(size_bytes: u64, in_use: bool) -> CacheRecord {
        CacheRecord {
            id: "r".into(),
            size_bytes,
            parents: vec![],
            created_at: None,
            last_used_at: None,
            usage_count: 0,
            in_use,
            shared: false,
            mutable: false,
            record_type: "regular".into(),
            description: String::new(),
        }
    }

    #[test]
    fn cache_totals_saturate_on_engine_reported_sizes_instead_of_overflowing() {
        assert_eq!(cache_totals(&[record(1, false), record(2, true)]), (3, 1));
        assert_eq!(cache_totals(&[record(u64::MAX, false), record(u64::MAX, false), record(5, true)]), (u64::MAX, u64::MAX));
    }
}
