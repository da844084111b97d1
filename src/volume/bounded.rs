//! Blocking calls the drain can walk away from. A syscall such as syncfs,
//! FITRIM or umount2 waits for the device and cannot be cancelled; run on an
//! async worker it stalls every task on that thread, timers included, so no
//! deadline can interrupt it. Here it runs on tokio's blocking pool and the
//! caller waits for it only until its deadline: a call that overruns is left
//! to finish on its own thread, and the caller goes on.

use std::time::Duration;
use tokio::time::Instant;

/// Why a bounded blocking call gave no result.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum BlockingError {
    /// did not finish within {0:?}; abandoned (still running on its own thread)
    Overran(Duration),
    /// the blocking task failed: {0}
    Panicked(#[source] tokio::task::JoinError),
}

/// Runs `f` on the blocking pool and waits for it until `deadline`.
pub async fn blocking_until<T, F>(deadline: Instant, f: F) -> Result<T, BlockingError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let started = Instant::now();
    // Dropping the handle on a timeout detaches the task; the thread finishes the call.
    match tokio::time::timeout_at(deadline, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(join)) => Err(BlockingError::Panicked(join)),
        Err(_) => Err(BlockingError::Overran(started.elapsed())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_that_overruns_is_abandoned_and_the_caller_goes_on() {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let deadline = Instant::now() + Duration::from_millis(50);
        let outcome = blocking_until(deadline, move || wait.recv().is_ok()).await;
        assert!(matches!(outcome, Err(BlockingError::Overran(_))), "{outcome:?}");
        drop(release);
        assert_eq!(blocking_until(Instant::now() + Duration::from_secs(60), || 7).await.unwrap(), 7);
    }
}
