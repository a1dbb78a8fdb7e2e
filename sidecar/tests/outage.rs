//! Media requests through a Redis outage: the enforcing proxy asks the engine, so failurePolicy
//! applies to media as it does to the session API. Each test stops and starts a redis-server of
//! its own (never the shared one).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{OwnRedis, RecordingUpstream, Served, default_policy, eventually, json, metric_with};
use reqwest::{Client, Method};
use streamgate_sidecar::policy::PolicySet;
use streamgate_sidecar::server::Sidecar;
use streamgate_sidecar::store::{RedisStore, RedisTarget};

/// An in-process sidecar on `redis_url` with the proxy in front of `upstream`.
async fn sidecar(redis_url: &str, spec: &str, upstream: &str) -> Served {
    let policies = PolicySet::from_yaml(&default_policy(spec), "test.yaml", "default").unwrap();
    let store = RedisStore::new(
        RedisTarget::parse(redis_url).unwrap(),
        Duration::from_millis(500),
    );
    let sidecar =
        Sidecar::with_store(Arc::new(store), policies).with_upstream(upstream.parse().unwrap());
    common::serve_in_background(sidecar).await
}

async fn ready(base: &str) -> bool {
    Client::new()
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

async fn open(base: &str, account: &str, stream: &str) -> (u16, serde_json::Value, bool) {
    let response = Client::new()
        .put(format!(
            "{base}/streaming?account={account}&streamId={stream}"
        ))
        .send()
        .await
        .unwrap();
    let degraded = response.headers().contains_key("x-streamgate-degraded");
    let (status, body) = json(response).await;
    (status, body, degraded)
}

/// A segment request of `session`; status and body text.
async fn segment(base: &str, session: &str) -> (u16, String) {
    let response = Client::new()
        .get(format!("{base}/hls/segment7.ts"))
        .header("X-StreamGate-Session", session)
        .send()
        .await
        .unwrap();
    (
        response.status().as_u16(),
        response.text().await.unwrap_or_default(),
    )
}

async fn metrics(admin: &str) -> String {
    Client::new()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn id(session: &serde_json::Value) -> String {
    session["sessionId"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_open_established_and_degraded_sessions_play_through_an_outage() {
    let mut redis = OwnRedis::start();
    let upstream = RecordingUpstream::start("").await;
    let Served { base, admin } = sidecar(
        &redis.url(),
        "  maxStreamsPerAccount: 2\n  failurePolicy: Open",
        &upstream.url,
    )
    .await;
    eventually("the sidecar is ready", async || ready(&base).await).await;

    let (status, tv, _) = open(&base, "acct", "tv").await;
    assert_eq!(status, 201, "{tv}");
    assert_eq!(segment(&base, &id(&tv)).await, (200, "media".to_string()));

    // Redis goes away mid-stream.
    redis.stop();
    // The established session's next segment is still served...
    assert_eq!(segment(&base, &id(&tv)).await, (200, "media".to_string()));
    // ...a new stream is admitted without the store, and its segments are served too.
    let (status, phone, degraded) = open(&base, "acct", "phone").await;
    assert_eq!((status, degraded), (201, true), "{phone}");
    assert_eq!(
        segment(&base, &id(&phone)).await,
        (200, "media".to_string())
    );
    let m = metrics(&admin).await;
    let media_errors = |kind: &str| {
        metric_with(
            &m,
            "streamgate_store_errors_total",
            &[r#"operation="media""#, &format!(r#"kind="{kind}""#)],
        )
    };
    assert!(
        media_errors("transient") + media_errors("timeout") >= 2.0,
        "store errors on the media path are counted: {m}"
    );
    assert_eq!(
        common::metric(&m, "streamgate_failed_open_admissions_total"),
        Some(1.0)
    );

    // Redis comes back with its data (append-only file).
    redis.restart();
    eventually("the sidecar is ready again", async || ready(&base).await).await;
    // The degraded session is honoured: its segments play, the store knows it, and its
    // heartbeat renews it instead of answering 404.
    assert_eq!(
        segment(&base, &id(&phone)).await,
        (200, "media".to_string())
    );
    let (status, stored) = json(
        Client::new()
            .get(format!("{admin}/v1/sessions/{}", id(&phone)))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, stored["state"].as_str()),
        (200, Some("active")),
        "{stored}"
    );
    let (status, renewed) =
        common::streaming_at(&Client::new(), &base, Method::GET, "acct", "phone").await;
    assert_eq!(status, 200, "{renewed}");
    assert_eq!(renewed["sessionId"], phone["sessionId"]);
    assert_eq!(renewed["activeSessions"], 2);
    assert_eq!(segment(&base, &id(&tv)).await, (200, "media".to_string()));
    let m = metrics(&admin).await;
    assert!(
        common::metric(&m, "streamgate_degraded_sessions_restored_total").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_closed_media_and_new_streams_get_503_during_an_outage() {
    let mut redis = OwnRedis::start();
    let upstream = RecordingUpstream::start("").await;
    let Served { base, admin } = sidecar(
        &redis.url(),
        "  maxStreamsPerAccount: 2\n  failurePolicy: Closed",
        &upstream.url,
    )
    .await;
    eventually("the sidecar is ready", async || ready(&base).await).await;
    let (status, tv, _) = open(&base, "acct", "tv").await;
    assert_eq!(status, 201, "{tv}");
    assert_eq!(segment(&base, &id(&tv)).await.0, 200);
    let forwarded = upstream.requests().len();

    redis.stop();
    let (status, body) = segment(&base, &id(&tv)).await;
    assert_eq!(status, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "store_unavailable");
    assert!(
        !body["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("redis"),
        "the body names no internals: {body}"
    );
    let (status, refused, degraded) = open(&base, "acct", "phone").await;
    assert_eq!((status, degraded), (503, false), "{refused}");
    assert_eq!(refused["error"], "store_unavailable");
    assert_eq!(
        upstream.requests().len(),
        forwarded,
        "nothing reached the upstream during the outage"
    );
    let m = metrics(&admin).await;
    assert!(
        metric_with(
            &m,
            "streamgate_store_errors_total",
            &[r#"operation="media""#, r#"kind="transient""#]
        ) >= 1.0,
        "{m}"
    );

    redis.restart();
    eventually("the established session plays again", async || {
        segment(&base, &id(&tv)).await.0 == 200
    })
    .await;
}
