//! A real single-node Ceph cluster (Debian's ceph-mon and ceph-osd, see
//! /work/shared/design/CEPH.md) as plain processes, for tests of the RBD code.
//!
//! One cluster per test binary: [`cluster`] starts it on first use and every
//! test of the binary shares it, so tests give their pools, images and client
//! ids unique names ([`unique_name`]). Everything lives in one fresh directory
//! under /tmp and listens on 127.0.0.1 on ports chosen free at start, so two
//! test binaries running at once never meet.
//!
//! Cleanup, however the binary ends:
//! - normal end or a failed test: the harness ends with `std::process::exit`,
//!   which runs `atexit` handlers; ours kills the daemons by pid and removes
//!   the directory;
//! - SIGKILL of the test process: no handler runs, but every process spawned
//!   through [`spawn`] has `PR_SET_PDEATHSIG(SIGKILL)` set and dies with it
//!   (checked: the OSD goes at once); only the directory stays behind.
//!
//! Tests that mount (rbd-fuse, loop devices) clean up after themselves; the
//! atexit handler only knows the daemons and the directory.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // test code: a fixture fails loudly

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Bound on the cluster coming up: monitor answering, OSD up, a pool usable.
/// Bootstrap takes about 13 s here on a shared CPU.
pub const START_WITHIN: Duration = Duration::from_secs(90);

/// Bound on one admin command (`ceph`, `rbd`) against a running cluster.
pub const COMMAND_WITHIN: Duration = Duration::from_secs(60);

/// How often bounded waits look again.
const POLL: Duration = Duration::from_millis(100);

/// Placement groups per test pool: few, so many pools fit one OSD.
const PG_NUM: &str = "8";

static CLUSTER: OnceLock<CephCluster> = OnceLock::new();

/// The cluster of this test binary, started on first use.
pub fn cluster() -> &'static CephCluster {
    CLUSTER.get_or_init(CephCluster::start)
}

/// The single-node cluster: one monitor (`mon.a`), one bluestore OSD (`osd.0`), no mgr.
#[derive(Debug)]
pub struct CephCluster {
    /// The cluster's own directory: config, keyrings, daemon data and logs.
    pub dir: PathBuf,
    conf: PathBuf,
    admin_keyring: PathBuf,
    mon_v2_port: u16,
    mon_v1_port: u16,
    mon: Mutex<Option<Child>>,
    osd: Mutex<Option<Child>>,
    /// How long [`cluster`] took from nothing to an OSD up.
    pub startup: Duration,
}

impl CephCluster {
    // unsafe: registering the atexit handler, the one libc call with no safe wrapper here.
    #[allow(unsafe_code)]
    fn start() -> CephCluster {
        let started = tokio::time::Instant::now();
        // Kept (not a TempDir): the atexit handler removes it, after killing the daemons.
        let dir = tempfile::Builder::new().prefix("machine-agent-ceph-").tempdir().expect("create the cluster directory").keep();
        let dir = dir.canonicalize().unwrap();
        for sub in ["run", "log", "mon", "osd"] {
            std::fs::create_dir(dir.join(sub)).unwrap();
        }
        let (mon_v2_port, mon_v1_port) = two_free_ports();
        let fsid = new_uuid();
        let conf = dir.join("ceph.conf");
        let admin_keyring = dir.join("admin.keyring");
        let bootstrap_keyring = dir.join("bootstrap-osd.keyring");
        let mon_keyring = dir.join("mon.keyring");
        std::fs::write(&conf, config_text(&dir, &fsid, mon_v2_port, mon_v1_port)).unwrap();

        // The manual deployment of the Ceph docs, in this directory.
        let key = |file: &Path, name: &str, caps: &[&str]| {
            let mut args = vec!["--create-keyring", path_str(file), "--gen-key", "-n", name];
            args.extend(caps);
            check("ceph-authtool", &args);
        };
        key(&mon_keyring, "mon.", &["--cap", "mon", "allow *"]);
        key(&admin_keyring, "client.admin", &["--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mds", "allow *", "--cap", "mgr", "allow *"]);
        key(&bootstrap_keyring, "client.bootstrap-osd", &["--cap", "mon", "profile bootstrap-osd", "--cap", "mgr", "allow r"]);
        for other in [&admin_keyring, &bootstrap_keyring] {
            check("ceph-authtool", &[path_str(&mon_keyring), "--import-keyring", path_str(other)]);
        }
        let monmap = dir.join("monmap");
        let addrs = format!("[v2:127.0.0.1:{mon_v2_port},v1:127.0.0.1:{mon_v1_port}]");
        check("monmaptool", &["--create", "--addv", "a", &addrs, "--fsid", &fsid, path_str(&monmap)]);
        check("ceph-mon", &["-c", path_str(&conf), "--mkfs", "-i", "a", "--monmap", path_str(&monmap), "--keyring", path_str(&mon_keyring)]);

        let cluster = CephCluster {
            dir: dir.clone(),
            conf: conf.clone(),
            admin_keyring,
            mon_v2_port,
            mon_v1_port,
            mon: Mutex::new(None),
            osd: Mutex::new(None),
            startup: Duration::ZERO,
        };
        // From here on there are daemons to clean up; register before the first one.
        // SAFETY: atexit with an extern "C" fn that takes nothing; it only reads CLUSTER.
        let registered = unsafe { nix::libc::atexit(cleanup_at_exit) };
        assert_eq!(registered, 0, "atexit failed");
        ORPHAN_DIR.set(dir.clone()).ok();
        cluster.start_monitor();

        // The OSD: an id and key from the monitor, its keyring, bluestore mkfs on a sparse file.
        let osd_uuid = new_uuid();
        let secret = String::from_utf8(check("ceph-authtool", &["--gen-print-key"]).stdout).unwrap().trim().to_string();
        let secret_json = format!("{{\"cephx_secret\": \"{secret}\"}}");
        let id = cluster.run_bounded_stdin(
            "ceph",
            &["-c", path_str(&conf), "-n", "client.bootstrap-osd", "-k", path_str(&bootstrap_keyring), "osd", "new", &osd_uuid, "-i", "-"],
            &secret_json,
        );
        assert!(id.status.success(), "ceph osd new failed ({}): {}", id.status, String::from_utf8_lossy(&id.stderr));
        assert_eq!(String::from_utf8_lossy(&id.stdout).trim(), "0", "the first OSD's id");
        let osd_data = dir.join("osd/ceph-0");
        std::fs::create_dir(&osd_data).unwrap();
        check("ceph-authtool", &["--create-keyring", path_str(&osd_data.join("keyring")), "--name", "osd.0", "--add-key", &secret]);
        check("ceph-osd", &["-c", path_str(&conf), "-i", "0", "--mkfs", "--osd-uuid", &osd_uuid]);
        let osd = spawn_daemon(Command::new("ceph-osd").args(["-c", path_str(&conf), "-f", "-i", "0"]), &dir.join("log/osd.0.out"));
        *cluster.osd.lock().unwrap() = Some(osd);
        cluster.wait_until("osd.0 up", START_WITHIN, &dir.join("log/osd.0.log"), |c| {
            let out = c.run("ceph", &["osd", "stat", "--format", "json"]);
            let stat: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            stat["num_up_osds"] == 1 && stat["num_in_osds"] == 1
        });
        CephCluster { startup: started.elapsed(), ..cluster }
    }

    /// The admin's config file (`-c`): monitor addresses, admin keyring, logs and sockets in [`Self::dir`].
    pub fn admin_conf(&self) -> &Path {
        &self.conf
    }

    /// The admin keyring (`client.admin`).
    pub fn admin_keyring(&self) -> &Path {
        &self.admin_keyring
    }

    /// The monitor's addresses: `[v2, v1]`, each `127.0.0.1:<port>`. The v1
    /// (legacy) one is what the kernel client takes; any Ceph tool takes
    /// either. [`Self::mon_host`] has the config-file form with both.
    pub fn monitor_addrs(&self) -> Vec<String> {
        vec![format!("127.0.0.1:{}", self.mon_v2_port), format!("127.0.0.1:{}", self.mon_v1_port)]
    }

    /// `mon_host` as a config file writes it: `[v2:127.0.0.1:P2,v1:127.0.0.1:P1]`.
    pub fn mon_host(&self) -> String {
        format!("[v2:127.0.0.1:{},v1:127.0.0.1:{}]", self.mon_v2_port, self.mon_v1_port)
    }

    /// Runs a Ceph tool (`ceph`, `rbd`, ...) as client.admin with the admin
    /// config, bounded by [`COMMAND_WITHIN`]; the output whatever the exit code.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["-c", path_str(&self.conf)];
        all.extend(args);
        run_bounded(Command::new(program).args(&all).stdin(Stdio::null()), COMMAND_WITHIN)
    }

    /// [`Self::run`] that must succeed; its stdout.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(out.status.success(), "{program} {args:?} failed ({}): {}{}", out.status, stdout(&out), stderr(&out));
        stdout(&out)
    }

    fn run_bounded_stdin(&self, program: &str, args: &[&str], input: &str) -> Output {
        let mut input_file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut input_file, input.as_bytes()).unwrap();
        std::io::Seek::rewind(&mut input_file).unwrap();
        run_bounded(Command::new(program).args(args).stdin(input_file), COMMAND_WITHIN)
    }

    /// Creates a replicated pool and readies it for RBD (`rbd pool init`, which
    /// returns once the pool's placement groups take writes).
    pub fn create_pool(&self, name: &str) {
        self.run_ok("ceph", &["osd", "pool", "create", name, PG_NUM, PG_NUM]);
        let out = self.run("rbd", &["pool", "init", name]);
        assert!(out.status.success(), "rbd pool init {name} failed ({}): {}\nosd log tail:\n{}", out.status, stderr(&out), self.osd_log_tail());
    }

    /// A client key for builders: `mon 'profile rbd' osd 'profile rbd pool=<pool>'`; the base64 secret.
    pub fn create_client(&self, id: &str, pool: &str) -> String {
        let name = format!("client.{id}");
        let osd_caps = format!("profile rbd pool={pool}");
        self.run_ok("ceph", &["auth", "get-or-create", &name, "mon", "profile rbd", "osd", &osd_caps]);
        self.run_ok("ceph", &["auth", "print-key", &name]).trim().to_string()
    }

    /// Creates `pool/image` of `size_bytes` with the features the agent uses (layering, exclusive-lock).
    pub fn create_image(&self, pool: &str, image: &str, size_bytes: u64) {
        let spec = format!("{pool}/{image}");
        let size = format!("{size_bytes}B");
        self.run_ok("rbd", &["create", "--size", &size, "--image-feature", "layering,exclusive-lock", &spec]);
    }

    /// `rbd lock ls --format json <spec>`, raw.
    pub fn lock_holders(&self, spec: &str) -> String {
        self.run_ok("rbd", &["lock", "ls", "--format", "json", spec])
    }

    /// `rbd status --format json <spec>`, raw.
    pub fn status(&self, spec: &str) -> String {
        self.run_ok("rbd", &["status", "--format", "json", spec])
    }

    /// `ceph osd blocklist ls`, raw (one entry a line, then a count on stderr).
    pub fn blocklist_ls(&self) -> String {
        self.run_ok("ceph", &["osd", "blocklist", "ls"])
    }

    /// Kills the monitor (SIGKILL, by pid) and reaps it. Every test of the
    /// binary loses the cluster until [`Self::start_monitor`]: a test that calls
    /// this must keep the others out meanwhile.
    pub fn stop_monitor(&self) {
        let mut mon = self.mon.lock().unwrap();
        let mut child = mon.take().expect("the monitor is not running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts the monitor (again) on the same ports and store; returns once it answers.
    pub fn start_monitor(&self) {
        {
            let mut mon = self.mon.lock().unwrap();
            assert!(mon.is_none(), "the monitor is already running");
            *mon = Some(spawn_daemon(Command::new("ceph-mon").args(["-c", path_str(&self.conf), "-f", "-i", "a"]), &self.dir.join("log/mon.a.out")));
        }
        self.wait_until("the monitor answers `ceph -s`", START_WITHIN, &self.dir.join("log/mon.a.log"), |c| {
            // --connect-timeout: a monitor not yet listening would otherwise keep `ceph` hunting for 300 s.
            c.run("ceph", &["--connect-timeout", "5", "-s"]).status.success()
        });
    }

    /// The pid of the monitor, while it runs.
    pub fn monitor_pid(&self) -> Option<u32> {
        self.mon.lock().unwrap().as_ref().map(Child::id)
    }

    /// The last lines of the OSD's log, for failure messages.
    pub fn osd_log_tail(&self) -> String {
        log_tail(&self.dir.join("log/osd.0.log"))
    }

    /// The last lines of the monitor's log, for failure messages.
    pub fn mon_log_tail(&self) -> String {
        log_tail(&self.dir.join("log/mon.a.log"))
    }

    /// Polls `cond` until it holds; panics after `within` with the tail of `log`.
    // A blocking sleep between polls of another process: no tokio clock here.
    #[allow(clippy::disallowed_methods)]
    fn wait_until(&self, what: &str, within: Duration, log: &Path, mut cond: impl FnMut(&CephCluster) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        while !cond(self) {
            assert!(tokio::time::Instant::now() < deadline, "ceph: timed out after {within:?} waiting for {what}; {} ends:\n{}", log.display(), log_tail(log));
            std::thread::sleep(POLL);
        }
    }
}

/// The cluster's config: one monitor on 127.0.0.1, the settings that keep a
/// one-OSD cluster without a mgr healthy and small (CEPH.md), and every file in `dir`.
fn config_text(dir: &Path, fsid: &str, v2: u16, v1: u16) -> String {
    let d = dir.display();
    let mut text = String::new();
    writeln!(
        text,
        "[global]
fsid = {fsid}
mon initial members = a
mon host = [v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = {d}/run
admin socket = {d}/run/$cluster-$name.asok
# One OSD: a replica count of one, and no warning about it.
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
# No mgr: without this the monitor reports MGR_DOWN after 120 s.
mon mgr mkfs grace = 31536000
# The machine's disk may be fuller than a real cluster's would be.
mon data avail warn = 1
mon data avail crit = 0

[mon]
mon data = {d}/mon/$cluster-$id
log file = {d}/log/$name.log
# Not /var/log/ceph: the cluster and audit logs stay in this directory too.
mon cluster log file = {d}/log/$cluster.$channel.log

[osd]
osd data = {d}/osd/$cluster-$id
keyring = $osd_data/keyring
log file = {d}/log/$name.log
osd objectstore = bluestore
# Bluestore on a sparse 4 GiB file in osd data.
bluestore block create = true
bluestore block size = 4294967296
# osd memory target cannot go below 896 MiB; a fixed small cache caps the OSD instead.
bluestore cache autotune = false
bluestore cache size = 134217728

[client]
# Per process: two clients with one name would otherwise share a socket.
admin socket = {d}/run/$cluster-$name.$pid.$cctid.asok
# Bounded, so a test against a dead monitor fails instead of hanging 300 s.
client mount timeout = 30
rados mon op timeout = 60

[client.admin]
keyring = {d}/admin.keyring"
    )
    .unwrap();
    text
}

// === processes ===

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` with `PR_SET_PDEATHSIG(SIGKILL)`, so it dies if the test
/// process is SIGKILLed.
///
/// The kernel sends the death signal when the *thread* that forked the child
/// exits, not the process; test threads end with their test, which would kill
/// a daemon shared by the whole binary. So every spawn happens on one
/// dedicated thread that lives as long as the process: it takes requests over
/// a channel whose sender is kept in a static and never dropped.
pub fn spawn(cmd: Command) -> Child {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("ceph-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(spawn_with_pdeathsig(&mut cmd));
                }
            })
            .expect("start the spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    sender.lock().unwrap().send((cmd, reply_tx)).expect("the spawner thread is gone");
    reply_rx.recv().expect("the spawner thread is gone").expect("spawn")
}

// unsafe: pre_exec (prctl in the forked child), which std and nix do not wrap.
#[allow(unsafe_code)]
fn spawn_with_pdeathsig(cmd: &mut Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as nix::libc::pid_t;
    // SAFETY: prctl, getppid and _exit are async-signal-safe; nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl: then no signal will come.
            if nix::libc::getppid() != parent {
                nix::libc::_exit(1);
            }
            Ok(())
        })
    };
    cmd.spawn()
}

/// A daemon in the foreground (`-f`), its stdout and stderr into `out`.
fn spawn_daemon(cmd: &mut Command, out: &Path) -> Child {
    let file = File::create(out).unwrap();
    cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file);
    let owned = std::mem::replace(cmd, Command::new("true"));
    let child = spawn(owned);
    DAEMON_PIDS[DAEMON_SLOTS.fetch_add(1, Ordering::SeqCst) as usize % DAEMON_PIDS.len()].store(child.id(), Ordering::SeqCst);
    child
}

/// Every daemon pid ever started, for the atexit handler, which must not take
/// locks a panicking test may hold. A restarted monitor takes a new slot; an
/// old pid is only killed if it is still our child (see [`cleanup_at_exit`]).
static DAEMON_PIDS: [AtomicU32; 64] = [const { AtomicU32::new(0) }; 64];
static DAEMON_SLOTS: AtomicU32 = AtomicU32::new(0);
static ORPHAN_DIR: OnceLock<PathBuf> = OnceLock::new();

/// At process exit: SIGKILL each daemon, reap it, remove the cluster directory.
extern "C" fn cleanup_at_exit() {
    for slot in &DAEMON_PIDS {
        let pid = slot.swap(0, Ordering::SeqCst);
        if pid == 0 {
            continue;
        }
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        // Only our own unreaped children: waitpid(WNOHANG) fails for a pid that is
        // not our child (already reaped by stop_monitor, or reused by someone else).
        if nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)).is_ok() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }
    if let Some(dir) = ORPHAN_DIR.get() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            eprintln!("ceph: cannot remove {}: {e}", dir.display());
        }
    }
}

/// Runs `cmd` to completion, killing it and panicking after `within`; stdout and stderr captured.
pub fn run_bounded(cmd: &mut Command, within: Duration) -> Output {
    run_within(cmd, within).unwrap_or_else(|err| panic!("{cmd:?} did not finish within {within:?}; stderr so far:\n{err}"))
}

/// Runs `cmd` to completion, stdout and stderr captured; after `within` kills
/// it and returns what it wrote to stderr as the error.
// A blocking sleep between polls of a child: no tokio clock here.
#[allow(clippy::disallowed_methods)]
pub fn run_within(cmd: &mut Command, within: Duration) -> Result<Output, String> {
    let (out, err) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
    cmd.stdout(out.try_clone().unwrap()).stderr(err.try_clone().unwrap());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = tokio::time::Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(read_all(err));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output { status, stdout: read_all(out).into_bytes(), stderr: read_all(err).into_bytes() })
}

fn read_all(mut file: File) -> String {
    use std::io::{Read, Seek};
    let mut text = String::new();
    file.rewind().unwrap();
    file.read_to_string(&mut text).unwrap();
    text
}

/// Runs a setup tool that must succeed; panics with its output otherwise.
fn check(program: &str, args: &[&str]) -> Output {
    let out = run_bounded(Command::new(program).args(args).stdin(Stdio::null()), COMMAND_WITHIN);
    assert!(out.status.success(), "{program} {args:?} failed ({}): {}{}", out.status, stdout(&out), stderr(&out));
    out
}

// === small helpers ===

/// `prefix` plus this process's pid and a counter: unique within the cluster
/// (which belongs to this process), and a valid pool, image and client name.
/// A pool, a builder client with a key for it, and an image name: one test's share of the cluster.
pub struct Share {
    pub pool: String,
    pub client: String,
    pub key: String,
    pub image: String,
}

impl Share {
    pub fn new() -> Self {
        let c = cluster();
        let pool = unique_name("pool");
        c.create_pool(&pool);
        let client = unique_name("builder");
        let key = c.create_client(&client, &pool);
        Self { pool, client, key, image: unique_name("cache") }
    }

    pub fn spec(&self) -> String {
        format!("{}/{}", self.pool, self.image)
    }
}

pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst))
}

fn new_uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap().trim().to_string()
}

/// Two TCP ports on 127.0.0.1 that were free a moment ago, held together so they differ.
fn two_free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

/// The last 40 lines of a log file, or why there are none.
pub fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
