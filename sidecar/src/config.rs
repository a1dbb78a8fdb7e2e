//! Command-line flags and environment variables of `streamgate-sidecar`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable lines.
    Text,
}

/// StreamGate sidecar: admits a stream only while its account is under its concurrent-stream limit.
#[derive(Clone, Debug, Parser)]
#[command(name = "streamgate-sidecar", version, about)]
pub struct Config {
    /// Address of the session API.
    #[arg(long, env = "STREAMGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Session store: `memory` (embedded, this process only).
    #[arg(long, env = "STREAMGATE_STORE", default_value = "memory")]
    pub store: String,

    /// YAML file of StreamingPolicy documents (or the operator's rendered payload); reloaded on
    /// change. Without it the built-in default applies: 3 streams, TTL 90 s, RejectNew.
    #[arg(long, env = "STREAMGATE_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,

    /// Namespace whose policies apply; documents of other namespaces are ignored.
    #[arg(long, env = "STREAMGATE_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// How often the policy file is checked for changes.
    #[arg(long, env = "STREAMGATE_POLICY_RELOAD_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub policy_reload_interval: Duration,

    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "STREAMGATE_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Log format.
    #[arg(
        long,
        env = "STREAMGATE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// Which store `--store` selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// The embedded in-memory store.
    Memory,
}

/// `--store` names a store this build does not know.
#[derive(Debug, thiserror::Error)]
#[error(
    "--store {0:?}: expected `memory`, `redis://HOST:PORT[/DB]` or `redis-cluster://HOST:PORT[,HOST:PORT...]`{1}"
)]
pub struct StoreSpecError(String, &'static str);

impl StoreSpec {
    /// Parses the `--store` value.
    pub fn parse(value: &str) -> Result<Self, StoreSpecError> {
        match value {
            "memory" => Ok(Self::Memory),
            v if v.starts_with("redis://")
                || v.starts_with("rediss://")
                || v.starts_with("redis-cluster://") =>
            {
                Err(StoreSpecError(
                    v.to_string(),
                    "; the Redis store is not available in this version yet",
                ))
            }
            v => Err(StoreSpecError(v.to_string(), "")),
        }
    }
}
