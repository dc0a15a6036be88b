"""Faults that make Redis lose or keep a node's membership: a stalled node reaped by a peer, a restart reusing
a node id, a shutdown while Redis does not answer. Real pushd processes, a real redis-server, real signals."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from websockets.exceptions import ConnectionClosed

from pushd.cluster import node_of
from pushd.redis.state import APPLY_SCRIPT, HEARTBEAT_SCRIPT, PURGE_SCRIPT
from tests.integration.pushd_process import PushdProcess, eventually

BEAT = ("--heartbeat-interval", "1", "--heartbeat-ttl", "2")


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process `pid` stands still (SIGSTOP) inside the block, and always runs again after it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def left_behind(r, node: str) -> dict:
    """What Redis still holds of `node`."""
    return {name: value for name, value in {
        "nodes": node in r.smembers("pushd:nodes"),
        "heartbeat": r.exists(f"pushd:heartbeat:{node}"),
        "node": r.exists(f"pushd:node:{node}"),
        "conns": r.keys(f"pushd:conn:{node}:*"),
    }.items() if value}


def test_the_heartbeat_script_says_whether_redis_still_had_the_node(redis_server):
    r = redis_server.client()
    assert r.eval(HEARTBEAT_SCRIPT, 0, "p:", "n", '{"pid":1}', "30") == [0, 0]
    assert 0 < r.ttl("p:heartbeat:n") <= 30 and r.smembers("p:nodes") == {"n"}
    r.eval(APPLY_SCRIPT, 0, "p:", "n", json.dumps([["o", "n:a.1"], ["o", "n:a.2"]]))
    assert r.eval(HEARTBEAT_SCRIPT, 0, "p:", "n", '{"pid":1}', "30") == [1, 2]
    r.delete("p:heartbeat:n", "p:node:n")  # what a reaper (or a Redis without the data) leaves
    assert r.eval(HEARTBEAT_SCRIPT, 0, "p:", "n", '{"pid":1}', "30") == [0, 0]


def test_leave_and_gone_purges_also_remove_the_heartbeat_and_the_node_set_entry(redis_server):
    r = redis_server.client()
    for node in ("n", "g", "alive"):
        r.eval(APPLY_SCRIPT, 0, "p:", node, json.dumps([["o", f"{node}:a.1"], ["s", f"{node}:a.1", ["A"]]]))
        r.eval(HEARTBEAT_SCRIPT, 0, "p:", node, f'{{"node":"{node}"}}', "300")
    assert r.eval(PURGE_SCRIPT, 0, "p:", "n", "500", "leave") == 0
    assert r.eval(PURGE_SCRIPT, 0, "p:", "g", "500", "gone", '{"node":"g"}') == 0
    # a record that changed since it was judged dead belongs to a live node: refused
    assert r.eval(PURGE_SCRIPT, 0, "p:", "alive", "500", "gone", '{"node":"old"}') == -1
    assert r.smembers("p:nodes") == {"alive"} and r.keys("p:heartbeat:*") == ["p:heartbeat:alive"]
    assert r.smembers("p:topic:A") == {"alive:a.1"}
    # an empty or missing node key: the entry and heartbeat still go
    r.sadd("p:nodes", "empty")
    assert r.eval(PURGE_SCRIPT, 0, "p:", "empty", "500", "dead") == 0
    assert r.smembers("p:nodes") == {"alive"}


def test_a_node_reaped_during_a_stall_rewrites_its_membership_when_it_runs_again(tmp_path, redis_server):
    r = redis_server.client()
    with PushdProcess(tmp_path / "a", *BEAT, redis=redis_server.url, node_id="a") as a, \
            PushdProcess(tmp_path / "b", *BEAT, redis=redis_server.url, node_id="b") as b:
        client = a.client()
        client.subscribe("AAPL")
        eventually(lambda: r.scard("pushd:node:a") == 1)
        [conn] = r.smembers("pushd:node:a")

        with stopped(a.pid):  # longer than the TTL: b reaps a
            eventually(lambda: not left_behind(r, "a") and not r.exists("pushd:topic:AAPL"), timeout=15)

        eventually(lambda: r.smembers("pushd:node:a") == {conn}, timeout=15)
        eventually(lambda: b.api("GET", "/api/topics/AAPL")[1]["nodes"] == {"a": 1}, timeout=5)
        assert r.smembers("pushd:conn:" + conn) == {"AAPL"}
        assert json.loads(r.get("pushd:heartbeat:a"))["repairs"] >= 1
        a.wait_for("rewriting its membership in Redis because its heartbeat had expired", timeout=5)

        assert b.api("DELETE", f"/api/connections/{conn}?code=4001&reason=found")[0] == 200
        with pytest.raises(ConnectionClosed) as closed:
            client.recv()
        assert closed.value.rcvd.code == 4001


def test_connection_ids_are_not_reused_after_a_crash_and_restart_with_the_same_node_id(tmp_path, redis_server):
    r = redis_server.client()
    first = PushdProcess(tmp_path / "1", redis=redis_server.url, node_id="X").start()
    first.client().subscribe("A")
    eventually(lambda: r.scard("pushd:node:X") == 1)
    [old] = r.smembers("pushd:node:X")
    first.kill()

    with PushdProcess(tmp_path / "2", redis=redis_server.url, node_id="X") as second:
        client = second.client()
        client.subscribe("A")
        eventually(lambda: r.scard("pushd:node:X") == 1)
        [new] = r.smembers("pushd:node:X")
        assert new != old and node_of(new) == node_of(old) == "X"
        assert second.api("DELETE", f"/api/connections/{old}")[0] == 404
        assert client.request({"op": "ping", "id": 1}) == {"op": "pong", "id": 1}
        assert r.smembers("pushd:node:X") == {new}


def shut_down_while_redis_stands_still(node: PushdProcess, redis_pid: int) -> None:
    with stopped(redis_pid):
        node.stop()
    assert any("could not remove this node's state" in line for line in node.lines), node.log


def test_a_node_that_could_not_leave_at_shutdown_is_cleaned_by_a_peer(tmp_path, redis_server):
    r = redis_server.client()
    with PushdProcess(tmp_path / "b", *BEAT, redis=redis_server.url, node_id="b"):
        a = PushdProcess(tmp_path / "a", *BEAT, "--redis-timeout", "1", "--shutdown-timeout", "1",
                         redis=redis_server.url, node_id="a").start()
        a.client().subscribe("A")
        eventually(lambda: r.scard("pushd:node:a") == 1)
        shut_down_while_redis_stands_still(a, redis_server.pid)
        eventually(lambda: not left_behind(r, "a"), timeout=15)
        assert not r.exists("pushd:topic:A") and r.smembers("pushd:nodes") == {"b"}


@pytest.mark.parametrize("end", ["shutdown while Redis stands still", "kill -9"])
def test_a_restart_on_this_host_removes_what_its_dead_predecessor_left_at_once(tmp_path, redis_server, end):
    r = redis_server.client()
    # a TTL far longer than the test: only the start-up check of host and pid can remove the old node
    slow = ("--heartbeat-interval", "5", "--heartbeat-ttl", "300", "--redis-timeout", "1", "--shutdown-timeout", "1")
    first = PushdProcess(tmp_path / "1", *slow, redis=redis_server.url).start()  # default node id: host:pid
    old = first.node_id
    first.client().subscribe("A")
    eventually(lambda: r.scard(f"pushd:node:{old}") == 1)
    if end == "kill -9":
        first.kill()
        assert "nodes" in left_behind(r, old) and "heartbeat" in left_behind(r, old)
    else:
        # What reaches Redis once it runs again depends on what the node managed to send before it gave up.
        shut_down_while_redis_stands_still(first, redis_server.pid)

    with PushdProcess(tmp_path / "2", *slow, redis=redis_server.url) as again:
        assert again.node_id != old
        # removed before the new node accepted its first connection
        assert left_behind(r, old) == {}
        assert not r.exists("pushd:topic:A") and r.smembers("pushd:nodes") == {again.node_id}
        assert json.loads(r.get(f"pushd:heartbeat:{again.node_id}"))["host"] == old.rpartition(":")[0]
