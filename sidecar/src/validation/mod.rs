//! Session validators: after admission the sidecar POSTs a SessionReview to each validator of
//! the account's policy and revokes the session (reason `denied`) on a denial, or on a
//! validator's silence under failurePolicy `Revoke`.
//!
//! `Async` validators are checked in the background (the open answers 201 at once); `Blocking`
//! ones during the open, which answers 403 `denied` on a denial and frees the slot. Every check
//! is first written to the [`ledger`] (state `pending`, the request facts, a due time claimed
//! with a lease): on Redis another sidecar takes over the checks of a sidecar that died before
//! the verdict, within the lease ([`decide::lease_for`]) plus [`POLL_INTERVAL`].
//!
//! A revocation goes through the store (reason `denied`, so the store, the proxies and the
//! heartbeat see a cut session at once) after the ledger records the denial; session answers
//! report the validator's message from the ledger.
//!
//! Every call is also counted in the ledger, answered or failed with its [`FailureKind`]
//! ([`ValidationLedger::record_call`]): on Redis the operator reads the counts and names a
//! failing validator on its StreamingPolicy's status (the sidecars have no Kubernetes API access).

pub mod decide;
pub mod ledger;
pub mod review;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use decide::{
    CallFailure, Decision, FailureKind, ReviewAnswer, ValidationState, ValidatorOutcome,
};
pub use ledger::{MemoryLedger, RedisLedger, ValidationLedger, ValidationRecord};
pub use review::{RequestFacts, SessionReview};

use crate::engine::{Engine, fingerprint};
use crate::policy::{EffectivePolicy, Mode, ValidatorSpec};
use crate::session::{EndReason, Session, SessionId, SessionRecord, SessionState, rfc3339};
use crate::store::KickOutcome;
use decide::{Attempt, classify, retry_delay};
use review::{IDEMPOTENCY_HEADER, ReviewRequest, ReviewedSession};

/// How often a sidecar looks for due checks (rechecks, and checks whose claimant died).
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Most checks claimed at once.
pub const CLAIM_BATCH: usize = 64;
/// Largest validator answer read.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The sidecar's validation machinery: the ledger, the HTTP clients, the checks in flight.
pub struct Validations {
    ledger: Arc<dyn ValidationLedger>,
    clients: Mutex<HashMap<Option<String>, reqwest::Client>>,
    checks: TaskTracker,
    in_flight: Mutex<HashSet<SessionId>>,
}

impl Validations {
    /// Validation over `ledger`.
    pub fn new(ledger: Arc<dyn ValidationLedger>) -> Self {
        Self {
            ledger,
            clients: Mutex::default(),
            checks: TaskTracker::new(),
            in_flight: Mutex::default(),
        }
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<dyn ValidationLedger> {
        &self.ledger
    }

    /// An HTTP client trusting `ca_bundle` (base64 of PEM), or the system roots; one per bundle.
    fn client(&self, ca_bundle: Option<&str>) -> Result<reqwest::Client, String> {
        let key = ca_bundle.map(str::to_string);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let mut builder = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
        if let Some(bundle) = ca_bundle {
            use base64::Engine as _;
            let pem = base64::engine::general_purpose::STANDARD
                .decode(bundle.trim())
                .map_err(|e| format!("caBundle is not base64: {e}"))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("caBundle holds no usable PEM certificate: {e}"))?;
            builder = builder.tls_built_in_root_certs(false);
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder.build().map_err(|e| e.to_string())?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Calls `validator` with `review`, retrying with backoff within its timeout.
    pub async fn call(
        &self,
        validator: &ValidatorSpec,
        review: &SessionReview,
    ) -> Result<ReviewAnswer, CallFailure> {
        let client = self
            .client(validator.ca_bundle.as_deref())
            .map_err(|problem| CallFailure {
                kind: FailureKind::Configuration,
                problem,
            })?;
        let budget = Duration::from_secs(u64::from(validator.timeout_seconds));
        let started = Instant::now();
        let url = validator.endpoint();
        let mut attempt = 0u32;
        loop {
            let remaining = budget.saturating_sub(started.elapsed());
            let send = async {
                let response = client
                    .post(&url)
                    .header(IDEMPOTENCY_HEADER, &review.request.uid)
                    .json(review)
                    .send()
                    .await
                    .map_err(|e| (network_kind(&e), without_url(&e)))?;
                let status = response.status().as_u16();
                let mut body = Vec::new();
                let mut chunks = response.bytes_stream();
                while let Some(chunk) = chunks.next().await {
                    let chunk = chunk.map_err(|e| (network_kind(&e), without_url(&e)))?;
                    if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                        return Ok((status, b"answer too large".to_vec()));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok::<_, (FailureKind, String)>((status, body))
            };
            let (outcome, kind) = match tokio::time::timeout(remaining, send).await {
                Err(_) => (
                    Attempt::Retry(format!("no answer within {}s", validator.timeout_seconds)),
                    FailureKind::Timeout,
                ),
                Ok(Err((kind, error))) => (Attempt::Retry(error), kind),
                Ok(Ok((status, body))) => (classify(status, &body), FailureKind::of_status(status)),
            };
            match outcome {
                Attempt::Answered(answer) => return Ok(answer),
                Attempt::GiveUp(problem) => return Err(CallFailure { kind, problem }),
                Attempt::Retry(problem) => match retry_delay(attempt, started.elapsed(), budget) {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => {
                        return Err(CallFailure {
                            kind,
                            problem: format!(
                                "{problem} (after {} attempts within {}s)",
                                attempt + 1,
                                validator.timeout_seconds
                            ),
                        });
                    }
                },
            }
            attempt += 1;
        }
    }
}

/// The kind of a network error: a refused connection is told apart (nothing listens there).
fn network_kind(error: &reqwest::Error) -> FailureKind {
    if error.is_timeout() {
        return FailureKind::Timeout;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return FailureKind::ConnectionRefused;
        }
        source = cause.source();
    }
    FailureKind::Connection
}

/// A reqwest error without its URL (which may carry credentials).
fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "the validator");
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How long a validation record is kept: while the session may live without heartbeats, and
/// one TTL longer so a denied session's heartbeat still finds the message.
fn record_ttl(policy: &EffectivePolicy) -> Duration {
    let ttl = Duration::from_millis(u64::try_from(policy.ttl_ms()).unwrap_or(0));
    let recheck = decide::next_check_in(&policy.validators).unwrap_or_default();
    (ttl + recheck) * 2
}

/// Why an open was refused by a Blocking validator: 403 `denied`.
#[derive(Clone, Debug)]
pub struct Denied {
    /// The validator that decided.
    pub validator: String,
    /// Its message.
    pub message: String,
    /// The session, now revoked.
    pub session: Session,
}

impl Engine {
    /// Starts validation of a session just admitted: Blocking validators are asked now (a
    /// denial revokes it and is returned), Async ones in the background. Returns the session
    /// with its validation state.
    pub async fn validate_admission(
        &self,
        mut session: Session,
        facts: RequestFacts,
    ) -> Result<Session, Box<Denied>> {
        let policy = self.policies().load().resolve(&session.account).clone();
        if policy.validators.is_empty() {
            return Ok(session);
        }
        let Ok(id) = session.session_id.parse::<SessionId>() else {
            return Ok(session);
        };
        let record = ValidationRecord {
            state: ValidationState::Pending,
            validator: None,
            message: None,
            facts,
            admitted_at_ms: chrono::Utc::now().timestamp_millis(),
            checks: 0,
        };
        let validations = self.validations().clone();
        let ledger = validations.ledger();
        let ttl = record_ttl(&policy);
        let async_ones = decide::validators_for_check(&policy.validators, true);
        let lease = decide::lease_for(&policy.validators);
        // The check is recorded, and claimed by this sidecar, before anything else: if it dies
        // from here on, another sidecar takes it over when the lease runs out.
        if let Err(error) = ledger.put(id, &record, ttl).await {
            tracing::warn!(%error, "validation ledger: cannot record a pending check");
        }
        if let Err(error) = ledger.schedule(id, lease).await {
            tracing::warn!(%error, "validation ledger: cannot schedule a check");
        }
        let blocking: Vec<&ValidatorSpec> = policy
            .validators
            .iter()
            .filter(|v| v.mode == crate::policy::ValidatorMode::Blocking)
            .collect();
        let mut record = record;
        if !blocking.is_empty() {
            let reviewed = reviewed_session(&session);
            let outcomes = self
                .run_validators(&policy.source, &blocking, &reviewed, &record, false)
                .await;
            let decision = decide::decide(&outcomes);
            self.observe_verdict(&record, &decision);
            match self
                .apply_decision(id, &policy, &mut record, decision, async_ones.is_empty())
                .await
            {
                Some(denied) => {
                    session.state = SessionState::Revoked;
                    session.reason = Some(EndReason::Denied);
                    session.validation = Some(record.state);
                    session.validation_message = Some(denied.1.clone());
                    return Err(Box::new(Denied {
                        validator: denied.0,
                        message: denied.1,
                        session,
                    }));
                }
                None => {
                    if async_ones.is_empty() {
                        session.validation = Some(record.state);
                        return Ok(session);
                    }
                    // The Async ones still to come: a takeover must call them too.
                    record.state = ValidationState::Pending;
                    record.checks = 0;
                    if let Err(error) = ledger.put(id, &record, ttl).await {
                        tracing::warn!(%error, "validation ledger: cannot record a pending check");
                    }
                }
            }
        }
        session.validation = Some(ValidationState::Pending);
        let engine = self.clone();
        validations.checks.spawn(async move {
            engine.check(id, Some(record)).await;
        });
        Ok(session)
    }

    /// Calls `validators` about `session` concurrently and counts each call.
    async fn run_validators(
        &self,
        policy: &str,
        validators: &[&ValidatorSpec],
        session: &ReviewedSession,
        record: &ValidationRecord,
        revalidation: bool,
    ) -> Vec<ValidatorOutcome> {
        let validations = self.validations();
        let calls = validators.iter().map(|validator| async move {
            let review = SessionReview::new(ReviewRequest {
                uid: session.session_id.clone(),
                validator: validator.name.clone(),
                revalidation,
                session: session.clone(),
                facts: record.facts.clone(),
            });
            let started = Instant::now();
            let result = validations.call(validator, &review).await;
            self.record_call(
                policy,
                &validator.name,
                result.as_ref().err().map(|f| f.kind),
            );
            let outcome = ValidatorOutcome {
                validator: validator.name.clone(),
                failure_policy: validator.failure_policy,
                result: result.map_err(|failure| failure.problem),
            };
            self.metrics().count_validation(
                &validator.name,
                outcome.result_label(),
                started.elapsed(),
            );
            if let Err(problem) = &outcome.result {
                tracing::warn!(validator = %validator.name, %problem,
                    session = %fingerprint(&session.session_id), "validator gave no verdict");
            }
            outcome
        });
        futures::future::join_all(calls).await
    }

    /// Counts a call for the validator's health in the ledger, in the background: the verdict
    /// does not wait for it, and a ledger that cannot be written loses the count only.
    fn record_call(&self, policy: &str, validator: &str, failure: Option<FailureKind>) {
        let ledger = self.validations().ledger().clone();
        let (policy, validator) = (policy.to_string(), validator.to_string());
        self.validations().checks.spawn(async move {
            if let Err(error) = ledger.record_call(&policy, &validator, failure).await {
                tracing::debug!(%error, "validation ledger: cannot count a validator call");
            }
        });
    }

    fn observe_verdict(&self, record: &ValidationRecord, decision: &Decision) {
        if record.checks == 0 {
            let waited = chrono::Utc::now().timestamp_millis() - record.admitted_at_ms;
            let result = match decision {
                Decision::Keep(ValidationState::Allowed) => "allowed",
                Decision::Revoke {
                    state: ValidationState::Denied,
                    ..
                } => "denied",
                _ => "failed",
            };
            self.metrics().observe_verdict_time(
                result,
                Duration::from_millis(u64::try_from(waited).unwrap_or(0)),
            );
        }
    }

    /// Records a check's decision and acts on it: revokes, or schedules the next check (or
    /// none when `last` or no validator revalidates). Returns the validator and message of a
    /// revocation.
    async fn apply_decision(
        &self,
        id: SessionId,
        policy: &EffectivePolicy,
        record: &mut ValidationRecord,
        decision: Decision,
        last: bool,
    ) -> Option<(String, String)> {
        let ledger = self.validations().ledger().clone();
        let ttl = record_ttl(policy);
        record.checks += 1;
        match decision {
            Decision::Revoke {
                state,
                validator,
                message,
            } => {
                record.state = state;
                record.validator = Some(validator.clone());
                record.message = Some(message.clone());
                if policy.mode == Mode::DryRun {
                    tracing::info!(%validator, %message, session = %fingerprint(&id.to_string()),
                        "dry run: a validator would have revoked the session");
                    self.schedule_next(id, policy, last).await;
                    let _ = ledger.put(id, record, ttl).await;
                    return None;
                }
                // The denial is recorded before the cut, so whoever sees the cut finds why.
                if let Err(error) = ledger.put(id, record, ttl).await {
                    tracing::warn!(%error, "validation ledger: cannot record a denial");
                }
                let _ = ledger.done(id).await;
                match self.revoke_for_validation(id).await {
                    Ok(true) => {
                        tracing::info!(%validator, session = %fingerprint(&id.to_string()),
                            state = state.as_str(), "session revoked by a validator");
                    }
                    Ok(false) => {}
                    Err(error) => {
                        // The store is down: the next claim tries again.
                        tracing::warn!(%error, "cannot revoke a denied session; retrying");
                        record.checks -= 1;
                        let _ = ledger.schedule(id, POLL_INTERVAL * 4).await;
                    }
                }
                Some((validator, message))
            }
            Decision::Keep(state) => {
                record.state = state;
                if let Err(error) = ledger.put(id, record, ttl).await {
                    tracing::warn!(%error, "validation ledger: cannot record a verdict");
                }
                self.schedule_next(id, policy, last).await;
                None
            }
        }
    }

    async fn schedule_next(&self, id: SessionId, policy: &EffectivePolicy, last: bool) {
        let ledger = self.validations().ledger();
        let next = if last {
            decide::next_check_in(&policy.validators)
        } else {
            None
        };
        let result = match next {
            Some(delay) => ledger.schedule(id, delay).await,
            None if last => ledger.done(id).await,
            None => Ok(()),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "validation ledger: cannot schedule the next check");
        }
    }

    /// Revokes a session for its validation through the store (reason `denied`); `true` if this
    /// call cut it (not already cut).
    async fn revoke_for_validation(
        &self,
        id: SessionId,
    ) -> Result<bool, crate::engine::EngineError> {
        match self.store_deny(id).await? {
            KickOutcome::Kicked(_) => {
                self.metrics().count_revoked(EndReason::Denied, 1);
                Ok(true)
            }
            KickOutcome::AlreadyGone(_) | KickOutcome::NotFound => Ok(false),
        }
    }

    /// One check of session `id`: `record` when the caller has it (the admitting sidecar),
    /// else read from the ledger (a recheck, or a takeover).
    pub async fn check(&self, id: SessionId, record: Option<ValidationRecord>) {
        if !self.enter_check(id) {
            return;
        }
        self.check_inner(id, record).await;
        self.validations()
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    fn enter_check(&self, id: SessionId) -> bool {
        self.validations()
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id)
    }

    async fn check_inner(&self, id: SessionId, record: Option<ValidationRecord>) {
        let ledger = self.validations().ledger().clone();
        let session = match self.session_now(id).await {
            Ok(Some(session)) => session,
            // Gone from the store: no more checks.
            Ok(None) => {
                let _ = ledger.done(id).await;
                return;
            }
            // The store is down: the schedule stays for a later claim.
            Err(_) => return,
        };
        if session.state != SessionState::Active {
            let _ = ledger.done(id).await;
            return;
        }
        let policy = self.policies().load().resolve(&session.account).clone();
        let mut record = match record {
            Some(record) => record,
            None => match ledger.get(id, record_ttl(&policy)).await {
                Ok(Some(record)) => record,
                Ok(None) => {
                    // No facts left (expired): check with what the store knows.
                    ValidationRecord {
                        state: ValidationState::Pending,
                        validator: None,
                        message: None,
                        facts: RequestFacts::default(),
                        admitted_at_ms: session.created_at_ms,
                        checks: 1,
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "validation ledger: cannot read a record");
                    return;
                }
            },
        };
        let first = record.checks == 0;
        let validators = decide::validators_for_check(&policy.validators, first);
        if validators.is_empty() {
            self.schedule_next(id, &policy, true).await;
            return;
        }
        let reviewed = reviewed_record(&session);
        let outcomes = self
            .run_validators(&policy.source, &validators, &reviewed, &record, !first)
            .await;
        let decision = decide::decide(&outcomes);
        self.observe_verdict(&record, &decision);
        self.apply_decision(id, &policy, &mut record, decision, true)
            .await;
    }

    /// Adds the validation state to a session answer, and for a session a validator revoked,
    /// reason `denied` and the validator's message. Asks the ledger only when the account's
    /// policy has validators or the session was revoked.
    pub async fn annotate_validation(&self, session: &mut Session, policy: &EffectivePolicy) {
        let revoked = session.state == SessionState::Revoked;
        if policy.validators.is_empty() && !revoked {
            return;
        }
        let Ok(id) = session.session_id.parse::<SessionId>() else {
            return;
        };
        match self
            .validations()
            .ledger()
            .get(id, record_ttl(policy))
            .await
        {
            Ok(Some(record)) => {
                session.validation = Some(record.state);
                // The store records `denied`; a store written by an older sidecar says
                // `kicked`, which the recorded verdict corrects.
                if revoked
                    && matches!(session.reason, Some(EndReason::Denied | EndReason::Kicked))
                    && matches!(
                        record.state,
                        ValidationState::Denied | ValidationState::Failed
                    )
                    && record.message.is_some()
                {
                    session.reason = Some(EndReason::Denied);
                    session.validation_message = record.message;
                }
            }
            Ok(None) => {}
            Err(error) => tracing::debug!(%error, "validation ledger unavailable"),
        }
    }
}

fn reviewed_session(session: &Session) -> ReviewedSession {
    ReviewedSession {
        session_id: session.session_id.clone(),
        account: session.account.clone(),
        stream_id: session.stream_id.clone(),
        created_at: session.created_at.clone(),
    }
}

fn reviewed_record(record: &SessionRecord) -> ReviewedSession {
    ReviewedSession {
        session_id: record.id.to_string(),
        account: record.account.clone(),
        stream_id: record.stream_id.clone(),
        created_at: rfc3339(record.created_at_ms),
    }
}

/// Claims due checks (rechecks, and those of sidecars that died) and runs them, until
/// `shutdown`; then waits for the checks in flight.
pub async fn claim_loop(engine: Engine, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let validations = engine.validations().clone();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let policies = engine.policies().load_full();
        let all: Vec<ValidatorSpec> = policies
            .policies()
            .iter()
            .flat_map(|p| p.spec.validators.iter().cloned())
            .collect();
        if all.is_empty() {
            continue;
        }
        let lease = decide::lease_for(&all);
        match validations.ledger().claim(lease, CLAIM_BATCH).await {
            Ok(ids) => {
                for id in ids {
                    let engine = engine.clone();
                    validations
                        .checks
                        .spawn(async move { engine.check(id, None).await });
                }
            }
            Err(error) => tracing::debug!(%error, "validation ledger: cannot claim checks"),
        }
    }
    validations.checks.close();
    validations.checks.wait().await;
}
