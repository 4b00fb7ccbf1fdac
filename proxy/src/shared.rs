//! What the whole proxy shares: the configuration, the cluster and its states, the write
//! order, the catalogs, the cancel keys, the join's diff log, the update history's serials, the
//! login gates.
//!
//! Why its own floor: sessions, joins, verify and the admin API all work on it, and none of
//! them should import the listener (`server`) to reach it; the listener builds it once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::order::WriteOrder;
use crate::protocol::scram::Verifier;
use crate::session::CancelRegistry;
use crate::sql::catalog::Catalogs;

/// What every session shares.
pub struct Shared {
    pub cfg: Arc<Config>,
    pub cluster: Arc<Cluster>,
    pub order: WriteOrder,
    pub catalogs: Arc<Catalogs>,
    pub cancels: Arc<CancelRegistry>,
    /// The diff log of the join under way, which sessions append their units to.
    pub difflog: crate::difflog::Slot,
    pub joins: crate::join::Joins,
    /// Held by the catch-up under way (one at a time).
    pub catch_up: tokio::sync::Mutex<()>,
    /// Serials and the update history's state (None: `history = false`).
    pub history: Option<Arc<crate::history::History>>,
    /// Cancelled when Chorus starts shutting down.
    pub stop: CancellationToken,
    /// Backend logins under way at once (`login_concurrency`): a storm of clients queues.
    pub logins: tokio::sync::Semaphore,
    /// Failed client logins, answered one at a time per address (`auth_failure_delay`).
    pub auth_failures: crate::session::auth_delay::FailureGates,
    verifiers: HashMap<String, Verifier>,
    /// TLS toward clients (None: `[tls]` mode `disable`).
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    /// Client connections open now (the listener counts them).
    pub(crate) clients: AtomicUsize,
    /// This instance's membership of a group on etcd (None: no `[ha]`, it runs alone).
    pub ha: Option<crate::ha::Member>,
    /// What the leader shares through etcd besides the backend states (a join's progress).
    pub ha_states: Option<crate::ha::states::EtcdStates>,
    /// Cancelled when this instance stops leading: sessions end at once with 57P01.
    pub deposed: CancellationToken,
    /// Cancelled (before `stop`) when a planned switchover drains this leader: sessions end
    /// at their next transaction boundary with 57P01 rather than 57P03.
    pub handing_over: CancellationToken,
}

impl Shared {
    pub fn new(cfg: Arc<Config>, cluster: Arc<Cluster>, history: Option<Arc<crate::history::History>>) -> Shared {
        let verifiers = cfg.users.iter().map(|u| (u.name.clone(), Verifier::from_password(&u.password))).collect();
        Shared {
            logins: tokio::sync::Semaphore::new(cfg.login_concurrency),
            cfg,
            cluster,
            order: WriteOrder::default(),
            catalogs: Arc::new(Catalogs::default()),
            cancels: Arc::new(CancelRegistry::default()),
            difflog: Default::default(),
            joins: Default::default(),
            catch_up: Default::default(),
            history,
            stop: CancellationToken::new(),
            auth_failures: Default::default(),
            verifiers,
            tls: None,
            clients: AtomicUsize::new(0),
            ha: None,
            ha_states: None,
            deposed: CancellationToken::new(),
            handing_over: CancellationToken::new(),
        }
    }

    /// A backend refused this instance's epoch: another member leads now. Every session ends
    /// and the instance starts again as a standby (`server`).
    pub fn depose(&self, why: &str) {
        if let Some(m) = &self.ha {
            m.depose(why);
        }
        self.deposed.cancel();
    }

    /// Client connections open now.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    pub fn verifier(&self, user: &str) -> Option<&Verifier> {
        self.verifiers.get(user)
    }
}
