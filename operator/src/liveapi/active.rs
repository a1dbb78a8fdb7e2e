//! The ACTIVE column of `kubectl get streamingpolicies`: live sessions per policy, counted from
//! each namespace's session store and written to `status.activeSessions`.
//!
//! How exact: a snapshot per namespace, taken by walking the store's sessions (no transaction
//! spans accounts), so a session admitted or cut during the walk may or may not be counted; and
//! up to one interval old (30 s). Each session counts for the policy that resolves for its
//! account at count time. Namespaces on the embedded memory store have no shared count: the
//! field stays unset there. Namespaces whose sidecars share one store URL share its sessions.
//!
//! The same refresh sets the `ValidatorsHealthy` condition of policies with session validators
//! from the validator call counts the sidecars keep in the store ([`crate::validator_health`]),
//! under a field manager of its own. A store that cannot be read leaves the condition as it was:
//! an outage says nothing about the validators.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use super::object::LiveSession;
use super::sessions::{Sessions, SessionsResolver, SourceError};
use crate::crd::StreamingPolicy;
use crate::validator_health::{self, Reading};

/// How often the counts are refreshed.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// The field manager of `status.activeSessions` (the reconciler owns the rest of the status).
pub const FIELD_MANAGER: &str = "streamgate-operator-live-sessions";

/// The field manager of the `ValidatorsHealthy` condition.
pub const VALIDATOR_HEALTH_MANAGER: &str = "streamgate-operator-validator-health";

/// Page size of the walk.
const PAGE: usize = 500;

/// Live sessions per policy name: each session counts for the policy its account resolves to.
/// Every policy of `policies` appears, with 0 if nothing counts for it.
pub fn count_by_policy(
    policies: &[StreamingPolicy],
    sessions: &[LiveSession],
) -> BTreeMap<String, u64> {
    let set = super::policy_set(policies);
    let mut counts: BTreeMap<String, u64> = policies.iter().map(|p| (p.name_any(), 0)).collect();
    for session in sessions {
        if let Some(count) = counts.get_mut(&set.resolve(&session.account).source) {
            *count += 1;
        }
    }
    counts
}

async fn all_sessions(sessions: &dyn Sessions) -> Result<Vec<LiveSession>, SourceError> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (page, next) = sessions.page(after.as_deref(), PAGE).await?;
        all.extend(page);
        match next {
            Some(next) => after = Some(next),
            None => return Ok(all),
        }
    }
}

/// Counts the sessions of every namespace with StreamingPolicies once and writes the counts that
/// changed. Namespaces whose store cannot be read are logged and skipped.
pub async fn refresh_once(client: &Client, resolver: &dyn SessionsResolver) -> anyhow::Result<()> {
    let policies = Api::<StreamingPolicy>::all(client.clone())
        .list(&Default::default())
        .await?;
    let mut by_namespace: BTreeMap<String, Vec<StreamingPolicy>> = BTreeMap::new();
    for policy in policies.items {
        if let Some(namespace) = policy.namespace() {
            by_namespace.entry(namespace).or_default().push(policy);
        }
    }
    for (namespace, policies) in by_namespace {
        let api: Api<StreamingPolicy> = Api::namespaced(client.clone(), &namespace);
        let sessions = match resolver.for_namespace(&namespace).await {
            Ok(sessions) => sessions,
            Err(problem) => {
                tracing::debug!(%namespace, problem = %problem.message, "no session count");
                // The resolver refuses the embedded memory store with 400; other problems
                // (a missing Secret, a store that cannot be opened) say nothing.
                if problem.code == axum::http::StatusCode::BAD_REQUEST {
                    write_validator_health(&api, &policies, |_| Some(Reading::NoSharedStore)).await;
                }
                continue;
            }
        };
        let pairs = validator_health::validators_of(&policies);
        if pairs.is_empty() {
            write_validator_health(&api, &policies, |_| None).await;
        } else {
            match sessions.validator_health(&namespace, &pairs).await {
                Ok(stats) => {
                    let mut by_policy: BTreeMap<String, Vec<(String, _)>> = BTreeMap::new();
                    for ((policy, validator), stats) in pairs.into_iter().zip(stats) {
                        by_policy
                            .entry(policy)
                            .or_default()
                            .push((validator, stats));
                    }
                    write_validator_health(&api, &policies, |name| {
                        by_policy.remove(name).map(Reading::Stats)
                    })
                    .await;
                }
                Err(error) => {
                    tracing::warn!(%namespace, %error, "cannot read validator health; the condition stays");
                }
            }
        }
        let live = match all_sessions(sessions.as_ref()).await {
            Ok(live) => live,
            Err(error) => {
                tracing::warn!(%namespace, %error, "cannot count live sessions");
                continue;
            }
        };
        let counts = count_by_policy(&policies, &live);
        for policy in &policies {
            let name = policy.name_any();
            let count = counts.get(&name).copied().unwrap_or(0);
            if policy.status.as_ref().and_then(|s| s.active_sessions) == Some(count) {
                continue;
            }
            let patch = json!({
                "apiVersion": StreamingPolicy::api_version(&()),
                "kind": StreamingPolicy::kind(&()),
                "status": {"activeSessions": count},
            });
            if let Err(error) = api
                .patch_status(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                tracing::warn!(%namespace, policy = %name, %error, "cannot write activeSessions");
            }
        }
    }
    Ok(())
}

/// Set once a write of the condition dropped the reconciler's (an outdated CRD): no more writes
/// from this process, so the two do not take turns replacing each other.
static OUTDATED_CRD: AtomicBool = AtomicBool::new(false);

/// Sets the `ValidatorsHealthy` condition of each of `policies` from `reading` (by policy name;
/// `None`: no validators, the condition is removed), writing only those that change.
async fn write_validator_health(
    api: &Api<StreamingPolicy>,
    policies: &[StreamingPolicy],
    mut reading: impl FnMut(&str) -> Option<Reading>,
) {
    if OUTDATED_CRD.load(Ordering::Relaxed) {
        return;
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for policy in policies {
        let name = policy.name_any();
        let reading = if policy.spec.policy.validators.is_empty() {
            None
        } else {
            reading(&name)
        };
        let conditions = match reading {
            Some(reading) => {
                let desired = validator_health::desired_condition(
                    policy,
                    &validator_health::verdict(&reading),
                    &now,
                );
                if !validator_health::changes(policy, &desired) {
                    continue;
                }
                vec![desired]
            }
            // Validators removed: the condition goes (this manager owns only it).
            None if validator_health::current_condition(policy).is_some() => Vec::new(),
            None => continue,
        };
        let patch = json!({
            "apiVersion": StreamingPolicy::api_version(&()),
            "kind": StreamingPolicy::kind(&()),
            "status": {"conditions": conditions},
        });
        match api
            .patch_status(
                &name,
                &PatchParams::apply(VALIDATOR_HEALTH_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(written) if validator_health::dropped_other_conditions(policy, &written) => {
                OUTDATED_CRD.store(true, Ordering::Relaxed);
                tracing::error!(
                    policy = %name,
                    "the installed StreamingPolicy CRD predates the ValidatorsHealthy condition \
                     (its status.conditions is not keyed by type): apply this release's CRD; \
                     the condition is not written until the operator restarts"
                );
                return;
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(policy = %name, %error, "cannot write the ValidatorsHealthy condition");
            }
        }
    }
}

/// Refreshes the counts every `interval`, forever (the leader runs it).
pub async fn run(client: Client, resolver: Arc<dyn SessionsResolver>, interval: Duration) {
    loop {
        if let Err(error) = refresh_once(&client, resolver.as_ref()).await {
            tracing::warn!("live session counts: {error:#}");
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, accounts: &[&str]) -> StreamingPolicy {
        let mut spec = crate::crd::StreamingPolicySpec::default();
        spec.policy.accounts = accounts.iter().map(|a| a.to_string()).collect();
        let mut p = StreamingPolicy::new(name, spec);
        p.metadata.namespace = Some("ns".into());
        p
    }

    fn session(account: &str) -> LiveSession {
        LiveSession {
            id: format!("{account}-id"),
            account: account.into(),
            stream_id: "tv".into(),
            state: "active".into(),
            reason: None,
            created_at_ms: 0,
            expires_at_ms: 1,
            policy: None,
            validation: None,
        }
    }

    #[test]
    fn sessions_count_for_the_policy_their_account_resolves_to() {
        let policies = [
            policy("standard", &[]),
            policy("vip", &["7"]),
            policy("idle", &["9"]),
        ];
        let counts = count_by_policy(&policies, &[session("1"), session("2"), session("7")]);
        assert_eq!(counts["standard"], 2);
        assert_eq!(counts["vip"], 1);
        assert_eq!(counts["idle"], 0);
    }
}
