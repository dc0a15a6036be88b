"""The PSUBSCRIBE listener: every message on a routed channel prefix goes to that route's handler.

Routes are channel prefixes: `<channel-prefix>` for plain publishes (the hot path, first), and pushd's own
channels for history publishes, messages to users and cluster control. The listener re-subscribes on every
(re)connection, which txredisapi does not do by itself, and brackets each socket read with
`begin_batch`/`flush` so the messages of one read reach each client in one write.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.logger import Logger

from pushd.redis.client import RedisLink
from pushd.redis.target import RedisTarget

#: (channel name without the route's prefix, message)
MessageHandler = Callable[[str, bytes], None]


class ListenerProtocol(txredisapi.SubscriberProtocol):
    """Raw-bytes subscriber whose reads are batches (see module docstring)."""

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        listener: Listener = self.factory.listener
        listener.begin_batch()
        try:
            super().dataReceived(data, unpause)
        finally:
            listener.flush()

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.factory.listener.received(channel, message)


class Listener:
    """Keeps the PSUBSCRIBEs alive across reconnects and hands each message to its route's handler."""

    log = Logger()

    def __init__(self, reactor: Any, target: RedisTarget, routes: Mapping[str, MessageHandler], *, timeout: int,
                 begin_batch: Callable[[], None], flush: Callable[[], None],
                 lost: Callable[[], None] = lambda: None, back: Callable[[], None] = lambda: None) -> None:
        self._reactor = reactor
        self._target = target
        self._timeout = timeout
        self._routes = [(prefix.encode(), len(prefix.encode()), handler) for prefix, handler in routes.items()]
        self.patterns = [prefix + "*" for prefix in routes]
        self.begin_batch = begin_batch
        self.flush = flush
        #: Told when the subscription is lost after it first held, and when it holds again.
        self._on_lost = lost
        self._on_back = back
        self._link: RedisLink | None = None
        self._first: defer.Deferred[None] = defer.Deferred()
        self.subscriptions = 0
        self.bad_channels = 0
        self.messages = 0

    def start(self) -> defer.Deferred[None]:
        """Connect and PSUBSCRIBE; fires once the first subscription is confirmed."""
        self._link = RedisLink(self._reactor, self._target, timeout=self._timeout,
                               protocol=ListenerProtocol, raw=True)
        self._link.factory.listener = self
        self._link.on_ready(self._subscribe)
        self._link.on_lost(self._lost)
        return self._first

    def _subscribe(self, conn: Any) -> None:
        d = conn.psubscribe(self.patterns)
        d.addTimeout(self._timeout, self._reactor)

        def subscribed(_: Any) -> None:
            self.subscriptions += 1
            self.log.info("listening for Redis messages on {patterns} ({target})",
                          patterns=" ".join(self.patterns), target=self._target.display)
            if not self._first.called:
                self._first.callback(None)
            else:
                self._on_back()

        def failed(failure: Any) -> None:
            self.log.warn("PSUBSCRIBE {patterns} failed ({error}); reconnecting",
                          patterns=" ".join(self.patterns), error=failure.value)
            conn.transport.loseConnection()

        d.addCallbacks(subscribed, failed)

    def _lost(self, conn: Any) -> None:
        if self._link is None:
            return
        self.log.info("Redis listener connection lost; reconnecting to {target}", target=self._target.display)
        if self._first.called:
            self._on_lost()

    def received(self, channel: bytes, payload: bytes) -> None:
        for prefix, length, handler in self._routes:
            if channel.startswith(prefix):
                break
        else:
            self.bad_channels += 1
            return
        self.messages += 1
        try:
            name = channel[length:].decode("utf-8")
        except UnicodeDecodeError:
            self.bad_channels += 1
            return
        handler(name, payload)

    def stop(self) -> defer.Deferred[Any]:
        if self._link is None:
            return defer.succeed(None)
        link, self._link = self._link, None
        return link.disconnect()
