//! The registration loop: prove identity, open the task stream, hand each task
//! to the agent, and when the stream breaks, back off with jitter and register
//! again - for the agent's whole life.
//!
//! The stream must never go quiet: the agent asks the control plane for a
//! keepalive at a third of its idle deadline, and a stream silent past the
//! deadline is logged, its connection discarded, and registration starts over.
//! A permanent refusal (`UNAUTHENTICATED`, `PERMISSION_DENIED`,
//! `UNIMPLEMENTED`) is logged as such and waits near the backoff cap at once.

use super::identity::IdentityProvider;
use super::{ControlError, ControlEvent, ControlPlane, Session};
use crate::proto::v1 as pb;
use crate::secret::Secret;
use crate::task::{validate_task, TaskLimits};
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// A stream that stayed open this long was a success: the next failure starts
/// the backoff from the bottom again. A peer that accepts and drops at once
/// keeps climbing to the cap instead of being hammered.
const STABLE_STREAM: Duration = Duration::from_secs(30);

/// Everything the loop needs, moved into its task.
#[derive(Debug)]
pub struct Registration {
    pub control: ControlPlane,
    pub identity: IdentityProvider,
    pub limits: TaskLimits,
    pub session: watch::Sender<Option<Session>>,
    pub events: mpsc::Sender<ControlEvent>,
    /// Where the machine id the control plane gave is kept across agent
    /// restarts (a crash, a handoff), so the next agent's first registration
    /// names it in `previous_machine_id`: a reconnect, not a new machine.
    pub machine_id_file: PathBuf,
}

impl Registration {
    /// Runs until the agent stops listening (its input channel closes).
    pub async fn run(self) {
        let mut backoff = self.control.settings.backoff.clone();
        let mut rng = rand::rngs::StdRng::from_os_rng();
        loop {
            let opened = Instant::now();
            let outcome = self.register_once().await;
            self.control.metrics.control_plane_connected.set(0);
            if self.events.is_closed() {
                return;
            }
            if opened.elapsed() >= STABLE_STREAM {
                backoff.reset();
            }
            let permanent = outcome.as_ref().err().is_some_and(ControlError::is_permanent);
            let delay = if permanent { backoff.next_delay_at_cap(&mut rng) } else { backoff.next_delay(&mut rng) };
            let why = match &outcome {
                Ok(()) => {
                    warn!("control plane closed the task stream");
                    "the control plane closed the task stream".to_string()
                }
                Err(error) if permanent => {
                    warn!(%error, "task stream failed with a permanent error; backing off to the cap");
                    format!("{error} (permanent: retrying at the backoff cap)")
                }
                Err(error) => {
                    warn!(%error, "task stream failed");
                    error.to_string()
                }
            };
            if self.events.send(ControlEvent::NotRegistered(why)).await.is_err() {
                return;
            }
            self.control.metrics.control_plane_reconnects.inc();
            info!(
                attempt = backoff.attempts(),
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "reconnecting to the control plane after backoff"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// One registration: Ok when the server ended the stream, Err on any failure.
    async fn register_once(&self) -> Result<(), ControlError> {
        let metrics = &self.control.metrics;
        let fail = |e: ControlError| {
            metrics.control_plane_errors.with_label_values(&["RegisterMachine"]).inc();
            e
        };
        let proof = self.identity.prove().await.map_err(|e| fail(e.into()))?;
        let previous_machine_id = match self.session.borrow().as_ref() {
            Some(session) => session.machine_id.clone(),
            None => read_machine_id(&self.machine_id_file),
        };
        let idle_timeout = self.control.settings.task_stream_idle_timeout;
        let request = pb::RegisterRequest {
            connection_id: uuid::Uuid::new_v4().to_string(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            architecture: super::architecture() as i32,
            previous_machine_id,
            hostname: hostname(),
            identity: Some(proof),
            keepalive_interval_secs: keepalive_interval_secs(idle_timeout),
        };
        info!(connection_id = %request.connection_id, url = %self.control.settings.url, "registering with the control plane");
        // `call` counts its own failures.
        let conn = self.control.connection().await.map_err(fail)?;
        let timeout = self.control.settings.request_timeout;
        let mut stream = self.control.call_on(&conn, "RegisterMachine", timeout, |mut client| async move { client.register_machine(request).await }).await?;
        let mut registered = false;
        // Each registration starts with full reports: the control plane that
        // answers may not be the one that asked for deltas before.
        let mut reporting = pb::HealthReporting::default();
        loop {
            let mut message = match tokio::time::timeout(idle_timeout, stream.message()).await {
                Ok(Ok(Some(m))) => m,
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(status)) => {
                    let error = ControlError::from_status("RegisterMachine", &status);
                    if error.discards_connection() {
                        self.control.discard(&conn, &error);
                    }
                    return Err(fail(error));
                }
                Err(_) => {
                    // A stream this quiet broke the keepalive promise: the connection under it is
                    // suspect too (a black hole shows exactly this), so the next attempt dials afresh.
                    let error = ControlError::Silent(idle_timeout);
                    self.control.discard(&conn, &error);
                    return Err(fail(error));
                }
            };
            let reset = message.reset_cache.take();
            let reset_only = reset.is_some() && message.task.is_none();
            if let Some(reset) = reset {
                if self.events.send(ControlEvent::CacheReset(reset)).await.is_err() {
                    return Ok(()); // the agent is gone
                }
            }
            let reporting_only = message.health_reporting.is_some() && message.task.is_none();
            if let Some(newest) = message.health_reporting.take() {
                if newest != reporting {
                    info!(deltas = newest.deltas, snapshot_request = newest.snapshot_request, "health report format from the control plane");
                }
                reporting = newest;
                self.session.send_modify(|s| {
                    if let Some(s) = s {
                        s.reporting = reporting;
                    }
                });
            }
            if message.task.is_none() && (message.keepalive.is_some() || reset_only || reporting_only) {
                debug!("task stream keepalive");
                continue;
            }
            if message.machine_id.is_empty() || message.token.is_empty() {
                return Err(fail(ControlError::Protocol("RegisterResponse without machine_id or token".into())));
            }
            let session = Session { machine_id: message.machine_id, token: Secret::new(message.token), reporting };
            if self.session.borrow().as_ref().map(|s| &s.machine_id) != Some(&session.machine_id) {
                info!(machine_id = %session.machine_id, "registered");
                if let Err(error) = crate::fsutil::write_atomic(&self.machine_id_file, session.machine_id.as_bytes(), 0o600) {
                    warn!(path = %self.machine_id_file.display(), %error, "cannot keep the machine id for the next agent");
                }
            }
            self.session.send_replace(Some(session));
            metrics.control_plane_connected.set(1);
            if !registered {
                registered = true;
                if self.events.send(ControlEvent::Registered).await.is_err() {
                    return Ok(()); // the agent is gone
                }
            }
            let event = match validate_task(message.task, &self.limits) {
                Ok(task) => ControlEvent::Task(task),
                Err(error) => {
                    metrics.tasks_rejected.inc();
                    ControlEvent::TaskRejected(error)
                }
            };
            if self.events.send(event).await.is_err() {
                return Ok(()); // the agent is gone
            }
        }
    }
}

/// The machine id an agent before this one was given; empty when none (or not one).
fn read_machine_id(path: &Path) -> String {
    let text = crate::fsutil::read_regular_text(path, MAX_MACHINE_ID_BYTES).unwrap_or_default();
    let id = text.trim();
    if id.bytes().all(|b| b.is_ascii_graphic()) {
        id.to_string()
    } else {
        String::new()
    }
}

/// A machine id is a short token; a larger file is not one.
const MAX_MACHINE_ID_BYTES: u64 = 256;

/// The keepalive interval the agent asks for: a third of its idle deadline
/// (at least a second), so one late keepalive never costs a re-registration.
fn keepalive_interval_secs(idle_timeout: Duration) -> u32 {
    u32::try_from((idle_timeout / 3).as_secs().max(1)).unwrap_or(u32::MAX)
}

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keepalive_asked_for_is_a_third_of_the_idle_deadline_and_at_least_a_second() {
        assert_eq!(keepalive_interval_secs(Duration::from_secs(60)), 20);
        assert_eq!(keepalive_interval_secs(Duration::from_secs(3)), 1);
        assert_eq!(keepalive_interval_secs(Duration::from_secs(2)), 1);
        assert_eq!(keepalive_interval_secs(Duration::from_secs(10)), 3);
    }
}
