//! Loop devices over sparse files, and mounts of them, for integration tests
//! that need a real block device. Each is undone on drop, and drop never panics:
//! it logs to stderr what it could not undo.
//!
//! Safety on a real machine: this fixture only ever unmounts or detaches the loop
//! devices it attached itself. Before touching a device, drop checks in sysfs that
//! the device is still backed by this fixture's own file, and it only unmounts
//! mounts whose device number is that device's, and only when such a mount is the
//! top of its mount point. It never unmounts lazily. Backing files live in fresh
//! temporary directories, so tests can run in parallel.
//!
//! The mount table is read here with a few lines of its own rather than with
//! `machine_agent::volume::mountinfo`, so that a bug in the code under test
//! cannot make the fixture leave devices behind.
//!
//! Tests that mount still change the machine's mount table while they run; see
//! STYLE.md on running those in a child process or a private mount namespace.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // test code: a fixture fails loudly

use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The mount table of the test process's mount namespace.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Drop unmounts at most this many mounts of one device: far more than any
/// test makes, and a bound in case a mount keeps reappearing.
const MAX_UNMOUNTS: usize = 64;

/// How often, and how many times, drop looks whether the kernel has finished
/// detaching. It may finish after `losetup -d` returns (the rundown runs on a
/// kernel workqueue), normally within milliseconds; 10 s leaves room for a
/// loaded CI machine, and a device still attached after that is reported.
const DETACH_POLL: Duration = Duration::from_millis(10);
const DETACH_POLLS: u32 = 1000;

/// A loop device over a sparse file in its own temporary directory.
#[derive(Debug)]
pub struct LoopDevice {
    /// The block device, e.g. `/dev/loop7`.
    pub path: PathBuf,
    /// The sparse file behind it (canonical). Its directory is this fixture's
    /// own, so tests may put files next to it.
    pub backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    /// Attaches a new loop device over a fresh sparse file of `size_bytes`.
    pub fn new(size_bytes: u64) -> LoopDevice {
        let dir = tempfile::Builder::new().prefix("machine-agent-loopdev-").tempdir().expect("create a temporary directory");
        // Canonical, because sysfs reports the backing file by its resolved path
        // and drop compares the two before touching the device.
        let backing = dir.path().canonicalize().expect("canonicalize the temporary directory").join("backing.img");
        let file = OpenOptions::new().write(true).create_new(true).open(&backing).expect("create the backing file");
        file.set_len(size_bytes).expect("size the backing file");
        drop(file);

        let out = run("losetup", [OsStr::new("--find"), OsStr::new("--show"), backing.as_os_str()]);
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        // From here on drop owns the device; a failed check below panics and
        // drop then detaches it (or leaves it alone if it is not ours).
        let lo = LoopDevice { path, backing, _dir: dir };
        let is_loop = lo.path.parent() == Some(Path::new("/dev")) && lo.path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("loop"));
        assert!(is_loop, "losetup printed {:?}", lo.path);
        assert!(lo.is_ours(), "{} is not backed by {} right after losetup", lo.path.display(), lo.backing.display());
        lo
    }

    /// Sets the backing file to `new_size` bytes and tells the kernel (`losetup -c`).
    pub fn resize(&self, new_size: u64) {
        let file = OpenOptions::new().write(true).open(&self.backing).expect("open the backing file");
        file.set_len(new_size).expect("resize the backing file");
        drop(file);
        run("losetup", [OsStr::new("-c"), self.path.as_os_str()]);
    }

    /// Runs `mkfs.<fs>` on the device, forcing and quiet where the tool knows how.
    /// Panics with the tool's stderr on failure.
    pub fn mkfs(&self, fs: &str, extra_args: &[&str]) {
        let flags: &[&str] = match fs {
            // -F: mke2fs asks before overwriting a filesystem it recognises.
            "ext2" | "ext3" | "ext4" => &["-q", "-F"],
            "xfs" | "btrfs" => &["-q", "-f"],
            _ => &[],
        };
        let mut args: Vec<&OsStr> = flags.iter().chain(extra_args).map(OsStr::new).collect();
        args.push(self.path.as_os_str());
        run(&format!("mkfs.{fs}"), args);
    }

    /// The filesystem UUID as probed from the device itself (no blkid cache), or
    /// "" if it carries none.
    pub fn uuid(&self) -> String {
        let out = command("blkid", [OsStr::new("-p"), OsStr::new("-s"), OsStr::new("UUID"), OsStr::new("-o"), OsStr::new("value"), self.path.as_os_str()]);
        match out.status.code() {
            Some(0) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
            // 2: nothing found, or no UUID tag.
            Some(2) => String::new(),
            _ => panic!("blkid -p {} failed ({}): {}", self.path.display(), out.status, String::from_utf8_lossy(&out.stderr)),
        }
    }

    /// The file sysfs says backs this device now, if the device is attached.
    fn attached_backing(&self) -> Option<PathBuf> {
        let name = self.path.file_name()?;
        let text = std::fs::read(Path::new("/sys/block").join(name).join("loop/backing_file")).ok()?;
        let mut text = text.strip_suffix(b"\n").unwrap_or(&text).to_vec();
        // The kernel appends this once the file has been unlinked.
        if let Some(stripped) = text.strip_suffix(b" (deleted)") {
            text = stripped.to_vec();
        }
        Some(PathBuf::from(OsString::from_vec(text)))
    }

    /// Whether the device is still attached to our backing file: the one check
    /// that makes unmounting and detaching safe.
    fn is_ours(&self) -> bool {
        self.attached_backing().as_deref() == Some(self.backing.as_path())
    }

    /// (major, minor) of the block device, from its rdev.
    fn device_number(&self) -> Result<(u64, u64), String> {
        let meta = std::fs::metadata(&self.path).map_err(|e| format!("cannot stat {}: {e}", self.path.display()))?;
        if !meta.file_type().is_block_device() {
            return Err(format!("{} is not a block device", self.path.display()));
        }
        Ok((nix::sys::stat::major(meta.rdev()), nix::sys::stat::minor(meta.rdev())))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if !self.is_ours() {
            eprintln!("loopdev: {} is no longer attached to {}; leaving it and its mounts alone", self.path.display(), self.backing.display());
            return;
        }
        match self.device_number() {
            Ok(number) => unmount_all_of(number, &self.path),
            Err(e) => eprintln!("loopdev: not unmounting anything: {e}"),
        }
        // Detach even if a mount is left: the kernel then only marks the device
        // to detach when its last mount goes (autoclear), which the self-test
        // would notice as a device still listed.
        match command("losetup", [OsStr::new("-d"), self.path.as_os_str()]) {
            out if out.status.success() => self.wait_detached(),
            out => eprintln!("loopdev: losetup -d {} failed ({}): {}", self.path.display(), out.status, stderr(&out)),
        }
    }
}

impl LoopDevice {
    /// Waits until the kernel no longer lists our file behind the device, so a
    /// test that checks `losetup -a` right after drop sees the device gone.
    // A blocking sleep in a synchronous Drop, waiting on the kernel: there is
    // no tokio clock here for a test to pause.
    #[allow(clippy::disallowed_methods)]
    fn wait_detached(&self) {
        for _ in 0..DETACH_POLLS {
            if !self.is_ours() {
                return;
            }
            std::thread::sleep(DETACH_POLL);
        }
        eprintln!("loopdev: {} is still attached to {} {:?} after losetup -d", self.path.display(), self.backing.display(), DETACH_POLL * DETACH_POLLS);
    }
}

/// Unmounts every mount of the device `number`, deepest first and the top of a
/// stack before what it covers, re-reading the mount table after each unmount.
/// A mount covered by something that is not this device's is left, and logged.
fn unmount_all_of(number: (u64, u64), device: &Path) {
    for _ in 0..MAX_UNMOUNTS {
        let table = match read_mount_table() {
            Ok(table) => table,
            Err(e) => {
                eprintln!("loopdev: cannot unmount {}: {e}", device.display());
                return;
            }
        };
        let mut ours: Vec<(usize, &Mount)> = table.iter().enumerate().filter(|(_, m)| m.device == number).collect();
        if ours.is_empty() {
            return;
        }
        // Deepest first; at equal depth the later mount first.
        ours.sort_by(|a, b| depth(&b.1.point).cmp(&depth(&a.1.point)).then(b.0.cmp(&a.0)));
        let mut unmounted = false;
        for (_, m) in &ours {
            // Unmounting by path removes whatever is on top there; only go ahead
            // when that is this device's mount.
            if top_at(&table, &m.point).map(|top| top.id) != Some(m.id) {
                continue;
            }
            match command("umount", [m.point.as_os_str()]) {
                out if out.status.success() => {
                    unmounted = true;
                    break;
                }
                out => eprintln!("loopdev: umount {} ({}) failed ({}): {}", m.point.display(), device.display(), out.status, stderr(&out)),
            }
        }
        if !unmounted {
            let left: Vec<_> = ours.iter().map(|(_, m)| m.point.display().to_string()).collect();
            eprintln!("loopdev: {} is still mounted at {left:?}; not unmounting anything else", device.display());
            return;
        }
    }
    eprintln!("loopdev: {} still has mounts after {MAX_UNMOUNTS} unmounts; giving up", device.display());
}

/// A mount of a device, undone on drop.
#[derive(Debug)]
pub struct TestMount {
    /// The mount point (canonical).
    pub path: PathBuf,
    /// The kernel's ID of this mount and its device number, so drop unmounts
    /// this mount and no other. The kernel reuses a freed ID at once, so the ID
    /// alone would not do; the pair fails only if a test unmounts this and
    /// mounts the same device at the same place again (drop then unmounts that).
    id: u32,
    device: (u64, u64),
}

/// Mounts `dev` at `at` (created if missing) as `fstype` with mount(8).
/// Panics with mount's stderr on failure.
pub fn mount(dev: &Path, at: &Path, fstype: &str) -> TestMount {
    let path = mount_point(at);
    run("mount", [OsStr::new("-t"), OsStr::new(fstype), dev.as_os_str(), path.as_os_str()]);
    adopt(&path, dev.as_os_str())
}

/// Mounts a tmpfs of `size_bytes` at `at` (created if missing): a small
/// filesystem a test can fill without a device.
pub fn mount_tmpfs(at: &Path, size_bytes: u64) -> TestMount {
    let path = mount_point(at);
    let size = format!("size={size_bytes}");
    run("mount", [OsStr::new("-t"), OsStr::new("tmpfs"), OsStr::new("-o"), OsStr::new(&size), OsStr::new("tmpfs"), path.as_os_str()]);
    adopt(&path, OsStr::new("tmpfs"))
}

/// `at`, created and canonical, because the mount table names mount points by resolved path.
fn mount_point(at: &Path) -> PathBuf {
    std::fs::create_dir_all(at).unwrap_or_else(|e| panic!("cannot create mount point {}: {e}", at.display()));
    at.canonicalize().unwrap_or_else(|e| panic!("cannot resolve {}: {e}", at.display()))
}

/// The mount mount(8) just made at `path`, as a guard.
fn adopt(path: &Path, what: &OsStr) -> TestMount {
    let top = read_mount_table().map(|table| top_at(&table, path).map(|m| (m.id, m.device)));
    match top {
        Ok(Some((id, device))) => TestMount { path: path.to_path_buf(), id, device },
        other => {
            // Not knowing which mount is ours, undo what mount(8) just did.
            let out = command("umount", [path.as_os_str()]);
            panic!("mounted {} at {} but cannot find it in {MOUNTINFO} ({other:?}); umount: {}", Path::new(what).display(), path.display(), stderr(&out));
        }
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let table = match read_mount_table() {
            Ok(table) => table,
            Err(e) => {
                eprintln!("loopdev: not unmounting {}: {e}", self.path.display());
                return;
            }
        };
        let is_this = |m: &Mount| m.id == self.id && m.device == self.device;
        if !table.iter().any(is_this) {
            return; // already gone, e.g. unmounted by the test
        }
        if !top_at(&table, &self.path).is_some_and(is_this) {
            eprintln!("loopdev: {} is covered by another mount; leaving it mounted", self.path.display());
            return;
        }
        match command("umount", [self.path.as_os_str()]) {
            out if out.status.success() => {}
            out => eprintln!("loopdev: umount {} failed ({}): {}", self.path.display(), out.status, stderr(&out)),
        }
    }
}

// === the mount table, just the fields the fixture needs ===

#[derive(Debug)]
struct Mount {
    id: u32,
    device: (u64, u64),
    point: PathBuf,
}

fn read_mount_table() -> Result<Vec<Mount>, String> {
    let bytes = std::fs::read(MOUNTINFO).map_err(|e| format!("cannot read {MOUNTINFO}: {e}"))?;
    // A line this does not understand cannot be one of ours to unmount.
    Ok(bytes.split(|&b| b == b'\n').filter_map(parse_mount_line).collect())
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`
fn parse_mount_line(line: &[u8]) -> Option<Mount> {
    let mut fields = line.split(|&b| b == b' ');
    let id = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let _parent = fields.next()?;
    let (major, minor) = std::str::from_utf8(fields.next()?).ok()?.split_once(':')?;
    let _root = fields.next()?;
    let point = unescape(fields.next()?)?;
    Some(Mount { id, device: (major.parse().ok()?, minor.parse().ok()?), point: PathBuf::from(OsString::from_vec(point)) })
}

/// The kernel writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while let Some(&b) = field.get(i) {
        if b == b'\\' {
            let digits = std::str::from_utf8(field.get(i + 1..i + 4)?).ok()?;
            out.push(u8::from_str_radix(digits, 8).ok()?);
            i += 4;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Some(out)
}

/// The mount on top at `point`: the last one listed there.
fn top_at<'a>(table: &'a [Mount], point: &Path) -> Option<&'a Mount> {
    table.iter().rev().find(|m| m.point == point)
}

fn depth(path: &Path) -> usize {
    path.components().count()
}

// === commands ===

/// Runs a tool with no stdin (nothing may prompt) and captures its output.
fn command<I, S>(program: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    match Command::new(program).args(args).stdin(Stdio::null()).output() {
        Ok(out) => out,
        // Synthesised so drop can log instead of panicking.
        Err(e) => Output { status: failed_status(), stdout: Vec::new(), stderr: format!("cannot run {program}: {e}").into_bytes() },
    }
}

/// Like [`command`], but panics with the tool's stderr unless it succeeds.
fn run<I, S>(program: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_os_string()).collect();
    let out = command(program, &args);
    assert!(out.status.success(), "{program} {args:?} failed ({}): {}", out.status, stderr(&out));
    out
}

fn failed_status() -> std::process::ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    std::process::ExitStatus::from_raw(1 << 8)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}
