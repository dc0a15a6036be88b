"""The node's in-memory index of who is subscribed to what, and the fan-out of published messages.

This is the hot path: a published message is framed once per wire variant (protocol and transport) and the
same bytes are written to every local subscriber of that variant; Redis is never read here. Index changes are reported to a `MembershipObserver` (the Redis
mirror), so data flows one way: Redis listener -> hub -> connections, and hub -> membership writer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from pushd.patterns import PatternIndex, is_pattern
from pushd.recovery import Position, offset_key
from pushd.wire import Wire

#: A live message kept for a connection whose recovery is reading history: (position or None, frame bytes).
Held = tuple[Position | None, bytes]

#: Live messages a topic may keep while the node catches it up after an outage; past this it is told lost.
CATCH_UP_HOLD = 10_000


class Subscriber(Protocol):
    """One local connection as the hub sees it (a `pushd.session.Session`)."""

    conn_id: str
    topics: set[str]
    #: The wire variant the connection speaks: the key of the frame cache.
    wire: Wire

    def write(self, data: bytes) -> bool:
        """Write ready-made frame bytes; False when the connection had to be dropped instead."""

    def drop(self, reason: str) -> None:
        """Close the connection for `reason` (a key of `Hub.pruned`)."""

    def lost(self, topic: str, reason: str) -> None:
        """The node may have missed messages of `topic`, a topic or pattern it is subscribed to (its numbers
        jumped, its history's epoch changed, or Redis was out of reach)."""


class MembershipObserver(Protocol):
    """Told of every index change, in order; the Redis mirror implements it."""

    def opened(self, conn_id: str) -> None: ...

    def identified(self, conn_id: str, user: str) -> None: ...

    def subscribed(self, conn_id: str, topics: tuple[str, ...]) -> None: ...

    def unsubscribed(self, conn_id: str, topics: tuple[str, ...]) -> None: ...

    def closed(self, conn_id: str) -> None: ...


class _NoObserver:
    def opened(self, conn_id: str) -> None:
        pass

    def identified(self, conn_id: str, user: str) -> None:
        pass

    def subscribed(self, conn_id: str, topics: tuple[str, ...]) -> None:
        pass

    def unsubscribed(self, conn_id: str, topics: tuple[str, ...]) -> None:
        pass

    def closed(self, conn_id: str) -> None:
        pass


class Publication:
    """One published message and its frames, made once per wire variant as subscribers need them."""

    __slots__ = ("_frames", "payload", "position", "topic")

    def __init__(self, topic: str, payload: bytes, position: Position | None) -> None:
        self.topic = topic
        self.payload = payload
        self.position = position
        self._frames: dict[Wire, bytes] = {}

    def frame(self, wire: Wire) -> bytes:
        frame = self._frames.get(wire)
        if frame is None:
            frame = self._frames[wire] = wire.publication(self.topic, self.payload, self.position)
        return frame


class FrameCache:
    """One payload's frames per wire variant (user messages, broadcasts), made as connections need them."""

    __slots__ = ("_encode", "_frames")

    def __init__(self, encode: Callable[[Wire], bytes]) -> None:
        self._encode = encode
        self._frames: dict[Wire, bytes] = {}

    def frame(self, wire: Wire) -> bytes:
        frame = self._frames.get(wire)
        if frame is None:
            frame = self._frames[wire] = self._encode(wire)
        return frame


class Hub:
    """topic -> local subscribers, topic patterns -> local subscribers, user -> local connections."""

    def __init__(self, observer: MembershipObserver | None = None) -> None:
        self.observer: MembershipObserver = observer or _NoObserver()
        self._topics: dict[str, set[Subscriber]] = {}
        #: The same exact subscriptions grouped by wire variant: the hot path writes each group one frame, with no
        #: per-subscriber lookup of which frame it needs.
        self._by_wire: dict[str, dict[Wire, set[Subscriber]]] = {}
        self._patterns: PatternIndex[Subscriber] = PatternIndex()
        self._connections: dict[str, Subscriber] = {}
        self._users: dict[str, set[Subscriber]] = {}
        self._user_of: dict[Subscriber, str] = {}
        #: topic -> connection -> live messages held while that connection's recovery reads history.
        self._holds: dict[str, dict[Subscriber, list[Held]]] = {}
        #: topic -> the position of its last message with history, for the topics subscribed to here.
        self._positions: dict[str, Position] = {}
        #: Gaps found in topics' numbers: messages this node never received.
        self.gaps = 0
        #: topic -> live messages (payload, position) kept while the node catches the topic up from history after
        #: an outage (None once more than CATCH_UP_HOLD came: the topic is then told lost).
        self._paused: dict[str, list[tuple[bytes, Position | None]] | None] = {}
        #: The offset of the last message with history that reached the node, whatever its topic: where a
        #: catch-up starts for a topic that has had nothing yet.
        self.last_offset: str | None = None
        #: Subscriptions told that messages may be lost, by why.
        self.told_lost: Counter[str] = Counter()
        self._batch: list[Publication] | None = None
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
        if conn.conn_id not in self._connections or self._user_of.get(conn) == user:
            return
        self._forget_user(conn)
        self._user_of[conn] = user
        self._users.setdefault(user, set()).add(conn)
        self.observer.identified(conn.conn_id, user)

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
        self._by_wire.setdefault(topic, {}).setdefault(conn.wire, set()).add(conn)

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
            groups = self._by_wire[topic]
            group = groups.get(conn.wire)
            if group is not None:
                group.discard(conn)
                if not group:
                    del groups[conn.wire]
            if not subscribers:
                del self._topics[topic]
                del self._by_wire[topic]
                self._positions.pop(topic, None)

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
        if self._paused and topic in self._paused:
            self._keep_paused(topic, payload, position)
            return 0
        if position is not None:
            self.last_offset = position.offset
            if position.seq and topic in self._topics:
                last = self._positions.get(topic)
                self._positions[topic] = position
                if last is not None and (position.seq > last.seq + 1 or position.epoch != last.epoch):
                    self._lost(topic, "messages were lost between Redis and this node")
        subscribers = self._recipients(topic)
        holders = self._holds.get(topic) if self._holds else None
        if not subscribers and not holders:
            return 0
        publication = Publication(topic, payload, position)
        if holders:
            for conn, held in holders.items():
                held.append((position, publication.frame(conn.wire)))
        if not subscribers:
            return 0
        if self._batch is not None:
            self._batch.append(publication)
            return len(subscribers)
        self._write_groups(topic, subscribers, publication.frame, 1)
        return len(subscribers)

    def _lost(self, topic: str, reason: str) -> None:
        """Messages of `topic` never reached this node: tell its subscribers (those that track positions leave
        the topic, to subscribe again and recover what they missed from history)."""
        self.gaps += 1
        self.tell_lost(topic, reason)

    def tell_lost(self, subscription: str, reason: str) -> None:
        """Tell every local subscriber of `subscription` (a topic or a pattern) that messages may be lost."""
        if is_pattern(subscription):
            subscribers = tuple(self._patterns.subscribers(subscription))
        else:
            subscribers = tuple(self._topics.get(subscription, ()))
        self.told_lost[reason] += len(subscribers)
        for conn in subscribers:
            conn.lost(subscription, reason)

    # -- catching up after an outage ------------------------------------------------------------------------

    def pause(self, topics: Iterable[str]) -> None:
        """Keep the live messages of `topics` instead of delivering them, until `catch_up` has given each topic
        what it missed: the history read and the live stream then meet without a gap or a repeat."""
        for topic in topics:
            self._paused.setdefault(topic, [])

    def _keep_paused(self, topic: str, payload: bytes, position: Position | None) -> None:
        kept = self._paused[topic]
        if kept is not None:
            kept.append((payload, position))
            if len(kept) > CATCH_UP_HOLD:
                self._paused[topic] = None

    def catch_up(self, topic: str, missed: Iterable[tuple[Position, bytes]], lost: str | None = None) -> int:
        """Deliver what `topic` missed (from its history, in order), then the live messages kept since `pause`
        that come after it; `lost` (why) tells its subscribers that messages may be lost all the same.

        Returns how many messages were delivered from history.
        """
        kept = self._paused.pop(topic, [])
        if kept is None:
            kept, lost = [], lost or f"more than {CATCH_UP_HOLD} messages arrived while catching up"
        replayed = 0
        seen = self._positions.get(topic)
        self.begin_batch()
        try:
            for placed, payload in missed:
                lost = self._new_epoch(topic, seen, placed, lost)
                self.publish(topic, payload, placed)
                seen = placed
                replayed += 1
            for payload, position in kept:
                if position is None or seen is None or _after(position, seen):
                    if position is not None:
                        lost = self._new_epoch(topic, seen, position, lost)
                        seen = position
                    self.publish(topic, payload, position)
        finally:
            self.flush()
        if lost is not None:
            # Its subscribers are told; the next message starts the topic's numbers afresh, whatever they are.
            self._positions.pop(topic, None)
            self.tell_lost(topic, lost)
        return replayed

    def _new_epoch(self, topic: str, seen: Position | None, position: Position, lost: str | None) -> str | None:
        """A catch-up meets a new life of the topic's history: its numbers start again, which is no gap, but what
        the old one held may be gone, so the subscribers are told (once, at the end of the catch-up)."""
        if seen is None or position.epoch == seen.epoch:
            return lost
        self._positions.pop(topic, None)
        return lost or "history epoch changed (Redis lost it)"

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
        first_topic = batch[0].topic
        if all(publication.topic == first_topic for publication in batch):
            subscribers = self._recipients(first_topic)
            if subscribers:
                self._write_groups(first_topic, subscribers,
                                   lambda wire: b"".join(publication.frame(wire) for publication in batch), len(batch))
            return
        pending: dict[Subscriber, list[bytes]] = {}
        for publication in batch:
            for conn in self._recipients(publication.topic) or ():
                frame = publication.frame(conn.wire)
                frames = pending.get(conn)
                if frames is None:
                    pending[conn] = [frame]
                else:
                    frames.append(frame)
        for conn, frames in pending.items():
            if conn.write(b"".join(frames)):
                self.delivered += len(frames)

    def _write_groups(self, topic: str, subscribers: set[Subscriber], frame_for: Callable[[Wire], bytes],
                      messages: int) -> None:
        """Write each subscriber the frame of its wire: per wire group when `subscribers` are the topic's exact
        subscribers (the common case), else (patterns matched too) looking each one's wire up."""
        if subscribers is self._topics.get(topic):
            for wire, group in tuple(self._by_wire[topic].items()):
                self._write_each(tuple(group), frame_for(wire), messages)
            return
        frames: dict[Wire, bytes] = {}
        written = 0
        for conn in tuple(subscribers):
            wire = conn.wire
            frame = frames.get(wire)
            if frame is None:
                frame = frames[wire] = frame_for(wire)
            if conn.write(frame):
                written += 1
        self.delivered += written * messages

    def _write_each(self, subscribers: tuple[Subscriber, ...], data: bytes, messages: int) -> None:
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

    def topics(self) -> tuple[str, ...]:
        """The topics subscribed to here by name (not by pattern), live or still held by a recovery."""
        return tuple(dict.fromkeys((*self._topics, *self._holds)))

    def patterns(self) -> tuple[str, ...]:
        return tuple(self._patterns.patterns())

    def position(self, topic: str) -> Position | None:
        """Where the last message of `topic` with history that reached its subscribers here stands."""
        return self._positions.get(topic)

    def snapshot(self) -> Iterator[tuple[str, tuple[str, ...], str | None]]:
        """(connection id, its topics, its user) for every local connection: what Redis must hold for this node."""
        for conn_id, conn in tuple(self._connections.items()):
            yield conn_id, tuple(conn.topics), self._user_of.get(conn)


def _after(position: Position, seen: Position) -> bool:
    """True if `position` comes after `seen` in the topic's history (a later epoch counts as after)."""
    if position.epoch != seen.epoch:
        return True
    if position.seq and seen.seq:
        return position.seq > seen.seq
    return offset_key(position.offset) > offset_key(seen.offset)
