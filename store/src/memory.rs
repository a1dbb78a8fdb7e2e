//! The embedded in-memory store: one process, nothing else to install.
//!
//! One mutex guards all state. Every critical section is a handful of hash-map operations with no
//! I/O and no `.await`, so a single lock is simpler than sharding and not a bottleneck next to HTTP.
//!
//! Expiry never scans all sessions. Each session is filed in exactly one bucket of a timing wheel
//! keyed by its deadline's tick (100 ms); a heartbeat moves it to its new bucket, so the wheel
//! holds one entry per session whatever the heartbeat rate. The reaper empties the buckets that
//! are due. Per-account operations also expire the account's overdue sessions, so admission never
//! counts a dead session even between reaper runs. Cost per request depends on the account's
//! sessions, not on the total.
//!
//! `max_sessions` caps the sessions held (active ones and tombstones of cut ones): past it a new
//! admission fails with [`StoreError::AtCapacity`] instead of growing without bound.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::{
    HeartbeatOutcome, KickOutcome, OpenOutcome, OpenRequest, SessionPage, SessionStore, StoreError,
    Touched,
};
use crate::admission::{self, Decision};
use crate::clock::{Clock, SystemClock};
use crate::media::{MediaUse, NetworkKey, StreamClaim, StreamHolder};
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
    max_sessions: u64,
    subscribed: watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    /// Every session still answerable: active ones and tombstones of cut ones.
    sessions: HashMap<SessionId, Entry>,
    accounts: HashMap<String, AccountIndex>,
    /// Tick of a deadline -> the sessions whose deadline falls in it. Each session is in exactly
    /// one bucket (its entry's `tick`), so the wheel's size follows the number of sessions, not
    /// the heartbeat rate.
    wheel: BTreeMap<i64, HashSet<SessionId>>,
    /// Admission order, to break ties between sessions created in the same millisecond.
    next_seq: u64,
    active_total: u64,
    /// Sessions their players ended -> until when a write-back ([`SessionStore::adopt`]) of them
    /// is refused (one TTL). Filed in the wheel too, so they are forgotten on time.
    ended: HashMap<SessionId, i64>,
}

struct Entry {
    record: SessionRecord,
    seq: u64,
    /// The wheel bucket this session is filed in.
    tick: i64,
    /// Its media use, once media was played; dropped when the session stops being active.
    media: Option<Box<MediaUse>>,
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
    /// A store on the system clock, without a session cap.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// A store on `clock`, without a session cap. Its reaper runs only when the owner runs
    /// [`SessionStore::background`]; without it, sessions still expire when their account is
    /// next touched.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self::with_limits(clock, u64::MAX)
    }

    /// A store on `clock` holding at most `max_sessions` sessions (active ones and tombstones).
    pub fn with_limits(clock: Arc<dyn Clock>, max_sessions: u64) -> Self {
        let (revocations, _) = broadcast::channel(REVOCATION_BUFFER);
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                clock,
                revocations,
                max_sessions,
                subscribed: watch::Sender::new(true),
            }),
        }
    }

    /// Sessions held now (active and tombstones), for tests of the cap and of memory use.
    pub fn held(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Entries in the expiry wheel, for tests that its size does not follow the heartbeat rate.
    pub fn wheel_entries(&self) -> usize {
        self.lock().wheel.values().map(HashSet::len).sum()
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

async fn reaper(store: MemoryStore, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => store.reap(),
        }
    }
}

impl State {
    /// Files `id` (which must be in `sessions`) under `deadline_ms`, moving it out of its old
    /// bucket.
    fn schedule(&mut self, id: SessionId, deadline_ms: i64) {
        // Bucket by the deadline rounded up to a tick, so a due bucket holds only passed deadlines.
        let tick = (deadline_ms + WHEEL_TICK_MS - 1).div_euclid(WHEEL_TICK_MS);
        let Some(entry) = self.sessions.get_mut(&id) else {
            return;
        };
        let old = std::mem::replace(&mut entry.tick, tick);
        if old != tick {
            self.unfile(id, old);
        }
        self.wheel.entry(tick).or_default().insert(id);
    }

    /// Files an ended session's marker under `until_ms` (see [`State::ended`]).
    fn file_ended(&mut self, id: SessionId, until_ms: i64) {
        let tick = (until_ms + WHEEL_TICK_MS - 1).div_euclid(WHEEL_TICK_MS);
        self.wheel.entry(tick).or_default().insert(id);
    }

    fn unfile(&mut self, id: SessionId, tick: i64) {
        if let Some(bucket) = self.wheel.get_mut(&tick) {
            bucket.remove(&id);
            if bucket.is_empty() {
                self.wheel.remove(&tick);
            }
        }
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
                    if let Some(&until) = self.ended.get(&id) {
                        if until > now {
                            self.file_ended(id, until);
                        } else {
                            self.ended.remove(&id);
                        }
                    }
                    continue;
                };
                if entry.deadline() > now {
                    // Filed early (clock rounding); file it again under its deadline.
                    let deadline = entry.deadline();
                    self.schedule(id, deadline);
                    continue;
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
        entry.media = None;
        let record = &mut entry.record;
        // An expired session ended when its TTL ran out, not when we noticed.
        let ended_at = match reason {
            EndReason::Expired => record.expires_at_ms.min(now),
            EndReason::Evicted | EndReason::Kicked | EndReason::Denied | EndReason::Shared => now,
        };
        record.state = match reason {
            EndReason::Expired => SessionState::Expired,
            EndReason::Evicted | EndReason::Kicked | EndReason::Denied | EndReason::Shared => {
                SessionState::Revoked
            }
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
        self.unfile(id, entry.tick);
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

    fn open(
        &mut self,
        request: &OpenRequest<'_>,
        now: i64,
        max_sessions: u64,
    ) -> (Result<OpenOutcome, StoreError>, Vec<SessionRecord>) {
        let mut cut = self.expire_overdue(request.account, now);
        let existing = self
            .accounts
            .get(request.account)
            .and_then(|index| index.active.get(request.stream_id))
            .copied();
        if let Some(id) = existing {
            let session = self.renew(id, now, request.ttl_ms);
            let active = self.active_count(request.account);
            return (Ok(OpenOutcome::Renewed { session, active }), cut);
        }
        let active = self.active_of(request.account);
        let decision =
            admission::decide(active.len(), request.limit, request.on_limit, request.mode);
        let (evict, dry_run) = match decision {
            Decision::Refuse => {
                let active = self.records_oldest_first(request.account);
                return (Ok(OpenOutcome::Refused { active }), cut);
            }
            Decision::Admit => (0, None),
            Decision::AdmitEvicting(n) => (n, None),
            Decision::AdmitDryRun(would) => (0, Some(would)),
        };
        let held = self.sessions.len() as u64;
        if held >= max_sessions {
            return (Err(StoreError::AtCapacity(held)), cut);
        }
        let evicted: Vec<SessionRecord> = admission::oldest(&active, evict)
            .into_iter()
            .map(|id| self.end_active(id, now, EndReason::Evicted))
            .collect();
        cut.extend(evicted.iter().cloned());

        let record = request.new_session(now);
        let active = self.insert_active(record.clone());
        let outcome = OpenOutcome::Admitted {
            session: record,
            evicted,
            active,
            dry_run,
        };
        (Ok(outcome), cut)
    }

    /// Stores a new active session. Returns its account's active count.
    fn insert_active(&mut self, record: SessionRecord) -> u32 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let id = record.id;
        let expires = record.expires_at_ms;
        let index = self.accounts.entry(record.account.clone()).or_default();
        index.active.insert(record.stream_id.clone(), id);
        let active = index.active.len() as u32;
        self.sessions.insert(
            id,
            Entry {
                record,
                seq,
                tick: i64::MIN,
                media: None,
            },
        );
        self.schedule(id, expires);
        self.active_total += 1;
        active
    }

    fn touch(
        &mut self,
        id: SessionId,
        ttl_ms: i64,
        renew_after_ms: i64,
        now: i64,
    ) -> (Option<Touched>, Vec<SessionRecord>) {
        let Some(account) = self.sessions.get(&id).map(|e| e.record.account.clone()) else {
            return (None, Vec::new());
        };
        let cut = self.expire_overdue(&account, now);
        let Some(record) = self.answerable(&id, now).cloned() else {
            return (None, cut);
        };
        let last_renewed = record.expires_at_ms - record.ttl_ms;
        if record.state == SessionState::Active && now - last_renewed >= renew_after_ms {
            let session = self.renew(id, now, ttl_ms);
            return (
                Some(Touched {
                    session,
                    renewed: true,
                }),
                cut,
            );
        }
        let touched = Touched {
            session: record,
            renewed: false,
        };
        (Some(touched), cut)
    }

    /// The media use of session `id` if it is active at `now` (its account's overdue sessions
    /// expired first, returned as the second value).
    fn active_media(
        &mut self,
        id: SessionId,
        now: i64,
    ) -> (Option<&mut MediaUse>, Vec<SessionRecord>) {
        let Some(account) = self.sessions.get(&id).map(|e| e.record.account.clone()) else {
            return (None, Vec::new());
        };
        let cut = self.expire_overdue(&account, now);
        let media = self
            .sessions
            .get_mut(&id)
            .filter(|e| e.record.state == SessionState::Active)
            .map(|e| &mut **e.media.get_or_insert_with(Box::default));
        (media, cut)
    }

    fn adopt(&mut self, session: &SessionRecord, now: i64) -> (bool, Vec<SessionRecord>) {
        let cut = self.expire_overdue(&session.account, now);
        if self.sessions.contains_key(&session.id) {
            return (true, cut);
        }
        if self
            .ended
            .get(&session.id)
            .is_some_and(|until| *until > now)
        {
            return (false, cut);
        }
        let taken = self
            .accounts
            .get(&session.account)
            .is_some_and(|index| index.active.contains_key(&session.stream_id));
        if taken {
            return (false, cut);
        }
        let mut record = session.clone();
        record.state = SessionState::Active;
        record.reason = None;
        record.expires_at_ms = now + record.ttl_ms;
        self.insert_active(record);
        (true, cut)
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
        let ended = self.sessions.remove(&id).map(|e| {
            self.unfile(id, e.tick);
            e.record
        });
        if let Some(record) = &ended {
            let until = now.saturating_add(record.ttl_ms);
            self.ended.insert(id, until);
            self.file_ended(id, until);
        }
        (ended, cut)
    }

    fn revoke(
        &mut self,
        id: SessionId,
        reason: EndReason,
        now: i64,
    ) -> (KickOutcome, Vec<SessionRecord>) {
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
        let kicked = self.end_active(id, now, reason);
        cut.push(kicked.clone());
        (KickOutcome::Kicked(kicked), cut)
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn open(&self, request: &OpenRequest<'_>) -> Result<OpenOutcome, StoreError> {
        let now = self.now();
        let (outcome, cut) = self.lock().open(request, now, self.shared.max_sessions);
        self.publish(cut);
        outcome
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

    async fn list_all(
        &self,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<SessionPage, StoreError> {
        let now = self.now();
        let mut active: Vec<SessionRecord> = {
            let state = self.lock();
            state
                .sessions
                .values()
                .map(|e| &e.record)
                .filter(|r| r.is_active_at(now) && after.is_none_or(|a| r.id > a))
                .cloned()
                .collect()
        };
        active.sort_by_key(|r| r.id);
        let more = active.len() > limit;
        active.truncate(limit);
        Ok(SessionPage {
            next_after: more.then(|| active.last().map(|r| r.id)).flatten(),
            sessions: active,
        })
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

    async fn revoke(&self, id: SessionId, reason: EndReason) -> Result<KickOutcome, StoreError> {
        let now = self.now();
        let (outcome, cut) = self.lock().revoke(id, reason, now);
        self.publish(cut);
        Ok(outcome)
    }

    async fn touch(
        &self,
        id: SessionId,
        ttl_ms: i64,
        renew_after_ms: i64,
    ) -> Result<Option<Touched>, StoreError> {
        let now = self.now();
        let (touched, cut) = self.lock().touch(id, ttl_ms, renew_after_ms, now);
        self.publish(cut);
        Ok(touched)
    }

    async fn note_network(
        &self,
        id: SessionId,
        network: NetworkKey,
        window_ms: i64,
        keep: u32,
    ) -> Result<Option<u32>, StoreError> {
        let now = self.now();
        let (networks, cut) = {
            let mut state = self.lock();
            let (media, cut) = state.active_media(id, now);
            (
                media.map(|m| m.note_network(network, now, window_ms, keep)),
                cut,
            )
        };
        self.publish(cut);
        Ok(networks)
    }

    async fn claim_stream(
        &self,
        id: SessionId,
        holder: StreamHolder,
        max: u32,
        lease_ms: i64,
    ) -> Result<StreamClaim, StoreError> {
        let now = self.now();
        let (claim, cut) = {
            let mut state = self.lock();
            let (media, cut) = state.active_media(id, now);
            (
                media.map_or(StreamClaim::Gone, |m| {
                    m.claim_stream(holder, now, lease_ms, max)
                }),
                cut,
            )
        };
        self.publish(cut);
        Ok(claim)
    }

    async fn release_stream(&self, id: SessionId, holder: StreamHolder) -> Result<(), StoreError> {
        if let Some(entry) = self.lock().sessions.get_mut(&id)
            && let Some(media) = &mut entry.media
        {
            media.release_stream(holder);
            // Like the Redis store, which deletes an empty media record.
            if media.is_empty() {
                entry.media = None;
            }
        }
        Ok(())
    }

    async fn adopt(&self, session: &SessionRecord) -> Result<bool, StoreError> {
        let now = self.now();
        let (adopted, cut) = self.lock().adopt(session, now);
        self.publish(cut);
        Ok(adopted)
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

    fn background(&self, shutdown: CancellationToken) -> Option<BoxFuture<'static, ()>> {
        Some(Box::pin(reaper(self.clone(), shutdown)))
    }

    fn subscribed(&self) -> watch::Receiver<bool> {
        self.shared.subscribed.subscribe()
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
        let (outcome, _) = store.lock().open(&request("a", "s"), now, u64::MAX);
        let outcome = outcome.unwrap();
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
    fn the_wheel_holds_one_entry_per_session_whatever_the_heartbeat_rate() {
        let clock = ManualClock::new(0);
        let store = MemoryStore::with_clock(Arc::new(clock.clone()));
        for s in ["s1", "s2"] {
            let (outcome, _) = store
                .lock()
                .open(&request("a", s), clock.now_ms(), u64::MAX);
            outcome.unwrap();
        }
        let s2 = store.lock().accounts["a"].active["s2"];
        for _ in 0..10_000 {
            clock.advance(150);
            let (outcome, _) = store.lock().heartbeat("a", "s1", 10_000, clock.now_ms());
            assert!(matches!(outcome, HeartbeatOutcome::Renewed { .. }));
            let (touched, _) = store.lock().touch(s2, 10_000, 0, clock.now_ms());
            assert!(touched.unwrap().renewed);
        }
        store.reap();
        assert_eq!(store.lock().active_total, 2);
        assert_eq!(store.wheel_entries(), 2);
        assert_eq!(store.lock().wheel.len(), 1, "both deadlines share a tick");
    }

    #[test]
    fn the_cap_refuses_new_sessions_but_renews_existing_ones() {
        let clock = ManualClock::new(0);
        let store = MemoryStore::with_limits(Arc::new(clock.clone()), 2);
        let now = clock.now_ms();
        for account in ["a", "b"] {
            store.lock().open(&request(account, "s"), now, 2).0.unwrap();
        }
        let (third, _) = store.lock().open(&request("c", "s"), now, 2);
        assert_eq!(third, Err(StoreError::AtCapacity(2)));
        let (again, _) = store.lock().open(&request("a", "s"), now, 2);
        assert!(matches!(again, Ok(OpenOutcome::Renewed { .. })));
        assert_eq!(store.held(), 2);
    }
}
