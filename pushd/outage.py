"""Getting a node's subscribers through a Redis outage: nothing acknowledged is lost without the client being told.

While the PSUBSCRIBE listener is down the node hears nothing, so the API refuses to acknowledge (503) what it
could not deliver. When the listener is back, every topic subscribed here is caught up before its live messages
resume: a topic with history gets what it missed from its stream (from the last position delivered here),
joined with the live messages kept meanwhile (`Hub.pause` / `Hub.catch_up`); a topic without history cannot
be caught up, so its subscribers are told (`Lost`) and can refetch. docs/redis-state.md explains the choices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.internet import defer, task
from twisted.logger import Logger

from pushd.hub import Hub
from pushd.recovery import Position, offset_key
from pushd.redis.history import Missed

#: Topics read from history in one script call while catching up.
CHUNK = 50
#: A topic that has had nothing here yet is caught up from this long before the outage began (by this node's
#: clock, as Redis' clock was out of reach): covers a skew between the two clocks of up to that much.
CLOCK_MARGIN = 1.0
#: Attempts at reading a chunk of topics before their subscribers are told the messages are lost.
ATTEMPTS = 3
RETRY_DELAY = 1.0

NO_HISTORY = "messages published while this node could not hear Redis are lost (the topic keeps no history)"
PATTERN = "messages published while this node could not hear Redis are lost (patterns are not caught up)"
UNREADABLE = "history could not be read after the Redis outage"


class MissedReader(Protocol):
    """The history reads a catch-up makes (`pushd.redis.history.History`)."""

    def keeps_history(self, topic: str) -> bool: ...

    def missed(self, topics: Sequence[tuple[str, Position | None, str]]) -> defer.Deferred[list[Missed]]: ...


class OutageRecovery:
    """Knows whether the node can deliver what it acknowledges, and catches its topics up after an outage."""

    log = Logger()

    def __init__(self, clock: Any, hub: Hub, history: MissedReader, *, commands_connected: Callable[[], bool],
                 chunk: int = CHUNK) -> None:
        self._clock = clock
        self._hub = hub
        self._history = history
        self._commands_connected = commands_connected
        self._chunk = chunk
        self.listening = False
        #: Bumped at every outage, so a catch-up that an outage interrupted stops where it is.
        self._generation = 0
        self._down_since: float | None = None
        self.outages = 0
        self.outage_seconds = 0.0
        self.caught_up_topics = 0
        self.caught_up_messages = 0
        self.catching_up = 0

    def unavailable(self) -> str | None:
        """Why the node cannot deliver what it would acknowledge now; None when it can."""
        if not self.listening:
            return "this node is not receiving from Redis (reconnecting)"
        if not self._commands_connected():
            return "this node is not connected to Redis (reconnecting)"
        return None

    def started(self) -> None:
        """The listener's first subscription: the node is live."""
        self.listening = True

    def listener_lost(self) -> None:
        if not self.listening:
            return
        self.listening = False
        self._generation += 1
        self._down_since = self._clock.seconds()
        self.outages += 1
        self.log.warn("Redis outage: this node hears no messages; the API answers 503 until it does, then "
                      "catches its topics up from history")

    def listener_back(self) -> defer.Deferred[None]:
        """The listener subscribed again: catch every topic subscribed here up, then report the outage."""
        if self.listening or self._down_since is None:
            self.listening = True
            return defer.succeed(None)
        self.listening = True
        down_since, self._down_since = self._down_since, None
        self.outage_seconds += self._clock.seconds() - down_since
        floor = self._floor(down_since)
        hub = self._hub
        with_history, told = [], 0
        for topic in hub.topics():
            if self._history.keeps_history(topic):
                with_history.append(topic)
            else:
                hub.tell_lost(topic, NO_HISTORY)
                told += 1
        for pattern in hub.patterns():
            hub.tell_lost(pattern, PATTERN)
            told += 1
        # Paused at once, in the turn the subscription was confirmed: no live message can overtake the catch-up.
        hub.pause(with_history)
        d = self._catch_up(with_history, floor, self._generation)
        d.addCallback(self._report, self._clock.seconds() - down_since, len(with_history), told)
        return d

    def _floor(self, down_since: float) -> str:
        """Where a topic that has had nothing here yet starts: after the last message any topic had, or a moment
        before the outage, whichever is later."""
        moment = (max(0, int((down_since - CLOCK_MARGIN) * 1000)), 0)
        last = self._hub.last_offset
        if last is not None and offset_key(last) >= moment:
            return "(" + last
        return f"{moment[0]}-0"

    @defer.inlineCallbacks
    def _catch_up(self, topics: list[str], floor: str, generation: int) -> Any:
        hub = self._hub
        self.catching_up = len(topics)
        messages = 0
        for start in range(0, len(topics), self._chunk):
            chunk = topics[start:start + self._chunk]
            reads = [(topic, hub.position(topic), floor) for topic in chunk]
            missed: list[Missed] | None = None
            for attempt in range(ATTEMPTS):
                if generation != self._generation:
                    return messages  # another outage began: its catch-up starts over from the positions
                try:
                    missed = yield self._history.missed(reads)
                    break
                except Exception as e:
                    self.log.warn("catch-up read of {count} topics failed ({error}); attempt {attempt} of "
                                  "{attempts}", count=len(chunk), error=e, attempt=attempt + 1, attempts=ATTEMPTS)
                    if attempt + 1 < ATTEMPTS:
                        yield task.deferLater(self._clock, RETRY_DELAY)
            if generation != self._generation:
                return messages
            for i, topic in enumerate(chunk):
                if missed is None:
                    hub.catch_up(topic, (), UNREADABLE)
                else:
                    messages += hub.catch_up(topic, missed[i].entries, missed[i].lost)
            self.catching_up -= len(chunk)
        self.caught_up_topics += len(topics)
        self.caught_up_messages += messages
        return messages

    def _report(self, messages: int | None, seconds: float, topics: int, told: int) -> None:
        self.log.info("Redis outage over after {seconds:.1f} s: caught up {topics} topics with history "
                      "({messages} messages from history), told the subscribers of {told} others that messages "
                      "may be lost", seconds=seconds, topics=topics, messages=messages or 0, told=told)

    def info(self) -> dict[str, Any]:
        return {"outages": self.outages, "outage_seconds": round(self.outage_seconds, 3),
                "listening": self.listening, "caught_up_topics": self.caught_up_topics,
                "caught_up_messages": self.caught_up_messages}

