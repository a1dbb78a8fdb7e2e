//! Session validators: a SessionReview after admission, Async (201 at once, cut on a later
//! denial) and Blocking (403 `denied`), failurePolicy on timeouts and 5xx, revalidation.
//! The validator here is a real HTTP server on loopback whose answers each test sets.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::{default_policy, eventually, json, metric_with};
use futures::StreamExt;
use reqwest::{Client, Method};
use serde_json::{Value, json};
use streamgate_demo_origin as demo_origin;
use streamgate_sidecar::policy::PolicySet;
use streamgate_sidecar::server::Sidecar;
use streamgate_sidecar::session::{EndReason, SessionId};
use streamgate_sidecar::store::{MemoryStore, SessionStore};
use tokio::sync::{oneshot, watch};

/// How the test validator answers one account.
#[derive(Clone, Debug)]
enum Rule {
    Allow,
    Deny(&'static str),
    /// Answer with this status and no verdict.
    Status(u16),
    /// Never answer (until the test ends).
    Hang,
    /// Wait, then apply the rule.
    After(Duration, Box<Rule>),
}

#[derive(Clone, Debug)]
struct Call {
    body: Value,
    idempotency_key: Option<String>,
}

#[derive(Default)]
struct ValidatorState {
    rules: HashMap<String, Rule>,
    calls: Vec<Call>,
}

/// The test validator: answers by account, records every call, counts verdicts given and when.
#[derive(Clone)]
struct TestValidator {
    url: String,
    state: Arc<Mutex<ValidatorState>>,
    verdicts: watch::Receiver<Vec<Instant>>,
}

impl TestValidator {
    async fn start() -> Self {
        let state: Arc<Mutex<ValidatorState>> = Arc::default();
        let (tx, verdicts) = watch::channel(Vec::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/review", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/review", axum::routing::post(review))
            .with_state((state.clone(), Arc::new(tx)));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            state,
            verdicts,
        }
    }

    fn set(&self, account: &str, rule: Rule) {
        self.state
            .lock()
            .unwrap()
            .rules
            .insert(account.to_string(), rule);
    }

    fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    fn verdicts_given(&self) -> usize {
        self.verdicts.borrow().len()
    }

    /// Waits for the `n`th verdict and says when it was sent.
    async fn verdict(&self, n: usize) -> Instant {
        let mut verdicts = self.verdicts.clone();
        let given =
            tokio::time::timeout(Duration::from_secs(20), verdicts.wait_for(|v| v.len() >= n))
                .await
                .expect("the validator was asked in time")
                .unwrap();
        given[n - 1]
    }
}

type Shared = (Arc<Mutex<ValidatorState>>, Arc<watch::Sender<Vec<Instant>>>);

async fn review(
    State((state, verdicts)): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let account = body["request"]["session"]["account"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut rule = {
        let mut state = state.lock().unwrap();
        state.calls.push(Call {
            body: body.clone(),
            idempotency_key: headers
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_string()),
        });
        state.rules.get(&account).cloned().unwrap_or(Rule::Allow)
    };
    loop {
        match rule {
            Rule::After(delay, next) => {
                tokio::time::sleep(delay).await;
                rule = *next;
            }
            Rule::Hang => std::future::pending::<()>().await,
            Rule::Status(code) => {
                return StatusCode::from_u16(code).unwrap().into_response();
            }
            Rule::Allow | Rule::Deny(_) => break,
        }
    }
    let answer = match rule {
        Rule::Deny(message) => {
            json!({"allowed": false, "reason": "not_entitled", "message": message})
        }
        _ => json!({"allowed": true}),
    };
    verdicts.send_modify(|v| v.push(Instant::now()));
    Json(answer).into_response()
}

fn policy(validators: &str) -> String {
    default_policy(&format!(
        "  maxStreamsPerAccount: 1\n  sessionTTLSeconds: 60\n  heartbeatIntervalSeconds: 5\n  validators:\n{validators}"
    ))
}

async fn origin() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = demo_origin::router(Default::default());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// A sidecar on the embedded store in front of `upstream`; its viewer port and admin listener.
async fn served(policy: &str, upstream: &str) -> common::Served {
    served_on(Arc::new(MemoryStore::new()), policy, upstream).await
}

/// [`served`] on `store`.
async fn served_on(store: Arc<MemoryStore>, policy: &str, upstream: &str) -> common::Served {
    let policies = PolicySet::from_yaml(policy, "test.yaml", "default").unwrap();
    let sidecar = Sidecar::with_store(store, policies).with_upstream(upstream.parse().unwrap());
    common::serve_in_background(sidecar).await
}

/// The viewer port of a sidecar as [`served`] starts it.
async fn sidecar(policy: &str, upstream: &str) -> String {
    served(policy, upstream).await.base
}

async fn call(base: &str, method: Method, account: &str, stream: &str) -> (u16, Value) {
    common::streaming_at(&Client::new(), base, method, account, stream).await
}

/// A viewer pulling the live stream through the proxy.
struct Viewer {
    bytes: watch::Receiver<u64>,
    ended: oneshot::Receiver<Instant>,
}

impl Viewer {
    async fn watch(base: &str, session: &str) -> Self {
        let response = Client::new()
            .get(format!("{base}/live?interval_ms=20"))
            .header("X-StreamGate-Session", session)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let (counter, bytes) = watch::channel(0u64);
        let (tx, ended) = oneshot::channel();
        tokio::spawn(async move {
            let mut body = response.bytes_stream();
            while let Some(Ok(chunk)) = body.next().await {
                counter.send_modify(|n| *n += chunk.len() as u64);
            }
            let _ = tx.send(Instant::now());
        });
        let viewer = Self { bytes, ended };
        viewer.flows().await;
        viewer
    }

    /// Waits until more bytes arrive (the origin sends a chunk every 20 ms).
    async fn flows(&self) {
        let mut bytes = self.bytes.clone();
        let before = *bytes.borrow_and_update();
        tokio::time::timeout(Duration::from_secs(5), bytes.wait_for(|n| *n > before))
            .await
            .expect("the stream stopped flowing")
            .expect("the viewer is still reading");
    }

    async fn ended(self) -> Instant {
        tokio::time::timeout(Duration::from_secs(20), self.ended)
            .await
            .expect("the stream was not cut")
            .unwrap()
    }
}

fn id(session: &Value) -> String {
    session["sessionId"].as_str().unwrap().to_string()
}

/// Heartbeats until the session's validation state is `state`; returns the last answer.
async fn until_validation(base: &str, account: &str, state: &str) -> Value {
    let mut last = Value::Null;
    eventually(&format!("validation {state}"), async || {
        let (_, body) = call(base, Method::GET, account, "tv").await;
        let seen = body["validation"]
            .as_str()
            .or(body["session"]["validation"].as_str())
            == Some(state);
        last = body;
        seen
    })
    .await;
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_open_answers_at_once_and_a_later_denial_cuts_the_stream_within_a_second() {
    let validator = TestValidator::start().await;
    validator.set(
        "blocked",
        Rule::After(
            Duration::from_millis(800),
            Box::new(Rule::Deny("no rights in your region")),
        ),
    );
    let store = Arc::new(MemoryStore::new());
    let common::Served { base, admin } = served_on(
        store.clone(),
        &policy(&format!("  - {{name: geo, url: '{}'}}", validator.url)),
        &origin().await,
    )
    .await;

    let (status, session) = call(&base, Method::PUT, "blocked", "tv").await;
    assert_eq!(status, 201, "{session}");
    assert_eq!(session["validation"], "pending");
    assert_eq!(
        validator.verdicts_given(),
        0,
        "the open did not wait for the verdict"
    );
    let viewer = Viewer::watch(&base, &id(&session)).await;

    let denied_at = validator.verdict(1).await;
    let cut_at = viewer.ended().await;
    let after = cut_at.saturating_duration_since(denied_at);
    assert!(
        after < Duration::from_secs(1),
        "cut {after:?} after the denial"
    );

    let (status, body) = call(&base, Method::GET, "blocked", "tv").await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["error"], "session_gone");
    assert_eq!(body["reason"], "denied");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no rights in your region"),
        "{body}"
    );
    assert_eq!(body["session"]["validation"], "denied");
    assert_eq!(
        body["session"]["validationMessage"],
        "no rights in your region"
    );
    // The store itself (what the fleet-wide listing reads) records the reason too.
    let stored = store
        .get(id(&session).parse::<SessionId>().unwrap())
        .await
        .unwrap()
        .expect("the cut session is kept for a TTL");
    assert_eq!(stored.reason, Some(EndReason::Denied));
    // The slot is free: the account (limit 1) opens again.
    validator.set("blocked", Rule::Allow);
    let (status, _) = call(&base, Method::PUT, "blocked", "phone").await;
    assert_eq!(status, 201);

    let metrics = Client::new()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric_with(
            &metrics,
            "streamgate_validations_total",
            &["validator=\"geo\"", "result=\"denied\""]
        ),
        1.0
    );
    assert_eq!(
        metric_with(
            &metrics,
            "streamgate_sessions_revoked_total",
            &["reason=\"denied\""]
        ),
        1.0
    );
    assert!(
        metrics.contains("streamgate_validation_verdict_seconds_count{result=\"denied\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_allow_keeps_the_stream_and_the_review_carries_the_session_and_request_facts() {
    let validator = TestValidator::start().await;
    let base = sidecar(
        &policy(&format!(
            "  - {{name: entitlement, url: '{}'}}",
            validator.url
        )),
        &origin().await,
    )
    .await;
    let response = Client::new()
        .put(format!("{base}/streaming?account=fan&streamId=tv"))
        .header("user-agent", "TestPlayer/2.0")
        .header("x-viewer-device", "tv-42")
        .header("authorization", "Bearer secret-token")
        .send()
        .await
        .unwrap();
    let (status, session) = json(response).await;
    assert_eq!(status, 201);
    let viewer = Viewer::watch(&base, &id(&session)).await;
    validator.verdict(1).await;
    until_validation(&base, "fan", "allowed").await;
    viewer.flows().await;

    let calls = validator.calls();
    assert_eq!(calls.len(), 1);
    let review = &calls[0].body;
    assert_eq!(review["apiVersion"], "streamgate.dev/v1alpha1");
    assert_eq!(review["kind"], "SessionReview");
    assert_eq!(review["request"]["uid"], id(&session));
    assert_eq!(
        calls[0].idempotency_key.as_deref(),
        Some(id(&session).as_str())
    );
    assert_eq!(review["request"]["validator"], "entitlement");
    assert_eq!(review["request"]["revalidation"], false);
    assert_eq!(review["request"]["session"]["account"], "fan");
    assert_eq!(review["request"]["session"]["streamId"], "tv");
    assert_eq!(review["request"]["client"]["address"], "127.0.0.1");
    assert_eq!(review["request"]["client"]["userAgent"], "TestPlayer/2.0");
    assert_eq!(
        review["request"]["client"]["headers"]["x-viewer-device"],
        "tv-42"
    );
    assert!(!review.to_string().contains("secret-token"), "{review}");
    assert!(review["request"].get("claims").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timeouts_and_5xx_keep_the_stream_under_allow_and_cut_it_under_revoke() {
    let validator = TestValidator::start().await;
    validator.set("down", Rule::Status(503));
    validator.set("slow", Rule::Hang);
    let upstream = origin().await;
    let allow = sidecar(
        &policy(&format!(
            "  - {{name: flaky, url: '{}', timeoutSeconds: 1}}",
            validator.url
        )),
        &upstream,
    )
    .await;
    let revoke = sidecar(
        &policy(&format!(
            "  - {{name: flaky, url: '{}', timeoutSeconds: 1, failurePolicy: Revoke}}",
            validator.url
        )),
        &upstream,
    )
    .await;

    for account in ["down", "slow"] {
        let (status, session) = call(&allow, Method::PUT, account, "tv").await;
        assert_eq!(status, 201);
        let viewer = Viewer::watch(&allow, &id(&session)).await;
        let body = until_validation(&allow, account, "failed").await;
        assert_eq!(body["state"], "active", "{body}");
        viewer.flows().await;
    }
    // A 503 is retried with backoff within the timeout, under one idempotency key.
    let retried: Vec<Call> = validator
        .calls()
        .into_iter()
        .filter(|c| c.body["request"]["session"]["account"] == "down")
        .collect();
    assert!(retried.len() >= 2, "{} calls", retried.len());
    assert!(
        retried
            .iter()
            .all(|c| c.idempotency_key == retried[0].idempotency_key)
    );

    for account in ["down", "slow"] {
        let (status, session) = call(&revoke, Method::PUT, account, "tv").await;
        assert_eq!(status, 201);
        let viewer = Viewer::watch(&revoke, &id(&session)).await;
        viewer.ended().await;
        let (status, body) = call(&revoke, Method::GET, account, "tv").await;
        assert_eq!(status, 410, "{body}");
        assert_eq!(body["reason"], "denied");
        assert_eq!(body["session"]["validation"], "failed");
        assert!(
            body["message"].as_str().unwrap().contains("flaky"),
            "{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revalidation_cuts_a_stream_whose_entitlement_was_withdrawn() {
    let validator = TestValidator::start().await;
    let base = sidecar(
        &policy(&format!(
            "  - {{name: subscription, url: '{}', revalidateSeconds: 1}}",
            validator.url
        )),
        &origin().await,
    )
    .await;
    let (status, session) = call(&base, Method::PUT, "subscriber", "tv").await;
    assert_eq!(status, 201);
    let viewer = Viewer::watch(&base, &id(&session)).await;
    validator.verdict(2).await;
    viewer.flows().await;
    validator.set("subscriber", Rule::Deny("subscription cancelled"));
    viewer.ended().await;
    let (status, body) = call(&base, Method::GET, "subscriber", "tv").await;
    assert_eq!(status, 410);
    assert_eq!(body["reason"], "denied");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("subscription cancelled")
    );
    let last = validator.calls().pop().unwrap();
    assert_eq!(last.body["request"]["revalidation"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blocking_validators_make_the_open_wait_and_refuse_or_admit() {
    let validator = TestValidator::start().await;
    validator.set(
        "fan",
        Rule::After(Duration::from_millis(300), Box::new(Rule::Allow)),
    );
    validator.set(
        "banned",
        Rule::After(
            Duration::from_millis(300),
            Box::new(Rule::Deny("account suspended")),
        ),
    );
    let base = sidecar(
        &policy(&format!(
            "  - {{name: fraud, url: '{}', mode: Blocking}}",
            validator.url
        )),
        &origin().await,
    )
    .await;

    let (status, session) = call(&base, Method::PUT, "fan", "tv").await;
    assert_eq!(status, 201, "{session}");
    assert_eq!(
        validator.verdicts_given(),
        1,
        "the open waited for the verdict"
    );
    assert_eq!(session["validation"], "allowed");

    let (status, body) = call(&base, Method::PUT, "banned", "tv").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "denied");
    assert_eq!(body["message"], "account suspended");
    assert_eq!(body["session"]["state"], "revoked");
    // The slot was freed: with a limit of 1 the account opens another stream once allowed.
    validator.set("banned", Rule::Allow);
    let (status, body) = call(&base, Method::PUT, "banned", "phone").await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_async_validator_does_not_slow_admissions() {
    let validator = TestValidator::start().await;
    let upstream = origin().await;
    let without = sidecar(&default_policy("  maxStreamsPerAccount: 1"), &upstream).await;
    let with = sidecar(
        &policy(&format!("  - {{name: slow, url: '{}'}}", validator.url)),
        &upstream,
    )
    .await;
    for i in 0..200 {
        validator.set(
            &format!("viewer-{i}"),
            Rule::After(Duration::from_secs(2), Box::new(Rule::Allow)),
        );
    }
    let client = Client::new();
    let (mut plain, mut validated) = (Vec::new(), Vec::new());
    // Interleaved, so both see the same machine load.
    for i in 0..200 {
        let account = format!("viewer-{i}");
        for (base, times) in [(&without, &mut plain), (&with, &mut validated)] {
            let started = Instant::now();
            let (status, _) =
                common::streaming_at(&client, base, Method::PUT, &account, "tv").await;
            times.push(started.elapsed());
            assert_eq!(status, 201);
        }
    }
    plain.sort();
    validated.sort();
    let (p50, v50) = (plain[100], validated[100]);
    let (p99, v99) = (plain[197], validated[197]);
    let ratio = v50.as_secs_f64() / p50.as_secs_f64();
    println!(
        "open latency without a validator p50 {p50:?} p99 {p99:?}; with a 2 s Async validator p50 {v50:?} p99 {v99:?}; p50 ratio {ratio:.2}"
    );
    // Generous: nowhere near the validator's 2 s.
    assert!(v99 < Duration::from_millis(500), "p99 {v99:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_check_pending_on_a_killed_sidecar_is_taken_over_and_its_denial_still_cuts() {
    use common::SidecarProcess;
    let redis = common::redis_env("STREAMGATE_TEST_REDIS");
    let validator = TestValidator::start().await;
    let suffix = format!("{:08x}", rand::random::<u32>());
    let account = format!("takeover-{suffix}");
    // The admitting sidecar's call never gets an answer: it dies waiting.
    validator.set(&account, Rule::Hang);
    let dir = tempfile::tempdir().unwrap();
    let policy_path = dir.path().join("policy.yaml");
    std::fs::write(
        &policy_path,
        policy(&format!(
            "  - {{name: entitlement, url: '{}', timeoutSeconds: 2}}",
            validator.url
        )),
    )
    .unwrap();
    let upstream = origin().await;
    let namespace = format!("takeover-{suffix}");
    let args = [
        "--store",
        &redis,
        "--policy-file",
        policy_path.to_str().unwrap(),
        "--namespace",
        &namespace,
        "--upstream",
        &upstream,
    ];
    let mut admitting = SidecarProcess::start(&args).await;
    let other = SidecarProcess::start(&args).await;
    admitting.wait_ready().await;
    other.wait_ready().await;

    let (status, session) = call(&admitting.base, Method::PUT, &account, "tv").await;
    assert_eq!(status, 201, "{session}");
    assert_eq!(session["validation"], "pending");
    let viewer = Viewer::watch(&other.base, &id(&session)).await;
    eventually("the admitting sidecar called the validator", async || {
        !validator.calls().is_empty()
    })
    .await;

    // kill -9: no chance to hand anything over.
    admitting.child.kill().unwrap();
    admitting.child.wait().unwrap();
    let killed_at = Instant::now();
    validator.set(&account, Rule::Deny("entitlement expired"));

    let denied_at = validator.verdict(1).await;
    let takeover = denied_at.saturating_duration_since(killed_at);
    println!("another sidecar completed the check {takeover:?} after the kill");
    // Bounded: the lease (timeout 2 s + 2 s margin from admission) plus a claim interval.
    assert!(takeover < Duration::from_secs(10), "{takeover:?}");
    let cut_at = viewer.ended().await;
    assert!(cut_at.saturating_duration_since(denied_at) < Duration::from_secs(1));

    let (status, body) = call(&other.base, Method::GET, &account, "tv").await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["reason"], "denied");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("entitlement expired")
    );
    let calls = validator.calls();
    assert!(calls.len() >= 2);
    assert!(
        calls
            .iter()
            .all(|c| c.body["request"]["uid"] == id(&session))
    );
}

#[tokio::test]
async fn the_openapi_document_shows_validation_state_and_the_denied_refusal() {
    let base = sidecar(
        &default_policy("  maxStreamsPerAccount: 1"),
        &origin().await,
    )
    .await;
    let doc: Value = Client::new()
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let schemas = &doc["components"]["schemas"];
    let session = &schemas["Session"]["properties"];
    assert!(session.get("validation").is_some(), "{session}");
    assert!(session.get("validationMessage").is_some(), "{session}");
    let states = schemas["ValidationState"].to_string();
    for state in ["pending", "allowed", "denied", "failed"] {
        assert!(states.contains(state), "{states}");
    }
    assert!(schemas["ErrorCode"].to_string().contains("\"denied\""));
    assert!(schemas["EndReason"].to_string().contains("\"denied\""));
    assert!(
        doc["paths"]["/streaming"]["put"]["responses"]
            .get("403")
            .is_some()
    );
}
