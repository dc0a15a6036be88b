"""A local Web Push service: checks VAPID (RFC 8292), decrypts aes128gcm bodies (RFC 8291) and records them.

It creates the subscriptions itself (`new_subscription()`: a fresh P-256 key pair and auth secret, the private
half kept), so a test asserts the exact plaintext a browser would have seen, and a wrongly encrypted body counts
as a decrypt failure (400). Replies as RFC 8030: 201 Created, 404 unknown, 410 gone, 413 too large, 429 with
Retry-After; 401 for a missing or invalid VAPID token.

As a process: `python -m tests.fakes.webpush --port 0 --subscriptions N --out FILE` writes N NDJSON lines
`{"subscription": {...}}` (for `pushctl audience import`), prints `{"url": ..., "subscriptions": FILE}` and serves
until SIGTERM. GET /stats gives the counts, GET /received the decrypted plaintexts per subscription id.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import http_ece
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid, jwt
from twisted.internet.interfaces import IReactorTime
from twisted.web import server

from tests.fakes.process import FakeProcess
from tests.fakes.replies import DelayedReplies

MAX_BODY = 4096


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass
class Keys:
    private: ec.EllipticCurvePrivateKey
    auth: bytes


@dataclass
class Stats:
    received: int = 0
    decrypted: int = 0
    decrypt_failures: int = 0
    refused_auth: int = 0
    unique: set[tuple[str, bytes]] = field(default_factory=set)

    def as_json(self) -> dict[str, int]:
        return {
            "received": self.received,
            "decrypted": self.decrypted,
            "decrypt_failures": self.decrypt_failures,
            "refused_auth": self.refused_auth,
            "unique": len(self.unique),
        }


class FakePushService(DelayedReplies):
    """The whole service as one Resource: POST /push/<id>, GET /stats, GET /received."""

    isLeaf = True

    def __init__(self, origin: str, clock: IReactorTime | None = None) -> None:
        super().__init__(clock)
        self.origin = origin
        self.keys: dict[str, Keys] = {}
        #: Decrypted plaintexts per subscription id, in arrival order.
        self.received: dict[str, list[bytes]] = {}
        #: The request headers of every push, in arrival order.
        self.requests: list[dict[str, str]] = []
        self.stats = Stats()
        #: Knobs: ids answering 410 / 404, replies to fail first; `latency`, seconds to wait before replying.
        self.gone: set[str] = set()
        self.not_found: set[str] = set()
        self.fail_next: list[tuple[int, str | None]] = []
        self.statuses: Counter[int] = Counter()

    def new_subscription(self) -> dict[str, Any]:
        """A browser's PushSubscription JSON whose private key this service keeps."""
        sub_id = b64(os.urandom(12))
        private = ec.generate_private_key(ec.SECP256R1())
        auth = os.urandom(16)
        self.keys[sub_id] = Keys(private, auth)
        public = private.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return {"endpoint": f"{self.origin}/push/{sub_id}", "keys": {"p256dh": b64(public), "auth": b64(auth)}}

    @staticmethod
    def sub_id(subscription: dict[str, Any]) -> str:
        return str(subscription["endpoint"]).rsplit("/", 1)[1]

    def fail(self, count: int, status: int, retry_after: str | None = None) -> None:
        """Answer the next `count` pushes with `status` (and Retry-After when given)."""
        self.fail_next.extend([(status, retry_after)] * count)

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/stats":
            return json.dumps(self.stats.as_json()).encode()
        if request.path == b"/received":
            plain = {k: [p.decode("utf-8") for p in v] for k, v in self.received.items()}
            return json.dumps(plain).encode()
        request.setResponseCode(404)
        return b"{}"

    def render_POST(self, request: server.Request) -> bytes | int:
        self.stats.received += 1
        status, headers, body = self._push(request)
        self.statuses[status] += 1
        return self.reply(request, status, headers, body)

    def _push(self, request: server.Request) -> tuple[int, dict[bytes, bytes], bytes]:
        """Status, headers and body of the reply to one push (RFC 8030 section 5)."""
        parts = request.path.decode("ascii", "replace").split("/")
        sub_id = parts[2] if len(parts) == 3 and parts[1] == "push" else ""
        self.requests.append({k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()})
        if self.fail_next:
            status, retry_after = self.fail_next.pop(0)
            return status, ({b"retry-after": retry_after.encode()} if retry_after else {}), b""
        if not self._vapid_ok(request.getHeader("authorization") or ""):
            self.stats.refused_auth += 1
            return 401, {}, b'{"error": "VAPID token refused"}'
        if sub_id in self.gone:
            return 410, {}, b""
        keys = self.keys.get(sub_id)
        if keys is None or sub_id in self.not_found:
            return 404, {}, b""
        if request.getHeader("ttl") is None:
            return 400, {}, b'{"error": "TTL header required"}'
        if request.getHeader("content-encoding") != "aes128gcm":
            return 415, {}, b""
        data = request.content.read()
        if len(data) > MAX_BODY:
            return 413, {}, b""
        try:
            plain = http_ece.decrypt(data, private_key=keys.private, auth_secret=keys.auth, version="aes128gcm")
        except Exception:
            self.stats.decrypt_failures += 1
            return 400, {}, b'{"error": "decryption failed"}'
        self.stats.decrypted += 1
        self.stats.unique.add((sub_id, plain))
        self.received.setdefault(sub_id, []).append(plain)
        return 201, {b"location": f"{self.origin}/message/{self.stats.received}".encode()}, b""

    def _vapid_ok(self, authorization: str) -> bool:
        """`vapid t=<JWT>,k=<key>`: an ES256 signature by k, aud = this origin, exp in the future and <= 24 h."""
        scheme, _, rest = authorization.partition(" ")
        if scheme.lower() != "vapid":
            return False
        params = dict(p.strip().split("=", 1) for p in rest.split(",") if "=" in p)
        if "t" not in params or "k" not in params:
            return False
        try:
            claims = jwt.decode(params["t"], params["k"])
        except InvalidSignature:
            return False
        now = self.clock.seconds() if self.clock is not None else time.time()
        exp = claims.get("exp")
        return (
            claims.get("aud") == self.origin
            and isinstance(exp, int)
            and now < exp <= now + 86400
            and str(claims.get("sub", "")).startswith(("mailto:", "https:"))
        )


def vapid_key_file(path: str) -> str:
    """A fresh VAPID private key saved as PEM at `path` (the gateway's webpush-vapid-key), for tests."""
    vapid = Vapid()
    vapid.generate_keys()
    vapid.save_key(path)
    return path


class FakeWebPushProcess(FakeProcess):
    """`python -m tests.fakes.webpush` as a child process, stopped by its PID."""

    module = "tests.fakes.webpush"
    name = "Web Push service"

    def __init__(self, out: str, subscriptions: int = 1, extra: list[str] | None = None) -> None:
        self.out = out
        self.subscriptions = subscriptions
        self.extra = extra or []
        # Absolute: the fake runs from the repository root, the caller reads `out` from where it is.
        super().__init__("--subscriptions", str(subscriptions), "--out", os.path.abspath(out), *self.extra)
        self.url = ""

    def read_info(self, info: dict[str, Any]) -> None:
        self.url = info["url"]

    def subscription_list(self) -> list[dict[str, Any]]:
        with open(self.out) as f:
            return [json.loads(line)["subscription"] for line in f if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--subscriptions", type=int, default=0, help="subscriptions to create and write to --out")
    parser.add_argument("--out", default="subscriptions.ndjson")
    parser.add_argument("--gone", type=int, default=0, help="the first N subscriptions answer 410 Gone")
    parser.add_argument("--not-found", type=int, default=0, help="the next N subscriptions answer 404")
    parser.add_argument("--fail-first", type=int, default=0, help="answer the first N pushes with --fail-status")
    parser.add_argument("--fail-status", type=int, default=429)
    parser.add_argument("--retry-after", default="1")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    service = FakePushService("", reactor)  # type: ignore[arg-type]
    port = reactor.listenTCP(args.port, server.Site(service), interface="127.0.0.1")  # type: ignore[attr-defined]
    service.origin = f"http://127.0.0.1:{port.getHost().port}"
    service.latency = args.latency
    service.fail(args.fail_first, args.fail_status, args.retry_after if args.fail_status in (429, 503) else None)
    with open(args.out, "w") as f:
        for n in range(args.subscriptions):
            sub = service.new_subscription()
            if n < args.gone:
                service.gone.add(service.sub_id(sub))
            elif n < args.gone + args.not_found:
                service.not_found.add(service.sub_id(sub))
            f.write(json.dumps({"subscription": sub}) + "\n")
    print(json.dumps({"url": service.origin, "subscriptions": os.path.abspath(args.out)}), flush=True)
    reactor.run()  # type: ignore[attr-defined]  # Twisted's own SIGTERM handler stops it


if __name__ == "__main__":
    main()
