//! Runs the demo streaming origin: `streamgate-demo-origin [LISTEN]` (default 127.0.0.1:9000).

use clap::Parser;
use streamgate_demo_origin::{OriginStats, serve};

/// StreamGate demo origin: real H.264 HLS at /hls/index.m3u8 (VOD) and /hls/live.m3u8 (live-like),
/// an endless chunked stream at /live and a large file at /file.
#[derive(Parser)]
#[command(name = "streamgate-demo-origin", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(
        env = "STREAMGATE_DEMO_ORIGIN_LISTEN",
        default_value = "127.0.0.1:9000"
    )]
    listen: std::net::SocketAddr,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!(
        "demo origin on http://{}: /hls/index.m3u8, /hls/live.m3u8, /live, /file",
        listener.local_addr()?
    );
    serve(listener, OriginStats::default(), shutdown_signal()).await
}

/// Completes on SIGINT or SIGTERM (a container being stopped).
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}
