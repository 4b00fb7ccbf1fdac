//! Write ordering: the one place that decides when a write transaction may run.
//!
//! Conflicting writes must reach every backend in the same order. For now a single
//! cluster-wide write token does it: a transaction takes it at its first write and gives it
//! back when its commit point has completed on every in-sync backend, so write transactions
//! run one at a time and every backend applies them in the same order. Reads never take it.
//! The lock manager of the replication-safety issue replaces the token behind this interface.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;

/// The cluster's write order.
#[derive(Clone)]
pub struct WriteOrder {
    token: Arc<Semaphore>,
}

impl Default for WriteOrder {
    fn default() -> Self {
        WriteOrder { token: Arc::new(Semaphore::new(1)) }
    }
}

impl WriteOrder {
    /// A per-session handle that can wait for the token from inside a poll loop.
    pub fn waiter(&self) -> OrderWaiter {
        OrderWaiter { sem: PollSemaphore::new(self.token.clone()), since: None }
    }

    /// Whether some transaction holds the token right now (for tests and status).
    pub fn is_held(&self) -> bool {
        self.token.available_permits() == 0
    }
}

/// Held while a session's write transaction may run; dropping it lets the next one go.
pub struct WriteGuard {
    _permit: OwnedSemaphorePermit,
}

pub struct OrderWaiter {
    sem: PollSemaphore,
    since: Option<Instant>,
}

impl OrderWaiter {
    /// Polls for the token; records how long the session waited.
    pub fn poll_acquire(&mut self, cx: &mut Context<'_>) -> Poll<WriteGuard> {
        let since = *self.since.get_or_insert_with(Instant::now);
        match self.sem.poll_acquire(cx) {
            Poll::Ready(Some(permit)) => {
                self.since = None;
                metrics::histogram!("chorus_write_order_wait_seconds").record(since.elapsed().as_secs_f64());
                Poll::Ready(WriteGuard { _permit: permit })
            }
            // The semaphore is never closed; treat closure as a wait that never ends.
            Poll::Ready(None) => Poll::Pending,
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    #[test]
    fn one_write_transaction_at_a_time() {
        let order = WriteOrder::default();
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut a = order.waiter();
        let mut b = order.waiter();
        let Poll::Ready(guard) = a.poll_acquire(&mut cx) else { panic!("free token not granted") };
        assert!(order.is_held());
        assert!(b.poll_acquire(&mut cx).is_pending());
        drop(guard);
        assert!(b.poll_acquire(&mut cx).is_ready());
    }
}
