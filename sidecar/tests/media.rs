//! Media requests go through the engine: they renew their session when its last renewal is at
//! least half a heartbeat interval old, so a player that only fetches segments keeps playing.

mod common;

use common::{RecordingUpstream, TestSidecar, default_policy, json, metric};
use reqwest::Method;

async fn session_now(t: &TestSidecar, id: &str) -> serde_json::Value {
    let (status, body) = json(
        t.admin_request(Method::GET, &format!("/v1/sessions/{id}"))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn segment(t: &TestSidecar, id: &str) -> u16 {
    t.client
        .get(format!("{}/hls/seg.ts?session={id}", t.base))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn segment_requests_are_implicit_heartbeats() {
    let upstream = RecordingUpstream::start("").await;
    let t = TestSidecar::start_with(
        &default_policy("  sessionTTLSeconds: 90\n  heartbeatIntervalSeconds: 30"),
        Some(&upstream.url),
    )
    .await;
    let (status, opened) = t.open("acct", "tv").await;
    assert_eq!(status, 201);
    let id = opened["sessionId"].as_str().unwrap().to_string();

    // Within half an interval (15 s) of the last renewal: served, not renewed.
    t.clock.advance(14_999);
    assert_eq!(segment(&t, &id).await, 200);
    assert_eq!(session_now(&t, &id).await["expiresAt"], opened["expiresAt"]);
    // Past it: served and renewed for a whole TTL from now.
    t.clock.advance(1);
    assert_eq!(segment(&t, &id).await, 200);
    let renewed = session_now(&t, &id).await;
    assert_ne!(renewed["expiresAt"], opened["expiresAt"]);
    let m = t.metrics().await;
    assert_eq!(metric(&m, "streamgate_media_renewals_total"), Some(1.0));

    // Four minutes of segments every 20 s and no heartbeat call: the session never expires.
    for _ in 0..12 {
        t.clock.advance(20_000);
        assert_eq!(segment(&t, &id).await, 200);
    }
    assert_eq!(session_now(&t, &id).await["state"], "active");

    // Without requests it expires after its TTL like any session, and media is refused.
    t.clock.advance(90_000);
    let response = t
        .client
        .get(format!("{}/hls/seg.ts?session={id}", t.base))
        .send()
        .await
        .unwrap();
    let (status, body) = json(response).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("session_gone")),
        "{body}"
    );
    assert_eq!(body["reason"], "expired");
}
