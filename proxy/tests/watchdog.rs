//! Supervision by systemd (issue 29, point 8): with NOTIFY_SOCKET and WATCHDOG_USEC set as
//! systemd sets them for `Type=notify` with `WatchdogSec`, Chorus says READY=1 once it serves
//! and beats while its accept loop, health checks and lock manager make progress; when its
//! accept loop is blocked on purpose the heartbeats stop (systemd would restart it).

mod common;

use std::time::{Duration, Instant};

use common::{ChorusOptions, ChorusProcess, PgOptions, PgServer};
use tokio::net::UnixDatagram;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_then_heartbeats_while_it_works_and_none_once_the_accept_loop_is_stuck() {
    let srv = PgServer::start(PgOptions::default()).await.expect("start postgres");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let env = [
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ("WATCHDOG_USEC", "1000000"),
        // The accept loop blocks its thread 6 s after Chorus serves.
        ("CHORUS_TEST_WEDGE_ACCEPT_AFTER_MS", "6000"),
    ];
    let chorus = ChorusProcess::start_env(common::chorus_bin(), &[&srv], ChorusOptions::default(), &env).await.expect("start");
    let mut buf = vec![0u8; 4096];
    let mut recv = async || -> Option<String> {
        match tokio::time::timeout(Duration::from_secs(4), sock.recv(&mut buf)).await {
            Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).trim_end().to_string()),
            _ => None,
        }
    };
    // READY=1 once the client port is open (a heartbeat may come first).
    let ready = loop {
        let m = recv().await.expect("READY=1");
        if m != "WATCHDOG=1" {
            break m;
        }
    };
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.contains("STATUS=serving"), "{ready:?}");
    assert!(chorus.client().await.is_ok(), "READY=1 came before Chorus served");
    // Heartbeats about every half second while it works (and a client does some work).
    let c = chorus.client().await.unwrap();
    let t0 = Instant::now();
    let mut beats = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        let m = recv().await.expect("a heartbeat");
        assert_eq!(m, "WATCHDOG=1");
        beats += 1;
        c.batch_execute("SELECT 1").await.unwrap();
    }
    assert!(beats >= 4, "{beats} heartbeats in 3 s");
    // Once the accept loop is stuck, no heartbeat comes any more.
    let mut last = Instant::now();
    while let Some(m) = recv().await {
        assert_eq!(m, "WATCHDOG=1");
        last = Instant::now();
        assert!(t0.elapsed() < Duration::from_secs(30), "heartbeats never stopped");
    }
    assert!(last.elapsed() >= Duration::from_secs(4));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !chorus.log().contains("no watchdog heartbeat") {
        assert!(Instant::now() < deadline, "{}", chorus.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        chorus.log().contains("stalled=\"the accept loop\"") || chorus.log().contains("stalled=the accept loop"),
        "{}",
        chorus.log()
    );
}
