//! The enforcing proxy: media requests reach the streaming container only with an active
//! session, and a response in flight is closed as soon as its session is cut.
//!
//! A request names its session with the `X-StreamGate-Session` header or, for players that
//! cannot set headers, a `session` query parameter. Each response body is registered under its
//! session; revocation notices (this sidecar's own and, on a shared store, every other sidecar's)
//! cancel the registered bodies, which ends them with an error so the connection is dropped
//! rather than finished cleanly. Expiry is noticed by re-checking the session when its last known
//! expiry time passes.

use std::collections::HashMap;
use std::future::Future as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::api::{ApiError, ErrorCode};
use crate::engine::Engine;
use crate::policy::Mode;
use crate::session::{EndReason, Session, SessionId, SessionRecord, SessionState};

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
    /// A proxy in front of `upstream`. Inside a Tokio runtime it starts following the store's
    /// revocation notices.
    pub fn new(engine: Engine, upstream: reqwest::Url) -> Arc<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Bodies are streamed as they come: no overall timeout on a live stream.
            .build()
            .expect("an HTTP client with default TLS settings builds");
        let proxy = Arc::new(Self {
            engine,
            upstream,
            client,
            streams: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(0),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(follow_revocations(Arc::downgrade(&proxy)));
        }
        proxy
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
        if dry_run {
            tracing::info!(session = %session.id, account = %session.account, reason = reason.as_str(),
                streams = tokens.len(), "dry run: would cut streams");
            return;
        }
        tracing::info!(session = %session.id, account = %session.account, reason = reason.as_str(),
            streams = tokens.len(), "cutting streams");
        for token in tokens {
            token.cancel();
        }
    }

    fn mode_for(&self, account: &str) -> Mode {
        self.engine.policies().load().resolve(account).mode
    }

    fn upstream_url(&self, uri: &Uri) -> reqwest::Url {
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
        url
    }
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

async fn follow_revocations(proxy: std::sync::Weak<Proxy>) {
    let Some(mut notices) = proxy.upgrade().map(|p| p.engine.store().revocations()) else {
        return;
    };
    loop {
        match notices.recv().await {
            Ok(notice) => {
                let Some(proxy) = proxy.upgrade() else {
                    return;
                };
                proxy.cut(&notice.session);
            }
            Err(RecvError::Lagged(missed)) => {
                // Missed notices are caught by the expiry re-check and the next request's check.
                tracing::warn!(missed, "revocation notices missed");
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Re-checks the session whenever its last known expiry passes; cuts the stream if it is no
/// longer active. Ends when the response does.
async fn watch_expiry(
    proxy: Arc<Proxy>,
    mut session: SessionRecord,
    token: CancellationToken,
    done: CancellationToken,
) {
    loop {
        let now = chrono::Utc::now().timestamp_millis();
        let wait = Duration::from_millis(session.expires_at_ms.saturating_sub(now).max(0) as u64)
            .max(MIN_RECHECK);
        tokio::select! {
            () = done.cancelled() => return,
            () = token.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        match proxy.engine.store().get(session.id).await {
            Ok(Some(current)) if current.state == SessionState::Active => session = current,
            Ok(Some(gone)) => {
                proxy.cut(&gone);
                return;
            }
            Ok(None) => {
                let mut gone = session.clone();
                gone.state = SessionState::Expired;
                gone.reason = Some(EndReason::Expired);
                proxy.cut(&gone);
                return;
            }
            // Store outage: never cut for our own failure; look again shortly.
            Err(error) => {
                tracing::debug!(%error, "cannot re-check a streaming session");
                session.expires_at_ms = chrono::Utc::now().timestamp_millis() + 1000;
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

fn forbidden_gone(session: &SessionRecord, view: Session) -> ApiError {
    let reason = session.reason.unwrap_or(EndReason::Expired);
    ApiError::forbidden_gone(
        format!(
            "session {} was cut ({}); open a new session to keep watching",
            session.id,
            reason.as_str()
        ),
        view,
    )
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
    let record = proxy
        .engine
        .store()
        .get(id)
        .await
        .map_err(|e| ApiError::from(crate::engine::Unavailable(e)))?
        .ok_or_else(|| ApiError::forbidden(ErrorCode::NotFound, format!("no session {id}")))?;
    if record.state != SessionState::Active {
        let policy = proxy
            .engine
            .policies()
            .load()
            .resolve(&record.account)
            .clone();
        if policy.mode != Mode::DryRun {
            let view = Session::view(&record, policy.limit, policy.heartbeat_interval_seconds, 0);
            return Err(forbidden_gone(&record, view));
        }
        proxy.engine.metrics().count_stream_cut(
            record.reason.unwrap_or(EndReason::Expired),
            true,
            1,
        );
    }

    let (parts, body) = request.into_parts();
    let mut headers = forwarded_headers(&parts.headers);
    headers.remove(HeaderName::from_static(SESSION_HEADER));
    let upstream = proxy
        .client
        .request(parts.method.clone(), proxy.upstream_url(&parts.uri))
        .headers(headers)
        .body(reqwest::Body::wrap_stream(body.into_data_stream()))
        .send()
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "upstream request failed");
            ApiError::bad_gateway(format!("the streaming container did not answer: {e}"))
        })?;

    let (token, registration) = proxy.register(id);
    tokio::spawn(watch_expiry(
        proxy.clone(),
        record,
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

fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for name in HOP_BY_HOP {
        out.remove(name);
    }
    out.remove(header::HOST);
    out
}
