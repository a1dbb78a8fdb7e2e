//! The reconciler: renders the StreamingPolicies of a namespace into the `streamgate-policies`
//! ConfigMap its sidecars mount, and reports each policy's status.
//!
//! The controller is keyed on the namespace, not on the policy: policy and ConfigMap events map
//! to their namespace, so a change costs one rendering whatever the number of policies, and no
//! two reconciles ever write one namespace's ConfigMap at once (the controller never runs two
//! reconciles of one key concurrently). Everything is read from reflector caches; the ConfigMap
//! and the statuses are written only when they differ from what the cache holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::FutureExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as K8sEvent, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::instrument;

use crate::crd::{PolicyCondition, StreamingPolicy, StreamingPolicyStatus, ViewerAuthentication};
use crate::metrics::Metrics;
use crate::render::{
    CONFIGMAP_NAME, POLICY_FILE_KEY, PolicyInput, Verdict, previous_specs, render,
};

/// Finalizer that keeps a deleted policy until the ConfigMap no longer holds it.
pub const FINALIZER: &str = "streamgate.dev/policy-rendering";
/// Field manager of everything the operator writes with server-side apply.
pub const FIELD_MANAGER: &str = "streamgate-operator";
/// Label on the ConfigMaps the operator manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "streamgate-operator";
/// How often a namespace is reconciled with nothing changed, to repair drift no watch reported.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How long a reconcile waits for the caches' first listing.
pub const CACHE_WAIT: Duration = Duration::from_millis(200);
/// How long after a failed reconcile it is retried.
pub const RETRY: Duration = Duration::from_secs(5);

/// Why a reconciliation failed. The variant name is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a request.
    #[error("Kubernetes API: {0}")]
    KubeApi(#[source] kube::Error),
    /// A reflector cache stopped (the controller is shutting down).
    #[error("the {0} cache is gone")]
    CacheGone(&'static str),
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
            Error::CacheGone(_) => "CacheGone",
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
    /// Every StreamingPolicy of the cluster, as last seen.
    pub policies: Store<StreamingPolicy>,
    /// The operator's `streamgate-policies` ConfigMaps, as last seen.
    pub config_maps: Store<ConfigMap>,
    /// Every ViewerAuthentication of the cluster, as last seen.
    pub viewer_auths: Store<ViewerAuthentication>,
    /// `jwksUri` key sets, as last fetched.
    pub jwks: Arc<crate::viewer_auth::JwksCache>,
    /// Playback key rotation; `None`: the operator does not manage playback keys.
    pub playback_keys: Option<streamgate_policy::playback_keys::RotationSchedule>,
}

/// Reconciles one namespace: renders its policies, writes what changed, and asks to be called
/// again at the next `activeFrom` / `activeUntil` boundary (or after [`RESYNC`]).
#[instrument(skip_all, fields(namespace = %namespace.name_any()))]
pub async fn reconcile(namespace: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Rendering from a cache that has not listed yet would drop every policy from the file:
    // come back shortly. (Checked, not awaited: the caches fill only while the controller
    // polls its trigger streams, and every namespace is reconciled at start-up.)
    for (cache, readiness) in [
        (
            "StreamingPolicy",
            ctx.policies.wait_until_ready().now_or_never(),
        ),
        (
            "ConfigMap",
            ctx.config_maps.wait_until_ready().now_or_never(),
        ),
        (
            "ViewerAuthentication",
            ctx.viewer_auths.wait_until_ready().now_or_never(),
        ),
    ] {
        match readiness {
            Some(Ok(())) => {}
            Some(Err(_)) => return Err(Error::CacheGone(cache)),
            None => return Ok(Action::requeue(CACHE_WAIT)),
        }
    }
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let now = Utc::now();
    let name = namespace.name_any();
    let result = sync_namespace(&name, &ctx, now).await;
    let keys_due = match (&result, &ctx.playback_keys) {
        (Ok(_), Some(schedule)) => {
            let has_policies = !ctx
                .policies
                .state_filter(|p| p.namespace().as_deref() == Some(name.as_str()))
                .is_empty();
            if crate::playback_keys::wants_keys(&namespace, has_policies) {
                crate::playback_keys::ensure_keys(&ctx.client, &name, now, schedule).await?
            } else {
                None
            }
        }
        _ => None,
    };
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    let next = [result?, keys_due].into_iter().flatten().min();
    Ok(next_action(next, now))
}

/// When to come back: at the next window boundary if it is before the resync.
pub fn next_action(next_boundary: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Action {
    match next_boundary.and_then(|at| (at - now).to_std().ok()) {
        // A timer that fires a hair early finds the window unchanged and asks again for the
        // few milliseconds left, so no margin is needed for correctness.
        Some(wait) if wait < RESYNC => Action::requeue(wait),
        _ => Action::requeue(RESYNC),
    }
}

/// Retries a failed reconciliation with a short delay, and counts the failure.
pub fn error_policy(namespace: Arc<Namespace>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.count_failure(error.metric_label());
    tracing::warn!(namespace = %namespace.name_any(), %error, "reconcile failed");
    Action::requeue(RETRY)
}

/// Renders every policy of `namespace` into its ConfigMap, updates their status and
/// finalizers. Returns the next window boundary, when the namespace must be rendered again.
pub async fn sync_namespace(
    namespace: &str,
    ctx: &Context,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, Error> {
    let mut listed: Vec<Arc<StreamingPolicy>> = ctx
        .policies
        .state_filter(|p| p.namespace().as_deref() == Some(namespace));
    listed.sort_by_key(|p| p.name_any());
    let cached = ctx
        .config_maps
        .get(&ObjectRef::new(CONFIGMAP_NAME).within(namespace));
    let mut auths: Vec<Arc<ViewerAuthentication>> = ctx.viewer_auths.state_filter(|v| {
        v.namespace().as_deref() == Some(namespace) && v.meta().deletion_timestamp.is_none()
    });
    auths.sort_by_key(|v| v.name_any());
    if listed.is_empty() && cached.is_none() && auths.is_empty() {
        // Most namespaces: nothing to render, nothing to clean up.
        return Ok(None);
    }
    let policies: Api<StreamingPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);

    // The finalizer makes a policy's deletion wait for the rendering that leaves it out.
    for policy in listed.iter().filter(|p| {
        p.meta().deletion_timestamp.is_none() && !p.finalizers().iter().any(|f| f == FINALIZER)
    }) {
        add_finalizer(&policies, policy).await?;
    }

    let previous = cached
        .as_ref()
        .and_then(|cm| cm.data.as_ref()?.get(POLICY_FILE_KEY).cloned())
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
    let rendering = render(namespace, &inputs, &previous, now);
    let (auth_file, auth_renderings, auth_due) =
        render_auths(namespace, &auths, cached.as_deref(), ctx, now).await;
    let policy_file = format!("{}{auth_file}", rendering.policy_file);

    let live: Vec<&StreamingPolicy> = listed
        .iter()
        .map(|p| p.as_ref())
        .filter(|p| p.meta().deletion_timestamp.is_none())
        .collect();
    let mut owners: Vec<OwnerReference> = live.iter().map(|p| owner_reference(p)).collect();
    owners.extend(auths.iter().map(|v| auth_owner_reference(v)));
    let desired = desired_config_map_owned(namespace, owners, &policy_file);
    // The cache may lag behind our own last write (a policy's status event can arrive before
    // the ConfigMap's): ask the API server before writing the same content again.
    if !config_map_matches(cached.as_deref(), &desired)
        && !config_map_matches(
            config_maps.get_opt(CONFIGMAP_NAME).await?.as_ref(),
            &desired,
        )
    {
        config_maps
            .patch(
                CONFIGMAP_NAME,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await?;
        ctx.metrics.count_configmap_apply(namespace);
        tracing::info!(policies = live.len(), "rendered the policy ConfigMap");
    }

    for policy in &live {
        if let Some(verdict) = rendering.verdicts.get(&policy.name_any()) {
            update_status(&policies, policy, verdict, ctx).await?;
        }
    }
    for policy in listed.iter().filter(|p| {
        p.meta().deletion_timestamp.is_some() && p.finalizers().iter().any(|f| f == FINALIZER)
    }) {
        remove_finalizer(&policies, policy).await?;
    }
    let auth_api: Api<ViewerAuthentication> = Api::namespaced(ctx.client.clone(), namespace);
    for (va, auth_rendering) in auths.iter().zip(&auth_renderings) {
        update_auth_status(&auth_api, va, auth_rendering).await?;
    }
    Ok([rendering.next_boundary, auth_due]
        .into_iter()
        .flatten()
        .min())
}

/// Renders the namespace's ViewerAuthentication in force (the first by name) with its keys
/// resolved; the others are reported as superseded. Returns the text to append to the policy
/// file, each resource's rendering (in `auths` order), and when keys must be looked at again.
async fn render_auths(
    namespace: &str,
    auths: &[Arc<ViewerAuthentication>],
    cached: Option<&ConfigMap>,
    ctx: &Context,
    now: DateTime<Utc>,
) -> (
    String,
    Vec<crate::viewer_auth::AuthRendering>,
    Option<DateTime<Utc>>,
) {
    use crate::viewer_auth::{render_viewer_auth, resolve_rule, superseded};
    let Some(first) = auths.first() else {
        return (String::new(), Vec::new(), None);
    };
    let previous = cached
        .and_then(|cm| cm.data.as_ref()?.get(POLICY_FILE_KEY).cloned())
        .map(|file| crate::viewer_auth::previous_resolved(&file))
        .unwrap_or_default();
    let name = first.name_any();
    let spec = &first.spec.auth;
    let mut keys = Vec::new();
    let mut due: Option<DateTime<Utc>> = None;
    for (i, rule) in spec.jwt_rules.iter().enumerate() {
        // A set rendered before (same name, same URL) stands in until a fetch succeeds.
        let seed = previous.get(&name).and_then(|(old, resolved)| {
            let same = old.jwt_rules.get(i)?.jwks_uri == rule.jwks_uri;
            resolved
                .get(i)
                .filter(|j| same && j.as_str() != streamgate_policy::viewer_auth::EMPTY_JWKS)
        });
        let (got, next) = resolve_rule(
            &ctx.client,
            namespace,
            rule,
            &ctx.jwks,
            seed.map(String::as_str),
            now,
        )
        .await;
        keys.push(got);
        due = [due, next].into_iter().flatten().min();
    }
    let rendering = render_viewer_auth(&name, spec, &keys);
    let text = rendering
        .document
        .as_ref()
        .map(|doc| {
            streamgate_policy::render_viewer_auth(doc).expect("a ViewerAuthentication serializes")
        })
        .unwrap_or_default();
    let mut renderings = vec![rendering];
    renderings.extend(auths[1..].iter().map(|_| superseded(&name)));
    (text, renderings, due)
}

async fn update_auth_status(
    api: &Api<ViewerAuthentication>,
    va: &ViewerAuthentication,
    rendering: &crate::viewer_auth::AuthRendering,
) -> Result<(), Error> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let desired = crate::viewer_auth::desired_status(va, rendering, &now);
    if va.status.as_ref() == Some(&desired) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": ViewerAuthentication::api_version(&()),
        "kind": ViewerAuthentication::kind(&()),
        "status": desired,
    });
    match api
        .patch_status(
            &va.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Deleted meanwhile: nothing to report on.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

fn auth_owner_reference(va: &ViewerAuthentication) -> OwnerReference {
    OwnerReference {
        api_version: ViewerAuthentication::api_version(&()).into_owned(),
        kind: ViewerAuthentication::kind(&()).into_owned(),
        name: va.name_any(),
        uid: va.uid().unwrap_or_default(),
        controller: None,
        block_owner_deletion: None,
    }
}

/// The ConfigMap as the operator applies it.
pub fn desired_config_map(
    namespace: &str,
    live: &[&StreamingPolicy],
    policy_file: &str,
) -> ConfigMap {
    desired_config_map_owned(
        namespace,
        live.iter().map(|p| owner_reference(p)).collect(),
        policy_file,
    )
}

/// The ConfigMap as the operator applies it, owned by `owners` (its policies and viewer
/// authentication, none of them "the" controller, so it goes when the last of them does).
pub fn desired_config_map_owned(
    namespace: &str,
    owners: Vec<OwnerReference>,
    policy_file: &str,
) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIGMAP_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY.to_string(),
            )])),
            owner_references: Some(owners),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            POLICY_FILE_KEY.to_string(),
            policy_file.to_string(),
        )])),
        ..ConfigMap::default()
    }
}

/// Whether the cached ConfigMap already says what `desired` says (data, our label, owners):
/// then applying it again would change nothing.
pub fn config_map_matches(cached: Option<&ConfigMap>, desired: &ConfigMap) -> bool {
    let Some(cached) = cached else {
        return false;
    };
    let owners = |cm: &ConfigMap| -> Vec<String> {
        let mut uids: Vec<String> = cm
            .metadata
            .owner_references
            .iter()
            .flatten()
            .map(|o| o.uid.clone())
            .collect();
        uids.sort();
        uids
    };
    let labelled = cached
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY));
    labelled && cached.data == desired.data && owners(cached) == owners(desired)
}

async fn add_finalizer(api: &Api<StreamingPolicy>, policy: &StreamingPolicy) -> Result<(), Error> {
    // JSON patches with a `test`: a concurrent change of the list fails the patch instead of
    // being overwritten, and the next reconcile sees the new list.
    let patch = if policy.finalizers().is_empty() {
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    } else {
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": policy.finalizers()},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ])
    };
    patch_finalizers(api, policy, patch).await
}

async fn remove_finalizer(
    api: &Api<StreamingPolicy>,
    policy: &StreamingPolicy,
) -> Result<(), Error> {
    let Some(index) = policy.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let patch = json!([
        {"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{index}")},
    ]);
    patch_finalizers(api, policy, patch).await
}

async fn patch_finalizers(
    api: &Api<StreamingPolicy>,
    policy: &StreamingPolicy,
    patch: serde_json::Value,
) -> Result<(), Error> {
    let patch: json_patch::Patch =
        serde_json::from_value(patch).expect("the finalizer patches above are valid JSON patches");
    match api
        .patch(
            &policy.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Gone already (deleted), or the cache was stale (the `test` failed, 422): the watch
        // brings the current object and another reconcile.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 422 => Ok(()),
        Err(error) => Err(error.into()),
    }
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
        // Written by the live-session counter under a field manager of its own.
        active_sessions: None,
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
    // Compared with what this manager writes: the live-session count and other conditions
    // (ValidatorsHealthy) have managers of their own.
    let current = policy.status.clone().map(|status| StreamingPolicyStatus {
        active_sessions: None,
        conditions: status
            .conditions
            .into_iter()
            .filter(|c| c.type_ == "Ready")
            .collect(),
        ..status
    });
    if current.as_ref() == Some(&desired) {
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
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
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
    use crate::render::{reasons, render};

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

    /// A context whose caches hold `policies` and `config_map`, as the reflectors would.
    fn test_context(
        client: kube::Client,
        policies: Vec<StreamingPolicy>,
        config_map: Option<ConfigMap>,
    ) -> Arc<Context> {
        use kube::runtime::{reflector, watcher};
        let (policy_cache, mut policy_writer) = reflector::store();
        for policy in policies {
            policy_writer.apply_watcher_event(&watcher::Event::Apply(policy));
        }
        let (config_map_cache, mut config_map_writer) = reflector::store();
        if let Some(cm) = config_map {
            config_map_writer.apply_watcher_event(&watcher::Event::Apply(cm));
        }
        let (auth_cache, mut auth_writer) = reflector::store();
        auth_writer.apply_watcher_event(&watcher::Event::Init);
        auth_writer.apply_watcher_event(&watcher::Event::InitDone);
        Arc::new(Context {
            viewer_auths: auth_cache,
            jwks: Arc::new(crate::viewer_auth::JwksCache::new(reqwest::Client::new())),
            recorder: Recorder::new(
                client.clone(),
                kube::runtime::events::Reporter {
                    controller: "test".into(),
                    instance: None,
                },
            ),
            client,
            metrics: Arc::new(Metrics::new()),
            policies: policy_cache,
            config_maps: config_map_cache,
            playback_keys: None,
        })
    }

    /// A live policy of namespace `media` that already carries the finalizer.
    fn media_policy() -> StreamingPolicy {
        let mut p = StreamingPolicy::new("default", StreamingPolicySpec::default());
        p.metadata.namespace = Some("media".into());
        p.metadata.uid = Some("u1".into());
        p.metadata.generation = Some(1);
        p.metadata.finalizers = Some(vec![FINALIZER.into()]);
        p
    }

    fn namespace(name: &str) -> Arc<Namespace> {
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.into());
        Arc::new(ns)
    }

    #[tokio::test]
    async fn a_refused_configmap_write_fails_the_reconcile_and_is_counted() {
        let (client, mut api) = mock::client();
        let ctx = test_context(client, vec![media_policy()], None);
        let server = tokio::spawn(async move {
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
        let error = sync_namespace("media", &ctx, Utc::now()).await.unwrap_err();
        server.await.unwrap();
        assert!(
            matches!(&error, Error::KubeApi(kube::Error::Api(s)) if s.code == 403),
            "{error:?}"
        );
        let action = error_policy(namespace("media"), &error, ctx.clone());
        assert_eq!(action, Action::requeue(RETRY));
        let text = ctx.metrics.render();
        assert!(
            text.contains(r#"streamgate_operator_reconcile_failures_total{error="KubeApi"} 1"#),
            "{text}"
        );
        assert_eq!(ctx.metrics.configmap_apply_count("media"), 0);
    }

    #[tokio::test]
    async fn a_failed_status_write_fails_the_reconcile_after_the_configmap_is_written() {
        let (client, mut api) = mock::client();
        let ctx = test_context(client, vec![media_policy()], None);
        let server = tokio::spawn(async move {
            let cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "streamgate-policies", "namespace": "media"}, "data": {}});
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
        let error = sync_namespace("media", &ctx, Utc::now()).await.unwrap_err();
        server.await.unwrap();
        assert!(
            matches!(&error, Error::KubeApi(kube::Error::Api(s)) if s.code == 500),
            "{error:?}"
        );
        assert_eq!(ctx.metrics.configmap_apply_count("media"), 1);
    }

    #[tokio::test]
    async fn nothing_is_written_when_the_caches_already_show_the_rendering() {
        let now = Utc::now();
        let mut policy = media_policy();
        let input = PolicyInput {
            name: "default".into(),
            spec: policy.spec.policy.clone(),
            deleting: false,
        };
        let rendering = render("media", &[input], &BTreeMap::new(), now);
        let config_map = desired_config_map("media", &[&policy], &rendering.policy_file);
        policy.status = Some(desired_status(
            &policy,
            &rendering.verdicts["default"],
            "2030-01-01T00:00:00Z",
        ));
        let (client, api) = mock::client();
        // Any request would fail: the mock API server is gone.
        drop(api);
        let ctx = test_context(client, vec![policy], Some(config_map));
        assert_eq!(sync_namespace("media", &ctx, now).await.unwrap(), None);
        assert_eq!(ctx.metrics.configmap_apply_count("media"), 0);

        // A namespace without policies or ConfigMap: nothing to do either.
        assert_eq!(sync_namespace("empty", &ctx, now).await.unwrap(), None);
    }

    #[test]
    fn the_next_reconcile_is_at_the_next_window_boundary() {
        let now = Utc::now();
        assert_eq!(
            next_action(Some(now + chrono::Duration::seconds(3)), now),
            Action::requeue(Duration::from_secs(3))
        );
        assert_eq!(next_action(None, now), Action::requeue(RESYNC));
        assert_eq!(
            next_action(Some(now + chrono::Duration::days(2)), now),
            Action::requeue(RESYNC)
        );
    }

    #[test]
    fn a_cached_configmap_matches_only_with_our_label_data_and_owners() {
        let mut a = StreamingPolicy::new("a", StreamingPolicySpec::default());
        a.metadata.uid = Some("ua".into());
        let mut b = StreamingPolicy::new("b", StreamingPolicySpec::default());
        b.metadata.uid = Some("ub".into());
        let desired = desired_config_map("ns", &[&a, &b], "file");
        assert!(!config_map_matches(None, &desired));
        let reordered = desired_config_map("ns", &[&b, &a], "file");
        assert!(config_map_matches(Some(&reordered), &desired));
        let edited = desired_config_map("ns", &[&a, &b], "edited by hand");
        assert!(!config_map_matches(Some(&edited), &desired));
        let fewer_owners = desired_config_map("ns", &[&a], "file");
        assert!(!config_map_matches(Some(&fewer_owners), &desired));
        let mut unlabelled = desired.clone();
        unlabelled.metadata.labels = None;
        assert!(!config_map_matches(Some(&unlabelled), &desired));
    }

    #[test]
    fn error_names_are_metric_labels() {
        assert_eq!(Error::CacheGone("ConfigMap").metric_label(), "CacheGone");
    }
}
