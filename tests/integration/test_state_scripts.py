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


def test_users_per_topic_follow_identify_subscribe_unsubscribe_and_close(r):
    # alice has two connections on A, bob one; a connection identified after subscribing counts too.
    apply(r, "n", ("o", "n:1"), ("i", "n:1", "alice"), ("s", "n:1", ["A", "B"]),
          ("o", "n:2"), ("s", "n:2", ["A"]), ("i", "n:2", "alice"),
          ("o", "n:3"), ("i", "n:3", "bob"), ("s", "n:3", ["A", "A"]), ("o", "n:4"), ("s", "n:4", ["A"]))
    assert r.hgetall("p:topic-users:A") == {"alice": "2", "bob": "1"}
    assert r.hgetall("p:topic-users:B") == {"alice": "1"}
    assert r.scard("p:topic:A") == 4  # n:4 is anonymous: a connection, not a user

    apply(r, "n", ("i", "n:1", "alice"), ("s", "n:1", ["A"]))  # again: no double count
    assert r.hgetall("p:topic-users:A") == {"alice": "2", "bob": "1"}

    apply(r, "n", ("u", "n:1", ["A", "never-had"]), ("c", "n:3"))
    assert r.hgetall("p:topic-users:A") == {"alice": "1"}
    apply(r, "n", ("c", "n:2"), ("c", "n:1"), ("c", "n:4"))
    assert r.keys("p:*") == []


def test_purge_removes_the_users_of_the_node(r):
    apply(r, "d", ("o", "d:1"), ("i", "d:1", "alice"), ("s", "d:1", ["A"]))
    apply(r, "m", ("o", "m:1"), ("i", "m:1", "alice"), ("s", "m:1", ["A"]))
    assert purge(r, "d") == 0
    assert r.hgetall("p:topic-users:A") == {"alice": "1"}
    assert not r.exists("p:conn-user:d:1")
