//! Replication safety under concurrency: 16 sessions for 10 s per scenario, with 2 and with 3
//! backends, each ending with `chorus verify` reporting every table equal.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

const SESSIONS: usize = 16;

/// Each scenario runs once with 2 and once with 3 backends.
macro_rules! with_two_and_three_backends {
    ($scenario:ident, $two:ident, $three:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $two() {
            $scenario(2).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $three() {
            $scenario(3).await;
        }
    };
}
const RUN: Duration = Duration::from_secs(10);

/// Runs `SESSIONS` workers until `RUN` has passed; each returns how many transactions it did.
async fn workers<F, Fut>(s: &Setup, n: usize, f: F) -> Vec<u64>
where
    F: Fn(Client, usize, Instant) -> Fut,
    Fut: std::future::Future<Output = u64> + Send + 'static,
{
    let until = Instant::now() + RUN;
    let mut handles = Vec::new();
    for k in 0..n {
        let c = s.client().await;
        handles.push(tokio::spawn(f(c, k, until)));
    }
    let mut out = Vec::new();
    for h in handles {
        out.push(tokio::time::timeout(RUN + Duration::from_secs(60), h).await.expect("a worker hung").expect("worker panicked"));
    }
    out
}

fn is(e: &tokio_postgres::Error, code: &SqlState) -> bool {
    e.code() == Some(code)
}

/// Whether a transaction committed. A deadlock in Chorus (40P01) is counted and rolled back;
/// any other error fails the test.
async fn committed(c: &Client, r: Result<(), tokio_postgres::Error>, deadlocks: &AtomicU64) -> bool {
    match r {
        Ok(()) => true,
        Err(e) if is(&e, &SqlState::T_R_DEADLOCK_DETECTED) => {
            deadlocks.fetch_add(1, Ordering::Relaxed);
            c.batch_execute("ROLLBACK").await.unwrap();
            false
        }
        Err(e) => panic!("unexpected error: {e:?}"),
    }
}

async fn verified(s: &Setup) {
    let (ok, out) = s.chorus.verify();
    assert!(ok, "verify failed:\n{out}");
    assert!(out.contains("equal") && !out.contains("UNEQUAL"), "{out}");
    let states = s.chorus.states();
    assert!(states.values().all(|v| v == "in_sync"), "a backend left: {states:?}\n{}", s.chorus.log());
    s.assert_identical().await;
}

async fn hot_rows(n: usize) {
    let s = Setup::new(n).await;
    let c = s.client().await;
    c.batch_execute(
        "CREATE TABLE hot (id int PRIMARY KEY, v bigint NOT NULL); INSERT INTO hot SELECT g, 1 FROM generate_series(1, 10) g",
    )
    .await
    .unwrap();
    let done = workers(&s, SESSIONS, |c, k, until| async move {
        let mut n = 0;
        let mut x = k as i32;
        while Instant::now() < until {
            x = x.wrapping_mul(1103515245).wrapping_add(12345);
            let id = (x.rem_euclid(10)) + 1;
            let expr = if k % 2 == 0 { "(v * 3 + 1) % 1000003" } else { "(v + 7) % 1000003" };
            if k % 4 < 2 {
                c.execute(&format!("UPDATE hot SET v = {expr} WHERE id = $1"), &[&id]).await.unwrap();
            } else {
                // Inside a transaction, two rows in ascending order.
                let id2 = id % 10 + 1;
                let (a, b) = (id.min(id2), id.max(id2));
                c.batch_execute(&format!(
                    "BEGIN; UPDATE hot SET v = {expr} WHERE id = {a}; UPDATE hot SET v = {expr} WHERE id = {b}; COMMIT"
                ))
                .await
                .unwrap();
            }
            n += 1;
        }
        n
    })
    .await;
    assert!(done.iter().all(|&d| d > 0), "every session made progress: {done:?}");
    verified(&s).await;
}

with_two_and_three_backends!(hot_rows, hot_rows_two_backends, hot_rows_three_backends);

async fn bank(n: usize) {
    let s = Setup::new(n).await;
    let c = s.client().await;
    c.batch_execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL); \
         INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 20) g",
    )
    .await
    .unwrap();
    let deadlocks = Arc::new(AtomicU64::new(0));
    let dl = deadlocks.clone();
    workers(&s, SESSIONS, move |c, k, until| {
        let dl = dl.clone();
        async move {
            let mut n = 0;
            let mut x = k as u32 + 1;
            while Instant::now() < until {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let from = (x % 20) as i32 + 1;
                let to = ((x / 20) % 19) as i32 + 1;
                let to = if to >= from { to + 1 } else { to };
                let amount = (x % 300) as i64 + 1;
                let r: Result<(), tokio_postgres::Error> = async {
                    c.batch_execute("BEGIN").await?;
                    let moved = c
                        .execute("UPDATE accounts SET balance = balance - $1 WHERE id = $2 AND balance >= $1", &[&amount, &from])
                        .await?;
                    if moved == 1 {
                        c.execute("UPDATE accounts SET balance = balance + $1 WHERE id = $2", &[&amount, &to]).await?;
                        c.batch_execute("COMMIT").await
                    } else {
                        c.batch_execute("ROLLBACK").await
                    }
                }
                .await;
                if committed(&c, r, &dl).await {
                    n += 1;
                }
                // The total is fixed and nothing is negative, seen through Chorus.
                if n % 50 == 0 {
                    let row = c.query_one("SELECT sum(balance)::bigint, min(balance) FROM accounts", &[]).await.unwrap();
                    assert_eq!(row.get::<_, i64>(0), 20_000);
                    assert!(row.get::<_, i64>(1) >= 0);
                }
            }
            n
        }
    })
    .await;
    for srv in &s.servers {
        let c = srv.local_client("postgres").await.unwrap();
        let row = c.query_one("SELECT sum(balance)::bigint, min(balance) FROM accounts", &[]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), 20_000, "total on a backend");
        assert!(row.get::<_, i64>(1) >= 0);
    }
    println!("bank: {} deadlocks resolved with 40P01", deadlocks.load(Ordering::Relaxed));
    verified(&s).await;
}

with_two_and_three_backends!(bank, bank_two_backends, bank_three_backends);

async fn ids_and_clocks(n: usize) {
    let s = Setup::new(n).await;
    let c = s.client().await;
    c.batch_execute(
        "CREATE TABLE ids (id serial PRIMARY KEY, ident bigint GENERATED ALWAYS AS IDENTITY, \
         at timestamptz NOT NULL DEFAULT now(), u uuid NOT NULL DEFAULT gen_random_uuid(), note text)",
    )
    .await
    .unwrap();
    workers(&s, SESSIONS, |c, k, until| async move {
        let mut n = 0;
        let stmt = c.prepare("INSERT INTO ids (note) VALUES ($1)").await.unwrap();
        while Instant::now() < until {
            match k % 4 {
                0 => c.batch_execute(&format!("INSERT INTO ids (note) VALUES ('simple {k}')")).await.unwrap(),
                1 => {
                    c.execute(&stmt, &[&format!("prepared {k}")]).await.unwrap();
                }
                2 => c
                    .batch_execute(&format!("BEGIN; INSERT INTO ids (note, at) VALUES ('tx {k}', now()); INSERT INTO ids (note) VALUES ('tx {k}'); COMMIT"))
                    .await
                    .unwrap(),
                _ => {
                    // COPY leaves the volatile defaults out: Chorus adds them to every row.
                    let (sql, data) = if k % 8 == 3 {
                        ("COPY ids (note) FROM STDIN", format!("copy {k} a\ncopy {k} b\n"))
                    } else {
                        ("COPY ids (note) FROM STDIN WITH (FORMAT csv, HEADER true)", format!("note\r\n\"copy {k}\nc\"\r\ncopy {k} d"))
                    };
                    let sink = c.copy_in(sql).await.unwrap();
                    futures::pin_mut!(sink);
                    use futures::SinkExt;
                    sink.send(bytes::Bytes::from(data)).await.unwrap();
                    sink.finish().await.unwrap();
                }
            }
            n += 1;
        }
        n
    })
    .await;
    let row = c
        .query_one("SELECT count(*), count(DISTINCT u), count(*) FILTER (WHERE note LIKE 'copy %') FROM ids", &[])
        .await
        .unwrap();
    let (rows, uuids, copied): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert!(rows > 0 && copied > 0, "{rows} rows, {copied} by COPY");
    assert_eq!(uuids, rows, "every row has its own uuid");
    // Transaction timestamps: both rows of one transaction carry the same `at`.
    let distinct: i64 = c
        .query_one(
            "SELECT count(*) FROM (SELECT note FROM ids WHERE note LIKE 'tx %' GROUP BY note, at HAVING count(*) % 2 = 1) x",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct, 0, "now() differs within a transaction");
    verified(&s).await;
}

with_two_and_three_backends!(ids_and_clocks, ids_and_clocks_two_backends, ids_and_clocks_three_backends);

async fn opposite_order(n: usize) {
    let s = Setup::new(n).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE ab (id int PRIMARY KEY, v int NOT NULL); INSERT INTO ab VALUES (1, 0), (2, 0)").await.unwrap();
    let deadlocks = Arc::new(AtomicU64::new(0));
    let dl = deadlocks.clone();
    let done = workers(&s, SESSIONS, move |c, k, until| {
        let dl = dl.clone();
        async move {
            let (first, second) = if k % 2 == 0 { (1, 2) } else { (2, 1) };
            let mut n = 0;
            while Instant::now() < until {
                let r: Result<(), tokio_postgres::Error> = async {
                    c.batch_execute("BEGIN").await?;
                    c.execute("UPDATE ab SET v = v + 1 WHERE id = $1", &[&first]).await?;
                    c.execute("UPDATE ab SET v = v * 2 % 1009 WHERE id = $1", &[&second]).await?;
                    c.batch_execute("COMMIT").await
                }
                .await;
                if committed(&c, r, &dl).await {
                    n += 1;
                }
            }
            n
        }
    })
    .await;
    let deadlocks = deadlocks.load(Ordering::Relaxed);
    println!("opposite order: {} commits, {deadlocks} deadlocks", done.iter().sum::<u64>());
    assert!(deadlocks > 0, "opposite-order transactions never deadlocked");
    assert!(done.iter().sum::<u64>() > 0);
    verified(&s).await;
}

with_two_and_three_backends!(opposite_order, opposite_order_two_backends, opposite_order_three_backends);

async fn visibility_race(n: usize) {
    let s = Setup::new(n).await;
    let c = s.client().await;
    c.batch_execute(
        "CREATE TABLE t (i int NOT NULL); INSERT INTO t SELECT g FROM generate_series(1, 20) g; CREATE TABLE log (i int)",
    )
    .await
    .unwrap();
    workers(&s, SESSIONS, |c, k, until| async move {
        let mut n = 0;
        while Instant::now() < until {
            if k % 2 == 0 {
                c.batch_execute("UPDATE t SET i = i + 1").await.unwrap();
            } else {
                c.batch_execute("INSERT INTO log SELECT * FROM t").await.unwrap();
            }
            n += 1;
        }
        n
    })
    .await;
    verified(&s).await;
}

with_two_and_three_backends!(visibility_race, visibility_race_two_backends, visibility_race_three_backends);

async fn pgbench_with_history(n: usize) {
    let s = Setup::new(n).await;
    let bin = chorus_testkit::default_bin_dir().unwrap();
    let conn = s.chorus.conn_str(APP_USER, "postgres");
    let (ok, out) = sh(std::process::Command::new(bin.join("pgbench")).args(["-i", "-s", "2", "-q", &conn]));
    assert!(ok, "{out}");
    for mode in ["simple", "prepared"] {
        let (ok, out) =
            sh(std::process::Command::new(bin.join("pgbench")).args(["-c", "16", "-j", "2", "-T", "10", "-M", mode, &conn]));
        assert!(ok, "{out}");
        assert!(out.contains("number of failed transactions: 0"), "{out}");
    }
    // pgbench_history.mtime comes from CURRENT_TIMESTAMP: compared like every other column.
    verified(&s).await;
}

with_two_and_three_backends!(pgbench_with_history, pgbench_history_two_backends, pgbench_history_three_backends);

/// Every refused construct gets 0A000 naming it and the setting; with "allow" it runs.
async fn refused_constructs(n: usize) {
    let setup = "CREATE TABLE r (id int PRIMARY KEY, v float8); INSERT INTO r SELECT g, 0 FROM generate_series(1, 5) g; \
                 CREATE TABLE s (id serial PRIMARY KEY, v float8); CREATE TABLE w (id int PRIMARY KEY, u uuid DEFAULT gen_random_uuid())";
    let refused = [
        ("ALTER TABLE r ADD COLUMN at timestamptz DEFAULT now()", "ADD COLUMN at DEFAULT now()"),
        ("ALTER TABLE r ADD COLUMN n bigserial", "serial type"),
        ("UPDATE r SET v = random()", "random()"),
        ("UPDATE r SET v = extract(epoch FROM clock_timestamp())", "clock_timestamp"),
        ("INSERT INTO w (id) SELECT id FROM r ORDER BY id", "volatile default"),
        ("DELETE FROM r WHERE id IN (SELECT id FROM r LIMIT 2)", "LIMIT"),
        ("INSERT INTO s (v) SELECT v FROM r", "total ORDER BY"),
        ("DELETE FROM r WHERE ctid = '(0,1)'", "ctid"),
        ("SELECT * FROM r FOR UPDATE SKIP LOCKED", "SKIP LOCKED"),
    ];
    let s = Setup::new(n).await;
    let c = s.client().await;
    c.batch_execute(setup).await.unwrap();
    for (sql, construct) in refused {
        let e = c.batch_execute(sql).await.expect_err(sql);
        assert_eq!(e.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{sql}: {e:?}");
        let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
        assert!(msg.contains(construct) && msg.contains("unsafe_statements"), "{sql}: {msg}");
        // Inside a transaction the refusal aborts it on every backend, like any error.
        c.batch_execute("BEGIN").await.unwrap();
        assert!(c.batch_execute(sql).await.is_err());
        let e = c.batch_execute("SELECT 1").await.expect_err("aborted transaction");
        assert_eq!(e.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
        c.batch_execute("ROLLBACK").await.unwrap();
        // The extended protocol is refused the same way.
        let e = c.execute(sql, &[]).await.expect_err(sql);
        assert_eq!(e.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{sql}: {e:?}");
    }
    // What the refusal of a column filled per backend says to do instead: the same on all.
    c.batch_execute(
        "ALTER TABLE r ADD COLUMN at timestamptz; ALTER TABLE r ALTER COLUMN at SET DEFAULT now(); UPDATE r SET at = now()",
    )
    .await
    .expect("the column added, then filled by Chorus's value");
    c.batch_execute("INSERT INTO r (id, v) VALUES (6, 0)").await.expect("a row with the new default");
    verified(&s).await;
    drop(c);
    drop(s);

    // With "allow" they run. What they do may differ per backend: that is the documented risk,
    // and verify is how an operator finds out.
    let s = Setup::with(n, ChorusOptions { extra: "unsafe_statements = \"allow\"".into(), ..ChorusOptions::default() }).await;
    let c = s.client().await;
    c.batch_execute(setup).await.unwrap();
    // The ones that change values per backend go last: a locking read of differing rows
    // would be caught by the returned-rows comparison and eject a backend instead.
    for (sql, _) in refused.iter().rev() {
        c.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql} with allow: {e:?}"));
    }
    let (ok, out) = s.chorus.verify();
    assert!(!ok && out.contains("UNEQUAL  postgres.public.r"), "random() per row diverged and verify says so:\n{out}");
    assert!(out.contains("equal    postgres.public.s"), "{out}");
}

with_two_and_three_backends!(refused_constructs, refused_constructs_two_backends, refused_constructs_three_backends);

/// verify hashes each column (by its type's hash, or by its text) and then the row: a change
/// behind Chorus's back is found whichever way its columns are hashed, including one (numeric
/// 1.0 against 1.00) that only the text shows, values swapped between rows, and a NULL.
#[tokio::test]
async fn verify_finds_changes_behind_chorus_back() {
    let s = Setup::new(2).await;
    let c = s.client().await;
    c.batch_execute(
        "CREATE TABLE e (id int PRIMARY KEY, t text, b bytea, at timestamptz, u uuid);
         CREATE TABLE m (id int PRIMARY KEY, v numeric);
         INSERT INTO e SELECT g, 'row ' || g, '\\x0102', '2026-01-01 00:00+00', md5(g::text)::uuid FROM generate_series(1, 500) g;
         INSERT INTO m SELECT g, 1.0 FROM generate_series(1, 500) g;",
    )
    .await
    .unwrap();
    verified(&s).await;
    let behind = s.servers[1].local_client("postgres").await.unwrap();
    let unequal = |change: &'static str, undo: &'static str, table: &'static str, other: &'static str| {
        let (s, behind) = (&s, &behind);
        async move {
            behind.batch_execute(change).await.unwrap();
            let (ok, out) = s.chorus.verify();
            assert!(!ok && out.contains(&format!("UNEQUAL  postgres.public.{table}")), "{change}:\n{out}");
            assert!(out.contains(&format!("equal    postgres.public.{other}")), "{change}:\n{out}");
            behind.batch_execute(undo).await.unwrap();
        }
    };
    unequal("UPDATE e SET t = 'row 7 ' WHERE id = 7", "UPDATE e SET t = 'row 7' WHERE id = 7", "e", "m").await;
    // Each column's values stay the same, only their rows change.
    let swap = "UPDATE e SET t = CASE id WHEN 3 THEN 'row 4' ELSE 'row 3' END WHERE id IN (3, 4)";
    let back = "UPDATE e SET t = 'row ' || id WHERE id IN (3, 4)";
    unequal(swap, back, "e", "m").await;
    unequal("UPDATE e SET b = NULL WHERE id = 5", "UPDATE e SET b = '\\x0102' WHERE id = 5", "e", "m").await;
    unequal("UPDATE m SET v = 1.00 WHERE id = 9", "UPDATE m SET v = 1.0 WHERE id = 9", "m", "e").await;
    verified(&s).await;
}

/// Writers on distinct rows run side by side: eight transactions hold their own row's write
/// lock at the same time (each, its row updated, waits until all eight have updated theirs;
/// were Chorus to queue them, the eight would never all get there). Writers on one row queue:
/// a second UPDATE of the row does not complete while the first transaction holds it.
async fn non_conflicting_writers(n: usize) {
    let s = Setup::new(n).await;
    let c = s.client().await;
    c.batch_execute(
        "CREATE TABLE rows (id int PRIMARY KEY, v bigint NOT NULL); INSERT INTO rows SELECT g, 0 FROM generate_series(1, 8) g",
    )
    .await
    .unwrap();
    let all_hold = Arc::new(tokio::sync::Barrier::new(8));
    let mut writers = Vec::new();
    for id in 1..=8i32 {
        let (c, all_hold) = (s.client().await, all_hold.clone());
        writers.push(tokio::spawn(async move {
            c.batch_execute("BEGIN").await.unwrap();
            c.execute("UPDATE rows SET v = v + 1 WHERE id = $1", &[&id]).await.unwrap();
            all_hold.wait().await;
            c.batch_execute("COMMIT").await.unwrap();
        }));
    }
    let together = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(writers)).await;
    assert!(together.is_ok(), "eight writers of distinct rows never held their rows at the same time");
    let (first, second) = (s.client().await, s.client().await);
    first.batch_execute("BEGIN; UPDATE rows SET v = v + 1 WHERE id = 1").await.unwrap();
    let mut queued = tokio::spawn(async move { second.batch_execute("UPDATE rows SET v = v + 10 WHERE id = 1").await });
    // What must not happen while the first holds the row: a window, not a synchronisation.
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut queued).await.is_err(), "the second writer did not wait");
    first.batch_execute("COMMIT").await.unwrap();
    queued.await.unwrap().unwrap();
    let v: Vec<i64> = c.query("SELECT v FROM rows ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(v, vec![12, 1, 1, 1, 1, 1, 1, 1]);
    verified(&s).await;
}

with_two_and_three_backends!(
    non_conflicting_writers,
    non_conflicting_writers_run_concurrently_two_backends,
    non_conflicting_writers_run_concurrently_three_backends
);

/// A write whose returned rows differ between backends, with equal command tags, is caught
/// by the rows hash: the client sees the lead's rows, the other backend is `diverged`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returned_rows_are_compared() {
    let s = Setup::new(2).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL); INSERT INTO t VALUES (1, 1)").await.unwrap();
    // Behind Chorus's back, pg2's row changes; counts stay equal.
    s.servers[1].local_client("postgres").await.unwrap().batch_execute("UPDATE t SET v = 2").await.unwrap();
    let rows = c.query("UPDATE t SET v = v + 10 WHERE id = $1 RETURNING v", &[&1i32]).await.unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), 11, "the client sees the lead's rows");
    s.wait_state("pg2", "diverged").await;
    assert_eq!(s.chorus.states()["pg1"], "in_sync");
    // The session goes on with pg1 alone.
    let v: i32 = c.query_one("SELECT v FROM t", &[]).await.unwrap().get(0);
    assert_eq!(v, 11);
    // The update ran inside Chorus's transaction around it (the update history's), whose
    // COMMIT went to the backends still in sync only: pg2 left with its own row unchanged.
    let pg2: i32 = s.servers[1].local_client("postgres").await.unwrap().query_one("SELECT v FROM t", &[]).await.unwrap().get(0);
    assert_eq!(pg2, 2, "pg2 left the in-sync set before Chorus's COMMIT");
}

/// A REPEATABLE READ transaction's snapshot is never taken while a write transaction is half
/// committed: its first statement waits for writes in flight, then writers go on at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeatable_read_snapshots_wait_for_commits_in_flight() {
    let s = Setup::new(2).await;
    let a = s.client().await;
    a.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL); INSERT INTO t VALUES (1, 0), (2, 0)").await.unwrap();
    a.batch_execute("BEGIN; UPDATE t SET v = 1 WHERE id = 1").await.unwrap();
    let b = Arc::new(s.client().await);
    let b2 = b.clone();
    let mut snapshot = tokio::spawn(async move {
        b2.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await.unwrap();
        b2.query_one("SELECT v FROM t WHERE id = 1", &[]).await.unwrap().get::<_, i32>(0)
    });
    // Held back while a's write transaction is open (without the barrier it answers 0 at once).
    assert!(tokio::time::timeout(Duration::from_millis(500), &mut snapshot).await.is_err(), "the snapshot did not wait");
    a.batch_execute("COMMIT").await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), snapshot).await.expect("snapshot taken after the commit").unwrap();
    assert_eq!(seen, 1, "the snapshot includes the commit that was in flight");
    // Writers are not held for the rest of b's transaction.
    tokio::time::timeout(Duration::from_secs(10), a.batch_execute("UPDATE t SET v = 2 WHERE id = 2")).await.unwrap().unwrap();
    let v: i32 = b.query_one("SELECT v FROM t WHERE id = 2", &[]).await.unwrap().get(0);
    assert_eq!(v, 0, "b keeps its snapshot");
    b.batch_execute("COMMIT").await.unwrap();
    verified(&s).await;
}

/// A plain BEGIN is answered by Chorus and reaches the backends with the next statement:
/// one round trip fewer per transaction, and nothing a client can tell apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_begin_travels_with_the_next_statement() {
    let s = Setup::new(2).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let in_tx = || async {
        let mut n = Vec::new();
        for srv in &s.servers {
            let q = "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()";
            n.push(srv.local_client("postgres").await.unwrap().query_one(q, &[]).await.unwrap().get::<_, i64>(0));
        }
        n
    };
    let r = c.simple_query("BEGIN").await.unwrap();
    assert!(matches!(r.last(), Some(tokio_postgres::SimpleQueryMessage::CommandComplete(0))));
    assert_eq!(in_tx().await, vec![0, 0], "no backend has seen the BEGIN yet");
    c.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    // Chorus answers with the first backend's reply: the other may still be finishing the
    // INSERT (a probe of 400 rounds saw it so a few times, for 6-12 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = in_tx().await;
    while seen != vec![1, 1] && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        seen = in_tx().await;
    }
    assert_eq!(seen, vec![1, 1], "the BEGIN went with the INSERT");
    c.batch_execute("ROLLBACK").await.unwrap();
    // A BEGIN followed by nothing but the client leaving leaves no trace.
    let d = s.client().await;
    d.batch_execute("BEGIN").await.unwrap();
    drop(d);
    c.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    assert_eq!(c.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get::<_, i64>(0), 1);
    verified(&s).await;
}
