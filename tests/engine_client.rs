//! The native BuildKit client against a real buildkitd (scripts/install-buildkit.sh):
//! readiness, workers and version, disk usage before and after a real build,
//! prune by id (exactly what was asked, nothing for an empty list), and a
//! readiness wait on a socket nobody serves.
//!
//! Each test starts its own buildkitd on a private root and socket; the guard
//! kills and reaps it. Builds are `FROM scratch`, so no registry is needed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

use machine_agent::engine::client::{self, CacheRecord, ClientError, EngineClient};
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tokio::time::Instant;

mod support;

use support::bare_engine::BareEngine;
use support::BUILDKITD;

/// `buildctl build` of a scratch image with one COPY layer per file, each
/// file `bytes` random bytes, in the order given.
async fn build_layers(engine: &BareEngine, files: &[&str], bytes: usize) {
    let context = engine.dir.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    let mut dockerfile = String::from("FROM scratch\n");
    for name in files {
        dockerfile.push_str(&format!("COPY {name} /{name}\n"));
        let data: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
        std::fs::write(context.join(name), data).unwrap();
    }
    std::fs::write(context.join("Dockerfile"), dockerfile).unwrap();
    engine.build(&context).await;
}

fn ids(records: &[CacheRecord]) -> HashSet<String> {
    records.iter().map(|r| r.id.clone()).collect()
}

/// Records no other record names as a parent, and that nothing holds.
fn unused_leaves(records: &[CacheRecord]) -> Vec<&CacheRecord> {
    let parents: HashSet<&str> = records.iter().flat_map(|r| r.parents.iter().map(String::as_str)).collect();
    records.iter().filter(|r| !r.in_use && !parents.contains(r.id.as_str())).collect()
}

fn installed_version() -> String {
    // "buildkitd github.com/moby/buildkit v0.34.2 <revision>"
    let out = Command::new(BUILDKITD).arg("--version").output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(2).unwrap_or_default().to_string()
}

#[tokio::test]
async fn a_starting_engine_becomes_ready_with_a_worker_and_its_version() {
    let mut engine = BareEngine::start(&[]);
    // The socket does not exist yet: this is the wait the supervisor does.
    let ready = engine.ready().await;
    assert!(ready.workers >= 1);
    assert_eq!(ready.worker_ids.len(), ready.workers);
    assert_eq!(ready.version, installed_version());

    let client = &ready.client;
    assert!(client.health().await.unwrap());
    let workers = client.workers().await.unwrap();
    assert_eq!(workers.iter().map(|w| w.id.clone()).collect::<Vec<_>>(), ready.worker_ids);
    assert_eq!(workers[0].labels.get("org.mobyproject.buildkit.worker.executor").map(String::as_str), Some("oci"));
    let info = client.info().await.unwrap();
    assert_eq!(info.version, ready.version);
    assert_eq!(info.package, "github.com/moby/buildkit");
}

#[tokio::test]
async fn a_fresh_engine_has_no_cache_records() {
    let mut engine = BareEngine::start(&[]);
    let client = engine.ready().await.client;
    assert_eq!(client.disk_usage().await.unwrap(), vec![]);
}

#[tokio::test]
async fn a_build_leaves_records_and_pruning_a_leaf_frees_exactly_that_record() {
    const FILE_BYTES: usize = 1 << 20;
    let mut engine = BareEngine::start(&[]);
    let client = engine.ready().await.client;
    build_layers(&engine, &["a", "b"], FILE_BYTES).await;

    let before = client.disk_usage().await.unwrap();
    let layer = |records: &[CacheRecord], step: &str| records.iter().find(|r| r.description.ends_with(step)).cloned();
    let (Some(a), Some(b)) = (layer(&before, "COPY a /a"), layer(&before, "COPY b /b")) else { panic!("no record per COPY layer in {before:#?}") };
    for r in [&a, &b] {
        // A layer's size is its own diff: the file, plus filesystem overhead.
        assert!(r.size_bytes >= FILE_BYTES as u64 && r.record_type == "regular" && r.created_at.is_some(), "{r:#?}");
    }
    assert_eq!(b.parents, vec![a.id.clone()], "the second layer is built on the first");

    // An empty list prunes nothing; an unfiltered prune would have taken both
    // layers, which nothing holds.
    assert_eq!(client.prune(&[]).await.unwrap(), vec![]);
    let still = ids(&client.disk_usage().await.unwrap());
    assert!(still.contains(&a.id) && still.contains(&b.id), "{still:?}");

    // Only b is a leaf; pruning it frees b and leaves its parent.
    let leaves: Vec<&str> = unused_leaves(&before).iter().map(|r| r.id.as_str()).collect();
    assert!(leaves.contains(&b.id.as_str()) && !leaves.contains(&a.id.as_str()), "{leaves:?}");
    let freed = client.prune(std::slice::from_ref(&b.id)).await.unwrap();
    assert_eq!(freed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec![b.id.as_str()], "{freed:#?}");
    assert_eq!(freed[0].size_bytes, b.size_bytes);

    let after = client.disk_usage().await.unwrap();
    let regular = |records: &[CacheRecord]| -> HashSet<String> { records.iter().filter(|r| r.record_type == "regular").map(|r| r.id.clone()).collect() };
    let mut expected = regular(&before);
    expected.remove(&b.id);
    // Layers only: once in some seventy runs, buildkitd was seen to replace
    // two of a fresh build's four records (new ids) between two DiskUsage
    // calls, with no prune in between; which ones was not captured, and 80
    // runs built to catch it did not. Local-source records are the suspects.
    assert_eq!(regular(&after), expected, "before {before:#?}\nafter {after:#?}");
}

#[tokio::test]
async fn waiting_on_a_socket_nobody_serves_times_out_at_the_deadline() {
    let dir = tempfile::Builder::new().prefix("mab-").tempdir_in("/tmp").unwrap();
    let socket = dir.path().join("s.sock");
    let deadline = Duration::from_millis(500);
    let started = Instant::now();
    let err = client::wait_ready(&socket, deadline).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed >= deadline && elapsed < deadline + Duration::from_secs(1), "{elapsed:?}");
    let text = err.to_string();
    assert!(matches!(err, ClientError::NotReady { .. }), "{text}");
    assert!(text.contains(&socket.display().to_string()) && text.contains("not ready within 500ms"), "{text}");
    assert!(text.contains("No such file or directory"), "{text}");
}

#[tokio::test]
async fn a_stopped_engine_fails_calls_with_the_socket_named() {
    let mut engine = BareEngine::start(&[]);
    let client: EngineClient = engine.ready().await.client.with_call_timeout(Duration::from_secs(2));
    engine.child.kill().unwrap();
    engine.child.wait().unwrap();
    let err = client.disk_usage().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ClientError::Call { call: "DiskUsage", .. }), "{text}");
    assert!(text.contains(&Path::new(&engine.socket).display().to_string()), "{text}");
}
