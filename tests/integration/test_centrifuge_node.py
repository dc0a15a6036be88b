"""Centrifugo's official JavaScript SDK (npm `centrifuge` 5.8.0) under Node.js against a real pushd node, and a plain
`ws` client speaking pushd's own protocol.

tests/js/centrifuge_client.mjs prints the SDK's events as JSON lines and takes commands on stdin; the test drives
the node (HTTP API, Redis, drops, restarts) and checks the events. Every wait is bounded, and no assertion is
about time.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Any, Self

from tests import js
from tests.integration.pushd_process import eventually
from tests.integration.sdk_node import SECRET, SdkNode, append_unpublished, forget_history, publish_in_redis, token

WAIT = 15.0


class Script:
    """A Node.js script from tests/js, its JSON-line events collected as they come."""

    def __init__(self, name: str, *args: str) -> None:
        js.node_modules()
        self.events: list[dict[str, Any]] = []
        self._arrived = threading.Condition()
        self.proc = subprocess.Popen([js.node(), str(js.HERE / name), *args], cwd=js.HERE, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "output", "line": line.rstrip("\n")}
            with self._arrived:
                self.events.append(event)
                self._arrived.notify_all()

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._arrived:
            return [event for event in self.events if event["event"] == kind]

    def wait(self, kind: str, count: int = 1) -> list[dict[str, Any]]:
        """The first `count` events of `kind`, waiting (bounded) for them."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.of(kind)) >= count, WAIT):
                raise AssertionError(f"no {count} {kind} events within {WAIT}s; events: {self.events}")
        return self.of(kind)[:count]

    def send(self, command: dict[str, Any] | str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((command if isinstance(command, str) else json.dumps(command)) + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sdk(node: SdkNode, **config: Any) -> Script:
    """The centrifuge SDK connecting to `node` (a token for alice unless `config` says otherwise)."""
    settings = {"url": node.centrifugo_url, "ca": str(node.cert), "token": token("alice"), "sub": "alice", **config}
    return Script("centrifuge_client.mjs", json.dumps(settings))


def publish(node: SdkNode, topic: str, data: object) -> None:
    status, reply = node.api("POST", "/api/publish", {"topic": topic, "data": data})
    assert status == 200, reply


def publications(client: Script) -> list[tuple[Any, Any]]:
    return [(event["data"], event.get("offset")) for event in client.of("publication")]


def receiving(node: SdkNode, channel: str, first: object) -> Script:
    """The SDK connected and subscribed to `channel`, which got `first` (offset 1) live."""
    client = sdk(node)
    client.wait("connected")
    client.send({"cmd": "subscribe", "channel": channel})
    client.wait("subscribed")
    publish(node, channel, first)
    client.wait("publication")
    return client


def test_connect_subscribe_receive_messages_broadcasts_history_and_presence(tmp_path, redis_server):
    r = redis_server.client()
    with SdkNode(tmp_path, redis_server.url) as node, sdk(node) as client:
        [connected] = client.wait("connected")
        assert connected["client"].startswith(node.node_id + ":")
        client.send({"cmd": "subscribe", "channel": "prices"})
        [subscribed] = client.wait("subscribed")
        assert (subscribed["recoverable"], subscribed["positioned"], subscribed["wasRecovering"]) == (True, True, False)
        assert subscribed["streamPosition"]["offset"] == 0 and subscribed["streamPosition"]["epoch"]

        publish(node, "prices", {"p": 1})
        eventually(lambda: r.publish("push:prices", '{\n  "p": 2\n}') == 1)  # newlines inside the JSON
        client.wait("publication", 2)
        assert publications(client) == [({"p": 1}, 1), ({"p": 2}, None)]

        status, _ = node.api("POST", "/api/broadcast", {"data": {"notice": "maintenance"}})
        assert status == 202
        status, _ = node.api("POST", "/api/users/alice/publish", {"data": {"for": "alice"}})
        assert status == 200
        client.wait("message", 2)
        assert sorted(json.dumps(m["data"]) for m in client.of("message")) == [
            '{"for": "alice"}', '{"notice": "maintenance"}']

        client.send({"cmd": "history", "channel": "prices", "limit": 10})
        [history] = client.wait("history")
        assert history["publications"] == [{"data": {"p": 1}, "offset": 1}]
        assert (history["offset"], history["epoch"]) == (1, subscribed["streamPosition"]["epoch"])
        client.send({"cmd": "presenceStats", "channel": "prices"})
        [stats] = client.wait("presenceStats")
        assert (stats["numClients"], stats["numUsers"]) == (1, 1)
        assert client.of("error") == [] and len(client.of("connecting")) == 1


def test_a_dropped_connection_reconnects_and_recovers_exactly_what_it_missed(tmp_path, redis_server):
    with SdkNode(tmp_path, redis_server.url) as node, receiving(node, "orders", 1) as client:
        [connected] = client.of("connected")
        client.send({"cmd": "hold"})
        status, _ = node.api("DELETE", f"/api/connections/{connected['client']}?code=4000&reason=moved")
        assert status == 200
        [_, dropped] = client.wait("connecting", 2)
        assert (dropped["code"], dropped["reason"]) == (4000, "moved")
        for n in (2, 3, 4):
            publish(node, "orders", n)
        client.send({"cmd": "release"})

        [_, again] = client.wait("subscribed", 2)
        assert (again["wasRecovering"], again["recovered"]) == (True, True)
        publish(node, "orders", 5)
        client.wait("publication", 5)
        assert publications(client) == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]

        # A message that reached history but not the node: the next one's offset jumps, the node unsubscribes
        # the SDK with 2500, and the SDK subscribes again and recovers it.
        assert append_unpublished(redis_server.client(), "orders", "6") == 6
        publish(node, "orders", 7)
        [*_, gap] = client.wait("subscribing", 3)
        assert gap["code"] == 2500
        [*_, recovered] = client.wait("subscribed", 3)
        assert (recovered["wasRecovering"], recovered["recovered"]) == (True, True)
        client.wait("publication", 7)
        assert publications(client)[5:] == [(6, 6), (7, 7)]


def test_a_restarted_node_lets_the_sdk_recover_and_lost_history_is_not_recovered(tmp_path, redis_server):
    r = redis_server.client()
    node = SdkNode(tmp_path, redis_server.url).start()
    with receiving(node, "ticks", "one") as client:
        client.send({"cmd": "hold"})
        node.stop()
        [_, shutdown] = client.wait("connecting", 2)
        assert shutdown["code"] == 3001
        assert publish_in_redis(r, "ticks", '"two"') == 2
        node = SdkNode(tmp_path, redis_server.url, port=node.port).start()
        client.send({"cmd": "release"})
        [_, again] = client.wait("subscribed", 2)
        assert (again["wasRecovering"], again["recovered"]) == (True, True)
        client.wait("publication", 2)

        client.send({"cmd": "hold"})
        node.stop()
        client.wait("connecting", 3)
        forget_history(r, "ticks")
        publish_in_redis(r, "ticks", '"lost"')
        node = SdkNode(tmp_path, redis_server.url, port=node.port).start()
        client.send({"cmd": "release"})
        [_, _, lost] = client.wait("subscribed", 3)
        assert (lost["wasRecovering"], lost["recovered"]) == (True, False)
        assert lost["streamPosition"]["epoch"] != again["streamPosition"]["epoch"]
        publish(node, "ticks", "live")
        client.wait("publication", 3)
        assert publications(client) == [("one", 1), ("two", 2), ("live", 2)]
    node.stop()


def test_an_expired_token_is_replaced_at_connect_and_refreshed_before_it_expires(tmp_path, redis_server):
    with SdkNode(tmp_path, redis_server.url, "--refresh-grace", "1") as node, \
            sdk(node, token=token("alice", ttl=-10), secret=SECRET, tokenTtls=[2, 3600]) as client:
        client.wait("connected")
        [expired] = client.wait("error")
        assert expired["code"] == 109
        client.send({"cmd": "subscribe", "channel": "news"})
        client.wait("subscribed")
        client.wait("token", 2)  # the refresh, before the 2-second token expired
        time.sleep(3)  # past that expiry and the node's refresh grace
        publish(node, "news", "still here")
        client.wait("publication")
        assert len(client.of("connected")) == 1 and client.of("disconnected") == []


def test_a_plain_ws_client_speaks_pushds_own_protocol_beside_the_sdk(tmp_path, redis_server):
    with SdkNode(tmp_path, redis_server.url) as node, receiving(node, "shared", "first") as client, \
            Script("ws_client.mjs", f"wss://localhost:{node.port}/ws", str(node.cert)) as own:
        own.wait("open")
        own.send({"op": "subscribe", "topics": ["shared"], "id": 1})
        [subscribed] = own.wait("frame")
        assert subscribed["frame"] == {"op": "subscribed", "topics": ["shared"], "id": 1}
        publish(node, "shared", {"both": True})
        [_, message] = own.wait("frame", 2)
        assert message["frame"]["topic"] == "shared" and message["frame"]["data"] == {"both": True}
        client.wait("publication", 2)
        assert publications(client)[1] == ({"both": True}, 2)
        own.send("{")
        [_, _, error] = own.wait("frame", 3)
        assert error["frame"]["code"] == "bad_request"
        node.stop()
        [closed] = own.wait("close")
        assert closed["code"] == 1001


def test_through_redis_outages_the_sdk_gets_every_acknowledged_publication_or_is_told(tmp_path, redis_server):
    """Redis cuts the node's subscription: what the API acknowledged arrives in order with consecutive offsets, and
    a channel without history gets 2500, so the SDK subscribes again by itself (where an app refetches). Then
    Redis is killed with -9 and restarted empty: the SDK is told (2500, then `recovered: false`)."""
    with SdkNode(tmp_path, redis_server.url, "--history-rules", "plain=0/0") as node, \
            receiving(node, "orders", 0) as client:
        client.send({"cmd": "subscribe", "channel": "plain"})
        client.wait("subscribed", 2)
        acknowledged = [0]

        def publish_while(condition: Any) -> None:
            n = acknowledged[-1]
            while condition():
                n += 1
                status, _ = node.api("POST", "/api/publish", {"topic": "orders", "data": n})
                if status == 200:
                    acknowledged.append(n)
                else:
                    assert status == 503

        redis_server.client().client_kill_filter(_type="pubsub")
        deadline = time.monotonic() + 3
        publish_while(lambda: time.monotonic() < deadline)
        assert len(acknowledged) > 1
        [*_, told] = client.wait("subscribing", 3)
        assert (told["channel"], told["code"]) == ("plain", 2500)
        client.wait("subscribed", 3)
        client.wait("publication", len(acknowledged))
        pubs = publications(client)
        assert [data for data, _ in pubs] == acknowledged
        assert [offset for _, offset in pubs] == list(range(1, len(acknowledged) + 1))

        # Redis comes back without the history: the epoch the SDK knows is gone, so the node unsubscribes it with
        # 2500 and the SDK subscribes again, told it did not recover; what is acknowledged after that arrives.
        subscribed_before = len(client.of("subscribed"))
        redis_server.kill()
        eventually(lambda: node.api("POST", "/api/publish", {"topic": "orders", "data": -1})[0] == 503)
        redis_server.start_again()
        eventually(lambda: any(e["channel"] == "orders" and e["code"] == 2500 for e in client.of("subscribing")),
                   timeout=15)
        client.wait("subscribed", subscribed_before + 2)  # both channels, once more
        orders = [e for e in client.of("subscribed") if e["channel"] == "orders"][-1]
        assert (orders["wasRecovering"], orders["recovered"]) == (True, False)
        before = len(acknowledged)
        deadline = time.monotonic() + 2
        publish_while(lambda: time.monotonic() < deadline)
        assert len(acknowledged) > before
        eventually(lambda: {e["data"] for e in client.of("publication")} >= set(acknowledged[before:]), timeout=15)
        assert [data for data, _ in publications(client)] == sorted({data for data, _ in publications(client)})
        assert client.of("unsubscribed") == []
