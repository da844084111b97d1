//! Is this device blank? The one question that stands between the agent and
//! formatting a disk full of customers' cache.
//!
//! A device counts as blank only when three independent looks agree:
//! 1. no known on-disk signature at the places each format keeps it
//!    (filesystem superblocks, partition tables, LUKS, swap, LVM, md RAID);
//! 2. every probed byte is zero: the first and the last MiB (where nearly every
//!    format keeps its headers, including the GPT backup and end-of-device RAID
//!    superblocks) and 64 evenly spaced 4 KiB samples across the device, so an
//!    unknown format or a half-wiped disk is still seen as data;
//! 3. `blkid -p` (util-linux's low-level probe, done by the caller) finds nothing.
//!
//! A false "not blank" costs an operator a wipe; a false "blank" loses a cache.
//! Every rule here errs on the first side. This module only reads.

use crate::task::FsType;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The first and last stretch read in full.
const EDGE_BYTES: u64 = 1024 * 1024;
/// Samples spread over the rest of the device.
const SAMPLES: u64 = 64;
const SAMPLE_BYTES: u64 = 4096;

/// What a device holds, as far as the probe can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// A filesystem; the name is what mount(2) calls it ("ext4", "xfs", "btrfs", "vfat"...).
    Filesystem(&'static str),
    /// A partition table ("gpt" or "dos").
    PartitionTable(&'static str),
    Luks,
    Swap,
    LvmPhysicalVolume,
    MdRaid,
    /// No known signature, but non-zero bytes at this offset.
    Data {
        offset: u64,
    },
    /// `blkid -p` found something our own probe did not (its export lines, e.g. "TYPE=zfs_member").
    Blkid(String),
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Filesystem(fs) => write!(f, "a {fs} filesystem"),
            Self::PartitionTable(pt) => write!(f, "a {pt} partition table"),
            Self::Luks => f.write_str("a LUKS header"),
            Self::Swap => f.write_str("a swap signature"),
            Self::LvmPhysicalVolume => f.write_str("an LVM physical volume label"),
            Self::MdRaid => f.write_str("an md RAID superblock"),
            Self::Data { offset } => write!(f, "non-zero data at byte {offset} (unknown format)"),
            Self::Blkid(found) => write!(f, "what blkid reports as {found}"),
        }
    }
}

/// Probes a device (or an image) of `size` bytes. `Ok(None)` means blank.
pub fn probe_signature<R: Read + Seek>(dev: &mut R, size: u64) -> std::io::Result<Option<Signature>> {
    let head = read_at(dev, 0, EDGE_BYTES.min(size))?;
    // btrfs keeps its superblock at 64 KiB, inside the head.
    if let Some(sig) = magic_signature(&head) {
        return Ok(Some(sig));
    }
    let tail_start = size.saturating_sub(EDGE_BYTES).max(head.len() as u64);
    let tail = read_at(dev, tail_start, size - tail_start)?;
    if let Some(i) = head.iter().position(|&b| b != 0) {
        return Ok(Some(Signature::Data { offset: i as u64 }));
    }
    if let Some(i) = tail.iter().position(|&b| b != 0) {
        return Ok(Some(Signature::Data { offset: tail_start + i as u64 }));
    }
    for offset in sample_offsets(size) {
        let sample = read_at(dev, offset, SAMPLE_BYTES.min(size - offset))?;
        if let Some(i) = sample.iter().position(|&b| b != 0) {
            return Ok(Some(Signature::Data { offset: offset + i as u64 }));
        }
    }
    Ok(None)
}

/// Sample offsets between the edges, 4 KiB aligned.
fn sample_offsets(size: u64) -> impl Iterator<Item = u64> {
    let inner = size.saturating_sub(2 * EDGE_BYTES);
    let step = inner / (SAMPLES + 1);
    (1..=SAMPLES).filter(move |_| step >= SAMPLE_BYTES).map(move |i| (EDGE_BYTES + i * step) & !(SAMPLE_BYTES - 1))
}

fn read_at<R: Read + Seek>(dev: &mut R, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    dev.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    dev.take(len).read_to_end(&mut buf)?;
    Ok(buf)
}

fn at(buf: &[u8], offset: usize, magic: &[u8]) -> bool {
    buf.get(offset..offset + magic.len()) == Some(magic)
}

fn u32_le(buf: &[u8], offset: usize) -> u32 {
    buf.get(offset..offset + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Known magics in the first MiB. Filesystems first: a FAT or NTFS boot sector
/// also ends in 0x55AA, and must not be mistaken for a bare MBR.
fn magic_signature(head: &[u8]) -> Option<Signature> {
    // ext2/3/4: superblock at 1024, s_magic 0xEF53 at +56.
    if at(head, 1024 + 56, &[0x53, 0xEF]) {
        const COMPAT_HAS_JOURNAL: u32 = 0x4;
        const INCOMPAT_EXTENTS: u32 = 0x40;
        const INCOMPAT_64BIT: u32 = 0x80;
        const INCOMPAT_FLEX_BG: u32 = 0x200;
        let compat = u32_le(head, 1024 + 0x5C);
        let incompat = u32_le(head, 1024 + 0x60);
        let name = if incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG) != 0 {
            "ext4"
        } else if compat & COMPAT_HAS_JOURNAL != 0 {
            "ext3"
        } else {
            "ext2"
        };
        return Some(Signature::Filesystem(name));
    }
    if at(head, 0, b"XFSB") {
        return Some(Signature::Filesystem("xfs"));
    }
    if at(head, 0x10040, b"_BHRfS_M") {
        return Some(Signature::Filesystem("btrfs"));
    }
    if at(head, 0, b"LUKS\xba\xbe") || at(head, 0x4000, b"SKUL\xba\xbe") {
        return Some(Signature::Luks);
    }
    for page in [4096usize, 8192, 16384, 65536] {
        if at(head, page - 10, b"SWAPSPACE2") || at(head, page - 10, b"SWAP-SPACE") {
            return Some(Signature::Swap);
        }
    }
    if (0..4).any(|sector| at(head, sector * 512, b"LABELONE")) {
        return Some(Signature::LvmPhysicalVolume);
    }
    // md RAID superblocks 1.1 (at 0) and 1.2 (at 4 KiB); 0.90 and 1.0 sit at the end (seen as data).
    if u32_le(head, 0) == 0xa92b_4efc || u32_le(head, 4096) == 0xa92b_4efc {
        return Some(Signature::MdRaid);
    }
    if at(head, 0x8001, b"CD001") {
        return Some(Signature::Filesystem("iso9660"));
    }
    if at(head, 3, b"NTFS    ") {
        return Some(Signature::Filesystem("ntfs"));
    }
    if at(head, 54, b"FAT12   ") || at(head, 54, b"FAT16   ") || at(head, 82, b"FAT32   ") {
        return Some(Signature::Filesystem("vfat"));
    }
    // GPT header at LBA 1, for 512-byte and 4 KiB sectors.
    if at(head, 512, b"EFI PART") || at(head, 4096, b"EFI PART") {
        return Some(Signature::PartitionTable("gpt"));
    }
    if at(head, 510, &[0x55, 0xAA]) {
        return Some(Signature::PartitionTable("dos"));
    }
    None
}

/// Why a device could not be probed. Never read as "blank".
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ProbeError {
    /// cannot read {device} to check it is blank: {source}
    Read {
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// cannot probe {device} with blkid: {source}
    BlkidRun {
        device: PathBuf,
        #[source]
        source: super::tool::ToolError,
    },
    /// blkid -p {device} failed ({status}): {stderr}
    BlkidFailed { device: PathBuf, status: String, stderr: String },
}

/// util-linux's probe; an absolute path so PATH cannot change what runs.
pub const BLKID: &str = "/usr/sbin/blkid";
/// blkid -p reads a few superblock locations; a device that does not answer
/// within this is hung, and the prepare says so instead of waiting forever.
const BLKID_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Probes a block device with our reader, then asks `blkid -p` for a second opinion.
/// `Ok(None)` only when both find nothing.
pub async fn read_device_signature(device: &Path) -> Result<Option<Signature>, ProbeError> {
    let read_err = |source| ProbeError::Read { device: device.into(), source };
    let path = device.to_path_buf();
    let ours = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Signature>> {
        let mut file = std::fs::File::open(&path)?;
        let size = file.seek(SeekFrom::End(0))?;
        probe_signature(&mut std::io::BufReader::new(file), size)
    })
    .await
    .map_err(|e| read_err(std::io::Error::other(e)))?
    .map_err(read_err)?;
    if ours.is_some() {
        return Ok(ours);
    }
    let args = [std::ffi::OsStr::new("-p"), std::ffi::OsStr::new("-o"), std::ffi::OsStr::new("export"), device.as_os_str()];
    let out = super::tool::run_tool_any_exit(Path::new(BLKID), &args, BLKID_TIMEOUT)
        .await
        .map_err(|source| ProbeError::BlkidRun { device: device.into(), source })?;
    parse_blkid_probe(out.status.code(), &String::from_utf8_lossy(&out.stdout)).map_err(|status| ProbeError::BlkidFailed {
        device: device.into(),
        status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// blkid -p exit codes: 0 found (export lines say what), 2 nothing found,
/// 8 ambivalent (several signatures: never blank); anything else is a failure.
fn parse_blkid_probe(code: Option<i32>, stdout: &str) -> Result<Option<Signature>, String> {
    match code {
        Some(2) => Ok(None),
        Some(0) => {
            let found: Vec<&str> = stdout.lines().filter(|l| l.starts_with("TYPE=") || l.starts_with("PTTYPE=") || l.starts_with("USAGE=")).collect();
            Ok(Some(Signature::Blkid(if found.is_empty() { "a signature".into() } else { found.join(" ") })))
        }
        Some(8) => Ok(Some(Signature::Blkid("several signatures (ambivalent probe)".into()))),
        Some(code) => Err(format!("exit code {code}")),
        None => Err("killed by a signal".into()),
    }
}

/// What to do with a device, given what it holds and what the task asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrepareAction {
    /// Blank: create the requested filesystem.
    Format(FsType),
    /// Holds a filesystem the cache can live on: mount it as what it is.
    /// `requested_differs` means the task asked for another type (warn, never reformat).
    Mount { fs_type: &'static str, requested_differs: bool },
    /// Holds something the agent will neither format nor mount.
    Refuse(String),
}

/// The decision table. Pure: every rule has a test.
pub fn plan_prepare(found: Option<&Signature>, requested: FsType) -> PrepareAction {
    match found {
        None => PrepareAction::Format(requested),
        Some(Signature::Filesystem(fs @ ("ext4" | "ext3" | "ext2" | "xfs" | "btrfs"))) => {
            let same_family = match requested {
                FsType::Ext4 => fs.starts_with("ext"),
                FsType::Xfs => *fs == "xfs",
                FsType::Btrfs => *fs == "btrfs",
            };
            PrepareAction::Mount { fs_type: fs, requested_differs: !same_family }
        }
        // The advice must work: the agent formats only a device that reads as zeros where it
        // looks, and `wipefs -a` removes signatures but leaves the bytes around them.
        Some(other) => PrepareAction::Refuse(format!(
            "the device holds {other}; the agent formats only blank devices and mounts only ext4, xfs or btrfs: \
             if its data is not needed, zero it deliberately with `blkdiscard -z <device>` (wipefs -a alone leaves data the agent still sees)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const SIZE: usize = 8 * 1024 * 1024;

    fn image(writes: &[(usize, &[u8])]) -> Cursor<Vec<u8>> {
        let mut img = vec![0u8; SIZE];
        for (offset, bytes) in writes {
            img[*offset..offset + bytes.len()].copy_from_slice(bytes);
        }
        Cursor::new(img)
    }

    fn probe(writes: &[(usize, &[u8])]) -> Option<Signature> {
        probe_signature(&mut image(writes), SIZE as u64).unwrap()
    }

    #[test]
    fn a_zeroed_device_is_blank() {
        assert_eq!(probe(&[]), None);
    }

    #[test]
    fn known_magics_are_named() {
        let ext4_incompat = 0x40u32.to_le_bytes();
        let md_magic = 0xa92b_4efcu32.to_le_bytes();
        type Writes<'a> = Vec<(usize, &'a [u8])>;
        let cases: Vec<(Writes, Signature)> = vec![
            (vec![(1080, &[0x53, 0xEF]), (1024 + 0x60, &ext4_incompat)], Signature::Filesystem("ext4")),
            (vec![(1080, &[0x53, 0xEF])], Signature::Filesystem("ext2")),
            (vec![(0, b"XFSB")], Signature::Filesystem("xfs")),
            (vec![(0x10040, b"_BHRfS_M")], Signature::Filesystem("btrfs")),
            (vec![(0, b"LUKS\xba\xbe")], Signature::Luks),
            (vec![(4086, b"SWAPSPACE2")], Signature::Swap),
            (vec![(512, b"LABELONE")], Signature::LvmPhysicalVolume),
            (vec![(4096, &md_magic)], Signature::MdRaid),
            (vec![(512, b"EFI PART"), (510, &[0x55, 0xAA])], Signature::PartitionTable("gpt")),
            (vec![(510, &[0x55, 0xAA])], Signature::PartitionTable("dos")),
            (vec![(82, b"FAT32   "), (510, &[0x55, 0xAA])], Signature::Filesystem("vfat")),
        ];
        for (writes, want) in cases {
            assert_eq!(probe(&writes), Some(want.clone()), "{want:?}");
        }
    }

    #[test]
    fn any_non_zero_byte_in_the_edges_or_samples_is_data() {
        assert_eq!(probe(&[(777, b"x")]), Some(Signature::Data { offset: 777 }));
        assert_eq!(probe(&[(SIZE - 1, b"x")]), Some(Signature::Data { offset: SIZE as u64 - 1 }));
        // A sample: the first one sits one step past the head.
        let first = usize::try_from(sample_offsets(SIZE as u64).next().unwrap()).unwrap();
        assert_eq!(probe(&[(first + 5, b"x")]), Some(Signature::Data { offset: first as u64 + 5 }));
    }

    #[test]
    fn tiny_devices_are_probed_without_reading_past_the_end() {
        let mut img = Cursor::new(vec![0u8; 1000]);
        assert_eq!(probe_signature(&mut img, 1000).unwrap(), None);
        let mut img = Cursor::new(vec![1u8; 10]);
        assert_eq!(probe_signature(&mut img, 10).unwrap(), Some(Signature::Data { offset: 0 }));
    }

    #[test]
    fn the_plan_formats_only_blank_devices() {
        use PrepareAction::*;
        assert_eq!(plan_prepare(None, FsType::Xfs), Format(FsType::Xfs));
        assert_eq!(plan_prepare(Some(&Signature::Filesystem("ext4")), FsType::Ext4), Mount { fs_type: "ext4", requested_differs: false });
        assert_eq!(plan_prepare(Some(&Signature::Filesystem("ext3")), FsType::Ext4), Mount { fs_type: "ext3", requested_differs: false });
        assert_eq!(plan_prepare(Some(&Signature::Filesystem("xfs")), FsType::Ext4), Mount { fs_type: "xfs", requested_differs: true });
        for refused in [
            Signature::Filesystem("vfat"),
            Signature::PartitionTable("gpt"),
            Signature::Luks,
            Signature::Swap,
            Signature::LvmPhysicalVolume,
            Signature::MdRaid,
            Signature::Data { offset: 3 },
        ] {
            assert!(matches!(plan_prepare(Some(&refused), FsType::Ext4), Refuse(_)), "{refused:?}");
        }
    }

    #[test]
    fn blkid_exit_codes_are_read_conservatively() {
        assert_eq!(parse_blkid_probe(Some(2), ""), Ok(None));
        assert_eq!(
            parse_blkid_probe(Some(0), "DEVNAME=/dev/loop3\nTYPE=zfs_member\nUSAGE=filesystem\n"),
            Ok(Some(Signature::Blkid("TYPE=zfs_member USAGE=filesystem".into())))
        );
        assert!(matches!(parse_blkid_probe(Some(8), ""), Ok(Some(Signature::Blkid(_)))));
        assert!(parse_blkid_probe(Some(4), "").is_err());
        assert!(parse_blkid_probe(None, "").is_err());
    }

    proptest::proptest! {
        #[test]
        fn probing_arbitrary_images_never_panics_and_never_calls_non_zero_blank(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40_000)
        ) {
            let size = bytes.len() as u64;
            let all_zero = bytes.iter().all(|&b| b == 0);
            let found = probe_signature(&mut Cursor::new(bytes), size).unwrap();
            if !all_zero && size <= 2 * EDGE_BYTES {
                proptest::prop_assert!(found.is_some());
            }
        }
    }
}
