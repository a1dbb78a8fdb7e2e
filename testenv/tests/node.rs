//! StreamGate end to end on a real single-node cluster (`testenv/node-run`): the chart installed
//! with helm, the operator and its webhook running as pods, injected sidecars next to a real
//! streaming container, policies delivered through kubelet-synced ConfigMap volumes, viewers
//! going through a Service and kube-proxy, two replicas sharing a limit through Redis.
//!
//! Needs root, `eval "$(testenv/build)"; eval "$(testenv/build-node)"; eval "$(testenv/images)"`
//! (scripts/test does all of it). The tests share one node and one chart installation and run
//! one at a time (they scale and kill the operator).

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::Value;
use streamgate_testenv::{Node, create_namespace, shared_node, wait_until, workspace_root};
use tokio::sync::{Mutex, MutexGuard, OnceCell};

const RELEASE: &str = "streamgate";
const SYSTEM_NS: &str = "streamgate-system";
const OPERATOR_SELECTOR: &str =
    "app.kubernetes.io/name=streamgate,app.kubernetes.io/component=operator";

/// One test at a time: they share the node and the chart, and some stop the operator.
static SERIAL: Mutex<()> = Mutex::const_new(());
static CHART: OnceCell<std::result::Result<(), String>> = OnceCell::const_new();

/// The node with the chart installed (once per test binary), and the lock of this test.
async fn setup() -> Result<(&'static Node, Client, MutexGuard<'static, ()>)> {
    let guard = SERIAL.lock().await;
    let node = shared_node().await?;
    let installed = CHART
        .get_or_init(|| async { install_chart(node).map_err(|e| format!("{e:#}")) })
        .await;
    installed
        .as_ref()
        .map_err(|e| anyhow!("helm install failed: {e}"))?;
    let client = node.client().await?;
    Ok((node, client, guard))
}

fn run(mut cmd: Command) -> Result<String> {
    let out: Output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn install_chart(node: &Node) -> Result<()> {
    let images = node.images();
    let started = Instant::now();
    let mut helm = node.helm();
    helm.args(["install", RELEASE])
        .arg(workspace_root().join("charts/streamgate"))
        .args(["--namespace", SYSTEM_NS, "--create-namespace", "--wait", "--timeout", "5m"])
        .args(["--set", "redis.enabled=true"])
        .args(["--set", "leaseDuration=5s"])
        .arg("--set")
        .arg(format!(
            "image.repository=localhost/streamgate/streamgate-operator,image.tag={},image.pullPolicy=Never",
            images.tag
        ))
        .arg("--set")
        .arg(format!(
            "sidecar.image.repository=localhost/streamgate/streamgate-sidecar,sidecar.image.tag={},sidecar.image.pullPolicy=Never",
            images.tag
        ))
        .args([
            "--set",
            "redis.image.repository=localhost/streamgate/redis,redis.image.tag=testenv,redis.image.pullPolicy=Never",
        ]);
    run(helm)?;
    eprintln!("helm install --wait: {:?}", started.elapsed());
    Ok(())
}

/// `curl` inside the node's network namespace: (HTTP status, body).
fn http(node: &Node, method: &str, url: &str) -> Result<(u16, Value)> {
    let mut cmd = node.in_netns("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
        url,
    ]);
    let out = run(cmd)?;
    let (body, code) = out
        .trim_end()
        .rsplit_once('\n')
        .map(|(b, c)| (b.to_string(), c.to_string()))
        .unwrap_or((String::new(), out.trim().to_string()));
    let status: u16 = code
        .parse()
        .with_context(|| format!("curl printed {out:?}"))?;
    let body = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or(Value::String(body))
    };
    Ok((status, body))
}

fn open(node: &Node, base: &str, account: &str, stream: &str) -> Result<(u16, Value)> {
    http(
        node,
        "PUT",
        &format!("{base}/streaming?account={account}&streamId={stream}"),
    )
}

fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{prefix}-{:x}", n & 0xffff_ffff)
}

/// The demo streaming app (see testenv/manifests/demo.yaml) in namespace `ns`, without the
/// namespace and policy documents.
fn demo_app(node: &Node, ns: &str, replicas: u32) -> Result<()> {
    let manifest = std::fs::read_to_string(workspace_root().join("testenv/manifests/demo.yaml"))?
        .replace("IMAGE_TAG", &node.images().tag);
    let docs: Vec<&str> = manifest
        .split("\n---\n")
        .filter(|d| d.contains("kind: Deployment") || d.contains("kind: Service"))
        .collect();
    let text = docs
        .join("\n---\n")
        .replace("namespace: streaming", &format!("namespace: {ns}"))
        .replace("replicas: 2", &format!("replicas: {replicas}"));
    let mut cmd = node.kubectl();
    cmd.args(["apply", "-f", "-"]).stdin(Stdio::piped());
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    rollout(node, ns, "demo")
}

fn rollout(node: &Node, ns: &str, deployment: &str) -> Result<()> {
    let mut cmd = node.kubectl();
    cmd.args(["rollout", "status", "-n", ns])
        .arg(format!("deployment/{deployment}"))
        .arg("--timeout=180s");
    run(cmd).map(drop)
}

async fn service_ip(client: &Client, ns: &str, name: &str) -> Result<String> {
    let svc: k8s_openapi::api::core::v1::Service =
        Api::namespaced(client.clone(), ns).get(name).await?;
    svc.spec
        .and_then(|s| s.cluster_ip)
        .ok_or_else(|| anyhow!("service {ns}/{name} has no cluster IP"))
}

async fn running_pods(client: &Client, ns: &str, selector: &str) -> Result<Vec<Pod>> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await?;
    Ok(pods
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .collect())
}

fn pod_ip(pod: &Pod) -> Result<String> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .ok_or_else(|| anyhow!("pod has no IP"))
}

/// Applies a StreamingPolicy with kubectl.
fn apply_policy(node: &Node, ns: &str, yaml: &str) -> Result<()> {
    let mut cmd = node.kubectl();
    cmd.args(["apply", "-n", ns, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Waits until every running demo pod's sidecar answers an open with `field == want`, using a
/// fresh account per probe (ended at once); returns how long it took.
async fn wait_for_sidecars(
    node: &Node,
    client: &Client,
    ns: &str,
    field: &str,
    want: u64,
    timeout: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    let pods = running_pods(client, ns, "app=demo").await?;
    ensure!(!pods.is_empty(), "no running demo pods in {ns}");
    for pod in &pods {
        let base = format!("http://{}:8080", pod_ip(pod)?);
        wait_until(
            timeout.saturating_sub(started.elapsed()),
            &format!("{field}={want} on {base}"),
            || async {
                let account = unique("probe");
                let (status, body) = open(node, &base, &account, "probe")?;
                ensure!(status == 201, "open answered {status}: {body}");
                http(
                    node,
                    "DELETE",
                    &format!("{base}/streaming?account={account}&streamId=probe"),
                )?;
                Ok(body[field].as_u64() == Some(want))
            },
        )
        .await?;
    }
    Ok(started.elapsed())
}

/// A labelled namespace with the demo app (2 replicas) Ready behind its Service.
async fn streaming_namespace(
    node: &Node,
    client: &Client,
    prefix: &str,
) -> Result<(String, String)> {
    let ns = create_namespace(
        client,
        prefix,
        &[
            ("streamgate.dev/inject", "enabled"),
            ("pod-security.kubernetes.io/enforce", "restricted"),
        ],
    )
    .await?;
    demo_app(node, &ns, 2)?;
    let svc = service_ip(client, &ns, "demo").await?;
    Ok((ns, svc))
}

fn sidecar_of(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::Container> {
    pod.spec
        .as_ref()?
        .init_containers
        .as_ref()?
        .iter()
        .find(|c| c.name == "streamgate-sidecar")
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn helm_install_runs_the_operator_as_two_pods_one_leading_with_the_webhook_behind_its_service()
-> Result<()> {
    let (node, client, _guard) = setup().await?;

    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get("streamingpolicies.streamgate.dev")
        .await?;
    let established = crd.status.and_then(|s| s.conditions).unwrap_or_default();
    assert!(
        established
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True"),
        "CRD not established: {established:?}"
    );

    let operators = running_pods(&client, SYSTEM_NS, OPERATOR_SELECTOR).await?;
    assert_eq!(operators.len(), 2, "operator pods: {}", operators.len());
    let names: Vec<String> = operators
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    for pod in &operators {
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        assert!(ready, "operator pod {:?} not Ready", pod.metadata.name);
    }

    // Exactly one leads: the Lease names one of the two pods.
    let leases = Api::<Lease>::namespaced(client.clone(), SYSTEM_NS)
        .list(&ListParams::default())
        .await?;
    let holders: Vec<String> = leases
        .items
        .iter()
        .filter_map(|l| l.spec.as_ref()?.holder_identity.clone())
        .filter(|h| names.contains(h))
        .collect();
    assert_eq!(
        holders.len(),
        1,
        "lease holders among {names:?}: {holders:?}"
    );

    // The webhook is called through its Service, whose endpoints are the operator pods.
    let hooks = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let service = hooks
        .items
        .iter()
        .flat_map(|h| h.webhooks.iter().flatten())
        .find_map(|w| w.client_config.service.clone())
        .context("no webhook with a service clientConfig")?;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), SYSTEM_NS)
        .list(
            &ListParams::default().labels(&format!("kubernetes.io/service-name={}", service.name)),
        )
        .await?;
    let ips: Vec<String> = slices
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect();
    let pod_ips: Vec<String> = operators.iter().filter_map(|p| pod_ip(p).ok()).collect();
    let mut sorted_ips = ips.clone();
    sorted_ips.sort();
    let mut sorted_pod_ips = pod_ips.clone();
    sorted_pod_ips.sort();
    assert_eq!(
        sorted_ips, sorted_pod_ips,
        "webhook service endpoints vs operator pods"
    );
    let _ = node;
    Ok(())
}

#[tokio::test]
async fn a_streaming_deployment_gets_the_native_sidecar_and_both_containers_are_ready() -> Result<()>
{
    let (node, client, _guard) = setup().await?;
    let (ns, _svc) = streaming_namespace(node, &client, "inject").await?;
    let pods = running_pods(&client, &ns, "app=demo").await?;
    assert_eq!(pods.len(), 2);
    for pod in &pods {
        let sidecar = sidecar_of(pod).context("the pod has no injected streamgate-sidecar")?;
        assert_eq!(
            sidecar.restart_policy.as_deref(),
            Some("Always"),
            "a native sidecar"
        );
        for (what, probe) in [
            ("readiness", &sidecar.readiness_probe),
            ("liveness", &sidecar.liveness_probe),
        ] {
            let probe = probe.as_ref().with_context(|| format!("no {what} probe"))?;
            assert!(
                probe.http_get.is_some(),
                "{what} probe is not httpGet: {probe:?}"
            );
        }
        let status = pod.status.as_ref().context("no status")?;
        let init = status
            .init_container_statuses
            .as_ref()
            .context("no init statuses")?;
        let sc = init
            .iter()
            .find(|s| s.name == "streamgate-sidecar")
            .context("no sidecar status")?;
        assert!(
            sc.ready && sc.started == Some(true),
            "sidecar not ready: {sc:?}"
        );
        let app = status
            .container_statuses
            .as_ref()
            .and_then(|c| c.iter().find(|s| s.name == "origin"))
            .context("no app status")?;
        assert!(app.ready, "app not ready: {app:?}");
        // Ready means kubelet's httpGet probes reached the sidecar: a real request through the
        // pod IP reaches it too.
        let (status, body) = http(node, "GET", &format!("http://{}:8080/readyz", pod_ip(pod)?))?;
        assert_eq!(status, 200, "readyz: {body}");
    }
    Ok(())
}

#[tokio::test]
async fn policies_apply_through_the_service_and_edits_reach_running_sidecars_through_the_configmap_volume()
-> Result<()> {
    let (node, client, _guard) = setup().await?;
    let (ns, svc) = streaming_namespace(node, &client, "policy").await?;
    let base = format!("http://{svc}");

    apply_policy(
        node,
        &ns,
        "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {name: default}\n\
         spec: {maxStreamsPerAccount: 2, heartbeatIntervalSeconds: 10, sessionTTLSeconds: 60}\n",
    )?;
    let took = wait_for_sidecars(node, &client, &ns, "limit", 2, Duration::from_secs(180)).await?;
    eprintln!("policy (limit 2) in force in every sidecar {took:?} after kubectl apply");

    let account = unique("viewer");
    for stream in ["tv", "phone"] {
        let (status, body) = open(node, &base, &account, stream)?;
        assert_eq!(status, 201, "{stream}: {body}");
    }
    let (status, body) = open(node, &base, &account, "tablet")?;
    assert_eq!(status, 429, "third stream: {body}");
    assert_eq!(body["error"], "limit_exceeded");
    assert_eq!(body["limit"], 2);

    // `kubectl edit`, with an editor that changes the limit.
    let mut edit = node.kubectl();
    edit.args(["edit", "-n", &ns, "streamingpolicy", "default"])
        .env(
            "EDITOR",
            "sed -i s/maxStreamsPerAccount:\\ 2/maxStreamsPerAccount:\\ 3/",
        );
    run(edit)?;
    let edited = Instant::now();
    let took = wait_for_sidecars(node, &client, &ns, "limit", 3, Duration::from_secs(180)).await?;
    eprintln!(
        "kubectl edit to limit 3 reached every running sidecar through the ConfigMap volume in {took:?} (kubelet syncFrequency 10s)"
    );
    let _ = edited;
    let (status, body) = open(node, &base, &account, "tablet")?;
    assert_eq!(status, 201, "third stream after the edit: {body}");
    let (status, body) = open(node, &base, &account, "laptop")?;
    assert_eq!(status, 429, "fourth stream: {body}");

    // Deleting the policy falls back to the built-in default (heartbeat interval 30s).
    run({
        let mut c = node.kubectl();
        c.args([
            "delete",
            "-n",
            &ns,
            "streamingpolicy",
            "default",
            "--wait=true",
        ]);
        c
    })?;
    let took = wait_for_sidecars(
        node,
        &client,
        &ns,
        "heartbeatIntervalSeconds",
        30,
        Duration::from_secs(180),
    )
    .await?;
    eprintln!("policy deletion reached every sidecar in {took:?}");
    let cm: ConfigMap = Api::namespaced(client.clone(), &ns)
        .get("streamgate-policies")
        .await?;
    let text = cm
        .data
        .unwrap_or_default()
        .values()
        .cloned()
        .collect::<String>();
    assert!(
        !text.contains("maxStreamsPerAccount: 3"),
        "policy still rendered: {text}"
    );
    Ok(())
}

#[tokio::test]
async fn two_replicas_share_the_limit_through_redis() -> Result<()> {
    let (node, client, _guard) = setup().await?;
    let (ns, _svc) = streaming_namespace(node, &client, "redis").await?;
    apply_policy(
        node,
        &ns,
        "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {name: default}\nspec: {maxStreamsPerAccount: 2}\n",
    )?;
    wait_for_sidecars(node, &client, &ns, "limit", 2, Duration::from_secs(180)).await?;
    let pods = running_pods(&client, &ns, "app=demo").await?;
    assert_eq!(pods.len(), 2);
    let a = format!("http://{}:8080", pod_ip(&pods[0])?);
    let b = format!("http://{}:8080", pod_ip(&pods[1])?);
    let account = unique("shared");
    assert_eq!(open(node, &a, &account, "one")?.0, 201);
    assert_eq!(open(node, &b, &account, "two")?.0, 201);
    let (status, body) = open(node, &a, &account, "three")?;
    assert_eq!(status, 429, "pod A must see pod B's session: {body}");
    assert_eq!(body["sessions"].as_array().map(Vec::len), Some(2), "{body}");
    let (status, _) = open(node, &b, &account, "three")?;
    assert_eq!(status, 429);
    // Ending on B frees the slot for A.
    assert_eq!(
        http(
            node,
            "DELETE",
            &format!("{b}/streaming?account={account}&streamId=one")
        )?
        .0,
        204
    );
    assert_eq!(open(node, &a, &account, "three")?.0, 201);
    Ok(())
}

/// Runs `streamctl simulate --output json` inside the namespace.
fn simulate(node: &Node, args: &[&str]) -> Result<std::process::Child> {
    let mut cmd = node.in_netns(node.images().bin("streamctl"));
    cmd.args(["simulate", "--output", "json"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().context("starting streamctl simulate")
}

fn report(child: std::process::Child) -> Result<Value> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).with_context(|| {
        format!(
            "streamctl printed {text:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test]
async fn a_rolling_update_under_viewer_load_loses_no_session_and_refuses_no_viewer() -> Result<()> {
    let (node, client, _guard) = setup().await?;
    let (ns, svc) = streaming_namespace(node, &client, "rollout").await?;
    apply_policy(
        node,
        &ns,
        "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {name: default}\n\
         spec: {maxStreamsPerAccount: 2, heartbeatIntervalSeconds: 10, sessionTTLSeconds: 30}\n",
    )?;
    wait_for_sidecars(node, &client, &ns, "limit", 2, Duration::from_secs(180)).await?;
    let endpoint = format!("http://{svc}");
    let before: Vec<String> = running_pods(&client, &ns, "app=demo")
        .await?
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();

    // One account at its limit of 2, heartbeating every second, through the Service.
    let account = unique("rolling");
    let viewers = simulate(
        node,
        &[
            "--endpoint",
            &endpoint,
            "--account",
            &account,
            "--streams",
            "2",
            "--duration",
            "60s",
            "--heartbeat-interval",
            "1s",
        ],
    )?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    run({
        let mut c = node.kubectl();
        c.args(["rollout", "restart", "-n", &ns, "deployment/demo"]);
        c
    })?;
    rollout(node, &ns, "demo")?;
    eprintln!(
        "rolling update of 2 replicas under load: {:?}",
        started.elapsed()
    );
    let after: Vec<String> = running_pods(&client, &ns, "app=demo")
        .await?
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "pods not replaced: {before:?} -> {after:?}"
    );

    let report = report(viewers)?;
    let counts = &report["counts"];
    assert_eq!(counts["admitted"], 2, "report: {report:#}");
    assert_eq!(counts["refused"], 0, "report: {report:#}");
    assert_eq!(counts["cut"], 0, "report: {report:#}");
    assert_eq!(counts["failed"], 0, "report: {report:#}");
    Ok(())
}

#[tokio::test]
async fn deleting_a_pod_stops_the_app_before_the_sidecar_and_revokes_no_session() -> Result<()> {
    let (node, client, _guard) = setup().await?;
    let (ns, _svc) = streaming_namespace(node, &client, "delete").await?;
    let pods = running_pods(&client, &ns, "app=demo").await?;
    let victim = pods[0].clone();
    let survivor = format!("http://{}:8080", pod_ip(&pods[1])?);
    let name = victim.metadata.name.clone().context("pod name")?;
    let base = format!("http://{}:8080", pod_ip(&victim)?);
    let account = unique("leaving");
    let (status, session) = open(node, &base, &account, "tv")?;
    assert_eq!(status, 201, "{session}");

    let api = Api::<Pod>::namespaced(client.clone(), &ns);
    let status = victim.status.clone().unwrap_or_default();
    let id_of = |statuses: &Option<Vec<k8s_openapi::api::core::v1::ContainerStatus>>,
                 name: &str| {
        statuses
            .iter()
            .flatten()
            .find(|c| c.name == name)
            .and_then(|c| c.container_id.clone())
            .and_then(|id| id.strip_prefix("containerd://").map(str::to_string))
            .with_context(|| format!("no containerd id for {name}"))
    };
    let app_id = id_of(&status.container_statuses, "origin")?;
    let sidecar_id = id_of(&status.init_container_statuses, "streamgate-sidecar")?;
    run({
        let mut c = node.kubectl();
        c.args(["delete", "pod", "-n", &ns, &name, "--wait=false"]);
        c
    })?;
    // While it terminates, the sidecar is never seen stopped with the app still running.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let Some(pod) = api.get_opt(&name).await? else {
            break;
        };
        assert!(
            Instant::now() < deadline,
            "pod {name} still there after 60s"
        );
        let status = pod.status.unwrap_or_default();
        let app_done = status.container_statuses.iter().flatten().any(|c| {
            c.name == "origin" && c.state.as_ref().is_some_and(|s| s.terminated.is_some())
        });
        let sidecar_done = status.init_container_statuses.iter().flatten().any(|c| {
            c.name == "streamgate-sidecar"
                && c.state.as_ref().is_some_and(|s| s.terminated.is_some())
        });
        assert!(
            !sidecar_done || app_done,
            "the sidecar stopped before the app"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The runtime's record of the stop order: kubelet asked containerd to stop the sidecar only
    // once the app had stopped.
    let log = std::fs::read_to_string(node.dir().join("logs/containerd.log"))?;
    let line_of = |id: &str, phrase: &str| {
        log.lines()
            .position(|l| l.contains("StopContainer for") && l.contains(id) && l.contains(phrase))
            .with_context(|| format!("containerd's log has no StopContainer {phrase:?} for {id}"))
    };
    let app_stopped = line_of(&app_id, "returns successfully")?;
    let sidecar_stopping = line_of(&sidecar_id, "with timeout")?;
    assert!(
        app_stopped < sidecar_stopping,
        "the sidecar was asked to stop before the app had stopped"
    );
    // The session opened on the deleted pod lives on (Redis), renewed through another pod.
    let (status, body) = http(
        node,
        "GET",
        &format!("{survivor}/streaming?account={account}&streamId=tv"),
    )?;
    assert_eq!(status, 200, "heartbeat after the pod went: {body}");
    assert_eq!(body["state"], "active");
    assert_eq!(body["sessionId"], session["sessionId"]);
    Ok(())
}

#[tokio::test]
async fn sidecars_keep_enforcing_without_the_operator_and_pods_created_meanwhile_start_without_the_sidecar_and_are_counted()
-> Result<()> {
    let (node, client, _guard) = setup().await?;
    let (ns, svc) = streaming_namespace(node, &client, "nooperator").await?;
    apply_policy(
        node,
        &ns,
        "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {name: default}\nspec: {maxStreamsPerAccount: 2}\n",
    )?;
    wait_for_sidecars(node, &client, &ns, "limit", 2, Duration::from_secs(180)).await?;

    // Kill the operator pods and keep them away.
    let deployments = Api::<Deployment>::namespaced(client.clone(), SYSTEM_NS);
    let operator = deployments
        .list(&ListParams::default().labels(OPERATOR_SELECTOR))
        .await?
        .items
        .into_iter()
        .next()
        .and_then(|d| d.metadata.name)
        .context("no operator deployment")?;
    run({
        let mut c = node.kubectl();
        c.args([
            "scale",
            "-n",
            SYSTEM_NS,
            "deployment",
            &operator,
            "--replicas=0",
        ]);
        c
    })?;
    run({
        let mut c = node.kubectl();
        c.args([
            "delete",
            "pods",
            "-n",
            SYSTEM_NS,
            "-l",
            OPERATOR_SELECTOR,
            "--grace-period=0",
            "--force",
            "--wait=true",
        ]);
        c
    })?;
    wait_until(Duration::from_secs(60), "no operator pods", || async {
        Ok(Api::<Pod>::namespaced(client.clone(), SYSTEM_NS)
            .list(&ListParams::default().labels(OPERATOR_SELECTOR))
            .await?
            .items
            .is_empty())
    })
    .await?;

    let result = async {
        let base = format!("http://{svc}");
        let account = unique("orphan");
        assert_eq!(open(node, &base, &account, "one")?.0, 201);
        assert_eq!(open(node, &base, &account, "two")?.0, 201);
        let (status, body) = open(node, &base, &account, "three")?;
        assert_eq!(status, 429, "without the operator: {body}");

        // A pod created now: the webhook is unreachable, failurePolicy Ignore admits it as is.
        let started = Instant::now();
        run({
            let mut c = node.kubectl();
            c.args(["scale", "-n", &ns, "deployment/demo", "--replicas=3"]);
            c
        })?;
        rollout(node, &ns, "demo")?;
        eprintln!(
            "pod created with the webhook down, Ready in {:?}",
            started.elapsed()
        );
        let pods = running_pods(&client, &ns, "app=demo").await?;
        let uninjected: Vec<_> = pods.iter().filter(|p| sidecar_of(p).is_none()).collect();
        assert_eq!(
            uninjected.len(),
            1,
            "pods without the sidecar: {}",
            uninjected.len()
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;

    run({
        let mut c = node.kubectl();
        c.args([
            "scale",
            "-n",
            SYSTEM_NS,
            "deployment",
            &operator,
            "--replicas=2",
        ]);
        c
    })?;
    rollout(node, SYSTEM_NS, &operator)?;
    result?;

    // Back up, the operator counts the pod that started without the sidecar.
    let want = format!("streamgate_operator_pods_without_sidecar{{namespace=\"{ns}\"}} 1");
    wait_until(Duration::from_secs(120), &want, || async {
        for pod in running_pods(&client, SYSTEM_NS, OPERATOR_SELECTOR).await? {
            let (status, body) = http(
                node,
                "GET",
                &format!("http://{}:8080/metrics", pod_ip(&pod)?),
            )?;
            if status == 200 && body.as_str().is_some_and(|m| m.lines().any(|l| l == want)) {
                return Ok(true);
            }
        }
        Ok(false)
    })
    .await
}

/// The node's safety promises: nothing of it outside its namespaces and cgroup subtree.
#[tokio::test]
async fn the_node_lives_in_its_own_network_namespace_and_cgroup() -> Result<()> {
    let (node, _client, _guard) = setup().await?;
    // Host network: no bridge, no pod routes, no kube-proxy chains.
    let links = run({
        let mut c = Command::new("ip");
        c.args(["-o", "link"]);
        c
    })?;
    assert!(
        !links.contains("sgbr0"),
        "the CNI bridge is in the host namespace: {links}"
    );
    let rules = Command::new("iptables-save").output()?;
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        !rules.contains("KUBE-"),
        "kube-proxy rules in the host namespace"
    );
    // Inside: the bridge, the pods' routes, kube-proxy's chains, and no default route.
    let inside = run({
        let mut c = node.in_netns("ip");
        c.args(["-o", "link"]);
        c
    })?;
    assert!(inside.contains("sgbr0"), "{inside}");
    let routes = run({
        let mut c = node.in_netns("ip");
        c.args(["route"]);
        c
    })?;
    assert!(
        !routes.contains("default"),
        "a default route in the node's namespace: {routes}"
    );
    let rules = run({
        let mut c = node.in_netns("iptables-save");
        c.args(["-t", "nat"]);
        c
    })?;
    assert!(
        rules.contains("KUBE-SERVICES"),
        "no kube-proxy rules inside"
    );
    let cg = format!("/sys/fs/cgroup/pids{}", node.cgroup());
    assert!(std::path::Path::new(&cg).join("pods").is_dir(), "{cg}/pods");
    Ok(())
}
