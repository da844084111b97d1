//! buildkitd.toml against the real buildkitd: each shape the golden files
//! cover is rendered with test paths, checked TLS material is written, and
//! buildkitd (v0.34.2, from scripts/install-buildkit.sh) is started with
//! `--config`. buildctl then reads back what buildkitd made of the file: the
//! GC policy, the network mode, and whether the TCP listener demands a client
//! certificate from the task's CA. go-toml ignores unknown keys, so this is
//! what proves the key spellings and value formats.
//!
//! Needs root (the OCI worker), runc, /usr/local/bin/buildkitd and buildctl.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

use machine_agent::engine::render::{self, CniPaths, DiskSpace, EngineLayout, GcBackstopRule};
use machine_agent::secret::Secret;
use machine_agent::task::tls;
use machine_agent::task::{BuildkitTask, FsType, GcOverrides, TlsMaterial, VolumeMount, VolumeSource};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};
use tokio::process::Command;
use tokio::time::Instant;

const BUILDKITD: &str = "/usr/local/bin/buildkitd";
const BUILDCTL: &str = "/usr/local/bin/buildctl";
/// buildkitd serves within about a second here; a loaded 2-core CI machine
/// running the other engine tests beside this one gets far more.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// One buildctl call: its own --timeout covers connecting, this the whole run.
const BUILDCTL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a SIGTERM'd buildkitd gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

// === PKI ===

struct Pki {
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(name: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca_key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = server.signed_by(&key, &ca, &ca_key).unwrap();
        Self { ca_pem: ca.pem(), server_cert_pem: cert.pem(), server_key_pem: key.serialize_pem(), ca, ca_key }
    }

    /// A client certificate of this CA: (cert PEM, key PEM).
    fn client(&self) -> (String, String) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "build client");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

// === the engine under test ===

/// A buildkitd started on a rendered config in its own temp dir. `stop()` is
/// the normal path; Drop kills, reaps and unmounts what is left (CNI network
/// namespaces are bind mounts under the root).
struct Engine {
    child: Option<std::process::Child>,
    socket: PathBuf,
    tcp: String,
    log: PathBuf,
    dir: tempfile::TempDir,
    pki: Pki,
}

/// One golden shape: what differs from the minimal task and layout.
#[derive(Default)]
struct Shape {
    debug: bool,
    max_parallelism: Option<u32>,
    cgroup_parent: bool,
    cni: bool,
    file_volume_with_gc_overrides: bool,
    /// A CDI spec dir holding a spec of two devices, the task allowing one of them.
    cdi_devices: bool,
}

/// A made-up vendor's CDI spec: two devices that each set a variable.
const TEST_CDI_SPEC: &str = "cdiVersion: \"0.6.0\"\nkind: render.test/probe\ndevices:\n- name: allowed\n  containerEdits:\n    env:\n    - PROBE=allowed\n- name: other\n  containerEdits:\n    env:\n    - PROBE=other\n";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn unique() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A CNI plugin that attaches nothing: enough for buildkitd to create its
/// network namespaces without the real plugins installed.
const NOOP_CNI_PLUGIN: &str = r#"#!/bin/sh
cat >/dev/null
case "$CNI_COMMAND" in
ADD) echo '{"cniVersion":"1.0.0","interfaces":[],"ips":[]}' ;;
VERSION) echo '{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}' ;;
esac
"#;

impl Engine {
    async fn start(shape: Shape) -> (Self, BuildkitTask, Vec<GcBackstopRule>) {
        assert!(
            Path::new(BUILDKITD).exists() && Path::new(BUILDCTL).exists(),
            "{BUILDKITD} and {BUILDCTL} are needed: run scripts/install-buildkit.sh as root"
        );
        // Short: the unix socket path must fit in 107 bytes.
        let dir = tempfile::Builder::new().prefix("mar-").tempdir_in("/tmp").unwrap();
        let pki = Pki::new("engine-render test CA");
        let port = free_port();

        let mut task = BuildkitTask {
            id: "render-test".into(),
            tls: TlsMaterial { cert_pem: pki.server_cert_pem.clone(), key_pem: Secret::new(pki.server_key_pem.clone()), ca_pem: pki.ca_pem.clone() },
            mounts: vec![VolumeMount {
                mount_path: dir.path().to_path_buf(),
                source: VolumeSource::Device { path: "/dev/vdz".into(), ebs_volume_id: None },
                fs_type: FsType::Ext4,
                options: vec![],
                skip_trim: false,
                cache_mode: Default::default(),
            }],
            cache_size_bytes: 20 << 30,
            gc: GcOverrides::default(),
            max_parallelism: shape.max_parallelism,
            debug: shape.debug,
            listen_address: format!("127.0.0.1:{port}").parse().unwrap(),
            engine_env: Default::default(),
            devices: vec![],
            trace_endpoint: None,
        };
        let spec_dir = dir.path().join("cdi");
        if shape.cdi_devices {
            std::fs::create_dir(&spec_dir).unwrap();
            std::fs::write(spec_dir.join("probe.yaml"), TEST_CDI_SPEC).unwrap();
            task.devices = vec!["render.test/probe=allowed".into()];
        }
        if shape.file_volume_with_gc_overrides {
            task.mounts[0].source = VolumeSource::File { path: "/var/tmp/cache.img".into(), size_bytes: 10 << 30 };
            task.gc = GcOverrides {
                retention: Some(Duration::from_secs(3 * 24 * 3600 + 1800)),
                keep_bytes: Some(6 << 30),
                free_bytes_watermarks_percent: Some((15, 30)),
                ..GcOverrides::default()
            };
        }

        let checked = tls::check(&task.tls, SystemTime::now()).unwrap();
        let tls_paths = tls::write(&dir.path().join("tls"), &checked).unwrap();
        let cni = shape.cni.then(|| {
            let bin = dir.path().join("cni-bin");
            std::fs::create_dir(&bin).unwrap();
            // buildkitd adds a "loopback" network of its own to every config.
            for name in ["noop", "loopback"] {
                let plugin = bin.join(name);
                std::fs::write(&plugin, NOOP_CNI_PLUGIN).unwrap();
                std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            }
            let config = dir.path().join("cni.conflist");
            std::fs::write(&config, r#"{"cniVersion":"1.0.0","name":"mar-test","plugins":[{"type":"noop"}]}"#).unwrap();
            CniPaths { config, binary_dir: bin }
        });
        let layout = EngineLayout {
            root: dir.path().join("root"),
            unix_socket: dir.path().join("s.sock"),
            tls: tls_paths,
            // Not created: buildkitd only uses it when a build step runs.
            cgroup_parent: shape.cgroup_parent.then(|| format!("/mar-test-{}", unique())),
            cni,
            // Without devices, CDI off: the other shapes must not pick up the host's /etc/cdi.
            cdi_spec_dirs: if shape.cdi_devices { vec![spec_dir] } else { vec![] },
        };
        let rules = machine_agent::gc::backstop::backstop_policy(&task);
        let config = dir.path().join("buildkitd.toml");
        std::fs::write(&config, render::render(&task, &layout, &rules).unwrap()).unwrap();

        let log = dir.path().join("buildkitd.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(BUILDKITD)
            .arg("--config")
            .arg(&config)
            // buildkitd binds /run/buildkit/otel-grpc.sock whatever its root: parallel engines collide there.
            .arg("--otel-socket-path")
            .arg(layout.unix_socket.with_file_name("otel-grpc.sock"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut engine = Self { child: Some(child), socket: layout.unix_socket, tcp: format!("tcp://127.0.0.1:{port}"), log, dir, pki };
        engine.wait_ready().await;
        (engine, task, rules)
    }

    fn unix_addr(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Ok(out) = buildctl(&["--addr", &self.unix_addr(), "debug", "workers"]).await {
                if out.status.success() {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("buildkitd exited ({status}) before serving:\n{}", self.log_text());
            }
            assert!(Instant::now() < deadline, "buildkitd not serving on {} after {READY_DEADLINE:?}:\n{}", self.unix_addr(), self.log_text());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The default worker as buildctl reports it (JSON).
    async fn worker(&self) -> serde_json::Value {
        let out = buildctl(&["--addr", &self.unix_addr(), "debug", "workers", "--format", "{{json .}}"]).await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let workers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        workers[0].clone()
    }

    /// `debug workers` over TCP with these TLS flags; Ok if it succeeded.
    async fn over_tcp(&self, tls_args: &[&Path]) -> Result<(), String> {
        let mut args: Vec<String> = vec!["--addr".into(), self.tcp.clone(), "--timeout".into(), "5".into()];
        for (flag, path) in ["--tlscacert", "--tlscert", "--tlskey"].iter().zip(tls_args) {
            args.push((*flag).into());
            args.push(path.display().to_string());
        }
        args.extend(["debug".into(), "workers".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = buildctl(&args).await.map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// SIGTERM, then SIGKILL after the grace period; reaps.
    async fn stop(mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deepest first, so a parent is never busy because of a child.
        let mut points: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
            .filter(|p| p.starts_with(self.dir.path()))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in points {
            if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("cleanup: cannot unmount {}: {e}", p.display());
            }
        }
    }
}

async fn buildctl(args: &[&str]) -> std::io::Result<std::process::Output> {
    let run = Command::new(BUILDCTL).args(args).stdin(Stdio::null()).kill_on_drop(true).output();
    tokio::time::timeout(BUILDCTL_TIMEOUT, run).await.map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("buildctl {args:?}")))?
}

/// buildctl's JSON for a rule next to what we rendered. A percentage is
/// turned into bytes by buildkitd from the filesystem's size, so only its
/// presence is compared.
fn assert_gc_policy(worker: &serde_json::Value, rules: &[GcBackstopRule]) {
    let got = worker["gcPolicy"].as_array().expect("gcPolicy in buildctl's JSON");
    assert_eq!(got.len(), rules.len(), "{got:?}");
    for (i, (g, r)) in got.iter().zip(rules).enumerate() {
        assert_eq!(g["all"].as_bool(), Some(r.all), "rule {i}: {g}");
        let filters: Vec<&str> = g["filter"].as_array().map(|f| f.iter().filter_map(|s| s.as_str()).collect()).unwrap_or_default();
        assert_eq!(filters, r.filters.iter().map(String::as_str).collect::<Vec<_>>(), "rule {i}: {g}");
        let keep_ns = r.keep_duration.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap());
        assert_eq!(g["keepDuration"].as_u64(), Some(keep_ns), "rule {i}: {g}");
        for (key, space) in [("reservedSpace", r.reserved_space), ("maxUsedSpace", r.max_used_space), ("minFreeSpace", r.min_free_space)] {
            let value = g[key].as_u64().unwrap_or(0);
            match space {
                None => assert_eq!(value, 0, "rule {i} {key}: {g}"),
                Some(DiskSpace::Bytes(b)) => assert_eq!(value, b, "rule {i} {key}: {g}"),
                // At least 1 GB: BuildKit rounds a percentage up to whole GB.
                Some(DiskSpace::Percent(_)) => assert!(value >= 1_000_000_000, "rule {i} {key}: {g}"),
            }
        }
    }
}

fn network_mode(worker: &serde_json::Value) -> Option<&str> {
    worker["labels"]["org.mobyproject.buildkit.worker.network"].as_str()
}

// === tests ===

#[tokio::test]
async fn minimal_config_serves_with_host_networking_and_the_backstop_gc_policy() {
    let (engine, _, rules) = Engine::start(Shape::default()).await;
    let worker = engine.worker().await;
    assert_gc_policy(&worker, &rules);
    assert_eq!(network_mode(&worker), Some("host"));
    assert_eq!(worker["labels"]["org.mobyproject.buildkit.worker.snapshotter"].as_str(), Some("overlayfs"));
    assert!(!engine.log_text().contains("level=debug"), "debug = false");
    engine.stop().await;
}

#[tokio::test]
async fn debug_parallelism_and_cgroup_parent_are_accepted() {
    let (engine, _, rules) = Engine::start(Shape { debug: true, max_parallelism: Some(4), cgroup_parent: true, ..Shape::default() }).await;
    let worker = engine.worker().await;
    assert_gc_policy(&worker, &rules);
    assert!(engine.log_text().contains("level=debug"), "debug = true should log at debug:\n{}", engine.log_text());
    engine.stop().await;
}

#[tokio::test]
async fn cni_config_switches_the_worker_to_cni_networking() {
    let (engine, _, rules) = Engine::start(Shape { cni: true, cgroup_parent: true, ..Shape::default() }).await;
    let worker = engine.worker().await;
    assert_gc_policy(&worker, &rules);
    assert_eq!(network_mode(&worker), Some("cni"), "{worker}");
    engine.stop().await;
}

#[tokio::test]
async fn file_volume_and_gc_overrides_reach_buildkit_in_bytes() {
    let (engine, task, rules) = Engine::start(Shape { file_volume_with_gc_overrides: true, ..Shape::default() }).await;
    assert!(matches!(task.mounts[0].source, VolumeSource::File { .. }));
    let worker = engine.worker().await;
    assert_gc_policy(&worker, &rules);
    // 2 x (3 days 30 minutes), and half the 15% watermark of the 10 GiB file.
    assert_eq!(worker["gcPolicy"][0]["keepDuration"].as_u64(), Some(145 * 3600 * 1_000_000_000));
    assert_eq!(worker["gcPolicy"][1]["minFreeSpace"].as_u64(), Some((10u64 << 30) / 100 * 7));
    engine.stop().await;
}

#[tokio::test]
async fn cdi_spec_dirs_and_the_tasks_devices_reach_the_worker() {
    let (engine, _, _) = Engine::start(Shape { cdi_devices: true, ..Shape::default() }).await;
    let worker = engine.worker().await;
    let mut devices: Vec<(String, bool)> = worker["cdiDevices"]
        .as_array()
        .unwrap_or_else(|| panic!("no cdiDevices in {worker}"))
        .iter()
        .map(|d| (d["name"].as_str().unwrap().to_string(), d["autoAllow"].as_bool().unwrap_or(false)))
        .collect();
    devices.sort();
    assert_eq!(devices, [("render.test/probe=allowed".to_string(), true), ("render.test/probe=other".to_string(), false)], "{worker}");
    engine.stop().await;
}

#[tokio::test]
async fn the_tcp_listener_requires_a_client_certificate_from_the_task_ca() {
    let (engine, _, _) = Engine::start(Shape::default()).await;
    let dir = engine.dir.path().join("client");
    std::fs::create_dir(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ca = write("ca.pem", &engine.pki.ca_pem);
    let (cert, key) = engine.pki.client();
    let (cert, key) = (write("cert.pem", &cert), write("key.pem", &key));
    let stranger = Pki::new("another CA");
    let (other_cert, other_key) = stranger.client();
    let (other_cert, other_key) = (write("other-cert.pem", &other_cert), write("other-key.pem", &other_key));

    engine.over_tcp(&[&ca, &cert, &key]).await.expect("a client certificate of the task's CA is accepted");
    let without = engine.over_tcp(&[&ca]).await;
    assert!(without.is_err(), "no client certificate must be refused");
    let other = engine.over_tcp(&[&ca, &other_cert, &other_key]).await;
    assert!(other.is_err(), "a client certificate of another CA must be refused");
    engine.stop().await;
}
