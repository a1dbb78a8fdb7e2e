//! Command-line flags and environment variables of `streamgate-sidecar`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::store::RedisTarget;

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

    /// Session store: `memory` (embedded, this process only), `redis://HOST:PORT[/DB]` or
    /// `redis-cluster://HOST:PORT[,HOST:PORT...]` (shared by every sidecar using it).
    #[arg(long, env = "STREAMGATE_STORE", default_value = "memory")]
    pub store: String,

    /// How long a shared store may take to answer before the operation counts as failed and the
    /// policy's failurePolicy applies.
    #[arg(long, env = "STREAMGATE_STORE_TIMEOUT", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub store_timeout: Duration,

    /// YAML file of StreamingPolicy documents (or the operator's rendered payload); reloaded on
    /// change. Without it the built-in default applies: 3 streams, TTL 90 s, RejectNew.
    #[arg(long, env = "STREAMGATE_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,

    /// Turns on the enforcing proxy: requests outside the session API are media requests,
    /// forwarded to this URL (the streaming container) only with an active session.
    #[arg(long, env = "STREAMGATE_UPSTREAM", value_parser = parse_upstream)]
    pub upstream: Option<reqwest::Url>,

    /// A missing policy file is not an error: the built-in default applies until the file
    /// appears (as with an optional ConfigMap volume that is created later).
    #[arg(long, env = "STREAMGATE_POLICY_FILE_OPTIONAL", default_value_t = false, action = clap::ArgAction::Set)]
    pub policy_file_optional: bool,

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

fn parse_upstream(value: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(value).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("expected http://HOST[:PORT][/PATH] or https://...".into());
    }
    Ok(url)
}

/// Which store `--store` selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// The embedded in-memory store.
    Memory,
    /// Redis, standalone or Cluster.
    Redis(RedisTarget),
}

/// `--store` is not a store this build knows.
#[derive(Debug, thiserror::Error)]
#[error("--store {value:?}: {problem}")]
pub struct StoreSpecError {
    value: String,
    problem: String,
}

impl StoreSpec {
    /// Parses the `--store` value.
    pub fn parse(value: &str) -> Result<Self, StoreSpecError> {
        let error = |problem: String| StoreSpecError {
            value: value.to_string(),
            problem,
        };
        match value {
            "memory" => Ok(Self::Memory),
            v if v.starts_with("rediss://") => Err(error(
                "TLS to Redis is not supported yet; use redis:// on a trusted network".into(),
            )),
            v if v.starts_with("redis://") || v.starts_with("redis-cluster://") => {
                RedisTarget::parse(v).map(Self::Redis).map_err(error)
            }
            _ => Err(error(
                "expected `memory`, `redis://HOST:PORT[/DB]` or `redis-cluster://HOST:PORT[,HOST:PORT...]`".into(),
            )),
        }
    }
}
