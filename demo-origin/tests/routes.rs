//! The origin's routes answer what players and the proxy tests rely on.

use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode, header};
use streamgate_demo_origin::{OriginStats, media, router};
use tower::ServiceExt;

async fn get(stats: &OriginStats, uri: &str) -> (StatusCode, Option<String>, Vec<u8>) {
    let response = router(stats.clone())
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string());
    let body = to_bytes(response.into_body(), 64 << 20).await.unwrap();
    (status, content_type, body.to_vec())
}

#[tokio::test]
async fn hls_playlists_and_segments_are_served_and_counted() {
    let stats = OriginStats::default();
    let (status, content_type, body) = get(&stats, "/hls/index.m3u8").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        content_type.as_deref(),
        Some("application/vnd.apple.mpegurl")
    );
    assert!(String::from_utf8(body).unwrap().contains("segment0.ts"));

    let (status, _, body) = get(&stats, "/hls/live.m3u8").await;
    assert_eq!(status, StatusCode::OK);
    let live = String::from_utf8(body).unwrap();
    // Full from the first request, numbered from the origin's start (small numbers).
    assert_eq!(
        live.matches("#EXTINF").count() as u64,
        media::LIVE_WINDOW,
        "{live}"
    );
    assert!(live.contains("#EXT-X-MEDIA-SEQUENCE:0\n"), "{live}");
    let first_live = live
        .lines()
        .find(|l| l.starts_with("live"))
        .expect("a live segment")
        .to_string();

    for uri in ["/hls/segment5.ts".to_string(), format!("/hls/{first_live}")] {
        let (status, content_type, body) = get(&stats, &uri).await;
        assert_eq!(status, StatusCode::OK, "{uri}");
        assert_eq!(content_type.as_deref(), Some("video/mp2t"));
        assert!(media::FIXTURE.contains(&body.as_slice()), "{uri}");
    }
    let (status, _, _) = get(&stats, "/hls/segment999999.ts").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(stats.requests(), 5);
}

#[tokio::test]
async fn file_has_the_asked_size() {
    let stats = OriginStats::default();
    let (status, _, body) = get(&stats, "/file?mib=3").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 3 << 20);
}
