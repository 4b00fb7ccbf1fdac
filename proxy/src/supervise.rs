//! Background jobs that outlive a panic: a health check, the history's pruning or the catch-up
//! watch that panicked would otherwise stop for good, silently, while Chorus goes on serving
//! as if it ran. A panicking job is logged and started again after a pause; the process (and
//! every session) goes on. Sessions need no such help: each runs in a task of its own, and a
//! panic ends that session only.

use std::future::Future;
use std::time::Duration;

/// How long a job that panicked rests before it starts again: a job that panics at once every
/// time does not spin.
const REST: Duration = Duration::from_secs(1);

/// Runs the job `make` builds until it returns; when it panics, logs it, counts it
/// (`chorus_job_panics_total`) and starts a fresh one.
pub fn spawn_restarting<F, Fut>(job: &'static str, make: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(run_restarting(job, make));
}

async fn run_restarting<F, Fut>(job: &'static str, make: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match tokio::spawn(make()).await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                tracing::error!(job, "a background job panicked; starting it again in 1 s");
                metrics::counter!("chorus_job_panics_total", "job" => job).increment(1);
                tokio::time::sleep(REST).await;
            }
            // Cancelled: the runtime is going away.
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_job_that_panics_is_started_again_until_it_returns() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        super::run_restarting("test", move || {
            let runs = counted.clone();
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("on purpose");
                }
            }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 3, "two panics, then a run that returned");
    }
}
