//! The injection webhook against a real kube-apiserver: the operator's own certificate upkeep
//! creates the serving certificate and patches the caBundle, the API server calls the webhook
//! for Pod CREATE, and what it admits is checked.
//!
//! Each test has its own webhook configuration, scoped with a namespaceSelector on
//! `kubernetes.io/metadata.name` to namespaces it created, so tests sharing the API server do
//! not see each other's webhooks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Container, Pod, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use streamgate_operator::certs::{self, SelfIssued, ServingCert};
use streamgate_operator::inject::{SIDECAR_NAME, SidecarConfig, SidecarResources, StoreSource};
use streamgate_operator::metrics::Metrics;
use streamgate_operator::webhook::{self, INJECT_OPTED_IN_PATH, INJECT_PATH, WebhookState};
use streamgate_testenv::{create_namespace, shared, wait_until};

const SECRET: &str = "streamgate-webhook-tls";

/// One webhook as the operator runs it, registered for this test's namespaces only.
struct Harness {
    client: Client,
    metrics: Arc<Metrics>,
    /// The operator's namespace (labelled for injection, to show it is skipped anyway).
    operator_ns: String,
    /// Labelled `streamgate.dev/inject=enabled`.
    enabled_ns: String,
    /// No label.
    plain_ns: String,
    /// Labelled for injection and `pod-security.kubernetes.io/enforce=restricted`.
    restricted_ns: String,
    webhook_configuration: String,
    settings: SelfIssued,
    serving: Arc<ServingCert>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn sidecar_config(operator_ns: &str) -> SidecarConfig {
    SidecarConfig {
        operator_namespace: operator_ns.to_string(),
        excluded_namespaces: Default::default(),
        image: "streamgate/streamgate-sidecar:test".into(),
        image_pull_policy: "IfNotPresent".into(),
        port: 8080,
        store: StoreSource::Url("redis://redis.streamgate-system.svc:6379".into()),
        store_wait_replicas: 0,
        resources: SidecarResources {
            cpu_request: Some("50m".into()),
            cpu_limit: Some("1".into()),
            memory_request: Some("32Mi".into()),
            memory_limit: Some("128Mi".into()),
        },
        run_as_user: 65532,
        version: "test".into(),
    }
}

impl Harness {
    async fn start(prefix: &str) -> Result<Self> {
        let cp = shared().await?;
        let client = cp.client().await?;
        let inject = ("streamgate.dev/inject", "enabled");
        let operator_ns = create_namespace(&client, &format!("{prefix}-op"), &[inject]).await?;
        let enabled_ns = create_namespace(&client, &format!("{prefix}-on"), &[inject]).await?;
        let plain_ns = create_namespace(&client, &format!("{prefix}-off"), &[]).await?;
        let restricted_ns = create_namespace(
            &client,
            &format!("{prefix}-pss"),
            &[inject, ("pod-security.kubernetes.io/enforce", "restricted")],
        )
        .await?;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let webhook_configuration = format!("streamgate-test-{operator_ns}");
        let namespaces = [&operator_ns, &enabled_ns, &plain_ns, &restricted_ns];
        // As the chart does: two webhooks with complementary namespace selectors tell the
        // webhook whether the namespace opted in. No caBundle: the operator must set it.
        let webhook = |name: &str, operator: &str, path: &str| {
            json!({
                "name": format!("{name}.inject.streamgate.dev"),
                "clientConfig": {"url": format!("https://127.0.0.1:{port}{path}")},
                "rules": [{
                    "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                    "resources": ["pods"], "scope": "Namespaced"
                }],
                "namespaceSelector": {"matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces},
                    {"key": "streamgate.dev/inject", "operator": operator, "values": ["enabled"]}
                ]},
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                // Fail rather than Ignore: a test pod must never slip through unmutated.
                "failurePolicy": "Fail",
                "timeoutSeconds": 10,
                "reinvocationPolicy": "Never"
            })
        };
        let configuration: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": webhook_configuration},
            "webhooks": [
                webhook("namespace", "In", INJECT_OPTED_IN_PATH),
                webhook("pod", "NotIn", INJECT_PATH),
            ]
        }))?;
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .create(&PostParams::default(), &configuration)
            .await
            .context("creating the test webhook configuration")?;

        let metrics = Arc::new(Metrics::new());
        let serving = Arc::new(ServingCert::default());
        let settings = SelfIssued {
            namespace: operator_ns.clone(),
            secret: SECRET.into(),
            webhook_configuration: webhook_configuration.clone(),
            hosts: vec!["127.0.0.1".into()],
            validity: Duration::from_secs(86_400),
        };
        let state = WebhookState {
            sidecar: Arc::new(sidecar_config(&operator_ns)),
            metrics: metrics.clone(),
        };
        let tasks = vec![
            webhook::serve(listener, webhook::router(state), serving.clone())?,
            tokio::spawn(certs::run_self_issued(
                client.clone(),
                settings.clone(),
                serving.clone(),
                metrics.clone(),
            )),
        ];
        let harness = Self {
            client,
            metrics,
            operator_ns,
            enabled_ns,
            plain_ns,
            restricted_ns,
            webhook_configuration,
            settings,
            serving,
            tasks,
        };
        harness.wait_for_webhook().await?;
        Ok(harness)
    }

    /// Waits for the caBundle, then retries a marker pod until it comes back mutated (a new
    /// webhook configuration takes a moment to take effect).
    async fn wait_for_webhook(&self) -> Result<()> {
        let api = Api::<MutatingWebhookConfiguration>::all(self.client.clone());
        wait_until(
            Duration::from_secs(30),
            "the caBundle to be patched",
            || {
                let api = api.clone();
                let name = self.webhook_configuration.clone();
                async move {
                    let config = api.get(&name).await?;
                    Ok(config.webhooks.iter().flatten().all(|w| {
                        w.client_config
                            .ca_bundle
                            .as_ref()
                            .is_some_and(|b| !b.0.is_empty())
                    }))
                }
            },
        )
        .await?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.enabled_ns);
        static MARKERS: AtomicU32 = AtomicU32::new(0);
        wait_until(
            Duration::from_secs(60),
            "a marker pod to be injected",
            || {
                let pods = pods.clone();
                async move {
                    let name = format!("marker-{}", MARKERS.fetch_add(1, Ordering::Relaxed));
                    match pods
                        .create(&PostParams::default(), &app_pod(&name, json!({})))
                        .await
                    {
                        Ok(pod) => Ok(sidecars(&pod) == 1),
                        Err(_) => Ok(false), // not reachable yet (failurePolicy Fail)
                    }
                }
            },
        )
        .await
    }

    fn count(&self, decision: &str, reason: &str) -> u64 {
        self.metrics.injection_count(decision, reason)
    }

    async fn create(&self, namespace: &str, pod: &Pod) -> kube::Result<Pod> {
        Api::<Pod>::namespaced(self.client.clone(), namespace)
            .create(&PostParams::default(), pod)
            .await
    }
}

/// A pod whose app container itself passes the restricted Pod Security Standard.
fn app_pod(name: &str, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{
            "name": "app",
            "image": "registry.invalid/player:1",
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 1000,
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"}
            }
        }]}
    }))
    .expect("valid pod")
}

fn sidecars(pod: &Pod) -> usize {
    let spec = pod.spec.as_ref().expect("pod has a spec");
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter(|c| c.name == SIDECAR_NAME)
        .count()
}

fn the_sidecar(pod: &Pod) -> &Container {
    assert_eq!(sidecars(pod), 1, "exactly one sidecar");
    pod.spec
        .as_ref()
        .unwrap()
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == SIDECAR_NAME)
        .expect("the sidecar is an init container")
}

fn env_value(container: &Container, name: &str) -> Option<String> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

fn is_untouched(pod: &Pod) -> bool {
    sidecars(pod) == 0
        && pod.spec.as_ref().unwrap().volumes.is_none()
        && !pod
            .metadata
            .annotations
            .iter()
            .flatten()
            .any(|(k, _)| k == "streamgate.dev/injected")
}

#[tokio::test]
async fn injects_once_in_opted_in_namespaces_and_counts_every_skip() -> Result<()> {
    let h = Harness::start("wh-inject").await?;
    let injected_before = h.count("injected", "Injected");

    // A labelled namespace: exactly one native sidecar with the expected spec.
    let pod = h
        .create(
            &h.enabled_ns,
            &app_pod(
                "player",
                json!({
                    "streamgate.dev/upstream-port": "9000",
                    "streamgate.dev/sidecar-memory-limit": "256Mi"
                }),
            ),
        )
        .await?;
    let sidecar = the_sidecar(&pod);
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        sidecar.image.as_deref(),
        Some("streamgate/streamgate-sidecar:test")
    );
    assert_eq!(
        env_value(sidecar, "STREAMGATE_LISTEN").as_deref(),
        Some("0.0.0.0:8080")
    );
    assert_eq!(
        env_value(sidecar, "STREAMGATE_STORE").as_deref(),
        Some("redis://redis.streamgate-system.svc:6379")
    );
    assert_eq!(
        env_value(sidecar, "STREAMGATE_POLICY_FILE").as_deref(),
        Some("/etc/streamgate/policies/policies.yaml")
    );
    assert_eq!(
        env_value(sidecar, "STREAMGATE_UPSTREAM").as_deref(),
        Some("http://127.0.0.1:9000")
    );
    let namespace_env = sidecar
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "STREAMGATE_NAMESPACE")
        .expect("STREAMGATE_NAMESPACE is set");
    assert_eq!(
        namespace_env
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("metadata.namespace")
    );
    let limits = sidecar
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .unwrap();
    assert_eq!(limits["memory"].0, "256Mi");
    assert_eq!(
        sidecar
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|g| g.path.as_deref()),
        Some("/readyz")
    );
    assert_eq!(
        sidecar
            .liveness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|g| g.path.as_deref()),
        Some("/healthz")
    );
    let volume = pod
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "streamgate-policies")
        .expect("the policy volume");
    let config_map = volume.config_map.as_ref().unwrap();
    assert_eq!(config_map.name, "streamgate-policies");
    assert_eq!(config_map.optional, Some(true));
    // The app container is as submitted.
    assert_eq!(pod.spec.as_ref().unwrap().containers.len(), 1);
    assert_eq!(pod.spec.as_ref().unwrap().containers[0].name, "app");
    assert_eq!(h.count("injected", "Injected"), injected_before + 1);

    // Re-submitting the injected pod's spec under a new name does not inject twice.
    let mut again = pod.clone();
    again.metadata = kube::api::ObjectMeta {
        name: Some("player-again".into()),
        annotations: pod.metadata.annotations.clone(),
        ..Default::default()
    };
    again.status = None;
    let before = h.count("skipped", "AlreadyInjected");
    let again = h.create(&h.enabled_ns, &again).await?;
    assert_eq!(sidecars(&again), 1, "still exactly one sidecar");
    assert_eq!(
        again
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .iter()
            .flatten()
            .count(),
        pod.spec.as_ref().unwrap().volumes.iter().flatten().count(),
        "no second policy volume"
    );
    assert_eq!(h.count("skipped", "AlreadyInjected"), before + 1);

    // Opted out in a labelled namespace: untouched.
    let before = h.count("skipped", "OptedOut");
    let out = h
        .create(
            &h.enabled_ns,
            &app_pod("opted-out", json!({"streamgate.dev/inject": "disabled"})),
        )
        .await?;
    assert!(is_untouched(&out), "opted-out pod was changed: {out:?}");
    assert_eq!(h.count("skipped", "OptedOut"), before + 1);

    // An unlabelled namespace: untouched...
    let before = h.count("skipped", "NotOptedIn");
    let plain = h.create(&h.plain_ns, &app_pod("plain", json!({}))).await?;
    assert!(
        is_untouched(&plain),
        "pod in an unlabelled namespace was changed"
    );
    assert_eq!(h.count("skipped", "NotOptedIn"), before + 1);
    // ...unless the pod opts in itself.
    let opted_in = h
        .create(
            &h.plain_ns,
            &app_pod("opted-in", json!({"streamgate.dev/inject": "enabled"})),
        )
        .await?;
    assert_eq!(sidecars(&opted_in), 1);

    // The operator's own namespace, though labelled: untouched.
    let before = h.count("skipped", "OperatorNamespace");
    let own = h.create(&h.operator_ns, &app_pod("own", json!({}))).await?;
    assert!(
        is_untouched(&own),
        "pod in the operator namespace was changed"
    );
    assert_eq!(h.count("skipped", "OperatorNamespace"), before + 1);

    // Host network: untouched.
    let before = h.count("skipped", "HostNetwork");
    let mut host = app_pod("host", json!({}));
    host.spec.as_mut().unwrap().host_network = Some(true);
    let host = h.create(&h.enabled_ns, &host).await?;
    assert!(is_untouched(&host), "hostNetwork pod was changed");
    assert_eq!(h.count("skipped", "HostNetwork"), before + 1);

    // Invalid annotation values: denied with a message naming the annotation.
    let before = h.count("rejected", "InvalidAnnotation");
    let error = h
        .create(
            &h.enabled_ns,
            &app_pod("bad", json!({"streamgate.dev/sidecar-cpu-request": "lots"})),
        )
        .await
        .expect_err("a pod with an invalid StreamGate annotation is denied");
    let message = error.to_string();
    assert!(
        message.contains("streamgate.dev/sidecar-cpu-request"),
        "denial names the annotation: {message}"
    );
    assert_eq!(h.count("rejected", "InvalidAnnotation"), before + 1);

    // Each reason also shows in the Prometheus text.
    let text = h.metrics.render();
    for reason in [
        "AlreadyInjected",
        "OptedOut",
        "NotOptedIn",
        "OperatorNamespace",
        "HostNetwork",
    ] {
        assert!(
            text.contains(&format!(
                "streamgate_operator_injections_total{{decision=\"skipped\",reason=\"{reason}\"}}"
            )),
            "{reason} missing from the metrics:\n{text}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn injected_pod_is_admitted_under_the_restricted_pod_security_standard() -> Result<()> {
    let h = Harness::start("wh-pss").await?;
    // Enforcement is on: a non-compliant pod (opted out, so not changed) is refused...
    let mut loose = app_pod("loose", json!({"streamgate.dev/inject": "disabled"}));
    loose.spec.as_mut().unwrap().containers[0].security_context = None;
    let refused = h
        .create(&h.restricted_ns, &loose)
        .await
        .expect_err("restricted enforcement refuses a non-compliant pod");
    assert!(
        refused.to_string().contains("restricted"),
        "refused by Pod Security: {refused}"
    );
    // ...and the injected pod is admitted with its sidecar.
    let pod = h
        .create(&h.restricted_ns, &app_pod("player", json!({})))
        .await
        .context("the injected pod must pass the restricted Pod Security Standard")?;
    // The example Deployment's pod, as its ReplicaSet would create it, is admitted too.
    let example = std::fs::read_to_string(
        streamgate_testenv::workspace_root().join("examples/streaming-deployment.yaml"),
    )?;
    let deployment: k8s_openapi::api::apps::v1::Deployment = serde_yaml::from_str(&example)?;
    let template = deployment.spec.template;
    let example_pod = Pod {
        metadata: kube::api::ObjectMeta {
            name: Some("video-edge-example".into()),
            ..template.metadata.unwrap_or_default()
        },
        spec: template.spec,
        status: None,
    };
    let example_pod = h
        .create(&h.restricted_ns, &example_pod)
        .await
        .context("the example pod, injected, passes the restricted standard")?;
    let example_sidecar = the_sidecar(&example_pod);
    assert_eq!(
        env_value(example_sidecar, "STREAMGATE_UPSTREAM").as_deref(),
        Some("http://127.0.0.1:9000")
    );
    let requests = example_sidecar
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .unwrap();
    assert_eq!(requests["cpu"].0, "100m");
    assert_eq!(requests["memory"].0, "64Mi");

    let sc = the_sidecar(&pod)
        .security_context
        .as_ref()
        .expect("security context");
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    Ok(())
}

#[tokio::test]
async fn certificate_and_ca_bundle_are_managed_without_manual_steps() -> Result<()> {
    let h = Harness::start("wh-cert").await?;
    // The Harness only created an empty-caBundle configuration; the operator did the rest.
    let secrets: Api<Secret> = Api::namespaced(h.client.clone(), &h.operator_ns);
    let secret = secrets.get(SECRET).await?;
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let material = certs::from_secret(&secret).expect("the Secret holds the material");
    assert!(material.cert_pem.contains("BEGIN CERTIFICATE"));
    assert_eq!(material.hosts, vec!["127.0.0.1".to_string()]);
    let configs = Api::<MutatingWebhookConfiguration>::all(h.client.clone());
    let bundle_of = |c: &MutatingWebhookConfiguration| -> Vec<Vec<u8>> {
        c.webhooks
            .iter()
            .flatten()
            .map(|w| w.client_config.ca_bundle.clone().unwrap_or_default().0)
            .collect()
    };
    let config = configs.get(&h.webhook_configuration).await?;
    assert_eq!(
        bundle_of(&config),
        vec![material.ca_bundle().into_bytes(); 2],
        "every webhook trusts the Secret's CA"
    );
    assert!(h.serving.is_loaded());
    assert!(h.metrics.webhook_cert_expiry.get() > chrono::Utc::now().timestamp());

    // A second replica shares the certificate instead of issuing its own.
    let replica = ServingCert::default();
    certs::reconcile_once(&h.client, &h.settings, &replica, &Metrics::new()).await?;
    let after = certs::from_secret(&secrets.get(SECRET).await?).unwrap();
    assert_eq!(after.cert_pem, material.cert_pem);

    // A reset caBundle (e.g. the configuration re-created) is restored.
    let reset = json!([
        {"op": "remove", "path": "/webhooks/0/clientConfig/caBundle"},
        {"op": "remove", "path": "/webhooks/1/clientConfig/caBundle"}
    ]);
    configs
        .patch(
            &h.webhook_configuration,
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(reset)?),
        )
        .await?;
    certs::reconcile_once(&h.client, &h.settings, &replica, &Metrics::new()).await?;
    let config = configs.get(&h.webhook_configuration).await?;
    assert_eq!(
        bundle_of(&config),
        vec![material.ca_bundle().into_bytes(); 2]
    );

    // The webhook keeps working with that bundle.
    let pod = h
        .create(&h.enabled_ns, &app_pod("after-restore", json!({})))
        .await?;
    assert_eq!(sidecars(&pod), 1);

    configs
        .delete(&h.webhook_configuration, &DeleteParams::default())
        .await?;
    Ok(())
}
