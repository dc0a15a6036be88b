"""Centrifugo's official Python SDK (centrifuge-python) against a real pushd node and a real redis-server.

Each test runs one asyncio scenario: the SDK connects over wss with a token, subscribes, and the test publishes
through pushd's HTTP API and through Redis, drops connections and restarts the node, then checks what the SDK's
event handlers saw. Every wait is bounded, and no assertion is about time.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import centrifuge
import pytest

from tests.integration.sdk_node import SdkNode, append_unpublished, forget_history, publish_in_redis, token

WAIT = 15.0


@dataclass
class Events(centrifuge.ClientEventHandler, centrifuge.SubscriptionEventHandler):
    """Every client and subscription event, in order; `hold_reconnect` keeps a dropped client from reconnecting
    until the test lets it go (the SDK awaits on_connecting before it schedules the reconnect)."""

    seen: list[tuple[str, Any]] = field(default_factory=list)
    hold_reconnect: asyncio.Event | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def record(self, kind: str, ctx: Any) -> None:
        async with self._arrived:
            self.seen.append((kind, ctx))
            self._arrived.notify_all()

    async def on_connecting(self, ctx: Any) -> None:
        await self.record("connecting", ctx)
        if self.hold_reconnect is not None:
            await self.hold_reconnect.wait()

    def of(self, kind: str) -> list[Any]:
        return [ctx for seen, ctx in self.seen if seen == kind]

    async def wait(self, kind: str, count: int = 1) -> list[Any]:
        """The first `count` events of `kind` so far, waiting (bounded) for them to arrive."""
        async with self._arrived:
            try:
                await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.of(kind)) >= count), WAIT)
            except TimeoutError:
                raise AssertionError(f"no {count} {kind} events within {WAIT}s; events: {self.seen}") from None
        return self.of(kind)[:count]

    def publications(self) -> list[tuple[Any, int]]:
        return [(ctx.pub.data, ctx.pub.offset) for ctx in self.of("publication")]


def _recording(kind: str) -> Callable[[Events, Any], Awaitable[None]]:
    async def handler(self: Events, ctx: Any) -> None:
        await self.record(kind, ctx)
    return handler


for _kind in ("connected", "disconnected", "error", "subscribed", "subscribing", "unsubscribed", "publication"):
    setattr(Events, f"on_{_kind}", _recording(_kind))


def sdk_client(node: SdkNode, events: Events, **options: Any) -> Any:
    tls = ssl.create_default_context(cafile=node.cert)
    return centrifuge.Client(node.centrifugo_url, events=events, ssl_context=tls, proxy=None, timeout=5,
                             min_reconnect_delay=0.05, max_reconnect_delay=0.5, **options)


async def subscribed(client: Any, events: Events, channel: str) -> tuple[Any, Any]:
    """A subscription to `channel`, once the server confirmed it; returns it and the subscribed context."""
    count = len(events.of("subscribed"))
    sub = client.new_subscription(channel, events=events, min_resubscribe_delay=0.05, max_resubscribe_delay=0.5)
    await sub.subscribe()
    contexts = await events.wait("subscribed", count + 1)
    return sub, contexts[-1]


async def api(node: SdkNode, method: str, path: str, body: object = None) -> Any:
    status, reply = await asyncio.to_thread(node.api, method, path, body)
    assert 200 <= status < 300, (status, reply)
    return reply


async def publish(node: SdkNode, topic: str, data: object) -> None:
    """Publish through the HTTP API, with history (each topic's offsets go 1, 2, 3, ...)."""
    await api(node, "POST", "/api/publish", {"topic": topic, "data": data})


async def receiving(node: SdkNode, channel: str, first: object) -> tuple[Events, Any, Any, Any]:
    """A client connected with a token and subscribed to `channel`, which got `first` (offset 1) live; its
    reconnects wait for `events.hold_reconnect`. Returns the events, the client, and the connected and the
    subscribed contexts."""
    events = Events(hold_reconnect=asyncio.Event())
    events.hold_reconnect.set()
    client = sdk_client(node, events, token=token("alice"))
    await client.connect()
    [connected] = await events.wait("connected")
    _, subscribed_ctx = await subscribed(client, events, channel)
    await publish(node, channel, first)
    await events.wait("publication")
    return events, client, connected, subscribed_ctx


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_connect_subscribe_and_receive_from_the_api_redis_and_a_broadcast(tmp_path, redis_server):
    r = redis_server.client()

    async def scenario() -> None:
        events = Events()
        client = sdk_client(node, events, token=token("alice"))
        await client.connect()
        [connected] = await events.wait("connected")
        assert connected.client.startswith(node.node_id + ":")
        sub, ctx = await subscribed(client, events, "prices")
        assert (ctx.recoverable, ctx.positioned, ctx.was_recovering) == (True, True, False)
        assert ctx.stream_position.offset == 0 and ctx.stream_position.epoch

        await publish(node, "prices", {"p": 1})
        assert r.publish("push:prices", '{\n  "p": 2\n}') == 1  # pretty-printed: newlines inside the JSON
        await events.wait("publication", 2)
        status, broadcast = await asyncio.to_thread(node.api, "POST", "/api/broadcast", {"data": {"notice": 1}})
        assert status == 202
        await publish(node, "prices", {"p": 3})
        await events.wait("publication", 3)
        assert events.publications() == [({"p": 1}, 1), ({"p": 2}, 0), ({"p": 3}, 2)]
        report = await api(node, "GET", f"/api/broadcasts/{broadcast['id']}")
        assert report["nodes"][node.node_id]["sent"] == 1, report

        history = await sub.history(limit=10)
        assert [(p.data, p.offset) for p in history.publications] == [({"p": 1}, 1), ({"p": 3}, 2)]
        assert (history.offset, history.epoch) == (2, ctx.stream_position.epoch)
        position_only = await sub.history()
        assert (position_only.publications, position_only.offset) == ([], 2)

        stats = await sub.presence_stats()
        assert (stats.num_clients, stats.num_users) == (1, 1)
        with pytest.raises(centrifuge.ReplyError) as refused:
            await sub.publish({"from": "client"})
        assert refused.value.code == 103
        with pytest.raises(centrifuge.ReplyError) as unknown:
            await client.rpc("method", {})
        assert unknown.value.code == 104
        with pytest.raises(centrifuge.ReplyError) as unavailable:
            await sub.presence()
        assert unavailable.value.code == 108

        await sub.unsubscribe()
        await events.wait("unsubscribed")
        await publish(node, "prices", {"p": 4})
        await subscribed(client, events, "other")
        await publish(node, "other", "after")
        await events.wait("publication", 4)
        assert events.publications()[3:] == [("after", 1)]
        assert events.of("connecting") == [events.of("connecting")[0]]  # only the first connect
        await client.disconnect()

    with SdkNode(tmp_path, redis_server.url) as node:
        run(scenario)


def test_a_dropped_connection_reconnects_and_recovers_exactly_what_it_missed(tmp_path, redis_server):
    async def scenario() -> None:
        events, client, connected, _ = await receiving(node, "orders", 1)

        events.hold_reconnect.clear()
        await api(node, "DELETE", f"/api/connections/{connected.client}?code=4000&reason=moved")
        [_, dropped] = await events.wait("connecting", 2)
        assert (dropped.code, dropped.reason) == (4000, "moved")
        for n in (2, 3, 4):
            await publish(node, "orders", n)
        events.hold_reconnect.set()

        [_, again] = await events.wait("subscribed", 2)
        assert (again.was_recovering, again.recovered) == (True, True)
        await publish(node, "orders", 5)
        await events.wait("publication", 5)
        assert events.publications() == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]
        assert len(events.of("connected")) == 2
        await client.disconnect()

    with SdkNode(tmp_path, redis_server.url) as node:
        run(scenario)


def test_a_message_the_node_never_got_makes_the_sdk_subscribe_again_and_recover_it(tmp_path, redis_server):
    r = redis_server.client()

    async def scenario() -> None:
        events, client, _, _ = await receiving(node, "quotes", "one")
        assert append_unpublished(r, "quotes", '"missed"') == 2
        assert publish_in_redis(r, "quotes", '"three"') == 3
        [_, unsubscribed] = await events.wait("subscribing", 2)
        assert (unsubscribed.code, unsubscribed.reason) == (2500, "insufficient state")
        [_, again] = await events.wait("subscribed", 2)
        assert (again.was_recovering, again.recovered) == (True, True)
        await events.wait("publication", 3)
        assert events.publications() == [("one", 1), ("missed", 2), ("three", 3)]
        assert len(events.of("connected")) == 1
        await client.disconnect()

    with SdkNode(tmp_path, redis_server.url) as node:
        run(scenario)


def test_get_state_is_asked_again_when_the_position_it_gave_cannot_be_recovered(tmp_path, redis_server):
    r = redis_server.client()

    async def scenario() -> None:
        await publish(node, "doc", "v1")
        await publish(node, "doc", "v2")
        asked: list[Any] = []

        async def get_state(channel: str) -> Any:
            # First the app's cached state, from a history Redis has lost since; then what it reloads.
            asked.append(channel)
            if len(asked) == 1:
                return centrifuge.StreamPosition(offset=1, epoch="lost-epoch")
            epoch, seq = r.hmget("pushd:meta:doc", "epoch", "seq")
            return centrifuge.StreamPosition(offset=int(seq), epoch=epoch)

        events = Events()
        client = sdk_client(node, events, token=token("alice"))
        await client.connect()
        sub = client.new_subscription("doc", events=events, get_state=get_state, min_resubscribe_delay=0.05)
        await sub.subscribe()
        [ctx] = await events.wait("subscribed")
        assert asked == ["doc", "doc"]
        assert (ctx.was_recovering, ctx.recovered, ctx.stream_position.offset) == (True, True, 2)
        await publish(node, "doc", "v3")
        await events.wait("publication")
        assert events.publications() == [("v3", 3)] and events.of("error") == []
        await client.disconnect()

    with SdkNode(tmp_path, redis_server.url) as node:
        run(scenario)


def test_a_restarted_node_with_the_same_redis_lets_the_sdk_recover(tmp_path, redis_server):
    r = redis_server.client()
    node = SdkNode(tmp_path, redis_server.url).start()

    async def scenario() -> None:
        events, client, _, _ = await receiving(node, "ticks", "one")

        events.hold_reconnect.clear()
        await asyncio.to_thread(node.stop)
        [_, shutdown] = await events.wait("connecting", 2)
        assert shutdown.code == 3001
        assert publish_in_redis(r, "ticks", '"two"') == 2
        assert publish_in_redis(r, "ticks", '"three"') == 3
        restarted = await asyncio.to_thread(SdkNode(tmp_path, redis_server.url, port=node.port).start)
        events.hold_reconnect.set()

        [_, again] = await events.wait("subscribed", 2)
        assert (again.was_recovering, again.recovered) == (True, True)
        await publish(restarted, "ticks", "four")
        await events.wait("publication", 4)
        assert events.publications() == [("one", 1), ("two", 2), ("three", 3), ("four", 4)]
        await client.disconnect()
        await asyncio.to_thread(restarted.stop)

    run(scenario)


def test_history_lost_in_redis_is_reported_as_not_recovered(tmp_path, redis_server):
    r = redis_server.client()

    async def scenario() -> None:
        events, client, connected, first = await receiving(node, "orders", 1)

        events.hold_reconnect.clear()
        await api(node, "DELETE", f"/api/connections/{connected.client}?code=4000&reason=moved")
        await events.wait("connecting", 2)
        forget_history(r, "orders")
        await publish(node, "orders", "lost")
        events.hold_reconnect.set()

        [_, again] = await events.wait("subscribed", 2)
        assert (again.was_recovering, again.recovered) == (True, False)
        assert again.stream_position.epoch != first.stream_position.epoch
        assert again.stream_position.offset == 1
        await publish(node, "orders", "live")
        await events.wait("publication", 2)
        assert events.publications() == [(1, 1), ("live", 2)]
        await client.disconnect()

    with SdkNode(tmp_path, redis_server.url) as node:
        run(scenario)


def test_tokens_are_refreshed_through_get_token_and_an_expired_one_is_replaced_at_connect(tmp_path, redis_server):
    async def scenario() -> None:
        events = Events()

        async def get_token() -> str:
            issued = len(events.of("token"))
            await events.record("token", issued)
            # The first token is for connecting again and lives 2 seconds; the next one lives an hour.
            return token("alice", ttl=2 if issued == 0 else 3600)

        client = sdk_client(node, events, token=token("alice", ttl=-10), get_token=get_token)
        await client.connect()
        await events.wait("connected")
        # The server answered 109 to the expired token: the SDK asked for another and connected with it.
        assert [kind for kind, _ in events.seen][:3] == ["connecting", "error", "token"]
        assert events.of("error")[0].error.code == 109
        await subscribed(client, events, "news")
        await events.wait("token", 2)  # the refresh, before the 2-second token expired
        await asyncio.sleep(3)  # past that expiry and the node's refresh grace
        await publish(node, "news", "still here")
        await events.wait("publication")
        assert len(events.of("connected")) == 1 and events.of("disconnected") == []
        await client.disconnect()

    with SdkNode(tmp_path, redis_server.url, "--refresh-grace", "1") as node:
        run(scenario)


def test_a_forged_token_stops_the_sdk_and_required_auth_refuses_no_token(tmp_path, redis_server):
    async def scenario() -> None:
        forged = Events()
        client = sdk_client(node, forged, token="not.a.token")
        await client.connect()
        [gone] = await forged.wait("disconnected")
        assert gone.code == 3500
        anonymous = Events()
        client = sdk_client(node, anonymous)
        await client.connect()
        [refused] = await anonymous.wait("disconnected")
        assert refused.code == 3500
        assert anonymous.of("connected") == []

    with SdkNode(tmp_path, redis_server.url, "--auth", "required") as node:
        run(scenario)
