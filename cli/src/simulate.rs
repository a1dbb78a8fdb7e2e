//! `streamctl simulate`: concurrent viewers that open a stream, heartbeat while watching and end it,
//! each reporting whether it was admitted, refused or cut, and when.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use indicatif::ProgressBar;
use tokio::time::{Instant, sleep_until};

use crate::args::SimulateArgs;
use crate::client::{Beat, Client, ClientError, Opened};
use crate::progress;
use crate::report::{Outcome, OutcomeCounts, SimulateReport, ViewerReport, round_ms};

/// Live counters for the progress line.
#[derive(Default)]
struct Counters {
    watching: AtomicU32,
    refused: AtomicU32,
    cut: AtomicU32,
    failed: AtomicU32,
    heartbeats: AtomicU32,
}

impl Counters {
    fn line(&self) -> String {
        format!(
            "{} watching · {} refused · {} cut · {} failed · {} heartbeats",
            self.watching.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.cut.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.heartbeats.load(Ordering::Relaxed),
        )
    }
}

/// What one viewer plays.
struct Viewer {
    number: u32,
    account: String,
    stream_id: String,
    /// When it opens its stream.
    opens_at: Instant,
}

/// Shared by all viewers of a run.
struct Run {
    client: Client,
    start: Instant,
    /// When viewers stop watching and end their sessions.
    deadline: Instant,
    heartbeat_override: Option<Duration>,
    counters: Counters,
    /// With `--media`: a client without a request timeout (streams are long) and the URL.
    media: Option<(reqwest::Client, reqwest::Url)>,
}

impl Run {
    fn now(&self) -> f64 {
        round_ms(self.start.elapsed().as_secs_f64())
    }
}

/// Plays the viewers `args` describes against `client` and reports on each.
///
/// Fails only when the endpoint cannot be reached at all; refusals and cuts are results.
pub async fn run(
    client: Client,
    args: &SimulateArgs,
    show_progress: bool,
) -> anyhow::Result<SimulateReport> {
    if let Err(e) = client.probe().await {
        bail!(unreachable(&client, &e));
    }
    let run_tag = format!("{:08x}", rand::random::<u32>());
    let start = Instant::now();
    let media = match &args.media {
        Some(path) => Some((
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()?,
            client.base().join(path.trim_start_matches('/'))?,
        )),
        None => None,
    };
    let run = Arc::new(Run {
        client,
        start,
        deadline: start + args.duration,
        heartbeat_override: args.heartbeat_interval,
        media,
        counters: Counters::default(),
    });
    let viewers: Vec<Viewer> = (1..=args.streams)
        .map(|number| Viewer {
            number,
            account: args
                .account
                .clone()
                .unwrap_or_else(|| format!("sim-{:016x}", rand::random::<u64>())),
            stream_id: format!("sim-{run_tag}-{number}"),
            opens_at: start + args.stagger * (number - 1),
        })
        .collect();

    let bar = progress::bar(args.duration, show_progress);
    let ticker = tokio::spawn(tick(bar.clone(), run.clone()));
    let tasks: Vec<_> = viewers
        .into_iter()
        .map(|viewer| tokio::spawn(play(run.clone(), viewer)))
        .collect();
    let mut reports = Vec::with_capacity(tasks.len());
    for task in futures::future::join_all(tasks).await {
        reports.push(task?);
    }
    ticker.abort();
    bar.finish_and_clear();

    Ok(SimulateReport {
        endpoint: run.client.base().to_string(),
        account: args.account.clone(),
        streams: args.streams,
        duration_seconds: args.duration.as_secs_f64(),
        elapsed_seconds: run.now(),
        counts: OutcomeCounts::of(&reports),
        viewers: reports,
    })
}

/// The message for an endpoint that does not answer, naming the flag to fix.
pub fn unreachable(client: &Client, error: &ClientError) -> String {
    format!(
        "cannot reach the StreamGate API at {} (--endpoint): {}; is the sidecar running?",
        client.base(),
        error.short()
    )
}

async fn tick(bar: ProgressBar, run: Arc<Run>) {
    loop {
        bar.set_position(run.start.elapsed().as_millis() as u64);
        bar.set_message(run.counters.line());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn play(run: Arc<Run>, viewer: Viewer) -> ViewerReport {
    sleep_until(viewer.opens_at).await;
    let c = &run.counters;
    let mut report = ViewerReport {
        viewer: viewer.number,
        account: viewer.account.clone(),
        stream_id: viewer.stream_id.clone(),
        outcome: Outcome::Failed,
        at: 0.0,
        session_id: None,
        admitted_at: None,
        ended_at: None,
        reason: None,
        heartbeats: 0,
        heartbeat_at: Vec::new(),
        media_bytes: None,
        limit: None,
        active: None,
        message: None,
    };
    let fail = |mut report: ViewerReport, message: String| {
        c.failed.fetch_add(1, Ordering::Relaxed);
        report.outcome = Outcome::Failed;
        report.at = run.now();
        report.message = Some(message);
        report
    };

    let session = match run.client.open(&viewer.account, &viewer.stream_id).await {
        Err(e) => return fail(report, format!("open: {}", e.short())),
        Ok(Opened::Refused(body)) => {
            c.refused.fetch_add(1, Ordering::Relaxed);
            report.outcome = Outcome::Refused;
            report.at = run.now();
            report.reason = Some(body.error);
            report.limit = body.limit;
            report.active = body.active;
            report.message = Some(body.message);
            return report;
        }
        Ok(Opened::Admitted { session, .. }) => session,
    };
    c.watching.fetch_add(1, Ordering::Relaxed);
    let admitted_at = run.now();
    report.at = admitted_at;
    report.admitted_at = Some(admitted_at);
    report.session_id = Some(session.session_id.clone());
    report.limit = Some(session.limit);

    // A player heartbeats at the interval the sidecar advertises; never faster than once a second
    // unless asked, so a misconfigured 0 cannot turn the simulator into a flood.
    let interval = run
        .heartbeat_override
        .unwrap_or(Duration::from_secs(u64::from(
            session.heartbeat_interval_seconds.max(1),
        )));
    let bytes = Arc::new(AtomicU64::new(0));
    let (media_tx, mut media_end) = tokio::sync::oneshot::channel::<String>();
    let media_task = run.media.clone().map(|(http, url)| {
        report.media_bytes = Some(0);
        tokio::spawn(pull_media(
            http,
            url,
            session.session_id.clone(),
            bytes.clone(),
            media_tx,
        ))
    });
    let mut next = Instant::now() + interval;
    // Watching media: a clean end of a finite file is not a cut, so stop listening for it then.
    let mut media_open = media_task.is_some();
    loop {
        tokio::select! {
            () = sleep_until(next.min(run.deadline)) => {}
            ended = &mut media_end, if media_open => {
                let Ok(why) = ended else {
                    media_open = false;
                    continue;
                };
                // The proxy cut the stream. A heartbeat tells why.
                report.media_bytes = Some(bytes.load(Ordering::Relaxed));
                c.watching.fetch_sub(1, Ordering::Relaxed);
                c.cut.fetch_add(1, Ordering::Relaxed);
                report.outcome = Outcome::Cut;
                report.at = run.now();
                report.reason = match run.client.heartbeat(&viewer.account, &viewer.stream_id).await {
                    Ok(Beat::Gone(body)) => Some(body.reason.unwrap_or_else(|| "gone".into())),
                    _ => Some("stream_closed".into()),
                };
                report.message = Some(why);
                return report;
            }
        }
        if Instant::now() >= run.deadline {
            break;
        }
        match run
            .client
            .heartbeat(&viewer.account, &viewer.stream_id)
            .await
        {
            Ok(Beat::Renewed(_)) => {
                report.heartbeats += 1;
                report.heartbeat_at.push(run.now());
                c.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Beat::Gone(body)) => {
                c.watching.fetch_sub(1, Ordering::Relaxed);
                c.cut.fetch_add(1, Ordering::Relaxed);
                report.outcome = Outcome::Cut;
                report.at = run.now();
                report.reason = Some(body.reason.unwrap_or_else(|| "gone".into()));
                report.message = Some(body.message);
                return report;
            }
            Ok(Beat::NotFound) => {
                c.watching.fetch_sub(1, Ordering::Relaxed);
                return fail(
                    report,
                    "heartbeat: the sidecar no longer knows this session (404)".into(),
                );
            }
            Err(e) => {
                c.watching.fetch_sub(1, Ordering::Relaxed);
                return fail(report, format!("heartbeat: {}", e.short()));
            }
        }
        next += interval;
    }

    sleep_until(run.deadline).await;
    if let Some(task) = media_task {
        task.abort();
        report.media_bytes = Some(bytes.load(Ordering::Relaxed));
    }
    c.watching.fetch_sub(1, Ordering::Relaxed);
    match run.client.end(&viewer.account, &viewer.stream_id).await {
        Ok(ended) => {
            report.outcome = Outcome::Admitted;
            report.ended_at = Some(run.now());
            if !ended {
                report.message = Some("end: no active session any more (404)".into());
            }
            report
        }
        Err(e) => fail(report, format!("end: {}", e.short())),
    }
}

/// Pulls the media URL with the session until the stream ends, counting bytes. Sends why it
/// ended; dropped (the run ended first) when aborted.
async fn pull_media(
    http: reqwest::Client,
    url: reqwest::Url,
    session: String,
    bytes: Arc<AtomicU64>,
    ended: tokio::sync::oneshot::Sender<String>,
) {
    use futures::StreamExt;
    let response = match http
        .get(url)
        .header("X-StreamGate-Session", session)
        .send()
        .await
    {
        Ok(response) => response,
        Err(e) => {
            let _ = ended.send(format!("media request failed: {e}"));
            return;
        }
    };
    if !response.status().is_success() {
        let _ = ended.send(format!("media request refused: {}", response.status()));
        return;
    }
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => {
                bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                let _ = ended.send("stream closed by the proxy".into());
                return;
            }
        }
    }
    // A clean end (a finite file) drops `ended` without a message: not a cut.
    drop(ended);
}
