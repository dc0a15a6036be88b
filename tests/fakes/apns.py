"""A local APNs: Apple's provider API over TLS + HTTP/2 (twisted.web speaks h2 when the TLS handshake picks it
through ALPN), checking what Apple checks and counting every notification by apns-id, so duplicates show.

What it checks: HTTP/2 only (anything else 505, as Apple serves nothing else); `POST /3/device/<hex token>`; the
bearer provider token (ES256 by the generated key, `kid` = the key id, `iss` = the team id, `iat` at most an hour
old: else 403 MissingProviderToken / InvalidProviderToken / ExpiredProviderToken); `apns-topic` = the configured
topic (else 400 MissingTopic / BadTopic); the apns-* headers' forms; a JSON body with `aps`, at most 4096 bytes
(413 PayloadTooLarge). Tokens starting with "dead" answer 410 Unregistered. Knobs: the first N requests 429
TooManyRequests (`--busy-first`) or 503 ServiceUnavailable (`--fail-first`), `--latency MS` before each reply.

    python -m tests.fakes.apns --dir DIR [--port 0] [--topic T] [--busy-first N] [--fail-first N] [--latency MS]

writes the .p8 signing key and a certificate for 127.0.0.1/localhost into DIR, prints one JSON line `{"url",
"key", "key_id", "team_id", "topic", "ca", "port"}` (the gateway's settings; `ca` is its gateway-ca) and serves
until SIGTERM. GET /stats gives the counts, GET /received the accepted payloads per device token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import ssl
import string
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import endpoints
from twisted.web import server

from pushd.tls import ensure_localhost_certificate
from tests.fakes.process import FakeProcess
from tests.fakes.replies import DelayedReplies

MAX_PAYLOAD = 4096
#: APNs refuses provider tokens older than an hour.
TOKEN_LIFETIME = 3600
DEFAULT_TOPIC = "com.example.pushd"
_HEX = re.compile(r"[0-9A-Fa-f]+")

Reply = tuple[int, dict[str, str], bytes]


@dataclass(frozen=True)
class Credentials:
    """What a provider is given by Apple: the signing key (as a .p8 file), its key id and the team id."""

    key_path: str
    key_id: str
    team_id: str
    topic: str

    def public_key(self) -> ec.EllipticCurvePublicKey:
        with open(self.key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key.public_key()


def apple_id() -> str:
    """10 upper-case letters and digits, the form of Apple's key ids and team ids."""
    return "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(10))


def new_credentials(directory: str, topic: str = DEFAULT_TOPIC) -> Credentials:
    """A fresh P-256 key saved as `AuthKey_<key id>.p8` (PKCS#8 PEM, as Apple hands it out) in `directory`."""
    os.makedirs(directory, exist_ok=True)
    key_id = apple_id()
    key = ec.generate_private_key(ec.SECP256R1())
    path = os.path.join(directory, f"AuthKey_{key_id}.p8")
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return Credentials(path, key_id, apple_id(), topic)


def error(status: int, reason: str, **extra: Any) -> Reply:
    return status, {"content-type": "application/json"}, json.dumps({"reason": reason, **extra}).encode()


class FakeApns:
    """The service's decisions, apart from any transport: the twisted.web Resource and the unit tests'
    httpx.MockTransport both ask `answer()`."""

    def __init__(self, credentials: Credentials, seconds: Callable[[], float] = time.time, *, busy_first: int = 0,
                 fail_first: int = 0, other_environment: bool = False) -> None:
        """`other_environment`: every token was issued by the other APNs environment (sandbox vs production)."""
        self.credentials = credentials
        self.other_environment = other_environment
        self.public_key = credentials.public_key()
        self.seconds = seconds
        self.busy_first = busy_first
        self.fail_first = fail_first
        self.requests = 0
        self.http2_requests = 0
        self.refused = 0
        self.recipients = 0
        self.duplicates = 0
        self.ids: set[str] = set()
        #: Every reply's status and reason ("" for 200), counted.
        self.replies: Counter[tuple[int, str]] = Counter()
        #: The accepted payloads per device token, in arrival order.
        self.received: dict[str, list[dict[str, Any]]] = {}
        #: The headers of every POST, in arrival order.
        self.headers: list[dict[str, str]] = []
        #: Provider token -> (its iat, or the reason it is refused whatever the time); verified once per token.
        self._verified: dict[str, tuple[int, str]] = {}

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "refused": self.refused, "recipients": self.recipients,
                "unique": len(self.ids), "duplicates": self.duplicates, "http2_requests": self.http2_requests}

    def answer(self, method: str, path: str, headers: Mapping[str, str], body: bytes, http2: bool) -> Reply:
        """The reply to one request; `headers` with lower-case names."""
        self.requests += 1
        status, reply_headers, reply_body = self._decide(method, path, headers, body, http2)
        reason = json.loads(reply_body)["reason"] if status != 200 else ""
        self.replies[status, reason] += 1
        if status != 200:
            self.refused += 1
        return status, reply_headers, reply_body

    def _decide(self, method: str, path: str, headers: Mapping[str, str], body: bytes, http2: bool) -> Reply:
        if not http2:
            return error(505, "HTTP2Required")
        self.http2_requests += 1
        self.headers.append(dict(headers))
        parts = path.split("/")
        if len(parts) != 4 or parts[:3] != ["", "3", "device"]:
            return error(404, "BadPath")
        if method != "POST":
            return error(405, "MethodNotAllowed")
        token = parts[3]
        refused = self._provider_token_refusal(headers.get("authorization", ""))
        if refused:
            return error(403, refused)
        if self.busy_first > 0:
            self.busy_first -= 1
            return error(429, "TooManyRequests")
        if self.fail_first > 0:
            self.fail_first -= 1
            return error(503, "ServiceUnavailable")
        refused = self._header_refusal(headers)
        if refused:
            return error(400, refused)
        if not token or not _HEX.fullmatch(token) or self.other_environment:
            return error(400, "BadDeviceToken")
        if not body:
            return error(400, "PayloadEmpty")
        if len(body) > MAX_PAYLOAD:
            return error(413, "PayloadTooLarge")
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("aps"), dict):
            return error(400, "BadPayload")  # the fake's own reason: Apple documents none for a malformed body
        if token.lower().startswith("dead"):
            return error(410, "Unregistered", timestamp=int(self.seconds() * 1000))
        notification_id = headers.get("apns-id") or str(uuid.uuid4())
        if notification_id in self.ids:
            self.duplicates += 1
        self.ids.add(notification_id)
        self.recipients += 1
        self.received.setdefault(token, []).append(doc)
        return 200, {"apns-id": notification_id}, b""

    def _provider_token_refusal(self, authorization: str) -> str:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "MissingProviderToken"
        verified = self._verified.get(token)
        if verified is None:
            verified = self._verified[token] = self._verify(token)
        iat, refused = verified
        if refused:
            return refused
        now = self.seconds()
        if iat > now + 60:
            return "InvalidProviderToken"
        if now - iat > TOKEN_LIFETIME:
            return "ExpiredProviderToken"
        return ""

    def _verify(self, token: str) -> tuple[int, str]:
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, self.public_key, algorithms=["ES256"],
                                options={"verify_iat": False, "verify_exp": False})
        except jwt.InvalidTokenError:
            return 0, "InvalidProviderToken"
        iat = claims.get("iat")
        if header.get("kid") != self.credentials.key_id or claims.get("iss") != self.credentials.team_id \
                or not isinstance(iat, int):
            return 0, "InvalidProviderToken"
        return iat, ""

    def _header_refusal(self, headers: Mapping[str, str]) -> str:
        topic = headers.get("apns-topic")
        if not topic:
            return "MissingTopic"
        if topic != self.credentials.topic:
            return "BadTopic"
        if headers.get("apns-push-type", "alert") not in ("alert", "background"):
            return "InvalidPushType"
        if headers.get("apns-priority", "10") not in ("1", "5", "10"):
            return "BadPriority"
        if not headers.get("apns-expiration", "0").isdigit():
            return "BadExpirationDate"
        try:
            uuid.UUID(headers.get("apns-id", str(uuid.UUID(int=0))))
        except ValueError:
            return "BadMessageId"
        if len(headers.get("apns-collapse-id", "").encode("utf-8")) > 64:
            return "BadCollapseId"
        return ""


class ApnsResource(DelayedReplies):
    """FakeApns behind twisted.web: every path, every method; GET /stats and /received for the tests."""

    isLeaf = True

    def __init__(self, apns: FakeApns, clock: Any = None, latency: float = 0.0) -> None:
        super().__init__(clock, latency)
        self.apns = apns

    def render(self, request: server.Request) -> bytes | int:
        if request.method == b"GET" and request.path in (b"/stats", b"/received"):
            request.setHeader(b"content-type", b"application/json")
            doc: Any = self.apns.stats() if request.path == b"/stats" else self.apns.received
            return json.dumps(doc).encode()
        headers = {name.decode("latin-1").lower(): values[0].decode("latin-1")
                   for name, values in request.requestHeaders.getAllRawHeaders()}
        status, reply_headers, body = self.apns.answer(request.method.decode("ascii", "replace"),
                                                       request.path.decode("ascii", "replace"), headers,
                                                       request.content.read(), request.clientproto == b"HTTP/2")
        return self.reply(request, status, {name.encode(): value.encode() for name, value in reply_headers.items()},
                          body)


class FakeApnsProcess(FakeProcess):
    """`python -m tests.fakes.apns` as a child process, stopped by its PID; `info` is its JSON line."""

    module = "tests.fakes.apns"
    name = "APNs"

    def __init__(self, directory: str, *extra: str) -> None:
        self.directory = directory
        self.extra = list(extra)
        # Absolute: the fake runs from the repository root, the caller names the directory from where it is.
        super().__init__("--dir", os.path.abspath(directory), *self.extra)

    @property
    def url(self) -> str:
        return str(self.info["url"])

    def gateway_args(self) -> list[str]:
        """The worker options that point the apns gateway at this service."""
        info = self.info
        return ["--apns-key", info["key"], "--apns-key-id", info["key_id"], "--apns-team-id", info["team_id"],
                "--apns-topic", info["topic"], "--apns-url", info["url"], "--gateway-ca", info["ca"]]

    def get(self, path: str) -> Any:
        """GET /stats or /received, over HTTP/1.1 (those two answer any protocol), trusting the fake's CA."""
        context = ssl.create_default_context(cafile=self.info["ca"])
        with urllib.request.urlopen(self.url + path, timeout=10, context=context) as reply:
            return json.load(reply)

    def stats(self) -> dict[str, int]:
        return dict(self.get("/stats"))

    def post_http1(self, path: str, body: bytes) -> tuple[int, str]:
        """A POST over HTTP/1.1, which APNs refuses: (status, reason)."""
        context = ssl.create_default_context(cafile=self.info["ca"])
        request = urllib.request.Request(self.url + path, data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as reply:
                return reply.status, ""
        except urllib.error.HTTPError as refusal:
            return refusal.code, json.load(refusal)["reason"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="where the key and the certificate are written")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--topic", default=DEFAULT_TOPIC)
    parser.add_argument("--busy-first", type=int, default=0, help="answer the first N requests 429")
    parser.add_argument("--fail-first", type=int, default=0, help="answer the next N requests 503")
    parser.add_argument("--latency", type=float, default=0.0, help="milliseconds before each reply")
    parser.add_argument("--other-environment", action="store_true",
                        help="answer BadDeviceToken to every token (a sandbox/production mix-up)")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    credentials = new_credentials(args.dir, args.topic)
    key_path, cert_path = ensure_localhost_certificate(args.dir)
    apns = FakeApns(credentials, busy_first=args.busy_first, fail_first=args.fail_first,
                    other_environment=args.other_environment)
    site = server.Site(ApnsResource(apns, reactor, args.latency / 1000))
    description = (f"ssl:{args.port}:interface=127.0.0.1:privateKey={endpoints.quoteStringArgument(key_path)}"
                   f":certKey={endpoints.quoteStringArgument(cert_path)}")

    def listening(port: Any) -> None:
        number = port.getHost().port
        print(json.dumps({"url": f"https://127.0.0.1:{number}", "key": os.path.abspath(credentials.key_path),
                          "key_id": credentials.key_id, "team_id": credentials.team_id, "topic": credentials.topic,
                          "ca": os.path.abspath(cert_path), "port": number}), flush=True)

    endpoints.serverFromString(reactor, description).listen(site).addCallback(listening)
    reactor.run()  # type: ignore[attr-defined]  # Twisted's own SIGTERM handler stops it


if __name__ == "__main__":
    main()
