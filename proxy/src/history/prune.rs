//! Pruning: entries older than `history_retention` (and, with `history_retention_bytes`, the
//! oldest beyond that many bytes of entries) are deleted on every in-sync backend, the
//! newest entry of each database always kept (it carries the serial a restarted Chorus goes
//! on from), and, while a join follows the history from the point its copy was taken, every
//! entry after that point (`History::hold_after`). Each backend prunes its own copy directly:
//! the schema is Chorus's, outside the data that `verify` compares, and a unit's entry is the
//! same wherever it is.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{schema, History};
use crate::cluster::{Cluster, Login};
use crate::config::Config;

/// Prunes every `history_retention / 10` (at most a minute) until `stop`.
pub fn spawn(cfg: Arc<Config>, cluster: Arc<Cluster>, history: Arc<History>, stop: CancellationToken) {
    let every = (cfg.history_retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    crate::supervise::spawn_restarting("history_prune", move || {
        let (cfg, cluster, history, stop) = (cfg.clone(), cluster.clone(), history.clone(), stop.clone());
        async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                for db in history.ready_databases() {
                    for b in cluster.in_sync() {
                        match prune(&cfg, &b.host, b.port, &db, history.prunable_upto()).await {
                            Ok((n, size)) => {
                                metrics::gauge!("chorus_history_size_bytes", "backend" => b.name.clone(), "database" => db.clone())
                                .set(size as f64);
                                if n > 0 {
                                    metrics::counter!("chorus_history_pruned_total").increment(n);
                                    tracing::debug!(database = %db, backend = %b.name, entries = n, "history pruned");
                                }
                            }
                            Err(e) => tracing::warn!(database = %db, backend = %b.name, error = %e, "history pruning failed"),
                        }
                    }
                }
                metrics::counter!("chorus_history_prune_passes_total").increment(1);
            }
        }
    });
}

/// Prunes one database's history on one backend: the entries deleted, and the history's
/// size on disk afterwards (table, index and TOAST).
async fn prune(cfg: &Config, host: &str, port: u16, db: &str, upto: u64) -> Result<(u64, u64), String> {
    let err = |e: tokio_postgres::Error| crate::cluster::pg_error(&e);
    let c = Login::health(cfg, host, port, db, "chorus-history").connect().await.map_err(err)?;
    let secs = cfg.history_retention.as_secs_f64();
    let upto = i64::try_from(upto).unwrap_or(i64::MAX);
    let n: i64 = match i64::try_from(cfg.history_retention_bytes).unwrap_or(i64::MAX) {
        0 => c.query_one(schema::PRUNE, &[&secs, &upto]).await,
        bytes => c.query_one(schema::PRUNE_BYTES, &[&secs, &upto, &bytes]).await,
    }
    .map_err(err)?
    .get(0);
    let size: i64 = c.query_one(schema::SIZE, &[]).await.map_err(err)?.get(0);
    Ok((n as u64, size as u64))
}
