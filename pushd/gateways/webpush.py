"""The webpush gateway: one encrypted, VAPID-signed POST per browser subscription.

What it follows: RFC 8030 (the push request, `TTL`, `Urgency`, `Topic`, 201 Created; 404/410 for a subscription
that is gone, 413 for a too-large payload, 429 for too many requests), RFC 8291 + RFC 8188 (`aes128gcm` message
encryption to the subscription's `p256dh` key and `auth` secret, done with `http_ece` the way pywebpush calls
it: a fresh ephemeral P-256 key per message) and RFC 8292 (VAPID: `Authorization: vapid t=<ES256 JWT>,k=<public
key>`, signed with py_vapid; claims `aud` = the endpoint's origin, `exp` at most 24 h ahead, `sub` = a contact).

Encryption is CPU work (a P-256 key pair, an ECDH agreement, HKDF and AES-GCM per message: 0.34-0.54 ms per target
measured on the 2-core dev machine, 170-270 ms for a batch of 500), so a batch is encrypted in one task-pool call,
never on the reactor that also serves WebSockets.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import http_ece  # type: ignore[import-untyped]
import treq
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid, VapidException  # type: ignore[import-untyped]
from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from pushd.config import Config, ConfigError
from pushd.gateways import base
from pushd.tasks import TaskRunner

log = Logger()

#: Push services take at most 4096 bytes of encrypted body (RFC 8030 section 7.2; FCM, Mozilla, Apple alike).
MAX_RECORD = 4096
#: aes128gcm overhead of one record: header (16 salt + 4 rs + 1 idlen + 65 key id) + padding delimiter + GCM tag.
OVERHEAD = 86 + 1 + 16
#: Plaintexts up to this many bytes make a body of at most MAX_RECORD, so the size check needs no encryption.
MAX_PLAINTEXT = MAX_RECORD - OVERHEAD
#: VAPID tokens live 12 h (RFC 8292 allows up to 24 h) and are signed again an hour before they expire.
VAPID_LIFETIME = 12 * 3600
VAPID_RENEW_BEFORE = 3600
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True, slots=True)
class Subscription:
    """A browser PushSubscription: where to POST and the keys to encrypt to."""

    endpoint: str
    origin: str
    p256dh: bytes
    auth: bytes


@dataclass(frozen=True, slots=True)
class Push:
    """One target's ready request: the encrypted body and the headers that differ per target."""

    subscription: Subscription
    body: bytes
    topic: str


def _b64decode(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError("not a string")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_subscription(address: str) -> Subscription | None:
    """The subscription of a target's address, or None when it cannot be pushed to.

    Endpoints must be https (RFC 8030); plain http is allowed only for loopback hosts, where the local fake runs.
    """
    try:
        raw = json.loads(address)
        endpoint = raw["endpoint"]
        parts = urlsplit(endpoint)
        p256dh = _b64decode(raw["keys"]["p256dh"])
        auth = _b64decode(raw["keys"]["auth"])
    except (ValueError, TypeError, KeyError, binascii.Error):
        return None
    secure = parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOCAL_HOSTS)
    if not secure or not parts.hostname or len(p256dh) != 65 or p256dh[0] != 4 or len(auth) != 16:
        return None
    return Subscription(endpoint, f"{parts.scheme}://{parts.netloc}", p256dh, auth)


def topic(key: str) -> str:
    """32 url-safe base64 characters of the target's idempotency key (RFC 8030 5.4 allows at most 32).

    A push service keeps one undelivered message per Topic and subscription, so a retry of the same job to the
    same subscription replaces a copy still waiting for an offline browser instead of showing twice.
    """
    return base64.urlsafe_b64encode(hashlib.sha256(key.encode("utf-8")).digest()[:24]).decode("ascii")


def plaintext(message: base.Message, target: base.Target) -> bytes:
    """What the service worker receives: the rendered notification and the idempotency key, as JSON."""
    rendered = base.render(message, target)
    doc = {"title": rendered.title, "body": rendered.body, "data": dict(rendered.data), "key": target.key}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encrypt(data: bytes, subscription: Subscription) -> bytes:
    """RFC 8291 aes128gcm: a fresh sender key pair per message, as the RFC requires."""
    sender = ec.generate_private_key(ec.SECP256R1())
    body: bytes = http_ece.encrypt(
        data, private_key=sender, dh=subscription.p256dh, auth_secret=subscription.auth, version="aes128gcm"
    )
    return body


def prepare(message: base.Message, targets: Sequence[base.Target]) -> list[Push | base.Result]:
    """Each target's encrypted push, or its final Result when it must not be sent (pure; run in the task pool)."""
    prepared: list[Push | base.Result] = []
    for target in targets:
        subscription = parse_subscription(target.address)
        if subscription is None:
            prepared.append(base.Result(base.Outcome.FAILED, "bad-subscription"))
            continue
        data = plaintext(message, target)
        if len(data) > MAX_PLAINTEXT:
            prepared.append(base.Result(base.Outcome.FAILED, "too-large"))
            continue
        prepared.append(Push(subscription, encrypt(data, subscription), topic(target.key)))
    return prepared


def classify(status: int, retry_after: bytes | None) -> base.Result:
    """A push service's reply status as the target's Result."""
    if 200 <= status < 300:
        return base.SENT
    if status in (404, 410):
        return base.Result(base.Outcome.INVALID, f"http-{status}")
    if status == 413:
        return base.Result(base.Outcome.FAILED, "too-large")
    if status in (401, 403):
        return base.Result(base.Outcome.FAILED, "auth")
    if status == 429 or (status == 503 and retry_after is not None):
        return base.Result(base.Outcome.RETRY, f"http-{status}", retry_after=base.parse_retry_after(retry_after))
    if status >= 500:
        return base.Result(base.Outcome.RETRY, f"http-{status}")
    return base.Result(base.Outcome.FAILED, f"http-{status}")


class VapidSigner:
    """The `Authorization` header per push service origin, signed once and reused until shortly before `exp`."""

    def __init__(self, vapid: Vapid, subject: str, seconds: Callable[[], float]) -> None:
        self._vapid = vapid
        self._subject = subject
        self._seconds = seconds
        self._headers: dict[str, tuple[str, float]] = {}

    def header(self, origin: str) -> str:
        now = self._seconds()
        cached = self._headers.get(origin)
        if cached is not None and now < cached[1] - VAPID_RENEW_BEFORE:
            return cached[0]
        exp = int(now) + VAPID_LIFETIME
        signed: dict[str, str] = self._vapid.sign({"sub": self._subject, "aud": origin, "exp": exp})
        self._headers[origin] = (signed["Authorization"], float(exp))
        return signed["Authorization"]

    def forget(self, origin: str) -> None:
        """Sign afresh next time: the push service refused the cached token."""
        self._headers.pop(origin, None)


class WebPushGateway:
    """Sends a job's message to Web Push subscriptions, at most `concurrency` requests in flight."""

    name = "webpush"

    def __init__(
        self,
        reactor: Any,
        http: Any,
        signer: VapidSigner,
        tasks: TaskRunner,
        concurrency: int,
        timeout: float,
        pool: HTTPConnectionPool | None = None,
    ) -> None:
        self._reactor = reactor
        self._http = http
        self._signer = signer
        self._tasks = tasks
        self._timeout = timeout
        self._pool = pool
        self._semaphore = defer.DeferredSemaphore(concurrency)

    @defer.inlineCallbacks
    def send(self, message: base.Message, targets: Sequence[base.Target]) -> Any:
        try:
            prepared = yield self._tasks.run(prepare, message, list(targets))
        except Exception:
            # The pool stopping under us (worker shutdown) is worth a retry; prepare() itself raises for nothing.
            log.failure("webpush: preparing {count} pushes failed", count=len(targets))
            return [base.Result(base.Outcome.RETRY, "encrypt")] * len(targets)
        pending = [
            self._semaphore.run(self._post, item, message.ttl) if isinstance(item, Push) else defer.succeed(item)
            for item in prepared
        ]
        results = yield defer.gatherResults(pending)
        return results

    @defer.inlineCallbacks
    def _post(self, push: Push, ttl: int) -> Any:
        origin = push.subscription.origin
        headers = {
            "Authorization": self._signer.header(origin),  # a bad subject is refused by build(), never here
            "TTL": str(max(ttl, 0)),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Urgency": "normal",
            "Topic": push.topic,
        }
        # One timer for the request and its reply body; cancelling surfaces as different errors (CancelledError,
        # ResponseNeverReceived) depending on where the request was, so the timer itself says it was a timeout.
        pending: defer.Deferred[Any] = self._http.post(push.subscription.endpoint, data=push.body, headers=headers)
        timer = self._reactor.callLater(self._timeout, lambda: pending.cancel())
        try:
            response = yield pending
            pending = treq.content(response)
            yield pending
        except Exception as exc:
            if not timer.active():
                return base.Result(base.Outcome.RETRY, "timeout")
            if isinstance(exc, (ConnectError, ConnectingCancelledError, DNSLookupError)):
                return base.Result(base.Outcome.RETRY, "connect")
            if not isinstance(exc, (ResponseNeverReceived, ResponseFailed)):
                log.failure("webpush: POST to {origin} failed", origin=origin)
            return base.Result(base.Outcome.RETRY, "connection")
        finally:
            if timer.active():
                timer.cancel()
        result = classify(response.code, response.headers.getRawHeaders(b"retry-after", [None])[0])
        if result.reason == "auth":
            self._signer.forget(origin)
        return result

    def close(self) -> defer.Deferred[None]:
        if self._pool is None:
            return defer.succeed(None)
        closed: defer.Deferred[None] = self._pool.closeCachedConnections()
        return closed


@implementer(IPolicyForHTTPS)
class TrustExactly:
    """HTTPS that trusts exactly one CA (gateway-ca), for a private push service or a test one."""

    def __init__(self, pem: bytes) -> None:
        self._root = Certificate.loadPEM(pem)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root)


def load_vapid(path: str) -> Vapid:
    """The VAPID key from its PEM file, or a ConfigError naming the setting."""
    if not path:
        raise ConfigError("webpush-vapid-key: set the PEM file of the VAPID private key (EC P-256)")
    # Not Vapid.from_file: for a missing file it generates and saves a new key, which no browser subscribed with.
    pem = base.read_setting_file("webpush-vapid-key", path)
    try:
        vapid = Vapid.from_pem(pem)
    except Exception:
        raise ConfigError(f"webpush-vapid-key: {path} is not an EC P-256 private key in PEM") from None
    if not isinstance(vapid.private_key, ec.EllipticCurvePrivateKey) or vapid.private_key.curve.name != "secp256r1":
        raise ConfigError(f"webpush-vapid-key: {path} is not an EC P-256 private key in PEM")
    return vapid


def build(reactor: Any, config: Config, tasks: TaskRunner) -> WebPushGateway:
    vapid = load_vapid(config.webpush_vapid_key)
    subject = config.webpush_subject
    try:
        if not subject.startswith(("mailto:", "https://")):
            raise VapidException("not mailto: or https:")
        vapid.sign({"sub": subject, "aud": "https://push.example"})
    except VapidException:
        raise ConfigError(f"webpush-subject: {subject!r} is not a mailto: or https: URL (the VAPID contact)") from None
    policy: Any = None
    if config.gateway_ca:
        try:
            with open(config.gateway_ca, "rb") as f:
                policy = TrustExactly(f.read())
        except OSError as exc:
            raise ConfigError(f"gateway-ca: cannot read {config.gateway_ca}: {exc.strerror}") from None
        except Exception:
            raise ConfigError(f"gateway-ca: {config.gateway_ca} is not a PEM certificate") from None
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = config.gateway_concurrency
    agent: Any = Agent(reactor, policy or BrowserLikePolicyForHTTPS(), connectTimeout=config.gateway_timeout, pool=pool)
    signer = VapidSigner(vapid, subject, reactor.seconds)
    return WebPushGateway(
        reactor, treq.client.HTTPClient(agent), signer, tasks, config.gateway_concurrency, config.gateway_timeout, pool
    )
