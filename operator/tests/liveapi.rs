//! The live-session API (`kubectl get|delete streamingsessions`) on a real kube-apiserver with
//! the aggregation layer, over real sidecars on the test Redis.
//!
//! Needs `testenv/build` (the control plane, run in a network namespace: root, `ip`, `nsenter`,
//! `socat`) and `scripts/redis-up` (`STREAMGATE_TEST_REDIS`). Without them the tests fail.

use std::collections::BTreeSet;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser as _;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use streamgate_operator::certs::{self, SelfIssued, ServingCert};
use streamgate_operator::config::Config;
use streamgate_operator::liveapi;
use streamgate_sidecar::server::Sidecar;
use streamgate_sidecar::store::{RedisStore, RedisTarget, SessionStore};
use streamgate_sidecar::validation::RedisLedger;
use streamgate_testenv::{
    ControlPlane, FIELD_MANAGER, create_namespace, point_service_at, shared_aggregated, wait_until,
};

/// The Redis database this test binary keeps its sessions in, so that listing "exactly the live
/// sessions" is not disturbed by other test binaries sharing the test Redis (database 0).
const DB: u32 = 11;

fn redis_url() -> Result<String> {
    let base = std::env::var("STREAMGATE_TEST_REDIS").context(
        "STREAMGATE_TEST_REDIS is not set: start the test Redis with `eval \"$(scripts/redis-up)\"`",
    )?;
    Ok(format!("{}/{DB}", base.trim_end_matches('/')))
}

/// Empties this binary's database: listing must show this run's sessions only.
fn flush(url: &str) -> Result<()> {
    let out = std::process::Command::new("redis-cli")
        .args(["-u", url, "FLUSHDB"])
        .output()
        .context("running redis-cli")?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK"),
        "redis-cli FLUSHDB: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

const POLICIES: &str = "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {name: standard}\nspec: {maxStreamsPerAccount: 3}\n---\napiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {name: vip}\nspec: {maxStreamsPerAccount: 5, accounts: [\"vip-7\"]}\n";

/// A real sidecar on the test Redis with an endless upstream stream; returns its base URL once
/// it follows other sidecars' revocations.
async fn start_sidecar(
    url: &str,
    namespace: &str,
    upstream: &str,
    validator: &str,
) -> Result<String> {
    let target = RedisTarget::parse(url).map_err(anyhow::Error::msg)?;
    let store = Arc::new(RedisStore::new(target.clone(), Duration::from_secs(2)));
    // The vip policy has a session validator (the CRDs need not: the API reads policy names).
    let vip = "accounts: [\"vip-7\"]";
    let with_validator = POLICIES.replace(
        vip,
        &format!("{vip}, validators: [{{name: entitlement, url: '{validator}'}}]"),
    );
    let policies =
        streamgate_sidecar::policy::PolicySet::from_yaml(&with_validator, "test", namespace)?;
    let ledger = Arc::new(RedisLedger::new(target, namespace, Duration::from_secs(2)));
    let sidecar = Sidecar::with_store(store.clone(), policies)
        .with_validation_ledger(ledger)
        .with_upstream(reqwest::Url::parse(upstream)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { sidecar.serve(listener, std::future::pending()).await });
    let mut subscribed = store.subscribed();
    tokio::time::timeout(Duration::from_secs(10), subscribed.wait_for(|s| *s))
        .await
        .context("the sidecar did not subscribe to revocations")??;
    Ok(base)
}

/// A session validator that allows every SessionReview; returns its URL.
async fn allowing_validator() -> Result<String> {
    let router = axum::Router::new().route(
        "/review",
        axum::routing::post(|| async { axum::Json(json!({"allowed": true})) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/review", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(url)
}

async fn endless_upstream() -> Result<String> {
    let router = axum::Router::new().route(
        "/live",
        axum::routing::get(|| async {
            let chunks = futures::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Some((Ok::<_, std::io::Error>(vec![0u8; 1024]), ()))
            });
            axum::body::Body::from_stream(chunks)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(base)
}

async fn open(http: &reqwest::Client, base: &str, account: &str, stream: &str) -> Result<String> {
    let answer: Value = http
        .put(format!(
            "{base}/streaming?account={account}&streamId={stream}"
        ))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(answer["sessionId"]
        .as_str()
        .context("the sidecar answers a sessionId")?
        .to_string())
}

/// Runs kubectl on a blocking thread with a deadline; returns its output whatever the status.
async fn kubectl(cp: &ControlPlane, args: &[&str]) -> Result<Output> {
    let mut cmd = cp.kubectl();
    cmd.args(args).arg("--request-timeout=20s");
    let what = format!("kubectl {}", args.join(" "));
    tokio::task::spawn_blocking(move || cmd.output())
        .await?
        .with_context(|| format!("running {what}"))
}

async fn kubectl_ok(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let out = kubectl(cp, args).await?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn kubectl_fails(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let out = kubectl(cp, args).await?;
    ensure!(
        !out.status.success(),
        "kubectl {} should fail but printed {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Names of the items of `kubectl get ... -o json`.
fn names(json_text: &str) -> Result<BTreeSet<String>> {
    let list: Value = serde_json::from_str(json_text)?;
    Ok(list["items"]
        .as_array()
        .context("a list")?
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_string))
        .collect())
}

async fn apply<K>(api: &Api<K>, name: &str, value: Value) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await
    .with_context(|| format!("applying {name}"))?;
    Ok(())
}

async fn store_secret(client: &Client, namespace: &str, url: &str) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    apply(
        &api,
        "streamgate-store",
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "streamgate-store", "namespace": namespace},
            "stringData": {"url": url},
        }),
    )
    .await
}

/// Runs the operator's live API in this process (as `--live-api-listen` does in the binary)
/// and registers it with the API server through the control plane's network namespace; waits
/// until the APIService is Available, its caBundle set by the operator.
async fn start_live_api(
    cp: &ControlPlane,
    client: &Client,
    operator_ns: &str,
) -> Result<std::net::SocketAddr> {
    let config = Config::try_parse_from([
        "streamgate-operator",
        "--namespace",
        operator_ns,
        "--sidecar-store-secret",
        "streamgate-store",
        "--live-api-listen",
        "127.0.0.1:0",
    ])?;
    let settings = SelfIssued {
        namespace: operator_ns.to_string(),
        secret: config.webhook_secret.clone(),
        webhook_configuration: config.webhook_configuration.clone(),
        hosts: config.webhook_cert_hosts(),
        validity: Duration::from_secs(86_400),
    };
    let material = certs::ensure_secret(client, &settings).await?;
    let cert = Arc::new(ServingCert::default());
    cert.load(&material.cert_pem, &material.key_pem)?;
    let addr = liveapi::start(
        client.clone(),
        &config,
        config.live_api_listen.expect("set above"),
        cert,
    )
    .await?;
    let exposed = cp.expose(addr.port()).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), operator_ns);
    apply(
        &services,
        &config.webhook_service,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": config.webhook_service, "namespace": operator_ns},
            "spec": {"ports": [{"name": "live-api", "port": 443, "targetPort": exposed.port()}]},
        }),
    )
    .await?;
    point_service_at(
        client,
        operator_ns,
        &config.webhook_service,
        "live-api",
        exposed,
    )
    .await?;
    // Registered without a caBundle: the operator fills it in from its certificate Secret.
    let api_services: Api<APIService> = Api::all(client.clone());
    apply(
        &api_services,
        liveapi::API_SERVICE,
        json!({
            "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
            "metadata": {"name": liveapi::API_SERVICE},
            "spec": {
                "group": "live.streamgate.dev", "version": "v1alpha1",
                "service": {"name": config.webhook_service, "namespace": operator_ns, "port": 443},
                "groupPriorityMinimum": 1000, "versionPriority": 15,
            },
        }),
    )
    .await?;
    wait_until(
        Duration::from_secs(90),
        "the APIService to be Available",
        || async {
            let service = api_services.get(liveapi::API_SERVICE).await?;
            Ok(service
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Available" && c.status == "True"))
        },
    )
    .await
    .with_context(|| cp.apiserver_log_tail())?;
    let bundle = api_services
        .get(liveapi::API_SERVICE)
        .await?
        .spec
        .and_then(|s| s.ca_bundle)
        .context("the operator set the caBundle")?;
    ensure!(bundle.0 == material.ca_bundle().into_bytes());
    // The proxy learns of availability a moment after the status says so.
    wait_until(
        Duration::from_secs(30),
        "the group to answer through the API server",
        || async {
            let out = kubectl(cp, &["get", "--raw", "/apis/live.streamgate.dev/v1alpha1"]).await?;
            Ok(out.status.success())
        },
    )
    .await?;
    Ok(addr)
}

/// Callers that bypass the API server are not believed: the user headers count only on a
/// connection with the front proxy's client certificate.
async fn spoofed_callers_are_refused(addr: std::net::SocketAddr, namespace: &str) -> Result<()> {
    let url = format!(
        "https://127.0.0.1:{}/apis/live.streamgate.dev/v1alpha1/namespaces/{namespace}/streamingsessions",
        addr.port()
    );
    let spoof = |builder: reqwest::RequestBuilder| {
        builder
            .header("X-Remote-User", "admin")
            .header("X-Remote-Group", "system:masters")
    };
    // No client certificate: 401, a Status naming the reason, and nothing listed.
    let plain = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()?;
    let answer = spoof(plain.get(&url)).send().await?;
    ensure!(
        answer.status() == 401,
        "without a certificate: {}",
        answer.status()
    );
    let status: Value = answer.json().await?;
    ensure!(
        status["kind"] == "Status" && status["reason"] == "Unauthorized",
        "{status}"
    );
    ensure!(
        status["message"]
            .as_str()
            .unwrap_or_default()
            .contains("front-proxy"),
        "{status}"
    );
    let kick = spoof(plain.delete(format!("{url}/{}", "0".repeat(40))))
        .send()
        .await?;
    ensure!(
        kick.status() == 401,
        "kick without a certificate: {}",
        kick.status()
    );
    // A certificate with the allowed name from a CA of the caller's making: the handshake fails.
    let rogue = streamgate_testenv::Ca::new("rogue")?;
    let pair = rogue.client(streamgate_testenv::FRONT_PROXY_CLIENT, None)?;
    let identity =
        reqwest::Identity::from_pem(format!("{}{}", pair.cert_pem, pair.key_pem).as_bytes())?;
    let rogue_client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .identity(identity)
        .build()?;
    match spoof(rogue_client.get(&url)).send().await {
        Err(_) => {}
        Ok(answer) => bail!("a rogue front-proxy certificate got {}", answer.status()),
    }
    Ok(())
}

/// Resolves namespaces' stores as the operator started with `--sidecar-store-secret` does.
fn counting_resolver(client: &Client) -> Arc<dyn liveapi::sessions::SessionsResolver> {
    Arc::new(liveapi::sessions::StoreResolver::new(
        client.clone(),
        streamgate_operator::inject::StoreSource::Secret {
            name: "streamgate-store".into(),
            key: "url".into(),
        },
        Box::new(liveapi::sessions::StoreSessions::connect),
    ))
}

/// Runs one round of the operator's session count, then reads the ACTIVE column of
/// `kubectl get streamingpolicies` and compares it with `expected` (policy, count).
async fn expect_active(
    cp: &ControlPlane,
    client: &Client,
    resolver: &dyn liveapi::sessions::SessionsResolver,
    namespace: &str,
    expected: &[(&str, u64)],
) -> Result<()> {
    liveapi::active::refresh_once(client, resolver).await?;
    let table = kubectl_ok(cp, &["get", "streamingpolicies", "-n", namespace]).await?;
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let column = header
        .iter()
        .position(|c| *c == "ACTIVE")
        .with_context(|| format!("no ACTIVE column:\n{table}"))?;
    for (policy, count) in expected {
        let row: Vec<&str> = lines
            .clone()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cells| cells.first() == Some(policy))
            .with_context(|| format!("no row {policy}:\n{table}"))?;
        ensure!(
            row.get(column) == Some(&count.to_string().as_str()),
            "ACTIVE of {policy} should be {count}:\n{table}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_lists_selects_explains_kicks_and_authorizes_live_sessions() -> Result<()> {
    let cp = shared_aggregated().await?;
    let client = cp.client().await?;
    let url = redis_url()?;
    flush(&url)?;
    streamgate_testenv::install_crds(
        &client,
        &streamgate_testenv::workspace_root().join("crds/streamingpolicy.yaml"),
    )
    .await?;
    let operator_ns = create_namespace(&client, "sg-system", &[]).await?;
    let ns = create_namespace(&client, "streaming", &[]).await?;
    let embedded_ns = create_namespace(&client, "embedded", &[]).await?;
    // The sidecars read their store URL from this Secret (--sidecar-store-secret).
    store_secret(&client, &ns, &url).await?;
    store_secret(&client, &embedded_ns, "memory").await?;
    for doc in POLICIES.split("---\n") {
        let mut value: Value = serde_yaml::from_str(doc)?;
        value["metadata"]["namespace"] = json!(ns);
        let name = value["metadata"]["name"]
            .as_str()
            .context("a name")?
            .to_string();
        let api: Api<streamgate_operator::crd::StreamingPolicy> =
            Api::namespaced(client.clone(), &ns);
        apply(&api, &name, value).await?;
    }

    // Two sidecars on one Redis, as two pods of the namespace would be.
    let upstream = endless_upstream().await?;
    let validator = allowing_validator().await?;
    let first = start_sidecar(&url, &ns, &upstream, &validator).await?;
    let second = start_sidecar(&url, &ns, &upstream, &validator).await?;
    let http = reqwest::Client::new();
    let tv = open(&http, &first, "acct-1", "tv").await?;
    let phone = open(&http, &second, "acct-1", "phone").await?;
    let vip = open(&http, &first, "vip-7", "tv").await?;
    let live: BTreeSet<String> = [&tv, &phone, &vip].into_iter().cloned().collect();

    let addr = start_live_api(cp, &client, &operator_ns).await?;
    spoofed_callers_are_refused(addr, &ns).await?;

    // kubectl lists exactly the live sessions, as a table and as objects.
    let table = kubectl_ok(cp, &["get", "streamingsessions", "-n", &ns]).await?;
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "ACCOUNT", "STREAM", "STATE", "AGE", "EXPIRES"] {
        ensure!(header.contains(column), "no {column} column in:\n{table}");
    }
    ensure!(
        !header.contains("POLICY"),
        "POLICY is for -o wide only:\n{table}"
    );
    ensure!(table.lines().count() == 4, "three rows expected:\n{table}");
    ensure!(
        !header.contains("VALIDATION"),
        "VALIDATION is for -o wide only:\n{table}"
    );
    // The vip policy's validator answers the sidecar's SessionReview with an allow.
    wait_until(
        Duration::from_secs(30),
        "the vip session's verdict",
        || async {
            let wide = kubectl_ok(cp, &["get", "sgs", "-n", &ns, "-o", "wide"]).await?;
            Ok(wide
                .lines()
                .any(|l| l.starts_with(&vip) && l.trim_end().ends_with("allowed")))
        },
    )
    .await?;
    let wide = kubectl_ok(cp, &["get", "sgs", "-n", &ns, "-o", "wide"]).await?;
    let wide_header: Vec<&str> = wide
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        wide_header.ends_with(&["POLICY", "VALIDATION"]),
        "VALIDATION next to POLICY:\n{wide}"
    );
    let cells = |id: &str| -> Result<Vec<String>> {
        Ok(wide
            .lines()
            .find(|l| l.starts_with(id))
            .with_context(|| format!("the row of {id}:\n{wide}"))?
            .split_whitespace()
            .map(str::to_string)
            .collect())
    };
    let vip_row = cells(&vip)?;
    ensure!(
        vip_row.contains(&"vip-7".to_string())
            && vip_row.ends_with(&["vip".into(), "allowed".into()]),
        "{wide}"
    );
    let tv_row = cells(&tv)?;
    ensure!(
        tv_row.contains(&"active".to_string())
            && tv_row.ends_with(&["standard".into(), "<none>".into()]),
        "no validators for the standard policy: <none>\n{wide}"
    );
    let vip_yaml: Value = serde_yaml::from_str(
        &kubectl_ok(cp, &["get", "sgs", &vip, "-n", &ns, "-o", "yaml"]).await?,
    )?;
    ensure!(
        vip_yaml["status"]["validation"] == "allowed",
        "status.validation: {vip_yaml:?}"
    );
    let tv_yaml: Value = serde_yaml::from_str(
        &kubectl_ok(cp, &["get", "sgs", &tv, "-n", &ns, "-o", "yaml"]).await?,
    )?;
    ensure!(
        tv_yaml["status"].get("validation").is_none(),
        "omitted without validators: {tv_yaml:?}"
    );
    let all = kubectl_ok(cp, &["get", "sgs", "-n", &ns, "-o", "json"]).await?;
    ensure!(
        names(&all)? == live,
        "listed {:?}, live {live:?}",
        names(&all)?
    );

    // ACTIVE on `kubectl get sp`: live sessions per policy, counted from the store.
    let resolver = counting_resolver(&client);
    expect_active(
        cp,
        &client,
        resolver.as_ref(),
        &ns,
        &[("standard", 2), ("vip", 1)],
    )
    .await?;

    // Paging: one session per request, kubectl follows the continue tokens.
    let paged = kubectl_ok(
        cp,
        &["get", "sgs", "-n", &ns, "--chunk-size", "1", "-o", "json"],
    )
    .await?;
    ensure!(names(&paged)? == live, "paged listing {:?}", names(&paged)?);

    // The field selector narrows to one account.
    let selected = kubectl_ok(
        cp,
        &[
            "get",
            "sgs",
            "-n",
            &ns,
            "--field-selector",
            "spec.account=acct-1",
            "-o",
            "json",
        ],
    )
    .await?;
    ensure!(names(&selected)? == [tv.clone(), phone.clone()].into_iter().collect());
    let unsupported = kubectl_fails(
        cp,
        &[
            "get",
            "sgs",
            "-n",
            &ns,
            "--field-selector",
            "spec.streamId=tv",
        ],
    )
    .await?;
    ensure!(unsupported.contains("spec.streamId"), "{unsupported}");

    // One object by id, with spec and status.
    let one: Value = serde_json::from_str(
        &kubectl_ok(
            cp,
            &["get", "streamingsession", &vip, "-n", &ns, "-o", "json"],
        )
        .await?,
    )?;
    ensure!(
        one["spec"] == json!({"account": "vip-7", "streamId": "tv"}),
        "{one}"
    );
    ensure!(
        one["status"]["state"] == "active" && one["status"]["policy"] == "vip",
        "{one}"
    );

    // kubectl explain reads the OpenAPI v3 document.
    // The API server fetches an APIService's OpenAPI document in the background: retry.
    wait_until(Duration::from_secs(60), "kubectl explain", || async {
        let out = kubectl(cp, &["explain", "streamingsession"]).await?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(true)
    })
    .await?;
    let explained = kubectl_ok(cp, &["explain", "streamingsession"]).await?;
    ensure!(
        explained.contains("StreamingSession") && explained.contains("spec"),
        "{explained}"
    );
    let field = kubectl_ok(cp, &["explain", "sgs.spec.account"]).await?;
    ensure!(field.contains("account"), "{field}");

    // RBAC decides: a user without a role is refused, one with a Role may list and kick.
    let refused = kubectl_fails(cp, &["get", "sgs", "-n", &ns, "--as", "mallory"]).await?;
    ensure!(refused.contains("forbidden"), "{refused}");
    let refused = kubectl_fails(cp, &["delete", "sgs", &tv, "-n", &ns, "--as", "mallory"]).await?;
    ensure!(refused.contains("forbidden"), "{refused}");
    kubectl_ok(
        cp,
        &[
            "create",
            "role",
            "session-admin",
            "-n",
            &ns,
            "--verb=get,list,delete",
            "--resource=streamingsessions.live.streamgate.dev",
        ],
    )
    .await?;
    kubectl_ok(
        cp,
        &[
            "create",
            "rolebinding",
            "session-admin",
            "-n",
            &ns,
            "--role=session-admin",
            "--user=alice",
        ],
    )
    .await?;
    let can = kubectl_ok(
        cp,
        &[
            "auth",
            "can-i",
            "delete",
            "streamingsessions.live.streamgate.dev",
            "-n",
            &ns,
            "--as",
            "alice",
        ],
    )
    .await?;
    ensure!(can.trim() == "yes", "{can}");
    wait_until(Duration::from_secs(10), "alice's Role to apply", || async {
        Ok(kubectl(cp, &["get", "sgs", "-n", &ns, "--as", "alice"])
            .await?
            .status
            .success())
    })
    .await?;
    // The Role is namespaced: elsewhere alice is still refused.
    let elsewhere = kubectl_fails(cp, &["get", "sgs", "-n", &embedded_ns, "--as", "alice"]).await?;
    ensure!(elsewhere.contains("forbidden"), "{elsewhere}");

    // Deleting kicks: the session's proxied stream is cut within a second.
    let mut media = http
        .get(format!("{first}/live"))
        .header("X-StreamGate-Session", &tv)
        .send()
        .await?;
    ensure!(
        media.status().is_success(),
        "media refused: {}",
        media.status()
    );
    media.chunk().await?.context("media flows")?;
    let deleted = kubectl_ok(cp, &["delete", "sgs", &tv, "-n", &ns, "--as", "alice"]).await?;
    ensure!(deleted.contains("deleted"), "{deleted}");
    let kicked_at = Instant::now();
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while media.chunk().await.is_ok_and(|c| c.is_some()) {}
    })
    .await;
    ensure!(drained.is_ok(), "the kicked stream was not cut within 5 s");
    let cut_after = kicked_at.elapsed();
    ensure!(
        cut_after < Duration::from_secs(1),
        "the stream was cut after {cut_after:?}"
    );
    println!("kicked stream cut {cut_after:?} after kubectl delete returned");
    let after = kubectl_ok(cp, &["get", "sgs", "-n", &ns, "-o", "json"]).await?;
    ensure!(names(&after)? == [phone.clone(), vip.clone()].into_iter().collect());
    expect_active(
        cp,
        &client,
        resolver.as_ref(),
        &ns,
        &[("standard", 1), ("vip", 1)],
    )
    .await?;
    // Deleting it again: NotFound, as for any object that is gone.
    let again = kubectl_fails(cp, &["delete", "sgs", &tv, "-n", &ns]).await?;
    ensure!(
        again.contains("NotFound") || again.contains("not found"),
        "{again}"
    );
    let unknown = kubectl_fails(cp, &["get", "sgs", &"0".repeat(40), "-n", &ns]).await?;
    ensure!(unknown.contains("not found"), "{unknown}");

    // Watch is not served: kubectl get -w fails saying so.
    let watch = kubectl_fails(cp, &["get", "sgs", "-n", &ns, "--watch-only"]).await?;
    ensure!(watch.contains("watch is not supported"), "{watch}");

    // Sidecars on the embedded memory store share nothing: a clear error.
    let embedded = kubectl_fails(cp, &["get", "sgs", "-n", &embedded_ns]).await?;
    ensure!(embedded.contains("embedded memory store"), "{embedded}");
    Ok(())
}

/// The operator binary, killed when dropped.
struct Operator(std::process::Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads the operator's stdout until it reports the live API's address; keeps draining after.
fn reported_live_api_port(child: &mut std::process::Child) -> Result<u16> {
    use std::io::BufRead as _;
    let stdout = child.stdout.take().context("piped stdout")?;
    let (found, reported) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut found = Some(found);
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("serving the live-session API")
                && let Some(at) = line.find("127.0.0.1:")
            {
                let digits: String = line[at + "127.0.0.1:".len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if let (Some(found), Ok(port)) = (found.take(), digits.parse::<u16>()) {
                    let _ = found.send(port);
                }
            }
        }
    });
    reported
        .recv_timeout(Duration::from_secs(60))
        .context("the operator did not report its live API address")
}

/// The chart on a real API server with the aggregation layer: `helm install`, then the operator
/// binary with the chart's Deployment arguments and only the chart's RBAC (impersonating its
/// ServiceAccount). The chart's APIService becomes Available (the operator sets its caBundle)
/// and kubectl reads a namespace's sessions through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_apiservice_becomes_available_with_the_charts_rbac() -> Result<()> {
    // A control plane of its own: the APIService is cluster-wide, and the other test has one.
    let cp = ControlPlane::start_aggregated().await?;
    let client = cp.client().await?;
    let ns = create_namespace(&client, "chart-live", &[]).await?;
    let app_ns = create_namespace(&client, "chart-app", &[]).await?;
    let url = redis_url()?;
    store_secret(&client, &app_ns, &url).await?;
    let release = "sg";
    let mut install = cp.helm();
    install
        .args(["install", release])
        .arg(streamgate_testenv::workspace_root().join("charts/streamgate"))
        .args([
            "--namespace",
            &ns,
            "--set",
            "sidecar.store.existingSecret=streamgate-store",
        ]);
    let out = tokio::task::spawn_blocking(move || install.output()).await??;
    ensure!(
        out.status.success(),
        "helm install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let fullname = format!("{release}-streamgate");
    let deployment = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), &ns)
        .get(&fullname)
        .await?;
    let container = &deployment
        .spec
        .template
        .spec
        .context("a pod spec")?
        .containers[0];
    let mut args: Vec<String> = container
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| !a.contains("-listen="))
        .collect();
    args.extend(
        ["--metrics-listen", "--webhook-listen", "--live-api-listen"]
            .map(|flag| format!("{flag}=127.0.0.1:0")),
    );
    ensure!(
        args.iter()
            .any(|a| a == "--live-api-service=v1alpha1.live.streamgate.dev"),
        "the chart passes the APIService name: {args:?}"
    );
    // Only the chart's RBAC: act as its ServiceAccount.
    let text = std::fs::read_to_string(cp.kubeconfig_path())?;
    let mut kubeconfig: serde_yaml::Value = serde_yaml::from_str(&text)?;
    for entry in kubeconfig["users"].as_sequence_mut().context("users")? {
        entry["user"].as_mapping_mut().context("a user")?.insert(
            "as".into(),
            format!("system:serviceaccount:{ns}:{fullname}").into(),
        );
    }
    let impersonating = tempfile::NamedTempFile::new()?;
    std::fs::write(impersonating.path(), serde_yaml::to_string(&kubeconfig)?)?;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_streamgate-operator"))
        .args(&args)
        .env("KUBECONFIG", impersonating.path())
        .env("POD_NAMESPACE", &ns)
        .env("POD_NAME", "live-api-chart-test")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .context("starting streamgate-operator")?;
    let port = reported_live_api_port(&mut child);
    let _operator = Operator(child);
    let exposed = cp.expose(port?).await?;
    point_service_at(
        &client,
        &ns,
        &format!("{fullname}-webhook"),
        "live-api",
        exposed,
    )
    .await?;

    let api_services: Api<APIService> = Api::all(client.clone());
    wait_until(
        Duration::from_secs(120),
        "the chart's APIService to be Available",
        || async {
            let service = api_services.get(liveapi::API_SERVICE).await?;
            let available = service
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "Available");
            match available {
                Some(c) if c.status == "True" => Ok(true),
                other => bail!("not yet: {other:?}"),
            }
        },
    )
    .await?;
    // Through it, with the chart's RBAC for the operator: a namespace's (empty) sessions.
    wait_until(
        Duration::from_secs(30),
        "kubectl get streamingsessions",
        || async {
            let out = kubectl(
                &cp,
                &["get", "streamingsessions", "-n", &app_ns, "-o", "json"],
            )
            .await?;
            ensure!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(true)
        },
    )
    .await?;
    Ok(())
}
