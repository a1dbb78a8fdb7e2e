//! Monitoring: the chart's ServiceMonitor, PodMonitor, PrometheusRule and Grafana dashboards.
//!
//! - `helm template` renders without a cluster; monitoring.coreos.com objects only where their
//!   CRDs are served, or a clear failure when `monitoring.requireCRDs` asks for them.
//! - Every alert passes `promtool check rules` and its `promtool test rules` unit tests
//!   (charts/streamgate/tests/alerts.test.yaml), firing and not firing, and links to its runbook.
//! - Every dashboard passes the dashboard lint rules and every query parses (`promtool check
//!   rules`), and names only metrics a live sidecar or operator exports.
//! - On the real API server with the prometheus-operator CRDs applied, `helm install` with all
//!   monitoring values on creates the objects; without the CRDs the install succeeds with
//!   monitoring off and fails clearly when they are required. `promtool check metrics` passes on
//!   the live operator's and a live sidecar's (on Redis) `/metrics`.
//!
//! Tools come from `testenv/build-tools` (`PROMTOOL`, `PROMETHEUS_OPERATOR_CRDS`, or the
//! `tools.env` it writes into the cache); the control plane from `testenv/build`; Redis from
//! `scripts/redis-up` (`STREAMGATE_TEST_REDIS`). Without them the tests fail, saying so.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::{refusing_port, reported_addrs};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use serde_json::Value;
use streamgate_testenv::{
    Binaries, ControlPlane, create_namespace, install_crds, shared, wait_until, workspace_root,
};

fn chart() -> PathBuf {
    workspace_root().join("charts/streamgate")
}

/// Every value that turns monitoring on, as a kube-prometheus-stack user would set them.
const ALL_MONITORING: &[&str] = &[
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.serviceMonitor.additionalLabels.release=kube-prometheus-stack",
    "monitoring.podMonitor.enabled=true",
    "monitoring.podMonitor.additionalLabels.release=kube-prometheus-stack",
    "monitoring.prometheusRule.enabled=true",
    "monitoring.prometheusRule.additionalLabels.release=kube-prometheus-stack",
    "monitoring.dashboards.enabled=true",
];

/// The monitoring.coreos.com kinds the chart creates, as helm's `--api-versions` names them.
const MONITORING_KINDS: &[&str] = &["ServiceMonitor", "PodMonitor", "PrometheusRule"];

/// A path from the environment, else from the `tools.env` that testenv/build-tools writes.
fn tool_path(name: &str) -> Result<PathBuf> {
    if let Some(value) = std::env::var_os(name).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(value));
    }
    let cache = std::env::var_os("STREAMGATE_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/streamgate")))
        .context("neither STREAMGATE_CACHE nor HOME is set")?;
    let env_file = cache.join("tools.env");
    let text = std::fs::read_to_string(&env_file).with_context(|| {
        format!(
            "{name} is not set and {} is missing: run `eval \"$(testenv/build-tools)\"`",
            env_file.display()
        )
    })?;
    let prefix = format!("export {name}=");
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .with_context(|| format!("{} does not set {name}", env_file.display()))?;
    let path = PathBuf::from(path.trim());
    ensure!(
        path.exists(),
        "{name}={} does not exist: run testenv/build-tools",
        path.display()
    );
    Ok(path)
}

fn promtool() -> Result<PathBuf> {
    tool_path("PROMTOOL")
}

/// Runs a command, failing with its output when it does not succeed.
fn run(mut command: Command, what: &str) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// `helm` without a cluster (no KUBECONFIG), with its own dirs under `home`.
fn offline_helm(home: &Path) -> Result<Command> {
    let mut helm = Command::new(Binaries::locate()?.helm);
    helm.env("KUBECONFIG", home.join("no-kubeconfig"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    Ok(helm)
}

/// `helm template sg charts/streamgate -n streamgate-system` with `values` and `extra` args.
fn template(values: &[&str], extra: &[&str]) -> Result<Output> {
    let home = tempfile::tempdir()?;
    let mut helm = offline_helm(home.path())?;
    helm.args(["template", "sg"])
        .arg(chart())
        .args(["--namespace", "streamgate-system"])
        .args(extra);
    for value in values {
        helm.args(["--set", value]);
    }
    Ok(helm.output()?)
}

/// `--api-versions` arguments that make helm believe the prometheus-operator CRDs are served.
fn monitoring_api_versions() -> Vec<String> {
    MONITORING_KINDS
        .iter()
        .flat_map(|k| {
            [
                "--api-versions".to_string(),
                format!("monitoring.coreos.com/v1/{k}"),
            ]
        })
        .collect()
}

/// The documents of a rendered stream.
fn documents(yaml: &str) -> Result<Vec<serde_yaml::Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn kinds(docs: &[serde_yaml::Value]) -> Vec<String> {
    docs.iter()
        .filter_map(|d| d.get("kind")?.as_str().map(str::to_string))
        .collect()
}

#[test]
fn helm_template_renders_without_a_cluster() -> Result<()> {
    // GitOps tools render charts with plain `helm template`: no cluster, no --kube-version.
    let output = template(&[], &[])?;
    ensure!(
        output.status.success(),
        "helm template without a cluster failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let docs = documents(&String::from_utf8(output.stdout)?)?;
    ensure!(kinds(&docs).contains(&"Deployment".to_string()));
    ensure!(
        !kinds(&docs)
            .iter()
            .any(|k| MONITORING_KINDS.contains(&k.as_str())),
        "monitoring is off by default"
    );

    // Monitoring on, but no CRDs known: the monitoring.coreos.com objects are left out, the
    // dashboards (plain ConfigMaps) are not.
    let output = template(ALL_MONITORING, &[])?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let docs = documents(&String::from_utf8(output.stdout)?)?;
    let rendered = kinds(&docs);
    for kind in MONITORING_KINDS {
        ensure!(
            !rendered.contains(&kind.to_string()),
            "{kind} rendered without its CRD"
        );
    }
    let dashboards = docs
        .iter()
        .filter(|d| d["metadata"]["labels"]["grafana_dashboard"].as_str() == Some("1"))
        .count();
    ensure!(
        dashboards == 3,
        "expected the 3 dashboards, got {dashboards}"
    );

    // With the CRDs known, every object renders.
    let api_versions = monitoring_api_versions();
    let args: Vec<&str> = api_versions.iter().map(String::as_str).collect();
    let output = template(ALL_MONITORING, &args)?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rendered = kinds(&documents(&String::from_utf8(output.stdout)?)?);
    for kind in MONITORING_KINDS {
        ensure!(rendered.contains(&kind.to_string()), "{kind} not rendered");
    }

    // Asked for explicitly without the CRDs: a failure that names the CRD and the way out.
    let mut required = ALL_MONITORING.to_vec();
    required.push("monitoring.requireCRDs=true");
    let output = template(&required, &[])?;
    ensure!(
        !output.status.success(),
        "requireCRDs without CRDs must fail"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        stderr.contains("ServiceMonitor CRD") && stderr.contains("monitoring.requireCRDs=false"),
        "unclear failure: {stderr}"
    );
    Ok(())
}

/// The rendered PrometheusRule's `spec` (a Prometheus rules file) and its alerts.
fn rendered_rules() -> Result<serde_yaml::Value> {
    let api_versions = monitoring_api_versions();
    let mut args: Vec<&str> = api_versions.iter().map(String::as_str).collect();
    args.extend(["--show-only", "templates/monitoring/prometheusrule.yaml"]);
    let output = template(&["monitoring.prometheusRule.enabled=true"], &args)?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let docs = documents(&String::from_utf8(output.stdout)?)?;
    let rule = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("PrometheusRule"))
        .context("no PrometheusRule rendered")?;
    Ok(rule["spec"].clone())
}

#[test]
fn every_alert_passes_promtool_and_its_unit_tests_and_has_a_runbook() -> Result<()> {
    let promtool = promtool()?;
    let spec = rendered_rules()?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("rules.yaml"), serde_yaml::to_string(&spec)?)?;
    let tests = chart().join("tests/alerts.test.yaml");
    std::fs::copy(&tests, dir.path().join("alerts.test.yaml"))?;

    let mut check = Command::new(&promtool);
    check
        .args(["check", "rules", "--lint=all", "--lint-fatal"])
        .arg(dir.path().join("rules.yaml"));
    run(check, "promtool check rules")?;

    let mut unit = Command::new(&promtool);
    unit.current_dir(dir.path())
        .args(["test", "rules", "alerts.test.yaml"]);
    run(
        unit,
        "promtool test rules charts/streamgate/tests/alerts.test.yaml",
    )?;

    // Every alert: a severity, a summary, a runbook section; tested firing and not firing.
    let runbooks = std::fs::read_to_string(workspace_root().join("docs/runbooks.md"))?;
    let test_doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&tests)?)?;
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in test_doc["tests"].as_sequence().context("tests")? {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().unwrap_or_default().to_string();
            match case["exp_alerts"].as_sequence() {
                Some(alerts) if !alerts.is_empty() => firing.insert(name),
                _ => quiet.insert(name),
            };
        }
    }
    let mut alerts = Vec::new();
    for group in spec["groups"].as_sequence().context("groups")? {
        for rule in group["rules"].as_sequence().context("rules")? {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            alerts.push(name.to_string());
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            ensure!(
                ["critical", "warning", "info"].contains(&severity),
                "{name}: severity {severity:?}"
            );
            ensure!(
                !rule["annotations"]["summary"]
                    .as_str()
                    .unwrap_or_default()
                    .is_empty(),
                "{name}: no summary"
            );
            let anchor = name.to_lowercase();
            let url = rule["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_default();
            ensure!(
                url.ends_with(&format!("docs/runbooks.md#{anchor}")),
                "{name}: runbook_url {url}"
            );
            ensure!(
                runbooks.contains(&format!("\n## {name}\n")),
                "docs/runbooks.md has no section `## {name}`"
            );
            ensure!(firing.contains(name), "{name} is never tested firing");
            ensure!(quiet.contains(name), "{name} is never tested not firing");
        }
    }
    for expected in [
        "StreamGateFailingOpen",
        "StreamGateStoreErrors",
        "StreamGatePolicyReloadFailing",
        "StreamGateMassCuts",
        "StreamGateSessionApiSlow",
        "StreamGateValidatorFailing",
        "StreamGateOperatorDown",
        "StreamGateReconcileErrors",
        "StreamGateWebhookErrors",
        "StreamGateWebhookCertificateExpiring",
        "StreamGatePodsWithoutSidecar",
    ] {
        ensure!(alerts.iter().any(|a| a == expected), "no alert {expected}");
    }
    Ok(())
}

#[test]
fn a_disabled_alert_is_left_out() -> Result<()> {
    let api_versions = monitoring_api_versions();
    let mut args: Vec<&str> = api_versions.iter().map(String::as_str).collect();
    args.extend(["--show-only", "templates/monitoring/prometheusrule.yaml"]);
    let output = template(
        &[
            "monitoring.prometheusRule.enabled=true",
            "monitoring.prometheusRule.disabledAlerts={StreamGateMassCuts}",
        ],
        &args,
    )?;
    let text = String::from_utf8(output.stdout)?;
    ensure!(text.contains("StreamGateFailingOpen"), "{text}");
    ensure!(!text.contains("alert: StreamGateMassCuts"), "{text}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Dashboards

/// The chart's dashboards: (file name, JSON).
fn dashboards() -> Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(chart().join("dashboards"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let json: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            out.push((
                path.file_name().unwrap().to_string_lossy().into_owned(),
                json,
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    ensure!(out.len() == 3, "expected 3 dashboards, found {}", out.len());
    Ok(out)
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        for nested in panel["panels"].as_array().into_iter().flatten() {
            out.push(nested);
        }
    }
    out
}

/// Units Grafana knows (the ones these dashboards may use).
const UNITS: &[&str] = &[
    "short",
    "none",
    "percent",
    "percentunit",
    "s",
    "ms",
    "bytes",
    "Bps",
    "reqps",
    "ops",
    "dateTimeAsIso",
];

/// The rules of Grafana's dashboard linter (github.com/grafana/dashboard-linter), which the Go
/// module proxy does not serve: returns every problem found in `dashboard`.
pub fn lint_dashboard(name: &str, dashboard: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let mut problem = |rule: &str, text: String| problems.push(format!("{name}: {rule}: {text}"));

    // template-uneditable-rule
    if dashboard["editable"] != Value::Bool(false) {
        problem("template-uneditable-rule", "dashboard is editable".into());
    }
    for field in ["uid", "title", "description"] {
        if dashboard[field].as_str().unwrap_or_default().is_empty() {
            problem("dashboard-metadata", format!("no {field}"));
        }
    }
    let variables: Vec<&Value> = dashboard["templating"]["list"]
        .as_array()
        .map(|l| l.iter().collect())
        .unwrap_or_default();
    let variable = |n: &str| variables.iter().find(|v| v["name"] == n).copied();
    // template-datasource-rule
    match variable("datasource") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        _ => problem(
            "template-datasource-rule",
            "no `datasource` variable of type datasource querying prometheus".into(),
        ),
    }
    // template-job-rule, template-instance-rule, template-on-time-change-reload-rule
    for required in ["job", "instance"] {
        match variable(required) {
            None => problem(
                &format!("template-{required}-rule"),
                format!("no `{required}` variable"),
            ),
            Some(v) => {
                if v["datasource"]["uid"] != "${datasource}" {
                    problem(
                        &format!("template-{required}-rule"),
                        format!("`{required}` does not use ${{datasource}}"),
                    );
                }
                if v["type"] != "query" || v["multi"] != true || v["includeAll"] != true {
                    problem(
                        &format!("template-{required}-rule"),
                        format!("`{required}` must be a multi-value query variable with All"),
                    );
                }
            }
        }
    }
    for v in &variables {
        if v["type"] == "query" {
            if v["refresh"] != 2 {
                problem(
                    "template-on-time-change-reload-rule",
                    format!(
                        "variable {} is not refreshed on time range change",
                        v["name"]
                    ),
                );
            }
            let query = v["query"]["query"].as_str().unwrap_or_default();
            if !query.starts_with("label_values(") {
                problem(
                    "template-label-promql-rule",
                    format!("variable {}: {query}", v["name"]),
                );
            }
        }
    }
    for panel in panels(dashboard) {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or_default();
        // panel-title-description-rule
        if title.is_empty() || panel["description"].as_str().unwrap_or_default().is_empty() {
            problem(
                "panel-title-description-rule",
                format!("panel {title:?} lacks a title or description"),
            );
        }
        // panel-datasource-rule
        if panel["datasource"]["uid"] != "${datasource}" {
            problem(
                "panel-datasource-rule",
                format!("panel {title:?} does not use ${{datasource}}"),
            );
        }
        // panel-units-rule
        let unit = panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or_default();
        if !UNITS.contains(&unit) {
            problem(
                "panel-units-rule",
                format!("panel {title:?} has unit {unit:?}"),
            );
        }
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        // panel-no-targets-rule
        if targets.is_empty() {
            problem("panel-no-targets-rule", format!("panel {title:?}"));
        }
        for target in &targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            // target-job-rule, target-instance-rule
            for (rule, matcher) in [
                ("target-job-rule", r#"job=~"$job""#),
                ("target-instance-rule", r#"instance=~"$instance""#),
            ] {
                for selector in selectors(expr) {
                    if !selector.contains(matcher) {
                        problem(rule, format!("panel {title:?}: {selector} lacks {matcher}"));
                    }
                }
            }
            // target-rate-interval-rule
            for range in ranges(expr) {
                if range != "$__rate_interval" {
                    problem(
                        "target-rate-interval-rule",
                        format!("panel {title:?}: range [{range}] instead of [$__rate_interval]"),
                    );
                }
            }
            // target-counter-agg-rule: counters only inside rate() or increase().
            for (name, wrapped) in metric_uses(expr) {
                if name.ends_with("_total") && !wrapped {
                    problem(
                        "target-counter-agg-rule",
                        format!("panel {title:?}: counter {name} not in rate()/increase()"),
                    );
                }
            }
        }
    }
    problems
}

/// The `{...}` selectors of an expression, with their metric names.
fn selectors(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let start = rest[..open]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .map_or(0, |i| i + 1);
        out.push(rest[start..open + close + 1].to_string());
        rest = &rest[open + close + 1..];
    }
    out
}

/// The `[...]` range durations of an expression.
fn ranges(expr: &str) -> Vec<String> {
    expr.split('[')
        .skip(1)
        .filter_map(|s| s.split(']').next().map(str::to_string))
        .collect()
}

/// Metric names an expression selects, each with whether it sits directly inside `rate(` or
/// `increase(`. Identifiers followed by `{` are metric names; label names and functions are not.
pub fn metric_uses(expr: &str) -> Vec<(String, bool)> {
    let bytes = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        let c = bytes[i] as char;
        if c == '"' {
            in_string = !in_string;
            i += 1;
            continue;
        }
        if in_string {
            if c == '\\' {
                i += 1;
            }
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < bytes.len() {
                let d = bytes[i] as char;
                if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                    i += 1;
                } else {
                    break;
                }
            }
            let name = &expr[start..i];
            let next = expr[i..].trim_start().chars().next();
            if next == Some('{') || (name.starts_with("streamgate_") && next != Some('(')) {
                let before = expr[..start].trim_end();
                let wrapped = before.ends_with("rate(") || before.ends_with("increase(");
                out.push((name.to_string(), wrapped));
            }
            continue;
        }
        i += 1;
    }
    out
}

/// An expression with the dashboard's variables replaced by what Grafana would send.
fn expand(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$job", ".+")
        .replace("$instance", ".+")
        .replace("$namespace", ".+")
}

#[test]
fn dashboards_pass_the_lint_rules_and_their_queries_parse() -> Result<()> {
    let mut problems = Vec::new();
    let mut rules = Vec::new();
    for (name, dashboard) in dashboards()? {
        problems.extend(lint_dashboard(&name, &dashboard));
        for panel in panels(&dashboard) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_default();
                rules.push(serde_json::json!({
                    "record": format!("dashboard_check_{}", rules.len()),
                    "expr": expand(expr),
                }));
            }
        }
    }
    ensure!(
        problems.is_empty(),
        "dashboard lint:\n{}",
        problems.join("\n")
    );
    // Every query parses as PromQL: promtool checks them as recording rules.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("queries.yaml");
    std::fs::write(
        &file,
        serde_yaml::to_string(&serde_json::json!({
            "groups": [{"name": "dashboards", "rules": rules}]
        }))?,
    )?;
    let mut check = Command::new(promtool()?);
    check.args(["check", "rules"]).arg(&file);
    run(check, "promtool check rules on the dashboards' queries")?;
    Ok(())
}

#[test]
fn the_lint_catches_what_it_is_for() {
    let bad = serde_json::json!({
        "uid": "x", "title": "x", "description": "x", "editable": true,
        "templating": {"list": []},
        "panels": [{
            "type": "timeseries", "title": "t", "datasource": {"uid": "prom"},
            "fieldConfig": {"defaults": {"unit": "furlongs"}},
            "targets": [{"expr": "sum(streamgate_sessions_admitted_total{job=\"x\"}) + rate(streamgate_sessions_refused_total[5m])"}]
        }]
    });
    let problems = lint_dashboard("bad.json", &bad).join("\n");
    for rule in [
        "template-uneditable-rule",
        "template-datasource-rule",
        "template-job-rule",
        "template-instance-rule",
        "panel-title-description-rule",
        "panel-datasource-rule",
        "panel-units-rule",
        "target-job-rule",
        "target-instance-rule",
        "target-rate-interval-rule",
        "target-counter-agg-rule",
    ] {
        assert!(problems.contains(rule), "{rule} not reported:\n{problems}");
    }
}

#[test]
fn metric_names_are_read_from_queries() {
    assert_eq!(
        metric_uses(
            r#"histogram_quantile(0.9, sum by (le) (rate(streamgate_x_bucket{job=~"$job", route="/a{b}"}[5m]))) / streamgate_y"#
        ),
        vec![
            ("streamgate_x_bucket".to_string(), true),
            ("streamgate_y".to_string(), false)
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Live metrics and the real API server

/// Metric names a `/metrics` exposition (OpenMetrics) offers, series names included
/// (`x_total` for counter `x`, `x_bucket`/`_sum`/`_count` for histogram `x`).
fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            names.insert(name.to_string());
            match kind {
                "counter" => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {}
            }
        } else if !line.starts_with('#')
            && let Some(name) = line.split(['{', ' ']).next()
        {
            names.insert(name.to_string());
        }
    }
    names
}

/// OpenMetrics text as the classic Prometheus text format that `promtool check metrics` reads:
/// a counter family `x` is named `x_total` there (as Prometheus itself does on ingestion), and
/// the `# UNIT` / `# EOF` lines do not exist.
fn as_classic_text(exposition: &str) -> String {
    let mut out = String::new();
    for line in exposition.lines() {
        if line.starts_with("# EOF") || line.starts_with("# UNIT ") {
            continue;
        }
        let line = match line
            .strip_prefix("# TYPE ")
            .and_then(|r| r.strip_suffix(" counter"))
        {
            Some(name) if !name.ends_with("_total") => format!("# TYPE {name}_total counter"),
            _ => match line.strip_prefix("# HELP ").and_then(|r| r.split_once(' ')) {
                Some((name, help))
                    if exposition.contains(&format!("# TYPE {name} counter"))
                        && !name.ends_with("_total") =>
                {
                    format!("# HELP {name}_total {help}")
                }
                _ => line.to_string(),
            },
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn promtool_check_metrics(exposition: &str, what: &str) -> Result<()> {
    let mut child = Command::new(promtool()?)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(as_classic_text(exposition).as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "promtool check metrics on {what}'s /metrics: {}{}\n{exposition}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Serves `router` on a free loopback port; returns its base URL.
async fn serve(router: axum::Router) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(base)
}

/// Serves `sidecar` (with its background work) on a free loopback port; returns its base URL.
/// Serves `sidecar` on loopback: (viewer port URL, admin listener URL).
async fn serve_sidecar(sidecar: &streamgate_sidecar::server::Sidecar) -> Result<(String, String)> {
    let viewer = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let urls = (
        format!("http://{}", viewer.local_addr()?),
        format!("http://{}", admin.local_addr()?),
    );
    let listeners = streamgate_sidecar::server::Listeners {
        viewer,
        admin: Some(admin),
        metrics: None,
    };
    let serving = sidecar.clone();
    tokio::spawn(async move { serving.serve_on(listeners, std::future::pending()).await });
    Ok(urls)
}

/// Live sidecars driven through every decision their metrics count, on the test Redis with the
/// live-session refresher running; returns their /metrics. Counter families appear in /metrics
/// once counted, so the scenario makes each happen: admissions, refusals, evictions, kicks,
/// dry-run decisions, a failed policy reload, proxied and refused media requests, a stream cut,
/// and (on a sidecar whose Redis is unreachable) store errors and an admission failing open.
async fn live_sidecar_metrics() -> Result<Vec<String>> {
    use streamgate_sidecar::engine::Policies;
    use streamgate_sidecar::policy::PolicySet;
    use streamgate_sidecar::policy_watch::PolicyWatcher;
    use streamgate_sidecar::server::Sidecar;
    use streamgate_sidecar::store::redis_count::ActiveSessionRefresher;
    use streamgate_sidecar::store::{RedisStore, RedisTarget};

    let url = std::env::var("STREAMGATE_TEST_REDIS").context(
        "STREAMGATE_TEST_REDIS is not set: start the test Redis with `eval \"$(scripts/redis-up)\"`",
    )?;
    let run = format!("monitoring-{:08x}", rand::random::<u32>());
    let dry = format!("{run}-dry");
    let policy_yaml = format!(
        "apiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {{name: default}}\nspec: {{maxStreamsPerAccount: 2, onLimitExceeded: EvictOldest}}\n---\napiVersion: streamgate.dev/v1alpha1\nkind: StreamingPolicy\nmetadata: {{name: trial}}\nspec: {{maxStreamsPerAccount: 1, mode: DryRun, accounts: [\"{dry}\"]}}\n"
    );
    let dir = tempfile::tempdir()?;
    let policy_file = dir.path().join("policies.yaml");
    std::fs::write(&policy_file, &policy_yaml)?;

    // An endless upstream stream for the enforcing proxy.
    let upstream = serve(axum::Router::new().route(
        "/live",
        axum::routing::get(|| async {
            let chunks = futures::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Some((Ok::<_, std::io::Error>(vec![0u8; 1024]), ()))
            });
            axum::body::Body::from_stream(chunks)
        }),
    ))
    .await?;

    let target = RedisTarget::parse(&url).map_err(anyhow::Error::msg)?;
    let policies = PolicySet::from_yaml(&policy_yaml, "test", "default")?;
    let store = RedisStore::new(target.clone(), Duration::from_secs(2));
    let sidecar = Sidecar::with_store(Arc::new(store), policies)
        .with_upstream(reqwest::Url::parse(&upstream)?);
    let policies: Policies = sidecar.engine().policies().clone();
    let refresher = ActiveSessionRefresher::start(
        target,
        policies.clone(),
        sidecar.engine().metrics().clone(),
        Duration::from_millis(200),
    );
    let watcher = PolicyWatcher::new(
        policy_file.clone(),
        "default".into(),
        policies,
        sidecar.engine().metrics().clone(),
    );
    let stop_watching = tokio_util::sync::CancellationToken::new();
    let watching = tokio::spawn(watcher.run(Duration::from_millis(100), stop_watching.clone()));
    let (base, admin) = serve_sidecar(&sidecar).await?;
    let http = reqwest::Client::new();
    let open = |account: &str, stream: &str| {
        http.put(format!(
            "{base}/streaming?account={account}&streamId={stream}"
        ))
        .send()
    };

    // Watch a stream through the proxy, then open two more: the first is evicted and cut.
    let first: Value = open(&run, "tv").await?.json().await?;
    let session = first["sessionId"]
        .as_str()
        .context("a session id")?
        .to_string();
    let mut media = http
        .get(format!("{base}/live"))
        .header("X-StreamGate-Session", &session)
        .send()
        .await?;
    media.chunk().await?.context("media flows")?;
    open(&run, "phone").await?;
    open(&run, "laptop").await?;
    while media.chunk().await.is_ok_and(|c| c.is_some()) {}
    // A media request without a session is refused; a session is kicked.
    http.get(format!("{base}/live")).send().await?;
    let listed: Value = http
        .get(format!("{admin}/v1/accounts/{run}/sessions"))
        .send()
        .await?
        .json()
        .await?;
    let kicked = listed["sessions"][0]["sessionId"]
        .as_str()
        .context("a session to kick")?;
    http.delete(format!("{admin}/v1/sessions/{kicked}"))
        .send()
        .await?;
    // Dry run: the second stream of a DryRun account of limit 1 would be refused.
    open(&dry, "a").await?;
    open(&dry, "b").await?;
    // A policy file that does not parse is refused on reload.
    std::fs::write(
        &policy_file,
        "kind: StreamingPolicy\nspec: [not, a, mapping\n",
    )?;

    let families = [
        "streamgate_sessions_revoked_total{",
        "streamgate_streams_cut_total{",
        "streamgate_dry_run_decisions_total{",
        r#"streamgate_policy_reloads_total{result="error"}"#,
        r#"streamgate_active_sessions{policy="default",store="redis"}"#,
    ];
    let last = Arc::new(std::sync::Mutex::new(String::new()));
    wait_until(
        Duration::from_secs(30),
        "every sidecar metric family",
        || {
            let (http, admin, last) = (http.clone(), admin.clone(), last.clone());
            async move {
                let text = http
                    .get(format!("{admin}/metrics"))
                    .send()
                    .await?
                    .text()
                    .await?;
                let all = families.iter().all(|f| text.contains(f));
                *last.lock().unwrap() = text;
                Ok(all)
            }
        },
    )
    .await?;
    let main = last.lock().unwrap().clone();
    refresher.stop().await;
    stop_watching.cancel();
    watching.await?;

    // A sidecar whose Redis is not there: store errors, and failurePolicy Open admits anyway.
    let (_refusing, port) = refusing_port()?;
    let unreachable = format!("redis://127.0.0.1:{port}");
    let lonely = Sidecar::with_store(
        Arc::new(RedisStore::new(
            RedisTarget::parse(&unreachable).map_err(anyhow::Error::msg)?,
            Duration::from_millis(200),
        )),
        PolicySet::from_yaml(&policy_yaml, "test", "default")?,
    );
    let (lonely_base, lonely_admin) = serve_sidecar(&lonely).await?;
    http.put(format!("{lonely_base}/streaming?account={run}&streamId=x"))
        .send()
        .await?;
    let degraded = http
        .get(format!("{lonely_admin}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        degraded.contains("streamgate_store_errors_total{")
            && degraded.contains("streamgate_failed_open_admissions_total 1"),
        "the unreachable store was not counted:\n{degraded}"
    );
    Ok(vec![main, degraded])
}

/// The operator binary, killed when dropped.
struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the operator binary with the chart's Deployment args (listen addresses moved to
/// loopback ports the kernel picks, learnt from its log); returns it, its metrics port and its
/// webhook port.
fn start_operator(
    deployment: &Deployment,
    namespace: &str,
    cp: &ControlPlane,
) -> Result<(Operator, u16, u16)> {
    let container = &deployment
        .spec
        .template
        .spec
        .as_ref()
        .context("Deployment without a pod spec")?
        .containers[0];
    let mut args: Vec<String> = container
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| !a.starts_with("--metrics-listen=") && !a.starts_with("--webhook-listen="))
        .collect();
    args.push("--metrics-listen=127.0.0.1:0".into());
    args.push("--webhook-listen=127.0.0.1:0".into());
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamgate-operator"))
        .args(&args)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("POD_NAMESPACE", namespace)
        .env("POD_NAME", "monitoring-test-operator")
        .env("RUST_LOG", "warn,streamgate_operator=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting streamgate-operator")?;
    let addrs = reported_addrs(
        &mut child,
        &[
            "serving health and metrics",
            "serving the sidecar injection webhook",
        ],
    );
    let operator = Operator(child);
    let addrs = addrs?;
    Ok((operator, addrs[0].port(), addrs[1].port()))
}

fn monitoring_api(client: &kube::Client, namespace: &str, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("monitoring.coreos.com", "v1", kind);
    let resource = ApiResource::from_gvk_with_plural(&gvk, &format!("{}s", kind.to_lowercase()));
    Api::namespaced_with(client.clone(), namespace, &resource)
}

fn helm_install(
    cp: &ControlPlane,
    release: &str,
    namespace: &str,
    values: &[&str],
) -> Result<Output> {
    let mut install = cp.helm();
    install
        .args(["install", release])
        .arg(chart())
        .args(["--namespace", namespace])
        // The live-session APIService is cluster-scoped and one release owns it; this test
        // installs several releases into one API server.
        .args(["--set", "liveApi.enabled=false"]);
    for value in values {
        install.args(["--set", value]);
    }
    Ok(install.output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_on_the_real_api_server() -> Result<()> {
    let cp = shared().await?;
    let client = cp.client().await?;

    // 1. No prometheus-operator CRDs: the install succeeds with monitoring off...
    let ns = create_namespace(&client, "mon-nocrd", &[]).await?;
    let output = helm_install(cp, "mon-off", &ns, &[])?;
    ensure!(
        output.status.success(),
        "helm install without monitoring CRDs failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // ...and, asked for explicitly, fails naming the missing CRD, creating nothing.
    let ns_required = create_namespace(&client, "mon-required", &[]).await?;
    let mut required = ALL_MONITORING.to_vec();
    required.push("monitoring.requireCRDs=true");
    let output = helm_install(cp, "mon-required", &ns_required, &required)?;
    ensure!(
        !output.status.success(),
        "requireCRDs without the CRDs must fail"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        stderr.contains("ServiceMonitor CRD"),
        "unclear failure: {stderr}"
    );
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns_required)
        .list(&Default::default())
        .await?;
    ensure!(
        !configmaps.items.iter().any(|c| c
            .metadata
            .name
            .as_deref()
            .unwrap_or_default()
            .contains("dashboard")),
        "a failed install left dashboards behind"
    );

    // 2. The prometheus-operator CRDs, from its Go module.
    let crds = tool_path("PROMETHEUS_OPERATOR_CRDS")?;
    for kind in ["servicemonitors", "podmonitors", "prometheusrules"] {
        install_crds(
            &client,
            &crds.join(format!("monitoring.coreos.com_{kind}.yaml")),
        )
        .await?;
    }

    // 3. Everything on: the objects exist, as kube-prometheus-stack expects them.
    let ns = create_namespace(&client, "mon-on", &[]).await?;
    let output = helm_install(cp, "mon-on", &ns, ALL_MONITORING)?;
    ensure!(
        output.status.success(),
        "helm install with monitoring on failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let fullname = "mon-on-streamgate";
    let service_monitor = monitoring_api(&client, &ns, "ServiceMonitor")
        .get(&format!("{fullname}-operator"))
        .await
        .context("the ServiceMonitor")?;
    let pod_monitor = monitoring_api(&client, &ns, "PodMonitor")
        .get(&format!("{fullname}-sidecars"))
        .await
        .context("the PodMonitor")?;
    let rule = monitoring_api(&client, &ns, "PrometheusRule")
        .get(fullname)
        .await
        .context("the PrometheusRule")?;
    for (what, labels) in [
        ("ServiceMonitor", &service_monitor.metadata.labels),
        ("PodMonitor", &pod_monitor.metadata.labels),
        ("PrometheusRule", &rule.metadata.labels),
    ] {
        ensure!(
            labels
                .as_ref()
                .and_then(|l| l.get("release"))
                .map(String::as_str)
                == Some("kube-prometheus-stack"),
            "{what} lacks the additional label release=kube-prometheus-stack"
        );
    }
    // The ServiceMonitor selects the operator's Service, on a port it has.
    let service = Api::<Service>::namespaced(client.clone(), &ns)
        .get(&format!("{fullname}-webhook"))
        .await?;
    let service_labels = service.metadata.labels.clone().unwrap_or_default();
    let selector: BTreeMap<String, String> =
        serde_json::from_value(service_monitor.data["spec"]["selector"]["matchLabels"].clone())?;
    for (k, v) in &selector {
        ensure!(
            service_labels.get(k) == Some(v),
            "the ServiceMonitor selects {k}={v}, which the Service lacks"
        );
    }
    let port = service_monitor.data["spec"]["endpoints"][0]["port"].as_str();
    ensure!(
        service
            .spec
            .and_then(|s| s.ports)
            .unwrap_or_default()
            .iter()
            .any(|p| p.name.as_deref() == port),
        "the Service has no port {port:?}"
    );
    // The PodMonitor selects injected pods in every namespace on the sidecar's metrics port.
    ensure!(
        pod_monitor.data["spec"]["selector"]["matchLabels"]["streamgate.dev/injected"] == "true"
            && pod_monitor.data["spec"]["namespaceSelector"]["any"] == true
            && pod_monitor.data["spec"]["podMetricsEndpoints"][0]["port"] == "sg-metrics",
        "PodMonitor spec: {}",
        pod_monitor.data["spec"]
    );
    let groups = rule.data["spec"]["groups"]
        .as_array()
        .context("rule groups")?;
    ensure!(groups.len() == 2, "rule groups: {groups:?}");
    // The dashboards, labelled for Grafana's sidecar, in the folder annotation.
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await?;
    let dashboard_maps: Vec<&ConfigMap> = configmaps
        .items
        .iter()
        .filter(|c| {
            c.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("grafana_dashboard"))
                .map(String::as_str)
                == Some("1")
        })
        .collect();
    ensure!(
        dashboard_maps.len() == 3,
        "{} dashboard ConfigMaps",
        dashboard_maps.len()
    );
    for cm in &dashboard_maps {
        ensure!(
            cm.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("grafana_folder"))
                .map(String::as_str)
                == Some("StreamGate"),
            "{:?} lacks the folder annotation",
            cm.metadata.name
        );
        let data = cm.data.as_ref().context("dashboard data")?;
        ensure!(data.len() == 1);
        for json in data.values() {
            serde_json::from_str::<Value>(json).context("dashboard JSON")?;
        }
    }

    // 4. The live operator's /metrics, as the ServiceMonitor would scrape it.
    let deployment = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get(fullname)
        .await?;
    let (_operator, metrics_port, webhook_port) = start_operator(&deployment, &ns, cp)?;
    let http = reqwest::Client::new();
    // Make it count what its dashboard shows: a reconcile that fails (the namespace's ConfigMap
    // was made immutable by hand) and an injection decision (the recorded AdmissionReview, sent
    // as the API server would).
    let broken = create_namespace(&client, "mon-broken", &[]).await?;
    let immutable: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "streamgate-policies"},
        "data": {"policies.yaml": "# frozen by hand"},
        "immutable": true
    }))?;
    Api::<ConfigMap>::namespaced(client.clone(), &broken)
        .create(&Default::default(), &immutable)
        .await?;
    let mut apply = cp.kubectl();
    apply
        .args(["apply", "-n", &broken, "-f"])
        .arg(workspace_root().join("examples/streamingpolicy.yaml"));
    run(apply, "kubectl apply examples/streamingpolicy.yaml")?;
    let review = std::fs::read_to_string(workspace_root().join("examples/admission-review.json"))?;
    let insecure = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()?;
    wait_until(
        Duration::from_secs(60),
        "the operator's webhook to answer",
        || {
            let (insecure, review) = (insecure.clone(), review.clone());
            async move {
                Ok(insecure
                    .post(format!("https://127.0.0.1:{webhook_port}/inject"))
                    .header("content-type", "application/json")
                    .body(review)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()))
            }
        },
    )
    .await?;
    let last = Arc::new(std::sync::Mutex::new(String::new()));
    wait_until(
        Duration::from_secs(60),
        "the operator to lead, load its certificate, count a failure and an injection",
        || {
            let (http, last) = (http.clone(), last.clone());
            async move {
                let text = http
                    .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
                    .send()
                    .await?
                    .text()
                    .await?;
                let ready = text.contains("streamgate_operator_leader 1")
                    && text.contains("streamgate_operator_reconcile_failures_total{")
                    && text.contains("streamgate_operator_injections_total{")
                    && !text.contains(
                        "streamgate_operator_webhook_certificate_expiry_timestamp_seconds 0\n",
                    );
                *last.lock().unwrap() = text;
                Ok(ready)
            }
        },
    )
    .await?;
    let operator_metrics = last.lock().unwrap().clone();
    promtool_check_metrics(&operator_metrics, "the operator")?;

    // 5. Live sidecars' /metrics (on Redis, with the live-session count).
    let sidecar_metrics = live_sidecar_metrics().await?;
    for text in &sidecar_metrics {
        promtool_check_metrics(text, "a sidecar")?;
    }

    // 6. Every metric a dashboard names is exported by one of them.
    let mut exported = exported_names(&operator_metrics);
    for text in &sidecar_metrics {
        exported.extend(exported_names(text));
    }
    let mut unknown = Vec::new();
    for (name, dashboard) in dashboards()? {
        let mut queries: Vec<String> = Vec::new();
        for panel in panels(&dashboard) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                queries.push(target["expr"].as_str().unwrap_or_default().to_string());
            }
        }
        for variable in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(q) = variable["query"]["query"].as_str() {
                // label_values(METRIC{...}, label)
                let inner = q.trim_start_matches("label_values(");
                queries.push(inner.rsplit_once(',').map_or(inner, |(m, _)| m).to_string());
            }
        }
        for query in queries {
            for (metric, _) in metric_uses(&query) {
                if !exported.contains(&metric) {
                    unknown.push(format!("{name}: {metric}"));
                }
            }
        }
    }
    ensure!(
        unknown.is_empty(),
        "dashboards name metrics no live /metrics exports:\n{}",
        unknown.join("\n")
    );
    Ok(())
}
