//! One member of the group on etcd: its lease, the campaign for the leader key, and the clock
//! that tells how long its leadership is provably alive.
//!
//! Keys, under `/chorus/<cluster>/`: `leader` (the leader's `MemberInfo`, bound to its lease;
//! its last write's revision is the epoch: the creation, or a switchover's handover) and `members/<node>` (each member's, bound to its own
//! lease). A keep-alive sent at `t` and answered proves the lease alive until `t + ttl` at the
//! earliest (etcd renews from when it receives it), so the leader may serve until then, less a
//! margin for the step-down itself; past it, it is deposed whatever etcd would say.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{HaStatus, MemberInfo, Role};
use crate::config::HaConfig;

/// How often a standby tries for the key (and reads who leads).
const CAMPAIGN_EVERY: Duration = Duration::from_millis(200);
/// How often a standby named by a switchover looks for the key.
const PARKED_POLL: Duration = Duration::from_millis(20);
/// Taken off the proven lease: the step-down must be over before etcd can expire it.
const MARGIN: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error("etcd at {endpoints}: {source}")]
    Etcd { endpoints: String, source: etcd_client::Error },
    #[error("this member's leadership task ended (a panic): starting again")]
    TaskEnded,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) role: Role,
    leader: Option<MemberInfo>,
    epoch: u64,
    /// Until when this member's lease is provably alive (None: no lease).
    valid_until: Option<Instant>,
    /// The lease's id while it has one.
    pub(super) lease: Option<i64>,
    members: Vec<MemberInfo>,
}

/// This instance's membership; cheap to clone.
#[derive(Clone)]
pub struct Member {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    cluster: String,
    pub(super) me: MemberInfo,
    pub(super) prefix: String,
    ttl: Duration,
    pub(super) client: Client,
    state: Mutex<State>,
    role: watch::Sender<(Role, u64)>,
    /// A planned switchover's course (`switchover`).
    pub(super) handover: watch::Sender<Handover>,
    /// True while a switchover to this member is announced: it opens its client port (and
    /// lets connections wait in the backlog) before it leads.
    parking: watch::Sender<bool>,
    stop: CancellationToken,
}

/// Where a planned switchover stands, on the leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Handover {
    None,
    /// The target has its port open: the leader drains and then hands over to it.
    Draining {
        to: MemberInfo,
        lease: i64,
    },
    /// Over: the key is the target's (Ok), or the handover failed (Err, the reason).
    Done(Result<u64, String>),
}

impl Member {
    /// Connects to etcd and starts campaigning in the background.
    pub async fn start(cfg: &HaConfig, address: String, admin: String) -> Result<Member, HaError> {
        let endpoints = cfg.etcd_endpoints.join(",");
        let request_timeout = (cfg.lease_ttl / 3).min(Duration::from_secs(1));
        // require_leader: a member cut off from etcd's quorum answers with an error at once,
        // never with what it last knew.
        let opts =
            ConnectOptions::new().with_connect_timeout(request_timeout).with_timeout(request_timeout).with_require_leader(true);
        let client =
            Client::connect(&cfg.etcd_endpoints, Some(opts)).await.map_err(|source| HaError::Etcd { endpoints, source })?;
        let me = MemberInfo { node: cfg.node(), address, admin };
        let (role, _) = watch::channel((Role::Starting, 0));
        let inner = Arc::new(Inner {
            cluster: cfg.cluster.clone(),
            prefix: format!("/chorus/{}/", cfg.cluster),
            me,
            ttl: cfg.lease_ttl,
            client,
            state: Mutex::new(State {
                role: Role::Starting,
                leader: None,
                epoch: 0,
                valid_until: None,
                lease: None,
                members: Vec::new(),
            }),
            role,
            handover: watch::channel(Handover::None).0,
            parking: watch::channel(false).0,
            stop: CancellationToken::new(),
        });
        metrics::gauge!("chorus_ha_leader").set(0.0);
        if let Some(id) = std::env::var(LEASE_ENV).ok().and_then(|v| v.parse::<i64>().ok()) {
            tokio::spawn(revoke_stale(inner.client.clone(), id));
        }
        // A panic in either task leaves the lease unproven: the member is deposed (and starts
        // again), never left leading without its clock.
        for task in [tokio::spawn(inner.clone().run()), tokio::spawn(inner.clone().clock())] {
            let inner = inner.clone();
            tokio::spawn(async move {
                if task.await.is_err_and(|e| e.is_panic()) {
                    tracing::error!("a leadership task panicked");
                    metrics::counter!("chorus_job_panics_total", "job" => "ha").increment(1);
                    inner.depose("a leadership task panicked");
                }
            });
        }
        Ok(Member { inner })
    }

    /// Waits until this member leads; its epoch.
    pub async fn leading(&self) -> u64 {
        let mut rx = self.inner.role.subscribe();
        loop {
            if let (Role::Leader, epoch) = &*rx.borrow_and_update() {
                return *epoch;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Completes when this member no longer leads (deposed).
    pub async fn lost(&self) {
        let mut rx = self.inner.role.subscribe();
        loop {
            if rx.borrow_and_update().0 == Role::Deposed {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// True while a switchover to this standby is announced (it opens its client port early);
    /// waits for a change.
    pub async fn parking_changed(&self, now: bool) -> bool {
        let mut rx = self.inner.parking.subscribe();
        loop {
            let v = *rx.borrow_and_update();
            if v != now {
                return v;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// A backend refused this member's epoch, or its lease ran out: it stops leading.
    pub fn depose(&self, why: &str) {
        self.inner.depose(why);
    }

    /// The lease this member holds now (None: none; it is not in touch with etcd).
    pub fn lease(&self) -> Option<i64> {
        self.inner.lock().lease
    }

    pub fn cluster(&self) -> String {
        self.inner.cluster.clone()
    }

    /// A handle on etcd (cheap: the connection is shared).
    pub fn client(&self) -> Client {
        self.inner.client.clone()
    }

    pub fn role(&self) -> Role {
        self.inner.role.borrow().0.clone()
    }

    pub fn status(&self) -> HaStatus {
        let s = self.inner.lock();
        let left = s.valid_until.map_or(0, |t| t.saturating_duration_since(Instant::now()).as_millis() as u64);
        HaStatus {
            cluster: self.inner.cluster.clone(),
            node: self.inner.me.node.clone(),
            role: s.role.clone(),
            leader: s.leader.as_ref().map(|l| l.node.clone()),
            leader_address: s.leader.as_ref().map(|l| l.address.clone()),
            epoch: s.epoch,
            lease_left_ms: left,
            members: s.members.clone(),
        }
    }

    /// Gives the leadership up at a clean shutdown: the key goes with the lease, so a standby
    /// need not wait for it to expire.
    pub async fn resign(&self) {
        self.inner.stop.cancel();
        let lease = self.inner.lock().lease.take();
        if let Some(id) = lease {
            let mut c = self.inner.client.clone();
            if !matches!(tokio::time::timeout(Duration::from_secs(1), c.lease_revoke(id)).await, Ok(Ok(_))) {
                // etcd did not answer: the next run of this process gives it back (`start`).
                UNREVOKED.store(id, std::sync::atomic::Ordering::Release);
            }
        }
    }
}

/// A lease `resign` could not give back (0: none), handed to the next run of this process.
static UNREVOKED: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// The environment variable that hands an unrevoked lease to the next run of this process.
pub const LEASE_ENV: &str = "CHORUS_HA_LEASE_TO_REVOKE";

/// The lease the last `resign` could not give back, if any.
pub fn unrevoked_lease() -> Option<i64> {
    Some(UNREVOKED.load(std::sync::atomic::Ordering::Acquire)).filter(|id| *id != 0)
}

/// Gives back a lease an earlier run of this process held, once etcd answers (however long
/// that takes: after a loss of quorum etcd extends every lease, and while it lives it holds the
/// leader key, so nobody could lead until it expired by itself).
async fn revoke_stale(mut c: Client, id: i64) {
    loop {
        match c.lease_revoke(id).await {
            Ok(_) => {
                tracing::info!(lease = id, "gave back the lease of this member's last leadership");
                return;
            }
            // Expired or revoked already.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("not found") => return,
            Err(_) => tokio::time::sleep(CAMPAIGN_EVERY).await,
        }
    }
}

impl Inner {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn set_role(&self, role: Role, epoch: u64) {
        {
            let mut s = self.lock();
            s.role = role.clone();
            if epoch > 0 {
                s.epoch = epoch;
            }
        }
        metrics::gauge!("chorus_ha_leader").set(if role == Role::Leader { 1.0 } else { 0.0 });
        if epoch > 0 {
            metrics::gauge!("chorus_ha_epoch").set(epoch as f64);
        }
        self.role.send_replace((role, epoch));
    }

    fn depose(&self, why: &str) {
        let was = self.lock().role.clone();
        if was == Role::Deposed {
            return;
        }
        if was == Role::Leader {
            tracing::error!(node = %self.me.node, reason = %why, "this Chorus no longer leads: it takes no new work and starts again as a standby");
            metrics::counter!("chorus_ha_depositions_total").increment(1);
        }
        self.set_role(Role::Deposed, 0);
    }

    /// The leader's own clock, apart from every etcd call (which may hang while etcd is cut
    /// off): past the proven lease, the leader is deposed.
    async fn clock(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let expired = {
                let s = self.lock();
                s.role == Role::Leader && s.valid_until.is_none_or(|t| Instant::now() >= t)
            };
            if expired {
                metrics::counter!("chorus_ha_lease_lost_total").increment(1);
                self.depose("its etcd lease was not renewed in time (etcd unreachable or too slow)");
            }
            if self.lock().role == Role::Deposed {
                return;
            }
        }
    }

    async fn run(self: Arc<Self>) {
        let mut failing = false;
        loop {
            if self.stop.is_cancelled() || self.lock().role == Role::Deposed {
                return;
            }
            match self.term().await {
                Err(e) if !failing => {
                    tracing::warn!(error = %e, "etcd does not answer: no lease; trying again every 200 ms");
                    failing = true;
                }
                Err(e) => tracing::debug!(error = %e, "etcd: no lease; trying again"),
                Ok(()) => failing = false,
            }
            let leading = self.lock().role == Role::Leader;
            if leading {
                self.depose("its etcd lease expired");
                return;
            }
            // The lease id stays until a new one is granted: a member deposed meanwhile gives
            // it back (`resign`), or hands it to its next run.
            self.lock().valid_until = None;
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(CAMPAIGN_EVERY) => {}
            }
        }
    }

    /// One lease's life: keep it alive, campaign with it while standing by. Returns when the
    /// lease is gone (etcd says so, or it can no longer be proven alive); a failed call to
    /// etcd is tried again meanwhile (one endpoint of several may be down), and the leader's
    /// own clock (`clock`) deposes it if the lease runs out first.
    async fn term(&self) -> Result<(), etcd_client::Error> {
        let mut c = self.client.clone();
        let ttl_s = self.ttl.as_secs().max(1) as i64;
        let sent = Instant::now();
        let lease = c.lease_grant(ttl_s, None).await?.id();
        {
            let mut s = self.lock();
            s.lease = Some(lease);
            s.valid_until = Some(sent + self.ttl - MARGIN);
        }
        let info = serde_json::to_string(&self.me).unwrap_or_default();
        let member_key = format!("{}members/{}", self.prefix, self.me.node);
        c.put(member_key, info.clone(), Some(PutOptions::new().with_lease(lease))).await?;
        if self.lock().role == Role::Starting {
            self.set_role(Role::Standby, 0);
        }
        let mut keeper = None;
        let renew_every = self.ttl / 3;
        let mut next_renew = Instant::now() + renew_every;
        let mut next_members = Instant::now();
        let mut failing = false;
        loop {
            if self.stop.is_cancelled() || self.lock().role == Role::Deposed {
                return Ok(());
            }
            if self.lock().valid_until.is_none_or(|t| Instant::now() >= t) {
                return Ok(()); // no longer provably alive: a leader's clock has deposed it
            }
            let mut step = Ok(());
            if Instant::now() >= next_renew {
                let sent = Instant::now();
                match self.renew(&mut c, lease, &mut keeper, renew_every).await {
                    Ok(true) => {
                        self.lock().valid_until = Some(sent + self.ttl - MARGIN);
                        metrics::histogram!("chorus_ha_lease_renew_seconds").record(sent.elapsed().as_secs_f64());
                        next_renew = sent + renew_every;
                    }
                    Ok(false) => return Ok(()), // expired on etcd's side
                    Err(e) => {
                        keeper = None;
                        step = Err(e);
                        next_renew = Instant::now() + CAMPAIGN_EVERY;
                    }
                }
            }
            if step.is_ok() && self.lock().role != Role::Leader {
                step = self.campaign(&mut c, lease, &info).await;
            }
            if step.is_ok() && Instant::now() >= next_members {
                step = self.read_members(&mut c).await;
                next_members = Instant::now() + Duration::from_secs(1);
            }
            match step {
                Err(e) if !failing => {
                    tracing::warn!(error = %e, "etcd does not answer; trying again (the leader's lease is kept by its clock meanwhile)");
                    failing = true;
                }
                Err(e) => tracing::debug!(error = %e, "etcd still does not answer"),
                Ok(()) if failing => {
                    tracing::info!("etcd answers again");
                    failing = false;
                }
                Ok(()) => {}
            }
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.poll_every().min(next_renew.saturating_duration_since(Instant::now()))) => {}
            }
        }
    }

    /// A standby the leader is about to hand over to looks for the key often: the clients
    /// waiting at its port wait that much less.
    fn poll_every(&self) -> Duration {
        if *self.parking.borrow() {
            PARKED_POLL
        } else {
            CAMPAIGN_EVERY
        }
    }

    /// One keep-alive: whether etcd renewed the lease (false: it expired there).
    async fn renew(
        &self,
        c: &mut Client,
        lease: i64,
        keeper: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
        wait: Duration,
    ) -> Result<bool, etcd_client::Error> {
        if keeper.is_none() {
            *keeper = Some(c.lease_keep_alive(lease).await?);
        }
        let Some((k, acks)) = keeper.as_mut() else { return Ok(true) };
        k.keep_alive().await?;
        match tokio::time::timeout(wait, acks.message()).await {
            Ok(Ok(Some(r))) => Ok(r.ttl() > 0),
            Ok(Ok(None)) => Err(etcd_client::Error::WatchError("the keep-alive stream ended".into())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(etcd_client::Error::WatchError("no keep-alive answer in time".into())),
        }
    }

    /// Takes the leader key when nobody holds it; reads who does otherwise, and whether a
    /// planned switchover names this member (then the key may come to it from the leader).
    async fn campaign(&self, c: &mut Client, lease: i64, info: &str) -> Result<(), etcd_client::Error> {
        let key = format!("{}leader", self.prefix);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), info, Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::get(key, None), TxnOp::get(format!("{}{}", self.prefix, super::switchover::KEY), None)]);
        let r = c.txn(txn).await?;
        if r.succeeded() {
            let epoch = r.header().map_or(0, |h| h.revision()) as u64;
            self.won(epoch, "won the leadership");
            return Ok(());
        }
        let mut handed = None;
        let mut parked = false;
        for (i, op) in r.op_responses().into_iter().enumerate() {
            let TxnOpResponse::Get(g) = op else { continue };
            let Some(kv) = g.kvs().first() else { continue };
            if i == 0 {
                let leader: Option<MemberInfo> = serde_json::from_slice(kv.value()).ok();
                // The epoch is the key's last write: a handover rewrites it for the new holder.
                let epoch = kv.mod_revision() as u64;
                if leader.as_ref() == Some(&self.me) && kv.lease() == lease {
                    handed = Some(epoch);
                }
                let mut s = self.lock();
                s.leader = leader;
                s.epoch = epoch;
            } else {
                parked = serde_json::from_slice::<super::switchover::Announced>(kv.value()).is_ok_and(|a| a.to == self.me.node);
            }
        }
        match handed {
            // The port opened for the switchover stays open: it is the leader's now.
            Some(epoch) => self.won(epoch, "was handed the leadership"),
            None => {
                self.parking.send_if_modified(|p| std::mem::replace(p, parked) != parked);
            }
        }
        Ok(())
    }

    /// This member holds the key now (won or handed it), as of `epoch`.
    fn won(&self, epoch: u64, how: &str) {
        if self.lock().valid_until.is_none_or(|t| Instant::now() >= t) {
            return; // the lease is not provably alive: it expires, and the key with it
        }
        self.lock().leader = Some(self.me.clone());
        tracing::info!(node = %self.me.node, epoch, "this Chorus {how}");
        metrics::counter!("chorus_ha_takeovers_total").increment(1);
        self.set_role(Role::Leader, epoch);
    }

    async fn read_members(&self, c: &mut Client) -> Result<(), etcd_client::Error> {
        let r = c.get(format!("{}members/", self.prefix), Some(GetOptions::new().with_prefix())).await?;
        let mut members: Vec<MemberInfo> = r.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect();
        members.sort_by(|a, b| a.node.cmp(&b.node));
        self.lock().members = members;
        Ok(())
    }
}
