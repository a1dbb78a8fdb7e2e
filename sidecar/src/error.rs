//! The error model of every HTTP answer the sidecar gives: machine-readable codes, the JSON
//! body, and how engine failures map onto them. Shared by the session API and the enforcing
//! proxy, so neither depends on the other.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::engine::EngineError;
use crate::session::{EndReason, Session};

/// Machine-readable error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed; `parameter` names the culprit when there is one.
    InvalidRequest,
    /// The account is at its limit (RejectNew).
    LimitExceeded,
    /// No such session or route.
    NotFound,
    /// The session was cut; `reason` says why.
    SessionGone,
    /// The session store is unreachable.
    StoreUnavailable,
    /// Proxy mode: the streaming container did not answer.
    UpstreamUnavailable,
    /// The sidecar or its store misbehaved (a bug or a misconfigured store); details are logged.
    InternalError,
    /// The embedded store holds as many live sessions as it may (`--max-sessions`).
    CapacityExceeded,
    /// No bearer token where one is required, or the token failed a check (the message names it).
    Unauthenticated,
    /// The `account` parameter is not the token's account.
    AccountMismatch,
    /// No verification key has been loaded: identity cannot be checked, so nothing is admitted.
    AuthUnavailable,
    /// A Blocking session validator refused the session; `message` is the validator's.
    Denied,
    /// Proxy mode: the media request's playback token is missing, malformed, forged, expired,
    /// or from another network; the message says which.
    InvalidToken,
    /// Proxy mode: the session already has its long-lived media responses in flight
    /// (`maxMediaStreamsPerSession`): one session plays one stream.
    StreamInUse,
}

/// One of the account's active streams, as a refusal at the limit lists them: enough to choose
/// which to end, and no session's id or credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActiveStream {
    /// The stream's id, as its player gave it.
    pub stream_id: String,
    /// When it was admitted (RFC 3339).
    pub created_at: String,
    /// When it expires without a heartbeat (RFC 3339).
    pub expires_at: String,
}

impl From<&Session> for ActiveStream {
    fn from(session: &Session) -> Self {
        Self {
            stream_id: session.stream_id.clone(),
            created_at: session.created_at.clone(),
            expires_at: session.expires_at.clone(),
        }
    }
}

/// Error body: `error` and `message` always, the other fields where they apply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Machine-readable code.
    pub error: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
    /// The request parameter at fault (`invalid_request`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    /// The account's limit (`limit_exceeded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The account's active sessions count (`limit_exceeded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<u32>,
    /// The account's active streams, oldest first (`limit_exceeded`); never their session ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<Vec<ActiveStream>>,
    /// Why the session was cut (`session_gone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<EndReason>,
    /// The cut session (`session_gone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Session>,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// JSON body. Boxed: the body is large and most results are Ok.
    pub body: Box<ErrorBody>,
}

impl ApiError {
    /// An error with `status`, `error` and `message` and no other field.
    pub fn new(status: StatusCode, error: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: Box::new(ErrorBody {
                error,
                message: message.into(),
                parameter: None,
                limit: None,
                active: None,
                sessions: None,
                reason: None,
                session: None,
            }),
        }
    }

    /// 400 `invalid_request` naming `parameter`.
    pub fn invalid_parameter(parameter: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            format!("parameter `{parameter}` {}", message.into()),
        );
        e.body.parameter = Some(parameter.to_string());
        e
    }

    /// 403 with `code`: a media request the proxy refuses.
    pub fn forbidden(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// 403 `session_gone`: a media request for a cut session.
    pub fn forbidden_gone(session: Session) -> Self {
        let reason = session.reason.unwrap_or(EndReason::Expired);
        let mut e = Self::new(
            StatusCode::FORBIDDEN,
            ErrorCode::SessionGone,
            format!(
                "the session was cut ({}); open a new session to keep watching",
                reason.as_str()
            ),
        );
        e.body.reason = Some(reason);
        e.body.session = Some(session);
        e
    }

    /// 403 `denied`: a Blocking validator refused the session (now revoked, its slot freed).
    pub fn denied(message: &str, session: Session) -> Self {
        let mut e = Self::new(StatusCode::FORBIDDEN, ErrorCode::Denied, message);
        e.body.reason = Some(EndReason::Denied);
        e.body.session = Some(session);
        e
    }

    /// 502 `upstream_unavailable`.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            ErrorCode::UpstreamUnavailable,
            message,
        )
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }

    /// 405 `invalid_request`.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::InvalidRequest,
            message,
        )
    }

    /// 410 `session_gone` for a cut session. A denied session's message is the validator's.
    pub fn gone(session: Session) -> Self {
        let reason = session.reason.unwrap_or(EndReason::Expired);
        let message = match (&session.validation_message, reason) {
            (Some(message), EndReason::Denied) => format!(
                "the session of stream {:?} was cut (denied): {message}",
                session.stream_id
            ),
            _ => format!(
                "the session of stream {:?} was cut ({}); open a new session to keep watching",
                session.stream_id,
                reason.as_str()
            ),
        };
        let mut e = Self::new(StatusCode::GONE, ErrorCode::SessionGone, message);
        e.body.reason = Some(reason);
        e.body.session = Some(session);
        e
    }
}

impl From<EngineError> for ApiError {
    /// The body never quotes the store's own error text (it may carry script hashes, server
    /// messages or addresses); the engine has logged the detail.
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::Unavailable => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::StoreUnavailable,
                "the session store is unavailable; retry shortly",
            ),
            EngineError::Slow => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::StoreUnavailable,
                "the session store did not answer in time; retry shortly",
            ),
            EngineError::Internal => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::InternalError,
                "internal error; the sidecar has logged the details",
            ),
            EngineError::AtCapacity => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::CapacityExceeded,
                "the sidecar holds as many live sessions as it may; retry later",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut response = (status, Json(*self.body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // Every 503 is "come back shortly": the store, the upstream or the sidecar's capacity.
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
