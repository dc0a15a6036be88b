"""The HTTP API against real nodes, a real redis-server and real wss:// clients: publish with history, last value
and recovery, messages to users, disconnects, and a broadcast to 2,000 connections over two nodes."""

from __future__ import annotations

import asyncio
import json
import ssl
import time

import jwt
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.integration.pushd_process import PushdProcess, eventually

KEY = "an-api-key-for-the-tests"
SECRET = "a-jwt-secret-for-the-tests-32-bytes"


def token(user: str, ttl: float = 600) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time() + ttl)}, SECRET, algorithm="HS256")


def test_publish_history_last_and_recovery_over_tls(tmp_path, redis_server):
    with PushdProcess(tmp_path, "--api-key", KEY, redis=redis_server.url, node_id="n1") as node:
        assert node.api("POST", "/api/publish", {"topic": "AAPL", "data": 1})[0] == 401
        assert node.api("POST", "/api/publish", {"topic": "AAPL", "data": 1}, key="wrong")[0] == 401

        live = node.client()
        live.subscribe("AAPL")
        status, first = node.api("POST", "/api/publish", {"topic": "AAPL", "data": {"price": 1}}, key=KEY)
        assert status == 200 and first["offset"] and first["epoch"]
        assert live.recv() == {"topic": "AAPL", "data": {"price": 1}, "offset": first["offset"],
                               "epoch": first["epoch"]}
        status, batch = node.api("POST", "/api/publish", {"messages": [
            {"topic": "AAPL", "data": {"price": 2}}, {"topic": "AAPL", "data": {"price": 3}}]}, key=KEY)
        assert status == 200 and [r["topic"] for r in batch["results"]] == ["AAPL", "AAPL"]
        assert [live.recv()["data"]["price"] for _ in range(2)] == [2, 3]

        newcomer = node.client()
        assert newcomer.request({"op": "subscribe", "topics": ["AAPL"], "last": True})["op"] == "subscribed"
        assert newcomer.recv()["data"] == {"price": 3}

        since = {"AAPL": {"offset": first["offset"], "epoch": first["epoch"]}}
        returning = node.client()
        assert returning.request({"op": "subscribe", "topics": ["AAPL"], "since": since})["op"] == "subscribed"
        assert [returning.recv()["data"]["price"] for _ in range(2)] == [2, 3]
        node.api("POST", "/api/publish", {"topic": "AAPL", "data": {"price": 4}}, key=KEY)
        assert returning.recv()["data"] == {"price": 4}

        stale = node.client()
        stale.request({"op": "subscribe", "topics": ["AAPL"], "id": 5,
                       "since": {"AAPL": {"offset": first["offset"], "epoch": "another-epoch"}}})
        failed = stale.recv()
        assert failed["code"] == "recovery_failed" and failed["topics"] == ["AAPL"] and failed["id"] == 5

        redis_server.client().publish("push:AAPL", '{"price":5}')
        assert returning.recv() == {"topic": "AAPL", "data": {"price": 5}}

        status, topics = node.api("GET", "/api/topics", key=KEY)
        assert status == 200 and topics["topics"]["AAPL"] == 4
        status, topic = node.api("GET", "/api/topics/AAPL", key=KEY)
        assert topic["nodes"] == {"n1": 4} and topic["subscribers"] == 4
        status, nodes = node.api("GET", "/api/nodes", key=KEY)
        assert [n["node"] for n in nodes["nodes"]] == ["n1"]


def test_users_and_disconnects_across_two_nodes(tmp_path, redis_server):
    auth = ("--jwt-secret", SECRET, "--auth", "required")
    with PushdProcess(tmp_path / "a", *auth, redis=redis_server.url, node_id="a") as node_a, \
            PushdProcess(tmp_path / "b", *auth, redis=redis_server.url, node_id="b") as node_b:
        on_a, on_b = node_a.client(), node_b.client()
        for client in (on_a, on_b):
            assert client.request({"op": "auth", "token": token("alice"), "id": 1})["user"] == "alice"
        bob = node_b.client()
        bob.request({"op": "auth", "token": token("bob")})

        status, reply = node_a.api("POST", "/api/users/alice/publish", {"data": {"hello": "alice"}})
        assert status == 200 and reply["nodes"] == 2
        assert on_a.recv() == on_b.recv() == {"op": "message", "data": {"hello": "alice"}}

        r = redis_server.client()
        eventually(lambda: r.scard("pushd:node:b") == 2)
        bob_id = max(r.smembers("pushd:node:b"), key=lambda c: int(c.rsplit(".", 1)[1]))
        assert node_a.api("DELETE", f"/api/connections/{bob_id}?code=4010&reason=bye")[0] == 200
        with pytest.raises(ConnectionClosed) as closed:
            bob.recv()
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4010, "bye")
        assert node_a.api("DELETE", f"/api/connections/{bob_id}")[0] == 404

        assert node_b.api("DELETE", "/api/users/alice/connections?code=4009&reason=banned")[0] == 200
        for client in (on_a, on_b):
            with pytest.raises(ConnectionClosed) as closed:
                client.recv()
            assert closed.value.rcvd.code == 4009


async def _open(url: str, cafile: str, count: int) -> list:
    context = ssl.create_default_context(cafile=cafile)
    gate = asyncio.Semaphore(32)

    async def one() -> object:
        async with gate:
            return await websockets.connect(url, ssl=context, server_hostname="localhost", open_timeout=30)

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def _receive_all(connections: list, seconds: float) -> list[list[dict]]:
    async def drain(ws: object) -> list[dict]:
        got = []
        try:
            while True:
                got.append(json.loads(await asyncio.wait_for(ws.recv(), seconds)))
        except TimeoutError:
            return got

    return list(await asyncio.gather(*(drain(ws) for ws in connections)))


def test_a_broadcast_reaches_2000_connections_on_two_nodes_exactly_once(tmp_path, redis_server):
    with PushdProcess(tmp_path / "a", redis=redis_server.url, node_id="a") as node_a, \
            PushdProcess(tmp_path / "b", redis=redis_server.url, node_id="b") as node_b:

        async def scenario() -> tuple[list[list[dict]], list[list[dict]], str]:
            urls = [n.url.replace("//localhost:", "//127.0.0.1:") for n in (node_a, node_b)]
            connections = await _open(urls[0], node_a.cert, 1000) + await _open(urls[1], node_b.cert, 1000)
            loop = asyncio.get_running_loop()
            status, first = await loop.run_in_executor(None, lambda: node_a.api(
                "POST", "/api/broadcast", {"data": {"notice": "maintenance"}, "key": "maintenance-2026-11-23"}))
            assert status == 202 and first["duplicate"] is False
            received = await _receive_all(connections, 5)
            status, repeat = await loop.run_in_executor(None, lambda: node_b.api(
                "POST", "/api/broadcast", {"data": {"notice": "again"}, "key": "maintenance-2026-11-23"}))
            assert status == 200 and repeat == {"id": first["id"], "duplicate": True}
            after = await _receive_all(connections, 1)
            await asyncio.gather(*(ws.close() for ws in connections))
            return received, after, first["id"]

        received, after, broadcast_id = asyncio.run(scenario())
        expected = {"op": "broadcast", "broadcast": broadcast_id, "data": {"notice": "maintenance"}}
        assert len(received) == 2000
        assert all(messages == [expected] for messages in received)
        assert all(messages == [] for messages in after)

        status = eventually(lambda: (s := node_b.api("GET", f"/api/broadcasts/{broadcast_id}")[1])
                            and s["state"] == "done" and s)
        assert status["totals"]["targeted"] == 2000 and status["totals"]["sent"] == 2000
        assert set(status["nodes"]) == {"a", "b"}
        assert {n["sent"] for n in status["nodes"].values()} == {1000}
        assert node_a.api("GET", "/api/broadcasts/unknown")[0] == 404
