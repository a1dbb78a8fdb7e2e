//! CORS: a player page on another origin can open a session, read every answer (errors
//! included) and send its credential to the proxy; an origin not allowed learns nothing.

mod common;

use std::sync::Arc;

use clap::Parser;
use common::{default_policy, json};
use reqwest::{Client, Method, Response};
use streamgate_demo_origin::{self as demo_origin, OriginStats};
use streamgate_sidecar::config::Config;
use streamgate_sidecar::policy::PolicySet;
use streamgate_sidecar::server::Sidecar;
use streamgate_sidecar::store::MemoryStore;

const PAGE: &str = "http://127.0.0.1:8081";
const OTHER_PAGE: &str = "http://127.0.0.1:8082";

/// A proxying sidecar allowing [`PAGE`] in front of a demo origin.
async fn start(spec: &str) -> (String, OriginStats) {
    let stats = OriginStats::default();
    let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", origin.local_addr().unwrap());
    let app = demo_origin::router(stats.clone());
    tokio::spawn(async move { axum::serve(origin, app).await });
    let policies = PolicySet::from_yaml(&default_policy(spec), "test.yaml", "default").unwrap();
    let sidecar = Sidecar::with_store(Arc::new(MemoryStore::new()), policies)
        .with_upstream(upstream.parse().unwrap())
        .with_cors_origins(vec![PAGE.to_string()]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { sidecar.serve(listener, std::future::pending()).await });
    (base, stats)
}

fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).map(|v| v.to_str().unwrap())
}

fn cors_headers(response: &Response) -> Vec<String> {
    response
        .headers()
        .keys()
        .map(|k| k.as_str().to_string())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

async fn preflight(base: &str, path: &str, origin: &str, method: &str, headers: &str) -> Response {
    Client::new()
        .request(Method::OPTIONS, format!("{base}{path}"))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", method)
        .header("Access-Control-Request-Headers", headers)
        .send()
        .await
        .unwrap()
}

fn lowercase_list(value: Option<&str>) -> Vec<String> {
    value
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .collect()
}

#[tokio::test]
async fn preflights_are_answered_by_the_sidecar_for_the_api_and_the_proxy() {
    let (base, stats) = start("  maxStreamsPerAccount: 1").await;
    for (path, method) in [
        ("/streaming?account=a&streamId=tv", "PUT"),
        ("/streaming?account=a&streamId=tv", "DELETE"),
        ("/hls/segment0.ts", "GET"),
    ] {
        let response = preflight(
            &base,
            path,
            PAGE,
            method,
            "authorization,x-streamgate-token,x-streamgate-session",
        )
        .await;
        assert!(response.status().is_success(), "{path} {method}");
        assert_eq!(header(&response, "access-control-allow-origin"), Some(PAGE));
        let methods = lowercase_list(header(&response, "access-control-allow-methods"));
        for m in ["get", "put", "delete"] {
            assert!(methods.contains(&m.to_string()), "{methods:?}");
        }
        let headers = lowercase_list(header(&response, "access-control-allow-headers"));
        for h in [
            "authorization",
            "x-streamgate-token",
            "x-streamgate-session",
        ] {
            assert!(headers.contains(&h.to_string()), "{headers:?}");
        }
        assert_eq!(header(&response, "access-control-max-age"), Some("600"));
    }
    assert_eq!(stats.requests(), 0, "a preflight reached the upstream");
}

#[tokio::test]
async fn an_origin_not_allowed_gets_no_cors_headers() {
    let (base, _) = start("  maxStreamsPerAccount: 1").await;
    let response = preflight(
        &base,
        "/streaming?account=a&streamId=tv",
        OTHER_PAGE,
        "PUT",
        "authorization",
    )
    .await;
    assert_eq!(cors_headers(&response), Vec::<String>::new());
    let response = Client::new()
        .put(format!("{base}/streaming?account=a&streamId=tv"))
        .header("Origin", OTHER_PAGE)
        .send()
        .await
        .unwrap();
    // The API itself still answers (CORS is the browser's check), but without CORS headers the
    // page cannot read it.
    assert_eq!(response.status(), 201);
    assert_eq!(cors_headers(&response), Vec::<String>::new());
    // A request without Origin (curl, a server) is not a CORS request either.
    let response = Client::new()
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(cors_headers(&response), Vec::<String>::new());
}

#[tokio::test]
async fn answers_and_errors_carry_cors_headers_and_expose_streamgate_headers() {
    let (base, _) = start("  maxStreamsPerAccount: 1\n  onLimitExceeded: EvictOldest").await;
    let client = Client::new();
    let call = |method: Method, url: String| client.request(method, url).header("Origin", PAGE);

    let tv = call(
        Method::PUT,
        format!("{base}/streaming?account=a&streamId=tv"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(tv.status(), 201);
    assert_eq!(header(&tv, "access-control-allow-origin"), Some(PAGE));
    let exposed = lowercase_list(header(&tv, "access-control-expose-headers"));
    for h in [
        "x-streamgate-dry-run",
        "x-streamgate-degraded",
        "x-streamgate-token",
        "x-streamgate-token-expires-at",
        "retry-after",
    ] {
        assert!(exposed.contains(&h.to_string()), "{exposed:?}");
    }
    let (_, tv) = json(tv).await;
    let tv_id = tv["sessionId"].as_str().unwrap().to_string();

    // The phone evicts the TV: the TV's segment request gets the proxy's 403, readable by the page.
    let phone = call(
        Method::PUT,
        format!("{base}/streaming?account=a&streamId=phone"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(phone.status(), 201);
    let refused = call(
        Method::GET,
        format!("{base}/hls/segment0.ts?session={tv_id}"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(header(&refused, "access-control-allow-origin"), Some(PAGE));
    let (status, body) = json(refused).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "session_gone");
    assert_eq!(body["reason"], "evicted");

    // The TV's heartbeat: 410 with the reason.
    let gone = call(
        Method::GET,
        format!("{base}/streaming?account=a&streamId=tv"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(header(&gone, "access-control-allow-origin"), Some(PAGE));
    assert_eq!(json(gone).await.0, 410);

    // Bad input and unknown sessions.
    let bad = call(
        Method::PUT,
        format!("{base}/streaming?account=&streamId=tv"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(header(&bad, "access-control-allow-origin"), Some(PAGE));
    assert_eq!(json(bad).await.0, 400);
    let unknown = call(Method::GET, format!("{base}/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&unknown, "access-control-allow-origin"), Some(PAGE));
    assert_eq!(json(unknown).await.0, 403);

    // Media through the proxy, from an active session.
    let (_, phone) = json(
        call(
            Method::GET,
            format!("{base}/streaming?account=a&streamId=phone"),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    let media = call(
        Method::GET,
        format!(
            "{base}/hls/segment1.ts?session={}",
            phone["sessionId"].as_str().unwrap()
        ),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(media.status(), 200);
    assert_eq!(header(&media, "access-control-allow-origin"), Some(PAGE));
}

#[test]
fn the_origins_flag_refuses_what_is_not_an_origin() {
    let parsed = Config::try_parse_from([
        "streamgate-sidecar",
        "--cors-allowed-origins",
        "https://a.example.com, http://127.0.0.1:8081",
    ])
    .unwrap();
    assert_eq!(
        parsed.cors_allowed_origins,
        ["https://a.example.com", "http://127.0.0.1:8081"]
    );
    for bad in [
        "https://a.example.com/",
        "a.example.com",
        "https://a.example.com,ftp://b",
    ] {
        let error = Config::try_parse_from(["streamgate-sidecar", "--cors-allowed-origins", bad])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--cors-allowed-origins"), "{error}");
    }
}

#[tokio::test]
async fn the_namespace_policy_allows_origins_too() {
    let (base, _) =
        start("  maxStreamsPerAccount: 1\n  allowedOrigins: ['https://player.example.com']").await;
    for origin in [PAGE, "https://player.example.com"] {
        let response = preflight(
            &base,
            "/streaming?account=a&streamId=tv",
            origin,
            "PUT",
            "authorization",
        )
        .await;
        assert_eq!(
            header(&response, "access-control-allow-origin"),
            Some(origin)
        );
    }
    let response = preflight(
        &base,
        "/streaming?account=a&streamId=tv",
        OTHER_PAGE,
        "PUT",
        "authorization",
    )
    .await;
    assert_eq!(cors_headers(&response), Vec::<String>::new());
}
