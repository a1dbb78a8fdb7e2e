//! The playback key Secret of each namespace the sidecar serves: created with one key, rotated
//! on schedule with two keys live during a rotation (see
//! [`streamgate_policy::playback_keys::plan_rotation`], the pure decision), mounted into
//! injected sidecars by the webhook. The keys stay in the namespace's Secret: the operator
//! never logs, reports or copies them elsewhere.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use streamgate_policy::playback_keys::{
    PlaybackKeySet, RotationSchedule, SECRET_KEY, SECRET_NAME, next_rotation_after, plan_rotation,
};

use crate::inject::{ENABLED, annotations};
use crate::reconcile::{FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL};

/// Whether a namespace gets a key Secret: it opted in to injection, or holds policies (its
/// pods may opt in one by one).
pub fn wants_keys(namespace: &Namespace, has_policies: bool) -> bool {
    has_policies
        || namespace
            .labels()
            .get(annotations::INJECT)
            .map(String::as_str)
            == Some(ENABLED)
}

/// A fresh key: a random id and 32 random bytes, base64.
pub fn generate_key() -> (String, String) {
    let id = format!("k{:08x}", rand::random::<u32>());
    let secret: [u8; 32] = rand::random();
    (id, STANDARD.encode(secret))
}

/// The Secret holding `set`, as the operator applies it.
pub fn desired_secret(namespace: &str, set: &PlaybackKeySet) -> Secret {
    let json = serde_json::to_vec(set).expect("a key set serializes");
    Secret {
        metadata: ObjectMeta {
            name: Some(SECRET_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(SECRET_KEY.to_string(), ByteString(json))])),
        ..Secret::default()
    }
}

/// The key set a Secret holds; `None` if it holds none or one that does not parse (it is then
/// replaced by a fresh set: tokens signed with the unreadable keys stop working, which is
/// what an unreadable key set means for the sidecars too).
pub fn key_set_of(secret: &Secret) -> Option<PlaybackKeySet> {
    let bytes = secret.data.as_ref()?.get(SECRET_KEY)?;
    serde_json::from_slice(&bytes.0).ok()
}

/// Creates or rotates the key Secret of `namespace` as due at `now`. Returns when the next
/// change is due.
pub async fn ensure_keys(
    client: &Client,
    namespace: &str,
    now: DateTime<Utc>,
    schedule: &RotationSchedule,
) -> Result<Option<DateTime<Utc>>, kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let current = secrets
        .get_opt(SECRET_NAME)
        .await?
        .as_ref()
        .and_then(key_set_of);
    let Some(next) = plan_rotation(current.as_ref(), now, schedule, generate_key) else {
        return Ok(current.and_then(|set| next_rotation_after(&set, schedule)));
    };
    secrets
        .patch(
            SECRET_NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&desired_secret(namespace, &next)),
        )
        .await?;
    tracing::info!(
        signing = %next.signing,
        keys = ?next.keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
        "playback keys written"
    );
    Ok(next_rotation_after(&next, schedule))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_round_trips_its_key_set() {
        let set =
            plan_rotation(None, Utc::now(), &RotationSchedule::default(), generate_key).unwrap();
        let secret = desired_secret("media", &set);
        assert_eq!(key_set_of(&secret), Some(set.clone()));
        assert_eq!(set.keys[0].id.len(), 9);
        assert_eq!(STANDARD.decode(&set.keys[0].secret).unwrap().len(), 32);
        assert_eq!(
            secret.metadata.labels.unwrap()[MANAGED_BY_LABEL],
            MANAGED_BY
        );
    }

    #[test]
    fn namespaces_opted_in_or_with_policies_get_keys() {
        let mut ns = Namespace::default();
        assert!(!wants_keys(&ns, false));
        assert!(wants_keys(&ns, true));
        ns.metadata.labels = Some(BTreeMap::from([(
            annotations::INJECT.to_string(),
            ENABLED.to_string(),
        )]));
        assert!(wants_keys(&ns, false));
    }
}
