//! Ceph RBD cache volumes with a real cluster (one per test binary, see
//! support::ceph) and the real agent: a blank image is created, formatted once,
//! mounted and serves a build, then comes back with its data; two builders
//! (or two agents on one machine) never mount one image; a task that names a dead builder takes its image
//! over and fences it; bad input and a mapper this kernel lacks are clear
//! errors that leave nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::ceph::{cluster, Share};
use support::engine::{build_context, buildctl_build, readyz, wait_ready, World};
use support::{loops_backed_under, mounted_under, trace_init, write_private};

/// An image the agent may create: small, a build's cache fits many times.
const IMAGE_BYTES: u64 = 2 << 30;

/// Points `world`'s task at the share's image (the builder's key in a 0600
/// file beside the task, `extra` added to the rbd table) and gives its agent
/// the owner id `owner` and mapper `mapper`.
fn use_rbd(world: &World, share: &Share, owner: &str, mapper: &str, extra: &str) {
    write_private(&world.root.join("rbd.key"), &share.key);
    let task = std::fs::read_to_string(&world.task).unwrap();
    let file_line = task.lines().find(|l| l.starts_with("file = ")).unwrap().to_string();
    let rbd_line = format!(
        "rbd = {{ pool = \"{}\", image = \"{}\", client_name = \"client.{}\", key_file = \"rbd.key\", monitors = [\"{}\"]{extra} }}",
        share.pool,
        share.image,
        share.client,
        cluster().monitor_addrs()[0], // v2, which a plain host:port means
    );
    std::fs::write(&world.task, task.replace(&file_line, &rbd_line)).unwrap();
    let config = std::fs::read_to_string(&world.config).unwrap();
    std::fs::write(&world.config, config.replace("[volume]\n", &format!("[volume]\nowner_id = \"{owner}\"\nrbd_mapper = \"{mapper}\"\n"))).unwrap();
}

/// Where the agent of `world` keeps an image's fuse mount and credentials.
fn rbd_dir(world: &World) -> PathBuf {
    world.root.join("state/rbd")
}

/// Nothing of the image is left on this machine by `world`'s agent: no
/// mount, no loop device, no fuse mount, no key.
fn assert_nothing_mapped(world: &World) {
    assert_eq!(mounted_under(&world.root), Vec::<String>::new(), "mounts left under {}", world.root.display());
    assert_eq!(loops_backed_under(&world.root), Vec::<String>::new(), "loop devices left on files under {}", world.root.display());
    let keys: Vec<PathBuf> = walk(&rbd_dir(world)).into_iter().filter(|p| p.file_name().is_some_and(|n| n == "keyring" || n == "ceph.conf")).collect();
    assert_eq!(keys, Vec::<PathBuf>::new(), "credentials left behind");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

/// The owner ids holding the agents' lock on the image's header object.
fn lock_owners(share: &Share) -> Vec<String> {
    let c = cluster();
    let info: serde_json::Value = serde_json::from_str(&c.run_ok("rbd", &["info", "--format", "json", &share.spec()])).unwrap();
    let header = format!("rbd_header.{}", info["id"].as_str().unwrap());
    let held: serde_json::Value =
        serde_json::from_str(&c.run_ok("rados", &["-p", &share.pool, "--format", "json", "lock", "info", &header, "machine-agent"])).unwrap();
    held["lockers"].as_array().unwrap().iter().map(|l| l["cookie"].as_str().unwrap().to_string()).collect()
}

/// Writes `bytes` of random data to `path` and syncs it to the device; the data.
fn write_synced(path: &Path, bytes: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    let mut file = std::fs::File::create(path).unwrap();
    std::io::Write::write_all(&mut file, &data).unwrap();
    file.sync_all().unwrap();
    data
}

/// The file holds exactly `data` (compared whole, not printed).
fn assert_holds(path: &Path, data: &[u8], what: &str) {
    let found = std::fs::read(path).unwrap_or_else(|e| panic!("{what}: cannot read {}: {e}", path.display()));
    assert!(found == data, "{what}: {} holds {} bytes that differ from the {} written", path.display(), found.len(), data.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_image_is_created_formatted_once_serves_a_build_and_comes_back_with_its_data() {
    trace_init();
    let share = Share::new();
    let first = World::new();
    use_rbd(&first, &share, "builder-a", "auto", &format!(", size_bytes = {IMAGE_BYTES}"));
    let mut agent = first.start();
    let detail = wait_ready(&agent).await;
    let logs = agent.logs();
    assert!(logs.contains("created the RBD image"), "the agent creates an absent image the task gives a size for");
    assert_eq!(logs.matches("formatting blank device").count(), 1, "formatted exactly once");
    assert!(logs.contains("mapper=\"fuse\""), "this kernel has neither rbd nor nbd: auto chooses rbd-fuse");
    let (_, body) = readyz(&detail).await;
    let shared = &body["shared_volumes"][0];
    assert_eq!(shared["image"], share.spec().as_str(), "{body}");
    assert_eq!(shared["mapper"], "fuse", "{body}");
    assert_eq!(shared["owner_id"], "builder-a", "{body}");
    assert_eq!(lock_owners(&share), ["builder-a"], "the image is locked under the owner id");

    // A real build over mTLS, its cache on the image.
    let ctx = build_context(&first.root, "echo rbd > /out.txt", 1 << 20);
    let out = buildctl_build(&first.buildctl_tls_args(true), &ctx, &first.root.join("out"));
    assert!(out.status.success(), "build on the RBD cache failed: {}", String::from_utf8_lossy(&out.stderr));
    let marker = write_synced(&first.cache().join("marker"), 4 << 20);

    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "drain failed: {status}\n{}", agent.logs());
    assert!(agent.logs().contains("RBD image unmapped and its lock released"), "{}", agent.logs());
    assert_nothing_mapped(&first);
    assert_eq!(lock_owners(&share), Vec::<String>::new(), "the lock is released at drain");

    // A second run (another builder's agent, the same owner id) finds the data and formats nothing.
    let second = World::new();
    use_rbd(&second, &share, "builder-a", "auto", "");
    let agent = second.start();
    wait_ready(&agent).await;
    assert!(!agent.logs().contains("formatting blank device"), "an image that holds a filesystem is never formatted");
    assert_holds(&second.cache().join("marker"), &marker, "the data written before the drain is there");
    let mut agent = agent;
    agent.signal(Signal::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(60)).await.success(), "{}", agent.logs());
    assert_nothing_mapped(&second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_builders_given_one_image_never_both_mount_it() {
    trace_init();
    let share = Share::new();
    cluster().create_image(&share.pool, &share.image, IMAGE_BYTES);
    let a = World::new();
    use_rbd(&a, &share, "builder-a", "fuse", "");
    let mut first = a.start();
    wait_ready(&first).await;
    std::fs::write(a.cache().join("owned-by"), "a").unwrap();

    let b = World::new();
    use_rbd(&b, &share, "builder-b", "fuse", "");
    let mut second = b.start();
    let line = second.wait_for_log("volume preparation failed").await;
    assert!(line.contains("is locked by owner builder-a"), "the refusal names the holder: {line}");
    let detail = second.detail_endpoints().await;
    let (code, body) = readyz(&detail).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["state"], "degraded", "{body}");
    assert!(body["reason"].as_str().unwrap().contains("owner builder-a"), "{body}");
    assert_nothing_mapped(&b);
    assert_eq!(lock_owners(&share), ["builder-a"], "the holder keeps its lock");

    // A second agent on the holder's own machine (another state dir, the same owner id) refuses too.
    let twin = World::new();
    use_rbd(&twin, &share, "builder-a", "fuse", "");
    let mut third = twin.start();
    let line = third.wait_for_log("volume preparation failed").await;
    assert!(line.contains("held by another machine-agent on this machine"), "{line}");
    assert_nothing_mapped(&twin);

    for agent in [&mut third, &mut second, &mut first] {
        agent.signal(Signal::SIGTERM);
        assert!(agent.wait_exit(Duration::from_secs(60)).await.success(), "{}", agent.logs());
    }
    assert_nothing_mapped(&a);
    let (fsck, _) = fsck_image(&share, 0);
    assert!(fsck.status.success(), "the image's filesystem is clean: {}", String::from_utf8_lossy(&fsck.stdout));
}

/// An rbd-fuse mount the test made, unmounted on drop (rbd-fuse then exits).
struct FuseMount(PathBuf);

impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

/// `e2fsck -fn` of the image's filesystem, read through an rbd-fuse mount of
/// the admin's own and a read-only loop device, and the image's 4 KiB block
/// number `block`; everything undone after.
fn fsck_image(share: &Share, block: u64) -> (std::process::Output, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster();
    let fuse = Command::new("rbd-fuse")
        .args(["-c", c.admin_conf().to_str().unwrap(), "-p", &share.pool, "-r", &share.image, dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(fuse.status.success(), "rbd-fuse: {}", String::from_utf8_lossy(&fuse.stderr));
    let file = dir.path().join(&share.image);
    let _unmount = FuseMount(dir.path().to_path_buf());
    let lo = Command::new("losetup").args(["--find", "--show", "--read-only"]).arg(&file).output().unwrap();
    assert!(lo.status.success(), "losetup: {}", String::from_utf8_lossy(&lo.stderr));
    let device = String::from_utf8_lossy(&lo.stdout).trim().to_string();
    let fsck = Command::new("e2fsck").args(["-f", "-n", &device]).output().unwrap();
    let detach = Command::new("losetup").args(["-d", &device]).output().unwrap();
    assert!(detach.status.success(), "losetup -d {device}");
    let mut contents = vec![0u8; 4096];
    let image = std::fs::File::open(&file).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&image, &mut contents, block * 4096).unwrap();
    (fsck, contents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_names_a_dead_builder_fences_it_and_takes_its_image_with_the_synced_data() {
    trace_init();
    let share = Share::new();
    cluster().create_image(&share.pool, &share.image, IMAGE_BYTES);
    let a = World::new();
    use_rbd(&a, &share, "builder-a", "fuse", "");
    let first = a.start();
    wait_ready(&first).await;
    let marker = write_synced(&a.cache().join("marker"), 4 << 20);
    let a_fuse = walk(&rbd_dir(&a).join("fuse")).into_iter().find(|p| p.join(&share.image).exists()).expect("builder A's rbd-fuse mount");
    let _abort_a = FuseAbort(a_fuse.clone());

    // Builder A dies: its agent and engine are SIGKILLed, its Ceph client
    // (rbd-fuse) runs on, holding the image open. On a real fleet A's kernel
    // is on another machine; here its filesystem and loop device come off
    // first, because I/O a fence leaves hanging on this machine's loop
    // devices would stall every losetup here, builder B's included.
    first.signal(Signal::SIGKILL);
    support::cleanup_engine_of(&a.root);
    unmount_and_detach_filesystems_under(&a.root);

    let b = World::new();
    use_rbd(&b, &share, "builder-b", "fuse", ", take_over_from = \"builder-a\"");
    let mut second = b.start();
    let detail = wait_ready(&second).await;
    assert!(second.logs().contains("blocklisted the previous owner's clients"), "{}", second.logs());
    assert_holds(&b.cache().join("marker"), &marker, "the dead builder's synced data is intact");
    let (_, body) = readyz(&detail).await;
    assert_eq!(body["shared_volumes"][0]["took_over_from"], "builder-a", "{body}");
    assert_eq!(lock_owners(&share), ["builder-b"]);

    // A's client can no longer write: a write through its rbd-fuse fails, or
    // waits in the kernel until its FUSE connection is aborted, and the block
    // it aimed at is untouched.
    let last_block = IMAGE_BYTES / 4096 - 1;
    let mut write = Command::new("dd")
        .args(["if=/dev/urandom", "bs=4096", "count=1", "oflag=direct,sync", "conv=notrunc"])
        .arg(format!("of={}", a_fuse.join(&share.image).display()))
        .arg(format!("seek={last_block}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut status = write.try_wait().unwrap();
    while status.is_none() && tokio::time::Instant::now() < deadline {
        // Polling a child's exit: std has no async reaping.
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = write.try_wait().unwrap();
    }
    if status.is_none() {
        // Waiting in request_wait_answer, past even SIGKILL: only an abort ends it.
        abort_fuse(&a_fuse);
    }
    let status = write.wait().unwrap();
    assert!(!status.success(), "a write through the fenced builder's client succeeded");

    second.signal(Signal::SIGTERM);
    assert!(second.wait_exit(Duration::from_secs(60)).await.success(), "{}", second.logs());
    assert_nothing_mapped(&b);
    let (fsck, last) = fsck_image(&share, last_block);
    assert!(fsck.status.success(), "the image's filesystem is clean after the take-over: {}", String::from_utf8_lossy(&fsck.stdout));
    assert!(last.iter().all(|&b| b == 0), "the fenced builder's write reached the image");
}

/// Unmounts what an agent mounted under `dir` (not its rbd-fuse mounts) and
/// detaches the loop devices on files under it.
fn unmount_and_detach_filesystems_under(dir: &Path) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut points: Vec<(String, String)> = mountinfo
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let fs = fields.iter().skip_while(|f| **f != "-").nth(1)?;
            Some((fields.get(4)?.to_string(), fs.to_string()))
        })
        .filter(|(p, fs)| Path::new(p).starts_with(dir) && !fs.starts_with("fuse"))
        .collect();
    points.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    for (point, _) in points {
        let out = Command::new("umount").arg(&point).output().unwrap();
        assert!(out.status.success(), "umount {point}: {}", String::from_utf8_lossy(&out.stderr));
    }
    for name in loops_backed_under(dir) {
        let out = Command::new("losetup").args(["-d", &format!("/dev/{name}")]).output().unwrap();
        assert!(out.status.success(), "losetup -d /dev/{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Aborts the FUSE connection of a mount on drop: a fenced rbd-fuse can keep
/// requests waiting forever, and only an abort (fusectl) ends them.
struct FuseAbort(PathBuf);

impl Drop for FuseAbort {
    fn drop(&mut self) {
        abort_fuse(&self.0);
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

/// Aborts the FUSE connection of the mount at `mount_point` (fusectl mounted if need be).
fn abort_fuse(mount_point: &Path) {
    let connections = Path::new("/sys/fs/fuse/connections");
    // The connection's number is the mount's minor device number, from mountinfo
    // (a stat of the mount point would itself wait on the stuck daemon).
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some(minor) = mountinfo
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.get(4).is_some_and(|p| Path::new(p) == mount_point))
        .and_then(|f| f.get(2).and_then(|dev| dev.split(':').nth(1)).map(str::to_string))
    else {
        return;
    };
    let mounted_here = std::fs::read_dir(connections).map_or(true, |mut d| d.next().is_none())
        && Command::new("mount").args(["-t", "fusectl", "fusectl"]).arg(connections).output().is_ok_and(|o| o.status.success());
    let _ = std::fs::write(connections.join(minor).join("abort"), "1");
    if mounted_here {
        let _ = Command::new("umount").arg(connections).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_an_unknown_pool_or_a_missing_image_is_a_clear_error_that_leaves_nothing() {
    trace_init();
    let share = Share::new();
    cluster().create_image(&share.pool, &share.image, IMAGE_BYTES);
    type Spoil<'a> = Box<dyn Fn(&World) + 'a>;
    let cases: [(&str, Spoil, &str); 3] = [
        ("wrong key", Box::new(|w: &World| write_private(&w.root.join("rbd.key"), "AQAA8VNlAAAAABAAAAECAwQFBgcICQoLDA0ODw==")), "couldn't connect"),
        (
            "unknown pool",
            Box::new(|w: &World| {
                let task = std::fs::read_to_string(&w.task).unwrap();
                std::fs::write(&w.task, task.replace(&format!("pool = \"{}\"", share.pool), "pool = \"no-such-pool\"")).unwrap();
            }),
            "error opening pool",
        ),
        (
            "missing image",
            Box::new(|w: &World| {
                let task = std::fs::read_to_string(&w.task).unwrap();
                std::fs::write(&w.task, task.replace(&format!("image = \"{}\"", share.image), "image = \"no-such-image\"")).unwrap();
            }),
            "does not exist and the task gives no size_bytes",
        ),
    ];
    for (case, spoil, expected) in cases {
        let w = World::new();
        use_rbd(&w, &share, "builder-a", "fuse", "");
        spoil(&w);
        assert_prepare_fails_leaving_nothing(&w, case, expected).await;
    }
    assert_eq!(lock_owners(&share), Vec::<String>::new(), "no failed attach left a lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapper_this_kernel_lacks_is_a_clear_error_that_leaves_nothing() {
    trace_init();
    let share = Share::new();
    cluster().create_image(&share.pool, &share.image, IMAGE_BYTES);
    for (mapper, expected) in [("krbd", "rbd kernel module not available"), ("nbd", "nbd kernel module not available")] {
        let w = World::new();
        use_rbd(&w, &share, "builder-a", mapper, "");
        assert_prepare_fails_leaving_nothing(&w, mapper, expected).await;
    }
    assert_eq!(lock_owners(&share), Vec::<String>::new(), "a mapper refused before anything was locked");
    // `auto` on this kernel: rbd-fuse (asserted by the first test of this file).
}

/// Starts `w`'s agent, waits for its prepare to fail with `expected` in the
/// error, checks that nothing of the image is left mapped, and stops it.
async fn assert_prepare_fails_leaving_nothing(w: &World, case: &str, expected: &str) {
    let mut agent = w.start();
    let line = agent.wait_for_log("volume preparation failed").await;
    assert!(line.contains(expected), "{case}: expected {expected:?} in {line}");
    assert_nothing_mapped(w);
    agent.signal(Signal::SIGTERM);
    agent.wait_exit(Duration::from_secs(30)).await;
}
