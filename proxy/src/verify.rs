//! `verify`: proves G1 on a live cluster by comparing per-table checksums of every in-sync backend.
//!
//! The checksums must describe the same logical point on every backend without holding writes
//! for the whole run. Verify gets that point through Chorus itself: a transaction through the
//! proxy takes the cluster-wide write lock (an advisory-lock call is a write Chorus cannot
//! analyse), which waits for every write transaction to complete on every backend and holds
//! new ones back. While it holds, verify opens a REPEATABLE READ snapshot on each backend
//! directly; then it commits and writes resume. The checksums are computed in those
//! snapshots afterwards, as slowly as a large database needs. Each table's checksum is an
//! order-independent sum of per-row 64-bit hashes, so memory stays flat whatever the size.
//! The row hash is `hash_record_extended` (PostgreSQL 14 and later, about twice as cheap)
//! where every column's type has a hash that is equal exactly when the values are identical
//! (integers, booleans, text under deterministic collations, bytea, dates and timestamps,
//! uuids), and `hashtextextended` of the row's text otherwise (a numeric's 1.0 and 1.00, or an
//! interval's 1 day and 24 hours, hash alike but are not the same value). Both are the hash
//! partitioning functions, which PostgreSQL keeps stable across major versions.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::cluster::{Cluster, Login};
use crate::config::Config;

/// Session settings that make every server print rows the same way.
const SETTINGS: &str = "SET datestyle = 'ISO, MDY'; SET timezone = 'UTC'; SET extra_float_digits = 3; \
     SET bytea_output = 'hex'; SET intervalstyle = 'postgres'; SET statement_timeout = 0";

/// Every user table, and whether each of its columns has an exact hash (see above): bool,
/// "char", name, int8, int2, int4, text, oid, bytea, bpchar, varchar, date, time, timestamp,
/// timestamptz, uuid; text types only under a deterministic collation.
const TABLES: &str = "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
       coalesce(bool_and(a.atttypid IN (16, 18, 19, 20, 21, 23, 25, 26, 17, 1042, 1043, 1082, 1083, 1114, 1184, 2950) \
         AND (a.attcollation = 0 OR co.collisdeterministic)), false) \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
     LEFT JOIN pg_collation co ON co.oid = a.attcollation \
     WHERE c.relkind = 'r' AND c.relpersistence = 'p' \
       AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
     GROUP BY 1 ORDER BY 1";

/// The first major version with `hash_record_extended`.
const RECORD_HASH_SINCE: i32 = 140000;

/// One table's result on one backend: row count and checksum.
pub type Sum = (i64, String);

/// The report: per database, per table, per backend.
#[derive(Debug, Default)]
pub struct Report {
    pub databases: BTreeMap<String, BTreeMap<String, BTreeMap<String, Option<Sum>>>>,
    /// How long new writes were held back.
    pub pause: Duration,
}

impl Report {
    pub fn unequal(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (db, tables) in &self.databases {
            for (t, per) in tables {
                let mut vals = per.values();
                let first = vals.next();
                if vals.any(|v| Some(v) != first) || per.values().any(|v| v.is_none()) {
                    out.push((db.clone(), t.clone()));
                }
            }
        }
        out
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        for (db, tables) in &self.databases {
            for (t, per) in tables {
                let mut vals = per.values();
                let first = vals.next();
                let equal = !vals.any(|v| Some(v) != first) && per.values().all(|v| v.is_some());
                let rows = first.and_then(|v| v.as_ref()).map(|v| v.0).unwrap_or(0);
                if equal {
                    s.push_str(&format!("equal    {db}.{t} ({rows} rows)\n"));
                } else {
                    let detail: Vec<String> = per
                        .iter()
                        .map(|(b, v)| match v {
                            Some((n, sum)) => format!("{b}: {n} rows, sum {sum}"),
                            None => format!("{b}: missing"),
                        })
                        .collect();
                    s.push_str(&format!("UNEQUAL  {db}.{t} ({})\n", detail.join("; ")));
                }
            }
        }
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Setup(String),
    #[error("{context}: {source}")]
    Db { context: String, source: tokio_postgres::Error },
}

fn db_err(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> VerifyError {
    let context = context.into();
    move |source| VerifyError::Db { context, source }
}

async fn connect(host: &str, port: u16, cfg: &Config, db: &str, app: &str) -> Result<Client, tokio_postgres::Error> {
    Login::health(cfg, host, port, db, app).connect().await
}

/// Runs verify against the Chorus described by `cfg` (its listen address and backends), from
/// outside the proxy: the pause goes through Chorus.
pub async fn run(cfg: &Config, databases: &[String]) -> Result<Report, VerifyError> {
    let cluster = Cluster::open(cfg).map_err(|e| VerifyError::Setup(e.to_string()))?;
    let backends = cluster.in_sync();
    let snaps = prepare(cfg, &backends, databases).await?;
    let (host, port) = split_listen(&cfg.listen)?;
    // The quiesced point: hold the cluster-wide write lock through Chorus while snapshots start.
    let proxy =
        connect(&host, port, cfg, &cfg.health_check_database, "chorus-verify").await.map_err(db_err("connect through Chorus"))?;
    let started = Instant::now();
    proxy
        .batch_execute("BEGIN; SELECT pg_advisory_xact_lock(7302611)")
        .await
        .map_err(db_err("take the cluster-wide write lock through Chorus"))?;
    let paused = Instant::now();
    let begun = snaps.begin().await;
    let commit = proxy.batch_execute("COMMIT").await;
    let pause = paused.elapsed();
    begun?;
    commit.map_err(db_err("release the write lock"))?;
    tracing::info!(waited = ?(paused - started), paused = ?pause, "verify snapshots taken");
    snaps.finish(pause).await
}

/// Runs verify inside the proxy (the admin API): the pause is the write order's own.
pub async fn run_live(shared: &crate::server::Shared, databases: &[String]) -> Result<Report, VerifyError> {
    let backends = shared.cluster.in_sync();
    let snaps = prepare(&shared.cfg, &backends, databases).await?;
    let Some(pause) = shared.order.pause(shared.cfg.lock_timeout).await else {
        return Err(VerifyError::Setup(format!("writes did not pause within lock_timeout ({:?})", shared.cfg.lock_timeout)));
    };
    let paused = Instant::now();
    let begun = snaps.begin().await;
    drop(pause);
    let held = paused.elapsed();
    begun?;
    snaps.finish(held).await
}

/// One connection per (database, backend), each about to open its snapshot.
pub struct Snapshots {
    names: Vec<String>,
    snaps: Vec<(String, String, Client)>,
    /// Every backend compared has `hash_record_extended`: all use it alike where it is exact.
    record_hash: bool,
}

/// Connects to every database of every backend in `backends` (all databases that accept
/// connections when `databases` is empty), before any pause, so the pause stays short.
pub async fn prepare(
    cfg: &Config,
    backends: &[std::sync::Arc<crate::cluster::Backend>],
    databases: &[String],
) -> Result<Snapshots, VerifyError> {
    let Some(lead) = backends.first() else {
        return Err(VerifyError::Setup("no backend is in sync".into()));
    };
    let dbs: Vec<String> = if databases.is_empty() {
        let c = connect(&lead.host, lead.port, cfg, &cfg.health_check_database, "chorus-verify")
            .await
            .map_err(db_err(format!("connect to {}", lead.name)))?;
        c.query("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1", &[])
            .await
            .map_err(db_err("list databases"))?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        databases.to_vec()
    };
    let mut snaps: Vec<(String, String, Client)> = Vec::new();
    let mut record_hash = true;
    for db in &dbs {
        for b in backends {
            let c = connect(&b.host, b.port, cfg, db, "chorus-verify")
                .await
                .map_err(db_err(format!("connect to {} database {db}", b.name)))?;
            c.batch_execute(SETTINGS).await.map_err(db_err("settings"))?;
            let v: i32 = c
                .query_one("SELECT current_setting('server_version_num')::int", &[])
                .await
                .map_err(db_err(format!("version of {}", b.name)))?
                .get(0);
            record_hash &= v >= RECORD_HASH_SINCE;
            snaps.push((db.clone(), b.name.clone(), c));
        }
    }
    Ok(Snapshots { names: backends.iter().map(|b| b.name.clone()).collect(), snaps, record_hash })
}

impl Snapshots {
    /// Opens every snapshot at once; call while writes are paused.
    pub async fn begin(&self) -> Result<(), VerifyError> {
        let begins = futures::future::join_all(
            self.snaps.iter().map(|(_, _, c)| c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1")),
        )
        .await;
        for r in begins {
            r.map_err(db_err("open a snapshot"))?;
        }
        Ok(())
    }

    /// Computes the checksums in the snapshots, every backend in parallel, table by table.
    pub async fn finish(self, pause: Duration) -> Result<Report, VerifyError> {
        let sums = futures::future::join_all(self.snaps.iter().map(|(db, b, c)| async move {
            let r = checksums(c, self.record_hash).await;
            (db.clone(), b.clone(), r)
        }))
        .await;
        let mut report = Report { pause, ..Report::default() };
        for (db, b, r) in sums {
            let r = r.map_err(db_err(format!("checksums on {b} database {db}")))?;
            let tables = report.databases.entry(db.clone()).or_default();
            for (t, sum) in &r {
                tables.entry(t.clone()).or_default().insert(b.clone(), Some(sum.clone()));
            }
        }
        // A table that some backend lacks is unequal.
        for tables in report.databases.values_mut() {
            for per in tables.values_mut() {
                for n in &self.names {
                    per.entry(n.clone()).or_insert(None);
                }
            }
        }
        Ok(report)
    }
}

async fn checksums(c: &Client, record_hash: bool) -> Result<BTreeMap<String, Sum>, tokio_postgres::Error> {
    let mut out = BTreeMap::new();
    let tables: Vec<(String, bool)> = c.query(TABLES, &[]).await?.iter().map(|r| (r.get(0), r.get(1))).collect();
    for (t, exact) in tables {
        let hash = if record_hash && exact { "hash_record_extended(r, 0)" } else { "hashtextextended(r::text, 0)" };
        let q = format!("SELECT count(*), coalesce(sum({hash}), 0)::text FROM {t} r");
        let row = c.query_one(&q, &[]).await?;
        out.insert(t, (row.get(0), row.get(1)));
    }
    c.batch_execute("COMMIT").await?;
    Ok(out)
}

fn split_listen(listen: &str) -> Result<(String, u16), VerifyError> {
    let (h, p) = listen.rsplit_once(':').ok_or_else(|| VerifyError::Setup(format!("bad listen address {listen:?}")))?;
    let port = p.parse().map_err(|_| VerifyError::Setup(format!("bad listen port in {listen:?}")))?;
    let host = match h.trim_matches(|c| c == '[' || c == ']') {
        "0.0.0.0" | "" => "127.0.0.1".to_string(),
        "::" => "::1".to_string(),
        h => h.to_string(),
    };
    Ok((host, port))
}
