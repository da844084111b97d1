//! A cache reset: the control plane asks to wipe one of the running task's
//! cache mounts and start it empty. It is checked before anything is touched
//! (the task id, the mount, the filesystem UUID, no build in flight unless
//! the request cancels builds); then the engine stops, the filesystem is
//! wiped and mounted again, and the engine starts on the empty cache. Every
//! request gets a [`pb::CacheResetResult`] on the health stream and /readyz.
//!
//! The reset runs on the main loop (which keeps beating its heartbeat): a
//! signal that arrives meanwhile starts the drain once the reset is done.

use super::Agent;
use crate::engine::client::EngineClient;
use crate::engine::EngineState;
use crate::lifecycle::Event;
use crate::observe::status::CacheVolume;
use crate::proto::v1 as pb;
use crate::task::reset::{validate_reset, CacheResetRequest};
use crate::volume::manager::wipe_mount;
use tracing::{debug, error, info, warn};

/// Why a request was not acted on, or failed once acted on.
enum NotDone {
    /// Nothing was touched.
    Refused(String),
    /// The engine was stopped or the volume unmounted, and the wipe did not finish.
    Failed(String),
}

impl Agent {
    /// Handles one reset request from start to result.
    pub(super) async fn reset_cache(&mut self, raw: pb::CacheReset) {
        let (request_id, mount_path) = (raw.request_id.clone(), raw.mount_path.clone());
        if !request_id.is_empty() && self.status.borrow().cache_reset.as_ref().is_some_and(|r| r.request_id == request_id) {
            debug!(request_id, "cache reset already handled; the repeat is ignored");
            return;
        }
        info!(request_id, mount_path, cancel_builds = raw.cancel_builds, "cache reset requested");
        let outcome = match validate_reset(raw) {
            Err(error) => Err(NotDone::Refused(error.to_string())),
            Ok(request) => match self.check_reset(&request).await {
                Err(why) => Err(NotDone::Refused(why)),
                Ok(index) => self.wipe(&request, index).await,
            },
        };
        let (label, error, uuid) = match outcome {
            Ok(uuid) => {
                info!(request_id, mount_path, uuid, "cache reset done; the engine starts on an empty cache");
                ("done", String::new(), uuid)
            }
            Err(NotDone::Refused(why)) => {
                warn!(request_id, mount_path, why, "cache reset refused; nothing was touched");
                ("refused", why, String::new())
            }
            Err(NotDone::Failed(why)) => {
                error!(request_id, mount_path, why, "cache reset failed");
                ("failed", why, String::new())
            }
        };
        self.metrics.cache_resets.with_label_values(&[label]).inc();
        let result =
            pb::CacheResetResult { request_id, mount_path, outcome: label.into(), error, filesystem_uuid: uuid, unix_time_ms: crate::clock::unix_time_ms() };
        self.status.send_modify(|s| s.cache_reset = Some(result));
    }

    /// The index of the mount to wipe, or why the request is refused.
    async fn check_reset(&self, request: &CacheResetRequest) -> Result<usize, String> {
        let Some(task) = &self.task else { return Err("no task runs".into()) };
        if task.id != request.task_id {
            return Err(format!("the running task is {}, not {}", task.id, request.task_id));
        }
        if self.preparing {
            return Err("the task's volumes are being prepared; ask again once they are".into());
        }
        let index = self
            .mounts
            .iter()
            .position(|m| m.mount_path == request.mount_path)
            .ok_or_else(|| format!("{} is not a prepared mount of task {}", request.mount_path.display(), task.id))?;
        let mounted = self.mounts[index].fs_uuid.as_deref();
        if mounted != Some(request.filesystem_uuid.as_str()) {
            return Err(format!(
                "the filesystem at {} is {}, not {}: a stale or misrouted request",
                request.mount_path.display(),
                mounted.unwrap_or("of unknown UUID"),
                request.filesystem_uuid
            ));
        }
        if !request.cancel_builds {
            let running = self.builds_in_flight().await?;
            if running > 0 {
                return Err(format!("{running} cache record(s) are in use by builds in flight; wait for them, or set cancel_builds"));
            }
        }
        Ok(index)
    }

    /// Records in use by builds, by the engine's own account; none when no engine runs.
    async fn builds_in_flight(&self) -> Result<usize, String> {
        if self.engine.is_none() || self.status.borrow().engine != EngineState::Running {
            return Ok(0);
        }
        let cannot = |e: crate::engine::client::ClientError| format!("cannot tell whether a build runs ({e}); set cancel_builds to reset anyway");
        let client = EngineClient::connect(&self.config.engine.socket).await.map_err(cannot)?;
        Ok(client.disk_usage().await.map_err(cannot)?.iter().filter(|r| r.in_use).count())
    }

    /// Stops the engine, wipes the mount, and starts the engine again. Returns the new UUID.
    async fn wipe(&mut self, request: &CacheResetRequest, index: usize) -> Result<String, NotDone> {
        let Some(task) = self.task.clone() else { return Err(NotDone::Refused("no task runs".into())) };
        self.transition(Event::CacheResetStarted, format!("cache reset {}: wiping {}", request.request_id, request.mount_path.display()));
        if let Some(gc) = self.gc.take() {
            gc.abort();
        }
        if let Some(watch) = self.volume_watch.take() {
            watch.abort();
        }
        self.gc_before_ready = false;
        if let Some(problem) = self.stop_engine_within(self.config.engine.stop_grace).await {
            warn!(problem, "engine stop for the cache reset");
        }
        match wipe_mount(&self.config.volume, &task.mounts[index], &self.mounts[index], &request.filesystem_uuid).await {
            Ok(mut wiped) => {
                wiped.task_id = task.id.clone();
                let uuid = wiped.fs_uuid.clone().unwrap_or_default();
                self.mounts[index] = wiped;
                let volumes: Vec<CacheVolume> = self.mounts.iter().map(CacheVolume::of).collect();
                self.metrics.set_cache_volumes(&volumes);
                // The cache starts over, and so do its figures: nothing the old cache did describes the new one.
                self.status.send_modify(|s| {
                    s.cache_volumes = volumes;
                    s.recent_gc.clear();
                    s.engine_restarts = 0;
                    s.engine_last_exit = None;
                });
                self.transition(Event::VolumePrepared, "starting the engine on the reset cache");
                self.start_volume_watch();
                self.start_engine(&task);
                Ok(uuid)
            }
            Err(error) => {
                // Whatever the wipe left (unmounted, or a format cut short under its
                // intent), the ordinary prepare brings back: it is idempotent.
                self.transition(Event::Degraded, format!("cache reset {} failed: {error}; preparing the volumes again", request.request_id));
                self.transition(Event::PrepareRetried, format!("preparing the volumes again after the failed cache reset {}", request.request_id));
                self.start_prepare(&task);
                Err(NotDone::Failed(format!("{error}; the engine was stopped and starts again once the volumes are prepared")))
            }
        }
    }
}
