//! The control plane, from the agent's side: one TLS channel, the registration
//! (task) stream, the health stream, usage reports and the shutdown report.
//!
//! Every loop here survives the control plane going away: it logs, counts,
//! waits out a jittered backoff and dials again. Nothing here stops or
//! touches the engine; losing the control plane never costs a running build.
//! The bearer token lives in a [`Secret`] and is only ever put into the
//! `authorization` header, marked sensitive.

/// The agent's types as protocol messages.
pub mod convert;
pub mod health;
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
use std::path::PathBuf;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The User-Agent every call carries.
pub const USER_AGENT: &str = concat!("machine-agent/", env!("CARGO_PKG_VERSION"));

/// HTTP/2 pings find a dead connection (a VM whose NAT dropped the flow, a
/// control plane that vanished without a FIN) within interval + timeout.
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
    /// {call} failed: {reason}
    Call { call: &'static str, reason: String },
    /// {call} got no answer within {timeout:?}
    Timeout { call: &'static str, timeout: Duration },
    /// the control plane broke the protocol: {0}
    Protocol(String),
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
}

/// The identity the control plane gave this machine, and the token for later calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub machine_id: String,
    pub token: Secret,
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
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// The reconnect schedule every control-plane loop starts from.
    pub backoff: Backoff,
}

/// A handle on the control plane: cheap to clone, shared by every loop.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    client: MachineServiceClient<Channel>,
    pub settings: ControlPlaneSettings,
    pub metrics: Metrics,
}

impl ControlPlane {
    /// Builds the channel. It connects lazily, and reconnects by itself, on each call.
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
        let client = MachineServiceClient::new(endpoint.connect_lazy());
        Ok(Self { client, settings, metrics })
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
        self.unary("ReportUsage", self.settings.request_timeout, self.client.clone().report_usage(req)).await.map(drop)
    }

    /// Sends the shutdown report; bounded by `timeout` (what is left of the drain).
    pub async fn report_shutdown(&self, report: pb::ShutdownReport, session: &Session, timeout: Duration) -> Result<(), ControlError> {
        let req = self.authorized(report, session)?;
        self.unary("ReportShutdown", timeout, self.client.clone().report_shutdown(req)).await.map(drop)
    }

    async fn unary<T>(
        &self,
        call: &'static str,
        timeout: Duration,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ControlError> {
        let result = match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(ControlError::Call { call, reason: describe_status(&status) }),
            Err(_) => Err(ControlError::Timeout { call, timeout }),
        };
        if result.is_err() {
            self.metrics.control_plane_errors.with_label_values(&[call]).inc();
        }
        result
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
