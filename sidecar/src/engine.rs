//! The session engine: applies the account's policy to store operations, handles a store outage
//! by the policy's `failurePolicy`, and counts what it decides.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::admission::OverLimit;
use crate::metrics::Metrics;
use crate::policy::{EffectivePolicy, FailurePolicy, PolicySet};
use crate::session::{EndReason, Revocation, Session, SessionId, SessionRecord, SessionState};
use crate::store::{
    HeartbeatOutcome, KickOutcome, OpenOutcome, OpenRequest, SessionStore, StoreError,
};

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

/// A store failure as the API reports it: 503 `store_unavailable`.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Unavailable(#[from] pub StoreError);

/// The session engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    store: Arc<dyn SessionStore>,
    policies: Policies,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// An engine over `store` enforcing `policies`. Inside a Tokio runtime it also starts counting
    /// the store's expirations.
    pub fn new(store: Arc<dyn SessionStore>, policies: Policies, metrics: Arc<Metrics>) -> Self {
        let engine = Self {
            store,
            policies,
            metrics,
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(count_expirations(
                engine.store.revocations(),
                engine.metrics.clone(),
            ));
        }
        engine
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    /// The policies in force.
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn policy_for(&self, account: &str) -> EffectivePolicy {
        self.policies.load().resolve(account).clone()
    }

    fn view(&self, record: &SessionRecord, policy: &EffectivePolicy, active: u32) -> Session {
        Session::view(
            record,
            policy.limit,
            policy.heartbeat_interval_seconds,
            active,
        )
    }

    fn store_failed(&self, operation: &str, error: StoreError) -> Unavailable {
        self.metrics.count_store_error(operation);
        tracing::warn!(operation, %error, "session store operation failed");
        Unavailable(error)
    }

    /// Opens (or renews) the session of `(account, stream_id)`.
    pub async fn open(&self, account: &str, stream_id: &str) -> Result<Opened, Unavailable> {
        let policy = self.policy_for(account);
        let request = OpenRequest {
            account,
            stream_id,
            limit: policy.limit,
            ttl_ms: policy.ttl_ms(),
            on_limit: policy.on_limit_exceeded,
            mode: policy.mode,
        };
        let outcome = match self.store.open(&request).await {
            Ok(outcome) => outcome,
            Err(error) => {
                let error = self.store_failed("open", error);
                return match policy.failure_policy {
                    FailurePolicy::Closed => Err(error),
                    FailurePolicy::Open => Ok(self.admit_without_store(&request, &policy)),
                };
            }
        };
        Ok(match outcome {
            OpenOutcome::Renewed { session, active } => {
                self.metrics.renewed.inc();
                Opened::Renewed(self.view(&session, &policy, active))
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
                            account,
                            evicted_session = %victim.id,
                            evicted_stream = %victim.stream_id,
                            "evicted oldest session"
                        );
                    }
                }
                if let Some(would) = dry_run {
                    self.metrics.count_dry_run(would);
                    tracing::info!(account, stream_id, ?would, policy = %policy.source,
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

    /// failurePolicy Open: a session the store never saw, so the viewer keeps watching.
    fn admit_without_store(&self, request: &OpenRequest<'_>, policy: &EffectivePolicy) -> Opened {
        self.metrics.failed_open.inc();
        let now = chrono::Utc::now().timestamp_millis();
        let record = request.new_session(now);
        Opened::Created {
            session: self.view(&record, policy, 0),
            dry_run: None,
            degraded: true,
        }
    }

    /// Renews the active session of `(account, stream_id)`.
    pub async fn heartbeat(
        &self,
        account: &str,
        stream_id: &str,
    ) -> Result<Heartbeat, Unavailable> {
        let policy = self.policy_for(account);
        let outcome = self
            .store
            .heartbeat(account, stream_id, policy.ttl_ms())
            .await
            .map_err(|e| self.store_failed("heartbeat", e))?;
        Ok(match outcome {
            HeartbeatOutcome::Renewed { session, active } => {
                self.metrics.renewed.inc();
                Heartbeat::Renewed(self.view(&session, &policy, active))
            }
            HeartbeatOutcome::Gone(session) => Heartbeat::Gone(self.view(&session, &policy, 0)),
            HeartbeatOutcome::NotFound => Heartbeat::NotFound,
        })
    }

    /// Ends the active session of `(account, stream_id)`. `false` if there was none.
    pub async fn end(&self, account: &str, stream_id: &str) -> Result<bool, Unavailable> {
        let ended = self
            .store
            .end(account, stream_id)
            .await
            .map_err(|e| self.store_failed("end", e))?;
        if ended.is_some() {
            self.metrics.ended.inc();
        }
        Ok(ended.is_some())
    }

    /// The account's active sessions, oldest first, and its limit.
    pub async fn list(&self, account: &str) -> Result<(u32, Vec<Session>), Unavailable> {
        let policy = self.policy_for(account);
        let active = self
            .store
            .list(account)
            .await
            .map_err(|e| self.store_failed("list", e))?;
        let count = active.len() as u32;
        let sessions = active
            .iter()
            .map(|s| self.view(s, &policy, count))
            .collect();
        Ok((policy.limit, sessions))
    }

    /// One session, active or recently cut, without renewing it.
    pub async fn get(&self, id: SessionId) -> Result<Option<Session>, Unavailable> {
        let Some(record) = self
            .store
            .get(id)
            .await
            .map_err(|e| self.store_failed("get", e))?
        else {
            return Ok(None);
        };
        let policy = self.policy_for(&record.account);
        // Counting the account's sessions costs a second store call; only do it for live ones.
        let active = if record.state == SessionState::Active {
            self.store
                .list(&record.account)
                .await
                .map_err(|e| self.store_failed("list", e))?
                .len() as u32
        } else {
            0
        };
        Ok(Some(self.view(&record, &policy, active)))
    }

    /// Revokes a session, reason `kicked`.
    pub async fn kick(&self, id: SessionId) -> Result<Kicked, Unavailable> {
        let outcome = self
            .store
            .kick(id)
            .await
            .map_err(|e| self.store_failed("kick", e))?;
        Ok(match outcome {
            KickOutcome::Kicked(record) => {
                self.metrics.count_revoked(EndReason::Kicked, 1);
                tracing::info!(account = %record.account, session = %record.id, "session kicked");
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

    /// Whether the store answers.
    pub async fn ready(&self) -> Result<(), Unavailable> {
        self.store
            .ping()
            .await
            .map_err(|e| self.store_failed("ping", e))
    }

    /// Refreshes the active-sessions gauge and renders all metrics.
    pub async fn render_metrics(&self) -> String {
        match self.store.active_sessions().await {
            Ok(Some(n)) => {
                self.metrics.active_sessions.set(n as i64);
            }
            Ok(None) => {}
            Err(e) => {
                self.store_failed("active_sessions", e);
            }
        }
        self.metrics.render()
    }
}

/// Counts expirations this process decided. Evictions and kicks are counted where they are
/// decided; expiry happens inside the store, which reports it only as a revocation notice.
/// Holds only the receiver, not the store, so it ends when the store is dropped.
async fn count_expirations(mut notices: broadcast::Receiver<Revocation>, metrics: Arc<Metrics>) {
    loop {
        match notices.recv().await {
            Ok(notice) if notice.local && notice.session.reason == Some(EndReason::Expired) => {
                metrics.count_revoked(EndReason::Expired, 1);
                tracing::debug!(account = %notice.session.account, session = %notice.session.id,
                    "session expired");
            }
            Ok(_) => {}
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "revocation notices missed; expired count is low");
            }
            Err(RecvError::Closed) => return,
        }
    }
}
