//! `streamgate-sidecar`: configuration in, session API out.

use clap::Parser;
use streamgate_sidecar::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

// Allocation is a tenth of a request's CPU under the system allocator (BENCHMARKS.md, "Where
// the sidecar's CPU goes"); mimalloc's thread-local free lists make it cheaper.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log_format {
        LogFormat::Json => subscriber.json().init(),
        LogFormat::Text => subscriber.init(),
    }
    match streamgate_sidecar::server::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("streamgate-sidecar: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
