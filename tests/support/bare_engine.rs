//! A buildkitd of a test's own, without an agent: for the tests of the
//! agent's BuildKit client and GC executor, which talk to the engine directly.

use super::{BUILDCTL, BUILDKITD};
use machine_agent::engine::client::{self, ReadyInfo};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A fresh buildkitd listens within tens of milliseconds; this is for a loaded CI machine.
const READY: Duration = Duration::from_secs(30);
/// A one-file scratch build takes about a second.
const BUILD: Duration = Duration::from_secs(120);

/// Root and socket under a fresh /tmp/mab-* directory (unix socket paths must
/// stay under 108 bytes). Dropping it kills and reaps the engine, then removes
/// the directory.
pub struct BareEngine {
    pub child: Child,
    pub socket: PathBuf,
    log: PathBuf,
    pub dir: tempfile::TempDir,
}

impl BareEngine {
    /// Starts buildkitd with the OCI worker only, plus `extra_args`.
    pub fn start(extra_args: &[&str]) -> Self {
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
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BUILDKITD} (run scripts/install-buildkit.sh): {e}"));
        Self { child, socket, log, dir }
    }

    /// BuildKit's root: where its cache lives.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Waits for the engine as the supervisor does; an engine that exits
    /// first fails the test at once, with its log.
    pub async fn ready(&mut self) -> ReadyInfo {
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

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `buildctl build` of the Dockerfile in `context`, over the unix socket, bounded.
    pub async fn build(&self, context: &Path) {
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

impl Drop for BareEngine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// When a buildkitd's unix socket first accepts and when its gRPC server first
/// answers there, seen from a thread that connects without pause until a
/// connect succeeds ("accepting"), then speaks raw HTTP/2 on that connection
/// until the server's SETTINGS frame arrives ("serving": buildkitd accepts
/// before its workers are up, and its gRPC server takes the connection only
/// after). Panics after `within`. For the benches of engine readiness.
#[allow(clippy::disallowed_types)] // wall-clock instants are what the benches compare
pub fn detect_accepting_and_serving(socket: PathBuf, within: Duration) -> std::thread::JoinHandle<(std::time::Instant, std::time::Instant)> {
    use std::io::{Read, Write};
    use std::time::Instant;
    std::thread::spawn(move || {
        let give_up = Instant::now() + within;
        let mut stream = loop {
            if let Ok(stream) = std::os::unix::net::UnixStream::connect(&socket) {
                break stream;
            }
            assert!(Instant::now() < give_up, "{} never accepted", socket.display());
            std::thread::yield_now();
        };
        let accepting = Instant::now();
        stream.set_read_timeout(Some(within)).unwrap();
        // The client preface, then an empty SETTINGS frame (length 0, type 4, stream 0).
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").unwrap();
        let mut header = [0u8; 9];
        stream.read_exact(&mut header).unwrap();
        assert_eq!(header[3], 4, "the server's first frame is not SETTINGS: {header:?}");
        (accepting, Instant::now())
    })
}
