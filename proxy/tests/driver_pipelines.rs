//! Pipelines as drivers send them, answered message by message as a direct server answers
//! them: asyncpg's executemany (Bind and Execute per row, one Sync; `testkit/py/
//! asyncpg_shapes.py`, asyncpg from PyPI) and tokio-postgres's pipelined futures (a Sync per
//! query, sent without waiting), in autocommit and in transactions, with an error in the middle
//! aborting what PostgreSQL aborts. (psycopg's pipeline mode: psycopg_findings.rs; pgjdbc's
//! batches: jdbc.rs.) Each runs against a server of its own and through Chorus over two
//! backends; the answers must be the same, and verify equal after.

mod common;

use chorus_testkit::python_json;
use common::{PgOptions, PgServer, Setup, APP_USER};
use futures::future::join_all;
use serde_json::json;
use tokio_postgres::{Client, NoTls};

async fn connect(dsn: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(dsn, NoTls).await.expect("connect");
    tokio::spawn(conn);
    c
}

fn outcome(r: Result<u64, tokio_postgres::Error>) -> String {
    match r {
        Ok(n) => n.to_string(),
        Err(e) => e.code().map(|c| c.code().to_string()).unwrap_or_else(|| e.to_string()),
    }
}

/// tokio-postgres sends each query of a `join_all` at once, each with its own Sync.
async fn tokio_postgres_shapes(c: &Client) -> Vec<String> {
    let mut out = Vec::new();
    c.batch_execute("DROP TABLE IF EXISTS tp; CREATE TABLE tp (id int PRIMARY KEY, v text)").await.unwrap();
    let ins = c.prepare("INSERT INTO tp (id, v) VALUES ($1, $2) RETURNING id").await.unwrap();
    let values: Vec<(i32, String)> = (1..=20).map(|i| (i, format!("v{i}"))).collect();
    let rows = join_all(values.iter().map(|(i, v)| async { c.query_one(&ins, &[i, v]).await })).await;
    let ids: Vec<i32> = rows.into_iter().map(|r| r.unwrap().get(0)).collect();
    out.push(format!("autocommit returning {ids:?}"));
    // In a transaction: the duplicate key aborts it, and what was pipelined after it gets 25P02.
    c.batch_execute("BEGIN").await.unwrap();
    let plain = c.prepare("INSERT INTO tp (id, v) VALUES ($1, 't')").await.unwrap();
    let keys = [100i32, 101, 1, 102];
    let results = join_all(keys.iter().map(|k| async { c.execute(&plain, &[k]).await })).await;
    out.push(format!("in a transaction {:?}", results.into_iter().map(outcome).collect::<Vec<_>>()));
    c.batch_execute("ROLLBACK").await.unwrap();
    // Reads and writes pipelined together, outside a transaction.
    let count = c.prepare("SELECT count(*) FROM tp").await.unwrap();
    let upd = c.prepare("UPDATE tp SET v = v || '!' WHERE id <= $1").await.unwrap();
    let (a, b, d) = tokio::join!(c.query_one(&count, &[]), c.execute(&upd, &[&5i32]), c.query_one(&count, &[]));
    out.push(format!("mixed {} {} {}", a.unwrap().get::<_, i64>(0), b.unwrap(), d.unwrap().get::<_, i64>(0)));
    let left: i64 = c.query_one("SELECT count(*) FROM tp WHERE v = 't'", &[]).await.unwrap().get(0);
    out.push(format!("left after the rollback {left}"));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_drivers_are_answered_as_a_direct_server_answers_them() {
    let s = Setup::new(2).await;
    let reference = PgServer::start(PgOptions::default()).await.expect("reference server");
    let url = |port: u16| format!("postgresql://{}:{}@127.0.0.1:{port}/postgres", APP_USER.0, APP_USER.1);
    let direct = python_json("asyncpg_shapes.py", &[&url(reference.port())]);
    let through = python_json("asyncpg_shapes.py", &[&url(s.chorus.port())]);
    assert_eq!(through["autocommit_many"], json!([200, 20100]), "{through}");
    assert_eq!(through["many_in_a_transaction"], json!([100, 100]));
    assert_eq!(through["error_in_the_middle"], json!(["23505", 0]));
    assert_eq!(through["cached_statements"], json!(1275));
    assert_eq!(through, direct, "asyncpg through Chorus, then directly");

    let want = tokio_postgres_shapes(&connect(&reference.conn_str(APP_USER, "postgres")).await).await;
    let got = tokio_postgres_shapes(&connect(&s.chorus.conn_str(APP_USER, "postgres")).await).await;
    assert_eq!(got[1], r#"in a transaction ["1", "1", "23505", "25P02"]"#, "{got:#?}");
    assert_eq!(got, want, "tokio-postgres through Chorus, then directly");

    let states = s.chorus.states();
    assert!(states.values().all(|v| v == "in_sync"), "{states:?}\n{}", s.chorus.log());
    let (ok, out) = s.chorus.verify();
    assert!(ok, "{out}");
}
