//! The update history: units that committed on some backends only when Chorus died are
//! completed on the others before Chorus serves again (G2), whatever their shape.
//!
//! A unit is left half-committed the way a crash leaves it: on one backend Chorus's record of
//! the unit waits (a local session holds `chorus.history` locked, or the server is stopped),
//! the other backend commits, and Chorus is killed (SIGKILL) while the client waits for its
//! acknowledgment. Then the lock goes, Chorus starts again, and must complete the unit there.

mod common;

use common::*;
use futures::SinkExt;

/// A number `sql` reads on `srv` (a local superuser connection).
async fn local_i64(srv: &PgServer, sql: &str) -> i64 {
    let c = srv.local_client("postgres").await.unwrap();
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// Rows of `table` on `srv`.
async fn rows(srv: &PgServer, table: &str) -> i64 {
    local_i64(srv, &format!("SELECT count(*) FROM {table}")).await
}

/// Waits until `table` on `srv` exists and has `n` rows (every 10 ms, for at most 20 s).
async fn await_rows(srv: &PgServer, table: &str, n: i64) {
    let c = srv.local_client("postgres").await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let sql = format!("SELECT count(*) FROM {table}");
    loop {
        if let Ok(r) = c.query_one(&sql, &[]).await {
            if r.get::<_, i64>(0) == n {
                return;
            }
        }
        assert!(std::time::Instant::now() < deadline, "{table} never held {n} rows on port {}", srv.port());
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Chorus dies while `waiting` units wait on pg2 for `holder`'s lock on the history, their
/// COMMIT unread: their sessions on pg2 end before they read it (as when the server never got
/// it), the lock goes, and Chorus starts again.
async fn crash_before_commit(s: &mut Setup, holder: &tokio_postgres::Client, waiting: i64) {
    let blocked = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND backend_type = 'client backend'";
    let sql = format!("SELECT 1 FROM ({blocked}) b WHERE count = {waiting}");
    let _: i32 = await_row(&s.servers[1], &sql, &[], "the units' records never waited on pg2").await;
    s.chorus.kill();
    let c = s.servers[1].local_client("postgres").await.unwrap();
    c.batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND backend_type = 'client backend'")
        .await
        .unwrap();
    let gone = format!("SELECT 1 FROM ({blocked}) b WHERE count = 0");
    let _: i32 = await_row(&s.servers[1], &gone, &[], "the waiting sessions did not end").await;
    holder.batch_execute("ROLLBACK").await.unwrap();
    restart(s, waiting as usize).await;
}

/// Starts Chorus again (killed, the held backend released) and checks that every backend is
/// in sync and identical, with `units` recovered.
async fn restart(s: &mut Setup, units: usize) {
    let line = "recovered a unit the backend lacked";
    let before = s.chorus.log().matches(line).count();
    s.chorus.launch().await.expect("chorus starts again");
    let log = s.chorus.log();
    let recovered = log.matches(line).count() - before;
    assert_eq!(recovered, units, "units recovered:\n{log}");
    for name in ["pg1", "pg2"] {
        assert_eq!(s.chorus.states().get(name).map(String::as_str), Some("in_sync"), "{:?}", s.chorus.states());
    }
    s.assert_identical().await;
    let (ok, out) = s.chorus.verify();
    assert!(ok, "verify: {out}");
}

/// The issue's reproduction: a 6 MB COPY in a transaction commits on pg1 while pg2, stopped,
/// has the COMMIT unread; Chorus is killed; pg2 resumes (its transaction dies with Chorus's
/// connection); at restart pg2 gets the unit from pg1's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_committed_on_one_backend_when_chorus_died_is_completed_at_restart() {
    let mut s =
        Setup::with(2, ChorusOptions { extra: "backend_timeout = \"120s\"\nhistory = true".into(), ..Default::default() }).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE big (id int PRIMARY KEY, pad text)").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    let sink = c.copy_in("COPY big FROM STDIN").await.unwrap();
    futures::pin_mut!(sink);
    let pad = "x".repeat(90);
    let mut chunk = String::new();
    for i in 0..60_000 {
        chunk.push_str(&format!("{i}\t{pad}\n"));
        if chunk.len() > 64 * 1024 {
            sink.send(bytes::Bytes::from(std::mem::take(&mut chunk))).await.unwrap();
        }
    }
    sink.send(bytes::Bytes::from(chunk)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 60_000);
    // pg2 has finished the COPY too and sent its answer (its session waits in the transaction
    // for the next message; the state turns idle just before the answer is flushed, the wait
    // event only once it was): stop it there.
    let idle = "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'COPY big%' AND state = 'idle in transaction' \
                AND wait_event = 'ClientRead'";
    let _: i32 = await_row(&s.servers[1], idle, &[], "pg2 never finished the COPY").await;
    s.servers[1].pause();
    let commit = tokio::spawn(async move { c.batch_execute("COMMIT").await });
    await_rows(&s.servers[0], "big", 60_000).await;
    s.chorus.kill();
    s.servers[1].resume();
    restart(&mut s, 1).await;
    // The client saw its connection end without an acknowledgment (no SQLSTATE: Chorus died).
    let seen = commit.await.unwrap();
    let e = seen.expect_err("the COMMIT cannot have been acknowledged");
    assert!(e.code().is_none(), "{e}");
    assert_eq!(rows(&s.servers[1], "big").await, 60_000);
}

/// Units of every shape, each committed on pg1 only when Chorus died: DDL and now() in a
/// transaction; an autocommit prepared INSERT (extended protocol) with now() and uuid
/// defaults; an autocommit COPY; an autocommit multi-statement query. All are completed on
/// pg2, in serial order, to identical data. A unit that drew sequence values cannot be: pg2
/// leaves, loudly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_of_every_shape_are_completed_from_the_history() {
    let mut s =
        Setup::with(2, ChorusOptions { extra: "backend_timeout = \"120s\"\nhistory = true".into(), ..Default::default() }).await;
    let setup = s.client().await;
    setup
        .batch_execute(
            "CREATE TABLE ids (id int PRIMARY KEY, at timestamptz DEFAULT now(), u uuid DEFAULT gen_random_uuid(), v text);
             CREATE TABLE counted (id serial PRIMARY KEY, v text);
             CREATE TABLE copied (a int, b text);
             CREATE TABLE multi (a int)",
        )
        .await
        .unwrap();
    // Round 1: DDL (the cluster-wide lock: alone).
    let holder = s.servers[1].local_client("postgres").await.unwrap();
    holder.batch_execute("BEGIN; LOCK chorus.history IN EXCLUSIVE MODE").await.unwrap();
    let c = s.client().await;
    let ddl = tokio::spawn(async move {
        for sql in
            ["BEGIN", "CREATE TABLE made (id int, at timestamptz)", "INSERT INTO made VALUES (1, now()), (2, now())", "COMMIT"]
        {
            c.batch_execute(sql).await?;
        }
        Ok::<(), tokio_postgres::Error>(())
    });
    await_rows(&s.servers[0], "made", 2).await;
    crash_before_commit(&mut s, &holder, 1).await;
    assert!(ddl.await.unwrap().is_err(), "no acknowledgment from a dead Chorus");
    // Round 2: three writes outside transactions that do not conflict, from three sessions.
    let holder = s.servers[1].local_client("postgres").await.unwrap();
    holder.batch_execute("BEGIN; LOCK chorus.history IN EXCLUSIVE MODE").await.unwrap();
    let (c1, c2, c3) = (s.client().await, s.client().await, s.client().await);
    let prepared = tokio::spawn(async move {
        let st = c1.prepare("INSERT INTO ids (id, v) VALUES ($1, 'p'), ($2, 'p'), ($3, 'p'), ($4, 'p'), ($5, 'p')").await?;
        c1.execute(&st, &[&1i32, &2i32, &3i32, &4i32, &5i32]).await
    });
    let copy = tokio::spawn(async move {
        let sink = c2.copy_in("COPY copied FROM STDIN").await?;
        futures::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"1\tone\n2\ttwo\n3\tthree\n")).await?;
        sink.finish().await
    });
    let multi = tokio::spawn(async move { c3.batch_execute("INSERT INTO multi VALUES (1); INSERT INTO multi VALUES (2)").await });
    await_rows(&s.servers[0], "ids", 5).await;
    await_rows(&s.servers[0], "copied", 3).await;
    await_rows(&s.servers[0], "multi", 2).await;
    crash_before_commit(&mut s, &holder, 3).await;
    assert!(prepared.await.unwrap().is_err() && copy.await.unwrap().is_err() && multi.await.unwrap().is_err());
    // Round 3: a unit that drew sequence values. pg2 ran its INSERT (every backend runs a
    // unit's statements before any commits it) and lost it, so its sequence moved on: applied
    // again there the rows would get other ids. Recovery says so and pg2 leaves as diverged.
    let holder = s.servers[1].local_client("postgres").await.unwrap();
    holder.batch_execute("BEGIN; LOCK chorus.history IN EXCLUSIVE MODE").await.unwrap();
    let c = s.client().await;
    let counted = tokio::spawn(async move { c.batch_execute("INSERT INTO counted (v) VALUES ('a'), ('b')").await });
    await_rows(&s.servers[0], "counted", 2).await;
    let blocked = "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND backend_type = 'client backend'";
    let _: i32 = await_row(&s.servers[1], blocked, &[], "the record never waited on pg2").await;
    s.chorus.kill();
    let c = s.servers[1].local_client("postgres").await.unwrap();
    c.batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND backend_type = 'client backend'")
        .await
        .unwrap();
    holder.batch_execute("ROLLBACK").await.unwrap();
    s.chorus.launch().await.unwrap();
    assert!(counted.await.unwrap().is_err());
    assert_eq!(s.chorus.states().get("pg2").map(String::as_str), Some("diverged"), "{}", s.chorus.log());
    assert_eq!(s.chorus.states().get("pg1").map(String::as_str), Some("in_sync"));
    assert!(s.chorus.log().contains("sequences [\"public.counted_id_seq\"] differ"), "{}", s.chorus.log());
    let (ok, out) = s.chorus.verify();
    assert!(ok, "verify of the in-sync backend: {out}");
}

/// A client cannot write the history: the table is private and the record function wants
/// Chorus's key. Nothing is ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_forge_history_entries() {
    let s = Setup::with(2, ChorusOptions { extra: "history = true".into(), ..Default::default() }).await;
    let admin = s.client().await;
    admin
        .batch_execute("CREATE ROLE plain LOGIN PASSWORD 'plain-pw'; CREATE TABLE t (a int); GRANT ALL ON t TO plain")
        .await
        .unwrap();
    // The role is not one of Chorus's users: the app user becomes it.
    let c = s.client().await;
    c.batch_execute("SET ROLE plain").await.unwrap();
    c.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    let forged = c.execute("SELECT chorus.record(999999, '\\x00'::bytea, 'guess')", &[]).await.unwrap_err();
    assert_eq!(forged.code().map(|c| c.code()), Some("42501"), "{forged}");
    let read = c.query("SELECT * FROM chorus.history", &[]).await.unwrap_err();
    assert_eq!(read.code().map(|c| c.code()), Some("42501"), "{read}");
    let write = c.execute("INSERT INTO chorus.history VALUES (999999, now(), '\\x00')", &[]).await.unwrap_err();
    assert_eq!(write.code().map(|c| c.code()), Some("42501"), "{write}");
    for name in ["pg1", "pg2"] {
        assert_eq!(s.chorus.states().get(name).map(String::as_str), Some("in_sync"));
    }
    let top = local_i64(&s.servers[0], "SELECT coalesce(max(serial), 0) FROM chorus.history").await;
    assert!(top < 999_999, "no forged entry");
    s.assert_identical().await;
    let (ok, out) = s.chorus.verify();
    assert!(ok, "{out}");
}

/// `history_retention_bytes`: the oldest entries go once the newer ones fill the limit, long
/// before their age would prune them; the newest stay, and `chorus.pruned` notes the newest
/// serial removed (a backend that lacks it needs a join).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_is_pruned_to_its_size_limit() {
    let limit = 64 * 1024;
    let extra = format!("history_retention = \"2m\"\nhistory_retention_bytes = {limit}");
    let s = Setup::with(2, ChorusOptions { extra, ..Default::default() }).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE notes (id int PRIMARY KEY, body text)").await.unwrap();
    // 200 units of about 1 KB each (random text: it does not compress), some 200 KB.
    for i in 0..200 {
        c.execute(
            "INSERT INTO notes VALUES ($1, (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 32)))",
            &[&i],
        )
        .await
        .unwrap();
    }
    let newest: i64 = {
        let l = s.servers[0].local_client("postgres").await.unwrap();
        l.query_one("SELECT max(serial) FROM chorus.history", &[]).await.unwrap().get(0)
    };
    // Pruning runs every 12 s at this retention (its age is far off): the first pass is awaited.
    let sql = format!(
        "SELECT count(*) FROM chorus.history HAVING (SELECT sum(pg_column_size(unit)) FROM chorus.history) <= {limit} \
         AND (SELECT upto FROM chorus.pruned) > 0"
    );
    for srv in &s.servers {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        let kept: i64 = loop {
            let l = srv.local_client("postgres").await.unwrap();
            if let Some(r) = l.query_opt(&sql, &[]).await.unwrap() {
                break r.get(0);
            }
            assert!(std::time::Instant::now() < deadline, "never pruned to {limit} bytes on port {}", srv.port());
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        // About 60 entries of about 1 KB fit: the newest ones, the newest of all among them.
        assert!((30..200).contains(&kept), "{kept} entries kept");
        let l = srv.local_client("postgres").await.unwrap();
        let (top, upto): (i64, i64) = {
            let r = l.query_one("SELECT max(serial), (SELECT upto FROM chorus.pruned) FROM chorus.history", &[]).await.unwrap();
            (r.get(0), r.get(1))
        };
        assert_eq!(top, newest, "the newest entry stays");
        let below: i64 = l.query_one("SELECT count(*) FROM chorus.history WHERE serial <= $1", &[&upto]).await.unwrap().get(0);
        assert_eq!(below, 0, "every entry up to the noted serial is gone");
    }
    let (ok, out) = s.chorus.verify();
    assert!(ok, "verify: {out}");
}

/// A session records its units with the record's statement prepared once per connection;
/// whatever the client drops (DEALLOCATE ALL, DISCARD ALL, the statement by its name, in
/// either protocol) is prepared again before the next record: every unit is recorded, on
/// every backend alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_records_statement_survives_what_a_client_drops() {
    let s = Setup::new(2).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE r (v int)").await.unwrap();
    let before = rows(&s.servers[0], "chorus.history").await;
    let drops = ["SELECT 1", "DEALLOCATE ALL", "DISCARD ALL", "DEALLOCATE chorus_history_record", "DISCARD ALL"];
    for (i, drop) in drops.iter().enumerate() {
        let i = i as i32;
        c.execute("INSERT INTO r VALUES ($1)", &[&i]).await.unwrap();
        c.batch_execute(&format!("BEGIN; INSERT INTO r VALUES ({i}); COMMIT")).await.unwrap();
        // The statement by name exists where a record prepared it (the first DEALLOCATE ALL
        // dropped it, the next record prepared it again).
        if i == 4 {
            // In the extended protocol this time.
            let e = c.execute("DEALLOCATE chorus_history_record", &[]).await;
            assert!(e.is_ok(), "{e:?}");
        } else {
            c.simple_query(drop).await.unwrap();
        }
    }
    c.batch_execute("INSERT INTO r VALUES (100); BEGIN; INSERT INTO r VALUES (101); COMMIT").await.unwrap();
    assert_eq!(rows(&s.servers[0], "r").await, 12);
    for srv in &s.servers {
        let n = rows(srv, "chorus.history").await;
        // (The last Query is one unit: its BEGIN takes the INSERT before it into its block.)
        assert_eq!(n - before, 11, "every unit recorded on port {}", srv.port());
    }
    s.assert_identical().await;
    let (ok, out) = s.chorus.verify();
    assert!(ok, "{out}");
}

/// Chorus's own schema is closed to clients, superusers included (the test's app user is one):
/// reading the key or the history, changing them, calling the record function, dropping the
/// schema, reaching it through search_path or a DO block: each refused with 42501 in the simple
/// and the extended protocol, before any backend runs it. Nothing changed on any backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chorus_schema_is_closed_to_clients_superusers_included() {
    let s = Setup::with(2, ChorusOptions::default()).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE t (a int); INSERT INTO t VALUES (1)").await.unwrap();
    let count = "SELECT (SELECT count(*) FROM chorus.history) * 1000 + (SELECT count(*) FROM chorus.key) \
                 + pg_sequence_last_value('chorus.epoch') * 1000000";
    let before = [local_i64(&s.servers[0], count).await, local_i64(&s.servers[1], count).await];
    assert!(before[0] > 1000, "the history holds the units so far: {before:?}");
    let statements = [
        "SELECT * FROM chorus.key",
        "SELECT * FROM chorus.history",
        "DELETE FROM chorus.history",
        "UPDATE chorus.key SET key = 'guessed'",
        "SELECT chorus.record(999999, '\\x00'::bytea, 'guess')",
        "SELECT chorus.record(999999, '\\x00'::bytea, 'guess', 0)",
        "SELECT setval('chorus.epoch', 999999)",
        "SELECT nextval('chorus.epoch')",
        "SELECT table_to_xml('chorus.key', true, true, '')",
        "LOCK TABLE chorus.fence",
        "DROP SCHEMA chorus CASCADE",
        "SET search_path = chorus, public",
        "DO $$ BEGIN DELETE FROM chorus.history; END $$",
        "BEGIN; DELETE FROM \"chorus\".history; COMMIT",
    ];
    for sql in statements {
        let simple = c.batch_execute(sql).await.expect_err(sql);
        assert_eq!(simple.code().map(|c| c.code()), Some("42501"), "simple: {sql}: {simple}");
        let _ = c.batch_execute("ROLLBACK").await;
        if !sql.contains(';') {
            let extended = c.query(sql, &[]).await.expect_err(sql);
            assert_eq!(extended.code().map(|c| c.code()), Some("42501"), "extended: {sql}: {extended}");
        }
    }
    // The session goes on, and so do writes.
    c.execute("INSERT INTO t VALUES (2)", &[]).await.unwrap();
    let after = [local_i64(&s.servers[0], count).await, local_i64(&s.servers[1], count).await];
    assert_eq!(after, [before[0] + 1000, before[1] + 1000], "one more unit, nothing else changed");
    for name in ["pg1", "pg2"] {
        assert_eq!(s.chorus.states().get(name).map(String::as_str), Some("in_sync"));
    }
    s.assert_identical().await;
    let (ok, out) = s.chorus.verify();
    assert!(ok, "{out}");
}
