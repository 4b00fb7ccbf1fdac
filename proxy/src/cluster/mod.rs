//! The cluster: every configured backend with its state, the one place states change.
//!
//! Sessions read a backend's state on every request (an atomic load); changes go through
//! `Cluster::set_state`, which also writes them to the data directory (G8) before anybody
//! can observe them, so a restart never brings back a backend that had left.

mod health;
mod state;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

pub use health::{probe, spawn_health_checks, Login};
pub use state::{BackendState, StateRecord, StateStore};

use crate::config::Config;

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
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is unreadable: {message}")]
    StateFile { path: PathBuf, message: String },
    #[error("no backend named {0:?}")]
    NoSuchBackend(String),
}

pub struct Cluster {
    backends: Vec<Arc<Backend>>,
    store: Mutex<StateStore>,
}

impl Cluster {
    /// Loads the backends from the config and their states from the data directory. Without a
    /// state file every backend starts in sync (the operator vouches that they are identical);
    /// a backend added to the config later starts `down` until it is brought in.
    pub fn open(cfg: &Config) -> Result<Cluster, ClusterError> {
        let store = StateStore::open(&cfg.data_dir)?;
        let saved = store.load()?;
        let first_start = saved.is_none();
        let saved = saved.unwrap_or_default();
        let backends: Vec<Arc<Backend>> = cfg
            .backends
            .iter()
            .enumerate()
            .map(|(idx, b)| {
                let (state, reason) = match saved.get(&b.name) {
                    Some(r) => (r.state, r.reason.clone()),
                    None if first_start => (BackendState::InSync, String::new()),
                    None => (
                        BackendState::Down,
                        "added to the configuration after the cluster was formed; bring it in with a join".to_string(),
                    ),
                };
                Arc::new(Backend {
                    idx,
                    name: b.name.clone(),
                    host: b.host.clone(),
                    port: b.port,
                    addr: b.addr(),
                    state: AtomicU8::new(state as u8),
                    reason: Mutex::new(reason),
                    inflight: AtomicU32::new(0),
                })
            })
            .collect();
        let cluster = Cluster { backends, store: Mutex::new(store) };
        cluster.persist()?;
        Ok(cluster)
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    pub fn backend(&self, name: &str) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| b.name == name)
    }

    pub fn in_sync(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.backends.iter().filter(|b| b.is_in_sync())
    }

    pub fn in_sync_count(&self) -> usize {
        self.in_sync().count()
    }

    /// Takes an in-sync backend out of the in-sync set. Returns false when it had already left
    /// (another session got there first), so only one log line and one metric per ejection.
    pub fn eject(&self, idx: usize, to: BackendState, reason: &str) -> bool {
        let Some(b) = self.backends.get(idx) else {
            return false;
        };
        if b.state.compare_exchange(BackendState::InSync as u8, to as u8, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return false;
        }
        if let Ok(mut r) = b.reason.lock() {
            *r = reason.to_string();
        }
        tracing::warn!(backend = %b.name, state = %to, %reason, "backend ejected");
        metrics::counter!("chorus_ejections_total", "backend" => b.name.clone(), "state" => to.as_str()).increment(1);
        if let Err(e) = self.persist() {
            tracing::error!(error = %e, "could not record backend state; it holds in memory until restart");
        }
        true
    }

    /// Sets a backend's state by operator decision (the `chorus set-state` command).
    pub fn set_state(&self, name: &str, to: BackendState, reason: &str) -> Result<(), ClusterError> {
        let b = self.backend(name).ok_or_else(|| ClusterError::NoSuchBackend(name.to_string()))?;
        b.state.store(to as u8, Ordering::Release);
        if let Ok(mut r) = b.reason.lock() {
            *r = reason.to_string();
        }
        self.persist()
    }

    fn persist(&self) -> Result<(), ClusterError> {
        let records =
            self.backends.iter().map(|b| (b.name.clone(), StateRecord { state: b.state(), reason: b.reason() })).collect();
        let store = self
            .store
            .lock()
            .map_err(|_| ClusterError::StateFile { path: PathBuf::new(), message: "state store lock poisoned".into() })?;
        store.save(&records)
    }
}
