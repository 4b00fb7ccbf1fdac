//! Analysis against a hand-made catalog: what locks, edits and refusals statements get.

use super::*;
use crate::sql::catalog::{Column, Relation};

fn catalog() -> Catalog {
    catalog_with(&[])
}

/// The test catalog with more built-in functions in it.
fn catalog_with(more: &[(&str, Volatility, bool)]) -> Catalog {
    let col = |attnum: i16, name: &str, ty: u32, default: Option<DefaultKind>| Column {
        attnum,
        name: name.into(),
        type_oid: ty,
        default,
    };
    let accounts = Relation {
        oid: 100,
        schema: "public".into(),
        name: "accounts".into(),
        kind: b'r',
        columns: vec![col(1, "id", INT4, None), col(2, "balance", INT8, None), col(3, "owner", TEXT, None)],
        unique: vec![(101, vec![0])],
        ..Relation::default()
    };
    let events = Relation {
        oid: 200,
        schema: "public".into(),
        name: "events".into(),
        kind: b'r',
        columns: vec![
            col(1, "id", INT8, Some(DefaultKind::Sequence(201))),
            col(2, "at", 1184, Some(DefaultKind::Now)),
            col(3, "uid", 2950, Some(DefaultKind::Uuid)),
            col(4, "note", TEXT, None),
        ],
        unique: vec![(202, vec![0])],
        ..Relation::default()
    };
    let seq = Relation { oid: 201, schema: "public".into(), name: "events_id_seq".into(), kind: b'S', ..Relation::default() };
    let items = Relation {
        oid: 300,
        schema: "public".into(),
        name: "items".into(),
        kind: b'r',
        columns: vec![
            col(1, "id", INT8, Some(DefaultKind::Sequence(301))),
            col(2, "name", TEXT, None),
            col(3, "qty", INT4, None),
        ],
        unique: vec![(302, vec![0])],
        ..Relation::default()
    };
    let mut functions = vec![
        ("now", Volatility::Stable, true),
        ("my_writer", Volatility::Volatile, false),
        ("generate_series", Volatility::Immutable, true),
        ("unnest", Volatility::Immutable, true),
        ("count", Volatility::Immutable, true),
    ];
    functions.extend_from_slice(more);
    Catalog::for_tests(vec![accounts, events, seq, items], &functions)
}

fn an(sql: &str) -> Analysis {
    analyze(sql.as_bytes(), Some(&catalog()))
}

#[test]
fn update_by_primary_key_locks_one_key() {
    let a = an("UPDATE accounts SET balance = balance + 5 WHERE id = 7");
    assert!(a.class.writes && !a.global);
    assert_eq!(a.tables, vec![(100, TableMode::Keyed)]);
    assert_eq!(a.keys, vec![KeyLock { table: 100, index: 101, parts: vec![KeyPart::Const("7".into())] }]);
    let p = an("UPDATE accounts SET balance = balance + $1 WHERE id = $2");
    assert_eq!(p.keys[0].parts, vec![KeyPart::Param(2, INT4)]);
    assert_eq!(p.max_param, 2);
}

#[test]
fn unpinned_updates_lock_the_table() {
    assert_eq!(an("UPDATE accounts SET balance = 0").tables, vec![(100, TableMode::Exclusive)]);
    assert_eq!(an("UPDATE accounts SET balance = 0 WHERE id = 1 OR id = 2").tables, vec![(100, TableMode::Exclusive)]);
    // Changing the key itself may collide with another row.
    assert_eq!(an("UPDATE accounts SET id = 9 WHERE id = 1").tables, vec![(100, TableMode::Exclusive)]);
}

#[test]
fn reads_inside_writes_take_shared_locks() {
    let a = an("INSERT INTO events (note) SELECT owner FROM accounts ORDER BY id");
    assert!(a.tables.contains(&(100, TableMode::Shared)), "{:?}", a.tables);
    assert!(a.tables.contains(&(200, TableMode::Exclusive)));
    assert_eq!(a.sequences, vec![201]);
    // events.uid defaults to a uuid: one per row of a SELECT cannot be chosen by Chorus.
    assert!(a.refusal.as_deref().unwrap_or("").contains("volatile default"), "{:?}", a.refusal);
    let b = an("INSERT INTO accounts SELECT * FROM accounts WHERE id = 1");
    assert_eq!(b.tables, vec![(100, TableMode::Shared), (100, TableMode::Exclusive)]);
    assert!(b.refusal.is_none(), "{:?}", b.refusal);
}

#[test]
fn sequence_backed_insert_select_needs_a_total_order() {
    let a = an("INSERT INTO events (note) SELECT owner FROM accounts");
    assert!(a.refusal.as_deref().unwrap_or("").contains("total ORDER BY"), "{:?}", a.refusal);
    let b = an("INSERT INTO items (name, qty) SELECT owner, balance FROM accounts ORDER BY owner");
    assert!(b.refusal.is_some(), "owner does not determine qty: {b:?}");
    let c = an("INSERT INTO items (name, qty) SELECT owner, balance FROM accounts ORDER BY id");
    assert!(c.refusal.is_none(), "sorted by the unique key: {:?}", c.refusal);
}

#[test]
fn insert_select_whose_order_cannot_matter_is_allowed() {
    for sql in [
        // Rows of a set-returning function of constants come in one order everywhere.
        "insert into items(name, qty) select 'item' || g, g from generate_series(1, 1000) g",
        "INSERT INTO items (qty) SELECT x FROM unnest(ARRAY[3, 1, 2]) AS x",
        "insert into items(qty) select g from generate_series(1, 10) g where g % 2 = 0",
        // An ORDER BY that determines every inserted column: rows that tie are identical.
        "insert into items(name, qty) select 'item' || g, g from generate_series(1, 1000) g order by g",
        "insert into items(name, qty) select 'item' || g, g from generate_series(1, 1000) g order by 1, 2",
        "INSERT INTO items (name) SELECT owner FROM accounts ORDER BY owner",
    ] {
        let a = an(sql);
        assert!(a.refusal.is_none(), "{sql}: {:?}", a.refusal);
        assert_eq!(a.sequences, vec![301], "{sql}");
    }
    for sql in [
        "insert into items(qty) select g from generate_series(1, 10) g join accounts a on a.id = g",
        "insert into items(qty) select distinct g from generate_series(1, 10) g",
        "insert into items(qty) select g from generate_series(1, (select count(*) from accounts)::int) g",
        "insert into items(name, qty) select owner, 1 from accounts order by 2",
        "insert into items(qty) select (random() * 10)::int from generate_series(1, 10) g",
    ] {
        assert!(an(sql).refusal.is_some(), "{sql} may number its rows differently on each backend");
    }
}

#[test]
fn now_and_volatile_defaults_are_filled_in() {
    let a = an("INSERT INTO events (note) VALUES ('a'), ('b')");
    assert_eq!(a.sequences, vec![201]);
    let v = crate::sql::rewrite::Values { tx_time: "T".into(), stmt_time: "S".into() };
    let sql = crate::sql::rewrite::with_literals("INSERT INTO events (note) VALUES ('a'), ('b')", &a.edits, &v);
    assert!(sql.starts_with("INSERT INTO events (\"note\", \"at\", \"uid\")  VALUES ('a', ('T'::timestamptz), ('"), "{sql}");
    assert_eq!(sql.matches("::uuid").count(), 2, "{sql}");
    let b = an("INSERT INTO accounts VALUES (1, 2, now()::text)");
    let sql = crate::sql::rewrite::with_literals("INSERT INTO accounts VALUES (1, 2, now()::text)", &b.edits, &v);
    assert_eq!(sql, "INSERT INTO accounts VALUES (1, 2, ('T'::timestamptz)::text)");
    assert_eq!(b.keys[0].parts, vec![KeyPart::Const("1".into())]);
}

#[test]
fn prepared_statements_get_parameters_not_literals() {
    let sql = "INSERT INTO accounts (id, balance, owner) VALUES ($1, $2, CURRENT_TIMESTAMP(2)::text)";
    let a = an(sql);
    let (text, chosen) = crate::sql::rewrite::with_params(sql, &a.edits, a.max_param);
    assert_eq!(text, "INSERT INTO accounts (id, balance, owner) VALUES ($1, $2, ($3::timestamptz::timestamptz(2))::text)");
    assert_eq!(chosen, vec![Chosen::Now("::timestamptz(2)")]);
}

#[test]
fn per_row_randomness_and_other_unsafe_constructs_are_refused() {
    assert!(an("UPDATE accounts SET owner = random()::text").refusal.is_some());
    assert!(an("UPDATE accounts SET owner = random()::text WHERE id = 3").refusal.is_none());
    assert!(an("DELETE FROM accounts WHERE ctid = '(0,1)'").refusal.is_some());
    assert!(an("SELECT * FROM accounts FOR UPDATE SKIP LOCKED").refusal.is_some());
    assert!(an("DELETE FROM accounts WHERE id IN (SELECT id FROM accounts LIMIT 3)").refusal.is_some());
    assert!(an("DELETE FROM accounts WHERE id IN (SELECT id FROM accounts ORDER BY id LIMIT 3)").refusal.is_none());
}

#[test]
fn reads_calls_and_unknowns() {
    assert!(!an("SELECT now(), random() FROM accounts").class.writes);
    let w = an("SELECT my_writer()");
    assert!(w.class.writes && w.global);
    let n = an("SELECT nextval('events_id_seq')");
    assert!(n.class.writes && !n.global);
    assert_eq!(n.sequences, vec![201]);
    // A table the catalog does not know: the router decides (its own DDL holds the name, or
    // the cluster-wide lock).
    let u = an("INSERT INTO nowhere VALUES (1)");
    assert!(!u.global && u.own_targets == ["nowhere"], "{u:?}");
    let d = an("CREATE TABLE x (a int)");
    assert!(!d.global && d.ddl && d.names == ["x"], "{d:?}");
    assert!(an("SELECT 1 FROM accounts FOR UPDATE").class.writes);
    let t = an("BEGIN; UPDATE accounts SET balance = 1 WHERE id = 1; COMMIT");
    assert_eq!(t.class.tx, TxEffect::End);
    assert!(!an("UPDATE accounts SET balance = 1 WHERE id = 1").global);
    // Without a catalog every write is global.
    assert!(analyze(b"UPDATE accounts SET balance = 1 WHERE id = 1", None).global);
}

#[test]
fn returning_rows_are_hashed_for_writes_only() {
    assert!(an("UPDATE accounts SET balance = 1 WHERE id = 1 RETURNING balance").hash_rows);
    assert!(!an("SELECT 1; UPDATE accounts SET balance = 1 WHERE id = 1").hash_rows);
}

#[test]
fn literal_variants_share_one_analysis_and_keep_their_own_values() {
    let cat = catalog();
    let a = analyze_query_cached(b"UPDATE accounts SET balance = balance + 5 WHERE id = 7", Some(&cat));
    assert_eq!(a.keys[0].parts, vec![KeyPart::Const("7".into())]);
    assert_eq!(a.max_param, 0);
    let b = analyze_query_cached(b"UPDATE accounts SET balance = balance + 123456 WHERE id = 0042", Some(&cat));
    assert_eq!(b.keys[0].parts, vec![KeyPart::Const("42".into())]);
    let t = analyze_query_cached(b"UPDATE accounts SET balance = 1 WHERE id = 'x'", Some(&cat));
    assert_eq!(t.tables, vec![(100, TableMode::Keyed), (100, TableMode::Exclusive)], "not an integer: the table");
    // Edits land where they are in the original text, whatever the literals' lengths.
    let sql = "INSERT INTO accounts VALUES (123456789, 2, CURRENT_TIMESTAMP::text)";
    let c = analyze_query_cached(sql.as_bytes(), Some(&cat));
    let v = crate::sql::rewrite::Values { tx_time: "T".into(), stmt_time: "S".into() };
    assert_eq!(
        crate::sql::rewrite::with_literals(sql, &c.edits, &v),
        "INSERT INTO accounts VALUES (123456789, 2, ('T'::timestamptz)::text)"
    );
    assert_eq!(c.keys[0].parts, vec![KeyPart::Const("123456789".into())]);
    // A literal where no parameter may stand: the text is analysed as it is.
    let d = analyze_query_cached(b"INSERT INTO accounts VALUES (1, 2, CURRENT_TIMESTAMP(3)::text)", Some(&cat));
    assert!(d.parsed && !d.global && d.edits.len() == 1);
    assert_eq!(d.keys[0].parts, vec![KeyPart::Const("1".into())]);
    // Strings compared with = are parameterised; quotes inside them are unescaped.
    let e = analyze_query_cached(b"DELETE FROM events WHERE id = 5 AND note = 'it''s'", Some(&cat));
    assert_eq!(e.keys[0].parts, vec![KeyPart::Const("5".into())]);
}

#[test]
#[ignore = "a measurement, run by hand"]
fn measure_analysis_cost() {
    let cat = catalog();
    let n = 2000;
    let t = std::time::Instant::now();
    for i in 0..n {
        let sql = format!("UPDATE accounts SET balance = balance + {i} WHERE id = {i};");
        std::hint::black_box(analyze(sql.as_bytes(), Some(&cat)));
    }
    let full = t.elapsed() / n;
    let t = std::time::Instant::now();
    for i in 0..n {
        let sql = format!("UPDATE accounts SET balance = balance + {i} WHERE id = {i};");
        std::hint::black_box(pg_query::parse(&sql, 0).unwrap());
    }
    let parse = t.elapsed() / n;
    let t = std::time::Instant::now();
    for i in 0..n {
        let sql = format!("UPDATE accounts SET balance = balance + {i} WHERE id = {i};");
        std::hint::black_box(analyze_query_cached(sql.as_bytes(), Some(&cat)));
    }
    let cached = t.elapsed() / n;
    println!("analysis {full:?} per statement, of which parse {parse:?}; literal-normalised cache {cached:?}");
}

/// The fast path against the full analysis: over a corpus of statements, one that the lexical
/// pass (with the catalog's guards) lets go to a single backend must be a read for the
/// analysis too. A wrong "write" costs speed; a wrong "read" would cost G1.
#[test]
fn the_fast_path_never_calls_a_read_what_the_analysis_calls_a_write() {
    let mut more: Vec<(&str, Volatility, bool)> = [
        "generate_series",
        "array_agg",
        "max",
        "count",
        "coalesce",
        "upper",
        "json_build_object",
        "random",
        "similar_to_escape",
        "sum",
    ]
    .iter()
    .map(|&f| (f, Volatility::Immutable, true))
    .collect();
    // A user function overloads the built-in lower(text): the name is no longer all built-in.
    more.push(("lower", Volatility::Volatile, false));
    let mut cat = catalog_with(&more);
    cat.guards.relations.insert("writing_view".into());
    cat.guards.operators.push("#@#".into());
    let corpus = [
        "select 1",
        "select * from accounts where id = 1",
        "select lower(owner) from accounts",
        "select upper(owner) from accounts",
        "select s.lower(1)",
        "select pg_catalog.lower('A')",
        "select my_writer(1)",
        "select * from writing_view",
        "select x from public.writing_view w",
        "select 1 #@# 2",
        "select 1 OPERATOR(public.#@#) 2",
        "select nextval('events_id_seq')",
        "select * from accounts for update",
        "select * from accounts for share skip locked",
        "with d as (delete from accounts returning *) select * from d",
        "select count(*) from accounts a join events e on e.id = a.id",
        "select (select max(id) from events), now(), random()",
        "select set_config('a.b', '1', false)",
        "select pg_advisory_lock(1)",
        "select lo_create(0)",
        "select txid_current()",
        "select pg_notify('c', 'x')",
        "values (1), (2)",
        "table accounts",
        "select * from generate_series(1, 3) g",
        "select array_agg(id order by id) from accounts",
        "select coalesce(max(balance), 0) from accounts",
        "show work_mem",
        "explain select * from accounts",
        "select \"lower\"('A')",
        "select * into t2 from accounts",
        "select pg_terminate_backend(pg_backend_pid())",
        "select * from accounts where owner like 'a%' order by id limit 3",
        "select json_build_object('a', 1)",
        "select (lower(owner)) from accounts",
        "select * from accounts where id in (select id from events) and owner is not null",
        "select row(1, 2), (array[1, 2])[1], 1 is distinct from 2, not exists (select 1)",
        "select sum(balance) over (partition by owner order by id rows between 1 preceding and current row) from accounts",
        "select * from accounts tablesample system (10)",
        "select id::text collate \"C\", balance between 1 and 2 from accounts",
        "with recursive r(n) as (select 1 union all select n + 1 from r where n < 3) select * from r",
        "select greatest(1, 2), least(3, 4), nullif(1, 2), current_date, current_user",
        "select * from accounts a left join events e using (id) where e.note is unknown",
        "select case id when 1 then 'a' else 'b' end from accounts order by 1 nulls last limit 1 offset 1",
        "select id from accounts group by grouping sets ((id), ())",
        "select count(*) filter (where id > 1) from accounts",
        "select $1::int + $2",
        "select * from accounts where owner = any(array['a', 'b']) and id = all(select 1)",
        "select (select owner from accounts limit 1) as o",
        "select 1 where 'a' similar to 'b' and 'c' ilike 'd' and 'e' !~ 'f'",
    ];
    let mut checked = 0;
    for sql in corpus {
        let lexical = crate::sql::classify(sql.as_bytes());
        if !lexical.read_only || crate::sql::touches_guards(sql.as_bytes(), &cat.guards) {
            continue;
        }
        checked += 1;
        let a = analyze(sql.as_bytes(), Some(&cat));
        assert!(!a.class.writes, "the fast path calls {sql:?} a read, the analysis a write: {a:?}");
    }
    assert!(checked >= 12, "only {checked} statements went through the fast path");
    // And the other way: each read that writes is a write by the one path or the other.
    for sql in ["select s.lower(1)", "select lower(2)", "select * from writing_view", "select 4 #@# 5", "select my_writer(1)"] {
        let lexical = crate::sql::classify(sql.as_bytes());
        let fast_read = lexical.read_only && !crate::sql::touches_guards(sql.as_bytes(), &cat.guards);
        assert!(!fast_read, "{sql} must not take the fast path");
        assert!(analyze(sql.as_bytes(), Some(&cat)).class.writes, "{sql} must be a write for the analysis");
    }
}

#[test]
fn a_node_kind_the_walk_does_not_know_makes_a_write() {
    // XMLELEMENT parses to an XmlExpr, which the analysis was not written for.
    let a = an("SELECT xmlelement(name x, owner) FROM accounts");
    assert!(a.class.writes && a.global, "{a:?}");
    // The kinds it knows keep a read a read.
    let b = an("SELECT a.id, coalesce(max(balance), 0), CASE WHEN owner IS NULL THEN 1 END FROM accounts a GROUP BY a.id, owner");
    assert!(!b.class.writes, "{b:?}");
}

#[test]
fn ddl_locks_the_names_it_gives_and_the_cluster_for_what_it_cannot_name() {
    let named = |sql: &str| {
        let a = an(sql);
        assert!(a.ddl && a.class.writes, "{sql}: {a:?}");
        (!a.global).then_some(a.names)
    };
    let names = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_eq!(named("CREATE TABLE copy_src (a int, b text)"), names(&["copy_src"]));
    assert_eq!(named("CREATE TEMP TABLE scratch (a int)"), names(&["scratch"]));
    // A foreign key's table, a LIKE's source, a view's tables are named too.
    assert_eq!(named("CREATE TABLE items (id int, acct int REFERENCES accounts (id))"), names(&["accounts", "items"]));
    assert_eq!(named("CREATE TABLE c2 (LIKE events)"), names(&["c2", "events"]));
    assert_eq!(named("CREATE VIEW rich AS SELECT * FROM accounts WHERE balance > 10"), names(&["accounts", "rich"]));
    assert_eq!(named("ALTER TABLE accounts ADD COLUMN note text"), names(&["accounts"]));
    assert_eq!(named("CREATE INDEX ON accounts (owner)"), names(&["accounts"]));
    assert_eq!(named("DROP TABLE IF EXISTS public.copy_src, copy_tgt"), names(&["copy_src", "copy_tgt"]));
    assert_eq!(named("TRUNCATE accounts"), names(&["accounts"]));
    assert_eq!(named("ALTER TABLE accounts RENAME TO accts"), names(&["accounts", "accts"]));
    assert_eq!(named("ALTER TABLE accounts RENAME COLUMN owner TO holder"), names(&["accounts"]));
    assert_eq!(named("CREATE SEQUENCE s2"), names(&["s2"]));
    // What it cannot name: the cluster-wide lock.
    for sql in [
        "DROP TABLE accounts CASCADE",
        "TRUNCATE accounts RESTART IDENTITY",
        "DROP INDEX accounts_pkey",
        "CREATE TABLE kid () INHERITS (accounts)",
        "ALTER TABLE events INHERIT accounts",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'",
        "DO $$ BEGIN END $$",
        "CREATE TYPE mood AS ENUM ('ok')",
        "CREATE TABLE t2 AS SELECT * FROM accounts",
        "COMMENT ON TABLE accounts IS 'x'",
    ] {
        assert_eq!(named(sql), None, "{sql}");
    }
    // Without a catalog, or with event triggers enabled: the cluster-wide lock.
    assert!(analyze(b"CREATE TABLE x (a int)", None).global);
    let mut with_trigger = catalog();
    with_trigger.event_triggers = true;
    assert!(analyze(b"CREATE TABLE x (a int)", Some(&with_trigger)).global);
    // A table created earlier in the same text is its own DDL's.
    let both = an("CREATE TABLE fresh (a int); INSERT INTO fresh VALUES (1)");
    assert!(!both.global && both.own_targets.is_empty() && both.names == ["fresh"], "{both:?}");
    assert!(ddl_only(b"create table a (x int); DROP TABLE b"));
    assert!(!ddl_only(b"create table a (x int); insert into a values (1)"));
    assert!(!ddl_only(b"select 1"));
}

#[test]
fn a_pid_signal_reads_alone_and_is_refused_inside_a_write() {
    let a = an("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'x'");
    assert!(!a.class.writes && a.refusal.is_none(), "{a:?}");
    let w = an("INSERT INTO accounts (id) SELECT pg_cancel_backend(42)");
    assert!(w.refusal.as_deref().is_some_and(|r| r.contains("pg_cancel_backend")), "{w:?}");
}

#[test]
fn alter_table_that_fills_rows_unevenly_is_refused() {
    let refused = |sql: &str, what: &str| {
        let a = analyze(sql.as_bytes(), Some(&catalog_with(&[("lower", Volatility::Immutable, true)])));
        assert!(a.refusal.as_deref().is_some_and(|r| r.contains(what)), "{sql}: {:?}", a.refusal);
    };
    refused("ALTER TABLE accounts ADD COLUMN at timestamptz DEFAULT now()", "ADD COLUMN at DEFAULT now()");
    refused("ALTER TABLE accounts ADD COLUMN at timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP", "time keyword");
    refused("ALTER TABLE accounts ADD COLUMN r float8 DEFAULT random() * 10", "DEFAULT random()");
    refused("ALTER TABLE accounts ADD COLUMN u uuid DEFAULT gen_random_uuid()", "gen_random_uuid()");
    refused("ALTER TABLE accounts ADD COLUMN w int DEFAULT my_writer()", "my_writer()");
    refused("ALTER TABLE accounts ADD COLUMN n bigserial", "serial type");
    refused("ALTER TABLE accounts ADD COLUMN n int GENERATED ALWAYS AS IDENTITY", "IDENTITY");
    refused("ALTER TABLE accounts ALTER COLUMN owner TYPE text USING owner || random()::text", "USING random()");
    refused("ALTER TABLE accounts ADD COLUMN a int DEFAULT 1, ADD COLUMN b timestamptz DEFAULT now()", "ADD COLUMN b");
    // The same for every row everywhere: constants and immutable functions; a new default that
    // reaches only future INSERTs (Chorus supplies those values).
    for sql in [
        "ALTER TABLE accounts ADD COLUMN note text DEFAULT 'x'",
        "ALTER TABLE accounts ADD COLUMN n int NOT NULL DEFAULT 0",
        "ALTER TABLE accounts ADD COLUMN l text DEFAULT lower('X')",
        "ALTER TABLE accounts ADD COLUMN plain timestamptz",
        "ALTER TABLE accounts ALTER COLUMN owner SET DEFAULT now()::text",
        "ALTER TABLE accounts ALTER COLUMN balance TYPE numeric USING balance::numeric",
    ] {
        let a = analyze(sql.as_bytes(), Some(&catalog_with(&[("lower", Volatility::Immutable, true)])));
        assert!(a.refusal.is_none(), "{sql}: {:?}", a.refusal);
    }
}
