//! Who keeps a mount busy: when unmounting the cache volume fails with EBUSY,
//! the processes that still use a file, directory or mapping at or under its
//! mount point, read from `/proc` the way fuser(1) and lsof(8) do (neither is
//! run), and the one deliberate way to get rid of them.
//!
//! [`find_holders`] only reads; it never signals, unmounts or decides anything.
//! It marks each holder that is, or descends from, another live machine-agent
//! (its engine, a build step): one that holds its state dir's lock
//! (`instance`), found by walking parent pids. [`kill_holders`] sends SIGKILL
//! and nothing else, never to pid 1, the agent itself, another live agent or
//! anything it runs, or a pid that does not fit a positive `pid_t`; choosing
//! to call it is the caller's decision.
//!
//! What a scan cannot see: mounts stacked under the mount point, including
//! those in other mount namespaces (a container's overlay rootfs whose layers
//! live on the volume keeps it busy with no process holding a file there), and
//! a single thread that changed its own working directory (only the
//! thread-group leader's `cwd` is read).

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

/// The kernel appends this to the link of an open file that has been unlinked.
const DELETED_SUFFIX: &[u8] = b" (deleted)";

/// A process using something at or under a mount point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// The process's `comm` (at most 15 bytes, as the kernel keeps it).
    pub name: String,
    /// What it uses there, in the order scanned: `cwd`, `root`,
    /// `fd 5 -> /mnt/x/f` (by descriptor number), `mmap /mnt/x/lib.so`
    /// (each mapped file once).
    pub uses: Vec<String>,
    /// This is the scanning process itself (`<proc>/self`): the agent. Reported
    /// like any other; the caller decides what that means.
    pub is_self: bool,
    /// The pid of another live machine-agent that this process is or descends
    /// from: that agent's, never ours to kill or unmount from under it.
    pub agent: Option<u32>,
}

/// Every process under `<proc_root>/proc` that uses a path at or under
/// `mount_point`, sorted by pid. Production passes `/` as `proc_root`; tests
/// pass a `TempDir` holding a fake `proc/` tree.
///
/// `mount_point` is compared with the kernel's paths as written, so pass it as
/// the mount table names it (canonical, no symlinks). A process that exits
/// during the scan, or an entry that cannot be read, is left out with a debug
/// log: the scan is a best-effort report, and an entry that vanished no longer
/// holds anything.
pub fn find_holders(proc_root: &Path, mount_point: &Path) -> Vec<Holder> {
    let proc_dir = proc_root.join("proc");
    let own_pid = read_own_pid(&proc_dir);
    let mut holders: Vec<Holder> = list_pids(&proc_dir)
        .into_iter()
        .filter_map(|pid| {
            let dir = proc_dir.join(pid.to_string());
            let uses = read_uses(&dir, mount_point);
            if uses.is_empty() {
                return None;
            }
            let name = match std::fs::read(dir.join("comm")) {
                Ok(bytes) => String::from_utf8_lossy(bytes.strip_suffix(b"\n").unwrap_or(&bytes)).into_owned(),
                Err(error) => {
                    tracing::debug!(pid, %error, "process gone before its name was read; not a holder");
                    return None;
                }
            };
            let agent = find_live_agent(&proc_dir, pid, own_pid);
            Some(Holder { pid, name, uses, is_self: own_pid == Some(pid), agent })
        })
        .collect();
    holders.sort_by_key(|h| h.pid);
    holders
}

/// Sends SIGKILL to each holder except `own_pid`, one marked `is_self`, one
/// that belongs to another live agent, and pid 1, and returns the pids it
/// signalled, in the order given. A holder that already exited (ESRCH) or
/// cannot be signalled is logged and left out.
pub fn kill_holders(holders: &[Holder], own_pid: u32) -> Vec<u32> {
    let mut signalled = Vec::new();
    for h in holders {
        if h.pid == own_pid || h.is_self {
            tracing::warn!(pid = h.pid, name = %h.name, uses = ?h.uses, "the agent itself holds the mount; not killing it");
            continue;
        }
        if let Some(agent) = h.agent {
            tracing::warn!(pid = h.pid, name = %h.name, agent_pid = agent, uses = ?h.uses, "belongs to another live machine-agent; never killing it");
            continue;
        }
        // Pid 1 is init: killing it panics the kernel. 0 and negative values
        // would signal process groups instead of one process.
        let Some(target) = i32::try_from(h.pid).ok().filter(|&p| p > 1) else {
            tracing::warn!(pid = h.pid, name = %h.name, uses = ?h.uses, "never killing this pid");
            continue;
        };
        match kill(Pid::from_raw(target), Signal::SIGKILL) {
            Ok(()) => {
                tracing::info!(pid = h.pid, name = %h.name, uses = ?h.uses, "SIGKILL to a process keeping the mount busy");
                signalled.push(h.pid);
            }
            Err(nix::errno::Errno::ESRCH) => tracing::debug!(pid = h.pid, name = %h.name, "holder already gone"),
            Err(error) => tracing::warn!(pid = h.pid, name = %h.name, %error, "cannot SIGKILL a process keeping the mount busy"),
        }
    }
    signalled
}

/// The files named in the pathname column of `/proc/<pid>/maps` text, each
/// once, in the order first seen, with any ` (deleted)` suffix removed.
/// Anonymous mappings and pseudo-paths (`[heap]`, `[vdso]`) are left out.
///
/// The kernel writes a newline in a path as `\012` but leaves a backslash
/// alone, so that escape cannot be undone reliably; paths are kept as written.
pub fn parse_maps_paths(text: &[u8]) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let Some(path) = maps_line_path(line) else { continue };
        let path = PathBuf::from(OsString::from_vec(strip_deleted(path).to_vec()));
        if !paths.contains(&path) {
            paths.push(path);
        }
    }
    paths
}

/// `7f1c2a000000-7f1c2a021000 r-xp 00000000 08:01 1234   /usr/lib/x.so`:
/// five fields, padding, then a pathname that may itself contain spaces.
fn maps_line_path(line: &[u8]) -> Option<&[u8]> {
    let mut rest = line;
    for _ in 0..5 {
        rest = trim_start_spaces(rest);
        let end = rest.iter().position(|&b| b == b' ')?;
        rest = &rest[end..];
    }
    let path = trim_start_spaces(rest);
    path.starts_with(b"/").then_some(path)
}

fn trim_start_spaces(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != b' ').unwrap_or(bytes.len());
    &bytes[start..]
}

fn strip_deleted(path: &[u8]) -> &[u8] {
    path.strip_suffix(DELETED_SUFFIX).unwrap_or(path)
}

/// Whether `path` is `dir` or lies beneath it, comparing whole components:
/// `/mnt/ab` is not under `/mnt/a`. Both must be absolute. A path with a `..`
/// component is never under anything: the kernel writes none, and lexically
/// it could lead anywhere.
pub fn is_under(path: &Path, dir: &Path) -> bool {
    path.is_absolute() && dir.is_absolute() && !path.components().any(|c| c == Component::ParentDir) && path.starts_with(dir)
}

/// Numeric entries of the proc directory, ascending.
fn list_pids(proc_dir: &Path) -> Vec<u32> {
    let entries = match std::fs::read_dir(proc_dir) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::debug!(path = %proc_dir.display(), %error, "cannot list processes");
            return Vec::new();
        }
    };
    let mut pids: Vec<u32> = entries.filter_map(|e| parse_pid(e.ok()?.file_name().as_bytes())).collect();
    pids.sort_unstable();
    pids
}

/// A pid as proc names it: decimal digits only (no sign, no spaces).
fn parse_pid(name: &[u8]) -> Option<u32> {
    if name.is_empty() || !name.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(name).ok()?.parse().ok()
}

/// Parent links followed at most this far: deeper than any real process tree
/// (agent, buildkitd, runc, a build step's shell and its children), and a bound
/// should a pid be reused into a loop mid-walk.
const MAX_ANCESTRY: usize = 256;

/// The live machine-agent, other than `own_pid`, that `pid` is or descends
/// from. The walk stops at pid 1, at `own_pid` (our own engine and its build
/// steps are ours to stop) and at a process that vanished.
fn find_live_agent(proc_dir: &Path, pid: u32, own_pid: Option<u32>) -> Option<u32> {
    let mut current = pid;
    for _ in 0..MAX_ANCESTRY {
        if current <= 1 || Some(current) == own_pid {
            return None;
        }
        if is_live_agent(&proc_dir.join(current.to_string()), current) {
            return Some(current);
        }
        current = read_ppid(&proc_dir.join(current.to_string()))?;
    }
    None
}

/// Whether the process at `dir` (`<proc>/<pid>`) has a state-dir lock file
/// open that records `pid`: an agent holding its lock. A stale file left by a
/// dead agent records a pid that has no such descriptor open.
fn is_live_agent(dir: &Path, pid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir(dir.join("fd")) else { return false };
    entries.flatten().any(|fd| {
        let named_like_the_lock = std::fs::read_link(fd.path()).ok().is_some_and(|t| t.file_name().is_some_and(|n| n == crate::instance::LOCK_FILE_NAME));
        // Read through the fd link: the file that process has open, whatever its mount namespace.
        named_like_the_lock && crate::instance::read_holder_pid(&fd.path()) == Some(pid)
    })
}

/// The parent pid from `<dir>/stat`.
fn read_ppid(dir: &Path) -> Option<u32> {
    parse_stat_ppid(&std::fs::read(dir.join("stat")).ok()?)
}

/// The fourth field of `/proc/<pid>/stat`: `pid (comm) state ppid ...`. The
/// comm may hold spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_stat_ppid(stat: &[u8]) -> Option<u32> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let mut fields = stat[close + 1..].split(|&b| b == b' ').filter(|f| !f.is_empty());
    let _state = fields.next()?;
    parse_pid(fields.next()?)
}

/// `<proc>/self` links to the reader's own pid, as that procfs numbers it.
fn read_own_pid(proc_dir: &Path) -> Option<u32> {
    let link = std::fs::read_link(proc_dir.join("self")).ok()?;
    parse_pid(link.as_os_str().as_bytes())
}

/// What the process at `dir` (`<proc>/<pid>`) uses under `mount_point`.
fn read_uses(dir: &Path, mount_point: &Path) -> Vec<String> {
    let mut uses = Vec::new();
    for name in ["cwd", "root"] {
        if let Some(target) = read_link_logged(&dir.join(name)) {
            if is_under(&target, mount_point) {
                uses.push(name.to_string());
            }
        }
    }
    for (fd, target) in read_fds(dir) {
        if is_under(&target, mount_point) {
            uses.push(format!("fd {fd} -> {}", target.display()));
        }
    }
    let maps = dir.join("maps");
    match std::fs::read(&maps) {
        Ok(text) => uses.extend(parse_maps_paths(&text).into_iter().filter(|p| is_under(p, mount_point)).map(|p| format!("mmap {}", p.display()))),
        Err(error) => tracing::debug!(path = %maps.display(), %error, "cannot read; skipping"),
    }
    uses
}

/// The open descriptors of a process and what they point to, by number.
fn read_fds(dir: &Path) -> Vec<(u32, PathBuf)> {
    let fd_dir = dir.join("fd");
    let entries = match std::fs::read_dir(&fd_dir) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::debug!(path = %fd_dir.display(), %error, "cannot list; skipping");
            return Vec::new();
        }
    };
    let mut fds: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let fd = parse_pid(e.file_name().as_bytes())?;
            Some((fd, read_link_logged(&e.path())?))
        })
        .collect();
    fds.sort_unstable_by_key(|(fd, _)| *fd);
    fds
}

/// A proc link's target without any ` (deleted)` suffix; `None` (logged) if
/// it cannot be read, e.g. because the process or descriptor is gone.
/// Targets that are not paths (`socket:[123]`, `pipe:[4]`) come back as
/// relative paths and so are under no mount point.
fn read_link_logged(link: &Path) -> Option<PathBuf> {
    match std::fs::read_link(link) {
        Ok(target) => Some(PathBuf::from(OsString::from_vec(strip_deleted(target.as_os_str().as_bytes()).to_vec()))),
        Err(error) => {
            tracing::debug!(path = %link.display(), %error, "cannot read; skipping");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    #[test]
    fn is_under_compares_whole_components() {
        let cases: &[(&str, &str, bool)] = &[
            ("/mnt/a", "/mnt/a", true),
            ("/mnt/a/", "/mnt/a", true),
            ("/mnt/a/f", "/mnt/a", true),
            ("/mnt/a/b/c", "/mnt/a", true),
            ("/mnt/a/f", "/mnt/a/", true),
            ("/mnt/ab", "/mnt/a", false),
            ("/mnt/ab/f", "/mnt/a", false),
            ("/mnt", "/mnt/a", false),
            ("/", "/mnt/a", false),
            ("/anything", "/", true),
            ("/mnt/a/../b", "/mnt/a", false),
            ("socket:[123]", "/mnt/a", false),
            ("mnt/a/f", "/mnt/a", false),
            ("mnt/a/f", "mnt/a", false),
            ("", "/mnt/a", false),
        ];
        for &(path, dir, want) in cases {
            assert_eq!(is_under(Path::new(path), Path::new(dir)), want, "{path} under {dir}");
        }
    }

    #[test]
    fn maps_paths_are_the_sixth_column_once_each() {
        let text = b"\
55d0c4e00000-55d0c4e02000 r--p 00000000 fe:01 1835023                    /usr/bin/sleep
55d0c4e02000-55d0c4e06000 r-xp 00002000 fe:01 1835023                    /usr/bin/sleep
55d0c6a0e000-55d0c6a2f000 rw-p 00000000 00:00 0                          [heap]
7f1c29c00000-7f1c29eea000 r--p 00000000 fe:01 1840000                    /usr/lib/locale/locale-archive
7f1c2a000000-7f1c2a021000 rw-p 00000000 00:00 0 
7f1c2a100000-7f1c2a121000 r-xp 00000000 07:03 12                         /mnt/x/lib.so (deleted)
7f1c2a200000-7f1c2a221000 r--p 00000000 07:03 13                         /mnt/x/my lib.so
7f1c2a300000-7f1c2a321000 r--s 00000000 00:05 7                          /SYSV00000000 (deleted)
7ffd5a3c1000-7ffd5a3e2000 rw-p 00000000 00:00 0                          [stack]
7ffd5a3f9000-7ffd5a3fb000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";
        let want: Vec<PathBuf> =
            ["/usr/bin/sleep", "/usr/lib/locale/locale-archive", "/mnt/x/lib.so", "/mnt/x/my lib.so", "/SYSV00000000"].iter().map(PathBuf::from).collect();
        assert_eq!(parse_maps_paths(text), want);
    }

    #[test]
    fn odd_maps_lines_give_no_path_and_never_panic() {
        let cases: &[(&[u8], &[&str])] = &[
            (b"", &[]),
            (b"\n\n", &[]),
            (b"garbage", &[]),
            (b"a b c d", &[]),
            (b"a b c d e", &[]),
            (b"a b c d e ", &[]),
            (b"a b c d e relative/path", &[]),
            (b"a b c d e /p", &["/p"]),
            (b"a b c d e    /p q\n", &["/p q"]),
            (b"a b c d e /p\na b c d e /p (deleted)", &["/p"]),
            (b"a b c d e /caf\xe9", &["/caf\u{fffd}"]),
        ];
        for &(text, want) in cases {
            let got: Vec<String> = parse_maps_paths(text).iter().map(|p| p.to_string_lossy().into_owned()).collect();
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn pids_are_decimal_digits_only() {
        let cases: &[(&[u8], Option<u32>)] = &[
            (b"1", Some(1)),
            (b"4194304", Some(4_194_304)),
            (b"self", None),
            (b"thread-self", None),
            (b"+1", None),
            (b"-1", None),
            (b"", None),
            (b"1 ", None),
            (b"99999999999", None),
        ];
        for &(name, want) in cases {
            assert_eq!(parse_pid(name), want, "{:?}", String::from_utf8_lossy(name));
        }
    }

    /// One fake process under `<root>/proc/<pid>`.
    fn fake_process(root: &Path, pid: u32, comm: &str, cwd: &str, fds: &[(u32, &str)], maps: &str) {
        let dir = root.join("proc").join(pid.to_string());
        std::fs::create_dir_all(dir.join("fd")).unwrap();
        std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        symlink(cwd, dir.join("cwd")).unwrap();
        symlink("/", dir.join("root")).unwrap();
        for (fd, target) in fds {
            symlink(target, dir.join("fd").join(fd.to_string())).unwrap();
        }
        std::fs::write(dir.join("maps"), maps).unwrap();
    }

    #[test]
    fn finds_every_kind_of_use_in_a_fake_proc_tree() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let lib = "7f1c2a100000-7f1c2a121000 r-xp 00000000 07:03 12                         /mnt/x/lib.so\n";
        let libc = "7f1c2a200000-7f1c2a221000 r-xp 00000000 fe:01 99                         /usr/lib/libc.so.6\n";
        // Out of pid order on purpose: the answer is sorted.
        fake_process(r, 300, "mapper", "/", &[(0, "/dev/null")], &format!("{libc}{lib}{lib}"));
        fake_process(r, 100, "sleep", "/mnt/x/sub", &[(1, "pipe:[77]")], libc);
        fake_process(r, 200, "editor", "/home", &[(12, "/mnt/x/a"), (5, "/mnt/x/f (deleted)"), (6, "socket:[9]")], "");
        fake_process(r, 400, "neighbour", "/mnt/xy", &[(3, "/mnt/xy/f"), (4, "/mnt")], &libc.replace("/usr/lib/libc.so.6", "/mnt/xyz.so"));
        fake_process(r, 1, "init", "/", &[], "");
        std::fs::remove_file(r.join("proc/1/root")).unwrap();
        symlink("/mnt/x", r.join("proc/1/root")).unwrap();
        // Gone mid-scan: the directory is left but nothing in it can be read.
        std::fs::create_dir_all(r.join("proc/500")).unwrap();
        // Not processes.
        std::fs::create_dir_all(r.join("proc/sys")).unwrap();
        std::fs::write(r.join("proc/uptime"), "1.0 1.0\n").unwrap();
        symlink("300", r.join("proc/self")).unwrap();

        let found = find_holders(r, Path::new("/mnt/x"));
        let holder = |pid, name: &str, uses: &[&str], is_self| Holder {
            pid,
            name: name.into(),
            uses: uses.iter().map(|u| u.to_string()).collect(),
            is_self,
            agent: None,
        };
        assert_eq!(
            found,
            vec![
                holder(1, "init", &["root"], false),
                holder(100, "sleep", &["cwd"], false),
                holder(200, "editor", &["fd 5 -> /mnt/x/f", "fd 12 -> /mnt/x/a"], false),
                holder(300, "mapper", &["mmap /mnt/x/lib.so"], true),
            ]
        );
        assert_eq!(find_holders(r, Path::new("/elsewhere")), vec![]);
        assert_eq!(find_holders(&r.join("missing"), Path::new("/mnt/x")), vec![]);
    }

    #[test]
    fn kill_holders_never_signals_init_itself_or_group_pids() {
        let holder = |pid, is_self| Holder { pid, name: "x".into(), uses: vec!["cwd".into()], is_self, agent: None };
        // Every one of these must be refused before any signal is sent: kill(0)
        // or kill(-n) would hit process groups, kill(1) init.
        let refused = [holder(1, false), holder(std::process::id(), false), holder(u32::MAX, false), holder(2_147_483_648, false)];
        assert_eq!(kill_holders(&refused, std::process::id()), Vec::<u32>::new());
        // Marked as the scanner itself, even if the caller passed another pid.
        assert_eq!(kill_holders(&[holder(std::process::id(), true)], 0), Vec::<u32>::new());
        // Another live agent's (a process that cannot exist, so a wrong answer signals nothing).
        let theirs = Holder { agent: Some(42), ..holder(4_000_000, false) };
        assert_eq!(kill_holders(&[theirs], std::process::id()), Vec::<u32>::new());
    }

    #[test]
    fn stat_ppid_is_the_field_after_the_last_parenthesis() {
        let cases: &[(&[u8], Option<u32>)] = &[
            (b"1234 (buildkitd) S 1200 1234 1234 0 -1", Some(1200)),
            (b"1234 (a (weird) name) R 77 1 1", Some(77)),
            (b"1234 (sp ace) S 5", Some(5)),
            (b"1 (init) S 0 1 1", Some(0)),
            (b"1234 (x) S", None),
            (b"garbage", None),
            (b"", None),
        ];
        for &(stat, want) in cases {
            assert_eq!(parse_stat_ppid(stat), want, "{:?}", String::from_utf8_lossy(stat));
        }
    }

    #[test]
    fn processes_under_another_live_agent_are_marked_with_its_pid() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let state = r.join("other-state");
        std::fs::create_dir_all(&state).unwrap();
        let lock = state.join(crate::instance::LOCK_FILE_NAME);
        std::fs::write(&lock, "700\n").unwrap();
        let stale_state = r.join("stale-state");
        std::fs::create_dir_all(&stale_state).unwrap();
        let stale_lock = stale_state.join(crate::instance::LOCK_FILE_NAME);
        std::fs::write(&stale_lock, "999\n").unwrap();
        let stat = |pid: u32, ppid: u32| std::fs::write(r.join(format!("proc/{pid}/stat")), format!("{pid} (x) S {ppid} 1 1 0")).unwrap();
        let lock_s = lock.display().to_string();
        let stale_s = stale_lock.display().to_string();
        // 700: another agent with its lock open; 710 its engine; 720 a build step under it.
        fake_process(r, 700, "machine-agent", "/", &[(3, &lock_s)], "");
        fake_process(r, 710, "buildkitd", "/mnt/x", &[], "");
        fake_process(r, 720, "sh", "/mnt/x/step", &[], "");
        // 800: us, with our own lock, and our engine 810; 900: an orphan whose
        // parent is init; 950 opened a lock file that records another pid.
        let own_lock = r.join("own.lock-dir");
        std::fs::create_dir_all(&own_lock).unwrap();
        std::fs::write(own_lock.join(crate::instance::LOCK_FILE_NAME), "800\n").unwrap();
        fake_process(r, 800, "machine-agent", "/", &[(3, &own_lock.join(crate::instance::LOCK_FILE_NAME).display().to_string())], "");
        fake_process(r, 810, "buildkitd", "/mnt/x", &[], "");
        fake_process(r, 900, "buildkitd", "/mnt/x", &[], "");
        fake_process(r, 950, "machine-agent", "/mnt/x", &[(3, &stale_s)], "");
        for (pid, ppid) in [(700, 1), (710, 700), (720, 710), (800, 1), (810, 800), (900, 1), (950, 1)] {
            stat(pid, ppid);
        }
        symlink("800", r.join("proc/self")).unwrap();

        let marked: Vec<(u32, Option<u32>)> = find_holders(r, Path::new("/mnt/x")).iter().map(|h| (h.pid, h.agent)).collect();
        assert_eq!(marked, vec![(710, Some(700)), (720, Some(700)), (810, None), (900, None), (950, None)]);
    }

    /// Children that are SIGKILLed and reaped when the test ends, even on panic.
    struct Children(Vec<Child>);

    impl Drop for Children {
        fn drop(&mut self) {
            for child in &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    fn spawn(cmd: &mut Command) -> Child {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
    }

    /// Polls (bounded) until the children among `pids` look as `ready` wants
    /// (they exec sleep and open their files a moment after spawn).
    async fn holders_once_ready(dir: &Path, pids: &[u32], ready: impl Fn(&[Holder]) -> bool) -> Vec<Holder> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let found: Vec<Holder> = find_holders(Path::new("/"), dir).into_iter().filter(|h| pids.contains(&h.pid)).collect();
            if ready(&found) {
                return found;
            }
            assert!(tokio::time::Instant::now() < deadline, "children never showed as holders: {found:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn finds_and_kills_real_processes_holding_a_directory() {
        let dir = tempfile::Builder::new().prefix("machine-agent-holders-").tempdir().unwrap();
        let dir_path = dir.path().canonicalize().unwrap();
        let file = dir_path.join("file");
        std::fs::write(&file, "held").unwrap();
        let mut children = Children(vec![]);
        children.0.push(spawn(Command::new("sleep").arg("30").current_dir(&dir_path)));
        // `exec sleep`: the shell's pid becomes sleep, keeping descriptor 3.
        children.0.push(spawn(Command::new("sh").args(["-c", "exec 3<\"$1\"; exec sleep 30", "sh"]).arg(&file).current_dir("/")));
        let pids: Vec<u32> = children.0.iter().map(Child::id).collect();
        // The test process holds the directory too, and must come back marked.
        let own = std::fs::File::open(&file).unwrap();

        let fd_use = format!("fd 3 -> {}", file.display());
        let found = holders_once_ready(&dir_path, &pids, |found| {
            found.len() == 2 && found.iter().all(|h| h.name == "sleep") && found.iter().any(|h| h.uses.contains(&fd_use))
        })
        .await;
        let mut by_pid: Vec<(u32, &str, Vec<String>)> = found.iter().map(|h| (h.pid, h.name.as_str(), h.uses.clone())).collect();
        by_pid.sort();
        let mut want = vec![(pids[0], "sleep", vec!["cwd".to_string()]), (pids[1], "sleep", vec![fd_use.clone()])];
        want.sort();
        assert_eq!(by_pid, want);

        let all = find_holders(Path::new("/"), &dir_path);
        let me = all.iter().find(|h| h.pid == std::process::id()).expect("the test process holds the file");
        assert!(me.is_self && me.uses.iter().any(|u| u.ends_with("/file")), "{me:?}");
        drop(own);

        let mut signalled = kill_holders(&found, std::process::id());
        signalled.sort_unstable();
        let mut expected = pids.clone();
        expected.sort_unstable();
        assert_eq!(signalled, expected);
        for child in &mut children.0 {
            let status = child.wait().unwrap();
            assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(nix::libc::SIGKILL));
        }
        assert_eq!(find_holders(Path::new("/"), &dir_path), vec![]);
    }
}
