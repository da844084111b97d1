//! The Ceph monitors are down when a builder prepares its RBD cache volume:
//! the agent waits a bounded time per try, says why it is degraded, leaves
//! nothing half-mapped, and recovers on its own once the monitors are back.
//! A test binary of its own: stopping the monitor would stall every other
//! test sharing the binary's cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use nix::sys::signal::Signal;
use std::path::Path;
use std::time::Duration;
use support::ceph::{cluster, unique_name};
use support::engine::{wait_ready, World};
use support::{trace_init, write_private};

/// Restarts the monitor if the test stops before it does.
struct MonitorBack;

impl Drop for MonitorBack {
    fn drop(&mut self) {
        if cluster().monitor_pid().is_none() {
            cluster().start_monitor();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitors_down_at_prepare_degrade_with_a_clear_error_and_the_agent_recovers_when_they_return() {
    trace_init();
    let c = cluster();
    let pool = unique_name("pool");
    c.create_pool(&pool);
    let client = unique_name("builder");
    let key = c.create_client(&client, &pool);
    let image = unique_name("cache");
    c.create_image(&pool, &image, 2 << 30);

    let w = World::new();
    write_private(&w.root.join("rbd.key"), &key);
    let task = std::fs::read_to_string(&w.task).unwrap();
    let file_line = task.lines().find(|l| l.starts_with("file = ")).unwrap().to_string();
    let rbd_line = format!(
        "rbd = {{ pool = \"{pool}\", image = \"{image}\", client_name = \"client.{client}\", key_file = \"rbd.key\", monitors = [\"{}\"] }}",
        c.monitor_addrs()[0]
    );
    std::fs::write(&w.task, task.replace(&file_line, &rbd_line)).unwrap();
    let config = std::fs::read_to_string(&w.config).unwrap();
    std::fs::write(&w.config, config.replace("[volume]\n", "[volume]\nowner_id = \"builder-a\"\nrbd_mapper = \"fuse\"\n")).unwrap();

    c.stop_monitor();
    let _back = MonitorBack;
    let mut agent = w.start();
    // Each try is bounded by the client timeouts the agent's ceph.conf sets.
    let line = agent.wait_for_log_within("volume preparation failed", Duration::from_secs(90)).await;
    assert!(line.contains(&format!("{pool}/{image}")), "the error names the image: {line}");
    assert!(line.contains("rbd"), "the error quotes the Ceph tool that failed: {line}");
    agent.wait_for_log("to=degraded").await;
    let fuse_dir = w.root.join("state/rbd/fuse");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).any(|p| Path::new(p).starts_with(&w.root)),
        "nothing is mounted while the monitors are down"
    );
    assert!(!fuse_dir.exists() || std::fs::read_dir(&fuse_dir).unwrap().all(|e| !e.unwrap().path().join(&image).exists()), "no rbd-fuse mount is left");

    c.start_monitor();
    // The retry schedule (1 s doubling to 60 s) brings it back without a human.
    wait_ready(&agent).await;
    assert!(agent.logs().contains("RBD image mapped"), "{}", agent.logs());

    agent.signal(Signal::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(60)).await.success(), "{}", agent.logs());
}
