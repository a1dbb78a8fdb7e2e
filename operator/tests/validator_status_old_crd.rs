//! Upgrading the operator before the StreamingPolicy CRD: with the previous CRD,
//! `status.conditions` is one atomic list, so writing `ValidatorsHealthy` replaces the
//! reconciler's `Ready`. The operator notices at its first write and stops writing the
//! condition, instead of taking turns with the reconciler every refresh.
//!
//! A test binary of its own: the operator remembers the outdated CRD for the process.
//! Needs `testenv/build` (the control plane); without it the test fails.

use std::sync::Arc;

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use streamgate_operator::crd::StreamingPolicy;
use streamgate_operator::liveapi;
use streamgate_operator::validator_health::CONDITION;
use streamgate_testenv::{FIELD_MANAGER, create_namespace};

/// The CRD as it was before `status.conditions` became a list keyed by type.
fn previous_crd() -> Result<tempfile::NamedTempFile> {
    let current = std::fs::read_to_string(
        streamgate_testenv::workspace_root().join("crds/streamingpolicy.yaml"),
    )?;
    let keyed = "                x-kubernetes-list-map-keys:\n                - type\n                x-kubernetes-list-type: map\n";
    ensure!(current.contains(keyed), "the CRD keys conditions by type");
    let mut file = tempfile::NamedTempFile::new()?;
    std::io::Write::write_all(&mut file, current.replace(keyed, "").as_bytes())?;
    Ok(file)
}

fn ready(transition: &str) -> serde_json::Value {
    json!({
        "apiVersion": "streamgate.dev/v1alpha1", "kind": "StreamingPolicy",
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Rendered",
            "message": "rendered", "lastTransitionTime": transition}]},
    })
}

async fn condition_types(api: &Api<StreamingPolicy>) -> Result<Vec<String>> {
    Ok(api
        .get("standard")
        .await?
        .status
        .map(|s| s.conditions.into_iter().map(|c| c.type_).collect())
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_previous_crd_the_condition_stops_instead_of_fighting_ready() -> Result<()> {
    let cp = streamgate_testenv::shared().await?;
    let client = cp.client().await?;
    streamgate_testenv::install_crds(&client, previous_crd()?.path()).await?;
    let ns = create_namespace(&client, "old-crd", &[]).await?;
    // The embedded store: the condition would say Unknown/NoSharedStore.
    Api::<Secret>::namespaced(client.clone(), &ns)
        .patch(
            "streamgate-store",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "streamgate-store"},
                "stringData": {"url": "memory"},
            })),
        )
        .await?;
    let api: Api<StreamingPolicy> = Api::namespaced(client.clone(), &ns);
    api.patch(
        "standard",
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(json!({
            "apiVersion": "streamgate.dev/v1alpha1", "kind": "StreamingPolicy",
            "metadata": {"name": "standard"},
            "spec": {"validators": [{"name": "entitlement", "url": "http://127.0.0.1:1/"}]},
        })),
    )
    .await?;
    let reconciler = PatchParams::apply(streamgate_operator::reconcile::FIELD_MANAGER).force();
    api.patch_status("standard", &reconciler, &Patch::Apply(ready("t1")))
        .await?;

    let resolver: Arc<dyn liveapi::sessions::SessionsResolver> =
        Arc::new(liveapi::sessions::StoreResolver::new(
            client.clone(),
            streamgate_operator::inject::StoreSource::Secret {
                name: "streamgate-store".into(),
                key: "url".into(),
            },
            Box::new(liveapi::sessions::StoreSessions::connect),
        ));
    // The first write replaces the list (the old CRD), and the operator notices.
    liveapi::active::refresh_once(&client, resolver.as_ref()).await?;
    ensure!(
        condition_types(&api).await? == [CONDITION],
        "the old CRD let the write replace Ready"
    );
    // The reconciler puts Ready back; from now on the refresh leaves it alone.
    api.patch_status("standard", &reconciler, &Patch::Apply(ready("t2")))
        .await?;
    for _ in 0..3 {
        liveapi::active::refresh_once(&client, resolver.as_ref()).await?;
    }
    let types = condition_types(&api).await?;
    ensure!(
        types == ["Ready"],
        "Ready stays, no more ValidatorsHealthy writes: {types:?}"
    );
    Ok(())
}
