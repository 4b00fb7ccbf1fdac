//! The lock manager: strict two-phase locks inside Chorus, with deadlock detection.
//!
//! A write takes intention or real locks on what it touches (the cluster-wide resource,
//! tables, unique-key values, sequences) before it is sent to any backend, and keeps them
//! until its transaction's commit point has completed on every in-sync backend. Conflicting
//! writes therefore reach every backend in the same order, and writes that do not conflict
//! run side by side. A session that would wait on a session that (transitively) waits on it
//! is the deadlock victim and gets 40P01 instead. Sans-IO: sessions poll it with a waker.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

/// Something a lock is taken on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Res {
    /// The whole cluster: X for what cannot be analysed, intentions for everything else.
    Global,
    /// A relation, by its name (`order::name_key`).
    Table {
        db: u32,
        name: u64,
    },
    Key {
        db: u32,
        index: u32,
        hash: u64,
    },
    /// A sequence, by its name.
    Sequence {
        db: u32,
        name: u64,
    },
}

/// Lock modes with the usual multi-granularity compatibility.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    IntentShared,
    IntentExclusive,
    Shared,
    Exclusive,
}

impl Mode {
    pub fn compatible(self, other: Mode) -> bool {
        use Mode::*;
        matches!(
            (self, other),
            (IntentShared, IntentShared | IntentExclusive | Shared)
                | (IntentExclusive, IntentShared | IntentExclusive)
                | (Shared, IntentShared | Shared)
        )
    }

    pub fn number(self) -> u8 {
        self as u8
    }

    pub fn from_number(n: u8) -> Mode {
        match n {
            0 => Mode::IntentShared,
            1 => Mode::IntentExclusive,
            2 => Mode::Shared,
            _ => Mode::Exclusive,
        }
    }

    /// Whether holding `self` already gives what `want` asks for.
    fn covers(self, want: Mode) -> bool {
        use Mode::*;
        self == want || self == Exclusive || want == IntentShared
    }

    /// The weakest mode that covers both.
    pub(crate) fn join(self, other: Mode) -> Mode {
        if self.covers(other) {
            self
        } else if other.covers(self) {
            other
        } else {
            Mode::Exclusive
        }
    }
}

pub type Sid = u64;

#[derive(Default)]
struct Entry {
    holders: Vec<(Sid, Mode)>,
    waiters: VecDeque<(Sid, Mode)>,
}

#[derive(Default)]
struct SessionLocks {
    held: Vec<Res>,
    waiting: Option<Res>,
    waker: Option<Waker>,
}

#[derive(Default)]
struct State {
    entries: HashMap<Res, Entry>,
    sessions: HashMap<Sid, SessionLocks>,
    next_sid: Sid,
}

/// The outcome of asking for a set of locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    Granted,
    /// Queued; the waker is called when it may be granted.
    Wait,
    /// Waiting would close a cycle: this session is the victim.
    Deadlock,
}

#[derive(Clone, Default)]
pub struct LockManager {
    state: Arc<Mutex<State>>,
}

impl LockManager {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes and lets go of the manager's lock: returns only while the lock manager makes
    /// progress (the watchdog's probe).
    pub fn probe(&self) {
        drop(self.lock());
    }

    /// A new lock owner (one per session).
    pub fn owner(&self) -> LockOwner {
        let mut st = self.lock();
        st.next_sid += 1;
        let sid = st.next_sid;
        st.sessions.insert(sid, SessionLocks::default());
        LockOwner { mgr: self.clone(), sid, held: HashMap::new() }
    }

    /// Whether anybody holds or waits for anything.
    pub fn is_idle(&self) -> bool {
        self.lock().entries.is_empty()
    }
}

/// One session's locks. Dropping it releases them.
pub struct LockOwner {
    mgr: LockManager,
    sid: Sid,
    /// What this session holds, to answer "already held" without the mutex.
    held: HashMap<Res, Mode>,
}

impl LockOwner {
    pub fn holds_any(&self) -> bool {
        !self.held.is_empty()
    }

    /// Whether this session holds `res` at least in `mode`.
    pub fn holds(&self, res: Res, mode: Mode) -> bool {
        self.held.get(&res).is_some_and(|h| h.covers(mode))
    }

    /// What this session holds, as (resource hash, mode number): how the diff log records a
    /// unit's locks so that replay can tell which units may run side by side.
    /// `ddl`: the unit changed the catalog; it is summarised as holding the cluster-wide lock
    /// too, so that a replay runs it alone: what it names by name and what later units name
    /// by the tables it created must not be told apart.
    pub fn summary(&self, ddl: bool) -> Vec<(u64, u8)> {
        use std::hash::{Hash, Hasher};
        let hash = |r: &Res| {
            // DefaultHasher::new() has fixed keys: the same resource hashes the same way
            // in the replayer (the same process).
            let mut h = std::collections::hash_map::DefaultHasher::new();
            r.hash(&mut h);
            h.finish()
        };
        let mut out: Vec<(u64, u8)> = self.held.iter().map(|(r, m)| (hash(r), m.number())).collect();
        if ddl {
            out.retain(|(h, _)| *h != hash(&Res::Global));
            out.push((hash(&Res::Global), Mode::Exclusive.number()));
        }
        out
    }

    /// Takes every lock in `want` (in order), or queues for the first it cannot have yet.
    /// Locks granted so far stay held: two-phase locking releases only at the end.
    pub fn acquire(&mut self, want: &[(Res, Mode)], waker: &Waker) -> Acquire {
        if want.iter().all(|(r, m)| self.held.get(r).is_some_and(|h| h.covers(*m))) {
            return Acquire::Granted;
        }
        let mut guard = self.mgr.lock();
        let st = &mut *guard;
        for &(res, mode) in want {
            let have = self.held.get(&res).copied();
            if have.is_some_and(|h| h.covers(mode)) {
                continue;
            }
            let target = have.map_or(mode, |h| h.join(mode));
            let entry = st.entries.entry(res).or_default();
            let upgrade = have.is_some();
            let queued_at = entry.waiters.iter().position(|(s, _)| *s == self.sid);
            if grantable(entry, self.sid, target, upgrade, queued_at) {
                if let Some(p) = queued_at {
                    entry.waiters.remove(p);
                }
                match entry.holders.iter_mut().find(|(s, _)| *s == self.sid) {
                    Some(h) => h.1 = target,
                    None => entry.holders.push((self.sid, target)),
                }
                self.held.insert(res, target);
                let me = st.sessions.entry(self.sid).or_default();
                if !me.held.contains(&res) {
                    me.held.push(res);
                }
                me.waiting = None;
                continue;
            }
            if queued_at.is_none() {
                entry.waiters.push_back((self.sid, target));
            }
            let me = st.sessions.entry(self.sid).or_default();
            // One queue at a time: a wait left over from an earlier attempt is withdrawn.
            if let Some(old) = me.waiting.replace(res).filter(|&old| old != res) {
                if let Some(e) = st.entries.get_mut(&old) {
                    e.waiters.retain(|(s, _)| *s != self.sid);
                }
                drop_empty(st, old);
                wake_waiters(st, old);
            }
            let me = st.sessions.entry(self.sid).or_default();
            me.waker = Some(waker.clone());
            if closes_cycle(st, self.sid) {
                tracing::info!(sid = self.sid, ?res, ?target, state = %describe(st), "deadlock among Chorus's locks");
                if let Some(e) = st.entries.get_mut(&res) {
                    e.waiters.retain(|(s, _)| *s != self.sid);
                }
                if let Some(me) = st.sessions.get_mut(&self.sid) {
                    me.waiting = None;
                }
                drop_empty(st, res);
                wake_waiters(st, res);
                return Acquire::Deadlock;
            }
            return Acquire::Wait;
        }
        Acquire::Granted
    }

    /// Gives up a wait (the session ends or times out waiting).
    pub fn cancel_wait(&mut self) {
        let mut guard = self.mgr.lock();
        let st = &mut *guard;
        let Some(res) = st.sessions.get_mut(&self.sid).and_then(|m| m.waiting.take()) else { return };
        if let Some(e) = st.entries.get_mut(&res) {
            e.waiters.retain(|(s, _)| *s != self.sid);
        }
        drop_empty(st, res);
        wake_waiters(st, res);
    }

    /// Weakens (or, with None, gives up) one lock before the transaction ends: the snapshot
    /// barrier of a REPEATABLE READ transaction, once its snapshot is taken everywhere.
    pub fn downgrade(&mut self, res: Res, to: Option<Mode>) {
        let Some(&have) = self.held.get(&res) else { return };
        if to == Some(have) {
            return;
        }
        let mut guard = self.mgr.lock();
        let st = &mut *guard;
        if let Some(e) = st.entries.get_mut(&res) {
            match to {
                Some(m) => e.holders.iter_mut().filter(|(s, _)| *s == self.sid).for_each(|h| h.1 = m),
                None => e.holders.retain(|(s, _)| *s != self.sid),
            }
        }
        match to {
            Some(m) => {
                self.held.insert(res, m);
            }
            None => {
                self.held.remove(&res);
                if let Some(me) = st.sessions.get_mut(&self.sid) {
                    me.held.retain(|r| *r != res);
                }
            }
        }
        drop_empty(st, res);
        wake_waiters(st, res);
    }

    /// Whether it holds locks on anything but the cluster-wide resource.
    pub fn holds_data_locks(&self) -> bool {
        self.held.keys().any(|r| *r != Res::Global)
    }

    /// Releases everything at the end of a transaction, and withdraws a wait in progress (the
    /// session asks again for its whole set, in order, from the start).
    pub fn release_all(&mut self) {
        if self.held.is_empty() {
            return;
        }
        self.cancel_wait();
        self.held.clear();
        let mut guard = self.mgr.lock();
        let st = &mut *guard;
        let held = st.sessions.get_mut(&self.sid).map(|m| std::mem::take(&mut m.held)).unwrap_or_default();
        for res in held {
            if let Some(e) = st.entries.get_mut(&res) {
                e.holders.retain(|(s, _)| *s != self.sid);
            }
            drop_empty(st, res);
            wake_waiters(st, res);
        }
    }
}

impl Drop for LockOwner {
    fn drop(&mut self) {
        self.cancel_wait();
        self.held.insert(Res::Global, Mode::IntentShared); // force the release path
        self.release_all();
        self.mgr.lock().sessions.remove(&self.sid);
    }
}

/// Compatible with every other holder, and not overtaking a conflicting waiter queued
/// earlier (an upgrade may: its holder would otherwise wait on waiters that wait on it).
fn grantable(e: &Entry, sid: Sid, mode: Mode, upgrade: bool, queued_at: Option<usize>) -> bool {
    if e.holders.iter().any(|&(s, m)| s != sid && !m.compatible(mode)) {
        return false;
    }
    if upgrade {
        return true;
    }
    let ahead = queued_at.unwrap_or(e.waiters.len());
    e.waiters.iter().take(ahead).all(|&(s, m)| s == sid || m.compatible(mode))
}

/// The sessions `sid` waits for: incompatible holders and incompatible waiters ahead of it.
fn blockers(st: &State, sid: Sid) -> Vec<Sid> {
    let Some(res) = st.sessions.get(&sid).and_then(|m| m.waiting) else { return Vec::new() };
    let Some(e) = st.entries.get(&res) else { return Vec::new() };
    let Some(pos) = e.waiters.iter().position(|(s, _)| *s == sid) else { return Vec::new() };
    let mode = e.waiters[pos].1;
    let mut out: Vec<Sid> = e.holders.iter().filter(|&&(s, m)| s != sid && !m.compatible(mode)).map(|&(s, _)| s).collect();
    let upgrade = e.holders.iter().any(|&(s, _)| s == sid);
    if !upgrade {
        out.extend(e.waiters.iter().take(pos).filter(|&&(s, m)| s != sid && !m.compatible(mode)).map(|&(s, _)| s));
    }
    out
}

/// Whether `sid`'s wait closes a cycle in the wait-for graph.
fn closes_cycle(st: &State, sid: Sid) -> bool {
    let mut seen = HashSet::new();
    let mut stack = blockers(st, sid);
    while let Some(s) = stack.pop() {
        if s == sid {
            return true;
        }
        if seen.insert(s) {
            stack.extend(blockers(st, s));
        }
    }
    false
}

/// Holders and waiters of (at most 20) resources, for the deadlock log line.
fn describe(st: &State) -> String {
    let mut out = String::new();
    for (r, e) in st.entries.iter().take(20) {
        out.push_str(&format!("{r:?}: holders {:?} waiters {:?}; ", e.holders, e.waiters));
    }
    out
}

fn drop_empty(st: &mut State, res: Res) {
    if st.entries.get(&res).is_some_and(|e| e.holders.is_empty() && e.waiters.is_empty()) {
        st.entries.remove(&res);
    }
}

/// Wakes everyone queued on `res`; each re-checks whether it may go on.
fn wake_waiters(st: &mut State, res: Res) {
    let Some(e) = st.entries.get(&res) else { return };
    let sids: Vec<Sid> = e.waiters.iter().map(|(s, _)| *s).collect();
    for s in sids {
        if let Some(w) = st.sessions.get_mut(&s).and_then(|m| m.waker.take()) {
            w.wake();
        }
    }
}

/// Whether two units' lock summaries (a resource's hash and a mode's number each, as the
/// diff log and the update history keep them) conflict: such units must run in the order
/// they committed; others may run side by side, as the lock manager let them.
pub fn summaries_conflict(a: &[(u64, u8)], b: &[(u64, u8)]) -> bool {
    a.iter().any(|(h, m)| b.iter().any(|(h2, m2)| h == h2 && !Mode::from_number(*m).compatible(Mode::from_number(*m2))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;
    use Mode::*;

    const T: Res = Res::Table { db: 1, name: 10 };
    const U: Res = Res::Table { db: 1, name: 11 };

    fn w() -> &'static Waker {
        noop_waker_ref()
    }

    #[test]
    fn compatibility_matrix() {
        assert!(IntentShared.compatible(IntentExclusive));
        assert!(IntentExclusive.compatible(IntentExclusive));
        assert!(!IntentExclusive.compatible(Shared));
        assert!(Shared.compatible(Shared));
        assert!(!Exclusive.compatible(IntentShared));
    }

    #[test]
    fn conflicting_writers_queue_and_go_in_order() {
        let m = LockManager::default();
        let (mut a, mut b, mut c) = (m.owner(), m.owner(), m.owner());
        assert_eq!(a.acquire(&[(T, Exclusive)], w()), Acquire::Granted);
        assert_eq!(b.acquire(&[(T, Exclusive)], w()), Acquire::Wait);
        assert_eq!(c.acquire(&[(T, Shared)], w()), Acquire::Wait);
        a.release_all();
        // c must not overtake b.
        assert_eq!(c.acquire(&[(T, Shared)], w()), Acquire::Wait);
        assert_eq!(b.acquire(&[(T, Exclusive)], w()), Acquire::Granted);
        b.release_all();
        assert_eq!(c.acquire(&[(T, Shared)], w()), Acquire::Granted);
        drop(c);
        assert!(m.is_idle());
    }

    #[test]
    fn intentions_let_keyed_writers_share_a_table() {
        let m = LockManager::default();
        let (mut a, mut b) = (m.owner(), m.owner());
        let k1 = Res::Key { db: 1, index: 5, hash: 1 };
        let k2 = Res::Key { db: 1, index: 5, hash: 2 };
        assert_eq!(a.acquire(&[(T, IntentExclusive), (k1, Exclusive)], w()), Acquire::Granted);
        assert_eq!(b.acquire(&[(T, IntentExclusive), (k2, Exclusive)], w()), Acquire::Granted);
        let mut c = m.owner();
        assert_eq!(c.acquire(&[(T, Shared)], w()), Acquire::Wait, "a table read in a write waits for keyed writers");
        a.release_all();
        b.release_all();
        assert_eq!(c.acquire(&[(T, Shared)], w()), Acquire::Granted);
    }

    #[test]
    fn opposite_order_is_a_deadlock_for_the_second_waiter() {
        let m = LockManager::default();
        let (mut a, mut b) = (m.owner(), m.owner());
        assert_eq!(a.acquire(&[(T, Exclusive)], w()), Acquire::Granted);
        assert_eq!(b.acquire(&[(U, Exclusive)], w()), Acquire::Granted);
        assert_eq!(a.acquire(&[(U, Exclusive)], w()), Acquire::Wait);
        assert_eq!(b.acquire(&[(T, Exclusive)], w()), Acquire::Deadlock);
        // The victim rolls back; the other goes on.
        b.release_all();
        assert_eq!(a.acquire(&[(U, Exclusive)], w()), Acquire::Granted);
    }

    #[test]
    fn upgrade_deadlock_is_found() {
        let m = LockManager::default();
        let (mut a, mut b) = (m.owner(), m.owner());
        assert_eq!(a.acquire(&[(T, Shared)], w()), Acquire::Granted);
        assert_eq!(b.acquire(&[(T, Shared)], w()), Acquire::Granted);
        assert_eq!(a.acquire(&[(T, Exclusive)], w()), Acquire::Wait);
        assert_eq!(b.acquire(&[(T, Exclusive)], w()), Acquire::Deadlock);
    }

    #[test]
    fn a_snapshot_barrier_waits_for_writers_and_then_steps_aside() {
        let m = LockManager::default();
        let (mut writer, mut r, mut w2) = (m.owner(), m.owner(), m.owner());
        assert_eq!(writer.acquire(&[(Res::Global, IntentExclusive), (T, Exclusive)], w()), Acquire::Granted);
        assert_eq!(r.acquire(&[(Res::Global, Shared)], w()), Acquire::Wait, "a write is in flight");
        writer.release_all();
        assert_eq!(r.acquire(&[(Res::Global, Shared)], w()), Acquire::Granted);
        assert_eq!(w2.acquire(&[(Res::Global, IntentExclusive)], w()), Acquire::Wait, "held back while the snapshot is taken");
        r.downgrade(Res::Global, None);
        assert_eq!(w2.acquire(&[(Res::Global, IntentExclusive)], w()), Acquire::Granted);
    }

    #[test]
    fn releasing_while_waiting_leaves_no_stale_place_in_a_queue() {
        let m = LockManager::default();
        let (mut a, mut b, mut c) = (m.owner(), m.owner(), m.owner());
        assert_eq!(b.acquire(&[(U, Exclusive)], w()), Acquire::Granted);
        assert_eq!(a.acquire(&[(T, IntentExclusive), (U, Exclusive)], w()), Acquire::Wait);
        // An earlier request of a's session completes: its locks go, and so does its wait.
        a.release_all();
        assert_eq!(c.acquire(&[(T, Exclusive)], w()), Acquire::Granted);
        b.release_all();
        assert_eq!(c.acquire(&[(U, Exclusive)], w()), Acquire::Granted, "no stale waiter ahead of c on U");
        assert_eq!(a.acquire(&[(T, IntentExclusive), (U, Exclusive)], w()), Acquire::Wait);
        c.release_all();
        assert_eq!(a.acquire(&[(T, IntentExclusive), (U, Exclusive)], w()), Acquire::Granted);
    }

    #[test]
    fn dropping_an_owner_frees_its_locks_and_its_place() {
        let m = LockManager::default();
        let (mut a, mut b) = (m.owner(), m.owner());
        assert_eq!(a.acquire(&[(T, Exclusive)], w()), Acquire::Granted);
        assert_eq!(b.acquire(&[(T, Exclusive)], w()), Acquire::Wait);
        drop(b);
        drop(a);
        assert!(m.is_idle());
    }
}
