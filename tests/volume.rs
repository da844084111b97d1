//! The blank-device probe against real loop devices carrying real filesystems,
//! partition tables, LUKS and swap headers made by the real tools: anything
//! that holds data is recognised and never planned for formatting.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::task::FsType;
use machine_agent::volume::signature::{plan_prepare, read_device_signature, PrepareAction, Signature};
use std::io::{Seek, SeekFrom, Write};
use std::process::{Command, Stdio};
use support::loopdev::LoopDevice;

/// Large enough for mkfs.btrfs's minimum and for several probe samples.
const DEVICE_BYTES: u64 = 320 << 20;

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e} (bash .ci/run installs it)"));
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn a_new_sparse_device_is_blank_and_planned_for_formatting() {
    let lo = LoopDevice::new(DEVICE_BYTES);
    let found = read_device_signature(&lo.path).await.unwrap();
    assert_eq!(found, None);
    assert_eq!(plan_prepare(found.as_ref(), FsType::Xfs), PrepareAction::Format(FsType::Xfs));
}

#[tokio::test]
async fn real_filesystems_are_recognised_and_mounted_as_what_they_are() {
    for (fs, requested, differs) in [("ext4", FsType::Ext4, false), ("xfs", FsType::Ext4, true), ("btrfs", FsType::Btrfs, false)] {
        let lo = LoopDevice::new(DEVICE_BYTES);
        lo.mkfs(fs, &[]);
        let found = read_device_signature(&lo.path).await.unwrap();
        let expected = match fs {
            "ext4" => "ext4",
            "xfs" => "xfs",
            _ => "btrfs",
        };
        assert_eq!(found, Some(Signature::Filesystem(expected)), "mkfs.{fs}");
        assert_eq!(
            plan_prepare(found.as_ref(), requested),
            PrepareAction::Mount { fs_type: expected, requested_differs: differs },
            "mkfs.{fs}, task asked for {requested:?}"
        );
    }
}

#[tokio::test]
async fn partition_tables_luks_swap_and_unknown_data_are_refused() {
    type MakeContent = Box<dyn Fn(&LoopDevice)>;
    let cases: Vec<(&str, MakeContent)> = vec![
        ("gpt", Box::new(|lo: &LoopDevice| run("sfdisk", &["--quiet", lo.path.to_str().unwrap()], Some("label: gpt\n,,L\n")))),
        ("dos", Box::new(|lo: &LoopDevice| run("sfdisk", &["--quiet", lo.path.to_str().unwrap()], Some("label: dos\n,,L\n")))),
        ("swap", Box::new(|lo: &LoopDevice| run("mkswap", &[lo.path.to_str().unwrap()], None))),
        (
            "luks",
            Box::new(|lo: &LoopDevice| {
                let key = lo.backing.with_extension("key");
                std::fs::write(&key, "test passphrase").unwrap();
                // pbkdf2 with few iterations: the header is what matters, not its strength.
                run(
                    "cryptsetup",
                    &[
                        "luksFormat",
                        "--batch-mode",
                        "--type",
                        "luks2",
                        "--pbkdf",
                        "pbkdf2",
                        "--pbkdf-force-iterations",
                        "1000",
                        "--key-file",
                        key.to_str().unwrap(),
                        lo.path.to_str().unwrap(),
                    ],
                    None,
                );
            }),
        ),
        (
            "data in the middle",
            Box::new(|lo: &LoopDevice| {
                // 16 MiB of non-zero bytes halfway in: no header anywhere, only data.
                let mut dev = std::fs::OpenOptions::new().write(true).open(&lo.path).unwrap();
                dev.seek(SeekFrom::Start(DEVICE_BYTES / 2)).unwrap();
                dev.write_all(&vec![0xA5u8; 16 << 20]).unwrap();
                dev.sync_all().unwrap();
            }),
        ),
    ];
    for (what, make) in cases {
        let lo = LoopDevice::new(DEVICE_BYTES);
        make(&lo);
        let found = read_device_signature(&lo.path).await.unwrap();
        let found = found.unwrap_or_else(|| panic!("{what}: probed as blank"));
        match (what, &found) {
            ("gpt", Signature::PartitionTable("gpt"))
            | ("dos", Signature::PartitionTable("dos"))
            | ("swap", Signature::Swap)
            | ("luks", Signature::Luks)
            | ("data in the middle", Signature::Data { .. }) => {}
            _ => panic!("{what}: probed as {found:?}"),
        }
        let plan = plan_prepare(Some(&found), FsType::Ext4);
        assert!(matches!(plan, PrepareAction::Refuse(ref why) if why.contains("wipefs")), "{what}: {plan:?}");
    }
}

/// Runs a planned mkfs the way the volume manager will: stdin closed, so a tool that asks cannot be answered.
fn run_mkfs(fs: FsType, device: &std::path::Path) -> std::process::Output {
    let line = machine_agent::volume::format::mkfs_command(fs, device, None);
    Command::new(&line.program).args(&line.args).stdin(Stdio::null()).output().unwrap()
}

#[tokio::test]
async fn planned_mkfs_formats_a_blank_device_with_the_requested_type() {
    for (fs, name) in [(FsType::Ext4, "ext4"), (FsType::Xfs, "xfs"), (FsType::Btrfs, "btrfs")] {
        let lo = LoopDevice::new(DEVICE_BYTES);
        let out = run_mkfs(fs, &lo.path);
        assert!(out.status.success(), "mkfs {name}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(read_device_signature(&lo.path).await.unwrap(), Some(Signature::Filesystem(name)));
    }
}

#[tokio::test]
async fn planned_xfs_and_btrfs_mkfs_refuse_a_device_that_already_holds_a_filesystem() {
    // The last line of defence, should the probe ever be wrong: no force flag,
    // so mkfs.xfs and mkfs.btrfs refuse to overwrite what they recognise, and the
    // UUID stays. (mke2fs overwrites without a terminal: for ext4 the probe is the guard.)
    for (existing, requested) in [("ext4", FsType::Xfs), ("ext4", FsType::Btrfs), ("xfs", FsType::Btrfs), ("btrfs", FsType::Xfs)] {
        let lo = LoopDevice::new(DEVICE_BYTES);
        lo.mkfs(existing, &[]);
        let uuid = lo.uuid();
        assert!(!uuid.is_empty());
        let out = run_mkfs(requested, &lo.path);
        assert!(!out.status.success(), "mkfs {requested:?} overwrote {existing} without being forced");
        assert_eq!(lo.uuid(), uuid, "{existing} superblock unchanged after a refused mkfs {requested:?}");
    }
}
