//! Catch-up: a backend that left as `down` and answers again is brought back from the update
//! history instead of a copy. The units it lacks are read from an in-sync backend's history
//! and applied to it in serial order while clients keep writing; then, under a short write
//! pause (the join's attach step), the last ones are applied, its sequences compared, and it
//! enters the in-sync set.
//!
//! Why this is exact: a backend records each unit in the unit's own transaction, so its
//! history says precisely which units it holds; the in-sync backends hold every committed
//! unit (G2), and under the pause no unit is in flight. A backend whose missing units were
//! pruned already (`history_retention`), or that holds a unit the others do not, cannot be
//! brought back this way: it needs a join, and Chorus says so.
//!
//! The join uses the same machinery (`Follow`) for its newcomer and a detached donor: its copy
//! carries the donor's history up to the copy's point, so from there on a joining backend is
//! one that lacks the units written since.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;

use crate::cluster::{self, Backend, BackendState, Login};
use crate::history::apply::{Applier, ApplyError};
use crate::history::runs::{self, Run};
use crate::history::{schema, History};
use crate::shared::Shared;

/// Units still missing at which the write pause is taken for the last ones: under a load on
/// a busy machine a unit takes about a millisecond to apply, and the pause's target is 50 ms.
const ATTACH_UNITS: usize = 32;
/// Units still missing at which the write pause is taken when a round brought no progress
/// (a pause of a few hundred milliseconds rather than rounds that never end).
const STALLED_UNITS: usize = 256;
/// Entries read from the source per query.
const BATCH: usize = 500;
/// Rounds before the attach is attempted whatever the backlog (writes faster than the
/// backend can apply them would otherwise never let it attach).
const MAX_ROUNDS: usize = 40;

/// Whether the write pause is taken now for the last `left` units (`before`: those missing a
/// round earlier): few are left; or a round did not shrink a backlog small enough to apply
/// under the pause (the clients write about as fast as the backend applies: more rounds would
/// not bring it lower); or the rounds ran out.
fn attach_now(left: usize, before: usize, rounds: usize) -> bool {
    left <= ATTACH_UNITS || (left >= before && left <= STALLED_UNITS) || rounds >= MAX_ROUNDS
}

#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    #[error("the update history is off (history = false): a backend can only come back with a join")]
    NoHistory,
    #[error("no backend named {0}")]
    NoSuchBackend(String),
    #[error("{0} is {1}, not down: {2}")]
    NotDown(String, BackendState, &'static str),
    #[error(
        "{0} has not been in sync since its data was last replaced (a join that did not finish, or added later): it needs a join"
    )]
    NotMember(String),
    #[error("{0}")]
    Busy(String),
    /// The units it lacks are no longer in the history: a join is needed.
    #[error("{0} needs a join: {1}")]
    Gap(String, String),
    /// It holds what the others do not, or answered a unit differently: a join is needed.
    #[error("{0} differs from the in-sync backends and needs a join: {1}")]
    Diverged(String, String),
    /// It could not be reached or failed along the way; it stays down and may be tried again.
    #[error("catch-up of {0} failed: {1}")]
    Failed(String, String),
}

/// What a catch-up did.
#[derive(Debug, Clone, Serialize)]
pub struct CatchUpReport {
    pub name: String,
    pub units: u64,
    pub rounds: usize,
    pub seconds: f64,
    pub attach_pause_ms: f64,
}

/// Watches the backends every `health_check_interval`: notes the serial each one held when it
/// left the in-sync set, publishes each one's lag, and (`auto_catch_up`) catches up a `down`
/// backend as soon as it answers. One refused for good (it needs a join) is not tried again
/// until its state changes; one that failed along the way is tried again later.
pub fn spawn_watch(shared: Arc<Shared>) {
    let Some(history) = shared.history.clone() else { return };
    crate::supervise::spawn_restarting("catch_up_watch", move || {
        let (shared, history) = (shared.clone(), history.clone());
        async move {
            let cfg = shared.cfg.clone();
            let mut last: HashMap<String, BackendState> = HashMap::new();
            let mut refused: HashSet<String> = HashSet::new();
            let mut retry: HashMap<String, (Instant, Duration)> = HashMap::new();
            let mut tick = tokio::time::interval(cfg.health_check_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shared.stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let head = history.last_serial();
                for b in shared.cluster.backends().iter() {
                    let now = b.state();
                    let was = last.insert(b.name.clone(), now);
                    if now == BackendState::InSync || was == Some(BackendState::InSync) {
                        // In sync: it holds every serial handed out (to within units in flight).
                        b.set_applied(head);
                    }
                    let lag = if b.applied() == 0 && head > 0 { f64::NAN } else { head.saturating_sub(b.applied()) as f64 };
                    metrics::gauge!("chorus_history_lag_units", "backend" => b.name.clone()).set(lag);
                    if now != BackendState::Down {
                        refused.remove(&b.name);
                        retry.remove(&b.name);
                        continue;
                    }
                    if !cfg.auto_catch_up || !b.may_catch_up() || refused.contains(&b.name) {
                        continue;
                    }
                    if retry.get(&b.name).is_some_and(|(at, _)| Instant::now() < *at) {
                        continue;
                    }
                    if cluster::probe(&cfg, b, cfg.health_check_timeout).await.is_err() {
                        continue;
                    }
                    match catch_up(shared.clone(), &b.name).await {
                        Ok(_) => {
                            retry.remove(&b.name);
                        }
                        Err(CatchUpError::Busy(_)) => {}
                        Err(CatchUpError::Failed(..)) => {
                            let wait = retry
                                .get(&b.name)
                                .map(|(_, w)| (*w * 2).min(Duration::from_secs(60)))
                                .unwrap_or(Duration::from_secs(1));
                            retry.insert(b.name.clone(), (Instant::now() + wait, wait));
                        }
                        Err(_) => {
                            refused.insert(b.name.clone());
                        }
                    }
                }
            }
        }
    });
}

/// Brings `name`, a `down` backend, back into the in-sync set from the update history.
pub async fn catch_up(shared: Arc<Shared>, name: &str) -> Result<CatchUpReport, CatchUpError> {
    let history = shared.history.clone().ok_or(CatchUpError::NoHistory)?;
    let target = shared.cluster.backend(name).ok_or_else(|| CatchUpError::NoSuchBackend(name.to_string()))?;
    match target.state() {
        BackendState::Down => {}
        s @ (BackendState::Diverged | BackendState::NeedsRebuild) => {
            return Err(CatchUpError::NotDown(name.into(), s, "it is never caught up; it needs a join"))
        }
        s @ BackendState::InSync => return Err(CatchUpError::NotDown(name.into(), s, "nothing to do")),
        s => return Err(CatchUpError::NotDown(name.into(), s, "only a down backend is caught up")),
    }
    if !target.may_catch_up() {
        return Err(CatchUpError::NotMember(name.into()));
    }
    let _one = shared.catch_up.try_lock().map_err(|_| CatchUpError::Busy("another catch-up is under way".into()))?;
    if shared.joins.running() {
        return Err(CatchUpError::Busy("a join is under way; catch up after it".into()));
    }
    cluster::probe(&shared.cfg, &target, shared.cfg.health_check_timeout)
        .await
        .map_err(|e| CatchUpError::Failed(name.into(), format!("it does not answer: {e}")))?;
    let set = |to: BackendState, why: &str| shared.cluster.set_state_catching_up(name, to, why);
    set(BackendState::Joining, "catching up from the update history")
        .map_err(|e| CatchUpError::Failed(name.into(), e.to_string()))?;
    tracing::info!(backend = %name, "catch-up from the update history started");
    let started = Instant::now();
    let mut follow = Follow::new(&shared, &history, target.clone());
    let r = follow.run().await;
    metrics::counter!("chorus_catch_ups_total", "outcome" => outcome(&r)).increment(1);
    match r {
        Ok((rounds, pause)) => {
            let report = CatchUpReport {
                name: name.into(),
                units: follow.units,
                rounds,
                seconds: started.elapsed().as_secs_f64(),
                attach_pause_ms: pause.as_secs_f64() * 1000.0,
            };
            tracing::info!(backend = %name, units = report.units, rounds, seconds = report.seconds, attach_pause_ms = report.attach_pause_ms, "caught up from the update history; in sync");
            Ok(report)
        }
        Err(e) => {
            let to = if matches!(e, CatchUpError::Diverged(..)) { BackendState::Diverged } else { BackendState::Down };
            if let Err(s) = set(to, &e.to_string()) {
                tracing::error!(backend = %name, error = %s, "could not record the state after a failed catch-up");
            }
            tracing::warn!(backend = %name, units_applied = follow.units, error = %e, "catch-up did not complete");
            Err(e)
        }
    }
}

fn outcome<T>(r: &Result<T, CatchUpError>) -> &'static str {
    match r {
        Ok(_) => "done",
        Err(CatchUpError::Gap(..)) => "needs_join",
        Err(CatchUpError::Diverged(..)) => "diverged",
        Err(_) => "failed",
    }
}

/// One database's serials on the target and on the source.
struct Gap {
    /// The target's serials (empty: no history there).
    target: Vec<Run>,
    /// The serials the source holds and the target lacks.
    missing: Vec<u64>,
}

/// Brings one backend up to the in-sync backends from their history: rounds of the units it
/// lacks while clients write (`rounds`), then the last ones under a write pause the caller
/// holds (`finish`). A catch-up follows one backend; a join follows its newcomer and a
/// detached donor from the point where the copy was taken.
pub struct Follow<'a> {
    shared: &'a Shared,
    history: &'a History,
    target: Arc<Backend>,
    applier: Applier<'a>,
    /// Units applied so far.
    pub units: u64,
    clients: Clients,
    /// The runs of serials last read per (backend, database).
    known: HashMap<(String, String), Vec<Run>>,
}

/// Chorus's own connections to the source and the target, per database, kept for the whole
/// catch-up: the attach step's write pause then costs queries, not logins.
#[derive(Default)]
struct Clients(HashMap<(String, String), Arc<Client>>);

impl Clients {
    async fn get(&mut self, cfg: &crate::config::Config, b: &Backend, db: &str) -> Result<Arc<Client>, String> {
        let key = (b.name.clone(), db.to_string());
        if let Some(c) = self.0.get(&key).filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(connect(cfg, b, db).await?);
        self.0.insert(key, c.clone());
        Ok(c)
    }
}

impl<'a> Follow<'a> {
    pub fn new(shared: &'a Shared, history: &'a History, target: Arc<Backend>) -> Follow<'a> {
        Follow {
            shared,
            history,
            applier: Applier::new(&shared.cfg, history, target.clone()),
            target,
            units: 0,
            clients: Clients::default(),
            known: HashMap::new(),
        }
    }

    fn fail(&self) -> impl Fn(String) -> CatchUpError + '_ {
        |e| CatchUpError::Failed(self.target.name.clone(), e)
    }

    /// The catch-up: leftover sessions ended, the rounds, then the attach. The rounds and the
    /// pause it took.
    async fn run(&mut self) -> Result<(usize, Duration), CatchUpError> {
        let target = self.target.clone();
        crate::history::recover::settle(&self.shared.cfg, &target).await.map_err(self.fail())?;
        let rounds = self.rounds().await?;
        let ms = self.attach_alone("caught up from the update history", "catch_up_attach").await?;
        Ok((rounds, ms))
    }

    /// Under a write pause of its own (`step` names it in the pause histogram): the last units
    /// (`finish`), then the target in sync with `reason`. The pause it took.
    pub async fn attach_alone(&mut self, reason: &str, step: &'static str) -> Result<Duration, CatchUpError> {
        let target = self.target.clone();
        let t = self.shared.cfg.join_pause_timeout;
        let asked = Instant::now();
        let pause = self.shared.order.pause(t).await.ok_or_else(|| {
            (self.fail())(format!("writes did not pause within join_pause_timeout ({t:?}); a transaction stays open"))
        })?;
        let paused = Instant::now();
        let attached = match self.finish(asked, paused).await {
            Ok(()) => {
                let at = Instant::now();
                target.set_serves_reads(true);
                let r = self
                    .shared
                    .cluster
                    .set_state(&target.name, BackendState::InSync, reason)
                    .map_err(|e| (self.fail())(e.to_string()));
                tracing::debug!(backend = %target.name, state_ms = at.elapsed().as_secs_f64() * 1000.0, "catch-up: state recorded");
                r
            }
            Err(e) => Err(e),
        };
        drop(pause);
        let ms = paused.elapsed();
        metrics::histogram!("chorus_join_pause_seconds", "step" => step).record(ms.as_secs_f64());
        attached.map(|()| ms)
    }

    /// Applies what the target lacks, round after round while clients write, until few
    /// enough units are left to apply under a write pause. The rounds it took.
    pub async fn rounds(&mut self) -> Result<usize, CatchUpError> {
        let target = self.target.clone();
        let mut rounds = 0;
        let mut before = usize::MAX;
        loop {
            rounds += 1;
            let read = Instant::now();
            let (source, gaps) = self.gaps(&target, false).await?;
            let left: usize = gaps.values().map(|g| g.missing.len()).sum();
            target.set_applied(self.history.last_serial().saturating_sub(left as u64));
            let read_ms = read.elapsed().as_millis() as u64;
            tracing::info!(backend = %target.name, round = rounds, units_missing = left, read_ms, "catch-up round");
            if attach_now(left, before, rounds) {
                return Ok(rounds);
            }
            before = left;
            // Not yet durable: the flush under the pause makes all of it so at once.
            self.apply(&source, &target, &gaps, BATCH * 4, false).await?;
        }
    }

    /// Under the caller's write pause (asked for at `asked`, held since `paused`): the last
    /// units applied and made durable, the sequences compared. No unit is in flight under the
    /// pause, so the source's history is whole and the target then holds all of it.
    pub async fn finish(&mut self, asked: Instant, paused: Instant) -> Result<(), CatchUpError> {
        let target = self.target.clone();
        let (source, gaps) = self.gaps(&target, true).await?;
        let under: usize = gaps.values().map(|g| g.missing.len()).sum();
        let read = Instant::now();
        if under == 0 {
            crate::join::replay::flush(&self.shared.cfg, &target).await.map_err(self.fail())?;
        } else {
            self.apply(&source, &target, &gaps, usize::MAX, true).await?;
        }
        let applied = Instant::now();
        for db in gaps.keys() {
            self.same_sequences(&source, &target, db).await?;
        }
        target.set_applied(self.history.last_serial());
        let part = |a: Instant, b: Instant| (b.saturating_duration_since(a).as_secs_f64() * 1000.0 * 10.0).round() / 10.0;
        tracing::info!(
            backend = %target.name,
            units = under,
            wait_ms = part(asked, paused),
            read_ms = part(paused, read),
            apply_ms = part(read, applied),
            sequences_ms = part(applied, Instant::now()),
            "catch-up attach: the write pause's parts"
        );
        Ok(())
    }

    /// Per database of the source (the lead), what the target lacks. `exact`: under the write
    /// pause, where a unit the target holds and the source does not means it diverged.
    async fn gaps(&mut self, target: &Backend, exact: bool) -> Result<(Arc<Backend>, BTreeMap<String, Gap>), CatchUpError> {
        let name = &target.name;
        let fail = |e: String| CatchUpError::Failed(name.clone(), e);
        let source =
            self.shared.cluster.in_sync().into_iter().next().ok_or_else(|| fail("no in-sync backend to read from".into()))?;
        let cfg = &self.shared.cfg;
        let src = self.clients.get(cfg, &source, &cfg.health_check_database).await.map_err(fail)?;
        let dbs: Vec<String> = src
            .query(crate::history::schema::DATABASES, &[])
            .await
            .map_err(|e| fail(cluster::pg_error(&e)))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut out = BTreeMap::new();
        for db in dbs {
            let c = self.clients.get(cfg, &source, &db).await.map_err(fail)?;
            // A database created while it was down has no history there: its units create it.
            let t = match self.clients.get(cfg, target, &db).await {
                Ok(t) => Some(t),
                Err(e) if exists_on(cfg, target, &db).await.map_err(fail)? => return Err(fail(e)),
                Err(_) => None,
            };
            // Both at once: under the write pause this read is most of the pause.
            let (src_key, dst_key) = ((source.name.clone(), db.clone()), (name.clone(), db.clone()));
            let (ours, theirs) = tokio::join!(serials(&c, &source, self.known.get(&src_key).cloned()), async {
                match &t {
                    Some(t) => serials(t, target, self.known.get(&dst_key).cloned()).await,
                    None => Ok(None),
                }
            });
            let Some((have, pruned)) = ours.map_err(fail)? else { continue };
            let theirs = theirs.map_err(fail)?.map(|(t, _)| t).unwrap_or_default();
            self.known.insert(src_key, have.clone());
            self.known.insert(dst_key, theirs.clone());
            let newest = theirs.last().map_or(0, |r| r.1);
            if pruned > newest {
                return Err(CatchUpError::Gap(
                    name.clone(),
                    format!(
                        "units after serial {newest} of database {db} were pruned from the history (history_retention = {:?})",
                        cfg.history_retention
                    ),
                ));
            }
            let floor = have.first().map_or(0, |r| r.0);
            if exact {
                if let Some(extra) = runs::minus(&theirs, &have).iter().map(|r| r.1).find(|s| *s >= floor) {
                    return Err(CatchUpError::Diverged(
                        name.clone(),
                        format!("it holds unit {extra} of database {db}, which {} does not", source.name),
                    ));
                }
            }
            let missing: Vec<u64> = runs::minus(&have, &theirs).into_iter().flat_map(|(lo, hi)| lo..=hi).collect();
            out.insert(db, Gap { target: theirs, missing });
        }
        Ok((source, out))
    }

    /// Applies up to `most` of the missing units, all databases together in serial order;
    /// `durable`: the last one's commit waits for the WAL flush, and so makes every unit
    /// applied before it durable.
    async fn apply(
        &mut self,
        source: &Backend,
        target: &Backend,
        gaps: &BTreeMap<String, Gap>,
        most: usize,
        durable: bool,
    ) -> Result<(), CatchUpError> {
        let name = &target.name;
        let fail = |e: String| CatchUpError::Failed(name.clone(), e);
        let mut order: Vec<(u64, &str)> =
            gaps.iter().flat_map(|(db, g)| g.missing.iter().map(move |s| (*s, db.as_str()))).collect();
        order.sort_unstable();
        order.truncate(most);
        for db in gaps.keys() {
            // A database new to the target gets its history's home before its first unit.
            if gaps[db].target.is_empty()
                && order.iter().any(|(_, d)| d == db)
                && exists_on(&self.shared.cfg, target, db).await.map_err(fail)?
            {
                crate::history::install(
                    &self.shared.cfg,
                    &target.host,
                    target.port,
                    db,
                    self.history.key(),
                    self.history.epoch(),
                )
                .await
                .map_err(fail)?;
            }
        }
        let cfg = &self.shared.cfg;
        let chunks = order.len().div_ceil(BATCH);
        for (k, chunk) in order.chunks(BATCH).enumerate() {
            let mut entries: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            for db in chunk.iter().map(|(_, d)| *d).collect::<BTreeSet<_>>() {
                let c = self.clients.get(cfg, source, db).await.map_err(fail)?;
                let wanted: Vec<i64> = chunk.iter().filter(|(_, d)| *d == db).map(|(s, _)| *s as i64).collect();
                let rows = c
                    .query("SELECT serial, unit FROM chorus.history WHERE serial = ANY($1)", &[&wanted])
                    .await
                    .map_err(|e| fail(cluster::pg_error(&e)))?;
                entries.extend(rows.iter().map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, Vec<u8>>(1))));
            }
            let mut list: Vec<(u64, &[u8])> = Vec::with_capacity(chunk.len());
            for (serial, db) in chunk {
                let raw =
                    entries.get(serial).ok_or_else(|| fail(format!("unit {serial} of {db} left {}'s history", source.name)))?;
                list.push((*serial, raw));
            }
            let r = self.applier.apply_all(&list, durable && k + 1 == chunks).await;
            let n = match &r {
                Ok(n) => *n,
                Err(_) => 0,
            };
            self.units += n as u64;
            metrics::counter!("chorus_catch_up_units_total").increment(n as u64);
            if let Some((last, _)) = list.get(n.saturating_sub(1)).filter(|_| n > 0) {
                target.set_applied(target.applied().max(*last));
            }
            match r {
                Ok(_) => {}
                Err(ApplyError::Failed(e)) => return Err(fail(e)),
                Err(ApplyError::Differs(e)) => return Err(CatchUpError::Diverged(name.clone(), e)),
            }
        }
        Ok(())
    }
}

async fn connect(cfg: &crate::config::Config, b: &Backend, db: &str) -> Result<Client, String> {
    Login::health(cfg, &b.host, b.port, db, "chorus-catch-up")
        .connect()
        .await
        .map_err(|e| format!("{}: {}", b.name, cluster::pg_error(&e)))
}

/// The runs of serials `b` holds in a database and the newest serial pruned there (None: no
/// history there). `known`: runs read from it before, so only what can have been added since
/// is read (a unit is only ever added to a history, or pruned when old).
async fn serials(c: &Client, b: &Backend, known: Option<Vec<Run>>) -> Result<Option<(Vec<Run>, u64)>, String> {
    let err = |e: tokio_postgres::Error| format!("{}: {}", b.name, cluster::pg_error(&e));
    if !c.query_one(schema::EXISTS, &[]).await.map_err(err)?.get::<_, bool>(0) {
        return Ok(None);
    }
    let (held, pruned) = tokio::join!(crate::history::read_runs(c, known.as_deref()), c.query_one(schema::PRUNED, &[]));
    let (held, pruned): (Vec<Run>, i64) = (held.map_err(err)?, pruned.map_err(err)?.get(0));
    Ok(Some((held, pruned as u64)))
}

async fn exists_on(cfg: &crate::config::Config, b: &Backend, db: &str) -> Result<bool, String> {
    let c = connect(cfg, b, &cfg.health_check_database).await?;
    let row = c
        .query_one("SELECT count(*) > 0 FROM pg_database WHERE datname = $1", &[&db])
        .await
        .map_err(|e| format!("{}: {}", b.name, cluster::pg_error(&e)))?;
    Ok(row.get(0))
}

impl Follow<'_> {
    /// Sequences are not transactional: a unit that ran on the backend before it left drew
    /// values that applying it again cannot give back. Equal, or the backend needs a join.
    async fn same_sequences(&mut self, source: &Backend, target: &Backend, db: &str) -> Result<(), CatchUpError> {
        let fail = |e: String| CatchUpError::Failed(target.name.clone(), e);
        let cfg = &self.shared.cfg;
        let (t, s) =
            (self.clients.get(cfg, target, db).await.map_err(fail)?, self.clients.get(cfg, source, db).await.map_err(fail)?);
        let (theirs, ours) = tokio::join!(sequences(&t, target), sequences(&s, source));
        let (theirs, ours) = (theirs.map_err(fail)?, ours.map_err(fail)?);
        if theirs == ours {
            return Ok(());
        }
        let differ: Vec<&String> = ours.iter().filter(|o| !theirs.contains(o)).map(|(n, _)| n).collect();
        Err(CatchUpError::Diverged(
            target.name.clone(),
            format!("sequences {differ:?} of database {db} differ from {}'s after the units it lacked were applied", source.name),
        ))
    }
}

async fn sequences(c: &Client, b: &Backend) -> Result<Vec<(String, Option<i64>)>, String> {
    let rows = c
        .query("SELECT format('%I.%I', schemaname, sequencename), last_value FROM pg_sequences ORDER BY 1", &[])
        .await
        .map_err(|e| format!("{}: {}", b.name, cluster::pg_error(&e)))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_is_taken_when_few_are_left_when_progress_stops_or_when_rounds_run_out() {
        assert!(!attach_now(12_000, usize::MAX, 1), "a long backlog is applied while clients write");
        assert!(!attach_now(5_000, 4_000, 3), "no progress, but too many for the pause");
        assert!(!attach_now(900, 1_200, 4), "still shrinking");
        assert!(attach_now(ATTACH_UNITS, 1_000, 5));
        assert!(attach_now(200, 180, 26), "writes as fast as it applies: the backlog stays");
        assert!(!attach_now(739, 729, 22), "stalled, but too many for the pause");
        assert!(attach_now(5_000, 4_000, MAX_ROUNDS));
    }
}
