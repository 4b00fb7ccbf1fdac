//! Statement classification: is this SQL provably a read, or must every backend run it?
//!
//! This is a conservative lexical classifier: a statement is a read only when its first word
//! says so and nothing in it can write (no data-changing keyword, no locking clause, no call of
//! a function outside a list of known side-effect-free built-ins). Everything else is a write.
//! A wrong "write" costs speed; a wrong "read" would cost G1, so every doubt is a write.

pub mod analyze;
pub mod catalog;
mod lexer;
pub mod own_schema;
pub mod rewrite;
pub mod signals;
pub mod text;

pub use signals::is_pid_signal;

use lexer::{Lexer, Tok};

/// How a statement (or a string of them) must be routed and ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Class {
    /// Every statement in it is provably a read.
    pub read_only: bool,
    /// At least one statement may change data, sequences or locks: takes the write order.
    pub writes: bool,
    /// It changes the transaction state: the last BEGIN/COMMIT-like statement in it.
    pub tx: TxEffect,
    /// It contains COPY ... FROM STDIN: the client will stream CopyData next.
    pub copy_in: bool,
    /// It contains no statement at all.
    pub empty: bool,
    /// What it says about isolation (BEGIN/START/SET ... REPEATABLE READ or SERIALIZABLE).
    pub iso: Isolation,
    /// It reads or writes data (a transaction's snapshot is taken by such a statement).
    pub data: bool,
    /// It reads facts of the server it runs on (process ids, pg_stat_* views, addresses,
    /// sizes): its row counts and rows differ between backends and are never compared.
    pub per_server: bool,
    /// It signals a server process by its number (`pg_terminate_backend`, `pg_cancel_backend`):
    /// a number means one process of one server, so it runs on the lead alone, where the pids
    /// a client sees live (docs/compatibility.md).
    pub signals: bool,
}

/// Isolation settings that decide whether a transaction's snapshot needs Chorus's barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    #[default]
    Unchanged,
    /// This transaction is REPEATABLE READ or SERIALIZABLE.
    TxStrict,
    /// The session's default becomes REPEATABLE READ or SERIALIZABLE.
    SessionStrict,
    /// The session's default becomes READ COMMITTED or READ UNCOMMITTED.
    SessionLoose,
    /// The session's default goes back to what it was at login (RESET, DISCARD ALL, DEFAULT).
    SessionReset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TxEffect {
    #[default]
    None,
    Begin,
    End,
}

impl Class {
    /// The class of something unknown: a write on every backend.
    pub const UNKNOWN: Class = Class {
        read_only: false,
        writes: true,
        tx: TxEffect::None,
        copy_in: false,
        empty: false,
        iso: Isolation::Unchanged,
        data: true,
        per_server: false,
        signals: false,
    };
    pub(crate) const READ: Class = Class {
        read_only: true,
        writes: false,
        tx: TxEffect::None,
        copy_in: false,
        empty: false,
        iso: Isolation::Unchanged,
        data: true,
        per_server: false,
        signals: false,
    };
    pub(crate) const SESSION: Class = Class {
        read_only: false,
        writes: false,
        tx: TxEffect::None,
        copy_in: false,
        empty: false,
        iso: Isolation::Unchanged,
        data: false,
        per_server: false,
        signals: false,
    };

    /// Combines the classes of statements that run one after the other.
    pub fn then(self, next: Class) -> Class {
        if self.empty {
            return next;
        }
        if next.empty {
            return self;
        }
        Class {
            read_only: self.read_only && next.read_only,
            writes: self.writes || next.writes,
            tx: if next.tx == TxEffect::None { self.tx } else { next.tx },
            copy_in: self.copy_in || next.copy_in,
            empty: false,
            iso: if next.iso == Isolation::Unchanged { self.iso } else { next.iso },
            data: self.data || next.data,
            per_server: self.per_server || next.per_server,
            signals: self.signals || next.signals,
        }
    }
}

/// Classifies a Query message's text, which may hold several statements.
pub fn classify(sql: &[u8]) -> Class {
    let mut lx = Lexer::new(sql);
    let mut total = Class { empty: true, ..Class::default() };
    loop {
        let (class, more) = classify_one(&mut lx);
        total = total.then(class);
        if !more {
            return total;
        }
    }
}

/// What one pass over a statement's words found; no allocation on this path.
#[derive(Default)]
struct Scan {
    first: Option<(usize, usize)>,
    second: Option<(usize, usize)>,
    /// INSERT/UPDATE/DELETE/MERGE/INTO/LOCK, or FOR UPDATE/SHARE/NO KEY/KEY SHARE.
    write_marker: bool,
    analyze: bool,
    /// A call of something not known to be free of side effects.
    unsafe_call: bool,
    /// COPY's direction: TO STDOUT, FROM STDIN, or another target (a file or program).
    to_stdout: bool,
    from_stdin: bool,
    to_other: bool,
    any_token: bool,
    per_server: bool,
    signals: bool,
}

fn eq(w: &[u8], k: &str) -> bool {
    w.eq_ignore_ascii_case(k.as_bytes())
}

/// The words the scan reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kw {
    /// INSERT, UPDATE, DELETE, MERGE, INTO, LOCK: a SELECT-like statement holding one writes.
    Writes,
    For,
    /// What may follow FOR in a locking clause (UPDATE is also `Writes`).
    LockStrength,
    Analyze,
    To,
    From,
    Stdin,
    Stdout,
    Other,
}

/// Classifies a word by its length first, so most words cost one comparison or none.
fn keyword(w: &[u8]) -> Kw {
    let is = |k: &str| eq(w, k);
    match w.len() {
        2 if is("to") => Kw::To,
        2 if is("no") => Kw::LockStrength,
        3 if is("for") => Kw::For,
        3 if is("key") => Kw::LockStrength,
        4 if is("into") || is("lock") => Kw::Writes,
        4 if is("from") => Kw::From,
        5 if is("merge") => Kw::Writes,
        5 if is("share") => Kw::LockStrength,
        5 if is("stdin") => Kw::Stdin,
        6 if is("insert") || is("update") || is("delete") => Kw::Writes,
        6 if is("stdout") => Kw::Stdout,
        7 if is("analyze") => Kw::Analyze,
        _ => Kw::Other,
    }
}

/// Classifies one statement, consuming it and its terminating ';'. Returns whether more follow.
fn classify_one(lx: &mut Lexer<'_>) -> (Class, bool) {
    let src = lx.src();
    let mut sc = Scan::default();
    let mut depth = 0i32;
    let mut more = false;
    let mut prev: Option<Tok> = None;
    let mut prev_kw = Kw::Other;
    // A '.' was just seen: the next word is qualified (by this word, or by a quoted name).
    let mut dot_after: Option<Option<(usize, usize)>> = None;
    // The qualifier of the word in `prev`, if it had one.
    let mut qualifier: Option<Option<(usize, usize)>> = None;
    while let Some(tok) = lx.next() {
        sc.any_token = true;
        let qualified_by = dot_after.take();
        match tok {
            Tok::Punct(b';') if depth == 0 => {
                more = true;
                break;
            }
            Tok::Punct(b'(') => {
                match (prev, qualifier) {
                    // A pid signal changes no data: it is routed by `signals` instead.
                    (Some(Tok::Word(s, e)), _) if !is_safe_call(&src[s..e]) && !is_pid_signal(&src[s..e]) => {
                        sc.unsafe_call = true
                    }
                    // schema.f(...): only pg_catalog's own functions are known.
                    (Some(Tok::Word(..)), Some(q)) if !q.is_some_and(|(s, e)| eq(&src[s..e], "pg_catalog")) => {
                        sc.unsafe_call = true
                    }
                    (Some(Tok::Quoted), _) => sc.unsafe_call = true,
                    _ => {}
                }
                depth += 1;
            }
            Tok::Punct(b'.') => {
                dot_after = Some(match prev {
                    Some(Tok::Word(s, e)) => Some((s, e)),
                    _ => None,
                });
            }
            Tok::Punct(b')') => depth -= 1,
            Tok::Word(s, e) => {
                let w = &src[s..e];
                sc.per_server |= is_per_server(w);
                sc.signals |= is_pid_signal(w);
                if sc.first.is_none() {
                    sc.first = Some((s, e));
                } else if sc.second.is_none() {
                    sc.second = Some((s, e));
                }
                let k = keyword(w);
                match k {
                    Kw::Writes => sc.write_marker = true,
                    Kw::LockStrength if prev_kw == Kw::For => sc.write_marker = true,
                    Kw::Analyze => sc.analyze = true,
                    _ => {}
                }
                if prev_kw == Kw::To {
                    if k == Kw::Stdout {
                        sc.to_stdout = true;
                    } else {
                        sc.to_other = true;
                    }
                }
                if prev_kw == Kw::From && k == Kw::Stdin {
                    sc.from_stdin = true;
                }
                prev_kw = k;
            }
            Tok::Literal if prev_kw == Kw::To => {
                // COPY ... TO 'file'
                sc.to_other = true;
                prev_kw = Kw::Other;
            }
            _ => prev_kw = Kw::Other,
        }
        prev = match tok {
            Tok::Word(..) | Tok::Quoted => Some(tok),
            _ => None,
        };
        qualifier = qualified_by;
    }
    let word = |r: Option<(usize, usize)>| r.map(|(s, e)| &src[s..e]).unwrap_or(b"");
    let Some(first) = sc.first else {
        // Only punctuation or nothing: an empty query (or garbage PostgreSQL will reject).
        let empty = !sc.any_token || (!sc.unsafe_call && depth == 0);
        return (if empty { Class { empty: true, ..Class::default() } } else { Class::UNKNOWN }, more);
    };
    let class = statement_class(&src[first.0..first.1], word(sc.second), &src[first.0..lx.pos()], &sc);
    (Class { per_server: sc.per_server, signals: sc.signals, ..class }, more)
}

/// The class a statement's first words give it, with what the scan of all its words found;
/// `stmt` is its whole text.
fn statement_class(kw: &[u8], second: &[u8], stmt: &[u8], sc: &Scan) -> Class {
    let reads = !sc.unsafe_call && !sc.write_marker;
    if ["select", "values", "table", "with"].iter().any(|k| eq(kw, k)) {
        if reads {
            Class::READ
        } else {
            Class::UNKNOWN
        }
    } else if eq(kw, "show") {
        Class::READ
    } else if eq(kw, "explain") {
        if reads && !sc.analyze {
            Class::READ
        } else {
            Class::UNKNOWN
        }
    } else if eq(kw, "begin") || eq(kw, "start") {
        Class { tx: TxEffect::Begin, iso: isolation(stmt, false), ..Class::SESSION }
    } else if eq(kw, "set") || eq(kw, "reset") {
        Class { iso: isolation(stmt, eq(kw, "reset")), ..Class::SESSION }
    } else if ((eq(kw, "commit") || eq(kw, "end")) && !eq(second, "prepared")) || eq(kw, "abort") {
        Class { tx: TxEffect::End, ..Class::SESSION }
    } else if eq(kw, "rollback") && eq(second, "to") {
        Class::SESSION
    } else if eq(kw, "rollback") && !eq(second, "prepared") {
        Class { tx: TxEffect::End, ..Class::SESSION }
    } else if eq(kw, "prepare") && !eq(second, "transaction") {
        Class::SESSION
    } else if eq(kw, "discard") && eq(second, "all") {
        Class { iso: Isolation::SessionReset, ..Class::SESSION }
    } else if eq(kw, "declare") && reads {
        // A cursor's query takes the snapshot.
        Class { data: true, ..Class::SESSION }
    } else if eq(kw, "declare") && !reads {
        // A cursor over a locking or writing query locks like the query would.
        Class::UNKNOWN
    } else if [
        "set",
        "reset",
        "discard",
        "deallocate",
        "listen",
        "unlisten",
        "declare",
        "fetch",
        "move",
        "close",
        "savepoint",
        "release",
        "load",
    ]
    .iter()
    .any(|k| eq(kw, k))
    {
        Class::SESSION
    } else if eq(kw, "copy") {
        // COPY (query) TO STDOUT and COPY t TO STDOUT read; COPY ... FROM STDIN streams a
        // write; anything touching server files or programs runs everywhere as a write.
        if sc.to_stdout && !sc.to_other && !sc.from_stdin && reads_in_copy(sc) {
            Class::READ
        } else if sc.from_stdin && !sc.to_stdout {
            Class { copy_in: true, ..Class::UNKNOWN }
        } else {
            Class::UNKNOWN
        }
    } else {
        Class::UNKNOWN
    }
}

/// Whether `sql` is a plain COMMIT (or END): one statement, not COMMIT PREPARED, not AND CHAIN.
pub fn commits(sql: &[u8]) -> bool {
    let mut lx = Lexer::new(sql);
    let mut words = 0;
    let mut first_commit = false;
    while let Some((tok, s, e)) = lx.next_with_span() {
        match tok {
            Tok::Word(..) => {
                let w = &sql[s..e];
                if words == 0 {
                    first_commit = w.eq_ignore_ascii_case(b"commit") || w.eq_ignore_ascii_case(b"end");
                } else if !(w.eq_ignore_ascii_case(b"work") || w.eq_ignore_ascii_case(b"transaction")) {
                    return false;
                }
                words += 1;
            }
            Tok::Punct(b';') => {}
            _ => return false,
        }
    }
    first_commit
}

/// Whether every statement of `sql` may run inside a transaction block that Chorus opens
/// around it (to record it in the update history in the same transaction). A whitelist of
/// first words, so anything unknown answers no: VACUUM, CREATE DATABASE, CREATE INDEX
/// CONCURRENTLY, CALL and DO (which may commit), transaction control, ... run as sent.
pub fn runs_in_transaction_block(sql: &[u8]) -> bool {
    let mut lx = Lexer::new(sql);
    let mut words: Vec<&[u8]> = Vec::with_capacity(4);
    let mut depth = 0i32;
    let mut any = false;
    let judge = |words: &[&[u8]]| -> bool {
        let w = |i: usize| words.get(i).copied().unwrap_or(b"");
        let first = w(0);
        let is = |x: &[u8], k: &str| x.eq_ignore_ascii_case(k.as_bytes());
        if [
            "insert", "update", "delete", "merge", "select", "with", "values", "table", "truncate", "grant", "revoke", "comment",
            "lock", "notify", "security", "refresh", "copy",
        ]
        .iter()
        .any(|k| is(first, k))
        {
            return true;
        }
        if is(first, "create") || is(first, "drop") || is(first, "alter") {
            let objects = ["database", "tablespace", "subscription", "system"];
            return !words[1..].iter().take(2).any(|x| objects.iter().any(|k| is(x, k)));
        }
        false
    };
    let mut ok = true;
    while let Some((tok, s, e)) = lx.next_with_span() {
        match tok {
            Tok::Punct(b'(') => depth += 1,
            Tok::Punct(b')') => depth -= 1,
            Tok::Punct(b';') if depth == 0 => {
                if !words.is_empty() {
                    ok &= judge(&words);
                }
                words.clear();
                continue;
            }
            Tok::Word(..) if words.len() < 4 && depth == 0 => words.push(&sql[s..e]),
            _ => {}
        }
        any = true;
        // CREATE INDEX CONCURRENTLY and DROP INDEX CONCURRENTLY, wherever the word stands.
        if matches!(tok, Tok::Word(..)) && sql[s..e].eq_ignore_ascii_case(b"concurrently") && depth == 0 {
            ok = false;
        }
    }
    if !words.is_empty() {
        ok &= judge(&words);
    }
    ok && any
}

/// The second look at a statement the lexical pass calls a read, in a database whose catalog
/// has something a read may run without saying so: a call of a name that a function outside
/// the built-ins carries, a relation whose reading calls such a function, or an operator that
/// is not built in. Fails closed: any of them named (even inside a string, for operators)
/// makes the answer true.
pub fn touches_guards(sql: &[u8], guards: &catalog::ReadGuards) -> bool {
    if guards.operators.iter().any(|op| sql.windows(op.len()).any(|w| w == op.as_bytes())) {
        return true;
    }
    let mut lx = Lexer::new(sql);
    let mut prev: Option<String> = None;
    while let Some((tok, s, e)) = lx.next_with_span() {
        let name = match tok {
            Tok::Word(..) => Some(String::from_utf8_lossy(&sql[s..e]).to_ascii_lowercase()),
            // A quoted name is taken as written, without its quotes.
            Tok::Quoted if e >= s + 2 => Some(String::from_utf8_lossy(&sql[s + 1..e - 1]).replace("\"\"", "\"")),
            Tok::Punct(b'(') => {
                if prev.as_ref().is_some_and(|p| guards.functions.contains(p)) {
                    return true;
                }
                None
            }
            _ => None,
        };
        if let Some(n) = &name {
            if guards.relations.contains(n) {
                return true;
            }
        }
        prev = name;
    }
    false
}

/// Words that name facts of one server: what a statement using them returns differs between
/// backends by nature (process ids, activity and statistics views, addresses, sizes, WAL
/// positions, transaction ids).
fn is_per_server(w: &[u8]) -> bool {
    if w.len() < 7 {
        return false;
    }
    let lower = |p: &str| w.len() >= p.len() && w[..p.len()].eq_ignore_ascii_case(p.as_bytes());
    if lower("inet_server_") || lower("inet_client_") || lower("txid_current") {
        return true;
    }
    if !lower("pg_") {
        return false;
    }
    const PREFIXES: &[&str] = &[
        "pg_stat",
        "pg_backend_pid",
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_postmaster_start_time",
        "pg_conf_load_time",
        "pg_locks",
        "pg_blocking_pids",
        "pg_safe_snapshot_blocking_pids",
        "pg_current_wal",
        "pg_current_xact_id",
        "pg_current_snapshot",
        "pg_last_wal",
        "pg_wal_lsn_diff",
        "pg_control_",
        "pg_ls_",
        "pg_database_size",
        "pg_relation_size",
        "pg_total_relation_size",
        "pg_table_size",
        "pg_indexes_size",
        "pg_relation_filenode",
        "pg_relation_filepath",
        "pg_prepared_xacts",
        "pg_replication_",
        "pg_backend_memory_contexts",
        "pg_shmem_allocations",
        "pg_snapshot_",
        "pg_xact_status",
        "pg_sequence_last_value",
        "pg_trigger_depth",
        "pg_notification_queue_usage",
        "pg_is_in_recovery",
        "pg_tablespace_size",
        "pg_file_settings",
        "pg_hba_file_rules",
        "pg_ident_file_mappings",
        "pg_get_wal",
    ];
    PREFIXES.iter().any(|p| lower(p))
}

/// What a BEGIN/START/SET/RESET statement says about isolation. Rare statements: a second
/// pass over their words costs nothing on the hot path.
fn isolation(stmt: &[u8], reset: bool) -> Isolation {
    let mut lx = Lexer::new(stmt);
    let (mut strict, mut loose, mut session, mut transaction, mut all, mut default) = (false, false, false, false, false, false);
    while let Some(t) = lx.next() {
        if let Tok::Word(s, e) = t {
            let w = &stmt[s..e];
            strict |= eq(w, "repeatable") || eq(w, "serializable");
            loose |= eq(w, "committed") || eq(w, "uncommitted");
            session |= eq(w, "characteristics") || eq(w, "default_transaction_isolation");
            transaction |= eq(w, "transaction") || eq(w, "isolation") || eq(w, "begin") || eq(w, "start");
            all |= eq(w, "all");
            default |= eq(w, "default");
        }
    }
    if reset && (session || all) {
        return Isolation::SessionReset;
    }
    match (session, strict, loose) {
        (true, true, _) => Isolation::SessionStrict,
        (true, false, true) => Isolation::SessionLoose,
        (true, false, false) if default => Isolation::SessionReset,
        (false, true, _) if transaction => Isolation::TxStrict,
        // default_transaction_isolation = 'serializable' spelled as one quoted string, and
        // SET transaction_isolation = '...' inside a transaction.
        _ => {
            let text = String::from_utf8_lossy(stmt).to_ascii_lowercase();
            let strict = text.contains("repeatable") || text.contains("serializable");
            if text.contains("default_transaction_isolation") {
                if strict {
                    Isolation::SessionStrict
                } else if text.contains("committed") {
                    Isolation::SessionLoose
                } else {
                    // A value Chorus does not read (DEFAULT spelled oddly, a parameter):
                    // counted as strict, which only costs speed.
                    Isolation::SessionStrict
                }
            } else if text.contains("transaction_isolation") && strict {
                Isolation::TxStrict
            } else {
                Isolation::Unchanged
            }
        }
    }
}

/// Whether a statement Chorus did not read as a SET or BEGIN may still change the session's
/// isolation (`set_config('default_transaction_isolation', ...)`, a DO block): the session
/// then counts as strict. Called for writes only, whose analysis costs far more.
pub fn mentions_isolation(sql: &[u8]) -> bool {
    // set_config's setting may be a parameter.
    contains_any_word(sql, &[b"isolation", b"set_config"])
}

/// Whether `text` holds one of `words` (ASCII, lower case), in any case. One pass: a word's
/// first letter is checked before the rest (this runs on every write).
pub fn contains_any_word(text: &[u8], words: &[&[u8]]) -> bool {
    text.iter().enumerate().any(|(i, b)| {
        let b = b.to_ascii_lowercase();
        words.iter().any(|w| w[0] == b && text.get(i..i + w.len()).is_some_and(|x| x.eq_ignore_ascii_case(w)))
    })
}

/// A COPY TO STDOUT reads unless its query could write.
fn reads_in_copy(sc: &Scan) -> bool {
    !sc.unsafe_call && !sc.write_marker
}

/// Names that may stand before "(" in a read: SQL keywords that take parentheses, type names
/// used in casts, and built-in functions that change nothing.
fn is_safe_call(name: &[u8]) -> bool {
    const SAFE: &[&str] = &[
        // keywords and syntax
        "select",
        "copy",
        "from",
        "where",
        "and",
        "or",
        "not",
        "in",
        "exists",
        "any",
        "all",
        "some",
        "as",
        "on",
        "join",
        "using",
        "values",
        "over",
        "filter",
        "within",
        "cast",
        "row",
        "array",
        "case",
        "when",
        "then",
        "else",
        "by",
        "union",
        "intersect",
        "except",
        "limit",
        "offset",
        "having",
        "lateral",
        "between",
        "like",
        "ilike",
        "is",
        "distinct",
        "with",
        "table",
        "partition",
        "order",
        "group",
        "grouping",
        "rollup",
        "cube",
        "sets",
        "window",
        "rows",
        "range",
        "similar",
        "escape",
        "interval",
        "only",
        "recursive",
        "materialized",
        "cycle",
        "search",
        "tablesample",
        "fetch",
        "first",
        "next",
        "nulls",
        "asc",
        "desc",
        "to",
        // types in casts
        "numeric",
        "decimal",
        "varchar",
        "char",
        "character",
        "timestamp",
        "timestamptz",
        "time",
        "timetz",
        "bit",
        "varbit",
        "float",
        "double",
        "precision",
        "int",
        "integer",
        "bigint",
        "smallint",
        "text",
        "boolean",
        "date",
        // aggregates, window functions
        "count",
        "sum",
        "avg",
        "min",
        "max",
        "bool_and",
        "bool_or",
        "every",
        "array_agg",
        "string_agg",
        "json_agg",
        "jsonb_agg",
        "json_object_agg",
        "jsonb_object_agg",
        "stddev",
        "variance",
        "row_number",
        "rank",
        "dense_rank",
        "percent_rank",
        "cume_dist",
        "ntile",
        "lag",
        "lead",
        "first_value",
        "last_value",
        "nth_value",
        "percentile_cont",
        "percentile_disc",
        "mode",
        // scalar functions without side effects
        "coalesce",
        "nullif",
        "greatest",
        "least",
        "abs",
        "round",
        "floor",
        "ceil",
        "ceiling",
        "trunc",
        "mod",
        "power",
        "sqrt",
        "exp",
        "ln",
        "log",
        "sign",
        "length",
        "char_length",
        "octet_length",
        "lower",
        "upper",
        "substr",
        "substring",
        "trim",
        "btrim",
        "ltrim",
        "rtrim",
        "position",
        "strpos",
        "replace",
        "split_part",
        "concat",
        "concat_ws",
        "format",
        "left",
        "right",
        "lpad",
        "rpad",
        "repeat",
        "reverse",
        "md5",
        "encode",
        "decode",
        "to_char",
        "to_number",
        "to_date",
        "to_timestamp",
        "date_trunc",
        "date_part",
        "extract",
        "age",
        "make_date",
        "make_timestamp",
        "make_interval",
        "now",
        "current_timestamp",
        "current_date",
        "statement_timestamp",
        "transaction_timestamp",
        "clock_timestamp",
        "timeofday",
        "to_json",
        "to_jsonb",
        "json_build_object",
        "jsonb_build_object",
        "json_build_array",
        "jsonb_build_array",
        "row_to_json",
        "jsonb_set",
        "jsonb_pretty",
        "json_extract_path",
        "jsonb_extract_path",
        "jsonb_array_length",
        "array_length",
        "array_to_string",
        "string_to_array",
        "unnest",
        "generate_series",
        "cardinality",
        "array_position",
        "regexp_replace",
        "regexp_match",
        "regexp_matches",
        "pg_sleep",
        "version",
        "current_setting",
        "current_database",
        "current_schema",
        "current_schemas",
        "pg_backend_pid",
        "pg_typeof",
        "pg_is_in_recovery",
        "pg_postmaster_start_time",
        "pg_database_size",
        "pg_relation_size",
        "pg_total_relation_size",
        "pg_table_size",
        "pg_indexes_size",
        "pg_size_pretty",
        "has_table_privilege",
        "has_schema_privilege",
        "has_database_privilege",
        "format_type",
        "obj_description",
        "col_description",
        "pg_get_expr",
        "pg_get_indexdef",
        "pg_get_constraintdef",
        "pg_get_viewdef",
        "pg_get_functiondef",
        "pg_get_userbyid",
        "pg_get_serial_sequence",
        "pg_encoding_to_char",
        "pg_client_encoding",
        "quote_ident",
        "quote_literal",
        "quote_nullable",
        "inet_server_port",
        "inet_server_addr",
        "hashtext",
        "num_nonnulls",
        "num_nulls",
        "width_bucket",
        "isfinite",
        "justify_days",
        "justify_hours",
        "justify_interval",
        "initcap",
        "ascii",
        "chr",
        "translate",
        "starts_with",
        "to_hex",
        "bit_length",
        "overlay",
        "convert_to",
        "convert_from",
        "pg_column_size",
        "random_normal",
    ];
    // random() and friends are reads (they change no data): routed to one backend they cannot
    // make backends differ. Writes that use them are the replication-safety issue's concern.
    const SAFE_NONDETERMINISTIC: &[&str] = &["random", "gen_random_uuid", "uuid_generate_v4"];
    SAFE.iter().chain(SAFE_NONDETERMINISTIC).any(|k| eq(name, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_commits_are_told() {
        for sql in ["COMMIT", "commit;", " END WORK", "commit transaction"] {
            assert!(commits(sql.as_bytes()), "{sql}");
        }
        for sql in ["ROLLBACK", "COMMIT PREPARED 'x'", "COMMIT AND CHAIN", "commit; insert into t values (1)", "endx", ""] {
            assert!(!commits(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn statements_that_cannot_run_in_a_transaction_block_are_told() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "update t set a = 1; delete from t",
            "CREATE TABLE t (a int)",
            "COPY t FROM STDIN",
            "with x as (delete from t returning *) select * from x",
            "ALTER TABLE t ADD b int",
            "SELECT nextval('s')",
        ] {
            assert!(runs_in_transaction_block(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "VACUUM t",
            "insert into t values (1); vacuum",
            "CREATE DATABASE d",
            "drop database d",
            "CREATE INDEX CONCURRENTLY i ON t (a)",
            "create unique index concurrently on t (a)",
            "DROP INDEX CONCURRENTLY i",
            "CALL p()",
            "DO $$ BEGIN COMMIT; END $$",
            "BEGIN; INSERT INTO t VALUES (1); COMMIT",
            "ALTER SYSTEM SET x = 1",
            "CREATE TABLESPACE s LOCATION '/x'",
            "",
            "REINDEX DATABASE d",
            "CLUSTER",
            "COMMIT PREPARED 'x'",
            "ALTER DATABASE d SET x = 1",
        ] {
            assert!(!runs_in_transaction_block(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn isolation_is_read_from_begin_and_set() {
        assert_eq!(c("BEGIN ISOLATION LEVEL REPEATABLE READ").iso, Isolation::TxStrict);
        assert_eq!(c("start transaction isolation level serializable, read write").iso, Isolation::TxStrict);
        assert_eq!(c("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").iso, Isolation::TxStrict);
        assert_eq!(c("BEGIN").iso, Isolation::Unchanged);
        assert_eq!(c("BEGIN ISOLATION LEVEL READ COMMITTED").iso, Isolation::Unchanged);
        assert_eq!(c("SET default_transaction_isolation = 'serializable'").iso, Isolation::SessionStrict);
        assert_eq!(c("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ").iso, Isolation::SessionStrict);
        assert_eq!(c("SET default_transaction_isolation TO 'read committed'").iso, Isolation::SessionLoose);
        assert_eq!(c("RESET ALL").iso, Isolation::SessionReset);
        assert_eq!(c("reset default_transaction_isolation").iso, Isolation::SessionReset);
        assert_eq!(c("DISCARD ALL").iso, Isolation::SessionReset);
        assert_eq!(c("SET default_transaction_isolation TO DEFAULT").iso, Isolation::SessionReset);
        assert_eq!(c("SET transaction_isolation = 'repeatable read'").iso, Isolation::TxStrict);
        assert_eq!(c("set session transaction_isolation to 'serializable'").iso, Isolation::TxStrict);
        assert_eq!(c("SET default_transaction_isolation = $1").iso, Isolation::SessionStrict);
        assert_eq!(c("DISCARD PLANS").iso, Isolation::Unchanged);
        assert_eq!(c("SET search_path = x").iso, Isolation::Unchanged);
        assert!(mentions_isolation(b"select set_config('default_transaction_ISOLATION', 'serializable', false)"));
        assert!(!mentions_isolation(b"update t set a = 1"));
        assert!(c("BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT 1").data);
        assert!(!c("BEGIN; SET x = 1").data);
    }

    fn c(sql: &str) -> Class {
        classify(sql.as_bytes())
    }

    #[test]
    fn plain_reads() {
        for q in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
            "select 1",
            "  /* hi */ SELECT count(*) FROM t",
            "(SELECT 1) UNION (SELECT 2)",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "select pg_sleep(30)",
            "SHOW server_version",
            "VALUES (1), (2)",
            "TABLE t",
            "select 'insert into x' as s",
            "select $$update$$",
            "select coalesce(a, 0)::numeric(10,2) from t where b in (1,2)",
            "COPY (SELECT * FROM t) TO STDOUT",
            "COPY t TO STDOUT WITH (FORMAT csv)",
            "EXPLAIN SELECT 1",
            "select pg_catalog.count(*) from t",
        ] {
            let cl = c(q);
            assert!(cl.read_only && !cl.writes, "{q}: {cl:?}");
        }
    }

    #[test]
    fn writes_and_unknowns() {
        for q in [
            "UPDATE t SET v = v + 1",
            "insert into t values (1)",
            "SELECT * FROM t FOR UPDATE",
            "select * from t for no key update",
            "SELECT nextval('s')",
            "select my_func(1)",
            "select \"MyFunc\"(1)",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "SELECT * INTO t2 FROM t",
            "CREATE TABLE t (a int)",
            "EXPLAIN ANALYZE UPDATE t SET a = 1",
            "COPY t TO '/tmp/x'",
            "DO $$ BEGIN END $$",
            "select set_config('a.b', '1', false)",
            "COMMIT PREPARED 'x'",
            "select pg_advisory_lock(1)",
            "DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE",
            // A schema-qualified call reaches a user function whatever its name.
            "select s.lower(1)",
            "SELECT public.now()",
            "select \"s\".lower(1)",
            "select * from app.report(1)",
        ] {
            let cl = c(q);
            assert!(!cl.read_only && cl.writes, "{q}: {cl:?}");
        }
    }

    #[test]
    fn pg_catalog_calls_and_column_references_stay_reads() {
        for q in ["select pg_catalog.lower('A')", "select t.a, s.t.b from s.t", "SELECT PG_CATALOG.now()"] {
            assert!(c(q).read_only, "{q}");
        }
    }

    #[test]
    fn per_server_facts_are_marked() {
        for q in [
            "select pg_backend_pid()",
            "SELECT count(*) FROM pg_stat_activity",
            "select pid, (select pg_terminate_backend(pid)) from pg_stat_activity where usename = 'x'",
            "select inet_server_port()",
            "select pg_database_size(current_database())",
            "select * from pg_locks",
        ] {
            assert!(c(q).per_server, "{q}");
        }
        for q in ["select 1", "select * from pg_class", "update t set v = 1", "select pgx_stat()"] {
            assert!(!c(q).per_server, "{q}");
        }
    }

    #[test]
    fn guards_catch_what_a_catalog_names() {
        let mut g = catalog::ReadGuards::default();
        assert!(!touches_guards(b"select lower('a') from v", &g));
        g.functions.insert("lower".into());
        g.relations.insert("v".into());
        g.relations.insert("Mixed".into());
        g.operators.push("#@#".into());
        assert!(touches_guards(b"select lower('a')", &g));
        assert!(touches_guards(b"SELECT LOWER ('a')", &g));
        assert!(!touches_guards(b"select lower from t", &g), "a column named like the function is no call");
        assert!(touches_guards(b"select * from v", &g));
        assert!(touches_guards(b"select * from public.V", &g));
        assert!(touches_guards(b"select * from \"Mixed\"", &g));
        assert!(!touches_guards(b"select * from mixed", &g), "unquoted names fold to lower case");
        assert!(touches_guards(b"select 1 #@# 2", &g));
        assert!(!touches_guards(b"select 1 + 2 from t", &g));
    }

    #[test]
    fn session_state_goes_everywhere_without_ordering() {
        for q in [
            "SET search_path = a",
            "RESET ALL",
            "LISTEN ch",
            "UNLISTEN *",
            "PREPARE p AS SELECT 1",
            "DEALLOCATE p",
            "DISCARD ALL",
            "SAVEPOINT a",
            "ROLLBACK TO SAVEPOINT a",
            "RELEASE a",
        ] {
            let cl = c(q);
            assert!(!cl.read_only && !cl.writes && cl.tx == TxEffect::None, "{q}: {cl:?}");
        }
    }

    #[test]
    fn transaction_boundaries() {
        assert_eq!(c("BEGIN").tx, TxEffect::Begin);
        assert_eq!(c("start transaction isolation level serializable").tx, TxEffect::Begin);
        assert_eq!(c("COMMIT").tx, TxEffect::End);
        assert_eq!(c("end").tx, TxEffect::End);
        assert_eq!(c("ROLLBACK").tx, TxEffect::End);
        assert_eq!(c("abort").tx, TxEffect::End);
        let multi = c("BEGIN; UPDATE t SET a = 1; COMMIT;");
        assert_eq!(multi.tx, TxEffect::End);
        assert!(multi.writes && !multi.read_only);
        assert_eq!(c("COMMIT; BEGIN").tx, TxEffect::Begin);
    }

    #[test]
    fn copy_in_and_multi_statements() {
        let cl = c("COPY t (a, b) FROM STDIN WITH (FORMAT csv)");
        assert!(cl.copy_in && cl.writes);
        let cl = c("select 1; select 2;");
        assert!(cl.read_only);
        let cl = c("select 1; update t set a = 1");
        assert!(!cl.read_only && cl.writes);
        assert!(c("").empty);
        assert!(c(" ; ;").empty);
        assert!(c("-- only a comment").empty);
    }
}
