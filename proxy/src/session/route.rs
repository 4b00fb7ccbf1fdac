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

use bytes::{Bytes, BytesMut};

use crate::config::ReadPolicy;
use crate::fanout::BackendConn;
use crate::protocol::message::{
    self, BIND, CLOSE, COPY_DATA, COPY_DONE, COPY_FAIL, DESCRIBE, EXECUTE, FLUSH, FUNCTION_CALL, PARSE, QUERY, SYNC, TERMINATE,
};
use crate::protocol::{FrameCodec, ProtocolError};
use crate::sql::{classify, Class, TxEffect};

/// An extended batch that was partly forwarded (at a Flush) and awaits its Sync.
#[derive(Clone, Copy)]
struct OpenBatch {
    seq: u64,
    targets: u64,
}

/// COPY FROM STDIN in progress: CopyData, CopyDone/Fail and the Syncs PostgreSQL ignores in
/// copy mode follow the COPY to its backends and open no request.
#[derive(Clone, Copy)]
struct CopyIn {
    seq: u64,
    targets: u64,
    extended: bool,
    ended: bool,
}

/// A request to remember until its reply is complete.
pub struct NewRequest {
    pub seq: u64,
    pub targets: u64,
    pub writes: bool,
    pub sql: Bytes,
    pub retry: Option<Bytes>,
}

pub enum Dispatch {
    /// The next unit writes and the session must first take the write order.
    NeedsToken,
    Terminate,
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
    /// The session holds the write order.
    pub has_token: bool,
    named: HashMap<Box<[u8]>, Class>,
    unnamed: Option<(Class, u64)>,
    batch: Option<OpenBatch>,
    copy: Option<CopyIn>,
    last_targets: u64,
    rr: usize,
    /// The backend this session's reads stick to while it is not clearly busier than another.
    home: Option<usize>,
}

/// Forward an incomplete extended batch once this much of it has arrived.
const BATCH_EARLY: usize = 64 * 1024;

impl Router {
    /// Cuts and routes the next dispatch unit from `cbuf`. None when more bytes are needed.
    #[allow(clippy::too_many_arguments)]
    pub fn next(
        &mut self,
        cbuf: &mut BytesMut,
        codec: &FrameCodec,
        alive: u64,
        conns: &[BackendConn],
        policy: ReadPolicy,
        next_seq: &mut u64,
        has_token: bool,
    ) -> Result<Option<Dispatch>, ProtocolError> {
        self.has_token = has_token;
        let Some((tag, len)) = codec.peek(cbuf)? else {
            return Ok(None);
        };
        if let Some(copy) = &mut self.copy {
            if matches!(tag, COPY_DATA | COPY_DONE | COPY_FAIL | SYNC | FLUSH) {
                let targets = copy.targets & alive;
                match tag {
                    COPY_DONE | COPY_FAIL if copy.extended => copy.ended = true,
                    COPY_DONE | COPY_FAIL => self.copy = None,
                    SYNC if copy.ended => self.copy = None,
                    _ => {}
                }
                return Ok(Some(Dispatch::Send { bytes: cbuf.split_to(len).freeze(), targets, request: None }));
            }
        }
        match tag {
            // Outside copy mode PostgreSQL ignores these (a COPY that failed to start).
            COPY_DATA | COPY_DONE | COPY_FAIL => {
                Ok(Some(Dispatch::Send { bytes: cbuf.split_to(len).freeze(), targets: self.last_targets & alive, request: None }))
            }
            QUERY => {
                let class = classify(message::query_sql(&cbuf[5..len])?);
                Ok(Some(self.standalone(cbuf, len, class, alive, conns, policy, next_seq)))
            }
            FUNCTION_CALL => Ok(Some(self.standalone(cbuf, len, Class::UNKNOWN, alive, conns, policy, next_seq))),
            TERMINATE => Ok(Some(Dispatch::Terminate)),
            PARSE | BIND | DESCRIBE | EXECUTE | CLOSE | FLUSH | SYNC => {
                self.extended(cbuf, codec, alive, conns, policy, next_seq)
            }
            other => Err(ProtocolError::UnexpectedTag(other as char)),
        }
    }

    /// The reply to every request so far is in; the transaction status is known for sure.
    pub fn settle(&mut self, status: u8) {
        self.tx_open = status != b'I';
    }

    /// Request `seq` is complete: a COPY it started is over whatever the client sends next.
    pub fn request_done(&mut self, seq: u64) {
        if self.copy.is_some_and(|c| c.seq == seq) {
            self.copy = None;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn standalone(
        &mut self,
        cbuf: &mut BytesMut,
        len: usize,
        class: Class,
        alive: u64,
        conns: &[BackendConn],
        policy: ReadPolicy,
        next_seq: &mut u64,
    ) -> Dispatch {
        if class.writes && !self.has_token {
            return Dispatch::NeedsToken;
        }
        self.batch = None;
        let read = class.read_only || class.empty;
        let targets = if read && !self.tx_open && policy == ReadPolicy::One { self.least_busy(alive, conns) } else { alive };
        let bytes = cbuf.split_to(len).freeze();
        let seq = take_seq(next_seq);
        self.apply_tx(class);
        if class.copy_in {
            self.copy = Some(CopyIn { seq, targets, extended: false, ended: false });
        }
        self.last_targets = targets;
        let retry = (targets.count_ones() == 1 && read && !self.tx_open).then(|| bytes.clone());
        Dispatch::Send {
            bytes: bytes.clone(),
            targets,
            request: Some(NewRequest { seq, targets, writes: class.writes, sql: bytes, retry }),
        }
    }

    fn extended(
        &mut self,
        cbuf: &mut BytesMut,
        codec: &FrameCodec,
        alive: u64,
        conns: &[BackendConn],
        policy: ReadPolicy,
        next_seq: &mut u64,
    ) -> Result<Option<Dispatch>, ProtocolError> {
        let mut off = 0;
        let mut class = Class { empty: true, ..Class::default() };
        let mut session_state = false;
        let mut parsed_unnamed: Option<Class> = None;
        let mut uses_old_unnamed = false;
        let (mut has_parse, mut has_bind) = (false, false);
        let mut synced = false;
        let mut flushed = false;
        let mut first_sql: Option<(usize, usize)> = None;
        while let Some((tag, len)) = codec.peek(&cbuf[off..])? {
            let body = &cbuf[off + 5..off + len];
            match tag {
                PARSE => {
                    let (name, sql) = message::parse_fields(body)?;
                    let c = classify(sql);
                    has_parse = true;
                    if name.is_empty() {
                        parsed_unnamed = Some(c);
                    } else {
                        session_state = true;
                    }
                    class = class.then(c);
                    first_sql.get_or_insert((off, len));
                }
                BIND => {
                    let (_, stmt) = message::bind_names(body)?;
                    has_bind = true;
                    let c = if stmt.is_empty() {
                        parsed_unnamed.or_else(|| {
                            uses_old_unnamed = true;
                            self.unnamed.map(|u| u.0)
                        })
                    } else {
                        self.named.get(stmt).copied()
                    };
                    class = class.then(c.unwrap_or(Class::UNKNOWN));
                    first_sql.get_or_insert((off, len));
                }
                CLOSE => {
                    message::target_name(body)?;
                    session_state = true;
                }
                DESCRIBE => {
                    message::target_name(body)?;
                }
                EXECUTE => {
                    message::execute_portal(body)?;
                }
                FLUSH => flushed = true,
                SYNC => synced = true,
                _ => break, // a message outside the extended protocol ends this part
            }
            off += len;
            if synced || flushed {
                break;
            }
        }
        if off == 0 {
            return Ok(None);
        }
        let foreign_next = !synced && !flushed && codec.peek(&cbuf[off..])?.is_some();
        if !synced && !flushed && !foreign_next && off < BATCH_EARLY && self.batch.is_none() {
            return Ok(None); // wait for the rest of the batch
        }
        if class.writes && !self.has_token {
            return Ok(Some(Dispatch::NeedsToken));
        }
        // A Parse without Bind prepares for later use: every backend must have it.
        if has_parse && !has_bind {
            session_state = true;
        }
        let read = (class.read_only || class.empty) && !session_state;
        let targets = match self.batch {
            Some(b) => b.targets & alive,
            None if synced && read && !self.tx_open && policy == ReadPolicy::One => {
                let pool = match (uses_old_unnamed, self.unnamed) {
                    (true, Some((_, t))) if t & alive != 0 => t & alive,
                    _ => alive,
                };
                self.least_busy(pool, conns)
            }
            None => alive,
        };
        let bytes = cbuf.split_to(off).freeze();
        self.remember_statements(&bytes, codec);
        let (seq, request) = match self.batch {
            Some(b) => (b.seq, None),
            None => {
                let seq = take_seq(next_seq);
                let sql = match first_sql {
                    Some((o, l)) => bytes.slice(o..o + l),
                    None => bytes.slice(0..0),
                };
                let retry = (synced && targets.count_ones() == 1 && read && !self.tx_open).then(|| bytes.clone());
                (seq, Some(NewRequest { seq, targets, writes: class.writes, sql, retry }))
            }
        };
        self.batch = if synced { None } else { Some(OpenBatch { seq, targets }) };
        if parsed_unnamed.is_some() {
            self.unnamed = parsed_unnamed.map(|c| (c, targets));
        }
        self.apply_tx(class);
        if class.copy_in {
            self.copy = Some(CopyIn { seq, targets, extended: true, ended: false });
        }
        self.last_targets = targets;
        Ok(Some(Dispatch::Send { bytes, targets, request }))
    }

    /// Keeps the class of every named statement, so a later Bind routes without the SQL.
    fn remember_statements(&mut self, bytes: &[u8], codec: &FrameCodec) {
        let mut off = 0;
        while let Ok(Some((tag, len))) = codec.peek(&bytes[off..]) {
            let body = &bytes[off + 5..off + len];
            match tag {
                PARSE => {
                    if let Ok((name, sql)) = message::parse_fields(body) {
                        if !name.is_empty() {
                            self.named.insert(name.into(), classify(sql));
                        }
                    }
                }
                CLOSE => {
                    if let Ok((b'S', name)) = message::target_name(body) {
                        self.named.remove(name);
                    }
                }
                _ => {}
            }
            off += len;
        }
    }

    fn apply_tx(&mut self, class: Class) {
        match class.tx {
            TxEffect::Begin => self.tx_open = true,
            TxEffect::End => self.tx_open = false,
            TxEffect::None => {}
        }
    }

    /// A router whose first read goes to backend `seed` modulo the backend count, so idle
    /// sessions spread over the backends.
    pub fn new(seed: usize) -> Router {
        Router { rr: seed, ..Router::default() }
    }

    /// The least busy backend among `pool`. A session keeps reading from the same backend
    /// while that one is within two requests of the least busy: one server process stays warm
    /// instead of a process on every backend being woken in turn.
    fn least_busy(&mut self, pool: u64, conns: &[BackendConn]) -> u64 {
        let load = |i: usize| conns[i].backend.inflight.load(Ordering::Relaxed);
        if let Some(h) = self.home.filter(|&h| pool & (1 << h) != 0) {
            let home = load(h);
            if home < 2 || (0..conns.len()).all(|i| pool & (1 << i) == 0 || load(i) + 2 > home) {
                return 1 << h;
            }
        }
        self.rr = self.rr.wrapping_add(1);
        let n = conns.len().max(1);
        let mut best: Option<(u32, usize)> = None;
        for k in 0..n {
            let i = (self.rr + k) % n;
            if pool & (1 << i) == 0 {
                continue;
            }
            let load = conns[i].backend.inflight.load(Ordering::Relaxed);
            if best.is_none_or(|(l, _)| load < l) {
                best = Some((load, i));
            }
        }
        self.home = best.map(|(_, i)| i);
        best.map(|(_, i)| 1u64 << i).unwrap_or(pool)
    }
}

fn take_seq(next: &mut u64) -> u64 {
    let s = *next;
    *next += 1;
    s
}
