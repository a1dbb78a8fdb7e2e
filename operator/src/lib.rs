//! StreamGate operator library: the StreamingPolicy CRD, its reconciler and the injection webhook.
//!
//! The binary `streamgate-operator` is a thin wrapper over [`run`].
#![forbid(unsafe_code)]

pub mod census;
pub mod certs;
pub mod config;
pub mod crd;
pub mod inject;
pub mod liveapi;
pub mod metrics;
pub mod playback_keys;
pub mod reconcile;
pub mod render;
pub mod validator_health;
pub mod viewer_auth;
pub mod webhook;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::ListParams;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use kube_lease_manager::LeaseManagerBuilder;

use crate::config::Config;
use crate::crd::{StreamingPolicy, ViewerAuthentication};
use crate::metrics::Metrics;
use crate::reconcile::{Context, MANAGED_BY, MANAGED_BY_LABEL, error_policy, reconcile};
use crate::render::CONFIGMAP_NAME;

/// Fails with instructions when the StreamingPolicy CRD is not installed.
pub async fn check_crd_installed(client: &Client) -> anyhow::Result<()> {
    let api: Api<StreamingPolicy> = Api::all(client.clone());
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => anyhow::bail!(
            "the StreamingPolicy CRD (streamingpolicies.streamgate.dev) is not installed in this cluster; \
             install it with `kubectl apply -f crds/streamingpolicy.yaml` or with the StreamGate Helm chart"
        ),
        Err(error) => Err(error).context("cannot list StreamingPolicies"),
    }
}

/// Runs the controller until it stops (SIGTERM/SIGINT): one reconcile per namespace, triggered
/// by its StreamingPolicies and its `streamgate-policies` ConfigMap, reading both from reflector
/// caches; plus the census of opted-in pods without the sidecar. `excluded_namespaces` are
/// never injected (the webhook's exclusions) and so never counted.
pub async fn run_controller(
    client: Client,
    metrics: Arc<Metrics>,
    excluded_namespaces: BTreeSet<String>,
) {
    run_controller_with(
        client,
        metrics,
        excluded_namespaces,
        reqwest::Client::new(),
        streamgate_policy::playback_keys::RotationSchedule::default(),
    )
    .await
}

/// [`run_controller`], fetching ViewerAuthentication `jwksUri` key sets with `jwks_client`
/// (e.g. one that also trusts a private CA, `--jwks-ca-file`), and rotating each namespace's
/// playback keys on `playback_key_schedule`.
pub async fn run_controller_with(
    client: Client,
    metrics: Arc<Metrics>,
    excluded_namespaces: BTreeSet<String>,
    jwks_client: reqwest::Client,
    playback_key_schedule: streamgate_policy::playback_keys::RotationSchedule,
) {
    let (policy_cache, policy_writer) = reflector::store::<StreamingPolicy>();
    let (auth_cache, mut auth_writer) = reflector::store::<ViewerAuthentication>();
    // Without the ViewerAuthentication CRD (an older install) there can be none: an empty,
    // listed cache, so policies keep being rendered. Installing the CRD later needs a restart.
    let auth_events = match Api::<ViewerAuthentication>::all(client.clone())
        .list_metadata(&ListParams::default().limit(1))
        .await
    {
        Err(kube::Error::Api(status)) if status.code == 404 => {
            tracing::warn!(
                "the ViewerAuthentication CRD is not installed: viewer identity is off until it is and the operator restarts"
            );
            auth_writer.apply_watcher_event(&watcher::Event::Init);
            auth_writer.apply_watcher_event(&watcher::Event::InitDone);
            futures::stream::pending().boxed()
        }
        _ => watcher(
            Api::<ViewerAuthentication>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(auth_writer)
        .touched_objects()
        .boxed(),
    };
    let (config_map_cache, config_map_writer) = reflector::store::<ConfigMap>();
    let policy_events = watcher(
        Api::<StreamingPolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(policy_writer)
    .touched_objects();
    // Only the operator's own ConfigMaps, by name and label: the RBAC grants nothing else.
    let config_map_events = watcher(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default()
            .fields(&format!("metadata.name={CONFIGMAP_NAME}"))
            .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")),
    )
    .default_backoff()
    .reflect(config_map_writer)
    .touched_objects();

    let context = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "streamgate-operator".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        client: client.clone(),
        metrics: metrics.clone(),
        policies: policy_cache,
        config_maps: config_map_cache,
        viewer_auths: auth_cache,
        jwks: Arc::new(viewer_auth::JwksCache::new(jwks_client)),
        playback_keys: Some(playback_key_schedule),
    });
    // `watches_stream` (kube's unstable stream control) is what lets the caches above be the
    // reconciler's and the trigger's at once, instead of a second watch per kind.
    let controller = Controller::new(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches_stream(policy_events, |policy| namespace_of(&policy))
    .watches_stream(config_map_events, |config_map| namespace_of(&config_map))
    .watches_stream(auth_events, |va| namespace_of(&va));
    let namespaces = controller.store();
    let census = async move {
        census::run(client, namespaces, excluded_namespaces, metrics).await;
        // Only ends when its caches are gone, i.e. on shutdown: never stop the controller for it.
        std::future::pending::<()>().await
    };
    let reconciling = controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((namespace, _)) => tracing::debug!(namespace = %namespace.name, "reconciled"),
                // Reconcile failures are logged by error_policy; watch failures only here.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                Err(error) => tracing::warn!(%error, "controller error"),
            }
        });
    tokio::select! {
        () = reconciling => {}
        () = census => {}
    }
}

fn namespace_of<K: Resource>(object: &K) -> Option<ObjectRef<Namespace>> {
    object.meta().namespace.as_deref().map(ObjectRef::new)
}

#[derive(Clone)]
struct Health {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    /// The webhook's certificate, when this process serves the webhook: not ready until loaded.
    webhook_cert: Option<Arc<certs::ServingCert>>,
}

fn health_router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(h): State<Health>| async move {
                if h.webhook_cert.as_ref().is_some_and(|c| !c.is_loaded()) {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no webhook certificate yet",
                    )
                } else if h.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(h): State<Health>| async move { h.metrics.render() }),
        )
        .with_state(health)
}

/// Runs the operator as configured: health and metrics endpoints, the injection webhook (on
/// every replica), leader election, and the controller while this replica leads.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let client = Client::try_default().await.context(
        "cannot configure a Kubernetes client (in-cluster service account or KUBECONFIG)",
    )?;
    check_crd_installed(&client).await?;
    let jwks_client = config::jwks_client(config.jwks_ca_file.as_deref())?;

    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    // Every replica serves the webhook, leader or not: the API server calls any of them.
    let webhook_cert = if config.webhook {
        Some(
            webhook::start(client.clone(), &config, metrics.clone())
                .await?
                .cert,
        )
    } else {
        None
    };
    if let Some(listen) = config.live_api_listen {
        let cert = webhook_cert.clone().context(
            "--live-api-listen serves with the webhook's certificate: it needs --webhook true",
        )?;
        liveapi::start(client.clone(), &config, listen, cert).await?;
    }
    let listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("--metrics-listen {}: cannot bind", config.metrics_listen))?;
    // With port 0 the kernel picks the port: say which, so a supervisor (or a test) can find it.
    tracing::info!(addr = %listener.local_addr()?, "serving health and metrics");
    let app = health_router(Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
        webhook_cert,
    });
    tokio::spawn(async move { axum::serve(listener, app).await });

    let identity = config
        .identity
        .clone()
        .unwrap_or_else(|| format!("streamgate-operator-{:08x}", rand::random::<u32>()));
    let lease_seconds = config.lease_duration.as_secs().max(2);
    let manager = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
        .with_namespace(&config.namespace)
        .with_identity(&identity)
        .with_duration(lease_seconds)
        .with_grace((lease_seconds / 3).max(1))
        .build()
        .await
        .context("cannot set up leader election")?;
    let (mut leading, lease_task) = manager.watch().await;
    ready.store(true, Ordering::Relaxed);
    tracing::info!(%identity, lease = %config.lease_name, namespace = %config.namespace, "waiting to lead");
    while !*leading.borrow_and_update() {
        tokio::select! {
            changed = leading.changed() => changed.context("leader election stopped")?,
            () = shutdown_signal() => return Ok(()),
        }
    }
    tracing::info!(%identity, "leading: starting the controller");
    metrics.leader.set(1);
    // The ACTIVE column of StreamingPolicies, counted from the sidecars' stores, and their
    // ValidatorsHealthy condition, read from the same stores.
    let resolver = liveapi::resolver(client.clone(), &config)?;
    let counting = liveapi::active::run(client.clone(), resolver, liveapi::active::INTERVAL);
    let result = tokio::select! {
        () = run_controller_with(
            client,
            metrics.clone(),
            config.excluded_namespaces(),
            jwks_client,
            config.playback_key_schedule(),
        ) => Ok(()),
        () = counting => Ok(()),
        () = async {
            loop {
                if leading.changed().await.is_err() || !*leading.borrow() {
                    return;
                }
            }
        } => {
            // Another replica may already be reconciling: stop at once and let the
            // Deployment restart us as a standby.
            Err(anyhow::anyhow!("lost the leader Lease"))
        }
    };
    metrics.leader.set(0);
    drop(leading); // closing the channel makes the lease task release the Lease
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), lease_task).await;
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
