//! `streamctl validator` serving real sidecars: it denies listed accounts and headers, answers
//! late, fails a fraction of calls; its flags are checked.

use std::process::Stdio;
use std::time::Duration;

use reqwest::Client;
use serde_json::Value;
use streamgate_sidecar::policy::PolicySet;
use streamgate_sidecar::server::Sidecar;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;

/// A running `streamctl validator`, killed on drop.
struct Validator {
    _child: tokio::process::Child,
    url: String,
}

async fn validator(args: &[&str]) -> Validator {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamctl"))
        .args(["validator", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("streamctl runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the validator starts")
        .unwrap()
        .expect("the validator prints its address");
    let url = line.rsplit(' ').next().expect("an address").to_string();
    Validator { _child: child, url }
}

async fn sidecar(validators: &str) -> String {
    let policy = format!(
        "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {{name: default}}\nspec:\n  validators:\n{validators}\n"
    );
    let sidecar = Sidecar::in_memory(PolicySet::from_yaml(&policy, "test", "default").unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { sidecar.serve(listener, std::future::pending()).await });
    base
}

async fn streaming(
    base: &str,
    method: reqwest::Method,
    account: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut request = Client::new().request(
        method,
        format!("{base}/streaming?account={account}&streamId=tv"),
    );
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_reviews_deny_listed_accounts_and_headers_and_allow_the_rest() {
    let v = validator(&[
        "--deny-account",
        "blocked",
        "--deny-header",
        "x-viewer-country=XX",
        "--message",
        "not in your plan",
    ])
    .await;
    let base = sidecar(&format!(
        "  - {{name: demo, url: '{}', mode: Blocking}}",
        v.url
    ))
    .await;
    use reqwest::Method;
    let (status, body) = streaming(&base, Method::PUT, "blocked", &[]).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "denied");
    assert_eq!(body["message"], "not in your plan");
    let (status, body) = streaming(
        &base,
        Method::PUT,
        "traveller",
        &[("x-viewer-country", "XX")],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = streaming(&base, Method::PUT, "fan", &[("x-viewer-country", "CH")]).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["validation"], "allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_async_denial_cuts_and_failures_follow_the_failure_policy() {
    use reqwest::Method;
    let late = validator(&["--deny-account", "blocked", "--delay", "500ms"]).await;
    let base = sidecar(&format!("  - {{name: late, url: '{}'}}", late.url)).await;
    let (status, body) = streaming(&base, Method::PUT, "blocked", &[]).await;
    assert_eq!(status, 201, "{body}");
    // Answered before the validator's verdict.
    assert_eq!(body["validation"], "pending");
    let mut last = Value::Null;
    for _ in 0..100 {
        let (status, body) = streaming(&base, Method::GET, "blocked", &[]).await;
        last = body;
        if status == 410 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last["reason"], "denied", "{last}");

    // Every call fails: Revoke cuts.
    let failing = validator(&["--fail-fraction", "1"]).await;
    let base = sidecar(&format!(
        "  - {{name: failing, url: '{}', timeoutSeconds: 1, failurePolicy: Revoke, mode: Blocking}}",
        failing.url
    ))
    .await;
    let (status, body) = streaming(&base, Method::PUT, "fan", &[]).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["session"]["validation"], "failed");
}

#[tokio::test]
async fn bad_flags_name_the_flag() {
    for (args, flag) in [
        (vec!["--fail-fraction", "2"], "--fail-fraction"),
        (vec!["--deny-header", "no-equals"], "--deny-header"),
        (vec!["--delay", "soon"], "--delay"),
        (vec!["--listen", "nowhere"], "--listen"),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamctl"))
            .arg("validator")
            .args(&args)
            .output()
            .await
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}
