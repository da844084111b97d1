//! The step watcher's I/O edge: follows every build step's cgroup below the
//! engine's (`<engine>/buildkit/<container id>`), reads its figures while it
//! lives and once more when it empties, and listens to the engine's build
//! history to say which build each step belonged to. Finished records go to
//! the main loop (status, metrics); the pure parts are in [`super::steps`].
//!
//! Behaviour:
//! - An inotify watch on `buildkit/` reports a step's cgroup the moment runc
//!   creates it, and its removal the moment runc removes it.
//! - While steps live, every `poll_interval` (20 ms by default) each one's
//!   figures and `cgroup.procs` are read, from files opened once per step:
//!   CPU (v1 `cpuacct.usage`, v2 `cpu.stat`) and peak memory (v1
//!   `memory.max_usage_in_bytes`, v2 `memory.peak`) at every poll, block I/O
//!   (v1 `blkio.throttle.io_service_bytes`, v2 `io.stat`) and the cgroup's
//!   OOM kill counter at every fifth and at the end. With no step alive the
//!   watcher reads nothing.
//! - Where the step has a `cgroup.events` (v2, and a v1 host's hybrid
//!   unified tree, where runc places steps too), an inotify watch on it
//!   wakes the watcher the moment the step empties (`populated 0`), without
//!   waiting for the next poll.
//! - A step is finished when its `cgroup.procs` is empty after holding a
//!   process (its figures read once more then), or when its cgroup is removed
//!   first (runc removes it within milliseconds of the last exit): the
//!   figures of the last read stand. The figures are monotonic, so the last
//!   read before the end is short of the truth by at most one interval's worth.
//! - A finished record waits [`ATTRIBUTION_GRACE`] for the engine's history
//!   to report any build that started meanwhile, and, when the cgroup's OOM
//!   counter says it was killed, up to [`OOM_KILL_WAIT`] for the OOM watcher's
//!   kill with the same container id (whose id it then carries).
//! - The build history stream is reopened whenever it ends (engine restarts);
//!   while it is closed, steps get no `build_ref` (a build may run unseen).
//!
//! Why a poll on v1: an empty v1 cgroup says so nowhere a watch can see
//! (`notify_on_release` runs a host-wide release agent, after the fact), and
//! by the time inotify reports the directory gone its files are gone too.

use super::liveness::Heartbeat;
use super::status::Status;
use super::steps::{
    attach_oom_kill, build_record, is_container_id, parse_blkio_service_bytes, parse_cpu_stat_usage_usec, parse_cpuacct_usage_usec, parse_io_stat,
    parse_single_u64, procs_empty, BuildLog, StepFigures, StepRecord,
};
use crate::backoff::PollGaps;
use crate::clock::unix_time_ms;
use crate::engine::cgroup::{parse_flat_keyed, CgroupVersion, EngineCgroup};
use crate::engine::client::{BuildEvent, EngineClient};
use inotify::{Inotify, WatchDescriptor, WatchMask};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

/// A finished step waits this long before it is attributed: the engine's
/// history event of a build that started just before the step ended is on
/// its way over a local socket (under a millisecond; 100 ms on a loaded box).
pub const ATTRIBUTION_GRACE: Duration = Duration::from_millis(100);
/// A step its cgroup says was OOM-killed waits this long for the OOM
/// watcher's kill (kmsg lines are read within milliseconds of the kill).
pub const OOM_KILL_WAIT: Duration = Duration::from_secs(2);
/// A step's `cgroup.events` is looked for this many times (at its creation
/// and the polls after); a host whose runc puts steps in no v2 tree has none.
const EVENTS_WATCH_TRIES: u8 = 5;
/// Block I/O and the OOM counter are read every this many polls (and at a
/// step's start and end): CPU and peak memory every poll.
const FULL_READ_EVERY: u32 = 5;
/// The loop beats its heartbeat at least this often while idle.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// Reconnects to the engine's history: from a quarter second, doubling to 5 s
/// (an engine that is not running costs a connect attempt every 5 s).
const HISTORY_RETRY_MIN: Duration = Duration::from_millis(250);
const HISTORY_RETRY_MAX: Duration = Duration::from_secs(5);

/// Where a step's files are: the hierarchy dirs holding `<id>/` for each
/// figure (one dir on v2; the memory, cpuacct and blkio hierarchies on v1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepDirs {
    pub version: CgroupVersion,
    /// `<engine>/buildkit` in the memory hierarchy (v2: the only one).
    pub memory: PathBuf,
    pub cpu: Option<PathBuf>,
    pub io: Option<PathBuf>,
    /// Where each step's `cgroup.events` is: the v2 hierarchy (on a v1 host,
    /// the hybrid unified mount where runc also places steps), whose
    /// `populated 0` wakes the watcher the moment a step empties.
    pub events: Option<PathBuf>,
}

impl StepDirs {
    /// The step dirs of an engine cgroup; on v1 the cpuacct and blkio
    /// hierarchies are found in `mountinfo` (None where not mounted).
    pub fn of(engine: &EngineCgroup, mounts: &[crate::volume::mountinfo::MountEntry]) -> Self {
        let memory = engine.dir.join("buildkit");
        match engine.version {
            CgroupVersion::V2 => Self { version: engine.version, cpu: Some(memory.clone()), io: Some(memory.clone()), events: Some(memory.clone()), memory },
            CgroupVersion::V1 => {
                let name = engine.relative.trim_start_matches('/');
                let hierarchy = |controller: &str| {
                    mounts
                        .iter()
                        .find(|m| m.fs_type == "cgroup" && m.super_options.split(',').any(|o| o == controller))
                        .map(|m| m.mount_point.join(name).join("buildkit"))
                };
                let unified = mounts.iter().find(|m| m.fs_type == "cgroup2").map(|m| m.mount_point.join(name).join("buildkit"));
                Self { version: engine.version, memory, cpu: hierarchy("cpuacct"), io: hierarchy("blkio"), events: unified }
            }
        }
    }

    /// Opens a step's files (those that do not open read as None).
    pub fn open(&self, id: &str) -> StepFiles {
        let memory = Some(self.memory.as_path());
        let (cpu, peak, io, oom) = match self.version {
            CgroupVersion::V2 => ("cpu.stat", "memory.peak", "io.stat", "memory.events"),
            CgroupVersion::V1 => ("cpuacct.usage", "memory.max_usage_in_bytes", "blkio.throttle.io_service_bytes", "memory.oom_control"),
        };
        let file = |dir: Option<&Path>, name: &str| CgroupFile::open(dir.map(|d| d.join(id).join(name)));
        StepFiles {
            version: self.version,
            procs: self.memory.join(id).join("cgroup.procs"),
            cpu: file(self.cpu.as_deref(), cpu),
            peak: file(memory, peak),
            io: file(self.io.as_deref(), io),
            oom: file(memory, oom),
            buf: Vec::new(),
        }
    }

    /// The steps' cgroups there now.
    pub fn list(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.memory) else { return vec![] };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| is_container_id(name))
            .collect()
    }
}

/// A step's cgroup files, opened once and re-read from offset 0 at every
/// poll (but `cgroup.procs`): an open and a close per file per poll cost
/// more than the read (a path walk through kernfs each time;
/// benches/steps.rs). A file of a removed cgroup reads as an error
/// (ENODEV), as a missing one would.
#[derive(Debug)]
pub struct StepFiles {
    version: CgroupVersion,
    /// Opened at each read: v1 caches an open `cgroup.procs`'s pid list for
    /// a second, so a re-read of one kept open says what it said before.
    procs: PathBuf,
    cpu: CgroupFile,
    peak: CgroupFile,
    io: CgroupFile,
    oom: CgroupFile,
    buf: Vec<u8>,
}

/// One figure file of a step's cgroup, opened once it exists: runc creates
/// a step's cgroup in one hierarchy after another (memory, then cpuacct,
/// blkio...), so a file missing when the step is first seen is looked for
/// again at each read until it opens.
#[derive(Debug)]
struct CgroupFile {
    path: Option<PathBuf>,
    file: Option<fs::File>,
}

impl CgroupFile {
    fn open(path: Option<PathBuf>) -> Self {
        let file = path.as_ref().and_then(|p| fs::File::open(p).ok());
        Self { path, file }
    }

    fn get(&mut self) -> Option<&fs::File> {
        if self.file.is_none() {
            self.file = self.path.as_ref().and_then(|p| fs::File::open(p).ok());
        }
        self.file.as_ref()
    }
}

/// Room for a cgroup file: io stats of a few dozen devices, a pid list of a
/// busy step (a longer one is read in more passes).
const READ_BUFFER: usize = 16 * 1024;

impl StepFiles {
    /// Some(true) when the step's cgroup holds no process, None when it is gone.
    pub fn is_empty(&mut self) -> Option<bool> {
        let procs = fs::File::open(&self.procs).ok();
        let text = read_at_start(procs.as_ref(), &mut self.buf)?;
        Some(procs_empty(text))
    }

    /// What the cgroup says now; `full`: block I/O and the OOM counter too
    /// (CPU and peak memory are read every time).
    pub fn read(&mut self, full: bool) -> StepFigures {
        let v2 = self.version == CgroupVersion::V2;
        let cpu_usec = read_at_start(self.cpu.get(), &mut self.buf).and_then(|t| if v2 { parse_cpu_stat_usage_usec(t) } else { parse_cpuacct_usage_usec(t) });
        let peak_memory_bytes = read_at_start(self.peak.get(), &mut self.buf).and_then(parse_single_u64);
        let mut figures = StepFigures { cpu_usec, peak_memory_bytes, ..StepFigures::default() };
        if full {
            let io = read_at_start(self.io.get(), &mut self.buf).map(|t| if v2 { parse_io_stat(t) } else { parse_blkio_service_bytes(t) });
            figures.io_read_bytes = io.map(|(r, _)| r);
            figures.io_write_bytes = io.map(|(_, w)| w);
            figures.oom_kills = read_at_start(self.oom.get(), &mut self.buf).and_then(|t| parse_flat_keyed(t, "oom_kill"));
        }
        figures
    }
}

/// The whole of `file` from offset 0 (a cgroup file is regenerated at each
/// read from the start), as text; None when it cannot be read.
fn read_at_start<'a>(file: Option<&fs::File>, buf: &'a mut Vec<u8>) -> Option<&'a str> {
    use std::os::unix::fs::FileExt;
    let file = file?;
    buf.resize(READ_BUFFER, 0);
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        let n = file.read_at(&mut buf[len..], u64::try_from(len).ok()?).ok()?;
        if n == 0 {
            break;
        }
        len += n;
    }
    std::str::from_utf8(&buf[..len]).ok()
}

/// A step whose cgroup is alive.
#[derive(Debug)]
pub struct LiveStep {
    pub files: StepFiles,
    /// Polls since it was seen: block I/O and the OOM counter are read every [`FULL_READ_EVERY`].
    pub polls: u32,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    pub figures: StepFigures,
    /// A process was seen in it: an empty cgroup before that is one runc
    /// has not moved the step's process into yet.
    pub populated: bool,
    /// Its `cgroup.events` is watched.
    pub events_watched: bool,
    /// Tries left to watch it (its dir may come a moment after the memory one's, or never).
    pub events_tries: u8,
}

/// How a step's end was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Empty after holding a process: the figures were read after the last exit.
    Emptied,
    /// The cgroup was gone: the previous read's figures stand.
    Gone,
}

/// Reads a live step's files; Some when it has ended.
fn read_step(step: &mut LiveStep, now_unix_ms: i64) -> Option<Ended> {
    // Figures first: at a step's end runc removes the cgroup within
    // milliseconds, and a read that races it is better spent on them.
    let full = step.polls.is_multiple_of(FULL_READ_EVERY);
    step.polls = step.polls.wrapping_add(1);
    step.figures = step.figures.merge(step.files.read(full));
    // Seen now, alive or just ended (runc removes an ended step's cgroup
    // within milliseconds: gone is as good as the end).
    step.last_seen_unix_ms = now_unix_ms;
    let Some(empty) = step.files.is_empty() else { return Some(Ended::Gone) };
    if !empty {
        step.populated = true;
        return None;
    }
    if !step.populated {
        return None;
    }
    if !full {
        // The end: block I/O and the OOM counter as of now, if still there.
        step.figures = step.figures.merge(step.files.read(true));
    }
    Some(Ended::Emptied)
}

/// A finished step waiting for its attribution.
#[derive(Debug)]
struct Finished {
    record: StepRecord,
    /// Attributed from then on (the grace for history events).
    ready_at: Instant,
    /// Sent without a kill id from then on.
    give_up_at: Instant,
}

/// What the build-history task tells the loop.
#[derive(Debug)]
enum HistoryNews {
    Opened(i64),
    Event(BuildEvent),
    Closed(i64),
}

/// Everything the watcher needs, moved into its task.
#[derive(Debug)]
pub struct StepWatch {
    pub engine_cgroup: watch::Receiver<Option<EngineCgroup>>,
    pub engine_socket: PathBuf,
    /// OOM kills (to tie in by container id) come from here.
    pub status: watch::Receiver<Status>,
    pub poll_interval: Duration,
    pub records: mpsc::Sender<StepRecord>,
    pub heartbeat: Heartbeat,
}

impl StepWatch {
    /// Runs until the receiver of the records goes away.
    pub async fn run(mut self) {
        let (news_tx, mut news) = mpsc::channel(64);
        let history = tokio::spawn(listen_history(self.engine_socket.clone(), self.status.clone(), news_tx));
        let mut steps = Steps::default();
        let mut idle = tokio::time::interval(IDLE_TICK);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'engine: loop {
            // Until the engine's cgroup exists there is nothing to follow (history events are still taken).
            let dirs = loop {
                if let Some(cgroup) = self.engine_cgroup.borrow_and_update().clone() {
                    let mounts = crate::volume::mountinfo::read_mountinfo(Path::new("/proc/self/mountinfo")).unwrap_or_default();
                    break StepDirs::of(&cgroup, &mounts);
                }
                tokio::select! {
                    changed = self.engine_cgroup.changed() => if changed.is_err() { break 'engine },
                    Some(n) = news.recv() => steps.history(n),
                    _ = idle.tick() => self.heartbeat.beat(),
                }
            };
            info!(steps = %dirs.memory.display(), cpu = ?dirs.cpu, io = ?dirs.io, version = dirs.version.as_str(), "following build steps");
            let mut watcher = match CgroupWatcher::new(&dirs.memory) {
                Ok(w) => w,
                Err(error) => {
                    warn!(dir = %dirs.memory.display(), %error, "cannot watch for build steps; steps go unrecorded until the engine's cgroup changes");
                    CgroupWatcher::none()
                }
            };
            steps.scan(&dirs);
            loop {
                let polling = steps.busy();
                tokio::select! {
                    changed = self.engine_cgroup.changed() => {
                        if changed.is_err() { break 'engine }
                        // The engine's cgroup went or changed: what lived in the old one is finished.
                        steps.finish_all();
                        continue 'engine;
                    }
                    Some(n) = news.recv() => steps.history(n),
                    seen = watcher.next() => match seen {
                        Some(Seen::Created(id)) => steps.created(&dirs, id),
                        Some(Seen::Removed(id)) => steps.removed(&id),
                        Some(Seen::Changed(id)) => steps.changed(&id),
                        Some(Seen::StepsDir) => steps.scan(&dirs),
                        None => {}
                    },
                    _ = poll.tick(), if polling => {
                        steps.tick();
                    }
                    _ = idle.tick() => self.heartbeat.beat(),
                }
                steps.sync_event_watches(&dirs, &mut watcher);
                if !steps.finished.is_empty() {
                    let kills = self.status.borrow().recent_ooms.clone();
                    for record in steps.take_ready(&kills) {
                        debug!(container_id = %record.container_id, "{}", record.summary());
                        if self.records.send(record).await.is_err() {
                            break 'engine;
                        }
                    }
                }
            }
        }
        history.abort();
    }
}

/// The watcher's state: live steps, finished ones waiting, what the history said.
#[derive(Debug, Default)]
struct Steps {
    live: BTreeMap<String, LiveStep>,
    finished: Vec<Finished>,
    builds: BuildLog,
}

impl Steps {
    /// Polling is needed while a step lives or waits.
    fn busy(&self) -> bool {
        !self.live.is_empty() || !self.finished.is_empty()
    }

    fn history(&mut self, news: HistoryNews) {
        match news {
            HistoryNews::Opened(at) => self.builds.opened(at),
            HistoryNews::Event(e) => self.builds.apply(&e),
            HistoryNews::Closed(at) => self.builds.closed(at),
        }
    }

    /// Steps whose cgroups exist now and are not followed yet.
    fn scan(&mut self, dirs: &StepDirs) {
        for id in dirs.list() {
            if !self.live.contains_key(&id) {
                self.created(dirs, id);
            }
        }
    }

    fn created(&mut self, dirs: &StepDirs, id: String) {
        if self.live.contains_key(&id) {
            return;
        }
        let now = unix_time_ms();
        let mut files = dirs.open(&id);
        let figures = files.read(true);
        let populated = files.is_empty() == Some(false);
        self.live.insert(
            id,
            LiveStep {
                files,
                polls: 1,
                first_seen_unix_ms: now,
                last_seen_unix_ms: now,
                figures,
                populated,
                events_watched: false,
                events_tries: EVENTS_WATCH_TRIES,
            },
        );
    }

    /// Its cgroup is gone: finished with what the last read said.
    fn removed(&mut self, id: &str) {
        if let Some(step) = self.live.remove(id) {
            self.finish(id, step, unix_time_ms(), "removed");
        }
    }

    fn tick(&mut self) {
        let now = unix_time_ms();
        let ended: Vec<(String, Ended)> = self.live.iter_mut().filter_map(|(id, step)| Some((id.clone(), read_step(step, now)?))).collect();
        for (id, how) in ended {
            self.end(
                &id,
                match how {
                    Ended::Emptied => "emptied",
                    Ended::Gone => "gone",
                },
            );
        }
    }

    /// Its `cgroup.events` changed: read it now (the end, most likely).
    fn changed(&mut self, id: &str) {
        let now = unix_time_ms();
        match self.live.get_mut(id).and_then(|step| read_step(step, now)) {
            Some(Ended::Emptied) => self.end(id, "emptied_event"),
            Some(Ended::Gone) => self.end(id, "gone"),
            None => {}
        }
    }

    fn end(&mut self, id: &str, ended: &'static str) {
        if let Some(step) = self.live.remove(id) {
            let last = step.last_seen_unix_ms;
            self.finish(id, step, last, ended);
        }
    }

    /// Watches the `cgroup.events` of live steps not watched yet; forgets
    /// the watches of finished ones.
    fn sync_event_watches(&mut self, dirs: &StepDirs, watcher: &mut CgroupWatcher) {
        let Some(events) = &dirs.events else { return };
        for (id, step) in &mut self.live {
            if !step.events_watched && step.events_tries > 0 {
                step.events_tries -= 1;
                step.events_watched = watcher.watch_events(id, &events.join(id).join("cgroup.events"));
            }
        }
        let gone: Vec<String> = watcher.events_wds.values().filter(|id| !self.live.contains_key(*id)).cloned().collect();
        for id in gone {
            watcher.unwatch_events(&id);
        }
    }

    /// Everything still live ends now (the engine's cgroup is gone).
    fn finish_all(&mut self) {
        let now = unix_time_ms();
        for (id, mut step) in std::mem::take(&mut self.live) {
            step.figures = step.figures.merge(step.files.read(true));
            self.finish(&id, step, now, "engine_cgroup_gone");
        }
    }

    /// `ended`: how the end was seen, for the log: `emptied` (a poll) or
    /// `emptied_event` (`cgroup.events`), both with the figures read after
    /// the last process left; `removed` (inotify) or `gone` (a poll): the
    /// cgroup went first, the previous read's figures stand; or `engine_cgroup_gone`.
    fn finish(&mut self, id: &str, step: LiveStep, last_seen_unix_ms: i64, ended: &'static str) {
        // A cgroup that never held a process and used no CPU was no step
        // (runc failed before starting one): nothing to record.
        if !step.populated && step.figures.cpu_usec.unwrap_or(0) == 0 {
            debug!(container_id = %id, "a step cgroup came and went empty");
            return;
        }
        debug!(container_id = %id, ended, "build step finished");
        let record = build_record(id, step.first_seen_unix_ms, last_seen_unix_ms, step.figures);
        let now = Instant::now();
        self.finished.push(Finished { record, ready_at: now + ATTRIBUTION_GRACE, give_up_at: now + OOM_KILL_WAIT });
    }

    /// The finished records now due: attributed to builds, OOM kills tied in.
    fn take_ready(&mut self, kills: &std::collections::VecDeque<super::oom_watch::OomKill>) -> Vec<StepRecord> {
        let now = Instant::now();
        let now_ms = unix_time_ms();
        let mut ready = vec![];
        let mut waiting = vec![];
        for mut f in std::mem::take(&mut self.finished) {
            if now < f.ready_at {
                waiting.push(f);
                continue;
            }
            let tied = attach_oom_kill(&mut f.record, kills);
            if f.record.oom_killed && !tied && now < f.give_up_at {
                waiting.push(f);
                continue;
            }
            let (only, all) = self.builds.attribute(f.record.first_seen_unix_ms, f.record.last_seen_unix_ms, now_ms);
            f.record.build_ref = only;
            f.record.overlapping_build_refs = all;
            ready.push(f.record);
        }
        self.finished = waiting;
        // Builds that completed before every step still to be recorded began are no longer needed.
        let oldest = self.live.values().map(|s| s.first_seen_unix_ms).chain(self.finished.iter().map(|f| f.record.first_seen_unix_ms)).min();
        self.builds.forget_completed_before(oldest.unwrap_or(now_ms) - 60_000);
        ready
    }
}

/// What the inotify watch saw.
#[derive(Debug)]
enum Seen {
    Created(String),
    Removed(String),
    /// Its `cgroup.events` changed (populated, most likely).
    Changed(String),
    /// `buildkit/` itself appeared, or events were lost: scan it.
    StepsDir,
}

/// inotify on the engine's cgroup (for `buildkit/` to appear) and on
/// `buildkit/` (steps created and removed).
struct CgroupWatcher {
    events: Option<inotify::EventStream<[u8; 4096]>>,
    steps_dir: PathBuf,
    steps_wd: Option<WatchDescriptor>,
    /// The steps whose `cgroup.events` is watched, by watch.
    events_wds: BTreeMap<WatchDescriptor, String>,
}

impl std::fmt::Debug for CgroupWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CgroupWatcher").field("steps_dir", &self.steps_dir).finish_non_exhaustive()
    }
}

impl CgroupWatcher {
    fn new(steps_dir: &Path) -> std::io::Result<Self> {
        let inotify = Inotify::init()?;
        if let Some(engine) = steps_dir.parent() {
            inotify.watches().add(engine, WatchMask::CREATE | WatchMask::ONLYDIR)?;
        }
        let steps_wd = inotify.watches().add(steps_dir, WatchMask::CREATE | WatchMask::DELETE | WatchMask::ONLYDIR).ok();
        let events = inotify.into_event_stream([0u8; 4096])?;
        Ok(Self { events: Some(events), steps_dir: steps_dir.to_path_buf(), steps_wd, events_wds: BTreeMap::new() })
    }

    fn none() -> Self {
        Self { events: None, steps_dir: PathBuf::new(), steps_wd: None, events_wds: BTreeMap::new() }
    }

    /// Watches `file` (a step's `cgroup.events`) for changes; false when it
    /// cannot (not there yet: runc creates the hierarchies' dirs one by one).
    fn watch_events(&mut self, id: &str, file: &Path) -> bool {
        let Some(events) = self.events.as_mut() else { return false };
        match events.watches().add(file, WatchMask::MODIFY) {
            Ok(wd) => {
                self.events_wds.insert(wd, id.to_owned());
                true
            }
            Err(_) => false,
        }
    }

    /// Forgets a finished step's watch (the kernel drops it with the file).
    fn unwatch_events(&mut self, id: &str) {
        let wds: Vec<WatchDescriptor> = self.events_wds.iter().filter(|(_, v)| v.as_str() == id).map(|(wd, _)| wd.clone()).collect();
        for wd in wds {
            self.events_wds.remove(&wd);
            if let Some(events) = self.events.as_mut() {
                let _ = events.watches().remove(wd);
            }
        }
    }

    /// The next thing seen; never resolves without a watch.
    async fn next(&mut self) -> Option<Seen> {
        let Some(events) = self.events.as_mut() else { return std::future::pending().await };
        loop {
            let event = match events.next().await {
                Some(Ok(event)) => event,
                Some(Err(error)) => {
                    warn!(%error, "the build-step watch failed; steps go unrecorded until the engine's cgroup changes");
                    self.events = None;
                    return None;
                }
                None => {
                    self.events = None;
                    return None;
                }
            };
            if event.mask.contains(inotify::EventMask::Q_OVERFLOW) {
                // Events were lost (a burst of steps): look at the dir instead.
                return Some(Seen::StepsDir);
            }
            if let Some(id) = self.events_wds.get(&event.wd) {
                if event.mask.contains(inotify::EventMask::IGNORED) {
                    self.events_wds.remove(&event.wd);
                    continue;
                }
                return Some(Seen::Changed(id.clone()));
            }
            let name = event.name.map(OsString::into_string);
            if Some(&event.wd) == self.steps_wd.as_ref() {
                let Some(Ok(name)) = name else { continue };
                if !is_container_id(&name) {
                    continue;
                }
                if event.mask.contains(inotify::EventMask::CREATE) {
                    return Some(Seen::Created(name));
                }
                if event.mask.contains(inotify::EventMask::DELETE) {
                    return Some(Seen::Removed(name));
                }
                continue;
            }
            if name.as_ref().and_then(|n| n.as_deref().ok()) == Some("buildkit") && self.steps_wd.is_none() {
                self.steps_wd = events.watches().add(&self.steps_dir, WatchMask::CREATE | WatchMask::DELETE | WatchMask::ONLYDIR).ok();
                return Some(Seen::StepsDir);
            }
        }
    }
}

impl Drop for CgroupWatcher {
    /// As the engine client's socket watch: closing an inotify descriptor
    /// waits out an RCU grace period, which a blocking-pool thread pays.
    fn drop(&mut self) {
        if let (Some(events), Ok(runtime)) = (self.events.take(), tokio::runtime::Handle::try_current()) {
            drop(runtime.spawn_blocking(move || drop(events)));
        }
    }
}

/// Listens to the engine's build history for as long as `news` is open,
/// reopening it whenever it ends, and at once when the engine becomes ready
/// (not at the end of a backoff: a build right after ready would find no
/// history open, and its steps no build).
///
/// The stream is closed as soon as the agent stops the engine, and not
/// reopened until it runs again: buildkitd's graceful stop waits for every
/// open call, so a history stream left open held each drain's engine stop
/// to its SIGKILL.
async fn listen_history(socket: PathBuf, mut status: watch::Receiver<Status>, news: mpsc::Sender<HistoryNews>) {
    let mut gaps = PollGaps::doubling(HISTORY_RETRY_MIN, HISTORY_RETRY_MAX);
    loop {
        if engine_stopping(&status.borrow_and_update()) {
            tokio::select! {
                Ok(()) = engine_running(&mut status) => gaps.reset(),
                () = news.closed() => return,
            }
        }
        if let Ok(client) = EngineClient::connect(&socket).await {
            match client.listen_build_history(true).await {
                Ok(mut stream) => {
                    // Running builds come first, then every change: from here nothing is missed.
                    debug!("build history stream open");
                    if news.send(HistoryNews::Opened(unix_time_ms())).await.is_err() {
                        return;
                    }
                    gaps.reset();
                    let ended = loop {
                        let item = tokio::select! {
                            item = stream.next() => item,
                            Ok(()) = stopping_now(&mut status) => break "the agent is stopping the engine".to_string(),
                        };
                        match item {
                            Ok(Some(event)) => {
                                if news.send(HistoryNews::Event(event)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break "the engine ended it".to_string(),
                            Err(error) => break error.to_string(),
                        }
                    };
                    debug!(why = %ended, "build history stream closed");
                    if news.send(HistoryNews::Closed(unix_time_ms())).await.is_err() {
                        return;
                    }
                }
                Err(error) => debug!(%error, "cannot listen to the engine's build history"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(gaps.next_gap()) => {}
            Ok(()) = engine_running(&mut status) => gaps.reset(),
            () = news.closed() => return,
        }
    }
}

/// The agent is stopping the engine (a drain, a cache reset) or has stopped it.
fn engine_stopping(status: &Status) -> bool {
    matches!(status.engine, crate::engine::EngineState::Stopping | crate::engine::EngineState::Stopped)
}

/// Returns once the agent stops the engine (at once if it already does); Err
/// when the agent is gone.
async fn stopping_now(status: &mut watch::Receiver<Status>) -> Result<(), watch::error::RecvError> {
    loop {
        if engine_stopping(&status.borrow_and_update()) {
            return Ok(());
        }
        status.changed().await?;
    }
}

/// Returns once the engine starts running (a change into Running, not every
/// status change while it runs); Err when the agent is gone.
async fn engine_running(status: &mut watch::Receiver<Status>) -> Result<(), watch::error::RecvError> {
    let running = |s: &Status| s.engine == crate::engine::EngineState::Running;
    let mut was_running = running(&status.borrow_and_update());
    loop {
        status.changed().await?;
        let now_running = running(&status.borrow_and_update());
        if now_running && !was_running {
            return Ok(());
        }
        was_running = now_running;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::mountinfo::parse_mountinfo;

    const HYBRID: &str = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
34 30 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct
36 30 0:32 / /sys/fs/cgroup/blkio rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,blkio
";

    fn engine(version: CgroupVersion, dir: &str) -> EngineCgroup {
        let dir = PathBuf::from(dir);
        let mount_point = dir.parent().unwrap().to_path_buf();
        EngineCgroup { version, dir, relative: "/ma-engine".into(), limit_bytes: 1, scope: None, mount_point }
    }

    #[test]
    fn step_dirs_on_v1_span_the_hierarchies_and_the_unified_tree() {
        let mounts = parse_mountinfo(HYBRID).unwrap();
        let dirs = StepDirs::of(&engine(CgroupVersion::V1, "/sys/fs/cgroup/memory/ma-engine"), &mounts);
        assert_eq!(dirs.memory, Path::new("/sys/fs/cgroup/memory/ma-engine/buildkit"));
        assert_eq!(dirs.cpu.as_deref(), Some(Path::new("/sys/fs/cgroup/cpu,cpuacct/ma-engine/buildkit")));
        assert_eq!(dirs.io.as_deref(), Some(Path::new("/sys/fs/cgroup/blkio/ma-engine/buildkit")));
        assert_eq!(dirs.events.as_deref(), Some(Path::new("/sys/fs/cgroup/unified/ma-engine/buildkit")));
        let v2 = StepDirs::of(&engine(CgroupVersion::V2, "/sys/fs/cgroup/ma-engine"), &[]);
        let all = Some(PathBuf::from("/sys/fs/cgroup/ma-engine/buildkit"));
        assert_eq!((v2.cpu.clone(), v2.io.clone(), v2.events.clone()), (all.clone(), all.clone(), all));
    }

    #[test]
    fn step_files_are_read_whole_from_the_start_every_time_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let step = dir.path().join("buildkit").join("abc");
        std::fs::create_dir_all(&step).unwrap();
        std::fs::write(step.join("cpu.stat"), "usage_usec 1500\n").unwrap();
        // Longer than the first read's buffer: read in more passes.
        let io: String = (0..2000).map(|i| format!("7:{i} rbytes=1 wbytes=2 rios=1 wios=1\n")).collect();
        assert!(io.len() > READ_BUFFER);
        std::fs::write(step.join("io.stat"), io).unwrap();
        std::fs::write(step.join("cgroup.procs"), "").unwrap();
        let dirs = StepDirs { version: CgroupVersion::V2, memory: dir.path().join("buildkit"), cpu: None, io: None, events: None };
        let dirs = StepDirs { cpu: Some(dirs.memory.clone()), io: Some(dirs.memory.clone()), ..dirs };
        let mut files = dirs.open("abc");
        for _ in 0..2 {
            let f = files.read(true);
            assert_eq!((f.cpu_usec, f.io_read_bytes, f.io_write_bytes), (Some(1500), Some(2000), Some(4000)));
            assert_eq!((f.peak_memory_bytes, f.oom_kills), (None, None), "no such files");
        }
        assert_eq!(files.read(false).io_read_bytes, None, "block I/O only on a full read");
        assert_eq!(files.is_empty(), Some(true));
        std::fs::write(step.join("cgroup.procs"), "42\n").unwrap();
        assert_eq!(files.is_empty(), Some(false));
        std::fs::remove_file(step.join("cgroup.procs")).unwrap();
        assert_eq!(files.is_empty(), None, "gone");
        assert_eq!(dirs.list(), vec!["abc".to_string()]);
    }
}
