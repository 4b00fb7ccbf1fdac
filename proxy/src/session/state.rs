//! What a session leaves on its backends besides data, and the unit of work it is in.
//!
//! A backend that enters the in-sync set while a session lives (a join attaching it) must get
//! the session's settings and named prepared statements before the session sends it anything,
//! and a join's replay must rebuild them on its own connection. `Settings` keeps the SET,
//! RESET and PREPARE statements that took effect; the router keeps the named statements.
//! `Unit` collects everything the session sent to every backend since its last idle point, so
//! that a completed unit can go to the diff log whole.

use bytes::Bytes;

use crate::difflog::{LoggedRequest, Record};
use crate::fanout::Outcome;
use crate::protocol::message;

/// Frames a unit may hold while no join is running: a bigger one is dropped, and a join that
/// needs it fails rather than log part of it.
const UNIT_KEEP_MAX: usize = 1 << 20;

#[derive(Default)]
pub struct Settings {
    /// Statements in effect, one per key, in the order they last took effect.
    done: Vec<(String, Bytes)>,
    /// Seen in the current unit; they take effect if it does not roll back.
    unit: Vec<(String, Bytes)>,
    /// Why the session cannot be copied onto another backend (temporary objects).
    pub unmovable: Option<&'static str>,
}

/// What a statement does to session state, judged from its first words.
#[derive(Debug, PartialEq, Eq)]
enum Effect {
    None,
    /// Sets (or prepares) `key`.
    Set(String),
    /// Undoes `key`.
    Reset(String),
    /// RESET ALL / DISCARD ALL: back to the login defaults.
    ResetAll,
    /// DEALLOCATE ALL.
    DeallocateAll,
    Unmovable(&'static str),
}

fn effect(sql: &[u8]) -> Effect {
    let text = String::from_utf8_lossy(sql);
    let lower = text.trim_start().to_ascii_lowercase();
    let mut words = lower.split(|c: char| c.is_whitespace() || c == '=' || c == ';').filter(|w| !w.is_empty());
    match words.next() {
        Some("set") => match words.next() {
            Some("local") | Some("transaction") | Some("constraints") | None => Effect::None,
            Some("session") => match words.next() {
                Some("characteristics") => Effect::Set("session characteristics".into()),
                Some("authorization") => Effect::Set("session authorization".into()),
                Some(k) => Effect::Set(k.to_string()),
                None => Effect::None,
            },
            Some(k) => Effect::Set(k.to_string()),
        },
        Some("reset") => match words.next() {
            Some("all") => Effect::ResetAll,
            Some("session") => Effect::Reset("session authorization".into()),
            Some(k) => Effect::Reset(k.to_string()),
            None => Effect::None,
        },
        Some("discard") => match words.next() {
            Some("all") => Effect::ResetAll,
            _ => Effect::None,
        },
        Some("prepare") => match words.next() {
            Some(name) => Effect::Set(format!("prepare {}", name.split('(').next().unwrap_or(name))),
            None => Effect::None,
        },
        Some("deallocate") => match words.next() {
            Some("prepare") => match words.next() {
                Some("all") => Effect::DeallocateAll,
                Some(n) => Effect::Reset(format!("prepare {n}")),
                None => Effect::None,
            },
            Some("all") => Effect::DeallocateAll,
            Some(n) => Effect::Reset(format!("prepare {n}")),
            None => Effect::None,
        },
        Some("create") => {
            let rest: Vec<&str> = words.take(3).collect();
            if rest.iter().any(|w| *w == "temp" || *w == "temporary") {
                Effect::Unmovable("temporary objects")
            } else {
                Effect::None
            }
        }
        Some("declare") if lower.contains(" with hold") => Effect::Unmovable("a cursor WITH HOLD"),
        // A session-level advisory lock lives with the connection that took it.
        _ if lower.contains("pg_advisory_lock") || lower.contains("pg_try_advisory_lock") => {
            Effect::Unmovable("session advisory locks")
        }
        _ => Effect::None,
    }
}

impl Settings {
    /// Notes a Query frame as sent to every backend.
    pub fn observe(&mut self, frame: &Bytes) {
        if frame.first() != Some(&message::QUERY) {
            return;
        }
        let Ok(sql) = message::query_sql(&frame[5..]) else { return };
        // The cheap test first: every statement that matters starts with one of these letters.
        let first = sql.iter().find(|b| !b.is_ascii_whitespace()).map(|b| b.to_ascii_lowercase());
        if !matches!(first, Some(b's' | b'r' | b'd' | b'p' | b'c')) {
            return;
        }
        match effect(sql) {
            Effect::None => {}
            Effect::Unmovable(why) => self.unmovable = Some(why),
            Effect::Set(k) | Effect::Reset(k) => self.unit.push((k, frame.clone())),
            Effect::ResetAll | Effect::DeallocateAll => self.unit.push((String::new(), frame.clone())),
        }
    }

    /// The unit ended: its settings took effect unless it rolled back.
    pub fn unit_ended(&mut self, committed: bool) {
        if !committed {
            self.unit.clear();
            return;
        }
        for (key, frame) in self.unit.drain(..) {
            let sql = message::query_sql(&frame[5..]).unwrap_or_default();
            match effect(sql) {
                Effect::Set(_) => {
                    self.done.retain(|(k, _)| *k != key);
                    self.done.push((key, frame));
                }
                Effect::Reset(_) => self.done.retain(|(k, _)| *k != key),
                Effect::ResetAll => self.done.retain(|(k, _)| k.starts_with("prepare ")),
                Effect::DeallocateAll => self.done.retain(|(k, _)| !k.starts_with("prepare ")),
                _ => {}
            }
        }
    }

    /// Frames that rebuild this state on a new connection: the settings, then `statements`
    /// (named Parse frames), each Parse followed by a Sync.
    pub fn restore_frames<'a>(&self, statements: impl Iterator<Item = &'a Bytes>) -> Vec<Bytes> {
        let mut out: Vec<Bytes> = self.done.iter().map(|(_, f)| f.clone()).collect();
        for p in statements {
            let mut f = bytes::BytesMut::with_capacity(p.len() + 5);
            f.extend_from_slice(p);
            f.extend_from_slice(message::SYNC_MSG);
            out.push(f.freeze());
        }
        out
    }
}

/// A frame of the unit: copied into the unit's own buffer while no join runs (so the client's
/// read buffer is not pinned by a long transaction), shared while one does.
enum Piece {
    Copied(usize, usize),
    Shared(Bytes),
}

/// The requests of the current unit, as sent, with their outcomes once known.
pub struct Unit {
    frames: Vec<Piece>,
    copied: bytes::BytesMut,
    /// (seq, first frame, end frame, hash_rows, outcome).
    reqs: Vec<(u64, usize, usize, bool, Option<Outcome>)>,
    bytes: usize,
    /// Frames were dropped (too big while no join ran): this unit cannot be logged.
    pub overflow: bool,
    /// Frames of the request being sent belong to the unit.
    on: bool,
    /// The most it keeps while no join runs (the update history's `history_unit_max`).
    limit: usize,
}

impl Default for Unit {
    fn default() -> Unit {
        Unit::with_limit(UNIT_KEEP_MAX)
    }
}

impl Unit {
    pub fn with_limit(limit: usize) -> Unit {
        Unit {
            frames: Vec::new(),
            copied: bytes::BytesMut::new(),
            reqs: Vec::new(),
            bytes: 0,
            overflow: false,
            on: false,
            limit: limit.max(UNIT_KEEP_MAX),
        }
    }

    /// A new request went to every backend (or, `logged` false, a read to one).
    pub fn request(&mut self, seq: u64, hash_rows: bool, logged: bool, bytes: &Bytes, join_running: bool) {
        self.on = logged;
        if logged {
            self.reqs.push((seq, self.frames.len(), self.frames.len(), hash_rows, None));
            self.more(bytes, join_running);
        }
    }

    /// More frames of the request being sent (COPY data, the rest of a batch).
    pub fn more(&mut self, bytes: &Bytes, join_running: bool) {
        if !self.on || self.overflow {
            return;
        }
        self.bytes += bytes.len();
        if !join_running && self.bytes > self.limit {
            self.overflow = true;
            self.frames.clear();
            self.copied.clear();
            return;
        }
        if join_running {
            self.frames.push(Piece::Shared(bytes.clone()));
        } else {
            let start = self.copied.len();
            self.copied.extend_from_slice(bytes);
            self.frames.push(Piece::Copied(start, self.copied.len()));
        }
        if let Some(r) = self.reqs.last_mut() {
            r.2 = self.frames.len();
        }
    }

    fn piece(&self, p: &Piece) -> Bytes {
        match p {
            Piece::Shared(b) => b.clone(),
            Piece::Copied(a, b) => Bytes::copy_from_slice(&self.copied[*a..*b]),
        }
    }

    /// Request `seq` completed with `outcome`.
    pub fn outcome(&mut self, seq: u64, outcome: Outcome) {
        if let Some(r) = self.reqs.iter_mut().rev().find(|r| r.0 == seq) {
            r.4 = Some(outcome);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    /// The unit so far is one completed BEGIN (a transaction that has taken no snapshot and
    /// done nothing yet): its frame, which a backend joining now can be given too.
    pub fn begin_only(&self) -> Option<Bytes> {
        let [(_, a, b, _, Some(o))] = self.reqs.as_slice() else { return None };
        let frame = (b - a == 1).then(|| self.piece(&self.frames[*a]))?;
        let sql = (frame.first() == Some(&message::QUERY)).then(|| message::query_sql(&frame[5..]).ok()).flatten()?;
        let class = crate::sql::classify(sql);
        (o.error.is_none() && class.tx == crate::sql::TxEffect::Begin && !class.writes && !class.data).then_some(frame)
    }

    /// Whether the unit ended in a rollback (its settings are void).
    pub fn rolled_back(&self) -> bool {
        self.reqs.last().and_then(|r| r.4).is_some_and(|o| o.error.is_some() || o.last_tag() == b"ROLLBACK")
    }

    /// Requests recorded so far.
    pub fn len(&self) -> usize {
        self.reqs.len()
    }

    /// The requests from the `from`-th on, with their outcomes (the default where unknown).
    pub fn requests_from(&self, from: usize) -> Vec<LoggedRequest> {
        let mut requests = Vec::with_capacity(self.reqs.len().saturating_sub(from));
        for &(_, a, b, hash_rows, outcome) in self.reqs.iter().skip(from) {
            let frames = if b - a == 1 {
                self.piece(&self.frames[a])
            } else {
                let mut f = bytes::BytesMut::new();
                for p in &self.frames[a..b] {
                    match p {
                        Piece::Shared(x) => f.extend_from_slice(x),
                        Piece::Copied(x, y) => f.extend_from_slice(&self.copied[*x..*y]),
                    }
                }
                f.freeze()
            };
            requests.push(LoggedRequest { frames, hash_rows, outcome: outcome.unwrap_or_default() });
        }
        requests
    }

    /// The unit as a diff log record.
    pub fn take_record(&mut self, session: u64, locks: Vec<(u64, u8)>) -> Record {
        Record::Unit { session, requests: self.requests_from(0), locks }
    }

    pub fn clear(&mut self) {
        self.frames.clear();
        self.reqs.clear();
        self.bytes = 0;
        self.overflow = false;
        self.on = false;
        self.copied.clear();
        if self.copied.capacity() > 64 << 10 {
            // A big unit passed: give its memory back.
            self.copied = bytes::BytesMut::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn q(sql: &str) -> Bytes {
        let mut b = BytesMut::new();
        message::query_msg(&mut b, sql);
        b.freeze()
    }

    fn texts(s: &Settings) -> Vec<String> {
        s.restore_frames(std::iter::empty())
            .iter()
            .map(|f| String::from_utf8_lossy(message::query_sql(&f[5..]).unwrap()).into_owned())
            .collect()
    }

    #[test]
    fn settings_keep_the_last_value_per_key_and_forget_rolled_back_ones() {
        let mut s = Settings::default();
        for sql in ["SET search_path = a", "select 1", "SET LOCAL work_mem = '1MB'", "set TimeZone to 'UTC'"] {
            s.observe(&q(sql));
        }
        s.unit_ended(true);
        s.observe(&q("SET search_path = b"));
        s.unit_ended(true);
        assert_eq!(texts(&s), vec!["set TimeZone to 'UTC'", "SET search_path = b"]);
        s.observe(&q("SET timezone = 'Europe/Paris'"));
        s.unit_ended(false);
        assert_eq!(texts(&s).len(), 2);
        s.observe(&q("RESET search_path"));
        s.observe(&q("PREPARE p1 (int) AS SELECT $1"));
        s.unit_ended(true);
        assert_eq!(texts(&s), vec!["set TimeZone to 'UTC'", "PREPARE p1 (int) AS SELECT $1"]);
        s.observe(&q("DISCARD ALL"));
        s.unit_ended(true);
        assert_eq!(texts(&s), vec!["PREPARE p1 (int) AS SELECT $1"]);
        s.observe(&q("DEALLOCATE p1"));
        s.unit_ended(true);
        assert!(texts(&s).is_empty());
        assert_eq!(s.unmovable, None);
        s.observe(&q("CREATE TEMP TABLE x (i int)"));
        assert_eq!(s.unmovable, Some("temporary objects"));
    }

    #[test]
    fn a_unit_records_frames_per_request_and_drops_what_is_too_big_without_a_join() {
        let mut u = Unit::default();
        u.request(1, false, true, &q("BEGIN"), false);
        assert_eq!(u.begin_only(), None, "no outcome yet");
        u.outcome(1, Outcome::new());
        assert_eq!(u.begin_only(), Some(q("BEGIN")));
        u.request(2, false, false, &q("SELECT 1"), false); // a read sent to one backend
        u.request(3, true, true, &q("COPY t FROM STDIN"), true);
        u.more(&Bytes::from_static(b"d\0\0\0\x061\n"), true);
        u.outcome(3, Outcome::new());
        let Record::Unit { requests, .. } = u.take_record(9, vec![]) else { panic!() };
        assert_eq!(requests.len(), 2);
        assert!(requests[1].hash_rows && requests[1].frames.ends_with(b"1\n"));
        u.clear();
        assert!(u.is_empty());
        u.request(4, false, true, &q("COPY t FROM STDIN"), false);
        u.more(&Bytes::from(vec![0u8; UNIT_KEEP_MAX + 1]), false);
        assert!(u.overflow);
    }
}
