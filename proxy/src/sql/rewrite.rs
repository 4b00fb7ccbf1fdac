//! Rewriting: the values Chorus chooses, put into statement text or bind parameters.
//!
//! An analysis lists edits (spans of the text to replace, places to add a column or a value).
//! A simple query gets literals; a prepared statement gets extra parameters `$n` in its text
//! once, and their values at every Bind, so a reused plan never has a value baked in.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use super::analyze::{Chosen, Edit};

/// The values one execution uses: the transaction's timestamp and the statement's clock.
#[derive(Debug, Clone)]
pub struct Values {
    pub tx_time: String,
    pub stmt_time: String,
}

impl Values {
    pub fn text(&self, v: Chosen) -> String {
        match v {
            Chosen::Now(_) => self.tx_time.clone(),
            Chosen::Clock => self.stmt_time.clone(),
            Chosen::Random => format!("{}", rand::random::<f64>()),
            Chosen::Uuid => uuid_v4(),
        }
    }
}

fn wrap(v: Chosen, inner: &str) -> String {
    match v {
        Chosen::Now(cast) => format!("({inner}::timestamptz{cast})"),
        Chosen::Clock => format!("({inner}::timestamptz)"),
        Chosen::Random => format!("({inner}::float8)"),
        Chosen::Uuid => format!("({inner}::uuid)"),
    }
}

/// The text with every edit applied and literal values.
pub fn with_literals(text: &str, edits: &[Edit], values: &Values) -> String {
    apply(text, edits, |v, _| wrap(v, &format!("'{}'", values.text(v))))
}

/// The text with every value turned into a parameter numbered after `base`, and the values
/// those parameters take, in order.
pub fn with_params(text: &str, edits: &[Edit], base: usize) -> (String, Vec<Chosen>) {
    let mut chosen = Vec::new();
    let sql = apply(text, edits, |v, _| {
        chosen.push(v);
        wrap(v, &format!("${}", base + chosen.len()))
    });
    (sql, chosen)
}

fn apply(text: &str, edits: &[Edit], mut value: impl FnMut(Chosen, usize) -> String) -> String {
    let mut out = String::with_capacity(text.len() + edits.len() * 40);
    let mut at = 0;
    for (i, e) in edits.iter().enumerate() {
        if e.start < at || e.end > text.len() {
            continue; // overlapping edits cannot happen for valid trees; skip rather than panic
        }
        out.push_str(&text[at..e.start]);
        out.push_str(&e.prefix);
        if let Some(v) = e.value {
            out.push_str(&value(v, i));
        }
        out.push_str(e.suffix);
        at = e.end;
    }
    out.push_str(&text[at..]);
    out
}

/// A timestamp literal PostgreSQL reads in any DateStyle: ISO with an explicit UTC offset.
pub fn timestamp_now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format_timestamp(d.as_secs() as i64, d.subsec_micros())
}

pub fn format_timestamp(secs: i64, micros: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let mut s = String::with_capacity(32);
    let _ = write!(s, "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{micros:06}+00", rem / 3600, rem / 60 % 60, rem % 60);
    s
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

pub fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// How COPY FROM STDIN data is laid out, for adding values to each row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFormat {
    pub delimiter: u8,
    pub csv: bool,
    pub quote: u8,
    pub header: bool,
}

/// Adds Chorus's values (volatile defaults the COPY left out) to every row of COPY data as it
/// streams past, in whatever pieces the client cut it. Sans-IO: bytes in, bytes out.
pub struct CopyFiller {
    format: CopyFormat,
    values: Vec<Chosen>,
    tx: Values,
    skip_lines: usize,
    in_quotes: bool,
    /// Bytes of the current line so far (only the first two are kept, to spot `\.`).
    line_len: usize,
    line_start: [u8; 2],
}

impl CopyFiller {
    pub fn new(format: CopyFormat, values: Vec<Chosen>, tx: Values) -> CopyFiller {
        let skip_lines = usize::from(format.header);
        CopyFiller { format, values, tx, skip_lines, in_quotes: false, line_len: 0, line_start: [0; 2] }
    }

    fn push_values(&self, out: &mut Vec<u8>) {
        for &v in &self.values {
            out.push(self.format.delimiter);
            out.extend_from_slice(self.tx.text(v).as_bytes());
        }
    }

    /// The end-of-data marker of text format, which gets no values.
    fn at_marker(&self) -> bool {
        !self.format.csv && self.line_len == 2 && self.line_start == *b"\\."
    }

    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        out.reserve(data.len() + 64);
        for &b in data {
            if self.format.csv && b == self.format.quote {
                self.in_quotes = !self.in_quotes;
            }
            if b == b'\n' && !self.in_quotes {
                let cr = out.last() == Some(&b'\r');
                if cr {
                    out.pop();
                }
                // An empty line is a row too (one empty or NULL column).
                if self.skip_lines > 0 {
                    self.skip_lines -= 1;
                } else if !self.at_marker() {
                    self.push_values(out);
                }
                if cr {
                    out.push(b'\r');
                }
                out.push(b);
                self.line_len = 0;
                continue;
            }
            if self.line_len < 2 {
                self.line_start[self.line_len] = b;
            }
            self.line_len += 1;
            out.push(b);
        }
    }

    /// At CopyDone: a last row without its newline still gets its values.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.line_len > 0 && self.skip_lines == 0 && !self.at_marker() && !self.in_quotes {
            self.push_values(out);
        }
        self.line_len = 0;
    }
}

/// A statement every backend runs to fail the same way with Chorus's own error, so the
/// transaction is aborted everywhere exactly as if the statement itself had failed.
/// How every statement of `error_statement` begins.
pub const ERROR_STATEMENT_PREFIX: &str = "DO $chorus$BEGIN RAISE EXCEPTION";

pub fn error_statement(code: &str, message: &str) -> String {
    format!(
        "{ERROR_STATEMENT_PREFIX} USING ERRCODE = '{code}', MESSAGE = '{}'; END$chorus$",
        message.replace('\'', "''").replace("$chorus$", "")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_iso_utc() {
        assert_eq!(format_timestamp(0, 0), "1970-01-01 00:00:00.000000+00");
        assert_eq!(format_timestamp(1_795_321_232, 123_456), "2026-11-22 04:20:32.123456+00");
        assert_eq!(format_timestamp(951_782_400, 1), "2000-02-29 00:00:00.000001+00");
    }

    #[test]
    fn uuids_are_version_4() {
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn literals_and_parameters() {
        let text = "insert into t values (1, now())";
        let edits = vec![Edit { start: 25, end: 30, prefix: String::new(), value: Some(Chosen::Now("")), suffix: "" }];
        let v = Values { tx_time: "2026-01-01 00:00:00.000000+00".into(), stmt_time: String::new() };
        assert_eq!(with_literals(text, &edits, &v), "insert into t values (1, ('2026-01-01 00:00:00.000000+00'::timestamptz))");
        let (sql, chosen) = with_params(text, &edits, 2);
        assert_eq!(sql, "insert into t values (1, ($3::timestamptz))");
        assert_eq!(chosen, vec![Chosen::Now("")]);
    }

    fn filler(csv: bool, header: bool) -> CopyFiller {
        let format = CopyFormat { delimiter: if csv { b',' } else { b'\t' }, csv, quote: b'"', header };
        CopyFiller::new(format, vec![Chosen::Now("")], Values { tx_time: "T".into(), stmt_time: "S".into() })
    }

    fn run(f: &mut CopyFiller, pieces: &[&str]) -> String {
        let mut out = Vec::new();
        for p in pieces {
            f.feed(p.as_bytes(), &mut out);
        }
        f.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn copy_rows_get_values_however_the_data_is_cut() {
        assert_eq!(run(&mut filler(false, false), &["a\t1\nb\t", "2\n"]), "a\t1\tT\nb\t2\tT\n");
        assert_eq!(run(&mut filler(false, false), &["a\r\nb"]), "a\tT\r\nb\tT");
        assert_eq!(run(&mut filler(false, false), &["a\n\\.\n"]), "a\tT\n\\.\n");
        assert_eq!(run(&mut filler(true, true), &["x,y\n1,\"two\nlines\"\n"]), "x,y\n1,\"two\nlines\",T\n");
        assert_eq!(run(&mut filler(true, false), &["\n1\n"]), ",T\n1,T\n");
    }

    #[test]
    fn error_statement_escapes_quotes() {
        let s = error_statement("0A000", "it's refused");
        assert!(s.contains("MESSAGE = 'it''s refused'"), "{s}");
    }
}
