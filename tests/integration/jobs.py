"""Creating and following push jobs from tests through Redis itself, the way pushd's store does it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

from pushd.jobs import model, scripts
from pushd.jobs.store import JobKeys
from tests.integration.pushd_process import TWISTD, PushdProcess, eventually, python_env

KEYS = JobKeys("pushd:")
WORKER_READY = re.compile(r"pushd worker ready")


def create_job(r: Any, **fields: Any) -> str:
    """A job (JobStore.create's script, run by redis-py); its id."""
    now = time.time()
    spec = model.parse_spec(fields, now)
    job_id = model.new_job_id(now)
    first, created = r.eval(scripts.CREATE, 6, KEYS.job(job_id), KEYS.index, KEYS.live,
                            KEYS.idempotency(spec.key) if spec.key else "", KEYS.queue(job_id),
                            KEYS.audience(spec.audience), job_id, spec.to_json(), model.first_state(spec, now),
                            f"{now:.3f}", model.KEY_WINDOW, "0" if spec.private else "1")
    assert created != -1, f"no audience {spec.audience}"
    return str(first)


def job(r: Any, job_id: str) -> dict[str, Any]:
    return model.progress(r.hgetall(KEYS.job(job_id)))


def finished(r: Any, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """The job's report once it is done or cancelled (bounded wait)."""
    def final() -> dict[str, Any] | None:
        report = job(r, job_id)
        return report if report["state"] in model.FINAL else None

    return dict(eventually(final, timeout=timeout))


def add_audience(r: Any, name: str, recipients: dict[str, str]) -> None:
    r.hset(KEYS.audience(name), mapping=recipients)
    r.sadd("pushd:audiences", name)


def failures(r: Any, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in r.lrange(KEYS.failures(job_id), 0, -1)]


class JobWorkerProcess(PushdProcess):
    """A real `twistd -n pushd-worker` process: job workers and nothing else."""

    def __init__(self, workdir: Path, *args: str, redis: str) -> None:
        super().__init__(workdir, redis=redis, listen=False, api=False)
        self.argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile", str(self.workdir / "twistd.pid"),
                     "pushd-worker", "--redis", redis, *args]

    def start(self, timeout: float = 30) -> Self:
        self.proc = subprocess.Popen(self.argv, cwd=self.workdir, env=python_env(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for(WORKER_READY, timeout)
        return self
