"""pushd's own protocol (docs/protocol.md) in a real Chromium: `new WebSocket("wss://localhost:PORT/ws")` from a page
served over HTTP, on the certificate pushd generates, with a client that reconnects and resumes with `since`
(pages/pushd-client.js).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser.harness import OpenPage, Seen, SharedNode, disconnect, publish, token
from tests.integration.pushd_process import PushdProcess
from tests.redis_server import RedisServer


def open_client(open_page: OpenPage, url: str, topic: str) -> tuple[Any, Seen]:
    """A page whose PushdClient is connected to `url` and subscribed to `topic`."""
    page, seen = open_page("native.html")
    page.evaluate("url => { window.client = new PushdClient(url); client.connect(); }", url)
    seen.expect({"type": "open"})
    page.evaluate("topic => client.subscribe([topic], {id: 1})", topic)
    seen.expect({"type": "frame", "frame": {"op": "subscribed", "topics": [topic], "id": 1}})
    return page, seen


def messages(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The topic messages among a page's events, in the order it got them."""
    return [event["frame"] for event in events if event["type"] == "frame" and "topic" in event["frame"]]


def drop(shared: SharedNode, topic: str, reason: str) -> None:
    """Close the one connection subscribed to `topic` from the server's side, with code 4000."""
    (conn_id,) = shared.redis.client().smembers(f"pushd:topic:{topic}")
    disconnect(shared.node, conn_id, 4000, reason)


def test_receives_api_redis_and_broadcast_messages(shared: SharedNode, open_page: OpenPage) -> None:
    node, topic = shared.node, "native.AAPL"
    _, seen = open_client(open_page, node.url, topic)

    sent = publish(node, topic, {"price": 172.5})
    assert seen.expect({"type": "frame", "frame": {"topic": topic}})["frame"] == sent

    shared.redis.client().publish(f"push:{topic}", '{"price":173}')
    assert seen.expect({"type": "frame", "frame": {"topic": topic}})["frame"] == {"topic": topic,
                                                                                  "data": {"price": 173}}

    status, broadcast = node.api("POST", "/api/broadcast", {"data": "maintenance at 22:00"})
    assert status == 202, broadcast
    assert seen.expect({"type": "frame", "frame": {"op": "broadcast"}})["frame"] == {
        "op": "broadcast", "broadcast": broadcast["id"], "data": "maintenance at 22:00"}


def test_a_refused_url_token_closes_with_4001(shared: SharedNode, open_page: OpenPage) -> None:
    page, seen = open_page("native.html")
    page.evaluate("url => { window.client = new PushdClient(url); client.connect(); }",
                  f"{shared.node.url}?token={token('alice', -60)}")
    close = seen.expect({"type": "close"})
    assert (close["code"], close["clean"]) == (4001, True), close


def test_close_codes_of_an_api_disconnect_and_a_refused_token(shared: SharedNode, open_page: OpenPage) -> None:
    node, topic = shared.node, "native.closed"
    page, seen = open_client(open_page, node.url, topic)
    drop(shared, topic, "moved to another node")
    assert seen.expect({"type": "close"}) == {"type": "close", "code": 4000, "reason": "moved to another node",
                                              "clean": True}
    seen.expect({"type": "frame", "frame": {"op": "subscribed", "id": "resubscribe"}})

    page.evaluate("token => client.send({op: 'auth', token: token, id: 2})", token("alice", -60))
    close = seen.expect({"type": "close"})
    assert (close["code"], close["clean"]) == (4001, True) and "expired" in close["reason"], close


def test_reconnects_after_a_dropped_connection_and_gets_exactly_what_it_missed(shared: SharedNode,
                                                                              open_page: OpenPage) -> None:
    node = shared.node
    page, seen = open_client(open_page, node.url, "orders.42")
    seen.expect({"type": "frame", "frame": publish(node, "orders.42", {"n": 1})})

    page.evaluate("client.hold()")
    drop(shared, "orders.42", "dropped")
    seen.expect({"type": "close", "code": 4000})
    missed = [publish(node, "orders.42", {"n": n}) for n in (2, 3, 4)]

    page.evaluate("client.resume()")
    seen.expect({"type": "frame", "frame": {"op": "subscribed", "topics": ["orders.42"], "id": "resubscribe"}})
    live = publish(node, "orders.42", {"n": 5})
    events = seen.until({"type": "frame", "frame": live})
    assert messages(events) == [*missed, live]
    assert not [event for event in events if event["type"] == "frame" and event["frame"].get("op") == "error"]


def test_a_node_stop_closes_with_1001_and_the_client_reconnects_to_the_restarted_node(
        start_node: Callable[..., PushdProcess], open_page: OpenPage, redis_server: RedisServer) -> None:
    node = start_node()
    _, seen = open_client(open_page, node.url, "AAPL")
    seen.expect({"type": "frame", "frame": publish(node, "AAPL", {"price": 1})})

    node.stop()
    close = seen.expect({"type": "close"})
    assert (close["code"], close["clean"]) == (1001, True), close
    # The client keeps trying while no node listens; each attempt fails without a handshake.
    seen.expect({"type": "close", "code": 1006})
    restarted = start_node(port=urllib.parse.urlsplit(node.url).port)
    assert restarted.url == node.url

    seen.expect({"type": "open"}, timeout=15)
    seen.expect({"type": "frame", "frame": {"op": "subscribed", "topics": ["AAPL"], "id": "resubscribe"}})
    after = publish(restarted, "AAPL", {"price": 2})
    redis_server.client().publish("push:AAPL", '{"price":3}')
    events = seen.until({"type": "frame", "frame": {"data": {"price": 3}}})
    assert messages(events) == [after, {"topic": "AAPL", "data": {"price": 3}}]
    assert after["epoch"] == messages(events)[0]["epoch"]
    assert not [event for event in events if event["type"] == "frame" and event["frame"].get("op") == "error"]


@pytest.mark.parametrize("loss", ["trimmed", "deleted"])
def test_a_recovery_that_history_cannot_serve_is_reported(loss: str, shared: SharedNode,
                                                          open_page: OpenPage) -> None:
    node, topic = shared.node, f"native.{loss}"
    page, seen = open_client(open_page, node.url, topic)
    first = publish(node, topic, {"price": 1})
    seen.expect({"type": "frame", "frame": first})

    page.evaluate("client.hold()")
    drop(shared, topic, "dropped")
    seen.expect({"type": "close", "code": 4000})
    publish(node, topic, {"price": 2})
    redis = shared.redis.client()
    if loss == "trimmed":
        publish(node, topic, {"price": 3})
        redis.xtrim(f"pushd:history:{topic}", maxlen=1, approximate=False)
    else:
        redis.delete(f"pushd:history:{topic}", f"pushd:meta:{topic}")

    page.evaluate("client.resume()")
    error = seen.expect({"type": "frame", "frame": {"op": "error"}})["frame"]
    assert (error["code"], error["topics"], error["id"]) == ("recovery_failed", [topic], "resubscribe"), error
    live = publish(node, topic, {"price": 4})
    assert messages(seen.until({"type": "frame", "frame": live}))[-1] == live


def test_a_certificate_chromium_was_not_told_of_is_refused(tmp_path: Path, open_page: OpenPage) -> None:
    """Chromium trusts the one key it was given, not every self-signed certificate: checks stay on."""
    stranger = PushdProcess(tmp_path / "stranger").start()  # with a certificate of its own, a new key
    page, seen = open_page("native.html")
    page.evaluate("url => { window.client = new PushdClient(url); client.hold(); client.connect(); }", stranger.url)
    assert seen.expect({"type": "close"}) == {"type": "close", "code": 1006, "reason": "", "clean": False}
    stranger.wait_for("SSL error: tls alert certificate unknown")


def test_a_page_of_an_origin_the_node_does_not_allow_is_refused(tmp_path: Path, certificate: tuple[str, str],
                                                                 open_page: OpenPage) -> None:
    """Same-host by default (docs/security.md): the test pages' origin, http://127.0.0.1:PORT, is another host
    than the node's wss://localhost, so a node that does not name it refuses the handshake with 403."""
    key, cert = certificate
    node = PushdProcess(tmp_path / "same-host", "--listen", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
                        listen=False).start()
    page, seen = open_page("native.html")
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    page.evaluate("url => { window.client = new PushdClient(url); client.hold(); client.connect(); }", node.url)
    assert seen.expect({"type": "close"}) == {"type": "close", "code": 1006, "reason": "", "clean": False}
    assert any("403" in text for text in console), console
