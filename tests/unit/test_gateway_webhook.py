"""The webhook gateway against the fake receiver, in memory (treq's RequestTraversalAgent: no sockets)."""

from __future__ import annotations

import json

import pytest
import treq
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web import resource

from pushd.config import ConfigError, build_config
from pushd.gateways import webhook
from pushd.gateways.base import Message, Outcome, Result, Target
from tests.fakes.webhook import Receiver

NOW = 1_800_000_000.0


def targets(n: int, **fields: str) -> list[Target]:
    return [Target(f"+4700000{i:03d}", fields, f"j1-k{i}") for i in range(n)]


def send(gateway: webhook.WebhookGateway, message: Message, batch: list[Target]) -> list[Result]:
    d = gateway.send(message, batch)
    results: list[Result] = []
    d.addCallback(results.extend)
    gateway.http.flush()  # type: ignore[attr-defined]
    assert d.called, "the in-memory agent has answered"
    return results


def gateway_for(root: resource.Resource, secret: str = "s3cret", concurrency: int = 8) -> webhook.WebhookGateway:
    http = StubTreq(root)
    gateway = webhook.WebhookGateway(Clock(), "http://hooks.example/hook", secret, http=http, timeout=10,
                                     concurrency=concurrency, clock=lambda: NOW)
    gateway.http = http  # type: ignore[attr-defined]
    return gateway


def test_a_batch_is_one_signed_request_and_everyone_is_sent():
    receiver = Receiver("s3cret", now=lambda: NOW)
    receiver.keep_bodies = True
    results = send(gateway_for(receiver), Message("j1", "Hi $name", "b", {"u": "$name"}), targets(3, name="Ann"))
    assert results == [Result(Outcome.SENT)] * 3
    assert receiver.stats() == {"requests": 1, "refused": 0, "recipients": 3, "unique": 3, "duplicates": 0}
    (body,) = receiver.bodies
    assert body["job"] == "j1"
    assert body["messages"][0] == {"key": "j1-k0", "address": "+4700000000", "title": "Hi Ann", "body": "b",
                                   "data": {"u": "Ann"}}


def test_a_wrong_secret_is_refused_and_counted_as_an_auth_failure():
    receiver = Receiver("other", now=lambda: NOW)
    assert send(gateway_for(receiver), Message("j1", "t", ""), targets(2)) == [Result(Outcome.FAILED, "auth")] * 2
    assert receiver.refused == 1


def test_an_old_timestamp_is_refused():
    receiver = Receiver("s3cret", now=lambda: NOW + webhook_window() + 1)
    assert send(gateway_for(receiver), Message("j1", "t", ""), targets(1))[0].reason == "auth"


def webhook_window() -> int:
    from tests.fakes.webhook import REPLAY_WINDOW
    return REPLAY_WINDOW


def test_the_receiver_classifies_each_recipient():
    receiver = Receiver("s3cret", invalid_every=2, now=lambda: NOW)
    results = send(gateway_for(receiver), Message("j1", "t", ""), targets(4))
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.INVALID, Outcome.SENT, Outcome.INVALID]
    assert results[1].reason == "unknown-number"


def test_back_pressure_carries_retry_after():
    receiver = Receiver("s3cret", fail_first=1, now=lambda: NOW)
    gateway = gateway_for(receiver)
    assert send(gateway, Message("j1", "t", ""), targets(2)) == [Result(Outcome.RETRY, "http-503", 1.0)] * 2
    assert send(gateway, Message("j1", "t", ""), targets(2)) == [Result(Outcome.SENT)] * 2


class Answer(resource.Resource):
    isLeaf = True

    def __init__(self, status: int, body: bytes = b"", headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__()
        self.status, self.body, self.headers = status, body, headers or {}

    def render_POST(self, request):  # type: ignore[no-untyped-def]
        request.setResponseCode(self.status)
        for k, v in self.headers.items():
            request.setHeader(k, v)
        return self.body


@pytest.mark.parametrize("status, body, headers, expected", [
    (500, b"", {}, Result(Outcome.RETRY, "http-500")),
    (429, b"", {b"retry-after": b"30"}, Result(Outcome.RETRY, "http-429", 30.0)),
    (413, b"", {}, Result(Outcome.FAILED, "too-large")),
    (400, b"", {}, Result(Outcome.FAILED, "http-400")),
    (200, b"not json", {}, Result(Outcome.SENT)),
    (200, json.dumps({"results": [{"key": "j1-k0", "status": "retry", "reason": "busy"}]}).encode(), {},
     Result(Outcome.RETRY, "busy")),
    (200, json.dumps({"results": [{"key": "j1-k0", "status": "nonsense"}]}).encode(), {}, Result(Outcome.SENT)),
])
def test_answers_are_classified(status, body, headers, expected):
    assert send(gateway_for(Answer(status, body, headers)), Message("j1", "t", ""), targets(1)) == [expected]


class Never:
    """An agent whose requests never answer, to drive the timeout with a Clock."""

    def __init__(self) -> None:
        self.cancelled = 0

    def request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        def cancel(d: defer.Deferred) -> None:
            self.cancelled += 1

        return defer.Deferred(cancel)


def test_a_request_that_never_answers_is_retried_after_the_timeout_and_the_next_batch_waits_for_a_slot():
    clock, agent = Clock(), Never()
    gateway = webhook.WebhookGateway(clock, "http://hooks.example/hook", "s", http=treq.client.HTTPClient(agent),
                                     timeout=10,
                                     concurrency=1)
    first = gateway.send(Message("j1", "t", ""), targets(2))
    second = gateway.send(Message("j1", "t", ""), targets(1))
    results: list[Result] = []
    later: list[Result] = []
    first.addCallback(results.extend)
    second.addCallback(later.extend)
    clock.advance(9.9)
    assert results == []
    clock.advance(0.1)
    assert results == [Result(Outcome.RETRY, "timeout")] * 2
    assert agent.cancelled == 1
    assert later == [], "concurrency 1: the second batch had to wait for the first one's slot"
    clock.advance(10)
    assert later == [Result(Outcome.RETRY, "timeout")]


def test_build_names_the_missing_setting():
    with pytest.raises(ConfigError, match="^webhook-secret: required"):
        webhook.build(Clock(), build_config({"webhook-url": "https://x.example/h"}), None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="^webhook-url: 'ftp://x' is not"):
        webhook.build(Clock(), build_config({"webhook-url": "ftp://x", "webhook-secret": "s"}), None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="^gateway-ca: cannot read '/nonexistent.pem'"):
        webhook.build(Clock(), build_config({"webhook-url": "https://x.example/h", "webhook-secret": "s",
                                             "gateway-ca": "/nonexistent.pem"}), None)  # type: ignore[arg-type]
