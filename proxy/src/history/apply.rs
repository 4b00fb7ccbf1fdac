//! Applies one history entry to a backend that lacks it: logged in as the unit's user with its
//! startup parameters, its settings and named statements rebuilt, the unit's requests run in a
//! transaction together with the same record, so the backend ends up holding the unit and
//! knowing it does, as the others do.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::{begin_frame, History, HistoryUnit, Shape};
use crate::cluster::Backend;
use crate::config::Config;
use crate::fanout::{self, BackendConn, Outcome};
use crate::protocol::message;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The backend could not be reached or failed along the way: it may be tried again.
    #[error("{0}")]
    Failed(String),
    /// The backend answered the unit differently from where it committed: it is not
    /// identical to the others.
    #[error("{0}")]
    Differs(String),
}

/// Units sent in one write at most: their replies stay well within the sockets' buffers, so
/// the backend never waits for Chorus to read while Chorus is still writing.
const PIPELINE: usize = 64;

/// Connections applying side by side at most. Two cores' worth of a backend's work: more
/// lanes mostly cut batches shorter (more units meet two lanes they conflict with).
const LANES: usize = 3;

/// A transaction that writes its commit record and waits for the WAL flush up to it, and so
/// for every commit before it.
const FLUSH: &str = "BEGIN; SELECT txid_current(); SET LOCAL synchronous_commit = on; COMMIT";

/// No deadline for a lane's replies (a day): `while_alive` watches the target instead.
const UNBOUNDED: std::time::Duration = std::time::Duration::from_secs(86_400);

/// A connection's login: the user and the startup parameters.
type Key = (String, Vec<(String, String)>);

/// One lane of a batch: its connection and, per unit (its index), the steps applying it.
type Lane = (Key, BackendConn, Vec<(usize, Vec<Step>)>);

/// Applies entries to one backend, keeping one connection per user and startup parameters,
/// so a catch-up of thousands of units logs in a handful of times. Before each unit the
/// connection's session is reset (DISCARD ALL) and rebuilt as the unit's session was; the
/// reset, the rebuild and the unit go in one write.
pub struct Applier<'a> {
    cfg: &'a Config,
    history: &'a History,
    target: Arc<Backend>,
    /// Idle connections per login.
    conns: HashMap<Key, Vec<BackendConn>>,
}

impl<'a> Applier<'a> {
    pub fn new(cfg: &'a Config, history: &'a History, target: Arc<Backend>) -> Applier<'a> {
        Applier { cfg, history, target, conns: HashMap::new() }
    }

    /// Applies entry `serial` (`raw`, as stored), durably. A connection that failed is not kept.
    pub async fn apply(&mut self, serial: u64, raw: &[u8]) -> Result<(), ApplyError> {
        self.apply_all(&[(serial, raw)], true).await.map(|_| ())
    }

    /// Applies entries in serial order, in batches: a batch's units are dealt to up to
    /// `LANES` connections so that no two lanes hold conflicting units (`deal`), and each
    /// lane's units go in one write (a pipeline: each unit ends with its own Sync, so one
    /// failing does not stop the next from running; a failure means the backend is not what
    /// it should be anyway). Returns how many were applied.
    ///
    /// Every unit commits without waiting for its WAL flush; with `durable` the last write
    /// waits for it, which makes every unit before it durable too (the WAL is one sequence).
    /// A crash in between loses only units whose records go with them: the backend then lacks
    /// them and knows it does.
    pub async fn apply_all(&mut self, entries: &[(u64, &[u8])], durable: bool) -> Result<usize, ApplyError> {
        let mut units = Vec::with_capacity(entries.len());
        for (serial, raw) in entries {
            units.push(HistoryUnit::decode(raw).map_err(|e| ApplyError::Differs(format!("unit {serial}: {e}")))?);
        }
        let mut done = 0;
        while done < units.len() {
            let lanes = deal(&units[done..], LANES, PIPELINE);
            let run: usize = lanes.iter().map(Vec::len).sum();
            let last = done + run == units.len();
            // The last unit's own COMMIT waits for the flush when nothing runs beside it.
            let flush_in_plan = durable && last && lanes.len() == 1;
            let mut work = Vec::with_capacity(lanes.len());
            for lane in &lanes {
                let first = done + lane[0];
                let key = (units[first].user.clone(), units[first].params.clone());
                let conn = match self.conns.get_mut(&key).and_then(Vec::pop) {
                    Some(c) => c,
                    None => self.login(&units[first], entries[first].0).await?,
                };
                let plans: Vec<(usize, Vec<Step>)> = lane
                    .iter()
                    .map(|&i| done + i)
                    .map(|i| (i, self.plan(&units[i], entries[i].0, entries[i].1, flush_in_plan && i + 1 == units.len())))
                    .collect();
                work.push((key, conn, plans));
            }
            self.run_batch(work, &units, entries).await?;
            if durable && last && !flush_in_plan {
                self.flush().await?;
            }
            done += run;
        }
        Ok(done)
    }

    /// Runs a batch's lanes side by side and checks every unit's outcomes; the connections
    /// go back to the pool (one that failed is dropped).
    async fn run_batch(&mut self, work: Vec<Lane>, units: &[HistoryUnit], entries: &[(u64, &[u8])]) -> Result<(), ApplyError> {
        let timeout = self.cfg.backend_timeout;
        // A unit may take as long to apply as it took to run (a bulk load, a long UPDATE): the
        // lanes have no deadline of their own while the target answers its health probe.
        let ran = futures::future::join_all(work.into_iter().map(|(key, mut conn, plans)| async move {
            let reqs: Vec<(&[u8], bool)> =
                plans.iter().flat_map(|(_, p)| p.iter()).map(|st| (&st.frames[..], st.hash_rows)).collect();
            let got = fanout::conn::run_requests(&mut conn, &reqs, UNBOUNDED).await;
            (key, conn, plans, got)
        }));
        let ran = self.while_alive(ran).await?;
        let mut first_error = None;
        for (key, mut conn, plans, got) in ran {
            let got = match got {
                Ok(g) => g,
                Err(e) => {
                    first_error.get_or_insert(ApplyError::Failed(e));
                    continue;
                }
            };
            let mut at = 0;
            let mut failed = None;
            for (i, plan) in &plans {
                let outcomes = &got[at..at + plan.len()];
                at += plan.len();
                if let Err(e) = self.check(plan, outcomes, &units[*i], entries[*i].0) {
                    failed = Some(e);
                    break;
                }
            }
            if let Some(e) = failed {
                // Leave the connection idle for whatever comes next.
                let mut rb = BytesMut::new();
                message::query_msg(&mut rb, "ROLLBACK");
                if fanout::conn::run_requests(&mut conn, &[(&rb[..], false)], timeout).await.is_err() {
                    first_error.get_or_insert(e);
                    continue;
                }
                first_error.get_or_insert(e);
            }
            self.conns.entry(key).or_default().push(conn);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Runs `work` while the target answers a health probe every `backend_timeout`; one that
    /// does not answer (a hung or vanished server) fails it.
    async fn while_alive<T>(&self, work: impl std::future::Future<Output = T>) -> Result<T, ApplyError> {
        tokio::pin!(work);
        let every = self.cfg.backend_timeout;
        loop {
            tokio::select! {
                done = &mut work => return Ok(done),
                _ = tokio::time::sleep(every) => {
                    if let Err(e) = crate::cluster::probe(self.cfg, &self.target, self.cfg.health_check_timeout).await {
                        let name = &self.target.name;
                        return Err(ApplyError::Failed(format!("{name} stopped answering while units were applied: {e}")));
                    }
                }
            }
        }
    }

    /// Makes everything applied so far durable: a commit that waits for the WAL flush.
    async fn flush(&mut self) -> Result<(), ApplyError> {
        let Some(conn) = self.conns.values_mut().find_map(|v| v.last_mut()) else { return Ok(()) };
        let mut q = BytesMut::new();
        message::query_msg(&mut q, FLUSH);
        match fanout::conn::run_requests(conn, &[(&q[..], false)], self.cfg.backend_timeout).await {
            Ok(o) => match o.iter().find(|o| o.error.is_some()) {
                None => Ok(()),
                Some(bad) => Err(ApplyError::Failed(format!("flush on {}: {bad}", self.target.name))),
            },
            Err(e) => Err(ApplyError::Failed(format!("flush on {}: {e}", self.target.name))),
        }
    }

    async fn login(&self, unit: &HistoryUnit, serial: u64) -> Result<BackendConn, ApplyError> {
        let password = self.cfg.user(&unit.user).map(|u| u.password.clone()).unwrap_or_default();
        let name = &self.target.name;
        let login = fanout::connect(self.target.clone(), &unit.params, &unit.user, &password, self.cfg.connect_timeout)
            .await
            .map_err(|e| ApplyError::Failed(format!("log in to {name} as {} to apply unit {serial}: {e}", unit.user)))?;
        Ok(login.conn)
    }

    /// What applying `unit` sends: the session reset and rebuilt, the unit's requests, its
    /// record, its COMMIT (`flush`: one that waits for the WAL flush whatever the session's
    /// `synchronous_commit`; otherwise one that does not wait, set after the unit's statements
    /// ran so none of them sees it); each with what its outcome must be.
    fn plan(&self, unit: &HistoryUnit, serial: u64, raw: &[u8], flush: bool) -> Vec<Step> {
        let step = |frames: Bytes, hash_rows: bool, check: Check| Step { frames, hash_rows, check };
        let mut discard = BytesMut::new();
        message::query_msg(&mut discard, "DISCARD ALL");
        let mut plan = Vec::with_capacity(unit.restore.len() + unit.requests.len() + 4);
        plan.push(step(discard.freeze(), false, Check::None));
        // The session's settings and named statements: as in a live session, one that fails
        // is not the unit's concern (the unit's own outcomes are compared).
        plan.extend(unit.restore.iter().map(|f| step(f.clone(), false, Check::None)));
        if unit.shape == Shape::Autocommit {
            plan.push(step(begin_frame(), false, Check::Success));
        }
        for r in &unit.requests {
            let check = if unit.shape == Shape::Transaction { Check::Same(r.outcome) } else { Check::Success };
            plan.push(step(r.frames.clone(), r.hash_rows, check));
        }
        let mut rec = BytesMut::new();
        self.history.record_frames(serial, raw, &mut rec, false);
        plan.push(step(rec.freeze(), false, Check::Success));
        if unit.shape != Shape::Standalone {
            plan.push(step(commit_with(flush), false, Check::Success));
        }
        plan
    }

    fn check(&self, plan: &[Step], got: &[Outcome], unit: &HistoryUnit, serial: u64) -> Result<(), ApplyError> {
        let name = &self.target.name;
        for (st, o) in plan.iter().zip(got) {
            let fine = match st.check {
                Check::None => true,
                // Success or the same error: row counts of reads of per-server facts may differ.
                Check::Same(w) => o.error == w.error,
                Check::Success => o.error.is_none(),
            };
            if !fine {
                let sql = crate::sql::text::statement_text(&st.frames);
                let want = match st.check {
                    Check::Same(w) => w.to_string(),
                    _ => "success".into(),
                };
                return Err(ApplyError::Differs(format!(
                    "unit {serial} on {name}: {sql:?} gave {o}, where it committed: {want}"
                )));
            }
        }
        if unit.shape != Shape::Standalone && got.last().map(|o| o.last_tag()) != Some(b"COMMIT") {
            return Err(ApplyError::Differs(format!("unit {serial} on {name} did not commit")));
        }
        Ok(())
    }
}

/// Deals a prefix of `units` (in serial order) to at most `lanes` lanes of at most `depth`
/// units each, as index lists: a unit joins the one lane holding units it conflicts with,
/// or, conflicting with none, a new lane or the shortest lane of its login. The batch ends
/// before a unit that conflicts with two lanes, whose lane is full or of another login, or
/// that must run alone (`HistoryUnit::runs_alone`). Units in different lanes ran side by
/// side under the lock manager too, so the order between them does not matter.
fn deal(units: &[HistoryUnit], lanes: usize, depth: usize) -> Vec<Vec<usize>> {
    let login = |a: &HistoryUnit, b: &HistoryUnit| a.user == b.user && a.params == b.params;
    let mut out: Vec<Vec<usize>> = Vec::new();
    // Per lane, the modes held per resource (a bit per mode number).
    let mut held: Vec<HashMap<u64, u8>> = Vec::new();
    for (i, u) in units.iter().enumerate() {
        if u.runs_alone() {
            if out.is_empty() {
                out.push(vec![i]);
            }
            break;
        }
        let hit: Vec<usize> = (0..out.len()).filter(|&k| conflicts_with(&held[k], &u.locks)).collect();
        let lane = match hit[..] {
            [] if out.len() < lanes => {
                out.push(Vec::new());
                held.push(HashMap::new());
                out.len() - 1
            }
            [] => match (0..out.len()).filter(|&k| login(&units[out[k][0]], u)).min_by_key(|&k| out[k].len()) {
                Some(k) => k,
                None => break,
            },
            [k] if login(&units[out[k][0]], u) => k,
            _ => break,
        };
        if out[lane].len() >= depth {
            break;
        }
        out[lane].push(i);
        for (h, m) in &u.locks {
            *held[lane].entry(*h).or_default() |= 1 << (*m).min(7);
        }
    }
    out
}

/// Whether a lock summary conflicts with the modes a lane holds.
fn conflicts_with(held: &HashMap<u64, u8>, locks: &[(u64, u8)]) -> bool {
    locks.iter().any(|(h, m)| {
        held.get(h).is_some_and(|bits| {
            (0..8u8).any(|n| bits & (1 << n) != 0 && crate::order::summaries_conflict(&[(*h, *m)], &[(*h, n)]))
        })
    })
}

/// A unit's COMMIT with its `synchronous_commit` chosen for this transaction alone.
fn commit_with(flush: bool) -> Bytes {
    static ON: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    static OFF: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    let (cell, sql) = if flush {
        (&ON, "SET LOCAL synchronous_commit = on; COMMIT")
    } else {
        (&OFF, "SET LOCAL synchronous_commit = off; COMMIT")
    };
    cell.get_or_init(|| {
        let mut b = BytesMut::new();
        message::query_msg(&mut b, sql);
        b.freeze()
    })
    .clone()
}

/// One request of an applied unit.
struct Step {
    frames: Bytes,
    hash_rows: bool,
    check: Check,
}

/// What an applied request's outcome is checked against.
#[derive(Clone, Copy)]
enum Check {
    None,
    Success,
    Same(Outcome),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::Mode;

    fn unit(shape: Shape, user: &str, rows: &[u64]) -> HistoryUnit {
        let (ix, x) = (Mode::IntentExclusive.number(), Mode::Exclusive.number());
        let mut locks = vec![(1, ix)];
        locks.extend(rows.iter().map(|r| (*r, x)));
        HistoryUnit { shape, user: user.into(), params: vec![], restore: vec![], requests: vec![], locks }
    }

    fn tx(rows: &[u64]) -> HistoryUnit {
        unit(Shape::Transaction, "app", rows)
    }

    #[test]
    fn units_are_dealt_to_lanes_that_never_share_a_conflict() {
        // 10 and 11 side by side; the second writer of 10 follows the first in its lane.
        assert_eq!(deal(&[tx(&[10]), tx(&[11]), tx(&[10]), tx(&[12])], 3, 64), vec![vec![0, 2], vec![1], vec![3]]);
        // Conflicting with no lane once all lanes are open: the shortest lane.
        assert_eq!(deal(&[tx(&[10]), tx(&[10]), tx(&[11]), tx(&[12])], 2, 64), vec![vec![0, 1], vec![2, 3]]);
        // A unit that conflicts with two lanes waits for the next batch.
        assert_eq!(deal(&[tx(&[10]), tx(&[11]), tx(&[10, 11]), tx(&[12])], 3, 64), vec![vec![0], vec![1]]);
        // A full lane ends the batch.
        assert_eq!(deal(&[tx(&[10]), tx(&[10]), tx(&[10])], 3, 2), vec![vec![0, 1]]);
        // One lane is one login: a unit of another user conflicting with it waits.
        assert_eq!(deal(&[tx(&[10]), unit(Shape::Transaction, "other", &[10])], 3, 64), vec![vec![0]]);
    }

    fn standalone(frames: Bytes) -> HistoryUnit {
        let requests = vec![crate::difflog::LoggedRequest { frames, hash_rows: false, outcome: Outcome::new() }];
        HistoryUnit { requests, ..unit(Shape::Standalone, "app", &[]) }
    }

    fn query(sql: &str) -> Bytes {
        let mut b = BytesMut::new();
        message::query_msg(&mut b, sql);
        b.freeze()
    }

    #[test]
    fn a_statement_outside_a_block_and_a_unit_without_locks_run_alone() {
        let vacuum = standalone(query("VACUUM items"));
        assert_eq!(deal(&[tx(&[10]), vacuum.clone(), tx(&[11])], 3, 64), vec![vec![0]]);
        assert_eq!(deal(&[vacuum, tx(&[11])], 3, 64), vec![vec![0]]);
        // A write recorded after it completed (outside a block) conflicts as any other...
        let update = standalone(query("UPDATE items SET v = 1 WHERE id = 3"));
        assert_eq!(deal(&[tx(&[10]), update, tx(&[11])], 3, 64), vec![vec![0], vec![1], vec![2]]);
        let mut parsed = BytesMut::new();
        message::extended_statement(&mut parsed, "INSERT INTO items VALUES (1)", true);
        assert!(!standalone(parsed.freeze()).runs_alone());
        // ... but a Bind of a statement named earlier does not say what it runs.
        let mut bound = BytesMut::new();
        message::bound_call(&mut bound, "s1", &[]);
        assert!(standalone(bound.freeze()).runs_alone());
        let mut unknown = tx(&[]);
        unknown.locks.clear();
        assert_eq!(deal(&[unknown, tx(&[11])], 3, 64), vec![vec![0]]);
        // Shared holders of one resource do not conflict; a writer of it does.
        let s = Mode::Shared.number();
        let reader = |h| HistoryUnit { locks: vec![(h, s)], ..tx(&[]) };
        assert_eq!(deal(&[reader(5), reader(5), tx(&[5])], 3, 64), vec![vec![0], vec![1]]);
    }
}
