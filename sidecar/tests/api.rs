//! The session API contract over HTTP, on the embedded store.

mod common;

use common::{TestSidecar, default_policy, json, metric};
use reqwest::Method;
use serde_json::Value;

const TTL_MS: i64 = 90_000;
/// The embedded store's live-session series (not broken down by policy).
const ACTIVE_MEMORY: &str = r#"streamgate_active_sessions{policy="",store="memory"}"#;

fn ids(sessions: &Value) -> Vec<String> {
    sessions
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["streamId"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn reject_new_refuses_the_fourth_stream_and_lists_the_conflicting_sessions() {
    let t = TestSidecar::start(&default_policy("  maxStreamsPerAccount: 3")).await;
    for (i, stream) in ["s1", "s2", "s3"].iter().enumerate() {
        let (status, body) = t.open("acct", stream).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["account"], "acct");
        assert_eq!(body["streamId"], *stream);
        assert_eq!(body["state"], "active");
        assert_eq!(body["limit"], 3);
        assert_eq!(body["activeSessions"], i + 1);
        assert_eq!(body["heartbeatIntervalSeconds"], 30);
        assert_eq!(body["sessionId"].as_str().unwrap().len(), 40);
        assert!(body["createdAt"].as_str().unwrap().ends_with('Z'));
        assert!(body.get("reason").is_none());
    }
    let (status, body) = t.open("acct", "s4").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "limit_exceeded");
    assert_eq!(body["limit"], 3);
    assert_eq!(body["active"], 3);
    assert_eq!(ids(&body["sessions"]), ["s1", "s2", "s3"]);
    assert!(body["message"].as_str().unwrap().contains("limit is 3"));

    // Refused means refused: nothing was stored, and other accounts are unaffected.
    let (_, list) = json(
        t.admin_request(Method::GET, "/v1/accounts/acct/sessions")
            .await,
    )
    .await;
    assert_eq!(ids(&list["sessions"]), ["s1", "s2", "s3"]);
    assert_eq!(t.open("other", "s1").await.0, 201);
    let m = t.metrics().await;
    assert_eq!(metric(&m, "streamgate_sessions_admitted_total"), Some(4.0));
    assert_eq!(metric(&m, "streamgate_sessions_refused_total"), Some(1.0));
    assert_eq!(metric(&m, ACTIVE_MEMORY), Some(4.0));
}

#[tokio::test]
async fn reopening_an_active_stream_is_idempotent() {
    let t = TestSidecar::start(&default_policy("  maxStreamsPerAccount: 1")).await;
    let (status, first) = t.open("acct", "s1").await;
    assert_eq!(status, 201);
    t.clock.advance(10_000);
    let (status, again) = t.open("acct", "s1").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["sessionId"], first["sessionId"]);
    assert_eq!(again["activeSessions"], 1);
    assert_eq!(again["createdAt"], first["createdAt"]);
    assert_ne!(again["expiresAt"], first["expiresAt"], "a reopen renews");
}

#[tokio::test]
async fn evict_oldest_admits_and_cuts_the_oldest_session() {
    let t = TestSidecar::start(&default_policy(
        "  maxStreamsPerAccount: 3\n  onLimitExceeded: EvictOldest",
    ))
    .await;
    for stream in ["s1", "s2", "s3"] {
        assert_eq!(t.open("acct", stream).await.0, 201);
        t.clock.advance(1);
    }
    let (_, oldest) = t.heartbeat("acct", "s1").await;
    let (status, body) = t.open("acct", "s4").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["activeSessions"], 3);

    let (status, gone) = t.heartbeat("acct", "s1").await;
    assert_eq!(status, 410, "{gone}");
    assert_eq!(gone["error"], "session_gone");
    assert_eq!(gone["reason"], "evicted");
    assert_eq!(gone["session"]["sessionId"], oldest["sessionId"]);
    assert_eq!(gone["session"]["state"], "revoked");
    for stream in ["s2", "s3", "s4"] {
        assert_eq!(t.heartbeat("acct", stream).await.0, 200, "{stream}");
    }
    let (_, list) = json(
        t.admin_request(Method::GET, "/v1/accounts/acct/sessions")
            .await,
    )
    .await;
    assert_eq!(ids(&list["sessions"]), ["s2", "s3", "s4"]);
    let m = t.metrics().await;
    assert_eq!(
        metric(&m, r#"streamgate_sessions_revoked_total{reason="evicted"}"#),
        Some(1.0)
    );

    // The cut session stays answerable as 410 for one TTL, then it is forgotten.
    t.clock.advance(TTL_MS - 10);
    assert_eq!(t.heartbeat("acct", "s1").await.0, 410);
    t.clock.advance(20);
    t.store.reap();
    assert_eq!(t.heartbeat("acct", "s1").await.0, 404);
}

#[tokio::test]
async fn a_player_reopening_after_eviction_gets_a_new_session() {
    let t = TestSidecar::start(&default_policy(
        "  maxStreamsPerAccount: 1\n  onLimitExceeded: EvictOldest",
    ))
    .await;
    let (_, first) = t.open("acct", "tv").await;
    t.clock.advance(1);
    assert_eq!(t.open("acct", "phone").await.0, 201);
    t.clock.advance(1);
    let (status, back) = t.open("acct", "tv").await;
    assert_eq!(status, 201);
    assert_ne!(back["sessionId"], first["sessionId"]);
    assert_eq!(t.heartbeat("acct", "phone").await.1["reason"], "evicted");
}

#[tokio::test]
async fn dry_run_admits_over_the_limit_cuts_nothing_and_reports() {
    let t = TestSidecar::start(&default_policy(
        "  maxStreamsPerAccount: 2\n  onLimitExceeded: EvictOldest\n  mode: DryRun",
    ))
    .await;
    assert_eq!(t.open("acct", "s1").await.0, 201);
    assert_eq!(t.open("acct", "s2").await.0, 201);
    let response = t
        .request(Method::PUT, "/streaming?account=acct&streamId=s3")
        .await;
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-streamgate-dry-run"], "would-evict");
    for stream in ["s1", "s2", "s3"] {
        assert_eq!(t.heartbeat("acct", stream).await.0, 200, "{stream} was cut");
    }
    let m = t.metrics().await;
    assert_eq!(
        metric(&m, r#"streamgate_dry_run_decisions_total{would="evict"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, r#"streamgate_sessions_revoked_total{reason="evicted"}"#),
        None
    );
}

#[tokio::test]
async fn dry_run_reject_new_reports_would_refuse() {
    let t = TestSidecar::start(&default_policy("  maxStreamsPerAccount: 1\n  mode: DryRun")).await;
    assert_eq!(t.open("acct", "s1").await.0, 201);
    let response = t
        .request(Method::PUT, "/streaming?account=acct&streamId=s2")
        .await;
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-streamgate-dry-run"], "would-refuse");
    let m = t.metrics().await;
    assert_eq!(
        metric(&m, r#"streamgate_dry_run_decisions_total{would="refuse"}"#),
        Some(1.0)
    );
    assert_eq!(metric(&m, "streamgate_sessions_refused_total"), Some(0.0));
}

#[tokio::test]
async fn overrides_apply_to_their_accounts_only() {
    let policy = format!(
        "{}---\n{}",
        default_policy("  maxStreamsPerAccount: 1"),
        include_str!("../../examples/vip-override.yaml")
    );
    let t = TestSidecar::start(&policy).await;
    for i in 0..10 {
        let (status, body) = t.open("vip-1001", &format!("s{i}")).await;
        assert_eq!(status, 201);
        assert_eq!(body["limit"], 10);
    }
    // The VIP policy evicts rather than refuses.
    assert_eq!(t.open("vip-1001", "s10").await.0, 201);
    assert_eq!(t.heartbeat("vip-1001", "s0").await.1["reason"], "evicted");

    assert_eq!(t.open("regular", "s0").await.0, 201);
    let (status, body) = t.open("regular", "s1").await;
    assert_eq!(status, 429);
    assert_eq!(body["limit"], 1);
}

#[tokio::test]
async fn ending_a_stream_frees_its_slot() {
    let t = TestSidecar::start(&default_policy("  maxStreamsPerAccount: 1")).await;
    assert_eq!(t.open("acct", "s1").await.0, 201);
    assert_eq!(t.open("acct", "s2").await.0, 429);
    let (status, body) = t.end("acct", "s1").await;
    assert_eq!((status, body), (204, Value::Null));
    let (status, body) = t.end("acct", "s1").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found");
    assert_eq!(t.heartbeat("acct", "s1").await.0, 404);
    assert_eq!(t.open("acct", "s2").await.0, 201);
    let m = t.metrics().await;
    assert_eq!(metric(&m, "streamgate_sessions_ended_total"), Some(1.0));
}

#[tokio::test]
async fn kick_revokes_a_session_and_its_heartbeat_gets_410_kicked() {
    let t = TestSidecar::start(&default_policy("  maxStreamsPerAccount: 2")).await;
    let (_, session) = t.open("acct", "s1").await;
    let id = session["sessionId"].as_str().unwrap();

    let (status, got) = json(
        t.admin_request(Method::GET, &format!("/v1/sessions/{id}"))
            .await,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(got["state"], "active");
    assert_eq!(
        got["expiresAt"], session["expiresAt"],
        "a read does not renew"
    );

    let (status, body) = json(
        t.admin_request(Method::DELETE, &format!("/v1/sessions/{id}"))
            .await,
    )
    .await;
    assert_eq!((status, body), (204, Value::Null));

    let (status, gone) = t.heartbeat("acct", "s1").await;
    assert_eq!(status, 410);
    assert_eq!(gone["reason"], "kicked");
    let (_, got) = json(
        t.admin_request(Method::GET, &format!("/v1/sessions/{id}"))
            .await,
    )
    .await;
    assert_eq!(got["state"], "revoked");
    assert_eq!(got["reason"], "kicked");
    let (status, again) = json(
        t.admin_request(Method::DELETE, &format!("/v1/sessions/{id}"))
            .await,
    )
    .await;
    assert_eq!(status, 410);
    assert_eq!(again["reason"], "kicked");

    // The slot is free again.
    assert_eq!(t.open("acct", "s2").await.0, 201);
    assert_eq!(t.open("acct", "s3").await.0, 201);
    let m = t.metrics().await;
    assert_eq!(
        metric(&m, r#"streamgate_sessions_revoked_total{reason="kicked"}"#),
        Some(1.0)
    );

    let unknown = "0123456789abcdef0123456789abcdef01234567";
    let (status, body) = json(
        t.admin_request(Method::DELETE, &format!("/v1/sessions/{unknown}"))
            .await,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found");
}

#[tokio::test]
async fn a_session_without_heartbeats_expires_after_its_ttl() {
    let t = TestSidecar::start(&default_policy(
        "  maxStreamsPerAccount: 1\n  sessionTTLSeconds: 60\n  heartbeatIntervalSeconds: 20",
    ))
    .await;
    assert_eq!(t.open("acct", "s1").await.0, 201);
    t.clock.advance(59_000);
    assert_eq!(
        t.heartbeat("acct", "s1").await.0,
        200,
        "renewed just in time"
    );
    t.clock.advance(59_999);
    assert_eq!(t.open("acct", "s2").await.0, 429, "still counted");
    t.clock.advance(1);
    let (status, gone) = t.heartbeat("acct", "s1").await;
    assert_eq!(status, 410, "{gone}");
    assert_eq!(gone["reason"], "expired");
    assert_eq!(gone["session"]["state"], "expired");
    assert_eq!(t.open("acct", "s2").await.0, 201, "the slot was freed");

    // Expirations are counted, also when only the reaper notices them.
    t.clock.advance(60_000);
    t.store.reap();
    // The expiry counter follows the store's revocation notices; wait for it to catch up.
    common::eventually("both expirations are counted", async || {
        let m = t.metrics().await;
        metric(&m, r#"streamgate_sessions_revoked_total{reason="expired"}"#) == Some(2.0)
    })
    .await;
    assert_eq!(metric(&t.metrics().await, ACTIVE_MEMORY), Some(0.0));
}

#[tokio::test]
async fn bad_identifiers_get_400_naming_the_parameter_and_store_nothing() {
    let t = TestSidecar::start(&default_policy("  maxStreamsPerAccount: 3")).await;
    let long = "x".repeat(129);
    let cases = [
        ("streamId=s1", "account"),
        ("account=&streamId=s1", "account"),
        ("account=a", "streamId"),
        ("account=a&streamId=", "streamId"),
        (&format!("account={long}&streamId=s1") as &str, "account"),
        ("account=a%20b&streamId=s1", "account"),
        ("account=a&streamId=%C3%A9", "streamId"),
        ("account=a&streamId=%00", "streamId"),
        ("account=a&account=b&streamId=s1", "account"),
    ];
    for (query, parameter) in cases {
        for method in [Method::PUT, Method::GET, Method::DELETE] {
            let (status, body) = json(
                t.request(method.clone(), &format!("/streaming?{query}"))
                    .await,
            )
            .await;
            assert_eq!(status, 400, "{method} {query}: {body}");
            assert_eq!(body["error"], "invalid_request", "{query}");
            assert_eq!(body["parameter"], parameter, "{query}");
            assert!(
                body["message"].as_str().unwrap().contains(parameter),
                "{query}: {body}"
            );
        }
    }
    let m = t.metrics().await;
    assert_eq!(metric(&m, "streamgate_sessions_admitted_total"), Some(0.0));
    assert_eq!(metric(&m, ACTIVE_MEMORY), Some(0.0));

    // Exactly 128 visible ASCII characters is fine, punctuation included.
    let edge = "{}:~".repeat(32);
    assert_eq!(t.open(&edge, "s1").await.0, 201);
}

#[tokio::test]
async fn bad_paths_methods_and_bodies_get_json_errors() {
    let t = TestSidecar::start(&default_policy("  maxStreamsPerAccount: 3")).await;
    let (status, body) = json(t.request(Method::GET, "/nope").await).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found");

    let (status, body) = json(
        t.request(Method::POST, "/streaming?account=a&streamId=b")
            .await,
    )
    .await;
    assert_eq!(status, 405);
    assert_eq!(body["error"], "invalid_request");
    assert!(body["message"].as_str().unwrap().contains("POST"));

    let (status, body) = json(t.admin_request(Method::GET, "/v1/sessions/not-an-id").await).await;
    assert_eq!(status, 400);
    assert_eq!(body["parameter"], "sessionId");

    let (status, body) = json(
        t.admin_request(Method::GET, "/v1/accounts/a%20b/sessions")
            .await,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["parameter"], "account");

    let response = t
        .client
        .put(format!("{}/streaming?account=a&streamId=b", t.base))
        .body(vec![b'x'; 64 * 1024])
        .send()
        .await
        .unwrap();
    let (status, body) = json(response).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"], "invalid_request");
    let m = t.metrics().await;
    assert_eq!(metric(&m, "streamgate_sessions_admitted_total"), Some(0.0));
}

#[tokio::test]
async fn health_readiness_metrics_and_openapi_are_served() {
    let t = TestSidecar::start(&default_policy("  maxStreamsPerAccount: 3")).await;
    let (status, body) = json(t.request(Method::GET, "/healthz").await).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = json(t.request(Method::GET, "/readyz").await).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));

    t.open("a", "s").await;
    let m = t.metrics().await;
    assert!(
        m.contains("# TYPE streamgate_sessions_admitted counter"),
        "{m}"
    );
    assert!(
        m.contains(r#"streamgate_http_request_duration_seconds_count{method="PUT",route="/streaming",status="201"} 1"#),
        "{m}"
    );

    let (status, doc) = json(t.request(Method::GET, "/openapi.json").await).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/streaming", "put"),
        ("/streaming", "get"),
        ("/streaming", "delete"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/openapi.json", "get"),
    ] {
        assert!(paths[path].get(method).is_some(), "{method} {path} missing");
    }
    // The viewer port's document names no admin operation.
    let mut viewer_paths: Vec<&str> = paths.keys().map(String::as_str).collect();
    viewer_paths.sort_unstable();
    assert_eq!(
        viewer_paths,
        ["/healthz", "/openapi.json", "/readyz", "/streaming"]
    );

    let (status, doc) = json(t.admin_request(Method::GET, "/openapi.json").await).await;
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/v1/accounts/{account}/sessions", "get"),
        ("/v1/sessions/{sessionId}", "get"),
        ("/v1/sessions/{sessionId}", "delete"),
        ("/metrics", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    ] {
        assert!(paths[path].get(method).is_some(), "{method} {path} missing");
    }
    assert!(
        paths.get("/streaming").is_none(),
        "the admin listener serves no viewer route"
    );
    // Path parameters carry the constraints the handlers enforce; /metrics its real type.
    let account = &doc["paths"]["/v1/accounts/{account}/sessions"]["get"]["parameters"][0];
    assert_eq!(account["schema"]["maxLength"], 128, "{account}");
    assert_eq!(account["schema"]["minLength"], 1);
    assert!(account["schema"]["pattern"].is_string());
    let session = &doc["paths"]["/v1/sessions/{sessionId}"]["delete"]["parameters"][0];
    assert_eq!(session["schema"]["pattern"], "^[0-9a-f]{40}$", "{session}");
    assert_eq!(session["schema"]["maxLength"], 40);
    let metrics_type = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
        .as_object()
        .unwrap();
    assert!(
        metrics_type.contains_key("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{metrics_type:?}"
    );
    let served = t.admin_request(Method::GET, "/metrics").await;
    assert!(
        served.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    assert!(schemas.contains_key("Session") && schemas.contains_key("ErrorBody"));
}

/// A viewer who can reach the sidecar cannot list, inspect or kick anyone's sessions: the admin
/// routes answer 404 on the viewer port (as any unknown path) and work on the admin listener.
#[tokio::test]
async fn admin_routes_are_absent_from_the_viewer_port_and_present_on_the_admin_listener() {
    let t = TestSidecar::start(&default_policy("  maxStreamsPerAccount: 3")).await;
    let (status, opened) = t.open("acct", "tv").await;
    assert_eq!(status, 201);
    let id = opened["sessionId"].as_str().unwrap().to_string();
    let admin_calls = [
        (Method::GET, "/v1/accounts/acct/sessions".to_string()),
        (Method::GET, format!("/v1/sessions/{id}")),
        (Method::DELETE, format!("/v1/sessions/{id}")),
        (Method::GET, "/metrics".to_string()),
    ];
    for (method, path) in &admin_calls {
        let (status, body) = json(t.request(method.clone(), path).await).await;
        assert_eq!(status, 404, "{method} {path} on the viewer port: {body}");
        assert_eq!(body["error"], "not_found", "{body}");
    }
    // The kick attempt on the viewer port changed nothing.
    assert_eq!(t.heartbeat("acct", "tv").await.0, 200);

    let (status, list) = json(
        t.admin_request(Method::GET, "/v1/accounts/acct/sessions")
            .await,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(list["sessions"][0]["sessionId"], id.as_str());
    let kicked = t
        .admin_request(Method::DELETE, &format!("/v1/sessions/{id}"))
        .await;
    assert_eq!(kicked.status(), 204);
    assert_eq!(t.heartbeat("acct", "tv").await.0, 410);
    // And the viewer API is not on the admin listener.
    let (status, _) = json(
        t.admin_request(Method::PUT, "/streaming?account=acct&streamId=phone")
            .await,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn hostile_account_ids_stay_distinct() {
    let t = TestSidecar::start(&default_policy("  maxStreamsPerAccount: 1")).await;
    for account in ["{a}", "a", "{a}:", "a:{", "}a{", "a:s1"] {
        let (status, body) = t.open(account, "s1").await;
        assert_eq!(status, 201, "{account}: {body}");
        assert_eq!(body["account"], account);
    }
}
