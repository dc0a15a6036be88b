#!/usr/bin/env python3
"""Publish API requests/s, single and batch: POST /api/publish in a closed loop against one pushd node.

    python bench/api_publish.py                           # 10 s per mode, 32 requests in flight, batches of 100
    python bench/api_publish.py --seconds 3               # a short version, to check that it works
    python bench/api_publish.py --modes batch --batch 1000 --json
    python bench/api_publish.py -- --api-max-batch 5000   # arguments after -- go to `twistd pushd`

Starts a redis-server and one pushd node (as the integration tests do: tests/integration/pushd_process.py; its
HTTP API on a free port), pushd pinned to the first core, redis-server and the load to the second. For each mode
bench/api_load.js (Node's http, one keep-alive Agent) keeps --concurrency requests in flight for --warmup +
--seconds: `single` posts {"topic":"t1","data":{"n":i}}, `batch` posts {"messages":[...]} with --batch messages
over the topics t0..t9. Requests that complete in the measured --seconds count: requests/s, messages/s, every
status other than 200, latency p50/p99. One wss subscriber to t1 checks that what the API accepted is delivered.
Prints a table and writes bench/results/<UTC time>-api-publish.json (unless --no-save).

Exit status: 0 when every request was answered 200 and every message reached the subscriber, 1 otherwise (or
when the run broke), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from broadcast import PinnedRedis, pushd_findings, run_benchmark, start_pushd
from run import BenchError, Pinning, Proc, cpu_seconds

from tests.integration.pushd_process import PushdProcess

HELPER = BENCH / "api_load.js"
RESULTS = BENCH / "results"
EVENT = re.compile(r"^@@ ")


def wait_event(proc: Proc, name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        line = proc.wait_line(EVENT, max(0.1, deadline - time.monotonic()), stream="err")
        doc = json.loads(line[3:])
        if doc.get("event") == name:
            return doc


def result_line(proc: Proc, timeout: float) -> dict[str, Any]:
    line = proc.wait_line(re.compile(r"^\{"), timeout)
    return dict(json.loads(line))


def run_mode(mode: str, args: argparse.Namespace, node: PushdProcess, redis_pid: int, pin: Pinning) -> dict[str, Any]:
    argv = ["node", str(HELPER), "--api", node.api_url, "--mode", mode, "--seconds", str(args.seconds),
            "--warmup", str(args.warmup), "--concurrency", str(args.concurrency), "--batch", str(args.batch)]
    if not args.no_subscriber:
        argv += ["--ws", node.url.replace("//localhost:", "//127.0.0.1:"), "--ca", node.cert]
    load = Proc(f"api_load-{mode}", pin.client(argv), cwd=BENCH, stdin=subprocess.DEVNULL, merge_stderr=False)
    try:
        pids = {"pushd": node.pid, "load": load.pid, "redis": redis_pid}
        wait_event(load, "window_start", args.warmup + 60)
        t_start, cpu_start = time.monotonic(), {k: cpu_seconds(p) for k, p in pids.items()}
        wait_event(load, "window_end", args.seconds + 60)
        t_end, cpu_end = time.monotonic(), {k: cpu_seconds(p) for k, p in pids.items()}
        result = result_line(load, 60)
        span = t_end - t_start
        result["cpu_pct"] = {k: round(100 * (cpu_end[k] - cpu_start[k]) / span, 1) for k in pids}
        if load.proc.wait(10) != 0:
            raise BenchError(f"api_load.js ({mode}) exited with {load.proc.returncode}:\n{load.tail(20, 'err')}")
        return result
    except BenchError as e:
        raise BenchError(f"{e}\n{load.tail(20, 'err')}") from None
    finally:
        load.stop(timeout=15)


def run(args: argparse.Namespace, pushd_args: list[str], pin: Pinning, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"ok": False, "modes": {}}
    node: PushdProcess | None = None
    with PinnedRedis(pin) as redis:
        try:
            node = start_pushd(workdir, pin, pushd_args, redis.url)
            result.update(pushd_pid=node.pid, api_url=node.api_url, url=node.url)
            time.sleep(1)  # let start-up work (state purge, first heartbeat) finish
            for mode in args.modes:
                result["modes"][mode] = run_mode(mode, args, node, redis.pid or 0, pin)
                time.sleep(1)
            result["ok"] = all(
                r["non_200"] == 0 and r["requests_ok"] > 0 and (r["subscriber"] is None or
                                                              r["subscriber"]["missing"] == 0 and
                                                              r["subscriber"]["extra"] == 0)
                for r in result["modes"].values())
        finally:
            if node is not None:
                result["pushd_exit"] = node.stop()
                result["pushd_log_findings"] = pushd_findings(node)[:50]
    return result


def print_table(result: dict[str, Any]) -> None:
    rows = [("mode", "requests/s", "messages/s", "non-200", "latency p50 / p99 / max", "t1 subscriber got",
             "CPU% pushd/load/redis")]
    for mode, r in result["modes"].items():
        lat = r["latency_ms"]
        sub = r["subscriber"]
        name = mode if mode == "single" else f"batch of {r['batch']}"
        non200 = f"{r['non_200']:,}" + (f" {r['status']}" if r["non_200"] else "")
        got = "-" if sub is None else f"{sub['received']:,} of {sub['expected']:,}"
        cpu = r["cpu_pct"]
        rows.append((name, f"{r['requests_per_s']:,}", f"{r['messages_per_s']:,}", non200,
                     f"{lat['p50']:.2f} / {lat['p99']:.2f} / {lat['max']:.2f} ms", got,
                     f"{cpu['pushd']:.0f} / {cpu['load']:.0f} / {cpu['redis']:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print(" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if k == 0:
            print("-+-".join("-" * w for w in widths))
    for mode, r in result["modes"].items():
        if r.get("first_error"):
            print(f"  {mode}: first non-200: {r['first_error']}")
    for line in result.get("pushd_log_findings", [])[:10]:
        print(f"  pushd: {line}")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    pushd_args = argv[argv.index("--") + 1:] if "--" in argv else []
    options = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10, help="measured seconds per mode")
    p.add_argument("--warmup", type=float, default=1, help="seconds of load before the measurement, per mode")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (= keep-alive connections)")
    p.add_argument("--batch", type=int, default=100, help="messages per request in batch mode (10 topics)")
    p.add_argument("--modes", default="single,batch", help="comma-separated: single, batch")
    p.add_argument("--no-subscriber", action="store_true", help="no wss subscriber checking the delivery")
    p.add_argument("--json", action="store_true", help="print the results document (JSON) instead of the table")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = p.parse_args(options)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in ("single", "batch") for m in args.modes):
        p.error("--modes: single, batch or both")
    if args.seconds <= 0 or args.warmup < 0 or args.concurrency < 1 or args.batch < 1:
        p.error("--seconds > 0, --warmup >= 0, --concurrency >= 1, --batch >= 1")
    return args, pushd_args


def _show(result: dict[str, Any]) -> bool:
    if not result.get("modes"):
        return False
    print()
    print_table(result)
    return True


def main(argv: list[str]) -> int:
    args, pushd_args = parse_args(argv)
    headline = (f"publish API, {args.concurrency} requests in flight, {args.seconds:g} s per mode "
                f"({', '.join(args.modes)})")
    return run_benchmark("api-publish", headline, args, pushd_args,
                         lambda pin, workdir: run(args, pushd_args, pin, workdir), _show)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
