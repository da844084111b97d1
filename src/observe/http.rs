//! The endpoints: /healthz (the agent's loops are alive), /readyz (200 only in
//! Ready) and /metrics (Prometheus text), on two listeners. The public one
//! (`endpoints.listen`) answers /readyz with the state only; the detail one
//! (`endpoints.detail_listen`, loopback by default) answers it with
//! everything the agent knows: task id, pids, paths, OOM victims, error
//! texts. Both run as their own tasks and read only shared snapshots, so
//! engine restarts, GC or reconnects can never block them; `connections`
//! keeps hostile clients from holding them.

use super::connections::{serve, ConnectionLimits};
use super::liveness::Liveness;
use super::metrics::Metrics;
use super::status::Status;
use crate::lifecycle::State;
use axum::extract::State as AxState;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Where the endpoints listen and how each listener limits its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointSettings {
    /// /healthz, /metrics and the public /readyz.
    pub listen: SocketAddr,
    /// The same, with the detailed /readyz.
    pub detail_listen: SocketAddr,
    /// Per listener.
    pub limits: ConnectionLimits,
}

/// The addresses the endpoints were bound to (port 0 resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundEndpoints {
    pub public: SocketAddr,
    pub detail: SocketAddr,
}

#[derive(Clone, Debug)]
struct Shared {
    status: watch::Receiver<Status>,
    metrics: Metrics,
    liveness: Liveness,
}

/// Why the endpoints could not be served.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum HttpError {
    /// cannot listen on {addr}: {source}
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds both listeners (so a bad or taken address fails the start) and
/// returns the bound addresses and the future that serves them.
pub async fn bind(
    settings: &EndpointSettings,
    status: watch::Receiver<Status>,
    metrics: Metrics,
    liveness: Liveness,
) -> Result<(BoundEndpoints, impl std::future::Future<Output = ()>), HttpError> {
    let (public_listener, public) = listen(settings.listen).await?;
    let (detail_listener, detail) = listen(settings.detail_listen).await?;
    if !detail.ip().is_loopback() {
        tracing::warn!(detail = %detail, "the detail view listens on a non-loopback address: whoever reaches it sees task ids, pids, paths and error texts");
    }
    let shared = Shared { status, metrics: metrics.clone(), liveness };
    let public_app =
        Router::new().route("/healthz", get(healthz)).route("/readyz", get(public_readyz)).route("/metrics", get(metrics_text)).with_state(shared.clone());
    let detail_app = Router::new().route("/healthz", get(healthz)).route("/readyz", get(detail_readyz)).route("/metrics", get(metrics_text)).with_state(shared);
    let limits = settings.limits;
    let serve_both = async move {
        tokio::join!(serve(public_listener, public_app, limits, metrics.clone(), "public"), serve(detail_listener, detail_app, limits, metrics, "detail"));
    };
    Ok((BoundEndpoints { public, detail }, serve_both))
}

async fn listen(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), HttpError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| HttpError::Bind { addr, source })?;
    Ok((listener, local))
}

async fn healthz(AxState(s): AxState<Shared>) -> impl IntoResponse {
    let stalled = s.liveness.stalled();
    if stalled.is_empty() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("stalled loops: {}\n", stalled.join(", ")))
    }
}

/// The public /readyz: what a load balancer or the fleet needs to route
/// builds, and nothing that names the task, a process, a path or an error
/// (the state, the engine's and the control plane's are public metrics too).
#[derive(serde::Serialize)]
struct PublicReadiness {
    ready: bool,
    state: &'static str,
    engine: &'static str,
    control_plane_connected: bool,
    state_age_secs: u64,
}

async fn public_readyz(AxState(s): AxState<Shared>) -> impl IntoResponse {
    let body = {
        let st = s.status.borrow();
        PublicReadiness {
            ready: st.state == State::Ready,
            state: st.state.as_str(),
            engine: st.engine.as_str(),
            control_plane_connected: s.metrics.control_plane_connected.get() == 1,
            state_age_secs: st.since.elapsed().as_secs(),
        }
    };
    (readiness_code(body.ready), Json(body))
}

fn readiness_code(ready: bool) -> StatusCode {
    if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Finished build steps the detail /readyz shows: enough to see the last
/// build's steps, small enough to read.
pub const RECENT_STEPS_ON_READYZ: usize = 10;

/// The detail /readyz, on the detail listener only.
#[derive(serde::Serialize)]
struct Readiness {
    ready: bool,
    state: &'static str,
    reason: String,
    engine: &'static str,
    engine_pid: Option<u32>,
    /// The engine was started by an agent before this one, and adopted.
    engine_adopted: bool,
    engine_restarts: u64,
    engine_last_exit: Option<String>,
    /// The CDI devices the engine's worker lists (`RUN --device=<name>`).
    devices: Vec<String>,
    last_gc: Option<String>,
    /// The newest OOM kill on this host, whole (attribution, pid, memory...).
    last_oom: Option<crate::observe::oom_watch::OomKill>,
    oom_kills_total: u64,
    /// The newest finished build steps (at most RECENT_STEPS_ON_READYZ), oldest first.
    recent_steps: Vec<crate::observe::steps::StepRecord>,
    /// Build steps recorded since the agent started.
    step_records_total: u64,
    /// Every watched filesystem: the state dir and the task's mounts.
    volumes: Vec<VolumeReadiness>,
    /// The newest sample of the host and the engine's process tree.
    resources: Option<crate::observe::sampler::Sample>,
    task_id: Option<String>,
    /// The last task re-sent under the running task's id with other content.
    task_conflict: Option<crate::observe::status::TaskConflict>,
    /// The RBD images the cache lives on: image, mapper, lock owner.
    shared_volumes: Vec<crate::observe::status::SharedVolume>,
    /// The last cache reset asked for: its outcome, and the new filesystem's UUID.
    cache_reset: Option<CacheResetReadiness>,
    tasks_rejected_total: u64,
    control_plane_connected: bool,
    /// Why the agent is not registered; null while it is (and in standalone mode).
    control_plane_error: Option<String>,
    state_age_secs: u64,
}

#[derive(serde::Serialize)]
struct VolumeReadiness {
    path: String,
    total_bytes: u64,
    free_bytes: u64,
    total_inodes: u64,
    free_inodes: u64,
    /// For a task's cache mount: `primary`, `clone` or `isolated`.
    cache_mode: Option<&'static str>,
    /// For a task's cache mount: `device`, `file` or `rbd`.
    kind: Option<&'static str>,
    /// For a task's cache mount: what a cache reset must name.
    filesystem_uuid: Option<String>,
}

#[derive(serde::Serialize)]
struct CacheResetReadiness {
    request_id: String,
    mount_path: String,
    outcome: String,
    error: String,
    filesystem_uuid: String,
    unix_time_ms: i64,
}

async fn detail_readyz(AxState(s): AxState<Shared>) -> impl IntoResponse {
    let st = s.status.borrow().clone();
    let ready = st.state == State::Ready;
    let body = Readiness {
        ready,
        state: st.state.as_str(),
        reason: st.reason,
        engine: st.engine.as_str(),
        engine_pid: st.engine_pid,
        engine_adopted: st.engine_adopted,
        engine_restarts: st.engine_restarts,
        engine_last_exit: st.engine_last_exit,
        devices: st.engine_devices,
        last_gc: st.recent_gc.back().map(|r| r.summary.clone()),
        last_oom: st.recent_ooms.back().cloned(),
        oom_kills_total: st.oom_kills_total,
        recent_steps: st.recent_steps.iter().skip(st.recent_steps.len().saturating_sub(RECENT_STEPS_ON_READYZ)).cloned().collect(),
        step_records_total: st.step_entries,
        volumes: st
            .mounts
            .iter()
            .map(|m| {
                let cache = st.cache_volumes.iter().find(|v| v.mount_path == m.path);
                VolumeReadiness {
                    path: m.path.display().to_string(),
                    total_bytes: m.stats.total_bytes,
                    free_bytes: m.stats.free_bytes,
                    total_inodes: m.stats.total_inodes,
                    free_inodes: m.stats.free_inodes,
                    cache_mode: cache.map(|v| v.mode),
                    kind: cache.map(|v| v.kind),
                    filesystem_uuid: cache.and_then(|v| v.filesystem_uuid.clone()),
                }
            })
            .collect(),
        resources: st.resources,
        task_id: st.task_id,
        task_conflict: st.task_conflict,
        shared_volumes: st.shared_volumes,
        cache_reset: st.cache_reset.map(|r| CacheResetReadiness {
            request_id: r.request_id,
            mount_path: r.mount_path,
            outcome: r.outcome,
            error: r.error,
            filesystem_uuid: r.filesystem_uuid,
            unix_time_ms: r.unix_time_ms,
        }),
        tasks_rejected_total: st.tasks_rejected,
        control_plane_connected: s.metrics.control_plane_connected.get() == 1,
        control_plane_error: st.control_plane_error,
        state_age_secs: st.since.elapsed().as_secs(),
    };
    (readiness_code(ready), Json(body))
}

async fn metrics_text(AxState(s): AxState<Shared>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render())
}
