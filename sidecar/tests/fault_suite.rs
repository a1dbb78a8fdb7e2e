//! The store fault suite: three sidecar processes reach one real redis-server through
//! Toxiproxy (built from its Go module by testenv/build-tools, driven over its HTTP API), under
//! a mixed load of opens, heartbeats, ends and kicks, with the production defaults
//! (`--store-timeout 100ms`, failurePolicy Open). Each fault in turn: latency above the store
//! timeout, timeouts (nothing answered), reset connections, a partition of one sidecar, Redis
//! frozen (SIGSTOP/SIGCONT), Redis restarted, a sidecar killed with SIGKILL mid-load. After
//! each, the history checker (`history/`) proves the limit held (outside the documented bound
//! under Open), no phantom session, every acknowledged session present or explicitly cut, and
//! the sidecars recovered without restarting.

mod common;
mod history;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::DateTime;
use common::{OwnRedis, SidecarProcess, default_policy, eventually, json};
use history::{Admission, Final, History, Violation};
use rand::Rng;
use reqwest::Client;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const LIMIT: usize = 3;
const SIDECARS: usize = 3;
const ACCOUNTS_PER_FAULT: usize = 4;
/// How long each fault lasts: longer than the breaker's 2 s quiet time, so timeouts open it.
const FAULT: Duration = Duration::from_millis(3_000);

/// A toxiproxy-server of the test's own, on a free loopback port.
struct Toxiproxy {
    child: std::process::Child,
    api: String,
    client: Client,
}

impl Drop for Toxiproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Toxiproxy {
    async fn start() -> Self {
        let binary = std::env::var("TOXIPROXY_SERVER").unwrap_or_else(|_| {
            panic!(
                "TOXIPROXY_SERVER is not set: run the tests with ./scripts/test, or eval \"$(testenv/build-tools)\""
            )
        });
        let client = Client::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = std::process::Command::new(&binary)
                .args(["-host", "127.0.0.1", "-port", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("toxiproxy-server runs");
            let api = format!("http://127.0.0.1:{port}");
            for _ in 0..200 {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken
                }
                if client
                    .get(format!("{api}/version"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
                {
                    return Self { child, api, client };
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("toxiproxy-server did not start");
    }

    /// A proxy to `upstream` on a port toxiproxy picks; returns that port.
    async fn proxy(&self, name: &str, upstream: &str) -> u16 {
        let response = self
            .client
            .post(format!("{}/proxies", self.api))
            .json(&json!({"name": name, "listen": "127.0.0.1:0", "upstream": upstream, "enabled": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "creating proxy {name}");
        let body: Value = response.json().await.unwrap();
        let listen = body["listen"].as_str().unwrap();
        listen.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    async fn set_enabled(&self, name: &str, enabled: bool) {
        let response = self
            .client
            .post(format!("{}/proxies/{name}", self.api))
            .json(&json!({"enabled": enabled}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "enabling {name}: {enabled}");
    }

    async fn add_toxic(&self, proxy: &str, kind: &str, attributes: Value) {
        let response = self
            .client
            .post(format!("{}/proxies/{proxy}/toxics", self.api))
            .json(
                &json!({"name": kind, "type": kind, "stream": "downstream", "toxicity": 1.0,
                "attributes": attributes}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "adding {kind} to {proxy}");
    }

    async fn remove_toxic(&self, proxy: &str, kind: &str) {
        let response = self
            .client
            .delete(format!("{}/proxies/{proxy}/toxics/{kind}", self.api))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204, "removing {kind} from {proxy}");
    }
}

/// The kinds of fault, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Every store call of every sidecar delayed 300 ms (store timeout 100 ms).
    Latency,
    /// Nothing is answered, and each connection is closed after 1.5 s of silence (as a
    /// keepalive or a middlebox would). Toxiproxy's endless variant (`timeout: 0`) is not used:
    /// it discards the held bytes when removed, which TCP never does.
    Timeout,
    /// Every connection reset as soon as it carries data.
    Reset,
    /// Sidecar 0 cut off from Redis (its proxy refuses and drops connections).
    PartitionOne,
    /// Redis frozen with SIGSTOP, then thawed with SIGCONT.
    RedisPaused,
    /// Redis stopped and started again (its append-only file keeps the data).
    RedisRestart,
    /// The last sidecar killed with SIGKILL mid-load (the others carry on).
    SidecarKilled,
}

const FAULTS: [Fault; 7] = [
    Fault::Latency,
    Fault::Timeout,
    Fault::Reset,
    Fault::PartitionOne,
    Fault::RedisPaused,
    Fault::RedisRestart,
    Fault::SidecarKilled,
];

/// What the load recorded: admissions by id, plus counts of answers.
#[derive(Default)]
struct Recorded {
    admissions: Vec<Admission>,
    by_id: HashMap<String, usize>,
    answers: HashMap<u16, usize>,
}

type Shared = Arc<Mutex<Recorded>>;

fn millis(rfc3339: &str) -> i64 {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One viewer-side worker of `account`: opens streams (past the limit too), heartbeats and
/// ends its own, on the sidecars in `bases` (dead ones are skipped).
async fn viewer(
    bases: Vec<(usize, String)>,
    account: String,
    worker: usize,
    recorded: Shared,
    stop: CancellationToken,
    alive: Arc<Mutex<Vec<bool>>>,
) {
    let client = Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    // (stream id, session id) of the streams this viewer holds.
    let mut holding: Vec<(String, String)> = Vec::new();
    let mut next = 0;
    while !stop.is_cancelled() {
        let live: Vec<&(usize, String)> = bases
            .iter()
            .filter(|(i, _)| alive.lock().unwrap()[*i])
            .collect();
        let (sidecar, base) = live[rand::rng().random_range(0..live.len())].clone();
        let choice = rand::rng().random_range(0..10);
        if holding.len() < LIMIT || choice < 3 {
            next += 1;
            let stream = format!("w{worker}-{next}");
            let Ok(response) = client
                .put(format!(
                    "{base}/streaming?account={account}&streamId={stream}"
                ))
                .send()
                .await
            else {
                continue;
            };
            let degraded = response.headers().contains_key("x-streamgate-degraded");
            let (status, body) = json(response).await;
            let mut recorded = recorded.lock().unwrap();
            *recorded.answers.entry(status).or_default() += 1;
            if status == 201 {
                let id = body["sessionId"].as_str().unwrap().to_string();
                let index = recorded.admissions.len();
                recorded.by_id.insert(id.clone(), index);
                holding.push((stream, id.clone()));
                recorded.admissions.push(Admission {
                    account: account.clone(),
                    id,
                    sidecar,
                    degraded,
                    start_ms: millis(body["createdAt"].as_str().unwrap()),
                    ended_sent_ms: None,
                    end_tried_ms: None,
                });
            }
        } else if choice < 8 {
            let (stream, _) = &holding[rand::rng().random_range(0..holding.len())];
            let Ok(response) = client
                .get(format!(
                    "{base}/streaming?account={account}&streamId={stream}"
                ))
                .send()
                .await
            else {
                continue;
            };
            let status = response.status().as_u16();
            *recorded.lock().unwrap().answers.entry(status).or_default() += 1;
            if matches!(status, 404 | 410) {
                let stream = stream.clone();
                holding.retain(|(s, _)| *s != stream);
            }
        } else {
            let index = rand::rng().random_range(0..holding.len());
            let (stream, id) = holding[index].clone();
            let sent = now_ms();
            tried(&recorded, &id, sent);
            let Ok(response) = client
                .delete(format!(
                    "{base}/streaming?account={account}&streamId={stream}"
                ))
                .send()
                .await
            else {
                continue;
            };
            let status = response.status().as_u16();
            let mut recorded = recorded.lock().unwrap();
            *recorded.answers.entry(status).or_default() += 1;
            if status == 204 {
                holding.remove(index);
                let index = recorded.by_id[&id];
                recorded.admissions[index].ended_sent_ms.get_or_insert(sent);
            } else if status == 404 {
                holding.remove(index);
            }
        }
        let pause = Duration::from_millis(rand::rng().random_range(5..20));
        tokio::time::sleep(pause).await;
    }
}

/// Kicks a random acknowledged, not yet ended session every 150 ms, through the sidecars'
/// admin listeners `admins`.
async fn kicker(
    admins: Vec<String>,
    recorded: Shared,
    stop: CancellationToken,
    alive: Arc<Mutex<Vec<bool>>>,
) {
    let client = Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    while !stop.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let target = {
            let recorded = recorded.lock().unwrap();
            let open: Vec<&Admission> = recorded
                .admissions
                .iter()
                .filter(|a| a.ended_sent_ms.is_none())
                .collect();
            if open.is_empty() {
                continue;
            }
            open[rand::rng().random_range(0..open.len())].id.clone()
        };
        let live: Vec<usize> = (0..admins.len())
            .filter(|i| alive.lock().unwrap()[*i])
            .collect();
        let admin = &admins[live[rand::rng().random_range(0..live.len())]];
        let sent = now_ms();
        tried(&recorded, &target, sent);
        let Ok(response) = client
            .delete(format!("{admin}/v1/sessions/{target}"))
            .send()
            .await
        else {
            continue;
        };
        if response.status() == 204 {
            let mut recorded = recorded.lock().unwrap();
            let index = recorded.by_id[&target];
            recorded.admissions[index].ended_sent_ms.get_or_insert(sent);
        }
    }
}

/// Notes that an end or kick of `id` is being sent at `sent`.
fn tried(recorded: &Shared, id: &str, sent: i64) {
    let mut recorded = recorded.lock().unwrap();
    let index = recorded.by_id[id];
    recorded.admissions[index].end_tried_ms.get_or_insert(sent);
}

/// The store's final word on every admission and the ids it holds per account, read through
/// a sidecar's admin listener `admin`; `None` while the sidecar answers 503.
async fn observe(
    client: &Client,
    admin: &str,
    admissions: &[Admission],
    accounts: &[String],
) -> Option<History> {
    let mut finals = HashMap::new();
    for admission in admissions {
        let response = client
            .get(format!("{admin}/v1/sessions/{}", admission.id))
            .send()
            .await
            .ok()?;
        let (status, body) = json(response).await;
        let fin = match status {
            200 if body["state"] == "active" => Final::Active,
            200 => Final::Cut {
                at_ms: millis(body["expiresAt"].as_str().unwrap()),
            },
            404 => Final::Absent,
            503 => return None,
            other => panic!("GET session: {other} {body}"),
        };
        finals.insert(admission.id.clone(), fin);
    }
    let mut held_at_end = HashMap::new();
    for account in accounts {
        let (status, body) = json(
            client
                .get(format!("{admin}/v1/accounts/{account}/sessions"))
                .send()
                .await
                .ok()?,
        )
        .await;
        match status {
            200 => {}
            503 => return None,
            other => panic!("listing sessions: {other} {body}"),
        }
        let ids = body["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sessionId"].as_str().unwrap().to_string())
            .collect();
        held_at_end.insert(account.clone(), ids);
    }
    Some(History {
        admissions: admissions.to_vec(),
        finals,
        held_at_end,
    })
}

/// One line of the result table.
#[derive(Debug)]
struct Outcome {
    fault: Fault,
    admitted: usize,
    degraded: usize,
    answers: Vec<(u16, usize)>,
    violations: Vec<Violation>,
    recovery: Duration,
    settled: Duration,
    history: Option<History>,
}

struct Rig {
    toxiproxy: Toxiproxy,
    redis: OwnRedis,
    sidecars: Vec<Option<SidecarProcess>>,
    bases: Vec<String>,
    /// The sidecars' admin listeners.
    admins: Vec<String>,
    pids: Vec<u32>,
    alive: Arc<Mutex<Vec<bool>>>,
}

impl Rig {
    async fn inject(&mut self, fault: Fault) {
        let proxies = (0..SIDECARS).map(|i| format!("redis-{i}"));
        match fault {
            Fault::Latency => {
                for p in proxies {
                    let attributes = json!({"latency": 300, "jitter": 0});
                    self.toxiproxy.add_toxic(&p, "latency", attributes).await;
                }
            }
            Fault::Timeout => {
                for p in proxies {
                    let attributes = json!({"timeout": 1500});
                    self.toxiproxy.add_toxic(&p, "timeout", attributes).await;
                }
            }
            Fault::Reset => {
                for p in proxies {
                    let attributes = json!({"timeout": 0});
                    self.toxiproxy.add_toxic(&p, "reset_peer", attributes).await;
                }
            }
            Fault::PartitionOne => self.toxiproxy.set_enabled("redis-0", false).await,
            Fault::RedisPaused => self.redis.pause(),
            Fault::RedisRestart => self.redis.stop(),
            Fault::SidecarKilled => {
                let last = SIDECARS - 1;
                self.alive.lock().unwrap()[last] = false;
                // SIGKILL: nothing is flushed or revoked.
                let mut sidecar = self.sidecars[last].take().unwrap();
                sidecar.child.kill().unwrap();
                sidecar.child.wait().unwrap();
            }
        }
    }

    async fn heal(&mut self, fault: Fault) {
        let proxies = (0..SIDECARS).map(|i| format!("redis-{i}"));
        match fault {
            Fault::Latency => {
                for p in proxies {
                    self.toxiproxy.remove_toxic(&p, "latency").await;
                }
            }
            Fault::Timeout => {
                for p in proxies {
                    self.toxiproxy.remove_toxic(&p, "timeout").await;
                }
            }
            Fault::Reset => {
                for p in proxies {
                    self.toxiproxy.remove_toxic(&p, "reset_peer").await;
                }
            }
            Fault::PartitionOne => self.toxiproxy.set_enabled("redis-0", true).await,
            Fault::RedisPaused => self.redis.resume(),
            Fault::RedisRestart => self.redis.restart(),
            Fault::SidecarKilled => {}
        }
    }

    fn live_bases(&self) -> Vec<String> {
        let alive = self.alive.lock().unwrap().clone();
        self.bases
            .iter()
            .zip(alive)
            .filter(|(_, a)| *a)
            .map(|(b, _)| b.clone())
            .collect()
    }

    /// Until every live sidecar is ready and admits a fresh account from the store.
    async fn wait_recovered(&self, client: &Client, tag: &str) {
        for base in self.live_bases() {
            eventually("the sidecar admits from the store again", async || {
                let Ok(response) = client
                    .put(format!(
                        "{base}/streaming?account=probe-{tag}-{}&streamId=p",
                        rand::random::<u32>()
                    ))
                    .send()
                    .await
                else {
                    return false;
                };
                let degraded = response.headers().contains_key("x-streamgate-degraded");
                response.status() == 201 && !degraded
            })
            .await;
            eventually("the sidecar is ready", async || {
                client
                    .get(format!("{base}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            })
            .await;
        }
    }

    async fn run(&mut self, fault: Fault, client: &Client, run: &str) -> Outcome {
        let recorded: Shared = Arc::default();
        let stop = CancellationToken::new();
        let accounts: Vec<String> = (0..ACCOUNTS_PER_FAULT)
            .map(|a| format!("{fault:?}-{run}-{a}").to_lowercase())
            .collect();
        let mut tasks = Vec::new();
        for (a, account) in accounts.iter().enumerate() {
            // Two viewers per account, each on two sidecars: concurrent opens of one account
            // from several sidecars.
            for w in 0..2 {
                let bases: Vec<(usize, String)> = (0..2)
                    .map(|k| (a + w + k) % SIDECARS)
                    .map(|i| (i, self.bases[i].clone()))
                    .collect();
                tasks.push(tokio::spawn(viewer(
                    bases,
                    account.clone(),
                    a * 2 + w,
                    recorded.clone(),
                    stop.clone(),
                    self.alive.clone(),
                )));
            }
        }
        tasks.push(tokio::spawn(kicker(
            self.admins.clone(),
            recorded.clone(),
            stop.clone(),
            self.alive.clone(),
        )));
        tokio::time::sleep(Duration::from_millis(700)).await;
        self.inject(fault).await;
        tokio::time::sleep(FAULT).await;
        self.heal(fault).await;
        let healed = Instant::now();
        self.wait_recovered(client, run).await;
        let recovery = healed.elapsed();
        // A little load after recovery, then stop.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.cancel();
        for task in tasks {
            task.await.unwrap();
        }
        let (admissions, answers) = {
            let recorded = recorded.lock().unwrap();
            let mut answers: Vec<(u16, usize)> =
                recorded.answers.iter().map(|(s, n)| (*s, *n)).collect();
            answers.sort();
            (recorded.admissions.clone(), answers)
        };
        // Degraded admissions are written back and abandoned opens discarded in the
        // background: the checker is asked again until it passes or ten seconds went by.
        let alive = self.alive.lock().unwrap().clone();
        let admin = self.admins[alive.iter().position(|a| *a).unwrap()].clone();
        let settling = Instant::now();
        let (violations, history) = loop {
            let Some(history) = observe(client, &admin, &admissions, &accounts).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let violations = history::check(&history, LIMIT);
            if violations.is_empty() || settling.elapsed() > Duration::from_secs(10) {
                break (violations, history);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        Outcome {
            fault,
            admitted: admissions.len(),
            degraded: admissions.iter().filter(|a| a.degraded).count(),
            answers,
            violations,
            recovery,
            settled: settling.elapsed(),
            history: Some(history),
        }
    }
}

/// Toxiproxy, Redis and three sidecars through it.
async fn rig() -> (Rig, tempfile::TempDir) {
    let toxiproxy = Toxiproxy::start().await;
    let redis = OwnRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        default_policy("  maxStreamsPerAccount: 3\n  failurePolicy: Open"),
    )
    .unwrap();
    let mut sidecars = Vec::new();
    for i in 0..SIDECARS {
        let port = toxiproxy
            .proxy(&format!("redis-{i}"), &format!("127.0.0.1:{}", redis.port))
            .await;
        let store = format!("redis://127.0.0.1:{port}");
        let sidecar = SidecarProcess::start(&[
            "--store",
            &store,
            "--policy-file",
            &policy.display().to_string(),
        ])
        .await;
        sidecar.wait_ready().await;
        sidecars.push(Some(sidecar));
    }
    let bases: Vec<String> = sidecars
        .iter()
        .map(|s| s.as_ref().unwrap().base.clone())
        .collect();
    let admins: Vec<String> = sidecars
        .iter()
        .map(|s| s.as_ref().unwrap().admin.clone())
        .collect();
    let pids: Vec<u32> = sidecars
        .iter()
        .map(|s| s.as_ref().unwrap().child.id())
        .collect();
    let rig = Rig {
        toxiproxy,
        redis,
        sidecars,
        bases,
        admins,
        pids,
        alive: Arc::new(Mutex::new(vec![true; SIDECARS])),
    };
    (rig, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_every_store_fault_the_limit_holds_nothing_is_lost_and_sidecars_recover() {
    run_faults(&FAULTS).await;
}

async fn run_faults(faults: &[Fault]) {
    let (mut rig, _dir) = rig().await;
    let client = Client::new();
    let run = format!("{:08x}", rand::random::<u32>());
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for fault in faults {
        outcomes.push(rig.run(*fault, &client, &run).await);
    }
    // Recovery without restarts: the surviving sidecars are the processes started above.
    for (i, sidecar) in rig.sidecars.iter_mut().enumerate() {
        if let Some(sidecar) = sidecar {
            assert_eq!(sidecar.child.id(), rig.pids[i]);
            assert!(
                sidecar.child.try_wait().unwrap().is_none(),
                "sidecar {i} exited"
            );
        }
    }
    eprintln!("fault suite ({:?} in all):", started.elapsed());
    for o in &outcomes {
        eprintln!(
            "  {:?}: {} admitted ({} degraded), answers {:?}, recovered {:?} after the fault ended, \
             checker settled in {:?}, violations {:?}",
            o.fault, o.admitted, o.degraded, o.answers, o.recovery, o.settled, o.violations
        );
    }
    for o in &outcomes {
        for v in &o.violations {
            if let Violation::Phantom { id, .. } = v {
                let body = client
                    .get(format!("{}/v1/sessions/{id}", rig.admins[1]))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                eprintln!("  {:?}: {v:?}: {body}", o.fault);
            }
            if let Violation::Lost { id, .. } | Violation::EndNotApplied { id, .. } = v {
                eprintln!(
                    "  {:?}: {v:?}: {:?}",
                    o.fault,
                    o.history
                        .as_ref()
                        .map(|h| h.admissions.iter().find(|a| a.id == *id))
                );
            }
        }
    }
    for o in &outcomes {
        assert!(o.admitted > 0, "{:?}: nothing admitted", o.fault);
        assert_eq!(o.violations, Vec::<Violation>::new(), "{:?}", o.fault);
    }
}
