"""A fake as a child process of its own (integration tests): `python -m tests.fakes.NAME --port 0 ...` from the
repository root, ready once it prints its one JSON line, stopped by its PID. Each fake subclasses `FakeProcess`
with its arguments and the fields it reads from that line.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[2]


class FakeProcess:
    """One fake's process; `info` is the JSON line it printed once listening."""

    #: The fake's module, run with `python -m`.
    module = ""
    #: What start()'s error calls the fake.
    name = ""

    def __init__(self, *args: str) -> None:
        """`args`: the fake's own options, after `--port 0`."""
        self.argv = [sys.executable, "-m", self.module, "--port", "0", *args]
        self.proc: subprocess.Popen[str] | None = None
        self.info: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> Self:
        """Run the fake and wait at most `timeout` seconds for its JSON line."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError(self.start_failure())
        self.info = json.loads(line)
        self.read_info(self.info)
        return self

    def read_info(self, info: dict[str, Any]) -> None:
        """Hook: a subclass keeps the fields of the JSON line it offers as attributes."""

    def start_failure(self) -> str:
        """What start() raises when the fake printed nothing (it exited, or did not listen in time)."""
        return f"the fake {self.name} did not start"

    def stop(self) -> None:
        """SIGTERM (Twisted's handler stops the fake's reactor), SIGKILL if it still runs 10 s later."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
