//! One entry of the update history: what a backend needs to apply a unit again, and its
//! encoding (no I/O).
//!
//! An entry is `[u8 version][u8 shape]` followed by two diff log records: `Open` (how to log
//! in as the session and rebuild its settings and named statements) and `Unit` (the requests
//! as sent, with their outcomes where they were known when the entry was written). Reusing
//! the diff log's encoding keeps one format for "a unit of work that can be applied again".

use bytes::{BufMut, Bytes, BytesMut};

use crate::difflog::{LoggedRequest, Malformed, Record};
use crate::protocol::message;

const VERSION: u8 = 1;

/// How the unit ran, and so how it is applied again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// An explicit transaction: its requests (from its BEGIN on) are followed by the record
    /// and COMMIT. Every outcome is known.
    Transaction,
    /// A write outside a transaction, which Chorus ran inside BEGIN ... record ... COMMIT.
    /// Its outcome was not known when the entry was written: applying it must succeed.
    Autocommit,
    /// A statement that cannot run inside a transaction block (VACUUM, CREATE DATABASE,
    /// CREATE INDEX CONCURRENTLY, ...): recorded right after it completed.
    Standalone,
}

impl Shape {
    fn number(self) -> u8 {
        match self {
            Shape::Transaction => 1,
            Shape::Autocommit => 2,
            Shape::Standalone => 3,
        }
    }

    fn from_number(n: u8) -> Option<Shape> {
        Some(match n {
            1 => Shape::Transaction,
            2 => Shape::Autocommit,
            3 => Shape::Standalone,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HistoryUnit {
    pub shape: Shape,
    pub user: String,
    pub params: Vec<(String, String)>,
    pub restore: Vec<Bytes>,
    pub requests: Vec<LoggedRequest>,
    /// The write locks the unit held (a resource's hash and the mode's number).
    pub locks: Vec<(u64, u8)>,
}

impl HistoryUnit {
    /// Whether the unit must be applied with no other unit beside it: its conflicts are not
    /// known (no lock summary), or it holds a statement that cannot run inside a transaction
    /// block (VACUUM, CREATE DATABASE, ...). A standalone unit whose statements all could is
    /// a write recorded right after it completed, and conflicts as any other.
    pub fn runs_alone(&self) -> bool {
        self.locks.is_empty() || (self.shape == Shape::Standalone && !self.requests.iter().all(|r| block_safe(&r.frames)))
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(VERSION);
        out.put_u8(self.shape.number());
        Record::Open { session: 0, user: self.user.clone(), params: self.params.clone(), restore: self.restore.clone() }
            .encode(out);
        Record::Unit { session: 0, requests: self.requests.clone(), locks: self.locks.clone() }.encode(out);
    }

    pub fn decode(bytes: &[u8]) -> Result<HistoryUnit, Malformed> {
        let [version, shape, rest @ ..] = bytes else { return Err(Malformed("history entry shorter than its header")) };
        if *version != VERSION {
            return Err(Malformed("history entry of an unknown version"));
        }
        let shape = Shape::from_number(*shape).ok_or(Malformed("history entry of an unknown shape"))?;
        let mut buf = BytesMut::from(rest);
        let Some(Record::Open { user, params, restore, .. }) = Record::decode(&mut buf)? else {
            return Err(Malformed("history entry without its login"));
        };
        let Some(Record::Unit { requests, locks, .. }) = Record::decode(&mut buf)? else {
            return Err(Malformed("history entry without its requests"));
        };
        if !buf.is_empty() {
            return Err(Malformed("history entry with bytes after its requests"));
        }
        Ok(HistoryUnit { shape, user, params, restore, requests, locks })
    }
}

/// Whether a request states its SQL (Query or Parse messages, not a Bind of a statement named
/// earlier) and all of it may run inside a transaction block.
fn block_safe(frames: &[u8]) -> bool {
    let mut rest = frames;
    let mut stated = false;
    while let Ok(Some((tag, len))) = crate::protocol::codec::peek_header(rest, usize::MAX) {
        let Some(body) = rest.get(5..len) else { return false };
        let sql = match tag {
            message::QUERY => message::query_sql(body).ok(),
            message::PARSE => message::parse_fields(body).ok().map(|(_, s)| s),
            message::BIND if !stated => return false,
            _ => None,
        };
        if let Some(sql) = sql {
            if !crate::sql::runs_in_transaction_block(sql) {
                return false;
            }
            stated = true;
        }
        rest = &rest[len..];
    }
    stated && rest.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::Outcome;

    #[test]
    fn an_entry_decodes_to_what_was_encoded_and_rejects_damage() {
        let u = HistoryUnit {
            shape: Shape::Autocommit,
            user: "app".into(),
            params: vec![("database".into(), "shop".into())],
            restore: vec![Bytes::from_static(b"Q\0\0\0\x0bSET x\0")],
            requests: vec![LoggedRequest {
                frames: Bytes::from_static(b"Q\0\0\0\x0bINSERT\0"),
                hash_rows: true,
                outcome: Outcome::new(),
            }],
            locks: vec![(7, 3)],
        };
        let mut b = BytesMut::new();
        u.encode(&mut b);
        assert_eq!(HistoryUnit::decode(&b).unwrap(), u);
        assert!(HistoryUnit::decode(&b[..b.len() - 1]).is_err());
        let mut bad = b.to_vec();
        bad[1] = 9;
        assert!(HistoryUnit::decode(&bad).is_err());
        assert!(HistoryUnit::decode(&[]).is_err());
    }
}
