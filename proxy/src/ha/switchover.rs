//! A planned switchover (`chorusctl switchover [--to NODE]`): the leader hands its key to a
//! standby without a takeover's wait for the lease, and without a failed transaction for a
//! client that reconnects.
//!
//! The steps, each one visible in etcd: the leader announces the switchover (`switchover`,
//! bound to its lease, so it goes with a leader that dies meanwhile); the named standby opens
//! its client port without accepting, so clients that arrive meanwhile wait in its backlog
//! rather than find no member listening, and says so (`ready/<node>`); the leader then drains
//! (no new sessions, each session ends at its next transaction boundary with 57P01, open
//! transactions get `switchover_timeout`), and at last rewrites the leader key for the standby,
//! under the standby's lease, in one transaction conditioned on still holding it. The key's new
//! revision is the new epoch; the standby sees the key name it, fences and recovers as in any
//! takeover, and starts accepting. No other standby can win in between: the key never
//! disappears.

use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::member::Handover;
use super::{Member, MemberInfo, Role};

/// The announcement's key, under `/chorus/<cluster>/`.
pub(super) const KEY: &str = "switchover";
/// Where a named standby says its port is open, under `/chorus/<cluster>/`.
const READY: &str = "ready/";
/// How long the leader waits for the named standby to open its port.
const READY_WITHIN: Duration = Duration::from_secs(5);

/// The announcement, as the leader writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Announced {
    pub from: String,
    pub to: String,
}

/// `POST /switchover`'s body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SwitchoverRequest {
    /// The member to hand over to (default: any other member with a live lease).
    #[serde(default)]
    pub to: Option<String>,
}

/// `POST /switchover`'s answer: the drain has begun.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwitchoverStarted {
    pub from: String,
    pub to: String,
    /// The epoch being handed over; the new leader's is greater.
    pub epoch: u64,
    /// Open transactions get this long to end.
    pub timeout_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SwitchoverError {
    #[error("this member does not lead (it is {0:?}); the leader is {1}")]
    NotLeader(Role, String),
    #[error("a switchover is already under way")]
    Busy,
    #[error("no member to hand over to: {0}")]
    NoTarget(String),
    #[error("{0} did not open its client port within {READY_WITHIN:?}: the leadership stays here")]
    NotReady(String),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
}

impl Member {
    /// On the leader: announces the switchover, waits for the target's port, and starts the
    /// drain (`draining`); the handover itself follows once the sessions have ended.
    pub async fn switchover(&self, to: Option<String>, timeout: Duration) -> Result<SwitchoverStarted, SwitchoverError> {
        let role = self.role();
        let Some(lease) = self.lease().filter(|_| role == Role::Leader) else {
            return Err(SwitchoverError::NotLeader(role, self.leader_text()));
        };
        if *self.inner.handover.borrow() != Handover::None {
            return Err(SwitchoverError::Busy);
        }
        let (me, prefix) = (&self.inner.me, &self.inner.prefix);
        let mut c = self.client();
        let r = c.get(format!("{prefix}members/"), Some(GetOptions::new().with_prefix())).await?;
        let mut others: Vec<(MemberInfo, i64)> = r
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<MemberInfo>(kv.value()).ok().map(|m| (m, kv.lease())))
            .filter(|(m, _)| m.node != me.node)
            .collect();
        others.sort_by(|a, b| a.0.node.cmp(&b.0.node));
        let target = match &to {
            Some(n) if *n == me.node => return Err(SwitchoverError::NoTarget(format!("{n} is this member, the leader"))),
            Some(n) => others.into_iter().find(|(m, _)| m.node == *n),
            None => others.into_iter().next(),
        };
        let Some((target, their_lease)) = target else {
            return Err(SwitchoverError::NoTarget(match to {
                Some(n) => format!("no member named {n} has a live lease"),
                None => "no other member has a live lease".into(),
            }));
        };
        let announced = serde_json::to_string(&Announced { from: me.node.clone(), to: target.node.clone() }).unwrap_or_default();
        let txn = Txn::new().when([Compare::lease(format!("{prefix}leader"), CompareOp::Equal, lease)]).and_then([TxnOp::put(
            format!("{prefix}{KEY}"),
            announced,
            Some(PutOptions::new().with_lease(lease)),
        )]);
        if !c.txn(txn).await?.succeeded() {
            return Err(SwitchoverError::NotLeader(Role::Deposed, "another member".into()));
        }
        tracing::info!(to = %target.node, "planned switchover announced; waiting for the standby's port");
        let ready_key = format!("{prefix}{READY}{}", target.node);
        let asked = Instant::now();
        while c.get(ready_key.as_str(), None).await?.kvs().is_empty() {
            if asked.elapsed() >= READY_WITHIN {
                let _ = c.delete(format!("{prefix}{KEY}"), None).await;
                return Err(SwitchoverError::NotReady(target.node));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = SwitchoverStarted {
            from: me.node.clone(),
            to: target.node.clone(),
            epoch: self.status().epoch,
            timeout_ms: timeout.as_millis() as u64,
        };
        tracing::info!(to = %target.node, timeout_ms = started.timeout_ms, "planned switchover: draining");
        self.inner.handover.send_replace(Handover::Draining { to: target, lease: their_lease });
        Ok(started)
    }

    /// Who leads, as this member last read it, for an operator: "b (admin API at ...)".
    fn leader_text(&self) -> String {
        let st = self.status();
        match st.members.iter().find(|m| Some(&m.node) == st.leader.as_ref()) {
            Some(m) => format!("{} (admin API at {}): run the switchover there", m.node, m.admin),
            None => "not known now".into(),
        }
    }

    /// Completes when a switchover has begun to drain this leader.
    pub async fn draining(&self) {
        let mut rx = self.inner.handover.subscribe();
        loop {
            if matches!(&*rx.borrow_and_update(), Handover::Draining { .. }) {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// On the drained leader, once its sessions have ended: the key goes to the target, under
    /// the target's lease, if this member still holds it. Either way this member leads no
    /// more; on failure the caller gives its lease back, and any standby may win the key.
    pub async fn hand_over(&self) -> Result<u64, String> {
        let Handover::Draining { to, lease: theirs } = self.inner.handover.borrow().clone() else {
            return Err("no switchover under way".into());
        };
        let mine = self.lease().unwrap_or_default();
        let prefix = &self.inner.prefix;
        let key = format!("{prefix}leader");
        let info = serde_json::to_string(&to).unwrap_or_default();
        let txn = Txn::new().when([Compare::lease(key.clone(), CompareOp::Equal, mine)]).and_then([
            TxnOp::put(key, info, Some(PutOptions::new().with_lease(theirs))),
            TxnOp::delete(format!("{prefix}{KEY}"), None),
        ]);
        let mut c = self.client();
        let result = match tokio::time::timeout(Duration::from_secs(2), c.txn(txn)).await {
            Ok(Ok(r)) if r.succeeded() => Ok(r.header().map_or(0, |h| h.revision()) as u64),
            Ok(Ok(_)) => Err("this member no longer held the leader key".to_string()),
            Ok(Err(e)) => Err(format!("etcd: {e}")),
            Err(_) => Err("etcd did not answer within 2 s".to_string()),
        };
        self.inner.set_role(Role::Deposed, 0);
        match &result {
            Ok(epoch) => tracing::info!(to = %to.node, epoch, "planned switchover: the leadership is handed over"),
            Err(e) => {
                tracing::error!(to = %to.node, error = %e, "planned switchover: the handover failed; giving the lease back")
            }
        }
        self.inner.handover.send_replace(Handover::Done(result.clone()));
        result
    }

    /// On the standby a switchover names: its port is open (or closed again).
    pub async fn announce_ready(&self, ready: bool) -> Result<(), etcd_client::Error> {
        let key = format!("{}{READY}{}", self.inner.prefix, self.inner.me.node);
        let mut c = self.client();
        match (ready, self.lease()) {
            (true, Some(lease)) => c.put(key, "", Some(PutOptions::new().with_lease(lease))).await.map(|_| ()),
            _ => c.delete(key, None).await.map(|_| ()),
        }
    }
}
