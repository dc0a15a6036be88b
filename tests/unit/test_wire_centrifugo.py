"""Centrifugo's client protocol (v2, JSON) at /connection/websocket: the codec, and whole sessions in memory.

The shapes, error codes and close codes asserted here are the ones Centrifugo's server sends and its SDKs
(centrifuge-js, centrifuge-python) read; tests/integration/test_centrifuge_*.py run those SDKs for real.
"""

import json

import jwt
import pytest
from twisted.internet import defer

from pushd.auth import Permissions, TokenVerifier
from pushd.hub import FrameCache
from pushd.protocol import (
    Auth,
    Connect,
    Disconnect,
    Error,
    ErrorCode,
    HistoryRead,
    Limits,
    Pong,
    PresenceStats,
    Subscribe,
)
from pushd.recovery import Position, SeqSince
from pushd.redis.history import RecoveryFailed, Replay, StreamTop
from pushd.session import AuthPolicy
from pushd.testing import OP_CLOSE, OP_TEXT, MemoryNode
from pushd.wire import centrifugo
from pushd.ws import CENTRIFUGO, NATIVE

PATH = "/connection/websocket"
SECRET = "a-test-secret-of-32-bytes-length"
LIMITS = Limits(max_topic_length=16)


def token(sub="alice", exp=1000, **claims):
    return jwt.encode({"sub": sub, "exp": exp, **claims}, SECRET, algorithm="HS256")


def auth(mode="optional", public=("*",)):
    return AuthPolicy(mode=mode, verifier=TokenVerifier(secret=SECRET), permissions=Permissions(public),
                      auth_timeout=10, refresh_grace=25)


def closes(client):
    return [(f.close_code, f.payload[2:].decode()) for f in client.frames() if f.opcode == OP_CLOSE]


def lines(client):
    """Every reply and push the server sent, one per JSON line of each text frame."""
    return [json.loads(line) for f in client.frames() if f.opcode == OP_TEXT for line in f.payload.splitlines()]


def send(client, *commands):
    """Several commands in one frame, one JSON object per line, as the SDKs batch them."""
    client.send("\n".join(json.dumps(command) for command in commands))
    return lines(client)


def connected(node, **connect):
    client = node.connect(PATH)
    [reply] = send(client, {"id": 1, "connect": connect})
    assert "connect" in reply, reply
    return client


def pub(topic, data, offset=None):
    body = {"data": data} if offset is None else {"data": data, "offset": offset}
    return {"push": {"channel": topic, "pub": body}}


def position(seq, epoch="E"):
    return Position(f"{1000 + seq}-0", epoch, seq)


class FakeHistory:
    """Topics with history, answered at once from what the test put in; `hold` keeps reads for the test to fire."""

    def __init__(self, epoch="E", **topics):
        self.epoch = epoch
        self.topics = {topic: list(payloads) for topic, payloads in topics.items()}
        self.hold = False
        self.held = []
        self.limit = 300

    def keeps_history(self, topic):
        return topic in self.topics

    def _answer(self, value):
        if self.hold:
            d = defer.Deferred()
            self.held.append((d, value))
            return d
        return defer.succeed(value)

    def entries(self, topic, first=1):
        return tuple((position(n, self.epoch), payload)
                     for n, payload in enumerate(self.topics[topic], 1) if n >= first)

    def recover(self, topic, since):
        if topic not in self.topics:
            return self._answer(RecoveryFailed(f"topic {topic!r} keeps no history"))
        top = StreamTop(self.epoch, len(self.topics[topic]))
        if since.epoch and since.epoch != self.epoch:
            return self._answer(RecoveryFailed("history epoch changed (Redis lost it)", top))
        if top.seq - since.seq > self.limit:
            return self._answer(RecoveryFailed(f"more than {self.limit} messages missed", top))
        return self._answer(Replay(self.epoch, self.entries(topic, since.seq + 1), top.seq))

    def latest(self, topic):
        entries = self.entries(topic)
        return self._answer(entries[-1] if entries else None)

    def top(self, topic):
        return self._answer(StreamTop(self.epoch, len(self.topics[topic])))

    def page(self, topic, limit, since, reverse):
        top = StreamTop(self.epoch, len(self.topics[topic]))
        if since is not None and since.epoch != self.epoch:
            return self._answer(RecoveryFailed("history epoch changed (Redis lost it)", top))
        entries = list(self.entries(topic, since.seq + 1 if since is not None else 1))
        if reverse:
            entries.reverse()
        return self._answer((top, entries[:limit]))

    def release(self):
        held, self.held = self.held, []
        for d, value in held:
            d.callback(value)


class FakePresence:
    def __init__(self, counts):
        self.counts = counts

    def presence(self, topic):
        return defer.succeed(self.counts.get(topic, (0, 0)))


# -- the codec ------------------------------------------------------------------------------------------------

def parse(frame):
    return centrifugo.parse_frame(frame.encode() if isinstance(frame, str) else frame, LIMITS)


def test_commands_of_one_frame_decode_in_order():
    frame = "\n".join(json.dumps(c) for c in [
        {"id": 1, "connect": {"token": "t", "name": "js", "version": "5.8.0", "subs": {}}},
        {"id": 2, "subscribe": {"channel": "A", "flag": 1, "positioned": True, "recoverable": True}},
        {"id": 3, "subscribe": {"channel": "B", "recover": True, "offset": 7, "epoch": "E", "flag": 3}},
        {},
        {"id": 4, "history": {"channel": "A", "limit": 10, "since": {"offset": 2, "epoch": "E"}, "reverse": False}},
        {"id": 5, "presence_stats": {"channel": "A"}},
        {"id": 6, "refresh": {"token": "fresh"}},
    ])
    assert parse(frame) == [
        Connect("t", 1),
        Subscribe(("A",), 2, position=True, exclusive=True),
        Subscribe(("B",), 3, since={"B": SeqSince(7, "E")}, position=True, exclusive=True, strict_recovery=True),
        Pong(),
        HistoryRead("A", 4, 10, SeqSince(2, "E"), False),
        PresenceStats("A", 5),
        Auth("fresh", 6),
    ]


def test_patterns_are_refused_even_where_pushds_own_protocol_allows_them():
    [error] = centrifugo.parse_frame(b'{"id":1,"subscribe":{"channel":"sh600*"}}', Limits(allow_patterns=True))
    assert isinstance(error, Error) and error.code == ErrorCode.INVALID_TOPIC and "own protocol" in error.message


def test_history_limits_follow_centrifugo():
    [everything] = parse('{"id":1,"history":{"channel":"A","limit":-1}}')
    [position_only] = parse('{"id":2,"history":{"channel":"A"}}')
    [capped] = parse('{"id":3,"history":{"channel":"A","limit":100000}}')
    assert (everything.limit, position_only.limit, capped.limit) == (centrifugo.MAX_HISTORY_LIMIT, 0,
                                                                      centrifugo.MAX_HISTORY_LIMIT)


@pytest.mark.parametrize("frame", [
    "{", "[1]", '"connect"', '{"connect":{}}', '{"id":0,"connect":{}}', '{"id":-1,"connect":{}}',
    '{"id":true,"connect":{}}', '{"id":"1","connect":{}}', '{"id":4294967296,"connect":{}}', "[" * 100000,
    '{"id":1}', '{"id":1,"dance":{}}', '{"id":1,"subscribe":{"channel":"A"},"unsubscribe":{"channel":"A"}}',
])
def test_frames_the_protocol_cannot_answer_close_the_connection(frame):
    [error] = parse(frame)
    assert isinstance(error, Error) and error.fatal and error.code == ErrorCode.BAD_REQUEST and error.message


@pytest.mark.parametrize("command, code", [
    ({"id": 9, "subscribe": {"channel": "a b"}}, 102),
    ({"id": 9, "subscribe": {"channel": "x" * 17}}, 102),
    ({"id": 9, "subscribe": {"channel": "sh*"}}, 102),
    ({"id": 9, "history": {"channel": "sh[0-9]"}}, 102),
    ({"id": 9, "subscribe": {}}, 102),
    ({"id": 9, "subscribe": "A"}, 107),
    ({"id": 9, "subscribe": {"channel": "A", "recover": True, "offset": -1}}, 107),
    ({"id": 9, "subscribe": {"channel": "A", "recover": True, "offset": "7"}}, 107),
    ({"id": 9, "subscribe": {"channel": "A", "recover": True, "epoch": 5}}, 107),
    ({"id": 9, "subscribe": {"channel": "A", "flag": "2"}}, 107),
    ({"id": 9, "history": {"channel": "A", "limit": -2}}, 107),
    ({"id": 9, "history": {"channel": "A", "reverse": "yes"}}, 107),
    ({"id": 9, "history": {"channel": "A", "since": 5}}, 107),
    ({"id": 9, "refresh": {}}, 107),
    ({"id": 9, "connect": {"token": 5}}, 107),
    ({"id": 9, "publish": {"channel": "A", "data": {}}}, 103),
    ({"id": 9, "rpc": {"method": "m", "data": {}}}, 104),
    ({"id": 9, "presence": {"channel": "A"}}, 108),
    ({"id": 9, "sub_refresh": {"channel": "A", "token": "t"}}, 108),
])
def test_commands_refused_with_centrifugos_error_codes(command, code):
    [error] = parse(json.dumps(command))
    assert isinstance(error, Error) and not error.fatal and error.id == 9
    assert json.loads(centrifugo.encode_error(error)) == {
        "id": 9, "error": {"code": code, "message": error.message}}


def test_an_internal_error_is_marked_temporary():
    encoded = centrifugo.encode_error(Error(ErrorCode.INTERNAL_ERROR, "history could not be read", 3))
    assert json.loads(encoded) == {"id": 3, "error": {"code": 100, "message": "history could not be read",
                                                      "temporary": True}}


def test_publication_message_and_broadcast_pushes():
    codec = centrifugo.CODEC
    assert json.loads(codec.publication("A", b'{"p":1}', position(7))) == pub("A", {"p": 1}, 7)
    assert json.loads(codec.publication("A", b"not json", None)) == pub("A", "not json")
    assert json.loads(codec.publication("A", b"1", Position("5-0", "E", 0))) == pub("A", 1)
    assert json.loads(codec.message(b'{"m":1}')) == {"push": {"message": {"data": {"m": 1}}}}
    assert json.loads(codec.broadcast("b1", b'"x"')) == {"push": {"message": {"data": "x"}}}


def test_a_payload_with_newlines_stays_on_one_line_because_the_sdks_split_frames_at_newlines():
    pretty = b'{\n  "text": "two\\nlines",\n  "n": [1,\n 2]\n}\n'
    for text in (centrifugo.CODEC.publication("A", pretty, position(1)), centrifugo.CODEC.message(pretty),
                 centrifugo.CODEC.publication("A", b"not json\nat all", None)):
        assert b"\n" not in text
    assert json.loads(centrifugo.CODEC.publication("A", pretty, position(1)))["push"]["pub"]["data"] == {
        "text": "two\nlines", "n": [1, 2]}
    assert json.loads(centrifugo.CODEC.message(b"not json\nat all"))["push"]["message"]["data"] == "not json\nat all"


@pytest.mark.parametrize("reason, code, terminal", [
    ("SHUTDOWN", 3001, False), ("TOKEN_EXPIRED", 3005, False), ("STALE_TOKEN", 3005, False),
    ("NO_PONG", 3012, False), ("INVALID_TOKEN", 3500, True), ("BAD_REQUEST", 3501, True),
    ("AUTH_REQUIRED", 3502, True),
])
def test_close_codes_are_centrifugos_and_the_sdks_reconnect_after_the_non_terminal(reason, code, terminal):
    got, text = centrifugo.CODEC.close(Disconnect[reason], "")
    assert got == code and text
    assert (3500 <= got < 4000) is terminal
    _, detailed = centrifugo.CODEC.close(Disconnect[reason], "more")
    assert detailed.endswith(": more")


# -- connect ----------------------------------------------------------------------------------------------------

def test_connect_without_a_token_opens_an_anonymous_session():
    node = MemoryNode(auth=auth(), ping_interval=25)
    client = node.connect(PATH)
    assert client.status == 101
    assert send(client, {"id": 1, "connect": {"name": "js", "version": "5.8.0"}}) == [
        {"id": 1, "connect": {"client": f"test-node:{node.factory.incarnation}.1", "version": centrifugo.__version__, "ping": 25, "pong": True}}]
    assert node.hub.user_connections("alice") == ()


def test_connect_with_a_token_tells_when_it_expires():
    node = MemoryNode(auth=auth())
    node.clock.advance(400)
    client = node.connect(PATH)
    [reply] = send(client, {"id": 1, "connect": {"token": token(exp=1000)}})
    assert reply == {"id": 1, "connect": {"client": client.conn_id, "version": centrifugo.__version__,
                                          "expires": True, "ttl": 600}}
    assert node.hub.user_connections("alice") == (client.session,)


def test_a_token_in_the_connect_command_is_ignored_when_tokens_are_off():
    node = MemoryNode()
    client = node.connect(PATH)
    [reply] = send(client, {"id": 1, "connect": {"token": "anything"}})
    assert reply["connect"]["client"] == client.conn_id and "expires" not in reply["connect"]


@pytest.mark.parametrize("bad", ["not.a.token", token(sub="alice", exp=1000, channels="A")])
def test_an_invalid_token_closes_with_3500(bad):
    node = MemoryNode(auth=auth())
    client = node.connect(PATH)
    client.send(json.dumps({"id": 1, "connect": {"token": bad}}))
    [(code, reason)] = closes(client)
    assert code == 3500 and reason.startswith("invalid token")
    assert len(node.hub) == 0


def test_a_token_expired_at_connect_gets_error_109_so_the_sdk_fetches_a_fresh_one():
    node = MemoryNode(auth=auth())
    node.clock.advance(2000)
    client = node.connect(PATH)
    assert send(client, {"id": 1, "connect": {"token": token(exp=1000)}}) == [
        {"id": 1, "error": {"code": 109, "message": "token expired"}}]
    assert not client.closed
    [reply] = send(client, {"id": 2, "connect": {"token": token(exp=3000)}})
    assert reply["connect"]["ttl"] == 1000


def test_required_tokens_close_a_connect_without_one_and_a_silent_connection():
    node = MemoryNode(auth=auth("required"))
    client = node.connect(PATH)
    client.send(json.dumps({"id": 1, "connect": {}}))
    assert [code for code, _ in closes(client)] == [3500]
    silent = node.connect(PATH)
    node.clock.advance(10)
    assert [code for code, _ in closes(silent)] == [3502]


def test_a_connection_that_never_connects_is_closed_as_stale_even_when_tokens_are_optional():
    node = MemoryNode(auth=auth())
    client = node.connect(PATH)
    node.clock.advance(10)
    assert [code for code, _ in closes(client)] == [3502]


def test_commands_before_connect_and_a_second_connect_close_with_3501():
    node = MemoryNode()
    early = node.connect(PATH)
    early.send(json.dumps({"id": 1, "subscribe": {"channel": "A"}}))
    assert [code for code, _ in closes(early)] == [3501]
    twice = connected(node)
    twice.send(json.dumps({"id": 2, "connect": {}}))
    assert [code for code, _ in closes(twice)] == [3501]


def test_bad_json_and_commands_without_an_id_close_with_3501_and_unknown_fields_are_ignored():
    node = MemoryNode()
    client = connected(node)
    assert send(client, {"id": 2, "subscribe": {"channel": "A", "tf": {"op": "eq"}, "future": [1]}, "extra": 1}) \
        == [{"id": 2, "subscribe": {}}]
    client.send("{")
    assert [code for code, _ in closes(client)] == [3501]
    nameless = connected(node)
    nameless.send(json.dumps({"subscribe": {"channel": "A"}}))
    assert [code for code, _ in closes(nameless)] == [3501]
    assert node.hub.pruned["bad_frames"] == 2


def test_commands_after_a_fatal_one_in_the_same_frame_are_not_run():
    node = MemoryNode()
    client = connected(node)
    client.send('{"id":2,"subscribe":{"channel":"A"}}\n{\n{"id":3,"subscribe":{"channel":"B"}}')
    frames = client.frames()
    assert [json.loads(f.payload) for f in frames if f.opcode == OP_TEXT] == [{"id": 2, "subscribe": {}}]
    assert [f.close_code for f in frames if f.opcode == OP_CLOSE] == [3501]
    assert node.hub.subscriber_count("B") == 0


# -- pings ------------------------------------------------------------------------------------------------------

def test_server_pings_are_empty_commands_and_an_empty_command_is_the_pong():
    node = MemoryNode(ping_interval=25, ping_timeout=10)
    client = connected(node)
    node.clock.advance(25)
    assert lines(client) == [{}]
    client.send("{}")
    node.clock.advance(10)
    assert not client.closed
    node.clock.advance(15)
    assert lines(client) == [{}]
    node.clock.advance(10)
    assert closes(client) == [(3012, "no pong")]
    assert node.hub.pruned["ping_timeout"] == 1


def test_no_pings_before_connect_and_none_when_pings_are_off():
    node = MemoryNode(ping_interval=25)
    client = node.connect(PATH)
    node.clock.advance(9)
    assert client.frames() == []
    quiet = connected(MemoryNode(ping_interval=0))
    quiet.node.clock.advance(100)
    assert quiet.frames() == []


def test_websocket_level_pings_are_off_on_this_path():
    node = MemoryNode(ping_interval=25)
    assert connected(node).protocol.autoPingInterval == 0
    assert node.connect("/ws").protocol.autoPingInterval == 25


# -- refresh ----------------------------------------------------------------------------------------------------

def test_refresh_before_expiry_keeps_the_connection_open():
    node = MemoryNode(auth=auth())
    client = connected(node, token=token(exp=100))
    node.clock.advance(90)
    assert send(client, {"id": 2, "refresh": {"token": token(exp=500)}}) == [
        {"id": 2, "refresh": {"client": client.conn_id, "version": centrifugo.__version__, "expires": True,
                              "ttl": 410}}]
    node.clock.advance(400)
    assert not client.closed and lines(client) == []


def test_an_expired_connection_without_refresh_closes_with_3005_after_the_grace():
    node = MemoryNode(auth=auth())
    client = connected(node, token=token(exp=100))
    node.clock.advance(100)
    assert client.frames() == []
    node.clock.advance(25)
    [(code, reason)] = closes(client)
    assert code == 3005 and reason.startswith("connection expired")
    assert node.hub.pruned["token_expired"] == 1


def test_refresh_with_an_expired_token_closes_with_3005_and_a_forged_one_with_3500():
    node = MemoryNode(auth=auth())
    stale = connected(node, token=token(exp=100))
    node.clock.advance(110)
    stale.send(json.dumps({"id": 2, "refresh": {"token": token(exp=100)}}))
    assert [code for code, _ in closes(stale)] == [3005]
    forged = connected(node, token=token(exp=1000))
    forged.send(json.dumps({"id": 2, "refresh": {"token": "x.y.z"}}))
    assert [code for code, _ in closes(forged)] == [3500]
    other = connected(node, token=token(exp=1000))
    other.send(json.dumps({"id": 2, "refresh": {"token": token(sub="mallory", exp=2000)}}))
    assert [code for code, _ in closes(other)] == [3500]


# -- subscriptions ----------------------------------------------------------------------------------------------

def test_subscribe_receive_unsubscribe_without_history():
    node = MemoryNode()
    client = connected(node)
    assert send(client, {"id": 2, "subscribe": {"channel": "A"}}) == [{"id": 2, "subscribe": {}}]
    node.publish("A", b'{"price":1}')
    node.publish("B", b"2")
    assert lines(client) == [pub("A", {"price": 1})]
    assert send(client, {"id": 3, "unsubscribe": {"channel": "A"}}) == [{"id": 3, "unsubscribe": {}}]
    node.publish("A", b"3")
    assert lines(client) == []


def test_subscribing_twice_is_error_105_and_too_many_channels_106():
    node = MemoryNode(limits=Limits(max_topics_per_connection=1))
    client = connected(node)
    assert send(client, {"id": 2, "subscribe": {"channel": "A"}},
                {"id": 3, "subscribe": {"channel": "A"}},
                {"id": 4, "subscribe": {"channel": "B"}}) == [
        {"id": 2, "subscribe": {}},
        {"id": 3, "error": {"code": 105, "message": "already subscribed"}},
        {"id": 4, "error": {"code": 106, "message": "subscribing would exceed 1 topics on this connection"}}]


def test_the_channels_claim_limits_what_a_token_may_subscribe_to():
    node = MemoryNode(auth=auth(public=("news.*",)))
    client = connected(node, token=token(channels=["orders.alice", "chat.*"]))
    replies = send(client, {"id": 2, "subscribe": {"channel": "orders.alice"}},
                   {"id": 3, "subscribe": {"channel": "chat.room1"}},
                   {"id": 4, "subscribe": {"channel": "orders.bob"}})
    assert replies[:2] == [{"id": 2, "subscribe": {}}, {"id": 3, "subscribe": {}}]
    assert replies[2]["error"]["code"] == 103
    anonymous = connected(node)
    assert [r.get("error", {}).get("code") for r in send(anonymous, {"id": 2, "subscribe": {"channel": "news.eu"}},
                                                         {"id": 3, "subscribe": {"channel": "chat.room1"}})] \
        == [None, 103]


def test_a_topic_with_history_answers_with_its_position_and_publications_carry_offsets():
    history = FakeHistory(A=[b"1", b"2"])
    node = MemoryNode(history=history)
    client = connected(node)
    assert send(client, {"id": 2, "subscribe": {"channel": "A"}}) == [
        {"id": 2, "subscribe": {"recoverable": True, "positioned": True, "epoch": "E", "offset": 2}}]
    node.publish("A", b'"three"', position(3))
    assert lines(client) == [pub("A", "three", 3)]


def test_recover_replays_what_was_missed_and_goes_on_live():
    history = FakeHistory(A=[b"1", b"2", b"3", b'{"n":4}'])
    node = MemoryNode(history=history)
    client = connected(node)
    assert send(client, {"id": 2, "subscribe": {"channel": "A", "recover": True, "offset": 2, "epoch": "E"}}) == [
        {"id": 2, "subscribe": {"recoverable": True, "positioned": True, "epoch": "E", "offset": 2,
                                "was_recovering": True, "recovered": True,
                                "publications": [{"data": 3, "offset": 3}, {"data": {"n": 4}, "offset": 4}]}}]
    node.publish("A", b"5", position(5))
    assert lines(client) == [pub("A", 5, 5)]


def test_recover_with_nothing_missed_is_recovered_without_publications():
    node = MemoryNode(history=FakeHistory(A=[b"1", b"2"]))
    client = connected(node)
    [reply] = send(client, {"id": 2, "subscribe": {"channel": "A", "recover": True, "offset": 2, "epoch": "E"}})
    assert reply["subscribe"] == {"recoverable": True, "positioned": True, "epoch": "E", "offset": 2,
                                  "was_recovering": True, "recovered": True}


def test_publications_during_the_history_read_reach_the_client_once_in_order():
    history = FakeHistory(A=[b"1", b"2", b"3"])
    history.hold = True
    node = MemoryNode(history=history)
    client = connected(node)
    assert send(client, {"id": 2, "subscribe": {"channel": "A", "recover": True, "offset": 1, "epoch": "E"}}) == []
    node.publish("A", b"3", position(3))  # also in the replay
    node.publish("A", b"4", position(4))
    history.release()
    [reply, live] = lines(client)
    assert [p["offset"] for p in reply["subscribe"]["publications"]] == [2, 3]
    assert live == pub("A", 4, 4)


@pytest.mark.parametrize("since", [{"offset": 1, "epoch": "OLD"}, {"offset": 0, "epoch": "E"}])
def test_a_lost_or_trimmed_history_is_not_recovered_and_the_client_gets_the_current_position(since):
    history = FakeHistory(A=[b"1", b"2", b"3"])
    history.limit = 2
    node = MemoryNode(history=history)
    client = connected(node)
    [reply] = send(client, {"id": 2, "subscribe": {"channel": "A", "recover": True, **since}})
    assert reply == {"id": 2, "subscribe": {"recoverable": True, "positioned": True, "epoch": "E", "offset": 3,
                                            "was_recovering": True, "recovered": False}}
    node.publish("A", b"4", position(4))
    assert lines(client) == [pub("A", 4, 4)]


def test_an_sdk_that_reloads_its_state_asks_for_error_112_instead_of_not_recovered():
    node = MemoryNode(history=FakeHistory(A=[b"1", b"2"]))
    client = connected(node)
    assert send(client, {"id": 2, "subscribe": {"channel": "A", "recover": True, "offset": 1, "epoch": "OLD",
                                                "flag": 3}}) == [
        {"id": 2, "error": {"code": 112, "message": "history epoch changed (Redis lost it)"}}]
    assert node.hub.subscriber_count("A") == 0
    [reply] = send(client, {"id": 3, "subscribe": {"channel": "A", "recover": True, "offset": 1, "epoch": "E",
                                                   "flag": 3}})
    assert reply["subscribe"]["recovered"] is True and reply["subscribe"]["publications"] == [
        {"data": 2, "offset": 2}]


def test_a_failed_history_read_is_a_temporary_error_so_the_sdk_subscribes_again_later():
    history = FakeHistory(A=[b"1"])
    node = MemoryNode(history=history)
    history.recover = lambda topic, since: defer.fail(TimeoutError("redis"))
    client = connected(node)
    [reply] = send(client, {"id": 2, "subscribe": {"channel": "A", "recover": True, "offset": 1, "epoch": "E"}})
    assert reply == {"id": 2, "error": {"code": 100, "message": "history could not be read; try again",
                                        "temporary": True}}
    assert node.hub.subscriber_count("A") == 0 and client.session.topics == set()
    del history.recover
    node.publish("A", b"2", position(2))
    assert lines(client) == []
    [reply] = send(client, {"id": 3, "subscribe": {"channel": "A", "recover": True, "offset": 1, "epoch": "E"}})
    assert reply["subscribe"]["recovered"] is True


def test_recover_on_a_topic_without_history_says_not_recovered():
    node = MemoryNode(history=FakeHistory())
    client = connected(node)
    [reply] = send(client, {"id": 2, "subscribe": {"channel": "A", "recover": True, "offset": 3, "epoch": "E"}})
    assert reply["subscribe"] == {"was_recovering": True, "recovered": False}


def test_a_gap_in_a_topics_numbers_unsubscribes_with_2500_so_the_sdk_recovers():
    node = MemoryNode(history=FakeHistory(A=[b"1"]))
    client = connected(node)
    send(client, {"id": 2, "subscribe": {"channel": "A"}})
    node.publish("A", b"2", position(2))
    node.publish("A", b"4", position(4))
    assert lines(client) == [pub("A", 2, 2), {"push": {"channel": "A", "unsubscribe": {
        "code": 2500, "reason": "insufficient state"}}}]
    assert node.hub.subscriber_count("A") == 0
    node.publish("A", b"5", position(5))
    assert lines(client) == []


# -- history and presence ---------------------------------------------------------------------------------------

def test_history_pages_and_the_position():
    node = MemoryNode(history=FakeHistory(A=[b"1", b"2", b'"3"']))
    client = connected(node)
    send(client, {"id": 2, "subscribe": {"channel": "A"}})
    assert send(client, {"id": 3, "history": {"channel": "A", "limit": 2}},
                {"id": 4, "history": {"channel": "A", "limit": 1, "reverse": True}},
                {"id": 5, "history": {"channel": "A", "limit": -1, "since": {"offset": 1, "epoch": "E"}}},
                {"id": 6, "history": {"channel": "A"}}) == [
        {"id": 3, "history": {"publications": [{"data": 1, "offset": 1}, {"data": 2, "offset": 2}],
                              "epoch": "E", "offset": 3}},
        {"id": 4, "history": {"publications": [{"data": "3", "offset": 3}], "epoch": "E", "offset": 3}},
        {"id": 5, "history": {"publications": [{"data": 2, "offset": 2}, {"data": "3", "offset": 3}],
                              "epoch": "E", "offset": 3}},
        {"id": 6, "history": {"publications": [], "epoch": "E", "offset": 3}}]


def test_history_errors():
    node = MemoryNode(history=FakeHistory(A=[b"1"]))
    client = connected(node)
    assert [r["error"]["code"] for r in send(client, {"id": 2, "history": {"channel": "A", "limit": 1}},
                                             {"id": 3, "history": {"channel": "B", "limit": 1}})] == [103, 108]
    send(client, {"id": 4, "subscribe": {"channel": "A"}})
    [reply] = send(client, {"id": 5, "history": {"channel": "A", "since": {"offset": 1, "epoch": "OLD"}}})
    assert reply["error"]["code"] == 112
    no_history = connected(MemoryNode())
    [reply] = send(no_history, {"id": 2, "history": {"channel": "A"}})
    assert reply["error"]["code"] == 108


def test_presence_stats_counts_cluster_wide_and_is_108_without_presence():
    node = MemoryNode(presence=FakePresence({"A": (3, 2)}))
    client = connected(node)
    assert send(client, {"id": 2, "presence_stats": {"channel": "A"}}) == [
        {"id": 2, "presence_stats": {"num_clients": 3, "num_users": 2}}]
    [reply] = send(connected(MemoryNode()), {"id": 2, "presence_stats": {"channel": "A"}})
    assert reply["error"]["code"] == 108


def test_unsupported_commands_get_errors_and_the_session_goes_on():
    node = MemoryNode()
    client = connected(node)
    replies = send(client, {"id": 2, "publish": {"channel": "A", "data": {}}},
                   {"id": 3, "rpc": {"method": "m", "data": {}}},
                   {"id": 4, "presence": {"channel": "A"}},
                   {"send": {"data": {}}},
                   {"id": 5, "subscribe": {"channel": "A"}})
    assert [r.get("error", {}).get("code") for r in replies] == [103, 104, 108, None]
    assert not client.closed


# -- messages, broadcasts, shutdown, both protocols -----------------------------------------------------------

def test_user_messages_and_broadcasts_are_message_pushes():
    node = MemoryNode(auth=auth())
    client = connected(node, token=token())
    for conn in node.hub.user_connections("alice"):
        conn.write(conn.wire.message(b'{"hello":1}'))
    for conn in node.hub.broadcast_targets():
        conn.write(conn.wire.broadcast("b1", b'"maintenance"'))
    assert lines(client) == [{"push": {"message": {"data": {"hello": 1}}}},
                             {"push": {"message": {"data": "maintenance"}}}]


def test_shutdown_closes_with_3001():
    node = MemoryNode()
    client = connected(node)
    node.factory.close_all("server shutting down", timeout=5)
    [(code, reason)] = closes(client)
    assert code == 3001 and reason.startswith("shutdown")


def test_one_publish_is_encoded_once_per_protocol_for_all_subscribers(monkeypatch):
    calls = []
    for codec in (centrifugo.CODEC, NATIVE.codec):
        original = codec.publication

        def counted(topic, payload, where, original=original, name=codec.name):
            calls.append(name)
            return original(topic, payload, where)

        monkeypatch.setattr(codec, "publication", counted)
    node = MemoryNode()
    sdk = [connected(node) for _ in range(3)]
    own = [node.connect("/ws") for _ in range(3)]
    for client in sdk:
        send(client, {"id": 2, "subscribe": {"channel": "A"}})
    for client in own:
        client.request({"op": "subscribe", "topics": ["A"]})
    assert node.publish("A", b"1", position(1)) == 6
    assert sorted(calls) == sorted([CENTRIFUGO.name, NATIVE.name])
    assert all(lines(client) == [pub("A", 1, 1)] for client in sdk)
    assert all(client.messages() == [{"topic": "A", "data": 1, "offset": "1001-0", "epoch": "E"}]
               for client in own)


def test_a_message_to_both_protocols_is_encoded_once_per_protocol():
    calls = []
    frames = FrameCache(lambda wire: calls.append(wire.name) or wire.message(b"1"))
    for wire in (CENTRIFUGO, NATIVE, CENTRIFUGO, NATIVE, CENTRIFUGO):
        frames.frame(wire)
    assert calls == [CENTRIFUGO.name, NATIVE.name]
