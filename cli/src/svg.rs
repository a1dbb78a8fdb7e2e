//! `streamctl simulate --svg FILE`: the run as a timeline picture, one lane per viewer.
//!
//! A lane shows when the viewer was admitted and how long it watched (a bar), each heartbeat
//! (a tick on the bar), and how it ended: a refusal, a cut with its reason, or a failure, each a
//! marker with a label. Every lane is a `<g class="viewer">` carrying `data-viewer`,
//! `data-outcome` and a `<title>` (the tooltip), so the picture can also be read by a program.

use std::fmt::Write as _;

use crate::report::{Outcome, SimulateReport, ViewerReport};

const WIDTH: f64 = 960.0;
const LABEL_WIDTH: f64 = 210.0;
const RIGHT_MARGIN: f64 = 150.0;
const TOP: f64 = 56.0;
const LANE: f64 = 26.0;
const BOTTOM: f64 = 44.0;

const GREEN: &str = "#2e7d32";
const RED: &str = "#c62828";
const ORANGE: &str = "#ef6c00";
const GREY: &str = "#616161";

/// The SVG document of `report`.
pub fn render(report: &SimulateReport) -> String {
    let span = report
        .duration_seconds
        .max(report.elapsed_seconds)
        .max(0.001);
    let plot = WIDTH - LABEL_WIDTH - RIGHT_MARGIN;
    let x = |t: f64| LABEL_WIDTH + (t.clamp(0.0, span) / span) * plot;
    let lanes = report.viewers.len().max(1) as f64;
    let height = TOP + lanes * LANE + BOTTOM;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<title>streamctl simulate: {} viewers against {}</title>"#,
        report.streams,
        escape(&report.endpoint)
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>"##
    );
    let c = &report.counts;
    let _ = writeln!(
        svg,
        r#"<text x="12" y="22" font-size="15" font-weight="bold">{} viewers{}: {} admitted, {} refused, {} cut, {} failed</text>"#,
        report.streams,
        report
            .account
            .as_deref()
            .map(|a| format!(" of account {}", escape(a)))
            .unwrap_or_default(),
        c.admitted,
        c.refused,
        c.cut,
        c.failed
    );
    legend(&mut svg);

    // Time axis: a grid line and a label every `step` seconds.
    let step = nice_step(span);
    let axis_y = TOP + lanes * LANE + 6.0;
    let mut t = 0.0;
    while t <= span + 1e-9 {
        let gx = x(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{gx:.1}" y1="{TOP}" x2="{gx:.1}" y2="{axis_y}" stroke="#e0e0e0"/><text x="{gx:.1}" y="{:.1}" text-anchor="middle" fill="{GREY}">{}s</text>"##,
            axis_y + 16.0,
            trim(t)
        );
        t += step;
    }

    for (i, viewer) in report.viewers.iter().enumerate() {
        lane(&mut svg, viewer, TOP + i as f64 * LANE, span, &x);
    }
    svg.push_str("</svg>\n");
    svg
}

fn legend(svg: &mut String) {
    let items = [
        (GREEN, "watching (admitted)"),
        ("#1b5e20", "heartbeat"),
        (RED, "cut"),
        (ORANGE, "refused"),
        (GREY, "failed"),
    ];
    let mut lx = 12.0;
    for (colour, label) in items {
        let _ = writeln!(
            svg,
            r#"<rect x="{lx}" y="32" width="10" height="10" fill="{colour}"/><text x="{}" y="41">{label}</text>"#,
            lx + 14.0
        );
        lx += 28.0 + label.len() as f64 * 6.5;
    }
}

fn lane(svg: &mut String, v: &ViewerReport, top: f64, span: f64, x: &impl Fn(f64) -> f64) {
    let mid = top + LANE / 2.0;
    let summary = tooltip(v);
    let _ = writeln!(
        svg,
        r#"<g class="viewer" data-viewer="{}" data-outcome="{}"><title>{}</title>"#,
        v.viewer,
        v.outcome.as_str(),
        escape(&summary)
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="end">#{} {}</text>"#,
        LABEL_WIDTH - 8.0,
        mid + 4.0,
        v.viewer,
        escape(&shorten(&v.stream_id, 26))
    );
    if let Some(admitted) = v.admitted_at {
        let until = match v.outcome {
            Outcome::Admitted => v.ended_at.unwrap_or(span),
            _ => v.at,
        };
        let (x0, x1) = (x(admitted), x(until.max(admitted)));
        let _ = writeln!(
            svg,
            r#"<rect class="watching" x="{x0:.1}" y="{:.1}" width="{:.1}" height="12" rx="3" fill="{GREEN}" fill-opacity="0.35" stroke="{GREEN}"/>"#,
            mid - 6.0,
            (x1 - x0).max(1.0)
        );
        for at in &v.heartbeat_at {
            let hx = x(*at);
            let _ = writeln!(
                svg,
                r##"<line class="heartbeat" x1="{hx:.1}" y1="{:.1}" x2="{hx:.1}" y2="{:.1}" stroke="#1b5e20" stroke-width="2"/>"##,
                mid - 6.0,
                mid + 6.0
            );
        }
    }
    let end_x = x(v.at);
    let marker = |svg: &mut String, class: &str, colour: &str, label: String| {
        let _ = writeln!(
            svg,
            r#"<path class="{class}" d="M{:.1} {:.1} l10 10 m0 -10 l-10 10" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}" fill="{colour}">{}</text>"#,
            end_x - 5.0,
            mid - 5.0,
            end_x + 9.0,
            mid + 4.0,
            escape(&label)
        );
    };
    match v.outcome {
        Outcome::Admitted => {}
        Outcome::Refused => marker(
            svg,
            "refused",
            ORANGE,
            format!(
                "refused ({})",
                v.reason.as_deref().unwrap_or("limit_exceeded")
            ),
        ),
        Outcome::Cut => marker(
            svg,
            "cut",
            RED,
            format!("cut: {}", v.reason.as_deref().unwrap_or("gone")),
        ),
        Outcome::Failed => marker(svg, "failed", GREY, "failed".to_string()),
    }
    svg.push_str("</g>\n");
}

fn tooltip(v: &ViewerReport) -> String {
    let mut text = format!(
        "viewer {} · account {} · stream {} · {}",
        v.viewer,
        v.account,
        v.stream_id,
        v.outcome.as_str()
    );
    if let Some(admitted) = v.admitted_at {
        let _ = write!(text, " · admitted at {}s", trim(admitted));
    }
    match v.outcome {
        Outcome::Admitted => {
            if let Some(ended) = v.ended_at {
                let _ = write!(text, " · ended at {}s", trim(ended));
            }
        }
        _ => {
            let _ = write!(text, " at {}s", trim(v.at));
        }
    }
    if let Some(reason) = &v.reason {
        let _ = write!(text, " ({reason})");
    }
    let _ = write!(text, " · {} heartbeats", v.heartbeats);
    if let Some(message) = &v.message {
        let _ = write!(text, " · {message}");
    }
    text
}

/// A step of 1, 2 or 5 times a power of ten giving at most about ten grid lines.
fn nice_step(span: f64) -> f64 {
    let raw = span / 10.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude)
}

fn trim(seconds: f64) -> String {
    let s = format!("{seconds:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let head: String = text.chars().take(max - 1).collect();
        format!("{head}…")
    }
}

/// Escapes text for XML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 forbids (ids are visible ASCII, but messages come from the wire).
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_control_characters() {
        assert_eq!(
            escape("<a href=\"x\">&'\u{1}"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&apos;\u{fffd}"
        );
    }

    #[test]
    fn grid_steps_are_round() {
        assert_eq!(nice_step(30.0), 5.0);
        assert_eq!(nice_step(10.0), 1.0);
        assert_eq!(nice_step(2.5), 0.5);
        assert_eq!(trim(2.500), "2.5");
        assert_eq!(trim(3.0), "3");
    }
}
