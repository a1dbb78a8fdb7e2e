//! The Helm chart (charts/streamgate): lint, the CRD copy, server-side validation of the rendered
//! manifests by the real 1.37 API server, and install / uninstall into it, including the operator
//! binary running with exactly the chart's RBAC and arguments.

mod common;
use common::reported_metrics_addr;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser as _;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use streamgate_testenv::{ControlPlane, create_namespace, shared, wait_until, workspace_root};

fn chart() -> PathBuf {
    workspace_root().join("charts/streamgate")
}

/// Runs a command, failing with its output when it does not succeed.
fn run(mut command: Command, what: &str) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// Value sets the chart is checked with.
const VALUE_SETS: &[&[&str]] = &[
    &[],
    &[
        "redis.enabled=true",
        "sidecar.store.waitReplicas=1",
        "webhook.failurePolicy=Fail",
        "webhook.timeoutSeconds=5",
    ],
    &[
        "webhook.certManager.enabled=true",
        "webhook.annotationOptIn=false",
        "sidecar.store.existingSecret=streamgate-store",
    ],
    &[
        "webhook.certManager.enabled=true",
        "webhook.certManager.issuerRef.kind=ClusterIssuer",
        "webhook.certManager.issuerRef.name=my-ca",
    ],
];

fn with_values(command: &mut Command, values: &[&str]) {
    for value in values {
        command.args(["--set", value]);
    }
}

#[test]
fn chart_crd_copy_matches_crds() {
    let root = workspace_root();
    let original = std::fs::read_to_string(root.join("crds/streamingpolicy.yaml")).unwrap();
    let copy = std::fs::read_to_string(root.join("charts/streamgate/crds/streamingpolicy.yaml"))
        .expect("charts/streamgate/crds/streamingpolicy.yaml exists");
    assert!(
        original == copy,
        "charts/streamgate/crds/streamingpolicy.yaml differs from crds/; refresh it with\n  cp crds/streamingpolicy.yaml charts/streamgate/crds/"
    );
    let original = std::fs::read_to_string(root.join("crds/viewerauthentication.yaml")).unwrap();
    let copy =
        std::fs::read_to_string(root.join("charts/streamgate/crds/viewerauthentication.yaml"))
            .expect("charts/streamgate/crds/viewerauthentication.yaml exists");
    assert!(
        original == copy,
        "charts/streamgate/crds/viewerauthentication.yaml differs from crds/; refresh it with\n  cp crds/viewerauthentication.yaml charts/streamgate/crds/"
    );
}

#[tokio::test]
async fn helm_lint_is_clean() -> Result<()> {
    let cp = shared().await?;
    for values in VALUE_SETS {
        let mut lint = cp.helm();
        lint.args(["lint", "--strict"]).arg(chart());
        with_values(&mut lint, values);
        let output = run(lint, &format!("helm lint --strict {values:?}"))?;
        let text = String::from_utf8_lossy(&output.stdout);
        ensure!(
            !text.contains("[WARNING]") && !text.contains("[ERROR]"),
            "helm lint {values:?}:\n{text}"
        );
    }
    Ok(())
}

/// Documents of a multi-document YAML stream as (kind, apiVersion, text).
fn documents(yaml: &str) -> Vec<(String, String, String)> {
    yaml.split("\n---")
        .filter_map(|doc| {
            let value: serde_yaml::Value = serde_yaml::from_str(doc).ok()?;
            let kind = value.get("kind")?.as_str()?.to_string();
            let api_version = value.get("apiVersion")?.as_str()?.to_string();
            Some((kind, api_version, doc.to_string()))
        })
        .collect()
}

#[tokio::test]
async fn rendered_manifests_pass_the_api_servers_schema_validation() -> Result<()> {
    let cp = shared().await?;
    let client = cp.client().await?;
    // `helm template` assumes an old Kubernetes unless told: render for the server at hand.
    let version = client.apiserver_version().await?.git_version;
    ensure!(
        version.starts_with("v1.37."),
        "test API server is {version}, not 1.37"
    );
    for values in VALUE_SETS {
        let ns = create_namespace(&client, "chart-validate", &[]).await?;
        let mut template = cp.helm();
        template
            .args(["template", "sg", "--include-crds", "--namespace", &ns])
            .args(["--kube-version", &version])
            .arg(chart());
        with_values(&mut template, values);
        let rendered = run(template, &format!("helm template {values:?}"))?;
        let docs = documents(&String::from_utf8(rendered.stdout)?);
        let kinds: Vec<&str> = docs.iter().map(|(k, _, _)| k.as_str()).collect();
        for expected in [
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment",
            "MutatingWebhookConfiguration",
        ] {
            ensure!(
                kinds.contains(&expected),
                "{values:?}: no {expected} in {kinds:?}"
            );
        }
        // Every flag the chart passes is one the operator binary knows, with a valid value.
        let (_, _, deployment) = docs
            .iter()
            .find(|(kind, _, _)| kind == "Deployment")
            .context("no Deployment")?;
        let deployment: serde_yaml::Value = serde_yaml::from_str(deployment)?;
        let args: Vec<String> = serde_yaml::from_value(
            deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone(),
        )
        .context("the operator container's args")?;
        let config = streamgate_operator::config::Config::try_parse_from(
            std::iter::once("streamgate-operator".to_string()).chain(args.iter().cloned()),
        )
        .with_context(|| {
            format!("{values:?}: the operator refuses the chart's arguments {args:?}")
        })?;
        let sidecar = config
            .sidecar()
            .map_err(|e| anyhow::anyhow!("{values:?}: {e}"))?;
        ensure!(
            sidecar.store_wait_replicas
                == u32::from(values.contains(&"sidecar.store.waitReplicas=1")),
            "{values:?}: store_wait_replicas {}",
            sidecar.store_wait_replicas
        );
        // cert-manager's kinds cannot be validated here (its CRDs are not installed): check they
        // are rendered, and send everything else to the server.
        let cert_manager = values
            .iter()
            .any(|v| v.starts_with("webhook.certManager.enabled=true"));
        ensure!(
            kinds.contains(&"Certificate") == cert_manager,
            "{values:?}: Certificate rendered: {}",
            kinds.contains(&"Certificate")
        );
        let checked: String = docs
            .iter()
            .filter(|(_, api_version, _)| !api_version.starts_with("cert-manager.io/"))
            .map(|(_, _, text)| format!("{text}\n---\n"))
            .collect();
        let mut file = tempfile::NamedTempFile::new()?;
        file.write_all(checked.as_bytes())?;
        let mut apply = cp.kubectl();
        apply
            .args(["apply", "--dry-run=server", "--validate=strict", "-f"])
            .arg(file.path());
        run(
            apply,
            &format!("kubectl apply --dry-run=server of the chart rendered with {values:?}"),
        )?;
    }
    Ok(())
}

/// Whether the operator's service account may do this, by the API server's own RBAC check.
async fn can(
    client: &Client,
    user: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> Result<bool> {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_string())),
        None => (resource, None),
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_string()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource,
                namespace: namespace.map(str::to_string),
                name: name.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.map(|s| s.allowed).unwrap_or(false))
}

/// The operator binary, killed when dropped.
struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A kubeconfig that acts as `user` (admin credentials + impersonation), so the operator runs
/// with exactly the chart's RBAC.
fn impersonating_kubeconfig(cp: &ControlPlane, user: &str) -> Result<tempfile::NamedTempFile> {
    let text = std::fs::read_to_string(cp.kubeconfig_path())?;
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let users = config
        .get_mut("users")
        .and_then(|u| u.as_sequence_mut())
        .context("kubeconfig without users")?;
    for entry in users {
        let auth = entry.get_mut("user").context("kubeconfig user entry")?;
        auth.as_mapping_mut()
            .context("kubeconfig user mapping")?
            .insert("as".into(), user.into());
    }
    let mut file = tempfile::NamedTempFile::new()?;
    file.write_all(serde_yaml::to_string(&config)?.as_bytes())?;
    Ok(file)
}

/// Starts the operator binary with the chart's Deployment args (listen addresses moved to
/// loopback, port 0) as the chart's service account. Returns it and its metrics port.
fn start_operator(
    deployment: &Deployment,
    namespace: &str,
    kubeconfig: &std::path::Path,
) -> Result<(Operator, u16)> {
    let container = &deployment.spec.template.spec.as_ref().unwrap().containers[0];
    let mut args: Vec<String> = container
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| {
            !a.starts_with("--metrics-listen=")
                && !a.starts_with("--webhook-listen=")
                && !a.starts_with("--live-api-listen=")
        })
        .collect();
    args.push("--metrics-listen=127.0.0.1:0".into());
    args.push("--webhook-listen=127.0.0.1:0".into());
    args.push("--live-api-listen=127.0.0.1:0".into());
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamgate-operator"))
        .args(&args)
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAMESPACE", namespace)
        .env("POD_NAME", "chart-test-operator")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting streamgate-operator")?;
    let addr = reported_metrics_addr(&mut child);
    let operator = Operator(child);
    Ok((operator, addr?.port()))
}

/// The operator's ServiceAccount, as the chart sets it up, attacks ConfigMaps that are not its
/// own: `kubectl auth can-i` says no, and real writes are refused.
async fn the_service_account_cannot_touch_other_config_maps(
    cp: &ControlPlane,
    admin: &Client,
    as_sa: &Client,
    sa: &str,
) -> Result<()> {
    for (verb, target, namespace, expected) in [
        (
            "patch",
            "configmaps/extension-apiserver-authentication",
            "kube-system",
            "no",
        ),
        ("update", "configmaps/coredns", "kube-system", "no"),
        ("delete", "configmaps/streamgate-policies", "default", "no"),
        ("get", "configmaps/kube-root-ca.crt", "default", "no"),
        (
            "patch",
            "configmaps/streamgate-policies",
            "kube-system",
            "yes",
        ),
    ] {
        let mut can_i = cp.kubectl();
        can_i.args([
            "auth",
            "can-i",
            verb,
            target,
            "-n",
            namespace,
            &format!("--as={sa}"),
        ]);
        let output = can_i.output().context("kubectl auth can-i")?;
        let answer = String::from_utf8_lossy(&output.stdout).trim().to_string();
        ensure!(
            answer == expected,
            "kubectl auth can-i {verb} {target} -n {namespace} --as={sa}: {answer:?}, expected {expected:?}"
        );
    }

    let victim_ns = create_namespace(admin, "chart-victim", &[]).await?;
    let victim: ConfigMap = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "app-settings"},
        "data": {"mode": "safe"},
    }))?;
    Api::<ConfigMap>::namespaced(admin.clone(), &victim_ns)
        .create(&PostParams::default(), &victim)
        .await?;
    let tamper = serde_json::json!({"data": {"mode": "owned"}});
    for (namespace, name) in [
        (victim_ns.as_str(), "app-settings"),
        ("kube-system", "extension-apiserver-authentication"),
    ] {
        let theirs = Api::<ConfigMap>::namespaced(as_sa.clone(), namespace);
        let patched = theirs
            .patch(name, &PatchParams::default(), &Patch::Merge(&tamper))
            .await;
        ensure!(
            matches!(&patched, Err(kube::Error::Api(s)) if s.code == 403),
            "patching {namespace}/{name} as the operator: {patched:?}"
        );
        let read = theirs.get(name).await;
        // The live-session API reads the front-proxy settings (public CA certificates).
        let may_read = name == "extension-apiserver-authentication";
        ensure!(
            may_read || matches!(&read, Err(kube::Error::Api(s)) if s.code == 403),
            "reading {namespace}/{name} as the operator: {read:?}"
        );
        let deleted = theirs.delete(name, &Default::default()).await;
        ensure!(
            matches!(&deleted, Err(kube::Error::Api(s)) if s.code == 403),
            "deleting {namespace}/{name} as the operator: {deleted:?}"
        );
    }
    let still = Api::<ConfigMap>::namespaced(admin.clone(), &victim_ns)
        .get("app-settings")
        .await?;
    ensure!(
        still
            .data
            .unwrap_or_default()
            .get("mode")
            .map(String::as_str)
            == Some("safe"),
        "the victim ConfigMap changed"
    );

    // RBAC lets it create (create cannot be limited by name); the admission policy refuses
    // any name but streamgate-policies.
    let mut planted = victim.clone();
    planted.metadata.name = Some("planted".into());
    let mine = Api::<ConfigMap>::namespaced(as_sa.clone(), &victim_ns);
    let create = |cm: ConfigMap| {
        let mine = mine.clone();
        async move { mine.create(&PostParams::default(), &cm).await }
    };
    // The admission policy takes effect shortly after it is created: wait until it refuses.
    wait_until(
        Duration::from_secs(60),
        "the admission policy refusing a planted ConfigMap",
        || {
            let attempt = create(planted.clone());
            let admin = Api::<ConfigMap>::namespaced(admin.clone(), &victim_ns);
            async move {
                match attempt.await {
                    Err(kube::Error::Api(s)) if s.code == 403 => {
                        ensure!(
                            s.message
                                .contains("may only create ConfigMaps named streamgate-policies"),
                            "{s:?}"
                        );
                        Ok(true)
                    }
                    Ok(_) => {
                        // Not enforced yet: clean up and try again.
                        admin.delete("planted", &Default::default()).await?;
                        Ok(false)
                    }
                    Err(error) => Err(error.into()),
                }
            }
        },
    )
    .await?;
    let mut own = victim;
    own.metadata.name = Some("streamgate-policies".into());
    create(own)
        .await
        .context("the operator may create streamgate-policies")?;
    Ok(())
}

#[tokio::test]
async fn helm_install_creates_crd_rbac_and_webhook_and_uninstall_removes_them() -> Result<()> {
    let cp = shared().await?;
    let client = cp.client().await?;
    let ns = create_namespace(&client, "chart-install", &[]).await?;
    let release = format!("sg-{}", &ns[ns.len().saturating_sub(6)..]);
    let mut install = cp.helm();
    install.args(["install", &release]).arg(chart()).args([
        "--namespace",
        &ns,
        "--set",
        "redis.enabled=true",
    ]);
    run(install, "helm install")?;

    let fullname = format!("{release}-streamgate");
    let configuration = format!("{fullname}-sidecar-injector");
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    ensure!(
        crds.get_opt("streamingpolicies.streamgate.dev")
            .await?
            .is_some(),
        "helm install did not create the StreamingPolicy CRD"
    );
    let webhooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let config = webhooks
        .get(&configuration)
        .await
        .context("the webhook configuration")?;
    let hooks = config.webhooks.clone().unwrap_or_default();
    ensure!(hooks.len() == 2, "two webhooks: {hooks:?}");
    for hook in &hooks {
        assert_eq!(hook.failure_policy.as_deref(), Some("Ignore"));
        assert_eq!(hook.timeout_seconds, Some(10));
        let selector = serde_json::to_string(&hook.namespace_selector)?;
        assert!(
            selector.contains("kube-system")
                && selector.contains("kube-public")
                && selector.contains(&ns),
            "{} excludes kube-system, kube-public and the release namespace: {selector}",
            hook.name
        );
        let service = hook
            .client_config
            .service
            .as_ref()
            .expect("service clientConfig");
        assert_eq!(service.namespace, ns);
        assert_eq!(service.name, format!("{fullname}-webhook"));
    }
    Api::<ClusterRole>::all(client.clone())
        .get(&fullname)
        .await?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .get(&fullname)
        .await?;
    Api::<Role>::namespaced(client.clone(), &ns)
        .get(&fullname)
        .await?;
    Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .get(&fullname)
        .await?;
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .get(&fullname)
        .await?;
    Api::<Service>::namespaced(client.clone(), &ns)
        .get(&format!("{fullname}-webhook"))
        .await?;
    Api::<Service>::namespaced(client.clone(), &ns)
        .get(&format!("{fullname}-redis"))
        .await?;
    let deployment = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get(&fullname)
        .await?;

    // Least privilege, as the API server's authorizer sees it.
    let sa = format!("system:serviceaccount:{ns}:{fullname}");
    let secret = format!("{fullname}-webhook-tls");
    let admission = "admissionregistration.k8s.io";
    let nsr = Some(ns.as_str());
    for (verb, group, resource, namespace, name, allowed) in [
        (
            "patch",
            admission,
            "mutatingwebhookconfigurations",
            None,
            Some(configuration.as_str()),
            true,
        ),
        (
            "get",
            admission,
            "mutatingwebhookconfigurations",
            None,
            Some(configuration.as_str()),
            true,
        ),
        (
            "patch",
            admission,
            "mutatingwebhookconfigurations",
            None,
            Some("someone-elses"),
            false,
        ),
        (
            "create",
            admission,
            "mutatingwebhookconfigurations",
            None,
            None,
            false,
        ),
        (
            "watch",
            "streamgate.dev",
            "streamingpolicies",
            None,
            None,
            true,
        ),
        (
            "patch",
            "streamgate.dev",
            "streamingpolicies/status",
            Some("default"),
            None,
            true,
        ),
        (
            "update",
            "streamgate.dev",
            "streamingpolicies/finalizers",
            Some("default"),
            None,
            true,
        ),
        (
            "delete",
            "streamgate.dev",
            "streamingpolicies",
            Some("default"),
            None,
            false,
        ),
        // ConfigMaps: streamgate-policies only (create is guarded by the admission policy).
        ("create", "", "configmaps", Some("default"), None, true),
        ("delete", "", "configmaps", Some("default"), None, false),
        (
            "patch",
            "",
            "configmaps",
            Some("media"),
            Some("streamgate-policies"),
            true,
        ),
        (
            "watch",
            "",
            "configmaps",
            None,
            Some("streamgate-policies"),
            true,
        ),
        (
            "patch",
            "",
            "configmaps",
            Some("kube-system"),
            Some("coredns"),
            false,
        ),
        (
            "update",
            "",
            "configmaps",
            Some("default"),
            Some("app-settings"),
            false,
        ),
        // The live-session API reads the front-proxy CA from it (public certificates, the
        // extension-apiserver-authentication-reader binding); writes stay refused.
        (
            "get",
            "",
            "configmaps",
            Some("kube-system"),
            Some("extension-apiserver-authentication"),
            true,
        ),
        (
            "patch",
            "",
            "configmaps",
            Some("kube-system"),
            Some("extension-apiserver-authentication"),
            false,
        ),
        // Kicks sessions only as the API server's proxy for a user the SubjectAccessReview
        // allowed: the ServiceAccount itself holds no right on them.
        (
            "delete",
            "live.streamgate.dev",
            "streamingsessions",
            Some("default"),
            None,
            false,
        ),
        // Its own APIService's caBundle only.
        (
            "patch",
            "apiregistration.k8s.io",
            "apiservices",
            None,
            Some("v1alpha1.live.streamgate.dev"),
            true,
        ),
        (
            "patch",
            "apiregistration.k8s.io",
            "apiservices",
            None,
            Some("v1beta1.metrics.k8s.io"),
            false,
        ),
        ("list", "", "configmaps", None, None, false),
        ("watch", "", "namespaces", None, None, true),
        (
            "create",
            "events.k8s.io",
            "events",
            Some("default"),
            None,
            true,
        ),
        ("update", "coordination.k8s.io", "leases", nsr, None, true),
        (
            "update",
            "coordination.k8s.io",
            "leases",
            Some("default"),
            None,
            false,
        ),
        ("create", "", "secrets", nsr, None, true),
        ("update", "", "secrets", nsr, Some(secret.as_str()), true),
        ("get", "", "secrets", nsr, Some("other"), false),
        (
            "get",
            "",
            "secrets",
            Some("default"),
            Some(secret.as_str()),
            false,
        ),
        ("list", "", "secrets", nsr, None, false),
        // The playback key Secret of any namespace, by name only.
        (
            "patch",
            "",
            "secrets",
            Some("default"),
            Some("streamgate-playback-keys"),
            true,
        ),
        ("get", "", "secrets", Some("default"), Some("other"), false),
        // Pods: listed and watched (metadata) for the pods-without-sidecar count; nothing else.
        ("list", "", "pods", None, None, true),
        ("get", "", "pods", Some("default"), Some("any"), false),
        ("create", "", "pods", Some("default"), None, false),
        ("get", "", "namespaces", None, Some("default"), false),
    ] {
        let got = can(&client, &sa, verb, group, resource, namespace, name).await?;
        ensure!(
            got == allowed,
            "RBAC: {verb} {group}/{resource} ns={namespace:?} name={name:?}: allowed={got}, expected {allowed}"
        );
    }

    // The operator, as the chart runs it, issues its certificate and patches the caBundle.
    let kubeconfig = impersonating_kubeconfig(cp, &sa)?;
    // The premise: that kubeconfig really is the service account (listing pods is forbidden).
    let as_sa = Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(kubeconfig.path())?,
            &Default::default(),
        )
        .await?,
    )?;
    let forbidden = Api::<Secret>::all(as_sa.clone())
        .list(&Default::default())
        .await;
    ensure!(
        matches!(&forbidden, Err(kube::Error::Api(s)) if s.code == 403),
        "the impersonating kubeconfig is not limited to the service account: {forbidden:?}"
    );
    the_service_account_cannot_touch_other_config_maps(cp, &client, &as_sa, &sa).await?;
    let (operator, metrics_port) = start_operator(&deployment, &ns, kubeconfig.path())?;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    wait_until(
        Duration::from_secs(60),
        "the webhook certificate Secret",
        || {
            let secrets = secrets.clone();
            let secret = secret.clone();
            async move { Ok(secrets.get_opt(&secret).await?.is_some()) }
        },
    )
    .await?;
    wait_until(
        Duration::from_secs(60),
        "the caBundle of both webhooks",
        || {
            let webhooks = webhooks.clone();
            let configuration = configuration.clone();
            async move {
                let config = webhooks.get(&configuration).await?;
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
    let certificate = streamgate_operator::certs::from_secret(&secrets.get(&secret).await?)
        .context("the Secret holds a CA and a serving certificate")?;
    assert!(
        certificate
            .hosts
            .contains(&format!("{fullname}-webhook.{ns}.svc")),
        "certificate hosts: {:?}",
        certificate.hosts
    );
    let bundle = webhooks.get(&configuration).await?.webhooks.unwrap()[0]
        .client_config
        .ca_bundle
        .clone()
        .unwrap();
    assert_eq!(bundle.0, certificate.ca_bundle().into_bytes());
    let readyz = format!("http://127.0.0.1:{metrics_port}/readyz");
    wait_until(Duration::from_secs(60), "the operator's /readyz", || {
        let readyz = readyz.clone();
        async move {
            Ok(reqwest::get(&readyz)
                .await
                .is_ok_and(|r| r.status().is_success()))
        }
    })
    .await?;

    // With exactly this RBAC the controller renders a namespace's policies.
    let media = create_namespace(&client, "chart-media", &[]).await?;
    let mut policy = cp.kubectl();
    policy
        .args(["apply", "-n", &media, "-f"])
        .arg(workspace_root().join("examples/streamingpolicy.yaml"));
    run(policy, "kubectl apply examples/streamingpolicy.yaml")?;
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), &media);
    wait_until(
        Duration::from_secs(60),
        "the operator, with the chart's RBAC, renders the namespace's ConfigMap",
        || {
            let config_maps = config_maps.clone();
            async move {
                Ok(config_maps
                    .get_opt("streamgate-policies")
                    .await?
                    .and_then(|cm| cm.data?.remove("policies.yaml"))
                    .is_some_and(|file| file.contains("maxStreamsPerAccount: 3")))
            }
        },
    )
    .await?;
    drop(operator);

    let mut uninstall = cp.helm();
    uninstall.args(["uninstall", &release, "--namespace", &ns]);
    run(uninstall, "helm uninstall")?;
    ensure!(
        webhooks.get_opt(&configuration).await?.is_none(),
        "helm uninstall left the webhook configuration"
    );
    ensure!(
        Api::<ClusterRole>::all(client.clone())
            .get_opt(&fullname)
            .await?
            .is_none(),
        "helm uninstall left the ClusterRole"
    );
    ensure!(
        Api::<ClusterRoleBinding>::all(client.clone())
            .get_opt(&fullname)
            .await?
            .is_none(),
        "helm uninstall left the ClusterRoleBinding"
    );
    ensure!(
        Api::<Role>::namespaced(client.clone(), &ns)
            .get_opt(&fullname)
            .await?
            .is_none(),
        "helm uninstall left the Role"
    );
    ensure!(
        Api::<RoleBinding>::namespaced(client.clone(), &ns)
            .get_opt(&fullname)
            .await?
            .is_none(),
        "helm uninstall left the RoleBinding"
    );
    ensure!(
        Api::<Deployment>::namespaced(client.clone(), &ns)
            .get_opt(&fullname)
            .await?
            .is_none(),
        "helm uninstall left the Deployment"
    );
    // Helm never deletes CRDs from a chart's crds/ directory: deleting the CRD would delete
    // every StreamingPolicy in the cluster. Documented in the chart's README.
    ensure!(
        crds.get_opt("streamingpolicies.streamgate.dev")
            .await?
            .is_some(),
        "the CRD is kept on uninstall"
    );
    Ok(())
}

#[tokio::test]
async fn examples_are_valid_for_the_api_server() -> Result<()> {
    let cp = shared().await?;
    let root = workspace_root();
    // The namespace for real (the Deployment's dry run needs it), the rest as a dry run.
    let mut namespace = cp.kubectl();
    namespace
        .args(["apply", "--validate=strict", "-f"])
        .arg(root.join("examples/injection-namespace.yaml"));
    run(namespace, "kubectl apply examples/injection-namespace.yaml")?;
    let mut deployment = cp.kubectl();
    deployment
        .args(["apply", "--dry-run=server", "--validate=strict", "-f"])
        .arg(root.join("examples/streaming-deployment.yaml"));
    run(
        deployment,
        "kubectl apply --dry-run=server examples/streaming-deployment.yaml",
    )?;
    Ok(())
}
