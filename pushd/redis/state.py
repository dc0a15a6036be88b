"""The node's membership mirrored into Redis: who is connected, subscribed to what, on which node.

Redis is written on membership changes only, never read on the hot path. Changes are queued in order and
applied by one Lua script per batch (atomic, one round trip for up to `BATCH` changes). When a write fails or
the connection drops, the queue is dropped and the node's whole membership is rewritten from the in-memory
index on the next connection, so Redis converges to the truth instead of replaying a stale log.
docs/redis-state.md lists every key.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from pushd.redis.client import RedisLink

BATCH = 1000
PURGE_CHUNK = 500

_LIB = """
local prefix = ARGV[1]
local topics_key = prefix .. 'topics'
local function sub(cid, topics)
  local ck = prefix .. 'conn:' .. cid
  local user = redis.call('GET', prefix .. 'conn-user:' .. cid)
  for _, t in ipairs(topics) do
    if redis.call('SADD', ck, t) == 1 and user then
      redis.call('HINCRBY', prefix .. 'topic-users:' .. t, user, 1)
    end
    redis.call('SADD', prefix .. 'topic:' .. t, cid)
    redis.call('SADD', topics_key, t)
  end
end
local function unsub(cid, topics)
  local ck = prefix .. 'conn:' .. cid
  local user = redis.call('GET', prefix .. 'conn-user:' .. cid)
  for _, t in ipairs(topics) do
    if redis.call('SREM', ck, t) == 1 and user then
      local uk = prefix .. 'topic-users:' .. t
      if redis.call('HINCRBY', uk, user, -1) <= 0 then redis.call('HDEL', uk, user) end
    end
    local tk = prefix .. 'topic:' .. t
    redis.call('SREM', tk, cid)
    if redis.call('EXISTS', tk) == 0 then redis.call('SREM', topics_key, t) end
  end
end
local function identify(cid, user)
  local key = prefix .. 'conn-user:' .. cid
  if redis.call('GET', key) then return end
  redis.call('SET', key, user)
  for _, t in ipairs(redis.call('SMEMBERS', prefix .. 'conn:' .. cid)) do
    redis.call('HINCRBY', prefix .. 'topic-users:' .. t, user, 1)
  end
end
local function close(cid)
  local ck = prefix .. 'conn:' .. cid
  unsub(cid, redis.call('SMEMBERS', ck))
  redis.call('DEL', ck, prefix .. 'conn-user:' .. cid)
end
"""

#: ARGV: prefix, node id, JSON list of [op, conn id, topics or user?] with op in o(pen) i(dentify: the
#: connection's user) s(ub) u(nsub) c(lose).
APPLY_SCRIPT = _LIB + """
local node_key = prefix .. 'node:' .. ARGV[2]
for _, op in ipairs(cjson.decode(ARGV[3])) do
  local kind, cid = op[1], op[2]
  if kind == 's' then sub(cid, op[3])
  elseif kind == 'u' then unsub(cid, op[3])
  elseif kind == 'o' then redis.call('SADD', node_key, cid)
  elseif kind == 'i' then identify(cid, op[3])
  elseif kind == 'c' then close(cid); redis.call('SREM', node_key, cid)
  end
end
return 1
"""

#: ARGV: prefix, node id, chunk size, mode, and for mode "gone" the heartbeat record judged dead. Removes up
#: to a chunk of the node's connections; returns how many remain, or -1 when asked to reap a node whose
#: heartbeat is alive again. Modes: "own" (this node's rewrite), "leave" (this node's shutdown: with the last
#: chunk its heartbeat and node-set entry go too), "dead" (a peer whose heartbeat expired), "gone" (a node of
#: this host whose process is gone: its heartbeat is deleted first, only if it still holds that record).
PURGE_SCRIPT = _LIB + """
local node = ARGV[2]
local mode = ARGV[4]
local node_key = prefix .. 'node:' .. node
local heartbeat = prefix .. 'heartbeat:' .. node
if mode == 'gone' then
  if redis.call('GET', heartbeat) == ARGV[5] then redis.call('DEL', heartbeat) end
  mode = 'dead'
end
if mode == 'dead' and redis.call('EXISTS', heartbeat) == 1 then return -1 end
local cids = redis.call('SPOP', node_key, tonumber(ARGV[3]))
for _, cid in ipairs(cids) do close(cid) end
local left = redis.call('SCARD', node_key)
if left == 0 and mode ~= 'own' then
  redis.call('SREM', prefix .. 'nodes', node)
  if mode == 'leave' then redis.call('DEL', heartbeat) end
end
return left
"""

#: ARGV: prefix, node id, heartbeat record, TTL. Refreshes the heartbeat and the node-set entry in one step and
#: returns {1 if the heartbeat key still existed, how many connections Redis holds for the node}: a missing key
#: or a wrong count means Redis lost this node's state (reaped after a stall, restarted without data, failover).
HEARTBEAT_SCRIPT = """
local prefix, node = ARGV[1], ARGV[2]
local heartbeat = prefix .. 'heartbeat:' .. node
local existed = redis.call('EXISTS', heartbeat)
redis.call('SET', heartbeat, ARGV[3], 'EX', tonumber(ARGV[4]))
redis.call('SADD', prefix .. 'nodes', node)
return {existed, redis.call('SCARD', prefix .. 'node:' .. node)}
"""


@dataclass(frozen=True)
class Keys:
    """Every Redis key pushd writes, in one place (docs/redis-state.md)."""

    prefix: str = "pushd:"

    @property
    def topics(self) -> str:
        return self.prefix + "topics"

    @property
    def nodes(self) -> str:
        return self.prefix + "nodes"

    def topic(self, topic: str) -> str:
        return f"{self.prefix}topic:{topic}"

    def topic_users(self, topic: str) -> str:
        """user -> how many of that user's connections are subscribed to the topic."""
        return f"{self.prefix}topic-users:{topic}"

    def conn_user(self, conn_id: str) -> str:
        return f"{self.prefix}conn-user:{conn_id}"

    def conn(self, conn_id: str) -> str:
        return f"{self.prefix}conn:{conn_id}"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    def heartbeat(self, node_id: str) -> str:
        return f"{self.prefix}heartbeat:{node_id}"


Op = list[Any]

#: Writer modes: OFFLINE drops changes (a rewrite will cover them), REWRITING queues them, LIVE writes them.
OFFLINE, REWRITING, LIVE = "offline", "rewriting", "live"


class NodeState:
    """Mirrors one node's membership into Redis and keeps its heartbeat; reaps nodes that died.

    Implements the hub's `MembershipObserver`.
    """

    log = Logger()

    def __init__(self, clock: Any, redis: RedisLink, keys: Keys, node_id: str, *,
                 heartbeat_interval: int, heartbeat_ttl: int,
                 snapshot: Callable[[], Iterable[tuple[str, tuple[str, ...], str | None]]],
                 info: Callable[[], dict[str, Any]] = dict, count: Callable[[], int] | None = None,
                 incarnation: str = "", host: str | None = None, pid: int | None = None) -> None:
        self._clock = clock
        self._redis = redis
        self.keys = keys
        self.node_id = node_id
        self.incarnation = incarnation
        #: Written into the heartbeat record, so that a node restarted on this host can tell its dead
        #: predecessor (docs/redis-state.md, "Nodes coming and going").
        self.host = socket.gethostname() if host is None else host
        self.pid = os.getpid() if pid is None else pid
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_ttl = heartbeat_ttl
        self._snapshot = snapshot
        self._count = count or (lambda: sum(1 for _ in snapshot()))
        self._info = info
        self._ops: list[Op] = []
        self._draining = False
        self._mode = OFFLINE
        self._stopped = False
        #: A rewrite running while Redis lost the state again (a second stall) must run once more.
        self._stale = False
        self._outage_since: float | None = None
        self._heartbeat = task.LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._resync_waiters: list[defer.Deferred[Any]] = []
        self.writes = 0
        self.resyncs = 0
        self.repairs = 0
        self.reaped_nodes = 0

    # -- MembershipObserver -------------------------------------------------------------------------------

    def opened(self, conn_id: str) -> None:
        self._queue(["o", conn_id])

    def identified(self, conn_id: str, user: str) -> None:
        self._queue(["i", conn_id, user])

    def subscribed(self, conn_id: str, topics: tuple[str, ...]) -> None:
        self._queue(["s", conn_id, list(topics)])

    def unsubscribed(self, conn_id: str, topics: tuple[str, ...]) -> None:
        self._queue(["u", conn_id, list(topics)])

    def closed(self, conn_id: str) -> None:
        self._queue(["c", conn_id])

    def _queue(self, op: Op) -> None:
        # Offline, the next rewrite copies the whole index, which already has this change.
        if self._mode is not OFFLINE and not self._stopped:
            self._ops.append(op)
            if self._mode is LIVE:
                self._kick()

    def _kick(self) -> None:
        if not self._draining:
            self._draining = True
            # Wait for the end of this reactor turn so a burst of changes goes out as one batch.
            self._clock.callLater(0, self._drain)

    @defer.inlineCallbacks
    def _drain(self) -> Any:
        try:
            while self._ops and self._mode is LIVE:
                batch, self._ops = self._ops[:BATCH], self._ops[BATCH:]
                yield self._redis.call("eval", APPLY_SCRIPT, [],
                                       [self.keys.prefix, self.node_id, json.dumps(batch)])
                self.writes += 1
        except Exception as e:
            self.log.warn("membership write to Redis failed ({error}); will rewrite this node's state "
                          "on the next connection", error=e)
            self._ops = []
            self._mode = OFFLINE
        finally:
            self._draining = False

    # -- whole-node operations ----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def purge(self, node_id: str, mode: str, record: str | None = None) -> Any:
        """Remove every trace of `node_id` in chunks (PURGE_SCRIPT's modes); False if a dead node came back."""
        args = [self.keys.prefix, node_id, str(PURGE_CHUNK), mode] + ([record] if record is not None else [])
        while True:
            left = yield self._redis.call("eval", PURGE_SCRIPT, [], args)
            if int(left) <= 0:
                return int(left) == 0
            if mode == "gone":
                args = args[:3] + ["dead"]

    def resync(self) -> defer.Deferred[Any]:
        """Replace whatever Redis holds for this node with the in-memory index, then resume live writes.

        Concurrent calls share one rewrite.
        """
        waiter: defer.Deferred[Any] = defer.Deferred()
        self._resync_waiters.append(waiter)
        if len(self._resync_waiters) == 1:
            self._rewrite().addBoth(self._resync_finished)
        return waiter

    def _resync_finished(self, result: Any) -> None:
        waiters, self._resync_waiters = self._resync_waiters, []
        for waiter in waiters:
            waiter.callback(result)

    @defer.inlineCallbacks
    def _rewrite(self) -> Any:
        self._mode = REWRITING
        try:
            # The heartbeat first: from then on a peer's PURGE 'dead' refuses, so it cannot delete half of
            # what is written next.
            yield self.register()
            self._stale = True
            while self._stale:
                self._stale = False
                count = yield self._write_snapshot()
        except BaseException:
            self._mode = OFFLINE
            self._ops = []
            raise
        self.resyncs += 1
        self._mode = LIVE
        self.log.info("node {node} membership written to Redis: {count} connections", node=self.node_id,
                      count=count)
        if self._ops:
            self._kick()

    @defer.inlineCallbacks
    def _write_snapshot(self) -> Any:
        yield self.purge(self.node_id, "own")
        # Changes from here on come after the snapshot and are applied after it.
        self._ops = []
        ops: list[Op] = []
        for conn_id, topics, user in self._snapshot():
            ops.append(["o", conn_id])
            if user is not None:
                ops.append(["i", conn_id, user])
            if topics:
                ops.append(["s", conn_id, list(topics)])
        for start in range(0, len(ops), BATCH):
            yield self._redis.call("eval", APPLY_SCRIPT, [],
                                   [self.keys.prefix, self.node_id, json.dumps(ops[start:start + BATCH])])
        return sum(1 for op in ops if op[0] == "o")

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Start-up: remove an earlier run's state and dead nodes' state, then register and heartbeat."""
        yield self.resync()
        yield self.register()
        yield self.reap(this_host=True)
        self._heartbeat.start(self._heartbeat_interval, now=False).addErrback(
            lambda f: self.log.failure("heartbeat loop stopped", f))

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Shutdown: stop heartbeats and remove this node's state, its heartbeat and its node-set entry."""
        self._stopped = True
        self._mode = OFFLINE
        if self._heartbeat.running:
            self._heartbeat.stop()
        yield self.purge(self.node_id, "leave")

    @defer.inlineCallbacks
    def register(self) -> Any:
        """Refresh this node's heartbeat record and node-set entry; returns (the key still existed, Redis's count
        of this node's connections)."""
        info = dict(self._info(), node=self.node_id, time=time.time(), host=self.host, pid=self.pid,
                    incarnation=self.incarnation, repairs=self.repairs)
        reply = yield self._redis.call("eval", HEARTBEAT_SCRIPT, [],
                                       [self.keys.prefix, self.node_id, json.dumps(info), str(self._heartbeat_ttl)])
        existed, held = reply
        return bool(int(existed)), int(held)

    @defer.inlineCallbacks
    def _beat(self) -> Any:
        # Redis's count is comparable with ours only when no change is queued or in flight on our connection.
        quiet = self._mode is LIVE and not self._ops and not self._draining
        local, generation = self._count(), self.resyncs
        try:
            existed, held = yield self.register()
            if not self._stopped:
                self._check(existed, held, local if quiet and generation == self.resyncs else None)
            yield self.reap()
        except Exception as e:
            if self._outage_since is None:
                self._outage_since = self._clock.seconds()
                self.log.warn("heartbeat to Redis failed ({error}); retrying every {interval} s, logged again "
                              "when it works", error=e, interval=self._heartbeat_interval)
            return
        if self._outage_since is not None:
            self.log.info("heartbeat to Redis works again after {seconds:.0f} s",
                          seconds=self._clock.seconds() - self._outage_since)
            self._outage_since = None

    def _check(self, existed: bool, held: int, local: int | None) -> None:
        """Rewrite this node's state when Redis lost it (or never got it, while offline)."""
        if self._mode is OFFLINE:
            self._background_resync()
        elif self._mode is REWRITING:
            if not existed:
                self._stale = True
        elif not existed:
            self._repair("its heartbeat had expired: a peer may have reaped it after a stall, or Redis lost "
                         "its data")
        elif local is not None and held != local:
            self._repair(f"Redis held {held} of its {local} connections")

    def _repair(self, reason: str) -> None:
        self.repairs += 1
        self.log.warn("node {node}: rewriting its membership in Redis because {reason} (repair {repairs})",
                      node=self.node_id, reason=reason, repairs=self.repairs)
        self._background_resync()

    def _background_resync(self) -> None:
        # Not waited for by the heartbeat loop, so the heartbeat goes on during a long rewrite.
        self.resync().addErrback(lambda f: self.log.warn("resync failed: {error}", error=f.value))

    @defer.inlineCallbacks
    def reap(self, *, this_host: bool = False) -> Any:
        """Remove the state of every other node whose heartbeat has expired; with `this_host`, also of nodes
        whose record says they ran on this host with a process that no longer runs (a restart's predecessor)."""
        nodes = yield self._redis.call("smembers", self.keys.nodes)
        for node in sorted(nodes):
            if node == self.node_id:
                continue
            record = None
            if this_host:
                record = yield self._redis.call("get", self.keys.heartbeat(node))
                if record is not None and not self._exited_here(record):
                    continue
            else:
                alive = yield self._redis.call("exists", self.keys.heartbeat(node))
                if alive:
                    continue
            removed = yield self.purge(node, "gone" if record is not None else "dead", record)
            if removed:
                self.reaped_nodes += 1
                self.log.info("removed the state of dead node {node} ({why})", node=node,
                              why="its process on this host is gone" if record is not None else "heartbeat expired")

    def _exited_here(self, record: str) -> bool:
        try:
            info = json.loads(record)
            host, pid = info["host"], int(info["pid"])
        except (ValueError, KeyError, TypeError):
            return False
        return host == self.host and pid != self.pid and not process_running(pid)

    def connection_lost(self) -> None:
        """The Redis connection dropped: stop writing; the next heartbeat after reconnecting resyncs."""
        if self._mode is LIVE:
            self.log.warn("Redis connection lost; this node's membership will be rewritten on reconnect")
        self._mode = OFFLINE
        self._ops = []

    def connection_ready(self) -> None:
        """Redis is back: rewrite this node's membership now rather than at the next heartbeat."""
        if not self._stopped and self._mode is OFFLINE and self._heartbeat.running:
            self.resync().addErrback(lambda f: self.log.warn("resync failed: {error}", error=f.value))


def process_running(pid: int) -> bool:
    """Whether a process `pid` exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def base36(number: int) -> str:
    text = ""
    while True:
        number, digit = divmod(number, 36)
        text = _DIGITS[digit] + text
        if number == 0:
            return text


def local_incarnation(now: Callable[[], float] = time.time) -> str:
    """An incarnation from this host's clock, for when Redis cannot give one."""
    return base36(int(now() * 1_000_000))


@defer.inlineCallbacks
def read_incarnation(redis: RedisLink) -> Any:
    """This run's name among the node's runs: Redis `TIME` in microseconds, base 36 (the local clock when Redis
    does not answer). Connection ids carry it, so an id never names a client of a later run."""
    try:
        seconds, micros = yield redis.call("time")
    except Exception:
        return local_incarnation()
    return base36(int(seconds) * 1_000_000 + int(micros))
