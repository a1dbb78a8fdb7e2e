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

    /// Session store: `memory` (embedded, this process only), `redis://HOST:PORT[/DB]`,
    /// `redis-cluster://HOST:PORT[,HOST:PORT...]` or
    /// `redis-sentinel://[USER:PASSWORD@]MASTER@HOST:PORT[,HOST:PORT...][/DB]` (shared by every
    /// sidecar using it).
    #[arg(long, env = "STREAMGATE_STORE", default_value = "memory")]
    pub store: String,

    /// How long a shared store may take to answer before the operation counts as failed and the
    /// policy's failurePolicy applies.
    #[arg(long, env = "STREAMGATE_STORE_TIMEOUT", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub store_timeout: Duration,

    /// Redis replicas that must acknowledge every store-changing decision (Redis WAIT, at most
    /// `--store-timeout`) before it is answered, so a failover cannot lose it. When fewer
    /// acknowledge in time the answer is 503 with Retry-After (the change stays on the master;
    /// a new session is discarded). 0: answer without waiting.
    #[arg(long, env = "STREAMGATE_STORE_WAIT_REPLICAS", default_value_t = 0)]
    pub store_wait_replicas: u32,

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

    /// Longest a client may take to send a request head once it has started one.
    #[arg(long, env = "STREAMGATE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// Longest a connection may wait for its next request without sending anything.
    #[arg(long, env = "STREAMGATE_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Open connections at most; at the limit the connection waiting longest for a request is
    /// closed to make room. Keep it below the process's file descriptor limit.
    #[arg(long, env = "STREAMGATE_MAX_CONNECTIONS", default_value_t = 768, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Largest request head (request line and headers) in bytes; larger ones get 431.
    #[arg(long, env = "STREAMGATE_MAX_HEADER_BYTES", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(8192..=1_048_576))]
    pub max_header_bytes: u32,

    /// Most header fields in a request; more get 431.
    #[arg(long, env = "STREAMGATE_MAX_HEADERS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(8..=1024))]
    pub max_headers: u32,

    /// Live sessions (active and recently cut) the embedded store holds at most; past it new
    /// streams get 503 `capacity_exceeded`. Default: sized from the container's memory limit
    /// (cgroup `memory.max` or `memory.limit_in_bytes`), 1,000,000 without one.
    #[arg(long, env = "STREAMGATE_MAX_SESSIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_sessions: Option<u64>,

    /// PEM file of extra CA certificates trusted when the sidecar fetches a hand-written
    /// ViewerAuthentication's `jwksUri` itself (standalone use); the public roots are always
    /// trusted.
    #[arg(long, env = "STREAMGATE_JWKS_CA_FILE", value_name = "FILE")]
    pub jwks_ca_file: Option<PathBuf>,

    /// Origins (`scheme://host[:port]`, comma-separated, or `*`) whose pages may call the session
    /// API and the proxy from a browser (CORS), in addition to the namespace policy's
    /// `allowedOrigins`.
    #[arg(long, env = "STREAMGATE_CORS_ALLOWED_ORIGINS", value_delimiter = ',', value_parser = parse_origin)]
    pub cors_allowed_origins: Vec<String>,

    /// Address of the admin API: list, get and kick sessions of any account, and metrics.
    /// Loopback by default (also in injected pods): reach it with `kubectl port-forward`.
    #[arg(
        long,
        env = "STREAMGATE_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub admin_listen: SocketAddr,

    /// Address serving `/metrics` alone (injected pods: `0.0.0.0:9091`, the port named
    /// `sg-metrics` that the chart's PodMonitor scrapes).
    #[arg(
        long,
        env = "STREAMGATE_METRICS_LISTEN",
        default_value = "127.0.0.1:9091"
    )]
    pub metrics_listen: SocketAddr,

    /// On Redis: how often the fleet-wide live-session count (`streamgate_active_sessions`)
    /// is refreshed in the background.
    #[arg(long, env = "STREAMGATE_ACTIVE_SESSIONS_REFRESH", default_value = "15s", value_parser = humantime::parse_duration)]
    pub active_sessions_refresh: Duration,

    /// Playback token keys: a JSON (or YAML) key set, `{"signing": ID, "keys": [{"id": ID,
    /// "secret": BASE64}, ...]}` (in injected pods: the namespace's operator-managed Secret);
    /// reloaded on change. Without it a random key is generated at start: tokens then work on
    /// this sidecar only, until it restarts.
    #[arg(long, env = "STREAMGATE_PLAYBACK_KEYS_FILE")]
    pub playback_keys_file: Option<PathBuf>,

    /// Bind playback tokens to the client's network (IPv4 /24, IPv6 /64). Turn off where
    /// one viewer's requests come from changing networks (carrier-grade NAT).
    #[arg(long, env = "STREAMGATE_PLAYBACK_BIND_NETWORK", default_value_t = true, action = clap::ArgAction::Set)]
    pub playback_bind_network: bool,

    /// Media requests must carry a playback token; the session id alone (`X-StreamGate-Session`,
    /// `session`) is refused. Off: both work, as in the prototype. Viewer authentication turns
    /// it on.
    #[arg(long, env = "STREAMGATE_REQUIRE_PLAYBACK_TOKEN", default_value_t = false, action = clap::ArgAction::Set)]
    pub require_playback_token: bool,

    /// Longest lifetime of a playback token the proxy writes into a playlist a player does not
    /// fetch again: a master playlist (its variants may be fetched much later), an ended (VOD)
    /// one (twice its duration, capped by this). Such a token still stops working the moment
    /// its session is not active.
    #[arg(long, env = "STREAMGATE_PLAYLIST_TOKEN_MAX_LIFETIME", default_value = "6h", value_parser = humantime::parse_duration)]
    pub playlist_token_max_lifetime: Duration,

    /// Log format.
    #[arg(
        long,
        env = "STREAMGATE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// Memory one stored session may take, all indexes included, with head room for 128-character
/// ids (an estimate: the record, its entries in three hash maps and the expiry wheel).
const BYTES_PER_SESSION: u64 = 2 * 1024;
/// Without a memory limit: a cap that still bounds memory (about 2 GiB).
const MAX_SESSIONS_UNLIMITED: u64 = 1_000_000;

impl Config {
    /// The connection limits the flags ask for.
    pub fn connection_limits(&self) -> crate::connections::ConnectionLimits {
        crate::connections::ConnectionLimits {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections as usize,
            max_header_bytes: self.max_header_bytes as usize,
            max_headers: self.max_headers as usize,
        }
    }

    /// `--max-sessions`, or the default sized from the container's memory limit.
    pub fn max_sessions(&self) -> u64 {
        self.max_sessions
            .unwrap_or_else(|| sessions_for_memory(cgroup_memory_limit()))
    }
}

/// Sessions that fit in half of `limit` bytes (the rest is for connections and buffers).
pub fn sessions_for_memory(limit: Option<u64>) -> u64 {
    match limit {
        Some(bytes) => (bytes / 2 / BYTES_PER_SESSION).max(1_000),
        None => MAX_SESSIONS_UNLIMITED,
    }
}

/// The memory limit of this process's cgroup: v2 `memory.max`, else v1
/// `memory.limit_in_bytes`; `None` when unlimited or not in a container.
pub fn cgroup_memory_limit() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    parse_memory_limit(read("/sys/fs/cgroup/memory.max").as_deref()).or_else(|| {
        parse_memory_limit(read("/sys/fs/cgroup/memory/memory.limit_in_bytes").as_deref())
    })
}

/// Parses a cgroup memory limit file: a number of bytes, or `max` (v2) / a huge number (v1,
/// unlimited).
pub fn parse_memory_limit(text: Option<&str>) -> Option<u64> {
    let value: u64 = text?.trim().parse().ok()?;
    // cgroup v1 says "unlimited" with a page-rounded i64::MAX.
    (value < (1 << 60)).then_some(value)
}

fn parse_origin(value: &str) -> Result<String, String> {
    let value = value.trim();
    crate::cors::validate_origin(value).map_err(|e| e.to_string())?;
    Ok(value.to_string())
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
            value: crate::store::redis_store::redact_url(value),
            problem,
        };
        match value {
            "memory" => Ok(Self::Memory),
            v if v.starts_with("rediss://") => Err(error(
                "TLS to Redis is not supported yet; use redis:// on a trusted network".into(),
            )),
            v if v.starts_with("redis://")
                || v.starts_with("redis-cluster://")
                || v.starts_with("redis-sentinel://") =>
            {
                RedisTarget::parse(v).map(Self::Redis).map_err(error)
            }
            _ => Err(error(
                "expected `memory`, `redis://HOST:PORT[/DB]`, `redis-cluster://HOST:PORT[,HOST:PORT...]` \
                 or `redis-sentinel://[USER:PASSWORD@]MASTER@HOST:PORT[,HOST:PORT...][/DB]`"
                    .into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_limits_size_the_session_cap() {
        assert_eq!(parse_memory_limit(Some("max\n")), None);
        assert_eq!(parse_memory_limit(Some("9223372036854771712\n")), None);
        assert_eq!(parse_memory_limit(Some("134217728\n")), Some(128 << 20));
        assert_eq!(parse_memory_limit(None), None);
        // The injected sidecar's 128 MiB: 32768 sessions, about 64 MiB at most.
        assert_eq!(sessions_for_memory(Some(128 << 20)), 32_768);
        assert_eq!(sessions_for_memory(Some(1 << 20)), 1_000);
        assert_eq!(sessions_for_memory(None), MAX_SESSIONS_UNLIMITED);
    }
}
