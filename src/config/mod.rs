//! The agent's configuration: a strict TOML file plus environment overrides,
//! parsed and validated once at start, before anything touches a device, binds
//! a port or dials the control plane.
//!
//! Validation reports every problem at once, each naming its field and what was
//! expected, so an operator fixes a config in one round. The environment is a
//! parameter ([`EnvSource`]) so tests never touch the real process environment.
//!
//! Config sits above the capabilities: it knows each one's settings type
//! (`control::ControlPlaneSettings`, `control::identity::Identity`,
//! `volume::manager::VolumeSettings`, `engine::EngineSettings`,
//! `gc::GcSettings`) and builds it; no capability imports config. Its parts:
//!
//! - `schema`: the file's shape and its defaults;
//! - `env`: the environment overrides, applied before deserializing;
//! - `validate`: the checks, one function per section or rule.

mod env;
mod schema;
mod validate;

pub use env::{EnvSource, ProcessEnv, ENV_PREFIX};
pub use validate::check_ca_bundle;

use crate::control::identity::Identity;
use crate::control::ControlPlaneSettings;
use crate::engine::EngineSettings;
use crate::fsutil::{excerpt, read_regular_text};
use crate::gc::GcSettings;
use crate::observe::http::EndpointSettings;
use crate::task::TaskLimits;
use crate::volume::manager::VolumeSettings;
use schema::RawConfig;
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the config lives unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/machine-agent/config.toml";
/// A config with every key and a comment on each is about 5 KiB
/// (examples/config.toml); a file fifty times that is not a config.
pub const MAX_CONFIG_BYTES: u64 = 256 << 10;
/// A problem names a field and says what was expected; both may quote the file,
/// so each is cut to what a terminal line shows (a long path still fits).
const MAX_QUOTED_FIELD_CHARS: usize = 128;
const MAX_QUOTED_PROBLEM_CHARS: usize = 512;

/// The whole validated configuration. Built only by [`Config::parse`].
#[derive(Debug, Clone)]
pub struct Config {
    /// None in standalone-only setups: `run --standalone` needs no control plane.
    pub control_plane: Option<ControlPlaneSettings>,
    pub identity: Identity,
    pub endpoints: EndpointSettings,
    pub allowed_mount_prefixes: Vec<PathBuf>,
    pub volume: VolumeSettings,
    pub drain_timeout: Duration,
    pub health_interval: Duration,
    /// How far CPU, memory and free-space figures move before a delta health report carries them.
    pub health_thresholds: crate::control::health_delta::Thresholds,
    /// How often the host and the engine's process tree are sampled.
    pub sample_interval: Duration,
    pub usage_interval: Duration,
    /// How often live build steps' cgroups are read (`agent.step_poll_interval_ms`).
    pub step_poll_interval: Duration,
    /// Finished build steps kept for the health stream and /readyz (`agent.step_records_kept`).
    pub step_records_kept: usize,
    pub state_dir: PathBuf,
    pub engine: EngineSettings,
    /// Engine variables a task may set besides the proxy settings (`engine.allowed_task_env`).
    pub allowed_task_env: BTreeSet<String>,
    /// OTLP/gRPC collectors a task may send the engine's traces to (`engine.trace_endpoints`).
    pub trace_endpoints: BTreeSet<String>,
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
    /// cannot read config file: {0}
    Read(#[source] crate::fsutil::ReadError),
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
    /// Every problem quoted short: a field name or a message may carry a
    /// value from the file, and a one-line 200 KiB file is one such value.
    fn invalid(problems: Vec<ConfigProblem>) -> Self {
        let problems: Vec<ConfigProblem> = problems
            .into_iter()
            .map(|p| ConfigProblem { field: excerpt(&p.field, MAX_QUOTED_FIELD_CHARS), problem: excerpt(&p.problem, MAX_QUOTED_PROBLEM_CHARS) })
            .collect();
        Self::Invalid(problems.len(), ProblemList(problems))
    }

    /// The problems, for tests and `check`.
    pub fn problems(&self) -> &[ConfigProblem] {
        match self {
            Self::Read(_) => &[],
            Self::Invalid(_, list) => &list.0,
        }
    }
}

impl Config {
    /// What a task is checked against: the allowed mount prefixes and backing
    /// dirs, the agent's own directories no mount may cover or sit in (the
    /// state dir holds its keys and lock; the socket dir its engine's
    /// sockets), and the engine variables a task may set.
    pub fn task_limits(&self) -> TaskLimits {
        let mut reserved_paths = vec![self.state_dir.clone()];
        reserved_paths.extend(self.engine.socket.parent().map(Path::to_path_buf));
        TaskLimits {
            allowed_mount_prefixes: self.allowed_mount_prefixes.clone(),
            allowed_backing_dirs: self.volume.allowed_backing_dirs.clone(),
            reserved_paths,
            allowed_engine_env: self.allowed_task_env.clone(),
            trace_endpoints: self.trace_endpoints.clone(),
        }
    }

    /// Reads and validates the file at `path` with overrides from `env`.
    pub fn load(path: &Path, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let text = read_regular_text(path, MAX_CONFIG_BYTES).map_err(ConfigError::Read)?;
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
        env::apply_env_overrides(&mut table, env, &mut problems);
        let raw: RawConfig = match serde_path_to_error::deserialize(toml::Value::Table(table)) {
            Ok(raw) => raw,
            Err(e) => {
                let field = e.path().to_string();
                problems.push(ConfigProblem { field, problem: one_line(&e.inner().to_string()) });
                return Err(ConfigError::invalid(problems));
            }
        };
        let config = validate::validate(raw, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::invalid(problems))
        }
    }
}

/// A parser's multi-line message as one line, so each problem prints on its own line.
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

#[cfg(test)]
mod tests {
    use super::schema::{DEFAULT_DETAIL_LISTEN, DEFAULT_LISTEN};
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

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
        assert_eq!(c.endpoints.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.endpoints.detail_listen, DEFAULT_DETAIL_LISTEN.parse().unwrap());
        assert!(c.endpoints.listen.ip().is_loopback() && c.endpoints.detail_listen.ip().is_loopback(), "nothing is exposed by default");
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
        assert_eq!(c.endpoints.listen, "127.0.0.1:1234".parse().unwrap());
    }

    #[test]
    fn allowed_task_env_refuses_the_agents_own_variables_and_bad_names() {
        let text = format!(
            "{MINIMAL}\n[engine]\nallowed_task_env = [\"ENGINE_MARKER\", \"PATH\", \"NOTIFY_SOCKET\", \"LD_PRELOAD\", \"bad name\", \"ENGINE_MARKER\"]\n"
        );
        let err = Config::parse(&text, &env(&[])).unwrap_err();
        let fields: Vec<_> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "engine.allowed_task_env[1]",
                "engine.allowed_task_env[2]",
                "engine.allowed_task_env[3]",
                "engine.allowed_task_env[4]",
                "engine.allowed_task_env[5]"
            ]
        );
        let ok = Config::parse(&format!("{MINIMAL}\n[engine]\nallowed_task_env = [\"ENGINE_MARKER\", \"http2_debug\"]\n"), &env(&[])).unwrap();
        assert_eq!(ok.task_limits().allowed_engine_env, ["ENGINE_MARKER".to_string(), "http2_debug".to_string()].into());
    }

    #[test]
    fn trace_endpoints_are_http_or_https_urls_of_a_host_and_port() {
        let good = ["http://127.0.0.1:4317", "https://otel.internal:4317", "http://[::1]:4317"];
        let text = format!("{MINIMAL}\n[engine]\ntrace_endpoints = {good:?}\n");
        let c = Config::parse(&text, &env(&[])).unwrap();
        assert_eq!(c.task_limits().trace_endpoints, good.iter().map(|s| s.to_string()).collect());
        assert!(Config::parse(MINIMAL, &env(&[])).unwrap().task_limits().trace_endpoints.is_empty(), "none by default");
        let bad = [
            "otel.internal:4317",
            "grpc://otel:4317",
            "http://otel.internal",
            "http://user:pw@otel:4317",
            "http://otel:4317/v1/traces",
            "http://otel:4317/",
            "http://otel:4317?x=1",
            "http://:4317",
        ];
        let text = format!("{MINIMAL}\n[engine]\ntrace_endpoints = {bad:?}\n");
        let err = Config::parse(&text, &env(&[])).unwrap_err();
        let fields: Vec<_> = err.problems().iter().map(|p| p.field.as_str()).collect();
        let expected: Vec<String> = (0..bad.len()).map(|i| format!("engine.trace_endpoints[{i}]")).collect();
        assert_eq!(fields, expected, "{err}");
    }

    #[test]
    fn otel_variables_cannot_be_allowed_for_tasks() {
        let text = format!("{MINIMAL}\n[engine]\nallowed_task_env = [\"OTEL_EXPORTER_OTLP_ENDPOINT\", \"OTEL_TRACES_EXPORTER\"]\n");
        let err = Config::parse(&text, &env(&[])).unwrap_err();
        let fields: Vec<_> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["engine.allowed_task_env[0]", "engine.allowed_task_env[1]"]);
    }

    #[test]
    fn cdi_dirs_and_the_nvidia_spec_are_checked() {
        let c = Config::parse(MINIMAL, &env(&[])).unwrap();
        assert_eq!(c.engine.cdi.spec_dirs, [PathBuf::from("/etc/cdi"), PathBuf::from("/var/run/cdi")]);
        assert_eq!(c.engine.cdi.nvidia_spec.as_deref(), Some(Path::new("/var/run/cdi/nvidia.yaml")));
        let off = Config::parse(&format!("{MINIMAL}\n[engine]\ncdi_spec_dirs = []\ncdi_nvidia_spec = \"\"\n"), &env(&[])).unwrap();
        assert!(off.engine.cdi.spec_dirs.is_empty() && off.engine.cdi.nvidia_spec.is_none());
        let text = format!(
            "{MINIMAL}\n[engine]\ncdi_spec_dirs = [\"relative\", \"/etc/cdi\", \"/etc/cdi\"]\ncdi_nvidia_spec = \"/tmp/nvidia.yaml\"\nnvidia_ctk = \"nvidia-ctk\"\n"
        );
        let err = Config::parse(&text, &env(&[])).unwrap_err();
        let fields: Vec<_> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["engine.cdi_spec_dirs[0]", "engine.cdi_spec_dirs[2]", "engine.cdi_nvidia_spec", "engine.nvidia_ctk"]);
        let text = format!("{MINIMAL}\n[engine]\ncdi_nvidia_spec = \"/var/run/cdi/nvidia.yml\"\n");
        assert!(Config::parse(&text, &env(&[])).is_err(), "the engine reads only .yaml and .json");
    }

    #[test]
    fn a_sum_of_absurd_drain_parts_is_reported_not_overflowed() {
        // i64::MAX is the largest a TOML value, or an override read as one, can be.
        let max = i64::MAX.to_string();
        let text = format!("{MINIMAL}\n[engine]\nstop_grace_secs = {max}\n");
        let err = Config::parse(&text, &env(&[("MACHINE_AGENT__VOLUME__UNMOUNT_TIMEOUT_SECS", &max)])).unwrap_err();
        let fields: Vec<_> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["volume.unmount_timeout_secs", "engine.stop_grace_secs", "agent.drain_timeout_secs"]);
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
    fn endpoint_limits_out_of_range_and_a_detail_listen_on_the_public_port_are_refused() {
        let text = r#"
            [endpoints]
            listen = "0.0.0.0:9911"
            detail_listen = "127.0.0.1:9911"
            max_connections = 0
            header_read_timeout_secs = 0
            [volume]
            allowed_mount_prefixes = ["/var/lib/buildkit"]
        "#;
        let err = Config::parse(text, &env(&[])).unwrap_err();
        let fields: Vec<_> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["endpoints.detail_listen", "endpoints.max_connections", "endpoints.header_read_timeout_secs"]);

        let ok = Config::parse(
            &text.replace("9911\"\n            max_connections = 0", "9912\"\n            max_connections = 4").replace("timeout_secs = 0", "timeout_secs = 1"),
            &env(&[]),
        )
        .unwrap();
        assert_eq!(ok.endpoints.limits.max_connections, 4);
        assert_eq!(ok.endpoints.limits.header_read_timeout, Duration::from_secs(1));
    }

    #[test]
    fn backing_dirs_default_to_the_state_dirs_own_and_never_name_the_system() {
        let base = "[volume]\nallowed_mount_prefixes = [\"/var/lib/buildkit\"]\n";
        let config = Config::parse(&format!("{base}[agent]\nstate_dir = \"/srv/ma\"\n"), &env(&[])).unwrap();
        assert_eq!(config.volume.allowed_backing_dirs, vec![PathBuf::from("/srv/ma/volumes")]);
        let limits = config.task_limits();
        assert_eq!(limits.reserved_paths, vec![PathBuf::from("/srv/ma"), PathBuf::from("/run/machine-agent")]);
        let none = Config::parse(&format!("{base}allowed_backing_dirs = []\n"), &env(&[])).unwrap();
        assert!(none.volume.allowed_backing_dirs.is_empty(), "[] allows no file-backed volume");
        let err = Config::parse(&format!("{base}allowed_backing_dirs = [\"/\", \"/run/cache\", \"/a/../etc\", \"/srv/cache\"]\n"), &env(&[])).unwrap_err();
        let fields: Vec<_> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, vec!["volume.allowed_backing_dirs[0]", "volume.allowed_backing_dirs[1]", "volume.allowed_backing_dirs[2]"]);
    }

    #[test]
    fn rbd_mapper_and_owner_id_are_read_and_checked() {
        use crate::volume::rbd::MapperChoice;
        let base = "[volume]\nallowed_mount_prefixes = [\"/var/lib/buildkit\"]\n";
        let c = Config::parse(base, &env(&[])).unwrap();
        assert_eq!(c.volume.rbd.mapper, MapperChoice::Auto);
        assert_eq!(c.volume.rbd.dir, PathBuf::from("/var/lib/machine-agent/rbd"));
        for (name, want) in [("auto", MapperChoice::Auto), ("krbd", MapperChoice::Krbd), ("nbd", MapperChoice::Nbd), ("fuse", MapperChoice::Fuse)] {
            let c = Config::parse(&format!("{base}rbd_mapper = \"{name}\"\nowner_id = \"builder-7.eu:1\"\n"), &env(&[])).unwrap();
            assert_eq!((c.volume.rbd.mapper, c.volume.rbd.owner_id.as_str()), (want, "builder-7.eu:1"));
        }
        let err = Config::parse(&format!("{base}rbd_mapper = \"KRBD\"\nowner_id = \"a b\"\n"), &env(&[])).unwrap_err();
        let fields: Vec<_> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["volume.rbd_mapper", "volume.owner_id"]);
        let over = Config::parse(base, &env(&[("MACHINE_AGENT__VOLUME__OWNER_ID", "from-env")])).unwrap();
        assert_eq!(over.volume.rbd.owner_id, "from-env");
    }

    #[test]
    fn owner_id_defaults_to_a_valid_machine_id_and_else_stays_empty() {
        use super::validate::rbd_owner_id;
        let mut problems = vec![];
        let mut bad = |f: &str, p: String| problems.push((f.to_string(), p));
        assert_eq!(rbd_owner_id(None, || Some("3f2a9c0e5b7d41e8a6c2f0d9b8e7a6c5".into()), &mut bad), "3f2a9c0e5b7d41e8a6c2f0d9b8e7a6c5");
        assert_eq!(rbd_owner_id(None, || None, &mut bad), "", "no machine-id is no startup error");
        assert_eq!(rbd_owner_id(None, || Some("not an id\n".into()), &mut bad), "");
        assert_eq!(rbd_owner_id(Some("op-1"), || panic!("not read when configured"), &mut bad), "op-1");
        assert_eq!(rbd_owner_id(Some(""), || None, &mut bad), "");
        assert_eq!(problems.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(), ["volume.owner_id"], "only the configured empty id");
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
    fn a_huge_value_is_quoted_as_a_short_excerpt() {
        let long = "a".repeat(200 << 10);
        for text in
            [long.clone(), format!("[agent]\n{long} = 1\n"), format!("[agent]\nstate_dir = {:?}\n", long), format!("[control_plane]\nurl = \"{long}\"\n")]
        {
            let err = Config::parse(&text, &env(&[])).unwrap_err();
            let shown = err.to_string();
            assert!(shown.len() < 2 * (MAX_QUOTED_FIELD_CHARS + MAX_QUOTED_PROBLEM_CHARS), "{} bytes: {}", shown.len(), &shown[..200]);
            assert!(!err.problems().is_empty());
        }
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
