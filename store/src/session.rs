//! Session records as stores keep them, and the JSON view the API returns.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A session id: 128 random bits and the 32-bit tag of its account, written as 40 lowercase hex
/// digits.
///
/// The tag lets a shared store find a session's keys from its id alone: the Redis store puts all
/// keys of an account, and of its sessions, under the account's tag, so one script in one
/// Redis Cluster slot answers a lookup by id. The tag is derived from the account by hashing, so
/// callers cannot choose it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId {
    /// 128 bits from a CSPRNG: what makes the id unguessable.
    pub random: u128,
    /// [`account_tag`] of the session's account.
    pub tag: u32,
}

impl SessionId {
    /// A new id for a session of `account`.
    pub fn for_account(account: &str) -> Self {
        Self {
            random: rand::random(),
            tag: account_tag(account),
        }
    }
}

/// The 32-bit tag of an account: the first four bytes of SHA-256 of its id. Stable across
/// processes and versions, since shared stores key data by it.
pub fn account_tag(account: &str) -> u32 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(account.as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}{:08x}", self.random, self.tag)
    }
}

impl FromStr for SessionId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !crate::validate::is_session_id(s) {
            return Err(());
        }
        let random = u128::from_str_radix(&s[..32], 16).map_err(|_| ())?;
        let tag = u32::from_str_radix(&s[32..], 16).map_err(|_| ())?;
        Ok(Self { random, tag })
    }
}

/// Lifecycle state of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum SessionState {
    /// Holds a slot; heartbeats renew it.
    Active,
    /// Cut by the limiter or an admin (reason `evicted` or `kicked`).
    Revoked,
    /// Missed heartbeats for its TTL.
    Expired,
}

/// Where a session's validation by session validators stands; shown as `validation` in
/// session answers. Decided by the sidecar's validation, kept here with the session view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum ValidationState {
    /// A check is under way (or waits to be taken over by another sidecar).
    Pending,
    /// Every validator allowed the session.
    Allowed,
    /// A validator denied the session: it is revoked (reason `denied`).
    Denied,
    /// A validator gave no answer within its timeout (failurePolicy `Allow` keeps the
    /// session, `Revoke` cuts it).
    Failed,
}

impl ValidationState {
    /// The state as it appears in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Failed => "failed",
        }
    }
}

/// Why a session is no longer active.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum EndReason {
    /// Revoked to admit a newer stream of the same account (EvictOldest).
    Evicted,
    /// Revoked by an admin.
    Kicked,
    /// No heartbeat within the TTL.
    Expired,
    /// Revoked on a session validator's verdict (a denial, or no answer under failurePolicy
    /// `Revoke`); `validationMessage` says why.
    Denied,
    /// Revoked by sharing detection: used from more client networks than allowed.
    Shared,
}

impl EndReason {
    /// The reason as it appears in JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Evicted => "evicted",
            EndReason::Kicked => "kicked",
            EndReason::Expired => "expired",
            EndReason::Denied => "denied",
            EndReason::Shared => "shared",
        }
    }
}

/// A session as a store keeps it. Times are milliseconds since the Unix epoch on the store's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// Unique id.
    pub id: SessionId,
    /// Account that owns the session.
    pub account: String,
    /// The player's stream id, unique among the account's active sessions.
    pub stream_id: String,
    /// Current state.
    pub state: SessionState,
    /// Why it ended, when not active.
    pub reason: Option<EndReason>,
    /// When it was admitted.
    pub created_at_ms: i64,
    /// Active: when it expires without a heartbeat. Ended: when it stopped being valid.
    pub expires_at_ms: i64,
    /// The TTL it was last renewed with; a cut session stays answerable this long.
    pub ttl_ms: i64,
}

impl SessionRecord {
    /// True while the session holds a slot at `now_ms`.
    pub fn is_active_at(&self, now_ms: i64) -> bool {
        self.state == SessionState::Active && now_ms < self.expires_at_ms
    }
}

/// A revocation notice: a session was evicted, kicked or expired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// The session as it was cut.
    pub session: SessionRecord,
    /// True when this process made the decision, false when it learned of it from the store;
    /// metrics count local decisions only, so a fleet's counters add up.
    pub local: bool,
}

/// A session as the API returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// 40 hex digits; the key for `/v1/sessions/{sessionId}` and the proxy's session header.
    #[schema(example = "6f1c0f9e2a9b4d8c8e7f00112233aabbdef0b17f")]
    pub session_id: String,
    /// The account.
    pub account: String,
    /// The player's stream id.
    pub stream_id: String,
    /// `active`, `revoked` or `expired`.
    pub state: SessionState,
    /// Why the session ended, when it is not active.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<EndReason>,
    /// When the session was admitted (RFC 3339).
    pub created_at: String,
    /// Active: when it expires without a heartbeat. Otherwise: when it ended (RFC 3339).
    pub expires_at: String,
    /// How often the player should heartbeat.
    pub heartbeat_interval_seconds: u32,
    /// The account's limit of concurrent sessions.
    pub limit: u32,
    /// The account's active sessions now.
    pub active_sessions: u32,
    /// Where the session's validation stands, when its policy has validators: `pending`,
    /// `allowed`, `denied` or `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationState>,
    /// Reason `denied`: the validator's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_message: Option<String>,
}

/// Formats store milliseconds as RFC 3339 with millisecond precision.
pub fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Session {
    /// The API view of `record` under the account's current `limit` and heartbeat interval.
    pub fn view(
        record: &SessionRecord,
        limit: u32,
        heartbeat_interval_seconds: u32,
        active: u32,
    ) -> Self {
        Self {
            session_id: record.id.to_string(),
            account: record.account.clone(),
            stream_id: record.stream_id.clone(),
            state: record.state,
            reason: record.reason,
            created_at: rfc3339(record.created_at_ms),
            expires_at: rfc3339(record.expires_at_ms),
            heartbeat_interval_seconds,
            limit,
            active_sessions: active,
            validation: None,
            validation_message: None,
        }
    }
}

/// A short, stable fingerprint of an identifier (account, session id, token) for logs: enough
/// to correlate lines, useless to replay.
pub fn fingerprint(value: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(value.as_bytes());
    format!(
        "#{:02x}{:02x}{:02x}{:02x}",
        digest[0], digest[1], digest[2], digest[3]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_round_trips_as_32_hex() {
        let id = SessionId::for_account("123");
        let text = id.to_string();
        assert_eq!(text.len(), 40);
        assert_eq!(text.parse::<SessionId>(), Ok(id));
        let fixed = SessionId {
            random: 1,
            tag: 0xab,
        };
        assert_eq!(fixed.to_string(), format!("{}1000000ab", "0".repeat(31)));
        assert!("xyz".parse::<SessionId>().is_err());
    }

    #[test]
    fn ids_of_one_account_share_its_tag() {
        let a = SessionId::for_account("acct");
        let b = SessionId::for_account("acct");
        assert_ne!(a, b);
        assert_eq!(a.tag, b.tag);
        assert_eq!(a.tag, account_tag("acct"));
        // SHA-256("acct") starts with these bytes; stores depend on the tag never changing.
        assert_eq!(account_tag("acct"), 0xdef0b17f);
    }

    #[test]
    fn rfc3339_has_millis_and_z() {
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
