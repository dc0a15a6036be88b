"""The fcm gateway against the fake FCM in memory (treq's RequestTraversalAgent, a Clock): the message shape, the OAuth2 token
shared, reused and renewed, each documented error's class, Retry-After, timeouts, the concurrency bound and
build()'s errors."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.task import Clock

from pushd.config import ConfigError, build_config
from pushd.gateways import base, fcm
from tests.fakes.fcm import FakeFcm, Reply, new_key

BASE = "http://127.0.0.1:9999"
NOW = 1_800_000_000.0
AUTH = base.Result(base.Outcome.FAILED, "auth")

# The in-memory transport cannot abort a connection; a TCP one, which readBody aborts on a timeout, can.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody with a transport that does not have an "
                                        "abortConnection method:DeprecationWarning")


@functools.cache
def key(name: str = "service") -> Any:
    """RSA keys are slow to make: one per name for the whole module."""
    return new_key()


def target(token: str, fields: dict[str, Any] | None = None, job: str = "j1") -> base.Target:
    return base.Target(token, fields or {}, base.idempotency_key(job, token))


def targets(n: int, prefix: str = "tok") -> list[base.Target]:
    return [target(f"{prefix}-{i:04d}") for i in range(n)]


class Harness:
    def __init__(self, tmp_path: Path, *, concurrency: int = 8, timeout: float = 10.0, fake: FakeFcm | None = None,
                 **knobs: Any) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.fake = fake or FakeFcm(BASE, key=key(), clock=self.clock, **knobs)
        self.fake.keep_messages = True
        self.agent = RequestTraversalAgent(self.fake)
        path = tmp_path / "service-account.json"
        path.write_text(json.dumps(self.fake.service_account()))
        self.account = fcm.load_service_account(str(path))
        self.gateway = fcm.FcmGateway(self.clock, self.agent, self.account, url=BASE, concurrency=concurrency,
                                      timeout=timeout)

    def send(self, message: base.Message, batch: Sequence[base.Target]) -> list[base.Result]:
        return self.wait(self.gateway.send(message, batch))

    def wait(self, d: defer.Deferred[Any]) -> Any:
        for _ in range(1000):
            self.agent.flush()
            if d.called:
                break
            self.clock.advance(0.5)
        box: list[Any] = []
        d.addBoth(box.append)
        assert box and not isinstance(box[0], Exception), box
        return box[0]


MESSAGE = base.Message("j1", "Hello $name", "Your order $order shipped", {"order": "$order", "kind": "ship"},
                       ttl=600)


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_the_fake_gets_the_rendered_message_in_fcm_v1_shape(h: Harness) -> None:
    t = target("tok-ann", {"name": "Ann", "order": 17})
    assert h.send(MESSAGE, [t]) == [base.SENT]
    assert h.fake.messages == [{
        "token": "tok-ann",
        "notification": {"title": "Hello Ann", "body": "Your order 17 shipped"},
        "data": {"order": "17", "kind": "ship", "pushd_key": t.key},
        "android": {"ttl": "600s"},
        "apns": {"headers": {"apns-expiration": str(int(NOW) + 600)}},
    }]
    assert h.fake.stats() == {"requests": 1, "refused": 0, "recipients": 1, "unique": 1, "duplicates": 0,
                              "token_requests": 1, "tokens_issued": 1, "errors": {}}


def test_no_title_nor_body_is_a_data_message_and_ttl_0_is_not_stored_by_apns(h: Harness) -> None:
    assert h.send(base.Message("j1", "", "", {"sync": "1"}, ttl=0), [target("tok-1")]) == [base.SENT]
    [sent] = h.fake.messages
    assert "notification" not in sent
    assert sent["android"] == {"ttl": "0s"}
    assert sent["apns"] == {"headers": {"apns-expiration": "0"}}


def test_the_assertion_carries_the_documented_claims(h: Harness) -> None:
    claims = jwt.decode(fcm.assertion(h.account, NOW), h.fake.public_key, algorithms=["RS256"],
                        audience=h.fake.token_uri, options={"verify_exp": False, "verify_iat": False})
    assert claims == {"iss": h.fake.client_email, "scope": fcm.SCOPE, "aud": f"{BASE}/token", "iat": int(NOW),
                      "exp": int(NOW) + 3600}


def test_one_token_request_for_many_concurrent_targets_and_batches(h: Harness) -> None:
    h.fake.latency = 1
    first = h.gateway.send(MESSAGE, targets(40, "a"))
    second = h.gateway.send(MESSAGE, targets(40, "b"))
    assert h.wait(first) == [base.SENT] * 40
    assert h.wait(second) == [base.SENT] * 40
    assert (h.fake.token_requests, h.gateway.tokens.requests, h.fake.recipients) == (1, 1, 80)


def test_the_token_is_reused_until_five_minutes_before_it_expires(h: Harness) -> None:
    assert h.send(MESSAGE, [target("tok-1")]) == [base.SENT]
    h.clock.advance(3600 - fcm.RENEW_BEFORE - 1)
    assert h.send(MESSAGE, [target("tok-2")]) == [base.SENT]
    assert h.fake.tokens_issued == 1
    h.clock.advance(2)
    assert h.send(MESSAGE, [target("tok-3")]) == [base.SENT]
    assert h.fake.tokens_issued == 2
    assert h.fake.refused == 0, "renewed before the fake would have refused it"


def test_a_short_lived_token_is_renewed_halfway(tmp_path: Path) -> None:
    h = Harness(tmp_path, token_ttl=60)
    assert h.send(MESSAGE, [target("tok-1")]) == [base.SENT]
    h.clock.advance(29)
    assert h.send(MESSAGE, [target("tok-2")]) == [base.SENT]
    h.clock.advance(2)
    assert h.send(MESSAGE, [target("tok-3")]) == [base.SENT]
    assert (h.fake.tokens_issued, h.fake.refused) == (2, 0)


def test_a_revoked_access_token_is_fetched_again_once_for_all_and_the_targets_resent(h: Harness) -> None:
    assert h.send(MESSAGE, [target("tok-0")]) == [base.SENT]
    h.fake.tokens.clear()
    h.fake.latency = 1
    assert h.send(MESSAGE, targets(20)) == [base.SENT] * 20
    assert h.fake.tokens_issued == 2
    assert h.fake.refused == 8, "the 8 in flight with the old token, each sent once more with the new one"
    assert (len(h.fake.keys), h.fake.duplicates) == (21, 0)


def test_an_access_token_refused_twice_is_auth(h: Harness) -> None:
    h.fake.fail(2, 401, "UNAUTHENTICATED")
    assert h.send(MESSAGE, [target("tok-1")]) == [AUTH]
    assert h.fake.tokens_issued == 2
    assert h.fake.recipients == 0


def test_the_token_endpoint_refusing_the_account_fails_every_target_auth_without_a_send(tmp_path: Path) -> None:
    h = Harness(tmp_path, refuse_credentials=True)
    assert h.send(MESSAGE, targets(5)) == [AUTH] * 5
    assert (h.fake.token_requests, h.fake.requests) == (1, 0)


def test_a_key_the_token_endpoint_does_not_know_is_auth(h: Harness) -> None:
    revoked = fcm.ServiceAccount(h.account.project_id, h.account.client_email, key("other"), h.account.token_uri)
    gateway = fcm.FcmGateway(h.clock, h.agent, revoked, url=BASE, concurrency=8, timeout=10)
    assert h.wait(gateway.send(MESSAGE, targets(2))) == [AUTH] * 2
    assert (h.fake.token_requests, h.fake.tokens_issued) == (1, 0)


class TokenEndpointDown(FakeFcm):
    def _token(self, request: Any) -> Reply:
        self.token_requests += 1
        return 503, {}, {"error": "backend_error"}


def test_the_token_endpoint_failing_is_a_retry(tmp_path: Path) -> None:
    h = Harness(tmp_path, fake=TokenEndpointDown(BASE, key=key()))
    assert h.send(MESSAGE, targets(3)) == [base.Result(base.Outcome.RETRY, "token-http-503")] * 3
    assert (h.fake.token_requests, h.fake.requests) == (1, 0)


def test_a_slow_token_endpoint_is_a_timeout_retry(tmp_path: Path) -> None:
    h = Harness(tmp_path, timeout=5)
    h.fake.latency = 60
    assert h.send(MESSAGE, targets(2)) == [base.Result(base.Outcome.RETRY, "token-timeout")] * 2


def test_a_slow_send_is_a_timeout_retry(tmp_path: Path) -> None:
    h = Harness(tmp_path, timeout=5)
    assert h.send(MESSAGE, [target("tok-1")]) == [base.SENT]
    h.fake.latency = 60
    assert h.send(MESSAGE, [target("tok-2")]) == [base.Result(base.Outcome.RETRY, "timeout")]


class SendsRefused:
    """Tokens from the fake, every send refused at connect."""

    def __init__(self, agent: RequestTraversalAgent, token_too: bool = False) -> None:
        self.agent, self.token_too = agent, token_too

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> defer.Deferred[Any]:
        if uri.endswith(b"/token") and not self.token_too:
            return self.agent.request(method, uri, headers, body)  # type: ignore[no-any-return]
        return defer.fail(ConnectionRefusedError("refused"))


@pytest.mark.parametrize(("token_too", "reason"), [(False, "connect"), (True, "token-connect")])
def test_connection_errors_are_retries(h: Harness, token_too: bool, reason: str) -> None:
    gateway = fcm.FcmGateway(h.clock, SendsRefused(h.agent, token_too), h.account, url=BASE, concurrency=8,
                             timeout=10)
    assert h.wait(gateway.send(MESSAGE, targets(2))) == [base.Result(base.Outcome.RETRY, reason)] * 2


def test_at_most_concurrency_requests_in_flight(tmp_path: Path) -> None:
    h = Harness(tmp_path, concurrency=3)
    h.fake.latency = 2
    assert h.send(MESSAGE, targets(10)) == [base.SENT] * 10
    assert h.fake.max_in_flight == 3
    assert h.fake.recipients == 10


def test_dead_and_malformed_tokens_are_invalid_the_rest_sent(h: Harness) -> None:
    assert h.send(MESSAGE, [target("dead-1"), target("bad-2"), target("tok-3")]) == [
        base.Result(base.Outcome.INVALID, "UNREGISTERED"),
        base.Result(base.Outcome.INVALID, "invalid-token"),
        base.SENT,
    ]
    assert h.fake.errors == {"UNREGISTERED": 1, "INVALID_ARGUMENT": 1}


@pytest.mark.parametrize(("status", "error_status", "code", "text", "retry_after", "expected"), [
    (404, "NOT_FOUND", "UNREGISTERED", "", None, base.Result(base.Outcome.INVALID, "UNREGISTERED")),
    (403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH", "SenderId mismatch", None,
     base.Result(base.Outcome.INVALID, "SENDER_ID_MISMATCH")),
    (400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "Invalid value at 'message.data[0].value'", None,
     base.Result(base.Outcome.FAILED, "INVALID_ARGUMENT")),
    (400, "INVALID_ARGUMENT", None, "Invalid JSON payload received.", None,
     base.Result(base.Outcome.FAILED, "INVALID_ARGUMENT")),
    (400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token",
     None, base.Result(base.Outcome.INVALID, "invalid-token")),
    (400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "Message is too big", None,
     base.Result(base.Outcome.FAILED, "too-large")),
    (429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "", "7", base.Result(base.Outcome.RETRY, "QUOTA_EXCEEDED", 7.0)),
    (429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "", None,
     base.Result(base.Outcome.RETRY, "QUOTA_EXCEEDED", fcm.QUOTA_DEFAULT_WAIT)),
    (503, "UNAVAILABLE", "UNAVAILABLE", "", "3", base.Result(base.Outcome.RETRY, "UNAVAILABLE", 3.0)),
    (503, "UNAVAILABLE", "UNAVAILABLE", "", None, base.Result(base.Outcome.RETRY, "UNAVAILABLE")),
    (500, "INTERNAL", "INTERNAL", "", None, base.Result(base.Outcome.RETRY, "INTERNAL")),
    (401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR", "", None,
     base.Result(base.Outcome.FAILED, "THIRD_PARTY_AUTH_ERROR")),
    (403, "PERMISSION_DENIED", None, "", None, AUTH),
    (404, "NOT_FOUND", None, "", None, base.Result(base.Outcome.FAILED, "http-404")),
])
def test_each_documented_error(h: Harness, status: int, error_status: str, code: str | None, text: str,
                               retry_after: str | None, expected: base.Result) -> None:
    h.fake.fail(1, status, error_status, code, text, retry_after)
    assert h.send(MESSAGE, [target("tok-1")]) == [expected]
    assert h.send(MESSAGE, [target("tok-2")]) == [base.SENT]
    assert h.fake.tokens_issued == 1, "only a refused access token is fetched again"


def test_a_whole_batch_of_another_projects_tokens_pauses_instead_of_emptying_the_audience(h: Harness) -> None:
    h.fake.fail(10, 403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH", "SenderId mismatch")
    assert h.send(MESSAGE, [target(f"tok-{n}") for n in range(10)]) == \
        [base.Result(base.Outcome.FAILED, base.MISCONFIGURED)] * 10
    h.fake.fail(1, 403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH", "SenderId mismatch")
    assert h.send(MESSAGE, [target(f"tok-{n}") for n in range(10)]) == \
        [base.Result(base.Outcome.INVALID, "SENDER_ID_MISMATCH")] + [base.SENT] * 9


def test_a_reply_that_is_not_googles_error_shape_is_classified_by_its_status(h: Harness) -> None:
    h.fake.fail_next = [(502, {}, {}), (418, {}, {"error": "teapot"})]
    assert h.send(MESSAGE, [target("tok-1")]) == [base.Result(base.Outcome.RETRY, "http-502")]
    assert h.send(MESSAGE, [target("tok-2")]) == [base.Result(base.Outcome.FAILED, "http-418")]


def test_another_project_than_the_credentials_is_auth(h: Harness) -> None:
    other = fcm.ServiceAccount("someone-else", h.account.client_email, key(), h.account.token_uri)
    gateway = fcm.FcmGateway(h.clock, h.agent, other, url=BASE, concurrency=8, timeout=10)
    assert h.wait(gateway.send(MESSAGE, [target("tok-1")])) == [AUTH]


def test_too_large_is_refused_past_4096_payload_bytes_without_a_request(h: Harness) -> None:
    t = target("tok-1")
    skeleton = len("pushd_key") + len(t.key) + len("title")
    exact = base.Message("j1", "title", "é" * ((fcm.MAX_PAYLOAD - skeleton) // 2) + "x" * ((fcm.MAX_PAYLOAD
                                                                                          - skeleton) % 2))
    too_big = base.Message("j1", "title", exact.body + "x")
    assert fcm.payload_size({"title": exact.title, "body": exact.body}, {"pushd_key": t.key}) == fcm.MAX_PAYLOAD
    assert h.send(exact, [t]) == [base.SENT]
    assert h.send(too_big, [t, target("tok-2")]) == [base.Result(base.Outcome.FAILED, "too-large")] * 2
    assert h.fake.requests == 1
    assert h.fake.errors == {}, "what the gateway sends the fake accepts: both count the same bytes"


def test_a_send_of_only_too_large_targets_asks_for_no_token(h: Harness) -> None:
    assert h.send(base.Message("j1", "x" * 5000, ""), targets(2)) == [base.Result(base.Outcome.FAILED,
                                                                                  "too-large")] * 2
    assert h.fake.token_requests == 0


def test_close_without_a_pool(h: Harness) -> None:
    closed: list[Any] = []
    h.gateway.close().addCallback(closed.append)
    assert closed == [None]


# -- build() ----------------------------------------------------------------------------------------------------


def write(path: Path, doc: Any) -> str:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def account_doc() -> dict[str, str]:
    return FakeFcm(BASE, key=key()).service_account()


def build(credentials: str, **settings: str) -> fcm.FcmGateway:
    return fcm.build(Clock(), build_config({"fcm-credentials": credentials, **settings}), None)  # type: ignore[arg-type]


def test_build_reads_the_service_account(tmp_path: Path) -> None:
    gateway = build(write(tmp_path / "sa.json", account_doc()), **{"fcm-url": "https://fcm.example/"})
    assert gateway.name == "fcm"
    assert gateway.send_url == "https://fcm.example/v1/projects/pushd-test/messages:send"


def ec_pem() -> str:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


@pytest.mark.parametrize(("doc", "message"), [
    (None, r"^fcm-credentials: cannot read .*missing\.json: No such file or directory$"),
    ("{not json", r"^fcm-credentials: .* is not JSON \(expected a service-account key file\)$"),
    ([1, 2], r"^fcm-credentials: .* is not a service-account key \(a JSON object\)$"),
    ({"project_id": ""}, (r"^fcm-credentials: .* has no project_id \(a service-account key file has project_id, "
                          r"client_email, private_key, token_uri\)$")),
    ({"client_email": None}, r"^fcm-credentials: .* has no client_email "),
    ({"private_key": None}, r"^fcm-credentials: .* has no private_key "),
    ({"token_uri": None}, r"^fcm-credentials: .* has no token_uri "),
    ({"private_key": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"},
     r"^fcm-credentials: private_key in .* is not an RSA private key in PEM$"),
    ({"private_key": "ec"}, r"^fcm-credentials: private_key in .* is not an RSA private key in PEM$"),
    ({"token_uri": "oauth2.example/token"}, (r"^fcm-credentials: token_uri 'oauth2.example/token' in .* is not "
                                             r"an http:// or https:// URL$")),
])
def test_build_names_what_is_wrong_with_the_credentials(tmp_path: Path, doc: Any, message: str) -> None:
    if doc is None:
        path = str(tmp_path / "missing.json")
    elif isinstance(doc, dict):
        fields = {k: (ec_pem() if v == "ec" else v) for k, v in doc.items()}
        path = write(tmp_path / "sa.json", {k: v for k, v in {**account_doc(), **fields}.items() if v is not None})
    else:
        path = write(tmp_path / "sa.json", doc)
    with pytest.raises(ConfigError, match=message) as raised:
        build(path)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("url", ["fcm.googleapis.com", "ftp://fcm.example", "https://"])
def test_build_refuses_an_fcm_url_that_is_not_http(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match=f"^fcm-url: {url!r} is not an http:// or https:// URL$"):
        build(write(tmp_path / "sa.json", account_doc()), **{"fcm-url": url})


def test_build_with_an_unreadable_gateway_ca_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^gateway-ca: cannot read"):
        build(write(tmp_path / "sa.json", account_doc()), **{"gateway-ca": str(tmp_path / "none.pem")})
