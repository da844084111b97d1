//! What the agent knows and shows about itself: the status snapshot, host and
//! engine samples, OOM kills, the Prometheus registry, loop liveness, and the
//! HTTP endpoints (/healthz, /readyz, /metrics) that serve them.

pub mod http;
pub mod liveness;
/// A pure limiter for log lines that can repeat without bound: a burst per window, then a count.
pub mod log_limit;
pub mod metrics;
/// The OOM watcher's pure core: kmsg OOM lines parsed, assembled into kills and attributed.
pub mod oom;
/// The OOM watcher's I/O edge: /dev/kmsg read live, checked against the kernel's counters.
pub mod oom_watch;
/// The sampler's loop: a sample and the watched filesystems' figures every interval.
pub mod sample_loop;
/// Host and engine-tree CPU and memory, one cheap tick at a time.
pub mod sampler;
/// The status snapshot the agent publishes and every reader copies.
pub mod status;

/// Logs to stderr (journald keeps it), filtered by MACHINE_AGENT_LOG
/// (tracing's env-filter syntax), info by default.
pub fn init_tracing(filter: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter.unwrap_or("info")).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second init (tests in one process) keeps the first subscriber.
    // Colour only for a human at a terminal; journald and log parsers get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).with_target(true).try_init();
}
