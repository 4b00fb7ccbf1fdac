//! Catch-up from the update history: a backend that left as `down` comes back without a copy,
//! while clients keep writing; one whose gap was pruned, or that diverged, is refused.
//!
//! Each test says what the clients saw (pgbench's failed transactions, SQLSTATEs) and what
//! the backends hold (pgbench's tables compared row by row, `chorus verify`, the histories'
//! serials).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Waits until Chorus reports `name` in `state`, for at most `secs`; returns how long it took.
async fn await_state(s: &Setup, name: &str, state: &str, secs: u64) -> Duration {
    let t = Instant::now();
    s.chorus
        .wait_state(name, state, Duration::from_secs(secs))
        .await
        .unwrap_or_else(|e| panic!("{name} never {state}: {e}\n{:?}\n{}", s.chorus.states(), s.chorus.log()));
    t.elapsed()
}

/// pgbench tpcb-like through Chorus at `rate` TPS for `secs` seconds, 8 clients.
fn pgbench_load(s: &Setup, rate: u32, secs: u32) -> Child {
    Command::new("pgbench")
        .args(["-n", "-c", "8", "-j", "2", "-R", &rate.to_string(), "-T", &secs.to_string(), "--verbose-errors"])
        .arg(s.chorus.conn_str(APP_USER, "postgres"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench")
}

/// pgbench's own report: it ran to the end and no transaction failed.
fn assert_no_client_error(load: Child) {
    let out = load.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pgbench failed:\n{text}");
    assert!(!text.contains("error"), "a client saw an error:\n{text}");
    let processed = text.lines().find(|l| l.starts_with("number of transactions actually processed")).unwrap_or_default();
    let failed =
        text.lines().find(|l| l.starts_with("number of failed transactions")).unwrap_or("number of failed transactions: 0");
    assert!(failed.contains(": 0"), "{failed}\n{text}");
    eprintln!("pgbench: {processed}; {failed}");
}

/// The pgbench tables row by row, `chorus verify`, and the histories' serials: equal everywhere.
async fn assert_all_equal(s: &Setup) {
    s.assert_identical().await;
    let (ok, out) = s.chorus.verify();
    assert!(ok, "verify: {out}");
}

async fn init_pgbench(s: &Setup) {
    let (ok, out) = sh(Command::new("pgbench").args(["-i", "-q", "-s", "4"]).arg(s.chorus.conn_str(APP_USER, "postgres")));
    assert!(ok, "{out}");
}

/// The caught-up line's units and write pause.
fn caught_up_line(log: &str) -> String {
    log.lines().rfind(|l| l.contains("caught up from the update history")).unwrap_or_default().to_string()
}

/// The case: one of three backends killed (SIGKILL) under pgbench at 300 TPS and
/// started again 60 s later. It comes back `in_sync` from the history, no dump; the clients
/// see no error; every backend holds the same rows and the same history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_is_caught_up_under_load() {
    let mut s = Setup::new(3).await;
    init_pgbench(&s).await;
    // Long enough that the catch-up, attach included, ends while it still runs.
    let mut load = pgbench_load(&s, 300, 240);
    // Until the load is under way: transactions in pgbench_history.
    let _: i64 = await_row(&s.servers[0], "SELECT count(*) FROM pgbench_history HAVING count(*) > 100", &[], "no load").await;
    s.servers[2].kill();
    await_state(&s, "pg3", "down", 30).await;
    // Down for a minute of writes: the scenario, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(60)).await;
    s.servers[2].restart().await.unwrap();
    // The speed is bench/catch_up.sh's (release build); a debug build beside the rest of the
    // suite on two cores applies some 400 units a second while 300 arrive.
    let back = await_state(&s, "pg3", "in_sync", 165).await;
    assert!(load.try_wait().unwrap().is_none(), "the clients were still writing when pg3 attached");
    let log = s.chorus.log();
    let line = caught_up_line(&log);
    let rounds = log.lines().filter(|l| l.contains("catch-up round")).count();
    eprintln!("pg3 back in sync {:.1} s after its restart, {rounds} rounds: {line}", back.as_secs_f64());
    assert!(line.contains("pg3"), "{}", s.chorus.log());
    assert!(!s.chorus.log().contains("join phase"), "no join ran");
    assert_no_client_error(load);
    assert_all_equal(&s).await;
}

/// A backend stopped (SIGSTOP) past `backend_timeout` leaves as `down`; resumed, it is caught
/// up the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_backend_is_caught_up_when_it_resumes() {
    let s = Setup::with(3, ChorusOptions { extra: "backend_timeout = \"2s\"".into(), ..Default::default() }).await;
    init_pgbench(&s).await;
    let load = pgbench_load(&s, 300, 45);
    let _: i64 = await_row(&s.servers[0], "SELECT count(*) FROM pgbench_history HAVING count(*) > 100", &[], "no load").await;
    s.servers[1].pause();
    await_state(&s, "pg2", "down", 30).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    s.servers[1].resume();
    if s.chorus.wait_state("pg2", "in_sync", Duration::from_secs(60)).await.is_err() {
        let mut load = load;
        let _ = load.kill();
        let out = load.wait_with_output().unwrap();
        panic!(
            "pg2 not back: {:?}\npgbench: {}{}\n{}",
            s.chorus.states(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            s.chorus.log()
        );
    }
    eprintln!("pg2 back in sync: {}", caught_up_line(&s.chorus.log()));
    assert_no_client_error(load);
    assert_all_equal(&s).await;
}

/// Every shape of unit replays to identical data on a backend that was away: DDL, sequences,
/// now() and uuids, COPY, prepared statements, autocommit and explicit transactions. The
/// backend is stopped while idle and leaves at the next write (no unit half run there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shape_replays_to_identical_data() {
    let s =
        Setup::with(2, ChorusOptions { extra: "backend_timeout = \"2s\"\nauto_catch_up = false".into(), ..Default::default() })
            .await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE flag (id int PRIMARY KEY, v int); INSERT INTO flag VALUES (1, 0)").await.unwrap();
    s.servers[1].pause();
    c.batch_execute("UPDATE flag SET v = 1").await.unwrap();
    await_state(&s, "pg2", "down", 30).await;
    // While it is away: every shape.
    c.batch_execute(
        "BEGIN; CREATE TABLE items (id serial PRIMARY KEY, tag uuid DEFAULT gen_random_uuid(), at timestamptz DEFAULT now(), name text); \
         CREATE SEQUENCE tickets; COMMIT",
    )
    .await
    .unwrap();
    c.batch_execute("INSERT INTO items (name) VALUES ('autocommit')").await.unwrap();
    let st = c.prepare("INSERT INTO items (name) VALUES ($1) RETURNING id").await.unwrap();
    for i in 0..20 {
        let _ = c.query_one(&st, &[&format!("prepared {i}")]).await.unwrap();
    }
    let values: Vec<String> = (1..=50).map(|g| format!("('tx {g}')")).collect();
    c.batch_execute(&format!("BEGIN; SELECT nextval('tickets'); INSERT INTO items (name) VALUES {}; COMMIT", values.join(", ")))
        .await
        .unwrap();
    {
        use futures::SinkExt;
        let sink = c.copy_in("COPY items (name) FROM STDIN").await.unwrap();
        futures::pin_mut!(sink);
        let rows: String = (0..500).map(|i| format!("copied {i}\n")).collect();
        sink.send(bytes::Bytes::from(rows)).await.unwrap();
        sink.finish().await.unwrap();
    }
    c.batch_execute(
        "ALTER TABLE items ADD COLUMN note text DEFAULT 'x'; UPDATE items SET note = md5(tag::text) WHERE id % 3 = 0",
    )
    .await
    .unwrap();
    c.batch_execute("SELECT setval('tickets', 100); SELECT nextval('tickets')").await.unwrap();
    s.servers[1].resume();
    // Not on its own (auto_catch_up = false): on request.
    let (ok, out) = s.chorus.chorusctl(&["catch-up", "pg2"]);
    assert!(ok, "{out}\n{}", s.chorus.log());
    assert!(out.contains("caught up from the update history"), "{out}");
    assert_eq!(s.chorus.states()["pg2"], "in_sync");
    let (_, backends) = s.chorus.chorusctl(&["backends"]);
    assert!(backends.contains("SERIAL") && backends.contains("LAG UNITS"), "{backends}");
    let n: i64 = c.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0);
    assert_eq!(n, 571);
    assert_all_equal(&s).await;
    // Sequences too: the next id is the same on both.
    for srv in &s.servers {
        let l = srv.local_client("postgres").await.unwrap();
        let (a, b): (i64, i64) = {
            let r = l.query_one("SELECT last_value, (SELECT last_value FROM tickets) FROM items_id_seq", &[]).await.unwrap();
            (r.get(0), r.get(1))
        };
        assert_eq!((a, b), (571, 101), "port {}", srv.port());
    }
}

/// Units that wrote the same rows are applied in their serial order, others side by side.
/// While the backend is away: a slow unit (a bulk insert, then a row written after a 2.5 s
/// sleep, longer than backend_timeout), then a fast one that overwrites the row (applied side
/// by side, the fast one would land first and be overwritten); and four sessions overwriting
/// five rows (the last writer decides each value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_units_are_applied_in_their_order() {
    let s =
        Setup::with(2, ChorusOptions { extra: "backend_timeout = \"2s\"\nauto_catch_up = false".into(), ..Default::default() })
            .await;
    let c = s.client().await;
    c.batch_execute(
        "CREATE TABLE cells (id int PRIMARY KEY, v int, by int); INSERT INTO cells SELECT g, 0, 0 FROM generate_series(1, 5) g; \
         CREATE TABLE notes (session int, n int, PRIMARY KEY (session, n)); \
         CREATE TABLE pair (id int PRIMARY KEY, v int); INSERT INTO pair VALUES (1, 0); CREATE TABLE bulk (g int)",
    )
    .await
    .unwrap();
    s.servers[1].pause();
    c.batch_execute("UPDATE cells SET v = -1").await.unwrap();
    await_state(&s, "pg2", "down", 30).await;
    // Statement by statement: a transaction in one Query is applied with nothing beside it.
    // It runs longer than backend_timeout (2 s), and applying it takes as long: a long unit
    // is no sign of a dead backend.
    let slow = "UPDATE pair SET v = 1 WHERE pg_sleep(2.5) IS NOT NULL";
    for sql in ["BEGIN", "INSERT INTO bulk SELECT g FROM generate_series(1, 400000) g", slow, "COMMIT"] {
        c.batch_execute(sql).await.unwrap();
    }
    c.batch_execute("UPDATE pair SET v = 2 WHERE id = 1").await.unwrap();
    let mut writers = Vec::new();
    for session in 1..=4 {
        let mut c = s.client().await;
        writers.push(tokio::spawn(async move {
            for n in 0..150 {
                let row = (n * 7 + session) % 5 + 1;
                let update = "UPDATE cells SET v = $1, by = $2 WHERE id = $3";
                if n % 3 == 0 {
                    c.execute(update, &[&(n * 10 + session), &session, &row]).await.unwrap();
                } else {
                    let t = c.transaction().await.unwrap();
                    t.execute("INSERT INTO notes VALUES ($1, $2)", &[&session, &n]).await.unwrap();
                    t.execute(update, &[&(n * 10 + session), &session, &row]).await.unwrap();
                    t.commit().await.unwrap();
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    s.servers[1].resume();
    let (ok, out) = s.chorus.chorusctl(&["catch-up", "pg2"]);
    assert!(ok, "{out}\n{}", s.chorus.log());
    assert!(out.contains("caught up from the update history"), "{out}");
    let notes: i64 = c.query_one("SELECT count(*) FROM notes", &[]).await.unwrap().get(0);
    assert_eq!(notes, 400);
    assert_all_equal(&s).await;
    let mut cells = Vec::new();
    for srv in &s.servers {
        let l = srv.local_client("postgres").await.unwrap();
        let rows = l.query("SELECT id, v, by FROM cells ORDER BY id", &[]).await.unwrap();
        cells.push(rows.iter().map(|r| (r.get::<_, i32>(0), r.get::<_, i32>(1), r.get::<_, i32>(2))).collect::<Vec<_>>());
    }
    assert_eq!(cells[0], cells[1], "the rows' last writers differ");
    for srv in &s.servers {
        let l = srv.local_client("postgres").await.unwrap();
        let v: i32 = l.query_one("SELECT v FROM pair", &[]).await.unwrap().get(0);
        assert_eq!(v, 2, "port {}: the slow unit was applied after the fast one", srv.port());
    }
    assert!(cells[0].iter().all(|(_, v, by)| *v >= 0 && v % 10 == *by), "{:?}", cells[0]);
}

/// A backend that hangs (SIGSTOP) while a long unit is being applied to it fails the catch-up
/// within a health probe, instead of holding it (and every later catch-up and join) forever;
/// resumed, it is caught up on request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_hangs_while_units_are_applied_fails_the_catch_up() {
    let extra = "backend_timeout = \"2s\"\nhealth_check_timeout = \"2s\"\nauto_catch_up = false";
    let s = Setup::with(2, ChorusOptions { extra: extra.into(), ..Default::default() }).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE slow (id int PRIMARY KEY, v int); INSERT INTO slow VALUES (1, 0)").await.unwrap();
    s.servers[1].pause();
    c.batch_execute("UPDATE slow SET v = -1").await.unwrap();
    await_state(&s, "pg2", "down", 30).await;
    c.batch_execute("UPDATE slow SET v = 1 WHERE pg_sleep(6) IS NOT NULL").await.unwrap();
    s.servers[1].resume();
    let ctl = {
        let mut cmd = s.chorus.chorusctl_command(&["catch-up", "pg2"]);
        tokio::task::spawn_blocking(move || sh(&mut cmd))
    };
    // The long unit is running on pg2: then pg2 hangs.
    let q = "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%pg_sleep(6)%' AND state = 'active' AND pid <> pg_backend_pid()";
    await_row::<i32>(&s.servers[1], q, &[], "the long unit applied on pg2").await;
    s.servers[1].pause();
    let (ok, out) =
        tokio::time::timeout(Duration::from_secs(60), ctl).await.expect("the catch-up hangs with its backend").unwrap();
    assert!(!ok && out.contains("pg2 stopped answering while units were applied"), "{out}");
    assert_eq!(s.chorus.states()["pg2"], "down");
    s.servers[1].resume();
    // The writes go on meanwhile; pg2 comes back on request.
    c.batch_execute("UPDATE slow SET v = 2").await.unwrap();
    let (ok, out) = s.chorus.chorusctl(&["catch-up", "pg2"]);
    assert!(ok, "{out}\n{}", s.chorus.log());
    assert_all_equal(&s).await;
}

/// A backend whose missing units were pruned is refused with one line saying it needs a join;
/// a `diverged` backend is never caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_past_the_retention_or_a_diverged_backend_needs_a_join() {
    let mut s = Setup::with(
        3,
        ChorusOptions { extra: "history_retention = \"1s\"\nbackend_timeout = \"5s\"".into(), ..Default::default() },
    )
    .await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 0), (2, 0)").await.unwrap();
    s.servers[2].kill();
    await_state(&s, "pg3", "down", 30).await;
    // Writes until pg1's history has pruned units pg3 lacks: pg3's newest serial is below
    // the newest pruned one.
    let newest: i64 = {
        let l = s.servers[0].local_client("postgres").await.unwrap();
        l.query_one("SELECT max(serial) FROM chorus.history", &[]).await.unwrap().get(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.batch_execute("UPDATE t SET v = v + 1 WHERE id = 1").await.unwrap();
        let l = s.servers[0].local_client("postgres").await.unwrap();
        let pruned: i64 = l.query_one("SELECT coalesce((SELECT upto FROM chorus.pruned), 0)", &[]).await.unwrap().get(0);
        if pruned > newest {
            break;
        }
        assert!(Instant::now() < deadline, "nothing was pruned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The history's size on each in-sync backend, read at each pruning pass.
    let metrics = raw_http(&s, &get("/metrics", Some(chorus_testkit::ADMIN_TOKEN))).await;
    for b in ["pg1", "pg2"] {
        let line = format!("chorus_history_size_bytes{{backend=\"{b}\",database=\"postgres\"}} ");
        let size: f64 =
            metrics.lines().find_map(|l| l.strip_prefix(&line)).unwrap_or_else(|| panic!("{metrics}")).parse().unwrap();
        assert!(size >= 8192.0, "{b}: {size}");
    }
    s.servers[2].restart().await.unwrap();
    // The automatic attempt, once it answers: refused in one line, and it stays down.
    let refused =
        |log: &str| log.lines().filter(|l| l.contains("catch-up did not complete") && l.contains("needs a join")).count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while refused(&s.chorus.log()) == 0 {
        assert!(Instant::now() < deadline, "{}", s.chorus.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.chorus.states()["pg3"], "down");
    assert!(s.chorus.log().contains("pruned from the history"), "{}", s.chorus.log());
    // Asked by hand: refused with the reason, and it stays down.
    let (ok, out) = s.chorus.chorusctl(&["catch-up", "pg3"]);
    assert!(!ok, "{out}");
    assert!(out.contains("pg3 needs a join") && out.contains("pruned"), "{out}");
    assert_eq!(s.chorus.states()["pg3"], "down");
    assert_eq!(refused(&s.chorus.log()), 2, "one line per attempt: the automatic one is not repeated");
    // A diverged backend: pg2's row changed behind Chorus's back, caught by a write's rows.
    s.servers[1].local_client("postgres").await.unwrap().batch_execute("UPDATE t SET v = 99 WHERE id = 2").await.unwrap();
    let _ = c.query("UPDATE t SET v = v + 1 WHERE id = 2 RETURNING v", &[]).await.unwrap();
    await_state(&s, "pg2", "diverged", 30).await;
    let (ok, out) = s.chorus.chorusctl(&["catch-up", "pg2"]);
    assert!(!ok && out.contains("pg2 is diverged") && out.contains("needs a join"), "{out}");
    assert_eq!(s.chorus.states()["pg2"], "diverged");
    assert_eq!(s.chorus.states()["pg1"], "in_sync");
    let (ok, out) = s.chorus.verify();
    assert!(ok, "{out}");
}
