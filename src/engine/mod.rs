//! The build engine: BuildKit's `buildkitd`, configured from the task,
//! confined to its memory cgroup, supervised, and spoken to over its own gRPC API.
//!
//! - [`render`] writes buildkitd.toml from typed structs, [`tls`] checks and
//!   writes the task's mTLS material, [`cgroup`] makes the engine's cgroup;
//! - [`supervise`] spawns, probes, restarts and stops the process;
//! - [`client`] is the native BuildKit client the probes and the GC use.

/// CDI devices for build steps: spec dirs, the task's devices checked, the NVIDIA spec generated.
pub mod cdi;
/// The engine's memory cgroup (v2 or v1).
pub mod cgroup;
/// BuildKit's own gRPC API (Control, health) over the engine's unix socket.
pub mod client;
/// The engine's output file and its tail into the agent's log.
pub mod log_file;
/// buildkitd.toml from typed structs.
pub mod render;
/// Restart policy and the supervision loop.
pub mod supervise;

use crate::task::BuildkitTask;
use cgroup::EngineCgroup;
use std::path::{Path, PathBuf};
use std::time::Duration;
use supervise::{EngineEvent, EngineSpec, Supervisor};
use tokio::sync::mpsc;

/// Why the engine could not be started; nothing was spawned.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum EngineError {
    /// the task has no mount to hold the engine's root
    NoRoot,
    /// {0}
    Tls(#[from] crate::task::tls::TlsError),
    /// {0}
    Render(#[from] render::RenderError),
    /// cannot write {path}: {source}
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// cannot read the machine's memory size: {0}
    Memory(String),
    /// engine cgroup: {0}
    Cgroup(#[from] cgroup::CgroupError),
    /// {0}
    Supervise(#[from] supervise::SuperviseError),
}

/// How the agent runs the engine, whatever the task.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub binary: PathBuf,
    /// Extra arguments after the agent's own `--config <file>`.
    pub args: Vec<String>,
    pub stop_grace: Duration,
    /// The unix socket the agent's BuildKit client dials.
    pub socket: PathBuf,
    /// The engine's cgroup name at the memory hierarchy's root; None runs it
    /// unconfined (development machines without a memory controller only).
    pub cgroup: Option<String>,
    /// Memory kept out of the engine's limit for the agent, sshd and the kernel.
    pub memory_reserve_bytes: u64,
    /// A started engine that is not ready within this long is killed and restarted.
    pub ready_timeout: Duration,
    pub probe: supervise::ProbeSettings,
    pub restart: supervise::RestartPolicy,
    /// CDI spec dirs and the NVIDIA spec.
    pub cdi: cdi::CdiSettings,
}

/// A supervised engine and what was made for it.
#[derive(Debug)]
pub struct StartedEngine {
    pub supervisor: Supervisor,
    pub cgroup: Option<EngineCgroup>,
    pub config_path: PathBuf,
}

/// Where the engine's files live, under the agent's state dir.
#[derive(Debug, Clone)]
pub struct EngineFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub tls_dir: PathBuf,
    pub pidfile: PathBuf,
    /// The engine's stdout and stderr.
    pub log: PathBuf,
    /// The GC settings the running agent uses, for `machine-agent gc --dry-run`.
    pub gc_run: PathBuf,
}

impl EngineFiles {
    pub fn under(state_dir: &Path) -> Self {
        let dir = state_dir.join("engine");
        Self {
            config: dir.join("buildkitd.toml"),
            tls_dir: dir.join("tls"),
            pidfile: dir.join("buildkitd.pid"),
            log: dir.join("buildkitd.log"),
            gc_run: dir.join("gc-run.json"),
            dir,
        }
    }
}

/// Writes the task's TLS material and buildkitd.toml (with BuildKit's own GC
/// rules, `backstop`), makes the engine's
/// cgroup, and starts supervising buildkitd with BuildKit's root on the task's
/// first mount (already prepared). Events about the engine arrive on `events`.
pub fn start(
    config: &EngineSettings,
    state_dir: &Path,
    task: &BuildkitTask,
    backstop: &[render::GcBackstopRule],
    events: mpsc::Sender<EngineEvent>,
) -> Result<StartedEngine, EngineError> {
    let root = task.mounts.first().map(|m| m.mount_path.clone()).ok_or(EngineError::NoRoot)?;
    let files = EngineFiles::under(state_dir);
    crate::fsutil::create_private_dir(&files.dir).map_err(|source| EngineError::Write { path: files.dir.clone(), source })?;

    let checked = crate::task::tls::check(&task.tls, std::time::SystemTime::now())?;
    let tls_paths = crate::task::tls::write(&files.tls_dir, &checked)?;

    let cgroup = match &config.cgroup {
        Some(name) => {
            let total = total_memory_bytes().map_err(EngineError::Memory)?;
            let limit = cgroup::engine_memory_limit(total, config.memory_reserve_bytes)?;
            Some(EngineCgroup::create(name, limit)?)
        }
        None => {
            tracing::warn!("engine.cgroup is empty: the engine runs without a memory limit of its own");
            None
        }
    };

    let layout = render::EngineLayout {
        root: root.clone(),
        unix_socket: config.socket.clone(),
        tls: tls_paths,
        cgroup_parent: cgroup.as_ref().map(|c| c.relative.clone()),
        cni: None,
        cdi_spec_dirs: config.cdi.spec_dirs.clone(),
    };
    let text = render::render(task, &layout, backstop)?;
    crate::fsutil::write_atomic(&files.config, text.as_bytes(), 0o600).map_err(|source| EngineError::Write { path: files.config.clone(), source })?;

    // buildkitd binds /run/buildkit/otel-grpc.sock whatever its root; keep it
    // next to the agent's socket so it never collides with another engine.
    let otel_socket = config.socket.with_file_name("otel-grpc.sock");
    let mut args = vec!["--config".to_string(), files.config.display().to_string(), "--otel-socket-path".to_string(), otel_socket.display().to_string()];
    args.extend(config.args.iter().cloned());
    let agent_env = trace_environment(task.trace_endpoint.as_deref());
    let digest = start_digest(&config.binary, &args, &task.engine_env, &agent_env, &text, task);
    let spec = EngineSpec {
        digest,
        binary: config.binary.clone(),
        args,
        env: task.engine_env.clone(),
        agent_env,
        root,
        socket: config.socket.clone(),
        pidfile: files.pidfile.clone(),
        log_file: files.log.clone(),
        cgroup: cgroup.clone(),
        ready_timeout: config.ready_timeout,
        probe: config.probe.clone(),
        restart: config.restart.clone(),
    };
    let supervisor = Supervisor::start(spec, events, config.stop_grace)?;
    Ok(StartedEngine { supervisor, cgroup, config_path: files.config })
}

/// The variables that send the engine's traces to `endpoint` (an entry of the
/// config's allow-list, which the task named). BuildKit's exporter
/// (util/tracing/detect/otlp.go) turns on when a traces endpoint is set and
/// speaks the protocol named; only the traces variables are set, so the
/// engine's metrics are not sent too (OTEL_EXPORTER_OTLP_ENDPOINT would do
/// both). An `http://` endpoint is plaintext gRPC, `https://` TLS.
pub fn trace_environment(endpoint: Option<&str>) -> Vec<(String, String)> {
    match endpoint {
        None => vec![],
        Some(endpoint) => vec![("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".into(), endpoint.into()), ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL".into(), "grpc".into())],
    }
}

/// SHA-256 (hex) of everything an engine is started with: binary, arguments,
/// environment, the rendered config, the TLS material and the mounts. Equal
/// digests mean a running engine already serves this task as this agent
/// would start it, so a restarted agent adopts it instead of restarting it.
pub fn start_digest(
    binary: &Path,
    args: &[String],
    env: &std::collections::BTreeMap<String, String>,
    agent_env: &[(String, String)],
    config_text: &str,
    task: &BuildkitTask,
) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut add = |part: &[u8]| {
        // Length-prefixed, so no two different inputs concatenate alike.
        ctx.update(&(part.len() as u64).to_le_bytes());
        ctx.update(part);
    };
    add(binary.as_os_str().as_encoded_bytes());
    for arg in args {
        add(arg.as_bytes());
    }
    // The agent's variables after the task's: none without a trace endpoint,
    // so an engine started without one keeps the digest it always had.
    for (name, value) in env.iter().chain(agent_env.iter().map(|(n, v)| (n, v))) {
        add(name.as_bytes());
        add(value.as_bytes());
    }
    add(config_text.as_bytes());
    add(task.tls.cert_pem.as_bytes());
    add(task.tls.key_pem.expose().as_bytes());
    add(task.tls.ca_pem.as_bytes());
    add(format!("{:?}", task.mounts).as_bytes());
    ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// MemTotal from /proc/meminfo, in bytes.
fn total_memory_bytes() -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    parse_mem_total(&text).ok_or_else(|| "no MemTotal line in /proc/meminfo".to_string())
}

/// `MemTotal:       24684084 kB` -> bytes.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

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

/// How a stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// Exited within the grace period after SIGTERM (or had already exited).
    Clean,
    /// Needed SIGKILL.
    Killed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_parses_in_bytes() {
        assert_eq!(parse_mem_total("MemTotal:       24684084 kB\nMemFree: 1 kB\n"), Some(24_684_084 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
    }
}
