"""Task workers: a thread pool for blocking work (user hooks, gateway calls), like Swoole's task workers.

`TaskPool.run(f, *args)` returns a Deferred that fires on the reactor thread with f's result, so callers never
block the reactor and never touch reactor state from a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class TaskRunner(Protocol):
    """What callers need of a task pool; tests substitute one that runs inline."""

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """Run `f(*args, **kwargs)` off the reactor; the result arrives on the reactor thread."""
        raise NotImplementedError


class TaskPool(Service):
    """A started/stopped-with-the-server pool of `size` worker threads."""

    def __init__(self, reactor: Any, size: int) -> None:
        self._reactor = reactor
        self.size = size
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name="pushd-task")

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        # ThreadPool.stop() joins the workers: run it in a thread of its own so shutdown never blocks the
        # reactor on a long task.
        return threads.deferToThread(self._pool.stop)

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """Run `f(*args, **kwargs)` in a worker thread; the result (or failure) arrives on the reactor thread."""
        return threads.deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)
