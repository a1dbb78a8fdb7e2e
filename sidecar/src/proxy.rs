//! The enforcing proxy: media requests reach the streaming container only with an active
//! session, and a response in flight is closed as soon as its session is cut.
//!
//! A request names its session with the `X-StreamGate-Session` header or, for players that
//! cannot set headers, a `session` query parameter. Each response body is registered under its
//! session; revocation notices (this sidecar's own and, on a shared store, every other sidecar's)
//! cancel the registered bodies, which ends them with an error so the connection is dropped
//! rather than finished cleanly. Expiry is noticed by re-checking the session when its last known
//! expiry time passes.
//!
//! Whether a request may pass is the engine's decision ([`Engine::authorize_media`]), so the
//! policy's failurePolicy and DryRun apply to media exactly as to the session API, and each
//! media request doubles as a heartbeat when the session's last renewal is half a heartbeat
//! interval old (players that cannot heartbeat keep their session by playing).
//!
//! Hygiene on the way through: the path is refused if it has dot segments (raw or
//! percent-encoded), so nothing can climb out of the upstream's base path; hop-by-hop headers
//! (the fixed list, every header named in `Connection`, and `Proxy-Connection`) are dropped in
//! both directions (RFC 9110 section 7.6.1); the peer is appended to `X-Forwarded-For` and
//! `Forwarded`.

use std::collections::HashMap;
use std::future::Future as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use std::net::SocketAddr;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::engine::{Engine, MediaAccess, fingerprint};
use crate::error::{ApiError, ErrorCode};
use crate::policy::Mode;
use crate::session::{EndReason, SessionId, SessionRecord, SessionState};

/// Header carrying the session id of a media request.
pub const SESSION_HEADER: &str = "x-streamgate-session";
/// Query parameter carrying the session id, for players that cannot set headers.
pub const SESSION_PARAM: &str = "session";
/// Shortest wait between two checks of a session's expiry, so a skewed clock cannot spin.
const MIN_RECHECK: Duration = Duration::from_millis(250);

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1): never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Forwards media requests to the upstream and cuts them when their session is cut.
pub struct Proxy {
    engine: Engine,
    upstream: reqwest::Url,
    client: reqwest::Client,
    streams: Mutex<HashMap<SessionId, Vec<(u64, CancellationToken)>>>,
    next_stream: AtomicU64,
}

impl Proxy {
    /// A proxy in front of `upstream`. It cuts streams on revocation only while its owner runs
    /// [`Proxy::follow_revocations`].
    pub fn new(engine: Engine, upstream: reqwest::Url) -> Arc<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Bodies are streamed as they come: no overall timeout on a live stream.
            .build()
            .expect("an HTTP client with default TLS settings builds");
        Arc::new(Self {
            engine,
            upstream,
            client,
            streams: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(0),
        })
    }

    /// Cuts the streams of sessions the store reports revoked, until `shutdown`.
    pub async fn follow_revocations(self: Arc<Self>, shutdown: CancellationToken) {
        let mut notices = self.engine.revocations();
        loop {
            let notice = tokio::select! {
                () = shutdown.cancelled() => return,
                notice = notices.recv() => notice,
            };
            match notice {
                Ok(notice) => self.cut(&notice.session),
                Err(RecvError::Lagged(missed)) => {
                    // Missed notices are caught by the expiry re-check and the next request's check.
                    tracing::warn!(missed, "revocation notices missed");
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    /// Closes every response in flight because the sidecar is shutting down: counted with
    /// reason `shutdown`, and no session is cut or announced (the viewer keeps its slot and
    /// reconnects through another sidecar). Returns how many were closed.
    pub fn close_for_shutdown(&self) -> usize {
        let tokens: Vec<CancellationToken> = self
            .lock()
            .drain()
            .flat_map(|(_, streams)| streams.into_iter().map(|(_, token)| token))
            .collect();
        for token in &tokens {
            token.cancel();
        }
        self.engine
            .metrics()
            .count_streams_closed_by_shutdown(tokens.len());
        tokens.len()
    }

    /// Responses in flight, for metrics and tests.
    pub fn streams_in_flight(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Vec<(u64, CancellationToken)>>> {
        // Only map operations happen under this lock: a poisoned lock is still consistent.
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(self: &Arc<Self>, id: SessionId) -> (CancellationToken, Registration) {
        let token = CancellationToken::new();
        let key = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .entry(id)
            .or_default()
            .push((key, token.clone()));
        let registration = Registration {
            proxy: Arc::downgrade(self),
            id,
            key,
            done: CancellationToken::new(),
        };
        (token, registration)
    }

    /// Cuts every response in flight for `session`, unless its account's policy is DryRun.
    fn cut(&self, session: &SessionRecord) {
        let tokens: Vec<CancellationToken> = self
            .lock()
            .get(&session.id)
            .map(|v| v.iter().map(|(_, t)| t.clone()).collect())
            .unwrap_or_default();
        if tokens.is_empty() {
            return;
        }
        let reason = session.reason.unwrap_or(EndReason::Expired);
        let dry_run = self.mode_for(&session.account) == Mode::DryRun;
        self.engine
            .metrics()
            .count_stream_cut(reason, dry_run, tokens.len());
        let (session_print, account_print) = (
            fingerprint(&session.id.to_string()),
            fingerprint(&session.account),
        );
        if dry_run {
            tracing::info!(session = %session_print, account = %account_print,
                reason = reason.as_str(), streams = tokens.len(), "dry run: would cut streams");
            return;
        }
        tracing::info!(session = %session_print, account = %account_print,
            reason = reason.as_str(), streams = tokens.len(), "cutting streams");
        for token in tokens {
            token.cancel();
        }
    }

    fn mode_for(&self, account: &str) -> Mode {
        self.engine.mode_for(account)
    }

    /// The upstream URL for `uri`, or an error for a path with dot segments.
    fn upstream_url(&self, uri: &Uri) -> Result<reqwest::Url, ApiError> {
        if has_dot_segment(uri.path()) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                "the path must not contain `.` or `..` segments (raw or percent-encoded)",
            ));
        }
        let mut url = self.upstream.clone();
        let base = self.upstream.path().trim_end_matches('/');
        url.set_path(&format!("{base}{}", uri.path()));
        // The session id is ours: it does not go upstream.
        let query: Vec<(String, String)> =
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .filter(|(k, _)| k != SESSION_PARAM)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        if query.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(query);
        }
        Ok(url)
    }
}

/// True if a segment of `path` is `.` or `..`, written raw or percent-encoded (`%2e`, `%2E`),
/// or if the path hides a separator (`%2f`, `%5c`, `\`) that would let a later decoder make one.
fn has_dot_segment(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains('\\') {
        return true;
    }
    lower
        .split('/')
        .map(|segment| segment.replace("%2e", "."))
        .any(|segment| segment == "." || segment == "..")
}

/// Removes a response from the registry when its body is dropped (finished, cut, or the viewer
/// went away), and stops its expiry watch.
struct Registration {
    proxy: std::sync::Weak<Proxy>,
    id: SessionId,
    key: u64,
    done: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.done.cancel();
        if let Some(proxy) = self.proxy.upgrade() {
            let mut streams = proxy.lock();
            if let Some(list) = streams.get_mut(&self.id) {
                list.retain(|(key, _)| *key != self.key);
                if list.is_empty() {
                    streams.remove(&self.id);
                }
            }
        }
    }
}

/// Re-checks the session whenever its last known expiry passes; cuts the stream if it is no
/// longer active. Ends when the response does (it is spawned per response and lives no longer).
async fn watch_expiry(
    proxy: Arc<Proxy>,
    id: SessionId,
    session: Option<SessionRecord>,
    token: CancellationToken,
    done: CancellationToken,
) {
    // Unknown (admitted unverified during an outage): look again shortly.
    let mut expires_at_ms = session.as_ref().map_or_else(
        || chrono::Utc::now().timestamp_millis() + 1000,
        |s| s.expires_at_ms,
    );
    loop {
        let now = chrono::Utc::now().timestamp_millis();
        let wait =
            Duration::from_millis(expires_at_ms.saturating_sub(now).max(0) as u64).max(MIN_RECHECK);
        tokio::select! {
            () = done.cancelled() => return,
            () = token.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        match proxy.engine.session_now(id).await {
            Ok(Some(current)) if current.state == SessionState::Active => {
                expires_at_ms = current.expires_at_ms;
            }
            Ok(Some(gone)) => {
                proxy.cut(&gone);
                return;
            }
            Ok(None) => {
                // Gone without a trace: it expired and was forgotten.
                if let Some(mut gone) = session.clone() {
                    gone.state = SessionState::Expired;
                    gone.reason = Some(EndReason::Expired);
                    proxy.cut(&gone);
                }
                return;
            }
            // Store trouble: never cut for our own failure; look again shortly.
            Err(_) => {
                expires_at_ms = chrono::Utc::now().timestamp_millis() + 1000;
            }
        }
    }
}

/// A response body that ends with an error when its token is cancelled, so the connection is
/// dropped mid-stream and the player sees the stream cut, not a clean end.
struct Cuttable<S> {
    inner: S,
    cut: std::pin::Pin<Box<WaitForCancellationFutureOwned>>,
    _registration: Registration,
    finished: bool,
}

impl<S> Stream for Cuttable<S>
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Unpin,
{
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if self.cut.as_mut().poll(cx).is_ready() {
            self.finished = true;
            return Poll::Ready(Some(Err(std::io::Error::other("session cut"))));
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(bytes))) => Poll::Ready(Some(Ok(bytes))),
            Poll::Ready(Some(Err(e))) => {
                self.finished = true;
                Poll::Ready(Some(Err(std::io::Error::other(e))))
            }
            Poll::Ready(None) => {
                self.finished = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn session_id_of(request: &Request) -> Result<SessionId, ApiError> {
    let from_header = request
        .headers()
        .get(SESSION_HEADER)
        .map(|v| v.to_str().unwrap_or_default().to_string());
    let from_query = || {
        form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
            .find(|(k, _)| k == SESSION_PARAM)
            .map(|(_, v)| v.into_owned())
    };
    let Some(raw) = from_header.or_else(from_query) else {
        return Err(ApiError::forbidden(
            ErrorCode::InvalidRequest,
            format!(
                "media requests need a session: send the X-StreamGate-Session header or the `{SESSION_PARAM}` query parameter"
            ),
        ));
    };
    raw.parse()
        .map_err(|()| ApiError::forbidden(ErrorCode::NotFound, "no such session".to_string()))
}

/// Handles every request that is not part of the session API.
pub async fn forward(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    match forward_checked(&proxy, request).await {
        Ok(response) => response,
        Err(error) => {
            proxy.engine.metrics().count_proxy_refusal();
            error.into_response()
        }
    }
}

async fn forward_checked(proxy: &Arc<Proxy>, request: Request) -> Result<Response, ApiError> {
    let id = session_id_of(&request)?;
    let url = proxy.upstream_url(request.uri())?;
    let session = match proxy.engine.authorize_media(id).await? {
        MediaAccess::Allowed { session, .. } => session,
        MediaAccess::AllowedDryRun(record) => Some(record),
        MediaAccess::Gone(view) => return Err(ApiError::forbidden_gone(view)),
        MediaAccess::NotFound => {
            return Err(ApiError::forbidden(
                ErrorCode::NotFound,
                "no such session; open one with PUT /streaming",
            ));
        }
    };

    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    let (parts, body) = request.into_parts();
    let mut headers = forwarded_headers(&parts.headers);
    headers.remove(HeaderName::from_static(SESSION_HEADER));
    if let Some(peer) = peer {
        append_forwarded_for(&mut headers, peer);
    }
    let upstream = proxy
        .client
        .request(parts.method.clone(), url)
        .headers(headers)
        .body(reqwest::Body::wrap_stream(body.into_data_stream()))
        .send()
        .await
        .map_err(|e| {
            let refused = e.is_connect();
            tracing::warn!(error = %e.without_url(), "upstream request failed");
            if refused {
                // Not listening (starting, restarting, draining): come back shortly (503 with
                // Retry-After), unlike an upstream that broke mid-answer (502).
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::UpstreamUnavailable,
                    "the streaming container is not accepting connections; retry shortly",
                )
            } else {
                ApiError::bad_gateway("the streaming container did not answer")
            }
        })?;

    let (token, registration) = proxy.register(id);
    tokio::spawn(watch_expiry(
        proxy.clone(),
        id,
        session,
        token.clone(),
        registration.done.clone(),
    ));
    let status =
        StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let response_headers = forwarded_headers(upstream.headers());
    let body = Cuttable {
        inner: upstream.bytes_stream().boxed(),
        cut: Box::pin(token.cancelled_owned()),
        _registration: registration,
        finished: false,
    };
    proxy.engine.metrics().count_proxied();
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = status;
    *response.headers_mut() = response_headers;
    Ok(response)
}

/// `headers` without hop-by-hop headers: the fixed list, `Proxy-Connection`, and every header
/// that `Connection` names (RFC 9110 section 7.6.1), and without `Host`.
fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named {
        out.remove(name.as_str());
    }
    for name in HOP_BY_HOP {
        out.remove(name);
    }
    out.remove("proxy-connection");
    out.remove(header::HOST);
    out
}

/// Appends the peer to `X-Forwarded-For` and `Forwarded` (RFC 7239), keeping what earlier
/// proxies wrote: the client's own claims stay visible as claims, the last hop is ours.
fn append_forwarded_for(headers: &mut HeaderMap, peer: std::net::IpAddr) {
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => format!("{existing}, {peer}"),
        _ => peer.to_string(),
    };
    let node = match peer {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let forwarded = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => format!("{existing}, for={node}"),
        _ => format!("for={node}"),
    };
    if let Ok(value) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", value);
    }
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.insert(header::FORWARDED, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_found_raw_and_encoded() {
        for path in [
            "/../secret",
            "/a/../../b",
            "/%2e%2e/secret",
            "/%2E%2e/x",
            "/.%2e/x",
            "/./x",
            "/a/%2e",
            "/a%2f..%2fb",
            "/a\\..\\b",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in [
            "/hls/index.m3u8",
            "/a..b/c",
            "/.well-known/x",
            "/...",
            "/a.%2e.b",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("X-Secret, keep-alive"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-normal", HeaderValue::from_static("1"));
        let out = forwarded_headers(&headers);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out.contains_key("x-normal"));
    }
}
