//! The HTTP floor: an axum server that answers the session API's `/streaming` routes with a fixed
//! small JSON body and does no other work. `bench/run` loads it and the sidecar with the same
//! settings; the difference is what the session logic costs over bare HTTP.
//!
//! Usage: `cargo run --release -p streamgate-sidecar --example http_floor -- [ADDRESS]`
//! (default `127.0.0.1:8081`).

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// A session-shaped body of about the sidecar's size, so both servers write similar responses.
const BODY: &str = r#"{"sessionId":"00000000000000000000000000000000","account":"floor","streamId":"floor","state":"active","createdAt":"2026-01-01T00:00:00.000Z","expiresAt":"2026-01-01T00:01:30.000Z","heartbeatIntervalSeconds":30,"limit":3,"activeSessions":1}"#;

fn json(status: StatusCode) -> impl IntoResponse {
    (status, [(header::CONTENT_TYPE, "application/json")], BODY)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".to_string());
    let app = Router::new()
        .route(
            "/streaming",
            get(|| async { json(StatusCode::OK) })
                .put(|| async { json(StatusCode::CREATED) })
                .delete(|| async { StatusCode::NO_CONTENT }),
        )
        .route("/healthz", get(|| async { r#"{"status":"ok"}"# }));
    let listener = tokio::net::TcpListener::bind(&address).await?;
    eprintln!("http_floor listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await
}
