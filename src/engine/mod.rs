//! The build engine's process: spawned in its own process group with the task's
//! environment, its output streamed into tracing under the `engine` target,
//! watched for exit, and stopped with SIGTERM, a grace period, then SIGKILL.
//!
//! This is the first cut the lifecycle needs: it starts the configured binary
//! and reports when it exits. BuildKit's config, TLS files, cgroup, readiness
//! over gRPC and restart-with-backoff build on it. It never restarts the engine
//! on its own and never signals anything outside the engine's process group.

/// BuildKit's own gRPC API (Control, health) over the engine's unix socket.
pub mod client;
/// The engine's memory cgroup (v2 or v1).
pub mod cgroup;
/// buildkitd.toml from typed structs.
pub mod render;
/// Restart policy and the supervision loop.
pub mod supervise;
/// The task's mTLS material: validated, then written atomically.
pub mod tls;

use crate::config::EngineConfig;
use crate::task::BuildkitTask;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

/// What the health stream and /readyz say about the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineState {
    NotStarted,
    Starting,
    Running,
    Restarting,
    Stopping,
    Stopped,
}

impl EngineState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotStarted => "not_started",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Restarting => "restarting",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
        }
    }
}

/// Why the engine could not be started.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum EngineError {
    /// cannot start the engine {binary}: {source}
    Spawn { binary: PathBuf, #[source] source: std::io::Error },
}

/// How a stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// Exited within the grace period after SIGTERM (or had already exited).
    Clean,
    /// Needed SIGKILL.
    Killed,
}

/// A running engine, owned by a watcher task. Dropping the handle leaves the
/// engine running: only an explicit [`EngineHandle::stop`] ends it, because an
/// agent restart must never take builds down with it.
#[derive(Debug)]
pub struct EngineHandle {
    pub pid: u32,
    stop_tx: oneshot::Sender<(Duration, oneshot::Sender<StopOutcome>)>,
}

/// Output lines longer than this are cut: a runaway log line must not grow the agent's memory.
const MAX_LOG_LINE_BYTES: usize = 4096;

impl EngineHandle {
    /// Starts the engine. `exited` receives a description when it exits on its own.
    pub fn spawn(config: &EngineConfig, task: &BuildkitTask, exited: mpsc::Sender<String>) -> Result<Self, EngineError> {
        let mut cmd = Command::new(&config.binary);
        cmd.args(&config.args)
            .envs(&task.engine_env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a stop reaches the engine and every child it
            // forked, and a Ctrl-C in the agent's terminal does not hit it directly.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|source| EngineError::Spawn { binary: config.binary.clone(), source })?;
        let pid = child.id().unwrap_or_default();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(out, "stdout"));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(err, "stderr"));
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        tokio::spawn(watch(child, pid, stop_rx, exited));
        Ok(Self { pid, stop_tx })
    }

    /// SIGTERM to the engine's group, then SIGKILL after `grace`; waits for the reap.
    pub async fn stop(self, grace: Duration) -> StopOutcome {
        let (done_tx, done_rx) = oneshot::channel();
        if self.stop_tx.send((grace, done_tx)).is_err() {
            return StopOutcome::Clean; // the watcher already saw it exit
        }
        done_rx.await.unwrap_or(StopOutcome::Clean)
    }
}

async fn watch(
    mut child: Child,
    pid: u32,
    stop_rx: oneshot::Receiver<(Duration, oneshot::Sender<StopOutcome>)>,
    exited: mpsc::Sender<String>,
) {
    tokio::select! {
        status = child.wait() => {
            let description = match status {
                Ok(status) => describe_exit(status),
                Err(e) => format!("cannot wait for the engine: {e}"),
            };
            tracing::warn!(pid, exit = %description, "engine exited");
            let _ = exited.send(description).await;
        }
        Ok((grace, done)) = stop_rx => {
            let outcome = terminate_group(&mut child, pid, grace).await;
            let _ = done.send(outcome);
        }
    }
}

async fn terminate_group(child: &mut Child, pid: u32, grace: Duration) -> StopOutcome {
    let Ok(raw) = i32::try_from(pid) else { return StopOutcome::Clean };
    let group = Pid::from_raw(raw);
    tracing::info!(pid, grace_secs = grace.as_secs_f64(), "stopping engine: SIGTERM to its process group");
    if let Err(error) = killpg(group, Signal::SIGTERM) {
        tracing::warn!(pid, %error, "SIGTERM to the engine's group failed");
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => {
            tracing::info!(pid, exit = %status.map(describe_exit).unwrap_or_default(), "engine stopped");
            // Children of the engine that ignored SIGTERM must not outlive it.
            let _ = killpg(group, Signal::SIGKILL);
            StopOutcome::Clean
        }
        Err(_) => {
            tracing::warn!(pid, "engine did not stop within its grace period: SIGKILL to its process group");
            let _ = killpg(group, Signal::SIGKILL);
            let _ = child.wait().await;
            StopOutcome::Killed
        }
    }
}

/// "exit code 3", "signal 9 (SIGKILL)", "exited cleanly".
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => "exited cleanly".into(),
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("signal {sig} ({s})"),
            Err(_) => format!("signal {sig}"),
        },
        (None, None) => "unknown exit".into(),
    }
}

/// One tracing event per output line, under the `engine` target, cut at MAX_LOG_LINE_BYTES.
async fn forward_lines(stream: impl AsyncRead + Unpin, stream_name: &'static str) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        match read_line_bounded(&mut reader, &mut line, MAX_LOG_LINE_BYTES).await {
            Ok(0) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                tracing::info!(target: "engine", stream = stream_name, "{}", text.trim_end());
            }
            Err(error) => {
                tracing::warn!(target: "engine", stream = stream_name, %error, "cannot read engine output");
                return;
            }
        }
    }
}

/// Reads one line into `line`, keeping at most `max` bytes of it and discarding
/// the rest up to the newline. Returns the bytes consumed (0 at end of stream).
async fn read_line_bounded<R: AsyncBufReadExt + Unpin>(reader: &mut R, line: &mut Vec<u8>, max: usize) -> std::io::Result<usize> {
    let mut consumed = 0;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(consumed);
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1),
            None => (buf, buf.len()),
        };
        let room = max.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let found_newline = done > chunk.len();
        reader.consume(done);
        consumed += done;
        if found_newline {
            return Ok(consumed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_cut_and_the_rest_of_the_line_skipped() {
        let input = format!("{}\nshort\n", "x".repeat(10_000));
        let mut reader = BufReader::with_capacity(64, input.as_bytes());
        let mut line = vec![];
        assert_eq!(read_line_bounded(&mut reader, &mut line, 100).await.unwrap(), 10_001);
        assert_eq!(line.len(), 100);
        line.clear();
        read_line_bounded(&mut reader, &mut line, 100).await.unwrap();
        assert_eq!(line, b"short");
        line.clear();
        assert_eq!(read_line_bounded(&mut reader, &mut line, 100).await.unwrap(), 0);
    }

    #[test]
    fn exits_are_described() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe_exit(ExitStatus::from_raw(0)), "exited cleanly");
        assert_eq!(describe_exit(ExitStatus::from_raw(3 << 8)), "exit code 3");
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "signal 9 (SIGKILL)");
    }
}
