//! The machine's proof of identity, fetched fresh for every registration:
//! - AWS: the IMDSv2 instance identity document and its PKCS#7 signature;
//! - Fly: an OIDC token from the machine API's unix socket;
//! - static: a bootstrap token read from a 0600 file.
//!
//! Every fetch has a timeout. Tokens are wrapped in [`Secret`] the moment they
//! are read, so they cannot reach a log line.

use crate::proto::v1 as pb;
use crate::secret::Secret;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// IMDS answers in milliseconds on a healthy instance; a few seconds means it is not there.
const IMDS_TIMEOUT: Duration = Duration::from_secs(5);
/// Six hours: IMDS's maximum is 21600 s; we fetch a new one per registration anyway.
const IMDS_TOKEN_TTL_SECS: &str = "21600";
/// The Fly API socket is local; anything slower is a hung machine API.
const FLY_TIMEOUT: Duration = Duration::from_secs(5);
/// An identity document or token is a few KiB; cap what we read from a confused peer.
const MAX_PROOF_BYTES: usize = 64 * 1024;
/// The token file holds one token: the proof's cap, read as it is on disk.
pub const MAX_TOKEN_FILE_BYTES: u64 = MAX_PROOF_BYTES as u64;

/// Why no proof of identity could be had.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum IdentityError {
    /// no identity configured: set identity.mode to register with a control plane
    NotConfigured,
    /// IMDSv2 request {url} failed: {source}
    Imds {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// IMDSv2 request {url} returned HTTP {status}
    ImdsStatus { url: String, status: u16 },
    /// Fly OIDC token request over {socket} failed: {reason}
    Fly { socket: PathBuf, reason: String },
    /// cannot read the bootstrap token file: {0}
    TokenFile(#[source] crate::fsutil::ReadError),
    /// the bootstrap token file {path} is empty
    EmptyToken { path: PathBuf },
    /// identity proof {what} is larger than 64 KiB
    TooLarge { what: &'static str },
}

/// How the machine proves who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Not configured: only valid for standalone runs.
    None,
    /// EC2 instance identity from IMDSv2 at this base URL.
    Aws { imds_url: String },
    /// Fly OIDC token from the machine API socket, for this audience.
    Fly { api_socket: PathBuf, audience: String },
    /// A bootstrap token read from this file (0600) at every registration.
    StaticToken { token_file: PathBuf },
}

/// Fetches identity proofs for the configured mode.
#[derive(Debug, Clone)]
pub struct IdentityProvider {
    identity: Identity,
    http: reqwest::Client,
}

impl IdentityProvider {
    pub fn new(identity: Identity) -> Self {
        // No proxy: IMDS is link-local and must never be fetched through one.
        let http = reqwest::Client::builder().no_proxy().timeout(IMDS_TIMEOUT).build().unwrap_or_default();
        Self { identity, http }
    }

    /// A fresh proof for a RegisterRequest.
    pub async fn prove(&self) -> Result<pb::register_request::Identity, IdentityError> {
        use pb::register_request::Identity as Proof;
        match &self.identity {
            Identity::None => Err(IdentityError::NotConfigured),
            Identity::Aws { imds_url } => {
                let (document, signature) = self.aws_identity(imds_url).await?;
                Ok(Proof::Aws(pb::AwsIdentity { document, signature }))
            }
            Identity::Fly { api_socket, audience } => {
                let token = fly_oidc_token(api_socket, audience).await?;
                Ok(Proof::Fly(pb::FlyIdentity { oidc_token: token.expose().to_string() }))
            }
            Identity::StaticToken { token_file } => {
                let token = read_token_file(token_file)?;
                Ok(Proof::StaticToken(pb::StaticTokenIdentity { token: token.expose().to_string() }))
            }
        }
    }

    /// IMDSv2: PUT a session token, then GET the document and signature with it.
    async fn aws_identity(&self, base: &str) -> Result<(String, String), IdentityError> {
        let token_url = format!("{base}/latest/api/token");
        let resp = self
            .http
            .put(&token_url)
            .header("X-aws-ec2-metadata-token-ttl-seconds", IMDS_TOKEN_TTL_SECS)
            .send()
            .await
            .map_err(|source| IdentityError::Imds { url: token_url.clone(), source })?;
        let session = Secret::new(checked_text(resp, &token_url, "IMDS token").await?);
        let document = self.imds_get(base, "/latest/dynamic/instance-identity/document", &session).await?;
        let signature = self.imds_get(base, "/latest/dynamic/instance-identity/pkcs7", &session).await?;
        Ok((document, signature))
    }

    async fn imds_get(&self, base: &str, path: &str, session: &Secret) -> Result<String, IdentityError> {
        let url = format!("{base}{path}");
        let resp = self
            .http
            .get(&url)
            .header("X-aws-ec2-metadata-token", session.expose())
            .send()
            .await
            .map_err(|source| IdentityError::Imds { url: url.clone(), source })?;
        checked_text(resp, &url, "IMDS document").await
    }
}

async fn checked_text(resp: reqwest::Response, url: &str, what: &'static str) -> Result<String, IdentityError> {
    let status = resp.status();
    if !status.is_success() {
        return Err(IdentityError::ImdsStatus { url: url.into(), status: status.as_u16() });
    }
    if resp.content_length().is_some_and(|n| n > MAX_PROOF_BYTES as u64) {
        return Err(IdentityError::TooLarge { what });
    }
    let body = resp.text().await.map_err(|source| IdentityError::Imds { url: url.into(), source })?;
    if body.len() > MAX_PROOF_BYTES {
        return Err(IdentityError::TooLarge { what });
    }
    Ok(body)
}

/// Reads and trims the bootstrap token.
pub fn read_token_file(path: &Path) -> Result<Secret, IdentityError> {
    let text = crate::fsutil::read_regular_text(path, MAX_TOKEN_FILE_BYTES).map_err(IdentityError::TokenFile)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(IdentityError::EmptyToken { path: path.into() });
    }
    if token.len() > MAX_PROOF_BYTES {
        return Err(IdentityError::TooLarge { what: "bootstrap token" });
    }
    Ok(Secret::new(token))
}

/// POST /v1/tokens/oidc {"aud": ...} on the Fly machine API socket; the body is the JWT.
async fn fly_oidc_token(socket: &Path, audience: &str) -> Result<Secret, IdentityError> {
    let fail = |reason: String| IdentityError::Fly { socket: socket.into(), reason };
    let fetch = async {
        let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| fail(format!("connect: {e}")))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| fail(format!("handshake: {e}")))?;
        tokio::spawn(conn);
        let body = serde_json::json!({ "aud": audience }).to_string();
        let req = hyper::Request::post("http://localhost/v1/tokens/oidc")
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| fail(format!("request: {e}")))?;
        let resp = sender.send_request(req).await.map_err(|e| fail(format!("request: {e}")))?;
        let status = resp.status();
        let bytes =
            http_body_util::Limited::new(resp.into_body(), MAX_PROOF_BYTES).collect().await.map_err(|e| fail(format!("reading the token: {e}")))?.to_bytes();
        if !status.is_success() {
            return Err(fail(format!("HTTP {}", status.as_u16())));
        }
        let token = String::from_utf8(bytes.to_vec()).map_err(|_| fail("the token is not UTF-8".into()))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(fail("empty token".into()));
        }
        Ok(Secret::new(token))
    };
    tokio::time::timeout(FLY_TIMEOUT, fetch).await.map_err(|_| fail(format!("no answer within {FLY_TIMEOUT:?}")))?
}
