//! Chorus killed (SIGKILL) twenty times at random moments under a load of transfers, and
//! started again after each: the update history completes every unit that committed on some
//! backends only, so the backends are identical every time and no acknowledged commit is lost.
//!
//! The load: 16 sessions over 3 backends, each doing in turn an explicit transaction (two
//! updates and an insert, extended protocol), an autocommit prepared insert, and an
//! autocommit COPY. Every row a session inserts carries (session, number), so what was
//! acknowledged can be looked up on every backend afterwards. No sequence is used: a unit
//! whose statements ran on a backend that lost its commit drew sequence values there (the
//! documented limit), which is a different test.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::SinkExt;

const SESSIONS: i32 = 16;
const ACCOUNTS: i32 = 200;

/// One session's loop until `stop` or its connection dies; each (session, n) it was told
/// committed goes into `acked`.
async fn transfers(conn: String, w: i32, first: i32, stop: Arc<AtomicBool>, acked: Arc<Mutex<BTreeSet<(i32, i32)>>>) {
    let Ok((mut c, connection)) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await else { return };
    tokio::spawn(connection);
    let Ok(insert) = c.prepare("INSERT INTO moves (w, n, src, dst, amount) VALUES ($1, $2, $3, $4, 0)").await else { return };
    let mut n = first;
    let mut x = (w as u32).wrapping_mul(2654435761).wrapping_add(first as u32);
    while !stop.load(Ordering::Acquire) {
        x = x.wrapping_mul(1664525).wrapping_add(1013904223);
        let (a, b) = (1 + (x >> 8) as i32 % ACCOUNTS, 1 + (x >> 20) as i32 % ACCOUNTS);
        n += 1;
        let ok = match n % 3 {
            0 => async {
                let tx = c.transaction().await?;
                tx.execute("UPDATE acct SET bal = bal - 1 WHERE id = $1", &[&a]).await?;
                tx.execute("UPDATE acct SET bal = bal + 1 WHERE id = $1", &[&b]).await?;
                tx.execute("INSERT INTO moves (w, n, src, dst, amount) VALUES ($1, $2, $3, $4, 1)", &[&w, &n, &a, &b]).await?;
                tx.commit().await
            }
            .await
            .is_ok(),
            1 => c.execute(&insert, &[&w, &n, &a, &b]).await.is_ok(),
            _ => async {
                let sink = c.copy_in("COPY moves (w, n, src, dst, amount) FROM STDIN").await?;
                futures::pin_mut!(sink);
                sink.send(bytes::Bytes::from(format!("{w}\t{n}\t{a}\t{b}\t0\n"))).await?;
                sink.finish().await.map(|_| ())
            }
            .await
            .is_ok(),
        };
        if ok {
            acked.lock().unwrap().insert((w, n));
        } else if c.is_closed() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_kills_of_chorus_lose_nothing_and_leave_identical_backends() {
    let mut s = Setup::with(3, ChorusOptions { extra: "backend_timeout = \"60s\"".into(), ..Default::default() }).await;
    let c = s.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL); \
         INSERT INTO acct SELECT g, 1000 FROM generate_series(1, {ACCOUNTS}) g ORDER BY g; \
         CREATE TABLE moves (w int, n int, src int, dst int, amount int, PRIMARY KEY (w, n))"
    ))
    .await
    .unwrap();
    drop(c);
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let line = "recovered a unit the backend lacked";
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    for round in 0..20 {
        let stop = Arc::new(AtomicBool::new(false));
        let conn = s.chorus.conn_str(APP_USER, "postgres");
        let load: Vec<_> = (0..SESSIONS)
            .map(|w| tokio::spawn(transfers(conn.clone(), w, round * 1_000_000, stop.clone(), acked.clone())))
            .collect();
        // A random moment 100 to 900 ms into the load.
        seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
        tokio::time::sleep(Duration::from_millis(100 + (seed >> 8) as u64 % 800)).await;
        s.chorus.kill();
        stop.store(true, Ordering::Release);
        for t in load {
            let _ = t.await;
        }
        s.chorus.launch().await.expect("chorus starts again");
        let states = s.chorus.states();
        assert!(states.values().all(|v| v == "in_sync"), "round {round}: {states:?}\n{}", s.chorus.log());
        s.assert_identical().await;
        let (ok, out) = s.chorus.verify();
        assert!(ok, "round {round}: {out}");
    }
    // Every acknowledged commit is on every backend; the money is all there.
    let acked = acked.lock().unwrap().clone();
    for srv in &s.servers {
        let l = srv.local_client("postgres").await.unwrap();
        let rows: BTreeSet<(i32, i32)> =
            l.query("SELECT w, n FROM moves", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
        let lost: Vec<_> = acked.difference(&rows).take(5).collect();
        assert!(lost.is_empty(), "acknowledged commits missing on port {}: {lost:?}", srv.port());
        let total: i64 = l.query_one("SELECT sum(bal)::bigint FROM acct", &[]).await.unwrap().get(0);
        assert_eq!(total, 1000 * ACCOUNTS as i64);
    }
    let recovered = s.chorus.log().matches(line).count();
    eprintln!("20 kills: {} commits acknowledged, {recovered} units recovered at restarts", acked.len());
}
