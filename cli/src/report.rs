//! Results of the subcommands as data (serialised for `--output json`) and as text. Everything
//! here is pure, so formatting and arithmetic are tested without a server.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::client::AccountSessions;

/// How a simulated viewer's run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// Admitted and kept its session until the end of the run.
    Admitted,
    /// Refused at open (limit exceeded, or store unavailable under failurePolicy Closed).
    Refused,
    /// Admitted, then cut: a heartbeat got 410 Gone (evicted, kicked, expired).
    Cut,
    /// Could not play: a transport error or a response the API does not document.
    Failed,
}

impl Outcome {
    /// Lowercase name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Admitted => "admitted",
            Outcome::Refused => "refused",
            Outcome::Cut => "cut",
            Outcome::Failed => "failed",
        }
    }
}

/// One simulated viewer. Times are seconds since the start of the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewerReport {
    /// 1-based viewer number.
    pub viewer: u32,
    /// The viewer's account.
    pub account: String,
    /// The viewer's stream id.
    pub stream_id: String,
    /// How it ended.
    pub outcome: Outcome,
    /// When the outcome happened: admission (for `admitted`), refusal, cut or failure.
    pub at: f64,
    /// The session id, when admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// When it was admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admitted_at: Option<f64>,
    /// When it ended its session (DELETE) at the end of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<f64>,
    /// Why it was cut (`evicted`, `kicked`, `expired`) or refused (`limit_exceeded`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Heartbeats answered 200.
    pub heartbeats: u32,
    /// When each of those heartbeats was answered, seconds from the start of the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heartbeat_at: Vec<f64>,
    /// With `--media`: bytes of media received through the proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_bytes: Option<u64>,
    /// The account's limit, when the sidecar said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The account's active sessions at refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<u32>,
    /// Detail of a failure, or the sidecar's message on refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Number of viewers per outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeCounts {
    /// Admitted and kept to the end.
    pub admitted: u32,
    /// Refused at open.
    pub refused: u32,
    /// Admitted, then cut.
    pub cut: u32,
    /// Failed.
    pub failed: u32,
}

impl OutcomeCounts {
    /// Counts the outcomes of `viewers`.
    pub fn of(viewers: &[ViewerReport]) -> Self {
        let mut counts = Self::default();
        for v in viewers {
            *match v.outcome {
                Outcome::Admitted => &mut counts.admitted,
                Outcome::Refused => &mut counts.refused,
                Outcome::Cut => &mut counts.cut,
                Outcome::Failed => &mut counts.failed,
            } += 1;
        }
        counts
    }
}

/// The result of `streamctl simulate`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimulateReport {
    /// The endpoint played against.
    pub endpoint: String,
    /// The shared account, or none when each viewer had its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Number of viewers.
    pub streams: u32,
    /// Planned viewing time, seconds.
    pub duration_seconds: f64,
    /// Actual run time, seconds.
    pub elapsed_seconds: f64,
    /// Viewers per outcome.
    pub counts: OutcomeCounts,
    /// Every viewer, in viewer order.
    pub viewers: Vec<ViewerReport>,
}

/// `+1.234s`.
pub fn offset(seconds: f64) -> String {
    format!("+{seconds:.3}s")
}

/// Rounds seconds to milliseconds, so JSON shows `1.234` rather than float noise.
pub fn round_ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

fn viewer_detail(v: &ViewerReport) -> String {
    let mut detail = String::new();
    match v.outcome {
        Outcome::Admitted => {
            let _ = write!(detail, "{} heartbeats", v.heartbeats);
            if let Some(ended) = v.ended_at {
                let _ = write!(detail, ", ended {}", offset(ended));
            }
        }
        Outcome::Refused => {
            detail.push_str(v.reason.as_deref().unwrap_or("refused"));
            if let (Some(limit), Some(active)) = (v.limit, v.active) {
                let _ = write!(detail, ": limit {limit}, {active} active");
            }
        }
        Outcome::Cut => {
            detail.push_str(v.reason.as_deref().unwrap_or("cut"));
            if let Some(admitted) = v.admitted_at {
                let _ = write!(
                    detail,
                    " (admitted {}, {} heartbeats)",
                    offset(admitted),
                    v.heartbeats
                );
            }
        }
        Outcome::Failed => detail.push_str(v.message.as_deref().unwrap_or("failed")),
    }
    detail
}

/// The simulate report as a table, one row per viewer, and a summary line.
pub fn format_simulate(report: &SimulateReport) -> String {
    let account_width = report
        .viewers
        .iter()
        .map(|v| v.account.len())
        .chain(["ACCOUNT".len()])
        .max()
        .unwrap_or(7);
    let stream_width = report
        .viewers
        .iter()
        .map(|v| v.stream_id.len())
        .chain(["STREAM".len()])
        .max()
        .unwrap_or(6);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6}  {:<account_width$}  {:<stream_width$}  {:<8}  {:>9}  DETAIL",
        "VIEWER", "ACCOUNT", "STREAM", "OUTCOME", "AT"
    );
    for v in &report.viewers {
        let _ = writeln!(
            out,
            "{:<6}  {:<account_width$}  {:<stream_width$}  {:<8}  {:>9}  {}",
            v.viewer,
            v.account,
            v.stream_id,
            v.outcome.as_str(),
            offset(v.at),
            viewer_detail(v)
        );
    }
    let c = report.counts;
    let _ = writeln!(
        out,
        "{} viewers: {} admitted, {} refused, {} cut, {} failed in {:.1}s",
        report.streams, c.admitted, c.refused, c.cut, c.failed, report.elapsed_seconds
    );
    out
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

impl LatencySummary {
    /// Percentiles of a histogram of microseconds, in milliseconds.
    pub fn from_micros(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: histogram.len(),
            mean: histogram.mean() / 1000.0,
            p50: ms(histogram.value_at_quantile(0.5)),
            p90: ms(histogram.value_at_quantile(0.9)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
        }
    }
}

/// The result of `streamctl load`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    /// The endpoint loaded.
    pub endpoint: String,
    /// Requests per second asked for.
    pub requested_rate: f64,
    /// Responses per second obtained: responses / max(run time, duration).
    pub achieved_rate: f64,
    /// Sending time, seconds.
    pub duration_seconds: f64,
    /// From the first send to the last response (or the duration if longer), seconds.
    pub elapsed_seconds: f64,
    /// Distinct accounts.
    pub accounts: u64,
    /// Heartbeats per viewer between open and end.
    pub heartbeats_per_viewer: u32,
    /// Seconds between a viewer's consecutive requests.
    pub heartbeat_interval_seconds: f64,
    /// Most requests in flight.
    pub concurrency: u32,
    /// Requests the schedule planned: rate × duration.
    pub scheduled: u64,
    /// Requests sent.
    pub sent: u64,
    /// Planned requests not sent because the duration was over (the target could not keep up).
    pub unsent: u64,
    /// Requests that got an HTTP response.
    pub responses: u64,
    /// Requests sent per operation (`open`, `heartbeat`, `end`).
    pub operations: BTreeMap<String, u64>,
    /// Responses by HTTP status code.
    pub status_counts: BTreeMap<String, u64>,
    /// Requests without a response, by kind (`connect`, `timeout`, `other`).
    pub transport_errors: BTreeMap<String, u64>,
    /// Latency of responses, from the intended send time to the end of the response.
    pub latency_ms: LatencySummary,
    /// The same per operation.
    pub latency_by_operation_ms: BTreeMap<String, LatencySummary>,
}

fn latency_row(out: &mut String, name: &str, l: &LatencySummary) {
    let _ = writeln!(
        out,
        "  {name:<10} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
        l.count, l.p50, l.p99, l.p999, l.max, l.mean
    );
}

/// The load report as text.
pub fn format_load(report: &LoadReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "target      {}", report.endpoint);
    let _ = writeln!(
        out,
        "throughput  {:.1}/s achieved of {:.1}/s requested ({:.1}%)",
        report.achieved_rate,
        report.requested_rate,
        percent(report.achieved_rate, report.requested_rate)
    );
    let _ = writeln!(
        out,
        "requests    {} scheduled, {} sent, {} unsent, {} responses in {:.1}s",
        report.scheduled, report.sent, report.unsent, report.responses, report.elapsed_seconds
    );
    let _ = writeln!(
        out,
        "mix         {} (each viewer: open, {} heartbeats {:.3}s apart, end; {} accounts)",
        join_counts(&report.operations),
        report.heartbeats_per_viewer,
        report.heartbeat_interval_seconds,
        report.accounts
    );
    let _ = writeln!(out, "status      {}", join_counts(&report.status_counts));
    if !report.transport_errors.is_empty() {
        let _ = writeln!(out, "errors      {}", join_counts(&report.transport_errors));
    }
    let _ = writeln!(
        out,
        "latency ms  {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "count", "p50", "p99", "p99.9", "max", "mean"
    );
    latency_row(&mut out, "all", &report.latency_ms);
    for (op, l) in &report.latency_by_operation_ms {
        latency_row(&mut out, op, l);
    }
    out
}

fn percent(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        100.0 * part / whole
    } else {
        0.0
    }
}

/// `a=1 b=2`, or `none`.
pub fn join_counts(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// How a candidate run compares with a baseline run (e.g. the sidecar against the HTTP floor).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Comparison {
    /// Baseline endpoint.
    pub baseline: String,
    /// Candidate endpoint.
    pub candidate: String,
    /// Requested rate of the runs (the candidate's).
    pub requested_rate: f64,
    /// Achieved rates.
    pub baseline_rate: f64,
    /// Achieved rates.
    pub candidate_rate: f64,
    /// candidate / baseline achieved rate: 1.0 means the candidate keeps up with the baseline.
    pub throughput_ratio: Option<f64>,
    /// Baseline latency.
    pub baseline_latency_ms: LatencySummary,
    /// Candidate latency.
    pub candidate_latency_ms: LatencySummary,
    /// candidate / baseline median latency.
    pub p50_ratio: Option<f64>,
    /// candidate / baseline 99th percentile latency.
    pub p99_ratio: Option<f64>,
    /// candidate / baseline 99.9th percentile latency.
    pub p999_ratio: Option<f64>,
}

/// `a / b`, or none when `b` is not positive.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite()).then(|| a / b)
}

/// Compares two load reports.
pub fn compare(baseline: &LoadReport, candidate: &LoadReport) -> Comparison {
    let (b, c) = (&baseline.latency_ms, &candidate.latency_ms);
    Comparison {
        baseline: baseline.endpoint.clone(),
        candidate: candidate.endpoint.clone(),
        requested_rate: candidate.requested_rate,
        baseline_rate: baseline.achieved_rate,
        candidate_rate: candidate.achieved_rate,
        throughput_ratio: ratio(candidate.achieved_rate, baseline.achieved_rate),
        baseline_latency_ms: *b,
        candidate_latency_ms: *c,
        p50_ratio: ratio(c.p50, b.p50),
        p99_ratio: ratio(c.p99, b.p99),
        p999_ratio: ratio(c.p999, b.p999),
    }
}

fn show_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".into(), |r| format!("{r:.2}x"))
}

/// The comparison as text.
pub fn format_comparison(c: &Comparison) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "baseline   {}", c.baseline);
    let _ = writeln!(out, "candidate  {}", c.candidate);
    let _ = writeln!(
        out,
        "{:<11} {:>12} {:>12} {:>8}",
        "", "baseline", "candidate", "ratio"
    );
    let _ = writeln!(
        out,
        "{:<11} {:>10.1}/s {:>10.1}/s {:>8}",
        "throughput",
        c.baseline_rate,
        c.candidate_rate,
        show_ratio(c.throughput_ratio)
    );
    for (name, b, k, r) in [
        (
            "p50 ms",
            c.baseline_latency_ms.p50,
            c.candidate_latency_ms.p50,
            c.p50_ratio,
        ),
        (
            "p99 ms",
            c.baseline_latency_ms.p99,
            c.candidate_latency_ms.p99,
            c.p99_ratio,
        ),
        (
            "p99.9 ms",
            c.baseline_latency_ms.p999,
            c.candidate_latency_ms.p999,
            c.p999_ratio,
        ),
    ] {
        let _ = writeln!(out, "{name:<11} {b:>12.3} {k:>12.3} {:>8}", show_ratio(r));
    }
    out
}

/// An account's sessions as a table.
pub fn format_sessions(list: &AccountSessions) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "account {:?}: {} of {} streams active",
        list.account,
        list.sessions.len(),
        list.limit
    );
    if list.sessions.is_empty() {
        return out;
    }
    let width = |f: fn(&crate::client::Session) -> usize, title: &str| {
        list.sessions
            .iter()
            .map(f)
            .chain([title.len()])
            .max()
            .unwrap_or(0)
    };
    let id_width = width(|s| s.session_id.len(), "SESSION");
    let stream_width = width(|s| s.stream_id.len(), "STREAM");
    let _ = writeln!(
        out,
        "{:<id_width$}  {:<stream_width$}  {:<7}  {:<24}  EXPIRES",
        "SESSION", "STREAM", "STATE", "CREATED"
    );
    for s in &list.sessions {
        let _ = writeln!(
            out,
            "{:<id_width$}  {:<stream_width$}  {:<7}  {:<24}  {}",
            s.session_id, s.stream_id, s.state, s.created_at, s.expires_at
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Session;

    fn viewer(n: u32, outcome: Outcome) -> ViewerReport {
        ViewerReport {
            viewer: n,
            account: "123".into(),
            stream_id: format!("sim-{n}"),
            outcome,
            at: 0.1 * f64::from(n),
            session_id: None,
            admitted_at: None,
            ended_at: None,
            reason: None,
            heartbeats: 0,
            heartbeat_at: Vec::new(),
            media_bytes: None,
            limit: None,
            active: None,
            message: None,
        }
    }

    #[test]
    fn counts_outcomes() {
        let viewers = [
            viewer(1, Outcome::Admitted),
            viewer(2, Outcome::Admitted),
            viewer(3, Outcome::Refused),
            viewer(4, Outcome::Cut),
        ];
        assert_eq!(
            OutcomeCounts::of(&viewers),
            OutcomeCounts {
                admitted: 2,
                refused: 1,
                cut: 1,
                failed: 0
            }
        );
    }

    #[test]
    fn simulate_text_has_a_row_per_viewer_and_a_summary() {
        let mut refused = viewer(2, Outcome::Refused);
        refused.reason = Some("limit_exceeded".into());
        refused.limit = Some(1);
        refused.active = Some(1);
        let mut cut = viewer(3, Outcome::Cut);
        cut.reason = Some("evicted".into());
        cut.admitted_at = Some(0.0);
        cut.heartbeats = 2;
        let mut admitted = viewer(1, Outcome::Admitted);
        admitted.heartbeats = 3;
        admitted.ended_at = Some(30.0);
        let viewers = vec![admitted, refused, cut];
        let report = SimulateReport {
            endpoint: "http://x/".into(),
            account: Some("123".into()),
            streams: 3,
            duration_seconds: 30.0,
            elapsed_seconds: 30.04,
            counts: OutcomeCounts::of(&viewers),
            viewers,
        };
        let text = format_simulate(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[1].contains("admitted") && lines[1].contains("3 heartbeats, ended +30.000s"));
        assert!(lines[2].contains("limit_exceeded: limit 1, 1 active"));
        assert!(lines[3].contains("evicted (admitted +0.000s, 2 heartbeats)"));
        assert!(lines[3].contains("+0.300s"));
        assert_eq!(
            lines[4],
            "3 viewers: 1 admitted, 1 refused, 1 cut, 0 failed in 30.0s"
        );
    }

    #[test]
    fn simulate_json_is_camel_case_and_skips_empty_fields() {
        let v = viewer(1, Outcome::Refused);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["outcome"], "refused");
        assert_eq!(json["streamId"], "sim-1");
        assert!(json.get("sessionId").is_none());
    }

    #[test]
    fn latency_summary_reads_microseconds_as_milliseconds() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap(); // 1 ms .. 1000 ms
        }
        let s = LatencySummary::from_micros(&h);
        assert_eq!(s.count, 1000);
        assert!((s.p50 - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.p99 - 990.0).abs() < 1.0, "{s:?}");
        assert!((s.p999 - 999.0).abs() < 1.0, "{s:?}");
        assert!((s.max - 1000.0).abs() < 1.0, "{s:?}");
        assert_eq!(
            LatencySummary::from_micros(&Histogram::new(3).unwrap()),
            LatencySummary::default()
        );
    }

    fn load(endpoint: &str, rate: f64, p50: f64, p99: f64) -> LoadReport {
        LoadReport {
            endpoint: endpoint.into(),
            requested_rate: 1000.0,
            achieved_rate: rate,
            duration_seconds: 10.0,
            elapsed_seconds: 10.0,
            accounts: 10,
            heartbeats_per_viewer: 4,
            heartbeat_interval_seconds: 1.0,
            concurrency: 8,
            scheduled: 10_000,
            sent: 10_000,
            unsent: 0,
            responses: 10_000,
            operations: BTreeMap::from([("open".into(), 10_000)]),
            status_counts: BTreeMap::from([("201".into(), 10_000)]),
            transport_errors: BTreeMap::new(),
            latency_ms: LatencySummary {
                count: 10_000,
                p50,
                p99,
                ..LatencySummary::default()
            },
            latency_by_operation_ms: BTreeMap::new(),
        }
    }

    #[test]
    fn comparison_ratios() {
        let c = compare(
            &load("floor", 1000.0, 0.5, 2.0),
            &load("sidecar", 800.0, 1.0, 3.0),
        );
        assert_eq!(c.throughput_ratio, Some(0.8));
        assert_eq!(c.p50_ratio, Some(2.0));
        assert_eq!(c.p99_ratio, Some(1.5));
        assert_eq!(c.p999_ratio, None); // baseline p99.9 is 0 here
        let text = format_comparison(&c);
        assert!(text.contains("0.80x") && text.contains("2.00x") && text.contains("n/a"));
    }

    #[test]
    fn load_text_mentions_rates_and_statuses() {
        let text = format_load(&load("http://x/", 950.0, 0.5, 2.0));
        assert!(
            text.contains("950.0/s achieved of 1000.0/s requested (95.0%)"),
            "{text}"
        );
        assert!(text.contains("status      201=10000"), "{text}");
        assert!(!text.contains("errors"));
    }

    #[test]
    fn sessions_table() {
        let session = Session {
            session_id: "0".repeat(32),
            account: "a".into(),
            stream_id: "tv".into(),
            state: "active".into(),
            reason: None,
            created_at: "2026-01-01T00:00:00.000Z".into(),
            expires_at: "2026-01-01T00:01:30.000Z".into(),
            heartbeat_interval_seconds: 30,
            limit: 3,
            active_sessions: 1,
        };
        let text = format_sessions(&AccountSessions {
            account: "a".into(),
            limit: 3,
            sessions: vec![session],
        });
        assert!(text.starts_with("account \"a\": 1 of 3 streams active\n"));
        assert_eq!(text.lines().count(), 3);
    }
}
