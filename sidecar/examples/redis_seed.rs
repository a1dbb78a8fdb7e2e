//! Seeds live sessions into a Redis store for `bench/redis`, through the store's own code
//! (`RedisStore::open`, hence the real open script and key layout), so the store under
//! measurement holds exactly what a busy fleet of sidecars would have put there.
//!
//! Usage: `redis_seed URL FROM TO [CONCURRENCY] [TTL_SECONDS]`
//! opens one session on each of the accounts `seed-FROM` … `seed-(TO-1)` (stream `s`), with a
//! TTL (default 7200 s) long enough that none expires during the benchmark. Opens run
//! `CONCURRENCY` (default 512) at a time on the store's one multiplexed connection, so Redis sees
//! them pipelined. Seeding the same range again renews instead of adding sessions.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use streamgate_sidecar::policy::{Mode, OnLimitExceeded};
use streamgate_sidecar::store::{OpenOutcome, OpenRequest, RedisStore, RedisTarget, SessionStore};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, from, to, rest @ ..] = &args[..] else {
        bail!("usage: redis_seed URL FROM TO [CONCURRENCY] [TTL_SECONDS]");
    };
    let from: u64 = from.parse().context("FROM")?;
    let to: u64 = to.parse().context("TO")?;
    let concurrency: usize = rest
        .first()
        .map_or(Ok(512), |c| c.parse())
        .context("CONCURRENCY")?;
    let ttl_seconds: i64 = rest
        .get(1)
        .map_or(Ok(7200), |t| t.parse())
        .context("TTL_SECONDS")?;

    let target = RedisTarget::parse(url).map_err(anyhow::Error::msg)?;
    // A generous timeout: seeding pipelines hundreds of scripts, and a slow one is not a failure.
    let store = RedisStore::new(target, Duration::from_secs(10));
    store.ping().await?;

    let start = Instant::now();
    let mut opens = futures::stream::iter(from..to)
        .map(|i| {
            let store = store.clone();
            async move {
                let account = format!("seed-{i}");
                let request = OpenRequest {
                    account: &account,
                    stream_id: "s",
                    limit: 3,
                    ttl_ms: ttl_seconds * 1000,
                    on_limit: OnLimitExceeded::RejectNew,
                    mode: Mode::Enforce,
                };
                store.open(&request).await
            }
        })
        .buffer_unordered(concurrency.max(1));
    let (mut admitted, mut renewed) = (0u64, 0u64);
    while let Some(outcome) = opens.next().await {
        match outcome? {
            OpenOutcome::Admitted { .. } => admitted += 1,
            OpenOutcome::Renewed { .. } => renewed += 1,
            OpenOutcome::Refused { .. } => bail!("a seed session was refused (limit 3, one each)"),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "seeded accounts {from}..{to}: {admitted} admitted, {renewed} renewed in {seconds:.1} s ({:.0}/s)",
        (admitted + renewed) as f64 / seconds.max(1e-9)
    );
    Ok(())
}
