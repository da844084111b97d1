//! What the agent knows and shows about itself: the status snapshot, host and
//! engine samples, OOM kills, the Prometheus registry, loop liveness, and the
//! HTTP endpoints (/healthz, /readyz, /metrics) that serve them.

/// The endpoints' accept loop: a header read timeout and a connection cap that sheds the oldest.
pub mod connections;
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
/// The step watcher's I/O edge: build steps' cgroups followed, the engine's build history listened to.
pub mod step_watch;
/// The step recorder's pure core: cgroup files parsed, records built and attributed.
pub mod steps;

use std::io::{self, Write};

/// Logs to stderr (journald keeps it), filtered by MACHINE_AGENT_LOG
/// (tracing's env-filter syntax), info by default.
///
/// A log line that cannot be written is lost, and nothing else: stderr may be
/// a pipe whose reader exited (`run ... | head`) or a journald stream that
/// went away, and the agent must still drain its cache and stop its engine.
/// tracing's own answer to a failed write is an `eprintln!`, which panics on
/// that same stderr (an abort in a release build), hence both the writer that
/// reports every write as done and `log_internal_errors(false)`.
pub fn init_tracing(filter: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter.unwrap_or("info")).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second init (tests in one process) keeps the first subscriber.
    // Colour only for a human at a terminal; journald and log parsers get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyWriter(io::stderr()))
        .log_internal_errors(false)
        .with_ansi(ansi)
        .with_target(true)
        .try_init();
}

/// A writer whose failures are swallowed: every write "succeeds" in full.
#[derive(Debug)]
pub struct LossyWriter<W>(pub W);

impl<W: Write> Write for LossyWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A short or failed write of a log line is not worth a retry or an error.
        let _ = self.0.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails every write the way a pipe without a reader does.
    struct BrokenPipe;

    impl Write for BrokenPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    #[test]
    fn a_broken_log_stream_loses_the_line_and_reports_success() {
        let mut w = LossyWriter(BrokenPipe);
        assert_eq!(w.write(b"a log line\n").unwrap(), 11);
        w.write_all(b"another\n").unwrap();
        w.flush().unwrap();
    }
}
