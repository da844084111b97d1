//! The mount table as the kernel reports it in `/proc/self/mountinfo` (proc(5)):
//! parsing it into [`MountEntry`] values, and pure questions about those entries
//! (what is mounted at a path, which mount holds a path, what lies beneath a path
//! and in which order it must be unmounted).
//!
//! This module only reads. It never mounts, unmounts or touches a device; callers
//! decide what to do with the answers. The file's path is a parameter so tests
//! use fixtures, and the parser never panics on any input (property-tested).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// The mount table of the calling process's mount namespace.
pub const PROC_SELF_MOUNTINFO: &str = "/proc/self/mountinfo";

/// An offending line is quoted in errors up to this many bytes: enough to
/// recognise it, bounded so one bad line cannot flood a log.
const QUOTE_MAX_BYTES: usize = 256;

/// What the name of a text parsed by [`parse_mountinfo`] is in its errors; it
/// came from no file.
const TEXT_ORIGIN: &str = "mountinfo";

/// One line of mountinfo: one mount.
///
/// `root`, `mount_point` and `source` are unescaped (the kernel writes space,
/// tab, newline and backslash as `\040`, `\011`, `\012`, `\134`). `root` and
/// `mount_point` keep non-UTF-8 bytes exactly; `source`, `fs_type` and the
/// options are UTF-8 text, with any invalid bytes replaced. The option strings
/// are kept as the kernel wrote them, escapes included, so splitting them on
/// `,` stays unambiguous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Unique among the namespace's current mounts; may be reused after an unmount.
    pub mount_id: u32,
    /// The mount this one sits on (its own id for the namespace's root).
    pub parent_id: u32,
    /// `st_dev` of files on this mount: the block device for a disk filesystem.
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem that forms this mount's root: `/` for a
    /// whole filesystem, a subdirectory for a bind mount of one.
    pub root: PathBuf,
    /// Where the mount is, relative to the process's root.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,relatime`).
    pub mount_options: String,
    pub fs_type: String,
    /// The device or other source (`/dev/nvme1n1`, `overlay`, `tmpfs`); may be empty.
    pub source: String,
    /// Per-superblock options (`rw,discard,errors=remount-ro`).
    pub super_options: String,
}

/// Why a mount table could not be read.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum MountinfoError {
    /// cannot read {path}: {source}
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// malformed {path} line {line}: {problem}: {text:?}
    Malformed {
        /// The file read, or `mountinfo` for text given to [`parse_mountinfo`].
        path: PathBuf,
        /// 1-based.
        line: usize,
        problem: LineProblem,
        /// The line as read, cut at a few hundred bytes.
        text: String,
    },
}

/// What is wrong with a malformed line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, displaydoc::Display)]
pub enum LineProblem {
    /// fewer than the 6 fields that precede the optional fields
    TooFewFields,
    /// no " - " separator after the optional fields
    NoSeparator,
    /// {0} fields after the " - " separator; expected 3 (fstype, source, super options)
    WrongFieldCountAfterSeparator(usize),
    /// {0} is not a decimal number that fits in 32 bits
    NotANumber(&'static str),
    /// major:minor is not two decimal numbers separated by a colon
    BadDevice,
    /// {0} has a backslash that does not start an octal escape such as \040
    BadEscape(&'static str),
    /// {0} is empty
    Empty(&'static str),
}

/// Reads and parses the mount table at `path`; production passes [`PROC_SELF_MOUNTINFO`].
pub fn read_mountinfo(path: &Path) -> Result<Vec<MountEntry>, MountinfoError> {
    // Bytes, not a String: a mount point need not be UTF-8, and one odd mount
    // anywhere on the machine must not make the whole table unreadable.
    let bytes = std::fs::read(path).map_err(|source| MountinfoError::Read { path: path.into(), source })?;
    parse_lines(&bytes, path)
}

/// Parses mountinfo text. A line that does not have the proc(5) shape is an
/// error naming its 1-based line number; empty lines are skipped.
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountEntry>, MountinfoError> {
    parse_lines(text.as_bytes(), Path::new(TEXT_ORIGIN))
}

fn parse_lines(bytes: &[u8], origin: &Path) -> Result<Vec<MountEntry>, MountinfoError> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(index, line)| parse_line(line).map_err(|problem| MountinfoError::Malformed { path: origin.into(), line: index + 1, problem, text: quote(line) }))
        .collect()
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
fn parse_line(line: &[u8]) -> Result<MountEntry, LineProblem> {
    // Single spaces, not runs of whitespace: the kernel separates fields with
    // exactly one space and escapes spaces inside fields, so an empty field
    // (a mount whose source is "") shows up as two spaces and must stay a field.
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let [mount_id, parent_id, device, root, mount_point, mount_options, rest @ ..] = fields.as_slice() else {
        return Err(LineProblem::TooFewFields);
    };
    // The optional fields (`shared:N`, `master:N`, ...) run up to a lone "-".
    let separator = rest.iter().position(|f| *f == b"-").ok_or(LineProblem::NoSeparator)?;
    let [fs_type, source, super_options] = &rest[separator + 1..] else {
        return Err(LineProblem::WrongFieldCountAfterSeparator(rest.len() - separator - 1));
    };
    // Checked in the order the fields are written, so the first bad one is named.
    let mount_id = parse_decimal(mount_id).ok_or(LineProblem::NotANumber("mount ID"))?;
    let parent_id = parse_decimal(parent_id).ok_or(LineProblem::NotANumber("parent ID"))?;
    let (major, minor) = parse_device(device)?;
    let entry = MountEntry {
        mount_id,
        parent_id,
        major,
        minor,
        root: path_field(root, "root")?,
        mount_point: path_field(mount_point, "mount point")?,
        mount_options: text(non_empty(mount_options, "mount options")?),
        fs_type: text(non_empty(fs_type, "filesystem type")?),
        source: String::from_utf8_lossy(&unescape(source, "source")?).into_owned(),
        super_options: text(non_empty(super_options, "super options")?),
    };
    Ok(entry)
}

fn non_empty<'a>(field: &'a [u8], name: &'static str) -> Result<&'a [u8], LineProblem> {
    if field.is_empty() {
        Err(LineProblem::Empty(name))
    } else {
        Ok(field)
    }
}

/// A non-empty escaped path, kept byte for byte.
fn path_field(field: &[u8], name: &'static str) -> Result<PathBuf, LineProblem> {
    Ok(PathBuf::from(OsString::from_vec(unescape(non_empty(field, name)?, name)?)))
}

fn text(field: &[u8]) -> String {
    String::from_utf8_lossy(field).into_owned()
}

/// Digits only: `str::parse` would also take a leading `+`.
fn parse_decimal(field: &[u8]) -> Option<u32> {
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn parse_device(field: &[u8]) -> Result<(u32, u32), LineProblem> {
    let colon = field.iter().position(|&b| b == b':').ok_or(LineProblem::BadDevice)?;
    let major = parse_decimal(&field[..colon]).ok_or(LineProblem::BadDevice)?;
    let minor = parse_decimal(&field[colon + 1..]).ok_or(LineProblem::BadDevice)?;
    Ok((major, minor))
}

/// Undoes the kernel's `\ooo` escapes. The kernel escapes every backslash it
/// writes, so a backslash without three octal digits means the line is not
/// what we think it is, and is refused rather than guessed at.
fn unescape(field: &[u8], name: &'static str) -> Result<Vec<u8>, LineProblem> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while let Some(&b) = field.get(i) {
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let byte = match field.get(i + 1..i + 4) {
            Some(&[a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7']) => (a - b'0') * 64 + (b - b'0') * 8 + (c - b'0'),
            _ => return Err(LineProblem::BadEscape(name)),
        };
        out.push(byte);
        i += 4;
    }
    Ok(out)
}

fn quote(line: &[u8]) -> String {
    let cut = &line[..line.len().min(QUOTE_MAX_BYTES)];
    let mut text = String::from_utf8_lossy(cut).into_owned();
    if cut.len() < line.len() {
        text.push_str("...");
    }
    text
}

/// What is mounted at `mount_point`: the last entry wins, because a later mount
/// at the same place is stacked on top of the earlier ones and hides them.
pub fn find_mount<'a>(entries: &'a [MountEntry], mount_point: &Path) -> Option<&'a MountEntry> {
    entries.iter().rev().find(|e| e.mount_point == mount_point)
}

/// Every mount at or below `path` (component-wise: `/a/bc` is not below `/a/b`),
/// in the order to unmount them: deepest first, and at equal depth the later
/// mount first, so children go before parents and the top of a stack before
/// what it covers.
///
/// The order comes from paths alone. A mount that was later covered by a mount
/// on one of its ancestors (`/a/b/c`, then `/a/b` on top) cannot be reached by
/// its path until the covering mount is gone; callers that may meet that case
/// must check what `umount` actually removed.
pub fn mounts_beneath<'a>(entries: &'a [MountEntry], path: &Path) -> Vec<&'a MountEntry> {
    let mut found: Vec<(usize, usize, &MountEntry)> =
        entries.iter().enumerate().filter(|(_, e)| e.mount_point.starts_with(path)).map(|(index, e)| (depth(&e.mount_point), index, e)).collect();
    found.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
    found.into_iter().map(|(_, _, e)| e).collect()
}

/// The mount that holds `path`: the one whose mount point is the longest
/// component-wise prefix of it, and of several at that point the last (the top
/// of the stack). `path` is taken as written: symlinks are not resolved, so pass
/// a canonical path.
pub fn mount_of_path<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    let mut best: Option<(usize, &MountEntry)> = None;
    for e in entries.iter().filter(|e| path.starts_with(&e.mount_point)) {
        let d = depth(&e.mount_point);
        if best.is_none_or(|(best_depth, _)| d >= best_depth) {
            best = Some((d, e));
        }
    }
    best.map(|(_, e)| e)
}

fn depth(path: &Path) -> usize {
    path.components().count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    /// A builder VM in the middle of a build: root on nvme0, the cache volume
    /// on nvme1, buildkit's bind mount of a subdirectory of it, an overlay
    /// rootfs for a running step, and a few odd names.
    const BUILDER: &str = "\
24 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw,discard,errors=remount-ro
25 24 0:23 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=4001232k,nr_inodes=1000308,mode=755
26 24 0:24 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=803900k,mode=755
312 24 259:4 / /var/lib/buildkit rw,noatime shared:170 - ext4 /dev/nvme1n1 rw,discard,stripe=16
313 312 259:4 /runc-overlayfs/cache /var/lib/buildkit/cache rw,noatime shared:170 - ext4 /dev/nvme1n1 rw,discard,stripe=16
401 312 0:71 / /var/lib/buildkit/runc-overlayfs/executor/x1/rootfs rw,relatime - overlay overlay rw,lowerdir=/var/lib/buildkit/runc-overlayfs/snapshots/snapshots/12/fs:/var/lib/buildkit/runc-overlayfs/snapshots/snapshots/11/fs,upperdir=/var/lib/buildkit/runc-overlayfs/snapshots/snapshots/13/fs,workdir=/var/lib/buildkit/runc-overlayfs/snapshots/snapshots/13/work,index=off
402 26 0:72 / /run/user/1000/my\\040disk rw,nosuid,nodev,relatime master:5 propagate_from:1 - tmpfs my\\040tmp rw,size=1024k,mode=700
403 26 0:73 / /run/odd\\011tab\\012nl\\134bs rw,relatime shared:9 master:5 - tmpfs  rw
404 312 259:4 / /var/lib/buildkit rw,noatime - ext4 /dev/nvme1n1 rw,discard,stripe=16
";

    fn entries() -> Vec<MountEntry> {
        parse_mountinfo(BUILDER).unwrap()
    }

    fn points<'a>(found: impl IntoIterator<Item = &'a MountEntry>) -> Vec<(u32, &'a Path)> {
        found.into_iter().map(|e| (e.mount_id, e.mount_point.as_path())).collect()
    }

    #[test]
    fn parses_every_field_of_real_looking_lines() {
        let all = entries();
        assert_eq!(all.len(), 9);
        assert_eq!(
            all[3],
            MountEntry {
                mount_id: 312,
                parent_id: 24,
                major: 259,
                minor: 4,
                root: "/".into(),
                mount_point: "/var/lib/buildkit".into(),
                mount_options: "rw,noatime".into(),
                fs_type: "ext4".into(),
                source: "/dev/nvme1n1".into(),
                super_options: "rw,discard,stripe=16".into(),
            }
        );
        // Table: (index, mount point, root, fs type, source, mount options)
        let cases: &[(usize, &str, &str, &str, &str, &str)] = &[
            (0, "/", "/", "ext4", "/dev/nvme0n1p1", "rw,relatime"),
            (2, "/run", "/", "tmpfs", "tmpfs", "rw,nosuid,nodev,noexec,relatime"),
            (4, "/var/lib/buildkit/cache", "/runc-overlayfs/cache", "ext4", "/dev/nvme1n1", "rw,noatime"),
            (5, "/var/lib/buildkit/runc-overlayfs/executor/x1/rootfs", "/", "overlay", "overlay", "rw,relatime"),
            (6, "/run/user/1000/my disk", "/", "tmpfs", "my tmp", "rw,nosuid,nodev,relatime"),
            (7, "/run/odd\ttab\nnl\\bs", "/", "tmpfs", "", "rw,relatime"),
        ];
        for &(i, mount_point, root, fs_type, source, options) in cases {
            let e = &all[i];
            assert_eq!(e.mount_point, Path::new(mount_point), "line {}", i + 1);
            assert_eq!(e.root, Path::new(root), "line {}", i + 1);
            assert_eq!(e.fs_type, fs_type, "line {}", i + 1);
            assert_eq!(e.source, source, "line {}", i + 1);
            assert_eq!(e.mount_options, options, "line {}", i + 1);
        }
        assert!(all[5].super_options.starts_with("rw,lowerdir=/var/lib/buildkit/runc-overlayfs/snapshots/snapshots/12/fs:"));
        assert!(all[5].super_options.ends_with("/13/work,index=off"));
        assert_eq!((all[6].major, all[6].minor, all[6].parent_id), (0, 72, 26));
    }

    #[test]
    fn keeps_non_utf8_bytes_of_a_mount_point_exactly() {
        let bytes = b"40 24 0:80 / /mnt/caf\xe9\\040x rw - tmpfs tmpfs rw\n";
        let all = parse_lines(bytes, Path::new("fixture")).unwrap();
        assert_eq!(all[0].mount_point.as_os_str().as_bytes(), b"/mnt/caf\xe9 x");
    }

    #[test]
    fn a_malformed_line_is_an_error_naming_its_number() {
        let good = "24 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw\n";
        let cases: &[(&str, LineProblem)] = &[
            ("24 1 259:2 / /", LineProblem::TooFewFields),
            ("24 1 259:2 / / rw shared:1 ext4 /dev/vda rw", LineProblem::NoSeparator),
            ("24 1 259:2 / / rw - ext4 /dev/vda", LineProblem::WrongFieldCountAfterSeparator(2)),
            ("24 1 259:2 / / rw - ext4 /dev/vda rw extra", LineProblem::WrongFieldCountAfterSeparator(4)),
            ("x 1 259:2 / / rw - ext4 /dev/vda rw", LineProblem::NotANumber("mount ID")),
            ("+24 1 259:2 / / rw - ext4 /dev/vda rw", LineProblem::NotANumber("mount ID")),
            ("24 -1 259:2 / / rw - ext4 /dev/vda rw", LineProblem::NotANumber("parent ID")),
            ("24 1 4294967296:2 / / rw - ext4 /dev/vda rw", LineProblem::BadDevice),
            ("24 1 259 / / rw - ext4 /dev/vda rw", LineProblem::BadDevice),
            ("24 1 259:2:1 / / rw - ext4 /dev/vda rw", LineProblem::BadDevice),
            ("24 1 259:2 / /mnt/a\\40b rw - ext4 /dev/vda rw", LineProblem::BadEscape("mount point")),
            ("24 1 259:2 / /mnt/a\\ rw - ext4 /dev/vda rw", LineProblem::BadEscape("mount point")),
            ("24 1 259:2 /x\\400 /mnt rw - ext4 /dev/vda rw", LineProblem::BadEscape("root")),
            ("24 1 259:2 / /mnt rw - ext4 /dev/\\x rw", LineProblem::BadEscape("source")),
            ("24 1 259:2 / /  rw - ext4 /dev/vda rw", LineProblem::Empty("mount options")),
            ("24 1 259:2 / / rw -  /dev/vda rw", LineProblem::Empty("filesystem type")),
            ("24  1 259:2 / / rw - ext4 /dev/vda rw", LineProblem::NotANumber("parent ID")),
        ];
        for (bad, want) in cases {
            let text = format!("{good}{good}{bad}\n{good}");
            match parse_mountinfo(&text) {
                Err(MountinfoError::Malformed { line, problem, text, .. }) => {
                    assert_eq!((line, problem), (3, *want), "{bad}");
                    assert_eq!(text, *bad);
                }
                other => panic!("{bad}: expected a malformed line 3, got {other:?}"),
            }
        }
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mountinfo");
        std::fs::write(&path, "24 1 259:2 / / rw - ext4 /dev/vda rw\n\n25 24 0:23 / /dev rw devtmpfs udev rw\n").unwrap();
        let err = read_mountinfo(&path).unwrap_err().to_string();
        assert!(err.contains(&format!("{} line 3", path.display())), "{err}");
        assert!(err.contains("separator"), "{err}");

        let missing = dir.path().join("missing");
        let err = read_mountinfo(&missing).unwrap_err().to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }

    #[test]
    fn an_overlong_line_is_quoted_only_in_part() {
        let bad = format!("24 1 259:2 / /{} rw - ext4", "a".repeat(10_000));
        let err = parse_mountinfo(&bad).unwrap_err().to_string();
        assert!(err.len() < 1000, "{} bytes", err.len());
    }

    #[test]
    fn empty_text_is_an_empty_table() {
        assert_eq!(parse_mountinfo("").unwrap(), vec![]);
        assert_eq!(parse_mountinfo("\n").unwrap(), vec![]);
    }

    #[test]
    fn find_mount_takes_the_top_of_a_stack() {
        let all = entries();
        let cases: &[(&str, Option<u32>)] = &[
            ("/var/lib/buildkit", Some(404)),
            ("/var/lib/buildkit/", Some(404)),
            ("/", Some(24)),
            ("/run/user/1000/my disk", Some(402)),
            ("/var/lib", None),
            ("/var/lib/buildkit/cache/sub", None),
        ];
        for &(path, want) in cases {
            assert_eq!(find_mount(&all, Path::new(path)).map(|e| e.mount_id), want, "{path}");
        }
    }

    #[test]
    fn mounts_beneath_are_in_unmount_order() {
        let all = entries();
        let cases: &[(&str, &[u32])] = &[
            // deepest first; the two stacked at /var/lib/buildkit, later first
            ("/var/lib/buildkit", &[401, 313, 404, 312]),
            ("/var/lib/buildkit/cache", &[313]),
            ("/var/lib/buildkit/cach", &[]),
            ("/var/lib/buildk", &[]),
            ("/run", &[402, 403, 26]),
            ("/nowhere", &[]),
        ];
        for &(path, want) in cases {
            let got: Vec<u32> = mounts_beneath(&all, Path::new(path)).iter().map(|e| e.mount_id).collect();
            assert_eq!(got, want, "{path}: {:?}", points(mounts_beneath(&all, Path::new(path))));
        }
        assert_eq!(mounts_beneath(&all, Path::new("/")).len(), all.len());
    }

    #[test]
    fn mount_of_path_is_the_longest_prefix_and_the_top_of_a_stack() {
        let all = entries();
        let cases: &[(&str, u32)] = &[
            ("/var/lib/buildkit/runc-overlayfs/executor/x1/rootfs/etc/passwd", 401),
            ("/var/lib/buildkit/runc-overlayfs/executor/x1/rootfs", 401),
            ("/var/lib/buildkit/runc-overlayfs/executor/x1/rootfs2", 404),
            ("/var/lib/buildkit/cache/blobs", 313),
            ("/var/lib/buildkit/cachex", 404),
            ("/var/lib/buildkit", 404),
            ("/var/lib/buildkitd", 24),
            ("/run/user/1000/my disk/f", 402),
            ("/run/user/1000/my", 26),
            ("/etc", 24),
            ("/", 24),
        ];
        for &(path, want) in cases {
            assert_eq!(mount_of_path(&all, Path::new(path)).map(|e| e.mount_id), Some(want), "{path}");
        }
        assert_eq!(mount_of_path(&all, Path::new("relative/path")), None);
        assert_eq!(mount_of_path(&[], Path::new("/")), None);
    }

    #[test]
    fn reads_this_process_mount_table() {
        let all = read_mountinfo(Path::new(PROC_SELF_MOUNTINFO)).unwrap();
        let root = find_mount(&all, Path::new("/")).expect("a mount at /");
        assert!(!root.fs_type.is_empty());
        assert!(mount_of_path(&all, &std::env::temp_dir()).is_some());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// The kernel's escaping, for round trips.
        fn escape(bytes: &[u8]) -> String {
            let mut out = String::new();
            for &b in bytes {
                match b {
                    b' ' | b'\t' | b'\n' | b'\\' => out.push_str(&format!("\\{b:03o}")),
                    _ => out.push(char::from(b)),
                }
            }
            out
        }

        fn arb_path() -> impl Strategy<Value = String> {
            proptest::collection::vec(proptest::sample::select(vec!['a', 'z', '0', '-', '.', ' ', '\t', '\n', '\\', ':']), 1..12)
                .prop_map(|chars| format!("/{}", chars.into_iter().collect::<String>()))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn arbitrary_text_never_panics(text in ".*") {
                let _ = parse_mountinfo(&text);
            }

            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = parse_lines(&bytes, Path::new("fuzz"));
            }

            #[test]
            fn lines_of_mountinfo_alphabet_never_panic(
                text in proptest::collection::vec(proptest::sample::select(vec![" ", "-", "\\", "\\040", "1", ":", "/", "\n", "x"]), 0..64)
            ) {
                let _ = parse_mountinfo(&text.concat());
            }

            #[test]
            fn escaped_fields_round_trip(
                root in arb_path(), mount_point in arb_path(), source in arb_path(),
                ids in (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
                optional in proptest::collection::vec("(shared|master|propagate_from):[0-9]{1,4}|unbindable", 0..3),
            ) {
                let (mount_id, parent_id, major, minor) = ids;
                let mut fields = vec![
                    mount_id.to_string(), parent_id.to_string(), format!("{major}:{minor}"),
                    escape(root.as_bytes()), escape(mount_point.as_bytes()), "rw,relatime".to_string(),
                ];
                fields.extend(optional);
                fields.extend(["-".to_string(), "ext4".to_string(), escape(source.as_bytes()), "rw".to_string()]);
                let all = parse_mountinfo(&format!("{}\n", fields.join(" "))).unwrap();
                prop_assert_eq!(all.len(), 1);
                let e = &all[0];
                prop_assert_eq!((e.mount_id, e.parent_id, e.major, e.minor), (mount_id, parent_id, major, minor));
                prop_assert_eq!(&e.root, Path::new(&root));
                prop_assert_eq!(&e.mount_point, Path::new(&mount_point));
                prop_assert_eq!(&e.source, &source);
            }
        }
    }
}
