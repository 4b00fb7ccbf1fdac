//! Cancel keys: Chorus hands each session a BackendKeyData of the lead backend's real process
//! id (what `pg_backend_pid()` returns through the session, what drivers compare
//! notifications' pids with) and a secret key of Chorus's own; a CancelRequest carrying both
//! is sent on to every backend connection of that session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::protocol::message::cancel_request;

/// Where one backend connection of a session can be cancelled.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: String,
    pub pid: i32,
    pub secret: i32,
}

#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<(i32, i32), Vec<CancelTarget>>>,
}

/// Unregisters the session's key when the session ends.
pub struct CancelGuard {
    registry: Arc<CancelRegistry>,
    key: (i32, i32),
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.registry.map.lock() {
            m.remove(&self.key);
        }
    }
}

impl CancelRegistry {
    /// Registers a session's backend keys under `pid` (the lead's process id; two servers may
    /// hand out the same one) and a fresh secret that no other session holds with it; returns
    /// the key the client gets and its guard.
    pub fn register(self: &Arc<Self>, pid: i32, targets: Vec<CancelTarget>) -> ((i32, i32), CancelGuard) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut secret: i32 = rand::random();
        while m.contains_key(&(pid, secret)) {
            secret = rand::random();
        }
        m.insert((pid, secret), targets);
        ((pid, secret), CancelGuard { registry: self.clone(), key: (pid, secret) })
    }

    /// Sends the cancel to every backend of the matching session; unknown keys are ignored,
    /// as PostgreSQL does.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let targets = match self.map.lock() {
            Ok(m) => m.get(&(pid, secret)).cloned().unwrap_or_default(),
            Err(_) => return,
        };
        if targets.is_empty() {
            tracing::debug!(pid, "cancel request for an unknown session");
        }
        futures::future::join_all(targets.into_iter().map(deliver)).await;
    }

    /// `pg_cancel_backend(pid)` through Chorus, where `pid` is the process at `lead_addr` a
    /// session of Chorus was given as its own: that session's query is cancelled on every
    /// backend, wherever it runs (a read may run on another backend than the lead). Returns
    /// how many sessions it reached.
    pub fn cancel_session_of(&self, lead_addr: &str, pid: i32) -> usize {
        let targets: Vec<CancelTarget> = match self.map.lock() {
            Ok(m) => m
                .iter()
                .filter(|((p, _), t)| *p == pid && t.first().is_some_and(|l| l.addr == lead_addr && l.pid == pid))
                .flat_map(|(_, t)| t.iter().cloned())
                .collect(),
            Err(_) => return 0,
        };
        let n = targets.iter().filter(|t| t.addr == lead_addr && t.pid == pid).count();
        if !targets.is_empty() {
            tokio::spawn(futures::future::join_all(targets.into_iter().map(deliver)));
        }
        n
    }
}

/// Sends one CancelRequest in the background (the caller does not wait for it).
pub fn send_cancel(target: CancelTarget) {
    tokio::spawn(deliver(target));
}

async fn deliver(t: CancelTarget) {
    let sent = async {
        // A backend's Unix-domain socket (its address is the socket file's path), or TCP.
        if t.addr.starts_with('/') {
            let mut s = tokio::net::UnixStream::connect(&t.addr).await?;
            s.write_all(&cancel_request(t.pid, t.secret)).await?;
            s.shutdown().await
        } else {
            let mut s = TcpStream::connect(&t.addr).await?;
            s.write_all(&cancel_request(t.pid, t.secret)).await?;
            s.shutdown().await
        }
    };
    if let Err(e) = sent.await {
        tracing::debug!(addr = %t.addr, error = %e, "cancel not delivered");
    }
}
