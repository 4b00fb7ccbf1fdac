//! Pid signals, from either end: a client's `pg_terminate_backend` / `pg_cancel_backend`
//! through Chorus, and a connection of this session that such a request reached.
//!
//! A pid a client sees is its lead connection's (BackendKeyData, `pg_backend_pid()`), so the
//! statement runs on the lead alone (routing). Its effect on a Chorus session there must reach
//! that client session on every backend, as on a single server (contract, "What ejects a
//! backend"): a terminated lead connection ends the session with 57P01 once the server is seen
//! healthy (`Session::checked`); a cancelled query is cancelled on the session's other
//! connections too; a cancel naming a session's pid directly reaches its query wherever it
//! runs. No backend is judged for any of it.

use bytes::Bytes;

use super::{bits, CancelTarget, Session};
use crate::protocol::message::{self, BIND, PARSE, QUERY};
use crate::sql::signals::{bound_pid, cancelled_pids, PidArg};

impl Session {
    /// A request that signals pids goes to `targets` (the lead): counted there while in
    /// flight, and a cancel naming one of Chorus's sessions by a literal or bound pid reaches
    /// every backend of that session.
    pub(super) fn signal_sent(&mut self, bytes: &Bytes, targets: u64) {
        for i in bits(targets) {
            self.conns[i].backend.signals.started();
        }
        let Some(lead) = bits(targets).next() else { return };
        let addr = self.conns[lead].backend.addr.clone();
        for pid in self.named_cancels(bytes) {
            let n = self.shared.cancels.cancel_session_of(&addr, pid);
            tracing::debug!(pid, sessions = n, "pg_cancel_backend names a pid");
        }
    }

    /// The request that signalled pids has answered (or will never).
    pub(super) fn signal_answered(&mut self, targets: u64) {
        for i in bits(targets) {
            self.conns[i].backend.signals.ended();
        }
    }

    /// The pids `pg_cancel_backend` calls in these frames name by a literal or a parameter.
    fn named_cancels(&self, bytes: &Bytes) -> Vec<i32> {
        let mut out = Vec::new();
        let mut waiting: Vec<usize> = Vec::new();
        let mut off = 0;
        while let Ok(Some((tag, len))) = self.client_codec.peek(&bytes[off..]) {
            let body = &bytes[off + 5..off + len];
            let sql = match tag {
                QUERY => message::query_sql(body).ok(),
                PARSE => message::parse_fields(body).ok().map(|(_, sql)| sql),
                _ => None,
            };
            if let Some(sql) = sql {
                waiting.clear();
                for arg in cancelled_pids(sql) {
                    match arg {
                        PidArg::Literal(pid) => out.push(pid),
                        PidArg::Param(n) => waiting.push(n),
                    }
                }
            }
            if tag == BIND && !waiting.is_empty() {
                if let Ok(view) = message::bind_view(body) {
                    for &n in &waiting {
                        if let Some((fmt, Some(v))) = view.param(n) {
                            out.extend(bound_pid(fmt, v));
                        }
                    }
                }
            }
            off += len;
        }
        out
    }

    /// Connection `i` reported its query cancelled (57014) on request `seq`: a client's
    /// `pg_cancel_backend` reached the lead connection alone. The other connections still
    /// running that request, and nothing after it, are cancelled too, so every backend ends
    /// it alike (one that finished first is handled as any timing split).
    pub(super) fn spread_cancel(&mut self, i: usize, seq: u64) {
        let Some(req) = self.pending.front_mut().filter(|r| r.seq == seq && !r.cancel_spread) else { return };
        req.cancel_spread = true;
        let others = req.remaining & !(1u64 << i);
        for j in bits(others) {
            let c = &self.conns[j];
            // Only where this request is all that is queued: a cancel arriving after it
            // finished must not reach the next one.
            if c.alive && c.queue.len() == 1 && c.queue.front() == Some(&seq) {
                tracing::debug!(backend = %c.backend.name, "passing a query cancel on");
                super::cancel::send_cancel(CancelTarget { addr: c.backend.addr.clone(), pid: c.key.0, secret: c.key.1 });
            }
        }
    }
}
