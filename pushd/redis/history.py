"""Per-topic message history in Redis Streams: publish with an offset, replay what a client missed, the last message.

A message with history is appended to its topic's stream and published in the same Lua script, so a live
message always carries its offset and the stream never misses a message that was delivered. The epoch names
one life of a topic's history: when Redis loses it, a new epoch tells clients their offsets mean nothing any
more. The seam between replay and live delivery is `pushd.recovery.stitch`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from pushd.recovery import MAX_PART, Position, is_offset, offset_key
from pushd.redis.client import reply_text

MAX_SIZE = 100_000
MAX_TTL = 30 * 24 * 3600

#: Append messages to their topics' histories and publish them, atomically.
#:
#: One message: KEYS stream, epoch key; ARGV channel, payload, maxlen (entries kept), ttl (seconds; 0 = no
#: expiry). Several: 2 keys and 4 arguments per message, in order. Returns {offset, epoch} per message, flat;
#: the channel gets b"<offset> <epoch>\n" + payload (`parse_envelope`).
#: Publishers that talk to Redis directly use it the same way (pushd's default key prefix "pushd:"):
#:   EVAL "<PUBLISH_SCRIPT>" 2 pushd:history:TOPIC pushd:epoch:TOPIC pushd:pub:TOPIC PAYLOAD 1000 3600
#: TIME before a write needs script effects replication: the default from Redis 5, asked for anyway in case
#: `lua-replicate-commands no` is set (a no-op from Redis 7). tests/integration/test_history_scripts.py checks.
PUBLISH_SCRIPT = """
redis.replicate_commands()
local result = {}
for i = 1, #KEYS, 2 do
  local a = (i - 1) * 2
  local stream, epoch_key, payload = KEYS[i], KEYS[i + 1], ARGV[a + 2]
  local epoch = redis.call('GET', epoch_key)
  if not epoch then
    local now = redis.call('TIME')
    epoch = now[1] .. string.format('%06d', tonumber(now[2]))
    redis.call('SET', epoch_key, epoch)
  end
  local offset = redis.call('XADD', stream, 'MAXLEN', '=', ARGV[a + 3], '*', 'd', payload)
  local ttl = tonumber(ARGV[a + 4])
  if ttl > 0 then
    redis.call('EXPIRE', stream, ttl)
    redis.call('EXPIRE', epoch_key, ttl)
  end
  redis.call('PUBLISH', ARGV[a + 1], offset .. ' ' .. epoch .. '\\n' .. payload)
  result[#result + 1] = offset
  result[#result + 1] = epoch
end
return result
"""

#: Messages one EVAL of PUBLISH_SCRIPT carries for a batch publish: one round trip and one Deferred for many,
#: while no single script call keeps Redis busy for long.
PUBLISH_BATCH = 100

#: KEYS: stream, epoch key. ARGV: first offset (inclusive), count. Returns {epoch or nil, entries}.
RECOVER_SCRIPT = """
return {redis.call('GET', KEYS[2]), redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])}
"""

#: KEYS: stream, epoch key. Returns {epoch or nil, the newest entry or none}.
LATEST_SCRIPT = """
return {redis.call('GET', KEYS[2]), redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)}
"""


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    """How much history a topic keeps: `size` newest messages for `ttl` seconds after the last publish."""

    size: int
    ttl: int


def _whole(rule: str, name: str, text: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{rule!r}: {name} {text!r} is not a whole number")
    return int(text)


def _policy(where: str, size: int, ttl: int) -> HistoryPolicy:
    if not 0 <= size <= MAX_SIZE:
        raise ValueError(f"{where}: size {size} is out of range (0..{MAX_SIZE}, 0 = no history)")
    if size == 0 and ttl == 0:
        return HistoryPolicy(0, 0)
    if not 1 <= ttl <= MAX_TTL:
        raise ValueError(f"{where}: ttl {ttl} is out of range (1..{MAX_TTL} seconds; 0 only with size 0)")
    return HistoryPolicy(size, ttl)


class HistoryPolicies:
    """Which policy applies to a topic: the first rule whose pattern matches wins, else the default."""

    def __init__(self, default: HistoryPolicy, rules: Sequence[tuple[str, HistoryPolicy]] = ()) -> None:
        self.default = default
        self.rules = tuple(rules)
        self._compiled = tuple((re.compile(fnmatch.translate(pattern)), policy) for pattern, policy in self.rules)

    @classmethod
    def parse(cls, default_size: int, default_ttl: int, rules_text: str) -> HistoryPolicies:
        """Rules one per line (or separated by ';'), each "PATTERN=SIZE/TTL" with an fnmatch pattern.

        ValueError with a one-line message naming the bad rule.
        """
        default = _policy(f"default history {default_size}/{default_ttl}", default_size, default_ttl)
        rules: list[tuple[str, HistoryPolicy]] = []
        for line in rules_text.splitlines():
            for part in line.split(";"):
                rule = part.strip()
                if not rule:
                    continue
                pattern, equals, limits = rule.rpartition("=")
                size_text, slash, ttl_text = limits.partition("/")
                if not equals or not slash:
                    raise ValueError(f"{rule!r}: expected PATTERN=SIZE/TTL, e.g. 'orders.*=1000/3600'")
                if not pattern.strip():
                    raise ValueError(f"{rule!r}: the topic pattern is empty")
                size = _whole(rule, "size", size_text)
                ttl = _whole(rule, "ttl", ttl_text)
                rules.append((pattern.strip(), _policy(repr(rule), size, ttl)))
        return cls(default, rules)

    def for_topic(self, topic: str) -> HistoryPolicy:
        for pattern, policy in self._compiled:
            if pattern.match(topic):
                return policy
        return self.default

    def __repr__(self) -> str:
        return f"HistoryPolicies({self.default!r}, {list(self.rules)!r})"


class HistoryKeys:
    """The Redis keys and channel of a topic's history (docs/redis-state.md)."""

    def __init__(self, key_prefix: str) -> None:
        self.prefix = key_prefix

    def stream(self, topic: str) -> str:
        return f"{self.prefix}history:{topic}"

    def epoch(self, topic: str) -> str:
        return f"{self.prefix}epoch:{topic}"

    def channel(self, topic: str) -> str:
        """The channel PUBLISH_SCRIPT publishes the envelope on."""
        return f"{self.prefix}pub:{topic}"


def encode_envelope(offset: str, epoch: str, payload: bytes) -> bytes:
    """What PUBLISH_SCRIPT publishes: b"<offset> <epoch>\\n" + payload."""
    return f"{offset} {epoch}\n".encode() + payload


_ENVELOPE_HEADER = re.compile(rb"([0-9]{1,20})-([0-9]{1,20}) ([!-~]+)")


def parse_envelope(message: bytes) -> tuple[str, str, bytes] | None:
    """(offset, epoch, payload) of a published envelope, or None when it is not one."""
    end = message.find(b"\n")
    if end < 0:
        return None
    header = _ENVELOPE_HEADER.fullmatch(message, 0, end)
    if header is None:
        return None
    ms, seq = header[1], header[2]
    # Only a 20-digit part can exceed 2**64 - 1: the common case costs no int().
    if (len(ms) == 20 and int(ms) > MAX_PART) or (len(seq) == 20 and int(seq) > MAX_PART):
        return None
    return (message[:header.end(2)].decode("ascii"), header[3].decode("ascii"), message[end + 1:])


@dataclass(frozen=True, slots=True)
class Replay:
    """What a client missed: (offset, payload) strictly after its position, in stream order."""

    epoch: str
    entries: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class RecoveryFailed:
    """History cannot fill the gap; `reason` is one line for the client."""

    reason: str


def _bytes(value: Any) -> bytes:
    """A reply element as bytes: a decoding link turns UTF-8 payloads into str, losslessly."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


def _entry(entry: Any) -> tuple[str, bytes]:
    """(offset, payload) of a stream entry [id, [field, value, ...]]; the payload is field 'd'."""
    entry_id, fields = entry
    fields = list(fields or ())
    for i in range(0, len(fields) - 1, 2):
        if reply_text(fields[i]) == "d":
            return reply_text(entry_id), _bytes(fields[i + 1])
    return reply_text(entry_id), b""


def _epoch(value: Any) -> str | None:
    return None if value is None else reply_text(value)


class History:
    """Publishes messages into their topics' history and reads it back for recovering and new subscribers.

    `link` runs commands like `pushd.redis.client.RedisLink.call`. Reads of the same thing that are in flight
    at the same time share one Redis call (a reconnect storm asks for the same offsets many times over).
    """

    def __init__(self, link: Any, keys: HistoryKeys, policies: HistoryPolicies, *, channel_prefix: str,
                 replay_limit: int = 300) -> None:
        self._link = link
        self.keys = keys
        self.policies = policies
        self.channel_prefix = channel_prefix
        self.replay_limit = replay_limit
        self._recovering: dict[tuple[str, str], list[tuple[defer.Deferred[Replay | RecoveryFailed], str]]] = {}
        self._latest: dict[str, list[defer.Deferred[tuple[Position, bytes] | None]]] = {}
        self.reads = 0
        self.merged_reads = 0

    # -- publishing ---------------------------------------------------------------------------------------

    def publish(self, messages: Sequence[tuple[str, bytes]]) -> defer.Deferred[list[Position | None]]:
        """Publish (topic, payload) pairs; fires with each one's position (None: its topic keeps no history).

        Every command is sent before any answer is awaited; the first failure fails the whole call.
        """
        calls: list[defer.Deferred[list[Position | None]]] = []
        run: list[tuple[str, bytes, HistoryPolicy]] = []
        for topic, payload in messages:
            policy = self.policies.for_topic(topic)
            if policy.size:
                run.append((topic, payload, policy))
                if len(run) == PUBLISH_BATCH:
                    calls.append(self._publish_with_history(run))
                    run = []
                continue
            if run:
                calls.append(self._publish_with_history(run))
                run = []
            d = self._link.call("publish", self.channel_prefix + topic, payload)
            calls.append(d.addCallback(lambda _: [None]))
        if run:
            calls.append(self._publish_with_history(run))
        gathered: defer.Deferred[list[list[Position | None]]] = defer.gatherResults(calls, consumeErrors=True)
        return gathered.addCallbacks(lambda parts: [p for part in parts for p in part], _first_error)

    def _publish_with_history(self, run: list[tuple[str, bytes, HistoryPolicy]]) -> defer.Deferred[
            list[Position | None]]:
        """One EVAL of PUBLISH_SCRIPT for up to PUBLISH_BATCH messages."""
        keys: list[str] = []
        args: list[Any] = []
        for topic, payload, policy in run:
            keys += [self.keys.stream(topic), self.keys.epoch(topic)]
            args += [self.keys.channel(topic), payload, str(policy.size), str(policy.ttl)]
        d: defer.Deferred[list[Position | None]] = self._link.call("eval", PUBLISH_SCRIPT, keys, args)
        return d.addCallback(lambda reply: [Position(reply_text(reply[i]), reply_text(reply[i + 1]))
                                            for i in range(0, len(reply), 2)])

    # -- reading ------------------------------------------------------------------------------------------

    def recover(self, topic: str, since: Position) -> defer.Deferred[Replay | RecoveryFailed]:
        """What `topic` published after `since`, or why history cannot say."""
        if self.policies.for_topic(topic).size == 0:
            return defer.succeed(RecoveryFailed(f"topic {topic!r} keeps no history"))
        if not is_offset(since.offset):
            return defer.succeed(RecoveryFailed(f"{since.offset!r} is not a stream offset"))
        waiter: defer.Deferred[Replay | RecoveryFailed] = defer.Deferred()
        key = (topic, since.offset)
        waiters = self._recovering.get(key)
        if waiters is not None:
            self.merged_reads += 1
            waiters.append((waiter, since.epoch))
            return waiter
        self._recovering[key] = [(waiter, since.epoch)]
        self.reads += 1
        # Inclusive start: finding `since` itself proves the history still reaches back that far.
        d = self._link.call("eval", RECOVER_SCRIPT, [self.keys.stream(topic), self.keys.epoch(topic)],
                            [since.offset, str(self.replay_limit + 2)])
        d.addBoth(self._recovered, key)
        return waiter

    def _recovered(self, reply: Any, key: tuple[str, str]) -> None:
        waiters = self._recovering.pop(key)
        for waiter, epoch in waiters:
            if isinstance(reply, Failure):
                waiter.errback(reply)
            else:
                try:
                    verdict = self._judge(key[1], epoch, reply)
                except Exception:
                    waiter.errback()
                else:
                    waiter.callback(verdict)

    def _judge(self, since: str, epoch: str, reply: Any) -> Replay | RecoveryFailed:
        current, raw_entries = reply
        current = _epoch(current)
        if current is None:
            return RecoveryFailed(f"history no longer reaches back to {since} (expired or lost)")
        if current != epoch:
            return RecoveryFailed("history epoch changed (Redis lost it)")
        entries = [_entry(entry) for entry in raw_entries or ()]
        if not entries or offset_key(entries[0][0]) != offset_key(since):
            return RecoveryFailed(f"history no longer reaches back to {since}")
        missed = entries[1:]
        if len(missed) > self.replay_limit:
            return RecoveryFailed(f"more than {self.replay_limit} messages missed")
        return Replay(current, tuple(missed))

    def latest(self, topic: str) -> defer.Deferred[tuple[Position, bytes] | None]:
        """The newest message of `topic` with its position, or None when its history is empty."""
        if self.policies.for_topic(topic).size == 0:
            return defer.succeed(None)
        waiter: defer.Deferred[tuple[Position, bytes] | None] = defer.Deferred()
        waiters = self._latest.get(topic)
        if waiters is not None:
            self.merged_reads += 1
            waiters.append(waiter)
            return waiter
        self._latest[topic] = [waiter]
        self.reads += 1
        d = self._link.call("eval", LATEST_SCRIPT, [self.keys.stream(topic), self.keys.epoch(topic)], [])
        d.addBoth(self._got_latest, topic)
        return waiter

    def _got_latest(self, reply: Any, topic: str) -> None:
        waiters = self._latest.pop(topic)
        result: Any = reply
        if not isinstance(reply, Failure):
            try:
                result = _newest(reply)
            except Exception:
                result = Failure()
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


def _newest(reply: Any) -> tuple[Position, bytes] | None:
    current, raw_entries = reply
    current = _epoch(current)
    if current is None or not raw_entries:
        return None
    offset, payload = _entry(raw_entries[0])
    return Position(offset, current), payload


def _first_error(failure: Failure) -> Failure:
    """gatherResults wraps the failure in FirstError; callers want the Redis error itself."""
    error = failure.value
    if isinstance(error, defer.FirstError):
        sub: Failure = error.subFailure
        return sub
    return failure
