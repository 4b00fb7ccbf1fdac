//! The cluster: every backend with its state, the one place states change.
//!
//! Sessions read a backend's state on every request (an atomic load); changes go through
//! `Cluster::set_state` or `Cluster::eject`, which also write them to the data directory (G8)
//! before anybody can observe them, so a restart never brings back a backend that had left.
//! The list of backends grows when a join adds one; it is replaced whole (copy on write), so
//! readers take a cheap snapshot and never hold a lock. Every change of the in-sync set bumps
//! the membership epoch, which tells sessions to pick up backends that joined.

mod health;
pub mod signals;
mod state;
pub mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

pub use health::{check, pg_error, probe, spawn_health_check, spawn_health_checks, Login};
pub use state::{BackendState, StateMirror, StateRecord, StateStore};

use crate::config::{Config, MAX_BACKENDS};

/// One backend server as the cluster knows it.
#[derive(Debug)]
pub struct Backend {
    /// Position in the config: lower is higher priority; the lowest in-sync one is the lead.
    pub idx: usize,
    pub name: String,
    pub host: String,
    pub port: u16,
    pub addr: String,
    state: AtomicU8,
    reason: Mutex<String>,
    /// Requests in flight on this backend across all sessions; reads go to the least busy.
    pub inflight: AtomicU32,
    /// False while a joined backend awaits its check against the lead: it takes writes but
    /// never answers a client.
    serves_reads: AtomicBool,
    /// Joined through the admin API rather than configured.
    pub added: bool,
    /// The server's version as its last health check read it.
    version: Mutex<String>,
    /// The last on-demand check (`health::check`) and when it ended: sessions that lose a
    /// connection at the same moment share one check instead of each logging in.
    last_check: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
    /// The newest serial of the update history it is known to hold: set when it leaves the
    /// in-sync set and as a catch-up applies units (0: not known).
    applied: std::sync::atomic::AtomicU64,
    /// See `StateRecord::catch_up`.
    catch_up: AtomicBool,
    /// How every connection to it is secured.
    pub tls: crate::config::BackendTls,
    /// (address, user, database) of the health check's login last seen not to ask for a
    /// cleartext password (see `health::asks_cleartext`).
    pub(crate) no_cleartext: Mutex<Option<(String, String, String)>>,
    /// Pid signals clients sent through Chorus to this backend (see `signals`).
    pub signals: signals::PidSignals,
    /// This instance's hold on the backend's update history (see `writer`).
    pub writer: writer::WriterLock,
}

impl Backend {
    #[inline]
    pub fn state(&self) -> BackendState {
        BackendState::from_u8(self.state.load(Ordering::Acquire))
    }

    #[inline]
    pub fn is_in_sync(&self) -> bool {
        self.state() == BackendState::InSync
    }

    pub fn reason(&self) -> String {
        self.reason.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn version(&self) -> String {
        self.version.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn set_version(&self, v: String) {
        if let Ok(mut g) = self.version.lock() {
            *g = v;
        }
    }

    #[inline]
    pub fn serves_reads(&self) -> bool {
        self.serves_reads.load(Ordering::Acquire)
    }

    pub fn set_serves_reads(&self, yes: bool) {
        self.serves_reads.store(yes, Ordering::Release);
    }

    /// It left the in-sync set as `down` and may be caught up from the update history.
    pub fn may_catch_up(&self) -> bool {
        self.catch_up.load(Ordering::Acquire)
    }

    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    pub fn set_applied(&self, serial: u64) {
        self.applied.store(serial, Ordering::Release);
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        idx: usize,
        name: &str,
        host: &str,
        port: u16,
        state: BackendState,
        reason: String,
        added: bool,
        catch_up: bool,
        tls: crate::config::BackendTls,
    ) -> Backend {
        Backend {
            idx,
            name: name.to_string(),
            host: host.to_string(),
            port,
            addr: crate::config::backend_addr(host, port),
            state: AtomicU8::new(state as u8),
            reason: Mutex::new(reason),
            inflight: AtomicU32::new(0),
            serves_reads: AtomicBool::new(true),
            added,
            version: Mutex::new(String::new()),
            last_check: tokio::sync::Mutex::new(None),
            applied: std::sync::atomic::AtomicU64::new(0),
            catch_up: AtomicBool::new(catch_up),
            tls,
            no_cleartext: Mutex::new(None),
            signals: signals::PidSignals::default(),
            writer: writer::WriterLock::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is unreadable: {message}")]
    StateFile { path: PathBuf, message: String },
    #[error("no backend named {0:?}")]
    NoSuchBackend(String),
    #[error("a backend named {0:?} exists already")]
    Exists(String),
    #[error("backend name {0:?} must be 1 to 63 letters, digits, '-' or '_'")]
    BadName(String),
    #[error("at most {MAX_BACKENDS} backends are supported")]
    TooMany,
    #[error("the shared backend states could not be written: {0}")]
    SharedStates(String),
}

/// A state saved in the middle of a join that Chorus did not live to finish: the newcomer
/// never attached and the donor's copy is behind. A donor that left the in-sync set whole,
/// for a join following the update history, is `down` and caught up from it; one whose
/// join kept a diff log (history = false) lost it with the process.
fn interrupted(r: &StateRecord) -> (BackendState, String) {
    match r.state {
        BackendState::Joining => (BackendState::Down, "its join was interrupted by a restart of Chorus".into()),
        BackendState::Detached if r.catch_up => {
            (BackendState::Down, "it was a join's donor when Chorus stopped; it catches up from the update history".into())
        }
        BackendState::Detached => (
            BackendState::NeedsRebuild,
            "it was a join's donor when Chorus stopped; its copy is behind: bring it back with a join".into(),
        ),
        s => (s, r.reason.clone()),
    }
}

pub struct Cluster {
    backends: RwLock<Arc<Vec<Arc<Backend>>>>,
    /// The TLS settings of backends that join (they have no [[backends]] entry).
    joined_tls: crate::config::BackendTls,
    store: Mutex<StateStore>,
    epoch: AtomicU64,
    /// This instance writes the backends' update histories now: it holds their writer locks,
    /// and the health checks take the lock of a backend that comes back (`writer`).
    history_writer: AtomicBool,
}

impl Cluster {
    /// Loads the backends from the config and their states from the data directory. Without a
    /// state file every backend starts in sync (the operator vouches that they are identical);
    /// a backend added to the config later starts `down` until it is brought in. Backends
    /// that joined through the admin API come from the state file.
    pub fn open(cfg: &Config) -> Result<Cluster, ClusterError> {
        let store = StateStore::open(&cfg.data_dir)?;
        let saved = store.load()?;
        let first_start = saved.is_none();
        let saved = saved.unwrap_or_default();
        let mut backends: Vec<Arc<Backend>> = Vec::new();
        for b in &cfg.backends {
            let (state, reason) = match saved.get(&b.name) {
                Some(r) => interrupted(r),
                None if first_start => (BackendState::InSync, String::new()),
                None => (
                    BackendState::Down,
                    "added to the configuration after the cluster was formed; bring it in with a join".to_string(),
                ),
            };
            let catch_up = saved.get(&b.name).is_some_and(|r| r.catch_up);
            let tls = cfg.backend_tls(&b.host, b.port);
            backends.push(Arc::new(Backend::new(backends.len(), &b.name, &b.host, b.port, state, reason, false, catch_up, tls)));
        }
        for (name, r) in &saved {
            if let (Some((host, port)), false) = (&r.address, cfg.backends.iter().any(|b| &b.name == name)) {
                let (state, reason) = interrupted(r);
                let tls = cfg.backend_tls(host, *port);
                backends.push(Arc::new(Backend::new(backends.len(), name, host, *port, state, reason, true, r.catch_up, tls)));
            }
        }
        if backends.len() > MAX_BACKENDS {
            return Err(ClusterError::TooMany);
        }
        let cluster = Cluster {
            backends: RwLock::new(Arc::new(backends)),
            joined_tls: cfg.backend_tls("", 0),
            store: Mutex::new(store),
            epoch: AtomicU64::new(0),
            history_writer: AtomicBool::new(false),
        };
        cluster.persist()?;
        cluster.publish_states();
        Ok(cluster)
    }

    /// A snapshot of every backend, in priority order.
    pub fn backends(&self) -> Arc<Vec<Arc<Backend>>> {
        match self.backends.read() {
            Ok(b) => b.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn backend(&self, name: &str) -> Option<Arc<Backend>> {
        self.backends().iter().find(|b| b.name == name).cloned()
    }

    pub fn in_sync(&self) -> Vec<Arc<Backend>> {
        self.backends().iter().filter(|b| b.is_in_sync()).cloned().collect()
    }

    /// From now on this instance writes the update histories (`writer`).
    pub fn become_history_writer(&self) {
        self.history_writer.store(true, Ordering::Release);
    }

    pub fn history_writer(&self) -> bool {
        self.history_writer.load(Ordering::Acquire)
    }

    pub fn in_sync_count(&self) -> usize {
        self.backends().iter().filter(|b| b.is_in_sync()).count()
    }

    /// Changes whenever a backend enters the in-sync set.
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Adds a backend that joins through the admin API (state `joining`), or reuses the entry
    /// of a known one that is out of the in-sync set (a `down` backend is brought back the same
    /// way).
    pub fn add(&self, name: &str, host: &str, port: u16) -> Result<Arc<Backend>, ClusterError> {
        if !crate::config::valid_backend_name(name) {
            return Err(ClusterError::BadName(name.to_string()));
        }
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let b = {
            let mut guard = self.backends.write().unwrap_or_else(|p| p.into_inner());
            if let Some(b) = guard.iter().find(|b| b.name == name) {
                if b.state() == BackendState::InSync || b.state() == BackendState::Joining || b.state() == BackendState::Detached
                {
                    return Err(ClusterError::Exists(name.to_string()));
                }
                if b.host != host || b.port != port {
                    return Err(ClusterError::Exists(format!("{name} (at {}; remove it first or use that address)", b.addr)));
                }
                b.clone()
            } else {
                if guard.len() >= MAX_BACKENDS {
                    return Err(ClusterError::TooMany);
                }
                // Written to the file below before anything routes by it: a new entry takes no
                // traffic until it is in sync.
                let tls = self.joined_tls.clone();
                let b =
                    Arc::new(Backend::new(guard.len(), name, host, port, BackendState::Joining, String::new(), true, false, tls));
                let mut list = (**guard).clone();
                list.push(b.clone());
                *guard = Arc::new(list);
                b
            }
        };
        b.set_serves_reads(false);
        self.change(&store, &b, BackendState::Joining, "joining", false)?;
        Ok(b)
    }

    /// Takes an in-sync backend out of the in-sync set. Returns false when it had already left
    /// (another session got there first), so only one log line and one metric per ejection.
    /// The last in-sync backend is never taken out as `down`: it holds every committed unit,
    /// and without it nothing could serve; clients get 08006 until it answers again.
    pub fn eject(&self, idx: usize, to: BackendState, reason: &str) -> bool {
        let list = self.backends();
        let Some(b) = list.get(idx) else {
            return false;
        };
        // One lock for every change: the file and the memory never disagree, and two
        // ejections at once cannot both see the other backend still in sync.
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if b.state() != BackendState::InSync {
            return false;
        }
        if to == BackendState::Down && list.iter().all(|o| o.idx == idx || !o.is_in_sync()) {
            tracing::error!(backend = %b.name, %reason, "the last in-sync backend failed; it stays in sync and clients get 08006 until it answers");
            return false;
        }
        if let Err(e) = self.change(&store, b, to, reason, false) {
            tracing::error!(error = %e, backend = %b.name, "could not record the ejection; the backend leaves the in-sync set in memory only");
            b.state.store(to as u8, Ordering::Release);
        }
        tracing::warn!(backend = %b.name, state = %to, %reason, "backend ejected");
        metrics::counter!("chorus_ejections_total", "backend" => b.name.clone(), "state" => to.as_str()).increment(1);
        true
    }

    /// Sets a backend's state: by operator decision (the `chorus set-state` command), or by a
    /// join or removal. Entering the in-sync set bumps the membership epoch.
    pub fn set_state(&self, name: &str, to: BackendState, reason: &str) -> Result<(), ClusterError> {
        self.set_state_as(name, to, reason, false)
    }

    /// A catch-up's own steps (`joining` while it runs, `down` again if it fails), and a
    /// join's donor leaving whole (`detached`) and coming back: the backend stays one the
    /// history can bring back.
    pub fn set_state_catching_up(&self, name: &str, to: BackendState, reason: &str) -> Result<(), ClusterError> {
        self.set_state_as(name, to, reason, true)
    }

    fn set_state_as(&self, name: &str, to: BackendState, reason: &str, keep: bool) -> Result<(), ClusterError> {
        let b = self.backend(name).ok_or_else(|| ClusterError::NoSuchBackend(name.to_string()))?;
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let was = b.state();
        self.change(&store, &b, to, reason, keep)?;
        if was != to {
            tracing::info!(backend = %name, from = %was, to = %to, %reason, "backend state changed");
        }
        Ok(())
    }

    /// Writes `b`'s new state to the file, then makes it take effect (G8: a state is on disk
    /// before anybody acts on it). The caller holds the store's lock.
    fn change(&self, store: &StateStore, b: &Backend, to: BackendState, reason: &str, keep: bool) -> Result<(), ClusterError> {
        let mut records = self.records();
        // Leaving the in-sync set as down, or whole as the donor of a join that follows the
        // history, makes a backend one the history can bring back; a catch-up keeps that
        // through its own steps; anything else (a join replacing its data, an ejection for a
        // difference) ends it.
        let catch_up = (to == BackendState::Down && b.state() == BackendState::InSync)
            || (keep && to == BackendState::Detached && b.state() == BackendState::InSync)
            || (keep && b.may_catch_up() && matches!(to, BackendState::Down | BackendState::Joining));
        records.insert(
            b.name.clone(),
            StateRecord { state: to, reason: reason.to_string(), address: b.added.then(|| (b.host.clone(), b.port)), catch_up },
        );
        store.save(&records)?;
        b.catch_up.store(catch_up, Ordering::Release);
        let was = BackendState::from_u8(b.state.swap(to as u8, Ordering::AcqRel));
        if let Ok(mut r) = b.reason.lock() {
            *r = reason.to_string();
        }
        if to == BackendState::InSync && was != BackendState::InSync {
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
        self.publish_states();
        Ok(())
    }

    /// One gauge per backend and state, 1 for the state it is in.
    fn publish_states(&self) {
        for b in self.backends().iter() {
            let now = b.state();
            for s in BackendState::ALL {
                metrics::gauge!("chorus_backend_state", "backend" => b.name.clone(), "state" => s.as_str()).set(if s == now {
                    1.0
                } else {
                    0.0
                });
            }
        }
    }

    fn records(&self) -> std::collections::BTreeMap<String, StateRecord> {
        self.backends()
            .iter()
            .map(|b| {
                let address = b.added.then(|| (b.host.clone(), b.port));
                (b.name.clone(), StateRecord { state: b.state(), reason: b.reason(), address, catch_up: b.may_catch_up() })
            })
            .collect()
    }

    /// From now on every state change is written to `mirror` first (etcd, with `[ha]`).
    pub fn share_states(&self, mirror: Box<dyn StateMirror>) {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).set_mirror(mirror);
    }

    /// A new leader takes the states the last one wrote (`shared`) over its own view: a
    /// backend the last leader took out stays out, a backend that joined through it is added,
    /// states of a join or catch-up it did not live to finish are read as at a restart. Then
    /// they are written back (through the mirror, under this leader's key).
    pub fn adopt(
        &self,
        shared: &std::collections::BTreeMap<String, StateRecord>,
        cfg: &crate::config::Config,
    ) -> Result<(), ClusterError> {
        let _store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut guard = self.backends.write().unwrap_or_else(|p| p.into_inner());
            let mut list = (**guard).clone();
            for (name, r) in shared {
                let (state, reason) = interrupted(r);
                match list.iter().find(|b| &b.name == name) {
                    Some(b) => {
                        b.state.store(state as u8, Ordering::Release);
                        b.catch_up.store(r.catch_up, Ordering::Release);
                        if let Ok(mut why) = b.reason.lock() {
                            *why = reason;
                        }
                    }
                    None => {
                        let Some((host, port)) = &r.address else { continue };
                        if list.len() >= MAX_BACKENDS {
                            return Err(ClusterError::TooMany);
                        }
                        let t = cfg.backend_tls(host, *port);
                        list.push(Arc::new(Backend::new(list.len(), name, host, *port, state, reason, true, r.catch_up, t)));
                    }
                }
            }
            *guard = Arc::new(list);
        }
        drop(_store);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.publish_states();
        self.persist()
    }

    fn persist(&self) -> Result<(), ClusterError> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.save(&self.records())
    }
}
