//! Attacks on the sidecar, each performed for real: they must fail safely.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::{
    RecordingUpstream, Served, SidecarProcess, TestSidecar, default_policy, json, metric,
};
use reqwest::{Client, Method};
use streamgate_sidecar::clock::ManualClock;
use streamgate_sidecar::engine::fingerprint;
use streamgate_sidecar::policy::PolicySet;
use streamgate_sidecar::server::Sidecar;
use streamgate_sidecar::store::MemoryStore;

/// Sends `raw` (a whole HTTP/1.1 request) on a fresh connection; returns the status line and
/// the rest of the answer. Used where a client library would normalise what the attack needs.
fn raw_request(base: &str, raw: &str) -> (u16, String) {
    let address = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(raw.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    (status, answer)
}

#[tokio::test]
async fn invented_methods_cannot_create_metric_series() {
    let t = TestSidecar::start(&default_policy("  maxStreamsPerAccount: 3")).await;
    let series = |m: &str| {
        m.lines()
            .filter(|l| l.starts_with("streamgate_http_request_duration_seconds_count"))
            .count()
    };
    let before = series(&t.metrics().await);
    for i in 0..2_000 {
        let method = Method::from_bytes(format!("X{i:05}").as_bytes()).unwrap();
        let path = if i % 2 == 0 {
            "/streaming?account=a&streamId=s"
        } else {
            "/nope"
        };
        let _ = t.request(method, path).await;
    }
    let m = t.metrics().await;
    assert!(!m.contains("X0"), "an invented method became a label value");
    assert!(
        m.contains(r#"method="OTHER""#),
        "invented methods are counted as OTHER: {m}"
    );
    // Two routes met by invented methods, each with its one status: a handful of series.
    assert!(
        series(&m) <= before + 4,
        "{} series after the flood, {before} before",
        series(&m)
    );
}

#[tokio::test]
async fn head_on_streaming_is_405_and_renews_nothing() {
    let t = TestSidecar::start(&default_policy("  maxStreamsPerAccount: 3")).await;
    let (status, session) = t.open("acct", "tv").await;
    assert_eq!(status, 201);
    t.clock.advance(30_000);
    let response = t
        .request(Method::HEAD, "/streaming?account=acct&streamId=tv")
        .await;
    assert_eq!(response.status(), 405);
    let (_, now) = json(
        t.admin_request(
            Method::GET,
            &format!("/v1/sessions/{}", session["sessionId"].as_str().unwrap()),
        )
        .await,
    )
    .await;
    assert_eq!(
        now["expiresAt"], session["expiresAt"],
        "HEAD renewed the session"
    );
    assert_eq!(
        metric(&t.metrics().await, "streamgate_sessions_renewed_total"),
        Some(0.0)
    );
}

#[tokio::test]
async fn the_session_cap_refuses_new_sessions_with_503_and_counts() {
    let policies = PolicySet::from_yaml(
        &default_policy("  maxStreamsPerAccount: 3"),
        "t.yaml",
        "default",
    )
    .unwrap();
    let store = MemoryStore::with_limits(Arc::new(ManualClock::new(1_800_000_000_000)), 3);
    let sidecar = Sidecar::with_store(Arc::new(store.clone()), policies);
    let Served { base, admin } = common::serve_in_background(sidecar).await;
    let client = Client::new();
    for account in ["a", "b", "c"] {
        let (status, _) = common::streaming_at(&client, &base, Method::PUT, account, "s").await;
        assert_eq!(status, 201);
    }
    for account in ["d", "e"] {
        let (status, body) = common::streaming_at(&client, &base, Method::PUT, account, "s").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"], "capacity_exceeded");
    }
    // Existing sessions keep working.
    let (status, _) = common::streaming_at(&client, &base, Method::GET, "a", "s").await;
    assert_eq!(status, 200);
    assert_eq!(store.held(), 3);
    let m = client
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&m, "streamgate_sessions_capacity_refused_total"),
        Some(2.0)
    );
}

async fn proxy_sidecar(upstream: &str) -> TestSidecar {
    TestSidecar::start_with(&default_policy("  maxStreamsPerAccount: 3"), Some(upstream)).await
}

#[tokio::test]
async fn dot_segments_never_climb_out_of_the_upstream_base_path() {
    let upstream = RecordingUpstream::start("/media").await;
    let t = proxy_sidecar(&upstream.url).await;
    let (_, session) = t.open("acct", "tv").await;
    let id = session["sessionId"].as_str().unwrap().to_string();
    let base = t.base.clone();
    let attacks = [
        "/../secret",
        "/hls/../../secret",
        "/%2e%2e/secret",
        "/%2E%2E/secret",
        "/hls/.%2e/.%2E/secret",
        "/./secret",
        "/hls%2f..%2f..%2fsecret",
    ];
    for path in attacks {
        let raw = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nX-StreamGate-Session: {id}\r\nConnection: close\r\n\r\n"
        );
        let answer = tokio::task::spawn_blocking({
            let base = base.clone();
            move || raw_request(&base, &raw)
        })
        .await
        .unwrap();
        assert_eq!(answer.0, 400, "{path}: {}", answer.1);
        assert!(answer.1.contains("invalid_request"), "{path}: {}", answer.1);
    }
    assert!(
        upstream.requests().is_empty(),
        "an attack reached the upstream: {:?}",
        upstream.requests()
    );
    // A normal path is joined under the base path.
    let response = t
        .client
        .get(format!("{base}/hls/seg.ts"))
        .header("X-StreamGate-Session", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.requests()[0].path_and_query, "/media/hls/seg.ts");
}

#[tokio::test]
async fn hop_by_hop_headers_stay_on_their_hop_and_the_peer_is_appended() {
    let upstream = RecordingUpstream::start("").await;
    let t = proxy_sidecar(&upstream.url).await;
    let (_, session) = t.open("acct", "tv").await;
    let response = t
        .client
        .get(format!("{}/live", t.base))
        .header(
            "X-StreamGate-Session",
            session["sessionId"].as_str().unwrap(),
        )
        .header("Connection", "X-Private-Hop")
        .header("X-Private-Hop", "credentials-for-the-next-hop-only")
        .header("Proxy-Connection", "keep-alive")
        .header("X-Forwarded-For", "203.0.113.9")
        .header("Forwarded", "for=203.0.113.9")
        .header("X-Kept", "yes")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Upstream to viewer: the upstream's hop-by-hop headers are dropped too.
    assert!(!response.headers().contains_key("x-upstream-internal"));
    assert!(!response.headers().contains_key("proxy-connection"));
    assert_eq!(response.headers()["x-media"], "yes");

    let seen = upstream.requests();
    let headers = &seen[0].headers;
    assert!(!headers.contains_key("x-private-hop"), "{headers:?}");
    assert!(!headers.contains_key("proxy-connection"), "{headers:?}");
    assert!(!headers.contains_key("x-streamgate-session"), "{headers:?}");
    assert_eq!(headers["x-kept"], "yes");
    assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(headers["forwarded"], "for=203.0.113.9, for=127.0.0.1");
}

/// Sockets that never finish a request head, and sockets that never send anything.
fn open_attack_sockets(base: &str, half_sent: usize, idle: usize) -> Vec<TcpStream> {
    let address = base.trim_start_matches("http://");
    let mut sockets = Vec::new();
    for i in 0..half_sent + idle {
        let Ok(mut s) = TcpStream::connect(address) else {
            continue; // refused or reset: the sidecar defends itself, which is fine
        };
        if i < half_sent {
            let _ = s.write_all(
                format!("GET /streaming?account=a{i}&streamId=s HTTP/1.1\r\nHost: x\r\nX-Pad: ")
                    .as_bytes(),
            );
        }
        sockets.push(s);
    }
    sockets
}

async fn answers_quickly(client: &Client, url: &str) -> bool {
    match tokio::time::timeout(Duration::from_secs(5), client.get(url).send()).await {
        Ok(Ok(r)) => r.status() == 200,
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_cannot_starve_health_checks_and_memory_comes_back() {
    // The sidecar gets 1,024 file descriptors, as in a typical container; the attack uses more.
    let sidecar = SidecarProcess::start_under(
        &["prlimit", "--nofile=1024:1024", "--"],
        &[
            "--max-connections",
            "256",
            "--header-read-timeout",
            "2s",
            "--idle-timeout",
            "3s",
        ],
        "warn,streamgate_sidecar::server=info",
    )
    .await;
    sidecar.wait_ready().await;
    let baseline = sidecar.rss_kib();
    let base = sidecar.base.clone();

    // 1,200 attack sockets, far over the limit: half of them dribble a head, half say nothing.
    let sockets = tokio::task::spawn_blocking({
        let base = base.clone();
        move || open_attack_sockets(&base, 600, 600)
    })
    .await
    .unwrap();
    assert!(sockets.len() > 256, "the attack did not get going");

    // Health and readiness answer during the attack, on fresh connections.
    for _ in 0..5 {
        let client = Client::builder().pool_max_idle_per_host(0).build().unwrap();
        assert!(answers_quickly(&client, &format!("{base}/healthz")).await);
        assert!(answers_quickly(&client, &format!("{base}/readyz")).await);
    }
    let during = sidecar.rss_kib();

    // The sidecar closes the attacker's sockets by itself: a half-sent head after the header
    // timeout, an idle one after the idle timeout (or sooner, shed to make room).
    let closed = tokio::task::spawn_blocking(move || {
        let mut sockets = sockets;
        let mut closed_by_server = 0;
        let last = sockets.len() - 1;
        for index in [0, last] {
            let socket = &mut sockets[index];
            socket
                .set_read_timeout(Some(Duration::from_secs(15)))
                .unwrap();
            let mut buf = [0u8; 512];
            // EOF or a reset: closed by the sidecar. A timeout: still held open.
            match socket.read(&mut buf) {
                Ok(_) => closed_by_server += 1,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed_by_server += 1,
                Err(_) => {}
            }
        }
        (closed_by_server, sockets)
    })
    .await
    .unwrap();
    let (closed_by_server, sockets) = closed;
    assert_eq!(closed_by_server, 2, "attack sockets were held open");

    // The attacker goes away; the timeouts and the limit kept memory bounded, and it comes
    // back near its baseline.
    drop(sockets);
    let mut after = sidecar.rss_kib();
    for _ in 0..100 {
        after = sidecar.rss_kib();
        if after <= baseline + 8 * 1024 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        during <= baseline + 48 * 1024,
        "memory during the attack: {during} KiB, baseline {baseline} KiB"
    );
    assert!(
        after <= baseline + 8 * 1024,
        "memory after the attack: {after} KiB, baseline {baseline} KiB"
    );
    let client = Client::new();
    assert!(answers_quickly(&client, &format!("{base}/healthz")).await);
}

#[tokio::test]
async fn oversized_heads_are_refused_with_431() {
    let t = TestSidecar::start(&default_policy("  maxStreamsPerAccount: 3")).await;
    let huge = "x".repeat(64 * 1024);
    let response = t
        .client
        .get(format!("{}/healthz", t.base))
        .header("X-Huge", huge)
        .send()
        .await;
    match response {
        Ok(r) => assert_eq!(r.status(), 431),
        Err(e) => assert!(e.is_request() || e.is_connect() || e.is_body(), "{e}"),
    }
    let mut request = t.client.get(format!("{}/healthz", t.base));
    for i in 0..200 {
        request = request.header(format!("x-h{i}"), "1");
    }
    let status = request.send().await.map(|r| r.status().as_u16());
    assert!(matches!(status, Ok(431) | Err(_)), "{status:?}");
    // The sidecar is fine afterwards.
    assert_eq!(t.request(Method::GET, "/healthz").await.status(), 200);
}

#[tokio::test]
async fn logs_show_fingerprints_never_session_ids_tokens_or_store_passwords() {
    let upstream = RecordingUpstream::start("").await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.yaml");
    std::fs::write(
        &policy,
        default_policy("  maxStreamsPerAccount: 1\n  onLimitExceeded: EvictOldest"),
    )
    .unwrap();
    let sidecar = SidecarProcess::start_logging(
        &[
            "--policy-file",
            policy.to_str().unwrap(),
            "--upstream",
            &upstream.url,
        ],
        "debug",
    )
    .await;
    sidecar.wait_ready().await;
    let client = Client::new();
    let base = &sidecar.base;
    let (_, first) = common::streaming_at(&client, base, Method::PUT, "acct", "tv").await;
    let first = first["sessionId"].as_str().unwrap().to_string();
    // Media with the id in the query and in the header; a heartbeat; an eviction; a kick.
    let _ = client
        .get(format!(
            "{base}/hls/index.m3u8?session={first}&sg=playback-token-123"
        ))
        .send()
        .await
        .unwrap();
    let (_, second) = common::streaming_at(&client, base, Method::PUT, "acct", "phone").await;
    let second = second["sessionId"].as_str().unwrap().to_string();
    let _ = client
        .get(format!("{base}/live"))
        .header("X-StreamGate-Session", &second)
        .send()
        .await
        .unwrap();
    let kicked = client
        .delete(format!("{}/v1/sessions/{second}", sidecar.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(kicked.status(), 204);
    let logs = common::eventually_value(async || {
        let text = sidecar.log_text();
        text.contains("session kicked").then_some(text)
    })
    .await;
    for secret in [first.as_str(), second.as_str(), "playback-token-123"] {
        assert!(!logs.contains(secret), "{secret} is in the log:\n{logs}");
    }
    assert!(
        logs.contains(&fingerprint(&second)),
        "the kick is logged with the session's fingerprint:\n{logs}"
    );

    // A store URL's password is never printed, not at start-up, not in errors or bodies.
    let redis = common::redis_env("STREAMGATE_TEST_REDIS");
    let with_password = redis.replacen("redis://", "redis://:hunter2-secret@", 1);
    let sidecar = SidecarProcess::start_logging(&["--store", &with_password], "debug").await;
    let (status, body) = json(
        client
            .get(format!("{}/readyz", sidecar.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 503, "a password Redis does not know: {body}");
    assert!(!body.to_string().contains("hunter2"), "{body}");
    let logs = sidecar.log_text();
    assert!(
        logs.contains("***@"),
        "the start-up line shows the redacted URL:\n{logs}"
    );
    assert!(
        !logs.contains("hunter2"),
        "the password is in the log:\n{logs}"
    );
    for bad in [
        "redis-cluster://:hunter2-secret@",
        "redis-cluster://:hunter2-secret@bad host:1",
        "redis://:hunter2-secret@bad host:1",
        "rediss://:hunter2-secret@h:1",
    ] {
        let output = std::process::Command::new(common::SIDECAR_BIN)
            .args(["--store", bad])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--store"), "{stderr}");
        assert!(!stderr.contains("hunter2"), "{bad}: {stderr}");
    }
}
