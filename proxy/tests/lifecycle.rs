//! Startup failures say one clear line and exit non-zero; SIGTERM lets open transactions
//! finish, ends idle sessions with 57P03 and exits 0.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{chorus_bin, sh, ChorusOptions, ChorusProcess, PgOptions, PgServer, Setup};

fn run_with_config(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text.replace("DATA", &dir.path().join("data").display().to_string())).unwrap();
    sh(Command::new(chorus_bin()).arg("--config").arg(&path).env("CHORUS_LOG", "off"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_failures_are_one_clear_line() {
    let pg = PgServer::start(PgOptions::default()).await.unwrap();
    let good = ChorusProcess::config(0, std::path::Path::new("DATA"), &[&pg], &ChorusOptions::default());

    let (ok, out) = run_with_config(&format!("colour = \"blue\"\n{good}"));
    assert!(!ok);
    assert!(
        out.starts_with("chorus: error: invalid config file") && out.contains("colour") && out.trim().lines().count() == 1,
        "{out}"
    );

    let (ok, out) = sh(Command::new(chorus_bin()).args(["--config", "/nonexistent/chorus.toml"]));
    assert!(!ok && out.contains("cannot read config file"), "{out}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (ok, out) = run_with_config(&good.replace("127.0.0.1:0", &format!("127.0.0.1:{port}")));
    assert!(!ok && out.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{out}");

    let dead = chorus_testkit::free_port().unwrap();
    let (ok, out) = run_with_config(&good.replace(&format!("port = {}", pg.port()), &format!("port = {dead}")));
    assert!(!ok && out.contains("no reachable in-sync backend"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_transactions_finish() {
    let mut s = Setup::with(2, ChorusOptions { extra: "shutdown_timeout = \"20s\"\n".into(), ..Default::default() }).await;
    let setup = s.client().await;
    setup.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    let idle = s.client().await;
    let busy = s.client().await;
    busy.batch_execute("BEGIN; INSERT INTO t VALUES (1);").await.unwrap();
    let pid = s.chorus.pid().unwrap() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    // The idle session is ended (with 57P03); wait until its connection is gone.
    for _ in 0..400 {
        if idle.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let err = idle.simple_query("SELECT 1").await.unwrap_err();
    assert!(err.is_closed() || err.code().map(|c| c.code()) == Some("57P03"), "{err}");
    // New clients are refused.
    let conn = s.chorus.conn_str(common::APP_USER, "postgres");
    assert!(tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.is_err(), "a client was admitted during shutdown");
    // The open transaction finishes and commits on every backend.
    busy.batch_execute("INSERT INTO t VALUES (2); COMMIT;").await.unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let st = s.chorus.wait_exit(Duration::from_secs(15));
        (st, s)
    })
    .await
    .unwrap();
    assert_eq!(status.0.map(|st| st.success()), Some(true), "chorus did not exit 0");
    let s = status.1;
    for srv in &s.servers {
        let n: i64 = srv.local_client("postgres").await.unwrap().query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
        assert_eq!(n, 2);
    }
    s.assert_identical().await;
}

/// Two instances without a group never write one history (contract, "Leadership and
/// fencing"): a second Chorus in front of the same servers refuses to start, naming the holder
/// of the history's writer lock, and writes nothing; once the first is killed, the second
/// starts and serves, and the backends are equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_same_backends_refuses_to_start() {
    let mut s = Setup::new(2).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)").await.unwrap();
    let before = (units(&s.servers[0]).await, units(&s.servers[1]).await);
    let refused = ChorusProcess::start(chorus_bin(), &s.refs(), ChorusOptions::default()).await;
    let e = refused.err().expect("a second writer of the same histories started").to_string();
    assert!(
        e.contains("another Chorus instance writes the update history of backend pg")
            && e.contains("client 127.0.0.1:")
            && e.contains("run two instances only as a group ([ha])"),
        "{e}"
    );
    assert_eq!((units(&s.servers[0]).await, units(&s.servers[1]).await), before, "the refused instance wrote nothing");
    // The first one dies: its lock goes with its connections, and the second one starts.
    s.chorus.kill();
    let second = ChorusProcess::start(chorus_bin(), &s.refs(), ChorusOptions::default()).await.expect("the second starts");
    let (c2, conn) =
        tokio_postgres::connect(&second.conn_str(common::APP_USER, "postgres"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c2.execute("INSERT INTO t VALUES (2)", &[]).await.expect("the second instance serves writes");
    s.assert_identical().await;
    let (ok, out) = second.verify();
    assert!(ok, "{out}");
}

/// The units in a server's history.
async fn units(srv: &PgServer) -> i64 {
    let c = srv.local_client("postgres").await.unwrap();
    c.query_one("SELECT count(*) FROM chorus.history", &[]).await.unwrap().get(0)
}
