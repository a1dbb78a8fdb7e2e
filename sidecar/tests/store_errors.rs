//! A store that answers wrongly is not an outage: under failurePolicy Open a fatal store error
//! (here a key of the wrong type planted in the account's slot) answers 500 with a generic body,
//! is counted, fails readiness, and admits nothing. On Redis standalone and Cluster.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    Served, default_policy, eventually, json, metric, metric_with, redis_env, streaming_at,
};
use reqwest::{Client, Method};
use streamgate_sidecar::policy::PolicySet;
use streamgate_sidecar::server::Sidecar;
use streamgate_sidecar::session::account_tag;
use streamgate_sidecar::store::{RedisStore, RedisTarget};

/// The key of `account`'s hash, as the Lua functions build it (see `lua/common.lua`).
fn streams_key(account: &str) -> String {
    streamgate_sidecar::store::redis_store::account_key(account_tag(account))
}

/// Runs `command` on the test Redis named by `env` (a cluster routes it by the key's slot).
async fn redis_command(env: &str, command: &redis::Cmd) {
    match RedisTarget::parse(&redis_env(env)).unwrap() {
        RedisTarget::Standalone(url) => {
            let client = redis::Client::open(url).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            command.query_async::<()>(&mut c).await.unwrap();
        }
        RedisTarget::Cluster(nodes) => {
            let client = redis::cluster::ClusterClient::new(nodes).unwrap();
            let mut c = client.get_async_connection().await.unwrap();
            command.query_async::<()>(&mut c).await.unwrap();
        }
        RedisTarget::Sentinel(sentinel) => {
            let client = redis::Client::open(sentinel.master_url().await.unwrap()).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            command.query_async::<()>(&mut c).await.unwrap();
        }
    }
}

async fn a_wrong_type_in_the_accounts_slot_refuses_counts_and_admits_nothing(env: &str) {
    let policies = PolicySet::from_yaml(
        &default_policy("  maxStreamsPerAccount: 2\n  failurePolicy: Open"),
        "test.yaml",
        "default",
    )
    .unwrap();
    let store = RedisStore::new(
        RedisTarget::parse(&redis_env(env)).unwrap(),
        Duration::from_secs(2),
    );
    let sidecar = Sidecar::with_store(Arc::new(store), policies);
    let Served { base, admin } = common::serve_in_background(sidecar).await;
    let client = Client::new();
    eventually("the sidecar is ready", async || {
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;

    let account = format!("wrongtype-{:08x}", rand::random::<u32>());
    let key = streams_key(&account);
    redis_command(env, redis::cmd("SET").arg(&key).arg("not a hash")).await;

    for _ in 0..3 {
        let response = client
            .put(format!("{base}/streaming?account={account}&streamId=tv"))
            .send()
            .await
            .unwrap();
        assert!(!response.headers().contains_key("x-streamgate-degraded"));
        let (status, body) = json(response).await;
        assert_eq!(status, 500, "{body}");
        assert_eq!(body["error"], "internal_error");
        let message = body["message"].as_str().unwrap();
        assert!(
            !message.contains("WRONGTYPE") && !message.to_lowercase().contains("redis"),
            "the body quotes no internals: {body}"
        );
    }
    let (status, body) = streaming_at(&client, &base, Method::GET, &account, "tv").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (500, Some("internal_error"))
    );

    let (status, body) = json(client.get(format!("{base}/readyz")).send().await.unwrap()).await;
    assert_eq!(status, 503, "a fatal store error fails readiness: {body}");

    let m = client
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric_with(
            &m,
            "streamgate_store_errors_total",
            &[r#"operation="open""#, r#"kind="fatal""#]
        ),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "streamgate_failed_open_admissions_total"),
        Some(0.0)
    );
    assert_eq!(metric(&m, "streamgate_sessions_admitted_total"), Some(0.0));

    // Nothing was admitted: with the bad key gone, the account has no session.
    redis_command(env, redis::cmd("DEL").arg(&key)).await;
    let (status, list) = json(
        client
            .get(format!("{admin}/v1/accounts/{account}/sessions"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["sessions"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn redis_standalone_wrong_type_is_fatal() {
    a_wrong_type_in_the_accounts_slot_refuses_counts_and_admits_nothing("STREAMGATE_TEST_REDIS")
        .await;
}

#[tokio::test]
async fn redis_cluster_wrong_type_is_fatal() {
    a_wrong_type_in_the_accounts_slot_refuses_counts_and_admits_nothing(
        "STREAMGATE_TEST_REDIS_CLUSTER",
    )
    .await;
}
