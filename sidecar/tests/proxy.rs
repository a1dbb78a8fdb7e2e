//! The enforcing proxy: streams of cut sessions are closed, requests without an active session
//! never reach the streaming container.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Served, default_policy, json, metric};
use futures::StreamExt;
use reqwest::{Client, Method};
use serde_json::Value;
use streamgate_demo_origin as demo_origin;
use streamgate_sidecar::policy::PolicySet;
use streamgate_sidecar::server::Sidecar;
use streamgate_sidecar::store::{MemoryStore, RedisStore, RedisTarget, SessionStore};
use tokio::sync::oneshot;

async fn sidecar(store: Arc<dyn SessionStore>, policy: &str, upstream: &str) -> (Served, Sidecar) {
    let policies = PolicySet::from_yaml(policy, "test.yaml", "default").unwrap();
    let sidecar = Sidecar::with_store(store, policies).with_upstream(upstream.parse().unwrap());
    let served = common::serve_in_background(sidecar.clone()).await;
    (served, sidecar)
}

async fn open(base: &str, account: &str, stream: &str) -> (u16, Value) {
    common::streaming_at(&Client::new(), base, Method::PUT, account, stream).await
}

/// A viewer pulling the live stream through the proxy.
struct Viewer {
    bytes: tokio::sync::watch::Receiver<u64>,
    ended: oneshot::Receiver<(Instant, bool)>,
}

impl Viewer {
    /// Starts pulling `/live` with `session`; the body must start flowing.
    async fn watch(base: &str, session: &str) -> Self {
        let response = Client::new()
            .get(format!("{base}/live?interval_ms=20"))
            .header("X-StreamGate-Session", session)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let (counter, bytes) = tokio::sync::watch::channel(0u64);
        let (tx, ended) = oneshot::channel();
        tokio::spawn(async move {
            let mut body = response.bytes_stream();
            let mut clean = true;
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(chunk) => {
                        counter.send_modify(|n| *n += chunk.len() as u64);
                    }
                    Err(_) => {
                        clean = false;
                        break;
                    }
                }
            }
            let _ = tx.send((Instant::now(), clean));
        });
        let viewer = Self { bytes, ended };
        viewer.wait_for_bytes().await;
        viewer
    }

    /// Waits until more bytes arrive than now (the origin sends a chunk every 20 ms).
    async fn wait_for_bytes(&self) {
        let mut bytes = self.bytes.clone();
        let before = *bytes.borrow_and_update();
        tokio::time::timeout(Duration::from_secs(5), bytes.wait_for(|n| *n > before))
            .await
            .expect("the stream stopped flowing")
            .expect("the viewer is still reading");
    }

    /// When the stream ended and whether it ended cleanly; panics if it is still running after
    /// `limit`.
    async fn ended_within(self, limit: Duration) -> (Instant, bool) {
        tokio::time::timeout(limit, self.ended)
            .await
            .expect("the stream was not cut in time")
            .unwrap()
    }
}

fn id(session: &Value) -> String {
    session["sessionId"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evicting_the_oldest_viewer_closes_its_stream_and_no_other() {
    let (upstream, _) = common::demo_origin().await;
    let policy = default_policy("  maxStreamsPerAccount: 3\n  onLimitExceeded: EvictOldest");
    let (Served { base, admin }, _sidecar) =
        sidecar(Arc::new(MemoryStore::new()), &policy, &upstream).await;

    let mut viewers = Vec::new();
    let mut sessions = Vec::new();
    for stream in ["tv", "phone", "tablet"] {
        let (status, session) = open(&base, "acct", stream).await;
        assert_eq!(status, 201);
        viewers.push(Viewer::watch(&base, &id(&session)).await);
        sessions.push(session);
    }

    let (status, fourth) = open(&base, "acct", "laptop").await;
    assert_eq!(status, 201);
    let fourth_viewer = Viewer::watch(&base, &id(&fourth)).await;

    let mut rest = viewers.split_off(1);
    let first = viewers.pop().unwrap();
    // Cut on the revocation notice, not by a timer: a generous bound only.
    let (_, clean) = first.ended_within(Duration::from_secs(5)).await;
    assert!(!clean, "a cut stream must not end like a finished one");
    rest.push(fourth_viewer);
    for viewer in &rest {
        viewer.wait_for_bytes().await;
    }

    // The evicted viewer's segment requests are refused from now on.
    let response = Client::new()
        .get(format!(
            "{base}/hls/segment0.ts?session={}",
            id(&sessions[0])
        ))
        .send()
        .await
        .unwrap();
    let (status, body) = json(response).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "session_gone");
    assert_eq!(body["reason"], "evicted");
    // Segments flow for an active viewer, with the session in the query.
    let response = Client::new()
        .get(format!(
            "{base}/hls/segment1.ts?session={}",
            id(&sessions[1])
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.bytes().await.unwrap(),
        demo_origin::media::fixture_segment(1)
    );
    let m = Client::new()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(
            &m,
            r#"streamgate_streams_cut_total{reason="evicted",dry_run="false"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kick_on_one_sidecar_cuts_a_stream_flowing_through_another() {
    let url = std::env::var("STREAMGATE_TEST_REDIS").unwrap_or_else(|_| {
        panic!("STREAMGATE_TEST_REDIS is not set: run the tests with ./scripts/test, which starts Redis")
    });
    let (upstream, _) = common::demo_origin().await;
    let policy = default_policy("  maxStreamsPerAccount: 2");
    let store = |url: &str| -> Arc<dyn SessionStore> {
        Arc::new(RedisStore::new(
            RedisTarget::parse(url).unwrap(),
            Duration::from_secs(2),
        ))
    };
    let (
        Served {
            base: a,
            admin: a_admin,
        },
        _,
    ) = sidecar(store(&url), &policy, &upstream).await;
    let (Served { base: b, .. }, b_sidecar) = sidecar(store(&url), &policy, &upstream).await;
    let account = format!("proxy-kick-{:08x}", rand::random::<u32>());
    let (status, session) = open(&a, &account, "tv").await;
    assert_eq!(status, 201);
    let viewer = Viewer::watch(&b, &id(&session)).await;
    // b hears revocations once its subscription is established: wait for that, not a while.
    let mut subscribed = b_sidecar.engine().subscribed();
    tokio::time::timeout(Duration::from_secs(10), subscribed.wait_for(|up| *up))
        .await
        .expect("b subscribes to revocations")
        .unwrap();

    let kicked = Client::new()
        .delete(format!("{a_admin}/v1/sessions/{}", id(&session)))
        .send()
        .await
        .unwrap();
    assert_eq!(kicked.status(), 204);
    let (_, clean) = viewer.ended_within(Duration::from_secs(5)).await;
    assert!(!clean);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_viewer_that_stops_heartbeating_is_cut_after_the_ttl() {
    let (upstream, _) = common::demo_origin().await;
    let policy = default_policy(
        "  maxStreamsPerAccount: 1\n  sessionTTLSeconds: 2\n  heartbeatIntervalSeconds: 1",
    );
    let (Served { base, .. }, _) = sidecar(Arc::new(MemoryStore::new()), &policy, &upstream).await;
    let (_, session) = open(&base, "acct", "tv").await;
    let opened = Instant::now();
    let viewer = Viewer::watch(&base, &id(&session)).await;
    let (ended, clean) = viewer.ended_within(Duration::from_secs(10)).await;
    assert!(!clean);
    assert!(
        ended.duration_since(opened) >= Duration::from_millis(1900),
        "cut before the TTL ran out"
    );
    let (status, gone) =
        common::streaming_at(&Client::new(), &base, Method::GET, "acct", "tv").await;
    assert_eq!(status, 410);
    assert_eq!(gone["reason"], "expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_keep_a_stream_flowing_past_the_ttl() {
    let (upstream, _) = common::demo_origin().await;
    let policy = default_policy(
        "  maxStreamsPerAccount: 1\n  sessionTTLSeconds: 2\n  heartbeatIntervalSeconds: 1",
    );
    let (Served { base, .. }, _) = sidecar(Arc::new(MemoryStore::new()), &policy, &upstream).await;
    let (_, session) = open(&base, "acct", "tv").await;
    let mut viewer = Viewer::watch(&base, &id(&session)).await;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (status, _) =
            common::streaming_at(&Client::new(), &base, Method::GET, "acct", "tv").await;
        assert_eq!(status, 200);
    }
    assert!(
        viewer.ended.try_recv().is_err(),
        "a renewed session's stream was cut"
    );
    viewer.wait_for_bytes().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dry_run_cuts_nothing_and_counts_what_it_would_cut() {
    let (upstream, _) = common::demo_origin().await;
    let policy =
        default_policy("  maxStreamsPerAccount: 1\n  onLimitExceeded: EvictOldest\n  mode: DryRun");
    let (Served { base, admin }, _) =
        sidecar(Arc::new(MemoryStore::new()), &policy, &upstream).await;
    let (_, first) = open(&base, "acct", "tv").await;
    let mut first_viewer = Viewer::watch(&base, &id(&first)).await;
    let (status, _) = open(&base, "acct", "phone").await;
    assert_eq!(status, 201);

    // An admin kick revokes the session, but in DryRun its stream keeps flowing.
    let kicked = Client::new()
        .delete(format!("{admin}/v1/sessions/{}", id(&first)))
        .send()
        .await
        .unwrap();
    assert_eq!(kicked.status(), 204);
    // Wait until the proxy has handled the kick (it counts what it would have cut), then see
    // the stream still flowing.
    common::eventually("the proxy handled the kick", async || {
        let m = Client::new()
            .get(format!("{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric(
            &m,
            r#"streamgate_streams_cut_total{reason="kicked",dry_run="true"}"#,
        )
        .is_some()
    })
    .await;
    first_viewer.wait_for_bytes().await;
    assert!(
        first_viewer.ended.try_recv().is_err(),
        "DryRun cut a stream"
    );
    // And its next media request is let through too.
    let response = Client::new()
        .get(format!("{base}/hls/index.m3u8"))
        .header("X-StreamGate-Session", id(&first))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let m = Client::new()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&m, r#"streamgate_dry_run_decisions_total{would="evict"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"streamgate_streams_cut_total{reason="kicked",dry_run="true"}"#
        ),
        Some(2.0),
        "the stream in flight and the later request: {m}"
    );
}

/// With the proxy on, every unknown path is media: the admin paths must not become media
/// requests either (a session holder could otherwise probe the upstream with them) and must not
/// act on sessions.
#[tokio::test]
async fn admin_paths_on_the_viewer_port_are_404_even_with_the_proxy_on() {
    let (upstream, stats) = common::demo_origin().await;
    let policy = default_policy("  maxStreamsPerAccount: 2");
    let (Served { base, admin }, _) =
        sidecar(Arc::new(MemoryStore::new()), &policy, &upstream).await;
    let (_, session) = open(&base, "acct", "tv").await;
    let client = Client::new();
    for request in [
        client.get(format!("{base}/v1/accounts/acct/sessions")),
        client.delete(format!("{base}/v1/sessions/{}", id(&session))),
    ] {
        let (status, body) = json(
            request
                .header("X-StreamGate-Session", id(&session))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 404, "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("--admin-listen"),
            "{body}"
        );
    }
    assert_eq!(stats.requests(), 0, "an admin path was proxied");
    let (status, list) = json(
        client
            .get(format!("{admin}/v1/accounts/acct/sessions"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        list["sessions"].as_array().unwrap().len(),
        1,
        "the kick changed nothing"
    );
}

#[tokio::test]
async fn requests_without_an_active_session_never_reach_the_upstream() {
    let (upstream, stats) = common::demo_origin().await;
    let policy = default_policy("  maxStreamsPerAccount: 2");
    let (Served { base, .. }, _) = sidecar(Arc::new(MemoryStore::new()), &policy, &upstream).await;
    let (_, ended) = open(&base, "acct", "tv").await;
    let (status, _) =
        common::streaming_at(&Client::new(), &base, Method::DELETE, "acct", "tv").await;
    assert_eq!(status, 204);

    let client = Client::new();
    let forged = "0123456789abcdef0123456789abcdef01234567";
    let attempts = [
        (client.get(format!("{base}/live")), "invalid_request"),
        (
            client.get(format!("{base}/hls/index.m3u8?session=not-an-id")),
            "not_found",
        ),
        (
            client
                .get(format!("{base}/hls/index.m3u8"))
                .header("X-StreamGate-Session", forged),
            "not_found",
        ),
        (
            client.get(format!("{base}/live?session={forged}")),
            "not_found",
        ),
        (
            client
                .get(format!("{base}/live"))
                .header("X-StreamGate-Session", id(&ended)),
            "not_found",
        ),
        (
            client
                .post(format!("{base}/upload"))
                .header("X-StreamGate-Session", forged)
                .body("x"),
            "not_found",
        ),
    ];
    for (request, code) in attempts {
        let (status, body) = json(request.send().await.unwrap()).await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"], code, "{body}");
    }
    assert_eq!(
        stats.requests(),
        0,
        "a refused request reached the upstream"
    );

    // The session API itself is still served by the sidecar, not proxied.
    let (status, _) = json(client.get(format!("{base}/healthz")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(stats.requests(), 0);
}
