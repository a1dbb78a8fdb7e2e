//! Shared helpers: an in-process sidecar on a loopback port, on a clock the test controls.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;

use reqwest::{Client, Method, Response};
use serde_json::Value;
use streamgate_sidecar::clock::{Clock, ManualClock};
use streamgate_sidecar::policy::PolicySet;
use streamgate_sidecar::server::Sidecar;
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
    pub client: Client,
    pub clock: ManualClock,
    pub store: MemoryStore,
    pub sidecar: Sidecar,
}

impl TestSidecar {
    /// Starts a sidecar on the memory store with a manual clock.
    pub async fn start(policy_yaml: &str) -> Self {
        let policies = PolicySet::from_yaml(policy_yaml, "test.yaml", "default").unwrap();
        let clock = ManualClock::new(1_800_000_000_000);
        let store = MemoryStore::with_clock(Arc::new(clock.clone()) as Arc<dyn Clock>);
        let sidecar = Sidecar::with_store(Arc::new(store.clone()), policies);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let serving = sidecar.clone();
        tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });
        Self {
            base,
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
        self.request(Method::GET, "/metrics")
            .await
            .text()
            .await
            .unwrap()
    }
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

/// The value of an un-labelled sample (or a sample with exactly these labels) in metrics text.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == name_and_labels).then(|| value.parse().ok())?
    })
}

/// The `streamgate-sidecar` binary built for these tests.
pub const SIDECAR_BIN: &str = env!("CARGO_BIN_EXE_streamgate-sidecar");

/// A free loopback port (free when asked; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `streamgate-sidecar` process, killed on drop.
pub struct SidecarProcess {
    pub child: std::process::Child,
    pub base: String,
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SidecarProcess {
    /// Starts the binary on a free port with `args`, and waits until it serves `/healthz`.
    pub async fn start(args: &[&str]) -> Self {
        let port = free_port();
        let child = std::process::Command::new(SIDECAR_BIN)
            .env("STREAMGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let process = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let client = Client::new();
        for _ in 0..300 {
            if let Ok(r) = client.get(format!("{}/healthz", process.base)).send().await
                && r.status() == 200
            {
                return process;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("sidecar did not start on {}", process.base);
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
