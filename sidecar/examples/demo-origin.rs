//! Runs the demo streaming origin: `cargo run -p streamgate-sidecar --example demo-origin -- 127.0.0.1:9000`.

use streamgate_sidecar::demo_origin::{OriginStats, router};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".into());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!(
        "demo origin on http://{}: /live, /hls/index.m3u8, /file",
        listener.local_addr()?
    );
    axum::serve(listener, router(OriginStats::default())).await
}
