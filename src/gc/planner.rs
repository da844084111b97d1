//! The GC planner: from BuildKit's cache records, the cache volume's free space
//! and the policy, decide which records to prune, in which order, and why.
//!
//! It owns the decision only. It never talks to BuildKit, never reads the clock
//! (the caller passes `now`) and never reads the filesystem (the caller passes
//! [`FsStats`]), so every rule below has a table test and a property test.
//!
//! # Behavior
//!
//! - A record is *protected*, and never a victim, when it is in use, shared, or
//!   younger than [`Policy::min_age`] (age counts from its last use, or from its
//!   creation if it was never used; a time in the future counts as age zero).
//!   A record whose id appears more than once in the input is protected too:
//!   the input is inconsistent and guessing which copy is right could prune a
//!   record that is still needed.
//! - A record can be freed only after every record that lists it as a parent:
//!   BuildKit keeps a parent that a live record still uses (verified on v0.24),
//!   so a plan that put a parent first would count bytes that never come back.
//!   A parent with a surviving child (protected, or simply not chosen) is never
//!   planned, and victims come in an order where children precede parents.
//!   A record in a parent cycle (or listing itself) is never planned.
//! - Retention: every record unused for longer than [`Policy::retention`] is a
//!   victim whatever the free space, as soon as its children are gone.
//! - Space targets: the non-shared cache above [`Policy::keep_bytes`], free
//!   bytes below the start watermark, free inodes below theirs. Each triggered
//!   target sets how much to free (down to `keep_bytes`, up to the stop
//!   watermark). The planner then frees the least recently used record whose
//!   children are all gone (ties: fewer uses first, then id), until every
//!   triggered target is met or nothing more can be freed, in which case the
//!   plan carries a [`Shortfall`].
//!   A space victim is labelled with the first target still unmet, in the
//!   order keep-bytes, free-bytes, free-inodes.
//! - An expired record that a space victim unblocks follows that victim at
//!   once, labelled [`Reason::Retention`]. So the order is: retention victims
//!   that need no space pressure, then space victims in LRU order, each
//!   possibly followed by the expired parents it unblocked.
//! - The output depends on the set of records, never on their input order.
//!
//! # Inode estimate
//!
//! BuildKit's records do not carry inode counts. A record with
//! [`Record::inodes`] set uses that. For the others the planner splits the
//! volume's used inodes that known counts do not explain in proportion to size:
//! `inodes(r) = (used_inodes - known_inodes) * size(r) / size(unknown records)`.
//! The cache volume holds nothing but the cache (the executor dir is bound from
//! the ephemeral disk), so used inodes are the cache's. The estimate is poor
//! for a record of many small files, which is why a stop watermark above the
//! start watermark leaves slack; the next run corrects with fresh stats.
//!
//! # Limitations
//!
//! - The planner treats every record type alike. BuildKit's Prune skips
//!   internal and frontend records unless `all` is set, so the executor must
//!   prune victims with `all` set, or such victims (and their parents) stay.
//! - Record sizes are BuildKit's, and freeing a record can free less on disk
//!   (data shared with snapshots outside the cache): expected numbers are
//!   estimates, and the executor should re-read the stats after pruning.

use crate::volume::stats::FsStats;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::time::{Duration, SystemTime};

/// Two weeks unused: a builder that runs a project's builds every week keeps
/// its cache across one missed week.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(14 * 24 * 60 * 60);
/// Ten minutes: a running build releases and re-acquires records between
/// steps, and a retried build comes back within minutes; neither should find
/// its fresh layers gone.
pub const DEFAULT_MIN_AGE: Duration = Duration::from_secs(10 * 60);
/// Start freeing space when less than 10% of the volume is free: BuildKit
/// needs room to unpack a layer before it can release anything.
pub const DEFAULT_FREE_START_BELOW_PERCENT: u8 = 10;
/// Free up to 20%: the gap to the start watermark keeps GC from running on
/// every sample once the volume hovers near full.
pub const DEFAULT_FREE_STOP_AT_PERCENT: u8 = 20;

/// BuildKit's record types (`client.UsageRecordType`), as DiskUsage reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordType {
    /// `regular`: a layer or snapshot from a build step.
    Regular,
    /// `internal`: BuildKit's own records.
    Internal,
    /// `frontend`: a frontend image.
    Frontend,
    /// `source.local`: a local context sent by a client.
    SourceLocal,
    /// `source.git.checkout`: a git checkout.
    SourceGitCheckout,
    /// `exec.cachemount`: a `RUN --mount=type=cache` directory.
    ExecCacheMount,
    /// Empty or a type this agent does not know.
    Unknown,
}

impl RecordType {
    /// Maps BuildKit's `RecordType` string; an unknown string is [`RecordType::Unknown`].
    pub fn from_buildkit(s: &str) -> Self {
        match s {
            "regular" => Self::Regular,
            "internal" => Self::Internal,
            "frontend" => Self::Frontend,
            "source.local" => Self::SourceLocal,
            "source.git.checkout" => Self::SourceGitCheckout,
            "exec.cachemount" => Self::ExecCacheMount,
            _ => Self::Unknown,
        }
    }
}

/// One cache record, as the planner needs it (mapped from BuildKit's `UsageRecord`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// BuildKit's record id, what a Prune `id==` filter names.
    pub id: String,
    pub size_bytes: u64,
    /// Ids of the records this one is built on; unknown ids are ignored.
    pub parents: Vec<String>,
    /// `None`: never used since it was created; age then counts from `created_at`.
    pub last_used: Option<SystemTime>,
    pub created_at: SystemTime,
    pub usage_count: u64,
    pub in_use: bool,
    pub shared: bool,
    pub record_type: RecordType,
    /// Inodes the record holds, when known; otherwise estimated (see the module doc).
    pub inodes: Option<u64>,
}

/// What the planner aims for. Watermarks are whole percent of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    /// Records unused for longer than this are victims whatever the free space.
    pub retention: Duration,
    /// The non-shared cache (in use included) is pruned down to this many bytes.
    pub keep_bytes: u64,
    /// Start freeing bytes when the free share is below this (the high watermark).
    pub free_bytes_start_below_percent: u8,
    /// Stop once the free share is at least this (the low watermark).
    pub free_bytes_stop_at_percent: u8,
    /// Start freeing inodes when the free share is below this.
    pub free_inodes_start_below_percent: u8,
    /// Stop once the free inode share is at least this.
    pub free_inodes_stop_at_percent: u8,
    /// A record younger than this (by last use, or creation) is never pruned.
    pub min_age: Duration,
}

/// Why a policy cannot be used as given.
#[derive(Debug, Clone, PartialEq, Eq, displaydoc::Display, thiserror::Error)]
pub enum PolicyError {
    /// {field} is {percent}%, above 100%
    PercentAbove100 { field: &'static str, percent: u8 },
    /// {what} watermarks: start below {start}% is above stop at {stop}%
    StartAboveStop { what: &'static str, start: u8, stop: u8 },
}

/// Why a record is a victim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Unused for longer than the retention.
    Retention,
    /// The non-shared cache is above `keep_bytes`.
    KeepBytes,
    /// Free bytes fell below the start watermark.
    FreeBytes,
    /// Free inodes fell below the start watermark.
    FreeInodes,
}

/// One record to prune.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Victim {
    pub id: String,
    pub size_bytes: u64,
    pub reason: Reason,
}

/// What each triggered space target asked the plan to free; `None`: not triggered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Targets {
    /// Bytes to free so the non-shared cache fits in `keep_bytes`.
    pub keep_bytes: Option<u64>,
    /// Bytes to free to reach the free-bytes stop watermark.
    pub free_bytes: Option<u64>,
    /// Inodes to free to reach the free-inodes stop watermark.
    pub free_inodes: Option<u64>,
}

/// How far the plan falls short of each target (0: met or not triggered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shortfall {
    pub keep_bytes: u64,
    pub free_bytes: u64,
    pub free_inodes: u64,
}

/// The planner's answer: victims in the order to prune them, and what they add up to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Retention victims first, then least recently used; children before parents.
    pub victims: Vec<Victim>,
    pub expected_freed_bytes: u64,
    /// Known inode counts plus the estimate for the rest (see the module doc).
    pub expected_freed_inodes: u64,
    pub targets: Targets,
    /// `Some` when freeing every record the rules allow still misses a target.
    pub shortfall: Option<Shortfall>,
}

// === impl Policy ===

impl Policy {
    /// The defaults, with the cache size the task gave as `keep_bytes`.
    pub fn new(keep_bytes: u64) -> Self {
        Self {
            retention: DEFAULT_RETENTION,
            keep_bytes,
            free_bytes_start_below_percent: DEFAULT_FREE_START_BELOW_PERCENT,
            free_bytes_stop_at_percent: DEFAULT_FREE_STOP_AT_PERCENT,
            free_inodes_start_below_percent: DEFAULT_FREE_START_BELOW_PERCENT,
            free_inodes_stop_at_percent: DEFAULT_FREE_STOP_AT_PERCENT,
            min_age: DEFAULT_MIN_AGE,
        }
    }

    /// Checks the watermarks. The planner itself accepts any policy: it caps
    /// percentages at 100 and stops no lower than it starts.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let percents = [
            ("free_bytes_start_below_percent", self.free_bytes_start_below_percent),
            ("free_bytes_stop_at_percent", self.free_bytes_stop_at_percent),
            ("free_inodes_start_below_percent", self.free_inodes_start_below_percent),
            ("free_inodes_stop_at_percent", self.free_inodes_stop_at_percent),
        ];
        if let Some(&(field, percent)) = percents.iter().find(|(_, p)| *p > 100) {
            return Err(PolicyError::PercentAbove100 { field, percent });
        }
        let pairs = [
            ("free bytes", self.free_bytes_start_below_percent, self.free_bytes_stop_at_percent),
            ("free inodes", self.free_inodes_start_below_percent, self.free_inodes_stop_at_percent),
        ];
        if let Some(&(what, start, stop)) = pairs.iter().find(|(_, start, stop)| start > stop) {
            return Err(PolicyError::StartAboveStop { what, start, stop });
        }
        Ok(())
    }
}

// === impl Reason ===

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retention => "retention",
            Self::KeepBytes => "keep-bytes",
            Self::FreeBytes => "free-bytes",
            Self::FreeInodes => "free-inodes",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Plan ===

impl Plan {
    /// What `gc --dry-run` prints: a summary line, then one line per victim
    /// in prune order (`id size reason`).
    pub fn explain(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "plan: {} victims, {} ({} bytes), ~{} inodes",
            self.victims.len(),
            Human(self.expected_freed_bytes),
            self.expected_freed_bytes,
            self.expected_freed_inodes
        )?;
        let targets = [
            ("keep-bytes", self.targets.keep_bytes, "bytes"),
            ("free-bytes", self.targets.free_bytes, "bytes"),
            ("free-inodes", self.targets.free_inodes, "inodes"),
        ];
        let mut triggered = targets.iter().filter_map(|(name, need, unit)| Some((name, (*need)?, unit))).peekable();
        if triggered.peek().is_none() {
            f.write_str("; no space target triggered")?;
        }
        for (name, need, unit) in triggered {
            write!(f, "; {name} needs {need} {unit}")?;
        }
        if let Some(s) = &self.shortfall {
            write!(f, "; SHORT by keep-bytes {} bytes, free-bytes {} bytes, free-inodes {} inodes", s.keep_bytes, s.free_bytes, s.free_inodes)?;
        }
        writeln!(f)?;
        for v in &self.victims {
            writeln!(f, "{} {} {}", v.id, v.size_bytes, v.reason)?;
        }
        Ok(())
    }
}

/// Bytes in binary units, for the summary line.
struct Human(u64);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

// === the planner ===

/// Plans which records to prune. Pure; `O(n log n)` in records plus parent links.
pub fn plan_prune(records: &[Record], fs: &FsStats, policy: &Policy, now: SystemTime) -> Plan {
    let graph = Graph::build(records, policy, now);
    let estimate = InodeEstimate::new(records, fs);
    let targets = targets(records, fs, policy);
    let mut run = Run { records, graph, estimate, targets, plan: Plan { targets, ..Plan::default() }, retention: BinaryHeap::new(), lru: BinaryHeap::new() };
    run.seed();
    run.drain_retention();
    while let Some(reason) = run.unmet() {
        let Some(Reverse(rank)) = run.lru.pop() else { break };
        run.take(rank, reason);
        run.drain_retention();
    }
    run.finish()
}

/// How much each triggered target asks for.
fn targets(records: &[Record], fs: &FsStats, policy: &Policy) -> Targets {
    // BuildKit's own keepBytes accounting: shared records are not the cache's
    // to free; in-use ones are, once released, so they count.
    let private_bytes = records.iter().filter(|r| !r.shared).fold(0u64, |sum, r| sum.saturating_add(r.size_bytes));
    let keep_bytes = (private_bytes > policy.keep_bytes).then(|| private_bytes - policy.keep_bytes);
    let free_bytes = watermark_need(fs.total_bytes, fs.free_bytes, policy.free_bytes_start_below_percent, policy.free_bytes_stop_at_percent);
    let free_inodes = watermark_need(fs.total_inodes, fs.free_inodes, policy.free_inodes_start_below_percent, policy.free_inodes_stop_at_percent);
    Targets { keep_bytes, free_bytes, free_inodes }
}

/// `Some(amount to free)` when `free` is below `start`% of `total`: enough to reach `stop`%.
fn watermark_need(total: u64, free: u64, start: u8, stop: u8) -> Option<u64> {
    let start = u128::from(start.min(100));
    let stop = u128::from(stop.min(100)).max(start);
    let (total, free) = (u128::from(total), u128::from(free.min(total)));
    if free * 100 >= start * total {
        return None;
    }
    let goal = (stop * total).div_ceil(100);
    // goal <= total <= u64::MAX, so the difference fits.
    Some(u64::try_from(goal - free).unwrap_or(u64::MAX))
}

/// Inodes per record: known counts, else a share of the unexplained used inodes by size.
struct InodeEstimate {
    pool: u128,
    unknown_bytes: u128,
}

impl InodeEstimate {
    fn new(records: &[Record], fs: &FsStats) -> Self {
        let used = fs.total_inodes.saturating_sub(fs.free_inodes);
        let known = records.iter().filter_map(|r| r.inodes).fold(0u64, u64::saturating_add);
        let unknown_bytes = records.iter().filter(|r| r.inodes.is_none()).map(|r| u128::from(r.size_bytes)).sum();
        Self { pool: u128::from(used.saturating_sub(known)), unknown_bytes }
    }

    fn of(&self, record: &Record) -> u64 {
        match record.inodes {
            Some(known) => known,
            None if self.unknown_bytes == 0 => 0,
            // size <= unknown_bytes, so the share is at most pool, which came from a u64.
            None => u64::try_from(self.pool * u128::from(record.size_bytes) / self.unknown_bytes).unwrap_or(u64::MAX),
        }
    }
}

/// Records interned to dense indices, with parent links and LRU ranks.
struct Graph {
    /// Per record: `true` when it may be pruned (not protected).
    prunable: Vec<bool>,
    /// Per record: unused for longer than the retention.
    expired: Vec<bool>,
    /// Per record: child links not yet freed; a record is a candidate at 0.
    children_left: Vec<u32>,
    /// Parent indices of record `i` are `parents[parent_start[i]..parent_start[i + 1]]`;
    /// [`NO_RECORD`] for a parent id not among the records.
    parent_start: Vec<usize>,
    parents: Vec<usize>,
    /// Per record: its place in LRU order (only meaningful for prunable records).
    rank: Vec<usize>,
    /// Record index at each rank.
    by_rank: Vec<usize>,
}

impl Graph {
    fn build(records: &[Record], policy: &Policy, now: SystemTime) -> Self {
        let n = records.len();
        // Ids are interned by sorting their 64-bit hashes, and parent links are
        // resolved by merging a second sorted list against it. A hash map did
        // the same with a cache and TLB miss per probe: 260 ms for a million
        // inserts on a 2-vCPU VM, against 30 ms to hash and sort. A collision
        // (odds about n^2/2^65, ~3e-8 at a million) only ever protects: two ids
        // with one hash count as a duplicate, and an unknown parent id that
        // matches a record's hash keeps that record alive.
        let mut ids: Vec<(u64, usize)> = records.iter().enumerate().map(|(i, r)| (id_hash(&r.id), i)).collect();
        ids.sort_unstable();
        let mut duplicate = vec![false; n];
        for copies in ids.chunk_by(|a, b| a.0 == b.0).filter(|run| run.len() > 1) {
            for &(_, i) in copies {
                duplicate[i] = true;
            }
        }

        // (parent id hash, position of the link in `parents`), in child order first.
        let mut links: Vec<(u64, usize)> = Vec::new();
        let mut parent_start = Vec::with_capacity(n + 1);
        parent_start.push(0);
        for r in records {
            for p in &r.parents {
                links.push((id_hash(p), links.len()));
            }
            parent_start.push(links.len());
        }
        let mut parents = vec![NO_RECORD; links.len()];
        let mut children_left = vec![0u32; n];
        links.sort_unstable();
        let mut next = 0;
        for (hash, link) in links {
            while ids.get(next).is_some_and(|&(h, _)| h < hash) {
                next += 1;
            }
            // A duplicated id resolves to one of its copies; every copy of it is
            // protected, and every copy's own links count, so its parents stay.
            if let Some(&(h, parent)) = ids.get(next) {
                if h == hash {
                    parents[link] = parent;
                    // Saturating at 4 billion children of one record: not a real cache.
                    children_left[parent] = children_left[parent].saturating_add(1);
                }
            }
        }
        drop(ids);

        let mut prunable = vec![false; n];
        let mut expired = vec![false; n];
        // Sort keys copied out of the records, so the sort compares within one
        // array and goes back to a record only to break a tie by id.
        let mut keys: Vec<(i128, u64, usize)> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let touched = last_touch(r);
            let age = now.duration_since(touched).unwrap_or(Duration::ZERO);
            prunable[i] = !duplicate[i] && !r.in_use && !r.shared && age >= policy.min_age;
            expired[i] = age > policy.retention;
            if prunable[i] {
                keys.push((epoch_nanos(touched), r.usage_count, i));
            }
        }
        // Least recently used first; ties: fewer uses first, then id (unique among candidates).
        keys.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)).then_with(|| records[a.2].id.cmp(&records[b.2].id)));
        let by_rank: Vec<usize> = keys.into_iter().map(|(_, _, i)| i).collect();
        let mut rank = vec![usize::MAX; n];
        for (k, &i) in by_rank.iter().enumerate() {
            rank[i] = k;
        }
        Self { prunable, expired, children_left, parent_start, parents, rank, by_rank }
    }
}

/// Nanoseconds from the Unix epoch, negative before it: the same order as `SystemTime`.
fn epoch_nanos(t: SystemTime) -> i128 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i128::try_from(after.as_nanos()).unwrap_or(i128::MAX),
        Err(before) => i128::try_from(before.duration().as_nanos()).map_or(i128::MIN, |n| -n),
    }
}

/// A record id's 64-bit hash, for interning: FxHash's word mix (rustc's
/// hasher) over the bytes and the length, then murmur3's finalizer. Fixed and
/// unseeded: the ids come from the local BuildKit, not from an attacker, a
/// collision only protects records (see [`Graph::build`]), and a fixed hash
/// keeps plans reproducible.
fn id_hash(id: &str) -> u64 {
    const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
    let bytes = id.as_bytes();
    let mut h = bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A parent link to an id that is not among the records.
const NO_RECORD: usize = usize::MAX;

/// When the record was last touched: its last use, or its creation if never used.
fn last_touch(r: &Record) -> SystemTime {
    r.last_used.unwrap_or(r.created_at)
}

/// One planning pass: two min-heaps of candidates (records whose children are
/// all freed), keyed by LRU rank. Expired candidates go to `retention`, which
/// is always drained; the rest wait in `lru` for space targets.
struct Run<'a> {
    records: &'a [Record],
    graph: Graph,
    estimate: InodeEstimate,
    targets: Targets,
    plan: Plan,
    retention: BinaryHeap<Reverse<usize>>,
    lru: BinaryHeap<Reverse<usize>>,
}

impl Run<'_> {
    fn seed(&mut self) {
        let g = &self.graph;
        let (mut retention, mut lru) = (Vec::new(), Vec::new());
        for (rank, &i) in g.by_rank.iter().enumerate() {
            if g.children_left[i] == 0 {
                if g.expired[i] {
                    retention.push(Reverse(rank))
                } else {
                    lru.push(Reverse(rank))
                }
            }
        }
        // Heapify is linear; pushing one by one would be n log n.
        self.retention = BinaryHeap::from(retention);
        self.lru = BinaryHeap::from(lru);
    }

    fn drain_retention(&mut self) {
        while let Some(Reverse(rank)) = self.retention.pop() {
            self.take(rank, Reason::Retention);
        }
    }

    /// Plans the record at `rank` and offers its parents that now have no child left.
    fn take(&mut self, rank: usize, reason: Reason) {
        let i = self.graph.by_rank[rank];
        let r = &self.records[i];
        self.plan.expected_freed_bytes = self.plan.expected_freed_bytes.saturating_add(r.size_bytes);
        self.plan.expected_freed_inodes = self.plan.expected_freed_inodes.saturating_add(self.estimate.of(r));
        self.plan.victims.push(Victim { id: r.id.clone(), size_bytes: r.size_bytes, reason });
        let g = &mut self.graph;
        for k in g.parent_start[i]..g.parent_start[i + 1] {
            let p = g.parents[k];
            if p == NO_RECORD {
                continue;
            }
            g.children_left[p] = g.children_left[p].saturating_sub(1);
            if g.children_left[p] == 0 && g.prunable[p] {
                let heap = if g.expired[p] { &mut self.retention } else { &mut self.lru };
                heap.push(Reverse(g.rank[p]));
            }
        }
    }

    /// The first triggered target the plan does not meet yet, as the reason for the next victim.
    fn unmet(&self) -> Option<Reason> {
        let short = self.shortfall();
        if short.keep_bytes > 0 {
            Some(Reason::KeepBytes)
        } else if short.free_bytes > 0 {
            Some(Reason::FreeBytes)
        } else if short.free_inodes > 0 {
            Some(Reason::FreeInodes)
        } else {
            None
        }
    }

    fn shortfall(&self) -> Shortfall {
        let (bytes, inodes) = (self.plan.expected_freed_bytes, self.plan.expected_freed_inodes);
        Shortfall {
            keep_bytes: self.targets.keep_bytes.unwrap_or(0).saturating_sub(bytes),
            free_bytes: self.targets.free_bytes.unwrap_or(0).saturating_sub(bytes),
            free_inodes: self.targets.free_inodes.unwrap_or(0).saturating_sub(inodes),
        }
    }

    fn finish(mut self) -> Plan {
        let short = self.shortfall();
        self.plan.shortfall = (short != Shortfall::default()).then_some(short);
        self.plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};
    use std::time::UNIX_EPOCH;

    const HOUR: u64 = 60 * 60;
    const DAY: u64 = 24 * HOUR;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn ago(secs: u64) -> SystemTime {
        now() - Duration::from_secs(secs)
    }

    /// Unused for `days_unused` days, created a year ago, used once.
    fn rec(id: &str, size_bytes: u64, days_unused: u64) -> Record {
        Record {
            id: id.to_owned(),
            size_bytes,
            parents: vec![],
            last_used: Some(ago(days_unused * DAY)),
            created_at: ago(365 * DAY),
            usage_count: 1,
            in_use: false,
            shared: false,
            record_type: RecordType::Regular,
            inodes: None,
        }
    }

    fn child(mut r: Record, parents: &[&str]) -> Record {
        r.parents = parents.iter().map(|p| (*p).to_owned()).collect();
        r
    }

    /// 90% free bytes and inodes: no watermark triggers.
    fn roomy() -> FsStats {
        FsStats { total_bytes: 1_000_000, free_bytes: 900_000, total_inodes: 1_000_000, free_inodes: 900_000 }
    }

    fn keep(keep_bytes: u64) -> Policy {
        Policy::new(keep_bytes)
    }

    fn ids(plan: &Plan) -> Vec<&str> {
        plan.victims.iter().map(|v| v.id.as_str()).collect()
    }

    fn reasons(plan: &Plan) -> Vec<Reason> {
        plan.victims.iter().map(|v| v.reason).collect()
    }

    #[test]
    fn retention_victims_even_when_space_is_plentiful() {
        let records = [rec("old", 10, 20), rec("recent", 10, 1)];
        let plan = plan_prune(&records, &roomy(), &keep(u64::MAX), now());
        assert_eq!(ids(&plan), ["old"]);
        assert_eq!(reasons(&plan), [Reason::Retention]);
        assert_eq!(plan.targets, Targets::default());
        assert_eq!(plan.shortfall, None);
        assert_eq!(plan.expected_freed_bytes, 10);
    }

    #[test]
    fn retention_is_strictly_longer_than_the_policy() {
        let records = [rec("exactly", 10, 14), rec("longer", 10, 15)];
        let plan = plan_prune(&records, &roomy(), &keep(u64::MAX), now());
        assert_eq!(ids(&plan), ["longer"]);
    }

    #[test]
    fn nothing_when_no_trigger() {
        let records = [rec("a", 10, 3), rec("b", 10, 2), rec("c", 10, 1)];
        let plan = plan_prune(&records, &roomy(), &keep(30), now());
        assert_eq!(plan, Plan::default());
        assert!(plan.explain().contains("no space target triggered"), "{}", plan.explain());
    }

    #[test]
    fn keep_bytes_prunes_lru_until_under() {
        let records = [rec("c", 100, 3), rec("a", 100, 5), rec("b", 100, 4)];
        let plan = plan_prune(&records, &roomy(), &keep(150), now());
        assert_eq!(plan.targets.keep_bytes, Some(150));
        assert_eq!(ids(&plan), ["a", "b"]);
        assert_eq!(reasons(&plan), [Reason::KeepBytes, Reason::KeepBytes]);
        assert_eq!(plan.expected_freed_bytes, 200);
        assert_eq!(plan.shortfall, None);
    }

    #[test]
    fn free_bytes_start_below_the_high_watermark_and_stop_at_the_low_one() {
        let records = [rec("a", 100, 5), rec("b", 100, 4), rec("c", 100, 3)];
        // 5% free: below 10%, so free up to 20% of 1000 = 200, i.e. 150 more.
        let fs = FsStats { total_bytes: 1000, free_bytes: 50, ..roomy() };
        let plan = plan_prune(&records, &fs, &keep(u64::MAX), now());
        assert_eq!(plan.targets.free_bytes, Some(150));
        assert_eq!(ids(&plan), ["a", "b"]);
        assert_eq!(reasons(&plan), [Reason::FreeBytes, Reason::FreeBytes]);

        // Exactly 10% free is not below the start watermark.
        let fs = FsStats { total_bytes: 1000, free_bytes: 100, ..roomy() };
        assert_eq!(plan_prune(&records, &fs, &keep(u64::MAX), now()), Plan::default());
    }

    #[test]
    fn free_inodes_use_known_counts() {
        let records: Vec<Record> = ["a", "b", "c"].iter().zip([5, 4, 3]).map(|(id, days)| Record { inodes: Some(100), ..rec(id, 1, days) }).collect();
        let fs = FsStats { total_inodes: 1000, free_inodes: 50, ..roomy() };
        let plan = plan_prune(&records, &fs, &keep(u64::MAX), now());
        assert_eq!(plan.targets.free_inodes, Some(150));
        assert_eq!(ids(&plan), ["a", "b"]);
        assert_eq!(reasons(&plan), [Reason::FreeInodes, Reason::FreeInodes]);
        assert_eq!(plan.expected_freed_inodes, 200);
    }

    #[test]
    fn unknown_inodes_are_estimated_in_proportion_to_size() {
        // 1000 used inodes, 200 of them known: the other 800 split 300:500 by size.
        let records = [rec("a", 300, 5), Record { inodes: Some(200), ..rec("b", 100, 4) }, rec("c", 500, 3)];
        let fs = FsStats { total_inodes: 1000, free_inodes: 0, ..roomy() };
        let estimate = InodeEstimate::new(&records, &fs);
        assert_eq!(records.iter().map(|r| estimate.of(r)).collect::<Vec<_>>(), [300, 200, 500]);

        // Need 20% of 1000 = 200 inodes: the oldest record's estimated 300 is enough.
        let plan = plan_prune(&records, &fs, &keep(u64::MAX), now());
        assert_eq!(ids(&plan), ["a"]);
        assert_eq!(plan.expected_freed_inodes, 300);
    }

    #[test]
    fn each_victim_is_labelled_with_the_first_target_it_still_serves() {
        let records = [rec("a", 100, 5), rec("b", 100, 4), rec("c", 100, 3)];
        // keep-bytes needs 100, free-bytes needs 200 - 0 = 200.
        let fs = FsStats { total_bytes: 1000, free_bytes: 0, ..roomy() };
        let plan = plan_prune(&records, &fs, &keep(200), now());
        assert_eq!(reasons(&plan), [Reason::KeepBytes, Reason::FreeBytes]);
    }

    #[test]
    fn in_use_records_are_never_picked() {
        let records = [Record { in_use: true, ..rec("busy", 100, 30) }, rec("idle", 100, 1)];
        let plan = plan_prune(&records, &roomy(), &keep(0), now());
        assert_eq!(ids(&plan), ["idle"]);
        assert_eq!(plan.shortfall, Some(Shortfall { keep_bytes: 100, ..Shortfall::default() }));
    }

    #[test]
    fn young_records_are_never_picked() {
        let records = [
            Record { last_used: Some(ago(5 * 60)), ..rec("used-5m-ago", 10, 0) },
            Record { last_used: None, created_at: ago(5 * 60), ..rec("created-5m-ago", 10, 0) },
            Record { last_used: Some(now() + Duration::from_secs(HOUR)), ..rec("used-in-the-future", 10, 0) },
            Record { last_used: None, created_at: ago(2 * DAY), ..rec("never-used", 10, 0) },
            Record { last_used: Some(ago(10 * 60)), ..rec("used-10m-ago", 10, 0) },
        ];
        let plan = plan_prune(&records, &roomy(), &keep(0), now());
        assert_eq!(ids(&plan), ["never-used", "used-10m-ago"]);
        assert_eq!(plan.shortfall.map(|s| s.keep_bytes), Some(30));
    }

    #[test]
    fn shared_records_are_never_picked_and_do_not_count_toward_keep_bytes() {
        let records = [Record { shared: true, ..rec("shared", 1000, 30) }, rec("private", 100, 1)];
        let plan = plan_prune(&records, &roomy(), &keep(100), now());
        assert_eq!(plan, Plan::default());

        let plan = plan_prune(&records, &roomy(), &keep(0), now());
        assert_eq!(plan.targets.keep_bytes, Some(100));
        assert_eq!(ids(&plan), ["private"]);
        assert_eq!(plan.shortfall, None);
    }

    #[test]
    fn children_are_planned_before_parents() {
        // The base is the least recently used, but two layers sit on it.
        let records = [rec("base", 10, 9), child(rec("mid", 10, 5), &["base"]), child(rec("leaf", 10, 3), &["mid"]), child(rec("other", 10, 4), &["base"])];
        let plan = plan_prune(&records, &roomy(), &keep(0), now());
        assert_eq!(ids(&plan), ["other", "leaf", "mid", "base"]);
    }

    #[test]
    fn parent_with_an_in_use_child_is_never_picked() {
        let records = [rec("base", 10, 9), child(Record { in_use: true, ..rec("busy", 10, 5) }, &["base"]), child(rec("idle", 10, 4), &["base"])];
        let plan = plan_prune(&records, &roomy(), &keep(0), now());
        assert_eq!(ids(&plan), ["idle"]);
        assert!(plan.shortfall.is_some());
    }

    #[test]
    fn parent_whose_child_is_not_chosen_is_not_picked() {
        let records = [rec("base", 100, 6), child(rec("layer", 100, 1), &["base"])];
        let plan = plan_prune(&records, &roomy(), &keep(150), now());
        assert_eq!(ids(&plan), ["layer"]);
        assert_eq!(plan.shortfall, None);
    }

    #[test]
    fn expired_parent_with_a_live_child_waits_for_it() {
        let records = [rec("base", 100, 30), child(rec("layer", 100, 1), &["base"])];
        let plan = plan_prune(&records, &roomy(), &keep(u64::MAX), now());
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn expired_parent_follows_the_space_victim_that_unblocks_it() {
        let records = [rec("base", 100, 30), child(rec("layer", 100, 2), &["base"]), rec("expired", 10, 20), rec("spare", 100, 3)];
        // One byte beyond the retention victim: "spare" (3 days) is less recently
        // used than "layer" (2 days), and the base stays blocked behind "layer".
        let plan = plan_prune(&records, &roomy(), &keep(299), now());
        assert_eq!(ids(&plan), ["expired", "spare"]);

        // Needing more frees "layer", and its expired base comes right after it,
        // even though the target is already met by then.
        let plan = plan_prune(&records, &roomy(), &keep(150), now());
        assert_eq!(ids(&plan), ["expired", "spare", "layer", "base"]);
        assert_eq!(reasons(&plan), [Reason::Retention, Reason::KeepBytes, Reason::KeepBytes, Reason::Retention]);
    }

    #[test]
    fn ties_are_broken_by_usage_count_then_id() {
        let records =
            [Record { usage_count: 1, ..rec("b", 10, 3) }, Record { usage_count: 2, ..rec("a", 10, 3) }, Record { usage_count: 1, ..rec("c", 10, 3) }];
        let plan = plan_prune(&records, &roomy(), &keep(0), now());
        assert_eq!(ids(&plan), ["b", "c", "a"]);
    }

    #[test]
    fn unreachable_target_is_reported_as_a_shortfall() {
        let records = [rec("a", 100, 5), Record { in_use: true, ..rec("busy", 5000, 5) }];
        let fs = FsStats { total_bytes: 10_000, free_bytes: 0, ..roomy() };
        let plan = plan_prune(&records, &fs, &keep(u64::MAX), now());
        assert_eq!(plan.targets.free_bytes, Some(2000));
        assert_eq!(ids(&plan), ["a"]);
        assert_eq!(plan.shortfall, Some(Shortfall { free_bytes: 1900, ..Shortfall::default() }));
        assert!(plan.explain().contains("SHORT by"), "{}", plan.explain());
    }

    #[test]
    fn duplicate_ids_are_never_picked_nor_their_parents() {
        let records = [rec("base", 10, 9), child(rec("twice", 10, 5), &["base"]), child(rec("twice", 10, 5), &[]), rec("single", 10, 4)];
        let plan = plan_prune(&records, &roomy(), &keep(0), now());
        assert_eq!(ids(&plan), ["single"]);
    }

    #[test]
    fn unknown_and_repeated_parent_ids_are_handled() {
        let records = [rec("base", 10, 9), child(rec("layer", 10, 5), &["base", "gone", "base"])];
        let plan = plan_prune(&records, &roomy(), &keep(0), now());
        assert_eq!(ids(&plan), ["layer", "base"]);
    }

    #[test]
    fn a_record_that_is_its_own_parent_is_never_picked() {
        let records = [child(rec("loop", 10, 9), &["loop"]), rec("fine", 10, 1)];
        let plan = plan_prune(&records, &roomy(), &keep(0), now());
        assert_eq!(ids(&plan), ["fine"]);
    }

    #[test]
    fn explain_prints_a_summary_and_one_line_per_victim() {
        let records = [rec("old", 2048, 20), rec("b", 100, 3)];
        let plan = plan_prune(&records, &roomy(), &keep(0), now());
        let text = plan.explain();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("plan: 2 victims, 2.1 KiB (2148 bytes)"), "{text}");
        assert!(lines[0].contains("keep-bytes needs 2148 bytes"), "{text}");
        assert_eq!(lines[1..], ["old 2048 retention", "b 100 keep-bytes"]);
        assert_eq!(text, plan.to_string());
    }

    #[test]
    fn policy_validation_names_the_bad_watermark() {
        assert_eq!(Policy::new(1).validate(), Ok(()));
        let bad = Policy { free_inodes_stop_at_percent: 101, ..Policy::new(1) };
        assert_eq!(bad.validate().map_err(|e| e.to_string()), Err("free_inodes_stop_at_percent is 101%, above 100%".to_owned()));
        let inverted = Policy { free_bytes_start_below_percent: 30, ..Policy::new(1) };
        assert_eq!(inverted.validate().map_err(|e| e.to_string()), Err("free bytes watermarks: start below 30% is above stop at 20%".to_owned()));
    }

    #[test]
    fn inverted_watermarks_stop_where_they_start() {
        assert_eq!(watermark_need(1000, 50, 30, 20), Some(250));
        assert_eq!(watermark_need(1000, 300, 30, 20), None);
        assert_eq!(watermark_need(0, 0, 10, 20), None);
        assert_eq!(watermark_need(1000, 5000, 10, 20), None);
        assert_eq!(watermark_need(u64::MAX, 0, 200, 200), Some(u64::MAX));
    }

    #[test]
    fn record_types_map_from_buildkit_strings() {
        assert_eq!(RecordType::from_buildkit("exec.cachemount"), RecordType::ExecCacheMount);
        assert_eq!(RecordType::from_buildkit("source.git.checkout"), RecordType::SourceGitCheckout);
        assert_eq!(RecordType::from_buildkit("something.new"), RecordType::Unknown);
    }

    // === properties ===

    /// Ids of 2 to 40 bytes, so hashing sees whole words and tails.
    fn id_of(i: usize) -> String {
        format!("{}r{i}", "sha256:".repeat(i % 6))
    }

    /// A forest: each record's parents are earlier records (plus, rarely, an unknown id).
    fn arb_records() -> impl Strategy<Value = Vec<Record>> {
        let one = (
            prop::collection::vec(any::<prop::sample::Index>(), 0..3),
            prop::bool::weighted(0.05),
            0u64..1000,
            prop::option::weighted(0.8, -2i64..(30 * 24)),
            0u64..(60 * 24),
            0u64..3,
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.1),
            prop::option::weighted(0.5, 0u64..100),
        );
        prop::collection::vec(one, 0..40).prop_map(|specs| {
            let n = specs.len();
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (parents, ghost, size_bytes, used_hours_ago, created_hours_ago, usage_count, in_use, shared, inodes))| {
                    let mut parents: Vec<String> = if i == 0 { vec![] } else { parents.iter().map(|p| id_of(p.index(i))).collect() };
                    if ghost {
                        parents.push(id_of(n + 1));
                    }
                    let at = |hours: i64| {
                        if hours >= 0 {
                            now() - Duration::from_secs(hours.unsigned_abs() * HOUR)
                        } else {
                            now() + Duration::from_secs(hours.unsigned_abs() * HOUR)
                        }
                    };
                    Record {
                        id: id_of(i),
                        size_bytes,
                        parents,
                        last_used: used_hours_ago.map(at),
                        created_at: at(i64::try_from(created_hours_ago).unwrap_or(0)),
                        usage_count,
                        in_use,
                        shared,
                        record_type: RecordType::Regular,
                        inodes,
                    }
                })
                .collect()
        })
    }

    fn arb_fs() -> impl Strategy<Value = FsStats> {
        (0u64..20_000, any::<prop::sample::Index>(), 0u64..5_000, any::<prop::sample::Index>()).prop_map(|(total_bytes, fb, total_inodes, fi)| FsStats {
            total_bytes,
            free_bytes: u64::try_from(fb.index(usize::try_from(total_bytes).unwrap_or(0) + 1)).unwrap_or(0),
            total_inodes,
            free_inodes: u64::try_from(fi.index(usize::try_from(total_inodes).unwrap_or(0) + 1)).unwrap_or(0),
        })
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (0u64..(40 * 24), 0u64..20_000, 0u8..=100, 0u8..=100, 0u8..=100, 0u8..=100, 0u64..5).prop_map(
            |(retention_hours, keep_bytes, bs, bt, is, it, min_age_hours)| Policy {
                retention: Duration::from_secs(retention_hours * HOUR),
                keep_bytes,
                free_bytes_start_below_percent: bs,
                free_bytes_stop_at_percent: bt,
                free_inodes_start_below_percent: is,
                free_inodes_stop_at_percent: it,
                min_age: Duration::from_secs(min_age_hours * HOUR),
            },
        )
    }

    fn age(r: &Record) -> Duration {
        now().duration_since(last_touch(r)).unwrap_or(Duration::ZERO)
    }

    fn protected(r: &Record, policy: &Policy) -> bool {
        r.in_use || r.shared || age(r) < policy.min_age
    }

    /// Every record the rules allow to free at all: unprotected, with every child freeable.
    fn freeable(records: &[Record], policy: &Policy) -> HashSet<String> {
        let mut set = HashSet::new();
        loop {
            let before = set.len();
            for r in records {
                let children_gone = records.iter().filter(|c| c.parents.contains(&r.id)).all(|c| set.contains(&c.id));
                if !protected(r, policy) && children_gone {
                    set.insert(r.id.clone());
                }
            }
            if set.len() == before {
                return set;
            }
        }
    }

    fn meets(targets: &Targets, bytes: u64, inodes: u64) -> bool {
        targets.keep_bytes.is_none_or(|need| bytes >= need)
            && targets.free_bytes.is_none_or(|need| bytes >= need)
            && targets.free_inodes.is_none_or(|need| inodes >= need)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn plans_follow_the_rules(records in arb_records(), fs in arb_fs(), policy in arb_policy()) {
            let plan = plan_prune(&records, &fs, &policy, now());
            let by_id: HashMap<&str, &Record> = records.iter().map(|r| (r.id.as_str(), r)).collect();
            let position: HashMap<&str, usize> =
                plan.victims.iter().enumerate().map(|(k, v)| (v.id.as_str(), k)).collect();

            prop_assert_eq!(position.len(), plan.victims.len(), "duplicate victims");
            for (k, v) in plan.victims.iter().enumerate() {
                let r = by_id[v.id.as_str()];
                prop_assert!(!protected(r, &policy), "protected record {} planned", r.id);
                prop_assert_eq!(v.size_bytes, r.size_bytes);
                for c in records.iter().filter(|c| c.parents.contains(&r.id)) {
                    let ck = position.get(c.id.as_str());
                    prop_assert!(ck.is_some_and(|&ck| ck < k), "child {} of {} not planned before it", c.id, r.id);
                }
            }
            prop_assert_eq!(plan.expected_freed_bytes, plan.victims.iter().map(|v| v.size_bytes).sum::<u64>());

            // Retention victims are always included, once their children are gone.
            for r in &records {
                let children_planned =
                    records.iter().filter(|c| c.parents.contains(&r.id)).all(|c| position.contains_key(c.id.as_str()));
                if !protected(r, &policy) && age(r) > policy.retention && children_planned {
                    prop_assert!(position.contains_key(r.id.as_str()), "expired {} left out", r.id);
                }
            }

            // Targets, computed independently.
            let private: u64 = records.iter().filter(|r| !r.shared).map(|r| r.size_bytes).sum();
            prop_assert_eq!(plan.targets.keep_bytes, (private > policy.keep_bytes).then(|| private - policy.keep_bytes));
            let triggered = u128::from(fs.free_bytes) * 100
                < u128::from(policy.free_bytes_start_below_percent) * u128::from(fs.total_bytes);
            prop_assert_eq!(plan.targets.free_bytes.is_some(), triggered);

            // Everything the rules allow would meet the targets => the plan meets them.
            let all = freeable(&records, &policy);
            let estimate = InodeEstimate::new(&records, &fs);
            let all_bytes: u64 = records.iter().filter(|r| all.contains(&r.id)).map(|r| r.size_bytes).sum();
            let all_inodes: u64 = records.iter().filter(|r| all.contains(&r.id)).map(|r| estimate.of(r)).sum();
            prop_assert!(position.keys().all(|id| all.contains(*id)));
            if meets(&plan.targets, all_bytes, all_inodes) {
                prop_assert_eq!(plan.shortfall, None);
            } else {
                prop_assert!(plan.shortfall.is_some());
                prop_assert_eq!(position.len(), all.len(), "short, yet not everything freeable was planned");
            }
            prop_assert_eq!(
                plan.shortfall.is_none(),
                meets(&plan.targets, plan.expected_freed_bytes, plan.expected_freed_inodes)
            );

            // It stops as soon as the targets are met: without the last space
            // victim (and the retention victims after it) they were not.
            if let Some(last) = plan.victims.iter().rposition(|v| v.reason != Reason::Retention) {
                let before = &plan.victims[..last];
                let bytes = before.iter().map(|v| v.size_bytes).sum();
                let inodes = before.iter().map(|v| estimate.of(by_id[v.id.as_str()])).sum();
                prop_assert!(!meets(&plan.targets, bytes, inodes), "planned past the targets");
            }
        }

        #[test]
        fn input_order_does_not_matter(
            (records, shuffled) in arb_records().prop_flat_map(|r| (Just(r.clone()), Just(r).prop_shuffle())),
            fs in arb_fs(),
            policy in arb_policy(),
        ) {
            let shuffled: Vec<Record> = shuffled
                .into_iter()
                .map(|mut r| {
                    r.parents.reverse();
                    r
                })
                .collect();
            prop_assert_eq!(plan_prune(&records, &fs, &policy, now()), plan_prune(&shuffled, &fs, &policy, now()));
        }
    }
}
