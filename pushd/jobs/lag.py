"""Job workers on a node give way to its live traffic: they take no new batch while the reactor runs late.

A node's job workers share its one reactor thread with the WebSocket fan-out. Rendering, encoding and settling a
batch is a few milliseconds of CPU each time, and every delivery queued behind it waits that long. How late the
reactor runs a timer is the direct measure of that wait, whatever causes it (live fan-out, a job, another process
on the same cores), so the workers ask `clear()` before each batch and get it only while the recent timers ran
within `limit`. Live traffic that saturates the node stops its jobs for as long as it lasts; worker processes
(`pushctl worker`) have no live traffic and no gate.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import defer


class ReactorLag:
    """A timer every `interval` seconds and how late the last `window` of them ran."""

    def __init__(self, reactor: Any, limit: float, interval: float = 0.01, window: int = 10) -> None:
        self.reactor = reactor
        self.limit = limit
        self.interval = interval
        self._recent: deque[float] = deque(maxlen=window)
        self._waiting: list[defer.Deferred[None]] = []
        self._due = 0.0
        self._call: Any = None
        #: How often the gate held a worker back (what the tests check).
        self.held = 0

    def start(self) -> None:
        self._due = self.reactor.seconds() + self.interval
        self._call = self.reactor.callLater(self.interval, self._tick)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._release()

    @property
    def late(self) -> float:
        """The worst lateness of the recent timers, in seconds."""
        return max(self._recent, default=0.0)

    def clear(self) -> defer.Deferred[None]:
        """Fires once the reactor keeps time again (at once when it does, or when the gate is stopped)."""
        if self._call is None or self.late <= self.limit:
            return defer.succeed(None)
        self.held += 1
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    def _tick(self) -> None:
        now = self.reactor.seconds()
        self._recent.append(max(0.0, now - self._due))
        self._due = now + self.interval
        self._call = self.reactor.callLater(self.interval, self._tick)
        if self.late <= self.limit:
            self._release()

    def _release(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
