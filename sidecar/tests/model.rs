//! Property test: random operation sequences against the memory store agree with a simple model.

use std::sync::Arc;

use proptest::prelude::*;
use streamgate_sidecar::clock::ManualClock;
use streamgate_sidecar::policy::{Mode, OnLimitExceeded};
use streamgate_sidecar::session::{EndReason, SessionId};
use streamgate_sidecar::store::{
    HeartbeatOutcome, KickOutcome, MemoryStore, OpenOutcome, OpenRequest, SessionStore,
};

const TTL: i64 = 1_000;
const ACCOUNTS: [&str; 2] = ["a", "b"];
const STREAMS: [&str; 4] = ["s0", "s1", "s2", "s3"];

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
    let a = 0..ACCOUNTS.len();
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

fn run(ops: Vec<Op>, limit: u32, on_limit: OnLimitExceeded) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let clock = ManualClock::new(1_000_000);
        let store = MemoryStore::with_clock(Arc::new(clock.clone()));
        let mut model = Model::default();
        let mut admitted: Vec<SessionId> = Vec::new();
        let mut now = 1_000_000i64;
        for op in ops {
            match op {
                Op::Advance(ms) => {
                    clock.advance(ms);
                    now += ms;
                }
                Op::Reap => store.reap(),
                Op::Open(a, s) => {
                    model.settle(now);
                    let request = OpenRequest {
                        account: ACCOUNTS[a],
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
                    let got = store.heartbeat(ACCOUNTS[a], STREAMS[s], TTL).await.unwrap();
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
                    let got = store.end(ACCOUNTS[a], STREAMS[s]).await.unwrap();
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
            for (a, name) in ACCOUNTS.iter().enumerate() {
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
    fn reject_new_matches_the_model(ops in prop::collection::vec(op(), 1..80), limit in 1u32..4) {
        run(ops, limit, OnLimitExceeded::RejectNew)?;
    }

    #[test]
    fn evict_oldest_matches_the_model(ops in prop::collection::vec(op(), 1..80), limit in 1u32..4) {
        run(ops, limit, OnLimitExceeded::EvictOldest)?;
    }
}
