//! Failed client logins are answered slowly, one at a time per client address
//! (`auth_failure_delay`, as PostgreSQL's auth_delay module does).
//!
//! Why per address and serialised: a delay per connection alone lets a guesser open a
//! hundred connections at once; queueing the failures of one address behind one another
//! holds it to one guess per delay, while logins that succeed never wait.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
pub struct FailureGates {
    gates: Mutex<HashMap<IpAddr, Arc<tokio::sync::Mutex<()>>>>,
}

impl FailureGates {
    /// Waits `delay` after a failed login from `ip`, behind the failures from `ip` before it.
    pub async fn after_failure(&self, ip: IpAddr, delay: Duration) {
        if delay.is_zero() {
            return;
        }
        let gate = self.gates.lock().unwrap_or_else(|e| e.into_inner()).entry(ip).or_default().clone();
        {
            let _turn = gate.lock().await;
            tokio::time::sleep(delay).await;
        }
        // The last one out removes the address: the map holds only addresses failing now.
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::strong_count(&gate) == 2 {
            gates.remove(&ip);
        }
    }

    /// Addresses with failures being answered now.
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.gates.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failures_from_one_address_queue_and_others_do_not() {
        let gates = Arc::new(FailureGates::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let start = tokio::time::Instant::now();
        let d = Duration::from_millis(500);
        let mut tasks = Vec::new();
        for ip in [a, a, a, b] {
            let g = gates.clone();
            tasks.push(tokio::spawn(async move {
                g.after_failure(ip, d).await;
                start.elapsed()
            }));
        }
        let mut done = Vec::new();
        for t in tasks {
            done.push(t.await.unwrap());
        }
        let mut from_a = done[..3].to_vec();
        from_a.sort();
        assert_eq!(from_a, [d, d * 2, d * 3], "one failure per delay from one address");
        assert_eq!(done[3], d, "another address does not wait behind it");
        assert_eq!(gates.addresses(), 0);
    }
}
