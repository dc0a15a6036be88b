"""A token refresh that allows fewer topics ends the subscriptions it no longer allows, on a real node.

The client holds A and B, refreshes with a token allowing only A, and is told B is gone; a publish to B through
the HTTP API no longer reaches it, while A still does. Once with Centrifugo's official JavaScript SDK (which
refreshes by itself through getToken before its token expires), once with a plain client of pushd's protocol.
"""

from __future__ import annotations

from tests.integration.pushd_process import eventually
from tests.integration.sdk_node import SECRET, SdkNode, token
from tests.integration.test_centrifuge_node import publications, publish, sdk


def subscribers(node: SdkNode, topic: str) -> int:
    """How many connections Redis membership has on `topic` (`GET /api/topics/<topic>`)."""
    status, reply = node.api("GET", f"/api/topics/{topic}")
    assert status == 200, reply
    return int(reply["subscribers"])


def membership_follows(node: SdkNode) -> None:
    """The taken-back topic left the membership Redis keeps; the other did not."""
    eventually(lambda: (subscribers(node, "A"), subscribers(node, "B")) == (1, 0))


def test_the_sdk_refreshing_to_fewer_channels_is_unsubscribed_from_the_others_for_good(tmp_path, redis_server):
    with SdkNode(tmp_path, redis_server.url) as node, \
            sdk(node, token=token("alice", ttl=3, channels=["A", "B"]), secret=SECRET, tokenTtls=[3600],
                tokenChannels=[["A"]]) as client:
        client.wait("connected")
        client.send({"cmd": "subscribe", "channel": "A"})
        client.send({"cmd": "subscribe", "channel": "B"})
        client.wait("subscribed", 2)
        client.wait("token")  # the refresh, before the 3-second token expires
        [revoked] = client.wait("unsubscribed")
        assert revoked == {"event": "unsubscribed", "channel": "B", "code": 2000,
                           "reason": "token no longer allows these topics"}
        publish(node, "B", "not for you")
        publish(node, "A", "still yours")
        client.wait("publication")
        assert publications(client) == [("still yours", 1)]
        # Final: the SDK neither subscribed again nor lost its connection.
        assert len(client.of("subscribing")) == len(client.of("subscribed")) == 2
        assert len(client.of("connected")) == 1 and client.of("disconnected") == []
        membership_follows(node)


def test_a_native_client_refreshing_to_fewer_topics_is_told_and_no_longer_gets_them(tmp_path, redis_server):
    with SdkNode(tmp_path, redis_server.url) as node:
        client = node.client()
        try:
            assert client.request({"op": "auth", "token": token("alice", topics=["A", "B"]), "id": 1})["id"] == 1
            client.subscribe("A", "B")
            assert client.request({"op": "auth", "token": token("alice", topics=["A"]), "id": 2}) == {
                "op": "unsubscribed", "topics": ["B"], "reason": "token no longer allows these topics"}
            authenticated = client.recv()
            assert (authenticated["op"], authenticated["id"]) == ("authenticated", 2)
            publish(node, "B", "not for you")
            publish(node, "A", "still yours")
            message = client.recv()
            assert (message["topic"], message["data"]) == ("A", "still yours")
            membership_follows(node)
        finally:
            client.close()
