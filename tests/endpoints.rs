//! /healthz, /readyz and /metrics over real HTTP, on a standalone agent; the
//! scrape passes `promtool check metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use support::{agent, base_config, http_get, metric_value, trace_init, write_task_file};

/// A standalone agent whose base config is changed by `edit`; returns it with
/// its public and detail endpoints' URLs.
async fn standalone(dir: &tempfile::TempDir, edit: impl FnOnce(String) -> String) -> (support::AgentProcess, String, String) {
    let config = dir.path().join("config.toml");
    std::fs::write(&config, edit(base_config(dir.path()))).unwrap();
    let task = write_task_file(dir.path(), &dir.path().join("mnt"));
    let agent = agent(&config).standalone(&task).start();
    let base = agent.endpoints().await;
    let detail = agent.detail_endpoints().await;
    (agent, base, detail)
}

#[tokio::test]
async fn ready_agent_serves_healthz_readyz_and_promtool_clean_metrics() {
    trace_init();
    let dir = tempfile::tempdir().unwrap();
    let (agent, base, detail) = standalone(&dir, |c| c).await;
    agent.wait_for_log("to=ready").await;

    let (code, body) = http_get(&base, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    let (code, body) = http_get(&detail, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["ready"], true);
    assert_eq!(json["state"], "ready");
    assert_eq!(json["engine"], "running");
    assert_eq!(json["task_id"], "standalone-1");

    let (code, scrape) = http_get(&base, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(metric_value(&scrape, "machine_agent_state{state=\"ready\"}"), Some(1.0));
    assert_eq!(metric_value(&scrape, "machine_agent_state{state=\"starting\"}"), Some(0.0));
    assert!(scrape.contains(&format!("machine_agent_build_info{{arch=\"{}\",version=\"{}\"}} 1", std::env::consts::ARCH, env!("CARGO_PKG_VERSION"))));
    for name in ["machine_agent_control_plane_connected", "machine_agent_control_plane_reconnects_total", "machine_agent_health_reports_sent_total"] {
        assert!(scrape.contains(&format!("# HELP {name} ")), "{name} has HELP");
    }
    support::promtool_check(&scrape);
}

#[tokio::test]
async fn an_engine_that_cannot_start_leaves_the_agent_degraded_with_the_reason() {
    trace_init();
    let dir = tempfile::tempdir().unwrap();
    // Each failed spawn is retried; the third within the window is a crash loop.
    let (agent, base, detail) = standalone(&dir, |c| {
        c.replace(support::BUILDKITD, "/nonexistent/buildkitd").replace("[engine]", "[engine]\nrestart_initial_ms = 20\ncrash_loop_restarts = 3")
    })
    .await;
    agent.wait_for_log("to=degraded").await;

    let (code, body) = http_get(&detail, "/readyz").await;
    assert_eq!(code, 503);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["state"], "degraded");
    assert!(json["reason"].as_str().unwrap().contains("/nonexistent/buildkitd"), "{body}");
    let (code, _) = http_get(&base, "/healthz").await;
    assert_eq!(code, 200, "a degraded agent is still alive");
}
