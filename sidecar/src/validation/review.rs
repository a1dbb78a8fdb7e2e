//! The SessionReview protocol: what a sidecar POSTs to a validator, and the request facts it
//! carries.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `apiVersion` of a SessionReview.
pub const REVIEW_API_VERSION: &str = "streamgate.dev/v1alpha1";
/// `kind` of a SessionReview.
pub const REVIEW_KIND: &str = "SessionReview";
/// The header carrying the idempotency key (the session id) of a review call.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// Request headers a review carries (besides `User-Agent`, which has its own field). Never
/// credentials: `Authorization` and `Cookie` are not forwarded.
pub const REVIEWED_HEADERS: &[&str] = &[
    "accept-language",
    "origin",
    "referer",
    "x-forwarded-for",
    "x-real-ip",
];
/// Headers starting with this prefix are forwarded too: the player's own facts for validators
/// (device id, app version...).
pub const REVIEWED_HEADER_PREFIX: &str = "x-viewer-";
/// Most headers one review carries.
pub const MAX_REVIEWED_HEADERS: usize = 16;
/// Longest header value (or user agent) a review carries; longer ones are left out.
pub const MAX_REVIEWED_VALUE: usize = 512;

/// Where the admitting request came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientFacts {
    /// The peer's IP address as the sidecar saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// `User-Agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// Selected request headers, names in lowercase.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// What the admitting request told about the viewer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestFacts {
    /// The client.
    pub client: ClientFacts,
    /// The verified token's claims, when viewers are authenticated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub claims: Option<serde_json::Map<String, serde_json::Value>>,
}

impl RequestFacts {
    /// The facts of a request: its peer address, user agent and selected headers. `claims`
    /// are the verified token's, when there is one.
    pub fn from_request(
        peer: Option<std::net::SocketAddr>,
        headers: &HeaderMap,
        claims: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Self {
        let text = |value: &axum::http::HeaderValue| {
            value
                .to_str()
                .ok()
                .filter(|v| v.len() <= MAX_REVIEWED_VALUE)
                .map(str::to_string)
        };
        let mut selected = BTreeMap::new();
        for (name, value) in headers {
            let name = name.as_str();
            if selected.len() >= MAX_REVIEWED_HEADERS {
                break;
            }
            if (REVIEWED_HEADERS.contains(&name) || name.starts_with(REVIEWED_HEADER_PREFIX))
                && let Some(value) = text(value)
            {
                selected.entry(name.to_string()).or_insert(value);
            }
        }
        Self {
            client: ClientFacts {
                address: peer.map(|p| p.ip().to_string()),
                user_agent: headers.get(axum::http::header::USER_AGENT).and_then(text),
                headers: selected,
            },
            claims,
        }
    }
}

/// The session under review.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReviewedSession {
    /// The session id.
    pub session_id: String,
    /// The account.
    pub account: String,
    /// The player's stream id.
    pub stream_id: String,
    /// When the session was admitted (RFC 3339).
    pub created_at: String,
}

/// The `request` of a SessionReview.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReviewRequest {
    /// The idempotency key: the session id. A validator may be called more than once for one
    /// session (retries, a takeover after a sidecar died) and must answer alike.
    pub uid: String,
    /// The validator's name in the policy.
    pub validator: String,
    /// False for the check after admission, true for the rechecks of `revalidateSeconds`.
    pub revalidation: bool,
    /// The session.
    pub session: ReviewedSession,
    /// The client and the token claims.
    #[serde(flatten)]
    pub facts: RequestFacts,
}

/// What a sidecar POSTs to a validator. The answer is a [`super::ReviewAnswer`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionReview {
    /// `streamgate.dev/v1alpha1`.
    pub api_version: String,
    /// `SessionReview`.
    pub kind: String,
    /// The request.
    pub request: ReviewRequest,
}

impl SessionReview {
    /// A review of `request`.
    pub fn new(request: ReviewRequest) -> Self {
        Self {
            api_version: REVIEW_API_VERSION.into(),
            kind: REVIEW_KIND.into(),
            request,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_carry_selected_headers_and_never_credentials() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("user-agent", "Player/1.0"),
            ("authorization", "Bearer secret"),
            ("cookie", "sid=secret"),
            ("accept-language", "fr-CH"),
            ("x-viewer-device", "tv-42"),
            ("x-other", "no"),
        ] {
            headers.insert(
                axum::http::HeaderName::from_static(name),
                value.parse().unwrap(),
            );
        }
        headers.insert("x-viewer-huge", "x".repeat(600).parse().unwrap());
        let facts =
            RequestFacts::from_request(Some("10.1.2.3:4444".parse().unwrap()), &headers, None);
        assert_eq!(facts.client.address.as_deref(), Some("10.1.2.3"));
        assert_eq!(facts.client.user_agent.as_deref(), Some("Player/1.0"));
        assert_eq!(
            facts.client.headers.keys().collect::<Vec<_>>(),
            ["accept-language", "x-viewer-device"]
        );
        let json = serde_json::to_string(&facts).unwrap();
        assert!(!json.contains("secret"), "{json}");
    }
}
