"""pushd's own wire protocol: its parsing and encoding rules (docs/protocol.md)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pushd import protocol
from pushd.protocol import Error, ErrorCode, Limits, Ping, Subscribe, Unsubscribe
from pushd.wire import native

LIMITS = Limits(max_topic_length=16, max_topics_per_connection=3)


def parse(frame):
    return native.parse_command(frame if isinstance(frame, str) else json.dumps(frame), LIMITS)


def test_subscribe_unsubscribe_ping_with_and_without_id():
    assert parse({"op": "subscribe", "topics": ["AAPL", "sh600519"], "id": 7}) == Subscribe(("AAPL", "sh600519"), 7)
    assert parse({"op": "unsubscribe", "topics": ["AAPL"]}) == Unsubscribe(("AAPL",), None)
    assert parse({"op": "ping", "id": "abc"}) == Ping("abc")


def test_duplicate_topics_are_merged_in_order():
    assert parse({"op": "subscribe", "topics": ["B", "A", "B"]}) == Subscribe(("B", "A"))


@pytest.mark.parametrize("frame, code", [
    ("{", ErrorCode.BAD_REQUEST),
    ("[1,2]", ErrorCode.BAD_REQUEST),
    ('"subscribe"', ErrorCode.BAD_REQUEST),
    ({"topics": ["A"]}, ErrorCode.BAD_REQUEST),
    ({"op": 5}, ErrorCode.BAD_REQUEST),
    ({"op": "publish", "topics": ["A"]}, ErrorCode.UNKNOWN_OP),
    ({"op": "subscribe"}, ErrorCode.BAD_REQUEST),
    ({"op": "subscribe", "topics": []}, ErrorCode.BAD_REQUEST),
    ({"op": "subscribe", "topics": "AAPL"}, ErrorCode.BAD_REQUEST),
    ({"op": "subscribe", "topics": [""]}, ErrorCode.INVALID_TOPIC),
    ({"op": "subscribe", "topics": [7]}, ErrorCode.INVALID_TOPIC),
    ({"op": "subscribe", "topics": ["x" * 17]}, ErrorCode.INVALID_TOPIC),
    ({"op": "subscribe", "topics": ["a b"]}, ErrorCode.INVALID_TOPIC),
    ({"op": "subscribe", "topics": ["sh600*"]}, ErrorCode.INVALID_TOPIC),
    ({"op": "subscribe", "topics": ["caf\u00e9"]}, ErrorCode.INVALID_TOPIC),
    ({"op": "subscribe", "topics": ["A", "B", "C", "D"]}, ErrorCode.TOO_MANY_TOPICS),
    ({"op": "ping", "id": {"nested": 1}}, ErrorCode.BAD_REQUEST),
    ({"op": "ping", "id": True}, ErrorCode.BAD_REQUEST),
    ({"op": "ping", "id": "x" * 65}, ErrorCode.BAD_REQUEST),
    ("[" * 100000, ErrorCode.BAD_REQUEST),
])
def test_bad_frames_are_errors_not_exceptions(frame, code):
    result = parse(frame)
    assert isinstance(result, Error)
    assert result.code == code
    assert result.message


def test_error_echoes_a_valid_id():
    result = parse({"op": "nope", "id": 3})
    assert isinstance(result, Error) and result.id == 3
    assert json.loads(native.encode_error(result)) == {
        "op": "error", "code": "unknown_op", "message": result.message, "id": 3}


def test_replies():
    assert json.loads(native.encode_subscribed(("A",), 1)) == {"op": "subscribed", "topics": ["A"], "id": 1}
    assert json.loads(native.encode_unsubscribed(("A",), None)) == {"op": "unsubscribed", "topics": ["A"]}
    assert json.loads(native.encode_pong("x")) == {"op": "pong", "id": "x"}


@pytest.mark.parametrize("payload, data", [
    (b'{"price":172.5}', {"price": 172.5}),
    (b"  [1, 2]\n", [1, 2]),
    (b"007", "007"),
    (b'"hi"', "hi"),
    (b"null", None),
    (b"plain text", "plain text"),
    (b"NaN", "NaN"),
    (b"", ""),
    (b"\xff\xfe", "\ufffd\ufffd"),
])
def test_data_frame_carries_json_as_published_else_a_string(payload, data):
    frame = json.loads(native.encode_data("AAPL", payload))
    assert frame == {"topic": "AAPL", "data": data}


def test_valid_json_is_passed_through_byte_for_byte():
    payload = b'{"b": 1,   "a": [1.50, "\\u00e9"]}'
    assert native.encode_data("T", payload) == b'{"topic":"T","data":' + payload + b"}"


@given(st.binary(max_size=200))
def test_any_published_bytes_make_a_valid_utf8_json_frame(payload):
    frame = native.encode_data("T", payload)
    decoded = json.loads(frame.decode("utf-8"))
    assert decoded["topic"] == "T"


@given(st.text(max_size=300))
def test_any_client_text_parses_to_a_command_or_an_error(text):
    result = native.parse_command(text, LIMITS)
    assert isinstance(result, (Subscribe, Unsubscribe, Ping, Error))


def test_topic_alphabet():
    ok = Limits()
    for topic in ["AAPL", "sh600519", "orders.eu.42", "user:17", "a/b=c+d~e@f_g-h"]:
        assert protocol.is_valid_topic(topic, ok)
    for topic in ["", "a b", "a*", "a?", "a[1]", 'a"b', "a\\b", "a\nb", "x" * 129]:
        assert not protocol.is_valid_topic(topic, ok)


# -- the API issue's frames -------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4),
                           max_leaves=12)


@given(st.fixed_dictionaries({"op": st.sampled_from(["subscribe", "unsubscribe", "auth", "ping"])},
                             optional={"topics": json_values | st.lists(st.sampled_from(["A", "sh6*", "b?"])),
                                       "last": json_values, "since": json_values, "token": json_values,
                                       "id": json_values}))
def test_any_shaped_frame_is_a_command_or_an_error(frame):
    for limits in (LIMITS, Limits(max_topic_length=16, max_topics_per_connection=3, allow_patterns=True)):
        result = native.parse_command(json.dumps(frame), limits)
        assert isinstance(result, (Subscribe, Unsubscribe, Ping, protocol.Auth, Error))


def test_subscribe_options_last_and_since():
    from pushd.recovery import OffsetSince

    assert parse({"op": "subscribe", "topics": ["A"], "last": True}) == Subscribe(("A",), None, True)
    since = {"A": {"offset": "17-0", "epoch": "e1"}}
    assert parse({"op": "subscribe", "topics": ["A", "B"], "since": since}).since == {"A": OffsetSince("17-0", "e1")}


@pytest.mark.parametrize("frame, start", [
    ({"op": "subscribe", "topics": ["A"], "last": 1}, "last must be true or false"),
    ({"op": "subscribe", "topics": ["A"], "since": []}, "since must be an object"),
    ({"op": "subscribe", "topics": ["A"], "since": {"B": {"offset": "1-0", "epoch": "e"}}}, "since.B: not one of"),
    ({"op": "subscribe", "topics": ["A"], "since": {"A": {"offset": "x", "epoch": "e"}}}, "since.A: must be"),
    ({"op": "subscribe", "topics": ["A"], "since": {"A": {"offset": "1-0", "epoch": ""}}}, "since.A: must be"),
    ({"op": "subscribe", "topics": ["A"], "since": {"A": "1-0"}}, "since.A: must be"),
    ({"op": "auth"}, "token must be a non-empty string"),
    ({"op": "auth", "token": 5}, "token must be a non-empty string"),
    ({"op": "auth", "token": "x" * 8193}, "token is longer than 8192 bytes"),
])
def test_bad_options_are_bad_requests_that_say_why(frame, start):
    result = parse(frame)
    assert isinstance(result, Error) and result.code == ErrorCode.BAD_REQUEST
    assert result.message.startswith(start), result.message


def test_patterns_only_when_allowed_and_never_with_last_or_since():
    allowed = Limits(max_topic_length=16, max_topics_per_connection=3, allow_patterns=True)
    assert native.parse_command('{"op":"subscribe","topics":["sh600*"]}', allowed) == Subscribe(("sh600*",))
    assert parse({"op": "subscribe", "topics": ["sh600*"]}).code == ErrorCode.INVALID_TOPIC
    bad = native.parse_command('{"op":"subscribe","topics":["sh[6]*"]}', allowed)
    assert isinstance(bad, Error) and bad.code == ErrorCode.INVALID_TOPIC
    mixed = native.parse_command('{"op":"subscribe","topics":["sh*"],"last":true}', allowed)
    assert isinstance(mixed, Error) and mixed.topics == ("sh*",)


def test_data_frames_with_a_position_and_the_new_server_frames():
    from pushd.recovery import Position

    assert json.loads(native.encode_data("A", b"1", Position("5-0", "e"))) == {
        "topic": "A", "data": 1, "offset": "5-0", "epoch": "e"}
    assert json.loads(native.encode_message(b"hi")) == {"op": "message", "data": "hi"}
    assert json.loads(native.encode_broadcast('b"1', b"[1]")) == {"op": "broadcast", "broadcast": 'b"1', "data": [1]}
    assert json.loads(native.encode_refresh()) == {"op": "refresh"}
    assert json.loads(native.encode_authenticated("u", 12.7, 3)) == {
        "op": "authenticated", "user": "u", "expires": 12, "id": 3}
