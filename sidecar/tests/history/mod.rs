//! The history checker of the store fault suite: what the load was told (admissions, ends,
//! kicks) against what the store holds afterwards. Pure: the fault suite records, this judges,
//! and the tests at the bottom show that each violation is caught.
//!
//! Times are milliseconds on one clock: the store's (Redis's `TIME`, which on one machine is
//! the wall clock the load reads too). The rules:
//! - **Limit.** At no instant are more than `limit` of an account's store admissions alive.
//!   A session is alive from its `createdAt` until the earliest moment its end may have
//!   happened: the store's record of the cut, or the moment the load *sent* the end or kick
//!   that was acknowledged. (A violation hidden inside one end's round trip is not seen; every
//!   violation reported is certain.)
//! - **Degraded bound.** Under failurePolicy Open a sidecar that judges the store down admits
//!   on its own, at most `limit` per account: at no instant are more than `limit` of an
//!   account's degraded sessions from one sidecar alive. So the account's total is at most
//!   `limit × (1 + sidecars admitting degraded)` while the store is down, the documented bound.
//! - **Count right again.** Once the faults are over, the store counts every session alive
//!   (degraded ones written back), and so holds at most the bound above: `limit` per account,
//!   plus `limit` per sidecar that admitted degraded sessions of it.
//! - **No phantom.** Every session the store holds at the end was given to a caller.
//! - **No loss.** Every acknowledged session the load did not try to end is, at the end,
//!   active in the store or explicitly cut there (revoked or expired, with its record); every
//!   end the load was acknowledged is applied. (An end or kick answered 503 may have been
//!   applied: the session may then be absent.)
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::{HashMap, HashSet};

/// One acknowledged admission (a 201 the load got).
#[derive(Clone, Debug)]
pub struct Admission {
    pub account: String,
    pub id: String,
    /// Which sidecar admitted it.
    pub sidecar: usize,
    /// Admitted without the store (failurePolicy Open).
    pub degraded: bool,
    /// `createdAt`.
    pub start_ms: i64,
    /// When the load sent the end or kick that was acknowledged, if it did.
    pub ended_sent_ms: Option<i64>,
    /// When the load first sent an end or kick for it that got no acknowledgement (a 503, or
    /// no answer): it may or may not have been applied.
    pub end_tried_ms: Option<i64>,
}

/// What the store says of a session at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Final {
    /// Active.
    Active,
    /// Cut (revoked or expired) at `at_ms`, with its record.
    Cut { at_ms: i64 },
    /// No record.
    Absent,
}

/// A run: its admissions, the final state of each (by id), and the ids each account's
/// active sessions had in the store at the end.
#[derive(Clone, Debug, Default)]
pub struct History {
    pub admissions: Vec<Admission>,
    pub finals: HashMap<String, Final>,
    pub held_at_end: HashMap<String, Vec<String>>,
}

/// A broken rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// More than the limit of the account's store admissions alive at `at_ms`.
    OverLimit {
        account: String,
        at_ms: i64,
        alive: usize,
    },
    /// More than the limit of degraded sessions from one sidecar alive at `at_ms`.
    DegradedOverLimit {
        account: String,
        sidecar: usize,
        at_ms: i64,
        alive: usize,
    },
    /// The store holds more than the bound for the account at the end.
    CountWrongAtEnd {
        account: String,
        held: usize,
        bound: usize,
    },
    /// The store holds a session nobody was given.
    Phantom { account: String, id: String },
    /// An acknowledged session neither present nor cut.
    Lost { account: String, id: String },
    /// An acknowledged end or kick that the store does not show.
    EndNotApplied { account: String, id: String },
}

/// The largest number of `[start, end)` intervals alive at once, and when (ends before starts
/// at equal times: the store cuts, then admits).
fn peak(intervals: &[(i64, i64)]) -> (usize, i64) {
    let mut events: Vec<(i64, i32)> = intervals
        .iter()
        .filter(|(start, end)| start < end)
        .flat_map(|&(start, end)| [(start, 1), (end, -1)])
        .collect();
    events.sort();
    let (mut alive, mut best, mut at) = (0i32, 0i32, 0i64);
    for (time, delta) in events {
        alive += delta;
        if alive > best {
            best = alive;
            at = time;
        }
    }
    (best as usize, at)
}

/// Every violation of the rules in `history` for accounts limited to `limit`.
pub fn check(history: &History, limit: usize) -> Vec<Violation> {
    let mut violations = Vec::new();
    // Alive intervals, by account (store admissions) and by account and sidecar (degraded).
    let mut store: HashMap<&str, Vec<(i64, i64)>> = HashMap::new();
    let mut degraded: HashMap<(&str, usize), Vec<(i64, i64)>> = HashMap::new();
    for admission in &history.admissions {
        let fin = history
            .finals
            .get(&admission.id)
            .copied()
            .unwrap_or(Final::Absent);
        let account = admission.account.clone();
        let id = admission.id.clone();
        let end = match (fin, admission.ended_sent_ms) {
            (Final::Active, Some(sent)) => {
                violations.push(Violation::EndNotApplied { account, id });
                sent
            }
            (Final::Active, None) => i64::MAX,
            (Final::Cut { at_ms }, Some(sent)) => at_ms.min(sent),
            (Final::Cut { at_ms }, None) => at_ms,
            (Final::Absent, Some(sent)) => sent,
            (Final::Absent, None) if admission.end_tried_ms.is_some() => {
                admission.end_tried_ms.unwrap_or(admission.start_ms)
            }
            (Final::Absent, None) => {
                violations.push(Violation::Lost { account, id });
                // Not in the store: it holds no slot there (already reported).
                admission.start_ms
            }
        };
        let interval = (admission.start_ms, end);
        if admission.degraded {
            degraded
                .entry((&admission.account, admission.sidecar))
                .or_default()
                .push(interval);
        } else {
            store.entry(&admission.account).or_default().push(interval);
        }
    }
    let mut accounts: Vec<_> = store.into_iter().collect();
    accounts.sort();
    for (account, intervals) in accounts {
        let (alive, at_ms) = peak(&intervals);
        if alive > limit {
            violations.push(Violation::OverLimit {
                account: account.to_string(),
                at_ms,
                alive,
            });
        }
    }
    let mut per_sidecar: Vec<_> = degraded.into_iter().collect();
    per_sidecar.sort();
    for ((account, sidecar), intervals) in per_sidecar {
        let (alive, at_ms) = peak(&intervals);
        if alive > limit {
            violations.push(Violation::DegradedOverLimit {
                account: account.to_string(),
                sidecar,
                at_ms,
                alive,
            });
        }
    }
    let given: HashSet<&str> = history.admissions.iter().map(|a| a.id.as_str()).collect();
    let mut degraded_sidecars: HashMap<&str, HashSet<usize>> = HashMap::new();
    for admission in history.admissions.iter().filter(|a| a.degraded) {
        degraded_sidecars
            .entry(&admission.account)
            .or_default()
            .insert(admission.sidecar);
    }
    let mut held: Vec<_> = history.held_at_end.iter().collect();
    held.sort();
    for (account, ids) in held {
        let sidecars = degraded_sidecars
            .get(account.as_str())
            .map_or(0, HashSet::len);
        let bound = limit * (1 + sidecars);
        if ids.len() > bound {
            violations.push(Violation::CountWrongAtEnd {
                account: account.clone(),
                held: ids.len(),
                bound,
            });
        }
        for id in ids.iter().filter(|id| !given.contains(id.as_str())) {
            violations.push(Violation::Phantom {
                account: account.clone(),
                id: id.clone(),
            });
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(id: &str, start_ms: i64) -> Admission {
        Admission {
            account: "a".into(),
            id: id.into(),
            sidecar: 0,
            degraded: false,
            start_ms,
            ended_sent_ms: None,
            end_tried_ms: None,
        }
    }

    fn history(admissions: Vec<Admission>, finals: &[(&str, Final)]) -> History {
        let held = finals
            .iter()
            .filter(|(_, f)| *f == Final::Active)
            .map(|(id, _)| id.to_string())
            .collect();
        History {
            admissions,
            finals: finals.iter().map(|(id, f)| (id.to_string(), *f)).collect(),
            held_at_end: HashMap::from([("a".to_string(), held)]),
        }
    }

    #[test]
    fn a_clean_history_with_ends_cuts_and_reuse_of_slots_passes() {
        let mut ended = admitted("1", 0);
        ended.ended_sent_ms = Some(10);
        let h = history(
            vec![
                ended,
                admitted("2", 1),
                admitted("3", 2),
                // Takes the slot "1" freed; at the same ms the end comes first.
                admitted("4", 10),
                // Takes the slot "2" freed when it was kicked (the store's record).
                admitted("5", 20),
            ],
            &[
                ("1", Final::Absent),
                ("2", Final::Cut { at_ms: 20 }),
                ("3", Final::Active),
                ("4", Final::Active),
                ("5", Final::Active),
            ],
        );
        assert_eq!(check(&h, 3), vec![]);
    }

    #[test]
    fn a_fourth_session_alive_at_once_is_over_the_limit() {
        let mut early_end = admitted("1", 0);
        early_end.ended_sent_ms = Some(11);
        let h = history(
            vec![
                early_end,
                admitted("2", 1),
                admitted("3", 2),
                admitted("4", 10),
            ],
            &[
                ("1", Final::Absent),
                ("2", Final::Active),
                ("3", Final::Active),
                ("4", Final::Active),
            ],
        );
        assert_eq!(
            check(&h, 3),
            vec![Violation::OverLimit {
                account: "a".into(),
                at_ms: 10,
                alive: 4
            }]
        );
    }

    #[test]
    fn degraded_sessions_are_bounded_per_sidecar_not_counted_with_the_store() {
        let degraded = |id: &str, sidecar: usize, start: i64| Admission {
            degraded: true,
            sidecar,
            ..admitted(id, start)
        };
        let mut admissions = vec![admitted("s1", 0), admitted("s2", 0), admitted("s3", 0)];
        for i in 0..3 {
            admissions.push(degraded(&format!("d0-{i}"), 0, 5));
            admissions.push(degraded(&format!("d1-{i}"), 1, 5));
        }
        // Written back when the store returned: all nine active in the store, within the
        // bound of 3 + 3 per sidecar that admitted degraded sessions.
        let mut finals: Vec<(String, Final)> = admissions
            .iter()
            .map(|a| (a.id.clone(), Final::Active))
            .collect();
        let h = |admissions: Vec<Admission>, finals: &[(String, Final)]| {
            let finals: Vec<(&str, Final)> =
                finals.iter().map(|(id, f)| (id.as_str(), *f)).collect();
            history(admissions, &finals)
        };
        assert_eq!(check(&h(admissions.clone(), &finals), 3), vec![]);
        // A fourth degraded session from sidecar 1 breaks the bound.
        admissions.push(degraded("d1-3", 1, 6));
        finals.push(("d1-3".into(), Final::Active));
        assert_eq!(
            check(&h(admissions, &finals), 3),
            vec![
                Violation::DegradedOverLimit {
                    account: "a".into(),
                    sidecar: 1,
                    at_ms: 6,
                    alive: 4
                },
                Violation::CountWrongAtEnd {
                    account: "a".into(),
                    held: 10,
                    bound: 9
                }
            ]
        );
    }

    #[test]
    fn a_session_nobody_was_given_is_a_phantom_and_too_many_held_is_caught() {
        let mut h = history(
            vec![admitted("1", 0)],
            &[("1", Final::Active), ("ghost", Final::Active)],
        );
        assert_eq!(
            check(&h, 3),
            vec![Violation::Phantom {
                account: "a".into(),
                id: "ghost".into()
            }]
        );
        h.held_at_end.insert(
            "a".into(),
            vec!["1".into(), "1".into(), "1".into(), "1".into()],
        );
        assert_eq!(
            check(&h, 3),
            vec![Violation::CountWrongAtEnd {
                account: "a".into(),
                held: 4,
                bound: 3
            }]
        );
    }

    #[test]
    fn an_acknowledged_session_missing_from_the_store_is_lost_but_a_cut_one_is_not() {
        let h = history(
            vec![admitted("1", 0), admitted("2", 0)],
            &[("1", Final::Absent), ("2", Final::Cut { at_ms: 5 })],
        );
        assert_eq!(
            check(&h, 3),
            vec![Violation::Lost {
                account: "a".into(),
                id: "1".into()
            }]
        );
    }

    #[test]
    fn a_session_whose_unanswered_end_may_have_been_applied_is_not_lost() {
        let mut tried = admitted("1", 0);
        tried.end_tried_ms = Some(5);
        let h = history(vec![tried, admitted("2", 1)], &[("2", Final::Active)]);
        assert_eq!(check(&h, 3), vec![]);
    }

    #[test]
    fn an_acknowledged_end_the_store_does_not_show_is_caught() {
        let mut ended = admitted("1", 0);
        ended.ended_sent_ms = Some(5);
        let h = history(vec![ended], &[("1", Final::Active)]);
        assert_eq!(
            check(&h, 3),
            vec![Violation::EndNotApplied {
                account: "a".into(),
                id: "1".into()
            }]
        );
    }
}
