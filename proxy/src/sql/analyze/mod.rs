//! Statement analysis by PostgreSQL's own grammar (libpg_query), joined with the catalog.
//!
//! For a statement that is not provably a read by the lexical fast path, the analysis says:
//! how to route it (its `Class`), which locks it needs in Chorus's lock manager (tables,
//! unique-key values, sequences, or the cluster-wide lock when it cannot tell), which parts
//! of its text must be replaced by values Chorus chooses (now(), random(), uuids, volatile
//! column defaults), and whether it must be refused because no rewrite makes it deterministic.
//! The result depends only on the text and the catalog, so it is cached by both.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use pg_query::protobuf::{self, node::Node as N, Node};
use serde_json::Value;

use super::catalog::{Catalog, DefaultKind, Relation, Volatility, FLOAT8, INT2, INT4, INT8, TEXT, TIMESTAMPTZ, UUID, VARCHAR};
use super::lexer::{Lexer, Tok};
use super::rewrite::CopyFormat;
use super::{classify, Class, TxEffect};

mod ddl;
pub use ddl::ddl_only;

/// A value Chorus chooses once and sends to every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    /// The transaction's timestamp, then this cast (`""`, `"::date"`, `"::timestamptz(3)"`...).
    Now(&'static str),
    /// The statement's clock.
    Clock,
    Random,
    Uuid,
}

/// A piece of the statement text to replace: `[start, end)` becomes `prefix` then the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub start: usize,
    pub end: usize,
    pub prefix: String,
    pub value: Option<Chosen>,
    pub suffix: &'static str,
}

/// One part of a unique key a statement pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// A literal, already normalised for the column's type.
    Const(String),
    /// Bind parameter `n` (1-based) against a column of this type.
    Param(usize, u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLock {
    pub table: u32,
    pub index: u32,
    pub parts: Vec<KeyPart>,
}

/// Lock strength on a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TableMode {
    /// Reads inside a write (INSERT ... SELECT, subqueries, foreign-key parents).
    Shared,
    /// Writes to single rows pinned by key: the key locks order them.
    Keyed,
    /// Writes to rows the analysis cannot pin.
    Exclusive,
}

#[derive(Debug, Clone, Default)]
pub struct Analysis {
    pub class: Class,
    /// Needs the cluster-wide lock: a write the lock manager cannot analyse.
    pub global: bool,
    pub tables: Vec<(u32, TableMode)>,
    pub keys: Vec<KeyLock>,
    pub sequences: Vec<u32>,
    pub edits: Vec<Edit>,
    /// Why the statement cannot be made deterministic.
    pub refusal: Option<String>,
    /// DDL or anything that may change the catalog.
    pub ddl: bool,
    /// Every statement in it writes: rows it returns are compared between backends.
    pub hash_rows: bool,
    /// The highest $n the text uses.
    pub max_param: usize,
    /// PostgreSQL's parser accepted the text (else the lexical class stands, writes global).
    pub parsed: bool,
    /// COPY FROM STDIN leaving out columns with volatile defaults: Chorus sends their values
    /// with every row (the columns are added to the COPY's list by `edits`).
    pub copy_fill: Option<(CopyFormat, Vec<Chosen>)>,
    /// Relations locked exclusively by name: what DDL names (`ddl`).
    pub names: Vec<String>,
    /// Tables written that the catalog does not know: the write may go without the
    /// cluster-wide lock only where the session's own open DDL holds their names (a table its
    /// transaction created); the router decides.
    pub own_targets: Vec<String>,
}

/// Analyses by statement text, with the catalog generation they were made under.
type Cache = HashMap<Box<[u8]>, (u64, Arc<Analysis>)>;

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(HashMap::new());
}
const CACHE_MAX: usize = 8192;

/// Analyses `sql` (a Query's text or a Parse's), from this thread's cache when it can.
/// Without a current catalog every write is analysed as needing the cluster-wide lock.
pub fn analyze_cached(sql: &[u8], cat: Option<&Catalog>) -> Arc<Analysis> {
    let gen = cat.map(|c| c.generation).unwrap_or(u64::MAX);
    let hit = CACHE.with(|c| c.borrow().get(sql).filter(|(g, _)| *g == gen).map(|(_, a)| a.clone()));
    if let Some(a) = hit {
        return a;
    }
    let a = Arc::new(analyze(sql, cat));
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= CACHE_MAX {
            c.clear();
        }
        c.insert(sql.into(), (gen, a.clone()));
    });
    a
}

/// Analyses a simple Query's text. Statements that differ only in their literals (pgbench's,
/// an ORM's without bind parameters) share one cached analysis: numbers, and strings
/// compared with `=`, are replaced by parameters, the parameterised text is analysed once,
/// and the result is mapped back onto this text's literals.
pub fn analyze_query_cached(sql: &[u8], cat: Option<&Catalog>) -> Arc<Analysis> {
    let Some(tpl) = parameterize(sql) else { return analyze_cached(sql, cat) };
    let a = analyze_cached(tpl.text.as_bytes(), cat);
    if !a.parsed {
        // A literal stood where a parameter cannot (INTERVAL '1 day', varchar(20)).
        return analyze_cached(sql, cat);
    }
    Arc::new(concretize(&a, &tpl, sql))
}

/// A text with its literals replaced by `$base+1`, `$base+2`, ...
struct Template {
    text: String,
    base: usize,
    /// (start, end) in the original text and (start, end) in `text`, per literal in order.
    literals: Vec<((usize, usize), (usize, usize))>,
}

fn parameterize(sql: &[u8]) -> Option<Template> {
    let text = std::str::from_utf8(sql).ok()?;
    let mut lx = Lexer::new(sql);
    let mut spans = Vec::new();
    let mut base = 0usize;
    let mut prev_eq = false;
    while let Some((tok, s, e)) = lx.next_with_span() {
        if tok == Tok::Literal {
            let first = sql[s];
            if first == b'$' {
                if let Ok(n) = text[s + 1..e].parse::<usize>() {
                    base = base.max(n);
                }
            } else if first.is_ascii_digit() || (first == b'\'' && prev_eq && !text[s + 1..e - 1].contains('\\')) {
                spans.push((s, e));
            }
        }
        prev_eq = tok == Tok::Punct(b'=');
    }
    if spans.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len() + spans.len() * 4);
    let mut literals = Vec::with_capacity(spans.len());
    let mut at = 0;
    for (k, &(s, e)) in spans.iter().enumerate() {
        out.push_str(&text[at..s]);
        let ps = out.len();
        out.push('$');
        out.push_str(&(base + k + 1).to_string());
        literals.push(((s, e), (ps, out.len())));
        at = e;
    }
    out.push_str(&text[at..]);
    Some(Template { text: out, base, literals })
}

/// The template's analysis for the original text: key parameters become the literals' values,
/// edit positions move back to where they are in the original.
fn concretize(a: &Analysis, tpl: &Template, sql: &[u8]) -> Analysis {
    let mut out = a.clone();
    out.max_param = tpl.base;
    let literal = |n: usize| -> Option<&[u8]> {
        let ((s, e), _) = *tpl.literals.get(n.checked_sub(tpl.base + 1)?)?;
        let lit = &sql[s..e];
        Some(if lit.first() == Some(&b'\'') { &lit[1..lit.len() - 1] } else { lit })
    };
    let mut keys = Vec::with_capacity(out.keys.len());
    for mut k in std::mem::take(&mut out.keys) {
        let mut ok = true;
        for p in &mut k.parts {
            if let KeyPart::Param(n, ty) = *p {
                if n > tpl.base {
                    // '' inside a string is one quote; the value compares unescaped.
                    match literal(n)
                        .map(|l| String::from_utf8_lossy(l).replace("''", "'"))
                        .and_then(|v| normalize_key(v.as_bytes(), ty))
                    {
                        Some(v) => *p = KeyPart::Const(v),
                        None => ok = false,
                    }
                }
            }
        }
        if ok {
            keys.push(k);
        } else {
            out.tables.push((k.table, TableMode::Exclusive));
        }
    }
    out.keys = keys;
    let back = |p: usize| -> usize {
        let mut shift: isize = 0;
        for &((os, oe), (ps, pe)) in &tpl.literals {
            if pe <= p {
                shift += (oe - os) as isize - (pe - ps) as isize;
            }
        }
        (p as isize + shift) as usize
    };
    for e in &mut out.edits {
        e.start = back(e.start);
        e.end = back(e.end);
    }
    out
}

/// The uncached analysis.
pub fn analyze(sql: &[u8], cat: Option<&Catalog>) -> Analysis {
    let lexical = classify(sql);
    if lexical.empty {
        return Analysis { class: lexical, parsed: true, ..Analysis::default() };
    }
    let Ok(text) = std::str::from_utf8(sql) else {
        // Not UTF-8 (a LATIN1 client, say): the lexical class, and every write global.
        return Analysis { class: lexical, global: lexical.writes, parsed: true, ..Analysis::default() };
    };
    let parsed = match pg_query::parse(text, 0) {
        Ok(p) => p,
        // PostgreSQL will reject it too (or it is newer grammar): let every backend say so.
        Err(_) => return Analysis { class: lexical, global: lexical.writes, ..Analysis::default() },
    };
    let mut total =
        Analysis { class: Class { empty: true, ..Class::default() }, hash_rows: true, parsed: true, ..Analysis::default() };
    let mut any = false;
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else { continue };
        any = true;
        let mut a = Stmt { text, cat, out: Analysis::default() };
        a.statement(node);
        let s = a.out;
        if !s.class.writes {
            total.hash_rows = false;
        }
        total.class = total.class.then(s.class);
        total.global |= s.global;
        total.tables.extend(s.tables);
        total.keys.extend(s.keys);
        total.sequences.extend(s.sequences);
        total.edits.extend(s.edits);
        total.ddl |= s.ddl;
        total.refusal = total.refusal.or(s.refusal);
        total.copy_fill = total.copy_fill.or(s.copy_fill);
        total.max_param = total.max_param.max(s.max_param);
        total.names.extend(s.names);
        total.own_targets.extend(s.own_targets);
    }
    // A table created earlier in the same text is locked by its name already.
    let names = std::mem::take(&mut total.names);
    total.own_targets.retain(|t| !names.contains(t));
    total.names = names;
    if !any {
        return Analysis { class: lexical, parsed: true, ..Analysis::default() };
    }
    // COPY FROM STDIN is found by the lexical pass too; keep its flag whatever the parse says.
    total.class.copy_in |= lexical.copy_in;
    total.class.iso = lexical.iso;
    if total.class.writes && cat.is_none() {
        total.global = true;
    }
    if total.global {
        total.tables.clear();
        total.keys.clear();
        total.sequences.clear();
        total.names.clear();
        total.own_targets.clear();
    }
    total.edits.sort_by_key(|e| e.start);
    if !total.class.writes {
        total.hash_rows = false;
    }
    total
}

/// Built-in functions that change something although a SELECT may call them.
pub const WRITING_BUILTINS: &[&str] = &[
    "nextval",
    "setval",
    "set_config",
    "setseed",
    "pg_notify",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_promote",
    "pg_stat_reset",
    "pg_import_system_collations",
    "txid_current",
    "pg_current_xact_id",
];

/// Built-in volatile functions that change nothing.
const READING_VOLATILES: &[&str] = &[
    "random",
    "random_normal",
    "gen_random_uuid",
    "clock_timestamp",
    "statement_timestamp",
    "timeofday",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "currval",
    "lastval",
    "uuid_generate_v4",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "pg_backend_pid",
    "pg_current_snapshot",
    "txid_current_snapshot",
    "pg_stat_get_activity",
    "inet_client_addr",
];

pub(super) struct Stmt<'a> {
    text: &'a str,
    cat: Option<&'a Catalog>,
    out: Analysis,
}

/// What the generic walk found in a statement.
#[derive(Default)]
struct Found {
    /// (schema, name, location) of every relation named.
    relations: Vec<(String, String, i64)>,
    /// (name, location, argument-text-if-a-literal) of every function call.
    calls: Vec<(String, i64, Option<String>)>,
    /// (op, typmod, location) of every CURRENT_TIMESTAMP-like keyword.
    value_functions: Vec<(i64, i64, i64)>,
    max_param: usize,
    locking: bool,
    skip_locked: bool,
    ctid: bool,
    nested_write: bool,
    ctes: Vec<String>,
    limit_without_order: bool,
    /// A function called by a name qualified with a schema other than pg_catalog.
    foreign_call: bool,
    /// Operator names used (A_Expr), to check against the catalog's own operators.
    operators: Vec<String>,
    /// A node kind the analysis does not know (`KNOWN_NODES`): the statement is a write.
    unknown_node: Option<String>,
}

/// The node kinds of a raw parse tree whose meaning the analysis accounts for: syntax that
/// changes nothing by itself (function calls, relations, locking clauses and data-changing
/// statements are looked at one by one). Any other kind in a statement (a new one in a later
/// PostgreSQL, XML functions, anything the walk was not written for) makes it a write under the
/// cluster-wide lock, never a read.
const KNOWN_NODES: &[&str] = &[
    "AArrayExpr",
    "AConst",
    "AExpr",
    "AIndices",
    "AIndirection",
    "AStar",
    "Alias",
    "BitString",
    "BoolExpr",
    "Boolean",
    "BooleanTest",
    "CaseExpr",
    "CaseWhen",
    "CoalesceExpr",
    "CollateClause",
    "ColumnDef",
    "ColumnRef",
    "CommonTableExpr",
    "CtecycleClause",
    "CtesearchClause",
    "CurrentOfExpr",
    "DefElem",
    "DeleteStmt",
    "Float",
    "FuncCall",
    "GroupingFunc",
    "GroupingSet",
    "IndexElem",
    "InferClause",
    "InsertStmt",
    "Integer",
    "JoinExpr",
    "JsonAggConstructor",
    "JsonArrayAgg",
    "JsonArrayConstructor",
    "JsonArrayQueryConstructor",
    "JsonFormat",
    "JsonIsPredicate",
    "JsonKeyValue",
    "JsonObjectAgg",
    "JsonObjectConstructor",
    "JsonOutput",
    "JsonReturning",
    "JsonValueExpr",
    "List",
    "LockingClause",
    "MergeStmt",
    "MergeWhenClause",
    "MinMaxExpr",
    "MultiAssignRef",
    "NamedArgExpr",
    "NullTest",
    "OnConflictClause",
    "ParamRef",
    "RangeFunction",
    "RangeSubselect",
    "RangeTableSample",
    "RangeVar",
    "ResTarget",
    "ReturningClause",
    "ReturningOption",
    "RowExpr",
    "SelectStmt",
    "SetToDefault",
    "SortBy",
    "SqlvalueFunction",
    "String",
    "SubLink",
    "TypeCast",
    "TypeName",
    "UpdateStmt",
    "WindowDef",
    "WithClause",
];

impl Stmt<'_> {
    fn refuse(&mut self, construct: &str) {
        if self.out.refusal.is_none() {
            self.out.refusal = Some(construct.to_string());
        }
    }

    fn statement(&mut self, node: &N) {
        let class = match node {
            N::SelectStmt(s) => return self.select(node, s),
            N::InsertStmt(_) | N::UpdateStmt(_) | N::DeleteStmt(_) | N::MergeStmt(_) => return self.write(node),
            N::TransactionStmt(t) => {
                use protobuf::TransactionStmtKind as K;
                match K::try_from(t.kind).unwrap_or(K::Undefined) {
                    K::TransStmtBegin | K::TransStmtStart => Class { tx: TxEffect::Begin, ..Class::SESSION },
                    K::TransStmtCommit | K::TransStmtRollback => Class { tx: TxEffect::End, ..Class::SESSION },
                    K::TransStmtSavepoint | K::TransStmtRelease | K::TransStmtRollbackTo => Class::SESSION,
                    _ => return self.other(),
                }
            }
            N::VariableShowStmt(_) => Class::READ,
            N::VariableSetStmt(_)
            | N::DiscardStmt(_)
            | N::ListenStmt(_)
            | N::UnlistenStmt(_)
            | N::DeallocateStmt(_)
            | N::FetchStmt(_)
            | N::ClosePortalStmt(_)
            | N::LoadStmt(_) => Class::SESSION,
            N::PrepareStmt(p) => {
                // The statement runs later through EXECUTE, which is analysed as unknown.
                let _ = p;
                Class::SESSION
            }
            N::DeclareCursorStmt(d) => {
                let inner = d.query.as_ref().and_then(|q| q.node.as_ref());
                match inner {
                    Some(q @ N::SelectStmt(s)) => {
                        let mut sub = Stmt { text: self.text, cat: self.cat, out: Analysis::default() };
                        sub.select(q, s);
                        if sub.out.class.writes {
                            return self.other();
                        }
                        Class::SESSION
                    }
                    _ => return self.other(),
                }
            }
            N::ExplainStmt(e) => {
                let analyze = e.options.iter().any(|o| matches!(&o.node, Some(N::DefElem(d)) if d.defname == "analyze"));
                match e.query.as_ref().and_then(|q| q.node.as_ref()) {
                    Some(q @ N::SelectStmt(s)) if !analyze => {
                        let mut sub = Stmt { text: self.text, cat: self.cat, out: Analysis::default() };
                        sub.select(q, s);
                        if sub.out.class.writes {
                            return self.other();
                        }
                        Class::READ
                    }
                    Some(_) if !analyze => Class::READ,
                    _ => return self.other(),
                }
            }
            N::CopyStmt(c) => return self.copy(node, c),
            N::CreateStmt(_)
            | N::CreateSeqStmt(_)
            | N::AlterSeqStmt(_)
            | N::ViewStmt(_)
            | N::IndexStmt(_)
            | N::AlterTableStmt(_)
            | N::TruncateStmt(_)
            | N::RenameStmt(_)
            | N::DropStmt(_) => return self.ddl(node),
            N::ExecuteStmt(_) | N::LockStmt(_) | N::NotifyStmt(_) | N::VacuumStmt(_) | N::CheckPointStmt(_) => {
                return self.other_no_ddl()
            }
            _ => return self.other(),
        };
        self.out.class = class;
    }

    /// Anything the analysis does not model: DDL, LOCK, DO, CALL, EXECUTE, VACUUM... All but
    /// a few that cannot change the catalog also make Chorus reload it.
    fn other(&mut self) {
        self.out.class = Class::UNKNOWN;
        self.out.global = true;
        self.out.ddl = true;
    }

    fn other_no_ddl(&mut self) {
        self.other();
        self.out.ddl = false;
    }

    fn select(&mut self, node: &N, s: &protobuf::SelectStmt) {
        let found = self.walk(node);
        self.out.max_param = found.max_param;
        if s.into_clause.is_some() {
            return self.other(); // SELECT INTO creates a table
        }
        let writes_fn = self.calls_write(&found) | self.runs_user_code(&found);
        if !found.locking && !found.nested_write && !writes_fn {
            self.out.class = Class::READ;
            return;
        }
        self.out.class = Class::UNKNOWN;
        self.refuse_signals_in_write(&found);
        if found.skip_locked {
            self.refuse("FOR UPDATE/SHARE SKIP LOCKED");
        }
        if found.nested_write {
            // A data-modifying CTE: analysed as unknown.
            self.out.global = true;
            return;
        }
        let once = s.from_clause.is_empty();
        self.nondeterminism(&found, once);
        let mode = if found.locking { TableMode::Exclusive } else { TableMode::Shared };
        for (schema, name, _) in &found.relations {
            if found.ctes.iter().any(|c| c == name) && schema.is_empty() {
                continue;
            }
            self.lock_named(schema, name, mode);
        }
    }

    /// Whether any called function writes; records sequence locks and unknowns as it goes.
    /// Whether reading what the statement names may run code that is not provably read-only:
    /// a function of another schema called by its qualified name, a relation whose reading
    /// calls such code, or an operator that is not built in. Such a statement is a write
    /// under the cluster-wide lock.
    fn runs_user_code(&mut self, found: &Found) -> bool {
        let guards = self.cat.map(|c| &c.guards);
        let relation = guards.is_some_and(|g| found.relations.iter().any(|(_, n, _)| g.relations.contains(n)));
        let operator = guards.is_some_and(|g| found.operators.iter().any(|o| g.operators.contains(o)));
        let risky = found.foreign_call || relation || operator || found.unknown_node.is_some();
        if risky {
            self.out.global = true;
        }
        risky
    }

    /// A pid signal runs on the lead alone and a write on every backend: both in one
    /// statement cannot be kept, so it is refused (0A000) rather than signalling whatever
    /// process carries that number on another server.
    fn refuse_signals_in_write(&mut self, found: &Found) {
        if found.calls.iter().any(|(n, _, _)| crate::sql::is_pid_signal(n.as_bytes())) {
            self.refuse("pg_terminate_backend or pg_cancel_backend in a statement that writes (call it in a SELECT of its own)");
        }
    }

    fn calls_write(&mut self, found: &Found) -> bool {
        let mut writes = false;
        for (name, _, arg) in &found.calls {
            let Some((vol, builtin)) = self.cat.and_then(|c| c.function(name)).or_else(|| known_builtin(name)) else {
                writes = true;
                self.out.global = true;
                continue;
            };
            if builtin && crate::sql::is_pid_signal(name.as_bytes()) {
                // Routed to the lead alone by `Class::signals`; inside a write, refused.
                continue;
            }
            if matches!(name.as_str(), "nextval" | "setval") {
                writes = true;
                match arg.as_deref().and_then(|a| self.sequence(a)) {
                    Some(oid) => self.out.sequences.push(oid),
                    None => self.out.global = true,
                }
                continue;
            }
            let advisory_or_lo =
                name.starts_with("pg_advisory") || name.starts_with("pg_try_advisory") || name.starts_with("lo_");
            if !builtin {
                // A function outside the built-ins (or a name one of them overloads) may
                // write whatever its volatility says, through what it calls.
                writes = true;
                self.out.global = true;
            } else if (builtin && WRITING_BUILTINS.contains(&name.as_str())) || advisory_or_lo {
                writes = true;
                self.out.global = true;
            } else if vol == Volatility::Volatile && !(builtin && READING_VOLATILES.contains(&name.as_str())) {
                // A volatile function may write anywhere: the cluster-wide lock.
                writes = true;
                self.out.global = true;
            }
        }
        writes
    }

    fn sequence(&self, name: &str) -> Option<u32> {
        let (schema, rel) = split_qualified(name);
        let r = self.cat?.resolve(&schema, &rel)?;
        (r.kind == b'S').then_some(r.oid)
    }

    fn write(&mut self, node: &N) {
        self.out.class = Class::UNKNOWN;
        let found = self.walk(node);
        self.out.max_param = found.max_param;
        self.calls_write(&found);
        self.refuse_signals_in_write(&found);
        if found.skip_locked {
            self.refuse("FOR UPDATE/SHARE SKIP LOCKED");
        }
        if found.ctid {
            self.refuse("a row chosen by ctid in UPDATE or DELETE");
        }
        if found.limit_without_order {
            self.refuse("a subquery with LIMIT and no ORDER BY inside a write");
        }
        if found.nested_write {
            self.out.global = true;
        }
        let (target, target_loc) = match node {
            N::InsertStmt(s) => (s.relation.as_ref(), s.relation.as_ref().map(|r| r.location)),
            N::UpdateStmt(s) => (s.relation.as_ref(), s.relation.as_ref().map(|r| r.location)),
            N::DeleteStmt(s) => (s.relation.as_ref(), s.relation.as_ref().map(|r| r.location)),
            N::MergeStmt(s) => (s.relation.as_ref(), s.relation.as_ref().map(|r| r.location)),
            _ => (None, None),
        };
        let Some(target) = target else {
            self.out.global = true;
            return;
        };
        let rel = self.cat.and_then(|c| c.resolve(&target.schemaname, &target.relname)).cloned();
        let Some(rel) = rel else {
            // A table the catalog does not know (one the session's open DDL created, say).
            self.out.own_targets.push(target.relname.clone());
            for (schema, name, loc) in &found.relations {
                if Some(*loc as i32) != target_loc && !(schema.is_empty() && found.ctes.iter().any(|c| c == name)) {
                    self.lock_named(schema, name, TableMode::Shared);
                }
            }
            self.nondeterminism(&found, false);
            return;
        };
        if rel.kind != b'r' || rel.has_triggers || rel.has_children {
            // Triggers, rules, views and inheritance may write elsewhere.
            self.out.global = true;
        }
        // Every other relation named is read (or, through a data-modifying CTE, analysed as global).
        for (schema, name, loc) in &found.relations {
            if Some(*loc as i32) == target_loc || (schema.is_empty() && found.ctes.iter().any(|c| c == name)) {
                continue;
            }
            self.lock_named(schema, name, TableMode::Shared);
        }
        for &p in &rel.parents {
            self.out.tables.push((p, TableMode::Shared));
        }
        let once = match node {
            N::InsertStmt(s) => self.insert(s, &rel),
            N::UpdateStmt(s) => self.update_or_delete(&rel, s.where_clause.as_deref(), Some(&s.target_list)),
            N::DeleteStmt(s) => {
                for &c in &rel.children {
                    self.out.tables.push((c, TableMode::Exclusive));
                }
                self.update_or_delete(&rel, s.where_clause.as_deref(), None)
            }
            _ => {
                self.out.tables.push((rel.oid, TableMode::Exclusive));
                false
            }
        };
        if matches!(node, N::UpdateStmt(_)) {
            for &c in &rel.children {
                self.out.tables.push((c, TableMode::Exclusive));
            }
        }
        self.nondeterminism(&found, once);
    }

    /// An INSERT: key locks for the unique values of VALUES rows, sequence locks for the
    /// defaults it leaves to a sequence, and Chorus's values for volatile defaults.
    /// Returns whether each expression is evaluated once (VALUES) or per row (SELECT).
    fn insert(&mut self, s: &protobuf::InsertStmt, rel: &Relation) -> bool {
        let cols: Vec<usize> = if s.cols.is_empty() {
            (0..rel.columns.len()).collect()
        } else {
            let named: Option<Vec<usize>> = s
                .cols
                .iter()
                .map(|c| match &c.node {
                    Some(N::ResTarget(t)) if t.indirection.is_empty() => rel.column(&t.name),
                    _ => None,
                })
                .collect();
            match named {
                Some(n) => n,
                None => {
                    self.out.tables.push((rel.oid, TableMode::Exclusive));
                    return false;
                }
            }
        };
        let select = s.select_stmt.as_ref().and_then(|n| n.node.as_ref());
        let values: Option<&[Node]> = match select {
            Some(N::SelectStmt(v)) if !v.values_lists.is_empty() => Some(&v.values_lists),
            _ => None,
        };
        // Columns the statement leaves to their defaults.
        let mut given = vec![false; rel.columns.len()];
        let width = match values {
            Some(rows) => rows.first().map(list_len).unwrap_or(0),
            None => select_width(select),
        };
        for &c in cols.iter().take(width) {
            given[c] = true;
        }
        if values.is_none() && width == 0 {
            // DEFAULT VALUES, or a SELECT whose width we cannot count.
            if s.select_stmt.is_some() {
                self.out.tables.push((rel.oid, TableMode::Exclusive));
                return false;
            }
        }
        let mut seq_backed = false;
        let mut fills = Vec::new();
        for (i, c) in rel.columns.iter().enumerate() {
            if given[i] {
                continue;
            }
            match c.default {
                Some(DefaultKind::Sequence(seq)) => {
                    seq_backed = true;
                    self.out.sequences.push(seq);
                }
                Some(DefaultKind::Now) => fills.push((i, Chosen::Now(""))),
                Some(DefaultKind::Uuid) => fills.push((i, Chosen::Uuid)),
                Some(DefaultKind::Random) => fills.push((i, Chosen::Random)),
                Some(DefaultKind::Volatile) => {
                    self.refuse(&format!("the volatile default of column {}.{}", rel.name, c.name));
                }
                Some(DefaultKind::Stable) | None => {}
            }
        }
        // Explicit DEFAULT in VALUES leaves a column to its default as well.
        let explicit_default = values
            .is_some_and(|rows| rows.iter().any(|r| list_items(r).iter().any(|v| matches!(v.node, Some(N::SetToDefault(_))))));
        if explicit_default {
            let defaults_volatile = rel.columns.iter().any(|c| !matches!(c.default, None | Some(DefaultKind::Stable)));
            if defaults_volatile {
                self.refuse("DEFAULT in VALUES for a column with a volatile default or sequence");
            }
        }
        let Some(rows) = values else {
            // INSERT ... SELECT: evaluated per row of the source.
            if seq_backed && !self.total_order(select) {
                self.refuse("INSERT ... SELECT into a sequence-backed table without a total ORDER BY");
            }
            if !fills.is_empty() && fills.iter().any(|(_, v)| !matches!(v, Chosen::Now(_))) {
                self.refuse("INSERT ... SELECT into a table with a volatile default (uuid, random)");
            } else if !fills.is_empty() {
                self.fill_defaults(s, rel, &cols[..width.min(cols.len())], None, &fills);
            }
            self.out.tables.push((rel.oid, TableMode::Exclusive));
            return false;
        };
        if !fills.is_empty() {
            self.fill_defaults(s, rel, &cols[..width.min(cols.len())], Some(rows), &fills);
        }
        // Unique keys of every row pin what the insert may collide with.
        if s.on_conflict_clause.is_some() || rel.complex_unique || rows.len() > 64 {
            self.out.tables.push((rel.oid, TableMode::Exclusive));
            return true;
        }
        let mut keys = Vec::new();
        for (idx, kcols) in &rel.unique {
            if kcols.iter().all(|&k| !given[k] && matches!(rel.columns[k].default, Some(DefaultKind::Sequence(_)))) {
                continue; // values from a sequence, ordered by its lock
            }
            for row in rows {
                let items = list_items(row);
                let mut parts = Vec::new();
                for &k in kcols {
                    let part = cols
                        .iter()
                        .position(|&c| c == k)
                        .and_then(|p| items.get(p))
                        .and_then(|v| key_part(v, rel.columns[k].type_oid));
                    match part {
                        Some(p) => parts.push(p),
                        None => {
                            self.out.tables.push((rel.oid, TableMode::Exclusive));
                            return true;
                        }
                    }
                }
                keys.push(KeyLock { table: rel.oid, index: *idx, parts });
            }
        }
        self.out.tables.push((rel.oid, TableMode::Keyed));
        self.out.keys.extend(keys);
        true
    }

    /// Whether a SELECT orders its rows totally: ORDER BY covering a unique key of its only table.
    /// Whether the rows of an INSERT's SELECT reach the sequence in the same order on every
    /// backend, or in an order that cannot matter: sorted by a unique key of its one table;
    /// sorted by keys that determine every inserted column (rows that tie are identical); or
    /// straight from a set-returning function of constants (generate_series(1, 1000)).
    fn total_order(&self, select: Option<&N>) -> bool {
        let Some(N::SelectStmt(s)) = select else { return false };
        if sorted_by_every_column(s) || constant_series(s) {
            return true;
        }
        if s.sort_clause.is_empty() || s.from_clause.len() != 1 {
            return false;
        }
        let Some(N::RangeVar(rv)) = s.from_clause[0].node.as_ref() else { return false };
        let Some(rel) = self.cat.and_then(|c| c.resolve(&rv.schemaname, &rv.relname)) else { return false };
        let sorted: Vec<usize> = s
            .sort_clause
            .iter()
            .filter_map(|n| match &n.node {
                Some(N::SortBy(b)) => b.node.as_deref().and_then(column_name).and_then(|c| rel.column(&c)),
                _ => None,
            })
            .collect();
        rel.unique.iter().any(|(_, k)| k.iter().all(|c| sorted.contains(c)))
    }

    /// Adds the omitted volatile-default columns to the column list, and their values to every
    /// VALUES row or (now() only, one value for the statement) to the SELECT's target list.
    fn fill_defaults(
        &mut self,
        s: &protobuf::InsertStmt,
        rel: &Relation,
        given: &[usize],
        rows: Option<&[Node]>,
        fills: &[(usize, Chosen)],
    ) {
        let ends: Option<Vec<usize>> = match rows {
            Some(rows) => rows.iter().map(|row| row_close(self.text, row)).collect(),
            None => match s.select_stmt.as_ref().and_then(|n| n.node.as_ref()) {
                Some(N::SelectStmt(sel)) => sel.target_list.last().and_then(|t| expr_end(self.text, t)).map(|e| vec![e]),
                _ => None,
            },
        };
        let list = s.relation.as_ref().and_then(|r| column_list_span(self.text, r.location as usize, s));
        let (Some(ends), Some((start, end))) = (ends, list) else {
            self.refuse("an INSERT Chorus cannot extend with a volatile default");
            return;
        };
        // The full column list: the given columns, then the filled ones.
        let names: Vec<String> =
            given.iter().chain(fills.iter().map(|(c, _)| c)).map(|&c| quote_ident(&rel.columns[c].name)).collect();
        self.out.edits.push(Edit { start, end, prefix: format!(" ({})", names.join(", ")), value: None, suffix: " " });
        for at in ends {
            for &(_, v) in fills {
                self.out.edits.push(Edit { start: at, end: at, prefix: ", ".into(), value: Some(v), suffix: "" });
            }
        }
    }

    /// UPDATE or DELETE: key locks when the WHERE pins one row by a unique key.
    fn update_or_delete(&mut self, rel: &Relation, where_: Option<&Node>, set: Option<&[Node]>) -> bool {
        if let Some(set) = set {
            let touches_key = set.iter().any(|t| match &t.node {
                Some(N::ResTarget(t)) => rel.column(&t.name).is_none_or(|c| rel.unique.iter().any(|(_, k)| k.contains(&c))),
                _ => true,
            });
            if touches_key || rel.complex_unique {
                self.out.tables.push((rel.oid, TableMode::Exclusive));
                return false;
            }
        }
        let mut eqs = Vec::new();
        if let Some(w) = where_ {
            conjuncts(w, &mut eqs);
        }
        for (idx, kcols) in &rel.unique {
            let parts: Option<Vec<KeyPart>> = kcols
                .iter()
                .map(|&k| {
                    let name = &rel.columns[k].name;
                    eqs.iter().find(|(c, _)| c == name).and_then(|(_, v)| key_part(v, rel.columns[k].type_oid))
                })
                .collect();
            if let Some(parts) = parts {
                self.out.tables.push((rel.oid, TableMode::Keyed));
                self.out.keys.push(KeyLock { table: rel.oid, index: *idx, parts });
                return true;
            }
        }
        self.out.tables.push((rel.oid, TableMode::Exclusive));
        false
    }

    fn copy(&mut self, node: &N, c: &protobuf::CopyStmt) {
        if !c.is_from {
            if c.filename.is_empty() && !c.is_program {
                let inner = c.query.as_ref().and_then(|q| q.node.as_ref());
                if let Some(q @ N::SelectStmt(s)) = inner {
                    let mut sub = Stmt { text: self.text, cat: self.cat, out: Analysis::default() };
                    sub.select(q, s);
                    if sub.out.class.writes {
                        return self.other();
                    }
                }
                if inner.is_none() || matches!(inner, Some(N::SelectStmt(_))) {
                    self.out.class = Class::READ;
                    return;
                }
            }
            return self.other();
        }
        if !c.filename.is_empty() || c.is_program {
            return self.other();
        }
        self.out.class = Class { copy_in: true, ..Class::UNKNOWN };
        let _ = node;
        let Some(rv) = &c.relation else {
            self.out.global = true;
            return;
        };
        let Some(rel) = self.cat.and_then(|cat| cat.resolve(&rv.schemaname, &rv.relname)).cloned() else {
            self.out.own_targets.push(rv.relname.clone());
            return;
        };
        if rel.kind != b'r' || rel.has_triggers || rel.has_children {
            self.out.global = true;
        }
        self.out.tables.push((rel.oid, TableMode::Exclusive));
        for &p in &rel.parents {
            self.out.tables.push((p, TableMode::Shared));
        }
        let listed: Vec<Option<usize>> = c
            .attlist
            .iter()
            .map(|n| match &n.node {
                Some(N::String(s)) => rel.column(&s.sval),
                _ => None,
            })
            .collect();
        let mut fills = Vec::new();
        for (i, col) in rel.columns.iter().enumerate() {
            let given = c.attlist.is_empty() || listed.contains(&Some(i));
            if given {
                continue;
            }
            let fill = match (col.default, col.type_oid) {
                (Some(DefaultKind::Sequence(seq)), _) => {
                    self.out.sequences.push(seq);
                    continue;
                }
                (Some(DefaultKind::Stable) | None, _) => continue,
                (Some(DefaultKind::Now), TIMESTAMPTZ) => Chosen::Now(""),
                (Some(DefaultKind::Uuid), UUID) => Chosen::Uuid,
                (Some(DefaultKind::Random), FLOAT8) => Chosen::Random,
                _ => {
                    self.refuse(&format!(
                        "COPY into {} without column {}, whose volatile default Chorus cannot supply in COPY data (list the column and send its values)",
                        rel.name, col.name
                    ));
                    continue;
                }
            };
            fills.push((i, fill));
        }
        if !fills.is_empty() {
            self.copy_fill(c, &rel, fills);
        }
    }

    /// Adds the left-out columns to the COPY's column list and asks for their values per row.
    fn copy_fill(&mut self, c: &protobuf::CopyStmt, rel: &Relation, fills: Vec<(usize, Chosen)>) {
        let mut format = CopyFormat { delimiter: b'\t', csv: false, quote: b'"', header: false };
        let mut delimiter = None;
        for o in &c.options {
            let Some(N::DefElem(d)) = &o.node else { continue };
            let arg = d.arg.as_deref().and_then(|a| match &a.node {
                Some(N::String(s)) => Some(s.sval.clone()),
                Some(N::Boolean(b)) => Some(b.boolval.to_string()),
                Some(N::Integer(i)) => Some(i.ival.to_string()),
                _ => None,
            });
            match (d.defname.as_str(), arg.as_deref()) {
                ("format", Some("csv")) => format.csv = true,
                ("format", Some("text")) => {}
                ("delimiter", Some(v)) if v.len() == 1 => delimiter = Some(v.as_bytes()[0]),
                ("quote", Some(v)) if v.len() == 1 => format.quote = v.as_bytes()[0],
                ("header", None) | ("header", Some("true" | "1" | "on")) => format.header = true,
                ("header", Some("false" | "0" | "off")) => {}
                ("null" | "encoding" | "force_not_null" | "force_null" | "freeze", _) => {}
                (name, _) => {
                    self.refuse(&format!("COPY option {name} with volatile defaults left out"));
                    return;
                }
            }
        }
        format.delimiter = delimiter.unwrap_or(if format.csv { b',' } else { b'\t' });
        let Some(rv) = &c.relation else { return };
        let src = self.text.as_bytes();
        let mut lx = Lexer::new(&src[rv.location as usize..]);
        let open = loop {
            match lx.next_with_span() {
                Some((Tok::Punct(b'('), s, _)) => break Some(rv.location as usize + s),
                Some((Tok::Word(..) | Tok::Quoted | Tok::Punct(b'.'), _, _)) => {}
                _ => break None,
            }
        };
        let Some(close) = open.and_then(|o| matching_paren(self.text, o)) else {
            self.refuse("a COPY column list Chorus cannot extend");
            return;
        };
        let names: String = fills.iter().map(|(i, _)| format!(", {}", quote_ident(&rel.columns[*i].name))).collect();
        self.out.edits.push(Edit { start: close, end: close, prefix: names, value: None, suffix: "" });
        self.out.copy_fill = Some((format, fills.into_iter().map(|(_, v)| v).collect()));
    }

    /// Edits for now()/random()/uuids in a write; refusals where they are evaluated per row.
    fn nondeterminism(&mut self, found: &Found, once: bool) {
        for &(op, typmod, loc) in &found.value_functions {
            let cast = match (op, typmod >= 0) {
                (1, _) => "::date",
                (2, _) | (3, false) => "::timetz",
                (3, true) => timetz_n(typmod),
                (4, _) | (5, false) => "",
                (5, true) => timestamptz_n(typmod),
                (6, _) | (7, false) => "::time",
                (7, true) => time_n(typmod),
                (8, _) | (9, false) => "::timestamp",
                (9, true) => timestamp_n(typmod),
                _ => continue, // CURRENT_USER and friends are the same everywhere
            };
            self.edit_call(loc as usize, Chosen::Now(cast), false);
        }
        for (name, loc, _) in &found.calls {
            let v = match name.as_str() {
                "now" | "transaction_timestamp" => Chosen::Now(""),
                "statement_timestamp" | "clock_timestamp" => Chosen::Clock,
                "random" => Chosen::Random,
                "gen_random_uuid" | "uuid_generate_v4" => Chosen::Uuid,
                "timeofday" | "uuid_generate_v1" | "uuid_generate_v1mc" | "random_normal" | "setseed" => {
                    self.refuse(&format!("{name}() in a write"));
                    continue;
                }
                _ => continue,
            };
            if !matches!(v, Chosen::Now(_)) && !once {
                self.refuse(&format!("{name}() evaluated per row over rows in no fixed order"));
                continue;
            }
            self.edit_call(*loc as usize, v, true);
        }
    }

    /// Replaces the call at `loc` (a name, then an argument list if `call` or if one follows).
    fn edit_call(&mut self, loc: usize, v: Chosen, call: bool) {
        match call_span(self.text, loc, call) {
            Some(end) => self.out.edits.push(Edit { start: loc, end, prefix: String::new(), value: Some(v), suffix: "" }),
            None => self.refuse("a time or random function Chorus cannot rewrite"),
        }
    }

    fn lock_named(&mut self, schema: &str, name: &str, mode: TableMode) {
        match self.cat.and_then(|c| c.resolve(schema, name)) {
            Some(r) if r.kind == b'S' => self.out.sequences.push(r.oid),
            Some(r) if r.kind == b'r' || r.kind == b'm' || r.kind == b'f' => self.out.tables.push((r.oid, mode)),
            Some(r) if r.kind == b'p' && mode == TableMode::Shared => self.out.tables.push((r.oid, mode)),
            // Views read other tables; partitioned tables spread over partitions.
            _ => self.out.global = true,
        }
    }

    /// A generic walk over the statement's tree (via its serialised form), so that no node
    /// type is missed: every relation, function call, parameter and locking clause in it.
    fn walk(&self, node: &N) -> Found {
        let mut f = Found::default();
        if let Ok(v) = serde_json::to_value(node) {
            visit(&v, &mut f, false);
        }
        f
    }
}

fn visit(v: &Value, f: &mut Found, in_subquery: bool) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| visit(x, f, in_subquery)),
        Value::Object(o) => {
            for (k, x) in o {
                if k == "node" {
                    // {"node": {"Kind": {...}}}: the one key is the node's kind.
                    // (A field that is itself named "node" holds such a wrapper: lower case.)
                    for kind in x.as_object().into_iter().flat_map(|n| n.keys()) {
                        let is_kind = kind.starts_with(|c: char| c.is_ascii_uppercase());
                        if is_kind && f.unknown_node.is_none() && !KNOWN_NODES.contains(&kind.as_str()) {
                            f.unknown_node = Some(kind.clone());
                        }
                    }
                }
                match k.as_str() {
                    "FuncCall" => {
                        let parts = x["funcname"].as_array();
                        let schema =
                            parts.filter(|p| p.len() > 1).and_then(|p| p.first()).map(|n| n["node"]["String"]["sval"].as_str());
                        if schema.is_some_and(|s| s != Some("pg_catalog")) {
                            f.foreign_call = true;
                        }
                        let name = parts.and_then(|n| n.last()).and_then(|n| n["node"]["String"]["sval"].as_str());
                        if let Some(name) = name {
                            let arg = x["args"].as_array().and_then(|a| a.first()).and_then(literal_text);
                            f.calls.push((name.to_string(), x["location"].as_i64().unwrap_or(0), arg));
                        }
                    }
                    "SqlvalueFunction" => f.value_functions.push((
                        x["op"].as_i64().unwrap_or(0),
                        x["typmod"].as_i64().unwrap_or(-1),
                        x["location"].as_i64().unwrap_or(0),
                    )),
                    "AExpr" => {
                        let parts = x["name"].as_array();
                        if parts.is_some_and(|p| p.len() > 1) {
                            f.foreign_call = true; // OPERATOR(schema.op)
                        }
                        if let Some(op) = parts.and_then(|p| p.last()).and_then(|n| n["node"]["String"]["sval"].as_str()) {
                            f.operators.push(op.to_string());
                        }
                    }
                    "ParamRef" => f.max_param = f.max_param.max(x["number"].as_u64().unwrap_or(0) as usize),
                    "LockingClause" => {
                        f.locking = true;
                        if x["wait_policy"].as_i64() == Some(protobuf::LockWaitPolicy::LockWaitSkip as i64) {
                            f.skip_locked = true;
                        }
                    }
                    "ColumnRef" => {
                        let last =
                            x["fields"].as_array().and_then(|a| a.last()).and_then(|n| n["node"]["String"]["sval"].as_str());
                        if last == Some("ctid") {
                            f.ctid = true;
                        }
                    }
                    "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" if in_subquery => f.nested_write = true,
                    "CommonTableExpr" => {
                        if let Some(n) = x["ctename"].as_str() {
                            f.ctes.push(n.to_string());
                        }
                    }
                    "SelectStmt" if in_subquery => {
                        let limited = !x["limit_count"].is_null() && x["sort_clause"].as_array().is_none_or(|a| a.is_empty());
                        f.limit_without_order |= limited;
                    }
                    _ => {}
                }
                // The RangeVar of INSERT/UPDATE/DELETE is a plain field, not a tagged node.
                if let Some(rel) = x.get("relname").and_then(|r| r.as_str()) {
                    let schema = x["schemaname"].as_str().unwrap_or("");
                    f.relations.push((schema.to_string(), rel.to_string(), x["location"].as_i64().unwrap_or(-1)));
                }
                let sub = in_subquery || matches!(k.as_str(), "SubLink" | "RangeSubselect" | "CommonTableExpr" | "ctequery");
                visit(x, f, sub);
            }
        }
        _ => {}
    }
}

/// The text of a string literal argument, possibly cast ('s'::regclass).
fn literal_text(v: &Value) -> Option<String> {
    let v = &v["node"];
    if let Some(s) = v["AConst"]["val"]["Sval"]["sval"].as_str() {
        return Some(s.to_string());
    }
    let cast = &v["TypeCast"]["arg"];
    if !cast.is_null() {
        return literal_text(cast);
    }
    None
}

/// Functions known without a catalog (before it loads): the commonest built-ins.
fn known_builtin(name: &str) -> Option<(Volatility, bool)> {
    if READING_VOLATILES.contains(&name) || WRITING_BUILTINS.contains(&name) {
        return Some((Volatility::Volatile, true));
    }
    matches!(
        name,
        "now" | "transaction_timestamp" | "count" | "sum" | "max" | "min" | "avg" | "coalesce" | "lower" | "upper" | "length"
    )
    .then_some((Volatility::Stable, true))
}

fn split_qualified(name: &str) -> (String, String) {
    match name.split_once('.') {
        Some((s, n)) => (s.trim_matches('"').to_string(), n.trim_matches('"').to_string()),
        None => (String::new(), name.trim_matches('"').to_string()),
    }
}

fn column_name(n: &Node) -> Option<String> {
    match &n.node {
        Some(N::ColumnRef(c)) => match c.fields.last().and_then(|f| f.node.as_ref()) {
            Some(N::String(s)) => Some(s.sval.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// Every target of the SELECT is a sort key (by position or as written) or is made of
/// constants and columns that are sort keys: rows that tie in the order are equal in every
/// inserted column, so which of them gets which sequence value changes nothing.
fn sorted_by_every_column(s: &protobuf::SelectStmt) -> bool {
    if s.sort_clause.is_empty() || !s.values_lists.is_empty() || s.op != protobuf::SetOperation::SetopNone as i32 {
        return false;
    }
    let mut positions = Vec::new();
    let mut columns = Vec::new();
    for n in &s.sort_clause {
        let Some(N::SortBy(b)) = &n.node else { return false };
        match b.node.as_deref().and_then(|x| x.node.as_ref()) {
            Some(N::AConst(c)) => match &c.val {
                Some(protobuf::a_const::Val::Ival(i)) => positions.push(i.ival as usize),
                _ => return false,
            },
            Some(N::ColumnRef(_)) => columns.extend(b.node.as_deref().and_then(column_name)),
            _ => {}
        }
    }
    s.target_list.iter().enumerate().all(|(i, t)| {
        let Some(N::ResTarget(r)) = &t.node else { return false };
        positions.contains(&(i + 1)) || r.val.as_deref().is_some_and(|v| only_columns_in(v, &columns))
    })
}

/// Whether an expression holds no column but those named, no subquery and no call of a
/// function that may differ between two evaluations (the nondeterminism checks refuse those).
fn only_columns_in(n: &Node, columns: &[String]) -> bool {
    let Ok(v) = serde_json::to_value(n) else { return false };
    fn walk(v: &Value, columns: &[String]) -> bool {
        match v {
            Value::Array(a) => a.iter().all(|x| walk(x, columns)),
            Value::Object(o) => o.iter().all(|(k, x)| match k.as_str() {
                "ColumnRef" => {
                    let last = x["fields"].as_array().and_then(|a| a.last()).and_then(|n| n["node"]["String"]["sval"].as_str());
                    last.is_some_and(|c| columns.iter().any(|s| s == c))
                }
                "SubLink" | "FuncCall" => false,
                _ => walk(x, columns),
            }),
            _ => true,
        }
    }
    walk(&v, columns)
}

/// A SELECT straight from one set-returning function of constants (`generate_series`,
/// `generate_subscripts`, `unnest` of a literal array), with nothing that could reorder its
/// rows (no join, grouping, DISTINCT, window or set operation): its rows come in the same
/// order on every server.
fn constant_series(s: &protobuf::SelectStmt) -> bool {
    let plain = s.group_clause.is_empty()
        && s.distinct_clause.is_empty()
        && s.window_clause.is_empty()
        && s.having_clause.is_none()
        && s.sort_clause.is_empty()
        && s.op == protobuf::SetOperation::SetopNone as i32;
    let [from] = s.from_clause.as_slice() else { return false };
    let Some(N::RangeFunction(rf)) = &from.node else { return false };
    if !plain || rf.lateral || rf.functions.len() != 1 {
        return false;
    }
    let Some(N::List(pair)) = &rf.functions[0].node else { return false };
    let Some(N::FuncCall(f)) = pair.items.first().and_then(|n| n.node.as_ref()) else { return false };
    let name = f.funcname.last().and_then(|n| match &n.node {
        Some(N::String(s)) => Some(s.sval.as_str()),
        _ => None,
    });
    matches!(name, Some("generate_series" | "generate_subscripts" | "unnest"))
        && f.args.iter().all(is_constant)
        && s.target_list.iter().all(|t| match &t.node {
            Some(N::ResTarget(r)) => r.val.as_deref().is_some_and(|v| only_columns_in(v, &all_columns(v))),
            _ => false,
        })
}

/// A literal, possibly cast, signed or in an array of literals.
fn is_constant(n: &Node) -> bool {
    match &n.node {
        Some(N::AConst(_)) => true,
        Some(N::TypeCast(c)) => c.arg.as_deref().is_some_and(is_constant),
        Some(N::AArrayExpr(a)) => a.elements.iter().all(is_constant),
        Some(N::AExpr(e)) => e.lexpr.as_deref().is_none_or(is_constant) && e.rexpr.as_deref().is_some_and(is_constant),
        _ => false,
    }
}

/// Every column an expression names (for `only_columns_in`: the series' own columns).
fn all_columns(n: &Node) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Object(o) => {
                for (k, x) in o {
                    if k == "ColumnRef" {
                        let last =
                            x["fields"].as_array().and_then(|a| a.last()).and_then(|n| n["node"]["String"]["sval"].as_str());
                        out.extend(last.map(str::to_string));
                    } else {
                        walk(x, out);
                    }
                }
            }
            _ => {}
        }
    }
    if let Ok(v) = serde_json::to_value(n) {
        walk(&v, &mut out);
    }
    out
}

/// `col = value` terms of a WHERE made only of ANDs (others are ignored: they only narrow).
fn conjuncts<'a>(n: &'a Node, out: &mut Vec<(String, &'a Node)>) {
    match &n.node {
        Some(N::BoolExpr(b)) if b.boolop == protobuf::BoolExprType::AndExpr as i32 => {
            b.args.iter().for_each(|a| conjuncts(a, out));
        }
        Some(N::AExpr(e)) if e.kind == protobuf::AExprKind::AexprOp as i32 => {
            let is_eq = e.name.len() == 1 && matches!(&e.name[0].node, Some(N::String(s)) if s.sval == "=");
            if !is_eq {
                return;
            }
            let (Some(l), Some(r)) = (e.lexpr.as_deref(), e.rexpr.as_deref()) else { return };
            if let Some(c) = column_name(l) {
                out.push((c, r));
            } else if let Some(c) = column_name(r) {
                out.push((c, l));
            }
        }
        _ => {}
    }
}

/// A key part from a literal or parameter, normalised for a column type Chorus can compare.
fn key_part(v: &Node, type_oid: u32) -> Option<KeyPart> {
    if !matches!(type_oid, INT2 | INT4 | INT8 | TEXT | VARCHAR) {
        return None;
    }
    match &v.node {
        Some(N::ParamRef(p)) => Some(KeyPart::Param(p.number as usize, type_oid)),
        Some(N::TypeCast(c)) => c.arg.as_deref().and_then(|a| key_part(a, type_oid)),
        Some(N::AConst(c)) if !c.isnull => {
            let text = match &c.val {
                Some(protobuf::a_const::Val::Ival(i)) => i.ival.to_string(),
                Some(protobuf::a_const::Val::Sval(s)) => s.sval.clone(),
                Some(protobuf::a_const::Val::Fval(f)) => f.fval.clone(),
                _ => return None,
            };
            normalize_key(text.as_bytes(), type_oid).map(KeyPart::Const)
        }
        _ => None,
    }
}

/// The canonical text of a key value: integers parsed, text as it is.
pub fn normalize_key(text: &[u8], type_oid: u32) -> Option<String> {
    match type_oid {
        INT2 | INT4 | INT8 => std::str::from_utf8(text).ok()?.trim().parse::<i64>().ok().map(|i| i.to_string()),
        TEXT | VARCHAR => String::from_utf8(text.to_vec()).ok(),
        _ => None,
    }
}

fn list_items(n: &Node) -> &[Node] {
    match &n.node {
        Some(N::List(l)) => &l.items,
        _ => &[],
    }
}

fn list_len(n: &Node) -> usize {
    list_items(n).len()
}

fn select_width(s: Option<&N>) -> usize {
    match s {
        Some(N::SelectStmt(s)) if s.op == protobuf::SetOperation::SetopNone as i32 => {
            let star = s.target_list.iter().any(|t| match &t.node {
                Some(N::ResTarget(r)) => matches!(r.val.as_deref().and_then(|v| v.node.as_ref()), Some(N::ColumnRef(c)) if c.fields.iter().any(|f| matches!(f.node, Some(N::AStar(_))))),
                _ => true,
            });
            if star {
                0
            } else {
                s.target_list.len()
            }
        }
        _ => 0,
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The byte offset of the ')' that closes a VALUES row.
fn row_close(text: &str, row: &Node) -> Option<usize> {
    let items = list_items(row);
    let first = items.first().and_then(node_location)?;
    // The row's '(' is the last '(' before its first item; find its match.
    let open = text[..first].rfind('(')?;
    matching_paren(text, open)
}

/// Where an expression of a target list ends (the start of the next clause at depth 0).
fn expr_end(text: &str, target: &Node) -> Option<usize> {
    let start = node_location(target)?;
    let src = text.as_bytes();
    let mut lx = Lexer::new(&src[start..]);
    let mut depth = 0i32;
    let mut last_end = start;
    while let Some(t) = lx.next_with_span() {
        let (tok, s, e) = t;
        match tok {
            Tok::Punct(b'(') | Tok::Punct(b'[') => depth += 1,
            Tok::Punct(b')') | Tok::Punct(b']') => {
                if depth == 0 {
                    return Some(start + s);
                }
                depth -= 1;
            }
            Tok::Punct(b',') | Tok::Punct(b';') if depth == 0 => return Some(start + s),
            Tok::Word(ws, we) if depth == 0 => {
                let w = &src[start + ws..start + we];
                if ["from", "where", "group", "order", "limit", "union", "returning", "on", "having", "window", "offset"]
                    .iter()
                    .any(|k| w.eq_ignore_ascii_case(k.as_bytes()))
                {
                    return Some(start + s);
                }
            }
            _ => {}
        }
        last_end = start + e;
    }
    Some(last_end)
}

fn node_location(n: &Node) -> Option<usize> {
    let v = serde_json::to_value(n).ok()?;
    fn first_loc(v: &Value) -> Option<i64> {
        match v {
            Value::Object(o) => {
                if let Some(l) = o.get("location").and_then(|l| l.as_i64()).filter(|&l| l >= 0) {
                    return Some(l);
                }
                o.values().find_map(first_loc)
            }
            Value::Array(a) => a.iter().find_map(first_loc),
            _ => None,
        }
    }
    first_loc(&v).map(|l| l as usize)
}

fn matching_paren(text: &str, open: usize) -> Option<usize> {
    let src = text.as_bytes();
    let mut lx = Lexer::new(&src[open..]);
    let mut depth = 0i32;
    while let Some((tok, s, _)) = lx.next_with_span() {
        match tok {
            Tok::Punct(b'(') => depth += 1,
            Tok::Punct(b')') => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + s);
                }
            }
            _ => {}
        }
    }
    None
}

/// The end of a call starting at `loc`: a (qualified) name, then its argument list. Without
/// `call` (CURRENT_TIMESTAMP and friends) the argument list is optional.
fn call_span(text: &str, loc: usize, call: bool) -> Option<usize> {
    let src = text.as_bytes();
    let mut lx = Lexer::new(src.get(loc..)?);
    let mut end = None;
    let mut expect_name = true;
    while let Some((tok, s, e)) = lx.next_with_span() {
        match tok {
            Tok::Word(..) | Tok::Quoted if expect_name => {
                end = Some(e);
                expect_name = false;
            }
            Tok::Punct(b'.') if !expect_name => expect_name = true,
            Tok::Punct(b'(') if !expect_name => return matching_paren(text, loc + s).map(|p| p + 1),
            _ => break,
        }
    }
    if call {
        None
    } else {
        end.map(|e| loc + e)
    }
}

/// The span of the column list (or the gap where one goes) after an INSERT's target.
fn column_list_span(text: &str, rel_loc: usize, s: &protobuf::InsertStmt) -> Option<(usize, usize)> {
    let src = text.as_bytes();
    let mut lx = Lexer::new(src.get(rel_loc..)?);
    // Skip the table name, a dot-qualified part and an alias (AS x), then expect '(' or the body.
    let mut after_name = None;
    while let Some((tok, s_, e)) = lx.next_with_span() {
        match tok {
            Tok::Word(ws, we) => {
                let w = &src[rel_loc + ws..rel_loc + we];
                if ["values", "select", "default", "overriding", "with", "table"]
                    .iter()
                    .any(|k| w.eq_ignore_ascii_case(k.as_bytes()))
                {
                    let at = after_name?;
                    return Some((at, rel_loc + s_));
                }
                after_name = Some(rel_loc + e);
            }
            Tok::Quoted | Tok::Punct(b'.') => after_name = Some(rel_loc + e),
            Tok::Punct(b'(') if !s.cols.is_empty() => {
                let close = matching_paren(text, rel_loc + s_)?;
                return Some((after_name?, close + 1));
            }
            Tok::Punct(b'(') => {
                // INSERT INTO t (SELECT ...) / VALUES in parentheses: leave it.
                return None;
            }
            _ => return None,
        }
    }
    None
}

macro_rules! typmod_casts {
    ($name:ident, $ty:literal) => {
        fn $name(typmod: i64) -> &'static str {
            const C: [&str; 7] = [
                concat!("::", $ty, "(0)"),
                concat!("::", $ty, "(1)"),
                concat!("::", $ty, "(2)"),
                concat!("::", $ty, "(3)"),
                concat!("::", $ty, "(4)"),
                concat!("::", $ty, "(5)"),
                concat!("::", $ty, "(6)"),
            ];
            C[typmod.clamp(0, 6) as usize]
        }
    };
}
typmod_casts!(timetz_n, "timetz");
typmod_casts!(timestamptz_n, "timestamptz");
typmod_casts!(time_n, "time");
typmod_casts!(timestamp_n, "timestamp");

#[cfg(test)]
mod tests;
