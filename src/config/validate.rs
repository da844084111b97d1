//! Validation: every check on the raw config, each reporting into one problem
//! list so an operator sees them all at once, and the settings each capability
//! gets, built from what passed.
//!
//! [`validate`] reads as the list of checks, in the order problems are
//! reported. Each check takes `bad`, which records one problem (the dotted
//! field and what was expected), and returns the settings it builds, if any.

use super::schema::{
    RawAgent, RawConfig, RawControlPlane, RawEndpoints, RawEngine, RawGc, RawIdentity, RawVolume, DEFAULT_DETAIL_LISTEN, DEFAULT_FLY_API_SOCKET,
    DEFAULT_IMDS_URL, DEFAULT_LISTEN,
};
use super::{Config, ConfigProblem};
use crate::backoff::Backoff;
use crate::control::identity::{Identity, MAX_TOKEN_FILE_BYTES};
use crate::control::{ControlPlaneSettings, MAX_CA_BUNDLE_BYTES};
use crate::engine::cdi::CdiSettings;
use crate::engine::supervise::is_agent_owned_engine_variable;
use crate::engine::supervise::{ProbeSettings, RestartPolicy};
use crate::engine::EngineSettings;
use crate::fsutil::{check_clean_absolute, excerpt, read_regular_file, read_regular_text};
use crate::gc::GcSettings;
use crate::observe::connections::ConnectionLimits;
use crate::observe::http::EndpointSettings;
use crate::task::rbd::{is_owner_id, MAX_OWNER_ID_BYTES};
use crate::task::{MAX_ENGINE_ENV, MAX_ENV_NAME_BYTES};
use crate::volume::manager::{default_system_paths, VolumeSettings};
use crate::volume::rbd::{MapperChoice, RbdSettings};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where, under the state dir, the volume manager records an intent to format while mkfs runs.
const FORMAT_INTENT_DIR: &str = "volume/format-intents";

/// Checks every field, reporting each problem into `problems`, and builds the
/// config from what passed (placeholders where a field was refused).
pub(super) fn validate(raw: RawConfig, problems: &mut Vec<ConfigProblem>) -> Config {
    let bad = &mut |field: &str, problem: String| problems.push(ConfigProblem { field: field.into(), problem });

    let control_plane = raw.control_plane.map(|cp| control_plane_settings(cp, bad));
    let identity = identity(raw.identity, control_plane.is_some(), bad);
    let endpoints = endpoint_settings(&raw.endpoints, bad);
    allowed_mount_prefixes(&raw.volume.allowed_mount_prefixes, bad);
    let volume = volume_settings(&raw.volume, &raw.agent.state_dir, bad);
    agent_intervals(&raw.agent, bad);
    state_dir(&raw.agent.state_dir, bad);
    let engine = engine_settings(&raw.engine, bad);
    allowed_task_env(&raw.engine.allowed_task_env, bad);
    trace_endpoints(&raw.engine.trace_endpoints, bad);
    drain_covers_stop_and_unmount(&raw.agent, &raw.engine, &raw.volume, bad);
    let gc = gc_settings(&raw.gc, bad);
    watermarks_ordered(&raw.gc, bad);

    let a = raw.agent;
    Config {
        control_plane,
        identity,
        endpoints,
        volume,
        allowed_mount_prefixes: raw.volume.allowed_mount_prefixes,
        drain_timeout: Duration::from_secs(a.drain_timeout_secs),
        health_interval: Duration::from_millis(a.health_interval_ms),
        health_thresholds: crate::control::health_delta::Thresholds {
            cpu_percent: a.health_cpu_threshold_percent,
            bytes_percent: a.health_bytes_threshold_percent,
        },
        sample_interval: Duration::from_millis(a.sample_interval_ms),
        usage_interval: Duration::from_secs(a.usage_interval_secs),
        step_poll_interval: Duration::from_millis(a.step_poll_interval_ms),
        step_records_kept: usize::try_from(a.step_records_kept).unwrap_or(usize::MAX),
        state_dir: a.state_dir,
        engine,
        allowed_task_env: raw.engine.allowed_task_env.iter().cloned().collect(),
        trace_endpoints: raw.engine.trace_endpoints.iter().cloned().collect(),
        gc,
    }
}

/// `[control_plane]`: the URL, the CA bundle, the timeouts and the reconnect backoff.
fn control_plane_settings(cp: RawControlPlane, bad: &mut impl FnMut(&str, String)) -> ControlPlaneSettings {
    check_url(&cp.url, cp.insecure, bad);
    if let Some(ca) = &cp.ca_bundle {
        if let Err(problem) = check_ca_bundle(ca) {
            bad("control_plane.ca_bundle", problem);
        }
    }
    check_range(bad, "control_plane.connect_timeout_secs", cp.connect_timeout_secs, 1, 300);
    check_range(bad, "control_plane.request_timeout_secs", cp.request_timeout_secs, 1, 600);
    // Below 3 s the keepalive asked for (a third of it) would round to nothing.
    check_range(bad, "control_plane.task_stream_idle_timeout_secs", cp.task_stream_idle_timeout_secs, 3, 3600);
    check_range(bad, "control_plane.backoff_initial_ms", cp.backoff_initial_ms, 1, 60_000);
    check_range(bad, "control_plane.backoff_max_secs", cp.backoff_max_secs, 1, 3600);
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
        task_stream_idle_timeout: Duration::from_secs(cp.task_stream_idle_timeout_secs),
        backoff,
    }
}

/// `[identity]`: the mode's own fields are valid, and no other mode's are set.
fn identity(raw: RawIdentity, has_control_plane: bool, bad: &mut impl FnMut(&str, String)) -> Identity {
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

/// `[endpoints]`: two ip:port addresses that can both be bound, and the connection limits.
fn endpoint_settings(raw: &RawEndpoints, bad: &mut impl FnMut(&str, String)) -> EndpointSettings {
    let listen = listen_address("endpoints.listen", &raw.listen, DEFAULT_LISTEN, bad);
    let detail_listen = listen_address("endpoints.detail_listen", &raw.detail_listen, DEFAULT_DETAIL_LISTEN, bad);
    if listen.port() != 0
        && listen.port() == detail_listen.port()
        && (listen.ip() == detail_listen.ip() || listen.ip().is_unspecified() || detail_listen.ip().is_unspecified())
    {
        bad("endpoints.detail_listen", format!("{detail_listen} overlaps endpoints.listen ({listen}): give the detail view its own port"));
    }
    check_range(bad, "endpoints.max_connections", raw.max_connections, 4, 65_536);
    check_range(bad, "endpoints.header_read_timeout_secs", raw.header_read_timeout_secs, 1, 300);
    EndpointSettings {
        listen,
        detail_listen,
        // Placeholders past a refused value: the config is not used then.
        limits: ConnectionLimits {
            max_connections: usize::try_from(raw.max_connections).unwrap_or(usize::MAX).max(1),
            header_read_timeout: Duration::from_secs(raw.header_read_timeout_secs.max(1)),
        },
    }
}

/// One endpoints address: an ip:port.
fn listen_address(field: &str, listen: &str, example: &str, bad: &mut impl FnMut(&str, String)) -> SocketAddr {
    listen.parse().unwrap_or_else(|_| {
        bad(field, format!("expected an ip:port address such as {example:?}, got {listen:?}"));
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

/// `volume.allowed_mount_prefixes`: at least one, each a clean absolute directory other than `/`.
fn allowed_mount_prefixes(prefixes: &[PathBuf], bad: &mut impl FnMut(&str, String)) {
    if prefixes.is_empty() {
        bad("volume.allowed_mount_prefixes", "expected at least one absolute directory, e.g. [\"/var/lib/buildkit\"]".into());
    }
    for (i, prefix) in prefixes.iter().enumerate() {
        if let Err(problem) = check_clean_absolute(prefix) {
            bad(&format!("volume.allowed_mount_prefixes[{i}]"), problem);
        } else if prefix == Path::new("/") {
            bad(&format!("volume.allowed_mount_prefixes[{i}]"), "\"/\" would allow mounting over the system; name a directory".into());
        }
    }
}

/// Where backing files live when the config does not say: a directory of the
/// agent's own, created 0700 with the state dir, so nobody else writes there
/// and the quickstart's file-backed volume works without a setting.
pub const DEFAULT_BACKING_SUBDIR: &str = "volumes";

/// `volume.allowed_backing_dirs`: clean absolute directories other than `/`;
/// unset means `<state_dir>/volumes`, `[]` means no file-backed volumes.
fn allowed_backing_dirs(dirs: Option<&[PathBuf]>, state_dir: &Path, bad: &mut impl FnMut(&str, String)) -> Vec<PathBuf> {
    let Some(dirs) = dirs else { return vec![state_dir.join(DEFAULT_BACKING_SUBDIR)] };
    for (i, dir) in dirs.iter().enumerate() {
        if let Err(problem) = check_clean_absolute(dir) {
            bad(&format!("volume.allowed_backing_dirs[{i}]"), problem);
        } else if dir == Path::new("/") {
            bad(&format!("volume.allowed_backing_dirs[{i}]"), "\"/\" would let a task grow and format any file; name a directory".into());
        } else if ["/dev", "/proc", "/sys", "/run", "/etc", "/boot", "/usr"].iter().any(|system| dir.starts_with(system) || Path::new(system).starts_with(dir))
        {
            bad(&format!("volume.allowed_backing_dirs[{i}]"), format!("{} is or holds a system directory; name a directory of its own", dir.display()));
        }
    }
    dirs.to_vec()
}

/// The rest of `[volume]`: the device wait, the unmount timeout, the ephemeral dir and the inode ratio.
fn volume_settings(v: &RawVolume, state_dir: &Path, bad: &mut impl FnMut(&str, String)) -> VolumeSettings {
    check_range(bad, "volume.device_wait_secs", v.device_wait_secs, 1, 3600);
    check_range(bad, "volume.unmount_timeout_secs", v.unmount_timeout_secs, 1, 600);
    check_range(bad, "volume.keep_snapshots", u64::from(v.keep_snapshots), 1, 64);
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
    VolumeSettings {
        sys_root: PathBuf::from("/"),
        device_wait: Duration::from_secs(v.device_wait_secs),
        unmount_timeout: Duration::from_secs(v.unmount_timeout_secs),
        kill_holders: v.kill_holders,
        ephemeral_dir: v.ephemeral_dir.clone(),
        ext4_bytes_per_inode: v.ext4_bytes_per_inode,
        system_paths: default_system_paths(),
        intent_dir: state_dir.join(FORMAT_INTENT_DIR),
        allowed_backing_dirs: allowed_backing_dirs(v.allowed_backing_dirs.as_deref(), state_dir, bad),
        rbd: RbdSettings {
            mapper: rbd_mapper(&v.rbd_mapper, bad),
            owner_id: rbd_owner_id(v.owner_id.as_deref(), || read_machine_id(Path::new(MACHINE_ID_PATH)), bad),
            dir: state_dir.join(RBD_SUBDIR),
            keep_snapshots: v.keep_snapshots,
        },
    }
}

/// Per-mount keyrings, confs and fuse mount points, under the state dir (0700).
const RBD_SUBDIR: &str = "rbd";
/// systemd's stable host id: the default owner id on image locks.
const MACHINE_ID_PATH: &str = "/etc/machine-id";
/// A machine-id is 33 bytes; a larger file is not one.
const MAX_MACHINE_ID_BYTES: u64 = 4096;

/// `volume.rbd_mapper`: which mapper turns an image into a block device. Pure.
fn parse_mapper_choice(name: &str) -> Option<MapperChoice> {
    match name {
        "auto" => Some(MapperChoice::Auto),
        "krbd" => Some(MapperChoice::Krbd),
        "nbd" => Some(MapperChoice::Nbd),
        "fuse" => Some(MapperChoice::Fuse),
        _ => None,
    }
}

fn rbd_mapper(name: &str, bad: &mut impl FnMut(&str, String)) -> MapperChoice {
    parse_mapper_choice(name).unwrap_or_else(|| {
        bad("volume.rbd_mapper", format!("expected \"auto\", \"krbd\", \"nbd\" or \"fuse\", got {:?}", excerpt(name, 64)));
        MapperChoice::Auto
    })
}

/// `volume.owner_id`: a configured id must be a valid owner id. Unset, the
/// host's machine-id is used if it is one; if not, the id stays empty and is
/// no startup error (a machine without RBD volumes needs none): preparing an
/// RBD volume then refuses, saying to set `volume.owner_id`. `machine_id` is
/// called only when nothing is configured. Pure but for `machine_id`.
pub(super) fn rbd_owner_id(configured: Option<&str>, machine_id: impl FnOnce() -> Option<String>, bad: &mut impl FnMut(&str, String)) -> String {
    match configured {
        Some(id) if is_owner_id(id) => id.to_string(),
        Some(id) => {
            bad("volume.owner_id", format!("expected 1..={MAX_OWNER_ID_BYTES} bytes of [A-Za-z0-9._:-], got {:?}", excerpt(id, 64)));
            String::new()
        }
        None => machine_id().filter(|id| is_owner_id(id)).unwrap_or_default(),
    }
}

/// The host's machine-id, trimmed; None if it cannot be read.
fn read_machine_id(path: &Path) -> Option<String> {
    read_regular_text(path, MAX_MACHINE_ID_BYTES).ok().map(|text| text.trim().to_string())
}

/// `[agent]`'s drain deadline and intervals.
fn agent_intervals(a: &RawAgent, bad: &mut impl FnMut(&str, String)) {
    check_range(bad, "agent.drain_timeout_secs", a.drain_timeout_secs, 1, 3600);
    check_range(bad, "agent.health_interval_ms", a.health_interval_ms, 100, 60_000);
    check_range(bad, "agent.sample_interval_ms", a.sample_interval_ms, 200, 60_000);
    check_range(bad, "agent.usage_interval_secs", a.usage_interval_secs, 1, 3600);
    for (field, value) in
        [("agent.health_cpu_threshold_percent", a.health_cpu_threshold_percent), ("agent.health_bytes_threshold_percent", a.health_bytes_threshold_percent)]
    {
        if !(0.0..=100.0).contains(&value) {
            bad(field, format!("expected a percentage from 0 to 100, got {value}"));
        }
    }
    // Below 5 ms the poll costs more than it sees; above a second a short step's figures are a guess.
    check_range(bad, "agent.step_poll_interval_ms", a.step_poll_interval_ms, 5, 1000);
    // At least a build's worth; at most about 13 MiB of records.
    check_range(bad, "agent.step_records_kept", a.step_records_kept, 16, 65_536);
}

/// `agent.state_dir`: a clean absolute path.
fn state_dir(dir: &Path, bad: &mut impl FnMut(&str, String)) {
    if let Err(problem) = check_clean_absolute(dir) {
        bad("agent.state_dir", problem);
    }
}

/// `[engine]`: the binary, the socket, the cgroup, and the probe and restart schedule.
fn engine_settings(e: &RawEngine, bad: &mut impl FnMut(&str, String)) -> EngineSettings {
    if let Err(problem) = check_clean_absolute(&e.binary) {
        bad("engine.binary", problem);
    }
    check_range(bad, "engine.stop_grace_secs", e.stop_grace_secs, 1, 600);
    if let Err(problem) = check_clean_absolute(&e.socket) {
        bad("engine.socket", problem);
    } else if e.socket.as_os_str().len() >= 108 {
        // sun_path holds 108 bytes including the NUL.
        bad("engine.socket", format!("a unix socket path must be shorter than 108 bytes, got {}", e.socket.as_os_str().len()));
    }
    if !e.cgroup.is_empty() && !is_cgroup_name(&e.cgroup) {
        bad("engine.cgroup", format!("expected one path component of [A-Za-z0-9._-] (or \"\" to run unconfined), got {:?}", e.cgroup));
    }
    check_range(bad, "engine.memory_reserve_bytes", e.memory_reserve_bytes, 64 << 20, 1 << 40);
    check_range(bad, "engine.ready_timeout_secs", e.ready_timeout_secs, 1, 3600);
    check_range(bad, "engine.probe_interval_ms", e.probe_interval_ms, 100, 600_000);
    check_range(bad, "engine.probe_timeout_ms", e.probe_timeout_ms, 10, 600_000);
    check_range(bad, "engine.probe_failures", u64::from(e.probe_failures), 1, 100);
    check_range(bad, "engine.restart_initial_ms", e.restart_initial_ms, 1, 600_000);
    check_range(bad, "engine.restart_max_ms", e.restart_max_ms, e.restart_initial_ms.max(1), 3_600_000);
    check_range(bad, "engine.restart_stable_secs", e.restart_stable_secs, 1, 86_400);
    check_range(bad, "engine.crash_loop_restarts", u64::from(e.crash_loop_restarts), 1, 1000);
    check_range(bad, "engine.crash_loop_window_secs", e.crash_loop_window_secs, 1, 86_400);
    let cdi = cdi_settings(e, bad);
    EngineSettings {
        binary: e.binary.clone(),
        args: e.args.clone(),
        stop_grace: Duration::from_secs(e.stop_grace_secs),
        socket: e.socket.clone(),
        cgroup: Some(e.cgroup.clone()).filter(|c| !c.is_empty()),
        memory_reserve_bytes: e.memory_reserve_bytes,
        ready_timeout: Duration::from_secs(e.ready_timeout_secs),
        probe: ProbeSettings {
            interval: Duration::from_millis(e.probe_interval_ms),
            timeout: Duration::from_millis(e.probe_timeout_ms),
            failures: e.probe_failures,
        },
        restart: RestartPolicy {
            initial: Duration::from_millis(e.restart_initial_ms),
            max: Duration::from_millis(e.restart_max_ms),
            stable_after: Duration::from_secs(e.restart_stable_secs),
            crash_window: Duration::from_secs(e.crash_loop_window_secs),
            crash_limit: e.crash_loop_restarts,
        },
        cdi,
    }
}

/// More spec dirs than this is a typo'd list, not a machine.
const MAX_CDI_SPEC_DIRS: usize = 8;

/// `engine.cdi_spec_dirs`, `engine.cdi_nvidia_spec`, `engine.nvidia_ctk`: the
/// dirs clean absolute paths, each once; the NVIDIA spec a `.yaml` or `.json`
/// file directly in one of them (the engine reads nothing else); the tool an
/// absolute path (it need not exist: machines without GPUs lack it).
fn cdi_settings(e: &RawEngine, bad: &mut impl FnMut(&str, String)) -> CdiSettings {
    if e.cdi_spec_dirs.len() > MAX_CDI_SPEC_DIRS {
        bad("engine.cdi_spec_dirs", format!("expected at most {MAX_CDI_SPEC_DIRS} directories, got {}", e.cdi_spec_dirs.len()));
    }
    for (i, dir) in e.cdi_spec_dirs.iter().enumerate().take(MAX_CDI_SPEC_DIRS) {
        let field = format!("engine.cdi_spec_dirs[{i}]");
        if let Err(problem) = check_clean_absolute(dir) {
            bad(&field, problem);
        } else if dir.to_str().is_none() {
            bad(&field, "not valid UTF-8 (buildkitd.toml is)".into());
        } else if e.cdi_spec_dirs[..i].contains(dir) {
            bad(&field, format!("{} is named twice", dir.display()));
        }
    }
    let nvidia_spec = (!e.cdi_nvidia_spec.as_os_str().is_empty()).then(|| e.cdi_nvidia_spec.clone());
    if let Some(spec) = &nvidia_spec {
        let in_a_dir = spec.parent().is_some_and(|parent| e.cdi_spec_dirs.iter().any(|d| d == parent));
        let suffix_ok = matches!(spec.extension().and_then(|x| x.to_str()), Some("yaml" | "json"));
        if let Err(problem) = check_clean_absolute(spec) {
            bad("engine.cdi_nvidia_spec", problem);
        } else if !in_a_dir || !suffix_ok {
            bad(
                "engine.cdi_nvidia_spec",
                format!("expected a .yaml or .json file directly in one of engine.cdi_spec_dirs (or \"\" to never generate one), got {}", spec.display()),
            );
        }
    }
    if let Err(problem) = check_clean_absolute(&e.nvidia_ctk) {
        bad("engine.nvidia_ctk", problem);
    }
    CdiSettings { spec_dirs: e.cdi_spec_dirs.iter().take(MAX_CDI_SPEC_DIRS).cloned().collect(), nvidia_spec, nvidia_ctk: e.nvidia_ctk.clone() }
}

/// A handful of collectors per fleet; a list of hundreds is a mistake.
const MAX_TRACE_ENDPOINTS: usize = 16;

/// `engine.trace_endpoints`: OTLP/gRPC collectors a task may name, each an
/// `http://` (plaintext) or `https://` (TLS) URL of a host and an explicit
/// port, nothing else (no user, path, query): what BuildKit's gRPC exporter dials.
fn trace_endpoints(endpoints: &[String], bad: &mut impl FnMut(&str, String)) {
    if endpoints.len() > MAX_TRACE_ENDPOINTS {
        bad("engine.trace_endpoints", format!("expected at most {MAX_TRACE_ENDPOINTS} endpoints, got {}", endpoints.len()));
        return;
    }
    for (i, endpoint) in endpoints.iter().enumerate() {
        let field = format!("engine.trace_endpoints[{i}]");
        if let Err(problem) = check_trace_endpoint(endpoint) {
            bad(&field, format!("{problem}; expected http://host:port or https://host:port, got {:?}", excerpt(endpoint, 128)));
        } else if endpoints[..i].contains(endpoint) {
            bad(&field, format!("{endpoint} is named twice"));
        }
    }
}

/// One trace endpoint's shape. Pure.
fn check_trace_endpoint(endpoint: &str) -> Result<(), &'static str> {
    if endpoint.len() > crate::task::MAX_TRACE_ENDPOINT_BYTES {
        return Err("too long");
    }
    let uri: http::Uri = endpoint.parse().map_err(|_| "not a URL")?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("the scheme must be http or https");
    }
    let authority = uri.authority().ok_or("no host")?;
    if authority.as_str().contains('@') {
        return Err("a user in the URL");
    }
    if authority.host().is_empty() {
        return Err("no host");
    }
    if authority.port_u16().is_none_or(|p| p == 0) {
        return Err("no port (OTLP/gRPC listens on 4317 by convention; say it)");
    }
    if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/" && !pq.as_str().is_empty()) || endpoint.ends_with('/') {
        return Err("a path or query (the gRPC exporter dials host:port only)");
    }
    Ok(())
}

/// `agent.drain_timeout_secs` leaves room to stop the engine and then unmount.
/// A zero drain timeout is already refused by [`agent_intervals`].
fn drain_covers_stop_and_unmount(a: &RawAgent, e: &RawEngine, v: &RawVolume, bad: &mut impl FnMut(&str, String)) {
    // Saturating: absurd values are reported by their own range checks, never an overflow here.
    let stop_and_unmount = e.stop_grace_secs.saturating_add(v.unmount_timeout_secs);
    if stop_and_unmount >= a.drain_timeout_secs && a.drain_timeout_secs > 0 {
        bad(
            "agent.drain_timeout_secs",
            format!("must exceed engine.stop_grace_secs + volume.unmount_timeout_secs ({stop_and_unmount}s) so the drain can stop the engine and unmount"),
        );
    }
}

/// `engine.allowed_task_env`: names a task may set for the engine. The
/// operator may widen what a task sets, never reach what the agent sets
/// itself (the engine's base environment, systemd's variables, the loader's).
fn allowed_task_env(names: &[String], bad: &mut impl FnMut(&str, String)) {
    if names.len() > MAX_ENGINE_ENV {
        bad("engine.allowed_task_env", format!("expected at most {MAX_ENGINE_ENV} names, got {}", names.len()));
        return;
    }
    for (i, name) in names.iter().enumerate() {
        let field = format!("engine.allowed_task_env[{i}]");
        let well_formed = name.len() <= MAX_ENV_NAME_BYTES
            && name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !well_formed {
            bad(&field, format!("expected a variable name of [A-Za-z_][A-Za-z0-9_]*, at most {MAX_ENV_NAME_BYTES} bytes, got {:?}", excerpt(name, 64)));
        } else if is_agent_owned_engine_variable(name) {
            bad(&field, format!("{name} is set or removed by the agent itself (the engine's base environment, systemd's variables, the dynamic loader's); a task cannot be allowed to set it"));
        } else if names[..i].contains(name) {
            bad(&field, format!("{name} is named twice"));
        }
    }
}

/// A pressure check is one statvfs and the planner's watermark test: 0.8 us
/// (`cargo bench --bench gc_planner`). What costs is waking the runtime: four
/// checks a second add 0.04-0.06 s of CPU a minute to the idle agent (0.04
/// s/min with a check every 5 s, 0.08-0.10 every 250 ms, in `cargo bench
/// --bench foundation`), and GC starts 0.17 s (median) after a watermark is
/// crossed instead of 3.7 s. A fleet that prefers the CPU sets it higher.
const DEFAULT_PRESSURE_CHECK: Duration = Duration::from_millis(250);

/// `[gc]`: retention, minimum age, the intervals and the batch size.
fn gc_settings(g: &RawGc, bad: &mut impl FnMut(&str, String)) -> GcSettings {
    check_range(bad, "gc.retention_secs", g.retention_secs, 1, 366 * 86_400);
    check_range(bad, "gc.min_age_secs", g.min_age_secs, 0, g.retention_secs);
    check_range(bad, "gc.interval_secs", g.interval_secs, 1, 86_400);
    let pressure_check = match (g.pressure_check_ms, g.pressure_check_secs) {
        (Some(_), Some(_)) => {
            bad("gc.pressure_check_ms", "set gc.pressure_check_ms or gc.pressure_check_secs, not both".into());
            DEFAULT_PRESSURE_CHECK
        }
        (Some(ms), None) => {
            check_range(bad, "gc.pressure_check_ms", ms, 10, 3_600_000);
            Duration::from_millis(ms)
        }
        (None, Some(secs)) => {
            check_range(bad, "gc.pressure_check_secs", secs, 1, 3600);
            Duration::from_secs(secs)
        }
        (None, None) => DEFAULT_PRESSURE_CHECK,
    };
    check_range(bad, "gc.batch", g.batch as u64, 1, 10_000);
    check_range(bad, "gc.clock_sync_wait_secs", g.clock_sync_wait_secs, 0, 86_400);
    check_range(bad, "gc.clock_jump_max_secs", g.clock_jump_max_secs, 1, 86_400);
    GcSettings {
        enabled: g.enabled,
        retention: Duration::from_secs(g.retention_secs),
        min_age: Duration::from_secs(g.min_age_secs),
        interval: Duration::from_secs(g.interval_secs),
        pressure_check,
        free_bytes_start_below_percent: g.free_bytes_start_below_percent,
        free_bytes_stop_at_percent: g.free_bytes_stop_at_percent,
        free_inodes_start_below_percent: g.free_inodes_start_below_percent,
        free_inodes_stop_at_percent: g.free_inodes_stop_at_percent,
        batch: g.batch,
        clock_sync_wait: Duration::from_secs(g.clock_sync_wait_secs),
        clock_jump_max: Duration::from_secs(g.clock_jump_max_secs),
    }
}

/// `[gc]`'s free-bytes and free-inodes watermarks: each stop is a percentage,
/// and GC starts below a level no higher than where it stops.
fn watermarks_ordered(g: &RawGc, bad: &mut impl FnMut(&str, String)) {
    for (what, start, stop) in [
        ("free_bytes", g.free_bytes_start_below_percent, g.free_bytes_stop_at_percent),
        ("free_inodes", g.free_inodes_start_below_percent, g.free_inodes_stop_at_percent),
    ] {
        check_range(bad, &format!("gc.{what}_stop_at_percent"), u64::from(stop), 0, 100);
        if start > stop {
            bad(&format!("gc.{what}_start_below_percent"), format!("must not exceed gc.{what}_stop_at_percent ({stop}), got {start}"));
        }
    }
}

// === helpers ===

/// One cgroup path component: no dot first, at most 64 bytes of `[A-Za-z0-9._-]`.
fn is_cgroup_name(name: &str) -> bool {
    !name.starts_with('.') && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `value` lies in `min..=max`.
fn check_range(bad: &mut impl FnMut(&str, String), field: &str, value: u64, min: u64, max: u64) {
    if !(min..=max).contains(&value) {
        bad(field, format!("expected {min}..={max}, got {value}"));
    }
}

/// `control_plane.url`: a URL with a host, https unless `insecure`.
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
    let pem = read_regular_file(path, MAX_CA_BUNDLE_BYTES).map_err(|e| e.to_string())?;
    let count =
        rustls_pemfile::certs(&mut pem.as_slice()).collect::<Result<Vec<_>, _>>().map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?.len();
    if count == 0 {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(())
}

/// The token file must be a regular file, private to its owner, and hold a token.
fn check_token_file(path: &Path) -> Result<(), String> {
    // Read first: that refuses a FIFO or a device before its mode is judged.
    let content = read_regular_text(path, MAX_TOKEN_FILE_BYTES).map_err(|e| e.to_string())?;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!("{} is readable by group or others (mode {:o}); expected 0600", path.display(), meta.permissions().mode() & 0o777));
    }
    if content.trim().is_empty() {
        return Err(format!("{} is empty; expected the bootstrap token", path.display()));
    }
    Ok(())
}
