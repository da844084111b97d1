//! A TCP proxy between the agent and the control-plane double that breaks the
//! network on command, the way real networks break: it can stall new
//! connections (accepted, never forwarded: the client's TLS ClientHello goes
//! unanswered), black-hole the established ones (nothing forwarded either way,
//! nothing closed: a NAT that dropped the flow), and reset them (RST both ways).
//!
//! It runs on its own runtime thread, like the double, so a test's own runtime
//! being busy never delays forwarding; dropping it drops every socket it holds.

use super::WAIT;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};

/// What the proxy has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyCounts {
    /// Connections accepted from the agent, stalled or not.
    pub accepted: usize,
    /// Connections accepted while stalling: held open, never forwarded.
    pub stalled: usize,
    /// Connections forwarded to the upstream.
    pub forwarded: usize,
}

/// A command for every connection established before it was given.
#[derive(Debug, Clone, Copy)]
enum Break {
    BlackHole,
    Reset,
}

struct Shared {
    upstream: SocketAddr,
    stall_new: AtomicBool,
    counts: watch::Sender<ProxyCounts>,
    breaks: broadcast::Sender<Break>,
    /// Bytes forwarded, both directions together: what the agent's
    /// connections cost on the wire (TLS, HTTP/2 and gRPC framing included).
    wire_bytes: AtomicU64,
}

/// A running proxy. Dropping it closes every connection it holds.
pub struct ChaosProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ChaosProxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> Self {
        let shared = Arc::new(Shared {
            upstream,
            stall_new: AtomicBool::new(false),
            counts: watch::channel(ProxyCounts::default()).0,
            breaks: broadcast::channel(16).0,
            wire_bytes: AtomicU64::new(0),
        });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let shared2 = shared.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind proxy port");
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            runtime.spawn(accept_loop(listener, shared2));
            let _ = stop_rx.recv();
            runtime.shutdown_background();
        });
        let addr = addr_rx.recv().expect("proxy started");
        Self { addr, shared, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// The URL the agent dials: the proxy's port under the name the double's certificate carries.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// While on, new connections are accepted and held without a byte read or
    /// forwarded: a client that dialled one waits in its TLS handshake for ever.
    pub fn stall_new_connections(&self, on: bool) {
        self.shared.stall_new.store(on, Ordering::SeqCst);
    }

    /// Every connection established now stops forwarding in both directions and
    /// stays open. Later connections are forwarded normally.
    pub fn black_hole_established(&self) {
        let _ = self.shared.breaks.send(Break::BlackHole);
    }

    /// Every connection established now is closed with a RST on both sides.
    pub fn reset_established(&self) {
        let _ = self.shared.breaks.send(Break::Reset);
    }

    /// Bytes forwarded so far, both directions (TCP/IP headers not included).
    pub fn wire_bytes(&self) -> u64 {
        self.shared.wire_bytes.load(Ordering::SeqCst)
    }

    pub fn counts(&self) -> ProxyCounts {
        self.shared.counts.borrow().clone()
    }

    /// Waits until the counts satisfy `pred`; panics with `what` after WAIT.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&ProxyCounts) -> bool) -> ProxyCounts {
        let mut counts = self.shared.counts.subscribe();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let now = counts.borrow_and_update().clone();
                if pred(&now) {
                    return now;
                }
                counts.changed().await.unwrap();
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("proxy: timed out after {WAIT:?} waiting for {what}; counts {:?}", self.counts()))
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else { return };
        // Subscribe before anything else: a break given after the accept reaches this connection.
        let breaks = shared.breaks.subscribe();
        let stall = shared.stall_new.load(Ordering::SeqCst);
        shared.counts.send_modify(|c| {
            c.accepted += 1;
            if stall {
                c.stalled += 1;
            }
        });
        if stall {
            // Held, unread, until the runtime shuts down.
            tokio::spawn(async move {
                let _held = client;
                std::future::pending::<()>().await;
            });
            continue;
        }
        tokio::spawn(forward(client, breaks, shared.clone()));
    }
}

async fn forward(mut client: TcpStream, mut breaks: broadcast::Receiver<Break>, shared: Arc<Shared>) {
    let Ok(mut upstream) = TcpStream::connect(shared.upstream).await else { return };
    shared.counts.send_modify(|c| c.forwarded += 1);
    let command = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let both_ways = async {
            tokio::join!(pump(client_read, upstream_write, &shared.wire_bytes), pump(upstream_read, client_write, &shared.wire_bytes));
        };
        tokio::select! {
            () = both_ways => return,
            command = breaks.recv() => command,
        }
    };
    match command {
        Ok(Break::BlackHole) => {
            // Both sockets stay open and unread: neither side hears anything again.
            let _held = (client, upstream);
            std::future::pending::<()>().await;
        }
        Ok(Break::Reset) | Err(_) => {
            let _ = client.set_zero_linger();
            let _ = upstream.set_zero_linger();
        }
    }
}

/// Copies `from` to `to` until `from` ends, counting the bytes, then shuts `to`
/// for writing (as copy_bidirectional does).
async fn pump(mut from: impl tokio::io::AsyncRead + Unpin, mut to: impl tokio::io::AsyncWrite + Unpin, counted: &AtomicU64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        counted.fetch_add(n as u64, Ordering::SeqCst);
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}
