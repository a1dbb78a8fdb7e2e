//! The session API over HTTP: the prototype's `/streaming` endpoints, the `/v1` admin endpoints,
//! health, readiness, metrics and the OpenAPI document generated from these handlers.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_http::trace::TraceLayer;
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::admission::OverLimit;
use crate::engine::{Engine, Heartbeat, Kicked, Opened, Unavailable};
use crate::metrics::HttpLabels;
use crate::session::{EndReason, Session, SessionId};
use crate::validate::{IdProblem, check_id, is_session_id};

/// Largest request body accepted. The API takes its input from the URL; a body is a client bug.
pub const MAX_BODY_BYTES: u64 = 8 * 1024;

/// Header set on a DryRun admission that enforcement would have refused or that would have evicted.
pub const DRY_RUN_HEADER: &str = "x-streamgate-dry-run";
/// Header set on an admission made without the store (failurePolicy Open during an outage).
pub const DEGRADED_HEADER: &str = "x-streamgate-degraded";

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
    /// The account's active sessions, oldest first (`limit_exceeded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<Vec<Session>>,
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
    status: StatusCode,
    // Boxed: the body is large and most results are Ok.
    body: Box<ErrorBody>,
}

impl ApiError {
    fn new(status: StatusCode, error: ErrorCode, message: impl Into<String>) -> Self {
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
    pub fn forbidden_gone(message: impl Into<String>, session: Session) -> Self {
        let mut e = Self::new(StatusCode::FORBIDDEN, ErrorCode::SessionGone, message);
        e.body.reason = session.reason;
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

    /// 410 `session_gone` for a cut session.
    pub fn gone(session: Session) -> Self {
        let reason = session.reason.unwrap_or(EndReason::Expired);
        let mut e = Self::new(
            StatusCode::GONE,
            ErrorCode::SessionGone,
            format!(
                "session {} of account {:?} was cut ({}); open a new session to keep watching",
                session.session_id,
                session.account,
                reason.as_str()
            ),
        );
        e.body.reason = Some(reason);
        e.body.session = Some(session);
        e
    }
}

impl From<Unavailable> for ApiError {
    fn from(error: Unavailable) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::StoreUnavailable,
            error.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(*self.body)).into_response();
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

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
    params(StreamingParams),
    responses(
        (status = 201, description = "New session admitted", body = Session),
        (status = 200, description = "The stream already had an active session; renewed", body = Session),
        (status = 400, description = "Invalid account or streamId", body = ErrorBody),
        (status = 429, description = "The account is at its limit (RejectNew)", body = ErrorBody),
        (status = 503, description = "Session store unreachable (failurePolicy Closed)", body = ErrorBody),
    )
)]
async fn open_stream(
    State(engine): State<Engine>,
    params: StreamingParams,
) -> Result<Response, ApiError> {
    match engine.open(&params.account, &params.stream_id).await? {
        Opened::Created {
            session,
            dry_run,
            degraded,
        } => {
            let mut response = session_response(StatusCode::CREATED, session);
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
        Opened::Renewed(session) => Ok(session_response(StatusCode::OK, session)),
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
            e.body.sessions = Some(sessions);
            Err(e)
        }
    }
}

/// Heartbeat: renew an active session.
#[utoipa::path(
    get,
    path = "/streaming",
    tag = "sessions",
    params(StreamingParams),
    responses(
        (status = 200, description = "Renewed", body = Session),
        (status = 400, description = "Invalid account or streamId", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 410, description = "The session was cut (evicted, kicked, expired)", body = ErrorBody),
        (status = 503, description = "Session store unreachable", body = ErrorBody),
    )
)]
async fn heartbeat(
    State(engine): State<Engine>,
    params: StreamingParams,
) -> Result<Response, ApiError> {
    match engine.heartbeat(&params.account, &params.stream_id).await? {
        Heartbeat::Renewed(session) => Ok(session_response(StatusCode::OK, session)),
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
    params(StreamingParams),
    responses(
        (status = 204, description = "Ended"),
        (status = 400, description = "Invalid account or streamId", body = ErrorBody),
        (status = 404, description = "No active session", body = ErrorBody),
        (status = 503, description = "Session store unreachable", body = ErrorBody),
    )
)]
async fn end_stream(
    State(engine): State<Engine>,
    params: StreamingParams,
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
        (status = 503, description = "Session store unreachable", body = ErrorBody),
    ))]
async fn readyz(State(engine): State<Engine>) -> Result<Json<Health>, ApiError> {
    // The policy is loaded before the server starts and a bad reload keeps the last good one,
    // so only the store can make us unready.
    engine.ready().await?;
    Ok(Json(Health {
        status: "ready".into(),
    }))
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
async fn metrics(State(engine): State<Engine>) -> Response {
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

/// The OpenAPI document and the routes it describes.
fn documented_routes() -> (Router<Engine>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(open_stream, heartbeat, end_stream))
        .routes(routes!(list_account_sessions))
        .routes(routes!(get_session, kick_session))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .split_for_parts()
}

/// The OpenAPI 3 document of the session API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = documented_routes();
    add_openapi_path(&mut doc);
    doc
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

/// The sidecar's HTTP application. With a `proxy`, every request outside the session API is a
/// media request for the upstream.
pub fn router(engine: Engine, proxy: Option<Arc<crate::proxy::Proxy>>) -> Router {
    let (routes, mut doc) = documented_routes();
    add_openapi_path(&mut doc);
    let document = Arc::new(doc.to_json().expect("the OpenAPI document serializes"));
    let routes = routes
        .route(
            "/openapi.json",
            get(move || {
                let document = document.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        document.as_ref().clone(),
                    )
                }
            }),
        )
        .method_not_allowed_fallback(method_not_allowed)
        // Only the session API's own routes: proxied uploads are the upstream's business.
        .route_layer(middleware::from_fn(refuse_bodies));
    let routes = match proxy {
        Some(proxy) => routes.fallback_service(
            Router::new()
                .fallback(crate::proxy::forward)
                .with_state(proxy),
        ),
        None => routes.fallback(unknown_route),
    };
    routes
        .layer(middleware::from_fn_with_state(engine.clone(), observe))
        .layer(TraceLayer::new_for_http())
        .with_state(engine)
}

async fn unknown_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::InvalidRequest,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

/// Refuses bodies over [`MAX_BODY_BYTES`] before any handler runs. Handlers never read bodies,
/// so a body without a length is dropped unread and costs nothing.
async fn refuse_bodies(request: Request, next: Next) -> Response {
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if length.is_some_and(|n| n > MAX_BODY_BYTES) {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::InvalidRequest,
            format!(
                "request body too large: the session API takes its input from the URL, bodies are limited to {MAX_BODY_BYTES} bytes"
            ),
        )
        .into_response();
    }
    next.run(request).await
}

/// Records every request's duration by route template and status.
async fn observe(State(engine): State<Engine>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    engine
        .metrics()
        .http_requests
        .get_or_create(&HttpLabels {
            method,
            route,
            status: response.status().as_u16(),
        })
        .observe(started.elapsed().as_secs_f64());
    response
}
