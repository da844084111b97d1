//! The loop-device fixture's own tests: whatever a test does, and however it
//! ends, the fixture leaves no mount and no attached loop device behind.
//! Each test names its own backing file and mount points, so they run in parallel.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

#[path = "support/loopdev.rs"]
mod loopdev;

use loopdev::{mount, LoopDevice};
use std::path::{Path, PathBuf};
use std::process::Command;

const DEVICE_BYTES: u64 = 64 << 20;

/// Whether `losetup -a` lists a device backed by `backing` (deleted or not).
fn attached(backing: &Path) -> bool {
    let out = Command::new("losetup").arg("-a").output().unwrap();
    assert!(out.status.success(), "losetup -a: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).contains(&format!("({}", backing.display()))
}

/// The mount points at or below `dir` in this process's mount table.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    // The fixture's directories have plain names, so no unescaping is needed.
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(PathBuf::from))
        .filter(|point| point.starts_with(dir))
        .collect()
}

fn sh(program: &str, args: &[&Path]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn mount_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix("machine-agent-mnt-").tempdir().unwrap();
    let canonical = dir.path().canonicalize().unwrap();
    (dir, canonical)
}

#[test]
fn a_formatted_mounted_device_is_unmounted_and_detached_on_drop() {
    let (_dir, root) = mount_dir();
    let lo = LoopDevice::new(DEVICE_BYTES);
    let backing = lo.backing.clone();
    assert!(lo.path.starts_with("/dev") && attached(&backing), "{lo:?}");
    assert_eq!(lo.uuid(), "", "a blank device has no UUID");

    lo.mkfs("ext4", &["-L", "selftest"]);
    let uuid = lo.uuid();
    assert_eq!(uuid.len(), 36, "{uuid:?}");

    let m = mount(&lo.path, &root.join("m"), "ext4");
    std::fs::write(m.path.join("hello"), b"world").unwrap();
    assert_eq!(std::fs::read(m.path.join("hello")).unwrap(), b"world");
    assert_eq!(mounts_under(&root), [root.join("m")]);

    drop(m);
    assert!(mounts_under(&root).is_empty());
    drop(lo);
    assert!(!attached(&backing), "{} is still attached", backing.display());
}

#[test]
fn a_panic_while_mounted_still_unmounts_and_detaches() {
    let (_dir, root) = mount_dir();
    let mut backing = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lo = LoopDevice::new(DEVICE_BYTES);
        backing = Some(lo.backing.clone());
        lo.mkfs("ext4", &[]);
        let m = mount(&lo.path, &root.join("m"), "ext4");
        std::fs::write(m.path.join("f"), b"x").unwrap();
        panic!("a test fails while its device is mounted");
    }));
    assert!(result.is_err());
    let backing = backing.expect("the device was created");
    assert!(mounts_under(&root).is_empty(), "{:?}", mounts_under(&root));
    assert!(!attached(&backing), "{} is still attached", backing.display());
}

#[test]
fn dropping_the_device_unmounts_mounts_left_behind_children_first() {
    let (_dir, root) = mount_dir();
    let lo = LoopDevice::new(DEVICE_BYTES);
    let backing = lo.backing.clone();
    lo.mkfs("ext4", &[]);
    let top = root.join("top");
    // Left behind on purpose: the device has to clean up after a test that forgot.
    std::mem::forget(mount(&lo.path, &top, "ext4"));
    std::fs::create_dir(top.join("sub")).unwrap();
    // A bind mount beneath the first mount, and a second one stacked on it
    // (mount(8) refuses to mount the same device twice, but binds it).
    sh("mount", &[Path::new("--bind"), &top, &top.join("sub")]);
    sh("mount", &[Path::new("--bind"), &top, &top.join("sub")]);
    assert_eq!(mounts_under(&root), [top.clone(), top.join("sub"), top.join("sub")]);

    drop(lo);
    assert!(mounts_under(&root).is_empty(), "{:?}", mounts_under(&root));
    assert!(!attached(&backing), "{} is still attached", backing.display());
}

#[test]
fn resize_changes_the_device_size() {
    let lo = LoopDevice::new(DEVICE_BYTES);
    let sectors = || -> u64 {
        let name = lo.path.file_name().unwrap();
        std::fs::read_to_string(Path::new("/sys/block").join(name).join("size")).unwrap().trim().parse().unwrap()
    };
    assert_eq!(sectors() * 512, DEVICE_BYTES);
    lo.resize(2 * DEVICE_BYTES);
    assert_eq!(sectors() * 512, 2 * DEVICE_BYTES);
    assert_eq!(std::fs::metadata(&lo.backing).unwrap().len(), 2 * DEVICE_BYTES);
}

#[test]
fn a_mount_already_unmounted_by_the_test_is_left_alone_on_drop() {
    let (_dir, root) = mount_dir();
    let lo = LoopDevice::new(DEVICE_BYTES);
    lo.mkfs("ext4", &[]);
    let m = mount(&lo.path, &root.join("m"), "ext4");
    sh("umount", &[&m.path]);
    // Something else now at the same place (the kernel may even give it the
    // same mount ID) must survive the old mount's drop.
    let other = mount(Path::new("tmpfs"), &root.join("m"), "tmpfs");
    drop(m);
    assert_eq!(mounts_under(&root), std::slice::from_ref(&other.path));
    drop(other);
    assert!(mounts_under(&root).is_empty());
}
