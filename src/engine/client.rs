//! The native BuildKit client: BuildKit's own gRPC API (`moby.buildkit.v1.Control`
//! and `grpc.health.v1.Health`) spoken over buildkitd's unix socket, with no
//! `buildctl` subprocess.
//!
//! It owns connecting, readiness ([`wait_ready`]), and the four calls the
//! agent needs: health, workers, disk usage and prune-by-id. Every call is
//! bounded by a timeout, so a hung engine costs the caller a timeout, never a
//! hang. It never prunes anything it was not given the id of: there is no
//! "prune everything" here, and an empty id list sends nothing.
//!
//! Readiness is detected by connecting, not by polling a subprocess: attempts
//! back off from 1 ms to 50 ms, and an inotify watch on the socket's directory
//! cuts a backoff sleep short the moment buildkitd creates its socket. The
//! attempt that connects then waits in its health call: buildkitd v0.34
//! accepts on the socket tens of milliseconds (more on a loaded machine)
//! before its gRPC server takes connections, and the wait ends within about a
//! millisecond of that (benches/engine_ready.rs).

use crate::backoff::PollGaps;
use crate::describe::{describe_status, error_chain};
use crate::proto::grpc::health::v1 as health_pb;
use crate::proto::moby::buildkit::v1 as pb;
use health_pb::health_check_response::ServingStatus;
use health_pb::health_client::HealthClient;
use hyper_util::rt::TokioIo;
use pb::control_client::ControlClient;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint, Uri};

/// A local socket connects in microseconds; a second means the engine is wedged.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Health, workers, info and disk usage are in-memory reads in buildkitd;
/// five seconds covers a busy engine and still finds a hung one quickly.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// DiskUsage is not an in-memory read: buildkitd sizes every record whose
/// size it does not know yet (every record made since the last DiskUsage or
/// GC) by walking its snapshot. Measured here with 2 busy cores: 14.8 s for
/// the first call over 10,200 fresh records, 0.28 s for the next
/// (benches/gc_bigcache.rs has the 40,000-record figures). Two minutes covers
/// a cold cache of that size several times over and still ends a hung call.
pub const DEFAULT_DISK_USAGE_TIMEOUT: Duration = Duration::from_secs(120);
/// The largest message buildkitd sends or takes: its gRPC server's limits are
/// containerd's `defaults.DefaultMaxSendMsgSize`/`DefaultMaxRecvMsgSize`
/// (16 MiB, cmd/buildkitd/main.go), and BuildKit's own client takes the same
/// as its receive limit (client/client.go). tonic's default is 4 MiB, which a
/// DiskUsage answer of about 20,000 records with short descriptions passes.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// A DiskUsage answer that would pass [`MAX_MESSAGE_BYTES`] is asked for again
/// in pages by id prefix, one character longer each split; BuildKit ids are 25
/// base-36 characters, so four levels (36^4 pages) is far past any cache.
const MAX_PAGE_PREFIX: usize = 4;
/// The characters BuildKit ids are made of (identity.NewID: base 36, lower case).
const ID_ALPHABET: &str = "0123456789abcdefghijklmnopqrstuvwxyz";
/// Pruning deletes snapshot directories, which can hold gigabytes of small
/// files on a slow volume.
pub const DEFAULT_PRUNE_TIMEOUT: Duration = Duration::from_secs(120);
/// Readiness attempts start fast: buildkitd on a fresh root listens within
/// tens of milliseconds of its start.
pub const READY_BACKOFF_INITIAL: Duration = Duration::from_millis(1);
/// ... and are capped so an engine that is slow to start (a large root to
/// load) is still found within 50 ms of it listening, even without inotify.
pub const READY_BACKOFF_MAX: Duration = Duration::from_millis(50);

/// Why the engine could not be reached, or a call to it failed.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ClientError {
    /// cannot connect to buildkitd at {socket}: {reason}
    Connect { socket: PathBuf, reason: String },
    /// no connection to buildkitd at {socket} within {timeout:?}
    ConnectTimeout { socket: PathBuf, timeout: Duration },
    /// {call} on buildkitd at {socket} failed: {reason}
    Call { call: &'static str, socket: PathBuf, reason: String },
    /// {call} on buildkitd at {socket} got no answer within {timeout:?}
    Timeout { call: &'static str, socket: PathBuf, timeout: Duration },
    /// refusing to prune cache record id {id:?}: ids are letters, digits, '-', '_' and '.'
    InvalidId { id: String },
    /// buildkitd at {socket} was not ready within {timeout:?} ({attempts} attempts); last: {last}
    NotReady { socket: PathBuf, timeout: Duration, attempts: u32, last: String },
}

/// One of the engine's workers (the OCI worker, on our machines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub id: String,
    /// `org.mobyproject.buildkit.worker.*`: executor, snapshotter, hostname, network.
    pub labels: BTreeMap<String, String>,
    /// The BuildKit release that runs the worker, when the engine says.
    pub version: Option<EngineVersion>,
    /// The CDI devices it lists, by fully qualified name, in its order.
    pub devices: Vec<String>,
}

/// BuildKit's release, as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineVersion {
    /// "github.com/moby/buildkit".
    pub package: String,
    /// "v0.34.2".
    pub version: String,
    /// The git revision; empty for builds made outside a checkout.
    pub revision: String,
}

impl std::fmt::Display for EngineVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.revision.as_str() {
            "" => write!(f, "{}", self.version),
            revision => write!(f, "{} ({revision})", self.version),
        }
    }
}

/// One cache record: a snapshot layer, a cache mount, a local context, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRecord {
    pub id: String,
    pub size_bytes: u64,
    /// The records this one is built on; the deprecated single `Parent` when
    /// an older engine fills only that.
    pub parents: Vec<String>,
    pub created_at: Option<SystemTime>,
    pub last_used_at: Option<SystemTime>,
    pub usage_count: u64,
    /// Held by a running build or a reference: never pruned.
    pub in_use: bool,
    pub shared: bool,
    pub mutable: bool,
    /// "regular", "internal", "frontend", "source.local", "exec.cachemount", ...
    pub record_type: String,
    pub description: String,
}

/// What [`wait_ready`] found: a connected client and the engine it talks to.
#[derive(Debug, Clone)]
pub struct ReadyInfo {
    pub client: EngineClient,
    /// BuildKit's release, "v0.34.2".
    pub version: String,
    /// How many workers ListWorkers returned: at least one.
    pub workers: usize,
    /// Their ids, in the engine's order.
    pub worker_ids: Vec<String>,
    /// The CDI devices the workers list, each once, sorted.
    pub devices: Vec<String>,
    /// Connect attempts it took.
    pub attempts: u32,
}

/// A connection to one buildkitd. Cheap to clone: clones share the connection.
#[derive(Debug, Clone)]
pub struct EngineClient {
    socket: PathBuf,
    control: ControlClient<Channel>,
    health: HealthClient<Channel>,
    call_timeout: Duration,
    disk_usage_timeout: Duration,
    prune_timeout: Duration,
}

/// Every cache record, and what it took to read them.
#[derive(Debug, Clone, Default)]
pub struct DiskUsage {
    pub records: Vec<CacheRecord>,
    /// DiskUsage calls made: 1, unless the answer had to be paged.
    pub calls: u32,
    /// Bytes of the answers as encoded on the wire (protobuf, before gRPC framing).
    pub bytes: u64,
}

// === impl EngineClient ===

impl EngineClient {
    /// Connects now (not on first use), within [`CONNECT_TIMEOUT`]. Fails at
    /// once with the socket's errno when nothing listens there.
    pub async fn connect(socket: &Path) -> Result<Self, ClientError> {
        Self::connect_within(socket, CONNECT_TIMEOUT).await
    }

    async fn connect_within(socket: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let path = socket.to_path_buf();
        // The URI is never dialled: the connector below always opens the unix
        // socket. It only fills the :authority of each request.
        let endpoint = Endpoint::from_static("http://buildkitd").connect_timeout(timeout);
        let connector = tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
        });
        // The endpoint's connect timeout bounds the socket connect; this one
        // also bounds the HTTP/2 handshake that follows it.
        let channel = match tokio::time::timeout(timeout, endpoint.connect_with_connector(connector)).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return Err(ClientError::Connect { socket: socket.to_path_buf(), reason: error_chain(&e) }),
            Err(_) => return Err(ClientError::ConnectTimeout { socket: socket.to_path_buf(), timeout }),
        };
        Ok(Self {
            socket: socket.to_path_buf(),
            control: ControlClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES),
            health: HealthClient::new(channel),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            disk_usage_timeout: DEFAULT_DISK_USAGE_TIMEOUT,
            prune_timeout: DEFAULT_PRUNE_TIMEOUT,
        })
    }

    /// The bound on health, workers, info and disk usage.
    #[must_use]
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// The bound on a whole DiskUsage, every page included.
    #[must_use]
    pub fn with_disk_usage_timeout(mut self, timeout: Duration) -> Self {
        self.disk_usage_timeout = timeout;
        self
    }

    /// The bound on a whole prune, stream included.
    #[must_use]
    pub fn with_prune_timeout(mut self, timeout: Duration) -> Self {
        self.prune_timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// True when the engine answers SERVING. buildkitd registers only the
    /// overall service name "", so that is the one asked for.
    pub async fn health(&self) -> Result<bool, ClientError> {
        let request = health_pb::HealthCheckRequest { service: String::new() };
        let response = self.unary("Health.Check", self.call_timeout, self.health.clone().check(request)).await?;
        Ok(response.status == ServingStatus::Serving as i32)
    }

    pub async fn workers(&self) -> Result<Vec<Worker>, ClientError> {
        let response = self.unary("ListWorkers", self.call_timeout, self.control.clone().list_workers(pb::ListWorkersRequest::default())).await?;
        Ok(response.record.into_iter().map(worker_from_pb).collect())
    }

    pub async fn info(&self) -> Result<EngineVersion, ClientError> {
        let response = self.unary("Info", self.call_timeout, self.control.clone().info(pb::InfoRequest {})).await?;
        response.buildkit_version.map(version_from_pb).ok_or_else(|| ClientError::Call {
            call: "Info",
            socket: self.socket.clone(),
            reason: "the answer carries no version".into(),
        })
    }

    /// Every cache record the engine holds.
    pub async fn disk_usage(&self) -> Result<Vec<CacheRecord>, ClientError> {
        Ok(self.disk_usage_paged().await?.records)
    }

    /// Every cache record, in one call while the answer fits in
    /// [`MAX_MESSAGE_BYTES`]; past that (the engine refuses to send it, or it
    /// is too large to take), in pages of ids with a common prefix, each split
    /// again while it is still too large. The whole read is bounded by the
    /// DiskUsage timeout. The pages are not one snapshot: a record made or
    /// pruned meanwhile may be missing or seen once, never twice.
    pub async fn disk_usage_paged(&self) -> Result<DiskUsage, ClientError> {
        let deadline = Instant::now() + self.disk_usage_timeout;
        let mut out = DiskUsage::default();
        let mut seen = std::collections::HashSet::new();
        // None: the whole list; Some(page): the ids the page's pattern matches.
        let mut pending: Vec<Option<IdPage>> = vec![None];
        while let Some(page) = pending.pop() {
            let filter = page.as_ref().map(IdPage::filter).into_iter().collect();
            let request = pb::DiskUsageRequest { filter, ..Default::default() };
            let mut control = self.control.clone();
            let response = match tokio::time::timeout_at(deadline, control.disk_usage(request)).await {
                Ok(Ok(response)) => response.into_inner(),
                Ok(Err(status)) if too_large(&status) => {
                    // The rest of a page (ids outside the alphabet) cannot be split; nor can a prefix at the limit.
                    let deeper = page.as_ref().is_none_or(|p| !p.rest && p.prefix.len() < MAX_PAGE_PREFIX);
                    let Some(split) = deeper.then(|| IdPage::split(page.as_ref())) else {
                        return Err(ClientError::Call { call: "DiskUsage", socket: self.socket.clone(), reason: describe_status(&status) });
                    };
                    tracing::debug!(page = ?page.map(|p| p.filter()), "DiskUsage answer too large; paging by id prefix");
                    pending.extend(split.into_iter().map(Some));
                    continue;
                }
                Ok(Err(status)) => return Err(ClientError::Call { call: "DiskUsage", socket: self.socket.clone(), reason: describe_status(&status) }),
                Err(_) => return Err(ClientError::Timeout { call: "DiskUsage", socket: self.socket.clone(), timeout: self.disk_usage_timeout }),
            };
            out.calls = out.calls.saturating_add(1);
            out.bytes = out.bytes.saturating_add(u64::try_from(prost::Message::encoded_len(&response)).unwrap_or(u64::MAX));
            out.records.extend(response.record.into_iter().filter(|r| seen.insert(r.id.clone())).map(record_from_pb));
        }
        Ok(out)
    }

    /// The records named by `ids` that the engine still holds (one DiskUsage
    /// filtered by id; the filters are ORed). An empty `ids` asks nothing.
    pub async fn records(&self, ids: &[String]) -> Result<Vec<CacheRecord>, ClientError> {
        let filter = prune_filters(ids)?;
        if filter.is_empty() {
            return Ok(vec![]);
        }
        let request = pb::DiskUsageRequest { filter, ..Default::default() };
        let response = self.unary("DiskUsage", self.disk_usage_timeout, self.control.clone().disk_usage(request)).await?;
        Ok(response.record.into_iter().map(record_from_pb).collect())
    }

    /// Deletes exactly the records named by `ids` and returns what the engine
    /// reports as deleted (records in use are skipped by the engine, so the
    /// answer can be shorter than `ids`). An empty `ids` returns at once:
    /// an unfiltered prune would delete every unused record.
    pub async fn prune(&self, ids: &[String]) -> Result<Vec<CacheRecord>, ClientError> {
        let filter = prune_filters(ids)?;
        if filter.is_empty() {
            return Ok(vec![]);
        }
        // `all` lifts the engine's default exemption of internal and frontend
        // records: the id filter alone decides what goes.
        let request = pb::PruneRequest { filter, all: true, ..Default::default() };
        let mut control = self.control.clone();
        let collect = async move {
            let mut stream = control.prune(request).await?.into_inner();
            let mut freed = vec![];
            while let Some(record) = stream.message().await? {
                freed.push(record_from_pb(record));
            }
            Ok::<_, tonic::Status>(freed)
        };
        self.bounded("Prune", self.prune_timeout, collect).await
    }

    /// Opens the engine's build history: first a Started (or Complete) event
    /// for every build it keeps (only the running ones with `active_only`),
    /// then one event per build started, completed or deleted, until the
    /// stream ends. Opening is bounded by the call timeout; the stream is not.
    pub async fn listen_build_history(&self, active_only: bool) -> Result<BuildHistory, ClientError> {
        let request = pb::BuildHistoryRequest { active_only, ..Default::default() };
        let stream = self.unary("ListenBuildHistory", self.call_timeout, self.control.clone().listen_build_history(request)).await?;
        Ok(BuildHistory { stream, socket: self.socket.clone() })
    }

    async fn unary<T>(
        &self,
        call: &'static str,
        timeout: Duration,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ClientError> {
        self.bounded(call, timeout, async { fut.await.map(tonic::Response::into_inner) }).await
    }

    async fn bounded<T>(&self, call: &'static str, timeout: Duration, fut: impl Future<Output = Result<T, tonic::Status>>) -> Result<T, ClientError> {
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(status)) => Err(ClientError::Call { call, socket: self.socket.clone(), reason: describe_status(&status) }),
            Err(_) => Err(ClientError::Timeout { call, socket: self.socket.clone(), timeout }),
        }
    }
}

/// Waits until the engine at `socket` is ready: it accepts a connection,
/// health answers SERVING, and ListWorkers returns at least one worker.
/// Gives up after `timeout`, with the last attempt's error.
///
/// Attempts back off from [`READY_BACKOFF_INITIAL`] to [`READY_BACKOFF_MAX`].
/// When the socket's directory exists, an inotify watch on it ends a backoff
/// sleep as soon as an entry with the socket's name is created (buildkitd
/// removes a stale socket and binds a new one), and the schedule starts over.
pub async fn wait_ready(socket: &Path, timeout: Duration) -> Result<ReadyInfo, ClientError> {
    let deadline = Instant::now() + timeout;
    // Set up before the first attempt, so a socket created in between is
    // either seen by the attempt or reported by the watch.
    let mut watch = SocketWatch::new(socket);
    let mut gaps = PollGaps::doubling(READY_BACKOFF_INITIAL, READY_BACKOFF_MAX);
    let mut attempts = 0u32;
    let mut last = String::from("no attempt finished");
    loop {
        attempts = attempts.saturating_add(1);
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, ready_attempt(socket, remaining)).await {
            Ok(Ok(mut ready)) => {
                ready.attempts = attempts;
                return Ok(ready);
            }
            Ok(Err(error)) => {
                tracing::debug!(socket = %socket.display(), attempts, %error, "engine not ready yet");
                last = error.to_string();
            }
            Err(_) => last = format!("an attempt was still running at the deadline (last error: {last})"),
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(ClientError::NotReady { socket: socket.to_path_buf(), timeout, attempts, last });
        }
        let created = async {
            match &mut watch {
                Some(watch) => watch.created().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(gaps.next_gap().min(remaining)) => {}
            () = created => gaps.reset(),
        }
    }
}

/// One readiness attempt: connect, health, workers; each bounded by what is
/// left of the caller's deadline. Connected before buildkitd serves, the
/// health call simply waits (up to the call timeout) for it to start serving.
async fn ready_attempt(socket: &Path, remaining: Duration) -> Result<ReadyInfo, ClientError> {
    let client = EngineClient::connect_within(socket, CONNECT_TIMEOUT.min(remaining)).await?.with_call_timeout(DEFAULT_CALL_TIMEOUT.min(remaining));
    if !client.health().await? {
        return Err(ClientError::Call { call: "Health.Check", socket: socket.to_path_buf(), reason: "not SERVING".into() });
    }
    let workers = client.workers().await?;
    if workers.is_empty() {
        return Err(ClientError::Call { call: "ListWorkers", socket: socket.to_path_buf(), reason: "no workers yet".into() });
    }
    // Each worker carries the engine's version, which saves an Info call on
    // this path; older engines leave it out.
    let version = match workers.iter().find_map(|w| w.version.as_ref()) {
        Some(v) => v.version.clone(),
        None => client.info().await?.version,
    };
    let client = client.with_call_timeout(DEFAULT_CALL_TIMEOUT);
    let devices: std::collections::BTreeSet<String> = workers.iter().flat_map(|w| w.devices.iter().cloned()).collect();
    Ok(ReadyInfo {
        client,
        version,
        workers: workers.len(),
        worker_ids: workers.into_iter().map(|w| w.id).collect(),
        devices: devices.into_iter().collect(),
        attempts: 0,
    })
}

/// An answer too large to send (grpc-go's server: ResourceExhausted) or to
/// take (tonic's decoder: OutOfRange).
fn too_large(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::ResourceExhausted | tonic::Code::OutOfRange)
}

/// A page of DiskUsage: the ids that start with `prefix` followed by one of
/// the id alphabet's characters, or, for `rest`, by anything else (or nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
struct IdPage {
    prefix: String,
    rest: bool,
}

impl IdPage {
    /// The containerd filter (a regular expression on the id) that selects the page.
    fn filter(&self) -> String {
        if self.rest {
            format!("id~=\"^{}([^{ID_ALPHABET}]|$)\"", self.prefix)
        } else {
            format!("id~=^{}", self.prefix)
        }
    }

    /// The pages that together hold exactly the ids of `page` (None: every id).
    fn split(page: Option<&IdPage>) -> Vec<IdPage> {
        let prefix = page.map_or("", |p| p.prefix.as_str());
        let mut pages: Vec<IdPage> = ID_ALPHABET.chars().map(|c| IdPage { prefix: format!("{prefix}{c}"), rest: false }).collect();
        pages.push(IdPage { prefix: prefix.to_string(), rest: true });
        pages
    }
}

/// One containerd-style filter per id, `id==<id>`: BuildKit ORs the entries
/// of the list. Ids are checked first, since a ',' or '|' inside one would
/// change what the filter selects.
pub fn prune_filters(ids: &[String]) -> Result<Vec<String>, ClientError> {
    ids.iter()
        .map(|id| {
            let valid = !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if valid {
                Ok(format!("id=={id}"))
            } else {
                Err(ClientError::InvalidId { id: id.clone() })
            }
        })
        .collect()
}

fn worker_from_pb(w: pb::types::WorkerRecord) -> Worker {
    Worker {
        id: w.id,
        labels: w.labels.into_iter().collect(),
        version: w.buildkit_version.map(version_from_pb),
        devices: w.cdi_devices.into_iter().map(|d| d.name).collect(),
    }
}

fn version_from_pb(v: pb::types::BuildkitVersion) -> EngineVersion {
    EngineVersion { package: v.package, version: v.version, revision: v.revision }
}

/// An engine record as the agent's own type. Sizes and counts below zero
/// (not computed yet) read as zero.
pub fn record_from_pb(r: pb::UsageRecord) -> CacheRecord {
    #[allow(deprecated)] // the fallback for engines that fill only the old field
    let parents = match (r.parents.is_empty(), r.parent.is_empty()) {
        (true, false) => vec![r.parent],
        _ => r.parents,
    };
    CacheRecord {
        id: r.id,
        size_bytes: u64::try_from(r.size).unwrap_or(0),
        parents,
        created_at: r.created_at.and_then(|t| SystemTime::try_from(t).ok()),
        last_used_at: r.last_used_at.and_then(|t| SystemTime::try_from(t).ok()),
        usage_count: u64::try_from(r.usage_count).unwrap_or(0),
        in_use: r.in_use,
        shared: r.shared,
        mutable: r.mutable,
        record_type: r.record_type,
        description: r.description,
    }
}

/// What happened to one build, from the engine's build history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildEvent {
    pub kind: BuildEventKind,
    pub build_ref: String,
    /// When the build started and completed, Unix milliseconds (the engine's clock: this host's).
    pub started_unix_ms: Option<i64>,
    pub completed_unix_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildEventKind {
    Started,
    Completed,
    Deleted,
}

/// The engine's build-history stream ([`EngineClient::listen_build_history`]).
#[derive(Debug)]
pub struct BuildHistory {
    stream: tonic::Streaming<pb::BuildHistoryEvent>,
    socket: PathBuf,
}

impl BuildHistory {
    /// The next event; Ok(None) when the engine ended the stream.
    pub async fn next(&mut self) -> Result<Option<BuildEvent>, ClientError> {
        match self.stream.message().await {
            Ok(Some(event)) => Ok(Some(build_event_from_pb(event))),
            Ok(None) => Ok(None),
            Err(status) => Err(ClientError::Call { call: "ListenBuildHistory", socket: self.socket.clone(), reason: describe_status(&status) }),
        }
    }
}

/// An unknown event type (a newer engine's) reads as Started: the record's
/// times still say whether it completed.
pub fn build_event_from_pb(event: pb::BuildHistoryEvent) -> BuildEvent {
    let kind = match pb::BuildHistoryEventType::try_from(event.r#type) {
        Ok(pb::BuildHistoryEventType::Complete) => BuildEventKind::Completed,
        Ok(pb::BuildHistoryEventType::Deleted) => BuildEventKind::Deleted,
        Ok(pb::BuildHistoryEventType::Started) | Err(_) => BuildEventKind::Started,
    };
    let record = event.record.unwrap_or_default();
    BuildEvent {
        kind,
        build_ref: record.r#ref,
        started_unix_ms: record.created_at.as_ref().map(timestamp_unix_ms),
        completed_unix_ms: record.completed_at.as_ref().map(timestamp_unix_ms),
    }
}

fn timestamp_unix_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos) / 1_000_000)
}

// === impl SocketWatch ===

/// An inotify watch on the socket's directory that reports the creation of
/// an entry with the socket's name.
struct SocketWatch {
    /// Always Some until drop.
    events: Option<inotify::EventStream<[u8; 1024]>>,
    name: OsString,
}

impl Drop for SocketWatch {
    /// Closing an inotify descriptor waits for the kernel to retire its
    /// watches (an RCU grace period: 10 to 20 ms measured here), which would
    /// land on the readiness path; a blocking-pool thread pays it instead.
    fn drop(&mut self) {
        if let (Some(events), Ok(runtime)) = (self.events.take(), tokio::runtime::Handle::try_current()) {
            drop(runtime.spawn_blocking(move || drop(events)));
        }
    }
}

impl SocketWatch {
    /// None when the directory does not exist (yet) or inotify is not
    /// available: the caller then relies on its backoff alone.
    fn new(socket: &Path) -> Option<Self> {
        use inotify::{Inotify, WatchMask};
        let name = socket.file_name()?.to_os_string();
        let dir = match socket.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let inotify = Inotify::init().ok()?;
        inotify.watches().add(dir, WatchMask::CREATE | WatchMask::MOVED_TO | WatchMask::ATTRIB).ok()?;
        let events = inotify.into_event_stream([0u8; 1024]).ok()?;
        Some(Self { events: Some(events), name })
    }

    /// Resolves when an entry with the socket's name appears, or when the
    /// watch fails (the caller just attempts again).
    async fn created(&mut self) {
        use tokio_stream::StreamExt;
        let Some(events) = self.events.as_mut() else { return };
        while let Some(Ok(event)) = events.next().await {
            if event.name.as_deref() == Some(self.name.as_os_str()) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Timestamp;

    fn usage_record() -> pb::UsageRecord {
        pb::UsageRecord { id: "abc".into(), size: 4096, usage_count: 2, record_type: "regular".into(), ..Default::default() }
    }

    #[test]
    fn parents_come_from_parents_and_fall_back_to_the_deprecated_parent() {
        #[allow(deprecated)]
        let old = pb::UsageRecord { parent: "p0".into(), ..usage_record() };
        assert_eq!(record_from_pb(old).parents, vec!["p0".to_string()]);

        #[allow(deprecated)]
        let both = pb::UsageRecord { parent: "p0".into(), parents: vec!["p1".into(), "p2".into()], ..usage_record() };
        assert_eq!(record_from_pb(both).parents, vec!["p1".to_string(), "p2".to_string()]);

        assert!(record_from_pb(usage_record()).parents.is_empty());
    }

    #[test]
    fn records_carry_times_sizes_and_flags() {
        let r = pb::UsageRecord {
            created_at: Some(Timestamp { seconds: 1_700_000_000, nanos: 5 }),
            last_used_at: None,
            in_use: true,
            shared: true,
            mutable: true,
            description: "[2/2] COPY a /a".into(),
            ..usage_record()
        };
        let c = record_from_pb(r);
        assert_eq!(c.id, "abc");
        assert_eq!(c.size_bytes, 4096);
        assert_eq!(c.usage_count, 2);
        assert_eq!(c.created_at, Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5)));
        assert_eq!(c.last_used_at, None);
        assert!(c.in_use && c.shared && c.mutable);
        assert_eq!(c.record_type, "regular");
        assert_eq!(c.description, "[2/2] COPY a /a");
    }

    #[test]
    fn negative_sizes_and_counts_read_as_zero() {
        let c = record_from_pb(pb::UsageRecord { size: -1, usage_count: -3, ..usage_record() });
        assert_eq!((c.size_bytes, c.usage_count), (0, 0));
    }

    #[test]
    fn prune_filters_are_one_id_equality_per_id() {
        let ids = vec!["w5y1x2abc".to_string(), "sha256-ab.c_d".to_string()];
        assert_eq!(prune_filters(&ids).unwrap(), vec!["id==w5y1x2abc", "id==sha256-ab.c_d"]);
        assert!(prune_filters(&[]).unwrap().is_empty());
    }

    #[test]
    fn ids_that_would_change_the_filter_are_refused() {
        for bad in ["", "a,inuse==true", "a|b", "a b", "a==b", "a\"b"] {
            let err = prune_filters(&["ok".to_string(), bad.to_string()]).unwrap_err();
            assert!(matches!(&err, ClientError::InvalidId { id } if id == bad), "{bad:?}: {err}");
        }
    }

    #[test]
    fn versions_print_with_their_revision_when_known() {
        let v = EngineVersion { package: "github.com/moby/buildkit".into(), version: "v0.34.2".into(), revision: String::new() };
        assert_eq!(v.to_string(), "v0.34.2");
        assert_eq!(EngineVersion { revision: "abc123".into(), ..v }.to_string(), "v0.34.2 (abc123)");
    }

    #[tokio::test]
    async fn connecting_to_a_missing_socket_fails_at_once_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("none.sock");
        let err = EngineClient::connect(&socket).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ClientError::Connect { .. }), "{text}");
        assert!(text.contains(&socket.display().to_string()), "{text}");
        assert!(text.contains("No such file or directory"), "{text}");
    }

    #[tokio::test]
    async fn an_empty_prune_sends_nothing() {
        // The engine never answers, so a call would time out: Ok proves none was made.
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let client = silent_engine_client(&socket).await.with_prune_timeout(Duration::from_millis(100));
        assert!(client.prune(&[]).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_silent_engine_costs_a_timeout_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let client = silent_engine_client(&socket).await.with_call_timeout(Duration::from_millis(200));
        let started = Instant::now();
        let err = client.health().await.unwrap_err();
        assert!(matches!(err, ClientError::Timeout { call: "Health.Check", .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

        let err = client.with_prune_timeout(Duration::from_millis(200)).prune(&["abc".into()]).await.unwrap_err();
        assert!(matches!(err, ClientError::Timeout { call: "Prune", .. }), "{err}");
    }

    #[tokio::test]
    async fn wait_ready_gives_up_at_its_deadline_with_the_last_error() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let started = Instant::now();
        let err = wait_ready(&socket, Duration::from_millis(300)).await.unwrap_err();
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2), "{elapsed:?}");
        let ClientError::NotReady { attempts, last, .. } = &err else { panic!("{err}") };
        // 1, 2, 4, ..., 50, 50 ms: a handful of attempts, not a busy loop.
        assert!((5..=30).contains(attempts), "{attempts} attempts");
        assert!(last.contains("No such file or directory"), "{err}");
    }

    #[tokio::test]
    async fn wait_ready_bounds_an_engine_that_accepts_but_never_answers() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let _client = silent_engine_client(&socket).await;
        let started = Instant::now();
        let err = wait_ready(&socket, Duration::from_millis(300)).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert!(matches!(err, ClientError::NotReady { .. }), "{err}");
    }

    /// A listener that accepts connections and never says a word, and a client on it.
    async fn silent_engine_client(socket: &Path) -> EngineClient {
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        tokio::spawn(async move {
            let mut held = vec![];
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        EngineClient::connect(socket).await.unwrap()
    }
}
