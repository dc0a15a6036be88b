"""The WebSocket transport: Autobahn's protocol and factory, kept thin.

A connection picks its wire protocol by URL path (pushd's own at `--ws-path`, Centrifugo's at
`--centrifugo-path`), hands every text frame to its `pushd.session.Session`, and enforces what holds below any
protocol: frame limits, backpressure (slow consumers), WebSocket pings and the closing handshake.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import PreparedMessage
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import defer
from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger
from zope.interface import implementer

from pushd.origins import SAME_HOST, OriginPolicy
from pushd.protocol import Disconnect
from pushd.redis.state import local_incarnation
from pushd.session import Services, Session
from pushd.tls import direct_writer
from pushd.transport import queued_bytes
from pushd.wire import Wire, centrifugo, native

CLOSE_UNSUPPORTED_DATA = 1003
#: Seconds a slow consumer's close frame has to get out before the connection is cut (it may never read it).
SLOW_CLOSE_GRACE = 1.0
_NO_HEADERS: dict[str, str] = {}


def text_frame(text: bytes) -> bytes:
    """One complete, unmasked WebSocket text frame carrying `text`: encoded once, written to many."""
    return PreparedMessage(text, False, False, True).payloadHybi


#: pushd's own protocol and Centrifugo's, over WebSocket text frames.
NATIVE = Wire(native.CODEC, text_frame)
CENTRIFUGO = Wire(centrifugo.CODEC, text_frame)


class PushConnection(WebSocketServerProtocol):
    """One client's WebSocket: the `Connection` of its session, and a producer its transport can pause."""

    factory: PushFactory
    session: Session | None = None
    #: True while the transport has paused us (its buffer is full): the client is not reading.
    _paused: bool = False
    #: Bytes written since the pause, where the transport cannot tell what it holds (see `_fits`).
    _backlog: int = 0
    _queued: Callable[[], int] | None = None
    _stall: DelayedCall | None = None
    _cut: DelayedCall | None = None
    _dropped: bool = False
    _wire: Wire = NATIVE
    _request: ConnectionRequest | None = None
    _url_token: str | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        # Autobahn asks for TCP_NODELAY before it has copied the factory's tcpNoDelay onto the protocol, and
        # swallows the AttributeError, so without this Nagle's algorithm holds every small write (pongs,
        # replies, single messages) until the client acknowledges the previous one: up to its delayed-ACK
        # time (about 40 ms) per write. A TLS transport passes the call on to the TCP socket.
        try:
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        except (AttributeError, OSError):
            pass  # not a TCP socket (a unix socket, a test transport)

    def dataReceived(self, data: bytes) -> None:
        if self._dropped:
            return  # refused or dropped: nothing more is read
        if self.state == WebSocketServerProtocol.STATE_CONNECTING:
            # Autobahn appends every read to the request so far and searches all of it for its end: a request
            # that never ends costs memory and time without bound (and quadratic time) until the handshake
            # timeout. Past max-request-size it is refused before being buffered.
            limit = self.factory.max_request_size
            if len(self.data) + len(data) > limit and not 0 <= (self.data + data).find(b"\r\n\r\n") <= limit - 4:
                self._refuse_request(431, "Request Header Fields Too Large")
                return
        super().dataReceived(data)

    def _refuse_request(self, code: int, status: str) -> None:
        """Answer an upgrade request that is too big or too slow with `code`, and close, reading nothing more."""
        self._dropped = True
        self.data = b""
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self.failHandshake(status, code)

    def onOpenHandshakeTimeout(self) -> None:
        if self.state == WebSocketServerProtocol.STATE_CONNECTING and self.data and not self._dropped:
            # A request that started but did not end in time; a connection that sent nothing (or never
            # finished its TLS handshake) cannot read an answer and is cut as before.
            self.openHandshakeTimeoutCall = None
            self._refuse_request(408, "Request Timeout")
            return
        super().onOpenHandshakeTimeout()

    def onConnect(self, request: ConnectionRequest) -> None:
        # First of all: a page from another site gets nothing, not even whether the path exists.
        if not self.factory.origins.allows_handshake(request.headers.get("origin"), request.headers.get("host")):
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "origin not allowed")
        wire = self.factory.wires.get(request.path)
        if wire is None:
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, f"no WebSocket endpoint at {request.path}")
        self._wire = wire
        if wire.codec.ping is not None:
            # The protocol pings at its own level (and its clients expect exactly that), so no WebSocket pings.
            self.autoPingInterval = 0
        if self.factory.services.hooks.authorize is not None:
            self._request = request
        tokens = request.params.get("token")
        if tokens:
            self._url_token = tokens[0]

    def onOpen(self) -> None:
        # The handshake is over: let go of Autobahn's copies of it (request and response bytes, parsed headers),
        # about 0.6 KiB a connection. An authorize hook still gets the ConnectionRequest kept in onConnect.
        self.http_request_data = b""
        self.http_response_data = ""
        self.http_headers = _NO_HEADERS
        transport: Any = self.transport
        # Bound once: the hot path writes through it without attribute lookups.
        self._transport_write = direct_writer(transport)
        self._queued = queued_bytes(transport)
        transport.registerProducer(self, True)
        self.session = Session(self.factory.services, self, self._wire, self.factory.next_conn_id(),
                               url_token=self._url_token, request=self._request)
        self._url_token = None
        self.session.open()

    # -- IPushProducer: the transport tells us when its buffer is full ---------------------------------

    def pauseProducing(self) -> None:
        # The client is not reading: stop reading from it too, so that what it sends (each frame may ask for a
        # reply) cannot make the node hold more for it; it must read again within ping-timeout or be dropped.
        self._paused = True
        self._backlog = 0
        self.transport.pauseProducing()  # type: ignore[union-attr]
        if self._stall is None:
            self._stall = self.factory.services.clock.callLater(self.factory.ping_timeout, self._stalled)

    def resumeProducing(self) -> None:
        self._paused = False
        self._cancel_stall()
        if not self._dropped:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        pass

    def _stalled(self) -> None:
        self._stall = None
        self.drop("slow_consumer")

    def _cancel_stall(self) -> None:
        if self._stall is not None:
            if self._stall.active():
                self._stall.cancel()
            self._stall = None

    def _fits(self, size: int) -> bool:
        """Whether `size` more bytes keep what the node holds for this paused client within the high-water mark.

        What the transport holds is measured where it can tell (TCP and TLS over TCP: encrypted bytes, records'
        overhead included); elsewhere the bytes written since the pause are counted. Over the mark the client is
        dropped as a slow consumer.
        """
        if self._dropped:
            return False
        queued = self._queued
        if queued is None:
            self._backlog += size
            held = self._backlog
        else:
            held = queued() + size
        if held > self.factory.high_water_mark:
            self.drop("slow_consumer")
            return False
        return True

    # -- Connection ---------------------------------------------------------------------------------------

    def write(self, data: bytes) -> bool:
        if self._paused and not self._fits(len(data)):
            return False
        try:
            self._transport_write(data)
        except Exception:
            self.drop("write_failed")
            return False
        return True

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Autobahn's own frames (pongs, pings, close frames) count against the limit like the session's.
        if self._paused and not self._dropped and not self._fits(len(data)):
            return
        super().sendData(data, sync, chopsize)

    def drop(self, reason: str) -> None:
        """Take the connection out of the index at once, count why, and cut it.

        A slow consumer is told why first (Disconnect.SLOW, in its protocol's code) and cut SLOW_CLOSE_GRACE
        seconds later: it may never read the close frame, and is not waited for.
        """
        if self._dropped:
            return
        hub = self.factory.services.hub
        hub.pruned[reason] += 1
        if self.session is not None:
            hub.remove(self.session)
        self._dropped = True
        if reason == "slow_consumer" and self.state == WebSocketServerProtocol.STATE_OPEN:
            code, text = self._wire.codec.close(Disconnect.SLOW, "not reading")
            self.sendCloseFrame(code=code, reasonUtf8=text.encode("utf-8"))
            self._cut = self.factory.services.clock.callLater(SLOW_CLOSE_GRACE, self.dropConnection, abort=True)
            return
        self.dropConnection(abort=True)

    def close_with(self, code: int, reason: str) -> None:
        """Start the closing handshake with any code (sendClose allows only 1000 and 3000-4999)."""
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123])

    # -- client frames ------------------------------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != WebSocketServerProtocol.STATE_OPEN or self.session is None:
            return
        if isBinary:
            self.session.close_with(CLOSE_UNSUPPORTED_DATA, "binary frames are not supported; send JSON text frames")
            return
        self.session.received(payload)

    # -- end of life --------------------------------------------------------------------------------------

    def onAutoPingTimeout(self) -> None:
        hub = self.factory.services.hub
        hub.pruned["ping_timeout"] += 1
        if self.session is not None:
            hub.remove(self.session)
        super().onAutoPingTimeout()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._cancel_stall()
        if self._cut is not None and self._cut.active():
            self._cut.cancel()
        if self.session is not None:
            self.session.closed()
            self.factory.closed(self.session)


@implementer(IProtocolNegotiationFactory)
class PushFactory(WebSocketServerFactory):
    """What all WebSocket connections of a node share: the sessions' services, the paths and the limits."""

    protocol = PushConnection  # type: ignore[assignment]
    log = Logger()
    noisy = False

    def __init__(self, *, services: Services, node_id: str, wires: dict[str, Wire], max_frame_size: int,
                 high_water_mark: int, ping_interval: int, ping_timeout: int, server: str = "pushd",
                 origins: OriginPolicy = SAME_HOST, max_request_size: int = 16384,
                 handshake_timeout: int = 5, incarnation: str | None = None) -> None:
        super().__init__(server=server)
        self.services = services
        #: Which web pages may open a connection (pushd/origins.py); checked before anything else.
        self.origins = origins
        self.wires = wires
        self.high_water_mark = high_water_mark
        #: Seconds a client whose output stays paused (it does not read) is kept.
        self.ping_timeout = ping_timeout
        #: Largest upgrade request (request line and headers) read; a larger one gets 431.
        self.max_request_size = max_request_size
        self._node_id = node_id
        #: Names this run of the node (pushd.redis.state.read_incarnation): serials restart at each start.
        self.incarnation = local_incarnation() if incarnation is None else incarnation
        self._serial = itertools.count(1)
        self._closing: set[Session] = set()
        self._all_closed: defer.Deferred[None] | None = None
        self.setProtocolOptions(
            maxFramePayloadSize=max_frame_size,
            maxMessagePayloadSize=max_frame_size,
            # Without this Autobahn drops the TCP connection and clients see 1006 instead of 1009/1007.
            failByDrop=False,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout if ping_interval else 0,
            # An upgrade request not complete by then gets 408 (PushConnection.onOpenHandshakeTimeout).
            openHandshakeTimeout=handshake_timeout,
            # A plain HTTP request gets 426 Upgrade Required, not Autobahn's status page (which names the
            # library's version and follows ?redirect= to any URL).
            webStatus=False,
            closeHandshakeTimeout=5,
            # Frames are prepared once for every subscriber, which compression per connection would undo.
            perMessageCompressionAccept=lambda offers: None,
            tcpNoDelay=True,
            # Autobahn would refuse Origin: null itself; `origins` decides (it lets null in only for `*`).
            allowNullOrigin=True,
        )

    @property
    def hub(self) -> Any:
        return self.services.hub

    def acceptableProtocols(self) -> list[bytes]:
        """ALPN: a WebSocket opens with an HTTP/1.1 request, so that is the protocol to select.

        Twisted's TLS layer always answers an ALPN offer and, knowing no protocol for the factory, answers it
        with an empty name, which OpenSSL turns into an "internal error" alert: every browser's handshake
        failed that way. Any ssl: endpoint serving this factory selects http/1.1 now.
        """
        return [b"http/1.1"]

    def next_conn_id(self) -> str:
        """`<node-id>:<incarnation>.<serial>`: unique across the node's restarts; `cluster.node_of` finds the node."""
        return f"{self._node_id}:{self.incarnation}.{next(self._serial)}"

    def _sessions(self) -> list[Session]:
        return [s for s in self.services.hub.broadcast_targets() if isinstance(s, Session)]

    def disconnect(self, conn_id: str, code: int, reason: str) -> bool:
        """Close one local connection (HTTP API); False when this node has no such connection."""
        session = self.services.hub.connection(conn_id)
        if not isinstance(session, Session):
            return False
        session.close_with(code, reason)
        return True

    def disconnect_user(self, user: str, code: int, reason: str) -> int:
        """Close every local connection of `user`; returns how many there were."""
        sessions = [s for s in self.services.hub.user_connections(user) if isinstance(s, Session)]
        for session in sessions:
            session.close_with(code, reason)
        return len(sessions)

    def close_all(self, reason: str, timeout: float) -> defer.Deferred[None]:
        """Tell every connection the server is going away; fires when all are gone or after `timeout` seconds."""
        sessions = self._sessions()
        self._closing.update(sessions)
        for session in sessions:
            session.close(Disconnect.SHUTDOWN, reason)
        if not self._closing:
            return defer.succeed(None)
        self._all_closed = defer.Deferred()
        call = self.services.clock.callLater(timeout, self._abort_closing)
        self._all_closed.addBoth(lambda r: call.cancel() if call.active() else None)
        return self._all_closed

    def closed(self, session: Session) -> None:
        self._closing.discard(session)
        if not self._closing and self._all_closed is not None:
            done, self._all_closed = self._all_closed, None
            done.callback(None)

    def _abort_closing(self) -> None:
        for session in list(self._closing):
            connection = session.connection
            if isinstance(connection, PushConnection) and connection.state != PushConnection.STATE_CLOSED:
                connection.dropConnection(abort=True)
        self._closing.clear()
        if self._all_closed is not None:
            done, self._all_closed = self._all_closed, None
            done.callback(None)
