//! The pure core of the OOM watcher: /dev/kmsg records and the kernel's OOM
//! lines parsed, folded into one [`OomEvent`] per kill, and attributed to the
//! engine, a build step or something else by the victim's memory cgroup.
//! The /proc/vmstat `oom_kill` counter is reconciled against the events seen,
//! so kills whose kmsg lines were lost (ring buffer overrun, rate limiting)
//! are still counted, as unattributed.
//!
//! Only the kernel's own records count. /dev/kmsg is writable from user space
//! (root, or anyone with write access to it), and a write gets the user
//! facility at the least: the kernel never lets user space claim facility 0
//! (checked on 6.18: `echo '<0>x' > /dev/kmsg` reads back as priority 8). So
//! a record whose facility is not the kernel's is never read as an OOM line,
//! however much it looks like one.
//!
//! The lines of one report are paired by the kernel's own order: the
//! `oom-kill:` summary (and the pre-5.1 `Kill process` line) lends its
//! context to a `Killed process` line only if it names the same victim and
//! came at most [`MAX_KERNEL_RECORDS_SUMMARY_TO_KILL`] kernel records before
//! it. A lone kernel `Killed process` line is still a kill: the kernel
//! rate-limits the report's header and summary, never that line.
//!
//! This module never reads /dev/kmsg, /proc or anything else: the reader that
//! does lives at the I/O edge and hands records in.
//!
//! Kernel formats covered (mm/oom_kill.c, mm/memcontrol.c):
//!
//! ```text
//! <task> invoked oom-killer: gfp_mask=.., [nodemask=..,] order=N, oom_score_adj=N      all versions
//! Task in <memcg> killed as a result of limit of <memcg>                              memcg OOM, before 4.19
//! oom-kill:constraint=..,nodemask=..,cpuset=..,mems_allowed=..,oom_memcg=..|global_oom,
//!          task_memcg=..,task=..,pid=..,uid=..                                        4.19 and later
//! [<scope>: ]Kill process <pid> (<name>) score <n> or sacrifice child                 before 5.1
//! [<scope>: ]Killed process <pid> (<name>) total-vm:..kB, anon-rss:..kB, file-rss:..kB[, shmem-rss:..kB]
//!          [, UID:<uid>] [pgtables:..kB] [oom_score_adj:N]                             all versions
//! Tasks in <memcg> are going to be killed due to memory.oom.group set                 v2 memcg, 4.19+
//! ```
//!
//! where `<scope>` is `Out of memory` (a system OOM) or `Memory cgroup out of
//! memory` (a memcg limit). The `Killed process` line is the one printed for
//! the actual victim, so it is the line that completes an event; the others
//! only add context. With `memory.oom.group` the kernel kills the victim, then
//! prints the `Tasks in` line and one `Killed process` line per other task of
//! the group: each of those is an event too, attributed through the group.

/// The syslog facility of the kernel's own messages (`LOG_KERN`); user space
/// writing to /dev/kmsg gets another one (`LOG_USER` unless it names one).
pub const KERNEL_FACILITY: u32 = 0;

/// One /dev/kmsg record: `<prio>,<seq>,<timestamp_us>,<flags>[,more];<message>`,
/// then optional continuation lines (` KEY=value`) that are ignored here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KmsgRecord<'a> {
    /// The syslog facility: `prio / 8`. Only [`KERNEL_FACILITY`] is the kernel's.
    pub facility: u32,
    /// The kernel's record sequence number; strictly increasing within a boot.
    pub seq: u64,
    /// Microseconds since boot (the kernel clock dmesg shows) when the line was logged.
    pub timestamp_us: u64,
    /// The message text, without the trailing newline or continuation lines.
    pub message: &'a str,
}

/// Parses one /dev/kmsg record; `None` when the header is malformed.
pub fn parse_kmsg_record(record: &str) -> Option<KmsgRecord<'_>> {
    let first_line = record.split('\n').next().unwrap_or_default();
    let (header, message) = first_line.split_once(';')?;
    let mut fields = header.split(',');
    // The priority is facility * 8 + level.
    let facility = fields.next()?.parse::<u32>().ok()? >> 3;
    let seq = fields.next()?.parse().ok()?;
    let timestamp_us = fields.next()?.parse().ok()?;
    // Flags ('-', 'c', '+') must be present; anything after them (caller=..) is ignored.
    fields.next()?;
    Some(KmsgRecord { facility, seq, timestamp_us, message: message.strip_suffix('\r').unwrap_or(message) })
}

impl KmsgRecord<'_> {
    /// Whether the kernel wrote this record (user space cannot claim its facility).
    pub fn from_kernel(&self) -> bool {
        self.facility == KERNEL_FACILITY
    }
}

/// Whether the OOM was a memory cgroup hitting its limit or the whole system
/// (or a cpuset / mempolicy) running out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OomScope {
    /// A memory cgroup's limit: the `Memory cgroup out of memory` prefix,
    /// `CONSTRAINT_MEMCG`, or an `oom_memcg=` / `Task in` line.
    Memcg,
    /// The system, a cpuset or a memory policy: the `Out of memory` prefix,
    /// `global_oom`, or a constraint other than `CONSTRAINT_MEMCG`.
    System,
}

impl OomScope {
    fn from_prefix(prefix: &str) -> Option<Self> {
        if prefix.starts_with("Memory cgroup out of memory") {
            Some(Self::Memcg)
        } else if prefix.starts_with("Out of memory") {
            Some(Self::System)
        } else {
            None
        }
    }
}

/// The `constraint=` field of the `oom-kill:` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    /// `CONSTRAINT_NONE`: the whole system.
    None,
    /// `CONSTRAINT_CPUSET`
    Cpuset,
    /// `CONSTRAINT_MEMORY_POLICY`
    MemoryPolicy,
    /// `CONSTRAINT_MEMCG`: a memory cgroup's limit.
    Memcg,
    /// A name this parser does not know, kept verbatim.
    Other(String),
}

impl Constraint {
    fn parse(value: &str) -> Self {
        match value {
            "CONSTRAINT_NONE" => Self::None,
            "CONSTRAINT_CPUSET" => Self::Cpuset,
            "CONSTRAINT_MEMORY_POLICY" => Self::MemoryPolicy,
            "CONSTRAINT_MEMCG" => Self::Memcg,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// The `oom-kill:` summary line (4.19+). Every field is optional because
/// older kernels print fewer of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OomKillSummary {
    pub constraint: Option<Constraint>,
    /// The memcg whose limit was hit; absent for a system OOM.
    pub oom_memcg: Option<String>,
    /// The victim's memcg.
    pub task_memcg: Option<String>,
    /// The `global_oom` marker (printed instead of `oom_memcg=`).
    pub global_oom: bool,
    pub task: Option<String>,
    pub pid: Option<u32>,
    pub uid: Option<u32>,
}

/// The `Killed process` line: the victim, and its memory when it was killed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KilledProcess {
    /// From the `Out of memory:` / `Memory cgroup out of memory:` prefix (5.1+).
    pub scope: Option<OomScope>,
    pub pid: u32,
    pub name: String,
    pub uid: Option<u32>,
    pub total_vm_bytes: Option<u64>,
    pub anon_rss_bytes: Option<u64>,
    pub file_rss_bytes: Option<u64>,
    pub shmem_rss_bytes: Option<u64>,
    pub pgtables_bytes: Option<u64>,
    pub oom_score_adj: Option<i32>,
}

/// One kernel line that belongs to an OOM kill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OomLine {
    /// `<name> invoked oom-killer: ..`: an OOM episode starts; `name` is the
    /// task whose allocation failed, not necessarily the victim.
    Invoked { name: String, gfp_mask: Option<String>, order: Option<u32>, oom_score_adj: Option<i32> },
    /// `Task in <task_memcg> killed as a result of limit of <oom_memcg>`
    /// (memcg OOMs before 4.19).
    TaskIn { task_memcg: String, oom_memcg: String },
    /// `oom-kill:constraint=..` (4.19+).
    Summary(OomKillSummary),
    /// `[<scope>: ]Kill process <pid> (<name>) score <n> or sacrifice child`
    /// (before 5.1): the chosen victim, which may then sacrifice a child.
    Chosen { scope: Option<OomScope>, pid: u32, name: String, score: Option<u64> },
    /// `[<scope>: ]Killed process <pid> (<name>) total-vm:..`: the kill itself.
    Killed(KilledProcess),
    /// `Tasks in <memcg> are going to be killed due to memory.oom.group set`:
    /// the `Killed process` lines that follow are the group's other tasks.
    GroupKill { memcg: String },
}

/// Parses a kmsg message into an OOM line; `None` for every other line.
pub fn parse_oom_line(message: &str) -> Option<OomLine> {
    if let Some(rest) = message.strip_prefix("oom-kill:") {
        return Some(OomLine::Summary(parse_summary(rest)));
    }
    if let Some(rest) = message.strip_prefix("Tasks in ") {
        let memcg = rest.strip_suffix(" are going to be killed due to memory.oom.group set")?;
        return Some(OomLine::GroupKill { memcg: memcg.to_owned() });
    }
    if let Some(rest) = message.strip_prefix("Task in ") {
        let (task_memcg, oom_memcg) = rest.split_once(" killed as a result of limit of ")?;
        return Some(OomLine::TaskIn { task_memcg: task_memcg.to_owned(), oom_memcg: oom_memcg.to_owned() });
    }
    if let Some((name, params)) = message.split_once(" invoked oom-killer:") {
        return Some(parse_invoked(name, params));
    }
    if let Some((scope, rest)) = split_scoped(message, "Killed process") {
        return parse_killed(scope, rest).map(OomLine::Killed);
    }
    if let Some((scope, rest)) = split_scoped(message, "Kill process") {
        let (pid, name, tail) = parse_pid_and_name(rest)?;
        let mut words = tail.split_whitespace();
        let score = match words.next() {
            Some("score") => words.next().and_then(|s| s.parse().ok()),
            _ => None,
        };
        return Some(OomLine::Chosen { scope, pid, name: name.to_owned(), score });
    }
    None
}

/// Splits `[<scope>: ]<marker> rest` into the scope and `rest`. The marker must
/// start the message or follow a known scope prefix, so a driver that happens
/// to print "killed process" somewhere is not mistaken for the OOM killer.
fn split_scoped<'a>(message: &'a str, marker: &str) -> Option<(Option<OomScope>, &'a str)> {
    let (prefix, rest) = message.split_once(marker)?;
    // A word must end at the marker ("Killed processes" is something else);
    // v1-era kernels differ in spacing, so any whitespace may follow it.
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    if prefix.is_empty() {
        return Some((None, rest));
    }
    let scope_text = prefix.strip_suffix(": ")?;
    let scope = OomScope::from_prefix(scope_text)?;
    Some((Some(scope), rest))
}

/// Parses ` <pid> (<name>) <tail>`. The name is a task's comm, which may hold
/// spaces and parentheses; nothing after it does, so the last `)` closes it.
fn parse_pid_and_name(rest: &str) -> Option<(u32, &str, &str)> {
    let rest = rest.trim_start();
    let (pid, rest) = rest.split_once(char::is_whitespace)?;
    let pid = pid.parse().ok()?;
    let rest = rest.trim_start().strip_prefix('(')?;
    let close = rest.rfind(')')?;
    let (name, tail) = rest.split_at(close);
    Some((pid, name, tail.strip_prefix(')').unwrap_or(tail)))
}

fn parse_killed(scope: Option<OomScope>, rest: &str) -> Option<KilledProcess> {
    let (pid, name, tail) = parse_pid_and_name(rest)?;
    let mut killed = KilledProcess {
        scope,
        pid,
        name: name.to_owned(),
        uid: None,
        total_vm_bytes: None,
        anon_rss_bytes: None,
        file_rss_bytes: None,
        shmem_rss_bytes: None,
        pgtables_bytes: None,
        oom_score_adj: None,
    };
    for field in tail.split([',', ' ', '\t']).filter(|f| !f.is_empty()) {
        let Some((key, value)) = field.split_once(':') else { continue };
        match key {
            // `vsz` is the 2.6-era name of total-vm.
            "total-vm" | "vsz" => killed.total_vm_bytes = kib_to_bytes(value),
            "anon-rss" => killed.anon_rss_bytes = kib_to_bytes(value),
            "file-rss" => killed.file_rss_bytes = kib_to_bytes(value),
            "shmem-rss" => killed.shmem_rss_bytes = kib_to_bytes(value),
            "pgtables" => killed.pgtables_bytes = kib_to_bytes(value),
            "UID" => killed.uid = value.parse().ok(),
            "oom_score_adj" => killed.oom_score_adj = value.parse().ok(),
            _ => {}
        }
    }
    Some(killed)
}

/// `123456kB` to bytes; `None` for anything else or an overflow.
fn kib_to_bytes(value: &str) -> Option<u64> {
    value.strip_suffix("kB")?.parse::<u64>().ok()?.checked_mul(1024)
}

fn parse_invoked(name: &str, params: &str) -> OomLine {
    let (mut gfp_mask, mut order, mut oom_score_adj) = (None, None, None);
    for param in params.split(',') {
        let Some((key, value)) = param.trim().split_once('=') else { continue };
        match key {
            "gfp_mask" => gfp_mask = Some(value.to_owned()),
            "order" => order = value.parse().ok(),
            "oom_score_adj" => oom_score_adj = value.parse().ok(),
            _ => {}
        }
    }
    OomLine::Invoked { name: name.to_owned(), gfp_mask, order, oom_score_adj }
}

/// The `oom-kill:` fields. Values may themselves hold commas (`mems_allowed=0,2`,
/// a task named `a,b`), so a piece without `=` continues the previous value.
fn parse_summary(rest: &str) -> OomKillSummary {
    let mut fields: Vec<(&str, String)> = Vec::new();
    let mut global_oom = false;
    for piece in rest.split(',') {
        if piece == "global_oom" {
            global_oom = true;
        } else if let Some((key, value)) = piece.split_once('=') {
            fields.push((key, value.to_owned()));
        } else if let Some((_, value)) = fields.last_mut() {
            value.push(',');
            value.push_str(piece);
        }
    }
    let mut summary = OomKillSummary { global_oom, ..OomKillSummary::default() };
    for (key, value) in fields {
        match key {
            "constraint" => summary.constraint = Some(Constraint::parse(&value)),
            "oom_memcg" => summary.oom_memcg = Some(value),
            "task_memcg" => summary.task_memcg = Some(value),
            "task" => summary.task = Some(value),
            "pid" => summary.pid = value.parse().ok(),
            "uid" => summary.uid = value.parse().ok(),
            _ => {}
        }
    }
    summary
}

/// Who an OOM kill hit, from the victim's memory cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribution {
    /// buildkitd itself (`<engine>/daemon[/..]`), or any other process inside
    /// the engine's cgroup that is not a build step.
    Engine,
    /// A build step (`<engine>/buildkit/<container id>[/..]`).
    BuildStep { container_id: String },
    /// A process outside the engine's cgroup.
    Other,
    /// The kernel did not say which memcg the victim was in.
    Unknown,
    /// A kill the kernel counted (/proc/vmstat `oom_kill`) whose lines were
    /// never read: lost to a kmsg ring overrun or rate limiting.
    Unattributed,
}

impl Attribution {
    /// A stable label for metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Engine => "engine",
            Self::BuildStep { .. } => "build_step",
            Self::Other => "other",
            Self::Unknown => "unknown",
            Self::Unattributed => "unattributed",
        }
    }

    /// Every label, for exporting each series from zero.
    pub const LABELS: [&'static str; 5] = ["engine", "build_step", "other", "unknown", "unattributed"];
}

/// Attributes a victim's memcg path to the engine, a build step or neither.
/// Paths are compared component by component, so `/machine-agent-engine2` is
/// not inside `/machine-agent-engine`. A process in the engine's cgroup but in
/// neither `daemon/` nor a step's cgroup (the engine root on v1, a bare
/// `buildkit/`) counts as the engine's: it is no step and it is not outside.
///
/// An `engine_cgroup` of "" (the engine runs without a cgroup of its own)
/// contains nothing: every victim is then another process's.
pub fn attribute(task_memcg: Option<&str>, engine_cgroup: &str) -> Attribution {
    let Some(task_memcg) = task_memcg else { return Attribution::Unknown };
    if no_engine_cgroup(engine_cgroup) {
        return Attribution::Other;
    }
    match components_below(task_memcg, engine_cgroup).as_deref() {
        None => Attribution::Other,
        Some(["buildkit", id, ..]) => Attribution::BuildStep { container_id: (*id).to_owned() },
        Some(_) => Attribution::Engine,
    }
}

/// Without components the "engine cgroup" would be the hierarchy's root, which
/// holds every process: that means the engine has no cgroup.
fn no_engine_cgroup(engine_cgroup: &str) -> bool {
    engine_cgroup.split('/').all(str::is_empty)
}

/// The components of `path` below `base`, or `None` when `path` is not
/// `base` or inside it. Empty components (`//`, a trailing `/`) do not count.
fn components_below<'a>(path: &'a str, base: &str) -> Option<Vec<&'a str>> {
    let mut path = path.split('/').filter(|c| !c.is_empty());
    for base_component in base.split('/').filter(|c| !c.is_empty()) {
        if path.next() != Some(base_component) {
            return None;
        }
    }
    Some(path.collect())
}

/// A task killed as a member of `group` lives in `group` or below it. That
/// pins a step or the daemon, and anything outside the engine; a group at the
/// engine's root (or `buildkit/`) could hold either, so it says nothing.
fn attribute_group_member(group: &str, engine_cgroup: &str) -> Attribution {
    if no_engine_cgroup(engine_cgroup) {
        return Attribution::Other;
    }
    match components_below(group, engine_cgroup).as_deref() {
        None => Attribution::Other,
        Some(["buildkit", id, ..]) => Attribution::BuildStep { container_id: (*id).to_owned() },
        Some(["daemon", ..]) => Attribution::Engine,
        Some(_) => Attribution::Unknown,
    }
}

/// One OOM kill, assembled from the lines the kernel printed for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OomEvent {
    /// The kmsg sequence number of the `Killed process` line.
    pub seq: u64,
    /// When the kill was logged, in microseconds since boot.
    pub time_us: u64,
    pub pid: u32,
    pub name: String,
    pub uid: Option<u32>,
    /// `None` when the kernel printed nothing that tells.
    pub scope: Option<OomScope>,
    pub constraint: Option<Constraint>,
    pub oom_memcg: Option<String>,
    pub task_memcg: Option<String>,
    /// The task whose allocation triggered the OOM killer.
    pub invoked_by: Option<String>,
    /// The `memory.oom.group` cgroup when this task was killed as a member of it.
    pub oom_group: Option<String>,
    pub total_vm_bytes: Option<u64>,
    pub anon_rss_bytes: Option<u64>,
    pub file_rss_bytes: Option<u64>,
    pub shmem_rss_bytes: Option<u64>,
    pub pgtables_bytes: Option<u64>,
    pub oom_score_adj: Option<i32>,
    pub attribution: Attribution,
}

/// How far apart (kmsg timestamps) the lines of one OOM kill may be. The
/// kernel prints them in one call, but the task dump between the trigger and
/// the kill can run for seconds on a big host; a minute is far beyond that and
/// far below the time a pid takes to be reused by an unrelated kill.
pub const MAX_EPISODE_SPAN_US: u64 = 60_000_000;

/// How many kernel records may separate the `oom-kill:` summary (or the
/// pre-5.1 `Kill process` line) from the `Killed process` line it describes.
/// The kernel prints them back to back; what can come between is the
/// `Kill process` line itself, the pieces of a summary another CPU's printk
/// split, and another CPU's unrelated lines. Further apart, they are not one
/// report.
pub const MAX_KERNEL_RECORDS_SUMMARY_TO_KILL: u64 = 16;

/// Where a context line was printed: its kmsg time and its index among the
/// kernel records the assembler has seen (user-space records do not count,
/// so writing into /dev/kmsg cannot push a report's lines apart).
#[derive(Debug, Clone, Copy)]
struct Printed {
    time_us: u64,
    kernel_index: u64,
}

/// Context lines seen since the last `invoked oom-killer`, waiting for the kill.
#[derive(Debug, Default)]
struct Episode {
    invoked: Option<(Printed, String)>,
    task_in: Option<(Printed, String, String)>,
    summary: Option<(Printed, OomKillSummary)>,
    chosen: Option<(Printed, Option<OomScope>)>,
    group: Option<(Printed, String)>,
}

/// Folds the kernel's OOM lines into [`OomEvent`]s: one per `Killed process`
/// line, combined with the `oom-kill:` line of the same pid just before it and
/// the episode's other context lines. Records not from the kernel are ignored.
/// A record whose sequence number is not above the last one seen (a replay
/// after the reader reopened /dev/kmsg) is ignored, so the same kill is never
/// emitted twice.
#[derive(Debug)]
pub struct OomAssembler {
    engine_cgroup: String,
    last_seq: Option<u64>,
    /// Kernel records fed so far: the clock that pairs a report's lines.
    kernel_records: u64,
    episode: Episode,
}

impl OomAssembler {
    /// `engine_cgroup` is the engine's path inside the memory hierarchy
    /// (`/machine-agent-engine`), used to attribute each kill.
    pub fn new(engine_cgroup: impl Into<String>) -> Self {
        Self { engine_cgroup: engine_cgroup.into(), last_seq: None, kernel_records: 0, episode: Episode::default() }
    }

    /// Treats every record up to and including `seq` as already seen, for a
    /// reader that resumes where a previous one stopped.
    pub fn skip_through(&mut self, seq: u64) {
        self.last_seq = Some(self.last_seq.map_or(seq, |last| last.max(seq)));
    }

    /// Parses and folds one kmsg record. Records not from the kernel are
    /// ignored outright; the kernel's unrelated records only advance the sequence.
    pub fn feed_record(&mut self, record: &KmsgRecord<'_>) -> Option<OomEvent> {
        if !record.from_kernel() || self.last_seq.is_some_and(|last| record.seq <= last) {
            return None;
        }
        self.last_seq = Some(record.seq);
        self.kernel_records += 1;
        let line = parse_oom_line(record.message)?;
        let printed = Printed { time_us: record.timestamp_us, kernel_index: self.kernel_records };
        self.feed(record.seq, printed, line)
    }

    /// Folds one kernel OOM line; returns the event its `Killed process` line completes.
    fn feed(&mut self, seq: u64, printed: Printed, line: OomLine) -> Option<OomEvent> {
        match line {
            OomLine::Invoked { name, .. } => {
                // A new episode: whatever the last one left unfinished is stale.
                self.episode = Episode { invoked: Some((printed, name)), ..Episode::default() };
                None
            }
            OomLine::TaskIn { task_memcg, oom_memcg } => {
                self.episode.task_in = Some((printed, task_memcg, oom_memcg));
                None
            }
            OomLine::Summary(summary) => {
                self.episode.summary = Some((printed, summary));
                None
            }
            OomLine::Chosen { scope, .. } => {
                self.episode.chosen = Some((printed, scope));
                None
            }
            OomLine::Killed(killed) => Some(self.complete(seq, printed, killed)),
            OomLine::GroupKill { memcg } => {
                self.episode.group = Some((printed, memcg));
                None
            }
        }
    }

    fn complete(&mut self, seq: u64, printed: Printed, killed: KilledProcess) -> OomEvent {
        let time_us = printed.time_us;
        let recent = |at: &Printed| time_us.saturating_sub(at.time_us) <= MAX_EPISODE_SPAN_US;
        // The summary and the chosen line are printed right before the kill;
        // one further back belongs to a report whose kill was never printed.
        let just_before = |at: &Printed| recent(at) && printed.kernel_index - at.kernel_index <= MAX_KERNEL_RECORDS_SUMMARY_TO_KILL;
        // The trigger and an oom.group stay for the group's other kills; the
        // per-victim lines are used up by this one.
        let episode = std::mem::take(&mut self.episode);
        self.episode.invoked = episode.invoked.clone().filter(|(at, _)| recent(at));
        self.episode.group = episode.group.clone().filter(|(at, _)| recent(at));
        let oom_group = self.episode.group.as_ref().map(|(_, memcg)| memcg.clone());
        // The summary names its victim; one for another pid (an `oom-kill:` line
        // whose kill never got printed) must not lend this kill its memcg.
        let summary = episode.summary.filter(|(at, s)| {
            just_before(at)
                && match s.pid {
                    Some(pid) => pid == killed.pid,
                    None => s.task.as_deref().is_none_or(|task| task == killed.name),
                }
        });
        let summary = summary.map(|(_, s)| s);
        let task_in = episode.task_in.filter(|(at, ..)| recent(at)).map(|(_, task, oom)| (task, oom));
        // Its pid is not checked: the chosen process may sacrifice a child.
        let chosen_scope = episode.chosen.filter(|(at, _)| just_before(at)).and_then(|(_, scope)| scope);
        let invoked_by = episode.invoked.filter(|(at, _)| recent(at)).map(|(_, name)| name);

        let (mut constraint, mut oom_memcg, mut task_memcg, mut uid, mut global_oom) = (None, None, None, None, false);
        if let Some(s) = summary {
            (constraint, oom_memcg, task_memcg, uid, global_oom) = (s.constraint, s.oom_memcg, s.task_memcg, s.uid, s.global_oom);
        }
        if task_memcg.is_none() && oom_memcg.is_none() {
            if let Some((task, oom)) = task_in.clone() {
                (task_memcg, oom_memcg) = (Some(task), Some(oom));
            }
        }
        let scope = match &constraint {
            Some(Constraint::Memcg) => Some(OomScope::Memcg),
            Some(_) => Some(OomScope::System),
            None if global_oom => Some(OomScope::System),
            None if oom_memcg.is_some() => Some(OomScope::Memcg),
            None => killed.scope.or(chosen_scope).or(task_in.map(|_| OomScope::Memcg)),
        };
        let attribution = match (&task_memcg, &oom_group) {
            (None, Some(group)) => attribute_group_member(group, &self.engine_cgroup),
            _ => attribute(task_memcg.as_deref(), &self.engine_cgroup),
        };
        let scope = scope.or(oom_group.as_ref().map(|_| OomScope::Memcg));
        OomEvent {
            seq,
            time_us,
            pid: killed.pid,
            name: killed.name,
            uid: killed.uid.or(uid),
            scope,
            constraint,
            oom_memcg,
            task_memcg,
            invoked_by,
            oom_group,
            total_vm_bytes: killed.total_vm_bytes,
            anon_rss_bytes: killed.anon_rss_bytes,
            file_rss_bytes: killed.file_rss_bytes,
            shmem_rss_bytes: killed.shmem_rss_bytes,
            pgtables_bytes: killed.pgtables_bytes,
            oom_score_adj: killed.oom_score_adj,
            attribution,
        }
    }
}

/// The `oom_kill N` counter of /proc/vmstat (4.13+); `None` when absent.
pub fn parse_vmstat_oom_kill(vmstat_text: &str) -> Option<u64> {
    vmstat_text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("oom_kill"), Some(value), None) => value.parse().ok(),
            _ => None,
        }
    })
}

/// Kills the kernel counted in a window that no kmsg event accounts for.
pub fn missed_kills(vmstat_delta: u64, events_seen: u64) -> u64 {
    vmstat_delta.saturating_sub(events_seen)
}

/// Reconciles the vmstat `oom_kill` counter with the kmsg events seen, window
/// by window, and says how many kills were missed (to be counted unattributed).
///
/// The kernel bumps the counter just before it prints `Killed process`, so a
/// sample can count a kill whose line the reader has not handed in yet. A
/// shortfall is therefore reported only once it has lasted two consecutive
/// windows; a late line in the second window cancels it. A counter that goes
/// backwards (it cannot within a boot) restarts the baseline.
#[derive(Debug, Default)]
pub struct Reconciler {
    last_counter: Option<u64>,
    /// Kills counted by the kernel up to the last window and not yet matched
    /// by an event or reported.
    pending: u64,
}

impl Reconciler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Closes a window: `oom_kill_counter` is the vmstat value now and
    /// `events_seen` the number of OOM events assembled since the last call.
    /// Returns the kills newly found missing.
    pub fn reconcile(&mut self, oom_kill_counter: u64, events_seen: u64) -> u64 {
        let delta = match self.last_counter {
            Some(last) if oom_kill_counter >= last => oom_kill_counter - last,
            // The first sample only sets the baseline: events seen before it
            // cannot be matched against kills the counter never showed us.
            _ => {
                self.last_counter = Some(oom_kill_counter);
                self.pending = 0;
                return 0;
            }
        };
        self.last_counter = Some(oom_kill_counter);
        // Events match the oldest unmatched kills first; what the previous
        // window left unmatched and this one did not explain is missed. Surplus
        // events (a kill counted just before the baseline) are dropped, not
        // banked, so they cannot hide a later miss.
        let missed = self.pending.saturating_sub(events_seen);
        self.pending = self.pending.saturating_add(delta).saturating_sub(events_seen).saturating_sub(missed);
        missed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENGINE: &str = "/machine-agent-engine";

    fn line(message: &str) -> OomLine {
        parse_oom_line(message).unwrap_or_else(|| panic!("not an OOM line: {message}"))
    }

    // === kmsg records ===

    #[test]
    fn without_an_engine_cgroup_every_victim_is_another_process() {
        assert_eq!(attribute(Some("/machine-agent-engine/daemon"), ""), Attribution::Other);
        assert_eq!(attribute(Some("/"), "/"), Attribution::Other);
        assert_eq!(attribute(None, ""), Attribution::Unknown);
    }

    #[test]
    fn kmsg_record_with_continuation_lines() {
        let rec =
            parse_kmsg_record("3,1234,5678901234,-;oom-kill:constraint=CONSTRAINT_NONE,task=x,pid=1,uid=0\n SUBSYSTEM=memory\n DEVICE=+memory:x\n").unwrap();
        assert_eq!(rec.seq, 1234);
        assert_eq!(rec.timestamp_us, 5_678_901_234);
        assert_eq!(rec.message, "oom-kill:constraint=CONSTRAINT_NONE,task=x,pid=1,uid=0");
    }

    #[test]
    fn kmsg_record_with_caller_field_and_semicolons_in_message() {
        let rec = parse_kmsg_record("6,99,1000,c,caller=T4242;a;b c\n").unwrap();
        assert_eq!((rec.seq, rec.timestamp_us, rec.message), (99, 1000, "a;b c"));
        let rec = parse_kmsg_record("4,1,2,-;").unwrap();
        assert_eq!(rec.message, "");
    }

    #[test]
    fn kmsg_record_malformed() {
        for bad in ["", ";msg", "6,1,2;msg", "x,1,2,-;msg", "6,-1,2,-;msg", "6,1,2.5,-;msg", "6,1,2,-", " SUBSYSTEM=a;b"] {
            assert_eq!(parse_kmsg_record(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn kmsg_record_facility_tells_the_kernel_from_user_space() {
        // What 6.18 made of `echo '<N>x' > /dev/kmsg`: <0> and <3> come back as 8 and 11.
        for (record, facility) in [("3,1,2,-;x", 0), ("7,1,2,-;x", 0), ("8,1,2,-;x", 1), ("11,1,2,-;x", 1), ("14,1,2,-;x", 1), ("30,1,2,-;x", 3)] {
            let rec = parse_kmsg_record(record).unwrap();
            assert_eq!((rec.facility, rec.from_kernel()), (facility, facility == KERNEL_FACILITY), "{record}");
        }
    }

    /// Captured from /dev/kmsg on kernel 6.18 (cgroup v1 memcg) while
    /// tests/oom.rs ran: a build step under the engine's 192 MiB limit.
    #[test]
    fn captured_6_18_v1_memcg_step_kill() {
        let mut assembler = OomAssembler::new("/ma-test-tmplQ7elE");
        let records = [
            "4,9001,16223268195,-;busybox invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
            "6,9002,16223268423,-;memory: usage 196608kB, limit 196608kB, failcnt 2749",
            "6,9003,16223268511,-;Tasks state (memory values in pages):",
            "6,9004,16223268518,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=mla1hcfsicytxuvvodtv4xn9d,mems_allowed=0,oom_memcg=/ma-test-tmplQ7elE,task_memcg=/ma-test-tmplQ7elE/buildkit/mla1hcfsicytxuvvodtv4xn9d,task=busybox,pid=29840,uid=0",
            "3,9005,16223268535,-;Memory cgroup out of memory: Killed process 29840 (busybox) total-vm:264412kB, anon-rss:195712kB, file-rss:112kB, shmem-rss:0kB, UID:0 pgtables:420kB oom_score_adj:0",
        ];
        let events: Vec<OomEvent> = records.iter().filter_map(|r| assembler.feed_record(&parse_kmsg_record(r).unwrap())).collect();
        assert_eq!(events.len(), 1, "{events:?}");
        let e = &events[0];
        assert_eq!((e.pid, e.name.as_str(), e.seq), (29840, "busybox", 9005));
        assert_eq!(e.attribution, Attribution::BuildStep { container_id: "mla1hcfsicytxuvvodtv4xn9d".into() });
        assert_eq!((e.scope, e.anon_rss_bytes, e.invoked_by.as_deref()), (Some(OomScope::Memcg), Some(195_712 << 10), Some("busybox")));
    }

    // === OOM lines, by kernel version ===

    #[test]
    fn invoked_line_4_14_and_5_x() {
        assert_eq!(
            line("python3 invoked oom-killer: gfp_mask=0x14000c0(GFP_KERNEL), nodemask=(null),  order=0, oom_score_adj=0"),
            OomLine::Invoked { name: "python3".into(), gfp_mask: Some("0x14000c0(GFP_KERNEL)".into()), order: Some(0), oom_score_adj: Some(0) }
        );
        assert_eq!(
            line("cc1plus invoked oom-killer: gfp_mask=0x100cca(GFP_HIGHUSER_MOVABLE), order=0, oom_score_adj=-998"),
            OomLine::Invoked { name: "cc1plus".into(), gfp_mask: Some("0x100cca(GFP_HIGHUSER_MOVABLE)".into()), order: Some(0), oom_score_adj: Some(-998) }
        );
        // A comm with a space.
        assert!(matches!(line("Web Content invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0"),
            OomLine::Invoked { name, .. } if name == "Web Content"));
    }

    #[test]
    fn killed_line_4_14_without_uid() {
        let OomLine::Killed(k) = line("Killed process 4242 (python3) total-vm:123456kB, anon-rss:65432kB, file-rss:12kB, shmem-rss:0kB") else { panic!() };
        assert_eq!(k.scope, None);
        assert_eq!((k.pid, k.name.as_str(), k.uid), (4242, "python3", None));
        assert_eq!(k.total_vm_bytes, Some(123_456 * 1024));
        assert_eq!(k.anon_rss_bytes, Some(65_432 * 1024));
        assert_eq!(k.file_rss_bytes, Some(12 * 1024));
        assert_eq!(k.shmem_rss_bytes, Some(0));
        assert_eq!((k.pgtables_bytes, k.oom_score_adj), (None, None));
    }

    #[test]
    fn killed_line_3_x_odd_spacing_and_2_6_vsz() {
        let OomLine::Killed(k) = line("Killed process 4242  (python3)  total-vm:100kB, anon-rss:50kB, file-rss:1kB") else { panic!() };
        assert_eq!((k.pid, k.name.as_str()), (4242, "python3"));
        assert_eq!((k.total_vm_bytes, k.anon_rss_bytes, k.file_rss_bytes, k.shmem_rss_bytes), (Some(102_400), Some(51_200), Some(1024), None));
        let OomLine::Killed(k) = line("Killed process 77 (java) vsz:2048kB, anon-rss:1024kB, file-rss:0kB") else { panic!() };
        assert_eq!(k.total_vm_bytes, Some(2048 * 1024));
    }

    #[test]
    fn killed_line_5_x_memcg_prefix_with_uid() {
        let OomLine::Killed(k) =
            line("Memory cgroup out of memory: Killed process 4242 (python3) total-vm:123456kB, anon-rss:65432kB, file-rss:0kB, shmem-rss:0kB, UID:1000")
        else {
            panic!()
        };
        assert_eq!((k.scope, k.uid, k.pgtables_bytes), (Some(OomScope::Memcg), Some(1000), None));
    }

    #[test]
    fn killed_line_6_x_full() {
        let OomLine::Killed(k) = line(
            "Out of memory: Killed process 4242 (python3) total-vm:123456kB, anon-rss:65432kB, file-rss:4kB, shmem-rss:8kB, UID:0 pgtables:200kB oom_score_adj:-500",
        ) else {
            panic!()
        };
        assert_eq!(k.scope, Some(OomScope::System));
        assert_eq!((k.uid, k.pgtables_bytes, k.oom_score_adj), (Some(0), Some(200 * 1024), Some(-500)));
        assert_eq!((k.file_rss_bytes, k.shmem_rss_bytes), (Some(4096), Some(8192)));
    }

    #[test]
    fn killed_line_name_with_parentheses_and_spaces() {
        let OomLine::Killed(k) = line("Killed process 9 (a (b) c) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB") else { panic!() };
        assert_eq!(k.name, "a (b) c");
    }

    #[test]
    fn chosen_line_before_5_1() {
        assert_eq!(
            line("Memory cgroup out of memory: Kill process 4242 (python3) score 900 or sacrifice child"),
            OomLine::Chosen { scope: Some(OomScope::Memcg), pid: 4242, name: "python3".into(), score: Some(900) }
        );
        assert_eq!(
            line("Out of memory: Kill process 17 (stress) score 1000 or sacrifice child"),
            OomLine::Chosen { scope: Some(OomScope::System), pid: 17, name: "stress".into(), score: Some(1000) }
        );
        assert_eq!(
            line("Out of memory (oom_kill_allocating_task): Kill process 17 (stress) score 0 or sacrifice child"),
            OomLine::Chosen { scope: Some(OomScope::System), pid: 17, name: "stress".into(), score: Some(0) }
        );
        assert_eq!(line("Kill process 18 (stress) sharing same memory"), OomLine::Chosen { scope: None, pid: 18, name: "stress".into(), score: None });
    }

    #[test]
    fn summary_line_memcg_4_19_to_6_x() {
        let OomLine::Summary(s) = line(
            "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/buildkit/abc123,task=python3,pid=4242,uid=0",
        ) else {
            panic!()
        };
        assert_eq!(s.constraint, Some(Constraint::Memcg));
        assert_eq!(s.oom_memcg.as_deref(), Some("/machine-agent-engine"));
        assert_eq!(s.task_memcg.as_deref(), Some("/machine-agent-engine/buildkit/abc123"));
        assert_eq!((s.task.as_deref(), s.pid, s.uid, s.global_oom), (Some("python3"), Some(4242), Some(0), false));
    }

    #[test]
    fn summary_line_global_oom() {
        let OomLine::Summary(s) = line(
            "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0-1,global_oom,task_memcg=/user.slice/user-1000.slice/session-3.scope,task=stress,pid=1234,uid=1000",
        ) else {
            panic!()
        };
        assert_eq!((s.constraint, s.global_oom, s.oom_memcg), (Some(Constraint::None), true, None));
        assert_eq!(s.task_memcg.as_deref(), Some("/user.slice/user-1000.slice/session-3.scope"));
        assert_eq!((s.pid, s.uid), (Some(1234), Some(1000)));
    }

    #[test]
    fn summary_line_reordered_sparse_and_comma_values() {
        let OomLine::Summary(s) = line("oom-kill:pid=7,task=a,b,mems_allowed=0,2,constraint=CONSTRAINT_WHATEVER") else { panic!() };
        assert_eq!((s.pid, s.task.as_deref()), (Some(7), Some("a,b")));
        assert_eq!(s.constraint, Some(Constraint::Other("CONSTRAINT_WHATEVER".into())));
        let OomLine::Summary(s) = line("oom-kill:constraint=CONSTRAINT_CPUSET,task_memcg=/,task=x,pid=3") else { panic!() };
        assert_eq!((s.constraint, s.uid, s.task_memcg.as_deref()), (Some(Constraint::Cpuset), None, Some("/")));
        assert_eq!(line("oom-kill:"), OomLine::Summary(OomKillSummary::default()));
    }

    #[test]
    fn task_in_line_v1_memcg_4_14() {
        assert_eq!(
            line("Task in /machine-agent-engine/buildkit/abc123 killed as a result of limit of /machine-agent-engine"),
            OomLine::TaskIn { task_memcg: "/machine-agent-engine/buildkit/abc123".into(), oom_memcg: "/machine-agent-engine".into() }
        );
    }

    #[test]
    fn unrelated_lines_are_not_oom_lines() {
        for msg in [
            "",
            "oom_reaper: reaped process 4242 (python3), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB",
            "memory: usage 1048576kB, limit 1048576kB, failcnt 42",
            "Memory cgroup stats for /machine-agent-engine: cache:0KB rss:1KB",
            "[ pid ]   uid  tgid total_vm      rss pgtables_bytes swapents oom_score_adj name",
            "mydriver: Killed process 12 (x) total-vm:1kB",
            "Killed processes: 3",
            "Killed process abc (x) total-vm:1kB",
            "Killed process 12 x) total-vm:1kB",
            "Killed process 12 (x total-vm:1kB",
            "Task in /a",
            "EXT4-fs (vda1): mounted filesystem with ordered data mode",
        ] {
            assert_eq!(parse_oom_line(msg), None, "{msg:?}");
        }
    }

    // === attribution ===

    #[test]
    fn attribution_cases() {
        let cases: &[(Option<&str>, &str, Attribution)] = &[
            (Some("/machine-agent-engine/daemon"), ENGINE, Attribution::Engine),
            (Some("/machine-agent-engine/daemon/sub"), ENGINE, Attribution::Engine),
            (Some("/machine-agent-engine"), ENGINE, Attribution::Engine),
            (Some("/machine-agent-engine/buildkit"), ENGINE, Attribution::Engine),
            (Some("/machine-agent-engine/buildkit/abc123"), ENGINE, Attribution::BuildStep { container_id: "abc123".into() }),
            (Some("/machine-agent-engine/buildkit/abc123/"), ENGINE, Attribution::BuildStep { container_id: "abc123".into() }),
            (Some("/machine-agent-engine/buildkit/abc123/init"), ENGINE, Attribution::BuildStep { container_id: "abc123".into() }),
            (Some("/machine-agent-engine//buildkit//abc"), ENGINE, Attribution::BuildStep { container_id: "abc".into() }),
            (Some("/machine-agent-engine/daemon"), "machine-agent-engine/", Attribution::Engine),
            (Some("/machine-agent-engine2/buildkit/abc"), ENGINE, Attribution::Other),
            (Some("/machine-agent-engine2"), ENGINE, Attribution::Other),
            (Some("/machine-agent-engin"), ENGINE, Attribution::Other),
            (Some("/system.slice/machine-agent.service"), ENGINE, Attribution::Other),
            (Some("/"), ENGINE, Attribution::Other),
            (Some(""), ENGINE, Attribution::Other),
            (Some("/a/machine-agent-engine/daemon"), ENGINE, Attribution::Other),
            (Some("/nested/engine/buildkit/x"), "/nested/engine", Attribution::BuildStep { container_id: "x".into() }),
            (None, ENGINE, Attribution::Unknown),
        ];
        for (task, engine, want) in cases {
            assert_eq!(&attribute(*task, engine), want, "{task:?} under {engine:?}");
        }
        assert_eq!(Attribution::BuildStep { container_id: "x".into() }.as_str(), "build_step");
    }

    // === assembler ===

    fn feed_all(asm: &mut OomAssembler, records: &[&str]) -> Vec<OomEvent> {
        records.iter().filter_map(|r| parse_kmsg_record(r)).filter_map(|r| asm.feed_record(&r)).collect()
    }

    #[test]
    fn assembles_6_x_memcg_kill_of_a_build_step() {
        let mut asm = OomAssembler::new(ENGINE);
        let events = feed_all(
            &mut asm,
            &[
                "4,100,1000000,-;python3 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
                "4,101,1000010,-;CPU: 1 PID: 4242 Comm: python3 Not tainted 6.1.0-18-amd64 #1 Debian 6.1.76-1",
                "6,102,1000020,-;memory: usage 1048576kB, limit 1048576kB, failcnt 42",
                "6,103,1000030,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/buildkit/abc123,task=python3,pid=4242,uid=0",
                "3,104,1000040,-;Memory cgroup out of memory: Killed process 4242 (python3) total-vm:123456kB, anon-rss:65432kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:200kB oom_score_adj:0",
                "6,105,1000100,-;oom_reaper: reaped process 4242 (python3), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB",
            ],
        );
        assert_eq!(
            events,
            vec![OomEvent {
                seq: 104,
                time_us: 1_000_040,
                pid: 4242,
                name: "python3".into(),
                uid: Some(0),
                scope: Some(OomScope::Memcg),
                constraint: Some(Constraint::Memcg),
                oom_memcg: Some("/machine-agent-engine".into()),
                task_memcg: Some("/machine-agent-engine/buildkit/abc123".into()),
                invoked_by: Some("python3".into()),
                oom_group: None,
                total_vm_bytes: Some(123_456 * 1024),
                anon_rss_bytes: Some(65_432 * 1024),
                file_rss_bytes: Some(0),
                shmem_rss_bytes: Some(0),
                pgtables_bytes: Some(200 * 1024),
                oom_score_adj: Some(0),
                attribution: Attribution::BuildStep { container_id: "abc123".into() },
            }]
        );
    }

    #[test]
    fn assembles_4_19_memcg_kill_of_the_engine() {
        let mut asm = OomAssembler::new(ENGINE);
        let events = feed_all(
            &mut asm,
            &[
                "4,10,500,-;buildkitd invoked oom-killer: gfp_mask=0x6000c0(GFP_KERNEL), nodemask=(null), order=0, oom_score_adj=0",
                "6,11,510,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/daemon,task=buildkitd,pid=900,uid=0",
                "3,12,520,-;Memory cgroup out of memory: Kill process 900 (buildkitd) score 1500 or sacrifice child",
                "3,13,530,-;Killed process 900 (buildkitd) total-vm:2000000kB, anon-rss:900000kB, file-rss:100kB, shmem-rss:0kB",
            ],
        );
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!((e.pid, e.name.as_str(), e.uid, e.scope), (900, "buildkitd", Some(0), Some(OomScope::Memcg)));
        assert_eq!(e.attribution, Attribution::Engine);
        assert_eq!(e.invoked_by.as_deref(), Some("buildkitd"));
    }

    #[test]
    fn assembles_4_14_v1_memcg_kill_from_task_in_line() {
        let mut asm = OomAssembler::new(ENGINE);
        let events = feed_all(
            &mut asm,
            &[
                "4,1,100,-;make invoked oom-killer: gfp_mask=0x14000c0(GFP_KERNEL), nodemask=(null),  order=0, oom_score_adj=0",
                "6,2,110,-;Task in /machine-agent-engine/buildkit/deadbeef killed as a result of limit of /machine-agent-engine",
                "6,3,120,-;memory: usage 524288kB, limit 524288kB, failcnt 7",
                "3,4,130,-;Memory cgroup out of memory: Kill process 311 (cc1) score 990 or sacrifice child",
                "3,5,140,-;Killed process 312 (cc1plus) total-vm:800000kB, anon-rss:500000kB, file-rss:20kB, shmem-rss:0kB",
            ],
        );
        assert_eq!(events.len(), 1);
        let e = &events[0];
        // The chosen process sacrificed a child: the Killed line is the victim.
        assert_eq!((e.pid, e.name.as_str(), e.uid), (312, "cc1plus", None));
        assert_eq!(e.scope, Some(OomScope::Memcg));
        assert_eq!(e.constraint, None);
        assert_eq!(e.task_memcg.as_deref(), Some("/machine-agent-engine/buildkit/deadbeef"));
        assert_eq!(e.oom_memcg.as_deref(), Some("/machine-agent-engine"));
        assert_eq!(e.attribution, Attribution::BuildStep { container_id: "deadbeef".into() });
        assert_eq!(e.invoked_by.as_deref(), Some("make"));
    }

    #[test]
    fn assembles_global_oom_outside_the_engine() {
        let mut asm = OomAssembler::new(ENGINE);
        let events = feed_all(
            &mut asm,
            &[
                "4,50,9000,-;stress invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|__GFP_COMP), order=0, oom_score_adj=0",
                "6,51,9001,-;oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,task_memcg=/user.slice/user-1000.slice/session-3.scope,task=stress,pid=1234,uid=1000",
                "3,52,9002,-;Out of memory: Killed process 1234 (stress) total-vm:4000000kB, anon-rss:3900000kB, file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:7700kB oom_score_adj:0",
            ],
        );
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!((e.scope, e.constraint.clone(), e.oom_memcg.clone()), (Some(OomScope::System), Some(Constraint::None), None));
        assert_eq!((e.uid, e.attribution.clone()), (Some(1000), Attribution::Other));
    }

    #[test]
    fn killed_line_alone_is_an_unknown_kill() {
        let mut asm = OomAssembler::new(ENGINE);
        let events = feed_all(&mut asm, &["3,1,1,-;Killed process 5 (x) total-vm:1kB, anon-rss:1kB, file-rss:0kB"]);
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].scope, events[0].attribution.clone(), events[0].invoked_by.clone()), (None, Attribution::Unknown, None));
    }

    #[test]
    fn summary_without_killed_line_does_not_leak_into_the_next_kill() {
        let mut asm = OomAssembler::new(ENGINE);
        let events = feed_all(
            &mut asm,
            &[
                // Episode 1: the summary is printed, the victim was already exiting, no Killed line.
                "4,1,100,-;python3 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
                "6,2,110,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/buildkit/aaa,task=python3,pid=10,uid=0",
                // An unrelated Killed line for another pid, with no episode of its own.
                "3,3,120,-;Killed process 11 (other) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB",
                // Episode 2.
                "4,4,200,-;node invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
                "6,5,210,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/buildkit/bbb,task=node,pid=20,uid=0",
                "3,6,220,-;Memory cgroup out of memory: Killed process 20 (node) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:4kB oom_score_adj:0",
            ],
        );
        assert_eq!(events.len(), 2);
        assert_eq!((events[0].pid, events[0].task_memcg.clone(), events[0].attribution.clone()), (11, None, Attribution::Unknown));
        assert_eq!(events[1].pid, 20);
        assert_eq!(events[1].attribution, Attribution::BuildStep { container_id: "bbb".into() });
    }

    #[test]
    fn stale_summary_for_the_same_pid_is_not_combined() {
        let mut asm = OomAssembler::new(ENGINE);
        let events = feed_all(
            &mut asm,
            &[
                "6,1,1000000,-;oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/daemon,task=x,pid=10,uid=0",
                "3,2,900000000,-;Killed process 10 (x) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB",
            ],
        );
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].attribution, Attribution::Unknown);
    }

    /// A whole report, in the kernel's words, as user space can write it into
    /// /dev/kmsg: every priority a writer can get (the kernel turns <0>..<7> into 8..15).
    fn report_with_priority(prio: u32, first_seq: u64, pid: u32) -> [String; 3] {
        [
            format!("{prio},{first_seq},100,-;buildkitd invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0"),
            format!(
                "{prio},{},110,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/daemon,task=buildkitd,pid={pid},uid=0",
                first_seq + 1
            ),
            format!(
                "{prio},{},120,-;Memory cgroup out of memory: Killed process {pid} (buildkitd) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0",
                first_seq + 2
            ),
        ]
    }

    #[test]
    fn a_report_written_from_user_space_is_no_kill() {
        let mut asm = OomAssembler::new(ENGINE);
        let mut seq = 1;
        for prio in [8, 11, 12, 14, 15, 30, 191, 8 * 255 + 3] {
            let forged = report_with_priority(prio, seq, 900);
            let forged: Vec<&str> = forged.iter().map(String::as_str).collect();
            assert_eq!(feed_all(&mut asm, &forged), vec![], "priority {prio}");
            seq += 3;
        }
        // The kernel's own report right after is read as ever.
        let real = report_with_priority(3, seq, 900);
        let events = feed_all(&mut asm, &real.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].pid, events[0].attribution.clone()), (900, Attribution::Engine));
    }

    #[test]
    fn user_lines_cannot_lend_context_to_a_kernel_kill() {
        let mut asm = OomAssembler::new(ENGINE);
        let events = feed_all(
            &mut asm,
            &[
                // Forged context (user facility) for a pid the kernel then really kills.
                "12,1,100,-;oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/daemon,task=busybox,pid=77,uid=0",
                "12,2,101,-;Tasks in /machine-agent-engine/daemon are going to be killed due to memory.oom.group set",
                "3,3,102,-;Memory cgroup out of memory: Killed process 77 (busybox) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0",
            ],
        );
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].attribution.clone(), events[0].task_memcg.clone(), events[0].oom_group.clone()), (Attribution::Unknown, None, None));
    }

    #[test]
    fn user_lines_between_summary_and_kill_do_not_split_the_report() {
        let mut asm = OomAssembler::new(ENGINE);
        let mut records = vec![
            "6,1,100,-;oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/buildkit/s1,task=cc1,pid=5,uid=0"
                .to_owned(),
        ];
        records.extend((2..500).map(|seq| format!("12,{seq},101,-;user space flooding the log {seq}")));
        records.push("3,500,102,-;Memory cgroup out of memory: Killed process 5 (cc1) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB".into());
        let events = feed_all(&mut asm, &records.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].attribution, Attribution::BuildStep { container_id: "s1".into() });
    }

    #[test]
    fn a_summary_far_before_the_kill_is_another_report() {
        let summary =
            "6,1,100,-;oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/daemon,task=x,pid=5,uid=0";
        let killed = |seq: u64| format!("3,{seq},200,-;Killed process 5 (x) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB");
        for (kernel_lines_between, want) in [
            (0, Attribution::Engine),
            (MAX_KERNEL_RECORDS_SUMMARY_TO_KILL - 1, Attribution::Engine),
            (MAX_KERNEL_RECORDS_SUMMARY_TO_KILL, Attribution::Unknown),
            (200, Attribution::Unknown),
        ] {
            let mut asm = OomAssembler::new(ENGINE);
            let mut records = vec![summary.to_owned()];
            records.extend((0..kernel_lines_between).map(|i| format!("6,{},150,-;eth0: link flapped {i}", i + 2)));
            records.push(killed(kernel_lines_between + 2));
            let events = feed_all(&mut asm, &records.iter().map(String::as_str).collect::<Vec<_>>());
            assert_eq!(events.len(), 1, "{kernel_lines_between}");
            assert_eq!(events[0].attribution, want, "{kernel_lines_between} kernel lines between summary and kill");
        }
    }

    #[test]
    fn summary_without_pid_combines_by_task_name() {
        let mut asm = OomAssembler::new(ENGINE);
        let events = feed_all(
            &mut asm,
            &[
                "6,1,1,-;oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/buildkit/c1,task=gcc",
                "3,2,2,-;Killed process 10 (gcc) total-vm:1kB, anon-rss:1kB, file-rss:0kB",
            ],
        );
        assert_eq!(events[0].attribution, Attribution::BuildStep { container_id: "c1".into() });
    }

    #[test]
    fn duplicate_and_replayed_records_emit_once() {
        let mut asm = OomAssembler::new(ENGINE);
        let records = [
            "6,7,70,-;oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/daemon,task=buildkitd,pid=9,uid=0",
            "3,8,80,-;Memory cgroup out of memory: Killed process 9 (buildkitd) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0",
            "3,8,80,-;Memory cgroup out of memory: Killed process 9 (buildkitd) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0",
        ];
        assert_eq!(feed_all(&mut asm, &records).len(), 1);
        // The reader reopened /dev/kmsg and replays the whole buffer.
        assert_eq!(feed_all(&mut asm, &records).len(), 0);
        // A fresh assembler told where the previous reader stopped.
        let mut resumed = OomAssembler::new(ENGINE);
        resumed.skip_through(8);
        assert_eq!(feed_all(&mut resumed, &records).len(), 0);
    }

    #[test]
    fn interleaved_unrelated_lines_do_not_break_an_episode() {
        let mut asm = OomAssembler::new(ENGINE);
        let events = feed_all(
            &mut asm,
            &[
                "6,1,1,-;oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/buildkit/z,task=rustc,pid=33,uid=0",
                "6,2,2,-;eth0: link up",
                "not a kmsg record at all",
                "6,3,3,-;[  33]     0    33   100000    90000   800000        0             0 rustc",
                "3,4,4,-;Memory cgroup out of memory: Killed process 33 (rustc) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:4kB oom_score_adj:0",
                "6,5,5,-;oom_reaper: reaped process 33 (rustc), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB",
            ],
        );
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].attribution, Attribution::BuildStep { container_id: "z".into() });
    }

    #[test]
    fn oom_group_kills_every_member_once() {
        let mut asm = OomAssembler::new(ENGINE);
        let events = feed_all(
            &mut asm,
            &[
                "4,1,10,-;sh invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
                "6,2,11,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/machine-agent-engine/buildkit/abc,task_memcg=/machine-agent-engine/buildkit/abc,task=python3,pid=100,uid=0",
                "3,3,12,-;Memory cgroup out of memory: Killed process 100 (python3) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:4kB oom_score_adj:0",
                "6,4,13,-;Tasks in /machine-agent-engine/buildkit/abc are going to be killed due to memory.oom.group set",
                "3,5,14,-;Memory cgroup out of memory: Killed process 101 (sh) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:4kB oom_score_adj:0",
                "3,6,15,-;Memory cgroup out of memory: Killed process 102 (make) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:4kB oom_score_adj:0",
            ],
        );
        let step = Attribution::BuildStep { container_id: "abc".into() };
        let got: Vec<_> = events.iter().map(|e| (e.pid, e.attribution.clone(), e.oom_group.clone(), e.invoked_by.clone())).collect();
        let group = Some("/machine-agent-engine/buildkit/abc".to_owned());
        let sh = Some("sh".to_owned());
        assert_eq!(got, vec![(100, step.clone(), None, sh.clone()), (101, step.clone(), group.clone(), sh.clone()), (102, step, group, sh)]);
        assert_eq!(events[1].task_memcg, None);
    }

    #[test]
    fn oom_group_member_attribution() {
        let cases: &[(&str, Attribution)] = &[
            ("/machine-agent-engine/buildkit/abc", Attribution::BuildStep { container_id: "abc".into() }),
            ("/machine-agent-engine/buildkit/abc/sub", Attribution::BuildStep { container_id: "abc".into() }),
            ("/machine-agent-engine/daemon", Attribution::Engine),
            // A group at the engine's root holds the daemon and the steps alike.
            ("/machine-agent-engine", Attribution::Unknown),
            ("/machine-agent-engine/buildkit", Attribution::Unknown),
            ("/system.slice/foo.service", Attribution::Other),
            ("/machine-agent-engine2", Attribution::Other),
        ];
        for (group, want) in cases {
            assert_eq!(&attribute_group_member(group, ENGINE), want, "{group}");
        }
        assert_eq!(line("Tasks in /a b/c are going to be killed due to memory.oom.group set"), OomLine::GroupKill { memcg: "/a b/c".into() });
        assert_eq!(parse_oom_line("Tasks in /a are going to be killed"), None);
    }

    #[test]
    fn vmstat_oom_kill_counter() {
        let text = "nr_free_pages 12345\noom_kill_extra 9\npgfault 77\noom_kill 3\nnr_unstable 0\n";
        assert_eq!(parse_vmstat_oom_kill(text), Some(3));
        assert_eq!(parse_vmstat_oom_kill("nr_free_pages 1\n"), None);
        assert_eq!(parse_vmstat_oom_kill("oom_kill x\n"), None);
        assert_eq!(parse_vmstat_oom_kill(""), None);
    }

    #[test]
    fn missed_kills_is_the_unexplained_part_of_the_delta() {
        assert_eq!(missed_kills(3, 1), 2);
        assert_eq!(missed_kills(1, 3), 0);
    }

    #[test]
    fn reconciler_windows() {
        let mut r = Reconciler::new();
        assert_eq!(r.reconcile(10, 4), 0, "baseline");
        assert_eq!(r.reconcile(12, 2), 0, "all seen");
        // The counter moved before the line arrived; the line shows up next window.
        assert_eq!(r.reconcile(13, 0), 0);
        assert_eq!(r.reconcile(13, 1), 0);
        // Two kills never show up: reported once they outlast a window, and only once.
        assert_eq!(r.reconcile(15, 0), 0);
        assert_eq!(r.reconcile(15, 0), 2);
        assert_eq!(r.reconcile(15, 0), 0);
        // One late, one lost.
        assert_eq!(r.reconcile(17, 0), 0);
        assert_eq!(r.reconcile(17, 1), 1);
        // Surplus events are not banked against later misses.
        assert_eq!(r.reconcile(17, 5), 0);
        assert_eq!(r.reconcile(18, 0), 0);
        assert_eq!(r.reconcile(18, 0), 1);
        // A counter going backwards restarts the baseline.
        assert_eq!(r.reconcile(2, 0), 0);
        assert_eq!(r.reconcile(3, 0), 0);
        assert_eq!(r.reconcile(3, 0), 1);
    }

    // === never panics ===

    const SAMPLES: &[&str] = &[
        "3,104,1000040,-;Memory cgroup out of memory: Killed process 4242 (python3) total-vm:123456kB, anon-rss:65432kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:200kB oom_score_adj:0",
        "6,103,1000030,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/machine-agent-engine,task_memcg=/machine-agent-engine/buildkit/abc123,task=python3,pid=4242,uid=0",
        "4,100,1000000,-;python3 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
        "6,2,110,-;Task in /machine-agent-engine/buildkit/deadbeef killed as a result of limit of /machine-agent-engine",
        "3,4,130,-;Out of memory: Kill process 311 (cc1) score 990 or sacrifice child",
        "3,5,140,-;Killed process 312 (cc1plus) total-vm:800000kB, anon-rss:500000kB, file-rss:20kB, shmem-rss:0kB",
        "6,4,13,-;Tasks in /machine-agent-engine/buildkit/abc are going to be killed due to memory.oom.group set",
    ];

    fn record_strategy() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            any::<String>(),
            // A real sample, cut at any char and with arbitrary text spliced in.
            (proptest::sample::select(SAMPLES), any::<usize>(), "[ -~(),:=;/\u{e9}]{0,12}").prop_map(|(s, cut, junk)| {
                let cuts: Vec<usize> = s.char_indices().map(|(i, _)| i).chain([s.len()]).collect();
                let at = cuts[cut % cuts.len()];
                format!("{}{junk}{}", &s[..at], &s[at..])
            }),
            (
                0u64..20,
                0u64..100_000_000,
                "(oom-kill:|Killed process |Kill process |Task in |Tasks in |x invoked oom-killer:|Out of memory: Killed process )[ -~]{0,60}"
            )
                .prop_map(|(seq, ts, msg)| format!("3,{seq},{ts},-;{msg}")),
        ]
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse_kmsg_record(&text);
            let _ = parse_oom_line(&text);
            let _ = parse_vmstat_oom_kill(&text);
            let _ = attribute(Some(&text), ENGINE);
            let _ = attribute(Some(ENGINE), &text);
        }

        #[test]
        fn assembler_never_panics_nor_emits_a_seq_twice(records in proptest::collection::vec(record_strategy(), 0..40)) {
            let mut asm = OomAssembler::new(ENGINE);
            let mut emitted = Vec::new();
            for text in &records {
                let _ = parse_oom_line(text);
                if let Some(rec) = parse_kmsg_record(text) {
                    if let Some(event) = asm.feed_record(&rec) {
                        emitted.push(event.seq);
                    }
                }
            }
            proptest::prop_assert!(emitted.windows(2).all(|w| w[0] < w[1]), "{emitted:?}");
        }

        /// Whatever user space writes - garbage, real reports cut and spliced,
        /// records with a header of their own inside - is never a kill.
        #[test]
        fn nothing_from_user_space_is_ever_a_kill(records in proptest::collection::vec((record_strategy(), 8u32..2048), 0..60)) {
            let mut asm = OomAssembler::new(ENGINE);
            for (seq, (text, prio)) in records.iter().enumerate() {
                // The kernel prefixes what user space wrote with its own header.
                let record = format!("{prio},{seq},{seq},-;{}", text.replace('\n', " "));
                let parsed = parse_kmsg_record(&record);
                proptest::prop_assert!(parsed.is_some_and(|r| !r.from_kernel()), "{record:?}");
                if let Some(rec) = parsed {
                    proptest::prop_assert_eq!(asm.feed_record(&rec), None);
                }
            }
        }

        #[test]
        fn reconciler_never_reports_more_than_the_counter_moved(steps in proptest::collection::vec((0u64..5, 0u64..5), 0..30)) {
            let mut r = Reconciler::new();
            let (mut counter, mut missed) = (100u64, 0u64);
            r.reconcile(counter, 0);
            for (kills, seen) in steps {
                counter += kills;
                missed += r.reconcile(counter, seen);
            }
            proptest::prop_assert!(missed <= counter - 100);
        }
    }
}
