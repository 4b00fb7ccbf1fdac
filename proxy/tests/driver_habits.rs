//! What other ecosystems' drivers do on the wire, compared message by message with a direct
//! connection to PostgreSQL: Flush without Sync then a simple query, a Bind of a statement that
//! does not exist, COPY messages outside COPY, the process id in BackendKeyData, a session that
//! ends inside a DDL transaction, LISTEN then NOTIFY at once.

mod common;

use std::time::Duration;

use common::{ChorusOptions, PgOptions, PgServer, Setup, APP_USER};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;

/// Two trusting servers and Chorus in front (trust: the raw client below does no SCRAM), and
/// a third server alone, for the direct answers.
async fn setup() -> (Setup, PgServer) {
    let trust = PgOptions { trust: true, ..PgOptions::default() };
    let mut servers = Vec::new();
    for _ in 0..2 {
        servers.push(PgServer::start(trust.clone()).await.unwrap());
    }
    let refs: Vec<&PgServer> = servers.iter().collect();
    let opts = ChorusOptions { auth: "trust", extra: String::new() };
    let chorus = common::ChorusProcess::start(common::chorus_bin(), &refs, opts).await.unwrap();
    let s = Setup { servers, chorus };
    s.client().await.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    let direct = PgServer::start(trust).await.unwrap();
    direct.local_client("postgres").await.unwrap().batch_execute("CREATE TABLE t (v int)").await.unwrap();
    (s, direct)
}

type Msg = (u8, Vec<u8>);

/// A client that speaks the protocol by hand.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Logs in (trust) and returns the startup messages up to ReadyForQuery.
    async fn connect(port: u16, app: &str) -> (Raw, Vec<Msg>) {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let pkt = common::startup_packet(196_608, &[("user", APP_USER.0), ("database", "postgres"), ("application_name", app)]);
        let mut r = Raw { s, buf: Vec::new() };
        r.send(&pkt).await;
        let msgs = r.until_ready().await;
        (r, msgs)
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    async fn next(&mut self) -> Msg {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    let body = self.buf[5..1 + len].to_vec();
                    self.buf.drain(..1 + len);
                    return (tag, body);
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut chunk))
                .await
                .expect("no answer within 10 s")
                .unwrap();
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn take(&mut self, n: usize) -> Vec<Msg> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(self.next().await);
        }
        v
    }

    async fn until_ready(&mut self) -> Vec<Msg> {
        let mut v = Vec::new();
        loop {
            let m = self.next().await;
            let done = m.0 == b'Z';
            v.push(m);
            if done {
                return v;
            }
        }
    }
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cstr(parts: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p.as_bytes());
        v.push(0);
    }
    v
}

fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &cstr(&[sql]))
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = cstr(&[name, sql]);
    b.extend_from_slice(&0u16.to_be_bytes());
    msg(b'P', &b)
}

fn bind(portal: &str, stmt: &str) -> Vec<u8> {
    let mut b = cstr(&[portal, stmt]);
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    msg(b'B', &b)
}

fn describe_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend_from_slice(&cstr(&[name]));
    msg(b'D', &b)
}

fn execute() -> Vec<u8> {
    let mut b = cstr(&[""]);
    b.extend_from_slice(&0i32.to_be_bytes());
    msg(b'E', &b)
}

const SYNC: &[u8] = b"S\0\0\0\x04";
const FLUSH: &[u8] = b"H\0\0\0\x04";

/// Message tags, with the SQLSTATE of each ErrorResponse, for comparing two servers' answers.
fn shape(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|(t, _)| !matches!(t, b'N' | b'S'))
        .map(|(t, b)| match t {
            b'E' => {
                let code = b.split(|&c| c == 0).find_map(|f| f.strip_prefix(b"C")).unwrap_or_default();
                format!("E{}", String::from_utf8_lossy(code))
            }
            _ => (*t as char).to_string(),
        })
        .collect()
}

/// Runs `script` on a fresh raw session through Chorus and directly on a server of its own;
/// returns both answers' shapes.
async fn both<F, Fut>(s: &Setup, direct: &PgServer, script: F) -> (Vec<String>, Vec<String>)
where
    F: Fn(Raw) -> Fut,
    Fut: std::future::Future<Output = Vec<Msg>>,
{
    let (c, _) = Raw::connect(s.chorus.port(), "raw").await;
    let through = script(c).await;
    let (d, _) = Raw::connect(direct.port(), "raw").await;
    let direct = script(d).await;
    (shape(&through), shape(&direct))
}

fn assert_in_sync(s: &Setup) {
    let states = s.chorus.states();
    assert!(states.values().all(|v| v == "in_sync"), "{states:?}\n{}", s.chorus.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_without_sync_then_a_simple_query() {
    let (s, d) = setup().await;
    for q in ["SELECT 2", "INSERT INTO t VALUES (1)", "CREATE TABLE f_ddl (a int)"] {
        let script = |mut r: Raw| async move {
            // asyncpg's and node-postgres's prepare: Parse, Describe, Flush; read the description.
            r.send(&[parse("", "SELECT $1::int"), describe_statement(""), FLUSH.to_vec()].concat()).await;
            let mut out = r.take(3).await;
            r.send(&query(q)).await;
            out.extend(r.until_ready().await);
            r.send(&query("SELECT 3")).await;
            out.extend(r.until_ready().await);
            out
        };
        let (through, direct) = both(&s, &d, script).await;
        assert_eq!(through, direct, "after {q}");
        assert_eq!(direct[..3], ["1", "t", "T"]);
    }
    let c = s.client().await;
    assert_eq!(c.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get::<_, i64>(0), 1);
    c.batch_execute("DROP TABLE f_ddl").await.unwrap();
    assert_in_sync(&s);
    s.assert_identical().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_corners_answer_as_postgres_does() {
    let (s, d) = setup().await;
    // A Bind of a statement that does not exist: 26000, not a deadlock.
    let (through, direct) = both(&s, &d, |mut r: Raw| async move {
        r.send(&[bind("", "nosuch"), execute(), SYNC.to_vec()].concat()).await;
        r.until_ready().await
    })
    .await;
    assert_eq!(through, direct);
    assert_eq!(direct, ["E26000", "Z"]);
    // The same with a parameter in binary format and a result format, inside a transaction.
    let (through, direct) = both(&s, &d, |mut r: Raw| async move {
        let mut b = cstr(&["", "nosuch"]);
        b.extend_from_slice(&[0, 1, 0, 1, 0, 1, 0, 0, 0, 4, 0, 0, 0, 5, 0, 1, 0, 1]);
        r.send(&query("BEGIN")).await;
        let mut out = r.until_ready().await;
        r.send(&[msg(b'B', &b), execute(), SYNC.to_vec()].concat()).await;
        out.extend(r.until_ready().await);
        r.send(&query("ROLLBACK")).await;
        out.extend(r.until_ready().await);
        out
    })
    .await;
    assert_eq!(through, direct);
    assert_eq!(direct, ["C", "Z", "E26000", "Z", "C", "Z"]);
    // COPY messages outside COPY are ignored.
    let (through, direct) = both(&s, &d, |mut r: Raw| async move {
        r.send(&[msg(b'd', b"1\n"), msg(b'c', b""), msg(b'f', b"oops\0"), query("SELECT 1")].concat()).await;
        r.until_ready().await
    })
    .await;
    assert_eq!(through, direct);
    assert_eq!(direct, ["T", "D", "C", "Z"]);
    // A pipeline of Parse/Bind/Execute without Sync or Flush: the server runs it as it
    // arrives, and a Sync later answers all of it.
    let (through, direct) = both(&s, &d, |mut r: Raw| async move {
        r.send(&[parse("", "INSERT INTO t VALUES (7)"), bind("", ""), execute()].concat()).await;
        r.send(SYNC).await;
        r.until_ready().await
    })
    .await;
    assert_eq!(through, direct);
    assert_eq!(direct, ["1", "2", "C", "Z"]);
    // Without the Sync, the server has run the INSERT already (its implicit transaction holds
    // the table's lock) on every backend, as it has directly.
    let (mut r, _) = Raw::connect(s.chorus.port(), "nosync").await;
    let (mut q, _) = Raw::connect(d.port(), "nosync").await;
    for raw in [&mut r, &mut q] {
        raw.send(&[parse("", "INSERT INTO t VALUES (8)"), bind("", ""), execute()].concat()).await;
    }
    for srv in [&s.servers[0], &s.servers[1], &d] {
        let c = srv.local_client("postgres").await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let n: i64 = c
                .query_one("SELECT count(*) FROM pg_locks WHERE relation = 't'::regclass AND mode = 'RowExclusiveLock'", &[])
                .await
                .unwrap()
                .get(0);
            if n > 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the INSERT sent without Sync never ran on port {}", srv.port());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for raw in [&mut r, &mut q] {
        raw.send(SYNC).await;
        assert_eq!(shape(&raw.until_ready().await), ["1", "2", "C", "Z"]);
    }
    // A statement Chorus must refuse in a later part of a batch sent without Sync: the batch
    // fails from there as a failing statement would fail it, the session goes on, and the
    // error carries no PL/pgSQL context line.
    r.send(&[parse("", "INSERT INTO t VALUES (9)"), bind("", ""), execute()].concat()).await;
    r.send(&[parse("", "UPDATE t SET v = random() * 10"), bind("", ""), execute(), SYNC.to_vec()].concat()).await;
    let msgs = r.until_ready().await;
    assert_eq!(shape(&msgs), ["1", "2", "C", "E0A000", "Z"]);
    let err = msgs.iter().find(|(t, _)| *t == b'E').unwrap();
    assert!(!err.1.split(|&b| b == 0).any(|f| f.starts_with(b"W")), "{:?}", String::from_utf8_lossy(&err.1));
    r.send(&query("SELECT count(*) FROM t WHERE v = 9")).await;
    let msgs = r.until_ready().await;
    assert_eq!(shape(&msgs), ["T", "D", "C", "Z"]);
    assert!(msgs[1].1.ends_with(b"0"), "the batch's INSERT was rolled back");
    assert_in_sync(&s);
    s.assert_identical().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_key_data_carries_the_lead_process_id() {
    let (s, _d) = setup().await;
    let (mut r, startup) = Raw::connect(s.chorus.port(), "pidcheck").await;
    let key = startup.iter().find(|(t, _)| *t == b'K').expect("BackendKeyData");
    let pid = i32::from_be_bytes([key.1[0], key.1[1], key.1[2], key.1[3]]);
    let lead = s.servers[0].local_client("postgres").await.unwrap();
    let app: String =
        lead.query_one("SELECT application_name FROM pg_stat_activity WHERE pid = $1", &[&pid]).await.unwrap().get(0);
    assert_eq!(app, "pidcheck");
    // pg_backend_pid() through the session, served by the lead, agrees.
    r.send(&query("BEGIN; SELECT pg_backend_pid(); COMMIT")).await;
    let msgs = r.until_ready().await;
    let row = msgs.iter().find(|(t, _)| *t == b'D').expect("a row");
    let text = String::from_utf8_lossy(&row.1[6..]).to_string();
    let other = s.servers[1].local_client("postgres").await.unwrap();
    let pid2: i32 =
        other.query_one("SELECT pid FROM pg_stat_activity WHERE application_name = 'pidcheck'", &[]).await.unwrap().get(0);
    assert!(text == pid.to_string() || text == pid2.to_string(), "{text} is the process id of neither backend");
    assert_in_sync(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_ends_inside_ddl_blocks_no_later_write() {
    let (s, _d) = setup().await;
    let writer = s.client().await;
    // Quits (Terminate), drops its socket, terminates itself (the same FATAL from every
    // server: the session ends), or loses its connection to one server (the transaction is
    // rolled back with 40001 and the session goes on).
    for how in ["quit", "drop", "terminated", "lost_one"] {
        let table = format!("ddl_{how}");
        match how {
            "quit" => {
                let c = s.client().await;
                c.batch_execute(&format!("BEGIN; CREATE TABLE {table} (a int)")).await.unwrap();
                drop(c);
            }
            "drop" => {
                let (mut r, _) = Raw::connect(s.chorus.port(), "ddl").await;
                r.send(&query(&format!("BEGIN; CREATE TABLE {table} (a int)"))).await;
                r.until_ready().await;
                drop(r);
            }
            "terminated" => {
                let c = s.client().await;
                c.batch_execute(&format!("BEGIN; CREATE TABLE {table} (a int)")).await.unwrap();
                let e = c.batch_execute("SELECT pg_terminate_backend(pg_backend_pid())").await.expect_err("ended");
                assert_eq!(e.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{e:?}");
                assert!(c.is_closed() || c.batch_execute("SELECT 1").await.is_err(), "the session ended");
            }
            _ => {
                let c = s.client().await;
                c.batch_execute(&format!("SET application_name = 'doomed'; BEGIN; CREATE TABLE {table} (a int)")).await.unwrap();
                let d = s.servers[1].local_client("postgres").await.unwrap();
                let pid: i32 =
                    d.query_one("SELECT pid FROM pg_stat_activity WHERE application_name = 'doomed'", &[]).await.unwrap().get(0);
                let done: bool = d.query_one("SELECT pg_terminate_backend($1, 10000)", &[&pid]).await.unwrap().get(0);
                assert!(done, "the session's connection on that server ended");
                // The next write reaches the lost connection: the transaction is rolled back
                // everywhere and the client is told to retry it, as after a serialization failure.
                let e = c.batch_execute("INSERT INTO t VALUES (2)").await.expect_err("the transaction was rolled back");
                assert_eq!(e.code(), Some(&SqlState::T_R_SERIALIZATION_FAILURE), "{e:?}");
                c.batch_execute("ROLLBACK").await.unwrap();
                let one: i32 = c.query_one("SELECT 1", &[]).await.expect("the session goes on").get(0);
                assert_eq!(one, 1);
            }
        }
        let write = writer.execute("INSERT INTO t VALUES (1)", &[]);
        let n = tokio::time::timeout(Duration::from_secs(5), write).await.expect("a later write waited").unwrap();
        assert_eq!(n, 1, "after the session that {how}");
        let exists: bool = writer.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await.unwrap().get(0);
        assert!(!exists, "the DDL of the session that {how} was rolled back");
    }
    assert_in_sync(&s);
    s.assert_identical().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_then_notify_loses_and_repeats_nothing_in_200_rounds() {
    let (s, _d) = setup().await;
    let (listener, mut conn) =
        tokio_postgres::connect(&s.chorus.conn_str(APP_USER, "postgres"), tokio_postgres::NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    let notifier = s.client().await;
    for round in 0..200 {
        let channel = format!("ch{round}");
        listener.batch_execute(&format!("LISTEN {channel}")).await.unwrap();
        for i in 0..3 {
            notifier.batch_execute(&format!("NOTIFY {channel}, '{i}'")).await.unwrap();
        }
        for i in 0..3 {
            let got =
                tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("a notification went missing").unwrap();
            assert_eq!(got, (channel.clone(), i.to_string()), "round {round}");
        }
        listener.batch_execute(&format!("UNLISTEN {channel}")).await.unwrap();
    }
    // Nothing more arrives: none was delivered twice.
    listener.batch_execute("SELECT 1").await.unwrap();
    assert!(rx.try_recv().is_err());
    assert_in_sync(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_select_from_a_series_numbers_rows_alike() {
    let (s, _d) = setup().await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE items (id serial PRIMARY KEY, name text, qty int)").await.unwrap();
    for sql in [
        "insert into items(name, qty) select 'item' || g, g from generate_series(1, 1000) g",
        "insert into items(name, qty) select 'item' || g, g from generate_series(1, 1000) g order by g",
        "insert into items(name, qty) select 'item' || g, g from generate_series(1, 1000) g order by 1, 2",
    ] {
        assert_eq!(c.execute(sql, &[]).await.unwrap(), 1000, "{sql}");
    }
    // What can really differ is still refused.
    let e = c.execute("insert into items(name, qty) select name, qty from items order by name", &[]).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e}");
    let row: (i64, i64) = {
        let r = c.query_one("SELECT count(*), sum(id * qty) FROM items", &[]).await.unwrap();
        (r.get(0), r.get::<_, Option<i64>>(1).unwrap())
    };
    assert_eq!(row.0, 3000);
    assert_in_sync(&s);
    s.assert_identical().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamed_statement_a_read_parsed_on_one_backend_is_bound_on_all() {
    let (s, d) = setup().await;
    let script = |mut r: Raw| async move {
        // A read outside a transaction runs on one backend, and so does its Parse. Prepared
        // statements open and end transactions (a simple Query would destroy the unnamed
        // statement); in between, the unnamed statement is bound again without a Parse, where
        // every backend runs it (REPEATABLE READ), then where the lead alone does.
        let named = |name: &str| [bind("", name), execute(), SYNC.to_vec()].concat();
        r.send(&[parse("", "SELECT count(*) FROM t"), bind("", ""), execute(), SYNC.to_vec()].concat()).await;
        let mut out = r.until_ready().await;
        r.send(
            &[parse("rr", "BEGIN ISOLATION LEVEL REPEATABLE READ"), parse("rc", "BEGIN"), parse("c", "COMMIT"), SYNC.to_vec()]
                .concat(),
        )
        .await;
        out.extend(r.until_ready().await);
        for begin in ["rr", "rc"] {
            for name in [begin, "", "c"] {
                r.send(&named(name)).await;
                out.extend(r.until_ready().await);
            }
        }
        out
    };
    let (through, direct) = both(&s, &d, script).await;
    assert_eq!(through, direct);
    let round = ["2", "C", "Z", "2", "D", "C", "Z", "2", "C", "Z"];
    assert_eq!(direct, [&["1", "2", "D", "C", "Z", "1", "1", "1", "Z"][..], &round, &round].concat());
    assert_in_sync(&s);
    s.assert_identical().await;
}

/// libpq's pipeline mode, message by message (what psycopg's `conn.pipeline()` sends): Parse,
/// Bind, Describe, Execute per statement with no Sync, a Flush to read the results so far, then
/// one Sync followed by a Flush; in autocommit (the writes' results come before the Sync), in a
/// transaction opened by a simple BEGIN and ended by a simple COMMIT, and with an error in the
/// middle (PostgreSQL skips the rest up to the Sync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_pipeline_mode_is_answered_message_by_message() {
    let (s, d) = setup().await;
    let stmt = |sql: &str| [parse("", sql), bind("", ""), msg(b'D', b"P\0"), execute()].concat();
    let (through, direct) = both(&s, &d, |mut r: Raw| async move {
        r.send(
            &[stmt("INSERT INTO t VALUES (41) RETURNING v"), stmt("INSERT INTO t VALUES (42) RETURNING v"), FLUSH.to_vec()]
                .concat(),
        )
        .await;
        // Both inserts answered before any Sync: the pipeline reads them, then syncs.
        let mut out = r.take(10).await;
        r.send(&[SYNC, FLUSH].concat()).await;
        out.extend(r.until_ready().await);
        out
    })
    .await;
    assert_eq!(through, direct);
    assert_eq!(direct, ["1", "2", "T", "D", "C", "1", "2", "T", "D", "C", "Z"]);
    let (through, direct) = both(&s, &d, |mut r: Raw| async move {
        r.send(&query("BEGIN")).await;
        let mut out = r.until_ready().await;
        r.send(
            &[stmt("INSERT INTO t VALUES (43)"), stmt("SELECT count(*) FROM t WHERE v > 40"), SYNC.to_vec(), FLUSH.to_vec()]
                .concat(),
        )
        .await;
        out.extend(r.until_ready().await);
        r.send(&query("COMMIT")).await;
        out.extend(r.until_ready().await);
        out
    })
    .await;
    assert_eq!(through, direct);
    assert_eq!(direct, ["C", "Z", "1", "2", "n", "C", "1", "2", "T", "D", "C", "Z", "C", "Z"]);
    let (through, direct) = both(&s, &d, |mut r: Raw| async move {
        r.send(&[stmt("SELECT 1 / 0"), stmt("INSERT INTO t VALUES (44)"), SYNC.to_vec(), FLUSH.to_vec()].concat()).await;
        let mut out = r.until_ready().await;
        r.send(&[stmt("SELECT 2"), SYNC.to_vec(), FLUSH.to_vec()].concat()).await;
        out.extend(r.until_ready().await);
        out
    })
    .await;
    assert_eq!(through, direct);
    // PostgreSQL folds 1 / 0 when it plans the statement, at the Bind.
    assert_eq!(direct, ["1", "E22012", "Z", "1", "2", "T", "D", "C", "Z"]);
    let c = s.client().await;
    let n: i64 = c.query_one("SELECT count(*) FROM t WHERE v > 40", &[]).await.unwrap().get(0);
    assert_eq!(n, 3, "41, 42, 43; 44 skipped after the error");
    assert_in_sync(&s);
    s.assert_identical().await;
}
