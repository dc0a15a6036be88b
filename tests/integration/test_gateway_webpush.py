"""The webpush gateway on a real reactor and task pool against the fake push service as a process.

The gateway runs in a child process (`python -m tests.integration.test_gateway_webpush SPEC`, driven by
twisted.internet.task.react) that prints one JSON list of results, so pytest never runs a reactor itself.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.webpush import FakeWebPushProcess, vapid_key_file

SUBJECT = "mailto:ops@example.com"


def run_gateway(spec: dict[str, Any]) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_gateway_webpush", json.dumps(spec)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    results: list[dict[str, Any]] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


@pytest.fixture
def vapid_key(tmp_path: Path) -> str:
    return vapid_key_file(str(tmp_path / "vapid.pem"))


@pytest.fixture
def fake(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[FakeWebPushProcess]:
    extra = getattr(request, "param", [])
    process = FakeWebPushProcess(str(tmp_path / "subs.ndjson"), subscriptions=12, extra=extra).start()
    try:
        yield process
    finally:
        process.stop()


def spec(vapid_key: str, subscriptions: list[dict[str, Any]], concurrency: int = 4) -> dict[str, Any]:
    return {
        "vapid_key": vapid_key, "subscriptions": subscriptions, "concurrency": concurrency,
        "title": "Hi $name", "body": "number $n",
    }


@pytest.mark.parametrize("fake", [["--gone", "3"]], indirect=True)
def test_pushes_arrive_decrypted_and_gone_subscriptions_are_invalid(fake: FakeWebPushProcess, vapid_key: str) -> None:
    subs = fake.subscription_list()
    results = run_gateway(spec(vapid_key, subs))
    assert results == [{"outcome": "invalid", "reason": "http-410", "retry_after": None}] * 3 + [
        {"outcome": "sent", "reason": "", "retry_after": None}
    ] * 9
    stats = get(fake.url + "/stats")
    assert stats == {"received": 12, "decrypted": 9, "decrypt_failures": 0, "refused_auth": 0, "unique": 9}
    received = get(fake.url + "/received")
    for n, sub in enumerate(subs[3:], start=3):
        [plain] = received[sub["endpoint"].rsplit("/", 1)[1]]
        doc = json.loads(plain)
        assert (doc["title"], doc["body"], doc["data"]) == (f"Hi user{n}", f"number {n}", {})
        assert doc["key"].startswith("job1-")


@pytest.mark.parametrize("fake", [["--fail-first", "2", "--fail-status", "429", "--retry-after", "5"]], indirect=True)
def test_429_is_a_retry_with_retry_after(fake: FakeWebPushProcess, vapid_key: str) -> None:
    results = run_gateway(spec(vapid_key, fake.subscription_list(), concurrency=1))
    assert results[:2] == [{"outcome": "retry", "reason": "http-429", "retry_after": 5.0}] * 2
    assert {r["outcome"] for r in results[2:]} == {"sent"}


def test_a_refused_connection_is_a_retry_for_every_target(tmp_path: Path, vapid_key: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sub = {"endpoint": f"http://127.0.0.1:{port}/push/x", "keys": {"p256dh": _some_public_key(), "auth": "A" * 22}}
    results = run_gateway(spec(vapid_key, [sub, sub]))
    assert results == [{"outcome": "retry", "reason": "connect", "retry_after": None}] * 2


def _some_public_key() -> str:
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    raw = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _drive(reactor: Any, raw: str) -> Any:
    """Child process: build the gateway from a Config, send one message, print the results."""
    from twisted.internet import defer

    from pushd.config import Config
    from pushd.gateways import base, webpush
    from pushd.tasks import TaskPool

    options = json.loads(raw)
    config = Config(
        webpush_vapid_key=options["vapid_key"], webpush_subject=SUBJECT,
        gateway_concurrency=options["concurrency"], gateway_timeout=10,
    )
    pool = TaskPool(reactor, 2)
    pool.startService()
    gateway = webpush.build(reactor, config, pool)
    targets = []
    for n, sub in enumerate(options["subscriptions"]):
        address = json.dumps(sub, sort_keys=True, separators=(",", ":"))
        targets.append(base.Target(address, {"name": f"user{n}", "n": n}, base.idempotency_key("job1", address)))

    @defer.inlineCallbacks
    def run() -> Any:
        results = yield gateway.send(base.Message("job1", options["title"], options["body"]), targets)
        yield gateway.close()
        yield pool.stopService()
        rows = [{"outcome": r.outcome.value, "reason": r.reason, "retry_after": r.retry_after} for r in results]
        sys.stdout.write(json.dumps(rows) + "\n")

    return run()


if __name__ == "__main__":
    from twisted.internet import task

    task.react(_drive, sys.argv[1:])
