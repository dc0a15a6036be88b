"""The PSUBSCRIBE listener: every message published on `<channel-prefix>*` goes to the hub as (topic, payload).

The listener re-subscribes on every (re)connection, which txredisapi does not do by itself, and brackets each
socket read with `begin_batch`/`flush` so the messages of one read reach each client in one write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.logger import Logger

from pushd.redis.client import RedisLink
from pushd.redis.target import RedisTarget

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
    """Keeps one PSUBSCRIBE alive across reconnects and hands each message to `on_message(topic, payload)`."""

    log = Logger()

    def __init__(self, reactor: Any, target: RedisTarget, channel_prefix: str, *, timeout: int,
                 on_message: MessageHandler, begin_batch: Callable[[], None], flush: Callable[[], None]) -> None:
        self._reactor = reactor
        self._target = target
        self._timeout = timeout
        self._prefix = channel_prefix.encode()
        self.pattern = channel_prefix + "*"
        self._on_message = on_message
        self.begin_batch = begin_batch
        self.flush = flush
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
        d = conn.psubscribe(self.pattern)
        d.addTimeout(self._timeout, self._reactor)

        def subscribed(_: Any) -> None:
            self.subscriptions += 1
            self.log.info("listening for Redis messages on {pattern} ({target})", pattern=self.pattern,
                          target=self._target.display)
            if not self._first.called:
                self._first.callback(None)

        def failed(failure: Any) -> None:
            self.log.warn("PSUBSCRIBE {pattern} failed ({error}); reconnecting", pattern=self.pattern,
                          error=failure.value)
            conn.transport.loseConnection()

        d.addCallbacks(subscribed, failed)

    def _lost(self, conn: Any) -> None:
        if self._link is None:
            return
        self.log.warn("Redis listener connection lost; reconnecting to {target}", target=self._target.display)

    def received(self, channel: bytes, payload: bytes) -> None:
        if not channel.startswith(self._prefix):
            self.bad_channels += 1
            return
        self.messages += 1
        try:
            topic = channel[len(self._prefix):].decode("ascii")
        except UnicodeDecodeError:
            self.bad_channels += 1
            return
        self._on_message(topic, payload)

    def stop(self) -> defer.Deferred[Any]:
        if self._link is None:
            return defer.succeed(None)
        link, self._link = self._link, None
        return link.disconnect()
