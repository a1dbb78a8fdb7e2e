//! `streamctl simulate --svg FILE` against a sidecar started in this process: the picture is
//! well-formed XML and shows every viewer of the run, with its outcome, reason and heartbeats as
//! the JSON report gives them. Outcomes and counts only, never timings.

use std::process::Output;

use serde_json::Value;
use streamgate_sidecar::policy::PolicySet;
use streamgate_sidecar::server::Sidecar;
use tokio::net::TcpListener;

fn policy(limit: u32, on_limit: &str) -> String {
    format!(
        "apiVersion: streamgate.dev/v1alpha1
kind: StreamingPolicy
metadata:
  name: default
spec:
  maxStreamsPerAccount: {limit}
  sessionTTLSeconds: 10
  heartbeatIntervalSeconds: 1
  onLimitExceeded: {on_limit}
"
    )
}

async fn start_sidecar(policy: &str) -> String {
    let set = PolicySet::from_yaml(policy, "test", "default").expect("the test policy is valid");
    let sidecar = Sidecar::in_memory(set);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { sidecar.serve(listener, std::future::pending()).await });
    format!("http://{address}")
}

async fn streamctl(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_streamctl"))
        .args(args)
        .output()
        .await
        .expect("streamctl runs")
}

/// Runs `simulate` with `--svg` into a temporary folder; returns the JSON report and the SVG.
async fn simulate_with_svg(args: &[&str]) -> (Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.svg");
    let mut all = vec!["simulate"];
    all.extend(args);
    all.extend(["--svg", file.to_str().unwrap(), "--output", "json"]);
    let output = streamctl(&all).await;
    assert!(
        output.status.success(),
        "streamctl {all:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    let svg = std::fs::read_to_string(&file).expect("the SVG file was written");
    (report, svg)
}

/// Checks that `svg` parses and has one lane per viewer of `report`, agreeing with it.
fn assert_picture_shows_every_viewer(report: &Value, svg: &str) {
    let doc = roxmltree::Document::parse(svg)
        .unwrap_or_else(|e| panic!("the SVG is not well-formed XML: {e}\n{svg}"));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );
    let lanes: Vec<roxmltree::Node> = root
        .descendants()
        .filter(|n| n.has_tag_name("g") && n.attribute("class") == Some("viewer"))
        .collect();
    let viewers = report["viewers"].as_array().unwrap();
    assert_eq!(lanes.len(), viewers.len(), "one lane per viewer");
    for viewer in viewers {
        let number = viewer["viewer"].as_u64().unwrap().to_string();
        let lane = lanes
            .iter()
            .find(|g| g.attribute("data-viewer") == Some(number.as_str()))
            .unwrap_or_else(|| panic!("no lane for viewer {number}"));
        let outcome = viewer["outcome"].as_str().unwrap();
        assert_eq!(
            lane.attribute("data-outcome"),
            Some(outcome),
            "viewer {number}"
        );
        let title = lane
            .children()
            .find(|n| n.has_tag_name("title"))
            .and_then(|t| t.text())
            .unwrap_or_default();
        assert!(
            title.contains(viewer["streamId"].as_str().unwrap())
                && title.contains(viewer["account"].as_str().unwrap()),
            "viewer {number}'s tooltip names its stream and account: {title}"
        );
        let count = |class: &str| {
            lane.descendants()
                .filter(|n| n.attribute("class") == Some(class))
                .count()
        };
        let heartbeats = viewer["heartbeats"].as_u64().unwrap() as usize;
        assert_eq!(
            count("heartbeat"),
            heartbeats,
            "viewer {number}'s heartbeats"
        );
        let text: String = lane
            .descendants()
            .filter_map(|n| n.text())
            .collect::<Vec<_>>()
            .join(" ");
        match outcome {
            "admitted" => {
                assert_eq!(count("watching"), 1, "viewer {number} watched");
                assert_eq!(count("cut") + count("refused"), 0);
            }
            "cut" => {
                assert_eq!(count("watching"), 1, "viewer {number} watched until cut");
                assert_eq!(count("cut"), 1);
                let reason = viewer["reason"].as_str().unwrap();
                assert!(text.contains(&format!("cut: {reason}")), "{text}");
            }
            "refused" => {
                assert_eq!(count("watching"), 0, "a refused viewer never watched");
                assert_eq!(count("refused"), 1);
                assert!(text.contains("refused (limit_exceeded)"), "{text}");
            }
            other => panic!("viewer {number} {other}: {viewer:#}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_picture_shows_admitted_and_evicted_viewers_with_their_heartbeats() {
    let url = start_sidecar(&policy(2, "EvictOldest")).await;
    // An account id full of markup characters: the picture must stay well-formed.
    let account = r#"<a&b>"'x"#;
    let (report, svg) = simulate_with_svg(&[
        "--endpoint",
        &url,
        "--account",
        account,
        "--streams",
        "4",
        "--duration",
        "3s",
        "--stagger",
        "600ms",
        "--heartbeat-interval",
        "250ms",
    ])
    .await;
    assert_eq!(
        report["counts"],
        serde_json::json!({"admitted": 2, "refused": 0, "cut": 2, "failed": 0}),
        "{report:#}"
    );
    assert!(
        report["viewers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["heartbeats"].as_u64().unwrap() > 0),
        "some viewer heartbeat: {report:#}"
    );
    assert_picture_shows_every_viewer(&report, &svg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_picture_shows_refused_viewers() {
    let url = start_sidecar(&policy(1, "RejectNew")).await;
    let (report, svg) = simulate_with_svg(&[
        "--endpoint",
        &url,
        "--account",
        "42",
        "--streams",
        "3",
        "--duration",
        "1s",
        "--heartbeat-interval",
        "300ms",
    ])
    .await;
    assert_eq!(
        report["counts"],
        serde_json::json!({"admitted": 1, "refused": 2, "cut": 0, "failed": 0}),
        "{report:#}"
    );
    assert_picture_shows_every_viewer(&report, &svg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_svg_path_in_a_missing_folder_is_refused_before_the_run() {
    let url = start_sidecar(&policy(3, "RejectNew")).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("missing/run.svg");
    let output = streamctl(&[
        "simulate",
        "--endpoint",
        &url,
        "--streams",
        "1",
        "--duration",
        "1s",
        "--svg",
        file.to_str().unwrap(),
    ])
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--svg"), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(!file.exists());
}
