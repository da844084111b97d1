//! The registration loop: prove identity, open the task stream, hand each task
//! to the agent, and when the stream breaks, back off with jitter and register
//! again - for the agent's whole life.

use super::identity::IdentityProvider;
use super::{ControlError, ControlEvent, ControlPlane, Session};
use crate::describe::describe_status;
use crate::proto::v1 as pb;
use crate::secret::Secret;
use crate::task::{validate_task, TaskLimits};
use rand::SeedableRng;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

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
            match &outcome {
                Ok(()) => warn!("control plane closed the task stream"),
                Err(error) => warn!(%error, "task stream failed"),
            }
            if self.events.is_closed() {
                return;
            }
            if opened.elapsed() >= STABLE_STREAM {
                backoff.reset();
            }
            let delay = backoff.next_delay(&mut rng);
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
        let previous_machine_id = self.session.borrow().as_ref().map(|s| s.machine_id.clone()).unwrap_or_default();
        let request = pb::RegisterRequest {
            connection_id: uuid::Uuid::new_v4().to_string(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            architecture: super::architecture() as i32,
            previous_machine_id,
            hostname: hostname(),
            identity: Some(proof),
            keepalive_interval_secs: 0,
        };
        info!(connection_id = %request.connection_id, url = %self.control.settings.url, "registering with the control plane");
        let timeout = self.control.settings.request_timeout;
        let mut stream = match tokio::time::timeout(timeout, self.control.client.clone().register_machine(request)).await {
            Ok(Ok(resp)) => resp.into_inner(),
            Ok(Err(status)) => return Err(fail(ControlError::Call { call: "RegisterMachine", reason: describe_status(&status) })),
            Err(_) => return Err(fail(ControlError::Timeout { call: "RegisterMachine", timeout })),
        };
        loop {
            let message = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(status) => return Err(fail(ControlError::Call { call: "RegisterMachine", reason: describe_status(&status) })),
            };
            if message.machine_id.is_empty() || message.token.is_empty() {
                return Err(fail(ControlError::Protocol("RegisterResponse without machine_id or token".into())));
            }
            let session = Session { machine_id: message.machine_id, token: Secret::new(message.token) };
            if self.session.borrow().as_ref().map(|s| &s.machine_id) != Some(&session.machine_id) {
                info!(machine_id = %session.machine_id, "registered");
            }
            self.session.send_replace(Some(session));
            metrics.control_plane_connected.set(1);
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

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default()
}
