//! A small OTLP/gRPC trace receiver: a tonic server answering
//! `opentelemetry.proto.collector.trace.v1.TraceService/Export` and counting
//! the spans it receives, by name. The messages are declared here with
//! prost's derive, only the fields read, with the field numbers of
//! opentelemetry-proto (collector/trace/v1/trace_service.proto,
//! trace/v1/trace.proto); every other field is skipped on decode.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// `ExportTraceServiceRequest`: `repeated ResourceSpans resource_spans = 1`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpans>,
}

/// `ResourceSpans`: `Resource resource = 1` (skipped), `repeated ScopeSpans scope_spans = 2`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceSpans {
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpans>,
}

/// `ScopeSpans`: `InstrumentationScope scope = 1` (skipped), `repeated Span spans = 2`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeSpans {
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<Span>,
}

/// `Span`: `bytes trace_id = 1`, `string name = 5`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Span {
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    #[prost(string, tag = "5")]
    pub name: String,
}

/// `ExportTraceServiceResponse`: `partial_success = 1`, left empty (all accepted).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceResponse {}

/// What the receiver got: span counts by name, and Export calls.
#[derive(Debug, Default)]
pub struct Received {
    pub spans_by_name: BTreeMap<String, u64>,
    pub exports: u64,
}

impl Received {
    pub fn spans(&self) -> u64 {
        self.spans_by_name.values().sum()
    }
}

/// The receiver: a tonic server on its own thread and runtime (so a test's
/// runtime stopping never stops it first), listening on 127.0.0.1.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Received>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OtlpReceiver {
    pub fn start() -> Self {
        let received = Arc::new(Mutex::new(Received::default()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let service = TraceService { received: received.clone() };
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        Self { addr, received, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// `http://127.0.0.1:<port>`: what a task and the config name.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> u64 {
        self.received.lock().unwrap().spans()
    }

    pub fn span_names(&self) -> Vec<String> {
        self.received.lock().unwrap().spans_by_name.keys().cloned().collect()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The service, written as tonic's generated server code would be, for one method.
#[derive(Clone)]
struct TraceService {
    received: Arc<Mutex<Received>>,
}

impl tonic::server::NamedService for TraceService {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

type BoxFuture<T, E> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send + 'static>>;

struct Export(Arc<Mutex<Received>>);

impl tonic::server::UnaryService<ExportTraceServiceRequest> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<tonic::Response<Self::Response>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<ExportTraceServiceRequest>) -> Self::Future {
        let received = self.0.clone();
        Box::pin(async move {
            let mut r = received.lock().unwrap();
            r.exports += 1;
            for span in request.into_inner().resource_spans.into_iter().flat_map(|rs| rs.scope_spans).flat_map(|ss| ss.spans) {
                *r.spans_by_name.entry(span.name).or_default() += 1;
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse {}))
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for TraceService {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let received = self.received.clone();
        match req.uri().path() {
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(Export(received), req).await)
            }),
            _ => Box::pin(async move { Ok(tonic::Status::unimplemented("only TraceService/Export").into_http()) }),
        }
    }
}
