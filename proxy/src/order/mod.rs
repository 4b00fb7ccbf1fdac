//! Write ordering: the one place that decides when a write may run.
//!
//! Conflicting writes must reach every backend in the same order. Each write statement's
//! analysis (`sql::analyze`) names what it touches; `lock_set` turns that, with the statement's
//! bind parameters, into locks of the lock manager (`locks`): the cluster-wide resource in
//! intention mode (or exclusive, for what cannot be analysed), tables, unique-key values and
//! sequences. Locks are held until the transaction's commit point completed everywhere.
//! Reads never take locks.

pub mod locks;

use std::hash::{Hash, Hasher};

pub use locks::{summaries_conflict, Acquire, LockManager, LockOwner, Mode, Res};

use crate::protocol::message::BindView;
use crate::sql::analyze::{Analysis, KeyPart, TableMode};
use crate::sql::catalog::{INT2, INT4, INT8, TEXT, VARCHAR};

/// The cluster's write order.
#[derive(Clone, Default)]
pub struct WriteOrder {
    pub locks: LockManager,
}

impl WriteOrder {
    pub fn owner(&self) -> LockOwner {
        self.locks.owner()
    }

    /// Holds every write back: takes the cluster-wide resource exclusively, which waits for
    /// every write transaction in flight to complete on every backend (strict two-phase
    /// locking) and queues new ones behind it. Writes resume when the returned owner drops.
    /// Joins detach and attach backends under it; None when `timeout` passed first.
    pub async fn pause(&self, timeout: std::time::Duration) -> Option<LockOwner> {
        let mut owner = self.owner();
        let want = [(Res::Global, Mode::Exclusive)];
        let wait = std::future::poll_fn(|cx| match owner.acquire(&want, cx.waker()) {
            Acquire::Wait => std::task::Poll::Pending,
            // Holding nothing, the pause cannot close a cycle; Deadlock is not expected.
            Acquire::Granted | Acquire::Deadlock => std::task::Poll::Ready(()),
        });
        match tokio::time::timeout(timeout, wait).await {
            Ok(()) if owner.holds_any() => Some(owner),
            _ => None, // dropping the owner withdraws its place in the queue
        }
    }
}

/// A relation's lock resource key: its name (FNV-1a, the same in every process and build),
/// so that DDL, which names relations that may not exist yet, meets the writes of the same
/// relation. Two relations of one name in different schemas share it: they only wait for
/// each other.
pub fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// What a write needs from outside its analysis to be locked.
pub struct LockInput<'a> {
    pub db: u32,
    pub bind: Option<&'a BindView<'a>>,
    /// A relation's name by oid (the catalog the analysis was made with).
    pub name_of: &'a dyn Fn(u32) -> Option<u64>,
    /// It takes the cluster-wide lock whatever the analysis says (a table it writes is not
    /// one its own DDL locked; DDL analysed with a catalog that cannot be trusted for names).
    pub global: bool,
}

/// Appends the locks a write needs to `out`, in a fixed order: the cluster-wide resource,
/// then tables (by name), keys and sequences (by name). Key values come from literals or
/// `bind`'s parameters; a key Chorus cannot read (binary of an odd type, NULL) becomes a
/// table-exclusive lock.
pub fn lock_set(a: &Analysis, input: &LockInput<'_>, out: &mut Vec<(Res, Mode)>) {
    let (db, bind) = (input.db, input.bind);
    let known = a
        .tables
        .iter()
        .map(|t| t.0)
        .chain(a.keys.iter().map(|k| k.table))
        .chain(a.sequences.iter().copied())
        .all(|o| (input.name_of)(o).is_some());
    if a.global || input.global || !known {
        out.push((Res::Global, Mode::Exclusive));
        return;
    }
    let table = |oid: u32| Res::Table { db, name: (input.name_of)(oid).unwrap_or_default() };
    out.push((Res::Global, Mode::IntentExclusive));
    let start = out.len();
    let mut key_locks = Vec::new();
    let mut exclusive_tables = Vec::new();
    for k in &a.keys {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        k.index.hash(&mut h);
        let mut ok = true;
        for p in &k.parts {
            match p {
                KeyPart::Const(s) => s.hash(&mut h),
                KeyPart::Param(n, ty) => match bind.and_then(|b| b.param(*n)).and_then(|(f, v)| param_key(f, v?, *ty)) {
                    Some(s) => s.hash(&mut h),
                    None => ok = false,
                },
            }
            0xffu8.hash(&mut h);
        }
        if ok {
            key_locks.push((Res::Key { db, index: k.index, hash: h.finish() }, Mode::Exclusive));
        } else {
            exclusive_tables.push(k.table);
        }
    }
    for &(oid, mode) in &a.tables {
        let m = match mode {
            TableMode::Shared => Mode::Shared,
            TableMode::Keyed => Mode::IntentExclusive,
            TableMode::Exclusive => Mode::Exclusive,
        };
        out.push((table(oid), m));
    }
    for oid in exclusive_tables {
        out.push((table(oid), Mode::Exclusive));
    }
    for name in a.names.iter().chain(&a.own_targets) {
        out.push((Res::Table { db, name: name_key(name) }, Mode::Exclusive));
    }
    // One lock per table at the strongest mode asked for, in a fixed order.
    let tables = &mut out[start..];
    tables.sort();
    let mut merged: Vec<(Res, Mode)> = Vec::with_capacity(tables.len());
    for &(r, m) in tables.iter() {
        match merged.last_mut() {
            Some((lr, lm)) if *lr == r => *lm = lm.join(m),
            _ => merged.push((r, m)),
        }
    }
    out.truncate(start);
    out.extend(merged);
    key_locks.sort();
    key_locks.dedup();
    out.extend(key_locks);
    // A sequence by its name too: DDL that names it (ALTER SEQUENCE) meets nextval.
    let mut seqs: Vec<u64> = a.sequences.iter().filter_map(|&o| (input.name_of)(o)).collect();
    seqs.extend(a.names.iter().map(|n| name_key(n)));
    seqs.sort_unstable();
    seqs.dedup();
    out.extend(seqs.into_iter().map(|name| (Res::Sequence { db, name }, Mode::Exclusive)));
}

/// The canonical text of a bound key value, or None when Chorus cannot compare it.
fn param_key(format: i16, v: &[u8], ty: u32) -> Option<String> {
    match (format, ty) {
        (0, _) => crate::sql::analyze::normalize_key(v, ty),
        (1, INT2 | INT4 | INT8) => match v.len() {
            2 => Some(i16::from_be_bytes([v[0], v[1]]).to_string()),
            4 => Some(i32::from_be_bytes(v.try_into().ok()?).to_string()),
            8 => Some(i64::from_be_bytes(v.try_into().ok()?).to_string()),
            _ => None,
        },
        (1, TEXT | VARCHAR) => String::from_utf8(v.to_vec()).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::analyze::KeyLock;

    #[test]
    fn text_and_binary_parameters_lock_the_same_key() {
        let a = Analysis {
            class: crate::sql::Class::UNKNOWN,
            tables: vec![(7, TableMode::Keyed)],
            keys: vec![KeyLock { table: 7, index: 8, parts: vec![KeyPart::Param(1, INT4)] }],
            ..Analysis::default()
        };
        let key = |fmt: i16, v: &[u8]| {
            let mut body = Vec::new();
            body.extend_from_slice(b"\0\0");
            body.extend_from_slice(&1i16.to_be_bytes());
            body.extend_from_slice(&fmt.to_be_bytes());
            body.extend_from_slice(&1i16.to_be_bytes());
            body.extend_from_slice(&(v.len() as i32).to_be_bytes());
            body.extend_from_slice(v);
            body.extend_from_slice(&0i16.to_be_bytes());
            let view = crate::protocol::message::bind_view(&body).expect("bind");
            let mut out = Vec::new();
            lock_set(&a, &LockInput { db: 1, bind: Some(&view), name_of: &|o| Some(u64::from(o)), global: false }, &mut out);
            out
        };
        let text = key(0, b"0042");
        let bin = key(1, &42i32.to_be_bytes());
        assert_eq!(text, bin);
        assert_eq!(text.len(), 3, "global intention, table intention, key: {text:?}");
        assert!(matches!(text[2], (Res::Key { .. }, Mode::Exclusive)));
        let other = key(0, b"43");
        assert_ne!(text[2], other[2]);
        // A float in binary is not comparable: the table is locked instead.
        let odd = key(1, &[1, 2, 3]);
        assert_eq!(odd[1], (Res::Table { db: 1, name: 7 }, Mode::Exclusive));
    }

    #[test]
    fn unanalysable_takes_the_cluster_wide_lock() {
        let a = Analysis { class: crate::sql::Class::UNKNOWN, global: true, ..Analysis::default() };
        let mut out = Vec::new();
        lock_set(&a, &LockInput { db: 1, bind: None, name_of: &|o| Some(u64::from(o)), global: false }, &mut out);
        assert_eq!(out, vec![(Res::Global, Mode::Exclusive)]);
    }

    #[test]
    fn ddl_and_writes_of_one_table_meet_on_its_name() {
        let names = |o: u32| (o == 7).then(|| name_key("orders"));
        let write = Analysis { class: crate::sql::Class::UNKNOWN, tables: vec![(7, TableMode::Keyed)], ..Analysis::default() };
        let ddl = Analysis { class: crate::sql::Class::UNKNOWN, names: vec!["orders".into()], ..Analysis::default() };
        let other = Analysis { class: crate::sql::Class::UNKNOWN, names: vec!["items".into()], ..Analysis::default() };
        let locks = |a: &Analysis| {
            let mut out = Vec::new();
            lock_set(a, &LockInput { db: 1, bind: None, name_of: &names, global: false }, &mut out);
            out
        };
        let (w, d, o) = (locks(&write), locks(&ddl), locks(&other));
        let orders = Res::Table { db: 1, name: name_key("orders") };
        assert!(w.contains(&(orders, Mode::IntentExclusive)), "{w:?}");
        assert!(d.contains(&(orders, Mode::Exclusive)), "{d:?}");
        assert!(!o.iter().any(|(r, _)| *r == orders), "another table's DDL does not touch it: {o:?}");
        assert_eq!(d[0], (Res::Global, Mode::IntentExclusive), "no cluster-wide lock for DDL that names");
        // An oid the catalog does not know, or a caller's say-so: the cluster-wide lock.
        let unknown = Analysis { tables: vec![(8, TableMode::Keyed)], ..write.clone() };
        assert_eq!(locks(&unknown), vec![(Res::Global, Mode::Exclusive)]);
        let mut out = Vec::new();
        lock_set(&ddl, &LockInput { db: 1, bind: None, name_of: &names, global: true }, &mut out);
        assert_eq!(out, vec![(Res::Global, Mode::Exclusive)]);
    }
}
