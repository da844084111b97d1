//! Tasks from the control plane (or a standalone task file) turned into
//! validated domain types. Every task field is untrusted: all bad input stops
//! here, with every problem named by its field, and nothing downstream ever
//! sees a raw proto task.
//!
//! This module never does I/O beyond reading the files a standalone task names
//! and, in [`tls`], writing the checked TLS material (only material that passed
//! the check can be written, so both halves live together); the checks against
//! the machine (does the device exist, is it blank) belong to the volume manager.

/// A task's Ceph RBD volume: its names, key, monitors and ceph.conf, checked.
pub mod rbd;
pub mod reset;
/// The task's mTLS material: checked, then written atomically where the engine reads it.
pub mod tls;

use crate::fsutil::{check_clean_absolute, excerpt, read_regular_text};
use crate::proto::v1 as pb;
use crate::secret::Secret;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A PEM document larger than this is not a certificate chain; refuse it before parsing.
pub const MAX_PEM_BYTES: usize = 64 * 1024;
/// The largest valid task file (64 engine variables of 4 KiB, 8 mounts, the
/// PEMs named, not inlined) is about 270 KiB; refuse more before reading it.
pub const MAX_TASK_FILE_BYTES: u64 = 512 << 10;
/// What a task file's parse error quotes of it, at most.
const MAX_QUOTED_CHARS: usize = 256;
/// One engine and its cache volume, plus a few extra mounts at most.
pub const MAX_MOUNTS: usize = 8;
/// Enough for proxy settings and a few knobs; a flood of variables is a bad task.
pub const MAX_ENGINE_ENV: usize = 64;
const MAX_ENV_VALUE_BYTES: usize = 4096;
/// Longer than any variable name a program reads.
pub const MAX_ENV_NAME_BYTES: usize = 128;
/// The allowed options are ten; a few more leave room for an honest duplicate to be named.
pub const MAX_MOUNT_OPTIONS: usize = 16;
/// PATH_MAX: no path the kernel takes is longer.
const MAX_PATH_BYTES: usize = 4096;
/// A rejection lists this many problems and counts the rest: it is logged and
/// sent in every health report, so it must stay small whatever the task holds.
pub const MAX_LISTED_PROBLEMS: usize = 20;
/// The largest task message the agent decodes. A valid task is at most about
/// 600 KiB (three PEMs of 64 KiB, 64 variables of 4 KiB, 8 mounts of 16
/// options and 4 KiB paths); anything larger is refused by the decoder before
/// a field is allocated.
pub const MAX_TASK_MESSAGE_BYTES: usize = 1 << 20;
const MAX_TASK_ID_LEN: usize = 128;
/// Smaller than this cannot hold a useful cache (and mkfs.xfs refuses under 300 MiB).
pub const MIN_VOLUME_BYTES: u64 = 512 * 1024 * 1024;
/// 64 TiB: beyond any single disk we run on; a typo of several zeroes is caught.
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;
/// More parallel build steps than this only thrashes a single VM.
const MAX_PARALLELISM: u32 = 1024;
/// Mount options a task may ask for; anything that changes security
/// (exec/suid/dev) or ownership semantics is the agent's call, not the task's.
const ALLOWED_MOUNT_OPTIONS: &[&str] = &["noatime", "nodiratime", "relatime", "lazytime", "discard", "nodiscard", "prjquota", "pquota", "nobarrier"];
/// The engine variables any task may set: where the engine's registry and
/// source fetches go through a proxy. Go reads both cases, so both are allowed.
/// Any other variable must be named in the agent's config (`engine.allowed_task_env`):
/// a variable like GODEBUG or SSL_CERT_FILE changes what the engine logs or
/// trusts. `OTEL_*` (where the engine sends its traces) no config can allow:
/// see [`OTEL_ENV_PREFIX`].
pub const PROXY_ENV: &[&str] = &["HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"];
/// The engine's OpenTelemetry settings are the agent's (from `buildkit.trace_endpoint`
/// and its allow-list): no task sets them through `engine_env`, and no config can allow it.
pub const OTEL_ENV_PREFIX: &str = "OTEL_";
/// A few GPUs and a device class or two; more is not a builder we run.
pub const MAX_DEVICES: usize = 32;
/// Longer than any CDI name a vendor writes (the CDI library sets no limit).
pub const MAX_DEVICE_NAME_BYTES: usize = 256;
/// Longer than any collector URL; a longer one is refused before it is compared.
pub const MAX_TRACE_ENDPOINT_BYTES: usize = 512;

/// What the control plane asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Wait for work.
    Pending,
    /// Serve builds.
    Buildkit(Box<BuildkitTask>),
    /// Drain and exit.
    Terminate { reason: String },
}

/// A validated BuildKit task.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildkitTask {
    pub id: String,
    pub tls: TlsMaterial,
    /// At least one; the first holds the engine's root.
    pub mounts: Vec<VolumeMount>,
    pub cache_size_bytes: u64,
    pub gc: GcOverrides,
    pub max_parallelism: Option<u32>,
    pub debug: bool,
    pub listen_address: SocketAddr,
    pub engine_env: BTreeMap<String, String>,
    /// CDI devices build steps may use (`RUN --device=<name>`), fully
    /// qualified (`vendor/class=name`); syntax checked here, existence in a
    /// spec when the task is taken (`engine::cdi::check_devices`).
    pub devices: Vec<String>,
    /// The OTLP/gRPC collector the engine sends its traces to; one of the
    /// config's `engine.trace_endpoints`, exactly.
    pub trace_endpoint: Option<String>,
}

/// PEM text, checked for structure here (one or more blocks of the right kind);
/// chains, key match and expiry are checked by the engine's TLS writer.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsMaterial {
    pub cert_pem: String,
    pub key_pem: Secret,
    pub ca_pem: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VolumeMount {
    pub mount_path: PathBuf,
    pub source: VolumeSource,
    pub fs_type: FsType,
    pub options: Vec<String>,
    pub skip_trim: bool,
    pub cache_mode: CacheMode,
}

/// How a builder uses a cache volume; see the proto's `CacheMode` for what
/// each mode does with each kind of source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// The project cache: read-write, exclusive, committed at a clean drain.
    #[default]
    Primary,
    /// A copy-on-write clone of the primary's newest commit; destroyed at drain.
    Clone,
    /// A fresh blank volume; destroyed at drain.
    Isolated,
}

impl CacheMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Clone => "clone",
            Self::Isolated => "isolated",
        }
    }

    /// Parses the task file's and the proto's names ("primary", "clone", "isolated").
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Primary, Self::Clone, Self::Isolated].into_iter().find(|m| m.as_str() == name)
    }

    /// Whether the volume is destroyed at drain (it never outlives its task).
    pub fn is_disposable(self) -> bool {
        self != Self::Primary
    }
}

impl VolumeSource {
    /// "device", "file" or "rbd": for reports and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Device { .. } => "device",
            Self::File { .. } => "file",
            Self::Rbd(_) => "rbd",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum VolumeSource {
    Device { path: PathBuf, ebs_volume_id: Option<String> },
    File { path: PathBuf, size_bytes: u64 },
    Rbd(RbdImage),
}

/// A Ceph RBD image and how to reach it; every field validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RbdImage {
    pub pool: String,
    pub namespace: Option<String>,
    pub image: String,
    /// The `<id>` of `client.<id>`.
    pub client_id: String,
    pub key: Secret,
    /// At least one monitor address, from the task's list or its conf's mon_host.
    pub monitors: Vec<String>,
    /// Client settings from the task's ceph.conf (allow-listed keys,
    /// normalised to underscores), mon_host excluded.
    pub conf: Vec<(String, String)>,
    /// Create the image with this size when it does not exist.
    pub create_size_bytes: Option<u64>,
    /// The owner whose lock this task may break (after blocklisting its clients).
    pub take_over_from: Option<String>,
}

impl RbdImage {
    /// `pool/image` or `pool/namespace/image`: how `rbd` names an image.
    pub fn spec(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{}/{}", self.pool, ns, self.image),
            None => format!("{}/{}", self.pool, self.image),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Xfs,
    Btrfs,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Xfs => "xfs",
            Self::Btrfs => "btrfs",
        }
    }
}

/// Per-task GC overrides; None = the agent's configured default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcOverrides {
    pub retention: Option<Duration>,
    pub keep_bytes: Option<u64>,
    pub free_bytes_watermarks_percent: Option<(u32, u32)>,
    pub free_inodes_watermarks_percent: Option<(u32, u32)>,
    pub min_age: Option<Duration>,
    pub interval: Option<Duration>,
}

/// What the validator needs from the agent's config.
#[derive(Debug, Clone)]
pub struct TaskLimits {
    pub allowed_mount_prefixes: Vec<PathBuf>,
    /// A file-backed volume's file must sit strictly beneath one of these.
    pub allowed_backing_dirs: Vec<PathBuf>,
    /// The agent's own directories (state dir, engine socket dir): no mount
    /// path may equal, contain or sit inside one, or it would hide the
    /// agent's keys, lock and sockets under a volume.
    pub reserved_paths: Vec<PathBuf>,
    /// Engine variables a task may set besides [`PROXY_ENV`] (`engine.allowed_task_env`).
    pub allowed_engine_env: BTreeSet<String>,
    /// The trace collectors a task may name (`engine.trace_endpoints`), compared exactly.
    pub trace_endpoints: BTreeSet<String>,
}

impl TaskLimits {
    fn allows_engine_variable(&self, name: &str) -> bool {
        PROXY_ENV.contains(&name) || self.allowed_engine_env.contains(name)
    }
}

/// One invalid task field: its path in the task and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

/// Why a task was refused: the first [`MAX_LISTED_PROBLEMS`] bad fields, and
/// how many more were found but not listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct TaskError(pub Vec<FieldError>, pub usize);

impl TaskError {
    fn one(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self(vec![FieldError { field: field.into(), problem: problem.into() }], 0)
    }

    /// Problems listed and not.
    pub fn count(&self) -> usize {
        self.0.len() + self.1
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid task:")?;
        for (i, e) in self.0.iter().enumerate() {
            let sep = if i == 0 { " " } else { "; " };
            write!(f, "{sep}{}: {}", e.field, e.problem)?;
        }
        if self.1 > 0 {
            write!(f, "; and {} more problem(s) not listed", self.1)?;
        }
        Ok(())
    }
}

/// Collects field errors while a task is checked: the first
/// [`MAX_LISTED_PROBLEMS`], and a count of the rest.
#[derive(Debug, Default)]
struct Problems {
    listed: Vec<FieldError>,
    unlisted: usize,
}

impl Problems {
    fn add(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        if self.listed.len() < MAX_LISTED_PROBLEMS {
            self.listed.push(FieldError { field: field.into(), problem: problem.into() });
        } else {
            self.unlisted += 1;
        }
    }

    /// Every problem found so far, listed or not.
    fn total(&self) -> usize {
        self.listed.len() + self.unlisted
    }

    fn is_empty(&self) -> bool {
        self.total() == 0
    }

    fn into_error(self) -> TaskError {
        TaskError(self.listed, self.unlisted)
    }
}

/// Validates the task of a RegisterResponse. A response without a task is a
/// protocol error, reported as the field `task`.
pub fn validate_task(task: Option<pb::register_response::Task>, limits: &TaskLimits) -> Result<Task, TaskError> {
    use pb::register_response::Task as T;
    match task {
        None => Err(TaskError::one("task", "missing: expected pending, buildkit or terminate")),
        Some(T::Pending(_)) => Ok(Task::Pending),
        Some(T::Terminate(t)) => Ok(Task::Terminate { reason: sanitize_reason(&t.reason) }),
        Some(T::Buildkit(b)) => validate_buildkit(b, limits).map(|t| Task::Buildkit(Box::new(t))),
    }
}

/// A reason is free text for logs: keep it printable and short.
fn sanitize_reason(reason: &str) -> String {
    let clean: String = reason.chars().filter(|c| !c.is_control()).take(256).collect();
    if clean.is_empty() {
        "terminate task".into()
    } else {
        clean
    }
}

/// Validates a BuildKit task, reporting every bad field.
pub fn validate_buildkit(task: pb::BuildkitTask, limits: &TaskLimits) -> Result<BuildkitTask, TaskError> {
    let mut p = Problems::default();

    let id = task.task_id;
    if id.is_empty() || id.len() > MAX_TASK_ID_LEN || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        p.add("buildkit.task_id", format!("expected 1..={MAX_TASK_ID_LEN} characters of [A-Za-z0-9._-]"));
    }

    let tls = match task.tls {
        None => {
            p.add("buildkit.tls", "missing: the engine needs its mTLS material");
            None
        }
        Some(tls) => {
            let before = p.total();
            check_pem(&mut p, "buildkit.tls.cert_pem", &tls.cert_pem, PemKind::Certificate);
            check_pem(&mut p, "buildkit.tls.key_pem", &tls.key_pem, PemKind::PrivateKey);
            check_pem(&mut p, "buildkit.tls.ca_pem", &tls.ca_pem, PemKind::Certificate);
            let material = TlsMaterial { cert_pem: tls.cert_pem, key_pem: Secret::new(tls.key_pem), ca_pem: tls.ca_pem };
            // The deep check (parses, key matches, dates) only once the PEM shapes are right,
            // so each field gets one clear problem; a bad cert never reaches the engine.
            if p.total() == before {
                if let Err(error) = tls::check(&material, std::time::SystemTime::now()) {
                    p.add(error.field().to_string(), error.to_string());
                }
            }
            Some(material)
        }
    };

    if task.mounts.is_empty() {
        p.add("buildkit.mounts", "expected at least one mount for the engine's cache");
    }
    if task.mounts.len() > MAX_MOUNTS {
        p.add("buildkit.mounts", format!("expected at most {MAX_MOUNTS} mounts, got {}", task.mounts.len()));
    }
    let mounts: Vec<VolumeMount> =
        task.mounts.into_iter().take(MAX_MOUNTS).enumerate().filter_map(|(i, m)| validate_mount(&mut p, &format!("buildkit.mounts[{i}]"), m, limits)).collect();
    check_mounts_disjoint(&mut p, &mounts);

    if task.cache_size_bytes == 0 || task.cache_size_bytes > MAX_VOLUME_BYTES {
        p.add("buildkit.cache_size_bytes", format!("expected 1..={MAX_VOLUME_BYTES} bytes, got {}", task.cache_size_bytes));
    }

    let gc = validate_gc(&mut p, task.gc.unwrap_or_default());

    if task.max_parallelism > MAX_PARALLELISM {
        p.add("buildkit.max_parallelism", format!("expected 0..={MAX_PARALLELISM}, got {}", task.max_parallelism));
    }

    let listen_address = match task.listen_address.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Some(a),
        _ => {
            p.add("buildkit.listen_address", format!("expected ip:port with a non-zero port, got {:?}", truncate(&task.listen_address)));
            None
        }
    };

    check_engine_env(&mut p, &task.engine_env, limits);
    check_devices(&mut p, &task.devices);
    let trace_endpoint = check_trace_endpoint(&mut p, task.trace_endpoint, limits);

    match (p.is_empty(), tls, listen_address) {
        (true, Some(tls), Some(listen_address)) => Ok(BuildkitTask {
            id,
            tls,
            mounts,
            cache_size_bytes: task.cache_size_bytes,
            gc,
            max_parallelism: (task.max_parallelism > 0).then_some(task.max_parallelism),
            debug: task.debug,
            listen_address,
            engine_env: task.engine_env.into_iter().collect(),
            devices: task.devices,
            trace_endpoint,
        }),
        _ => Err(p.into_error()),
    }
}

/// The task's engine variables: the count first (a flood is one problem, not
/// one per entry), then each name against the allow-list and each value's size.
fn check_engine_env(p: &mut Problems, env: &std::collections::HashMap<String, String>, limits: &TaskLimits) {
    if env.len() > MAX_ENGINE_ENV {
        p.add("buildkit.engine_env", format!("expected at most {MAX_ENGINE_ENV} variables, got {}; none was checked", env.len()));
        return;
    }
    for (name, value) in env {
        let field = format!("buildkit.engine_env[{}]", truncate(name));
        if name.starts_with(OTEL_ENV_PREFIX) {
            p.add(&field, "not allowed: the engine's OpenTelemetry settings are the agent's; name the collector in buildkit.trace_endpoint");
        } else if name.len() > MAX_ENV_NAME_BYTES || !limits.allows_engine_variable(name) {
            p.add(&field, format!("not allowed: a task may set {} and the variables the agent's engine.allowed_task_env names", PROXY_ENV.join(", ")));
        }
        if value.len() > MAX_ENV_VALUE_BYTES || value.contains('\0') {
            p.add(&field, format!("expected a value of at most {MAX_ENV_VALUE_BYTES} bytes without NUL"));
        }
    }
}

/// The devices' count first (a flood is one problem), then each name's
/// syntax (a fully qualified CDI name) and duplicates. Whether a spec on the
/// machine defines each one is checked when the task is taken, not here.
fn check_devices(p: &mut Problems, devices: &[String]) {
    if devices.len() > MAX_DEVICES {
        p.add("buildkit.devices", format!("expected at most {MAX_DEVICES} devices, got {}; none was checked", devices.len()));
        return;
    }
    for (i, name) in devices.iter().enumerate() {
        let field = format!("buildkit.devices[{i}]");
        if let Err(problem) = check_cdi_name(name) {
            p.add(field, problem);
        } else if devices[..i].contains(name) {
            p.add(field, format!("{name:?} is named twice"));
        }
    }
}

/// A fully qualified CDI device name, `vendor/class=name`, by the CDI
/// library's rules (tags.cncf.io/container-device-interface/pkg/parser):
/// vendor and class start with a letter, end with a letter or digit, and hold
/// letters, digits, `_`, `-`, `.`; the name starts and ends with a letter or
/// digit and may also hold `:`. Pure.
pub fn check_cdi_name(device: &str) -> Result<(), String> {
    if device.len() > MAX_DEVICE_NAME_BYTES {
        return Err(format!("expected a CDI name of at most {MAX_DEVICE_NAME_BYTES} bytes, got {}", device.len()));
    }
    let expected = || format!("expected a fully qualified CDI device name vendor/class=name (\"nvidia.com/gpu=all\"), got {:?}", truncate(device));
    let (kind, name) = device.split_once('=').ok_or_else(expected)?;
    let (vendor, class) = kind.split_once('/').ok_or_else(expected)?;
    let inner_ok = |s: &str, extra: &[u8]| s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b) || extra.contains(&b));
    let ends_ok = |s: &str, first_letter: bool| {
        let (first, last) = (s.bytes().next(), s.bytes().last());
        first.is_some_and(|b| if first_letter { b.is_ascii_alphabetic() } else { b.is_ascii_alphanumeric() }) && last.is_some_and(|b| b.is_ascii_alphanumeric())
    };
    if !(ends_ok(vendor, true) && inner_ok(vendor, b"")) {
        return Err(format!("{} (vendor {:?}: a letter first, a letter or digit last, letters, digits, '_', '-', '.' between)", expected(), truncate(vendor)));
    }
    if !(ends_ok(class, true) && inner_ok(class, b"")) {
        return Err(format!("{} (class {:?}: a letter first, a letter or digit last, letters, digits, '_', '-', '.' between)", expected(), truncate(class)));
    }
    if !(ends_ok(name, false) && inner_ok(name, b":")) {
        return Err(format!("{} (name {:?}: a letter or digit first and last, letters, digits, '_', '-', '.', ':' between)", expected(), truncate(name)));
    }
    Ok(())
}

/// The trace endpoint: empty is none; anything else must equal an entry of
/// the config's allow-list (the config checked the entries' shape).
fn check_trace_endpoint(p: &mut Problems, endpoint: String, limits: &TaskLimits) -> Option<String> {
    if endpoint.is_empty() {
        return None;
    }
    if endpoint.len() > MAX_TRACE_ENDPOINT_BYTES {
        p.add("buildkit.trace_endpoint", format!("expected at most {MAX_TRACE_ENDPOINT_BYTES} bytes, got {}", endpoint.len()));
        return None;
    }
    if !limits.trace_endpoints.contains(&endpoint) {
        let allowed = if limits.trace_endpoints.is_empty() {
            "this agent allows none (engine.trace_endpoints is empty)".to_string()
        } else {
            format!("expected one of engine.trace_endpoints exactly: {}", limits.trace_endpoints.iter().cloned().collect::<Vec<_>>().join(", "))
        };
        p.add("buildkit.trace_endpoint", format!("{:?} is not allowed; {allowed}", truncate(&endpoint)));
        return None;
    }
    Some(endpoint)
}

/// A path field's length first, so a megabyte path is never copied into an error.
fn check_path(p: &mut Problems, field: &str, path: &str) -> bool {
    if path.len() > MAX_PATH_BYTES {
        p.add(field, format!("expected a path of at most {MAX_PATH_BYTES} bytes, got {}", path.len()));
        return false;
    }
    match check_clean_absolute(Path::new(path)) {
        Ok(()) => true,
        Err(problem) => {
            // The problem quotes the path: keep it to a line.
            p.add(field, excerpt(&problem, 256));
            false
        }
    }
}

/// Field values quoted in errors are cut short: an error must not carry a megabyte of input.
fn truncate(s: &str) -> String {
    excerpt(s, 64)
}

#[derive(Debug, Clone, Copy)]
enum PemKind {
    Certificate,
    PrivateKey,
}

fn check_pem(p: &mut Problems, field: &str, pem: &str, kind: PemKind) {
    if pem.is_empty() {
        p.add(field, "missing");
        return;
    }
    if pem.len() > MAX_PEM_BYTES {
        p.add(field, format!("expected at most {MAX_PEM_BYTES} bytes of PEM, got {}", pem.len()));
        return;
    }
    let mut reader = pem.as_bytes();
    let mut found = 0usize;
    loop {
        match rustls_pemfile::read_one(&mut reader) {
            Ok(None) => break,
            Ok(Some(item)) => {
                use rustls_pemfile::Item;
                let matches = matches!(
                    (kind, item),
                    (PemKind::Certificate, Item::X509Certificate(_)) | (PemKind::PrivateKey, Item::Pkcs1Key(_) | Item::Pkcs8Key(_) | Item::Sec1Key(_))
                );
                if matches {
                    found += 1;
                } else {
                    // Never echo the block: it may be key material.
                    p.add(field, "holds a PEM block of the wrong kind");
                    return;
                }
            }
            Err(_) => {
                p.add(field, "is not valid PEM");
                return;
            }
        }
    }
    match (kind, found) {
        (_, 0) => p.add(field, "holds no PEM block"),
        (PemKind::PrivateKey, n) if n > 1 => p.add(field, "expected exactly one private key"),
        _ => {}
    }
}

fn validate_mount(p: &mut Problems, field: &str, m: pb::VolumeMount, limits: &TaskLimits) -> Option<VolumeMount> {
    let errors_before = p.total();
    let mount_path = PathBuf::from(&m.mount_path);
    if check_path(p, &format!("{field}.mount_path"), &m.mount_path) && !limits.allowed_mount_prefixes.iter().any(|prefix| mount_path.starts_with(prefix)) {
        p.add(
            format!("{field}.mount_path"),
            format!(
                "{:?} is not under an allowed prefix ({})",
                truncate(&m.mount_path),
                limits.allowed_mount_prefixes.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        );
    } else if let Some(reserved) = limits.reserved_paths.iter().find(|r| paths_overlap(&mount_path, r)) {
        p.add(
            format!("{field}.mount_path"),
            format!("{:?} would cover or sit inside the agent's own directory {}", truncate(&m.mount_path), reserved.display()),
        );
    }

    let source = match m.source {
        None => {
            p.add(format!("{field}.source"), "missing: expected a device, a file or an rbd image");
            None
        }
        Some(pb::volume_mount::Source::Device(d)) => {
            let path = PathBuf::from(&d.path);
            if check_path(p, &format!("{field}.device.path"), &d.path) && (!path.starts_with("/dev") || path == Path::new("/dev")) {
                p.add(format!("{field}.device.path"), format!("expected a path under /dev, got {:?}", truncate(&d.path)));
            }
            let ebs_volume_id = (!d.ebs_volume_id.is_empty()).then_some(d.ebs_volume_id);
            if let Some(id) = &ebs_volume_id {
                let hex = id.strip_prefix("vol-").unwrap_or("");
                if !(8..=17).contains(&hex.len()) || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                    p.add(format!("{field}.device.ebs_volume_id"), format!("expected vol- and 8 to 17 lowercase hex digits, got {:?}", truncate(id)));
                }
            }
            Some(VolumeSource::Device { path, ebs_volume_id })
        }
        Some(pb::volume_mount::Source::File(f)) => {
            let path = PathBuf::from(&f.path);
            if !check_path(p, &format!("{field}.file.path"), &f.path) {
                // check_path named the problem
            } else if path.starts_with("/dev") || path.starts_with("/proc") || path.starts_with("/sys") {
                p.add(format!("{field}.file.path"), "expected a regular file path, not under /dev, /proc or /sys");
            } else if !limits.allowed_backing_dirs.iter().any(|dir| path.starts_with(dir) && path != *dir) {
                p.add(
                    format!("{field}.file.path"),
                    format!(
                        "{:?} is not beneath an allowed backing dir ({})",
                        truncate(&f.path),
                        limits.allowed_backing_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
                    ),
                );
            } else if path.starts_with(&mount_path) {
                p.add(format!("{field}.file.path"), "the backing file cannot live inside its own mount");
            }
            if !(MIN_VOLUME_BYTES..=MAX_VOLUME_BYTES).contains(&f.size_bytes) {
                p.add(format!("{field}.file.size_bytes"), format!("expected {MIN_VOLUME_BYTES}..={MAX_VOLUME_BYTES}, got {}", f.size_bytes));
            }
            Some(VolumeSource::File { path, size_bytes: f.size_bytes })
        }
        Some(pb::volume_mount::Source::Rbd(r)) => rbd::validate_rbd(p, &format!("{field}.rbd"), r).map(VolumeSource::Rbd),
    };

    let fs_type = match pb::FilesystemType::try_from(m.fs_type) {
        Ok(pb::FilesystemType::Ext4) => Some(FsType::Ext4),
        Ok(pb::FilesystemType::Xfs) => Some(FsType::Xfs),
        Ok(pb::FilesystemType::Btrfs) => Some(FsType::Btrfs),
        Ok(pb::FilesystemType::Unspecified) | Err(_) => {
            p.add(format!("{field}.fs_type"), format!("expected ext4, xfs or btrfs, got enum value {}", m.fs_type));
            None
        }
    };

    let mut seen = BTreeSet::new();
    // A flood of options is one problem; none of them is looked at.
    let options_to_check = if m.options.len() > MAX_MOUNT_OPTIONS {
        p.add(format!("{field}.options"), format!("expected at most {MAX_MOUNT_OPTIONS} options, got {}; none was checked", m.options.len()));
        &[][..]
    } else {
        &m.options[..]
    };
    for (j, option) in options_to_check.iter().enumerate() {
        if !is_allowed_mount_option(option) {
            p.add(
                format!("{field}.options[{j}]"),
                format!("{:?} is not allowed; expected one of {} or commit=1..300", truncate(option), ALLOWED_MOUNT_OPTIONS.join(", ")),
            );
        } else if !seen.insert(option.as_str()) {
            p.add(format!("{field}.options[{j}]"), format!("{option:?} given twice"));
        }
    }

    let cache_mode = validate_cache_mode(p, field, m.cache_mode, source.as_ref());

    match (p.total() == errors_before, source, fs_type, cache_mode) {
        (true, Some(source), Some(fs_type), Some(cache_mode)) => {
            Some(VolumeMount { mount_path, source, fs_type, options: m.options, skip_trim: m.skip_trim, cache_mode })
        }
        _ => None,
    }
}

/// The mount's cache mode, refused where its source cannot do it.
fn validate_cache_mode(p: &mut Problems, field: &str, mode: i32, source: Option<&VolumeSource>) -> Option<CacheMode> {
    let field = format!("{field}.cache_mode");
    let mode = match pb::CacheMode::try_from(mode) {
        Ok(pb::CacheMode::Unspecified | pb::CacheMode::Primary) => CacheMode::Primary,
        Ok(pb::CacheMode::Clone) => CacheMode::Clone,
        Ok(pb::CacheMode::Isolated) => CacheMode::Isolated,
        Err(_) => {
            p.add(field, format!("expected primary, clone or isolated, got enum value {mode}"));
            return None;
        }
    };
    let refusal = match (mode, source) {
        (CacheMode::Clone, Some(VolumeSource::Device { .. })) => {
            Some("a block device cannot be cloned (it has no snapshots): clone an rbd image or a file on xfs or btrfs")
        }
        (CacheMode::Clone | CacheMode::Isolated, Some(VolumeSource::Rbd(image))) if image.take_over_from.is_some() => {
            Some("a clone or an isolated volume never takes a lock from another builder: take_over_from is for primary mounts")
        }
        (CacheMode::Isolated, Some(VolumeSource::Rbd(image))) if image.create_size_bytes.is_none() => {
            Some("an isolated rbd image is created by the agent: give its size_bytes")
        }
        _ => None,
    };
    match refusal {
        Some(why) => {
            p.add(field, why);
            None
        }
        None => Some(mode),
    }
}

/// One path equals, contains or sits inside the other (by components). Pure.
pub fn paths_overlap(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

fn is_allowed_mount_option(option: &str) -> bool {
    if ALLOWED_MOUNT_OPTIONS.contains(&option) {
        return true;
    }
    // ext4/btrfs journal commit interval, seconds.
    option.strip_prefix("commit=").and_then(|n| n.parse::<u32>().ok()).is_some_and(|n| (1..=300).contains(&n))
}

/// Two mounts on the same path, or one inside another, or two on the same
/// backing store, would make unmount order and ownership ambiguous.
fn check_mounts_disjoint(p: &mut Problems, mounts: &[VolumeMount]) {
    for (i, a) in mounts.iter().enumerate() {
        for (j, b) in mounts.iter().enumerate().skip(i + 1) {
            if a.mount_path.starts_with(&b.mount_path) || b.mount_path.starts_with(&a.mount_path) {
                p.add(format!("buildkit.mounts[{j}].mount_path"), format!("overlaps buildkit.mounts[{i}].mount_path"));
            }
            let same_source = match (&a.source, &b.source) {
                (VolumeSource::Device { path: x, .. }, VolumeSource::Device { path: y, .. }) => x == y,
                (VolumeSource::File { path: x, .. }, VolumeSource::File { path: y, .. }) => x == y,
                // One image mapped twice is two writers on one filesystem, whatever the monitors say.
                (VolumeSource::Rbd(x), VolumeSource::Rbd(y)) => x.spec() == y.spec(),
                _ => false,
            };
            if same_source {
                p.add(format!("buildkit.mounts[{j}].source"), format!("same backing store as buildkit.mounts[{i}]"));
            }
        }
    }
}

/// Bounds for task GC overrides: durations down to one second so tests can use them.
fn validate_gc(p: &mut Problems, gc: pb::GcPolicy) -> GcOverrides {
    const YEAR_SECS: u64 = 366 * 24 * 3600;
    let secs = |p: &mut Problems, name: &str, v: Option<u64>, max: u64| -> Option<Duration> {
        let v = v?;
        if !(1..=max).contains(&v) {
            p.add(format!("buildkit.gc.{name}"), format!("expected 1..={max} seconds, got {v}"));
        }
        Some(Duration::from_secs(v))
    };
    let retention = secs(p, "retention_secs", gc.retention_secs, YEAR_SECS);
    let min_age = secs(p, "min_age_secs", gc.min_age_secs, YEAR_SECS);
    let interval = secs(p, "interval_secs", gc.interval_secs, 24 * 3600);
    if let (Some(r), Some(m)) = (retention, min_age) {
        if m > r {
            p.add("buildkit.gc.min_age_secs", "must not exceed retention_secs");
        }
    }
    if gc.keep_bytes == Some(0) {
        p.add("buildkit.gc.keep_bytes", "expected above zero");
    }
    let pair = |p: &mut Problems, name: &str, start: Option<u32>, stop: Option<u32>| -> Option<(u32, u32)> {
        match (start, stop) {
            (None, None) => None,
            (Some(start), Some(stop)) if (1..=99).contains(&start) && (1..=99).contains(&stop) && start < stop => Some((start, stop)),
            (Some(start), Some(stop)) => {
                p.add(
                    format!("buildkit.gc.{name}_high_watermark_percent"),
                    format!("expected 1..=99 and below the low watermark (GC starts under the high and stops above the low), got {start} and {stop}"),
                );
                None
            }
            _ => {
                p.add(format!("buildkit.gc.{name}_high_watermark_percent"), "set both watermarks of the pair, or neither");
                None
            }
        }
    };
    let free_bytes = pair(p, "free_bytes", gc.free_bytes_high_watermark_percent, gc.free_bytes_low_watermark_percent);
    let free_inodes = pair(p, "free_inodes", gc.free_inodes_high_watermark_percent, gc.free_inodes_low_watermark_percent);
    GcOverrides {
        retention,
        keep_bytes: gc.keep_bytes,
        free_bytes_watermarks_percent: free_bytes,
        free_inodes_watermarks_percent: free_inodes,
        min_age,
        interval,
    }
}

// === standalone task files ===

/// A task file for `run --standalone` / `check --task`: the same fields as the
/// wire's BuildkitTask, with TLS material and values read from files. It is
/// turned into the proto message and validated by the same code as a task from
/// the control plane.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFile {
    task_id: String,
    listen_address: String,
    cache_size_bytes: u64,
    #[serde(default)]
    max_parallelism: u32,
    #[serde(default)]
    debug: bool,
    tls: TaskFileTls,
    mounts: Vec<TaskFileMount>,
    #[serde(default)]
    gc: TaskFileGc,
    #[serde(default)]
    engine_env: BTreeMap<String, String>,
    /// CDI device names build steps may use.
    #[serde(default)]
    devices: Vec<String>,
    /// The OTLP/gRPC collector for the engine's traces; empty or absent for none.
    #[serde(default)]
    trace_endpoint: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFileTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    ca_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFileMount {
    mount_path: String,
    fs_type: String,
    #[serde(default)]
    options: Vec<String>,
    #[serde(default)]
    skip_trim: bool,
    /// "primary" (the default), "clone" or "isolated".
    #[serde(default)]
    cache_mode: Option<String>,
    device: Option<TaskFileDevice>,
    file: Option<TaskFileBacking>,
    rbd: Option<TaskFileRbd>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFileDevice {
    path: String,
    #[serde(default)]
    ebs_volume_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFileBacking {
    path: String,
    size_bytes: u64,
}

/// An RBD image. The key is only ever read from `key_file` (like the TLS
/// key): a task file is copied, diffed and printed, and a key inline in it
/// would travel with it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFileRbd {
    pool: String,
    #[serde(default)]
    namespace: String,
    image: String,
    client_name: String,
    key_file: PathBuf,
    #[serde(default)]
    monitors: Vec<String>,
    ceph_conf_file: Option<PathBuf>,
    #[serde(default)]
    size_bytes: u64,
    #[serde(default)]
    take_over_from: String,
}

/// A key file holds one base64 key and perhaps a newline; a keyring section is a few more bytes.
const MAX_KEY_FILE_BYTES: u64 = 4096;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFileGc {
    retention_secs: Option<u64>,
    keep_bytes: Option<u64>,
    free_bytes_high_watermark_percent: Option<u32>,
    free_bytes_low_watermark_percent: Option<u32>,
    free_inodes_high_watermark_percent: Option<u32>,
    free_inodes_low_watermark_percent: Option<u32>,
    min_age_secs: Option<u64>,
    interval_secs: Option<u64>,
}

/// Reads a standalone task file into the wire's message (not yet validated).
pub fn read_task_file(path: &Path) -> Result<pb::BuildkitTask, TaskError> {
    let one = |field: &str, problem: String| TaskError::one(field, problem);
    let text = read_regular_text(path, MAX_TASK_FILE_BYTES).map_err(|e| one("<file>", e.to_string()))?;
    let file: TaskFile = serde_path_to_error::deserialize(toml::Deserializer::new(&text))
        .map_err(|e| one(&excerpt(&e.path().to_string(), MAX_QUOTED_CHARS), excerpt(e.inner().message(), MAX_QUOTED_CHARS)))?;
    let base = path.parent().unwrap_or(Path::new("/"));
    let mut p = Problems::default();
    // Every file a task file names is read the same way: relative to it, bounded, a regular file.
    let read_named = |p: &mut Problems, field: &str, file: &Path, max_bytes: u64| -> String {
        read_regular_text(&base.join(file), max_bytes).unwrap_or_else(|e| {
            p.add(field, e.to_string());
            String::new()
        })
    };
    let tls = pb::TlsMaterial {
        cert_pem: read_named(&mut p, "tls.cert_file", &file.tls.cert_file, MAX_PEM_BYTES as u64),
        key_pem: read_named(&mut p, "tls.key_file", &file.tls.key_file, MAX_PEM_BYTES as u64),
        ca_pem: read_named(&mut p, "tls.ca_file", &file.tls.ca_file, MAX_PEM_BYTES as u64),
    };
    let mut mounts = vec![];
    for (i, m) in file.mounts.into_iter().enumerate() {
        let source = match (m.device, m.file, m.rbd) {
            (Some(d), None, None) => Some(pb::volume_mount::Source::Device(pb::BlockDevice { path: d.path, ebs_volume_id: d.ebs_volume_id })),
            (None, Some(f), None) => Some(pb::volume_mount::Source::File(pb::FileBackedVolume { path: f.path, size_bytes: f.size_bytes })),
            (None, None, Some(r)) => {
                let key = read_named(&mut p, &format!("mounts[{i}].rbd.key_file"), &r.key_file, MAX_KEY_FILE_BYTES).trim().to_string();
                let ceph_conf = match &r.ceph_conf_file {
                    Some(conf) => read_named(&mut p, &format!("mounts[{i}].rbd.ceph_conf_file"), conf, rbd::MAX_CEPH_CONF_BYTES as u64),
                    None => String::new(),
                };
                Some(pb::volume_mount::Source::Rbd(pb::RbdVolume {
                    pool: r.pool,
                    namespace: r.namespace,
                    image: r.image,
                    client_name: r.client_name,
                    key,
                    monitors: r.monitors,
                    ceph_conf,
                    size_bytes: r.size_bytes,
                    take_over_from: r.take_over_from,
                }))
            }
            _ => {
                p.add(format!("mounts[{i}]"), "expected exactly one of device, file or rbd");
                None
            }
        };
        let fs_type = match m.fs_type.as_str() {
            "ext4" => pb::FilesystemType::Ext4,
            "xfs" => pb::FilesystemType::Xfs,
            "btrfs" => pb::FilesystemType::Btrfs,
            other => {
                p.add(format!("mounts[{i}].fs_type"), format!("expected ext4, xfs or btrfs, got {:?}", truncate(other)));
                pb::FilesystemType::Unspecified
            }
        };
        let cache_mode = match m.cache_mode.as_deref().map(|name| (name, CacheMode::parse(name))) {
            None | Some((_, Some(CacheMode::Primary))) => pb::CacheMode::Primary,
            Some((_, Some(CacheMode::Clone))) => pb::CacheMode::Clone,
            Some((_, Some(CacheMode::Isolated))) => pb::CacheMode::Isolated,
            Some((other, None)) => {
                p.add(format!("mounts[{i}].cache_mode"), format!("expected primary, clone or isolated, got {:?}", truncate(other)));
                pb::CacheMode::Unspecified
            }
        };
        mounts.push(pb::VolumeMount {
            mount_path: m.mount_path,
            source,
            fs_type: fs_type as i32,
            options: m.options,
            skip_trim: m.skip_trim,
            cache_mode: cache_mode as i32,
        });
    }
    if !p.is_empty() {
        return Err(p.into_error());
    }
    let g = file.gc;
    Ok(pb::BuildkitTask {
        task_id: file.task_id,
        tls: Some(tls),
        mounts,
        cache_size_bytes: file.cache_size_bytes,
        gc: Some(pb::GcPolicy {
            retention_secs: g.retention_secs,
            keep_bytes: g.keep_bytes,
            free_bytes_high_watermark_percent: g.free_bytes_high_watermark_percent,
            free_bytes_low_watermark_percent: g.free_bytes_low_watermark_percent,
            free_inodes_high_watermark_percent: g.free_inodes_high_watermark_percent,
            free_inodes_low_watermark_percent: g.free_inodes_low_watermark_percent,
            min_age_secs: g.min_age_secs,
            interval_secs: g.interval_secs,
        }),
        max_parallelism: file.max_parallelism,
        debug: file.debug,
        listen_address: file.listen_address,
        engine_env: file.engine_env.into_iter().collect(),
        devices: file.devices,
        trace_endpoint: file.trace_endpoint,
    })
}

/// Reads and validates a standalone task file.
pub fn load_task_file(path: &Path, limits: &TaskLimits) -> Result<BuildkitTask, TaskError> {
    validate_buildkit(read_task_file(path)?, limits)
}

/// The fields in which `offered` differs from `running`, named as task
/// errors name them (`buildkit.tls.key_pem`, `buildkit.mounts[0].options`,
/// `buildkit.engine_env[HTTP_PROXY]`): what a task re-sent under the running
/// task's id changed. Names only, never values: the key is a secret and an
/// environment value may hold credentials.
pub fn differing_fields(running: &BuildkitTask, offered: &BuildkitTask) -> Vec<String> {
    // Destructured whole: a field added to the task must be compared here too.
    let BuildkitTask { id, tls, mounts, cache_size_bytes, gc, max_parallelism, debug, listen_address, engine_env, devices, trace_endpoint } = running;
    let mut differs = vec![];
    let mut check = |name: &str, same: bool| {
        if !same {
            differs.push(format!("buildkit.{name}"));
        }
    };
    check("task_id", *id == offered.id);
    let TlsMaterial { cert_pem, key_pem, ca_pem } = tls;
    check("tls.cert_pem", *cert_pem == offered.tls.cert_pem);
    check("tls.key_pem", *key_pem == offered.tls.key_pem);
    check("tls.ca_pem", *ca_pem == offered.tls.ca_pem);
    if mounts.len() == offered.mounts.len() {
        for (i, (mine, theirs)) in mounts.iter().zip(&offered.mounts).enumerate() {
            let VolumeMount { mount_path, source, fs_type, options, skip_trim, cache_mode } = mine;
            check(&format!("mounts[{i}].mount_path"), *mount_path == theirs.mount_path);
            check(&format!("mounts[{i}].source"), *source == theirs.source);
            check(&format!("mounts[{i}].fs_type"), *fs_type == theirs.fs_type);
            check(&format!("mounts[{i}].options"), *options == theirs.options);
            check(&format!("mounts[{i}].skip_trim"), *skip_trim == theirs.skip_trim);
            check(&format!("mounts[{i}].cache_mode"), *cache_mode == theirs.cache_mode);
        }
    } else {
        check("mounts", false);
    }
    check("cache_size_bytes", *cache_size_bytes == offered.cache_size_bytes);
    check("gc", *gc == offered.gc);
    check("max_parallelism", *max_parallelism == offered.max_parallelism);
    check("debug", *debug == offered.debug);
    check("listen_address", *listen_address == offered.listen_address);
    let names: BTreeSet<&String> = engine_env.keys().chain(offered.engine_env.keys()).collect();
    for name in names {
        check(&format!("engine_env[{}]", truncate(name)), engine_env.get(name) == offered.engine_env.get(name));
    }
    check("devices", *devices == offered.devices);
    check("trace_endpoint", *trace_endpoint == offered.trace_endpoint);
    differs
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A real CA, and a server cert and key it signed: the deep TLS check runs on every task.
    struct TestTls {
        cert: String,
        key: String,
        ca: String,
    }

    fn test_tls() -> &'static TestTls {
        static TLS: std::sync::OnceLock<TestTls> = std::sync::OnceLock::new();
        TLS.get_or_init(|| {
            use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
            let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca_key = KeyPair::generate().unwrap();
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
            TestTls { cert: cert.pem(), key: key.serialize_pem(), ca: ca.pem() }
        })
    }

    pub fn cert() -> &'static str {
        &test_tls().cert
    }

    pub fn key() -> &'static str {
        &test_tls().key
    }

    pub fn ca() -> &'static str {
        &test_tls().ca
    }

    pub fn limits() -> TaskLimits {
        TaskLimits {
            allowed_mount_prefixes: vec!["/var/lib/buildkit".into(), "/mnt".into()],
            allowed_backing_dirs: vec!["/var/lib/machine-agent/volumes".into(), "/var/lib/x".into()],
            reserved_paths: vec!["/var/lib/machine-agent".into(), "/run/machine-agent".into()],
            allowed_engine_env: ["ENGINE_MARKER".to_string()].into(),
            trace_endpoints: ["http://otel.internal:4317".to_string()].into(),
        }
    }

    pub fn good_task() -> pb::BuildkitTask {
        pb::BuildkitTask {
            task_id: "task-1".into(),
            tls: Some(pb::TlsMaterial { cert_pem: cert().into(), key_pem: key().into(), ca_pem: ca().into() }),
            mounts: vec![pb::VolumeMount {
                mount_path: "/var/lib/buildkit/cache".into(),
                source: Some(pb::volume_mount::Source::Device(pb::BlockDevice { path: "/dev/nvme1n1".into(), ebs_volume_id: "vol-0123456789abcdef0".into() })),
                fs_type: pb::FilesystemType::Ext4 as i32,
                options: vec!["noatime".into()],
                skip_trim: false,
                cache_mode: 0,
            }],
            cache_size_bytes: 50 << 30,
            gc: None,
            max_parallelism: 4,
            debug: false,
            listen_address: "0.0.0.0:443".into(),
            engine_env: Default::default(),
            devices: Vec::new(),
            trace_endpoint: String::new(),
        }
    }

    fn fields(err: TaskError) -> Vec<String> {
        err.0.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn differing_fields_names_each_change_and_no_value() {
        let running = validate_buildkit(good_task(), &limits()).unwrap();
        assert_eq!(differing_fields(&running, &running.clone()), Vec::<String>::new());
        let mut offered = running.clone();
        offered.tls.key_pem = Secret::new("-----BEGIN PRIVATE KEY-----\nother\n");
        offered.mounts[0].options.push("lazytime".into());
        offered.cache_size_bytes += 1;
        offered.gc.keep_bytes = Some(1);
        offered.engine_env.insert("HTTP_PROXY".into(), "http://user:pass@proxy".into());
        offered.devices.push("nvidia.com/gpu=all".into());
        offered.trace_endpoint = Some("http://otel.internal:4317".into());
        let differs = differing_fields(&running, &offered);
        assert_eq!(
            differs,
            [
                "buildkit.tls.key_pem",
                "buildkit.mounts[0].options",
                "buildkit.cache_size_bytes",
                "buildkit.gc",
                "buildkit.engine_env[HTTP_PROXY]",
                "buildkit.devices",
                "buildkit.trace_endpoint"
            ]
        );
        assert!(!differs.concat().contains("PRIVATE") && !differs.concat().contains("pass"), "{differs:?}");
        let mut fewer = running.clone();
        fewer.mounts.clear();
        assert_eq!(differing_fields(&running, &fewer), ["buildkit.mounts"]);
    }

    #[test]
    fn a_task_file_rbd_mount_loads_into_the_same_image_as_the_proto() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (name, text) in [("cert.pem", cert().to_string()), ("key.pem", key().to_string()), ("ca.pem", ca().to_string())] {
            std::fs::write(d.join(name), text).unwrap();
        }
        let proto = rbd::tests::good_rbd();
        std::fs::create_dir(d.join("ceph")).unwrap();
        std::fs::write(d.join("ceph/buildkit.key"), format!("{}\n", proto.key)).unwrap();
        std::fs::write(d.join("ceph/ceph.conf"), &proto.ceph_conf).unwrap();
        let task_file = d.join("task.toml");
        std::fs::write(
            &task_file,
            r#"
task_id = "task-1"
listen_address = "0.0.0.0:443"
cache_size_bytes = 53687091200
[tls]
cert_file = "cert.pem"
key_file = "key.pem"
ca_file = "ca.pem"
[[mounts]]
mount_path = "/mnt/rbd"
fs_type = "xfs"
[mounts.rbd]
pool = "builds"
namespace = "team-a"
image = "cache-01"
client_name = "client.buildkit"
key_file = "ceph/buildkit.key"
monitors = ["10.0.0.1:6789", "[v2:10.0.0.2:3300,v1:10.0.0.2:6789]"]
ceph_conf_file = "ceph/ceph.conf"
size_bytes = 10737418240
take_over_from = "3f2a9c0e5b7d41e8a6c2f0d9b8e7a6c5"
[[mounts]]
mount_path = "/mnt/isolated"
fs_type = "ext4"
cache_mode = "isolated"
file = { path = "/var/lib/machine-agent/volumes/pr-17.img", size_bytes = 1073741824 }
"#,
        )
        .unwrap();
        let read = read_task_file(&task_file).unwrap();
        assert_eq!(read.mounts[0].source, Some(pb::volume_mount::Source::Rbd(proto.clone())));
        let loaded = load_task_file(&task_file, &limits()).unwrap();
        let mut p = Problems::default();
        let expected = rbd::validate_rbd(&mut p, "x", proto).unwrap();
        assert_eq!(loaded.mounts[0].source, VolumeSource::Rbd(expected));
        assert_eq!((loaded.mounts[0].cache_mode, loaded.mounts[1].cache_mode), (CacheMode::Primary, CacheMode::Isolated));
        let text = std::fs::read_to_string(&task_file).unwrap();
        std::fs::write(&task_file, text.replace("\"isolated\"", "\"shared\"")).unwrap();
        assert_eq!(fields(read_task_file(&task_file).unwrap_err()), ["mounts[1].cache_mode"]);
        std::fs::write(&task_file, text).unwrap();

        // An inline key is an unknown field; a missing key file is named.
        let text = std::fs::read_to_string(&task_file).unwrap();
        std::fs::write(&task_file, text.replace("key_file = \"ceph/buildkit.key\"", "key = \"AQBMd0BlAAAAABAAb9Ih5QBoRGXmqrxl0QWUZQ==\"")).unwrap();
        let err = read_task_file(&task_file).unwrap_err();
        assert!(!err.to_string().contains("AQBMd0Bl"), "{err}");
        std::fs::write(&task_file, text.replace("ceph/buildkit.key", "ceph/missing.key")).unwrap();
        assert_eq!(fields(read_task_file(&task_file).unwrap_err()), ["mounts[0].rbd.key_file"]);
        std::fs::write(&task_file, text.replace("[mounts.rbd]", "file = { path = \"/var/lib/x/a.img\", size_bytes = 1073741824 }\n[mounts.rbd]")).unwrap();
        assert_eq!(fields(read_task_file(&task_file).unwrap_err()), ["mounts[0]"]);
    }

    #[test]
    fn one_rbd_image_on_two_mounts_is_refused() {
        let mut t = good_task();
        let rbd_mount = |path: &str| pb::VolumeMount {
            mount_path: path.into(),
            source: Some(pb::volume_mount::Source::Rbd(rbd::tests::good_rbd())),
            fs_type: pb::FilesystemType::Xfs as i32,
            options: vec![],
            skip_trim: false,
            cache_mode: 0,
        };
        t.mounts.push(rbd_mount("/mnt/a"));
        t.mounts.push(rbd_mount("/mnt/b"));
        assert_eq!(fields(validate_buildkit(t, &limits()).unwrap_err()), ["buildkit.mounts[2].source"]);
    }

    #[test]
    fn each_cache_mode_is_taken_where_its_source_can_do_it_and_refused_by_name_where_not() {
        let with = |source: pb::volume_mount::Source, mode: pb::CacheMode| {
            let mut t = good_task();
            t.mounts[0].source = Some(source);
            t.mounts[0].cache_mode = mode as i32;
            validate_buildkit(t, &limits())
        };
        let device = || pb::volume_mount::Source::Device(pb::BlockDevice { path: "/dev/nvme1n1".into(), ebs_volume_id: String::new() });
        let file = || pb::volume_mount::Source::File(pb::FileBackedVolume { path: "/var/lib/machine-agent/volumes/a.img".into(), size_bytes: 1 << 30 });
        let rbd = |size_bytes: u64, take_over_from: &str| {
            pb::volume_mount::Source::Rbd(pb::RbdVolume { size_bytes, take_over_from: take_over_from.into(), ..rbd::tests::good_rbd() })
        };
        let mode_of = |r: Result<BuildkitTask, TaskError>| r.map(|t| t.mounts[0].cache_mode).map_err(fields);
        assert_eq!(mode_of(with(device(), pb::CacheMode::Unspecified)), Ok(CacheMode::Primary), "unset is primary");
        assert_eq!(mode_of(with(device(), pb::CacheMode::Isolated)), Ok(CacheMode::Isolated));
        assert_eq!(mode_of(with(file(), pb::CacheMode::Clone)), Ok(CacheMode::Clone));
        assert_eq!(mode_of(with(rbd(1 << 30, ""), pb::CacheMode::Clone)), Ok(CacheMode::Clone));
        assert_eq!(mode_of(with(rbd(1 << 30, ""), pb::CacheMode::Isolated)), Ok(CacheMode::Isolated));
        let refused = vec!["buildkit.mounts[0].cache_mode".to_string()];
        assert_eq!(mode_of(with(device(), pb::CacheMode::Clone)), Err(refused.clone()), "a device has no snapshots to clone");
        assert_eq!(mode_of(with(rbd(0, ""), pb::CacheMode::Isolated)), Err(refused.clone()), "an isolated image is created: it needs a size");
        assert_eq!(mode_of(with(rbd(1 << 30, "other"), pb::CacheMode::Clone)), Err(refused.clone()), "a clone never takes a lock over");
        let mut t = good_task();
        t.mounts[0].cache_mode = 9;
        assert_eq!(fields(validate_buildkit(t, &limits()).unwrap_err()), refused, "an unknown mode");
    }

    #[test]
    fn a_cache_mode_differs_like_any_other_field() {
        let running = validate_buildkit(good_task(), &limits()).unwrap();
        let mut offered = running.clone();
        offered.mounts[0].cache_mode = CacheMode::Isolated;
        assert_eq!(differing_fields(&running, &offered), ["buildkit.mounts[0].cache_mode"]);
    }

    #[test]
    fn a_good_task_validates() {
        let t = validate_buildkit(good_task(), &limits()).unwrap();
        assert_eq!(t.id, "task-1");
        assert_eq!(t.mounts[0].fs_type, FsType::Ext4);
        assert_eq!(t.max_parallelism, Some(4));
    }

    #[test]
    fn every_bad_field_is_named() {
        let mut t = good_task();
        t.task_id = "bad id!".into();
        t.listen_address = "nowhere".into();
        t.cache_size_bytes = 0;
        t.mounts[0].mount_path = "/etc/../var/lib/buildkit/x".into();
        t.mounts[0].options = vec!["exec".into()];
        t.engine_env.insert("LD_PRELOAD".into(), "/evil.so".into());
        t.tls.as_mut().unwrap().key_pem = cert().into();
        let f = fields(validate_buildkit(t, &limits()).unwrap_err());
        for expected in [
            "buildkit.task_id",
            "buildkit.listen_address",
            "buildkit.cache_size_bytes",
            "buildkit.mounts[0].mount_path",
            "buildkit.mounts[0].options[0]",
            "buildkit.engine_env[LD_PRELOAD]",
            "buildkit.tls.key_pem",
        ] {
            assert!(f.iter().any(|x| x == expected), "{expected} not in {f:?}");
        }
    }

    #[test]
    fn mount_outside_the_allow_list_is_refused() {
        for path in ["/etc/buildkit", "/var/lib", "/var/lib/buildkitfoo", "relative", "/mnt/../etc"] {
            let mut t = good_task();
            t.mounts[0].mount_path = path.into();
            assert_eq!(fields(validate_buildkit(t, &limits()).unwrap_err()), vec!["buildkit.mounts[0].mount_path"], "{path}");
        }
    }

    #[test]
    fn backing_files_outside_the_allowed_dirs_and_mounts_over_the_agents_dirs_are_refused() {
        let file = |path: &str| Some(pb::volume_mount::Source::File(pb::FileBackedVolume { path: path.into(), size_bytes: 1 << 30 }));
        for path in ["/etc/passwd", "/run/cache.img", "/var/lib/machine-agent/volumes", "/var/lib/machine-agent/volumesx/a.img", "/var/lib/x"] {
            let mut t = good_task();
            t.mounts[0].source = file(path);
            assert_eq!(fields(validate_buildkit(t, &limits()).unwrap_err()), vec!["buildkit.mounts[0].file.path"], "{path}");
        }
        let mut t = good_task();
        t.mounts[0].source = file("/var/lib/machine-agent/volumes/a/cache.img");
        assert!(validate_buildkit(t, &limits()).is_ok());

        let mut limits = limits();
        limits.allowed_mount_prefixes.push("/var/lib/machine-agent".into());
        limits.allowed_mount_prefixes.push("/run".into());
        limits.allowed_mount_prefixes.push("/var".into());
        for path in ["/var/lib/machine-agent", "/var/lib/machine-agent/engine", "/var/lib", "/run/machine-agent/x", "/run"] {
            let mut t = good_task();
            t.mounts[0].mount_path = path.into();
            let err = validate_buildkit(t, &limits).unwrap_err();
            assert_eq!(fields(err.clone()), vec!["buildkit.mounts[0].mount_path"], "{path}");
            assert!(err.to_string().contains("the agent's own directory"), "{err}");
        }
    }

    #[test]
    fn device_must_be_under_dev_and_ebs_id_well_formed() {
        let mut t = good_task();
        t.mounts[0].source = Some(pb::volume_mount::Source::Device(pb::BlockDevice { path: "/home/disk".into(), ebs_volume_id: "vol-XYZ".into() }));
        assert_eq!(fields(validate_buildkit(t, &limits()).unwrap_err()), vec!["buildkit.mounts[0].device.path", "buildkit.mounts[0].device.ebs_volume_id"]);
    }

    #[test]
    fn overlapping_mounts_are_refused() {
        let mut t = good_task();
        let mut second = t.mounts[0].clone();
        second.mount_path = "/var/lib/buildkit/cache/inner".into();
        second.source = Some(pb::volume_mount::Source::File(pb::FileBackedVolume { path: "/var/lib/x/x.img".into(), size_bytes: 1 << 30 }));
        t.mounts.push(second);
        assert_eq!(fields(validate_buildkit(t, &limits()).unwrap_err()), vec!["buildkit.mounts[1].mount_path"]);
    }

    #[test]
    fn gc_watermarks_must_be_ordered_pairs() {
        let mut t = good_task();
        t.gc = Some(pb::GcPolicy {
            free_bytes_high_watermark_percent: Some(30),
            free_bytes_low_watermark_percent: Some(20),
            free_inodes_high_watermark_percent: Some(5),
            retention_secs: Some(0),
            ..Default::default()
        });
        assert_eq!(
            fields(validate_buildkit(t, &limits()).unwrap_err()),
            vec!["buildkit.gc.retention_secs", "buildkit.gc.free_bytes_high_watermark_percent", "buildkit.gc.free_inodes_high_watermark_percent"]
        );
    }

    #[test]
    fn oversized_pem_is_refused_without_parsing() {
        let mut t = good_task();
        t.tls.as_mut().unwrap().ca_pem = cert().repeat(MAX_PEM_BYTES / cert().len() + 1);
        assert_eq!(fields(validate_buildkit(t, &limits()).unwrap_err()), vec!["buildkit.tls.ca_pem"]);
    }

    #[test]
    fn key_material_never_appears_in_errors_or_debug() {
        let mut t = good_task();
        t.task_id = String::new();
        t.tls.as_mut().unwrap().key_pem = "-----BEGIN CERTIFICATE-----\nU0VDUkVUS0VZ\n-----END CERTIFICATE-----\n".into();
        let err = validate_buildkit(t, &limits()).unwrap_err();
        assert!(!err.to_string().contains("U0VDUkVUS0VZ"));
        let ok = validate_buildkit(good_task(), &limits()).unwrap();
        assert!(!format!("{ok:?}").contains("MIGHAgEAMBMG"));
    }

    #[test]
    fn missing_task_is_a_named_error() {
        assert_eq!(fields(validate_task(None, &limits()).unwrap_err()), vec!["task"]);
        assert_eq!(validate_task(Some(pb::register_response::Task::Pending(pb::PendingTask {})), &limits()).unwrap(), Task::Pending);
    }

    #[test]
    fn engine_variables_outside_the_allow_list_are_refused_by_name() {
        let forbidden = ["GODEBUG", "SSL_CERT_FILE", "OTEL_EXPORTER_OTLP_ENDPOINT", "NOTIFY_SOCKET", "LISTEN_FDS", "PATH", "HOME", "LD_PRELOAD", "lower_case"];
        let mut t = good_task();
        for name in forbidden {
            t.engine_env.insert(name.into(), "x".into());
        }
        let f = fields(validate_buildkit(t, &limits()).unwrap_err());
        let expected: Vec<String> = forbidden.iter().map(|n| format!("buildkit.engine_env[{n}]")).collect();
        let mut f_sorted = f.clone();
        f_sorted.sort();
        let mut expected_sorted = expected.clone();
        expected_sorted.sort();
        assert_eq!(f_sorted, expected_sorted);

        let mut t = good_task();
        for name in PROXY_ENV.iter().chain(&["ENGINE_MARKER"]) {
            t.engine_env.insert((*name).into(), "http://proxy.internal:3128".into());
        }
        let ok = validate_buildkit(t, &limits()).unwrap();
        assert_eq!(ok.engine_env.len(), PROXY_ENV.len() + 1);
    }

    #[test]
    fn devices_are_fully_qualified_cdi_names_named_once() {
        let mut t = good_task();
        t.devices = vec!["nvidia.com/gpu=all".into(), "vendor.example/class=name:1".into(), "a/b=0".into()];
        assert_eq!(validate_buildkit(t, &limits()).unwrap().devices, ["nvidia.com/gpu=all", "vendor.example/class=name:1", "a/b=0"]);
        let bad =
            ["nvidia.com/gpu", "gpu=all", "/dev/nvidia0", "nvidia.com/gpu=", "1vendor/class=x", "vendor/class-=x", "vendor/cl:ass=x", "v/c=-x", "v/c=x y", ""];
        for (i, name) in bad.iter().enumerate() {
            assert!(check_cdi_name(name).is_err(), "{name:?} must be refused");
            let mut t = good_task();
            t.devices = vec!["a/b=ok".into(), (*name).into()];
            let err = validate_buildkit(t, &limits()).unwrap_err();
            assert_eq!(fields(err.clone()), ["buildkit.devices[1]"], "case {i}: {name:?}");
            assert!(err.to_string().contains("vendor/class=name"), "{err}");
        }
        let mut t = good_task();
        t.devices = vec!["a/b=x".into(), "a/b=x".into()];
        assert_eq!(fields(validate_buildkit(t, &limits()).unwrap_err()), ["buildkit.devices[1]"]);
        let mut t = good_task();
        t.devices = vec!["a/b=x".into(); MAX_DEVICES + 1];
        assert_eq!(fields(validate_buildkit(t, &limits()).unwrap_err()), ["buildkit.devices"]);
        let mut t = good_task();
        t.devices = vec![format!("a/b={}", "x".repeat(1 << 20))];
        let err = validate_buildkit(t, &limits()).unwrap_err();
        assert!(err.to_string().len() < 512, "a long name is not quoted whole");
    }

    #[test]
    fn a_trace_endpoint_must_equal_an_allowed_one() {
        let mut t = good_task();
        t.trace_endpoint = "http://otel.internal:4317".into();
        assert_eq!(validate_buildkit(t, &limits()).unwrap().trace_endpoint.as_deref(), Some("http://otel.internal:4317"));
        assert_eq!(validate_buildkit(good_task(), &limits()).unwrap().trace_endpoint, None);
        for other in
            ["http://otel.internal:4318", "http://otel.internal:4317/", "https://otel.internal:4317", "http://evil.example:4317", " http://otel.internal:4317"]
        {
            let mut t = good_task();
            t.trace_endpoint = other.into();
            let err = validate_buildkit(t, &limits()).unwrap_err();
            assert_eq!(fields(err.clone()), ["buildkit.trace_endpoint"], "{other}");
            assert!(err.to_string().contains("engine.trace_endpoints"), "{err}");
        }
        let mut none = limits();
        none.trace_endpoints.clear();
        let mut t = good_task();
        t.trace_endpoint = "http://otel.internal:4317".into();
        assert!(validate_buildkit(t, &none).unwrap_err().to_string().contains("allows none"));
    }

    #[test]
    fn otel_variables_are_refused_in_engine_env_even_when_the_config_allows_them() {
        let mut limits = limits();
        limits.allowed_engine_env.insert("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".into());
        let mut t = good_task();
        for name in ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME"] {
            t.engine_env.insert(name.into(), "http://evil.example:4317".into());
        }
        let err = validate_buildkit(t, &limits).unwrap_err();
        let mut f = fields(err.clone());
        f.sort();
        assert_eq!(
            f,
            ["buildkit.engine_env[OTEL_EXPORTER_OTLP_TRACES_ENDPOINT]", "buildkit.engine_env[OTEL_SERVICE_NAME]", "buildkit.engine_env[OTEL_TRACES_EXPORTER]"]
        );
        assert!(err.to_string().contains("buildkit.trace_endpoint"), "the error says where traces are asked for: {err}");
    }

    #[test]
    fn floods_are_one_problem_each_and_no_entry_is_looked_at() {
        let mut t = good_task();
        t.mounts[0].options = vec![String::new(); 2_000_000];
        t.engine_env = (0..100_000).map(|i| (format!("V{i}"), String::new())).collect();
        let err = validate_buildkit(t, &limits()).unwrap_err();
        assert_eq!(fields(err), ["buildkit.mounts[0].options", "buildkit.engine_env"]);
    }

    #[test]
    fn a_rejection_lists_twenty_problems_and_counts_the_rest() {
        let mut t = good_task();
        t.engine_env = (0..MAX_ENGINE_ENV).map(|i| (format!("NOT_ALLOWED_{i}"), "\0".repeat(2))).collect();
        let err = validate_buildkit(t, &limits()).unwrap_err();
        assert_eq!(err.0.len(), MAX_LISTED_PROBLEMS);
        assert_eq!(err.count(), 2 * MAX_ENGINE_ENV);
        assert!(err.to_string().ends_with(&format!("; and {} more problem(s) not listed", 2 * MAX_ENGINE_ENV - MAX_LISTED_PROBLEMS)), "{err}");
    }

    #[test]
    fn a_path_longer_than_path_max_is_refused_by_its_length_and_not_quoted() {
        let mut t = good_task();
        t.mounts[0].mount_path = format!("/var/lib/buildkit/{}", "a".repeat(1 << 20));
        let err = validate_buildkit(t, &limits()).unwrap_err();
        assert_eq!(fields(err.clone()), ["buildkit.mounts[0].mount_path"]);
        assert!(err.to_string().len() < 512, "{}", err.to_string().len());
    }

    /// Text from arbitrary bytes: NULs, control characters, and non-UTF-8
    /// sequences (replaced, as a decoder that accepted them would have to).
    fn hostile_text() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..24).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            Just(String::new()),
            Just("\0".to_string()),
            Just("HTTP_PROXY".to_string()),
            Just("noatime".to_string()),
            (1usize..8_192).prop_map(|n| "x".repeat(n)),
        ]
    }

    prop_compose! {
        fn hostile_task()(
            mount_count in prop_oneof![0usize..3, 7usize..12, Just(2_000usize)],
            option_count in prop_oneof![0usize..20, Just(MAX_MOUNT_OPTIONS), Just(MAX_MOUNT_OPTIONS + 1), Just(300_000usize)],
            option in hostile_text(),
            env_count in prop_oneof![0usize..70, Just(MAX_ENGINE_ENV + 1), Just(50_000usize)],
            key in hostile_text(), value in hostile_text(), path in hostile_text(),
            rbd_text in hostile_text(), rbd_field in 0usize..9, monitor_count in prop_oneof![0usize..3, Just(rbd::MAX_MONITORS + 1), Just(100_000usize)],
            device_count in prop_oneof![0usize..4, Just(MAX_DEVICES + 1), Just(100_000usize)], device in hostile_text(), endpoint in hostile_text(),
        ) -> pb::BuildkitTask {
            // Floods repeat a short text (a 1 MiB message holds no more); one long
            // text rides in the first option, variable and the mount path.
            let short = |s: &str| s.chars().take(16).collect::<String>();
            let mut t = good_task();
            let mut mount = t.mounts[0].clone();
            let others = vec![mount.clone(); mount_count.saturating_sub(1)];
            mount.mount_path = format!("/var/lib/buildkit/{path}");
            mount.options = vec![short(&option); option_count.saturating_sub(1)];
            t.mounts = vec![mount; mount_count.min(1)];
            t.mounts.extend(others);
            if let Some(first) = t.mounts.first_mut() {
                first.options.push(option);
            }
            t.engine_env = (1..env_count).map(|i| (format!("{}{i}", short(&key)), short(&value))).collect();
            if env_count > 0 {
                t.engine_env.insert(key, value);
            }
            t.devices = vec![short(&device); device_count.saturating_sub(1)];
            if device_count > 0 {
                t.devices.push(device);
            }
            t.trace_endpoint = endpoint;
            // One RBD mount with a good shape, one field of it hostile, and a monitor flood.
            let mut r = rbd::tests::good_rbd();
            r.monitors = vec![short(&rbd_text); monitor_count];
            match rbd_field {
                0 => r.pool = rbd_text,
                1 => r.namespace = rbd_text,
                2 => r.image = rbd_text,
                3 => r.client_name = rbd_text,
                4 => r.key = rbd_text,
                5 => r.ceph_conf = format!("[global]\n{rbd_text} = {rbd_text}\n"),
                6 => r.ceph_conf = rbd_text.repeat(3),
                7 => r.take_over_from = rbd_text,
                _ => r.monitors.push(rbd_text),
            }
            t.mounts.push(pb::VolumeMount {
                mount_path: "/mnt/rbd".into(),
                source: Some(pb::volume_mount::Source::Rbd(r)),
                fs_type: pb::FilesystemType::Xfs as i32,
                options: vec![],
                skip_trim: false, cache_mode: 0,
            });
            t
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn hostile_task_shapes_never_panic_and_their_rejection_stays_small(task in hostile_task()) {
            if let Err(err) = validate_buildkit(task, &limits()) {
                prop_assert!(!err.0.is_empty() && err.0.len() <= MAX_LISTED_PROBLEMS, "{} problems listed", err.0.len());
                // Twenty problems of a quoted field and a line each.
                prop_assert!(err.to_string().len() <= 16 * 1024, "{} bytes", err.to_string().len());
            }
        }
    }

    #[test]
    fn non_utf8_bytes_in_an_engine_variable_are_refused_by_the_decoder() {
        use prost::Message;
        let mut task = good_task();
        task.engine_env.insert("HTTP_PROXY".into(), "AAAA".into());
        let mut bytes = pb::RegisterResponse { task: Some(pb::register_response::Task::Buildkit(task)), ..Default::default() }.encode_to_vec();
        let at = bytes.windows(4).position(|w| w == b"AAAA").unwrap();
        bytes[at] = 0xff;
        assert!(pb::RegisterResponse::decode(bytes.as_slice()).is_err());
    }

    fn arb_string() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,40}",
            Just("/var/lib/buildkit/cache".to_string()),
            Just("/dev/nvme1n1".to_string()),
            Just("vol-0123456789abcdef0".to_string()),
            Just(cert().to_string()),
            Just(key().to_string()),
            Just("127.0.0.1:443".to_string()),
            "/[a-z./]{0,30}",
        ]
    }

    /// Strings an RBD field might hold: good values of each field, hostile text, and arbitrary text.
    fn arb_rbd_string() -> BoxedStrategy<String> {
        // Boxed: nine of these in a mount, ten mounts in a task, overflow the test thread's stack unboxed.
        prop_oneof![
            arb_string(),
            Just("builds".to_string()),
            Just("client.buildkit".to_string()),
            Just(rbd::tests::good_key()),
            Just("10.0.0.1:6789".to_string()),
            Just("[v2:10.0.0.2:3300,v1:10.0.0.2:6789]".to_string()),
            Just("[global]\nmon_host = 10.0.0.1:6789\nrbd cache = true\n".to_string()),
            Just("[client]\nadmin socket = /run/x.asok\n".to_string()),
            hostile_text(),
        ]
        .boxed()
    }

    prop_compose! {
        fn arb_rbd()(
            pool in arb_rbd_string(), namespace in arb_rbd_string(), image in arb_rbd_string(), client_name in arb_rbd_string(),
            key in arb_rbd_string(), monitors in proptest::collection::vec(arb_rbd_string(), 0..4), ceph_conf in arb_rbd_string(),
            size_bytes in prop_oneof![Just(0u64), Just(1u64 << 30), any::<u64>()], take_over_from in arb_rbd_string(),
        ) -> pb::RbdVolume {
            pb::RbdVolume { pool, namespace, image, client_name, key, monitors, ceph_conf, size_bytes, take_over_from }
        }
    }

    prop_compose! {
        fn arb_mount()(
            mount_path in arb_string(), dev in arb_string(), ebs in arb_string(), file_size in any::<u64>(),
            kind in 0u8..4, rbd in arb_rbd().boxed(), fs_type in -2i32..6, options in proptest::collection::vec(arb_string(), 0..4),
            skip_trim in any::<bool>()
        ) -> pb::VolumeMount {
            let source = match kind {
                0 => None,
                1 => Some(pb::volume_mount::Source::File(pb::FileBackedVolume { path: dev.clone(), size_bytes: file_size })),
                2 => Some(pb::volume_mount::Source::Device(pb::BlockDevice { path: dev.clone(), ebs_volume_id: ebs.clone() })),
                _ => Some(pb::volume_mount::Source::Rbd(rbd)),
            };
            pb::VolumeMount { mount_path, source, fs_type, options, skip_trim, cache_mode: 0 }
        }
    }

    prop_compose! {
        fn arb_task()(
            task_id in arb_string(), cert in arb_string(), key in arb_string(), ca in arb_string(), has_tls in any::<bool>(),
            mounts in proptest::collection::vec(arb_mount(), 0..10), cache_size_bytes in any::<u64>(),
            retention in any::<Option<u64>>(), hi in any::<Option<u32>>(), lo in any::<Option<u32>>(),
            max_parallelism in any::<u32>(), debug in any::<bool>(), listen in arb_string(),
            env in proptest::collection::btree_map(arb_string(), arb_string(), 0..4)
        ) -> pb::BuildkitTask {
            pb::BuildkitTask {
                task_id,
                tls: has_tls.then_some(pb::TlsMaterial { cert_pem: cert, key_pem: key, ca_pem: ca }),
                mounts, cache_size_bytes,
                gc: Some(pb::GcPolicy { retention_secs: retention, free_bytes_high_watermark_percent: hi, free_bytes_low_watermark_percent: lo, ..Default::default() }),
                max_parallelism, debug, listen_address: listen,
                engine_env: env.into_iter().collect(),
                devices: Vec::new(),
                trace_endpoint: String::new(),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_tasks_never_panic_and_every_rejection_names_a_field(task in arb_task()) {
            if let Err(err) = validate_buildkit(task, &limits()) {
                prop_assert!(!err.0.is_empty());
                for e in &err.0 {
                    prop_assert!(e.field.starts_with("buildkit."), "field {:?}", e.field);
                    prop_assert!(!e.problem.is_empty());
                }
            }
        }

        #[test]
        fn arbitrary_bytes_decoded_as_a_register_response_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            use prost::Message;
            if let Ok(resp) = pb::RegisterResponse::decode(bytes.as_slice()) {
                if let Err(err) = validate_task(resp.task, &limits()) {
                    prop_assert!(err.0.iter().all(|e| !e.field.is_empty()));
                }
            }
        }
    }
}
