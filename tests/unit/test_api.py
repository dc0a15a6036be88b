"""The HTTP API in memory: every route against a fake backend, every refusal with its status and the field it names,
and docs/openapi.json kept equal to what pushd.openapi generates from the route table."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import treq
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from pushd import openapi, protocol
from pushd.api import ROUTES, BackendHealth, Unavailable, api_site
from pushd.origins import parse_policy
from pushd.recovery import Position

ROOT = Path(__file__).resolve().parents[2]
KEY = "key-one"
OTHER_KEY = "key-two"
MAX_BODY = 2048
MAX_BATCH = 5
LIMITS = protocol.Limits(max_topic_length=32)


class FakeBackend:
    """Records every call; answers with `answers[name]` (a value, a function of the arguments, or a Deferred)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.answers: dict[str, Any] = {}
        self.failure: Exception | None = None
        self.raises = False

    def _answer(self, name: str, *args: Any) -> Deferred[Any]:
        self.calls.append((name, *args))
        if self.failure is not None:
            if self.raises:
                raise self.failure
            return fail(self.failure)
        answer = self.answers[name]
        if isinstance(answer, Deferred):
            return answer
        return succeed(answer(*args) if callable(answer) else answer)

    def publish(self, messages):
        return self._answer("publish", list(messages))

    def publish_to_user(self, user, payload):
        return self._answer("publish_to_user", user, payload)

    def broadcast(self, payload, key):
        return self._answer("broadcast", payload, key)

    def broadcast_status(self, broadcast_id):
        return self._answer("broadcast_status", broadcast_id)

    def topics(self):
        return self._answer("topics")

    def topic(self, topic):
        return self._answer("topic", topic)

    def nodes(self):
        return self._answer("nodes")

    def disconnect_connection(self, conn_id, code, reason):
        return self._answer("disconnect_connection", conn_id, code, reason)

    def disconnect_user(self, user, code, reason):
        return self._answer("disconnect_user", user, code, reason)

    @property
    def jobs(self):
        return FakeJobs(self)


class FakeJobs:
    """The backend's JobStore, recorded like the rest."""

    def __init__(self, backend: FakeBackend) -> None:
        self._backend = backend

    def submit(self, fields, rows=None):
        return self._backend._answer("submit_job", fields, None if rows is None else list(rows))

    def list(self, limit):
        return self._backend._answer("list_jobs", limit)

    def show(self, job_id):
        return self._backend._answer("show_job", job_id)

    def transition(self, job_id, action):
        return self._backend._answer("transition_job", job_id, action)

    def failures(self, job_id, start, count):
        return self._backend._answer("job_failures", job_id, start, count)


def default_backend() -> FakeBackend:
    backend = FakeBackend()
    backend.answers.update({
        "publish": lambda messages: [Position(f"{i + 1}-0", "e1") for i in range(len(messages))],
        "publish_to_user": 2,
        "broadcast": ("b-1", True),
        "broadcast_status": lambda broadcast_id: {"id": broadcast_id, "nodes": {"n1": "done"}},
        "topics": {"chat": 3, "news": 1},
        "topic": {"n1": 2, "n2": 5},
        "nodes": [{"id": "n1", "connections": 10}],
        "disconnect_connection": True,
        "disconnect_user": 3,
        "submit_job": ("j1", True, "running"),
        "list_jobs": [],
        "show_job": lambda job_id: {"id": job_id, "state": "running"},
        "transition_job": lambda job_id, action: "paused",
        "job_failures": lambda job_id, start, count: [],
    })
    return backend


def fired(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class Answer:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.raw = body
        self.json = json.loads(body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def error(self) -> tuple[str, str]:
        return self.json["error"]["code"], self.json["error"]["message"]


class Api:
    """The real API resource behind an in-memory treq client."""

    def __init__(self, backend: FakeBackend | None = None, keys: tuple[str, ...] = (KEY, OTHER_KEY),
                 cors: str = "", max_body: int = MAX_BODY) -> None:
        self.backend = backend or default_backend()
        self.site = api_site(self.backend, api_keys=keys, max_body=max_body, limits=LIMITS, max_batch=MAX_BATCH,
                             cors=parse_policy(cors))
        self.client = StubTreq(self.site.resource)

    def preflight(self, path: str, origin: str, method: str = "POST") -> tuple[int, Any]:
        """A browser's CORS preflight: OPTIONS with Origin and Access-Control-Request-Method, no key."""
        d = self.client.request("OPTIONS", "http://pushd.test" + path, headers={
            "Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type"})
        self.client.flush()
        response = fired(d)
        return response.code, response.headers

    def request(self, method: str, path: str, body: Any = None, *, data: bytes | None = None, key: str | None = KEY,
                headers: dict[str, str] | None = None, content_type: str | None = "application/json") -> Answer:
        """One request; a POST says `content_type` unless `headers` give one (None: no Content-Type at all)."""
        sent = dict(headers or {})
        if key is not None:
            sent.setdefault("Authorization", f"Bearer {key}")
        if body is not None:
            data = json.dumps(body).encode()
        if method == "POST" and content_type is not None:
            sent.setdefault("Content-Type", content_type)
        d = self.client.request(method, "http://pushd.test" + path, headers=sent, data=data)
        self.client.flush()
        response = fired(d)
        content = fired(treq.content(response))
        assert response.headers.getRawHeaders("Content-Type") == ["application/json"]
        assert response.headers.getRawHeaders("Cache-Control") == ["no-store"]
        assert b"Traceback" not in content and b"secret-internal-detail" not in content
        answer = Answer(response.code, response.headers, content)
        if response.code >= 400:
            assert set(answer.json) == {"error"} and set(answer.json["error"]) == {"code", "message"}
        return answer


@pytest.fixture
def api() -> Api:
    return Api()


@pytest.fixture
def failures() -> Iterator[list[dict[str, Any]]]:
    """The failures logged through twisted.logger while the test runs."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


# publish


def test_publish_one_message_hands_the_compact_json_of_data_to_the_backend(api):
    answer = api.request("POST", "/api/publish", {"topic": "chat.1", "data": {"text": "héllo", "n": [1, 2]}})
    assert answer.status == 200
    assert answer.json == {"topic": "chat.1", "offset": "1-0", "epoch": "e1"}
    assert api.backend.calls == [("publish", [("chat.1", '{"text":"héllo","n":[1,2]}'.encode())])]


def test_publish_to_a_topic_without_history_has_null_offset_and_epoch(api):
    api.backend.answers["publish"] = [None]
    answer = api.request("POST", "/api/publish", {"topic": "chat", "data": None})
    assert answer.json == {"topic": "chat", "offset": None, "epoch": None}
    assert api.backend.calls == [("publish", [("chat", b"null")])]


def test_publish_a_batch(api):
    api.backend.answers["publish"] = [Position("7-0", "e"), None]
    answer = api.request("POST", "/api/publish", {"messages": [{"topic": "a", "data": 1}, {"topic": "b", "data": "x"}]})
    assert answer.status == 200
    assert answer.json == {"results": [{"topic": "a", "offset": "7-0", "epoch": "e"},
                                       {"topic": "b", "offset": None, "epoch": None}]}
    assert api.backend.calls == [("publish", [("a", b"1"), ("b", b'"x"')])]


def test_a_batch_of_max_batch_messages_is_accepted_and_one_more_is_not(api):
    batch = [{"topic": "t", "data": i} for i in range(MAX_BATCH)]
    assert api.request("POST", "/api/publish", {"messages": batch}).status == 200
    answer = api.request("POST", "/api/publish", {"messages": [*batch, {"topic": "t", "data": 0}]})
    assert answer.status == 400
    assert answer.error() == ("bad_request", f"messages: {MAX_BATCH + 1} messages; at most {MAX_BATCH} per request")


@pytest.mark.parametrize(("body", "code", "message"), [
    ({"messages": []}, "bad_request", "messages: must not be empty"),
    ({"messages": {}}, "bad_request", "messages: must be a list"),
    ({"messages": [{"topic": "a", "data": 1}] * 3 + [{"topic": "", "data": 1}]}, "invalid_topic",
     "messages[3].topic: topic names must not be empty"),
    ({"messages": [{"topic": "a"}]}, "bad_request", "messages[0].data: required"),
    ({"messages": ["a"]}, "bad_request", "messages[0]: must be an object"),
    ({"messages": [{"topic": "a", "data": 1, "ttl": 5}]}, "bad_request", "messages[0].ttl: unknown field"),
    ({"messages": [{"topic": "a", "data": 1}], "topic": "a"}, "bad_request", "topic: unknown field"),
    ({"data": 1}, "bad_request", "topic: required"),
    ({"topic": "", "data": 1}, "invalid_topic", "topic: topic names must not be empty"),
    ({"topic": 5, "data": 1}, "invalid_topic", "topic: topic names must be strings"),
    ({"topic": "a b", "data": 1}, "invalid_topic", "topic: topic 'a b' has characters outside"),
    ({"topic": "x" * 33, "data": 1}, "invalid_topic", "topic: topic 'xxxx"),
    ({"topic": "a"}, "bad_request", "data: required"),
    ({"topic": "a", "data": 1, "extra": 2}, "bad_request", "extra: unknown field"),
    ({}, "bad_request", "topic: required"),
])
def test_publish_refuses_a_bad_field_and_names_it(api, body, code, message):
    answer = api.request("POST", "/api/publish", body)
    assert answer.status == 400
    assert answer.error()[0] == code
    assert answer.error()[1].startswith(message)
    assert api.backend.calls == []


def test_data_with_a_lone_surrogate_is_refused(api):
    answer = api.request("POST", "/api/publish", data=b'{"topic": "a", "data": "\\ud800"}')
    assert answer.status == 400 and answer.error()[1].startswith("data: contains a lone UTF-16 surrogate")


@pytest.mark.parametrize("body", [b"{", b"", b"  ", b"\xff\xfe", b'{"topic": "a", "data": NaN}',
                                  b'{"topic": "a", "data": -1e999}', b"[1]", b'"x"',
                                  b'{"topic": "a", "data": ' + b"[" * 1000 + b"]" * 1000 + b"}"])
def test_a_body_that_is_not_a_json_object_is_refused_saying_so(api, body):
    answer = api.request("POST", "/api/publish", data=body, headers={"Content-Type": "application/json"})
    assert answer.status == 400 and answer.error()[0] == "bad_request"
    assert "JSON" in answer.error()[1] or "empty" in answer.error()[1]
    assert api.backend.calls == []


TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4), max_leaves=12)


@given(JSON_VALUES)
def test_any_json_value_reaches_the_backend_as_its_compact_text(data):
    api = Api()
    api.request("POST", "/api/publish", {"topic": "t", "data": data})
    (_, [(_, payload)]), = api.backend.calls
    assert payload == json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    assert json.loads(payload) == data


# Content-Type and size


def test_a_content_type_other_than_json_is_refused(api):
    answer = api.request("POST", "/api/publish", data=b'{"topic": "a", "data": 1}',
                         headers={"Content-Type": "text/plain"})
    assert answer.status == 415 and answer.error()[0] == "unsupported_media_type"
    assert api.backend.calls == []


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_with_parameters_is_accepted(api, content_type):
    answer = api.request("POST", "/api/publish", data=b'{"topic": "a", "data": 1}', content_type=content_type)
    assert answer.status == 200


@pytest.mark.parametrize("route", [route for route in ROUTES if route.method == "POST"], ids=lambda route: route.name)
def test_a_post_without_content_type_is_refused_with_415(api, route):
    # What a page of another site can send without a CORS preflight: no Content-Type, or text/plain.
    path = re.sub(r"\{\w+\}", "x", route.path)
    answer = api.request("POST", path, {"topic": "a", "data": 1}, content_type=None)
    assert answer.status == 415
    assert answer.error() == ("unsupported_media_type", "a POST needs Content-Type: application/json")
    assert api.backend.calls == []


def test_a_body_over_max_body_is_refused_and_one_of_exactly_max_body_is_not(api):
    body = b'{"topic": "a", "data": 1}'
    padded = body + b" " * (MAX_BODY - len(body))
    assert api.request("POST", "/api/publish", data=padded).status == 200
    answer = api.request("POST", "/api/publish", data=padded + b" ")
    assert answer.status == 413 and answer.error() == ("payload_too_large",
                                                       f"the request body is over {MAX_BODY} bytes")
    assert len(api.backend.calls) == 1


def exchange(site: Any, request: bytes) -> tuple[Any, StringTransport]:
    """Feed raw HTTP to a channel of the real Site; the transport holds what it answered."""
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(request)
    return channel, transport


def parse_response(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"Transfer-Encoding: chunked" in head:
        body = re.sub(rb"(?:^|\r\n)[0-9a-f]+\r\n", b"", body)
    return status, json.loads(body)


def test_the_site_refuses_by_content_length_and_keeps_none_of_the_body():
    api = Api()
    assert api.site.noisy is False and api.site.timeOut == 60
    too_long = b'{"topic": "a", "data": "' + b"x" * MAX_BODY + b'"}'
    channel, transport = exchange(api.site, b"POST /api/publish HTTP/1.1\r\nHost: pushd.test\r\n"
                                            b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                                            b"Content-Length: %d\r\n\r\n" % len(too_long) + too_long)
    status, body = parse_response(transport.value())
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    assert api.backend.calls == []
    channel.connectionLost(Failure(ConnectionDone()))


@pytest.mark.parametrize(("size", "status"), [(MAX_BODY + 1, 413), (100, 200)])
def test_the_site_counts_the_actual_size_of_a_chunked_body(size, status):
    api = Api()
    body = b'{"topic": "a", "data": "' + b"x" * (size - 26) + b'"}'
    assert len(body) == size
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:50], body[50:])) + b"0\r\n\r\n"
    channel, transport = exchange(api.site, b"POST /api/publish HTTP/1.1\r\nHost: pushd.test\r\n"
                                            b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                                            b"Content-Type: application/json\r\n"
                                            b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
    assert parse_response(transport.value())[0] == status
    assert len(api.backend.calls) == (status == 200)
    channel.connectionLost(Failure(ConnectionDone()))


# authentication


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Bearer ", "Basic a2V5LW9uZQ==", KEY,
                                           f"Bearer {KEY}x"])
def test_a_missing_or_wrong_key_is_refused(api, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    answer = api.request("GET", "/api/topics", key=None, headers=headers)
    assert answer.status == 401 and answer.error()[0] == "unauthorized"
    assert answer.header("WWW-Authenticate").startswith('Bearer realm="pushd"')
    assert api.backend.calls == []


def test_every_configured_key_is_accepted(api):
    assert api.request("GET", "/api/topics", key=OTHER_KEY).status == 200
    assert api.request("GET", "/api/topics", key=None, headers={"Authorization": f"bearer {KEY}"}).status == 200


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.name)
def test_every_route_but_the_openapi_document_needs_a_key(api, route):
    path = re.sub(r"\{\w+\}", "x", route.path)
    answer = api.request(route.method, path, {"data": 1} if route.method == "POST" else None, key=None)
    assert (answer.status == 401) == route.auth


def test_without_configured_keys_no_key_is_asked_for():
    api = Api(keys=())
    assert api.request("GET", "/api/topics", key=None).status == 200


def test_an_empty_api_key_is_a_configuration_error():
    with pytest.raises(ValueError, match="api_keys"):
        api_site(FakeBackend(), api_keys=("",), max_body=MAX_BODY, limits=LIMITS)


# routing


@pytest.mark.parametrize("path", ["/", "/api", "/api/nope", "/api/nodes/", "/api/topicsx", "/api/publish/x"])
def test_an_unknown_route_is_404(api, path):
    answer = api.request("GET", path)
    assert answer.status == 404 and answer.error()[0] == "not_found"


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", "/api/publish", "POST"),
    ("POST", "/api/topics", "GET"),
    ("PUT", "/api/broadcast", "POST"),
    ("POST", "/api/connections/c1", "DELETE"),
    ("GET", "/api/users/u1/connections", "DELETE"),
])
def test_a_wrong_method_is_405_with_allow(api, method, path, allow):
    answer = api.request(method, path, key=None)
    assert answer.status == 405 and answer.error()[0] == "method_not_allowed"
    assert answer.header("Allow") == allow


# users, broadcasts, inspection and disconnects


def test_publish_to_a_user(api):
    answer = api.request("POST", "/api/users/al%C3%AFce%40example/publish", {"data": [1, "a"]})
    assert answer.status == 200 and answer.json == {"user": "alïce@example", "nodes": 2}
    assert api.backend.calls == [("publish_to_user", "alïce@example", b'[1,"a"]')]


@pytest.mark.parametrize(("user", "message"), [
    ("", "user: must not be empty"),
    ("a%2Fb", "user: must not contain '/'"),
    ("a" * 129, "user: longer than 128 characters"),
    ("a%0Ab", "user: must not contain control characters"),
    ("a%C2%85b", "user: must not contain control characters"),
    ("%FF", "user: is not UTF-8"),
])
def test_a_bad_user_id_is_refused(api, user, message):
    for method, path, body in (("POST", f"/api/users/{user}/publish", {"data": 1}),
                               ("DELETE", f"/api/users/{user}/connections", None)):
        answer = api.request(method, path, body)
        assert answer.status == 400 and answer.error()[1].startswith(message)
    assert api.backend.calls == []


def test_a_user_id_of_128_characters_is_accepted(api):
    assert api.request("POST", "/api/users/" + "u" * 128 + "/publish", {"data": 1}).status == 200


@pytest.mark.parametrize(("body", "message"), [
    ({}, "data: required"),
    ({"data": 1, "topic": "x"}, "topic: unknown field"),
])
def test_publish_to_a_user_names_a_bad_field(api, body, message):
    answer = api.request("POST", "/api/users/u/publish", body)
    assert answer.status == 400 and answer.error()[1].startswith(message)


def test_a_new_broadcast_is_accepted_with_202(api):
    answer = api.request("POST", "/api/broadcast", {"data": {"alert": "up"}, "key": "deploy-42"})
    assert answer.status == 202 and answer.json == {"id": "b-1", "duplicate": False}
    assert api.backend.calls == [("broadcast", b'{"alert":"up"}', "deploy-42")]


def test_a_duplicate_broadcast_answers_200_with_the_first_id(api):
    api.backend.answers["broadcast"] = ("b-first", False)
    answer = api.request("POST", "/api/broadcast", {"data": 1, "key": "deploy-42"})
    assert answer.status == 200 and answer.json == {"id": "b-first", "duplicate": True}


@pytest.mark.parametrize("body", [{"data": 1}, {"data": 1, "key": None}])
def test_a_broadcast_without_a_key(api, body):
    assert api.request("POST", "/api/broadcast", body).status == 202
    assert api.backend.calls == [("broadcast", b"1", None)]


@pytest.mark.parametrize(("body", "message"), [
    ({"data": 1, "key": ""}, "key: must be a non-empty string"),
    ({"data": 1, "key": "k" * 201}, "key: must be a non-empty string of at most 200"),
    ({"data": 1, "key": 7}, "key: must be a non-empty string"),
    ({"key": "k"}, "data: required"),
    ({"data": 1, "keys": "k"}, "keys: unknown field"),
])
def test_a_bad_broadcast_field_is_named(api, body, message):
    answer = api.request("POST", "/api/broadcast", body)
    assert answer.status == 400 and answer.error()[1].startswith(message)
    assert api.backend.calls == []


def test_a_broadcast_key_of_200_characters_is_accepted(api):
    assert api.request("POST", "/api/broadcast", {"data": 1, "key": "k" * 200}).status == 202


def test_broadcast_status_passes_the_backend_dict_through(api):
    answer = api.request("GET", "/api/broadcasts/b-1")
    assert answer.status == 200 and answer.json == {"id": "b-1", "nodes": {"n1": "done"}}


@pytest.mark.parametrize(("backend_call", "unknown", "method", "path", "message"), [
    ("broadcast_status", None, "GET", "/api/broadcasts/b-9", "no broadcast 'b-9'"),
    ("disconnect_connection", False, "DELETE", "/api/connections/c9", "no connection 'c9' on any node"),
])
def test_an_unknown_broadcast_or_connection_is_404(api, backend_call, unknown, method, path, message):
    api.backend.answers[backend_call] = unknown
    answer = api.request(method, path)
    assert answer.status == 404 and answer.error() == ("not_found", message)


def test_topics(api):
    answer = api.request("GET", "/api/topics")
    assert answer.status == 200 and answer.json == {"topics": {"chat": 3, "news": 1}}


@pytest.mark.parametrize(("path", "topic"), [("chat.1", "chat.1"), ("rooms/42", "rooms/42"), ("rooms%2F42", "rooms/42"),
                                             ("a%40b", "a@b")])
def test_one_topic_counts_its_subscribers_per_node(api, path, topic):
    answer = api.request("GET", f"/api/topics/{path}")
    assert answer.status == 200 and answer.json == {"topic": topic, "nodes": {"n1": 2, "n2": 5}, "subscribers": 7}
    assert api.backend.calls == [("topic", topic)]


@pytest.mark.parametrize("path", ["", "a%20b", "x" * 33, "a*"])
def test_an_invalid_topic_in_the_path_is_refused(api, path):
    answer = api.request("GET", f"/api/topics/{path}")
    assert answer.status == 400 and answer.error()[0] == "invalid_topic"
    assert answer.error()[1].startswith("topic: ")


def test_nodes(api):
    answer = api.request("GET", "/api/nodes")
    assert answer.status == 200 and answer.json == {"nodes": [{"id": "n1", "connections": 10}]}


def test_disconnect_a_connection_with_the_default_code_and_reason(api):
    answer = api.request("DELETE", "/api/connections/n1%3A17")
    assert answer.status == 200 and answer.json == {"disconnected": True}
    assert api.backend.calls == [("disconnect_connection", "n1:17", 4000, "disconnected by the server API")]


def test_disconnect_a_connection_with_a_code_and_reason(api):
    answer = api.request("DELETE", "/api/connections/c1?code=4999&reason=bye+n%C3%B6w")
    assert answer.status == 200
    assert api.backend.calls == [("disconnect_connection", "c1", 4999, "bye nöw")]


def test_disconnect_a_user(api):
    answer = api.request("DELETE", "/api/users/bob/connections?code=4001&reason=banned")
    assert answer.status == 200 and answer.json == {"user": "bob", "nodes": 3}
    assert api.backend.calls == [("disconnect_user", "bob", 4001, "banned")]


@pytest.mark.parametrize(("query", "message"), [
    ("code=3999", "code: must be an integer from 4000 to 4999"),
    ("code=5000", "code: must be an integer from 4000 to 4999"),
    ("code=abc", "code: must be an integer"),
    ("code=4000.0", "code: must be an integer"),
    ("code=+4000", "code: must be an integer"),
    ("code=", "code: must be an integer"),
    ("code=4000&code=4001", "code: given 2 times"),
    ("reason=" + "%C3%A9" * 61, "reason: 122 bytes; at most 120"),
    ("reason=%FF", "reason: is not UTF-8"),
])
def test_a_bad_close_code_or_reason_is_refused(api, query, message):
    for path in ("/api/connections/c1", "/api/users/bob/connections"):
        answer = api.request("DELETE", f"{path}?{query}")
        assert answer.status == 400 and answer.error()[1].startswith(message)
    assert api.backend.calls == []


def test_a_reason_of_120_bytes_is_accepted(api):
    assert api.request("DELETE", "/api/connections/c1?reason=" + "%C3%A9" * 60).status == 200
    assert api.backend.calls[0][3] == "é" * 60


@pytest.mark.parametrize("conn_id", ["", "a%2Fb", "c" * 129, "%7F"])
def test_a_bad_connection_id_is_refused(api, conn_id):
    answer = api.request("DELETE", f"/api/connections/{conn_id}")
    assert answer.status == 400 and answer.error()[1].startswith("conn_id: ")


# the backend failing, and clients leaving


#: One valid request per route that asks the backend.
SAMPLES: dict[str, tuple[str, str, Any]] = {
    "publish": ("POST", "/api/publish", {"topic": "t", "data": 1}),
    "publishToUser": ("POST", "/api/users/u/publish", {"data": 1}),
    "broadcast": ("POST", "/api/broadcast", {"data": 1}),
    "broadcastStatus": ("GET", "/api/broadcasts/b", None),
    "topics": ("GET", "/api/topics", None),
    "topic": ("GET", "/api/topics/t", None),
    "nodes": ("GET", "/api/nodes", None),
    "disconnectConnection": ("DELETE", "/api/connections/c", None),
    "disconnectUser": ("DELETE", "/api/users/u/connections", None),
    "centrifugo": ("POST", "/api/centrifugo/publish", {"channel": "t", "data": 1}),
    "createJob": ("POST", "/api/jobs", {"gateway": "webhook", "audience": "a", "title": "t"}),
    "listJobs": ("GET", "/api/jobs", None),
    "job": ("GET", "/api/jobs/j1", None),
    "jobFailures": ("GET", "/api/jobs/j1/failures", None),
    "jobAction": ("POST", "/api/jobs/j1/pause", None),
}


def test_every_route_that_asks_the_backend_has_a_sample():
    assert set(SAMPLES) == {route.name for route in ROUTES if route.name != "openapi"}


@pytest.mark.parametrize("raises", [False, True], ids=["failed Deferred", "raised"])
@pytest.mark.parametrize("name", SAMPLES)
def test_a_failing_backend_answers_503_and_logs_the_failure(failures, name, raises):
    api = Api()
    api.backend.failure = RuntimeError("redis exploded: secret-internal-detail")
    api.backend.raises = raises
    method, path, body = SAMPLES[name]
    answer = api.request(method, path, body)
    assert answer.status == 503 and answer.error()[0] == "unavailable"
    assert len(failures) == 1 and isinstance(failures[0]["log_failure"].value, RuntimeError)


@pytest.mark.parametrize("name", SAMPLES)
def test_a_backend_that_cannot_deliver_now_answers_503_with_its_reason_and_retry_after(failures, name):
    api = Api()
    api.backend.failure = Unavailable("this node is not receiving from Redis (reconnecting)")
    api.backend.raises = True
    method, path, body = SAMPLES[name]
    answer = api.request(method, path, body)
    assert answer.status == 503 and answer.header("Retry-After") == "1"
    assert answer.error() == ("unavailable", "this node is not receiving from Redis (reconnecting)")
    assert failures == []


def test_an_outage_is_one_warning_then_one_line_when_the_backend_answers_again(failures):
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        api = Api()
        api.site.resource.health = BackendHealth(clock=lambda: 7.0)
        api.backend.failure = TimeoutError("redis: EVAL on redis://127.0.0.1:6379 got no answer within 5s")
        for _ in range(3):
            assert api.request("POST", "/api/publish", {"topic": "t", "data": 1}).status == 503
        api.backend.failure = None
        assert api.request("POST", "/api/publish", {"topic": "t", "data": 1}).status == 200
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [formatEvent(e) for e in events if e.get("log_namespace") == "pushd.api"]
    assert said == [
        ("API: the push cluster cannot take requests (publish: redis: EVAL on redis://127.0.0.1:6379 got no answer "
         "within 5s); answering 503 until it can"),
        "API: the push cluster answers again after 0.0 s; 3 requests got 503"]
    assert failures == []


def test_a_backend_answer_the_api_cannot_use_is_500_without_a_traceback(api, failures):
    api.backend.answers["publish"] = []
    answer = api.request("POST", "/api/publish", {"topic": "t", "data": 1})
    assert answer.status == 500 and answer.error()[0] == "internal_error"
    assert len(failures) == 1


def test_a_client_that_leaves_before_the_backend_answers_causes_no_error(failures):
    api = Api()
    pending: Deferred[dict[str, int]] = Deferred()
    api.backend.answers["topics"] = pending
    channel, transport = exchange(api.site, b"GET /api/topics HTTP/1.1\r\nHost: pushd.test\r\n"
                                            b"Authorization: Bearer " + KEY.encode() + b"\r\n\r\n")
    assert api.backend.calls == [("topics",)]
    channel.connectionLost(Failure(ConnectionDone()))
    pending.callback({"chat": 1})
    assert transport.value() == b""
    assert failures == []


# pages of other sites (Origin) and CORS

APP = "https://app.example.com"


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:8081", "garbage"])
@pytest.mark.parametrize(("method", "path", "body"), [("POST", "/api/broadcast", {"data": 1}),
                                                      ("GET", "/api/topics", None)])
def test_without_api_cors_origins_every_request_from_a_web_page_is_refused(origin, method, path, body):
    api = Api(keys=())
    answer = api.request(method, path, body, key=None, headers={"Origin": origin})
    assert answer.status == 403 and answer.error()[0] == "forbidden"
    assert "api-cors-origins" in answer.error()[1]
    assert answer.header("Access-Control-Allow-Origin") is None and answer.header("Vary") == "Origin"
    assert api.backend.calls == []


def test_a_request_without_origin_is_not_a_web_page_and_is_answered():
    api = Api(keys=())
    answer = api.request("POST", "/api/broadcast", {"data": 1}, key=None)
    assert answer.status == 202 and answer.header("Access-Control-Allow-Origin") is None


def test_an_allowed_origin_is_answered_for_that_origin_alone():
    api = Api(cors=f"{APP} https://*.partner.example")
    for origin in (APP, "https://eu.partner.example"):
        answer = api.request("POST", "/api/publish", {"topic": "t", "data": 1}, headers={"Origin": origin})
        assert answer.status == 200
        assert answer.header("Access-Control-Allow-Origin") == origin and answer.header("Vary") == "Origin"
    for origin in ("https://app.example.com:8443", "http://app.example.com", "https://partner.example", "null"):
        assert api.request("GET", "/api/topics", headers={"Origin": origin}).status == 403
    assert len(api.backend.calls) == 2


def test_errors_to_an_allowed_origin_are_readable_by_its_page():
    api = Api(cors=APP)
    answer = api.request("GET", "/api/topics", key=None, headers={"Origin": APP})
    assert answer.status == 401 and answer.header("Access-Control-Allow-Origin") == APP


def test_a_preflight_from_an_allowed_origin_names_the_methods_and_headers_and_needs_no_key():
    api = Api(cors=APP)
    status, headers = api.preflight("/api/publish", APP)
    assert status == 204
    assert headers.getRawHeaders("Access-Control-Allow-Origin") == [APP]
    assert headers.getRawHeaders("Access-Control-Allow-Methods") == ["POST"]
    assert headers.getRawHeaders("Access-Control-Allow-Headers") == ["Authorization, Content-Type"]
    assert headers.getRawHeaders("Access-Control-Max-Age") == ["600"]
    assert headers.getRawHeaders("Vary") == ["Origin"]
    assert api.preflight("/api/users/u/connections", APP, "DELETE")[1].getRawHeaders(
        "Access-Control-Allow-Methods") == ["DELETE"]
    assert api.backend.calls == []


def test_a_preflight_from_another_origin_or_to_no_route_is_refused():
    api = Api(cors=APP)
    status, headers = api.preflight("/api/publish", "https://evil.example")
    assert status == 403 and headers.getRawHeaders("Access-Control-Allow-Origin") is None
    assert api.preflight("/api/nope", APP)[0] == 404
    # OPTIONS that is no preflight is a method the API does not have.
    assert api.request("OPTIONS", "/api/publish", headers={"Origin": APP}).status == 405


def test_star_allows_every_page_null_included():
    api = Api(cors="*")
    for origin in ("https://anything.example", "null"):
        answer = api.request("GET", "/api/topics", headers={"Origin": origin})
        assert answer.status == 200 and answer.header("Access-Control-Allow-Origin") == origin


# the OpenAPI document


def test_docs_openapi_json_is_what_pushd_openapi_generates():
    assert (ROOT / "docs" / "openapi.json").read_text(encoding="utf-8") == openapi.render(), \
        "docs/openapi.json is out of date: run python -m pushd.openapi"


def test_every_route_is_in_the_document_with_its_method_and_parameters():
    document = json.loads((ROOT / "docs" / "openapi.json").read_text(encoding="utf-8"))
    documented = {(path, method.upper()) for path, item in document["paths"].items() for method in item}
    assert documented == {(route.path, route.method) for route in ROUTES}
    for route in ROUTES:
        operation = document["paths"][route.path][route.method.lower()]
        assert operation["operationId"] == route.name and operation["summary"] == route.summary
        declared = {document["components"]["parameters"][ref["$ref"].rsplit("/", 1)[1]]["name"]
                    for ref in operation.get("parameters", []) if
                    document["components"]["parameters"][ref["$ref"].rsplit("/", 1)[1]]["in"] == "path"}
        assert declared == set(re.findall(r"\{(\w+)\}", route.path))
        assert ("security" in operation) == (not route.auth)


def test_every_reference_in_the_document_resolves():
    document = openapi.document()

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(document):
        target: Any = document
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]


def test_the_api_serves_its_document_without_a_key(api):
    answer = api.request("GET", "/api/openapi.json", key=None)
    assert answer.status == 200 and answer.json == openapi.document()
    assert answer.json["openapi"].startswith("3.1")


# the access log

def test_requests_are_logged_to_the_access_log_only_when_one_is_configured(tmp_path):
    path = tmp_path / "access.log"
    for access_log in ("", str(path)):
        site = api_site(FakeBackend(), api_keys=(), max_body=MAX_BODY, limits=LIMITS, access_log=access_log)
        site.startFactory()
        try:
            _, transport = exchange(site, b"GET /api/nodes HTTP/1.1\r\nHost: pushd.test\r\n\r\n")
            assert transport.value().startswith(b"HTTP/1.1 ")
        finally:
            site.stopFactory()
    assert re.search(r'"GET /api/nodes HTTP/1.1" \d{3} ', path.read_text())


# Centrifugo's server API (pushd/api_centrifugo.py): what its `cent` clients send and parse.


def centrifugo_api() -> Api:
    api = Api()
    api.backend.answers["publish"] = lambda messages: [
        Position(f"{i + 7}-0", "e1", seq=i + 7) if topic != "plain" else None for i, (topic, _) in enumerate(messages)]
    return api


def test_centrifugo_publish_answers_the_offset_as_the_topics_message_number():
    api = centrifugo_api()
    answer = api.request("POST", "/api/centrifugo/publish", {"channel": "chat", "data": {"text": "hi"}},
                         key=None, headers={"X-API-Key": KEY})
    assert (answer.status, answer.json) == (200, {"result": {"offset": 7, "epoch": "e1"}})
    assert api.backend.calls == [("publish", [("chat", b'{"text":"hi"}')])]
    assert api.request("POST", "/api/centrifugo/publish", {"channel": "plain", "data": 1}).json == {"result": {}}


def test_centrifugo_broadcast_publishes_one_message_to_each_channel():
    api = centrifugo_api()
    answer = api.request("POST", "/api/centrifugo/broadcast", {"channels": ["a", "b"], "data": 1},
                         key=None, headers={"Authorization": f"apikey {KEY}"})
    assert answer.json == {"result": {"responses": [{"result": {"offset": 7, "epoch": "e1"}},
                                                    {"result": {"offset": 8, "epoch": "e1"}}]}}
    assert api.backend.calls == [("publish", [("a", b"1"), ("b", b"1")])]


def test_centrifugo_disconnect_closes_a_user_or_one_connection():
    api = centrifugo_api()
    assert api.request("POST", "/api/centrifugo/disconnect", {"user": "u1"}).json == {"result": {}}
    assert api.request("POST", "/api/centrifugo/disconnect", {
        "user": "u1", "client": "n:3", "disconnect": {"code": 4500, "reason": "banned"}}).json == {"result": {}}
    assert api.backend.calls == [("disconnect_user", "u1", 4000, "disconnected by the server"),
                                 ("disconnect_connection", "n:3", 4500, "banned")]


def test_centrifugo_channels_filters_by_pattern():
    api = centrifugo_api()
    assert api.request("POST", "/api/centrifugo/channels", {}).json == {
        "result": {"channels": {"chat": {"num_clients": 3}, "news": {"num_clients": 1}}}}
    assert api.request("POST", "/api/centrifugo/channels", {"pattern": "c*"}).json == {
        "result": {"channels": {"chat": {"num_clients": 3}}}}


@pytest.mark.parametrize(("path", "body", "code"), [
    ("/api/centrifugo/presence", {"channel": "chat"}, 104),
    ("/api/centrifugo/publish", {"channel": "chat"}, 107),
    ("/api/centrifugo/publish", {"channel": "chat", "data": 1, "colour": "red"}, 107),
    ("/api/centrifugo/publish", {"channel": "chat", "data": 1, "b64data": "AA=="}, 108),
    ("/api/centrifugo/publish", {"channel": "chat", "data": 1, "skip_history": True}, 108),
    ("/api/centrifugo/publish", {"channel": "a b", "data": 1}, 102),
    ("/api/centrifugo/publish", {"channel": "news.*", "data": 1}, 102),
    ("/api/centrifugo/broadcast", {"channels": [], "data": 1}, 107),
    ("/api/centrifugo/disconnect", {"client": "n:3"}, 107),
    ("/api/centrifugo/disconnect", {"user": "u", "disconnect": {"code": 1000}}, 107),
])
def test_centrifugo_refusals_are_its_error_replies_and_nothing_is_sent(path, body, code):
    api = centrifugo_api()
    answer = api.request("POST", path, body)
    assert answer.status == 200 and answer.json["error"]["code"] == code, answer.json
    assert answer.json["error"]["message"]
    assert api.backend.calls == []


def test_centrifugo_api_needs_the_key_like_every_route():
    api = centrifugo_api()
    answer = api.request("POST", "/api/centrifugo/publish", {"channel": "c", "data": 1}, key=None,
                         headers={"X-API-Key": "wrong"})
    assert answer.status == 401
    assert api.request("POST", "/api/centrifugo/publish", {"channel": "c", "data": 1}, key=None).status == 401
    assert api.backend.calls == []
