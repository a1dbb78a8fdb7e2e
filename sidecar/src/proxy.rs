//! The enforcing proxy: media requests reach the streaming container only with an active
//! session, and a response in flight is closed as soon as its session is cut.
//!
//! A request carries a playback token ([`crate::playback`]) in the `X-StreamGate-Token` header
//! or, for players that cannot set headers, the `sg` query parameter. Its signature, expiry and
//! client network are checked before anything else happens; nothing reaches the upstream for a
//! refused token. Unless tokens are required (`--require-playback-token`, or a
//! ViewerAuthentication whose mode is not `Disabled`), the session id itself is accepted too, as
//! in the prototype: the `X-StreamGate-Session` header or the `session` query parameter.
//!
//! One session plays one stream: at most the policy's `maxMediaStreamsPerSession` long-lived
//! responses (no `Content-Length`, or at least [`LONG_LIVED_BYTES`]) are in flight per session;
//! segments, playlists and keys are short and not counted. Every use feeds sharing detection
//! ([`crate::engine::Engine::observe_use`]). HLS playlists are rewritten so that every URI
//! carries a fresh token ([`crate::hls`]); one written into a playlist the player will not
//! fetch again (a master or an ended one) lives for the content
//! ([`crate::playback::playlist_token_lifetime_seconds`]). Every response to a request that
//! carried a token hands back a fresh one ([`TOKEN_HEADER`], [`TOKEN_EXPIRES_HEADER`]): the
//! request renewed the session, so a player that only plays keeps a working token. No token
//! outlives its session: every request asks the store whether the session is active (while the
//! store cannot be asked, a long-lived token passes only for a session found active lately,
//! [`crate::playback::honoured_without_store`]). Each response body is registered under its
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

use crate::engine::{
    Engine, EngineError, MEDIA_STREAM_LEASE, MediaAccess, SessionUse, fingerprint,
};
use crate::error::{ApiError, ErrorCode};
use crate::playback::{self, Claims, TokenError};
use crate::policy::Mode;
use crate::policy::viewer_auth::AuthMode;
use crate::session::{EndReason, SessionId, SessionRecord, SessionState};
use crate::store::media::{StreamClaim, StreamHolder};

/// Header carrying the session id of a media request.
pub const SESSION_HEADER: &str = "x-streamgate-session";
/// Header carrying the playback token of a media request, and, on a response to a request
/// that carried one, a fresh token for the next requests.
pub const TOKEN_HEADER: &str = "x-streamgate-token";
/// Response header: when the fresh token of [`TOKEN_HEADER`] expires (RFC 3339).
pub const TOKEN_EXPIRES_HEADER: &str = "x-streamgate-token-expires-at";
/// Query parameter carrying the playback token.
pub const TOKEN_PARAM: &str = crate::hls::TOKEN_PARAM;
/// A response at least this long (`Content-Length`) counts as long-lived, like one without a
/// length (a live or progressive stream): one session may have only so many in flight.
pub const LONG_LIVED_BYTES: u64 = 16 * 1024 * 1024;
/// Largest playlist the proxy rewrites; a larger one is refused (502), never passed on without
/// tokens.
pub const MAX_PLAYLIST_BYTES: usize = 4 * 1024 * 1024;
/// Query parameter carrying the session id, for players that cannot set headers.
pub const SESSION_PARAM: &str = "session";
/// How often a stream in flight re-checks its session while revocation notices are not heard.
const UNSUBSCRIBED_RECHECK: Duration = Duration::from_secs(1);
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

/// One response in flight.
struct InFlight {
    key: u64,
    token: CancellationToken,
    long_lived: bool,
}

/// Sessions remembered at most as recently found active; beyond, the memory is emptied, which
/// only makes long-lived tokens wait for the store during an outage (fails safe).
const RECENTLY_ACTIVE_CAPACITY: usize = 100_000;

/// Forwards media requests to the upstream and cuts them when their session is cut.
pub struct Proxy {
    engine: Engine,
    upstream: reqwest::Url,
    client: reqwest::Client,
    streams: Mutex<HashMap<SessionId, Vec<InFlight>>>,
    next_stream: AtomicU64,
    /// When this sidecar last let each session's media through (ms): during a store outage a
    /// long-lived playlist token passes only for a session found active lately
    /// ([`playback::honoured_without_store`]).
    recently_active: Mutex<HashMap<SessionId, i64>>,
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
            recently_active: Mutex::new(HashMap::new()),
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
            .flat_map(|(_, streams)| streams.into_iter().map(|s| s.token))
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Vec<InFlight>>> {
        // Only map operations happen under this lock: a poisoned lock is still consistent.
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a response of session `id`. A long-lived one is refused (`Err` with the number
    /// in flight) when the session already has `max_long_lived` long-lived responses: checked
    /// and registered under one lock, so two concurrent requests cannot both pass.
    fn register(
        self: &Arc<Self>,
        id: SessionId,
        long_lived: bool,
        max_long_lived: Option<u32>,
    ) -> Result<(CancellationToken, Registration), usize> {
        let token = CancellationToken::new();
        let key = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let mut streams = self.lock();
        let list = streams.entry(id).or_default();
        if long_lived && let Some(max) = max_long_lived {
            let in_flight = list.iter().filter(|s| s.long_lived).count();
            if in_flight >= max as usize {
                if list.is_empty() {
                    streams.remove(&id);
                }
                return Err(in_flight);
            }
        }
        list.push(InFlight {
            key,
            token: token.clone(),
            long_lived,
        });
        drop(streams);
        let registration = Registration {
            proxy: Arc::downgrade(self),
            id,
            key,
            done: CancellationToken::new(),
        };
        Ok((token, registration))
    }

    fn lock_recently_active(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, i64>> {
        // Only map operations happen under this lock: a poisoned lock is still consistent.
        self.recently_active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Records that session `id`'s media was let through at `now_ms`.
    fn found_active(&self, id: SessionId, now_ms: i64) {
        let mut seen = self.lock_recently_active();
        if seen.len() >= RECENTLY_ACTIVE_CAPACITY && !seen.contains_key(&id) {
            // Nothing is found active for longer than a few heartbeat intervals' worth.
            seen.retain(|_, at| now_ms - *at < 60_000);
            if seen.len() >= RECENTLY_ACTIVE_CAPACITY {
                seen.clear();
            }
        }
        seen.insert(id, now_ms);
    }

    /// Forgets that session `id` was active (it was cut, or the store does not know it).
    fn forget_active(&self, id: SessionId) {
        self.lock_recently_active().remove(&id);
    }

    /// Whether a request with `claims` may pass while the store cannot be asked (see
    /// [`playback::honoured_without_store`]).
    fn honoured_without_store(&self, id: SessionId, claims: &Claims, now_ms: i64) -> bool {
        let heartbeat = self
            .engine
            .policy_of(&claims.account)
            .heartbeat_interval_seconds;
        let last = self.lock_recently_active().get(&id).copied();
        playback::honoured_without_store(
            claims.expires_at,
            now_ms,
            playback::lifetime_seconds(heartbeat),
            last,
        )
    }

    /// Cuts every response in flight for `session`, unless its account's policy is DryRun.
    fn cut(&self, session: &SessionRecord) {
        self.forget_active(session.id);
        let tokens: Vec<CancellationToken> = self
            .lock()
            .get(&session.id)
            .map(|v| v.iter().map(|s| s.token.clone()).collect())
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
                .filter(|(k, _)| k != SESSION_PARAM && k != TOKEN_PARAM)
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
                list.retain(|s| s.key != self.key);
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
    let mut subscribed = proxy.engine.subscribed();
    loop {
        let now = chrono::Utc::now().timestamp_millis();
        let mut wait =
            Duration::from_millis(expires_at_ms.saturating_sub(now).max(0) as u64).max(MIN_RECHECK);
        // Other sidecars' revocations are not heard while the subscription is down: ask the
        // store every second instead, so a stream cut elsewhere still ends within a second.
        if !*subscribed.borrow_and_update() {
            wait = wait.min(UNSUBSCRIBED_RECHECK);
        }
        tokio::select! {
            () = done.cancelled() => return,
            () = token.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            // The subscription went down (from now on, ask every second) or came back (notices
            // sent meanwhile were missed): either way, ask the store now. A stream in flight
            // may be waiting for an expiry far off when it happens.
            Ok(()) = subscribed.changed() => {}
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

/// What a media request presents.
enum Credential {
    /// A playback token.
    Token(String),
    /// A raw session id (the prototype's credential).
    SessionId(String),
}

fn query_param(request: &Request, name: &str) -> Option<String> {
    form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn header_text(request: &Request, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap_or_default().to_string())
}

/// The request's credential: a token (header, then query) before a session id (header, then
/// query).
fn credential_of(request: &Request) -> Option<Credential> {
    header_text(request, TOKEN_HEADER)
        .or_else(|| query_param(request, TOKEN_PARAM))
        .map(Credential::Token)
        .or_else(|| {
            header_text(request, SESSION_HEADER)
                .or_else(|| query_param(request, SESSION_PARAM))
                .map(Credential::SessionId)
        })
}

/// Checks the request's credential (signature, expiry, network of a token; the form of a
/// session id) without asking the store. Returns the session and, for a token, its claims.
fn check_credential(
    proxy: &Proxy,
    request: &Request,
    peer: Option<std::net::IpAddr>,
) -> Result<(SessionId, Option<Claims>), ApiError> {
    let playback = proxy.engine.playback();
    // Where viewers prove who they are, a leaked session id must not play without that proof:
    // with a ViewerAuthentication in force, media needs the token too.
    let required = playback.requires_token()
        || proxy
            .engine
            .identity()
            .verifier()
            .is_some_and(|verifier| verifier.mode() != AuthMode::Disabled);
    let refuse = |reason: &'static str, code: ErrorCode, message: String| {
        proxy.engine.metrics().playback.count_token_refusal(reason);
        Err(ApiError::forbidden(code, message))
    };
    match credential_of(request) {
        Some(Credential::Token(token)) => {
            match playback.verify(&token, chrono::Utc::now().timestamp(), peer) {
                Ok(claims) => Ok((claims.session, Some(claims))),
                // Tokens not required: an authentic token is worth the session id it carries,
                // which is accepted anyway, so its expiry adds nothing there. A player that only
                // fetches media (a hidden tab, whose heartbeat timers do not fire) keeps playing
                // on the token it has, renewing its session as with the session id.
                Err(TokenError::Expired) if !required => {
                    let claims = playback.verify(&token, i64::MIN, peer).map_err(|error| {
                        ApiError::forbidden(ErrorCode::InvalidToken, error.to_string())
                    })?;
                    Ok((claims.session, Some(claims)))
                }
                Err(error) => refuse(error.as_str(), ErrorCode::InvalidToken, error.to_string()),
            }
        }
        Some(Credential::SessionId(_)) if required => refuse(
            "session_id_not_accepted",
            ErrorCode::InvalidToken,
            format!(
                "media requests need a playback token (the `playbackToken` of the open or heartbeat answer): send the X-StreamGate-Token header or the `{TOKEN_PARAM}` query parameter; a session id is not accepted"
            ),
        ),
        Some(Credential::SessionId(raw)) => raw
            .parse()
            .map(|id| (id, None))
            .map_err(|()| ApiError::forbidden(ErrorCode::NotFound, "no such session".to_string())),
        None => refuse(
            "missing",
            ErrorCode::InvalidRequest,
            format!(
                "media requests need a playback token: send the X-StreamGate-Token header or the `{TOKEN_PARAM}` query parameter"
            ),
        ),
    }
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
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    let (id, claims) = check_credential(proxy, &request, peer)?;
    let url = proxy.upstream_url(request.uri())?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let session = match proxy.engine.authorize_media(id).await? {
        MediaAccess::Allowed {
            session,
            degraded: true,
            ..
        } => {
            if let Some(claims) = &claims
                && !proxy.honoured_without_store(id, claims, now_ms)
            {
                return Err(EngineError::Unavailable.into());
            }
            proxy.found_active(id, now_ms);
            session
        }
        MediaAccess::Allowed { session, .. } => {
            proxy.found_active(id, now_ms);
            session
        }
        MediaAccess::AllowedDryRun(record) => Some(record),
        MediaAccess::Gone(view) => {
            proxy.forget_active(id);
            return Err(ApiError::forbidden_gone(view));
        }
        MediaAccess::NotFound => {
            proxy.forget_active(id);
            return Err(ApiError::forbidden(
                ErrorCode::NotFound,
                "no such session; open one with PUT /streaming",
            ));
        }
    };

    // Who the session belongs to: the store's record, else (a degraded, unverified session)
    // the token's claims.
    let owner = session
        .as_ref()
        .map(|s| (s.account.clone(), s.stream_id.clone()))
        .or_else(|| {
            claims
                .as_ref()
                .map(|c| (c.account.clone(), c.stream_id.clone()))
        });
    if let (Some(peer), Some((account, _))) = (peer, &owner)
        && proxy
            .engine
            .observe_use(id, account, peer, SessionUse::Media)
            .await
    {
        return Err(shared_gone(proxy, id, session.as_ref()));
    }
    let (parts, body) = request.into_parts();
    let playlist_path = crate::hls::looks_like_playlist(parts.uri.path());
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let mut headers = forwarded_headers(&parts.headers);
    headers.remove(HeaderName::from_static(SESSION_HEADER));
    headers.remove(HeaderName::from_static(TOKEN_HEADER));
    if playlist_path {
        // Playlists are rewritten: fetch them uncompressed.
        headers.remove(header::ACCEPT_ENCODING);
    }
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

    let status =
        StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = upstream
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    // The request carried a token and passed: it renewed the session, so the answer hands back
    // a fresh token (a player that cannot heartbeat keeps one that works).
    let renewal = || match (&claims, &owner) {
        (Some(_), Some(owner)) => Some(mint(proxy, id, owner, peer, playback::lifetime_seconds)),
        _ => None,
    };
    if status.is_success()
        && crate::hls::is_playlist(parts.uri.path(), content_type)
        && let Some(owner) = &owner
    {
        let for_playlist = |kind| {
            let max = proxy
                .engine
                .playback()
                .playlist_token_max_lifetime_seconds();
            mint(proxy, id, owner, peer, |heartbeat| {
                playback::playlist_token_lifetime_seconds(kind, heartbeat, max)
            })
            .0
        };
        return rewrite_playlist(proxy, upstream, for_playlist, host.as_deref(), renewal()).await;
    }
    let long_lived = upstream
        .content_length()
        .is_none_or(|length| length >= LONG_LIVED_BYTES);
    let (max_long_lived, dry_run) = match &owner {
        Some((account, _)) => {
            let policy = proxy.engine.policy_of(account);
            (
                Some(policy.max_media_streams_per_session),
                policy.mode == Mode::DryRun,
            )
        }
        None => (None, false),
    };
    let registered = match proxy.register(id, long_lived, max_long_lived) {
        Ok(registered) => registered,
        Err(in_flight) if dry_run => {
            count_stream_refused(proxy, true);
            tracing::info!(session = %fingerprint(&id.to_string()), in_flight,
                "dry run: would refuse a second stream of one session");
            proxy
                .register(id, long_lived, None)
                .expect("registration without a limit succeeds")
        }
        Err(in_flight) => {
            count_stream_refused(proxy, false);
            // The upstream answer is dropped unread: its connection is closed.
            return Err(stream_in_use(in_flight as u32));
        }
    };
    let (token, registration) = registered;
    if long_lived && let (Some((account, _)), Some(max)) = (&owner, max_long_lived) {
        // This sidecar's count passed; the session's streams on other sidecars count too.
        let holder: StreamHolder = rand::random();
        match proxy.engine.claim_media_stream(id, holder, max).await {
            Some(StreamClaim::Full { streams }) if !dry_run => {
                count_stream_refused(proxy, false);
                return Err(stream_in_use(streams));
            }
            Some(StreamClaim::Full { streams }) => {
                count_stream_refused(proxy, true);
                tracing::info!(session = %fingerprint(&id.to_string()), in_flight = streams,
                    "dry run: would refuse another stream of one session (on another sidecar)");
            }
            Some(StreamClaim::Held { .. }) => {
                tokio::spawn(hold_stream_claim(
                    proxy.clone(),
                    id,
                    holder,
                    account.clone(),
                    token.clone(),
                    registration.done.clone(),
                ));
            }
            // Cut between the look-up and now: its notice cuts this response.
            Some(StreamClaim::Gone) | None => {}
        }
    }
    tokio::spawn(watch_expiry(
        proxy.clone(),
        id,
        session,
        token.clone(),
        registration.done.clone(),
    ));
    let mut response_headers = forwarded_headers(upstream.headers());
    set_token_headers(&mut response_headers, renewal().as_ref());
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

/// 409 `stream_in_use`: the session already plays `in_flight` long-lived streams, its limit.
fn stream_in_use(in_flight: u32) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        ErrorCode::StreamInUse,
        format!(
            "this session already plays {in_flight} stream(s), its limit (maxMediaStreamsPerSession); stop the other stream or open a session of its own"
        ),
    )
}

/// Keeps a long-lived response's claim on its session's streams while it streams (renewed
/// every third of [`MEDIA_STREAM_LEASE`]) and drops it when the response ends. A claim that
/// lapsed (the store was out of reach for a whole lease) and was taken by another stream
/// meanwhile cuts this one: the session's other stream started while this one could not
/// vouch for itself, and only one may play.
async fn hold_stream_claim(
    proxy: Arc<Proxy>,
    id: SessionId,
    holder: StreamHolder,
    account: String,
    token: CancellationToken,
    done: CancellationToken,
) {
    loop {
        tokio::select! {
            () = done.cancelled() => break,
            () = tokio::time::sleep(MEDIA_STREAM_LEASE / 3) => {}
        }
        let policy = proxy.engine.policy_of(&account);
        let max = policy.max_media_streams_per_session;
        match proxy.engine.claim_media_stream(id, holder, max).await {
            Some(StreamClaim::Full { streams }) if policy.mode == Mode::DryRun => {
                count_stream_refused(&proxy, true);
                tracing::info!(session = %fingerprint(&id.to_string()), in_flight = streams,
                    "dry run: would cut a stream whose lapsed claim another stream took");
                break;
            }
            Some(StreamClaim::Full { streams }) => {
                tracing::warn!(session = %fingerprint(&id.to_string()), in_flight = streams,
                    "a stream's claim lapsed and another stream of its session took it: cut");
                count_stream_refused(&proxy, false);
                token.cancel();
                break;
            }
            // The session was cut: its notice or the expiry re-check cuts the response.
            Some(StreamClaim::Gone) => return,
            Some(StreamClaim::Held { .. }) | None => {}
        }
    }
    proxy.engine.release_media_stream(id, holder).await;
}

fn count_stream_refused(proxy: &Proxy, dry_run: bool) {
    proxy
        .engine
        .metrics()
        .playback
        .media_streams_refused
        .get_or_create(&crate::metrics::DryRunLabel {
            dry_run: if dry_run { "true" } else { "false" },
        })
        .inc();
}

/// 403 `session_gone`, reason `shared`: sharing detection revoked the session just now.
fn shared_gone(proxy: &Proxy, id: SessionId, session: Option<&SessionRecord>) -> ApiError {
    match session {
        Some(record) => {
            let mut record = record.clone();
            record.state = SessionState::Revoked;
            record.reason = Some(EndReason::Shared);
            ApiError::forbidden_gone(proxy.engine.view_of(&record))
        }
        None => ApiError::forbidden(
            ErrorCode::SessionGone,
            format!(
                "the session {} was used from too many networks and is revoked (shared)",
                fingerprint(&id.to_string())
            ),
        ),
    }
}

/// A token for session `id` of `owner` (account, stream id), for `peer`, living for what
/// `lifetime_seconds` makes of the account's heartbeat interval. Returns it and its expiry.
fn mint(
    proxy: &Proxy,
    id: SessionId,
    (account, stream_id): &(String, String),
    peer: Option<std::net::IpAddr>,
    lifetime_seconds: impl FnOnce(u32) -> i64,
) -> (String, i64) {
    let heartbeat = proxy.engine.policy_of(account).heartbeat_interval_seconds;
    let minted = proxy.engine.playback().mint_lasting(
        id,
        account,
        stream_id,
        lifetime_seconds(heartbeat),
        peer,
        chrono::Utc::now().timestamp(),
    );
    proxy.engine.metrics().playback.tokens_issued.inc();
    minted
}

/// Puts the fresh token of `renewal` (token, expiry in seconds) into a response's headers,
/// after removing any the upstream sent (only the sidecar hands out tokens). A response with
/// a token is one viewer's: shared caches must not keep it.
fn set_token_headers(headers: &mut HeaderMap, renewal: Option<&(String, i64)>) {
    headers.remove(TOKEN_HEADER);
    headers.remove(TOKEN_EXPIRES_HEADER);
    let Some((token, expires_at)) = renewal else {
        return;
    };
    let (Ok(token), Ok(expires)) = (
        HeaderValue::from_str(token),
        HeaderValue::from_str(&crate::session::rfc3339(expires_at.saturating_mul(1000))),
    ) else {
        return;
    };
    headers.insert(TOKEN_HEADER, token);
    headers.insert(TOKEN_EXPIRES_HEADER, expires);
    let cache_control = headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok());
    if let Some(value) =
        private_cache_control(cache_control).and_then(|value| HeaderValue::from_str(&value).ok())
    {
        headers.insert(header::CACHE_CONTROL, value);
    }
}

/// The `Cache-Control` for a response that carries one viewer's credential, given the
/// upstream's: `private` added (and `public`, `s-maxage` dropped) so shared caches do not keep
/// it; `None` when the upstream's already keeps it out of them.
fn private_cache_control(upstream: Option<&str>) -> Option<String> {
    let directives: Vec<&str> = upstream
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let name = |d: &str| {
        d.split('=')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    };
    if directives
        .iter()
        .any(|d| matches!(name(d).as_str(), "private" | "no-store"))
    {
        return None;
    }
    let kept = directives
        .into_iter()
        .filter(|d| !matches!(name(d).as_str(), "public" | "s-maxage"));
    Some(
        std::iter::once("private")
            .chain(kept)
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// Reads a playlist from the upstream (at most [`MAX_PLAYLIST_BYTES`], uncompressed) and
/// answers it with a token (minted by `token_for` for the kind of playlist it is) added to
/// every URI that comes back here, and `renewal` in the headers; never cached by shared
/// caches, since it carries a credential.
async fn rewrite_playlist(
    proxy: &Proxy,
    upstream: reqwest::Response,
    token_for: impl FnOnce(crate::hls::PlaylistKind) -> String,
    host: Option<&str>,
    renewal: Option<(String, i64)>,
) -> Result<Response, ApiError> {
    let status =
        StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let encoded = upstream
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"));
    if encoded {
        return Err(ApiError::bad_gateway(
            "the streaming container sent a compressed playlist, which cannot be given tokens",
        ));
    }
    let mut headers = forwarded_headers(upstream.headers());
    let mut body = Vec::new();
    let mut chunks = upstream.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::bad_gateway("the streaming container did not answer"))?;
        if body.len() + chunk.len() > MAX_PLAYLIST_BYTES {
            return Err(ApiError::bad_gateway(format!(
                "the playlist is larger than {MAX_PLAYLIST_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(body)
        .map_err(|_| ApiError::bad_gateway("the playlist is not UTF-8 (RFC 8216 requires it)"))?;
    let token = token_for(crate::hls::classify(&text));
    let rewritten = crate::hls::rewrite(&text, &token, host);
    for name in [header::CONTENT_LENGTH, header::ETAG, header::LAST_MODIFIED] {
        headers.remove(name);
    }
    set_token_headers(&mut headers, renewal.as_ref());
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    proxy.engine.metrics().playback.playlists_rewritten.inc();
    proxy.engine.metrics().count_proxied();
    let mut response = Response::new(Body::from(rewritten));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
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
    fn responses_with_a_token_are_kept_out_of_shared_caches() {
        assert_eq!(private_cache_control(None).as_deref(), Some("private"));
        assert_eq!(
            private_cache_control(Some("public, max-age=60, s-maxage=600")).as_deref(),
            Some("private, max-age=60")
        );
        assert_eq!(private_cache_control(Some("no-store")), None);
        assert_eq!(private_cache_control(Some("max-age=5, Private")), None);
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
