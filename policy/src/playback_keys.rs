//! The playback key set: the keys a namespace's sidecars sign and verify playback tokens with,
//! as the operator keeps them in a Secret (one JSON document under [`SECRET_KEY`]) and as a
//! standalone sidecar reads them from a file. Also the rotation schedule, a pure function the
//! operator applies.
//!
//! Rotation keeps two keys live: a new key is first added for verification only (so every
//! sidecar knows it before any token signed with it exists: mounted Secrets take up to a
//! minute or two to reach pods), then becomes the signing key, and the old one is removed only
//! once every token it signed has expired.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

/// Name of the Secret the operator keeps in each opted-in namespace.
pub const SECRET_NAME: &str = "streamgate-playback-keys";
/// The Secret's data key holding the key set.
pub const SECRET_KEY: &str = "keys.json";

/// One key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlaybackKey {
    /// Key id (1–32 of `A-Z a-z 0-9 - _`), written into every token it signs.
    pub id: String,
    /// The secret, base64 (standard alphabet), at least 32 bytes.
    pub secret: String,
    /// When it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// When it stopped signing; it verifies until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for PlaybackKey {
    // The secret stays out of logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlaybackKey")
            .field("id", &self.id)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .finish_non_exhaustive()
    }
}

/// The key set: which key signs, and every key that verifies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlaybackKeySet {
    /// Id of the key that signs new tokens.
    pub signing: String,
    /// Every key that verifies, the signing one included.
    pub keys: Vec<PlaybackKey>,
}

/// When keys are rotated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotationSchedule {
    /// A signing key older than this is replaced.
    pub rotate_after: Duration,
    /// How long a new key verifies before it signs: longer than a Secret takes to reach every
    /// pod (the kubelet's sync period plus its cache TTL, about two minutes by default).
    pub propagation: Duration,
    /// How long a retired key keeps verifying: longer than a token lives (two heartbeat
    /// intervals) plus `propagation`.
    pub retire_grace: Duration,
}

impl Default for RotationSchedule {
    fn default() -> Self {
        Self {
            rotate_after: Duration::days(7),
            propagation: Duration::minutes(5),
            retire_grace: Duration::hours(2),
        }
    }
}

/// The key set to store at `now`, or `None` when `current` stays as it is. `new_key` makes a
/// fresh key (id and secret) when one is needed.
///
/// - No key set (or one without its signing key): a new set with one signing key.
/// - The signing key is older than `rotate_after` and no newer key waits: add one
///   (verification only).
/// - A waiting key has been there `propagation`: it signs; the old signing key is retired.
/// - A retired key is removed `retire_grace` after it stopped signing.
pub fn plan_rotation(
    current: Option<&PlaybackKeySet>,
    now: DateTime<Utc>,
    schedule: &RotationSchedule,
    new_key: impl FnOnce() -> (String, String),
) -> Option<PlaybackKeySet> {
    let fresh = |new_key: Box<dyn FnOnce() -> (String, String) + '_>| {
        let (id, secret) = new_key();
        PlaybackKey {
            id,
            secret,
            created_at: Some(now),
            retired_at: None,
        }
    };
    let Some(current) = current.filter(|set| set.keys.iter().any(|k| k.id == set.signing)) else {
        let key = fresh(Box::new(new_key));
        return Some(PlaybackKeySet {
            signing: key.id.clone(),
            keys: vec![key],
        });
    };
    let mut next = current.clone();
    // Retired keys past their grace go.
    next.keys.retain(|k| {
        k.id == next.signing
            || k.retired_at
                .is_none_or(|at| now < at + schedule.retire_grace)
    });
    let signing_created = next
        .keys
        .iter()
        .find(|k| k.id == next.signing)
        .and_then(|k| k.created_at);
    // A key newer than the signing one, not retired: it waits to sign.
    let waiting = next
        .keys
        .iter()
        .filter(|k| k.id != next.signing && k.retired_at.is_none())
        .max_by_key(|k| k.created_at)
        .cloned();
    match waiting {
        Some(waiting)
            if waiting
                .created_at
                .is_none_or(|at| now >= at + schedule.propagation) =>
        {
            let old = next.signing.clone();
            for key in &mut next.keys {
                if key.id == old {
                    key.retired_at = Some(now);
                }
            }
            next.signing = waiting.id;
        }
        Some(_) => {}
        None if signing_created.is_none_or(|at| now >= at + schedule.rotate_after) => {
            let key = fresh(Box::new(new_key));
            next.keys.push(key);
        }
        None => {}
    }
    (next != *current).then_some(next)
}

/// When [`plan_rotation`] will next change `set` by itself (a key due for rotation, a waiting
/// key due to sign, a retired key due to go), so the operator comes back then.
pub fn next_rotation_after(
    set: &PlaybackKeySet,
    schedule: &RotationSchedule,
) -> Option<DateTime<Utc>> {
    let waiting = set
        .keys
        .iter()
        .filter(|k| k.id != set.signing && k.retired_at.is_none())
        .filter_map(|k| k.created_at)
        .map(|at| at + schedule.propagation)
        .min();
    let signing = set
        .keys
        .iter()
        .find(|k| k.id == set.signing)
        .and_then(|k| k.created_at)
        .map(|at| at + schedule.rotate_after);
    let retired = set
        .keys
        .iter()
        .filter_map(|k| k.retired_at)
        .map(|at| at + schedule.retire_grace)
        .min();
    // While a key waits, the signing key's own rotation is not what comes next.
    [waiting.or(signing), retired].into_iter().flatten().min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(minutes: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap() + Duration::minutes(minutes)
    }

    fn schedule() -> RotationSchedule {
        RotationSchedule {
            rotate_after: Duration::minutes(60),
            propagation: Duration::minutes(5),
            retire_grace: Duration::minutes(10),
        }
    }

    fn keygen(id: &str) -> impl FnOnce() -> (String, String) + '_ {
        move || (id.to_string(), "c2VjcmV0".to_string())
    }

    fn ids(set: &PlaybackKeySet) -> Vec<&str> {
        set.keys.iter().map(|k| k.id.as_str()).collect()
    }

    #[test]
    fn a_key_is_made_added_promoted_and_retired_in_turn() {
        let s = schedule();
        let first = plan_rotation(None, at(0), &s, keygen("a")).unwrap();
        assert_eq!((first.signing.as_str(), ids(&first)), ("a", vec!["a"]));
        assert_eq!(plan_rotation(Some(&first), at(59), &s, keygen("x")), None);
        // Due: a second key verifies, the first still signs.
        let added = plan_rotation(Some(&first), at(60), &s, keygen("b")).unwrap();
        assert_eq!((added.signing.as_str(), ids(&added)), ("a", vec!["a", "b"]));
        assert_eq!(plan_rotation(Some(&added), at(64), &s, keygen("x")), None);
        // Propagated: it signs; the old one verifies, retired.
        let promoted = plan_rotation(Some(&added), at(65), &s, keygen("x")).unwrap();
        assert_eq!(promoted.signing, "b");
        assert_eq!(ids(&promoted), vec!["a", "b"]);
        assert_eq!(promoted.keys[0].retired_at, Some(at(65)));
        assert_eq!(
            plan_rotation(Some(&promoted), at(74), &s, keygen("x")),
            None
        );
        // Grace over: the old key is gone.
        let pruned = plan_rotation(Some(&promoted), at(75), &s, keygen("x")).unwrap();
        assert_eq!((pruned.signing.as_str(), ids(&pruned)), ("b", vec!["b"]));
    }

    #[test]
    fn the_next_change_is_foreseen() {
        let s = schedule();
        let first = plan_rotation(None, at(0), &s, keygen("a")).unwrap();
        assert_eq!(next_rotation_after(&first, &s), Some(at(60)));
        let added = plan_rotation(Some(&first), at(60), &s, keygen("b")).unwrap();
        assert_eq!(next_rotation_after(&added, &s), Some(at(65)));
        let promoted = plan_rotation(Some(&added), at(65), &s, keygen("x")).unwrap();
        assert_eq!(next_rotation_after(&promoted, &s), Some(at(75)));
        let pruned = plan_rotation(Some(&promoted), at(75), &s, keygen("x")).unwrap();
        assert_eq!(next_rotation_after(&pruned, &s), Some(at(120)));
    }

    #[test]
    fn a_set_without_its_signing_key_is_replaced() {
        let broken = PlaybackKeySet {
            signing: "gone".into(),
            keys: vec![],
        };
        let fixed = plan_rotation(Some(&broken), at(0), &schedule(), keygen("n")).unwrap();
        assert_eq!(fixed.signing, "n");
    }

    #[test]
    fn secrets_are_not_printed() {
        let key = PlaybackKey {
            id: "k".into(),
            secret: "dG9wc2VjcmV0".into(),
            created_at: None,
            retired_at: None,
        };
        assert!(!format!("{key:?}").contains("dG9wc2VjcmV0"));
    }
}
