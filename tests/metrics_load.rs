//! The endpoints of an agent that is Ready with the real buildkitd, registered
//! with the control-plane double (health stream, GC and engine loops all
//! running): a scrape that `promtool check metrics` passes with the engine and
//! GC series in it, and 10 s of `wrk` on /metrics (then bursts on /readyz and
//! /healthz) over loopback with no socket error, no non-2xx answer, and the
//! agent's own loops still ticking. In process: a scrape racing the sampler's
//! re-recording of the volume gauges never misses a watched mount.
//!
//! Needs root, the real BuildKit (scripts/install-buildkit.sh), promtool
//! (Debian `prometheus`) and wrk (Debian `wrk`); `.ci/run` installs them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

mod support;

use std::process::Stdio;
use std::time::Duration;
use support::control_plane::{buildkit_task, control_plane};
use support::engine::{wait_ready, World};
use support::{agent, http_get, metric_value, process_alive, trace_init};

/// What `wrk --latency` reported, from its text output.
#[derive(Debug, Default, PartialEq)]
struct WrkReport {
    requests: u64,
    connect_errors: u64,
    read_errors: u64,
    write_errors: u64,
    timeouts: u64,
    non_2xx_3xx: u64,
    /// The "Latency Distribution" block and the summary lines, for the test output.
    latency_lines: Vec<String>,
}

/// Parses wrk 4's report. The "Socket errors" and "Non-2xx or 3xx responses"
/// lines are printed only when their counts are not zero; a report without
/// the "N requests in" line is not a report and fails the parse.
fn parse_wrk(out: &str) -> Option<WrkReport> {
    let mut r = WrkReport::default();
    let mut saw_requests = false;
    let mut in_distribution = false;
    for line in out.lines() {
        let t = line.trim();
        if t == "Latency Distribution" {
            in_distribution = true;
            r.latency_lines.push(line.to_string());
            continue;
        }
        if in_distribution {
            if t.ends_with('%') || t.split_whitespace().next().is_some_and(|p| p.ends_with('%')) {
                r.latency_lines.push(line.to_string());
                continue;
            }
            in_distribution = false;
        }
        if t.starts_with("Latency ") || t.starts_with("Requests/sec:") || t.starts_with("Transfer/sec:") {
            r.latency_lines.push(line.to_string());
        }
        if let Some((n, _)) = t.split_once(" requests in ") {
            r.requests = n.trim().parse().ok()?;
            saw_requests = true;
            r.latency_lines.push(line.to_string());
        } else if let Some(rest) = t.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let mut kv = part.split_whitespace();
                let (key, value) = (kv.next()?, kv.next()?.parse().ok()?);
                match key {
                    "connect" => r.connect_errors = value,
                    "read" => r.read_errors = value,
                    "write" => r.write_errors = value,
                    "timeout" => r.timeouts = value,
                    _ => return None,
                }
            }
        } else if let Some(rest) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx_3xx = rest.trim().parse().ok()?;
        }
    }
    saw_requests.then_some(r)
}

/// Runs `wrk` against `url` for `secs`, killed if it outlives its own duration
/// by 15 s; returns its report and its whole output.
async fn wrk(url: &str, threads: u32, connections: u32, secs: u64) -> (WrkReport, String) {
    let child = tokio::process::Command::new("wrk")
        .args([format!("-t{threads}"), format!("-c{connections}"), format!("-d{secs}s"), "--timeout".into(), "2s".into(), "--latency".into(), url.into()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("wrk not found: install Debian's `wrk` package (bash .ci/run does)");
    let bound = Duration::from_secs(secs + 15);
    let out =
        tokio::time::timeout(bound, child.wait_with_output()).await.unwrap_or_else(|_| panic!("wrk against {url} did not finish within {bound:?}")).unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "wrk against {url} failed ({}):\n{text}", out.status);
    let report = parse_wrk(&text).unwrap_or_else(|| panic!("cannot parse wrk's report:\n{text}"));
    (report, text)
}

fn assert_clean(what: &str, r: &WrkReport, text: &str) {
    println!("wrk {what}:");
    for line in &r.latency_lines {
        println!("  {}", line.trim());
    }
    assert!(r.requests > 0, "wrk {what}: no request completed:\n{text}");
    assert_eq!(
        (r.connect_errors, r.read_errors, r.write_errors, r.timeouts),
        (0, 0, 0, 0),
        "wrk {what}: socket errors (connect, read, write, timeout):\n{text}"
    );
    assert_eq!(r.non_2xx_3xx, 0, "wrk {what}: answers other than 2xx:\n{text}");
}

#[test]
fn wrk_report_parsing() {
    let clean = "Running 10s test @ http://127.0.0.1:1/metrics\n  2 threads and 16 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   452.10us  300.00us   9.80ms   90.00%\n    Req/Sec    17.00k     1.00k   19.00k    70.00%\n  Latency Distribution\n     50%  400.00us\n     75%  500.00us\n     90%  700.00us\n     99%    1.50ms\n  338000 requests in 10.00s, 1.20GB read\nRequests/sec:  33800.00\nTransfer/sec:    123.00MB\n";
    let r = parse_wrk(clean).unwrap();
    assert_eq!((r.requests, r.connect_errors, r.read_errors, r.write_errors, r.timeouts, r.non_2xx_3xx), (338_000, 0, 0, 0, 0, 0));
    assert_eq!(r.latency_lines.iter().filter(|l| l.trim().ends_with("s") && l.contains('%')).count(), 4, "{r:?}");

    let dirty = "  100 requests in 1.00s, 1.00KB read\n  Socket errors: connect 1, read 2, write 3, timeout 4\n  Non-2xx or 3xx responses: 5\n";
    let r = parse_wrk(dirty).unwrap();
    assert_eq!((r.requests, r.connect_errors, r.read_errors, r.write_errors, r.timeouts, r.non_2xx_3xx), (100, 1, 2, 3, 4, 5));

    assert_eq!(parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n"), None);
    assert_eq!(parse_wrk("  100 requests in 1.00s\n  Socket errors: connect x\n"), None);
}

#[tokio::test]
async fn a_ready_agent_with_a_real_engine_serves_a_promtool_clean_scrape_and_ten_seconds_of_wrk_without_errors() {
    trace_init();
    let w = World::new();
    let cp = control_plane().start();
    w.use_control_plane(&cp);
    // Info, not debug: the measurement is the endpoints, not the log.
    let agent = agent(&w.config).env("MACHINE_AGENT_LOG", "info").start();
    cp.wait_for("a registration", |r| !r.registrations.is_empty()).await;
    cp.push(buildkit_task("metrics-load", &w.root.join("mnt")));
    wait_ready(&agent).await;
    // The public listener: where Prometheus scrapes.
    let base = agent.endpoints().await;
    agent.wait_for_log("gc run trigger=startup").await;
    cp.wait_for("a health report", |r| !r.health.is_empty()).await;

    // (a) A scrape of the whole agent: lifecycle, control plane, engine, GC,
    // and the sampler's volume and engine series once it has ticked with the engine up.
    let cache_series = format!("machine_agent_volume_size_bytes{{mount=\"{}\"}}", w.cache().display());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let scrape = loop {
        let (code, scrape) = http_get(&base, "/metrics").await;
        assert_eq!(code, 200);
        let sampled =
            metric_value(&scrape, &cache_series).is_some_and(|b| b > 0.0) && metric_value(&scrape, "machine_agent_engine_rss_bytes").is_some_and(|b| b > 0.0);
        if sampled {
            break scrape;
        }
        assert!(tokio::time::Instant::now() < deadline, "no sampler tick with the cache mount and the engine within 30 s:\n{scrape}");
        // Polling a scrape: the sampler ticks every 5 s and nothing announces it.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(metric_value(&scrape, "machine_agent_state{state=\"ready\"}"), Some(1.0), "{scrape}");
    assert_eq!(metric_value(&scrape, "machine_agent_engine_up"), Some(1.0), "{scrape}");
    assert_eq!(metric_value(&scrape, "machine_agent_control_plane_connected"), Some(1.0), "{scrape}");
    assert!(metric_value(&scrape, "machine_agent_health_reports_sent_total").is_some_and(|n| n >= 1.0), "{scrape}");
    assert_eq!(metric_value(&scrape, "machine_agent_gc_runs_total{outcome=\"ok\",trigger=\"startup\"}"), Some(1.0), "{scrape}");
    assert!(metric_value(&scrape, "machine_agent_gc_last_run_timestamp_seconds").is_some_and(|t| t > 0.0), "{scrape}");
    assert_eq!(metric_value(&scrape, "machine_agent_engine_restarts_total{reason=\"signal\"}"), Some(0.0), "{scrape}");
    let families = scrape.lines().filter(|l| l.starts_with("# TYPE ")).count();
    println!("scrape: {} bytes, {families} metric families, {} samples", scrape.len(), scrape.lines().filter(|l| !l.starts_with('#')).count());
    support::promtool_check(&scrape);

    // (b) 10 s of wrk on /metrics, closed loop, 16 connections.
    let health_before = cp.recorded().health.len();
    let (report, text) = wrk(&format!("{base}/metrics"), 2, 16, 10).await;
    let health_during = cp.recorded().health.len() - health_before;
    assert_clean("/metrics, 2 threads, 16 connections, 10 s", &report, &text);
    println!("health reports received during the load: {health_during}");
    // One report a second; the load must not starve the agent's own loops.
    assert!(health_during >= 5, "only {health_during} health reports in 10 s of load on /metrics: the health loop was starved");

    // Short bursts on the other two endpoints; /readyz answers 200 in Ready, so
    // a non-2xx here would also mean the agent left Ready under load.
    for path in ["/readyz", "/healthz"] {
        let (report, text) = wrk(&format!("{base}{path}"), 1, 4, 2).await;
        assert_clean(&format!("{path}, 1 thread, 4 connections, 2 s"), &report, &text);
    }

    assert!(process_alive(agent.pid), "the agent died under load; log:\n{}", agent.logs());
    let (code, body) = http_get(&base, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"), "the agent's loops after the load");
    let (code, body) = http_get(&base, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let (_, after) = http_get(&base, "/metrics").await;
    assert_eq!(metric_value(&after, "machine_agent_engine_restarts_total{reason=\"unresponsive\"}"), Some(0.0), "{after}");
    support::promtool_check(&after);
}

/// A scrape that lands while the sampler re-records the volume gauges still
/// holds every watched mount: a series that vanishes for one scrape is a gap
/// (and a staleness marker) in Prometheus.
#[test]
fn a_scrape_during_a_sampler_tick_still_has_every_watched_mount() {
    use machine_agent::observe::metrics::Metrics;
    use machine_agent::observe::status::MountFigures;
    use machine_agent::volume::stats::FsStats;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    let metrics = Metrics::new();
    let mounts = vec![
        MountFigures {
            path: "/var/lib/machine-agent/cache".into(),
            stats: FsStats { total_bytes: 1 << 30, free_bytes: 1 << 29, total_inodes: 65_536, free_inodes: 60_000 },
        },
        MountFigures {
            path: "/var/lib/machine-agent".into(),
            stats: FsStats { total_bytes: 1 << 34, free_bytes: 1 << 33, total_inodes: 1 << 20, free_inodes: 1 << 19 },
        },
    ];
    metrics.record_mounts(&mounts);
    let stop = Arc::new(AtomicBool::new(false));
    let ticks = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (metrics, mounts, stop, ticks) = (metrics.clone(), mounts.clone(), stop.clone(), ticks.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                metrics.record_mounts(&mounts);
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut incomplete = vec![];
    for _ in 0..3000 {
        let scrape = metrics.render();
        for m in &mounts {
            for name in ["volume_size_bytes", "volume_free_bytes", "volume_inodes", "volume_free_inodes"] {
                let series = format!("machine_agent_{name}{{mount=\"{}\"}}", m.path.display());
                if metric_value(&scrape, &series).is_none() && incomplete.len() < 5 {
                    incomplete.push(series);
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    println!("3000 scrapes during {} sampler re-records", ticks.load(Ordering::Relaxed));
    assert!(incomplete.is_empty(), "scrapes taken during a sampler tick lost watched mounts, e.g. {incomplete:?}");

    // A mount no longer watched leaves the scrape; the other stays.
    metrics.record_mounts(&mounts[..1]);
    let scrape = metrics.render();
    assert_eq!(metric_value(&scrape, "machine_agent_volume_size_bytes{mount=\"/var/lib/machine-agent/cache\"}"), Some((1u64 << 30) as f64));
    assert!(!scrape.contains("mount=\"/var/lib/machine-agent\""), "{scrape}");
}
