"""Run a real `twistd -n pushd` process for integration tests, and connect real wss:// clients to it."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

from websockets.sync.client import ClientConnection, connect

from pushd.tls import ensure_localhost_certificate

ROOT = Path(__file__).resolve().parents[2]
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
#: Every node a test started; tests/conftest.py kills the ones a failing test left running.
RUNNING: list[PushdProcess] = []
#: wss handshakes that stalled and were retried (see PushdProcess.client); reported at the end of the run.
STALLED_HANDSHAKES: list[str] = []
READY = re.compile(r"pushd ready: node (\S+), WebSocket at (.+), Redis")
API = re.compile(r"HTTP API at (\S+)")


class RequestFirstConnection(ClientConnection):
    """websockets' sync client, with its reader thread held back until the opening request is written.

    The reader thread calls SSL_read while the caller's thread calls SSL_write, and OpenSSL forbids two threads in
    one SSL object at once. Right after a TLS 1.3 handshake the server's session tickets wake the reader, which then
    sits in SSL_read just as the upgrade request is written; about 1 request in a few thousand (1 in 30 with a tighter
    client) never reaches the socket, and the server waits for it until its handshake timeout. Nothing arrives before
    the tickets and the response once the request is out, so reading only after that avoids the overlap.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._request_written = threading.Event()
        super().__init__(*args, **kwargs)

    def recv_events(self) -> None:
        self._request_written.wait()
        super().recv_events()

    def send_data(self) -> None:
        try:
            super().send_data()
        finally:
            self._request_written.set()


def python_env(*paths: str) -> dict[str, str]:
    """The environment for child processes: this interpreter, with the repository (and `paths`) importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), *paths, env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class PushdProcess:
    """One pushd node on 127.0.0.1 with a TLS listener on a free port (port 0)."""

    def __init__(self, workdir: Path, *args: str, redis: str | None = None, node_id: str | None = None,
                 tls: bool = True, listen: bool = True, api: bool = True,
                 pythonpath: tuple[str, ...] = ()) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = ensure_localhost_certificate(str(self.workdir / "certs"))
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile", str(self.workdir / "twistd.pid"), "pushd"]
        if not listen:
            pass
        elif tls:
            argv += ["--listen", f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"]
        else:
            argv += ["--listen", "tcp:0:interface=127.0.0.1"]
        if redis:
            argv += ["--redis", redis]
        if node_id:
            argv += ["--node-id", node_id]
        if api and "--api-listen" not in args:
            argv += ["--api-listen", "tcp:0:interface=127.0.0.1"]
        self.argv = argv + list(args)
        self.pythonpath = pythonpath
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc: subprocess.Popen[str] | None = None
        RUNNING.append(self)
        self.url = ""
        self.api_url = ""
        self.node_id = ""

    def start(self, timeout: float = 30) -> Self:
        self.proc = subprocess.Popen(self.argv, cwd=self.workdir, env=python_env(*self.pythonpath), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_for(READY, timeout)
        match = READY.search(line)
        assert match is not None
        self.node_id, self.url = match.group(1), match.group(2).split()[0]
        for logged in self.lines:
            api = API.search(logged)
            if api:
                self.api_url = api.group(1).removesuffix("/api")
        return self

    def api(self, method: str, path: str, body: object = None, key: str | None = None,
            timeout: float = 10) -> tuple[int, Any]:
        """One HTTP API call: (status, decoded JSON body)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.api_url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if key is not None:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 20) -> str:
        """The first new log line matching `pattern`; fails with the log so far if none comes in time."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no log line matching {regex.pattern!r} within {timeout}s:\n" + self.log)
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"pushd exited before logging {regex.pattern!r}:\n" + self.log)
            self.lines.append(line)
            if regex.search(line):
                return line

    def drain(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is None:
                return
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait: the orderly shutdown."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self._drain_after_exit()
        return code

    def kill(self) -> None:
        """SIGKILL: a crash that leaves its state behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def _drain_after_exit(self) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                return
            self.lines.append(line)

    def client(self, timeout: float = 5) -> Client:
        # The certificate names localhost; connect to 127.0.0.1 itself, where the node listens, so that a
        # resolver preferring ::1 cannot send the client elsewhere.
        url = self.url.replace("//localhost:", "//127.0.0.1:")
        tls = {"ssl": ssl.create_default_context(cafile=self.cert), "server_hostname": "localhost"} \
            if url.startswith("wss") else {}
        try:
            return Client(connect(url, open_timeout=timeout, close_timeout=5, max_size=2**22, legacy=True,
                                  create_connection=RequestFirstConnection, **tls))
        except TimeoutError:
            # Should no longer happen (see RequestFirstConnection); still counted, reported and retried once.
            STALLED_HANDSHAKES.append(url)
            return Client(connect(url, open_timeout=timeout, close_timeout=5, max_size=2**22, legacy=True,
                                  create_connection=RequestFirstConnection, **tls))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def alive(pid: int) -> bool:
    """Whether process `pid` is running (a zombie is not)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False


def stop_pid(pid: int, timeout: float = 20) -> None:
    """Stop process `pid` if it runs: SIGTERM, and SIGKILL if it is still there after `timeout` seconds."""
    if not alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def eventually(check: Any, timeout: float = 15, interval: float = 0.1) -> Any:
    """Poll `check` until it returns a truthy value; bounded by `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: last value {value!r}")
        time.sleep(interval)


def publish_until_delivered(client: Client, redis_client: Any, topic: str, payload: str,
                            timeout: float = 20) -> dict:
    """Publish again and again until `client` receives a message (after a fault); returns that message."""

    def delivered() -> dict | None:
        redis_client.publish(f"push:{topic}", payload)
        try:
            return client.recv(timeout=0.3)
        except TimeoutError:
            return None

    return eventually(delivered, timeout)


def run_pushd(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `twistd -n pushd ARGS` to completion (for start-up failures); output is stdout and stderr merged."""
    argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile", str(Path(cwd) / "twistd.pid"), "pushd", *args]
    return subprocess.run(argv, cwd=cwd, env=python_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, check=False,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def run_cli(cwd: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the `pushctl` command (stats, publish) as `python -m pushd`."""
    argv = [sys.executable, "-m", "pushd", *args]
    return subprocess.run(argv, cwd=cwd, env=python_env(), stdin=subprocess.DEVNULL, capture_output=True, check=False,
                          text=True, timeout=timeout)


class Client:
    """A blocking WebSocket client speaking pushd's JSON protocol."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    def send(self, message: object) -> None:
        self.ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))

    def recv(self, timeout: float = 10) -> dict:
        return json.loads(self.ws.recv(timeout))

    def request(self, message: object, timeout: float = 10) -> dict:
        self.send(message)
        return self.recv(timeout)

    def subscribe(self, *topics: str) -> dict:
        reply = self.request({"op": "subscribe", "topics": list(topics)})
        assert reply == {"op": "subscribed", "topics": list(topics)}, reply
        return reply

    def close(self) -> None:
        self.ws.close()
