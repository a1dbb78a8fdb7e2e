//! The session engine: applies the account's policy to store operations, handles a store outage
//! by the policy's `failurePolicy`, and counts what it decides.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admission::OverLimit;
use crate::breaker::{Breaker, BreakerConfig, Outcome};
use crate::metrics::Metrics;
use crate::playback::{KeyRing, Playback};
use crate::policy::{EffectivePolicy, FailurePolicy, Mode, PolicySet, SharingAction};
use crate::session::{
    EndReason, Revocation, Session, SessionId, SessionRecord, SessionState, account_tag,
};
use crate::store::media::{StreamClaim, StreamHolder};
use crate::store::{
    HeartbeatOutcome, KickOutcome, OpenOutcome, OpenRequest, SessionStore, StoreError,
};

/// What a use of a session was, for sharing detection ([`Engine::observe_use`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionUse {
    /// An open (new or renewing) answered with a token.
    Open,
    /// A heartbeat answered with a token.
    Heartbeat,
    /// A media request.
    Media,
}

/// How long a long-lived media response's claim on its session's streams lasts unless renewed
/// (the proxy renews it every third of this while the response streams): a sidecar that dies
/// mid-stream holds its session's stream for this long at most.
pub const MEDIA_STREAM_LEASE: Duration = Duration::from_secs(15);

/// The policies in force; replaced whole on reload, read lock-free on every request.
pub type Policies = Arc<ArcSwap<PolicySet>>;

/// Result of opening a stream.
#[derive(Debug)]
pub enum Opened {
    /// A new session (201).
    Created {
        /// The session.
        session: Session,
        /// In DryRun at the limit: what enforcement would have done.
        dry_run: Option<OverLimit>,
        /// Admitted without the store under failurePolicy Open.
        degraded: bool,
    },
    /// The stream already had an active session, now renewed (200).
    Renewed(Session),
    /// Refused over the limit (429).
    Refused {
        /// The account's limit.
        limit: u32,
        /// The account's active sessions, oldest first.
        sessions: Vec<Session>,
    },
}

/// Result of a heartbeat.
#[derive(Debug)]
pub enum Heartbeat {
    /// Renewed (200).
    Renewed(Session),
    /// Cut within the last TTL (410).
    Gone(Session),
    /// No such session (404).
    NotFound,
}

/// Result of a kick.
#[derive(Debug)]
pub enum Kicked {
    /// Revoked now (204).
    Kicked(Session),
    /// Already cut (410).
    AlreadyGone(Session),
    /// No such session (404).
    NotFound,
}

/// Why the engine could not answer. The HTTP layer maps each to one generic answer; the detail
/// has been logged and counted by the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The store is unavailable (the breaker judges it down) and failurePolicy does not admit,
    /// or this sidecar already admitted the account's limit without the store: 503
    /// `store_unavailable`.
    #[error("the session store is unavailable")]
    Unavailable,
    /// The store did not answer in time but is not judged down: 503 `store_unavailable`, never
    /// admitted under failurePolicy Open (slow is not down).
    #[error("the session store did not answer in time")]
    Slow,
    /// The store answered wrongly (fatal): 500 `internal_error`. Never admits.
    #[error("internal error")]
    Internal,
    /// The embedded store is at its session cap: 503 `capacity_exceeded`.
    #[error("the session store is full")]
    AtCapacity,
}

/// What a media request may do.
#[derive(Debug)]
pub enum MediaAccess {
    /// Forward it. `session` is what the store (or, for a degraded session, this sidecar) knows
    /// of the session; `None` when the store could not be asked and failurePolicy Open lets an
    /// established session through unverified.
    Allowed {
        /// The session, when known.
        session: Option<SessionRecord>,
        /// True when this request renewed the session (implicit heartbeat).
        renewed: bool,
        /// True when the store was not consulted successfully (outage under failurePolicy Open).
        degraded: bool,
    },
    /// DryRun: the session was cut, but the request is let through and counted.
    AllowedDryRun(SessionRecord),
    /// The session was cut (403 `session_gone`).
    Gone(Session),
    /// No such session (403 `not_found`).
    NotFound,
}

/// Store operations, as metric label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Open or renew a stream.
    Open,
    /// Heartbeat.
    Heartbeat,
    /// End a stream.
    End,
    /// List an account's sessions.
    List,
    /// Read a session by id.
    Get,
    /// Kick a session.
    Kick,
    /// Authorize a media request.
    Media,
    /// Write back a degraded admission.
    Adopt,
    /// Readiness check.
    Ping,
    /// Count active sessions.
    ActiveSessions,
}

impl Operation {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Open => "open",
            Operation::Heartbeat => "heartbeat",
            Operation::End => "end",
            Operation::List => "list",
            Operation::Get => "get",
            Operation::Kick => "kick",
            Operation::Media => "media",
            Operation::Adopt => "adopt",
            Operation::Ping => "ping",
            Operation::ActiveSessions => "active_sessions",
        }
    }
}

/// Degraded admissions kept for writing back to the store once it answers again.
pub const DEGRADED_CAPACITY: usize = 10_000;
/// How long a fatal store error keeps `/readyz` failing.
pub const FATAL_UNREADY: Duration = Duration::from_secs(30);

/// Sessions admitted without the store (failurePolicy Open), remembered (at most
/// [`DEGRADED_CAPACITY`], oldest forgotten first) so that media requests and heartbeats of them
/// are honoured, and written back to the store when it answers again.
#[derive(Default)]
struct Degraded {
    by_id: HashMap<SessionId, SessionRecord>,
    order: VecDeque<SessionId>,
}

impl Degraded {
    fn remember(&mut self, record: SessionRecord) {
        if self.by_id.len() >= DEGRADED_CAPACITY
            && let Some(oldest) = self.order.pop_front()
        {
            self.by_id.remove(&oldest);
        }
        self.order.push_back(record.id);
        self.by_id.insert(record.id, record);
    }

    fn forget(&mut self, id: SessionId) {
        if self.by_id.remove(&id).is_some() {
            self.order.retain(|x| *x != id);
        }
    }

    /// The account's degraded sessions still within their TTL at `now_ms`.
    fn live_for(&self, account: &str, now_ms: i64) -> u32 {
        self.by_id
            .values()
            .filter(|r| r.account == account && r.expires_at_ms > now_ms)
            .count() as u32
    }

    fn by_stream(&self, account: &str, stream_id: &str) -> Option<SessionRecord> {
        self.by_id
            .values()
            .find(|r| r.account == account && r.stream_id == stream_id)
            .cloned()
    }
}

/// Override accounts by their tag, so a session id (which carries its account's tag) finds its
/// account's policy before the store is asked. Rebuilt when the policy set changes.
struct TagIndex {
    set: Arc<PolicySet>,
    accounts: HashMap<u32, Vec<String>>,
}

impl TagIndex {
    fn new(set: Arc<PolicySet>) -> Self {
        let mut accounts: HashMap<u32, Vec<String>> = HashMap::new();
        for policy in set.policies() {
            for account in &policy.spec.accounts {
                accounts
                    .entry(account_tag(account))
                    .or_default()
                    .push(account.clone());
            }
        }
        Self { set, accounts }
    }
}

/// The session engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    store: Arc<dyn SessionStore>,
    policies: Policies,
    metrics: Arc<Metrics>,
    degraded: Arc<Mutex<Degraded>>,
    tags: Arc<ArcSwap<TagIndex>>,
    /// When the last fatal store error happened (ms on the sidecar's clock), or 0.
    last_fatal_ms: Arc<AtomicI64>,
    /// Whether the store is down, from recent call outcomes.
    breaker: Arc<Mutex<Breaker>>,
    /// Viewer identity under the ViewerAuthentication in force.
    identity: Arc<crate::identity::Authenticator>,
    /// Session validators: ledger, clients, checks in flight.
    validations: Arc<crate::validation::Validations>,
    /// Playback token keys and switches, and sharing detection's memory.
    playback: Arc<Playback>,
}

impl Engine {
    /// An engine over `store` enforcing `policies`. Starts nothing: the owner runs
    /// [`Engine::background`] (and the store's) under its shutdown token.
    pub fn new(store: Arc<dyn SessionStore>, policies: Policies, metrics: Arc<Metrics>) -> Self {
        let tags = Arc::new(ArcSwap::from_pointee(TagIndex::new(policies.load_full())));
        let identity = Arc::new(crate::identity::Authenticator::new(
            policies.clone(),
            reqwest::Client::new(),
        ));
        Self {
            identity,
            store,
            policies,
            metrics,
            degraded: Arc::default(),
            tags,
            last_fatal_ms: Arc::new(AtomicI64::new(0)),
            breaker: Arc::new(Mutex::new(Breaker::new(
                BreakerConfig::default(),
                chrono::Utc::now().timestamp_millis(),
            ))),
            validations: Arc::new(crate::validation::Validations::new(Arc::new(
                crate::validation::MemoryLedger::default(),
            ))),
            playback: Arc::new(Playback::new(KeyRing::generate())),
        }
    }

    /// Uses `playback` (shared key ring and switches) instead of a fresh random key.
    pub fn with_playback(mut self, playback: Arc<Playback>) -> Self {
        self.playback = playback;
        self
    }

    /// Playback token keys and switches.
    pub fn playback(&self) -> &Arc<Playback> {
        &self.playback
    }

    /// A playback token for `session` (an active session in an open or heartbeat answer),
    /// bound to `client`'s network when binding is on. Returns the token and its expiry
    /// (RFC 3339).
    pub fn playback_token(
        &self,
        session: &Session,
        client: Option<std::net::IpAddr>,
    ) -> Option<(String, String)> {
        if session.state != SessionState::Active {
            return None;
        }
        let id: SessionId = session.session_id.parse().ok()?;
        let now = chrono::Utc::now().timestamp();
        let (token, expires_at) = self.playback.mint_for(
            id,
            &session.account,
            &session.stream_id,
            session.heartbeat_interval_seconds,
            client,
            now,
        );
        self.metrics.playback.tokens_issued.inc();
        Some((token, crate::session::rfc3339(expires_at * 1000)))
    }

    /// The policy that applies to `account` now.
    pub fn policy_of(&self, account: &str) -> EffectivePolicy {
        self.policy_for(account)
    }

    /// The API view of a cut session `record` (no active count).
    pub fn view_of(&self, record: &SessionRecord) -> Session {
        let policy = self.policy_for(&record.account);
        self.view(record, &policy, 0)
    }

    /// Sharing detection: records that session `id` of `account` was used from `client`. When
    /// it was used from more networks than the account's policy allows within its window, the
    /// session is reported and, under `action: Revoke` (and not in DryRun), revoked with reason
    /// `shared`. Returns true when it was revoked.
    ///
    /// Networks are counted across every sidecar by the store: a network is reported to it
    /// when new to this sidecar and then every quarter window while in use, except on an
    /// open (`SessionUse::Open`), whose network is reported on the session's next use, so an
    /// admission stays a single store call.
    pub async fn observe_use(
        &self,
        id: SessionId,
        account: &str,
        client: std::net::IpAddr,
        kind: SessionUse,
    ) -> bool {
        let policy = self.policy_for(account);
        let now_ms = chrono::Utc::now().timestamp_millis();
        let window_ms = i64::from(policy.sharing.window_seconds) * 1000;
        let observed = self.playback.observe_network(
            id,
            client,
            now_ms,
            policy.sharing.window_seconds,
            kind == SessionUse::Open,
        );
        let mut networks = observed.networks as u32;
        if observed.report && !self.store_down() {
            // The store counts the networks every sidecar saw; while it cannot be asked (and
            // while the breaker judges it down, so that requests do not wait on it twice), this
            // sidecar's own count still applies.
            let network = crate::playback::Network::of(client).key();
            let keep = policy.sharing.max_networks.saturating_add(1);
            match self.store.note_network(id, network, window_ms, keep).await {
                Ok(fleet) => {
                    self.answered();
                    networks = networks.max(fleet.unwrap_or(0));
                }
                Err(error) => {
                    let error = self.store_failed(Operation::Media, error);
                    tracing::debug!(%error, "sharing detection counts this sidecar's networks only");
                }
            }
        }
        if networks <= policy.sharing.max_networks {
            return false;
        }
        let action = policy.sharing.action;
        self.metrics
            .playback
            .sharing_detected
            .get_or_create(&crate::metrics::SharingLabel {
                action: action.as_str(),
            })
            .inc();
        tracing::warn!(account = %fingerprint(account), session = %fingerprint(&id.to_string()),
            networks, max_networks = policy.sharing.max_networks, action = action.as_str(),
            "session used from more client networks than allowed");
        if action != SharingAction::Revoke || policy.mode == Mode::DryRun {
            return false;
        }
        match self.revoke(id, EndReason::Shared).await {
            Ok(Kicked::Kicked(_)) => {
                self.playback.forget(id);
                true
            }
            Ok(_) => false,
            Err(error) => {
                tracing::warn!(%error, "could not revoke a shared session; retried on its next use");
                false
            }
        }
    }

    /// Claims, or renews, one of session `id`'s at most `max` long-lived media responses for
    /// `holder` across every sidecar ([`SessionStore::claim_stream`]), for
    /// [`MEDIA_STREAM_LEASE`]. `None` when the store cannot be asked, or the breaker judges it
    /// down: then only this sidecar's own count of the session's streams applies.
    pub async fn claim_media_stream(
        &self,
        id: SessionId,
        holder: StreamHolder,
        max: u32,
    ) -> Option<StreamClaim> {
        if self.store_down() {
            return None;
        }
        let lease_ms = MEDIA_STREAM_LEASE.as_millis() as i64;
        match self.store.claim_stream(id, holder, max, lease_ms).await {
            Ok(claim) => {
                self.answered();
                Some(claim)
            }
            Err(error) => {
                let error = self.store_failed(Operation::Media, error);
                tracing::warn!(%error, "a media stream's claim was not recorded; this sidecar's own count applies");
                None
            }
        }
    }

    /// Drops `holder`'s claim on session `id`'s streams. A claim that cannot be dropped lapses
    /// one lease later.
    pub async fn release_media_stream(&self, id: SessionId, holder: StreamHolder) {
        if let Err(error) = self.store.release_stream(id, holder).await {
            tracing::debug!(%error, "a media stream's claim lapses instead of being released");
        }
    }

    /// Fetches the `jwksUri` key sets of a hand-written policy file with `client` (e.g. one
    /// that trusts a private CA) instead of a default client.
    pub fn with_jwks_client(mut self, client: reqwest::Client) -> Self {
        self.identity = Arc::new(crate::identity::Authenticator::new(
            self.policies.clone(),
            client,
        ));
        self
    }

    /// Viewer identity under the ViewerAuthentication in force.
    pub fn identity(&self) -> &Arc<crate::identity::Authenticator> {
        &self.identity
    }

    /// Keeps validation records and pending checks in `ledger` (the Redis one for a shared
    /// store, so other sidecars take over checks) instead of this process's memory.
    pub fn with_validation_ledger(
        mut self,
        ledger: Arc<dyn crate::validation::ValidationLedger>,
    ) -> Self {
        self.validations = Arc::new(crate::validation::Validations::new(ledger));
        self
    }

    /// Session validation.
    pub fn validations(&self) -> &Arc<crate::validation::Validations> {
        &self.validations
    }

    /// The store's revocation with reason `denied`, on a validator's verdict (counted by the
    /// caller).
    pub(crate) async fn store_deny(&self, id: SessionId) -> Result<KickOutcome, EngineError> {
        self.store
            .revoke(id, EndReason::Denied)
            .await
            .inspect(|_| self.answered())
            .map_err(|e| self.store_failed(Operation::Kick, e))
    }

    /// Replaces the breaker's thresholds (the breaker starts closed again).
    pub fn with_breaker(self, config: BreakerConfig) -> Self {
        *self.lock_breaker() = Breaker::new(config, chrono::Utc::now().timestamp_millis());
        self
    }

    fn lock_breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        // Plain state under the lock: a poisoned lock is still consistent.
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the breaker the store answered.
    fn answered(&self) {
        self.lock_breaker()
            .record(Outcome::Answered, chrono::Utc::now().timestamp_millis());
    }

    /// Whether the breaker judges the store down now.
    pub fn store_down(&self) -> bool {
        self.lock_breaker().is_open()
    }

    /// The policies in force, for the policy file watcher that replaces them.
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Revocation notices of the store (this sidecar's own decisions and, on a shared store,
    /// every other sidecar's), for the enforcing proxy.
    pub fn revocations(&self) -> broadcast::Receiver<Revocation> {
        self.store.revocations()
    }

    /// Whether the store's revocation subscription is established; tests wait on it.
    pub fn subscribed(&self) -> watch::Receiver<bool> {
        self.store.subscribed()
    }

    /// The mode (Enforce or DryRun) of `account`'s policy.
    pub fn mode_for(&self, account: &str) -> Mode {
        self.policies.load().resolve(account).mode
    }

    /// Background work of the engine and its store, each to be spawned by the owner; all end
    /// when `shutdown` is cancelled.
    pub fn background(&self, shutdown: CancellationToken) -> Vec<BoxFuture<'static, ()>> {
        let mut tasks: Vec<BoxFuture<'static, ()>> = vec![
            Box::pin(count_expirations(
                self.store.revocations(),
                self.metrics.clone(),
                shutdown.clone(),
            )),
            Box::pin(restore_degraded_loop(self.clone(), shutdown.clone())),
            Box::pin(report_subscription(
                self.store.subscribed(),
                self.metrics.clone(),
                shutdown.clone(),
            )),
        ];
        tasks.push(Box::pin(
            self.identity
                .clone()
                .run(crate::identity::JWKS_POLL, shutdown.clone()),
        ));
        tasks.push(Box::pin(crate::validation::claim_loop(
            self.clone(),
            shutdown.clone(),
        )));
        tasks.extend(self.store.background(shutdown));
        tasks
    }

    fn policy_for(&self, account: &str) -> EffectivePolicy {
        self.policies.load().resolve(account).clone()
    }

    /// The policy of `account` when a verified token claims `claimed_limit`: an override wins,
    /// else the claim, else the default.
    fn policy_claimed(&self, account: &str, claimed_limit: Option<u32>) -> EffectivePolicy {
        self.policies
            .load()
            .resolve_claimed_at(account, claimed_limit, chrono::Utc::now())
    }

    fn view(&self, record: &SessionRecord, policy: &EffectivePolicy, active: u32) -> Session {
        Session::view(
            record,
            policy.limit,
            policy.heartbeat_interval_seconds,
            active,
        )
    }

    /// The policy of the account a session id belongs to, found from the tag the id carries:
    /// an override naming an account with that tag, else the default policy.
    fn policy_for_id(&self, id: SessionId) -> EffectivePolicy {
        let set = self.policies.load_full();
        let index = self.tags.load();
        let index = if Arc::ptr_eq(&index.set, &set) {
            index
        } else {
            self.tags.store(Arc::new(TagIndex::new(set)));
            self.tags.load()
        };
        match index.accounts.get(&id.tag) {
            // A tag collision between two override accounts: the stricter policy applies.
            Some(accounts) => accounts
                .iter()
                .map(|a| index.set.resolve(a).clone())
                .min_by_key(|p| (p.failure_policy == FailurePolicy::Open, p.limit))
                .unwrap_or_else(|| index.set.default_policy().clone()),
            None => index.set.default_policy().clone(),
        }
    }

    /// Counts and logs a failed store operation and says what it means for the request.
    fn store_failed(&self, operation: Operation, error: StoreError) -> EngineError {
        let (kind, outcome) = match &error {
            StoreError::Unavailable(_) => ("transient", Outcome::Unreachable),
            StoreError::TimedOut(_) => ("timeout", Outcome::TimedOut),
            // The store is there: it answered, wrongly or full.
            StoreError::Fatal(_) => ("fatal", Outcome::Answered),
            StoreError::AtCapacity(_) => ("capacity", Outcome::Answered),
            StoreError::NotReplicated(_) => ("replication", Outcome::Answered),
        };
        self.metrics.count_store_error(operation.as_str(), kind);
        let down = self
            .lock_breaker()
            .record(outcome, chrono::Utc::now().timestamp_millis());
        match error {
            StoreError::Unavailable(detail) | StoreError::TimedOut(detail) => {
                tracing::warn!(operation = operation.as_str(), %detail, store_down = down,
                    "session store call failed");
                if down {
                    EngineError::Unavailable
                } else {
                    EngineError::Slow
                }
            }
            StoreError::NotReplicated(detail) => {
                tracing::warn!(operation = operation.as_str(), %detail,
                    "store change not acknowledged by enough replicas; answering 503");
                EngineError::Slow
            }
            StoreError::Fatal(detail) => {
                self.last_fatal_ms
                    .store(chrono::Utc::now().timestamp_millis(), Ordering::SeqCst);
                tracing::error!(operation = operation.as_str(), %detail,
                    "session store answered wrongly; refusing (never admitting) until it is fixed");
                EngineError::Internal
            }
            StoreError::AtCapacity(held) => {
                self.metrics.capacity_refused.inc();
                tracing::warn!(held, "session store full: refusing new sessions");
                EngineError::AtCapacity
            }
        }
    }

    /// Opens (or renews) the session of `(account, stream_id)`.
    pub async fn open(&self, account: &str, stream_id: &str) -> Result<Opened, EngineError> {
        self.open_claimed(account, stream_id, None).await
    }

    /// Opens (or renews) the session of `(account, stream_id)` for a viewer whose verified token
    /// claims `claimed_limit` streams.
    pub async fn open_claimed(
        &self,
        account: &str,
        stream_id: &str,
        claimed_limit: Option<u32>,
    ) -> Result<Opened, EngineError> {
        let policy = self.policy_claimed(account, claimed_limit);
        let request = OpenRequest {
            account,
            stream_id,
            limit: policy.limit,
            ttl_ms: policy.ttl_ms(),
            on_limit: policy.on_limit_exceeded,
            mode: policy.mode,
        };
        let outcome = match self.store.open(&request).await {
            Ok(outcome) => {
                self.answered();
                outcome
            }
            Err(error) => {
                let error = self.store_failed(Operation::Open, error);
                return match policy.failure_policy {
                    // Only a store judged down by the breaker: a slow one answers 503.
                    FailurePolicy::Open if error == EngineError::Unavailable => {
                        self.admit_without_store(&request, &policy)
                    }
                    _ => Err(error),
                };
            }
        };
        Ok(match outcome {
            OpenOutcome::Renewed { session, active } => {
                self.metrics.renewed.inc();
                let mut session = self.view(&session, &policy, active);
                self.annotate_validation(&mut session, &policy).await;
                Opened::Renewed(session)
            }
            OpenOutcome::Admitted {
                session,
                evicted,
                active,
                dry_run,
            } => {
                self.metrics.admitted.inc();
                if !evicted.is_empty() {
                    self.metrics
                        .count_revoked(EndReason::Evicted, evicted.len());
                    for victim in &evicted {
                        tracing::info!(
                            account = %fingerprint(account),
                            evicted_session = %fingerprint(&victim.id.to_string()),
                            "evicted oldest session"
                        );
                    }
                }
                if let Some(would) = dry_run {
                    self.metrics.count_dry_run(would);
                    tracing::info!(account = %fingerprint(account), ?would, policy = %policy.source,
                        "dry run: admitted over the limit");
                }
                Opened::Created {
                    session: self.view(&session, &policy, active),
                    dry_run,
                    degraded: false,
                }
            }
            OpenOutcome::Refused { active } => {
                self.metrics.refused.inc();
                let count = active.len() as u32;
                Opened::Refused {
                    limit: policy.limit,
                    sessions: active
                        .iter()
                        .map(|s| self.view(s, &policy, count))
                        .collect(),
                }
            }
        })
    }

    /// failurePolicy Open: a session the store never saw, so the viewer keeps watching. It is
    /// remembered, so its media requests are honoured, and written back when the store answers.
    ///
    /// Bounded: this sidecar admits at most the account's limit without the store (live degraded
    /// sessions, counted by itself; Enforce only, DryRun admits over the limit by design). Over
    /// that, 503. So an outage over-admits at most (sidecars - 1) x limit per account, and only
    /// until the store is back and the degraded sessions are written to it.
    fn admit_without_store(
        &self,
        request: &OpenRequest<'_>,
        policy: &EffectivePolicy,
    ) -> Result<Opened, EngineError> {
        let now = chrono::Utc::now().timestamp_millis();
        let mut degraded = self.lock_degraded();
        if let Some(mut existing) = degraded.by_stream(request.account, request.stream_id)
            && existing.expires_at_ms > now
        {
            existing.expires_at_ms = now + request.ttl_ms;
            degraded.by_id.insert(existing.id, existing.clone());
            let held = degraded.live_for(request.account, now);
            return Ok(Opened::Renewed(self.view(&existing, policy, held)));
        }
        let held = degraded.live_for(request.account, now);
        if policy.mode == Mode::Enforce && held >= policy.limit {
            drop(degraded);
            self.metrics.refused.inc();
            tracing::warn!(account = %fingerprint(request.account), held,
                "store down: this sidecar already admitted the account's limit without it");
            return Err(EngineError::Unavailable);
        }
        self.metrics.failed_open.inc();
        let mut record = request.new_session(now);
        // An attempt that timed out may have been admitted by the store after all: the same id.
        if let Some(id) = self
            .store
            .take_abandoned(request.account, request.stream_id)
        {
            record.id = id;
        }
        degraded.remember(record.clone());
        Ok(Opened::Created {
            session: self.view(&record, policy, held + 1),
            dry_run: None,
            degraded: true,
        })
    }

    /// Renews the active session of `(account, stream_id)`.
    pub async fn heartbeat(
        &self,
        account: &str,
        stream_id: &str,
    ) -> Result<Heartbeat, EngineError> {
        self.heartbeat_claimed(account, stream_id, None).await
    }

    /// Renews the active session of `(account, stream_id)` for a viewer whose verified token
    /// claims `claimed_limit` streams (the limit the answer reports).
    pub async fn heartbeat_claimed(
        &self,
        account: &str,
        stream_id: &str,
        claimed_limit: Option<u32>,
    ) -> Result<Heartbeat, EngineError> {
        let policy = self.policy_claimed(account, claimed_limit);
        let mut outcome = match self
            .store
            .heartbeat(account, stream_id, policy.ttl_ms())
            .await
        {
            Ok(outcome) => {
                self.answered();
                outcome
            }
            Err(error) => {
                let error = self.store_failed(Operation::Heartbeat, error);
                // Store down under Open: a degraded session of this sidecar is renewed here.
                if error == EngineError::Unavailable && policy.failure_policy == FailurePolicy::Open
                {
                    let now = chrono::Utc::now().timestamp_millis();
                    let mut degraded = self.lock_degraded();
                    if let Some(mut record) = degraded.by_stream(account, stream_id)
                        && record.expires_at_ms > now
                    {
                        record.expires_at_ms = now + policy.ttl_ms();
                        degraded.by_id.insert(record.id, record.clone());
                        let held = degraded.live_for(account, now);
                        return Ok(Heartbeat::Renewed(self.view(&record, &policy, held)));
                    }
                }
                return Err(error);
            }
        };
        let degraded = if outcome == HeartbeatOutcome::NotFound {
            self.lock_degraded().by_stream(account, stream_id)
        } else {
            None
        };
        if let Some(record) = degraded
            && self.adopt(&record).await?
        {
            outcome = self
                .store
                .heartbeat(account, stream_id, policy.ttl_ms())
                .await
                .inspect(|_| self.answered())
                .map_err(|e| self.store_failed(Operation::Heartbeat, e))?;
        }
        Ok(match outcome {
            HeartbeatOutcome::Renewed { session, active } => {
                self.metrics.renewed.inc();
                let mut session = self.view(&session, &policy, active);
                self.annotate_validation(&mut session, &policy).await;
                Heartbeat::Renewed(session)
            }
            HeartbeatOutcome::Gone(session) => {
                let mut session = self.view(&session, &policy, 0);
                self.annotate_validation(&mut session, &policy).await;
                Heartbeat::Gone(session)
            }
            HeartbeatOutcome::NotFound => Heartbeat::NotFound,
        })
    }

    /// Ends the active session of `(account, stream_id)`. `false` if there was none.
    pub async fn end(&self, account: &str, stream_id: &str) -> Result<bool, EngineError> {
        // A degraded session of the stream is forgotten first: written back later, it would
        // come back after the store ended it (the store may hold it under the same id). A
        // write-back already sent reaches the store before this end (one connection, in order).
        {
            let mut degraded = self.lock_degraded();
            if let Some(record) = degraded.by_stream(account, stream_id) {
                degraded.forget(record.id);
            }
        }
        let ended = self
            .store
            .end(account, stream_id)
            .await
            .inspect(|_| self.answered())
            .map_err(|e| self.store_failed(Operation::End, e))?;
        if let Some(record) = &ended {
            self.metrics.ended.inc();
            self.playback.forget(record.id);
        }
        Ok(ended.is_some())
    }

    /// The account's active sessions, oldest first, and its limit.
    pub async fn list(&self, account: &str) -> Result<(u32, Vec<Session>), EngineError> {
        let policy = self.policy_for(account);
        let active = self
            .store
            .list(account)
            .await
            .inspect(|_| self.answered())
            .map_err(|e| self.store_failed(Operation::List, e))?;
        let count = active.len() as u32;
        let sessions = active
            .iter()
            .map(|s| self.view(s, &policy, count))
            .collect();
        Ok((policy.limit, sessions))
    }

    /// One session, active or recently cut, without renewing it.
    pub async fn get(&self, id: SessionId) -> Result<Option<Session>, EngineError> {
        let Some(record) = self
            .store
            .get(id)
            .await
            .inspect(|_| self.answered())
            .map_err(|e| self.store_failed(Operation::Get, e))?
        else {
            return Ok(None);
        };
        let policy = self.policy_for(&record.account);
        // Counting the account's sessions costs a second store call; only do it for live ones.
        let active = if record.state == SessionState::Active {
            self.store
                .list(&record.account)
                .await
                .inspect(|_| self.answered())
                .map_err(|e| self.store_failed(Operation::List, e))?
                .len() as u32
        } else {
            0
        };
        let mut session = self.view(&record, &policy, active);
        self.annotate_validation(&mut session, &policy).await;
        Ok(Some(session))
    }

    /// Revokes a session, reason `kicked`.
    pub async fn kick(&self, id: SessionId) -> Result<Kicked, EngineError> {
        self.revoke(id, EndReason::Kicked).await
    }

    /// Revokes a session for `reason` (`kicked` by an admin, `shared` by sharing detection).
    pub async fn revoke(&self, id: SessionId, reason: EndReason) -> Result<Kicked, EngineError> {
        let outcome = self
            .store
            .revoke(id, reason)
            .await
            .inspect(|_| self.answered())
            .map_err(|e| self.store_failed(Operation::Kick, e))?;
        Ok(match outcome {
            KickOutcome::Kicked(record) => {
                self.metrics.count_revoked(reason, 1);
                let (account, session) = (
                    fingerprint(&record.account),
                    fingerprint(&record.id.to_string()),
                );
                if reason == EndReason::Kicked {
                    tracing::info!(%account, %session, "session kicked");
                } else {
                    tracing::info!(%account, %session, reason = reason.as_str(), "session revoked");
                }
                let policy = self.policy_for(&record.account);
                Kicked::Kicked(self.view(&record, &policy, 0))
            }
            KickOutcome::AlreadyGone(record) => {
                let policy = self.policy_for(&record.account);
                Kicked::AlreadyGone(self.view(&record, &policy, 0))
            }
            KickOutcome::NotFound => Kicked::NotFound,
        })
    }

    /// Authorizes a media request for session `id`: the one decision the enforcing proxy asks.
    ///
    /// An active session is let through, and renewed when its last renewal is at least half its
    /// heartbeat interval old (an implicit heartbeat: a player that only fetches media keeps its
    /// session alive). A cut session is refused (DryRun: let through and reported). When the
    /// store cannot be asked (transient error), the account's failurePolicy decides: Open lets
    /// established sessions and this sidecar's degraded admissions through, Closed refuses
    /// (503). A fatal store error always refuses (500).
    pub async fn authorize_media(&self, id: SessionId) -> Result<MediaAccess, EngineError> {
        let policy = self.policy_for_id(id);
        let renew_after_ms = i64::from(policy.heartbeat_interval_seconds) * 500;
        let touched = match self.store.touch(id, policy.ttl_ms(), renew_after_ms).await {
            Ok(touched) => {
                self.answered();
                touched
            }
            Err(error) => {
                let error = self.store_failed(Operation::Media, error);
                let degraded = self.lock_degraded().by_id.get(&id).cloned();
                return match policy.failure_policy {
                    FailurePolicy::Open if error == EngineError::Unavailable => {
                        Ok(MediaAccess::Allowed {
                            session: degraded,
                            renewed: false,
                            degraded: true,
                        })
                    }
                    _ => Err(error),
                };
            }
        };
        let touched = match touched {
            Some(touched) => touched,
            None => {
                let Some(record) = self.lock_degraded().by_id.get(&id).cloned() else {
                    return Ok(MediaAccess::NotFound);
                };
                if !self.adopt(&record).await? {
                    return Ok(MediaAccess::NotFound);
                }
                match self
                    .store
                    .touch(id, policy.ttl_ms(), renew_after_ms)
                    .await
                    .inspect(|_| self.answered())
                    .map_err(|e| self.store_failed(Operation::Media, e))?
                {
                    Some(touched) => touched,
                    None => return Ok(MediaAccess::NotFound),
                }
            }
        };
        if touched.renewed {
            self.metrics.renewed.inc();
            self.metrics.media_renewals.inc();
        }
        let record = touched.session;
        if record.state == SessionState::Active {
            return Ok(MediaAccess::Allowed {
                session: Some(record),
                renewed: touched.renewed,
                degraded: false,
            });
        }
        let policy = self.policy_for(&record.account);
        if policy.mode == Mode::DryRun {
            self.metrics
                .count_stream_cut(record.reason.unwrap_or(EndReason::Expired), true, 1);
            return Ok(MediaAccess::AllowedDryRun(record));
        }
        let mut session = self.view(&record, &policy, 0);
        self.annotate_validation(&mut session, &policy).await;
        Ok(MediaAccess::Gone(session))
    }

    /// The session `id` as the store knows it now, without renewing it; the proxy re-checks a
    /// stream in flight with it. `Ok(None)`: no such session.
    pub async fn session_now(&self, id: SessionId) -> Result<Option<SessionRecord>, EngineError> {
        if let Some(record) = self.lock_degraded().by_id.get(&id).cloned() {
            // Not written back yet: the store would not know it.
            return Ok(Some(record));
        }
        self.store
            .touch(id, 0, i64::MAX)
            .await
            .map(|t| t.map(|t| t.session))
            .inspect(|_| self.answered())
            .map_err(|e| self.store_failed(Operation::Media, e))
    }

    /// Writes a degraded admission back to the store. `false` when its stream has another
    /// session by now, when it was ended through another sidecar, or when it expired here
    /// (nobody renewed it): the degraded one is then forgotten.
    async fn adopt(&self, record: &SessionRecord) -> Result<bool, EngineError> {
        if record.expires_at_ms <= chrono::Utc::now().timestamp_millis() {
            self.lock_degraded().forget(record.id);
            return Ok(false);
        }
        let adopted = self
            .store
            .adopt(record)
            .await
            .inspect(|_| self.answered())
            .map_err(|e| self.store_failed(Operation::Adopt, e))?;
        self.lock_degraded().forget(record.id);
        if adopted {
            self.metrics.degraded_restored.inc();
        }
        Ok(adopted)
    }

    /// Writes every remembered degraded admission back to the store; stops at the first store
    /// error (the rest wait for the next try). Returns how many are still waiting.
    pub async fn restore_degraded(&self) -> usize {
        let pending: Vec<SessionRecord> = self.lock_degraded().by_id.values().cloned().collect();
        for record in pending {
            // Ended meanwhile: not to be written back.
            if !self.lock_degraded().by_id.contains_key(&record.id) {
                continue;
            }
            if self.adopt(&record).await.is_err() {
                break;
            }
        }
        self.lock_degraded().by_id.len()
    }

    /// Degraded admissions waiting to be written back.
    pub fn degraded_pending(&self) -> usize {
        self.lock_degraded().by_id.len()
    }

    fn lock_degraded(&self) -> std::sync::MutexGuard<'_, Degraded> {
        // Only map operations happen under this lock: a poisoned lock is still consistent.
        self.degraded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the sidecar may take traffic: the store answers, no fatal store error happened
    /// in the last [`FATAL_UNREADY`], and the revocation subscription (shared stores) is up.
    pub async fn ready(&self) -> Result<(), NotReady> {
        match self.store.ping().await {
            Ok(()) => self.answered(),
            // One slow PING is not down: readiness follows the breaker.
            Err(error) => match self.store_failed(Operation::Ping, error) {
                EngineError::Slow => {}
                error => return Err(NotReady::Store(error)),
            },
        }
        if self.store_down() {
            return Err(NotReady::Store(EngineError::Unavailable));
        }
        let last_fatal = self.last_fatal_ms.load(Ordering::SeqCst);
        let now = chrono::Utc::now().timestamp_millis();
        if last_fatal != 0 && now - last_fatal < FATAL_UNREADY.as_millis() as i64 {
            return Err(NotReady::RecentFatalError);
        }
        if let Err(problem) = self.store.check_config().await {
            tracing::error!(%problem, "session store misconfigured");
            return Err(NotReady::Misconfigured(problem));
        }
        if !*self.store.subscribed().borrow() {
            return Err(NotReady::NotSubscribed);
        }
        Ok(())
    }

    /// Refreshes the active-sessions gauge and renders all metrics.
    pub async fn render_metrics(&self) -> String {
        match self.store.active_sessions().await {
            Ok(Some(n)) => self.metrics.set_active_local(n),
            Ok(None) => {}
            Err(e) => {
                self.store_failed(Operation::ActiveSessions, e);
            }
        }
        self.metrics.render()
    }
}

/// Why `/readyz` fails.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// The store does not answer (or answers wrongly).
    #[error("the session store is not usable")]
    Store(EngineError),
    /// A fatal store error happened recently.
    #[error("the session store answered wrongly recently; see the sidecar's log")]
    RecentFatalError,
    /// The store is configured so that it may lose sessions; the message says why.
    #[error("{0}")]
    Misconfigured(String),
    /// Other sidecars' revocations are not heard (shared stores).
    #[error("not subscribed to revocations yet")]
    NotSubscribed,
}

/// Counts expirations this process decided. Evictions and kicks are counted where they are
/// decided; expiry happens inside the store, which reports it only as a revocation notice.
async fn count_expirations(
    mut notices: broadcast::Receiver<Revocation>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let notice = tokio::select! {
            () = shutdown.cancelled() => return,
            notice = notices.recv() => notice,
        };
        match notice {
            Ok(notice) if notice.local && notice.session.reason == Some(EndReason::Expired) => {
                metrics.count_revoked(EndReason::Expired, 1);
            }
            Ok(_) => {}
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "revocation notices missed; expired count is low");
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// How often degraded admissions are offered back to the store while some wait.
const RESTORE_INTERVAL: Duration = Duration::from_secs(1);

/// Writes degraded admissions back to the store once it answers again.
async fn restore_degraded_loop(engine: Engine, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(RESTORE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if engine.degraded_pending() > 0 && engine.store.ping().await.is_ok() {
            engine.answered();
            let left = engine.restore_degraded().await;
            tracing::info!(left, "degraded admissions written back to the store");
        }
    }
}

/// Mirrors the store's subscription state into the `streamgate_revocations_subscribed` gauge.
async fn report_subscription(
    mut subscribed: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let up = *subscribed.borrow_and_update();
        metrics.revocations_subscribed.set(i64::from(up));
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = subscribed.changed() => if changed.is_err() { return },
        }
    }
}

/// Log fingerprints live with the session types, so the store logs them the same way.
pub use crate::session::fingerprint;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const POLICIES: &str = "apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata: {name: default}
spec: {maxStreamsPerAccount: 3, failurePolicy: Open}
---
apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata: {name: strict}
spec: {maxStreamsPerAccount: 1, failurePolicy: Closed, accounts: [vip]}
";

    fn engine() -> Engine {
        let set = PolicySet::from_yaml(POLICIES, "p.yaml", "default").unwrap();
        Engine::new(
            Arc::new(MemoryStore::new()),
            Arc::new(ArcSwap::from_pointee(set)),
            Arc::new(Metrics::new()),
        )
    }

    #[test]
    fn a_session_id_finds_its_accounts_policy_by_tag() {
        let engine = engine();
        let vip = engine.policy_for_id(SessionId::for_account("vip"));
        assert_eq!(
            (vip.source.as_str(), vip.failure_policy),
            ("strict", FailurePolicy::Closed)
        );
        let other = engine.policy_for_id(SessionId::for_account("someone"));
        assert_eq!(other.source, "default");
        // A reload is seen at once.
        let reloaded = POLICIES.replace("accounts: [vip]", "accounts: [other]");
        engine.policies().store(Arc::new(
            PolicySet::from_yaml(&reloaded, "p.yaml", "default").unwrap(),
        ));
        assert_eq!(
            engine.policy_for_id(SessionId::for_account("vip")).source,
            "default"
        );
        assert_eq!(
            engine.policy_for_id(SessionId::for_account("other")).source,
            "strict"
        );
    }

    #[test]
    fn degraded_admissions_are_bounded_oldest_first() {
        let mut degraded = Degraded::default();
        let request = OpenRequest {
            account: "a",
            stream_id: "s",
            limit: 1,
            ttl_ms: 1_000,
            on_limit: crate::policy::OnLimitExceeded::RejectNew,
            mode: Mode::Enforce,
        };
        let first = request.new_session(0);
        degraded.remember(first.clone());
        for i in 0..DEGRADED_CAPACITY {
            degraded.remember(request.new_session(i as i64));
        }
        assert_eq!(degraded.by_id.len(), DEGRADED_CAPACITY);
        assert!(
            !degraded.by_id.contains_key(&first.id),
            "the oldest is forgotten first"
        );
    }
}
