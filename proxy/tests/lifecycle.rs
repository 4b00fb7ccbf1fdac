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
