//! Store faults on a real redis-server of the test's own, frozen with SIGSTOP and thawed with
//! SIGCONT: slow is not down (failurePolicy applies only once the breaker judges the store down),
//! degraded admission is bounded per sidecar, and opens answered 503 during a pause take no slot
//! when Redis runs them after it resumes.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    OwnRedis, Served, default_policy, eventually, eventually_value, json, serve_in_background,
};
use reqwest::Client;
use streamgate_sidecar::policy::PolicySet;
use streamgate_sidecar::server::Sidecar;
use streamgate_sidecar::store::{RedisStore, RedisTarget};

const STORE_TIMEOUT: Duration = Duration::from_millis(100);

/// An in-process sidecar on `redis_url` with a 100 ms store timeout.
async fn sidecar(redis_url: &str, spec: &str) -> Served {
    let policies = PolicySet::from_yaml(&default_policy(spec), "test.yaml", "default").unwrap();
    let store = RedisStore::new(RedisTarget::parse(redis_url).unwrap(), STORE_TIMEOUT);
    let sidecar = Sidecar::with_store(Arc::new(store), policies);
    let served = serve_in_background(sidecar).await;
    eventually("the sidecar is ready", async || {
        ready(&served.base).await == 200
    })
    .await;
    served
}

async fn ready(base: &str) -> u16 {
    Client::new()
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// Opens a stream: status, body, whether it was a degraded admission, the Retry-After header.
async fn open(base: &str, account: &str, stream: &str) -> (u16, serde_json::Value, bool, String) {
    let response = Client::new()
        .put(format!(
            "{base}/streaming?account={account}&streamId={stream}"
        ))
        .send()
        .await
        .unwrap();
    let degraded = response.headers().contains_key("x-streamgate-degraded");
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let (status, body) = json(response).await;
    (status, body, degraded, retry_after)
}

/// The account's active sessions in the store (asked on the admin listener).
async fn active(admin: &str, account: &str) -> usize {
    let (status, body) = json(
        Client::new()
            .get(format!("{admin}/v1/accounts/{account}/sessions"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["sessions"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_pause_is_slow_not_down_503_with_retry_after_and_no_slot_taken() {
    let redis = OwnRedis::start();
    let Served { base, admin } = sidecar(
        &redis.url(),
        "  maxStreamsPerAccount: 3\n  failurePolicy: Open",
    )
    .await;
    // Redis knows the open script (the opens during the pause are sent by hash and run as such).
    let (status, body, _, _) = open(&base, "other", "tv").await;
    assert_eq!(status, 201, "{body}");

    redis.pause();
    let (status, body, degraded, retry_after) = open(&base, "acct", "tv").await;
    // Under failurePolicy Open, one slow call is not an outage: no admission without the store.
    assert_eq!((status, degraded), (503, false), "{body}");
    assert_eq!(body["error"], "store_unavailable");
    assert_eq!(retry_after, "1");
    // Readiness follows the breaker, which one slow call does not open.
    let (status, body) = readiness(&base).await;
    assert_eq!(status, 200, "{body}");
    redis.resume();

    // The open that timed out reaches Redis now, after its caller gave up: it takes no slot.
    eventually("Redis answers again", async || ready(&base).await == 200).await;
    assert_eq!(active(&admin, "acct").await, 0, "no phantom session");
    let (status, body, degraded, _) = open(&base, "acct", "tv").await;
    assert_eq!((status, degraded), (201, false), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_answered_503_during_a_pause_take_no_slot_when_redis_resumes() {
    let redis = OwnRedis::start();
    let Served { base, admin } = sidecar(
        &redis.url(),
        "  maxStreamsPerAccount: 3\n  failurePolicy: Closed",
    )
    .await;
    // Redis knows the open script (the opens during the pause are sent by hash and run as such).
    let (status, body, _, _) = open(&base, "other", "tv").await;
    assert_eq!(status, 201, "{body}");

    redis.pause();
    let opens = (0..30).map(|i| {
        let base = base.clone();
        tokio::spawn(async move { open(&base, "acct", &format!("s{i}")).await })
    });
    for answer in futures::future::join_all(opens).await {
        let (status, body, _, retry_after) = answer.unwrap();
        assert_eq!((status, retry_after.as_str()), (503, "1"), "{body}");
    }
    redis.resume();

    eventually("the sidecar is ready again", async || {
        ready(&base).await == 200
    })
    .await;
    // Every one of the 30 scripts ran after its deadline: none took a slot.
    let mut raw = redis.connection();
    let accounts: Vec<String> = stored_sessions(&mut raw)
        .into_iter()
        .map(|s| s.account)
        .collect();
    assert_eq!(accounts, vec!["other"], "no session of acct was stored");
    assert_eq!(active(&admin, "acct").await, 0);
    for i in 0..3 {
        let (status, body, _, _) = open(&base, "acct", &format!("after{i}")).await;
        assert_eq!(status, 201, "the account's slots are all free: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_opens_the_breaker_and_admits_at_most_the_limit_without_the_store() {
    let redis = OwnRedis::start();
    let Served { base, admin } = sidecar(
        &redis.url(),
        "  maxStreamsPerAccount: 2\n  failurePolicy: Open\n  heartbeatIntervalSeconds: 2\n  sessionTTLSeconds: 10",
    )
    .await;
    let (status, body, _, _) = open(&base, "other", "tv").await;
    assert_eq!(status, 201, "{body}");

    redis.pause();
    let paused = Instant::now();
    // Opens time out (503) until the breaker judges the store down; then one is admitted
    // without the store.
    let mut probe = 0;
    let first = loop {
        let (status, body, degraded, _) = open(&base, "acct", &format!("p{probe}")).await;
        if status == 201 {
            assert!(degraded, "{body}");
            break format!("p{probe}");
        }
        assert_eq!(status, 503, "{body}");
        probe += 1;
        assert!(
            paused.elapsed() < Duration::from_secs(15),
            "the breaker never opened"
        );
    };
    let breaker_opened_after = paused.elapsed();
    // Not on the first timeouts (100 ms each): only after the quiet period (2 s) without any
    // answer. That period counts from the store's last answer, which came just before the
    // pause, so the bound here leaves room for that (the exact rule is the breaker's unit tests').
    assert!(
        breaker_opened_after >= Duration::from_millis(1500),
        "a pause shorter than the quiet period is not an outage ({breaker_opened_after:?})"
    );
    assert_eq!(ready(&base).await, 503, "readiness follows the breaker");
    // The account's limit is 2: one more is admitted without the store, then 503.
    let (status, body, degraded, _) = open(&base, "acct", "second").await;
    assert_eq!((status, degraded), (201, true), "{body}");
    let (status, body, _, retry_after) = open(&base, "acct", "third").await;
    assert_eq!((status, retry_after.as_str()), (503, "1"), "{body}");
    assert_eq!(body["error"], "store_unavailable");
    // Reopening a degraded stream renews it; it takes no second slot.
    let (status, body, _, _) = open(&base, "acct", &first).await;
    assert_eq!(status, 200, "{body}");

    redis.resume();
    let resumed = Instant::now();
    // Within one heartbeat interval the store counts exactly the two degraded sessions: the
    // opens that timed out before the breaker opened took no slot.
    eventually("the degraded sessions are in the store", async || {
        ready(&base).await == 200 && active(&admin, "acct").await == 2
    })
    .await;
    let recovered = resumed.elapsed();
    assert!(
        recovered < Duration::from_secs(2),
        "written back within a heartbeat interval, took {recovered:?}"
    );
    let (status, body, _, _) = open(&base, "acct", "after").await;
    assert_eq!(status, 429, "the account is at its limit again: {body}");
    eprintln!(
        "breaker opened {breaker_opened_after:?} into the pause; store count right {recovered:?} after it"
    );
}

async fn readiness(base: &str) -> (u16, serde_json::Value) {
    json(
        Client::new()
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// An in-process sidecar that need not become ready.
async fn unready_sidecar(redis_url: &str, spec: &str) -> String {
    let policies = PolicySet::from_yaml(&default_policy(spec), "test.yaml", "default").unwrap();
    let store = RedisStore::new(RedisTarget::parse(redis_url).unwrap(), STORE_TIMEOUT);
    let sidecar = Sidecar::with_store(Arc::new(store), policies);
    serve_in_background(sidecar).await.base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_sessions_fails_readiness_saying_why() {
    let redis = OwnRedis::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let base = unready_sidecar(&redis.url(), "  maxStreamsPerAccount: 3").await;
    let (status, body) = eventually_value(async || {
        let (status, body) = readiness(&base).await;
        (status == 503 && body["message"].as_str()?.contains("maxmemory-policy"))
            .then_some((status, body))
    })
    .await;
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("allkeys-lru") && message.contains("noeviction"),
        "{status} {body}"
    );
    // volatile-* too: every StreamGate key has a TTL, so it may evict any of them.
    let mut raw = redis.connection();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("volatile-lru")
        .query(&mut raw)
        .unwrap();
    eventually("volatile-lru is refused", async || {
        let (_, body) = readiness(&base).await;
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("volatile-lru"))
    })
    .await;
    // Fixed without restarting the sidecar.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query(&mut raw)
        .unwrap();
    eventually("ready once Redis keeps every key", async || {
        ready(&base).await == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_never_admits_under_open_and_fails_readiness() {
    let redis = OwnRedis::start_with(&["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]);
    let Served { base, .. } = sidecar(
        &redis.url(),
        "  maxStreamsPerAccount: 3\n  failurePolicy: Open",
    )
    .await;
    let (status, body, _, _) = open(&base, "acct", "tv").await;
    assert_eq!(status, 201, "{body}");
    // Fill Redis until it refuses writes.
    let mut raw = redis.connection();
    let junk = "x".repeat(64 * 1024);
    let mut filled = false;
    for i in 0..1_000 {
        let set: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("junk:{i}"))
            .arg(&junk)
            .query(&mut raw);
        if let Err(e) = set {
            assert_eq!(e.code(), Some("OOM"), "{e}");
            filled = true;
            break;
        }
    }
    assert!(filled, "Redis never filled up");
    // A refused write frees its own buffer, leaving Redis just under its limit; lower the limit
    // under what it holds so it stays full (noeviction: nothing can be freed).
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1mb")
        .query(&mut raw)
        .unwrap();

    // Out of memory is not an outage: never admitted without the store.
    let (status, body, degraded, _) = open(&base, "acct", "phone").await;
    assert_eq!((status, degraded), (500, false), "{body}");
    assert_eq!(body["error"], "internal_error");
    let (status, body) = readiness(&base).await;
    assert_eq!(status, 503, "{body}");
    let mut raw = redis.connection();
    let sessions = stored_sessions(&mut raw);
    assert_eq!(sessions.len(), 1, "only the first session is stored");
}

/// Opens new streams of `account` on `base` until one is admitted without the store (the
/// breaker has judged Redis down); every answer before it must be a 503.
async fn until_degraded(base: &str, account: &str, prefix: &str) -> String {
    let started = Instant::now();
    for probe in 0.. {
        let stream = format!("{prefix}{probe}");
        let (status, body, degraded, _) = open(base, account, &stream).await;
        if status == 201 {
            assert!(degraded, "{body}");
            return stream;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the breaker never opened"
        );
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_an_outage_each_sidecar_admits_at_most_the_limit_and_the_store_counts_them_after() {
    let redis = OwnRedis::start();
    let spec = "  maxStreamsPerAccount: 1\n  failurePolicy: Open\n  heartbeatIntervalSeconds: 2\n  sessionTTLSeconds: 10";
    let Served {
        base: a,
        admin: a_admin,
    } = sidecar(&redis.url(), spec).await;
    let b = sidecar(&redis.url(), spec).await.base;
    let (status, body, _, _) = open(&a, "other", "tv").await;
    assert_eq!(status, 201, "{body}");

    redis.pause();
    let (on_a, on_b) = tokio::join!(
        until_degraded(&a, "acct", "a"),
        until_degraded(&b, "acct", "b")
    );
    // Each has admitted the limit (1) on its own: no more, on either.
    for base in [&a, &b] {
        let (status, body, _, _) = open(base, "acct", "more").await;
        assert_eq!(status, 503, "{body}");
    }
    redis.resume();

    // The over-admission is bounded by (sidecars - 1) x limit = 1, and both sessions are in the
    // store (their ids keep working); nothing else is.
    eventually("both degraded sessions are in the store", async || {
        ready(&a).await == 200 && active(&a_admin, "acct").await == 2
    })
    .await;
    let mut raw = redis.connection();
    let mut streams: Vec<String> = stored_sessions(&mut raw)
        .into_iter()
        .filter(|s| s.account == "acct")
        .map(|s| s.stream_id)
        .collect();
    streams.sort();
    assert_eq!(streams, vec![on_a, on_b]);
    // Over its limit now: refused until viewers leave.
    let (status, body, _, _) = open(&b, "acct", "after").await;
    assert_eq!(status, 429, "{body}");
}

/// Every session stored in `redis` (active ones and tombstones), read from the account hashes.
fn stored_sessions(raw: &mut redis::Connection) -> Vec<streamgate_sidecar::session::SessionRecord> {
    use streamgate_sidecar::store::redis_store::{ACCOUNT_KEY_PATTERN, decode_account_hash};
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(ACCOUNT_KEY_PATTERN)
        .query(raw)
        .unwrap();
    let mut sessions = Vec::new();
    for key in keys {
        let fields: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL").arg(&key).query(raw).unwrap();
        sessions.extend(decode_account_hash(&fields).unwrap().1);
    }
    sessions
}
