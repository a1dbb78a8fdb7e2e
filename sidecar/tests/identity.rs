//! Viewer identity on `/streaming`: real tokens signed with generated RS256, ES256 and EdDSA
//! keys; every refusal (401 with the failed check named, 403 account mismatch, 503 keys never
//! loaded) stores nothing; algorithm confusion is refused; keys rotate without a restart; limit
//! and tier claims apply in their resolution order; a refusal at the limit names streams, never
//! another session's id.

mod common;

use std::sync::Arc;

use common::{SidecarProcess, eventually};
use reqwest::{Client, Method, RequestBuilder};
use serde_json::{Value, json};
use streamctl::token::{KeyAlg, TestKey, jwks};
use streamgate_sidecar::policy::PolicySet;
use streamgate_sidecar::server::Sidecar;
use streamgate_sidecar::store::MemoryStore;

const ISSUER: &str = "https://id.streamgate.test";
const AUDIENCE: &str = "streamgate";

fn policy_file(auth_spec: &str, policy_spec: &str) -> String {
    format!(
        "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {{name: default}}\nspec: {policy_spec}\n---\napiVersion: streamgate.dev/v1alpha1\nkind: ViewerAuthentication\nmetadata: {{name: viewers}}\nspec:\n{auth_spec}\n"
    )
}

/// A ViewerAuthentication spec trusting `keys` (inline JWKS) for [`ISSUER`] and [`AUDIENCE`].
fn inline_rule(mode: &str, keys: &[&TestKey], extra: &str) -> String {
    format!(
        "  mode: {mode}\n  jwtRules:\n  - issuer: {ISSUER}\n    audiences: [{AUDIENCE}]\n    algorithms: [RS256, ES256, EdDSA]\n    jwks: '{}'\n{extra}",
        jwks(keys)
    )
}

struct Viewer {
    base: String,
    client: Client,
    sidecar: Sidecar,
}

impl Viewer {
    async fn start(file: &str) -> Self {
        let policies = PolicySet::from_yaml(file, "test.yaml", "default").unwrap();
        let sidecar = Sidecar::with_store(Arc::new(MemoryStore::new()), policies);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let serving = sidecar.clone();
        tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });
        Self {
            base,
            client: Client::new(),
            sidecar,
        }
    }

    fn streaming(&self, method: Method, query: &str) -> RequestBuilder {
        self.client
            .request(method, format!("{}/streaming?{query}", self.base))
    }

    /// Sessions the store holds for `account`.
    async fn stored(&self, account: &str) -> usize {
        self.sidecar.engine().list(account).await.unwrap().1.len()
    }
}

async fn answer(request: RequestBuilder) -> (u16, Option<String>, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let body = response.json().await.unwrap_or(Value::Null);
    (status, challenge, body)
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn claims(sub: &str) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now(), "exp": now() + 600})
}

fn with(mut base: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

/// Asserts a 401 `unauthenticated` with the bearer challenge and a message containing `check`.
fn assert_unauthenticated(answer: &(u16, Option<String>, Value), check: &str, case: &str) {
    let (status, challenge, body) = answer;
    assert_eq!(*status, 401, "{case}: {body}");
    assert_eq!(body["error"], "unauthenticated", "{case}: {body}");
    assert_eq!(
        challenge.as_deref(),
        Some(r#"Bearer error="invalid_token""#),
        "{case}"
    );
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(check),
        "{case}: {message:?} should name {check:?}"
    );
}

#[tokio::test]
async fn every_refusal_names_its_check_and_stores_nothing_for_each_algorithm() {
    for alg in [KeyAlg::Rs256, KeyAlg::Es256, KeyAlg::EdDsa] {
        let key = TestKey::generate(alg, "k1").unwrap();
        // Same kid, another key: a forged signature.
        let forger = TestKey::generate(alg, "k1").unwrap();
        let viewer = Viewer::start(&policy_file(&inline_rule("Required", &[&key], ""), "{}")).await;
        let put = |token: Option<String>, query: &str| {
            let request = viewer.streaming(Method::PUT, query);
            match token {
                Some(t) => request.bearer_auth(t),
                None => request,
            }
        };
        let sign = |k: &TestKey, c: Value| Some(k.sign(&c).unwrap());
        let cases: Vec<(&str, Option<String>, &str)> = vec![
            ("no token", None, "bearer token is required"),
            (
                "forged signature",
                sign(&forger, claims("alice")),
                "signature check failed",
            ),
            (
                "untrusted issuer",
                sign(
                    &key,
                    with(claims("alice"), json!({"iss": "https://evil.test"})),
                ),
                "issuer check failed",
            ),
            (
                "wrong audience",
                sign(&key, with(claims("alice"), json!({"aud": "someone-else"}))),
                "audience check failed",
            ),
            (
                "expired",
                sign(&key, with(claims("alice"), json!({"exp": now() - 3600}))),
                "expiry check failed",
            ),
            (
                "not yet valid",
                sign(&key, with(claims("alice"), json!({"nbf": now() + 3600}))),
                "not-before check failed",
            ),
            (
                "no exp",
                sign(&key, with(claims("alice"), json!({"exp": null}))),
                "expiry check failed",
            ),
            ("garbage", Some("not.a.jwt".into()), "format check failed"),
        ];
        for (case, token, check) in cases {
            let case = format!("{alg} {case}");
            let got = answer(put(token, "streamId=s1")).await;
            assert_unauthenticated(&got, check, &case);
            // Also with the account given in the query: still refused.
            let got = answer(put(None, "account=alice&streamId=s1")).await;
            assert_eq!(got.0, 401, "{case}");
        }
        // A wrong scheme.
        let got = answer(
            viewer
                .streaming(Method::PUT, "streamId=s1")
                .header("authorization", "Basic YWxpY2U6eA=="),
        )
        .await;
        assert_unauthenticated(&got, "Bearer", &format!("{alg} basic auth"));
        // The token's account differs from the query's: 403.
        let (status, _, body) =
            answer(put(sign(&key, claims("alice")), "account=bob&streamId=s1")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("account_mismatch")),
            "{body}"
        );
        assert_eq!(
            viewer.stored("alice").await,
            0,
            "{alg}: nothing stored on refusal"
        );
        assert_eq!(viewer.stored("bob").await, 0, "{alg}");

        // The same token, valid: the account comes from it, with or without the parameter.
        let token = key.sign(&claims("alice")).unwrap();
        let (status, _, body) = answer(put(Some(token.clone()), "streamId=s1")).await;
        assert_eq!(status, 201, "{alg}: {body}");
        assert_eq!(body["account"], "alice");
        let (status, _, _) = answer(put(Some(token.clone()), "account=alice&streamId=s2")).await;
        assert_eq!(status, 201, "{alg}");
        let (status, _, _) = answer(
            viewer
                .streaming(Method::GET, "streamId=s1")
                .bearer_auth(&token),
        )
        .await;
        assert_eq!(status, 200, "{alg}: heartbeat with the token");
        // Heartbeat and end need the token too.
        let (status, _, _) =
            answer(viewer.streaming(Method::GET, "account=alice&streamId=s1")).await;
        assert_eq!(status, 401, "{alg}: heartbeat without a token");
        let (status, _, _) =
            answer(viewer.streaming(Method::DELETE, "account=alice&streamId=s1")).await;
        assert_eq!(status, 401, "{alg}: end without a token");
        assert_eq!(viewer.stored("alice").await, 2);
        let (status, _, _) = answer(
            viewer
                .streaming(Method::DELETE, "streamId=s1")
                .bearer_auth(&token),
        )
        .await;
        assert_eq!(status, 204, "{alg}");
        assert_eq!(viewer.stored("alice").await, 1);
    }
}

#[tokio::test]
async fn keys_never_loaded_fail_closed_even_under_failure_policy_open() {
    let key = TestKey::generate(KeyAlg::EdDsa, "k1").unwrap();
    let auth = format!("  jwtRules:\n  - issuer: {ISSUER}\n    jwks: '{{\"keys\":[]}}'\n");
    let viewer = Viewer::start(&policy_file(&auth, "{failurePolicy: Open}")).await;
    let (status, _, body) = answer(
        viewer
            .streaming(Method::PUT, "streamId=s1")
            .bearer_auth(key.sign(&claims("alice")).unwrap()),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("auth_unavailable")),
        "{body}"
    );
    // A standalone file whose jwksUri cannot be fetched: never loaded either.
    let auth =
        format!("  jwtRules:\n  - issuer: {ISSUER}\n    jwksUri: https://127.0.0.1:1/jwks\n");
    let unreachable = Viewer::start(&policy_file(&auth, "{}")).await;
    let (status, _, body) = answer(
        unreachable
            .streaming(Method::PUT, "streamId=s1")
            .bearer_auth(key.sign(&claims("alice")).unwrap()),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("auth_unavailable")),
        "{body}"
    );
    assert_eq!(viewer.stored("alice").await, 0);
    assert_eq!(unreachable.stored("alice").await, 0);
}

#[tokio::test]
async fn algorithm_confusion_is_refused() {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let rsa = TestKey::generate(KeyAlg::Rs256, "k1").unwrap();
    let viewer = Viewer::start(&policy_file(&inline_rule("Required", &[&rsa], ""), "{}")).await;
    let payload = b64(claims("mallory").to_string().as_bytes());

    // alg none, no signature.
    let header = b64(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#);
    for token in [
        format!("{header}.{payload}."),
        format!("{header}.{payload}"),
    ] {
        let got = answer(
            viewer
                .streaming(Method::PUT, "streamId=s1")
                .bearer_auth(token),
        )
        .await;
        assert_eq!(got.0, 401, "{:?}", got.2);
        assert_eq!(got.2["error"], "unauthenticated");
    }
    let header = b64(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#);
    let got = answer(
        viewer
            .streaming(Method::PUT, "streamId=s1")
            .bearer_auth(format!("{header}.{payload}.")),
    )
    .await;
    assert_unauthenticated(&got, "alg none", "alg none");

    // HS256 with the RSA public key as the HMAC secret, in every form a confused verifier
    // might use: the JWK's modulus, the JWK JSON, the JWKS text.
    let header = b64(br#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#);
    let signing_input = format!("{header}.{payload}");
    let secrets: Vec<Vec<u8>> = vec![
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(rsa.jwk["n"].as_str().unwrap())
            .unwrap(),
        rsa.jwk.to_string().into_bytes(),
        jwks(&[&rsa]).into_bytes(),
    ];
    for secret in secrets {
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            signing_input.as_bytes(),
        );
        let token = format!("{signing_input}.{}", b64(tag.as_ref()));
        let got = answer(
            viewer
                .streaming(Method::PUT, "streamId=s1")
                .bearer_auth(token),
        )
        .await;
        assert_unauthenticated(&got, "algorithm check failed", "HS256 with the public key");
    }
    // Even where HS256 is listed, an RSA key is never an HMAC secret (and HS256 needs a Secret,
    // so such a file is refused outright).
    let hs =
        inline_rule("Required", &[&rsa], "").replace("[RS256, ES256, EdDSA]", "[RS256, HS256]");
    let error = PolicySet::from_yaml(&policy_file(&hs, "{}"), "t", "default").unwrap_err();
    assert!(error.to_string().contains("HS256"), "{error}");
    assert_eq!(viewer.stored("mallory").await, 0);
}

#[tokio::test]
async fn optional_and_disabled_modes() {
    let key = TestKey::generate(KeyAlg::Es256, "k1").unwrap();
    let optional = Viewer::start(&policy_file(&inline_rule("Optional", &[&key], ""), "{}")).await;
    // No token: the query's account, as in the prototype.
    let (status, _, _) = answer(optional.streaming(Method::PUT, "account=anon&streamId=s1")).await;
    assert_eq!(status, 201);
    // A token that fails: refused, not downgraded to the query.
    let expired = key
        .sign(&with(claims("alice"), json!({"exp": now() - 3600})))
        .unwrap();
    let got = answer(
        optional
            .streaming(Method::PUT, "account=alice&streamId=s1")
            .bearer_auth(expired),
    )
    .await;
    assert_unauthenticated(&got, "expiry check failed", "optional, expired");
    assert_eq!(optional.stored("alice").await, 0);
    // No token and no account: 400 naming the parameter.
    let (status, _, body) = answer(optional.streaming(Method::PUT, "streamId=s1")).await;
    assert_eq!((status, body["parameter"].as_str()), (400, Some("account")));

    let disabled = Viewer::start(&policy_file(&inline_rule("Disabled", &[&key], ""), "{}")).await;
    let (status, _, body) = answer(
        disabled
            .streaming(Method::PUT, "account=bob&streamId=s1")
            .bearer_auth("ignored"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["account"], "bob");
}

#[tokio::test]
async fn limit_and_tier_claims_apply_after_overrides_and_before_the_default() {
    let key = TestKey::generate(KeyAlg::EdDsa, "k1").unwrap();
    let claims_spec = "  claims:\n    limit: climit\n    tier: plan\n    tiers: {basic: 1, family: 4}\n    maxClaimedLimit: 5\n";
    let file = format!(
        "{}---\napiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {{name: vip}}\nspec: {{maxStreamsPerAccount: 10, accounts: [vip]}}\n",
        policy_file(
            &inline_rule("Required", &[&key], claims_spec),
            "{maxStreamsPerAccount: 2}"
        )
    );
    let viewer = Viewer::start(&file).await;
    // Opens streams until refused; returns how many were admitted and the refusal.
    let fill = async |sub: &str, extra: Value| {
        let token = key.sign(&with(claims(sub), extra)).unwrap();
        for n in 1..=20 {
            let (status, _, body) = answer(
                viewer
                    .streaming(Method::PUT, &format!("streamId=s{n}"))
                    .bearer_auth(&token),
            )
            .await;
            if status == 429 {
                return (n - 1, body);
            }
            assert_eq!(status, 201, "{body}");
            assert_eq!(body["account"], sub);
        }
        panic!("never refused");
    };
    let (admitted, refusal) = fill("claims-one", json!({"climit": 1})).await;
    assert_eq!((admitted, refusal["limit"].as_u64()), (1, Some(1)));
    let (admitted, _) = fill("family", json!({"plan": "family"})).await;
    assert_eq!(admitted, 4, "the tier's limit");
    let (admitted, _) = fill("both", json!({"climit": 3, "plan": "family"})).await;
    assert_eq!(admitted, 3, "the limit claim before the tier");
    let (admitted, _) = fill("greedy", json!({"climit": 500})).await;
    assert_eq!(admitted, 5, "capped by maxClaimedLimit");
    let (admitted, _) = fill("unknown-tier", json!({"plan": "platinum"})).await;
    assert_eq!(admitted, 2, "nothing usable claimed: the namespace default");
    let (admitted, _) = fill("vip", json!({"climit": 1})).await;
    assert_eq!(admitted, 10, "an account override wins over the claim");
}

#[tokio::test]
async fn a_refusal_at_the_limit_lists_streams_but_no_session_id() {
    // The prototype's API (no ViewerAuthentication) and one with identity.
    let key = TestKey::generate(KeyAlg::EdDsa, "k1").unwrap();
    for file in [
        policy_file(
            &inline_rule("Disabled", &[&key], ""),
            "{maxStreamsPerAccount: 2}",
        ),
        policy_file(
            &inline_rule("Required", &[&key], ""),
            "{maxStreamsPerAccount: 2}",
        ),
    ] {
        let viewer = Viewer::start(&file).await;
        let token = key.sign(&claims("alice")).unwrap();
        let mut ids = Vec::new();
        for stream in ["s1", "s2", "s3"] {
            let response = viewer
                .streaming(Method::PUT, &format!("account=alice&streamId={stream}"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            if stream == "s3" {
                assert_eq!(status, 429, "{text}");
                let body: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(body["error"], "limit_exceeded");
                assert_eq!(body["limit"], 2);
                assert_eq!(body["active"], 2);
                let listed = body["sessions"].as_array().unwrap();
                let streams: Vec<&str> = listed
                    .iter()
                    .map(|s| s["streamId"].as_str().unwrap())
                    .collect();
                assert_eq!(streams, ["s1", "s2"]);
                for entry in listed {
                    let mut keys: Vec<&String> = entry.as_object().unwrap().keys().collect();
                    keys.sort();
                    assert_eq!(keys, ["createdAt", "expiresAt", "streamId"], "{entry}");
                }
                for id in &ids {
                    assert!(
                        !text.contains(id),
                        "the refusal leaks session id {id}: {text}"
                    );
                }
            } else {
                assert_eq!(status, 201, "{text}");
                let body: Value = serde_json::from_str(&text).unwrap();
                ids.push(body["sessionId"].as_str().unwrap().to_string());
            }
        }
    }
}

#[tokio::test]
async fn rotated_keys_apply_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.yaml");
    let old = TestKey::generate(KeyAlg::Rs256, "2026-old").unwrap();
    let new = TestKey::generate(KeyAlg::Es256, "2026-new").unwrap();
    std::fs::write(
        &path,
        policy_file(
            &inline_rule("Required", &[&old], ""),
            "{maxStreamsPerAccount: 10}",
        ),
    )
    .unwrap();
    let mut sidecar = SidecarProcess::start(&[
        "--policy-file",
        path.to_str().unwrap(),
        "--policy-reload-interval",
        "100ms",
    ])
    .await;
    sidecar.wait_ready().await;
    let client = Client::new();
    let open = async |key: &TestKey, stream: &str| {
        client
            .put(format!("{}/streaming?streamId={stream}", sidecar.base))
            .bearer_auth(key.sign(&claims("alice")).unwrap())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(open(&old, "a").await, 201);
    assert_eq!(open(&new, "b").await, 401, "the new key is not trusted yet");

    // Rotation, step 1: both keys published.
    std::fs::write(
        &path,
        policy_file(
            &inline_rule("Required", &[&old, &new], ""),
            "{maxStreamsPerAccount: 10}",
        ),
    )
    .unwrap();
    eventually("the new key is accepted", async || {
        open(&new, "c").await == 201
    })
    .await;
    assert_eq!(
        open(&old, "d").await,
        201,
        "the old key still works meanwhile"
    );
    // Step 2: the old key withdrawn.
    std::fs::write(
        &path,
        policy_file(
            &inline_rule("Required", &[&new], ""),
            "{maxStreamsPerAccount: 10}",
        ),
    )
    .unwrap();
    eventually("the old key is refused", async || {
        open(&old, "e").await == 401
    })
    .await;
    assert_eq!(open(&new, "f").await, 201);
    assert!(
        sidecar.child.try_wait().unwrap().is_none(),
        "one process throughout"
    );
}
