"""What the HTTP API asks of the whole cluster, done through Redis, and the control messages nodes obey.

Any node's API can publish, message a user, broadcast or disconnect: it writes to Redis and PUBLISHes on
pushd's own channels, and every node (itself included) acts on what its listener receives. So an API call
costs the same whatever node it reaches, and no node talks to another directly.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from pushd.api import Unavailable
from pushd.jobs.store import JobStore
from pushd.recovery import Position
from pushd.redis.client import reply_text
from pushd.redis.history import History
from pushd.redis.state import Keys

#: The broadcast id of a key already seen in the window, or a new broadcast: dedup, state record and PUBLISH
#: in one atomic step, so two API calls with the same key on two nodes cannot both broadcast.
#: KEYS: dedup key ("" = no key), state key. ARGV: id, window seconds, created, control channel, message.
BROADCAST_SCRIPT = """
if KEYS[1] ~= '' then
  if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
    return {redis.call('GET', KEYS[1]), 0}
  end
end
local nodes = redis.call('PUBLISH', ARGV[4], ARGV[5])
redis.call('HSET', KEYS[2], '.created', ARGV[3], '.nodes', nodes)
redis.call('EXPIRE', KEYS[2], ARGV[2])
return {ARGV[1], 1}
"""

#: Every topic with its subscriber count, at most ARGV[1] of them. KEYS: the topics set. ARGV: limit, prefix.
TOPICS_SCRIPT = """
local result = {}
local count = 0
for _, topic in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  count = count + 1
  if count > tonumber(ARGV[1]) then break end
  result[#result + 1] = topic
  result[#result + 1] = redis.call('SCARD', ARGV[2] .. 'topic:' .. topic)
end
return result
"""

#: One node's progress on a broadcast, written only while the broadcast's record lives (it expires with the
#: dedup window). KEYS: state key. ARGV: node id, JSON report.
REPORT_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 0
"""

MAX_TOPICS_LISTED = 10000


@dataclass(frozen=True)
class Channels:
    """pushd's own PUBLISH channels (docs/redis-state.md); all start with the key prefix."""

    prefix: str = "pushd:"

    @property
    def control(self) -> str:
        return self.prefix + "control"

    @property
    def user_prefix(self) -> str:
        return self.prefix + "user:"

    def user(self, user: str) -> str:
        return self.user_prefix + user


def broadcast_key(prefix: str, key: str) -> str:
    return f"{prefix}broadcast-key:{key}"


def broadcast_state_key(prefix: str, broadcast_id: str) -> str:
    return f"{prefix}broadcast:{broadcast_id}"


def encode_control(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """A control message: one line of JSON, then the payload bytes as they are (a broadcast's data)."""
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + payload


def parse_control(message: bytes) -> tuple[dict[str, Any], bytes] | None:
    head, newline, payload = message.partition(b"\n")
    if not newline:
        return None
    try:
        header = json.loads(head)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        return None
    return header, payload


def node_of(conn_id: str) -> str:
    """The node id part of a connection id `<node-id>:<serial>` (node ids may contain ':')."""
    return conn_id.rpartition(":")[0]


class Cluster:
    """The `pushd.api.ApiBackend` of a node: reads and writes the cluster's state in Redis."""

    def __init__(self, link: Any, keys: Keys, history: History, *, broadcast_window: int,
                 unavailable: Callable[[], str | None] = lambda: None) -> None:
        self._link = link
        self._keys = keys
        self._history = history
        self._window = broadcast_window
        self._unavailable = unavailable
        self.channels = Channels(keys.prefix)
        #: Push jobs, managed through the API (pushd/jobs/store.py).
        self.jobs = JobStore(link, keys.prefix)

    def _check_deliverable(self) -> None:
        """Refuse what this node could not deliver now, before anything is written."""
        reason = self._unavailable()
        if reason is not None:
            raise Unavailable(reason)

    def publish(self, messages: Sequence[tuple[str, bytes]]) -> defer.Deferred[list[Position | None]]:
        self._check_deliverable()
        return self._history.publish(messages)

    def publish_to_user(self, user: str, payload: bytes) -> defer.Deferred[int]:
        self._check_deliverable()
        d: defer.Deferred[int] = self._link.call("publish", self.channels.user(user), payload).addCallback(int)
        return d

    @defer.inlineCallbacks
    def broadcast(self, payload: bytes, key: str | None) -> Any:
        self._check_deliverable()
        broadcast_id = uuid.uuid4().hex
        prefix = self._keys.prefix
        message = encode_control({"op": "broadcast", "id": broadcast_id}, payload)
        result = yield self._link.call(
            "eval", BROADCAST_SCRIPT,
            [broadcast_key(prefix, key) if key else "", broadcast_state_key(prefix, broadcast_id)],
            [broadcast_id, self._window, f"{time.time():.3f}", self.channels.control, message])
        return reply_text(result[0]), bool(int(result[1]))

    @defer.inlineCallbacks
    def broadcast_status(self, broadcast_id: str) -> Any:
        fields = yield self._link.call("hgetall", broadcast_state_key(self._keys.prefix, broadcast_id))
        if not fields:
            return None
        fields = {reply_text(k): reply_text(v) for k, v in fields.items()}
        nodes: dict[str, Any] = {}
        totals = {"targeted": 0, "sent": 0, "dropped_slow": 0, "dropped_gone": 0}
        for name, value in fields.items():
            if name.startswith("."):
                continue
            try:
                report = json.loads(value)
            except ValueError:
                continue
            nodes[name] = report
            for counter in totals:
                totals[counter] += int(report.get(counter, 0))
        expected = int(fields.get(".nodes", "0"))
        done = sum(1 for report in nodes.values() if report.get("state") == "done")
        return {
            "id": broadcast_id,
            "created": float(fields.get(".created", "0")),
            "state": "done" if done >= expected else "running",
            "nodes_expected": expected,
            "nodes_done": done,
            "nodes": nodes,
            "totals": totals,
        }

    def report_broadcast(self, broadcast_id: str, node_id: str, report: dict[str, Any]) -> defer.Deferred[Any]:
        """Record one node's progress on a broadcast (only while the broadcast's record exists)."""
        d: defer.Deferred[Any] = self._link.call("eval", REPORT_SCRIPT,
                                                 [broadcast_state_key(self._keys.prefix, broadcast_id)],
                                                 [node_id, json.dumps(report)])
        return d

    @defer.inlineCallbacks
    def topics(self) -> Any:
        flat = yield self._link.call("eval", TOPICS_SCRIPT, [self._keys.topics],
                                     [MAX_TOPICS_LISTED, self._keys.prefix])
        return {reply_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    @defer.inlineCallbacks
    def topic(self, topic: str) -> Any:
        members = yield self._link.call("smembers", self._keys.topic(topic))
        counts: dict[str, int] = {}
        for conn_id in members:
            node = node_of(reply_text(conn_id))
            counts[node] = counts.get(node, 0) + 1
        return counts

    @defer.inlineCallbacks
    def presence(self, topic: str) -> Any:
        """(connections, distinct users) subscribed to `topic`, cluster-wide."""
        clients = yield self._link.call("scard", self._keys.topic(topic))
        users = yield self._link.call("hlen", self._keys.topic_users(topic))
        return int(clients), int(users)

    @defer.inlineCallbacks
    def nodes(self) -> Any:
        node_ids = sorted(reply_text(n) for n in (yield self._link.call("smembers", self._keys.nodes)))
        result = []
        for node_id in node_ids:
            record = yield self._link.call("get", self._keys.heartbeat(node_id))
            info: dict[str, Any] = {"node": node_id, "alive": record is not None}
            if record is not None:
                try:
                    info.update(json.loads(reply_text(record)))
                except ValueError:
                    pass
            result.append(info)
        return result

    @defer.inlineCallbacks
    def disconnect_connection(self, conn_id: str, code: int, reason: str) -> Any:
        self._check_deliverable()
        known = yield self._link.call("sismember", self._keys.node(node_of(conn_id)), conn_id)
        if not int(known):
            return False
        yield self._link.call("publish", self.channels.control, encode_control(
            {"op": "disconnect", "conn": conn_id, "code": code, "reason": reason}))
        return True

    def disconnect_user(self, user: str, code: int, reason: str) -> defer.Deferred[int]:
        self._check_deliverable()
        d: defer.Deferred[int] = self._link.call("publish", self.channels.control, encode_control(
            {"op": "disconnect_user", "user": user, "code": code, "reason": reason})).addCallback(int)
        return d
