"""One node's part of a site-wide broadcast: the same frame to every local connection, in cooperative steps.

A broadcast to 100,000 connections is seconds of writing; done in one go it would freeze the node. Writing
`STEP` connections per step under Twisted's `Cooperator` hands the reactor back between time slices, so pings,
subscribes and topic messages keep flowing while it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from twisted.internet import defer, task

from pushd.hub import FrameCache, Hub, Subscriber

#: Connections written per cooperative step.
STEP = 100
#: Progress is reported after this many connections (and at the start and the end).
REPORT_EVERY = 10000

Report = Callable[[dict[str, Any]], Any]


@dataclass
class BroadcastCounts:
    targeted: int = 0
    sent: int = 0
    #: Dropped by the write itself: a slow consumer or a failed write.
    dropped_slow: int = 0
    #: Gone before their turn came (closed while the broadcast ran).
    dropped_gone: int = 0


class NodeBroadcast:
    """Sends one broadcast to the connections a node has when it starts, framed once per wire variant."""

    def __init__(self, broadcast_id: str, frames: FrameCache, hub: Hub, report: Report,
                 cooperator: task.Cooperator | None = None) -> None:
        self.broadcast_id = broadcast_id
        self._frames = frames
        self._hub = hub
        self._report = report
        self._cooperator = cooperator or task.Cooperator()
        self.counts = BroadcastCounts()
        self.state = "pending"

    def start(self) -> defer.Deferred[Any]:
        targets = tuple(self._hub.broadcast_targets())
        self.counts.targeted = len(targets)
        self.state = "running"
        self._send_report()
        done: defer.Deferred[Any] = self._cooperator.cooperate(self._steps(targets)).whenDone()
        return done.addCallback(self._finished)

    def _steps(self, targets: tuple[Subscriber, ...]) -> Iterator[None]:
        counts, frames, hub = self.counts, self._frames, self._hub
        for start in range(0, len(targets), STEP):
            for conn in targets[start:start + STEP]:
                if hub.connection(conn.conn_id) is not conn:
                    counts.dropped_gone += 1
                elif conn.write(frames.frame(conn.wire)):
                    counts.sent += 1
                else:
                    counts.dropped_slow += 1
            if (start // STEP + 1) % (REPORT_EVERY // STEP) == 0:
                self._send_report()
            yield None

    def _finished(self, _: Any) -> None:
        self.state = "done"
        self._send_report()

    def _send_report(self) -> None:
        self._report(dict(asdict(self.counts), state=self.state))
