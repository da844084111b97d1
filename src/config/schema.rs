//! The config file's shape: one `Raw*` struct per TOML table, strict
//! (`deny_unknown_fields`), with every default named here. Nothing here checks
//! a value; `validate` does, after the environment overrides are applied.

use serde::Deserialize;
use std::path::PathBuf;

/// The real IMDS address; only tests and odd networks override it.
pub(super) const DEFAULT_IMDS_URL: &str = "http://169.254.169.254";
/// Where a Fly machine's API socket lives.
pub(super) const DEFAULT_FLY_API_SOCKET: &str = "/.fly/api";
/// Loopback: a config that says nothing exposes nothing. A fleet image sets
/// the address the cloud-agent and Prometheus scrape (port 9911) on purpose
/// (examples/config-control-plane.toml).
pub(super) const DEFAULT_LISTEN: &str = "127.0.0.1:9911";
/// The detail view names the task, pids, paths and error texts: loopback only,
/// for an operator on the machine (`curl localhost:9912/readyz`).
pub(super) const DEFAULT_DETAIL_LISTEN: &str = "127.0.0.1:9912";
/// The cloud-agent and Prometheus need a connection or two each; 256 is far
/// above that and still bounds the fds and buffers a flood can take.
const DEFAULT_MAX_CONNECTIONS: u64 = 256;
/// A scraper sends its whole request head at once; 5 s covers a slow network
/// and closes a slowloris connection (or an idle keep-alive) soon.
const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 5;
/// Long enough for a TLS handshake across regions, short enough to notice an outage.
const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;
/// Every unary call (usage, shutdown) gets this long.
const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 15;
/// A silent task stream is noticed within a minute; the keepalive it asks for
/// (every 20 s) costs the control plane next to nothing per machine.
const DEFAULT_TASK_STREAM_IDLE_TIMEOUT_SECS: u64 = 60;
#[allow(clippy::cast_possible_truncation)] // 250 ms fits in u64
const DEFAULT_BACKOFF_INITIAL_MS: u64 = crate::backoff::DEFAULT_INITIAL.as_millis() as u64;
const DEFAULT_BACKOFF_MAX_SECS: u64 = crate::backoff::DEFAULT_MAX.as_secs();
/// Stopping buildkitd, syncing and unmounting a large cache fits in a minute;
/// the unit's TimeoutStopSec sits above this.
const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 60;
/// The protocol promises one health report a second.
const DEFAULT_HEALTH_INTERVAL_MS: u64 = 1000;
/// A sample costs well under a millisecond; every 5 s is fine-grained enough
/// for a memory climb that ends in an OOM kill, and cheap on an idle VM.
const DEFAULT_SAMPLE_INTERVAL_MS: u64 = 5000;
/// A build step's cgroup is read this often while one lives: a 50 ms step is
/// still read at least twice, and the figures of the last read (runc removes
/// the cgroup within milliseconds of the step's end) miss at most 20 ms.
const DEFAULT_STEP_POLL_INTERVAL_MS: u64 = 20;
/// Finished steps kept for the health stream (and /readyz) through an outage.
const DEFAULT_STEP_RECORDS_KEPT: u64 = crate::observe::status::DEFAULT_STEP_RECORDS as u64;
/// The protocol promises a usage report a minute.
const DEFAULT_USAGE_INTERVAL_SECS: u64 = 60;
/// An EBS attach usually lands within seconds; two minutes covers a slow API
/// without leaving a broken VM waiting for ever.
const DEFAULT_DEVICE_WAIT_SECS: u64 = 120;
/// Retrying EBUSY for half a minute lets a straggling process exit; the drain
/// deadline (60 s) must leave room for it.
const DEFAULT_UNMOUNT_TIMEOUT_SECS: u64 = 30;
const DEFAULT_STATE_DIR: &str = "/var/lib/machine-agent";
const DEFAULT_ENGINE_BINARY: &str = "/usr/local/bin/buildkitd";
/// buildkitd finishes in-flight solves on SIGTERM; give it that long before SIGKILL.
const DEFAULT_ENGINE_STOP_GRACE_SECS: u64 = 20;

/// The file as written: one table per section. A missing `[control_plane]` means
/// standalone only; any other missing table takes its defaults. Unknown fields
/// are refused, so a typo is a problem that names it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) control_plane: Option<RawControlPlane>,
    #[serde(default)]
    pub(super) identity: RawIdentity,
    #[serde(default)]
    pub(super) endpoints: RawEndpoints,
    #[serde(default)]
    pub(super) volume: RawVolume,
    #[serde(default)]
    pub(super) agent: RawAgent,
    #[serde(default)]
    pub(super) engine: RawEngine,
    #[serde(default)]
    pub(super) gc: RawGc,
}

/// Defaults are the planner's (14 days, 10 min, 10 % / 20 %); a task may override them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawGc {
    pub(super) enabled: bool,
    pub(super) retention_secs: u64,
    pub(super) min_age_secs: u64,
    pub(super) interval_secs: u64,
    /// How often free space and inodes are checked between runs; one of the two.
    pub(super) pressure_check_ms: Option<u64>,
    pub(super) pressure_check_secs: Option<u64>,
    pub(super) free_bytes_start_below_percent: u8,
    pub(super) free_bytes_stop_at_percent: u8,
    pub(super) free_inodes_start_below_percent: u8,
    pub(super) free_inodes_stop_at_percent: u8,
    pub(super) batch: usize,
    /// Retention waits this long at most for the kernel to call the clock synchronized.
    pub(super) clock_sync_wait_secs: u64,
    /// Wall-clock progress this far from monotonic progress between passes is a jump.
    pub(super) clock_jump_max_secs: u64,
}

impl Default for RawGc {
    fn default() -> Self {
        use crate::gc::planner as p;
        Self {
            enabled: true,
            retention_secs: p::DEFAULT_RETENTION.as_secs(),
            min_age_secs: p::DEFAULT_MIN_AGE.as_secs(),
            interval_secs: 60,
            pressure_check_ms: None,
            pressure_check_secs: None,
            free_bytes_start_below_percent: p::DEFAULT_FREE_START_BELOW_PERCENT,
            free_bytes_stop_at_percent: p::DEFAULT_FREE_STOP_AT_PERCENT,
            free_inodes_start_below_percent: p::DEFAULT_FREE_START_BELOW_PERCENT,
            free_inodes_stop_at_percent: p::DEFAULT_FREE_STOP_AT_PERCENT,
            batch: crate::gc::executor::DEFAULT_BATCH,
            // chrony and systemd-timesyncd synchronize a cloud VM within
            // seconds of boot; ten minutes covers a slow NTP server, and
            // retention (days) loses nothing by waiting that long.
            clock_sync_wait_secs: 600,
            // Slewing moves the clock by at most 0.5 ms a second (a 60 s pass
            // interval: 30 ms); a minute is far from both that and from any
            // retention, so anything beyond it is a step.
            clock_jump_max_secs: 60,
        }
    }
}

/// `[control_plane]`: absent in standalone-only setups.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControlPlane {
    pub(super) url: String,
    pub(super) ca_bundle: Option<PathBuf>,
    #[serde(default)]
    pub(super) insecure: bool,
    #[serde(default = "default_connect_timeout_secs")]
    pub(super) connect_timeout_secs: u64,
    #[serde(default = "default_request_timeout_secs")]
    pub(super) request_timeout_secs: u64,
    #[serde(default = "default_task_stream_idle_timeout_secs")]
    pub(super) task_stream_idle_timeout_secs: u64,
    #[serde(default = "default_backoff_initial_ms")]
    pub(super) backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max_secs")]
    pub(super) backoff_max_secs: u64,
}

/// `[identity]`: which fields apply depends on `mode`; validation checks that.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    pub(super) mode: Option<String>,
    pub(super) imds_url: Option<String>,
    pub(super) fly_api_socket: Option<PathBuf>,
    pub(super) fly_oidc_audience: Option<String>,
    pub(super) token_file: Option<PathBuf>,
}

/// `[endpoints]`: where the health and metrics endpoints listen, and their connection limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoints {
    #[serde(default = "default_listen")]
    pub(super) listen: String,
    #[serde(default = "default_detail_listen")]
    pub(super) detail_listen: String,
    #[serde(default = "default_max_connections")]
    pub(super) max_connections: u64,
    #[serde(default = "default_header_read_timeout_secs")]
    pub(super) header_read_timeout_secs: u64,
}

/// `[volume]`: where task mounts may go and how the cache volume is handled.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVolume {
    #[serde(default)]
    pub(super) allowed_mount_prefixes: Vec<PathBuf>,
    #[serde(default = "default_device_wait_secs")]
    pub(super) device_wait_secs: u64,
    #[serde(default = "default_unmount_timeout_secs")]
    pub(super) unmount_timeout_secs: u64,
    #[serde(default)]
    pub(super) kill_holders: bool,
    pub(super) ephemeral_dir: Option<PathBuf>,
    pub(super) ext4_bytes_per_inode: Option<u64>,
    /// Unset: `<agent.state_dir>/volumes` (see validate.rs).
    pub(super) allowed_backing_dirs: Option<Vec<PathBuf>>,
    /// auto, krbd, nbd or fuse.
    #[serde(default = "default_rbd_mapper")]
    pub(super) rbd_mapper: String,
    /// Unset: the host's /etc/machine-id (see validate.rs).
    pub(super) owner_id: Option<String>,
    /// Committed snapshots a primary RBD image keeps (1..=64).
    #[serde(default = "default_keep_snapshots")]
    pub(super) keep_snapshots: u32,
}

impl Default for RawVolume {
    fn default() -> Self {
        Self {
            allowed_mount_prefixes: vec![],
            device_wait_secs: default_device_wait_secs(),
            unmount_timeout_secs: default_unmount_timeout_secs(),
            kill_holders: false,
            ephemeral_dir: None,
            ext4_bytes_per_inode: None,
            allowed_backing_dirs: None,
            rbd_mapper: default_rbd_mapper(),
            owner_id: None,
            keep_snapshots: default_keep_snapshots(),
        }
    }
}

/// `[agent]`: the agent's own intervals, drain deadline and state directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    #[serde(default = "default_drain_timeout_secs")]
    pub(super) drain_timeout_secs: u64,
    #[serde(default = "default_health_interval_ms")]
    pub(super) health_interval_ms: u64,
    #[serde(default = "default_health_cpu_threshold_percent")]
    pub(super) health_cpu_threshold_percent: f64,
    #[serde(default = "default_health_bytes_threshold_percent")]
    pub(super) health_bytes_threshold_percent: f64,
    #[serde(default = "default_sample_interval_ms")]
    pub(super) sample_interval_ms: u64,
    #[serde(default = "default_usage_interval_secs")]
    pub(super) usage_interval_secs: u64,
    #[serde(default = "default_step_poll_interval_ms")]
    pub(super) step_poll_interval_ms: u64,
    #[serde(default = "default_step_records_kept")]
    pub(super) step_records_kept: u64,
    #[serde(default = "default_state_dir")]
    pub(super) state_dir: PathBuf,
}

/// `[engine]`: how buildkitd is started, probed, restarted and stopped.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEngine {
    #[serde(default = "default_engine_binary")]
    pub(super) binary: PathBuf,
    #[serde(default)]
    pub(super) args: Vec<String>,
    #[serde(default = "default_engine_stop_grace_secs")]
    pub(super) stop_grace_secs: u64,
    #[serde(default = "default_engine_socket")]
    pub(super) socket: PathBuf,
    #[serde(default = "default_engine_cgroup")]
    pub(super) cgroup: String,
    #[serde(default = "default_engine_memory_reserve_bytes")]
    pub(super) memory_reserve_bytes: u64,
    #[serde(default = "default_engine_ready_timeout_secs")]
    pub(super) ready_timeout_secs: u64,
    #[serde(default = "default_engine_probe_interval_ms")]
    pub(super) probe_interval_ms: u64,
    #[serde(default = "default_engine_probe_timeout_ms")]
    pub(super) probe_timeout_ms: u64,
    #[serde(default = "default_engine_probe_failures")]
    pub(super) probe_failures: u32,
    #[serde(default = "default_engine_restart_initial_ms")]
    pub(super) restart_initial_ms: u64,
    #[serde(default = "default_engine_restart_max_ms")]
    pub(super) restart_max_ms: u64,
    #[serde(default = "default_engine_restart_stable_secs")]
    pub(super) restart_stable_secs: u64,
    #[serde(default = "default_engine_crash_loop_restarts")]
    pub(super) crash_loop_restarts: u32,
    #[serde(default = "default_engine_crash_loop_window_secs")]
    pub(super) crash_loop_window_secs: u64,
    /// Engine variables a task may set besides the proxy settings; empty by default.
    #[serde(default)]
    pub(super) allowed_task_env: Vec<String>,
    /// OTLP/gRPC collectors a task may send the engine's traces to; none by default.
    #[serde(default)]
    pub(super) trace_endpoints: Vec<String>,
    /// Where the engine looks for CDI specs; empty disables CDI devices.
    #[serde(default = "default_cdi_spec_dirs")]
    pub(super) cdi_spec_dirs: Vec<PathBuf>,
    /// Where the agent writes the NVIDIA spec it generates; "" never generates one.
    #[serde(default = "default_cdi_nvidia_spec")]
    pub(super) cdi_nvidia_spec: PathBuf,
    /// The NVIDIA Container Toolkit's CLI.
    #[serde(default = "default_nvidia_ctk")]
    pub(super) nvidia_ctk: PathBuf,
}

// serde's `default = "..."` takes a function, so each default gets one.
fn default_connect_timeout_secs() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_SECS
}
fn default_request_timeout_secs() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_SECS
}
fn default_task_stream_idle_timeout_secs() -> u64 {
    DEFAULT_TASK_STREAM_IDLE_TIMEOUT_SECS
}
fn default_backoff_initial_ms() -> u64 {
    DEFAULT_BACKOFF_INITIAL_MS
}
fn default_backoff_max_secs() -> u64 {
    DEFAULT_BACKOFF_MAX_SECS
}
fn default_listen() -> String {
    DEFAULT_LISTEN.into()
}
fn default_detail_listen() -> String {
    DEFAULT_DETAIL_LISTEN.into()
}
fn default_max_connections() -> u64 {
    DEFAULT_MAX_CONNECTIONS
}
fn default_header_read_timeout_secs() -> u64 {
    DEFAULT_HEADER_READ_TIMEOUT_SECS
}
fn default_drain_timeout_secs() -> u64 {
    DEFAULT_DRAIN_TIMEOUT_SECS
}
fn default_device_wait_secs() -> u64 {
    DEFAULT_DEVICE_WAIT_SECS
}
fn default_keep_snapshots() -> u32 {
    crate::volume::rbd::DEFAULT_KEEP_SNAPSHOTS
}

fn default_rbd_mapper() -> String {
    // The first mapper the machine offers: krbd where the module loads, else rbd-nbd, else rbd-fuse.
    "auto".into()
}
fn default_unmount_timeout_secs() -> u64 {
    DEFAULT_UNMOUNT_TIMEOUT_SECS
}
fn default_health_cpu_threshold_percent() -> f64 {
    crate::control::health_delta::Thresholds::default().cpu_percent
}

fn default_health_bytes_threshold_percent() -> f64 {
    crate::control::health_delta::Thresholds::default().bytes_percent
}

fn default_health_interval_ms() -> u64 {
    DEFAULT_HEALTH_INTERVAL_MS
}
fn default_sample_interval_ms() -> u64 {
    DEFAULT_SAMPLE_INTERVAL_MS
}
fn default_step_poll_interval_ms() -> u64 {
    DEFAULT_STEP_POLL_INTERVAL_MS
}
fn default_step_records_kept() -> u64 {
    DEFAULT_STEP_RECORDS_KEPT
}
fn default_usage_interval_secs() -> u64 {
    DEFAULT_USAGE_INTERVAL_SECS
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_engine_binary() -> PathBuf {
    DEFAULT_ENGINE_BINARY.into()
}
fn default_engine_stop_grace_secs() -> u64 {
    DEFAULT_ENGINE_STOP_GRACE_SECS
}
fn default_engine_socket() -> PathBuf {
    "/run/machine-agent/buildkitd.sock".into()
}
fn default_engine_cgroup() -> String {
    "machine-agent-engine".into()
}
fn default_engine_memory_reserve_bytes() -> u64 {
    1 << 30
}
fn default_engine_ready_timeout_secs() -> u64 {
    120
}
fn default_engine_probe_interval_ms() -> u64 {
    5_000
}
fn default_engine_probe_timeout_ms() -> u64 {
    3_000
}
fn default_engine_probe_failures() -> u32 {
    3
}
fn default_engine_restart_initial_ms() -> u64 {
    500
}
fn default_engine_restart_max_ms() -> u64 {
    60_000
}
fn default_engine_restart_stable_secs() -> u64 {
    300
}
fn default_engine_crash_loop_restarts() -> u32 {
    5
}
fn default_engine_crash_loop_window_secs() -> u64 {
    600
}
/// The CDI standard's two places (and BuildKit's defaults): static specs an
/// image ships in /etc/cdi, specs generated at boot in /var/run/cdi.
fn default_cdi_spec_dirs() -> Vec<PathBuf> {
    vec!["/etc/cdi".into(), "/var/run/cdi".into()]
}
/// Generated at every start: the driver (and so the spec) may change with an
/// image update, and /var/run is emptied at boot so a stale spec never lingers.
fn default_cdi_nvidia_spec() -> PathBuf {
    "/var/run/cdi/nvidia.yaml".into()
}
/// Where the nvidia-container-toolkit-base package puts it.
fn default_nvidia_ctk() -> PathBuf {
    "/usr/bin/nvidia-ctk".into()
}

impl Default for RawEndpoints {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            detail_listen: default_detail_listen(),
            max_connections: default_max_connections(),
            header_read_timeout_secs: default_header_read_timeout_secs(),
        }
    }
}
impl Default for RawAgent {
    fn default() -> Self {
        Self {
            drain_timeout_secs: default_drain_timeout_secs(),
            health_interval_ms: default_health_interval_ms(),
            health_cpu_threshold_percent: default_health_cpu_threshold_percent(),
            health_bytes_threshold_percent: default_health_bytes_threshold_percent(),
            sample_interval_ms: default_sample_interval_ms(),
            usage_interval_secs: default_usage_interval_secs(),
            step_poll_interval_ms: default_step_poll_interval_ms(),
            step_records_kept: default_step_records_kept(),
            state_dir: default_state_dir(),
        }
    }
}
impl Default for RawEngine {
    fn default() -> Self {
        Self {
            binary: default_engine_binary(),
            args: vec![],
            stop_grace_secs: default_engine_stop_grace_secs(),
            socket: default_engine_socket(),
            cgroup: default_engine_cgroup(),
            memory_reserve_bytes: default_engine_memory_reserve_bytes(),
            ready_timeout_secs: default_engine_ready_timeout_secs(),
            probe_interval_ms: default_engine_probe_interval_ms(),
            probe_timeout_ms: default_engine_probe_timeout_ms(),
            probe_failures: default_engine_probe_failures(),
            restart_initial_ms: default_engine_restart_initial_ms(),
            restart_max_ms: default_engine_restart_max_ms(),
            restart_stable_secs: default_engine_restart_stable_secs(),
            crash_loop_restarts: default_engine_crash_loop_restarts(),
            crash_loop_window_secs: default_engine_crash_loop_window_secs(),
            allowed_task_env: vec![],
            trace_endpoints: vec![],
            cdi_spec_dirs: default_cdi_spec_dirs(),
            cdi_nvidia_spec: default_cdi_nvidia_spec(),
            nvidia_ctk: default_nvidia_ctk(),
        }
    }
}
