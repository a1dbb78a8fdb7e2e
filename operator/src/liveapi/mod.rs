//! Live sessions as a Kubernetes API: `live.streamgate.dev/v1alpha1` `streamingsessions`,
//! served to the API server's aggregation layer (registered by an `APIService`).
//!
//! Every request on the resource is authenticated by the front proxy ([`auth`]) and authorized
//! by a SubjectAccessReview; discovery and OpenAPI documents are public, as the API server's own
//! are to any authenticated user. Sessions come from the session store the namespace's sidecars
//! use ([`sessions`]); answers are `metav1.Status` JSON on error.

pub mod active;
pub mod auth;
pub mod object;
pub mod sessions;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use axum_server::tls::TlsInfo;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::RwLock;
use tokio::task::JoinHandle;

use crate::certs::{self, ServingCert};
use crate::crd::StreamingPolicy;
use auth::{FrontProxyVerifier, RequestHeaderConfig, UserInfo, Verb};
use object::{GROUP_VERSION, LiveSession, RESOURCE, Representation};
use sessions::{Kick, Sessions, SessionsResolver};

/// Name of the APIService the chart registers.
pub const API_SERVICE: &str = "v1alpha1.live.streamgate.dev";

/// Largest page a list returns, whatever `limit` asks.
const MAX_PAGE: usize = 500;

/// How often the front-proxy settings are re-read (the API server rotates its CA rarely).
const AUTH_RELOAD: Duration = Duration::from_secs(60);

/// What the handlers share.
#[derive(Clone)]
pub struct LiveApi {
    client: Client,
    requestheader: Arc<RwLock<Option<RequestHeaderConfig>>>,
    verifier: Arc<FrontProxyVerifier>,
    sessions: Arc<dyn SessionsResolver>,
}

impl LiveApi {
    /// A live API answering from `sessions`, authenticating with the cluster's front-proxy
    /// settings (loaded by [`LiveApi::start_auth_reload`]).
    pub fn new(client: Client, sessions: Arc<dyn SessionsResolver>) -> Self {
        Self {
            client,
            requestheader: Arc::new(RwLock::new(None)),
            verifier: Arc::new(FrontProxyVerifier::default()),
            sessions,
        }
    }

    /// Loads the front-proxy settings now (error if impossible) and keeps reloading them.
    pub async fn start_auth_reload(&self) -> anyhow::Result<JoinHandle<()>> {
        self.reload_auth().await?;
        let this = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                tokio::time::sleep(AUTH_RELOAD).await;
                if let Err(error) = this.reload_auth().await {
                    tracing::warn!("live API authentication settings: {error:#}");
                }
            }
        }))
    }

    async fn reload_auth(&self) -> anyhow::Result<()> {
        let config = RequestHeaderConfig::load(&self.client).await?;
        self.verifier
            .set_ca(&config.client_ca_pem)
            .context("the requestheader client CA")?;
        *self.requestheader.write().await = Some(config);
        Ok(())
    }

    /// The routes.
    pub fn router(&self) -> Router {
        let base = format!("/apis/{GROUP_VERSION}");
        Router::new()
            .route("/apis", get(|| async { Json(object::api_group_list()) }))
            .route(
                &format!("/apis/{}", object::GROUP),
                get(|| async { Json(object::api_group()) }),
            )
            .route(&base, get(|| async { Json(object::api_resource_list()) }))
            .route(
                "/openapi/v3",
                get(|| async { Json(object::openapi_v3_index()) }),
            )
            .route(
                &format!("/openapi/v3/apis/{GROUP_VERSION}"),
                get(|| async { Json(object::openapi_v3_document()) }),
            )
            .route(
                &format!("{base}/{RESOURCE}"),
                get(|| async {
                    failure(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "streamingsessions are listed per namespace (each namespace's sidecars \
                         have their own session store): use -n NAMESPACE",
                        None,
                    )
                }),
            )
            .route(
                &format!("{base}/namespaces/{{namespace}}/{RESOURCE}"),
                get(list),
            )
            .route(
                &format!("{base}/namespaces/{{namespace}}/{RESOURCE}/{{name}}"),
                get(get_one).delete(delete_one),
            )
            .fallback(|| async { failure(StatusCode::NOT_FOUND, "NotFound", "not found", None) })
            .with_state(self.clone())
    }

    /// Serves the API over TLS on `listener` with `cert` (the operator's serving certificate),
    /// asking clients for a certificate the front-proxy CA signed.
    pub fn serve(
        &self,
        listener: TcpListener,
        cert: Arc<ServingCert>,
    ) -> anyhow::Result<JoinHandle<()>> {
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("building the live API's TLS configuration")?
        .with_client_cert_verifier(self.verifier.clone())
        .with_cert_resolver(cert);
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = RustlsAcceptor::new(RustlsConfig::from_config(Arc::new(tls)));
        let server = axum_server::Server::<SocketAddr>::from_listener(listener)
            .acceptor(acceptor)
            .accept_error_handler(|_: Option<&SocketAddr>, error: &std::io::Error| {
                tracing::debug!(%error, "live API accept failed")
            });
        let router = self.router();
        Ok(tokio::spawn(async move {
            if let Err(error) = server.serve(router.into_make_service()).await {
                tracing::error!(%error, "the live API server stopped");
            }
        }))
    }

    /// The caller, if the connection's certificate is the front proxy's and it names a user.
    async fn authenticate(
        &self,
        tls: Option<&TlsInfo>,
        headers: &HeaderMap,
    ) -> Result<UserInfo, Response> {
        let unauthorized =
            |message: &str| failure(StatusCode::UNAUTHORIZED, "Unauthorized", message, None);
        let config = self.requestheader.read().await.clone().ok_or_else(|| {
            unauthorized(
                "the front-proxy settings (extension-apiserver-authentication) are not loaded yet",
            )
        })?;
        // rustls verified any certificate present against the front-proxy CA.
        let cert = tls
            .and_then(|t| t.peer_certificates.first())
            .ok_or_else(|| {
                unauthorized(
                    "no front-proxy client certificate: call through the Kubernetes API server",
                )
            })?;
        let name = auth::common_name(cert.as_ref()).unwrap_or_default();
        if !config.allowed_names.is_empty() && !config.allowed_names.contains(&name) {
            return Err(unauthorized(&format!(
                "client certificate {name:?} is not among requestheader-allowed-names"
            )));
        }
        config
            .user(headers)
            .ok_or_else(|| unauthorized("the request names no user"))
    }

    /// Authenticates, authorizes `verb` and finds the namespace's sessions.
    async fn admit(
        &self,
        tls: Option<&TlsInfo>,
        headers: &HeaderMap,
        verb: Verb,
        namespace: &str,
        name: Option<&str>,
    ) -> Result<Arc<dyn Sessions>, Response> {
        let user = self.authenticate(tls, headers).await?;
        match auth::authorize(&self.client, &user, verb, namespace, name).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                let target = match name {
                    Some(name) => format!("streamingsessions.live.streamgate.dev {name:?}"),
                    None => "streamingsessions.live.streamgate.dev".into(),
                };
                return Err(failure(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &format!(
                        "{target} is forbidden: User {:?} cannot {} resource \"streamingsessions\" \
                         in API group \"live.streamgate.dev\" in the namespace {namespace:?}",
                        user.username,
                        verb.as_str()
                    ),
                    name,
                ));
            }
            Err(error) => {
                return Err(failure(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    &format!("cannot ask the API server for authorization: {error}"),
                    name,
                ));
            }
        }
        if verb == Verb::Watch {
            return Err(failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "watch is not supported on streamingsessions: list again (kubectl get) to see changes",
                None,
            ));
        }
        self.sessions
            .for_namespace(namespace)
            .await
            .map_err(|problem| failure(problem.code, problem.reason, &problem.message, None))
    }

    /// Fills in the policy of each session from the namespace's StreamingPolicies.
    async fn with_policies(&self, namespace: &str, sessions: &mut [LiveSession]) {
        let Ok(policies) = Api::<StreamingPolicy>::namespaced(self.client.clone(), namespace)
            .list(&Default::default())
            .await
        else {
            return; // The column shows <unknown>; the sessions are still worth answering.
        };
        let set = policy_set(&policies.items);
        for session in sessions {
            session.policy = Some(set.resolve(&session.account).source.clone());
        }
    }
}

/// Fills in the validation state of each session from the sidecars' validation records (one
/// round trip for the page).
async fn with_validation(sessions: &dyn Sessions, namespace: &str, items: &mut [LiveSession]) {
    let ids: Vec<String> = items.iter().map(|s| s.id.clone()).collect();
    match sessions.validation(namespace, &ids).await {
        Ok(states) => {
            for (session, state) in items.iter_mut().zip(states) {
                session.validation = state;
            }
        }
        // The sessions are still worth answering; the column shows <none>.
        Err(error) => tracing::warn!(%namespace, %error, "cannot read validation records"),
    }
}

/// The namespace's policies as the sidecars resolve them.
pub fn policy_set(policies: &[StreamingPolicy]) -> streamgate_policy::PolicySet {
    streamgate_policy::PolicySet::from_policies(
        policies
            .iter()
            .filter_map(|p| {
                Some(streamgate_policy::NamedPolicy {
                    name: p.metadata.name.clone()?,
                    spec: p.spec.policy.clone(),
                })
            })
            .collect(),
    )
}

/// A `metav1.Status` error response.
pub fn failure(code: StatusCode, reason: &str, message: &str, name: Option<&str>) -> Response {
    (
        code,
        Json(object::status(code.as_u16(), reason, message, name)),
    )
        .into_response()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn store_failure(error: sessions::SourceError) -> Response {
    failure(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        &format!("the session store did not answer: {error}"),
        None,
    )
}

/// Continue tokens are the last id of the page, opaque to clients.
fn encode_continue(id: &str) -> String {
    format!("sgs-{id}")
}

fn decode_continue(token: &str) -> Option<&str> {
    token
        .strip_prefix("sgs-")
        .filter(|id| id.bytes().all(|b| b.is_ascii_hexdigit()))
}

async fn list(
    State(api): State<LiveApi>,
    tls: Option<Extension<Arc<TlsInfo>>>,
    Path(namespace): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = if watch { Verb::Watch } else { Verb::List };
    let tls = tls.map(|Extension(t)| t);
    let sessions = match api
        .admit(tls.as_deref(), &headers, verb, &namespace, None)
        .await
    {
        Ok(sessions) => sessions,
        Err(response) => return response,
    };
    if query.get("labelSelector").is_some_and(|s| !s.is_empty()) {
        return failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "streamingsessions carry no labels: select with --field-selector spec.account=ID",
            None,
        );
    }
    let account =
        match object::account_selector(query.get("fieldSelector").map_or("", String::as_str)) {
            Ok(account) => account,
            Err(problem) => return failure(StatusCode::BAD_REQUEST, "BadRequest", &problem, None),
        };
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .map_or(MAX_PAGE, |l| l.min(MAX_PAGE));
    let after = match query.get("continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(token) => match decode_continue(token) {
            Some(id) => Some(id.to_string()),
            None => {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "invalid continue token",
                    None,
                );
            }
        },
    };
    let page = match &account {
        // One account's sessions are few (its limit): one page.
        Some(account) => sessions
            .of_account(account)
            .await
            .map(|items| (items, None)),
        None => sessions.page(after.as_deref(), limit).await,
    };
    let (mut items, last) = match page {
        Ok(page) => page,
        Err(error) => return store_failure(error),
    };
    api.with_policies(&namespace, &mut items).await;
    with_validation(sessions.as_ref(), &namespace, &mut items).await;
    let token = last.as_deref().map(encode_continue);
    let body =
        match object::representation(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok())) {
            Representation::Table => {
                object::to_table(&items, &namespace, token.as_deref(), now_ms())
            }
            Representation::Objects => object::to_list(&items, &namespace, token.as_deref()),
        };
    Json(body).into_response()
}

fn respond_one(session: &LiveSession, namespace: &str, headers: &HeaderMap) -> Response {
    let body: Value =
        match object::representation(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok())) {
            Representation::Table => {
                object::to_table(std::slice::from_ref(session), namespace, None, now_ms())
            }
            Representation::Objects => object::to_object(session, namespace),
        };
    Json(body).into_response()
}

fn not_found(name: &str, detail: &str) -> Response {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("streamingsessions.live.streamgate.dev {name:?} not found{detail}"),
        Some(name),
    )
}

async fn get_one(
    State(api): State<LiveApi>,
    tls: Option<Extension<Arc<TlsInfo>>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let tls = tls.map(|Extension(t)| t);
    let sessions = match api
        .admit(tls.as_deref(), &headers, Verb::Get, &namespace, Some(&name))
        .await
    {
        Ok(sessions) => sessions,
        Err(response) => return response,
    };
    match sessions.get(&name).await {
        Ok(Some(session)) if session.state == "active" => {
            let mut one = [session];
            api.with_policies(&namespace, &mut one).await;
            with_validation(sessions.as_ref(), &namespace, &mut one).await;
            respond_one(&one[0], &namespace, &headers)
        }
        Ok(Some(session)) => not_found(
            &name,
            &format!(" (it ended: {})", session.reason.unwrap_or(session.state)),
        ),
        Ok(None) => not_found(&name, ""),
        Err(error) => store_failure(error),
    }
}

async fn delete_one(
    State(api): State<LiveApi>,
    tls: Option<Extension<Arc<TlsInfo>>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let tls = tls.map(|Extension(t)| t);
    let sessions = match api
        .admit(
            tls.as_deref(),
            &headers,
            Verb::Delete,
            &namespace,
            Some(&name),
        )
        .await
    {
        Ok(sessions) => sessions,
        Err(response) => return response,
    };
    match sessions.kick(&name).await {
        Ok(Kick::Kicked(session)) => {
            tracing::info!(%namespace, session = %name, account = %session.account, "kicked through the live API");
            Json(object::to_object(&session, &namespace)).into_response()
        }
        Ok(Kick::AlreadyGone(session)) => not_found(
            &name,
            &format!(" (it ended: {})", session.reason.unwrap_or(session.state)),
        ),
        Ok(Kick::NotFound) => not_found(&name, ""),
        Err(error) => store_failure(error),
    }
}

/// Where namespaces' sessions are, from the operator's sidecar store flags.
pub fn resolver(
    client: Client,
    config: &crate::config::Config,
) -> anyhow::Result<Arc<dyn SessionsResolver>> {
    let store = config
        .sidecar()
        .map_err(|problem| anyhow::anyhow!("invalid sidecar settings: {problem}"))?
        .store;
    Ok(Arc::new(sessions::StoreResolver::new(
        client,
        store,
        Box::new(sessions::StoreSessions::connect),
    )))
}

/// Starts the live API as `config` says on `listen`: front-proxy settings (retried in the
/// background until readable), the namespace-to-store resolution from the sidecar store flags,
/// serving, and (self-issued certificate mode) the APIService's caBundle.
pub async fn start(
    client: Client,
    config: &crate::config::Config,
    listen: SocketAddr,
    cert: Arc<ServingCert>,
) -> anyhow::Result<SocketAddr> {
    let api = LiveApi::new(client.clone(), resolver(client.clone(), config)?);
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("--live-api-listen {listen}: cannot bind"))?;
    let addr = listener.local_addr()?;
    let loading = api.clone();
    tokio::spawn(async move {
        // Until the settings load, resource requests answer 401 saying so.
        while let Err(error) = loading.start_auth_reload().await {
            tracing::warn!("live API authentication settings: {error:#}");
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
    api.serve(listener, cert)?;
    if config.webhook_cert_dir.is_none() {
        tokio::spawn(run_ca_bundle_sync(
            client,
            config.namespace.clone(),
            config.webhook_secret.clone(),
            config.live_api_service.clone(),
        ));
    }
    tracing::info!(%addr, "serving the live-session API");
    Ok(addr)
}

/// Keeps the APIService's caBundle equal to the CA of the operator's self-issued certificate
/// (the Secret the webhook's certificate upkeep writes), checking every minute.
pub async fn run_ca_bundle_sync(
    client: Client,
    namespace: String,
    secret: String,
    api_service: String,
) {
    loop {
        let wait = match sync_ca_bundle_once(&client, &namespace, &secret, &api_service).await {
            Ok(()) => Duration::from_secs(60),
            Err(error) => {
                tracing::warn!("APIService {api_service} caBundle: {error:#}");
                Duration::from_secs(2)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

async fn sync_ca_bundle_once(
    client: &Client,
    namespace: &str,
    secret: &str,
    api_service: &str,
) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
    let stored = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(secret)
        .await
        .with_context(|| format!("cannot read Secret {namespace}/{secret}"))?;
    let material = certs::from_secret(&stored)
        .with_context(|| format!("Secret {namespace}/{secret} holds no certificate yet"))?;
    let bundle = material.ca_bundle();
    let api: Api<APIService> = Api::all(client.clone());
    let current = api
        .get(api_service)
        .await
        .with_context(|| format!("cannot read APIService {api_service}"))?;
    let wanted = k8s_openapi::ByteString(bundle.into_bytes());
    if current.spec.and_then(|s| s.ca_bundle).as_ref() == Some(&wanted) {
        return Ok(());
    }
    let patch = json!({"spec": {"caBundle": wanted}});
    api.patch(api_service, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("cannot patch the caBundle of APIService {api_service}"))?;
    tracing::info!(api_service, "patched the APIService caBundle");
    Ok(())
}
