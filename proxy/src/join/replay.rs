//! Replay: applies the diff log to one backend (the newcomer, or the donor) in log order.
//!
//! Each session of the log gets its own connection, logged in as that session's user with its
//! startup parameters and given its settings and named statements first, so statements run
//! exactly as they ran on the in-sync backends. A unit's requests are sent together and every
//! outcome must equal the one the in-sync backends agreed on; any difference stops the replay
//! (the backend would not be identical).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::cluster::Backend;
use crate::config::Config;
use crate::difflog::{DiffLog, Record};
use crate::fanout::{self, BackendConn};

/// How far a replayer got: log bytes applied and units applied.
#[derive(Default)]
pub struct Position {
    pub bytes: AtomicU64,
    pub units: AtomicU64,
}

struct Replica {
    user: String,
    params: Vec<(String, String)>,
    restore: Vec<Bytes>,
    conn: Option<BackendConn>,
}

/// Applies the log to `target` until `stop` says so (checked at the head of the log).
pub async fn replay(
    cfg: Arc<Config>,
    log: Arc<DiffLog>,
    target: Arc<Backend>,
    pos: Arc<Position>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let mut reader = log.reader().await.map_err(|e| e.to_string())?;
    let mut sessions: HashMap<u64, Replica> = HashMap::new();
    loop {
        // At the head with `stop` cancelled, the replay is complete.
        let Some(rec) = reader.next(&stop).await.map_err(|e| e.to_string())? else {
            return Ok(());
        };
        match rec {
            Record::Open { session, user, params, restore } => {
                sessions.insert(session, Replica { user, params, restore, conn: None });
            }
            Record::Close { session } => {
                sessions.remove(&session);
            }
            Record::Unit { session, requests } => {
                let r = sessions.get_mut(&session).ok_or_else(|| format!("diff log unit of unknown session {session}"))?;
                if r.conn.is_none() {
                    let password = cfg.user(&r.user).map(|u| u.password.clone()).unwrap_or_default();
                    let login = fanout::connect(target.clone(), &r.params, &r.user, &password, cfg.connect_timeout)
                        .await
                        .map_err(|e| format!("replay login as {} failed: {e}", r.user))?;
                    let mut conn = login.conn;
                    fanout::conn::run_script(&mut conn, &r.restore, cfg.backend_timeout).await?;
                    r.conn = Some(conn);
                }
                let Some(conn) = r.conn.as_mut() else { continue };
                let reqs: Vec<(&[u8], bool)> = requests.iter().map(|q| (&q.frames[..], q.hash_rows)).collect();
                let got = fanout::conn::run_requests(conn, &reqs, cfg.backend_timeout).await?;
                for (q, o) in requests.iter().zip(&got) {
                    if *o != q.outcome {
                        let sql = crate::session::statement_text(&q.frames);
                        return Err(format!(
                            "replay on {} differs from the in-sync backends on {sql:?}: replay: {o}; in-sync: {}",
                            target.name, q.outcome
                        ));
                    }
                }
                pos.units.fetch_add(1, Ordering::AcqRel);
            }
        }
        pos.bytes.store(reader.position(), Ordering::Release);
    }
}
