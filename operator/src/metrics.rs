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

/// Label of the per-namespace metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabel {
    /// The namespace.
    pub namespace: String,
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
    /// Writes of the `streamgate-policies` ConfigMap, by namespace.
    pub configmap_applies: Family<NamespaceLabel, Counter>,
    /// Pods that opted in to injection but run without the sidecar, by namespace.
    pub pods_without_sidecar: Family<NamespaceLabel, Gauge>,
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
        let configmap_applies = Family::<NamespaceLabel, Counter>::default();
        registry.register(
            "configmap_applies",
            "Writes of the streamgate-policies ConfigMap, by namespace",
            configmap_applies.clone(),
        );
        let pods_without_sidecar = Family::<NamespaceLabel, Gauge>::default();
        registry.register(
            "pods_without_sidecar",
            "Pods that opted in to sidecar injection but run without the sidecar (e.g. created while the webhook was unreachable), by namespace",
            pods_without_sidecar.clone(),
        );
        Self {
            registry,
            configmap_applies,
            pods_without_sidecar,
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

    /// Counts one write of a namespace's policy ConfigMap.
    pub fn count_configmap_apply(&self, namespace: &str) {
        self.configmap_applies
            .get_or_create(&NamespaceLabel {
                namespace: namespace.to_string(),
            })
            .inc();
    }

    /// How many times the policy ConfigMap of `namespace` was written.
    pub fn configmap_apply_count(&self, namespace: &str) -> u64 {
        self.configmap_applies
            .get_or_create(&NamespaceLabel {
                namespace: namespace.to_string(),
            })
            .get()
    }

    /// Replaces the pods-without-sidecar gauges: namespaces absent from `counts` have none.
    pub fn set_pods_without_sidecar(&self, counts: &std::collections::BTreeMap<String, i64>) {
        self.pods_without_sidecar.clear();
        for (namespace, count) in counts {
            self.pods_without_sidecar
                .get_or_create(&NamespaceLabel {
                    namespace: namespace.clone(),
                })
                .set(*count);
        }
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
