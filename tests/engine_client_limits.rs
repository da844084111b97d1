//! The engine client's message limits against an engine double: a DiskUsage
//! answer larger than tonic's default 4 MiB decode limit (and smaller than
//! BuildKit's 16 MiB send limit) arrives in one call, and one larger than
//! BuildKit would send is read in pages by id prefix, every record once.
//!
//! The double speaks BuildKit's Control API on a unix socket and refuses an
//! answer above 16 MiB the way buildkitd does (grpc-go's send limit:
//! ResourceExhausted). A real buildkitd is in benches/gc_bigcache.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

use machine_agent::engine::client::{EngineClient, MAX_MESSAGE_BYTES};
use machine_agent::proto::moby::buildkit::v1 as pb;
use pb::control_server::{Control, ControlServer};
use prost::Message;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tonic::{Request, Response, Status};

const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

#[derive(Debug, Clone)]
struct Engine {
    records: Arc<Vec<pb::UsageRecord>>,
    calls: Arc<AtomicU32>,
}

/// The ids a DiskUsage filter of the client's selects: `id~=^<prefix>`, or the
/// quoted rest of a prefix, `id~="^<prefix>([^<alphabet>]|$)"`.
fn matches(filter: &[String], id: &str) -> bool {
    let Some(f) = filter.first() else { return true };
    if let Some(prefix) = f.strip_prefix("id~=^") {
        return id.starts_with(prefix);
    }
    let rest = f.strip_prefix("id~=\"^").and_then(|r| r.split_once('(')).map(|(prefix, _)| prefix).expect("a filter the double knows");
    id.strip_prefix(rest).is_some_and(|after| after.bytes().next().is_none_or(|b| !ALPHABET.contains(&b)))
}

#[tonic::async_trait]
impl Control for Engine {
    async fn disk_usage(&self, request: Request<pb::DiskUsageRequest>) -> Result<Response<pb::DiskUsageResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let filter = request.into_inner().filter;
        let record = self.records.iter().filter(|r| matches(&filter, &r.id)).cloned().collect();
        let response = pb::DiskUsageResponse { record };
        if response.encoded_len() > MAX_MESSAGE_BYTES {
            // What grpc-go says when buildkitd's answer passes its send limit.
            return Err(Status::resource_exhausted(format!(
                "grpc: trying to send message larger than max ({} vs. {MAX_MESSAGE_BYTES})",
                response.encoded_len()
            )));
        }
        Ok(Response::new(response))
    }

    type PruneStream = tokio_stream::Empty<Result<pb::UsageRecord, Status>>;

    async fn prune(&self, _: Request<pb::PruneRequest>) -> Result<Response<Self::PruneStream>, Status> {
        Err(Status::unimplemented("not in the double"))
    }

    async fn list_workers(&self, _: Request<pb::ListWorkersRequest>) -> Result<Response<pb::ListWorkersResponse>, Status> {
        Err(Status::unimplemented("not in the double"))
    }

    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        Err(Status::unimplemented("not in the double"))
    }

    type ListenBuildHistoryStream = tokio_stream::Empty<Result<pb::BuildHistoryEvent, Status>>;

    async fn listen_build_history(&self, _: Request<pb::BuildHistoryRequest>) -> Result<Response<Self::ListenBuildHistoryStream>, Status> {
        Err(Status::unimplemented("not in the double"))
    }
}

/// `count` records with random 25-character base-36 ids (BuildKit's) and
/// descriptions of `description_bytes`, like long RUN lines.
fn records(count: usize, description_bytes: usize) -> Vec<pb::UsageRecord> {
    (0..count)
        .map(|i| {
            let id: String = (0..25).map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())])).collect();
            pb::UsageRecord {
                id,
                size: 4096,
                description: format!("[{i}] RUN {}", "x".repeat(description_bytes)),
                record_type: "regular".into(),
                ..Default::default()
            }
        })
        .collect()
}

/// Serves `records` on a fresh unix socket; returns the socket's directory (kept alive) and path.
fn serve(records: Vec<pb::UsageRecord>) -> (tempfile::TempDir, std::path::PathBuf, Arc<AtomicU32>) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("buildkitd.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let engine = Engine { records: Arc::new(records), calls: calls.clone() };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ControlServer::new(engine).max_encoding_message_size(usize::MAX))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    (dir, socket, calls)
}

#[tokio::test]
async fn a_disk_usage_answer_above_tonics_default_limit_arrives_in_one_call() {
    // About 6 MiB: past tonic's 4 MiB default, within BuildKit's 16 MiB.
    let all = records(6_000, 1_000);
    let bytes = pb::DiskUsageResponse { record: all.clone() }.encoded_len();
    assert!(bytes > 4 << 20 && bytes < MAX_MESSAGE_BYTES, "{bytes}");
    let (_dir, socket, calls) = serve(all);
    let usage = EngineClient::connect(&socket).await.unwrap().disk_usage_paged().await.expect("a 6 MiB DiskUsage answer is taken");
    assert_eq!((usage.records.len(), usage.calls, calls.load(Ordering::SeqCst)), (6_000, 1, 1));
    assert_eq!(usage.bytes, bytes as u64);
}

#[tokio::test]
async fn a_disk_usage_answer_buildkit_would_not_send_is_read_in_pages_every_record_once() {
    // About 24 MiB: one answer would pass BuildKit's send limit.
    let mut all = records(24_000, 1_000);
    // An id outside BuildKit's alphabet is still read (the rest page).
    all[0].id = "Z-not-base36".into();
    let ids: std::collections::BTreeSet<String> = all.iter().map(|r| r.id.clone()).collect();
    let (_dir, socket, calls) = serve(all);
    let usage = EngineClient::connect(&socket).await.unwrap().disk_usage_paged().await.expect("paged");
    let got: std::collections::BTreeSet<String> = usage.records.iter().map(|r| r.id.clone()).collect();
    assert_eq!(usage.records.len(), ids.len(), "every record exactly once");
    assert_eq!(got, ids);
    assert!(usage.calls > 1, "paged: {} calls", usage.calls);
    assert_eq!(calls.load(Ordering::SeqCst), usage.calls + 1, "one refused whole-list call, then the pages");
}
