//! Flags and environment variables of `streamgate-operator`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};

use crate::inject::{SidecarConfig, SidecarResources, StoreSource};

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

    /// PEM file of extra CA certificates trusted when fetching ViewerAuthentication `jwksUri`
    /// key sets (a private identity provider); the public roots are always trusted.
    #[arg(long, env = "STREAMGATE_JWKS_CA_FILE", value_name = "FILE")]
    pub jwks_ca_file: Option<std::path::PathBuf>,

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

    /// Serve the sidecar injection webhook (`--webhook false` turns it off, e.g. to run the
    /// controller alone).
    #[arg(long, env = "STREAMGATE_WEBHOOK", default_value_t = true, action = ArgAction::Set)]
    pub webhook: bool,

    /// Address of the injection webhook's HTTPS endpoint. Every replica serves it.
    #[arg(
        long,
        env = "STREAMGATE_WEBHOOK_LISTEN",
        default_value = "0.0.0.0:8443"
    )]
    pub webhook_listen: SocketAddr,

    /// Serve the certificate in this directory (`tls.crt`, `tls.key`, reloaded on change), e.g.
    /// one mounted from cert-manager. Without it the operator issues its own certificate
    /// (self-signed CA in `--webhook-secret`) and keeps the webhook configuration's caBundle
    /// current.
    #[arg(long, env = "STREAMGATE_WEBHOOK_CERT_DIR")]
    pub webhook_cert_dir: Option<PathBuf>,

    /// Secret in the operator's namespace holding the self-issued CA and serving certificate,
    /// shared by all replicas.
    #[arg(
        long,
        env = "STREAMGATE_WEBHOOK_SECRET",
        default_value = "streamgate-webhook-tls"
    )]
    pub webhook_secret: String,

    /// MutatingWebhookConfiguration whose caBundle the operator keeps current.
    #[arg(
        long,
        env = "STREAMGATE_WEBHOOK_CONFIGURATION",
        default_value = "streamgate-sidecar-injector"
    )]
    pub webhook_configuration: String,

    /// Service in front of the webhook: its DNS names go into the serving certificate.
    #[arg(
        long,
        env = "STREAMGATE_WEBHOOK_SERVICE",
        default_value = "streamgate-webhook"
    )]
    pub webhook_service: String,

    /// Further DNS names or IP addresses for the serving certificate, comma-separated.
    #[arg(
        long,
        env = "STREAMGATE_WEBHOOK_CERT_EXTRA_HOSTS",
        value_delimiter = ','
    )]
    pub webhook_cert_extra_hosts: Vec<String>,

    /// Lifetime of the self-issued serving certificate; it is renewed when a third is left
    /// (the CA lives ten times as long and rolls over the same way).
    #[arg(long, env = "STREAMGATE_WEBHOOK_CERT_VALIDITY", default_value = "90days", value_parser = humantime::parse_duration)]
    pub webhook_cert_validity: Duration,

    /// Serve the live-session API (`live.streamgate.dev`, for the API server's aggregation
    /// layer) on this address, with the webhook's certificate. Off when unset.
    #[arg(long, env = "STREAMGATE_LIVE_API_LISTEN")]
    pub live_api_listen: Option<SocketAddr>,

    /// APIService whose caBundle the operator keeps current (self-issued certificate mode).
    #[arg(
        long,
        env = "STREAMGATE_LIVE_API_SERVICE",
        default_value = "v1alpha1.live.streamgate.dev"
    )]
    pub live_api_service: String,

    /// Image of the injected sidecar.
    #[arg(long, env = "STREAMGATE_SIDECAR_IMAGE", default_value = concat!("streamgate/streamgate-sidecar:", env!("CARGO_PKG_VERSION")))]
    pub sidecar_image: String,

    /// imagePullPolicy of the injected sidecar.
    #[arg(
        long,
        env = "STREAMGATE_SIDECAR_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    pub sidecar_image_pull_policy: String,

    /// Port of the sidecar's session API in the pod.
    #[arg(long, env = "STREAMGATE_SIDECAR_PORT", default_value_t = 8080)]
    pub sidecar_port: u16,

    /// Store URL handed to the sidecars (`memory`, `redis://HOST:PORT[/DB]`, ...). Must not carry
    /// credentials: use --sidecar-store-secret for that.
    #[arg(long, env = "STREAMGATE_SIDECAR_STORE", default_value = "memory")]
    pub sidecar_store: String,

    /// Secret (in each injected pod's namespace) holding the store URL; overrides --sidecar-store.
    #[arg(long, env = "STREAMGATE_SIDECAR_STORE_SECRET")]
    pub sidecar_store_secret: Option<String>,

    /// Key of the store URL in --sidecar-store-secret.
    #[arg(
        long,
        env = "STREAMGATE_SIDECAR_STORE_SECRET_KEY",
        default_value = "url"
    )]
    pub sidecar_store_secret_key: String,

    /// Replicas that must acknowledge every store change before a sidecar answers (Redis WAIT;
    /// see the sidecar's --store-wait-replicas). 0: none.
    #[arg(
        long,
        env = "STREAMGATE_SIDECAR_STORE_WAIT_REPLICAS",
        default_value_t = 0
    )]
    pub sidecar_store_wait_replicas: u32,

    /// Sidecar CPU request (empty: none). Pods may override it with an annotation.
    #[arg(long, env = "STREAMGATE_SIDECAR_CPU_REQUEST", default_value = "50m")]
    pub sidecar_cpu_request: String,

    /// Sidecar CPU limit (empty: none).
    #[arg(long, env = "STREAMGATE_SIDECAR_CPU_LIMIT", default_value = "1")]
    pub sidecar_cpu_limit: String,

    /// Sidecar memory request (empty: none).
    #[arg(
        long,
        env = "STREAMGATE_SIDECAR_MEMORY_REQUEST",
        default_value = "32Mi"
    )]
    pub sidecar_memory_request: String,

    /// Sidecar memory limit (empty: none).
    #[arg(long, env = "STREAMGATE_SIDECAR_MEMORY_LIMIT", default_value = "128Mi")]
    pub sidecar_memory_limit: String,

    /// UID and GID the sidecar runs as (non-zero, as the restricted Pod Security Standard needs).
    #[arg(long, env = "STREAMGATE_SIDECAR_RUN_AS_USER", default_value_t = 65532)]
    pub sidecar_run_as_user: i64,

    /// Namespaces never injected besides the operator's own (comma-separated); pods there are
    /// not counted as running without the sidecar either.
    #[arg(
        long,
        env = "STREAMGATE_INJECTION_EXCLUDED_NAMESPACES",
        value_delimiter = ',',
        default_values_t = DEFAULT_EXCLUDED_NAMESPACES.map(String::from)
    )]
    pub injection_excluded_namespaces: Vec<String>,

    /// How long a namespace's playback token key signs before it is replaced (the new key
    /// verifies for five minutes first, the old one for two hours after).
    #[arg(long, env = "STREAMGATE_PLAYBACK_KEY_ROTATION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub playback_key_rotation: Duration,
}

/// Namespaces never injected by default: Kubernetes' own.
pub const DEFAULT_EXCLUDED_NAMESPACES: [&str; 3] =
    ["kube-system", "kube-public", "kube-node-lease"];

impl Config {
    /// The playback key rotation these flags describe.
    pub fn playback_key_schedule(&self) -> streamgate_policy::playback_keys::RotationSchedule {
        let default = streamgate_policy::playback_keys::RotationSchedule::default();
        streamgate_policy::playback_keys::RotationSchedule {
            rotate_after: chrono::Duration::from_std(self.playback_key_rotation)
                .unwrap_or(default.rotate_after)
                .max(chrono::Duration::hours(1)),
            ..default
        }
    }

    /// The injection settings these flags describe, validated.
    pub fn sidecar(&self) -> Result<SidecarConfig, String> {
        let optional = |v: &str| (!v.trim().is_empty()).then(|| v.trim().to_string());
        let sidecar = SidecarConfig {
            operator_namespace: self.namespace.clone(),
            excluded_namespaces: self.excluded_namespaces(),
            image: self.sidecar_image.clone(),
            image_pull_policy: self.sidecar_image_pull_policy.clone(),
            port: self.sidecar_port,
            store: match &self.sidecar_store_secret {
                Some(name) => StoreSource::Secret {
                    name: name.clone(),
                    key: self.sidecar_store_secret_key.clone(),
                },
                None => StoreSource::Url(self.sidecar_store.clone()),
            },
            store_wait_replicas: self.sidecar_store_wait_replicas,
            resources: SidecarResources {
                cpu_request: optional(&self.sidecar_cpu_request),
                cpu_limit: optional(&self.sidecar_cpu_limit),
                memory_request: optional(&self.sidecar_memory_request),
                memory_limit: optional(&self.sidecar_memory_limit),
            },
            run_as_user: self.sidecar_run_as_user,
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        sidecar.validate()?;
        Ok(sidecar)
    }

    /// Namespaces never injected: `--injection-excluded-namespaces`, trimmed.
    pub fn excluded_namespaces(&self) -> std::collections::BTreeSet<String> {
        self.injection_excluded_namespaces
            .iter()
            .map(|ns| ns.trim().to_string())
            .filter(|ns| !ns.is_empty())
            .collect()
    }

    /// DNS names and addresses of the webhook's serving certificate.
    pub fn webhook_cert_hosts(&self) -> Vec<String> {
        let (service, namespace) = (&self.webhook_service, &self.namespace);
        let mut hosts = vec![
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
        ];
        hosts.extend(
            self.webhook_cert_extra_hosts
                .iter()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty()),
        );
        hosts
    }
}

/// A client for `jwksUri` fetches that also trusts the certificates in `ca_file`, if given.
pub fn jwks_client(ca_file: Option<&std::path::Path>) -> anyhow::Result<reqwest::Client> {
    use anyhow::Context as _;
    let mut builder = reqwest::Client::builder();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("--jwks-ca-file {}: cannot read", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--jwks-ca-file {}: not PEM certificates", path.display()))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().context("building the JWKS client")
}
