//! Doubles of the clouds' metadata services, speaking their real wire formats:
//! - AWS IMDSv2: PUT /latest/api/token with X-aws-ec2-metadata-token-ttl-seconds
//!   returns a session token; GETs need X-aws-ec2-metadata-token, else 401.
//! - Fly machine API: POST /v1/tokens/oidc {"aud": ...} on a unix socket returns a JWT as text.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub const IMDS_DOCUMENT: &str = r#"{"accountId":"123456789012","instanceId":"i-0abc123def4567890","region":"us-east-1","architecture":"x86_64"}"#;
pub const IMDS_PKCS7: &str = "MIAGCSqGSIb3DQEHAqCAMIACAQExDzANBglghkgBZQMEAgEFADCABgkqhkiG9w0BBwGggCSABIIB";
const IMDS_SESSION: &str = "imds-session-token-AQAEAF";

#[derive(Default, Debug, Clone)]
pub struct ImdsLog {
    /// Every request, as "METHOD path status".
    pub requests: Vec<String>,
}

pub struct ImdsDouble {
    pub url: String,
    pub log: Arc<Mutex<ImdsLog>>,
}

async fn token(State(log): State<Arc<Mutex<ImdsLog>>>, headers: HeaderMap) -> (StatusCode, String) {
    let ttl_ok =
        headers.get("x-aws-ec2-metadata-token-ttl-seconds").and_then(|v| v.to_str().ok()?.parse::<u32>().ok()).is_some_and(|ttl| (1..=21600).contains(&ttl));
    let status = if ttl_ok { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    log.lock().unwrap().requests.push(format!("PUT /latest/api/token {}", status.as_u16()));
    (status, if ttl_ok { IMDS_SESSION.into() } else { String::new() })
}

fn authorized(log: &Mutex<ImdsLog>, headers: &HeaderMap, path: &str, body: &str) -> (StatusCode, String) {
    let ok = headers.get("x-aws-ec2-metadata-token").and_then(|v| v.to_str().ok()) == Some(IMDS_SESSION);
    let status = if ok { StatusCode::OK } else { StatusCode::UNAUTHORIZED };
    log.lock().unwrap().requests.push(format!("GET {path} {}", status.as_u16()));
    (status, if ok { body.into() } else { String::new() })
}

pub async fn imds() -> ImdsDouble {
    let log = Arc::new(Mutex::new(ImdsLog::default()));
    let app =
        Router::new()
            .route("/latest/api/token", put(token))
            .route(
                "/latest/dynamic/instance-identity/document",
                get(|State(log): State<Arc<Mutex<ImdsLog>>>, h: HeaderMap| async move {
                    authorized(&log, &h, "/latest/dynamic/instance-identity/document", IMDS_DOCUMENT)
                }),
            )
            .route(
                "/latest/dynamic/instance-identity/pkcs7",
                get(|State(log): State<Arc<Mutex<ImdsLog>>>, h: HeaderMap| async move {
                    authorized(&log, &h, "/latest/dynamic/instance-identity/pkcs7", IMDS_PKCS7)
                }),
            )
            .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    ImdsDouble { url: format!("http://{addr}"), log }
}

pub struct FlyDouble {
    pub socket: PathBuf,
    pub audiences: Arc<Mutex<Vec<String>>>,
}

pub fn fly_token_for(audience: &str) -> String {
    format!("eyJhbGciOiJSUzI1NiJ9.fly-oidc-for-{audience}.c2lnbmF0dXJl")
}

pub async fn fly_api(dir: &Path) -> FlyDouble {
    let socket = dir.join("fly-api.sock");
    let audiences = Arc::new(Mutex::new(vec![]));
    let app = Router::new()
        .route(
            "/v1/tokens/oidc",
            post(|State(auds): State<Arc<Mutex<Vec<String>>>>, Json(body): Json<serde_json::Value>| async move {
                let aud = body["aud"].as_str().unwrap_or_default().to_string();
                auds.lock().unwrap().push(aud.clone());
                fly_token_for(&aud)
            }),
        )
        .with_state(audiences.clone());
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    FlyDouble { socket, audiences }
}
