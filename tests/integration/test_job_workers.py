"""Job workers in real processes against a real redis-server: a worker-only process (`twistd pushd-worker`),
a node's own workers, orderly stops."""

from __future__ import annotations

import subprocess
import sys

from tests.integration.jobs import JobWorkerProcess, add_audience, create_job, failures, finished
from tests.integration.pushd_process import TWISTD, python_env


def run_worker(cwd, *args):
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile", str(cwd / "twistd.pid"), "pushd-worker", *args]
    return subprocess.run(argv, cwd=cwd, env=python_env(), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60, check=False)


def test_a_worker_process_runs_a_job_to_the_end_and_stops_on_sigterm(tmp_path, redis_server):
    r = redis_server.client()
    add_audience(r, "nobody-online", {f"user{i}": "{}" for i in range(1200)})
    with JobWorkerProcess(tmp_path, "--job-workers", "3", redis=redis_server.url) as worker:
        job_id = create_job(r, gateway="pushd", audience="nobody-online", title="t", batch=100)
        report = finished(r, job_id)
        assert (report["state"], report["total"], report["failed"], report["sent"]) == ("done", 1200, 1200, 0)
        assert report["errors"] == {"offline": 1200}
        assert len(failures(r, job_id)) == 1200
        assert r.hlen("pushd:job-workers") == 1
        assert worker.stop() == -15  # twistd ends with the signal that stopped it, after the orderly shutdown
    assert "pushd worker stopped" in worker.log
    assert r.hlen("pushd:job-workers") == 0
    assert not r.exists(f"pushd:job:{job_id}:queue")


def test_a_worker_without_redis_or_workers_refuses_to_start_with_one_line(tmp_path):
    status = run_worker(tmp_path, "--redis", "redis://127.0.0.1:1")
    assert status.returncode == 1
    assert "pushd worker: redis: cannot reach redis://127.0.0.1:1" in status.stdout, status.stdout
    status = run_worker(tmp_path)
    assert status.returncode == 1
    assert status.stderr.strip().splitlines()[-1].startswith("pushd-worker: redis: not given, and no pushd node")
    status = run_worker(tmp_path, "--job-workers", "0")
    assert status.returncode == 1
    assert status.stderr.strip().splitlines()[-1] == \
        "pushd-worker: job-workers: 0 here would run nothing; a worker process needs at least 1"
