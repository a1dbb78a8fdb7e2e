//! Concurrent opens for one account never admit more than its limit.

mod common;

use common::{TestSidecar, default_policy, json};
use futures::future::join_all;
use reqwest::Method;

async fn open_concurrently(t: &TestSidecar, account: &str, n: usize) -> Vec<u16> {
    let opens = (0..n).map(|i| {
        let client = t.client.clone();
        let url = format!("{}/streaming?account={account}&streamId=viewer-{i}", t.base);
        tokio::spawn(async move { client.put(url).send().await.unwrap().status().as_u16() })
    });
    join_all(opens)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundreds_of_concurrent_opens_admit_exactly_the_limit() {
    let t = TestSidecar::start(&default_policy("  maxStreamsPerAccount: 3")).await;
    let statuses = open_concurrently(&t, "race", 300).await;
    let admitted = statuses.iter().filter(|s| **s == 201).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((admitted, refused), (3, 297), "{statuses:?}");
    let (_, list) = json(
        t.admin_request(Method::GET, "/v1/accounts/race/sessions")
            .await,
    )
    .await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_opens_under_evict_oldest_leave_exactly_the_limit_active() {
    let t = TestSidecar::start(&default_policy(
        "  maxStreamsPerAccount: 3\n  onLimitExceeded: EvictOldest",
    ))
    .await;
    let statuses = open_concurrently(&t, "race", 300).await;
    assert!(statuses.iter().all(|s| *s == 201), "{statuses:?}");
    let (_, list) = json(
        t.admin_request(Method::GET, "/v1/accounts/race/sessions")
            .await,
    )
    .await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 3);
    let m = t.metrics().await;
    assert_eq!(
        common::metric(&m, r#"streamgate_sessions_revoked_total{reason="evicted"}"#),
        Some(297.0)
    );
}
