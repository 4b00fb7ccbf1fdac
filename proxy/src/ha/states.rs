//! The backends' states shared through etcd: with `[ha]`, every state change the leader makes
//! is written to `/chorus/<cluster>/backends` before it takes effect (and each phase of a join
//! to `/chorus/<cluster>/join`, as it happens), in an etcd transaction
//! that succeeds only while this member's lease holds the leader key, so a deposed leader
//! cannot change them. A new leader reads them before it fences and recovers, so a backend the
//! last leader took out (diverged, down, joining) stays out, and one that joined through the
//! admin API is known to it.
//!
//! Why a thread of its own: a state change is made under the cluster's lock from synchronous
//! code (a session ejecting a backend, a health check), and must be on etcd before it takes
//! effect. The write runs on a small runtime of its own with its own etcd connection, so the
//! caller waits for it without needing the runtime it was called from.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::{Member, Role};
use crate::cluster::{StateMirror, StateRecord};
use crate::config::HaConfig;

/// How long a state change waits for etcd before it counts as not written.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Serialize, Deserialize)]
struct Shared {
    backends: BTreeMap<String, StateRecord>,
}

struct Job {
    key: String,
    json: String,
    lease: i64,
    /// None: nobody waits for the answer.
    reply: Option<std::sync::mpsc::SyncSender<Result<bool, String>>>,
}

/// The leader's writer of shared states (a `StateMirror` for the cluster); cheap to clone.
#[derive(Clone)]
pub struct EtcdStates {
    member: Member,
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
}

impl EtcdStates {
    /// Starts the writer thread with its own etcd connection.
    pub fn start(cfg: &HaConfig, member: Member) -> std::io::Result<EtcdStates> {
        let (jobs, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let endpoints = cfg.etcd_endpoints.clone();
        let leader_key = key(&cfg.cluster, "leader");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name("chorus-ha-states".into()).spawn(move || {
            rt.block_on(async move {
                let mut client: Option<Client> = None;
                while let Some(job) = rx.recv().await {
                    let r = write(&mut client, &endpoints, &leader_key, &job).await;
                    if let Some(reply) = &job.reply {
                        let _ = reply.send(r);
                    }
                }
            })
        })?;
        Ok(EtcdStates { member, jobs })
    }
}

fn key(cluster: &str, name: &str) -> String {
    format!("/chorus/{cluster}/{name}")
}

async fn write(client: &mut Option<Client>, endpoints: &[String], leader: &str, job: &Job) -> Result<bool, String> {
    if client.is_none() {
        let opts = ConnectOptions::new().with_connect_timeout(WRITE_TIMEOUT).with_timeout(WRITE_TIMEOUT);
        *client = Some(Client::connect(endpoints, Some(opts)).await.map_err(|e| e.to_string())?);
    }
    let Some(c) = client.as_mut() else { return Err("no etcd connection".into()) };
    let txn = Txn::new().when([Compare::lease(leader, CompareOp::Equal, job.lease)]).and_then([TxnOp::put(
        job.key.as_str(),
        job.json.as_str(),
        None,
    )]);
    match c.txn(txn).await {
        Ok(r) => Ok(r.succeeded()),
        Err(e) => {
            *client = None;
            Err(e.to_string())
        }
    }
}

impl StateMirror for EtcdStates {
    fn save(&self, backends: &BTreeMap<String, StateRecord>) -> Result<(), String> {
        // A standby's view is its own: only the leader's changes are the group's.
        if self.member.role() != Role::Leader {
            return Ok(());
        }
        let Some(lease) = self.member.lease() else {
            return Err("no etcd lease".into());
        };
        let json = serde_json::to_string(&Shared { backends: backends.clone() }).map_err(|e| e.to_string())?;
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let job = Job { key: key(&self.member.cluster(), "backends"), json, lease, reply: Some(reply) };
        self.jobs.send(job).map_err(|_| "the etcd writer stopped".to_string())?;
        match answer.recv_timeout(WRITE_TIMEOUT + Duration::from_millis(500)) {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => {
                self.member.depose("the leader key is no longer this member's: a backend state could not be written");
                Err("this member no longer holds the leader key".into())
            }
            Ok(Err(e)) => Err(format!("etcd: {e}")),
            Err(_) => Err("etcd did not answer in time".into()),
        }
    }
}

impl EtcdStates {
    /// The leader's latest join progress, written as it goes (nobody waits for it: it only
    /// tells the next leader, and the operators reading it, how far the join came).
    pub fn publish_join(&self, progress: &crate::join::Progress) {
        let (Role::Leader, Some(lease)) = (self.member.role(), self.member.lease()) else { return };
        let Ok(json) = serde_json::to_string(progress) else { return };
        let _ = self.jobs.send(Job { key: key(&self.member.cluster(), "join"), json, lease, reply: None });
    }
}

/// The join progress the last leader wrote (None: none).
pub async fn load_join(member: &Member) -> Result<Option<crate::join::Progress>, String> {
    let mut c = member.client();
    let r = c.get(key(&member.cluster(), "join"), None).await.map_err(|e| e.to_string())?;
    match r.kvs().first() {
        None => Ok(None),
        Some(kv) => serde_json::from_slice(kv.value()).map(Some).map_err(|e| e.to_string()),
    }
}

/// The states the last leader wrote (None: no leader wrote any yet).
pub async fn load(member: &Member) -> Result<Option<BTreeMap<String, StateRecord>>, String> {
    let mut c = member.client();
    let r = c.get(key(&member.cluster(), "backends"), None).await.map_err(|e| e.to_string())?;
    match r.kvs().first() {
        None => Ok(None),
        Some(kv) => serde_json::from_slice::<Shared>(kv.value()).map(|s| Some(s.backends)).map_err(|e| e.to_string()),
    }
}
