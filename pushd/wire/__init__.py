"""Wire protocols: each is a codec (frames -> commands, events -> frames), and a `Wire` is a codec in the
framing of one transport.

The hub caches a published message's frame per `Wire`, so a node serving two protocols encodes a message twice,
never once per subscriber. A new protocol is a new codec beside `native` and `centrifugo`; a new transport is
a new framing function; neither touches the hub or the session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pushd.protocol import Command, Disconnect, Error, Event, Limits
from pushd.recovery import Position


class Codec(Protocol):
    """One wire protocol, as pure functions: no state, no I/O."""

    #: Short name for logs and counters.
    name: str
    #: The client opens its session with a `Connect` command; otherwise the session is open at once.
    opens_with_connect: bool
    #: The text of an application-level ping sent every ping interval (None: the transport's own pings).
    ping: bytes | None
    #: Clients track their position in each topic: one that the node knows missed messages is told (`Lost`) and
    #: unsubscribed, to subscribe again and recover.
    positioned: bool

    def decode(self, payload: bytes, limits: Limits) -> list[Command | Error]:
        """The commands of one client frame (several, for protocols that batch them), in order."""

    def encode(self, event: Event) -> list[bytes]:
        """The texts (one frame each) that tell the client of `event`; none when the protocol says nothing."""

    def publication(self, topic: str, payload: bytes, position: Position | None) -> bytes:
        """The text of one published message; made once per message for all subscribers of this codec."""

    def message(self, payload: bytes) -> bytes:
        """The text of a message to one user's connections."""

    def broadcast(self, broadcast_id: str, payload: bytes) -> bytes:
        """The text of a site-wide broadcast."""

    def close(self, reason: Disconnect, detail: str) -> tuple[int, str]:
        """The close code and reason text for `reason`."""


class Wire:
    """A codec in one transport's framing: frames ready to write, and the key of the hub's frame cache."""

    __slots__ = ("codec", "frame", "name")

    def __init__(self, codec: Codec, frame: Callable[[bytes], bytes]) -> None:
        self.codec = codec
        self.frame = frame
        self.name = codec.name

    def publication(self, topic: str, payload: bytes, position: Position | None) -> bytes:
        return self.frame(self.codec.publication(topic, payload, position))

    def message(self, payload: bytes) -> bytes:
        return self.frame(self.codec.message(payload))

    def broadcast(self, broadcast_id: str, payload: bytes) -> bytes:
        return self.frame(self.codec.broadcast(broadcast_id, payload))

    def event(self, event: Event) -> bytes:
        """Every frame that tells the client of `event`, joined for one write."""
        return b"".join(self.frame(text) for text in self.codec.encode(event))

    def __repr__(self) -> str:
        return f"Wire({self.name})"
