//! The sidecar injection webhook: AdmissionReviews over HTTPS in, [`crate::inject::plan`]'s
//! decision out, each decision counted in the metrics.
//!
//! The webhook configuration routes pods of namespaces labelled `streamgate.dev/inject=enabled`
//! to [`INJECT_OPTED_IN_PATH`] and all others to [`INJECT_PATH`] (two webhooks with complementary
//! namespace selectors), so the webhook knows the namespace's opt-in without reading Namespaces.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::certs::{self, SelfIssued, ServingCert};
use crate::config::Config;
use crate::inject::{self, Plan, PodContext, SidecarConfig, SkipReason};
use crate::metrics::Metrics;

/// Path for pods in namespaces that did not opt in (the pod annotation decides).
pub const INJECT_PATH: &str = "/inject";
/// Path for pods in namespaces labelled `streamgate.dev/inject=enabled`.
pub const INJECT_OPTED_IN_PATH: &str = "/inject/namespace-enabled";

/// Metric `decision` labels.
pub mod decisions {
    /// The sidecar was added.
    pub const INJECTED: &str = "injected";
    /// Admitted unchanged; the reason is a [`crate::inject::SkipReason`].
    pub const SKIPPED: &str = "skipped";
    /// Denied: the pod's StreamGate annotations are invalid.
    pub const REJECTED: &str = "rejected";
}
/// Metric `reason` label of injected pods.
pub const REASON_INJECTED: &str = "Injected";
/// Metric `reason` label of rejected pods.
pub const REASON_INVALID_ANNOTATION: &str = "InvalidAnnotation";

/// What the handlers share.
#[derive(Clone)]
pub struct WebhookState {
    /// What to inject.
    pub sidecar: Arc<SidecarConfig>,
    /// Where decisions are counted.
    pub metrics: Arc<Metrics>,
}

/// The webhook's routes.
pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route(
            INJECT_PATH,
            post(
                |State(state): State<WebhookState>, Json(review): Json<AdmissionReview<Pod>>| async move {
                    Json(review_pod(&state, review, false))
                },
            ),
        )
        .route(
            INJECT_OPTED_IN_PATH,
            post(
                |State(state): State<WebhookState>, Json(review): Json<AdmissionReview<Pod>>| async move {
                    Json(review_pod(&state, review, true))
                },
            ),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// Answers one AdmissionReview and counts the decision.
pub fn review_pod(
    state: &WebhookState,
    review: AdmissionReview<Pod>,
    namespace_opted_in: bool,
) -> AdmissionReview<DynamicObject> {
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(error) => {
            tracing::warn!(%error, "malformed AdmissionReview");
            return AdmissionResponse::invalid(error.to_string()).into_review();
        }
    };
    let response = AdmissionResponse::from(&request);
    let namespace = request.namespace.clone().unwrap_or_default();
    let pod_name = request
        .object
        .as_ref()
        .and_then(|pod| {
            pod.metadata
                .name
                .clone()
                .or_else(|| pod.metadata.generate_name.clone())
        })
        .unwrap_or_default();
    let plan = match (&request.operation, &request.object) {
        (Operation::Create, Some(pod)) => inject::plan(
            pod,
            &PodContext {
                namespace: namespace.clone(),
                namespace_opted_in,
            },
            &state.sidecar,
        ),
        _ => Plan::Skip(SkipReason::Unsupported),
    };
    let response = match plan {
        Plan::Inject(patch) => match response.with_patch(patch) {
            Ok(response) => {
                tracing::info!(%namespace, pod = %pod_name, "injected the StreamGate sidecar");
                state
                    .metrics
                    .count_injection(decisions::INJECTED, REASON_INJECTED);
                response
            }
            Err(error) => {
                // Cannot happen with the patches plan() builds; never block the pod over it.
                tracing::error!(%error, "cannot serialize the injection patch");
                AdmissionResponse::from(&request)
            }
        },
        Plan::Skip(reason) => {
            tracing::debug!(%namespace, pod = %pod_name, reason = reason.as_str(), "not injecting");
            state
                .metrics
                .count_injection(decisions::SKIPPED, reason.as_str());
            response
        }
        Plan::Reject(message) => {
            tracing::info!(%namespace, pod = %pod_name, %message, "rejecting a pod with invalid StreamGate annotations");
            state
                .metrics
                .count_injection(decisions::REJECTED, REASON_INVALID_ANNOTATION);
            response.deny(format!("StreamGate sidecar injection: {message}"))
        }
    };
    response.into_review()
}

/// Serves `router` over TLS on `listener` with the certificate in `cert` (swapped in place on
/// renewal: rustls asks the resolver on every handshake), until the returned task is aborted.
///
/// `axum-server` runs the accept loop, the TLS handshakes (with a timeout) and the connections.
pub fn serve(
    listener: TcpListener,
    router: Router,
    cert: Arc<ServingCert>,
) -> anyhow::Result<JoinHandle<()>> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("building the webhook's TLS configuration")?
    .with_no_client_auth()
    .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = RustlsAcceptor::new(RustlsConfig::from_config(Arc::new(tls)));
    let server = axum_server::Server::<SocketAddr>::from_listener(listener)
        .acceptor(acceptor)
        .accept_error_handler(|_: Option<&SocketAddr>, error: &std::io::Error| {
            tracing::warn!(%error, "webhook accept failed")
        });
    Ok(tokio::spawn(async move {
        if let Err(error) = server.serve(router.into_make_service()).await {
            tracing::error!(%error, "the webhook server stopped");
        }
    }))
}

/// The running webhook of an operator process.
pub struct Webhook {
    /// The address served.
    pub addr: SocketAddr,
    /// The served certificate (readiness: loaded or not).
    pub cert: Arc<ServingCert>,
}

/// Starts the webhook as `config` says: validates the injection settings, binds the port, starts
/// the certificate upkeep (self-issued or from a directory) and serving. Fails at once on bad
/// settings or an unusable port; certificate problems are retried in the background.
pub async fn start(
    client: Client,
    config: &Config,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Webhook> {
    let sidecar = config
        .sidecar()
        .map_err(|problem| anyhow::anyhow!("invalid sidecar settings: {problem}"))?;
    let listener = TcpListener::bind(config.webhook_listen)
        .await
        .with_context(|| format!("--webhook-listen {}: cannot bind", config.webhook_listen))?;
    let addr = listener.local_addr()?;
    let cert = Arc::new(ServingCert::default());
    match &config.webhook_cert_dir {
        Some(dir) => {
            certs::load_dir(dir, &cert).context("--webhook-cert-dir")?;
            tokio::spawn(certs::run_from_dir(dir.clone(), cert.clone()));
        }
        None => {
            let settings = SelfIssued {
                namespace: config.namespace.clone(),
                secret: config.webhook_secret.clone(),
                webhook_configuration: config.webhook_configuration.clone(),
                hosts: config.webhook_cert_hosts(),
                validity: config.webhook_cert_validity,
            };
            tokio::spawn(certs::run_self_issued(
                client,
                settings,
                cert.clone(),
                metrics.clone(),
            ));
        }
    }
    let state = WebhookState {
        sidecar: Arc::new(sidecar),
        metrics,
    };
    serve(listener, router(state), cert.clone())?;
    tracing::info!(%addr, "serving the sidecar injection webhook");
    Ok(Webhook { addr, cert })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::{SidecarResources, StoreSource};
    use serde_json::json;

    fn state() -> WebhookState {
        WebhookState {
            sidecar: Arc::new(SidecarConfig {
                operator_namespace: "streamgate-system".into(),
                excluded_namespaces: Default::default(),
                image: "sidecar:test".into(),
                image_pull_policy: "IfNotPresent".into(),
                port: 8080,
                store: StoreSource::Url("memory".into()),
                store_wait_replicas: 0,
                resources: SidecarResources::default(),
                run_as_user: 65532,
                version: "test".into(),
            }),
            metrics: Arc::new(Metrics::new()),
        }
    }

    fn review(namespace: &str, annotations: serde_json::Value) -> AdmissionReview<Pod> {
        serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "0df28fbd-5f5f-4d6a-8b1f-2d0a4e1b9b9b",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": namespace,
                "operation": "CREATE",
                "userInfo": {"username": "admin"},
                "object": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "player", "namespace": namespace, "annotations": annotations},
                    "spec": {"containers": [{"name": "app", "image": "app:1"}]}
                },
                "dryRun": false
            }
        }))
        .unwrap()
    }

    fn response(review: &AdmissionReview<DynamicObject>) -> serde_json::Value {
        serde_json::to_value(review).unwrap()["response"].clone()
    }

    #[test]
    fn the_example_admission_review_gets_a_patch_that_applies() {
        let text = include_str!("../../examples/admission-review.json");
        let review: AdmissionReview<Pod> = serde_json::from_str(text).unwrap();
        let object =
            serde_json::from_str::<serde_json::Value>(text).unwrap()["request"]["object"].clone();
        let answer = response(&review_pod(&state(), review, true));
        assert_eq!(answer["allowed"], true);
        assert_eq!(answer["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        // kube serializes the patch bytes as a JSON array of numbers (the API server accepts it).
        let bytes: Vec<u8> = serde_json::from_value(answer["patch"].clone()).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut pod = object;
        json_patch::patch(&mut pod, &patch).unwrap();
        let sidecar = &pod["spec"]["initContainers"][0];
        assert_eq!(sidecar["name"], inject::SIDECAR_NAME);
        assert!(
            sidecar["env"].as_array().unwrap().iter().any(
                |e| e["name"] == "STREAMGATE_UPSTREAM" && e["value"] == "http://127.0.0.1:9000"
            )
        );
    }

    #[test]
    fn injects_skips_and_rejects_with_counts() {
        let s = state();
        let injected = response(&review_pod(&s, review("shop", json!({})), true));
        assert_eq!(injected["allowed"], true);
        assert_eq!(injected["patchType"], "JSONPatch");
        assert_eq!(injected["uid"], "0df28fbd-5f5f-4d6a-8b1f-2d0a4e1b9b9b");

        let skipped = response(&review_pod(&s, review("shop", json!({})), false));
        assert_eq!(skipped["allowed"], true);
        assert!(skipped.get("patch").is_none());

        let rejected = response(&review_pod(
            &s,
            review("shop", json!({"streamgate.dev/upstream-port": "x"})),
            true,
        ));
        assert_eq!(rejected["allowed"], false);
        assert!(
            rejected["status"]["message"]
                .as_str()
                .unwrap()
                .contains("streamgate.dev/upstream-port")
        );

        // Anything but a Pod CREATE is admitted unchanged and counted.
        let mut update = review("shop", json!({}));
        update.request.as_mut().unwrap().operation = Operation::Update;
        let unsupported = response(&review_pod(&s, update, true));
        assert_eq!(unsupported["allowed"], true);
        assert!(unsupported.get("patch").is_none());

        let m = &s.metrics;
        assert_eq!(m.injection_count("skipped", "Unsupported"), 1);
        assert_eq!(m.injection_count("injected", "Injected"), 1);
        assert_eq!(m.injection_count("skipped", "NotOptedIn"), 1);
        assert_eq!(m.injection_count("rejected", "InvalidAnnotation"), 1);
        assert!(m.render().contains(
            "streamgate_operator_injections_total{decision=\"skipped\",reason=\"NotOptedIn\"} 1"
        ));
    }
}
