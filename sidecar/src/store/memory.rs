//! The embedded in-memory store: one process, nothing else to install.
//!
//! One mutex guards all state. Every critical section is a handful of hash-map operations with no
//! I/O and no `.await`, so a single lock is simpler than sharding and not a bottleneck next to HTTP.
//!
//! Expiry never scans all sessions. Each change of a session's deadline files its id in a bucket
//! of a timing wheel keyed by the deadline's tick (100 ms); the reaper empties the buckets that are due
//! and skips ids whose deadline moved on (a heartbeat files the id again). Per-account operations
//! also expire the account's overdue sessions, so admission never counts a dead session even
//! between reaper runs. Cost per request depends on the account's sessions, not on the total.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{HeartbeatOutcome, KickOutcome, OpenOutcome, OpenRequest, SessionStore, StoreError};
use crate::admission::{self, Decision};
use crate::clock::{Clock, SystemClock};
use crate::session::{EndReason, Revocation, SessionId, SessionRecord, SessionState};

/// How often the background reaper expires overdue sessions and drops old tombstones.
const REAP_INTERVAL: Duration = Duration::from_millis(200);
/// Width of a timing-wheel bucket: bounds how late the reaper notices an expiry.
const WHEEL_TICK_MS: i64 = 100;
/// Revocation notices buffered for slow subscribers before they start missing some.
const REVOCATION_BUFFER: usize = 16_384;

/// The embedded store. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    clock: Arc<dyn Clock>,
    revocations: broadcast::Sender<Revocation>,
}

#[derive(Default)]
struct State {
    /// Every session still answerable: active ones and tombstones of cut ones.
    sessions: HashMap<SessionId, Entry>,
    accounts: HashMap<String, AccountIndex>,
    /// Tick of a deadline -> sessions whose deadline fell in it (some entries are stale). Holds
    /// about (TTL + tombstone time) / tick keys, however many sessions there are.
    wheel: BTreeMap<i64, Vec<SessionId>>,
    /// Admission order, to break ties between sessions created in the same millisecond.
    next_seq: u64,
    active_total: u64,
}

struct Entry {
    record: SessionRecord,
    seq: u64,
}

impl Entry {
    /// Active: when it expires. Ended: when its tombstone may be dropped (one TTL after the end).
    fn deadline(&self) -> i64 {
        match self.record.state {
            SessionState::Active => self.record.expires_at_ms,
            _ => self.record.expires_at_ms.saturating_add(self.record.ttl_ms),
        }
    }
}

#[derive(Default)]
struct AccountIndex {
    /// Stream id -> its active session.
    active: HashMap<String, SessionId>,
    /// Stream id -> its most recently cut session, so a heartbeat can answer 410.
    last_cut: HashMap<String, SessionId>,
}

impl MemoryStore {
    /// A store on the system clock. Inside a Tokio runtime it also starts its reaper, which stops
    /// when the last clone of the store is dropped.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// A store on `clock`; see [`MemoryStore::new`].
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        let (revocations, _) = broadcast::channel(REVOCATION_BUFFER);
        let store = Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                clock,
                revocations,
            }),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(reaper(Arc::downgrade(&store.shared)));
        }
        store
    }

    /// Expires overdue sessions and drops tombstones older than their TTL. The reaper calls this;
    /// tests on a manual clock call it directly.
    pub fn reap(&self) {
        let now = self.now();
        let cut = {
            let mut state = self.lock();
            state.reap(now)
        };
        self.publish(cut);
    }

    fn now(&self) -> i64 {
        self.shared.clock.now_ms()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-made change: every mutation is
        // completed before anything that could panic. So a poisoned lock is still consistent.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, cut: Vec<SessionRecord>) {
        for session in cut {
            // No subscriber is not an error: nobody needs to hear of it.
            let _ = self.shared.revocations.send(Revocation {
                session,
                local: true,
            });
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

async fn reaper(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        MemoryStore { shared }.reap();
    }
}

impl State {
    fn schedule(&mut self, id: SessionId, deadline_ms: i64) {
        // Bucket by the deadline rounded up to a tick, so a due bucket holds only passed deadlines.
        let tick = (deadline_ms + WHEEL_TICK_MS - 1).div_euclid(WHEEL_TICK_MS);
        self.wheel.entry(tick).or_default().push(id);
    }

    fn reap(&mut self, now: i64) -> Vec<SessionRecord> {
        let mut cut = Vec::new();
        let due_ticks: Vec<i64> = self
            .wheel
            .range(..=now.div_euclid(WHEEL_TICK_MS))
            .map(|(tick, _)| *tick)
            .collect();
        for tick in due_ticks {
            let ids = self.wheel.remove(&tick).unwrap_or_default();
            for id in ids {
                let Some(entry) = self.sessions.get(&id) else {
                    continue;
                };
                if entry.deadline() > now {
                    continue; // renewed since; filed again under its new deadline
                }
                if entry.record.state == SessionState::Active {
                    cut.push(self.end_active(id, now, EndReason::Expired));
                } else {
                    self.drop_tombstone(id);
                }
            }
        }
        cut
    }

    /// Turns an active session into a tombstone with `reason`. Returns the cut record.
    fn end_active(&mut self, id: SessionId, now: i64, reason: EndReason) -> SessionRecord {
        let entry = self.sessions.get_mut(&id).expect("active session exists");
        let record = &mut entry.record;
        // An expired session ended when its TTL ran out, not when we noticed.
        let ended_at = match reason {
            EndReason::Expired => record.expires_at_ms.min(now),
            EndReason::Evicted | EndReason::Kicked => now,
        };
        record.state = match reason {
            EndReason::Expired => SessionState::Expired,
            EndReason::Evicted | EndReason::Kicked => SessionState::Revoked,
        };
        record.reason = Some(reason);
        record.expires_at_ms = ended_at;
        let record = record.clone();
        let deadline = entry.deadline();
        let index = self.accounts.entry(record.account.clone()).or_default();
        index.active.remove(&record.stream_id);
        index.last_cut.insert(record.stream_id.clone(), id);
        self.active_total -= 1;
        if deadline <= now {
            // Noticed only after its tombstone time ran out too: answer as if the reaper had
            // been on time, so behaviour does not depend on when it last ran.
            self.drop_tombstone(id);
        } else {
            self.schedule(id, deadline);
        }
        record
    }

    /// The session `id` if it is still answerable at `now`: active, or cut less than one TTL ago.
    /// A tombstone past its time may linger until the reaper runs; it is not answered.
    fn answerable(&self, id: &SessionId, now: i64) -> Option<&SessionRecord> {
        self.sessions
            .get(id)
            .filter(|e| e.record.state == SessionState::Active || e.deadline() > now)
            .map(|e| &e.record)
    }

    fn drop_tombstone(&mut self, id: SessionId) {
        let Some(entry) = self.sessions.remove(&id) else {
            return;
        };
        let record = entry.record;
        if let Some(index) = self.accounts.get_mut(&record.account) {
            if index.last_cut.get(&record.stream_id) == Some(&id) {
                index.last_cut.remove(&record.stream_id);
            }
            if index.active.is_empty() && index.last_cut.is_empty() {
                self.accounts.remove(&record.account);
            }
        }
    }

    /// Expires the account's overdue sessions, so admission never counts them.
    fn expire_overdue(&mut self, account: &str, now: i64) -> Vec<SessionRecord> {
        let Some(index) = self.accounts.get(account) else {
            return Vec::new();
        };
        let overdue: Vec<SessionId> = index
            .active
            .values()
            .filter(|id| {
                self.sessions
                    .get(id)
                    .is_some_and(|e| !e.record.is_active_at(now))
            })
            .copied()
            .collect();
        overdue
            .into_iter()
            .map(|id| self.end_active(id, now, EndReason::Expired))
            .collect()
    }

    /// The account's active sessions as `(created_at_ms, seq, id)`.
    fn active_of(&self, account: &str) -> Vec<(i64, u64, SessionId)> {
        self.accounts
            .get(account)
            .map(|index| {
                index
                    .active
                    .values()
                    .filter_map(|id| self.sessions.get(id))
                    .map(|e| (e.record.created_at_ms, e.seq, e.record.id))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn active_count(&self, account: &str) -> u32 {
        self.accounts
            .get(account)
            .map_or(0, |index| index.active.len() as u32)
    }

    fn records_oldest_first(&self, account: &str) -> Vec<SessionRecord> {
        let active = self.active_of(account);
        admission::oldest(&active, active.len())
            .into_iter()
            .filter_map(|id| self.sessions.get(&id).map(|e| e.record.clone()))
            .collect()
    }

    fn renew(&mut self, id: SessionId, now: i64, ttl_ms: i64) -> SessionRecord {
        let entry = self.sessions.get_mut(&id).expect("renewed session exists");
        entry.record.expires_at_ms = now + ttl_ms;
        entry.record.ttl_ms = ttl_ms;
        let record = entry.record.clone();
        self.schedule(id, record.expires_at_ms);
        record
    }

    fn open(&mut self, request: &OpenRequest<'_>, now: i64) -> (OpenOutcome, Vec<SessionRecord>) {
        let mut cut = self.expire_overdue(request.account, now);
        let existing = self
            .accounts
            .get(request.account)
            .and_then(|index| index.active.get(request.stream_id))
            .copied();
        if let Some(id) = existing {
            let session = self.renew(id, now, request.ttl_ms);
            let active = self.active_count(request.account);
            return (OpenOutcome::Renewed { session, active }, cut);
        }
        let active = self.active_of(request.account);
        let decision =
            admission::decide(active.len(), request.limit, request.on_limit, request.mode);
        let (evict, dry_run) = match decision {
            Decision::Refuse => {
                let active = self.records_oldest_first(request.account);
                return (OpenOutcome::Refused { active }, cut);
            }
            Decision::Admit => (0, None),
            Decision::AdmitEvicting(n) => (n, None),
            Decision::AdmitDryRun(would) => (0, Some(would)),
        };
        let evicted: Vec<SessionRecord> = admission::oldest(&active, evict)
            .into_iter()
            .map(|id| self.end_active(id, now, EndReason::Evicted))
            .collect();
        cut.extend(evicted.iter().cloned());

        let record = request.new_session(now);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.schedule(record.id, record.expires_at_ms);
        let index = self.accounts.entry(record.account.clone()).or_default();
        index.active.insert(record.stream_id.clone(), record.id);
        let active = index.active.len() as u32;
        self.sessions.insert(
            record.id,
            Entry {
                record: record.clone(),
                seq,
            },
        );
        self.active_total += 1;
        let outcome = OpenOutcome::Admitted {
            session: record,
            evicted,
            active,
            dry_run,
        };
        (outcome, cut)
    }

    fn heartbeat(
        &mut self,
        account: &str,
        stream_id: &str,
        ttl_ms: i64,
        now: i64,
    ) -> (HeartbeatOutcome, Vec<SessionRecord>) {
        let cut = self.expire_overdue(account, now);
        let Some(index) = self.accounts.get(account) else {
            return (HeartbeatOutcome::NotFound, cut);
        };
        if let Some(&id) = index.active.get(stream_id) {
            let session = self.renew(id, now, ttl_ms);
            let active = self.active_count(account);
            return (HeartbeatOutcome::Renewed { session, active }, cut);
        }
        let gone = index
            .last_cut
            .get(stream_id)
            .and_then(|id| self.answerable(id, now))
            .cloned();
        (
            gone.map_or(HeartbeatOutcome::NotFound, HeartbeatOutcome::Gone),
            cut,
        )
    }

    fn end(
        &mut self,
        account: &str,
        stream_id: &str,
        now: i64,
    ) -> (Option<SessionRecord>, Vec<SessionRecord>) {
        let cut = self.expire_overdue(account, now);
        let Some(index) = self.accounts.get_mut(account) else {
            return (None, cut);
        };
        let Some(id) = index.active.remove(stream_id) else {
            return (None, cut);
        };
        // A session ended by its player leaves no tombstone: there is nothing to cut.
        if index.active.is_empty() && index.last_cut.is_empty() {
            self.accounts.remove(account);
        }
        self.active_total -= 1;
        let ended = self.sessions.remove(&id).map(|e| e.record);
        (ended, cut)
    }

    fn kick(&mut self, id: SessionId, now: i64) -> (KickOutcome, Vec<SessionRecord>) {
        let Some(entry) = self.sessions.get(&id) else {
            return (KickOutcome::NotFound, Vec::new());
        };
        let account = entry.record.account.clone();
        let mut cut = self.expire_overdue(&account, now);
        let Some(record) = self.answerable(&id, now) else {
            return (KickOutcome::NotFound, cut);
        };
        if record.state != SessionState::Active {
            return (KickOutcome::AlreadyGone(record.clone()), cut);
        }
        let kicked = self.end_active(id, now, EndReason::Kicked);
        cut.push(kicked.clone());
        (KickOutcome::Kicked(kicked), cut)
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn open(&self, request: &OpenRequest<'_>) -> Result<OpenOutcome, StoreError> {
        let now = self.now();
        let (outcome, cut) = self.lock().open(request, now);
        self.publish(cut);
        Ok(outcome)
    }

    async fn heartbeat(
        &self,
        account: &str,
        stream_id: &str,
        ttl_ms: i64,
    ) -> Result<HeartbeatOutcome, StoreError> {
        let now = self.now();
        let (outcome, cut) = self.lock().heartbeat(account, stream_id, ttl_ms, now);
        self.publish(cut);
        Ok(outcome)
    }

    async fn end(
        &self,
        account: &str,
        stream_id: &str,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let now = self.now();
        let (ended, cut) = self.lock().end(account, stream_id, now);
        self.publish(cut);
        Ok(ended)
    }

    async fn list(&self, account: &str) -> Result<Vec<SessionRecord>, StoreError> {
        let now = self.now();
        let (active, cut) = {
            let mut state = self.lock();
            let cut = state.expire_overdue(account, now);
            (state.records_oldest_first(account), cut)
        };
        self.publish(cut);
        Ok(active)
    }

    async fn get(&self, id: SessionId) -> Result<Option<SessionRecord>, StoreError> {
        let now = self.now();
        let (found, cut) = {
            let mut state = self.lock();
            let account = state.sessions.get(&id).map(|e| e.record.account.clone());
            let cut = account
                .map(|a| state.expire_overdue(&a, now))
                .unwrap_or_default();
            (state.answerable(&id, now).cloned(), cut)
        };
        self.publish(cut);
        Ok(found)
    }

    async fn kick(&self, id: SessionId) -> Result<KickOutcome, StoreError> {
        let now = self.now();
        let (outcome, cut) = self.lock().kick(id, now);
        self.publish(cut);
        Ok(outcome)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn active_sessions(&self) -> Result<Option<u64>, StoreError> {
        Ok(Some(self.lock().active_total))
    }

    fn revocations(&self) -> broadcast::Receiver<Revocation> {
        self.shared.revocations.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::policy::{Mode, OnLimitExceeded};

    fn request<'a>(account: &'a str, stream_id: &'a str) -> OpenRequest<'a> {
        OpenRequest {
            account,
            stream_id,
            limit: 3,
            ttl_ms: 10_000,
            on_limit: OnLimitExceeded::RejectNew,
            mode: Mode::Enforce,
        }
    }

    #[test]
    fn tombstones_are_dropped_one_ttl_after_the_cut_and_memory_is_freed() {
        let clock = ManualClock::new(1_000_000);
        let store = MemoryStore::with_clock(Arc::new(clock.clone()));
        let now = clock.now_ms();
        let (outcome, _) = store.lock().open(&request("a", "s"), now);
        let OpenOutcome::Admitted { session, .. } = outcome else {
            panic!("not admitted: {outcome:?}")
        };
        clock.advance(10_000);
        store.reap();
        assert_eq!(
            store.lock().sessions[&session.id].record.state,
            SessionState::Expired
        );
        assert_eq!(store.lock().active_total, 0);
        clock.advance(10_000);
        store.reap();
        let state = store.lock();
        assert!(state.sessions.is_empty());
        assert!(state.accounts.is_empty());
        assert!(state.wheel.is_empty());
    }

    #[test]
    fn heartbeats_leave_stale_wheel_entries_that_the_reaper_skips() {
        let clock = ManualClock::new(0);
        let store = MemoryStore::with_clock(Arc::new(clock.clone()));
        store.lock().open(&request("a", "s"), clock.now_ms());
        for _ in 0..5 {
            clock.advance(5_000);
            let (outcome, _) = store.lock().heartbeat("a", "s", 10_000, clock.now_ms());
            assert!(matches!(outcome, HeartbeatOutcome::Renewed { .. }));
            store.reap();
        }
        assert_eq!(store.lock().active_total, 1);
    }
}
