"""The apns gateway without sockets: the payload and headers, the reply table, the provider token on a Clock, and
the request path against the fake APNs through an httpx.MockTransport with the task pool run inline; build()'s
errors name their setting."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer
from twisted.internet.task import Clock

from pushd.config import Config, ConfigError
from pushd.gateways import apns, base
from tests.fakes.apns import Credentials, FakeApns, new_credentials
from tests.unit.test_gateway_webpush import InlineTasks

URL = "https://apns.test"
TOKEN = "ab" * 32
MESSAGE = base.Message("j1", "Hello $name", "Your order $order shipped", {"order": "$order", "kind": "ship"})


def target(address: str = TOKEN, fields: dict[str, Any] | None = None, job: str = "j1") -> base.Target:
    return base.Target(address, fields or {}, base.idempotency_key(job, address))


def device(n: int, prefix: str = "") -> str:
    return prefix + f"{n:x}".rjust(64 - len(prefix), "0")


def result_of(d: defer.Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box and not isinstance(box[0], Exception), box
    return box[0]


class Harness:
    """The gateway and the fake APNs sharing one Clock; `skew` puts the gateway's clock behind the fake's."""

    def __init__(self, tmp_path: Path, *, concurrency: int = 4, skew: float = 0.0,
                 credentials: Credentials | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.credentials = credentials or new_credentials(str(tmp_path / "apple"))
        self.fake = FakeApns(self.credentials, self.clock.seconds)
        #: Set to an exception to make every request fail with it instead of reaching the fake.
        self.broken: Exception | None = None
        self.client = httpx.Client(transport=httpx.MockTransport(self._handle))
        self.tasks = InlineTasks()
        self.key = apns.load_key(self.credentials.key_path)
        self.skew = skew
        self.token = self.provider_token(self.credentials.key_id, self.credentials.team_id)
        self.clients = apns.ThreadClients(lambda: self.client)
        self.gateway = apns.ApnsGateway(self.clients, URL, self.credentials.topic, self.token, self.tasks,
                                        concurrency, seconds=self.gateway_seconds)

    def gateway_seconds(self) -> float:
        return self.clock.seconds() - self.skew

    def provider_token(self, key_id: str, team_id: str) -> apns.ProviderToken:
        return apns.ProviderToken(self.key, key_id, team_id, self.gateway_seconds)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        if self.broken is not None:
            raise self.broken
        status, headers, body = self.fake.answer(request.method, request.url.path, dict(request.headers),
                                                 request.content, http2=True)
        return httpx.Response(status, headers=headers, content=body)

    def send(self, message: base.Message, targets: Sequence[base.Target]) -> list[base.Result]:
        results: list[base.Result] = result_of(self.gateway.send(message, targets))
        return results


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


# The pure parts


def test_the_payload_is_the_rendered_alert_the_data_keys_and_the_idempotency_key() -> None:
    t = target(fields={"name": "Ann", "order": "A-17"})
    assert json.loads(apns.payload(MESSAGE, t)) == {
        "aps": {"alert": {"title": "Hello Ann", "body": "Your order A-17 shipped"}},
        "order": "A-17",
        "kind": "ship",
        "pushd_key": t.key,
    }
    assert b" " not in apns.payload(base.Message("j1", "t", "b"), t)  # compact: every byte counts toward 4096


def test_a_data_key_cannot_replace_aps_or_the_idempotency_key() -> None:
    t = target()
    doc = json.loads(apns.payload(base.Message("j1", "t", "b", {"aps": "x", "pushd_key": "forged"}), t))
    assert doc == {"aps": {"alert": {"title": "t", "body": "b"}}, "pushd_key": t.key}


def test_headers_carry_the_topic_the_token_and_ids_stable_across_retries() -> None:
    t = target()
    headers = apns.request_headers("com.example.app", "JWT", base.Message("j1", "t", "b", ttl=600), t, 1000.5)
    assert headers == {
        "authorization": "bearer JWT",
        "apns-topic": "com.example.app",
        "apns-push-type": "alert",
        "apns-priority": "10",
        "apns-expiration": "1600",
        "apns-id": str(uuid.uuid5(apns.APNS_ID_NAMESPACE, t.key)),
        "apns-collapse-id": t.key,
    }
    again = apns.request_headers("com.example.app", "JWT", base.Message("j1", "t", "b", ttl=600), target(), 2000)
    assert again["apns-id"] == headers["apns-id"] != apns.apns_id(target(job="j2").key)
    assert uuid.UUID(headers["apns-id"]).version == 5


def test_a_ttl_of_zero_asks_apns_to_try_once_and_keep_nothing() -> None:
    headers = apns.request_headers("t", "JWT", base.Message("j1", "t", "b", ttl=0), target(), 1000)
    assert headers["apns-expiration"] == "0"


def test_a_collapse_id_never_exceeds_64_bytes() -> None:
    assert apns.collapse_id("k" * 64) == "k" * 64
    long = apns.collapse_id("k" * 65)
    assert len(long.encode()) <= 64 and long == apns.collapse_id("k" * 65) != apns.collapse_id("k" * 66)
    assert len(target().key) <= 64  # the keys pushd makes fit as they are


@pytest.mark.parametrize(("address", "ok"), [
    (TOKEN, True), ("DEADBEEF" * 8, True), ("ab" * 100, True), ("", False), ("ab" * 101, False),
    ("zz" * 32, False), (TOKEN + "/../../x", False), (TOKEN + "?a=b", False), ("ab cd", False),
])
def test_device_tokens_are_hex(address: str, ok: bool) -> None:
    assert apns.device_token_ok(address) is ok


@pytest.mark.parametrize(("status", "reason", "expected"), [
    (200, "", base.SENT),
    (410, "Unregistered", base.Result(base.Outcome.INVALID, "Unregistered")),
    (410, "ExpiredToken", base.Result(base.Outcome.INVALID, "ExpiredToken")),
    (410, "", base.Result(base.Outcome.INVALID, "Unregistered")),
    (400, "BadDeviceToken", base.Result(base.Outcome.INVALID, "BadDeviceToken")),
    (400, "DeviceTokenNotForTopic", base.Result(base.Outcome.INVALID, "DeviceTokenNotForTopic")),
    (400, "BadTopic", base.Result(base.Outcome.FAILED, "BadTopic")),
    (400, "PayloadEmpty", base.Result(base.Outcome.FAILED, "PayloadEmpty")),
    (400, "", base.Result(base.Outcome.FAILED, "http-400")),
    (403, "InvalidProviderToken", base.Result(base.Outcome.FAILED, "auth")),
    (403, "MissingProviderToken", base.Result(base.Outcome.FAILED, "auth")),
    (403, "BadCertificate", base.Result(base.Outcome.FAILED, "auth")),
    (403, "ExpiredProviderToken", base.Result(base.Outcome.FAILED, "auth")),  # after the one renewal
    (404, "BadPath", base.Result(base.Outcome.FAILED, "BadPath")),
    (405, "MethodNotAllowed", base.Result(base.Outcome.FAILED, "MethodNotAllowed")),
    (413, "PayloadTooLarge", base.Result(base.Outcome.FAILED, "too-large")),
    (429, "TooManyRequests", base.Result(base.Outcome.RETRY, "TooManyRequests")),
    (429, "TooManyProviderTokenUpdates",
     base.Result(base.Outcome.RETRY, "TooManyProviderTokenUpdates", apns.TOO_MANY_REQUESTS_WAIT)),
    (500, "InternalServerError", base.Result(base.Outcome.RETRY, "InternalServerError")),
    (503, "ServiceUnavailable", base.Result(base.Outcome.RETRY, "ServiceUnavailable")),
    (503, "Shutdown", base.Result(base.Outcome.RETRY, "Shutdown")),
    (502, "", base.Result(base.Outcome.RETRY, "http-502")),
])
def test_each_reply_class(status: int, reason: str, expected: base.Result) -> None:
    assert apns.classify(status, reason) == expected


@pytest.mark.parametrize(("body", "reason"), [
    (b'{"reason": "BadTopic"}', "BadTopic"),
    (b'{"reason": "Unregistered", "timestamp": 1700000000000}', "Unregistered"),
    (b"", ""), (b"not json", ""), (b"[]", ""), (b'{"reason": 7}', ""), (b'{"reason": "two words"}', ""),
])
def test_the_reason_of_an_error_body(body: bytes, reason: str) -> None:
    assert apns.reason_of(body) == reason


def test_shares_keep_the_order_and_split_evenly() -> None:
    targets = [target(device(n)) for n in range(10)]
    runs = apns.shares(targets, 4)
    assert [len(r) for r in runs] == [3, 3, 2, 2]
    assert [t for run in runs for t in run] == targets
    assert [len(r) for r in apns.shares(targets[:2], 4)] == [1, 1]


# The provider token


def test_the_provider_token_is_es256_with_kid_iss_and_iat(h: Harness) -> None:
    token = h.token.current()
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": h.credentials.key_id, "typ": "JWT"}
    claims = jwt.decode(token, h.credentials.public_key(), algorithms=["ES256"], options={"verify_iat": False})
    assert claims == {"iss": h.credentials.team_id, "iat": int(h.clock.seconds())}


def test_the_provider_token_is_reused_for_40_minutes_then_renewed(h: Harness) -> None:
    first = h.token.current()
    h.clock.advance(apns.TOKEN_RENEW_AFTER - 1)
    assert h.token.current() is first
    h.clock.advance(1)
    renewed = h.token.current()
    assert renewed != first
    claims = jwt.decode(renewed, h.credentials.public_key(), algorithms=["ES256"], options={"verify_iat": False})
    assert claims["iat"] == int(h.clock.seconds())
    assert h.token.current() is renewed


def test_threads_refused_the_same_token_share_one_renewal(h: Harness) -> None:
    stale = h.token.current()
    h.clock.advance(1)
    renewed = h.token.refused(stale)
    assert renewed != stale
    assert h.token.refused(stale) is renewed  # another thread's refusal of the old token signs nothing new
    assert h.token.current() is renewed


# The request path, against the fake


def test_the_fake_receives_the_rendered_notification(h: Harness) -> None:
    t = target(fields={"name": "Ann", "order": "A-17"})
    assert h.send(MESSAGE, [t]) == [base.SENT]
    assert h.fake.received[TOKEN] == [json.loads(apns.payload(MESSAGE, t))]
    [headers] = h.fake.headers
    assert headers["apns-topic"] == h.credentials.topic
    assert headers["apns-id"] == apns.apns_id(t.key)
    assert headers["apns-collapse-id"] == t.key
    assert headers["apns-expiration"] == str(int(h.clock.seconds()) + MESSAGE.ttl)
    assert h.fake.stats() == {"requests": 1, "refused": 0, "recipients": 1, "unique": 1, "duplicates": 0,
                              "http2_requests": 1}


def test_an_unregistered_token_is_invalid(h: Harness) -> None:
    dead, live = target(device(1, "dead")), target(device(2))
    assert h.send(MESSAGE, [dead, live]) == [base.Result(base.Outcome.INVALID, "Unregistered"), base.SENT]


def test_a_token_that_is_not_hex_is_invalid_without_a_request(h: Harness) -> None:
    results = h.send(MESSAGE, [target("not-a-token"), target(TOKEN + "/../x"), target()])
    assert results == [base.Result(base.Outcome.INVALID, "BadDeviceToken")] * 2 + [base.SENT]
    assert h.fake.requests == 1


def test_too_large_is_refused_past_4096_bytes_without_a_request(h: Harness) -> None:
    t = target()
    skeleton = len(apns.payload(base.Message("j1", "", ""), t))
    fits = base.Message("j1", "", "x" * (apns.MAX_PAYLOAD - skeleton))
    assert len(apns.payload(fits, t)) == apns.MAX_PAYLOAD
    assert h.send(fits, [t]) == [base.SENT]
    too_big = base.Message("j1", "", "x" * (apns.MAX_PAYLOAD - skeleton + 1))
    assert h.send(too_big, [t]) == [base.Result(base.Outcome.FAILED, "too-large")]
    assert h.fake.requests == 1


def test_an_expired_provider_token_is_renewed_once_and_the_target_sent(tmp_path: Path) -> None:
    # The gateway's clock is 30 minutes behind the fake's: its 35-minute-old token is 65 minutes old to APNs.
    h = Harness(tmp_path, skew=1800)
    assert h.send(MESSAGE, [target(device(1))]) == [base.SENT]
    first = h.token.current()
    h.clock.advance(35 * 60)
    assert h.send(MESSAGE, [target(device(2)), target(device(3))]) == [base.SENT, base.SENT]
    assert h.token.current() != first
    assert h.fake.replies[403, "ExpiredProviderToken"] == 1  # the second target went with the new token at once
    assert h.fake.requests == 4 and h.fake.recipients == 3


def test_a_token_refused_again_after_renewal_is_auth(tmp_path: Path) -> None:
    h = Harness(tmp_path, skew=2 * 3600)  # every token the gateway signs is two hours old to APNs
    assert h.send(MESSAGE, [target()]) == [base.Result(base.Outcome.FAILED, "auth")]
    assert h.fake.replies[403, "ExpiredProviderToken"] == 2  # the first request and exactly one resend


def test_a_token_of_another_team_is_auth(h: Harness) -> None:
    h.gateway._token = h.provider_token(h.credentials.key_id, "OTHERTEAM1")
    assert h.send(MESSAGE, [target()]) == [base.Result(base.Outcome.FAILED, "auth")]
    assert h.fake.replies[403, "InvalidProviderToken"] == 1


def test_a_token_signed_by_another_key_is_auth(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    impostor = new_credentials(str(tmp_path / "impostor"))
    h.gateway._token = apns.ProviderToken(apns.load_key(impostor.key_path), h.credentials.key_id,
                                          h.credentials.team_id, h.clock.seconds)
    assert h.send(MESSAGE, [target()]) == [base.Result(base.Outcome.FAILED, "auth")]
    assert h.fake.replies[403, "InvalidProviderToken"] == 1


def test_too_many_requests_to_one_device_is_that_targets_retry(h: Harness) -> None:
    h.fake.busy_first = 1
    assert h.send(MESSAGE, [target(device(1)), target(device(2))]) == [
        base.Result(base.Outcome.RETRY, "TooManyRequests"), base.SENT]


def test_a_whole_batch_of_dead_token_answers_is_the_settings_not_the_audience() -> None:
    dead = base.Result(base.Outcome.INVALID, "BadDeviceToken")
    wrong_topic = base.Result(base.Outcome.INVALID, "DeviceTokenNotForTopic")
    assert base.misconfigured([dead] * 6 + [wrong_topic] * 4, apns.WRONG_SETTINGS) == \
        [base.Result(base.Outcome.FAILED, base.MISCONFIGURED)] * 10
    scattered = [dead] * 9 + [base.SENT]
    assert base.misconfigured(scattered, apns.WRONG_SETTINGS) == scattered
    assert base.misconfigured([dead] * 9, apns.WRONG_SETTINGS) == [dead] * 9, "a short batch proves nothing"
    gone = [base.Result(base.Outcome.INVALID, "Unregistered")] * 10
    assert base.misconfigured(gone, apns.WRONG_SETTINGS) == gone


def test_service_unavailable_is_a_plain_retry(h: Harness) -> None:
    h.fake.fail_first = 1
    assert h.send(MESSAGE, [target()]) == [base.Result(base.Outcome.RETRY, "ServiceUnavailable")]


def test_a_wrong_topic_fails_the_message(h: Harness) -> None:
    h.gateway._topic = "com.example.other"
    assert h.send(MESSAGE, [target()]) == [base.Result(base.Outcome.FAILED, "BadTopic")]


@pytest.mark.parametrize(("exc", "reason"), [
    (httpx.ReadTimeout("slow"), "timeout"),
    (httpx.ConnectTimeout("slow"), "timeout"),
    (httpx.ConnectError("refused"), "connect"),
    (httpx.RemoteProtocolError("GOAWAY"), "connection"),
    (httpx.ReadError("reset"), "connection"),
])
def test_no_reply_is_a_retry(h: Harness, exc: Exception, reason: str) -> None:
    h.broken = exc
    assert h.send(MESSAGE, [target(), target(device(2))]) == [base.Result(base.Outcome.RETRY, reason)] * 2


def test_a_batch_is_split_over_concurrency_task_calls_in_order(h: Harness) -> None:
    targets = [target(device(n, "dead" if n % 3 == 0 else "")) for n in range(10)]
    results = h.send(MESSAGE, targets)
    assert h.tasks.calls == 4
    assert results == [base.Result(base.Outcome.INVALID, "Unregistered") if n % 3 == 0 else base.SENT
                       for n in range(10)]
    assert h.fake.recipients == 6 and h.fake.stats()["unique"] == 6


def test_an_empty_batch_needs_no_task(h: Harness) -> None:
    assert h.send(MESSAGE, []) == []
    assert h.tasks.calls == 0


def test_a_failing_task_pool_is_a_retry_never_an_errback(h: Harness) -> None:
    class Stopped:
        def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            return defer.fail(RuntimeError("pool stopped"))

    gateway = apns.ApnsGateway(h.clients, URL, h.credentials.topic, h.token, Stopped(), 2)
    assert result_of(gateway.send(MESSAGE, [target(device(n)) for n in range(3)])) == \
        [base.Result(base.Outcome.RETRY, "task")] * 3


def test_close_closes_the_client_in_the_pool(h: Harness) -> None:
    h.send(MESSAGE, [target()])
    calls = h.tasks.calls
    result_of(h.gateway.close())
    assert h.client.is_closed
    assert h.tasks.calls == calls + 1


def test_each_thread_has_its_own_client_and_close_closes_all(tmp_path: Path) -> None:
    import threading

    made: list[httpx.Client] = []

    def make() -> httpx.Client:
        made.append(httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200))))
        return made[-1]

    clients = apns.ThreadClients(make)
    mine = clients.get()
    assert clients.get() is mine
    theirs: list[httpx.Client] = []
    thread = threading.Thread(target=lambda: theirs.append(clients.get()))
    thread.start()
    thread.join(10)
    assert theirs and theirs[0] is not mine
    clients.close()
    assert all(client.is_closed for client in made) and len(made) == 2
    assert clients.get() is not mine  # a thread that sends after a close gets a new client


def test_the_fake_refuses_http_1(h: Harness) -> None:
    status, _, body = h.fake.answer("POST", f"/3/device/{TOKEN}", {}, b"{}", http2=False)
    assert (status, json.loads(body)["reason"]) == (505, "HTTP2Required")
    assert h.fake.stats()["http2_requests"] == 0


# build()


def settings(credentials: Credentials, **changes: str) -> Config:
    values = {"apns_key": credentials.key_path, "apns_key_id": credentials.key_id,
              "apns_team_id": credentials.team_id, "apns_topic": credentials.topic,
              "apns_url": "https://api.sandbox.push.apple.com", **changes}
    return Config(**values)  # type: ignore[arg-type]


def test_build_takes_good_settings(tmp_path: Path) -> None:
    from pushd.tls import ensure_localhost_certificate

    credentials = new_credentials(str(tmp_path))
    _, ca = ensure_localhost_certificate(str(tmp_path / "certs"))
    tasks = InlineTasks()
    gateway = apns.build(Clock(), settings(credentials, gateway_ca=ca, apns_url="https://127.0.0.1:8443/"), tasks)
    assert gateway.name == "apns"
    assert gateway._url == "https://127.0.0.1:8443"
    result_of(gateway.close())


def pem_file(path: Path, key: Any, password: bytes | None = None) -> str:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return str(path)


@pytest.mark.parametrize(("setting", "value"), [
    ("apns_key", ""),
    ("apns_key", "missing"),
    ("apns_key", "garbage"),
    ("apns_key", "rsa"),
    ("apns_key", "p384"),
    ("apns_key", "encrypted"),
    ("apns_key_id", ""),
    ("apns_key_id", "ABC123"),
    ("apns_key_id", "ABC123DEF!"),
    ("apns_team_id", ""),
    ("apns_team_id", "TEAM-12345"),
    ("apns_topic", ""),
    ("apns_topic", "com.example app"),
    ("apns_url", "http://127.0.0.1:8443"),
    ("apns_url", "http://api.push.apple.com"),
    ("apns_url", "ftp://api.push.apple.com"),
    ("apns_url", "https://api.push.apple.com/3/device"),
    ("apns_url", "https://"),
    ("apns_url", "https://api.push.apple.com:99999"),
    ("gateway_ca", "missing"),
    ("gateway_ca", "garbage"),
])
def test_build_errors_name_the_setting(tmp_path: Path, setting: str, value: str) -> None:
    credentials = new_credentials(str(tmp_path))
    files = {
        "missing": str(tmp_path / "none.pem"),
        "rsa": pem_file(tmp_path / "rsa.p8", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "p384": pem_file(tmp_path / "p384.p8", ec.generate_private_key(ec.SECP384R1())),
        "encrypted": pem_file(tmp_path / "enc.p8", ec.generate_private_key(ec.SECP256R1()), b"secret"),
    }
    (tmp_path / "garbage.pem").write_text("-----BEGIN PRIVATE KEY-----\nnotakey\n-----END PRIVATE KEY-----\n")
    files["garbage"] = str(tmp_path / "garbage.pem")
    config = settings(credentials, **{setting: files.get(value, value)})
    with pytest.raises(ConfigError) as err:
        apns.build(Clock(), config, InlineTasks())
    assert str(err.value).startswith(setting.replace("_", "-") + ":"), str(err.value)
