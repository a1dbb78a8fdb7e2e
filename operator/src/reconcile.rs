//! The reconciler: renders the StreamingPolicies of a namespace into the `streamgate-policies`
//! ConfigMap its sidecars mount, and reports each policy's status.
//!
//! Any change to a policy, or to the ConfigMap (edited or deleted by hand), re-renders the whole
//! namespace: the file is one artefact of all its policies, and a change to one policy can change
//! another's status (overlapping overrides).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as K8sEvent, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalize, finalizer};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::crd::{PolicyCondition, StreamingPolicy, StreamingPolicyStatus};
use crate::metrics::Metrics;
use crate::render::{
    CONFIGMAP_NAME, POLICY_FILE_KEY, PolicyInput, Verdict, previous_specs, render,
};

/// Finalizer that lets a deleted policy leave the ConfigMap before it goes.
pub const FINALIZER: &str = "streamgate.dev/policy-rendering";
/// Field manager of everything the operator writes with server-side apply.
pub const FIELD_MANAGER: &str = "streamgate-operator";
/// Label on the ConfigMaps the operator manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "streamgate-operator";
/// How often a policy is reconciled with nothing changed, to repair drift no watch reported.
pub const RESYNC: Duration = Duration::from_secs(300);

/// Why a reconciliation failed. The variant name is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a request.
    #[error("Kubernetes API: {0}")]
    KubeApi(#[source] kube::Error),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// A StreamingPolicy without a namespace: cannot happen for a namespaced CRD.
    #[error("StreamingPolicy {0} has no namespace")]
    MissingNamespace(String),
}

impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        Self::KubeApi(error)
    }
}

impl Error {
    /// The name used as the `error` label of the failure metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::KubeApi(_) => "KubeApi",
            Error::Finalizer(_) => "Finalizer",
            Error::MissingNamespace(_) => "MissingNamespace",
        }
    }
}

/// What the reconciler needs.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Reconciles one policy, which re-renders its namespace.
pub async fn reconcile(policy: Arc<StreamingPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let namespace = policy
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(policy.name_any()))?;
    let api: Api<StreamingPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
    let (namespace, ctx) = (&namespace, &ctx);
    let result = finalizer(&api, FINALIZER, policy, |event| async move {
        match event {
            // On deletion the policy is still listed, with a deletion timestamp, and the
            // rendering leaves it out; the finalizer is removed once that is written.
            Finalize::Apply(_) | Finalize::Cleanup(_) => {
                sync_namespace(namespace, ctx).await?;
                Ok(Action::requeue(RESYNC))
            }
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    result
}

/// Retries a failed reconciliation with a short delay, and counts the failure.
pub fn error_policy(policy: Arc<StreamingPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.count_failure(error.metric_label());
    tracing::warn!(policy = %policy.name_any(), namespace = ?policy.namespace(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Renders every policy of `namespace` into its ConfigMap and updates their status.
pub async fn sync_namespace(namespace: &str, ctx: &Context) -> Result<(), Error> {
    let policies: Api<StreamingPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let listed = policies.list(&ListParams::default()).await?.items;
    let previous = config_maps
        .get_opt(CONFIGMAP_NAME)
        .await?
        .and_then(|cm| cm.data?.remove(POLICY_FILE_KEY))
        .map(|file| previous_specs(&file))
        .unwrap_or_default();
    let inputs: Vec<PolicyInput> = listed
        .iter()
        .map(|p| PolicyInput {
            name: p.name_any(),
            spec: p.spec.policy.clone(),
            deleting: p.meta().deletion_timestamp.is_some(),
        })
        .collect();
    let rendering = render(namespace, &inputs, &previous, chrono::Utc::now());

    let live: Vec<&StreamingPolicy> = listed
        .iter()
        .filter(|p| p.meta().deletion_timestamp.is_none())
        .collect();
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIGMAP_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY.to_string(),
            )])),
            // Owned by every policy (none is "the" controller), so a change to the ConfigMap
            // wakes the reconciler, and the ConfigMap goes when the last policy does.
            owner_references: Some(live.iter().map(|p| owner_reference(p)).collect()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            POLICY_FILE_KEY.to_string(),
            rendering.policy_file.clone(),
        )])),
        ..ConfigMap::default()
    };
    config_maps
        .patch(
            CONFIGMAP_NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&config_map),
        )
        .await?;

    for policy in live {
        let Some(verdict) = rendering.verdicts.get(&policy.name_any()) else {
            continue;
        };
        update_status(&policies, policy, verdict, ctx).await?;
    }
    Ok(())
}

fn owner_reference(policy: &StreamingPolicy) -> OwnerReference {
    OwnerReference {
        api_version: StreamingPolicy::api_version(&()).into_owned(),
        kind: StreamingPolicy::kind(&()).into_owned(),
        name: policy.name_any(),
        uid: policy.uid().unwrap_or_default(),
        controller: None,
        block_owner_deletion: None,
    }
}

/// The status `policy` should have for `verdict`. The transition time moves only when the
/// condition's status changes, as Kubernetes conventions ask.
pub fn desired_status(
    policy: &StreamingPolicy,
    verdict: &Verdict,
    now: &str,
) -> StreamingPolicyStatus {
    let generation = policy.meta().generation;
    let status = if verdict.ready { "True" } else { "False" };
    let previous = policy
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now.to_string(),
    };
    StreamingPolicyStatus {
        observed_generation: generation,
        conditions: vec![PolicyCondition {
            type_: "Ready".into(),
            status: status.into(),
            reason: verdict.reason.into(),
            message: verdict.message.clone(),
            last_transition_time,
            observed_generation: generation,
        }],
    }
}

async fn update_status(
    api: &Api<StreamingPolicy>,
    policy: &StreamingPolicy,
    verdict: &Verdict,
    ctx: &Context,
) -> Result<(), Error> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let desired = desired_status(policy, verdict, &now);
    if policy.status.as_ref() == Some(&desired) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": StreamingPolicy::api_version(&()),
        "kind": StreamingPolicy::kind(&()),
        "status": desired,
    });
    api.patch_status(
        &policy.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;

    let was = policy
        .status
        .as_ref()
        .and_then(|s| s.conditions.first())
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
    let is = desired
        .conditions
        .first()
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
    if was != is {
        let event = K8sEvent {
            type_: if verdict.ready {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: verdict.reason.into(),
            note: Some(truncate(&verdict.message, 1000)),
            action: "Render".into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
            // An event is a courtesy; failing to record one must not fail the reconcile.
            tracing::warn!(%error, "could not record an event");
        }
    }
    Ok(())
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::StreamingPolicySpec;
    use crate::render::reasons;

    fn policy(generation: i64, status: Option<StreamingPolicyStatus>) -> StreamingPolicy {
        let mut p = StreamingPolicy::new("p", StreamingPolicySpec::default());
        p.metadata.generation = Some(generation);
        p.status = status;
        p
    }

    #[test]
    fn status_reports_the_generation_and_keeps_the_transition_time() {
        let ready = Verdict {
            ready: true,
            reason: reasons::RENDERED,
            message: "ok".into(),
        };
        let first = desired_status(&policy(1, None), &ready, "t1");
        assert_eq!(first.observed_generation, Some(1));
        assert_eq!(first.conditions[0].status, "True");
        assert_eq!(first.conditions[0].last_transition_time, "t1");

        let same = desired_status(&policy(2, Some(first.clone())), &ready, "t2");
        assert_eq!(same.conditions[0].last_transition_time, "t1");
        assert_eq!(same.observed_generation, Some(2));

        let broken = Verdict {
            ready: false,
            reason: reasons::INVALID_SPEC,
            message: "bad".into(),
        };
        let flipped = desired_status(&policy(3, Some(same)), &broken, "t3");
        assert_eq!(flipped.conditions[0].status, "False");
        assert_eq!(flipped.conditions[0].last_transition_time, "t3");
    }

    /// The API server as a scripted mock: answers each expected request in turn.
    mod mock {
        use http::{Request, Response};
        use kube::client::Body;

        pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

        pub fn client() -> (kube::Client, Handle) {
            let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            (kube::Client::new(service, "default"), handle)
        }

        pub async fn expect(
            handle: &mut Handle,
            method: &str,
            path: &str,
            status: u16,
            body: serde_json::Value,
        ) {
            let (request, respond) = handle.next_request().await.expect("the API was called");
            assert_eq!(request.method().as_str(), method);
            assert_eq!(request.uri().path(), path);
            respond.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }

        pub fn status(code: u16, reason: &str) -> serde_json::Value {
            serde_json::json!({
                "apiVersion": "v1", "kind": "Status", "status": "Failure",
                "message": format!("mock {reason}"), "reason": reason, "code": code
            })
        }
    }

    fn test_context(client: kube::Client) -> Arc<Context> {
        Arc::new(Context {
            recorder: Recorder::new(
                client.clone(),
                kube::runtime::events::Reporter {
                    controller: "test".into(),
                    instance: None,
                },
            ),
            client,
            metrics: Arc::new(Metrics::new()),
        })
    }

    #[tokio::test]
    async fn a_refused_configmap_write_fails_the_reconcile_and_is_counted() {
        let (client, mut api) = mock::client();
        let ctx = test_context(client);
        let server = tokio::spawn(async move {
            let mut p = StreamingPolicy::new("default", StreamingPolicySpec::default());
            p.metadata.namespace = Some("media".into());
            p.metadata.uid = Some("u1".into());
            mock::expect(&mut api, "GET", "/apis/streamgate.dev/v1alpha1/namespaces/media/streamingpolicies", 200,
                serde_json::json!({"apiVersion": "streamgate.dev/v1alpha1", "kind": "StreamingPolicyList", "metadata": {}, "items": [p]})).await;
            mock::expect(
                &mut api,
                "GET",
                "/api/v1/namespaces/media/configmaps/streamgate-policies",
                404,
                mock::status(404, "NotFound"),
            )
            .await;
            mock::expect(
                &mut api,
                "PATCH",
                "/api/v1/namespaces/media/configmaps/streamgate-policies",
                403,
                mock::status(403, "Forbidden"),
            )
            .await;
        });
        let error = sync_namespace("media", &ctx).await.unwrap_err();
        server.await.unwrap();
        assert!(
            matches!(&error, Error::KubeApi(kube::Error::Api(s)) if s.code == 403),
            "{error:?}"
        );

        let policy = Arc::new(StreamingPolicy::new(
            "default",
            StreamingPolicySpec::default(),
        ));
        let action = error_policy(policy, &error, ctx.clone());
        assert_eq!(action, Action::requeue(Duration::from_secs(5)));
        assert!(
            ctx.metrics
                .render()
                .contains(r#"streamgate_operator_reconcile_failures_total{error="KubeApi"} 1"#)
        );
    }

    #[tokio::test]
    async fn a_failed_status_write_fails_the_reconcile_after_the_configmap_is_written() {
        let (client, mut api) = mock::client();
        let ctx = test_context(client);
        let server = tokio::spawn(async move {
            let mut p = StreamingPolicy::new("default", StreamingPolicySpec::default());
            p.metadata.namespace = Some("media".into());
            p.metadata.uid = Some("u1".into());
            p.metadata.generation = Some(1);
            let cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "streamgate-policies", "namespace": "media"}, "data": {}});
            mock::expect(&mut api, "GET", "/apis/streamgate.dev/v1alpha1/namespaces/media/streamingpolicies", 200,
                serde_json::json!({"apiVersion": "streamgate.dev/v1alpha1", "kind": "StreamingPolicyList", "metadata": {}, "items": [p]})).await;
            mock::expect(
                &mut api,
                "GET",
                "/api/v1/namespaces/media/configmaps/streamgate-policies",
                200,
                cm.clone(),
            )
            .await;
            mock::expect(
                &mut api,
                "PATCH",
                "/api/v1/namespaces/media/configmaps/streamgate-policies",
                200,
                cm,
            )
            .await;
            mock::expect(
                &mut api,
                "PATCH",
                "/apis/streamgate.dev/v1alpha1/namespaces/media/streamingpolicies/default/status",
                500,
                mock::status(500, "InternalError"),
            )
            .await;
        });
        let error = sync_namespace("media", &ctx).await.unwrap_err();
        server.await.unwrap();
        assert!(
            matches!(&error, Error::KubeApi(kube::Error::Api(s)) if s.code == 500),
            "{error:?}"
        );
    }

    #[test]
    fn error_names_are_metric_labels() {
        assert_eq!(
            Error::MissingNamespace("x".into()).metric_label(),
            "MissingNamespace"
        );
    }
}
