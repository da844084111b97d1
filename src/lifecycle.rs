//! The lifecycle, as data: every state, every event, and the one pure function
//! that says which transitions are legal. Only the agent's run loop applies it.

use std::fmt;

/// Where the agent is in its life. See ARCHITECTURE.md for the picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    Starting,
    Registering,
    Pending,
    Preparing,
    StartingEngine,
    Ready,
    Degraded,
    Draining,
    Stopped,
}

impl State {
    pub const ALL: [State; 9] = [
        State::Starting,
        State::Registering,
        State::Pending,
        State::Preparing,
        State::StartingEngine,
        State::Ready,
        State::Degraded,
        State::Draining,
        State::Stopped,
    ];

    /// The lower-case name used in metrics labels, /readyz and STATUS=.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Registering => "registering",
            State::Pending => "pending",
            State::Preparing => "preparing",
            State::StartingEngine => "starting_engine",
            State::Ready => "ready",
            State::Degraded => "degraded",
            State::Draining => "draining",
            State::Stopped => "stopped",
        }
    }

    /// Once draining, the only way is to Stopped.
    pub fn is_shutting_down(self) -> bool {
        matches!(self, State::Draining | State::Stopped)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened, as far as the lifecycle cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The agent is about to dial the control plane for the first time.
    RegistrationStarted,
    /// The control plane (re)sent a pending task.
    TaskPending,
    /// A BuildKit task was accepted (from the control plane or a standalone file).
    TaskAccepted,
    /// The cache volume is mounted and verified.
    VolumePrepared,
    /// The engine answers and has a worker.
    EngineReady,
    /// The engine exited once; the supervisor restarts it.
    EngineRestarting,
    /// Something the build service needs is broken: prepare failed, the engine
    /// crashed or hung, the disk is under pressure.
    Degraded,
    /// A prepare that failed is tried again (the task still stands).
    PrepareRetried,
    /// An engine start that failed is tried again.
    EngineStartRetried,
    /// The control plane asked to wipe a cache mount: the engine stops and the
    /// volume is prepared again, empty.
    CacheResetStarted,
    /// SIGTERM/SIGINT, should_terminate, or a terminate task.
    DrainRequested,
    /// The drain finished (cleanly or at its deadline).
    Drained,
}

/// A transition the lifecycle does not allow: a bug or a confused peer, logged and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition: {event:?} in state {state}")]
pub struct IllegalTransition {
    pub state: State,
    pub event: Event,
}

/// The lifecycle's transition table.
pub fn next(state: State, event: Event) -> Result<State, IllegalTransition> {
    use Event as E;
    use State as S;
    let to = match (state, event) {
        (S::Starting, E::RegistrationStarted) => S::Registering,
        (S::Registering | S::Pending, E::TaskPending) => S::Pending,
        // Standalone runs skip registration: Starting takes a task directly.
        (S::Starting | S::Registering | S::Pending, E::TaskAccepted) => S::Preparing,
        (S::Preparing, E::VolumePrepared) => S::StartingEngine,
        (S::StartingEngine | S::Degraded, E::EngineReady) => S::Ready,
        // One exit is a restart; Degraded (a crash loop) stays Degraded until ready.
        (S::Ready | S::StartingEngine, E::EngineRestarting) => S::StartingEngine,
        (S::Degraded, E::EngineRestarting) => S::Degraded,
        (S::Preparing | S::StartingEngine | S::Ready | S::Degraded, E::Degraded) => S::Degraded,
        // Degraded is a state to leave: the failed step runs again while the task stands.
        (S::Degraded, E::PrepareRetried) => S::Preparing,
        (S::Degraded, E::EngineStartRetried) => S::StartingEngine,
        (S::StartingEngine | S::Ready | S::Degraded, E::CacheResetStarted) => S::Preparing,
        // A drain can start from anywhere before it, and a second request joins the first.
        (S::Starting | S::Registering | S::Pending | S::Preparing | S::StartingEngine | S::Ready | S::Degraded | S::Draining, E::DrainRequested) => S::Draining,
        (S::Draining, E::Drained) => S::Stopped,
        _ => return Err(IllegalTransition { state, event }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event as E;
    use State as S;

    const EVENTS: [Event; 12] = [
        E::RegistrationStarted,
        E::TaskPending,
        E::TaskAccepted,
        E::VolumePrepared,
        E::EngineReady,
        E::EngineRestarting,
        E::Degraded,
        E::PrepareRetried,
        E::EngineStartRetried,
        E::CacheResetStarted,
        E::DrainRequested,
        E::Drained,
    ];

    /// Every legal (state, event) -> state; every pair not listed must be refused.
    const LEGAL: &[(State, Event, State)] = &[
        (S::Starting, E::RegistrationStarted, S::Registering),
        (S::Starting, E::TaskAccepted, S::Preparing),
        (S::Starting, E::DrainRequested, S::Draining),
        (S::Registering, E::TaskPending, S::Pending),
        (S::Registering, E::TaskAccepted, S::Preparing),
        (S::Registering, E::DrainRequested, S::Draining),
        (S::Pending, E::TaskPending, S::Pending),
        (S::Pending, E::TaskAccepted, S::Preparing),
        (S::Pending, E::DrainRequested, S::Draining),
        (S::Preparing, E::VolumePrepared, S::StartingEngine),
        (S::Preparing, E::Degraded, S::Degraded),
        (S::Preparing, E::DrainRequested, S::Draining),
        (S::StartingEngine, E::EngineReady, S::Ready),
        (S::StartingEngine, E::EngineRestarting, S::StartingEngine),
        (S::Ready, E::EngineRestarting, S::StartingEngine),
        (S::Degraded, E::EngineRestarting, S::Degraded),
        (S::StartingEngine, E::Degraded, S::Degraded),
        (S::StartingEngine, E::DrainRequested, S::Draining),
        (S::Ready, E::Degraded, S::Degraded),
        (S::Ready, E::DrainRequested, S::Draining),
        (S::Degraded, E::EngineReady, S::Ready),
        (S::Degraded, E::Degraded, S::Degraded),
        (S::Degraded, E::PrepareRetried, S::Preparing),
        (S::Degraded, E::EngineStartRetried, S::StartingEngine),
        (S::Degraded, E::DrainRequested, S::Draining),
        (S::Draining, E::DrainRequested, S::Draining),
        (S::Draining, E::Drained, S::Stopped),
        (S::StartingEngine, E::CacheResetStarted, S::Preparing),
        (S::Ready, E::CacheResetStarted, S::Preparing),
        (S::Degraded, E::CacheResetStarted, S::Preparing),
    ];

    #[test]
    fn transition_table_is_exactly_the_legal_list() {
        for state in State::ALL {
            for event in EVENTS {
                let expected = LEGAL.iter().find(|(s, e, _)| *s == state && *e == event).map(|(_, _, to)| *to);
                match (next(state, event), expected) {
                    (Ok(to), Some(want)) => assert_eq!(to, want, "{state:?} + {event:?}"),
                    (Err(_), None) => {}
                    (got, want) => panic!("{state:?} + {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn stopped_is_final() {
        for event in EVENTS {
            assert!(next(S::Stopped, event).is_err());
        }
    }
}
