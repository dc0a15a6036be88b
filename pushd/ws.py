"""The Autobahn WebSocket protocol and factory: one connection's life, kept thin.

Frames are parsed by `pushd.protocol`, subscriptions live in the `Hub`; this module wires the two to a socket,
enforces the limits a hostile client must not get past, and notices slow or dead peers.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import defer
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pushd import protocol
from pushd.auth import AuthError, Identity, Permissions, TokenVerifier
from pushd.hooks import Hooks
from pushd.hub import Held, Hub, frame_bytes
from pushd.patterns import is_pattern
from pushd.protocol import Auth, CloseCode, Command, Error, ErrorCode, Limits, Ping, Subscribe, Unsubscribe
from pushd.recovery import Position, stitch
from pushd.redis.history import RecoveryFailed, Replay
from pushd.tasks import TaskRunner
from pushd.tls import direct_writer

CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
BAD_FRAME_WINDOW = 60.0
_NO_HEADERS: dict[str, str] = {}
#: Where a `last` read starts: before every offset, so only held messages newer than the latest are kept.
_BEFORE_ALL = "0-0"


@dataclass(frozen=True)
class AuthPolicy:
    """How connections prove who they are (`--auth`), and what they may subscribe to."""

    mode: str = "off"
    verifier: TokenVerifier | None = None
    permissions: Permissions = field(default_factory=Permissions)
    auth_timeout: int = 10
    refresh_grace: int = 30


class HistoryReader(Protocol):
    """The reads a recovering subscription makes (`pushd.redis.history.History`)."""

    def recover(self, topic: str, since: Position) -> defer.Deferred[Replay | RecoveryFailed]: ...

    def latest(self, topic: str) -> defer.Deferred[tuple[Position, bytes] | None]: ...


class PushConnection(WebSocketServerProtocol):
    """One client: a `Subscriber` of the hub and a producer its transport can pause."""

    factory: PushFactory
    conn_id = ""
    #: Bytes written while the transport is paused (its buffer is full); None while it is not.
    _backlog: int | None = None
    _request: ConnectionRequest | None = None
    _pending: deque[Command] | None = None
    _url_token: str | None = None
    identity: Identity | None = None
    _auth_timer: Any = None
    _expiry_timer: Any = None
    _grace_timer: Any = None

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

    def onConnect(self, request: ConnectionRequest) -> None:
        if request.path != self.factory.ws_path:
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, f"no WebSocket endpoint at {request.path}")
        if self.factory.hooks.authorize is not None:
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
        self.conn_id = self.factory.next_conn_id()
        self.topics: set[str] = set()
        self._bad_frames = 0
        self._bad_window_start = 0.0
        transport: Any = self.transport
        # Bound once: the hot path writes through it without attribute lookups.
        self._transport_write = direct_writer(transport)
        transport.registerProducer(self, True)
        self.factory.hub.add(self)
        self._start_auth()

    # -- IPushProducer: the transport tells us when its buffer is full ---------------------------------

    def pauseProducing(self) -> None:
        if self._backlog is None:
            self._backlog = 0

    def resumeProducing(self) -> None:
        self._backlog = None

    def stopProducing(self) -> None:
        pass

    # -- Subscriber ---------------------------------------------------------------------------------------

    def write(self, data: bytes) -> bool:
        backlog = self._backlog
        if backlog is not None:
            backlog += len(data)
            if backlog > self.factory.high_water_mark:
                self.drop("slow_consumer")
                return False
            self._backlog = backlog
        try:
            self._transport_write(data)
        except Exception:
            self.drop("write_failed")
            return False
        return True

    def drop(self, reason: str) -> None:
        """Take the connection out of the index at once, count why, and cut it."""
        self.factory.hub.pruned[reason] += 1
        self.factory.hub.remove(self)
        self.dropConnection(abort=True)

    # -- client frames ------------------------------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        if isBinary:
            self.close(CLOSE_UNSUPPORTED_DATA, "binary frames are not supported; send JSON text frames")
            return
        command = protocol.parse_command(payload.decode("utf-8"), self.factory.limits)
        if isinstance(command, Error):
            self._refuse(command)
        elif self._pending is not None:
            self._pending.append(command)
        else:
            self._run(command)

    def _run(self, command: Command) -> None:
        if isinstance(command, Ping):
            self._reply(protocol.encode_pong(command.id))
        elif isinstance(command, Unsubscribe):
            self.factory.hub.unsubscribe(self, command.topics)
            self._reply(protocol.encode_unsubscribed(command.topics, command.id))
        elif isinstance(command, Auth):
            if self.factory.auth.mode == "off":
                self._refuse(Error(ErrorCode.BAD_REQUEST, "client tokens are off on this server", command.id))
            elif self._authenticate(command.token):
                assert self.identity is not None
                self._reply(protocol.encode_authenticated(self.identity.user, self.identity.expires, command.id))
        else:
            self._subscribe(command)

    # -- who the client is ------------------------------------------------------------------------------

    def _start_auth(self) -> None:
        policy = self.factory.auth
        token, self._url_token = self._url_token, None
        if policy.mode == "off":
            return
        if token is not None:
            self._authenticate(token)
        elif policy.mode == "required":
            self._auth_timer = self.factory.clock.callLater(policy.auth_timeout, self._auth_timed_out)

    def _authenticate(self, token: str) -> bool:
        """Check a token (from the URL or an auth frame); a bad one closes the connection with 4001."""
        verifier = self.factory.auth.verifier
        clock = self.factory.clock
        try:
            if verifier is None:
                raise AuthError("this server accepts no tokens")
            identity = verifier.verify(token, clock.seconds())
            if self.identity is not None and identity.user != self.identity.user:
                raise AuthError("token is for another user")
        except AuthError as e:
            self.factory.hub.pruned["invalid_token"] += 1
            self.close(CloseCode.INVALID_TOKEN, str(e))
            return False
        self.identity = identity
        self._cancel_auth_timers()
        self.factory.hub.identify(self, identity.user)
        self._expiry_timer = clock.callLater(max(0.0, identity.expires - clock.seconds()), self._token_expired)
        return True

    def _auth_timed_out(self) -> None:
        self._auth_timer = None
        self.factory.hub.pruned["auth_timeout"] += 1
        self.close(CloseCode.AUTH_REQUIRED, "authentication required: no token received in time")

    def _token_expired(self) -> None:
        self._expiry_timer = None
        self._reply(protocol.encode_refresh())
        self._grace_timer = self.factory.clock.callLater(self.factory.auth.refresh_grace, self._refresh_missed)

    def _refresh_missed(self) -> None:
        self._grace_timer = None
        self.factory.hub.pruned["token_expired"] += 1
        self.close(CloseCode.TOKEN_EXPIRED, "token expired and no fresh token arrived")

    def _cancel_auth_timers(self) -> None:
        for name in ("_auth_timer", "_expiry_timer", "_grace_timer"):
            timer = getattr(self, name)
            if timer is not None and timer.active():
                timer.cancel()
            setattr(self, name, None)

    # -- subscriptions ----------------------------------------------------------------------------------

    def _subscribe(self, command: Subscribe) -> None:
        limit = self.factory.limits.max_topics_per_connection
        if len(self.topics.union(command.topics)) > limit:
            self._refuse(Error(ErrorCode.TOO_MANY_TOPICS,
                               f"subscribing would exceed {limit} topics on this connection", command.id))
            return
        policy = self.factory.auth
        if policy.mode != "off":
            if policy.mode == "required" and self.identity is None:
                self._refuse(Error(ErrorCode.UNAUTHORIZED, 'authenticate first: send {"op":"auth","token":...}',
                                   command.id))
                return
            refused = tuple(t for t in command.topics if not policy.permissions.may_subscribe(self.identity, t))
            if refused:
                self._refuse(Error(ErrorCode.FORBIDDEN, "not allowed to subscribe to these topics", command.id,
                                   refused))
                return
        authorize = self.factory.hooks.authorize
        if authorize is None:
            self._grant(command)
            return
        # Later frames wait until this one is decided, so a client's commands keep their order.
        self._pending = deque()
        d = self.factory.tasks.run(_refused_topics, authorize, self._request, command.topics)
        d.addCallbacks(self._authorized, self._authorize_failed, callbackArgs=(command,), errbackArgs=(command,))
        d.addBoth(self._resume_pending)

    def _authorized(self, refused: list[str], command: Subscribe) -> None:
        if refused:
            self._refuse(Error(ErrorCode.FORBIDDEN, "not allowed to subscribe to these topics", command.id,
                               tuple(refused)))
        else:
            self._grant(command)

    def _authorize_failed(self, failure: Failure, command: Subscribe) -> None:
        self.factory.log.failure("authorize hook raised; subscription refused", failure)
        self._refuse(Error(ErrorCode.INTERNAL_ERROR, "authorization failed on the server", command.id))

    def _resume_pending(self, _: Any) -> None:
        pending, self._pending = self._pending, None
        while pending and self._pending is None:
            self._run(pending.popleft())
        if pending and self._pending is not None:
            self._pending.extendleft(reversed(pending))

    def _grant(self, command: Subscribe) -> None:
        hub = self.factory.hub
        if hub.connection(self.conn_id) is not self:
            return
        history = self.factory.history
        new = [t for t in command.topics if t not in self.topics]
        recover = {t: command.since[t] for t in new if t in command.since} if history is not None else {}
        last = [t for t in new if t not in recover and not is_pattern(t)] \
            if command.last and history is not None else []
        hub.subscribe(self, command.topics, held=[*recover, *last])
        self._reply(protocol.encode_subscribed(command.topics, command.id))
        if history is None:
            if command.last or command.since:
                self._refuse(Error(ErrorCode.RECOVERY_FAILED, "this server keeps no history", command.id,
                                   tuple(command.since) or command.topics))
            return
        for topic, since in recover.items():
            history.recover(topic, since).addBoth(self._recovered, topic, since, command.id)
        for topic in last:
            history.latest(topic).addBoth(self._latest, topic, command.id)

    def _recovered(self, result: Any, topic: str, since: Position, request_id: protocol.RequestId) -> None:
        held = self.factory.hub.release(self, topic)
        if held is None:
            return
        if isinstance(result, Replay):
            replay = [(offset, self._history_frame(topic, offset, result.epoch, payload))
                      for offset, payload in result.entries]
            self._write_frames(stitch(since.offset, [(o, f) for o, f in replay if f], held))
            return
        if isinstance(result, RecoveryFailed):
            reason = result.reason
        else:
            self.factory.log.warn("history read for {topic} failed: {error}", topic=topic, error=result.value)
            reason = "history could not be read; reload and subscribe again"
        self._reply(protocol.encode_error(Error(ErrorCode.RECOVERY_FAILED, reason, request_id, (topic,))))
        self._write_frames([frame for _, frame in held])

    def _latest(self, result: Any, topic: str, request_id: protocol.RequestId) -> None:
        held = self.factory.hub.release(self, topic)
        if held is None:
            return
        replay: list[Held] = []
        if isinstance(result, tuple):
            position, payload = result
            frame = self._history_frame(topic, position.offset, position.epoch, payload)
            if frame:
                replay.append((position.offset, frame))
        elif result is not None:
            self.factory.log.warn("history read for {topic} failed: {error}", topic=topic, error=result.value)
        self._write_frames(stitch(_BEFORE_ALL, [(o, f) for o, f in replay if o is not None], held))

    def _history_frame(self, topic: str, offset: str, epoch: str, payload: bytes) -> bytes:
        """A replayed message's frame, rewritten by on_message as a live one would be; b"" when dropped."""
        rewritten = self.factory.hooks.rewrite(topic, payload)
        return b"" if rewritten is None else frame_bytes(topic, rewritten, Position(offset, epoch))

    def _write_frames(self, frames: list[bytes]) -> None:
        if frames and self.state == WebSocketServerProtocol.STATE_OPEN:
            self.write(b"".join(frames))

    def _refuse(self, error: Error) -> None:
        self._reply(protocol.encode_error(error))
        now = self.factory.clock.seconds()
        if now - self._bad_window_start > BAD_FRAME_WINDOW:
            self._bad_window_start, self._bad_frames = now, 0
        self._bad_frames += 1
        if self._bad_frames > self.factory.bad_frame_limit:
            self.factory.hub.pruned["bad_frames"] += 1
            self.close(CLOSE_POLICY_VIOLATION, "too many bad frames")

    def close(self, code: int, reason: str) -> None:
        """Leave the index at once and start the closing handshake with any code (sendClose allows only
        1000 and 3000-4999)."""
        self.factory.hub.remove(self)
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"))

    def _reply(self, payload: bytes) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(payload)

    # -- end of life --------------------------------------------------------------------------------------

    def onAutoPingTimeout(self) -> None:
        self.factory.hub.pruned["ping_timeout"] += 1
        self.factory.hub.remove(self)
        super().onAutoPingTimeout()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._cancel_auth_timers()
        if self.conn_id:
            self.factory.hub.remove(self)
            self.factory.closed(self)


def _refused_topics(authorize: Callable[[Any, str], bool], request: Any, topics: tuple[str, ...]) -> list[str]:
    """Runs in a task worker: the topics `authorize` does not allow (anything but True refuses)."""
    return [topic for topic in topics if authorize(request, topic) is not True]


@implementer(IProtocolNegotiationFactory)
class PushFactory(WebSocketServerFactory):
    """What all connections of a node share: the hub, the limits, the task pool and the hooks."""

    protocol = PushConnection  # type: ignore[assignment]
    log = Logger()
    noisy = False

    def __init__(self, *, clock: Any, hub: Hub, node_id: str, ws_path: str, limits: Limits,
                 max_frame_size: int, high_water_mark: int, bad_frame_limit: int, ping_interval: int,
                 ping_timeout: int, tasks: TaskRunner, hooks: Hooks, auth: AuthPolicy | None = None,
                 history: HistoryReader | None = None, server: str = "pushd") -> None:
        super().__init__(server=server)
        self.clock = clock
        self.hub = hub
        self.auth = auth or AuthPolicy()
        self.history = history
        self.ws_path = ws_path
        self.limits = limits
        self.high_water_mark = high_water_mark
        self.bad_frame_limit = bad_frame_limit
        self.tasks = tasks
        self.hooks = hooks
        self._node_id = node_id
        self._serial = itertools.count(1)
        self._closing: set[PushConnection] = set()
        self._all_closed: defer.Deferred[None] | None = None
        self.setProtocolOptions(
            maxFramePayloadSize=max_frame_size,
            maxMessagePayloadSize=max_frame_size,
            # Without this Autobahn drops the TCP connection and clients see 1006 instead of 1009/1007.
            failByDrop=False,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout if ping_interval else 0,
            openHandshakeTimeout=10,
            # A plain HTTP request gets 426 Upgrade Required, not Autobahn's status page (which names the
            # library's version and follows ?redirect= to any URL).
            webStatus=False,
            closeHandshakeTimeout=5,
            # Frames are prepared once for every subscriber, which compression per connection would undo.
            perMessageCompressionAccept=lambda offers: None,
            tcpNoDelay=True,
        )

    def acceptableProtocols(self) -> list[bytes]:
        """ALPN: a WebSocket opens with an HTTP/1.1 request, so that is the protocol to select.

        Twisted's TLS layer always answers an ALPN offer and, knowing no protocol for the factory, answers it
        with an empty name, which OpenSSL turns into an "internal error" alert: every browser's handshake
        failed that way. Any ssl: endpoint serving this factory selects http/1.1 now.
        """
        return [b"http/1.1"]

    def next_conn_id(self) -> str:
        return f"{self._node_id}:{next(self._serial)}"

    def disconnect(self, conn_id: str, code: int, reason: str) -> bool:
        """Close one local connection (HTTP API); False when this node has no such connection."""
        conn = self.hub.connection(conn_id)
        if not isinstance(conn, PushConnection):
            return False
        conn.close(code, reason)
        return True

    def disconnect_user(self, user: str, code: int, reason: str) -> int:
        """Close every local connection of `user`; returns how many there were."""
        conns = [c for c in self.hub.user_connections(user) if isinstance(c, PushConnection)]
        for conn in conns:
            conn.close(code, reason)
        return len(conns)

    def close_all(self, reason: str, timeout: float) -> defer.Deferred[None]:
        """Send every connection a 1001 close frame; fires when all are gone or after `timeout` seconds."""
        conns = [c for c in self.hub.broadcast_targets() if isinstance(c, PushConnection)]
        self._closing.update(conns)
        for conn in conns:
            conn.close(CLOSE_GOING_AWAY, reason)
        if not self._closing:
            return defer.succeed(None)
        self._all_closed = defer.Deferred()
        call = self.clock.callLater(timeout, self._abort_closing)
        self._all_closed.addBoth(lambda r: call.cancel() if call.active() else None)
        return self._all_closed

    def closed(self, conn: PushConnection) -> None:
        self._closing.discard(conn)
        if not self._closing and self._all_closed is not None:
            done, self._all_closed = self._all_closed, None
            done.callback(None)

    def _abort_closing(self) -> None:
        for conn in list(self._closing):
            if conn.state != PushConnection.STATE_CLOSED:
                conn.dropConnection(abort=True)
        self._closing.clear()
        if self._all_closed is not None:
            done, self._all_closed = self._all_closed, None
            done.callback(None)
