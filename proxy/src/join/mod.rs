//! Join: brings a backend into the in-sync set while clients keep working (the contract's join
//! protocol, G7).
//!
//! `detach` (two or more in-sync backends): under a write pause the donor leaves the in-sync
//! set, so it holds a frozen, consistent copy; it is dumped and restored into the newcomer
//! (the largest tables' rows copied straight across, `copy`); what the clients wrote since is
//! applied to both; a second short pause applies the tail and attaches both. `snapshot` (the
//! only way with one in-sync backend): under a write pause a REPEATABLE READ transaction on
//! the donor exports its snapshot; the donor keeps serving while pg_dump reads that snapshot;
//! what was written since is applied to the newcomer only.
//!
//! What was written since comes from the update history (history = true, the default): the
//! copy carries the donor's history up to the starting point (schema `chorus` is dumped with
//! the rest), so the newcomer, and the detached donor, are brought up to the in-sync backends
//! exactly as a catch-up brings back a `down` backend (`catch_up::Follow`), and no second log
//! is kept. Without the history, sessions write every unit to a diff log on disk for the
//! join's length, and replayers apply it (`replay`).
//!
//! Before the newcomer answers any client it is checked against the lead with verify's
//! checksums. Any failure leaves the newcomer out with the reason and brings the donor back
//! (or marks it `needs_rebuild`); clients never see an error.

pub mod catch_up;
mod copy;
mod replay;
pub mod tools;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::cluster::{self, Backend, BackendState, Login};
use crate::difflog::DiffLog;
use crate::history::History;
use crate::shared::Shared;
use catch_up::Follow;
use replay::Position;

/// What the attach step gives the check that follows: the lead the newcomer is compared
/// with, the comparison (none with `skip_verify`), and the write pause in milliseconds.
type Attached = (Arc<Backend>, Option<crate::verify::Snapshots>, f64);

/// Replay is close enough to the head to attach when this few log bytes remain (a few dozen
/// small transactions: the tail replayed during the attach pause).
const ATTACH_LAG_BYTES: u64 = 16 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Detach,
    Snapshot,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JoinRequest {
    pub name: String,
    pub host: String,
    pub port: u16,
    #[serde(default)]
    pub method: Option<Method>,
    #[serde(default)]
    pub donor: Option<String>,
    /// Restore into databases that already hold tables.
    #[serde(default)]
    pub force: bool,
    /// Attach without comparing checksums with the lead first.
    #[serde(default)]
    pub skip_verify: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Starting,
    Detaching,
    Dumping,
    Restoring,
    Replaying,
    Attaching,
    Verifying,
    Done,
    Failed,
}

impl Phase {
    fn number(self) -> f64 {
        self as u8 as f64
    }
}

/// What `chorusctl join` and the admin API show of a join.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub name: String,
    pub method: Method,
    pub donor: String,
    pub phase: Phase,
    pub started_unix: u64,
    pub elapsed_seconds: f64,
    pub bytes_dumped: u64,
    pub bytes_restored: u64,
    pub log_units: u64,
    pub log_bytes: u64,
    pub replayed_units: u64,
    /// Log bytes the slowest replayer still has to apply.
    pub replay_lag_bytes: u64,
    /// Units the slowest target still lacks.
    pub replay_lag_units: u64,
    pub detach_pause_ms: Option<f64>,
    pub attach_pause_ms: Option<f64>,
    pub error: Option<String>,
    /// What became of the donor when the join failed.
    pub donor_outcome: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The request itself is malformed (a name outside the rule): 400.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Tool(String),
    #[error("{context}: {}", crate::cluster::pg_error(source))]
    Db { context: String, source: tokio_postgres::Error },
    #[error("{0}")]
    Replay(String),
}

fn db_err(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> JoinError {
    let context = context.into();
    move |source| JoinError::Db { context, source }
}

/// The join under way (one at a time) and the last one's progress.
#[derive(Default)]
pub struct Joins {
    current: Mutex<Option<Arc<Mutex<Progress>>>>,
    running: std::sync::atomic::AtomicBool,
}

impl Joins {
    pub fn progress(&self) -> Option<Progress> {
        let cur = self.current.lock().ok()?.clone()?;
        let p = cur.lock().ok()?.clone();
        Some(p)
    }

    pub fn running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// The last join of the leader before this one (from etcd), when this member has run
    /// none: shown as it was left; one that was still under way is failed, since nobody runs it
    /// now (its newcomer stays out of the in-sync set and is joined again).
    pub fn adopt(&self, mut last: Progress) {
        let Ok(mut cur) = self.current.lock() else { return };
        if cur.is_some() || self.running() {
            return;
        }
        if !matches!(last.phase, Phase::Done | Phase::Failed) {
            last.error =
                Some(format!("interrupted in phase {:?}: the leader that ran it stopped leading; join it again", last.phase));
            last.phase = Phase::Failed;
        }
        *cur = Some(Arc::new(Mutex::new(last)));
    }
}

/// Checks the request and starts the join in the background; returns once it is under way.
pub async fn start(shared: Arc<Shared>, req: JoinRequest) -> Result<Progress, JoinError> {
    if shared.joins.running.swap(true, Ordering::AcqRel) {
        return Err(JoinError::Refused("another join is under way; one at a time".into()));
    }
    if shared.catch_up.try_lock().is_err() {
        shared.joins.running.store(false, Ordering::Release);
        return Err(JoinError::Refused("a catch-up from the update history is under way; join after it".into()));
    }
    let plan = match plan(&shared, &req).await {
        Ok(p) => p,
        Err(e) => {
            shared.joins.running.store(false, Ordering::Release);
            return Err(e);
        }
    };
    let progress = Arc::new(Mutex::new(Progress {
        name: req.name.clone(),
        method: plan.method,
        donor: plan.donor.name.clone(),
        phase: Phase::Starting,
        started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        elapsed_seconds: 0.0,
        bytes_dumped: 0,
        bytes_restored: 0,
        log_units: 0,
        log_bytes: 0,
        replayed_units: 0,
        replay_lag_bytes: 0,
        replay_lag_units: 0,
        detach_pause_ms: None,
        attach_pause_ms: None,
        error: None,
        donor_outcome: None,
    }));
    if let Ok(mut c) = shared.joins.current.lock() {
        *c = Some(progress.clone());
    }
    let first = progress.lock().map(|p| p.clone()).map_err(|_| JoinError::Setup("progress lock poisoned".into()))?;
    tokio::spawn(async move {
        let started = Instant::now();
        let mut job = Job {
            shared: shared.clone(),
            plan,
            progress: progress.clone(),
            started,
            log: None,
            replayers: Vec::new(),
            donor_replayed: false,
            following: None,
        };
        let result = job.run().await;
        if let Err(e) = result {
            job.fail(&e.to_string()).await;
        }
        job.cleanup();
        shared.joins.running.store(false, Ordering::Release);
    });
    Ok(first)
}

struct Plan {
    method: Method,
    donor: Arc<Backend>,
    newcomer: Arc<Backend>,
    databases: Vec<String>,
    tools: tools::Tools,
    work: PathBuf,
    skip_verify: bool,
}

async fn connect(shared: &Shared, b: &Backend, db: &str) -> Result<Client, JoinError> {
    connect_to(shared, &b.name, &b.host, b.port, db).await
}

async fn connect_to(shared: &Shared, name: &str, host: &str, port: u16, db: &str) -> Result<Client, JoinError> {
    Login::health(&shared.cfg, host, port, db, "chorus-join")
        .connect()
        .await
        .map_err(db_err(format!("connect to {name} database {db}")))
}

async fn version(c: &Client) -> Result<u32, JoinError> {
    let v: String = c.query_one("SHOW server_version_num", &[]).await.map_err(db_err("read server_version_num"))?.get(0);
    Ok(v.parse::<u32>().unwrap_or(0) / 10000)
}

/// Everything checked before anything changes: the method and donor, the newcomer reachable
/// and empty, the tools present.
async fn plan(shared: &Arc<Shared>, req: &JoinRequest) -> Result<Plan, JoinError> {
    let cluster = &shared.cluster;
    if !crate::config::valid_backend_name(&req.name) {
        return Err(JoinError::BadRequest(format!("backend name {:?} must be 1 to 63 letters, digits, '-' or '_'", req.name)));
    }
    let in_sync = cluster.in_sync();
    if in_sync.is_empty() {
        return Err(JoinError::Refused("no backend is in sync to copy from".into()));
    }
    let method = req.method.unwrap_or(if in_sync.len() >= 2 { Method::Detach } else { Method::Snapshot });
    if method == Method::Detach && in_sync.len() < 2 {
        return Err(JoinError::Refused(
            "method detach needs two in-sync backends (the donor leaves the in-sync set); use --method snapshot".into(),
        ));
    }
    let donor = match &req.donor {
        Some(n) => in_sync
            .iter()
            .find(|b| &b.name == n)
            .cloned()
            .ok_or_else(|| JoinError::Refused(format!("donor {n:?} is not an in-sync backend")))?,
        // The lowest-priority in-sync backend: the lead keeps leading.
        None => in_sync.last().cloned().ok_or_else(|| JoinError::Refused("no donor".into()))?,
    };
    if let Some(b) = cluster.backend(&req.name) {
        if matches!(b.state(), BackendState::InSync | BackendState::Joining | BackendState::Detached) {
            return Err(JoinError::Refused(format!("backend {} is {}; it cannot join", b.name, b.state())));
        }
    }
    let nc = connect_to(shared, &req.name, &req.host, req.port, &shared.cfg.health_check_database).await?;
    let dc = connect(shared, &donor, &shared.cfg.health_check_database).await?;
    refuse_known_server(shared, &req.name, &nc).await?;
    let (nv, dv) = (version(&nc).await?, version(&dc).await?);
    if nv < dv {
        return Err(JoinError::Refused(format!(
            "{} runs PostgreSQL {nv}, older than the cluster's {dv}: a dump cannot go to an older major version",
            req.name
        )));
    }
    let databases = names(&dc, crate::history::schema::DATABASES).await?;
    let existing = names(&nc, "SELECT datname FROM pg_database").await?;
    if !req.force {
        for db in databases.iter().filter(|d| existing.contains(d)) {
            let c = connect_to(shared, &req.name, &req.host, req.port, db).await?;
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                       AND n.nspname NOT LIKE 'pg_toast%'",
                    &[],
                )
                .await
                .map_err(db_err("look for tables on the newcomer"))?
                .get(0);
            if n > 0 {
                return Err(JoinError::Refused(format!(
                    "database {db} on {} already holds {n} relation(s); join into empty databases, or force it",
                    req.name
                )));
            }
        }
    }
    // Forced: the old copies go (a needs_rebuild donor, a backend that was down).
    let admin = if req.force && databases.iter().any(|d| existing.contains(d)) {
        Some(connect_to(shared, &req.name, &req.host, req.port, "template1").await?)
    } else {
        None
    };
    for db in &databases {
        if existing.contains(db) {
            let Some(a) = &admin else { continue };
            a.batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", quote_ident(db)))
                .await
                .map_err(db_err(format!("drop database {db} on {}", req.name)))?;
        }
        let c = admin.as_ref().unwrap_or(&nc);
        c.batch_execute(&format!("CREATE DATABASE {}", quote_ident(db)))
            .await
            .map_err(db_err(format!("create database {db} on {}", req.name)))?;
    }
    let tools = tools::find(&shared.cfg, nv.max(dv)).await?;
    let work = shared.cfg.data_dir.join(format!("join-{}", req.name));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| JoinError::Setup(format!("cannot create {}: {e}", work.display())))?;
    let newcomer = cluster.add(&req.name, &req.host, req.port).map_err(|e| JoinError::Refused(e.to_string()))?;
    tracing::info!(backend = %req.name, method = ?method, donor = %donor.name, version = nv, tools = %tools.dir.display(), "join starting");
    Ok(Plan { method, donor, newcomer, databases, tools, work, skip_verify: req.skip_verify })
}

/// What identifies a running server whatever address reaches it: its cluster's system
/// identifier (where the login may read it), the time its postmaster started, and its port.
async fn server_identity(c: &Client) -> Result<String, JoinError> {
    let sysid = match c.query_one("SELECT system_identifier::text FROM pg_control_system()", &[]).await {
        Ok(r) => r.get::<_, String>(0),
        Err(_) => String::new(),
    };
    let row = c
        .query_one("SELECT pg_postmaster_start_time()::text, current_setting('port')", &[])
        .await
        .map_err(db_err("read the server's identity"))?;
    Ok(format!("{sysid}/{}/{}", row.get::<_, String>(0), row.get::<_, String>(1)))
}

/// Refuses a newcomer that is a server the cluster has already under another name (the same
/// server reached by another address would run every write twice, and a forced join into a
/// member or the donor would drop its databases).
async fn refuse_known_server(shared: &Shared, name: &str, newcomer: &Client) -> Result<(), JoinError> {
    let id = server_identity(newcomer).await?;
    for b in shared.cluster.backends().iter() {
        if b.name == name || b.state() == BackendState::Removed {
            continue;
        }
        // A member that cannot be reached now cannot be the server that answered.
        let Ok(c) = connect(shared, b, &shared.cfg.health_check_database).await else { continue };
        if server_identity(&c).await.ok().as_ref() == Some(&id) {
            return Err(JoinError::Refused(format!(
                "that server is already in the cluster as backend {} ({}, {})",
                b.name,
                b.addr,
                b.state()
            )));
        }
    }
    Ok(())
}

/// A sequence's qualified name and value (None before its first nextval).
type SeqValue = (String, Option<i64>);

/// The `snapshot` method's hold on one database of the donor.
struct Exporter {
    db: String,
    /// In the REPEATABLE READ transaction whose snapshot pg_dump reads.
    client: Client,
    snapshot: String,
    /// Sequence values at the snapshot's point (pg_dump would read later ones).
    sequences: Vec<SeqValue>,
}

/// Every sequence with its value (NULL before its first nextval).
const SEQUENCES: &str = "SELECT format('%I.%I', schemaname, sequencename), last_value FROM pg_sequences";

/// The first column of every row of `sql`.
async fn names(c: &Client, sql: &str) -> Result<Vec<String>, JoinError> {
    Ok(c.query(sql, &[]).await.map_err(db_err(format!("run {sql}")))?.iter().map(|r| r.get(0)).collect())
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

struct Replayer {
    target: Arc<Backend>,
    pos: Arc<Position>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

struct Job {
    shared: Arc<Shared>,
    plan: Plan,
    progress: Arc<Mutex<Progress>>,
    started: Instant,
    log: Option<Arc<DiffLog>>,
    replayers: Vec<Replayer>,
    /// A replayer into the donor has been started (it may not start over from the beginning).
    donor_replayed: bool,
    /// With the history: the serial the copy was taken at, and the backends brought up to
    /// the in-sync ones from there (for the progress).
    following: Option<(u64, Vec<Arc<Backend>>)>,
}

impl Job {
    fn update(&self, f: impl FnOnce(&mut Progress)) {
        if let Ok(mut p) = self.progress.lock() {
            let before = p.phase;
            f(&mut p);
            if p.phase != before {
                if let Some(states) = &self.shared.ha_states {
                    states.publish_join(&p);
                }
            }
            p.elapsed_seconds = self.started.elapsed().as_secs_f64();
            if let Some(log) = &self.log {
                p.log_units = log.units();
                p.log_bytes = log.len();
                let head = log.len();
                p.replay_lag_bytes =
                    self.replayers.iter().map(|r| head.saturating_sub(r.pos.bytes.load(Ordering::Acquire))).max().unwrap_or(head);
                p.replayed_units = self.replayers.iter().map(|r| r.pos.units.load(Ordering::Acquire)).min().unwrap_or(0);
                p.replay_lag_units = p.log_units.saturating_sub(p.replayed_units);
                metrics::gauge!("chorus_join_replay_lag_bytes").set(p.replay_lag_bytes as f64);
            }
            if let (Some((from, targets)), Some(h)) = (&self.following, &self.shared.history) {
                let head = h.last_serial();
                let slowest = targets.iter().map(|t| t.applied()).min().unwrap_or(*from).max(*from);
                p.log_units = head.saturating_sub(*from);
                p.replayed_units = slowest - from;
                p.replay_lag_units = head.saturating_sub(slowest);
            }
            metrics::gauge!("chorus_join_replay_lag_units").set(p.replay_lag_units as f64);
            metrics::gauge!("chorus_join_phase").set(p.phase.number());
        }
    }

    fn phase(&self, phase: Phase) {
        tracing::info!(backend = %self.plan.newcomer.name, ?phase, "join phase");
        self.update(|p| p.phase = phase);
    }

    async fn pause(&self, what: &str) -> Result<crate::order::LockOwner, JoinError> {
        let t = self.shared.cfg.join_pause_timeout;
        self.shared.order.pause(t).await.ok_or_else(|| {
            JoinError::Setup(format!("{what}: writes did not pause within join_pause_timeout ({t:?}); a transaction stays open"))
        })
    }

    async fn run(&mut self) -> Result<(), JoinError> {
        let (exporters, log) = self.detach().await?;
        self.copy(exporters, log.as_ref()).await?;
        let (lead, snaps, ms) = match (log, self.shared.history.clone()) {
            (Some(log), _) => {
                self.replay_to_near_head(&log).await?;
                self.attach().await?
            }
            (None, Some(history)) => self.follow_history(&history).await?,
            (None, None) => return Err(JoinError::Setup("neither the history nor a diff log to follow".into())),
        };
        self.verify(lead, snaps, ms).await
    }

    /// 1. The starting point, under a write pause: a detached donor, or an exported snapshot
    ///    per database; the diff log on unless the history is kept (then pruning keeps every
    ///    entry after this point until the join ends).
    async fn detach(&mut self) -> Result<(Vec<Exporter>, Option<Arc<DiffLog>>), JoinError> {
        let shared = self.shared.clone();
        let (donor, newcomer) = (self.plan.donor.clone(), self.plan.newcomer.clone());
        self.phase(Phase::Detaching);
        let mut exporters: Vec<Exporter> = Vec::new();
        if self.plan.method == Method::Snapshot {
            for db in &self.plan.databases {
                let c = connect(&shared, &donor, db).await?;
                exporters.push(Exporter { db: db.clone(), client: c, snapshot: String::new(), sequences: Vec::new() });
            }
        }
        let log = match self.shared.history {
            Some(_) => None,
            None => {
                Some(Arc::new(DiffLog::create(&self.plan.work.join("diff.log")).map_err(|e| JoinError::Setup(e.to_string()))?))
            }
        };
        let pause = self.pause("detach").await?;
        let paused = Instant::now();
        let mut started = Ok(());
        for Exporter { db, client: c, snapshot: snap, sequences: seqs } in &mut exporters {
            if let Err(e) = c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await {
                started = Err(db_err(format!("open a snapshot of {db} on {}", donor.name))(e));
                break;
            }
            match c.query_one("SELECT pg_export_snapshot()", &[]).await {
                Ok(r) => *snap = r.get(0),
                Err(e) => {
                    started = Err(db_err(format!("export a snapshot of {db} on {}", donor.name))(e));
                    break;
                }
            }
            // Sequences are not part of a snapshot: pg_dump reads their values later, when
            // writes have moved them on. Their values at this point are read now and set on
            // the newcomer after the restore.
            match c.query(SEQUENCES, &[]).await {
                Ok(rows) => *seqs = rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
                Err(e) => {
                    started = Err(db_err(format!("read the sequences of {db} on {}", donor.name))(e));
                    break;
                }
            }
        }
        if started.is_ok() {
            if let Some(log) = &log {
                shared.difflog.set(Some(log.clone()));
                self.log = Some(log.clone());
            }
            if let Some(h) = &shared.history {
                // No unit is in flight: the copy holds every unit up to this serial.
                let from = h.last_serial();
                h.hold_after(Some(from));
                let mut targets = vec![newcomer.clone()];
                if self.plan.method == Method::Detach {
                    targets.insert(0, donor.clone());
                }
                self.following = Some((from, targets));
            }
            if self.plan.method == Method::Detach {
                let why = format!("donor for the join of {}", newcomer.name);
                // Whole at this point, a donor the history can bring back stays one.
                let set = match shared.history {
                    Some(_) => shared.cluster.set_state_catching_up(&donor.name, BackendState::Detached, &why),
                    None => shared.cluster.set_state(&donor.name, BackendState::Detached, &why),
                };
                if let Err(e) = set {
                    started = Err(JoinError::Setup(e.to_string()));
                }
            }
        }
        drop(pause);
        let ms = paused.elapsed().as_secs_f64() * 1000.0;
        metrics::histogram!("chorus_join_pause_seconds", "step" => "detach").record(ms / 1000.0);
        self.update(|p| p.detach_pause_ms = Some(ms));
        started?;
        Ok((exporters, log))
    }

    /// 2. Dump and restore, roles first, from the donor into the newcomer; its sequences set
    ///    to their values at the starting point. pg_dump takes the schema and the small
    ///    tables; the largest tables' rows go straight from the donor into the newcomer (see
    ///    copy.rs).
    async fn copy(&mut self, exporters: Vec<Exporter>, log: Option<&Arc<DiffLog>>) -> Result<(), JoinError> {
        let shared = self.shared.clone();
        let (donor, newcomer) = (self.plan.donor.clone(), self.plan.newcomer.clone());
        self.phase(Phase::Dumping);
        let t = self.plan.tools.clone();
        let cfg = shared.cfg.clone();
        let size_conn = connect(&shared, &newcomer, &cfg.health_check_database).await?;
        let copied = AtomicU64::new(0);
        let exporter_of = |db: &str| exporters.iter().find(|e| e.db == db);
        let snapshot_of = |db: &str| exporter_of(db).map(|e| e.snapshot.as_str());
        // The roles are needed by the restore, not by the dump: copied meanwhile.
        let roles = tools::copy_roles(&t, &cfg, &donor, &newcomer, &self.plan.work);
        let dumping = async {
            let root = self.plan.work.join("dumps");
            std::fs::create_dir_all(&root).map_err(|e| JoinError::Setup(format!("cannot create {}: {e}", root.display())))?;
            let mut dumps = Vec::new();
            for (i, db) in self.plan.databases.iter().enumerate() {
                let dir = root.join(format!("db{i}"));
                // Which tables are copied is read where they are read: in the snapshot, or
                // on the frozen donor.
                let tables = match exporter_of(db) {
                    Some(e) => copy::tables(&e.client).await?,
                    None => copy::tables(&connect(&shared, &donor, db).await?).await?,
                };
                let dump = tools::dump(&t, &cfg, &donor, db, &dir, snapshot_of(db), &tables);
                self.watch(dump, &size_conn, &copied).await?;
                dumps.push((db.clone(), dir, tables));
            }
            Ok::<_, JoinError>(dumps)
        };
        let ((), dumps) = futures::try_join!(roles, dumping)?;
        self.phase(Phase::Restoring);
        for (db, dir, tables) in &dumps {
            let at = Instant::now();
            self.watch(tools::restore(&t, &cfg, &newcomer, db, dir, "pre-data"), &size_conn, &copied).await?;
            tracing::info!(database = %db, seconds = at.elapsed().as_secs_f64(), "join restored the schema");
            let at = Instant::now();
            let rows = copy::copy_tables(&shared, &donor, &newcomer, db, snapshot_of(db), tables, cfg.join_jobs, &copied);
            let rest = tools::restore(&t, &cfg, &newcomer, db, dir, "data");
            self.watch(async { futures::try_join!(rows, rest).map(|_| ()) }, &size_conn, &copied).await?;
            tracing::info!(database = %db, tables_copied = tables.len(), seconds = at.elapsed().as_secs_f64(), "join loaded the rows");
        }
        // Every row has been read from the donor: a detached donor catches up with the diff
        // log while the newcomer builds its indexes and constraints.
        if let Some(log) = log.filter(|_| self.plan.method == Method::Detach) {
            self.start_replayer(donor.clone(), log.clone());
        }
        // The snapshots are no longer needed.
        let sequences: Vec<(String, Vec<SeqValue>)> = exporters.into_iter().map(|e| (e.db, e.sequences)).collect();
        for (db, dir, _) in &dumps {
            let at = Instant::now();
            self.watch(tools::restore(&t, &cfg, &newcomer, db, dir, "post-data"), &size_conn, &copied).await?;
            tracing::info!(database = %db, seconds = at.elapsed().as_secs_f64(), "join built indexes and constraints");
            let _ = std::fs::remove_dir_all(dir);
            if let Some((_, seqs)) = sequences.iter().find(|(d, _)| d == db).filter(|(_, s)| !s.is_empty()) {
                let c = connect(&shared, &newcomer, db).await?;
                let mut sql = String::new();
                for (name, value) in seqs {
                    match value {
                        Some(v) => sql.push_str(&format!("SELECT setval('{}', {v}, true);", name.replace('\'', "''"))),
                        None => sql.push_str(&format!(
                            "SELECT setval('{0}', (SELECT seqstart FROM pg_sequence WHERE seqrelid = '{0}'::regclass), false);",
                            name.replace('\'', "''")
                        )),
                    }
                }
                c.batch_execute(&sql).await.map_err(db_err(format!("set the sequences of {db} on {}", newcomer.name)))?;
            }
        }
        Ok(())
    }

    /// 3. Replays the log into the newcomer (and the donor) until both are close to the head.
    async fn replay_to_near_head(&mut self, log: &Arc<DiffLog>) -> Result<(), JoinError> {
        let newcomer = self.plan.newcomer.clone();
        self.phase(Phase::Replaying);
        self.start_replayer(newcomer.clone(), log.clone());
        loop {
            self.check_replayers()?;
            self.update(|_| {});
            let lag = self.progress.lock().map(|p| p.replay_lag_bytes).unwrap_or(u64::MAX);
            if lag <= ATTACH_LAG_BYTES {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// 4. Attach: pause, replay the tail, both in sync, resume. Returns the lead the newcomer
    ///    is compared with, the snapshots to compare (none with `skip_verify`) and the pause.
    async fn attach(&mut self) -> Result<Attached, JoinError> {
        let shared = self.shared.clone();
        let donor = self.plan.donor.clone();
        self.phase(Phase::Attaching);
        let (lead, snaps) = self.prepare_verify().await?;
        let pause = self.pause("attach").await?;
        let paused = Instant::now();
        let results = self.finish_replay().await;
        let failed = results.iter().find_map(|(b, r)| r.as_ref().err().map(|e| (b.clone(), e.clone())));
        let mut attached = match &failed {
            None => Ok(()),
            Some((_, e)) => Err(JoinError::Replay(e.clone())),
        };
        // The donor's replay reached the head under this pause even if the newcomer's failed:
        // it comes back now.
        let donor_done = results.iter().any(|(b, r)| b.idx == donor.idx && r.is_ok());
        if attached.is_err() && donor_done && self.plan.method == Method::Detach {
            shared.difflog.set(None);
            let _ = shared.cluster.set_state(&donor.name, BackendState::InSync, "back from a failed join");
        }
        if attached.is_ok() {
            attached = self.attach_states(snaps.as_ref()).await;
        }
        self.attached(pause, paused, attached, lead, snaps)
    }

    /// 3 and 4 with the history: the newcomer (and a detached donor) follow the in-sync
    /// backends' history from the starting point, in rounds while clients write, then the
    /// last units under the attach pause.
    async fn follow_history(&mut self, history: &History) -> Result<Attached, JoinError> {
        self.phase(Phase::Replaying);
        let shared = self.shared.clone();
        let targets = self.following.as_ref().map(|(_, t)| t.clone()).unwrap_or_default();
        let mut follows: Vec<Follow> = targets.iter().map(|t| Follow::new(&shared, history, t.clone())).collect();
        let rounds = futures::future::try_join_all(follows.iter_mut().map(|f| f.rounds()));
        self.ticking(rounds).await.map_err(|e| JoinError::Replay(e.to_string()))?;
        self.phase(Phase::Attaching);
        let (lead, snaps) = self.prepare_verify().await?;
        let asked = Instant::now();
        let pause = self.pause("attach").await?;
        let paused = Instant::now();
        let finished = futures::future::try_join_all(follows.iter_mut().map(|f| f.finish(asked, paused))).await;
        let mut attached = finished.map(|_| ()).map_err(|e| JoinError::Replay(e.to_string()));
        if attached.is_ok() {
            attached = self.attach_states(snaps.as_ref()).await;
        }
        self.attached(pause, paused, attached, lead, snaps)
    }

    /// The lead the newcomer will be compared with, and the comparison made ready (None with
    /// `skip_verify`).
    async fn prepare_verify(&self) -> Result<(Arc<Backend>, Option<crate::verify::Snapshots>), JoinError> {
        let shared = &self.shared;
        let lead =
            shared.cluster.in_sync().into_iter().next().ok_or_else(|| JoinError::Setup("no in-sync backend left".into()))?;
        if self.plan.skip_verify {
            return Ok((lead, None));
        }
        let pair = vec![lead.clone(), self.plan.newcomer.clone()];
        let snaps = crate::verify::prepare(&shared.cfg, &pair, &self.plan.databases)
            .await
            .map_err(|e| JoinError::Setup(e.to_string()))?;
        Ok((lead, Some(snaps)))
    }

    /// Under the attach pause, the newcomer (and the donor) caught up: the comparison's
    /// snapshots taken, and both in sync.
    async fn attach_states(&self, snaps: Option<&crate::verify::Snapshots>) -> Result<(), JoinError> {
        let shared = &self.shared;
        let (donor, newcomer) = (&self.plan.donor, &self.plan.newcomer);
        if let Some(s) = snaps {
            s.begin().await.map_err(|e| JoinError::Setup(e.to_string()))?;
        }
        shared.difflog.set(None);
        newcomer.set_serves_reads(self.plan.skip_verify);
        shared.cluster.set_state(&newcomer.name, BackendState::InSync, "joined").map_err(|e| JoinError::Setup(e.to_string()))?;
        if self.plan.method == Method::Detach {
            shared
                .cluster
                .set_state(&donor.name, BackendState::InSync, "back from donating")
                .map_err(|e| JoinError::Setup(e.to_string()))?;
        }
        Ok(())
    }

    /// Ends the attach pause and records it; on success the newcomer's health check starts.
    fn attached(
        &mut self,
        pause: crate::order::LockOwner,
        paused: Instant,
        attached: Result<(), JoinError>,
        lead: Arc<Backend>,
        snaps: Option<crate::verify::Snapshots>,
    ) -> Result<Attached, JoinError> {
        drop(pause);
        let ms = paused.elapsed().as_secs_f64() * 1000.0;
        metrics::histogram!("chorus_join_pause_seconds", "step" => "attach").record(ms / 1000.0);
        self.update(|p| p.attach_pause_ms = Some(ms));
        attached?;
        self.log = None;
        // In sync: the lag is over, whatever the clients write from now on.
        self.following = None;
        self.update(|p| p.replay_lag_units = 0);
        let shared = &self.shared;
        cluster::spawn_health_check(shared.cfg.clone(), shared.cluster.clone(), self.plan.newcomer.clone(), shared.stop.clone());
        Ok((lead, snaps, ms))
    }

    /// 5. Compares the newcomer with the lead before it answers reads.
    async fn verify(&mut self, lead: Arc<Backend>, snaps: Option<crate::verify::Snapshots>, ms: f64) -> Result<(), JoinError> {
        let shared = self.shared.clone();
        let newcomer = self.plan.newcomer.clone();
        if let Some(s) = snaps {
            self.phase(Phase::Verifying);
            let report = s.finish(Duration::from_secs_f64(ms / 1000.0)).await.map_err(|e| JoinError::Setup(e.to_string()))?;
            let bad = report.unequal();
            if !bad.is_empty() {
                let names: Vec<String> = bad.iter().take(5).map(|(d, t)| format!("{d}.{t}")).collect();
                let why = format!("differs from {} after the join: {}", lead.name, names.join(", "));
                shared.cluster.eject(newcomer.idx, BackendState::Diverged, &why);
                self.update(|p| {
                    p.phase = Phase::Failed;
                    p.error = Some(why.clone());
                });
                return Ok(());
            }
            newcomer.set_serves_reads(true);
        }
        self.phase(Phase::Done);
        tracing::info!(backend = %newcomer.name, seconds = self.started.elapsed().as_secs_f64(), "join complete");
        Ok(())
    }

    /// Runs `fut` to completion, updating the progress every half second meanwhile.
    async fn ticking<T>(&self, fut: impl std::future::Future<Output = T>) -> T {
        self.every_half_second(fut, || async { self.update(|_| {}) }).await
    }

    /// Runs a step to completion, updating the progress every half second meanwhile: bytes
    /// dumped (the dump files and the rows copied) and restored (the newcomer's databases).
    async fn watch(
        &self,
        fut: impl std::future::Future<Output = Result<(), JoinError>>,
        size: &Client,
        copied: &AtomicU64,
    ) -> Result<(), JoinError> {
        self.every_half_second(fut, || self.tick(size, copied)).await
    }

    /// Runs `fut` to completion, calling `tick` every half second meanwhile and once at the end.
    async fn every_half_second<T, F: std::future::Future<Output = ()>>(
        &self,
        fut: impl std::future::Future<Output = T>,
        tick: impl Fn() -> F,
    ) -> T {
        tokio::pin!(fut);
        let mut every = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                r = &mut fut => {
                    tick().await;
                    return r;
                }
                _ = every.tick() => tick().await,
            }
        }
    }

    async fn tick(&self, size: &Client, copied: &AtomicU64) {
        let dumped = tools::dir_size(&self.plan.work.join("dumps")) + copied.load(Ordering::Relaxed);
        // Bounded: a newcomer that stops answering must not stall the step being watched.
        let q = size.query_one("SELECT sum(pg_database_size(datname))::bigint FROM pg_database", &[]);
        let restored = match tokio::time::timeout(Duration::from_secs(1), q).await {
            Ok(Ok(row)) => Some(row.get::<_, i64>(0).max(0) as u64),
            _ => None,
        };
        self.update(|p| {
            // Dump files are removed once restored: the count does not go back.
            p.bytes_dumped = p.bytes_dumped.max(dumped);
            if let Some(n) = restored {
                p.bytes_restored = n;
            }
        });
    }

    fn start_replayer(&mut self, target: Arc<Backend>, log: Arc<DiffLog>) {
        if target.idx == self.plan.donor.idx {
            self.donor_replayed = true;
        }
        let pos = Arc::new(Position::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(replay::replay(self.shared.cfg.clone(), log, target.clone(), pos.clone(), stop.clone()));
        self.replayers.push(Replayer { target, pos, stop, task });
    }

    fn check_replayers(&self) -> Result<(), JoinError> {
        if let Some(why) = self.log.as_ref().and_then(|l| l.failed()) {
            return Err(JoinError::Replay(why));
        }
        for r in &self.replayers {
            if r.task.is_finished() {
                return Err(JoinError::Replay(format!("replay into {} stopped early", r.target.name)));
            }
        }
        Ok(())
    }

    /// With writes paused: lets every replayer apply the rest of the log and stop, and makes
    /// what they applied durable. Each target's result.
    async fn finish_replay(&mut self) -> Vec<(Arc<Backend>, Result<(), String>)> {
        for r in &self.replayers {
            r.stop.cancel();
        }
        let mut out = Vec::new();
        for r in self.replayers.drain(..) {
            let res = match r.task.await {
                Ok(Ok(())) => replay::flush(&self.shared.cfg, &r.target).await,
                Ok(Err(e)) => Err(e),
                Err(e) => Err(format!("replay task failed: {e}")),
            };
            out.push((r.target, res));
        }
        out
    }

    /// Leaves the newcomer out with the reason; brings a detached donor back through the log,
    /// or marks it for rebuild when that is not possible.
    async fn fail(&mut self, why: &str) {
        tracing::error!(backend = %self.plan.newcomer.name, reason = %why, "join failed");
        metrics::counter!("chorus_join_failures_total").increment(1);
        let shared = self.shared.clone();
        let (donor, newcomer) = (self.plan.donor.clone(), self.plan.newcomer.clone());
        // The newcomer's replayer is of no use any more.
        for r in self.replayers.iter().filter(|r| r.target.idx == newcomer.idx) {
            r.task.abort();
        }
        self.replayers.retain(|r| r.target.idx != newcomer.idx);
        let _ = shared.cluster.set_state(&newcomer.name, BackendState::Down, &format!("join failed: {why}"));
        newcomer.set_serves_reads(true);
        let mut donor_outcome = None;
        if self.plan.method == Method::Detach && donor.state() == BackendState::Detached {
            let back = self.return_donor().await;
            donor_outcome = Some(match back {
                Ok(()) => format!("{} is back in sync", donor.name),
                // Whole, it catches up from the history once it can.
                Err(e) if shared.history.is_some() => {
                    let reason = format!("its join as donor failed and it could not catch up yet: {e}");
                    let _ = shared.cluster.set_state_catching_up(&donor.name, BackendState::Down, &reason);
                    format!("{} is down and catches up from the update history: {e}", donor.name)
                }
                Err(e) => {
                    let reason = format!("its join as donor failed and it could not catch up: {e}");
                    let _ = shared.cluster.set_state(&donor.name, BackendState::NeedsRebuild, &reason);
                    format!("{} needs a rebuild: {e}", donor.name)
                }
            });
        }
        shared.difflog.set(None);
        self.log = None;
        let why = why.to_string();
        self.update(|p| {
            p.phase = Phase::Failed;
            p.error = Some(why);
            p.donor_outcome = donor_outcome;
        });
    }

    /// Brings the donor up to the head (from the history, or the diff log) and, under a
    /// pause, attaches it.
    async fn return_donor(&mut self) -> Result<(), JoinError> {
        let donor = self.plan.donor.clone();
        if let Some(history) = self.shared.history.clone() {
            let shared = self.shared.clone();
            let mut follow = Follow::new(&shared, &history, donor.clone());
            follow.rounds().await.map_err(|e| JoinError::Replay(e.to_string()))?;
            let back = follow.attach_alone("back from a failed join", "return_donor").await;
            return back.map(drop).map_err(|e| JoinError::Replay(e.to_string()));
        }
        let log = self.log.clone().ok_or_else(|| JoinError::Setup("the diff log never started".into()))?;
        if log.failed().is_some() {
            return Err(JoinError::Replay("the diff log failed".into()));
        }
        if !self.replayers.iter().any(|r| r.target.idx == donor.idx) {
            if self.donor_replayed {
                // Its replayer ran and is gone: where it stopped is unknown, and starting over
                // would apply units twice.
                return Err(JoinError::Replay("the donor's replay stopped part way".into()));
            }
            self.start_replayer(donor.clone(), log.clone());
        }
        // Catch up while writes go on, then the tail under a pause.
        while let Some(r) = self.replayers.iter().find(|r| r.target.idx == donor.idx) {
            if r.task.is_finished() || log.len().saturating_sub(r.pos.bytes.load(Ordering::Acquire)) <= ATTACH_LAG_BYTES {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pause = self.pause("return the donor").await?;
        let res = match self.finish_replay().await.into_iter().find(|(b, _)| b.idx == donor.idx) {
            Some((_, r)) => r.map_err(JoinError::Replay),
            None => Err(JoinError::Replay("the donor's replay is gone".into())),
        };
        if res.is_ok() {
            self.shared.difflog.set(None);
            self.shared
                .cluster
                .set_state(&donor.name, BackendState::InSync, "back from a failed join")
                .map_err(|e| JoinError::Setup(e.to_string()))?;
        }
        drop(pause);
        res
    }

    fn cleanup(&mut self) {
        for r in self.replayers.drain(..) {
            r.task.abort();
        }
        self.shared.difflog.set(None);
        self.log = None;
        if let Some(h) = &self.shared.history {
            h.hold_after(None);
        }
        let _ = std::fs::remove_dir_all(&self.plan.work);
    }
}
