//! Prometheus metrics of the sidecar.
//!
//! Every label value comes from a fixed set (HTTP methods folded into GET, PUT, DELETE, HEAD,
//! POST and OTHER; route templates; status codes; the engine's operations and reasons), so no
//! request can create a new series: the number of series is bounded by the code, not by traffic.

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::admission::OverLimit;
use crate::session::EndReason;

/// Label of the revocation counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `evicted`, `kicked` or `expired`.
    pub reason: String,
}

/// Label of the dry-run counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WouldLabel {
    /// `refuse` or `evict`.
    pub would: String,
}

/// Labels of the store error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreErrorLabels {
    /// Store operation, e.g. `open` (a fixed set: `engine::Operation`).
    pub operation: &'static str,
    /// `transient` (failurePolicy applies), `fatal` (500, never admits) or `capacity`.
    pub kind: &'static str,
}

/// Labels of the HTTP request histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// HTTP method, folded by [`method_label`].
    pub method: &'static str,
    /// Route template, e.g. `/v1/sessions/{sessionId}`; `proxy` for media requests,
    /// `unmatched` for unknown paths.
    pub route: String,
    /// Status code.
    pub status: u16,
}

/// The label value of an HTTP method: one of a fixed set, whatever the client sent.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        _ => "OTHER",
    }
}

/// Labels of the live-session gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActiveLabels {
    /// The policy in force for the counted accounts; empty where the store is not broken down
    /// by policy (the embedded store).
    pub policy: String,
    /// `memory` (this sidecar's own sessions) or `redis` (the whole shared store, counted in the
    /// background: every sidecar on that store reports the same figures).
    pub store: String,
}

/// Label of the policy reload counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `success` or `error`.
    pub result: String,
}

/// All metrics of one sidecar.
pub struct Metrics {
    registry: Registry,
    /// New sessions admitted.
    pub admitted: Counter,
    /// New sessions refused over the limit.
    pub refused: Counter,
    /// Sessions cut, by reason, as decided by this sidecar.
    pub revoked: Family<ReasonLabel, Counter>,
    /// Sessions ended by their player.
    pub ended: Counter,
    /// Heartbeats and reopens that renewed a session.
    pub renewed: Counter,
    /// DryRun decisions that enforcement would have made differently.
    pub dry_run: Family<WouldLabel, Counter>,
    /// Store operations that failed, by operation and kind.
    pub store_errors: Family<StoreErrorLabels, Counter>,
    /// New sessions refused because the embedded store was at its cap.
    pub capacity_refused: Counter,
    /// Media requests that renewed their session (implicit heartbeats).
    pub media_renewals: Counter,
    /// Degraded admissions written back to the store after an outage.
    pub degraded_restored: Counter,
    /// 1 while the revocation subscription is established (always 1 on the embedded store).
    pub revocations_subscribed: Gauge,
    /// Sessions admitted without the store under failurePolicy Open.
    pub failed_open: Counter,
    /// Active sessions in the store, by policy and store kind.
    pub active_sessions: Family<ActiveLabels, Gauge>,
    /// Policies with a shared-store count, so a policy that disappears loses its series.
    active_shared_policies: Mutex<Vec<String>>,
    /// Age of the shared-store count, seconds.
    pub active_sessions_age: Gauge<f64, AtomicU64>,
    /// Policy file reloads.
    pub policy_reloads: Family<ResultLabel, Counter>,
    /// HTTP request durations.
    pub http_requests: Family<HttpLabels, Histogram>,
    /// Proxy mode: media requests forwarded upstream.
    pub proxied: Counter,
    /// Proxy mode: media requests refused (no, unknown or cut session; upstream down).
    pub proxy_refused: Counter,
    /// Proxy mode: responses in flight cut because their session was, by reason and dry run.
    pub streams_cut: Family<CutLabels, Counter>,
    /// Session validator calls (retries included), by validator and result.
    pub validations: Family<ValidationLabels, Counter>,
    /// Duration of validator calls (retries included), by validator.
    pub validation_seconds: Family<ValidatorLabel, Histogram>,
    /// Time from admission to the first verdict, by result.
    pub validation_verdict_seconds: Family<ResultLabel, Histogram>,
    /// Validator names seen, bounding the `validator` label's values.
    validator_names: Mutex<Vec<String>>,
    /// Playback tokens, one session one stream, sharing detection.
    pub playback: PlaybackMetrics,
}

/// Label of the playback token refusal counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenRefusalLabel {
    /// `missing`, `session_id_not_accepted`, or a [`crate::playback::TokenError`] label.
    pub reason: &'static str,
}

/// Label of the sharing detection counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SharingLabel {
    /// `revoke` or `report`.
    pub action: &'static str,
}

/// Label of the one-session-one-stream refusal counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DryRunLabel {
    /// `true` when the policy is DryRun and the stream was let through.
    pub dry_run: &'static str,
}

/// Metrics of playback tokens and of the media rules they enable. Every label set is fixed.
#[derive(Clone, Default)]
pub struct PlaybackMetrics {
    /// Tokens minted (open and heartbeat answers, rewritten playlists).
    pub tokens_issued: Counter,
    /// Media requests refused for their credential, by reason.
    pub token_refusals: Family<TokenRefusalLabel, Counter>,
    /// Long-lived media responses refused (or cut, their lapsed claim taken) because their
    /// session already had its streams, on this sidecar or another.
    pub media_streams_refused: Family<DryRunLabel, Counter>,
    /// Sessions seen from more networks than allowed, by action taken.
    pub sharing_detected: Family<SharingLabel, Counter>,
    /// Playlists rewritten with the token.
    pub playlists_rewritten: Counter,
}

impl PlaybackMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "playback_tokens_issued",
            "Playback tokens minted (open and heartbeat answers, media answers, rewritten playlists)",
            metrics.tokens_issued.clone(),
        );
        registry.register(
            "playback_token_refusals",
            "Media requests refused for their credential, by reason",
            metrics.token_refusals.clone(),
        );
        registry.register(
            "media_streams_refused",
            "Long-lived media responses refused, or cut when another stream took their lapsed claim, because their session already played its streams on any sidecar (maxMediaStreamsPerSession)",
            metrics.media_streams_refused.clone(),
        );
        registry.register(
            "sharing_detected",
            "Sessions used from more client networks than sharing.maxNetworks within the window, by action",
            metrics.sharing_detected.clone(),
        );
        registry.register(
            "playlists_rewritten",
            "HLS playlists rewritten with the playback token",
            metrics.playlists_rewritten.clone(),
        );
        // Every series exists from the start, so a rate over them is never absent.
        for reason in crate::playback::REFUSAL_REASONS {
            let _ = metrics
                .token_refusals
                .get_or_create(&TokenRefusalLabel { reason });
        }
        for dry_run in ["false", "true"] {
            let _ = metrics
                .media_streams_refused
                .get_or_create(&DryRunLabel { dry_run });
        }
        for action in ["revoke", "report"] {
            let _ = metrics
                .sharing_detected
                .get_or_create(&SharingLabel { action });
        }
        metrics
    }

    /// Counts a media request refused for its credential.
    pub fn count_token_refusal(&self, reason: &'static str) {
        self.token_refusals
            .get_or_create(&TokenRefusalLabel { reason })
            .inc();
    }
}

/// Labels of the validation counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ValidationLabels {
    /// The validator's name (policy-defined; at most [`MAX_VALIDATOR_LABELS`], then `other`).
    pub validator: String,
    /// `allowed`, `denied` or `failed`.
    pub result: String,
}

/// Label of the validator call histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ValidatorLabel {
    /// The validator's name, as in [`ValidationLabels`].
    pub validator: String,
}

/// Most distinct validator names used as label values; further names count as `other`.
pub const MAX_VALIDATOR_LABELS: usize = 32;

/// Labels of the stream-cut counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CutLabels {
    /// `evicted`, `kicked` or `expired`.
    pub reason: String,
    /// `true` when the policy is DryRun and the stream was left running.
    pub dry_run: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `streamgate_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("streamgate");
        let admitted = Counter::default();
        registry.register(
            "sessions_admitted",
            "New sessions admitted",
            admitted.clone(),
        );
        let refused = Counter::default();
        registry.register(
            "sessions_refused",
            "New sessions refused because the account was at its limit",
            refused.clone(),
        );
        let revoked = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "sessions_revoked",
            "Sessions cut by this sidecar, by reason (evicted, kicked, expired, denied)",
            revoked.clone(),
        );
        let ended = Counter::default();
        registry.register(
            "sessions_ended",
            "Sessions ended by the player",
            ended.clone(),
        );
        let renewed = Counter::default();
        registry.register(
            "sessions_renewed",
            "Heartbeats and reopens that renewed an active session",
            renewed.clone(),
        );
        let dry_run = Family::<WouldLabel, Counter>::default();
        registry.register(
            "dry_run_decisions",
            "DryRun admissions that enforcement would have refused or that would have evicted",
            dry_run.clone(),
        );
        let store_errors = Family::<StoreErrorLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Session store operations that failed, by operation and kind (transient, timeout, fatal, capacity)",
            store_errors.clone(),
        );
        let capacity_refused = Counter::default();
        registry.register(
            "sessions_capacity_refused",
            "New sessions refused because the embedded store held --max-sessions sessions",
            capacity_refused.clone(),
        );
        let media_renewals = Counter::default();
        registry.register(
            "media_renewals",
            "Media requests that renewed their session (implicit heartbeat)",
            media_renewals.clone(),
        );
        let degraded_restored = Counter::default();
        registry.register(
            "degraded_sessions_restored",
            "Sessions admitted without the store (failurePolicy Open) written back after the outage",
            degraded_restored.clone(),
        );
        let revocations_subscribed = Gauge::default();
        registry.register(
            "revocations_subscribed",
            "1 while this sidecar hears other sidecars' revocations (shared stores)",
            revocations_subscribed.clone(),
        );
        let failed_open = Counter::default();
        registry.register(
            "failed_open_admissions",
            "Sessions admitted without the store because it was unreachable (failurePolicy Open)",
            failed_open.clone(),
        );
        let active_sessions = Family::<ActiveLabels, Gauge>::default();
        registry.register(
            "active_sessions",
            "Active sessions in the session store, by policy; store=redis: the whole shared store, counted in the background",
            active_sessions.clone(),
        );
        let active_sessions_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "active_sessions_age_seconds",
            "Age of the shared store's active_sessions count (Redis only)",
            active_sessions_age.clone(),
        );
        let policy_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy file reloads, by result",
            policy_reloads.clone(),
        );
        let http_requests = Family::<HttpLabels, Histogram>::new_with_constructor(|| {
            // 50 µs .. ~1.6 s
            Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
        });
        registry.register(
            "http_request_duration_seconds",
            "Duration of HTTP requests to the session API",
            http_requests.clone(),
        );
        let proxied = Counter::default();
        registry.register(
            "proxy_requests_forwarded",
            "Media requests forwarded to the upstream",
            proxied.clone(),
        );
        let proxy_refused = Counter::default();
        registry.register(
            "proxy_requests_refused",
            "Media requests refused: no, unknown or cut session, or the upstream did not answer",
            proxy_refused.clone(),
        );
        let streams_cut = Family::<CutLabels, Counter>::default();
        registry.register(
            "streams_cut",
            "Responses in flight cut because their session was (dry_run=true: would have been)",
            streams_cut.clone(),
        );
        let validations = Family::<ValidationLabels, Counter>::default();
        registry.register(
            "validations",
            "Session validator calls, by validator and result (allowed, denied, failed)",
            validations.clone(),
        );
        let validation_seconds = Family::<ValidatorLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        registry.register(
            "validation_duration_seconds",
            "Duration of session validator calls, retries included",
            validation_seconds.clone(),
        );
        let validation_verdict_seconds =
            Family::<ResultLabel, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 14))
            });
        registry.register(
            "validation_verdict_seconds",
            "Time from a session's admission to its first validation verdict, by result",
            validation_verdict_seconds.clone(),
        );
        let playback = PlaybackMetrics::register(&mut registry);
        Self {
            validations,
            validation_seconds,
            validation_verdict_seconds,
            validator_names: Mutex::new(Vec::new()),
            playback,
            proxied,
            proxy_refused,
            streams_cut,
            registry,
            admitted,
            refused,
            revoked,
            ended,
            renewed,
            dry_run,
            store_errors,
            capacity_refused,
            media_renewals,
            degraded_restored,
            revocations_subscribed,
            failed_open,
            active_sessions,
            active_shared_policies: Mutex::new(Vec::new()),
            active_sessions_age,
            policy_reloads,
            http_requests,
        }
    }

    /// The label value of a validator's name: the name itself for the first
    /// [`MAX_VALIDATOR_LABELS`] names seen, `other` after that.
    fn validator_label(&self, name: &str) -> String {
        let mut names = self
            .validator_names
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if names.iter().any(|n| n == name) {
            return name.to_string();
        }
        if names.len() < MAX_VALIDATOR_LABELS {
            names.push(name.to_string());
            return name.to_string();
        }
        "other".to_string()
    }

    /// Counts a validator call and its duration.
    pub fn count_validation(&self, validator: &str, result: &str, took: Duration) {
        let validator = self.validator_label(validator);
        self.validations
            .get_or_create(&ValidationLabels {
                validator: validator.clone(),
                result: result.into(),
            })
            .inc();
        self.validation_seconds
            .get_or_create(&ValidatorLabel { validator })
            .observe(took.as_secs_f64());
    }

    /// Observes the time from a session's admission to its first verdict.
    pub fn observe_verdict_time(&self, result: &str, took: Duration) {
        self.validation_verdict_seconds
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts a session cut for `reason`.
    pub fn count_revoked(&self, reason: EndReason, n: usize) {
        self.revoked
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().into(),
            })
            .inc_by(n as u64);
    }

    /// Sets this sidecar's own live-session count (the embedded store).
    pub fn set_active_local(&self, n: u64) {
        self.active_sessions
            .get_or_create(&ActiveLabels {
                policy: String::new(),
                store: "memory".into(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets the shared store's live sessions by policy, dropping policies no longer counted.
    pub fn set_active_shared(&self, by_policy: &std::collections::BTreeMap<String, u64>) {
        let labels = |policy: &str| ActiveLabels {
            policy: policy.to_string(),
            store: "redis".into(),
        };
        let mut previous = self
            .active_shared_policies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for gone in previous.iter().filter(|p| !by_policy.contains_key(*p)) {
            self.active_sessions.remove(&labels(gone));
        }
        for (policy, n) in by_policy {
            self.active_sessions
                .get_or_create(&labels(policy))
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        *previous = by_policy.keys().cloned().collect();
    }

    /// Sets how old the shared store's count is.
    pub fn set_active_age(&self, age: Duration) {
        self.active_sessions_age.set(age.as_secs_f64());
    }

    /// Counts a DryRun decision.
    pub fn count_dry_run(&self, would: OverLimit) {
        let would = match would {
            OverLimit::Refuse => "refuse",
            OverLimit::Evict(_) => "evict",
        };
        self.dry_run
            .get_or_create(&WouldLabel {
                would: would.into(),
            })
            .inc();
    }

    /// Counts a failed store operation.
    pub fn count_store_error(&self, operation: &'static str, kind: &'static str) {
        self.store_errors
            .get_or_create(&StoreErrorLabels { operation, kind })
            .inc();
    }

    /// Counts responses cut (or, in DryRun, left running) for `reason`.
    pub fn count_stream_cut(&self, reason: EndReason, dry_run: bool, n: usize) {
        self.streams_cut
            .get_or_create(&CutLabels {
                reason: reason.as_str().into(),
                dry_run: dry_run.to_string(),
            })
            .inc_by(n as u64);
    }

    /// Counts proxied streams closed because the sidecar is shutting down (reason `shutdown`):
    /// their sessions are not cut, the player reconnects through another sidecar.
    pub fn count_streams_closed_by_shutdown(&self, n: usize) {
        self.streams_cut
            .get_or_create(&CutLabels {
                reason: "shutdown".into(),
                dry_run: "false".into(),
            })
            .inc_by(n as u64);
    }

    /// Counts a media request forwarded upstream.
    pub fn count_proxied(&self) {
        self.proxied.inc();
    }

    /// Counts a refused media request.
    pub fn count_proxy_refusal(&self) {
        self.proxy_refused.inc();
    }

    /// Counts a policy reload.
    pub fn count_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.policy_reloads
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
