//! Chorus's own schema is out of every client's reach: the update history, its key and the
//! record function live in schema `chorus` of every backend, and a client that could read the
//! key or change the history (a superuser can, by privileges) could forge or erase units. Any
//! statement that names the schema is refused with 42501 before it reaches a backend; Chorus
//! reads the history through connections of its own, and operators through chorusctl and the
//! admin API. (No I/O.)
//!
//! What is seen: a name qualified by `chorus` (`chorus.history`, `"chorus".key`), the schema
//! itself (`DROP SCHEMA chorus`, `GRANT ... ON SCHEMA chorus`), a `search_path` that names it,
//! and such names inside the bodies of DO blocks and of functions and procedures being created.
//! What cannot be seen (documented in docs/security.md): SQL built at run time inside a
//! function (`EXECUTE format(...)`) by a superuser; applications should not log in as one.

use super::lexer::{Lexer, Tok};

const SCHEMA: &[u8] = b"chorus";

/// The refusal's message.
pub const REFUSAL: &str = "Chorus's own schema \"chorus\" (its update history) is out of clients' reach; \
read it with chorusctl or the admin API";

/// Whether `sql` names Chorus's schema. A cheap look for the word comes first: most
/// statements never contain it.
pub fn touches(sql: &[u8]) -> bool {
    mentions(sql) && names_schema(sql)
}

fn mentions(sql: &[u8]) -> bool {
    sql.windows(SCHEMA.len()).any(|w| w.eq_ignore_ascii_case(SCHEMA))
}

fn is_schema_word(sql: &[u8], tok: Tok, s: usize, e: usize) -> bool {
    match tok {
        Tok::Word(..) => sql[s..e].eq_ignore_ascii_case(SCHEMA),
        Tok::Quoted => &sql[s..e] == b"\"chorus\"",
        _ => false,
    }
}

fn names_schema(sql: &[u8]) -> bool {
    let mut lx = Lexer::new(sql);
    let mut prev: Option<(Tok, usize, usize)> = None;
    let mut search_path = false;
    let mut bodies = false;
    let mut at_start = true;
    while let Some((tok, s, e)) = lx.next_with_span() {
        if at_start {
            if let Tok::Word(..) = tok {
                let w = &sql[s..e];
                bodies = w.eq_ignore_ascii_case(b"do") || w.eq_ignore_ascii_case(b"create");
            }
            at_start = false;
        }
        match tok {
            Tok::Punct(b';') => {
                at_start = true;
                search_path = false;
            }
            Tok::Punct(b'.') if prev.is_some_and(|(t, ps, pe)| is_schema_word(sql, t, ps, pe)) => return true,
            Tok::Word(..) | Tok::Quoted if is_schema_word(sql, tok, s, e) => {
                let after_schema =
                    prev.is_some_and(|(t, ps, pe)| matches!(t, Tok::Word(..)) && sql[ps..pe].eq_ignore_ascii_case(b"schema"));
                if after_schema || search_path {
                    return true;
                }
            }
            Tok::Word(..) if sql[s..e].eq_ignore_ascii_case(b"search_path") => search_path = true,
            Tok::Literal if sql[s..e].to_ascii_lowercase().windows(11).any(|w| w == b"search_path") => search_path = true,
            Tok::Literal if (bodies || search_path) && literal_names_schema(&sql[s..e], search_path) => return true,
            // A name in a string: setval('chorus.epoch', ...), table_to_xml('chorus.key', ...),
            // query_to_xml('select * from chorus.history', ...).
            Tok::Literal if literal_names_object(&sql[s..e]) => return true,
            _ => {}
        }
        prev = Some((tok, s, e));
    }
    false
}

/// Any literal holding a name qualified by the schema (`chorus.` and a name after it: "a
/// chorus." at the end of a sentence is not one).
fn literal_names_object(lit: &[u8]) -> bool {
    let lower: Vec<u8> = lit.to_ascii_lowercase();
    let mut i = 0;
    while let Some(off) = lower[i..].windows(SCHEMA.len()).position(|w| w == SCHEMA) {
        let at = i + off;
        let before = at.checked_sub(1).map(|j| lower[j]);
        let starts = before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b'$'));
        let mut next = at + SCHEMA.len();
        if lower.get(next) == Some(&b'"') {
            next += 1;
        }
        let named = lower.get(next) == Some(&b'.')
            && lower.get(next + 1).is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_' || *c == b'"');
        if starts && named {
            return true;
        }
        i = at + 1;
    }
    false
}

/// A literal (a function body, a DO block, a search_path value) naming the schema: the word,
/// quoted or not, followed by a dot, or (`alone`) standing by itself in a list.
fn literal_names_schema(lit: &[u8], alone: bool) -> bool {
    let lower: Vec<u8> = lit.to_ascii_lowercase();
    let word_at = |i: usize| {
        let before = i.checked_sub(1).map(|j| lower[j]);
        let edge = |c: Option<u8>| c.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b'$'));
        edge(before) && edge(lower.get(i + SCHEMA.len()).copied())
    };
    let mut i = 0;
    while let Some(off) = lower[i..].windows(SCHEMA.len()).position(|w| w == SCHEMA) {
        let at = i + off;
        if word_at(at) {
            let mut next = at + SCHEMA.len();
            if lower.get(next) == Some(&b'"') {
                next += 1;
            }
            if lower.get(next) == Some(&b'.') || alone {
                return true;
            }
        }
        i = at + 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_names_the_schema_and_what_does_not() {
        for sql in [
            "SELECT * FROM chorus.history",
            "select key from CHORUS.key",
            "SELECT * FROM \"chorus\".\"history\"",
            "DELETE FROM chorus.history",
            "UPDATE chorus.key SET key = 'x'",
            "SELECT chorus.record(1, '\\x00', 'k')",
            "DROP SCHEMA chorus CASCADE",
            "ALTER SCHEMA chorus RENAME TO x",
            "GRANT USAGE ON SCHEMA chorus TO PUBLIC",
            "SET search_path = chorus, public",
            "SET search_path TO public, \"chorus\"",
            "SELECT set_config('search_path', 'public,chorus', false)",
            "DO $$ BEGIN DELETE FROM chorus.history; END $$",
            "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'TRUNCATE chorus.history'",
            "select 1; select * from chorus . key",
            "SELECT setval('chorus.epoch', 99)",
            "SELECT nextval('\"chorus\".epoch')",
            "SELECT table_to_xml('chorus.key', true, true, '')",
            "SELECT query_to_xml('select * from chorus.history', true, true, '')",
            "SELECT 'chorus.history'::regclass",
        ] {
            assert!(touches(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "SELECT * FROM chorus_members",
            "INSERT INTO notes VALUES ('I sing in a chorus.')",
            "SELECT 'The chorus. It sings.'",
            "SELECT 'chorus.'",
            "CREATE TABLE chorus_log (a int)",
            "SELECT chorus FROM bands",
            "SET search_path = public",
            "DO $chorus$ BEGIN RAISE EXCEPTION 'x'; END$chorus$",
            "SELECT 1",
        ] {
            assert!(!touches(sql.as_bytes()), "{sql}");
        }
    }
}
