"""EmbeddedRedis on the real reactor, run in a child Python process (the suite has no pytest-twisted).

The child prints `key value` lines; the tests assert on them, and kill the child to check that redis-server
dies with its parent (PR_SET_PDEATHSIG, Linux only).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.integration.pushd_process import eventually

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 60.0

SCRIPT = textwrap.dedent("""\
    import os, sys
    from twisted.internet import defer, task
    from twisted.logger import globalLogBeginner, textFileLogObserver
    import txredisapi
    from pushd.redis.embedded import EmbeddedRedis, EmbeddedRedisError, find_redis_server

    MODE = sys.argv[1]
    BINARY = find_redis_server(sys.argv[2] if len(sys.argv) > 2 else "")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    def say(key, value):
        print(key, value, flush=True)

    async def main(reactor):
        embedded = EmbeddedRedis(reactor, BINARY, startup_timeout=10)
        if MODE == "fail":
            try:
                await embedded.start()
            except EmbeddedRedisError as exc:
                say("error", exc)
            say("dir_exists", os.path.exists(embedded.directory))
            await embedded.stop()
            return
        target = await embedded.start()
        say("pid", embedded.pid)
        say("socket", target.path)
        say("scheme", target.scheme)
        say("dir", embedded.directory)
        say("socket_mode", oct(os.stat(target.path).st_mode & 0o777))
        conn = await txredisapi.UnixConnection(target.path, reconnect=False)
        say("ping", await conn.ping())
        for name in ("save", "appendonly", "port"):
            reply = await conn.execute_command("CONFIG", "GET", name)
            say(name, reply[1] if reply[1] != "" else "(empty)")
        await conn.disconnect()
        if MODE == "forget":
            return  # no stop(): the reactor's shutdown trigger must do it
        if MODE == "wait":
            with open(sys.argv[3], "w") as out:
                out.write(f"{embedded.pid} {embedded.directory}\\n")
            await task.deferLater(reactor, 60, lambda: None)  # the test kills us long before
        first, second = embedded.stop(), embedded.stop()
        await first
        await second
        say("stopped_pid", embedded.pid)
        say("socket_exists", os.path.exists(target.path))
        say("dir_exists", os.path.exists(embedded.directory))

    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
""")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _run(tmp_path: Path, *args: str) -> dict[str, str]:
    script = tmp_path / "embedded_redis_child.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script), *args], check=False, capture_output=True,
                            text=True, timeout=RUN_TIMEOUT, env=_env(), cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"child failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)


def _gone(pid: int) -> bool:
    """True once `pid` no longer runs (absent, or a zombie waiting for init to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())


def test_start_ping_stop(tmp_path: Path) -> None:
    out = _run(tmp_path, "stop")
    assert out["ping"] == "PONG"
    assert out["scheme"] == "unix"
    assert out["socket"] == os.path.join(out["dir"], "redis.sock")
    assert os.path.basename(out["dir"]).startswith("pushd-redis-")
    assert out["socket_mode"] == "0o700"
    assert out["save"] == "(empty)"
    assert out["appendonly"] == "no"
    assert out["port"] == "0"
    assert int(out["pid"]) > 0
    assert out["stopped_pid"] == "None"
    assert out["socket_exists"] == "False"
    assert out["dir_exists"] == "False"
    assert _gone(int(out["pid"]))


def test_reactor_shutdown_stops_a_forgotten_server(tmp_path: Path) -> None:
    out = _run(tmp_path, "forget")
    assert out["ping"] == "PONG"
    assert not os.path.exists(out["dir"])
    eventually(lambda: _gone(int(out["pid"])), timeout=10)


def test_early_exit_is_reported_with_last_output_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken-redis-server"
    broken.write_text("#!/bin/sh\necho 'starting'\necho 'FATAL: bad config line' >&2\nexit 1\n")
    broken.chmod(0o755)
    out = _run(tmp_path, "fail", str(broken))
    assert out["error"].startswith("redis-server exited (exit code 1) before it answered PING")
    assert out["error"].endswith("FATAL: bad config line")
    assert out["dir_exists"] == "False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_redis_dies_with_its_parent(tmp_path: Path) -> None:
    script = tmp_path / "embedded_redis_child.py"
    script.write_text(SCRIPT)
    info = tmp_path / "redis.pid"
    child = subprocess.Popen([sys.executable, str(script), "wait", "", str(info)], env=_env(), cwd=tmp_path,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis_pid = 0
    redis_dir = ""
    try:
        def reported() -> bool:
            assert child.poll() is None, f"child exited early with code {child.returncode}"
            return info.exists() and info.read_text().endswith("\n")

        eventually(reported, timeout=30)
        pid_text, redis_dir = info.read_text().split()
        redis_pid = int(pid_text)
        assert not _gone(redis_pid)
        assert Path(f"/proc/{redis_pid}/comm").read_text().strip() == "redis-server"  # exec'd, same pid

        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        eventually(lambda: _gone(redis_pid), timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        if redis_pid and not _gone(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)
        if redis_dir and os.path.basename(redis_dir).startswith("pushd-redis-"):  # SIGKILL left it behind
            shutil.rmtree(redis_dir, ignore_errors=True)
