//! The volume manager end to end on real loop devices and real filesystems:
//! format only blank devices, mount idempotently, never reformat data, refuse
//! what it must, grow, trim, and unmount cleanly or say exactly why not.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::task::{FsType, VolumeMount, VolumeSource};
use machine_agent::volume::manager::{prepare_mount, release_mount, PreparedMount, VolumeError, VolumeSettings};
use std::io::Write;
use std::path::Path;
use std::time::Duration;
use support::loopdev::LoopDevice;

const DEVICE_BYTES: u64 = 320 << 20;

fn settings() -> VolumeSettings {
    VolumeSettings {
        sys_root: "/".into(),
        device_wait: Duration::from_secs(5),
        unmount_timeout: Duration::from_secs(3),
        kill_holders: false,
        ephemeral_dir: None,
        ext4_bytes_per_inode: None,
        system_paths: machine_agent::volume::manager::default_system_paths(),
        // One file per (unique, temporary) mount path, cleared when mkfs finishes.
        intent_dir: std::env::temp_dir().join("machine-agent-volume-manager-intents"),
        // Each test's own 0700 temporary directory sits here.
        allowed_backing_dirs: vec![std::env::temp_dir()],
        rbd: machine_agent::volume::rbd::RbdSettings {
            mapper: Default::default(),
            owner_id: "volume-manager-test".into(),
            dir: std::env::temp_dir().join("machine-agent-volume-manager-rbd"),
            keep_snapshots: 2,
        },
    }
}

fn device_mount(dev: &Path, at: &Path, fs: FsType) -> VolumeMount {
    VolumeMount {
        mount_path: at.into(),
        source: VolumeSource::Device { path: dev.into(), ebs_volume_id: None },
        fs_type: fs,
        options: vec!["noatime".into()],
        skip_trim: false,
        cache_mode: Default::default(),
    }
}

/// Releases what a test prepared even when it panics first.
struct Prepared(Option<PreparedMount>);

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            support::cleanup_volumes_under(&p.mount_path);
            let _ = std::process::Command::new("umount").arg(&p.mount_path).output();
        }
    }
}

fn mount_options_of(path: &Path) -> String {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    table.lines().find(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap())).map(|l| l.split(' ').nth(5).unwrap().to_string()).unwrap_or_default()
}

fn is_mounted(path: &Path) -> bool {
    !mount_options_of(path).is_empty()
}

#[tokio::test]
async fn blank_devices_are_formatted_once_and_mounted_with_the_requested_options() {
    for fs in [FsType::Ext4, FsType::Xfs] {
        let lo = LoopDevice::new(DEVICE_BYTES);
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().canonicalize().unwrap().join("cache");
        let m = device_mount(&lo.path, &at, fs);
        let first = prepare_mount(&settings(), &m, true).await.unwrap();
        let guard = Prepared(Some(first.clone()));
        assert!(first.formatted, "{fs:?}: a blank device is formatted");
        assert_eq!(first.fs_type, fs.as_str());
        assert!(mount_options_of(&at).split(',').any(|o| o == "noatime"), "{fs:?}: {}", mount_options_of(&at));
        let uuid = lo.uuid();
        std::fs::write(at.join("layer"), b"cached bytes").unwrap();

        let second = prepare_mount(&settings(), &m, true).await.unwrap();
        assert!(!second.formatted, "{fs:?}: the second prepare is a no-op");
        assert_eq!(lo.uuid(), uuid);
        assert_eq!(std::fs::read(at.join("layer")).unwrap(), b"cached bytes");

        let report = release_mount(&settings(), &first).await;
        assert!(report.unmounted, "{report:?}");
        assert!(!is_mounted(&at));
        drop(guard);
    }
}

#[tokio::test]
async fn a_device_with_data_is_mounted_as_it_is_and_never_reformatted() {
    let lo = LoopDevice::new(DEVICE_BYTES);
    lo.mkfs("xfs", &[]);
    let uuid = lo.uuid();
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().canonicalize().unwrap().join("cache");
    {
        let seed = support::loopdev::mount(&lo.path, &at, "xfs");
        let mut f = std::fs::File::create(seed.path.join("blob")).unwrap();
        for i in 0..4096u32 {
            f.write_all(&i.to_le_bytes().repeat(64)).unwrap();
        }
        f.sync_all().unwrap();
    }
    // The task asks for ext4; the device holds xfs with data: mounted as xfs, untouched.
    let prepared = prepare_mount(&settings(), &device_mount(&lo.path, &at, FsType::Ext4), true).await;
    let prepared = prepared.unwrap();
    let _guard = Prepared(Some(prepared.clone()));
    assert!(!prepared.formatted);
    assert_eq!(prepared.fs_type, "xfs");
    assert_eq!(lo.uuid(), uuid, "superblock UUID unchanged: mkfs never ran");
    let blob = std::fs::read(at.join("blob")).unwrap();
    assert_eq!(blob.len(), 4096 * 256);
    assert!(blob.chunks(256).enumerate().all(|(i, c)| c == u32::try_from(i).unwrap().to_le_bytes().repeat(64).as_slice()), "data intact");
    assert!(release_mount(&settings(), &prepared).await.unmounted);
}

#[tokio::test]
async fn partition_tables_luks_and_swap_are_refused_and_nothing_is_written() {
    for what in ["swap", "gpt", "luks"] {
        let lo = LoopDevice::new(DEVICE_BYTES);
        let dev = lo.path.to_str().unwrap();
        match what {
            "swap" => run("mkswap", &[dev], None),
            "gpt" => run("sfdisk", &["--quiet", dev], Some("label: gpt\n,,L\n")),
            _ => {
                let key = lo.backing.with_extension("key");
                std::fs::write(&key, "test passphrase").unwrap();
                let key = key.to_str().unwrap().to_string();
                run(
                    "cryptsetup",
                    &["luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", &key, dev],
                    None,
                );
            }
        }
        let head_before = read_head(&lo.path);
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().canonicalize().unwrap().join("cache");
        let err = prepare_mount(&settings(), &device_mount(&lo.path, &at, FsType::Ext4), true).await.unwrap_err();
        assert!(matches!(err, VolumeError::Refused { .. }), "{what}: {err}");
        assert!(err.to_string().contains(&lo.path.display().to_string()), "{what}: the error names the device: {err}");
        assert_eq!(read_head(&lo.path), head_before, "{what}: nothing written");
        assert!(!is_mounted(&at));
    }
}

fn read_head(dev: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; 1 << 20];
    std::fs::File::open(dev).unwrap().read_exact(&mut buf).unwrap();
    buf
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) {
    use std::process::{Command, Stdio};
    let mut child = Command::new(cmd).args(args).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn a_device_that_never_appears_times_out_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("disk-never-attached");
    let mut s = settings();
    s.device_wait = Duration::from_millis(500);
    let err = prepare_mount(&s, &device_mount(&missing, &dir.path().join("cache"), FsType::Ext4), true).await.unwrap_err();
    assert!(err.to_string().contains("disk-never-attached"), "{err}");
}

#[tokio::test]
async fn a_device_that_appears_late_is_waited_for() {
    let lo = LoopDevice::new(DEVICE_BYTES);
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("by-id-late");
    let at = dir.path().canonicalize().unwrap().join("cache");
    let (target, link2) = (lo.path.clone(), link.clone());
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        std::os::unix::fs::symlink(target, link2).unwrap();
    });
    let p = prepare_mount(&settings(), &device_mount(&link, &at, FsType::Ext4), true).await.unwrap();
    let _guard = Prepared(Some(p.clone()));
    assert_eq!(p.device, lo.path, "the symlink resolves to the real node");
    assert!(release_mount(&settings(), &p).await.unmounted);
}

#[tokio::test]
async fn the_systems_own_devices_are_refused() {
    // A loop device mounted at a path the test declares a system path stands in
    // for the root disk: the real one is never touched by tests.
    let lo = LoopDevice::new(DEVICE_BYTES);
    lo.mkfs("ext4", &[]);
    let dir = tempfile::tempdir().unwrap();
    let system = support::loopdev::mount(&lo.path, &dir.path().join("fake-root"), "ext4");
    let mut s = settings();
    s.system_paths.push(system.path.clone());
    let err = prepare_mount(&s, &device_mount(&lo.path, &dir.path().join("cache"), FsType::Ext4), true).await.unwrap_err();
    assert!(matches!(err, VolumeError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("fake-root"), "{err}");
}

#[tokio::test]
async fn file_backed_volume_is_created_attached_and_detached_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let backing = root.join("cache.img");
    let at = root.join("cache");
    let m = VolumeMount {
        mount_path: at.clone(),
        source: VolumeSource::File { path: backing.clone(), size_bytes: 600 << 20 },
        fs_type: FsType::Ext4,
        options: vec![],
        skip_trim: true,
        cache_mode: Default::default(),
    };
    let first = prepare_mount(&settings(), &m, true).await.unwrap();
    let guard = Prepared(Some(first.clone()));
    assert!(first.formatted);
    std::fs::write(at.join("layer"), b"survives a drain").unwrap();
    let report = release_mount(&settings(), &first).await;
    assert!(report.unmounted && report.errors.is_empty(), "{report:?}");
    assert!(!loop_backs(&backing), "no loop device left behind");

    let again = prepare_mount(&settings(), &m, true).await.unwrap();
    assert!(!again.formatted, "prepared again: the same filesystem");
    assert_eq!(std::fs::read(at.join("layer")).unwrap(), b"survives a drain");
    assert!(release_mount(&settings(), &again).await.unmounted);
    assert!(!loop_backs(&backing));
    drop(guard);
}

fn loop_backs(file: &Path) -> bool {
    std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .any(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).is_ok_and(|b| Path::new(b.trim()) == file))
}

#[tokio::test]
async fn a_grown_device_grows_the_filesystem_online_with_data_intact() {
    // xfs: ext4's online resize needs CAP_SYS_RESOURCE, which this sandbox
    // withholds (resize2fs: "Permission denied"); production agents run with it.
    let lo = LoopDevice::new(DEVICE_BYTES);
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().canonicalize().unwrap().join("cache");
    let m = device_mount(&lo.path, &at, FsType::Xfs);
    let p = prepare_mount(&settings(), &m, true).await.unwrap();
    let _guard = Prepared(Some(p.clone()));
    std::fs::write(at.join("layer"), b"before the grow").unwrap();
    let before = machine_agent::volume::stats::read_fs_stats(&at).unwrap().total_bytes;
    lo.resize(DEVICE_BYTES * 2);
    let again = prepare_mount(&settings(), &m, true).await.unwrap();
    assert!(again.grown, "the filesystem was grown");
    let after = machine_agent::volume::stats::read_fs_stats(&at).unwrap().total_bytes;
    assert!(after > before + DEVICE_BYTES / 2, "{before} -> {after}");
    assert_eq!(std::fs::read(at.join("layer")).unwrap(), b"before the grow");
    assert!(release_mount(&settings(), &again).await.unmounted);
}

#[tokio::test]
async fn release_trims_unmounts_children_first_and_names_holders() {
    let lo = LoopDevice::new(DEVICE_BYTES);
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().canonicalize().unwrap().join("cache");
    let p = prepare_mount(&settings(), &device_mount(&lo.path, &at, FsType::Ext4), true).await.unwrap();
    let _guard = Prepared(Some(p.clone()));
    // Deleted files leave blocks to trim.
    std::fs::write(at.join("big"), vec![7u8; 32 << 20]).unwrap();
    nix::unistd::sync();
    std::fs::remove_file(at.join("big")).unwrap();
    // An overlay beneath, as the engine leaves them.
    for d in ["lower", "upper", "work", "merged"] {
        std::fs::create_dir_all(at.join(d)).unwrap();
    }
    let opts = format!("lowerdir={0}/lower,upperdir={0}/upper,workdir={0}/work", at.display());
    run("mount", &["-t", "overlay", "overlay", "-o", &opts, at.join("merged").to_str().unwrap()], None);
    // A process holding the filesystem busy.
    let mut holder = std::process::Command::new("sleep").arg("30").current_dir(&at).spawn().unwrap();

    let report = release_mount(&settings(), &p).await;
    assert!(!report.unmounted, "a busy mount is not unmounted lazily");
    let text = report.errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    assert!(text.contains(&holder.id().to_string()) && text.contains("sleep"), "the holder is named: {text}");
    assert!(report.trimmed_bytes.unwrap_or(0) > 0, "fstrim reported trimmed bytes: {report:?}");
    assert!(!is_mounted(&at.join("merged")), "the overlay beneath was unmounted first");
    assert!(is_mounted(&at));

    let mut s = settings();
    s.kill_holders = true;
    let report = release_mount(&s, &p).await;
    assert!(report.unmounted, "{report:?}");
    assert!(holder.wait().unwrap().code().is_none(), "the holder was killed");
}

// === through the agent ===

use support::{agent, base_config, http_get, write_task_file};

#[tokio::test]
async fn a_refused_device_leaves_the_agent_degraded_and_the_engine_never_starts() {
    let lo = LoopDevice::new(DEVICE_BYTES);
    run("mkswap", &[lo.path.to_str().unwrap()], None);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, base_config(dir.path())).unwrap();
    let task = write_task_file(dir.path(), &dir.path().join("mnt"));
    let text = std::fs::read_to_string(&task).unwrap();
    let file_line = text.lines().find(|l| l.starts_with("file = ")).unwrap().to_string();
    std::fs::write(&task, text.replace(&file_line, &format!("device = {{ path = \"{}\" }}", lo.path.display()))).unwrap();

    let agent = agent(&config).standalone(&task).start();
    let base = agent.detail_endpoints().await;
    agent.wait_for_log("to=degraded").await;
    let (code, body) = http_get(&base, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("refusing") && body.contains("swap"), "{body}");
    assert!(agent.children().is_empty(), "no engine without a prepared volume");
    assert!(!agent.logs().contains("formatting blank device"));
}

#[tokio::test]
async fn an_agent_killed_with_its_volume_mounted_comes_back_without_formatting_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, base_config(dir.path())).unwrap();
    let task = write_task_file(dir.path(), &dir.path().join("mnt"));
    let cache = dir.path().canonicalize().unwrap().join("mnt/cache");

    let mut first = agent(&config).standalone(&task).start();
    first.wait_for_log("to=ready").await;
    std::fs::write(cache.join("layer"), b"must survive an agent crash").unwrap();
    let engine = first.children();
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).await;
    // The orphaned engine is the engine work's business; here it must not hold anything up.
    for pid in engine {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), nix::sys::signal::Signal::SIGKILL);
    }
    assert!(is_mounted(&cache), "the crash left the volume mounted");

    let second = agent(&config).standalone(&task).start();
    second.wait_for_log("to=ready").await;
    let logs = second.logs();
    assert!(logs.contains("already mounted"), "{logs}");
    assert!(!logs.contains("formatting blank device"), "no second format");
    assert_eq!(std::fs::read(cache.join("layer")).unwrap(), b"must survive an agent crash");
    first.keep_volumes(); // the second agent owns them now; its drop cleans up
    drop(first);
    drop(second);
}

#[tokio::test]
async fn the_executor_dir_is_bound_to_the_ephemeral_disk_and_released_with_the_volume() {
    let lo = LoopDevice::new(DEVICE_BYTES);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let at = root.join("cache");
    let mut s = settings();
    s.ephemeral_dir = Some(root.join("ephemeral"));
    let p = prepare_mount(&s, &device_mount(&lo.path, &at, FsType::Ext4), true).await.unwrap();
    let _guard = Prepared(Some(p.clone()));
    let executor = at.join(machine_agent::volume::manager::EXECUTOR_SUBDIR);
    assert_eq!(p.executor_bind.as_deref(), Some(executor.as_path()));
    std::fs::write(executor.join("scratch"), b"build step scratch").unwrap();
    assert_eq!(std::fs::read(root.join("ephemeral/buildkit-executor/scratch")).unwrap(), b"build step scratch", "scratch lands on the ephemeral disk");
    // Idempotent: a second prepare does not stack a second bind.
    prepare_mount(&s, &device_mount(&lo.path, &at, FsType::Ext4), true).await.unwrap();
    let binds = std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().filter(|l| l.split(' ').nth(4) == executor.to_str()).count();
    assert_eq!(binds, 1);
    let report = release_mount(&s, &p).await;
    assert!(report.unmounted, "{report:?}");
    assert!(!is_mounted(&executor) && !is_mounted(&at), "the bind beneath went first, then the volume");
}
