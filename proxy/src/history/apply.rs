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

/// Applies entries to one backend, keeping one connection per user and startup parameters,
/// so a catch-up of thousands of units logs in a handful of times. Before each unit the
/// connection's session is reset (DISCARD ALL) and rebuilt as the unit's session was; the
/// reset, the rebuild and the unit go in one write.
pub struct Applier<'a> {
    cfg: &'a Config,
    history: &'a History,
    target: Arc<Backend>,
    conns: HashMap<(String, Vec<(String, String)>), BackendConn>,
}

impl<'a> Applier<'a> {
    pub fn new(cfg: &'a Config, history: &'a History, target: Arc<Backend>) -> Applier<'a> {
        Applier { cfg, history, target, conns: HashMap::new() }
    }

    /// Applies entry `serial` (`raw`, as stored). A connection that failed is not kept.
    pub async fn apply(&mut self, serial: u64, raw: &[u8]) -> Result<(), ApplyError> {
        self.apply_all(&[(serial, raw)]).await.map(|_| ())
    }

    /// Applies entries in order, those in a row with the same user and startup parameters in
    /// one write (a pipeline: each unit ends with its own Sync, so one failing does not stop
    /// the next from running; a failure means the backend is not what it should be anyway).
    /// Returns how many were applied before the first failure.
    pub async fn apply_all(&mut self, entries: &[(u64, &[u8])]) -> Result<usize, ApplyError> {
        let mut units = Vec::with_capacity(entries.len());
        for (serial, raw) in entries {
            units.push(HistoryUnit::decode(raw).map_err(|e| ApplyError::Differs(format!("unit {serial}: {e}")))?);
        }
        let mut done = 0;
        while done < units.len() {
            let key = (units[done].user.clone(), units[done].params.clone());
            let run = units[done..].iter().take(PIPELINE).take_while(|u| u.user == key.0 && u.params == key.1).count();
            let mut conn = match self.conns.remove(&key) {
                Some(c) => c,
                None => self.login(&units[done], entries[done].0).await?,
            };
            // One WAL flush per write: every unit but the last commits without waiting for it,
            // and the last one's flush makes the ones before it durable too (the WAL is one
            // sequence). A crash in between loses only units whose records go with them.
            let plans: Vec<Vec<Step>> =
                (done..done + run).map(|i| self.plan(&units[i], entries[i].0, entries[i].1, i + 1 == done + run)).collect();
            let reqs: Vec<(&[u8], bool)> = plans.iter().flatten().map(|st| (&st.frames[..], st.hash_rows)).collect();
            let got = match fanout::conn::run_requests(&mut conn, &reqs, self.cfg.backend_timeout).await {
                Ok(g) => g,
                Err(e) => return Err(ApplyError::Failed(e)),
            };
            let mut at = 0;
            for (k, plan) in plans.iter().enumerate() {
                let outcomes = &got[at..at + plan.len()];
                at += plan.len();
                if let Err(e) = self.check(plan, outcomes, &units[done + k], entries[done + k].0) {
                    // Leave the connection idle for whatever comes next.
                    let mut rb = BytesMut::new();
                    message::query_msg(&mut rb, "ROLLBACK");
                    if fanout::conn::run_requests(&mut conn, &[(&rb[..], false)], self.cfg.backend_timeout).await.is_ok() {
                        self.conns.insert(key, conn);
                    }
                    return Err(e);
                }
            }
            self.conns.insert(key, conn);
            done += run;
        }
        Ok(done)
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
                let sql = crate::session::statement_text(&st.frames);
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
