"""`twistd pushd` in daemon mode (no `-n`), as real daemonized processes: twistd returns only once the node is
ready (exit 0) or has failed to start (exit 1, the one-line error on stderr, no pidfile left)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.pushd_process import TWISTD, alive, eventually, python_env, run_cli, stop_pid
from tests.redis_server import free_port


class Daemons:
    """Pidfiles of the daemons a test starts; whatever is still running at the end is stopped by its PID."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.pidfiles: list[Path] = []

    def start(self, *args: str, name: str = "pushd") -> tuple[subprocess.CompletedProcess[str], Path, Path]:
        """Run `twistd --pidfile NAME.pid --logfile NAME.log pushd ARGS` until the command itself returns."""
        pidfile, logfile = self.tmp_path / f"{name}.pid", self.tmp_path / f"{name}.log"
        self.pidfiles.append(pidfile)
        result = subprocess.run(
            [sys.executable, "-c", TWISTD, "--pidfile", str(pidfile), "--logfile", str(logfile), "pushd", *args],
            cwd=self.tmp_path, env=python_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=60, check=False)
        return result, pidfile, logfile

    def stop_all(self) -> None:
        for pidfile in self.pidfiles:
            try:
                pid = int(pidfile.read_text())
            except (OSError, ValueError):
                continue
            stop_pid(pid)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    started = Daemons(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def one_error_line(result: subprocess.CompletedProcess[str], start: str) -> str:
    """The failed start's stderr: pushd's full line first, then twistd's own two lines about it."""
    assert result.returncode == 1, result
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    ours = [line for line in lines if line.startswith("pushd: ")]
    assert len(ours) == 1 and ours[0].startswith(start), result.stderr
    assert lines[0] == ours[0], result.stderr
    # twistd's own report of the status pipe: it points at our line instead of repeating it cut short
    assert lines[1:] == ["An error has occurred: b'pushd did not start: the line above says why'",
                         "Please look at log file for more information."], result.stderr
    assert "Traceback" not in result.stderr
    return ours[0]


def test_port_in_use_fails_the_command_with_the_listen_error(daemons, redis_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result, pidfile, logfile = daemons.start("--redis", redis_server.url, "--api-listen", "",
                                                 "--listen", f"tcp:{port}:interface=127.0.0.1")
    line = one_error_line(result, f"pushd: listen: cannot listen on 'tcp:{port}:interface=127.0.0.1': ")
    assert line.endswith("Address already in use."), line
    assert not pidfile.exists()
    assert not (pidfile.parent / "pushd.runtime.json").exists()
    assert line in logfile.read_text()
    assert redis_server.client().keys("pushd:*") == []


def test_unreachable_redis_fails_the_command_with_the_redis_error(daemons):
    port = free_port()
    result, pidfile, _ = daemons.start("--redis", f"redis://127.0.0.1:{port}", "--redis-timeout", "2",
                                       "--listen", "tcp:0:interface=127.0.0.1", "--api-listen", "")
    one_error_line(result, f"pushd: redis: cannot reach redis://127.0.0.1:{port}")
    assert not pidfile.exists()


def test_good_start_returns_once_the_node_answers(daemons, tmp_path):
    (tmp_path / "run").mkdir()
    result, pidfile, logfile = daemons.start("--listen", "tcp:0:interface=127.0.0.1",
                                             "--api-listen", "tcp:0:interface=127.0.0.1", name="run/pushd")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")

    # No waiting: twistd returned because the node said it is ready.
    assert "pushd ready" in logfile.read_text()
    pid = int(pidfile.read_text())
    assert alive(pid)
    runtime = json.loads((pidfile.parent / "pushd.runtime.json").read_text())
    assert runtime["pid"] == pid
    with urllib.request.urlopen(runtime["api"] + "/nodes", timeout=10) as response:
        assert [node["pid"] for node in json.load(response)["nodes"]] == [pid]
    published = run_cli(tmp_path, "publish", "--pidfile", str(pidfile), "AAPL", "1")
    assert published.returncode == 0 and "published to AAPL at offset" in published.stdout, published.stderr
    stats = run_cli(tmp_path, "stats", "--pidfile", str(pidfile))
    assert "nodes: 1" in stats.stdout, stats.stderr

    os.kill(pid, signal.SIGTERM)
    eventually(lambda: not alive(pid), timeout=30)
    assert not pidfile.exists()
    assert not (pidfile.parent / "pushd.runtime.json").exists()
    assert "pushd stopped" in logfile.read_text()
