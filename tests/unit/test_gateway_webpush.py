"""The webpush gateway against the fake push service in memory: encryption the fake can decrypt, VAPID it
accepts, each reply class, Retry-After, timeouts on a Clock, the concurrency bound and build()'s errors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from py_vapid import Vapid
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock

from pushd.config import Config, ConfigError
from pushd.gateways import base, webpush
from tests.fakes.webpush import FakePushService, vapid_key_file

ORIGIN = "http://127.0.0.1:9999"


class InlineTasks:
    """A TaskRunner that runs the work at once, counting calls."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        self.calls += 1
        return defer.maybeDeferred(f, *args, **kwargs)


def canonical(subscription: dict[str, Any]) -> str:
    return json.dumps(subscription, sort_keys=True, separators=(",", ":"))


def target(subscription: dict[str, Any] | str, fields: dict[str, Any] | None = None, job: str = "j1") -> base.Target:
    address = subscription if isinstance(subscription, str) else canonical(subscription)
    return base.Target(address, fields or {}, base.idempotency_key(job, address))


class Harness:
    def __init__(self, concurrency: int = 8, timeout: float = 10.0) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.fake = FakePushService(ORIGIN, self.clock)
        self.stub = StubTreq(self.fake)
        self.tasks = InlineTasks()
        self.vapid = Vapid()
        self.vapid.generate_keys()
        self.signer = webpush.VapidSigner(self.vapid, "mailto:ops@example.com", self.clock.seconds)
        self.gateway = webpush.WebPushGateway(self.clock, self.stub, self.signer, self.tasks, concurrency, timeout)

    def send(self, message: base.Message, targets: Sequence[base.Target]) -> list[base.Result]:
        d = self.gateway.send(message, targets)
        for _ in range(1000):
            self.stub.flush()
            if d.called:
                break
            self.clock.advance(0.5)
        assert d.called
        results: list[base.Result] = self.successResultOf(d)
        return results

    @staticmethod
    def successResultOf(d: defer.Deferred[Any]) -> Any:
        box: list[Any] = []
        d.addBoth(box.append)
        assert box and not isinstance(box[0], Exception), box
        return box[0]


MESSAGE = base.Message("j1", "Hello $name", "Your order $order shipped", {"order": "$order", "kind": "ship"})


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_the_fake_decrypts_exactly_the_rendered_message(h: Harness) -> None:
    sub = h.fake.new_subscription()
    t = target(sub, {"name": "Ann", "order": "A-17"})
    assert h.send(MESSAGE, [t]) == [base.SENT]
    [plain] = h.fake.received[h.fake.sub_id(sub)]
    assert json.loads(plain) == {
        "title": "Hello Ann",
        "body": "Your order A-17 shipped",
        "data": {"order": "A-17", "kind": "ship"},
        "key": t.key,
    }
    assert plain == webpush.plaintext(MESSAGE, t)
    assert h.fake.stats.as_json() == {
        "received": 1, "decrypted": 1, "decrypt_failures": 0, "refused_auth": 0, "unique": 1,
    }


def test_headers_ttl_encoding_urgency_and_a_topic_from_the_idempotency_key(h: Harness) -> None:
    sub = h.fake.new_subscription()
    t = target(sub)
    h.send(base.Message("j1", "t", "b", ttl=600), [t])
    [headers] = h.fake.requests
    assert headers["ttl"] == "600"
    assert headers["content-encoding"] == "aes128gcm"
    assert headers["urgency"] == "normal"
    assert headers["topic"] == webpush.topic(t.key)
    assert len(headers["topic"]) == 32
    assert set(headers["topic"]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert headers["authorization"].startswith("vapid t=")
    # The same job and subscription give the same Topic on a retry; another job another one.
    assert webpush.topic(target(sub).key) == headers["topic"] != webpush.topic(target(sub, job="j2").key)


def test_every_target_gets_its_own_encryption(h: Harness) -> None:
    subs = [h.fake.new_subscription() for _ in range(3)]
    results = h.send(MESSAGE, [target(s, {"name": n}) for s, n in zip(subs, "ABC", strict=True)])
    assert results == [base.SENT] * 3
    titles = [json.loads(h.fake.received[h.fake.sub_id(s)][0])["title"] for s in subs]
    assert titles == ["Hello A", "Hello B", "Hello C"]


def test_a_tampered_key_or_auth_secret_fails_to_decrypt(h: Harness) -> None:
    sub, other = h.fake.new_subscription(), h.fake.new_subscription()
    wrong_key = {"endpoint": sub["endpoint"], "keys": {"p256dh": other["keys"]["p256dh"], "auth": sub["keys"]["auth"]}}
    wrong_auth = {"endpoint": sub["endpoint"], "keys": {"p256dh": sub["keys"]["p256dh"], "auth": other["keys"]["auth"]}}
    results = h.send(MESSAGE, [target(wrong_key), target(wrong_auth)])
    assert results == [base.Result(base.Outcome.FAILED, "http-400")] * 2
    assert h.fake.stats.decrypt_failures == 2
    assert h.fake.received == {}


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("not json", "unparseable"),
        ('{"endpoint": "https://push.example/x"}', "no keys"),
        ('{"endpoint": "https://push.example/x", "keys": {"p256dh": "AAAA", "auth": "AAAAAAAAAAAAAAAAAAAAAA"}}', "short"),
        ("ftp", "scheme"),
        ("http-remote", "plain http to a remote host"),
    ],
)
def test_a_bad_subscription_fails_without_a_request(h: Harness, address: str, why: str) -> None:
    good = h.fake.new_subscription()
    if address in ("ftp", "http-remote"):
        bad = dict(good, endpoint="ftp://127.0.0.1/push/x" if address == "ftp" else "http://push.example/push/x")
        address = canonical(bad)
    results = h.send(MESSAGE, [target(address), target(good)])
    assert results == [base.Result(base.Outcome.FAILED, "bad-subscription"), base.SENT], why
    assert h.fake.stats.received == 1


def test_too_large_is_refused_exactly_at_4096_encrypted_bytes_without_a_request(h: Harness) -> None:
    sub = h.fake.new_subscription()
    skeleton = len(webpush.plaintext(base.Message("j1", "", ""), target(sub)))
    fits = base.Message("j1", "", "x" * (webpush.MAX_PLAINTEXT - skeleton))
    assert len(webpush.encrypt(webpush.plaintext(fits, target(sub)), webpush.parse_subscription(canonical(sub)))) == 4096  # type: ignore[arg-type]
    too_big = base.Message("j1", "", "x" * (webpush.MAX_PLAINTEXT - skeleton + 1))
    assert h.send(fits, [target(sub)]) == [base.SENT]
    assert h.send(too_big, [target(sub)]) == [base.Result(base.Outcome.FAILED, "too-large")]
    assert h.fake.stats.received == 1


def test_gone_and_unknown_subscriptions_are_invalid(h: Harness) -> None:
    gone, missing, ok = (h.fake.new_subscription() for _ in range(3))
    h.fake.gone.add(h.fake.sub_id(gone))
    h.fake.not_found.add(h.fake.sub_id(missing))
    assert h.send(MESSAGE, [target(gone), target(missing), target(ok)]) == [
        base.Result(base.Outcome.INVALID, "http-410"),
        base.Result(base.Outcome.INVALID, "http-404"),
        base.SENT,
    ]


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (429, "7", base.Result(base.Outcome.RETRY, "http-429", retry_after=7.0)),
        (503, "3", base.Result(base.Outcome.RETRY, "http-503", retry_after=3.0)),
        (502, None, base.Result(base.Outcome.RETRY, "http-502")),
        (413, None, base.Result(base.Outcome.FAILED, "too-large")),
        (400, None, base.Result(base.Outcome.FAILED, "http-400")),
        (403, None, base.Result(base.Outcome.FAILED, "auth")),
    ],
)
def test_each_reply_class(h: Harness, status: int, retry_after: str | None, expected: base.Result) -> None:
    first, second = h.fake.new_subscription(), h.fake.new_subscription()
    h.fake.fail(1, status, retry_after)
    assert h.send(MESSAGE, [target(first)]) == [expected]
    assert h.send(MESSAGE, [target(second)]) == [base.SENT]


def test_vapid_refused_is_auth_and_the_token_is_signed_afresh(h: Harness) -> None:
    sub = h.fake.new_subscription()
    assert h.send(MESSAGE, [target(sub)]) == [base.SENT]
    h.fake.origin = "http://127.0.0.1:9998"  # the token's aud no longer matches
    assert h.send(MESSAGE, [target(sub)]) == [base.Result(base.Outcome.FAILED, "auth")]
    assert h.fake.stats.refused_auth == 1
    h.fake.origin = ORIGIN
    assert h.send(MESSAGE, [target(sub)]) == [base.SENT]


def test_the_fake_refuses_a_token_signed_by_another_key_than_k(h: Harness) -> None:
    other = Vapid()
    other.generate_keys()
    forged = other.sign({"sub": "mailto:ops@example.com", "aud": ORIGIN, "exp": int(h.clock.seconds()) + 3600})
    token = forged["Authorization"].split("t=", 1)[1].split(",", 1)[0]
    real_k = h.signer.header(ORIGIN).split("k=", 1)[1]
    assert not h.fake._vapid_ok(f"vapid t={token},k={real_k}")
    assert h.fake._vapid_ok(h.signer.header(ORIGIN))


def test_the_vapid_header_is_cached_per_origin_until_shortly_before_exp(h: Harness) -> None:
    first = h.signer.header(ORIGIN)
    assert h.signer.header(ORIGIN) is first
    assert h.signer.header("https://push.example") != first
    h.clock.advance(webpush.VAPID_LIFETIME - webpush.VAPID_RENEW_BEFORE - 1)
    assert h.signer.header(ORIGIN) is first
    h.clock.advance(2)
    renewed = h.signer.header(ORIGIN)
    assert renewed != first
    assert h.fake._vapid_ok(renewed)


def test_exp_more_than_24_hours_ahead_is_refused_by_the_fake(h: Harness) -> None:
    signed = h.vapid.sign({"sub": "mailto:ops@example.com", "aud": ORIGIN, "exp": int(h.clock.seconds()) + 86400 + 60})
    assert not h.fake._vapid_ok(signed["Authorization"])
    expired = h.vapid.sign({"sub": "mailto:ops@example.com", "aud": ORIGIN, "exp": int(h.clock.seconds()) - 1})
    assert not h.fake._vapid_ok(expired["Authorization"])


def test_a_slow_service_is_a_timeout_retry() -> None:
    h = Harness(timeout=5)
    h.fake.latency = 60
    sub = h.fake.new_subscription()
    assert h.send(MESSAGE, [target(sub)]) == [base.Result(base.Outcome.RETRY, "timeout")]


def test_at_most_concurrency_requests_in_flight() -> None:
    h = Harness(concurrency=3)
    h.fake.latency = 2
    subs = [h.fake.new_subscription() for _ in range(10)]
    assert h.send(MESSAGE, [target(s) for s in subs]) == [base.SENT] * 10
    assert h.fake.max_in_flight == 3
    assert len(h.fake.received) == 10


def test_a_batch_is_encrypted_in_one_task(h: Harness) -> None:
    subs = [h.fake.new_subscription() for _ in range(4)]
    h.send(MESSAGE, [target(s) for s in subs])
    assert h.tasks.calls == 1


def test_a_refused_connection_is_a_connect_retry(h: Harness) -> None:
    from twisted.internet.error import ConnectionRefusedError

    class Refusing:
        def post(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            return defer.fail(ConnectionRefusedError())

    gateway = webpush.WebPushGateway(h.clock, Refusing(), h.signer, h.tasks, 4, 10)
    d = gateway.send(MESSAGE, [target(h.fake.new_subscription())])
    assert h.successResultOf(d) == [base.Result(base.Outcome.RETRY, "connect")]


# build()


def vapid_file(tmp_path: Path) -> str:
    return vapid_key_file(str(tmp_path / "vapid.pem"))


def test_build_reads_the_key_and_subject(tmp_path: Path) -> None:
    config = Config(webpush_vapid_key=vapid_file(tmp_path), webpush_subject="mailto:ops@example.com")
    gateway = webpush.build(Clock(), config, InlineTasks())
    assert gateway.name == "webpush"
    gateway.close()


@pytest.mark.parametrize(
    ("key", "subject", "setting"),
    [
        ("", "mailto:ops@example.com", "webpush-vapid-key:"),
        ("missing", "mailto:ops@example.com", "webpush-vapid-key:"),
        ("garbage", "mailto:ops@example.com", "webpush-vapid-key:"),
        ("good", "", "webpush-subject:"),
        ("good", "ops@example.com", "webpush-subject:"),
        ("good", "http://example.com", "webpush-subject:"),
    ],
)
def test_build_errors_name_the_setting(tmp_path: Path, key: str, subject: str, setting: str) -> None:
    path = {"": "", "missing": str(tmp_path / "nope.pem"), "good": vapid_file(tmp_path)}.get(key)
    if key == "garbage":
        path = str(tmp_path / "garbage.pem")
        Path(path).write_text("-----BEGIN PRIVATE KEY-----\nnotakey\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError) as err:
        webpush.build(Clock(), Config(webpush_vapid_key=path or "", webpush_subject=subject), InlineTasks())
    assert str(err.value).startswith(setting)
    assert not os.path.exists(tmp_path / "nope.pem")  # a missing key is an error, never a freshly generated one


def test_build_trusts_a_readable_gateway_ca(tmp_path: Path) -> None:
    from pushd.tls import ensure_localhost_certificate

    _, cert = ensure_localhost_certificate(str(tmp_path / "certs"))
    config = Config(
        webpush_vapid_key=vapid_file(tmp_path), webpush_subject="https://example.com", gateway_ca=cert,
    )
    assert webpush.build(Clock(), config, InlineTasks()).name == "webpush"


def test_a_failing_task_pool_is_a_retry(h: Harness) -> None:
    class Stopped:
        def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            return defer.fail(RuntimeError("pool stopped"))

    gateway = webpush.WebPushGateway(h.clock, h.stub, h.signer, Stopped(), 4, 10)
    d = gateway.send(MESSAGE, [target(h.fake.new_subscription())] * 2)
    assert h.successResultOf(d) == [base.Result(base.Outcome.RETRY, "encrypt")] * 2


def test_build_with_an_unreadable_gateway_ca(tmp_path: Path) -> None:
    config = Config(
        webpush_vapid_key=vapid_file(tmp_path), webpush_subject="mailto:ops@example.com",
        gateway_ca=str(tmp_path / "none.pem"),
    )
    with pytest.raises(ConfigError, match="^gateway-ca:"):
        webpush.build(Clock(), config, InlineTasks())
