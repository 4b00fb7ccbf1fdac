//! Cancel keys: Chorus hands each session its own BackendKeyData; a CancelRequest carrying it
//! is sent on to every backend connection of that session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
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
    next_pid: AtomicI32,
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
    /// Registers a session's backend keys; returns the key the client gets and its guard.
    pub fn register(self: &Arc<Self>, targets: Vec<CancelTarget>) -> ((i32, i32), CancelGuard) {
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed).wrapping_add(1) & 0x7fff_ffff;
        let secret: i32 = rand::random();
        if let Ok(mut m) = self.map.lock() {
            m.insert((pid, secret), targets);
        }
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
        let sends = targets.into_iter().map(|t| async move {
            match TcpStream::connect(&t.addr).await {
                Ok(mut s) => {
                    let _ = s.write_all(&cancel_request(t.pid, t.secret)).await;
                    let _ = s.shutdown().await;
                }
                Err(e) => tracing::debug!(addr = %t.addr, error = %e, "cancel not delivered"),
            }
        });
        futures::future::join_all(sends).await;
    }
}
