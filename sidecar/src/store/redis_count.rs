//! Fleet-wide live-session count on Redis, for `streamgate_active_sessions`.
//!
//! Admission never needs a global count (each account's scripts count its own sessions), and a
//! global counter key would sit outside every account's Cluster slot. So the count is taken in
//! the background instead: every `--active-sessions-refresh` a task SCANs the account hashes
//! (`sg{TAG}`, one per account with sessions; see `lua/common.lua`) on the server, or on every
//! master of a Cluster, reads each (`HGETALL`, in pipelined batches) and counts its active
//! sessions that expire after the server's "now": exactly the sessions the next admission of
//! that account would count. The result is grouped by the policy each account gets, cached, and
//! exported with its age; a scrape only reads the cache.
//!
//! How exact: one refresh is not a snapshot of the whole store: sessions opened or ended while
//! the SCAN runs may or may not be counted (at most the churn of one refresh). A refresh that
//! fails leaves the previous figures in place, and their age keeps growing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::redis_store::{ACCOUNT_KEY_PATTERN, RedisTarget, decode_account_hash};
use crate::engine::Policies;
use crate::metrics::Metrics;
use crate::session::SessionState;

/// Keys SCAN asks for per round trip, and HGETALLs sent per pipeline.
const BATCH: usize = 1000;

/// Live sessions of each account that has any, as counted on the store.
pub type AccountCounts = BTreeMap<String, u64>;

/// Why a count could not be taken (the message names the node, never its credentials).
#[derive(Debug, Clone, thiserror::Error)]
#[error("counting live sessions: {0}")]
pub struct CountError(String);

/// Counts the live sessions of every account on `target`, one SCAN per node.
pub async fn count_active(target: &RedisTarget) -> Result<AccountCounts, CountError> {
    let mut counts = AccountCounts::new();
    for url in node_urls(target).await? {
        let mut connection = connect(&url).await?;
        count_node(&mut connection, &mut counts)
            .await
            .map_err(|e| CountError(format!("{}: {e}", redacted(&url))))?;
    }
    Ok(counts)
}

/// Live sessions per policy (by the name of the policy each account gets under `policies`).
pub fn group_by_policy(counts: &AccountCounts, policies: &Policies) -> BTreeMap<String, u64> {
    let policies = policies.load();
    let mut by_policy = BTreeMap::new();
    for (account, n) in counts {
        *by_policy
            .entry(policies.resolve(account).source.clone())
            .or_insert(0) += n;
    }
    by_policy
}

async fn count_node(
    connection: &mut MultiplexedConnection,
    counts: &mut AccountCounts,
) -> redis::RedisResult<()> {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(ACCOUNT_KEY_PATTERN)
            .arg("COUNT")
            .arg(BATCH)
            .arg("TYPE")
            .arg("hash")
            .query_async(connection)
            .await?;
        if !keys.is_empty() {
            // "Now" is the server's clock, as in the scripts; read per batch so a long scan
            // does not count sessions that expired while it ran.
            let (seconds, micros): (i64, i64) = redis::cmd("TIME").query_async(connection).await?;
            let now_ms = seconds * 1000 + micros / 1000;
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("HGETALL").arg(key);
            }
            let hashes: Vec<Vec<(Vec<u8>, Vec<u8>)>> = pipe.query_async(connection).await?;
            for fields in hashes {
                let Some((account, sessions)) = decode_account_hash(&fields) else {
                    continue;
                };
                let live = sessions
                    .iter()
                    .filter(|s| s.state == SessionState::Active && s.expires_at_ms > now_ms)
                    .count() as u64;
                if live > 0 {
                    *counts.entry(account).or_insert(0) += live;
                }
            }
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// The nodes holding data: the server itself, or every master of the Cluster (read from the
/// first seed node that answers `CLUSTER NODES`).
pub async fn node_urls(target: &RedisTarget) -> Result<Vec<String>, CountError> {
    let seeds = match target {
        RedisTarget::Standalone(url) => return Ok(vec![url.clone()]),
        RedisTarget::Cluster(seeds) => seeds,
        RedisTarget::Sentinel(sentinel) => {
            return sentinel
                .master_url()
                .await
                .map(|url| vec![url])
                .map_err(CountError);
        }
    };
    let mut last_error = CountError("no seed node".into());
    for seed in seeds {
        let nodes: Result<String, CountError> = async {
            let mut connection = connect(seed).await?;
            redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut connection)
                .await
                .map_err(|e| CountError(format!("CLUSTER NODES on {}: {e}", redacted(seed))))
        }
        .await;
        match nodes {
            Ok(nodes) => {
                let masters = cluster_masters(&nodes);
                if masters.is_empty() {
                    return Err(CountError(format!(
                        "{} lists no reachable master",
                        redacted(seed)
                    )));
                }
                let credentials = credentials_of(seed);
                return Ok(masters
                    .into_iter()
                    .map(|address| format!("redis://{credentials}{address}"))
                    .collect());
            }
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

/// `HOST:PORT` of every master in a `CLUSTER NODES` reply that is neither failing nor without
/// an address.
pub fn cluster_masters(nodes: &str) -> Vec<String> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let address = fields.get(1)?;
            let flags: Vec<&str> = fields.get(2)?.split(',').collect();
            let usable = flags.contains(&"master")
                && !flags
                    .iter()
                    .any(|f| matches!(*f, "fail" | "fail?" | "noaddr" | "handshake"));
            // ip:port@cport[,hostname]
            let host_port = address.split('@').next()?;
            (usable && !host_port.starts_with(':')).then(|| host_port.to_string())
        })
        .collect()
}

/// `user:password@` (or empty) of a `redis://` URL.
fn credentials_of(url: &str) -> String {
    let rest = url.strip_prefix("redis://").unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.rsplit_once('@') {
        Some((credentials, _)) => format!("{credentials}@"),
        None => String::new(),
    }
}

/// A URL without its credentials, for messages.
fn redacted(url: &str) -> String {
    match url.rsplit_once('@') {
        Some((_, host)) => format!("redis://{host}"),
        None => url.to_string(),
    }
}

async fn connect(url: &str) -> Result<MultiplexedConnection, CountError> {
    let client =
        redis::Client::open(url).map_err(|e| CountError(format!("{}: {e}", redacted(url))))?;
    match tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(CountError(format!(
            "cannot connect to {}: {e}",
            redacted(url)
        ))),
        Err(_) => Err(CountError(format!(
            "cannot connect to {}: timed out",
            redacted(url)
        ))),
    }
}

/// The background task that keeps `streamgate_active_sessions` (by policy, `store="redis"`)
/// and `streamgate_active_sessions_age_seconds` up to date. Owned: [`stop`](Self::stop) ends
/// it and waits for it; dropping it ends it too.
pub struct ActiveSessionRefresher {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl ActiveSessionRefresher {
    /// Starts counting on `target` every `every`, grouped by `policies`, into `metrics`.
    pub fn start(
        target: RedisTarget,
        policies: Policies,
        metrics: Arc<Metrics>,
        every: Duration,
    ) -> Self {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(refresh_active_sessions(
            target,
            policies,
            metrics,
            every,
            cancel.clone(),
        ));
        Self {
            cancel,
            task: Some(task),
        }
    }

    /// Stops the task and waits for it to end.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ActiveSessionRefresher {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Keeps `metrics`' live-session figures for `target` up to date, counting every `every`, until
/// `cancel` is cancelled. What [`ActiveSessionRefresher`] runs; callers with a task tracker of
/// their own spawn it there.
pub async fn refresh_active_sessions(
    target: RedisTarget,
    policies: Policies,
    metrics: Arc<Metrics>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut refreshed_at: Option<Instant> = None;
    let mut next_refresh = tokio::time::Instant::now();
    // The age is re-exported every second so a scrape sees it grow between refreshes.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(next_refresh) => {
                let started = Instant::now();
                let counted = tokio::select! {
                    () = cancel.cancelled() => return,
                    counted = count_active(&target) => counted,
                };
                match counted {
                    Ok(counts) => {
                        metrics.set_active_shared(&group_by_policy(&counts, &policies));
                        refreshed_at = Some(started);
                        tracing::debug!(accounts = counts.len(), took = ?started.elapsed(),
                            "live sessions counted");
                    }
                    Err(e) => {
                        // Visible as the age growing past the refresh interval.
                        tracing::warn!(error = %e, "cannot count live sessions; keeping the last count");
                    }
                }
                next_refresh = tokio::time::Instant::now() + every;
            }
            _ = tick.tick() => {}
        }
        if let Some(at) = refreshed_at {
            metrics.set_active_age(at.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_hashes_decode_to_their_sessions() {
        // '>c1I4i6i6I4' + stream, as lua/common.lua packs a session.
        let mut value = vec![b'k', 0, 0, 0, 7];
        value.extend_from_slice(&1_796_030_402_223i64.to_be_bytes()[2..]);
        value.extend_from_slice(&1_796_030_403_000i64.to_be_bytes()[2..]);
        value.extend_from_slice(&90_000u32.to_be_bytes());
        value.extend_from_slice(b"tv");
        let fields = vec![
            (b"@".to_vec(), b"{x}:y".to_vec()),
            ([9u8; 16].to_vec(), value),
        ];
        let (account, sessions) = decode_account_hash(&fields).unwrap();
        assert_eq!(account, "{x}:y");
        let [session] = &sessions[..] else {
            panic!("{sessions:?}")
        };
        assert_eq!(session.id.tag, crate::session::account_tag("{x}:y"));
        assert_eq!(session.id.random, u128::from_be_bytes([9; 16]));
        assert_eq!(session.stream_id, "tv");
        assert_eq!(session.state, SessionState::Revoked);
        assert_eq!(session.reason, Some(crate::session::EndReason::Kicked));
        assert_eq!(
            (session.created_at_ms, session.expires_at_ms, session.ttl_ms),
            (1_796_030_402_223, 1_796_030_403_000, 90_000)
        );
        // Not an account hash: no account field.
        assert!(decode_account_hash(&[(b"x".to_vec(), b"y".to_vec())]).is_none());
    }

    #[test]
    fn cluster_masters_skip_replicas_failing_and_addressless_nodes() {
        let nodes = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002,node-b master - 0 0 2 connected 5461-10922
c3 127.0.0.1:7003@17003 master,fail - 0 0 3 connected 10923-16383
d4 127.0.0.1:7004@17004 slave a1 0 0 1 connected
e5 :0@0 master,noaddr - 0 0 0 disconnected
";
        assert_eq!(
            cluster_masters(nodes),
            vec!["127.0.0.1:7001".to_string(), "127.0.0.1:7002".to_string()]
        );
    }

    #[test]
    fn credentials_carry_over_to_the_masters_but_not_into_messages() {
        assert_eq!(credentials_of("redis://:pw@10.0.0.1:7000"), ":pw@");
        assert_eq!(credentials_of("redis://u:p@h:1/0"), "u:p@");
        assert_eq!(credentials_of("redis://h:1"), "");
        assert_eq!(redacted("redis://:pw@h:1"), "redis://h:1");
    }
}
