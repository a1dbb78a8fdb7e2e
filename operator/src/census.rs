//! The census of opted-in pods that run without the sidecar.
//!
//! The webhook's `failurePolicy: Ignore` lets pods start unprotected while the operator is down
//! or unreachable. The operator watches pod metadata (never specs) and counts, per namespace,
//! the running pods that asked for injection but carry no `streamgate.dev/injected` annotation,
//! as the gauge `streamgate_operator_pods_without_sidecar`, so an alert can catch them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use crate::inject::{DISABLED, ENABLED, annotations};
use crate::metrics::Metrics;

/// Label that keeps a pod away from the webhook (the webhook configuration's object selector).
pub const CONTROL_PLANE_LABEL: &str = "streamgate.dev/control-plane";
/// How often the gauges are recomputed from the caches.
pub const RECOUNT_INTERVAL: Duration = Duration::from_secs(1);

/// Whether `pod` asked for the sidecar and runs without it. `namespace_opted_in`: its
/// namespace carries `streamgate.dev/inject=enabled`. The rule mirrors [`crate::inject::plan`].
pub fn lacks_sidecar(
    pod: &PartialObjectMeta<Pod>,
    namespace_opted_in: bool,
    excluded: &BTreeSet<String>,
) -> bool {
    if pod.metadata.deletion_timestamp.is_some()
        || pod.namespace().is_none_or(|ns| excluded.contains(&ns))
        || pod.labels().contains_key(CONTROL_PLANE_LABEL)
        || pod.annotations().contains_key(annotations::INJECTED)
    {
        return false;
    }
    match pod
        .annotations()
        .get(annotations::INJECT)
        .map(String::as_str)
    {
        Some(ENABLED) => true,
        Some(DISABLED) => false,
        // An invalid value is refused by the webhook; if the pod exists, the webhook did not run.
        Some(_) => true,
        None => namespace_opted_in,
    }
}

/// Counts, per namespace, the pods that [`lacks_sidecar`].
pub fn count_without_sidecar<'a>(
    pods: impl IntoIterator<Item = &'a PartialObjectMeta<Pod>>,
    opted_in_namespaces: &BTreeSet<String>,
    excluded: &BTreeSet<String>,
) -> BTreeMap<String, i64> {
    let mut counts = BTreeMap::new();
    for pod in pods {
        let namespace = pod.namespace().unwrap_or_default();
        if lacks_sidecar(pod, opted_in_namespaces.contains(&namespace), excluded) {
            *counts.entry(namespace).or_insert(0) += 1;
        }
    }
    counts
}

/// Keeps the pods-without-sidecar gauges current until the task is dropped. `namespaces` is a
/// cache of the cluster's Namespaces (for their opt-in label); `excluded` are never injected.
pub async fn run(
    client: Client,
    namespaces: Store<Namespace>,
    excluded: BTreeSet<String>,
    metrics: Arc<Metrics>,
) {
    let (pods, writer) = reflector::store::<PartialObjectMeta<Pod>>();
    // Finished pods leave the watch (the API server reports them deleted from this selection).
    let config = watcher::Config::default().fields("status.phase!=Succeeded,status.phase!=Failed");
    let events = watcher(Api::<PartialObjectMeta<Pod>>::all(client), config)
        .default_backoff()
        .reflect(writer)
        .for_each(|event| async move {
            if let Err(error) = event {
                tracing::warn!(%error, "pod watch failed; retrying");
            }
        });
    let counting = async {
        // Both caches complete before the first count, or pods would be missed, not absent.
        if pods.wait_until_ready().await.is_err() || namespaces.wait_until_ready().await.is_err() {
            return;
        }
        // A recount each tick, rather than on every pod event: Namespace labels change without
        // a pod event, and a count over the cache costs little next to a watch event storm.
        let mut ticker = tokio::time::interval(RECOUNT_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let opted_in: BTreeSet<String> = namespaces
                .state()
                .iter()
                .filter(|ns| {
                    ns.labels().get(annotations::INJECT).map(String::as_str) == Some(ENABLED)
                })
                .map(|ns| ns.name_any())
                .collect();
            let all = pods.state();
            let counts =
                count_without_sidecar(all.iter().map(|p| p.as_ref()), &opted_in, &excluded);
            metrics.set_pods_without_sidecar(&counts);
        }
    };
    tokio::select! {
        () = events => {}
        () = counting => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(
        namespace: &str,
        annotations: &[(&str, &str)],
        labels: &[(&str, &str)],
    ) -> PartialObjectMeta<Pod> {
        let map = |pairs: &[(&str, &str)]| {
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some(namespace.into()),
                annotations: map(annotations),
                labels: map(labels),
                ..ObjectMeta::default()
            },
            _phantom: Default::default(),
        }
    }

    #[test]
    fn counts_opted_in_pods_without_the_injected_annotation() {
        let excluded = BTreeSet::from(["kube-system".to_string(), "streamgate-system".to_string()]);
        let opted_in = BTreeSet::from(["media".to_string(), "kube-system".to_string()]);
        let injected = (annotations::INJECTED, "0.1.0");
        let pods = [
            pod("media", &[], &[]),                                // counted
            pod("media", &[injected], &[]),                        // has the sidecar
            pod("media", &[(annotations::INJECT, DISABLED)], &[]), // opted out
            pod("other", &[(annotations::INJECT, ENABLED)], &[]),  // counted
            pod("other", &[], &[]),                                // never asked
            pod("kube-system", &[], &[]),                          // excluded
            pod("media", &[], &[(CONTROL_PLANE_LABEL, "true")]),   // webhook never sees it
        ];
        let counts = count_without_sidecar(pods.iter(), &opted_in, &excluded);
        assert_eq!(
            counts,
            BTreeMap::from([("media".to_string(), 1), ("other".to_string(), 1)])
        );
    }
}
