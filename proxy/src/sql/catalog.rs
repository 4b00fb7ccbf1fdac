//! What the catalog says about the tables and functions statements touch.
//!
//! Statement analysis needs facts the SQL text does not carry: which relation a name means,
//! its unique keys, sequences and volatile defaults, triggers, foreign keys, and how volatile a
//! function is. They are read from the lead backend once per database, kept in memory, and
//! thrown away when DDL passes through Chorus. Until a fresh copy is loaded, analysis treats
//! every write as one it cannot analyse (the cluster-wide lock), so a stale catalog can cost
//! concurrency but never correctness.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Type OIDs whose values Chorus can compare for key locks.
pub const INT2: u32 = 21;
pub const INT4: u32 = 23;
pub const INT8: u32 = 20;
pub const TEXT: u32 = 25;
pub const VARCHAR: u32 = 1043;
pub const TIMESTAMPTZ: u32 = 1184;
pub const UUID: u32 = 2950;
pub const FLOAT8: u32 = 701;

/// How a column's default behaves on different backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultKind {
    /// Constant or stable: the same everywhere.
    Stable,
    /// now() and its family: Chorus supplies the transaction's timestamp.
    Now,
    /// gen_random_uuid() / uuid_generate_v4(): Chorus supplies a fresh uuid.
    Uuid,
    /// random(): Chorus supplies a value.
    Random,
    /// nextval of a sequence (serial, identity): ordered by the sequence's lock.
    Sequence(u32),
    /// Something else volatile that Chorus cannot reproduce.
    Volatile,
}

#[derive(Debug, Clone)]
pub struct Column {
    pub attnum: i16,
    pub name: String,
    pub type_oid: u32,
    pub default: Option<DefaultKind>,
}

#[derive(Debug, Clone, Default)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// 'r' table, 'p' partitioned, 'v' view, 'm' matview, 'f' foreign, 'S' sequence.
    pub kind: u8,
    pub temp: bool,
    /// User triggers or rules: writes may reach anything.
    pub has_triggers: bool,
    /// Inheritance or partitions: a write may touch other relations.
    pub has_children: bool,
    /// Columns in attnum order (dropped ones left out).
    pub columns: Vec<Column>,
    /// Unique indexes on plain columns, as column positions into `columns`.
    pub unique: Vec<(u32, Vec<usize>)>,
    /// A unique index on expressions or with a predicate: key locks cannot cover it.
    pub complex_unique: bool,
    /// Tables this one references by foreign key.
    pub parents: Vec<u32>,
    /// Tables that reference this one by foreign key.
    pub children: Vec<u32>,
}

impl Relation {
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// Function volatility, the worst over all overloads of a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Volatility {
    Immutable,
    Stable,
    Volatile,
}

/// What can make a statement that the lexical fast path calls a read run code that may write:
/// the names the second look (`sql::touches_guards`) checks a read against. Empty in most
/// databases, which is what keeps reads cheap.
#[derive(Debug, Default)]
pub struct ReadGuards {
    /// Names of functions that are not built in (user and extension functions): a call of one
    /// of these names may resolve to it even where a built-in shares the name.
    pub functions: HashSet<String>,
    /// Views, and tables with row-level security policies, whose reading calls a function
    /// that is not provably read-only (directly or through another such relation).
    pub relations: HashSet<String>,
    /// Operators that are not built in.
    pub operators: Vec<String>,
}

impl ReadGuards {
    pub fn is_empty(&self) -> bool {
        self.functions.is_empty() && self.relations.is_empty() && self.operators.is_empty()
    }
}

#[derive(Debug, Default)]
pub struct Catalog {
    relations: HashMap<u32, Relation>,
    /// Unqualified name to every relation of that name in any schema.
    by_name: HashMap<String, Vec<u32>>,
    functions: HashMap<String, (Volatility, bool)>,
    pub guards: ReadGuards,
    /// The generation this copy was loaded at; analyses cached under another are stale.
    pub generation: u64,
    /// Enabled event triggers: DDL may run their code, so it takes the cluster-wide lock.
    pub event_triggers: bool,
}

impl Catalog {
    pub fn relation(&self, oid: u32) -> Option<&Relation> {
        self.relations.get(&oid)
    }

    /// The relation a name may mean. An unqualified name matches every schema, so whatever
    /// the session's search_path, the right one is among the candidates; more than one
    /// candidate is returned as ambiguous (None) and analysed as unknown.
    pub fn resolve(&self, schema: &str, name: &str) -> Option<&Relation> {
        let oids = self.by_name.get(name)?;
        let mut found = oids.iter().filter_map(|o| self.relations.get(o)).filter(|r| schema.is_empty() || r.schema == schema);
        let first = found.next()?;
        if found.next().is_some() {
            return None;
        }
        Some(first)
    }

    /// A catalog made by hand, for tests.
    #[cfg(test)]
    pub fn for_tests(relations: Vec<Relation>, functions: &[(&str, Volatility, bool)]) -> Catalog {
        let mut cat = Catalog::default();
        for r in relations {
            cat.by_name.entry(r.name.clone()).or_default().push(r.oid);
            cat.relations.insert(r.oid, r);
        }
        for &(n, v, b) in functions {
            if !b {
                cat.guards.functions.insert(n.to_string());
            }
            cat.functions.insert(n.to_string(), (v, b));
        }
        cat
    }

    /// Volatility of a function by name, and whether every overload is built in.
    pub fn function(&self, name: &str) -> Option<(Volatility, bool)> {
        self.functions.get(name).copied()
    }
}

/// The catalog of one database: the loaded copy plus the bookkeeping that keeps it honest.
#[derive(Default)]
pub struct CatalogSlot {
    /// A small number naming the database in lock resources.
    pub id: u32,
    current: RwLock<Option<Arc<Catalog>>>,
    /// Bumped by the end of every transaction with DDL; a load that started before the bump
    /// is not trusted.
    generation: AtomicU64,
    /// The generation a catalog must have been loaded at to lock DDL by the names it gives:
    /// bumped past by the end of DDL that took the cluster-wide lock (an event trigger, an
    /// inheritance a stale catalog would not show).
    names_from: AtomicU64,
    loading: AtomicBool,
    /// Woken when a load completes (or fails), for writes waiting on a current catalog.
    pub loaded: tokio::sync::Notify,
    /// Why the last load failed, for the error a waiting write gets in the end.
    pub last_error: Mutex<Option<String>>,
    /// What reads must be checked against (`ReadGuardState`), one atomic load on the fast path.
    guards: std::sync::atomic::AtomicU8,
}

/// Whether reads in a database need a second look before they may go to one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadGuardState {
    /// No catalog of the database's present state: a read is treated as unknown (a write)
    /// until one is loaded.
    Unknown,
    /// Nothing in the database can make a lexical read write.
    Clear,
    /// Reads are checked against the catalog's guards.
    Check,
}

impl CatalogSlot {
    /// The catalog when it is loaded and current; None means "analyse nothing".
    pub fn get(&self) -> Option<Arc<Catalog>> {
        let cur = self.current.read().ok()?.clone()?;
        (cur.generation == self.generation.load(Ordering::Acquire)).then_some(cur)
    }

    /// What reads must be checked against. A DDL transaction that is still open changes
    /// nothing others can see, so its catalog keeps serving; one that ended makes the state
    /// unknown until the reload.
    #[inline]
    pub fn read_guards(&self) -> ReadGuardState {
        match self.guards.load(Ordering::Acquire) {
            1 => ReadGuardState::Clear,
            2 => ReadGuardState::Check,
            _ => ReadGuardState::Unknown,
        }
    }

    /// The last catalog loaded, current or not: for the transaction that ran DDL itself (what
    /// it wrote holds the names its DDL locked), and for DDL, which is locked by the names it
    /// gives (`names_lockable`).
    pub fn last(&self) -> Option<Arc<Catalog>> {
        self.current.read().ok()?.clone()
    }

    /// Whether DDL analysed with `cat` may be locked by the names it gives: no DDL under the
    /// cluster-wide lock ended since `cat` was loaded, and no event trigger is enabled.
    pub fn names_lockable(&self, cat: &Catalog) -> bool {
        !cat.event_triggers && cat.generation >= self.names_from.load(Ordering::Acquire)
    }

    /// A transaction that ran DDL ended (committed or not): writes wait for a catalog loaded
    /// after it. DDL still open changes nothing another session can see, so until it ends
    /// the catalog keeps serving. `global`: it held the cluster-wide lock.
    pub fn ddl_ended(&self, global: bool) {
        self.guards.store(0, Ordering::Release);
        let now = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if global {
            self.names_from.fetch_max(now, Ordering::AcqRel);
        }
    }

    /// A load is useful: the catalog is not current and nobody loads it.
    fn needs_load(&self) -> bool {
        self.get().is_none() && !self.loading.load(Ordering::Acquire)
    }
}

/// Where to load a catalog from: the lead backend, as the session's user.
#[derive(Clone)]
pub struct LoadTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
    pub tls: crate::config::BackendTls,
}

/// Every database's catalog slot.
#[derive(Default)]
pub struct Catalogs {
    slots: Mutex<HashMap<String, Arc<CatalogSlot>>>,
}

impl Catalogs {
    pub fn slot(&self, database: &str) -> Arc<CatalogSlot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let id = slots.len() as u32 + 1;
        slots.entry(database.to_string()).or_insert_with(|| Arc::new(CatalogSlot { id, ..CatalogSlot::default() })).clone()
    }

    /// Starts a background load of `slot` unless it is current or already loading.
    pub fn refresh(&self, slot: &Arc<CatalogSlot>, target: LoadTarget) {
        if !slot.needs_load() || slot.loading.swap(true, Ordering::AcqRel) {
            return;
        }
        let slot = slot.clone();
        tokio::spawn(async move {
            loop {
                let gen = slot.generation.load(Ordering::Acquire);
                let res = tokio::time::timeout(Duration::from_secs(30), load(&target, gen)).await;
                match res {
                    Ok(Ok(cat)) => {
                        let guards = if cat.guards.is_empty() { 1 } else { 2 };
                        if let Ok(mut cur) = slot.current.write() {
                            *cur = Some(Arc::new(cat));
                            // Only a load of the present state tells reads what to check.
                            if slot.generation.load(Ordering::Acquire) == gen {
                                slot.guards.store(guards, Ordering::Release);
                            }
                        }
                        metrics::counter!("chorus_catalog_loads_total").increment(1);
                        *slot.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                    Ok(Err(e)) => {
                        let msg = crate::cluster::pg_error(&e);
                        tracing::warn!(database = %target.database, error = %msg, "catalog load failed");
                        *slot.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
                    }
                    Err(_) => {
                        tracing::warn!(database = %target.database, "catalog load timed out");
                        *slot.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some("catalog load timed out".into());
                    }
                }
                // A DDL that ended while this load ran may have been missed: go again.
                if slot.generation.load(Ordering::Acquire) != gen && slot.current.read().is_ok_and(|c| c.is_some()) {
                    continue;
                }
                slot.loading.store(false, Ordering::Release);
                slot.loaded.notify_waiters();
                return;
            }
        });
    }
}

const RELATIONS: &str = "\
SELECT c.oid, n.nspname, c.relname, c.relkind::text, c.relpersistence = 't',
       c.relhasrules OR EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal),
       c.relhassubclass OR c.relispartition
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r','p','v','m','f','S')
  AND n.nspname NOT IN ('pg_catalog','information_schema') AND n.nspname NOT LIKE 'pg_toast%'
  AND c.relpersistence <> 't'";

const COLUMNS: &str = "\
SELECT a.attrelid, a.attname, a.atttypid, pg_get_expr(d.adbin, d.adrelid), a.attidentity::text,
       coalesce(pg_get_serial_sequence(quote_ident(n.nspname) || '.' || quote_ident(c.relname), a.attname)::regclass::oid, 0),
       a.attnum
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r','p','v','m','f')
  AND n.nspname NOT IN ('pg_catalog','information_schema') AND n.nspname NOT LIKE 'pg_toast%'
ORDER BY a.attrelid, a.attnum";

const INDEXES: &str = "\
SELECT i.indexrelid, i.indrelid, i.indkey::int2[], i.indexprs IS NOT NULL OR i.indpred IS NOT NULL
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE i.indisunique AND n.nspname NOT IN ('pg_catalog','information_schema') AND n.nspname NOT LIKE 'pg_toast%'";

const FOREIGN_KEYS: &str = "SELECT conrelid, confrelid FROM pg_constraint WHERE contype = 'f'";

const FUNCTIONS: &str = "\
SELECT p.proname, max(CASE p.provolatile WHEN 'i' THEN 0 WHEN 's' THEN 1 ELSE 2 END)::int4, bool_and(p.oid < 16384)
FROM pg_proc p GROUP BY p.proname";

/// Views (through their rules, and the views over those) and tables with row-level security
/// policies whose reading calls a function that is not built in, or a built-in that writes.
const GUARDED_RELATIONS: &str = "\
WITH RECURSIVE risky AS (
  SELECT p.oid FROM pg_proc p WHERE p.oid >= 16384 OR p.proname = ANY($1::text[])
), direct AS (
  SELECT r.ev_class AS rel FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
   WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_proc'::regclass AND d.refobjid IN (SELECT oid FROM risky)
  UNION
  SELECT pol.polrelid FROM pg_depend d JOIN pg_policy pol ON pol.oid = d.objid
   WHERE d.classid = 'pg_policy'::regclass AND d.refclassid = 'pg_proc'::regclass AND d.refobjid IN (SELECT oid FROM risky)
), closure(rel) AS (
  SELECT rel FROM direct
  UNION
  SELECT r.ev_class FROM closure c
    JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = c.rel AND d.classid = 'pg_rewrite'::regclass
    JOIN pg_rewrite r ON r.oid = d.objid
)
SELECT DISTINCT c.relname::text FROM closure JOIN pg_class c ON c.oid = closure.rel";

const USER_OPERATORS: &str = "SELECT DISTINCT oprname::text FROM pg_operator WHERE oid >= 16384";

const EVENT_TRIGGERS: &str = "SELECT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtenabled <> 'D')";

async fn load(t: &LoadTarget, generation: u64) -> Result<Catalog, tokio_postgres::Error> {
    let pg = crate::cluster::Login {
        host: &t.host,
        port: t.port,
        user: &t.user,
        password: &t.password,
        database: &t.database,
        application: "chorus-catalog",
        timeout: Duration::from_secs(10),
        tls: t.tls.clone(),
    };
    let (client, conn) = pg.open().await?;
    let res = read(&client, generation).await;
    drop(client);
    let _ = conn.await;
    res
}

async fn read(client: &tokio_postgres::Client, generation: u64) -> Result<Catalog, tokio_postgres::Error> {
    let mut cat = Catalog { generation, ..Catalog::default() };
    for r in client.query(RELATIONS, &[]).await? {
        let oid: u32 = r.get(0);
        let kind: String = r.get(3);
        let rel = Relation {
            oid,
            schema: r.get(1),
            name: r.get(2),
            kind: kind.bytes().next().unwrap_or(b'r'),
            temp: r.get(4),
            has_triggers: r.get(5),
            has_children: r.get(6),
            ..Relation::default()
        };
        cat.by_name.entry(rel.name.clone()).or_default().push(oid);
        cat.relations.insert(oid, rel);
    }
    for r in client.query(COLUMNS, &[]).await? {
        let oid: u32 = r.get(0);
        let expr: Option<String> = r.get(3);
        let identity: String = r.get(4);
        let seq: u32 = r.get(5);
        let default = if seq != 0 && (!identity.is_empty() || expr.is_some()) {
            Some(DefaultKind::Sequence(seq))
        } else {
            expr.map(|e| default_kind(&e))
        };
        if let Some(rel) = cat.relations.get_mut(&oid) {
            rel.columns.push(Column { attnum: r.get(6), name: r.get(1), type_oid: r.get(2), default });
        }
    }
    for r in client.query(INDEXES, &[]).await? {
        let (idx, table): (u32, u32) = (r.get(0), r.get(1));
        let keys: Vec<i16> = r.get(2);
        let complex: bool = r.get(3);
        if let Some(rel) = cat.relations.get_mut(&table) {
            if complex || keys.contains(&0) {
                rel.complex_unique = true;
                continue;
            }
            let positions: Option<Vec<usize>> = keys.iter().map(|&k| rel.columns.iter().position(|c| c.attnum == k)).collect();
            match positions {
                Some(p) => rel.unique.push((idx, p)),
                None => rel.complex_unique = true,
            }
        }
    }
    for r in client.query(FOREIGN_KEYS, &[]).await? {
        let (child, parent): (u32, u32) = (r.get(0), r.get(1));
        if let Some(rel) = cat.relations.get_mut(&child) {
            rel.parents.push(parent);
        }
        if let Some(rel) = cat.relations.get_mut(&parent) {
            rel.children.push(child);
        }
    }
    for r in client.query(FUNCTIONS, &[]).await? {
        let v = match r.get::<_, i32>(1) {
            0 => Volatility::Immutable,
            1 => Volatility::Stable,
            _ => Volatility::Volatile,
        };
        let (name, builtin): (String, bool) = (r.get(0), r.get(2));
        if !builtin {
            cat.guards.functions.insert(name.clone());
        }
        cat.functions.insert(name, (v, builtin));
    }
    let writing: Vec<String> = super::analyze::WRITING_BUILTINS.iter().map(|s| s.to_string()).collect();
    for r in client.query(GUARDED_RELATIONS, &[&writing]).await? {
        cat.guards.relations.insert(r.get(0));
    }
    for r in client.query(USER_OPERATORS, &[]).await? {
        cat.guards.operators.push(r.get(0));
    }
    cat.event_triggers = client.query_one(EVENT_TRIGGERS, &[]).await?.get(0);
    Ok(cat)
}

/// Classifies a default expression by the nondeterministic calls in it.
pub fn default_kind(expr: &str) -> DefaultKind {
    let e = expr.to_ascii_lowercase();
    let has = |f: &str| e.contains(f);
    let now =
        ["now()", "current_timestamp", "current_date", "localtimestamp", "transaction_timestamp()", "current_time", "localtime"];
    if has("nextval(") {
        return DefaultKind::Volatile; // a sequence not owned by the column: analysed as unknown
    }
    if has("gen_random_uuid()") || has("uuid_generate_v4()") {
        return if e.trim_end_matches("::uuid").trim() == "gen_random_uuid()" || e.trim() == "uuid_generate_v4()" {
            DefaultKind::Uuid
        } else {
            DefaultKind::Volatile
        };
    }
    if has("random()") {
        return if e.trim() == "random()" { DefaultKind::Random } else { DefaultKind::Volatile };
    }
    if has("clock_timestamp()") || has("statement_timestamp()") || has("timeofday()") || has("uuid_generate_v1") {
        return DefaultKind::Volatile;
    }
    if now.iter().any(|f| has(f)) {
        return DefaultKind::Now;
    }
    if e.contains('(') {
        // A function call of unknown volatility; the analysis checks functions by name too.
        return DefaultKind::Volatile;
    }
    DefaultKind::Stable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_classified() {
        assert_eq!(default_kind("now()"), DefaultKind::Now);
        assert_eq!(default_kind("CURRENT_TIMESTAMP"), DefaultKind::Now);
        assert_eq!(default_kind("gen_random_uuid()"), DefaultKind::Uuid);
        assert_eq!(default_kind("random()"), DefaultKind::Random);
        assert_eq!(default_kind("0"), DefaultKind::Stable);
        assert_eq!(default_kind("'x'::text"), DefaultKind::Stable);
        assert_eq!(default_kind("clock_timestamp()"), DefaultKind::Volatile);
        assert_eq!(default_kind("(random() * 10)"), DefaultKind::Volatile);
        assert_eq!(default_kind("my_func(1)"), DefaultKind::Volatile);
    }

    #[test]
    fn unqualified_names_match_every_schema() {
        let mut cat = Catalog::default();
        for (oid, schema) in [(1, "public"), (2, "other")] {
            cat.relations.insert(oid, Relation { oid, schema: schema.into(), name: "t".into(), ..Relation::default() });
            cat.by_name.entry("t".into()).or_default().push(oid);
        }
        assert!(cat.resolve("", "t").is_none(), "ambiguous");
        assert_eq!(cat.resolve("other", "t").map(|r| r.oid), Some(2));
        assert!(cat.resolve("", "u").is_none());
    }
}
