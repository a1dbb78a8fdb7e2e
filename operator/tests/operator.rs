//! The reconciler against a real kube-apiserver: policies applied with kubectl become the
//! namespace's rendered ConfigMap and a Ready status; edits, deletions and hand edits of the
//! ConfigMap are reconciled; invalid policies are refused by the API server; a namespace costs
//! one ConfigMap write per change whatever its number of policies; time-boxed overrides apply
//! and lapse on their own; opted-in pods admitted without the sidecar are counted.

use std::collections::BTreeMap;
use std::process::Output;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chrono::{Timelike, Utc};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use streamgate_operator::config::DEFAULT_EXCLUDED_NAMESPACES;
use streamgate_operator::crd::{StreamingPolicy, StreamingPolicySpec};
use streamgate_operator::metrics::Metrics;
use streamgate_operator::reconcile::FINALIZER;
use streamgate_operator::render::{CONFIGMAP_NAME, POLICY_FILE_KEY};
use streamgate_policy::{OnLimitExceeded, PolicySet, PolicySpec};
use streamgate_testenv::{
    ControlPlane, create_namespace, install_crds, wait_until, workspace_root,
};
use tokio::sync::OnceCell;

const WAIT: Duration = Duration::from_secs(60);

/// The metrics of the one controller the tests share.
fn metrics() -> &'static Arc<Metrics> {
    static METRICS: LazyLock<Arc<Metrics>> = LazyLock::new(|| Arc::new(Metrics::new()));
    &METRICS
}

/// The shared control plane, with the CRD installed and one operator controller running on a
/// runtime of its own (each test has its own runtime, which ends with the test).
async fn setup() -> Result<(&'static ControlPlane, Client)> {
    static STARTED: OnceCell<()> = OnceCell::const_new();
    let cp = streamgate_testenv::shared().await?;
    let client = cp.client().await?;
    STARTED
        .get_or_try_init(|| async {
            install_crds(&client, &workspace_root().join("crds/streamingpolicy.yaml")).await?;
            let kubeconfig = cp.kubeconfig_path().to_path_buf();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Runtime::new().expect("a runtime");
                runtime.block_on(async move {
                    let config = kube::Config::from_custom_kubeconfig(
                        kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig"),
                        &kube::config::KubeConfigOptions::default(),
                    )
                    .await
                    .expect("kube config");
                    let client = Client::try_from(config).expect("client");
                    let excluded = DEFAULT_EXCLUDED_NAMESPACES.map(String::from).into();
                    streamgate_operator::run_controller(client, metrics().clone(), excluded).await;
                });
            });
            anyhow::Ok(())
        })
        .await?;
    Ok((cp, client))
}

fn run(mut cmd: std::process::Command) -> Result<Output> {
    let out = cmd.output().context("running kubectl")?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}{}",
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

async fn rendered(client: &Client, ns: &str) -> Result<Option<String>> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    Ok(cms
        .get_opt(CONFIGMAP_NAME)
        .await?
        .and_then(|cm| cm.data?.remove(POLICY_FILE_KEY)))
}

/// Waits until the rendered file of `ns`, as a sidecar reads it, satisfies `check`.
async fn wait_for_rendering(
    client: &Client,
    ns: &str,
    what: &str,
    check: impl Fn(&PolicySet) -> bool,
) -> Result<String> {
    let check = &check;
    wait_until(WAIT, what, || async move {
        Ok(match rendered(client, ns).await? {
            Some(file) => PolicySet::from_yaml(&file, "rendered", ns).is_ok_and(|s| check(&s)),
            None => false,
        })
    })
    .await?;
    Ok(rendered(client, ns).await?.expect("rendered"))
}

fn ready_condition(policy: &StreamingPolicy) -> Option<(String, String, Option<i64>)> {
    let status = policy.status.as_ref()?;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((
        ready.status.clone(),
        ready.reason.clone(),
        ready.observed_generation,
    ))
}

#[tokio::test]
async fn kubectl_apply_renders_the_policy_reports_ready_and_a_sidecar_enforces_it() -> Result<()> {
    let (cp, client) = setup().await?;
    let ns = create_namespace(&client, "apply", &[]).await?;
    let example = workspace_root().join("examples/streamingpolicy.yaml");
    let mut apply = cp.kubectl();
    apply.args(["apply", "-n", &ns, "-f"]).arg(&example);
    run(apply)?;

    let policies: Api<StreamingPolicy> = Api::namespaced(client.clone(), &ns);
    wait_until(
        WAIT,
        "the policy reports Ready=True for its generation",
        || {
            let policies = policies.clone();
            async move {
                let p = policies.get("default").await?;
                Ok(ready_condition(&p)
                    == Some(("True".into(), "Rendered".into(), p.metadata.generation))
                    && p.status.as_ref().unwrap().observed_generation == p.metadata.generation)
            }
        },
    )
    .await?;
    let policy = policies.get("default").await?;
    assert!(policy.finalizers().iter().any(|f| f == FINALIZER));

    let file = wait_for_rendering(&client, &ns, "the rendered ConfigMap", |s| {
        s.resolve("anyone").source == "default"
    })
    .await?;
    let cm: ConfigMap = Api::namespaced(client.clone(), &ns)
        .get(CONFIGMAP_NAME)
        .await?;
    let owners = cm.metadata.owner_references.unwrap_or_default();
    assert_eq!(owners.len(), 1);
    assert_eq!(owners[0].uid, policy.uid().unwrap());

    // A sidecar handed the rendered payload enforces it: limit 3, RejectNew.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("policies.yaml");
    std::fs::write(&path, &file)?;
    let policies = PolicySet::load(&path, &ns)?;
    let sidecar = streamgate_sidecar::server::Sidecar::in_memory(policies);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let serving = sidecar.clone();
    tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for stream in ["a", "b", "c", "d"] {
        let r = http
            .put(format!("{base}/streaming?account=123&streamId={stream}"))
            .send()
            .await?;
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [201, 201, 201, 429]);
    Ok(())
}

#[tokio::test]
async fn edits_and_deletions_follow_and_a_hand_deleted_configmap_comes_back() -> Result<()> {
    let (_, client) = setup().await?;
    let ns = create_namespace(&client, "lifecycle", &[]).await?;
    let policies: Api<StreamingPolicy> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    let default = StreamingPolicy::new("default", StreamingPolicySpec::default());
    policies.create(&PostParams::default(), &default).await?;
    let vip = StreamingPolicy::new(
        "vip",
        StreamingPolicySpec {
            policy: PolicySpec {
                max_streams_per_account: 10,
                on_limit_exceeded: OnLimitExceeded::EvictOldest,
                accounts: vec!["vip-1".into()],
                ..PolicySpec::default()
            },
        },
    );
    policies.create(&PostParams::default(), &vip).await?;
    wait_for_rendering(&client, &ns, "both policies rendered", |s| {
        s.resolve("anyone").limit == 3 && s.resolve("vip-1").limit == 10
    })
    .await?;

    // Edit: the new limit reaches the ConfigMap.
    let patch = serde_json::json!({"spec": {"maxStreamsPerAccount": 5}});
    policies
        .patch("default", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_for_rendering(&client, &ns, "the edited limit rendered", |s| {
        s.resolve("anyone").limit == 5
    })
    .await?;

    // Delete: the policy leaves the ConfigMap, then its finalizer is released and it is gone.
    policies.delete("vip", &DeleteParams::default()).await?;
    wait_for_rendering(&client, &ns, "the deleted policy removed", |s| {
        s.resolve("vip-1").source == "default"
    })
    .await?;
    wait_until(WAIT, "the deleted policy is gone", || {
        let policies = policies.clone();
        async move { Ok(policies.get_opt("vip").await?.is_none()) }
    })
    .await?;

    // Deleted by hand: recreated.
    cms.delete(CONFIGMAP_NAME, &DeleteParams::default()).await?;
    wait_for_rendering(&client, &ns, "the ConfigMap recreated", |s| {
        s.resolve("anyone").limit == 5
    })
    .await?;

    // Edited by hand: put right.
    let tamper = serde_json::json!({"data": {POLICY_FILE_KEY: "# emptied by hand\n"}});
    cms.patch(
        CONFIGMAP_NAME,
        &PatchParams::default(),
        &Patch::Merge(&tamper),
    )
    .await?;
    wait_for_rendering(&client, &ns, "the ConfigMap restored", |s| {
        s.resolve("anyone").limit == 5
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn overlapping_overrides_are_reported_in_both_statuses() -> Result<()> {
    let (_, client) = setup().await?;
    let ns = create_namespace(&client, "overlap", &[]).await?;
    let policies: Api<StreamingPolicy> = Api::namespaced(client.clone(), &ns);
    for (name, limit) in [("gold", 6), ("silver", 2)] {
        let p = StreamingPolicy::new(
            name,
            StreamingPolicySpec {
                policy: PolicySpec {
                    max_streams_per_account: limit,
                    accounts: vec!["shared-account".into()],
                    ..PolicySpec::default()
                },
            },
        );
        policies.create(&PostParams::default(), &p).await?;
    }
    for name in ["gold", "silver"] {
        wait_until(WAIT, "the overlap is reported", || {
            let policies = policies.clone();
            async move {
                let p = policies.get(name).await?;
                Ok(ready_condition(&p)
                    .is_some_and(|(_, reason, _)| reason == "OverlappingOverrides"))
            }
        })
        .await?;
        let p = policies.get(name).await?;
        let message = &p.status.unwrap().conditions[0].message;
        assert!(message.contains("shared-account"), "{message}");
        assert!(message.contains("2 from \"silver\""), "{message}");
    }
    wait_for_rendering(&client, &ns, "the lower limit applies", |s| {
        s.resolve("shared-account").limit == 2
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn invalid_policies_are_refused_by_the_api_server_naming_the_field() -> Result<()> {
    let (cp, client) = setup().await?;
    let ns = create_namespace(&client, "invalid", &[]).await?;
    let cases = [
        ("maxStreamsPerAccount: 0", "spec.maxStreamsPerAccount"),
        ("maxStreamsPerAccount: 20000", "spec.maxStreamsPerAccount"),
        (
            "sessionTTLSeconds: 40\n  heartbeatIntervalSeconds: 30",
            "spec.sessionTTLSeconds",
        ),
        ("onLimitExceeded: DropEverything", "spec.onLimitExceeded"),
        ("mode: Sometimes", "spec.mode"),
        (
            "allowedOrigins: ['https://player.example.com/path']",
            "spec.allowedOrigins",
        ),
        (
            "accounts: [vip-1]\n  allowedOrigins: ['https://player.example.com']",
            "spec.allowedOrigins",
        ),
        (
            "validators: [{name: a}]",
            "exactly one of url and service must be set",
        ),
        (
            "validators: [{name: a, url: 'https://v.example/', service: {namespace: checks, name: svc}}]",
            "exactly one of url and service must be set",
        ),
        (
            "validators: [{name: a, url: 'https://v.example/'}, {name: a, url: 'https://w.example/'}]",
            "spec.validators[1]",
        ),
        (
            "validators: [{name: a, url: 'https://v.example/', timeoutSeconds: 60}]",
            "spec.validators[0].timeoutSeconds",
        ),
    ];
    let dir = tempfile::tempdir()?;
    for (i, (spec, field)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata:\n  name: bad-{i}\nspec:\n  {spec}\n"
            ),
        )?;
        let out = cp
            .kubectl()
            .args(["apply", "-n", &ns, "-f"])
            .arg(&path)
            .output()?;
        assert!(!out.status.success(), "{spec} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(field), "{spec}: {stderr}");
    }
    let policies: Api<StreamingPolicy> = Api::namespaced(client.clone(), &ns);
    assert!(policies.list(&Default::default()).await?.items.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_spec_the_schema_cannot_catch_is_reported_and_the_last_good_version_stays() -> Result<()>
{
    let (_, client) = setup().await?;
    let ns = create_namespace(&client, "semantic", &[]).await?;
    let policies: Api<StreamingPolicy> = Api::namespaced(client.clone(), &ns);
    let vip = StreamingPolicy::new(
        "vip",
        StreamingPolicySpec {
            policy: PolicySpec {
                max_streams_per_account: 7,
                accounts: vec!["vip-1".into()],
                ..PolicySpec::default()
            },
        },
    );
    policies.create(&PostParams::default(), &vip).await?;
    wait_for_rendering(&client, &ns, "the good version rendered", |s| {
        s.resolve("vip-1").limit == 7
    })
    .await?;

    // An account id with a space passes the schema but no sidecar would accept it.
    let patch =
        serde_json::json!({"spec": {"maxStreamsPerAccount": 1, "accounts": ["vip-1", "bad id"]}});
    policies
        .patch("vip", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_until(WAIT, "Ready=False naming the field", || {
        let policies = policies.clone();
        async move {
            let p = policies.get("vip").await?;
            Ok(ready_condition(&p)
                == Some(("False".into(), "InvalidSpec".into(), p.metadata.generation)))
        }
    })
    .await?;
    let p = policies.get("vip").await?;
    let message = &p.status.unwrap().conditions[0].message;
    assert!(message.contains("spec.accounts[1]"), "{message}");
    let file = rendered(&client, &ns).await?.unwrap();
    let set = PolicySet::from_yaml(&file, "r", &ns)?;
    assert_eq!(set.resolve("vip-1").limit, 7, "the last good version stays");
    Ok(())
}

async fn wait_ready_at_generation(policies: &Api<StreamingPolicy>, name: &str) -> Result<()> {
    wait_until(WAIT, &format!("{name} Ready for its generation"), || {
        let policies = policies.clone();
        async move {
            let p = policies.get(name).await?;
            Ok(ready_condition(&p).is_some_and(|(status, _, generation)| {
                status == "True" && generation == p.metadata.generation
            }))
        }
    })
    .await
}

fn limited(name: &str, limit: u32, accounts: &[&str]) -> StreamingPolicy {
    StreamingPolicy::new(
        name,
        StreamingPolicySpec {
            policy: PolicySpec {
                max_streams_per_account: limit,
                accounts: accounts.iter().map(|a| a.to_string()).collect(),
                ..PolicySpec::default()
            },
        },
    )
}

#[tokio::test]
async fn twenty_policies_cost_one_configmap_write_per_change() -> Result<()> {
    let (_, client) = setup().await?;
    let ns = create_namespace(&client, "twenty", &[]).await?;
    let policies: Api<StreamingPolicy> = Api::namespaced(client.clone(), &ns);
    policies
        .create(&PostParams::default(), &limited("default", 3, &[]))
        .await?;
    for i in 1..20 {
        let account = format!("acct-{i}");
        policies
            .create(
                &PostParams::default(),
                &limited(&format!("p{i:02}"), 4, &[&account]),
            )
            .await?;
    }
    wait_for_rendering(&client, &ns, "all twenty policies rendered", |s| {
        s.policies().len() == 20
    })
    .await?;
    for i in 1..20 {
        wait_ready_at_generation(&policies, &format!("p{i:02}")).await?;
    }
    let start = metrics().configmap_apply_count(&ns);
    assert!(
        (1..=20).contains(&start),
        "creating 20 policies wrote the ConfigMap {start} times"
    );

    for (round, limit) in [5u32, 6, 7].into_iter().enumerate() {
        let patch = serde_json::json!({"spec": {"maxStreamsPerAccount": limit}});
        policies
            .patch("p07", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        wait_for_rendering(&client, &ns, "the edit rendered", |s| {
            s.resolve("acct-7").limit == limit
        })
        .await?;
        wait_ready_at_generation(&policies, "p07").await?;
        // The status write, and the ConfigMap's own watch event, wake the namespace again:
        // those reconciles find nothing to write. A stray write shows in the next round.
        assert_eq!(
            metrics().configmap_apply_count(&ns) - start,
            round as u64 + 1,
            "one ConfigMap write per edit (edit {})",
            round + 1
        );
    }
    // A last edit of another policy: any stray write after the third round shows here.
    let patch = serde_json::json!({"spec": {"maxStreamsPerAccount": 9}});
    policies
        .patch("default", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_for_rendering(&client, &ns, "the last edit rendered", |s| {
        s.resolve("anyone").limit == 9
    })
    .await?;
    wait_ready_at_generation(&policies, "default").await?;
    assert_eq!(metrics().configmap_apply_count(&ns) - start, 4);
    let rendered_text = metrics().render();
    assert!(
        rendered_text.contains(&format!(
            "streamgate_operator_configmap_applies_total{{namespace=\"{ns}\"}} {}",
            start + 4
        )),
        "{rendered_text}"
    );
    Ok(())
}

#[tokio::test]
async fn concurrent_edits_are_all_rendered() -> Result<()> {
    let (_, client) = setup().await?;
    let ns = create_namespace(&client, "concurrent", &[]).await?;
    let policies: Api<StreamingPolicy> = Api::namespaced(client.clone(), &ns);
    for i in 0..10 {
        policies
            .create(
                &PostParams::default(),
                &limited(&format!("p{i}"), 1, &[&format!("acct-{i}")]),
            )
            .await?;
    }
    // Ten writers, five edits each, all at once: the last edit of every policy must win.
    let writers = (0..10).map(|i| {
        let policies = policies.clone();
        tokio::spawn(async move {
            for limit in 2..=6u32 {
                let patch = serde_json::json!({"spec": {"maxStreamsPerAccount": limit + i}});
                policies
                    .patch(
                        &format!("p{i}"),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
            }
            anyhow::Ok(())
        })
    });
    for writer in futures::future::join_all(writers).await {
        writer??;
    }
    wait_for_rendering(&client, &ns, "every last edit rendered", |s| {
        (0..10).all(|i| s.resolve(&format!("acct-{i}")).limit == 6 + i)
    })
    .await?;
    for i in 0..10 {
        wait_ready_at_generation(&policies, &format!("p{i}")).await?;
    }
    Ok(())
}

fn windowed(
    name: &str,
    from: chrono::DateTime<Utc>,
    until: chrono::DateTime<Utc>,
) -> StreamingPolicy {
    let mut policy = limited(name, 5, &["fan-1"]);
    policy.spec.policy.active_from = Some(from);
    policy.spec.policy.active_until = Some(until);
    policy
}

async fn wait_reason(policies: &Api<StreamingPolicy>, name: &str, reason: &str) -> Result<()> {
    wait_until(WAIT, &format!("{name} reports {reason}"), || {
        let policies = policies.clone();
        async move {
            let p = policies.get(name).await?;
            Ok(ready_condition(&p)
                .is_some_and(|(_, r, g)| r == reason && g == p.metadata.generation))
        }
    })
    .await
}

#[tokio::test]
async fn a_time_boxed_override_applies_and_lapses_on_its_own() -> Result<()> {
    let (cp, client) = setup().await?;
    let ns = create_namespace(&client, "window", &[]).await?;
    let policies: Api<StreamingPolicy> = Api::namespaced(client.clone(), &ns);
    policies
        .create(&PostParams::default(), &limited("default", 2, &[]))
        .await?;
    // Whole seconds: the API server keeps RFC 3339 timestamps to the second.
    let now = Utc::now().with_nanosecond(0).expect("valid");
    let from = now + chrono::Duration::seconds(6);
    let until = from + chrono::Duration::seconds(6);
    policies
        .create(&PostParams::default(), &windowed("weekend", from, until))
        .await?;

    wait_reason(&policies, "weekend", "Scheduled").await?;
    let file = rendered(&client, &ns).await?.context("rendered")?;
    assert!(
        !file.contains("weekend"),
        "rendered before activeFrom:\n{file}"
    );
    let listing = run({
        let mut get = cp.kubectl();
        get.args(["get", "sp", "-n", &ns]);
        get
    })?;
    let table = String::from_utf8_lossy(&listing.stdout);
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.contains("ACTIVE-FROM")
            && header.contains("ACTIVE-UNTIL")
            && header.contains("REASON"),
        "{table}"
    );
    let weekend_row = table
        .lines()
        .find(|l| l.starts_with("weekend"))
        .unwrap_or_default();
    assert!(
        weekend_row.contains(&from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            && weekend_row.contains("Scheduled"),
        "{table}"
    );

    // No event but the clock: the override comes into force at activeFrom...
    wait_for_rendering(&client, &ns, "the override in force", |s| {
        s.resolve_at("fan-1", Utc::now()).limit == 5
    })
    .await?;
    wait_reason(&policies, "weekend", "Rendered").await?;
    assert!(Utc::now() >= from, "rendered before its window opened");
    // ...and lapses at activeUntil.
    wait_reason(&policies, "weekend", "Expired").await?;
    assert!(Utc::now() >= until, "expired before its window closed");
    let file = wait_for_rendering(&client, &ns, "the override gone", |s| {
        s.policies().iter().all(|p| p.name != "weekend")
    })
    .await?;
    assert_eq!(
        PolicySet::from_yaml(&file, "r", &ns)?
            .resolve("fan-1")
            .limit,
        2
    );
    Ok(())
}

#[tokio::test]
async fn a_reversed_window_is_refused_by_the_api_server() -> Result<()> {
    let (_, client) = setup().await?;
    let ns = create_namespace(&client, "reversed", &[]).await?;
    let policies: Api<StreamingPolicy> = Api::namespaced(client.clone(), &ns);
    let at = Utc::now();
    for until in [at, at - chrono::Duration::hours(1)] {
        let refused = policies
            .create(&PostParams::default(), &windowed("reversed", at, until))
            .await;
        match refused {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{status:?}");
                assert!(
                    status
                        .message
                        .contains("spec.activeUntil must be later than spec.activeFrom"),
                    "{}",
                    status.message
                );
            }
            other => bail!("a reversed window was not refused: {other:?}"),
        }
    }
    Ok(())
}

fn pod(name: &str, annotations: &[(&str, &str)]) -> Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "annotations": annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        },
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    }))?)
}

fn without_sidecar_line(ns: &str, count: u32) -> String {
    format!("streamgate_operator_pods_without_sidecar{{namespace=\"{ns}\"}} {count}")
}

#[tokio::test]
async fn opted_in_pods_admitted_without_the_sidecar_are_counted() -> Result<()> {
    let (_, client) = setup().await?;
    let ns = create_namespace(
        &client,
        "unprotected",
        &[("streamgate.dev/inject", "enabled")],
    )
    .await?;
    let other = create_namespace(&client, "bystander", &[]).await?;
    // The injection webhook is registered but unreachable: a listener that never accepts, so
    // the API server times out and, with failurePolicy Ignore, admits the pod unchanged.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let webhook = format!("unreachable-{ns}");
    let configuration: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": webhook},
        "webhooks": [{
            "name": "namespace.inject.streamgate.dev",
            "clientConfig": {"url": format!("https://{}/inject/namespace-enabled", silent.local_addr()?)},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "failurePolicy": "Ignore",
            "timeoutSeconds": 1,
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
        }],
    }))?;
    let configurations = Api::<MutatingWebhookConfiguration>::all(client.clone());
    configurations
        .create(&PostParams::default(), &configuration)
        .await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let admitted = pods
        .create(&PostParams::default(), &pod("player", &[])?)
        .await?;
    assert!(
        !admitted
            .annotations()
            .contains_key("streamgate.dev/injected"),
        "the premise: the pod started without the sidecar"
    );
    // Not counted: injected, opted out, or in a namespace that never asked.
    pods.create(
        &PostParams::default(),
        &pod("injected", &[("streamgate.dev/injected", "0.1.0")])?,
    )
    .await?;
    pods.create(
        &PostParams::default(),
        &pod("opted-out", &[("streamgate.dev/inject", "disabled")])?,
    )
    .await?;
    Api::<Pod>::namespaced(client.clone(), &other)
        .create(&PostParams::default(), &pod("plain", &[])?)
        .await?;
    configurations
        .delete(&webhook, &DeleteParams::default())
        .await?;

    wait_until(WAIT, "the unprotected pod counted", || async {
        Ok(metrics().render().contains(&without_sidecar_line(&ns, 1)))
    })
    .await?;
    assert!(
        !metrics()
            .render()
            .contains(&format!("namespace=\"{other}\""))
    );

    // Deleted: no longer counted.
    pods.delete("player", &DeleteParams::default().grace_period(0))
        .await?;
    wait_until(WAIT, "the count back to none", || async {
        Ok(!metrics().render().contains(&format!(
            "streamgate_operator_pods_without_sidecar{{namespace=\"{ns}\"}}"
        )))
    })
    .await?;
    drop(silent);
    Ok(())
}

/// A Service-backed validator renders as the URL sidecars call, next to a URL validator; a
/// sidecar reading the rendered file calls both.
#[tokio::test]
async fn a_service_validator_renders_as_its_cluster_url_and_a_sidecar_uses_it() -> Result<()> {
    let (cp, client) = setup().await?;
    let ns = create_namespace(&client, "validators", &[]).await?;
    // A loopback validator that denies one account, for the sidecar to reach.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let review_url = format!("http://{}/review", listener.local_addr()?);
    let app = axum::Router::new().route(
        "/review",
        axum::routing::post(
            |axum::Json(review): axum::Json<serde_json::Value>| async move {
                let denied = review["request"]["session"]["account"] == "blocked";
                axum::Json(serde_json::json!({"allowed": !denied, "message": "blocked here"}))
            },
        ),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir()?;
    let manifest = dir.path().join("policy.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata:\n  name: default\nspec:\n  validators:\n  - name: entitlement\n    service: {{namespace: checks, name: entitlement, port: 8443, path: /review}}\n    timeoutSeconds: 1\n    mode: Blocking\n  - name: local\n    url: '{review_url}'\n    mode: Blocking\n"
        ),
    )?;
    let mut apply = cp.kubectl();
    apply.args(["apply", "-n", &ns, "-f"]).arg(&manifest);
    run(apply)?;
    let file = wait_for_rendering(&client, &ns, "the validators rendered", |s| {
        s.resolve("anyone").validators.len() == 2
    })
    .await?;
    assert!(
        file.contains("url: https://entitlement.checks.svc:8443/review"),
        "{file}"
    );
    assert!(!file.contains("service:"), "{file}");

    let path = dir.path().join("policies.yaml");
    std::fs::write(&path, &file)?;
    let sidecar = streamgate_sidecar::server::Sidecar::in_memory(PolicySet::load(&path, &ns)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { sidecar.serve(listener, std::future::pending()).await });
    let http = reqwest::Client::new();
    let open = |account: &str| {
        http.put(format!("{base}/streaming?account={account}&streamId=tv"))
            .send()
    };
    let denied = open("blocked").await?;
    assert_eq!(denied.status(), 403);
    let body: serde_json::Value = denied.json().await?;
    assert_eq!(body["message"], "blocked here");
    // The service URL does not resolve outside a cluster: under failurePolicy Allow the
    // session is admitted, its validation `failed`.
    let admitted = open("fan").await?;
    assert_eq!(admitted.status(), 201);
    let body: serde_json::Value = admitted.json().await?;
    assert_eq!(body["validation"], "failed", "{body}");
    Ok(())
}
