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
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

const BUILDKITD: &str = "/usr/local/bin/buildkitd";
const BUILDCTL: &str = "/usr/local/bin/buildctl";
/// A fresh buildkitd listens within tens of milliseconds; this is for a loaded CI machine.
const READY: Duration = Duration::from_secs(30);
/// A one-file scratch build takes about a second.
const BUILD: Duration = Duration::from_secs(120);

/// A buildkitd of this test's own: root and socket under a fresh /tmp/mab-*
/// directory (unix socket paths must stay under 108 bytes). Dropping it kills
/// and reaps the engine, then removes the directory.
struct Engine {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Engine {
    fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("mab-").tempdir_in("/tmp").unwrap();
        let socket = dir.path().join("s.sock");
        let log = dir.path().join("buildkitd.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(BUILDKITD)
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--addr")
            .arg(format!("unix://{}", socket.display()))
            // Not under --root by default (/run/buildkit/otel-grpc.sock): two
            // engines started at once would collide on it and one would exit.
            .arg("--otel-socket-path")
            .arg(dir.path().join("otel.sock"))
            .args(["--oci-worker=true", "--containerd-worker=false"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BUILDKITD} (run scripts/install-buildkit.sh): {e}"));
        Self { child, socket, log, dir }
    }

    /// Waits for the engine as the supervisor does; an engine that exits
    /// first fails the test at once, with its log.
    async fn ready(&mut self) -> client::ReadyInfo {
        let wait = client::wait_ready(&self.socket, READY);
        tokio::pin!(wait);
        let mut exit_check = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                ready = &mut wait => match ready {
                    Ok(ready) => return ready,
                    Err(e) => panic!("{e}\nbuildkitd log:\n{}", self.log_text()),
                },
                _ = exit_check.tick() => {
                    if let Some(status) = self.child.try_wait().unwrap() {
                        panic!("buildkitd exited ({status}) before it was ready\nbuildkitd log:\n{}", self.log_text());
                    }
                }
            }
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `buildctl build` of a scratch image with one COPY layer per file, each
    /// file `bytes` random bytes, in the order given.
    async fn build_layers(&self, files: &[&str], bytes: usize) {
        let context = self.dir.path().join("context");
        std::fs::create_dir_all(&context).unwrap();
        let mut dockerfile = String::from("FROM scratch\n");
        for name in files {
            dockerfile.push_str(&format!("COPY {name} /{name}\n"));
            let data: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
            std::fs::write(context.join(name), data).unwrap();
        }
        std::fs::write(context.join("Dockerfile"), dockerfile).unwrap();
        let mut build = tokio::process::Command::new(BUILDCTL);
        build
            .arg("--addr")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["build", "--frontend", "dockerfile.v0", "--progress", "plain"])
            .arg(format!("--local=context={}", context.display()))
            .arg(format!("--local=dockerfile={}", context.display()))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(BUILD, build.output()).await.expect("buildctl build did not finish").unwrap();
        assert!(output.status.success(), "buildctl build failed: {}", String::from_utf8_lossy(&output.stderr));
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let mut engine = Engine::start();
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
    let mut engine = Engine::start();
    let client = engine.ready().await.client;
    assert_eq!(client.disk_usage().await.unwrap(), vec![]);
}

#[tokio::test]
async fn a_build_leaves_records_and_pruning_a_leaf_frees_exactly_that_record() {
    const FILE_BYTES: usize = 1 << 20;
    let mut engine = Engine::start();
    let client = engine.ready().await.client;
    engine.build_layers(&["a", "b"], FILE_BYTES).await;

    let before = client.disk_usage().await.unwrap();
    let layer = |records: &[CacheRecord], step: &str| records.iter().find(|r| r.description.ends_with(step)).cloned();
    let (Some(a), Some(b)) = (layer(&before, "COPY a /a"), layer(&before, "COPY b /b")) else {
        panic!("no record per COPY layer in {before:#?}")
    };
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
    let regular = |records: &[CacheRecord]| -> HashSet<String> {
        records.iter().filter(|r| r.record_type == "regular").map(|r| r.id.clone()).collect()
    };
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
    let mut engine = Engine::start();
    let client: EngineClient = engine.ready().await.client.with_call_timeout(Duration::from_secs(2));
    engine.child.kill().unwrap();
    engine.child.wait().unwrap();
    let err = client.disk_usage().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ClientError::Call { call: "DiskUsage", .. }), "{text}");
    assert!(text.contains(&Path::new(&engine.socket).display().to_string()), "{text}");
}
