//! A rolling restart of the sidecars under load, with the binary on real Redis: every sidecar in
//! turn is taken out of the load balancer, sent SIGTERM and replaced by a new process, while
//! viewers keep opening, heartbeating, ending and fetching media through whichever sidecars are
//! in. No viewer under its limit is refused, no session is lost, nothing answers 5xx, and every
//! stopped sidecar drains and exits cleanly.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{SidecarProcess, demo_origin, json, redis_env, unique};
use rand::Rng as _;
use reqwest::{Client, Method};
use tokio_util::sync::CancellationToken;

/// The default policy's limit.
const LIMIT: usize = 3;
const VIEWERS: usize = 8;

/// The viewer ports a load balancer sends traffic to: the sidecars in service.
type Endpoints = Arc<Mutex<Vec<String>>>;

/// What the viewers saw.
#[derive(Default, Debug)]
struct Tally {
    /// Answers by operation and status.
    answers: HashMap<(&'static str, u16), usize>,
    /// Requests sent again to another sidecar after a connection error (a player's retry).
    retried: usize,
    /// Opens refused (429) while the viewer held fewer streams than its limit.
    false_refusals: usize,
    /// Heartbeats or media requests of a held session answered 404 or 410.
    lost: Vec<String>,
    /// Any 5xx answer.
    server_errors: Vec<String>,
}

/// Sends `method path` to a sidecar in service; a connection error (the sidecar is going away)
/// is retried on another one, as a player would. `None` after 20 failed tries.
async fn send(
    client: &Client,
    endpoints: &Endpoints,
    tally: &Mutex<Tally>,
    method: Method,
    path: &str,
    session: Option<&str>,
) -> Option<(u16, serde_json::Value, usize)> {
    for attempt in 0..20 {
        let base = {
            let endpoints = endpoints.lock().unwrap();
            endpoints[rand::rng().random_range(0..endpoints.len())].clone()
        };
        let mut request = client.request(method.clone(), format!("{base}{path}"));
        if let Some(session) = session {
            request = request.header("X-StreamGate-Session", session);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(_) => {
                tally.lock().unwrap().retried += 1;
                let backoff = Duration::from_millis(10 * (attempt + 1));
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let status = response.status().as_u16();
        if session.is_some() {
            // Media: the whole body must arrive; a cut mid-body is a connection error too.
            match response.bytes().await {
                Ok(body) => return Some((status, serde_json::Value::Null, body.len())),
                Err(_) => {
                    tally.lock().unwrap().retried += 1;
                    continue;
                }
            }
        }
        let (status, body) = json(response).await;
        return Some((status, body, 0));
    }
    None
}

/// One viewer: holds up to its limit of streams, heartbeats them, ends one now and then and
/// opens another, and fetches a MiB of media on a held session.
async fn viewer(endpoints: Endpoints, tally: Arc<Mutex<Tally>>, stop: CancellationToken) {
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let account = unique("roll");
    // (stream id, session id)
    let mut held: Vec<(String, String)> = Vec::new();
    let mut next = 0;
    while !stop.is_cancelled() {
        let choice = rand::rng().random_range(0..10);
        if held.len() < LIMIT && (held.len() < 2 || choice < 2) {
            next += 1;
            let stream = format!("s{next}");
            let path = format!("/streaming?account={account}&streamId={stream}");
            let Some((status, body, _)) =
                send(&client, &endpoints, &tally, Method::PUT, &path, None).await
            else {
                continue;
            };
            let mut t = tally.lock().unwrap();
            *t.answers.entry(("open", status)).or_default() += 1;
            match status {
                // 200: an earlier try reached the store before its connection broke.
                200 | 201 => held.push((stream, body["sessionId"].as_str().unwrap().to_string())),
                429 => t.false_refusals += 1,
                s if s >= 500 => t.server_errors.push(format!("open {s}: {body}")),
                _ => {}
            }
        } else if choice < 6 && !held.is_empty() {
            let (stream, _) = held[rand::rng().random_range(0..held.len())].clone();
            let path = format!("/streaming?account={account}&streamId={stream}");
            let Some((status, body, _)) =
                send(&client, &endpoints, &tally, Method::GET, &path, None).await
            else {
                continue;
            };
            let mut t = tally.lock().unwrap();
            *t.answers.entry(("heartbeat", status)).or_default() += 1;
            match status {
                404 | 410 => t
                    .lost
                    .push(format!("{account}/{stream}: heartbeat {status}")),
                s if s >= 500 => t.server_errors.push(format!("heartbeat {s}: {body}")),
                _ => {}
            }
        } else if choice < 8 && !held.is_empty() {
            let (stream, session) = held[rand::rng().random_range(0..held.len())].clone();
            let Some((status, _, len)) = send(
                &client,
                &endpoints,
                &tally,
                Method::GET,
                "/file?mib=1",
                Some(&session),
            )
            .await
            else {
                continue;
            };
            let mut t = tally.lock().unwrap();
            *t.answers.entry(("media", status)).or_default() += 1;
            match status {
                200 => assert_eq!(len, 1024 * 1024, "a media answer came short"),
                401..=410 => t.lost.push(format!("{account}/{stream}: media {status}")),
                s if s >= 500 => t.server_errors.push(format!("media {s}")),
                _ => {}
            }
        } else if !held.is_empty() {
            let index = rand::rng().random_range(0..held.len());
            let (stream, _) = held[index].clone();
            let path = format!("/streaming?account={account}&streamId={stream}");
            let Some((status, body, _)) =
                send(&client, &endpoints, &tally, Method::DELETE, &path, None).await
            else {
                continue;
            };
            let mut t = tally.lock().unwrap();
            *t.answers.entry(("end", status)).or_default() += 1;
            match status {
                // 404: an earlier try of this end reached the store before its connection broke.
                204 | 404 => {
                    held.remove(index);
                }
                s if s >= 500 => t.server_errors.push(format!("end {s}: {body}")),
                _ => {}
            }
        }
        let pause = Duration::from_millis(rand::rng().random_range(5..25));
        tokio::time::sleep(pause).await;
    }
}

async fn start_sidecar(redis: &str, upstream: &str) -> SidecarProcess {
    let sidecar = SidecarProcess::start(&[
        "--store",
        redis,
        "--store-timeout",
        "2s",
        "--upstream",
        upstream,
        "--shutdown-timeout",
        "2s",
    ])
    .await;
    sidecar.wait_ready().await;
    sidecar
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_refuses_no_viewer_under_its_limit_and_loses_no_session() {
    let redis = redis_env("STREAMGATE_TEST_REDIS");
    let upstream = demo_origin().await.0;
    let mut sidecars = Vec::new();
    for _ in 0..3 {
        sidecars.push(start_sidecar(&redis, &upstream).await);
    }
    let endpoints: Endpoints = Arc::new(Mutex::new(
        sidecars.iter().map(|s| s.base.clone()).collect(),
    ));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = CancellationToken::new();
    let viewers: Vec<_> = (0..VIEWERS)
        .map(|_| tokio::spawn(viewer(endpoints.clone(), tally.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Each sidecar in turn: out of the load balancer, SIGTERM a moment later (as endpoints
    // propagate), drained, replaced by a new process that joins once ready. The first gets
    // SIGTERM while still in the load balancer (endpoint removal lagging behind), so requests
    // meet a sidecar that stopped accepting and are retried elsewhere.
    for (i, old) in sidecars.iter_mut().enumerate() {
        let base = old.base.clone();
        let out_of_service =
            |endpoints: &Endpoints| endpoints.lock().unwrap().retain(|b| *b != base);
        if i > 0 {
            out_of_service(&endpoints);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let pid = old.child.id().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        if i == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            out_of_service(&endpoints);
        }
        let status = tokio::task::block_in_place(|| old.child.wait()).unwrap();
        assert!(
            status.success(),
            "sidecar {i} did not drain cleanly: {status}"
        );
        let new = start_sidecar(&redis, &upstream).await;
        endpoints.lock().unwrap().push(new.base.clone());
        *old = new;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    for v in viewers {
        v.await.unwrap();
    }

    let tally = tally.lock().unwrap();
    eprintln!("rolling restart: {tally:?}");
    let count = |op: &'static str, status: u16| tally.answers.get(&(op, status)).copied();
    assert!(
        count("open", 201).unwrap_or(0) > 20,
        "too little load: {tally:?}"
    );
    assert!(
        count("heartbeat", 200).unwrap_or(0) > 50,
        "too little load: {tally:?}"
    );
    assert!(
        count("media", 200).unwrap_or(0) > 10,
        "too little load: {tally:?}"
    );
    assert_eq!(tally.false_refusals, 0, "viewers under their limit refused");
    assert_eq!(tally.lost, Vec::<String>::new(), "sessions lost");
    assert_eq!(tally.server_errors, Vec::<String>::new(), "5xx answers");
}
