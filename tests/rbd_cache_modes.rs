//! RBD cache modes with a real cluster (support::ceph), the real agent and
//! real builds: a primary commits a protected snapshot at a clean drain; a
//! clone starts from it fully cached, never locks or changes the primary, and
//! is removed at drain; two clones of one commit never see each other's
//! builds; an isolated volume is a new image removed at drain, and an
//! existing image is refused as one; old commits are pruned unless a clone
//! uses them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use nix::sys::signal::Signal;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::ceph::{cluster, Share};
use support::engine::{build_context, buildctl_build, readyz, wait_ready, World};
use support::{loops_backed_under, mounted_under, trace_init, write_private, AgentProcess};

/// The primary's size: a build's cache fits many times, and an export for a checksum stays quick.
const IMAGE_BYTES: u64 = 1 << 30;
/// A drain unmaps, commits or removes an image: seconds here.
const DRAIN_WITHIN: Duration = Duration::from_secs(90);

/// Points `world`'s task at the share's image in `mode` (the builder's key in
/// a 0600 file beside the task, `extra` added to the rbd table) and gives its
/// agent the owner id `owner`, the fuse mapper and `keep_snapshots`.
fn use_rbd(world: &World, share: &Share, owner: &str, mode: &str, extra: &str, keep_snapshots: u32) {
    write_private(&world.root.join("rbd.key"), &share.key);
    let task = std::fs::read_to_string(&world.task).unwrap();
    let file_line = task.lines().find(|l| l.starts_with("file = ")).unwrap().to_string();
    let rbd_line = format!(
        "cache_mode = \"{mode}\"\nrbd = {{ pool = \"{}\", image = \"{}\", client_name = \"client.{}\", key_file = \"rbd.key\", monitors = [\"{}\"]{extra} }}",
        share.pool,
        share.image,
        share.client,
        cluster().monitor_addrs()[0],
    );
    std::fs::write(&world.task, task.replace(&file_line, &rbd_line)).unwrap();
    let config = std::fs::read_to_string(&world.config).unwrap();
    let volume = format!("[volume]\nowner_id = \"{owner}\"\nrbd_mapper = \"fuse\"\nkeep_snapshots = {keep_snapshots}\n");
    std::fs::write(&world.config, config.replace("[volume]\n", &volume)).unwrap();
}

fn size(bytes: u64) -> String {
    format!(", size_bytes = {bytes}")
}

/// Nothing of any image is left on this machine by `world`'s agent: no mount, no loop device.
fn assert_nothing_mapped(world: &World) {
    assert_eq!(mounted_under(&world.root), Vec::<String>::new(), "mounts left under {}", world.root.display());
    assert_eq!(loops_backed_under(&world.root), Vec::<String>::new(), "loop devices left on files under {}", world.root.display());
}

/// The owner ids holding the agents' lock on the image's header object.
fn lock_owners(spec: &str, pool: &str) -> Vec<String> {
    let c = cluster();
    let info: serde_json::Value = serde_json::from_str(&c.run_ok("rbd", &["info", "--format", "json", spec])).unwrap();
    let header = format!("rbd_header.{}", info["id"].as_str().unwrap());
    let held: serde_json::Value =
        serde_json::from_str(&c.run_ok("rados", &["-p", pool, "--format", "json", "lock", "info", &header, "machine-agent"])).unwrap();
    held["lockers"].as_array().unwrap().iter().map(|l| l["cookie"].as_str().unwrap().to_string()).collect()
}

/// The image's snapshots: (name, protected), oldest first.
fn snapshots(spec: &str) -> Vec<(String, bool)> {
    let listed: serde_json::Value = serde_json::from_str(&cluster().run_ok("rbd", &["snap", "ls", "--format", "json", spec])).unwrap();
    listed.as_array().unwrap().iter().map(|s| (s["name"].as_str().unwrap().to_string(), s["protected"] == "true")).collect()
}

/// The images in the pool.
fn images(pool: &str) -> Vec<String> {
    serde_json::from_str(&cluster().run_ok("rbd", &["ls", "--format", "json", pool])).unwrap()
}

/// sha256 of the image's whole contents, read by the admin (`rbd export`).
fn checksum(spec: &str) -> String {
    let conf = cluster().admin_conf().to_str().unwrap().to_string();
    let out = support::ceph::run_bounded(
        Command::new("bash").args(["-c", "set -o pipefail; rbd -c \"$1\" export --no-progress \"$2\" - | sha256sum", "bash", &conf, spec]),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "rbd export {spec}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// SIGTERM and a clean exit (0) within [`DRAIN_WITHIN`].
async fn drain(agent: &mut AgentProcess) {
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(DRAIN_WITHIN).await;
    assert!(status.success(), "drain failed: {status}\n{}", agent.logs());
}

/// Whether buildctl's plain progress shows the Dockerfile's RUN step as cached.
fn run_step_cached(progress: &str) -> bool {
    let Some(step) = progress.lines().find(|l| l.contains("] RUN ")).and_then(|l| l.split(' ').next()) else {
        panic!("no RUN step in the build's progress:\n{progress}")
    };
    progress.lines().any(|l| l.trim() == format!("{step} CACHED"))
}

/// Builds `ctx` on `world`'s engine; buildctl's progress (its stderr).
fn build(world: &World, ctx: &Path) -> String {
    let out = buildctl_build(&world.buildctl_tls_args(true), ctx, &world.root.join(format!("out-{}", support::engine::rand_suffix())));
    let progress = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "build of {} failed: {progress}", ctx.display());
    progress
}

/// A primary run on the share's image: start, build `ctx` (if any), drain.
/// Returns the commit the drain made, named in its log.
async fn primary_run(share: &Share, ctx: Option<&Path>, keep_snapshots: u32) -> (World, String) {
    let world = World::new();
    use_rbd(&world, share, "primary-a", "primary", &size(IMAGE_BYTES), keep_snapshots);
    let mut agent = world.start();
    wait_ready(&agent).await;
    if let Some(ctx) = ctx {
        build(&world, ctx);
        // Built again, cached: BuildKit has recorded the result. A drain at once
        // after a first build was seen (under load) to lose the RUN step's
        // cache record: buildkitd, stopped, writes it no more; not a volume matter.
        let again = build(&world, ctx);
        assert!(run_step_cached(&again), "a rebuild on the primary itself is cached:\n{again}");
    }
    drain(&mut agent).await;
    let line = agent.logs().lines().find(|l| l.contains("committed the primary")).map(String::from);
    let line = line.unwrap_or_else(|| panic!("no commit at a clean drain:\n{}", agent.logs()));
    let snapshot = line.split("snapshot=").nth(1).unwrap().split_whitespace().next().unwrap().trim_matches('"').to_string();
    assert_nothing_mapped(&world);
    (world, snapshot)
}

/// A clone agent (owner `owner`) of the share's primary, ready.
async fn start_clone(share: &Share, owner: &str) -> (World, AgentProcess) {
    let world = World::new();
    use_rbd(&world, share, owner, "clone", "", 2);
    let agent = world.start();
    wait_ready(&agent).await;
    (world, agent)
}

/// The clone image the agent of `world` mounted, from its /readyz.
async fn clone_spec(agent: &AgentProcess) -> String {
    let (_, body) = readyz(&agent.detail_endpoints().await).await;
    body["shared_volumes"][0]["image"].as_str().unwrap_or_else(|| panic!("no shared volume in {body}")).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_of_a_primarys_commit_builds_cached_and_leaves_the_primary_untouched() {
    trace_init();
    let share = Share::new();
    let dir = tempfile::tempdir().unwrap();
    let ctx = build_context(dir.path(), "echo $$-$(cat /proc/sys/kernel/random/uuid) > /unique.txt", 1 << 20);
    let (_primary, snapshot) = primary_run(&share, Some(&ctx), 2).await;
    let snaps = snapshots(&share.spec());
    assert_eq!(snaps, [(snapshot.clone(), true)], "one protected commit after one clean drain");
    assert!(snapshot.starts_with("machine-agent.engine-test."), "named by the task: {snapshot}");
    assert_eq!(lock_owners(&share.spec(), &share.pool), Vec::<String>::new(), "the primary's lock is released after the commit");
    let before = checksum(&share.spec());

    let (clone_world, mut clone) = start_clone(&share, "clone-b").await;
    let spec = clone_spec(&clone).await;
    assert!(spec.starts_with(&format!("{}.clone.", share.spec())), "the clone mounts its own image, not the primary: {spec}");
    assert_eq!(lock_owners(&share.spec(), &share.pool), Vec::<String>::new(), "a clone never takes the primary's lock");
    assert_eq!(lock_owners(&spec, &share.pool), ["clone-b"], "the clone's own image is locked by its owner");
    assert!(!clone.logs().contains("formatting blank device"), "a clone holds the primary's filesystem");
    let progress = build(&clone_world, &ctx);
    assert!(run_step_cached(&progress), "the primary's build is cached on its clone:\n{progress}");
    let new = build(&clone_world, &build_context(&clone_world.root, "echo new > /new.txt", 1 << 20));
    assert!(!run_step_cached(&new), "something new is built on the clone:\n{new}");
    drain(&mut clone).await;
    assert!(clone.logs().contains("removed the disposable image"), "{}", clone.logs());
    assert_nothing_mapped(&clone_world);

    assert_eq!(images(&share.pool), [share.image.as_str()], "the clone's image is gone");
    assert_eq!(snapshots(&share.spec()), snaps, "the primary's commits are as they were");
    assert_eq!(checksum(&share.spec()), before, "the clone's builds never reached the primary");
    assert_eq!(lock_owners(&share.spec(), &share.pool), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clones_of_one_commit_build_at_once_and_never_see_each_others_layers() {
    trace_init();
    let share = Share::new();
    primary_run(&share, None, 2).await;
    let (a_world, mut a) = start_clone(&share, "clone-a").await;
    let (b_world, mut b) = start_clone(&share, "clone-b").await;
    let (a_spec, b_spec) = (clone_spec(&a).await, clone_spec(&b).await);
    assert_ne!(a_spec, b_spec, "each clone has its own image");
    let (a_ctx, b_ctx) = (build_context(&a_world.root, "echo a > /a.txt", 1 << 20), build_context(&b_world.root, "echo b > /b.txt", 1 << 20));
    let (a_ctx2, b_ctx2) = (a_ctx.clone(), b_ctx.clone());
    let (aw, bw) = (&a_world, &b_world);
    let (a_progress, b_progress) = std::thread::scope(|s| {
        let a = s.spawn(move || build(aw, &a_ctx2));
        let b = s.spawn(move || build(bw, &b_ctx2));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(!run_step_cached(&a_progress) && !run_step_cached(&b_progress), "each clone builds its own new layer");
    let crossed = build(&a_world, &b_ctx);
    assert!(!run_step_cached(&crossed), "clone A sees nothing clone B built:\n{crossed}");
    drain(&mut a).await;
    drain(&mut b).await;
    assert_nothing_mapped(&a_world);
    assert_nothing_mapped(&b_world);
    assert_eq!(images(&share.pool), [share.image.as_str()], "both clone images are gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_volume_is_a_new_image_removed_at_drain_and_an_existing_image_is_refused() {
    trace_init();
    let share = Share::new();
    let world = World::new();
    use_rbd(&world, &share, "isolated-a", "isolated", &size(IMAGE_BYTES), 2);
    let mut agent = world.start();
    wait_ready(&agent).await;
    assert!(agent.logs().contains("created the isolated volume's image"), "{}", agent.logs());
    build(&world, &build_context(&world.root, "echo isolated > /out.txt", 1 << 20));
    drain(&mut agent).await;
    assert!(agent.logs().contains("removed the disposable image"), "{}", agent.logs());
    assert_nothing_mapped(&world);
    assert_eq!(images(&share.pool), Vec::<String>::new(), "the isolated image is gone");

    // An image that holds a filesystem (a primary's) is never an isolated volume.
    primary_run(&share, None, 2).await;
    let before = checksum(&share.spec());
    let refused = World::new();
    use_rbd(&refused, &share, "isolated-b", "isolated", &size(IMAGE_BYTES), 2);
    let mut agent = refused.start();
    let line = agent.wait_for_log("volume preparation failed").await;
    assert!(line.contains(&format!("an isolated volume must be a new image: {} already exists", share.spec())), "{line}");
    let (code, body) = readyz(&agent.detail_endpoints().await).await;
    assert_eq!(code, 503, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("must be a new image"), "{body}");
    assert!(!agent.logs().contains("formatting blank device"), "{}", agent.logs());
    assert_nothing_mapped(&refused);
    agent.signal(Signal::SIGTERM);
    agent.wait_exit(DRAIN_WITHIN).await;
    assert_eq!(images(&share.pool), [share.image.as_str()], "the refused image stays");
    assert_eq!(checksum(&share.spec()), before, "the refused image is unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_commits_are_pruned_to_keep_snapshots_except_one_a_live_clone_uses() {
    trace_init();
    let share = Share::new();
    let (_w1, first) = primary_run(&share, None, 2).await;
    let (clone_world, mut clone) = start_clone(&share, "clone-c").await;
    let (_w2, second) = primary_run(&share, None, 2).await;
    let (_w3, third) = primary_run(&share, None, 2).await;
    let names = |snaps: Vec<(String, bool)>| snaps.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    assert_eq!(names(snapshots(&share.spec())), [first.clone(), second.clone(), third.clone()], "the first commit stays: a live clone uses it");

    drain(&mut clone).await;
    assert_nothing_mapped(&clone_world);
    let (_w4, fourth) = primary_run(&share, None, 2).await;
    assert_eq!(names(snapshots(&share.spec())), [third, fourth], "with the clone gone, only the newest two stay");
}
