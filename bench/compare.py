#!/usr/bin/env python3
"""Medians of repeated bench/run.py results, side by side: the numbers of an A/B comparison.

    python bench/compare.py base='bench/results/*-ab-8b820c9-*.json' head='bench/results/*-ab-7945ae7-*.json'

Each argument is NAME=GLOB; every results file the glob matches is one run of that group. For each scenario
it prints, per group, the number of runs and the median of: deliveries/s (throughput scenarios), p50 / p99
latency in ms (latency scenarios, also per protocol when the clients mixed them), pushd's CPU % in the
measured window, deliveries per second of pushd's CPU (throughput scenarios: what a closed loop limited by
the load generator still says about pushd), the load generator's worst publishing lag (latency scenarios:
seconds here mean its own core was starved, and the latency measures the harness), and the range of the load average (1 minute) at the scenarios'
start. A run that broke is
left out of the medians and counted.
"""

from __future__ import annotations

import glob
import json
import statistics
import sys
from collections import defaultdict
from typing import Any


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def collect(pattern: str) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """scenario name -> its results in the matched files; and how many files matched."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    files = sorted(glob.glob(pattern))
    for path in files:
        with open(path) as f:
            doc = json.load(f)
        for scenario in doc.get("scenarios", []):
            runs[scenario["name"]].append(scenario)
    return runs, len(files)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in results if r.get("ok")]
    lg = [r["loadgen"] for r in good]
    row: dict[str, Any] = {"runs": len(good), "broken": len(results) - len(good)}
    row["deliveries_per_s"] = _median([x["deliveries_per_s"] for x in lg if x.get("mode") == "throughput"])
    row["p50_ms"] = _median([x["latency"]["p50_ms"] for x in lg if x.get("latency")])
    row["p99_ms"] = _median([x["latency"]["p99_ms"] for x in lg if x.get("latency")])
    by_protocol: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for x in lg:
        for name, lat in (x.get("latency_by_protocol") or {}).items():
            by_protocol[name]["p50"].append(lat["p50_ms"])
            by_protocol[name]["p99"].append(lat["p99_ms"])
    row["by_protocol"] = {name: {k: _median(v) for k, v in values.items()} for name, values in by_protocol.items()}
    row["pushd_cpu_pct"] = _median([r["cpu_pct"]["pushd"] for r in good if r.get("cpu_pct")])
    # throughput per unit of pushd's CPU: what a closed loop bound by the client still says about pushd
    row["per_cpu_s"] = _median([r["loadgen"]["deliveries_per_s"] / (r["cpu_pct"]["pushd"] / 100) for r in good
                                if r["loadgen"].get("mode") == "throughput" and r.get("cpu_pct")
                                and r["cpu_pct"]["pushd"] > 0])
    row["lost"] = sum(x.get("lost", 0) for x in lg)
    # latency: how late the load generator's own publishing timer fell (a starved client core shows here)
    row["pacing_lag_ms"] = _median([x["pacing_max_lag_ms"] for x in lg if x.get("pacing_max_lag_ms") is not None])
    loads = [r["load_average"][0] for r in results if r.get("load_average")]
    row["load_1min"] = (min(loads), max(loads)) if loads else None
    return row


def main(argv: list[str]) -> int:
    groups = []
    for arg in argv:
        name, equals, pattern = arg.partition("=")
        if not equals or not name or not pattern:
            print(__doc__, file=sys.stderr)
            return 2
        runs, files = collect(pattern)
        if not files:
            print(f"compare.py: {pattern!r} matches no file", file=sys.stderr)
            return 2
        groups.append((name, runs, files))
    if not groups:
        print(__doc__, file=sys.stderr)
        return 2
    scenarios = list(dict.fromkeys(name for _, runs, _ in groups for name in runs))
    print("group: files  " + "  ".join(f"{name}: {files}" for name, _, files in groups))
    header = f"{'scenario':<36} {'group':<12} {'runs':>4} {'deliveries/s':>13} {'p50 ms':>8} {'p99 ms':>8} " \
             f"{'pushd CPU %':>11} {'per CPU-s':>10} {'pub lag ms':>10} {'lost':>5} {'load 1m':>11}  per protocol p50 / p99 ms"
    print(header)
    print("-" * len(header))
    for scenario in scenarios:
        for name, runs, _ in groups:
            if scenario not in runs:
                continue
            row = summarize(runs[scenario])
            load = row["load_1min"]
            split = ", ".join(f"{proto} {_fmt(v['p50'], 2)} / {_fmt(v['p99'], 1)}"
                              for proto, v in row["by_protocol"].items()) if len(row["by_protocol"]) > 1 else ""
            broken = f" (+{row['broken']} broken)" if row["broken"] else ""
            print(f"{scenario:<36} {name:<12} {row['runs']:>4} {_fmt(row['deliveries_per_s']):>13} "
                  f"{_fmt(row['p50_ms'], 2):>8} {_fmt(row['p99_ms'], 1):>8} {_fmt(row['pushd_cpu_pct'], 0):>11} "
                  f"{_fmt(row['per_cpu_s']):>10} {_fmt(row['pacing_lag_ms']):>10} "
                  f"{row['lost']:>5} {(f'{load[0]:.1f}-{load[1]:.1f}' if load else '-'):>11}  {split}{broken}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
