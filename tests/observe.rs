//! What the agent shows about the machine while it serves: the health stream
//! carries host and engine resources, /readyz details the volumes, the last
//! sample and the engine, and /metrics has the same figures as gauges.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use support::engine::{readyz, wait_ready, World};
use support::{agent, metric_value};

#[tokio::test]
async fn health_reports_readyz_and_metrics_carry_host_engine_and_volume_figures() {
    let w = World::new();
    let cp = support::control_plane::control_plane().start();
    w.use_control_plane(&cp);
    let agent = agent(&w.config).env("MACHINE_AGENT__AGENT__SAMPLE_INTERVAL_MS", "300").start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    cp.push(support::control_plane::buildkit_task("observe", &w.root.join("mnt")));
    let base = wait_ready(&agent).await;
    let (_, ready) = readyz(&base).await;
    let engine_pid = ready["engine_pid"].as_u64().unwrap();

    let rec = cp
        .wait_for("a health report with host and engine resources", |r| {
            r.health.iter().any(|h| h.host.as_ref().is_some_and(|x| x.memory_total_bytes > 0) && h.engine_resources.is_some())
        })
        .await;
    let report = rec.health.iter().rev().find(|h| h.engine_resources.is_some()).unwrap();
    let host = report.host.as_ref().unwrap();
    assert_eq!(host.memory_total_bytes, support::mem_total_bytes(), "{host:?}");
    assert!(host.memory_available_bytes > 0 && host.memory_available_bytes <= host.memory_total_bytes, "{host:?}");
    assert_eq!(host.cpus as usize, std::thread::available_parallelism().unwrap().get(), "{host:?}");
    assert!((0.0..=1.0).contains(&host.cpu_utilisation), "{host:?}");
    let engine = report.engine_resources.as_ref().unwrap();
    assert_eq!(u64::from(engine.pid), engine_pid, "{engine:?}");
    assert!(engine.processes >= 1, "{engine:?}");
    // buildkitd alone holds well over 10 MiB resident once it serves.
    assert!(engine.rss_bytes > 10 << 20, "{engine:?}");

    let (_, ready) = readyz(&base).await;
    let cache = w.cache();
    let volume = ready["volumes"].as_array().unwrap().iter().find(|v| v["path"] == cache.display().to_string());
    let volume = volume.unwrap_or_else(|| panic!("the cache mount {} is in /readyz: {ready}", cache.display()));
    let fs = nix::sys::statvfs::statvfs(&cache).unwrap();
    assert_eq!(volume["total_inodes"].as_u64(), Some(fs.files()), "{volume}");
    assert!(volume["free_bytes"].as_u64().unwrap() > 0, "{volume}");
    assert_eq!(ready["resources"]["engine"]["pid"].as_u64(), Some(engine_pid), "{ready}");
    assert!(ready["resources"]["host"]["memory_total_bytes"].as_u64().unwrap() > 0, "{ready}");
    assert_eq!(ready["oom_kills_total"].as_u64().map(|n| n < u64::MAX), Some(true), "{ready}");

    let scrape = support::http_get(&base, "/metrics").await.1;
    let series = format!("machine_agent_volume_inodes{{mount=\"{}\"}}", cache.display());
    #[allow(clippy::cast_precision_loss)]
    let inodes = fs.files() as f64;
    assert_eq!(metric_value(&scrape, &series), Some(inodes), "{series} in\n{scrape}");
    #[allow(clippy::cast_precision_loss)]
    let host_memory = support::mem_total_bytes() as f64;
    assert_eq!(metric_value(&scrape, "machine_agent_host_memory_total_bytes"), Some(host_memory), "{scrape}");
    assert!(metric_value(&scrape, "machine_agent_engine_rss_bytes").unwrap() > 10_485_760.0, "{scrape}");
    for attribution in ["engine", "build_step", "other", "unknown", "unattributed"] {
        let series = format!("machine_agent_oom_kills_total{{attribution=\"{attribution}\"}}");
        assert!(metric_value(&scrape, &series).is_some(), "{series} is exported from the start");
    }
}
