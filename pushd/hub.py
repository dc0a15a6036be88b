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

from pushd.patterns import PatternIndex, is_pattern
from pushd.protocol import encode_data
from pushd.recovery import Position

#: A live message kept for a connection whose recovery is reading history: (offset or None, frame bytes).
Held = tuple[str | None, bytes]


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


def text_frame(text: bytes) -> bytes:
    """One complete, unmasked WebSocket text frame carrying `text`: encoded once, written to many."""
    return PreparedMessage(text, False, False, True).payloadHybi


def frame_bytes(topic: str, payload: bytes, position: Position | None = None) -> bytes:
    """The WebSocket frame of the data frame for one published message."""
    return text_frame(encode_data(topic, payload, position))


class Hub:
    """topic -> local subscribers, topic patterns -> local subscribers, user -> local connections."""

    def __init__(self, observer: MembershipObserver | None = None) -> None:
        self.observer: MembershipObserver = observer or _NoObserver()
        self._topics: dict[str, set[Subscriber]] = {}
        self._patterns: PatternIndex[Subscriber] = PatternIndex()
        self._connections: dict[str, Subscriber] = {}
        self._users: dict[str, set[Subscriber]] = {}
        self._user_of: dict[Subscriber, str] = {}
        #: topic -> connection -> live messages held while that connection's recovery reads history.
        self._holds: dict[str, dict[Subscriber, list[Held]]] = {}
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
        self._forget_user(conn)
        self.observer.closed(conn.conn_id)

    def identify(self, conn: Subscriber, user: str) -> None:
        """Record that `conn` belongs to `user`, so messages to that user reach it."""
        if conn.conn_id not in self._connections:
            return
        self._forget_user(conn)
        self._user_of[conn] = user
        self._users.setdefault(user, set()).add(conn)

    def _forget_user(self, conn: Subscriber) -> None:
        user = self._user_of.pop(conn, None)
        if user is not None:
            connections = self._users[user]
            connections.discard(conn)
            if not connections:
                del self._users[user]

    def user_connections(self, user: str) -> tuple[Subscriber, ...]:
        return tuple(self._users.get(user, ()))

    def subscribe(self, conn: Subscriber, topics: Iterable[str], held: Iterable[str] = ()) -> tuple[str, ...]:
        """Add subscriptions (topics or patterns); returns those that were new for this connection.

        New topics in `held` are recorded but not yet live: their messages are kept for `release`, which a
        recovery calls once it has read the history, so the replay and the live stream meet without a gap.
        """
        if conn.conn_id not in self._connections:
            return ()
        added = tuple(t for t in dict.fromkeys(topics) if t not in conn.topics)
        hold = set(held)
        for topic in added:
            conn.topics.add(topic)
            if topic in hold:
                self._holds.setdefault(topic, {})[conn] = []
            else:
                self._index(topic, conn)
        if added:
            self.observer.subscribed(conn.conn_id, added)
        return added

    def release(self, conn: Subscriber, topic: str) -> list[Held] | None:
        """Make a held subscription live; returns the messages held meanwhile (None if it is gone)."""
        holders = self._holds.get(topic)
        held = holders.pop(conn, None) if holders is not None else None
        if holders is not None and not holders:
            del self._holds[topic]
        if held is None or topic not in conn.topics:
            return None
        self._index(topic, conn)
        return held

    def _index(self, topic: str, conn: Subscriber) -> None:
        if is_pattern(topic):
            self._patterns.add(topic, conn)
            return
        subscribers = self._topics.get(topic)
        if subscribers is None:
            self._topics[topic] = {conn}
        else:
            subscribers.add(conn)

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
        holders = self._holds.get(topic)
        if holders is not None and holders.pop(conn, None) is not None:
            if not holders:
                del self._holds[topic]
            return
        if is_pattern(topic):
            self._patterns.discard(topic, conn)
            return
        subscribers = self._topics.get(topic)
        if subscribers is not None:
            subscribers.discard(conn)
            if not subscribers:
                del self._topics[topic]

    def _recipients(self, topic: str) -> set[Subscriber] | None:
        """The live local subscribers of `topic`, through exact and pattern subscriptions, each once.

        A connection recovering `topic` gets its messages from the hold, not also through a pattern.
        """
        exact = self._topics.get(topic)
        if not self._patterns:
            return exact
        matched = self._patterns.matching(topic)
        if not matched:
            return exact
        holders = self._holds.get(topic) if self._holds else None
        if not exact and len(matched) == 1 and not holders:
            return matched[0]
        union = set(exact) if exact else set()
        for subscribers in matched:
            union.update(subscribers)
        if holders:
            union.difference_update(holders)
        return union

    # -- fan-out ------------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, position: Position | None = None) -> int:
        """Deliver one published message to the local subscribers of `topic`; returns how many there were.

        Inside `begin_batch()`...`flush()` frames are held and written per connection in one go at flush
        time, which turns the several messages of one Redis read into one write (one TLS record) each.
        """
        self.published += 1
        subscribers = self._recipients(topic)
        holders = self._holds.get(topic) if self._holds else None
        if not subscribers and not holders:
            return 0
        frame = frame_bytes(topic, payload, position)
        if holders:
            offset = position.offset if position is not None else None
            for held in holders.values():
                held.append((offset, frame))
        if not subscribers:
            return 0
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
            subscribers = self._recipients(first_topic)
            if subscribers:
                self._write_all(tuple(subscribers), b"".join(frame for _, frame in batch), len(batch))
            return
        pending: dict[Subscriber, list[bytes]] = {}
        for topic, frame in batch:
            for conn in self._recipients(topic) or ():
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
        if is_pattern(topic):
            return len(self._patterns.subscribers(topic))
        return len(self._topics.get(topic, ()))

    def topic_count(self) -> int:
        return len(self._topics) + len(self._patterns)

    def snapshot(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """(connection id, its topics) for every local connection: what Redis must hold for this node."""
        for conn_id, conn in tuple(self._connections.items()):
            yield conn_id, tuple(conn.topics)
