//! The update history: every unit of work that writes gets a cluster-wide serial, and every
//! backend records the unit (its serial and what applying it again takes) in table
//! `chorus.history` of the unit's database, inside the unit's own transaction.
//!
//! Why in the backends and not in Chorus's data directory: a record that commits with the
//! unit is on exactly the backends where the unit committed, whatever process dies when. So
//! after a crash of Chorus any backend that has a unit can give it to one that lacks it
//! (`recover`), and a second Chorus can read the same truth without the first one's disk.
//!
//! Serials are handed out at the commit point while the unit still holds its write locks, so
//! conflicting units get serials in the order they commit; units that do not conflict may
//! commit in either order on different backends, which changes nothing.

pub mod apply;
pub mod prune;
pub mod recover;
pub mod runs;
pub mod schema;
mod unit;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::OnceCell;

use crate::cluster::{Cluster, Login};
use crate::config::Config;
use crate::protocol::message;

pub use unit::{HistoryUnit, Shape};

/// The statement name Chorus prepares for a record on a client's connection.
const RECORD_STATEMENT: &str = "chorus_history_record";

/// The serial counter, the key and which databases have their history in place.
pub struct History {
    next: AtomicU64,
    key: String,
    ready: Mutex<HashMap<String, Arc<OnceCell<()>>>>,
    /// Units bigger than this are not kept for the history (see `history_unit_max`).
    pub unit_max: usize,
    /// Pruning keeps every entry above this serial (a join follows the history from there);
    /// u64::MAX: no hold.
    hold: AtomicU64,
    /// The leadership epoch every record carries (0 without `[ha]`): a backend whose epoch
    /// was raised past it refuses the record, and the unit with it.
    epoch: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history key file {path}: {source}")]
    Key { path: String, source: std::io::Error },
}

impl History {
    /// Reads the key from `data_dir/history.key`, making one the first time.
    pub fn open(cfg: &Config) -> Result<History, HistoryError> {
        let key = load_key(&cfg.data_dir.join("history.key"))?;
        Ok(History::with_key(key, cfg.history_unit_max))
    }

    pub fn with_key(key: String, unit_max: usize) -> History {
        History {
            next: AtomicU64::new(1),
            key,
            ready: Mutex::new(HashMap::new()),
            unit_max,
            hold: AtomicU64::new(u64::MAX),
            epoch: AtomicU64::new(0),
        }
    }

    /// A new serial (at a unit's commit point).
    pub fn next_serial(&self) -> u64 {
        let s = self.next.fetch_add(1, Ordering::AcqRel);
        metrics::gauge!("chorus_history_serial").set(s as f64);
        s
    }

    /// The newest serial handed out so far (0 before the first).
    pub fn last_serial(&self) -> u64 {
        self.next.load(Ordering::Acquire).saturating_sub(1)
    }

    /// Serials go on after `seen`, the newest a backend holds.
    pub fn observe(&self, seen: u64) {
        self.next.fetch_max(seen + 1, Ordering::AcqRel);
    }

    /// Pruning keeps the entries after `serial` (Some), or goes by the retention alone (None).
    pub fn hold_after(&self, serial: Option<u64>) {
        self.hold.store(serial.unwrap_or(u64::MAX), Ordering::Release);
    }

    /// The newest serial pruning may remove.
    pub fn prunable_upto(&self) -> u64 {
        self.hold.load(Ordering::Acquire)
    }

    /// The epoch this Chorus's records carry from now on (a new leader's, once raised).
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The frames that record unit `serial` (`entry`, encoded) on a backend: a named
    /// statement prepared afresh (unless `prepared`: every target has it from an earlier
    /// record), bound with the key and the epoch, then Sync.
    pub fn record_frames(&self, serial: u64, entry: &[u8], out: &mut BytesMut, prepared: bool) {
        let s = serial.to_string();
        let e = self.epoch().to_string();
        let params = [(false, s.as_bytes()), (true, entry), (false, self.key.as_bytes()), (false, e.as_bytes())];
        if prepared {
            message::bound_call(out, RECORD_STATEMENT, &params);
        } else {
            message::prepared_call(out, RECORD_STATEMENT, schema::RECORD, &params);
        }
    }

    /// Whether a client's request may drop the record's prepared statement on the backends
    /// (DEALLOCATE, DISCARD, a Close naming it): the next record prepares it again. A byte
    /// scan that may say yes too often, never too rarely.
    pub fn may_drop_record_statement(request: &[u8]) -> bool {
        crate::sql::contains_any_word(request, &[b"dealloc", b"discard", RECORD_STATEMENT.as_bytes()])
    }

    /// Whether `database` has its history on every in-sync backend (checked at a session's
    /// login by `ensure`).
    pub fn is_ready(&self, database: &str) -> bool {
        let cells = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        cells.get(database).is_some_and(|c| c.initialized())
    }

    /// The databases whose history is in place (used since Chorus started).
    pub fn ready_databases(&self) -> Vec<String> {
        let cells = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        cells.iter().filter(|(_, c)| c.initialized()).map(|(d, _)| d.clone()).collect()
    }

    /// Makes sure `database` has schema `chorus` on every in-sync backend, installing it the
    /// first time a session of this Chorus uses the database. Sessions of the same database
    /// wait for the one install; a failure is retried by the next session.
    pub async fn ensure(&self, cfg: &Config, cluster: &Cluster, database: &str) -> Result<(), String> {
        let cell = {
            let mut cells = self.ready.lock().unwrap_or_else(|e| e.into_inner());
            cells.entry(database.to_string()).or_default().clone()
        };
        cell.get_or_try_init(|| async {
            for b in cluster.in_sync() {
                let epoch = self.epoch();
                let found =
                    install(cfg, &b.host, b.port, database, &self.key, epoch).await.map_err(|e| format!("{}: {e}", b.name))?;
                if found > epoch {
                    return Err(format!(
                        "{}: fenced: the backend is at leadership epoch {found}, past this Chorus's {epoch}",
                        b.name
                    ));
                }
            }
            Ok::<(), String>(())
        })
        .await
        .map(|_| ())
    }
}

/// Installs the schema in `database` of one server, or only sets the key where it is there,
/// and raises its epoch to `epoch` (a leader's; 0: no `[ha]`). Returns the epoch the database
/// is at afterwards: past `epoch`, a newer leader fenced this one.
pub async fn install(cfg: &Config, host: &str, port: u16, database: &str, key: &str, epoch: u64) -> Result<u64, String> {
    let c =
        Login::health(cfg, host, port, database, "chorus-history").connect().await.map_err(|e| crate::cluster::pg_error(&e))?;
    let current: bool = c.query_one(schema::CURRENT, &[]).await.map_err(|e| crate::cluster::pg_error(&e))?.get(0);
    if !current {
        c.batch_execute(&format!("BEGIN; {}; COMMIT", schema::INSTALL)).await.map_err(|e| crate::cluster::pg_error(&e))?;
        tracing::info!(%database, server = %format!("{host}:{port}"), "update history installed");
    }
    // Added, not replaced: another Chorus in front of the same servers (a standby, a test's
    // second instance) keeps its own key working.
    c.execute("INSERT INTO chorus.key SELECT $1::text WHERE NOT EXISTS (SELECT 1 FROM chorus.key WHERE key = $1::text)", &[&key])
        .await
        .map_err(|e| crate::cluster::pg_error(&e))?;
    if epoch == 0 {
        return Ok(0);
    }
    raise_epoch(&c, epoch).await
}

/// How often a raise ends the fence's holders and tries again before it gives up.
const RAISE_ATTEMPTS: u32 = 20;

/// Raises this database's epoch to `epoch` under the fence (see `ha::fence` for why the raise
/// and a unit's check cannot interleave): the fence's holders are ended, the fence taken
/// exclusively, the epoch raised. Returns the epoch afterwards (past `epoch`: a newer leader's).
pub async fn raise_epoch(c: &tokio_postgres::Client, epoch: u64) -> Result<u64, String> {
    let pg = |e: tokio_postgres::Error| crate::cluster::pg_error(&e);
    let mut last = String::new();
    for attempt in 0..RAISE_ATTEMPTS {
        let ended: i64 = c.query_one(schema::END_FENCE_HOLDERS, &[]).await.map_err(pg)?.get(0);
        if ended > 0 {
            tracing::info!(sessions = ended, "ended server sessions of an earlier leadership that held the fence");
        }
        let taken =
            c.batch_execute("BEGIN; SET LOCAL lock_timeout = '500ms'; LOCK TABLE chorus.fence IN ACCESS EXCLUSIVE MODE").await;
        let raised = match taken {
            Ok(()) => c.query_one(schema::RAISE, &[&(epoch as i64)]).await,
            Err(e) => Err(e),
        };
        match raised {
            Ok(row) => {
                c.batch_execute("COMMIT").await.map_err(pg)?;
                return Ok(row.get::<_, i64>(0) as u64);
            }
            Err(e) => {
                last = pg(e);
                let _ = c.batch_execute("ROLLBACK").await;
                tracing::debug!(attempt, error = %last, "the fence is still held; ending its holders again");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    Err(format!("could not take the fence: {last}"))
}

fn load_key(path: &Path) -> Result<String, HistoryError> {
    let err = |source| HistoryError::Key { path: path.display().to_string(), source };
    let make = || {
        let bytes: [u8; 32] = rand::random();
        let key: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(path, &key).map_err(err)?;
        Ok(key)
    };
    match std::fs::read_to_string(path) {
        Ok(k) if !k.trim().is_empty() => Ok(k.trim().to_string()),
        Ok(_) => make(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => make(),
        Err(e) => Err(err(e)),
    }
}

/// A statement Chorus runs in a client's session, in extended form with a named statement:
/// a Query message would drop the client's unnamed prepared statement between its Parse
/// and a later Bind.
fn own_statement(cell: &'static std::sync::OnceLock<Bytes>, name: &str, sql: &str) -> Bytes {
    cell.get_or_init(|| {
        let mut b = BytesMut::new();
        message::prepared_call(&mut b, name, sql, &[]);
        b.freeze()
    })
    .clone()
}

/// The runs of serials a database's history holds (it must have one). `known`: runs read from
/// it before, so only what can have been added since is read (a unit is only ever added to a
/// history, or pruned when old).
pub async fn read_runs(c: &tokio_postgres::Client, known: Option<&[runs::Run]>) -> Result<Vec<runs::Run>, tokio_postgres::Error> {
    match known.filter(|k| !k.is_empty()) {
        None => {
            Ok(c.query(schema::RUNS, &[]).await?.iter().map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64)).collect())
        }
        Some(k) => {
            let newest = k.last().map_or(0, |r| r.1) as i64;
            let (lo, hi): (Vec<i64>, Vec<i64>) = runs::gaps(k).iter().map(|g| (g.0 as i64, g.1 as i64)).unzip();
            let rows = c.query(schema::SINCE, &[&newest, &lo, &hi]).await?;
            Ok(runs::merge(k, rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect()))
        }
    }
}

/// `BEGIN`, `COMMIT` and `ROLLBACK` for units Chorus wraps.
pub fn begin_frame() -> Bytes {
    static F: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    own_statement(&F, "chorus_begin", "BEGIN")
}

pub fn commit_frame() -> Bytes {
    static F: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    own_statement(&F, "chorus_commit", "COMMIT")
}

pub fn rollback_frame() -> Bytes {
    static F: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    own_statement(&F, "chorus_rollback", "ROLLBACK")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_well_formed() {
        let codec = crate::protocol::FrameCodec::new(1 << 20);
        for (f, sql) in [(begin_frame(), "BEGIN"), (commit_frame(), "COMMIT"), (rollback_frame(), "ROLLBACK")] {
            let (tag, len) = codec.peek(&f).unwrap().unwrap();
            assert_eq!(tag, b'C');
            let (_, text) = message::parse_fields(&f[len + 5..]).unwrap();
            assert_eq!(text, sql.as_bytes());
        }
        let h = History::with_key("k".into(), 1 << 20);
        let mut out = BytesMut::new();
        h.record_frames(42, b"entry", &mut out, false);
        let mut tags = Vec::new();
        let mut at = 0;
        while let Some((tag, len)) = codec.peek(&out[at..]).unwrap() {
            tags.push(tag);
            at += len;
        }
        assert_eq!(at, out.len());
        assert_eq!(tags, b"CPBES");
        out.clear();
        h.record_frames(42, b"entry", &mut out, true);
        assert_eq!(out[0], b'B', "prepared before: Bind, Execute, Sync only");
        assert!(History::may_drop_record_statement(b"Q\0\0\0\x10DEALLOCATE ALL\0"));
        assert!(History::may_drop_record_statement(b"discard all"));
        assert!(History::may_drop_record_statement(b"C\0\0\0\x1aSchorus_history_record\0"));
        assert!(!History::may_drop_record_statement(b"UPDATE t SET v = 1"));
    }

    #[test]
    fn serials_go_on_after_the_newest_seen() {
        let h = History::with_key("k".into(), 1);
        assert_eq!(h.next_serial(), 1);
        h.observe(10);
        assert_eq!(h.next_serial(), 11);
        h.observe(3);
        assert_eq!(h.next_serial(), 12);
        assert_eq!(h.last_serial(), 12);
    }

    #[test]
    fn the_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("history.key");
        let k = load_key(&p).unwrap();
        assert_eq!(k.len(), 64);
        assert_eq!(load_key(&p).unwrap(), k);
    }
}
