//! `streamgate_active_sessions` on Redis: the background count (store/redis_count.rs) matches the
//! true count during a load run, on a standalone server and on a three-master Cluster, and the
//! sidecar binary exports it by policy with its age.
//!
//! Needs the test Redis servers (`eval "$(scripts/redis-up)"`); fails without them.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{SidecarProcess, default_policy, metric, refusing_addr};
use streamgate_sidecar::engine::Policies;
use streamgate_sidecar::policy::PolicySet;
use streamgate_sidecar::server::Sidecar;
use streamgate_sidecar::store::redis_count::{AccountCounts, count_active, group_by_policy};
use streamgate_sidecar::store::{RedisStore, RedisTarget, SessionStore};
use tokio::sync::RwLock;

fn redis_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests with ./scripts/test, which starts Redis (or eval \"$(scripts/redis-up)\")"
        )
    })
}

/// Policies: a default (3 streams), `vip` for some accounts (5 streams) and `short` for others
/// (TTL 2 s, so their sessions expire during the run unless renewed).
fn policies(vip: &[String], short: &[String]) -> String {
    let list = |accounts: &[String]| {
        accounts
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata: {{name: default}}
spec: {{maxStreamsPerAccount: 3}}
---
apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata: {{name: vip}}
spec: {{maxStreamsPerAccount: 5, accounts: [{}]}}
---
apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata: {{name: short}}
spec: {{maxStreamsPerAccount: 3, sessionTTLSeconds: 2, heartbeatIntervalSeconds: 1, accounts: [{}]}}
",
        list(vip),
        list(short)
    )
}

/// Opens, ends and renews sessions of `accounts` from several tasks against a sidecar on
/// `store_env`'s Redis; at checkpoints pauses them and compares the background count with what
/// the store itself lists for each account.
async fn count_matches_during_load(store_env: &str) {
    let url = redis_env(store_env);
    let target = RedisTarget::parse(&url).unwrap();
    let run = format!("active-{:08x}", rand::random::<u32>());
    let accounts: Vec<String> = (0..40).map(|i| format!("{run}-{i}")).collect();
    let vip: Vec<String> = accounts[..5].to_vec();
    let short: Vec<String> = accounts[5..10].to_vec();
    let set = PolicySet::from_yaml(&policies(&vip, &short), "test", "default").unwrap();
    let store = RedisStore::new(target.clone(), Duration::from_secs(2));
    let sidecar = Sidecar::with_store(Arc::new(store.clone()), set);
    let policies: Policies = sidecar.engine().policies().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let serving = sidecar.clone();
    tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });

    // Load tasks hold the read side for each request; a checkpoint takes the write side, so it
    // sees the store with no request in flight.
    let gate = Arc::new(RwLock::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    // `short` accounts are played only until the first checkpoint; later checkpoints find their
    // sessions overdue, well past expiry (never within the moments a checkpoint takes).
    let play_short = Arc::new(AtomicBool::new(true));
    let http = reqwest::Client::new();
    let mut load = Vec::new();
    for task in 0..6u64 {
        let (gate, stop, play_short, http, base, accounts, short) = (
            gate.clone(),
            stop.clone(),
            play_short.clone(),
            http.clone(),
            base.clone(),
            accounts.clone(),
            short.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut ops = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let pick = rand::random::<u64>();
                let account = &accounts[(pick % accounts.len() as u64) as usize];
                if short.contains(account) && !play_short.load(Ordering::Relaxed) {
                    continue;
                }
                let stream = format!("tv-{}", (pick >> 8) % 7);
                let method = match (pick >> 16) % 10 {
                    0..=5 => reqwest::Method::PUT,
                    6..=8 => reqwest::Method::DELETE,
                    _ => reqwest::Method::GET,
                };
                let _in_flight = gate.read().await;
                let status = http
                    .request(
                        method,
                        format!("{base}/streaming?account={account}&streamId={stream}"),
                    )
                    .send()
                    .await
                    .expect("the sidecar answers")
                    .status()
                    .as_u16();
                assert!(
                    matches!(status, 200 | 201 | 204 | 404 | 410 | 429),
                    "task {task}: unexpected status {status}"
                );
                ops += 1;
            }
            ops
        }));
    }

    let mut checked_expired = false;
    for checkpoint in 0..6 {
        // Let the load run; before the second checkpoint, long enough for every `short` session
        // (TTL 2 s, no longer played) to be overdue, with nothing touching its account.
        let pause = if checkpoint == 1 { 3000 } else { 400 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let _quiet = gate.write().await;
        // Count first: listing runs the scripts' sweep of overdue sessions, which the count must
        // not need.
        let counted: AccountCounts = count_active(&target)
            .await
            .expect("the count runs")
            .into_iter()
            .filter(|(account, _)| account.starts_with(&format!("{run}-")))
            .collect();
        let mut truth = AccountCounts::new();
        for account in &accounts {
            let n = store.list(account).await.expect("list").len() as u64;
            if n > 0 {
                truth.insert(account.clone(), n);
            }
        }
        assert_eq!(
            counted, truth,
            "checkpoint {checkpoint} on {store_env}: background count vs the store's own lists"
        );
        assert!(
            truth.values().sum::<u64>() > 0,
            "checkpoint {checkpoint}: the load keeps sessions live"
        );
        let by_policy = group_by_policy(&counted, &policies);
        let mut expected = BTreeMap::new();
        for (account, n) in &truth {
            let policy = if vip.contains(account) {
                "vip"
            } else if short.contains(account) {
                "short"
            } else {
                "default"
            };
            *expected.entry(policy.to_string()).or_insert(0) += n;
        }
        assert_eq!(by_policy, expected, "checkpoint {checkpoint}: by policy");
        if checkpoint == 0 {
            assert!(
                short.iter().any(|a| truth.contains_key(a)),
                "some short-TTL sessions are live at the first checkpoint"
            );
            play_short.store(false, Ordering::Relaxed);
        } else {
            assert!(
                !short.iter().any(|a| truth.contains_key(a)),
                "short-TTL sessions have expired"
            );
            checked_expired = true;
        }
    }
    assert!(checked_expired);
    stop.store(true, Ordering::Relaxed);
    let mut total_ops = 0;
    for task in load {
        total_ops += task.await.unwrap();
    }
    assert!(total_ops > 100, "the load ran ({total_ops} requests)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn count_matches_the_true_count_during_a_load_run_on_standalone_redis() {
    count_matches_during_load("STREAMGATE_TEST_REDIS").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn count_matches_the_true_count_during_a_load_run_on_redis_cluster() {
    count_matches_during_load("STREAMGATE_TEST_REDIS_CLUSTER").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_fails_the_count_with_an_error_naming_no_credentials() {
    let (_refusing, addr) = refusing_addr();
    let port = addr.port();
    let target = RedisTarget::parse(&format!("redis-cluster://:secret@127.0.0.1:{port}")).unwrap();
    let error = count_active(&target)
        .await
        .expect_err("nothing listens there");
    assert!(error.to_string().contains(&port.to_string()), "{error}");
    assert!(!error.to_string().contains("secret"), "{error}");
}

/// Polls the sidecar's /metrics until `series` has `value`.
async fn wait_for_series(sidecar: &SidecarProcess, series: &str, value: f64) -> String {
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = http
            .get(format!("{}/metrics", sidecar.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metric(&text, series) == Some(value) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never became {value}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_exports_the_fleet_wide_count_by_policy_with_its_age() {
    // A database of its own, so the fleet-wide figure is this test's sessions alone.
    let url = format!(
        "{}/11",
        redis_env("STREAMGATE_TEST_REDIS").trim_end_matches('/')
    );
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("FLUSHDB")
        .query_async(&mut connection)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, default_policy("  maxStreamsPerAccount: 2")).unwrap();
    let policy = policy.display().to_string();
    let args = [
        "--store",
        url.as_str(),
        "--policy-file",
        policy.as_str(),
        "--active-sessions-refresh",
        "200ms",
    ];
    // Two sidecars on one store: each reports the whole store's figure. Each also serves
    // /metrics on a port of its own (`--metrics-listen`), as injected sidecars do for the
    // PodMonitor.
    let first = SidecarProcess::start(&args).await;
    first.wait_ready().await;
    let second = SidecarProcess::start(&args).await;
    second.wait_ready().await;
    let http = reqwest::Client::new();
    for (account, stream) in [("a", "1"), ("a", "2"), ("a", "3"), ("b", "1"), ("c", "1")] {
        http.put(format!(
            "{}/streaming?account={account}&streamId={stream}",
            first.base
        ))
        .send()
        .await
        .unwrap();
    }
    // a's third stream was refused (limit 2): 4 live sessions.
    let series = r#"streamgate_active_sessions{policy="default",store="redis"}"#;
    wait_for_series(&first, series, 4.0).await;
    wait_for_series(&second, series, 4.0).await;
    let text = reqwest::get(format!("{}/metrics", second.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&text, series),
        Some(4.0),
        "--metrics-listen serves the same:\n{text}"
    );
    let age = metric(&text, "streamgate_active_sessions_age_seconds").expect("the age");
    assert!(
        (0.0..30.0).contains(&age),
        "the count is refreshed every 200 ms; age {age}"
    );
    http.delete(format!("{}/streaming?account=b&streamId=1", second.base))
        .send()
        .await
        .unwrap();
    wait_for_series(&first, series, 3.0).await;
}
