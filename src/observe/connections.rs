//! The endpoints' accept loop, hardened against clients that hold connections:
//! a header read timeout on every connection and a cap on open connections
//! that closes the oldest to make room. It owns sockets and connection tasks;
//! what is served on them is `http`'s business.
//!
//! Why these two, and not a request concurrency limit: a slowloris never
//! finishes a request, so a per-request limit never sees it. Each connection
//! costs a task, buffers and an fd until the server closes it. The header
//! timeout bounds how long any connection can sit without a whole request
//! head (hyper also applies it between keep-alive requests, so an idle
//! keep-alive connection closes after it too); the cap bounds how many sit at
//! once. Refusing new connections at the cap would hand the endpoints to
//! whoever opened connections first, so the cap sheds the oldest instead: a
//! scrape is the newest connection, sends its request at once, and is done
//! long before it becomes the oldest.

use super::metrics::Metrics;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

/// A request head of the endpoints is one short GET line and a few headers;
/// 16 KiB (hyper's floor is 8 KiB) bounds what a hostile client makes the
/// agent buffer per connection.
const MAX_REQUEST_HEAD_BYTES: usize = 16 << 10;
/// An accept error is nearly always EMFILE/ENFILE or ENOBUFS: pause rather
/// than spin on it, and let connections close meanwhile.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How many connections a listener keeps and how long each may take to send a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// The open connections of one listener, oldest first (ids grow with each accept).
type OpenConnections = Arc<Mutex<BTreeMap<u64, AbortHandle>>>;

/// Serves `router` on `listener` under `limits` until the process ends.
/// `listener_name` labels the connections-closed metric (`public`, `detail`).
pub(super) async fn serve(listener: TcpListener, router: Router, limits: ConnectionLimits, metrics: Metrics, listener_name: &'static str) {
    let shed = metrics.endpoint_connections_closed.with_label_values(&[listener_name, "shed"]);
    let header_timeouts = metrics.endpoint_connections_closed.with_label_values(&[listener_name, "header_timeout"]);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).max_buf_size(MAX_REQUEST_HEAD_BYTES);
    let open: OpenConnections = Arc::default();
    let mut next_id: u64 = 0;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                tracing::warn!(%error, "cannot accept an endpoints connection; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let id = next_id;
        next_id += 1;
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
        let header_timeouts = header_timeouts.clone();
        let registration = Registration { id, open: open.clone() };
        // Held across the spawn so the task's own removal (on a fast finish)
        // cannot run before its entry is inserted.
        let mut table = open.lock().unwrap_or_else(PoisonError::into_inner);
        while table.len() >= limits.max_connections {
            let Some((_, oldest)) = table.pop_first() else { break };
            // Dropping the connection's future closes its socket.
            oldest.abort();
            shed.inc();
        }
        let task = tokio::spawn(async move {
            let _registration = registration;
            if let Err(error) = connection.await {
                // Per connection and at a client's pace: debug only, the metric counts them.
                if error.is_timeout() {
                    header_timeouts.inc();
                }
                tracing::debug!(%error, "endpoints connection ended");
            }
        });
        table.insert(id, task.abort_handle());
    }
}

/// A connection's entry in the open table, removed when its task ends or is aborted.
struct Registration {
    id: u64,
    open: OpenConnections,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id);
    }
}
