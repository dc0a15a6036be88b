"""Hostile clients against a real node over raw sockets: senders that never read, requests that never end.

A client that does not read must cost the node about one high-water mark at most and be gone after a bounded
time, however much it sends; an upgrade request must be bounded before it is buffered. Every loop is bounded;
the only timing is the bounds themselves.
"""

from __future__ import annotations

import socket

import pytest

from tests.integration.hostile import (
    APP_PING,
    PING,
    PING_PAYLOAD,
    TEXT,
    address,
    endless_headers,
    flood,
    open_non_reader,
    request_head,
    rss_kib,
)
from tests.integration.pushd_process import PushdProcess, eventually, publish_until_delivered

#: Far more than a non-reader may make the node hold, so a node that keeps reading from it shows in its RSS.
HIGH_WATER_MARK = 32 << 20
NODE_ARGS = ("--heartbeat-interval", "1", "--high-water-mark", str(HIGH_WATER_MARK), "--ping-timeout", "3")


def pruned(node: PushdProcess) -> dict[str, int]:
    status, body = node.api("GET", "/api/nodes")
    assert status == 200, body
    [info] = body["nodes"]
    counts: dict[str, int] = info["pruned"]
    return counts


@pytest.mark.parametrize("opcode, payload", [(TEXT, APP_PING), (PING, PING_PAYLOAD)], ids=["op-ping", "ws-ping"])
def test_a_client_that_sends_but_never_reads_is_dropped_and_costs_less_than_a_high_water_mark(
        tmp_path, redis_server, opcode, payload):
    r = redis_server.client()
    with PushdProcess(tmp_path, *NODE_ARGS, redis=redis_server.url, tls=False) as node:
        other = node.client()
        other.subscribe("A")
        start = rss_kib(node.pid)
        sock = open_non_reader(node.url)
        try:
            # Each frame asks for a reply it never reads; the node must stop reading it, then drop it.
            assert flood(sock, opcode, payload, seconds=60) is not None, "never dropped"
        finally:
            sock.close()
        grown = rss_kib(node.pid) - start
        assert grown < HIGH_WATER_MARK // 1024 // 2, f"the node grew by {grown} KiB"
        eventually(lambda: pruned(node).get("slow_consumer") == 1)
        assert "ping_timeout" not in pruned(node)
        assert publish_until_delivered(other, r, "A", '{"n":1}')["data"] == {"n": 1}


def test_an_upgrade_request_whose_headers_never_end_gets_431_and_is_closed(tmp_path, redis_server):
    limit = 1 << 20
    with PushdProcess(tmp_path, redis=redis_server.url, tls=False) as node:
        answer, sent = endless_headers(node.url, limit)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert sent < limit
        # The node is still there for everyone else.
        node.client().subscribe("A")


def test_an_upgrade_request_that_stops_halfway_gets_408(tmp_path, redis_server):
    with PushdProcess(tmp_path, redis=redis_server.url, tls=False) as node:
        host, port, path = address(node.url)
        with socket.create_connection((host, port), timeout=15) as sock:
            sock.sendall(request_head(host, port, path))  # and never the blank line that ends it
            assert sock.recv(4096).startswith(b"HTTP/1.1 408 ")
