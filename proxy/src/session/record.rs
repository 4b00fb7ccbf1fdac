//! The session's part of the update history: each unit that writes is recorded on every
//! backend in its own transaction, with a serial handed out while it holds its write locks.
//!
//! - An explicit transaction: at its COMMIT (all its requests answered, the router says
//!   `Dispatch::Record`) the record goes just before the COMMIT, in the same write.
//! - A write outside a transaction: Chorus opens a transaction around it (a BEGIN before it,
//!   then, once every backend has answered it, the record and a COMMIT). The client gets the
//!   statement's own reply and the COMMIT's ReadyForQuery; nothing else is routed meanwhile.
//! - A statement that cannot run in a transaction block (VACUUM, CREATE DATABASE, ...), or a
//!   unit of a shape Chorus does not wrap: recorded right after it completed.
//!
//! Records, BEGINs and COMMITs are requests of the unit like the client's, so a join's diff
//! log replays them too and the joining backend's history matches the others'.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::route::NewRequest;
use super::{End, Session};
use crate::history::{begin_frame, commit_frame, rollback_frame, History, HistoryUnit, Shape};
use crate::protocol::message::{self, Severity};
use crate::shared::Shared;

/// The update history for a session of `database`: None when it is off, or not in place
/// there (logged; the session's units then go unrecorded).
pub(super) async fn history_for(shared: &Shared, database: &str) -> Option<Arc<History>> {
    let h = shared.history.as_ref()?;
    if h.is_ready(database) {
        return Some(h.clone());
    }
    match h.ensure(&shared.cfg, &shared.cluster, database).await {
        Ok(()) => Some(h.clone()),
        Err(e) => {
            metrics::counter!("chorus_history_unavailable_total").increment(1);
            tracing::error!(%database, error = %e, "cannot put the update history in place; this session's writes are not recorded");
            None
        }
    }
}

/// What Chorus's own request in a unit is.
enum Own {
    Begin,
    Record,
    /// Chorus's COMMIT or ROLLBACK of a wrapped write, carrying the client's ReadyForQuery.
    End,
}

impl Session {
    /// Records this session's units in `history` (None: not at all).
    pub(super) fn with_history(mut self, history: Option<Arc<History>>) -> Session {
        if let Some(h) = &history {
            self.unit = super::state::Unit::with_limit(h.unit_max);
        }
        self.history = history;
        self
    }

    /// Whether a write outside a transaction is wrapped in Chorus's own transaction.
    pub(super) fn should_wrap(&self, r: &NewRequest) -> bool {
        if self.history.is_none() || r.internal {
            return false;
        }
        let sql: &[u8] = match r.sql.first() {
            Some(&message::QUERY) => message::query_sql(&r.sql[5..]).unwrap_or_default(),
            Some(&message::PARSE) => message::parse_fields(&r.sql[5..]).map(|(_, sql)| sql).unwrap_or_default(),
            // A Bind of a statement prepared earlier, a FunctionCall: statements that run in
            // a transaction block as well as outside one.
            Some(_) => return true,
            None => return false,
        };
        crate::sql::runs_in_transaction_block(sql)
    }

    /// Queues Chorus's request `bytes` of the unit to its live targets, as sequence `seq`
    /// (a fresh one if None).
    fn dispatch_own(&mut self, own: Own, bytes: Bytes, targets: u64, seq: Option<u64>) -> Result<(), End> {
        self.dispatch_request(own, bytes, targets, seq, None)
    }

    /// As `dispatch_own`, the unit logging `logged_as` in place of the frames sent.
    fn dispatch_own_logged(&mut self, own: Own, bytes: Bytes, targets: u64, logged_as: Option<Bytes>) -> Result<(), End> {
        self.dispatch_request(own, bytes, targets, None, logged_as)
    }

    fn dispatch_request(
        &mut self,
        own: Own,
        bytes: Bytes,
        targets: u64,
        seq: Option<u64>,
        logged_as: Option<Bytes>,
    ) -> Result<(), End> {
        let seq = seq.unwrap_or_else(|| {
            self.next_seq += 1;
            self.next_seq - 1
        });
        let request = NewRequest { logged_as, ..NewRequest::own(seq, targets, bytes.clone(), !matches!(own, Own::End)) };
        self.dispatch(bytes, targets, Some(request))?;
        if let Some(p) = self.pending.back_mut() {
            p.again = None;
            match own {
                Own::Begin => {}
                Own::Record => p.record = true,
                Own::End => {
                    p.quiet = true;
                    p.rfq_sent = false;
                }
            }
        }
        Ok(())
    }

    /// Chorus's BEGIN before a write outside a transaction.
    pub(super) fn open_wrap(&mut self, seq: u64, targets: u64) -> Result<(), End> {
        self.dispatch_own(Own::Begin, begin_frame(), targets, Some(seq))
    }

    /// The wrapped write was answered by every backend: record and COMMIT it, or (it failed)
    /// ROLLBACK. Either one's ReadyForQuery goes to the client.
    pub(super) fn close_wrap(&mut self, req: &super::Request, winner: crate::fanout::Outcome) {
        let targets = req.targets & self.alive_mask();
        if targets == 0 {
            return;
        }
        let end = if winner.error.is_none() && winner.status == b'T' {
            let _ = self.record_unit(Shape::Transaction);
            commit_frame()
        } else {
            rollback_frame()
        };
        let _ = self.dispatch_own(Own::End, end, targets, None);
    }

    /// Whether a unit that just completed wrote without being recorded (it ran as sent).
    pub(super) fn standalone_record_due(&self) -> bool {
        self.history.is_some() && self.unit_writes && !self.unit_recorded && !self.unit.rolled_back() && !self.unit.is_empty()
    }

    /// Records the unit's requests not yet covered by a record, with a new serial, on every
    /// live backend. A unit too big to keep is failed instead (54000), loudly. False when
    /// nothing was sent.
    pub(super) fn record_unit(&mut self, shape: Shape) -> bool {
        let Some(h) = self.history.clone() else { return false };
        let targets = self.alive_mask();
        if targets == 0 {
            return false;
        }
        let mut bytes = BytesMut::new();
        let mut logged_as = None;
        if self.unit.overflow {
            let why = format!(
                "the transaction is larger than history_unit_max ({} bytes): Chorus cannot keep it in its update history",
                h.unit_max
            );
            message::query_msg(&mut bytes, &crate::sql::rewrite::error_statement("54000", &why));
        } else {
            let entry = HistoryUnit {
                shape,
                user: self.load_target.user.clone(),
                params: self.params.clone(),
                restore: self.settings.restore_frames(self.router.statement_frames()),
                requests: self.unit.requests_from(self.recorded_upto),
                locks: self.locks.summary(self.ddl_open),
            };
            let mut raw = BytesMut::new();
            entry.encode(&mut raw);
            let serial = h.next_serial();
            let prepared = targets & !self.record_prepared == 0;
            h.record_frames(serial, &raw, &mut bytes, prepared);
            if prepared {
                // A join's replay runs the record on a connection of its own: logged whole.
                let mut whole = BytesMut::new();
                h.record_frames(serial, &raw, &mut whole, false);
                logged_as = Some(whole.freeze());
            }
            metrics::counter!("chorus_history_units_total").increment(1);
            metrics::counter!("chorus_history_bytes_total").increment(raw.len() as u64);
        }
        if self.dispatch_own_logged(Own::Record, bytes.freeze(), targets, logged_as).is_err() {
            return false;
        }
        self.unit_recorded = true;
        self.recorded_upto = self.unit.len();
        true
    }

    /// Every backend failed to record the unit: it rolls back, and the client hears why.
    pub(super) fn tell_record_failed(&mut self, winner: crate::fanout::Outcome) {
        let code = winner.error.map(|c| String::from_utf8_lossy(&c).into_owned()).unwrap_or_default();
        if code == crate::history::schema::FENCED {
            // A backend is at a newer leadership epoch: this instance is deposed; the session
            // ends with 57P01 at once (`handle`), its unit rolled back.
            metrics::counter!("chorus_ha_fenced_units_total").increment(1);
            self.shared.depose("a backend refused a unit's record: its epoch was raised by a newer leader");
            return;
        }
        tracing::error!(sqlstate = %code, "a unit could not be recorded in the update history; it is rolled back");
        let msg = format!("Chorus could not record this transaction in its update history (SQLSTATE {code}); it is rolled back");
        let mut buf = BytesMut::new();
        let code = if code == "54000" { "54000" } else { "XX000" };
        message::error_response(&mut buf, Severity::Error, code, &msg);
        self.forward_static(buf.freeze());
    }
}
