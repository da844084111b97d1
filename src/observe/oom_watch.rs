//! The OOM watcher's I/O edge: reads /dev/kmsg as the kernel writes it, hands
//! each record to the pure [`OomAssembler`](super::oom::OomAssembler), and
//! checks the result against the kernel's own counters, so a kill whose lines
//! were lost is still reported.
//!
//! Behaviour:
//! - /dev/kmsg is opened non-blocking and positioned at its end: kills from
//!   before the agent started belong to an earlier witness.
//! - A read that fails with EPIPE means the ring buffer overwrote records we
//!   had not read; the kernel moves us to the oldest record left, we count an
//!   overrun and carry on.
//! - Every `reconcile_interval` the engine daemon cgroup's own `oom_kill`
//!   counter (v2 `memory.events`, v1 `memory.oom_control`) and /proc/vmstat
//!   `oom_kill` close a window: kills those counters saw and no kmsg line
//!   explains become events of their own, attributed `engine` (the daemon
//!   cgroup says so) or `unattributed` (only the host counter knows).
//!
//! - Records user space wrote (any facility but the kernel's) are counted in
//!   `machine_agent_kmsg_user_records_total` and never read as OOM lines; one
//!   that looks like one is logged at WARN, a few a minute at most, with the
//!   count of those not logged; overrun warnings are limited the same way.
//!
//! Limitations: a kernel without /dev/kmsg access (a container without
//! CAP_SYSLOG) leaves only the counters, so every kill is unattributed; the
//! watcher says so once at start.

use super::liveness::Heartbeat;
use super::log_limit::{LogLimiter, Verdict};
use super::metrics::Metrics;
use super::oom::{parse_kmsg_record, parse_oom_line, parse_vmstat_oom_kill, Attribution, KmsgRecord, OomAssembler, OomEvent, OomScope, Reconciler};
use crate::engine::cgroup::EngineCgroup;
use serde::Serialize;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// A kmsg record is at most about 1 KiB of text plus its dictionary; the
/// kernel refuses (EINVAL) a read into a buffer too small for the next one.
const KMSG_READ_BUFFER: usize = 16 * 1024;
/// Synthetic ids (kills found only by a counter) have bit 63 set, so they
/// never collide with a kmsg sequence number.
const COUNTED_ONLY_ID_BIT: u64 = 1 << 63;
/// Repeating warnings (forged lines, overruns) logged per kind per window:
/// enough to see that it happens and what it says; a flood is a count, not a log.
const WARNINGS_LOGGED_PER_WINDOW: u32 = 5;
const WARNINGS_WINDOW: Duration = Duration::from_secs(60);
const FORGED_OOM_LINE: &str = "forged_oom_line";
/// A flood of writes into /dev/kmsg overruns the reader many times a second.
const OVERRUN: &str = "kmsg_overrun";
/// A forged line is quoted only this far in the log.
const QUOTED_MESSAGE_CHARS: usize = 160;

/// One OOM kill as the agent reports it: to the log, /readyz, the metrics and
/// the health stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OomKill {
    /// The kmsg sequence number of the `Killed process` line, or a synthetic
    /// id with bit 63 set for a kill found only by a counter.
    pub id: u64,
    pub unix_time_ms: i64,
    /// `engine`, `build_step`, `other`, `unknown` or `unattributed`.
    pub attribution: &'static str,
    /// The build step's container id, for `build_step`.
    pub container_id: Option<String>,
    pub pid: Option<u32>,
    pub process_name: Option<String>,
    /// `memcg` or `system`.
    pub scope: Option<&'static str>,
    pub task_memcg: Option<String>,
    pub oom_memcg: Option<String>,
    pub total_vm_bytes: Option<u64>,
    pub anon_rss_bytes: Option<u64>,
    pub file_rss_bytes: Option<u64>,
    pub shmem_rss_bytes: Option<u64>,
    /// 1, or more for kills found only by a counter in one window.
    pub count: u64,
}

impl OomKill {
    /// An event assembled from kmsg, its time moved from the kernel's
    /// boot-relative clock to Unix time.
    pub fn from_event(event: OomEvent, clock: &ClockOffset) -> Self {
        let container_id = match &event.attribution {
            Attribution::BuildStep { container_id } => Some(container_id.clone()),
            _ => None,
        };
        Self {
            id: event.seq,
            unix_time_ms: clock.unix_ms(event.time_us),
            attribution: event.attribution.as_str(),
            container_id,
            pid: Some(event.pid),
            process_name: Some(event.name),
            scope: event.scope.map(|s| match s {
                OomScope::Memcg => "memcg",
                OomScope::System => "system",
            }),
            task_memcg: event.task_memcg,
            oom_memcg: event.oom_memcg,
            total_vm_bytes: event.total_vm_bytes,
            anon_rss_bytes: event.anon_rss_bytes,
            file_rss_bytes: event.file_rss_bytes,
            shmem_rss_bytes: event.shmem_rss_bytes,
            count: 1,
        }
    }

    /// `count` kills a counter saw and no kmsg line explained.
    fn counted_only(id: u64, attribution: Attribution, count: u64, unix_time_ms: i64) -> Self {
        Self {
            id: id | COUNTED_ONLY_ID_BIT,
            unix_time_ms,
            attribution: attribution.as_str(),
            container_id: None,
            pid: None,
            process_name: None,
            scope: None,
            task_memcg: None,
            oom_memcg: None,
            total_vm_bytes: None,
            anon_rss_bytes: None,
            file_rss_bytes: None,
            shmem_rss_bytes: None,
            count,
        }
    }

    /// One line for the log and /readyz.
    pub fn summary(&self) -> String {
        let who = match (&self.process_name, self.pid) {
            (Some(name), Some(pid)) => format!("{name} (pid {pid})"),
            _ => format!("{} kill(s) without kernel lines", self.count),
        };
        let step = self.container_id.as_deref().map(|id| format!(" in step {id}")).unwrap_or_default();
        let rss = self.anon_rss_bytes.map(|b| format!(", anon-rss {} MiB", b >> 20)).unwrap_or_default();
        format!("{who}: {}{step}{rss}", self.attribution)
    }
}

/// The kernel stamps kmsg records with microseconds since boot (the
/// monotonic clock); this turns them into Unix time as of when it was made.
#[derive(Debug, Clone, Copy)]
pub struct ClockOffset {
    unix_minus_monotonic_us: i128,
}

impl ClockOffset {
    pub fn now() -> Self {
        let monotonic_us = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| i128::from(t.tv_sec()) * 1_000_000 + i128::from(t.tv_nsec()) / 1_000)
            .unwrap_or_default();
        let unix_us = i128::from(crate::clock::unix_time_ms()) * 1_000;
        Self { unix_minus_monotonic_us: unix_us - monotonic_us }
    }

    pub fn unix_ms(&self, monotonic_us: u64) -> i64 {
        i64::try_from((i128::from(monotonic_us) + self.unix_minus_monotonic_us) / 1_000).unwrap_or_default()
    }
}

/// What one read of /dev/kmsg gave.
#[derive(Debug, PartialEq, Eq)]
pub enum KmsgRead {
    Record(String),
    /// The ring overwrote records we had not read yet (EPIPE).
    Overrun,
}

/// /dev/kmsg, read one record per `read(2)`; or a FIFO of records (tests),
/// where one read may return several: each line is then a record, and lines
/// that start with a space (kmsg's ` KEY=value` continuations) are dropped.
#[derive(Debug)]
pub struct KmsgReader {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
    pending: std::collections::VecDeque<String>,
}

impl KmsgReader {
    /// Opens `path` non-blocking and moves to its end, so only records
    /// written from now on are read. Seeking is not possible on a FIFO,
    /// which is then read from wherever its writer is.
    pub fn open_at_end(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NONBLOCK).open(path)?;
        match nix::unistd::lseek(file.as_raw_fd(), 0, nix::unistd::Whence::SeekEnd) {
            Ok(_) | Err(nix::errno::Errno::ESPIPE) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Self { fd: crate::sys::async_fd(OwnedFd::from(file))?, buf: vec![0; KMSG_READ_BUFFER], pending: Default::default() })
    }

    /// The next record; waits until there is one. Ok(None) when the writer of
    /// a FIFO went away (never for /dev/kmsg).
    pub async fn next(&mut self) -> io::Result<Option<KmsgRead>> {
        loop {
            if let Some(record) = self.pending.pop_front() {
                return Ok(Some(KmsgRead::Record(record)));
            }
            let mut ready = self.fd.readable().await?;
            let buf = &mut self.buf;
            match ready.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from)) {
                Ok(Ok(0)) => return Ok(None),
                Ok(Ok(n)) => {
                    let text = String::from_utf8_lossy(&self.buf[..n]);
                    let records = text.lines().filter(|line| !line.is_empty() && !line.starts_with(' '));
                    self.pending.extend(records.map(str::to_owned));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(nix::errno::Errno::EPIPE as i32) => return Ok(Some(KmsgRead::Overrun)),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// The watcher: one loop per agent, started at startup and never restarted.
#[derive(Debug)]
pub struct OomWatch {
    pub kmsg_path: PathBuf,
    pub vmstat_path: PathBuf,
    /// `/<name>` of the engine's cgroup in its hierarchy, "" when the engine
    /// runs without one (then a kill is the engine's when its pid is).
    pub engine_cgroup_path: String,
    /// The engine's cgroup once it exists: its daemon counter is checked.
    pub engine_cgroup: watch::Receiver<Option<EngineCgroup>>,
    /// The agent's status: the engine's pid while one runs.
    pub status: watch::Receiver<super::status::Status>,
    pub reconcile_interval: Duration,
    pub kills: mpsc::Sender<OomKill>,
    pub metrics: Metrics,
    pub heartbeat: Heartbeat,
}

impl OomWatch {
    pub async fn run(self) {
        let OomWatch { kmsg_path, vmstat_path, engine_cgroup_path, engine_cgroup, status, reconcile_interval, kills, metrics, heartbeat } = self;
        let mut reader = match KmsgReader::open_at_end(&kmsg_path) {
            Ok(reader) => {
                info!(kmsg = %kmsg_path.display(), engine_cgroup = %engine_cgroup_path, "OOM watcher reading the kernel log");
                Some(reader)
            }
            Err(error) => {
                warn!(kmsg = %kmsg_path.display(), %error, "cannot read the kernel log: OOM kills are counted from /proc/vmstat only, unattributed");
                None
            }
        };
        let mut assembler = OomAssembler::new(engine_cgroup_path);
        let mut host = Reconciler::new();
        let mut daemon = Reconciler::new();
        // Baselines: kills before the agent started are not ours to report.
        let read_host = || std::fs::read_to_string(&vmstat_path).ok().as_deref().and_then(parse_vmstat_oom_kill);
        let read_daemon = || engine_cgroup.borrow().as_ref().and_then(|c| c.daemon_oom_kills().ok());
        if let Some(n) = read_host() {
            host.reconcile(n, 0);
        }
        let mut daemon_seen = read_daemon().is_some_and(|n| {
            daemon.reconcile(n, 0);
            true
        });
        let (mut host_events, mut daemon_events, mut counted_only) = (0u64, 0u64, 0u64);
        let mut clock = ClockOffset::now();
        let mut log_limit = LogLimiter::new(WARNINGS_LOGGED_PER_WINDOW, WARNINGS_WINDOW);
        let mut ticker = tokio::time::interval(reconcile_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let record = async {
                match reader.as_mut() {
                    Some(r) => r.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                read = record => match read {
                    Ok(Some(KmsgRead::Record(text))) => {
                        let Some(record) = parse_kmsg_record(&text) else { continue };
                        if !record.from_kernel() {
                            note_user_record(&record, &metrics, &mut log_limit);
                            continue;
                        }
                        let Some(mut event) = assembler.feed_record(&record) else { continue };
                        // Without a cgroup of its own, the engine is known by its pid.
                        if event.attribution == Attribution::Other && status.borrow().engine_pid == Some(event.pid) {
                            event.attribution = Attribution::Engine;
                        }
                        host_events += 1;
                        daemon_events += u64::from(event.attribution == Attribution::Engine);
                        let kill = OomKill::from_event(event, &clock);
                        if kills.send(kill).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(KmsgRead::Overrun)) => {
                        metrics.kmsg_overruns.inc();
                        if let Verdict::Log { suppressed_before } = log_limit.check(OVERRUN, tokio::time::Instant::now()) {
                            warn!(suppressed_before, "the kernel log overwrote records before they were read; the counters will account for lost OOM kills");
                        }
                    }
                    Ok(None) => {
                        warn!(kmsg = %kmsg_path.display(), "the kernel log reader ended; OOM kills are counted from /proc/vmstat only");
                        reader = None;
                    }
                    Err(error) => {
                        warn!(kmsg = %kmsg_path.display(), %error, "cannot read the kernel log; OOM kills are counted from /proc/vmstat only");
                        reader = None;
                    }
                },
                _ = ticker.tick() => {
                    heartbeat.beat();
                    for (kind, suppressed) in log_limit.flush(tokio::time::Instant::now()) {
                        let what = if kind == OVERRUN { "kernel log overruns" } else { "OOM-looking lines written into the kernel log from user space" };
                        warn!(suppressed, "{suppressed} more {what} in the last {:?} (not logged one by one)", log_limit.window());
                    }
                    // The offset drifts only with clock steps; refreshing it keeps the next window right.
                    clock = ClockOffset::now();
                    let now_ms = crate::clock::unix_time_ms();
                    let mut found = vec![];
                    let mut engine_missed = 0;
                    if let Some(n) = read_daemon() {
                        if daemon_seen {
                            engine_missed = daemon.reconcile(n, std::mem::take(&mut daemon_events));
                        } else {
                            // A new engine cgroup: its counter starts the baseline.
                            daemon.reconcile(n, 0);
                            daemon_seen = true;
                            daemon_events = 0;
                        }
                        if engine_missed > 0 {
                            counted_only += 1;
                            found.push(OomKill::counted_only(counted_only, Attribution::Engine, engine_missed, now_ms));
                        }
                    }
                    if let Some(n) = read_host() {
                        // Engine kills the daemon counter found are explained now: the host counter saw them too.
                        let missed = host.reconcile(n, std::mem::take(&mut host_events) + engine_missed);
                        if missed > 0 {
                            counted_only += 1;
                            found.push(OomKill::counted_only(counted_only, Attribution::Unattributed, missed, now_ms));
                        }
                    }
                    for kill in found {
                        if kills.send(kill).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// A record user space wrote: counted, never assembled. One that reads like
/// an OOM line is said (rate-limited): someone writes the kernel's words into
/// its log, and an operator should know, without the flood reaching the log.
fn note_user_record(record: &KmsgRecord<'_>, metrics: &Metrics, limiter: &mut LogLimiter) {
    metrics.kmsg_user_records.inc();
    if parse_oom_line(record.message).is_none() {
        return;
    }
    if let Verdict::Log { suppressed_before } = limiter.check(FORGED_OOM_LINE, tokio::time::Instant::now()) {
        let quoted: String = record.message.chars().take(QUOTED_MESSAGE_CHARS).collect();
        warn!(
            seq = record.seq, facility = record.facility, message = ?quoted, suppressed_before,
            "ignored an OOM-looking line written into the kernel log from user space: only the kernel's own records count"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A watcher over a FIFO standing in for /dev/kmsg and a vmstat file the
    /// test writes: the real loop, reader and reconcilers, with fixture inputs.
    struct Fixture {
        _dir: tempfile::TempDir,
        kmsg: std::fs::File,
        vmstat: PathBuf,
        kills: mpsc::Receiver<OomKill>,
        metrics: Metrics,
        task: tokio::task::JoinHandle<()>,
    }

    impl Fixture {
        async fn start(oom_kill_counter: u64) -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let kmsg_path = dir.path().join("kmsg");
            nix::unistd::mkfifo(&kmsg_path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
            // Read-write: opening never blocks, and the FIFO never reads as ended.
            let kmsg = std::fs::OpenOptions::new().read(true).write(true).open(&kmsg_path).expect("open fifo");
            let vmstat = dir.path().join("vmstat");
            std::fs::write(&vmstat, format!("pgfault 1\noom_kill {oom_kill_counter}\n")).expect("vmstat");
            let (kills_tx, kills) = mpsc::channel(16);
            let metrics = Metrics::new();
            let status = crate::observe::status::Status::initial(Path::new("/"));
            let watch = OomWatch {
                kmsg_path,
                vmstat_path: vmstat.clone(),
                engine_cgroup_path: "/test-engine".into(),
                engine_cgroup: watch::channel(None).1,
                status: watch::channel(status).1,
                reconcile_interval: Duration::from_millis(20),
                kills: kills_tx,
                metrics: metrics.clone(),
                heartbeat: crate::observe::liveness::Liveness::default().register("oom", Duration::from_secs(10)),
            };
            let task = tokio::spawn(watch.run());
            // The test runtime has one thread: yielding runs the watcher up to
            // its first wait, so it has read its counter baselines.
            tokio::task::yield_now().await;
            Self { _dir: dir, kmsg, vmstat, kills, metrics, task }
        }

        fn kernel_counts(&self, oom_kill_counter: u64) {
            std::fs::write(&self.vmstat, format!("pgfault 1\noom_kill {oom_kill_counter}\n")).expect("vmstat");
        }

        fn kernel_prints(&mut self, records: &[&str]) {
            for record in records {
                writeln!(self.kmsg, "{record}").expect("write fifo");
            }
        }

        async fn next_kill(&mut self) -> OomKill {
            tokio::time::timeout(Duration::from_secs(10), self.kills.recv()).await.expect("no OOM kill reported within 10 s").expect("watcher ended")
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    const STEP_OOM: [&str; 3] = [
        "4,100,5000000,-;busybox invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
        "6,101,5000100,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/test-engine,task_memcg=/test-engine/buildkit/step42,task=busybox,pid=4242,uid=0",
        "3,102,5000200,-;Memory cgroup out of memory: Killed process 4242 (busybox) total-vm:300000kB, anon-rss:262144kB, file-rss:4kB, shmem-rss:0kB, UID:0 pgtables:600kB oom_score_adj:0",
    ];

    #[tokio::test]
    async fn a_kernel_report_becomes_one_attributed_kill_and_the_counter_agrees() {
        let mut fx = Fixture::start(5).await;
        fx.kernel_counts(6);
        fx.kernel_prints(&STEP_OOM);
        let kill = fx.next_kill().await;
        assert_eq!(kill.id, 102);
        assert_eq!((kill.attribution, kill.container_id.as_deref()), ("build_step", Some("step42")));
        assert_eq!((kill.pid, kill.process_name.as_deref()), (Some(4242), Some("busybox")));
        assert_eq!((kill.scope, kill.anon_rss_bytes, kill.count), (Some("memcg"), Some(256 << 20), 1));
        // The counter's bump is explained by the line: several windows later, nothing more.
        let more = tokio::time::timeout(Duration::from_millis(300), fx.kills.recv()).await;
        assert!(more.is_err(), "a kill the kernel log explained was counted again: {more:?}");
    }

    #[tokio::test]
    async fn records_from_user_space_are_counted_and_never_a_kill() {
        let mut fx = Fixture::start(5).await;
        // The same report as user space writes it (facility 1: priorities 8..15), naming another pid.
        let forged: Vec<String> = STEP_OOM.iter().map(|r| format!("1{}", r.replacen(",10", ",9", 1).replace("4242", "666"))).collect();
        fx.kernel_prints(&forged.iter().map(String::as_str).collect::<Vec<_>>());
        fx.kernel_counts(6);
        fx.kernel_prints(&STEP_OOM);
        // The log is read in order: the real kill comes after every forged line was read.
        let kill = fx.next_kill().await;
        assert_eq!((kill.pid, kill.attribution), (Some(4242), "build_step"));
        assert_eq!(fx.metrics.kmsg_user_records.get(), 3);
        let more = tokio::time::timeout(Duration::from_millis(300), fx.kills.recv()).await;
        assert!(more.is_err(), "a forged line became a kill: {more:?}");
    }

    #[tokio::test]
    async fn a_counted_kill_without_kernel_lines_is_reported_unattributed() {
        let mut fx = Fixture::start(5).await;
        fx.kernel_counts(7);
        let kill = fx.next_kill().await;
        assert_eq!((kill.attribution, kill.count, kill.pid), ("unattributed", 2, None));
        assert_ne!(kill.id & COUNTED_ONLY_ID_BIT, 0);
        let _ = fx.metrics; // the agent counts kills as it receives them
    }

    #[tokio::test]
    async fn kills_before_the_watcher_started_are_not_reported() {
        let mut fx = Fixture::start(1_000).await;
        let nothing = tokio::time::timeout(Duration::from_millis(300), fx.kills.recv()).await;
        assert!(nothing.is_err(), "the counter's starting value was reported: {nothing:?}");
        fx.kernel_counts(1_001);
        fx.kernel_prints(&STEP_OOM);
        assert_eq!(fx.next_kill().await.pid, Some(4242));
    }

    #[test]
    fn clock_offset_maps_boot_time_to_unix_time() {
        let clock = ClockOffset { unix_minus_monotonic_us: 1_700_000_000_000_000 };
        assert_eq!(clock.unix_ms(5_000_000), 1_700_000_005_000);
    }

    #[test]
    fn summary_names_the_victim_and_the_step() {
        let kill = OomKill {
            id: 7,
            unix_time_ms: 0,
            attribution: "build_step",
            container_id: Some("abc".into()),
            pid: Some(42),
            process_name: Some("busybox".into()),
            scope: Some("memcg"),
            task_memcg: None,
            oom_memcg: None,
            total_vm_bytes: None,
            anon_rss_bytes: Some(300 << 20),
            file_rss_bytes: None,
            shmem_rss_bytes: None,
            count: 1,
        };
        assert_eq!(kill.summary(), "busybox (pid 42): build_step in step abc, anon-rss 300 MiB");
        let lost = OomKill::counted_only(1, Attribution::Unattributed, 2, 0);
        assert_eq!(lost.summary(), "2 kill(s) without kernel lines: unattributed");
        assert_ne!(lost.id & COUNTED_ONLY_ID_BIT, 0);
    }
}
