//! Redis Sentinel with real `redis-sentinel` processes of the test's own (a master, two
//! replicas, three sentinels on loopback): sidecar processes find the master through the
//! sentinels and follow it through a failover without restarting; with
//! `--store-wait-replicas 1` no acknowledged admission is lost, and without it an asynchronous
//! failover loses exactly the admissions the replicas had not received (the documented bound).

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{SidecarProcess, default_policy, eventually, json};
use futures::future::join_all;
use reqwest::Client;

const MASTER: &str = "sg";

/// A free loopback port (redis-server cannot be handed a bound socket; a clash makes the
/// server exit, and the group is started again).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP relay on loopback to `target` that the test can cut: it closes every connection it
/// carries and refuses new ones, as a partition would.
struct Relay {
    port: u16,
    cut: tokio_util::sync::CancellationToken,
}

impl Relay {
    fn start(target: u16) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = tokio_util::sync::CancellationToken::new();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let cutting = cut.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if cutting.is_cancelled() {
                    continue; // dropped: closed at once
                }
                let cutting = cutting.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    // As Redis does: no Nagle delay on the replication stream.
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    tokio::select! {
                        () = cutting.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self { port, cut }
    }
}

/// One `redis-server` or `redis-sentinel` process.
struct Server {
    port: u16,
    child: Option<Child>,
}

impl Server {
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?;
        let mut connection =
            client.get_connection_with_timeout(std::time::Duration::from_secs(1))?;
        connection.set_read_timeout(Some(Duration::from_secs(2)))?;
        cmd.query(&mut connection)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A master, two replicas (replicating through a [`Relay`]) and three sentinels (quorum 2,
/// down after 1 s).
struct SentinelGroup {
    _dir: tempfile::TempDir,
    /// The replicas' way to the first master.
    replication: Relay,
    /// Index 0 is the first master.
    servers: Vec<Server>,
    sentinels: Vec<Server>,
}

impl SentinelGroup {
    fn start() -> Self {
        for _ in 0..5 {
            if let Some(group) = Self::try_start() {
                return group;
            }
        }
        panic!("the Sentinel group did not start (./scripts/test installs redis-sentinel)");
    }

    fn try_start() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mut servers = Vec::new();
        let master_port = free_port();
        let replication = Relay::start(master_port);
        for i in 0..3 {
            let port = if i == 0 { master_port } else { free_port() };
            let data = dir.path().join(format!("redis-{port}"));
            std::fs::create_dir_all(&data).unwrap();
            let mut command = Command::new("redis-server");
            command
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .arg("--dir")
                .arg(&data)
                .args(["--save", "", "--appendonly", "no"]);
            if i > 0 {
                command.args(["--replicaof", "127.0.0.1", &replication.port.to_string()]);
            }
            let child = command
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (./scripts/test installs it)");
            servers.push(Server {
                port,
                child: Some(child),
            });
        }
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            // failover-timeout is long because sentinels "fix" replicas that replicate from
            // another address than the master's (the relay) once it has passed.
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 60000\n\
                     sentinel parallel-syncs {MASTER} 2\n",
                    dir.path().display()
                ),
            )
            .unwrap();
            let child = Command::new("redis-sentinel")
                .arg(&conf)
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-sentinel must be installed (./scripts/test installs it)");
            sentinels.push(Server {
                port,
                child: Some(child),
            });
        }
        let group = Self {
            _dir: dir,
            replication,
            servers,
            sentinels,
        };
        // Ready when every sentinel knows both replicas and the two other sentinels (they
        // find each other through the master's hello channel).
        let ready = (0..400).any(|_| {
            let all_known = group.sentinels.iter().all(|s| {
                let replicas: redis::RedisResult<Vec<redis::Value>> =
                    s.query(redis::cmd("SENTINEL").arg("replicas").arg(MASTER));
                let peers: redis::RedisResult<Vec<redis::Value>> =
                    s.query(redis::cmd("SENTINEL").arg("sentinels").arg(MASTER));
                matches!((replicas, peers), (Ok(r), Ok(p)) if r.len() == 2 && p.len() == 2)
            });
            let replicated = group.servers[1..].iter().all(|r| {
                r.query::<String>(redis::cmd("INFO").arg("replication"))
                    .is_ok_and(|info| info.contains("master_link_status:up"))
            });
            if all_known && replicated {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
            false
        });
        ready.then_some(group)
    }

    /// `redis-sentinel://sg@127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3`
    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis-sentinel://{MASTER}@{}", hosts.join(","))
    }

    /// The master's port according to the first sentinel.
    fn master_port(&self) -> u16 {
        let (_, port): (String, u16) = self.sentinels[0]
            .query(
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(MASTER),
            )
            .unwrap();
        port
    }

    /// Waits until every sentinel names a master other than `old_port` and that server
    /// answers as a master; returns its port.
    async fn wait_failover(&self, old_port: u16) -> u16 {
        for _ in 0..600 {
            let named: Vec<Option<u16>> = self
                .sentinels
                .iter()
                .map(|s| {
                    s.query::<(String, u16)>(
                        redis::cmd("SENTINEL")
                            .arg("get-master-addr-by-name")
                            .arg(MASTER),
                    )
                    .ok()
                    .map(|(_, port)| port)
                })
                .collect();
            if let Some(Some(port)) = named.first()
                && *port != old_port
                && named.iter().all(|n| *n == Some(*port))
                && let Some(server) = self.servers.iter().find(|s| s.port == *port)
                && server
                    .query::<String>(redis::cmd("INFO").arg("replication"))
                    .is_ok_and(|info| info.contains("role:master"))
            {
                return *port;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the sentinels did not fail over from port {old_port}");
    }

    fn server(&mut self, port: u16) -> &mut Server {
        self.servers.iter_mut().find(|s| s.port == port).unwrap()
    }
}

fn policy_file(dir: &Path) -> String {
    let path = dir.join("policy.yaml");
    // Closed: while the store cannot be asked nobody is admitted, so every 201 is in Redis.
    std::fs::write(
        &path,
        default_policy("  maxStreamsPerAccount: 3\n  failurePolicy: Closed"),
    )
    .unwrap();
    path.display().to_string()
}

async fn sidecar(store: &str, policy: &str, wait_replicas: u32) -> SidecarProcess {
    let sidecar = SidecarProcess::start_logging(
        &[
            "--store",
            store,
            "--policy-file",
            policy,
            "--store-wait-replicas",
            &wait_replicas.to_string(),
        ],
        "warn,streamgate_sidecar::server=info,streamgate_sidecar::store=info,streamgate_store=info",
    )
    .await;
    sidecar.wait_ready().await;
    sidecar
}

/// `PUT /streaming`: status, session id when admitted, Retry-After.
async fn open(client: &Client, base: &str, account: &str) -> (u16, Option<String>, Option<String>) {
    let response = match client
        .put(format!("{base}/streaming?account={account}&streamId=s"))
        .send()
        .await
    {
        Ok(response) => response,
        Err(_) => return (0, None, None),
    };
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let (status, body) = json(response).await;
    let id = body["sessionId"].as_str().map(str::to_string);
    (status, id, retry_after)
}

/// The session ids the store holds for `account`, read through a sidecar's admin listener
/// `admin` (asked again while the answer is 503: slow is not down).
async fn held(client: &Client, admin: &str, account: &str) -> HashSet<String> {
    let body = common::eventually_value(async || {
        let (status, body) = json(
            client
                .get(format!("{admin}/v1/accounts/{account}/sessions"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        match status {
            200 => Some(body),
            503 => None,
            other => panic!("listing sessions: {other} {body}"),
        }
    })
    .await;
    body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sessionId"].as_str().unwrap().to_string())
        .collect()
}

/// Of the acknowledged `(account, id)` admissions, those the store no longer holds.
async fn lost(client: &Client, admin: &str, acknowledged: &[(String, String)]) -> usize {
    use futures::StreamExt;
    futures::stream::iter(acknowledged)
        .map(|(account, id)| async move {
            usize::from(!held(client, admin, account).await.contains(id))
        })
        .buffer_unordered(8)
        .fold(0, async |lost, one| lost + one)
        .await
}

/// The number after `field` in an INFO reply.
fn offset(info: &str, field: &str) -> i64 {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(field))
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1)
}

/// Median of `samples` (ms).
fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_wait_replicas_a_failover_under_load_loses_no_admission_and_sidecars_follow_the_master()
 {
    let mut group = SentinelGroup::start();
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path());
    let url = group.url();
    let fleet = [
        sidecar(&url, &policy, 1).await,
        sidecar(&url, &policy, 1).await,
    ];
    let plain = sidecar(&url, &policy, 0).await;
    let pids: Vec<u32> = fleet.iter().map(|s| s.child.id()).collect();
    let client = Client::new();
    let run = format!("{:08x}", rand::random::<u32>());

    // The cost of WAIT: the same sequential opens with and without it, in this run.
    let latency = |wait: bool| {
        let base = if wait {
            fleet[0].base.clone()
        } else {
            plain.base.clone()
        };
        let client = client.clone();
        let run = run.clone();
        async move {
            let mut samples = Vec::new();
            // A call slower than the store timeout is answered 503 (slow is not down): not a
            // sample, but there must not be many.
            for i in 0..400 {
                let started = Instant::now();
                let (status, _, _) = open(&client, &base, &format!("cost-{run}-{wait}-{i}")).await;
                match status {
                    201 => samples.push(started.elapsed().as_secs_f64() * 1000.0),
                    503 => {}
                    other => panic!("open answered {other}"),
                }
                if samples.len() == 200 {
                    return median(samples);
                }
            }
            panic!("fewer than 200 of 400 opens admitted")
        }
    };
    let without_wait = latency(false).await;
    let with_wait = latency(true).await;
    eprintln!(
        "open latency median: no WAIT {without_wait:.2} ms, --store-wait-replicas 1 {with_wait:.2} ms (x{:.2})",
        with_wait / without_wait
    );
    drop(plain);

    // Load: eight workers opening fresh accounts on both sidecars; every 201 is recorded.
    let acknowledged: Arc<Mutex<Vec<(String, String, Instant)>>> = Arc::default();
    let failures: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let workers = (0..8).map(|w| {
        let base = fleet[w % fleet.len()].base.clone();
        let (client, acknowledged, failures, stop, run) = (
            client.clone(),
            acknowledged.clone(),
            failures.clone(),
            stop.clone(),
            run.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                i += 1;
                let account = format!("load-{run}-{w}-{i}");
                match open(&client, &base, &account).await {
                    (201, Some(id), _) => {
                        acknowledged
                            .lock()
                            .unwrap()
                            .push((account, id, Instant::now()));
                    }
                    (503, None, Some(_)) | (0, _, _) => {
                        failures.lock().unwrap().push(Instant::now());
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("unexpected answer {other:?}"),
                }
            }
        })
    });
    let workers: Vec<_> = workers.collect();
    let old_master = group.master_port();
    eventually("admissions under load", async || {
        acknowledged.lock().unwrap().len() >= 200
    })
    .await;
    let killed = Instant::now();
    group.server(old_master).kill();
    let new_master = group.wait_failover(old_master).await;
    let failed_over = killed.elapsed();
    // Recovered: admissions again after the failover, from both sidecars.
    eventually("admissions after the failover", async || {
        acknowledged
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, at)| *at > killed + failed_over)
            .count()
            >= 100
    })
    .await;
    stop.cancel();
    join_all(workers).await;
    let acknowledged = acknowledged.lock().unwrap().clone();
    let last_failure = failures.lock().unwrap().iter().max().copied();
    let first_after = acknowledged
        .iter()
        .map(|(_, _, at)| *at)
        .filter(|at| last_failure.is_some_and(|f| *at > f))
        .min();
    let recovered = first_after.map(|at| at.saturating_duration_since(killed));

    // No restart: the same processes, ready, subscribed on the new master.
    for (sidecar, pid) in fleet.iter().zip(&pids) {
        assert_eq!(sidecar.child.id(), *pid);
        sidecar.wait_ready().await;
        let master = format!("127.0.0.1:{new_master}");
        eventually(
            "the revocation subscription is on the new master",
            async || {
                sidecar.log_text().lines().any(|line| {
                    line.contains("subscribed to revocations") && line.contains(&master)
                })
            },
        )
        .await;
    }
    let pairs: Vec<(String, String)> = acknowledged
        .iter()
        .map(|(a, id, _)| (a.clone(), id.clone()))
        .collect();
    let lost = lost(&client, &fleet[1].admin, &pairs).await;
    eprintln!(
        "Sentinel failover with --store-wait-replicas 1: {} acknowledged, {lost} lost, \
         {} failed calls, sentinels failed over in {failed_over:?}, admissions recovered {recovered:?} after kill -9",
        pairs.len(),
        failures.lock().unwrap().len()
    );
    assert_eq!(lost, 0, "acknowledged admissions lost in the failover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_wait_a_failover_loses_what_replicas_lacked_with_wait_such_opens_are_refused_503() {
    let mut group = SentinelGroup::start();
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path());
    let url = group.url();
    let waiting = sidecar(&url, &policy, 1).await;
    let plain = sidecar(&url, &policy, 0).await;
    let client = Client::new();
    let run = format!("{:08x}", rand::random::<u32>());

    // Before: both kinds of admission reach the replicas.
    let mut before = Vec::new();
    for (i, base) in [&waiting.base, &plain.base].into_iter().enumerate() {
        let account = format!("before-{run}-{i}");
        let (status, id, _) = open(&client, base, &account).await;
        assert_eq!(status, 201);
        before.push((account, id.unwrap()));
    }
    // Both reached the replicas.
    let old_master = group.master_port();
    let master_offset = |group: &SentinelGroup| {
        let info: String = group
            .servers
            .iter()
            .find(|s| s.port == old_master)
            .unwrap()
            .query(redis::cmd("INFO").arg("replication"))
            .unwrap();
        offset(&info, "master_repl_offset:")
    };
    eventually("the replicas have what the master has", async || {
        let wanted = master_offset(&group);
        group
            .servers
            .iter()
            .filter(|s| s.port != old_master)
            .all(|r| {
                r.query::<String>(redis::cmd("INFO").arg("replication"))
                    .is_ok_and(|info| offset(&info, "slave_repl_offset:") >= wanted)
            })
    })
    .await;
    // Replication cut (a partition between the master and its replicas): what the master
    // acknowledges from now on exists on the master alone, as with replicas lagging behind an
    // asynchronous master.
    group.replication.cut.cancel();
    const DURING: usize = 20;
    let mut unreplicated = Vec::new();
    for i in 0..DURING {
        // With WAIT: refused (not enough replicas acknowledged), with Retry-After.
        let account = format!("during-wait-{run}-{i}");
        let (status, id, retry_after) = open(&client, &waiting.base, &account).await;
        assert_eq!(
            (status, id.is_none(), retry_after.is_some()),
            (503, true, true)
        );
        // Without WAIT: acknowledged.
        let account = format!("during-plain-{run}-{i}");
        let (status, id, _) = open(&client, &plain.base, &account).await;
        assert_eq!(status, 201);
        unreplicated.push((account, id.unwrap()));
    }
    // The refused opens took no slot: their sessions are discarded from the master.
    let waiting_accounts: Vec<String> = (0..DURING)
        .map(|i| format!("during-wait-{run}-{i}"))
        .collect();
    eventually("the refused opens' sessions are discarded", async || {
        for account in &waiting_accounts {
            if !held(&client, &plain.admin, account).await.is_empty() {
                return false;
            }
        }
        true
    })
    .await;

    // The master dies; the replicas come back and one is promoted.
    let killed = Instant::now();
    group.server(old_master).kill();
    let _new_master = group.wait_failover(old_master).await;
    let failed_over = killed.elapsed();
    for sidecar in [&waiting, &plain] {
        let base = sidecar.base.clone();
        eventually("admissions after the failover", async || {
            open(
                &client,
                &base,
                &format!("after-{run}-{}", rand::random::<u32>()),
            )
            .await
            .0 == 201
        })
        .await;
    }
    let recovered = killed.elapsed();
    let lost_before = lost(&client, &plain.admin, &before).await;
    let lost_unreplicated = lost(&client, &plain.admin, &unreplicated).await;
    eprintln!(
        "async failover: {lost_unreplicated} of {DURING} admissions acknowledged without WAIT while the \
         replicas lagged were lost, {lost_before} of the replicated ones; with WAIT all {DURING} \
         were answered 503; failover {failed_over:?}, both sidecars admitting again {recovered:?} after kill -9"
    );
    assert_eq!(lost_before, 0, "replicated admissions survive");
    assert_eq!(
        lost_unreplicated, DURING,
        "what only the old master had is gone: the bound is what was acknowledged during the lag"
    );
}
