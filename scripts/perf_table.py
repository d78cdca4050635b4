#!/usr/bin/env python3
"""Prints the README's performance tables from the JSON of benchmark runs.

    scripts/perf_table.py target/bench            # every */bench.json, */sweep json, compare.json

Rows: one per bench JSON (setup from its directory name), the points of every sweep JSON, and
the etcd comparison (compare.json from scripts/etcd_compare.sh).
"""
import glob
import json
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "target/bench"


def load(path):
    with open(path) as f:
        return json.load(f)


def ms(v):
    return f"{v:.0f} ms"


benches, sweeps, compares = [], [], []
for path in sorted(glob.glob(os.path.join(root, "**", "*.json"), recursive=True)):
    d = load(path)
    name = os.path.relpath(os.path.dirname(path), root)
    if "points" in d:
        sweeps.append((name, d))
    elif "etcd_puts_per_s" in d:
        compares.append((name, d))
    elif "throughput_per_s" in d:
        benches.append((name, d))

if benches:
    print("| run | settings | committed/s | p50 | p99 | p999 | load generator CPU/request |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, d in benches:
        settings = f"{d['mix']}, {d['clients']} clients × {d['inflight']} frames × {d['batch']}, {d['duration_s']:.0f} s"
        if d.get("offered_rate_per_s"):
            settings += f", open loop {d['offered_rate_per_s']:,.0f}/s"
        print(f"| {name} | {settings} | {d['throughput_per_s']:,.0f} | {ms(d['latency_ms_p50'])} | "
              f"{ms(d['latency_ms_p99'])} | {ms(d['latency_ms_p999'])} | {d.get('loadgen_cpu_us_per_request', 0):.1f} µs |")
for name, d in sweeps:
    print(f"\nSweep `{name}`:\n")
    print("| offered/s | committed/s | p50 | p99 | p999 |")
    print("| --- | --- | --- | --- | --- |")
    for p in d["points"]:
        print(f"| {p['offered_per_s']:,.0f} | {p['throughput_per_s']:,.0f} | {ms(p['latency_ms_p50'])} | "
              f"{ms(p['latency_ms_p99'])} | {ms(p['latency_ms_p999'])} |")
for name, d in compares:
    print(f"\nSame run (`{name}`): etcd {d['etcd_puts_per_s']:,.0f} unsigned puts/s ({d['etcd_load']}); "
          f"tally {d['tally_signed_requests_per_s']:,.0f} signed requests/s, p99 {ms(d['tally_latency_ms_p99'])}: "
          f"**{d['ratio']:.1f}×** etcd." if d.get("ratio") else "")
