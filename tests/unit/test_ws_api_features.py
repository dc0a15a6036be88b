"""Client sessions in memory for the API issue: tokens, permissions, recovery, last value, users, disconnects."""

import jwt
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from pushd.auth import Permissions, TokenVerifier
from pushd.protocol import Limits
from pushd.recovery import OffsetSince, Position
from pushd.redis.history import RecoveryFailed, Replay
from pushd.session import AuthPolicy
from pushd.testing import OP_CLOSE, MemoryNode
from pushd.ws import NATIVE

SECRET = "a-test-secret-of-32-bytes-length"


def token(sub="alice", exp=1000, **claims):
    return jwt.encode({"sub": sub, "exp": exp, **claims}, SECRET, algorithm="HS256")


def node_with(mode, public=("*",), **kwargs):
    policy = AuthPolicy(mode=mode, verifier=TokenVerifier(secret=SECRET), permissions=Permissions(public),
                        auth_timeout=10, refresh_grace=30)
    return MemoryNode(auth=policy, **kwargs)


def closes(client):
    return [(f.close_code, f.payload[2:].decode()) for f in client.frames() if f.opcode == OP_CLOSE]


# -- tokens -------------------------------------------------------------------------------------------------

def test_token_in_the_url_identifies_the_user():
    node = node_with("required")
    client = node.connect(f"/ws?token={token()}")
    assert client.status == 101
    assert node.hub.user_connections("alice") == (client.session,)
    assert client.request({"op": "subscribe", "topics": ["A"]}) == [{"op": "subscribed", "topics": ["A"]}]


def test_a_bad_token_in_the_url_closes_with_4001():
    node = node_with("optional")
    client = node.connect("/ws?token=not.a.token")
    [(code, reason)] = closes(client)
    assert code == 4001 and reason
    assert len(node.hub) == 0


def test_an_expired_token_closes_with_4001():
    node = node_with("optional")
    node.clock.advance(2000)
    client = node.connect(f"/ws?token={token(exp=1000)}")
    [(code, reason)] = closes(client)
    assert code == 4001 and "expired" in reason


def test_auth_frame_then_refresh_before_the_grace_period_ends():
    node = node_with("required")
    client = node.connect()
    assert client.request({"op": "subscribe", "topics": ["A"], "id": 1})[0]["code"] == "unauthorized"
    assert client.request({"op": "auth", "token": token(exp=100), "id": 2}) == [
        {"op": "authenticated", "user": "alice", "expires": 100, "id": 2}]
    node.clock.advance(100)
    assert client.messages() == [{"op": "refresh"}]
    node.clock.advance(29)
    assert client.request({"op": "auth", "token": token(exp=500)})[0]["op"] == "authenticated"
    node.clock.advance(10)
    assert not client.closed
    node.clock.advance(400)
    assert client.messages() == [{"op": "refresh"}]
    node.clock.advance(30)
    [(code, _)] = closes(client)
    assert code == 4002
    assert node.hub.pruned["token_expired"] == 1


def test_a_token_for_another_user_closes_with_4001():
    node = node_with("optional")
    client = node.connect(f"/ws?token={token('alice')}")
    client.send({"op": "auth", "token": token("mallory")})
    [(code, reason)] = closes(client)
    assert code == 4001 and "another user" in reason


def test_required_auth_closes_silent_connections_with_4003():
    node = node_with("required")
    client = node.connect()
    node.clock.advance(10)
    [(code, _)] = closes(client)
    assert code == 4003


def test_auth_off_ignores_url_tokens_and_refuses_auth_frames():
    node = MemoryNode()
    client = node.connect("/ws?token=garbage")
    assert client.status == 101 and not client.closed
    [reply] = client.request({"op": "auth", "token": "x", "id": 3})
    assert reply["code"] == "bad_request" and reply["id"] == 3


def test_anonymous_connections_are_held_to_public_topics_and_tokens_to_their_claim():
    node = node_with("optional", public=("news.*",), limits=Limits(allow_patterns=True))
    anonymous = node.connect()
    assert anonymous.request({"op": "subscribe", "topics": ["news.eu"]})[0]["op"] == "subscribed"
    [refused] = anonymous.request({"op": "subscribe", "topics": ["news.us", "orders.1"], "id": 4})
    assert refused["code"] == "forbidden" and refused["topics"] == ["orders.1"]
    user = node.connect(f"/ws?token={token(topics=['sh600*'])}")
    assert user.request({"op": "subscribe", "topics": ["sh600519", "sh600*"]})[0]["op"] == "subscribed"
    [refused] = user.request({"op": "subscribe", "topics": ["sh*"]})
    assert refused["code"] == "forbidden"
    unrestricted = node.connect(f"/ws?token={token('bob')}")
    assert unrestricted.request({"op": "subscribe", "topics": ["orders.1"]})[0]["op"] == "subscribed"


def test_patterns_are_refused_unless_allowed():
    node = MemoryNode()
    client = node.connect()
    [reply] = client.request({"op": "subscribe", "topics": ["sh600*"]})
    assert reply["code"] == "invalid_topic" and "off" in reply["message"]


# -- history: since and last ----------------------------------------------------------------------------------

class FakeHistory:
    def __init__(self):
        self.reads = []

    def keeps_history(self, topic):
        return True

    def recover(self, topic, since):
        d = defer.Deferred()
        self.reads.append(("recover", topic, since, d))
        return d

    def latest(self, topic):
        d = defer.Deferred()
        self.reads.append(("latest", topic, d))
        return d


def data(topic, value, offset=None, epoch="E"):
    frame = {"topic": topic, "data": value}
    if offset is not None:
        frame.update(offset=offset, epoch=epoch)
    return frame


def test_since_replays_then_continues_live_without_gap_or_duplicate():
    history = FakeHistory()
    node = MemoryNode(history=history)
    client = node.connect()
    reply = client.request({"op": "subscribe", "topics": ["A"], "id": 1,
                            "since": {"A": {"offset": "10-0", "epoch": "E"}}})
    assert reply == [{"op": "subscribed", "topics": ["A"], "id": 1}]
    [(kind, topic, since, d)] = history.reads
    assert (kind, topic, since) == ("recover", "A", OffsetSince("10-0", "E"))
    # Published while the history is being read: 12 is also in the replay, 13 is not.
    node.publish("A", b"12", Position("12-0", "E"))
    node.publish("A", b"13", Position("13-0", "E"))
    assert client.messages() == []
    d.callback(Replay("E", ((Position("11-0", "E"), b"11"), (Position("12-0", "E"), b"12"))))
    assert client.messages() == [data("A", 11, "11-0"), data("A", 12, "12-0"), data("A", 13, "13-0")]
    node.publish("A", b"14", Position("14-0", "E"))
    assert client.messages() == [data("A", 14, "14-0")]


def test_failed_recovery_answers_recovery_failed_and_goes_live():
    history = FakeHistory()
    node = MemoryNode(history=history)
    client = node.connect()
    client.request({"op": "subscribe", "topics": ["A"], "id": 2, "since": {"A": {"offset": "1-0", "epoch": "E"}}})
    node.publish("A", b"5", Position("5-0", "F"))
    history.reads[0][3].callback(RecoveryFailed("history epoch changed"))
    assert client.messages() == [
        {"op": "error", "code": "recovery_failed", "message": "history epoch changed", "topics": ["A"], "id": 2},
        data("A", 5, "5-0", "F")]


def test_a_history_read_error_is_recovery_failed_too():
    history = FakeHistory()
    node = MemoryNode(history=history)
    client = node.connect()
    client.request({"op": "subscribe", "topics": ["A"], "since": {"A": {"offset": "1-0", "epoch": "E"}}})
    history.reads[0][3].errback(TimeoutError("redis"))
    [reply] = client.messages()
    assert reply["code"] == "recovery_failed"
    node.publish("A", b"1")
    assert client.messages() == [data("A", 1)]


def test_last_sends_the_latest_message_first():
    history = FakeHistory()
    node = MemoryNode(history=history)
    client = node.connect()
    client.request({"op": "subscribe", "topics": ["A", "B"], "last": True})
    node.publish("A", b"7", Position("7-0", "E"))
    node.publish("A", b"8", Position("8-0", "E"))
    [(_, a, da), (_, b, db)] = history.reads
    assert (a, b) == ("A", "B")
    da.callback((Position("7-0", "E"), b"7"))
    db.callback(None)
    assert client.messages() == [data("A", 7, "7-0"), data("A", 8, "8-0")]


def test_a_connection_closed_during_recovery_gets_nothing():
    history = FakeHistory()
    node = MemoryNode(history=history)
    client = node.connect()
    client.request({"op": "subscribe", "topics": ["A"], "since": {"A": {"offset": "1-0", "epoch": "E"}}})
    client.disconnect()
    history.reads[0][3].callback(Replay("E", (("2-0", b"2"),)))
    assert client.messages() == []


# -- users, broadcasts, disconnects -----------------------------------------------------------------------------

def test_disconnect_by_connection_and_by_user_with_a_reason_code():
    node = node_with("optional")
    a = node.connect(f"/ws?token={token('alice')}")
    b = node.connect(f"/ws?token={token('alice')}")
    c = node.connect()
    assert node.factory.disconnect(c.conn_id, 4000, "bye")
    assert closes(c) == [(4000, "bye")]
    assert not node.factory.disconnect("nope:1", 4000, "bye")
    assert node.factory.disconnect_user("alice", 4009, "banned") == 2
    assert closes(a) == [(4009, "banned")] and closes(b) == [(4009, "banned")]


def test_broadcast_frame_reaches_a_connection_without_subscriptions():
    node = MemoryNode()
    client = node.connect()
    for conn in node.hub.broadcast_targets():
        conn.write(NATIVE.broadcast("b1", b'{"m":1}'))
    assert client.messages() == [{"op": "broadcast", "broadcast": "b1", "data": {"m": 1}}]


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 30), data=st.data())
def test_recovery_seam_property_neither_lost_nor_doubled(total, data):
    """A topic's messages 1..total; the client saw up to `seen`; the history read sees up to `read_upto`;
    live messages from `live_from` on reach the node while the read is in flight (the hold starts before the
    read, so live_from <= read_upto + 1). The client must get seen+1..total, each once, in order."""
    seen = data.draw(st.integers(0, total - 1))
    read_upto = data.draw(st.integers(seen, total))
    live_from = data.draw(st.integers(seen + 1, read_upto + 1))
    history = FakeHistory()
    node = MemoryNode(history=history)
    client = node.connect()
    since = {"A": {"offset": f"{seen}-0", "epoch": "E"}}
    client.request({"op": "subscribe", "topics": ["A"], "since": since})
    for n in range(live_from, total + 1):
        node.publish("A", str(n).encode(), Position(f"{n}-0", "E"))
    history.reads[0][3].callback(Replay("E", tuple((Position(f"{n}-0", "E"), str(n).encode())
                                                   for n in range(seen + 1, read_upto + 1))))
    assert [m["data"] for m in client.messages()] == list(range(seen + 1, total + 1))
