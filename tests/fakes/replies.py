"""The fakes' latency knob: a Resource that writes each reply now, or `latency` seconds later on a clock, and
counts the replies still waiting, so a test sees how many requests a gateway really had in flight.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.web import resource, server


class DelayedReplies(resource.Resource):
    """A fake's Resource whose replies wait `latency` seconds on `clock` (none without a clock)."""

    def __init__(self, clock: IReactorTime | None = None, latency: float = 0.0) -> None:
        super().__init__()
        self.clock = clock
        self.latency = latency
        #: Replies waiting for their latency, now and at most.
        self.in_flight = 0
        self.max_in_flight = 0

    def reply(self, request: server.Request, status: int, headers: Mapping[bytes, bytes], body: bytes) -> bytes | int:
        """What render() returns: `body` to answer now, else NOT_DONE_YET with the reply scheduled."""
        if self.latency <= 0 or self.clock is None:
            return self._answer(request, status, headers, body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def later() -> None:
            self.in_flight -= 1
            if not request.finished and not request._disconnected:
                request.write(self._answer(request, status, headers, body))
                request.finish()

        self.clock.callLater(self.latency, later)
        return server.NOT_DONE_YET

    @staticmethod
    def _answer(request: server.Request, status: int, headers: Mapping[bytes, bytes], body: bytes) -> bytes:
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body
