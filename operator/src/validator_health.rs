//! The `ValidatorsHealthy` condition of a StreamingPolicy with session validators: whether they
//! have been answering the sidecars' SessionReviews, and which one has been failing since when.
//!
//! The sidecars count every validator call in the namespace's session store
//! (`streamgate_store::validator_health`); the operator's periodic refresh
//! ([`crate::liveapi::active`]) reads the counts and sets the condition with these pure
//! functions. A denial is an answer: only calls that got no verdict (timeout, refused
//! connection, HTTP 5xx, malformed answer) count as failures.

use kube::{Resource, ResourceExt};
use streamgate_store::validator_health::{ValidatorStats, WINDOW};

use crate::crd::{PolicyCondition, StreamingPolicy};

/// The condition's type.
pub const CONDITION: &str = "ValidatorsHealthy";

/// Reason of status False: at least one validator has been failing.
pub const REASON_FAILING: &str = "ValidatorFailing";
/// Reason of status True: the validators called lately answered.
pub const REASON_ANSWERING: &str = "ValidatorsAnswering";
/// Reason of status Unknown: no call recorded within the window.
pub const REASON_NO_CALLS: &str = "NoRecentCalls";
/// Reason of status Unknown: the sidecars use the embedded memory store, nothing is shared.
pub const REASON_NO_SHARED_STORE: &str = "NoSharedStore";

/// Fewest failures within the window that make a validator failing (one failed call of a
/// healthy validator is noise).
pub const MIN_FAILURES: u64 = 3;

/// Longest condition message; Kubernetes allows 32768, `kubectl describe` readers far less.
pub const MAX_MESSAGE_CHARS: usize = 1024;

/// Longest failure kind shown (the sidecars' labels are shorter; the store is not trusted).
pub const MAX_KIND_CHARS: usize = 40;

/// How one validator has been doing within the window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// At least [`MIN_FAILURES`] calls failed, and at least half of them.
    Failing {
        /// The last failure's kind, as stored.
        kind: String,
        /// When its failures started (ms): the first one after a failure-free window.
        since_ms: Option<i64>,
    },
    /// Answering (failures, if any, are few).
    Answering,
    /// No answer within the window, and too few failures to call it failing (or no call).
    Idle,
}

/// The rule: failing when failures within the window are at least [`MIN_FAILURES`] and at least
/// half of the calls. It recovers when answers outnumber failures, or the failures age out.
/// A validator without an answer nor enough failures is [`Health::Idle`]: nothing to judge.
pub fn judge(stats: &ValidatorStats) -> Health {
    let calls = stats.answered.saturating_add(stats.failed);
    if stats.failed >= MIN_FAILURES && stats.failed.saturating_mul(2) >= calls {
        Health::Failing {
            kind: stats
                .last_failure
                .as_ref()
                .map(|(_, kind)| kind.clone())
                .unwrap_or_default(),
            since_ms: stats
                .failing_since
                .or(stats.last_failure.as_ref().map(|(at, _)| *at)),
        }
    } else if stats.answered > 0 {
        Health::Answering
    } else {
        Health::Idle
    }
}

/// What the operator could learn about a policy's validators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reading {
    /// Each validator (spec order) and its stats.
    Stats(Vec<(String, ValidatorStats)>),
    /// The namespace's sidecars use the embedded memory store: nothing is recorded.
    NoSharedStore,
}

/// The condition's status, reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Names the failing validators, their failure kind and since when.
    pub message: String,
}

/// The condition for `reading`. The message carries no counts or last-call times, so it changes
/// only when the verdict does (the status is patched only then).
pub fn verdict(reading: &Reading) -> Verdict {
    let window_minutes = WINDOW.as_secs() / 60;
    let stats = match reading {
        Reading::NoSharedStore => {
            return Verdict {
                status: "Unknown",
                reason: REASON_NO_SHARED_STORE,
                message: "the sidecars use the embedded memory store: validator calls are not \
                          recorded where the operator can read them"
                    .into(),
            };
        }
        Reading::Stats(stats) => stats,
    };
    let judged: Vec<(String, Health)> = stats
        .iter()
        .map(|(name, stats)| (sanitize(name, 63), judge(stats)))
        .collect();
    let failing: Vec<String> = judged
        .iter()
        .filter_map(|(name, health)| match health {
            Health::Failing { kind, since_ms } => {
                let kind = match sanitize(kind, MAX_KIND_CHARS) {
                    k if k.is_empty() => "failure".to_string(),
                    k => k,
                };
                Some(match since_ms.and_then(rfc3339) {
                    Some(since) => format!("validator {name} failing ({kind}) since {since}"),
                    None => format!("validator {name} failing ({kind})"),
                })
            }
            _ => None,
        })
        .collect();
    if !failing.is_empty() {
        return Verdict {
            status: "False",
            reason: REASON_FAILING,
            message: cap(&format!(
                "{}: most calls in the last {window_minutes} minutes got no verdict",
                failing.join("; ")
            )),
        };
    }
    let names = |wanted: fn(&Health) -> bool| -> Vec<&str> {
        judged
            .iter()
            .filter(|(_, health)| wanted(health))
            .map(|(name, _)| name.as_str())
            .collect()
    };
    let answering = names(|h| *h == Health::Answering);
    let idle = names(|h| *h == Health::Idle);
    if answering.is_empty() {
        return Verdict {
            status: "Unknown",
            reason: REASON_NO_CALLS,
            message: format!(
                "no validator answered in the last {window_minutes} minutes, nor failed \
                 {MIN_FAILURES} times"
            ),
        };
    }
    let message = if idle.is_empty() {
        format!("all validators answered in the last {window_minutes} minutes")
    } else {
        format!(
            "{} answered in the last {window_minutes} minutes; no answer from {}",
            answering.join(", "),
            idle.join(", ")
        )
    };
    Verdict {
        status: "True",
        reason: REASON_ANSWERING,
        message: cap(&message),
    }
}

/// The condition `policy` should carry for `verdict` at `now` (RFC 3339): the transition time
/// moves only when the status changes.
pub fn desired_condition(
    policy: &StreamingPolicy,
    verdict: &Verdict,
    now: &str,
) -> PolicyCondition {
    let previous = current_condition(policy);
    let last_transition_time = match previous {
        Some(c) if c.status == verdict.status => c.last_transition_time.clone(),
        _ => now.to_string(),
    };
    PolicyCondition {
        type_: CONDITION.into(),
        status: verdict.status.into(),
        reason: verdict.reason.into(),
        message: verdict.message.clone(),
        last_transition_time,
        observed_generation: policy.meta().generation,
    }
}

/// The policy's current `ValidatorsHealthy` condition.
pub fn current_condition(policy: &StreamingPolicy) -> Option<&PolicyCondition> {
    policy
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION))
}

/// Whether writing `desired` changes anything.
pub fn changes(policy: &StreamingPolicy, desired: &PolicyCondition) -> bool {
    current_condition(policy) != Some(desired)
}

/// Whether writing the condition dropped other managers' conditions (`before` had one that
/// `after` lacks): the installed CRD predates `status.conditions` being a list keyed by type, so
/// each write replaces the whole list and the reconciler's `Ready` would fight this one.
pub fn dropped_other_conditions(before: &StreamingPolicy, after: &StreamingPolicy) -> bool {
    let types = |p: &StreamingPolicy| -> Vec<String> {
        p.status
            .iter()
            .flat_map(|s| s.conditions.iter().map(|c| c.type_.clone()))
            .collect()
    };
    let kept = types(after);
    types(before)
        .iter()
        .any(|t| t != CONDITION && !kept.contains(t))
}

/// `text` made safe for a condition message: control characters (newlines, escape sequences)
/// become spaces, runs of spaces one, at most `max` characters.
pub fn sanitize(text: &str, max: usize) -> String {
    let mut out = String::new();
    let mut count = 0;
    for c in text.chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        if count == max {
            out.push('…');
            break;
        }
        out.push(c);
        count += 1;
    }
    out.trim_end().to_string()
}

fn cap(message: &str) -> String {
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((at, _)) => format!("{}…", &message[..at]),
        None => message.to_string(),
    }
}

fn rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// The `(policy, validator)` pairs of `policies` that have validators, in order.
pub fn validators_of(policies: &[StreamingPolicy]) -> Vec<(String, String)> {
    policies
        .iter()
        .flat_map(|p| {
            let name = p.name_any();
            p.spec
                .policy
                .validators
                .iter()
                .map(move |v| (name.clone(), v.name.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{StreamingPolicySpec, StreamingPolicyStatus};

    fn stats(answered: u64, failed: u64) -> ValidatorStats {
        ValidatorStats {
            answered,
            failed,
            last_failure: (failed > 0).then(|| (1_764_504_000_000, "HTTP 503".to_string())),
            failing_since: (failed > 0).then_some(1_764_503_940_000),
            last_answer_at: None,
            now_ms: 1_764_504_060_000,
        }
    }

    #[test]
    fn failing_takes_a_few_failures_and_at_least_half_of_the_calls() {
        assert_eq!(judge(&stats(0, 0)), Health::Idle);
        assert_eq!(judge(&stats(0, 2)), Health::Idle, "two failures are noise");
        assert_eq!(judge(&stats(1, 2)), Health::Answering);
        assert_eq!(
            judge(&stats(4, 3)),
            Health::Answering,
            "most calls answered"
        );
        let failing = Health::Failing {
            kind: "HTTP 503".into(),
            since_ms: Some(1_764_503_940_000),
        };
        assert_eq!(judge(&stats(3, 3)), failing);
        assert_eq!(judge(&stats(0, 3)), failing);
        assert_eq!(judge(&stats(10, 0)), Health::Answering);
    }

    #[test]
    fn the_message_names_each_failing_validator_its_kind_and_since_when() {
        let reading = Reading::Stats(vec![
            ("entitlement".into(), stats(0, 5)),
            ("geo".into(), stats(9, 1)),
        ]);
        let v = verdict(&reading);
        assert_eq!((v.status, v.reason), ("False", REASON_FAILING));
        assert_eq!(
            v.message,
            "validator entitlement failing (HTTP 503) since 2025-11-30T11:59:00Z: most calls in \
             the last 5 minutes got no verdict"
        );
        assert!(!v.message.contains("geo"), "{}", v.message);
    }

    #[test]
    fn true_when_the_validators_called_answered_unknown_when_none_was_called() {
        let all = verdict(&Reading::Stats(vec![
            ("a".into(), stats(3, 0)),
            ("b".into(), stats(1, 1)),
        ]));
        assert_eq!((all.status, all.reason), ("True", REASON_ANSWERING));
        assert_eq!(all.message, "all validators answered in the last 5 minutes");
        let some = verdict(&Reading::Stats(vec![
            ("a".into(), stats(3, 0)),
            ("b".into(), stats(0, 0)),
        ]));
        assert_eq!(
            some.message,
            "a answered in the last 5 minutes; no answer from b"
        );
        let none = verdict(&Reading::Stats(vec![("a".into(), stats(0, 0))]));
        assert_eq!((none.status, none.reason), ("Unknown", REASON_NO_CALLS));
        let memory = verdict(&Reading::NoSharedStore);
        assert_eq!(
            (memory.status, memory.reason),
            ("Unknown", REASON_NO_SHARED_STORE)
        );
    }

    #[test]
    fn hostile_names_and_kinds_cannot_shape_the_status() {
        let mut hostile = stats(0, 9);
        let kind = format!(
            "timeout\n\nConditions:\n  Type: ValidatorsHealthy Status: True\u{1b}[2J{}",
            "x".repeat(100_000)
        );
        hostile.last_failure = Some((1, kind));
        let names: Vec<(String, ValidatorStats)> = (0..50)
            .map(|i| (format!("v{i}\r\n{}", "n".repeat(500)), hostile.clone()))
            .collect();
        let v = verdict(&Reading::Stats(names));
        assert!(v.message.chars().count() <= MAX_MESSAGE_CHARS + 1, "capped");
        assert!(
            !v.message.chars().any(char::is_control),
            "no newline, carriage return or escape: {:?}",
            &v.message[..200]
        );
        assert!(v.message.starts_with("validator v0 nnnn"));
        assert!(
            v.message
                .contains("(timeout Conditions: Type: ValidatorsHeal…)"),
            "the kind is one line of at most {MAX_KIND_CHARS} characters: {}",
            &v.message[..200]
        );
        assert_eq!(sanitize("a\u{0}b\u{7f}\u{85}c  d", 10), "a b c d");
        assert_eq!(sanitize("abcdef", 3), "abc…");
    }

    #[test]
    fn an_outdated_crd_shows_as_a_dropped_ready_condition() {
        let with = |types: &[&str]| {
            let mut policy = StreamingPolicy::new("vip", StreamingPolicySpec::default());
            policy.status = Some(StreamingPolicyStatus {
                conditions: types
                    .iter()
                    .map(|t| PolicyCondition {
                        type_: t.to_string(),
                        status: "True".into(),
                        reason: "R".into(),
                        message: String::new(),
                        last_transition_time: "t".into(),
                        observed_generation: None,
                    })
                    .collect(),
                ..Default::default()
            });
            policy
        };
        let ready = with(&["Ready"]);
        assert!(!dropped_other_conditions(
            &ready,
            &with(&["Ready", CONDITION])
        ));
        assert!(dropped_other_conditions(&ready, &with(&[CONDITION])));
        assert!(!dropped_other_conditions(&with(&[CONDITION]), &with(&[])));
        assert!(!dropped_other_conditions(&with(&[]), &with(&[CONDITION])));
    }

    #[test]
    fn the_transition_time_moves_only_when_the_status_changes() {
        let mut policy = StreamingPolicy::new("vip", StreamingPolicySpec::default());
        policy.meta_mut().generation = Some(4);
        let failing = verdict(&Reading::Stats(vec![("a".into(), stats(0, 5))]));
        let first = desired_condition(&policy, &failing, "t1");
        assert_eq!(first.observed_generation, Some(4));
        assert!(changes(&policy, &first));
        policy.status = Some(StreamingPolicyStatus {
            conditions: vec![first.clone()],
            ..Default::default()
        });
        let again = desired_condition(&policy, &failing, "t2");
        assert_eq!(again, first, "same verdict: nothing to write");
        assert!(!changes(&policy, &again));
        let healthy = verdict(&Reading::Stats(vec![("a".into(), stats(9, 0))]));
        let flipped = desired_condition(&policy, &healthy, "t3");
        assert_eq!(
            (
                flipped.status.as_str(),
                flipped.last_transition_time.as_str()
            ),
            ("True", "t3")
        );
    }
}
