//! The standby (contract, "Leadership and fencing"; issue 29): two Chorus instances in front of
//! the same servers, a real etcd between them. Exactly one serves; when it dies or freezes the
//! other takes over, and a deposed leader commits nothing. Clients reach the leader through a
//! multi-host connection string, as libpq's, and record every commit they were told of.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_testkit::etcd::Etcd;
use common::{ChorusOptions, ChorusProcess, PgOptions, PgServer, APP_USER};
use tokio_postgres::NoTls;

/// The lease in these tests: short, so takeovers are quick, long enough for a loaded machine.
const TTL: &str = "3s";

struct Group {
    servers: Vec<PgServer>,
    members: Vec<ChorusProcess>,
    etcd: Etcd,
}

impl Group {
    async fn start(n_servers: usize, etcd_members: usize) -> Group {
        let etcd = Etcd::start(etcd_members).await.expect("start etcd");
        let mut servers = Vec::new();
        for _ in 0..n_servers {
            servers.push(PgServer::start(PgOptions::default()).await.expect("start postgres"));
        }
        let mut g = Group { servers, members: Vec::new(), etcd };
        let all: Vec<usize> = (0..etcd_members).collect();
        for node in ["a", "b"] {
            let m = g.member(node, &all).await;
            g.members.push(m);
        }
        g
    }

    async fn member(&self, node: &str, etcd: &[usize]) -> ChorusProcess {
        self.member_with(node, etcd, ChorusOptions::default()).await
    }

    async fn member_with(&self, node: &str, etcd: &[usize], opts: ChorusOptions) -> ChorusProcess {
        let refs: Vec<&PgServer> = self.servers.iter().collect();
        let ha = format!("{}\ncluster = \"t\"\nnode_name = \"{node}\"\nlease_ttl = \"{TTL}\"", self.etcd.endpoints_toml(etcd));
        ChorusProcess::start_member(common::chorus_bin(), &refs, opts, &ha).await.expect("start member")
    }

    /// The multi-host connection string a client uses: every member, libpq's order.
    fn conn_str(&self) -> String {
        let ports: Vec<String> = self.members.iter().map(|m| m.port().to_string()).collect();
        let hosts: Vec<&str> = self.members.iter().map(|_| "127.0.0.1").collect();
        format!(
            "host={} port={} user={} password={} dbname=postgres connect_timeout=2",
            hosts.join(","),
            ports.join(","),
            APP_USER.0,
            APP_USER.1
        )
    }

    /// One connection string per member, in the multi-host string's order.
    fn conn_strs(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("host=127.0.0.1 port={} user={} password={} dbname=postgres", m.port(), APP_USER.0, APP_USER.1))
            .collect()
    }

    /// Waits until exactly one member serves; its index.
    async fn leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let mut serving = Vec::new();
            for (i, m) in self.members.iter().enumerate() {
                if m.pid().is_some() && m.serves().await && m.role().await.as_deref() == Some("leader") {
                    serving.push(i);
                }
            }
            assert!(serving.len() <= 1, "two members serve at once: {serving:?}");
            if let [i] = serving[..] {
                return i;
            }
            assert!(Instant::now() < deadline, "no member took the lead within {timeout:?}: {}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_log(&self, i: usize, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.members[i].log().contains(text) {
            assert!(Instant::now() < deadline, "member {i} never logged {text:?}: {}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn logs(&self) -> String {
        self.members.iter().map(|m| format!("--- member on {}:\n{}", m.port(), m.log())).collect::<Vec<_>>().join("\n")
    }

    /// Every row id of `acks` on server `i`.
    async fn acks_on(&self, i: usize) -> BTreeSet<i64> {
        let c = self.servers[i].local_client("postgres").await.expect("connect to server");
        c.query("SELECT id FROM acks", &[]).await.expect("read acks").iter().map(|r| r.get(0)).collect()
    }

    /// Every backend holds the same history (serial and entry) and the same user rows.
    async fn assert_equal(&self) {
        let mut first: Option<Vec<(i64, String)>> = None;
        for s in &self.servers {
            let c = s.local_client("postgres").await.expect("connect");
            let rows = c.query("SELECT serial, md5(unit) FROM chorus.history ORDER BY serial", &[]).await.expect("history");
            let h: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            match &first {
                None => first = Some(h),
                Some(f) => assert_eq!(f, &h, "the backends' histories differ"),
            }
        }
        let refs: Vec<&PgServer> = self.servers.iter().collect();
        common::assert_identical(&refs, "postgres").await;
    }
}

/// Clients inserting numbered rows through the multi-host string, reconnecting after any
/// error: the ids they were told committed.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    acked: Arc<Mutex<BTreeSet<i64>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Load {
    /// `conns`: one connection string per member, tried in order as libpq tries the hosts of
    /// a multi-host string, each within its `connect_timeout` (the whole login, not only the
    /// TCP connect: a frozen member accepts TCP and never answers).
    fn start(conn: Vec<String>, clients: i64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for k in 0..clients {
            let (conn, stop, acked, errors) = (conn.clone(), stop.clone(), acked.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let mut next = k * 1_000_000;
                while !stop.load(Ordering::Acquire) {
                    let Some((c, connection)) = connect_any(&conn).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    tokio::spawn(connection);
                    while !stop.load(Ordering::Acquire) {
                        next += 1;
                        match c.execute("INSERT INTO acks (id) VALUES ($1)", &[&next]).await {
                            Ok(_) => {
                                acked.lock().unwrap().insert(next);
                            }
                            Err(e) => {
                                errors
                                    .lock()
                                    .unwrap()
                                    .push(e.code().map(|c| c.code().to_string()).unwrap_or_else(|| "closed".into()));
                                break;
                            }
                        }
                    }
                }
            }));
        }
        Load { stop, tasks, acked, errors }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn wait_more(&self, than: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.acked() <= than {
            assert!(Instant::now() < deadline, "no commit acknowledged within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> (BTreeSet<i64>, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        for t in self.tasks {
            let _ = t.await;
        }
        let acked = self.acked.lock().unwrap().clone();
        let errors = self.errors.lock().unwrap().clone();
        (acked, errors)
    }
}

async fn connect_any(
    conns: &[String],
) -> Option<(tokio_postgres::Client, tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>)> {
    for c in conns {
        if let Ok(Ok(x)) = tokio::time::timeout(Duration::from_secs(2), tokio_postgres::connect(c, NoTls)).await {
            return Some(x);
        }
    }
    None
}

/// A newer leader's raise of the epoch on one server, as the fence does it.
async fn raise_by_hand(srv: &PgServer) {
    let admin = srv.local_client("postgres").await.unwrap();
    admin
        .batch_execute(
            "BEGIN; LOCK TABLE chorus.fence IN ACCESS EXCLUSIVE MODE; \
             SELECT setval('chorus.epoch', pg_sequence_last_value('chorus.epoch') + 1); COMMIT",
        )
        .await
        .expect("raise the epoch");
}

async fn create_acks(g: &Group) {
    let (c, conn) = tokio_postgres::connect(&g.conn_str(), NoTls).await.expect("connect through the leader");
    tokio::spawn(conn);
    c.batch_execute("CREATE TABLE acks (id bigint PRIMARY KEY)").await.expect("create acks");
}

fn signal(p: &ChorusProcess, sig: i32) {
    let pid = p.pid().expect("running") as i32;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_killed_five_times_the_standby_serves_and_no_acknowledged_commit_is_lost() {
    let mut g = Group::start(2, 1).await;
    let mut leader = g.leader(Duration::from_secs(30)).await;
    let standby = 1 - leader;
    assert!(!g.members[standby].serves().await, "the standby keeps its client port closed");
    assert_eq!(g.members[standby].role().await.as_deref(), Some("standby"));
    create_acks(&g).await;
    let load = Load::start(g.conn_strs(), 4);
    for round in 0..5 {
        load.wait_more(load.acked() + 20, Duration::from_secs(30)).await;
        g.members[leader].kill();
        let killed = leader;
        leader = g.leader(Duration::from_secs(30)).await;
        assert_ne!(leader, killed, "round {round}: the killed member cannot lead");
        // Commits go on through the new leader; the killed member comes back as a standby.
        load.wait_more(load.acked() + 20, Duration::from_secs(30)).await;
        g.members[killed].launch().await.expect("restart the killed member");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!g.members[killed].serves().await, "round {round}: the restarted member stands by");
    }
    let (acked, errors) = load.stop().await;
    for i in 0..g.servers.len() {
        let held = g.acks_on(i).await;
        let missing: Vec<&i64> = acked.difference(&held).collect();
        assert!(missing.is_empty(), "server {i} lacks acknowledged commits {missing:?}");
    }
    // Clients of a dead leader lost their connection (no SQLSTATE) or were told 57P01.
    let odd: Vec<&String> = errors.iter().filter(|e| !matches!(e.as_str(), "closed" | "57P01" | "57P03" | "08006")).collect();
    assert!(odd.is_empty(), "unexpected errors: {odd:?}");
    g.assert_equal().await;
    assert_epochs_only_grow(&g).await;
    let (ok, out) = g.members[leader].verify();
    assert!(ok, "{out}");
}

/// In serial order, the epochs of the units only grow: each unit was written by the leader of
/// its time (a standby wrote none, a deposed leader none after its successor began).
async fn assert_epochs_only_grow(g: &Group) {
    for s in &g.servers {
        let c = s.local_client("postgres").await.unwrap();
        let rows = c.query("SELECT epoch FROM chorus.history ORDER BY serial", &[]).await.unwrap();
        let epochs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        assert!(epochs.iter().all(|e| *e > 0), "a unit without a leadership epoch: {epochs:?}");
        assert!(epochs.windows(2).all(|w| w[0] <= w[1]), "a unit of an older epoch after a newer one: {epochs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_whose_backends_were_fenced_commits_nothing_and_stands_by() {
    let g = Group::start(2, 1).await;
    let old = g.leader(Duration::from_secs(30)).await;
    create_acks(&g).await;
    let (c, conn) = tokio_postgres::connect(&g.conn_str(), NoTls).await.unwrap();
    let ended = tokio::spawn(conn);
    c.execute("INSERT INTO acks (id) VALUES (1)", &[]).await.unwrap();
    c.batch_execute("BEGIN; INSERT INTO acks (id) VALUES (2)").await.unwrap();
    // A newer leader's raise, as the fence does it, backend by backend: the leader has not
    // heard of it (etcd still says it leads).
    for srv in &g.servers {
        raise_by_hand(srv).await;
    }
    let e = c.batch_execute("COMMIT").await.expect_err("a fenced unit committed");
    assert_eq!(e.code().map(|c| c.code()), Some("57P01"), "{e}");
    let _ = ended.await;
    for i in 0..2 {
        assert_eq!(g.acks_on(i).await, BTreeSet::from([1]), "server {i}");
    }
    // The fenced member stands by; the group carries on with a newer epoch.
    // It started again as a standby (and may well win the next election: its lease went).
    g.wait_log(old, "starting again as a standby").await;
    g.leader(Duration::from_secs(30)).await;
    let (c, conn) = tokio_postgres::connect(&g.conn_str(), NoTls).await.unwrap();
    tokio::spawn(conn);
    c.execute("INSERT INTO acks (id) VALUES (3)", &[]).await.unwrap();
    assert!(g.members[old].log().contains("a backend refused a unit's record"), "{}", g.logs());
    g.assert_equal().await;
    assert_epochs_only_grow(&g).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_leader_commits_nothing_once_the_standby_took_over() {
    let g = Group::start(2, 1).await;
    let old = g.leader(Duration::from_secs(30)).await;
    create_acks(&g).await;
    let direct =
        format!("host=127.0.0.1 port={} user={} password={} dbname=postgres", g.members[old].port(), APP_USER.0, APP_USER.1);
    // An autocommit client that wrote there before the freeze, and stays connected.
    let (c2, conn2) = tokio_postgres::connect(&direct, NoTls).await.unwrap();
    tokio::spawn(conn2);
    c2.execute("INSERT INTO acks (id) VALUES (-2)", &[]).await.unwrap();
    // A transaction in flight on the old leader: written, not committed.
    let (stale, conn) = tokio_postgres::connect(&direct, NoTls).await.unwrap();
    let stale_ended = tokio::spawn(conn);
    stale.batch_execute("BEGIN; INSERT INTO acks (id) VALUES (-1)").await.unwrap();
    signal(&g.members[old], libc::SIGSTOP);
    let new = g.leader(Duration::from_secs(40)).await;
    assert_ne!(new, old, "the frozen member still answered as the leader: {}", g.logs());
    let load = Load::start(g.conn_strs(), 2);
    load.wait_more(10, Duration::from_secs(30)).await;
    // The old leader wakes with its transaction open and its clients still there.
    signal(&g.members[old], libc::SIGCONT);
    let commit = stale.batch_execute("INSERT INTO acks (id) VALUES (-3); COMMIT").await;
    assert!(commit.is_err(), "the stale transaction committed");
    let late = c2.execute("INSERT INTO acks (id) VALUES (-4)", &[]).await;
    let code = late.as_ref().err().and_then(|e| e.code().map(|c| c.code().to_string()));
    assert!(late.is_err(), "a deposed leader acknowledged a write");
    assert!(code.is_none() || code.as_deref() == Some("57P01"), "{code:?}");
    let _ = stale_ended.await;
    // It stands by now: its client port closed, its role endpoint says so.
    let deadline = Instant::now() + Duration::from_secs(20);
    while g.members[old].serves().await || g.members[old].role().await.as_deref() != Some("standby") {
        assert!(Instant::now() < deadline, "the deposed leader did not stand by: {}", g.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (acked, _) = load.stop().await;
    for i in 0..g.servers.len() {
        let held = g.acks_on(i).await;
        for id in [-1, -3, -4] {
            assert!(!held.contains(&id), "server {i} holds {id}, written by a deposed leader");
        }
        assert!(held.contains(&-2), "server {i} lacks the commit acknowledged before the freeze");
        assert!(acked.is_subset(&held), "server {i} lacks acknowledged commits");
    }
    assert!(g.members[new].log().contains("leading: backends fenced"), "{}", g.logs());
    // In every history, no unit of the old leadership after the new one's first.
    for i in 0..g.servers.len() {
        let c = g.servers[i].local_client("postgres").await.unwrap();
        let epochs: Vec<i64> = c
            .query("SELECT epoch FROM chorus.history GROUP BY epoch ORDER BY min(serial)", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(epochs.len(), 2, "two leaderships wrote: {epochs:?}");
        let stale: i64 = c
            .query_one(
                "SELECT count(*) FROM chorus.history WHERE epoch = $1 AND serial > (SELECT min(serial) FROM chorus.history WHERE epoch = $2)",
                &[&epochs[0], &epochs[1]],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(stale, 0, "server {i}: units of the deposed leader after the new epoch began");
    }
    g.assert_equal().await;
    let (ok, out) = g.members[new].verify();
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_started_at_once_ten_times_one_serves_and_serials_never_repeat() {
    let mut g = Group::start(2, 1).await;
    g.leader(Duration::from_secs(30)).await;
    create_acks(&g).await;
    for round in 0..10i64 {
        for m in &mut g.members {
            m.stop();
        }
        let (a, b) = g.members.split_at_mut(1);
        let (ra, rb) = tokio::join!(a[0].launch(), b[0].launch());
        ra.expect("start a");
        rb.expect("start b");
        let leader = g.leader(Duration::from_secs(30)).await;
        // For a while both are up: never both serve.
        for _ in 0..10 {
            let serving = [g.members[0].serves().await, g.members[1].serves().await];
            assert_eq!(serving.iter().filter(|s| **s).count(), 1, "round {round}: {serving:?}");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let (c, conn) = tokio_postgres::connect(&g.conn_str(), NoTls).await.expect("connect");
        tokio::spawn(conn);
        c.execute("INSERT INTO acks (id) VALUES ($1)", &[&round])
            .await
            .unwrap_or_else(|e| panic!("round {round} via {leader}: {e}"));
    }
    for i in 0..g.servers.len() {
        assert_eq!(g.acks_on(i).await, (0..10).collect::<BTreeSet<i64>>());
        let c = g.servers[i].local_client("postgres").await.unwrap();
        // Each leader went on after the newest serial any history held: in commit order the
        // serials only grow (a repeated one would have failed its unit on the primary key).
        let rows = c.query("SELECT serial FROM chorus.history ORDER BY at, serial", &[]).await.unwrap();
        let serials: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        assert!(serials.len() >= 11, "one unit per round and the CREATE TABLE: {serials:?}");
        assert!(serials.windows(2).all(|w| w[0] < w[1]), "serials out of commit order: {serials:?}");
    }
    g.assert_equal().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_unit_fenced_on_one_backend_only_ejects_nothing_and_the_next_leader_completes_it() {
    let g = Group::start(2, 1).await;
    let old = g.leader(Duration::from_secs(30)).await;
    create_acks(&g).await;
    let (c, conn) = tokio_postgres::connect(&g.conn_str(), NoTls).await.unwrap();
    let ended = tokio::spawn(conn);
    c.batch_execute("BEGIN; INSERT INTO acks (id) VALUES (1)").await.unwrap();
    // The raise has reached the second backend, not yet the first.
    raise_by_hand(&g.servers[1]).await;
    // Told nothing committed (57P01: the commit's outcome is unknown, as when a server dies
    // during COMMIT); the first backend may hold it, and then every backend does once the next
    // leader has recovered, with no backend ejected.
    let e = c.batch_execute("COMMIT").await.expect_err("a fenced unit was acknowledged");
    assert_eq!(e.code().map(|c| c.code()), Some("57P01"), "{e}");
    let _ = ended.await;
    // It started again as a standby (and may well win the next election: its lease went).
    g.wait_log(old, "starting again as a standby").await;
    g.leader(Duration::from_secs(30)).await;
    let (c, conn) = tokio_postgres::connect(&g.conn_str(), NoTls).await.unwrap();
    tokio::spawn(conn);
    c.execute("INSERT INTO acks (id) VALUES (2)", &[]).await.unwrap();
    let first = g.acks_on(0).await;
    assert_eq!(g.acks_on(1).await, first, "the backends hold the same rows");
    assert!(first == BTreeSet::from([1, 2]) || first == BTreeSet::from([2]), "{first:?}");
    for m in &g.members {
        assert!(!m.log().contains("backend ejected") && !m.log().contains("diverged"), "{}", g.logs());
    }
    g.assert_equal().await;
    assert_epochs_only_grow(&g).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_the_leader_took_out_stays_out_under_the_next_leader() {
    let mut g = Group::start(2, 1).await;
    let old = g.leader(Duration::from_secs(30)).await;
    let (c, conn) = tokio_postgres::connect(&g.conn_str(), NoTls).await.unwrap();
    tokio::spawn(conn);
    c.batch_execute("CREATE TABLE t (a int); INSERT INTO t VALUES (1)").await.unwrap();
    // The second server is changed behind Chorus's back; the next write shows it differs.
    let direct = g.servers[1].local_client("postgres").await.unwrap();
    direct.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    c.execute("UPDATE t SET a = a + 10", &[]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while g.members[old].states().get("pg2").map(String::as_str) != Some("diverged") {
        assert!(Instant::now() < deadline, "the leader did not take pg2 out: {}", g.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The standby's own health checks find pg2 answering: only the shared states know.
    let standby = 1 - old;
    assert_eq!(g.members[standby].states().get("pg2").map(String::as_str), Some("in_sync"));
    g.members[old].kill();
    let new = g.leader(Duration::from_secs(30)).await;
    assert_eq!(new, standby);
    assert_eq!(g.members[new].states().get("pg2").map(String::as_str), Some("diverged"), "{}", g.logs());
    let (c, conn) = tokio_postgres::connect(&g.conn_str(), NoTls).await.unwrap();
    tokio::spawn(conn);
    c.execute("INSERT INTO t VALUES (3)", &[]).await.unwrap();
    let on_pg2: i64 = direct.query_one("SELECT count(*) FROM t WHERE a = 3", &[]).await.unwrap().get(0);
    assert_eq!(on_pg2, 0, "the new leader wrote to a diverged backend");
    assert!(!g.members[new].log().contains("epoch raised backend=pg2"), "{}", g.logs());
    let (ok, out) = g.members[new].verify();
    assert!(ok, "{out}");
}

/// Waits until member `i` no longer serves (its client port closed); how long it took.
async fn wait_stopped_serving(g: &Group, i: usize, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    while g.members[i].serves().await {
        assert!(t0.elapsed() < timeout, "member {i} still serves after {timeout:?}: {}", g.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_etcd_stops_within_the_lease_and_the_standby_takes_over() {
    // Three etcd members; the first member of the group reaches only the first of them, the
    // second member only the two others.
    let etcd = Etcd::start(3).await.expect("start etcd");
    let mut servers = Vec::new();
    for _ in 0..2 {
        servers.push(PgServer::start(PgOptions::default()).await.expect("start postgres"));
    }
    let mut g = Group { servers, members: Vec::new(), etcd };
    let a = g.member("a", &[0]).await;
    g.members.push(a);
    g.leader(Duration::from_secs(30)).await;
    let b = g.member("b", &[1, 2]).await;
    g.members.push(b);
    assert_eq!(g.leader(Duration::from_secs(10)).await, 0, "the first member leads");
    create_acks(&g).await;
    let load = Load::start(g.conn_strs(), 2);
    load.wait_more(20, Duration::from_secs(30)).await;
    // Its one etcd endpoint goes: it cannot renew, and stops before the lease can expire.
    g.etcd.kill(0);
    let stopped = wait_stopped_serving(&g, 0, Duration::from_secs(3)).await;
    assert!(stopped <= Duration::from_secs(3), "stopped after {stopped:?}");
    assert_eq!(g.leader(Duration::from_secs(20)).await, 1, "the member that reaches etcd leads");
    let n = load.acked();
    load.wait_more(n + 20, Duration::from_secs(30)).await;
    let (acked, _) = load.stop().await;
    for i in 0..2 {
        assert!(acked.is_subset(&g.acks_on(i).await), "server {i} lacks acknowledged commits");
    }
    assert!(g.members[0].log().contains("this Chorus no longer leads"), "{}", g.logs());
    g.assert_equal().await;
    assert_epochs_only_grow(&g).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_losing_quorum_stops_the_leader_and_a_leader_serves_once_it_is_back() {
    let mut g = Group::start(2, 3).await;
    let first = g.leader(Duration::from_secs(30)).await;
    create_acks(&g).await;
    let load = Load::start(g.conn_strs(), 2);
    load.wait_more(20, Duration::from_secs(30)).await;
    // Two of three etcd members go: no quorum. etcd's raft leader may still renew leases
    // until it notices it lost its followers (its election timeout, 1 s by default); from the
    // last renewal the leader stops within the TTL.
    g.etcd.kill(1);
    g.etcd.kill(2);
    wait_stopped_serving(&g, first, Duration::from_millis(3000 + 1500)).await;
    // Neither member serves while etcd has no quorum.
    for _ in 0..20 {
        assert!(!g.members[0].serves().await && !g.members[1].serves().await, "a member serves without etcd");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acked_while_down = load.acked();
    g.etcd.restart(1).await.expect("etcd member back");
    let back = Instant::now();
    g.leader(Duration::from_secs(20)).await;
    let took = back.elapsed();
    load.wait_more(acked_while_down + 20, Duration::from_secs(30)).await;
    let (acked, _) = load.stop().await;
    for i in 0..2 {
        assert!(acked.is_subset(&g.acks_on(i).await), "server {i} lacks acknowledged commits");
    }
    eprintln!("a leader served {took:?} after etcd had its quorum back");
    assert!(took <= Duration::from_secs(3 + 1), "a leader served only {took:?} after etcd had its quorum back (lease_ttl {TTL})");
    g.assert_equal().await;
    assert_epochs_only_grow(&g).await;
}

/// pgbench_history's rows on server `i`: one per transaction pgbench committed.
async fn bench_rows(g: &Group, i: usize) -> i64 {
    let c = g.servers[i].local_client("postgres").await.expect("connect to server");
    c.query_one("SELECT count(*) FROM pgbench_history", &[]).await.expect("count").get(0)
}

async fn wait_bench_rows(g: &Group, more_than: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while bench_rows(g, 0).await <= more_than {
        assert!(Instant::now() < deadline, "pgbench committed nothing for 30 s: {}", g.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A planned switchover there and back under `pgbench -C` (a new connection per transaction)
/// through the multi-host string: pgbench reports no failed transaction and no aborted client,
/// every transaction it counts is in every backend's pgbench_history (none more), the old
/// leader stands by with its port closed, and the backends are equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planned_switchover_there_and_back_under_pgbench_fails_no_transaction() {
    let g = Group::start(2, 1).await;
    let first = g.leader(Duration::from_secs(30)).await;
    let second = 1 - first;
    let names = ["a", "b"];
    // One thread per client: pgbench connects blocking, and a client waiting at the new
    // leader's port must not hold up another finishing its transaction at the old one.
    let url = g.conn_str().replace("connect_timeout=2", "connect_timeout=10");
    let (ok, out) = common::sh(std::process::Command::new("pgbench").args(["-i", "-q", "-s", "1"]).arg(&url));
    assert!(ok, "{out}");
    let bench = std::process::Command::new("pgbench")
        // A count, not a duration: however slow the machine, pgbench still runs when the
        // second switchover is done (each wait below needs 100 transactions).
        .args(["-n", "-C", "-c", "4", "-j", "4", "-t", "200", "--verbose-errors"])
        .arg(&url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgbench");
    // Asked of the standby, the switchover is refused, naming the leader's admin API.
    let (ok, out) = g.members[second].chorusctl(&["switchover"]);
    assert!(!ok && out.contains("does not lead") && out.contains(&format!("the leader is {}", names[first])), "{out}");
    for (from, to) in [(first, second), (second, first)] {
        wait_bench_rows(&g, bench_rows(&g, 0).await + 100).await;
        let (ok, out) = g.members[from].chorusctl(&["switchover", "--to", names[to]]);
        assert!(ok, "switchover from {} to {}: {out}\n{}", names[from], names[to], g.logs());
        assert!(out.contains(&format!("{} leads now", names[to])), "{out}");
        assert_eq!(g.leader(Duration::from_secs(10)).await, to);
        // The old leader stands by again, its port closed; commits go on through the new one.
        let deadline = Instant::now() + Duration::from_secs(20);
        while g.members[from].role().await.as_deref() != Some("standby") {
            assert!(Instant::now() < deadline, "the old leader never stood by: {}", g.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!g.members[from].serves().await, "the old leader's port is closed");
        wait_bench_rows(&g, bench_rows(&g, 0).await + 100).await;
    }
    let out = bench.wait_with_output().expect("pgbench");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pgbench failed (an aborted client?):\n{text}\n{}", g.logs());
    let number = |prefix: &str| -> i64 {
        let line = text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}"));
        line[prefix.len()..]
            .split(|c: char| !c.is_ascii_digit())
            .find(|n| !n.is_empty())
            .and_then(|n| n.parse().ok())
            .expect("a number")
    };
    assert_eq!(number("number of failed transactions"), 0, "{text}");
    let processed = number("number of transactions actually processed");
    for i in 0..g.servers.len() {
        assert_eq!(bench_rows(&g, i).await, processed, "server {i}: one pgbench_history row per acknowledged transaction");
    }
    g.assert_equal().await;
    let (ok, out) = g.members[first].verify();
    assert!(ok, "{out}");
}

/// A standby never writes: the standby logs in to the backends as its own user (its health
/// check user, `postgres`; the leader's is the application's), every statement is logged by
/// the servers, and during a run of writes through the leader every statement of the standby's
/// user is a read; every unit in the histories carries the leader's epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_only_reads_from_the_backends() {
    let etcd = Etcd::start(1).await.expect("start etcd");
    let logged = PgOptions {
        extra_conf: vec!["log_statement = 'all'".into(), "log_line_prefix = '<%u> '".into()],
        ..PgOptions::default()
    };
    let mut servers = Vec::new();
    for _ in 0..2 {
        servers.push(PgServer::start(logged.clone()).await.expect("start postgres"));
    }
    let mut g = Group { servers, members: Vec::new(), etcd };
    let a = g.member("a", &[0]).await;
    g.members.push(a);
    assert_eq!(g.leader(Duration::from_secs(30)).await, 0);
    // The servers' logs from here on: the test's own setup logged in as postgres before.
    let from: Vec<usize> = g.servers.iter().map(|s| s.log().len()).collect();
    let b = g
        .member_with("b", &[0], ChorusOptions { extra: "health_check_user = \"postgres\"".into(), ..ChorusOptions::default() })
        .await;
    g.members.push(b);
    g.wait_log(1, "standing by").await;
    create_acks(&g).await;
    let load = Load::start(g.conn_strs(), 4);
    // Long enough for the standby's every periodic read (health checks every second).
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        load.wait_more(load.acked() + 10, Duration::from_secs(30)).await;
    }
    let (acked, errors) = load.stop().await;
    assert!(errors.is_empty(), "the leader served without error: {errors:?}");
    assert!(g.members[1].role().await.as_deref() == Some("standby") && !g.members[1].serves().await);
    let mut seen = 0;
    for (i, srv) in g.servers.iter().enumerate() {
        let log = srv.log();
        let standby: Vec<&str> = log[from[i]..]
            .lines()
            .filter(|l| l.starts_with("<postgres> "))
            .filter_map(|l| {
                l.split_once("statement: ").or_else(|| l.split_once("execute ").and_then(|(_, r)| r.split_once(": ")))
            })
            .map(|(_, stmt)| stmt.trim())
            .collect();
        for stmt in &standby {
            let upper = stmt.to_ascii_uppercase();
            let read = (upper.starts_with("SELECT ") || upper.starts_with("SHOW "))
                && !["SETVAL", "NEXTVAL", "CHORUS.RECORD", "PG_TERMINATE", "FOR UPDATE", "FOR SHARE", "INTO "]
                    .iter()
                    .any(|w| upper.contains(w));
            assert!(read, "server {i}: the standby ran a statement that is not a plain read: {stmt}");
        }
        seen += standby.len();
    }
    assert!(seen > 0, "the standby's statements were not in the servers' logs");
    let epoch = leader_epoch(&g.members[0]).await;
    for (i, srv) in g.servers.iter().enumerate() {
        let c = srv.local_client("postgres").await.expect("connect");
        let other: i64 = c
            .query_one("SELECT count(*) FROM chorus.history WHERE epoch <> $1", &[&(epoch as i64)])
            .await
            .expect("epochs")
            .get(0);
        assert_eq!(other, 0, "server {i} holds units of another epoch than the leader's {epoch}");
        assert!(acked.is_subset(&g.acks_on(i).await), "server {i} lacks acknowledged commits");
    }
    g.assert_equal().await;
    let (ok, out) = g.members[0].verify();
    assert!(ok, "{out}");
}

/// The leader's epoch, as its admin API says.
async fn leader_epoch(m: &ChorusProcess) -> u64 {
    let (ok, out) = m.chorusctl(&["--json", "ha"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("chorusctl --json ha");
    assert_eq!(v["role"], "leader", "{out}");
    v["epoch"].as_u64().expect("an epoch")
}

/// The join progress this member's admin API shows (`status`'s `join`).
fn join_of(m: &ChorusProcess) -> serde_json::Value {
    let (ok, out) = m.chorusctl(&["--json", "status"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("chorusctl --json status");
    v["join"].clone()
}

/// A join's progress goes to etcd: after the leader that ran a join is killed, the next leader
/// shows it done, with the newcomer in sync and equal; a join cut off by its leader's death
/// (killed while it copies) shows as failed on the next leader, its newcomer out of the
/// in-sync set.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_next_leader_shows_the_last_leaders_join() {
    let mut g = Group::start(2, 1).await;
    let spare = PgServer::start(PgOptions::default()).await.expect("start the spare");
    let mut leader = g.leader(Duration::from_secs(30)).await;
    create_acks(&g).await;
    let (c, conn) = tokio_postgres::connect(&g.conn_str(), NoTls).await.expect("connect");
    tokio::spawn(conn);
    c.batch_execute("INSERT INTO acks SELECT g FROM generate_series(1, 1000) g").await.expect("rows");
    let port = spare.port().to_string();
    let (ok, out) = g.members[leader].chorusctl(&["join", "pg3", "--host", "127.0.0.1", "--port", &port]);
    assert!(ok && out.contains("pg3 is in sync"), "{out}");
    g.members[leader].kill();
    let killed = leader;
    leader = g.leader(Duration::from_secs(30)).await;
    assert_ne!(leader, killed);
    let join = join_of(&g.members[leader]);
    assert_eq!((join["name"].as_str(), join["phase"].as_str()), (Some("pg3"), Some("done")), "{join}");
    let states = g.members[leader].states();
    assert_eq!(states.get("pg3").map(String::as_str), Some("in_sync"), "{states:?}");
    let (ok, out) = g.members[leader].verify();
    assert!(ok, "{out}");
    g.members[killed].launch().await.expect("restart the killed member");

    // A second join, of a bigger copy, cut off in the middle by the leader's death.
    let (c, conn) = tokio_postgres::connect(&g.conn_str(), NoTls).await.expect("connect to the new leader");
    tokio::spawn(conn);
    c.batch_execute("CREATE TABLE big AS SELECT g AS id, repeat('x', 300) AS pad FROM generate_series(1, 300000) g")
        .await
        .expect("big");
    let spare2 = PgServer::start(PgOptions::default()).await.expect("start the second spare");
    let port = spare2.port().to_string();
    let (ok, out) = g.members[leader].chorusctl(&["join", "pg4", "--host", "127.0.0.1", "--port", &port, "--no-wait"]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(join_of(&g.members[leader])["phase"].as_str(), Some("dumping" | "restoring")) {
        assert!(Instant::now() < deadline, "the join never copied: {}", join_of(&g.members[leader]));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    g.members[leader].kill();
    let killed = leader;
    leader = g.leader(Duration::from_secs(30)).await;
    assert_ne!(leader, killed);
    let join = join_of(&g.members[leader]);
    assert_eq!((join["name"].as_str(), join["phase"].as_str()), (Some("pg4"), Some("failed")), "{join}");
    assert!(join["error"].as_str().is_some_and(|e| e.contains("interrupted in phase")), "{join}");
    let states = g.members[leader].states();
    assert!(states.get("pg4").is_some_and(|s| s != "in_sync"), "the new leader knows pg4, out of the in-sync set: {states:?}");
    for i in 0..g.servers.len() {
        assert_eq!(g.acks_on(i).await.len(), 1000, "server {i}");
    }
    let (ok, out) = g.members[leader].verify();
    assert!(ok, "{out}");
}
