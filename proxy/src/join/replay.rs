//! Replay: applies the diff log to one backend (the newcomer, or the donor).
//!
//! Each session of the log gets its own connection, logged in as that session's user with its
//! startup parameters and given its settings and named statements first, so statements run
//! exactly as they ran on the in-sync backends. A unit's requests are sent together and every
//! outcome must equal the one the in-sync backends agreed on; any difference stops the replay
//! (the backend would not be identical).
//!
//! Units are dispatched in log order, several at a time: a unit starts once no running unit
//! holds a lock that conflicts with one of its own and its session's previous unit is done,
//! the same freedom the lock manager gave the originals. So replay keeps the concurrency of
//! the workload and outruns it, rather than applying one transaction per round trip.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::cluster::Backend;
use crate::config::Config;
use crate::difflog::{DiffLog, LoggedRequest, Record};
use crate::fanout::{self, BackendConn};
use crate::order::summaries_conflict as conflicts;

/// `SET synchronous_commit = off` as a Query message.
static ASYNC_COMMIT: &[u8] = b"Q\0\0\0\x21SET synchronous_commit = off\0";

/// Makes everything replayed into `target` durable: a synchronous commit flushes the WAL up to
/// itself, and so every asynchronous commit before it.
pub async fn flush(cfg: &Config, target: &Backend) -> Result<(), String> {
    let c = crate::cluster::Login::health(cfg, &target.host, target.port, &cfg.health_check_database, "chorus-join")
        .connect()
        .await
        .map_err(|e| format!("connect to {} to flush the replay: {e}", target.name))?;
    c.batch_execute("SET synchronous_commit = on; BEGIN; SELECT txid_current(); COMMIT")
        .await
        .map_err(|e| format!("flush the replay on {}: {e}", target.name))
}

/// Units replayed at once at most.
const WINDOW: usize = 16;

/// How far a replayer got: log bytes up to which everything is applied, and units applied.
#[derive(Default)]
pub struct Position {
    pub bytes: AtomicU64,
    pub units: AtomicU64,
}

struct Replica {
    user: String,
    params: Vec<(String, String)>,
    restore: Arc<Vec<Bytes>>,
    /// None while a unit of this session runs (the connection is with it) or before the first.
    conn: Option<BackendConn>,
    busy: bool,
}

type Done = (u64, u64, Result<BackendConn, String>);

struct Ctx {
    cfg: Arc<Config>,
    target: Arc<Backend>,
}

/// Runs one unit on its session's connection (opening it first if needed).
async fn run_unit(
    ctx: Arc<Ctx>,
    conn: Option<BackendConn>,
    login: (String, Vec<(String, String)>, Arc<Vec<Bytes>>),
    requests: Vec<LoggedRequest>,
) -> Result<BackendConn, String> {
    let cfg = &ctx.cfg;
    let mut conn = match conn {
        Some(c) => c,
        None => {
            let (user, params, restore) = login;
            let password = cfg.user(&user).map(|u| u.password.clone()).unwrap_or_default();
            let l = fanout::connect(ctx.target.clone(), &params, &user, &password, cfg.connect_timeout)
                .await
                .map_err(|e| format!("replay login as {user} failed: {e}"))?;
            let mut c = l.conn;
            // Replayed commits need not wait for the disk one by one: a backend that crashes
            // during replay fails the join anyway, and `flush` makes the whole replay durable
            // before the backend is attached. The session's own settings come after this one.
            let mut script = Vec::with_capacity(restore.len() + 1);
            script.push(Bytes::from_static(ASYNC_COMMIT));
            script.extend(restore.iter().cloned());
            fanout::conn::run_script(&mut c, &script, cfg.backend_timeout).await?;
            c
        }
    };
    let reqs: Vec<(&[u8], bool)> = requests.iter().map(|q| (&q.frames[..], q.hash_rows)).collect();
    let got = fanout::conn::run_requests(&mut conn, &reqs, cfg.backend_timeout).await?;
    for (q, o) in requests.iter().zip(&got) {
        if *o != q.outcome {
            let sql = crate::sql::text::statement_text(&q.frames);
            return Err(format!(
                "replay on {} differs from the in-sync backends on {sql:?}: replay: {o}; in-sync: {}",
                ctx.target.name, q.outcome
            ));
        }
    }
    Ok(conn)
}

/// Applies the log to `target` until `stop` is cancelled and the head is reached.
pub async fn replay(
    cfg: Arc<Config>,
    log: Arc<DiffLog>,
    target: Arc<Backend>,
    pos: Arc<Position>,
    stop: CancellationToken,
) -> Result<(), String> {
    // The reader runs ahead in its own task and hands records over with their end offsets.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(Record, u64), String>>(1024);
    let reader = {
        let (log, stop) = (log.clone(), stop.clone());
        tokio::spawn(async move {
            let mut r = match log.reader().await {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string())).await;
                    return;
                }
            };
            loop {
                let item = match r.next(&stop).await {
                    Ok(Some(rec)) => Ok((rec, r.position())),
                    Ok(None) => return,
                    Err(e) => Err(e.to_string()),
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        })
    };
    let _abort = AbortOnDrop(reader);
    let ctx = Arc::new(Ctx { cfg, target });
    let mut sessions: HashMap<u64, Replica> = HashMap::new();
    let mut running: FuturesUnordered<futures::future::BoxFuture<'static, Done>> = FuturesUnordered::new();
    // Locks of the running units, by unit number.
    let mut active: Vec<(u64, Vec<(u64, u8)>)> = Vec::new();
    // Records in log order with their end offsets: (unit number or 0, end, done).
    let mut order: VecDeque<(u64, u64, bool)> = VecDeque::new();
    let mut pending: Option<(Record, u64)> = None;
    let mut next_unit = 1u64;
    let mut eof = false;
    loop {
        if let Some((rec, end)) = pending.take() {
            match rec {
                Record::Open { session, user, params, restore } => {
                    sessions.insert(session, Replica { user, params, restore: Arc::new(restore), conn: None, busy: false });
                    order.push_back((0, end, true));
                }
                Record::Close { session } if sessions.get(&session).is_some_and(|r| r.busy) => {
                    pending = Some((Record::Close { session }, end));
                }
                Record::Close { session } => {
                    sessions.remove(&session);
                    order.push_back((0, end, true));
                }
                Record::Unit { session, requests, locks } => {
                    let r = sessions.get_mut(&session).ok_or_else(|| format!("diff log unit of unknown session {session}"))?;
                    if r.busy || running.len() >= WINDOW || active.iter().any(|(_, l)| conflicts(&locks, l)) {
                        pending = Some((Record::Unit { session, requests, locks }, end));
                    } else {
                        let n = next_unit;
                        next_unit += 1;
                        r.busy = true;
                        let login = (r.user.clone(), r.params.clone(), r.restore.clone());
                        let fut = run_unit(ctx.clone(), r.conn.take(), login, requests);
                        running.push(Box::pin(async move { (session, n, fut.await) }));
                        active.push((n, locks));
                        order.push_back((n, end, false));
                    }
                }
            }
            advance(&mut order, &pos);
            if pending.is_none() {
                continue;
            }
        }
        let done = if pending.is_some() || eof {
            // Blocked behind running units, or the log is over: wait for one to finish.
            match running.next().await {
                Some(d) => d,
                None if eof => return Ok(()),
                None => return Err("replay stalled with nothing running".into()),
            }
        } else {
            tokio::select! {
                r = rx.recv() => {
                    match r {
                        Some(Ok(item)) => pending = Some(item),
                        Some(Err(e)) => return Err(e),
                        None => eof = true,
                    }
                    continue;
                }
                Some(d) = running.next(), if !running.is_empty() => d,
            }
        };
        let (session, n, result) = done;
        let conn = result?;
        if let Some(r) = sessions.get_mut(&session) {
            r.conn = Some(conn);
            r.busy = false;
        }
        active.retain(|(u, _)| *u != n);
        if let Some(e) = order.iter_mut().find(|e| e.0 == n) {
            e.2 = true;
        }
        pos.units.fetch_add(1, Ordering::AcqRel);
        advance(&mut order, &pos);
    }
}

/// Moves the applied position over the finished records at the front.
fn advance(order: &mut VecDeque<(u64, u64, bool)>, pos: &Position) {
    while let Some(&(_, end, true)) = order.front() {
        pos.bytes.store(end, Ordering::Release);
        order.pop_front();
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::Mode;

    #[test]
    fn the_async_commit_message_is_well_formed() {
        let codec = crate::protocol::FrameCodec::new(1024);
        assert_eq!(codec.peek(ASYNC_COMMIT).unwrap(), Some((b'Q', ASYNC_COMMIT.len())));
        assert_eq!(crate::protocol::message::query_sql(&ASYNC_COMMIT[5..]).unwrap(), b"SET synchronous_commit = off");
    }

    #[test]
    fn lock_summaries_conflict_as_modes_do() {
        let ix = Mode::IntentExclusive.number();
        let x = Mode::Exclusive.number();
        let s = Mode::Shared.number();
        // Both hold the cluster-wide intention and their own row: no conflict.
        assert!(!conflicts(&[(1, ix), (10, x)], &[(1, ix), (11, x)]));
        // The same row: conflict.
        assert!(conflicts(&[(1, ix), (10, x)], &[(1, ix), (10, x)]));
        // A table read against a writer of that table.
        assert!(conflicts(&[(5, s)], &[(5, ix)]));
        // Nothing locked (settings, reads): never in the way.
        assert!(!conflicts(&[], &[(1, x)]));
    }
}
