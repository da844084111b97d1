//! When GC runs: once as soon as the engine is ready, every interval, and at
//! once when the cache volume crosses a free-space or free-inode watermark
//! between runs. One run at a time; an engine that cannot be read defers the
//! run to the next tick. Every run is logged, counted and published.

use super::clock::{Retention, RetentionClock};
use super::executor::{GcReport, GcRun, Trigger};
use super::planner::{self, Policy};
use super::GcSettings;
use crate::engine::client::EngineClient;
use crate::observe::metrics::Metrics;
use crate::task::BuildkitTask;
use crate::volume::stats::{read_fs_stats, FsStats};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The agent's GC policy for a task: the config's, with the task's overrides.
pub fn effective_policy(config: &GcSettings, task: &BuildkitTask) -> (Policy, Duration) {
    let o = &task.gc;
    let percent = |p: u32| u8::try_from(p.min(100)).unwrap_or(100);
    let (bytes_start, bytes_stop) =
        o.free_bytes_watermarks_percent.map_or((config.free_bytes_start_below_percent, config.free_bytes_stop_at_percent), |(h, l)| (percent(h), percent(l)));
    let (inodes_start, inodes_stop) = o
        .free_inodes_watermarks_percent
        .map_or((config.free_inodes_start_below_percent, config.free_inodes_stop_at_percent), |(h, l)| (percent(h), percent(l)));
    let policy = Policy {
        retention: o.retention.unwrap_or(config.retention),
        keep_bytes: o.keep_bytes.unwrap_or(task.cache_size_bytes),
        free_bytes_start_below_percent: bytes_start,
        free_bytes_stop_at_percent: bytes_stop,
        free_inodes_start_below_percent: inodes_start,
        free_inodes_stop_at_percent: inodes_stop,
        min_age: o.min_age.unwrap_or(config.min_age),
    };
    (policy, o.interval.unwrap_or(config.interval))
}

/// True when the volume is below a start watermark: the planner's own test,
/// asked with no records.
pub fn under_pressure(fs: &FsStats, policy: &Policy) -> bool {
    let targets = planner::plan_prune(&[], fs, policy, SystemTime::now()).targets;
    targets.free_bytes.is_some() || targets.free_inodes.is_some()
}

/// The gap between two pressure checks: the configured one, doubled after
/// each pressure run that freed nothing (nothing prunable: records in use or
/// too young, or the space held by files outside the cache) up to `max`, so a
/// full disk of in-use records does not cost a DiskUsage call every check;
/// back to the configured gap once a run frees something or the volume is no
/// longer under pressure. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PressureGaps {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl PressureGaps {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max: max.max(base), current: base }
    }

    pub fn gap(&self) -> Duration {
        self.current
    }

    /// A run started by pressure ended; `freed` when it pruned anything.
    pub fn after_pressure_run(&mut self, freed: bool) {
        self.current = if freed { self.base } else { self.current.saturating_mul(2).min(self.max) };
    }

    /// The volume is above its watermarks again, or an ordinary run freed space.
    pub fn relieved(&mut self) {
        self.current = self.base;
    }
}

/// The GC loop of one task.
#[derive(Debug)]
pub struct GcSchedule {
    pub run: GcRun,
    pub socket: PathBuf,
    pub interval: Duration,
    pub pressure_check: Duration,
    pub metrics: Metrics,
    /// Each run's report, for /readyz and the usage report.
    pub reports: mpsc::Sender<crate::proto::v1::GcRunReport>,
    /// Whether this run may apply retention (the clock synchronized, no jump).
    pub clock: RetentionClock,
}

impl GcSchedule {
    /// Runs until the task is dropped (aborted at drain).
    pub async fn run_forever(mut self) {
        let mut next_run = Instant::now(); // the first run as soon as the engine is ready
        let mut pending = Trigger::Startup;
        let mut gaps = PressureGaps::new(self.pressure_check, self.interval);
        let mut next_check = Instant::now() + gaps.gap();
        loop {
            tokio::select! {
                // Biased: the first run is the startup run even on a volume
                // already under pressure (both are due at once then).
                biased;
                () = tokio::time::sleep_until(next_run) => {}
                () = tokio::time::sleep_until(next_check) => {
                    next_check = Instant::now() + gaps.gap();
                    match read_fs_stats(&self.run.fs_path) {
                        Ok(fs) if under_pressure(&fs, &self.run.policy) => pending = Trigger::Pressure,
                        Ok(_) => {
                            gaps.relieved();
                            continue;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "cannot read the cache volume's free space");
                            continue;
                        }
                    }
                }
            }
            let freed = self.run_once(pending).await;
            match (pending, freed) {
                (Trigger::Pressure, _) => {
                    gaps.after_pressure_run(freed);
                    if !freed {
                        tracing::info!(next_check_ms = gaps.gap().as_millis(), "the pressure run freed nothing; checking less often until it can");
                    }
                }
                (_, true) => gaps.relieved(),
                (_, false) => {}
            }
            next_check = Instant::now() + gaps.gap();
            pending = Trigger::Interval;
            next_run = Instant::now() + self.interval;
        }
    }

    /// One run, logged, counted and published; true when it freed anything.
    async fn run_once(&mut self, trigger: Trigger) -> bool {
        let synchronized = crate::sys::clock_synchronized().map_err(|error| tracing::debug!(%error, "cannot read the clock's state (adjtimex)")).ok();
        let retention = self.clock.assess(Instant::now(), SystemTime::now(), synchronized);
        let run = match retention {
            Retention::Apply => std::borrow::Cow::Borrowed(&self.run),
            skipped => {
                tracing::info!(trigger = %trigger, why = %skipped, "this gc run applies no retention; space targets still apply");
                std::borrow::Cow::Owned(without_retention(&self.run))
            }
        };
        let result = match EngineClient::connect(&self.socket).await {
            Ok(client) => run.run(&client, trigger).await,
            Err(error) => Err(error.into()),
        };
        let labels = |outcome: &str| [trigger.as_str().to_string(), outcome.to_string()];
        let mut freed = false;
        let published = match result {
            Ok(report) => {
                freed = report.freed_records > 0 || report.freed_bytes > 0;
                let outcome = if report.error.is_some() { "error" } else { "ok" };
                self.metrics.gc_runs.with_label_values(&labels(outcome)).inc();
                self.record(&report);
                if let Some(error) = &report.error {
                    tracing::warn!(trigger = %trigger, %error, summary = %report.summary(), "gc run stopped early");
                } else {
                    tracing::info!(trigger = %trigger, summary = %report.summary(), "gc run");
                }
                to_proto(&report, outcome)
            }
            Err(error) => {
                self.metrics.gc_runs.with_label_values(&labels("deferred")).inc();
                tracing::warn!(trigger = %trigger, %error, "gc run deferred; retried at the next tick");
                crate::proto::v1::GcRunReport {
                    trigger: trigger.as_str().into(),
                    outcome: "deferred".into(),
                    unix_time_ms: crate::clock::unix_time_ms(),
                    error: error.to_string(),
                    summary: format!("deferred ({trigger}): {error}"),
                    ..Default::default()
                }
            }
        };
        let _ = self.reports.send(published).await;
        freed
    }

    fn record(&self, report: &GcReport) {
        let m = &self.metrics;
        m.gc_freed_bytes.inc_by(report.freed_bytes);
        m.gc_freed_records.inc_by(report.freed_records);
        m.gc_last_run_freed_bytes.set(i64::try_from(report.freed_bytes).unwrap_or(i64::MAX));
        m.gc_last_run_duration_seconds.set(report.duration.as_secs_f64());
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        m.gc_last_run_timestamp_seconds.set(now.as_secs_f64());
    }
}

/// `run` with retention off: nothing is old enough (an age is never above `Duration::MAX`).
pub fn without_retention(run: &GcRun) -> GcRun {
    GcRun { policy: Policy { retention: Duration::MAX, ..run.policy }, ..run.clone() }
}

/// A run as the control plane's usage report carries it.
pub fn to_proto(report: &GcReport, outcome: &str) -> crate::proto::v1::GcRunReport {
    crate::proto::v1::GcRunReport {
        trigger: report.trigger.as_str().into(),
        outcome: outcome.into(),
        unix_time_ms: crate::clock::unix_time_ms(),
        duration_ms: u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX),
        planned_records: report.planned_records,
        planned_bytes: report.planned_bytes,
        freed_records: report.freed_records,
        freed_bytes: report.freed_bytes,
        inodes_freed: report.inodes_freed,
        free_bytes_before: report.free_bytes_before,
        free_bytes_after: report.free_bytes_after,
        error: report.error.clone().unwrap_or_default(),
        summary: report.summary(),
        freed_by_reason: Some(crate::proto::v1::GcReasonCounts {
            retention: report.reasons.retention,
            keep_bytes: report.reasons.keep_bytes,
            free_bytes: report.reasons.free_bytes,
            free_inodes: report.reasons.free_inodes,
        }),
        free_inodes_before: report.free_inodes_before,
        free_inodes_after: report.free_inodes_after,
        shortfall: report.shortfall.as_ref().map(|s| crate::proto::v1::GcShortfall {
            keep_bytes: s.keep_bytes,
            free_bytes: s.free_bytes,
            free_inodes: s.free_inodes,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GcSettings {
        GcSettings {
            enabled: true,
            retention: Duration::from_secs(100),
            min_age: Duration::from_secs(10),
            interval: Duration::from_secs(60),
            pressure_check: Duration::from_secs(5),
            free_bytes_start_below_percent: 10,
            free_bytes_stop_at_percent: 20,
            free_inodes_start_below_percent: 5,
            free_inodes_stop_at_percent: 15,
            batch: 64,
            clock_sync_wait: Duration::from_secs(600),
            clock_jump_max: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_run_without_retention_prunes_no_old_record_for_its_age() {
        let run = GcRun { fs_path: "/cache".into(), policy: effective_policy(&config(), &crate::engine::render::tests::task()).0, batch: 64, dry_run: false };
        let now = SystemTime::now();
        let old = planner::Record {
            id: "old".into(),
            size_bytes: 1,
            parents: vec![],
            last_used: Some(now - Duration::from_secs(10_000)),
            created_at: now - Duration::from_secs(10_000),
            usage_count: 1,
            in_use: false,
            shared: false,
            record_type: planner::RecordType::Regular,
            inodes: None,
        };
        let roomy = FsStats { total_bytes: 1000, free_bytes: 900, total_inodes: 1000, free_inodes: 900 };
        assert_eq!(planner::plan_prune(std::slice::from_ref(&old), &roomy, &run.policy, now).victims.len(), 1, "retention prunes it");
        assert!(planner::plan_prune(&[old], &roomy, &without_retention(&run).policy, now).victims.is_empty(), "a skipped pass does not");
    }

    #[test]
    fn pressure_checks_back_off_while_runs_free_nothing_and_come_back_at_once() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(60));
        let mut gaps = PressureGaps::new(base, max);
        assert_eq!(gaps.gap(), base);
        let mut seen = vec![];
        for _ in 0..12 {
            gaps.after_pressure_run(false);
            seen.push(gaps.gap().as_millis());
        }
        assert_eq!(seen[..4], [200, 400, 800, 1600]);
        assert_eq!(*seen.last().unwrap(), 60_000, "capped at the GC interval");
        gaps.after_pressure_run(true);
        assert_eq!(gaps.gap(), base, "a run that freed space: checks at the configured gap again");
        gaps.after_pressure_run(false);
        gaps.relieved();
        assert_eq!(gaps.gap(), base, "the volume above its watermarks again");
        assert_eq!(PressureGaps::new(base, Duration::from_millis(10)).gap(), base, "a max below the base is the base");
    }

    #[test]
    fn the_task_overrides_the_config_field_by_field() {
        let mut task = crate::engine::render::tests::task();
        let (p, interval) = effective_policy(&config(), &task);
        assert_eq!(
            (p.retention, p.min_age, p.keep_bytes, interval),
            (Duration::from_secs(100), Duration::from_secs(10), task.cache_size_bytes, Duration::from_secs(60))
        );
        assert_eq!((p.free_bytes_start_below_percent, p.free_bytes_stop_at_percent), (10, 20));
        task.gc.retention = Some(Duration::from_secs(7));
        task.gc.keep_bytes = Some(1234);
        task.gc.free_bytes_watermarks_percent = Some((30, 40));
        task.gc.interval = Some(Duration::from_secs(2));
        let (p, interval) = effective_policy(&config(), &task);
        assert_eq!((p.retention, p.keep_bytes, interval), (Duration::from_secs(7), 1234, Duration::from_secs(2)));
        assert_eq!((p.free_bytes_start_below_percent, p.free_bytes_stop_at_percent), (30, 40));
        assert_eq!((p.free_inodes_start_below_percent, p.free_inodes_stop_at_percent), (5, 15), "inodes keep the config's");
    }

    #[test]
    fn pressure_is_a_start_watermark_crossed_for_bytes_or_inodes() {
        let policy = Policy { free_bytes_start_below_percent: 10, free_inodes_start_below_percent: 10, ..Policy::new(1 << 30) };
        let fs = |free_bytes, free_inodes| crate::volume::stats::FsStats { total_bytes: 1000, free_bytes, total_inodes: 1000, free_inodes };
        assert!(!under_pressure(&fs(500, 500), &policy));
        assert!(under_pressure(&fs(50, 500), &policy), "bytes");
        assert!(under_pressure(&fs(500, 50), &policy), "inodes");
    }
}
