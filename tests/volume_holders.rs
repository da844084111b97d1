//! Trimming and emptying a real mount: fstrim on an ext4 loop mount gives
//! freed space back to the device (the loop device punches holes in its backing
//! file), and the processes that keep a mount busy are found by what they use
//! there, killed, and the mount then unmounts.
//!
//! Every resource is a guard, declared so that it drops in the right order on
//! panic too: spawned children are killed and reaped first, then the mount is
//! unmounted, then the loop device detached.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::volume::holders::{find_holders, kill_holders, Holder};
use machine_agent::volume::trim::{fstrim, TrimError};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::loopdev::{mount, LoopDevice};

const DEVICE_BYTES: u64 = 256 << 20;
const MIB: u64 = 1 << 20;
/// What the trim test writes and deletes: a quarter of the device.
const WRITTEN_BYTES: u64 = 64 * MIB;
const FILE_BYTES: u64 = 4 * MIB;

/// A fresh ext4 loop device, formatted so nothing changes on it in the
/// background: inode tables and the journal are written at mkfs, not lazily
/// after mount, so the backing file's size moves only with what the test does.
fn ext4_device() -> LoopDevice {
    let lo = LoopDevice::new(DEVICE_BYTES);
    lo.mkfs("ext4", &["-E", "lazy_itable_init=0,lazy_journal_init=0"]);
    lo
}

/// A unique directory for mount points, and its canonical path.
fn mount_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix("machine-agent-holders-").tempdir().unwrap();
    let canonical = dir.path().canonicalize().unwrap();
    (dir, canonical)
}

/// Bytes the file system holding `path` has allocated to it.
fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[tokio::test]
async fn fstrim_gives_deleted_files_back_to_the_device() {
    let lo = ext4_device();
    let (_dir, root) = mount_dir();
    let m = mount(&lo.path, &root.join("cache"), "ext4");

    let chunk: Vec<u8> = (0..FILE_BYTES).map(|i| u8::try_from(i % 251).unwrap() + 1).collect();
    for i in 0..WRITTEN_BYTES / FILE_BYTES {
        let path = m.path.join(format!("blob-{i}"));
        std::fs::write(&path, &chunk).unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
    }
    nix::unistd::sync();
    let written = allocated_bytes(&lo.backing);
    for i in 0..WRITTEN_BYTES / FILE_BYTES {
        std::fs::remove_file(m.path.join(format!("blob-{i}"))).unwrap();
    }
    nix::unistd::sync();
    // Mounted without `discard`: deleting alone gives nothing back.
    let deleted = allocated_bytes(&lo.backing);
    assert!(deleted + 8 * MIB > written, "the backing file shrank before any trim: {written} -> {deleted} bytes");

    let trimmed = fstrim(&m.path).await.unwrap();
    let after = allocated_bytes(&lo.backing);
    eprintln!("fstrim {}: {trimmed} bytes trimmed; backing file {written} -> {deleted} -> {after} bytes allocated", m.path.display());
    // The first FITRIM after mount covers every free block, the deleted files' included.
    assert!(trimmed >= WRITTEN_BYTES, "trimmed only {trimmed} bytes");
    assert!(after + WRITTEN_BYTES / 2 <= deleted, "the backing file did not shrink: {deleted} -> {after} bytes allocated");
}

#[tokio::test]
async fn fstrim_on_a_filesystem_without_fitrim_is_not_supported() {
    let (_dir, root) = mount_dir();
    let m = mount(Path::new("tmpfs"), &root.join("tmp"), "tmpfs");
    match fstrim(&m.path).await {
        Err(TrimError::NotSupported { mount_point }) => assert_eq!(mount_point, m.path),
        other => panic!("expected NotSupported on tmpfs, got {other:?}"),
    }
}

/// Children that are SIGKILLed and reaped when the test ends, even on panic,
/// before the mount they hold is unmounted.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Children {
    async fn spawn(&mut self, cmd: &mut Command) -> u32 {
        // ETXTBSY: a program just copied can still be open for writing in a
        // child another test thread forked meanwhile, until that child execs.
        for _ in 0..100 {
            match cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn() {
                Ok(child) => {
                    let pid = child.id();
                    self.0.push(child);
                    return pid;
                }
                Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => panic!("cannot spawn {cmd:?}: {e}"),
            }
        }
        panic!("{cmd:?}: text file busy for a second");
    }
}

/// Polls (bounded) until the holders of `mount_point` are `want` exactly: the
/// children exec sleep and open their files a moment after they are spawned.
async fn wait_for_holders(mount_point: &Path, want: &[(u32, &str, Vec<String>)]) -> Vec<Holder> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = find_holders(Path::new("/"), mount_point);
        let got: Vec<(u32, &str, Vec<String>)> = found.iter().map(|h| (h.pid, h.name.as_str(), h.uses.clone())).collect();
        if got == want {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "holders of {}: got {got:?}, want {want:?}", mount_point.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn holders_of_a_busy_mount_are_found_and_killed_and_it_then_unmounts() {
    let lo = ext4_device();
    let (_dir, root) = mount_dir();
    let m = mount(&lo.path, &root.join("cache"), "ext4");
    let mut children = Children(vec![]);

    let workdir = m.path.join("work");
    std::fs::create_dir(&workdir).unwrap();
    let file = m.path.join("layer.tar");
    std::fs::write(&file, "held open").unwrap();
    let program = m.path.join("sleep");
    std::fs::copy("/usr/bin/sleep", &program).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();

    let in_cwd = children.spawn(Command::new("sleep").arg("30").current_dir(&workdir)).await;
    // `exec sleep`: the shell's pid becomes sleep, keeping descriptor 3.
    let with_fd = children.spawn(Command::new("sh").args(["-c", "exec 3<\"$1\"; exec sleep 30", "sh"]).arg(&file).current_dir("/")).await;
    let mapped = children.spawn(Command::new(&program).arg("30").current_dir("/")).await;

    let mut want = vec![
        (in_cwd, "sleep", vec!["cwd".to_string()]),
        (with_fd, "sleep", vec![format!("fd 3 -> {}", file.display())]),
        (mapped, "sleep", vec![format!("mmap {}", program.display())]),
    ];
    want.sort();
    let holders = wait_for_holders(&m.path, &want).await;
    assert!(holders.iter().all(|h| !h.is_self), "{holders:?}");

    assert_eq!(nix::mount::umount(&m.path), Err(nix::errno::Errno::EBUSY), "the mount should be busy while held");

    // `holders` is exactly our three children (checked above), so nothing else
    // on the machine can be signalled.
    let mut signalled = kill_holders(&holders, std::process::id());
    signalled.sort_unstable();
    let mut pids = vec![in_cwd, with_fd, mapped];
    pids.sort_unstable();
    assert_eq!(signalled, pids);
    for child in &mut children.0 {
        let status = child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(nix::libc::SIGKILL), "pid {}", child.id());
    }

    assert_eq!(find_holders(Path::new("/"), &m.path), vec![]);
    nix::mount::umount(&m.path).unwrap();
}
