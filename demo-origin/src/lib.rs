//! A small streaming origin for demos, tests and benchmarks, standing in for the streaming
//! container behind StreamGate's enforcing proxy.
//!
//! It serves real, decodable media: a committed fixture of H.264 in MPEG-TS segments (see
//! `media/make.sh`), as a VOD playlist long enough for eviction tests and as a live-like sliding
//! playlist whose media sequence follows the clock. It also serves an endless chunked stream and
//! a large file (for the proxy's streaming and throughput tests) and counts the requests it saw,
//! so tests can prove a refused request never reached it.
#![forbid(unsafe_code)]

pub mod media;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::stream;
use serde::Deserialize;

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

/// The origin's routes:
/// - `/hls/index.m3u8`: VOD playlist of [`media::VOD_SEGMENTS`] segments `segment{N}.ts` (the
///   fixture looped, with `EXT-X-DISCONTINUITY` at each loop);
/// - `/hls/live.m3u8`: live-like sliding playlist of segments `live{SEQ}.ts`, the media sequence
///   computed from the time since the router was made (see [`live_clock`]);
/// - `/live`: an endless chunked byte stream (`?interval_ms=`);
/// - `/file`: `?mib=` MiB of data with a Content-Length;
/// - `/healthz`.
pub fn router(stats: OriginStats) -> Router {
    let started = Instant::now();
    Router::new()
        .route("/live", get(live))
        .route("/hls/index.m3u8", get(vod_playlist))
        .route(
            "/hls/live.m3u8",
            get(
                move || async move { playlist_response(media::live_playlist(live_clock(started))) },
            ),
        )
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

/// Serves [`router`] on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    stats: OriginStats,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(stats))
        .with_graceful_shutdown(shutdown)
        .await
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

fn playlist_response(m3u8: String) -> Response {
    let mut response = (
        [(header::CONTENT_TYPE, "application/vnd.apple.mpegurl")],
        m3u8,
    )
        .into_response();
    // A live playlist changes every segment; players must not reuse a cached one.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn vod_playlist() -> Response {
    playlist_response(media::vod_playlist())
}

/// The live stream's clock: time since `started`, plus one window so that the playlist is full
/// from the first request. It counts from the origin's start, not the Unix epoch, so that
/// sequence numbers stay small: hls.js keeps per-discontinuity state in arrays indexed by the
/// discontinuity sequence, and copying one indexed near 2^28 stalls its main thread.
pub fn live_clock(started: Instant) -> Duration {
    started.elapsed() + Duration::from_millis(media::LIVE_WINDOW * media::SEGMENT_MILLIS)
}

async fn segment(Path(name): Path<String>) -> Response {
    match media::segment_for_uri(&name) {
        Some(bytes) => (
            [(header::CONTENT_TYPE, "video/mp2t")],
            Bytes::from_static(bytes),
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
