//! A real Kubernetes control plane for StreamGate's integration tests.
//!
//! `testenv/build` builds kube-apiserver, etcd and helm from Go modules into a cache; this crate
//! starts etcd + kube-apiserver from there on free loopback ports with generated certificates
//! and hands tests a [`kube::Client`] and a kubeconfig file for kubectl and helm.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! let cp = streamgate_testenv::shared().await?; // one control plane per test binary
//! let client = cp.client().await?; // one client per test
//! let ns = streamgate_testenv::create_namespace(&client, "my-test", &[]).await?;
//! let status = cp.kubectl().args(["get", "pods", "-n", &ns]).status()?;
//! # Ok(()) }
//! ```
//!
//! There is no kube-controller-manager and no kubelet: namespaces never finish deleting and pods
//! stay Pending, so tests isolate themselves in fresh namespaces rather than cleaning up.
//!
//! [`Node`] (and [`shared_node`]) is the other mode: a real single-node cluster (kubelet,
//! containerd, kube-proxy, controller-manager, scheduler, CoreDNS) run by `testenv/node-run`
//! inside a network namespace of its own, where pods run for real.

#![warn(missing_docs)]

mod binaries;
mod certs;
mod control_plane;
mod https;
mod node;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::Deserialize;

pub use binaries::{Binaries, Versions};
pub use certs::{Ca, CertPair};
pub use control_plane::{ControlPlane, EXTENSION_ADDRESS, FRONT_PROXY_CLIENT};
pub use https::HttpsServer;
pub use node::{Node, NodeImages, shared_node};

/// The field manager this crate applies objects with.
pub const FIELD_MANAGER: &str = "streamgate-testenv";

static SHARED: tokio::sync::OnceCell<std::result::Result<ControlPlane, String>> =
    tokio::sync::OnceCell::const_new();

/// The control plane shared by every test in this test binary, started on first use.
///
/// It is never dropped (Rust has no teardown for statics); a watchdog process stops it and
/// removes its files when the test binary exits. If it cannot start, every caller gets the
/// reason as an error, so tests fail rather than skip.
pub async fn shared() -> Result<&'static ControlPlane> {
    let started = SHARED
        .get_or_init(|| async { ControlPlane::start().await.map_err(|e| format!("{e:#}")) })
        .await;
    started
        .as_ref()
        .map_err(|e| anyhow!("the shared test control plane is not running: {e}"))
}

static SHARED_AGGREGATED: tokio::sync::OnceCell<std::result::Result<ControlPlane, String>> =
    tokio::sync::OnceCell::const_new();

/// Like [`shared`], but a control plane with the aggregation layer
/// ([`ControlPlane::start_aggregated`]), shared by the tests of this binary that need one.
pub async fn shared_aggregated() -> Result<&'static ControlPlane> {
    let started = SHARED_AGGREGATED
        .get_or_init(|| async {
            ControlPlane::start_aggregated()
                .await
                .map_err(|e| format!("{e:#}"))
        })
        .await;
    started
        .as_ref()
        .map_err(|e| anyhow!("the shared aggregated control plane is not running: {e}"))
}

/// Creates a namespace named `{prefix}-{unique suffix}` with `labels` and returns its name.
///
/// `prefix` must be a valid DNS label of at most 40 characters.
pub async fn create_namespace(
    client: &Client,
    prefix: &str,
    labels: &[(&str, &str)],
) -> Result<String> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    // Unique across test binaries sharing an API server (testenv/up) as well as within one.
    let name = format!("{prefix}-{:x}{n}", (std::process::id() ^ nanos) & 0xffffff);
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(name)
}

/// Points the Service `namespace/service` (port `port_name`) at `addr` by applying its Endpoints
/// and EndpointSlice, as the controllers a real cluster runs would for a ready pod. With no
/// kube-controller-manager nothing else does; the aggregation layer resolves a Service through
/// its EndpointSlices. `addr` must not be a loopback address: see [`ControlPlane::expose`].
pub async fn point_service_at(
    client: &Client,
    namespace: &str,
    service: &str,
    port_name: &str,
    addr: std::net::SocketAddr,
) -> Result<()> {
    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset, Endpoints};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
    let ip = addr.ip().to_string();
    let endpoints = Endpoints {
        metadata: ObjectMeta {
            name: Some(service.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        subsets: Some(vec![EndpointSubset {
            addresses: Some(vec![EndpointAddress {
                ip: ip.clone(),
                ..Default::default()
            }]),
            ports: Some(vec![EndpointPort {
                name: Some(port_name.to_string()),
                port: addr.port().into(),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }]),
    };
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-testenv")),
            namespace: Some(namespace.to_string()),
            labels: Some(
                [(
                    "kubernetes.io/service-name".to_string(),
                    service.to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        address_type: if addr.is_ipv4() { "IPv4" } else { "IPv6" }.into(),
        endpoints: Some(vec![Endpoint {
            addresses: vec![ip],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            ..Default::default()
        }]),
        ports: Some(vec![k8s_openapi::api::discovery::v1::EndpointPort {
            name: Some(port_name.to_string()),
            port: Some(addr.port().into()),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Api::<Endpoints>::namespaced(client.clone(), namespace)
        .patch(service, &params, &Patch::Apply(&endpoints))
        .await
        .with_context(|| format!("applying Endpoints {namespace}/{service}"))?;
    Api::<EndpointSlice>::namespaced(client.clone(), namespace)
        .patch(
            &format!("{service}-testenv"),
            &params,
            &Patch::Apply(&slice),
        )
        .await
        .with_context(|| format!("applying EndpointSlice {namespace}/{service}-testenv"))?;
    Ok(())
}

/// Server-side applies every CustomResourceDefinition in the YAML file at `path` and waits until
/// each is Established; returns their names. Idempotent, so tests sharing a control plane may
/// all call it.
pub async fn install_crds(client: &Client, path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading CRDs from {} (generate them with `cargo run -p streamgate-operator --bin crdgen`)",
            path.display()
        )
    })?;
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let mut names = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        let crd: CustomResourceDefinition = serde_yaml::from_value(value)
            .with_context(|| format!("{} holds something other than a CRD", path.display()))?;
        let name = crd
            .metadata
            .name
            .clone()
            .ok_or_else(|| anyhow!("a CRD in {} has no name", path.display()))?;
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("applying CRD {name}"))?;
        names.push(name);
    }
    if names.is_empty() {
        bail!("{} holds no CustomResourceDefinition", path.display());
    }
    for name in &names {
        wait_until(
            Duration::from_secs(30),
            &format!("CRD {name} Established"),
            || async {
                let crd = api.get(name).await?;
                Ok(crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True"))
            },
        )
        .await?;
    }
    Ok(names)
}

/// Polls `check` every 200 ms until it returns `Ok(true)`; errors after `timeout`, quoting the
/// last error `check` returned.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    let mut last: String;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => last = String::from("condition false"),
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The workspace root (the directory holding `crds/` and `examples/`).
pub fn workspace_root() -> PathBuf {
    // Every crate sits one level below the workspace root. The directory cargo names when it
    // runs a test comes first: Cargo reuses compiled workspace crates across checkouts at other
    // paths (its hashes are relative to the workspace), so the path compiled into this library
    // can be another checkout's.
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.join("Cargo.toml").is_file())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    crate_dir
        .parent()
        .expect("a crate has a parent directory")
        .to_path_buf()
}

/// Makes rustls use ring no matter which crypto features other crates in the build enable
/// (with two enabled, rustls refuses to pick one and kube's client would panic).
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
