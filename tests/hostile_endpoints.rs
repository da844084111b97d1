//! The endpoints against hostile clients: a slowloris of 1000 connections that
//! never finish their headers does not stop a scrape, and the server closes
//! them; the public /readyz names nothing about the task, the engine or the
//! host; the detail view listens on loopback only.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use std::net::SocketAddr;
use std::time::Duration;
use support::{agent, base_config, http_get, metric_value, trace_init, write_task_file};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How many connections the slowloris holds.
const SLOW_CONNECTIONS: usize = 1000;
/// The header timeout the test's agent is given: short, so the test is quick.
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// The agent's default `endpoints.max_connections`.
const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// A scrape under attack must be answered within this.
const SCRAPE_BOUND: Duration = Duration::from_secs(2);

/// A standalone agent whose base config is changed by `edit`; returns it with its endpoints URL.
async fn standalone(dir: &tempfile::TempDir, edit: impl FnOnce(String) -> String) -> (support::AgentProcess, String) {
    let config = dir.path().join("config.toml");
    std::fs::write(&config, edit(base_config(dir.path()))).unwrap();
    let task = write_task_file(dir.path(), &dir.path().join("mnt"));
    let agent = agent(&config).standalone(&task).start();
    let base = agent.endpoints().await;
    (agent, base)
}

fn socket_addr(base: &str) -> SocketAddr {
    base.trim_start_matches("http://").parse().unwrap()
}

/// The soft fd limit raised to what the test needs (within the hard limit);
/// only this test process is touched.
fn ensure_fd_limit(needed: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < needed {
        assert!(hard >= needed, "the hard fd limit {hard} is below the {needed} this test needs");
        setrlimit(Resource::RLIMIT_NOFILE, needed, hard).unwrap();
    }
}

/// True when the server has closed `stream` (EOF or reset); a connection that
/// is still open has nothing to read and times out at once.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or 400 the server sent before closing: read on to the EOF.
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// One GET on a fresh connection, bounded by SCRAPE_BOUND: its status and how long it took.
async fn timed_get(client: &reqwest::Client, url: &str) -> (Result<u16, String>, Duration) {
    let start = Instant::now();
    let result = match tokio::time::timeout(SCRAPE_BOUND, async { client.get(url).send().await?.error_for_status()?.text().await.map(|_| 200) }).await {
        Ok(Ok(code)) => Ok(code),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {SCRAPE_BOUND:?}")),
    };
    (result, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_of_1000_connections_does_not_stop_a_scrape_and_is_closed_within_the_header_timeout() {
    trace_init();
    ensure_fd_limit(SLOW_CONNECTIONS as u64 + 1024);
    let dir = tempfile::tempdir().unwrap();
    // No engine: the endpoints are what is under test, and a degraded agent serves them all the same.
    let (_agent, base) = standalone(&dir, |c| {
        c.replace(support::BUILDKITD, "/nonexistent/buildkitd")
            .replace("[endpoints]", &format!("[endpoints]\nheader_read_timeout_secs = {}", HEADER_TIMEOUT.as_secs()))
    })
    .await;
    let addr = socket_addr(&base);

    // Half send a partial request and then trickle a header byte now and then;
    // the other half connect and say nothing at all.
    let mut slow = Vec::with_capacity(SLOW_CONNECTIONS);
    for i in 0..SLOW_CONNECTIONS {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 0 {
            stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: slowloris\r\nX-Slow: ").await.unwrap();
        }
        slow.push(stream);
    }
    let opened = Instant::now();
    eprintln!("slowloris: {SLOW_CONNECTIONS} connections open");

    // The cap (default 256) holds: the oldest are shed as the newest arrive.
    // The last few may still sit in the listen backlog, or be shed but not yet
    // closed, when the count starts: count again until the cap holds, well
    // before the header timeout would close them anyway.
    let cap_deadline = HEADER_TIMEOUT / 2;
    let mut closed = vec![false; SLOW_CONNECTIONS];
    let still_open = loop {
        for (stream, closed) in slow.iter_mut().zip(closed.iter_mut()).filter(|(_, closed)| !**closed) {
            *closed = closed_by_server(stream).await;
        }
        let still_open = closed.iter().filter(|closed| !**closed).count();
        if still_open <= DEFAULT_MAX_CONNECTIONS || opened.elapsed() > cap_deadline {
            break still_open;
        }
    };
    eprintln!("slowloris: {still_open} still open {:?} after the last connected", opened.elapsed());
    assert!(
        still_open <= DEFAULT_MAX_CONNECTIONS,
        "{still_open} connections held open {cap_deadline:?} after the last connected, above the cap of {DEFAULT_MAX_CONNECTIONS}"
    );

    // Scrapes on fresh connections while the slowloris trickles.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut worst = Duration::ZERO;
    let mut failures = vec![];
    for round in 0..10 {
        for (i, stream) in slow.iter_mut().enumerate().filter(|(i, _)| i % 2 == 0) {
            // Errors are expected once the server has closed the connection.
            let _ = stream.try_write(&[b'a' + u8::try_from((round + i) % 26).unwrap()]);
        }
        for path in ["/metrics", "/healthz"] {
            let (result, took) = timed_get(&client, &format!("{base}{path}")).await;
            worst = worst.max(took);
            if let Err(e) = result {
                failures.push(format!("round {round} {path}: {e} after {took:?}"));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("slowloris: worst scrape latency {worst:?} over 20 scrapes");
    assert!(failures.is_empty(), "scrapes under a slowloris failed: {failures:#?}");

    // Every slow connection is closed by the server by the header timeout (plus slack for a loaded machine).
    let deadline = opened + HEADER_TIMEOUT + Duration::from_secs(2);
    let mut open = slow.len();
    while Instant::now() < deadline {
        open = 0;
        for stream in &mut slow {
            if !closed_by_server(stream).await {
                open += 1;
            }
        }
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("slowloris: {open} of {SLOW_CONNECTIONS} still open {:?} after they connected", opened.elapsed());
    assert_eq!(open, 0, "connections that never finished their headers are closed within the header timeout {HEADER_TIMEOUT:?}");

    // And the endpoints still answer afterwards, counting what they closed.
    let (code, scrape) = http_get(&base, "/metrics").await;
    assert_eq!(code, 200);
    let closed =
        |reason: &str| metric_value(&scrape, &format!("machine_agent_endpoint_connections_closed_total{{listener=\"public\",reason=\"{reason}\"}}")).unwrap();
    let (shed, timed_out) = (closed("shed"), closed("header_timeout"));
    eprintln!("slowloris: the agent shed {shed} connections at the cap and closed {timed_out} at the header timeout");
    assert!(shed >= (SLOW_CONNECTIONS - DEFAULT_MAX_CONNECTIONS) as f64, "shed {shed}");
    assert!(timed_out >= 1.0, "header timeouts {timed_out}");
}

/// Fields of the detail /readyz that name the task, a process, a path or an error.
const IDENTIFYING_FIELDS: [&str; 13] = [
    "reason",
    "engine_pid",
    "engine_restarts",
    "engine_last_exit",
    "last_gc",
    "last_oom",
    "oom_kills_total",
    "volumes",
    "resources",
    "task_id",
    "task_conflict",
    "tasks_rejected_total",
    "control_plane_error",
];

/// An address of this machine other than loopback, if it has one.
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let out = std::process::Command::new("hostname").arg("-I").output().ok()?;
    String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|a| a.parse::<std::net::IpAddr>().ok()).find(|ip| ip.is_ipv4() && !ip.is_loopback())
}

#[tokio::test]
async fn the_public_readyz_names_nothing_and_the_detail_view_listens_on_loopback_only() {
    trace_init();
    let dir = tempfile::tempdir().unwrap();
    let (agent, base) = standalone(&dir, |c| c).await;
    agent.wait_for_log("to=ready").await;
    let detail = agent.detail_endpoints().await;

    // The detail view has the task, the pid and the paths (so the public one has something to leave out).
    let (code, body) = http_get(&detail, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let full: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(full["task_id"], "standalone-1");
    let engine_pid = full["engine_pid"].as_u64().expect("an engine pid in the detail view").to_string();
    let volume_path = full["volumes"][0]["path"].as_str().expect("a volume path in the detail view").to_string();

    for path in ["/readyz", "/readyz?verbose", "/readyz?verbose=1&detail=true"] {
        let (code, body) = http_get(&base, path).await;
        assert_eq!(code, 200, "{path}: {body}");
        let public: serde_json::Value = serde_json::from_str(&body).unwrap();
        let keys: Vec<&str> = public.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["control_plane_connected", "engine", "ready", "state", "state_age_secs"], "{path}: {body}");
        assert_eq!((&public["ready"], &public["state"], &public["engine"]), (&true.into(), &"ready".into(), &"running".into()));
        for field in IDENTIFYING_FIELDS {
            assert!(public.get(field).is_none(), "{path} on the public listener has {field}: {body}");
        }
        for secret in ["standalone-1", engine_pid.as_str(), volume_path.as_str(), dir.path().to_str().unwrap()] {
            assert!(!body.contains(secret), "{path} on the public listener names {secret:?}: {body}");
        }
    }

    // The detail listener is bound to loopback, so no other address of the machine reaches it.
    let detail_addr = socket_addr(&detail);
    assert!(detail_addr.ip().is_loopback(), "the detail view listens on {detail_addr}");
    match non_loopback_ip() {
        Some(ip) => {
            let outside = SocketAddr::new(ip, detail_addr.port());
            let refused = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(outside)).await;
            assert!(!matches!(refused, Ok(Ok(_))), "the detail view answers on {outside}");
        }
        None => eprintln!("no non-loopback address on this machine: only the bind address is checked"),
    }
}
