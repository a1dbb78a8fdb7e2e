//! Many sidecar processes sharing one Redis: the limit holds across processes, state survives a
//! sidecar restart, a Redis outage is handled by the failure policy, and account ids cannot steer
//! Redis Cluster slots.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use common::{
    OwnRedis, SidecarProcess, default_policy, eventually, json, max_concurrent, redis_env,
    streaming_at, unique,
};
use futures::future::join_all;
use reqwest::{Client, Method};
use streamgate_sidecar::policy::{Mode, OnLimitExceeded};
use streamgate_sidecar::session::account_tag;
use streamgate_sidecar::store::{OpenOutcome, OpenRequest, RedisStore, RedisTarget, SessionStore};

fn write_policy(dir: &Path, spec: &str) -> PathBuf {
    let path = dir.join(format!("{}.yaml", unique("policy")));
    std::fs::write(&path, default_policy(spec)).unwrap();
    path
}

async fn sidecars(n: usize, store: &str, policy: &Path) -> Vec<SidecarProcess> {
    let policy = policy.display().to_string();
    let mut started = Vec::new();
    for _ in 0..n {
        let p = SidecarProcess::start(&[
            "--store",
            store,
            "--store-timeout",
            "2s",
            "--policy-file",
            &policy,
        ])
        .await;
        p.wait_ready().await;
        started.push(p);
    }
    started
}

fn millis(rfc3339: &str) -> i64 {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

/// Opens `n` streams of one account concurrently, spread over `sidecars`. With `with_ends`, every
/// seventh viewer ends its stream right after opening it. Returns how many were admitted and every
/// admitted session's lifetime.
async fn history_of_concurrent_opens(
    sidecars: &[SidecarProcess],
    account: &str,
    n: usize,
    with_ends: bool,
) -> (usize, Vec<(i64, i64)>) {
    let client = Client::new();
    let opens = (0..n).map(|i| {
        let client = client.clone();
        let base = sidecars[i % sidecars.len()].base.clone();
        let account = account.to_string();
        tokio::spawn(async move {
            let stream = format!("viewer-{i}");
            let (status, body) = streaming_at(&client, &base, Method::PUT, &account, &stream).await;
            // Record when the end was asked for, a lower bound of when the store ended it, so
            // the check cannot fail on our own latency.
            let ended_at = if with_ends && status == 201 && i % 7 == 0 {
                let asked = chrono::Utc::now().timestamp_millis();
                let (end, _) =
                    streaming_at(&client, &base, Method::DELETE, &account, &stream).await;
                (end == 204).then_some(asked)
            } else {
                None
            };
            (status, body, ended_at)
        })
    });
    let results: Vec<_> = join_all(opens)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let admitted = results.iter().filter(|(s, _, _)| *s == 201).count();
    let refused = results.iter().filter(|(s, _, _)| *s == 429).count();
    assert_eq!(admitted + refused, n, "only 201 and 429 expected");

    // Every admitted session's fate, from the store's own clock.
    let mut lifetimes = Vec::new();
    for (status, body, ended_at) in &results {
        if *status != 201 {
            continue;
        }
        let start = millis(body["createdAt"].as_str().unwrap());
        let id = body["sessionId"].as_str().unwrap();
        let end = match ended_at {
            Some(at) => *at,
            None => {
                let (status, now) = json(
                    client
                        .get(format!("{}/v1/sessions/{id}", sidecars[0].admin))
                        .send()
                        .await
                        .unwrap(),
                )
                .await;
                assert_eq!(status, 200, "{now}");
                match now["state"].as_str().unwrap() {
                    "active" => i64::MAX,
                    _ => millis(now["expiresAt"].as_str().unwrap()),
                }
            }
        };
        lifetimes.push((start, end));
    }
    (admitted, lifetimes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_sidecars_never_admit_more_than_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "  maxStreamsPerAccount: 3");
    let fleet = sidecars(4, &redis_env("STREAMGATE_TEST_REDIS"), &policy).await;
    let account = unique("race");
    let (admitted, lifetimes) = history_of_concurrent_opens(&fleet, &account, 300, false).await;
    assert_eq!(admitted, 3);
    assert!(
        max_concurrent(&lifetimes) <= 3,
        "more than 3 alive at once: {lifetimes:?}"
    );
    let (_, list) = json(
        Client::new()
            .get(format!("{}/v1/accounts/{account}/sessions", fleet[3].admin))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(list["sessions"].as_array().unwrap().len() <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_sidecars_evicting_keep_exactly_the_limit_alive() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        "  maxStreamsPerAccount: 3\n  onLimitExceeded: EvictOldest",
    );
    let fleet = sidecars(4, &redis_env("STREAMGATE_TEST_REDIS"), &policy).await;
    let account = unique("evict-race");
    let (admitted, lifetimes) = history_of_concurrent_opens(&fleet, &account, 300, true).await;
    assert_eq!(admitted, 300, "EvictOldest admits every new stream");
    assert!(
        max_concurrent(&lifetimes) <= 3,
        "more than 3 alive at once: {lifetimes:?}"
    );
    let still_active = lifetimes.iter().filter(|(_, end)| *end == i64::MAX).count();
    assert!(still_active <= 3);
}

#[tokio::test]
async fn sessions_outlive_a_sidecar_restart() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "  maxStreamsPerAccount: 2");
    let store = redis_env("STREAMGATE_TEST_REDIS");
    let mut fleet = sidecars(2, &store, &policy).await;
    let account = unique("restart");
    let client = Client::new();
    let (status, first) = streaming_at(&client, &fleet[0].base, Method::PUT, &account, "tv").await;
    assert_eq!(status, 201);
    assert_eq!(
        streaming_at(&client, &fleet[0].base, Method::PUT, &account, "phone")
            .await
            .0,
        201
    );

    // The first sidecar dies without warning; the other one carries on with its sessions.
    fleet.remove(0);
    let (status, renewed) =
        streaming_at(&client, &fleet[0].base, Method::GET, &account, "tv").await;
    assert_eq!(status, 200, "{renewed}");
    assert_eq!(renewed["sessionId"], first["sessionId"]);
    assert_eq!(renewed["activeSessions"], 2);
    assert_eq!(
        streaming_at(&client, &fleet[0].base, Method::PUT, &account, "tablet")
            .await
            .0,
        429,
        "the dead sidecar's sessions still count"
    );

    // A replacement sidecar sees the same state.
    let replacement = sidecars(1, &store, &policy).await;
    let (status, again) =
        streaming_at(&client, &replacement[0].base, Method::GET, &account, "tv").await;
    assert_eq!(status, 200);
    assert_eq!(again["sessionId"], first["sessionId"]);
}

#[tokio::test]
async fn a_kick_on_one_sidecar_is_seen_by_another() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), "  maxStreamsPerAccount: 2");
    let fleet = sidecars(2, &redis_env("STREAMGATE_TEST_REDIS"), &policy).await;
    let account = unique("kick");
    let client = Client::new();
    let (_, session) = streaming_at(&client, &fleet[0].base, Method::PUT, &account, "tv").await;
    let id = session["sessionId"].as_str().unwrap();
    let kicked = client
        .delete(format!("{}/v1/sessions/{id}", fleet[1].admin))
        .send()
        .await
        .unwrap();
    assert_eq!(kicked.status(), 204);
    let (status, gone) = streaming_at(&client, &fleet[0].base, Method::GET, &account, "tv").await;
    assert_eq!(status, 410);
    assert_eq!(gone["reason"], "kicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_outage_follows_the_failure_policy_and_recovers_without_restarts() {
    let mut redis = OwnRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let open_policy = write_policy(
        dir.path(),
        "  maxStreamsPerAccount: 2\n  failurePolicy: Open",
    );
    let closed_policy = write_policy(
        dir.path(),
        "  maxStreamsPerAccount: 2\n  failurePolicy: Closed",
    );
    let url = redis.url();
    let args = |policy: &Path| {
        vec![
            "--store".to_string(),
            url.clone(),
            "--store-timeout".to_string(),
            "300ms".to_string(),
            "--policy-file".to_string(),
            policy.display().to_string(),
        ]
    };
    let open_args = args(&open_policy);
    let closed_args = args(&closed_policy);
    let fail_open =
        SidecarProcess::start(&open_args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let fail_closed =
        SidecarProcess::start(&closed_args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    fail_open.wait_ready().await;
    fail_closed.wait_ready().await;
    let client = Client::new();
    let (status, before_open) =
        streaming_at(&client, &fail_open.base, Method::PUT, "acct-o", "tv").await;
    assert_eq!(status, 201);
    let (status, before_closed) =
        streaming_at(&client, &fail_closed.base, Method::PUT, "acct-c", "tv").await;
    assert_eq!(status, 201);

    // Load keeps flowing through the outage; every answer must be a proper HTTP response.
    let load = {
        let (client, a, b) = (
            client.clone(),
            fail_open.base.clone(),
            fail_closed.base.clone(),
        );
        tokio::spawn(async move {
            let mut statuses: HashMap<u16, usize> = HashMap::new();
            for i in 0..150 {
                let base = if i % 2 == 0 { &a } else { &b };
                let (status, _) =
                    streaming_at(&client, base, Method::PUT, "load", &format!("s{i}")).await;
                *statuses.entry(status).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        })
    };

    redis.stop();
    eventually("both sidecars report unready", async || {
        let a = client
            .get(format!("{}/readyz", fail_open.base))
            .send()
            .await
            .unwrap();
        let b = client
            .get(format!("{}/readyz", fail_closed.base))
            .send()
            .await
            .unwrap();
        a.status() == 503 && b.status() == 503
    })
    .await;

    // Open admits without the store, and says so.
    let response = client
        .put(format!(
            "{}/streaming?account=acct-o&streamId=phone",
            fail_open.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(
        response.headers()["x-streamgate-degraded"],
        "store-unavailable"
    );
    // Closed refuses new streams with 503 store_unavailable.
    let (status, body) =
        streaming_at(&client, &fail_closed.base, Method::PUT, "acct-c", "phone").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "store_unavailable");
    // Nobody is cut by the outage: heartbeats answer 503 (retry), never 410.
    for base in [&fail_open.base, &fail_closed.base] {
        let account = if base == &fail_open.base {
            "acct-o"
        } else {
            "acct-c"
        };
        let (status, body) = streaming_at(&client, base, Method::GET, account, "tv").await;
        assert_eq!(status, 503, "{body}");
    }

    redis.restart();
    for (sidecar, account, before) in [
        (&fail_open, "acct-o", &before_open),
        (&fail_closed, "acct-c", &before_closed),
    ] {
        sidecar.wait_ready().await;
        eventually("heartbeats succeed again", async || {
            let (status, body) =
                streaming_at(&client, &sidecar.base, Method::GET, account, "tv").await;
            status == 200 && body["sessionId"] == before["sessionId"]
        })
        .await;
    }
    // A call slow right after the restart (scripts re-sent) may answer 503 with Retry-After,
    // which a player retries; nothing else.
    eventually("new streams are admitted again", async || {
        let (status, body) =
            streaming_at(&client, &fail_closed.base, Method::PUT, "acct-c", "phone").await;
        assert!(status == 201 || status == 503, "{status} {body}");
        status == 201
    })
    .await;

    let statuses = load.await.unwrap();
    assert!(
        statuses.keys().all(|s| [201, 429, 503].contains(s)),
        "{statuses:?}"
    );
    // Both sidecars are still the same processes: nothing crashed.
    let mut fail_open = fail_open;
    let mut fail_closed = fail_closed;
    assert!(fail_open.child.try_wait().unwrap().is_none());
    assert!(fail_closed.child.try_wait().unwrap().is_none());
}

#[tokio::test]
async fn hostile_account_ids_land_in_the_slot_the_store_chooses() {
    let target = RedisTarget::parse(&redis_env("STREAMGATE_TEST_REDIS_CLUSTER")).unwrap();
    let store = Arc::new(RedisStore::new(target.clone(), Duration::from_secs(2)));
    let RedisTarget::Cluster(nodes) = target else {
        unreachable!()
    };
    let suffix = unique("");
    let accounts = [
        format!("{{steer}}{suffix}"),
        format!("steer{suffix}"),
        format!("{{steer{suffix}}}"),
        format!("a:{{b}}:{suffix}"),
        format!("a{suffix}:"),
        format!("{suffix}{}", "}{".repeat(50)),
    ];
    for account in &accounts {
        let outcome = store
            .open(&OpenRequest {
                account,
                stream_id: "s1",
                limit: 1,
                ttl_ms: 60_000,
                on_limit: OnLimitExceeded::RejectNew,
                mode: Mode::Enforce,
            })
            .await
            .unwrap();
        assert!(matches!(outcome, OpenOutcome::Admitted { .. }), "{account}");
    }

    let client = redis::cluster::ClusterClient::new(nodes).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    for account in &accounts {
        let tag = format!("{:08x}", account_tag(account));
        let expected_slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&tag)
            .query_async(&mut conn)
            .await
            .unwrap();
        // The account's hash is named by its tag alone (see lua/common.lua).
        let account_key = streamgate_sidecar::store::redis_store::account_key(account_tag(account));
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&account_key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(slot, expected_slot, "{account}");
        // The account's hash exists and holds only its own session.
        let fields: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(&account_key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let (owner, sessions) =
            streamgate_sidecar::store::redis_store::decode_account_hash(&fields).unwrap();
        assert_eq!(&owner, account);
        let streams: Vec<&str> = sessions.iter().map(|s| s.stream_id.as_str()).collect();
        assert_eq!(streams, ["s1"], "{account}");
    }
    // Each account was admitted on its own: six accounts, six sessions, no collisions.
    for account in &accounts {
        assert_eq!(store.list(account).await.unwrap().len(), 1, "{account}");
    }
}

#[test]
fn the_history_checker_counts_overlaps() {
    assert_eq!(max_concurrent(&[(0, 10), (5, 15), (10, 20)]), 2);
    assert_eq!(max_concurrent(&[(0, 10), (0, 10), (9, i64::MAX)]), 3);
    // A session cut in the same millisecond another is admitted does not overlap it.
    assert_eq!(max_concurrent(&[(0, 10), (10, 20)]), 1);
}

#[tokio::test]
async fn functions_are_loaded_again_after_redis_forgets_them() {
    let url = redis_env("STREAMGATE_TEST_REDIS");
    let store = RedisStore::new(RedisTarget::parse(&url).unwrap(), Duration::from_secs(2));
    let account = unique("noscript");
    let request = |stream: &'static str| OpenRequest {
        account: &account,
        stream_id: stream,
        limit: 2,
        ttl_ms: 60_000,
        on_limit: OnLimitExceeded::RejectNew,
        mode: Mode::Enforce,
    };
    assert!(matches!(
        store.open(&request("s1")).await.unwrap(),
        OpenOutcome::Admitted { .. }
    ));
    // What a Redis restart without persistence does to the loaded functions.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(matches!(
        store.open(&request("s2")).await.unwrap(),
        OpenOutcome::Admitted { active: 2, .. }
    ));
    assert_eq!(store.list(&account).await.unwrap().len(), 2);
}

/// Two accounts whose ids hash to the same 32-bit tag (found by search; about one pair per
/// 77000 accounts): the second one's sessions live beside the first's hash, in the same slot.
fn accounts_sharing_a_tag() -> (String, String) {
    let prefix = unique("tag");
    let mut seen: HashMap<u32, String> = HashMap::new();
    for i in 0.. {
        let account = format!("{prefix}-{i}");
        if let Some(other) = seen.insert(account_tag(&account), account.clone()) {
            return (other, account);
        }
    }
    unreachable!()
}

async fn accounts_sharing_a_tag_stay_apart(store_env: &str) {
    use streamgate_sidecar::session::{EndReason, SessionState};
    use streamgate_sidecar::store::{HeartbeatOutcome, KickOutcome};
    let (first, second) = accounts_sharing_a_tag();
    assert_eq!(account_tag(&first), account_tag(&second));
    let store = RedisStore::new(
        RedisTarget::parse(&redis_env(store_env)).unwrap(),
        Duration::from_secs(2),
    );
    let open = async |account: &str, stream: &str| {
        store
            .open(&OpenRequest {
                account,
                stream_id: stream,
                limit: 1,
                ttl_ms: 60_000,
                on_limit: OnLimitExceeded::RejectNew,
                mode: Mode::Enforce,
            })
            .await
            .unwrap()
    };
    let OpenOutcome::Admitted { session: a, .. } = open(&first, "s").await else {
        panic!("the first account is admitted")
    };
    // Each account has its own limit of 1.
    let OpenOutcome::Admitted { session: b, .. } = open(&second, "s").await else {
        panic!("the second account is admitted: it does not share the first's count")
    };
    assert!(matches!(
        open(&second, "t").await,
        OpenOutcome::Refused { .. }
    ));
    assert_eq!(store.list(&first).await.unwrap(), vec![a.clone()]);
    assert_eq!(store.list(&second).await.unwrap(), vec![b.clone()]);
    // Look-ups by id find either, with its own account.
    assert_eq!(store.get(a.id).await.unwrap().unwrap().account, first);
    assert_eq!(store.get(b.id).await.unwrap().unwrap().account, second);
    assert!(store.touch(b.id, 60_000, 0).await.unwrap().unwrap().renewed);
    // The first account leaving does not lose the second's sessions.
    assert_eq!(store.end(&first, "s").await.unwrap().unwrap().id, a.id);
    assert_eq!(store.get(a.id).await.unwrap(), None);
    // Its end is remembered in its own hash: a write-back of it is refused, the second's
    // sessions are untouched and still listed.
    assert!(!store.adopt(&a).await.unwrap());
    let second_ids: Vec<_> = store
        .list(&second)
        .await
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(second_ids, vec![b.id]);
    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let page = store.list_all(after, 100).await.unwrap();
        listed.extend(page.sessions.iter().map(|s| s.id));
        match page.next_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert!(listed.contains(&b.id) && !listed.contains(&a.id));
    let KickOutcome::Kicked(kicked) = store.kick(b.id).await.unwrap() else {
        panic!("the second account's session is found by id and kicked")
    };
    assert_eq!(
        (kicked.state, kicked.reason),
        (SessionState::Revoked, Some(EndReason::Kicked))
    );
    assert!(matches!(
        store.heartbeat(&second, "s", 60_000).await.unwrap(),
        HeartbeatOutcome::Gone(_)
    ));
    assert!(matches!(
        open(&second, "s").await,
        OpenOutcome::Admitted { .. }
    ));
    assert!(matches!(
        open(&first, "s").await,
        OpenOutcome::Admitted { .. }
    ));
    assert!(matches!(
        open(&first, "u").await,
        OpenOutcome::Refused { .. }
    ));
}

#[tokio::test]
async fn accounts_sharing_a_tag_stay_apart_on_standalone() {
    accounts_sharing_a_tag_stay_apart("STREAMGATE_TEST_REDIS").await;
}

#[tokio::test]
async fn accounts_sharing_a_tag_stay_apart_on_cluster() {
    accounts_sharing_a_tag_stay_apart("STREAMGATE_TEST_REDIS_CLUSTER").await;
}

#[tokio::test]
async fn an_ended_session_leaves_only_a_marker_for_one_ttl() {
    use streamgate_sidecar::store::redis_store::account_key;
    let url = redis_env("STREAMGATE_TEST_REDIS");
    let store = RedisStore::new(RedisTarget::parse(&url).unwrap(), Duration::from_secs(2));
    let account = unique("ended");
    let OpenOutcome::Admitted { session, .. } = store
        .open(&OpenRequest {
            account: &account,
            stream_id: "tv",
            limit: 1,
            ttl_ms: 60_000,
            on_limit: OnLimitExceeded::RejectNew,
            mode: Mode::Enforce,
        })
        .await
        .unwrap()
    else {
        panic!("admitted")
    };
    // It played media: its networks and stream claim are recorded beside it...
    assert_eq!(
        store
            .note_network(session.id, [0, 0, 0, 0, 0, 192, 0, 2], 60_000, 3)
            .await
            .unwrap(),
        Some(1)
    );
    assert!(matches!(
        store
            .claim_stream(session.id, [7; 8], 1, 15_000)
            .await
            .unwrap(),
        streamgate_sidecar::store::media::StreamClaim::Held { streams: 1 }
    ));
    assert!(store.end(&account, "tv").await.unwrap().is_some());
    // ...and go with the session. What stays of the account: its id and the session's field, overwritten by a marker
    // ('n' and until when the end is remembered, in ms); the hash expires then.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = account_key(account_tag(&account));
    let fields: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let id = session.id.random.to_be_bytes();
    let names: Vec<&[u8]> = fields.iter().map(|(f, _)| f.as_slice()).collect();
    assert_eq!(names.len(), 2, "{fields:?}");
    assert!(names.contains(&&b"@"[..]) && names.contains(&&id[..]));
    let marker = &fields.iter().find(|(f, _)| f[..] == id[..]).unwrap().1;
    assert_eq!((marker.len(), marker[0]), (7, b'n'), "{marker:?}");
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 60_000, "{pttl}");
    // The marker refuses a write-back of the ended session.
    assert!(!store.adopt(&session).await.unwrap());
    assert!(store.list(&account).await.unwrap().is_empty());
}

/// During a rolling upgrade, sidecars of the previous release share the store with this one:
/// the media use this release records beside a session (a 17-byte field) must not break their
/// scripts, which know nothing of it. They take it for an ended session's marker and leave the
/// session alone.
#[tokio::test]
async fn the_previous_release_reads_an_account_hash_with_media_use() {
    use streamgate_sidecar::store::media::StreamClaim;
    use streamgate_sidecar::store::redis_store::account_key;
    let url = redis_env("STREAMGATE_TEST_REDIS");
    let store = RedisStore::new(RedisTarget::parse(&url).unwrap(), Duration::from_secs(2));
    let account = unique("previous");
    let open = OpenRequest {
        account: &account,
        stream_id: "tv",
        limit: 2,
        ttl_ms: 60_000,
        on_limit: OnLimitExceeded::RejectNew,
        mode: Mode::Enforce,
    };
    let OpenOutcome::Admitted { session, .. } = store.open(&open).await.unwrap() else {
        panic!("admitted")
    };
    assert_eq!(
        store
            .note_network(session.id, [0, 0, 0, 0, 0, 192, 0, 2], 600_000, 3)
            .await
            .unwrap(),
        Some(1)
    );
    assert!(matches!(
        store
            .claim_stream(session.id, [1; 8], 1, 15_000)
            .await
            .unwrap(),
        StreamClaim::Held { .. }
    ));

    // The previous release's scripts, on the same hash.
    let fixture = |name: &str| {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("tests/fixtures/previous-store/{name}.lua")),
        )
        .unwrap()
    };
    // Its functions set KEYS and ARGV for the shared part; EVAL has them as globals.
    let script = |body: &str| {
        redis::Script::new(&format!(
            "local K0, A0 = KEYS, ARGV\n{}\nKEYS, ARGV = K0, A0\n{}",
            fixture("common"),
            fixture(body)
        ))
    };
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = account_key(account_tag(&account));
    let id = session.id.random.to_be_bytes();
    let touched: redis::Value = script("touch")
        .key(&key)
        .arg(&id[..])
        .arg(60_000)
        .arg(0)
        .arg("previous")
        .arg("unused-channel")
        .invoke_async(&mut conn)
        .await
        .expect("the previous release's media look-up runs");
    assert!(
        format!("{touched:?}").contains("active"),
        "it finds the session active: {touched:?}"
    );
    let opened: redis::Value = script("open")
        .key(&key)
        .arg(&account)
        .arg("phone")
        .arg(&7u128.to_be_bytes()[..])
        .arg(2)
        .arg(60_000)
        .arg("reject")
        .arg("enforce")
        .arg(0)
        .arg("previous")
        .arg("unused-channel")
        .invoke_async(&mut conn)
        .await
        .expect("the previous release's admission runs");
    assert!(
        format!("{opened:?}").contains("admitted"),
        "it counts one session, not two: {opened:?}"
    );
    // This release still finds what it recorded: the session is active with its stream claim.
    assert_eq!(store.list(&account).await.unwrap().len(), 2);
    assert!(matches!(
        store
            .claim_stream(session.id, [2; 8], 1, 15_000)
            .await
            .unwrap(),
        StreamClaim::Full { streams: 1 }
    ));
    assert_eq!(
        store
            .note_network(session.id, [0, 0, 0, 0, 0, 198, 51, 100], 600_000, 3)
            .await
            .unwrap(),
        Some(2)
    );
}

/// What an account's hash holds and when it expires, with the session's 16-byte field name
/// (random, so different on every run) written as `<session>`.
async fn hash_snapshot(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> (Vec<(Vec<u8>, Vec<u8>)>, i64) {
    let fields: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap();
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> = fields
        .into_iter()
        .map(|(f, v)| match f.len() {
            16 => (b"<session>".to_vec(), v),
            17 => (b"<session>~".to_vec(), v),
            _ => (f, v),
        })
        .collect();
    fields.sort();
    let expires_at: i64 = redis::cmd("PEXPIRETIME")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap();
    (fields, expires_at)
}

/// Most accounts hold one session, and the functions answer that shape without loading the hash
/// into tables. Each such call must answer, write and set the hash's expiry exactly as the
/// general path does: every call is made twice at the same (test) time, once on an account with
/// one session (the short path) and once on the same account also holding an ended session's
/// stale marker, which sends the call down the general path and is deleted there.
#[tokio::test]
async fn the_one_session_short_path_answers_and_writes_as_the_general_path() {
    use streamgate_sidecar::store::clock::{Clock, ManualClock};
    use streamgate_sidecar::store::redis_store::account_key;
    let url = redis_env("STREAMGATE_TEST_REDIS");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let account = unique("short-path");
    let key = account_key(account_tag(&account));
    let open = |stream: &'static str| OpenRequest {
        account: &account,
        stream_id: stream,
        limit: 3,
        ttl_ms: 60_000,
        on_limit: OnLimitExceeded::RejectNew,
        mode: Mode::Enforce,
    };

    // Each call, with the answer's session id written as `<id>`.
    #[derive(Clone, Copy, Debug)]
    enum Call {
        OpenFirst,
        Open,
        OpenOtherStream,
        Heartbeat,
        End,
        TouchRenewing,
        TouchNotRenewing,
    }
    for call in [
        Call::OpenFirst,
        Call::Open,
        Call::OpenOtherStream,
        Call::Heartbeat,
        Call::End,
        Call::TouchRenewing,
        Call::TouchNotRenewing,
    ] {
        let mut results = Vec::new();
        for with_stale_marker in [false, true] {
            // Both runs at the same times.
            let clock = Arc::new(ManualClock::new(1_900_000_000_000));
            let store = RedisStore::with_clock(
                RedisTarget::parse(&url).unwrap(),
                Duration::from_secs(2),
                clock.clone(),
            );
            let _: () = redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let start = clock.now_ms();
            let session = if matches!(call, Call::OpenFirst) {
                None
            } else {
                let OpenOutcome::Admitted { session, .. } = store.open(&open("tv")).await.unwrap()
                else {
                    panic!("admitted")
                };
                Some(session)
            };
            let id = session.as_ref().map(|s| s.id);
            if with_stale_marker {
                // An ended session's marker ('n', remembered until 1 ms after the open).
                let mut marker = vec![b'n'];
                marker.extend_from_slice(&(start + 1).to_be_bytes()[2..]);
                let _: () = redis::cmd("HSET")
                    .arg(&key)
                    .arg(&[9u8; 16][..])
                    .arg(marker)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
            clock.advance(20_000);
            let answer = match call {
                Call::OpenFirst | Call::Open => {
                    format!("{:?}", store.open(&open("tv")).await.unwrap())
                }
                Call::OpenOtherStream => {
                    format!("{:?}", store.open(&open("radio")).await.unwrap())
                }
                Call::Heartbeat => {
                    format!(
                        "{:?}",
                        store.heartbeat(&account, "tv", 30_000).await.unwrap()
                    )
                }
                Call::End => format!("{:?}", store.end(&account, "tv").await.unwrap()),
                Call::TouchRenewing => {
                    format!("{:?}", store.touch(id.unwrap(), 30_000, 0).await.unwrap())
                }
                Call::TouchNotRenewing => format!(
                    "{:?}",
                    store.touch(id.unwrap(), 30_000, 50_000).await.unwrap()
                ),
            };
            let answer = match id {
                Some(id) => answer.replace(&format!("{id:?}"), "<id>"),
                None => answer,
            };
            let (fields, expires_at) = hash_snapshot(&mut conn, &key).await;
            // Sessions admitted by this call have ids of their own: compared by their values.
            results.push((answer, fields, expires_at));
        }
        let [short, general] = &results[..] else {
            unreachable!()
        };
        if matches!(call, Call::OpenFirst | Call::OpenOtherStream) {
            // Admits a session under a new id of its own: the answers differ in that id only.
            assert_eq!(short.1, general.1, "{call:?}: the hash");
            assert_eq!(short.2, general.2, "{call:?}: the hash's expiry");
            continue;
        }
        assert_eq!(short, general, "{call:?}");
    }
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
}
