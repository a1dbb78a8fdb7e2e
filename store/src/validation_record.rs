//! Where session validators' verdicts are kept in Redis, and the part of a validation record
//! that readers other than the sidecar need (its state).
//!
//! The sidecars of a namespace write one JSON record per validated session under
//! [`validation_record_key`]; the operator's live-session API reads them to show each session's
//! validation state. Keeping the key naming and the readable fields here gives both one
//! definition.

use std::time::Duration;

use serde::Deserialize;

use crate::redis_connection::{LazyRedis, RedisCall};
use crate::session::ValidationState;
use crate::{RedisTarget, StoreError};

/// The hash tag all validation keys of `namespace` start with, `{sg-validation:NAMESPACE}`: one
/// Redis Cluster slot per namespace, so a namespace's records can be read with one MGET.
///
/// Only `[A-Za-z0-9.-]` of the namespace are kept: braces would move the keys to another slot
/// (a namespace is a DNS label anyway).
pub fn validation_key_prefix(namespace: &str) -> String {
    let namespace: String = namespace
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect();
    format!("{{sg-validation:{namespace}}}")
}

/// The key of the validation record of session `id` in `namespace`.
pub fn validation_record_key(namespace: &str, id: impl std::fmt::Display) -> String {
    format!("{}:r:{id}", validation_key_prefix(namespace))
}

/// What a reader needs of a validation record (the sidecar's record has more fields, which are
/// ignored here).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ValidationRecordState {
    /// Where validation stands.
    pub state: ValidationState,
}

/// The state of a stored validation record; `None` if it is not one.
pub fn parse_validation_state(json: &[u8]) -> Option<ValidationState> {
    serde_json::from_slice::<ValidationRecordState>(json)
        .ok()
        .map(|record| record.state)
}

/// Reads validation states from the Redis a namespace's sidecars use, without renewing the
/// records (a plain GET: reading must not keep a record alive past its session).
pub struct ValidationReader {
    redis: LazyRedis,
}

impl ValidationReader {
    /// A reader of `target`; each call waits at most `timeout`.
    pub fn new(target: RedisTarget, timeout: Duration) -> Self {
        Self {
            redis: LazyRedis::new(target, timeout),
        }
    }

    /// The validation state of each of `ids` in `namespace`, in order; `None` where there is no
    /// record (no validators, or the record expired). One MGET: the keys share a slot.
    pub async fn states(
        &self,
        namespace: &str,
        ids: &[String],
    ) -> Result<Vec<Option<ValidationState>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for id in ids {
            cmd.arg(validation_record_key(namespace, id));
        }
        let values: Vec<Option<Vec<u8>>> =
            redis::FromRedisValue::from_redis_value(self.redis.run(RedisCall::Plain(cmd)).await?)
                .map_err(|_| StoreError::Fatal("validation states: malformed reply".into()))?;
        Ok(values
            .iter()
            .map(|value| value.as_deref().and_then(parse_validation_state))
            .collect())
    }

    /// How each `(policy, validator)` of `namespace` has been answering lately, in order (see
    /// [`crate::validator_health`]); one script run, the keys share a slot.
    pub async fn validator_health(
        &self,
        namespace: &str,
        validators: &[(String, String)],
    ) -> Result<Vec<crate::validator_health::ValidatorStats>, StoreError> {
        use crate::validator_health::{READ_LUA, stats_from_fields, validator_health_key};
        if validators.is_empty() {
            return Ok(Vec::new());
        }
        let script = redis::Script::new(READ_LUA);
        let mut invocation = script.prepare_invoke();
        for (policy, validator) in validators {
            invocation.key(validator_health_key(namespace, policy, validator));
        }
        let value = self.redis.run(RedisCall::Script(invocation)).await?;
        let malformed = || StoreError::Fatal("validator health: malformed reply".into());
        let redis::Value::Array(items) = value else {
            return Err(malformed());
        };
        let mut items = items.into_iter();
        let Some(redis::Value::Int(now_ms)) = items.next() else {
            return Err(malformed());
        };
        let mut stats = Vec::with_capacity(validators.len());
        for item in items {
            let fields: std::collections::HashMap<String, String> =
                redis::FromRedisValue::from_redis_value(item).map_err(|_| malformed())?;
            stats.push(stats_from_fields(&fields, now_ms));
        }
        if stats.len() != validators.len() {
            return Err(malformed());
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_a_namespace_share_one_hash_tag() {
        assert_eq!(
            validation_record_key("streaming", "ab12"),
            "{sg-validation:streaming}:r:ab12"
        );
        assert_eq!(
            validation_key_prefix("we{i}rd ns"),
            "{sg-validation:weirdns}",
            "braces would change the slot"
        );
    }

    #[test]
    fn the_state_is_read_and_other_fields_ignored() {
        let record =
            br#"{"state":"denied","validator":"v","facts":{},"admittedAtMs":1,"checks":2}"#;
        assert_eq!(
            parse_validation_state(record),
            Some(ValidationState::Denied)
        );
        assert_eq!(parse_validation_state(b"{\"state\":\"nope\"}"), None);
        assert_eq!(parse_validation_state(b"garbage"), None);
    }
}
