//! `streamctl validator`: a ready-to-run session validator serving the SessionReview protocol,
//! for demos, tests and as the reference implementation.
//!
//! A sidecar POSTs a SessionReview (`apiVersion: streamgate.dev/v1alpha1`, `kind:
//! SessionReview`, `request: {uid, validator, revalidation, session, client, claims}`) and reads
//! `{allowed, reason, message}`. A validator must be idempotent: it may be called more than once
//! for one session (retries, rechecks, a takeover after a sidecar died), always with the session
//! id as `request.uid` and the `Idempotency-Key` header. This one is: its verdict depends only on
//! the review, except for `--fail-fraction`, which answers 503 (no verdict; the sidecar retries).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::args::ValidatorArgs;

/// `apiVersion` of the SessionReview protocol.
pub const API_VERSION: &str = "streamgate.dev/v1alpha1";
/// `kind` of the SessionReview protocol.
pub const KIND: &str = "SessionReview";

/// The answer to a SessionReview.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// Whether the session may go on.
    pub allowed: bool,
    /// Machine-readable reason of a denial.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Message shown to the viewer on a denial.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The rules of this validator.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// Accounts to deny.
    pub deny_accounts: Vec<String>,
    /// Request headers (lowercase name, value) that deny when the review carries them.
    pub deny_headers: Vec<(String, String)>,
    /// Message of a denial.
    pub message: String,
}

/// What to do with a review: the pure decision of this validator. `Err` names what is wrong
/// with a request that is not a SessionReview (answered 400).
pub fn decide(review: &Value, rules: &Rules) -> Result<Answer, String> {
    if review["apiVersion"] != API_VERSION || review["kind"] != KIND {
        return Err(format!("expected apiVersion {API_VERSION} and kind {KIND}"));
    }
    let request = &review["request"];
    let Some(account) = request["session"]["account"].as_str() else {
        return Err("request.session.account is missing".into());
    };
    if request["uid"].as_str().is_none() {
        return Err("request.uid is missing".into());
    }
    let deny = |reason: &str| Answer {
        allowed: false,
        reason: Some(reason.into()),
        message: Some(rules.message.clone()),
    };
    if rules.deny_accounts.iter().any(|a| a == account) {
        return Ok(deny("account_denied"));
    }
    let headers = &request["client"]["headers"];
    if rules
        .deny_headers
        .iter()
        .any(|(name, value)| headers[name.as_str()].as_str() == Some(value.as_str()))
    {
        return Ok(deny("header_denied"));
    }
    Ok(Answer {
        allowed: true,
        reason: None,
        message: None,
    })
}

struct Server {
    rules: Rules,
    delay: Duration,
    fail_fraction: f64,
}

async fn review(State(server): State<Arc<Server>>, body: axum::body::Bytes) -> Response {
    let review: Value = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({"error": format!("not JSON: {e}")})),
            )
                .into_response();
        }
    };
    if !server.delay.is_zero() {
        tokio::time::sleep(server.delay).await;
    }
    if server.fail_fraction > 0.0 && rand::random::<f64>() < server.fail_fraction {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"error": "failing on purpose (--fail-fraction)"})),
        )
            .into_response();
    }
    match decide(&review, &server.rules) {
        Ok(answer) => Json(answer).into_response(),
        Err(problem) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": problem})),
        )
            .into_response(),
    }
}

/// Serves SessionReviews on `--listen` until interrupted. Prints the address it listens on.
pub async fn run(args: &ValidatorArgs) -> anyhow::Result<()> {
    let rules = Rules {
        deny_accounts: args.deny_account.clone(),
        deny_headers: args
            .deny_header
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
            .collect(),
        message: args.message.clone(),
    };
    let server = Arc::new(Server {
        rules,
        delay: args.delay,
        fail_fraction: args.fail_fraction,
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
    let address: SocketAddr = listener.local_addr()?;
    println!("streamctl validator listening on http://{address}");
    let app = axum::Router::new()
        .fallback(axum::routing::post(review))
        .with_state(server);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review(account: &str, headers: Value) -> Value {
        json!({
            "apiVersion": API_VERSION, "kind": KIND,
            "request": {"uid": "0123", "validator": "v", "revalidation": false,
                "session": {"sessionId": "0123", "account": account, "streamId": "tv", "createdAt": "2030-01-01T00:00:00Z"},
                "client": {"headers": headers}}
        })
    }

    fn rules() -> Rules {
        Rules {
            deny_accounts: vec!["blocked".into()],
            deny_headers: vec![("x-viewer-country".into(), "XX".into())],
            message: "not in your plan".into(),
        }
    }

    #[test]
    fn denies_listed_accounts_and_headers_and_allows_the_rest() {
        let denied = decide(&review("blocked", json!({})), &rules()).unwrap();
        assert_eq!(
            (
                denied.allowed,
                denied.reason.as_deref(),
                denied.message.as_deref()
            ),
            (false, Some("account_denied"), Some("not in your plan"))
        );
        let denied = decide(&review("fan", json!({"x-viewer-country": "XX"})), &rules()).unwrap();
        assert_eq!(denied.reason.as_deref(), Some("header_denied"));
        let allowed = decide(&review("fan", json!({"x-viewer-country": "CH"})), &rules()).unwrap();
        assert!(allowed.allowed);
        // Idempotent: the same review gets the same answer.
        assert_eq!(
            decide(&review("blocked", json!({})), &rules()),
            decide(&review("blocked", json!({})), &rules())
        );
    }

    #[test]
    fn refuses_what_is_not_a_session_review() {
        assert!(decide(&json!({"kind": "AdmissionReview"}), &rules()).is_err());
        let mut no_account = review("x", json!({}));
        no_account["request"]["session"]
            .as_object_mut()
            .unwrap()
            .remove("account");
        assert!(
            decide(&no_account, &rules())
                .unwrap_err()
                .contains("account")
        );
    }
}
