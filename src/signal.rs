//! The signals that end the agent, each with why. Handlers are installed when
//! [`ShutdownSignals::install`] runs, before the agent says READY, so an early
//! SIGTERM starts a drain instead of killing the process outright.
//!
//! SIGUSR2 is the handoff (`machine-agent handoff`): the agent exits at once
//! without a drain, leaving the engine, its mounts and cgroup for the next
//! agent to adopt.

use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Debug)]
pub struct ShutdownSignals {
    /// SIGTERM: systemd's (or the cloud's) graceful stop.
    term: Signal,
    /// SIGINT: Ctrl-C while running in a terminal during development.
    int: Signal,
    /// SIGUSR2: hand off to the next agent (an upgrade).
    usr2: Signal,
}

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Drain and exit; the signal's name.
    Drain(&'static str),
    /// Exit at once, leaving everything for the next agent.
    Handoff,
}

impl ShutdownSignals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())?, usr2: signal(SignalKind::user_defined2())? })
    }

    /// Resolves with what the next signal asks for.
    pub async fn recv(&mut self) -> Stop {
        tokio::select! {
            _ = self.term.recv() => Stop::Drain("SIGTERM"),
            _ = self.int.recv() => Stop::Drain("SIGINT"),
            _ = self.usr2.recv() => Stop::Handoff,
        }
    }
}
