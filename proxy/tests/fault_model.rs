//! The fault model (contract, "What ejects a backend"): what a client sends, however hostile or
//! careless, ends at most its own session; a backend leaves the in-sync set only for a failure
//! of its own. Each test runs a load of transfers beside the fault, states what the clients saw
//! (by SQLSTATE) and ends with `chorus verify` equal on every backend still in sync.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{await_row, ChorusOptions, PgOptions, PgServer, Setup, APP_USER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, NoTls};

/// A role without any privilege beyond logging in and using the test tables.
const MALLORY: (&str, &str) = ("mallory", "not-a-superuser");

fn opts(extra: &str) -> ChorusOptions {
    ChorusOptions {
        auth: "scram-sha-256",
        extra: format!(
            "{extra}\nhealth_check_user = \"{}\"\n[[users]]\nname = \"{}\"\npassword = \"{}\"\n",
            APP_USER.0, MALLORY.0, MALLORY.1
        ),
    }
}

async fn setup(n: usize, extra: &str, pg: PgOptions) -> Setup {
    let mut servers = Vec::new();
    for _ in 0..n {
        servers.push(PgServer::start(pg.clone()).await.expect("start postgres"));
    }
    let refs: Vec<&PgServer> = servers.iter().collect();
    let chorus = common::ChorusProcess::start(common::chorus_bin(), &refs, opts(extra)).await.expect("start chorus");
    let s = Setup { servers, chorus };
    let c = s.client().await;
    c.batch_execute(&format!(
        "CREATE ROLE {} LOGIN PASSWORD '{}';
         CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL);
         INSERT INTO acct SELECT g, 1000 FROM generate_series(1, 64) g;
         CREATE TABLE moves (id bigserial PRIMARY KEY, src int, dst int, amount int);
         GRANT SELECT, INSERT, UPDATE ON acct, moves TO {0}; GRANT USAGE ON SEQUENCE moves_id_seq TO {0};",
        MALLORY.0, MALLORY.1
    ))
    .await
    .unwrap();
    s
}

/// What a load of transfers saw: transactions done and every error by SQLSTATE.
struct LoadResult {
    done: u64,
    errors: Vec<String>,
}

/// `sessions` clients moving money between accounts until `stop`: explicit transactions and
/// autocommit inserts. Every session is logged in when this returns.
async fn transfers(s: &Setup, sessions: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<LoadResult> {
    let conn = s.chorus.conn_str(APP_USER, "postgres");
    let mut clients = Vec::new();
    for _ in 0..sessions {
        let (c, connection) = tokio_postgres::connect(&conn, NoTls).await.expect("load session");
        tokio::spawn(connection);
        clients.push(c);
    }
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for (w, c) in clients.into_iter().enumerate() {
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = 0u64;
                let mut errors = Vec::new();
                let mut i = w as i32;
                while !stop.load(Ordering::Acquire) {
                    i = i.wrapping_mul(31).wrapping_add(7);
                    let (a, b) = (1 + i.rem_euclid(64), 1 + (i / 64).rem_euclid(64));
                    let sql = if done % 4 == 3 {
                        format!("INSERT INTO moves (src, dst, amount) VALUES ({a}, {b}, 0)")
                    } else {
                        format!(
                            "BEGIN; UPDATE acct SET bal = bal - 1 WHERE id = {a}; UPDATE acct SET bal = bal + 1 WHERE id = {b}; \
                             INSERT INTO moves (src, dst, amount) VALUES ({a}, {b}, 1); COMMIT"
                        )
                    };
                    match c.batch_execute(&sql).await {
                        Ok(()) => done += 1,
                        Err(e) => {
                            errors.push(code_of(&e));
                            if c.is_closed() {
                                break;
                            }
                        }
                    }
                }
                (done, errors)
            }));
        }
        let mut r = LoadResult { done: 0, errors: Vec::new() };
        for t in tasks {
            let (d, e) = t.await.unwrap();
            r.done += d;
            r.errors.extend(e);
        }
        r
    })
}

async fn stop_load(stop: &AtomicBool, load: tokio::task::JoinHandle<LoadResult>) -> LoadResult {
    stop.store(true, Ordering::Release);
    load.await.unwrap()
}

/// A connection whose end (and the error it ended with) the test can await.
async fn connect(s: &Setup, user: (&str, &str), app: &str) -> (Client, tokio::task::JoinHandle<Option<String>>) {
    let conn = format!("{} application_name={app}", s.chorus.conn_str(user, "postgres"));
    let (c, connection) = tokio_postgres::connect(&conn, NoTls).await.expect("connect through chorus");
    let ended = tokio::spawn(async move { connection.await.err().map(|e| code_of(&e)) });
    (c, ended)
}

fn code_of(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_else(|| e.to_string())
}

async fn ended_with(ended: tokio::task::JoinHandle<Option<String>>) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(20), ended).await.expect("the session did not end").unwrap()
}

/// Every backend in sync, chorus verify equal, and the money all there.
async fn assert_in_sync_and_equal(s: &Setup, n: usize) {
    let states = s.chorus.states();
    assert_eq!(states.values().filter(|v| *v == "in_sync").count(), n, "{states:?}\n{}", s.chorus.log());
    let (ok, out) = s.chorus.verify();
    assert!(ok, "{out}");
    let total: i64 = s.client().await.query_one("SELECT sum(bal)::int8 FROM acct", &[]).await.unwrap().get(0);
    assert_eq!(total, 64 * 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_band_fatals_from_an_unprivileged_client_end_only_its_session() {
    let s = setup(3, "", PgOptions::default()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = transfers(&s, 16, stop.clone()).await;

    // pg_terminate_backend of its own process: every backend ends that session alike.
    let (c, ended) = connect(&s, MALLORY, "mallory").await;
    let e = c.simple_query("SELECT pg_terminate_backend(pg_backend_pid())").await.expect_err("the session must end");
    assert_eq!(e.code().map(|c| c.code()), Some("57P01"), "{e}");
    let _ = ended_with(ended).await;

    // A session timeout it set for itself.
    let (c, ended) = connect(&s, MALLORY, "mallory").await;
    c.batch_execute("SET idle_session_timeout = '1s'").await.unwrap();
    assert_eq!(ended_with(ended).await.as_deref(), Some("57P05"));

    // Idle in a transaction past its own limit.
    let (c, ended) = connect(&s, MALLORY, "mallory").await;
    c.batch_execute("SET idle_in_transaction_session_timeout = '1s'; BEGIN; SELECT 1").await.unwrap();
    assert_eq!(ended_with(ended).await.as_deref(), Some("25P03"));
    // Holding a write transaction open when the timeout strikes: rolled back everywhere.
    let (c, ended) = connect(&s, MALLORY, "mallory").await;
    c.batch_execute("SET idle_in_transaction_session_timeout = '1s'; BEGIN; UPDATE acct SET bal = bal + 500 WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(ended_with(ended).await.as_deref(), Some("25P03"));

    // As a control, an error that is no FATAL changes nothing either.
    let (c, _) = connect(&s, MALLORY, "mallory").await;
    let e = c.simple_query("SELECT 1/0").await.expect_err("division by zero");
    assert_eq!(e.code().map(|c| c.code()), Some("22012"));

    let r = stop_load(&stop, load).await;
    assert!(r.errors.is_empty(), "the load saw errors: {:?}", r.errors);
    assert!(r.done > 50, "only {} transfers ran", r.done);
    assert!(!s.chorus.log().contains("backend ejected"), "{}", s.chorus.log());
    assert_in_sync_and_equal(&s, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_server_facts_are_never_compared() {
    let s = setup(2, "", PgOptions::default()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = transfers(&s, 8, stop.clone()).await;
    let app = s.client().await;
    // Each server has its own process ids, activity and port.
    app.batch_execute("BEGIN; SELECT pg_backend_pid(); SELECT inet_server_port(); SELECT count(*) FROM pg_stat_activity; COMMIT")
        .await
        .unwrap();
    app.batch_execute(
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'nobody'; \
         BEGIN; SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE state = 'idle' AND application_name = 'victim'; COMMIT",
    )
    .await
    .unwrap();
    app.batch_execute("BEGIN; UPDATE acct SET bal = bal WHERE id = 2; SELECT pid, backend_start FROM pg_stat_activity; COMMIT")
        .await
        .unwrap();
    // node-postgres's own tests end their victims by application name: a different pid on
    // each server, a different count of rows.
    let mut victims = Vec::new();
    for _ in 0..3 {
        victims.push(connect(&s, MALLORY, "victim").await);
    }
    let rows = app
        .simple_query(
            "SELECT pid, (SELECT pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'victim' AND pid <> pg_backend_pid()",
        )
        .await
        .unwrap();
    assert!(rows.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count() >= 3);
    for (_, ended) in victims {
        assert_eq!(ended_with(ended).await.as_deref(), Some("57P01"));
    }
    let r = stop_load(&stop, load).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_in_sync_and_equal(&s, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_storm_is_the_clients_outcome() {
    let pg = PgOptions { max_connections: 100, ..PgOptions::default() };
    // 1,200 SCRAM exchanges in a debug build on a loaded machine outlast the default
    // login_timeout; what is tested here is what a login over capacity gets.
    let s = setup(3, "max_client_connections = 1500\nlogin_timeout = \"120s\"", pg).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = transfers(&s, 4, stop.clone()).await;
    let conn = s.chorus.conn_str(MALLORY, "postgres");
    let release = Arc::new(tokio::sync::Notify::new());
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let all_answered = Arc::new(tokio::sync::Notify::new());
    let mut storm = Vec::new();
    for _ in 0..1200 {
        let (conn, release, answered, all_answered) = (conn.clone(), release.clone(), answered.clone(), all_answered.clone());
        storm.push(tokio::spawn(async move {
            // Registered now, so the release cannot pass it by.
            let waiting = release.notified();
            let res = tokio_postgres::connect(&conn, NoTls).await;
            if answered.fetch_add(1, Ordering::AcqRel) + 1 == 1200 {
                all_answered.notify_one();
            }
            match res {
                Ok((c, connection)) => {
                    let driver = tokio::spawn(connection);
                    // Hold the connection until every login of the storm has been answered.
                    waiting.await;
                    drop(c);
                    let _ = driver.await;
                    Ok(())
                }
                Err(e) => Err(code_of(&e)),
            }
        }));
    }
    tokio::time::timeout(Duration::from_secs(180), all_answered.notified()).await.expect("every login is answered");
    release.notify_waiters();
    let (mut ok, mut codes) = (0, std::collections::BTreeMap::<String, usize>::new());
    for t in storm {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(code) => *codes.entry(code).or_default() += 1,
        }
    }
    eprintln!("login storm: {ok} of 1200 logged in; refused: {codes:?}");
    assert!(ok > 0 && ok < 1200, "{ok} logins got in");
    let refused = codes.get("53300").copied().unwrap_or(0);
    assert!(refused > 0, "no login was refused with 53300: {codes:?}");
    assert!(codes.keys().all(|c| c == "53300"), "other refusals: {codes:?}");
    let r = stop_load(&stop, load).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(!s.chorus.log().contains("backend ejected"), "{}", s.chorus.log());
    assert_in_sync_and_equal(&s, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_that_write_run_on_every_backend() {
    let s = setup(2, "", PgOptions::default()).await;
    let c = s.client().await;
    c.batch_execute(
        "CREATE SCHEMA s;
         CREATE TABLE t (v int);
         CREATE FUNCTION s.lower(x int) RETURNS int LANGUAGE sql VOLATILE AS 'INSERT INTO t VALUES (x) RETURNING x';
         CREATE FUNCTION public.lower(x int) RETURNS int LANGUAGE sql VOLATILE AS 'INSERT INTO t VALUES (x + 100) RETURNING x';
         CREATE VIEW v AS SELECT s.lower(3) AS x;
         CREATE VIEW vv AS SELECT x FROM v;
         CREATE FUNCTION op_writes(a int, b int) RETURNS int LANGUAGE sql VOLATILE AS 'INSERT INTO t VALUES (a * 10 + b) RETURNING b';
         CREATE OPERATOR #@# (LEFTARG = int, RIGHTARG = int, FUNCTION = op_writes);",
    )
    .await
    .unwrap();
    // Outside a transaction, by the simple and the extended protocol, and inside one.
    c.simple_query("SELECT s.lower(1)").await.unwrap();
    c.query("SELECT lower(2)", &[]).await.unwrap();
    c.simple_query("SELECT * FROM v").await.unwrap();
    c.query("SELECT x FROM vv", &[]).await.unwrap();
    c.simple_query("SELECT 4 #@# 5").await.unwrap();
    c.batch_execute("BEGIN; SELECT s.lower(6); SELECT 7 #@# 8; COMMIT").await.unwrap();
    let mut seen = Vec::new();
    for srv in &s.servers {
        let d = srv.local_client("postgres").await.unwrap();
        let rows: Vec<i32> = d.query("SELECT v FROM t ORDER BY v", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        seen.push(rows);
    }
    assert_eq!(seen[0], vec![1, 3, 3, 6, 45, 78, 102], "every write reached the first backend");
    assert_eq!(seen[0], seen[1], "and the second");
    let states = s.chorus.states();
    assert!(states.values().all(|v| v == "in_sync"), "{states:?}");
    let (ok, out) = s.chorus.verify();
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_backend_does_not_hold_a_copy_longer_than_backend_timeout() {
    let s = setup(3, "backend_timeout = \"3s\"", PgOptions::default()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = transfers(&s, 16, stop.clone()).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE blob (id int, body text)").await.unwrap();
    // 50 MB of rows.
    let row = "x".repeat(200);
    let data: bytes::Bytes = (0..250_000).map(|i| format!("{i}\t{row}\n")).collect::<String>().into();
    assert!(data.len() > 50_000_000);
    async fn copy(c: &Client, data: &bytes::Bytes) -> Duration {
        use futures::SinkExt;
        let t = Instant::now();
        let sink = c.copy_in("COPY blob FROM STDIN").await.unwrap();
        futures::pin_mut!(sink);
        for chunk in data.chunks(1 << 16) {
            sink.send(bytes::Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        assert_eq!(sink.as_mut().finish().await.unwrap(), 250_000);
        t.elapsed()
    }
    let normal = copy(&c, &data).await;
    s.servers[2].pause();
    let stalled = copy(&c, &data).await;
    s.servers[2].resume();
    assert!(
        stalled < normal + Duration::from_secs(3 + 7),
        "COPY took {stalled:?} with a stopped backend, {normal:?} without (backend_timeout 3 s)"
    );
    s.wait_state("pg3", "down").await;
    let r = stop_load(&stop, load).await;
    assert!(r.errors.is_empty(), "the load saw errors: {:?}", r.errors);
    assert_in_sync_and_equal(&s, 2).await;
    let n: i64 = c.query_one("SELECT count(*) FROM blob", &[]).await.unwrap().get(0);
    assert_eq!(n, 500_000);
}

/// One admin API request; returns (status code, body).
async fn admin(s: &Setup, method: &str, path: &str, token: &str, body: &str) -> (u16, String) {
    let url = s.chorus.admin_url();
    let addr = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_refuses_bad_names_and_servers_it_has() {
    let s = setup(2, "", PgOptions::default()).await;
    let token = chorus_testkit::ADMIN_TOKEN;
    let data = s.chorus.data_dir();
    let canary = data.parent().unwrap().join("canary");
    std::fs::create_dir_all(&canary).unwrap();
    std::fs::write(canary.join("keep"), "x").unwrap();
    let spare = PgServer::start(PgOptions::default()).await.unwrap();
    for name in ["x/../../canary", "a\\\"b c", "", "pg 3", "x.y", &"n".repeat(64)] {
        let body = serde_json::json!({ "name": name, "host": "127.0.0.1", "port": spare.port() }).to_string();
        let (code, out) = admin(&s, "POST", "/backends", token, &body).await;
        assert_eq!(code, 400, "{name:?}: {out}");
    }
    assert!(canary.join("keep").exists(), "the join touched a directory outside data_dir");
    // The same server under a second name, or the donor as a forced newcomer.
    for (name, port, force) in [("again", s.servers[0].port(), false), ("pg9", s.servers[1].port(), true)] {
        let body = serde_json::json!({ "name": name, "host": "localhost", "port": port, "force": force }).to_string();
        let (code, out) = admin(&s, "POST", "/backends", token, &body).await;
        assert_eq!(code, 409, "{out}");
        assert!(out.contains("already in the cluster as backend"), "{out}");
    }
    // HTTP trims the ends of a header value; inside it, a space is part of the token.
    for wrong in [format!(" {token}"), format!("{token}x"), token[1..].to_string()] {
        let (code, _) = admin(&s, "GET", "/backends", &wrong, "").await;
        assert_eq!(code, 401, "{wrong:?} is another token");
    }
    let states = s.chorus.states();
    assert_eq!(states.keys().cloned().collect::<Vec<_>>(), vec!["pg1".to_string(), "pg2".to_string()]);
    assert!(states.values().all(|v| v == "in_sync"));
    // What Chorus writes is its user's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data_dir mode {mode:o}");
    let mode = std::fs::metadata(data.join("backends.json")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "backends.json mode {mode:o}");
    // A proper join of the spare still works.
    let (ok, out) = s.chorus.chorusctl(&["join", "pg3", "--host", "127.0.0.1", "--port", &spare.port().to_string()]);
    assert!(ok, "{out}");
    s.wait_state("pg3", "in_sync").await;
}

/// Waits until a session on `srv` waits for a lock with a statement that started after `after`
/// (None: any); returns that statement's start.
async fn lock_waiter_since(srv: &PgServer, after: Option<String>) -> String {
    let sql = "SELECT query_start::text FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE k%' \
               AND ($1::text IS NULL OR query_start > $1::timestamptz) ORDER BY query_start DESC LIMIT 1";
    await_row(srv, sql, &[&after], "no statement waited for the lock").await
}

/// A transaction on one server alone that holds row 1 of k.
async fn hold_row(srv: &PgServer) -> Client {
    let c = srv.local_client("postgres").await.unwrap();
    c.batch_execute("BEGIN; SELECT * FROM k WHERE id = 1 FOR UPDATE").await.unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_timeout_on_one_backend_only_ejects_nothing() {
    let s = setup(2, "", PgOptions::default()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = transfers(&s, 16, stop.clone()).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE k (id int PRIMARY KEY, v int); INSERT INTO k VALUES (1, 0); SET statement_timeout = '1s'")
        .await
        .unwrap();
    // Outside a transaction, the lock held on the second backend, then on the first (the
    // lead, which answers writes): the first run times out there, the second run (under the
    // same locks) finds the lock free, and the client sees one UPDATE.
    for (n, locked) in [1, 0].into_iter().enumerate() {
        let holder = hold_row(&s.servers[locked]).await;
        let update = c.execute("UPDATE k SET v = v + 1 WHERE id = 1", &[]);
        let release = async {
            let first = lock_waiter_since(&s.servers[locked], None).await;
            lock_waiter_since(&s.servers[locked], Some(first)).await;
            holder.batch_execute("COMMIT").await.unwrap();
        };
        let (updated, ()) = tokio::join!(update, release);
        assert_eq!(updated.unwrap(), 1, "the client sees the UPDATE succeed");
        for srv in &s.servers {
            let v: i32 = srv.local_client("postgres").await.unwrap().query_one("SELECT v FROM k", &[]).await.unwrap().get(0);
            assert_eq!(v, n as i32 + 1, "port {}", srv.port());
        }
    }
    // Inside a transaction: aborted on every backend, whichever timed out.
    for locked in [1, 0] {
        let holder = hold_row(&s.servers[locked]).await;
        c.batch_execute("BEGIN").await.unwrap();
        let r = c.execute("UPDATE k SET v = v + 100 WHERE id = 1", &[]).await;
        match (locked, &r) {
            (0, Err(e)) => assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}"),
            (1, Ok(1)) => {}
            _ => panic!("lock on backend {locked}: {r:?}"),
        }
        // COMMIT waits for every backend to finish the UPDATE, then meets an aborted
        // transaction everywhere: ROLLBACK, as PostgreSQL answers it.
        let msgs = c.simple_query("COMMIT").await.unwrap();
        assert!(msgs.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(_))));
        let in_tx: i64 = c.query_one("SELECT count(*) FROM k WHERE v > 50", &[]).await.unwrap().get(0);
        assert_eq!(in_tx, 0, "the UPDATE was rolled back");
        holder.batch_execute("COMMIT").await.unwrap();
    }
    for srv in &s.servers {
        let v: i32 = srv.local_client("postgres").await.unwrap().query_one("SELECT v FROM k", &[]).await.unwrap().get(0);
        assert_eq!(v, 2, "the aborted transactions left nothing, port {}", srv.port());
    }
    let r = stop_load(&stop, load).await;
    assert!(r.errors.is_empty(), "the load saw errors: {:?}", r.errors);
    assert_in_sync_and_equal(&s, 2).await;
}

/// The process id of the connection named `app` on `srv`, other than `not`.
async fn pid_of(srv: &PgServer, app: &str, not: Option<i32>) -> i32 {
    let sql = "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND pid <> $2";
    await_row(srv, sql, &[&app, &not.unwrap_or(0)], &format!("no connection named {app}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_killed_on_one_healthy_server_is_made_again() {
    let s = setup(3, "", PgOptions::default()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = transfers(&s, 16, stop.clone()).await;
    let (c, ended) = connect(&s, MALLORY, "lone").await;
    c.batch_execute("SET search_path = pg_catalog, public; PREPARE p AS SELECT 40 + 2").await.unwrap();
    // An administrator ends this session's connection on the second server alone.
    let killed = pid_of(&s.servers[1], "lone", None).await;
    let admin = s.servers[1].local_client("postgres").await.unwrap();
    admin.query_one("SELECT pg_terminate_backend($1)", &[&killed]).await.unwrap();
    // The server is healthy: the session connects again and rebuilds its state there.
    let again = pid_of(&s.servers[1], "lone", Some(killed)).await;
    assert_ne!(again, killed);
    let rows = c.simple_query("BEGIN; EXECUTE p; SHOW search_path; COMMIT").await.unwrap();
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["42", "pg_catalog, public"]);
    c.batch_execute("INSERT INTO moves (src, dst, amount) VALUES (1, 2, 0)").await.unwrap();
    // Inside a transaction: the transaction fails with 40001 (retry it), the session goes on,
    // and the connection is made again once the transaction has ended.
    c.batch_execute("BEGIN; INSERT INTO moves (src, dst, amount) VALUES (7, 7, 7)").await.unwrap();
    admin.query_one("SELECT pg_terminate_backend($1)", &[&again]).await.unwrap();
    let gone = "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)";
    let _: i32 = await_row(&s.servers[1], gone, &[&again], "the connection was not ended").await;
    // Chorus may read the lost connection before it routes the INSERT (the INSERT fails), or
    // after the lead already answered it (the next statement fails): 40001 either way.
    let e = match c.batch_execute("INSERT INTO moves (src, dst, amount) VALUES (8, 8, 8)").await {
        Err(e) => e,
        Ok(()) => c.batch_execute("SELECT 1").await.expect_err("the transaction failed at the next statement"),
    };
    assert_eq!(e.code().map(|c| c.code()), Some("40001"), "{e}");
    let e = c.batch_execute("SELECT 1").await.expect_err("still aborted");
    assert_eq!(e.code().map(|c| c.code()), Some("25P02"), "{e}");
    c.batch_execute("ROLLBACK").await.unwrap();
    c.batch_execute("INSERT INTO moves (src, dst, amount) VALUES (9, 9, 9)").await.unwrap();
    pid_of(&s.servers[1], "lone", Some(again)).await;
    let n: i64 = c.query_one("SELECT count(*) FROM moves WHERE amount IN (7, 8)", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "the failed transaction left nothing");
    // A session holding what cannot be rebuilt ends instead, saying why.
    let (t, t_ended) = connect(&s, MALLORY, "holder").await;
    t.batch_execute("CREATE TEMP TABLE scratch (a int)").await.unwrap();
    let holder = pid_of(&s.servers[1], "holder", None).await;
    admin.query_one("SELECT pg_terminate_backend($1)", &[&holder]).await.unwrap();
    assert_eq!(ended_with(t_ended).await.as_deref(), Some("57P01"));
    let r = stop_load(&stop, load).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(!s.chorus.log().contains("backend ejected"), "{}", s.chorus.log());
    assert_in_sync_and_equal(&s, 3).await;
    drop(c);
    let _ = ended.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_backend_fails_at_once_the_last_stays_in_sync_and_serves_again() {
    let mut s = setup(2, "", PgOptions::default()).await;
    let c = s.client().await;
    c.batch_execute("INSERT INTO moves (src, dst, amount) VALUES (1, 1, 1)").await.unwrap();
    // The test servers run with fsync off: what a crash would lose is written out first.
    for srv in &s.servers {
        srv.local_client("postgres").await.unwrap().batch_execute("CHECKPOINT").await.unwrap();
    }
    for srv in &mut s.servers {
        srv.kill();
    }
    // The clients see 08006 while nothing answers, or, when both servers' sessions noticed
    // their postmaster's death before the INSERT reached them, the FATAL both gave alike
    // (PostgreSQL's own 57P01, what a direct connection gets; contract, "What ejects a backend").
    let e = c.batch_execute("INSERT INTO moves (src, dst, amount) VALUES (2, 2, 2)").await.expect_err("nothing answers");
    let alike_fatal = e.as_db_error().is_some_and(|d| d.code().code() == "57P01" && d.message().contains("postmaster exit"));
    assert!(alike_fatal || e.code().is_none_or(|c| c.code() == "08006"), "{e}: {:?}", e.as_db_error());
    // One backend left first (down); the other, the last, stays in sync whatever fails next.
    let deadline = Instant::now() + Duration::from_secs(30);
    let last = loop {
        let states = s.chorus.states();
        let down: Vec<&String> = states.iter().filter(|(_, v)| *v == "down").map(|(k, _)| k).collect();
        if down.len() == 1 {
            let last = states.iter().find(|(_, v)| *v == "in_sync").map(|(k, _)| k.clone());
            break last.expect("the other backend is in sync");
        }
        assert!(down.len() < 2, "both backends left: {states:?}");
        assert!(Instant::now() < deadline, "no backend left: {states:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let gone = if last == "pg1" { "pg2" } else { "pg1" };
    // Health checks keep failing on the last one; it stays.
    let logged = Instant::now() + Duration::from_secs(30);
    while !s.chorus.log().contains("the last in-sync backend failed") {
        assert!(Instant::now() < logged, "{}", s.chorus.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.chorus.states().get(&last).map(String::as_str), Some("in_sync"));
    for srv in &mut s.servers {
        srv.restart().await.unwrap();
    }
    // Back without an operator: the last in-sync backend serves again.
    let c = s.client().await;
    c.batch_execute("INSERT INTO moves (src, dst, amount) VALUES (3, 3, 3)").await.unwrap();
    let n: i64 = c.query_one("SELECT count(*) FROM moves WHERE amount IN (1, 3)", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
    // The one that left first left as `down`: answering again, it is caught up from the
    // history on its own (auto_catch_up), the INSERT it missed included.
    s.wait_state(gone, "in_sync").await;
    // The state is written before it takes effect, and logged after: the line is awaited.
    let logged = Instant::now() + Duration::from_secs(10);
    while !s.chorus.log().contains("caught up from the update history") {
        assert!(Instant::now() < logged, "{}", s.chorus.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.assert_identical().await;
    let (ok, out) = s.chorus.verify();
    assert!(ok, "{out}");
}

/// A COMMIT that arrives while the transaction's last write is still in flight waits until
/// every backend has answered that write. A backend that stops answering (SIGSTOP) leaves
/// after `backend_timeout`, and the COMMIT then goes at once: it used to wait for an event
/// that never came, holding its write locks until idle_in_transaction_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_behind_a_stopped_backend_goes_when_it_times_out() {
    let s = setup(2, "backend_timeout = \"1s\"", PgOptions::default()).await;
    let c = s.client().await;
    c.batch_execute("BEGIN; UPDATE acct SET bal = bal - 5 WHERE id = 1").await.unwrap();
    s.servers[1].pause();
    // Two Query messages back to back: the COMMIT is read while the UPDATE waits for pg2.
    let write = c.simple_query("UPDATE acct SET bal = bal + 5 WHERE id = 2");
    let commit = c.batch_execute("COMMIT");
    let (write, commit) =
        tokio::time::timeout(Duration::from_secs(20), futures::future::join(write, commit)).await.expect("the COMMIT never went");
    write.unwrap();
    commit.unwrap();
    s.wait_state("pg2", "down").await;
    let l = s.servers[0].local_client("postgres").await.unwrap();
    let bal: Vec<i64> =
        l.query("SELECT bal FROM acct WHERE id IN (1, 2) ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(bal, [995, 1005]);
    // Resumed, pg2 is caught up from the update history; then every backend is equal.
    s.servers[1].resume();
    s.wait_state("pg2", "in_sync").await;
    assert_in_sync_and_equal(&s, 2).await;
}
