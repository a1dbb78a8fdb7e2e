//! What the store costs Redis, against a floor measured in the same run: for `bench/redis-cost`.
//!
//! Usage: `redis_cost URL LIVE_SESSIONS... [--ops N] [--rounds R] [--concurrency C]`
//!
//! For each number of live sessions (ascending; one per account, seeded through `RedisStore::open`
//! so the real functions and key layout), it measures:
//! - **memory**: `used_memory` (summed over the masters of a Cluster) per live session, and per
//!   additional session of an account (1000 accounts with 5 sessions against 1000 with 1), and
//!   what the marker of an ended session costs while it lasts (one TTL): for an account whose
//!   only session ended, and beside other sessions;
//! - **server time per call** (`INFO commandstats`, `usec_per_call`) of each operation the
//!   store sends (open of a new session, heartbeat, touch, end), each phase run at the same time
//!   as the same number of calls of the floor, a minimal atomic admission script (TIME,
//!   ZREMRANGEBYSCORE, ZCARD, ZADD, PEXPIRE on one sorted set per account), so that both share
//!   whatever else the machine was doing. The ratio of the two is the figure; the median of
//!   `R` rounds is printed with the range.
//!
//! Prints a table and one JSON line per live-session count (prefixed `json `).

use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use streamgate_sidecar::policy::{Mode, OnLimitExceeded};
use streamgate_sidecar::session::SessionId;
use streamgate_sidecar::store::redis_count::node_urls;
use streamgate_sidecar::store::{OpenOutcome, OpenRequest, RedisStore, RedisTarget, SessionStore};

/// The floor: an atomic admission with nothing else (no ids, no records, no revocations).
const MINIMAL: &str = "local t = redis.call('TIME') \
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) \
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) \
local n = redis.call('ZCARD', KEYS[1]) \
if n < tonumber(ARGV[2]) then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1]) end \
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3])) \
return n";

const TTL_MS: i64 = 7_200_000;

#[derive(Clone, Copy)]
enum Phase {
    Open,
    Heartbeat,
    Touch,
    End,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Open => "open (admission)",
            Phase::Heartbeat => "heartbeat",
            Phase::Touch => "touch (media request)",
            Phase::End => "end",
        }
    }
}

struct Nodes {
    connections: Vec<MultiplexedConnection>,
}

impl Nodes {
    async fn new(target: &RedisTarget) -> anyhow::Result<Self> {
        let mut connections = Vec::new();
        for url in node_urls(target).await? {
            let client = redis::Client::open(url.as_str())?;
            connections.push(client.get_multiplexed_async_connection().await?);
        }
        Ok(Self { connections })
    }

    async fn reset_stats(&mut self) -> anyhow::Result<()> {
        for c in &mut self.connections {
            let () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(c).await?;
        }
        Ok(())
    }

    /// Calls and microseconds of `command`, summed over the nodes.
    async fn command_stats(&mut self, command: &str) -> anyhow::Result<(u64, u64)> {
        let (mut calls, mut usec) = (0, 0);
        for c in &mut self.connections {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(c)
                .await?;
            let prefix = format!("cmdstat_{command}:");
            for line in info.lines() {
                let Some(rest) = line.strip_prefix(&prefix) else {
                    continue;
                };
                for kv in rest.split(',') {
                    match kv.split_once('=') {
                        Some(("calls", v)) => calls += v.parse::<u64>()?,
                        Some(("usec", v)) => usec += v.parse::<u64>()?,
                        _ => {}
                    }
                }
            }
        }
        Ok((calls, usec))
    }

    async fn used_memory(&mut self) -> anyhow::Result<u64> {
        let mut total = 0;
        for c in &mut self.connections {
            let info: String = redis::cmd("INFO").arg("memory").query_async(c).await?;
            total += info
                .lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .context("used_memory")?
                .trim()
                .parse::<u64>()?;
        }
        Ok(total)
    }
}

/// Sends `f(i)` for `i` in `range`, `concurrency` at a time.
async fn drive<F, Fut>(range: std::ops::Range<u64>, concurrency: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut calls = futures::stream::iter(range)
        .map(f)
        .buffer_unordered(concurrency);
    while let Some(result) = calls.next().await {
        result?;
    }
    Ok(())
}

fn request<'a>(account: &'a str, stream: &'a str) -> OpenRequest<'a> {
    OpenRequest {
        account,
        stream_id: stream,
        limit: 10_000,
        ttl_ms: TTL_MS,
        on_limit: OnLimitExceeded::RejectNew,
        mode: Mode::Enforce,
    }
}

async fn open(store: &RedisStore, account: &str, stream: &str) -> anyhow::Result<SessionId> {
    match store.open(&request(account, stream)).await? {
        OpenOutcome::Admitted { session, .. } | OpenOutcome::Renewed { session, .. } => {
            Ok(session.id)
        }
        OpenOutcome::Refused { .. } => bail!("refused {account}"),
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().context(
        "usage: redis_cost URL LIVE_SESSIONS... [--ops N] [--rounds R] [--concurrency C]",
    )?;
    let (mut counts, mut ops, mut rounds, mut concurrency) = (Vec::new(), 5000u64, 3usize, 64usize);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--ops" => ops = args.next().context("--ops N")?.parse()?,
            "--rounds" => rounds = args.next().context("--rounds R")?.parse()?,
            "--concurrency" => concurrency = args.next().context("--concurrency C")?.parse()?,
            n => counts.push(n.parse::<u64>().context("LIVE_SESSIONS")?),
        }
    }
    let target = RedisTarget::parse(&url).map_err(anyhow::Error::msg)?;
    let store = RedisStore::new(target.clone(), Duration::from_secs(30));
    store.ping().await?;
    let mut nodes = Nodes::new(&target).await?;
    let minimal = redis::Script::new(MINIMAL);
    let floor = match &target {
        RedisTarget::Standalone(url) => Floor::Standalone(
            redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await?,
        ),
        RedisTarget::Cluster(seeds) => Floor::Cluster(
            redis::cluster::ClusterClient::new(seeds.clone())?
                .get_async_connection()
                .await?,
        ),
        // The floor runs on the master the sentinels name, as the store does.
        RedisTarget::Sentinel(sentinel) => Floor::Standalone(
            redis::Client::open(
                sentinel
                    .master_url()
                    .await
                    .map_err(anyhow::Error::msg)?
                    .as_str(),
            )?
            .get_multiplexed_async_connection()
            .await?,
        ),
    };
    // Load the functions and the floor script before anything is measured.
    open(&store, "bench-warm", "s").await?;
    floor.call(&minimal, "bench-warm").await?;
    let base_memory = nodes.used_memory().await?;
    let mut seeded = 0u64;
    let run = format!("{:08x}", rand::random::<u32>());
    println!(
        "phase\tlive sessions\tstore us/call\tfloor us/call\tratio (median, min-max of {rounds} rounds)"
    );
    for &n in &counts {
        let started = std::time::Instant::now();
        drive(seeded..n, 512, |i| {
            let store = &store;
            async move { open(store, &format!("seed-{i}"), "s").await.map(|_| ()) }
        })
        .await?;
        let seconds = started.elapsed().as_secs_f64();
        seeded = seeded.max(n);
        let memory = nodes.used_memory().await?;
        let per_session = memory.saturating_sub(base_memory) as f64 / n.max(1) as f64;
        // Additional sessions of one account: 1000 accounts with 5 against 1000 with 1.
        let before = nodes.used_memory().await?;
        drive(0..5000, 512, |i| {
            let (store, run) = (&store, &run);
            async move {
                open(
                    store,
                    &format!("multi-{run}-{n}-{}", i / 5),
                    &format!("s{}", i % 5),
                )
                .await
                .map(|_| ())
            }
        })
        .await?;
        let five = nodes.used_memory().await? - before;
        let before = nodes.used_memory().await?;
        drive(0..1000, 512, |i| {
            let (store, run) = (&store, &run);
            async move {
                open(store, &format!("single-{run}-{n}-{i}"), "s")
                    .await
                    .map(|_| ())
            }
        })
        .await?;
        let one = nodes.used_memory().await? - before;
        let additional = (five as f64 - one as f64) / 4000.0;
        // Ended sessions' markers (kept one TTL): the 1000 single accounts end their session
        // (what is left of such an account), then one of each five-session account ends one.
        let before = nodes.used_memory().await?;
        drive(0..1000, 512, |i| {
            let (store, run) = (&store, &run);
            async move {
                store
                    .end(&format!("single-{run}-{n}-{i}"), "s")
                    .await
                    .map(|_| ())
                    .map_err(Into::into)
            }
        })
        .await?;
        let ended_account =
            (one as f64 + nodes.used_memory().await? as f64 - before as f64) / 1000.0;
        let before = nodes.used_memory().await?;
        drive(0..1000, 512, |i| {
            let (store, run) = (&store, &run);
            async move {
                store
                    .end(&format!("multi-{run}-{n}-{i}"), "s0")
                    .await
                    .map(|_| ())
                    .map_err(Into::into)
            }
        })
        .await?;
        let ended_one_of_five =
            additional + (nodes.used_memory().await? as f64 - before as f64) / 1000.0;
        // Sessions playing media: one client network and one long-lived response's claim
        // recorded beside each (sharing detection, one session one stream).
        let playing: Vec<SessionId> = futures::future::try_join_all((0..1000).map(|i| {
            let (store, account) = (&store, format!("play-{run}-{n}-{i}"));
            async move { open(store, &account, "s").await }
        }))
        .await?;
        let before = nodes.used_memory().await?;
        drive(0..1000, 512, |i| {
            let (store, id) = (&store, playing[i as usize]);
            async move {
                store
                    .note_network(id, [0, 0, 0, 0, 0, 198, 51, (i % 256) as u8], 600_000, 3)
                    .await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .await?;
        let network = (nodes.used_memory().await? as f64 - before as f64) / 1000.0;
        let before = nodes.used_memory().await?;
        drive(0..1000, 512, |i| {
            let (store, id) = (&store, playing[i as usize]);
            async move {
                store.claim_stream(id, [7; 8], 1, 15_000).await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .await?;
        let media = network + (nodes.used_memory().await? as f64 - before as f64) / 1000.0;
        println!(
            "memory\t{n}\t{per_session:.0} B per live session (one per account), {additional:.0} B per additional session of an account (seeded at {:.0}/s); ended-session marker: {ended_account:.0} B for an account whose only session ended, {ended_one_of_five:.0} B beside other sessions; a session's media use: {network:.0} B for its network, {media:.0} B with a stream claim too",
            n as f64 / seconds.max(1e-9)
        );
        let mut results = Vec::new();
        // The ids the open phase of each round got, for its touch phase.
        let ids: Vec<std::sync::Mutex<std::collections::HashMap<u64, SessionId>>> =
            (0..rounds).map(|_| Default::default()).collect();
        for phase in [Phase::Open, Phase::Heartbeat, Phase::Touch, Phase::End] {
            let (mut store_us, mut floor_us, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..rounds {
                let prefix = format!("load-{run}-{n}-{round}");
                nodes.reset_stats().await?;
                let ids = &ids[round];
                let store_calls = drive(0..ops, concurrency / 2, |i| {
                    let (store, prefix) = (&store, &prefix);
                    async move {
                        let account = format!("{prefix}-{i}");
                        match phase {
                            Phase::Open => {
                                let id = open(store, &account, "s").await?;
                                ids.lock().unwrap().insert(i, id);
                            }
                            Phase::Heartbeat => {
                                store.heartbeat(&account, "s", TTL_MS).await?;
                            }
                            Phase::Touch => {
                                let id = ids.lock().unwrap()[&i];
                                store.touch(id, TTL_MS, 0).await?;
                            }
                            Phase::End => {
                                store.end(&account, "s").await?;
                            }
                        }
                        Ok(())
                    }
                });
                let floor_calls = drive(0..ops, concurrency / 2, |i| {
                    let (floor, minimal, prefix) = (&floor, &minimal, &prefix);
                    async move { floor.call(minimal, &format!("floor-{prefix}-{i}")).await }
                });
                let (a, b) = futures::join!(store_calls, floor_calls);
                a?;
                b?;
                let (calls, usec) = nodes.command_stats("fcall").await?;
                let (floor_n, floor_usec) = nodes.command_stats("evalsha").await?;
                let s = usec as f64 / calls.max(1) as f64;
                let f = floor_usec as f64 / floor_n.max(1) as f64;
                store_us.push(s);
                floor_us.push(f);
                ratios.push(s / f);
            }
            let (lo, hi) = (
                ratios.iter().copied().fold(f64::MAX, f64::min),
                ratios.iter().copied().fold(0.0, f64::max),
            );
            let (s, f, r) = (
                median(&mut store_us),
                median(&mut floor_us),
                median(&mut ratios),
            );
            println!(
                "{}\t{n}\t{s:.2}\t{f:.2}\t{r:.2}x ({lo:.2}-{hi:.2})",
                phase.name()
            );
            results.push(serde_json::json!({
                "phase": phase.name(), "storeUsPerCall": s, "floorUsPerCall": f,
                "ratio": r, "ratioMin": lo, "ratioMax": hi,
            }));
        }
        println!(
            "json {}",
            serde_json::json!({
                "liveSessions": n, "bytesPerSession": per_session,
                "bytesPerAdditionalSession": additional, "bytesPerEndedAccount": ended_account,
                "bytesPerEndedMarker": ended_one_of_five, "bytesPerSessionNetwork": network, "bytesPerPlayingSessionMedia": media, "phases": results,
            })
        );
    }
    Ok(())
}

enum Floor {
    Standalone(MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Floor {
    async fn call(&self, script: &redis::Script, key: &str) -> anyhow::Result<()> {
        let mut invocation = script.key(format!("bench-floor:{key}"));
        invocation.arg("m").arg(10_000).arg(TTL_MS);
        let _: i64 = match self {
            Floor::Standalone(c) => invocation.invoke_async(&mut c.clone()).await?,
            Floor::Cluster(c) => invocation.invoke_async(&mut c.clone()).await?,
        };
        Ok(())
    }
}
