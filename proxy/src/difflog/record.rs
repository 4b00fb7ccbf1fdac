//! The diff log's records and their encoding, without any I/O.
//!
//! Every record is `[u32 length][u8 kind][u64 session][payload]`, the length covering what
//! follows it. A session's first record in a log is `Open` (how to log in as it, and what it
//! had set up before), then `Unit`s (everything it sent between two idle points, with the
//! outcome every backend agreed on), and `Close` when it ends.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::fanout::Outcome;

const OPEN: u8 = 1;
const UNIT: u8 = 2;
const CLOSE: u8 = 3;

/// One request of a unit: the frames as Chorus sent them and the outcome they produced.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedRequest {
    pub frames: Bytes,
    pub hash_rows: bool,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Open {
        session: u64,
        user: String,
        /// The client's startup parameters (database, options, client_encoding, ...).
        params: Vec<(String, String)>,
        /// Frames that rebuild its settings and prepared statements, each followed by Sync
        /// where it is an extended-protocol message.
        restore: Vec<Bytes>,
    },
    Unit {
        session: u64,
        requests: Vec<LoggedRequest>,
        /// The write locks the unit held at its end (a resource's hash and the mode's number):
        /// units whose locks do not conflict may be replayed side by side.
        locks: Vec<(u64, u8)>,
    },
    Close {
        session: u64,
    },
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("diff log record is malformed: {0}")]
pub struct Malformed(pub &'static str);

fn put_str(out: &mut BytesMut, s: &[u8]) {
    out.put_u32(s.len() as u32);
    out.put_slice(s);
}

fn put_outcome(out: &mut BytesMut, o: &Outcome) {
    out.put_u32(o.completions);
    out.put_u64(o.tags_hash);
    out.put_slice(&o.error.unwrap_or([0; 5]));
    out.put_u8(o.status);
    out.put_u64(o.rows_hash);
}

impl Record {
    /// Appends the record's bytes to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0);
        match self {
            Record::Open { session, user, params, restore } => {
                out.put_u8(OPEN);
                out.put_u64(*session);
                put_str(out, user.as_bytes());
                out.put_u32(params.len() as u32);
                for (k, v) in params {
                    put_str(out, k.as_bytes());
                    put_str(out, v.as_bytes());
                }
                out.put_u32(restore.len() as u32);
                for f in restore {
                    put_str(out, f);
                }
            }
            Record::Unit { session, requests, locks } => {
                out.put_u8(UNIT);
                out.put_u64(*session);
                out.put_u32(locks.len() as u32);
                for (h, m) in locks {
                    out.put_u64(*h);
                    out.put_u8(*m);
                }
                out.put_u32(requests.len() as u32);
                for r in requests {
                    out.put_u8(r.hash_rows as u8);
                    put_outcome(out, &r.outcome);
                    put_str(out, &r.frames);
                }
            }
            Record::Close { session } => {
                out.put_u8(CLOSE);
                out.put_u64(*session);
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    pub fn session(&self) -> u64 {
        match self {
            Record::Open { session, .. } | Record::Unit { session, .. } | Record::Close { session } => *session,
        }
    }

    /// Cuts one record off the front of `buf`. None when `buf` holds less than a record.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Record>, Malformed> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 9 {
            return Err(Malformed("record shorter than its header"));
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        buf.advance(4);
        let mut b = buf.split_to(len).freeze();
        let kind = b.get_u8();
        let session = b.get_u64();
        let rec = match kind {
            OPEN => {
                let user = string(&mut b)?;
                let n = count(&mut b)?;
                let mut params = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    params.push((string(&mut b)?, string(&mut b)?));
                }
                let n = count(&mut b)?;
                let mut restore = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    restore.push(bytes(&mut b)?);
                }
                Record::Open { session, user, params, restore }
            }
            UNIT => {
                let n = count(&mut b)?;
                if b.remaining() < n.saturating_mul(9) {
                    return Err(Malformed("locks cut short"));
                }
                let mut locks = Vec::with_capacity(n);
                for _ in 0..n {
                    locks.push((b.get_u64(), b.get_u8()));
                }
                let n = count(&mut b)?;
                let mut requests = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    if b.remaining() < 1 + 4 + 8 + 5 + 1 + 8 {
                        return Err(Malformed("request cut short"));
                    }
                    let hash_rows = b.get_u8() != 0;
                    let mut o = Outcome::new();
                    o.completions = b.get_u32();
                    o.tags_hash = b.get_u64();
                    let mut code = [0u8; 5];
                    b.copy_to_slice(&mut code);
                    o.error = (code != [0; 5]).then_some(code);
                    o.status = b.get_u8();
                    o.rows_hash = b.get_u64();
                    requests.push(LoggedRequest { frames: bytes(&mut b)?, hash_rows, outcome: o });
                }
                Record::Unit { session, requests, locks }
            }
            CLOSE => Record::Close { session },
            _ => return Err(Malformed("unknown record kind")),
        };
        if b.has_remaining() {
            return Err(Malformed("trailing bytes in a record"));
        }
        Ok(Some(rec))
    }
}

fn count(b: &mut Bytes) -> Result<usize, Malformed> {
    if b.remaining() < 4 {
        return Err(Malformed("count cut short"));
    }
    Ok(b.get_u32() as usize)
}

fn bytes(b: &mut Bytes) -> Result<Bytes, Malformed> {
    let n = count(b)?;
    if b.remaining() < n {
        return Err(Malformed("field cut short"));
    }
    Ok(b.split_to(n))
}

fn string(b: &mut Bytes) -> Result<String, Malformed> {
    String::from_utf8(bytes(b)?.to_vec()).map_err(|_| Malformed("text is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(tag: &[u8], status: u8) -> Outcome {
        let mut o = Outcome::new();
        let mut body = tag.to_vec();
        body.push(0);
        o.record(crate::protocol::message::COMMAND_COMPLETE, &body);
        o.record(crate::protocol::message::READY_FOR_QUERY, &[status]);
        o
    }

    #[test]
    fn records_round_trip_one_by_one_and_in_pieces() {
        let recs = vec![
            Record::Open {
                session: 7,
                user: "app".into(),
                params: vec![("database".into(), "bench".into()), ("options".into(), "-c x=1".into())],
                restore: vec![Bytes::from_static(b"Q\0\0\0\x0fSET x = 1\0")],
            },
            Record::Unit {
                session: 7,
                requests: vec![
                    LoggedRequest { frames: Bytes::from_static(b"Q..."), hash_rows: false, outcome: outcome(b"BEGIN", b'T') },
                    LoggedRequest {
                        frames: Bytes::from_static(b"P..B..E..S"),
                        hash_rows: true,
                        outcome: outcome(b"UPDATE 1", b'I'),
                    },
                ],
                locks: vec![(42, 1), (7, 3)],
            },
            Record::Close { session: 7 },
        ];
        let mut all = BytesMut::new();
        for r in &recs {
            r.encode(&mut all);
        }
        // Fed a byte at a time, the decoder waits for whole records.
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for &b in all.iter() {
            buf.put_u8(b);
            while let Some(r) = Record::decode(&mut buf).unwrap() {
                out.push(r);
            }
        }
        assert_eq!(out, recs);
        assert!(buf.is_empty());
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 3, 1, 2, 3][..]);
        assert_eq!(Record::decode(&mut b), Err(Malformed("record shorter than its header")));
        let mut b = BytesMut::new();
        Record::Unit { session: 1, requests: vec![], locks: vec![] }.encode(&mut b);
        b[17] = 9; // a request count with no requests behind it
        assert!(Record::decode(&mut b).is_err());
        let mut b = BytesMut::from(&[0u8, 0, 0, 9, 42, 0, 0, 0, 0, 0, 0, 0, 1][..]);
        assert_eq!(Record::decode(&mut b), Err(Malformed("unknown record kind")));
    }
}
