//! Routing: which backends get the next client message, and whether it opens a request.
//!
//! The contract's routing table in code. Reads outside a transaction go to one backend (or all,
//! with `read_policy = "all"`); everything else goes to every in-sync backend of the session.
//! The router cuts the client's byte stream into dispatch units: a Query or FunctionCall, an
//! extended-protocol batch up to its Sync (or up to a Flush, which forces an early decision),
//! and COPY data, which follows the COPY it belongs to. It keeps the per-session facts routing
//! depends on: prepared statements' classes, whether a transaction is open, COPY mode.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Waker;

use bytes::{Buf, Bytes, BytesMut};

use crate::config::ReadPolicy;
use crate::fanout::BackendConn;
use crate::order::{self, Acquire, LockOwner, Mode, Res};
use crate::protocol::message::{
    self, BIND, CLOSE, COPY_DATA, COPY_DONE, COPY_FAIL, DESCRIBE, EXECUTE, FLUSH, FUNCTION_CALL, PARSE, QUERY, SYNC, TERMINATE,
};
use crate::protocol::{FrameCodec, ProtocolError};
use crate::sql::analyze::{analyze_cached, analyze_query_cached, ddl_only, Analysis, Chosen};
use crate::sql::catalog::{Catalog, CatalogSlot, ReadGuardState};
use crate::sql::rewrite::{self, CopyFiller, Values};
use crate::sql::{classify, touches_guards, Class, Isolation, TxEffect};

/// What routing needs from outside the router for one call.
pub struct RouteCtx<'a> {
    pub alive: u64,
    pub conns: &'a [BackendConn],
    pub policy: ReadPolicy,
    /// Requests in flight at which a backend counts as busy for reads (`read_capacity`).
    pub read_capacity: u32,
    pub catalog_slot: &'a CatalogSlot,
    /// The session's own DDL transaction is open: it analyses with the last catalog loaded
    /// (it holds the cluster-wide lock) and never waits for a reload.
    pub ddl_open: bool,
    /// The catalog, read from the slot at the first write that needs it (reads never do).
    pub catalog_cache: Option<Option<Arc<Catalog>>>,
    pub db: u32,
    pub locks: &'a mut LockOwner,
    pub waker: &'a Waker,
    pub allow_unsafe: bool,
    /// No request is in flight: a reply Chorus writes itself is in order.
    pub idle: bool,
    /// The transaction wrote and is not recorded in the update history yet.
    pub record_due: bool,
}

impl RouteCtx<'_> {
    fn catalog(&mut self) -> Option<Arc<Catalog>> {
        let (slot, ddl_open) = (self.catalog_slot, self.ddl_open);
        self.catalog_cache.get_or_insert_with(|| if ddl_open { slot.last() } else { slot.get() }).clone()
    }

    /// A write must wait: it needs the catalog, which is being (re)loaded. DDL alone waits only
    /// when the last catalog loaded cannot be trusted for the names it gives (none yet, or DDL
    /// under the cluster-wide lock ended since): it is locked by its names, and DDL of other
    /// sessions ending meanwhile does not hold it back.
    fn must_wait_for_catalog(&mut self, sql: &[u8]) -> bool {
        if self.ddl_open || self.catalog().is_some() {
            return false;
        }
        !ddl_only(sql) || !self.catalog_slot.last().is_some_and(|c| self.catalog_slot.names_lockable(&c))
    }

    /// The catalog to analyse `sql` with: the current one, or for DDL the last one loaded.
    fn catalog_for(&mut self, sql: &[u8]) -> Option<Arc<Catalog>> {
        match self.catalog() {
            None if ddl_only(sql) => self.catalog_slot.last(),
            c => c,
        }
    }
}

/// A statement the session prepared: how it routes, and what Chorus adds at each Bind.
#[derive(Clone)]
struct Prepared {
    class: Class,
    analysis: Option<Arc<Analysis>>,
    /// The client's parameter count; Chorus's own parameters follow it.
    base: usize,
    extra: Arc<[Chosen]>,
}

impl Prepared {
    fn unknown() -> Prepared {
        Prepared { class: Class::UNKNOWN, analysis: None, base: 0, extra: Arc::from([]) }
    }
}

/// An extended batch that was partly forwarded (at a Flush) and awaits its Sync.
#[derive(Clone, Copy)]
struct OpenBatch {
    seq: u64,
    targets: u64,
}

/// COPY FROM STDIN in progress: CopyData, CopyDone/Fail and the Syncs PostgreSQL ignores in
/// copy mode follow the COPY to its backends and open no request.
struct CopyIn {
    seq: u64,
    targets: u64,
    extended: bool,
    ended: bool,
    /// Adds Chorus's values for left-out volatile defaults to every row.
    filler: Option<CopyFiller>,
}

/// The snapshot barrier of a REPEATABLE READ or SERIALIZABLE transaction. Such a transaction
/// keeps the snapshot its first statement takes; were a commit of another session half done
/// (on one backend, not yet on another) at that moment, the snapshots would differ between
/// backends. So that first statement takes the cluster-wide resource in shared mode: it waits
/// until no write transaction is in flight and holds new ones back until it has completed on
/// every backend, then steps aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Barrier {
    #[default]
    None,
    /// The transaction is strict and its snapshot is not taken yet.
    Pending,
    /// Request `seq` takes the snapshot under the barrier.
    Held(u64),
}

/// A request to remember until its reply is complete.
pub struct NewRequest {
    pub seq: u64,
    pub targets: u64,
    pub writes: bool,
    pub sql: Bytes,
    pub retry: Option<Bytes>,
    /// Rows it returns are compared between backends (writes with RETURNING).
    pub hash_rows: bool,
    /// It may change the catalog.
    pub ddl: bool,
    /// Per Describe of a statement in it: how many parameter types the client may see.
    pub trims: Vec<Option<u16>>,
    /// Chorus's own (a BEGIN it already answered): compared, never forwarded.
    pub internal: bool,
    /// Part of the session's unit of work for the diff log (everything but a read outside a
    /// transaction).
    pub logged: bool,
    /// What the unit logs in place of the frames sent, when they differ (a record sent as Bind
    /// alone, its statement prepared on these connections, is logged whole for a replay).
    pub logged_as: Option<Bytes>,
    /// It reads facts of each server: only success or error is compared, not its rows.
    pub per_server: bool,
    /// It signals a process by its number (`Class::signals`): sent to the lead alone, never
    /// run again elsewhere.
    pub signals: bool,
    /// The lead's reply goes to the client (anything but a pure read): what the client then
    /// does relies on the lead having done it (LISTEN before a NOTIFY the lead delivers).
    pub lead_answers: bool,
    /// A write outside a transaction: the sequence number kept free before it for the BEGIN
    /// that Chorus may wrap it in (to record it in the update history in its transaction).
    pub begin_seq: Option<u64>,
}

impl NewRequest {
    /// Chorus's own request of the unit (`internal`: its replies never reach the client), to
    /// every target, answered by the lead.
    pub fn own(seq: u64, targets: u64, sql: Bytes, internal: bool) -> NewRequest {
        NewRequest {
            seq,
            targets,
            writes: false,
            sql,
            retry: None,
            hash_rows: false,
            ddl: false,
            trims: Vec::new(),
            internal,
            logged: true,
            logged_as: None,
            per_server: false,
            signals: false,
            lead_answers: true,
            begin_seq: None,
        }
    }
}

pub enum Dispatch {
    /// The next unit writes and must wait for locks first.
    NeedsLocks,
    /// The next unit writes and its analysis needs the catalog, which is being (re)loaded.
    NeedsCatalog,
    /// The next unit ends a transaction: it waits until every backend has finished what came
    /// before it, so no backend commits a transaction that another is still failing.
    NeedsIdle,
    /// The next message commits a transaction that wrote: the session records the unit in the
    /// update history first (asked once per transaction).
    Record,
    Terminate,
    /// Answer the client directly; nothing goes to the backends (yet).
    Reply(Bytes),
    /// A message consumed with no effect (as PostgreSQL ignores it).
    Ignored,
    /// Chorus's error statement in extended form (Parse, Bind, Execute) in place of part of a
    /// batch: sent like `Send`, and the ParseComplete and BindComplete it earns are not the
    /// client's.
    Inject {
        bytes: Bytes,
        targets: u64,
        request: Option<NewRequest>,
    },
    Send {
        bytes: Bytes,
        targets: u64,
        request: Option<NewRequest>,
    },
}

#[derive(Default)]
pub struct Router {
    /// A transaction is open or about to be (judged from what was sent, settled by replies).
    pub tx_open: bool,
    /// Transaction ends routed so far: a request routed with the transaction open before and
    /// after it, and no end between, cannot commit.
    pub tx_ends: u64,
    named: HashMap<Box<[u8]>, Prepared>,
    /// Named statements' Parse frames as sent, to prepare them on a backend that joins.
    parse_frames: HashMap<Box<[u8]>, Bytes>,
    unit_statements: Vec<(Box<[u8]>, Option<Bytes>)>,
    unnamed: Option<(Prepared, u64)>,
    /// The unnamed statement's Parse frame as sent, to prepare it where it is missing.
    unnamed_frame: Option<Bytes>,
    /// The transaction's timestamp, chosen at its first use.
    tx_time: Option<String>,
    /// The session's default isolation is REPEATABLE READ or SERIALIZABLE (or may be).
    strict_default: bool,
    /// The default isolation the session got at login (server, database, role and startup
    /// settings, read from the backends): what RESET and DISCARD ALL bring back.
    login_strict: bool,
    /// The open transaction is (or may be) REPEATABLE READ or SERIALIZABLE: every statement
    /// of it goes to every backend.
    tx_strict: bool,
    /// The newest request the lead runs alone inside a transaction, while it is in flight:
    /// what goes to the other backends waits for its outcome (an error there aborts the
    /// transaction on the lead alone, and the others follow before anything else reaches them).
    lead_read: Option<u64>,
    /// A plain BEGIN the client was already told about, sent with the next unit.
    deferred_begin: Option<Bytes>,
    barrier: Barrier,
    /// An error the next write gets instead of running (deadlock victim, lock timeout).
    fail_next: Option<(&'static str, String)>,
    /// The open transaction was aborted by Chorus (a connection of the session was lost in
    /// it): the client's next statement gets this 40001 from Chorus, unless it ends the
    /// transaction.
    tx_failed: Option<String>,
    locks: Vec<(Res, Mode)>,
    batch: Option<OpenBatch>,
    copy: Option<CopyIn>,
    /// The open transaction's commit was announced with `Dispatch::Record`.
    recorded: bool,
}

/// Forward an incomplete extended batch once this much of it has arrived.
const BATCH_EARLY: usize = 64 * 1024;

impl Router {
    /// A session's router; `login_strict`: its default isolation at login is strict.
    pub fn new(login_strict: bool) -> Router {
        Router { strict_default: login_strict, login_strict, ..Router::default() }
    }

    /// A backend the session connects to later reports its login default: a strict one on
    /// any backend makes the session's default strict.
    pub fn learn_login_default(&mut self, strict: bool) {
        if strict {
            self.login_strict = true;
            self.strict_default = true;
        }
    }

    /// Cuts and routes the next dispatch unit from `cbuf`. None when more bytes are needed.
    pub fn next(
        &mut self,
        cbuf: &mut BytesMut,
        codec: &FrameCodec,
        ctx: &mut RouteCtx<'_>,
        next_seq: &mut u64,
    ) -> Result<Option<Dispatch>, ProtocolError> {
        let alive = ctx.alive;
        let Some((tag, len)) = codec.peek(cbuf)? else {
            return Ok(None);
        };
        if let Some(begin) = self.deferred_begin.take() {
            if tag == TERMINATE {
                return Ok(Some(Dispatch::Terminate)); // the backends never saw the transaction
            }
            // The BEGIN goes first, in the same write as what follows it.
            let request = NewRequest::own(take_seq(next_seq), alive, begin.clone(), true);
            return Ok(Some(Dispatch::Send { bytes: begin, targets: alive, request: Some(request) }));
        }
        if let Some(copy) = &mut self.copy {
            if matches!(tag, COPY_DATA | COPY_DONE | COPY_FAIL | SYNC | FLUSH) {
                let targets = copy.targets & alive;
                let frame = cbuf.split_to(len);
                let bytes = match (&mut copy.filler, tag) {
                    (Some(f), COPY_DATA) => {
                        let mut data = Vec::with_capacity(len + 64);
                        f.feed(&frame[5..], &mut data);
                        let mut out = BytesMut::with_capacity(data.len() + 5);
                        message::copy_data_msg(&mut out, &data);
                        out.freeze()
                    }
                    (Some(f), COPY_DONE) => {
                        let mut data = Vec::new();
                        f.finish(&mut data);
                        let mut out = BytesMut::with_capacity(data.len() + 10);
                        if !data.is_empty() {
                            message::copy_data_msg(&mut out, &data);
                        }
                        out.extend_from_slice(&frame);
                        out.freeze()
                    }
                    _ => frame.freeze(),
                };
                match tag {
                    COPY_DONE | COPY_FAIL if copy.extended => copy.ended = true,
                    COPY_DONE | COPY_FAIL => self.copy = None,
                    SYNC if copy.ended => self.copy = None,
                    _ => {}
                }
                return Ok(Some(Dispatch::Send { bytes, targets, request: None }));
            }
        }
        match tag {
            // Outside copy mode PostgreSQL accepts and ignores these (the client of a COPY that
            // failed may still be sending): so does Chorus, without troubling the backends.
            COPY_DATA | COPY_DONE | COPY_FAIL => {
                cbuf.advance(len);
                Ok(Some(Dispatch::Ignored))
            }
            QUERY => {
                // A simple Query destroys the unnamed statement, on every backend it reaches.
                self.unnamed = None;
                self.unnamed_frame = None;
                let sql = message::query_sql(&cbuf[5..len])?;
                let class = guard_read(classify(sql), sql, ctx);
                if let Some(d) = self.tx_failed_reply(class, ctx) {
                    if matches!(d, Dispatch::Reply(_)) {
                        cbuf.advance(len);
                    }
                    return Ok(Some(d));
                }
                if class.tx == TxEffect::Begin && ctx.idle && !self.tx_open && self.batch.is_none() && is_plain_begin(sql) {
                    // Nothing happens on a server between BEGIN and the next statement: answer it
                    // now and send it along with that statement, saving a round trip.
                    self.deferred_begin = Some(cbuf.split_to(len).freeze());
                    self.apply_tx(class);
                    return Ok(Some(Dispatch::Reply(Bytes::from_static(BEGIN_REPLY))));
                }
                if self.lead_read.is_some() && self.must_wait_for_lead(self.lead_alone(class, ctx).is_some(), ctx) {
                    return Ok(Some(Dispatch::NeedsIdle));
                }
                // (The unit's record, just sent, travels with the COMMIT: no wait for it.)
                if class.tx == TxEffect::End && self.tx_open && !ctx.idle && !self.recorded {
                    return Ok(Some(Dispatch::NeedsIdle));
                }
                if class.tx == TxEffect::End && self.tx_open && ctx.record_due && !self.recorded && crate::sql::commits(sql) {
                    self.recorded = true;
                    return Ok(Some(Dispatch::Record));
                }
                if crate::sql::own_schema::touches(sql) {
                    metrics::counter!("chorus_own_schema_refusals_total").increment(1);
                    let mut buf = BytesMut::new();
                    message::query_msg(&mut buf, &rewrite::error_statement("42501", crate::sql::own_schema::REFUSAL));
                    cbuf.advance(len);
                    return Ok(Some(self.send_query(buf.freeze(), Class::SESSION, false, false, None, false, ctx, next_seq)));
                }
                // Reads and session statements need no analysis: the fast path.
                if class.writes && self.fail_next.is_none() && ctx.must_wait_for_catalog(sql) {
                    return Ok(Some(Dispatch::NeedsCatalog));
                }
                self.note_isolation(class, sql);
                let plan = class.writes.then(|| analyze_query_cached(sql, ctx.catalog_for(sql).as_deref()));
                Ok(Some(self.standalone(cbuf, len, class, plan, ctx, next_seq)))
            }
            FUNCTION_CALL => {
                if self.must_wait_for_lead(false, ctx) {
                    return Ok(Some(Dispatch::NeedsIdle));
                }
                let plan = Arc::new(Analysis { class: Class::UNKNOWN, global: true, ..Analysis::default() });
                Ok(Some(self.standalone(cbuf, len, Class::UNKNOWN, Some(plan), ctx, next_seq)))
            }
            TERMINATE => Ok(Some(Dispatch::Terminate)),
            PARSE | BIND | DESCRIBE | EXECUTE | CLOSE | FLUSH | SYNC => self.extended(cbuf, codec, ctx, next_seq),
            other => Err(ProtocolError::UnexpectedTag(other as char)),
        }
    }

    /// The reply to every request so far is in; the transaction status is known for sure.
    pub fn settle(&mut self, status: u8) {
        self.tx_open = status != b'I';
        if !self.tx_open {
            self.recorded = false;
            self.tx_time = None;
            self.barrier = Barrier::None;
            self.tx_strict = false;
        }
    }

    /// The lead alone, for a statement proven read-only inside a READ COMMITTED transaction
    /// (the contract's routing table): such a statement changes nothing on the other backends,
    /// and READ COMMITTED takes a new snapshot for every statement, so they stay in step. The
    /// lead has every write of the transaction (G6). A REPEATABLE READ or SERIALIZABLE
    /// transaction, or one whose isolation Chorus cannot be sure of, sends everything to all.
    fn lead_alone(&self, class: Class, ctx: &RouteCtx<'_>) -> Option<u64> {
        let plain_read = (class.read_only || class.empty) && class.tx == TxEffect::None && !class.copy_in;
        if !self.tx_open || self.deferred_begin.is_some() || !plain_read {
            return None;
        }
        // A pid names a process of the lead (the pid the client was given is its lead's): a
        // signal runs there in any transaction (docs/compatibility.md on the snapshot of a
        // strict transaction it would take first).
        if (self.tx_strict || self.barrier != Barrier::None) && !class.signals {
            return None;
        }
        lead_of(ctx)
    }

    /// Where a read outside a transaction goes: one backend (`read_policy = "one"`), the lead
    /// when it reads per-server facts (process ids, activity: what the client then names by
    /// pid lives there), else every backend.
    fn read_targets(&self, class: Class, pool: u64, ctx: &RouteCtx<'_>) -> u64 {
        if class.per_server || class.signals {
            if let Some(lead) = lead_of(ctx) {
                return lead;
            }
        }
        if ctx.policy == ReadPolicy::One {
            least_busy(pool, ctx)
        } else {
            ctx.alive
        }
    }

    /// A write that may change the session's isolation without Chorus reading how (a
    /// `set_config` call, a DO block naming it) makes the session count as strict until it
    /// sets its isolation in a way Chorus reads.
    fn note_isolation(&mut self, class: Class, sql: &[u8]) {
        if class.writes && class.iso == Isolation::Unchanged && crate::sql::mentions_isolation(sql) {
            self.strict_default = true;
            self.tx_strict |= self.tx_open;
        }
    }

    /// A unit routed elsewhere than the lead alone (`lead_only` false) while the lead alone
    /// runs a read: it waits for that read's outcome.
    fn must_wait_for_lead(&self, lead_only: bool, ctx: &RouteCtx<'_>) -> bool {
        self.lead_read.is_some() && !ctx.idle && self.batch.is_none() && !lead_only
    }

    /// The request the lead ran alone inside a transaction (its ending in an error aborts the
    /// transaction there only).
    pub fn is_lead_read(&self, seq: u64) -> bool {
        self.lead_read == Some(seq)
    }

    /// The next write fails with this error instead of running.
    pub fn fail_next(&mut self, code: &'static str, message: String) {
        self.fail_next = Some((code, message));
    }

    pub fn clear_fail_next(&mut self) {
        self.fail_next = None;
    }

    /// The open transaction is aborted on every backend: the client learns it with 40001 at
    /// its next statement.
    pub fn fail_transaction(&mut self, message: String) {
        self.tx_failed = Some(message);
    }

    /// The answer for a statement of a transaction Chorus aborted: 40001, and the transaction
    /// stays failed (the backends answer what follows with 25P02, COMMIT with ROLLBACK).
    fn tx_failed_reply(&mut self, class: Class, ctx: &RouteCtx<'_>) -> Option<Dispatch> {
        self.tx_failed.as_ref()?;
        if class.tx == TxEffect::End {
            self.tx_failed = None;
            return None;
        }
        if !ctx.idle {
            return Some(Dispatch::NeedsIdle);
        }
        let msg = self.tx_failed.take().unwrap_or_default();
        let mut buf = BytesMut::new();
        message::error_response(&mut buf, message::Severity::Error, "40001", &msg);
        message::ready_for_query(&mut buf, b'E');
        Some(Dispatch::Reply(buf.freeze()))
    }

    /// The session's wait for locks closed a cycle: its unit fails with 40P01.
    pub fn deadlocked(&mut self) {
        metrics::counter!("chorus_deadlocks_total").increment(1);
        self.fail_next = Some(("40P01", DEADLOCK.into()));
    }

    /// The values for one execution: the transaction's timestamp (new per statement outside
    /// a transaction) and the statement's clock.
    fn values(&mut self) -> Values {
        let now = rewrite::timestamp_now();
        let tx_time = if self.tx_open { self.tx_time.get_or_insert_with(|| now.clone()).clone() } else { now.clone() };
        Values { tx_time, stmt_time: now }
    }

    /// Asks again for the locks the last write waited for.
    pub fn retry_locks(&self, owner: &mut LockOwner, waker: &Waker) -> Acquire {
        owner.acquire(&self.locks, waker)
    }

    /// Takes the locks `plan` needs with these bind parameters. Err carries the replacement
    /// error statement when the session must not run it (deadlock victim, lock timeout).
    /// A Bind Chorus cannot read (the backends will say what is wrong with it) locks as one
    /// whose parameters are unknown: its tables, not its keys.
    fn lock(&mut self, plans: &[(&Analysis, Option<&[u8]>)], barrier: bool, ctx: &mut RouteCtx<'_>) -> Acquire {
        self.locks.clear();
        if barrier {
            self.locks.push((Res::Global, Mode::Shared));
        }
        // The catalog the analyses were made with (current, or the last one for DDL).
        let cat = ctx.catalog().or_else(|| ctx.catalog_slot.last());
        let name_of = |oid: u32| cat.as_ref().and_then(|c| c.relation(oid)).map(|r| order::name_key(&r.name));
        let mut named: Vec<&str> = Vec::new();
        for (a, bind) in plans {
            let view = bind.and_then(|b| message::bind_view(b).ok());
            // DDL by its names only with a catalog that may be trusted for them; a table the
            // catalog does not know only where this session's own DDL holds its name.
            let ddl_ok = a.names.is_empty() || cat.as_deref().is_some_and(|c| ctx.catalog_slot.names_lockable(c));
            let own_ok = a.own_targets.iter().all(|t| {
                named.contains(&t.as_str())
                    || ctx.locks.holds(Res::Table { db: ctx.db, name: order::name_key(t) }, Mode::Exclusive)
            });
            let input = order::LockInput { db: ctx.db, bind: view.as_ref(), name_of: &name_of, global: !(ddl_ok && own_ok) };
            order::lock_set(a, &input, &mut self.locks);
            named.extend(a.names.iter().map(String::as_str));
        }
        ctx.locks.acquire(&self.locks, ctx.waker)
    }

    /// Request `seq` is complete: a COPY it started is over whatever the client sends next.
    /// Returns whether it was a snapshot barrier, which the session now lifts.
    pub fn request_done(&mut self, seq: u64) -> bool {
        if self.lead_read == Some(seq) {
            self.lead_read = None;
        }
        let barrier = self.barrier == Barrier::Held(seq);
        if barrier {
            self.barrier = Barrier::None;
        }
        if self.copy.as_ref().is_some_and(|c| c.seq == seq) {
            self.copy = None;
        }
        barrier
    }

    /// Whether a unit of this class takes the snapshot of a strict transaction that stays open.
    fn wants_barrier(&self, class: Class) -> bool {
        if !class.data {
            return false;
        }
        match self.barrier {
            Barrier::Pending => true,
            Barrier::Held(_) => false,
            Barrier::None => {
                class.tx == TxEffect::Begin
                    && (class.iso == Isolation::TxStrict || (self.strict_default && class.iso == Isolation::Unchanged))
            }
        }
    }

    fn standalone(
        &mut self,
        cbuf: &mut BytesMut,
        len: usize,
        lexical: Class,
        plan: Option<Arc<Analysis>>,
        ctx: &mut RouteCtx<'_>,
        next_seq: &mut u64,
    ) -> Dispatch {
        let class = plan.as_ref().map_or(lexical, |a| a.class);
        let class = Class { per_server: class.per_server || lexical.per_server, signals: lexical.signals, ..class };
        let barrier = self.wants_barrier(class);
        let write = plan.as_deref().filter(|a| a.class.writes);
        let mut replacement = plan.as_ref().and_then(|a| self.refusal(a, ctx));
        if replacement.is_none() && (write.is_some() || barrier) {
            replacement = match self.fail_next.take() {
                Some((code, msg)) => Some(rewrite::error_statement(code, &msg)),
                None => {
                    let plans: Vec<(&Analysis, Option<&[u8]>)> = write.map(|a| (a, None)).into_iter().collect();
                    match self.lock(&plans, barrier, ctx) {
                        Acquire::Granted => None,
                        Acquire::Wait => return Dispatch::NeedsLocks,
                        Acquire::Deadlock => Some(deadlock_statement()),
                    }
                }
            };
        }
        if let Some(sql) = replacement {
            // Every backend fails the same way; nothing of the original statement runs.
            let mut buf = BytesMut::new();
            message::query_msg(&mut buf, &sql);
            cbuf.advance(len);
            return self.send_query(buf.freeze(), Class::SESSION, false, false, None, false, ctx, next_seq);
        }
        let Some(a) = plan else {
            let bytes = cbuf.split_to(len).freeze();
            return self.send_query(bytes, class, false, false, None, barrier, ctx, next_seq);
        };
        let text =
            std::str::from_utf8(message::query_sql(&cbuf[5..len]).unwrap_or_default()).ok().filter(|_| !a.edits.is_empty());
        let (bytes, filler) = match text {
            Some(text) => {
                let values = self.values();
                let mut buf = BytesMut::new();
                message::query_msg(&mut buf, &rewrite::with_literals(text, &a.edits, &values));
                cbuf.advance(len);
                (buf.freeze(), a.copy_fill.as_ref().map(|(f, v)| CopyFiller::new(f.clone(), v.clone(), values)))
            }
            None => (cbuf.split_to(len).freeze(), None),
        };
        self.send_query(bytes, class, a.hash_rows, a.ddl, filler, barrier, ctx, next_seq)
    }

    /// The 0A000 error statement for a refused construct, unless configured to allow it.
    fn refusal(&self, a: &Analysis, ctx: &RouteCtx<'_>) -> Option<String> {
        let why = a.refusal.as_ref()?;
        if ctx.allow_unsafe {
            metrics::counter!("chorus_unsafe_statements_total", "action" => "allowed").increment(1);
            return None;
        }
        metrics::counter!("chorus_unsafe_statements_total", "action" => "refused").increment(1);
        Some(rewrite::error_statement(
            "0A000",
            &format!(
                "Chorus cannot make this statement deterministic on every backend: {why}; \
                 set unsafe_statements = \"allow\" to pass it through at your own risk"
            ),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn send_query(
        &mut self,
        bytes: Bytes,
        class: Class,
        hash_rows: bool,
        ddl: bool,
        mut filler: Option<CopyFiller>,
        barrier: bool,
        ctx: &RouteCtx<'_>,
        next_seq: &mut u64,
    ) -> Dispatch {
        // After a Flush the extended batch awaits its Sync, and this message ends it instead:
        // the server answers it with the one ReadyForQuery that closes both, so it joins the
        // batch's request on the batch's backends.
        let open = self.batch.take();
        let read = class.read_only || class.empty;
        let lead = if open.is_none() { self.lead_alone(class, ctx) } else { None };
        let targets = match open {
            Some(b) => b.targets & ctx.alive,
            None if read && !self.tx_open => self.read_targets(class, ctx.alive, ctx),
            None => lead.unwrap_or(ctx.alive),
        };
        let begin_seq = (open.is_none() && class.writes && !self.tx_open).then(|| take_seq(next_seq));
        let seq = open.map_or_else(|| take_seq(next_seq), |b| b.seq);
        let tx_was_open = self.tx_open;
        self.apply_tx(class);
        if barrier {
            self.barrier = Barrier::Held(seq);
        }
        if class.copy_in {
            self.copy = Some(CopyIn { seq, targets, extended: false, ended: false, filler: filler.take() });
        }
        if open.is_some() {
            return Dispatch::Send { bytes, targets, request: None };
        }
        if lead.is_some() {
            self.lead_read = Some(seq);
        }
        // A read on one backend that fails before it answered runs again on another (inside
        // a transaction every backend holds the same transaction).
        let retry =
            (targets.count_ones() == 1 && read && !class.signals && (!self.tx_open || lead.is_some())).then(|| bytes.clone());
        Dispatch::Send {
            bytes: bytes.clone(),
            targets,
            request: Some(NewRequest {
                seq,
                targets,
                writes: class.writes,
                sql: bytes,
                retry,
                hash_rows,
                ddl,
                trims: Vec::new(),
                internal: false,
                logged: !read || tx_was_open,
                logged_as: None,
                per_server: class.per_server,
                signals: class.signals,
                lead_answers: !read || class.per_server,
                begin_seq,
            }),
        }
    }

    /// How a Parse's statement routes and what Chorus adds to it; its rewritten text if any.
    fn prepare(&self, body: &[u8], ctx: &mut RouteCtx<'_>) -> Result<(Prepared, Option<String>), ProtocolError> {
        let (_, sql) = message::parse_fields(body)?;
        let lexical = guard_read(classify(sql), sql, ctx);
        if !lexical.writes {
            return Ok((Prepared { class: lexical, analysis: None, base: 0, extra: Arc::from([]) }, None));
        }
        let a = analyze_cached(sql, ctx.catalog_for(sql).as_deref());
        let class = Class { per_server: a.class.per_server || lexical.per_server, signals: lexical.signals, ..a.class };
        let declared = parse_type_count(body);
        let base = a.max_param.max(declared);
        let mut rewritten = None;
        let mut extra: Arc<[Chosen]> = Arc::from([]);
        if !a.edits.is_empty() && a.refusal.is_none() {
            if let Ok(text) = std::str::from_utf8(sql) {
                let (new, chosen) = rewrite::with_params(text, &a.edits, base);
                rewritten = Some(new);
                extra = chosen.into();
            }
        }
        Ok((Prepared { class, analysis: Some(a), base, extra }, rewritten))
    }

    /// Reads the extended-protocol messages at the head of `cbuf` (up to a Sync or Flush, or
    /// the first message of another kind) and notes what they do; Chorus's rewrites are
    /// prepared, nothing is consumed. `Err`: the batch waits (for the catalog).
    fn scan_extended(
        &mut self,
        cbuf: &BytesMut,
        codec: &FrameCodec,
        ctx: &mut RouteCtx<'_>,
    ) -> Result<Result<Scan, Dispatch>, ProtocolError> {
        let mut sc = Scan::new();
        while let Some((tag, len)) = codec.peek(&cbuf[sc.off..])? {
            let (off, body) = (sc.off, &cbuf[sc.off + 5..sc.off + len]);
            match tag {
                PARSE => {
                    if let Some(d) = self.scan_parse(&mut sc, body, (off, len), ctx)? {
                        return Ok(Err(d));
                    }
                }
                BIND => self.scan_bind(&mut sc, body, (off, len))?,
                CLOSE => {
                    message::target_name(body)?;
                    sc.session_state = true;
                }
                DESCRIBE => {
                    let (kind, name) = message::target_name(body)?;
                    if kind == b'S' {
                        let p = self.statement(&sc, name);
                        sc.trims.push(p.filter(|p| !p.extra.is_empty()).map(|p| p.base as u16));
                    }
                }
                EXECUTE => {
                    message::execute_portal(body)?;
                }
                FLUSH => sc.flushed = true,
                SYNC => sc.synced = true,
                _ => break, // a message outside the extended protocol ends this part
            }
            sc.off += len;
            if sc.synced || sc.flushed {
                break;
            }
        }
        Ok(Ok(sc))
    }

    /// The statement `name` as this batch or an earlier one prepared it.
    fn statement<'s>(&'s self, sc: &'s Scan, name: &[u8]) -> Option<&'s Prepared> {
        if name.is_empty() {
            sc.parsed_unnamed.as_ref().or(self.unnamed.as_ref().map(|u| &u.0))
        } else {
            sc.parsed_named.iter().rev().find(|(n, _)| &**n == name).map(|(_, p)| p).or_else(|| self.named.get(name))
        }
    }

    /// A Parse at `at` (offset, length): analysed, rewritten where Chorus fills in values.
    /// `Some`: the batch waits for the catalog first.
    fn scan_parse(
        &mut self,
        sc: &mut Scan,
        body: &[u8],
        at: (usize, usize),
        ctx: &mut RouteCtx<'_>,
    ) -> Result<Option<Dispatch>, ProtocolError> {
        let (name, sql) = message::parse_fields(body)?;
        if self.fail_next.is_none() && guard_read(classify(sql), sql, ctx).writes && ctx.must_wait_for_catalog(sql) {
            return Ok(Some(Dispatch::NeedsCatalog));
        }
        let (p, rewritten) = self.prepare(body, ctx)?;
        self.note_isolation(p.class, sql);
        if sc.refusal.is_none() && crate::sql::own_schema::touches(sql) {
            metrics::counter!("chorus_own_schema_refusals_total").increment(1);
            sc.refusal = Some(rewrite::error_statement("42501", crate::sql::own_schema::REFUSAL));
        }
        if let Some(sql) = rewritten {
            let mut f = BytesMut::new();
            message::parse_with_text(&mut f, body, &sql)?;
            sc.replaced.push((at.0, at.1, f));
        }
        if let Some(a) = &p.analysis {
            if sc.refusal.is_none() {
                sc.refusal = self.refusal(a, ctx);
            }
            sc.ddl |= a.ddl;
        }
        sc.has_parse = true;
        sc.class = sc.class.then(p.class);
        if name.is_empty() {
            sc.parsed_unnamed = Some(p);
        } else {
            sc.session_state = true;
            sc.parsed_named.push((name.into(), p));
        }
        sc.first_sql.get_or_insert(at);
        Ok(None)
    }

    /// A Bind at `at` (offset, length): what its statement does, the locks a write needs, the
    /// values Chorus adds as parameters.
    fn scan_bind(&mut self, sc: &mut Scan, body: &[u8], at: (usize, usize)) -> Result<(), ProtocolError> {
        let (_, stmt) = message::bind_names(body)?;
        sc.has_bind = true;
        if stmt.is_empty() && sc.parsed_unnamed.is_none() {
            sc.uses_old_unnamed = true;
        }
        let p = self.statement(sc, stmt).cloned().unwrap_or_else(Prepared::unknown);
        sc.class = sc.class.then(p.class);
        sc.hash_rows &= p.analysis.as_ref().is_some_and(|a| a.hash_rows);
        let (from, to) = (at.0 + 5, at.0 + at.1);
        match &p.analysis {
            Some(a) if p.class.writes => sc.writes.push((a.clone(), from, to)),
            None if p.class.writes => {
                sc.writes.push((Arc::new(Analysis { class: Class::UNKNOWN, global: true, ..Analysis::default() }), from, to))
            }
            _ => {}
        }
        if let Some((format, chosen)) = p.analysis.as_ref().and_then(|a| a.copy_fill.as_ref()) {
            sc.copy_filler = Some(CopyFiller::new(format.clone(), chosen.clone(), self.values()));
        }
        if !p.extra.is_empty() {
            let values = self.values();
            let extra: Vec<String> = p.extra.iter().map(|&v| values.text(v)).collect();
            let mut f = BytesMut::new();
            message::bind_with_extra(&mut f, body, &extra)?;
            sc.replaced.push((at.0, at.1, f));
        }
        sc.first_sql.get_or_insert(at);
        Ok(())
    }

    fn extended(
        &mut self,
        cbuf: &mut BytesMut,
        codec: &FrameCodec,
        ctx: &mut RouteCtx<'_>,
        next_seq: &mut u64,
    ) -> Result<Option<Dispatch>, ProtocolError> {
        let mut sc = match self.scan_extended(cbuf, codec, ctx)? {
            Ok(s) => s,
            Err(d) => return Ok(Some(d)),
        };
        let (off, class, synced) = (sc.off, sc.class, sc.synced);
        if off == 0 {
            return Ok(None);
        }
        if off == 5 && cbuf[0] == FLUSH && self.batch.is_none() {
            // A Flush after a Sync (libpq's pipeline mode sends one after each): everything
            // before it is answered as it completes, and PostgreSQL answers a Flush with
            // nothing. Forwarded, it would open a batch that only a Sync ends, and a COMMIT
            // that waits for the session to be idle would wait for it forever.
            cbuf.advance(5);
            return Ok(Some(Dispatch::Ignored));
        }
        let foreign_next = !synced && !sc.flushed && codec.peek(&cbuf[off..])?.is_some();
        // The rest of the batch is on its way while part of a message is: wait for it (the
        // whole batch decides where it goes). Whole messages and nothing more is all the client
        // has sent for now: PostgreSQL runs them as they arrive, and so they go on, as a batch
        // that a later Sync ends.
        let partial = off < cbuf.len();
        if !synced && !sc.flushed && !foreign_next && partial && off < BATCH_EARLY && self.batch.is_none() {
            return Ok(None);
        }
        // A Parse without Bind prepares for later use: every backend must have it.
        let session_state = sc.session_state || (sc.has_parse && !sc.has_bind);
        let read = (class.read_only || class.empty) && !session_state;
        let lead = (synced && read && self.batch.is_none()).then(|| self.lead_alone(class, ctx)).flatten();
        // (A batch without its Sync goes to every backend: it waits too.)
        if self.must_wait_for_lead(lead.is_some(), ctx) {
            return Ok(Some(Dispatch::NeedsIdle));
        }
        let targets = match self.batch {
            Some(b) => b.targets & ctx.alive,
            None if synced && read && !self.tx_open => {
                let pool = match (sc.uses_old_unnamed, &self.unnamed) {
                    (true, Some((_, t))) if t & ctx.alive != 0 => t & ctx.alive,
                    _ => ctx.alive,
                };
                self.read_targets(class, pool, ctx)
            }
            None => lead.unwrap_or(ctx.alive),
        };
        if let Some(d) = self.at_transaction_end(cbuf, &sc, ctx) {
            return Ok(Some(d));
        }
        if let Some(d) = self.prepare_unnamed_where_missing(&sc, targets, next_seq) {
            return Ok(Some(d));
        }
        let barrier = synced && self.batch.is_none() && self.wants_barrier(class);
        if let Some(d) = self.refuse_or_lock(cbuf, &mut sc, barrier, ctx, next_seq) {
            return Ok(Some(d));
        }
        let bytes = if sc.replaced.is_empty() {
            cbuf.split_to(off).freeze()
        } else {
            splice(cbuf.split_to(off), &sc.replaced, &mut sc.first_sql)
        };
        self.track_statements(&bytes, codec);
        for (name, p) in sc.parsed_named.drain(..) {
            self.named.insert(name, p);
        }
        let (seq, request) = match self.batch {
            Some(b) => (b.seq, None),
            None => {
                let r = Scanned {
                    class,
                    read,
                    synced,
                    has_bind: sc.has_bind,
                    hash_rows: sc.hash_rows,
                    ddl: sc.ddl,
                    writes: !sc.writes.is_empty(),
                    lead: lead.is_some(),
                };
                let request = self.new_request(r, &bytes, sc.first_sql, targets, std::mem::take(&mut sc.trims), next_seq);
                (request.seq, Some(request))
            }
        };
        self.batch = if synced { None } else { Some(OpenBatch { seq, targets }) };
        if barrier {
            self.barrier = Barrier::Held(seq);
        }
        if let Some(p) = sc.parsed_unnamed {
            self.unnamed = Some((p, targets));
        }
        self.apply_tx(class);
        if class.copy_in {
            self.copy = Some(CopyIn { seq, targets, extended: true, ended: false, filler: sc.copy_filler });
        }
        Ok(Some(Dispatch::Send { bytes, targets, request }))
    }

    /// A batch binds the unnamed statement an earlier batch parsed on fewer backends than
    /// this one goes to (a read ran on one backend): Chorus's own Parse of it, with a Sync,
    /// goes to those that lack it first, so that every backend answers the Bind alike.
    fn prepare_unnamed_where_missing(&mut self, sc: &Scan, targets: u64, next_seq: &mut u64) -> Option<Dispatch> {
        if !sc.uses_old_unnamed || self.batch.is_some() {
            return None;
        }
        let (Some((_, has)), Some(frame)) = (&mut self.unnamed, &self.unnamed_frame) else { return None };
        let missing = targets & !*has;
        if missing == 0 {
            return None;
        }
        *has |= missing;
        let mut b = BytesMut::with_capacity(frame.len() + message::SYNC_MSG.len());
        b.extend_from_slice(frame);
        b.extend_from_slice(message::SYNC_MSG);
        let bytes = b.freeze();
        let request = NewRequest::own(take_seq(next_seq), missing, bytes.clone(), true);
        Some(Dispatch::Send { bytes, targets: missing, request: Some(request) })
    }

    /// A synced batch that ends the transaction: it waits until the session is idle
    /// elsewhere, or (only the COMMIT) the unit is recorded first, or a failed transaction's
    /// answer is given without the backends.
    fn at_transaction_end(&mut self, cbuf: &mut BytesMut, sc: &Scan, ctx: &RouteCtx<'_>) -> Option<Dispatch> {
        if !sc.synced || self.batch.is_some() {
            return None;
        }
        let ends = sc.class.tx == TxEffect::End && self.tx_open && !self.recorded;
        if ends && !ctx.idle {
            return Some(Dispatch::NeedsIdle);
        }
        // A batch that is only the COMMIT: recorded first. One with more in it is recorded
        // once it has completed (see docs/operations.md on the history's windows).
        if ends && ctx.record_due {
            let only_commit = sc.writes.is_empty()
                && sc.first_sql.is_some_and(|(o, l)| {
                    cbuf[o] == PARSE && message::parse_fields(&cbuf[o + 5..o + l]).is_ok_and(|(_, sql)| crate::sql::commits(sql))
                });
            if only_commit {
                self.recorded = true;
                return Some(Dispatch::Record);
            }
        }
        let d = self.tx_failed_reply(sc.class, ctx)?;
        if matches!(d, Dispatch::Reply(_)) {
            cbuf.advance(sc.off);
        }
        Some(d)
    }

    /// The batch's refusal, the error Chorus was asked to give, or its write locks: `Some`
    /// when it does not go as sent (it waits for locks, or fails on every backend alike).
    fn refuse_or_lock(
        &mut self,
        cbuf: &mut BytesMut,
        sc: &mut Scan,
        barrier: bool,
        ctx: &mut RouteCtx<'_>,
        next_seq: &mut u64,
    ) -> Option<Dispatch> {
        let mut failure = sc.refusal.take();
        if failure.is_none() && (!sc.writes.is_empty() || barrier) {
            if let Some((code, msg)) = self.fail_next.take().filter(|_| !sc.writes.is_empty()) {
                failure = Some(rewrite::error_statement(code, &msg));
            } else {
                let plans: Vec<(&Analysis, Option<&[u8]>)> =
                    sc.writes.iter().map(|(a, s, e)| (&**a, Some(&cbuf[*s..*e]))).collect();
                match self.lock(&plans, barrier, ctx) {
                    Acquire::Granted => {}
                    Acquire::Wait => return Some(Dispatch::NeedsLocks),
                    Acquire::Deadlock => failure = Some(deadlock_statement()),
                }
            }
        }
        let sql = failure?;
        cbuf.advance(sc.off);
        let mut buf = BytesMut::new();
        if !sc.synced || self.batch.is_some() {
            // Part of a batch is on its way already, or the rest may follow: this part
            // becomes Chorus's error statement in extended form. Every backend fails it
            // alike and, as PostgreSQL does after an error, skips the client's messages
            // up to the Sync, which answers the whole batch.
            message::extended_statement(&mut buf, &sql, sc.synced);
            return Some(self.fail_batch(buf.freeze(), sc.synced, ctx, next_seq));
        }
        // The whole batch fails at its first message, on every backend alike.
        message::query_msg(&mut buf, &sql);
        Some(self.send_query(buf.freeze(), Class::SESSION, false, false, None, false, ctx, next_seq))
    }

    /// The request a synced or first part of a batch makes (a batch's later parts go with it).
    fn new_request(
        &mut self,
        r: Scanned,
        bytes: &Bytes,
        first_sql: Option<(usize, usize)>,
        targets: u64,
        trims: Vec<Option<u16>>,
        next_seq: &mut u64,
    ) -> NewRequest {
        // (A batch that only prepares runs nothing: no unit to wrap.)
        let begin_seq = (r.class.writes && r.writes && !self.tx_open).then(|| take_seq(next_seq));
        let seq = take_seq(next_seq);
        let sql = match first_sql {
            Some((o, l)) => bytes.slice(o..o + l),
            None => bytes.slice(0..0),
        };
        let alone = r.synced && r.read && !self.tx_open;
        if r.lead {
            self.lead_read = Some(seq);
        }
        NewRequest {
            seq,
            targets,
            writes: r.class.writes,
            sql,
            retry: ((alone || r.lead) && targets.count_ones() == 1 && !r.class.signals).then(|| bytes.clone()),
            hash_rows: r.hash_rows && r.has_bind && r.class.writes,
            ddl: r.ddl,
            trims,
            internal: false,
            logged: !alone,
            logged_as: None,
            per_server: r.class.per_server,
            signals: r.class.signals,
            lead_answers: !r.read || r.class.per_server,
            begin_seq,
        }
    }

    /// Sends Chorus's error statement (extended form, `bytes`) in place of part of a batch.
    fn fail_batch(&mut self, bytes: Bytes, synced: bool, ctx: &RouteCtx<'_>, next_seq: &mut u64) -> Dispatch {
        let (seq, targets, request) = match self.batch {
            Some(b) => (b.seq, b.targets & ctx.alive, None),
            None => {
                let seq = take_seq(next_seq);
                (seq, ctx.alive, Some(NewRequest::own(seq, ctx.alive, bytes.clone(), false)))
            }
        };
        self.batch = if synced { None } else { Some(OpenBatch { seq, targets }) };
        Dispatch::Inject { bytes, targets, request }
    }

    /// Keeps the Parse frames (as sent) of named statements, and forgets those the client
    /// closed: a backend that joins later gets them before anything else.
    fn track_statements(&mut self, bytes: &Bytes, codec: &FrameCodec) {
        let mut off = 0;
        while let Ok(Some((tag, len))) = codec.peek(&bytes[off..]) {
            match tag {
                CLOSE => {
                    if let Ok((b'S', name)) = message::target_name(&bytes[off + 5..off + len]) {
                        self.named.remove(name);
                        self.unit_statements.push((name.into(), None));
                    }
                }
                PARSE => {
                    if let Ok((name, _)) = message::parse_fields(&bytes[off + 5..off + len]) {
                        if name.is_empty() {
                            self.unnamed_frame = Some(bytes.slice(off..off + len));
                        } else {
                            self.unit_statements.push((name.into(), Some(bytes.slice(off..off + len))));
                        }
                    }
                }
                _ => {}
            }
            off += len;
        }
    }

    /// The unit of work ended: its Parse and Close take their place in the statements a
    /// joining backend gets (until then, those frames are part of the unit itself).
    pub fn commit_statements(&mut self) {
        for (name, frame) in self.unit_statements.drain(..) {
            match frame {
                Some(f) => self.parse_frames.insert(name, f),
                None => self.parse_frames.remove(&name),
            };
        }
    }

    /// The Parse frames of the session's named statements as of its last idle point.
    pub fn statement_frames(&self) -> impl Iterator<Item = &Bytes> {
        self.parse_frames.values()
    }

    /// An extended batch is open: its Sync is still to come.
    pub fn batch_open(&self) -> bool {
        self.batch.is_some()
    }

    /// The request of the extended batch whose Sync is still to come.
    pub fn open_batch(&self) -> Option<u64> {
        self.batch.map(|b| b.seq)
    }

    /// COPY FROM STDIN data is streaming: what was sent cannot be sent again.
    pub fn copy_in_progress(&self) -> bool {
        self.copy.is_some()
    }

    /// A transaction is open on the backends (not just a BEGIN Chorus holds back).
    pub fn backend_tx_open(&self) -> bool {
        self.tx_open && self.deferred_begin.is_none()
    }

    fn apply_tx(&mut self, class: Class) {
        match class.iso {
            Isolation::SessionStrict => self.strict_default = true,
            Isolation::SessionLoose => self.strict_default = false,
            Isolation::SessionReset => self.strict_default = self.login_strict,
            _ => {}
        }
        match class.tx {
            TxEffect::Begin => {
                self.tx_open = true;
                self.tx_time = None;
                // BEGIN ISOLATION LEVEL READ COMMITTED under a strict default counts as
                // strict: only speed is lost.
                self.tx_strict = class.iso == Isolation::TxStrict || self.strict_default;
                self.barrier = if self.tx_strict { Barrier::Pending } else { Barrier::None };
            }
            TxEffect::End => {
                self.tx_open = false;
                self.tx_ends += 1;
                self.tx_time = None;
                self.barrier = Barrier::None;
                self.tx_strict = false;
            }
            TxEffect::None => {
                if class.iso == Isolation::TxStrict && self.tx_open {
                    self.tx_strict = true;
                    if self.barrier == Barrier::None {
                        self.barrier = Barrier::Pending;
                    }
                }
            }
        }
    }
}

/// What `Router::scan_extended` found in the messages at the head of the client's buffer.
struct Scan {
    /// Bytes scanned.
    off: usize,
    class: Class,
    /// The messages leave something in the session (named statements, a Close).
    session_state: bool,
    parsed_unnamed: Option<Prepared>,
    parsed_named: Vec<(Box<[u8]>, Prepared)>,
    /// A Bind of the unnamed statement that an earlier batch parsed.
    uses_old_unnamed: bool,
    has_parse: bool,
    has_bind: bool,
    synced: bool,
    flushed: bool,
    /// The first Parse or Bind: (offset, length).
    first_sql: Option<(usize, usize)>,
    /// Frames Chorus rewrites: (offset, length, new frame).
    replaced: Vec<(usize, usize, BytesMut)>,
    /// Binds of writes, to lock for: (analysis, bind body range).
    writes: Vec<(Arc<Analysis>, usize, usize)>,
    refusal: Option<String>,
    trims: Vec<Option<u16>>,
    hash_rows: bool,
    ddl: bool,
    copy_filler: Option<CopyFiller>,
}

impl Scan {
    fn new() -> Scan {
        Scan {
            off: 0,
            class: Class { empty: true, ..Class::default() },
            session_state: false,
            parsed_unnamed: None,
            parsed_named: Vec::new(),
            uses_old_unnamed: false,
            has_parse: false,
            has_bind: false,
            synced: false,
            flushed: false,
            first_sql: None,
            replaced: Vec::new(),
            writes: Vec::new(),
            refusal: None,
            trims: Vec::new(),
            hash_rows: true,
            ddl: false,
            copy_filler: None,
        }
    }
}

/// What `Router::new_request` needs of a scan once the batch's targets are chosen.
struct Scanned {
    class: Class,
    read: bool,
    synced: bool,
    has_bind: bool,
    hash_rows: bool,
    ddl: bool,
    /// It binds a write (and so may need Chorus's BEGIN around it).
    writes: bool,
    /// The lead runs it alone (a read inside a READ COMMITTED transaction).
    lead: bool,
}

/// The scanned bytes with Chorus's rewritten frames in place; `first_sql` moved to where
/// the first frame now is.
fn splice(orig: BytesMut, replaced: &[(usize, usize, BytesMut)], first_sql: &mut Option<(usize, usize)>) -> Bytes {
    let mut out = BytesMut::with_capacity(orig.len() + 256);
    let mut at = 0;
    for (o, l, f) in replaced {
        out.extend_from_slice(&orig[at..*o]);
        out.extend_from_slice(f);
        at = o + l;
    }
    out.extend_from_slice(&orig[at..]);
    if let Some((o, l)) = first_sql {
        // Point at the first frame in the new bytes: it starts at the same place.
        let shift: isize = replaced.iter().filter(|(ro, _, _)| ro < o).map(|(_, rl, f)| f.len() as isize - *rl as isize).sum();
        *o = (*o as isize + shift) as usize;
        if let Some((_, _, f)) = replaced.iter().find(|(ro, _, _)| ro == o) {
            *l = f.len();
        }
    }
    out.freeze()
}

/// A statement the lexical pass calls a read, checked against what the database's catalog
/// says may run behind it (user functions that overload a built-in name, views over writing
/// functions, user operators). Where the database has none of them (most), this is one
/// atomic load. Without a current catalog the read counts as unknown: a write, analysed once
/// the catalog is loaded.
fn guard_read(class: Class, sql: &[u8], ctx: &RouteCtx<'_>) -> Class {
    if !class.read_only {
        return class;
    }
    let risky = match ctx.catalog_slot.read_guards() {
        ReadGuardState::Clear => false,
        ReadGuardState::Check => ctx.catalog_slot.last().is_none_or(|c| touches_guards(sql, &c.guards)),
        ReadGuardState::Unknown => true,
    };
    if risky {
        Class { per_server: class.per_server, signals: class.signals, tx: class.tx, iso: class.iso, ..Class::UNKNOWN }
    } else {
        class
    }
}

/// The session's lead, when it serves reads (a backend that joined and is not checked yet
/// takes writes only).
fn lead_of(ctx: &RouteCtx<'_>) -> Option<u64> {
    let lead = ctx.alive.trailing_zeros() as usize;
    ctx.conns.get(lead).filter(|c| c.backend.serves_reads())?;
    Some(1u64 << lead)
}

/// The least busy backend among `pool`: the highest-priority backend with fewer than
/// `read_capacity` requests in flight (cluster-wide), else the one with the fewest. Below
/// capacity a backend is not busy, and keeping reads on one server keeps its caches warm:
/// spreading them over servers that are not saturated costs each server cache misses and
/// gains nothing (measured in docs/benchmarks.md).
fn least_busy(pool: u64, ctx: &RouteCtx<'_>) -> u64 {
    // A joined backend that is not checked yet takes writes only.
    let readable = ctx.conns.iter().enumerate().filter(|(_, c)| c.backend.serves_reads()).fold(0u64, |m, (i, _)| m | 1 << i);
    let pool = if pool & readable != 0 { pool & readable } else { pool };
    pick_read(pool, ctx.read_capacity, |i| ctx.conns[i].backend.inflight.load(Ordering::Relaxed)).map_or(pool, |i| 1u64 << i)
}

/// The read policy's choice among `pool` (a mask, lowest bit first = highest priority): the
/// first backend under `capacity` requests in flight, else the least loaded (ties to priority).
fn pick_read(pool: u64, capacity: u32, load: impl Fn(usize) -> u32) -> Option<usize> {
    let mut best: Option<(u32, usize)> = None;
    for i in super::bits(pool) {
        let l = load(i);
        if l < capacity {
            return Some(i);
        }
        if best.is_none_or(|(b, _)| l < b) {
            best = Some((l, i));
        }
    }
    best.map(|(_, i)| i)
}

/// CommandComplete "BEGIN" and ReadyForQuery in a transaction.
static BEGIN_REPLY: &[u8] = b"C\0\0\0\x0aBEGIN\0Z\0\0\0\x05T";

/// `BEGIN`, `BEGIN WORK` or `BEGIN TRANSACTION`, nothing else (no options, no other statement).
fn is_plain_begin(sql: &[u8]) -> bool {
    let mut words = sql.split(|b| b.is_ascii_whitespace() || *b == b';').filter(|w| !w.is_empty());
    let first = words.next();
    let second = words.next();
    if words.next().is_some() || !first.is_some_and(|w| w.eq_ignore_ascii_case(b"begin")) {
        return false;
    }
    // Only whitespace and one trailing ';' may surround the words.
    sql.iter().filter(|&&b| b == b';').count() <= 1
        && second.is_none_or(|w| w.eq_ignore_ascii_case(b"work") || w.eq_ignore_ascii_case(b"transaction"))
}

/// The statement a deadlock victim's backends run instead of its own.
fn deadlock_statement() -> String {
    metrics::counter!("chorus_deadlocks_total").increment(1);
    rewrite::error_statement("40P01", DEADLOCK)
}

const DEADLOCK: &str =
    "deadlock detected by Chorus: this transaction waited for a lock held by a transaction that waits for it; it was rolled back";

/// How many parameter types a Parse declares.
fn parse_type_count(body: &[u8]) -> usize {
    let mut zeros = 0;
    let mut i = 0;
    while i < body.len() && zeros < 2 {
        if body[i] == 0 {
            zeros += 1;
        }
        i += 1;
    }
    body.get(i..i + 2).map(|b| i16::from_be_bytes([b[0], b[1]]).max(0) as usize).unwrap_or(0)
}

fn take_seq(next: &mut u64) -> u64 {
    let s = *next;
    *next += 1;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stay_on_the_first_backend_under_capacity_then_go_to_the_least_loaded() {
        let loads = [5u32, 0, 3];
        let load = |i: usize| loads[i];
        assert_eq!(pick_read(0b111, 8, load), Some(0), "the lead is not busy");
        assert_eq!(pick_read(0b110, 8, load), Some(1), "only what the pool holds");
        assert_eq!(pick_read(0b111, 5, load), Some(1), "the lead is at capacity: the next under it");
        assert_eq!(pick_read(0b101, 3, load), Some(2), "all busy: the least loaded");
        assert_eq!(pick_read(0b101, 1, |_| 4), Some(0), "a tie goes to priority");
        assert_eq!(pick_read(0, 8, load), None);
    }

    #[test]
    fn only_a_plain_begin_is_answered_early() {
        for yes in ["BEGIN", "begin;", "  BEGIN TRANSACTION ;", "Begin Work"] {
            assert!(is_plain_begin(yes.as_bytes()), "{yes}");
        }
        for no in
            ["BEGIN ISOLATION LEVEL SERIALIZABLE", "BEGIN; SELECT 1", "BEGIN;;", "START TRANSACTION", "BEGIN READ ONLY", "begun"]
        {
            assert!(!is_plain_begin(no.as_bytes()), "{no}");
        }
        assert_eq!(BEGIN_REPLY.len(), 11 + 6);
    }
}
