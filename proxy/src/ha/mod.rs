//! Leadership: with `[ha]`, several Chorus instances form a group on etcd and exactly one of
//! them (the leader) serves clients; the others stand by with their client port closed.
//!
//! Why etcd and a lease: the leader key lives only as long as its holder renews a lease, so a
//! dead or cut-off leader loses it without anyone's help, and the key's revision (its last write) is a
//! number that only grows: the leadership's epoch. Why the backends as well: etcd can only
//! say who should lead; a leader that was frozen past its lease does not know it yet. Every
//! unit's record checks, inside the unit's transaction, that its epoch is the backend's, and
//! a new leader raises the backends' epoch before it serves (`fence`), so a deposed leader
//! commits nothing wherever it still reaches.
//!
//! The states, Patroni-style, are few and explicit (`Role`): a member is a standby until it
//! wins the key, leads while its lease is provably alive by its own clock, and is deposed the
//! moment it cannot prove that or a backend refuses its epoch. A deposed leader ends its
//! sessions and starts again as a standby (`server`).

pub mod fence;
mod member;
pub mod states;
pub mod switchover;

pub use member::{unrevoked_lease, HaError, Member, LEASE_ENV};
pub use switchover::{SwitchoverError, SwitchoverRequest, SwitchoverStarted};

use serde::{Deserialize, Serialize};

/// What a member is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Not (yet) in touch with etcd.
    Starting,
    /// Another member leads, or none does yet; this one waits for the key.
    Standby,
    /// This member holds the leader key with this epoch.
    Leader,
    /// It led and can no longer prove it does: it takes no new work and starts again.
    Deposed,
}

/// What the admin API says about the group (`GET /ha`), as chorusctl reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HaStatus {
    pub cluster: String,
    pub node: String,
    pub role: Role,
    /// The leader's node name, as etcd holds it (None: no leader now).
    pub leader: Option<String>,
    /// Where the leader serves clients.
    pub leader_address: Option<String>,
    /// The current leadership's epoch (0: none seen).
    pub epoch: u64,
    /// How long this member's lease is still provably alive by its own clock, in ms.
    pub lease_left_ms: u64,
    /// The members that have a live lease, by node name.
    pub members: Vec<MemberInfo>,
}

/// A member as it announces itself in etcd.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberInfo {
    pub node: String,
    /// Where it serves clients when it leads.
    pub address: String,
    /// Its admin API.
    pub admin: String,
}
