//! Recovery before Chorus serves: every in-sync backend's history is read, and each backend
//! is given, in serial order, the units that another backend committed and it lacks (a crash
//! of Chorus between the commits of one unit on different backends leaves exactly that).
//!
//! Only serials from the newest of the backends' oldest entries on are compared: below it,
//! pruning may have removed an entry on one backend and not yet on another.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_postgres::Client;

use super::apply::{Applier, ApplyError};
use super::runs::{self, Run};
use super::{schema, History};
use crate::cluster::{Backend, BackendState, Cluster, Login};
use crate::config::Config;

/// What recovery did.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Units applied to a backend that lacked them.
    pub units: u64,
    /// The newest serial found.
    pub newest: u64,
}

/// Reads every in-sync backend's history, completes the units some lack, and sets the serial
/// counter after the newest. A backend that cannot be given a unit leaves the in-sync set.
pub async fn recover(cfg: &Config, cluster: &Cluster, history: &History) -> Result<Recovered, String> {
    let mut done = Recovered::default();
    // After a takeover the backends are fenced: nothing the last leader has open can commit,
    // so there is nothing to wait for before ending it.
    let wait = if history.epoch() > 0 { std::time::Duration::ZERO } else { SETTLE_WAIT };
    let in_sync = cluster.in_sync();
    let settled = futures::future::join_all(in_sync.iter().map(|b| settle_within(cfg, b, wait))).await;
    for (b, r) in in_sync.iter().zip(settled) {
        if let Err(e) = r {
            tracing::warn!(backend = %b.name, error = %e, "cannot wait for the last Chorus's transactions to end");
        }
    }
    // A unit may create a database whose own units come after it: go again while units were
    // applied (a few rounds at most).
    for _ in 0..4 {
        let before = done.units;
        for db in databases(cfg, cluster).await? {
            recover_database(cfg, cluster, history, &db, &mut done).await;
        }
        if done.units == before {
            break;
        }
    }
    history.observe(done.newest);
    metrics::counter!("chorus_history_recovered_units_total").increment(done.units);
    Ok(done)
}

async fn databases(cfg: &Config, cluster: &Cluster) -> Result<Vec<String>, String> {
    let mut last = String::from("no in-sync backend");
    for b in cluster.in_sync() {
        let c = match Login::health(cfg, &b.host, b.port, &cfg.health_check_database, "chorus-recovery").connect().await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{}: {}", b.name, crate::cluster::pg_error(&e));
                continue;
            }
        };
        let rows = c.query(crate::history::schema::DATABASES, &[]).await.map_err(|e| crate::cluster::pg_error(&e))?;
        return Ok(rows.iter().map(|r| r.get(0)).collect());
    }
    Err(format!("cannot list databases for recovery: {last}"))
}

/// Waits until no session of Chorus's users is inside a transaction on `b` (at most 5 s),
/// then ends those still inside one. A session the last Chorus left with a COMMIT unread
/// would otherwise commit it while the unit is being applied there too. Sessions outside a
/// transaction (an operator's psql, say) are left alone.
pub async fn settle(cfg: &Config, b: &Backend) -> Result<(), String> {
    settle_within(cfg, b, SETTLE_WAIT).await
}

/// How long `settle` lets the last Chorus's transactions end by themselves.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

async fn settle_within(cfg: &Config, b: &Backend, wait: std::time::Duration) -> Result<(), String> {
    let c = Login::health(cfg, &b.host, b.port, &cfg.health_check_database, "chorus-recovery")
        .connect()
        .await
        .map_err(|e| crate::cluster::pg_error(&e))?;
    let mut users: Vec<String> = cfg.users.iter().map(|u| u.name.clone()).collect();
    users.push(cfg.health_user().name.clone());
    const IN_TX: &str = "FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
                         AND usename = ANY($1) AND application_name NOT LIKE 'chorus-%' AND xact_start IS NOT NULL";
    let deadline = std::time::Instant::now() + wait;
    loop {
        let n: i64 =
            c.query_one(&format!("SELECT count(*) {IN_TX}"), &[&users]).await.map_err(|e| crate::cluster::pg_error(&e))?.get(0);
        if n == 0 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let ended = c
        .execute(&format!("SELECT pg_terminate_backend(pid, 10000) {IN_TX}"), &[&users])
        .await
        .map_err(|e| crate::cluster::pg_error(&e))?;
    tracing::warn!(backend = %b.name, sessions = ended, "ended sessions still inside a transaction of the last Chorus");
    Ok(())
}

/// One backend's serials in `db` as runs (None: it has no history there).
async fn serials(c: &Client) -> Result<Option<Vec<Run>>, String> {
    let exists: bool = c.query_one(schema::EXISTS, &[]).await.map_err(|e| crate::cluster::pg_error(&e))?.get(0);
    if !exists {
        return Ok(None);
    }
    super::read_runs(c, None).await.map(Some).map_err(|e| crate::cluster::pg_error(&e))
}

async fn entry(c: &Client, serial: u64) -> Result<Vec<u8>, String> {
    let row = c
        .query_one("SELECT unit FROM chorus.history WHERE serial = $1", &[&(serial as i64)])
        .await
        .map_err(|e| crate::cluster::pg_error(&e))?;
    Ok(row.get(0))
}

async fn connect(cfg: &Config, b: &Backend, db: &str) -> Result<Client, String> {
    Login::health(cfg, &b.host, b.port, db, "chorus-recovery").connect().await.map_err(|e| crate::cluster::pg_error(&e))
}

async fn recover_database(cfg: &Config, cluster: &Cluster, history: &History, db: &str, done: &mut Recovered) {
    // Per backend: its connection (kept for the entries read from it) and its serials.
    let mut held: BTreeMap<usize, (Arc<Backend>, Client, Vec<Run>)> = BTreeMap::new();
    for b in cluster.in_sync() {
        let read = async {
            let c = connect(cfg, &b, db).await?;
            Ok::<_, String>(serials(&c).await?.map(|s| (c, s)))
        };
        match read.await {
            Ok(Some((c, s))) => {
                held.insert(b.idx, (b, c, s));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(database = %db, backend = %b.name, error = %e, "cannot read the update history"),
        }
    }
    done.newest = done.newest.max(held.values().filter_map(|(_, _, s)| s.last().map(|r| r.1)).max().unwrap_or(0));
    let plan = missing(held.iter().map(|(i, (_, _, s))| (*i, &s[..])));
    let mut given: BTreeMap<usize, Arc<Backend>> = BTreeMap::new();
    let mut appliers: BTreeMap<usize, Applier> = BTreeMap::new();
    for (idx, serial) in plan {
        let Some((target, _, _)) = held.get(&idx) else { continue };
        if !target.is_in_sync() {
            continue;
        }
        let Some((source, c, _)) = held.values().find(|(b, _, s)| runs::contains(s, serial) && b.is_in_sync()) else {
            continue;
        };
        let raw = match entry(c, serial).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(database = %db, backend = %source.name, serial, error = %e, "cannot read a history entry");
                continue;
            }
        };
        let source = source.clone();
        let applier = appliers.entry(idx).or_insert_with(|| Applier::new(cfg, history, target.clone()));
        match applier.apply(serial, &raw).await {
            Ok(()) => {
                done.units += 1;
                given.insert(target.idx, source.clone());
                tracing::info!(database = %db, backend = %target.name, serial, from = %source.name, "recovered a unit the backend lacked");
            }
            Err(e) => {
                let (state, why) = match &e {
                    ApplyError::Failed(m) => (BackendState::Down, format!("recovery could not apply a unit it lacks: {m}")),
                    ApplyError::Differs(m) => (BackendState::Diverged, format!("recovery: {m}")),
                };
                tracing::error!(database = %db, backend = %target.name, serial, error = %e, "recovery failed; the backend leaves the in-sync set");
                cluster.eject(target.idx, state, &why);
            }
        }
    }
    // A unit whose statements ran on a backend that then lost it advanced that backend's
    // sequences: applied again, it drew other values. Such a backend is not identical.
    for (idx, source) in given {
        let Some((target, _, _)) = held.get(&idx) else { continue };
        match (sequences(cfg, target, db).await, sequences(cfg, &source, db).await) {
            (Ok(t), Ok(s)) if t == s => {}
            (Ok(t), Ok(s)) => {
                let differ: Vec<&String> = s.keys().filter(|k| t.get(*k) != s.get(*k)).collect();
                let why = format!(
                    "recovery: sequences {differ:?} differ from {}'s after the units it lacked were applied; it needs a join",
                    source.name
                );
                tracing::error!(database = %db, backend = %target.name, "{why}");
                cluster.eject(target.idx, BackendState::Diverged, &why);
            }
            (Err(e), _) | (_, Err(e)) => tracing::warn!(database = %db, error = %e, "cannot compare sequences after recovery"),
        }
    }
}

/// Every sequence of `db` on `b` with its state.
async fn sequences(cfg: &Config, b: &Backend, db: &str) -> Result<BTreeMap<String, (Option<i64>, bool)>, String> {
    let c =
        Login::health(cfg, &b.host, b.port, db, "chorus-recovery").connect().await.map_err(|e| crate::cluster::pg_error(&e))?;
    let rows = c
        .query("SELECT format('%I.%I', schemaname, sequencename), last_value, last_value IS NOT NULL FROM pg_sequences", &[])
        .await
        .map_err(|e| crate::cluster::pg_error(&e))?;
    Ok(rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect())
}

/// Per backend, the serials others hold and it lacks, in serial order, from the newest of the
/// backends' oldest entries on.
fn missing<'a>(held: impl Iterator<Item = (usize, &'a [Run])> + Clone) -> Vec<(usize, u64)> {
    let floor = held.clone().filter_map(|(_, s)| s.first().map(|r| r.0)).max().unwrap_or(0);
    let all = runs::from(&held.clone().fold(Vec::new(), |acc, (_, s)| runs::union(&acc, s)), floor);
    let mut out: Vec<(usize, u64)> = held
        .flat_map(|(i, s)| runs::minus(&all, s).into_iter().flat_map(move |(lo, hi)| (lo..=hi).map(move |x| (i, x))))
        .collect();
    out.sort_unstable_by_key(|&(i, serial)| (serial, i));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_missing_is_what_another_holds_above_the_common_floor() {
        let a: &[Run] = &[(3, 5), (7, 7), (9, 9)];
        let b: &[Run] = &[(5, 5), (7, 7)];
        let c: &[Run] = &[(4, 5), (9, 10)];
        let got = missing([(0, a), (1, b), (2, c)].into_iter());
        // Floor 5: serials 3 and 4 may have been pruned on b.
        assert_eq!(got, vec![(2, 7), (1, 9), (0, 10), (1, 10)]);
        assert_eq!(missing([(0, a), (1, &[][..])].into_iter()).len(), 5, "an empty history lacks everything");
    }
}
