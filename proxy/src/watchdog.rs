//! Supervision by systemd (`deploy/chorus.service`: `Type=notify`, `WatchdogSec`): READY=1 once
//! Chorus serves or stands by, and a watchdog heartbeat only while the parts that must never
//! stall make progress: the accept loop, the health checks and the lock manager. A wedged Chorus
//! (a runtime thread blocked, a lock never let go) stops beating and systemd restarts it; a
//! Chorus that merely has no clients goes on beating.
//!
//! Why a thread of its own: a heartbeat sent from the runtime it watches would stop for the
//! wrong reasons and go on for the wrong ones. The thread reads marks the watched parts leave
//! (`Marks`) and probes the lock manager's lock itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use sd_notify::NotifyState;

/// Marks of progress, in milliseconds since the process's base instant.
#[derive(Default)]
pub struct Marks {
    accept: AtomicU64,
    health: AtomicU64,
}

use crate::clock::{base, now_ms};

/// The process's marks.
pub fn marks() -> &'static Marks {
    static M: OnceLock<Marks> = OnceLock::new();
    M.get_or_init(|| {
        base();
        Marks::default()
    })
}

impl Marks {
    /// The accept loop went round (it also turns on a timer while no client comes).
    pub fn accepted(&self) {
        self.accept.store(now_ms(), Ordering::Release);
    }

    /// A health check pass began.
    pub fn checked(&self) {
        self.health.store(now_ms(), Ordering::Release);
    }

    fn fresh(&self, within: Duration) -> Result<(), &'static str> {
        let now = now_ms();
        let ms = within.as_millis() as u64;
        if now.saturating_sub(self.accept.load(Ordering::Acquire)) > ms {
            return Err("the accept loop");
        }
        if now.saturating_sub(self.health.load(Ordering::Acquire)) > ms {
            return Err("the health checks");
        }
        Ok(())
    }
}

/// How often the accept loop leaves its mark while no client comes.
pub const ACCEPT_TICK: Duration = Duration::from_millis(500);

/// Tells the service manager Chorus is up (`status`: what it is doing). Outside systemd (no
/// NOTIFY_SOCKET) nothing happens.
pub fn ready(status: &str) {
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]) {
        tracing::warn!(error = %e, "could not tell the service manager Chorus is ready");
    }
}

pub fn status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

/// Starts the heartbeat when the service manager asked for one (WATCHDOG_USEC). `health_every`
/// is the health checks' interval: their marks may be that old. `probe` returns only while the
/// lock manager makes progress.
pub fn spawn(probe: Box<dyn Fn() + Send>, health_every: Duration) {
    let Some(limit) = sd_notify::watchdog_enabled() else { return };
    let every = limit / 2;
    let _ = std::thread::Builder::new().name("chorus-watchdog".into()).spawn(move || {
        let mut silent = false;
        loop {
            std::thread::sleep(every);
            // Two turns of the accept loop's timer, or a health check interval, and a margin.
            let within = (ACCEPT_TICK * 2).max(health_every) + every;
            match marks().fresh(within) {
                Ok(()) => {
                    probe();
                    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                    silent = false;
                }
                Err(part) if !silent => {
                    tracing::error!(
                        stalled = part,
                        "a part of Chorus makes no progress: no watchdog heartbeat (systemd restarts it)"
                    );
                    silent = true;
                }
                Err(_) => {}
            }
        }
    });
}

/// For the watchdog's test, in debug builds only: `CHORUS_TEST_WEDGE_ACCEPT_AFTER_MS` makes the
/// accept loop wedge (block its thread) that long after it started.
pub fn test_wedge_at() -> Option<std::time::Instant> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let ms = std::env::var("CHORUS_TEST_WEDGE_ACCEPT_AFTER_MS").ok()?.parse::<u64>().ok()?;
    Some(std::time::Instant::now() + Duration::from_millis(ms))
}

/// Blocks the calling thread for good once `at` has passed (see `test_wedge_at`).
pub fn test_wedge(at: Option<std::time::Instant>) {
    if at.is_some_and(|t| std::time::Instant::now() >= t) {
        tracing::warn!("CHORUS_TEST_WEDGE_ACCEPT_AFTER_MS: the accept loop blocks its thread now");
        std::thread::sleep(Duration::from_secs(3600));
    }
}
