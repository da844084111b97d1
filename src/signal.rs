//! The signals that end the agent, each with why. Handlers are installed when
//! [`ShutdownSignals::install`] runs, before the agent says READY, so an early
//! SIGTERM starts a drain instead of killing the process outright.

use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Debug)]
pub struct ShutdownSignals {
    /// SIGTERM: systemd's (or the cloud's) graceful stop.
    term: Signal,
    /// SIGINT: Ctrl-C while running in a terminal during development.
    int: Signal,
}

impl ShutdownSignals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Resolves with the signal's name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
