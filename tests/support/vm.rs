//! The VM boot test's fixtures: a Debian bookworm guest image built from
//! Debian's packages with debootstrap (cached by `tests/vm/rootfs.sh`),
//! provisioned by the same `packer/scripts/provision.sh` Packer runs (with the
//! freshly built agent and the host's buildkitd, buildctl and runc staged
//! instead of downloaded), booted with qemu-system-x86_64 under systemd with a
//! blank second virtio disk as the cache volume; the guest's serial console
//! captured; and a phase timeline.
//!
//! Nothing here touches a host block device: the guest's disks are files in a
//! temporary directory, removed on drop, and qemu is killed on drop.

use super::TestPki;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The agent's public endpoints inside the guest (the port the fleet scrapes).
pub const GUEST_ENDPOINTS_PORT: u16 = 9911;
/// The agent's detail endpoints inside the guest; the test's guest config binds
/// them beyond loopback so that the host can reach them through qemu.
pub const GUEST_DETAIL_PORT: u16 = 9912;
/// The engine's TCP listener inside the guest, as the task asks.
pub const GUEST_BUILDKIT_PORT: u16 = 1234;
/// The control plane's name in the guest: `tests/vm/overlay/etc/hosts` maps it
/// to 10.0.2.2, the host's loopback under qemu user-mode networking.
pub const CONTROL_PLANE_HOST: &str = "control-plane.vm.test";
/// The guest's second virtio disk: the cache volume.
pub const CACHE_DEVICE: &str = "/dev/vdb";
/// Where the task mounts it; under the shipped allow-listed prefix.
pub const CACHE_MOUNT: &str = "/var/lib/buildkit/cache";
/// The static bootstrap token the guest's agent presents.
pub const BOOTSTRAP_TOKEN: &str = "vm-boot-test-bootstrap-token";

/// The root image's size: the debootstrap tree (~0.9 GiB with the kernel's
/// modules), the debug agent (~160 MiB), BuildKit (~80 MiB), and room for the
/// journal and the agent's state. Sparse, so unused space costs nothing.
const ROOT_IMAGE_BYTES: u64 = 3 << 30;
/// The cache disk: a few builds' worth, and over the agent's minimum.
pub const CACHE_DISK_BYTES: u64 = 4 << 30;
/// Guest memory: the engine's cgroup limit is this minus the agent's 1 GiB
/// reserve (engine.memory_reserve_bytes).
const GUEST_MEMORY_MIB: u32 = 2048;
const GUEST_CPUS: u32 = 2;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// === timeline ===

/// The test's phases with their durations, printed at the end and, when the
/// test fails, up to the phase that failed.
pub struct Timeline {
    started: Instant,
    budget: Duration,
    phases: Vec<(String, Duration, String)>,
    current: Option<(String, Instant)>,
}

impl Timeline {
    /// A timeline for a test that must finish within `budget`.
    pub fn new(budget: Duration) -> Self {
        Self { started: Instant::now(), budget, phases: vec![], current: None }
    }

    /// Starts a phase; the previous one must have ended.
    pub fn begin(&mut self, name: &str) {
        assert!(self.current.is_none(), "phase {:?} never ended", self.current.as_ref().map(|c| &c.0));
        eprintln!("vm: --- {name} (at {:.1}s)", self.started.elapsed().as_secs_f64());
        self.current = Some((name.to_string(), Instant::now()));
    }

    /// Ends the current phase with a note (what it did, e.g. "cached").
    pub fn end(&mut self, note: &str) {
        let (name, at) = self.current.take().expect("end() without begin()");
        let took = at.elapsed();
        eprintln!("vm: --- {name}: {:.1}s {note}", took.as_secs_f64());
        self.phases.push((name, took, note.to_string()));
    }

    /// The current phase's name, for failure messages.
    pub fn phase(&self) -> &str {
        self.current.as_ref().map_or("(between phases)", |c| c.0.as_str())
    }

    /// How long a step may take: `cap`, or less when the whole test's budget
    /// would run out first. A phase that finds the budget spent fails at once.
    pub fn limit(&self, cap: Duration) -> Duration {
        let left = self.budget.saturating_sub(self.started.elapsed());
        assert!(!left.is_zero(), "the test's budget of {:?} is spent before phase {:?}\n{}", self.budget, self.phase(), self.render());
        cap.min(left)
    }

    pub fn render(&self) -> String {
        let mut out = String::from("phase timeline:\n");
        for (name, took, note) in &self.phases {
            out.push_str(&format!("  {name:<18} {:>7.1}s  {note}\n", took.as_secs_f64()));
        }
        if let Some((name, at)) = &self.current {
            out.push_str(&format!("  {name:<18} {:>7.1}s  FAILED HERE\n", at.elapsed().as_secs_f64()));
        }
        out.push_str(&format!("  {:<18} {:>7.1}s  (budget {}s)\n", "total", self.started.elapsed().as_secs_f64(), self.budget.as_secs()));
        out
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        // Printed on success and on failure alike; on failure it says where.
        // Written to stderr directly, past the test harness's capture, so CI's
        // log shows the timeline of a passing run too.
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), format!("{}\n", self.render()).as_bytes());
    }
}

// === PKI ===

/// A control-plane PKI whose server certificate also names [`CONTROL_PLANE_HOST`],
/// the name the guest dials (TestPki's own names only `localhost`).
pub fn control_plane_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "vm control plane test ca");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let names = vec![CONTROL_PLANE_HOST.to_string(), "localhost".to_string(), "127.0.0.1".to_string()];
    let params = CertificateParams::new(names).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    TestPki { ca_pem: ca.pem(), server_cert_pem: cert.pem(), server_key_pem: key.serialize_pem(), ca, ca_key }
}

// === commands ===

/// Runs a command to completion; panics naming it, with its output, unless it succeeds.
pub fn run(what: &str, cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what}: {cmd:?} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// The first of `candidates` that exists (a tool's path differs between installs).
fn first_existing(what: &str, candidates: &[&str]) -> PathBuf {
    candidates.iter().map(PathBuf::from).find(|p| p.exists()).unwrap_or_else(|| panic!("{what}: none of {candidates:?} exists"))
}

/// Fails with an install hint when a host tool the test needs is missing.
pub fn require_tools() {
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("debootstrap", "debootstrap"),
        ("zstd", "zstd"),
        ("mkfs.ext4", "e2fsprogs"),
        ("fsck.ext4", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("systemctl", "systemd"),
    ] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
        assert!(found, "the VM boot test needs {tool}: apt-get install {package} (.ci/run installs it)");
    }
}

// === the image ===

/// What goes into the guest besides the base root filesystem.
pub struct ImageInputs<'a> {
    /// `config.toml` staged for provision.sh.
    pub agent_config: &'a str,
    /// The control plane's CA, installed where the config's ca_bundle points.
    pub control_plane_ca_pem: &'a str,
}

/// A bootable guest: a root image, its kernel and initrd, and a blank cache
/// disk, all in a temporary directory that is removed on drop.
pub struct GuestImage {
    dir: tempfile::TempDir,
    pub root_img: PathBuf,
    pub cache_img: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The guest kernel's release, e.g. "6.1.0-50-amd64" (from the vmlinuz name).
    pub kernel_release: String,
    /// Removes the unpacked root tree; joined before the directory goes.
    remove_tree: Option<std::thread::JoinHandle<()>>,
}

impl Drop for GuestImage {
    fn drop(&mut self) {
        if let Some(remove) = self.remove_tree.take() {
            let _ = remove.join();
        }
    }
}

impl GuestImage {
    /// Builds the image, recording the rootfs, provision and image phases.
    pub fn build(t: &mut Timeline, inputs: &ImageInputs<'_>) -> Self {
        // Unique, and on a disk (not a tmpfs): the root tree is ~1 GiB.
        let dir = tempfile::Builder::new().prefix("ma-vm-").tempdir_in("/var/tmp").unwrap();
        let work = dir.path();

        t.begin("rootfs");
        let cache = std::env::var("MA_VM_CACHE").unwrap_or_else(|_| "/var/cache/machine-agent-vm".into());
        // Bounded: a stalled mirror must fail the phase, not hang the suite.
        let limit = t.limit(Duration::from_secs(600)).as_secs().max(1).to_string();
        let out = run(
            "debootstrap rootfs (tests/vm/rootfs.sh, under timeout)",
            Command::new("timeout").args(["--kill-after=10", &limit, "bash"]).arg(repo().join("tests/vm/rootfs.sh")).arg(&cache),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        eprint!("{stderr}");
        let tarball = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().expect("rootfs.sh prints the tarball path").trim());
        let cached = stderr.contains("rootfs: cached");
        t.end(if cached { "cached tarball" } else { "debootstrap, now cached" });

        t.begin("provision");
        let root = work.join("root");
        std::fs::create_dir(&root).unwrap();
        run("unpack the rootfs", Command::new("tar").args(["--numeric-owner", "-I", "zstd", "-xpf"]).arg(&tarball).arg("-C").arg(&root));
        // Test-only guest files (network, hosts, the end-state reporter) first:
        // the token and CA the config names must exist when provision.sh runs.
        run("copy the test overlay", Command::new("cp").args(["-a", "--no-preserve=ownership"]).arg(repo().join("tests/vm/overlay/.")).arg(&root));
        let etc_agent = root.join("etc/machine-agent");
        std::fs::create_dir_all(&etc_agent).unwrap();
        super::write_private(&etc_agent.join("bootstrap-token"), BOOTSTRAP_TOKEN);
        std::fs::write(etc_agent.join("control-plane-ca.pem"), inputs.control_plane_ca_pem).unwrap();
        let stage = stage_dir(work, inputs.agent_config);
        let provision = run(
            "packer/scripts/provision.sh",
            Command::new("bash").arg(repo().join("packer/scripts/provision.sh")).env("MA_ROOT", &root).env("MA_STAGE_DIR", &stage),
        );
        eprint!("{}", String::from_utf8_lossy(&provision.stderr));
        run(
            "enable the guest's network",
            Command::new("systemctl").arg(format!("--root={}", root.display())).args([
                "enable",
                "systemd-networkd.service",
                "systemd-networkd-wait-online.service",
            ]),
        );
        t.end("unpack, overlay, provision.sh (host mode), networkd");

        t.begin("image");
        let boot = root.join("boot");
        let vmlinuz = std::fs::read_dir(&boot)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("vmlinuz-"))
            .unwrap_or_else(|| panic!("no vmlinuz-* in {}: linux-image-amd64 missing from the rootfs", boot.display()));
        let kernel_release = vmlinuz.file_name().unwrap().to_string_lossy().trim_start_matches("vmlinuz-").to_string();
        let (kernel, initrd) = (work.join("vmlinuz"), work.join("initrd.img"));
        std::fs::copy(&vmlinuz, &kernel).unwrap();
        std::fs::copy(boot.join(format!("initrd.img-{kernel_release}")), &initrd).unwrap();
        let root_img = work.join("root.img");
        // mke2fs -d copies the tree with owners and modes; no loop mount needed.
        let mkfs_started = Instant::now();
        run(
            "mkfs.ext4 -d (root image)",
            Command::new("mkfs.ext4").args(["-q", "-L", "ma-vm-root", "-d"]).arg(&root).arg(&root_img).arg(format!("{}k", ROOT_IMAGE_BYTES >> 10)),
        );
        let mkfs_took = mkfs_started.elapsed();
        // The ~1 GiB tree is not needed any more. Removing it takes half a
        // minute here (remove_dir_all; rm -rf a few seconds), so it goes in the
        // background while the guest boots, and is waited for on drop.
        let remove_tree = std::thread::spawn(move || {
            let rm = Command::new("rm").arg("-rf").arg(&root).status();
            if !rm.as_ref().is_ok_and(|s| s.success()) {
                eprintln!("vm: cannot remove {}: {rm:?}", root.display());
            }
        });
        let cache_img = work.join("cache.img");
        std::fs::File::create(&cache_img).unwrap().set_len(CACHE_DISK_BYTES).unwrap();
        t.end(&format!(
            "mkfs.ext4 -d {:.1}s, {} GiB root, blank {} GiB cache disk, kernel {kernel_release}",
            mkfs_took.as_secs_f64(),
            ROOT_IMAGE_BYTES >> 30,
            CACHE_DISK_BYTES >> 30
        ));

        Self { dir, root_img, cache_img, kernel, initrd, kernel_release, remove_tree: Some(remove_tree) }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// provision.sh's stage directory: the agent cargo just built, the shipped
/// unit, the config, and the host's engine binaries (installed by
/// scripts/install-buildkit.sh) in place of a download.
fn stage_dir(work: &Path, config: &str) -> PathBuf {
    let stage = work.join("stage");
    std::fs::create_dir_all(stage.join("bin")).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_machine-agent"), stage.join("machine-agent")).unwrap();
    std::fs::copy(repo().join("systemd/machine-agent.service"), stage.join("machine-agent.service")).unwrap();
    std::fs::write(stage.join("config.toml"), config).unwrap();
    std::fs::copy(super::BUILDKITD, stage.join("bin/buildkitd")).unwrap();
    std::fs::copy(super::BUILDCTL, stage.join("bin/buildctl")).unwrap();
    let runc = first_existing("runc (scripts/install-buildkit.sh installs it)", &["/usr/sbin/runc", "/usr/bin/runc", "/usr/local/sbin/runc"]);
    std::fs::copy(runc, stage.join("bin/runc")).unwrap();
    stage
}

// === the running guest ===

/// How qemu runs the guest's CPUs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// KVM only where the CPU shows hardware virtualisation (vmx/svm) to us:
/// on a nested host without it, /dev/kvm may open and even report "enabled"
/// while the guest hangs in early boot (seen here: `-cpu host` aborts on an
/// MSR, `-cpu qemu64` prints nothing). MA_VM_ACCEL=kvm|tcg overrides.
pub fn choose_accel() -> (Accel, String) {
    match std::env::var("MA_VM_ACCEL").as_deref() {
        Ok("kvm") => return (Accel::Kvm, "MA_VM_ACCEL=kvm".into()),
        Ok("tcg") => return (Accel::Tcg, "MA_VM_ACCEL=tcg".into()),
        _ => {}
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    match (hw, kvm) {
        (true, true) => (Accel::Kvm, "/dev/kvm opens and the CPU has vmx/svm".into()),
        (false, true) => (Accel::Tcg, "/dev/kvm opens but the CPU shows no vmx/svm (nested KVM hangs the guest here)".into()),
        (_, false) => (Accel::Tcg, "no usable /dev/kvm".into()),
    }
}

/// A booted guest: qemu with the serial console captured. Killed on drop.
pub struct Vm {
    child: Option<Child>,
    console: Arc<Mutex<String>>,
    console_file: PathBuf,
    pub accel: Accel,
    /// Host loopback ports forwarded to the guest's public and detail endpoints and engine.
    pub endpoints_port: u16,
    pub detail_port: u16,
    pub buildkit_port: u16,
    exit: Option<ExitStatus>,
    command_socket: PathBuf,
    command: Option<tokio::io::BufReader<tokio::net::UnixStream>>,
    commands_sent: u64,
    /// Stops of machine-agent.service the test caused on purpose (a SIGKILL,
    /// a handoff): [`Vm::check`] lets this many unclean ones pass.
    pub unclean_stops_expected: usize,
}

impl Vm {
    pub fn boot(image: &GuestImage, accel: Accel) -> Self {
        let endpoints_port = super::free_port();
        let detail_port = super::free_port();
        let buildkit_port = super::free_port();
        let (accel_arg, cpu) = match accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        // Every journal line on the console too, so a failure message's tail
        // shows the agent's own log; panic=-1 with -no-reboot turns a guest
        // kernel panic into qemu's exit instead of a hang.
        let append = "root=/dev/vda rw console=ttyS0 panic=-1 systemd.journald.forward_to_console=1 systemd.show_status=1";
        let netdev =
            format!("user,id=n0,hostfwd=tcp:127.0.0.1:{endpoints_port}-:{GUEST_ENDPOINTS_PORT},hostfwd=tcp:127.0.0.1:{detail_port}-:{GUEST_DETAIL_PORT},hostfwd=tcp:127.0.0.1:{buildkit_port}-:{GUEST_BUILDKIT_PORT}");
        // The test's command channel: the guest's second serial port (ttyS1,
        // where tests/vm/overlay's ma-vm-shell.service reads commands) on a
        // unix socket the test connects to; wait=off, so the guest boots
        // whether or not the test is connected.
        let command_socket = image.dir().join("command.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-name", "machine-agent-vm-test", "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none", "-serial", "stdio"])
            .arg("-chardev")
            .arg(format!("socket,id=command,path={},server=on,wait=off", command_socket.display()))
            .args(["-serial", "chardev:command"])
            .args(["-accel", accel_arg, "-cpu", cpu, "-smp", &GUEST_CPUS.to_string(), "-m", &GUEST_MEMORY_MIB.to_string()])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args(["-append", append])
            // The root disk is a throwaway: ignoring the guest's flushes is
            // safe and faster. The cache disk keeps the default, so what the
            // guest flushed is what fsck reads after qemu exits.
            .arg("-drive")
            .arg(format!("file={},format=raw,if=virtio,cache=unsafe", image.root_img.display()))
            .arg("-drive")
            .arg(format!("file={},format=raw,if=virtio", image.cache_img.display()))
            .args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"])
            // Entropy for the guest's TLS from the start of boot.
            .args(["-device", "virtio-rng-pci"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        eprintln!("vm: {cmd:?}");
        let mut child = cmd.spawn().expect("spawn qemu-system-x86_64");
        let console = Arc::new(Mutex::new(String::new()));
        let console_file = image.dir().join("console.log");
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (sink, file) = (console.clone(), console_file.clone());
        std::thread::spawn(move || {
            let mut out = std::fs::File::create(&file).ok();
            let mut buf = [0u8; 8192];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Some(f) = out.as_mut() {
                    let _ = std::io::Write::write_all(f, &buf[..n]);
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let sink = console.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            if !text.is_empty() {
                sink.lock().unwrap().push_str(&format!("\n[qemu stderr] {text}"));
            }
        });
        Self {
            child: Some(child),
            console,
            console_file,
            accel,
            endpoints_port,
            detail_port,
            buildkit_port,
            exit: None,
            command_socket,
            command: None,
            commands_sent: 0,
            unclean_stops_expected: 0,
        }
    }

    /// Runs `command` as root in the guest (sh -c) through the command
    /// channel; returns its exit status and output. Fails the phase when the
    /// channel does not answer within `within`.
    pub async fn sh(&mut self, phase: &str, command: &str, within: Duration) -> (i32, String) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        assert!(!command.contains('\n'), "one line per command: {command:?}");
        let deadline = Instant::now() + within;
        self.commands_sent += 1;
        let id = self.commands_sent;
        if self.command.is_none() {
            match tokio::net::UnixStream::connect(&self.command_socket).await {
                Ok(stream) => self.command = Some(tokio::io::BufReader::new(stream)),
                Err(e) => self.fail(phase, &format!("cannot connect to the command channel {}: {e}", self.command_socket.display())),
            }
        }
        let end = format!("MA-VM-CMD-END {id} rc=");
        let line = format!("{id} {command}\n");
        let answer = tokio::time::timeout_at(deadline, async {
            let channel = self.command.as_mut().unwrap();
            channel.get_mut().write_all(line.as_bytes()).await?;
            let mut output = String::new();
            loop {
                let mut got = String::new();
                if channel.read_line(&mut got).await? == 0 {
                    return Err(std::io::Error::other("the command channel closed"));
                }
                let got = got.trim_end_matches(['\r', '\n']);
                if let Some(rc) = got.strip_prefix(&end) {
                    return Ok((rc.trim().parse::<i32>().unwrap_or(-1), output));
                }
                // Lines of earlier commands that timed out are not this one's.
                if !got.starts_with("MA-VM-CMD-") {
                    output.push_str(got);
                    output.push('\n');
                }
            }
        })
        .await;
        match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                self.command = None;
                self.fail(phase, &format!("guest command {command:?}: {e}"))
            }
            Err(_) => self.fail(phase, &format!("guest command {command:?} did not answer within {within:?}")),
        }
    }

    /// [`Vm::sh`], failing the phase unless the command succeeds; its output.
    pub async fn sh_ok(&mut self, phase: &str, command: &str, within: Duration) -> String {
        let (rc, output) = self.sh(phase, command, within).await;
        if rc != 0 {
            self.fail(phase, &format!("guest command {command:?} exited {rc}: {output}"));
        }
        output
    }

    /// Waits until the command channel answers (the guest's ma-vm-shell runs).
    pub async fn wait_command_channel(&mut self, phase: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            self.check(phase);
            if tokio::net::UnixStream::connect(&self.command_socket).await.is_ok() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(5));
        let probe = self.sh(phase, "echo channel-ok", left).await;
        if probe != (0, "channel-ok\n".to_string()) {
            self.fail(phase, &format!("the command channel answered {probe:?}"));
        }
    }

    pub fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    /// The console's last lines, escape sequences stripped, for failure messages.
    pub fn console_tail(&self, lines: usize) -> String {
        let text = strip_ansi(&self.console());
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Lines of the console that contain `needle`.
    pub fn console_lines(&self, needle: &str) -> Vec<String> {
        strip_ansi(&self.console()).lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
    }

    /// Fails the test in `phase`: the reason, the guest console's tail and where the whole log is.
    pub fn fail(&self, phase: &str, reason: &str) -> ! {
        let kept = keep_console(&self.console_file);
        panic!("VM boot test failed in phase {phase:?}: {reason}\n--- guest console, last 80 lines ({kept}):\n{}\n---", self.console_tail(80));
    }

    /// Keeps the whole console log past the test (the temporary directory goes); returns where.
    pub fn keep_console(&self) -> String {
        keep_console(&self.console_file)
    }

    /// qemu's exit status, once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.exit = child.try_wait().unwrap();
            }
        }
        self.exit
    }

    /// Fails the test if the guest is gone or told of an unclean end: qemu
    /// exited, the kernel panicked, or the agent's unit stopped unsuccessfully.
    pub fn check(&mut self, phase: &str) {
        if let Some(status) = self.exited() {
            self.fail(phase, &format!("qemu exited ({status}) before the phase was done"));
        }
        if self.console().contains("Kernel panic") {
            self.fail(phase, "the guest kernel panicked");
        }
        let unclean: Vec<String> = self.console_lines("MA-VM-STOP").into_iter().filter(|l| !l.contains("service_result=success")).collect();
        if unclean.len() > self.unclean_stops_expected {
            self.fail(phase, &format!("machine-agent.service stopped unsuccessfully: {}", unclean[self.unclean_stops_expected].trim()));
        }
    }

    /// Waits until `cond` holds, checking the guest each time; fails the phase after `within`.
    pub async fn wait_until(&mut self, phase: &str, what: &str, within: Duration, mut cond: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            if cond(self) {
                return;
            }
            self.check(phase);
            if Instant::now() > deadline {
                self.fail(phase, &format!("timed out after {within:?} waiting for {what}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits for qemu to exit on its own (the guest powered off).
    pub async fn wait_exit(&mut self, phase: &str, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            if Instant::now() > deadline {
                self.fail(phase, &format!("qemu did not exit within {within:?} (the guest did not power off)"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.exit.is_none() && child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if std::thread::panicking() {
            keep_console(&self.console_file);
        }
    }
}

/// Copies the console log out of the temporary directory (removed on drop)
/// into cargo's target tmp dir; returns where, for the failure message.
fn keep_console(file: &Path) -> String {
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm-console.log");
    match std::fs::copy(file, &kept) {
        Ok(_) => format!("whole log kept at {}", kept.display()),
        Err(e) => format!("cannot keep the whole log: {e}"),
    }
}

/// The console with terminal escape sequences (systemd's colours, cursor moves) removed.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters and intermediates up to a final byte in @..~.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// `KEY=value` fields of a report line, e.g. the guest's MA-VM-REPORT.
pub fn fields(line: &str) -> std::collections::BTreeMap<String, String> {
    line.split_whitespace().filter_map(|f| f.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}
