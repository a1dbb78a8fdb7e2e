//! The session API over HTTP: the prototype's `/streaming` endpoints, the `/v1` admin endpoints,
//! health, readiness, metrics and the OpenAPI document generated from these handlers. The
//! routes are composed with the enforcing proxy in [`crate::server`]; errors are
//! [`crate::error`]'s.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::admission::OverLimit;
use crate::engine::{Engine, Heartbeat, Kicked, Opened, SessionUse};
use crate::error::{ActiveStream, ApiError, ErrorBody, ErrorCode};
use crate::identity::{Identity, Refusal};
use crate::session::{Session, SessionId};
use crate::validate::{IdProblem, check_id, is_session_id};

/// Largest request body accepted. The API takes its input from the URL; a body is a client bug.
pub const MAX_BODY_BYTES: usize = 8 * 1024;

/// Header set on a DryRun admission that enforcement would have refused or that would have evicted.
pub const DRY_RUN_HEADER: &str = "x-streamgate-dry-run";
/// Header set on an admission made without the store (failurePolicy Open during an outage).
pub const DEGRADED_HEADER: &str = "x-streamgate-degraded";

/// Query of the `/streaming` endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct StreamingParams {
    /// The account: 1–128 visible ASCII characters.
    #[param(min_length = 1, max_length = 128, pattern = "^[\\x21-\\x7e]+$")]
    pub account: String,
    /// The player's stream id: 1–128 visible ASCII characters.
    #[param(min_length = 1, max_length = 128, pattern = "^[\\x21-\\x7e]+$")]
    pub stream_id: String,
}

fn id_problem(parameter: &str, problem: IdProblem) -> ApiError {
    ApiError::invalid_parameter(parameter, problem.to_string())
}

impl<S: Send + Sync> FromRequestParts<S> for StreamingParams {
    type Rejection = ApiError;

    /// Parses the query by hand so that every problem gets our JSON error naming the parameter,
    /// and a repeated parameter is refused rather than silently picking one.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let (mut account, mut stream_id) = (None, None);
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match key.as_ref() {
                "account" => &mut account,
                "streamId" => &mut stream_id,
                _ => continue, // cache busters and tracking parameters are harmless
            };
            if slot.is_some() {
                return Err(ApiError::invalid_parameter(&key, "must be given only once"));
            }
            *slot = Some(value.into_owned());
        }
        let account = account.ok_or_else(|| id_problem("account", IdProblem::Empty))?;
        let stream_id = stream_id.ok_or_else(|| id_problem("streamId", IdProblem::Empty))?;
        check_id(&account).map_err(|p| id_problem("account", p))?;
        check_id(&stream_id).map_err(|p| id_problem("streamId", p))?;
        Ok(Self { account, stream_id })
    }
}

/// A `/streaming` request's viewer and stream: the account verified from the bearer token when
/// a ViewerAuthentication is in force (the `account` parameter may then be omitted, and must
/// match when given), else the `account` parameter. Refusals happen here, before any handler
/// touches the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewerStream {
    /// The account the request acts for.
    pub account: String,
    /// The player's stream id.
    pub stream_id: String,
    /// The verified identity, when the account comes from a token.
    pub identity: Option<Identity>,
}

impl ViewerStream {
    /// The stream limit the verified token claims, if any.
    pub fn claimed_limit(&self) -> Option<u32> {
        self.identity.as_ref().and_then(|i| i.claimed_limit)
    }
}

/// The query of the `/streaming` endpoints as documented: `account` is required without a bearer
/// token; with one it may be omitted (the token names the account) and must match when given.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct ViewerStreamParams {
    /// The account: 1–128 visible ASCII characters. Required without a bearer token.
    #[param(min_length = 1, max_length = 128, pattern = "^[\\x21-\\x7e]+$")]
    pub account: Option<String>,
    /// The player's stream id: 1–128 visible ASCII characters.
    #[param(min_length = 1, max_length = 128, pattern = "^[\\x21-\\x7e]+$")]
    pub stream_id: String,
}

/// Value of `WWW-Authenticate` on a 401 (RFC 6750).
pub const WWW_AUTHENTICATE_INVALID_TOKEN: &str = r#"Bearer error="invalid_token""#;

/// The HTTP answer to an identity refusal.
pub fn refusal_response(refusal: Refusal) -> Response {
    let message = refusal.to_string();
    match refusal {
        Refusal::Unauthenticated(_) => {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthenticated,
                message,
            )
            .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(WWW_AUTHENTICATE_INVALID_TOKEN),
            );
            response
        }
        Refusal::AccountMismatch { .. } => {
            let mut e = ApiError::new(StatusCode::FORBIDDEN, ErrorCode::AccountMismatch, message);
            e.body.parameter = Some("account".into());
            e.into_response()
        }
        Refusal::Unavailable(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::AuthUnavailable,
            message,
        )
        .into_response(),
        Refusal::MissingAccount => id_problem("account", IdProblem::Empty).into_response(),
    }
}

impl FromRequestParts<Engine> for ViewerStream {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, engine: &Engine) -> Result<Self, Response> {
        let query = parts.uri.query().unwrap_or("");
        let (mut account, mut stream_id) = (None, None);
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match key.as_ref() {
                "account" => &mut account,
                "streamId" => &mut stream_id,
                _ => continue,
            };
            if slot.is_some() {
                return Err(
                    ApiError::invalid_parameter(&key, "must be given only once").into_response()
                );
            }
            *slot = Some(value.into_owned());
        }
        let stream_id =
            stream_id.ok_or_else(|| id_problem("streamId", IdProblem::Empty).into_response())?;
        if let Some(account) = &account {
            check_id(account).map_err(|p| id_problem("account", p).into_response())?;
        }
        check_id(&stream_id).map_err(|p| id_problem("streamId", p).into_response())?;
        let authorization = match parts.headers.get(header::AUTHORIZATION) {
            None => None,
            Some(value) => Some(value.to_str().map_err(|_| {
                refusal_response(Refusal::Unauthenticated(
                    "token check failed: the Authorization header is not visible ASCII".into(),
                ))
            })?),
        };
        // A heartbeat or end may carry the session's playback token instead of the viewer's
        // JWT, so a player need not refresh its identity token mid-stream.
        if matches!(parts.method, Method::GET | Method::DELETE)
            && let Some(token) = authorization.and_then(crate::playback::playback_bearer)
        {
            let peer = parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0.ip());
            let unauthenticated =
                |message: String| refusal_response(Refusal::Unauthenticated(message));
            let claims = engine
                .playback()
                .verify(token, chrono::Utc::now().timestamp(), peer)
                .map_err(|error| unauthenticated(format!("token check failed: {error}")))?;
            if claims.stream_id != stream_id {
                return Err(unauthenticated(
                    "token check failed: the playback token is for another streamId".into(),
                ));
            }
            if account
                .as_ref()
                .is_some_and(|account| *account != claims.account)
            {
                return Err(unauthenticated(
                    "token check failed: the playback token is for another account".into(),
                ));
            }
            return Ok(Self {
                account: claims.account,
                stream_id,
                identity: None,
            });
        }
        let viewer = engine
            .identity()
            .decide(authorization, account.as_deref())
            .map_err(refusal_response)?;
        Ok(Self {
            account: viewer.account,
            stream_id,
            identity: viewer.identity,
        })
    }
}

/// The account's active sessions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccountSessions {
    /// The account.
    pub account: String,
    /// Its limit under the policy in force.
    pub limit: u32,
    /// Its active sessions, oldest first.
    pub sessions: Vec<Session>,
}

/// Body of `/healthz` and `/readyz`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` or `ready`.
    pub status: String,
}

/// An open or heartbeat answer: the session and the playback token its media requests carry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlaybackSession {
    /// The session.
    #[serde(flatten)]
    pub session: Session,
    /// The media credential: send it as `X-StreamGate-Token` or the `sg` query parameter on
    /// media requests. Bound to this session and (unless turned off) the client's network;
    /// re-issued on every heartbeat.
    pub playback_token: String,
    /// When the playback token stops working (RFC 3339): two heartbeat intervals after issue.
    pub playback_token_expires_at: String,
}

/// The client's address, when the server knows it (always, when served by
/// [`crate::server`]).
pub struct PeerIp(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0.ip()),
        ))
    }
}

/// An open or heartbeat answer carrying a fresh playback token for `peer`.
/// Sharing detection sees the client's network on every open and heartbeat too: a session
/// whose answers reach too many networks is revoked (reason `shared`) before it gets a token.
async fn playback_response(
    engine: &Engine,
    status: StatusCode,
    session: Session,
    peer: Option<std::net::IpAddr>,
    kind: SessionUse,
) -> Result<Response, ApiError> {
    if let (Some(peer), Ok(id)) = (peer, session.session_id.parse::<SessionId>())
        && engine.observe_use(id, &session.account, peer, kind).await
    {
        let mut shared = session;
        shared.state = crate::session::SessionState::Revoked;
        shared.reason = Some(crate::session::EndReason::Shared);
        return Err(ApiError::gone(shared));
    }
    Ok(playback_response_now(engine, status, session, peer))
}

fn playback_response_now(
    engine: &Engine,
    status: StatusCode,
    session: Session,
    peer: Option<std::net::IpAddr>,
) -> Response {
    let Some((playback_token, playback_token_expires_at)) = engine.playback_token(&session, peer)
    else {
        return session_response(status, session);
    };
    let mut response = (
        status,
        Json(PlaybackSession {
            session,
            playback_token,
            playback_token_expires_at,
        }),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn session_response(status: StatusCode, session: Session) -> Response {
    let mut response = (status, Json(session)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Open a stream, or renew it if it is already active.
#[utoipa::path(
    put,
    path = "/streaming",
    tag = "sessions",
    params(ViewerStreamParams),
    responses(
        (status = 201, description = "New session admitted", body = PlaybackSession),
        (status = 200, description = "The stream already had an active session; renewed", body = PlaybackSession),
        (status = 400, description = "Invalid account or streamId", body = ErrorBody),
        (status = 401, description = "ViewerAuthentication in force: no bearer token, or it failed a check (named)", body = ErrorBody),
        (status = 403, description = "The account parameter is not the token's account", body = ErrorBody),
        (status = 403, description = "A Blocking session validator denied the session (`denied`; the slot is freed)", body = ErrorBody),
        (status = 429, description = "The account is at its limit (RejectNew)", body = ErrorBody),
        (status = 503, description = "Session store unreachable (failurePolicy Closed), or no verification key loaded (auth_unavailable)", body = ErrorBody),
    )
)]
async fn open_stream(
    State(engine): State<Engine>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    // The request's parts are read in place: extracting `HeaderMap` and `Extensions` would
    // copy both on every admission, though only session validators look at them.
    let (mut parts, _) = request.into_parts();
    let params = match ViewerStream::from_request_parts(&mut parts, &engine).await {
        Ok(params) => params,
        Err(refused) => return Ok(refused),
    };
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let peer_ip = peer.map(|p| p.ip());
    match engine
        .open_claimed(&params.account, &params.stream_id, params.claimed_limit())
        .await?
    {
        Opened::Created {
            session,
            dry_run,
            degraded,
        } => {
            // Session validators (none: unchanged). Blocking ones answer here.
            // The verified identity, when the account comes from a token.
            let claims = params.identity.as_ref().map(|identity| {
                let mut claims = serde_json::Map::new();
                claims.insert("iss".into(), identity.issuer.clone().into());
                claims.insert("account".into(), identity.account.clone().into());
                claims.insert("exp".into(), identity.expires_at.into());
                if let Some(limit) = identity.claimed_limit {
                    claims.insert("limit".into(), limit.into());
                }
                claims
            });
            let facts = crate::validation::RequestFacts::from_request(peer, &parts.headers, claims);
            let session = engine
                .validate_admission(session, facts)
                .await
                .map_err(|denied| ApiError::denied(&denied.message, denied.session))?;
            let mut response = playback_response(
                &engine,
                StatusCode::CREATED,
                session,
                peer_ip,
                SessionUse::Open,
            )
            .await?;
            if let Some(would) = dry_run {
                let value = match would {
                    OverLimit::Refuse => "would-refuse",
                    OverLimit::Evict(_) => "would-evict",
                };
                response.headers_mut().insert(
                    HeaderName::from_static(DRY_RUN_HEADER),
                    HeaderValue::from_static(value),
                );
            }
            if degraded {
                response.headers_mut().insert(
                    HeaderName::from_static(DEGRADED_HEADER),
                    HeaderValue::from_static("store-unavailable"),
                );
            }
            Ok(response)
        }
        Opened::Renewed(session) => {
            playback_response(&engine, StatusCode::OK, session, peer_ip, SessionUse::Open).await
        }
        Opened::Refused { limit, sessions } => {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::LimitExceeded,
                format!(
                    "account {:?} already has {} active streams, its limit is {limit}; end one of them first",
                    params.account,
                    sessions.len()
                ),
            );
            e.body.limit = Some(limit);
            e.body.active = Some(sessions.len() as u32);
            e.body.sessions = Some(sessions.iter().map(ActiveStream::from).collect());
            Err(e)
        }
    }
}

/// Heartbeat: renew an active session.
#[utoipa::path(
    get,
    path = "/streaming",
    tag = "sessions",
    params(ViewerStreamParams),
    responses(
        (status = 200, description = "Renewed", body = PlaybackSession),
        (status = 400, description = "Invalid account or streamId", body = ErrorBody),
        (status = 401, description = "ViewerAuthentication in force: no bearer token, or it failed a check (named)", body = ErrorBody),
        (status = 403, description = "The account parameter is not the token's account", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 410, description = "The session was cut (evicted, kicked, expired)", body = ErrorBody),
        (status = 503, description = "Session store unreachable, or no verification key loaded (auth_unavailable)", body = ErrorBody),
    )
)]
async fn heartbeat(
    State(engine): State<Engine>,
    PeerIp(peer): PeerIp,
    method: Method,
    params: ViewerStream,
) -> Result<Response, ApiError> {
    // axum answers HEAD with the GET handler; a HEAD must not renew a session.
    if method == Method::HEAD {
        return Err(ApiError::method_not_allowed(
            "method HEAD is not allowed on /streaming: GET renews a session, PUT opens, DELETE ends",
        ));
    }
    match engine
        .heartbeat_claimed(&params.account, &params.stream_id, params.claimed_limit())
        .await?
    {
        Heartbeat::Renewed(session) => {
            playback_response(
                &engine,
                StatusCode::OK,
                session,
                peer,
                SessionUse::Heartbeat,
            )
            .await
        }
        Heartbeat::Gone(session) => Err(ApiError::gone(session)),
        Heartbeat::NotFound => Err(ApiError::not_found(format!(
            "no session for account {:?} and streamId {:?}; open one with PUT",
            params.account, params.stream_id
        ))),
    }
}

/// End a stream and free its slot.
#[utoipa::path(
    delete,
    path = "/streaming",
    tag = "sessions",
    params(ViewerStreamParams),
    responses(
        (status = 204, description = "Ended"),
        (status = 400, description = "Invalid account or streamId", body = ErrorBody),
        (status = 401, description = "ViewerAuthentication in force: no bearer token, or it failed a check (named)", body = ErrorBody),
        (status = 403, description = "The account parameter is not the token's account", body = ErrorBody),
        (status = 404, description = "No active session", body = ErrorBody),
        (status = 503, description = "Session store unreachable", body = ErrorBody),
    )
)]
async fn end_stream(
    State(engine): State<Engine>,
    params: ViewerStream,
) -> Result<StatusCode, ApiError> {
    if engine.end(&params.account, &params.stream_id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "no active session for account {:?} and streamId {:?}",
            params.account, params.stream_id
        )))
    }
}

fn path_account(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(account) = path.map_err(|e| ApiError::invalid_parameter("account", e.body_text()))?;
    check_id(&account).map_err(|p| id_problem("account", p))?;
    Ok(account)
}

fn path_session_id(path: Result<Path<String>, PathRejection>) -> Result<SessionId, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::invalid_parameter("sessionId", e.body_text()))?;
    if !is_session_id(&id) {
        return Err(ApiError::invalid_parameter(
            "sessionId",
            "must be 40 lowercase hexadecimal digits",
        ));
    }
    id.parse()
        .map_err(|()| ApiError::invalid_parameter("sessionId", "is not a session id"))
}

/// List an account's active sessions.
#[utoipa::path(
    get,
    path = "/v1/accounts/{account}/sessions",
    tag = "admin",
    params(("account" = String, Path, description = "The account")),
    responses(
        (status = 200, description = "Active sessions, oldest first", body = AccountSessions),
        (status = 400, description = "Invalid account", body = ErrorBody),
        (status = 503, description = "Session store unreachable", body = ErrorBody),
    )
)]
async fn list_account_sessions(
    State(engine): State<Engine>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<AccountSessions>, ApiError> {
    let account = path_account(path)?;
    let (limit, sessions) = engine.list(&account).await?;
    Ok(Json(AccountSessions {
        account,
        limit,
        sessions,
    }))
}

/// Read one session without renewing it; includes recently cut sessions.
#[utoipa::path(
    get,
    path = "/v1/sessions/{sessionId}",
    tag = "admin",
    params(("sessionId" = String, Path, description = "40 hex digits")),
    responses(
        (status = 200, description = "The session (active, revoked or expired)", body = Session),
        (status = 400, description = "Malformed session id", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 503, description = "Session store unreachable", body = ErrorBody),
    )
)]
async fn get_session(
    State(engine): State<Engine>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_session_id(path)?;
    match engine.get(id).await? {
        Some(session) => Ok(session_response(StatusCode::OK, session)),
        None => Err(ApiError::not_found(format!("no session {id}"))),
    }
}

/// Kick (revoke) a session; its stream is cut and its next heartbeat gets 410 `kicked`.
#[utoipa::path(
    delete,
    path = "/v1/sessions/{sessionId}",
    tag = "admin",
    params(("sessionId" = String, Path, description = "40 hex digits")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "Malformed session id", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 410, description = "Already cut", body = ErrorBody),
        (status = 503, description = "Session store unreachable", body = ErrorBody),
    )
)]
async fn kick_session(
    State(engine): State<Engine>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = path_session_id(path)?;
    match engine.kick(id).await? {
        Kicked::Kicked(_) => Ok(StatusCode::NO_CONTENT),
        Kicked::AlreadyGone(session) => Err(ApiError::gone(session)),
        Kicked::NotFound => Err(ApiError::not_found(format!("no session {id}"))),
    }
}

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: the store answers and a policy is loaded.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready: the store is unusable, recently answered wrongly, or revocations are not heard", body = ErrorBody),
    ))]
async fn readyz(State(engine): State<Engine>) -> Result<Json<Health>, ApiError> {
    // The policy is loaded before the server starts and a bad reload keeps the last good one,
    // so only the store can make us unready.
    match engine.ready().await {
        Ok(()) => Ok(Json(Health {
            status: "ready".into(),
        })),
        Err(crate::engine::NotReady::Store(error)) => {
            // Not ready is 503 whatever the cause; the code still tells which.
            let mut error = ApiError::from(error);
            error.status = StatusCode::SERVICE_UNAVAILABLE;
            Err(error)
        }
        Err(other) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::StoreUnavailable,
            other.to_string(),
        )),
    }
}

/// Prometheus metrics (served on the admin and metrics listeners).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "OpenMetrics text format", body = String, content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8")))]
pub async fn metrics(State(engine): State<Engine>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        engine.render_metrics().await,
    )
        .into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "StreamGate session API",
        description = "Concurrent-stream limiting: open, heartbeat and end streams; list and kick sessions."
    ),
    tags(
        (name = "sessions", description = "The player's API, compatible with the prototype's /streaming"),
        (name = "admin", description = "Inspect and revoke sessions"),
        (name = "operations", description = "Health, readiness and metrics"),
    )
)]
struct ApiDoc;

/// The viewer port's routes and their OpenAPI document (including `/openapi.json` itself): the
/// player's `/streaming` and the probes. Nothing here reveals or changes another viewer's
/// sessions.
pub fn routes() -> (axum::Router<Engine>, utoipa::openapi::OpenApi) {
    let (routes, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(open_stream, heartbeat, end_stream))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .split_for_parts();
    add_openapi_path(&mut doc);
    constrain_path_parameters(&mut doc);
    (routes, doc)
}

/// The admin listener's routes and their OpenAPI document: list and kick any session, the
/// metrics and the probes. Served on `--admin-listen` (loopback by default), never on the
/// viewer port.
pub fn admin_routes() -> (axum::Router<Engine>, utoipa::openapi::OpenApi) {
    let (routes, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_account_sessions))
        .routes(routes!(get_session, kick_session))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .split_for_parts();
    add_openapi_path(&mut doc);
    constrain_path_parameters(&mut doc);
    (routes, doc)
}

/// Gives the path parameters the constraints the handlers enforce, so clients and fuzzers see
/// them: an account is 1–128 visible ASCII characters, a session id 40 lowercase hex digits.
fn constrain_path_parameters(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let constraint = |name: &str| {
        let builder = ObjectBuilder::new().schema_type(Type::String);
        match name {
            "account" => Some(
                builder
                    .min_length(Some(1))
                    .max_length(Some(crate::validate::MAX_ID_LEN))
                    .pattern(Some("^[\\x21-\\x7e]+$")),
            ),
            "sessionId" => Some(
                builder
                    .min_length(Some(40))
                    .max_length(Some(40))
                    .pattern(Some("^[0-9a-f]{40}$")),
            ),
            _ => None,
        }
    };
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.head,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            for parameter in operation.parameters.iter_mut().flatten() {
                if let Some(schema) = constraint(&parameter.name) {
                    parameter.schema = Some(schema.build().into());
                }
            }
        }
    }
}

/// The OpenAPI 3 document of the viewer port.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().1
}

/// The OpenAPI 3 document of the admin listener.
pub fn admin_openapi() -> utoipa::openapi::OpenApi {
    admin_routes().1
}

fn add_openapi_path(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::path::{HttpMethod, OperationBuilder, PathItem};
    use utoipa::openapi::response::ResponseBuilder;
    let operation = OperationBuilder::new()
        .summary(Some("This OpenAPI document"))
        .tag("operations")
        .response("200", ResponseBuilder::new().description("OpenAPI 3 JSON"))
        .build();
    doc.paths.paths.insert(
        "/openapi.json".into(),
        PathItem::new(HttpMethod::Get, operation),
    );
}
