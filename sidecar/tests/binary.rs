//! The `streamgate-sidecar` binary: start-up errors, hot reload, environment variables and
//! graceful shutdown.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{SidecarProcess, default_policy, eventually, metric};

const BIN: &str = common::SIDECAR_BIN;

async fn start(policy_file: &Path) -> SidecarProcess {
    let policy = policy_file.display().to_string();
    let process = SidecarProcess::start(&[
        "--policy-file",
        &policy,
        "--policy-reload-interval",
        "100ms",
    ])
    .await;
    process.wait_ready().await;
    process
}

async fn open(base: &str, account: &str, stream: &str) -> (u16, serde_json::Value) {
    common::streaming_at(
        &reqwest::Client::new(),
        base,
        reqwest::Method::PUT,
        account,
        stream,
    )
    .await
}

#[test]
fn a_malformed_policy_file_stops_start_up_naming_file_document_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.yaml");
    let text = format!(
        "{}---\n{}",
        default_policy("  maxStreamsPerAccount: 3"),
        default_policy("  maxStreamsPerAccount: 0").replace("name: default", "name: broken")
    );
    std::fs::write(&path, text).unwrap();
    let output = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0"])
        .arg("--policy-file")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("policies.yaml"), "{stderr}");
    assert!(stderr.contains("document 2"), "{stderr}");
    assert!(stderr.contains("broken"), "{stderr}");
    assert!(stderr.contains("spec.maxStreamsPerAccount"), "{stderr}");
}

#[test]
fn a_missing_policy_file_and_a_bad_store_are_named() {
    let output = Command::new(BIN)
        .args(["--policy-file", "does-not-exist.yaml"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("does-not-exist.yaml"), "{stderr}");

    let output = Command::new(BIN)
        .args(["--store", "postgres://x"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--store"), "{stderr}");

    let output = Command::new(BIN)
        .args(["--listen", "nowhere"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--listen"), "{stderr}");
}

#[tokio::test]
async fn policy_changes_apply_without_restart_and_a_bad_file_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.yaml");
    std::fs::write(&path, default_policy("  maxStreamsPerAccount: 1")).unwrap();
    let sidecar = start(&path).await;
    let base = sidecar.base.clone();

    assert_eq!(open(&base, "acct", "s1").await.0, 201);
    assert_eq!(open(&base, "acct", "s2").await.0, 429);

    // Write-then-rename, as a ConfigMap volume update does.
    let staged = dir.path().join("staged.yaml");
    std::fs::write(&staged, default_policy("  maxStreamsPerAccount: 2")).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    eventually("the new limit of 2 applies", async || {
        open(&base, "acct", "s2").await.0 == 201
    })
    .await;

    std::fs::write(&path, default_policy("  maxStreamsPerAccount: -5")).unwrap();
    let client = reqwest::Client::new();
    eventually("the bad file is rejected", async || {
        let text = client
            .get(format!("{}/metrics", sidecar.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric(&text, r#"streamgate_policy_reloads_total{result="error"}"#).unwrap_or(0.0) >= 1.0
    })
    .await;
    let (status, body) = open(&base, "acct", "s3").await;
    assert_eq!(status, 429, "the last good policy (limit 2) stays: {body}");
    assert_eq!(body["limit"], 2);
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(
        ready.status(),
        200,
        "a bad reload does not make the sidecar unready"
    );
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.yaml");
    std::fs::write(&path, default_policy("  maxStreamsPerAccount: 1")).unwrap();
    let mut sidecar = start(&path).await;
    let status = Command::new("kill")
        .args(["-TERM", &sidecar.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut waited = None;
    for _ in 0..200 {
        if let Some(status) = sidecar.child.try_wait().unwrap() {
            waited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = waited.expect("the sidecar exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn an_optional_policy_file_may_appear_later() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.yaml");
    let policy = path.display().to_string();
    let sidecar = SidecarProcess::start(&[
        "--policy-file",
        &policy,
        "--policy-file-optional",
        "true",
        "--policy-reload-interval",
        "100ms",
    ])
    .await;
    sidecar.wait_ready().await;
    let base = sidecar.base.clone();
    // Built-in default until the file exists: 3 streams.
    for stream in ["a", "b", "c"] {
        assert_eq!(open(&base, "acct", stream).await.0, 201);
    }
    let (status, body) = open(&base, "acct", "d").await;
    assert_eq!((status, body["limit"].as_u64()), (429, Some(3)));

    std::fs::write(&path, default_policy("  maxStreamsPerAccount: 5")).unwrap();
    eventually("the file's limit applies once it appears", async || {
        open(&base, "acct", "d").await.0 == 201
    })
    .await;
}
