//! Playback tokens through the enforcing proxy: a token opens media for its session only, from
//! its network only, until it expires; refusals happen before the upstream sees anything; one
//! session plays one stream; sharing detection revokes; playlists are rewritten; revocation
//! reaches every sidecar over Redis; keys rotate without a restart.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, header};
use common::{SidecarProcess, default_policy, eventually, json, metric, redis_env};
use futures::StreamExt;
use reqwest::{Client, Method};
use serde_json::Value;
use streamgate_demo_origin as demo_origin;
use streamgate_sidecar::playback::{self, Claims, KeyRing};
use streamgate_sidecar::policy::PolicySet;
use streamgate_sidecar::server::Sidecar;
use streamgate_sidecar::session::SessionId;
use streamgate_sidecar::store::{MemoryStore, RedisStore, RedisTarget, SessionStore};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

async fn sidecar(store: Arc<dyn SessionStore>, policy: &str, upstream: &str) -> (String, Sidecar) {
    let policies = PolicySet::from_yaml(policy, "test.yaml", "default").unwrap();
    let sidecar = Sidecar::with_store(store, policies).with_upstream(upstream.parse().unwrap());
    let served = common::serve_in_background(sidecar.clone()).await;
    (served.base, sidecar)
}

async fn memory_sidecar(policy: &str, upstream: &str) -> (String, Sidecar) {
    sidecar(Arc::new(MemoryStore::new()), policy, upstream).await
}

/// A client whose requests come from `address` (a loopback address: 127.0.0.1 and 127.0.1.1
/// are in different /24 networks).
fn client_from(address: &str) -> Client {
    Client::builder()
        .local_address(address.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

async fn open_with(client: &Client, base: &str, account: &str, stream: &str) -> (u16, Value) {
    common::streaming_at(client, base, Method::PUT, account, stream).await
}

fn token(answer: &Value) -> String {
    answer["playbackToken"]
        .as_str()
        .unwrap_or_else(|| panic!("no playbackToken in {answer}"))
        .to_string()
}

fn session_id(answer: &Value) -> SessionId {
    answer["sessionId"].as_str().unwrap().parse().unwrap()
}

async fn get_with_token(client: &Client, url: &str, token: &str) -> reqwest::Response {
    client
        .get(url)
        .header("X-StreamGate-Token", token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_token_from_the_open_answer_plays_by_header_and_by_query() {
    let (upstream, stats) = common::demo_origin().await;
    let (base, _sidecar) =
        memory_sidecar(&default_policy("  maxStreamsPerAccount: 2"), &upstream).await;
    let client = Client::new();
    let (status, opened) = open_with(&client, &base, "acct", "tv").await;
    assert_eq!(status, 201);
    let token = token(&opened);
    let expires: chrono::DateTime<chrono::Utc> = opened["playbackTokenExpiresAt"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // Two heartbeat intervals (30 s) from now.
    let left = expires - chrono::Utc::now();
    assert!(
        left > chrono::Duration::seconds(50) && left <= chrono::Duration::seconds(60),
        "{left}"
    );

    let by_header = get_with_token(&client, &format!("{base}/hls/segment1.ts"), &token).await;
    assert_eq!(by_header.status(), 200);
    assert_eq!(
        by_header.bytes().await.unwrap(),
        demo_origin::media::fixture_segment(1)
    );
    let by_query = client
        .get(format!("{base}/hls/segment2.ts?sg={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), 200);
    assert_eq!(stats.requests(), 2);

    // A heartbeat re-issues the token.
    let (status, renewed) = common::streaming_at(&client, &base, Method::GET, "acct", "tv").await;
    assert_eq!(status, 200);
    assert!(renewed["playbackToken"].as_str().is_some());
    assert_eq!(renewed["sessionId"], opened["sessionId"]);
}

#[tokio::test]
async fn heartbeat_and_end_accept_the_playback_token_as_bearer_for_its_own_stream_only() {
    let (upstream, _stats) = common::demo_origin().await;
    let (base, _sidecar) =
        memory_sidecar(&default_policy("  maxStreamsPerAccount: 2"), &upstream).await;
    let client = Client::new();
    let (status, opened) = open_with(&client, &base, "acct", "tv").await;
    assert_eq!(status, 201);
    let token = token(&opened);
    // One character of the signature changed.
    let mut forged = token.clone().into_bytes();
    let at = forged.len() - 5;
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let streaming = |method: Method, query: &str, credential: &str| {
        client
            .request(method, format!("{base}/streaming?{query}"))
            .header(header::AUTHORIZATION, format!("Bearer {credential}"))
            .send()
    };

    // No account in the query: it comes from the token.
    let (status, renewed) =
        json(streaming(Method::GET, "streamId=tv", &token).await.unwrap()).await;
    assert_eq!(status, 200, "{renewed}");
    assert_eq!(renewed["sessionId"], opened["sessionId"]);
    assert_eq!(renewed["account"], "acct");

    // Another stream, another account, a forged token: 401, and the session stays.
    for (query, credential) in [
        ("streamId=radio", token.clone()),
        ("account=other&streamId=tv", token.clone()),
        ("streamId=tv", forged),
    ] {
        let (status, body) = json(streaming(Method::GET, query, &credential).await.unwrap()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("unauthenticated")),
            "{query}: {body}"
        );
        let (status, body) =
            json(streaming(Method::DELETE, query, &credential).await.unwrap()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("unauthenticated")),
            "{query}: {body}"
        );
    }

    // The token ends its own session.
    let ended = streaming(Method::DELETE, "streamId=tv", &token)
        .await
        .unwrap();
    assert!(ended.status().is_success(), "{}", ended.status());
    let (status, gone) = common::streaming_at(&client, &base, Method::GET, "acct", "tv").await;
    assert!(matches!(status, 404 | 410), "{status} {gone}");
}

#[tokio::test]
async fn forged_expired_foreign_and_other_network_tokens_never_reach_the_upstream() {
    let (upstream, stats) = common::demo_origin().await;
    let (base, sidecar) =
        memory_sidecar(&default_policy("  maxStreamsPerAccount: 3"), &upstream).await;
    let client = Client::new();
    let (_, opened) = open_with(&client, &base, "acct", "tv").await;
    let good = token(&opened);
    let id = session_id(&opened);
    let keys = sidecar.engine().playback().keys();
    let now = chrono::Utc::now().timestamp();
    let claims = |session: SessionId, expires_at: i64| Claims {
        session,
        account: "acct".into(),
        stream_id: "tv".into(),
        network: None,
        expires_at,
    };

    let forged = playback::mint(&KeyRing::generate(), &claims(id, now + 60));
    let other_key_id = playback::mint(
        &KeyRing::new("other", vec![("other".into(), vec![7; 32])]).unwrap(),
        &claims(id, now + 60),
    );
    let expired = playback::mint(&keys, &claims(id, now - 1));
    let mut tampered = good.clone();
    tampered.insert(good.rfind('.').unwrap() + 1, 'A');
    // Validly signed, but for a session that does not exist, and for one that was ended.
    let unknown_session = playback::mint(&keys, &claims(SessionId::for_account("acct"), now + 60));
    let (_, ended) = open_with(&client, &base, "acct", "phone").await;
    let ended_token = token(&ended);
    let (status, _) = common::streaming_at(&client, &base, Method::DELETE, "acct", "phone").await;
    assert_eq!(status, 204);

    // Viewers authenticated: tokens required, so expiry is enforced. (Without that, an authentic
    // token is worth the session id inside it, expired or not: see below.)
    sidecar.engine().playback().set_require_token(true);
    let url = format!("{base}/hls/segment1.ts");
    for (what, token, codes) in [
        ("forged", forged.as_str(), &["invalid_token"][..]),
        ("unknown key id", other_key_id.as_str(), &["invalid_token"]),
        ("expired", expired.as_str(), &["invalid_token"]),
        ("tampered", tampered.as_str(), &["invalid_token"]),
        ("garbage", "v1.nonsense", &["invalid_token"]),
        ("unknown session", unknown_session.as_str(), &["not_found"]),
        (
            "ended session",
            ended_token.as_str(),
            &["not_found", "session_gone"],
        ),
    ] {
        let (status, body) = json(get_with_token(&client, &url, token).await).await;
        assert_eq!(status, 403, "{what}: {body}");
        assert!(
            codes.contains(&body["error"].as_str().unwrap()),
            "{what}: {body}"
        );
    }
    let (status, body) = json(
        client
            .get(format!("{url}?sg={expired}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("invalid_token")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("expired"),
        "{body}"
    );

    // The good token, from another /24: refused; from its own network: fine.
    let elsewhere = client_from("127.0.1.1");
    let (status, body) = json(get_with_token(&elsewhere, &url, &good).await).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("invalid_token")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("network"),
        "{body}"
    );
    assert_eq!(
        stats.requests(),
        0,
        "no refused request reached the upstream"
    );
    assert_eq!(get_with_token(&client, &url, &good).await.status(), 200);
    assert_eq!(stats.requests(), 1);

    // Tokens not required (viewer authentication disabled): the expired token still carries
    // an authentic session id, which would be accepted by itself.
    sidecar.engine().playback().set_require_token(false);
    assert_eq!(get_with_token(&client, &url, &expired).await.status(), 200);
    let (status, body) = json(get_with_token(&client, &url, &forged).await).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("invalid_token"))
    );
    assert_eq!(stats.requests(), 2);

    let m = sidecar.engine().render_metrics().await;
    for (reason, n) in [
        ("bad_signature", 3.0),
        ("unknown_key", 1.0),
        ("expired", 2.0),
        ("malformed", 1.0),
        ("wrong_network", 1.0),
        ("missing", 0.0),
    ] {
        assert_eq!(
            metric(
                &m,
                &format!(r#"streamgate_playback_token_refusals_total{{reason="{reason}"}}"#)
            ),
            Some(n),
            "{reason}"
        );
    }
}

#[tokio::test]
async fn when_tokens_are_required_a_session_id_opens_nothing() {
    let (upstream, stats) = common::demo_origin().await;
    let (base, sidecar) =
        memory_sidecar(&default_policy("  maxStreamsPerAccount: 3"), &upstream).await;
    let client = Client::new();
    let (_, opened) = open_with(&client, &base, "acct", "tv").await;
    let raw = opened["sessionId"].as_str().unwrap().to_string();
    // Tokens not required (viewer authentication disabled): the prototype's credential works.
    let url = format!("{base}/hls/segment1.ts");
    let response = client
        .get(&url)
        .header("X-StreamGate-Session", &raw)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(stats.requests(), 1);

    sidecar.engine().playback().set_require_token(true);
    for request in [
        client.get(&url).header("X-StreamGate-Session", &raw),
        client.get(format!("{url}?session={raw}")),
        client.get(&url),
    ] {
        let (status, body) = json(request.send().await.unwrap()).await;
        assert_eq!(status, 403, "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("playback token"),
            "{body}"
        );
    }
    assert_eq!(stats.requests(), 1, "refused before the upstream");
    assert_eq!(
        get_with_token(&client, &url, &token(&opened))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn with_viewer_authentication_in_force_a_session_id_opens_nothing() {
    let (upstream, stats) = common::demo_origin().await;
    let key = streamctl::token::TestKey::generate(streamctl::token::KeyAlg::Es256, "k1").unwrap();
    // Optional: the open may still name its account in the query, but media needs the token.
    let file = format!(
        "{}---\napiVersion: streamgate.dev/v1alpha1\nkind: ViewerAuthentication\nmetadata: {{name: viewers}}\nspec:\n  mode: Optional\n  jwtRules:\n  - issuer: https://id.streamgate.test\n    jwks: '{}'\n",
        default_policy("  maxStreamsPerAccount: 3"),
        streamctl::token::jwks(&[&key])
    );
    let (base, sidecar) = memory_sidecar(&file, &upstream).await;
    assert!(!sidecar.engine().playback().requires_token(), "no flag set");
    let client = Client::new();
    let (status, opened) = open_with(&client, &base, "acct", "tv").await;
    assert_eq!(status, 201, "{opened}");
    let raw = opened["sessionId"].as_str().unwrap().to_string();
    let url = format!("{base}/hls/segment1.ts");
    for request in [
        client.get(&url).header("X-StreamGate-Session", &raw),
        client.get(format!("{url}?session={raw}")),
    ] {
        let (status, body) = json(request.send().await.unwrap()).await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"], "invalid_token", "{body}");
    }
    assert_eq!(stats.requests(), 0, "refused before the upstream");
    assert_eq!(
        get_with_token(&client, &url, &token(&opened))
            .await
            .status(),
        200
    );
}

/// A viewer pulling the live stream through the proxy with a token.
struct Viewer {
    bytes: tokio::sync::watch::Receiver<u64>,
    ended: oneshot::Receiver<Instant>,
    reading: tokio::task::JoinHandle<()>,
}

impl Viewer {
    async fn watch(base: &str, token: &str) -> Self {
        let response = get_with_token(
            &Client::new(),
            &format!("{base}/live?interval_ms=20"),
            token,
        )
        .await;
        assert_eq!(response.status(), 200);
        let (counter, bytes) = tokio::sync::watch::channel(0u64);
        let (tx, ended) = oneshot::channel();
        let reading = tokio::spawn(async move {
            let mut body = response.bytes_stream();
            while let Some(Ok(chunk)) = body.next().await {
                counter.send_modify(|n| *n += chunk.len() as u64);
            }
            let _ = tx.send(Instant::now());
        });
        let mut flowing = bytes.clone();
        tokio::time::timeout(Duration::from_secs(5), flowing.wait_for(|n| *n > 0))
            .await
            .expect("the stream flows")
            .unwrap();
        Self {
            bytes,
            ended,
            reading,
        }
    }

    /// The player stops: its connection goes.
    fn stop(self) {
        self.reading.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_session_plays_one_stream_at_a_time() {
    let (upstream, _) = common::demo_origin().await;
    let (base, sidecar) =
        memory_sidecar(&default_policy("  maxStreamsPerAccount: 3"), &upstream).await;
    let client = Client::new();
    let (_, opened) = open_with(&client, &base, "acct", "tv").await;
    let token = token(&opened);
    let first = Viewer::watch(&base, &token).await;

    // A second long-lived stream on the same session (the token shared with a second player).
    let (status, body) =
        json(get_with_token(&client, &format!("{base}/live?interval_ms=20"), &token).await).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("stream_in_use")),
        "{body}"
    );
    // So is a big download; short responses (segments, playlists) are not streams.
    let (status, _) =
        json(get_with_token(&client, &format!("{base}/file?mib=32"), &token).await).await;
    assert_eq!(status, 409);
    let segment = get_with_token(&client, &format!("{base}/hls/segment1.ts"), &token).await;
    assert_eq!(segment.status(), 200);
    // Another session of the account streams alongside.
    let (_, other) = open_with(&client, &base, "acct", "phone").await;
    let second = Viewer::watch(&base, &token_of(&other)).await;
    assert!(*first.bytes.borrow() > 0 && *second.bytes.borrow() > 0);
    assert_eq!(sidecar.proxy().unwrap().streams_in_flight(), 2);

    // The first player stops: the session may stream again.
    first.stop();
    let proxy = sidecar.proxy().unwrap().clone();
    eventually("the stopped stream is unregistered", async || {
        proxy.streams_in_flight() == 1
    })
    .await;
    let _again = Viewer::watch(&base, &token).await;

    let m = sidecar.engine().render_metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"streamgate_media_streams_refused_total{dry_run="false"}"#
        ),
        Some(2.0)
    );
}

fn token_of(answer: &Value) -> String {
    token(answer)
}

#[tokio::test]
async fn a_session_used_from_too_many_networks_is_revoked_as_shared() {
    let (upstream, stats) = common::demo_origin().await;
    let policy = default_policy(
        "  maxStreamsPerAccount: 3\n  sharing: {maxNetworks: 2, windowSeconds: 600, action: Revoke}",
    );
    let (base, sidecar) = memory_sidecar(&policy, &upstream).await;
    // Carrier-grade NAT setting: tokens are not bound, so only sharing detection stands.
    sidecar.engine().playback().set_bind_network(false);
    let home = Client::new();
    let (_, opened) = open_with(&home, &base, "acct", "tv").await;
    let token = token(&opened);
    let url = format!("{base}/hls/segment1.ts");
    assert_eq!(get_with_token(&home, &url, &token).await.status(), 200);
    assert_eq!(
        get_with_token(&client_from("127.0.1.1"), &url, &token)
            .await
            .status(),
        200
    );
    let before = stats.requests();
    let (status, body) = json(get_with_token(&client_from("127.0.2.1"), &url, &token).await).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        (body["error"].as_str(), body["reason"].as_str()),
        (Some("session_gone"), Some("shared"))
    );
    assert_eq!(stats.requests(), before);
    // Revoked for everyone, the owner included; its heartbeat says why.
    assert_eq!(get_with_token(&home, &url, &token).await.status(), 403);
    let (status, body) = common::streaming_at(&home, &base, Method::GET, "acct", "tv").await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (410, Some("shared")),
        "{body}"
    );
    let m = sidecar.engine().render_metrics().await;
    assert_eq!(
        metric(&m, r#"streamgate_sharing_detected_total{action="revoke"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, r#"streamgate_sessions_revoked_total{reason="shared"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn heartbeats_from_too_many_networks_are_sharing_too_and_report_only_revokes_nothing() {
    let (upstream, _) = common::demo_origin().await;
    let policy = |action: &str| {
        default_policy(&format!(
            "  maxStreamsPerAccount: 3\n  sharing: {{maxNetworks: 1, windowSeconds: 600, action: {action}}}"
        ))
    };
    // Report: counted, the session keeps working.
    let (base, sidecar) = memory_sidecar(&policy("Report"), &upstream).await;
    let (status, _) = open_with(&Client::new(), &base, "acct", "tv").await;
    assert_eq!(status, 201);
    let (status, answer) =
        common::streaming_at(&client_from("127.0.3.1"), &base, Method::GET, "acct", "tv").await;
    assert_eq!(status, 200, "{answer}");
    let m = sidecar.engine().render_metrics().await;
    assert_eq!(
        metric(&m, r#"streamgate_sharing_detected_total{action="report"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, r#"streamgate_sharing_detected_total{action="revoke"}"#),
        Some(0.0)
    );

    // Revoke: a heartbeat (which would mint a token for the other network) is refused.
    let (base, _sidecar) = memory_sidecar(&policy("Revoke"), &upstream).await;
    open_with(&Client::new(), &base, "acct", "tv").await;
    let (status, answer) =
        common::streaming_at(&client_from("127.0.3.1"), &base, Method::GET, "acct", "tv").await;
    assert_eq!(
        (status, answer["reason"].as_str()),
        (410, Some("shared")),
        "{answer}"
    );
    assert!(answer.get("playbackToken").is_none());
}

/// An origin with a master playlist (renditions, I-frame playlists) and a media playlist with
/// a key, an init section and byte ranges, next to the demo origin's real H.264 HLS.
async fn fancy_origin() -> String {
    use axum::routing::get;
    let playlist = |body: &'static str| {
        move || async move {
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/vnd.apple.mpegurl"),
                )],
                body,
            )
        }
    };
    let app = axum::Router::new()
        .route(
            "/v/master",
            get(playlist(
                "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-INDEPENDENT-SEGMENTS\n\
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"aud\",NAME=\"English\",LANGUAGE=\"en\",DEFAULT=YES,URI=\"audio/en.m3u8\"\n\
#EXT-X-MEDIA:TYPE=SUBTITLES,GROUP-ID=\"subs\",NAME=\"Deutsch, UT\",LANGUAGE=\"de\",URI=\"subs/de.m3u8?lang=de\"\n\
#EXT-X-STREAM-INF:BANDWIDTH=1280000,RESOLUTION=640x360,CODECS=\"avc1.4d401e,mp4a.40.2\",AUDIO=\"aud\",SUBTITLES=\"subs\"\n\
low/media.m3u8\n\
#EXT-X-STREAM-INF:BANDWIDTH=2560000,RESOLUTION=1280x720,AUDIO=\"aud\"\n\
https://cdn.example.com/high/media.m3u8\n\
#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=86000,URI=\"low/iframe.m3u8\"\n",
            )),
        )
        .route(
            "/v/low/media.m3u8",
            get(playlist(
                "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:4\n#EXT-X-MEDIA-SEQUENCE:0\n\
#EXT-X-MAP:URI=\"init.mp4\",BYTERANGE=\"720@0\"\n\
#EXT-X-KEY:METHOD=AES-128,URI=\"/keys/k1?v=1\",IV=0x00000000000000000000000000000001\n\
#EXTINF:4.000,\n#EXT-X-BYTERANGE:1000@720\nmain.mp4\n\
#EXTINF:4.000,\nseg1.m4s\n#EXT-X-ENDLIST\n",
            )),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn has_token(uri: &str) -> bool {
    let query = uri.split_once('?').map_or("", |(_, q)| q);
    form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k == "sg" && v.starts_with("v1."))
}

#[tokio::test]
async fn playlists_carry_the_token_in_every_uri_and_a_native_player_plays_with_it() {
    let (upstream, _) = common::demo_origin().await;
    let (base, _sidecar) =
        memory_sidecar(&default_policy("  maxStreamsPerAccount: 3"), &upstream).await;
    let client = Client::new();
    let (_, opened) = open_with(&client, &base, "acct", "tv").await;
    let token = token(&opened);

    for path in ["/hls/index.m3u8", "/hls/live.m3u8"] {
        let response = client
            .get(format!("{base}{path}?sg={token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(
            response.headers()[header::CACHE_CONTROL],
            "private, no-store"
        );
        let text = response.text().await.unwrap();
        let parsed = m3u8_rs::parse_media_playlist_res(text.as_bytes())
            .unwrap_or_else(|e| panic!("{path} does not parse: {e:?}\n{text}"));
        assert!(!parsed.segments.is_empty());
        for segment in &parsed.segments {
            assert!(has_token(&segment.uri), "{path}: {}", segment.uri);
        }
        // What a native player does: fetch the segment URI relative to the playlist, no header.
        let first = &parsed.segments[0].uri;
        let segment = client
            .get(format!("{base}/hls/{first}"))
            .send()
            .await
            .unwrap();
        assert_eq!(segment.status(), 200, "{first}");
        assert_eq!(segment.headers()[header::CONTENT_TYPE], "video/mp2t");
    }

    // Master playlist: variants, renditions and I-frame playlists; media playlist: key and map.
    let fancy = fancy_origin().await;
    let (base, _sidecar) =
        memory_sidecar(&default_policy("  maxStreamsPerAccount: 3"), &fancy).await;
    let (_, opened) = open_with(&client, &base, "acct", "tv").await;
    let token = token_of(&opened);
    let text = get_with_token(&client, &format!("{base}/v/master"), &token)
        .await
        .text()
        .await
        .unwrap();
    let master = m3u8_rs::parse_master_playlist_res(text.as_bytes())
        .unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    assert_eq!(master.variants.len(), 3);
    assert!(has_token(&master.variants[0].uri), "{text}");
    assert_eq!(
        master.variants[1].uri, "https://cdn.example.com/high/media.m3u8",
        "another host keeps its URI"
    );
    assert!(
        master.variants[2].is_i_frame && has_token(&master.variants[2].uri),
        "{text}"
    );
    assert_eq!(master.alternatives.len(), 2);
    for alternative in &master.alternatives {
        assert!(has_token(alternative.uri.as_deref().unwrap()), "{text}");
    }
    assert_eq!(master.alternatives[1].name, "Deutsch, UT");
    assert!(
        master.alternatives[1]
            .uri
            .as_deref()
            .unwrap()
            .starts_with("subs/de.m3u8?lang=de&sg=")
    );

    let text = get_with_token(&client, &format!("{base}/v/low/media.m3u8"), &token)
        .await
        .text()
        .await
        .unwrap();
    let media = m3u8_rs::parse_media_playlist_res(text.as_bytes())
        .unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    let first = &media.segments[0];
    assert!(has_token(&first.map.as_ref().unwrap().uri), "{text}");
    assert!(
        has_token(first.key.as_ref().unwrap().uri.as_deref().unwrap()),
        "{text}"
    );
    assert!(
        first
            .key
            .as_ref()
            .unwrap()
            .uri
            .as_deref()
            .unwrap()
            .starts_with("/keys/k1?v=1&sg=")
    );
    assert!(media.segments.iter().all(|s| has_token(&s.uri)), "{text}");
    assert_eq!(
        first.byte_range.as_ref().unwrap().length,
        1000,
        "other tags kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_on_one_sidecar_stops_the_token_on_another_within_a_second() {
    let url = redis_env("STREAMGATE_TEST_REDIS");
    let (upstream, stats) = common::demo_origin().await;
    let policy = default_policy("  maxStreamsPerAccount: 2");
    let store = |url: &str| -> Arc<dyn SessionStore> {
        Arc::new(RedisStore::new(
            RedisTarget::parse(url).unwrap(),
            Duration::from_secs(2),
        ))
    };
    let (a, a_sidecar) = sidecar(store(&url), &policy, &upstream).await;
    let (b, b_sidecar) = sidecar(store(&url), &policy, &upstream).await;
    // One namespace, one key set.
    let keys = KeyRing::new("ns-1", vec![("ns-1".into(), vec![42; 32])]).unwrap();
    a_sidecar.engine().playback().set_keys(keys.clone());
    b_sidecar.engine().playback().set_keys(keys);
    let account = format!("playback-revoke-{:08x}", rand::random::<u32>());
    let (status, opened) = open_with(&Client::new(), &a, &account, "tv").await;
    assert_eq!(status, 201);
    let token = token(&opened);
    let viewer = Viewer::watch(&b, &token).await;
    let mut subscribed = b_sidecar.engine().subscribed();
    tokio::time::timeout(Duration::from_secs(10), subscribed.wait_for(|up| *up))
        .await
        .expect("b subscribes to revocations")
        .unwrap();

    let kicked_at = Instant::now();
    a_sidecar.engine().kick(session_id(&opened)).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(1), viewer.ended)
        .await
        .expect("the stream on the other sidecar was cut within a second")
        .unwrap();
    let cut_after = ended - kicked_at;
    let hits = stats.requests();
    let (status, body) =
        json(get_with_token(&Client::new(), &format!("{b}/hls/segment1.ts"), &token).await).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("kicked")),
        "{body}"
    );
    assert!(
        kicked_at.elapsed() < Duration::from_secs(1),
        "refused within a second"
    );
    assert_eq!(
        stats.requests(),
        hits,
        "the refused request did not reach the upstream"
    );
    eprintln!("stream cut {cut_after:?} after the kick on the other sidecar");
}

/// Two sidecars on one Redis with one namespace key set, as in a streaming Deployment.
async fn two_sidecars_on_redis(policy: &str, upstream: &str) -> [(String, Sidecar); 2] {
    let url = redis_env("STREAMGATE_TEST_REDIS");
    let keys = KeyRing::new("ns-1", vec![("ns-1".into(), vec![42; 32])]).unwrap();
    let mut pair = Vec::new();
    for _ in 0..2 {
        let store: Arc<dyn SessionStore> = Arc::new(RedisStore::new(
            RedisTarget::parse(&url).unwrap(),
            Duration::from_secs(2),
        ));
        let (base, sidecar) = sidecar(store, policy, upstream).await;
        sidecar.engine().playback().set_keys(keys.clone());
        pair.push((base, sidecar));
    }
    pair.try_into().unwrap_or_else(|_| unreachable!())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_session_plays_one_stream_across_sidecars() {
    let (upstream, stats) = common::demo_origin().await;
    let [(a, a_sidecar), (b, _b_sidecar)] =
        two_sidecars_on_redis(&default_policy("  maxStreamsPerAccount: 3"), &upstream).await;
    let account = format!("one-stream-{:08x}", rand::random::<u32>());
    let client = Client::new();
    let (_, opened) = open_with(&client, &a, &account, "tv").await;
    let token = token(&opened);
    let first = Viewer::watch(&a, &token).await;

    // The token handed to a second player whose requests land on the other sidecar: that
    // sidecar has no stream of the session in flight, but the store knows of the first.
    let (status, body) =
        json(get_with_token(&client, &format!("{b}/live?interval_ms=20"), &token).await).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("stream_in_use")),
        "{body}"
    );
    // Short responses are not streams, on any sidecar.
    let segment = get_with_token(&client, &format!("{b}/hls/segment1.ts"), &token).await;
    assert_eq!(segment.status(), 200);
    assert!(*first.bytes.borrow() > 0);

    // The first player stops: its sidecar releases the claim, and the session plays on the
    // other sidecar; then the first sidecar refuses a second stream in turn.
    first.stop();
    let proxy = a_sidecar.proxy().unwrap().clone();
    eventually("the stopped stream is unregistered", async || {
        proxy.streams_in_flight() == 0
    })
    .await;
    let mut moved = None;
    for _ in 0..50 {
        let response = get_with_token(&client, &format!("{b}/live?interval_ms=20"), &token).await;
        if response.status() == 200 {
            moved = Some(response);
            break;
        }
        assert_eq!(
            response.status(),
            409,
            "only refused while the release is on its way"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _moved = moved.expect("the session streams on the other sidecar once the first stopped");
    let before = stats.requests();
    let (status, body) =
        json(get_with_token(&client, &format!("{a}/live?interval_ms=20"), &token).await).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("stream_in_use"))
    );
    assert_eq!(
        stats.requests(),
        before + 1,
        "asked once, its answer dropped"
    );
}

/// A stream whose claim lapsed (its sidecar could not renew it for a whole lease) while another
/// stream of its session took the claim is cut when its sidecar next renews: only one plays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_whose_claim_was_taken_while_it_lapsed_is_cut() {
    use streamgate_sidecar::store::redis_store::account_key;
    let (upstream, _) = common::demo_origin().await;
    let [(a, _a_sidecar), (b, _b_sidecar)] =
        two_sidecars_on_redis(&default_policy("  maxStreamsPerAccount: 3"), &upstream).await;
    let account = format!("lapsed-{:08x}", rand::random::<u32>());
    let (_, opened) = open_with(&Client::new(), &a, &account, "tv").await;
    let token = token(&opened);
    let first = Viewer::watch(&a, &token).await;
    // The claim lapses as if the first sidecar had not reached the store for a whole lease.
    let id = session_id(&opened);
    let client = redis::Client::open(redis_env("STREAMGATE_TEST_REDIS").as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut field = id.random.to_be_bytes().to_vec();
    field.push(b'~');
    let deleted: u32 = redis::cmd("HDEL")
        .arg(account_key(id.tag))
        .arg(field)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        deleted, 1,
        "the session's media use is where the store keeps it"
    );
    // Another player takes the session's stream on the other sidecar meanwhile.
    let second = Viewer::watch(&b, &token).await;
    // The first sidecar renews its claim within a third of a lease, finds it taken, and cuts.
    let ended = tokio::time::timeout(Duration::from_secs(15), first.ended)
        .await
        .expect("the stream whose claim was taken is cut at its next renewal");
    assert!(ended.is_ok());
    let flowing = *second.bytes.borrow();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        *second.bytes.borrow() > flowing,
        "the stream holding the claim plays on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sharing_is_counted_across_sidecars() {
    let (upstream, stats) = common::demo_origin().await;
    let policy = default_policy(
        "  maxStreamsPerAccount: 3\n  sharing: {maxNetworks: 2, windowSeconds: 600, action: Revoke}",
    );
    let [(a, a_sidecar), (b, b_sidecar)] = two_sidecars_on_redis(&policy, &upstream).await;
    // Carrier-grade NAT setting: tokens are not bound, so only sharing detection stands.
    for sidecar in [&a_sidecar, &b_sidecar] {
        sidecar.engine().playback().set_bind_network(false);
    }
    let account = format!("sharing-{:08x}", rand::random::<u32>());
    let home = Client::new();
    let (_, opened) = open_with(&home, &a, &account, "tv").await;
    let token = token(&opened);
    let segment = |base: &str| format!("{base}/hls/segment1.ts");
    assert_eq!(
        get_with_token(&home, &segment(&a), &token).await.status(),
        200
    );
    // A friend's network, through the other sidecar.
    let friend = client_from("127.0.1.1");
    assert_eq!(
        get_with_token(&friend, &segment(&b), &token).await.status(),
        200
    );
    // A third network, back through the first sidecar, which has seen only two networks of
    // the session: the store has seen three.
    let before = stats.requests();
    let (status, body) =
        json(get_with_token(&client_from("127.0.2.1"), &segment(&a), &token).await).await;
    assert_eq!(
        (status, body["error"].as_str(), body["reason"].as_str()),
        (403, Some("session_gone"), Some("shared")),
        "{body}"
    );
    assert_eq!(stats.requests(), before);
    // Revoked for every sidecar and every viewer.
    assert_eq!(
        get_with_token(&friend, &segment(&b), &token).await.status(),
        403
    );
    assert_eq!(
        get_with_token(&home, &segment(&a), &token).await.status(),
        403
    );
    let m = a_sidecar.engine().render_metrics().await;
    assert_eq!(
        metric(&m, r#"streamgate_sharing_detected_total{action="revoke"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn keys_rotate_without_a_restart() {
    let (upstream, _) = common::demo_origin().await;
    let (base, sidecar) =
        memory_sidecar(&default_policy("  maxStreamsPerAccount: 3"), &upstream).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let write = |signing: &str, keys: &[(&str, u8)]| {
        let keys: Vec<Value> = keys
            .iter()
            .map(|(id, byte)| {
                use base64::Engine as _;
                serde_json::json!({"id": id, "secret": base64::engine::general_purpose::STANDARD.encode([*byte; 32])})
            })
            .collect();
        // Written beside and renamed over, as the kubelet swaps a mounted Secret.
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::json!({"signing": signing, "keys": keys}).to_string(),
        )
        .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    write("old", &[("old", 1)]);
    let playback = sidecar.engine().playback().clone();
    playback.set_keys(KeyRing::load(&path).unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(playback::watch_key_file(
        playback.clone(),
        path.clone(),
        Duration::from_millis(50),
        stop.clone(),
    ));
    let client = Client::new();
    let url = format!("{base}/hls/segment1.ts");
    let (_, opened) = open_with(&client, &base, "acct", "tv").await;
    let old_token = token(&opened);
    assert!(old_token.starts_with("v1.old."));

    // Rotation: both keys verify, the new one signs.
    write("new", &[("old", 1), ("new", 2)]);
    let heartbeat = async || {
        common::streaming_at(&client, &base, Method::GET, "acct", "tv")
            .await
            .1
    };
    eventually("the new key signs", async || {
        token(&heartbeat().await).starts_with("v1.new.")
    })
    .await;
    let new_token = token(&heartbeat().await);
    assert_eq!(
        get_with_token(&client, &url, &old_token).await.status(),
        200
    );
    assert_eq!(
        get_with_token(&client, &url, &new_token).await.status(),
        200
    );

    // The old key removed: its tokens stop working, the new ones keep working.
    write("new", &[("new", 2)]);
    eventually("the old key is gone", async || {
        get_with_token(&client, &url, &old_token).await.status() == 403
    })
    .await;
    let (status, body) = json(get_with_token(&client, &url, &old_token).await).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("invalid_token"))
    );
    assert!(body["message"].as_str().unwrap().contains("key"), "{body}");
    assert_eq!(
        get_with_token(&client, &url, &new_token).await.status(),
        200
    );
    stop.cancel();
}

#[tokio::test]
async fn a_standalone_sidecar_generates_a_key_and_says_so() {
    let sidecar = SidecarProcess::start_logging(&[], "warn,streamgate_sidecar::server=info").await;
    sidecar.wait_ready().await;
    let (status, opened) = open_with(&Client::new(), &sidecar.base, "acct", "tv").await;
    assert_eq!(status, 201);
    assert!(token(&opened).starts_with("v1.local."));
    assert!(
        sidecar
            .log_text()
            .contains("generated a random playback key"),
        "{}",
        sidecar.log_text()
    );
}

#[test]
fn the_openapi_document_describes_the_token_fields() {
    let doc = serde_json::to_value(streamgate_sidecar::api::openapi()).unwrap();
    let schema = &doc["components"]["schemas"]["PlaybackSession"];
    let text = schema.to_string();
    for field in ["playbackToken", "playbackTokenExpiresAt"] {
        assert!(
            schema["required"]
                .as_array()
                .is_some_and(|r| r.iter().any(|f| f == field))
                || text.contains(&format!("\"{field}\"")),
            "{field} missing from {schema}"
        );
    }
    for method in ["put", "get"] {
        let content = doc["paths"]["/streaming"][method]["responses"]["200"]["content"]
            ["application/json"]["schema"]["$ref"]
            .as_str()
            .unwrap_or_default();
        assert!(content.ends_with("/PlaybackSession"), "{method}: {content}");
    }
}

#[test]
fn rewriting_a_real_playlist_changes_nothing_but_the_uris() {
    let token = "v1.k.payload.tag";
    for playlist in [
        demo_origin::media::vod_playlist(),
        demo_origin::media::live_playlist(Duration::from_secs(3600)),
    ] {
        let rewritten = streamgate_sidecar::hls::rewrite(&playlist, token, Some("edge:8080"));
        assert_ne!(rewritten, playlist);
        // Taking the parameter out again gives back the origin's bytes.
        assert_eq!(rewritten.replace(&format!("?sg={token}"), ""), playlist);
    }
}

/// The fresh token a media response hands back, and its expiry header.
fn handed_back(response: &reqwest::Response) -> (String, chrono::DateTime<chrono::Utc>) {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .unwrap_or_else(|| panic!("no {name} on {:?}", response.headers()))
            .to_str()
            .unwrap()
            .to_string()
    };
    let expires = header("x-streamgate-token-expires-at").parse().unwrap();
    (header("x-streamgate-token"), expires)
}

/// The expiry (seconds) of the token in the query of `uri`.
fn expiry_in(sidecar: &Sidecar, uri: &str) -> i64 {
    let query = uri.split_once('?').map_or("", |(_, q)| q);
    let token = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "sg")
        .unwrap_or_else(|| panic!("no token in {uri}"))
        .1
        .into_owned();
    // Bound to the loopback network the test's requests come from.
    sidecar
        .engine()
        .playback()
        .verify(
            &token,
            chrono::Utc::now().timestamp(),
            Some("127.0.0.1".parse().unwrap()),
        )
        .map(|claims| claims.expires_at)
        .unwrap_or_else(|e| panic!("{uri}: {e}"))
}

/// `actual` is `expected` seconds from `issued` (a second either way for the clock's tick).
fn lasts(actual: i64, issued: i64, expected: i64, what: &str) {
    let lifetime = actual - issued;
    assert!(
        (expected - 1..=expected + 1).contains(&lifetime),
        "{what}: lives {lifetime} s, expected {expected} s"
    );
}

#[tokio::test]
async fn every_media_response_to_a_token_hands_back_a_fresh_one() {
    let (upstream, _) = common::demo_origin().await;
    let (base, sidecar) = memory_sidecar(
        &default_policy("  maxStreamsPerAccount: 3\n  heartbeatIntervalSeconds: 10"),
        &upstream,
    )
    .await;
    sidecar.engine().playback().set_require_token(true);
    let client = Client::new();
    let (_, opened) = open_with(&client, &base, "acct", "tv").await;
    let first = token(&opened);
    let id = session_id(&opened);

    for path in [
        "/hls/segment1.ts",
        "/hls/index.m3u8",
        "/live?interval_ms=20",
    ] {
        let issued = chrono::Utc::now().timestamp();
        let response = get_with_token(&client, &format!("{base}{path}"), &first).await;
        assert_eq!(response.status(), 200, "{path}");
        let (fresh, expires) = handed_back(&response);
        let cache_control = response.headers()[header::CACHE_CONTROL].to_str().unwrap();
        assert!(
            cache_control.starts_with("private"),
            "{path}: {cache_control}"
        );
        // The usual lifetime, two heartbeat intervals; bound to the same session, stream and
        // network as the token it renews.
        let claims = sidecar
            .engine()
            .playback()
            .verify(&fresh, issued, Some("127.0.0.1".parse().unwrap()))
            .unwrap();
        assert_eq!(
            (
                claims.session,
                claims.account.as_str(),
                claims.stream_id.as_str()
            ),
            (id, "acct", "tv")
        );
        assert_eq!(claims.network.unwrap().to_string(), "127.0.0.0/24");
        assert_eq!(claims.expires_at, expires.timestamp(), "{path}");
        lasts(claims.expires_at, issued, 20, path);
        // It works, and is refused from another network like any token.
        let again = get_with_token(&client, &format!("{base}/hls/segment2.ts"), &fresh).await;
        assert_eq!(again.status(), 200);
        let (status, _) = json(
            get_with_token(
                &client_from("127.0.1.1"),
                &format!("{base}/hls/segment2.ts"),
                &fresh,
            )
            .await,
        )
        .await;
        assert_eq!(status, 403);
    }

    // The session id (accepted when tokens are not required) gets no token back, nor does a
    // refusal; an upstream cannot hand out tokens of its own.
    sidecar.engine().playback().set_require_token(false);
    let by_id = client
        .get(format!("{base}/hls/segment1.ts"))
        .header(
            "X-StreamGate-Session",
            opened["sessionId"].as_str().unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(by_id.status(), 200);
    assert!(by_id.headers().get("x-streamgate-token").is_none());
    let refused = get_with_token(&client, &format!("{base}/hls/segment1.ts"), "v1.x.y.z").await;
    assert_eq!(refused.status(), 403);
    assert!(refused.headers().get("x-streamgate-token").is_none());
}

#[tokio::test]
async fn playlist_tokens_live_for_what_the_player_will_not_fetch_again() {
    let (upstream, _) = common::demo_origin().await;
    let policy = default_policy("  maxStreamsPerAccount: 3\n  heartbeatIntervalSeconds: 10");
    let (base, sidecar) = memory_sidecar(&policy, &upstream).await;
    sidecar.engine().playback().set_require_token(true);
    sidecar
        .engine()
        .playback()
        .set_playlist_token_max_lifetime_seconds(3600);
    let client = Client::new();
    let (_, opened) = open_with(&client, &base, "acct", "tv").await;
    let first = token(&opened);

    let playlist = async |base: &str, path: &str| {
        let response = get_with_token(&client, &format!("{base}{path}"), &first).await;
        assert_eq!(response.status(), 200, "{path}");
        response.text().await.unwrap()
    };
    // The demo VOD: 120 segments of 2 s. Its segment tokens live the usual 20 s plus twice
    // its 240 s.
    let issued = chrono::Utc::now().timestamp();
    let vod = playlist(&base, "/hls/index.m3u8").await;
    let vod = m3u8_rs::parse_media_playlist_res(vod.as_bytes()).unwrap();
    assert_eq!(vod.segments.len(), 120);
    lasts(
        expiry_in(&sidecar, &vod.segments[119].uri),
        issued,
        20 + 480,
        "VOD",
    );
    // Live: re-fetched every target duration, so the usual lifetime.
    let live = playlist(&base, "/hls/live.m3u8").await;
    let live = m3u8_rs::parse_media_playlist_res(live.as_bytes()).unwrap();
    lasts(
        expiry_in(&sidecar, &live.segments[0].uri),
        issued,
        20,
        "live",
    );

    // A master playlist: its variants may be fetched at any later time: the cap.
    let fancy = fancy_origin().await;
    let (fancy_base, fancy_sidecar) = memory_sidecar(&policy, &fancy).await;
    fancy_sidecar
        .engine()
        .playback()
        .set_playlist_token_max_lifetime_seconds(3600);
    let (_, opened) = open_with(&client, &fancy_base, "acct", "tv").await;
    let first = token(&opened);
    let issued = chrono::Utc::now().timestamp();
    let text = get_with_token(&client, &format!("{fancy_base}/v/master"), &first)
        .await
        .text()
        .await
        .unwrap();
    let master = m3u8_rs::parse_master_playlist_res(text.as_bytes()).unwrap();
    lasts(
        expiry_in(&fancy_sidecar, &master.variants[0].uri),
        issued,
        3600,
        "master",
    );
    lasts(
        expiry_in(
            &fancy_sidecar,
            master.alternatives[0].uri.as_deref().unwrap(),
        ),
        issued,
        3600,
        "rendition",
    );
    // The ended media playlist of 8 s: 20 + 16 s.
    let text = get_with_token(&client, &format!("{fancy_base}/v/low/media.m3u8"), &first)
        .await
        .text()
        .await
        .unwrap();
    let media = m3u8_rs::parse_media_playlist_res(text.as_bytes()).unwrap();
    lasts(
        expiry_in(&fancy_sidecar, &media.segments[1].uri),
        issued,
        36,
        "ended media",
    );
}

#[tokio::test]
async fn a_long_lived_playlist_token_dies_with_its_session_and_works_from_its_network_only() {
    let (upstream, stats) = common::demo_origin().await;
    let t = common::TestSidecar::start_with(
        &default_policy(
            "  maxStreamsPerAccount: 3\n  heartbeatIntervalSeconds: 10\n  sessionTTLSeconds: 30",
        ),
        Some(&upstream),
    )
    .await;
    t.sidecar.engine().playback().set_require_token(true);
    let client = Client::new();
    // A VOD's segment URI, as a native player holds it for the whole film.
    let segment_uri = async |stream: &str| {
        let (status, opened) = t.open("acct", stream).await;
        assert_eq!(status, 201, "{opened}");
        let text = get_with_token(
            &client,
            &format!("{}/hls/index.m3u8", t.base),
            &token(&opened),
        )
        .await
        .text()
        .await
        .unwrap();
        let vod = m3u8_rs::parse_media_playlist_res(text.as_bytes()).unwrap();
        let uri = format!("{}/hls/{}", t.base, vod.segments[100].uri);
        // Long-lived: far past the usual 20 s.
        assert!(expiry_in(&t.sidecar, &uri) > chrono::Utc::now().timestamp() + 400);
        (session_id(&opened), uri)
    };
    let get = async |client: &Client, uri: &str| json(client.get(uri).send().await.unwrap()).await;

    let (_, tv) = segment_uri("tv").await;
    let (_, phone) = segment_uri("phone").await;
    let (kicked_id, tablet) = segment_uri("tablet").await;
    for uri in [&tv, &phone, &tablet] {
        assert_eq!(client.get(uri).send().await.unwrap().status(), 200);
    }
    let served = stats.requests();

    // From another network: refused.
    let (status, body) = get(&client_from("127.0.1.1"), &tv).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("invalid_token")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("network"),
        "{body}"
    );

    // Ended by the viewer, and kicked by an operator: refused at once.
    let (status, _) = t.end("acct", "phone").await;
    assert_eq!(status, 204);
    let (status, body) = get(&client, &phone).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        ["session_gone", "not_found"].contains(&body["error"].as_str().unwrap()),
        "{body}"
    );
    t.sidecar.engine().kick(kicked_id).await.unwrap();
    let (status, body) = get(&client, &tablet).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("kicked")),
        "{body}"
    );

    // Expired: nothing renewed the session for longer than its TTL (the store's clock).
    t.clock.advance(31_000);
    let (status, body) = get(&client, &tv).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["reason"].as_str() == Some("expired") || body["error"] == "not_found",
        "{body}"
    );
    assert_eq!(
        stats.requests(),
        served,
        "no refused request reached the upstream"
    );
}

/// A memory store with its troubles switched on by the test: other sidecars' revocation notices
/// never arrive (it says whether its subscription is up through `subscribed`, as the test
/// sets it), and media look-ups fail as unreachable while `unreachable` is set.
struct ImpairedStore {
    inner: MemoryStore,
    silent: tokio::sync::broadcast::Sender<streamgate_sidecar::session::Revocation>,
    subscribed: tokio::sync::watch::Sender<bool>,
    unreachable: std::sync::atomic::AtomicBool,
}

impl ImpairedStore {
    fn over(inner: MemoryStore) -> Arc<Self> {
        Arc::new(Self {
            inner,
            silent: tokio::sync::broadcast::channel(16).0,
            subscribed: tokio::sync::watch::channel(true).0,
            unreachable: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

#[async_trait::async_trait]
impl SessionStore for ImpairedStore {
    async fn open(
        &self,
        request: &streamgate_sidecar::store::OpenRequest<'_>,
    ) -> Result<streamgate_sidecar::store::OpenOutcome, streamgate_sidecar::store::StoreError> {
        self.inner.open(request).await
    }
    async fn heartbeat(
        &self,
        account: &str,
        stream_id: &str,
        ttl_ms: i64,
    ) -> Result<streamgate_sidecar::store::HeartbeatOutcome, streamgate_sidecar::store::StoreError>
    {
        self.inner.heartbeat(account, stream_id, ttl_ms).await
    }
    async fn end(
        &self,
        account: &str,
        stream_id: &str,
    ) -> Result<
        Option<streamgate_sidecar::session::SessionRecord>,
        streamgate_sidecar::store::StoreError,
    > {
        self.inner.end(account, stream_id).await
    }
    async fn list(
        &self,
        account: &str,
    ) -> Result<
        Vec<streamgate_sidecar::session::SessionRecord>,
        streamgate_sidecar::store::StoreError,
    > {
        self.inner.list(account).await
    }
    async fn get(
        &self,
        id: SessionId,
    ) -> Result<
        Option<streamgate_sidecar::session::SessionRecord>,
        streamgate_sidecar::store::StoreError,
    > {
        self.inner.get(id).await
    }
    async fn revoke(
        &self,
        id: SessionId,
        reason: streamgate_sidecar::session::EndReason,
    ) -> Result<streamgate_sidecar::store::KickOutcome, streamgate_sidecar::store::StoreError> {
        self.inner.revoke(id, reason).await
    }
    async fn touch(
        &self,
        id: SessionId,
        ttl_ms: i64,
        renew_after_ms: i64,
    ) -> Result<Option<streamgate_sidecar::store::Touched>, streamgate_sidecar::store::StoreError>
    {
        if self.unreachable.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(streamgate_sidecar::store::StoreError::Unavailable(
                "connection refused".into(),
            ));
        }
        self.inner.touch(id, ttl_ms, renew_after_ms).await
    }
    async fn note_network(
        &self,
        id: SessionId,
        network: streamgate_sidecar::store::media::NetworkKey,
        window_ms: i64,
        keep: u32,
    ) -> Result<Option<u32>, streamgate_sidecar::store::StoreError> {
        self.inner.note_network(id, network, window_ms, keep).await
    }
    async fn claim_stream(
        &self,
        id: SessionId,
        holder: streamgate_sidecar::store::media::StreamHolder,
        max: u32,
        lease_ms: i64,
    ) -> Result<streamgate_sidecar::store::media::StreamClaim, streamgate_sidecar::store::StoreError>
    {
        self.inner.claim_stream(id, holder, max, lease_ms).await
    }
    async fn release_stream(
        &self,
        id: SessionId,
        holder: streamgate_sidecar::store::media::StreamHolder,
    ) -> Result<(), streamgate_sidecar::store::StoreError> {
        self.inner.release_stream(id, holder).await
    }
    async fn adopt(
        &self,
        session: &streamgate_sidecar::session::SessionRecord,
    ) -> Result<bool, streamgate_sidecar::store::StoreError> {
        self.inner.adopt(session).await
    }
    async fn ping(&self) -> Result<(), streamgate_sidecar::store::StoreError> {
        self.inner.ping().await
    }
    async fn active_sessions(&self) -> Result<Option<u64>, streamgate_sidecar::store::StoreError> {
        self.inner.active_sessions().await
    }
    async fn list_all(
        &self,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<streamgate_sidecar::store::SessionPage, streamgate_sidecar::store::StoreError> {
        self.inner.list_all(after, limit).await
    }
    fn revocations(
        &self,
    ) -> tokio::sync::broadcast::Receiver<streamgate_sidecar::session::Revocation> {
        self.silent.subscribe()
    }
    fn background(
        &self,
        shutdown: CancellationToken,
    ) -> Option<futures::future::BoxFuture<'static, ()>> {
        self.inner.background(shutdown)
    }
    fn subscribed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.subscribed.subscribe()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_revocation_subscription_down_a_stream_cut_elsewhere_ends_within_a_second() {
    let (upstream, stats) = common::demo_origin().await;
    // The store other sidecars write to; this sidecar reaches it, but hears none of its
    // revocation notices.
    let shared = MemoryStore::new();
    let deaf = ImpairedStore::over(shared.clone());
    let (base, sidecar) = sidecar(
        deaf.clone(),
        &default_policy("  maxStreamsPerAccount: 3\n  heartbeatIntervalSeconds: 30"),
        &upstream,
    )
    .await;
    let client = Client::new();
    let (_, opened) = open_with(&client, &base, "acct", "tv").await;
    let token = token(&opened);
    // A stream in flight while the subscription is up: it waits for its session's expiry,
    // 90 s away, relying on notices.
    let viewer = Viewer::watch(&base, &token).await;

    // The subscription goes down; then another sidecar kicks the session in the store.
    deaf.subscribed.send_replace(false);
    assert!(!*sidecar.engine().subscribed().borrow());
    let kicked_at = Instant::now();
    shared.kick(session_id(&opened)).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(3), viewer.ended)
        .await
        .expect("the stream is cut by the once-a-second store check")
        .unwrap();
    let cut_after = ended - kicked_at;
    eprintln!("with the subscription down, the stream was cut {cut_after:?} after the kick");
    assert!(
        cut_after < Duration::from_millis(1500),
        "cut {cut_after:?} after the kick: the store check runs every second"
    );
    // The next request asks the store too: refused at once, before the upstream.
    let hits = stats.requests();
    let (status, body) =
        json(get_with_token(&client, &format!("{base}/hls/segment1.ts"), &token).await).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("kicked")),
        "{body}"
    );
    assert_eq!(stats.requests(), hits);

    // A stream that starts while the subscription is down is watched every second from the
    // start.
    let (_, phone) = open_with(&client, &base, "acct", "phone").await;
    let viewer = Viewer::watch(&base, &token_of(&phone)).await;
    let kicked_at = Instant::now();
    shared.kick(session_id(&phone)).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(3), viewer.ended)
        .await
        .expect("the stream is cut by the once-a-second store check")
        .unwrap();
    eprintln!(
        "a stream started while down was cut {:?} after the kick",
        ended - kicked_at
    );
    assert!(ended - kicked_at < Duration::from_millis(1500));
}

#[tokio::test]
async fn during_a_store_outage_a_playlist_token_passes_only_for_a_session_found_active_lately() {
    let (upstream, stats) = common::demo_origin().await;
    let store = ImpairedStore::over(MemoryStore::new());
    // failurePolicy Open (the default): media passes unverified while the store is down.
    // Heartbeat every second: a usual token lives 2 s.
    let (base, sidecar) = sidecar(
        store.clone(),
        &default_policy(
            "  maxStreamsPerAccount: 5\n  heartbeatIntervalSeconds: 1\n  sessionTTLSeconds: 60",
        ),
        &upstream,
    )
    .await;
    sidecar.engine().playback().set_require_token(true);
    let client = Client::new();
    // A VOD segment URI with the playlist's long-lived token, and the open answer's token.
    let playing = async |stream: &str| {
        let (status, opened) = open_with(&client, &base, "acct", stream).await;
        assert_eq!(status, 201, "{opened}");
        let text = get_with_token(&client, &format!("{base}/hls/index.m3u8"), &token(&opened))
            .await
            .text()
            .await
            .unwrap();
        let vod = m3u8_rs::parse_media_playlist_res(text.as_bytes()).unwrap();
        let uri = format!("{base}/hls/{}", vod.segments[50].uri);
        assert!(expiry_in(&sidecar, &uri) > chrono::Utc::now().timestamp() + 100);
        (session_id(&opened), uri, token(&opened))
    };
    let status_of = async |uri: &str| client.get(uri).send().await.unwrap().status().as_u16();
    let (_, tv, _) = playing("tv").await;
    let (kicked, kicked_uri, _) = playing("kicked").await;
    let (_, idle, _) = playing("idle").await;
    sidecar.engine().kick(kicked).await.unwrap();
    assert_eq!(status_of(&kicked_uri).await, 403);

    // The idle session's player stops fetching for longer than a usual token lives, while the
    // TV keeps playing.
    let quiet_from = Instant::now();
    while quiet_from.elapsed() < Duration::from_millis(2500) {
        assert_eq!(status_of(&tv).await, 200);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let served = stats.requests();

    // The store goes away.
    store
        .unreachable
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // The TV plays on, through the outage, on its playlist's token.
    for _ in 0..3 {
        assert_eq!(status_of(&tv).await, 200);
    }
    // The kicked session's playlist URL does not come back to life, nor does a session not
    // seen playing lately: 503, as if failurePolicy were Closed.
    for uri in [&kicked_uri, &idle] {
        let (status, body) = json(client.get(uri.as_str()).send().await.unwrap()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("store_unavailable")),
            "{body}"
        );
    }
    assert_eq!(stats.requests(), served + 3);

    // The store is back: the idle session plays again, the kicked one stays refused.
    store
        .unreachable
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(status_of(&idle).await, 200);
    let (status, body) = json(client.get(&kicked_uri).send().await.unwrap()).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("kicked")),
        "{body}"
    );
}

#[tokio::test]
async fn a_variant_switched_to_after_the_usual_lifetime_plays_on_the_master_playlists_token() {
    let fancy = fancy_origin().await;
    // Heartbeat every second: the open answer's token lives 2 s.
    let (base, sidecar) = memory_sidecar(
        &default_policy(
            "  maxStreamsPerAccount: 3\n  heartbeatIntervalSeconds: 1\n  sessionTTLSeconds: 60",
        ),
        &fancy,
    )
    .await;
    sidecar.engine().playback().set_require_token(true);
    let client = Client::new();
    let (_, opened) = open_with(&client, &base, "acct", "tv").await;
    let first = token(&opened);
    let master_url = format!("{base}/v/master?sg={first}");
    let text = client
        .get(&master_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let master = m3u8_rs::parse_master_playlist_res(text.as_bytes()).unwrap();
    let (variant, audio) = (
        master.variants[0].uri.clone(),
        master.alternatives[0].uri.clone().unwrap(),
    );

    // The open answer's token expires; the player has not switched yet.
    eventually(
        "the open answer's token is refused as expired",
        async || {
            let response = client.get(&master_url).send().await.unwrap();
            response.status() == 403 && response.text().await.unwrap().contains("expired")
        },
    )
    .await;
    // Now it switches quality and language, with the URIs the master playlist gave it.
    for uri in [&variant, &audio] {
        let response = client.get(format!("{base}/v/{uri}")).send().await.unwrap();
        // The audio rendition is not on this origin (404 from it): passed through, not refused.
        let status = response.status().as_u16();
        assert!(status == 200 || status == 404, "{uri}: {status}");
        if status == 200 {
            let text = response.text().await.unwrap();
            let media = m3u8_rs::parse_media_playlist_res(text.as_bytes()).unwrap();
            assert!(media.segments.iter().all(|s| has_token(&s.uri)), "{text}");
        }
    }
    assert!(
        client
            .get(format!("{base}/v/{variant}"))
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
}
