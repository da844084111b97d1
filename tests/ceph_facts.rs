//! Facts about a real Ceph cluster (tests/support/ceph.rs) that the agent's
//! RBD code relies on: exact tool output, exit codes and error texts, as a
//! builder client (`profile rbd`) calls the tools with its own keyring and a
//! minimal config (`mon_host`, `keyring`, `admin socket`). Each test prints
//! what it saw (`--nocapture`) and asserts the shape the agent parses.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::RwLock;
use std::time::Duration;
use support::ceph::{self, cluster, run_bounded, run_within, stderr, stdout, unique_name};
use tokio::time::Instant;

/// `monitor_down` stops the one monitor; every other test holds this shared.
static MONITOR: RwLock<()> = RwLock::new(());

const IMAGE_BYTES: u64 = 256 << 20;

/// A builder client as the agent uses one: its own keyring file and a minimal config.
struct Builder {
    id: String,
    dir: tempfile::TempDir,
}

impl Builder {
    /// A `profile rbd` client for `pool`, its keyring and config in a fresh directory.
    fn new(pool: &str) -> Builder {
        let id = unique_name("builder");
        let key = cluster().create_client(&id, pool);
        let b = Builder { id, dir: tempfile::Builder::new().prefix("machine-agent-ceph-builder-").tempdir().unwrap() };
        b.write_keyring(&b.keyring(), &key);
        b.write_conf(&b.conf(), &cluster().mon_host());
        b
    }

    fn keyring(&self) -> PathBuf {
        self.dir.path().join("keyring")
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("ceph.conf")
    }

    fn write_keyring(&self, path: &Path, key: &str) {
        std::fs::write(path, format!("[client.{}]\n\tkey = {key}\n", self.id)).unwrap();
    }

    fn write_conf(&self, path: &Path, mon_host: &str) {
        // log file: rbd-fuse (a daemon to Ceph) otherwise logs to /var/log/ceph/ceph-client.<id>.log,
        // and a blocklisted one writes there without end (1.3 GB in 10 minutes here).
        let dir = self.dir.path().display();
        let text = format!(
            "[global]\nmon_host = {mon_host}\nkeyring = {}\nadmin socket = {dir}/$cluster-$name.$pid.$cctid.asok\nlog file = {dir}/$name.$pid.log\n",
            self.keyring().display()
        );
        std::fs::write(path, text).unwrap();
    }

    /// `<program> --id <id> --keyring <keyring> -c <conf> <args>`, bounded; how long it took.
    fn run_with(&self, program: &str, keyring: &Path, conf: &Path, args: &[&str]) -> (Output, Duration) {
        let started = Instant::now();
        let out = run_bounded(
            Command::new(program).args(["--id", &self.id, "--keyring"]).arg(keyring).arg("-c").arg(conf).args(args).stdin(Stdio::null()),
            Duration::from_secs(60),
        );
        (out, started.elapsed())
    }

    fn run(&self, program: &str, args: &[&str]) -> (Output, Duration) {
        self.run_with(program, &self.keyring(), &self.conf(), args)
    }

    fn run_ok(&self, program: &str, args: &[&str]) -> String {
        let (out, _) = self.run(program, args);
        assert!(out.status.success(), "{program} {args:?} as {}: {}{}", self.id, stdout(&out), stderr(&out));
        stdout(&out)
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn pool_and_builder() -> (String, Builder) {
    let pool = unique_name("pool");
    cluster().create_pool(&pool);
    let builder = Builder::new(&pool);
    (pool, builder)
}

fn show(what: &str, out: &Output, took: Duration) {
    println!("FACT {what}: exit {:?} in {took:?}\n  stdout: {}\n  stderr: {}", out.status.code(), stdout(out).trim(), stderr(out).trim());
}

#[test]
fn a_b_create_info_and_errors() {
    let _shared = MONITOR.read().unwrap();
    println!("FACT cluster start to osd up: {:?}", cluster().startup);
    let (pool, b) = pool_and_builder();
    let spec = format!("{pool}/img");

    // b. create with a byte size, as the builder.
    let (out, took) = b.run("rbd", &["create", "--size", &format!("{IMAGE_BYTES}B"), "--image-feature", "layering,exclusive-lock", &spec]);
    show("rbd create --size <N>B", &out, took);
    assert!(out.status.success());

    // a. info's shape.
    let (out, took) = b.run("rbd", &["info", "--format", "json", &spec]);
    show("rbd info --format json", &out, took);
    let info = json(&stdout(&out));
    assert_eq!(info["size"], IMAGE_BYTES);
    assert_eq!(info["name"], "img");
    assert_eq!(info["features"], serde_json::json!(["layering", "exclusive-lock"]));
    assert_eq!(info["format"], 2);

    let (out, took) = b.run("rbd", &["info", "--format", "json", &format!("{pool}/missing")]);
    show("rbd info, no such image", &out, took);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out).trim(), "rbd: error opening image missing: (2) No such file or directory");

    let (out, took) = b.run("rbd", &["info", "--format", "json", "nosuchpool/img"]);
    show("rbd info, no such pool", &out, took);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out).trim(), "rbd: error opening pool 'nosuchpool': (2) No such file or directory");

    // A pool that exists but is not in the key's caps.
    let other = unique_name("pool");
    cluster().create_pool(&other);
    cluster().create_image(&other, "img", IMAGE_BYTES);
    let (out, took) = b.run("rbd", &["info", "--format", "json", &format!("{other}/img")]);
    show("rbd info, pool outside the key's caps", &out, took);
    assert_ne!(out.status.code(), Some(0));

    // Wrong key: refused at once, exit 13.
    let bad = b.dir.path().join("bad.keyring");
    let wrong_key = String::from_utf8(run_bounded(Command::new("ceph-authtool").arg("--gen-print-key"), ceph::COMMAND_WITHIN).stdout).unwrap();
    b.write_keyring(&bad, wrong_key.trim());
    let (out, took) = b.run_with("rbd", &bad, &b.conf(), &["info", "--format", "json", &spec]);
    show("rbd info, wrong key", &out, took);
    assert_eq!(out.status.code(), Some(13));
    assert!(stderr(&out).contains("rbd: couldn't connect to the cluster!"));
    assert!(took < Duration::from_secs(10));

    // Monitors unreachable (nothing listens): --client_mount_timeout bounds it, exit 110.
    let dead = b.dir.path().join("dead.conf");
    b.write_conf(&dead, "[v2:127.0.0.1:9,v1:127.0.0.1:10]");
    let (out, took) = b.run_with("rbd", &b.keyring(), &dead, &["--client_mount_timeout", "3", "info", "--format", "json", &spec]);
    show("rbd info, monitors unreachable, --client_mount_timeout 3", &out, took);
    assert_eq!(out.status.code(), Some(110));
    assert!(stderr(&out).contains("authenticate timed out after 3"), "{}", stderr(&out));
    assert!(took < Duration::from_secs(15));
    // rados_mon_op_timeout alone does not bound the connect: still hunting after 6 s.
    let hung = run_within(
        Command::new("rbd")
            .args(["--id", &b.id, "--keyring"])
            .arg(b.keyring())
            .arg("-c")
            .arg(&dead)
            .args(["--rados_mon_op_timeout", "3", "info", &spec])
            .stdin(Stdio::null()),
        Duration::from_secs(6),
    );
    println!("FACT rbd info, monitors unreachable, --rados_mon_op_timeout 3 only: {hung:?}");
    assert!(hung.is_err(), "rados_mon_op_timeout bounded the connect after all: {hung:?}");
}

#[test]
fn c_advisory_lock() {
    let _shared = MONITOR.read().unwrap();
    let (pool, b) = pool_and_builder();
    let spec = format!("{pool}/img");
    b.run_ok("rbd", &["create", "--size", &format!("{IMAGE_BYTES}B"), "--image-feature", "layering,exclusive-lock", &spec]);

    let (out, took) = b.run("rbd", &["lock", "add", &spec, "agent-lock"]);
    show("rbd lock add", &out, took);
    assert!(out.status.success());
    let (out, took) = b.run("rbd", &["lock", "add", &spec, "other-lock"]);
    show("rbd lock add by a second process, other id", &out, took);
    assert_eq!(out.status.code(), Some(16));
    assert!(stderr(&out).contains("lock is already held by someone else"), "{}", stderr(&out));
    let (out, took) = b.run("rbd", &["lock", "add", &spec, "agent-lock"]);
    show("rbd lock add by a second process, same id", &out, took);
    assert_ne!(out.status.code(), Some(0));

    let ls = b.run_ok("rbd", &["lock", "ls", "--format", "json", &spec]);
    println!("FACT rbd lock ls --format json: {}", ls.trim());
    let locks = json(&ls);
    let lock = &locks.as_array().unwrap()[0];
    assert_eq!(locks.as_array().unwrap().len(), 1);
    assert_eq!(lock["id"], "agent-lock");
    let locker = lock["locker"].as_str().unwrap();
    assert!(locker.starts_with("client."), "{locker}");
    assert!(lock["address"].as_str().unwrap().starts_with("127.0.0.1:0/"), "{lock}");

    let (out, took) = b.run("rbd", &["lock", "rm", &spec, "agent-lock", locker]);
    show("rbd lock rm <spec> <id> <locker>", &out, took);
    assert!(out.status.success());
    let ls = b.run_ok("rbd", &["lock", "ls", "--format", "json", &spec]);
    println!("FACT rbd lock ls --format json, no locks: {}", ls.trim());
    assert_eq!(json(&ls), serde_json::json!([]));
}

/// An rbd-fuse of the builder's image, with the loop device and mount over
/// it; drop tears down in order: umount, losetup -d, fusermount -u, kill.
struct FuseStack {
    fuse: Child,
    fuse_dir: PathBuf,
    mount_dir: PathBuf,
    loopdev: Option<String>,
    mounted: bool,
}

impl FuseStack {
    fn start(b: &Builder, pool: &str, image: &str) -> FuseStack {
        let fuse_dir = b.dir.path().join("fuse");
        let mount_dir = b.dir.path().join("mnt");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&mount_dir).unwrap();
        let mut cmd = Command::new("rbd-fuse");
        cmd.arg("-c").arg(b.conf()).args(["--id", &b.id, "--keyring"]).arg(b.keyring()).args(["-p", pool, "-r", image]).arg(&fuse_dir).arg("-f");
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(b.dir.path().join("rbd-fuse.log")).unwrap());
        let fuse = ceph::spawn(cmd);
        let stack = FuseStack { fuse, fuse_dir, mount_dir, loopdev: None, mounted: false };
        stack.wait_file(image);
        stack
    }

    // Polls for the image file rbd-fuse exposes; bounded.
    #[allow(clippy::disallowed_methods)]
    fn wait_file(&self, image: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::metadata(self.fuse_dir.join(image)).is_err() {
            assert!(Instant::now() < deadline, "rbd-fuse did not expose {image} within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn loop_and_mount(&mut self, file: &Path) {
        let out = run_bounded(Command::new("losetup").args(["--find", "--show"]).arg(file), ceph::COMMAND_WITHIN);
        assert!(out.status.success(), "losetup: {}", stderr(&out));
        let dev = stdout(&out).trim().to_string();
        self.loopdev = Some(dev.clone());
        let out = run_bounded(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "nodiscard", &dev]), ceph::COMMAND_WITHIN);
        assert!(out.status.success(), "mkfs.ext4: {}", stderr(&out));
        let out = run_bounded(Command::new("mount").args(["-o", "nodiscard", &dev]).arg(&self.mount_dir), ceph::COMMAND_WITHIN);
        assert!(out.status.success(), "mount: {}", stderr(&out));
        self.mounted = true;
    }
}

impl Drop for FuseStack {
    fn drop(&mut self) {
        let within = Duration::from_secs(30);
        if self.mounted {
            let out = run_within(Command::new("umount").arg(&self.mount_dir), within);
            if !out.as_ref().is_ok_and(|o| o.status.success()) {
                eprintln!("fuse stack: umount {}: {out:?}", self.mount_dir.display());
            }
        }
        if let Some(dev) = &self.loopdev {
            let out = run_within(Command::new("losetup").args(["-d", dev]), within);
            if !out.as_ref().is_ok_and(|o| o.status.success()) {
                eprintln!("fuse stack: losetup -d {dev}: {out:?}");
            }
        }
        let _ = run_within(Command::new("fusermount").arg("-u").arg(&self.fuse_dir), within);
        // rbd-fuse exits by itself after fusermount -u; make sure, by pid.
        let _ = self.fuse.kill();
        let _ = self.fuse.wait();
    }
}

#[test]
fn d_e_h_fuse_status_and_timings() {
    let _shared = MONITOR.read().unwrap();
    let (pool, b) = pool_and_builder();
    let spec = format!("{pool}/img");
    let started = Instant::now();
    b.run_ok("rbd", &["create", "--size", &format!("{IMAGE_BYTES}B"), "--image-feature", "layering,exclusive-lock", &spec]);
    let mut stack = FuseStack::start(&b, &pool, "img");
    let names: Vec<String> = std::fs::read_dir(&stack.fuse_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    println!("FACT rbd-fuse -p pool -r img exposes: {names:?}");
    assert_eq!(names, ["img"]);
    let file = stack.fuse_dir.join("img");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), IMAGE_BYTES);
    stack.loop_and_mount(&file);
    println!("FACT create image + rbd-fuse + losetup + mkfs + mount: {:?}", started.elapsed());
    std::fs::write(stack.mount_dir.join("hello"), "world").unwrap();
    let out = run_bounded(Command::new("sync").arg("-f").arg(stack.mount_dir.join("hello")), ceph::COMMAND_WITHIN);
    assert!(out.status.success());

    let status = b.run_ok("rbd", &["status", "--format", "json", &spec]);
    println!("FACT rbd status --format json, rbd-fuse open: {}", status.trim());
    let status = json(&status);
    let watchers = status["watchers"].as_array().unwrap();
    assert_eq!(watchers.len(), 1);
    assert!(watchers[0]["address"].as_str().unwrap().starts_with("127.0.0.1:0/"));
    assert!(watchers[0]["client"].is_u64() && watchers[0]["cookie"].is_u64());
    // After a write, the exclusive-lock feature's own lock shows in lock ls.
    let ls = b.run_ok("rbd", &["lock", "ls", "--format", "json", &spec]);
    println!("FACT rbd lock ls --format json, rbd-fuse writing: {}", ls.trim());
    assert!(json(&ls)[0]["id"].as_str().unwrap().starts_with("auto "));

    let teardown = Instant::now();
    drop(stack);
    println!("FACT teardown umount + losetup -d + fusermount -u: {:?}", teardown.elapsed());
    let status = b.run_ok("rbd", &["status", "--format", "json", &spec]);
    println!("FACT rbd status --format json, closed: {}", status.trim());
    assert_eq!(json(&status), serde_json::json!({"watchers": []}));
}

#[test]
fn f_blocklist_as_builder() {
    let _shared = MONITOR.read().unwrap();
    let (pool, b) = pool_and_builder();
    let spec = format!("{pool}/img");
    b.run_ok("rbd", &["create", "--size", &format!("{IMAGE_BYTES}B"), "--image-feature", "layering,exclusive-lock", &spec]);
    // No loop device or mount over this one: I/O through a blocklisted
    // rbd-fuse can hang in the fuse request, and so would their teardown.
    let stack = FuseStack::start(&b, &pool, "img");
    let status = json(&b.run_ok("rbd", &["status", "--format", "json", &spec]));
    let addr = status["watchers"][0]["address"].as_str().unwrap().to_string();

    let (out, took) = b.run("ceph", &["osd", "blocklist", "add", &addr]);
    show("ceph osd blocklist add <addr> as builder", &out, took);
    assert!(out.status.success());
    assert!(stderr(&out).contains(&format!("blocklisting {addr} until")), "{}", stderr(&out));
    let (out, took) = b.run("ceph", &["osd", "blocklist", "ls"]);
    show("ceph osd blocklist ls as builder", &out, took);
    assert!(stdout(&out).contains(&addr));

    // The blocklisted client's watch goes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = json(&b.run_ok("rbd", &["status", "--format", "json", &spec]));
        if status["watchers"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the blocklisted watcher stayed: {status}");
        tokio_free_pause();
    }
    let (out, took) = b.run("ceph", &["osd", "blocklist", "rm", &addr]);
    show("ceph osd blocklist rm <addr> as builder", &out, took);
    // profile rbd may add to the blocklist but not remove from it.
    assert_eq!(out.status.code(), Some(13));
    cluster().run_ok("ceph", &["osd", "blocklist", "rm", &addr]);
    drop(stack);
}

#[allow(clippy::disallowed_methods)]
fn tokio_free_pause() {
    std::thread::sleep(Duration::from_millis(100));
}

#[test]
fn g_kernel_mappers() {
    let _shared = MONITOR.read().unwrap();
    let (pool, b) = pool_and_builder();
    let spec = format!("{pool}/img");
    b.run_ok("rbd", &["create", "--size", &format!("{IMAGE_BYTES}B"), "--image-feature", "layering,exclusive-lock", &spec]);
    let (out, took) = b.run("rbd", &["device", "map", &spec]);
    show("rbd device map", &out, took);
    assert_ne!(out.status.code(), Some(0));
    let (out, took) = b.run("rbd-nbd", &["map", &spec]);
    show("rbd-nbd map", &out, took);
    assert_ne!(out.status.code(), Some(0));
    let (out, took) = b.run("rbd", &["device", "map", "-t", "nbd", &spec]);
    show("rbd device map -t nbd", &out, took);
    assert_ne!(out.status.code(), Some(0));
    let (out, took) = b.run("rbd", &["device", "list", "--format", "json"]);
    show("rbd device list --format json", &out, took);
}

#[test]
fn monitor_down() {
    let _exclusive = MONITOR.write().unwrap();
    let (pool, b) = pool_and_builder();
    let spec = format!("{pool}/img");
    b.run_ok("rbd", &["create", "--size", &format!("{IMAGE_BYTES}B"), "--image-feature", "layering,exclusive-lock", &spec]);
    cluster().stop_monitor();
    let (out, took) = b.run("rbd", &["--client_mount_timeout", "3", "info", "--format", "json", &spec]);
    show("rbd info, monitor killed, --client_mount_timeout 3", &out, took);
    assert_eq!(out.status.code(), Some(110));

    // rbd-fuse with the monitor down: does it exit, and when?
    let fuse_dir = b.dir.path().join("fuse-down");
    std::fs::create_dir_all(&fuse_dir).unwrap();
    let mut cmd = Command::new("rbd-fuse");
    cmd.arg("-c")
        .arg(b.conf())
        .args(["--id", &b.id, "--keyring"])
        .arg(b.keyring())
        .args(["--client_mount_timeout", "3", "-p", &pool, "-r", "img"])
        .arg(&fuse_dir)
        .arg("-f");
    let out = run_within(cmd.stdin(Stdio::null()), Duration::from_secs(20));
    println!("FACT rbd-fuse, monitor down, --client_mount_timeout 3: {out:?}");
    let _ = run_within(Command::new("fusermount").arg("-u").arg(&fuse_dir), Duration::from_secs(10));
    cluster().start_monitor();
    let out = out.expect("rbd-fuse kept running with the monitor down");
    assert_ne!(out.status.code(), Some(0));
}
