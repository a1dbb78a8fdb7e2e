//! The validation ledger: each session's validation record (state, the denial's message, the
//! request facts a check needs) and the schedule of checks to run, claimed with a lease.
//!
//! On Redis the ledger is shared by every sidecar of the namespace: a check claimed by a sidecar
//! that dies before the verdict is claimed again by another one once its lease runs out, so no
//! admitted session is left unvalidated. The in-memory ledger lives and dies with its sidecar
//! (like the embedded store it goes with): checks pending at a crash are lost with the sessions.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::{Script, Value};
use serde::{Deserialize, Serialize};

use super::decide::{FailureKind, ValidationState};
use super::review::RequestFacts;
use crate::clock::{Clock, SystemClock};
use crate::session::SessionId;
use crate::store::{RedisTarget, StoreError};
use streamgate_store::redis_connection::{LazyRedis, RedisCall};
use streamgate_store::validation_record::{validation_key_prefix, validation_record_key};

/// What the ledger keeps of one session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidationRecord {
    /// Where validation stands.
    pub state: ValidationState,
    /// The validator that denied or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validator: Option<String>,
    /// The message of a denial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What the admitting request said, for the SessionReview (also on takeover).
    pub facts: RequestFacts,
    /// When the session was admitted (ms since the epoch), for the admission-to-verdict time.
    pub admitted_at_ms: i64,
    /// Checks completed so far; the first one calls the Async validators.
    pub checks: u32,
}

/// Where validation records and the check schedule live.
#[async_trait]
pub trait ValidationLedger: Send + Sync + 'static {
    /// Writes the record of `id`, kept `ttl` (renewed by [`ValidationLedger::get`]).
    async fn put(
        &self,
        id: SessionId,
        record: &ValidationRecord,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// The record of `id`, its lifetime renewed to `ttl` from now.
    async fn get(
        &self,
        id: SessionId,
        ttl: Duration,
    ) -> Result<Option<ValidationRecord>, StoreError>;

    /// Schedules a check of `id` in `delay` (replacing any schedule it had).
    async fn schedule(&self, id: SessionId, delay: Duration) -> Result<(), StoreError>;

    /// Claims up to `max` checks that are due: each is rescheduled `lease` from now, so it is
    /// claimed again (by any sidecar) if its claimant does not finish or reschedule it by then.
    async fn claim(&self, lease: Duration, max: usize) -> Result<Vec<SessionId>, StoreError>;

    /// Removes the schedule of `id`: no more checks.
    async fn done(&self, id: SessionId) -> Result<(), StoreError>;

    /// Checks scheduled, due or not (for metrics and tests).
    async fn scheduled(&self) -> Result<u64, StoreError>;

    /// Counts one call of `validator` of `policy`: answered (`None`, allow or deny alike) or
    /// failed with `failure`'s kind. Shared ledgers keep the counts for the operator (see
    /// `streamgate_store::validator_health`); the in-memory one has no reader and keeps none.
    async fn record_call(
        &self,
        _policy: &str,
        _validator: &str,
        _failure: Option<FailureKind>,
    ) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The in-process ledger, for the embedded store.
pub struct MemoryLedger {
    clock: Arc<dyn Clock>,
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    records: HashMap<SessionId, (ValidationRecord, i64)>,
    due: BTreeSet<(i64, SessionId)>,
    due_of: HashMap<SessionId, i64>,
}

impl MemoryInner {
    fn set_due(&mut self, id: SessionId, at: i64) {
        if let Some(old) = self.due_of.insert(id, at) {
            self.due.remove(&(old, id));
        }
        self.due.insert((at, id));
    }
}

impl Default for MemoryLedger {
    fn default() -> Self {
        Self::new(Arc::new(SystemClock))
    }
}

impl MemoryLedger {
    /// An empty ledger on `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        // Map operations only: a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait]
impl ValidationLedger for MemoryLedger {
    async fn put(
        &self,
        id: SessionId,
        record: &ValidationRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        // Expired records go when records are written: the map never outgrows the live ones.
        if inner.records.len() % 1024 == 1023 {
            inner.records.retain(|_, (_, until)| *until > now);
        }
        inner
            .records
            .insert(id, (record.clone(), now.saturating_add(ms(ttl))));
        Ok(())
    }

    async fn get(
        &self,
        id: SessionId,
        ttl: Duration,
    ) -> Result<Option<ValidationRecord>, StoreError> {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        Ok(match inner.records.get_mut(&id) {
            Some((record, until)) if *until > now => {
                *until = now.saturating_add(ms(ttl));
                Some(record.clone())
            }
            _ => None,
        })
    }

    async fn schedule(&self, id: SessionId, delay: Duration) -> Result<(), StoreError> {
        let at = self.clock.now_ms().saturating_add(ms(delay));
        self.lock().set_due(id, at);
        Ok(())
    }

    async fn claim(&self, lease: Duration, max: usize) -> Result<Vec<SessionId>, StoreError> {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        let due: Vec<SessionId> = inner
            .due
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(max)
            .map(|(_, id)| *id)
            .collect();
        for id in &due {
            inner.set_due(*id, now.saturating_add(ms(lease)));
        }
        Ok(due)
    }

    async fn done(&self, id: SessionId) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(at) = inner.due_of.remove(&id) {
            inner.due.remove(&(at, id));
        }
        Ok(())
    }

    async fn scheduled(&self) -> Result<u64, StoreError> {
        Ok(self.lock().due.len() as u64)
    }
}

/// The ledger on Redis, shared by the sidecars of one namespace.
///
/// Keys (one Redis Cluster slot per namespace, by the hash tag `{sg-validation:NAMESPACE}`):
/// `…:due`, a sorted set of session ids scored by when their next check is due (ms on the Redis
/// server's clock, so sidecars' clocks do not matter), and `…:r:ID`, the JSON record of a
/// session with a TTL.
pub struct RedisLedger {
    /// Follows a Sentinel master through failovers, as the store does.
    redis: LazyRedis,
    /// Keys are named by `streamgate_store::validation_record` (the operator reads them too).
    namespace: String,
    schedule: Script,
    claim: Script,
    record_call: Script,
}

/// KEYS[1] the due set; ARGV[1] the session id, ARGV[2] the delay in ms.
const SCHEDULE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
";

/// KEYS[1] the due set; ARGV[1] the lease in ms, ARGV[2] the most to claim. Returns the ids
/// claimed, each rescheduled a lease from now.
const CLAIM_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
end
return ids
";

impl RedisLedger {
    /// A ledger for the sidecars of `namespace` on `target`; each call waits at most `timeout`.
    pub fn new(target: RedisTarget, namespace: &str, timeout: Duration) -> Self {
        Self {
            redis: LazyRedis::new(target, timeout),
            namespace: namespace.to_string(),
            schedule: Script::new(SCHEDULE_LUA),
            claim: Script::new(CLAIM_LUA),
            record_call: Script::new(streamgate_store::validator_health::RECORD_LUA),
        }
    }

    fn due_key(&self) -> String {
        format!("{}:due", validation_key_prefix(&self.namespace))
    }

    fn record_key(&self, id: SessionId) -> String {
        validation_record_key(&self.namespace, id)
    }
}

fn malformed(what: &str) -> StoreError {
    StoreError::Fatal(format!("validation ledger: malformed {what}"))
}

#[async_trait]
impl ValidationLedger for RedisLedger {
    async fn put(
        &self,
        id: SessionId,
        record: &ValidationRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).map_err(|_| malformed("record"))?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.record_key(id))
            .arg(json)
            .arg("PX")
            .arg(ms(ttl).max(1));
        self.redis.run(RedisCall::Plain(cmd)).await.map(|_| ())
    }

    async fn get(
        &self,
        id: SessionId,
        ttl: Duration,
    ) -> Result<Option<ValidationRecord>, StoreError> {
        let mut cmd = redis::cmd("GETEX");
        cmd.arg(self.record_key(id)).arg("PX").arg(ms(ttl).max(1));
        match self.redis.run(RedisCall::Plain(cmd)).await? {
            Value::Nil => Ok(None),
            Value::BulkString(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|_| malformed("record")),
            _ => Err(malformed("record")),
        }
    }

    async fn schedule(&self, id: SessionId, delay: Duration) -> Result<(), StoreError> {
        let mut invocation = self.schedule.prepare_invoke();
        invocation
            .key(self.due_key())
            .arg(id.to_string())
            .arg(ms(delay));
        self.redis
            .run(RedisCall::Script(invocation))
            .await
            .map(|_| ())
    }

    async fn claim(&self, lease: Duration, max: usize) -> Result<Vec<SessionId>, StoreError> {
        let mut invocation = self.claim.prepare_invoke();
        invocation.key(self.due_key()).arg(ms(lease)).arg(max);
        let Value::Array(items) = self.redis.run(RedisCall::Script(invocation)).await? else {
            return Err(malformed("claim reply"));
        };
        let mut ids = Vec::with_capacity(items.len());
        for item in items {
            let Value::BulkString(bytes) = item else {
                return Err(malformed("claim reply"));
            };
            let text = String::from_utf8(bytes).map_err(|_| malformed("session id"))?;
            ids.push(text.parse().map_err(|()| malformed("session id"))?);
        }
        Ok(ids)
    }

    async fn done(&self, id: SessionId) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(self.due_key()).arg(id.to_string());
        self.redis.run(RedisCall::Plain(cmd)).await.map(|_| ())
    }

    async fn record_call(
        &self,
        policy: &str,
        validator: &str,
        failure: Option<FailureKind>,
    ) -> Result<(), StoreError> {
        use streamgate_store::validator_health::{
            TTL, WINDOW, WINDOW_MINUTES, validator_health_key,
        };
        let mut invocation = self.record_call.prepare_invoke();
        invocation
            .key(validator_health_key(&self.namespace, policy, validator))
            .arg(if failure.is_some() { "1" } else { "0" })
            .arg(failure.map(FailureKind::label).unwrap_or_default())
            .arg(ms(WINDOW))
            .arg(ms(TTL))
            .arg(WINDOW_MINUTES);
        self.redis
            .run(RedisCall::Script(invocation))
            .await
            .map(|_| ())
    }

    async fn scheduled(&self) -> Result<u64, StoreError> {
        let mut cmd = redis::cmd("ZCARD");
        cmd.arg(self.due_key());
        match self.redis.run(RedisCall::Plain(cmd)).await? {
            Value::Int(n) => Ok(u64::try_from(n).unwrap_or(0)),
            _ => Err(malformed("ZCARD reply")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn record() -> ValidationRecord {
        ValidationRecord {
            state: ValidationState::Pending,
            validator: None,
            message: None,
            facts: RequestFacts::default(),
            admitted_at_ms: 0,
            checks: 0,
        }
    }

    #[tokio::test]
    async fn claims_take_due_checks_and_lease_them() {
        let clock = Arc::new(ManualClock::new(1_000));
        let ledger = MemoryLedger::new(clock.clone());
        let (a, b) = (SessionId::for_account("a"), SessionId::for_account("b"));
        ledger.schedule(a, Duration::ZERO).await.unwrap();
        ledger.schedule(b, Duration::from_secs(10)).await.unwrap();
        let lease = Duration::from_secs(3);
        assert_eq!(ledger.claim(lease, 10).await.unwrap(), [a]);
        assert!(ledger.claim(lease, 10).await.unwrap().is_empty(), "leased");
        clock.advance(3_000);
        assert_eq!(ledger.claim(lease, 10).await.unwrap(), [a], "lease ran out");
        ledger.done(a).await.unwrap();
        clock.advance(10_000);
        assert_eq!(ledger.claim(lease, 10).await.unwrap(), [b]);
        assert_eq!(ledger.scheduled().await.unwrap(), 1);
    }

    #[test]
    fn the_stores_reader_reads_the_state_of_a_record() {
        let mut denied = record();
        denied.state = ValidationState::Denied;
        denied.message = Some("shared account".into());
        let json = serde_json::to_vec(&denied).unwrap();
        assert_eq!(
            streamgate_store::validation_record::parse_validation_state(&json),
            Some(ValidationState::Denied)
        );
    }

    #[tokio::test]
    async fn records_expire_unless_read() {
        let clock = Arc::new(ManualClock::new(0));
        let ledger = MemoryLedger::new(clock.clone());
        let id = SessionId::for_account("a");
        let ttl = Duration::from_secs(10);
        ledger.put(id, &record(), ttl).await.unwrap();
        clock.advance(9_000);
        assert!(ledger.get(id, ttl).await.unwrap().is_some());
        clock.advance(9_000);
        assert!(
            ledger.get(id, ttl).await.unwrap().is_some(),
            "renewed by the read"
        );
        clock.advance(10_000);
        assert!(ledger.get(id, ttl).await.unwrap().is_none());
    }
}
