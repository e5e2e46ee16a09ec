//! CPU-heavy certificate work (parsing a source, PKCS#12 key derivation, chain validation,
//! rendering keystores) runs on tokio's blocking threads, a few at a time, never on an async worker:
//! those serve `/healthz`, the Lease renewal and every other namespace's reconciles.

use std::time::Duration;

use tokio::sync::Semaphore;

/// At most this many pieces of certificate work at once, across every identity (two cores: one
/// is left to the async runtime).
const AT_ONCE: usize = 2;
/// How long a caller waits for its piece. Every input's cost is bounded before it runs (PKCS#12
/// iteration counts, sizes), so this is a backstop; a piece that overruns keeps its permit until it
/// ends, so overruns cannot pile up threads.
const DEADLINE: Duration = Duration::from_secs(10);

static PERMITS: Semaphore = Semaphore::const_new(AT_ONCE);

/// Why a piece of work gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum Unfinished {
    #[error("certificate work did not finish within {DEADLINE:?}")]
    Deadline,
    #[error("certificate work failed unexpectedly")]
    Panicked,
}

/// Runs `work` on a blocking thread once a permit is free, and waits at most [`DEADLINE`] for it.
pub async fn cpu<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Unfinished> {
    let permit = PERMITS.acquire().await.map_err(|_| Unfinished::Panicked)?;
    // The permit goes with the work: released when it ends, even after the caller gave up.
    permit.forget();
    let handle = tokio::task::spawn_blocking(move || {
        let _release = Release;
        work()
    });
    match tokio::time::timeout(DEADLINE, handle).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(Unfinished::Panicked),
        Err(_) => Err(Unfinished::Deadline),
    }
}

/// Gives the permit back when the work ends (returns or panics).
struct Release;

impl Drop for Release {
    fn drop(&mut self) {
        PERMITS.add_permits(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn blocking_work_leaves_the_async_worker_free() {
        // One async worker: had the work run on it, the task that unblocks the work could not run
        // and the work would give up waiting.
        let (unblock, unblocked) = std::sync::mpsc::channel::<()>();
        let work = cpu(move || unblocked.recv_timeout(Duration::from_secs(5)).is_ok());
        let signal = async move {
            tokio::task::yield_now().await;
            let _ = unblock.send(());
        };
        let (done, ()) = tokio::join!(work, signal);
        assert!(
            done.expect("done"),
            "the async task ran while the work waited"
        );
        assert_eq!(cpu(|| 6 * 7).await.expect("done"), 42);
    }

    #[tokio::test]
    async fn a_panic_is_an_error_and_gives_its_permit_back() {
        for _ in 0..(AT_ONCE + 1) {
            let failed = cpu(|| -> u8 { panic!("a bug in certificate code") }).await;
            assert!(matches!(failed, Err(Unfinished::Panicked)));
        }
        // Had the panics kept their permits, this would wait forever.
        assert_eq!(cpu(|| 1).await.expect("done"), 1);
    }
}
