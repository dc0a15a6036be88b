"""Redis connections for a `RedisTarget`: txredisapi over the right Twisted endpoint, reconnecting with backoff.

txredisapi already reconnects through a `ClientService`; this module picks the endpoint (TCP, TLS, unix
socket, or the master a Sentinel names), turns number conversion off ("007" stays "007"), tells callers when
a connection becomes usable or is lost, and puts a deadline on commands, which txredisapi otherwise lets wait
for a reconnect forever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet import defer, endpoints, ssl
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from pushd.redis.target import RedisTarget

ConnectionCallback = Callable[[Any], None]

#: Seconds before the first reconnection attempt and, at most, between later ones.
RECONNECT_FIRST_DELAY = 0.1
RECONNECT_MAX_DELAY = 1.0


class _Notifying:
    """Factory mixin: calls `ready_callbacks` when a connection is usable, `lost_callbacks` when it is lost."""

    ready_callbacks: list[ConnectionCallback]
    lost_callbacks: list[ConnectionCallback]

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)  # type: ignore[misc]
        if conn in self.pool:  # type: ignore[attr-defined]
            for callback in list(self.ready_callbacks):
                callback(conn)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)  # type: ignore[misc]
        for callback in list(self.lost_callbacks):
            callback(conn)


class _Factory(_Notifying, txredisapi.RedisFactory):
    pass


class _SentinelFactory(_Notifying, txredisapi.SentinelConnectionFactory):
    pass


class SentinelMasterProtocol(txredisapi.RedisProtocol):
    """Refuses a server that is not (or no longer) the master; works with raw-bytes replies too."""

    def connectionMade(self) -> Any:
        if self.password is not None:
            self.auth(self.password, self.username)
        return self.role().addCallback(self._check_role)

    def _check_role(self, role: Any) -> Any:
        if role[0] not in ("master", b"master"):
            self.transport.loseConnection()
            return None
        return txredisapi.RedisProtocol.connectionMade(self)


def client_endpoint(reactor: Any, target: RedisTarget, timeout: int) -> Any:
    """The Twisted endpoint for a non-Sentinel target."""
    if target.scheme == "unix":
        return endpoints.UNIXClientEndpoint(reactor, target.path, timeout=timeout)
    tcp: Any = endpoints.HostnameEndpoint(reactor, target.host, target.port, timeout=timeout)
    if target.scheme == "rediss":
        return endpoints.wrapClientTLS(ssl.optionsForClientTLS(target.host), tcp)
    return tcp


class RedisLink:
    """One reconnecting connection to Redis; `handler` runs commands, the callbacks report its state."""

    def __init__(self, reactor: Any, target: RedisTarget, *, timeout: int,
                 protocol: type[txredisapi.BaseRedisProtocol] | None = None,
                 raw: bool = False) -> None:
        self.target = target
        self._clock: IReactorTime = reactor
        self._timeout = timeout
        common: dict[str, Any] = {
            "dbid": target.db, "poolsize": 1, "isLazy": True, "charset": None if raw else "utf-8",
            "password": target.password, "username": target.username, "convertNumbers": False,
        }
        factory: Any
        if target.scheme == "sentinel":
            self._sentinel = txredisapi.Sentinel(list(target.sentinels))
            factory = _SentinelFactory(self._sentinel, target.master, True, uuid=None, **common)
            if protocol is not None:
                factory.protocol = type("SentinelMaster" + protocol.__name__,
                                        (protocol, SentinelMasterProtocol), {})
            else:
                factory.protocol = SentinelMasterProtocol
            endpoint: Any = txredisapi._SentinelEndpoint(factory)
        else:
            self._sentinel = None
            factory = _Factory(target.display, **common)
            if protocol is not None:
                factory.protocol = protocol
            endpoint = client_endpoint(reactor, target, timeout)
        factory.ready_callbacks = []
        factory.lost_callbacks = []
        # Reconnect soon after Redis is back: while the listener is away the node answers 503 and plain
        # PUBLISHes are lost (docs/redis-state.md), so the wait between attempts is kept short: 0.1 s, doubling,
        # at most 1 s (a connection attempt a second per link is nothing to a Redis that is down).
        factory.initialDelay = RECONNECT_FIRST_DELAY
        factory.factor = 2.0
        factory.maxDelay = RECONNECT_MAX_DELAY
        self.factory = factory
        self.handler = factory.handler
        factory.startConnecting(endpoint)

    def on_ready(self, callback: ConnectionCallback) -> None:
        self.factory.ready_callbacks.append(callback)

    def on_lost(self, callback: ConnectionCallback) -> None:
        self.factory.lost_callbacks.append(callback)

    @property
    def connected(self) -> bool:
        return bool(self.factory.pool)

    def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> defer.Deferred[Any]:
        """Run one command with a deadline; a timeout fails with `TimeoutError` naming the command."""
        d: defer.Deferred[Any] = getattr(self.handler, method)(*args, **kwargs)
        seconds = self._timeout if timeout is None else timeout

        def timed_out(failure: Failure) -> Failure:
            if failure.check(defer.TimeoutError):
                raise TimeoutError(
                    f"redis: {method.upper()} on {self.target.display} got no answer within {seconds}s")
            return failure

        return d.addTimeout(seconds, self._clock).addErrback(timed_out)

    def disconnect(self) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self.factory.disconnect()
        if self._sentinel is not None:
            d.addBoth(lambda _: self._sentinel.disconnect())
        return d


def reply_text(value: Any) -> str:
    """A Redis reply element as str, whether the link decodes replies (charset) or hands over raw bytes."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
