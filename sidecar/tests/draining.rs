//! Draining, with the binary: SIGTERM closes the proxied streams (counted with reason
//! `shutdown`) but never revokes a session or announces a cut; an upstream that refuses
//! connections is a 503 with Retry-After, not a 502.

mod common;

use std::time::Duration;

use common::{SidecarProcess, demo_origin, json, redis_env, refusing_addr, unique};
use futures::StreamExt;
use reqwest::Client;
use streamgate_sidecar::session::{SessionId, SessionState};
use streamgate_sidecar::store::redis_store::REVOCATION_CHANNEL;
use streamgate_sidecar::store::{RedisStore, RedisTarget, SessionStore};

async fn open(base: &str, account: &str) -> String {
    let (status, body) = json(
        Client::new()
            .put(format!("{base}/streaming?account={account}&streamId=tv"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["sessionId"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_streams_as_shutdown_and_keeps_every_session() {
    let redis_url = redis_env("STREAMGATE_TEST_REDIS");
    let upstream = demo_origin().await.0;
    let sidecar = SidecarProcess::start(&[
        "--store",
        &redis_url,
        "--store-timeout",
        "2s",
        "--upstream",
        &upstream,
        "--shutdown-timeout",
        "300ms",
    ])
    .await;
    sidecar.wait_ready().await;
    let account = unique("drain");
    let session = open(&sidecar.base, &account).await;

    // Every cut any sidecar announces, from before the signal on.
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut notices = client.get_async_pubsub().await.unwrap();
    notices.subscribe(REVOCATION_CHANNEL).await.unwrap();

    let response = Client::new()
        .get(format!("{}/live?interval_ms=20", sidecar.base))
        .header("X-StreamGate-Session", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    assert!(body.next().await.unwrap().is_ok(), "the stream flows");

    let mut sidecar = sidecar;
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &sidecar.child.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    // The stream is closed (it never finishes by itself) and the process exits.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = body.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream was closed by the shutdown");
    let status = tokio::task::spawn_blocking(move || {
        let status = sidecar.child.wait().unwrap();
        (status, sidecar)
    })
    .await
    .unwrap();
    let (exit, sidecar) = status;
    assert!(exit.success(), "{exit:?}");
    let log = sidecar.log_text();
    let closed = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["reason"] == "shutdown")
        .unwrap_or_else(|| panic!("no shutdown line in the log:\n{log}"));
    assert_eq!(closed["fields"]["streams"], 1, "{closed}");

    // The session is still active in the store: the viewer reconnects through another sidecar.
    let store = RedisStore::new(
        RedisTarget::parse(&redis_url).unwrap(),
        Duration::from_secs(2),
    );
    let id: SessionId = session.parse().unwrap();
    let stored = store.get(id).await.unwrap().expect("the session is kept");
    assert_eq!(stored.state, SessionState::Active);
    // No cut was announced: the first notice after the signal is the test's own marker.
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg(REVOCATION_CHANNEL)
        .arg(format!("marker-{account}"))
        .query_async(&mut raw)
        .await
        .unwrap();
    let mut messages = notices.on_message();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("the marker arrives")
            .unwrap();
        let payload: String = message.get_payload().unwrap();
        if payload == format!("marker-{account}") {
            break;
        }
        assert!(
            !payload.contains(&session),
            "a cut of the session was announced: {payload}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusing_connections_is_503_with_retry_after() {
    // A port that refuses connections.
    let (_refusing, closed) = refusing_addr();
    let sidecar = SidecarProcess::start(&["--upstream", &format!("http://{closed}")]).await;
    sidecar.wait_ready().await;
    let session = open(&sidecar.base, &unique("refused")).await;
    let response = Client::new()
        .get(format!("{}/hls/segment1.ts", sidecar.base))
        .header("X-StreamGate-Session", &session)
        .send()
        .await
        .unwrap();
    let retry_after = response.headers().get("retry-after").cloned();
    let (status, body) = json(response).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "upstream_unavailable");
    assert_eq!(retry_after.unwrap(), "1");
}
