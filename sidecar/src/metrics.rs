//! Prometheus metrics of the sidecar.

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

/// Label of per-operation counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    /// Store operation, e.g. `open`.
    pub operation: String,
}

/// Labels of the HTTP request histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// HTTP method.
    pub method: String,
    /// Route template, e.g. `/v1/sessions/{sessionId}`; `unmatched` for unknown paths.
    pub route: String,
    /// Status code.
    pub status: u16,
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
    /// Store operations that failed.
    pub store_errors: Family<OperationLabel, Counter>,
    /// Sessions admitted without the store under failurePolicy Open.
    pub failed_open: Counter,
    /// Active sessions in the store (set when scraped).
    pub active_sessions: Gauge,
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
}

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
            "Sessions cut by this sidecar, by reason (evicted, kicked, expired)",
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
        let store_errors = Family::<OperationLabel, Counter>::default();
        registry.register(
            "store_errors",
            "Session store operations that failed",
            store_errors.clone(),
        );
        let failed_open = Counter::default();
        registry.register(
            "failed_open_admissions",
            "Sessions admitted without the store because it was unreachable (failurePolicy Open)",
            failed_open.clone(),
        );
        let active_sessions = Gauge::default();
        registry.register(
            "active_sessions",
            "Active sessions in the session store",
            active_sessions.clone(),
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
        Self {
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
            failed_open,
            active_sessions,
            policy_reloads,
            http_requests,
        }
    }

    /// Counts a session cut for `reason`.
    pub fn count_revoked(&self, reason: EndReason, n: usize) {
        self.revoked
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().into(),
            })
            .inc_by(n as u64);
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
    pub fn count_store_error(&self, operation: &str) {
        self.store_errors
            .get_or_create(&OperationLabel {
                operation: operation.into(),
            })
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
