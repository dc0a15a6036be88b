"""The official `centrifuge` SDK (5.8, from tests/js) in a real Chromium against `wss://localhost:PORT/connection/websocket`:
what an application using it sees (pages/centrifuge-client.js), through drops, restarts, lost history and token
refreshes.

To make the SDK miss publications, the browser context goes offline (Playwright's network emulation): Chromium
drops the open WebSocket and fails new ones, as when a phone loses its network, until the context is online again
and the page gets the `online` event, on which the SDK reconnects at once.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest

from tests.browser.harness import OpenPage, Seen, SharedNode, disconnect, publish
from tests.integration.pushd_process import PushdProcess

pytestmark = pytest.mark.usefixtures("centrifuge_bundle")


def sdk_url(node: PushdProcess) -> str:
    return node.url.removesuffix("/ws") + "/connection/websocket"


def open_sdk(open_page: OpenPage, node: PushdProcess, channel: str) -> tuple[Any, Seen, str]:
    """A page whose anonymous Centrifuge client is connected and subscribed to `channel`; also its client id."""
    page, seen = open_page("centrifuge.html")
    page.evaluate("url => startCentrifuge(url)", sdk_url(node))
    client = seen.expect({"type": "connected"})["client"]
    page.evaluate("channel => subscribeChannel(channel)", channel)
    subscribed = seen.expect({"type": "subscribed", "channel": channel})
    assert (subscribed["recoverable"], subscribed["positioned"], subscribed["wasRecovering"]) == (True, True, False)
    return page, seen, client


def publications(events: list[dict[str, Any]]) -> list[tuple[Any, int | None]]:
    """(data, offset) of the publications among a page's events, in the order the SDK gave them."""
    return [(event["data"], event["offset"]) for event in events if event["type"] == "publication"]


def test_connects_subscribes_and_receives_api_redis_and_broadcast_messages(shared: SharedNode,
                                                                          open_page: OpenPage) -> None:
    node, channel = shared.node, "sdk.AAPL"
    _, seen, client = open_sdk(open_page, node, channel)
    assert client.startswith(node.node_id + ":")

    publish(node, channel, {"price": 172.5})
    assert publications([seen.expect({"type": "publication"})]) == [({"price": 172.5}, 1)]
    shared.redis.client().publish(f"push:{channel}", '{"price":173}')
    assert publications([seen.expect({"type": "publication"})]) == [({"price": 173}, None)]
    status, body = node.api("POST", "/api/broadcast", {"data": "maintenance at 22:00"})
    assert status == 202, body
    assert seen.expect({"type": "message"})["data"] == "maintenance at 22:00"


def test_recovers_exactly_the_missed_publications_after_a_dropped_connection(shared: SharedNode,
                                                                           open_page: OpenPage) -> None:
    node = shared.node
    page, seen, client = open_sdk(open_page, node, "sdk.orders.42")
    publish(node, "sdk.orders.42", {"n": 1})
    seen.expect({"type": "publication", "offset": 1})

    disconnect(node, client, 4000, "dropped")
    assert seen.expect({"type": "connecting"})["code"] == 4000
    assert seen.expect({"type": "connected"})["client"] != client
    events = seen.until({"type": "subscribed", "channel": "sdk.orders.42"})
    assert (events[-1]["wasRecovering"], events[-1]["recovered"]) == (True, True), events[-1]
    assert publications(events) == []

    page.context.set_offline(True)
    seen.expect({"type": "connecting", "reason": "transport closed"})
    for n in (2, 3, 4):
        publish(node, "sdk.orders.42", {"n": n})
    page.context.set_offline(False)

    events = seen.until({"type": "subscribed", "channel": "sdk.orders.42"})
    assert (events[-1]["wasRecovering"], events[-1]["recovered"]) == (True, True), events[-1]
    publish(node, "sdk.orders.42", {"n": 5})
    events = seen.until({"type": "publication", "offset": 5})
    assert publications(events) == [({"n": 2}, 2), ({"n": 3}, 3), ({"n": 4}, 4), ({"n": 5}, 5)]


def test_reconnects_after_a_node_restart_and_recovers_from_the_external_redis(
        start_node: Callable[..., PushdProcess], open_page: OpenPage) -> None:
    node = start_node()
    page, seen, _ = open_sdk(open_page, node, "AAPL")
    publish(node, "AAPL", {"price": 1})
    seen.expect({"type": "publication", "offset": 1})

    node.stop()
    assert seen.expect({"type": "connecting"})["code"] == 3001  # shutdown: reconnect
    page.context.set_offline(True)
    restarted = start_node(port=urllib.parse.urlsplit(node.url).port)
    publish(restarted, "AAPL", {"price": 2})
    publish(restarted, "AAPL", {"price": 3})
    page.context.set_offline(False)

    connected = seen.expect({"type": "connected"}, timeout=15)
    assert connected["client"].startswith(restarted.node_id + ":")
    subscribed = seen.expect({"type": "subscribed", "channel": "AAPL"})
    assert (subscribed["wasRecovering"], subscribed["recovered"]) == (True, True), subscribed
    events = seen.until({"type": "publication", "offset": 3})
    assert publications(events) == [({"price": 2}, 2), ({"price": 3}, 3)]


@pytest.mark.parametrize("loss", ["trimmed", "deleted"])
def test_is_told_when_the_history_it_missed_is_gone(loss: str, shared: SharedNode, open_page: OpenPage) -> None:
    node, channel, redis = shared.node, f"sdk.{loss}", shared.redis.client()
    page, seen, _ = open_sdk(open_page, node, channel)
    publish(node, channel, {"price": 1})
    before = seen.expect({"type": "publication", "offset": 1})
    epoch = redis.hget(f"pushd:meta:{channel}", "epoch")

    page.context.set_offline(True)
    seen.expect({"type": "connecting", "reason": "transport closed"})
    publish(node, channel, {"price": 2})
    if loss == "trimmed":
        publish(node, channel, {"price": 3})
        redis.xtrim(f"pushd:history:{channel}", maxlen=1, approximate=False)
    else:
        redis.delete(f"pushd:history:{channel}", f"pushd:meta:{channel}")
        publish(node, channel, {"price": 3})  # a new history, with a new epoch
    page.context.set_offline(False)

    events = seen.until({"type": "subscribed", "channel": channel})
    subscribed = events[-1]
    assert (subscribed["wasRecovering"], subscribed["recovered"]) == (True, False), subscribed
    assert publications(events) == []
    position = subscribed["streamPosition"]
    if loss == "trimmed":
        assert position == {"offset": 3, "epoch": epoch}
    else:
        assert position["epoch"] != epoch and position["offset"] == 1, position
    live = publish(node, channel, {"price": 4})
    assert publications([seen.expect({"type": "publication"})]) == [(live["data"], position["offset"] + 1)]
    assert before["offset"] == 1


def test_refreshes_its_token_with_get_token_and_outlives_the_first_one(start_node: Callable[..., PushdProcess],
                                                                       open_page: OpenPage) -> None:
    grace = 1
    node = start_node("--auth", "required", "--refresh-grace", str(grace))
    page, seen = open_page("centrifuge.html")
    page.evaluate("([url, user, ttl]) => startCentrifuge(url, user, ttl)", [sdk_url(node), "alice", 2])
    first = seen.expect({"type": "token"})
    seen.expect({"type": "connected"})
    page.evaluate("subscribeChannel('AAPL')")
    seen.expect({"type": "subscribed", "channel": "AAPL"})

    # Past the first token's expiry and the grace pushd gives: without a refresh the node has closed by now.
    page.wait_for_function("deadline => Date.now() / 1000 > deadline", arg=first["exp"] + grace + 0.5, timeout=10_000)
    publish(node, "AAPL", {"price": 1})
    events = seen.until({"type": "publication", "offset": 1})
    assert [event for event in events if event["type"] in ("connected", "disconnected", "connecting")] == []
    assert [event["type"] for event in events].count("token") >= 1
    refreshes = [reply["refresh"] for reply in seen.received() if "refresh" in reply]
    assert refreshes and all(reply["expires"] is True and reply["ttl"] >= 1 for reply in refreshes), seen.frames
