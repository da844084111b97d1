//! The control-plane double: a tonic server speaking the real proto over real
//! TLS, run on its own runtime thread so a test can kill it outright (every
//! connection dropped, as when the real one goes away) and start it again on
//! the same port. It records every call and lets the test push tasks and ask
//! for termination.

use super::{TestPki, WAIT};
use machine_agent::proto::v1 as pb;
use machine_agent::proto::v1::machine_service_server::{MachineService, MachineServiceServer};
use prost::Message;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Everything the double saw.
#[derive(Default, Debug, Clone)]
pub struct Recorded {
    pub registrations: Vec<pb::RegisterRequest>,
    /// When each RegisterMachine call arrived, refused ones included.
    pub registration_attempts: Vec<tokio::time::Instant>,
    pub user_agents: Vec<String>,
    pub health: Vec<pb::HealthReport>,
    /// Encoded size of each health report, bytes.
    pub health_sizes: Vec<usize>,
    /// When each health report arrived.
    pub health_arrivals: Vec<tokio::time::Instant>,
    pub usage: Vec<pb::UsageReport>,
    pub shutdowns: Vec<pb::ShutdownReport>,
    /// Calls that came with a wrong or missing bearer token.
    pub unauthorized: usize,
    pub health_streams_opened: usize,
    /// The agent's state as the control plane knows it after each health
    /// report, rebuilt from the full reports and deltas of its stream (one
    /// entry per report; the event lists are not state and stay empty).
    pub health_states: Vec<pb::HealthReport>,
    /// Reports that broke the delta protocol: a delta with no full report
    /// before it on its stream, a sequence out of order.
    pub health_protocol_errors: Vec<String>,
}

impl Recorded {
    /// The agent's state as the control plane knows it now.
    pub fn health_state(&self) -> Option<&pb::HealthReport> {
        self.health_states.last()
    }
}

impl Recorded {
    /// The step records of every health report, deduplicated by container id
    /// as the control plane does (the first arrival kept), with how many
    /// times each arrived.
    pub fn step_records(&self) -> std::collections::BTreeMap<String, (pb::StepRecord, usize)> {
        let mut steps = std::collections::BTreeMap::new();
        for r in self.health.iter().flat_map(|h| h.step_records.iter()) {
            steps.entry(r.container_id.clone()).or_insert_with(|| (r.clone(), 0)).1 += 1;
        }
        steps
    }
}

type TaskSender = mpsc::Sender<Result<pb::RegisterResponse, Status>>;

#[derive(Clone)]
struct Shared {
    recorded: Arc<Mutex<Recorded>>,
    version: watch::Sender<u64>,
    /// Sends on the newest task stream.
    task_stream: Arc<Mutex<Option<TaskSender>>>,
    /// What a new registration gets first.
    initial: Arc<Mutex<Vec<pb::register_response::Task>>>,
    terminate: watch::Sender<bool>,
    /// Bumped to make every open health stream fail (as a broken connection would).
    break_health: watch::Sender<u64>,
    expected_static_token: Option<String>,
    /// The task stream sends its headers and then nothing: no task, no keepalive.
    silent: bool,
    /// The health report format every registration is told.
    health_reporting: Arc<Mutex<Option<pb::HealthReporting>>>,
}

pub const MACHINE_ID: &str = "machine-0001";
pub const MACHINE_TOKEN: &str = "machine-bearer-token-SECRET-7f3a";

impl Shared {
    fn record(&self, f: impl FnOnce(&mut Recorded)) {
        f(&mut self.recorded.lock().unwrap());
        self.version.send_modify(|v| *v += 1);
    }

    fn check_auth<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let ok = req.metadata().get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {MACHINE_TOKEN}"));
        if ok {
            Ok(())
        } else {
            self.record(|r| r.unauthorized += 1);
            Err(Status::unauthenticated("bad bearer token"))
        }
    }
}

type TaskStream = Pin<Box<dyn Stream<Item = Result<pb::RegisterResponse, Status>> + Send>>;

#[tonic::async_trait]
impl MachineService for Shared {
    type RegisterMachineStream = TaskStream;

    async fn register_machine(&self, req: Request<pb::RegisterRequest>) -> Result<Response<TaskStream>, Status> {
        let ua = req.metadata().get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let msg = req.into_inner();
        self.record(|r| r.registration_attempts.push(tokio::time::Instant::now()));
        if let (Some(expected), Some(pb::register_request::Identity::StaticToken(t))) = (&self.expected_static_token, &msg.identity) {
            if &t.token != expected {
                return Err(Status::unauthenticated("unknown bootstrap token"));
            }
        }
        let (tx, rx) = mpsc::channel(16);
        if !self.silent {
            let reporting = *self.health_reporting.lock().unwrap();
            for task in self.initial.lock().unwrap().iter() {
                tx.try_send(Ok(pb::RegisterResponse { health_reporting: reporting, ..response(task.clone()) })).unwrap();
            }
            // As the protocol asks: something at least every keepalive_interval_secs.
            if msg.keepalive_interval_secs > 0 {
                let interval = std::time::Duration::from_secs(msg.keepalive_interval_secs.into());
                let keepalive = tx.clone();
                tokio::spawn(async move {
                    let mut ticker = tokio::time::interval(interval);
                    ticker.tick().await;
                    loop {
                        ticker.tick().await;
                        if keepalive.send(Ok(keepalive_response())).await.is_err() {
                            return; // the agent closed the stream
                        }
                    }
                });
            }
        }
        // The stream is in place before the registration is visible to a waiting test.
        *self.task_stream.lock().unwrap() = Some(tx);
        self.record(|r| {
            r.registrations.push(msg.clone());
            r.user_agents.push(ua);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_health(&self, req: Request<Streaming<pb::HealthReport>>) -> Result<Response<pb::HealthResponse>, Status> {
        self.check_auth(&req)?;
        self.record(|r| r.health_streams_opened += 1);
        let mut stream = req.into_inner();
        let mut terminate = self.terminate.subscribe();
        // What this stream has told so far: deltas apply to it.
        let mut state: Option<pb::HealthReport> = None;
        let mut broken = self.break_health.subscribe();
        broken.borrow_and_update();
        loop {
            if *terminate.borrow_and_update() {
                return Ok(Response::new(pb::HealthResponse { should_terminate: true }));
            }
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(Ok(report)) => self.record(|r| {
                        let expected = state.as_ref().map_or(1, |s| s.sequence + 1);
                        if report.sequence != expected {
                            r.health_protocol_errors.push(format!("sequence {} where {expected} was due", report.sequence));
                        }
                        match state.as_mut() {
                            Some(held) => machine_agent::control::health_delta::apply(held, &report),
                            None if report.delta => r.health_protocol_errors.push(format!("a delta (sequence {}) opened the stream", report.sequence)),
                            None => {
                                let mut held = pb::HealthReport::default();
                                machine_agent::control::health_delta::apply(&mut held, &report);
                                state = Some(held);
                            }
                        }
                        r.health_states.extend(state.clone());
                        r.health_sizes.push(report.encoded_len());
                        r.health_arrivals.push(tokio::time::Instant::now());
                        r.health.push(report);
                    }),
                    Some(Err(status)) => return Err(status),
                    None => return Ok(Response::new(pb::HealthResponse { should_terminate: false })),
                },
                _ = terminate.changed() => {}
                _ = broken.changed() => return Err(Status::unavailable("health stream broken by the test")),
            }
        }
    }

    async fn report_usage(&self, req: Request<pb::UsageReport>) -> Result<Response<pb::UsageResponse>, Status> {
        self.check_auth(&req)?;
        let msg = req.into_inner();
        self.record(|r| r.usage.push(msg));
        Ok(Response::new(pb::UsageResponse {}))
    }

    async fn report_shutdown(&self, req: Request<pb::ShutdownReport>) -> Result<Response<pb::ShutdownResponse>, Status> {
        self.check_auth(&req)?;
        let msg = req.into_inner();
        self.record(|r| r.shutdowns.push(msg));
        Ok(Response::new(pb::ShutdownResponse {}))
    }
}

fn response(task: pb::register_response::Task) -> pb::RegisterResponse {
    pb::RegisterResponse { machine_id: MACHINE_ID.into(), token: MACHINE_TOKEN.into(), task: Some(task), ..Default::default() }
}

fn keepalive_response() -> pb::RegisterResponse {
    pb::RegisterResponse { keepalive: Some(pb::TaskStreamKeepalive {}), ..Default::default() }
}

pub fn pending() -> pb::register_response::Task {
    pb::register_response::Task::Pending(pb::PendingTask {})
}

/// A valid BuildKit task whose cache mount sits under `prefix`.
pub fn buildkit_task(id: &str, prefix: &std::path::Path) -> pb::register_response::Task {
    let pki = TestPki::new("engine ca");
    pb::register_response::Task::Buildkit(pb::BuildkitTask {
        task_id: id.into(),
        tls: Some(pb::TlsMaterial { cert_pem: pki.server_cert_pem, key_pem: pki.server_key_pem, ca_pem: pki.ca_pem }),
        mounts: vec![pb::VolumeMount {
            mount_path: prefix.join("cache").display().to_string(),
            source: Some(pb::volume_mount::Source::File(pb::FileBackedVolume {
                path: prefix.with_file_name("cache.img").display().to_string(),
                size_bytes: 1 << 30,
            })),
            fs_type: pb::FilesystemType::Ext4 as i32,
            options: vec!["noatime".into()],
            skip_trim: false,
            cache_mode: pb::CacheMode::Primary as i32,
        }],
        cache_size_bytes: 1 << 30,
        gc: None,
        max_parallelism: 2,
        debug: false,
        listen_address: format!("127.0.0.1:{}", super::free_port()),
        engine_env: [("ENGINE_MARKER".to_string(), "from-task".to_string())].into_iter().collect(),
        ..Default::default()
    })
}

/// A running double. Dropping it kills it.
pub struct ControlPlaneDouble {
    pub addr: SocketAddr,
    pub pki: Arc<TestPki>,
    shared: Shared,
    version: watch::Receiver<u64>,
    /// Tells the server's thread to drop its runtime (and every connection).
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub struct DoubleBuilder {
    pki: Option<Arc<TestPki>>,
    port: u16,
    initial: Vec<pb::register_response::Task>,
    expected_static_token: Option<String>,
    silent: bool,
}

pub fn control_plane() -> DoubleBuilder {
    DoubleBuilder { pki: None, port: 0, initial: vec![pending()], expected_static_token: None, silent: false }
}

impl DoubleBuilder {
    pub fn pki(mut self, pki: Arc<TestPki>) -> Self {
        self.pki = Some(pki);
        self
    }
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    pub fn initial(mut self, tasks: Vec<pb::register_response::Task>) -> Self {
        self.initial = tasks;
        self
    }
    pub fn expect_static_token(mut self, token: &str) -> Self {
        self.expected_static_token = Some(token.into());
        self
    }
    /// Task streams send their headers and then nothing at all, keepalives included.
    pub fn silent_task_streams(mut self) -> Self {
        self.silent = true;
        self
    }

    pub fn start(self) -> ControlPlaneDouble {
        let pki = self.pki.unwrap_or_else(|| Arc::new(TestPki::new("control plane test ca")));
        let (version_tx, version_rx) = watch::channel(0u64);
        let shared = Shared {
            recorded: Default::default(),
            version: version_tx,
            task_stream: Default::default(),
            initial: Arc::new(Mutex::new(self.initial)),
            terminate: watch::channel(false).0,
            break_health: watch::channel(0).0,
            expected_static_token: self.expected_static_token,
            silent: self.silent,
            health_reporting: Default::default(),
        };
        let identity = tonic::transport::Identity::from_pem(&pki.server_cert_pem, &pki.server_key_pem);
        let service = MachineServiceServer::new(shared.clone());
        let port = self.port;
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        // Its own thread and runtime: killing it drops every task, so every
        // connection closes at once, as when a real control plane dies.
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let listener = runtime.block_on(tokio::net::TcpListener::bind(("127.0.0.1", port))).expect("bind control plane port");
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            runtime.spawn(async move {
                tonic::transport::Server::builder()
                    .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                    .unwrap()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await
                    .unwrap();
            });
            let _ = stop_rx.recv();
            runtime.shutdown_background();
        });
        let addr = addr_rx.recv().expect("control plane double started");
        ControlPlaneDouble { addr, pki, shared, version: version_rx, stop: Some(stop_tx), thread: Some(thread) }
    }
}

impl ControlPlaneDouble {
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn recorded(&self) -> Recorded {
        self.shared.recorded.lock().unwrap().clone()
    }

    /// Waits until the recorded calls satisfy `pred`; panics with `what` after WAIT.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Recorded) -> bool) -> Recorded {
        self.wait_for_within(WAIT, what, pred).await
    }

    /// [`Self::wait_for`] with a bound of its own, for scenarios that take longer than WAIT by design.
    pub async fn wait_for_within(&self, within: std::time::Duration, what: &str, pred: impl Fn(&Recorded) -> bool) -> Recorded {
        let mut version = self.version.clone();
        let result = tokio::time::timeout(within, async {
            loop {
                version.borrow_and_update();
                let rec = self.recorded();
                if pred(&rec) {
                    return rec;
                }
                version.changed().await.unwrap();
            }
        })
        .await;
        result.unwrap_or_else(|_| panic!("control plane double: timed out after {within:?} waiting for {what}; saw {:#?}", summary(&self.recorded())))
    }

    /// Sends a task on the newest task stream.
    pub fn push(&self, task: pb::register_response::Task) {
        let tx = self.shared.task_stream.lock().unwrap().clone();
        let tx = tx.expect("no registration yet: wait_for a registration first");
        tx.try_send(Ok(response(task))).unwrap();
    }

    /// Sends a cache reset request, with no task, on the newest task stream.
    pub fn push_reset(&self, reset: pb::CacheReset) {
        let tx = self.shared.task_stream.lock().unwrap().clone();
        let tx = tx.expect("no registration yet: wait_for a registration first");
        let message = pb::RegisterResponse { machine_id: MACHINE_ID.into(), token: MACHINE_TOKEN.into(), reset_cache: Some(reset), ..Default::default() };
        tx.try_send(Ok(message)).unwrap();
    }

    /// Tells the agent, now and on every later registration, how to send its
    /// health reports (a message with only `health_reporting` on the newest
    /// task stream).
    pub fn set_health_reporting(&self, reporting: pb::HealthReporting) {
        *self.shared.health_reporting.lock().unwrap() = Some(reporting);
        let tx = self.shared.task_stream.lock().unwrap().clone();
        if let Some(tx) = tx {
            let message = pb::RegisterResponse { health_reporting: Some(reporting), ..Default::default() };
            tx.try_send(Ok(message)).unwrap();
        }
    }

    /// Sends every task on the newest task stream, as fast as the stream
    /// takes them (waiting when it is full); returns how many were sent.
    pub async fn push_all(&self, tasks: impl IntoIterator<Item = pb::register_response::Task>) -> usize {
        let tx = self.shared.task_stream.lock().unwrap().clone();
        let tx = tx.expect("no registration yet: wait_for a registration first");
        let mut sent = 0;
        for task in tasks {
            if tx.send(Ok(response(task))).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    }

    /// Every health stream open now fails with UNAVAILABLE (later ones are left alone).
    pub fn break_health_streams(&self) {
        self.shared.break_health.send_modify(|n| *n += 1);
    }

    /// Every open health stream (and every later one) answers should_terminate.
    pub fn terminate(&self) {
        self.shared.terminate.send_replace(true);
    }

    /// Kills the server and every connection, as a crashed control plane would.
    pub fn kill(mut self) -> (u16, Arc<TestPki>) {
        self.stop_server();
        (self.addr.port(), self.pki.clone())
    }

    fn stop_server(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ControlPlaneDouble {
    fn drop(&mut self) {
        self.stop_server();
    }
}

fn summary(r: &Recorded) -> String {
    format!(
        "registrations={} (attempts {}) health={} usage={} shutdowns={} unauthorized={} health_streams={} health_protocol_errors={:?} last health state: {:?}",
        r.registrations.len(),
        r.registration_attempts.len(),
        r.health.len(),
        r.usage.len(),
        r.shutdowns.len(),
        r.unauthorized,
        r.health_streams_opened,
        r.health_protocol_errors,
        r.health_state().map(|h| (h.agent_state, h.engine_state, h.engine_restarts, &h.task_id, h.oom_kills_total))
    )
}
