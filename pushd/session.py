"""One client's session: who it is, what it is subscribed to, what it is recovering, whatever its protocol.

The session runs the commands a codec (`pushd.wire`) decodes and tells the client what happened in events the
same codec encodes; it writes through its connection (`pushd.ws.PushConnection` for WebSockets). The hub
indexes sessions, so the hot path writes a ready frame straight to the connection and never meets the codec.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from pushd.auth import AuthError, Identity, Permissions, TokenExpired, TokenVerifier
from pushd.hooks import Hooks
from pushd.hub import Held, Hub
from pushd.patterns import is_pattern
from pushd.protocol import (
    Auth,
    Authenticated,
    Command,
    Connect,
    Connected,
    Disconnect,
    Error,
    ErrorCode,
    Event,
    HistoryPage,
    HistoryRead,
    Limits,
    Lost,
    Ping,
    Pong,
    Ponged,
    PresenceCount,
    PresenceStats,
    RefreshNeeded,
    Revoked,
    Started,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
)
from pushd.recovery import Position, SeqSince, Since, offset_key, stitch
from pushd.redis.history import RecoveryFailed, Replay, StreamTop
from pushd.tasks import TaskRunner
from pushd.wire import Wire

#: Refused frames are counted over this many seconds against the bad-frame limit.
BAD_FRAME_WINDOW = 60.0

#: Why a refresh unsubscribed a connection from topics it had.
REVOKED_REASON = "token no longer allows these topics"

#: What `Hub.pruned` counts a server-side close as.
_PRUNED = {
    Disconnect.INVALID_TOKEN: "invalid_token",
    Disconnect.TOKEN_EXPIRED: "token_expired",
    Disconnect.AUTH_REQUIRED: "auth_timeout",
    Disconnect.BAD_REQUEST: "bad_frames",
    Disconnect.NO_PONG: "ping_timeout",
}


@dataclass(frozen=True)
class AuthPolicy:
    """How connections prove who they are (`--auth`), and what they may subscribe to."""

    mode: str = "off"
    verifier: TokenVerifier | None = None
    permissions: Permissions = field(default_factory=Permissions)
    auth_timeout: int = 10
    refresh_grace: int = 30


class HistoryReader(Protocol):
    """The reads a session makes of history (`pushd.redis.history.History`)."""

    def keeps_history(self, topic: str) -> bool: ...

    def recover(self, topic: str, since: Since) -> defer.Deferred[Replay | RecoveryFailed]: ...

    def latest(self, topic: str) -> defer.Deferred[tuple[Position, bytes] | None]: ...

    def top(self, topic: str) -> defer.Deferred[StreamTop | None]: ...

    def page(self, topic: str, limit: int, since: SeqSince | None,
             reverse: bool) -> defer.Deferred[tuple[StreamTop, list[tuple[Position, bytes]]] | RecoveryFailed]: ...


class PresenceReader(Protocol):
    """Cluster-wide subscriber counts (`pushd.cluster.Cluster`)."""

    def presence(self, topic: str) -> defer.Deferred[tuple[int, int]]: ...


class Connection(Protocol):
    """The transport end of a session."""

    def write(self, data: bytes) -> bool:
        """Write ready frames; False when the connection had to be dropped instead (a slow consumer)."""

    def drop(self, reason: str) -> None:
        """Cut the connection at once, counting `reason`."""

    def close_with(self, code: int, reason: str) -> None:
        """Start the closing handshake with `code`."""


@dataclass(frozen=True)
class Services:
    """What every session of a node shares."""

    clock: Any
    hub: Hub
    limits: Limits
    tasks: TaskRunner
    hooks: Hooks = field(default_factory=Hooks)
    auth: AuthPolicy = field(default_factory=AuthPolicy)
    history: HistoryReader | None = None
    presence: PresenceReader | None = None
    bad_frame_limit: int = 20
    ping_interval: int = 25
    ping_timeout: int = 10
    log: Logger = field(default_factory=Logger)


class Session:
    """One client, as the hub sees it (a `pushd.hub.Subscriber`) and as its protocol drives it."""

    def __init__(self, services: Services, connection: Connection, wire: Wire, conn_id: str, *,
                 url_token: str | None = None, request: Any = None) -> None:
        self.conn_id = conn_id
        self.topics: set[str] = set()
        self.wire = wire
        # The hub writes published frames straight to the connection: no call through the session.
        self.write: Callable[[bytes], bool] = connection.write
        self.drop: Callable[[str], None] = connection.drop
        self.identity: Identity | None = None
        self._services = services
        self.connection = connection
        self._codec = wire.codec
        self._request = request
        self._url_token = url_token
        self._connected = not wire.codec.opens_with_connect
        self._closed = False
        self._pending: deque[Command] | None = None
        self._bad_frames = 0
        self._bad_window_start = 0.0
        self._timers: dict[str, Any] = {}
        #: Topics whose history is being read (held subscriptions), and those of them a refresh took back.
        self._reading: set[str] = set()
        self._revoked_reads: set[str] = set()

    # -- life ---------------------------------------------------------------------------------------------

    def open(self) -> None:
        """The transport is ready: join the hub, start waiting for a token or a connect command."""
        self._services.hub.add(self)
        policy = self._services.auth
        if not self._connected:
            self._later("auth", policy.auth_timeout, self._auth_timed_out)
            return
        token, self._url_token = self._url_token, None
        if policy.mode == "off":
            return
        if token is not None:
            self._authenticate(token)
        elif policy.mode == "required":
            self._later("auth", policy.auth_timeout, self._auth_timed_out)

    def closed(self) -> None:
        """The transport is gone, for whatever reason."""
        self._closed = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._services.hub.remove(self)

    def close(self, reason: Disconnect, detail: str) -> None:
        """Close the connection for `reason`, in the protocol's own words."""
        counted = _PRUNED.get(reason)
        if counted is not None:
            self._services.hub.pruned[counted] += 1
        code, text = self._codec.close(reason, detail)
        self.close_with(code, text)

    def close_with(self, code: int, reason: str) -> None:
        """Leave the index at once and start the closing handshake (also for the HTTP API's codes)."""
        self._closed = True
        self._services.hub.remove(self)
        self.connection.close_with(code, reason)

    # -- client frames ------------------------------------------------------------------------------------

    def received(self, payload: bytes) -> None:
        """One text frame from the client."""
        for command in self._codec.decode(payload, self._services.limits):
            if self._closed:
                return
            if isinstance(command, Error):
                self._refuse(command)
            elif self._pending is not None:
                self._pending.append(command)
            else:
                self._run(command)

    def _run(self, command: Command) -> None:
        if isinstance(command, Pong):
            self._cancel("pong")
        elif isinstance(command, Connect):
            self._connect(command)
        elif not self._connected:
            self.close(Disconnect.BAD_REQUEST, "connect first")
        elif isinstance(command, Ping):
            self._send(Ponged(command))
        elif isinstance(command, Unsubscribe):
            self._services.hub.unsubscribe(self, command.topics)
            self._send(Unsubscribed(command))
        elif isinstance(command, Auth):
            self._refresh(command)
        elif isinstance(command, HistoryRead):
            self._read_history(command)
        elif isinstance(command, PresenceStats):
            self._count_presence(command)
        else:
            self._subscribe(command)

    def _send(self, event: Event) -> None:
        if not self._closed:
            self.write(self.wire.event(event))

    def _refuse(self, error: Error) -> None:
        if error.fatal:
            self.close(Disconnect.BAD_REQUEST, error.message)
            return
        self._send(error)
        now = self._services.clock.seconds()
        if now - self._bad_window_start > BAD_FRAME_WINDOW:
            self._bad_window_start, self._bad_frames = now, 0
        self._bad_frames += 1
        if self._bad_frames > self._services.bad_frame_limit:
            self.close(Disconnect.BAD_REQUEST, "too many bad frames")

    # -- who the client is ------------------------------------------------------------------------------

    def _connect(self, command: Connect) -> None:
        if self._connected:
            self.close(Disconnect.BAD_REQUEST, "already connected")
            return
        policy = self._services.auth
        token = command.token or self._url_token
        self._url_token = None
        if token is not None and policy.mode != "off":
            try:
                self._verify(token)
            except TokenExpired:
                # The client fetches a fresh token and connects again (Centrifugo's SDKs do so by themselves).
                self._send(Error(ErrorCode.TOKEN_EXPIRED, "token expired", command.id))
                return
            except AuthError as e:
                self.close(Disconnect.INVALID_TOKEN, str(e))
                return
        elif policy.mode == "required":
            self.close(Disconnect.INVALID_TOKEN, "a token is required")
            return
        self._connected = True
        self._cancel("auth")
        identity = self.identity
        expires = identity.expires if identity is not None else 0.0
        self._send(Connected(command.id, self.conn_id, identity.user if identity is not None else None, expires,
                             self._ttl(expires), self._services.ping_interval))
        self._schedule_ping()

    def _refresh(self, command: Auth) -> None:
        if self._services.auth.mode == "off":
            self._refuse(Error(ErrorCode.BAD_REQUEST, "client tokens are off on this server", command.id))
            return
        try:
            self._verify(command.token)
        except TokenExpired as e:
            self.close(Disconnect.STALE_TOKEN, str(e))
            return
        except AuthError as e:
            self.close(Disconnect.INVALID_TOKEN, str(e))
            return
        identity = self.identity
        assert identity is not None
        self._revoke_forbidden()
        self._send(Authenticated(command, self.conn_id, identity.user, identity.expires, self._ttl(identity.expires)))

    def _revoke_forbidden(self) -> None:
        """Take back the subscriptions (topics, patterns, held ones) the new identity no longer allows.

        The rule is the one `_subscribe` applies; the authorize hook is not asked again, since what it is given,
        the connection's request, is the same as when it allowed them.
        """
        permissions = self._services.auth.permissions
        refused = tuple(sorted(t for t in self.topics if not permissions.may_subscribe(self.identity, t)))
        if not refused:
            return
        self._revoked_reads.update(self._reading.intersection(refused))
        self._services.hub.unsubscribe(self, refused)
        self._send(Revoked(refused, REVOKED_REASON))

    def _authenticate(self, token: str) -> bool:
        """Check a token from the URL; a bad one closes the connection."""
        try:
            self._verify(token)
        except AuthError as e:
            self.close(Disconnect.INVALID_TOKEN, str(e))
            return False
        return True

    def _verify(self, token: str) -> None:
        """Make `token` the session's identity, or raise AuthError."""
        verifier = self._services.auth.verifier
        clock = self._services.clock
        if verifier is None:
            raise AuthError("this server accepts no tokens")
        identity = verifier.verify(token, clock.seconds())
        if self.identity is not None and identity.user != self.identity.user:
            raise AuthError("token is for another user")
        self.identity = identity
        for name in ("auth", "expiry", "grace"):
            self._cancel(name)
        self._services.hub.identify(self, identity.user)
        self._later("expiry", max(0.0, identity.expires - clock.seconds()), self._token_expired)

    def _ttl(self, expires: float) -> int:
        if not expires:
            return 0
        return max(1, int(expires - self._services.clock.seconds()))

    def _auth_timed_out(self) -> None:
        self.close(Disconnect.AUTH_REQUIRED, "authentication required: no token received in time")

    def _token_expired(self) -> None:
        self._send(RefreshNeeded())
        self._later("grace", self._services.auth.refresh_grace, self._refresh_missed)

    def _refresh_missed(self) -> None:
        self.close(Disconnect.TOKEN_EXPIRED, "token expired and no fresh token arrived")

    # -- liveness -----------------------------------------------------------------------------------------

    def _schedule_ping(self, first: bool = True) -> None:
        interval = self._services.ping_interval
        if self._codec.ping is not None and interval:
            # The first ping comes at a random point of the interval, so the pings of connections that opened
            # together (a reconnect storm) do not stay in step.
            self._later("ping", random.uniform(interval / 2, interval) if first else interval, self._ping)

    def _ping(self) -> None:
        assert self._codec.ping is not None
        if self.write(self.wire.frame(self._codec.ping)):
            if "pong" not in self._timers:
                self._later("pong", self._services.ping_timeout, self._no_pong)
            self._schedule_ping(first=False)

    def _no_pong(self) -> None:
        self._timers.pop("pong", None)
        self.close(Disconnect.NO_PONG, "no pong")

    def _later(self, name: str, delay: float, f: Callable[[], None]) -> None:
        self._cancel(name)

        def fire() -> None:
            self._timers.pop(name, None)
            f()

        self._timers[name] = self._services.clock.callLater(delay, fire)

    def _cancel(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    # -- subscriptions ----------------------------------------------------------------------------------

    def _subscribe(self, command: Subscribe) -> None:
        limit = self._services.limits.max_topics_per_connection
        if len(self.topics.union(command.topics)) > limit:
            self._refuse(Error(ErrorCode.TOO_MANY_TOPICS,
                               f"subscribing would exceed {limit} topics on this connection", command.id))
            return
        if command.exclusive:
            already = tuple(t for t in command.topics if t in self.topics)
            if already:
                self._refuse(Error(ErrorCode.ALREADY_SUBSCRIBED, "already subscribed", command.id, already))
                return
        policy = self._services.auth
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
        authorize = self._services.hooks.authorize
        if authorize is None:
            self._grant(command)
            return
        # Later frames wait until this one is decided, so a client's commands keep their order.
        self._pending = deque()
        d = self._services.tasks.run(_refused_topics, authorize, self._request, command.topics)
        d.addCallbacks(self._authorized, self._authorize_failed, callbackArgs=(command,), errbackArgs=(command,))
        d.addBoth(self._resume_pending)

    def _authorized(self, refused: list[str], command: Subscribe) -> None:
        if refused:
            self._refuse(Error(ErrorCode.FORBIDDEN, "not allowed to subscribe to these topics", command.id,
                               tuple(refused)))
        else:
            self._grant(command)

    def _authorize_failed(self, failure: Failure, command: Subscribe) -> None:
        self._services.log.failure("authorize hook raised; subscription refused", failure)
        self._refuse(Error(ErrorCode.INTERNAL_ERROR, "authorization failed on the server", command.id))

    def _resume_pending(self, _: Any) -> None:
        pending, self._pending = self._pending, None
        while pending and self._pending is None and not self._closed:
            self._run(pending.popleft())
        if pending and self._pending is not None:
            self._pending.extendleft(reversed(pending))

    def _grant(self, command: Subscribe) -> None:
        hub = self._services.hub
        if self._closed or hub.connection(self.conn_id) is not self:
            return
        history = self._services.history
        reads: dict[str, Callable[[], defer.Deferred[Any]]] = {}
        if history is not None:
            for topic in command.topics:
                if topic in self.topics or is_pattern(topic):
                    continue
                since = command.since.get(topic)
                if since is not None:
                    reads[topic] = _bind(history.recover, topic, since)
                elif command.last:
                    reads[topic] = _bind(history.latest, topic)
                elif command.position and history.keeps_history(topic):
                    reads[topic] = _bind(history.top, topic)
        hub.subscribe(self, command.topics, held=reads)
        self._send(Subscribed(command, tuple(reads)))
        if history is None:
            if command.last or command.since:
                self._refuse(Error(ErrorCode.RECOVERY_FAILED, "this server keeps no history", command.id,
                                   tuple(command.since) or command.topics))
            return
        self._reading.update(reads)
        for topic, read in reads.items():
            read().addBoth(self._history_read, command, topic)

    def _history_read(self, result: Any, command: Subscribe, topic: str) -> None:
        self._reading.discard(topic)
        if topic in self._revoked_reads:
            # A refresh took the subscription (and its hold) back mid-read: its subscribe is still answered, as
            # a Centrifugo SDK waits for the reply, with a refusal.
            self._revoked_reads.discard(topic)
            self._send(Error(ErrorCode.FORBIDDEN, REVOKED_REASON, command.id, (topic,)))
            return
        held = self._services.hub.release(self, topic)
        if held is None or self._closed:
            return
        since = command.since.get(topic)
        if isinstance(result, Failure):
            self._services.log.warn("history read for {topic} failed: {error}", topic=topic, error=result.value)
            if self._codec.positioned:
                # Going live without a position would leave the client unable to recover later: it is refused
                # with a temporary error instead, and the SDK subscribes again (and recovers) after a while.
                self._withdraw(topic, Error(ErrorCode.INTERNAL_ERROR, "history could not be read; try again",
                                            command.id, (topic,)))
                return
            failure = "history could not be read; reload and subscribe again" if since is not None else None
            self._start(Started(command, topic, recovering=since is not None, failure=failure), held)
        elif isinstance(result, Replay):
            assert since is not None
            replay = self._rewritten(topic, result.entries)
            fresh = stitch(since, [position for position, _ in result.entries], held)
            start = result.entries[0][0].seq - 1 if result.entries else result.top
            self._start(Started(command, topic, replay, (result.epoch, start), recovering=True), fresh)
        elif isinstance(result, RecoveryFailed) and command.strict_recovery:
            self._withdraw(topic, Error(ErrorCode.RECOVERY_FAILED, result.reason, command.id, (topic,)))
        elif isinstance(result, RecoveryFailed):
            top = (result.top.epoch, result.top.seq) if result.top is not None else None
            self._start(Started(command, topic, top=_before_held(top, held), recovering=True,
                                failure=result.reason), held)
        elif isinstance(result, StreamTop):
            self._start(Started(command, topic, top=_before_held((result.epoch, result.seq), held)), held)
        elif isinstance(result, tuple):
            position, payload = result
            first = _first_placed(held)
            # The latest message is sent unless the live hold already has it (or something after it).
            newer = first is None or offset_key(first.offset) > offset_key(position.offset)
            replay = self._rewritten(topic, ((position, payload),)) if newer else ()
            self._start(Started(command, topic, replay), held)
        else:
            self._start(Started(command, topic), held)

    def _withdraw(self, topic: str, error: Error) -> None:
        """Take back a subscription whose history read went wrong, and say why."""
        self._services.hub.unsubscribe(self, (topic,))
        self._send(error)

    def _start(self, started: Started, held: list[Held] | list[bytes]) -> None:
        frames = [item if isinstance(item, bytes) else item[1] for item in held]
        self.write(self.wire.event(started) + b"".join(frames))

    def _rewritten(self, topic: str, entries: Any) -> tuple[tuple[Position, bytes], ...]:
        """Replayed messages rewritten by on_message as a live one would be; those it drops are left out."""
        hooks = self._services.hooks
        kept = []
        for position, payload in entries:
            rewritten = hooks.rewrite(topic, payload)
            if rewritten is not None:
                kept.append((position, rewritten))
        return tuple(kept)

    def lost(self, topic: str, reason: str) -> None:
        """The node may have missed messages of `topic` (a topic or a pattern subscribed to): a client that tracks
        positions is unsubscribed, to subscribe again and recover; any other is told, to refetch."""
        if topic not in self.topics or self._closed:
            return
        if self._codec.positioned:
            self._services.hub.unsubscribe(self, (topic,))
        self._send(Lost(topic, reason))

    # -- reads for the client -----------------------------------------------------------------------------

    def _read_history(self, command: HistoryRead) -> None:
        history = self._services.history
        if history is None or not history.keeps_history(command.topic):
            self._refuse(Error(ErrorCode.NOT_AVAILABLE, "this topic keeps no history", command.id, (command.topic,)))
            return
        if command.topic not in self.topics:
            self._refuse(Error(ErrorCode.FORBIDDEN, "subscribe to a topic to read its history", command.id,
                               (command.topic,)))
            return

        def answer(result: Any) -> None:
            if isinstance(result, Failure):
                self._services.log.warn("history read for {topic} failed: {error}", topic=command.topic,
                                        error=result.value)
                self._send(Error(ErrorCode.INTERNAL_ERROR, "history could not be read", command.id))
            elif isinstance(result, RecoveryFailed):
                self._send(Error(ErrorCode.RECOVERY_FAILED, result.reason, command.id, (command.topic,)))
            else:
                top, entries = result
                self._send(HistoryPage(command, self._rewritten(command.topic, entries), top.epoch, top.seq))

        history.page(command.topic, command.limit, command.since, command.reverse).addBoth(answer)

    def _count_presence(self, command: PresenceStats) -> None:
        presence = self._services.presence
        if presence is None:
            self._refuse(Error(ErrorCode.NOT_AVAILABLE, "presence is not available", command.id))
            return
        if not self._services.auth.permissions.may_subscribe(self.identity, command.topic) \
                and self._services.auth.mode != "off":
            self._refuse(Error(ErrorCode.FORBIDDEN, "not allowed to see this topic", command.id, (command.topic,)))
            return

        def answer(result: Any) -> None:
            if isinstance(result, Failure):
                self._services.log.warn("presence read for {topic} failed: {error}", topic=command.topic,
                                        error=result.value)
                self._send(Error(ErrorCode.INTERNAL_ERROR, "presence could not be read", command.id))
            else:
                clients, users = result
                self._send(PresenceCount(command, clients, users))

        presence.presence(command.topic).addBoth(answer)


def _bind(method: Callable[..., defer.Deferred[Any]], *args: Any) -> Callable[[], defer.Deferred[Any]]:
    return lambda: method(*args)


def _first_placed(held: list[Held]) -> Position | None:
    return next((position for position, _ in held if position is not None), None)


def _before_held(top: tuple[str, int] | None, held: list[Held]) -> tuple[str, int] | None:
    """The position to tell a client whose live messages start with `held`: before the first of them.

    Messages published while the position was read are both in history and in the hold; the client gets them
    live, so its position must not be past them.
    """
    first = _first_placed(held)
    if top is None or first is None or not first.seq or first.epoch != top[0]:
        return top
    return top[0], min(top[1], first.seq - 1)


def _refused_topics(authorize: Callable[[Any, str], bool], request: Any, topics: tuple[str, ...]) -> list[str]:
    """Runs in a task worker: the topics `authorize` does not allow (anything but True refuses)."""
    return [topic for topic in topics if authorize(request, topic) is not True]

