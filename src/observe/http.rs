//! The endpoints listener: /healthz (the agent's loops are alive), /readyz
//! (200 only in Ready, JSON detail always), /metrics (Prometheus text).
//! It runs as its own task and reads only shared snapshots, so engine
//! restarts, GC or reconnects can never block it.

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

/// Binds the listener (so a bad address fails the start) and returns the
/// bound address and the serving future.
pub async fn bind(
    addr: SocketAddr,
    status: watch::Receiver<Status>,
    metrics: Metrics,
    liveness: Liveness,
) -> Result<(SocketAddr, impl std::future::Future<Output = ()>), HttpError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| HttpError::Bind { addr, source })?;
    let app = Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).route("/metrics", get(metrics_text)).with_state(Shared {
        status,
        metrics,
        liveness,
    });
    let serve = async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "endpoints server stopped");
        }
    };
    Ok((local, serve))
}

async fn healthz(AxState(s): AxState<Shared>) -> impl IntoResponse {
    let stalled = s.liveness.stalled();
    if stalled.is_empty() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("stalled loops: {}\n", stalled.join(", ")))
    }
}

#[derive(serde::Serialize)]
struct Readiness {
    ready: bool,
    state: &'static str,
    reason: String,
    engine: &'static str,
    engine_pid: Option<u32>,
    engine_restarts: u64,
    engine_last_exit: Option<String>,
    last_gc: Option<String>,
    /// The newest OOM kill on this host, whole (attribution, pid, memory...).
    last_oom: Option<crate::observe::oom_watch::OomKill>,
    oom_kills_total: u64,
    /// Every watched filesystem: the state dir and the task's mounts.
    volumes: Vec<VolumeReadiness>,
    /// The newest sample of the host and the engine's process tree.
    resources: Option<crate::observe::sampler::Sample>,
    task_id: Option<String>,
    /// The last task re-sent under the running task's id with other content.
    task_conflict: Option<crate::observe::status::TaskConflict>,
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
}

async fn readyz(AxState(s): AxState<Shared>) -> impl IntoResponse {
    let st = s.status.borrow().clone();
    let ready = st.state == State::Ready;
    let body = Readiness {
        ready,
        state: st.state.as_str(),
        reason: st.reason,
        engine: st.engine.as_str(),
        engine_pid: st.engine_pid,
        engine_restarts: st.engine_restarts,
        engine_last_exit: st.engine_last_exit,
        last_gc: st.recent_gc.back().map(|r| r.summary.clone()),
        last_oom: st.recent_ooms.back().cloned(),
        oom_kills_total: st.oom_kills_total,
        volumes: st
            .mounts
            .iter()
            .map(|m| VolumeReadiness {
                path: m.path.display().to_string(),
                total_bytes: m.stats.total_bytes,
                free_bytes: m.stats.free_bytes,
                total_inodes: m.stats.total_inodes,
                free_inodes: m.stats.free_inodes,
            })
            .collect(),
        resources: st.resources,
        task_id: st.task_id,
        task_conflict: st.task_conflict,
        tasks_rejected_total: st.tasks_rejected,
        control_plane_connected: s.metrics.control_plane_connected.get() == 1,
        control_plane_error: st.control_plane_error,
        state_age_secs: st.since.elapsed().as_secs(),
    };
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body))
}

async fn metrics_text(AxState(s): AxState<Shared>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render())
}
