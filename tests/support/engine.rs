//! An agent with the real engine on a loop-device volume, its task and PKI,
//! and real builds through buildctl: the fixtures of the engine and GC tests.

use super::{agent, base_config, engine_socket, eventually, free_port, http_get, write_private, AgentProcess, TestPki, BUILDCTL};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// One test's world: its directory, PKI, the engine's TCP port, config and task file.
pub struct World {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub pki: TestPki,
    pub port: u16,
    pub config: PathBuf,
    pub task: PathBuf,
}

impl World {
    pub fn new() -> Self {
        Self::with_engine(super::BUILDKITD)
    }

    /// A world whose engine binary is `binary` (the fake engine for crash loops).
    pub fn with_engine(binary: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let pki = TestPki::new("engine ca");
        let port = free_port();
        let config = root.join("config.toml");
        std::fs::write(&config, base_config(&root).replace(super::BUILDKITD, binary)).unwrap();
        let task = write_task(&root, &pki, port, &pki.server_cert_pem, &pki.server_key_pem);
        Self { _dir: dir, root, pki, port, config, task }
    }

    /// Points the config at `cp` (trusting its CA) with a static-token identity.
    pub fn use_control_plane(&self, cp: &super::control_plane::ControlPlaneDouble) {
        let token = self.root.join("token");
        write_private(&token, "bootstrap");
        let ca = self.root.join("cp-ca.pem");
        std::fs::write(&ca, &cp.pki.ca_pem).unwrap();
        let text = std::fs::read_to_string(&self.config).unwrap();
        let section = format!(
            "[control_plane]\nurl = \"{}\"\nca_bundle = \"{}\"\n[identity]\nmode = \"static_token\"\ntoken_file = \"{}\"\n",
            cp.url(),
            ca.display(),
            token.display()
        );
        std::fs::write(&self.config, format!("{text}\n{section}")).unwrap();
    }

    pub fn cache(&self) -> PathBuf {
        self.root.join("mnt/cache")
    }

    pub fn start(&self) -> AgentProcess {
        agent(&self.config).standalone(&self.task).start()
    }

    /// Writes the client's TLS files; returns buildctl's address and TLS flags.
    pub fn buildctl_tls_args(&self, with_client_cert: bool) -> Vec<String> {
        let ca = self.root.join("client-ca.pem");
        std::fs::write(&ca, &self.pki.ca_pem).unwrap();
        let mut args = vec![
            "--addr".to_string(),
            format!("tcp://127.0.0.1:{}", self.port),
            "--tlsservername".into(),
            "localhost".into(),
            "--tlscacert".into(),
            ca.display().to_string(),
        ];
        if with_client_cert {
            let (cert, key) = self.pki.client_cert("build client");
            let (cert_path, key_path) = (self.root.join("client.pem"), self.root.join("client-key.pem"));
            write_private(&cert_path, &cert);
            write_private(&key_path, &key);
            args.extend(["--tlscert".into(), cert_path.display().to_string(), "--tlskey".into(), key_path.display().to_string()]);
        }
        args
    }
}

pub fn write_task(dir: &Path, pki: &TestPki, port: u16, cert_pem: &str, key_pem: &str) -> PathBuf {
    write_private(&dir.join("server.pem"), cert_pem);
    write_private(&dir.join("server-key.pem"), key_pem);
    write_private(&dir.join("ca.pem"), &pki.ca_pem);
    let task = format!(
        r#"
task_id = "engine-test"
listen_address = "127.0.0.1:{port}"
cache_size_bytes = 1073741824
max_parallelism = 2
[tls]
cert_file = "server.pem"
key_file = "server-key.pem"
ca_file = "ca.pem"
[engine_env]
ENGINE_MARKER = "from-task"
[[mounts]]
mount_path = "{mnt}/cache"
fs_type = "ext4"
file = {{ path = "{dir}/cache.img", size_bytes = 2147483648 }}
"#,
        mnt = dir.join("mnt").display(),
        dir = dir.display(),
    );
    let path = dir.join("task.toml");
    std::fs::write(&path, task).unwrap();
    path
}

/// A build context: a Dockerfile that copies a static busybox into a scratch
/// image and runs `script` with it (no registry needed), plus a payload file.
pub fn build_context(dir: &Path, script: &str, payload_bytes: usize) -> PathBuf {
    let ctx = dir.join(format!("ctx-{}", rand_suffix()));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
    // A fresh seed per context: two builds never share a payload layer by accident.
    let seed: usize = rand::random::<u32>() as usize;
    let payload: Vec<u8> = (0..payload_bytes).map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]).collect();
    std::fs::write(ctx.join("payload"), payload).unwrap();
    let dockerfile = format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY payload /payload\nRUN [\"/bin/busybox\", \"sh\", \"-c\", {}]\n",
        serde_json::to_string(script).unwrap()
    );
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    ctx
}

pub fn rand_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// Runs `buildctl build` of `ctx`, exporting the result's files to `out`.
pub fn buildctl_build(addr_args: &[String], ctx: &Path, out: &Path) -> std::process::Output {
    Command::new(BUILDCTL)
        .args(addr_args)
        .args(["build", "--frontend", "dockerfile.v0", "--progress", "plain"])
        .arg(format!("--local=context={}", ctx.display()))
        .arg(format!("--local=dockerfile={}", ctx.display()))
        .arg(format!("--output=type=local,dest={}", out.display()))
        .output()
        .unwrap()
}

pub fn unix_addr(w: &World) -> Vec<String> {
    vec!["--addr".into(), format!("unix://{}", engine_socket(&w.root).display())]
}

/// Waits for Ready; returns the detail endpoints' URL, whose /readyz has every field.
pub async fn wait_ready(agent: &AgentProcess) -> String {
    let base = agent.detail_endpoints().await;
    eventually("the agent to be ready", Duration::from_secs(60), || agent.logs().contains("to=ready")).await;
    base
}

pub async fn readyz(base: &str) -> (u16, serde_json::Value) {
    let (code, body) = http_get(base, "/readyz").await;
    (code, serde_json::from_str(&body).unwrap())
}

/// A build context whose Dockerfile copies `files` small files (one block
/// each) into a scratch image and runs `script` with busybox: a build that
/// costs the cache many inodes and few bytes. The files' contents name the
/// context, so two contexts never share a layer.
pub fn small_files_context(dir: &Path, script: &str, files: usize) -> PathBuf {
    let ctx = dir.join(format!("ctx-{}", rand_suffix()));
    let tree = ctx.join("files");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox")).unwrap();
    let tag = rand_suffix();
    for i in 0..files {
        std::fs::write(tree.join(format!("f{i}")), format!("{tag} {i}\n")).unwrap();
    }
    let dockerfile = format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY files /files\nRUN [\"/bin/busybox\", \"sh\", \"-c\", {}]\n",
        serde_json::to_string(script).unwrap()
    );
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    ctx
}

/// `buildctl build` of `ctx` into the cache only (no export): how builds fill
/// a cache fastest. Bounded by buildctl itself only; callers bound the wait.
pub fn buildctl_build_cache_only(addr_args: &[String], ctx: &Path) -> std::process::Output {
    Command::new(BUILDCTL)
        .args(addr_args)
        .args(["build", "--frontend", "dockerfile.v0", "--progress", "plain"])
        .arg(format!("--local=context={}", ctx.display()))
        .arg(format!("--local=dockerfile={}", ctx.display()))
        .output()
        .unwrap()
}

/// True when a process whose command line holds `tag` runs on this host (a build step, say).
pub fn step_running(tag: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(tag)))
}

/// A build whose RUN step waits on a gate the test opens: the step polls for
/// `/gate` in its own root filesystem, which the test creates through
/// `/proc/<step pid>/root` (the host sees every container's root there). Once
/// open, the step writes its tag and a copy of the payload, so a complete
/// output proves the step ran to its end after the gate.
pub struct GatedBuild {
    pub tag: String,
    pub ctx: PathBuf,
    payload: Vec<u8>,
}

impl GatedBuild {
    pub fn new(dir: &Path) -> Self {
        let tag = format!("gated-{}", rand_suffix());
        let script = format!("until [ -e /gate ]; do /bin/busybox sleep 0.05; done; echo {tag} > /out.txt; /bin/busybox cp /payload /payload.copy");
        let ctx = build_context(dir, &script, 64 << 10);
        let payload = std::fs::read(ctx.join("payload")).unwrap();
        Self { tag, ctx, payload }
    }

    /// The step's shell, once it runs (its command line holds the tag).
    pub fn step_pid(&self) -> Option<u32> {
        std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            (args.first() == Some(&&b"/bin/busybox"[..]) && String::from_utf8_lossy(&cmdline).contains(&self.tag)).then_some(pid)
        })
    }

    /// Waits (bounded) for the step to be waiting at the gate.
    pub async fn wait_running(&self) -> u32 {
        eventually("the gated step to run", Duration::from_secs(60), || self.step_pid().is_some()).await;
        self.step_pid().unwrap()
    }

    /// Opens the gate of the waiting step.
    pub fn open(&self) {
        let pid = self.step_pid().expect("the gated step is still waiting at its gate");
        std::fs::write(format!("/proc/{pid}/root/gate"), b"open\n").unwrap();
    }

    /// Asserts that `out` (a local export of this build) is complete.
    pub fn assert_complete(&self, out: &Path) {
        assert_eq!(std::fs::read_to_string(out.join("out.txt")).unwrap().trim(), self.tag, "the step's output is there");
        assert!(std::fs::read(out.join("payload.copy")).unwrap() == self.payload, "the step's copy of the payload is whole");
        assert!(std::fs::read(out.join("bin/busybox")).is_ok(), "the image's first layer is there");
    }
}

impl Drop for GatedBuild {
    /// A test that fails before it opens the gate must not hang on its build:
    /// the step is let through, so buildctl ends and the runtime can shut down.
    fn drop(&mut self) {
        if let Some(pid) = self.step_pid() {
            let _ = std::fs::write(format!("/proc/{pid}/root/gate"), b"open\n");
        }
    }
}

/// Builds `ctx` (a Dockerfile context) on `w`'s engine over its unix socket,
/// exporting to `ctx/out`; returns buildctl's output and the build's ref
/// ("" when buildctl wrote none).
pub fn build_with_ref(w: &World, ctx: &Path) -> (std::process::Output, String) {
    let ref_file = ctx.join("build-ref");
    let out = Command::new(super::BUILDCTL)
        .args(unix_addr(w))
        .args(["build", "--frontend", "dockerfile.v0", "--progress", "plain"])
        .arg(format!("--local=context={}", ctx.display()))
        .arg(format!("--local=dockerfile={}", ctx.display()))
        .arg(format!("--ref-file={}", ref_file.display()))
        .arg(format!("--output=type=local,dest={}", ctx.join("out").display()))
        .output()
        .unwrap();
    let build_ref = std::fs::read_to_string(&ref_file).unwrap_or_default().trim().to_string();
    (out, build_ref)
}
