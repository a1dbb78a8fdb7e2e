//! StreamingPolicy: the wire type shared with the operator's CRD, the policy file format, and
//! resolution of the policy that applies to one account.
//!
//! A policy file holds one or more YAML documents, each a `StreamingPolicy` exactly as a user would
//! `kubectl apply` it. The operator renders a namespace's policies into the same format, so a
//! sidecar reads the ConfigMap payload and a hand-written file the same way.
//!
//! This crate holds no HTTP, Redis or Kubernetes client: the sidecar and the operator both link it.
#![forbid(unsafe_code)]

pub mod id;
pub mod playback_keys;
pub mod validators;
pub mod viewer_auth;

pub use validators::{
    ServiceReference, ValidatorFailurePolicy, ValidatorMode, ValidatorSpec, check_validators,
};

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group and version of the StreamingPolicy resource.
pub const API_VERSION: &str = "streamgate.dev/v1alpha1";
/// Kind of the StreamingPolicy resource.
pub const KIND: &str = "StreamingPolicy";

/// Smallest allowed `maxStreamsPerAccount`.
pub const MIN_STREAMS: u32 = 1;
/// Largest allowed `maxStreamsPerAccount`.
pub const MAX_STREAMS: u32 = 10_000;
/// Largest allowed `sessionTTLSeconds` (one day): longer TTLs keep dead players' slots too long.
pub const MAX_TTL_SECONDS: u32 = 86_400;

/// What happens to a new stream when its account is already at its limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum OnLimitExceeded {
    /// Refuse the new stream with 429 `limit_exceeded`.
    #[default]
    RejectNew,
    /// Admit the new stream and revoke the account's oldest session (reason `evicted`).
    EvictOldest,
}

/// What a sidecar does when the session store cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum FailurePolicy {
    /// Admit new streams and keep existing ones: viewers are never punished for our outage.
    #[default]
    Open,
    /// Refuse new streams with 503 `store_unavailable`; existing sessions live until their TTL.
    Closed,
}

/// Whether decisions are enforced or only reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Mode {
    /// Refuse and cut as the policy says.
    #[default]
    Enforce,
    /// Decide and report (metrics, logs, a response header) but never refuse or cut.
    DryRun,
}

fn default_max_streams() -> u32 {
    3
}
fn default_ttl() -> u32 {
    90
}
fn default_heartbeat() -> u32 {
    30
}

/// The `spec` of a StreamingPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// Concurrent sessions allowed per account.
    #[serde(default = "default_max_streams")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_streams_per_account: u32,
    /// A session expires this many seconds after its last heartbeat. At least twice
    /// `heartbeatIntervalSeconds`.
    #[serde(default = "default_ttl", rename = "sessionTTLSeconds")]
    #[schemars(range(min = 2, max = 86400))]
    pub session_ttl_seconds: u32,
    /// Heartbeat interval advertised to players.
    #[serde(default = "default_heartbeat")]
    #[schemars(range(min = 1, max = 43200))]
    pub heartbeat_interval_seconds: u32,
    /// What happens to a new stream when the account is at its limit.
    #[serde(default)]
    pub on_limit_exceeded: OnLimitExceeded,
    /// Empty: this is the namespace's default policy. Otherwise an override for these accounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10000))]
    pub accounts: Vec<String>,
    /// What to do while the session store is unreachable.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// `Enforce`, or `DryRun` to decide and report without refusing or cutting.
    #[serde(default)]
    pub mode: Mode,
    /// The policy is in force from this instant on (RFC 3339). Absent: since ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Absent rather than null in the schema, so CEL rules can compare it when present.
    #[schemars(with = "DateTime<Utc>")]
    pub active_from: Option<DateTime<Utc>>,
    /// The policy is in force until this instant, excluded (RFC 3339). Absent: for ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Absent rather than null in the schema, so CEL rules can compare it when present.
    #[schemars(with = "DateTime<Utc>")]
    pub active_until: Option<DateTime<Utc>>,
    /// Origins (`scheme://host[:port]`, or `*`) whose web pages may call this namespace's
    /// sidecars from a browser (CORS). Only on the namespace's default policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 100),
        inner(
            length(max = 256),
            regex(pattern = r"^(\*|https?://[A-Za-z0-9.:\[\]-]+)$")
        )
    )]
    pub allowed_origins: Vec<String>,
    /// SessionReview endpoints that check each admitted session and may revoke it (reason
    /// `denied`). Names are unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 8),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"])
    )]
    pub validators: Vec<ValidatorSpec>,
    /// Long-lived media responses (a progressive or live stream through the enforcing proxy)
    /// one session may have in flight at once: one session plays one stream.
    #[serde(
        default = "default_media_streams",
        skip_serializing_if = "is_default_media_streams"
    )]
    #[schemars(range(min = 1, max = 100))]
    pub max_media_streams_per_session: u32,
    /// Sharing detection: a session used from more client networks than allowed within a window.
    #[serde(default, skip_serializing_if = "SharingSpec::is_default")]
    pub sharing: SharingSpec,
}

fn default_media_streams() -> u32 {
    1
}
fn is_default_media_streams(value: &u32) -> bool {
    *value == default_media_streams()
}

/// What happens to a session used from too many client networks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum SharingAction {
    /// Revoke the session, reason `shared` (its streams are cut, its heartbeats get 410).
    #[default]
    Revoke,
    /// Log and count it only.
    Report,
}

impl SharingAction {
    /// The action as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Revoke => "revoke",
            Self::Report => "report",
        }
    }
}

/// Sharing detection settings. A network is an IPv4 /24 or an IPv6 /64.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SharingSpec {
    /// Distinct client networks one session may be used from within `windowSeconds` (a phone
    /// moving from Wi-Fi to mobile data uses two).
    #[serde(default = "default_sharing_networks")]
    #[schemars(range(min = 1, max = 100))]
    pub max_networks: u32,
    /// The window in which networks are counted.
    #[serde(default = "default_sharing_window")]
    #[schemars(range(min = 10, max = 86400))]
    pub window_seconds: u32,
    /// `Revoke` the session (reason `shared`) or only `Report` it.
    #[serde(default)]
    pub action: SharingAction,
}

fn default_sharing_networks() -> u32 {
    2
}
fn default_sharing_window() -> u32 {
    600
}

impl Default for SharingSpec {
    fn default() -> Self {
        Self {
            max_networks: default_sharing_networks(),
            window_seconds: default_sharing_window(),
            action: SharingAction::default(),
        }
    }
}

impl SharingSpec {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Checks one allowed-origin entry: `*` (any origin) or `scheme://host[:port]` as browsers send
/// it in `Origin` (http or https, no path, no trailing slash). Returns what is wrong.
pub fn check_origin(origin: &str) -> Result<(), &'static str> {
    if origin == "*" {
        return Ok(());
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return Err("expected scheme://host[:port], e.g. https://player.example.com");
    };
    if !matches!(scheme, "http" | "https") {
        return Err("the scheme must be http or https");
    }
    if rest.is_empty() {
        return Err("the host is missing");
    }
    if rest.contains(['/', '?', '#']) {
        return Err("an origin has no path, query or trailing slash");
    }
    if !rest
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
    {
        return Err("the host has characters an origin cannot have");
    }
    Ok(())
}

/// Where an instant lies relative to a policy's `activeFrom` / `activeUntil` window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// In force now.
    Active,
    /// Not yet in force: it starts at this instant.
    Scheduled(DateTime<Utc>),
    /// No longer in force: it ended at this instant.
    Expired(DateTime<Utc>),
}

impl Default for PolicySpec {
    fn default() -> Self {
        Self {
            max_streams_per_account: default_max_streams(),
            session_ttl_seconds: default_ttl(),
            heartbeat_interval_seconds: default_heartbeat(),
            on_limit_exceeded: OnLimitExceeded::default(),
            accounts: Vec::new(),
            failure_policy: FailurePolicy::default(),
            mode: Mode::default(),
            allowed_origins: Vec::new(),
            active_from: None,
            active_until: None,
            validators: Vec::new(),
            max_media_streams_per_session: default_media_streams(),
            sharing: SharingSpec::default(),
        }
    }
}

/// A rule of the spec that a value breaks, naming the field as it is written in YAML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.maxStreamsPerAccount`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl PolicySpec {
    /// Checks the rules the schema states, plus those that span fields. Returns the first broken one.
    pub fn validate(&self) -> Result<(), FieldError> {
        let err = |field: &str, message: String| {
            Err(FieldError {
                field: format!("spec.{field}"),
                message,
            })
        };
        if !(MIN_STREAMS..=MAX_STREAMS).contains(&self.max_streams_per_account) {
            return err(
                "maxStreamsPerAccount",
                format!(
                    "must be between {MIN_STREAMS} and {MAX_STREAMS}, got {}",
                    self.max_streams_per_account
                ),
            );
        }
        if self.heartbeat_interval_seconds == 0 {
            return err("heartbeatIntervalSeconds", "must be at least 1".into());
        }
        if self.session_ttl_seconds > MAX_TTL_SECONDS {
            return err(
                "sessionTTLSeconds",
                format!(
                    "must be at most {MAX_TTL_SECONDS}, got {}",
                    self.session_ttl_seconds
                ),
            );
        }
        if u64::from(self.session_ttl_seconds) < 2 * u64::from(self.heartbeat_interval_seconds) {
            return err(
                "sessionTTLSeconds",
                format!(
                    "must be at least twice heartbeatIntervalSeconds ({}), got {}",
                    self.heartbeat_interval_seconds, self.session_ttl_seconds
                ),
            );
        }
        if let (Some(from), Some(until)) = (self.active_from, self.active_until)
            && from >= until
        {
            return err(
                "activeUntil",
                format!(
                    "must be later than activeFrom ({}), got {}",
                    from.to_rfc3339(),
                    until.to_rfc3339()
                ),
            );
        }
        for (i, account) in self.accounts.iter().enumerate() {
            if let Err(problem) = crate::id::check_id(account) {
                return err(&format!("accounts[{i}]"), problem.to_string());
            }
        }
        if !self.allowed_origins.is_empty() && !self.accounts.is_empty() {
            return err(
                "allowedOrigins",
                "applies to the namespace's default policy only (one without spec.accounts)".into(),
            );
        }
        for (i, origin) in self.allowed_origins.iter().enumerate() {
            if let Err(problem) = check_origin(origin) {
                return err(&format!("allowedOrigins[{i}]"), problem.into());
            }
        }
        if let Err((field, message)) = check_validators(&self.validators) {
            return err(&field, message);
        }
        if !(1..=100).contains(&self.max_media_streams_per_session) {
            return err(
                "maxMediaStreamsPerSession",
                format!(
                    "must be between 1 and 100, got {}",
                    self.max_media_streams_per_session
                ),
            );
        }
        if !(1..=100).contains(&self.sharing.max_networks) {
            return err(
                "sharing.maxNetworks",
                format!(
                    "must be between 1 and 100, got {}",
                    self.sharing.max_networks
                ),
            );
        }
        if !(10..=86_400).contains(&self.sharing.window_seconds) {
            return err(
                "sharing.windowSeconds",
                format!(
                    "must be between 10 and 86400, got {}",
                    self.sharing.window_seconds
                ),
            );
        }
        Ok(())
    }

    /// Whether the policy is in force at `now`: from `activeFrom` included to `activeUntil`
    /// excluded.
    pub fn window_at(&self, now: DateTime<Utc>) -> Window {
        match (self.active_from, self.active_until) {
            (_, Some(until)) if now >= until => Window::Expired(until),
            (Some(from), _) if now < from => Window::Scheduled(from),
            _ => Window::Active,
        }
    }

    /// The first window boundary strictly after `now`, when the policy's state will change
    /// without any edit. `None` when it never will.
    pub fn next_boundary_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        [self.active_from, self.active_until]
            .into_iter()
            .flatten()
            .filter(|at| *at > now)
            .min()
    }
}

/// `metadata` of a policy document: only what the sidecar needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyMetadata {
    /// Policy name, unique in its namespace.
    #[serde(default)]
    pub name: String,
    /// Namespace; absent means "whichever namespace the sidecar serves".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// One StreamingPolicy document of a policy file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDocument {
    /// Must be `streamgate.dev/v1alpha1`.
    pub api_version: String,
    /// Must be `StreamingPolicy`.
    pub kind: String,
    /// Name and namespace.
    #[serde(default)]
    pub metadata: PolicyMetadata,
    /// The policy itself.
    #[serde(default)]
    pub spec: PolicySpec,
}

/// Why a policy file could not be loaded. Names the file, the document and the field.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("policy file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A document is not valid YAML or does not fit the schema.
    #[error("policy file {path}, document {document}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// 1-based index of the document in the file.
        document: usize,
        /// What the parser said, including the field.
        message: String,
    },
    /// A document parses but breaks a rule.
    #[error("policy file {path}, document {document} ({name}): {error}")]
    Invalid {
        /// The file.
        path: String,
        /// 1-based index of the document in the file.
        document: usize,
        /// `metadata.name` of the document.
        name: String,
        /// The broken rule.
        error: FieldError,
    },
}

/// A named, validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPolicy {
    /// `metadata.name`.
    pub name: String,
    /// The validated spec.
    pub spec: PolicySpec,
}

/// The policy that applies to one account, with where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EffectivePolicy {
    /// Name of the policy, or `built-in` when no policy file names a default.
    pub source: String,
    /// Concurrent sessions allowed.
    pub limit: u32,
    /// Session TTL in seconds.
    pub ttl_seconds: u32,
    /// Advertised heartbeat interval in seconds.
    pub heartbeat_interval_seconds: u32,
    /// Over-limit action.
    pub on_limit_exceeded: OnLimitExceeded,
    /// Store-outage behaviour.
    pub failure_policy: FailurePolicy,
    /// Enforce or dry run.
    pub mode: Mode,
    /// Origins whose pages may call the sidecar (CORS); set on the default policy only.
    pub allowed_origins: Vec<String>,
    /// Session validators, each with its endpoint resolved to a URL.
    pub validators: Vec<ValidatorSpec>,
    /// Long-lived media responses one session may have in flight.
    pub max_media_streams_per_session: u32,
    /// Sharing detection.
    pub sharing: SharingSpec,
}

impl EffectivePolicy {
    fn from_spec(source: &str, spec: &PolicySpec) -> Self {
        Self {
            source: source.to_string(),
            limit: spec.max_streams_per_account,
            ttl_seconds: spec.session_ttl_seconds,
            heartbeat_interval_seconds: spec.heartbeat_interval_seconds,
            on_limit_exceeded: spec.on_limit_exceeded,
            failure_policy: spec.failure_policy,
            mode: spec.mode,
            allowed_origins: spec.allowed_origins.clone(),
            validators: spec
                .validators
                .iter()
                .map(ValidatorSpec::resolved)
                .collect(),
            max_media_streams_per_session: spec.max_media_streams_per_session,
            sharing: spec.sharing.clone(),
        }
    }

    /// TTL in milliseconds.
    pub fn ttl_ms(&self) -> i64 {
        i64::from(self.ttl_seconds) * 1000
    }
}

/// Name reported for the policy used when no default policy is configured.
pub const BUILT_IN: &str = "built-in";

/// A policy that may apply, with the window in which it does.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Candidate {
    policy: EffectivePolicy,
    active_from: Option<DateTime<Utc>>,
    active_until: Option<DateTime<Utc>>,
}

impl Candidate {
    fn new(name: &str, spec: &PolicySpec) -> Self {
        Self {
            policy: EffectivePolicy::from_spec(name, spec),
            active_from: spec.active_from,
            active_until: spec.active_until,
        }
    }

    fn active_at(&self, now: DateTime<Utc>) -> bool {
        self.active_from.is_none_or(|from| now >= from)
            && self.active_until.is_none_or(|until| now < until)
    }
}

/// All policies of one namespace, resolved per account and per instant (policies may carry an
/// `activeFrom` / `activeUntil` window).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySet {
    /// Default policies (no accounts), first by name first.
    defaults: Vec<Candidate>,
    /// Account -> the overrides naming it, the one that wins first (lowest limit, then name).
    overrides: BTreeMap<String, Vec<Candidate>>,
    built_in: EffectivePolicy,
    policies: Vec<NamedPolicy>,
    /// The ViewerAuthentication in force, if the file has one (the first by name).
    viewer_auth: Option<viewer_auth::ViewerAuth>,
}

impl Default for PolicySet {
    /// The built-in default: limit 3, TTL 90 s, heartbeat 30 s, RejectNew, Open, Enforce.
    fn default() -> Self {
        Self::from_policies(Vec::new())
    }
}

impl PolicySet {
    /// Builds the set from validated policies.
    ///
    /// Several default policies in force: the first by name wins, so the choice does not depend
    /// on file order. An account named by several overrides in force gets the one with the
    /// lowest limit (then the first by name), the rule the operator also reports in status.
    pub fn from_policies(mut policies: Vec<NamedPolicy>) -> Self {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        let defaults = policies
            .iter()
            .filter(|p| p.spec.accounts.is_empty())
            .map(|p| Candidate::new(&p.name, &p.spec))
            .collect();
        let mut overrides: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
        for policy in policies.iter().filter(|p| !p.spec.accounts.is_empty()) {
            for account in &policy.spec.accounts {
                overrides
                    .entry(account.clone())
                    .or_default()
                    .push(Candidate::new(&policy.name, &policy.spec));
            }
        }
        for candidates in overrides.values_mut() {
            // Stable: equal limits keep name order.
            candidates.sort_by_key(|c| c.policy.limit);
            candidates.dedup_by(|a, b| a.policy.source == b.policy.source);
        }
        Self {
            defaults,
            overrides,
            built_in: EffectivePolicy::from_spec(BUILT_IN, &PolicySpec::default()),
            policies,
            viewer_auth: None,
        }
    }

    /// The same policies with `auth` as the ViewerAuthentication in force.
    pub fn with_viewer_auth(mut self, auth: Option<viewer_auth::ViewerAuth>) -> Self {
        self.viewer_auth = auth;
        self
    }

    /// The ViewerAuthentication in force, if any.
    pub fn viewer_auth(&self) -> Option<&viewer_auth::ViewerAuth> {
        self.viewer_auth.as_ref()
    }

    /// The policy for `account` at `now` when a verified token claims a stream limit:
    /// an account override in force wins; else the claimed limit (already capped by
    /// `maxClaimedLimit`) on top of the default policy; else the default policy.
    pub fn resolve_claimed_at(
        &self,
        account: &str,
        claimed_limit: Option<u32>,
        now: DateTime<Utc>,
    ) -> EffectivePolicy {
        let overridden = self
            .overrides
            .get(account)
            .and_then(|candidates| candidates.iter().find(|c| c.active_at(now)));
        match (overridden, claimed_limit) {
            (Some(c), _) => c.policy.clone(),
            (None, Some(limit)) => {
                let mut policy = self.default_policy_at(now).clone();
                policy.limit = limit.clamp(MIN_STREAMS, MAX_STREAMS);
                policy.source = format!("{} (token claim)", policy.source);
                policy
            }
            (None, None) => self.default_policy_at(now).clone(),
        }
    }

    /// The policy that applies to `account` now.
    pub fn resolve(&self, account: &str) -> &EffectivePolicy {
        self.resolve_at(account, Utc::now())
    }

    /// The policy that applies to `account` at `now`: the winning override in force, else the
    /// default policy in force, else the built-in default.
    pub fn resolve_at(&self, account: &str, now: DateTime<Utc>) -> &EffectivePolicy {
        self.overrides
            .get(account)
            .and_then(|candidates| candidates.iter().find(|c| c.active_at(now)))
            .map(|c| &c.policy)
            .unwrap_or_else(|| self.default_policy_at(now))
    }

    /// The namespace's default policy now.
    pub fn default_policy(&self) -> &EffectivePolicy {
        self.default_policy_at(Utc::now())
    }

    /// The namespace's default policy at `now`.
    pub fn default_policy_at(&self, now: DateTime<Utc>) -> &EffectivePolicy {
        self.defaults
            .iter()
            .find(|c| c.active_at(now))
            .map(|c| &c.policy)
            .unwrap_or(&self.built_in)
    }

    /// The first instant after `now` at which some policy's window opens or closes.
    pub fn next_boundary_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.policies
            .iter()
            .filter_map(|p| p.spec.next_boundary_after(now))
            .min()
    }

    /// The policies this set was built from, sorted by name.
    pub fn policies(&self) -> &[NamedPolicy] {
        &self.policies
    }

    /// Parses and validates a policy file's text. `path` only names the source in errors.
    /// Documents of another namespace than `namespace` are skipped; documents without a
    /// namespace apply.
    pub fn from_yaml(text: &str, path: &str, namespace: &str) -> Result<Self, PolicyError> {
        let mut policies = Vec::new();
        let mut auths: Vec<viewer_auth::ViewerAuth> = Vec::new();
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let number = index + 1;
            let value =
                serde_yaml::Value::deserialize(document).map_err(|e| PolicyError::Parse {
                    path: path.to_string(),
                    document: number,
                    message: e.to_string(),
                })?;
            // `---` at the end of a file, or a file of comments only, yields an empty document.
            if value.is_null() {
                continue;
            }
            if value.get("kind").and_then(|k| k.as_str()) == Some(viewer_auth::KIND) {
                if let Some(auth) = parse_viewer_auth(value, path, number, namespace)? {
                    auths.push(auth);
                }
                continue;
            }
            let doc: PolicyDocument = deserialize_strict(value, path, number)?;
            let invalid = |error: FieldError| PolicyError::Invalid {
                path: path.to_string(),
                document: number,
                name: doc.metadata.name.clone(),
                error,
            };
            if doc.api_version != API_VERSION {
                return Err(invalid(FieldError {
                    field: "apiVersion".into(),
                    message: format!("must be {API_VERSION}, got {:?}", doc.api_version),
                }));
            }
            if doc.kind != KIND {
                return Err(invalid(FieldError {
                    field: "kind".into(),
                    message: format!("must be {KIND}, got {:?}", doc.kind),
                }));
            }
            if doc.metadata.name.is_empty() {
                return Err(invalid(FieldError {
                    field: "metadata.name".into(),
                    message: "is required".into(),
                }));
            }
            doc.spec.validate().map_err(invalid)?;
            if doc
                .metadata
                .namespace
                .as_deref()
                .is_some_and(|ns| ns != namespace)
            {
                continue;
            }
            policies.push(NamedPolicy {
                name: doc.metadata.name,
                spec: doc.spec,
            });
        }
        auths.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self::from_policies(policies).with_viewer_auth(auths.into_iter().next()))
    }

    /// Reads and parses a policy file.
    pub fn load(path: &Path, namespace: &str) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string(), namespace)
    }
}

/// One ViewerAuthentication document of a policy file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewerAuthDocument {
    /// Must be `streamgate.dev/v1alpha1`.
    pub api_version: String,
    /// Must be `ViewerAuthentication`.
    pub kind: String,
    /// Name and namespace.
    #[serde(default)]
    pub metadata: PolicyMetadata,
    /// The spec.
    #[serde(default)]
    pub spec: viewer_auth::ViewerAuthenticationSpec,
    /// Written by the operator only: the JWKS of each of `spec.jwtRules`, in order, as it
    /// resolved them (Secret read, `jwksUri` fetched; [`viewer_auth::EMPTY_JWKS`] when it could
    /// not). Present: the sidecar uses these and fetches nothing. Absent (a hand-written file):
    /// the sidecar fetches `jwksUri` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_jwks: Option<Vec<String>>,
}

/// Deserializes document `number` of `path`, naming the field of a type error and refusing
/// unknown `spec` fields. serde_path_to_error names the field (`spec.onLimitExceeded`) that serde
/// alone omits; serde_ignored finds misspelt spec fields, which would otherwise be silently
/// dropped (specs are not `deny_unknown_fields`: the CRDs embed them with `flatten`).
fn deserialize_strict<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
    path: &str,
    number: usize,
) -> Result<T, PolicyError> {
    let mut unknown = Vec::new();
    let mut note_unknown = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let ignoring = serde_ignored::Deserializer::new(value, &mut note_unknown);
    let doc = serde_path_to_error::deserialize(ignoring).map_err(|e| PolicyError::Parse {
        path: path.to_string(),
        document: number,
        message: match e.path().to_string().as_str() {
            "." => e.inner().to_string(),
            field => format!("{field}: {}", e.inner()),
        },
    })?;
    if let Some(field) = unknown.iter().find(|p| p.starts_with("spec.")) {
        return Err(PolicyError::Parse {
            path: path.to_string(),
            document: number,
            message: format!("{field}: unknown field"),
        });
    }
    Ok(doc)
}

/// Parses and validates one ViewerAuthentication document; `None` when it is another
/// namespace's.
fn parse_viewer_auth(
    value: serde_yaml::Value,
    path: &str,
    number: usize,
    namespace: &str,
) -> Result<Option<viewer_auth::ViewerAuth>, PolicyError> {
    let doc: ViewerAuthDocument = deserialize_strict(value, path, number)?;
    let invalid = |error: FieldError| PolicyError::Invalid {
        path: path.to_string(),
        document: number,
        name: doc.metadata.name.clone(),
        error,
    };
    if doc.api_version != API_VERSION {
        return Err(invalid(FieldError {
            field: "apiVersion".into(),
            message: format!("must be {API_VERSION}, got {:?}", doc.api_version),
        }));
    }
    if doc.metadata.name.is_empty() {
        return Err(invalid(FieldError {
            field: "metadata.name".into(),
            message: "is required".into(),
        }));
    }
    doc.spec.validate().map_err(invalid)?;
    if let Some(resolved) = &doc.resolved_jwks {
        if resolved.len() != doc.spec.jwt_rules.len() {
            return Err(invalid(FieldError {
                field: "resolvedJwks".into(),
                message: format!(
                    "must have one entry per rule ({}), got {}",
                    doc.spec.jwt_rules.len(),
                    resolved.len()
                ),
            }));
        }
        for (i, jwks) in resolved.iter().enumerate() {
            viewer_auth::key_ids(jwks).map_err(|message| {
                invalid(FieldError {
                    field: format!("resolvedJwks[{i}]"),
                    message,
                })
            })?;
        }
    }
    if doc
        .metadata
        .namespace
        .as_deref()
        .is_some_and(|ns| ns != namespace)
    {
        return Ok(None);
    }
    Ok(Some(viewer_auth::ViewerAuth {
        name: doc.metadata.name,
        spec: doc.spec,
        resolved_jwks: doc.resolved_jwks,
    }))
}

/// Renders a ViewerAuthentication document, for appending to a rendered policy file.
pub fn render_viewer_auth(document: &ViewerAuthDocument) -> Result<String, serde_yaml::Error> {
    Ok(format!("---\n{}", serde_yaml::to_string(document)?))
}

/// Renders policies as a policy file: the format the operator writes into its ConfigMap.
pub fn render_policy_file(documents: &[PolicyDocument]) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for doc in documents {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(doc)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_AND_VIP: &str = r#"
apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata: {name: default}
spec: {maxStreamsPerAccount: 3}
---
apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata: {name: vip}
spec:
  maxStreamsPerAccount: 10
  onLimitExceeded: EvictOldest
  accounts: [vip-1, vip-2]
---
apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata: {name: restricted}
spec:
  maxStreamsPerAccount: 1
  accounts: [vip-2]
"#;

    #[test]
    fn resolves_default_and_overrides_with_lowest_limit_winning() {
        let set = PolicySet::from_yaml(DEFAULT_AND_VIP, "p.yaml", "default").unwrap();
        assert_eq!(set.resolve("someone").source, "default");
        assert_eq!(set.resolve("someone").limit, 3);
        let vip = set.resolve("vip-1");
        assert_eq!(
            (vip.source.as_str(), vip.limit, vip.on_limit_exceeded),
            ("vip", 10, OnLimitExceeded::EvictOldest)
        );
        assert_eq!(set.resolve("vip-2").source, "restricted");
        assert_eq!(set.resolve("vip-2").limit, 1);
    }

    #[test]
    fn an_override_beats_a_token_claim_which_beats_the_namespace_default() {
        let set = PolicySet::from_yaml(DEFAULT_AND_VIP, "p.yaml", "default").unwrap();
        let now = Utc::now();
        // Override wins over the claim.
        let vip = set.resolve_claimed_at("vip-1", Some(2), now);
        assert_eq!((vip.source.as_str(), vip.limit), ("vip", 10));
        // No override: the claim sets the limit on top of the default policy.
        let claimed = set.resolve_claimed_at("someone", Some(7), now);
        assert_eq!(claimed.limit, 7);
        assert_eq!(claimed.ttl_seconds, 90);
        assert!(claimed.source.starts_with("default"), "{}", claimed.source);
        // No claim: the namespace default.
        assert_eq!(set.resolve_claimed_at("someone", None, now).limit, 3);
        assert_eq!(
            set.resolve_claimed_at("someone", None, now),
            *set.resolve("someone")
        );
    }

    #[test]
    fn a_viewer_authentication_document_is_read_with_the_policies() {
        let text = format!(
            "{DEFAULT_AND_VIP}---\napiVersion: streamgate.dev/v1alpha1\nkind: ViewerAuthentication\nmetadata: {{name: viewers}}\nspec:\n  jwtRules:\n  - issuer: https://id.example\n    jwks: '{{\"keys\":[]}}'\n  claims: {{limit: climit}}\n"
        );
        let set = PolicySet::from_yaml(&text, "p.yaml", "default").unwrap();
        let auth = set.viewer_auth().expect("read");
        assert_eq!(auth.name, "viewers");
        assert_eq!(auth.spec.mode, viewer_auth::AuthMode::Required);
        assert_eq!(auth.spec.claims.account, "sub");
        assert_eq!(set.resolve("vip-1").limit, 10);
        // A broken one names the field; an unknown field is refused.
        let bad = text.replace(
            "https://id.example",
            "https://id.example\n    algorithms: [none]",
        );
        let e = PolicySet::from_yaml(&bad, "p.yaml", "default")
            .unwrap_err()
            .to_string();
        assert!(e.contains("algorithms") && e.contains("document 4"), "{e}");
        let bad = text.replace(
            "claims: {limit: climit}",
            "claims: {limit: climit}\n  issuers: []",
        );
        let e = PolicySet::from_yaml(&bad, "p.yaml", "default")
            .unwrap_err()
            .to_string();
        assert!(e.contains("spec.issuers: unknown field"), "{e}");
        let bad = text.replace("jwks: '{\"keys\":[]}'", "jwksUri: http://id.example/keys");
        let e = PolicySet::from_yaml(&bad, "p.yaml", "default")
            .unwrap_err()
            .to_string();
        assert!(e.contains("spec.jwtRules[0].jwksUri"), "{e}");
    }

    #[test]
    fn the_viewer_authentication_example_is_valid() {
        let text = include_str!("../../examples/viewerauthentication.yaml");
        let set = PolicySet::from_yaml(text, "example", "media").unwrap();
        let auth = set.viewer_auth().expect("read");
        assert_eq!(auth.spec.jwt_rules.len(), 1);
        assert_eq!(auth.spec.claims.tiers["family"], 4);
    }

    #[test]
    fn spec_defaults_match_the_contract() {
        let set = PolicySet::from_yaml(
            "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {name: d}\n",
            "p.yaml",
            "default",
        )
        .unwrap();
        let p = set.resolve("a");
        assert_eq!(p.limit, 3);
        assert_eq!(p.ttl_seconds, 90);
        assert_eq!(p.heartbeat_interval_seconds, 30);
        assert_eq!(p.on_limit_exceeded, OnLimitExceeded::RejectNew);
        assert_eq!(p.failure_policy, FailurePolicy::Open);
        assert_eq!(p.mode, Mode::Enforce);
    }

    #[test]
    fn no_default_policy_falls_back_to_built_in() {
        let set = PolicySet::from_yaml("", "p.yaml", "default").unwrap();
        assert_eq!(set.resolve("a").source, BUILT_IN);
        assert_eq!(set.resolve("a").limit, 3);
    }

    #[test]
    fn other_namespaces_are_ignored() {
        let text = "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {name: d, namespace: other}\nspec: {maxStreamsPerAccount: 7}\n";
        let set = PolicySet::from_yaml(text, "p.yaml", "default").unwrap();
        assert_eq!(set.resolve("a").source, BUILT_IN);
        let set = PolicySet::from_yaml(text, "p.yaml", "other").unwrap();
        assert_eq!(set.resolve("a").limit, 7);
    }

    #[test]
    fn allowed_origins_are_read_from_the_default_policy_and_checked() {
        let text = "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {name: d}\nspec: {allowedOrigins: ['https://player.example.com', 'http://127.0.0.1:8081']}\n";
        let set = PolicySet::from_yaml(text, "p.yaml", "default").unwrap();
        assert_eq!(
            set.default_policy().allowed_origins,
            ["https://player.example.com", "http://127.0.0.1:8081"]
        );
        assert!(
            PolicySet::default()
                .default_policy()
                .allowed_origins
                .is_empty()
        );
        for (spec, field) in [
            (
                "{allowedOrigins: ['https://player.example.com/']}",
                "spec.allowedOrigins[0]",
            ),
            (
                "{allowedOrigins: ['*', 'player.example.com']}",
                "spec.allowedOrigins[1]",
            ),
            ("{allowedOrigins: ['ftp://x']}", "spec.allowedOrigins[0]"),
            (
                "{accounts: [a], allowedOrigins: ['https://p.example.com']}",
                "spec.allowedOrigins",
            ),
        ] {
            let e = error_of(spec);
            assert!(e.contains(field), "{spec}: {e}");
        }
    }

    #[test]
    fn origins_are_scheme_host_and_port() {
        for good in [
            "*",
            "https://player.example.com",
            "http://127.0.0.1:8081",
            "http://[::1]:3000",
        ] {
            assert_eq!(check_origin(good), Ok(()), "{good}");
        }
        for bad in [
            "player.example.com",
            "https://player.example.com/",
            "https://player.example.com/path",
            "ftp://example.com",
            "https://",
            "https://exa mple.com",
            "null",
        ] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }

    fn error_of(spec: &str) -> String {
        let text = format!(
            "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {{name: ok}}\n---\napiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {{name: bad}}\nspec: {spec}\n"
        );
        PolicySet::from_yaml(&text, "policies.yaml", "default")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let e = error_of("{maxStreamsPerAccount: 0}");
        assert!(e.contains("policies.yaml"), "{e}");
        assert!(e.contains("document 2"), "{e}");
        assert!(e.contains("spec.maxStreamsPerAccount"), "{e}");

        let e = error_of("{sessionTTLSeconds: 50, heartbeatIntervalSeconds: 30}");
        assert!(e.contains("spec.sessionTTLSeconds"), "{e}");
        assert!(e.contains("twice"), "{e}");

        let e = error_of("{onLimitExceeded: DropAll}");
        assert!(e.contains("document 2"), "{e}");
        assert!(e.contains("DropAll"), "{e}");
        assert!(e.contains("onLimitExceeded"), "{e}");

        let e = error_of("{maxStreams: 4}");
        assert!(e.contains("spec.maxStreams: unknown field"), "{e}");

        let e = error_of("{accounts: [\"has space\"]}");
        assert!(e.contains("spec.accounts[0]"), "{e}");
    }

    const WINDOWED: &str = r#"
apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata: {name: default}
spec: {maxStreamsPerAccount: 3}
---
apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata: {name: weekend}
spec:
  maxStreamsPerAccount: 5
  accounts: [x]
  activeFrom: "2030-01-05T00:00:00Z"
  activeUntil: "2030-01-06T23:00:00+00:00"
---
apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata: {name: a-holiday}
spec:
  maxStreamsPerAccount: 1
  activeUntil: "2030-01-01T00:00:00Z"
"#;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().into()
    }

    #[test]
    fn windows_apply_from_included_to_until_excluded() {
        let set = PolicySet::from_yaml(WINDOWED, "p.yaml", "default").unwrap();
        // Until the holiday default expires it wins (first by name among the defaults in force).
        assert_eq!(set.resolve_at("y", at("2029-12-31T23:59:59Z")).limit, 1);
        assert_eq!(set.resolve_at("y", at("2030-01-01T00:00:00Z")).limit, 3);
        assert_eq!(set.resolve_at("x", at("2030-01-04T23:59:59Z")).limit, 3);
        assert_eq!(set.resolve_at("x", at("2030-01-05T00:00:00Z")).limit, 5);
        assert_eq!(set.resolve_at("x", at("2030-01-06T22:59:59Z")).limit, 5);
        assert_eq!(set.resolve_at("x", at("2030-01-06T23:00:00Z")).limit, 3);
        assert_eq!(
            set.next_boundary_after(at("2030-01-02T00:00:00Z")),
            Some(at("2030-01-05T00:00:00Z"))
        );
        assert_eq!(set.next_boundary_after(at("2030-01-07T00:00:00Z")), None);
    }

    #[test]
    fn window_state_names_the_boundary() {
        let set = PolicySet::from_yaml(WINDOWED, "p.yaml", "default").unwrap();
        let weekend = &set
            .policies()
            .iter()
            .find(|p| p.name == "weekend")
            .unwrap()
            .spec;
        let from = at("2030-01-05T00:00:00Z");
        let until = at("2030-01-06T23:00:00Z");
        assert_eq!(
            weekend.window_at(at("2030-01-01T00:00:00Z")),
            Window::Scheduled(from)
        );
        assert_eq!(weekend.window_at(from), Window::Active);
        assert_eq!(weekend.window_at(until), Window::Expired(until));
    }

    #[test]
    fn an_empty_or_reversed_window_is_refused() {
        let e = error_of(
            "{activeFrom: \"2030-01-02T00:00:00Z\", activeUntil: \"2030-01-01T00:00:00Z\"}",
        );
        assert!(e.contains("spec.activeUntil"), "{e}");
        assert!(e.contains("later than activeFrom"), "{e}");
        let e = error_of(
            "{activeFrom: \"2030-01-01T00:00:00Z\", activeUntil: \"2030-01-01T00:00:00Z\"}",
        );
        assert!(e.contains("spec.activeUntil"), "{e}");
        let e = error_of("{activeUntil: \"next sunday\"}");
        assert!(e.contains("activeUntil"), "{e}");
    }

    #[test]
    fn wrong_kind_is_refused() {
        let e = PolicySet::from_yaml(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
            "p.yaml",
            "default",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("apiVersion"), "{e}");
    }

    #[test]
    fn rendered_file_parses_back() {
        let set = PolicySet::from_yaml(DEFAULT_AND_VIP, "p.yaml", "default").unwrap();
        let docs: Vec<PolicyDocument> = set
            .policies()
            .iter()
            .map(|p| PolicyDocument {
                api_version: API_VERSION.into(),
                kind: KIND.into(),
                metadata: PolicyMetadata {
                    name: p.name.clone(),
                    namespace: None,
                },
                spec: p.spec.clone(),
            })
            .collect();
        let text = render_policy_file(&docs).unwrap();
        assert_eq!(PolicySet::from_yaml(&text, "r", "default").unwrap(), set);
    }
}
