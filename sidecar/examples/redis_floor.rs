//! The Redis floor for `bench/redis`: the store's own Lua scripts (or a plain PING) sent straight
//! to Redis, with no HTTP and no session engine, on the same open-loop schedule as
//! `streamctl load --heartbeats 0`. The gap between the sidecar and this is what the sidecar adds
//! over its Redis round trip; the gap between this and PING is what the script costs inside Redis.
//!
//! Usage: `redis_floor URL script|ping RATE DURATION_SECONDS [CONCURRENCY] [ACCOUNTS] [INTERVAL_MS]`
//!
//! `script`: viewer `v` opens `(account, stream)` with the store's open function and ends it with
//! its end function one interval later, through `RedisStore` itself (its functions, keys and
//! reply parsing, no HTTP, no engine), so the floor does the calls the sidecar does for that load.
//! `ping`: the same schedule, every request a PING.
//!
//! Request `k` is due at `k / RATE` seconds whatever Redis does; its latency runs from that
//! intended time to the reply, and at most `CONCURRENCY` requests are in flight (a request that
//! waits for a free slot counts the wait). Prints one JSON document shaped like a
//! `streamctl load --output json` report, so `streamctl compare` can take it as a baseline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::json;
use streamgate_sidecar::policy::{Mode, OnLimitExceeded};
use streamgate_sidecar::store::{OpenOutcome, OpenRequest, RedisStore, RedisTarget, SessionStore};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::{Instant, sleep_until};

/// Session TTL, as in `bench/redis`'s policy (1 h), so floor sessions age like the sidecar's.
const TTL_MS: i64 = 3_600_000;
/// Limit per account: as in the bench policy, high enough that no open is refused.
const LIMIT: u32 = 10_000;
/// Per-request time limit, as `streamctl`'s default.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Open,
    End,
    Ping,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Open => "open",
            Op::End => "end",
            Op::Ping => "ping",
        }
    }
}

/// The mixing function `streamctl load` uses to spread viewers over accounts.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Sample {
    op: Op,
    /// The script's reply kind (`admitted`, `ended`, …), `PONG`, or the error kind.
    outcome: Result<String, &'static str>,
    latency_us: u64,
    finished: Instant,
}

struct Floor {
    connection: ConnectionManager,
    /// The store's own client: its functions, keys and reply parsing, without HTTP or engine.
    store: RedisStore,
}

impl Floor {
    async fn call(&self, op: Op, account: &str, stream: &str) -> anyhow::Result<String> {
        let mut connection = self.connection.clone();
        Ok(match op {
            Op::Ping => redis::cmd("PING").query_async(&mut connection).await?,
            Op::Open => match self
                .store
                .open(&OpenRequest {
                    account,
                    stream_id: stream,
                    limit: LIMIT,
                    ttl_ms: TTL_MS,
                    on_limit: OnLimitExceeded::RejectNew,
                    mode: Mode::Enforce,
                })
                .await?
            {
                OpenOutcome::Admitted { .. } => "admitted".into(),
                OpenOutcome::Renewed { .. } => "renewed".into(),
                OpenOutcome::Refused { .. } => "refused".into(),
            },
            Op::End => match self.store.end(account, stream).await? {
                Some(_) => "ended".into(),
                None => "none".into(),
            },
        })
    }
}

/// Percentiles in milliseconds of latencies in microseconds, in `streamctl`'s summary shape.
fn summary(latencies: &mut [u64]) -> serde_json::Value {
    if latencies.is_empty() {
        return json!({"count": 0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0});
    }
    latencies.sort_unstable();
    let n = latencies.len();
    let at = |q: f64| latencies[((q * n as f64).ceil() as usize).clamp(1, n) - 1] as f64 / 1000.0;
    let mean = latencies.iter().map(|&l| l as f64).sum::<f64>() / n as f64 / 1000.0;
    json!({
        "count": n, "mean": mean, "p50": at(0.5), "p90": at(0.9), "p99": at(0.99),
        "p999": at(0.999), "max": at(1.0),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, mode, rate, seconds, rest @ ..] = &args[..] else {
        bail!(
            "usage: redis_floor URL script|ping RATE DURATION_SECONDS [CONCURRENCY] [ACCOUNTS] [INTERVAL_MS]"
        );
    };
    let ping = match mode.as_str() {
        "script" => false,
        "ping" => true,
        other => bail!("unknown mode {other:?}: expected script or ping"),
    };
    let rate: f64 = rate.parse().context("RATE")?;
    let duration = Duration::from_secs_f64(seconds.parse().context("DURATION_SECONDS")?);
    let number = |i: usize, default: u64, what: &str| -> anyhow::Result<u64> {
        rest.get(i)
            .map_or(Ok(default), |v| v.parse())
            .context(what.to_string())
    };
    let concurrency = number(0, 256, "CONCURRENCY")?.max(1) as usize;
    let accounts = number(1, 10_000, "ACCOUNTS")?.max(1);
    let interval = Duration::from_millis(number(2, 100, "INTERVAL_MS")?);
    if rate <= 0.0 || duration.is_zero() {
        bail!("RATE and DURATION_SECONDS must be positive");
    }

    let client = redis::Client::open(url.as_str())?;
    // The store's connection: one multiplexed (pipelining) connection, as RedisStore configures it.
    let config = ConnectionManagerConfig::new().set_response_timeout(Some(TIMEOUT));
    let connection = ConnectionManager::new_with_config(client, config).await?;
    let store = RedisStore::new(
        RedisTarget::parse(url).map_err(anyhow::Error::msg)?,
        TIMEOUT,
    );
    store.ping().await?;
    let floor = Arc::new(Floor { connection, store });

    // streamctl's schedule with no heartbeats: lanes of viewers, each opening then ending.
    let seed = rand::random::<u64>();
    let run_tag = format!("{:08x}", seed >> 32);
    let lanes = (rate * interval.as_secs_f64()).round().max(1.0) as u64;
    let scheduled = (rate * duration.as_secs_f64()).ceil() as u64;
    let grace = (duration / 10).min(Duration::from_secs(1));

    let (tx, mut rx) = mpsc::unbounded_channel::<Sample>();
    let permits = Arc::new(Semaphore::new(concurrency));
    let start = Instant::now();
    let cutoff = start + duration + grace;
    let mut operations: BTreeMap<&str, u64> = BTreeMap::new();
    let mut sent = 0u64;
    for k in 0..scheduled {
        let intended = start + Duration::from_secs_f64(k as f64 / rate);
        let now = Instant::now();
        if intended > now {
            sleep_until(intended).await;
        } else if now >= cutoff {
            break;
        }
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => tokio::select! {
                permit = permits.clone().acquire_owned() => permit?,
                () = sleep_until(cutoff) => break,
            },
        };
        let (lane, turn) = (k % lanes, k / lanes);
        let viewer = (turn / 2) * lanes + lane;
        let op = match (ping, turn % 2) {
            (true, _) => Op::Ping,
            (false, 0) => Op::Open,
            (false, _) => Op::End,
        };
        let account = format!("floor-{}", splitmix64(viewer ^ seed) % accounts);
        let stream = format!("floor-{run_tag}-{viewer}");
        let (floor, tx) = (floor.clone(), tx.clone());
        tokio::spawn(async move {
            let outcome =
                match tokio::time::timeout(TIMEOUT, floor.call(op, &account, &stream)).await {
                    Ok(Ok(kind)) => Ok(kind),
                    Ok(Err(_)) => Err("error"),
                    Err(_) => Err("timeout"),
                };
            let finished = Instant::now();
            drop(permit);
            let latency_us = u64::try_from((finished - intended).as_micros()).unwrap_or(u64::MAX);
            let _ = tx.send(Sample {
                op,
                outcome,
                latency_us,
                finished,
            });
        });
        sent += 1;
        *operations.entry(op.name()).or_default() += 1;
    }
    drop(tx);

    let mut all = Vec::new();
    let mut by_op: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<&str, u64> = BTreeMap::new();
    let mut last = start;
    while let Some(sample) = rx.recv().await {
        last = last.max(sample.finished);
        match sample.outcome {
            Ok(kind) => {
                *outcomes.entry(kind).or_default() += 1;
                all.push(sample.latency_us);
                by_op
                    .entry(sample.op.name())
                    .or_default()
                    .push(sample.latency_us);
            }
            Err(kind) => *errors.entry(kind).or_default() += 1,
        }
    }
    let responses = all.len() as u64;
    let elapsed = (last - start).max(duration).as_secs_f64();
    let report = json!({
        "endpoint": format!("{url} ({})", if ping { "PING" } else { "open.lua + end.lua" }),
        "requestedRate": rate,
        "achievedRate": responses as f64 / elapsed,
        "durationSeconds": duration.as_secs_f64(),
        "elapsedSeconds": elapsed,
        "accounts": accounts,
        "heartbeatsPerViewer": 0,
        "heartbeatIntervalSeconds": lanes as f64 / rate,
        "concurrency": concurrency,
        "scheduled": scheduled,
        "sent": sent,
        "unsent": scheduled - sent,
        "responses": responses,
        "operations": operations,
        // Keyed by the script's reply kind, where streamctl keys by HTTP status.
        "statusCounts": outcomes,
        "transportErrors": errors,
        "latencyMs": summary(&mut all),
        "latencyByOperationMs": by_op
            .iter_mut()
            .map(|(op, latencies)| (op.to_string(), summary(latencies)))
            .collect::<BTreeMap<_, _>>(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
