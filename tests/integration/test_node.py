"""A real pushd process, a real redis-server, real wss:// clients: delivery, Redis state, crashes, faults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from tests.integration.pushd_process import PushdProcess, eventually, publish_until_delivered


def conn_id(r, node: str, serial: int) -> str:
    """The id of the node's `serial`-th connection of this run: `<node>:<incarnation>.<serial>`."""
    return f"{node}:{json.loads(r.get(f'pushd:heartbeat:{node}'))['incarnation']}.{serial}"


def node_keys(r, prefix: str = "pushd:") -> dict:
    return {k: r.smembers(k) if r.type(k) == "set" else r.get(k) for k in r.keys(prefix + "*")}


def test_subscribe_publish_receive_and_clean_close(tmp_path, redis_server):
    r = redis_server.client()
    with PushdProcess(tmp_path, redis=redis_server.url, node_id="n1") as node:
        a, b = node.client(), node.client()
        assert a.request({"op": "subscribe", "topics": ["AAPL", "sh600519"], "id": 7}) == {
            "op": "subscribed", "topics": ["AAPL", "sh600519"], "id": 7}
        b.subscribe("AAPL")
        eventually(lambda: r.scard("pushd:topic:AAPL") == 2)
        assert r.smembers("pushd:topics") == {"AAPL", "sh600519"}
        first, second = conn_id(r, "n1", 1), conn_id(r, "n1", 2)
        assert r.smembers("pushd:node:n1") == {first, second}
        assert r.smembers(f"pushd:conn:{first}") == {"AAPL", "sh600519"}

        assert r.publish("push:AAPL", '{"price":172.5}') == 1
        assert a.recv() == {"topic": "AAPL", "data": {"price": 172.5}}
        assert b.recv() == {"topic": "AAPL", "data": {"price": 172.5}}
        r.publish("push:sh600519", "not json")
        assert a.recv() == {"topic": "sh600519", "data": "not json"}

        a.close()
        eventually(lambda: r.smembers("pushd:topics") == {"AAPL"})
        assert not r.exists(f"pushd:conn:{first}")
        assert r.smembers("pushd:node:n1") == {second}
        assert r.exists("pushd:heartbeat:n1")

        node.stop()
        with pytest.raises(ConnectionClosed) as closed:
            b.recv()
        assert closed.value.rcvd.code == 1001
    assert node_keys(r) == {}


def test_bad_input_over_tls_gets_errors_or_the_right_close_code(tmp_path, redis_server):
    with PushdProcess(tmp_path, "--max-frame-size", "1024", redis=redis_server.url) as node:
        client = node.client()
        assert client.request("{")["code"] == "bad_request"
        assert client.request({"op": "subscribe", "topics": ["bad topic"]})["code"] == "invalid_topic"
        assert client.request({"op": "ping", "id": 1}) == {"op": "pong", "id": 1}

        binary = node.client()
        binary.send(b"\x00\x01")
        with pytest.raises(ConnectionClosed) as closed:
            binary.recv()
        assert closed.value.rcvd.code == 1003

        big = node.client()
        big.send("x" * 5000)
        with pytest.raises(ConnectionClosed) as closed:
            big.recv()
        assert closed.value.rcvd.code == 1009
        assert client.request({"op": "ping", "id": 2}) == {"op": "pong", "id": 2}


def test_kill_9_then_restart_with_the_same_node_id_cleans_the_old_state(tmp_path, redis_server):
    r = redis_server.client()
    node = PushdProcess(tmp_path, redis=redis_server.url, node_id="crashy").start()
    for _ in range(3):
        node.client().subscribe("AAPL")
    eventually(lambda: r.scard("pushd:topic:AAPL") == 3)
    node.kill()
    assert r.scard("pushd:node:crashy") == 3

    with PushdProcess(tmp_path / "again", redis=redis_server.url, node_id="crashy"):
        # cleaned before the node accepted its first connection
        assert r.scard("pushd:node:crashy") == 0
        assert not r.exists("pushd:topic:AAPL")
        assert r.smembers("pushd:topics") == set()
        assert r.keys("pushd:conn:*") == []


def test_a_node_whose_heartbeat_expires_is_cleaned_by_another(tmp_path, redis_server):
    r = redis_server.client()
    beat = ["--heartbeat-interval", "1", "--heartbeat-ttl", "2"]
    with PushdProcess(tmp_path / "a", *beat, redis=redis_server.url, node_id="a"):
        b = PushdProcess(tmp_path / "b", *beat, redis=redis_server.url, node_id="b").start()
        b.client().subscribe("MSFT")
        eventually(lambda: r.scard("pushd:node:b") == 1)
        b.kill()
        eventually(lambda: not r.exists("pushd:node:b") and not r.exists("pushd:topic:MSFT"), timeout=15)
        assert r.smembers("pushd:nodes") == {"a"}
        assert r.smembers("pushd:topics") == set()


def test_redis_restart_mid_run_delivery_resumes_without_reconnects(tmp_path, redis_server):
    with PushdProcess(tmp_path, redis=redis_server.url, node_id="n1") as node:
        client = node.client()
        client.subscribe("AAPL")
        redis_server.restart()
        r = redis_server.client()
        node.wait_for("listening for Redis messages", timeout=30)

        assert publish_until_delivered(client, r, "AAPL", '{"n":1}') == {"topic": "AAPL", "data": {"n": 1}}
        # the node rewrote its membership into the empty Redis
        eventually(lambda: r.exists("pushd:heartbeat:n1") and r.smembers("pushd:topic:AAPL") == {conn_id(r, "n1", 1)})
        assert client.request({"op": "ping", "id": 5}) == {"op": "pong", "id": 5}


def test_hooks_module_authorizes_and_rewrites(tmp_path, redis_server):
    examples = str(Path(__file__).resolve().parents[2] / "docs" / "examples")
    r = redis_server.client()
    with PushdProcess(tmp_path, "--hooks", "pushd_hooks_example", redis=redis_server.url,
                      pythonpath=(examples,)) as node:
        client = node.client()
        client.subscribe("AAPL")
        refused = client.request({"op": "subscribe", "topics": ["admin.panel"], "id": 3})
        assert refused["code"] == "forbidden" and refused["id"] == 3
        r.publish("push:AAPL", '{"internal":true}')
        r.publish("push:AAPL", '{"price":1}')
        message = client.recv()
        assert message["data"]["price"] == 1 and "ts" in message["data"]


def test_a_client_that_stops_reading_is_dropped_and_the_others_keep_up(tmp_path, redis_server):
    r = redis_server.client()
    beat = ["--heartbeat-interval", "1", "--heartbeat-ttl", "3", "--high-water-mark", "65536"]
    with PushdProcess(tmp_path, *beat, redis=redis_server.url, node_id="n1") as node:
        fast, slow = node.client(), node.client()
        fast.subscribe("A")
        slow.subscribe("A")  # from here on, `slow` never reads: its queue, then its socket, fill up
        payload = json.dumps({"blob": "x" * 40_000})
        for n in range(400):
            r.publish("push:A", payload)
            assert fast.recv()["topic"] == "A", n

        def dropped():
            heartbeat = r.get("pushd:heartbeat:n1")
            return heartbeat and json.loads(heartbeat)["pruned"].get("slow_consumer") == 1

        eventually(dropped, timeout=15)
        assert r.smembers("pushd:topic:A") == {conn_id(r, "n1", 1)}
