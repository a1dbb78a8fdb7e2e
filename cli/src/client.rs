//! A small client of the StreamGate session API, with its JSON types.
//!
//! The types mirror the sidecar's wire format rather than importing the sidecar crate, so that
//! streamctl stays a plain HTTP client that also works against other versions of the sidecar.

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize};

/// A session as the API returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// Hex digits, 128 bits or more.
    pub session_id: String,
    /// The account.
    pub account: String,
    /// The player's stream id.
    pub stream_id: String,
    /// `active`, `revoked` or `expired`.
    pub state: String,
    /// Why the session ended, when it is not active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the session was admitted (RFC 3339).
    pub created_at: String,
    /// When it expires without a heartbeat, or when it ended (RFC 3339).
    pub expires_at: String,
    /// How often the player should heartbeat.
    pub heartbeat_interval_seconds: u32,
    /// The account's limit.
    pub limit: u32,
    /// The account's active sessions.
    pub active_sessions: u32,
}

/// An error body: `error` and `message`, plus the fields that apply to the code.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Machine-readable code, e.g. `limit_exceeded` or `session_gone`.
    pub error: String,
    /// Human-readable explanation.
    #[serde(default)]
    pub message: String,
    /// The account's limit (`limit_exceeded`).
    #[serde(default)]
    pub limit: Option<u32>,
    /// The account's active session count (`limit_exceeded`).
    #[serde(default)]
    pub active: Option<u32>,
    /// The account's active streams (`limit_exceeded`): stream ids and times, no session ids.
    #[serde(default)]
    pub sessions: Option<Vec<serde_json::Value>>,
    /// Why the session was cut (`session_gone`).
    #[serde(default)]
    pub reason: Option<String>,
}

/// The answer to `GET /v1/accounts/{account}/sessions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountSessions {
    /// The account.
    pub account: String,
    /// Its limit.
    pub limit: u32,
    /// Its active sessions, oldest first.
    pub sessions: Vec<Session>,
}

/// A failure to get an HTTP answer, or an answer that is not the API's.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request never got a response.
    #[error("{request}: {cause}")]
    Transport {
        /// Method and URL of the request.
        request: String,
        /// The innermost cause, e.g. `Connection refused (os error 111)`.
        cause: String,
        /// The kind of failure, for counting.
        kind: TransportKind,
    },
    /// The response does not have the documented shape.
    #[error("{request}: unexpected response {status}: {detail}")]
    Unexpected {
        /// Method and URL of the request.
        request: String,
        /// Response status.
        status: StatusCode,
        /// What was wrong, with the start of the body.
        detail: String,
    },
}

/// Coarse kinds of transport failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TransportKind {
    /// No connection could be made.
    Connect,
    /// The request timed out.
    Timeout,
    /// Anything else (connection reset, bad HTTP, ...).
    Other,
}

impl TransportKind {
    /// Name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Connect => "connect",
            TransportKind::Timeout => "timeout",
            TransportKind::Other => "other",
        }
    }

    /// Classifies a reqwest error.
    pub fn of(error: &reqwest::Error) -> Self {
        if error.is_timeout() {
            TransportKind::Timeout
        } else if error.is_connect() {
            TransportKind::Connect
        } else {
            TransportKind::Other
        }
    }
}

/// The innermost message of an error chain: reqwest's outer layers only repeat the URL.
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

/// A response: its status and body.
#[derive(Clone, Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Result of opening a stream.
#[derive(Clone, Debug)]
pub enum Opened {
    /// 201 (new) or 200 (already active, renewed).
    Admitted {
        /// The session.
        session: Session,
        /// True for 201.
        created: bool,
    },
    /// 429 `limit_exceeded`, or 503 `store_unavailable` under failurePolicy Closed.
    Refused(ErrorBody),
}

/// Result of a heartbeat.
#[derive(Clone, Debug)]
pub enum Beat {
    /// 200: renewed.
    Renewed(Session),
    /// 410: the session was cut; `reason` says why.
    Gone(ErrorBody),
    /// 404: the sidecar does not know the session (any more).
    NotFound,
}

/// Result of kicking a session.
#[derive(Clone, Debug)]
pub enum Kick {
    /// 204: revoked.
    Kicked,
    /// 410: it had already been cut.
    AlreadyGone(ErrorBody),
    /// 404: no such session.
    NotFound,
}

/// A client of one endpoint.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
}

impl Client {
    /// A client of the API at `base`, with a per-request `timeout` and up to `pool` idle
    /// connections kept for reuse.
    pub fn new(base: &Url, timeout: Duration, pool: usize) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(pool)
            .tcp_nodelay(true)
            .user_agent(concat!("streamctl/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut base = base.clone();
        // Url::join replaces the last path segment unless the path ends with a slash.
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        Ok(Self { http, base })
    }

    /// The base URL, with a trailing slash.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// `/streaming?account=A&streamId=S`, percent-encoded.
    pub fn streaming_url(&self, account: &str, stream_id: &str) -> Url {
        let mut url = self.base.join("streaming").expect("a relative path joins");
        url.query_pairs_mut()
            .append_pair("account", account)
            .append_pair("streamId", stream_id);
        url
    }

    fn path_url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("http URLs have paths")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// Sends one request and reads the whole body (so the connection can be reused).
    pub async fn send(&self, method: Method, url: Url) -> Result<Reply, ClientError> {
        let transport = |e: reqwest::Error, method: &Method, url: &Url| ClientError::Transport {
            request: format!("{method} {url}"),
            cause: root_cause(&e),
            kind: TransportKind::of(&e),
        };
        let response = self
            .http
            .request(method.clone(), url.clone())
            .send()
            .await
            .map_err(|e| transport(e, &method, &url))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| transport(e, &method, &url))?;
        Ok(Reply {
            status,
            body: body.to_vec(),
        })
    }

    /// Checks that something answers HTTP at the endpoint (any status will do).
    pub async fn probe(&self) -> Result<(), ClientError> {
        let url = self.base.join("healthz").expect("a relative path joins");
        self.send(Method::GET, url).await.map(|_| ())
    }

    /// `PUT /streaming`: open or renew.
    pub async fn open(&self, account: &str, stream_id: &str) -> Result<Opened, ClientError> {
        let url = self.streaming_url(account, stream_id);
        let reply = self.send(Method::PUT, url.clone()).await?;
        match reply.status {
            StatusCode::CREATED | StatusCode::OK => Ok(Opened::Admitted {
                session: decode(&Method::PUT, &url, &reply)?,
                created: reply.status == StatusCode::CREATED,
            }),
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                Ok(Opened::Refused(decode(&Method::PUT, &url, &reply)?))
            }
            _ => Err(unexpected(&Method::PUT, &url, &reply)),
        }
    }

    /// `GET /streaming`: heartbeat.
    pub async fn heartbeat(&self, account: &str, stream_id: &str) -> Result<Beat, ClientError> {
        let url = self.streaming_url(account, stream_id);
        let reply = self.send(Method::GET, url.clone()).await?;
        match reply.status {
            StatusCode::OK => Ok(Beat::Renewed(decode(&Method::GET, &url, &reply)?)),
            StatusCode::GONE => Ok(Beat::Gone(decode(&Method::GET, &url, &reply)?)),
            StatusCode::NOT_FOUND => Ok(Beat::NotFound),
            _ => Err(unexpected(&Method::GET, &url, &reply)),
        }
    }

    /// `DELETE /streaming`: end. True when a session was ended, false when there was none.
    pub async fn end(&self, account: &str, stream_id: &str) -> Result<bool, ClientError> {
        let url = self.streaming_url(account, stream_id);
        let reply = self.send(Method::DELETE, url.clone()).await?;
        match reply.status {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(unexpected(&Method::DELETE, &url, &reply)),
        }
    }

    /// `GET /v1/accounts/{account}/sessions`.
    pub async fn sessions(&self, account: &str) -> Result<AccountSessions, ClientError> {
        let url = self.path_url(&["v1", "accounts", account, "sessions"]);
        let reply = self.send(Method::GET, url.clone()).await?;
        match reply.status {
            StatusCode::OK => decode(&Method::GET, &url, &reply),
            _ => Err(unexpected(&Method::GET, &url, &reply)),
        }
    }

    /// `DELETE /v1/sessions/{sessionId}`.
    pub async fn kick(&self, session_id: &str) -> Result<Kick, ClientError> {
        let url = self.path_url(&["v1", "sessions", session_id]);
        let reply = self.send(Method::DELETE, url.clone()).await?;
        match reply.status {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(Kick::Kicked),
            StatusCode::GONE => Ok(Kick::AlreadyGone(decode(&Method::DELETE, &url, &reply)?)),
            StatusCode::NOT_FOUND => Ok(Kick::NotFound),
            _ => Err(unexpected(&Method::DELETE, &url, &reply)),
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    method: &Method,
    url: &Url,
    reply: &Reply,
) -> Result<T, ClientError> {
    serde_json::from_slice(&reply.body).map_err(|e| ClientError::Unexpected {
        request: format!("{method} {url}"),
        status: reply.status,
        detail: format!("{e}; body: {}", body_excerpt(&reply.body)),
    })
}

/// A status the API does not document for this call; the error body's message when it has one.
fn unexpected(method: &Method, url: &Url, reply: &Reply) -> ClientError {
    let detail = match serde_json::from_slice::<ErrorBody>(&reply.body) {
        Ok(body) => format!("{}: {}", body.error, body.message),
        Err(_) => body_excerpt(&reply.body),
    };
    ClientError::Unexpected {
        request: format!("{method} {url}"),
        status: reply.status,
        detail,
    }
}

fn body_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut excerpt: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        excerpt.push('…');
    }
    excerpt
}

impl ClientError {
    /// The transport kind, when the request got no response.
    pub fn transport_kind(&self) -> Option<TransportKind> {
        match self {
            ClientError::Transport { kind, .. } => Some(*kind),
            ClientError::Unexpected { .. } => None,
        }
    }

    /// A one-line description without the URL, for per-viewer reports.
    pub fn short(&self) -> String {
        match self {
            ClientError::Transport { cause, .. } => cause.clone(),
            ClientError::Unexpected { status, detail, .. } => format!("{status}: {detail}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str) -> Client {
        Client::new(&Url::parse(base).unwrap(), Duration::from_secs(1), 1).unwrap()
    }

    #[test]
    fn streaming_url_encodes_the_query() {
        let c = client("http://127.0.0.1:8080");
        assert_eq!(
            c.streaming_url("a&b", "s 1").as_str(),
            "http://127.0.0.1:8080/streaming?account=a%26b&streamId=s+1"
        );
    }

    #[test]
    fn base_path_prefix_is_kept() {
        let c = client("http://host/gate");
        assert_eq!(
            c.streaming_url("1", "2").as_str(),
            "http://host/gate/streaming?account=1&streamId=2"
        );
        assert_eq!(
            c.path_url(&["v1", "accounts", "a/b", "sessions"]).as_str(),
            "http://host/gate/v1/accounts/a%2Fb/sessions"
        );
    }

    #[test]
    fn error_body_tolerates_missing_fields() {
        let body: ErrorBody =
            serde_json::from_str(r#"{"error":"session_gone","message":"cut","reason":"evicted"}"#)
                .unwrap();
        assert_eq!(body.reason.as_deref(), Some("evicted"));
        assert_eq!(body.limit, None);
    }
}
