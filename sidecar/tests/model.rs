//! Property test: random operation sequences against every store (memory, Redis standalone,
//! Redis Cluster) agree with a simple model. Time is a manual clock: the memory store reads it
//! directly, the Redis scripts are handed it instead of the server's clock.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use streamgate_sidecar::clock::{Clock, ManualClock};
use streamgate_sidecar::policy::{Mode, OnLimitExceeded};
use streamgate_sidecar::session::{EndReason, SessionId};
use streamgate_sidecar::store::{
    HeartbeatOutcome, KickOutcome, MemoryStore, OpenOutcome, OpenRequest, RedisStore, RedisTarget,
    SessionStore,
};

const TTL: i64 = 1_000;
const STREAMS: [&str; 4] = ["s0", "s1", "s2", "s3"];

/// Which store a run exercises.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Redis(&'static str),
}

/// The store under test on `clock`, and a way to run its reaper (memory only: Redis expires
/// lazily inside every script).
fn store_for(
    backend: Backend,
    clock: &ManualClock,
) -> (Arc<dyn SessionStore>, Option<MemoryStore>) {
    match backend {
        Backend::Memory => {
            let store = MemoryStore::with_clock(Arc::new(clock.clone()));
            (Arc::new(store.clone()), Some(store))
        }
        Backend::Redis(env) => {
            let url = std::env::var(env).unwrap_or_else(|_| {
                panic!("{env} is not set: run the tests with ./scripts/test, which starts Redis")
            });
            let store = RedisStore::with_clock(
                RedisTarget::parse(&url).unwrap(),
                Duration::from_secs(5),
                Arc::new(clock.clone()) as Arc<dyn Clock>,
            );
            (Arc::new(store), None)
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Open(usize, usize),
    Heartbeat(usize, usize),
    End(usize, usize),
    /// Kick the n-th session ever admitted.
    Kick(usize),
    Advance(i64),
    Reap,
}

fn op() -> impl Strategy<Value = Op> {
    let a = 0..2usize;
    let s = 0..STREAMS.len();
    prop_oneof![
        4 => (a.clone(), s.clone()).prop_map(|(a, s)| Op::Open(a, s)),
        3 => (a.clone(), s.clone()).prop_map(|(a, s)| Op::Heartbeat(a, s)),
        1 => (a, s).prop_map(|(a, s)| Op::End(a, s)),
        1 => (0usize..20).prop_map(Op::Kick),
        2 => prop_oneof![Just(1i64), Just(300), Just(999), Just(1_000), Just(2_500)].prop_map(Op::Advance),
        1 => Just(Op::Reap),
    ]
}

/// The model: a plain list of sessions, scanned in full. Obviously right, not fast.
#[derive(Clone, Debug)]
struct ModelSession {
    id: SessionId,
    account: usize,
    stream: usize,
    created: i64,
    order: usize,
    expires: i64,
    cut: Option<(EndReason, i64)>,
}

#[derive(Default)]
struct Model {
    sessions: Vec<ModelSession>,
}

impl Model {
    fn active(&self, account: usize, now: i64) -> Vec<&ModelSession> {
        let mut v: Vec<&ModelSession> = self
            .sessions
            .iter()
            .filter(|s| s.account == account && s.cut.is_none() && now < s.expires)
            .collect();
        v.sort_by_key(|s| (s.created, s.order));
        v
    }

    /// Marks sessions past their TTL as expired at their expiry time.
    fn settle(&mut self, now: i64) {
        for s in &mut self.sessions {
            if s.cut.is_none() && s.expires <= now {
                s.cut = Some((EndReason::Expired, s.expires));
            }
        }
        // Tombstones are answerable for one TTL after the cut.
        self.sessions
            .retain(|s| s.cut.is_none_or(|(_, at)| now < at + TTL));
    }

    fn last_cut(&self, account: usize, stream: usize) -> Option<&ModelSession> {
        self.sessions
            .iter()
            .filter(|s| s.account == account && s.stream == stream && s.cut.is_some())
            .max_by_key(|s| s.cut.unwrap().1 * 1_000_000 + s.order as i64)
    }
}

fn run(
    backend: Backend,
    ops: Vec<Op>,
    limit: u32,
    on_limit: OnLimitExceeded,
) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        // Redis keys live on: each case gets accounts of its own. Time starts at the real clock
        // so that the keys' own expiry (PEXPIREAT, on the server's clock) never comes first.
        let start = chrono::Utc::now().timestamp_millis();
        let clock = ManualClock::new(start);
        let (store, memory) = store_for(backend, &clock);
        let case = format!("{:08x}", rand::random::<u32>());
        let accounts = [format!("{case}-a"), format!("{case}-b")];
        let mut model = Model::default();
        let mut admitted: Vec<SessionId> = Vec::new();
        let mut now = start;
        for op in ops {
            match op {
                Op::Advance(ms) => {
                    clock.advance(ms);
                    now += ms;
                }
                Op::Reap => {
                    if let Some(memory) = &memory {
                        memory.reap();
                    }
                }
                Op::Open(a, s) => {
                    model.settle(now);
                    let request = OpenRequest {
                        account: &accounts[a],
                        stream_id: STREAMS[s],
                        limit,
                        ttl_ms: TTL,
                        on_limit,
                        mode: Mode::Enforce,
                    };
                    let got = store.open(&request).await.unwrap();
                    let active = model.active(a, now);
                    if let Some(existing) = active.iter().find(|x| x.stream == s) {
                        let id = existing.id;
                        prop_assert!(matches!(&got, OpenOutcome::Renewed { session, .. } if session.id == id), "{got:?}");
                        model.sessions.iter_mut().find(|x| x.id == id).unwrap().expires = now + TTL;
                    } else if active.len() < limit as usize || on_limit == OnLimitExceeded::EvictOldest {
                        let victims: Vec<SessionId> = active
                            .iter()
                            .take((active.len() + 1).saturating_sub(limit as usize))
                            .map(|x| x.id)
                            .collect();
                        let OpenOutcome::Admitted { session, evicted, active: count, .. } = &got else {
                            return Err(TestCaseError::fail(format!("expected admission, got {got:?}")));
                        };
                        prop_assert_eq!(evicted.iter().map(|e| e.id).collect::<Vec<_>>(), victims.clone());
                        for v in victims {
                            model.sessions.iter_mut().find(|x| x.id == v).unwrap().cut = Some((EndReason::Evicted, now));
                        }
                        model.sessions.push(ModelSession {
                            id: session.id,
                            account: a,
                            stream: s,
                            created: now,
                            order: admitted.len(),
                            expires: now + TTL,
                            cut: None,
                        });
                        admitted.push(session.id);
                        prop_assert_eq!(*count as usize, model.active(a, now).len());
                    } else {
                        let OpenOutcome::Refused { active: listed } = &got else {
                            return Err(TestCaseError::fail(format!("expected refusal, got {got:?}")));
                        };
                        let expected: Vec<SessionId> = active.iter().map(|x| x.id).collect();
                        prop_assert_eq!(listed.iter().map(|x| x.id).collect::<Vec<_>>(), expected);
                    }
                }
                Op::Heartbeat(a, s) => {
                    model.settle(now);
                    let got = store.heartbeat(&accounts[a], STREAMS[s], TTL).await.unwrap();
                    let active = model.active(a, now);
                    if let Some(existing) = active.iter().find(|x| x.stream == s) {
                        let id = existing.id;
                        prop_assert!(matches!(&got, HeartbeatOutcome::Renewed { session, .. } if session.id == id), "{got:?}");
                        model.sessions.iter_mut().find(|x| x.id == id).unwrap().expires = now + TTL;
                    } else if let Some(cut) = model.last_cut(a, s) {
                        prop_assert!(matches!(&got, HeartbeatOutcome::Gone(g) if g.id == cut.id && g.reason == Some(cut.cut.unwrap().0)), "{got:?} vs {cut:?}");
                    } else {
                        prop_assert_eq!(got, HeartbeatOutcome::NotFound);
                    }
                }
                Op::End(a, s) => {
                    model.settle(now);
                    let got = store.end(&accounts[a], STREAMS[s]).await.unwrap();
                    let id = model.active(a, now).iter().find(|x| x.stream == s).map(|x| x.id);
                    prop_assert_eq!(got.map(|r| r.id), id);
                    model.sessions.retain(|x| Some(x.id) != id);
                }
                Op::Kick(n) => {
                    model.settle(now);
                    let Some(&id) = admitted.get(n) else { continue };
                    let got = store.kick(id).await.unwrap();
                    match model.sessions.iter_mut().find(|x| x.id == id) {
                        Some(m) if m.cut.is_none() => {
                            prop_assert!(matches!(&got, KickOutcome::Kicked(k) if k.id == id), "{got:?}");
                            m.cut = Some((EndReason::Kicked, now));
                        }
                        Some(m) => {
                            let reason = m.cut.unwrap().0;
                            prop_assert!(matches!(&got, KickOutcome::AlreadyGone(g) if g.reason == Some(reason)), "{got:?}");
                        }
                        None => prop_assert_eq!(got, KickOutcome::NotFound),
                    }
                }
            }
            // The promise: never more than the limit active, whatever happened.
            for (a, name) in accounts.iter().enumerate() {
                let listed = store.list(name).await.unwrap();
                prop_assert!(listed.len() <= limit as usize);
                model.settle(now);
                let expected: Vec<SessionId> = model.active(a, now).iter().map(|x| x.id).collect();
                prop_assert_eq!(listed.iter().map(|x| x.id).collect::<Vec<_>>(), expected);
            }
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn memory_reject_new_matches_the_model(ops in prop::collection::vec(op(), 1..80), limit in 1u32..4) {
        run(Backend::Memory, ops, limit, OnLimitExceeded::RejectNew)?;
    }

    #[test]
    fn memory_evict_oldest_matches_the_model(ops in prop::collection::vec(op(), 1..80), limit in 1u32..4) {
        run(Backend::Memory, ops, limit, OnLimitExceeded::EvictOldest)?;
    }
}

proptest! {
    // Every operation is a round trip to a real server: fewer cases, same generator.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn redis_standalone_reject_new_matches_the_model(ops in prop::collection::vec(op(), 1..60), limit in 1u32..4) {
        run(Backend::Redis("STREAMGATE_TEST_REDIS"), ops, limit, OnLimitExceeded::RejectNew)?;
    }

    #[test]
    fn redis_standalone_evict_oldest_matches_the_model(ops in prop::collection::vec(op(), 1..60), limit in 1u32..4) {
        run(Backend::Redis("STREAMGATE_TEST_REDIS"), ops, limit, OnLimitExceeded::EvictOldest)?;
    }

    #[test]
    fn redis_cluster_reject_new_matches_the_model(ops in prop::collection::vec(op(), 1..60), limit in 1u32..4) {
        run(Backend::Redis("STREAMGATE_TEST_REDIS_CLUSTER"), ops, limit, OnLimitExceeded::RejectNew)?;
    }

    #[test]
    fn redis_cluster_evict_oldest_matches_the_model(ops in prop::collection::vec(op(), 1..60), limit in 1u32..4) {
        run(Backend::Redis("STREAMGATE_TEST_REDIS_CLUSTER"), ops, limit, OnLimitExceeded::EvictOldest)?;
    }
}
