//! A statement's text for log lines, states and errors: the SQL of a Query or Parse frame,
//! normalised so that no value reaches a log at the default level (no I/O). It sits under
//! `sql/` because sessions, the history's applier and the join's replay all name statements.

use bytes::Bytes;

use crate::protocol::message;

/// The SQL of a Query or Parse frame for log lines and states, without its values: constants
/// become `$n` (PostgreSQL's own normalisation, as pg_stat_statements shows it), so no row
/// value, password or token reaches a log at the default level; cut to a readable length.
pub fn statement_text(frame: &Bytes) -> String {
    match sql_of(frame) {
        Ok(sql) => match pg_query::normalize(&sql) {
            Ok(n) => shorten(n),
            Err(_) => format!("<a statement of {} bytes that does not parse>", sql.len()),
        },
        Err(other) => other,
    }
}

/// The SQL of a Query or Parse frame as sent, values included: for debug-level lines only.
pub fn statement_text_raw(frame: &Bytes) -> String {
    sql_of(frame).map(shorten).unwrap_or_else(|other| other)
}

/// The frame's SQL, or a name for a frame that carries none.
fn sql_of(frame: &Bytes) -> Result<String, String> {
    let body = frame.get(5..).unwrap_or_default();
    let sql = match frame.first() {
        Some(&message::QUERY) => message::query_sql(body).ok(),
        Some(&message::PARSE) => message::parse_fields(body).ok().map(|(_, s)| s),
        _ => None,
    };
    match sql {
        Some(s) => Ok(String::from_utf8_lossy(s).into_owned()),
        None => Err(format!("<{} message>", frame.first().map(|&t| t as char).unwrap_or('?'))),
    }
}

fn shorten(mut s: String) -> String {
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;

    #[test]
    fn statement_text_reads_query_and_parse() {
        let mut q = BytesMut::from(&b"Q\0\0\0\x0dselect 1\0"[..]);
        assert_eq!(statement_text(&q.split().freeze()), "select $1");
        let p = Bytes::from_static(b"P\0\0\0\x1bs\0update t set a = 1\0\0\0");
        assert_eq!(statement_text(&p), "update t set a = $1");
        assert_eq!(statement_text(&Bytes::from_static(b"F\0\0\0\x04")), "<F message>");
        // Values never reach a log line at the default level.
        let mut q = BytesMut::new();
        message::query_msg(&mut q, "UPDATE users SET password = 'hunter2' WHERE id = 42");
        let q = q.freeze();
        assert_eq!(statement_text(&q), "UPDATE users SET password = $1 WHERE id = $2");
        assert!(statement_text_raw(&q).contains("hunter2"));
        let mut bad = BytesMut::new();
        message::query_msg(&mut bad, "SELEC 'secret'");
        assert_eq!(statement_text(&bad.freeze()), "<a statement of 14 bytes that does not parse>");
    }
}
