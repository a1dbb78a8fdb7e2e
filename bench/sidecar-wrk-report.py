"""Reads bench/sidecar-wrk's runs and prints each figure as a ratio against its floor from the same
round, with the median and the range over the rounds. Standard library only."""
import os
import re
import statistics
import sys

out, repeats = sys.argv[1], int(sys.argv[2])


def read(name):
    text = open(f"{out}/{name}.txt").read()
    ticks = dict(kv.split("=") for kv in re.search(r"cpu_ticks (.*)", text).group(1).split())
    hz = float(ticks.pop("hz"))
    cpu = {k: int(v) / hz for k, v in ticks.items()}
    if "requests per second" in text or "throughput summary" in text:  # redis-benchmark
        rps = float(re.search(r"throughput summary: ([\d.]+) requests per second", text).group(1))
        lat = re.search(r"latency summary \(msec\):\s*\n\s*avg.*\n\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)", text)
        p50 = float(lat.group(3))
        n = int(re.search(r"(\d+) requests completed", text).group(1))
        return {"rps": rps, "p50": p50, "n": n, "cpu": cpu, "errors": 0}
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    n = int(re.search(r"(\d+) requests in", text).group(1))
    m = re.search(r"50%\s+([\d.]+)(us|ms|s)\b", text)
    p50 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"rps": rps, "p50": p50, "n": n, "cpu": cpu, "errors": int(errors.group(1)) if errors else 0}


def load_average(name):
    m = re.search(r"load_average ([\d.]+)", open(f"{out}/{name}.txt").read())
    return m.group(1) if m else "?"


p50_only = not os.path.exists(f"{out}/script-c50-1.txt")


rows = {"throughput": [], "p50": [], "cpu": []}
detail = []
for i in range(1, repeats + 1):
    if p50_only:  # BENCH_ONLY=p50: the one-client runs alone
        s1, r1, m1 = read(f"script-c1-{i}"), read(f"sidecar-redis-c1-{i}"), read(f"sidecar-memory-c1-{i}")
        rows["p50"].append((r1["p50"], m1["p50"] + s1["p50"]))
        detail.append(
            f"round {i}: p50 sidecar on Redis {r1['p50']:.3f} ms, sidecar on memory {m1['p50']:.3f} ms, "
            f"minimal script {s1['p50']:.3f} ms; load average after each: "
            f"{load_average(f'script-c1-{i}')} / {load_average(f'sidecar-redis-c1-{i}')} / {load_average(f'sidecar-memory-c1-{i}')}"
        )
        continue
    s50, r50, m50 = read(f"script-c50-{i}"), read(f"sidecar-redis-c50-{i}"), read(f"sidecar-memory-c50-{i}")
    s1, r1, m1 = read(f"script-c1-{i}"), read(f"sidecar-redis-c1-{i}"), read(f"sidecar-memory-c1-{i}")
    rows["throughput"].append((r50["rps"], s50["rps"]))
    rows["p50"].append((r1["p50"], m1["p50"] + s1["p50"]))
    cpu_redis = (r50["cpu"]["sidecar_redis"] + r50["cpu"]["redis"]) / r50["n"] * 1e6
    cpu_floor = m50["cpu"]["sidecar_memory"] / m50["n"] * 1e6 + s50["cpu"]["redis"] / s50["n"] * 1e6
    rows["cpu"].append((cpu_redis, cpu_floor))
    detail.append(
        f"round {i}: sidecar on Redis {r50['rps']:.0f} req/s (c50), p50 {r1['p50']:.3f} ms (c1), "
        f"CPU/request sidecar {r50['cpu']['sidecar_redis'] / r50['n'] * 1e6:.1f} us + Redis {r50['cpu']['redis'] / r50['n'] * 1e6:.1f} us; "
        f"sidecar on memory {m50['rps']:.0f} req/s, p50 {m1['p50']:.3f} ms, CPU/request {m50['cpu']['sidecar_memory'] / m50['n'] * 1e6:.1f} us; "
        f"minimal script {s50['rps']:.0f} calls/s (c50), p50 {s1['p50']:.3f} ms (c1), Redis CPU/call {s50['cpu']['redis'] / s50['n'] * 1e6:.1f} us; "
        f"non-2xx: {r50['errors']} / {m50['errors']} (DELETEs of sessions not yet opened); "
        f"load average after the one-client runs {load_average(f'sidecar-redis-c1-{i}')}"
    )


def line(label, pairs, unit, fmt="{:.3f}"):
    ratios = [a / b for a, b in pairs]
    med = statistics.median(ratios)
    a = statistics.median(p[0] for p in pairs)
    b = statistics.median(p[1] for p in pairs)
    print(f"{label:44s} {fmt.format(a):>9s} {fmt.format(b):>9s} {unit:6s} ratio {med:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


print(f"{'figure':44s} {'sidecar':>9s} {'floor':>9s}")
if not p50_only:
    line("throughput, 50 clients (req/s) vs script", rows["throughput"], "/s", "{:.0f}")
line("p50, 1 client vs memory p50 + script p50", rows["p50"], "ms")
if not p50_only:
    line("CPU per request, sidecar + Redis", rows["cpu"], "us", "{:.1f}")
print()
print("\n".join(detail))
