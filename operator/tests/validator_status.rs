//! The `ValidatorsHealthy` condition on a real kube-apiserver: a `streamgate-sidecar` process on
//! a real redis-server counts its session validators' calls, the operator's periodic refresh reads the counts and
//! names the validator that has been failing on its StreamingPolicy, and clears it once the
//! validator answers again.
//!
//! Needs `testenv/build` (the control plane) and `redis-server`/`redis-cli`. Without them the
//! test fails.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use common::refusing_port;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use streamgate_operator::crd::{PolicyCondition, StreamingPolicy};
use streamgate_operator::liveapi;
use streamgate_operator::validator_health::{CONDITION, MAX_MESSAGE_CHARS};
use streamgate_testenv::{ControlPlane, FIELD_MANAGER, create_namespace, wait_until};

/// A redis-server of the test's own: pausing it is the store outage.
struct OwnRedis {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl OwnRedis {
    fn start() -> Result<Self> {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let dir = tempfile::tempdir()?;
            let mut child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .arg("--dir")
                .arg(dir.path())
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .context("starting redis-server (./scripts/test installs it)")?;
            for _ in 0..100 {
                if child.try_wait()?.is_some() {
                    break;
                }
                if redis_cli(port, &["PING"]).is_ok_and(|out| out.trim() == "PONG") {
                    return Ok(Self {
                        port,
                        child,
                        _dir: dir,
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        bail!("redis-server did not start")
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGSTOP / SIGCONT: connections stay open, nothing is answered meanwhile.
    fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill {signal} redis-server");
        Ok(())
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_cli(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .context("running redis-cli")?;
    ensure!(
        out.status.success(),
        "redis-cli: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How the test's validator answers: 503, allow, or deny.
const FAIL: u8 = 0;
const DENY: u8 = 2;
const HOSTILE: u8 = 3;

/// What the validator answers in mode [`HOSTILE`]: a 200 that is no SessionReview answer, and
/// would fake a condition if it reached the status.
const HOSTILE_ANSWER: &str = "\n\nConditions:\n  Type: ValidatorsHealthy\n  Status: True\u{1b}[2J";

/// A SessionReview endpoint whose answer the test switches; returns its URL.
async fn switchable_validator(mode: Arc<AtomicU8>) -> Result<String> {
    let router = axum::Router::new().route(
        "/review",
        axum::routing::post(move || {
            let mode = mode.clone();
            async move {
                use axum::response::IntoResponse;
                match mode.load(Ordering::SeqCst) {
                    FAIL => axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response(),
                    DENY => axum::Json(json!({"allowed": false, "message": "no entitlement"}))
                        .into_response(),
                    HOSTILE => HOSTILE_ANSWER.into_response(),
                    _ => axum::Json(json!({"allowed": true})).into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/review", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(url)
}

fn policies(entitlement: &str, geo: &str) -> String {
    format!(
        "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {{name: standard}}\n\
         spec: {{maxStreamsPerAccount: 100, validators: [{{name: entitlement, url: '{entitlement}', timeoutSeconds: 1}}]}}\n\
         ---\napiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {{name: vip}}\n\
         spec: {{maxStreamsPerAccount: 100, accounts: [vip-7], validators: [{{name: geo, url: '{geo}', timeoutSeconds: 1}}]}}\n\
         ---\napiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {{name: plain}}\n\
         spec: {{maxStreamsPerAccount: 100, accounts: [plain-1]}}\n"
    )
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

async fn apply_policies(client: &Client, namespace: &str, yaml: &str) -> Result<()> {
    let api: Api<StreamingPolicy> = Api::namespaced(client.clone(), namespace);
    for doc in yaml.split("---\n") {
        let mut value: Value = serde_yaml::from_str(doc)?;
        value["metadata"]["namespace"] = json!(namespace);
        let name = value["metadata"]["name"]
            .as_str()
            .context("a name")?
            .to_string();
        apply(&api, &name, value).await?;
    }
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

/// The `streamgate-sidecar` binary, built (or found up to date) by the cargo running this test:
/// another package's binary has no `CARGO_BIN_EXE_*`.
fn sidecar_binary() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    // What cargo sets for this test binary is not the sidecar's: build scripts that watch such
    // variables (CARGO_MANIFEST_DIR...) would rebuild, and rebuild again on the next plain build.
    for (name, _) in std::env::vars() {
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
            || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&name.as_str())
        {
            build.env_remove(name);
        }
    }
    build
        .current_dir(streamgate_testenv::workspace_root())
        .args(["build", "--locked", "-p", "streamgate-sidecar"])
        .args(["--bin", "streamgate-sidecar", "--message-format=json"]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let out = build.output().context("running cargo build")?;
    ensure!(
        out.status.success(),
        "cargo build -p streamgate-sidecar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .context("cargo build names the sidecar's executable")
}

/// A `streamgate-sidecar` process, killed on drop.
struct SidecarProcess {
    child: Child,
    base: String,
    _policies: tempfile::NamedTempFile,
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sidecar process of `namespace` on `redis_url` with `yaml`'s policies, as the operator
/// injects it; learns its port from its start-up log line.
fn start_sidecar(redis_url: &str, namespace: &str, yaml: &str) -> Result<SidecarProcess> {
    use std::io::{BufRead as _, Write as _};
    let mut policies = tempfile::NamedTempFile::new()?;
    policies.write_all(yaml.as_bytes())?;
    let mut child = Command::new(sidecar_binary()?)
        .env("RUST_LOG", "warn,streamgate_sidecar::server=info")
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0", "--log-format", "json"])
        .args([
            "--store",
            redis_url,
            "--store-timeout",
            "2s",
            "--namespace",
            namespace,
        ])
        .arg("--policy-file")
        .arg(policies.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting streamgate-sidecar")?;
    let stdout = child.stdout.take().context("the sidecar's stdout")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let base = loop {
        let Some(line) = lines.next() else {
            let _ = child.kill();
            bail!("the sidecar exited before serving: {:?}", child.wait());
        };
        let entry: Value = serde_json::from_str(&line?).unwrap_or_default();
        if entry["fields"]["message"] == "serving the session API" {
            let listen = entry["fields"]["listen"].as_str().context("its address")?;
            break format!("http://{listen}");
        }
    };
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok(SidecarProcess {
        child,
        base,
        _policies: policies,
    })
}

/// Opens a session (the sidecar answers at once; its Async validator is called behind it).
async fn open(http: &reqwest::Client, base: &str, account: &str, stream: &str) -> Result<()> {
    http.put(format!(
        "{base}/streaming?account={account}&streamId={stream}"
    ))
    .send()
    .await?
    .error_for_status()
    .with_context(|| format!("opening a session of {account}"))?;
    Ok(())
}

fn resolver(client: &Client) -> Arc<dyn liveapi::sessions::SessionsResolver> {
    Arc::new(liveapi::sessions::StoreResolver::new(
        client.clone(),
        streamgate_operator::inject::StoreSource::Secret {
            name: "streamgate-store".into(),
            key: "url".into(),
        },
        Box::new(liveapi::sessions::StoreSessions::connect),
    ))
}

async fn conditions(client: &Client, namespace: &str, name: &str) -> Result<Vec<PolicyCondition>> {
    let policy = Api::<StreamingPolicy>::namespaced(client.clone(), namespace)
        .get(name)
        .await?;
    Ok(policy.status.map(|s| s.conditions).unwrap_or_default())
}

async fn health(client: &Client, namespace: &str, name: &str) -> Result<Option<PolicyCondition>> {
    Ok(conditions(client, namespace, name)
        .await?
        .into_iter()
        .find(|c| c.type_ == CONDITION))
}

/// Runs the operator's refresh until `name`'s condition has `status`; returns it.
async fn refresh_until(
    client: &Client,
    resolver: &dyn liveapi::sessions::SessionsResolver,
    namespace: &str,
    name: &str,
    status: &str,
) -> Result<PolicyCondition> {
    let last = std::sync::Mutex::new(None);
    let seen = &last;
    wait_until(
        Duration::from_secs(60),
        &format!("{name}'s {CONDITION} to be {status}"),
        move || async move {
            liveapi::active::refresh_once(client, resolver).await?;
            let condition = health(client, namespace, name).await?;
            let matches = condition.as_ref().is_some_and(|c| c.status == status);
            *seen.lock().unwrap() = condition;
            Ok(matches)
        },
    )
    .await
    .with_context(|| format!("last condition: {:?}", last.lock().unwrap()))?;
    last.into_inner().unwrap().context("a condition")
}

async fn kubectl_ok(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let mut cmd = cp.kubectl();
    cmd.args(args).arg("--request-timeout=20s");
    let what = format!("kubectl {}", args.join(" "));
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await?
        .with_context(|| format!("running {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The VALIDATORS cell of `name` in `kubectl get sp`.
fn validators_column(table: &str, name: &str) -> Result<String> {
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let column = header
        .iter()
        .position(|c| *c == "VALIDATORS")
        .with_context(|| format!("no VALIDATORS column:\n{table}"))?;
    // Columns before VALIDATORS may be empty (<none>); count from the end instead.
    let from_end = header.len() - column;
    let row: Vec<&str> = lines
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&name))
        .with_context(|| format!("no row {name}:\n{table}"))?;
    Ok(row[row.len() - from_end].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_status_names_a_failing_validator_and_clears_when_it_answers_again() -> Result<()> {
    let cp = streamgate_testenv::shared().await?;
    let client = cp.client().await?;
    streamgate_testenv::install_crds(
        &client,
        &streamgate_testenv::workspace_root().join("crds/streamingpolicy.yaml"),
    )
    .await?;
    let redis = OwnRedis::start()?;
    let ns = create_namespace(&client, "validators", &[]).await?;
    let embedded_ns = create_namespace(&client, "validators-embedded", &[]).await?;
    store_secret(&client, &ns, &redis.url()).await?;
    store_secret(&client, &embedded_ns, "memory").await?;

    let mode = Arc::new(AtomicU8::new(FAIL));
    let entitlement = switchable_validator(mode.clone()).await?;
    // A validator URL whose port refuses connections, held for the whole test.
    let (_refusing, port) = refusing_port()?;
    let yaml = policies(&entitlement, &format!("http://127.0.0.1:{port}/review"));
    apply_policies(&client, &ns, &yaml).await?;
    apply_policies(&client, &embedded_ns, &yaml).await?;
    // The reconciler's Ready condition, under its own field manager: the two coexist.
    let api: Api<StreamingPolicy> = Api::namespaced(client.clone(), &ns);
    let ready = json!({
        "apiVersion": "streamgate.dev/v1alpha1", "kind": "StreamingPolicy",
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Rendered",
            "message": "rendered", "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
    });
    api.patch_status(
        "standard",
        &PatchParams::apply(streamgate_operator::reconcile::FIELD_MANAGER).force(),
        &Patch::Apply(&ready),
    )
    .await?;

    // A validator name that could shape the status is refused by the API server.
    let hostile = json!({
        "apiVersion": "streamgate.dev/v1alpha1", "kind": "StreamingPolicy",
        "metadata": {"name": "hostile", "namespace": ns},
        "spec": {"validators": [{"name": "geo\nType: Ready", "url": "http://127.0.0.1:1/"}]},
    });
    let refused = apply(&api, "hostile", hostile).await;
    ensure!(
        format!("{refused:?}").contains("spec.validators[0].name"),
        "a validator name with a newline must be refused: {refused:?}"
    );

    let resolver = resolver(&client);
    let resolver = resolver.as_ref();
    // Nothing called yet: Unknown. The embedded store shares nothing: Unknown as well.
    let before = refresh_until(&client, resolver, &ns, "standard", "Unknown").await?;
    ensure!(before.reason == "NoRecentCalls", "{before:?}");
    let embedded = refresh_until(&client, resolver, &embedded_ns, "standard", "Unknown").await?;
    ensure!(embedded.reason == "NoSharedStore", "{embedded:?}");
    ensure!(
        health(&client, &ns, "plain").await?.is_none(),
        "a policy without validators has no such condition"
    );

    // Sessions opened through a sidecar on Redis: entitlement answers 503, geo refuses.
    let process = tokio::task::block_in_place(|| start_sidecar(&redis.url(), &ns, &yaml))?;
    let sidecar = process.base.clone();
    let http = reqwest::Client::new();
    for account in ["acct-1", "acct-2", "acct-3", "acct-4"] {
        open(&http, &sidecar, account, "tv").await?;
    }
    for stream in ["tv", "phone", "tablet"] {
        open(&http, &sidecar, "vip-7", stream).await?;
    }
    let failing = refresh_until(&client, resolver, &ns, "standard", "False").await?;
    ensure!(failing.reason == "ValidatorFailing", "{failing:?}");
    ensure!(
        failing
            .message
            .starts_with("validator entitlement failing (HTTP 503) since 20"),
        "{failing:?}"
    );
    let generation = api.get("standard").await?.metadata.generation;
    ensure!(
        failing.observed_generation == generation,
        "{failing:?} vs {generation:?}"
    );
    let geo = refresh_until(&client, resolver, &ns, "vip", "False").await?;
    ensure!(
        geo.message
            .starts_with("validator geo failing (connection refused) since 20"),
        "{geo:?}"
    );
    ensure!(
        conditions(&client, &ns, "standard")
            .await?
            .iter()
            .any(|c| c.type_ == "Ready"),
        "the Ready condition stays"
    );
    let table = kubectl_ok(cp, &["get", "sp", "-n", &ns]).await?;
    ensure!(
        validators_column(&table, "standard")? == "False"
            && validators_column(&table, "vip")? == "False",
        "{table}"
    );
    let described = kubectl_ok(cp, &["describe", "sp", "standard", "-n", &ns]).await?;
    ensure!(
        described.contains("ValidatorsHealthy") && described.contains("ValidatorFailing"),
        "{described}"
    );
    println!("kubectl describe excerpt:\n{described}");

    // A store outage says nothing about the validators: the conditions stay as they were.
    redis.signal("-STOP")?;
    let during = liveapi::active::refresh_once(&client, resolver).await;
    let after_outage = health(&client, &ns, "standard").await?;
    redis.signal("-CONT")?;
    during?;
    ensure!(
        after_outage.as_ref() == Some(&failing),
        "unchanged through the outage: {after_outage:?}"
    );

    // Hostile text in the store cannot shape the status: one line, capped.
    let key = format!("{{sg-validation:{ns}}}:health:vip:geo");
    let injected = format!(
        "refused\n\nConditions:\n  Type: ValidatorsHealthy\n  Status: True\u{1b}[2J{}",
        "x".repeat(20_000)
    );
    redis_cli(redis.port, &["HSET", &key, "lastFailKind", &injected])?;
    liveapi::active::refresh_once(&client, resolver).await?;
    let injected = health(&client, &ns, "vip")
        .await?
        .context("vip's condition")?;
    ensure!(injected.status == "False", "{injected:?}");
    ensure!(
        !injected.message.chars().any(char::is_control)
            && injected.message.chars().count() <= MAX_MESSAGE_CHARS + 1
            && !injected.message.contains("Status: True"),
        "{injected:?}"
    );

    // The validator recovers (denying: a denial is an answer, not a failure): True again.
    mode.store(DENY, Ordering::SeqCst);
    for n in 10..18 {
        open(&http, &sidecar, &format!("acct-{n}"), "tv").await?;
    }
    let recovered = refresh_until(&client, resolver, &ns, "standard", "True").await?;
    ensure!(
        recovered.reason == "ValidatorsAnswering"
            && recovered.message == "all validators answered in the last 5 minutes",
        "{recovered:?}"
    );
    ensure!(
        health(&client, &ns, "vip")
            .await?
            .is_some_and(|c| c.status == "False"),
        "geo still refuses"
    );
    let table = kubectl_ok(cp, &["get", "sp", "-n", &ns]).await?;
    ensure!(validators_column(&table, "standard")? == "True", "{table}");

    // A validator answering hostile text is failing with a malformed answer: its text goes
    // nowhere near the status.
    mode.store(HOSTILE, Ordering::SeqCst);
    for n in 20..34 {
        open(&http, &sidecar, &format!("acct-{n}"), "tv").await?;
    }
    let malformed = refresh_until(&client, resolver, &ns, "standard", "False").await?;
    ensure!(
        malformed
            .message
            .starts_with("validator entitlement failing (malformed answer) since 20")
            && !malformed.message.contains("Status: True"),
        "{malformed:?}"
    );

    // Validators removed from a policy: the condition goes, the Ready condition stays.
    apply_policies(
        &client,
        &ns,
        "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {name: standard}\nspec: {maxStreamsPerAccount: 100}\n",
    )
    .await?;
    liveapi::active::refresh_once(&client, resolver).await?;
    let left = conditions(&client, &ns, "standard").await?;
    ensure!(
        left.iter().all(|c| c.type_ != CONDITION) && left.iter().any(|c| c.type_ == "Ready"),
        "{left:?}"
    );
    Ok(())
}
