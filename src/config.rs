//! The agent's configuration: a strict TOML file plus environment overrides,
//! parsed and validated once at start, before anything touches a device, binds
//! a port or dials the control plane.
//!
//! Validation reports every problem at once, each naming its field and what was
//! expected, so an operator fixes a config in one round. The environment is a
//! parameter ([`EnvSource`]) so tests never touch the real process environment.

use crate::backoff::Backoff;
use crate::control::identity::Identity;
use crate::control::ControlPlaneSettings;
use crate::engine::EngineSettings;
use crate::fsutil::check_clean_absolute;
use crate::gc::GcSettings;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the config lives unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/machine-agent/config.toml";

/// Environment variables with this prefix override config fields; `__` separates
/// the section from the key: `MACHINE_AGENT__CONTROL_PLANE__URL=https://...`.
pub const ENV_PREFIX: &str = "MACHINE_AGENT__";

/// The real IMDS address; only tests and odd networks override it.
const DEFAULT_IMDS_URL: &str = "http://169.254.169.254";
/// Where a Fly machine's API socket lives.
const DEFAULT_FLY_API_SOCKET: &str = "/.fly/api";
/// The cloud-agent scrapes this port on every builder.
const DEFAULT_LISTEN: &str = "0.0.0.0:9911";
/// Long enough for a TLS handshake across regions, short enough to notice an outage.
const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;
/// Every unary call (usage, shutdown) gets this long.
const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 15;
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

// === the file's shape ===

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    control_plane: Option<RawControlPlane>,
    #[serde(default)]
    identity: RawIdentity,
    #[serde(default)]
    endpoints: RawEndpoints,
    #[serde(default)]
    volume: RawVolume,
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    engine: RawEngine,
    #[serde(default)]
    gc: RawGc,
}

/// Defaults are the planner's (14 days, 10 min, 10 % / 20 %); a task may override them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawGc {
    enabled: bool,
    retention_secs: u64,
    min_age_secs: u64,
    interval_secs: u64,
    pressure_check_secs: u64,
    free_bytes_start_below_percent: u8,
    free_bytes_stop_at_percent: u8,
    free_inodes_start_below_percent: u8,
    free_inodes_stop_at_percent: u8,
    batch: usize,
}

impl Default for RawGc {
    fn default() -> Self {
        use crate::gc::planner as p;
        Self {
            enabled: true,
            retention_secs: p::DEFAULT_RETENTION.as_secs(),
            min_age_secs: p::DEFAULT_MIN_AGE.as_secs(),
            interval_secs: 60,
            pressure_check_secs: 5,
            free_bytes_start_below_percent: p::DEFAULT_FREE_START_BELOW_PERCENT,
            free_bytes_stop_at_percent: p::DEFAULT_FREE_STOP_AT_PERCENT,
            free_inodes_start_below_percent: p::DEFAULT_FREE_START_BELOW_PERCENT,
            free_inodes_stop_at_percent: p::DEFAULT_FREE_STOP_AT_PERCENT,
            batch: crate::gc::executor::DEFAULT_BATCH,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControlPlane {
    url: String,
    ca_bundle: Option<PathBuf>,
    #[serde(default)]
    insecure: bool,
    #[serde(default = "default_connect_timeout_secs")]
    connect_timeout_secs: u64,
    #[serde(default = "default_request_timeout_secs")]
    request_timeout_secs: u64,
    #[serde(default = "default_backoff_initial_ms")]
    backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max_secs")]
    backoff_max_secs: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    mode: Option<String>,
    imds_url: Option<String>,
    fly_api_socket: Option<PathBuf>,
    fly_oidc_audience: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoints {
    #[serde(default = "default_listen")]
    listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    #[serde(default)]
    allowed_mount_prefixes: Vec<PathBuf>,
    #[serde(default = "default_device_wait_secs")]
    device_wait_secs: u64,
    #[serde(default = "default_unmount_timeout_secs")]
    unmount_timeout_secs: u64,
    #[serde(default)]
    kill_holders: bool,
    ephemeral_dir: Option<PathBuf>,
    ext4_bytes_per_inode: Option<u64>,
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
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    #[serde(default = "default_drain_timeout_secs")]
    drain_timeout_secs: u64,
    #[serde(default = "default_health_interval_ms")]
    health_interval_ms: u64,
    #[serde(default = "default_sample_interval_ms")]
    sample_interval_ms: u64,
    #[serde(default = "default_usage_interval_secs")]
    usage_interval_secs: u64,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    #[serde(default = "default_engine_binary")]
    binary: PathBuf,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default = "default_engine_stop_grace_secs")]
    stop_grace_secs: u64,
    #[serde(default = "default_engine_socket")]
    socket: PathBuf,
    #[serde(default = "default_engine_cgroup")]
    cgroup: String,
    #[serde(default = "default_engine_memory_reserve_bytes")]
    memory_reserve_bytes: u64,
    #[serde(default = "default_engine_ready_timeout_secs")]
    ready_timeout_secs: u64,
    #[serde(default = "default_engine_probe_interval_ms")]
    probe_interval_ms: u64,
    #[serde(default = "default_engine_probe_timeout_ms")]
    probe_timeout_ms: u64,
    #[serde(default = "default_engine_probe_failures")]
    probe_failures: u32,
    #[serde(default = "default_engine_restart_initial_ms")]
    restart_initial_ms: u64,
    #[serde(default = "default_engine_restart_max_ms")]
    restart_max_ms: u64,
    #[serde(default = "default_engine_restart_stable_secs")]
    restart_stable_secs: u64,
    #[serde(default = "default_engine_crash_loop_restarts")]
    crash_loop_restarts: u32,
    #[serde(default = "default_engine_crash_loop_window_secs")]
    crash_loop_window_secs: u64,
}

fn default_connect_timeout_secs() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_SECS
}
fn default_request_timeout_secs() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_SECS
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
fn default_drain_timeout_secs() -> u64 {
    DEFAULT_DRAIN_TIMEOUT_SECS
}
fn default_device_wait_secs() -> u64 {
    DEFAULT_DEVICE_WAIT_SECS
}
fn default_unmount_timeout_secs() -> u64 {
    DEFAULT_UNMOUNT_TIMEOUT_SECS
}
fn default_health_interval_ms() -> u64 {
    DEFAULT_HEALTH_INTERVAL_MS
}
fn default_sample_interval_ms() -> u64 {
    DEFAULT_SAMPLE_INTERVAL_MS
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

impl Default for RawEndpoints {
    fn default() -> Self {
        Self { listen: default_listen() }
    }
}
impl Default for RawAgent {
    fn default() -> Self {
        Self {
            drain_timeout_secs: default_drain_timeout_secs(),
            health_interval_ms: default_health_interval_ms(),
            sample_interval_ms: default_sample_interval_ms(),
            usage_interval_secs: default_usage_interval_secs(),
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
        }
    }
}

// === the validated config ===

/// The whole validated configuration. Built only by [`Config::parse`].
#[derive(Debug, Clone)]
pub struct Config {
    /// None in standalone-only setups: `run --standalone` needs no control plane.
    pub control_plane: Option<ControlPlaneSettings>,
    pub identity: Identity,
    pub listen: SocketAddr,
    pub allowed_mount_prefixes: Vec<PathBuf>,
    pub volume: crate::volume::manager::VolumeSettings,
    pub drain_timeout: Duration,
    pub health_interval: Duration,
    /// How often the host and the engine's process tree are sampled.
    pub sample_interval: Duration,
    pub usage_interval: Duration,
    pub state_dir: PathBuf,
    pub engine: EngineSettings,
    pub gc: GcSettings,
}

/// One invalid field: its dotted name and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub field: String,
    pub problem: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// Why a config was refused.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ConfigError {
    /// cannot read config file {path}: {source}
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// invalid config ({0} problem(s)):{1}
    Invalid(usize, ProblemList),
}

/// The problems of one config, printed one per line.
#[derive(Debug)]
pub struct ProblemList(pub Vec<ConfigProblem>);

impl fmt::Display for ProblemList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.0 {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn invalid(problems: Vec<ConfigProblem>) -> Self {
        Self::Invalid(problems.len(), ProblemList(problems))
    }

    /// The problems, for tests and `check`.
    pub fn problems(&self) -> &[ConfigProblem] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid(_, list) => &list.0,
        }
    }
}

/// Where overrides come from: the process environment in production, a map in tests.
pub trait EnvSource {
    /// Every (name, value) pair whose name starts with [`ENV_PREFIX`].
    fn overrides(&self) -> Vec<(String, String)>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn overrides(&self) -> Vec<(String, String)> {
        std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect()
    }
}

impl EnvSource for BTreeMap<String, String> {
    fn overrides(&self) -> Vec<(String, String)> {
        self.iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl Config {
    /// Reads and validates the file at `path` with overrides from `env`.
    pub fn load(path: &Path, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, env)
    }

    /// Parses and validates config text with overrides from `env`.
    pub fn parse(text: &str, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let mut problems = vec![];
        let mut table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                let field = e.span().map(|s| field_at(text, s.start)).unwrap_or_else(|| "<file>".into());
                return Err(ConfigError::invalid(vec![ConfigProblem { field, problem: one_line(e.message()) }]));
            }
        };
        apply_env_overrides(&mut table, env, &mut problems);
        let raw: RawConfig = match serde_path_to_error::deserialize(toml::Value::Table(table)) {
            Ok(raw) => raw,
            Err(e) => {
                let field = e.path().to_string();
                problems.push(ConfigProblem { field, problem: one_line(&e.inner().to_string()) });
                return Err(ConfigError::invalid(problems));
            }
        };
        let config = validate(raw, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::invalid(problems))
        }
    }
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

/// The key on the line where a syntax error sits, for a message that names the field.
fn field_at(text: &str, offset: usize) -> String {
    let line = text[..offset.min(text.len())].lines().last().unwrap_or("");
    let line_no = text[..offset.min(text.len())].matches('\n').count() + 1;
    match line.split('=').next().map(str::trim).filter(|k| !k.is_empty() && !k.starts_with('[')) {
        Some(key) => format!("{key} (line {line_no})"),
        None => format!("line {line_no}"),
    }
}

/// `MACHINE_AGENT__SECTION__KEY=value` sets `[section] key`. The value is read as a
/// TOML value when it is one (numbers, booleans, arrays), else as a string.
fn apply_env_overrides(table: &mut toml::Table, env: &dyn EnvSource, problems: &mut Vec<ConfigProblem>) {
    for (name, raw_value) in env.overrides() {
        let path: Vec<String> = name[ENV_PREFIX.len()..].split("__").map(|p| p.to_ascii_lowercase()).collect();
        let [section, key] = path.as_slice() else {
            problems.push(ConfigProblem { field: name.clone(), problem: format!("expected {ENV_PREFIX}<SECTION>__<KEY>") });
            continue;
        };
        let value =
            format!("v = {raw_value}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v")).unwrap_or_else(|| toml::Value::String(raw_value.clone()));
        let entry = table.entry(section.clone()).or_insert_with(|| toml::Value::Table(Default::default()));
        match entry.as_table_mut() {
            Some(section_table) => {
                section_table.insert(key.clone(), value);
            }
            None => problems.push(ConfigProblem { field: name.clone(), problem: format!("[{section}] is not a table") }),
        }
    }
}

fn validate(raw: RawConfig, problems: &mut Vec<ConfigProblem>) -> Config {
    let mut bad = |field: &str, problem: String| problems.push(ConfigProblem { field: field.into(), problem });

    let control_plane = raw.control_plane.map(|cp| {
        check_url(&cp.url, cp.insecure, &mut bad);
        if let Some(ca) = &cp.ca_bundle {
            if let Err(problem) = check_ca_bundle(ca) {
                bad("control_plane.ca_bundle", problem);
            }
        }
        check_range(&mut bad, "control_plane.connect_timeout_secs", cp.connect_timeout_secs, 1, 300);
        check_range(&mut bad, "control_plane.request_timeout_secs", cp.request_timeout_secs, 1, 600);
        check_range(&mut bad, "control_plane.backoff_initial_ms", cp.backoff_initial_ms, 1, 60_000);
        check_range(&mut bad, "control_plane.backoff_max_secs", cp.backoff_max_secs, 1, 3600);
        let backoff = Backoff::new(Duration::from_millis(cp.backoff_initial_ms), Duration::from_secs(cp.backoff_max_secs)).unwrap_or_else(|e| {
            bad("control_plane.backoff_initial_ms", format!("{e} (control_plane.backoff_max_secs)"));
            Backoff::default()
        });
        ControlPlaneSettings {
            url: cp.url,
            ca_bundle: cp.ca_bundle,
            insecure: cp.insecure,
            connect_timeout: Duration::from_secs(cp.connect_timeout_secs),
            request_timeout: Duration::from_secs(cp.request_timeout_secs),
            backoff,
        }
    });

    let identity = validate_identity(raw.identity, control_plane.is_some(), &mut bad);

    let listen = raw.endpoints.listen.parse().unwrap_or_else(|_| {
        bad("endpoints.listen", format!("expected an ip:port address such as \"0.0.0.0:9911\", got {:?}", raw.endpoints.listen));
        SocketAddr::from(([127, 0, 0, 1], 0))
    });

    if raw.volume.allowed_mount_prefixes.is_empty() {
        bad("volume.allowed_mount_prefixes", "expected at least one absolute directory, e.g. [\"/var/lib/buildkit\"]".into());
    }
    for (i, prefix) in raw.volume.allowed_mount_prefixes.iter().enumerate() {
        if let Err(problem) = check_clean_absolute(prefix) {
            bad(&format!("volume.allowed_mount_prefixes[{i}]"), problem);
        } else if prefix == Path::new("/") {
            bad(&format!("volume.allowed_mount_prefixes[{i}]"), "\"/\" would allow mounting over the system; name a directory".into());
        }
    }

    let v = &raw.volume;
    check_range(&mut bad, "volume.device_wait_secs", v.device_wait_secs, 1, 3600);
    check_range(&mut bad, "volume.unmount_timeout_secs", v.unmount_timeout_secs, 1, 600);
    if let Some(dir) = &v.ephemeral_dir {
        if let Err(problem) = check_clean_absolute(dir) {
            bad("volume.ephemeral_dir", problem);
        }
    }
    if let Some(ratio) = v.ext4_bytes_per_inode {
        // mkfs.ext4's own bounds; a power of two keeps it a whole number of blocks per inode.
        if !(1024..=67_108_864).contains(&ratio) || !ratio.is_power_of_two() {
            bad("volume.ext4_bytes_per_inode", format!("{ratio} is not a power of two from 1024 to 67108864"));
        }
    }

    let a = &raw.agent;
    check_range(&mut bad, "agent.drain_timeout_secs", a.drain_timeout_secs, 1, 3600);
    check_range(&mut bad, "agent.health_interval_ms", a.health_interval_ms, 100, 60_000);
    check_range(&mut bad, "agent.sample_interval_ms", a.sample_interval_ms, 200, 60_000);
    check_range(&mut bad, "agent.usage_interval_secs", a.usage_interval_secs, 1, 3600);
    if let Err(problem) = check_clean_absolute(&a.state_dir) {
        bad("agent.state_dir", problem);
    }

    let e = &raw.engine;
    if let Err(problem) = check_clean_absolute(&e.binary) {
        bad("engine.binary", problem);
    }
    check_range(&mut bad, "engine.stop_grace_secs", e.stop_grace_secs, 1, 600);
    if let Err(problem) = check_clean_absolute(&e.socket) {
        bad("engine.socket", problem);
    } else if e.socket.as_os_str().len() >= 108 {
        // sun_path holds 108 bytes including the NUL.
        bad("engine.socket", format!("a unix socket path must be shorter than 108 bytes, got {}", e.socket.as_os_str().len()));
    }
    if !e.cgroup.is_empty() && !is_cgroup_name(&e.cgroup) {
        bad("engine.cgroup", format!("expected one path component of [A-Za-z0-9._-] (or \"\" to run unconfined), got {:?}", e.cgroup));
    }
    check_range(&mut bad, "engine.memory_reserve_bytes", e.memory_reserve_bytes, 64 << 20, 1 << 40);
    check_range(&mut bad, "engine.ready_timeout_secs", e.ready_timeout_secs, 1, 3600);
    check_range(&mut bad, "engine.probe_interval_ms", e.probe_interval_ms, 100, 600_000);
    check_range(&mut bad, "engine.probe_timeout_ms", e.probe_timeout_ms, 10, 600_000);
    check_range(&mut bad, "engine.probe_failures", u64::from(e.probe_failures), 1, 100);
    check_range(&mut bad, "engine.restart_initial_ms", e.restart_initial_ms, 1, 600_000);
    check_range(&mut bad, "engine.restart_max_ms", e.restart_max_ms, e.restart_initial_ms.max(1), 3_600_000);
    check_range(&mut bad, "engine.restart_stable_secs", e.restart_stable_secs, 1, 86_400);
    check_range(&mut bad, "engine.crash_loop_restarts", u64::from(e.crash_loop_restarts), 1, 1000);
    check_range(&mut bad, "engine.crash_loop_window_secs", e.crash_loop_window_secs, 1, 86_400);
    if e.stop_grace_secs + v.unmount_timeout_secs >= a.drain_timeout_secs && a.drain_timeout_secs > 0 {
        bad(
            "agent.drain_timeout_secs",
            format!(
                "must exceed engine.stop_grace_secs + volume.unmount_timeout_secs ({}s) so the drain can stop the engine and unmount",
                e.stop_grace_secs + v.unmount_timeout_secs
            ),
        );
    }

    let g = &raw.gc;
    check_range(&mut bad, "gc.retention_secs", g.retention_secs, 1, 366 * 86_400);
    check_range(&mut bad, "gc.min_age_secs", g.min_age_secs, 0, g.retention_secs);
    check_range(&mut bad, "gc.interval_secs", g.interval_secs, 1, 86_400);
    check_range(&mut bad, "gc.pressure_check_secs", g.pressure_check_secs, 1, 3600);
    check_range(&mut bad, "gc.batch", g.batch as u64, 1, 10_000);
    for (what, start, stop) in [
        ("free_bytes", g.free_bytes_start_below_percent, g.free_bytes_stop_at_percent),
        ("free_inodes", g.free_inodes_start_below_percent, g.free_inodes_stop_at_percent),
    ] {
        check_range(&mut bad, &format!("gc.{what}_stop_at_percent"), u64::from(stop), 0, 100);
        if start > stop {
            bad(&format!("gc.{what}_start_below_percent"), format!("must not exceed gc.{what}_stop_at_percent ({stop}), got {start}"));
        }
    }

    Config {
        control_plane,
        identity,
        listen,
        volume: crate::volume::manager::VolumeSettings {
            sys_root: PathBuf::from("/"),
            device_wait: Duration::from_secs(raw.volume.device_wait_secs),
            unmount_timeout: Duration::from_secs(raw.volume.unmount_timeout_secs),
            kill_holders: raw.volume.kill_holders,
            ephemeral_dir: raw.volume.ephemeral_dir.clone(),
            ext4_bytes_per_inode: raw.volume.ext4_bytes_per_inode,
            system_paths: crate::volume::manager::default_system_paths(),
        },
        allowed_mount_prefixes: raw.volume.allowed_mount_prefixes,
        drain_timeout: Duration::from_secs(a.drain_timeout_secs),
        health_interval: Duration::from_millis(a.health_interval_ms),
        sample_interval: Duration::from_millis(a.sample_interval_ms),
        usage_interval: Duration::from_secs(a.usage_interval_secs),
        state_dir: raw.agent.state_dir,
        engine: EngineSettings {
            binary: e.binary.clone(),
            args: e.args.clone(),
            stop_grace: Duration::from_secs(e.stop_grace_secs),
            socket: e.socket.clone(),
            cgroup: Some(e.cgroup.clone()).filter(|c| !c.is_empty()),
            memory_reserve_bytes: e.memory_reserve_bytes,
            ready_timeout: Duration::from_secs(e.ready_timeout_secs),
            probe: crate::engine::supervise::ProbeSettings {
                interval: Duration::from_millis(e.probe_interval_ms),
                timeout: Duration::from_millis(e.probe_timeout_ms),
                failures: e.probe_failures,
            },
            restart: crate::engine::supervise::RestartPolicy {
                initial: Duration::from_millis(e.restart_initial_ms),
                max: Duration::from_millis(e.restart_max_ms),
                stable_after: Duration::from_secs(e.restart_stable_secs),
                crash_window: Duration::from_secs(e.crash_loop_window_secs),
                crash_limit: e.crash_loop_restarts,
            },
        },
        gc: GcSettings {
            enabled: g.enabled,
            retention: Duration::from_secs(g.retention_secs),
            min_age: Duration::from_secs(g.min_age_secs),
            interval: Duration::from_secs(g.interval_secs),
            pressure_check: Duration::from_secs(g.pressure_check_secs),
            free_bytes_start_below_percent: g.free_bytes_start_below_percent,
            free_bytes_stop_at_percent: g.free_bytes_stop_at_percent,
            free_inodes_start_below_percent: g.free_inodes_start_below_percent,
            free_inodes_stop_at_percent: g.free_inodes_stop_at_percent,
            batch: g.batch,
        },
    }
}

fn is_cgroup_name(name: &str) -> bool {
    !name.starts_with('.') && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn check_range(bad: &mut impl FnMut(&str, String), field: &str, value: u64, min: u64, max: u64) {
    if !(min..=max).contains(&value) {
        bad(field, format!("expected {min}..={max}, got {value}"));
    }
}

fn check_url(url: &str, insecure: bool, bad: &mut impl FnMut(&str, String)) {
    let field = "control_plane.url";
    let Ok(uri) = url.parse::<http::Uri>() else {
        bad(field, format!("expected a URL such as \"https://control.example.com\", got {url:?}"));
        return;
    };
    if uri.host().is_none_or(str::is_empty) {
        bad(field, format!("expected a URL with a host, got {url:?}"));
    }
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if insecure => {}
        Some("http") => bad(field, "plaintext http needs control_plane.insecure = true (development only)".into()),
        _ => bad(field, format!("expected an https:// URL, got {url:?}")),
    }
}

/// Reads a PEM CA bundle; it must hold at least one certificate.
pub fn check_ca_bundle(path: &Path) -> Result<(), String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let count =
        rustls_pemfile::certs(&mut pem.as_slice()).collect::<Result<Vec<_>, _>>().map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?.len();
    if count == 0 {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(())
}

fn validate_identity(raw: RawIdentity, has_control_plane: bool, bad: &mut impl FnMut(&str, String)) -> Identity {
    let Some(mode) = raw.mode.as_deref() else {
        if has_control_plane {
            bad("identity.mode", "required with [control_plane]: expected \"aws\", \"fly\" or \"static_token\"".into());
        }
        return Identity::None;
    };
    let unused = |bad: &mut dyn FnMut(&str, String), field: &str, set: bool| {
        if set {
            bad(field, format!("not used with identity.mode = {mode:?}; remove it"));
        }
    };
    match mode {
        "aws" => {
            unused(bad, "identity.fly_api_socket", raw.fly_api_socket.is_some());
            unused(bad, "identity.fly_oidc_audience", raw.fly_oidc_audience.is_some());
            unused(bad, "identity.token_file", raw.token_file.is_some());
            let imds_url = raw.imds_url.unwrap_or_else(|| DEFAULT_IMDS_URL.into());
            match imds_url.parse::<http::Uri>() {
                Ok(u) if u.scheme_str() == Some("http") && u.host().is_some() => {}
                _ => bad("identity.imds_url", format!("expected an http:// base URL such as {DEFAULT_IMDS_URL:?}, got {imds_url:?}")),
            }
            Identity::Aws { imds_url: imds_url.trim_end_matches('/').into() }
        }
        "fly" => {
            unused(bad, "identity.imds_url", raw.imds_url.is_some());
            unused(bad, "identity.token_file", raw.token_file.is_some());
            let api_socket = raw.fly_api_socket.unwrap_or_else(|| DEFAULT_FLY_API_SOCKET.into());
            if let Err(problem) = check_clean_absolute(&api_socket) {
                bad("identity.fly_api_socket", problem);
            }
            let audience = raw.fly_oidc_audience.unwrap_or_default();
            if audience.trim().is_empty() {
                bad("identity.fly_oidc_audience", "required with identity.mode = \"fly\": the audience the control plane expects".into());
            }
            Identity::Fly { api_socket, audience }
        }
        "static_token" => {
            unused(bad, "identity.imds_url", raw.imds_url.is_some());
            unused(bad, "identity.fly_api_socket", raw.fly_api_socket.is_some());
            unused(bad, "identity.fly_oidc_audience", raw.fly_oidc_audience.is_some());
            let Some(token_file) = raw.token_file else {
                bad("identity.token_file", "required with identity.mode = \"static_token\"".into());
                return Identity::None;
            };
            if let Err(problem) = check_token_file(&token_file) {
                bad("identity.token_file", problem);
            }
            Identity::StaticToken { token_file }
        }
        other => {
            bad("identity.mode", format!("expected \"aws\", \"fly\" or \"static_token\", got {other:?}"));
            Identity::None
        }
    }
}

/// The token file must exist, be private to its owner and hold a token.
fn check_token_file(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!("{} is readable by group or others (mode {:o}); expected 0600", path.display(), meta.permissions().mode() & 0o777));
    }
    let content = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if content.trim().is_empty() {
        return Err(format!("{} is empty; expected the bootstrap token", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const MINIMAL: &str = r#"
        [volume]
        allowed_mount_prefixes = ["/var/lib/buildkit"]
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, &env(&[])).unwrap();
        assert!(c.control_plane.is_none());
        assert_eq!(c.identity, Identity::None);
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.drain_timeout, Duration::from_secs(60));
        assert_eq!(c.health_interval, Duration::from_secs(1));
    }

    #[test]
    fn env_overrides_set_fields_with_types() {
        let c = Config::parse(
            MINIMAL,
            &env(&[("MACHINE_AGENT__AGENT__DRAIN_TIMEOUT_SECS", "90"), ("MACHINE_AGENT__ENDPOINTS__LISTEN", "127.0.0.1:1234"), ("UNRELATED", "x")]),
        )
        .unwrap();
        assert_eq!(c.drain_timeout, Duration::from_secs(90));
        assert_eq!(c.listen, "127.0.0.1:1234".parse().unwrap());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            [control_plane]
            url = "ftp://x"
            backoff_initial_ms = 0
            [identity]
            mode = "carrier-pigeon"
            [endpoints]
            listen = "nowhere"
            [volume]
            allowed_mount_prefixes = ["relative", "/a/../b", "/"]
            ext4_bytes_per_inode = 3000
            [agent]
            drain_timeout_secs = 0
            sample_interval_ms = 10
        "#;
        let err = Config::parse(text, &env(&[])).unwrap_err();
        let fields: Vec<_> = err.problems().iter().map(|p| p.field.as_str()).collect();
        for expected in [
            "control_plane.url",
            "control_plane.backoff_initial_ms",
            "identity.mode",
            "endpoints.listen",
            "volume.allowed_mount_prefixes[0]",
            "volume.allowed_mount_prefixes[1]",
            "volume.allowed_mount_prefixes[2]",
            "volume.ext4_bytes_per_inode",
            "agent.drain_timeout_secs",
            "agent.sample_interval_ms",
        ] {
            assert!(fields.contains(&expected), "{expected} missing from {fields:?}");
        }
    }

    #[test]
    fn type_errors_and_unknown_fields_name_the_field() {
        let err = Config::parse("[agent]\ndrain_timeout_secs = \"soon\"\n", &env(&[])).unwrap_err();
        assert_eq!(err.problems()[0].field, "agent.drain_timeout_secs");
        let err = Config::parse("[agent]\ndrain_timeout = 3\n", &env(&[])).unwrap_err();
        assert_eq!(err.problems()[0].field, "agent.drain_timeout");
        assert!(err.problems()[0].problem.contains("unknown field"));
    }

    #[test]
    fn plaintext_needs_the_insecure_switch() {
        let text = format!("{MINIMAL}\n[control_plane]\nurl = \"http://127.0.0.1:1\"\n[identity]\nmode = \"aws\"\n");
        let err = Config::parse(&text, &env(&[])).unwrap_err();
        assert_eq!(err.problems()[0].field, "control_plane.url");
        let c = Config::parse(&text, &env(&[("MACHINE_AGENT__CONTROL_PLANE__INSECURE", "true")])).unwrap();
        assert!(c.control_plane.unwrap().insecure);
    }

    #[test]
    fn token_file_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "abc").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!(
            "{MINIMAL}\n[control_plane]\nurl = \"https://cp.example\"\n[identity]\nmode = \"static_token\"\ntoken_file = {:?}\n",
            token.display().to_string()
        );
        let err = Config::parse(&text, &env(&[])).unwrap_err();
        assert_eq!(err.problems()[0].field, "identity.token_file");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Config::parse(&text, &env(&[])).is_ok());
    }
}
