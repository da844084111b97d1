//! The agent's standing cost against the control-plane double: runs the real
//! release binary for BENCH_SECS (default 60) with 1 Hz health and prints peak
//! and steady RSS, CPU seconds per minute, and bytes per health report.
//!
//! `cargo bench --bench foundation` (BENCH_SECS=10 for a quick look).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly on the first surprise

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;
use support::control_plane::{buildkit_task, control_plane};
use support::{agent, base_config, write_private};

/// Bytes the process handed to write()/send() so far.
fn written_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines().find(|l| l.starts_with("wchar:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

fn main() {
    let secs: u64 = std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let cp = control_plane().start();
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        write_private(&token, "bench-bootstrap-token");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &cp.pki.ca_pem).unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "{}\n[control_plane]\nurl = \"{}\"\nca_bundle = \"{}\"\n[identity]\nmode = \"static_token\"\ntoken_file = \"{}\"\n",
                base_config(dir.path()).replace("usage_interval_secs = 2", "usage_interval_secs = 60"),
                cp.url(),
                ca.display(),
                token.display()
            ),
        )
        .unwrap();
        // Warnings only: the measurement is the agent's own cost, not its log volume.
        let agent = agent(&config).env("MACHINE_AGENT_LOG", "warn").start();
        cp.wait_for("registration", |r| !r.registrations.is_empty()).await;
        cp.push(buildkit_task("bench", &dir.path().join("mnt")));
        cp.wait_for("first health reports", |r| r.health.len() >= 3).await;

        // /proc reports CPU time in USER_HZ ticks, which Linux fixes at 100 for user space.
        let ticks_per_sec = 100.0;
        let cpu_start = support::cpu_ticks(agent.pid);
        let written_start = written_bytes(agent.pid);
        let reports_start = cp.recorded().health.len();
        let mut rss_samples = vec![];
        for _ in 0..secs {
            tokio::time::sleep(Duration::from_secs(1)).await;
            rss_samples.push(support::proc_status_kib(agent.pid, "VmRSS:"));
        }
        let cpu_secs = (support::cpu_ticks(agent.pid) - cpu_start) as f64 / ticks_per_sec;
        let written = written_bytes(agent.pid) - written_start;
        let rec = cp.recorded();
        let reports = rec.health.len() - reports_start;
        let sizes = &rec.health_sizes[reports_start..];
        let mean_message = sizes.iter().sum::<usize>() as f64 / sizes.len().max(1) as f64;
        let peak_kib = support::proc_status_kib(agent.pid, "VmHWM:");
        let mut steady = rss_samples[rss_samples.len() / 2..].to_vec();
        steady.sort_unstable();
        let steady_kib = steady[steady.len() / 2];

        println!("machine-agent foundation bench: {secs} s, 1 Hz health over TLS, engine = sleep");
        println!("  health reports received      {reports}");
        println!("  peak RSS (VmHWM)             {:.1} MiB", peak_kib as f64 / 1024.0);
        println!("  steady RSS (median, 2nd half) {:.1} MiB", steady_kib as f64 / 1024.0);
        println!("  CPU                          {:.3} s per minute ({:.3}% of one core)", cpu_secs * 60.0 / secs as f64, cpu_secs * 100.0 / secs as f64);
        println!("  health report, protobuf      {mean_message:.0} bytes");
        println!("  bytes written per report     {:.0} bytes (all writes: TLS + HTTP/2 + gRPC framing, keepalives)", written as f64 / reports.max(1) as f64);
    });
}
