//! The live-event burst: four sidecar processes on one Redis (and on Redis Cluster), 400
//! concurrent opens of one limit-3 account, 20 times over, while busy-loop processes keep every
//! CPU busy, with the production defaults (`--store-timeout 100ms`, failurePolicy Open). Calls
//! that are slow answer 503; none may admit without the store, and none may take a slot after
//! its caller gave up: never more than 3 sessions alive at any instant on the Redis clock.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use chrono::DateTime;
use common::{SidecarProcess, default_policy, eventually, json, max_concurrent, redis_env};
use futures::future::join_all;
use reqwest::Client;

const ROUNDS: usize = 20;
const OPENS: usize = 400;
const LIMIT: usize = 3;

/// Busy-loop processes, one per CPU, killed (by their own ids) when dropped.
struct CpuHog(Vec<std::process::Child>);

impl CpuHog {
    fn start() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self(
            (0..cpus)
                .map(|_| {
                    std::process::Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .expect("sh runs")
                })
                .collect(),
        )
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn fleet(store: &str, policy: &Path) -> Vec<SidecarProcess> {
    let policy = policy.display().to_string();
    let mut fleet = Vec::new();
    for _ in 0..4 {
        // The defaults: --store-timeout 100ms.
        let sidecar = SidecarProcess::start(&["--store", store, "--policy-file", &policy]).await;
        sidecar.wait_ready().await;
        fleet.push(sidecar);
    }
    fleet
}

fn millis(rfc3339: &str) -> i64 {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

#[derive(Debug, Default)]
struct Tally {
    admitted: usize,
    degraded: usize,
    refused: usize,
    slow: usize,
    worst_alive: usize,
    /// Sessions nobody was given, right after the burst (discarded in the background).
    phantoms_at_end: usize,
    /// How long discarding them took (the longest of the rounds in the totals).
    phantom_cleared_ms: u128,
}

/// One burst on a fresh account; checks it and returns its tally.
async fn burst(fleet: &[SidecarProcess], account: &str) -> Tally {
    let client = Client::new();
    let opens = (0..OPENS).map(|i| {
        let client = client.clone();
        let base = fleet[i % fleet.len()].base.clone();
        let account = account.to_string();
        tokio::spawn(async move {
            let response = client
                .put(format!(
                    "{base}/streaming?account={account}&streamId=viewer-{i}"
                ))
                .send()
                .await
                .unwrap();
            let degraded = response.headers().contains_key("x-streamgate-degraded");
            let (status, body) = json(response).await;
            (status, body, degraded)
        })
    });
    let answers: Vec<_> = join_all(opens)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let mut tally = Tally::default();
    let mut admitted_ids = HashSet::new();
    let mut lifetimes = Vec::new();
    for (status, body, degraded) in &answers {
        match status {
            201 => {
                tally.admitted += 1;
                tally.degraded += usize::from(*degraded);
                admitted_ids.insert(body["sessionId"].as_str().unwrap().to_string());
                // Nothing ends during the burst: every admitted session is alive from its
                // admission (the store's clock) on.
                lifetimes.push((millis(body["createdAt"].as_str().unwrap()), i64::MAX));
            }
            429 => tally.refused += 1,
            503 => {
                assert_eq!(body["error"], "store_unavailable", "{body}");
                tally.slow += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    tally.worst_alive = max_concurrent(&lifetimes);
    assert!(
        tally.worst_alive <= LIMIT,
        "more than {LIMIT} alive at once: {tally:?}"
    );
    // No phantom: every session the store holds for the account was given to a caller. An
    // open whose answer came back after its caller gave up may have taken a slot: the sidecar
    // discards it in the background, so this holds within a moment.
    let phantoms = async || {
        let (status, list) = streaming_list(&client, &fleet[0].admin, account).await;
        assert_eq!(status, 200, "{list}");
        list["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sessionId"].as_str().unwrap().to_string())
            .filter(|id| !admitted_ids.contains(id))
            .count()
    };
    tally.phantoms_at_end = phantoms().await;
    let cleared = Instant::now();
    eventually("no session nobody was given", async || {
        phantoms().await == 0
    })
    .await;
    tally.phantom_cleared_ms = cleared.elapsed().as_millis();
    tally
}

async fn streaming_list(client: &Client, admin: &str, account: &str) -> (u16, serde_json::Value) {
    json(
        client
            .get(format!("{admin}/v1/accounts/{account}/sessions"))
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn bursts_on(store_env: &str) {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        default_policy("  maxStreamsPerAccount: 3\n  failurePolicy: Open"),
    )
    .unwrap();
    let fleet = fleet(&redis_env(store_env), &policy).await;
    let _hog = CpuHog::start();
    let started = Instant::now();
    let mut totals = Tally::default();
    for round in 0..ROUNDS {
        let account = format!("burst-{round}-{:08x}", rand::random::<u32>());
        let tally = burst(&fleet, &account).await;
        totals.admitted += tally.admitted;
        totals.degraded += tally.degraded;
        totals.refused += tally.refused;
        totals.slow += tally.slow;
        totals.worst_alive = totals.worst_alive.max(tally.worst_alive);
        totals.phantoms_at_end += tally.phantoms_at_end;
        totals.phantom_cleared_ms = totals.phantom_cleared_ms.max(tally.phantom_cleared_ms);
    }
    // Each account got its limit at most, and (the store being up) a burst is admitted at all.
    assert!(
        totals.admitted <= ROUNDS * LIMIT,
        "over-admitted: {totals:?}"
    );
    assert_eq!(totals.degraded, 0, "a busy store is not down: {totals:?}");
    eprintln!(
        "{store_env}: {ROUNDS} bursts of {OPENS} opens in {:?}: {totals:?}",
        started.elapsed()
    );
}

/// One test, standalone then Cluster, so the two fleets and their CPU hogs never overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_on_a_busy_machine_never_admits_over_the_limit_standalone_and_cluster() {
    bursts_on("STREAMGATE_TEST_REDIS").await;
    bursts_on("STREAMGATE_TEST_REDIS_CLUSTER").await;
}
