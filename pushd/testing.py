"""Run whole WebSocket client sessions against a real `PushFactory` in memory, on a fake clock.

`MemoryNode` builds the factory and hub the server uses, with a `MemoryReactorClock` in place of the reactor;
`MemoryNode.connect()` returns a `MemoryClient` that does the opening handshake, sends masked frames and reads
the server's frames back from a `StringTransport`. Tests advance time instead of sleeping.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import txaio
from autobahn.websocket.protocol import PreparedMessage
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from pushd.hooks import Hooks
from pushd.hub import Hub, MembershipObserver
from pushd.origins import SAME_HOST, OriginPolicy
from pushd.protocol import Limits
from pushd.recovery import Position
from pushd.session import AuthPolicy, HistoryReader, PresenceReader, Services, Session
from pushd.tasks import TaskRunner
from pushd.wire import Wire
from pushd.ws import CENTRIFUGO, NATIVE, PushConnection, PushFactory

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


class InlineTasks:
    """A task pool that runs each task at once, on the caller's thread (deterministic tests)."""

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(f, *args, **kwargs)


class RecordingObserver:
    """A `MembershipObserver` that records every change, for asserting what goes to Redis."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def opened(self, conn_id: str) -> None:
        self.events.append(("opened", conn_id))

    def identified(self, conn_id: str, user: str) -> None:
        self.events.append(("identified", conn_id, user))

    def subscribed(self, conn_id: str, topics: tuple[str, ...]) -> None:
        self.events.append(("subscribed", conn_id, topics))

    def unsubscribed(self, conn_id: str, topics: tuple[str, ...]) -> None:
        self.events.append(("unsubscribed", conn_id, topics))

    def closed(self, conn_id: str) -> None:
        self.events.append(("closed", conn_id))


class FakeSubscriber:
    """A hub `Subscriber` that records what it is sent; `accept=False` makes every write fail (a slow consumer)."""

    def __init__(self, conn_id: str, accept: bool = True, wire: Wire = NATIVE) -> None:
        self.conn_id = conn_id
        self.topics: set[str] = set()
        self.wire = wire
        self.written: list[bytes] = []
        self.accept = accept
        self.dropped: str | None = None
        self.lost_topics: list[str] = []
        self.lost_reasons: list[str] = []

    def write(self, data: bytes) -> bool:
        if not self.accept:
            return False
        self.written.append(data)
        return True

    def drop(self, reason: str) -> None:
        self.dropped = reason

    def lost(self, topic: str, reason: str) -> None:
        self.lost_topics.append(topic)
        self.lost_reasons.append(reason)


@dataclass
class Frame:
    opcode: int
    payload: bytes

    def json(self) -> Any:
        return json.loads(self.payload)

    @property
    def close_code(self) -> int | None:
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        return int(struct.unpack("!H", self.payload[:2])[0])


def parse_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """Split server-to-client bytes into frames; returns the frames and any incomplete tail."""
    frames = []
    while len(data) >= 2:
        opcode = data[0] & 0x0F
        length = data[1] & 0x7F
        offset = 2
        if length == 126:
            if len(data) < 4:
                break
            length, offset = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            if len(data) < 10:
                break
            length, offset = struct.unpack("!Q", data[2:10])[0], 10
        if len(data) < offset + length:
            break
        frames.append(Frame(opcode, data[offset:offset + length]))
        data = data[offset + length:]
    return frames, data


class MemoryTransport(StringTransport):
    """StringTransport that, like Twisted's socket and TLS transports, lets a missing producer be unregistered
    and records TCP_NODELAY."""

    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def unregisterProducer(self) -> None:
        if self.producer is not None:
            super().unregisterProducer()


class MemoryClient:
    """One client connection to a `MemoryNode`, driven by hand. It sends `Host: localhost` and, like a browser,
    an `Origin` when given one; `headers` add to or replace the handshake's headers (Host included)."""

    def __init__(self, node: MemoryNode, path: str = "/ws", port: int = 40000, origin: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self.node = node
        self.transport = MemoryTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        protocol = node.factory.buildProtocol(self.transport.getPeer())
        assert isinstance(protocol, PushConnection)
        self.protocol: PushConnection = protocol
        self.protocol.makeConnection(self.transport)
        sent = {"Host": "localhost", "Upgrade": "websocket", "Connection": "Upgrade",
                "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), "Sec-WebSocket-Version": "13"}
        if origin is not None:
            sent["Origin"] = origin
        sent.update(headers or {})
        lines = "".join(f"{name}: {value}\r\n" for name, value in sent.items())
        self.protocol.dataReceived(f"GET {path} HTTP/1.1\r\n{lines}\r\n".encode())
        raw = self.transport.value()
        head, _, rest = raw.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1]) if head else 0
        self._buffer: bytes = rest if self.status == 101 else b""
        self.transport.clear()

    @property
    def session(self) -> Session:
        assert self.protocol.session is not None, "the handshake did not complete"
        return self.protocol.session

    @property
    def conn_id(self) -> str:
        return self.session.conn_id

    def send_frame(self, opcode: int, payload: bytes) -> None:
        frame = PreparedMessage(payload, opcode == OP_BINARY, True, True).payloadHybi
        if opcode not in (OP_TEXT, OP_BINARY):
            frame = bytes([0x80 | opcode]) + frame[1:]
        self.protocol.dataReceived(frame)

    def send(self, message: Any) -> None:
        """Send a text frame: a str as it is, anything else as JSON."""
        text = message if isinstance(message, str) else json.dumps(message)
        self.send_frame(OP_TEXT, text.encode())

    def frames(self) -> list[Frame]:
        """Frames the server sent since the last call."""
        frames, self._buffer = parse_frames(self._buffer + self.transport.value())
        self.transport.clear()
        return frames

    def messages(self) -> list[Any]:
        """JSON of the text frames the server sent since the last call."""
        return [f.json() for f in self.frames() if f.opcode == OP_TEXT]

    def request(self, message: Any) -> list[Any]:
        self.send(message)
        return self.messages()

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.protocol.state == PushConnection.STATE_CLOSED

    def disconnect(self) -> None:
        """The peer vanishes (no close frame)."""
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.protocol.connectionLost(Failure(ConnectionLost()))


@dataclass
class MemoryNode:
    """A node's WebSocket side in memory: factory, hub and fake clock."""

    limits: Limits = field(default_factory=Limits)
    hooks: Hooks = field(default_factory=Hooks)
    observer: MembershipObserver | None = None
    max_frame_size: int = 65536
    high_water_mark: int = 1 << 20
    bad_frame_limit: int = 20
    ping_interval: int = 0
    ping_timeout: int = 10
    node_id: str = "test-node"
    auth: AuthPolicy = field(default_factory=AuthPolicy)
    history: HistoryReader | None = None
    presence: PresenceReader | None = None
    tasks: TaskRunner = field(default_factory=lambda: InlineTasks())
    origins: OriginPolicy = SAME_HOST

    def __post_init__(self) -> None:
        self.clock = MemoryReactorClock()
        txaio.use_twisted()
        txaio.config.loop = self.clock  # type: ignore[attr-defined]
        self.hub = Hub(self.observer)
        self.services = Services(
            clock=self.clock, hub=self.hub, limits=self.limits, tasks=self.tasks, hooks=self.hooks,
            auth=self.auth, history=self.history, presence=self.presence, bad_frame_limit=self.bad_frame_limit,
            ping_interval=self.ping_interval, ping_timeout=self.ping_timeout)
        self.factory = PushFactory(
            services=self.services, node_id=self.node_id, wires={"/ws": NATIVE, "/connection/websocket": CENTRIFUGO},
            max_frame_size=self.max_frame_size, high_water_mark=self.high_water_mark,
            ping_interval=self.ping_interval, ping_timeout=self.ping_timeout, origins=self.origins)

    def connect(self, path: str = "/ws", origin: str | None = None,
                headers: Mapping[str, str] | None = None) -> MemoryClient:
        return MemoryClient(self, path, origin=origin, headers=headers)

    def publish(self, topic: str, payload: bytes, position: Position | None = None) -> int:
        return self.hub.publish(topic, payload, position)
