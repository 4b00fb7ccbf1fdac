//! Pid signals in statement text: which calls of `pg_cancel_backend` name their process by a
//! literal or a bind parameter, so that Chorus can cancel a session of its own wherever its
//! query runs (no I/O).

use super::lexer::{Lexer, Tok};

/// How a `pg_cancel_backend` call names its process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidArg {
    Literal(i32),
    /// Bind parameter `$n` (1-based).
    Param(usize),
}

/// `pg_terminate_backend` and `pg_cancel_backend`: they act on a process of the server they
/// run on, chosen by its number.
pub fn is_pid_signal(w: &[u8]) -> bool {
    w.eq_ignore_ascii_case(b"pg_terminate_backend") || w.eq_ignore_ascii_case(b"pg_cancel_backend")
}

/// The processes `pg_cancel_backend(<pid>)` calls in `sql` name directly, in order.
pub fn cancelled_pids(sql: &[u8]) -> Vec<PidArg> {
    let mut out = Vec::new();
    let mut lx = Lexer::new(sql);
    // The tokens since the last `pg_cancel_backend`: 0 none, 1 the name, 2 its '(', 3 the
    // argument (then a ')' or ',' closes it).
    let mut state = 0;
    let mut arg = None;
    while let Some((tok, s, e)) = lx.next_with_span() {
        state = match (state, tok) {
            (_, Tok::Word(..)) if sql[s..e].eq_ignore_ascii_case(b"pg_cancel_backend") => 1,
            (1, Tok::Punct(b'(')) => 2,
            (2, Tok::Literal) => {
                arg = pid_arg(&sql[s..e]);
                if arg.is_some() {
                    3
                } else {
                    0
                }
            }
            (3, Tok::Punct(b')' | b',')) => {
                out.extend(arg.take());
                0
            }
            _ => 0,
        };
    }
    out
}

fn pid_arg(lit: &[u8]) -> Option<PidArg> {
    let text = std::str::from_utf8(lit).ok()?;
    match text.strip_prefix('$') {
        Some(n) => n.parse().ok().filter(|&n| n > 0).map(PidArg::Param),
        None => text.parse().ok().map(PidArg::Literal),
    }
}

/// A bound pid: text digits or a binary int4/int8.
pub fn bound_pid(format: i16, v: &[u8]) -> Option<i32> {
    match (format, v.len()) {
        (0, _) => std::str::from_utf8(v).ok()?.trim().parse().ok(),
        (1, 4) => Some(i32::from_be_bytes(v.try_into().ok()?)),
        (1, 8) => i32::try_from(i64::from_be_bytes(v.try_into().ok()?)).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_parameter_pids_are_found_and_subqueries_are_not() {
        assert_eq!(cancelled_pids(b"select pg_cancel_backend(4242)"), [PidArg::Literal(4242)]);
        assert_eq!(cancelled_pids(b"SELECT PG_CANCEL_BACKEND( $2 )"), [PidArg::Param(2)]);
        assert!(cancelled_pids(b"select pg_cancel_backend(pid) from pg_stat_activity").is_empty());
        assert!(cancelled_pids(b"select pg_cancel_backend(42 + 1)").is_empty());
        assert!(cancelled_pids(b"select 'pg_cancel_backend(42)'").is_empty());
        assert!(cancelled_pids(b"select pg_terminate_backend(42)").is_empty());
        assert_eq!(
            cancelled_pids(b"select pg_cancel_backend(1), pg_cancel_backend(2)"),
            [PidArg::Literal(1), PidArg::Literal(2)]
        );
        assert_eq!(bound_pid(0, b"77"), Some(77));
        assert_eq!(bound_pid(1, &77i32.to_be_bytes()), Some(77));
        assert_eq!(bound_pid(1, &77i64.to_be_bytes()), Some(77));
        assert_eq!(bound_pid(1, &[1, 2]), None);
    }
}
