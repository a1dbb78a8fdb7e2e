//! A tiny streaming origin for demos, tests and benchmarks: an endless chunked live stream, a
//! few HLS segments and a large file. It stands in for the streaming container behind the
//! enforcing proxy (`cargo run -p streamgate-sidecar --example demo-origin`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::stream;
use serde::Deserialize;

/// Number of HLS segments in the demo playlist.
pub const SEGMENTS: u32 = 5;
/// Size of one HLS segment.
pub const SEGMENT_BYTES: usize = 64 * 1024;

/// Counts the requests the origin has seen, so tests can prove a request never reached it.
#[derive(Clone, Default)]
pub struct OriginStats {
    requests: Arc<AtomicU64>,
}

impl OriginStats {
    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

#[derive(Deserialize)]
struct LiveParams {
    /// Milliseconds between chunks (default 100).
    interval_ms: Option<u64>,
}

#[derive(Deserialize)]
struct FileParams {
    /// Size in MiB (default 64).
    mib: Option<usize>,
}

/// The origin's routes: `/live` (endless chunked stream, `?interval_ms=`), `/hls/index.m3u8`,
/// `/hls/segment{N}.ts`, `/file` (`?mib=` MiB of data) and `/healthz`.
pub fn router(stats: OriginStats) -> Router {
    Router::new()
        .route("/live", get(live))
        .route("/hls/index.m3u8", get(playlist))
        .route("/hls/{segment}", get(segment))
        .route("/file", get(file))
        .route("/healthz", get(|| async { "ok" }))
        .layer(axum::middleware::from_fn_with_state(
            stats,
            |State(stats): State<OriginStats>,
             request: axum::extract::Request,
             next: axum::middleware::Next| async move {
                stats.requests.fetch_add(1, Ordering::SeqCst);
                next.run(request).await
            },
        ))
}

async fn live(Query(params): Query<LiveParams>) -> Response {
    let interval = Duration::from_millis(params.interval_ms.unwrap_or(100).max(1));
    let chunks = stream::unfold(0u64, move |n| async move {
        tokio::time::sleep(interval).await;
        let chunk = Bytes::from(format!("chunk {n:08}\n").repeat(64));
        Some((Ok::<_, std::io::Error>(chunk), n + 1))
    });
    (
        [(header::CONTENT_TYPE, "video/mp2t")],
        Body::from_stream(chunks),
    )
        .into_response()
}

async fn playlist() -> Response {
    let mut m3u8 = String::from("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n");
    for n in 0..SEGMENTS {
        m3u8.push_str(&format!("#EXTINF:2.0,\nsegment{n}.ts\n"));
    }
    m3u8.push_str("#EXT-X-ENDLIST\n");
    (
        [(header::CONTENT_TYPE, "application/vnd.apple.mpegurl")],
        m3u8,
    )
        .into_response()
}

async fn segment(Path(name): Path<String>) -> Response {
    let number = name
        .strip_prefix("segment")
        .and_then(|n| n.strip_suffix(".ts"))
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|n| *n < SEGMENTS);
    match number {
        Some(n) => (
            [(header::CONTENT_TYPE, "video/mp2t")],
            vec![n as u8; SEGMENT_BYTES],
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn file(Query(params): Query<FileParams>) -> Response {
    let mib = params.mib.unwrap_or(64);
    let chunk = Bytes::from(vec![0x5a; 1024 * 1024]);
    let body = stream::iter((0..mib).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, (mib * 1024 * 1024).to_string()),
        ],
        Body::from_stream(body),
    )
        .into_response()
}
