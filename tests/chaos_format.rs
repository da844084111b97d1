//! An interrupted format is finished, not abandoned: an agent killed during
//! mkfs, or a drain whose deadline cuts mkfs short, leaves a half-written
//! device; the next agent formats it again (its own intent in the state dir
//! says the bytes are its unfinished format) and serves, and the drain that
//! gave up leaves nothing attached or mounted.
//!
//! mkfs is caught in the middle for real: the test stops it (SIGSTOP) as soon
//! as it has written to the device, found as the agent's child right after
//! the agent's own "formatting blank device" line.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;
use support::loopdev::LoopDevice;
use support::{agent, base_config, write_task_file};

/// Large and sparse, so mkfs takes long enough (about half a second) to be caught writing.
const BIG: u64 = 8 << 40;
/// st_blocks counts 512-byte blocks.
const MIB_IN_BLOCKS: u64 = 2048;

/// The pid of the agent's mkfs child, stopped (SIGSTOP) once `backing` has
/// grown by a MiB of written blocks: past mke2fs's first zeroing of old
/// signatures, before its superblock (written last), so the device reads as
/// neither blank nor a filesystem.
async fn stop_mkfs_midway(agent_pid: u32, backing: &Path) -> u32 {
    let blocks_before = std::fs::metadata(backing).unwrap().blocks();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut mkfs = None;
    while tokio::time::Instant::now() < deadline {
        if mkfs.is_none() {
            mkfs = child_named(agent_pid, "mkfs");
        }
        if let Some(pid) = mkfs {
            if std::fs::metadata(backing).unwrap().blocks() > blocks_before + MIB_IN_BLOCKS {
                kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).expect("mkfs still runs when it is stopped");
                return pid;
            }
        }
        // Polling, not waiting on a condition: mkfs says nothing while it writes.
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    panic!("no mkfs child of {agent_pid} wrote to {} within 20 s (mkfs seen: {mkfs:?})", backing.display());
}

/// A child of `parent` whose command name starts with `prefix`.
fn child_named(parent: u32, prefix: &str) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // "pid (comm) state ppid ...": the name may hold spaces, so split after the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let ppid = stat[close + 2..].split(' ').nth(1).and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) && stat[open + 1..close].starts_with(prefix) {
            return Some(pid);
        }
    }
    None
}

async fn wait_gone(pid: u32) {
    support::eventually(&format!("process {pid} to be gone"), Duration::from_secs(10), || !support::process_alive(pid)).await;
}

fn fsck_clean(device: &Path) {
    let out = std::process::Command::new("e2fsck").args(["-f", "-n"]).arg(device).output().unwrap();
    assert!(out.status.success(), "e2fsck -f -n {}: {}{}", device.display(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn an_agent_killed_mid_mkfs_is_followed_by_one_that_formats_again_and_serves() {
    let lo = LoopDevice::new(BIG);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, base_config(dir.path())).unwrap();
    let task = support::device_task_file(dir.path(), &lo.path);

    let mut first = agent(&config).standalone(&task).start();
    first.wait_for_log("formatting blank device").await;
    let mkfs = stop_mkfs_midway(first.pid, &lo.backing).await;
    // What systemd does to the unit when its main process dies: everything in it goes.
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).await;
    kill(Pid::from_raw(mkfs as i32), Signal::SIGKILL).unwrap();
    wait_gone(mkfs).await;
    drop(first);
    let found = machine_agent::volume::signature::read_device_signature(&lo.path).await.unwrap();
    assert!(found.is_some(), "mkfs was stopped after it wrote: the device is not blank");

    let mut second = agent(&config).standalone(&task).start();
    second.wait_for_log_within("to=ready", Duration::from_secs(60)).await;
    assert!(second.logs().contains("did not finish; formatting it again"), "the format was redone, and said so");
    second.signal(Signal::SIGTERM);
    assert!(second.wait_exit(Duration::from_secs(30)).await.success(), "a clean drain");
    fsck_clean(&lo.path);
}

#[tokio::test]
async fn a_drain_that_abandons_mkfs_leaves_nothing_attached_and_the_next_agent_formats_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, base_config(dir.path())).unwrap();
    let task = write_task_file(dir.path(), &dir.path().join("mnt"));
    let text = std::fs::read_to_string(&task).unwrap();
    std::fs::write(&task, text.replace("size_bytes = 1073741824 }", &format!("size_bytes = {BIG} }}"))).unwrap();
    let backing = dir.path().join("cache.img");
    let cache = dir.path().join("mnt/cache");

    let mut first = agent(&config).standalone(&task).start();
    first.wait_for_log("formatting blank device").await;
    let mkfs = stop_mkfs_midway(first.pid, &backing).await;
    first.signal(Signal::SIGTERM);
    let status = first.wait_exit(Duration::from_secs(40)).await;
    assert!(!status.success(), "an abandoned prepare is not a clean drain");
    assert!(first.logs().contains("abandoned the unfinished volume preparation"), "the drain says what it gave up");
    wait_gone(mkfs).await;
    let attached = std::process::Command::new("losetup").arg("-j").arg(&backing).output().unwrap();
    assert!(attached.stdout.is_empty(), "no loop device left on the backing file: {}", String::from_utf8_lossy(&attached.stdout));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(&cache.canonicalize().unwrap_or(cache.clone()).display().to_string()), "nothing mounted at the cache");
    drop(first);

    let mut second = agent(&config).standalone(&task).start();
    second.wait_for_log_within("to=ready", Duration::from_secs(60)).await;
    assert!(second.logs().contains("did not finish; formatting it again"), "the format was redone, and said so");
    second.signal(Signal::SIGTERM);
    assert!(second.wait_exit(Duration::from_secs(30)).await.success(), "a clean drain");
}
