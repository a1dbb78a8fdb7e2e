//! StreamGate's session stores: where sessions live, and the atomic per-account operations on
//! them. The sidecar admits through them; the operator reads them (live sessions, counts).
//!
//! Every store implements [`SessionStore`]; the contract test suite (the sidecar's
//! `tests/store_contract.rs`) runs against each of them. A store applies [`crate::admission::decide`] atomically per account:
//! whatever the concurrency, an account never has more active sessions than its limit
//! (except in DryRun, which admits over the limit by design).

#![forbid(unsafe_code)]

pub mod admission;
pub mod clock;
pub mod media;
pub mod memory;
pub mod redis_connection;
pub mod redis_store;
pub mod session;
pub mod validate;
pub mod validation_record;
pub mod validator_health;

/// The policy types, from the `streamgate-policy` crate.
pub use streamgate_policy as policy;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::admission::OverLimit;
use crate::media::{NetworkKey, StreamClaim, StreamHolder};
use crate::policy::{Mode, OnLimitExceeded};
use crate::session::{EndReason, Revocation, SessionId, SessionRecord, SessionState};

pub use memory::MemoryStore;
pub use redis_store::{RedisStore, RedisTarget};

/// A failed store operation, typed by what the engine may do about it.
///
/// Only [`StoreError::Unavailable`] and [`StoreError::TimedOut`] mean "the store could not be
/// asked": the policy's failurePolicy may apply (when the engine's breaker judges the store
/// down). A [`StoreError::Fatal`] error means the store answered in a way the
/// sidecar cannot trust (a script error, a malformed reply, out of memory, a key of the wrong
/// type): admitting anyone on it would turn a bug into an open door, so it never admits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Transient: connection refused or lost, the server loading or failing over.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// Transient: the store did not answer in time (slow, or stopped). Whether failurePolicy
    /// applies is the engine's circuit breaker's call (the sidecar's breaker): slow is not down.
    #[error("session store timed out: {0}")]
    TimedOut(String),
    /// The store answered wrongly; retrying will not help.
    #[error("session store error: {0}")]
    Fatal(String),
    /// The store made the change but fewer replicas than `--store-wait-replicas` acknowledged it
    /// in time: a failover now could lose it. Answered 503 with Retry-After; the store is up,
    /// so failurePolicy does not apply.
    #[error("session store change not replicated: {0}")]
    NotReplicated(String),
    /// The embedded store is at its live-session cap.
    #[error("session store full: {0} live sessions")]
    AtCapacity(u64),
}

impl StoreError {
    /// True for errors under which failurePolicy applies.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::TimedOut(_))
    }
}

/// What a media request found: the session by id, renewed if its last renewal was old enough.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Touched {
    /// The session, active or cut within its TTL.
    pub session: SessionRecord,
    /// True when this request renewed it (an implicit heartbeat).
    pub renewed: bool,
}

/// One page of [`SessionStore::list_all`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionPage {
    /// Active sessions, in id order.
    pub sessions: Vec<SessionRecord>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next_after: Option<SessionId>,
}

/// A request to open (or renew) the session of `(account, stream_id)`.
#[derive(Clone, Debug)]
pub struct OpenRequest<'a> {
    /// The account.
    pub account: &'a str,
    /// The player's stream id.
    pub stream_id: &'a str,
    /// The account's limit.
    pub limit: u32,
    /// Session TTL in milliseconds.
    pub ttl_ms: i64,
    /// Over-limit action.
    pub on_limit: OnLimitExceeded,
    /// Enforce or dry run.
    pub mode: Mode,
}

impl OpenRequest<'_> {
    /// The active session this request creates when admitted at `now_ms`, with a fresh id.
    pub fn new_session(&self, now_ms: i64) -> SessionRecord {
        SessionRecord {
            id: SessionId::for_account(self.account),
            account: self.account.to_string(),
            stream_id: self.stream_id.to_string(),
            state: SessionState::Active,
            reason: None,
            created_at_ms: now_ms,
            expires_at_ms: now_ms + self.ttl_ms,
            ttl_ms: self.ttl_ms,
        }
    }
}

/// What an open did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenOutcome {
    /// `(account, stream_id)` already had an active session: renewed, no new slot used.
    Renewed {
        /// The renewed session.
        session: SessionRecord,
        /// The account's active sessions.
        active: u32,
    },
    /// A new session was admitted.
    Admitted {
        /// The new session.
        session: SessionRecord,
        /// Sessions revoked to make room (EvictOldest), oldest first.
        evicted: Vec<SessionRecord>,
        /// The account's active sessions, including the new one.
        active: u32,
        /// In DryRun at the limit: what enforcement would have done.
        dry_run: Option<OverLimit>,
    },
    /// Refused (RejectNew at the limit).
    Refused {
        /// The account's active sessions, oldest first.
        active: Vec<SessionRecord>,
    },
}

/// What a heartbeat found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    /// The session was active and is renewed.
    Renewed {
        /// The renewed session.
        session: SessionRecord,
        /// The account's active sessions.
        active: u32,
    },
    /// The session was cut (revoked or expired) within the last TTL.
    Gone(SessionRecord),
    /// No such session.
    NotFound,
}

/// What a kick found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KickOutcome {
    /// The session was active and is now revoked, reason `kicked`.
    Kicked(SessionRecord),
    /// The session had already been cut.
    AlreadyGone(SessionRecord),
    /// No such session.
    NotFound,
}

/// Where sessions live. All operations on one account are atomic with respect to each other.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Opens a session for `(account, stream_id)`, or renews it if one is active.
    async fn open(&self, request: &OpenRequest<'_>) -> Result<OpenOutcome, StoreError>;

    /// Renews the active session of `(account, stream_id)` for `ttl_ms`.
    async fn heartbeat(
        &self,
        account: &str,
        stream_id: &str,
        ttl_ms: i64,
    ) -> Result<HeartbeatOutcome, StoreError>;

    /// Ends the active session of `(account, stream_id)` and frees its slot. `None` if none.
    async fn end(
        &self,
        account: &str,
        stream_id: &str,
    ) -> Result<Option<SessionRecord>, StoreError>;

    /// The account's active sessions, oldest first.
    async fn list(&self, account: &str) -> Result<Vec<SessionRecord>, StoreError>;

    /// One session, active or recently cut, without renewing it.
    async fn get(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError>;

    /// Revokes a session, reason `kicked`.
    async fn kick(&self, id: SessionId) -> Result<KickOutcome, StoreError> {
        self.revoke(id, EndReason::Kicked).await
    }

    /// Revokes a session for `reason` (`kicked`, `shared` by sharing detection, `denied` by a
    /// session validator).
    async fn revoke(&self, id: SessionId, reason: EndReason) -> Result<KickOutcome, StoreError>;

    /// A media request's look-up: the session `id` (active or cut within its TTL), renewed for
    /// `ttl_ms` when it is active and its last renewal is at least `renew_after_ms` old on the
    /// store's clock. `None` if there is no such session.
    async fn touch(
        &self,
        id: SessionId,
        ttl_ms: i64,
        renew_after_ms: i64,
    ) -> Result<Option<Touched>, StoreError>;

    /// Records that active session `id` was used from client `network` (sharing detection,
    /// [`media::MediaUse::note_network`]): returns the distinct networks it was used from within
    /// the last `window_ms` across every sidecar, this one included, counting at most `keep`;
    /// `None` when the session is not active. Media use is soft state: not waited for by
    /// replicas (`--store-wait-replicas`), as losing some in a failover only forgets some use.
    async fn note_network(
        &self,
        id: SessionId,
        network: NetworkKey,
        window_ms: i64,
        keep: u32,
    ) -> Result<Option<u32>, StoreError>;

    /// Claims, or renews, one of active session `id`'s at most `max` long-lived responses for
    /// `holder`, for `lease_ms` ([`media::MediaUse::claim_stream`]): one session, one stream,
    /// across every sidecar.
    async fn claim_stream(
        &self,
        id: SessionId,
        holder: StreamHolder,
        max: u32,
        lease_ms: i64,
    ) -> Result<StreamClaim, StoreError>;

    /// Drops `holder`'s claim on session `id`'s streams (its response ended).
    async fn release_stream(&self, id: SessionId, holder: StreamHolder) -> Result<(), StoreError>;

    /// Writes back a session admitted without the store (failurePolicy Open during an outage),
    /// with its id and creation time, renewed from now. Admitted whatever the account's count
    /// (it was admitted already); refused (`false`) when its stream has another active session
    /// by now, which then wins, or when the session was ended within its TTL (its id may have
    /// reached the store after all and been ended through another sidecar: it stays ended).
    /// `true` also when the session is already stored.
    async fn adopt(&self, session: &SessionRecord) -> Result<bool, StoreError>;

    /// Checks that the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Checks that the store is configured so that it keeps what it is told (a Redis that may
    /// evict keys would forget sessions and over-admit). `Err` says why not, for readiness.
    async fn check_config(&self) -> Result<(), String> {
        Ok(())
    }

    /// Active sessions across all accounts, when the store can count them cheaply.
    async fn active_sessions(&self) -> Result<Option<u64>, StoreError>;

    /// Active sessions of every account in id order, those with an id after `after`, at most
    /// `limit` per page (a page may hold fewer and still have a next one). For listing (the
    /// operator's live-session API), not for admission: not atomic across accounts, and it
    /// walks the whole store (on Redis every account hash, for every page), so callers page
    /// and do not poll it per request of a player.
    async fn list_all(
        &self,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<SessionPage, StoreError>;

    /// Revocation notices (evicted, kicked, expired), local and, for shared stores, remote.
    fn revocations(&self) -> broadcast::Receiver<Revocation>;

    /// The store's background work (expiry, subscriptions), to be run until `shutdown`. The
    /// owner spawns it; a store never spawns tasks by itself.
    fn background(&self, shutdown: CancellationToken) -> Option<BoxFuture<'static, ()>>;

    /// For shared stores: whether the subscription to other sidecars' revocations is
    /// established now (`true` from the start for stores that have none).
    fn subscribed(&self) -> watch::Receiver<bool>;

    /// The session id of this process's latest open of `(account, stream_id)` whose answer
    /// never came in time, if any, which the store will then no longer discard: its script may
    /// have run, so the store may hold that session. An admission without the store reuses the
    /// id, so the session the viewer is given and the one the store may hold are one and the
    /// same (written back as "present", renewed by the viewer's heartbeats). `None` for stores
    /// that cannot time out.
    fn take_abandoned(&self, _account: &str, _stream_id: &str) -> Option<SessionId> {
        None
    }
}
