//! The store contract: every `SessionStore` must pass these, unchanged.
//!
//! Time is a manual clock the cases move (the memory store reads it; the Redis scripts are handed
//! it instead of the server's clock), so no case sleeps. Each case uses fresh account names so
//! stores can be shared.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use streamgate_sidecar::clock::{Clock, ManualClock};
use streamgate_sidecar::policy::{Mode, OnLimitExceeded};
use streamgate_sidecar::session::{EndReason, SessionId, SessionState};
use streamgate_sidecar::store::{
    HeartbeatOutcome, KickOutcome, MemoryStore, OpenOutcome, OpenRequest, RedisStore, RedisTarget,
    SessionStore,
};

const TTL_MS: i64 = 60_000;

fn account(name: &str) -> String {
    format!("{name}-{:08x}", rand::random::<u32>())
}

fn req<'a>(
    account: &'a str,
    stream: &'a str,
    limit: u32,
    on_limit: OnLimitExceeded,
) -> OpenRequest<'a> {
    OpenRequest {
        account,
        stream_id: stream,
        limit,
        ttl_ms: TTL_MS,
        on_limit,
        mode: Mode::Enforce,
    }
}

async fn admit(store: &dyn SessionStore, account: &str, stream: &str, limit: u32) -> SessionId {
    match store
        .open(&req(account, stream, limit, OnLimitExceeded::RejectNew))
        .await
        .unwrap()
    {
        OpenOutcome::Admitted { session, .. } => session.id,
        other => panic!("{stream} not admitted: {other:?}"),
    }
}

pub async fn open_renew_list_end(store: Arc<dyn SessionStore>, _clock: ManualClock) {
    let a = account("basic");
    let request = req(&a, "s1", 2, OnLimitExceeded::RejectNew);
    let OpenOutcome::Admitted {
        session,
        evicted,
        active,
        dry_run,
    } = store.open(&request).await.unwrap()
    else {
        panic!("not admitted")
    };
    assert_eq!(session.id.tag, streamgate_sidecar::session::account_tag(&a));
    assert_eq!(
        (session.account.as_str(), session.stream_id.as_str()),
        (a.as_str(), "s1")
    );
    assert_eq!(session.state, SessionState::Active);
    assert_eq!(session.expires_at_ms - session.created_at_ms, TTL_MS);
    assert_eq!((evicted.len(), active, dry_run), (0, 1, None));

    let again = store
        .open(&req(&a, "s1", 2, OnLimitExceeded::RejectNew))
        .await
        .unwrap();
    assert!(
        matches!(again, OpenOutcome::Renewed { session: ref s, active: 1 } if s.id == session.id),
        "{again:?}"
    );

    let second = admit(store.as_ref(), &a, "s2", 2).await;
    let listed = store.list(&a).await.unwrap();
    assert_eq!(
        listed.iter().map(|s| s.id).collect::<Vec<_>>(),
        [session.id, second]
    );
    assert_eq!(
        store.get(second).await.unwrap().map(|s| s.stream_id),
        Some("s2".into())
    );

    let ended = store.end(&a, "s1").await.unwrap();
    assert_eq!(ended.map(|s| s.id), Some(session.id));
    assert_eq!(store.end(&a, "s1").await.unwrap(), None);
    assert_eq!(
        store.heartbeat(&a, "s1", TTL_MS).await.unwrap(),
        HeartbeatOutcome::NotFound
    );
    assert_eq!(store.get(session.id).await.unwrap(), None);
    assert_eq!(store.list(&a).await.unwrap().len(), 1);
    assert_eq!(store.list(&account("nobody")).await.unwrap(), vec![]);
}

pub async fn reject_new_refuses_at_the_limit(store: Arc<dyn SessionStore>, _clock: ManualClock) {
    let a = account("reject");
    let first = admit(store.as_ref(), &a, "s1", 2).await;
    let second = admit(store.as_ref(), &a, "s2", 2).await;
    let refused = store
        .open(&req(&a, "s3", 2, OnLimitExceeded::RejectNew))
        .await
        .unwrap();
    let OpenOutcome::Refused { active } = refused else {
        panic!("not refused: {refused:?}")
    };
    assert_eq!(
        active.iter().map(|s| s.id).collect::<Vec<_>>(),
        [first, second]
    );
    assert_eq!(store.list(&a).await.unwrap().len(), 2);
    assert_eq!(
        store.heartbeat(&a, "s3", TTL_MS).await.unwrap(),
        HeartbeatOutcome::NotFound
    );
}

pub async fn evict_oldest_revokes_the_oldest(store: Arc<dyn SessionStore>, clock: ManualClock) {
    let a = account("evict");
    let first = admit(store.as_ref(), &a, "s1", 2).await;
    clock.advance(2);
    let second = admit(store.as_ref(), &a, "s2", 2).await;
    let mut notices = store.revocations();
    let outcome = store
        .open(&req(&a, "s3", 2, OnLimitExceeded::EvictOldest))
        .await
        .unwrap();
    let OpenOutcome::Admitted {
        session,
        evicted,
        active,
        ..
    } = outcome
    else {
        panic!("not admitted: {outcome:?}")
    };
    assert_eq!(active, 2);
    assert_eq!(evicted.iter().map(|s| s.id).collect::<Vec<_>>(), [first]);
    assert_eq!(evicted[0].reason, Some(EndReason::Evicted));
    assert_eq!(
        store
            .list(&a)
            .await
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect::<Vec<_>>(),
        [second, session.id]
    );
    match store.heartbeat(&a, "s1", TTL_MS).await.unwrap() {
        HeartbeatOutcome::Gone(gone) => {
            assert_eq!(gone.id, first);
            assert_eq!(gone.state, SessionState::Revoked);
            assert_eq!(gone.reason, Some(EndReason::Evicted));
        }
        other => panic!("expected Gone, got {other:?}"),
    }
    let notice = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = notices.recv().await.unwrap();
            if n.session.id == first {
                return n;
            }
        }
    })
    .await
    .expect("a revocation notice for the evicted session");
    assert_eq!(notice.session.reason, Some(EndReason::Evicted));
}

pub async fn dry_run_admits_over_the_limit(store: Arc<dyn SessionStore>, _clock: ManualClock) {
    let a = account("dry");
    admit(store.as_ref(), &a, "s1", 1).await;
    let mut request = req(&a, "s2", 1, OnLimitExceeded::RejectNew);
    request.mode = Mode::DryRun;
    let outcome = store.open(&request).await.unwrap();
    assert!(
        matches!(outcome, OpenOutcome::Admitted { active: 2, ref evicted, dry_run: Some(_), .. } if evicted.is_empty()),
        "{outcome:?}"
    );
    assert_eq!(store.list(&a).await.unwrap().len(), 2);
}

pub async fn kick_revokes_and_stays_answerable(store: Arc<dyn SessionStore>, _clock: ManualClock) {
    let a = account("kick");
    let id = admit(store.as_ref(), &a, "s1", 1).await;
    let mut notices = store.revocations();
    assert!(
        matches!(store.kick(id).await.unwrap(), KickOutcome::Kicked(ref k) if k.id == id && k.reason == Some(EndReason::Kicked))
    );
    assert!(
        matches!(store.kick(id).await.unwrap(), KickOutcome::AlreadyGone(ref k) if k.reason == Some(EndReason::Kicked))
    );
    assert_eq!(
        store.kick(SessionId::for_account(&a)).await.unwrap(),
        KickOutcome::NotFound
    );
    let got = store
        .get(id)
        .await
        .unwrap()
        .expect("a kicked session is answerable");
    assert_eq!(
        (got.state, got.reason),
        (SessionState::Revoked, Some(EndReason::Kicked))
    );
    assert!(
        matches!(store.heartbeat(&a, "s1", TTL_MS).await.unwrap(), HeartbeatOutcome::Gone(ref g) if g.id == id)
    );
    assert_eq!(store.list(&a).await.unwrap(), vec![]);
    admit(store.as_ref(), &a, "s2", 1).await; // the slot is free
    let notice = tokio::time::timeout(Duration::from_secs(5), notices.recv())
        .await
        .expect("a revocation notice")
        .unwrap();
    assert_eq!(
        (notice.session.id, notice.session.reason),
        (id, Some(EndReason::Kicked))
    );
}

/// Sharing detection (`shared`) and session validators (`denied`) revoke with their own reason,
/// which every store keeps and announces.
pub async fn revoke_keeps_its_reason(store: Arc<dyn SessionStore>, _clock: ManualClock) {
    for (name, reason) in [("shared", EndReason::Shared), ("denied", EndReason::Denied)] {
        let a = account(name);
        let id = admit(store.as_ref(), &a, "s1", 1).await;
        let mut notices = store.revocations();
        assert!(
            matches!(store.revoke(id, reason).await.unwrap(), KickOutcome::Kicked(ref k) if k.id == id && k.reason == Some(reason)),
            "{name}"
        );
        let got = store.get(id).await.unwrap().expect("answerable");
        assert_eq!(
            (got.state, got.reason),
            (SessionState::Revoked, Some(reason)),
            "{name}"
        );
        assert!(
            matches!(store.heartbeat(&a, "s1", TTL_MS).await.unwrap(), HeartbeatOutcome::Gone(ref g) if g.reason == Some(reason)),
            "{name}"
        );
        let notice = tokio::time::timeout(Duration::from_secs(5), notices.recv())
            .await
            .expect("a revocation notice")
            .unwrap();
        assert_eq!(
            (notice.session.id, notice.session.reason),
            (id, Some(reason)),
            "{name}"
        );
    }
}

pub async fn sessions_expire_after_their_ttl(store: Arc<dyn SessionStore>, clock: ManualClock) {
    let a = account("expire");
    let mut request = req(&a, "s1", 1, OnLimitExceeded::RejectNew);
    request.ttl_ms = 300;
    let OpenOutcome::Admitted { session, .. } = store.open(&request).await.unwrap() else {
        panic!("not admitted")
    };
    let mut notices = store.revocations();
    clock.advance(450);
    // The expired session no longer counts...
    assert_eq!(store.list(&a).await.unwrap(), vec![]);
    // ...and its heartbeat gets Gone(expired), not a renewal.
    match store.heartbeat(&a, "s1", 300).await.unwrap() {
        HeartbeatOutcome::Gone(gone) => {
            assert_eq!(gone.id, session.id);
            assert_eq!(
                (gone.state, gone.reason),
                (SessionState::Expired, Some(EndReason::Expired))
            );
        }
        other => panic!("expected Gone, got {other:?}"),
    }
    let notice = tokio::time::timeout(Duration::from_secs(5), notices.recv())
        .await
        .expect("an expiry notice")
        .unwrap();
    assert_eq!(notice.session.reason, Some(EndReason::Expired));
    admit(store.as_ref(), &a, "s2", 1).await;
}

pub async fn a_long_forgotten_session_does_not_block_the_account(
    store: Arc<dyn SessionStore>,
    clock: ManualClock,
) {
    // One session expires and its tombstone time runs out while a longer-lived session keeps
    // the account's data alive; the account must still work.
    let a = account("forgotten");
    let mut short = req(&a, "short", 3, OnLimitExceeded::RejectNew);
    short.ttl_ms = 300;
    let mut long = req(&a, "long", 3, OnLimitExceeded::RejectNew);
    long.ttl_ms = 10_000;
    store.open(&short).await.unwrap();
    store.open(&long).await.unwrap();
    clock.advance(800);
    let outcome = store
        .open(&req(&a, "new", 3, OnLimitExceeded::RejectNew))
        .await
        .unwrap();
    assert!(
        matches!(outcome, OpenOutcome::Admitted { active: 2, .. }),
        "{outcome:?}"
    );
    assert_eq!(
        store.heartbeat(&a, "short", 300).await.unwrap(),
        HeartbeatOutcome::NotFound
    );
    let streams: Vec<String> = store
        .list(&a)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.stream_id)
        .collect();
    assert_eq!(streams, ["long", "new"]);
}

pub async fn heartbeats_keep_a_session_alive(store: Arc<dyn SessionStore>, clock: ManualClock) {
    let a = account("renew");
    let mut request = req(&a, "s1", 1, OnLimitExceeded::RejectNew);
    request.ttl_ms = 400;
    store.open(&request).await.unwrap();
    for _ in 0..4 {
        clock.advance(150);
        let outcome = store.heartbeat(&a, "s1", 400).await.unwrap();
        assert!(
            matches!(outcome, HeartbeatOutcome::Renewed { active: 1, .. }),
            "{outcome:?}"
        );
    }
}

pub async fn hostile_ids_are_distinct(store: Arc<dyn SessionStore>, _clock: ManualClock) {
    let base = account("h");
    let names = [
        format!("{{{base}}}"),
        base.clone(),
        format!("{base}:"),
        format!("{base}:s1"),
        format!("}}{base}{{"),
        format!("{base}{}", "x".repeat(128 - base.len() - 1)),
    ];
    for name in &names {
        admit(store.as_ref(), name, "s1", 1).await;
        // `s1` under `{base}:` must not be the same key as `s1` under `{base}` etc.
        admit(store.as_ref(), name, ":s1", 2).await;
    }
    for name in &names {
        let listed = store.list(name).await.unwrap();
        assert_eq!(listed.len(), 2, "{name}");
        assert!(listed.iter().all(|s| &s.account == name));
    }
}

pub async fn concurrent_opens_never_exceed_the_limit(
    store: Arc<dyn SessionStore>,
    _clock: ManualClock,
) {
    let a = account("race");
    let opens = (0..200).map(|i| {
        let store = store.clone();
        let a = a.clone();
        tokio::spawn(async move {
            let stream = format!("s{i}");
            matches!(
                store
                    .open(&req(&a, &stream, 3, OnLimitExceeded::RejectNew))
                    .await
                    .unwrap(),
                OpenOutcome::Admitted { .. }
            )
        })
    });
    let admitted = join_all(opens)
        .await
        .into_iter()
        .filter(|r| *r.as_ref().unwrap())
        .count();
    assert_eq!(admitted, 3);
    assert_eq!(store.list(&a).await.unwrap().len(), 3);
}

pub async fn touch_renews_only_an_active_session_renewed_long_enough_ago(
    store: Arc<dyn SessionStore>,
    clock: ManualClock,
) {
    let a = account("touch");
    let id = admit(store.as_ref(), &a, "s1", 2).await;
    let first = store.touch(id, TTL_MS, 1_000).await.unwrap().unwrap();
    assert!(!first.renewed, "renewed a session renewed just now");
    clock.advance(999);
    assert!(
        !store
            .touch(id, TTL_MS, 1_000)
            .await
            .unwrap()
            .unwrap()
            .renewed
    );
    clock.advance(1);
    let renewed = store.touch(id, TTL_MS, 1_000).await.unwrap().unwrap();
    assert!(renewed.renewed);
    assert_eq!(
        renewed.session.expires_at_ms,
        first.session.expires_at_ms + 1_000
    );
    // Never renews a cut session, and finds nothing for an unknown id.
    store.kick(id).await.unwrap();
    clock.advance(5_000);
    let cut = store.touch(id, TTL_MS, 0).await.unwrap().unwrap();
    assert_eq!(
        (cut.renewed, cut.session.state),
        (false, SessionState::Revoked)
    );
    let unknown = SessionId::for_account(&a);
    assert_eq!(store.touch(unknown, TTL_MS, 0).await.unwrap(), None);
}

pub async fn adopt_writes_back_a_session_unless_its_stream_moved_on_or_it_ended(
    store: Arc<dyn SessionStore>,
    clock: ManualClock,
) {
    use streamgate_sidecar::session::SessionRecord;
    let a = account("adopt");
    let now = clock.now_ms();
    let degraded = |stream: &str| SessionRecord {
        id: SessionId::for_account(&a),
        account: a.clone(),
        stream_id: stream.to_string(),
        state: SessionState::Active,
        reason: None,
        created_at_ms: now,
        expires_at_ms: now + TTL_MS,
        ttl_ms: TTL_MS,
    };
    // The account is at its limit: an adopted session was admitted already and still counts.
    admit(store.as_ref(), &a, "s1", 1).await;
    let tv = degraded("tv");
    assert!(store.adopt(&tv).await.unwrap());
    assert!(
        store.adopt(&tv).await.unwrap(),
        "adopting twice changes nothing"
    );
    let listed: Vec<SessionId> = store.list(&a).await.unwrap().iter().map(|s| s.id).collect();
    assert!(listed.contains(&tv.id), "{listed:?}");
    assert_eq!(listed.len(), 2);
    let touched = store.touch(tv.id, TTL_MS, 0).await.unwrap().unwrap();
    assert_eq!(touched.session.state, SessionState::Active);
    // A stream that has another active session keeps it.
    let late = degraded("s1");
    assert!(!store.adopt(&late).await.unwrap());
    assert_eq!(store.touch(late.id, TTL_MS, 0).await.unwrap(), None);
    // A session its player ended (through any sidecar) stays ended: a sidecar that admitted it
    // without the store, under an id the store admitted after all, cannot bring it back.
    assert!(store.end(&a, "tv").await.unwrap().is_some());
    assert!(
        !store.adopt(&tv).await.unwrap(),
        "an ended session came back"
    );
    let listed: Vec<SessionId> = store.list(&a).await.unwrap().iter().map(|s| s.id).collect();
    assert!(!listed.contains(&tv.id), "{listed:?}");
    // For one TTL: a later write-back of that id is an admission like any other.
    clock.advance(TTL_MS + 1);
    assert!(store.adopt(&tv).await.unwrap());
}

/// Sharing detection's memory: the distinct networks a session was used from within a window,
/// across every caller (sidecar), at most `keep` of them; none for a session that is not active.
pub async fn networks_are_counted_per_session_within_the_window(
    store: Arc<dyn SessionStore>,
    clock: ManualClock,
) {
    let a = account("networks");
    let tv = admit(store.as_ref(), &a, "tv", 3).await;
    let phone = admit(store.as_ref(), &a, "phone", 3).await;
    let (home, office, cafe) = (
        [0, 0, 0, 0, 0, 203, 0, 113],
        [0, 0, 0, 0, 0, 198, 51, 100],
        [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1],
    );
    let window = 20_000;
    let note = async |id, network, keep| store.note_network(id, network, window, keep).await;
    assert_eq!(note(tv, home, 10).await.unwrap(), Some(1));
    assert_eq!(
        note(tv, home, 10).await.unwrap(),
        Some(1),
        "one network twice"
    );
    assert_eq!(note(tv, office, 10).await.unwrap(), Some(2));
    assert_eq!(
        note(phone, cafe, 10).await.unwrap(),
        Some(1),
        "sessions apart"
    );
    clock.advance(10_000);
    assert_eq!(note(tv, cafe, 10).await.unwrap(), Some(3));
    // Home and office were last seen more than a window ago; cafe within it.
    clock.advance(window - 9_000);
    assert_eq!(note(tv, home, 10).await.unwrap(), Some(2));
    // At most `keep` are counted: enough to know the limit is passed.
    assert_eq!(note(tv, office, 2).await.unwrap(), Some(2));
    // A session that is not active has no networks to count.
    assert!(matches!(
        store.kick(tv).await.unwrap(),
        KickOutcome::Kicked(_)
    ));
    assert_eq!(note(tv, home, 10).await.unwrap(), None);
    assert_eq!(
        note(SessionId::for_account(&a), home, 10).await.unwrap(),
        None
    );
    // A session admitted again starts afresh.
    let tv = admit(store.as_ref(), &a, "tv", 3).await;
    assert_eq!(note(tv, cafe, 10).await.unwrap(), Some(1));
}

/// One session, one stream: claims on a session's long-lived responses, across every caller,
/// held while renewed within their lease, dropped on release or when the lease lapses, and gone
/// with the session.
pub async fn stream_claims_hold_one_stream_per_session(
    store: Arc<dyn SessionStore>,
    clock: ManualClock,
) {
    use streamgate_sidecar::store::media::StreamClaim;
    let a = account("streams");
    let tv = admit(store.as_ref(), &a, "tv", 3).await;
    let phone = admit(store.as_ref(), &a, "phone", 3).await;
    let lease = 15_000;
    let claim = async |id, holder: u8, max| store.claim_stream(id, [holder; 8], max, lease).await;
    assert_eq!(
        claim(tv, 1, 1).await.unwrap(),
        StreamClaim::Held { streams: 1 }
    );
    assert_eq!(
        claim(tv, 2, 1).await.unwrap(),
        StreamClaim::Full { streams: 1 },
        "a second stream of one session, from another sidecar"
    );
    assert_eq!(
        claim(phone, 2, 1).await.unwrap(),
        StreamClaim::Held { streams: 1 },
        "another session has its own stream"
    );
    // Renewed by its holder within the lease: it holds past the first lease.
    clock.advance(10_000);
    assert_eq!(
        claim(tv, 1, 1).await.unwrap(),
        StreamClaim::Held { streams: 1 }
    );
    clock.advance(10_000);
    assert_eq!(
        claim(tv, 2, 1).await.unwrap(),
        StreamClaim::Full { streams: 1 }
    );
    // Released: the next stream may play.
    store.release_stream(tv, [1; 8]).await.unwrap();
    assert_eq!(
        claim(tv, 2, 1).await.unwrap(),
        StreamClaim::Held { streams: 1 }
    );
    // A policy allowing two.
    assert_eq!(
        claim(tv, 3, 2).await.unwrap(),
        StreamClaim::Held { streams: 2 }
    );
    assert_eq!(
        claim(tv, 4, 2).await.unwrap(),
        StreamClaim::Full { streams: 2 }
    );
    // Holders that died: their leases lapse and free the session.
    clock.advance(lease + 1);
    assert_eq!(
        claim(tv, 4, 1).await.unwrap(),
        StreamClaim::Held { streams: 1 }
    );
    // Releasing what is not held changes nothing.
    store.release_stream(tv, [9; 8]).await.unwrap();
    store
        .release_stream(SessionId::for_account(&a), [4; 8])
        .await
        .unwrap();
    assert_eq!(
        claim(tv, 5, 1).await.unwrap(),
        StreamClaim::Full { streams: 1 }
    );
    // Gone with the session.
    assert!(store.end(&a, "tv").await.unwrap().is_some());
    assert_eq!(claim(tv, 4, 1).await.unwrap(), StreamClaim::Gone);
    assert_eq!(
        claim(SessionId::for_account(&a), 1, 1).await.unwrap(),
        StreamClaim::Gone
    );
}

/// Instantiates every contract case for one store.
/// Listing every account's sessions (the operator's live-session API): paged in id order, each
/// active session exactly once, cut ones left out. The store may hold other cases' sessions.
pub async fn list_all_pages_through_active_sessions(
    store: Arc<dyn SessionStore>,
    _clock: ManualClock,
) {
    let a = account("listing-a");
    let b = account("listing-b");
    let mine = [
        admit(store.as_ref(), &a, "tv", 3).await,
        admit(store.as_ref(), &a, "phone", 3).await,
        admit(store.as_ref(), &b, "tv", 3).await,
    ];
    let kicked = admit(store.as_ref(), &b, "laptop", 3).await;
    assert!(matches!(
        store.kick(kicked).await.unwrap(),
        KickOutcome::Kicked(_)
    ));
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.list_all(after, 2).await.unwrap();
        assert!(page.sessions.len() <= 2, "a page over the limit");
        assert!(
            page.sessions
                .iter()
                .all(|s| s.state == SessionState::Active)
        );
        seen.extend(page.sessions.iter().map(|s| s.id));
        match page.next_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "not in id order, or repeated"
    );
    for id in mine {
        assert_eq!(
            seen.iter().filter(|s| **s == id).count(),
            1,
            "{id} listed once"
        );
    }
    assert!(!seen.contains(&kicked), "a kicked session is listed");
}

macro_rules! store_contract {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;

            fn store() -> (Arc<dyn SessionStore>, ManualClock) {
                let clock = ManualClock::new(chrono::Utc::now().timestamp_millis());
                let make: fn(ManualClock) -> Arc<dyn SessionStore> = $make;
                (make(clock.clone()), clock)
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn list_all_pages_through_active_sessions() {
                let (store, clock) = store();
                super::list_all_pages_through_active_sessions(store, clock).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn open_renew_list_end() {
                let (store, clock) = store();
                super::open_renew_list_end(store, clock).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn reject_new_refuses_at_the_limit() {
                let (store, clock) = store();
                super::reject_new_refuses_at_the_limit(store, clock).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn evict_oldest_revokes_the_oldest() {
                let (store, clock) = store();
                super::evict_oldest_revokes_the_oldest(store, clock).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dry_run_admits_over_the_limit() {
                let (store, clock) = store();
                super::dry_run_admits_over_the_limit(store, clock).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kick_revokes_and_stays_answerable() {
                let (store, clock) = store();
                super::kick_revokes_and_stays_answerable(store, clock).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn revoke_keeps_its_reason() {
                let (store, clock) = store();
                super::revoke_keeps_its_reason(store, clock).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sessions_expire_after_their_ttl() {
                let (store, clock) = store();
                super::sessions_expire_after_their_ttl(store, clock).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_long_forgotten_session_does_not_block_the_account() {
                let (store, clock) = store();
                super::a_long_forgotten_session_does_not_block_the_account(store, clock).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn heartbeats_keep_a_session_alive() {
                let (store, clock) = store();
                super::heartbeats_keep_a_session_alive(store, clock).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn hostile_ids_are_distinct() {
                let (store, clock) = store();
                super::hostile_ids_are_distinct(store, clock).await;
            }
            #[tokio::test]
            async fn touch_renews_only_an_active_session_renewed_long_enough_ago() {
                let (store, clock) = store();
                super::touch_renews_only_an_active_session_renewed_long_enough_ago(store, clock)
                    .await;
            }

            #[tokio::test]
            async fn adopt_writes_back_a_session_unless_its_stream_moved_on_or_it_ended() {
                let (store, clock) = store();
                super::adopt_writes_back_a_session_unless_its_stream_moved_on_or_it_ended(
                    store, clock,
                )
                .await;
            }

            #[tokio::test]
            async fn networks_are_counted_per_session_within_the_window() {
                let (store, clock) = store();
                super::networks_are_counted_per_session_within_the_window(store, clock).await;
            }

            #[tokio::test]
            async fn stream_claims_hold_one_stream_per_session() {
                let (store, clock) = store();
                super::stream_claims_hold_one_stream_per_session(store, clock).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_opens_never_exceed_the_limit() {
                let (store, clock) = store();
                super::concurrent_opens_never_exceed_the_limit(store, clock).await;
            }
        }
    };
}

/// The URL of a Redis the test script started; missing means the run is misconfigured.
fn redis_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with ./scripts/test, which starts Redis (or eval \"$(scripts/redis-up)\")")
    })
}

fn redis_store(name: &str, clock: ManualClock) -> Arc<dyn SessionStore> {
    let target = RedisTarget::parse(&redis_env(name)).expect("a valid Redis URL");
    // Generous timeout: the test machine is shared with compilers.
    Arc::new(RedisStore::with_clock(
        target,
        Duration::from_secs(2),
        Arc::new(clock),
    ))
}

store_contract!(memory, |clock| Arc::new(MemoryStore::with_clock(Arc::new(
    clock
))));
store_contract!(redis_standalone, |clock| redis_store(
    "STREAMGATE_TEST_REDIS",
    clock
));
store_contract!(redis_cluster, |clock| redis_store(
    "STREAMGATE_TEST_REDIS_CLUSTER",
    clock
));
