//! The fence: a new leader raises the leadership epoch in every database's history on every
//! in-sync backend before it serves, so that no unit of an earlier leader commits after.
//!
//! Why the raise and a unit's check cannot interleave so that a stale unit commits: the
//! record (`chorus.record`) takes `chorus.fence` in ACCESS SHARE mode and holds it to the
//! unit's end, then reads the epoch from a sequence (not versioned: the value now, whatever
//! the unit's snapshot). The raise takes `chorus.fence` in ACCESS EXCLUSIVE mode, so either
//! the unit checked first, and the raise waits until that unit has committed or rolled back
//! (an old unit may commit only before the new epoch exists), or the raise went first, and
//! the record waits for it and then reads the new epoch and fails with 57C01. Server
//! sessions that hold the fence (units past their record, perhaps of a frozen leader that
//! will never finish them) are ended first, so the raise does not wait on a process that
//! may never wake; what they held rolls back, and recovery completes any unit that committed
//! elsewhere.

use crate::cluster::{pg_error, Backend, Cluster, Login};
use crate::config::Config;
use crate::history::schema;

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("backend {backend}, database {database}: {message}")]
    Backend { backend: String, database: String, message: String },
    #[error(
        "backend {backend}, database {database} is at epoch {found}, past this leader's {epoch}: another member led after this one won"
    )]
    Stale { backend: String, database: String, epoch: u64, found: u64 },
}

/// Raises the epoch to `epoch` on every in-sync backend. A backend that cannot be reached
/// leaves the in-sync set (`down`: the catch-up brings it back); a backend at a newer epoch
/// means this member's leadership is already over.
pub async fn raise(cfg: &Config, cluster: &Cluster, key: &str, epoch: u64) -> Result<(), FenceError> {
    for b in cluster.in_sync() {
        match raise_backend(cfg, &b, key, epoch).await {
            Ok(n) => tracing::info!(backend = %b.name, databases = n, epoch, "epoch raised"),
            Err(e @ FenceError::Stale { .. }) => return Err(e),
            Err(e) => {
                cluster.eject(b.idx, crate::cluster::BackendState::Down, &format!("the new leader could not fence it: {e}"));
            }
        }
    }
    Ok(())
}

/// The databases with a history on `b`, each raised; how many.
async fn raise_backend(cfg: &Config, b: &Backend, key: &str, epoch: u64) -> Result<usize, FenceError> {
    let fail = |database: &str, message: String| FenceError::Backend {
        backend: b.name.clone(),
        database: database.to_string(),
        message,
    };
    let home = &cfg.health_check_database;
    let c = Login::health(cfg, &b.host, b.port, home, "chorus-fence").connect().await.map_err(|e| fail(home, pg_error(&e)))?;
    let rows = c.query(crate::history::schema::DATABASES, &[]).await.map_err(|e| fail(home, pg_error(&e)))?;
    drop(c);
    let mut n = 0;
    for row in rows {
        let db: String = row.get(0);
        let c = Login::health(cfg, &b.host, b.port, &db, "chorus-fence").connect().await.map_err(|e| fail(&db, pg_error(&e)))?;
        let has: bool = c.query_one(schema::EXISTS, &[]).await.map_err(|e| fail(&db, pg_error(&e)))?.get(0);
        if !has {
            continue;
        }
        drop(c);
        // An older schema (no fence yet) is brought up to date first, with this member's key.
        let found = crate::history::install(cfg, &b.host, b.port, &db, key, epoch).await.map_err(|e| fail(&db, e))?;
        if found != epoch {
            return Err(FenceError::Stale { backend: b.name.clone(), database: db, epoch, found });
        }
        n += 1;
    }
    Ok(n)
}
