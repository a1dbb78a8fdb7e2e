//! The ACTIVE column of `kubectl get streamingpolicies`: live sessions per policy, counted from
//! each namespace's session store and written to `status.activeSessions`.
//!
//! How exact: a snapshot per namespace, taken by walking the store's sessions (no transaction
//! spans accounts), so a session admitted or cut during the walk may or may not be counted; and
//! up to one interval old (30 s). Each session counts for the policy that resolves for its
//! account at count time. Namespaces on the embedded memory store have no shared count: the
//! field stays unset there. Namespaces whose sidecars share one store URL share its sessions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use super::object::LiveSession;
use super::sessions::{Sessions, SessionsResolver, SourceError};
use crate::crd::StreamingPolicy;

/// How often the counts are refreshed.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// The field manager of `status.activeSessions` (the reconciler owns the rest of the status).
pub const FIELD_MANAGER: &str = "streamgate-operator-live-sessions";

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
        let sessions = match resolver.for_namespace(&namespace).await {
            Ok(sessions) => sessions,
            Err(problem) => {
                tracing::debug!(%namespace, problem = %problem.message, "no session count");
                continue;
            }
        };
        let live = match all_sessions(sessions.as_ref()).await {
            Ok(live) => live,
            Err(error) => {
                tracing::warn!(%namespace, %error, "cannot count live sessions");
                continue;
            }
        };
        let counts = count_by_policy(&policies, &live);
        let api: Api<StreamingPolicy> = Api::namespaced(client.clone(), &namespace);
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
