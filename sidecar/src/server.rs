//! Wiring: policy + store + engine + HTTP application, background tasks under one owner, and
//! graceful shutdown.
//!
//! Three listeners: the viewer port (`--listen`: `/streaming`, probes, `/openapi.json` and, with
//! `--upstream`, media), the admin listener (`--admin-listen`, loopback by default: list, get and
//! kick any session, metrics) and the metrics listener (`--metrics-listen`: `/metrics` alone, for
//! Prometheus). Admin routes are never on the viewer port: a viewer who can reach the sidecar
//! must not list or kick other viewers' sessions.
//!
//! The path of a request: every request enters a router built here. Session API routes
//! (`crate::api`) call the engine; with `--upstream`, every other request is a media request
//! for the enforcing proxy (`crate::proxy`), which asks the engine
//! ([`Engine::authorize_media`]) before forwarding. The engine is the only caller of the store.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::trace::TraceLayer;

use crate::api::{self, MAX_BODY_BYTES};
use crate::clock::SystemClock;
use crate::config::{Config, StoreSpec};
use crate::connections::{self, ConnectionLimits};
use crate::cors::{self, AllowedOrigins};
use crate::engine::{Engine, Policies};
use crate::error::{ApiError, ErrorCode};
use crate::metrics::{HttpLabels, Metrics, method_label};
use crate::policy::PolicySet;
use crate::policy_watch::PolicyWatcher;
use crate::proxy::Proxy;
use crate::store::redis_count::refresh_active_sessions;
use crate::store::{MemoryStore, RedisStore, SessionStore};

/// A sidecar's engine and HTTP application, ready to serve.
#[derive(Clone)]
pub struct Sidecar {
    engine: Engine,
    proxy: Option<Arc<Proxy>>,
    limits: ConnectionLimits,
    cors: AllowedOrigins,
}

impl Sidecar {
    /// A sidecar on the embedded store.
    pub fn in_memory(policies: PolicySet) -> Self {
        Self::with_store(Arc::new(MemoryStore::new()), policies)
    }

    /// A sidecar on `store`.
    pub fn with_store(store: Arc<dyn SessionStore>, policies: PolicySet) -> Self {
        let policies: Policies = Arc::new(ArcSwap::from_pointee(policies));
        Self {
            cors: AllowedOrigins::fixed(Vec::new()).with_policy(policies.clone()),
            engine: Engine::new(store, policies, Arc::new(Metrics::new())),
            proxy: None,
            limits: ConnectionLimits::default(),
        }
    }

    /// Serves with these connection limits instead of the defaults.
    pub fn with_limits(mut self, limits: ConnectionLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Fetches the `jwksUri` key sets of a hand-written ViewerAuthentication with `client`
    /// (e.g. one trusting a private CA). Call before [`Sidecar::with_upstream`].
    pub fn with_jwks_client(mut self, client: reqwest::Client) -> Self {
        self.engine = self.engine.with_jwks_client(client);
        self
    }

    /// Keeps session validation records and pending checks in `ledger` (on a shared store, the
    /// Redis ledger, so that other sidecars take over checks). Call before
    /// [`Sidecar::with_upstream`].
    pub fn with_validation_ledger(
        mut self,
        ledger: Arc<dyn crate::validation::ValidationLedger>,
    ) -> Self {
        self.engine = self.engine.with_validation_ledger(ledger);
        self
    }

    /// Turns on the enforcing proxy in front of `upstream`.
    pub fn with_upstream(mut self, upstream: reqwest::Url) -> Self {
        self.proxy = Some(Proxy::new(self.engine.clone(), upstream));
        self
    }

    /// Lets pages from `origins`, besides those of the namespace policy's `allowedOrigins`,
    /// call the session API and the proxy (CORS).
    pub fn with_cors_origins(mut self, origins: Vec<String>) -> Self {
        self.cors = AllowedOrigins::fixed(origins).with_policy(self.engine.policies().clone());
        self
    }

    /// The enforcing proxy, when on.
    pub fn proxy(&self) -> Option<&Arc<Proxy>> {
        self.proxy.as_ref()
    }

    /// The session engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Shutdown: closes the proxied streams still in flight (counted with reason `shutdown`;
    /// no session is cut). Returns how many.
    pub fn close_streams_for_shutdown(&self) -> usize {
        self.proxy.as_ref().map_or(0, |p| p.close_for_shutdown())
    }

    /// The HTTP application.
    pub fn router(&self) -> Router {
        cors::apply(
            router(self.engine.clone(), self.proxy.clone()),
            self.cors.clone(),
        )
    }

    /// The admin HTTP application (`--admin-listen`): list, get and kick sessions, metrics,
    /// probes. No CORS: pages never call it.
    pub fn admin_router(&self) -> Router {
        admin_router(self.engine.clone())
    }

    /// The metrics HTTP application (`--metrics-listen`): `/metrics` alone.
    pub fn metrics_router(&self) -> Router {
        Router::new()
            .route("/metrics", get(api::metrics))
            .with_state(self.engine.clone())
    }

    /// Starts the background work (store expiry and subscriptions, expiry counting, degraded
    /// write-back, the proxy's revocation follower) on `tasks`; it all ends when `shutdown` is
    /// cancelled, and the owner joins it with `tasks.wait()`.
    pub fn start(&self, tasks: &TaskTracker, shutdown: &CancellationToken) {
        for task in self.engine.background(shutdown.clone()) {
            tasks.spawn(task);
        }
        if let Some(proxy) = &self.proxy {
            tasks.spawn(proxy.clone().follow_revocations(shutdown.clone()));
        }
    }

    /// Starts the background work, serves the viewer port on `listener` until `shutdown`
    /// completes, lets in-flight requests finish, then stops and joins the background work.
    /// Admin routes are not served: see [`Sidecar::serve_on`].
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.serve_on(Listeners::viewer_only(listener), shutdown)
            .await
    }

    /// [`Sidecar::serve`] on every listener given: the viewer port until `shutdown` completes,
    /// the admin and metrics listeners until the viewer port has stopped.
    pub async fn serve_on(
        &self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        self.start(&tasks, &stop);
        self.serve_side_listeners(listeners.admin, listeners.metrics, &tasks, &stop);
        let served =
            connections::serve(listeners.viewer, self.router(), self.limits, shutdown).await;
        stop.cancel();
        tasks.close();
        tasks.wait().await;
        served
    }

    /// Serves the admin and metrics listeners, when given, on `tasks` until `stop`.
    fn serve_side_listeners(
        &self,
        admin: Option<TcpListener>,
        metrics: Option<TcpListener>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) {
        let side = [
            (admin, self.admin_router(), "admin"),
            (metrics, self.metrics_router(), "metrics"),
        ];
        for (listener, app, name) in side {
            let Some(listener) = listener else { continue };
            let stopped = stop.clone().cancelled_owned();
            let limits = self.limits;
            tasks.spawn(async move {
                if let Err(error) = connections::serve(listener, app, limits, stopped).await {
                    tracing::error!(%error, listener = name, "a listener failed");
                }
            });
        }
    }
}

/// The sockets a sidecar serves on.
pub struct Listeners {
    /// The viewer port: `/streaming`, probes, `/openapi.json`, media.
    pub viewer: TcpListener,
    /// The admin listener: sessions of any account, metrics, probes.
    pub admin: Option<TcpListener>,
    /// The metrics listener: `/metrics` alone.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// The viewer port alone.
    pub fn viewer_only(viewer: TcpListener) -> Self {
        Self {
            viewer,
            admin: None,
            metrics: None,
        }
    }
}

/// The sidecar's viewer HTTP application: `/streaming`, the probes, `/openapi.json`, and either
/// the enforcing proxy (every other request is a media request) or a JSON 404.
pub fn router(engine: Engine, proxy: Option<Arc<Proxy>>) -> Router {
    let (routes, doc) = api::routes();
    let routes = with_openapi_document(routes, &doc)
        // Claimed here so that, with the proxy on, they are not forwarded as media either.
        .route("/v1/accounts/{*rest}", any(admin_route_elsewhere))
        .route("/v1/sessions/{*rest}", any(admin_route_elsewhere));
    let fallback_route = if proxy.is_some() {
        "proxy"
    } else {
        "unmatched"
    };
    let routes = match proxy {
        Some(proxy) => routes.fallback_service(
            Router::new()
                .fallback(crate::proxy::forward)
                .with_state(proxy),
        ),
        None => routes.fallback(unknown_route),
    };
    observed(routes, engine, fallback_route)
}

/// The admin HTTP application: list, get and kick sessions of any account, `/metrics`, the
/// probes and its own `/openapi.json`; a JSON 404 for anything else.
pub fn admin_router(engine: Engine) -> Router {
    let (routes, doc) = api::admin_routes();
    let routes = with_openapi_document(routes, &doc).fallback(unknown_route);
    observed(routes, engine, "unmatched")
}

/// Adds `/openapi.json` serving `doc`, JSON 405s, and the body limit of the API's own routes.
fn with_openapi_document(routes: Router<Engine>, doc: &utoipa::openapi::OpenApi) -> Router<Engine> {
    let document = Arc::new(doc.to_json().expect("the OpenAPI document serializes"));
    routes
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
        .route_layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .route_layer(middleware::map_response(json_payload_too_large))
}

/// Request metrics and trace spans around `routes`.
fn observed(routes: Router<Engine>, engine: Engine, fallback_route: &'static str) -> Router {
    routes
        .layer(middleware::from_fn_with_state(
            (engine.metrics().clone(), fallback_route),
            observe,
        ))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                tracing::debug_span!(
                    "request",
                    method = %request.method(),
                    path = %redacted_path(request.uri().path()),
                )
            }),
        )
        .with_state(engine)
}

/// A request path as logs may show it: the query (which carries accounts, stream ids, session
/// ids and playback tokens) is never logged, session ids in the path become fingerprints, and
/// so does the account of an admin route.
pub fn redacted_path(path: &str) -> String {
    let mut previous = "";
    path.split('/')
        .map(|segment| {
            let shown = if crate::validate::is_session_id(segment) || previous == "accounts" {
                crate::engine::fingerprint(segment)
            } else if segment.len() > 64 {
                format!("{}…", segment.get(..64).unwrap_or(segment))
            } else {
                segment.to_string()
            };
            previous = segment;
            shown
        })
        .collect::<Vec<_>>()
        .join("/")
}

async fn admin_route_elsewhere(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!(
        "no route for {method} {} on the viewer port: admin routes are served on the admin listener (--admin-listen)",
        uri.path()
    ))
}

async fn unknown_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::method_not_allowed(format!("method {method} is not allowed on {}", uri.path()))
}

/// tower-http's body limit answers 413 in plain text; the API answers JSON errors.
async fn json_payload_too_large(response: Response) -> Response {
    if response.status() != StatusCode::PAYLOAD_TOO_LARGE {
        return response;
    }
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::InvalidRequest,
        format!(
            "request body too large: the session API takes its input from the URL, bodies are limited to {MAX_BODY_BYTES} bytes"
        ),
    )
    .into_response()
}

/// Records every request's duration by method (folded into a fixed set), route template (or
/// `fallback_route`: `proxy` or `unmatched`) and status. Its state is the metrics alone, not
/// the engine: the state is cloned for every request, and an engine is a dozen shared pointers.
async fn observe(
    State((metrics, fallback_route)): State<(Arc<Metrics>, &'static str)>,
    request: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| fallback_route.to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method,
            route,
            status: response.status().as_u16(),
        })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Runs the sidecar as configured until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let policies = match &config.policy_file {
        Some(path) if config.policy_file_optional && !path.exists() => {
            tracing::warn!(path = %path.display(),
                "policy file not there yet: the built-in default applies until it appears");
            PolicySet::default()
        }
        Some(path) => PolicySet::load(path, &config.namespace)?,
        None => PolicySet::default(),
    };
    let default = policies.default_policy();
    tracing::info!(
        policy = %default.source,
        limit = default.limit,
        ttl_seconds = default.ttl_seconds,
        on_limit_exceeded = ?default.on_limit_exceeded,
        mode = ?default.mode,
        overrides = policies.policies().iter().filter(|p| !p.spec.accounts.is_empty()).count(),
        namespace = %config.namespace,
        "policy loaded"
    );
    let (store, store_name, ledger): (
        Arc<dyn SessionStore>,
        String,
        Arc<dyn crate::validation::ValidationLedger>,
    ) = match StoreSpec::parse(&config.store)? {
        StoreSpec::Memory => {
            let cap = config.max_sessions();
            tracing::info!(max_sessions = cap, "embedded store");
            (
                Arc::new(MemoryStore::with_limits(Arc::new(SystemClock), cap)),
                "memory".to_string(),
                Arc::new(crate::validation::MemoryLedger::default()),
            )
        }
        StoreSpec::Redis(target) => {
            let name = target.to_string();
            (
                Arc::new(
                    RedisStore::new(target.clone(), config.store_timeout)
                        .wait_for_replicas(config.store_wait_replicas),
                ),
                name,
                Arc::new(crate::validation::RedisLedger::new(
                    target,
                    &config.namespace,
                    config.store_timeout,
                )),
            )
        }
    };
    let mut sidecar = Sidecar::with_store(store, policies)
        .with_validation_ledger(ledger)
        .with_cors_origins(config.cors_allowed_origins.clone());
    if let Some(path) = &config.jwks_ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("--jwks-ca-file {}: cannot read", path.display()))?;
        let mut builder = reqwest::Client::builder();
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--jwks-ca-file {}: not PEM certificates", path.display()))?
        {
            builder = builder.add_root_certificate(cert);
        }
        sidecar = sidecar.with_jwks_client(builder.build().context("building the JWKS client")?);
    }
    let playback = sidecar.engine().playback().clone();
    playback.set_bind_network(config.playback_bind_network);
    playback.set_require_token(config.require_playback_token);
    playback.set_playlist_token_max_lifetime_seconds(
        i64::try_from(config.playlist_token_max_lifetime.as_secs()).unwrap_or(i64::MAX),
    );
    match &config.playback_keys_file {
        Some(path) if path.exists() => {
            let ring = crate::playback::KeyRing::load(path)?;
            tracing::info!(path = %path.display(), signing = ring.signing_key_id(),
                keys = ?ring.key_ids().collect::<Vec<_>>(), "playback keys loaded");
            playback.set_keys(ring);
        }
        Some(path) => tracing::warn!(path = %path.display(),
            "playback key file not there yet: a random key signs until it appears; tokens work on this sidecar only"),
        None => tracing::info!(
            "no --playback-keys-file: generated a random playback key; tokens work on this sidecar only, until it restarts"
        ),
    }
    tracing::info!(
        bind_network = config.playback_bind_network,
        require_token = config.require_playback_token,
        "playback tokens"
    );
    if let Some(upstream) = &config.upstream {
        tracing::info!(%upstream, "enforcing proxy on: media requests need an active session");
        sidecar = sidecar.with_upstream(upstream.clone());
    }
    let signalled = shutdown_signal()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", config.listen))?;
    tracing::info!(listen = %listener.local_addr()?, store = %store_name, "serving the session API");
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("--admin-listen {}: cannot bind", config.admin_listen))?;
    tracing::info!(listen = %admin_listener.local_addr()?, "serving the admin API");
    let metrics_listener = TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("--metrics-listen {}: cannot bind", config.metrics_listen))?;
    tracing::info!(listen = %metrics_listener.local_addr()?, "serving /metrics");

    // Every background task runs on `tasks` until `stop` is cancelled, and is joined below.
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    sidecar.start(&tasks, &stop);
    sidecar.serve_side_listeners(Some(admin_listener), Some(metrics_listener), &tasks, &stop);
    // On Redis the fleet-wide live-session count is taken in the background (see redis_count).
    if let StoreSpec::Redis(target) = StoreSpec::parse(&config.store)? {
        tasks.spawn(refresh_active_sessions(
            target,
            sidecar.engine().policies().clone(),
            sidecar.engine().metrics().clone(),
            config.active_sessions_refresh,
            stop.clone(),
        ));
    }
    if let Some(path) = &config.playback_keys_file {
        tasks.spawn(crate::playback::watch_key_file(
            playback.clone(),
            path.clone(),
            config.policy_reload_interval,
            stop.clone(),
        ));
    }
    if let Some(path) = &config.policy_file {
        let watcher = PolicyWatcher::new(
            path.clone(),
            config.namespace.clone(),
            sidecar.engine().policies().clone(),
            sidecar.engine().metrics().clone(),
        );
        tasks.spawn(watcher.run(config.policy_reload_interval, stop.clone()));
    }

    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        signalled.await;
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = stopping_tx.send(());
    };
    let serve = connections::serve(
        listener,
        sidecar.router(),
        config.connection_limits(),
        shutdown,
    );
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => result?,
        () = async {
            let _ = stopping_rx.await;
            tokio::time::sleep(config.shutdown_timeout).await;
        } => {
            tracing::warn!(timeout = ?config.shutdown_timeout, "in-flight requests did not finish in time");
            // Live streams never finish by themselves: close them (sessions are kept), then
            // give their connections a moment to go.
            let closed = sidecar.close_streams_for_shutdown();
            tracing::info!(streams = closed, reason = "shutdown",
                "closed proxied streams for shutdown; their sessions are kept");
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), &mut serve).await;
        }
    }
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed now, before anything is served,
/// so a signal that arrives early is not lost to the default action (exit by signal).
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {},
            _ = interrupt.recv() => {},
        }
    })
}
