//! Milliseconds since the process's first look at the clock, never 0: a moment that fits in an
//! atomic, for marks that threads set and read without a lock (the watchdog's, the backends'
//! signal bookkeeping). 0 stays free to mean "never".

use std::sync::OnceLock;
use std::time::Instant;

/// The process's zero; taking it early makes later marks comparable.
pub fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Now, in milliseconds after `base`, plus one.
pub fn now_ms() -> u64 {
    base().elapsed().as_millis() as u64 + 1
}
