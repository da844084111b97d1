//! Shared fixtures for the integration tests: a test PKI, the in-process
//! control-plane double (real proto, real TLS), the IMDSv2 and Fly API doubles,
//! and a launcher for the real `machine-agent` binary that captures its logs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod bare_engine;
pub mod ceph;
pub mod control_plane;
pub mod engine;
pub mod loopdev;
pub mod metadata;
pub mod otlp;
pub mod proxy;
pub mod vm;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Every wait in the tests is bounded by this unless a test says otherwise.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn trace_init() {
    machine_agent::observe::init_tracing(Some("info"));
}

// === PKI ===

/// A CA and a server certificate for `localhost` and 127.0.0.1 signed by it;
/// client certificates on demand.
pub struct TestPki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl TestPki {
    pub fn new(ca_name: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, ca_name);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        Self { ca_pem: ca.pem(), server_cert_pem: cert.pem(), server_key_pem: key.serialize_pem(), ca, ca_key }
    }

    /// A client certificate signed by this CA: (cert PEM, key PEM).
    pub fn client_cert(&self, name: &str) -> (String, String) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
/// A free TCP port below the kernel's ephemeral range (32768 and up): a port
/// from `:0` could be handed again to a later `:0` bind (an agent's endpoint
/// listener took the engine's port that way once, and buildkitd could never bind).
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = rand::random_range(20_000..32_768);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32768 after 1000 tries");
}

// === files ===

pub fn write_private(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A standalone task file (and its TLS files) in `dir`, with the cache mount under `prefix`.
pub fn write_task_file(dir: &Path, prefix: &Path) -> PathBuf {
    let pki = TestPki::new("engine ca");
    write_private(&dir.join("server.pem"), &pki.server_cert_pem);
    write_private(&dir.join("server-key.pem"), &pki.server_key_pem);
    write_private(&dir.join("ca.pem"), &pki.ca_pem);
    let task = format!(
        r#"
task_id = "standalone-1"
listen_address = "127.0.0.1:{port}"
cache_size_bytes = 10737418240
[tls]
cert_file = "server.pem"
key_file = "server-key.pem"
ca_file = "ca.pem"
[[mounts]]
mount_path = "{}/cache"
fs_type = "ext4"
file = {{ path = "{}/cache.img", size_bytes = 1073741824 }}
"#,
        prefix.display(),
        dir.display(),
        port = free_port(),
    );
    let path = dir.join("task.toml");
    std::fs::write(&path, task).unwrap();
    path
}

/// [`write_task_file`] with the cache mount under `dir/mnt` on the block device `device` instead of a file.
pub fn device_task_file(dir: &Path, device: &Path) -> PathBuf {
    let task = write_task_file(dir, &dir.join("mnt"));
    let text = std::fs::read_to_string(&task).unwrap();
    let file_line = text.lines().find(|l| l.starts_with("file = ")).unwrap().to_string();
    std::fs::write(&task, text.replace(&file_line, &format!("device = {{ path = \"{}\" }}", device.display()))).unwrap();
    task
}

// === the agent under test ===

/// Config text for an agent whose state dir and allowed prefix live in `dir`,
/// whose endpoints listen on an ephemeral port, and whose engine is the real
/// buildkitd (scripts/install-buildkit.sh) with its socket and cgroup unique to `dir`.
pub fn base_config(dir: &Path) -> String {
    format!(
        r#"
[endpoints]
listen = "127.0.0.1:0"
detail_listen = "127.0.0.1:0"
[volume]
allowed_mount_prefixes = ["{prefix}"]
allowed_backing_dirs = ["{backing}"]
unmount_timeout_secs = 5
[agent]
state_dir = "{state}"
drain_timeout_secs = 15
health_interval_ms = 1000
usage_interval_secs = 2
[engine]
binary = "{BUILDKITD}"
stop_grace_secs = 5
socket = "{socket}"
cgroup = "{cgroup}"
ready_timeout_secs = 60
# The task's ENGINE_MARKER shows that allowed task variables reach the engine.
allowed_task_env = ["ENGINE_MARKER"]
"#,
        prefix = dir.join("mnt").display(),
        // The test's own 0700 directory, where write_task_file puts cache.img.
        backing = dir.display(),
        state = dir.join("state").display(),
        socket = engine_socket(dir).display(),
        cgroup = test_cgroup_name(dir),
    )
}

/// The reconnect schedule [`control_plane_config`] sets: 200 ms doubling to this cap.
pub const CP_BACKOFF_CAP: Duration = Duration::from_secs(2);
/// The connect timeout (TCP, TLS and HTTP/2 setup) [`control_plane_config`] sets.
pub const CP_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Writes `dir/config.toml`: [`base_config`] plus a control plane at `url`
/// (its CA `ca_pem` trusted, quick reconnects, `extra` added to
/// `[control_plane]`) and a static-token identity (`token`, written 0600).
pub fn control_plane_config(dir: &Path, url: &str, ca_pem: &str, token: &str, extra: &str) -> PathBuf {
    let ca = dir.join("cp-ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let token_file = dir.join("token");
    write_private(&token_file, token);
    let config = dir.join("config.toml");
    let text = format!(
        "{base}\n[control_plane]\nurl = \"{url}\"\nca_bundle = \"{ca}\"\nbackoff_initial_ms = 200\nbackoff_max_secs = {cap}\n\
         connect_timeout_secs = {connect}\n{extra}\n\n[identity]\nmode = \"static_token\"\ntoken_file = \"{token}\"\n",
        base = base_config(dir),
        ca = ca.display(),
        cap = CP_BACKOFF_CAP.as_secs(),
        connect = CP_CONNECT_TIMEOUT.as_secs(),
        token = token_file.display(),
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// Writes `path` until its filesystem is full (ENOSPC); any other error fails the test.
pub fn fill_filesystem(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0x5au8; 64 * 1024];
    loop {
        match file.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // The last partial block may still fit a few bytes; take them too.
    while file.write(&[0x5a]).is_ok_and(|n| n == 1) {}
}

/// Where `install-buildkit.sh` puts the real engine.
pub const BUILDKITD: &str = "/usr/local/bin/buildkitd";
pub const BUILDCTL: &str = "/usr/local/bin/buildctl";

/// The engine's unix socket for the agent of the test in `dir`.
pub fn engine_socket(dir: &Path) -> PathBuf {
    dir.join("run/bk.sock")
}

/// The engine cgroup name for the test in `dir`: unique, so parallel tests never share one.
pub fn test_cgroup_name(dir: &Path) -> String {
    let name = dir.file_name().map(|n| n.to_string_lossy().replace('.', "")).unwrap_or_default();
    format!("ma-test-{name}")
}

/// The engine cgroup's directories of the test in `dir`, in every mounted
/// hierarchy (runc creates them in all v1 hierarchies and v2), where they exist.
pub fn test_cgroup_dirs(dir: &Path) -> Vec<PathBuf> {
    let name = test_cgroup_name(dir);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "))
        .filter_map(|l| l.split(' ').nth(4))
        .map(|root| Path::new(root).join(&name))
        .filter(|p| p.join("cgroup.procs").exists())
        .collect()
}

/// The memory-controller directory of the test's engine cgroup (v2 when it has memory, else v1).
pub fn test_memory_cgroup(dir: &Path) -> Option<PathBuf> {
    let dirs = test_cgroup_dirs(dir);
    dirs.iter().find(|d| d.join("memory.max").exists() || d.join("memory.limit_in_bytes").exists()).cloned()
}

/// The pid the agent recorded for its engine, if one runs.
pub fn engine_pid(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join("state/engine/buildkitd.pid")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Every process in a cgroup directory and its descendants.
pub fn cgroup_pids(cgroup: &Path) -> Vec<u32> {
    let mut pids = vec![];
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(d) = dirs.pop() {
        if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            }
        }
    }
    pids
}

/// Kills everything in the test's engine cgroup (the engine and its build steps)
/// and removes the cgroup: what an agent killed mid-task leaves behind.
#[allow(clippy::disallowed_methods)] // Drop cannot await; the wait is bounded (5 s)
pub fn cleanup_engine_of(dir: &Path) {
    use nix::sys::signal::{kill, killpg, Signal};
    use nix::unistd::Pid;
    if let Some(pid) = engine_pid(dir) {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    for cgroup in test_cgroup_dirs(dir) {
        for _ in 0..100 {
            let pids = cgroup_pids(&cgroup);
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50)); // the kernel empties the cgroup asynchronously
        }
        let mut tree = vec![];
        let mut dirs = vec![cgroup.clone()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
            tree.push(d);
        }
        for d in tree.iter().rev() {
            if let Err(e) = std::fs::remove_dir(d) {
                eprintln!("cleanup: cannot remove cgroup {}: {e}", d.display());
            }
        }
    }
}

/// A running `machine-agent`; SIGKILLed and reaped on drop.
pub struct AgentProcess {
    child: Option<Child>,
    /// The test's directory: mounts and loop devices the agent left under it are undone on drop.
    test_dir: Option<PathBuf>,
    pub pid: u32,
    log: Arc<Mutex<String>>,
    log_changed: Arc<tokio::sync::Notify>,
}

pub struct AgentBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    test_dir: Option<PathBuf>,
}

/// An agent run with this config; the config's directory is the test's own,
/// and whatever the agent mounted or attached under it is undone on drop.
pub fn agent(config: &Path) -> AgentBuilder {
    AgentBuilder { args: vec!["run".into(), "--config".into(), config.display().to_string()], env: vec![], test_dir: config.parent().map(Path::to_path_buf) }
}

impl AgentBuilder {
    pub fn standalone(mut self, task: &Path) -> Self {
        self.args.push("--standalone".into());
        self.args.push(task.display().to_string());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn start(self) -> AgentProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_machine-agent"));
        cmd.args(&self.args)
            .env("MACHINE_AGENT_LOG", "info,machine_agent=debug")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            // Test machines run no time daemon, so the kernel never calls the
            // clock synchronized: retention would wait its 10 minutes. Tests of
            // the clock guard itself are in src/gc/clock.rs.
            .env("MACHINE_AGENT__GC__CLOCK_SYNC_WAIT_SECS", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn machine-agent");
        let pid = child.id();
        let log = Arc::new(Mutex::new(String::new()));
        let log_changed = Arc::new(tokio::sync::Notify::new());
        let stderr = child.stderr.take().unwrap();
        let (log2, changed2) = (log.clone(), log_changed.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[agent {pid}] {line}");
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
                drop(l);
                changed2.notify_waiters();
            }
            changed2.notify_waiters();
        });
        AgentProcess { child: Some(child), pid, log, log_changed, test_dir: self.test_dir }
    }
}

impl AgentProcess {
    /// Leaves the test dir's engine, mounts and loop devices alone on drop (another agent owns them now).
    pub fn keep_volumes(&mut self) {
        self.test_dir = None;
    }

    pub fn logs(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log holds a line containing `needle`; returns that line.
    pub async fn wait_for_log(&self, needle: &str) -> String {
        self.wait_for_log_within(needle, WAIT).await
    }

    /// The same, for a wait longer (or shorter) than [`WAIT`].
    pub async fn wait_for_log_within(&self, needle: &str, within: Duration) -> String {
        let found = tokio::time::timeout(within, async {
            loop {
                let notified = self.log_changed.notified();
                if let Some(line) = self.logs().lines().find(|l| l.contains(needle)) {
                    return line.to_string();
                }
                notified.await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no log line containing {needle:?} within {within:?}; log:\n{}", self.logs()))
    }

    /// The public endpoints' address, from the agent's "endpoints serving" line.
    pub async fn endpoints(&self) -> String {
        let line = self.wait_for_log("endpoints serving").await;
        let addr = line.split(" listen=").nth(1).and_then(|s| s.split_whitespace().next()).expect("listen= in the line");
        format!("http://{addr}")
    }

    /// The detail endpoints' address (loopback): /readyz there has the task
    /// id, pids, paths and error texts the public one leaves out.
    pub async fn detail_endpoints(&self) -> String {
        let line = self.wait_for_log("endpoints serving").await;
        let addr = line.split(" detail=").nth(1).and_then(|s| s.split_whitespace().next()).expect("detail= in the line");
        format!("http://{addr}")
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), sig).unwrap();
    }

    /// Waits (bounded) for the agent to exit on its own.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return status;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("agent did not exit within {within:?}; log:\n{}", self.logs());
            }
            // Polling a child's exit: there is no async reaping for std::process::Child.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The pids of the agent's direct children (the engine).
    pub fn children(&self) -> Vec<u32> {
        let mut pids = vec![];
        for task in std::fs::read_dir(format!("/proc/{}/task", self.pid)).into_iter().flatten().flatten() {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                pids.extend(list.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
        pids
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let engines = self.children();
            let _ = child.kill();
            let _ = child.wait();
            // The engine lives in its own process group; do not leak it past the test.
            for pid in engines {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
        }
        if let Some(dir) = &self.test_dir {
            cleanup_engine_of(dir);
            cleanup_volumes_under(dir);
        }
    }
}

/// Volume settings for a test or bench that drives the volume manager
/// itself: intents and RBD files under `root`, backing files beneath
/// `backing_dir`, RBD locks under `owner`, mapped by `mapper`.
pub fn volume_settings(
    root: &Path,
    backing_dir: &Path,
    owner: &str,
    mapper: machine_agent::volume::rbd::MapperChoice,
) -> machine_agent::volume::manager::VolumeSettings {
    machine_agent::volume::manager::VolumeSettings {
        sys_root: "/".into(),
        device_wait: Duration::from_secs(5),
        unmount_timeout: Duration::from_secs(10),
        kill_holders: false,
        ephemeral_dir: None,
        ext4_bytes_per_inode: None,
        system_paths: machine_agent::volume::manager::default_system_paths(),
        intent_dir: root.join("intents"),
        allowed_backing_dirs: vec![backing_dir.to_path_buf()],
        rbd: machine_agent::volume::rbd::RbdSettings { mapper, owner_id: owner.into(), dir: root.join("rbd"), keep_snapshots: 2 },
    }
}

/// Mount points under `dir`, as this process's mountinfo lists them.
pub fn mounted_under(dir: &Path) -> Vec<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| Path::new(p).starts_with(dir)).map(String::from).collect()
}

/// Loop devices whose backing file sits under `dir`.
pub fn loops_backed_under(dir: &Path) -> Vec<String> {
    let mut found = vec![];
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
            if Path::new(backing.trim()).starts_with(dir) {
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found
}

/// Unmounts every mount under `dir` (deepest first, never lazily) and detaches
/// every loop device whose backing file is under `dir`: what an agent killed
/// mid-task leaves behind. Touches nothing outside `dir`. An rbd-fuse mount
/// under `dir` stays busy while a loop device holds its file, so what the
/// first pass could not unmount is tried again after the detaches; an
/// rbd-fuse left serving a mount point under `dir` (one a fence left stuck
/// does not exit when unmounted) is killed by pid.
pub fn cleanup_volumes_under(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else { return };
    unmount_all_under(&dir, false);
    for entry in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(backing.trim()).starts_with(&dir) {
            let out = Command::new("losetup").args(["-d", &format!("/dev/{name}")]).output();
            if !out.as_ref().is_ok_and(|o| o.status.success()) {
                eprintln!("cleanup: cannot detach /dev/{name}: {out:?}");
            }
        }
    }
    unmount_all_under(&dir, true);
    for pid in rbd_fuse_pids_under(&dir) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
}

/// The pids of rbd-fuse processes whose mount point (their last argument) is under `dir`.
fn rbd_fuse_pids_under(dir: &Path) -> Vec<u32> {
    let mut pids = vec![];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).filter(|a| !a.is_empty()).collect();
        let is_rbd_fuse = args.first().is_some_and(|a| a.ends_with(b"rbd-fuse"));
        let serves_dir = args.last().and_then(|a| std::str::from_utf8(a).ok()).is_some_and(|a| Path::new(a).starts_with(dir));
        if is_rbd_fuse && serves_dir {
            pids.push(pid);
        }
    }
    pids
}

/// One unmount pass over the mounts under `dir`, deepest first; `report` says whether failures are printed.
fn unmount_all_under(dir: &Path, report: bool) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> =
        mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).map(|p| PathBuf::from(p.replace("\\040", " "))).filter(|p| p.starts_with(dir)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        let out = Command::new("umount").arg(&point).output();
        if report && !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("cleanup: cannot unmount {}: {out:?}", point.display());
        }
    }
}

/// True while a process with this pid exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// Waits (bounded) for a condition checked against fresh state each time.
pub async fn eventually<F: FnMut() -> bool>(what: &str, within: Duration, mut cond: F) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GET a path on the agent's endpoints: (status, body).
pub async fn http_get(base: &str, path: &str) -> (u16, String) {
    let resp = reqwest::get(format!("{base}{path}")).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// The value of one sample line in a Prometheus scrape, e.g. `machine_agent_state{state="ready"}`.
pub fn metric_value(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' ')).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// MemTotal of this machine, bytes.
pub fn mem_total_bytes() -> u64 {
    machine_agent::engine::parse_mem_total(&std::fs::read_to_string("/proc/meminfo").unwrap()).unwrap()
}

/// Runs `promtool check metrics` on a scrape: exit 0 and nothing said.
pub fn promtool_check(scrape: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: install Debian's `prometheus` package (bash .ci/run does)");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), scrape.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics found problems ({}):\n{}{}\nscrape:\n{scrape}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `/proc/<pid>/status` figure in kB (`VmRSS:`, `VmHWM:`), 0 when absent.
pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

/// utime + stime of a process, in clock ticks (USER_HZ, 100 a second on Linux).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    // After the comm field: state is [0], utime is [11], stime is [12].
    fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}
