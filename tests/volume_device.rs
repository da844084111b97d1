//! Finding the cache volume's device and attaching file-backed volumes, against
//! real loop devices: symlinks resolve to the real node, a device that appears
//! mid-wait is found, one that never does times out by name, and attaching a
//! backing file is sparse, idempotent, grows the device and detaches cleanly.
//! Every test uses its own temporary directory and detaches what it attached,
//! even when it panics.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::volume::backing::BackingError;
use machine_agent::volume::device::{attach_file, detach_file, resolve_device, wait_for_device, DeviceError, LoopAttachment};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::loopdev::LoopDevice;

const DEVICE_BYTES: u64 = 64 << 20;
const MIB: u64 = 1 << 20;

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("machine-agent-device-").tempdir().unwrap()
}

/// The file sysfs shows behind a loop device, if it is attached.
fn sysfs_backing(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?;
    let text = std::fs::read_to_string(Path::new("/sys/block").join(name).join("loop/backing_file")).ok()?;
    Some(PathBuf::from(text.trim_end_matches('\n')))
}

/// The size the kernel gives a block device, in bytes.
fn device_bytes(device: &Path) -> u64 {
    let name = device.file_name().unwrap();
    let sectors = std::fs::read_to_string(Path::new("/sys/block").join(name).join("size")).unwrap();
    sectors.trim().parse::<u64>().unwrap() * 512
}

/// The devices `losetup -j` lists for `backing`; one line each.
fn losetup_lines_for(backing: &Path) -> Vec<String> {
    let out = Command::new("losetup").arg("-j").arg(backing).output().unwrap();
    assert!(out.status.success(), "losetup -j {}: {}", backing.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

/// Detaches an attachment on drop if the test has not, so a panic leaks no device.
/// Declared after the test's TempDir, so it drops first and the file is still there.
struct Detach(LoopAttachment);

impl Drop for Detach {
    fn drop(&mut self) {
        if sysfs_backing(&self.0.device).as_deref() != Some(self.0.backing.as_path()) {
            return; // detached by the test, or no longer ours
        }
        match Command::new("losetup").arg("-d").arg(&self.0.device).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("losetup -d {} failed: {}", self.0.device.display(), String::from_utf8_lossy(&out.stderr)),
            Err(e) => eprintln!("cannot run losetup -d {}: {e}", self.0.device.display()),
        }
    }
}

async fn attach(backing: &Path, size_bytes: u64) -> Detach {
    Detach(attach_file(&[std::env::temp_dir()], backing, size_bytes).await.unwrap().attachment)
}

// === resolving ===

#[test]
fn a_symlink_chain_resolves_to_the_real_loop_node() {
    let lo = LoopDevice::new(DEVICE_BYTES);
    let dir = temp_dir();
    // Like udev: an absolute link, and a relative link onto it.
    let by_path = dir.path().join("by-path-link");
    std::os::unix::fs::symlink(&lo.path, &by_path).unwrap();
    std::fs::create_dir(dir.path().join("by-id")).unwrap();
    let by_id = dir.path().join("by-id/nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0");
    std::os::unix::fs::symlink("../by-path-link", &by_id).unwrap();
    for link in [&by_path, &by_id] {
        assert_eq!(resolve_device(Path::new("/"), link, None).unwrap(), Some(lo.path.clone()), "{}", link.display());
    }
    assert_eq!(resolve_device(Path::new("/"), &lo.path, None).unwrap(), Some(lo.path.clone()));
}

#[test]
fn a_regular_file_is_an_error_naming_it() {
    let dir = temp_dir();
    let file = dir.path().join("not-a-disk.img");
    std::fs::write(&file, b"").unwrap();
    let link = dir.path().join("link-to-file");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    for path in [&file, &link] {
        let err = resolve_device(Path::new("/"), path, None).unwrap_err();
        assert!(matches!(err, DeviceError::NotBlockDevice { kind: "a regular file", .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }
}

#[test]
fn a_missing_path_or_dangling_link_without_an_ebs_id_is_none() {
    let dir = temp_dir();
    let dangling = dir.path().join("dangling");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    assert_eq!(resolve_device(Path::new("/"), &dir.path().join("sdf"), None).unwrap(), None);
    assert_eq!(resolve_device(Path::new("/"), &dangling, None).unwrap(), None);
}

/// A fake root whose sysfs shows `nvme1n1` as the given EBS volume, and whose
/// `/dev/nvme1n1` is a link to a real loop device (or absent).
fn fake_nitro_root(serial: &str, node: Option<&Path>) -> tempfile::TempDir {
    let root = temp_dir();
    let controller = root.path().join("sys/block/nvme1n1/device");
    std::fs::create_dir_all(&controller).unwrap();
    std::fs::write(controller.join("serial"), format!("{serial:<20}\n")).unwrap();
    std::fs::write(controller.join("model"), "Amazon Elastic Block Store              \n").unwrap();
    std::fs::create_dir_all(root.path().join("dev")).unwrap();
    if let Some(node) = node {
        std::os::unix::fs::symlink(node, root.path().join("dev/nvme1n1")).unwrap();
    }
    root
}

#[test]
fn a_missing_path_with_an_ebs_id_is_found_as_its_nvme_namespace() {
    let lo = LoopDevice::new(DEVICE_BYTES);
    let root = fake_nitro_root("vol0123456789abcdef0", Some(&lo.path));
    let sdf = root.path().join("dev/sdf");
    assert_eq!(resolve_device(root.path(), &sdf, Some("vol-0123456789abcdef0")).unwrap(), Some(PathBuf::from("/dev/nvme1n1")));
    assert_eq!(resolve_device(root.path(), &sdf, Some("vol-0fffffffffffffff0")).unwrap(), None);
    assert_eq!(resolve_device(root.path(), &sdf, None).unwrap(), None);
}

// === waiting ===

#[tokio::test]
async fn a_device_that_appears_mid_wait_is_returned() {
    let lo = LoopDevice::new(DEVICE_BYTES);
    let dir = temp_dir();
    let link = dir.path().join("by-id/late-disk");
    let (target, at) = (lo.path.clone(), link.clone());
    let appear = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, at).unwrap();
    });
    let started = tokio::time::Instant::now();
    let found = wait_for_device(Path::new("/"), &link, None, support::WAIT).await.unwrap();
    let waited = started.elapsed();
    appear.await.unwrap();
    assert_eq!(found, lo.path);
    // Seen within one poll gap (at most 1 s) of appearing.
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_millis(3500), "{waited:?}");
}

#[tokio::test]
async fn an_ebs_volume_whose_node_appears_mid_wait_is_returned() {
    let lo = LoopDevice::new(DEVICE_BYTES);
    // Sysfs already shows the namespace; devtmpfs has not made the node yet.
    let root = fake_nitro_root("vol0123456789abcdef0", None);
    let (target, node) = (lo.path.clone(), root.path().join("dev/nvme1n1"));
    let appear = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        std::os::unix::fs::symlink(target, node).unwrap();
    });
    let found = wait_for_device(root.path(), &root.path().join("dev/sdf"), Some("vol-0123456789abcdef0"), support::WAIT).await.unwrap();
    appear.await.unwrap();
    assert_eq!(found, PathBuf::from("/dev/nvme1n1"));
}

#[tokio::test]
async fn a_device_that_never_appears_times_out_naming_it_within_the_bound() {
    let root = fake_nitro_root("vol0123456789abcdef0", None);
    let path = root.path().join("dev/sdg");
    let timeout = Duration::from_millis(1500);
    let started = tokio::time::Instant::now();
    let err = wait_for_device(root.path(), &path, Some("vol-0aaaaaaaaaaaaaaaa"), timeout).await.unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(err, DeviceError::Timeout { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()) && text.contains("vol-0aaaaaaaaaaaaaaaa"), "{text}");
    assert!(waited >= timeout && waited < timeout + Duration::from_millis(500), "{waited:?}");
}

#[tokio::test]
async fn a_path_that_is_not_a_block_device_ends_the_wait_at_once() {
    let dir = temp_dir();
    let started = tokio::time::Instant::now();
    let err = wait_for_device(Path::new("/"), dir.path(), None, support::WAIT).await.unwrap_err();
    assert!(matches!(err, DeviceError::NotBlockDevice { kind: "a directory", .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

// === file-backed volumes ===

#[tokio::test]
async fn attaching_a_new_file_makes_a_sparse_private_file_and_a_device_of_its_size() {
    let dir = temp_dir();
    let backing = dir.path().join("state/volumes/cache.img");
    let att = attach(&backing, 600 * MIB).await;
    let meta = std::fs::metadata(&backing).unwrap();
    assert_eq!(meta.len(), 600 * MIB);
    assert!(meta.blocks() * 512 < MIB, "not sparse: {} blocks allocated", meta.blocks());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(att.0.backing, backing.canonicalize().unwrap());
    assert!(att.0.device.to_string_lossy().starts_with("/dev/loop"), "{:?}", att.0);
    assert_eq!(sysfs_backing(&att.0.device), Some(att.0.backing.clone()));
    assert_eq!(device_bytes(&att.0.device), 600 * MIB);
}

#[tokio::test]
async fn attaching_again_reuses_the_device_and_grows_it_but_never_shrinks() {
    let dir = temp_dir();
    let backing = dir.path().join("cache.img");
    let first = attach(&backing, 600 * MIB).await;
    // As an agent restarted after a crash would: the same file, attached again.
    let again = attach(&backing, 600 * MIB).await;
    assert_eq!(again.0, first.0);
    assert_eq!(losetup_lines_for(&backing).len(), 1, "{:?}", losetup_lines_for(&backing));

    let grown = attach(&backing, 1 << 30).await;
    assert_eq!(grown.0, first.0);
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), 1 << 30);
    assert_eq!(device_bytes(&first.0.device), 1 << 30);

    let smaller = attach(&backing, 300 * MIB).await;
    assert_eq!(smaller.0, first.0);
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), 1 << 30, "never shrunk");
    assert_eq!(device_bytes(&first.0.device), 1 << 30);
    assert_eq!(losetup_lines_for(&backing).len(), 1);
}

#[tokio::test]
async fn a_file_grown_without_telling_the_device_is_caught_up_on_reattach() {
    let dir = temp_dir();
    let backing = dir.path().join("cache.img");
    let att = attach(&backing, 600 * MIB).await;
    // A previous agent grew the file and died before `losetup -c`.
    std::fs::OpenOptions::new().write(true).open(&backing).unwrap().set_len(1 << 30).unwrap();
    assert_eq!(device_bytes(&att.0.device), 600 * MIB);
    let again = attach(&backing, 1 << 30).await;
    assert_eq!(again.0, att.0);
    assert_eq!(device_bytes(&att.0.device), 1 << 30);
}

#[tokio::test]
async fn an_existing_file_keeps_its_contents() {
    let dir = temp_dir();
    let backing = dir.path().join("cache.img");
    let first = attach(&backing, 32 * MIB).await;
    detach_file(&first.0).await.unwrap();
    std::io::Write::write_all(&mut std::fs::OpenOptions::new().write(true).open(&backing).unwrap(), b"not zero").unwrap();
    let _att = attach(&backing, 64 * MIB).await;
    let mut head = vec![0u8; 8];
    std::io::Read::read_exact(&mut std::fs::File::open(&backing).unwrap(), &mut head).unwrap();
    assert_eq!(&head, b"not zero");
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), 64 * MIB);
}

#[tokio::test]
async fn detaching_leaves_nothing_attached_and_is_idempotent() {
    let dir = temp_dir();
    let backing = dir.path().join("cache.img");
    let att = attach(&backing, 64 * MIB).await;
    detach_file(&att.0).await.unwrap();
    assert_eq!(sysfs_backing(&att.0.device), None);
    assert_eq!(losetup_lines_for(&backing), Vec::<String>::new());
    detach_file(&att.0).await.unwrap();
    // And the file can be attached again afterwards.
    let again = attach(&backing, 64 * MIB).await;
    assert_eq!(sysfs_backing(&again.0.device), Some(again.0.backing.clone()));
}

#[tokio::test]
async fn a_backing_path_that_is_not_a_file_is_an_error_naming_it() {
    let dir = temp_dir();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let err = attach_file(&[std::env::temp_dir()], &sub, 64 * MIB).await.unwrap_err();
    assert!(matches!(err, DeviceError::BackingRefused(BackingError::NotAFile { kind: "a directory", .. })), "{err:?}");
    assert!(err.to_string().contains(&sub.display().to_string()), "{err}");

    let lo = LoopDevice::new(DEVICE_BYTES);
    let err = attach_file(&[std::env::temp_dir()], &lo.path, 64 * MIB).await.unwrap_err();
    assert!(matches!(err, DeviceError::BackingRefused(BackingError::NotAllowed { .. })), "{err:?}");
}
