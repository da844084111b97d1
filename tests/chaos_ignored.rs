//! Say what you ignore: a task re-sent under the running task's id with other
//! content is a warning that names what differs (never the values) and a
//! conflict the control plane hears of on the health stream; a flood of
//! invalid task messages is counted in full but logged at a bounded rate,
//! with the number suppressed, while the agent keeps answering.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use machine_agent::proto::v1 as pb;
use std::time::Duration;
use support::control_plane::{buildkit_task, control_plane};
use support::engine::{readyz, wait_ready, World};
use support::{agent, eventually, http_get, metric_value, TestPki};

const CONFLICT_WARNING: &str = "re-sent under the running task's id with other content";
const REJECTED: &str = "task rejected";

fn conflict_of(report: &pb::HealthReport) -> Option<&pb::TaskConflict> {
    report.task_conflict.as_ref()
}

#[tokio::test]
async fn a_task_resent_under_its_id_with_other_content_is_one_warning_naming_the_fields_and_reaches_the_control_plane() {
    let w = World::new();
    let cp = control_plane().start();
    w.use_control_plane(&cp);
    let agent = agent(&w.config).start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    let running = buildkit_task("same-id", &w.root.join("mnt"));
    cp.push(running.clone());
    let base = wait_ready(&agent).await;
    let (_, before) = readyz(&base).await;

    // The same task again (a reconnect's resend) is nothing to report.
    cp.push(running.clone());
    // Other TLS material and mount options under the same id.
    let pb::register_response::Task::Buildkit(mut changed) = running.clone() else { unreachable!() };
    let other = TestPki::new("another engine ca");
    changed.tls = Some(pb::TlsMaterial { cert_pem: other.server_cert_pem.clone(), key_pem: other.server_key_pem.clone(), ca_pem: other.ca_pem.clone() });
    changed.mounts[0].options.push("lazytime".into());
    let changed = pb::register_response::Task::Buildkit(changed);
    cp.push(changed.clone());

    let line = agent.wait_for_log(CONFLICT_WARNING).await;
    assert!(line.contains("WARN"), "said at warn: {line}");
    for field in ["buildkit.tls.cert_pem", "buildkit.tls.key_pem", "buildkit.tls.ca_pem", "buildkit.mounts[0].options"] {
        assert!(line.contains(field), "the warning names {field}: {line}");
    }
    assert!(!line.contains("listen_address") && !line.contains("cache_size"), "only what differs is named: {line}");
    let rec = cp.wait_for("the conflict in the health stream", |r| r.health.last().and_then(conflict_of).is_some()).await;
    let conflict = conflict_of(rec.health.last().unwrap()).unwrap().clone();
    assert_eq!(conflict.task_id, "same-id");
    assert_eq!(conflict.differing_fields, ["buildkit.tls.cert_pem", "buildkit.tls.key_pem", "buildkit.tls.ca_pem", "buildkit.mounts[0].options"]);
    assert_eq!(conflict.count, 1, "the identical resend is no conflict: {conflict:?}");
    assert!(conflict.last_unix_time_ms > 0);

    // The same conflict 1,000 more times: counted, reported, and a bounded number of lines.
    let sent = cp.push_all(std::iter::repeat_n(changed, 1_000)).await;
    assert_eq!(sent, 1_000);
    cp.wait_for("1,001 conflicts in the health stream", |r| r.health.last().and_then(conflict_of).is_some_and(|c| c.count == 1_001)).await;
    let scrape = http_get(&base, "/metrics").await.1;
    assert_eq!(metric_value(&scrape, "machine_agent_task_conflicts_total"), Some(1_001.0), "{scrape}");
    let warnings = agent.logs().lines().filter(|l| l.contains(CONFLICT_WARNING)).count();
    assert!(warnings <= 10, "{warnings} warning lines for 1,001 conflicts");

    // The running task was kept, untouched.
    let (code, after) = readyz(&base).await;
    assert_eq!(code, 200, "{after}");
    assert_eq!(after["engine_pid"], before["engine_pid"], "the engine was not touched: {after}");
    assert_eq!(after["task_conflict"]["count"].as_u64(), Some(1_001), "/readyz shows the conflict: {after}");
    let logs = agent.logs();
    let key_body = other.server_key_pem.lines().nth(1).unwrap();
    assert!(!logs.contains(key_body) && !logs.contains("PRIVATE KEY"), "key material never reaches the log");
}

/// The numbers in `key=N` fields of the lines that contain `needle`.
fn field_sum(logs: &str, needle: &str, key: &str) -> u64 {
    logs.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split(&format!("{key}=")).nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn a_flood_of_100_000_invalid_task_messages_is_counted_in_full_logged_in_bounded_lines_and_the_agent_stays_responsive() {
    const INVALID: usize = 100_000;
    let w = World::new();
    let cp = control_plane().start();
    w.use_control_plane(&cp);
    let agent = agent(&w.config).start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    let base = agent.endpoints().await;

    // A probe asks /healthz and /readyz every 100 ms while the flood runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = tokio::spawn({
        let (base, stop) = (base.clone(), stop.clone());
        async move {
            let (mut slowest, mut answers) = (Duration::ZERO, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for path in ["/healthz", "/readyz"] {
                    let started = tokio::time::Instant::now();
                    let (code, _) = http_get(&base, path).await;
                    assert!(code == 200 || (path == "/readyz" && code == 503), "{path} answered {code}");
                    slowest = slowest.max(started.elapsed());
                    answers += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (slowest, answers)
        }
    });

    let invalid = pb::register_response::Task::Buildkit(pb::BuildkitTask { task_id: "not valid!".into(), ..Default::default() });
    let started = tokio::time::Instant::now();
    let sent = cp.push_all(std::iter::repeat_n(invalid, INVALID)).await;
    assert_eq!(sent, INVALID);
    let deadline = started + Duration::from_secs(120);
    loop {
        let counted = metric_value(&http_get(&base, "/metrics").await.1, "machine_agent_tasks_rejected_total");
        if counted == Some(INVALID as f64) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "every invalid task counted within 120 s: {counted:?} of {INVALID}");
        // Polling a scrape: the metric has no change notification.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let flood = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (slowest, answers) = probe.await.unwrap();
    eprintln!("{INVALID} invalid tasks sent and counted in {flood:?}; endpoints answered {answers} times, slowest {slowest:?}");
    assert!(slowest < Duration::from_secs(2), "the endpoints stayed responsive: slowest answer {slowest:?}");

    // Every rejection is either a line or in a suppressed count; the last count comes once the window ends.
    eventually("every rejection logged or counted as suppressed", Duration::from_secs(40), || {
        let logs = agent.logs();
        let logged = logs.lines().filter(|l| l.contains(REJECTED)).count() as u64;
        logged + field_sum(&logs, REJECTED, "suppressed_before") + field_sum(&logs, "kind=\"task_rejected\"", "suppressed") == INVALID as u64
    })
    .await;
    let logs = agent.logs();
    let logged = logs.lines().filter(|l| l.contains(REJECTED)).count();
    eprintln!("log lines for {INVALID} rejections: {logged} (+ {} summary lines)", logs.lines().filter(|l| l.contains("kind=\"task_rejected\"")).count());
    assert!(logged <= 50, "{logged} lines for {INVALID} rejected tasks");

    let rec = cp.wait_for("the rejections in the health stream", |r| r.health.last().is_some_and(|h| h.tasks_rejected_total == INVALID as u64)).await;
    let last = rec.health.last().unwrap();
    assert!(last.last_task_rejection.contains("buildkit.task_id"), "the control plane hears why: {:?}", last.last_task_rejection);
    let (_, ready) = readyz(&agent.detail_endpoints().await).await;
    assert_eq!(ready["state"], "pending", "the agent kept its state: {ready}");
    assert_eq!(ready["tasks_rejected_total"].as_u64(), Some(INVALID as u64), "{ready}");
}
