#!/usr/bin/env python3
"""Broadcast to N connections on one node: time to last delivery and the node's ping latency during it.

    python bench/broadcast.py                                   # 10,000 wss connections over 2 Node processes
    python bench/broadcast.py --connections 500 --procs 1       # a small version, to check that it works
    python bench/broadcast.py --json                            # the results document on stdout, no table
    python bench/broadcast.py -- --ping-interval 0              # arguments after -- go to `twistd pushd`

Starts a redis-server and one pushd node (wss, as the integration tests do: tests/integration/pushd_process.py),
pushd pinned to the first core and everything else to the second. --procs Node receivers
(bench/broadcast.js --role receiver) open the connections; one Node pinger (--role pinger, one more wss
connection) sends {"op":"ping"} every --ping-interval-ms. After a --baseline of pings, one POST /api/broadcast;
every receiver reports when each of its connections has the frame. The pinger is stopped --after (1) s after
the last delivery. Prints a table and writes bench/results/<UTC time>-broadcast.json (unless --no-save).

Times are CLOCK_MONOTONIC (time.monotonic() here, process.hrtime() in Node), shared by all processes.
Exit status: 0 when every connection got the broadcast exactly once, 1 otherwise (or when the run broke),
130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from run import BenchError, Pinning, Proc, cpu_seconds, ensure_node_modules, machine_info

from tests.integration.pushd_process import PushdProcess
from tests.redis_server import RedisServer

HELPER = BENCH / "broadcast.js"
RESULTS = BENCH / "results"
#: pushd log lines worth reporting (tracebacks, errors, dropped connections)
SUSPICIOUS = re.compile(r"Traceback|Unhandled|[Ee]rror|[Ee]xception|CRITICAL|slow consumer|dropped", re.ASCII)


def now_ms() -> float:
    return time.monotonic_ns() / 1e6


class PinnedRedis(RedisServer):
    """tests/redis_server.RedisServer, started under `taskset` on the load core."""

    def __init__(self, pin: Pinning) -> None:
        super().__init__()
        self._pin = pin

    def _command(self, directory: str) -> list[str]:
        return self._pin.client([self.binary])


def start_pushd(workdir: Path, pin: Pinning, pushd_args: list[str], redis_url: str, tls: bool = True) -> PushdProcess:
    node = PushdProcess(workdir, *pushd_args, redis=redis_url, tls=tls)
    node.argv = pin.server(node.argv)  # taskset execs pushd: same pid, every thread on the server core
    return node.start(timeout=60)


def api_call(base: str, method: str, path: str, body: object = None, timeout: float = 30) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def pushd_findings(node: PushdProcess) -> list[str]:
    node.drain()
    return [line for line in node.lines if SUSPICIOUS.search(line)]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted `values`."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def summarize(values: list[float]) -> dict[str, Any]:
    v = sorted(values)
    return {"samples": len(v), "p50_ms": percentile(v, 0.5), "p90_ms": percentile(v, 0.9),
            "p99_ms": percentile(v, 0.99), "max_ms": v[-1] if v else None}


def read_json_event(proc: Proc, event: str, timeout: float) -> dict[str, Any]:
    """The next stdout line of `proc` that is a JSON object with this "event" (an "error" event raises)."""
    deadline = time.monotonic() + timeout
    while True:
        line = proc.wait_line(re.compile(r"^\{"), max(0.1, deadline - time.monotonic()))
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == "error":
            raise BenchError(f"{proc.name}: {doc.get('error')}")
        if doc.get("event") == event:
            return doc


class CpuSampler:
    """CPU seconds of pushd and of the load processes every 50 ms, to tell whose core was busy when."""

    def __init__(self, pushd_pid: int, load_pids: list[int]) -> None:
        self.pushd_pid = pushd_pid
        self.load_pids = load_pids
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((now_ms(), cpu_seconds(self.pushd_pid),
                                 sum(cpu_seconds(p) for p in self.load_pids)))
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def busy(self, start_ms: float, end_ms: float) -> dict[str, float] | None:
        """CPU % of one core (pushd, load) between the samples nearest before `start_ms` and after `end_ms`."""
        before = [s for s in self.samples if s[0] <= start_ms]
        after = [s for s in self.samples if s[0] >= end_ms]
        if not before or not after:
            return None
        a, b = before[-1], after[0]
        span = (b[0] - a[0]) / 1000
        if span <= 0:
            return None
        return {"from_ms": round(a[0] - start_ms, 1), "to_ms": round(b[0] - start_ms, 1),
                "pushd_pct": round(100 * (b[1] - a[1]) / span, 1), "load_pct": round(100 * (b[2] - a[2]) / span, 1)}


def split(total: int, parts: int) -> list[int]:
    """`total` as `parts` near-equal shares (parts <= total)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run(args: argparse.Namespace, pushd_args: list[str], pin: Pinning, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"ok": False}
    procs: list[Proc] = []
    node: PushdProcess | None = None
    sampler: CpuSampler | None = None
    nice = ["nice", "-n", str(args.receiver_nice)] if args.receiver_nice else []
    with PinnedRedis(pin) as redis:
        try:
            node = start_pushd(workdir, pin, pushd_args, redis.url)
            url = node.url.replace("//localhost:", "//127.0.0.1:")
            result.update(pushd_pid=node.pid, url=url, api_url=node.api_url)
            time.sleep(1)  # let start-up work (state purge, first heartbeat) finish

            # receivers: open all connections, then wait for the broadcast
            receivers: list[Proc] = []
            shares = split(args.connections, args.procs)
            per_proc_concurrency = max(1, math.ceil(args.concurrency / len(shares)))
            for k, share in enumerate(shares):
                argv = ["node", str(HELPER), "--role", "receiver", "--url", url, "--connections", str(share),
                        "--concurrency", str(per_proc_concurrency), "--ca", node.cert,
                        "--timeout", str(args.timeout)]
                proc = Proc(f"receiver-{k}", pin.client(nice + argv), cwd=BENCH, stdin=subprocess.PIPE,
                            merge_stderr=False)
                receivers.append(proc)
                procs.append(proc)
            open_timeout = 60 + args.connections / 50
            started = time.monotonic()
            ready = [read_json_event(p, "ready", open_timeout - (time.monotonic() - started)) for p in receivers]
            result["open"] = {"seconds": round(time.monotonic() - started, 2),
                              "retries": sum(r["retries"] for r in ready),
                              "per_proc_connections_per_s": [r["connections_per_s"] for r in ready]}

            # the pinger: one more connection, pinging from now until --after seconds after the last delivery
            pinger = Proc("pinger", pin.client(["node", str(HELPER), "--role", "pinger", "--url", url,
                                                "--interval-ms", str(args.ping_interval_ms), "--ca", node.cert]),
                          cwd=BENCH, stdin=subprocess.PIPE, merge_stderr=False)
            procs.append(pinger)
            read_json_event(pinger, "ready", 30)
            sampler = CpuSampler(node.pid, [p.pid for p in procs])
            time.sleep(args.baseline)

            data = {"bench": "broadcast", "p": "x" * max(0, args.payload_bytes - 25)}
            t0 = now_ms()
            status, reply = api_call(node.api_url, "POST", "/api/broadcast", {"data": data})
            t_reply = now_ms()
            for p in receivers:
                p.proc.stdin.write("go\n")  # type: ignore[union-attr]
                p.proc.stdin.flush()  # type: ignore[union-attr]
            result["api"] = {"status": status, "reply": reply, "answer_ms": round(t_reply - t0, 3)}
            if status != 202:
                raise BenchError(f"POST /api/broadcast answered {status}: {reply}")
            broadcast_id = reply["id"]

            reports = [read_json_event(p, "report", args.timeout + 30) for p in receivers]
            t_reports = now_ms()
            lasts = [r["last_ms"] for r in reports if r["last_ms"] is not None]
            firsts = [r["first_ms"] for r in reports if r["first_ms"] is not None]
            last = max(lasts) if lasts else t_reports
            # the pinger runs on until --after seconds (1) after the last delivery
            time.sleep(max(0.0, (last + 1000 * args.after - now_ms()) / 1000))
            pinger.proc.stdin.write("stop\n")  # type: ignore[union-attr]
            pinger.proc.stdin.flush()  # type: ignore[union-attr]
            ping = read_json_event(pinger, "report", 15)
            sampler.stop()

            # the node's own account, once it says it is done (bounded)
            deadline = time.monotonic() + 10
            while True:
                st_status, st = api_call(node.api_url, "GET", f"/api/broadcasts/{broadcast_id}")
                if st_status != 200 or st.get("state") == "done" or time.monotonic() > deadline:
                    break
                time.sleep(0.2)

            times = sorted(t - t0 for r in reports for t in r["times"])
            delivered = sum(r["received"] for r in reports)
            lost = args.connections - delivered
            duplicates = sum(r["duplicates"] for r in reports)
            samples = ping["samples"]
            unanswered = ping["unanswered"]

            def window(lo: float, hi: float) -> dict[str, Any]:
                s = summarize([rtt for sent, rtt, _ in samples if lo <= sent < hi])
                s["unanswered"] = sum(1 for sent in unanswered if lo <= sent < hi)
                s["send_late_p99_ms"] = percentile(sorted(late for sent, _, late in samples if lo <= sent < hi),
                                                   0.99)
                return s

            ids = {i for r in reports for i in r["broadcast_ids"]}
            result.update({
                "connections": args.connections,
                "after_s": args.after,
                "broadcast_id": broadcast_id,
                "first_delivery_ms": round(min(firsts) - t0, 3) if firsts else None,
                "last_delivery_ms": round(last - t0, 3) if lasts else None,
                "delivery_ms": {"p50": percentile(times, 0.5), "p90": percentile(times, 0.9),
                                "p99": percentile(times, 0.99)},
                "deliveries_per_s": round(delivered / ((last - t0) / 1000)) if lasts and last > t0 else None,
                "delivered": delivered, "lost": lost, "duplicates": duplicates,
                "other_broadcast_ids": sorted(ids - {broadcast_id}),
                "closed_early": sum(r["closed_early"] for r in reports),
                "receivers": [{k: v for k, v in r.items() if k != "times"} for r in reports],
                "ping": {
                    "interval_ms": args.ping_interval_ms, "sent": ping["sent"], "answered": ping["answered"],
                    "baseline": window(ping["started_ms"], t0),
                    "broadcast": window(t0, last),
                    "after": window(last, ping["stopped_ms"] or now_ms()),
                    "pinger_broadcast_ms": None if ping["broadcast_ms"] is None else
                    round(ping["broadcast_ms"] - t0, 3),
                    "closed_code": ping["closed_code"],
                    # every round trip: [send time - t0, RTT, how late the pinger's timer sent it] in ms
                    "samples": [[round(sent - t0, 3), rtt, late] for sent, rtt, late in samples],
                    "unanswered_sent": [round(sent - t0, 3) for sent in unanswered],
                },
                "cpu_during_broadcast": sampler.busy(t0, last),
                "status": {"http": st_status, "body": st},
                "window_ms": {"t0": 0, "api_reply": round(t_reply - t0, 3), "reports_in": round(t_reports - t0, 3)},
            })
            # every connection of the node got it, the pinger's included
            targeted = (st.get("totals") or {}).get("targeted") if st_status == 200 else None
            result["ok"] = lost == 0 and duplicates == 0 and targeted == args.connections + 1
            for p in receivers:
                with contextlib.suppress(OSError):
                    p.proc.stdin.close()  # type: ignore[union-attr]
        finally:
            if sampler is not None:
                sampler.stop()
            for p in procs:
                p.stop(timeout=15)
            if node is not None:
                code = node.stop()
                result["pushd_exit"] = code
                result["pushd_log_findings"] = pushd_findings(node)[:50]
    return result


def fmt(v: Any, unit: str = "", digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}{unit}"
    return f"{v:,}{unit}" if isinstance(v, int) else f"{v}{unit}"


def print_table(result: dict[str, Any]) -> None:
    p = result.get("ping", {})

    def rtt(w: dict[str, Any]) -> str:
        if not w:
            return "-"
        return (f"p50 {fmt(w['p50_ms'], ' ms', 2)}, p99 {fmt(w['p99_ms'], ' ms', 2)}, max {fmt(w['max_ms'], ' ms', 2)}"
                f" ({w['samples']} pings, {w['unanswered']} unanswered, send late p99 "
                f"{fmt(w['send_late_p99_ms'], ' ms', 2)})")

    st = (result.get("status") or {}).get("body") or {}
    totals = st.get("totals") or {}
    cpu = result.get("cpu_during_broadcast")
    d = result.get("delivery_ms") or {}
    rows = [
        ("connections", (f"{fmt(result.get('connections'))} wss (+1 pinger), opened in "
                        f"{fmt(result.get('open', {}).get('seconds'), ' s', 1)}, "
                        f"{fmt(result.get('open', {}).get('retries'))} retries")),
        ("API answer (POST /api/broadcast)", (f"{fmt(result.get('api', {}).get('answer_ms'), ' ms', 2)} "
                                             f"(HTTP {result.get('api', {}).get('status')})")),
        ("first delivery after t0", fmt(result.get("first_delivery_ms"), " ms", 2)),
        ("last delivery after t0", fmt(result.get("last_delivery_ms"), " ms", 2)),
        ("delivery p50 / p90 / p99", (f"{fmt(d.get('p50'), ' ms', 2)} / {fmt(d.get('p90'), ' ms', 2)} / "
                                     f"{fmt(d.get('p99'), ' ms', 2)}")),
        ("deliveries/s (t0 to last)", fmt(result.get("deliveries_per_s"))),
        ("delivered / lost / duplicates", (f"{fmt(result.get('delivered'))} / {fmt(result.get('lost'))} / "
                                          f"{fmt(result.get('duplicates'))}")),
        ("ping RTT, baseline", rtt(p.get("baseline", {}))),
        ("ping RTT, t0 to last delivery", rtt(p.get("broadcast", {}))),
        (f"ping RTT, last delivery + {result.get('after_s', 1):g} s", rtt(p.get("after", {}))),
        ("CPU % pushd / load (t0 to last)", f"{cpu['pushd_pct']:.0f} / {cpu['load_pct']:.0f}" if cpu else "-"),
        ("GET /api/broadcasts/<id>", (f"state {st.get('state', '-')}, targeted {fmt(totals.get('targeted'))}, "
                                     f"sent {fmt(totals.get('sent'))}, dropped slow "
                                     f"{fmt(totals.get('dropped_slow'))}, gone {fmt(totals.get('dropped_gone'))}")),
        ("pushd log lines flagged", fmt(len(result.get("pushd_log_findings", [])))),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)} | {v}")
    for line in result.get("pushd_log_findings", [])[:10]:
        print(f"  pushd: {line}")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    pushd_args = argv[argv.index("--") + 1:] if "--" in argv else []
    options = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=10_000, help="receiving wss connections")
    p.add_argument("--procs", type=int, default=2,
                   help="Node processes to spread them over (each may hold at most ~20,000 open files)")
    p.add_argument("--ping-interval-ms", type=float, default=10, help="the pinger's interval")
    p.add_argument("--concurrency", type=int, default=32,
                   help="handshakes in flight over all receivers (Twisted listens with a backlog of 50)")
    p.add_argument("--baseline", type=float, default=2, help="seconds of pings before the broadcast")
    p.add_argument("--after", type=float, default=1, help="seconds of pings after the last delivery")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for every delivery")
    p.add_argument("--payload-bytes", type=int, default=64, help="approximate size of the broadcast's data")
    p.add_argument("--receiver-nice", type=int, default=10,
                   help="nice value of the receivers, so that the pinger (nice 0) gets the shared core when it "
                        "wakes (0: not reniced)")
    p.add_argument("--json", action="store_true", help="print the results document (JSON) instead of the table")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = p.parse_args(options)
    if args.connections < 1 or args.procs < 1 or args.ping_interval_ms <= 0:
        p.error("--connections and --procs must be >= 1, --ping-interval-ms > 0")
    args.procs = min(args.procs, args.connections)
    return args, pushd_args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def begin(args: argparse.Namespace, headline: str) -> tuple[str, Pinning, dict[str, Any], Any]:
    """What a standalone benchmark does first: stop cleanly on SIGTERM, pin, describe the machine in one line
    after `headline` (on stderr under --json). Returns the run's UTC time stamp, the pinning, the machine's
    description and where the report goes."""
    signal.signal(signal.SIGTERM, _interrupt)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    pin = Pinning(not args.no_pin)
    if pin.warning:
        print(f"WARNING: {pin.warning}", file=sys.stderr)
    info = machine_info(pin)
    out = sys.stderr if args.json else sys.stdout
    print(f"{headline}; {info['cpu_model']}, {info['cores']} cores, Linux {info['kernel']}, Python "
          f"{info['python']}, Twisted {info['twisted']}, Autobahn {info['autobahn']}, {info['openssl_pyopenssl']}, "
          f"pushd {info['pushd_commit']}{' (dirty)' if info['pushd_tree_dirty'] else ''}", file=out, flush=True)
    return stamp, pin, info, out


def run_benchmark(name: str, headline: str, args: argparse.Namespace, pushd_args: list[str],
                  run_in: Callable[[Pinning, Path], dict[str, Any]],
                  show: Callable[[dict[str, Any]], bool]) -> int:
    """The frame every standalone benchmark shares: pinning, the machine line, a temporary work dir, stopping
    cleanly on SIGTERM/Ctrl-C, the table (`show` prints it and says whether there was one) and the results JSON
    in bench/results/<UTC time>-<name>.json. Exit status: 0 ok, 1 failed, 130 interrupted."""
    stamp, pin, info, out = begin(args, headline)
    result: dict[str, Any] = {"ok": False}
    interrupted = False
    try:
        ensure_node_modules()
        with tempfile.TemporaryDirectory(prefix=f"pushd-bench-{name}-") as workdir:
            result = run_in(pin, Path(workdir))
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted; every process started has been stopped", file=sys.stderr)
    except (BenchError, AssertionError, RuntimeError) as e:
        result["error"] = str(e)[-4000:]
        print(f"{name}: {result['error']}", file=sys.stderr)
    doc = {"benchmark": name, "interrupted": interrupted, "machine": info,
           "options": {**vars(args), "pushd_args": pushd_args}, "result": result}
    return finish(doc, args, lambda: show(result), f"{stamp}-{name}.json", out)


def finish(doc: dict[str, Any], args: argparse.Namespace, show: Callable[[], Any], file_name: str,
           out: Any) -> int:
    """Print a run (JSON with --json, else `show`), save it under bench/results unless told not to or
    interrupted, and return the exit status: 130 interrupted, 0 when the result is ok, else 1."""
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        show()
    if not args.no_save and not doc["interrupted"]:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / file_name
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nresults: {path.relative_to(ROOT)}", file=out)
    if doc["interrupted"]:
        return 130
    return 0 if doc["result"].get("ok") else 1


def _show(result: dict[str, Any]) -> bool:
    if "connections" not in result:
        return False
    print()
    print_table(result)
    return True


def main(argv: list[str]) -> int:
    args, pushd_args = parse_args(argv)
    headline = (f"broadcast to {args.connections:,} wss connections ({args.procs} receiver process(es)) on one "
                "pushd node")
    return run_benchmark("broadcast", headline, args, pushd_args,
                         lambda pin, workdir: run(args, pushd_args, pin, workdir), _show)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
