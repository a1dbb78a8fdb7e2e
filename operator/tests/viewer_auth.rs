//! ViewerAuthentication against a real kube-apiserver: one with a `jwksSecretRef` and one with
//! a `jwksUri` (served by a test HTTPS server on loopback) render into the namespace's
//! ConfigMap with their keys resolved, a sidecar given that rendering enforces them, and the
//! status reports readiness, key ids and the last fetch; a failing fetch keeps the last good
//! keys and says so; invalid resources are refused by the API server; and a sidecar given a
//! hand-written file fetches its `jwksUri` itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::Path;
use axum::http::StatusCode;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use streamctl::token::{KeyAlg, TestKey, jwks};
use streamgate_operator::config::DEFAULT_EXCLUDED_NAMESPACES;
use streamgate_operator::crd::ViewerAuthentication;
use streamgate_operator::metrics::Metrics;
use streamgate_operator::render::{CONFIGMAP_NAME, POLICY_FILE_KEY};
use streamgate_policy::PolicySet;
use streamgate_sidecar::server::Sidecar;
use streamgate_sidecar::store::MemoryStore;
use streamgate_testenv::{
    ControlPlane, create_namespace, install_crds, wait_until, workspace_root,
};
use tokio::sync::OnceCell;

const WAIT: Duration = Duration::from_secs(60);
const ISSUER: &str = "https://id.streamgate.test";

/// What the test JWKS server answers at `/jwks/NAME` (each test its own name): a JWKS, or
/// `None` for HTTP 500.
fn served() -> &'static Mutex<HashMap<String, Option<String>>> {
    static SERVED: OnceLock<Mutex<HashMap<String, Option<String>>>> = OnceLock::new();
    SERVED.get_or_init(Mutex::default)
}

fn serve(name: &str, jwks: Option<String>) {
    served().lock().unwrap().insert(name.to_string(), jwks);
}

/// The JWKS server's URL and CA, once started.
static JWKS_SERVER: OnceLock<(String, Vec<u8>)> = OnceLock::new();

fn https_client(ca: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca).expect("a CA"))
        .build()
        .expect("a client")
}

/// The shared control plane with both CRDs, a JWKS server and one controller trusting its CA,
/// both on a runtime of their own (each test has its own runtime, which ends with the test).
async fn setup() -> Result<(&'static ControlPlane, Client)> {
    static STARTED: OnceCell<()> = OnceCell::const_new();
    let cp = streamgate_testenv::shared().await?;
    let client = cp.client().await?;
    STARTED
        .get_or_try_init(|| async {
            for crd in [
                "crds/streamingpolicy.yaml",
                "crds/viewerauthentication.yaml",
            ] {
                install_crds(&client, &workspace_root().join(crd)).await?;
            }
            let kubeconfig = cp.kubeconfig_path().to_path_buf();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Runtime::new().expect("a runtime");
                runtime.block_on(async move {
                    let app = axum::Router::new().route(
                        "/jwks/{name}",
                        axum::routing::get(|Path(name): Path<String>| async move {
                            match served().lock().unwrap().get(&name).cloned().flatten() {
                                Some(body) => (StatusCode::OK, body),
                                None => (StatusCode::INTERNAL_SERVER_ERROR, "down".to_string()),
                            }
                        }),
                    );
                    let server = streamgate_testenv::HttpsServer::start(app)
                        .await
                        .expect("the JWKS server starts");
                    let ca = server.ca_bundle();
                    let _ = JWKS_SERVER.set((server.url("/jwks/"), ca.clone()));
                    let config = kube::Config::from_custom_kubeconfig(
                        kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig"),
                        &kube::config::KubeConfigOptions::default(),
                    )
                    .await
                    .expect("kube config");
                    let client = Client::try_from(config).expect("client");
                    let excluded = DEFAULT_EXCLUDED_NAMESPACES.map(String::from).into();
                    ready_tx.send(()).expect("the test waits");
                    streamgate_operator::run_controller_with(
                        client,
                        Arc::new(Metrics::new()),
                        excluded,
                        https_client(&ca),
                        Default::default(),
                    )
                    .await;
                    drop(server);
                });
            });
            tokio::task::spawn_blocking(move || ready_rx.recv_timeout(WAIT))
                .await?
                .context("the JWKS server and controller start")?;
            anyhow::Ok(())
        })
        .await?;
    Ok((cp, client))
}

fn jwks_url(name: &str) -> String {
    format!("{}{name}", JWKS_SERVER.get().expect("started").0)
}

async fn rendered(client: &Client, ns: &str) -> Result<Option<String>> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    Ok(cms
        .get_opt(CONFIGMAP_NAME)
        .await?
        .and_then(|cm| cm.data?.remove(POLICY_FILE_KEY)))
}

/// Waits until the rendering of `ns`, as a sidecar reads it, has a ViewerAuthentication whose
/// resolved keys satisfy `check`; returns the file.
async fn wait_for_keys(
    client: &Client,
    ns: &str,
    what: &str,
    check: impl Fn(&[String]) -> bool,
) -> Result<String> {
    let check = &check;
    wait_until(WAIT, what, || async move {
        Ok(match rendered(client, ns).await? {
            Some(file) => PolicySet::from_yaml(&file, "rendered", ns).is_ok_and(|set| {
                set.viewer_auth()
                    .and_then(|a| a.resolved_jwks.as_deref())
                    .is_some_and(check)
            }),
            None => false,
        })
    })
    .await?;
    Ok(rendered(client, ns).await?.expect("rendered"))
}

fn kids(jwks: &str) -> Vec<String> {
    streamgate_policy::viewer_auth::key_ids(jwks).unwrap_or_default()
}

async fn wait_for_status(
    api: &Api<ViewerAuthentication>,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let check = &check;
    wait_until(WAIT, what, || async move {
        let va = api.get(name).await?;
        let status = serde_json::to_value(&va.status)?;
        Ok(check(&status) && status["observedGeneration"].as_i64() == va.metadata.generation)
    })
    .await?;
    Ok(serde_json::to_value(api.get(name).await?.status)?)
}

fn ready_reason(status: &Value) -> (String, String) {
    let ready = &status["conditions"][0];
    (
        ready["status"].as_str().unwrap_or("").into(),
        ready["reason"].as_str().unwrap_or("").into(),
    )
}

/// Starts an in-process sidecar on `file` (the rendered ConfigMap payload) and returns its URL.
async fn sidecar_on(file: &str, ns: &str, jwks_ca: Option<&[u8]>) -> Result<String> {
    let set = PolicySet::from_yaml(file, "rendered", ns)?;
    let mut sidecar = Sidecar::with_store(Arc::new(MemoryStore::new()), set);
    if let Some(ca) = jwks_ca {
        sidecar = sidecar.with_jwks_client(https_client(ca));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { sidecar.serve(listener, std::future::pending()).await });
    Ok(base)
}

async fn open(base: &str, token: Option<&str>) -> Result<(u16, Value)> {
    let mut request = reqwest::Client::new().put(format!("{base}/streaming?streamId=s1"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

fn token(key: &TestKey, sub: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    key.sign(&json!({"iss": ISSUER, "sub": sub, "exp": now + 600}))
        .unwrap()
}

fn viewer_auth(name: &str, rule: Value) -> Result<ViewerAuthentication> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "streamgate.dev/v1alpha1",
        "kind": "ViewerAuthentication",
        "metadata": {"name": name},
        "spec": {"jwtRules": [rule]},
    }))?)
}

#[tokio::test]
async fn a_secret_backed_viewer_authentication_is_rendered_enforced_and_reported() -> Result<()> {
    let (_, client) = setup().await?;
    let ns = create_namespace(&client, "va-secret", &[]).await?;
    let key = TestKey::generate(KeyAlg::EdDsa, "secret-k1")?;
    let forger = TestKey::generate(KeyAlg::EdDsa, "secret-k1")?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut secret = Secret::default();
    secret.metadata.name = Some("viewer-keys".into());
    secret.data = Some(
        [(
            "jwks.json".to_string(),
            ByteString(jwks(&[&key]).into_bytes()),
        )]
        .into(),
    );
    secrets.create(&PostParams::default(), &secret).await?;
    let vas: Api<ViewerAuthentication> = Api::namespaced(client.clone(), &ns);
    vas.create(
        &PostParams::default(),
        &viewer_auth(
            "viewers",
            json!({"issuer": ISSUER, "jwksSecretRef": {"name": "viewer-keys", "key": "jwks.json"}}),
        )?,
    )
    .await?;

    let file = wait_for_keys(&client, &ns, "the Secret's key is rendered", |resolved| {
        resolved.iter().any(|j| kids(j) == ["secret-k1"])
    })
    .await?;
    assert!(
        !file.contains("\"d\""),
        "no private key material in the rendering"
    );
    let status = wait_for_status(&vas, "viewers", "Ready with the key id", |s| {
        ready_reason(s) == ("True".into(), "KeysLoaded".into())
    })
    .await?;
    assert_eq!(status["keyIds"], json!(["secret-k1"]));

    let sidecar = sidecar_on(&file, &ns, None).await?;
    let (status, body) = open(&sidecar, Some(&token(&key, "alice"))).await?;
    assert_eq!(
        (status, body["account"].as_str()),
        (201, Some("alice")),
        "{body}"
    );
    assert_eq!(open(&sidecar, None).await?.0, 401);
    assert_eq!(open(&sidecar, Some(&token(&forger, "bob"))).await?.0, 401);

    // A Secret that does not exist: reported, and tokens of that issuer fail closed.
    vas.create(
        &PostParams::default(),
        &viewer_auth(
            "a-first",
            json!({"issuer": ISSUER, "jwksSecretRef": {"name": "missing", "key": "jwks.json"}}),
        )?,
    )
    .await?;
    let status = wait_for_status(&vas, "a-first", "KeysUnavailable", |s| {
        ready_reason(s) == ("False".into(), "KeysUnavailable".into())
    })
    .await?;
    assert!(
        status["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("not found"),
        "{status}"
    );
    // It sorts first, so it is in force, and the other one says it is superseded.
    let superseded = wait_for_status(&vas, "viewers", "Superseded", |s| {
        ready_reason(s) == ("False".into(), "Superseded".into())
    })
    .await?;
    assert!(
        superseded["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("a-first")
    );
    let file = wait_for_keys(&client, &ns, "no key rendered", |resolved| {
        resolved.iter().all(|j| kids(j).is_empty())
    })
    .await?;
    let sidecar = sidecar_on(&file, &ns, None).await?;
    let (status, body) = open(&sidecar, Some(&token(&key, "alice"))).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("auth_unavailable")),
        "{body}"
    );
    Ok(())
}

#[tokio::test]
async fn a_jwks_uri_is_fetched_rendered_enforced_and_a_failing_fetch_keeps_the_last_keys()
-> Result<()> {
    let (_, client) = setup().await?;
    let ns = create_namespace(&client, "va-uri", &[]).await?;
    let key = TestKey::generate(KeyAlg::Es256, "uri-k1")?;
    serve("uri", Some(jwks(&[&key])));
    let vas: Api<ViewerAuthentication> = Api::namespaced(client.clone(), &ns);
    vas.create(
        &PostParams::default(),
        &viewer_auth(
            "viewers",
            json!({"issuer": ISSUER, "jwksUri": jwks_url("uri"), "refreshInterval": "10s"}),
        )?,
    )
    .await?;
    let file = wait_for_keys(&client, &ns, "the fetched key is rendered", |resolved| {
        resolved.iter().any(|j| kids(j) == ["uri-k1"])
    })
    .await?;
    let status = wait_for_status(&vas, "viewers", "KeysLoaded", |s| {
        ready_reason(s) == ("True".into(), "KeysLoaded".into())
    })
    .await?;
    assert_eq!(status["keyIds"], json!(["uri-k1"]));
    assert!(status["lastJwksFetchTime"].is_string(), "{status}");

    let sidecar = sidecar_on(&file, &ns, None).await?;
    let (status, body) = open(&sidecar, Some(&token(&key, "carol"))).await?;
    assert_eq!(
        (status, body["account"].as_str()),
        (201, Some("carol")),
        "{body}"
    );
    assert_eq!(open(&sidecar, None).await?.0, 401);

    // The endpoint fails: the status says so, the last good key stays rendered.
    serve("uri", None);
    let status = wait_for_status(&vas, "viewers", "StaleKeys", |s| {
        ready_reason(s) == ("True".into(), "StaleKeys".into())
    })
    .await?;
    assert!(
        status["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("500"),
        "{status}"
    );
    let file = rendered(&client, &ns).await?.unwrap();
    let set = PolicySet::from_yaml(&file, "rendered", &ns)?;
    assert_eq!(
        kids(&set.viewer_auth().unwrap().resolved_jwks.as_ref().unwrap()[0]),
        ["uri-k1"]
    );

    // Rotation at the endpoint reaches the rendering on the next refresh.
    let next = TestKey::generate(KeyAlg::Es256, "uri-k2")?;
    serve("uri", Some(jwks(&[&next])));
    let file = wait_for_keys(&client, &ns, "the rotated key is rendered", |resolved| {
        resolved.iter().any(|j| kids(j) == ["uri-k2"])
    })
    .await?;
    let sidecar = sidecar_on(&file, &ns, None).await?;
    assert_eq!(open(&sidecar, Some(&token(&next, "carol"))).await?.0, 201);
    assert_eq!(open(&sidecar, Some(&token(&key, "dave"))).await?.0, 401);
    Ok(())
}

#[tokio::test]
async fn a_standalone_sidecar_fetches_its_jwks_uri_itself() -> Result<()> {
    let _ = setup().await?;
    let key = TestKey::generate(KeyAlg::EdDsa, "standalone-k1")?;
    let url = jwks_url("standalone");
    serve("standalone", Some(jwks(&[&key])));
    let file = format!(
        "apiVersion: streamgate.dev/v1alpha1\nkind: ViewerAuthentication\nmetadata: {{name: v}}\nspec:\n  jwtRules:\n  - issuer: {ISSUER}\n    jwksUri: {url}\n"
    );
    let ca = JWKS_SERVER.get().unwrap().1.clone();
    let sidecar = sidecar_on(&file, "default", Some(&ca)).await?;
    let token = token(&key, "erin");
    wait_until(WAIT, "the sidecar fetched the key", || {
        let (sidecar, token) = (sidecar.clone(), token.clone());
        async move { Ok(open(&sidecar, Some(&token)).await?.0 == 201) }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn invalid_viewer_authentications_are_refused_by_the_api_server() -> Result<()> {
    let (_, client) = setup().await?;
    let ns = create_namespace(&client, "va-invalid", &[]).await?;
    let vas: Api<ViewerAuthentication> = Api::namespaced(client.clone(), &ns);
    let cases = [
        (
            json!({"jwtRules": [{"issuer": ISSUER, "jwks": "{\"keys\":[]}", "jwksUri": "https://x.test/jwks"}]}),
            "exactly one of jwks, jwksSecretRef, jwksUri",
        ),
        (
            json!({"jwtRules": [{"issuer": ISSUER}]}),
            "exactly one of jwks, jwksSecretRef, jwksUri",
        ),
        (
            json!({"jwtRules": [{"issuer": ISSUER, "jwks": "{\"keys\":[]}", "algorithms": ["HS256"]}]}),
            "HS256 is allowed only with jwksSecretRef",
        ),
        (
            json!({"jwtRules": [{"issuer": ISSUER, "jwks": "{\"keys\":[]}", "algorithms": ["none"]}]}),
            "none",
        ),
        (json!({"mode": "Required"}), "at least one rule"),
        (
            json!({"jwtRules": [{"issuer": ISSUER, "jwksUri": "http://plain.test/jwks"}]}),
            "jwksUri",
        ),
    ];
    for (i, (spec, expected)) in cases.into_iter().enumerate() {
        // Sent as raw JSON: the typed spec could not even hold some of these.
        let raw = json!({
            "apiVersion": "streamgate.dev/v1alpha1", "kind": "ViewerAuthentication",
            "metadata": {"name": format!("bad-{i}")}, "spec": spec,
        });
        let error = vas
            .patch(
                &format!("bad-{i}"),
                &PatchParams::apply("test"),
                &Patch::Apply(&raw),
            )
            .await
            .expect_err(&format!("case {i} is refused"));
        let text = error.to_string();
        assert!(text.contains(expected), "case {i}: {text}");
    }
    Ok(())
}
