//! The decisions of session validation, as pure functions: what one HTTP attempt means, when to
//! retry, what a set of validator outcomes does to the session, when to check again.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::policy::{ValidatorFailurePolicy, ValidatorSpec};

pub use crate::session::ValidationState;

/// A validator's answer: the body of a 2xx response to a SessionReview.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReviewAnswer {
    /// Whether the session may go on.
    pub allowed: bool,
    /// Machine-readable reason, e.g. `subscription_cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable message, shown to the viewer on a denial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What one HTTP attempt yielded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// A verdict.
    Answered(ReviewAnswer),
    /// No verdict, worth retrying (timeout, connection error, 408, 429, 5xx).
    Retry(String),
    /// No verdict, and retrying will not help (other 4xx, a 2xx that is not a SessionReview
    /// answer). Counts as a failure under the validator's failurePolicy.
    GiveUp(String),
}

/// Classifies an HTTP answer: its status and body.
pub fn classify(status: u16, body: &[u8]) -> Attempt {
    match status {
        200..=299 => match serde_json::from_slice::<ReviewAnswer>(body) {
            Ok(answer) => Attempt::Answered(answer),
            Err(e) => Attempt::GiveUp(format!("HTTP {status} but not a SessionReview answer: {e}")),
        },
        408 | 429 | 500..=599 => Attempt::Retry(format!("HTTP {status}")),
        _ => Attempt::GiveUp(format!("HTTP {status}")),
    }
}

/// Why a call to a validator got no verdict, as recorded for the validator's health (the
/// StreamingPolicy's `ValidatorsHealthy` condition names it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// No answer within the validator's timeout.
    Timeout,
    /// Nothing listens at the endpoint.
    ConnectionRefused,
    /// Another connection or TLS problem (name resolution, reset, certificate).
    Connection,
    /// An HTTP status that is not an answer (5xx, 429, other 4xx).
    Http(u16),
    /// A 2xx whose body is not a SessionReview answer (or is too large).
    MalformedAnswer,
    /// The validator cannot be called as configured (e.g. an unusable caBundle).
    Configuration,
}

impl FailureKind {
    /// The kind of an HTTP answer that gave no verdict.
    pub fn of_status(status: u16) -> Self {
        if (200..=299).contains(&status) {
            Self::MalformedAnswer
        } else {
            Self::Http(status)
        }
    }

    /// The kind as stored and shown: `timeout`, `connection refused`, `HTTP 503`, ...
    pub fn label(self) -> String {
        match self {
            Self::Timeout => "timeout".into(),
            Self::ConnectionRefused => "connection refused".into(),
            Self::Connection => "connection error".into(),
            Self::Http(status) => format!("HTTP {status}"),
            Self::MalformedAnswer => "malformed answer".into(),
            Self::Configuration => "configuration error".into(),
        }
    }
}

/// A call that got no verdict: its kind, and what happened (for logs and the session's message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallFailure {
    /// What kind of failure (of the last attempt).
    pub kind: FailureKind,
    /// What happened.
    pub problem: String,
}

impl std::fmt::Display for CallFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.problem)
    }
}

/// First retry delay; doubled after each attempt up to [`MAX_RETRY_DELAY`].
pub const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Longest delay between two attempts.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);

/// The wait before attempt `attempt + 1` (attempts count from 0), or `None` when it would not
/// start before `budget` runs out at `elapsed`: retries stay within the validator's timeout.
pub fn retry_delay(attempt: u32, elapsed: Duration, budget: Duration) -> Option<Duration> {
    let delay = FIRST_RETRY_DELAY
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(MAX_RETRY_DELAY);
    (elapsed + delay < budget).then_some(delay)
}

/// How one validator's check ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidatorOutcome {
    /// The validator's name.
    pub validator: String,
    /// Its failurePolicy.
    pub failure_policy: ValidatorFailurePolicy,
    /// Its verdict, or why there is none.
    pub result: Result<ReviewAnswer, String>,
}

impl ValidatorOutcome {
    /// The metric label of the outcome: `allowed`, `denied` or `failed`.
    pub fn result_label(&self) -> &'static str {
        match &self.result {
            Ok(answer) if answer.allowed => "allowed",
            Ok(_) => "denied",
            Err(_) => "failed",
        }
    }
}

/// What a check does to the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The session goes on, with this validation state (`allowed`, or `failed` under Allow).
    Keep(ValidationState),
    /// The session is revoked, reason `denied`.
    Revoke {
        /// `denied` (a validator said no) or `failed` (no answer under failurePolicy Revoke).
        state: ValidationState,
        /// The validator that decided.
        validator: String,
        /// What the viewer is told.
        message: String,
    },
}

/// Combines the outcomes of one check. A denial wins over everything, then a failure under
/// `Revoke`, then a failure under `Allow`; the first validator (in policy order) decides.
pub fn decide(outcomes: &[ValidatorOutcome]) -> Decision {
    for outcome in outcomes {
        if let Ok(answer) = &outcome.result
            && !answer.allowed
        {
            let message = answer
                .message
                .clone()
                .or_else(|| answer.reason.clone())
                .unwrap_or_else(|| format!("denied by validator {}", outcome.validator));
            return Decision::Revoke {
                state: ValidationState::Denied,
                validator: outcome.validator.clone(),
                message,
            };
        }
    }
    for outcome in outcomes {
        if let Err(problem) = &outcome.result
            && outcome.failure_policy == ValidatorFailurePolicy::Revoke
        {
            return Decision::Revoke {
                state: ValidationState::Failed,
                validator: outcome.validator.clone(),
                message: format!(
                    "validator {} could not check the session ({problem}) and its failurePolicy is Revoke",
                    outcome.validator
                ),
            };
        }
    }
    if outcomes.iter().any(|o| o.result.is_err()) {
        Decision::Keep(ValidationState::Failed)
    } else {
        Decision::Keep(ValidationState::Allowed)
    }
}

/// Which validators a check calls: the first check after admission calls the `Async` ones
/// (the `Blocking` ones answered during the open); later checks call those with
/// `revalidateSeconds`.
pub fn validators_for_check(validators: &[ValidatorSpec], first: bool) -> Vec<&ValidatorSpec> {
    validators
        .iter()
        .filter(|v| {
            if first {
                v.mode == crate::policy::ValidatorMode::Async
            } else {
                v.revalidate_seconds.is_some()
            }
        })
        .collect()
}

/// How long until the next check of a session that was kept: the shortest `revalidateSeconds`,
/// or `None` when no validator revalidates.
pub fn next_check_in(validators: &[ValidatorSpec]) -> Option<Duration> {
    validators
        .iter()
        .filter_map(|v| v.revalidate_seconds)
        .min()
        .map(|s| Duration::from_secs(u64::from(s)))
}

/// How long a sidecar holds a claimed check before another may take it over: the longest
/// timeout of the validators it calls, plus a margin for the store round trips.
pub fn lease_for(validators: &[ValidatorSpec]) -> Duration {
    let longest = validators
        .iter()
        .map(|v| v.timeout_seconds)
        .max()
        .unwrap_or(1);
    Duration::from_secs(u64::from(longest)) + LEASE_MARGIN
}

/// Margin of a lease over the validators' timeout.
pub const LEASE_MARGIN: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ValidatorMode;

    fn outcome(
        name: &str,
        policy: ValidatorFailurePolicy,
        result: Result<bool, &str>,
    ) -> ValidatorOutcome {
        ValidatorOutcome {
            validator: name.into(),
            failure_policy: policy,
            result: result
                .map(|allowed| ReviewAnswer {
                    allowed,
                    reason: (!allowed).then(|| "subscription_cancelled".into()),
                    message: (!allowed).then(|| format!("{name} says no")),
                })
                .map_err(str::to_string),
        }
    }

    use ValidatorFailurePolicy::{Allow, Revoke};

    #[test]
    fn a_call_without_verdict_is_labelled_by_its_kind() {
        assert_eq!(FailureKind::of_status(503).label(), "HTTP 503");
        assert_eq!(FailureKind::of_status(403).label(), "HTTP 403");
        assert_eq!(FailureKind::of_status(200).label(), "malformed answer");
        assert_eq!(FailureKind::Timeout.label(), "timeout");
        assert_eq!(FailureKind::ConnectionRefused.label(), "connection refused");
    }

    #[test]
    fn a_denial_revokes_with_the_validators_message() {
        let d = decide(&[
            outcome("a", Allow, Ok(true)),
            outcome("b", Revoke, Err("timeout")),
            outcome("c", Allow, Ok(false)),
        ]);
        assert_eq!(
            d,
            Decision::Revoke {
                state: ValidationState::Denied,
                validator: "c".into(),
                message: "c says no".into()
            }
        );
    }

    #[test]
    fn failures_follow_the_failure_policy() {
        assert_eq!(
            decide(&[outcome("a", Allow, Err("HTTP 503"))]),
            Decision::Keep(ValidationState::Failed)
        );
        match decide(&[
            outcome("a", Allow, Ok(true)),
            outcome("b", Revoke, Err("HTTP 503")),
        ]) {
            Decision::Revoke {
                state,
                validator,
                message,
            } => {
                assert_eq!((state, validator.as_str()), (ValidationState::Failed, "b"));
                assert!(message.contains("HTTP 503"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decide(&[outcome("a", Allow, Ok(true))]),
            Decision::Keep(ValidationState::Allowed)
        );
        assert_eq!(decide(&[]), Decision::Keep(ValidationState::Allowed));
    }

    #[test]
    fn a_denial_without_message_names_the_validator() {
        let d = decide(&[ValidatorOutcome {
            validator: "geo".into(),
            failure_policy: Allow,
            result: Ok(ReviewAnswer {
                allowed: false,
                reason: None,
                message: None,
            }),
        }]);
        assert!(
            matches!(d, Decision::Revoke { message, .. } if message == "denied by validator geo")
        );
    }

    #[test]
    fn answers_are_classified_by_status() {
        assert_eq!(
            classify(200, br#"{"allowed":true}"#),
            Attempt::Answered(ReviewAnswer {
                allowed: true,
                reason: None,
                message: None
            })
        );
        assert!(matches!(classify(200, b"<html>"), Attempt::GiveUp(_)));
        for retry in [408, 429, 500, 502, 503, 504] {
            assert!(matches!(classify(retry, b""), Attempt::Retry(_)), "{retry}");
        }
        for give_up in [400, 401, 403, 404] {
            assert!(
                matches!(classify(give_up, b""), Attempt::GiveUp(_)),
                "{give_up}"
            );
        }
    }

    #[test]
    fn retries_back_off_and_stay_within_the_timeout() {
        let budget = Duration::from_secs(2);
        let mut elapsed = Duration::ZERO;
        let mut delays = Vec::new();
        let mut attempt = 0;
        while let Some(delay) = retry_delay(attempt, elapsed, budget) {
            delays.push(delay.as_millis());
            elapsed += delay;
            attempt += 1;
        }
        assert_eq!(delays, [100, 200, 400, 800]);
        assert!(elapsed < budget);
        assert_eq!(
            retry_delay(30, Duration::ZERO, Duration::from_secs(5)),
            Some(MAX_RETRY_DELAY)
        );
        assert_eq!(
            retry_delay(0, Duration::from_millis(950), Duration::from_secs(1)),
            None
        );
    }

    fn validator(
        name: &str,
        mode: ValidatorMode,
        revalidate: Option<u32>,
        timeout: u32,
    ) -> ValidatorSpec {
        ValidatorSpec {
            name: name.into(),
            url: Some("http://127.0.0.1:1/".into()),
            service: None,
            ca_bundle: None,
            timeout_seconds: timeout,
            failure_policy: Allow,
            revalidate_seconds: revalidate,
            mode,
        }
    }

    #[test]
    fn checks_call_async_validators_first_then_revalidating_ones() {
        let all = [
            validator("a", ValidatorMode::Async, None, 5),
            validator("b", ValidatorMode::Blocking, Some(60), 2),
            validator("c", ValidatorMode::Async, Some(30), 9),
        ];
        let names = |v: Vec<&ValidatorSpec>| v.iter().map(|v| v.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(validators_for_check(&all, true)), ["a", "c"]);
        assert_eq!(names(validators_for_check(&all, false)), ["b", "c"]);
        assert_eq!(next_check_in(&all), Some(Duration::from_secs(30)));
        assert_eq!(next_check_in(&all[..1]), None);
        assert_eq!(lease_for(&all), Duration::from_secs(11));
    }
}
