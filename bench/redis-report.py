#!/usr/bin/env python3
"""Summarises a bench/redis run: ratios, the latency table and an SVG plot.

Usage: bench/redis-report.py OUT_DIR REPEATS N [N ...]

Reads OUT_DIR/n{N}-{sidecar,script,ping}-{saturation,latency}-{1..REPEATS}.json (streamctl load
reports and redis_floor reports of the same shape) and OUT_DIR/n{N}-info.txt; every figure is the
median over the repeats; prints the summary tables,
writes OUT_DIR/results.tsv and draws OUT_DIR/redis-latency.svg (p50 and p99 against live
sessions, log-log). Standard library only, so the bench needs nothing beyond Python 3.
"""

import json
import math
import statistics
import sys
from pathlib import Path

TARGETS = ("sidecar", "script", "ping")
LABELS = {"sidecar": "sidecar (HTTP + engine + Redis)", "script": "Lua script on Redis", "ping": "PING"}
COLOURS = {"sidecar": "#1f77b4", "script": "#d62728", "ping": "#2ca02c"}


def load(out, n, target, phase):
    return json.loads((out / f"n{n}-{target}-{phase}.json").read_text())


def median_summary(reports, op=None):
    """Median of each latency figure over repeated runs (of one operation, if given)."""
    summaries = [r["latencyByOperationMs"].get(op, {}) if op else r["latencyMs"] for r in reports]
    return {q: statistics.median(s.get(q, 0.0) for s in summaries) for q in ("p50", "p90", "p99", "p999", "max")}


def info(out, n):
    fields = {}
    for line in (out / f"n{n}-info.txt").read_text().splitlines():
        key, _, value = line.partition(" ")
        fields[key] = value
    return fields


def admissions(report):
    # The sidecar answers an admission with 201; the floor counts the script's reply kind.
    counts = report["statusCounts"]
    return (counts.get("201", 0) + counts.get("admitted", 0)) / report["elapsedSeconds"]


def problems(report):
    """Anything that makes a run's figures suspect: errors, unsent requests, refusals."""
    notes = []
    errors = sum(report["transportErrors"].values())
    if errors:
        notes.append(f"{errors} errors")
    if report["unsent"]:
        notes.append(f"{report['unsent']} unsent")
    bad = {k: v for k, v in report["statusCounts"].items() if k not in ("201", "204", "admitted", "ended", "PONG")}
    if bad:
        notes.append("replies " + ", ".join(f"{k}: {v}" for k, v in sorted(bad.items())))
    return notes


def ratio(a, b):
    return a / b if b > 0 else float("nan")


def sessions_label(n):
    exponent = math.log10(n) if n > 0 else 0
    return f"1e{exponent:.0f}" if n > 0 and exponent.is_integer() else str(n)


def tick_values(lo, hi):
    """1-2-5 ticks covering [lo, hi] for a log axis."""
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10**e
            if lo <= v <= hi:
                ticks.append(v)
    return ticks


def plot(ns, latency, path, rate, repeats):
    """p50 (solid) and p99 (dashed) of each target against live sessions, both axes log."""
    width, height = 760, 470
    left, right, top, bottom = 70, 230, 40, 60
    pw, ph = width - left - right, height - top - bottom
    values = [latency[n][t][q] for n in ns for t in TARGETS for q in ("p50", "p99")]
    steps = [m * 10**e for e in range(-3, 6) for m in (1, 2, 5)]
    y_lo = max([v for v in steps if v <= max(min(values), 1e-3)], default=steps[0])
    y_hi = min([v for v in steps if v >= max(values)], default=steps[-1])
    if y_hi <= y_lo:
        y_hi = y_lo * 10
    x_lo, x_hi = math.log10(min(ns)), math.log10(max(ns))
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    pad = (x_hi - x_lo) * 0.05

    def x(n):
        return left + (math.log10(n) - x_lo + pad) / (x_hi - x_lo + 2 * pad) * pw

    def y(ms):
        return top + ph - (math.log10(ms) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo)) * ph

    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left + pw / 2}" y="22" text-anchor="middle" font-size="14">'
        f"p50 / p99 latency against live sessions in Redis ({rate:.0f} req/s, median of {repeats} runs)</text>",
    ]
    for v in tick_values(y_lo, y_hi):
        svg.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        svg.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    for n in ns:
        svg.append(f'<line x1="{x(n):.1f}" x2="{x(n):.1f}" y1="{top}" y2="{top + ph}" stroke="#ddd"/>')
        svg.append(f'<text x="{x(n):.1f}" y="{top + ph + 18}" text-anchor="middle">{sessions_label(n)}</text>')
    svg.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    svg.append(
        f'<text x="{left + pw / 2}" y="{height - 18}" text-anchor="middle">live sessions in Redis (log scale)</text>'
    )
    svg.append(
        f'<text transform="translate(18 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
        "latency, ms (log scale, from intended send time)</text>"
    )
    legend_y = top + 10
    for t in TARGETS:
        for q, dash in (("p50", ""), ("p99", ' stroke-dasharray="6 4"')):
            points = " ".join(f"{x(n):.1f},{y(latency[n][t][q]):.1f}" for n in ns)
            svg.append(f'<polyline points="{points}" fill="none" stroke="{COLOURS[t]}" stroke-width="2"{dash}/>')
            for n in ns:
                svg.append(f'<circle cx="{x(n):.1f}" cy="{y(latency[n][t][q]):.1f}" r="3" fill="{COLOURS[t]}"/>')
            lx = left + pw + 15
            svg.append(
                f'<line x1="{lx}" x2="{lx + 30}" y1="{legend_y}" y2="{legend_y}" '
                f'stroke="{COLOURS[t]}" stroke-width="2"{dash}/>'
            )
            svg.append(f'<text x="{lx + 36}" y="{legend_y + 4}">{t} {q}</text>')
            legend_y += 20
    svg.append(
        f'<text x="{left + pw + 15}" y="{legend_y + 10}" font-size="10" fill="#555">'
        "sidecar: HTTP + engine + Redis</text>"
    )
    svg.append(
        f'<text x="{left + pw + 15}" y="{legend_y + 24}" font-size="10" fill="#555">'
        "script: same Lua, sent directly</text>"
    )
    svg.append("</svg>")
    path.write_text("\n".join(svg) + "\n")


def main():
    out = Path(sys.argv[1])
    repeats = int(sys.argv[2])
    ns = [int(n) for n in sys.argv[3:]]
    sat = {n: {t: [load(out, n, t, f"saturation-{i}") for i in range(1, repeats + 1)] for t in TARGETS} for n in ns}
    lat = {n: {t: [load(out, n, t, f"latency-{i}") for i in range(1, repeats + 1)] for t in TARGETS} for n in ns}
    rps = {n: {t: statistics.median(r["achievedRate"] for r in sat[n][t]) for t in TARGETS} for n in ns}
    adm = {n: {t: statistics.median(admissions(r) for r in sat[n][t]) for t in TARGETS} for n in ns}
    latency = {n: {t: median_summary(lat[n][t]) for t in TARGETS} for n in ns}
    meta = {n: info(out, n) for n in ns}

    print(f"== throughput: offered more than any target sustains (requests/s, median of {repeats} runs;"
          " half the requests are admissions)")
    print(f"{'live':>6} {'sidecar':>10} {'script':>10} {'ping':>10} {'adm/s sc':>10} {'adm/s lua':>10}"
          f" {'sidecar/script':>15} {'script/ping':>12}")
    for n in ns:
        s, c, p = (rps[n][t] for t in TARGETS)
        print(f"{sessions_label(n):>6} {s:>10.0f} {c:>10.0f} {p:>10.0f} {adm[n]['sidecar']:>10.0f}"
              f" {adm[n]['script']:>10.0f} {ratio(s, c):>14.2f}x {ratio(c, p):>11.2f}x")

    rate = lat[ns[0]]["sidecar"][0]["requestedRate"]
    print()
    print(f"== latency at {rate:.0f} requests/s (ms, from the intended send time; median of {repeats} runs)")
    print(f"{'live':>6} {'sidecar p50':>11} {'p99':>8} {'script p50':>11} {'p99':>8} {'ping p50':>9} {'p99':>8}"
          f" {'sc/lua p50':>11} {'p99':>7} {'lua/ping p50':>13} {'p99':>7}")
    for n in ns:
        s, c, p = (latency[n][t] for t in TARGETS)
        print(f"{sessions_label(n):>6} {s['p50']:>11.3f} {s['p99']:>8.3f} {c['p50']:>11.3f} {c['p99']:>8.3f}"
              f" {p['p50']:>9.3f} {p['p99']:>8.3f} {ratio(s['p50'], c['p50']):>10.2f}x {ratio(s['p99'], c['p99']):>6.2f}x"
              f" {ratio(c['p50'], p['p50']):>12.2f}x {ratio(c['p99'], p['p99']):>6.2f}x")

    print()
    print("== latency added at the same rate (ms): every target shares the generator's own delay,")
    print("   so differences isolate each layer better than ratios do")
    print(f"{'live':>6} {'sidecar-script p50':>19} {'p99':>8} {'script-ping p50':>16} {'p99':>8}")
    for n in ns:
        s, c, p = (latency[n][t] for t in TARGETS)
        print(f"{sessions_label(n):>6} {s['p50'] - c['p50']:>19.3f} {s['p99'] - c['p99']:>8.3f}"
              f" {c['p50'] - p['p50']:>16.3f} {c['p99'] - p['p99']:>8.3f}")

    print()
    print("== admissions only (open requests) at the same rate: p50 / p99 ms")
    for n in ns:
        s = median_summary(lat[n]["sidecar"], "open")
        c = median_summary(lat[n]["script"], "open")
        print(f"{sessions_label(n):>6} sidecar {s.get('p50', 0):.3f} / {s.get('p99', 0):.3f}"
              f"   script {c.get('p50', 0):.3f} / {c.get('p99', 0):.3f}")

    print()
    print("== every run, in the order run (the medians above come from these)")
    print("   throughput, requests/s          latency p50 / p99 ms")
    for n in ns:
        for t in TARGETS:
            through = " ".join(f"{r['achievedRate']:>7.0f}" for r in sat[n][t])
            runs = "   ".join(f"{r['latencyMs']['p50']:.3f} / {r['latencyMs']['p99']:.3f}" for r in lat[n][t])
            print(f"{sessions_label(n):>6} {t:<8} {through}   {runs}")

    print()
    print("== the store")
    for n in ns:
        m = meta[n]
        used = int(m.get("used_memory", 0)) / 2**20
        bench_ping = (out / f"n{n}-redis-benchmark-ping.txt")
        bench_ping = bench_ping.read_text().strip() if bench_ping.exists() else "n/a"
        print(f"{sessions_label(n):>6} keys {m.get('dbsize', '?')}, Redis memory {used:.0f} MiB,"
              f" sidecar store errors so far {m.get('store_errors', '?')}; redis-benchmark -c 50: {bench_ping}")

    notes = [
        f"{sessions_label(n)} {t} {phase}: {'; '.join(problems(r))}"
        for n in ns
        for phase, runs in [(f"saturation run {i + 1}", {t: sat[n][t][i] for t in TARGETS}) for i in range(repeats)]
        + [(f"latency run {i + 1}", {t: lat[n][t][i] for t in TARGETS}) for i in range(repeats)]
        for t, r in runs.items()
        if problems(r) and not (phase.startswith("saturation") and problems(r) == [f"{r['unsent']} unsent"])
    ]
    if notes:
        print()
        print("== warnings (saturation runs leave requests unsent by design; those are not listed)")
        for note in notes:
            print("  " + note)

    columns = ["live_sessions", "keys", "used_memory_bytes"]
    columns += [f"{t}_saturation_rps" for t in TARGETS] + ["sidecar_admissions_per_s", "script_admissions_per_s"]
    columns += [f"{t}_{q}_ms" for t in TARGETS for q in ("p50", "p99", "p999")]
    rows = ["\t".join(columns)]
    for n in ns:
        row = [n, meta[n].get("dbsize", ""), meta[n].get("used_memory", "")]
        row += [f"{rps[n][t]:.1f}" for t in TARGETS]
        row += [f"{adm[n]['sidecar']:.1f}", f"{adm[n]['script']:.1f}"]
        row += [f"{latency[n][t][q]:.3f}" for t in TARGETS for q in ("p50", "p99", "p999")]
        rows.append("\t".join(map(str, row)))
    (out / "results.tsv").write_text("\n".join(rows) + "\n")
    plot(ns, latency, out / "redis-latency.svg", rate, repeats)


if __name__ == "__main__":
    main()
