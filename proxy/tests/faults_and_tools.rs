//! psql and pgbench through Chorus, concurrent writers, a backend killed under load, a backend
//! that disagrees. Each test says what the client saw and what the backends hold.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{sh, ChorusOptions, Setup, APP_USER};

/// pgbench tables compared on every backend, every column of pgbench_history included
/// (its mtime comes from CURRENT_TIMESTAMP).
async fn assert_pgbench_identical(s: &Setup) {
    let mut first = None;
    for srv in &s.servers {
        let c = srv.local_client("postgres").await.unwrap();
        let mut sums = Vec::new();
        for q in [
            "SELECT md5(string_agg(t::text, ',' ORDER BY aid)) FROM pgbench_accounts t",
            "SELECT md5(string_agg(t::text, ',' ORDER BY bid)) FROM pgbench_branches t",
            "SELECT md5(string_agg(t::text, ',' ORDER BY tid)) FROM pgbench_tellers t",
            "SELECT count(*)::text || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '') FROM pgbench_history t",
        ] {
            sums.push(c.query_one(q, &[]).await.unwrap().get::<_, Option<String>>(0));
        }
        match &first {
            None => first = Some(sums),
            Some(f) => assert_eq!(f, &sums, "backend on port {} differs", srv.port()),
        }
    }
}

fn pgbench(s: &Setup, args: &[&str]) -> (bool, String) {
    sh(Command::new("pgbench").args(args).arg(s.chorus.conn_str(APP_USER, "postgres")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_script_and_pgbench() {
    let s = Setup::new(2).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("rows.csv");
    std::fs::write(&csv, (1..=500).map(|i| format!("{i},name {i}\n")).collect::<String>()).unwrap();
    let script = dir.path().join("script.sql");
    std::fs::write(
        &script,
        format!(
            "CREATE TABLE people (id int PRIMARY KEY, name text);\n\\copy people FROM '{}' WITH (FORMAT csv)\n\
             UPDATE people SET name = upper(name) WHERE id % 2 = 0; DELETE FROM people WHERE id > 490; SELECT count(*) FROM people;\n\
             \\copy (SELECT * FROM people ORDER BY id) TO '{}/out.csv' WITH (FORMAT csv)\n",
            csv.display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let (ok, out) = sh(Command::new("psql")
        .arg(s.chorus.conn_str(APP_USER, "postgres"))
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-At", "-f"])
        .arg(&script));
    assert!(ok, "{out}");
    assert!(out.lines().any(|l| l == "490"), "{out}");
    let exported = std::fs::read_to_string(dir.path().join("out.csv")).unwrap();
    assert_eq!(exported.lines().count(), 490);
    assert_eq!(exported.lines().nth(1), Some("2,NAME 2"));

    let (ok, out) = pgbench(&s, &["-i", "-s", "1", "-q"]);
    assert!(ok, "{out}");
    let (ok, out) = pgbench(&s, &["-n", "-b", "tpcb-like", "-c", "4", "-j", "2", "-t", "200"]);
    assert!(ok && out.contains("number of failed transactions: 0"), "{out}");
    let (ok, out) = pgbench(&s, &["-n", "-b", "select-only", "-M", "prepared", "-c", "4", "-j", "2", "-t", "500"]);
    assert!(ok && out.contains("number of failed transactions: 0"), "{out}");
    assert_pgbench_identical(&s).await;
    let history: i64 = s.servers[1]
        .local_client("postgres")
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(history, 800);
    // Every column, pgbench_history.mtime (from CURRENT_TIMESTAMP) included.
    s.assert_identical().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_non_commutative_updates_agree() {
    let s = Setup::new(2).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE hot (id int PRIMARY KEY, v bigint); INSERT INTO hot VALUES (1, 1);").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let client = s.client().await;
        tasks.push(tokio::spawn(async move {
            // Modulo keeps v small; v*3+1 and v+7 do not commute, so order matters.
            let sql = if w % 2 == 0 {
                "UPDATE hot SET v = (v * 3 + 1) % 1000003 WHERE id = 1"
            } else {
                "UPDATE hot SET v = (v + 7) % 1000003 WHERE id = 1"
            };
            let mut n = 0u32;
            while tokio::time::Instant::now() < deadline {
                if w % 4 == 1 {
                    client.batch_execute(&format!("BEGIN; {sql}; COMMIT;")).await.unwrap();
                } else {
                    assert_eq!(client.execute(sql, &[]).await.unwrap(), 1);
                }
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert!(total > 100, "only {total} updates ran");
    s.assert_identical().await;
    assert_eq!(s.chorus.states().values().filter(|v| *v == "in_sync").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_under_pgbench_is_dropped_silently_and_stays_down() {
    // Without the automatic catch-up: a backend that left stays out until asked back (G8).
    let opts = ChorusOptions { extra: "auto_catch_up = false".into(), ..Default::default() };
    let mut s = Setup::with(2, opts).await;
    let (ok, out) = pgbench(&s, &["-i", "-s", "1", "-q"]);
    assert!(ok, "{out}");
    let conn = s.chorus.conn_str(APP_USER, "postgres");
    let bench = std::thread::spawn(move || {
        sh(Command::new("pgbench").args(["-n", "-b", "tpcb-like", "-c", "4", "-j", "2", "-T", "6"]).arg(conn))
    });
    // Kill the second backend once the run is well under way.
    let probe = s.servers[0].local_client("postgres").await.unwrap();
    loop {
        let n: i64 = probe.query_one("SELECT count(*) FROM pgbench_history", &[]).await.unwrap().get(0);
        if n >= 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.servers[1].kill();
    let (ok, out) = bench.join().unwrap();
    // The client saw nothing: no failed transaction, no aborted client.
    assert!(ok, "{out}");
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    assert!(!out.contains("aborted"), "{out}");
    s.wait_state("pg2", "down").await;
    assert_eq!(s.chorus.states().get("pg1").map(String::as_str), Some("in_sync"));
    // The survivor took every transaction pgbench counted.
    let processed: i64 = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|l| l.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .expect("pgbench summary");
    let history: i64 = probe.query_one("SELECT count(*) FROM pgbench_history", &[]).await.unwrap().get(0);
    assert_eq!(history, processed);
    // After restarts of the backend and of Chorus, pg2 stays out (G8).
    s.servers[1].restart().await.unwrap();
    assert_eq!(s.chorus.stop().map(|st| st.success()), Some(true));
    s.chorus.launch().await.unwrap();
    assert_eq!(s.chorus.states().get("pg2").map(String::as_str), Some("down"));
    let c = s.client().await;
    c.batch_execute("UPDATE pgbench_branches SET bbalance = bbalance + 1").await.unwrap();
    let on_pg2: i64 = s.servers[1]
        .local_client("postgres")
        .await
        .unwrap()
        .query_one("SELECT sum(bbalance) FROM pgbench_branches", &[])
        .await
        .unwrap()
        .get(0);
    let on_pg1: i64 = probe.query_one("SELECT sum(bbalance) FROM pgbench_branches", &[]).await.unwrap().get(0);
    assert_ne!(on_pg1, on_pg2, "a down backend received a write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_disagrees_is_ejected_as_diverged() {
    let s = Setup::new(2).await;
    let c = s.client().await;
    c.batch_execute(
        "CREATE TABLE acct (id int PRIMARY KEY, flag bool); INSERT INTO acct SELECT g, false FROM generate_series(1, 10) g;",
    )
    .await
    .unwrap();
    s.assert_identical().await;
    // Behind Chorus's back, pg2 gets one more row that the next UPDATE matches.
    s.servers[1].local_client("postgres").await.unwrap().batch_execute("INSERT INTO acct VALUES (11, false)").await.unwrap();
    // The client's statement succeeds with the lead's row count (a tie goes to the lead).
    let n = c.execute("UPDATE acct SET flag = true WHERE NOT flag", &[]).await.unwrap();
    assert_eq!(n, 10);
    s.wait_state("pg2", "diverged").await;
    assert!(s.chorus.log().contains("backend diverged"), "{}", s.chorus.log());
    // The session goes on against pg1 alone.
    assert_eq!(c.query_one("SELECT count(*) FROM acct WHERE flag", &[]).await.unwrap().get::<_, i64>(0), 10);
    assert_eq!(s.client().await.query_one("SELECT count(*) FROM acct", &[]).await.unwrap().get::<_, i64>(0), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_backend_is_ejected_and_the_client_goes_on() {
    let opts = common::ChorusOptions {
        extra: "backend_timeout = \"1s\"\nhealth_check_timeout = \"500ms\"\nhealth_check_failures = 2\n".into(),
        ..Default::default()
    };
    let s = Setup::with(2, opts).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE h (v int); INSERT INTO h VALUES (1);").await.unwrap();
    // pg2 hangs (SIGSTOP): the write completes on pg1, pg2 lags past backend_timeout and leaves.
    s.servers[1].pause();
    let started = std::time::Instant::now();
    assert_eq!(c.execute("UPDATE h SET v = v + 1", &[]).await.unwrap(), 1);
    assert!(started.elapsed() < Duration::from_secs(10), "the client waited {:?}", started.elapsed());
    s.wait_state("pg2", "down").await;
    assert_eq!(c.query_one("SELECT v FROM h", &[]).await.unwrap().get::<_, i32>(0), 2);
    s.servers[1].resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_find_a_hung_backend_nobody_uses() {
    let opts = common::ChorusOptions {
        extra: "health_check_timeout = \"500ms\"\nhealth_check_failures = 2\n".into(),
        ..Default::default()
    };
    let s = Setup::with(2, opts).await;
    s.servers[1].pause();
    s.wait_state("pg2", "down").await;
    assert!(s.chorus.log().contains("health check failed"), "{}", s.chorus.log());
    s.servers[1].resume();
    // New sessions use pg1 alone and work.
    let c = s.client().await;
    c.batch_execute("CREATE TABLE after_hang (v int); INSERT INTO after_hang VALUES (1);").await.unwrap();
    assert_eq!(s.chorus.states().get("pg1").map(String::as_str), Some("in_sync"));
}
