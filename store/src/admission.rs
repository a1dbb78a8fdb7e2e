//! The admission decision: a pure function of the account's active sessions and its policy.
//!
//! This is the specification of the rule. Every store applies it atomically per account: the
//! memory store calls [`decide`] under its lock; the Redis store cannot call Rust from inside its
//! Lua script, so `store/lua/common.lua` carries the same rule as `decide()`. One decision table,
//! `admission_decisions.tsv`, drives the unit tests of both (the Lua against a real Redis in
//! `tests/admission_table.rs`), so the two cannot drift apart unnoticed.

use crate::policy::{Mode, OnLimitExceeded};

/// What the limiter would do if the policy were enforced, when an account is at its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverLimit {
    /// The new stream would be refused.
    Refuse,
    /// The new stream would evict this many of the oldest sessions.
    Evict(usize),
}

/// The decision for a new stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Under the limit: admit.
    Admit,
    /// At the limit, EvictOldest: admit and revoke this many of the oldest sessions.
    AdmitEvicting(usize),
    /// At the limit, RejectNew: refuse.
    Refuse,
    /// At the limit in DryRun: admit, and report what enforcement would have done.
    AdmitDryRun(OverLimit),
}

/// Decides whether a new stream is admitted when the account already has `active` sessions.
///
/// `active` may exceed `limit` after a policy lowered the limit; EvictOldest then evicts enough
/// sessions to get back under it, RejectNew refuses until sessions end.
pub fn decide(active: usize, limit: u32, on_limit: OnLimitExceeded, mode: Mode) -> Decision {
    let limit = limit as usize;
    if active < limit {
        return Decision::Admit;
    }
    let enforced = match on_limit {
        OnLimitExceeded::RejectNew => OverLimit::Refuse,
        // Evict down to limit - 1 so that the new stream makes exactly `limit`.
        OnLimitExceeded::EvictOldest => OverLimit::Evict(active + 1 - limit),
    };
    match (mode, enforced) {
        (Mode::DryRun, would) => Decision::AdmitDryRun(would),
        (Mode::Enforce, OverLimit::Refuse) => Decision::Refuse,
        (Mode::Enforce, OverLimit::Evict(n)) => Decision::AdmitEvicting(n),
    }
}

/// Picks the `n` oldest of `sessions`, given as `(created_at_ms, tiebreak, item)`. Ties on the
/// creation time are broken by `tiebreak` so every store picks the same victims.
pub fn oldest<T: Clone, K: Ord + Clone>(sessions: &[(i64, K, T)], n: usize) -> Vec<T> {
    let mut sorted: Vec<&(i64, K, T)> = sessions.iter().collect();
    sorted.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    sorted.into_iter().take(n).map(|s| s.2.clone()).collect()
}

/// The shared decision table (`admission_decisions.tsv`).
pub const DECISION_TABLE: &str = include_str!("admission_decisions.tsv");

/// One row of [`DECISION_TABLE`]: the inputs and the expected decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRow {
    /// Active sessions of the account.
    pub active: usize,
    /// Its limit.
    pub limit: u32,
    /// Over-limit action.
    pub on_limit: OnLimitExceeded,
    /// Enforce or dry run.
    pub mode: Mode,
    /// The expected decision.
    pub expected: Decision,
}

/// Parses [`DECISION_TABLE`]. Panics on a malformed row: the table is part of the source.
pub fn decision_table() -> Vec<TableRow> {
    DECISION_TABLE
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            let [active, limit, on_limit, mode, decision, evict, would] = f[..] else {
                panic!("decision table row needs 7 columns: {line:?}");
            };
            let evict: usize = evict.parse().expect("evict is a number");
            let expected = match (decision, would) {
                ("admit", _) => Decision::Admit,
                ("refuse", _) => Decision::Refuse,
                ("evict", _) => Decision::AdmitEvicting(evict),
                ("dryrun", "refuse") => Decision::AdmitDryRun(OverLimit::Refuse),
                ("dryrun", "evict") => Decision::AdmitDryRun(OverLimit::Evict(evict)),
                _ => panic!("unknown decision in {line:?}"),
            };
            TableRow {
                active: active.parse().expect("active is a number"),
                limit: limit.parse().expect("limit is a number"),
                on_limit: match on_limit {
                    "reject" => OnLimitExceeded::RejectNew,
                    "evict" => OnLimitExceeded::EvictOldest,
                    _ => panic!("unknown onLimit in {line:?}"),
                },
                mode: match mode {
                    "enforce" => Mode::Enforce,
                    "dryrun" => Mode::DryRun,
                    _ => panic!("unknown mode in {line:?}"),
                },
                expected,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use OnLimitExceeded::*;

    #[test]
    fn decide_follows_the_shared_decision_table() {
        let table = decision_table();
        assert!(table.len() >= 15, "the table lost rows");
        for row in table {
            assert_eq!(
                decide(row.active, row.limit, row.on_limit, row.mode),
                row.expected,
                "{row:?}"
            );
        }
    }

    #[test]
    fn under_limit_admits_in_any_mode() {
        for on_limit in [RejectNew, EvictOldest] {
            for mode in [Mode::Enforce, Mode::DryRun] {
                assert_eq!(decide(0, 3, on_limit, mode), Decision::Admit);
                assert_eq!(decide(2, 3, on_limit, mode), Decision::Admit);
            }
        }
    }

    #[test]
    fn at_limit_reject_new_refuses() {
        assert_eq!(decide(3, 3, RejectNew, Mode::Enforce), Decision::Refuse);
        assert_eq!(decide(5, 3, RejectNew, Mode::Enforce), Decision::Refuse);
    }

    #[test]
    fn at_limit_evict_oldest_evicts_down_to_limit() {
        assert_eq!(
            decide(3, 3, EvictOldest, Mode::Enforce),
            Decision::AdmitEvicting(1)
        );
        // The limit was lowered from 5 to 3: three must go so the new one makes 3.
        assert_eq!(
            decide(5, 3, EvictOldest, Mode::Enforce),
            Decision::AdmitEvicting(3)
        );
        assert_eq!(
            decide(1, 1, EvictOldest, Mode::Enforce),
            Decision::AdmitEvicting(1)
        );
    }

    #[test]
    fn dry_run_admits_and_reports() {
        assert_eq!(
            decide(3, 3, RejectNew, Mode::DryRun),
            Decision::AdmitDryRun(OverLimit::Refuse)
        );
        assert_eq!(
            decide(4, 3, EvictOldest, Mode::DryRun),
            Decision::AdmitDryRun(OverLimit::Evict(2))
        );
    }

    #[test]
    fn oldest_orders_by_creation_then_tiebreak() {
        let sessions = vec![(20, 1, "c"), (10, 2, "b"), (10, 1, "a"), (30, 0, "d")];
        assert_eq!(oldest(&sessions, 2), vec!["a", "b"]);
        assert_eq!(oldest(&sessions, 0), Vec::<&str>::new());
        assert_eq!(oldest(&sessions, 9).len(), 4);
    }
}
