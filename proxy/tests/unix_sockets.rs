//! Backends on Unix-domain sockets: a backend `host` that is a directory (as libpq, PgBouncer
//! and pgpool-II take it), for PostgreSQL on Chorus's own host. Sessions, health checks, the
//! catalog, the update history, cancel and reconnection all go over the servers' sockets;
//! pgbench writes through Chorus, and the backends end equal.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{await_row, sh, ChorusOptions, PgOptions, PgServer, Setup, APP_USER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_on_unix_domain_sockets() {
    let mut servers = Vec::new();
    for _ in 0..2 {
        servers.push(PgServer::start(PgOptions::default()).await.expect("start postgres"));
    }
    let refs: Vec<&PgServer> = servers.iter().collect();
    let chorus = common::ChorusProcess::start_over(common::chorus_bin(), &refs, ChorusOptions::default(), true).await.unwrap();
    let s = Setup { servers, chorus };
    let conn = s.chorus.conn_str(APP_USER, "postgres");
    let (ok, out) = sh(Command::new("pgbench").args(["-i", "-q", "-s", "1"]).arg(&conn));
    assert!(ok, "{out}");
    let (ok, out) = sh(Command::new("pgbench").args(["-n", "-b", "tpcb-like", "-c", "4", "-j", "2", "-T", "3"]).arg(&conn));
    assert!(ok && out.contains("number of failed transactions: 0"), "{out}");
    // Every connection of Chorus's to either server came in over its socket: no client address.
    let over_tcp = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
                    AND usename = 'app' AND client_addr IS NOT NULL";
    let over_socket = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
                       AND usename = 'app' AND client_addr IS NULL AND pid <> pg_backend_pid()";
    let held = s.client().await;
    held.batch_execute("SELECT 1").await.unwrap();
    for srv in &s.servers {
        let local = srv.local_client("postgres").await.unwrap();
        let tcp: i64 = local.query_one(over_tcp, &[]).await.unwrap().get(0);
        let socket: i64 = local.query_one(over_socket, &[]).await.unwrap().get(0);
        assert_eq!(tcp, 0, "port {}", srv.port());
        assert!(socket >= 1, "port {}: {socket}", srv.port());
    }
    // A client's CancelRequest reaches the backends over their sockets.
    let sleeper = s.client().await;
    let token = sleeper.cancel_token();
    let sleeping = tokio::spawn(async move { sleeper.batch_execute("SELECT pg_sleep(30)").await });
    let active = "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'";
    let _: i32 = await_row(&s.servers[0], active, &[], "the sleep never ran").await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(20), sleeping).await.expect("cancelled").unwrap().expect_err("cancelled");
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
    // A session's connection ended on one healthy server is made again over the socket.
    let lone = s.client().await;
    lone.batch_execute("SET application_name = 'lone'").await.unwrap();
    let killed: i32 =
        await_row(&s.servers[1], "SELECT pid FROM pg_stat_activity WHERE application_name = 'lone'", &[], "lone").await;
    let admin = s.servers[1].local_client("postgres").await.unwrap();
    admin.query_one("SELECT pg_terminate_backend($1)", &[&killed]).await.unwrap();
    let again = "SELECT pid FROM pg_stat_activity WHERE application_name = 'lone' AND pid <> $1";
    let _: i32 = await_row(&s.servers[1], again, &[&killed], "never made again").await;
    let n: i64 = lone.query_one("SELECT count(*) FROM pgbench_branches", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    let states = s.chorus.states();
    assert!(states.values().all(|v| v == "in_sync"), "{states:?}\n{}", s.chorus.log());
    let (ok, out) = s.chorus.verify();
    assert!(ok, "{out}");
}
