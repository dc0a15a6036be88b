"""The membership and purge Lua scripts, run by a real redis-server: every transition of docs/redis-state.md."""

from __future__ import annotations

import json

import pytest

from pushd.redis.state import APPLY_SCRIPT, PURGE_SCRIPT


@pytest.fixture
def r(redis_server):
    return redis_server.client()


def apply(r, node, *ops):
    return r.eval(APPLY_SCRIPT, 0, "p:", node, json.dumps([list(op) for op in ops]))


def purge(r, node, mode="own", chunk=500):
    return r.eval(PURGE_SCRIPT, 0, "p:", node, str(chunk), mode)


def test_open_subscribe_unsubscribe_close(r):
    apply(r, "n", ("o", "n:1"), ("o", "n:2"), ("s", "n:1", ["A", "B"]), ("s", "n:2", ["A"]))
    assert r.smembers("p:node:n") == {"n:1", "n:2"}
    assert r.smembers("p:topic:A") == {"n:1", "n:2"}
    assert r.smembers("p:conn:n:1") == {"A", "B"}
    assert r.smembers("p:topics") == {"A", "B"}

    apply(r, "n", ("u", "n:1", ["B", "never-had"]))
    assert r.smembers("p:topics") == {"A"}
    assert not r.exists("p:topic:B")

    apply(r, "n", ("c", "n:1"))
    assert r.smembers("p:topic:A") == {"n:2"}
    assert not r.exists("p:conn:n:1")
    assert r.smembers("p:node:n") == {"n:2"}

    apply(r, "n", ("c", "n:2"), ("c", "n:2"))  # closing twice is harmless
    assert r.keys("p:*") == []


def test_purge_own_node_in_chunks_leaves_other_nodes_alone(r):
    apply(r, "n", *[("o", f"n:{i}") for i in range(7)], *[("s", f"n:{i}", ["A", f"T{i}"]) for i in range(7)])
    apply(r, "m", ("o", "m:1"), ("s", "m:1", ["A"]))
    assert purge(r, "n", chunk=3) == 4
    assert purge(r, "n", chunk=3) == 1
    assert purge(r, "n", chunk=3) == 0
    assert r.smembers("p:topics") == {"A"}
    assert r.smembers("p:topic:A") == {"m:1"}
    assert sorted(r.keys("p:*")) == ["p:conn:m:1", "p:node:m", "p:topic:A", "p:topics"]


def test_purge_of_a_dead_node_stops_if_its_heartbeat_is_back(r):
    apply(r, "d", ("o", "d:1"), ("s", "d:1", ["A"]))
    r.sadd("p:nodes", "d")
    r.set("p:heartbeat:d", "{}")
    assert purge(r, "d", mode="dead") == -1
    assert r.smembers("p:topic:A") == {"d:1"}
    r.delete("p:heartbeat:d")
    assert purge(r, "d", mode="dead") == 0
    assert r.keys("p:*") == []
