"""The node's in-memory index of who is subscribed to what, and the fan-out of published messages.

This is the hot path: a published message is framed once and the same bytes are written to every local
subscriber; Redis is never read here. Index changes are reported to a `MembershipObserver` (the Redis
mirror), so data flows one way: Redis listener -> hub -> connections, and hub -> membership writer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Protocol

from autobahn.websocket.protocol import PreparedMessage

from pushd.protocol import encode_data


class Subscriber(Protocol):
    """One local connection as the hub sees it."""

    conn_id: str
    topics: set[str]

    def write(self, data: bytes) -> bool:
        """Write ready-made frame bytes; False when the connection had to be dropped instead."""

    def drop(self, reason: str) -> None:
        """Close the connection for `reason` (a key of `Hub.pruned`)."""


class MembershipObserver(Protocol):
    """Told of every index change, in order; the Redis mirror implements it."""

    def opened(self, conn_id: str) -> None: ...

    def subscribed(self, conn_id: str, topics: tuple[str, ...]) -> None: ...

    def unsubscribed(self, conn_id: str, topics: tuple[str, ...]) -> None: ...

    def closed(self, conn_id: str) -> None: ...


class _NoObserver:
    def opened(self, conn_id: str) -> None:
        pass

    def subscribed(self, conn_id: str, topics: tuple[str, ...]) -> None:
        pass

    def unsubscribed(self, conn_id: str, topics: tuple[str, ...]) -> None:
        pass

    def closed(self, conn_id: str) -> None:
        pass


def frame_bytes(topic: str, payload: bytes) -> bytes:
    """One complete, unmasked WebSocket text frame carrying the data frame for `payload`."""
    return PreparedMessage(encode_data(topic, payload), False, False, True).payloadHybi


class Hub:
    """topic -> local subscribers, plus the set of all local connections."""

    def __init__(self, observer: MembershipObserver | None = None) -> None:
        self.observer: MembershipObserver = observer or _NoObserver()
        self._topics: dict[str, set[Subscriber]] = {}
        self._connections: dict[str, Subscriber] = {}
        self._batch: list[tuple[str, bytes]] | None = None
        #: Connections dropped by the hot path or by liveness checks, by reason.
        self.pruned: Counter[str] = Counter()
        self.published = 0
        self.delivered = 0
        #: Batches written by `flush` and the frames they held: their ratio is how much coalescing saves.
        self.batches = 0
        self.batched_frames = 0

    # -- membership ---------------------------------------------------------------------------------------

    def add(self, conn: Subscriber) -> None:
        self._connections[conn.conn_id] = conn
        self.observer.opened(conn.conn_id)

    def remove(self, conn: Subscriber) -> None:
        """Forget a connection and all its subscriptions; safe to call more than once."""
        if self._connections.pop(conn.conn_id, None) is None:
            return
        for topic in conn.topics:
            self._discard(topic, conn)
        conn.topics.clear()
        self.observer.closed(conn.conn_id)

    def subscribe(self, conn: Subscriber, topics: Iterable[str]) -> tuple[str, ...]:
        """Add subscriptions; returns the topics that were new for this connection."""
        if conn.conn_id not in self._connections:
            return ()
        added = tuple(t for t in dict.fromkeys(topics) if t not in conn.topics)
        for topic in added:
            conn.topics.add(topic)
            subscribers = self._topics.get(topic)
            if subscribers is None:
                self._topics[topic] = {conn}
            else:
                subscribers.add(conn)
        if added:
            self.observer.subscribed(conn.conn_id, added)
        return added

    def unsubscribe(self, conn: Subscriber, topics: Iterable[str]) -> tuple[str, ...]:
        """Remove subscriptions; returns the topics the connection actually had."""
        removed = tuple(t for t in topics if t in conn.topics)
        for topic in removed:
            conn.topics.discard(topic)
            self._discard(topic, conn)
        if removed:
            self.observer.unsubscribed(conn.conn_id, removed)
        return removed

    def _discard(self, topic: str, conn: Subscriber) -> None:
        subscribers = self._topics.get(topic)
        if subscribers is not None:
            subscribers.discard(conn)
            if not subscribers:
                del self._topics[topic]

    # -- fan-out ------------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes) -> int:
        """Deliver one published message to the local subscribers of `topic`; returns how many there were.

        Inside `begin_batch()`...`flush()` frames are held and written per connection in one go at flush
        time, which turns the several messages of one Redis read into one write (one TLS record) each.
        """
        self.published += 1
        subscribers = self._topics.get(topic)
        if not subscribers:
            return 0
        frame = frame_bytes(topic, payload)
        if self._batch is not None:
            self._batch.append((topic, frame))
            return len(subscribers)
        self._write_all(tuple(subscribers), frame, 1)
        return len(subscribers)

    def begin_batch(self) -> None:
        if self._batch is None:
            self._batch = []

    def flush(self) -> None:
        """Write the frames held since `begin_batch`, keeping each connection's order of arrival."""
        batch, self._batch = self._batch, None
        if not batch:
            return
        self.batches += 1
        self.batched_frames += len(batch)
        first_topic = batch[0][0]
        if all(topic == first_topic for topic, _ in batch):
            subscribers = self._topics.get(first_topic)
            if subscribers:
                self._write_all(tuple(subscribers), b"".join(frame for _, frame in batch), len(batch))
            return
        pending: dict[Subscriber, list[bytes]] = {}
        for topic, frame in batch:
            for conn in self._topics.get(topic, ()):
                frames = pending.get(conn)
                if frames is None:
                    pending[conn] = [frame]
                else:
                    frames.append(frame)
        for conn, frames in pending.items():
            if conn.write(b"".join(frames)):
                self.delivered += len(frames)

    def _write_all(self, subscribers: tuple[Subscriber, ...], data: bytes, messages: int) -> None:
        written = 0
        for conn in subscribers:
            if conn.write(data):
                written += 1
        self.delivered += written * messages

    def broadcast_targets(self) -> Iterator[Subscriber]:
        """Every local connection, subscribed or not (the seam for site-wide broadcasts)."""
        return iter(tuple(self._connections.values()))

    # -- reading ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._connections)

    def connection(self, conn_id: str) -> Subscriber | None:
        return self._connections.get(conn_id)

    def subscriber_count(self, topic: str) -> int:
        return len(self._topics.get(topic, ()))

    def topic_count(self) -> int:
        return len(self._topics)

    def snapshot(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """(connection id, its topics) for every local connection: what Redis must hold for this node."""
        for conn_id, conn in tuple(self._connections.items()):
            yield conn_id, tuple(conn.topics)
