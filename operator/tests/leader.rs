//! Two `streamgate-operator` processes against a real kube-apiserver: only the Lease holder
//! reconciles, and killing it hands over to the other. Its own test binary, so no other
//! controller shares its control plane.

mod common;
use common::reported_metrics_addr;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use kube::Api;
use kube::api::PostParams;
use streamgate_operator::crd::{StreamingPolicy, StreamingPolicySpec};
use streamgate_testenv::{create_namespace, install_crds, wait_until, workspace_root};

const WAIT: Duration = Duration::from_secs(60);

struct Operator {
    child: Child,
    metrics: String,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Operator {
    fn start(kubeconfig: &std::path::Path, lease_namespace: &str, identity: &str) -> Result<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_streamgate-operator"))
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--namespace", lease_namespace, "--identity", identity])
            .args(["--lease-duration", "4s"])
            // The injection webhook has tests of its own; here only the controller matters.
            .args(["--webhook", "false"])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting streamgate-operator")?;
        let addr = reported_metrics_addr(&mut child);
        // Killed on drop, also when the address never came.
        let mut operator = Self {
            child,
            metrics: String::new(),
        };
        operator.metrics = format!("http://{}/metrics", addr?);
        Ok(operator)
    }

    /// `(leader gauge, reconciles counter)`, or None while the endpoint is not up.
    async fn state(&self) -> Option<(f64, f64)> {
        let text = reqwest::get(&self.metrics).await.ok()?.text().await.ok()?;
        let sample = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        };
        Some((
            sample("streamgate_operator_leader")?,
            sample("streamgate_operator_reconciles_total")?,
        ))
    }
}

async fn create_policy(api: &Api<StreamingPolicy>, name: &str) -> Result<()> {
    api.create(
        &PostParams::default(),
        &StreamingPolicy::new(name, StreamingPolicySpec::default()),
    )
    .await?;
    Ok(())
}

async fn is_ready(api: &Api<StreamingPolicy>, name: &str) -> Result<bool> {
    let p = api.get(name).await?;
    Ok(p.status.is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    }))
}

#[tokio::test]
async fn only_the_leader_reconciles_and_killing_it_hands_over() -> Result<()> {
    let cp = streamgate_testenv::shared().await?;
    let client = cp.client().await?;
    install_crds(&client, &workspace_root().join("crds/streamingpolicy.yaml")).await?;
    let lease_ns = create_namespace(&client, "operator", &[]).await?;
    let ns = create_namespace(&client, "leader", &[]).await?;
    let policies: Api<StreamingPolicy> = Api::namespaced(client.clone(), &ns);

    let mut first = Some(Operator::start(cp.kubeconfig_path(), &lease_ns, "first")?);
    wait_until(WAIT, "the first operator leads", || {
        let op = first.as_ref().unwrap();
        async move { Ok(op.state().await.is_some_and(|(leader, _)| leader == 1.0)) }
    })
    .await?;
    let second = Operator::start(cp.kubeconfig_path(), &lease_ns, "second")?;
    wait_until(WAIT, "the second operator is up", || async {
        Ok(second.state().await.is_some())
    })
    .await?;

    create_policy(&policies, "one").await?;
    wait_until(WAIT, "policy one is reconciled", || {
        let policies = policies.clone();
        async move { is_ready(&policies, "one").await }
    })
    .await?;
    let (leader, reconciles) = first.as_ref().unwrap().state().await.unwrap();
    assert_eq!(leader, 1.0);
    assert!(reconciles >= 1.0);
    assert_eq!(
        second.state().await,
        Some((0.0, 0.0)),
        "the standby must not reconcile"
    );

    // The leader dies without releasing its Lease; the standby takes over once it lapses.
    drop(first.take());
    wait_until(WAIT, "the second operator leads", || async {
        Ok(second
            .state()
            .await
            .is_some_and(|(leader, _)| leader == 1.0))
    })
    .await?;
    // A namespace of its own: a second default policy next to "one" would be reported as
    // shadowed, never Ready.
    let other_ns = create_namespace(&client, "leader", &[]).await?;
    let other: Api<StreamingPolicy> = Api::namespaced(client.clone(), &other_ns);
    create_policy(&other, "two").await?;
    wait_until(WAIT, "policy two is reconciled by the new leader", || {
        let policies = other.clone();
        async move { is_ready(&policies, "two").await }
    })
    .await?;
    let (_, reconciles) = second.state().await.unwrap();
    assert!(reconciles >= 1.0);
    Ok(())
}

#[tokio::test]
async fn without_the_crd_the_operator_says_how_to_install_it() -> Result<()> {
    // A control plane of its own, without the CRD.
    let cp = streamgate_testenv::ControlPlane::start().await?;
    let out = Command::new(env!("CARGO_BIN_EXE_streamgate-operator"))
        .env("KUBECONFIG", cp.kubeconfig_path())
        .args(["--metrics-listen", "127.0.0.1:0", "--webhook", "false"])
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CRD"), "{stderr}");
    assert!(
        stderr.contains("kubectl apply -f crds/streamingpolicy.yaml"),
        "{stderr}"
    );
    cp.stop();
    Ok(())
}
