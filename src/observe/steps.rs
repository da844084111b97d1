//! The step recorder's pure core: the cgroup files of a build step parsed,
//! a finished step's record built, the builds that ran during it found
//! (never guessed), its OOM kill tied in, and the accounting of records a
//! full buffer dropped before any stream took them. No I/O here: the
//! watcher ([`super::step_watch`]) reads the files and the engine's history.

use super::oom_watch::OomKill;
use crate::engine::client::{BuildEvent, BuildEventKind};
use serde::Serialize;
use std::collections::BTreeMap;

/// Builds remembered after they completed: far more than run during any one
/// step's life; beyond it the oldest completed ones go first.
pub const REMEMBERED_BUILDS: usize = 256;
/// Windows of a live history stream remembered (one per engine connection).
const REMEMBERED_WINDOWS: usize = 32;

/// One finished build step, as the agent reports it (health stream, /readyz,
/// metrics).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepRecord {
    pub container_id: String,
    /// When the agent first and last saw the step's cgroup, Unix milliseconds.
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    pub cpu_seconds: f64,
    /// The cgroup's memory high-water mark; 0 when the kernel keeps none.
    pub peak_memory_bytes: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
    pub oom_killed: bool,
    /// The id of the OomKill that names this step's container, once known.
    pub oom_kill_id: Option<u64>,
    /// The one build that ran for the step's whole life, if exactly one did
    /// and the engine's history was watched all that time.
    pub build_ref: Option<String>,
    /// Every build known to have run at some time during the step.
    pub overlapping_build_refs: Vec<String>,
}

impl StepRecord {
    pub fn duration_seconds(&self) -> f64 {
        // Milliseconds: exact in an f64 for any plausible duration.
        #[allow(clippy::cast_precision_loss)]
        let ms = self.last_seen_unix_ms.saturating_sub(self.first_seen_unix_ms).max(0) as f64;
        ms / 1000.0
    }

    /// One line for the log.
    pub fn summary(&self) -> String {
        format!(
            "step {} ran {:.3} s, cpu {:.3} s, peak {} MiB{}{}",
            self.container_id,
            self.duration_seconds(),
            self.cpu_seconds,
            self.peak_memory_bytes >> 20,
            self.build_ref.as_deref().map(|b| format!(", build {b}")).unwrap_or_default(),
            if self.oom_killed { ", OOM-killed" } else { "" },
        )
    }
}

/// What a step's cgroup files said at one read. None: the file was missing
/// or unreadable (the controller is not there, or the cgroup is gone).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepFigures {
    pub cpu_usec: Option<u64>,
    pub peak_memory_bytes: Option<u64>,
    pub io_read_bytes: Option<u64>,
    pub io_write_bytes: Option<u64>,
    /// The step cgroup's own OOM kill counter (v2 memory.events, v1 memory.oom_control).
    pub oom_kills: Option<u64>,
}

impl StepFigures {
    /// The newer read where it has a figure, else the older one's: a file
    /// that vanished with the cgroup keeps what was read before. Every
    /// figure is monotonic while the cgroup lives, so the larger is the newer.
    #[must_use]
    pub fn merge(self, newer: Self) -> Self {
        fn max(a: Option<u64>, b: Option<u64>) -> Option<u64> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            }
        }
        Self {
            cpu_usec: max(self.cpu_usec, newer.cpu_usec),
            peak_memory_bytes: max(self.peak_memory_bytes, newer.peak_memory_bytes),
            io_read_bytes: max(self.io_read_bytes, newer.io_read_bytes),
            io_write_bytes: max(self.io_write_bytes, newer.io_write_bytes),
            oom_kills: max(self.oom_kills, newer.oom_kills),
        }
    }
}

/// A step's record from its figures and the times the agent saw it.
pub fn build_record(container_id: &str, first_seen_unix_ms: i64, last_seen_unix_ms: i64, figures: StepFigures) -> StepRecord {
    // Microseconds: exact in an f64 up to 285 years of CPU.
    #[allow(clippy::cast_precision_loss)]
    let cpu_seconds = figures.cpu_usec.unwrap_or(0) as f64 / 1e6;
    StepRecord {
        container_id: container_id.to_owned(),
        first_seen_unix_ms,
        last_seen_unix_ms: last_seen_unix_ms.max(first_seen_unix_ms),
        cpu_seconds,
        peak_memory_bytes: figures.peak_memory_bytes.unwrap_or(0),
        io_read_bytes: figures.io_read_bytes.unwrap_or(0),
        io_write_bytes: figures.io_write_bytes.unwrap_or(0),
        oom_killed: figures.oom_kills.is_some_and(|n| n > 0),
        oom_kill_id: None,
        build_ref: None,
        overlapping_build_refs: vec![],
    }
}

/// Ties a record to the OOM kill that names its container (the first, if a
/// step was killed more than once). True when one was found.
pub fn attach_oom_kill<'a>(record: &mut StepRecord, kills: impl IntoIterator<Item = &'a OomKill>) -> bool {
    let found = kills.into_iter().find(|k| k.container_id.as_deref() == Some(record.container_id.as_str()));
    if let Some(kill) = found {
        record.oom_killed = true;
        record.oom_kill_id = Some(kill.id);
        return true;
    }
    false
}

/// A name BuildKit gives a step's container: letters and digits only (its
/// ids are base32 of random bytes). Anything else under `buildkit/` is not
/// a step of ours.
pub fn is_container_id(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_alphanumeric())
}

// === parsers of cgroup files ===

/// A file holding one number (v1 cpuacct.usage, memory.max_usage_in_bytes, v2 memory.peak).
pub fn parse_single_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// v1 cpuacct.usage is nanoseconds; microseconds here.
pub fn parse_cpuacct_usage_usec(text: &str) -> Option<u64> {
    parse_single_u64(text).map(|ns| ns / 1_000)
}

/// v2 cpu.stat: `usage_usec N`.
pub fn parse_cpu_stat_usage_usec(text: &str) -> Option<u64> {
    crate::engine::cgroup::parse_flat_keyed(text, "usage_usec")
}

/// v2 io.stat: one line per device, `MAJ:MIN rbytes=N wbytes=N rios=N ...`;
/// (read, written) summed over the devices.
pub fn parse_io_stat(text: &str) -> (u64, u64) {
    let (mut read, mut written) = (0u64, 0u64);
    for field in text.lines().flat_map(|l| l.split_whitespace().skip(1)) {
        let Some((key, value)) = field.split_once('=') else { continue };
        let Ok(value) = value.parse::<u64>() else { continue };
        match key {
            "rbytes" => read = read.saturating_add(value),
            "wbytes" => written = written.saturating_add(value),
            _ => {}
        }
    }
    (read, written)
}

/// v1 blkio.throttle.io_service_bytes (or blkio.io_service_bytes):
/// `MAJ:MIN Read N`, `MAJ:MIN Write N`, ... and a `Total N` line; (read,
/// written) summed over the devices.
pub fn parse_blkio_service_bytes(text: &str) -> (u64, u64) {
    let (mut read, mut written) = (0u64, 0u64);
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(_device), Some(op), Some(value)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let Ok(value) = value.parse::<u64>() else { continue };
        match op {
            "Read" => read = read.saturating_add(value),
            "Write" => written = written.saturating_add(value),
            _ => {}
        }
    }
    (read, written)
}

/// v2 cgroup.events: `populated 0|1`.
pub fn parse_populated(text: &str) -> Option<bool> {
    crate::engine::cgroup::parse_flat_keyed(text, "populated").map(|n| n != 0)
}

/// cgroup.procs or tasks: true when no process is left.
pub fn procs_empty(text: &str) -> bool {
    text.trim().is_empty()
}

// === build history ===

/// One build as the engine's history told it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BuildSpan {
    started_unix_ms: i64,
    /// None while it runs.
    completed_unix_ms: Option<i64>,
}

/// What the agent knows of the engine's builds, and since when it knows all
/// of them: a history stream reports every running build when it opens and
/// every start and completion after, so while one is open nothing is missed;
/// while none is, builds can start and end unseen.
#[derive(Debug, Clone, Default)]
pub struct BuildLog {
    builds: BTreeMap<String, BuildSpan>,
    /// Since when the open stream has watched (None: no stream open).
    watching_since: Option<i64>,
    /// Closed watch windows, oldest first.
    windows: Vec<(i64, i64)>,
}

impl BuildLog {
    /// A history stream opened at `now`.
    pub fn opened(&mut self, now_unix_ms: i64) {
        self.watching_since = Some(now_unix_ms);
    }

    /// The stream ended at `now`: from here, builds may go unseen. A build
    /// still marked running may end meanwhile: it stays open-ended, which
    /// never makes it the only build of a later step (see [`BuildLog::attribute`]).
    pub fn closed(&mut self, now_unix_ms: i64) {
        if let Some(since) = self.watching_since.take() {
            self.windows.push((since, now_unix_ms));
            if self.windows.len() > REMEMBERED_WINDOWS {
                self.windows.remove(0);
            }
        }
    }

    pub fn apply(&mut self, event: &BuildEvent) {
        if event.build_ref.is_empty() {
            return;
        }
        match event.kind {
            // A deleted record's build still ran when it ran.
            BuildEventKind::Deleted => return,
            BuildEventKind::Started | BuildEventKind::Completed => {}
        }
        let Some(started) = event.started_unix_ms.or_else(|| self.builds.get(&event.build_ref).map(|b| b.started_unix_ms)) else {
            return;
        };
        let completed = event.completed_unix_ms.or(match event.kind {
            BuildEventKind::Completed => event.started_unix_ms.or(Some(started)),
            _ => None,
        });
        self.builds.insert(event.build_ref.clone(), BuildSpan { started_unix_ms: started, completed_unix_ms: completed });
        self.forget_beyond(REMEMBERED_BUILDS);
    }

    /// Forgets builds completed before `unix_ms` (no step still to be
    /// recorded began before it).
    pub fn forget_completed_before(&mut self, unix_ms: i64) {
        self.builds.retain(|_, b| b.completed_unix_ms.is_none_or(|c| c >= unix_ms));
    }

    fn forget_beyond(&mut self, keep: usize) {
        while self.builds.len() > keep {
            let oldest = self.builds.iter().filter_map(|(r, b)| b.completed_unix_ms.map(|c| (c, r.clone()))).min();
            match oldest {
                Some((_, r)) => {
                    self.builds.remove(&r);
                }
                None => return, // all running: kept, however many
            }
        }
    }

    /// True when a history stream watched without a break from `from` to `to`.
    fn watched(&self, from: i64, to: i64, now_unix_ms: i64) -> bool {
        let open = self.watching_since.map(|s| (s, now_unix_ms));
        self.windows.iter().copied().chain(open).any(|(s, e)| s <= from && to <= e)
    }

    /// The builds that ran during a step seen from `first` to `last`:
    /// `(build_ref, overlapping)`. `build_ref` is set only when exactly one
    /// known build overlapped the step, it covered the step's whole life, and
    /// the history was watched all that time (else a build may have run unseen).
    pub fn attribute(&self, first: i64, last: i64, now_unix_ms: i64) -> (Option<String>, Vec<String>) {
        let overlapping: Vec<(&String, &BuildSpan)> =
            self.builds.iter().filter(|(_, b)| b.started_unix_ms <= last && b.completed_unix_ms.is_none_or(|c| c >= first)).collect();
        let only = match overlapping.as_slice() {
            [(r, b)] if b.started_unix_ms <= first && b.completed_unix_ms.is_none_or(|c| c >= last) && self.watched(first, last, now_unix_ms) => {
                Some((*r).clone())
            }
            _ => None,
        };
        (only, overlapping.into_iter().map(|(r, _)| r.clone()).collect())
    }

    /// Builds known now (running and remembered).
    pub fn len(&self) -> usize {
        self.builds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.builds.is_empty()
    }
}

// === delivery accounting ===

/// Which finished steps a report sender has taken from the status's buffer
/// (numbered from 1 as they were recorded), and how many the buffer dropped
/// before any stream took them: those are the ones an outage cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepDelivery {
    /// Records 1..=queued_through were put on some stream (or counted dropped).
    pub queued_through: u64,
    pub dropped: u64,
}

impl StepDelivery {
    /// Counts the records the buffer dropped (`recorded - buffered` of them,
    /// the oldest) that no stream had taken; returns the total so far.
    pub fn account(&mut self, recorded: u64, buffered: usize) -> u64 {
        let evicted = recorded.saturating_sub(u64::try_from(buffered).unwrap_or(u64::MAX));
        if evicted > self.queued_through {
            self.dropped += evicted - self.queued_through;
            self.queued_through = evicted;
        }
        self.dropped
    }

    /// Records 1..=through went on a stream.
    pub fn queued(&mut self, through: u64) {
        self.queued_through = self.queued_through.max(through);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(r: &str, at: i64) -> BuildEvent {
        BuildEvent { kind: BuildEventKind::Started, build_ref: r.into(), started_unix_ms: Some(at), completed_unix_ms: None }
    }

    fn completed(r: &str, at: i64, done: i64) -> BuildEvent {
        BuildEvent { kind: BuildEventKind::Completed, build_ref: r.into(), started_unix_ms: Some(at), completed_unix_ms: Some(done) }
    }

    #[test]
    fn cgroup_files_of_both_versions_parse() {
        assert_eq!(parse_cpuacct_usage_usec("1234567890\n"), Some(1_234_567));
        assert_eq!(parse_cpu_stat_usage_usec("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n"), Some(1_500_000));
        assert_eq!(parse_single_u64("104857600\n"), Some(100 << 20));
        assert_eq!(parse_single_u64("max\n"), None);
        let io = "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n253:1 rbytes=1 wbytes=2 rios=1 wios=1\n";
        assert_eq!(parse_io_stat(io), (4097, 8194));
        assert_eq!(parse_io_stat(""), (0, 0));
        let blkio = "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Async 12288\n8:0 Discard 0\n8:0 Total 12288\n7:3 Read 1\n7:3 Write 2\nTotal 12291\n";
        assert_eq!(parse_blkio_service_bytes(blkio), (4097, 8194));
        assert_eq!(parse_blkio_service_bytes("Total 0\n"), (0, 0));
        assert_eq!(parse_populated("populated 0\nfrozen 0\n"), Some(false));
        assert_eq!(parse_populated("populated 1\nfrozen 0\n"), Some(true));
        assert_eq!(parse_populated(""), None);
        assert!(procs_empty("") && procs_empty("\n") && !procs_empty("42\n"));
    }

    #[test]
    fn container_ids_are_alphanumeric_and_nothing_else_is_a_step() {
        assert!(is_container_id("q8u0xhfy6z1ib5s3t3w1i2fz7"));
        assert!(!is_container_id(""));
        assert!(!is_container_id("../daemon"));
        assert!(!is_container_id("a.b"));
        assert!(!is_container_id(&"a".repeat(129)));
    }

    #[test]
    fn a_later_read_that_lost_files_keeps_what_was_read_before() {
        let early = StepFigures { cpu_usec: Some(10), peak_memory_bytes: Some(100), io_read_bytes: Some(1), io_write_bytes: None, oom_kills: Some(0) };
        let late = StepFigures { cpu_usec: Some(20), peak_memory_bytes: None, io_read_bytes: Some(1), io_write_bytes: Some(5), oom_kills: Some(1) };
        let merged = early.merge(late);
        assert_eq!(
            merged,
            StepFigures { cpu_usec: Some(20), peak_memory_bytes: Some(100), io_read_bytes: Some(1), io_write_bytes: Some(5), oom_kills: Some(1) }
        );
        assert_eq!(early.merge(StepFigures::default()), early);
    }

    #[test]
    fn a_record_carries_the_figures_and_its_duration() {
        let figures =
            StepFigures { cpu_usec: Some(1_250_000), peak_memory_bytes: Some(100 << 20), io_read_bytes: None, io_write_bytes: Some(7), oom_kills: Some(0) };
        let r = build_record("abc", 1_000, 2_500, figures);
        assert!((r.cpu_seconds - 1.25).abs() < 1e-9);
        assert!((r.duration_seconds() - 1.5).abs() < 1e-9);
        assert_eq!((r.peak_memory_bytes, r.io_read_bytes, r.io_write_bytes, r.oom_killed), (100 << 20, 0, 7, false));
        let killed = build_record("abc", 1_000, 900, StepFigures { oom_kills: Some(1), ..Default::default() });
        assert!(killed.oom_killed && killed.oom_kill_id.is_none(), "the cgroup's own counter says so, before the kill's lines are matched");
        assert_eq!(killed.last_seen_unix_ms, 1_000, "never before first seen");
        assert!(r.summary().contains("step abc ran 1.500 s"), "{}", r.summary());
    }

    #[test]
    fn the_oom_kill_with_the_same_container_id_is_tied_in() {
        let kill = |id: u64, container: Option<&str>| OomKill {
            id,
            unix_time_ms: 0,
            attribution: "build_step",
            container_id: container.map(str::to_owned),
            pid: None,
            process_name: None,
            scope: None,
            task_memcg: None,
            oom_memcg: None,
            total_vm_bytes: None,
            anon_rss_bytes: None,
            file_rss_bytes: None,
            shmem_rss_bytes: None,
            count: 1,
        };
        let kills = [kill(1, None), kill(2, Some("other")), kill(3, Some("abc")), kill(4, Some("abc"))];
        let mut r = build_record("abc", 0, 1, StepFigures::default());
        assert!(attach_oom_kill(&mut r, &kills));
        assert_eq!((r.oom_killed, r.oom_kill_id), (true, Some(3)));
        let mut none = build_record("zzz", 0, 1, StepFigures::default());
        assert!(!attach_oom_kill(&mut none, &kills));
        assert_eq!((none.oom_killed, none.oom_kill_id), (false, None));
    }

    #[test]
    fn one_build_over_the_whole_step_while_watched_is_the_steps_build() {
        let mut log = BuildLog::default();
        log.opened(0);
        log.apply(&started("b1", 100));
        assert_eq!(log.attribute(200, 300, 400), (Some("b1".into()), vec!["b1".into()]), "a running build covers the step");
        log.apply(&completed("b1", 100, 500));
        assert_eq!(log.attribute(200, 300, 600), (Some("b1".into()), vec!["b1".into()]));
        assert_eq!(log.attribute(600, 700, 800), (None, vec![]), "no build ran then");
    }

    #[test]
    fn two_builds_during_a_step_are_both_named_and_neither_is_the_steps() {
        let mut log = BuildLog::default();
        log.opened(0);
        log.apply(&started("b1", 100));
        log.apply(&started("b2", 150));
        let (only, all) = log.attribute(200, 300, 400);
        assert_eq!(only, None);
        assert_eq!(all, vec!["b1".to_string(), "b2".to_string()]);
        // b2 ended before the step: b1 alone ran throughout.
        let mut log = BuildLog::default();
        log.opened(0);
        log.apply(&completed("b2", 10, 150));
        log.apply(&started("b1", 100));
        assert_eq!(log.attribute(200, 300, 400), (Some("b1".into()), vec!["b1".into()]));
    }

    #[test]
    fn a_build_that_does_not_cover_the_whole_step_is_only_overlapping() {
        let mut log = BuildLog::default();
        log.opened(0);
        log.apply(&completed("b1", 100, 250));
        assert_eq!(log.attribute(200, 300, 400), (None, vec!["b1".into()]), "the step outlived the build: never a guess");
        log.apply(&started("b2", 250));
        assert_eq!(log.attribute(200, 300, 400), (None, vec!["b1".into(), "b2".into()]));
    }

    #[test]
    fn a_step_not_watched_throughout_has_no_build_even_when_one_is_known() {
        let mut log = BuildLog::default();
        log.apply(&started("b1", 100));
        assert_eq!(log.attribute(200, 300, 400), (None, vec!["b1".into()]), "never watched: another build may have run");
        log.opened(250);
        assert_eq!(log.attribute(200, 300, 400), (None, vec!["b1".into()]), "watched from after the step began");
        assert_eq!(log.attribute(260, 300, 400), (Some("b1".into()), vec!["b1".into()]));
        log.closed(350);
        log.opened(370);
        assert_eq!(log.attribute(340, 380, 400), (None, vec!["b1".into()]), "a gap in the watch");
        assert_eq!(log.attribute(260, 340, 400), (Some("b1".into()), vec!["b1".into()]), "a closed window still counts");
    }

    #[test]
    fn deleted_records_and_unnamed_builds_change_nothing_and_old_builds_are_forgotten() {
        let mut log = BuildLog::default();
        log.opened(0);
        log.apply(&completed("b1", 100, 200));
        log.apply(&BuildEvent { kind: BuildEventKind::Deleted, build_ref: "b1".into(), started_unix_ms: None, completed_unix_ms: None });
        log.apply(&started("", 100));
        assert_eq!(log.len(), 1);
        log.forget_completed_before(201);
        assert!(log.is_empty());
        for i in 0..(REMEMBERED_BUILDS as i64 + 10) {
            log.apply(&completed(&format!("b{i}"), i, i + 1));
        }
        log.apply(&started("running", 5));
        assert_eq!(log.len(), REMEMBERED_BUILDS);
        assert_eq!(log.attribute(10_000, 10_001, 10_002).1, vec!["running".to_string()], "the running build is never the one forgotten");
    }

    #[test]
    fn a_completion_without_its_start_takes_the_start_seen_before() {
        let mut log = BuildLog::default();
        log.opened(0);
        log.apply(&started("b1", 100));
        log.apply(&BuildEvent { kind: BuildEventKind::Completed, build_ref: "b1".into(), started_unix_ms: None, completed_unix_ms: Some(500) });
        assert_eq!(log.attribute(600, 700, 800).1, Vec::<String>::new(), "completed at 500");
        assert_eq!(log.attribute(200, 300, 800).0, Some("b1".into()));
    }

    #[test]
    fn only_records_dropped_before_any_stream_took_them_are_counted() {
        let mut d = StepDelivery::default();
        assert_eq!(d.account(3, 3), 0);
        d.queued(3);
        // Two more recorded, the buffer (capacity 2) dropped records 1..=3, all sent.
        assert_eq!(d.account(5, 2), 0);
        // An outage: records 6..=10 arrive, the buffer keeps 9 and 10.
        assert_eq!(d.account(10, 2), 5, "records 4..=8 left the buffer with no stream to take them");
        assert_eq!(d.account(10, 2), 5, "counting again adds nothing");
        d.queued(10);
        assert_eq!(d.account(12, 2), 5);
    }
}
