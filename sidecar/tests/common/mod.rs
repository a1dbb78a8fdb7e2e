//! Shared helpers: an in-process sidecar on a loopback port, on a clock the test controls.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;

use reqwest::{Client, Method, Response};
use serde_json::Value;
use streamgate_sidecar::clock::{Clock, ManualClock};
use streamgate_sidecar::policy::PolicySet;
use streamgate_sidecar::server::{Listeners, Sidecar};
use streamgate_sidecar::store::MemoryStore;

/// A policy file with the given spec lines for the default policy.
pub fn default_policy(spec: &str) -> String {
    format!(
        "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata:\n  name: default\nspec:\n{spec}\n"
    )
}

/// A running in-process sidecar.
pub struct TestSidecar {
    pub base: String,
    /// The admin listener (sessions of any account, metrics).
    pub admin: String,
    pub client: Client,
    pub clock: ManualClock,
    pub store: MemoryStore,
    pub sidecar: Sidecar,
}

impl TestSidecar {
    /// Starts a sidecar on the memory store with a manual clock.
    pub async fn start(policy_yaml: &str) -> Self {
        Self::start_with(policy_yaml, None).await
    }

    /// Starts a sidecar on the memory store with a manual clock, with the enforcing proxy in
    /// front of `upstream` when given.
    pub async fn start_with(policy_yaml: &str, upstream: Option<&str>) -> Self {
        let policies = PolicySet::from_yaml(policy_yaml, "test.yaml", "default").unwrap();
        let clock = ManualClock::new(1_800_000_000_000);
        let store = MemoryStore::with_clock(Arc::new(clock.clone()) as Arc<dyn Clock>);
        let mut sidecar = Sidecar::with_store(Arc::new(store.clone()), policies);
        if let Some(upstream) = upstream {
            sidecar = sidecar.with_upstream(upstream.parse().unwrap());
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = format!("http://{}", admin_listener.local_addr().unwrap());
        let listeners = Listeners {
            viewer: listener,
            admin: Some(admin_listener),
            metrics: None,
        };
        let serving = sidecar.clone();
        tokio::spawn(async move { serving.serve_on(listeners, std::future::pending()).await });
        Self {
            base,
            admin,
            client: Client::new(),
            clock,
            store,
            sidecar,
        }
    }

    pub async fn request(&self, method: Method, path_and_query: &str) -> Response {
        self.client
            .request(method, format!("{}{}", self.base, path_and_query))
            .send()
            .await
            .unwrap()
    }

    /// A request to the admin listener.
    pub async fn admin_request(&self, method: Method, path_and_query: &str) -> Response {
        self.client
            .request(method, format!("{}{}", self.admin, path_and_query))
            .send()
            .await
            .unwrap()
    }

    /// `METHOD /streaming?account=A&streamId=S`, returning status and JSON body (Null if empty).
    pub async fn streaming(&self, method: Method, account: &str, stream: &str) -> (u16, Value) {
        let query = form_query(&[("account", account), ("streamId", stream)]);
        json(self.request(method, &format!("/streaming?{query}")).await).await
    }

    pub async fn open(&self, account: &str, stream: &str) -> (u16, Value) {
        self.streaming(Method::PUT, account, stream).await
    }

    pub async fn heartbeat(&self, account: &str, stream: &str) -> (u16, Value) {
        self.streaming(Method::GET, account, stream).await
    }

    pub async fn end(&self, account: &str, stream: &str) -> (u16, Value) {
        self.streaming(Method::DELETE, account, stream).await
    }

    pub async fn metrics(&self) -> String {
        self.admin_request(Method::GET, "/metrics")
            .await
            .text()
            .await
            .unwrap()
    }
}

/// A sidecar served in the background on loopback ports the kernel picked.
#[derive(Clone, Debug)]
pub struct Served {
    /// The viewer port.
    pub base: String,
    /// The admin listener (sessions of any account, metrics).
    pub admin: String,
}

/// Serves `sidecar` in the background, viewer port and admin listener, until the test ends.
pub async fn serve_in_background(sidecar: Sidecar) -> Served {
    let viewer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let served = Served {
        base: format!("http://{}", viewer.local_addr().unwrap()),
        admin: format!("http://{}", admin.local_addr().unwrap()),
    };
    let listeners = Listeners {
        viewer,
        admin: Some(admin),
        metrics: None,
    };
    tokio::spawn(async move { sidecar.serve_on(listeners, std::future::pending()).await });
    served
}

/// Percent-encodes a query.
pub fn form_query(pairs: &[(&str, &str)]) -> String {
    let mut q = String::new();
    for (k, v) in pairs {
        if !q.is_empty() {
            q.push('&');
        }
        q.push_str(k);
        q.push('=');
        q.push_str(&percent_encode(v));
    }
    q
}

fn percent_encode(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub async fn json(response: Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };
    (status, body)
}

/// The sum of the samples of `name` whose labels include every `label="value"` in `labels`.
pub fn metric_with(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            series.split_once('{').is_some_and(|(n, rest)| {
                n == name && labels.iter().all(|label| rest.contains(label))
            })
        })
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

/// The value of an un-labelled sample (or a sample with exactly these labels) in metrics text.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == name_and_labels).then(|| value.parse().ok())?
    })
}

/// The `streamgate-sidecar` binary built for these tests.
pub const SIDECAR_BIN: &str = env!("CARGO_BIN_EXE_streamgate-sidecar");

/// A `streamgate-sidecar` process, killed on drop.
pub struct SidecarProcess {
    pub child: std::process::Child,
    /// The viewer port.
    pub base: String,
    /// The admin listener (sessions of any account, metrics).
    pub admin: String,
    /// The metrics listener.
    pub metrics: String,
    /// Every line it wrote to stdout (its log, JSON lines) so far.
    pub logs: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SidecarProcess {
    /// Starts the binary with `args` on ports the kernel picks (`--listen`, `--admin-listen` and
    /// `--metrics-listen` on `127.0.0.1:0`), and learns them from the sidecar's own start-up log
    /// lines, so no port is guessed.
    pub async fn start(args: &[&str]) -> Self {
        Self::start_logging(args, "warn,streamgate_sidecar::server=info").await
    }

    /// Starts the binary with `args` and `RUST_LOG=filter` (which must let the server's info
    /// lines through).
    pub async fn start_logging(args: &[&str], filter: &str) -> Self {
        Self::start_under(&[], args, filter).await
    }

    /// Starts the binary under `wrapper` (a command and its arguments that run the rest, such
    /// as `prlimit --nofile=1024 --`), with `args` and `RUST_LOG=filter`.
    pub async fn start_under(wrapper: &[&str], args: &[&str], filter: &str) -> Self {
        use std::io::BufRead;
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = std::process::Command::new(program);
                command.args(rest).arg(SIDECAR_BIN);
                command
            }
            None => std::process::Command::new(SIDECAR_BIN),
        };
        let mut child = command
            .env("STREAMGATE_LISTEN", "127.0.0.1:0")
            .env("STREAMGATE_ADMIN_LISTEN", "127.0.0.1:0")
            .env("STREAMGATE_METRICS_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", filter)
            .args(args)
            .args(["--log-format", "json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // (message, address) of each listener's start-up line.
        let (tx, rx) = std::sync::mpsc::channel::<(String, String)>();
        let logs: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let kept = logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                kept.lock().unwrap().push(line.clone());
                if let Ok(entry) = serde_json::from_str::<Value>(&line)
                    && let Some(listen) = entry["fields"]["listen"].as_str()
                {
                    let message = entry["fields"]["message"].as_str().unwrap_or_default();
                    let _ = tx.send((message.to_string(), listen.to_string()));
                }
            }
        });
        let listeners = tokio::task::spawn_blocking(move || {
            let mut found = std::collections::HashMap::new();
            while found.len() < 3 {
                let (message, listen) = rx
                    .recv_timeout(std::time::Duration::from_secs(30))
                    .expect("the sidecar logs the addresses it listens on");
                found.insert(message, format!("http://{listen}"));
            }
            found
        })
        .await
        .unwrap();
        Self {
            child,
            base: listeners["serving the session API"].clone(),
            admin: listeners["serving the admin API"].clone(),
            metrics: listeners["serving /metrics"].clone(),
            logs,
        }
    }

    /// Its log so far, one string.
    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Its resident memory in KiB (Linux).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        eventually("the sidecar is ready", async || {
            Client::new()
                .get(format!("{}/readyz", self.base))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
    }
}

/// What the recording upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path_and_query: String,
    pub headers: axum::http::HeaderMap,
}

/// A stand-in for the streaming container that records every request it gets and answers
/// `200 media` with a few hop-by-hop headers of its own (which the proxy must drop).
pub struct RecordingUpstream {
    pub url: String,
    pub seen: Arc<std::sync::Mutex<Vec<Recorded>>>,
}

impl RecordingUpstream {
    pub async fn start(base_path: &str) -> Self {
        let seen: Arc<std::sync::Mutex<Vec<Recorded>>> = Arc::default();
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(Recorded {
                    method: request.method().to_string(),
                    path_and_query: request
                        .uri()
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                    headers: request.headers().clone(),
                });
                (
                    [
                        ("connection", "x-upstream-internal"),
                        ("x-upstream-internal", "secret"),
                        ("proxy-connection", "keep-alive"),
                        ("x-media", "yes"),
                    ],
                    "media",
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}{base_path}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, seen }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }
}

/// A redis-server of the test's own, so it can be stopped and started again (an outage).
pub struct OwnRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    /// Extra `redis-server` arguments (e.g. `--maxmemory-policy allkeys-lru`).
    extra: Vec<String>,
}

impl OwnRedis {
    /// Starts a server with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        for _ in 0..5 {
            let mut redis = Self::unstarted();
            redis.extra = extra.iter().map(|a| a.to_string()).collect();
            if redis.try_start() {
                return redis;
            }
        }
        panic!("redis-server did not start (is it installed? ./scripts/test installs it)");
    }

    fn unstarted() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            extra: Vec::new(),
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT): it runs what was sent to it meanwhile.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let status = std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} redis-server");
    }

    /// A synchronous connection to the server, for inspecting it.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Starts a server on a free loopback port. redis-server cannot be handed a bound socket,
    /// so the port is picked, and picked again if another process took it meanwhile.
    pub fn start() -> Self {
        for _ in 0..5 {
            let mut redis = Self::unstarted();
            if redis.try_start() {
                return redis;
            }
        }
        panic!("redis-server did not start (is it installed? ./scripts/test installs it)");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and data directory. The append-only file keeps the data.
    pub fn restart(&mut self) {
        assert!(
            self.try_start(),
            "redis-server did not restart on {}",
            self.port
        );
    }

    fn try_start(&mut self) -> bool {
        let mut child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (./scripts/test installs it)");
        let client = redis::Client::open(self.url()).unwrap();
        for _ in 0..200 {
            if let Ok(Some(_)) = child.try_wait() {
                return false; // exited: the port was taken
            }
            if let Ok(mut c) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        let _ = child.kill();
        false
    }

    /// Stops the server (SIGTERM: the append-only file is complete) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // A paused server must not outlive a failed test frozen.
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The URL of the shared test Redis named by `name` (set by scripts/redis-up); fails the test
/// when it is missing.
pub fn redis_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests with ./scripts/test, which starts Redis (or eval \"$(scripts/redis-up)\")"
        )
    })
}

/// Polls `check` until it returns true, for up to twenty seconds.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..400 {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Polls `check` until it returns a value, for up to twenty seconds.
pub async fn eventually_value<T>(mut check: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..400 {
        if let Some(value) = check().await {
            return value;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for a value");
}

/// `METHOD base/streaming?account=A&streamId=S`.
pub async fn streaming_at(
    client: &Client,
    base: &str,
    method: Method,
    account: &str,
    stream: &str,
) -> (u16, Value) {
    let query = form_query(&[("account", account), ("streamId", stream)]);
    let response = client
        .request(method, format!("{base}/streaming?{query}"))
        .send()
        .await
        .unwrap();
    json(response).await
}

/// Sessions' lifetimes `[start, end)` in ms; the largest number alive at any instant (the
/// history checker of the race tests).
pub fn max_concurrent(intervals: &[(i64, i64)]) -> usize {
    let mut events: Vec<(i64, i32)> = Vec::new();
    for &(start, end) in intervals {
        events.push((start, 1));
        events.push((end, -1));
    }
    // At equal times an end comes before a start: the store cuts the victim, then admits.
    events.sort();
    let (mut alive, mut peak) = (0i32, 0i32);
    for (_, delta) in events {
        alive += delta;
        peak = peak.max(alive);
    }
    peak as usize
}

/// `prefix` made unique per run (accounts and keys of a shared Redis never collide).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// The demo origin served on a loopback port: its URL and the requests it counts.
pub async fn demo_origin() -> (String, streamgate_demo_origin::OriginStats) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stats = streamgate_demo_origin::OriginStats::default();
    let app = streamgate_demo_origin::router(stats.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, stats)
}

/// Holds a loopback address bound but not listening, so connections to it are refused and no
/// other process can take its port while the test runs (a port released after binding could be).
pub fn refusing_addr() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}
