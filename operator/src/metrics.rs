//! Prometheus metrics of the operator.

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of the failure counter: the error's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// e.g. `KubeApi`, `Finalizer`.
    pub error: String,
}

/// Labels of the injection counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InjectionLabel {
    /// `injected`, `skipped` or `rejected`.
    pub decision: String,
    /// For `skipped`, the skip reason (`AlreadyInjected`, `OptedOut`, `NotOptedIn`, ...); for
    /// `rejected`, `InvalidAnnotation`; for `injected`, `Injected`.
    pub reason: String,
}

/// All metrics of one operator process.
pub struct Metrics {
    registry: Registry,
    /// Reconciliations started.
    pub reconciles: Counter,
    /// Reconciliations that failed, by error name.
    pub failures: Family<ErrorLabel, Counter>,
    /// How long reconciliations take.
    pub duration: Histogram,
    /// 1 while this process holds the leader Lease.
    pub leader: Gauge,
    /// Injection webhook decisions, by decision and reason.
    pub injections: Family<InjectionLabel, Counter>,
    /// Expiry of the webhook's serving certificate, Unix seconds (0 until one is loaded).
    pub webhook_cert_expiry: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `streamgate_operator_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("streamgate_operator");
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciliations started", reconciles.clone());
        let failures = Family::<ErrorLabel, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Reconciliations that failed, by error",
            failures.clone(),
        );
        // 1 ms .. ~16 s
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciliations",
            duration.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this process holds the leader Lease",
            leader.clone(),
        );
        let injections = Family::<InjectionLabel, Counter>::default();
        registry.register(
            "injections",
            "Sidecar injection webhook decisions, by decision and reason",
            injections.clone(),
        );
        let webhook_cert_expiry = Gauge::default();
        registry.register(
            "webhook_certificate_expiry_timestamp_seconds",
            "When the webhook's serving certificate expires (Unix seconds)",
            webhook_cert_expiry.clone(),
        );
        Self {
            registry,
            injections,
            webhook_cert_expiry,
            reconciles,
            failures,
            duration,
            leader,
        }
    }

    /// Counts a failed reconciliation.
    pub fn count_failure(&self, error: &str) {
        self.failures
            .get_or_create(&ErrorLabel {
                error: error.to_string(),
            })
            .inc();
    }

    /// Counts one injection decision.
    pub fn count_injection(&self, decision: &str, reason: &str) {
        self.injections
            .get_or_create(&InjectionLabel {
                decision: decision.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// How many injection decisions with these labels were counted.
    pub fn injection_count(&self, decision: &str, reason: &str) -> u64 {
        self.injections
            .get_or_create(&InjectionLabel {
                decision: decision.to_string(),
                reason: reason.to_string(),
            })
            .get()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
