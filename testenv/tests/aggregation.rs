//! The aggregation mode of the test control plane: the API server proxies an APIService to a
//! server of the test, through the network namespace, with the front-proxy headers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;
use streamgate_testenv::{
    ControlPlane, EXTENSION_ADDRESS, FIELD_MANAGER, FRONT_PROXY_CLIENT, HttpsServer,
    create_namespace, point_service_at, wait_until,
};

/// Applies a manifest given as JSON with the admin client.
async fn apply(client: &kube::Client, manifest: serde_json::Value) -> Result<()> {
    let object: DynamicObject = serde_json::from_value(manifest)?;
    let types = object
        .types
        .clone()
        .context("manifest without apiVersion/kind")?;
    let gvk = GroupVersionKind::try_from(&types)?;
    let lower = gvk.kind.to_lowercase();
    let plural = if lower.ends_with('s') {
        lower
    } else {
        format!("{lower}s")
    };
    let resource = ApiResource::from_gvk_with_plural(&gvk, &plural);
    let api: Api<DynamicObject> = match &object.metadata.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let name = object
        .metadata
        .name
        .clone()
        .context("manifest without a name")?;
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&object),
    )
    .await
    .with_context(|| format!("applying {} {name}", gvk.kind))?;
    Ok(())
}

// Multi-threaded: the test server keeps serving while kubectl blocks a thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apiservice_reaches_the_test_server_with_the_front_proxy_user() -> Result<()> {
    let cp = ControlPlane::start_aggregated().await?;
    let netns = cp
        .netns()
        .context("aggregation mode has a network namespace")?
        .to_string();
    let client = cp.client().await?;

    // The API server publishes the front-proxy settings extension servers read.
    let auth = Api::<ConfigMap>::namespaced(client.clone(), "kube-system")
        .get("extension-apiserver-authentication")
        .await?;
    let data = auth.data.unwrap_or_default();
    ensure!(
        data.get("requestheader-allowed-names")
            .is_some_and(|n| n.contains(FRONT_PROXY_CLIENT)),
        "requestheader-allowed-names: {data:?}"
    );
    ensure!(data.contains_key("requestheader-client-ca-file"));

    let seen_users = Arc::new(Mutex::new(Vec::<String>::new()));
    let router = axum::Router::new()
        .route(
            "/apis/testenv.streamgate.dev/v1",
            get(
                |State(seen): State<Arc<Mutex<Vec<String>>>>, headers: HeaderMap| async move {
                    if let Some(user) = headers.get("x-remote-user") {
                        seen.lock()
                            .unwrap()
                            .push(user.to_str().unwrap_or("").to_string());
                    }
                    Json(json!({
                        "kind": "APIResourceList",
                        "apiVersion": "v1",
                        "groupVersion": "testenv.streamgate.dev/v1",
                        "resources": [],
                    }))
                },
            ),
        )
        .with_state(seen_users.clone());
    let server = HttpsServer::start(router).await?;
    let exposed = cp.expose(server.addr().port()).await?;
    assert_eq!(exposed.ip(), EXTENSION_ADDRESS);

    let ns = create_namespace(&client, "aggregation", &[]).await?;
    apply(
        &client,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "ext", "namespace": ns},
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": exposed.port()}]},
        }),
    )
    .await?;
    point_service_at(&client, &ns, "ext", "https", exposed).await?;
    apply(
        &client,
        json!({
            "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
            "metadata": {"name": "v1.testenv.streamgate.dev"},
            "spec": {"group": "testenv.streamgate.dev", "version": "v1",
                     "service": {"name": "ext", "namespace": ns, "port": 443},
                     "insecureSkipTLSVerify": true,
                     "groupPriorityMinimum": 1000, "versionPriority": 15},
        }),
    )
    .await?;

    let kubectl = cp.binaries().kubectl.clone();
    let kubeconfig = cp.kubeconfig_path().to_path_buf();
    wait_until(Duration::from_secs(60), "APIService Available", || {
        let (kubectl, kubeconfig) = (kubectl.clone(), kubeconfig.clone());
        async move {
            let out = std::process::Command::new(&kubectl)
                .env("KUBECONFIG", &kubeconfig)
                .args([
                    "get",
                    "apiservice",
                    "v1.testenv.streamgate.dev",
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Available\")].status}",
                ])
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout).trim() == "True")
        }
    })
    .await
    .with_context(|| cp.apiserver_log_tail())?;

    // A request through the aggregator arrives with the caller in the front-proxy header. The
    // proxy learns of availability a moment after the status says so: retry until it answers.
    wait_until(
        Duration::from_secs(30),
        "the aggregated group to answer",
        || {
            let (kubectl, kubeconfig) = (kubectl.clone(), kubeconfig.clone());
            async move {
                let out = std::process::Command::new(&kubectl)
                    .env("KUBECONFIG", &kubeconfig)
                    .args(["get", "--raw", "/apis/testenv.streamgate.dev/v1"])
                    .output()?;
                ensure!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok(String::from_utf8_lossy(&out.stdout).contains("testenv.streamgate.dev/v1"))
            }
        },
    )
    .await
    .with_context(|| cp.apiserver_log_tail())?;
    ensure!(
        seen_users.lock().unwrap().iter().any(|u| u == "admin"),
        "users seen: {:?}",
        seen_users.lock().unwrap()
    );

    // Stopping removes the network namespace.
    let dir = cp.dir().to_path_buf();
    cp.stop();
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    ensure!(
        !String::from_utf8_lossy(&list.stdout).contains(&netns),
        "network namespace {netns} left behind"
    );
    ensure!(!dir.exists(), "{} left behind", dir.display());
    Ok(())
}
