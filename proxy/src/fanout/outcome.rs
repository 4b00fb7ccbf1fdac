//! What one backend answered to one request, and the vote among backends.

use crate::protocol::message::{command_tag, error_code, COMMAND_COMPLETE, ERROR_RESPONSE, READY_FOR_QUERY};

/// The comparable summary of one backend's reply to one request. Built incrementally as the
/// reply streams past, without allocating.
#[derive(Clone, Copy, Default)]
pub struct Outcome {
    /// CommandComplete messages seen.
    pub completions: u32,
    /// A running hash of every command tag (with its row count), in order.
    pub tags_hash: u64,
    /// The SQLSTATE of the first error.
    pub error: Option<[u8; 5]>,
    /// The transaction status of the closing ReadyForQuery.
    pub status: u8,
    /// A running hash of the rows a write returned (RETURNING), when they are compared.
    pub rows_hash: u64,
    last_tag: [u8; 32],
    last_tag_len: u8,
}

impl PartialEq for Outcome {
    fn eq(&self, o: &Outcome) -> bool {
        self.completions == o.completions
            && self.tags_hash == o.tags_hash
            && self.error == o.error
            && self.status == o.status
            && self.rows_hash == o.rows_hash
    }
}

impl Eq for Outcome {}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Outcome {
    pub fn new() -> Outcome {
        Outcome { tags_hash: FNV_OFFSET, ..Default::default() }
    }

    /// The last command tag seen ("COMMIT", "UPDATE 1", ...).
    pub fn last_tag(&self) -> &[u8] {
        &self.last_tag[..self.last_tag_len as usize]
    }

    /// Adds a returned row to the rows hash (only for writes whose rows are compared).
    #[inline]
    pub fn hash_row(&mut self, body: &[u8]) {
        let mut h = if self.rows_hash == 0 { FNV_OFFSET } else { self.rows_hash };
        for &b in body {
            h ^= b as u64;
            h = h.wrapping_mul(FNV_PRIME);
        }
        // A row boundary, so that rows cannot shift into each other.
        h ^= 0xff;
        self.rows_hash = h.wrapping_mul(FNV_PRIME);
    }

    /// What is compared of a statement that reads per-server facts: success or error, the
    /// SQLSTATE and the transaction status; not how many rows each server had, nor which.
    pub fn success_only(mut self) -> Outcome {
        self.tags_hash = FNV_OFFSET;
        self.rows_hash = 0;
        self.completions = 0;
        self
    }

    /// Takes note of one reply message.
    #[inline]
    pub fn record(&mut self, tag: u8, body: &[u8]) {
        match tag {
            COMMAND_COMPLETE => {
                let t = command_tag(body);
                self.completions += 1;
                let mut h = self.tags_hash;
                for &b in t.iter().chain(std::iter::once(&0u8)) {
                    h ^= b as u64;
                    h = h.wrapping_mul(FNV_PRIME);
                }
                self.tags_hash = h;
                let n = t.len().min(self.last_tag.len());
                self.last_tag[..n].copy_from_slice(&t[..n]);
                self.last_tag_len = n as u8;
            }
            ERROR_RESPONSE if self.error.is_none() => self.error = Some(error_code(body)),
            READY_FOR_QUERY => self.status = crate::protocol::message::ready_status(body),
            _ => {}
        }
    }
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for Outcome {
    /// For log lines: "3 commands, last UPDATE 1" or "error 23505 after 1 command".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let last = String::from_utf8_lossy(&self.last_tag[..self.last_tag_len as usize]);
        match self.error {
            Some(code) => write!(f, "error {} after {} command(s)", String::from_utf8_lossy(&code), self.completions)?,
            None => write!(f, "{} command(s), last {:?}", self.completions, last)?,
        }
        if self.rows_hash != 0 {
            write!(f, ", returned rows hash {:016x}", self.rows_hash)?;
        }
        write!(f, ", status {}", self.status as char)
    }
}

/// The result of comparing backends' outcomes for one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Vote {
    /// The winning outcome.
    pub winner: Outcome,
    /// Session connection indexes whose outcome lost.
    pub losers: Vec<usize>,
}

/// Majority wins; on a tie the group holding the lead (the lowest index) wins.
/// `outcomes` holds (connection index, outcome) in priority order; it must not be empty.
pub fn vote(outcomes: &[(usize, Outcome)]) -> Vote {
    let mut best: Option<(usize, usize, Outcome)> = None; // (count, lowest index, outcome)
    for (i, o) in outcomes {
        let count = outcomes.iter().filter(|(_, p)| p == o).count();
        let lowest = outcomes.iter().filter(|(_, p)| p == o).map(|(j, _)| *j).min().unwrap_or(*i);
        let better = match best {
            None => true,
            Some((c, l, _)) => count > c || (count == c && lowest < l),
        };
        if better {
            best = Some((count, lowest, *o));
        }
    }
    let winner = best.map(|b| b.2).unwrap_or_default();
    let losers = outcomes.iter().filter(|(_, o)| *o != winner).map(|(i, _)| *i).collect();
    Vote { winner, losers }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(tags: &[&str], err: Option<&str>, status: u8) -> Outcome {
        let mut o = Outcome::new();
        for t in tags {
            let mut b = t.as_bytes().to_vec();
            b.push(0);
            o.record(COMMAND_COMPLETE, &b);
        }
        if let Some(code) = err {
            let body = format!("SERROR\0C{code}\0Mx\0\0");
            o.record(ERROR_RESPONSE, body.as_bytes());
        }
        o.record(READY_FOR_QUERY, &[status]);
        o
    }

    #[test]
    fn equal_outcomes_have_no_losers() {
        let a = outcome(&["UPDATE 1"], None, b'I');
        let v = vote(&[(0, a), (1, a)]);
        assert_eq!(v.winner, a);
        assert!(v.losers.is_empty());
    }

    #[test]
    fn row_counts_and_errors_differ() {
        assert_ne!(outcome(&["UPDATE 1"], None, b'I'), outcome(&["UPDATE 2"], None, b'I'));
        assert_ne!(outcome(&[], Some("23505"), b'I'), outcome(&[], Some("40001"), b'I'));
        assert_ne!(outcome(&["INSERT 0 1"], None, b'I'), outcome(&[], Some("23505"), b'I'));
        assert_ne!(outcome(&["SELECT 1"], None, b'T'), outcome(&["SELECT 1"], None, b'I'));
    }

    #[test]
    fn majority_wins_and_ties_go_to_the_lead() {
        let good = outcome(&["UPDATE 1"], None, b'I');
        let odd = outcome(&["UPDATE 2"], None, b'I');
        assert_eq!(vote(&[(0, odd), (1, good), (2, good)]), Vote { winner: good, losers: vec![0] });
        assert_eq!(vote(&[(0, good), (1, odd)]), Vote { winner: good, losers: vec![1] });
        assert_eq!(vote(&[(0, odd), (1, good)]), Vote { winner: odd, losers: vec![1] });
        assert_eq!(vote(&[(1, good), (2, odd)]), Vote { winner: good, losers: vec![2] });
    }

    #[test]
    fn display_names_the_outcome() {
        assert_eq!(outcome(&["UPDATE 1"], None, b'I').to_string(), "1 command(s), last \"UPDATE 1\", status I");
        assert_eq!(outcome(&[], Some("23505"), b'E').to_string(), "error 23505 after 0 command(s), status E");
    }
}
