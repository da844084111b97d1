//! Cache modes on file-backed and device volumes, on real filesystems: a
//! primary file on xfs is committed by reflink at a clean drain and a clone
//! starts from that commit with the primary's cache (builds fully cached),
//! never changing the primary; clones and isolated volumes are destroyed at
//! release; an isolated device is discarded; where reflinks are unsupported
//! (ext4) a commit is skipped saying so and a clone is refused.
//!
//! The host directories are filesystems the test makes on its own loop
//! devices under its own temporary directory, undone on drop even on panic.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::task::{CacheMode, FsType, VolumeMount, VolumeSource};
use machine_agent::volume::file_modes;
use machine_agent::volume::manager::{abandon_mount, prepare_mount, release_mount, PreparedMount, VolumeSettings};
use nix::sys::signal::Signal;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::engine::{build_context, buildctl_build, wait_ready, World};
use support::loopdev::{LoopDevice, TestMount};

/// xfs needs at least 300 MiB; the volumes on it are sparse and share extents.
const HOST_BYTES: u64 = 3 << 30;
/// A volume the manager tests format (ext4: mkfs is quick on a loop device).
const VOLUME_BYTES: u64 = 256 << 20;
const XFS_VOLUME_BYTES: u64 = 320 << 20;
/// The end-to-end primary: room for buildkit's state and a few small builds.
const E2E_VOLUME_BYTES: u64 = 1 << 30;

// === fixtures ===

/// A filesystem of `fs` on the test's own loop device, mounted under the
/// test's own directory, with a 0700 `volumes` directory the agent may keep
/// backing files in. Drop detaches every loop device backed beneath it and
/// unmounts everything beneath it (the volumes first), then the host.
struct Host {
    _cleanup: CleanupUnder,
    _mount: TestMount,
    _lo: LoopDevice,
    /// The test's directory: the host mount and the volumes' mount points are beneath it.
    root: PathBuf,
    /// The allowed backing dir, on the host filesystem.
    volumes: PathBuf,
    _dir: tempfile::TempDir,
}

struct CleanupUnder(PathBuf);

impl Drop for CleanupUnder {
    fn drop(&mut self) {
        support::cleanup_volumes_under(&self.0);
    }
}

impl Host {
    fn new(fs: &str) -> Host {
        let dir = tempfile::Builder::new().prefix("machine-agent-cache-modes-").tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let lo = LoopDevice::new(HOST_BYTES);
        let extra: &[&str] = if fs == "xfs" { &["-m", "reflink=1"] } else { &[] };
        lo.mkfs(fs, extra);
        let mount = support::loopdev::mount(&lo.path, &root.join("host"), fs);
        let volumes = mount.path.join("volumes");
        std::fs::create_dir(&volumes).unwrap();
        std::fs::set_permissions(&volumes, std::fs::Permissions::from_mode(0o700)).unwrap();
        Host { _cleanup: CleanupUnder(root.clone()), _mount: mount, _lo: lo, root, volumes, _dir: dir }
    }

    fn settings(&self, owner: &str) -> VolumeSettings {
        support::volume_settings(&self.root, &self.volumes, owner, Default::default())
    }

    fn file_mount(&self, name: &str, mode: CacheMode) -> VolumeMount {
        self.file_mount_of(name, mode, FsType::Ext4)
    }

    fn file_mount_of(&self, name: &str, mode: CacheMode, fs_type: FsType) -> VolumeMount {
        // xfs needs at least 300 MiB.
        let size_bytes = if fs_type == FsType::Xfs { XFS_VOLUME_BYTES } else { VOLUME_BYTES };
        VolumeMount {
            mount_path: self.root.join("mnt").join(format!("{name}-{}", mode.as_str())),
            source: VolumeSource::File { path: self.volumes.join(name), size_bytes },
            fs_type,
            options: vec![],
            skip_trim: false,
            cache_mode: mode,
        }
    }
}

fn device_mount(dev: &Path, at: &Path, mode: CacheMode) -> VolumeMount {
    VolumeMount {
        mount_path: at.into(),
        source: VolumeSource::Device { path: dev.into(), ebs_volume_id: None },
        fs_type: FsType::Ext4,
        options: vec![],
        skip_trim: false,
        cache_mode: mode,
    }
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

fn xattr(path: &Path, name: &str) -> Option<String> {
    let file = std::fs::File::open(path).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    let mut buf = [0u8; 256];
    let n = machine_agent::sys::fgetxattr(std::os::fd::AsFd::as_fd(&file), &name, &mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn set_xattr(path: &Path, name: &str, value: &str) {
    let file = std::fs::File::open(path).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    machine_agent::sys::fsetxattr(std::os::fd::AsFd::as_fd(&file), &name, value.as_bytes()).unwrap();
}

/// The loop devices sysfs shows backed by `path`.
fn loops_backed_by(path: &Path) -> Vec<String> {
    let mut found = vec![];
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
            if Path::new(backing.trim().trim_end_matches(" (deleted)")) == path {
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found
}

fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
}

/// What blkid's low-level probe finds on `dev` ("" for nothing).
fn probe(dev: &Path) -> String {
    let out = Command::new("blkid").arg("-p").arg(dev).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn prepare_and_write(settings: &VolumeSettings, m: &VolumeMount, name: &str, bytes: &[u8]) -> PreparedMount {
    let prepared = prepare_mount(settings, m, true).await.unwrap_or_else(|e| panic!("prepare {}: {e}", m.mount_path.display()));
    std::fs::write(m.mount_path.join(name), bytes).unwrap();
    prepared
}

// === through the manager ===

#[tokio::test]
async fn a_primary_on_xfs_is_committed_and_a_clone_starts_from_the_commit_and_is_destroyed_leaving_the_primary_unchanged() {
    let host = Host::new("xfs");
    let settings = host.settings("builder-a");
    let primary = host.file_mount("cache.img", CacheMode::Primary);
    let VolumeSource::File { path: backing, .. } = primary.source.clone() else { unreachable!() };

    // No commit yet: a clone is refused, saying why.
    let err = prepare_mount(&host.settings("builder-b"), &host.file_mount("cache.img", CacheMode::Clone), true).await.unwrap_err();
    assert!(err.to_string().contains(&format!("no committed copy of {} to clone; a primary must drain cleanly first", backing.display())), "{err}");

    let prepared = prepare_and_write(&settings, &primary, "layer", b"primary data").await;
    let report = release_mount(&settings, &prepared).await;
    assert!(report.errors.is_empty() && report.unmounted, "{report:?}");
    let committed = PathBuf::from(format!("{}.committed", backing.display()));
    let commit = report.commit.expect("a primary file reports its commit");
    assert_eq!(commit.source, backing.display().to_string());
    assert_eq!(commit.copy, Ok(committed.display().to_string()));
    assert!(!Path::new(&format!("{}.committed.tmp", backing.display())).exists(), "no temporary left");
    assert_eq!(xattr(&committed, "trusted.machine-agent.backing-file").as_deref(), Some("1"), "the commit carries the agent's mark");
    assert_eq!(sha256(&committed), sha256(&backing), "the commit is a whole copy");
    let primary_sum = sha256(&backing);

    // The clone: another builder starts from the commit, writes, and is destroyed.
    let clone_settings = host.settings("builder-b");
    let clone_mount = host.file_mount("cache.img", CacheMode::Clone);
    let cloned = prepare_mount(&clone_settings, &clone_mount, true).await.unwrap();
    let clone_file = cloned.loop_attachment.as_ref().unwrap().backing.clone();
    assert_ne!(clone_file, backing, "a clone never attaches the primary's file");
    assert!(clone_file.display().to_string().starts_with(&format!("{}.clone.", backing.display())), "{}", clone_file.display());
    assert!(!cloned.formatted, "a clone holds the primary's filesystem");
    assert_eq!(std::fs::read(clone_mount.mount_path.join("layer")).unwrap(), b"primary data");
    assert_eq!(xattr(&clone_file, "trusted.machine-agent.disposable").as_deref(), Some("builder-b"));
    std::fs::write(clone_mount.mount_path.join("layer"), b"the clone's own data").unwrap();
    std::fs::write(clone_mount.mount_path.join("new"), vec![7u8; 4 << 20]).unwrap();

    // Prepared again (an agent restarted): the same clone, reused.
    let again = prepare_mount(&clone_settings, &clone_mount, true).await.unwrap();
    assert_eq!(again.loop_attachment, cloned.loop_attachment);

    let report = release_mount(&clone_settings, &cloned).await;
    assert!(report.errors.is_empty() && report.unmounted, "{report:?}");
    assert_eq!(report.commit, None, "a clone never commits");
    assert_eq!(report.destroyed, Some(clone_file.display().to_string()));
    assert!(!clone_file.exists(), "the clone's file is removed");
    assert_eq!(loops_backed_by(&clone_file), Vec::<String>::new());
    assert_eq!(sha256(&backing), primary_sum, "the primary's file never changes while a clone lives");
    assert_eq!(sha256(&committed), primary_sum, "nor does its commit");
}

#[tokio::test]
async fn an_xfs_clone_gets_its_own_uuid_and_mounts_beside_its_primary_and_an_abandoned_clone_is_destroyed() {
    let host = Host::new("xfs");
    let settings = host.settings("builder-a");
    let primary = host.file_mount_of("cache.img", CacheMode::Primary, FsType::Xfs);
    let prepared = prepare_and_write(&settings, &primary, "layer", b"primary data").await;
    let primary_uuid = prepared.fs_uuid.clone().unwrap();
    let report = release_mount(&settings, &prepared).await;
    assert!(report.commit.as_ref().is_some_and(|c| c.copy.is_ok()), "{report:?}");
    let again = prepare_mount(&settings, &primary, true).await.unwrap();
    assert_eq!(again.fs_uuid.as_deref(), Some(primary_uuid.as_str()));

    // The primary is mounted again on this machine: the clone's filesystem must not share its UUID.
    let clone_settings = host.settings("builder-b");
    let clone_mount = host.file_mount_of("cache.img", CacheMode::Clone, FsType::Xfs);
    let cloned = prepare_mount(&clone_settings, &clone_mount, true).await.unwrap_or_else(|e| panic!("clone beside its mounted primary: {e}"));
    assert_ne!(cloned.fs_uuid.as_deref(), Some(primary_uuid.as_str()), "the clone has a UUID of its own");
    assert_eq!(std::fs::read(clone_mount.mount_path.join("layer")).unwrap(), b"primary data");
    let clone_file = cloned.loop_attachment.as_ref().unwrap().backing.clone();

    // A drain that cuts the clone's task short: abandoned, never committed, and destroyed.
    let report = abandon_mount(&clone_settings, &clone_mount).await;
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.commit, None);
    assert_eq!(report.destroyed, Some(clone_file.display().to_string()));
    assert!(!clone_file.exists());
    assert_eq!(loops_backed_by(&clone_file), Vec::<String>::new());
    assert!(!is_mounted(&clone_mount.mount_path));
    assert!(is_mounted(&primary.mount_path), "the primary is left alone");
    let report = release_mount(&settings, &again).await;
    assert!(report.errors.is_empty(), "{report:?}");
}

#[tokio::test]
async fn on_ext4_a_primary_drains_cleanly_without_a_commit_and_a_clone_is_refused_naming_the_filesystem() {
    let host = Host::new("ext4");
    let settings = host.settings("builder-a");
    let primary = host.file_mount("cache.img", CacheMode::Primary);
    let VolumeSource::File { path: backing, .. } = primary.source.clone() else { unreachable!() };
    let prepared = prepare_and_write(&settings, &primary, "layer", b"data").await;
    let report = release_mount(&settings, &prepared).await;
    assert!(report.errors.is_empty() && report.unmounted, "a missing commit is no release error: {report:?}");
    let expected = format!("commit not supported here: {} is on ext4, which has no reflinks", host.volumes.display());
    assert_eq!(report.commit.unwrap().copy, Err(expected));
    let committed = PathBuf::from(format!("{}.committed", backing.display()));
    assert!(!committed.exists());
    assert!(!Path::new(&format!("{}.committed.tmp", backing.display())).exists(), "no temporary left");

    // A committed copy put there by hand (marked as the agent's): the clone still cannot be made on ext4.
    std::fs::copy(&backing, &committed).unwrap();
    set_xattr(&committed, "trusted.machine-agent.backing-file", "1");
    let err = prepare_mount(&host.settings("builder-b"), &host.file_mount("cache.img", CacheMode::Clone), true).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&format!("cannot clone {} here: {} is on ext4, which has no reflinks", backing.display(), host.volumes.display())), "{text}");
    let leftovers: Vec<_> =
        std::fs::read_dir(&host.volumes).unwrap().flatten().map(|e| e.file_name()).filter(|n| n.to_string_lossy().contains(".clone.")).collect();
    assert!(leftovers.is_empty(), "the half-made clone is removed: {leftovers:?}");
}

#[tokio::test]
async fn an_isolated_file_is_created_blank_and_removed_at_release_and_an_existing_file_is_refused_unchanged() {
    let host = Host::new("xfs");
    let settings = host.settings("builder-a");
    let isolated = host.file_mount("scratch.img", CacheMode::Isolated);
    let VolumeSource::File { path: file, .. } = isolated.source.clone() else { unreachable!() };
    let prepared = prepare_and_write(&settings, &isolated, "x", b"scratch").await;
    assert!(prepared.formatted, "a new isolated file is formatted");
    assert_eq!(xattr(&file, "trusted.machine-agent.disposable").as_deref(), Some("builder-a"));
    let report = release_mount(&settings, &prepared).await;
    assert!(report.errors.is_empty() && report.unmounted, "{report:?}");
    assert_eq!(report.commit, None);
    assert_eq!(report.destroyed, Some(file.display().to_string()));
    assert!(!file.exists(), "the isolated file is removed");
    assert_eq!(loops_backed_by(&file), Vec::<String>::new());

    // An agent that died after the unmount and detach left its isolated file (ours, disposable):
    // the next prepare empties it, so the volume starts blank again.
    let left = prepare_and_write(&settings, &isolated, "old", b"from the dead agent").await;
    assert!(Command::new("umount").arg(&isolated.mount_path).status().unwrap().success());
    assert!(Command::new("losetup").arg("-d").arg(&left.device).status().unwrap().success());
    support::eventually("the loop device to detach", Duration::from_secs(10), || loops_backed_by(&file).is_empty()).await;
    let again = prepare_mount(&settings, &isolated, true).await.unwrap();
    assert!(again.formatted, "a left-over isolated file is blank again");
    assert!(!isolated.mount_path.join("old").exists());
    assert_eq!(release_mount(&settings, &again).await.destroyed, Some(file.display().to_string()));

    // A primary's backing file (holding a filesystem) named as an isolated volume: refused, unchanged.
    let primary = host.file_mount("cache.img", CacheMode::Primary);
    let VolumeSource::File { path: backing, .. } = primary.source.clone() else { unreachable!() };
    let p = prepare_and_write(&settings, &primary, "layer", b"data").await;
    assert!(release_mount(&settings, &p).await.errors.is_empty());
    let before = sha256(&backing);
    let err = prepare_mount(&settings, &host.file_mount("cache.img", CacheMode::Isolated), true).await.unwrap_err();
    assert!(err.to_string().contains("an isolated volume must be a new file"), "{err}");
    assert_eq!(sha256(&backing), before, "the refused file is unchanged");
    assert_eq!(loops_backed_by(&backing), Vec::<String>::new());
}

#[tokio::test]
async fn an_isolated_device_is_formatted_then_discarded_at_release_and_one_holding_a_filesystem_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let _cleanup = CleanupUnder(root.clone());
    let host = Host::new("xfs");
    let settings = host.settings("builder-a");
    let lo = LoopDevice::new(VOLUME_BYTES);
    let at = root.join("isolated");
    let prepared = prepare_and_write(&settings, &device_mount(&lo.path, &at, CacheMode::Isolated), "x", &vec![9u8; 1 << 20]).await;
    assert!(prepared.formatted);
    let report = release_mount(&settings, &prepared).await;
    assert!(report.errors.is_empty() && report.unmounted, "{report:?}");
    assert_eq!(report.destroyed, Some(lo.path.display().to_string()));
    assert!(!is_mounted(&at));
    assert_eq!(probe(&lo.path), "", "blkid finds nothing on the discarded device");
    let head = std::fs::read(&lo.path).map(|b| b[..1 << 20].to_vec()).unwrap();
    assert!(head.iter().all(|&b| b == 0), "the first MiB reads back as zeros");
    assert!(lo.path.exists(), "a device is never removed");

    // A primary device reports that it has no commit.
    let primary = prepare_mount(&settings, &device_mount(&lo.path, &root.join("primary"), CacheMode::Primary), true).await.unwrap();
    let report = release_mount(&settings, &primary).await;
    assert!(report.errors.is_empty(), "{report:?}");
    let commit = report.commit.unwrap();
    assert_eq!(commit.source, lo.path.display().to_string());
    assert!(commit.copy.unwrap_err().starts_with("commit not supported here: a block device has no snapshots"));
    let uuid = lo.uuid();
    assert!(!uuid.is_empty());

    // Now it holds a filesystem: an isolated task is refused, the filesystem untouched.
    let err = prepare_mount(&settings, &device_mount(&lo.path, &root.join("again"), CacheMode::Isolated), true).await.unwrap_err();
    assert!(err.to_string().contains("an isolated volume must start blank"), "{err}");
    assert_eq!(lo.uuid(), uuid);
}

// === the real agent and buildkitd ===

/// Points `world` at the host's volumes dir: the task's file there, in `mode`, and the agent's owner id.
fn use_host_file(world: &World, host: &Host, owner: &str, mode: CacheMode) -> PathBuf {
    let backing = host.volumes.join("project.img");
    let task = std::fs::read_to_string(&world.task).unwrap();
    let file_line = task.lines().find(|l| l.starts_with("file = ")).unwrap().to_string();
    let line = format!("file = {{ path = \"{}\", size_bytes = {E2E_VOLUME_BYTES} }}\ncache_mode = \"{}\"", backing.display(), mode.as_str());
    std::fs::write(&world.task, task.replace(&file_line, &line)).unwrap();
    let config = std::fs::read_to_string(&world.config).unwrap();
    let config =
        config.replace(&format!("allowed_backing_dirs = [\"{}\"]", world.root.display()), &format!("allowed_backing_dirs = [\"{}\"]", host.volumes.display()));
    std::fs::write(&world.config, config.replace("[volume]\n", &format!("[volume]\nowner_id = \"{owner}\"\n"))).unwrap();
    backing
}

async fn drain(agent: &mut support::AgentProcess) {
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(90)).await;
    assert!(status.success(), "drain failed: {status}\n{}", agent.logs());
}

#[tokio::test]
async fn a_clone_of_a_committed_primary_builds_fully_cached_and_leaves_the_primary_unchanged() {
    support::trace_init();
    let host = Host::new("xfs");
    let first = World::new();
    let backing = use_host_file(&first, &host, "builder-a", CacheMode::Primary);
    let mut agent = first.start();
    wait_ready(&agent).await;
    let ctx = build_context(&host.root, &format!("echo {} > /unique.txt", support::engine::rand_suffix()), 64 << 10);
    let out = buildctl_build(&first.buildctl_tls_args(true), &ctx, &first.root.join("out"));
    assert!(out.status.success(), "build on the primary failed: {}", String::from_utf8_lossy(&out.stderr));
    drain(&mut agent).await;
    assert!(agent.logs().contains("primary committed (reflink)"), "{}", agent.logs());
    let committed = PathBuf::from(format!("{}.committed", backing.display()));
    assert!(committed.exists(), "the clean drain committed the primary");
    let primary_sum = sha256(&backing);

    let second = World::new();
    use_host_file(&second, &host, "builder-b", CacheMode::Clone);
    let mut clone_agent = second.start();
    wait_ready(&clone_agent).await;
    assert!(!clone_agent.logs().contains("formatting blank device"), "a clone holds the primary's filesystem");
    let out = buildctl_build(&second.buildctl_tls_args(true), &ctx, &second.root.join("out"));
    let progress = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "the cached build on the clone failed: {progress}");
    // Every step of the Dockerfile (`#N [i/3] ...`) is answered from the cache (`#N CACHED`).
    let steps: Vec<&str> = progress.lines().filter(|l| l.contains("/3] ")).filter_map(|l| l.split_whitespace().next()).collect();
    assert!(steps.len() >= 3, "the build's steps in the progress:\n{progress}");
    for step in steps {
        assert!(progress.lines().any(|l| l == format!("{step} CACHED")), "step {step} is not CACHED on the clone:\n{progress}");
    }
    let new_ctx = build_context(&host.root, "echo new > /new.txt", 64 << 10);
    let out = buildctl_build(&second.buildctl_tls_args(true), &new_ctx, &second.root.join("out-new"));
    assert!(out.status.success(), "a new build on the clone failed: {}", String::from_utf8_lossy(&out.stderr));
    drain(&mut clone_agent).await;

    let logs = clone_agent.logs();
    assert!(logs.contains("removed the disposable volume's file"), "{logs}");
    let leftovers: Vec<_> = std::fs::read_dir(&host.volumes).unwrap().flatten().map(|e| e.path()).filter(|p| p.to_string_lossy().contains(".clone.")).collect();
    assert!(leftovers.is_empty(), "the clone is removed: {leftovers:?}");
    let clone_file = file_modes::clone_path(&backing, &file_modes::owner_tag("builder-b").unwrap());
    for path in [backing.clone(), committed.clone(), clone_file] {
        assert_eq!(loops_backed_by(&path), Vec::<String>::new(), "no loop device left on {}", path.display());
    }
    assert_eq!(sha256(&backing), primary_sum, "the primary's file is unchanged by its clone's life");
}

#[tokio::test]
async fn an_isolated_file_serves_a_build_and_is_gone_after_the_drain() {
    support::trace_init();
    let host = Host::new("xfs");
    let world = World::new();
    let file = use_host_file(&world, &host, "builder-a", CacheMode::Isolated);
    let mut agent = world.start();
    wait_ready(&agent).await;
    assert!(agent.logs().contains("created the isolated volume's file"), "{}", agent.logs());
    let ctx = build_context(&host.root, "echo isolated > /out.txt", 64 << 10);
    let out = buildctl_build(&world.buildctl_tls_args(true), &ctx, &world.root.join("out"));
    assert!(out.status.success(), "build on the isolated volume failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(world.root.join("out/out.txt")).unwrap(), "isolated\n");
    drain(&mut agent).await;
    assert!(agent.logs().contains("removed the disposable volume's file"), "{}", agent.logs());
    assert!(!file.exists(), "the isolated file is removed at drain");
    assert_eq!(loops_backed_by(&file), Vec::<String>::new(), "no loop device left on it");
    assert!(!is_mounted(&world.cache()));
}

#[tokio::test]
async fn an_unclean_release_skips_the_commit_saying_why_and_a_task_cannot_name_a_committed_copy() {
    let host = Host::new("xfs");
    let settings = host.settings("builder-a");
    let primary = host.file_mount("cache.img", CacheMode::Primary);
    let VolumeSource::File { path: backing, .. } = primary.source.clone() else { unreachable!() };
    let prepared = prepare_and_write(&settings, &primary, "layer", b"data").await;
    // A file held open keeps the mount busy past the unmount timeout.
    let held = std::fs::File::open(primary.mount_path.join("layer")).unwrap();
    let report = release_mount(&settings, &prepared).await;
    assert!(!report.unmounted, "{report:?}");
    assert_eq!(report.commit.unwrap().copy, Err("commit skipped: the volume is still mounted".to_string()));
    let committed = PathBuf::from(format!("{}.committed", backing.display()));
    assert!(!committed.exists());
    drop(held);
    let report = release_mount(&settings, &prepared).await;
    assert_eq!(report.commit.unwrap().copy, Ok(committed.display().to_string()), "released cleanly, it commits");

    // The committed copy carries the agent's mark, but no task may mount it.
    let err = prepare_mount(&settings, &host.file_mount("cache.img.committed", CacheMode::Primary), true).await.unwrap_err();
    assert!(err.to_string().contains("the name is one the agent gives a committed copy or a clone"), "{err}");
    assert_eq!(loops_backed_by(&committed), Vec::<String>::new());
}
