//! Flags and environment variables of `streamgate-operator`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// StreamGate operator: renders StreamingPolicies into the configuration the sidecars read.
#[derive(Clone, Debug, Parser)]
#[command(name = "streamgate-operator", version, about)]
pub struct Config {
    /// Address of the health (`/healthz`, `/readyz`) and metrics (`/metrics`) endpoints.
    #[arg(
        long,
        env = "STREAMGATE_OPERATOR_METRICS_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub metrics_listen: SocketAddr,

    /// Namespace of the leader-election Lease: the operator's own namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "streamgate-system")]
    pub namespace: String,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "STREAMGATE_OPERATOR_LEASE",
        default_value = "streamgate-operator"
    )]
    pub lease_name: String,

    /// This replica's identity in the Lease (default: a random one).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// How long a leader's Lease lasts without renewal; a standby takes over after it.
    #[arg(long, env = "STREAMGATE_OPERATOR_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,

    /// Log format.
    #[arg(
        long,
        env = "STREAMGATE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}
