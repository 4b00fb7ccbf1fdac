//! Real clients through Chorus with two backends: simple and extended protocol, pipelining,
//! transactions, errors, COPY, cancel, LISTEN/NOTIFY, encodings. Every write test ends with
//! the backends' checksums compared.

mod common;

use std::time::Duration;

use common::Setup;
use futures::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::SimpleQueryMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries_and_transactions() {
    let s = Setup::new(2).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v text); INSERT INTO kv VALUES (1, 'a'), (2, 'b');").await.unwrap();
    // Several statements in one Query: one reply stream with every result.
    let msgs = c.simple_query("SELECT 1; SELECT k FROM kv ORDER BY k; UPDATE kv SET v = 'c' WHERE k = 2").await.unwrap();
    let rows: Vec<_> = msgs.iter().filter(|m| matches!(m, SimpleQueryMessage::Row(_))).collect();
    assert_eq!(rows.len(), 3);
    assert!(matches!(msgs.last(), Some(SimpleQueryMessage::CommandComplete(1))));
    // Extended protocol with parameters, and an empty query.
    let row = c.query_one("SELECT v FROM kv WHERE k = $1", &[&2i32]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "c");
    assert!(c.simple_query("").await.unwrap().iter().all(|m| !matches!(m, SimpleQueryMessage::Row(_))));
    // A prepared statement reused 1,000 times.
    let ins = c.prepare("INSERT INTO kv VALUES ($1, $2)").await.unwrap();
    for k in 10..1010 {
        assert_eq!(c.execute(&ins, &[&k, &format!("v{k}")]).await.unwrap(), 1);
    }
    let sel = c.prepare("SELECT v FROM kv WHERE k = $1").await.unwrap();
    for k in 10..1010 {
        assert_eq!(c.query_one(&sel, &[&k]).await.unwrap().get::<_, String>(0), format!("v{k}"));
    }
    // COMMIT keeps, ROLLBACK drops.
    c.batch_execute("BEGIN; INSERT INTO kv VALUES (5000, 'kept'); COMMIT;").await.unwrap();
    c.batch_execute("BEGIN; INSERT INTO kv VALUES (5001, 'dropped'); ROLLBACK;").await.unwrap();
    // An error in the middle of a transaction: the transaction is aborted, as on PostgreSQL.
    c.batch_execute("BEGIN; INSERT INTO kv VALUES (6000, 'x');").await.unwrap();
    let err = c.batch_execute("INSERT INTO kv VALUES (1, 'dup')").await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23505");
    let err = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    let n: i64 = c.query_one("SELECT count(*) FROM kv", &[]).await.unwrap().get(0);
    assert_eq!(n, 1003);
    assert_eq!(c.query("SELECT 1 FROM kv WHERE k IN (5001, 6000)", &[]).await.unwrap().len(), 0);
    s.assert_identical().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_with_an_error_in_the_middle() {
    let s = Setup::new(2).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE p (k int PRIMARY KEY)").await.unwrap();
    let ins = c.prepare("INSERT INTO p VALUES ($1)").await.unwrap();
    // tokio-postgres pipelines concurrent queries on one connection.
    let keys: Vec<i32> = (0..200).map(|k| k % 150).collect();
    let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 1]> = keys.iter().map(|k| [k as _]).collect();
    let futs: Vec<_> = params.iter().map(|p| c.execute(&ins, p)).collect();
    let results = futures::future::join_all(futs).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let dup =
        results.iter().filter(|r| r.as_ref().err().and_then(|e| e.code()).map(|c| c.code() == "23505").unwrap_or(false)).count();
    assert_eq!((ok, dup), (150, 50));
    // Pipelined reads see the pipelined writes before them.
    let reads: Vec<_> = (0..50).map(|_| c.query_one("SELECT count(*) FROM p", &[])).collect();
    for r in futures::future::join_all(reads).await {
        assert_eq!(r.unwrap().get::<_, i64>(0), 150);
    }
    s.assert_identical().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_of_100k_rows() {
    let s = Setup::new(2).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE big (id int, label text)").await.unwrap();
    let sink = c.copy_in("COPY big FROM STDIN").await.unwrap();
    futures::pin_mut!(sink);
    let mut chunk = String::new();
    for i in 0..100_000 {
        chunk.push_str(&format!("{i}\tlabel-{i}\n"));
        if chunk.len() > 64 * 1024 {
            sink.send(bytes::Bytes::from(std::mem::take(&mut chunk))).await.unwrap();
        }
    }
    sink.send(bytes::Bytes::from(chunk)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 100_000);
    let out = c.copy_out("COPY (SELECT * FROM big ORDER BY id) TO STDOUT").await.unwrap();
    let data: Vec<bytes::Bytes> = out.try_collect().await.unwrap();
    let text: String = data.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
    assert_eq!(text.lines().count(), 100_000);
    assert_eq!(text.lines().nth(99_999), Some("99999\tlabel-99999"));
    assert_eq!(c.query_one("SELECT count(*) FROM big", &[]).await.unwrap().get::<_, i64>(0), 100_000);
    s.assert_identical().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_backend() {
    let s = Setup::new(2).await;
    let c = s.client().await;
    let token = c.cancel_token();
    let sleeper = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let r = c.simple_query("SELECT pg_sleep(30)").await;
        (r.map(|_| ()), started.elapsed())
    });
    // Wait until the sleep is running on a backend, then cancel it.
    let probe = s.servers[0].local_client("postgres").await.unwrap();
    let probe2 = s.servers[1].local_client("postgres").await.unwrap();
    let q = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'";
    for _ in 0..200 {
        let a: i64 = probe.query_one(q, &[]).await.unwrap().get(0);
        let b: i64 = probe2.query_one(q, &[]).await.unwrap().get(0);
        if a + b > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (res, took) = sleeper.await.unwrap();
    let err = res.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "57014", "{err}");
    assert!(took < Duration::from_secs(20), "cancel took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_delivers_exactly_one_notification() {
    let s = Setup::new(2).await;
    let (listener, mut conn) =
        tokio_postgres::connect(&s.chorus.conn_str(common::APP_USER, "postgres"), tokio_postgres::NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener.batch_execute("LISTEN events").await.unwrap();
    let notifier = s.client().await;
    notifier.batch_execute("NOTIFY events, 'hello'").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    assert_eq!(got, ("events".to_string(), "hello".to_string()));
    // Both backends delivered it; the client must see it once. A round trip on the listening
    // session flushes anything still on its way.
    listener.simple_query("SELECT 1").await.unwrap();
    notifier.batch_execute("NOTIFY events, 'second'").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    assert_eq!(got.1, "second", "a duplicate of the first notification arrived");
    listener.simple_query("SELECT 1").await.unwrap();
    assert!(rx.try_recv().is_err(), "a notification arrived twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latin1_client_encoding_round_trips() {
    let s = Setup::new(2).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE enc (t text)").await.unwrap();
    // Speak LATIN1 on the wire: bytes 0xE9 (é) and 0xFC (ü) in a raw simple query via psql.
    let script = b"SET client_encoding = 'LATIN1';\nINSERT INTO enc VALUES ('caf\xe9 m\xfcde');\nSELECT t FROM enc;\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latin1.sql");
    std::fs::write(&path, script).unwrap();
    let out = std::process::Command::new("psql")
        .arg(s.chorus.conn_str(common::APP_USER, "postgres"))
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.windows(9).any(|w| w == b"caf\xe9 m\xfcde"), "LATIN1 bytes came back changed: {:?}", out.stdout);
    // Stored as UTF-8 on every backend.
    let v: String = c.query_one("SELECT t FROM enc", &[]).await.unwrap().get(0);
    assert_eq!(v, "café müde");
    s.assert_identical().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_through_chorus() {
    use sqlx::{Connection, Row};
    let s = Setup::new(2).await;
    let url = format!("postgres://{}:{}@127.0.0.1:{}/postgres", common::APP_USER.0, common::APP_USER.1, s.chorus.port());
    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE sx (id int PRIMARY KEY, name text NOT NULL)").execute(&mut c).await.unwrap();
    for i in 0..100 {
        sqlx::query("INSERT INTO sx VALUES ($1, $2)").bind(i).bind(format!("n{i}")).execute(&mut c).await.unwrap();
    }
    let mut tx = c.begin().await.unwrap();
    sqlx::query("UPDATE sx SET name = 'changed' WHERE id < 10").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = c.begin().await.unwrap();
    sqlx::query("DELETE FROM sx").execute(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    let row = sqlx::query("SELECT count(*) AS n, count(*) FILTER (WHERE name = 'changed') AS c FROM sx")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!((row.get::<i64, _>("n"), row.get::<i64, _>("c")), (100, 10));
    let err = sqlx::query("INSERT INTO sx VALUES (1, 'dup')").execute(&mut c).await.unwrap_err();
    assert_eq!(err.as_database_error().unwrap().code().unwrap(), "23505");
    c.close().await.unwrap();
    s.assert_identical().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_arrive_once() {
    let s = Setup::new(2).await;
    let (client, mut conn) =
        tokio_postgres::connect(&s.chorus.conn_str(common::APP_USER, "postgres"), tokio_postgres::NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notice(n) = m {
                let _ = tx.send(n.message().to_string());
            }
        }
    });
    client.batch_execute("DO $$ BEGIN RAISE NOTICE 'one notice'; END $$").await.unwrap();
    // The reply is complete, so any notice of it has been handed over already.
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(rx.try_recv().ok().as_deref(), Some("one notice"));
    assert!(rx.try_recv().is_err(), "the notice arrived more than once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_transaction_holding_write_locks_is_ended() {
    let s =
        Setup::with(2, common::ChorusOptions { extra: "idle_in_transaction_timeout = \"1s\"\n".into(), ..Default::default() })
            .await;
    let setup = s.client().await;
    setup.batch_execute("CREATE TABLE w (v int); INSERT INTO w VALUES (0);").await.unwrap();
    let idle = s.client().await;
    // The idle clock runs from the arrival of the last message, which is after this.
    let started = std::time::Instant::now();
    idle.batch_execute("BEGIN; UPDATE w SET v = 1;").await.unwrap();
    // Another writer waits for the table's lock; it gets it when the idle session is ended.
    let other = s.client().await;
    tokio::time::timeout(Duration::from_secs(20), other.execute("UPDATE w SET v = v + 10", &[])).await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1000), "the writer did not wait: {:?}", started.elapsed());
    // The idle client was told why (25P03) and its transaction rolled back everywhere.
    let err = idle.simple_query("COMMIT").await.unwrap_err();
    let code = err.code().map(|c| c.code().to_string());
    assert!(code.as_deref() == Some("25P03") || err.is_closed(), "{err}");
    assert_eq!(setup.query_one("SELECT v FROM w", &[]).await.unwrap().get::<_, i32>(0), 10);
    s.assert_identical().await;
}
