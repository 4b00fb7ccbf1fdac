//! Sets of serials as runs without a gap (no I/O).
//!
//! A history holds tens of thousands of serials and few gaps (serials handed out to units that
//! did not commit): read as runs, one row per gap, and then only where it can have changed
//! (above the newest serial known and inside the known gaps), a catch-up's reads, the one
//! under the write pause included, cost the same however long the history is.

/// Serials `lo..=hi`, all held.
pub type Run = (u64, u64);

/// The serials in `a` and not in `b` (both sorted and apart), as runs.
pub fn minus(a: &[Run], b: &[Run]) -> Vec<Run> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(lo, hi) in a {
        while j < b.len() && b[j].1 < lo {
            j += 1;
        }
        let mut at = lo;
        for &(blo, bhi) in b[j..].iter().take_while(|r| r.0 <= hi) {
            if blo > at {
                out.push((at, blo - 1));
            }
            at = at.max(bhi + 1);
        }
        if at <= hi {
            out.push((at, hi));
        }
    }
    out
}

/// The gaps between `known`'s runs: where a serial handed out earlier may still appear.
pub fn gaps(known: &[Run]) -> Vec<Run> {
    known.windows(2).map(|w| (w[0].1 + 1, w[1].0 - 1)).collect()
}

/// `known` with `serials` added (in any order, repeats allowed).
pub fn merge(known: &[Run], serials: Vec<u64>) -> Vec<Run> {
    let added: Vec<Run> = serials.into_iter().map(|s| (s, s)).collect();
    union(known, &added)
}

/// The serials in `a` or in `b` (each in any order, overlaps allowed), as sorted runs apart.
pub fn union(a: &[Run], b: &[Run]) -> Vec<Run> {
    let mut all: Vec<Run> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Vec<Run> = Vec::with_capacity(all.len().min(a.len() + 1));
    for (lo, hi) in all {
        match out.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// The serials of `a` from `floor` on.
pub fn from(a: &[Run], floor: u64) -> Vec<Run> {
    a.iter().filter(|r| r.1 >= floor).map(|&(lo, hi)| (lo.max(floor), hi)).collect()
}

/// Whether `a` holds `serial`.
pub fn contains(a: &[Run], serial: u64) -> bool {
    let i = a.partition_point(|r| r.1 < serial);
    a.get(i).is_some_and(|r| r.0 <= serial)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_one_holds_and_the_other_lacks_is_found_run_by_run() {
        assert_eq!(minus(&[(1, 10)], &[]), vec![(1, 10)]);
        assert_eq!(minus(&[(1, 10)], &[(1, 10)]), vec![]);
        assert_eq!(minus(&[(1, 10)], &[(3, 4), (7, 7)]), vec![(1, 2), (5, 6), (8, 10)]);
        assert_eq!(minus(&[(1, 3), (5, 9), (12, 12)], &[(2, 6), (9, 20)]), vec![(1, 1), (7, 8)]);
        assert_eq!(minus(&[(5, 6)], &[(1, 2), (8, 9)]), vec![(5, 6)]);
        assert_eq!(minus(&[], &[(1, 2)]), vec![]);
    }

    #[test]
    fn new_serials_join_the_runs_they_touch() {
        assert_eq!(gaps(&[(1, 3), (6, 6), (9, 12)]), vec![(4, 5), (7, 8)]);
        assert_eq!(gaps(&[(1, 3)]), vec![]);
        assert_eq!(merge(&[(1, 3), (6, 6)], vec![5, 4, 4, 7, 10]), vec![(1, 7), (10, 10)]);
        assert_eq!(merge(&[], vec![2, 1]), vec![(1, 2)]);
        assert_eq!(merge(&[(1, 2)], vec![]), vec![(1, 2)]);
        assert_eq!(merge(&[(1, 2), (4, 4)], vec![3]), vec![(1, 4)]);
        assert_eq!(union(&[(5, 9), (1, 2)], &[(3, 3), (8, 12)]), vec![(1, 3), (5, 12)]);
        assert_eq!(from(&[(1, 3), (5, 9)], 4), vec![(5, 9)]);
        assert_eq!(from(&[(1, 3), (5, 9)], 6), vec![(6, 9)]);
        assert!(contains(&[(1, 3), (5, 9)], 5) && contains(&[(1, 3)], 3));
        assert!(!contains(&[(1, 3), (5, 9)], 4) && !contains(&[], 1) && !contains(&[(1, 3)], 10));
    }
}
