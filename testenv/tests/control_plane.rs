//! The test control plane itself: version, CRDs, kubectl, helm and webhooks against a real
//! kube-apiserver. All tests share one control plane and isolate themselves by namespace.

use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use axum::Json;
use axum::extract::State;
use axum::routing::post;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::{Api, Client};
use streamgate_testenv::{HttpsServer, create_namespace, install_crds, shared};

/// The annotation the test webhook adds.
const ANNOTATION: &str = "testenv.streamgate.dev/mutated";

fn streaming_policy_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("streamgate.dev", "v1alpha1", "StreamingPolicy"),
        "streamingpolicies",
    )
}

async fn install_streamgate_crds(client: &Client) -> Result<()> {
    let path = streamgate_testenv::workspace_root().join("crds/streamingpolicy.yaml");
    let names = install_crds(client, &path).await?;
    ensure!(
        names
            .iter()
            .any(|n| n == "streamingpolicies.streamgate.dev"),
        "{} does not define streamingpolicies.streamgate.dev (found {names:?})",
        path.display()
    );
    Ok(())
}

fn run(cmd: &mut std::process::Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}):\n{}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

#[tokio::test]
async fn api_server_reports_the_pinned_version() -> Result<()> {
    let cp = shared().await?;
    let client = cp.client().await?;
    let version = client.apiserver_version().await?;
    assert_eq!(version.git_version, "v1.37.2");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "37")
    );
    Ok(())
}

#[tokio::test]
async fn streaming_policy_crd_installs_and_round_trips_with_kube_rs() -> Result<()> {
    let cp = shared().await?;
    let client = cp.client().await?;
    install_streamgate_crds(&client).await?;
    let ns = create_namespace(&client, "crd-kube", &[]).await?;

    let ar = streaming_policy_resource();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
    let mut sp = DynamicObject::new("vip", &ar).data(serde_json::json!({
        "spec": { "maxStreamsPerAccount": 5, "onLimitExceeded": "EvictOldest", "accounts": ["acct-1"] }
    }));
    sp.metadata.namespace = Some(ns.clone());
    api.create(&PostParams::default(), &sp).await?;

    let back = api.get("vip").await?;
    assert_eq!(back.data["spec"]["maxStreamsPerAccount"], 5);
    assert_eq!(back.data["spec"]["onLimitExceeded"], "EvictOldest");
    assert_eq!(back.data["spec"]["accounts"][0], "acct-1");
    // The schema's defaults were applied by the API server.
    assert_eq!(back.data["spec"]["sessionTTLSeconds"], 90);
    Ok(())
}

#[tokio::test]
async fn kubectl_applies_the_example_policy() -> Result<()> {
    let cp = shared().await?;
    let client = cp.client().await?;
    install_streamgate_crds(&client).await?;
    let ns = create_namespace(&client, "crd-kubectl", &[]).await?;

    let example = streamgate_testenv::workspace_root().join("examples/streamingpolicy.yaml");
    run(cp
        .kubectl()
        .arg("apply")
        .arg("-n")
        .arg(&ns)
        .arg("-f")
        .arg(&example))?;

    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &streaming_policy_resource());
    let back = api.get("default").await?;
    assert_eq!(back.data["spec"]["maxStreamsPerAccount"], 3);
    assert_eq!(back.data["spec"]["onLimitExceeded"], "RejectNew");

    // The short name works too.
    let out = run(cp.kubectl().args(["get", "sp", "-n", &ns, "-o", "name"]))?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "streamingpolicy.streamgate.dev/default"
    );
    Ok(())
}

#[tokio::test]
async fn helm_installs_a_chart_that_requires_the_server_version() -> Result<()> {
    let cp = shared().await?;
    let client = cp.client().await?;
    let ns = create_namespace(&client, "helm", &[]).await?;

    let chart = tempfile::tempdir()?;
    std::fs::create_dir(chart.path().join("templates"))?;
    // kubeVersion makes helm check the version the API server reports.
    std::fs::write(
        chart.path().join("Chart.yaml"),
        "apiVersion: v2\nname: probe\nversion: 0.1.0\nkubeVersion: \">=1.37.0-0\"\n",
    )?;
    std::fs::write(
        chart.path().join("templates/cm.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: probe\ndata:\n  kube: {{ .Capabilities.KubeVersion.Version | quote }}\n",
    )?;
    run(cp
        .helm()
        .args(["install", "probe", "-n", &ns])
        .arg(chart.path()))?;

    let cm = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client, &ns)
        .get("probe")
        .await?;
    assert_eq!(cm.data.unwrap_or_default()["kube"], "v1.37.2");

    let out = run(cp.helm().args(["version", "--short"]))?;
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("v3.22.0"));
    Ok(())
}

/// The building block of the injection tests: the API server calls a mutating webhook served
/// by the test on 127.0.0.1 for Pod CREATE.
#[tokio::test]
async fn api_server_calls_a_mutating_webhook_served_by_the_test() -> Result<()> {
    let cp = shared().await?;
    let client = cp.client().await?;
    let ns = create_namespace(&client, "webhook", &[]).await?;

    let calls = Arc::new(Mutex::new(Vec::<String>::new()));
    let app = axum::Router::new()
        .route("/mutate", post(mutate))
        .with_state(calls.clone());
    let server = HttpsServer::start(app).await?;

    // Cluster-scoped, so scope it to this test's namespace: other tests share the API server.
    let config_name = format!("{ns}-probe");
    let webhook = MutatingWebhookConfiguration {
        metadata: kube::api::ObjectMeta {
            name: Some(config_name.clone()),
            ..Default::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: "probe.testenv.streamgate.dev".into(),
            admission_review_versions: vec!["v1".into()],
            side_effects: "None".into(),
            failure_policy: Some("Fail".into()),
            timeout_seconds: Some(10),
            client_config: WebhookClientConfig {
                url: Some(server.url("/mutate")),
                ca_bundle: Some(ByteString(server.ca_bundle())),
                ..Default::default()
            },
            namespace_selector: Some(LabelSelector {
                match_labels: Some(
                    [("kubernetes.io/metadata.name".to_string(), ns.clone())].into(),
                ),
                ..Default::default()
            }),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec!["".into()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            ..Default::default()
        }]),
    };
    let configs = Api::<MutatingWebhookConfiguration>::all(client.clone());
    configs.create(&PostParams::default(), &webhook).await?;

    // A new webhook configuration takes a moment to reach the admission chain: create marker
    // pods until one comes back mutated.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempt = 0;
    let (name, value) = loop {
        attempt += 1;
        let name = format!("marker-{attempt}");
        let pod = pods
            .create(&PostParams::default(), &marker_pod(&name))
            .await?;
        if let Some(v) = pod.metadata.annotations.unwrap_or_default().get(ANNOTATION) {
            break (name, v.clone());
        }
        if Instant::now() > deadline {
            bail!(
                "the API server did not call the webhook within 30s ({attempt} pods created); \
                 its log:\n{}",
                cp.apiserver_log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    assert_eq!(value, "true");
    let recorded = calls.lock().unwrap().clone();
    assert!(
        recorded.iter().any(|c| c == &format!("CREATE {ns}/{name}")),
        "webhook saw {recorded:?}"
    );

    configs
        .delete(&config_name, &DeleteParams::default())
        .await?;
    Ok(())
}

fn marker_pod(name: &str) -> Pod {
    Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("streamgate-test/app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Records the call and adds an annotation, the way the injector will add a sidecar.
async fn mutate(
    State(calls): State<Arc<Mutex<Vec<String>>>>,
    Json(review): Json<AdmissionReview<Pod>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req: AdmissionRequest<Pod> = match review.try_into() {
        Ok(req) => req,
        Err(e) => return Json(AdmissionResponse::invalid(e.to_string()).into_review()),
    };
    let op = format!("{:?}", req.operation).to_uppercase();
    let ns = req.namespace.clone().unwrap_or_default();
    calls
        .lock()
        .unwrap()
        .push(format!("{op} {ns}/{}", req.name));
    // The marker pods have no annotations, so add the whole map.
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([{
        "op": "add",
        "path": "/metadata/annotations",
        "value": { ANNOTATION: "true" },
    }]))
    .expect("valid JSON patch");
    let resp = AdmissionResponse::from(&req)
        .with_patch(patch)
        .unwrap_or_else(|e| AdmissionResponse::invalid(e.to_string()));
    Json(resp.into_review())
}
