"""Per-topic message history in Redis Streams: publish with a position, replay what a client missed, the last message.

A message with history is appended to its topic's stream and published in the same Lua script, so a live
message always carries its position and the stream never misses a message that was delivered. A position is
the stream entry id (pushd's own protocol calls it the offset), the epoch, and the message's number in that
epoch (1, 2, 3, ...: Centrifugo's protocol calls that the offset). The epoch names one life of a topic's
history: when Redis loses it, a new epoch tells clients their positions mean nothing any more. The epoch and
the last number live together in one hash, so numbers never repeat within an epoch, even when the stream
itself is evicted or trimmed. The seam between replay and live delivery is `pushd.recovery.stitch`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from pushd.recovery import MAX_PART, OffsetSince, Position, SeqSince, Since, is_offset, offset_key
from pushd.redis.client import reply_text

MAX_SIZE = 100_000
MAX_TTL = 30 * 24 * 3600

#: Append messages to their topics' histories and publish them, atomically.
#:
#: One message: KEYS stream, meta hash; ARGV channel, payload, maxlen (entries kept), ttl (seconds; 0 = no
#: expiry). Several: 2 keys and 4 arguments per message, in order. Returns {offset, epoch, seq} per message,
#: flat; the channel gets b"<offset> <epoch> <seq>\n" + payload (`parse_envelope`).
#: Publishers that talk to Redis directly use it the same way (pushd's default key prefix "pushd:"):
#:   EVAL "<PUBLISH_SCRIPT>" 2 pushd:history:TOPIC pushd:meta:TOPIC pushd:pub:TOPIC PAYLOAD 1000 3600
#: TIME before a write needs script effects replication: the default from Redis 5, asked for anyway in case
#: `lua-replicate-commands no` is set (a no-op from Redis 7). tests/integration/test_history_scripts.py checks.
PUBLISH_SCRIPT = """
redis.replicate_commands()
local result = {}
for i = 1, #KEYS, 2 do
  local a = (i - 1) * 2
  local stream, meta, payload = KEYS[i], KEYS[i + 1], ARGV[a + 2]
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    local now = redis.call('TIME')
    epoch = now[1] .. string.format('%06d', tonumber(now[2]))
    redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
  end
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  local offset = redis.call('XADD', stream, 'MAXLEN', '=', ARGV[a + 3], '*', 'd', payload, 'n', seq)
  local ttl = tonumber(ARGV[a + 4])
  if ttl > 0 then
    redis.call('EXPIRE', stream, ttl)
    redis.call('EXPIRE', meta, ttl)
  end
  redis.call('PUBLISH', ARGV[a + 1], offset .. ' ' .. epoch .. ' ' .. seq .. '\\n' .. payload)
  result[#result + 1] = offset
  result[#result + 1] = epoch
  result[#result + 1] = seq
end
return result
"""

#: Messages one EVAL of PUBLISH_SCRIPT carries for a batch publish: one round trip and one Deferred for many,
#: while no single script call keeps Redis busy for long.
PUBLISH_BATCH = 100

#: Recovery by stream offset. KEYS: stream, meta. ARGV: first offset (inclusive), count.
#: Returns {epoch or nil, entries}.
RECOVER_SCRIPT = """
return {redis.call('HGET', KEYS[2], 'epoch'), redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])}
"""

#: Recovery by message number. KEYS: stream, meta. ARGV: the client's last number, the most to replay, the
#: history's ttl. Returns {epoch, the last number, the entries after the client's number newest first (none
#: when nothing or too much was missed)}. A topic without an epoch gets one (number 0), so a client that
#: cannot recover is told a position it can recover from next time.
RECOVER_SEQ_SCRIPT = """
redis.replicate_commands()
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  local now = redis.call('TIME')
  epoch = now[1] .. string.format('%06d', tonumber(now[2]))
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'seq', 0)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
end
local top = tonumber(redis.call('HGET', KEYS[2], 'seq'))
local missed = top - tonumber(ARGV[1])
if missed <= 0 or missed > tonumber(ARGV[2]) then
  return {epoch, top, {}}
end
return {epoch, top, redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', missed)}
"""

#: Where a topic's history stands. KEYS: stream, meta. ARGV: ttl; when above 0 and the topic has no epoch yet,
#: one is made (number 0, expiring after ttl), so a subscriber told this position can recover from it later.
#: Returns {epoch or nil, the last number, the newest entry or none}.
TOP_SCRIPT = """
redis.replicate_commands()
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  local ttl = tonumber(ARGV[1])
  if ttl <= 0 then
    return {false, 0, {}}
  end
  local now = redis.call('TIME')
  epoch = now[1] .. string.format('%06d', tonumber(now[2]))
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'seq', 0)
  redis.call('EXPIRE', KEYS[2], ttl)
end
local seq = tonumber(redis.call('HGET', KEYS[2], 'seq'))
return {epoch, seq, redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)}
"""

#: A page of history for a client's read. KEYS: stream, meta. ARGV: limit (0: only the position), "1" for the
#: newest first, the number to read after (before, newest first) or -1 for the start (the end).
#: Returns {epoch or nil, the last number, entries in the order asked}.
PAGE_SCRIPT = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  return {false, 0, {}}
end
local top = tonumber(redis.call('HGET', KEYS[2], 'seq'))
local limit, reverse, since = tonumber(ARGV[1]), ARGV[2] == '1', tonumber(ARGV[3])
if limit <= 0 then
  return {epoch, top, {}}
end
if since < 0 then
  if reverse then
    return {epoch, top, redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', limit)}
  end
  return {epoch, top, redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', limit)}
end
if reverse then
  local skip = math.max(0, top - since + 1)
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', skip + limit)
  local page = {}
  for i = skip + 1, #newest do page[#page + 1] = newest[i] end
  return {epoch, top, page}
end
if top - since <= 0 then
  return {epoch, top, {}}
end
local after = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', top - since)
local page = {}
for i = #after, math.max(1, #after - limit + 1), -1 do page[#page + 1] = after[i] end
return {epoch, top, page}
"""


#: What topics missed while the node could not hear Redis. KEYS: stream, meta per topic. ARGV: the most entries
#: per topic, then per topic the XRANGE start ("(<offset>" after the node's last message, "<ms>-0" from a
#: moment) and the epoch that start belongs to ("" for none): from another epoch the whole stream is read.
#: Returns per topic {epoch or nil, the last number, entries}.
CATCH_UP_SCRIPT = """
local result = {}
local count = tonumber(ARGV[1])
for i = 1, #KEYS, 2 do
  local start, known = ARGV[i + 1], ARGV[i + 2]
  local epoch = redis.call('HGET', KEYS[i + 1], 'epoch')
  local entries = {}
  if epoch then
    if known ~= '' and known ~= epoch then start = '-' end
    entries = redis.call('XRANGE', KEYS[i], start, '+', 'COUNT', count)
  end
  result[#result + 1] = {epoch, tonumber(redis.call('HGET', KEYS[i + 1], 'seq') or '0'), entries}
end
return result
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

    def meta(self, topic: str) -> str:
        """The hash of the history's epoch and its last message number."""
        return f"{self.prefix}meta:{topic}"

    def channel(self, topic: str) -> str:
        """The channel PUBLISH_SCRIPT publishes the envelope on."""
        return f"{self.prefix}pub:{topic}"


def encode_envelope(position: Position, payload: bytes) -> bytes:
    """What PUBLISH_SCRIPT publishes: b"<offset> <epoch> <seq>\\n" + payload."""
    return f"{position.offset} {position.epoch} {position.seq}\n".encode() + payload


_ENVELOPE_HEADER = re.compile(rb"([0-9]{1,20})-([0-9]{1,20}) ([!-~]+?)(?: ([0-9]{1,19}))?")


def parse_envelope(message: bytes) -> tuple[Position, bytes] | None:
    """(position, payload) of a published envelope, or None when it is not one.

    The number is optional, so envelopes of publishers that do not number messages still arrive (number 0).
    """
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
    number = header[4]
    position = Position(message[:header.end(2)].decode("ascii"), header[3].decode("ascii"),
                        int(number) if number else 0)
    return position, message[end + 1:]


@dataclass(frozen=True, slots=True)
class Replay:
    """What a client missed: (position, payload) strictly after its own, in stream order."""

    epoch: str
    entries: tuple[tuple[Position, bytes], ...]
    #: The number of the newest message when history was read (0 when unknown).
    top: int = 0


@dataclass(frozen=True, slots=True)
class Missed:
    """What a topic published that the node did not hear (in stream order), and why its subscribers must be told
    that messages may be lost all the same (None: nothing was lost)."""

    entries: tuple[tuple[Position, bytes], ...]
    lost: str | None = None


@dataclass(frozen=True, slots=True)
class RecoveryFailed:
    """History cannot fill the gap; `reason` is one line for the client. `top`: where history stands now."""

    reason: str
    top: StreamTop | None = None


@dataclass(frozen=True, slots=True)
class StreamTop:
    """Where a topic's history stands: its epoch and the number of its newest message (0: none yet)."""

    epoch: str
    seq: int
    #: The newest entry's stream id, "0-0" when the stream is empty.
    offset: str = "0-0"


def _bytes(value: Any) -> bytes:
    """A reply element as bytes: a decoding link turns UTF-8 payloads into str, losslessly."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


def _entry(entry: Any, epoch: str) -> tuple[Position, bytes]:
    """(position, payload) of a stream entry [id, [field, value, ...]]: the payload is field 'd', its number 'n'."""
    entry_id, fields = entry
    fields = list(fields or ())
    payload, seq = b"", 0
    for i in range(0, len(fields) - 1, 2):
        name = reply_text(fields[i])
        if name == "d":
            payload = _bytes(fields[i + 1])
        elif name == "n":
            seq = int(reply_text(fields[i + 1]))
    return Position(reply_text(entry_id), epoch, seq), payload


def _epoch(value: Any) -> str | None:
    return None if value is None else reply_text(value)


class History:
    """Publishes messages into their topics' history and reads it back for recovering and new subscribers.

    `link` runs commands like `pushd.redis.client.RedisLink.call`. Reads of the same thing that are in flight
    at the same time share one Redis call (a reconnect storm asks for the same positions many times over).
    """

    def __init__(self, link: Any, keys: HistoryKeys, policies: HistoryPolicies, *, channel_prefix: str,
                 replay_limit: int = 300) -> None:
        self._link = link
        self.keys = keys
        self.policies = policies
        self.channel_prefix = channel_prefix
        self.replay_limit = replay_limit
        self._reads: dict[tuple[Any, ...], list[tuple[defer.Deferred[Any], Since | None]]] = {}
        self.reads = 0
        self.merged_reads = 0

    def keeps_history(self, topic: str) -> bool:
        return self.policies.for_topic(topic).size > 0

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
            keys += [self.keys.stream(topic), self.keys.meta(topic)]
            args += [self.keys.channel(topic), payload, str(policy.size), str(policy.ttl)]
        d: defer.Deferred[Any] = self._link.call("eval", PUBLISH_SCRIPT, keys, args)
        return d.addCallback(_positions)

    # -- reading ------------------------------------------------------------------------------------------

    def recover(self, topic: str, since: Since) -> defer.Deferred[Replay | RecoveryFailed]:
        """What `topic` published after `since`, or why history cannot say."""
        if not self.keeps_history(topic):
            return defer.succeed(RecoveryFailed(f"topic {topic!r} keeps no history"))
        keys = [self.keys.stream(topic), self.keys.meta(topic)]
        if isinstance(since, SeqSince):
            if since.seq < 0:
                return defer.succeed(RecoveryFailed(f"{since.seq} is not a message number"))
            ttl = self.policies.for_topic(topic).ttl or MAX_TTL
            return self._read(("seq", topic, since.seq), RECOVER_SEQ_SCRIPT, keys,
                              [str(since.seq), str(self.replay_limit), str(ttl)], self._judge_seq, since)
        if not is_offset(since.offset):
            return defer.succeed(RecoveryFailed(f"{since.offset!r} is not a stream offset"))
        # Inclusive start: finding `since` itself proves the history still reaches back that far.
        return self._read(("offset", topic, since.offset), RECOVER_SCRIPT, keys,
                          [since.offset, str(self.replay_limit + 2)], self._judge_offset, since)

    def latest(self, topic: str) -> defer.Deferred[tuple[Position, bytes] | None]:
        """The newest message of `topic` with its position, or None when its history is empty."""
        if not self.keeps_history(topic):
            return defer.succeed(None)
        return self._read(("latest", topic), TOP_SCRIPT, [self.keys.stream(topic), self.keys.meta(topic)], ["0"],
                          _newest, None)

    def top(self, topic: str) -> defer.Deferred[StreamTop | None]:
        """Where `topic`'s history stands, starting an epoch if it has none; None when it keeps no history.

        A subscriber told this position can recover from it after a reconnect, even before the first publish.
        """
        policy = self.policies.for_topic(topic)
        if not policy.size:
            return defer.succeed(None)
        return self._read(("top", topic), TOP_SCRIPT, [self.keys.stream(topic), self.keys.meta(topic)],
                          [str(policy.ttl or MAX_TTL)], _top, None)

    def page(self, topic: str, limit: int, since: SeqSince | None,
             reverse: bool) -> defer.Deferred[tuple[StreamTop, list[tuple[Position, bytes]]] | RecoveryFailed]:
        """Up to `limit` messages of `topic` after `since` (before it when `reverse`), or from the start (the
        end); with the position history stands at. RecoveryFailed when `since` is from another epoch or
        history no longer reaches back to it."""
        if not self.keeps_history(topic):
            return defer.succeed(RecoveryFailed(f"topic {topic!r} keeps no history"))
        args = [str(limit), "1" if reverse else "0", str(since.seq if since is not None else -1)]
        return self._read(("page", topic, *args), PAGE_SCRIPT, [self.keys.stream(topic), self.keys.meta(topic)],
                          args, _page, since)

    def missed(self, topics: Sequence[tuple[str, Position | None, str]]) -> defer.Deferred[list[Missed]]:
        """What each topic published that the node did not hear, for (topic, the last position its subscribers
        here got or None, where to start when None: an XRANGE start). One script call for all the topics."""
        keys: list[str] = []
        args = [str(self.replay_limit + 1)]
        for topic, last, floor in topics:
            keys += [self.keys.stream(topic), self.keys.meta(topic)]
            args += [floor, ""] if last is None else ["(" + last.offset, last.epoch]
        d: defer.Deferred[Any] = self._link.call("eval", CATCH_UP_SCRIPT, keys, args)
        return d.addCallback(lambda reply: [self._judge_missed(part, last)
                                            for part, (_, last, _) in zip(reply, topics, strict=True)])

    def _judge_missed(self, reply: Any, last: Position | None) -> Missed:
        current, _, raw_entries = reply
        epoch = _epoch(current)
        if epoch is None:
            return Missed((), None if last is None else "history was lost (Redis lost its data)")
        entries = tuple(_entry(entry, epoch) for entry in raw_entries or ())
        lost: str | None = None
        if last is not None and epoch != last.epoch:
            # The epoch the node knew is gone (Redis restarted without its data, or failed over to a replica
            # that lacked it): the new epoch is delivered, but what was acknowledged in the old one may be lost.
            lost = "history epoch changed (Redis lost it)"
        if len(entries) > self.replay_limit:
            entries = entries[:self.replay_limit]
            lost = f"more than {self.replay_limit} messages missed"
        return Missed(entries, lost)

    def _read(self, key: tuple[Any, ...], script: str, keys: list[str], args: list[str],
              judge: Callable[[Any, Any], Any], since: Since | None) -> defer.Deferred[Any]:
        """Run one read script; callers asking the same while it is in flight share it, each judged apart."""
        waiter: defer.Deferred[Any] = defer.Deferred()
        waiters = self._reads.get(key)
        if waiters is not None:
            self.merged_reads += 1
            waiters.append((waiter, since))
            return waiter
        self._reads[key] = [(waiter, since)]
        self.reads += 1
        d = self._link.call("eval", script, keys, args)
        d.addBoth(self._answered, key, judge)
        return waiter

    def _answered(self, reply: Any, key: tuple[Any, ...], judge: Callable[[Any, Any], Any]) -> None:
        for waiter, since in self._reads.pop(key):
            if isinstance(reply, Failure):
                waiter.errback(reply)
                continue
            try:
                verdict = judge(reply, since)
            except Exception:
                waiter.errback()
            else:
                waiter.callback(verdict)

    def _judge_offset(self, reply: Any, since: OffsetSince) -> Replay | RecoveryFailed:
        current, raw_entries = reply
        current = _epoch(current)
        if current is None:
            return RecoveryFailed(f"history no longer reaches back to {since.offset} (expired or lost)")
        if current != since.epoch:
            return RecoveryFailed("history epoch changed (Redis lost it)")
        entries = [_entry(entry, current) for entry in raw_entries or ()]
        if not entries or offset_key(entries[0][0].offset) != offset_key(since.offset):
            return RecoveryFailed(f"history no longer reaches back to {since.offset}")
        missed = entries[1:]
        if len(missed) > self.replay_limit:
            return RecoveryFailed(f"more than {self.replay_limit} messages missed")
        return Replay(current, tuple(missed), missed[-1][0].seq if missed else entries[0][0].seq)

    def _judge_seq(self, reply: Any, since: SeqSince) -> Replay | RecoveryFailed:
        current, raw_top, raw_entries = reply
        current = reply_text(current)
        top = int(raw_top)
        where = StreamTop(current, top)
        # An empty epoch stands for any (as Centrifugo has it): a client that was never told one.
        if since.epoch and current != since.epoch:
            return RecoveryFailed("history epoch changed (Redis lost it)", where)
        if since.seq > top:
            return RecoveryFailed(f"position {since.seq} is ahead of the history ({top})", where)
        missed = top - since.seq
        if missed > self.replay_limit:
            return RecoveryFailed(f"more than {self.replay_limit} messages missed", where)
        entries = [_entry(entry, current) for entry in reversed(raw_entries or ())]
        if len(entries) != missed or [p.seq for p, _ in entries] != list(range(since.seq + 1, top + 1)):
            return RecoveryFailed(f"history no longer reaches back to {since.seq}", where)
        return Replay(current, tuple(entries), top)


def _positions(reply: Any) -> list[Position | None]:
    """The positions PUBLISH_SCRIPT returns, flat: offset, epoch, number per message."""
    return [Position(reply_text(reply[i]), reply_text(reply[i + 1]), int(reply[i + 2]))
            for i in range(0, len(reply), 3)]


def _newest(reply: Any, _: None) -> tuple[Position, bytes] | None:
    current, _, raw_entries = reply
    current = _epoch(current)
    if current is None or not raw_entries:
        return None
    return _entry(raw_entries[0], current)


def _page(reply: Any, since: SeqSince | None) -> tuple[StreamTop, list[tuple[Position, bytes]]] | RecoveryFailed:
    current, raw_top, raw_entries = reply
    epoch = _epoch(current)
    top = StreamTop(epoch or "", int(raw_top))
    entries = [_entry(entry, top.epoch) for entry in raw_entries or ()]
    if since is not None:
        if epoch != since.epoch and not (epoch is None and since.seq == 0):
            return RecoveryFailed("history epoch changed (Redis lost it)", top)
        if since.seq > top.seq:
            return RecoveryFailed(f"position {since.seq} is ahead of the history ({top.seq})", top)
        if entries and entries[0][0].seq not in (since.seq + 1, since.seq - 1):
            return RecoveryFailed(f"history no longer reaches back to {since.seq}", top)
    return top, entries


def _top(reply: Any, _: None) -> StreamTop:
    current, seq, raw_entries = reply
    offset = reply_text(raw_entries[0][0]) if raw_entries else "0-0"
    return StreamTop(reply_text(current), int(seq), offset)


def _first_error(failure: Failure) -> Failure:
    """gatherResults wraps the failure in FirstError; callers want the Redis error itself."""
    error = failure.value
    if isinstance(error, defer.FirstError):
        sub: Failure = error.subFailure
        return sub
    return failure
