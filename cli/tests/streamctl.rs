//! End-to-end tests of the `streamctl` binary against a sidecar started in this process.
//!
//! The machine running tests is noisy, so these assert outcomes and counts, never timings.

use std::process::Output;

use serde_json::Value;
use streamgate_sidecar::policy::PolicySet;
use streamgate_sidecar::server::{Listeners, Sidecar};
use tokio::net::TcpListener;

const REJECT_NEW_3: &str = "
apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata:
  name: default
spec:
  maxStreamsPerAccount: 3
  sessionTTLSeconds: 10
  heartbeatIntervalSeconds: 1
  onLimitExceeded: RejectNew
";

const EVICT_OLDEST_1: &str = "
apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata:
  name: default
spec:
  maxStreamsPerAccount: 1
  sessionTTLSeconds: 10
  heartbeatIntervalSeconds: 1
  onLimitExceeded: EvictOldest
";

/// Starts a sidecar on the embedded store with `policy` on a free loopback port; returns its URL.
async fn start_sidecar(policy: &str) -> String {
    start_sidecar_with_admin(policy).await.0
}

/// Starts a sidecar on the embedded store with `policy` on free loopback ports; returns the URLs
/// of its viewer port and of its admin listener.
async fn start_sidecar_with_admin(policy: &str) -> (String, String) {
    let set = PolicySet::from_yaml(policy, "test", "default").expect("the test policy is valid");
    let sidecar = Sidecar::in_memory(set);
    let viewer = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let urls = (
        format!("http://{}", viewer.local_addr().unwrap()),
        format!("http://{}", admin.local_addr().unwrap()),
    );
    let listeners = Listeners {
        viewer,
        admin: Some(admin),
        metrics: None,
    };
    tokio::spawn(async move { sidecar.serve_on(listeners, std::future::pending()).await });
    urls
}

async fn streamctl(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_streamctl"))
        .args(args)
        .output()
        .await
        .expect("streamctl runs")
}

/// Runs streamctl with `--output json`, expects success and returns the parsed document.
async fn streamctl_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let output = streamctl(&all).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "streamctl {all:?} failed: {stderr}"
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "streamctl {all:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn viewers_with<'a>(report: &'a Value, outcome: &str) -> Vec<&'a Value> {
    report["viewers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["outcome"] == outcome)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_five_viewers_of_an_account_limited_to_three() {
    let (url, admin) = start_sidecar_with_admin(REJECT_NEW_3).await;
    let report = streamctl_json(&[
        "simulate",
        "--endpoint",
        &url,
        "--account",
        "123",
        "--streams",
        "5",
        "--duration",
        "2s",
        "--heartbeat-interval",
        "500ms",
    ])
    .await;

    assert_eq!(report["streams"], 5);
    assert_eq!(report["account"], "123");
    assert_eq!(
        report["counts"],
        serde_json::json!({"admitted": 3, "refused": 2, "cut": 0, "failed": 0}),
        "{report:#}"
    );
    assert_eq!(report["viewers"].as_array().unwrap().len(), 5);
    for viewer in viewers_with(&report, "admitted") {
        assert_eq!(viewer["account"], "123");
        assert!(
            viewer["sessionId"].as_str().unwrap().len() >= 32,
            "{viewer:#}"
        );
        assert!(viewer["endedAt"].is_number(), "{viewer:#}");
        assert!(viewer.get("message").is_none(), "{viewer:#}");
    }
    for viewer in viewers_with(&report, "refused") {
        assert_eq!(viewer["reason"], "limit_exceeded");
        assert_eq!(viewer["limit"], 3);
        assert_eq!(viewer["active"], 3);
    }

    // The viewers ended their sessions, so the account's slots are free again.
    let sessions = streamctl_json(&["sessions", "123", "--admin-endpoint", &admin]).await;
    assert_eq!(sessions["limit"], 3);
    assert_eq!(sessions["sessions"].as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_reports_the_viewer_cut_by_eviction() {
    let url = start_sidecar(EVICT_OLDEST_1).await;
    let report = streamctl_json(&[
        "simulate",
        "--endpoint",
        &url,
        "--account",
        "7",
        "--streams",
        "2",
        "--duration",
        "3s",
        "--heartbeat-interval",
        "500ms",
        "--stagger",
        "200ms",
    ])
    .await;

    assert_eq!(
        report["counts"],
        serde_json::json!({"admitted": 1, "refused": 0, "cut": 1, "failed": 0}),
        "{report:#}"
    );
    let cut = viewers_with(&report, "cut");
    assert_eq!(cut[0]["reason"], "evicted");
    assert!(cut[0]["admittedAt"].is_number());
    assert!(cut[0].get("endedAt").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_without_account_gives_each_viewer_its_own() {
    let url = start_sidecar(EVICT_OLDEST_1).await;
    let report = streamctl_json(&[
        "simulate",
        "--endpoint",
        &url,
        "--streams",
        "3",
        "--duration",
        "1s",
        "--stagger",
        "0s",
    ])
    .await;

    // Limit 1, but one stream per account: nobody is refused or evicted.
    assert_eq!(report["counts"]["admitted"], 3, "{report:#}");
    assert!(report.get("account").is_none());
    let accounts: std::collections::BTreeSet<&str> = report["viewers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["account"].as_str().unwrap())
        .collect();
    assert_eq!(accounts.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports_throughput_statuses_and_percentiles() {
    let url = start_sidecar(REJECT_NEW_3).await;
    let report = streamctl_json(&[
        "load",
        "--endpoint",
        &url,
        "--rate",
        "200/s",
        "--duration",
        "2s",
        "--accounts",
        "50",
        "--heartbeat-interval",
        "200ms",
        "--concurrency",
        "32",
    ])
    .await;

    let n = |field: &str| {
        report[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field}: {report:#}"))
    };
    assert_eq!(n("scheduled"), 400);
    assert_eq!(n("sent") + n("unsent"), 400);
    assert!(n("responses") > 0, "{report:#}");
    assert!(report["achievedRate"].as_f64().unwrap() > 0.0);

    // Every response is one of the statuses the API documents for /streaming.
    let statuses = report["statusCounts"].as_object().unwrap();
    let total: u64 = statuses.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, n("responses"));
    for status in statuses.keys() {
        assert!(
            ["200", "201", "204", "404", "410", "429"].contains(&status.as_str()),
            "unexpected status {status}: {report:#}"
        );
    }
    assert!(
        statuses.contains_key("201"),
        "some opens are admitted: {report:#}"
    );

    // The mix has all three operations.
    for op in ["open", "heartbeat", "end"] {
        assert!(report["operations"][op].as_u64().unwrap() > 0, "{report:#}");
    }

    let latency = &report["latencyMs"];
    let l = |p: &str| latency[p].as_f64().unwrap();
    assert_eq!(latency["count"].as_u64().unwrap(), n("responses"));
    assert!(l("p50") > 0.0);
    assert!(
        l("p50") <= l("p99") && l("p99") <= l("p999") && l("p999") <= l("max"),
        "{latency:#}"
    );

    // `compare` reads the report back: a run compared with itself has ratio 1.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("load.json");
    std::fs::write(&path, report.to_string()).unwrap();
    let path = path.to_str().unwrap();
    let comparison = streamctl_json(&["compare", "--baseline", path, "--candidate", path]).await;
    assert_eq!(comparison["throughputRatio"], 1.0);
    assert_eq!(comparison["p50Ratio"], 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_kick() {
    let (url, admin) = start_sidecar_with_admin(REJECT_NEW_3).await;
    let opened = reqwest::Client::new()
        .put(format!("{url}/streaming?account=acme&streamId=tv"))
        .send()
        .await
        .unwrap();
    assert_eq!(opened.status(), 201);

    let list = streamctl_json(&["sessions", "acme", "--admin-endpoint", &admin]).await;
    let sessions = list["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["streamId"], "tv");
    let id = sessions[0]["sessionId"].as_str().unwrap().to_string();

    let kicked = streamctl_json(&["kick", &id, "--admin-endpoint", &admin]).await;
    assert_eq!(kicked["kicked"], true);

    let again = streamctl(&["kick", &id, "--admin-endpoint", &admin]).await;
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already cut (kicked)"), "{stderr}");

    // Another id of the same shape that was never issued.
    let first = if id.starts_with('0') { "1" } else { "0" };
    let never_issued = format!("{first}{}", &id[1..]);
    let unknown = streamctl(&["kick", &never_issued, "--admin-endpoint", &admin]).await;
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(stderr.contains("no session"), "{stderr}");
}

#[tokio::test]
async fn bad_flags_name_the_flag_and_fail() {
    let cases: &[(&[&str], &str)] = &[
        (&["simulate", "--streams", "0"], "--streams"),
        (&["simulate", "--streams", "many"], "--streams"),
        (&["simulate", "--duration", "forever"], "--duration"),
        (&["simulate", "--duration", "0s"], "--duration"),
        (
            &["simulate", "--heartbeat-interval", "0s"],
            "--heartbeat-interval",
        ),
        (&["simulate", "--endpoint", "not a url"], "--endpoint"),
        (&["simulate", "--endpoint", "ftp://127.0.0.1"], "--endpoint"),
        (&["simulate", "--account", "has space"], "--account"),
        (&["load", "--rate", "0/s"], "--rate"),
        (&["load", "--rate", "lots"], "--rate"),
        (&["load", "--concurrency", "0"], "--concurrency"),
        (&["load", "--accounts", "0"], "--accounts"),
        (&["kick", "not-a-session-id"], "SESSION_ID"),
    ];
    for (args, flag) in cases {
        let output = streamctl(args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag),
            "{args:?} should name {flag}: {stderr}"
        );
        assert!(output.stdout.is_empty(), "{args:?}");
    }
}

#[tokio::test]
async fn unreachable_endpoint_is_a_clear_error() {
    // A port bound but not listening: connections are refused, and no other process can
    // take the port meanwhile.
    let refusing = tokio::net::TcpSocket::new_v4().unwrap();
    refusing.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("http://{}", refusing.local_addr().unwrap());
    for command in ["simulate", "load"] {
        let output = streamctl(&[command, "--endpoint", &url, "--duration", "1s"]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{command}: {stderr}");
        assert!(stderr.contains("cannot reach"), "{command}: {stderr}");
        assert!(stderr.contains("--endpoint"), "{command}: {stderr}");
        assert!(stderr.contains(&url), "{command}: {stderr}");
    }
    // The admin commands name the admin endpoint's flag.
    for command in [&["sessions", "acme"][..], &["kick", &"0".repeat(40)][..]] {
        let mut args = command.to_vec();
        args.extend(["--admin-endpoint", &url]);
        let output = streamctl(&args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{command:?}: {stderr}");
        assert!(stderr.contains("--admin-endpoint"), "{command:?}: {stderr}");
        assert!(stderr.contains(&url), "{command:?}: {stderr}");
    }
}

/// A sidecar in proxy mode in front of the demo origin.
async fn start_proxying_sidecar(policy: &str) -> String {
    let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", origin.local_addr().unwrap());
    let app = streamgate_demo_origin::router(Default::default());
    tokio::spawn(async move { axum::serve(origin, app).await });
    let set = PolicySet::from_yaml(policy, "test", "default").expect("the test policy is valid");
    let sidecar = Sidecar::in_memory(set).with_upstream(upstream.parse().unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { sidecar.serve(listener, std::future::pending()).await });
    format!("http://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_pulls_media_through_the_proxy_and_reports_the_cut_stream() {
    let endpoint = start_proxying_sidecar(
        "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {name: d}\nspec: {maxStreamsPerAccount: 1, onLimitExceeded: EvictOldest}\n",
    )
    .await;
    let report = streamctl_json(&[
        "simulate",
        "--endpoint",
        &endpoint,
        "--account",
        "media-acct",
        "--streams",
        "2",
        "--duration",
        "3s",
        "--stagger",
        "1s",
        "--media",
        "/live?interval_ms=20",
    ])
    .await;
    let viewers = report["viewers"].as_array().unwrap();
    let first = &viewers[0];
    assert_eq!(first["outcome"], "cut", "{report}");
    assert_eq!(first["reason"], "evicted", "{report}");
    assert!(first["mediaBytes"].as_u64().unwrap() > 0, "{report}");
    let second = &viewers[1];
    assert_eq!(second["outcome"], "admitted", "{report}");
}
