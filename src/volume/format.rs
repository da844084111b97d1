//! How a blank device is formatted and how a filesystem is mounted, as pure
//! data: the mkfs command line for each filesystem and the mount(2) flags and
//! data string for a task's options. The volume manager runs them.
//!
//! mkfs is never given a force flag (`-f`) over a device the probe found
//! blank: should the probe ever be wrong, mkfs.xfs and mkfs.btrfs refuse to
//! overwrite a signature they recognise. mke2fs is no such net: run without a
//! terminal it overwrites without asking (seen with e2fsprogs 1.47), so for
//! ext4 the probe, run again just before mkfs, is the only guard. The one
//! exception is [`CommandLine::overwriting`]: redoing the agent's own
//! interrupted format of the same device, whose half-written signature mkfs
//! would otherwise refuse.

use crate::task::FsType;
use nix::mount::MsFlags;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// A command to run: an absolute program path and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl CommandLine {
    /// The same mkfs, told to overwrite what it finds: only for the agent's own
    /// unfinished format of this very device (an intent in the state dir says so).
    pub fn overwriting(mut self, fs: FsType) -> Self {
        let force = match fs {
            FsType::Ext4 => "-F",
            FsType::Xfs | FsType::Btrfs => "-f",
        };
        self.args.insert(0, force.into());
        self
    }
}

/// The mkfs invocation for a blank device. `ext4_bytes_per_inode` (mkfs.ext4
/// `-i`) sets how many inodes an ext4 gets; None keeps mkfs's default (one per
/// 16 KiB). xfs and btrfs allocate inodes dynamically and ignore it.
pub fn mkfs_command(fs: FsType, device: &Path, ext4_bytes_per_inode: Option<u64>) -> CommandLine {
    let (program, args): (&str, &[&str]) = match fs {
        // -m 0: no blocks reserved for root, the cache is the only user.
        // Lazy inode table and journal init: a 100 GiB volume is usable in
        // seconds; the kernel zeroes the rest in the background.
        // nodiscard: NVMe and EBS start zeroed, and a full-device discard can take minutes.
        FsType::Ext4 => ("/usr/sbin/mkfs.ext4", &["-q", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]),
        // -K: no discard at mkfs (as above). reflink=0: the overlayfs snapshotter
        // does not use it, and it costs metadata space and mount time.
        FsType::Xfs => ("/usr/sbin/mkfs.xfs", &["-q", "-K", "-m", "reflink=0"]),
        FsType::Btrfs => ("/usr/sbin/mkfs.btrfs", &["-q", "-K"]),
    };
    let mut args: Vec<OsString> = args.iter().map(OsString::from).collect();
    if let (FsType::Ext4, Some(ratio)) = (fs, ext4_bytes_per_inode) {
        args.extend(["-i".into(), ratio.to_string().into()]);
    }
    args.push(device.as_os_str().to_owned());
    CommandLine { program: program.into(), args }
}

/// The mount(2) flags and filesystem data string for a task's options (already
/// checked against the task allow-list). Flags the kernel takes as bits go in
/// `flags`; the rest are filesystem options passed through as data.
pub fn mount_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = vec![];
    for option in options {
        match option.as_str() {
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "lazytime" => flags |= MsFlags::MS_LAZYTIME,
            other => data.push(other),
        }
    }
    // Never exec, setuid or device files from the cache: build steps run in
    // their own rootfs, and nothing on this volume should run on the host.
    flags |= MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    (flags, data.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(c: &CommandLine) -> Vec<String> {
        c.args.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn mkfs_lines_never_force_and_end_with_the_device() {
        for fs in [FsType::Ext4, FsType::Xfs, FsType::Btrfs] {
            let c = mkfs_command(fs, Path::new("/dev/nvme1n1"), Some(4096));
            assert!(c.program.is_absolute());
            assert!(c.program.ends_with(format!("mkfs.{}", fs.as_str())));
            let a = args(&c);
            assert_eq!(a.last().map(String::as_str), Some("/dev/nvme1n1"));
            assert!(!a.iter().any(|x| x == "-F" || x == "-f" || x == "--force"), "{fs:?}: {a:?}");
        }
        assert_eq!(args(&mkfs_command(FsType::Ext4, Path::new("/dev/x"), None))[1..5], ["-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]);
        assert!(args(&mkfs_command(FsType::Xfs, Path::new("/dev/x"), None)).contains(&"reflink=0".to_string()));
    }

    #[test]
    fn the_inode_ratio_reaches_mkfs_ext4_only() {
        let ext4 = args(&mkfs_command(FsType::Ext4, Path::new("/dev/x"), Some(131_072)));
        assert_eq!(ext4[ext4.len() - 3..], ["-i", "131072", "/dev/x"]);
        assert!(!args(&mkfs_command(FsType::Ext4, Path::new("/dev/x"), None)).contains(&"-i".to_string()));
        for fs in [FsType::Xfs, FsType::Btrfs] {
            assert!(!args(&mkfs_command(fs, Path::new("/dev/x"), Some(131_072))).contains(&"-i".to_string()), "{fs:?}");
        }
    }

    #[test]
    fn atime_options_become_flags_and_the_rest_data() {
        let (flags, data) = mount_options(&["noatime".into(), "prjquota".into(), "commit=30".into()]);
        assert!(flags.contains(MsFlags::MS_NOATIME | MsFlags::MS_NOSUID | MsFlags::MS_NODEV));
        assert_eq!(data, "prjquota,commit=30");
        let (flags, data) = mount_options(&[]);
        assert_eq!(flags, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        assert_eq!(data, "");
    }
}
