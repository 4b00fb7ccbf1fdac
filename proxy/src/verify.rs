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
//! A row's hash combines one hash per column, each seeded with the column's position: the
//! type's own hash partitioning function for integers, oids, "char", uuid and timestamps
//! (equal exactly when the values are identical), and `hashtextextended` of the value's text
//! in the C collation for everything else, so a numeric's 1.0 and 1.00 or an interval's 1 day
//! and 24 hours differ, as a text compared byte by byte does. The columns' hashes (a NULL
//! counts as its position) are XORed and hashed again, so values moved between rows change
//! the sum. Hash partitioning functions are kept stable across major versions by PostgreSQL;
//! every one used exists since PostgreSQL 11. Hashing the columns directly takes about half
//! the time of hashing a whole-row record, which forms a row value for every row.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::cluster::{Cluster, Login};
use crate::config::Config;

/// Session settings that make every server print rows the same way.
pub(crate) const SETTINGS: &str = "SET datestyle = 'ISO, MDY'; SET timezone = 'UTC'; SET extra_float_digits = 3; \
     SET bytea_output = 'hex'; SET intervalstyle = 'postgres'; SET statement_timeout = 0";

/// Every user table, with its row hash expression (see above). Columns are numbered among
/// the live ones: a column dropped on one backend leaves no gap that the others lack.
const TABLES: &str = "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
       coalesce('hashint8extended(' || string_agg(format('coalesce(%s, %s)', CASE a.atttypid \
           WHEN 20 THEN format('hashint8extended(%I, %s)', a.attname, a.k) \
           WHEN 21 THEN format('hashint2extended(%I, %s)', a.attname, a.k) \
           WHEN 23 THEN format('hashint4extended(%I, %s)', a.attname, a.k) \
           WHEN 26 THEN format('hashoidextended(%I, %s)', a.attname, a.k) \
           WHEN 18 THEN format('hashcharextended(%I, %s)', a.attname, a.k) \
           WHEN 2950 THEN format('uuid_hash_extended(%I, %s)', a.attname, a.k) \
           WHEN 1114 THEN format('timestamp_hash_extended(%I, %s)', a.attname, a.k) \
           WHEN 1184 THEN format('timestamp_hash_extended(%I AT TIME ZONE ''UTC'', %s)', a.attname, a.k) \
           WHEN 1042 THEN format('hashbpcharextended(%I COLLATE \"C\", %s)', a.attname, a.k) \
           ELSE format('hashtextextended((%I)::text COLLATE \"C\", %s)', a.attname, a.k) END, a.k), \
         ' # ' ORDER BY a.k) || ', 0)', '0') \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     LEFT JOIN (SELECT attrelid, attname, atttypid, row_number() OVER (PARTITION BY attrelid ORDER BY attnum) AS k \
                FROM pg_attribute WHERE attnum > 0 AND NOT attisdropped) a ON a.attrelid = c.oid \
     WHERE c.relkind = 'r' AND c.relpersistence = 'p' \
       AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'chorus') AND n.nspname NOT LIKE 'pg_toast%' \
     GROUP BY n.nspname, c.relname ORDER BY 1";

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
    #[error("{context}: {}", crate::cluster::pg_error(source))]
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
    let tls = crate::tls::own_listener(&cfg.tls).map_err(|e| VerifyError::Setup(e.to_string()))?;
    let proxy = Login::health(cfg, &host, port, &cfg.health_check_database, "chorus-verify")
        .connect_with(tls)
        .await
        .map_err(db_err("connect through Chorus"))?;
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
pub async fn run_live(shared: &crate::shared::Shared, databases: &[String]) -> Result<Report, VerifyError> {
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
        c.query(crate::history::schema::DATABASES, &[])
            .await
            .map_err(db_err("list databases"))?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        databases.to_vec()
    };
    let mut snaps: Vec<(String, String, Client)> = Vec::new();
    for db in &dbs {
        for b in backends {
            let c = connect(&b.host, b.port, cfg, db, "chorus-verify")
                .await
                .map_err(db_err(format!("connect to {} database {db}", b.name)))?;
            c.batch_execute(SETTINGS).await.map_err(db_err("settings"))?;
            snaps.push((db.clone(), b.name.clone(), c));
        }
    }
    Ok(Snapshots { names: backends.iter().map(|b| b.name.clone()).collect(), snaps })
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
            let r = checksums(c).await;
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

async fn checksums(c: &Client) -> Result<BTreeMap<String, Sum>, tokio_postgres::Error> {
    let mut out = BTreeMap::new();
    let tables: Vec<(String, String)> = c.query(TABLES, &[]).await?.iter().map(|r| (r.get(0), r.get(1))).collect();
    for (t, hash) in tables {
        let q = format!("SELECT count(*), coalesce(sum({hash}), 0)::text FROM {t}");
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
