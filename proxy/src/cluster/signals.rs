//! Pid signals sent through Chorus, per backend: how a session tells a connection that a
//! client ended on purpose from one that ended on its own.
//!
//! `pg_terminate_backend(pid)` through Chorus runs on the lead alone (a pid names one process of
//! one server). The process it ends may be another Chorus session's lead connection; that
//! session then sees its connection end with 57P01 while the server is healthy. Ended on
//! purpose, the client session must end as it would on a single server; a connection that
//! ended without such a request (an operator on the server itself, a network fault) is made
//! again instead. A session cannot know which pid a statement named (it may come from a
//! subquery), so a 57P01 counts as requested while a pid signal is in flight on that backend,
//! or for `GRACE` after the last one answered: the signalled process sends its FATAL within
//! milliseconds of the signal. Misjudged the other way, a session ends that could have been
//! kept: what a single server would have done anyway.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// How long after a pid signal answered a 57P01 on its backend still counts as requested.
const GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
pub struct PidSignals {
    inflight: AtomicU32,
    /// When the last one answered, in milliseconds since `base()` (0: never).
    done_at: AtomicU64,
}

use crate::clock::{base, now_ms};

impl PidSignals {
    /// A statement that signals pids was sent to this backend.
    pub fn started(&self) {
        base();
        self.inflight.fetch_add(1, Ordering::AcqRel);
    }

    /// It answered, or its session ended before it did.
    pub fn ended(&self) {
        self.done_at.store(now_ms(), Ordering::Release);
        let _ = self.inflight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Whether a connection to this backend ending with 57P01 now was ended by a client's
    /// pid signal through Chorus.
    pub fn requested(&self) -> bool {
        if self.inflight.load(Ordering::Acquire) > 0 {
            return true;
        }
        let done = self.done_at.load(Ordering::Acquire);
        done != 0 && now_ms().saturating_sub(done) <= GRACE.as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_counts_while_in_flight_and_for_the_grace_after() {
        let s = PidSignals::default();
        assert!(!s.requested(), "nothing was ever signalled");
        s.started();
        assert!(s.requested());
        s.ended();
        assert!(s.requested(), "just answered");
        s.done_at.store(now_ms().saturating_sub(GRACE.as_millis() as u64 + 1000), Ordering::Release);
        assert!(!s.requested(), "long ago");
        s.ended();
        assert_eq!(s.inflight.load(Ordering::Acquire), 0, "never below zero");
    }
}
