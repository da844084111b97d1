//! The control plane, from the agent's side: one TLS connection at a time, the
//! registration (task) stream, the health stream, usage reports and the
//! shutdown report.
//!
//! The agent dials each connection itself, TCP, TLS and HTTP/2 setup all under
//! the connect timeout, and every loop takes the current one. A call that
//! times out, a task stream that falls silent, or a transport failure discards
//! the connection it used, so the next call dials afresh: one stalled or
//! black-holed connection never holds the agent.
//!
//! Every loop here survives the control plane going away: it logs, counts,
//! waits out a jittered backoff and dials again. Nothing here stops or
//! touches the engine; losing the control plane never costs a running build.
//! The bearer token lives in a [`Secret`] and is only ever put into the
//! `authorization` header, marked sensitive.

/// The agent's types as protocol messages.
pub mod convert;
pub mod health;
pub mod health_delta;
pub mod identity;
pub mod register;
pub mod usage;

use crate::backoff::Backoff;
use crate::describe::{describe_status, error_chain};
use crate::observe::metrics::Metrics;
use crate::proto::v1 as pb;
use crate::proto::v1::machine_service_client::MachineServiceClient;
use crate::secret::Secret;
use crate::task::{Task, TaskError};
use hyper_util::client::legacy::connect::HttpConnector;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The User-Agent every call carries.
pub const USER_AGENT: &str = concat!("machine-agent/", env!("CARGO_PKG_VERSION"));

/// HTTP/2 pings find a dead connection (a VM whose NAT dropped the flow, a
/// control plane that vanished without a FIN) within interval + timeout: an
/// unanswered ping closes the connection, every call on it fails with
/// `UNAVAILABLE`, and that failure discards it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// A CA bundle is at most a few hundred KiB (Debian's whole system bundle,
/// ~150 CAs, is 220 KiB); anything past 1 MiB is not a CA bundle.
pub const MAX_CA_BUNDLE_BYTES: u64 = 1 << 20;

/// Why the control plane could not be reached or used.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ControlError {
    /// invalid control plane URL {url}: {reason}
    Url { url: String, reason: String },
    /// cannot read the CA bundle: {0}
    CaBundle(#[source] crate::fsutil::ReadError),
    /// cannot set up TLS for {url}: {reason}
    Tls { url: String, reason: String },
    /// cannot prove this machine's identity: {0}
    Identity(#[from] identity::IdentityError),
    /// cannot connect to the control plane at {url}: {reason}
    Connect { url: String, reason: String },
    /// no connection to the control plane at {url} within {timeout:?} (TCP, TLS and HTTP/2 setup)
    ConnectTimeout { url: String, timeout: Duration },
    /// {call} failed: {reason}
    Call { call: &'static str, code: tonic::Code, reason: String },
    /// {call} got no answer within {timeout:?}
    Timeout { call: &'static str, timeout: Duration },
    /// the task stream was silent for {0:?}: no task and no keepalive
    Silent(Duration),
    /// the control plane broke the protocol: {0}
    Protocol(String),
}

impl ControlError {
    pub fn from_status(call: &'static str, status: &tonic::Status) -> Self {
        Self::Call { call, code: status.code(), reason: describe_status(status) }
    }

    /// Retrying soon will not help: the control plane refused this machine
    /// or does not know the call. Such errors back off to the cap at once.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Call { code, .. } => is_permanent_code(*code),
            Self::Url { .. }
            | Self::CaBundle { .. }
            | Self::Tls { .. }
            | Self::Identity(_)
            | Self::Connect { .. }
            | Self::ConnectTimeout { .. }
            | Self::Timeout { .. }
            | Self::Silent(_)
            | Self::Protocol(_) => false,
        }
    }

    /// The connection the call used may be dead or stuck: the next call dials a new one.
    pub fn discards_connection(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Silent(_) => true,
            Self::Call { code, .. } => is_transport_code(*code),
            // Nothing was connected, or the connection did its job.
            Self::Url { .. }
            | Self::CaBundle { .. }
            | Self::Tls { .. }
            | Self::Identity(_)
            | Self::Connect { .. }
            | Self::ConnectTimeout { .. }
            | Self::Protocol(_) => false,
        }
    }
}

/// The control plane refused this machine (`UNAUTHENTICATED`, `PERMISSION_DENIED`)
/// or does not serve the call (`UNIMPLEMENTED`): no retry soon will change that.
pub fn is_permanent_code(code: tonic::Code) -> bool {
    use tonic::Code as C;
    match code {
        C::Unauthenticated | C::PermissionDenied | C::Unimplemented => true,
        C::Ok
        | C::Cancelled
        | C::Unknown
        | C::InvalidArgument
        | C::DeadlineExceeded
        | C::NotFound
        | C::AlreadyExists
        | C::ResourceExhausted
        | C::FailedPrecondition
        | C::Aborted
        | C::OutOfRange
        | C::Internal
        | C::Unavailable
        | C::DataLoss => false,
    }
}

/// Whether an error or any of its causes is an I/O timeout.
fn is_timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Codes tonic gives a call whose connection failed under it (a reset, a
/// keepalive ping unanswered, a GOAWAY): the connection is not worth reusing.
fn is_transport_code(code: tonic::Code) -> bool {
    use tonic::Code as C;
    match code {
        C::Unavailable | C::Unknown | C::Cancelled | C::DeadlineExceeded => true,
        C::Ok
        | C::InvalidArgument
        | C::NotFound
        | C::AlreadyExists
        | C::PermissionDenied
        | C::ResourceExhausted
        | C::FailedPrecondition
        | C::Aborted
        | C::OutOfRange
        | C::Unimplemented
        | C::Internal
        | C::DataLoss
        | C::Unauthenticated => false,
    }
}

/// What the control plane tells the agent, in the order it said it.
#[derive(Debug)]
pub enum ControlEvent {
    /// A validated task from the task stream.
    Task(Task),
    /// A task that failed validation: logged, counted, not acted on.
    TaskRejected(TaskError),
    /// The control plane answered the health stream with should_terminate.
    ShouldTerminate,
    /// A task stream delivered its first response: the agent is registered.
    Registered,
    /// The task stream failed or could not be opened; why, for /readyz.
    NotRegistered(String),
    /// A request to wipe a cache mount, as it came (the agent checks it and
    /// answers with a CacheResetResult either way).
    CacheReset(crate::proto::v1::CacheReset),
}

/// The identity the control plane gave this machine, and the token for later calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub machine_id: String,
    pub token: Secret,
    /// The health report format asked for on this registration (full reports
    /// until the control plane says otherwise).
    pub reporting: pb::HealthReporting,
}

/// Where the control plane is and how the agent talks to it.
#[derive(Debug, Clone)]
pub struct ControlPlaneSettings {
    /// The control plane's URL; https unless `insecure`.
    pub url: String,
    /// The CA bundle to trust instead of the system roots.
    pub ca_bundle: Option<PathBuf>,
    /// Plaintext http: development only, logged loudly at start.
    pub insecure: bool,
    /// Bounds TCP connect, TLS handshake and HTTP/2 setup together.
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// A task stream silent this long (no task, no keepalive) is dead; the
    /// control plane is asked for a keepalive at a third of it.
    pub task_stream_idle_timeout: Duration,
    /// The reconnect schedule every control-plane loop starts from.
    pub backoff: Backoff,
}

/// One dialled connection and its number: a failure discards the connection
/// only if it is still the current one, never a newer one dialled meanwhile.
#[derive(Debug, Clone)]
pub struct Connection {
    generation: u64,
    channel: Channel,
}

impl Connection {
    /// A client that decodes no message larger than a valid task can be: a
    /// bigger one fails its call (the task stream then starts over) before
    /// anything of it is allocated field by field.
    pub fn client(&self) -> MachineServiceClient<Channel> {
        MachineServiceClient::new(self.channel.clone()).max_decoding_message_size(crate::task::MAX_TASK_MESSAGE_BYTES)
    }
}

/// A handle on the control plane: cheap to clone, shared by every loop.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    endpoint: Endpoint,
    /// The connection every call uses until one of them discards it.
    current: Arc<Mutex<Option<Connection>>>,
    /// One dial at a time: loops that need a connection together share it.
    dialling: Arc<tokio::sync::Mutex<()>>,
    generations: Arc<AtomicU64>,
    pub settings: ControlPlaneSettings,
    pub metrics: Metrics,
}

impl ControlPlane {
    /// Checks the URL and TLS settings. Nothing is dialled until a loop asks
    /// for a connection, so the agent starts and serves its endpoints while
    /// the control plane is unreachable.
    pub fn new(settings: ControlPlaneSettings, metrics: Metrics) -> Result<Self, ControlError> {
        let url = settings.url.clone();
        let bad_url = |reason: String| ControlError::Url { url: url.clone(), reason };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| bad_url(e.to_string()))?
            .user_agent(USER_AGENT)
            .map_err(|e| bad_url(e.to_string()))?
            .connect_timeout(settings.connect_timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            tls = match &settings.ca_bundle {
                Some(path) => {
                    let pem = crate::fsutil::read_regular_file(path, MAX_CA_BUNDLE_BYTES).map_err(ControlError::CaBundle)?;
                    tls.ca_certificate(Certificate::from_pem(pem))
                }
                None => tls.with_native_roots(),
            };
            endpoint = endpoint.tls_config(tls).map_err(|e| ControlError::Tls { url: url.clone(), reason: error_chain(&e) })?;
        } else {
            // Config validation allows http only with `insecure = true`.
            tracing::warn!(url = %url, "control plane connection is PLAINTEXT (control_plane.insecure = true): development only");
        }
        Ok(Self { endpoint, current: Arc::default(), dialling: Arc::default(), generations: Arc::default(), settings, metrics })
    }

    /// The current connection, dialled now if there is none.
    pub async fn connection(&self) -> Result<Connection, ControlError> {
        if let Some(conn) = self.current_connection() {
            return Ok(conn);
        }
        let _one_dial = self.dialling.lock().await;
        if let Some(conn) = self.current_connection() {
            return Ok(conn); // another loop dialled while this one waited
        }
        let channel = self.dial().await?;
        let conn = Connection { generation: self.generations.fetch_add(1, Ordering::Relaxed), channel };
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets `conn` if it is still the current one: the next call dials afresh.
    /// Calls still running on it keep it until they end.
    pub fn discard(&self, conn: &Connection, why: &ControlError) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|c| c.generation == conn.generation) {
            tracing::info!(connection = conn.generation, reason = %why, "dropping the control-plane connection; the next call dials a new one");
            *current = None;
        }
    }

    fn current_connection(&self) -> Option<Connection> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// One connection, TCP + TLS + HTTP/2 setup under the connect timeout.
    /// tonic's own `connect_timeout` covers only the TCP connect of its default
    /// connector, so a peer that accepts and never answers the ClientHello held
    /// a lazily connected channel (and every call on it) for ever. Given a
    /// connector, tonic bounds TCP and TLS by the connect timeout, which also
    /// bounds the redial it makes by itself after a connection breaks; the
    /// outer timeout adds the HTTP/2 handshake.
    async fn dial(&self) -> Result<Channel, ControlError> {
        let url = &self.settings.url;
        let timeout = self.settings.connect_timeout;
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false); // the scheme is https; TLS is layered on by tonic
        tcp.set_nodelay(true);
        tracing::debug!(url = %url, "dialling the control plane");
        match tokio::time::timeout(timeout, self.endpoint.connect_with_connector(tcp)).await {
            Ok(Ok(channel)) => Ok(channel),
            // tonic's own bound (the same timeout) usually fires first, as a TimedOut I/O error.
            Ok(Err(e)) if is_timed_out(&e) => Err(ControlError::ConnectTimeout { url: url.clone(), timeout }),
            Ok(Err(e)) => Err(ControlError::Connect { url: url.clone(), reason: error_chain(&e) }),
            Err(_) => Err(ControlError::ConnectTimeout { url: url.clone(), timeout }),
        }
    }

    /// Runs one call on the current connection under `timeout`; see [`Self::call_on`].
    pub async fn call<T, F, Fut>(&self, call: &'static str, timeout: Duration, f: F) -> Result<T, ControlError>
    where
        F: FnOnce(MachineServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match self.connection().await {
            Ok(conn) => self.call_on(&conn, call, timeout, f).await,
            Err(error) => {
                self.metrics.control_plane_errors.with_label_values(&[call]).inc();
                Err(error)
            }
        }
    }

    /// Runs one call on `conn` under `timeout`. A failure is counted, and
    /// discards the connection when it points at the connection (a timeout, a
    /// transport failure) rather than at the request.
    pub async fn call_on<T, F, Fut>(&self, conn: &Connection, call: &'static str, timeout: Duration, f: F) -> Result<T, ControlError>
    where
        F: FnOnce(MachineServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let result = match tokio::time::timeout(timeout, f(conn.client())).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(ControlError::from_status(call, &status)),
            Err(_) => Err(ControlError::Timeout { call, timeout }),
        };
        if let Err(error) = &result {
            self.metrics.control_plane_errors.with_label_values(&[call]).inc();
            if error.discards_connection() {
                self.discard(conn, error);
            }
        }
        result
    }

    /// A request carrying the session's bearer token.
    fn authorized<T>(&self, message: T, session: &Session) -> Result<tonic::Request<T>, ControlError> {
        let mut req = tonic::Request::new(message);
        let mut value = MetadataValue::try_from(format!("Bearer {}", session.token.expose()))
            .map_err(|_| ControlError::Protocol("the session token is not a valid header value".into()))?;
        value.set_sensitive(true);
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }

    /// Sends one usage report; bounded by the request timeout.
    pub async fn report_usage(&self, report: pb::UsageReport, session: &Session) -> Result<(), ControlError> {
        let req = self.authorized(report, session)?;
        self.call("ReportUsage", self.settings.request_timeout, |mut client| async move { client.report_usage(req).await }).await.map(drop)
    }

    /// Sends the shutdown report; bounded by `timeout` (what is left of the drain).
    pub async fn report_shutdown(&self, report: pb::ShutdownReport, session: &Session, timeout: Duration) -> Result<(), ControlError> {
        let req = self.authorized(report, session)?;
        self.call("ReportShutdown", timeout, |mut client| async move { client.report_shutdown(req).await }).await.map(drop)
    }
}

/// This build's architecture, as the protocol names it.
pub fn architecture() -> pb::Architecture {
    match std::env::consts::ARCH {
        "x86_64" => pb::Architecture::Amd64,
        "aarch64" => pb::Architecture::Arm64,
        _ => pb::Architecture::Unspecified,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_and_missing_methods_are_permanent_and_outages_are_not() {
        for code in [tonic::Code::Unauthenticated, tonic::Code::PermissionDenied, tonic::Code::Unimplemented] {
            assert!(is_permanent_code(code), "{code:?}");
        }
        for code in [tonic::Code::Unavailable, tonic::Code::Unknown, tonic::Code::ResourceExhausted, tonic::Code::Internal, tonic::Code::DeadlineExceeded] {
            assert!(!is_permanent_code(code), "{code:?}");
        }
        let refused = ControlError::Call { call: "RegisterMachine", code: tonic::Code::Unauthenticated, reason: "bad token".into() };
        assert!(refused.is_permanent());
        assert!(!ControlError::ConnectTimeout { url: "https://cp".into(), timeout: Duration::from_secs(5) }.is_permanent());
    }

    #[test]
    fn timeouts_silence_and_transport_failures_discard_the_connection() {
        assert!(ControlError::Timeout { call: "ReportUsage", timeout: Duration::from_secs(15) }.discards_connection());
        assert!(ControlError::Silent(Duration::from_secs(60)).discards_connection());
        let reset = ControlError::Call { call: "ReportHealth", code: tonic::Code::Unavailable, reason: "connection reset".into() };
        assert!(reset.discards_connection());
        // The server answered: the connection works, the request did not.
        let refused = ControlError::Call { call: "RegisterMachine", code: tonic::Code::Unauthenticated, reason: "bad token".into() };
        assert!(!refused.discards_connection());
        assert!(!ControlError::Protocol("no machine_id".into()).discards_connection());
    }
}
