//! Reads inside READ COMMITTED transactions run on the lead alone (contract, routing): a
//! statement proven read-only changes nothing on the other backends and READ COMMITTED takes a
//! new snapshot per statement, so they stay in step. Shown here by a table locked on the other
//! backends (a read that reached them would wait there, and the COMMIT behind it with it), the
//! error handling that keeps every backend's transaction in the same state, the isolation
//! levels that keep everything on every backend, and a lead that dies during such a read.

mod common;

use std::time::Duration;

use common::{await_row, Setup};
use tokio_postgres::{Client, SimpleQueryMessage};

const LONG: Duration = Duration::from_secs(30);

async fn setup(n: usize) -> Setup {
    let s = Setup::new(n).await;
    s.client()
        .await
        .batch_execute(
            "CREATE TABLE probe (id int PRIMARY KEY, note text);
             INSERT INTO probe VALUES (1, 'one'), (2, 'two');
             CREATE TABLE k (id int PRIMARY KEY, v int NOT NULL);
             INSERT INTO k VALUES (1, 0);
             CREATE SEQUENCE s;
             CREATE TABLE calls (at int);
             CREATE FUNCTION bump() RETURNS int LANGUAGE sql AS 'INSERT INTO calls VALUES (1) RETURNING at';",
        )
        .await
        .unwrap();
    s
}

/// A transaction on `srv` alone that holds `probe` in ACCESS EXCLUSIVE mode: any statement
/// that reads `probe` there waits until it ends.
async fn lock_probe(s: &Setup, srv: usize) -> Client {
    let c = s.servers[srv].local_client("postgres").await.unwrap();
    c.batch_execute("BEGIN; LOCK TABLE probe IN ACCESS EXCLUSIVE MODE").await.unwrap();
    c
}

/// Statements on `srv` waiting for a lock on `probe` now.
async fn waiting_on_probe(s: &Setup, srv: usize) -> i64 {
    let c = s.servers[srv].local_client("postgres").await.unwrap();
    c.query_one("SELECT count(*) FROM pg_locks WHERE relation = 'probe'::regclass AND NOT granted", &[]).await.unwrap().get(0)
}

/// The first column of every row.
fn firsts(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or_default().to_string()),
            _ => None,
        })
        .collect()
}

async fn k_values(s: &Setup) -> Vec<i32> {
    let mut out = Vec::new();
    for srv in &s.servers {
        let c = srv.local_client("postgres").await.unwrap();
        out.push(c.query_one("SELECT v FROM k WHERE id = 1", &[]).await.unwrap().get(0));
    }
    out
}

fn assert_all_in_sync(s: &Setup) {
    let states = s.chorus.states();
    assert!(states.values().all(|st| st == "in_sync"), "no backend leaves: {states:?}");
}

async fn assert_verify_equal(s: &Setup) {
    let (ok, out) = s.chorus.verify();
    assert!(ok, "chorus verify: {out}");
    s.assert_identical().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_in_a_read_committed_transaction_reach_the_lead_alone() {
    let s = setup(2).await;
    let c = s.client().await;
    // Prepared before the lock (every backend parses a named statement, and parsing locks the
    // table): executing it is what the lead alone does.
    let count = c.prepare("SELECT count(*) FROM probe").await.unwrap();
    let note_of = c.prepare("SELECT note FROM probe WHERE id = $1").await.unwrap();
    let holder = lock_probe(&s, 1).await;
    // The second backend cannot read probe now: only the lead can have run these reads, and
    // the COMMIT behind them could not complete if they waited on the second backend.
    let tx = async {
        c.batch_execute("BEGIN; UPDATE k SET v = v + 1 WHERE id = 1").await.unwrap();
        let n: i64 = c.query_one(&count, &[]).await.unwrap().get(0);
        let simple = c.simple_query("SELECT note FROM probe WHERE id = 2; SHOW transaction_isolation").await.unwrap();
        let note: String = c.query_one(&note_of, &[&1i32]).await.unwrap().get(0);
        c.batch_execute("COMMIT").await.unwrap();
        (n, firsts(&simple), note)
    };
    let (n, simple, note) = tokio::time::timeout(LONG, tx).await.expect("the transaction completes while the lock is held");
    assert_eq!((n, simple, note.as_str()), (2, vec!["two".to_string(), "read committed".to_string()], "one"));
    assert_eq!(waiting_on_probe(&s, 1).await, 0, "no read of probe reached the second backend");
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(k_values(&s).await, vec![1, 1]);

    // Reads that write, lock or draw from a sequence, and every read of a REPEATABLE READ or
    // SERIALIZABLE transaction (by BEGIN, SET TRANSACTION, the session's default or the role's),
    // reach every backend: each waits on the second backend until the lock goes.
    c.batch_execute("ALTER ROLE CURRENT_USER SET default_transaction_isolation = 'repeatable read'").await.unwrap();
    let role_default = s.client().await;
    c.batch_execute("ALTER ROLE CURRENT_USER RESET default_transaction_isolation").await.unwrap();
    let session_default = s.client().await;
    session_default.batch_execute("SET default_transaction_isolation = 'serializable'").await.unwrap();
    let cases: [(&Client, &str, &str); 7] = [
        (&c, "BEGIN", "SELECT id, bump() FROM probe"),
        (&c, "BEGIN", "SELECT nextval('s'), count(*) FROM probe"),
        (&c, "BEGIN", "SELECT * FROM probe FOR UPDATE"),
        (&c, "BEGIN ISOLATION LEVEL REPEATABLE READ", "SELECT count(*) FROM probe"),
        (&c, "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "SELECT count(*) FROM probe"),
        (&session_default, "BEGIN", "SELECT count(*) FROM probe"),
        (&role_default, "BEGIN", "SELECT count(*) FROM probe"),
    ];
    for (client, begin, read) in cases {
        let holder = lock_probe(&s, 1).await;
        client.batch_execute(begin).await.unwrap();
        let run = async {
            let r = client.simple_query(read).await;
            client.batch_execute("COMMIT").await.unwrap();
            r
        };
        let release = async {
            await_row::<i64>(
                &s.servers[1],
                "SELECT count(*) FROM pg_locks WHERE relation = 'probe'::regclass AND NOT granted HAVING count(*) > 0",
                &[],
                "the read waited on the second backend",
            )
            .await;
            holder.batch_execute("COMMIT").await.unwrap();
        };
        let (r, ()) = tokio::time::timeout(LONG, async { tokio::join!(run, release) }).await.expect(read);
        r.unwrap_or_else(|e| panic!("{read}: {e}"));
    }
    assert_all_in_sync(&s);
    assert_verify_equal(&s).await;
}

/// One error in a read the lead ran alone, and what the client does next.
#[derive(Clone, Copy, Debug)]
enum Then {
    Commit,
    Rollback,
    RollbackToSavepoint,
    Another,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_in_a_lead_read_leaves_every_backend_in_the_same_state() {
    let s = setup(3).await;
    let c = s.client().await;
    // (what the transaction set first, the read, its SQLSTATE)
    let errors = [
        ("", "SELECT 1 / (count(*) - 2) FROM probe", "22012"),
        ("", "SELECT * FROM no_such_table", "42P01"),
        ("SET LOCAL statement_timeout = '50ms'", "SELECT pg_sleep(5)", "57014"),
    ];
    let mut expected = 0;
    for iso in ["", " ISOLATION LEVEL REPEATABLE READ"] {
        for (set, read, code) in errors {
            for then in [Then::Commit, Then::Rollback, Then::RollbackToSavepoint, Then::Another] {
                let what = format!("BEGIN{iso}; {read}; then {then:?}");
                c.batch_execute(&format!("BEGIN{iso}; UPDATE k SET v = v + 1 WHERE id = 1; SAVEPOINT a")).await.unwrap();
                c.batch_execute(set).await.unwrap();
                let e = c.batch_execute(read).await.expect_err(&what);
                assert_eq!(e.code().map(|c| c.code()), Some(code), "{what}: {e}");
                match then {
                    Then::Commit => {
                        c.batch_execute("COMMIT").await.unwrap();
                    }
                    Then::Rollback => c.batch_execute("ROLLBACK").await.unwrap(),
                    Then::RollbackToSavepoint => {
                        c.batch_execute("ROLLBACK TO SAVEPOINT a; UPDATE k SET v = v + 10 WHERE id = 1").await.unwrap();
                        c.batch_execute("COMMIT").await.unwrap();
                        expected += 11;
                    }
                    Then::Another => {
                        let e = c.execute("UPDATE k SET v = v + 100 WHERE id = 1", &[]).await.expect_err(&what);
                        assert_eq!(e.code().map(|c| c.code()), Some("25P02"), "{what}: {e}");
                        let e = c.query_one("SELECT v FROM k", &[]).await.expect_err(&what);
                        assert_eq!(e.code().map(|c| c.code()), Some("25P02"), "{what}: {e}");
                        c.batch_execute("COMMIT").await.unwrap();
                    }
                }
                assert_eq!(k_values(&s).await, vec![expected; 3], "{what}");
                assert_all_in_sync(&s);
            }
        }
    }
    // The extended protocol's error path, and a read in a transaction that had failed before.
    c.batch_execute("BEGIN; UPDATE k SET v = v + 1 WHERE id = 1").await.unwrap();
    let e = c.query_one("SELECT 1 / $1::int", &[&0i32]).await.expect_err("division by zero");
    assert_eq!(e.code().map(|c| c.code()), Some("22012"));
    let e = c.query_one("SELECT count(*) FROM probe", &[]).await.expect_err("aborted");
    assert_eq!(e.code().map(|c| c.code()), Some("25P02"));
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(k_values(&s).await, vec![expected; 3]);
    assert_all_in_sync(&s);
    assert_verify_equal(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_killed_during_its_read_in_a_transaction_leaves_the_others_identical() {
    let mut s = setup(3).await;
    let c = s.client().await;
    c.batch_execute("SET application_name = 'lead-read'; BEGIN; UPDATE k SET v = v + 1 WHERE id = 1").await.unwrap();
    let read = c.query_one("SELECT pg_sleep(3)::text, count(*) FROM probe", &[]);
    let kill = async {
        await_row::<i32>(
            &s.servers[0],
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'lead-read' AND query LIKE 'SELECT pg_sleep%'",
            &[],
            "the lead runs the read",
        )
        .await;
        // Nothing of the read has reached the client yet: it runs again on another backend.
        s.servers[0].kill();
    };
    let (row, ()) = tokio::join!(read, kill);
    let n: i64 = row.expect("the read succeeds on another backend").get(1);
    assert_eq!(n, 2);
    c.batch_execute("UPDATE k SET v = v + 1 WHERE id = 1; COMMIT").await.unwrap();
    s.wait_state("pg1", "down").await;
    for srv in &s.servers[1..] {
        let v: i32 = srv.local_client("postgres").await.unwrap().query_one("SELECT v FROM k", &[]).await.unwrap().get(0);
        assert_eq!(v, 2, "the transaction committed on port {}", srv.port());
    }
    let (ok, out) = s.chorus.verify();
    assert!(ok, "chorus verify: {out}");
}
