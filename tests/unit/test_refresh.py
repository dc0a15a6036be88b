"""A token refresh re-checks the connection's subscriptions: what the new token no longer allows is taken back.

Both protocols, in memory: the subscription leaves the hub (and the membership Redis keeps), the client is told
with an unsubscribe frame of its protocol, and the refresh is answered as before.
"""

import jwt

from pushd.auth import Permissions, TokenVerifier
from pushd.protocol import Limits
from pushd.session import AuthPolicy
from pushd.testing import MemoryNode, RecordingObserver
from pushd.wire import centrifugo
from tests.unit.test_wire_centrifugo import FakeHistory, connected, lines, position, pub, send

SECRET = "a-test-secret-of-32-bytes-length"
REASON = "token no longer allows these topics"


def token(sub="alice", exp=1000, **claims):
    return jwt.encode({"sub": sub, "exp": exp, **claims}, SECRET, algorithm="HS256")


def node_with(public=("*",), **kwargs):
    policy = AuthPolicy(mode="optional", verifier=TokenVerifier(secret=SECRET), permissions=Permissions(public))
    return MemoryNode(auth=policy, **kwargs)


def data(client):
    return [m for m in client.messages() if "topic" in m]


# -- pushd's own protocol ----------------------------------------------------------------------------------

def test_a_narrower_token_unsubscribes_what_it_no_longer_allows_and_tells_the_client():
    observer = RecordingObserver()
    node = node_with(observer=observer)
    client = node.connect(f"/ws?token={token(topics=['A', 'B', 'C'])}")
    client.request({"op": "subscribe", "topics": ["A", "B", "C"], "id": 1})
    assert client.request({"op": "auth", "token": token(exp=2000, topics=["A"]), "id": 2}) == [
        {"op": "unsubscribed", "topics": ["B", "C"], "reason": REASON},
        {"op": "authenticated", "user": "alice", "expires": 2000, "id": 2}]
    assert client.session.topics == {"A"}
    assert ("unsubscribed", client.conn_id, ("B", "C")) in observer.events
    node.publish("B", b"1")
    node.publish("A", b"2")
    assert client.messages() == [{"topic": "A", "data": 2}]


def test_a_refresh_that_allows_as_much_says_nothing_more():
    node = node_with()
    client = node.connect(f"/ws?token={token(topics=['A*'])}")
    client.request({"op": "subscribe", "topics": ["A1", "A2"]})
    assert client.request({"op": "auth", "token": token(exp=2000), "id": 2}) == [
        {"op": "authenticated", "user": "alice", "expires": 2000, "id": 2}]
    assert client.session.topics == {"A1", "A2"}


def test_patterns_are_kept_only_when_an_allowed_pattern_covers_them():
    node = node_with(limits=Limits(allow_patterns=True))
    client = node.connect(f"/ws?token={token()}")
    client.request({"op": "subscribe", "topics": ["sh600*", "sz*", "sh600519"]})
    [revoked, _] = client.request({"op": "auth", "token": token(exp=2000, topics=["sh*"]), "id": 2})
    assert revoked == {"op": "unsubscribed", "topics": ["sz*"], "reason": REASON}
    node.publish("sz000001", b"1")
    node.publish("sh600519", b"2")
    assert client.messages() == [{"topic": "sh600519", "data": 2}]
    # 'sh600?' covers 'sh600519' but not every topic 'sh600*' can match: the pattern goes, the topic stays.
    [revoked, _] = client.request({"op": "auth", "token": token(exp=3000, topics=["sh600?", "sh600519"]), "id": 3})
    assert revoked["topics"] == ["sh600*"] and client.session.topics == {"sh600519"}


def test_the_first_auth_of_an_anonymous_connection_checks_what_it_subscribed_to_as_public():
    node = node_with(public=("pub.*",))
    client = node.connect()
    client.request({"op": "subscribe", "topics": ["pub.news"]})
    [revoked, authenticated] = client.request({"op": "auth", "token": token(topics=["priv.*"]), "id": 1})
    assert revoked == {"op": "unsubscribed", "topics": ["pub.news"], "reason": REASON}
    assert authenticated["op"] == "authenticated" and client.session.topics == set()


def test_a_subscription_still_reading_its_history_is_taken_back_and_its_subscribe_refused():
    history = FakeHistory(A=[b"1", b"2"])
    history.hold = True
    node = node_with(history=history)
    client = node.connect(f"/ws?token={token()}")
    assert client.request({"op": "subscribe", "topics": ["A"], "last": True, "id": 1}) == [
        {"op": "subscribed", "topics": ["A"], "id": 1}]
    [revoked, _] = client.request({"op": "auth", "token": token(exp=2000, topics=["B"]), "id": 2})
    assert revoked["topics"] == ["A"]
    node.publish("A", b"3", position(3))
    history.release()
    assert client.messages() == [{"op": "error", "code": "forbidden", "message": REASON, "topics": ["A"], "id": 1}]
    node.publish("A", b"4", position(4))
    assert client.messages() == []


# -- Centrifugo's protocol --------------------------------------------------------------------------------------

def unsubscribe_push(channel):
    return {"push": {"channel": channel, "unsubscribe": {"code": centrifugo.REVOKED_CODE, "reason": REASON}}}


def test_a_centrifugo_refresh_with_fewer_channels_pushes_a_final_unsubscribe_for_each_one_taken_back():
    observer = RecordingObserver()
    node = node_with(observer=observer)
    client = connected(node, token=token(channels=["A", "B", "C"]))
    send(client, {"id": 2, "subscribe": {"channel": "A"}}, {"id": 3, "subscribe": {"channel": "B"}},
         {"id": 4, "subscribe": {"channel": "C"}})
    assert send(client, {"id": 5, "refresh": {"token": token(exp=2000, channels=["A"])}}) == [
        unsubscribe_push("B"), unsubscribe_push("C"),
        {"id": 5, "refresh": {"client": client.conn_id, "version": centrifugo.__version__, "expires": True,
                              "ttl": 2000}}]
    assert centrifugo.REVOKED_CODE < 2500  # the SDKs take codes below 2500 as final: no resubscribe
    assert ("unsubscribed", client.conn_id, ("B", "C")) in observer.events
    node.publish("B", b"1")
    node.publish("A", b"2")
    assert lines(client) == [pub("A", 2)]


def test_a_centrifugo_subscribe_still_recovering_is_answered_with_103_after_the_push():
    history = FakeHistory(A=[b"1", b"2"])
    history.hold = True
    node = node_with(history=history)
    client = connected(node, token=token())
    assert send(client, {"id": 2, "subscribe": {"channel": "A", "recover": True, "offset": 1, "epoch": "E"}}) == []
    [push, refreshed] = send(client, {"id": 3, "refresh": {"token": token(exp=2000, channels=["B"])}})
    assert push == unsubscribe_push("A") and refreshed["id"] == 3
    node.publish("A", b"3", position(3))
    history.release()
    assert lines(client) == [{"id": 2, "error": {"code": 103, "message": REASON}}]
    assert client.session.topics == set()
