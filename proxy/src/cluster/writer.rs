//! One writer of the update history per backend (contract, "Leadership and fencing": an
//! instance refuses backends whose histories another live instance writes).
//!
//! Why: two instances serving the same backends without a group would hand out the same
//! serials, and each one's recovery would complete or undo the other's units. So an instance
//! that writes histories (history on; with `[ha]`, only while it leads) holds a session-level
//! advisory lock on each in-sync backend, in the health check database, on a connection of its
//! own that lives as long as it serves. Another instance cannot take it: it refuses to start,
//! naming the holder, and a backend that comes back into its in-sync set while another holds
//! the lock is ejected again. The lock goes with its connection: a killed instance's is freed
//! as soon as its server sees the socket close, and a frozen one's is ended by a new leader of
//! its group (`evict`), as the fence ends its sessions.

use std::time::{Duration, Instant};

use super::{pg_error, Backend, Login};
use crate::config::Config;

/// The advisory lock's two keys ("CHOR", "HIST").
const KEYS: (i32, i32) = (0x4348_4f52, 0x4849_5354);

/// Who holds the lock: pid, client address and port, and since when.
const HOLDER: &str = "SELECT a.pid, coalesce(host(a.client_addr), 'local socket') || ':' || coalesce(a.client_port, 0), \
     a.backend_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
     WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = $1 AND l.objid::bigint = $2 AND l.objsubid = 2 \
     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// How long a start waits for a lock that a killed predecessor's server session still holds.
const FREED_WITHIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error(
        "another Chorus instance writes the update history of backend {backend} (its lock is held by server process {pid}, \
         client {client}, since {since}); run two instances only as a group ([ha])"
    )]
    Held { backend: String, pid: i32, client: String, since: String },
    #[error("backend {backend}: {message}")]
    Backend { backend: String, message: String },
}

/// The lock's connection to one backend, while this instance holds it.
#[derive(Default)]
pub struct WriterLock {
    held: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl std::fmt::Debug for WriterLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriterLock")
    }
}

/// Takes (or keeps) the lock on `b`. `wait`: how long a holder may take to go away (a killed
/// predecessor); `evict`: end the holder's session (a new leader of a group, whose old leader
/// may be frozen).
pub async fn take(cfg: &Config, b: &Backend, wait: Duration, evict: bool) -> Result<(), WriterError> {
    let mut held = b.writer.held.lock().await;
    if held.as_ref().is_some_and(|c| !c.is_closed()) {
        return Ok(());
    }
    *held = None;
    let fail = |message: String| WriterError::Backend { backend: b.name.clone(), message };
    let c = Login::health(cfg, &b.host, b.port, &cfg.health_check_database, "chorus-writer")
        .connect()
        .await
        .map_err(|e| fail(pg_error(&e)))?;
    let started = Instant::now();
    loop {
        let got: bool =
            c.query_one("SELECT pg_try_advisory_lock($1, $2)", &[&KEYS.0, &KEYS.1]).await.map_err(|e| fail(pg_error(&e)))?.get(0);
        if got {
            *held = Some(c);
            return Ok(());
        }
        let holder = c.query_opt(HOLDER, &[&i64::from(KEYS.0), &i64::from(KEYS.1)]).await.map_err(|e| fail(pg_error(&e)))?;
        let (pid, client, since): (i32, String, String) = match holder {
            Some(row) => (row.get(0), row.get(1), row.get(2)),
            None => (0, "unknown (it just let go)".into(), "now".into()),
        };
        if evict && pid != 0 {
            tracing::warn!(backend = %b.name, pid, %client, "ending the session of the update history's last writer");
            c.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.map_err(|e| fail(pg_error(&e)))?;
        }
        if started.elapsed() >= wait {
            return Err(WriterError::Held { backend: b.name.clone(), pid, client, since });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Takes the lock on every in-sync backend at a start or a takeover: a backend held by another
/// instance stops the start (`Held`); one that cannot be reached is left to the caller.
pub async fn take_all(cfg: &Config, backends: &[std::sync::Arc<Backend>], evict: bool) -> Vec<(usize, WriterError)> {
    let wait = if evict { Duration::from_secs(2) } else { FREED_WITHIN };
    let taken = futures::future::join_all(backends.iter().map(|b| take(cfg, b, wait, evict))).await;
    backends.iter().zip(taken).filter_map(|(b, r)| r.err().map(|e| (b.idx, e))).collect()
}
