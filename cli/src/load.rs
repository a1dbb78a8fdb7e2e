//! `streamctl load`: an open-loop load generator.
//!
//! Requests leave on a fixed schedule (request `k` at `k / rate` seconds), whatever the target does,
//! and each latency is measured from the request's *intended* send time. When the target (or the
//! concurrency bound) makes a request leave late, the delay counts as latency, so a slow target
//! cannot hide its stalls by slowing the generator down (no coordinated omission).
//!
//! The requests are the traffic of viewers. Slot `k` belongs to lane `k mod lanes`; each lane plays
//! one viewer after another, and each viewer sends `open`, then `heartbeats` heartbeats, then
//! `end`, one request per turn of its lane. With `lanes = rate × heartbeat interval`, a viewer's
//! requests are one heartbeat interval apart, about `lanes` viewers watch at any time, and the mix
//! is one open and one end for every `heartbeats` heartbeats.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use hdrhistogram::Histogram;
use reqwest::Method;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::{Instant, sleep_until};

use crate::args::LoadArgs;
use crate::client::{Client, TransportKind};
use crate::progress;
use crate::report::{LatencySummary, LoadReport};
use crate::simulate::unreachable;

/// One request of a viewer's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// `PUT /streaming`.
    Open,
    /// `GET /streaming`.
    Heartbeat,
    /// `DELETE /streaming`.
    End,
}

impl Op {
    /// Name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Open => "open",
            Op::Heartbeat => "heartbeat",
            Op::End => "end",
        }
    }

    /// HTTP method of the request.
    pub fn method(self) -> Method {
        match self {
            Op::Open => Method::PUT,
            Op::Heartbeat => Method::GET,
            Op::End => Method::DELETE,
        }
    }
}

/// Who sends slot `k`, and what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Viewer number, unique in the run.
    pub viewer: u64,
    /// The request.
    pub op: Op,
}

/// The schedule of a run: pure arithmetic, no I/O.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Requests per second.
    pub rate: f64,
    /// Viewers playing side by side.
    pub lanes: u64,
    /// Heartbeats between a viewer's open and end.
    pub heartbeats: u32,
    /// Distinct accounts.
    pub accounts: u64,
    /// Mixes viewer numbers into accounts, different in every run.
    pub seed: u64,
}

impl Plan {
    /// A plan for `rate` requests per second whose viewers send a request every
    /// `heartbeat_interval`.
    pub fn new(
        rate: f64,
        heartbeat_interval: Duration,
        heartbeats: u32,
        accounts: u64,
        seed: u64,
    ) -> Self {
        let lanes = (rate * heartbeat_interval.as_secs_f64()).round().max(1.0) as u64;
        Self {
            rate,
            lanes,
            heartbeats,
            accounts: accounts.max(1),
            seed,
        }
    }

    /// Requests of one viewer.
    pub fn requests_per_viewer(&self) -> u64 {
        u64::from(self.heartbeats) + 2
    }

    /// Requests whose intended time falls within `duration`.
    pub fn scheduled(&self, duration: Duration) -> u64 {
        (self.rate * duration.as_secs_f64()).ceil() as u64
    }

    /// When slot `k` should leave, from the start of the run.
    pub fn intended_offset(&self, k: u64) -> Duration {
        Duration::from_secs_f64(k as f64 / self.rate)
    }

    /// Seconds between a viewer's consecutive requests.
    pub fn spacing_seconds(&self) -> f64 {
        self.lanes as f64 / self.rate
    }

    /// Who sends slot `k`, and what.
    pub fn slot(&self, k: u64) -> Slot {
        let lane = k % self.lanes;
        let turn = k / self.lanes;
        let per_viewer = self.requests_per_viewer();
        let viewer = (turn / per_viewer) * self.lanes + lane;
        let op = match turn % per_viewer {
            0 => Op::Open,
            i if i == per_viewer - 1 => Op::End,
            _ => Op::Heartbeat,
        };
        Slot { viewer, op }
    }

    /// The account of `viewer`: a hash, so that neighbouring viewers land on different accounts.
    pub fn account_of(&self, viewer: u64) -> u64 {
        splitmix64(viewer ^ self.seed) % self.accounts
    }
}

/// SplitMix64 finaliser: a cheap, well-mixed hash of a counter.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One finished request.
struct Sample {
    op: Op,
    /// HTTP status, or the kind of transport failure.
    result: Result<u16, TransportKind>,
    /// From the intended send time to the end of the response, microseconds.
    latency_us: u64,
    finished: Instant,
}

/// What the collector accumulates.
struct Tally {
    all: Histogram<u64>,
    by_op: BTreeMap<Op, Histogram<u64>>,
    statuses: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    responses: u64,
    last: Option<Instant>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 hour at 3 significant digits; larger values saturate rather than fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

async fn collect(mut samples: mpsc::UnboundedReceiver<Sample>, responses: Arc<AtomicU64>) -> Tally {
    let mut tally = Tally {
        all: histogram(),
        by_op: BTreeMap::new(),
        statuses: BTreeMap::new(),
        errors: BTreeMap::new(),
        responses: 0,
        last: None,
    };
    while let Some(sample) = samples.recv().await {
        tally.last = Some(
            tally
                .last
                .map_or(sample.finished, |l| l.max(sample.finished)),
        );
        match sample.result {
            Ok(status) => {
                tally.responses += 1;
                responses.fetch_add(1, Ordering::Relaxed);
                *tally.statuses.entry(status.to_string()).or_default() += 1;
                let latency = sample.latency_us.max(1);
                tally.all.saturating_record(latency);
                tally
                    .by_op
                    .entry(sample.op)
                    .or_insert_with(histogram)
                    .saturating_record(latency);
            }
            Err(kind) => *tally.errors.entry(kind.as_str().to_string()).or_default() += 1,
        }
    }
    tally
}

/// Runs the load `args` describes against `client`.
///
/// Fails only when the endpoint cannot be reached at all before the run.
pub async fn run(
    client: Client,
    args: &LoadArgs,
    show_progress: bool,
) -> anyhow::Result<LoadReport> {
    if let Err(e) = client.probe().await {
        bail!(unreachable(&client, &e));
    }
    let seed = rand::random::<u64>();
    let run_tag = format!("{:08x}", seed >> 32);
    let plan = Plan::new(
        args.rate,
        args.heartbeat_interval,
        args.heartbeats,
        args.accounts,
        seed,
    );
    let scheduled = plan.scheduled(args.duration);
    // Requests a little late because of the machine, not the target, may still leave.
    let grace = (args.duration / 10).min(Duration::from_secs(1));

    let responses = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::unbounded_channel();
    let collector = tokio::spawn(collect(rx, responses.clone()));
    let permits = Arc::new(Semaphore::new(args.concurrency as usize));
    let client = Arc::new(client);
    let bar = progress::bar(args.duration, show_progress);

    let start = Instant::now();
    let cutoff = start + args.duration + grace;
    let mut sent = 0u64;
    let mut operations: BTreeMap<String, u64> = BTreeMap::new();
    for k in 0..scheduled {
        let intended = start + plan.intended_offset(k);
        let now = Instant::now();
        if intended > now {
            sleep_until(intended).await;
        } else if now >= cutoff {
            break;
        }
        // The fast path skips arming a timer for every request while permits are free.
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => tokio::select! {
                permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                () = sleep_until(cutoff) => break,
            },
        };
        let Slot { viewer, op } = plan.slot(k);
        let account = format!("load-{}", plan.account_of(viewer));
        let stream_id = format!("load-{run_tag}-{viewer}");
        let url = client.streaming_url(&account, &stream_id);
        let (client, tx) = (client.clone(), tx.clone());
        tokio::spawn(async move {
            let result = client
                .send(op.method(), url)
                .await
                .map(|reply| reply.status.as_u16())
                .map_err(|e| e.transport_kind().unwrap_or(TransportKind::Other));
            let finished = Instant::now();
            let latency_us = u64::try_from((finished - intended).as_micros()).unwrap_or(u64::MAX);
            drop(permit);
            let _ = tx.send(Sample {
                op,
                result,
                latency_us,
                finished,
            });
        });
        sent += 1;
        *operations.entry(op.as_str().to_string()).or_default() += 1;
        if sent.is_multiple_of(256) {
            bar.set_position(start.elapsed().as_millis() as u64);
            bar.set_message(format!(
                "sent {sent} · responses {}",
                responses.load(Ordering::Relaxed)
            ));
        }
    }
    drop(tx);
    bar.set_message(format!("sent {sent} · waiting for responses"));
    // Every request ends within the client's timeout, so this wait is bounded.
    let tally = collector.await?;
    bar.finish_and_clear();

    let elapsed = tally
        .last
        .map_or(Duration::ZERO, |last| last - start)
        .max(args.duration)
        .as_secs_f64();
    Ok(LoadReport {
        endpoint: client.base().to_string(),
        requested_rate: args.rate,
        achieved_rate: tally.responses as f64 / elapsed,
        duration_seconds: args.duration.as_secs_f64(),
        elapsed_seconds: elapsed,
        accounts: plan.accounts,
        heartbeats_per_viewer: plan.heartbeats,
        heartbeat_interval_seconds: plan.spacing_seconds(),
        concurrency: args.concurrency,
        scheduled,
        sent,
        unsent: scheduled - sent,
        responses: tally.responses,
        operations,
        status_counts: tally.statuses,
        transport_errors: tally.errors,
        latency_ms: LatencySummary::from_micros(&tally.all),
        latency_by_operation_ms: tally
            .by_op
            .iter()
            .map(|(op, h)| (op.as_str().to_string(), LatencySummary::from_micros(h)))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_evenly_spaced_in_time() {
        let plan = Plan::new(1000.0, Duration::from_secs(1), 4, 10, 0);
        assert_eq!(plan.intended_offset(0), Duration::ZERO);
        assert_eq!(plan.intended_offset(1), Duration::from_millis(1));
        assert_eq!(plan.intended_offset(2500), Duration::from_millis(2500));
        assert_eq!(plan.scheduled(Duration::from_secs(10)), 10_000);
        assert_eq!(
            Plan::new(0.5, Duration::from_secs(1), 0, 1, 0).scheduled(Duration::from_secs(3)),
            2 // at 0 s and 2 s
        );
    }

    #[test]
    fn lanes_follow_rate_times_interval() {
        assert_eq!(
            Plan::new(1000.0, Duration::from_secs(1), 4, 1, 0).lanes,
            1000
        );
        assert_eq!(
            Plan::new(10.0, Duration::from_millis(250), 4, 1, 0).lanes,
            3
        );
        // Never zero lanes, even when the interval is shorter than a slot.
        assert_eq!(Plan::new(1.0, Duration::from_millis(1), 4, 1, 0).lanes, 1);
        let plan = Plan::new(200.0, Duration::from_millis(500), 4, 1, 0);
        assert!((plan.spacing_seconds() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn each_viewer_opens_heartbeats_then_ends_one_interval_apart() {
        let plan = Plan::new(3.0, Duration::from_secs(1), 2, 1, 0); // 3 lanes, 4 requests each
        let mut lives: BTreeMap<u64, Vec<(u64, Op)>> = BTreeMap::new();
        for k in 0..24 {
            let slot = plan.slot(k);
            lives.entry(slot.viewer).or_default().push((k, slot.op));
        }
        assert_eq!(lives.len(), 6, "two viewers per lane in 24 slots");
        for (viewer, life) in &lives {
            let ops: Vec<Op> = life.iter().map(|(_, op)| *op).collect();
            assert_eq!(
                ops,
                [Op::Open, Op::Heartbeat, Op::Heartbeat, Op::End],
                "viewer {viewer}"
            );
            // Consecutive requests of a viewer are `lanes` slots apart.
            assert!(life.windows(2).all(|w| w[1].0 - w[0].0 == plan.lanes));
        }
    }

    #[test]
    fn the_mix_is_one_open_and_one_end_per_heartbeats() {
        let plan = Plan::new(100.0, Duration::from_millis(100), 4, 1, 0);
        let mut counts: BTreeMap<Op, u64> = BTreeMap::new();
        // Whole periods: lanes × requests per viewer.
        for k in 0..plan.lanes * plan.requests_per_viewer() * 5 {
            *counts.entry(plan.slot(k).op).or_default() += 1;
        }
        assert_eq!(counts[&Op::Heartbeat], 4 * counts[&Op::Open]);
        assert_eq!(counts[&Op::Open], counts[&Op::End]);
    }

    #[test]
    fn accounts_spread_viewers() {
        let plan = Plan::new(1.0, Duration::from_secs(1), 0, 50, 42);
        let mut seen = std::collections::BTreeSet::new();
        for viewer in 0..1000 {
            let account = plan.account_of(viewer);
            assert!(account < 50);
            seen.insert(account);
        }
        assert_eq!(seen.len(), 50);
        // A different seed maps viewers differently.
        let other = Plan {
            seed: 43,
            ..plan.clone()
        };
        assert!((0..100).any(|v| plan.account_of(v) != other.account_of(v)));
    }
}
