//! buildkitd.toml, rendered from typed structs by serde and the `toml`
//! serializer, so no task value is ever pasted into TOML text: quotes,
//! newlines and brackets in a value are escaped by the serializer and cannot
//! add keys or tables. Pure: [`render`] returns the text, the caller writes it.
//!
//! Key spellings and value formats are BuildKit v0.34.2's
//! (`cmd/buildkitd/config/config.go`, `gcpolicy.go`; decoded by go-toml v2,
//! which ignores unknown keys, so a misspelling would be silently dropped:
//! `tests/engine_render.rs` starts the real buildkitd on every golden variant
//! and reads the GC policy back from `buildctl debug workers`):
//!
//! - top level `root`, `debug`; `[grpc] address` (`tcp://ip:port`,
//!   `unix:///path`); `[grpc.tls] cert`, `key`, `ca`. With `ca` set buildkitd
//!   requires and verifies client certificates (`tls.RequireAndVerifyClientCert`)
//!   on its TCP listeners; the unix socket never uses TLS.
//! - `[worker.oci] enabled`, `snapshotter`, `gc`, `max-parallelism` (kebab
//!   case, unlike its neighbours), `defaultCgroupParent`, `networkMode`,
//!   `cniConfigPath`, `cniBinaryPath`; `[[worker.oci.gcpolicy]]`;
//!   `[worker.containerd] enabled`.
//! - gcpolicy keys `all`, `filters`, `keepDuration`, `reservedSpace`,
//!   `maxUsedSpace`, `minFreeSpace` (`keepBytes` is the deprecated alias of
//!   `reservedSpace`). A duration is a Go duration string ("336h") or integer
//!   seconds; we write the string. A size is an integer of bytes, a string
//!   with binary units ("10GB" = 10 GiB) or a percentage of the filesystem
//!   holding `root` ("5%"); we write integer bytes or "N%".
//!
//! - `[cdi] disabled`, `specDirs`, `autoAllowed` (cmd/buildkitd/config's
//!   `CDIConfig`). An empty or absent `specDirs` means BuildKit's defaults
//!   (/etc/cdi, /var/run/cdi), so with no dirs configured CDI is disabled
//!   outright. Without devices (and CDI on) the section is left out, as agents
//!   before CDI rendered it, so an upgraded agent still adopts their engine.
//!   `autoAllowed` holds the task's devices: a build may use those
//!   without the client granting the `device` entitlement (which this engine
//!   never lets a client grant), and no others.
//!
//! Network mode is always written: BuildKit's default "auto" picks CNI when a
//! config exists at its default path (/etc/buildkit/cni.json) and host
//! networking otherwise, so what the engine does would depend on stray files.

use crate::task::tls::TlsPaths;
use crate::task::BuildkitTask;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// sun_path holds 108 bytes including the terminating NUL.
pub const MAX_UNIX_SOCKET_PATH_BYTES: usize = 107;

/// Where things are, decided by the agent (never by the task).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineLayout {
    /// BuildKit's root: on the mounted cache volume.
    pub root: PathBuf,
    /// The agent's own address for the engine (probes, GC).
    pub unix_socket: PathBuf,
    /// What [`crate::task::tls::write`] wrote.
    pub tls: TlsPaths,
    /// `[worker.oci] defaultCgroupParent`: where build steps' cgroups go, so
    /// they count against the engine's memory limit. None leaves runc's default
    /// (steps escape the engine's cgroup).
    pub cgroup_parent: Option<String>,
    /// CNI networking for build steps; None means host networking.
    pub cni: Option<CniPaths>,
    /// `[cdi] specDirs`: where the engine reads CDI specs; empty disables CDI.
    pub cdi_spec_dirs: Vec<PathBuf>,
}

/// `networkMode = "cni"` and where its config and plugins are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniPaths {
    /// `cniConfigPath`: the network config (a .json or .conflist file).
    pub config: PathBuf,
    /// `cniBinaryPath`: the directory holding the plugins.
    pub binary_dir: PathBuf,
}

/// A size in a gcpolicy rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskSpace {
    Bytes(u64),
    /// Of the filesystem holding BuildKit's root. BuildKit turns it into bytes
    /// as `(size * pct / 100 / GiB + 1) * 10^9`: rounded up to a whole
    /// GiB count plus one, in decimal GB, so never below 1 GB however small
    /// the filesystem.
    Percent(u8),
}

/// One `[[worker.oci.gcpolicy]]` rule. BuildKit applies the rules in order;
/// each prunes unused records that match `filters` (all records when empty;
/// without `all`, internal, frontend and shared records are skipped):
/// - those unused for longer than `keep_duration`, if set;
/// - then, while the matching records use more than a target, the least
///   recently used ones. The target is `max_used_space`, lowered as far as
///   needed to leave `min_free_space` free on the filesystem, but never below
///   `reserved_space`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GcBackstopRule {
    pub all: bool,
    /// One filter per string: several strings OR; commas inside one AND.
    pub filters: Vec<String>,
    pub keep_duration: Option<Duration>,
    pub reserved_space: Option<DiskSpace>,
    pub max_used_space: Option<DiskSpace>,
    pub min_free_space: Option<DiskSpace>,
}

/// Why buildkitd.toml could not be rendered.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum RenderError {
    /// engine layout: {field} must be an absolute path, got {path}
    NotAbsolute { field: &'static str, path: PathBuf },
    /// engine layout: {field} is not valid UTF-8: {path}
    NotUtf8 { field: &'static str, path: PathBuf },
    /// engine layout: unix_socket {path} is {len} bytes; a unix socket path holds at most 107
    SocketPathTooLong { path: PathBuf, len: usize },
    /// engine layout: cgroup_parent must be an absolute cgroup path without NUL, got {0:?}
    BadCgroupParent(String),
    /// no GC rules: BuildKit would fall back to its own default policy
    NoGcRules,
    /// GC rule {index}: {problem}
    BadGcRule { index: usize, problem: &'static str },
    /// cannot serialize buildkitd.toml: {0}
    Serialize(#[from] toml::ser::Error),
}

// === the TOML shapes (private: only render() makes them) ===

#[derive(Serialize)]
struct Config<'a> {
    root: &'a str,
    debug: bool,
    grpc: Grpc<'a>,
    worker: Workers<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cdi: Option<Cdi<'a>>,
}

#[derive(Serialize)]
struct Cdi<'a> {
    disabled: bool,
    #[serde(rename = "specDirs", skip_serializing_if = "Vec::is_empty")]
    spec_dirs: Vec<&'a str>,
    #[serde(rename = "autoAllowed", skip_serializing_if = "<[String]>::is_empty")]
    auto_allowed: &'a [String],
}

#[derive(Serialize)]
struct Grpc<'a> {
    address: Vec<String>,
    tls: GrpcTls<'a>,
}

#[derive(Serialize)]
struct GrpcTls<'a> {
    cert: &'a str,
    key: &'a str,
    ca: &'a str,
}

#[derive(Serialize)]
struct Workers<'a> {
    oci: Oci<'a>,
    containerd: Containerd,
}

#[derive(Serialize)]
struct Oci<'a> {
    enabled: bool,
    snapshotter: &'static str,
    gc: bool,
    #[serde(rename = "max-parallelism", skip_serializing_if = "Option::is_none")]
    max_parallelism: Option<u32>,
    #[serde(rename = "defaultCgroupParent", skip_serializing_if = "Option::is_none")]
    default_cgroup_parent: Option<&'a str>,
    #[serde(rename = "networkMode")]
    network_mode: &'static str,
    #[serde(rename = "cniConfigPath", skip_serializing_if = "Option::is_none")]
    cni_config_path: Option<&'a str>,
    #[serde(rename = "cniBinaryPath", skip_serializing_if = "Option::is_none")]
    cni_binary_path: Option<&'a str>,
    gcpolicy: Vec<GcPolicy<'a>>,
}

#[derive(Serialize)]
struct GcPolicy<'a> {
    all: bool,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    filters: &'a [String],
    #[serde(rename = "keepDuration", skip_serializing_if = "Option::is_none")]
    keep_duration: Option<String>,
    #[serde(rename = "reservedSpace", skip_serializing_if = "Option::is_none")]
    reserved_space: Option<DiskSpace>,
    #[serde(rename = "maxUsedSpace", skip_serializing_if = "Option::is_none")]
    max_used_space: Option<DiskSpace>,
    #[serde(rename = "minFreeSpace", skip_serializing_if = "Option::is_none")]
    min_free_space: Option<DiskSpace>,
}

#[derive(Serialize)]
struct Containerd {
    enabled: bool,
}

impl Serialize for DiskSpace {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Bytes(b) => s.serialize_u64(*b),
            Self::Percent(p) => s.serialize_str(&format!("{p}%")),
        }
    }
}

// === render ===

/// Renders buildkitd.toml for `task` with the agent's `layout` and the GC
/// backstop `gc` (see [`crate::gc::backstop::backstop_policy`]).
pub fn render(task: &BuildkitTask, layout: &EngineLayout, gc: &[GcBackstopRule]) -> Result<String, RenderError> {
    let root = path_str("root", &layout.root)?;
    let socket = path_str("unix_socket", &layout.unix_socket)?;
    if socket.len() > MAX_UNIX_SOCKET_PATH_BYTES {
        return Err(RenderError::SocketPathTooLong { path: layout.unix_socket.clone(), len: socket.len() });
    }
    let tls = GrpcTls { cert: path_str("tls.cert", &layout.tls.cert)?, key: path_str("tls.key", &layout.tls.key)?, ca: path_str("tls.ca", &layout.tls.ca)? };
    if let Some(parent) = &layout.cgroup_parent {
        if !parent.starts_with('/') || parent.contains('\0') {
            return Err(RenderError::BadCgroupParent(parent.clone()));
        }
    }
    let (network_mode, cni_config_path, cni_binary_path) = match &layout.cni {
        Some(cni) => ("cni", Some(path_str("cni.config", &cni.config)?), Some(path_str("cni.binary_dir", &cni.binary_dir)?)),
        None => ("host", None, None),
    };
    if gc.is_empty() {
        return Err(RenderError::NoGcRules);
    }
    let gcpolicy = gc.iter().enumerate().map(|(index, rule)| gc_policy(index, rule)).collect::<Result<Vec<_>, _>>()?;
    let spec_dirs = layout.cdi_spec_dirs.iter().map(|d| path_str("cdi_spec_dirs", d)).collect::<Result<Vec<_>, _>>()?;
    // Without devices and with CDI on, BuildKit's defaults serve as well, and
    // leaving the section out keeps the rendering (and so the digest an
    // upgraded agent adopts by) what agents before CDI wrote.
    let cdi = (spec_dirs.is_empty() || !task.devices.is_empty()).then_some(Cdi { disabled: spec_dirs.is_empty(), spec_dirs, auto_allowed: &task.devices });

    let config = Config {
        root,
        debug: task.debug,
        grpc: Grpc { address: vec![format!("tcp://{}", task.listen_address), format!("unix://{socket}")], tls },
        worker: Workers {
            oci: Oci {
                enabled: true,
                snapshotter: "overlayfs",
                gc: true,
                max_parallelism: task.max_parallelism,
                default_cgroup_parent: layout.cgroup_parent.as_deref(),
                network_mode,
                cni_config_path,
                cni_binary_path,
                gcpolicy,
            },
            containerd: Containerd { enabled: false },
        },
        cdi,
    };
    Ok(toml::to_string(&config)?)
}

fn path_str<'a>(field: &'static str, path: &'a Path) -> Result<&'a str, RenderError> {
    if !path.is_absolute() {
        return Err(RenderError::NotAbsolute { field, path: path.to_path_buf() });
    }
    path.to_str().ok_or_else(|| RenderError::NotUtf8 { field, path: path.to_path_buf() })
}

fn gc_policy(index: usize, rule: &GcBackstopRule) -> Result<GcPolicy<'_>, RenderError> {
    let bad = |problem| RenderError::BadGcRule { index, problem };
    // BuildKit reads zero as "not set"; a rule with nothing set prunes every
    // matching unused record on each GC run.
    if rule.keep_duration.is_none() && rule.reserved_space.is_none() && rule.max_used_space.is_none() && rule.min_free_space.is_none() {
        return Err(bad("sets no limit, so BuildKit would prune every matching record"));
    }
    for space in [rule.reserved_space, rule.max_used_space, rule.min_free_space].into_iter().flatten() {
        match space {
            DiskSpace::Bytes(0) | DiskSpace::Percent(0) => return Err(bad("a size of zero means unset to BuildKit; leave it None")),
            DiskSpace::Percent(p) if p > 100 => return Err(bad("a percentage above 100")),
            DiskSpace::Bytes(b) if i64::try_from(b).is_err() => return Err(bad("a size beyond BuildKit's int64")),
            _ => {}
        }
    }
    if rule.filters.iter().any(|f| f.is_empty()) {
        return Err(bad("an empty filter string"));
    }
    let keep_duration = match rule.keep_duration {
        None => None,
        Some(d) if d.is_zero() => return Err(bad("a keep duration of zero means unset to BuildKit; leave it None")),
        Some(d) => Some(go_duration(d).ok_or_else(|| bad("a keep duration beyond Go's (about 292 years)"))?),
    };
    Ok(GcPolicy {
        all: rule.all,
        filters: &rule.filters,
        keep_duration,
        reserved_space: rule.reserved_space,
        max_used_space: rule.max_used_space,
        min_free_space: rule.min_free_space,
    })
}

/// `d` as a Go duration string in the largest unit that divides it exactly
/// ("336h", "90m", "1500ms"); None if Go's int64 nanoseconds cannot hold it.
fn go_duration(d: Duration) -> Option<String> {
    let ns = i64::try_from(d.as_nanos()).ok()?;
    let units: [(i64, &str); 5] = [(3_600_000_000_000, "h"), (60_000_000_000, "m"), (1_000_000_000, "s"), (1_000_000, "ms"), (1_000, "us")];
    Some(match units.iter().find(|(size, _)| ns % size == 0) {
        Some((size, unit)) => format!("{}{unit}", ns / size),
        None => format!("{ns}ns"),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::task::{CacheMode, FsType, GcOverrides, TlsMaterial, VolumeMount, VolumeSource};

    pub fn task() -> BuildkitTask {
        BuildkitTask {
            id: "task-1".into(),
            tls: TlsMaterial { cert_pem: String::new(), key_pem: Secret::new(""), ca_pem: String::new() },
            mounts: vec![VolumeMount {
                mount_path: "/var/lib/buildkit/cache".into(),
                source: VolumeSource::Device { path: "/dev/nvme1n1".into(), ebs_volume_id: None },
                fs_type: FsType::Ext4,
                options: vec![],
                skip_trim: false,
                cache_mode: CacheMode::Primary,
            }],
            cache_size_bytes: 100 << 30,
            gc: GcOverrides::default(),
            max_parallelism: None,
            debug: false,
            listen_address: "0.0.0.0:8372".parse().unwrap(),
            engine_env: Default::default(),
            devices: vec![],
            trace_endpoint: None,
        }
    }

    pub fn layout() -> EngineLayout {
        EngineLayout {
            root: "/var/lib/buildkit/cache/root".into(),
            unix_socket: "/run/machine-agent/buildkitd.sock".into(),
            tls: TlsPaths::in_dir(Path::new("/var/lib/machine-agent/engine/tls")),
            cgroup_parent: None,
            cni: None,
            cdi_spec_dirs: vec!["/etc/cdi".into(), "/var/run/cdi".into()],
        }
    }

    /// Compares with tests/golden/buildkitd/<name>.toml, or rewrites it when
    /// UPDATE_GOLDEN=1 (`UPDATE_GOLDEN=1 cargo test --lib engine::render`).
    fn golden(name: &str, rendered: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/buildkitd").join(format!("{name}.toml"));
        if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, rendered).unwrap();
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
        assert_eq!(rendered, expected, "{} differs; UPDATE_GOLDEN=1 rewrites it", path.display());
    }

    /// The golden variants: (name, task, layout). tests/engine_render.rs
    /// starts the real buildkitd on the same four shapes, with test paths.
    fn variants() -> Vec<(&'static str, BuildkitTask, EngineLayout)> {
        let minimal = (task(), layout());

        let mut t = task();
        t.debug = true;
        t.max_parallelism = Some(4);
        let mut l = layout();
        l.cgroup_parent = Some("/machine-agent-engine".into());
        let tuned = (t, l);

        let mut l = layout();
        l.cgroup_parent = Some("/machine-agent-engine".into());
        l.cni = Some(CniPaths { config: "/etc/machine-agent/cni/buildkit.conflist".into(), binary_dir: "/usr/lib/cni".into() });
        let cni = (task(), l);

        let mut t = task();
        t.listen_address = "[::1]:9443".parse().unwrap();
        t.mounts[0].source = VolumeSource::File { path: "/var/lib/machine-agent/cache.img".into(), size_bytes: 10 << 30 };
        t.cache_size_bytes = 8 << 30;
        t.gc = GcOverrides {
            retention: Some(Duration::from_secs(3 * 24 * 3600 + 1800)),
            keep_bytes: Some(6 << 30),
            free_bytes_watermarks_percent: Some((15, 30)),
            ..GcOverrides::default()
        };
        let overrides = (t, layout());

        let mut t = task();
        t.devices = vec!["nvidia.com/gpu=all".into(), "vendor.example/class=name".into()];
        let devices = (t, layout());

        let mut l = layout();
        l.cdi_spec_dirs = vec![];
        let no_cdi = (task(), l);

        vec![
            ("minimal", minimal.0, minimal.1),
            ("cdi_devices", devices.0, devices.1),
            ("cdi_disabled", no_cdi.0, no_cdi.1),
            ("debug_parallelism_cgroup", tuned.0, tuned.1),
            ("cni", cni.0, cni.1),
            ("file_volume_gc_overrides", overrides.0, overrides.1),
        ]
    }

    fn render_variant(name: &str) -> String {
        let (_, t, l) = variants().into_iter().find(|(n, _, _)| *n == name).unwrap();
        render(&t, &l, &crate::gc::backstop::backstop_policy(&t)).unwrap()
    }

    #[test]
    fn minimal_matches_golden() {
        golden("minimal", &render_variant("minimal"));
    }

    #[test]
    fn debug_parallelism_cgroup_matches_golden() {
        golden("debug_parallelism_cgroup", &render_variant("debug_parallelism_cgroup"));
    }

    #[test]
    fn cni_matches_golden() {
        golden("cni", &render_variant("cni"));
    }

    #[test]
    fn file_volume_gc_overrides_matches_golden() {
        golden("file_volume_gc_overrides", &render_variant("file_volume_gc_overrides"));
    }

    #[test]
    fn cdi_devices_matches_golden() {
        golden("cdi_devices", &render_variant("cdi_devices"));
    }

    #[test]
    fn cdi_disabled_matches_golden() {
        golden("cdi_disabled", &render_variant("cdi_disabled"));
    }

    #[test]
    fn every_variant_parses_back_with_the_values_given() {
        for (name, t, l) in variants() {
            let text = render(&t, &l, &crate::gc::backstop::backstop_policy(&t)).unwrap();
            let v: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(v["root"].as_str(), l.root.to_str(), "{name}");
            assert_eq!(v["debug"].as_bool(), Some(t.debug), "{name}");
            let addrs: Vec<&str> = v["grpc"]["address"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
            assert_eq!(addrs, [format!("tcp://{}", t.listen_address), format!("unix://{}", l.unix_socket.display())], "{name}");
            assert_eq!(v["grpc"]["tls"]["key"].as_str(), l.tls.key.to_str(), "{name}");
            let oci = &v["worker"]["oci"];
            assert_eq!(oci["enabled"].as_bool(), Some(true));
            assert_eq!(oci["gc"].as_bool(), Some(true));
            assert_eq!(oci["snapshotter"].as_str(), Some("overlayfs"));
            assert_eq!(oci.get("max-parallelism").and_then(|m| m.as_integer()), t.max_parallelism.map(i64::from), "{name}");
            assert_eq!(oci.get("defaultCgroupParent").and_then(|m| m.as_str()), l.cgroup_parent.as_deref(), "{name}");
            assert_eq!(oci["networkMode"].as_str(), Some(if l.cni.is_some() { "cni" } else { "host" }), "{name}");
            assert_eq!(oci["gcpolicy"].as_array().unwrap().len(), 3, "{name}");
            assert_eq!(v["worker"]["containerd"]["enabled"].as_bool(), Some(false));
            if t.devices.is_empty() && !l.cdi_spec_dirs.is_empty() {
                assert!(v.get("cdi").is_none(), "{name}: no [cdi] without devices, as before CDI");
                continue;
            }
            assert_eq!(v["cdi"]["disabled"].as_bool(), Some(l.cdi_spec_dirs.is_empty()), "{name}");
            let dirs: Vec<&str> = v["cdi"].get("specDirs").map(|d| d.as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect()).unwrap_or_default();
            assert_eq!(dirs, l.cdi_spec_dirs.iter().map(|d| d.to_str().unwrap()).collect::<Vec<_>>(), "{name}");
            let allowed: Vec<&str> =
                v["cdi"].get("autoAllowed").map(|d| d.as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect()).unwrap_or_default();
            assert_eq!(allowed, t.devices, "{name}");
        }
    }

    #[test]
    fn hostile_strings_stay_inside_their_values() {
        let evil = "/x\"]\nroot = \"/etc\"\n[worker.containerd]\nenabled = true\n#'''\\u0000";
        let mut l = layout();
        l.root = PathBuf::from(evil);
        l.cgroup_parent = Some(evil.to_string());
        l.tls.ca = PathBuf::from(format!("{evil}ca"));
        let mut gc = crate::gc::backstop::backstop_policy(&task());
        gc[0].filters = vec![evil.to_string()];
        let mut t = task();
        t.devices = vec![evil.to_string()];
        let text = render(&t, &l, &gc).unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["root"].as_str(), Some(evil));
        assert_eq!(v["cdi"]["autoAllowed"][0].as_str(), Some(evil));
        assert_eq!(v["worker"]["oci"]["defaultCgroupParent"].as_str(), Some(evil));
        assert_eq!(v["grpc"]["tls"]["ca"].as_str(), Some(format!("{evil}ca").as_str()));
        assert_eq!(v["worker"]["oci"]["gcpolicy"][0]["filters"][0].as_str(), Some(evil));
        assert_eq!(v["worker"]["containerd"]["enabled"].as_bool(), Some(false));
        let keys: Vec<&String> = v.as_table().unwrap().keys().collect();
        assert_eq!(keys, ["cdi", "debug", "grpc", "root", "worker"]);
        let worker_keys: Vec<&String> = v["worker"].as_table().unwrap().keys().collect();
        assert_eq!(worker_keys, ["containerd", "oci"]);
    }

    #[test]
    fn bad_layouts_are_refused_by_field() {
        let cases: Vec<(EngineLayout, &str)> = vec![
            (EngineLayout { root: "relative/root".into(), ..layout() }, "engine layout: root must be an absolute path, got relative/root"),
            (EngineLayout { unix_socket: PathBuf::from(format!("/tmp/{}/s.sock", "d".repeat(100))), ..layout() }, "engine layout: unix_socket /tmp/dddd"),
            (EngineLayout { cgroup_parent: Some("machine-agent".into()), ..layout() }, "engine layout: cgroup_parent must be an absolute cgroup path"),
            (
                EngineLayout { cni: Some(CniPaths { config: "cni.json".into(), binary_dir: "/usr/lib/cni".into() }), ..layout() },
                "engine layout: cni.config must be an absolute path",
            ),
        ];
        for (l, expected) in cases {
            let e = render(&task(), &l, &crate::gc::backstop::backstop_policy(&task())).unwrap_err().to_string();
            assert!(e.starts_with(expected), "expected {expected:?}, got {e:?}");
        }
        use std::os::unix::ffi::OsStrExt;
        let l = EngineLayout { root: PathBuf::from(std::ffi::OsStr::from_bytes(b"/root\xff")), ..layout() };
        assert!(matches!(render(&task(), &l, &crate::gc::backstop::backstop_policy(&task())), Err(RenderError::NotUtf8 { field: "root", .. })));
    }

    #[test]
    fn the_longest_socket_path_the_kernel_takes_is_accepted() {
        let ok = EngineLayout { unix_socket: PathBuf::from(format!("/{}", "s".repeat(106))), ..layout() };
        render(&task(), &ok, &crate::gc::backstop::backstop_policy(&task())).unwrap();
        let long = EngineLayout { unix_socket: PathBuf::from(format!("/{}", "s".repeat(107))), ..layout() };
        assert!(matches!(render(&task(), &long, &crate::gc::backstop::backstop_policy(&task())), Err(RenderError::SocketPathTooLong { len: 108, .. })));
    }

    #[test]
    fn gc_rules_that_buildkit_would_read_as_unbounded_are_refused() {
        let r = |rule: GcBackstopRule| render(&task(), &layout(), &[rule]).map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(render(&task(), &layout(), &[]).unwrap_err().to_string(), "no GC rules: BuildKit would fall back to its own default policy");
        assert_eq!(r(GcBackstopRule::default()).unwrap_err(), "GC rule 0: sets no limit, so BuildKit would prune every matching record");
        assert!(r(GcBackstopRule { max_used_space: Some(DiskSpace::Bytes(0)), ..Default::default() }).is_err());
        assert!(r(GcBackstopRule { min_free_space: Some(DiskSpace::Percent(0)), ..Default::default() }).is_err());
        assert!(r(GcBackstopRule { min_free_space: Some(DiskSpace::Percent(101)), ..Default::default() }).is_err());
        assert!(r(GcBackstopRule { reserved_space: Some(DiskSpace::Bytes(u64::MAX)), ..Default::default() }).is_err());
        assert!(r(GcBackstopRule { keep_duration: Some(Duration::ZERO), ..Default::default() }).is_err());
        assert!(r(GcBackstopRule { keep_duration: Some(Duration::from_secs(u64::MAX)), ..Default::default() }).is_err());
        assert!(r(GcBackstopRule { keep_duration: Some(Duration::from_secs(1)), filters: vec![String::new()], ..Default::default() }).is_err());
        r(GcBackstopRule { min_free_space: Some(DiskSpace::Percent(100)), ..Default::default() }).unwrap();
    }

    #[test]
    fn durations_are_written_in_go_syntax() {
        let cases = [
            (Duration::from_secs(28 * 24 * 3600), "672h"),
            (Duration::from_secs(90 * 60), "90m"),
            (Duration::from_secs(61), "61s"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_micros(3), "3us"),
            (Duration::from_nanos(7), "7ns"),
        ];
        for (d, s) in cases {
            assert_eq!(go_duration(d).as_deref(), Some(s));
        }
        assert_eq!(go_duration(Duration::from_nanos(i64::MAX as u64)).as_deref(), Some("9223372036854775807ns"));
        assert_eq!(go_duration(Duration::from_nanos(i64::MAX as u64 + 1)), None);
    }
}
