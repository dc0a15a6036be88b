"""The apns gateway: one HTTP/2 POST per device token to Apple's provider API, signed with a provider token.

Request (Apple's "Sending notification requests to APNs"): `POST {apns-url}/3/device/<token>` with
`authorization: bearer <ES256 JWT>` (header `kid` = apns-key-id, claims `iss` = apns-team-id and `iat`; one token
reused and signed again every 40 minutes, since APNs refuses renewals more often than every 20 and tokens older
than 60), `apns-topic`, `apns-push-type: alert`, `apns-priority: 10`, `apns-expiration` = now + the job's ttl
(0: deliver once, never store), `apns-id` = a UUID derived from the idempotency key and `apns-collapse-id` = the
key itself, so a retry replaces a copy still waiting for an offline device instead of showing twice. Body:
`{"aps": {"alert": {"title", "body"}}, <the rendered data keys>, "pushd_key": <key>}`, at most 4096 bytes.

Replies (Apple's "Handling notification responses from APNs"), as the target's Result:

    200                                          SENT
    410 Unregistered, ExpiredToken               INVALID <reason> (a dead token: removed from the audience)
    400 BadDeviceToken, DeviceTokenNotForTopic   INVALID <reason>
    400 any other reason (BadTopic, ...)         FAILED <reason>
    403 ExpiredProviderToken                     a new provider token, and that target sent again once
    403 any other reason                         FAILED auth (the worker pauses the job)
    404 BadPath, 405 MethodNotAllowed            FAILED <reason>
    413 PayloadTooLarge                          FAILED too-large
    429 TooManyRequests (one device, too often)  RETRY <reason>, that target with backoff
    429 TooManyProviderTokenUpdates              RETRY <reason>, the gateway held 5 s (APNs sends no Retry-After)
    500, 503, other 5xx                          RETRY <reason>
    a timeout, a refused or broken connection    RETRY timeout / connect / connection

A batch of 10 or more whose every target is BadDeviceToken or DeviceTokenNotForTopic is the gateway's settings
(a sandbox/production mix-up in apns-url, a wrong apns-topic), not dead tokens: every target is FAILED
misconfigured, which pauses the job and removes nothing from the audience.

Checked before sending, without a request: a payload over 4096 bytes is FAILED too-large, and an address that
is not hexadecimal is INVALID BadDeviceToken (Apple hands out tokens as bytes that providers store hex-encoded,
so anything else can never be delivered to, and it must not reach the request path).

Why httpx in the task-worker pool: APNs speaks only HTTP/2 and Twisted's HTTP client speaks only HTTP/1.1. httpx
does HTTP/2 but blocks, so requests never run on the reactor: each batch is split over up to min(gateway-concurrency,
task-workers) task calls, each sending its share one request after another on its thread's own HTTP/2 connection
(kept open between batches; not one connection shared by the threads, see ThreadClients).
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer
from twisted.logger import Logger

from pushd.config import Config, ConfigError
from pushd.gateways import base
from pushd.tasks import TaskRunner

log = Logger()

#: APNs refuses larger payloads of regular remote notifications (VoIP ones may have 5120, pushd sends none).
MAX_PAYLOAD = 4096
#: A provider token is signed again after 40 minutes: APNs refuses one older than 60 minutes and answers
#: TooManyProviderTokenUpdates to renewals more often than every 20.
TOKEN_RENEW_AFTER = 40 * 60
#: APNs answers 429 without Retry-After; this long the gateway holds off before the same targets go again.
TOO_MANY_REQUESTS_WAIT = 5.0
#: apns-collapse-id may have at most 64 bytes.
MAX_COLLAPSE_ID = 64
#: Seconds an idle connection is kept: Apple asks providers to keep connections open across notifications
#: (rapid reconnects look like a denial-of-service attack), so it outlives the pause between batches.
KEEPALIVE = 300.0
#: Namespace of the apns-id UUIDs (uuid5 of the idempotency key).
APNS_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://pushd.invalid/apns-id")

_DEVICE_TOKEN = re.compile(r"[0-9A-Fa-f]{1,200}")
_APPLE_ID = re.compile(r"[A-Za-z0-9]{10}")
_REASON = re.compile(r"[A-Za-z]{1,64}")
_DEAD_TOKEN = ("BadDeviceToken", "DeviceTokenNotForTopic")
#: What every token of a batch answers when apns-url is the other environment or apns-topic is wrong.
WRONG_SETTINGS = frozenset(_DEAD_TOKEN)
_EXPIRED_PROVIDER_TOKEN = "ExpiredProviderToken"


def device_token_ok(address: str) -> bool:
    """A device token as providers store it: hexadecimal (variable length; Apple says not to assume 32 bytes)."""
    return _DEVICE_TOKEN.fullmatch(address) is not None


def apns_id(key: str) -> str:
    """The notification's UUID, the same for every attempt at the same recipient of the same job."""
    return str(uuid.uuid5(APNS_ID_NAMESPACE, key))


def collapse_id(key: str) -> str:
    """The idempotency key, or its digest when it would not fit the 64 bytes APNs allows."""
    if len(key.encode("utf-8")) <= MAX_COLLAPSE_ID:
        return key
    return uuid.uuid5(APNS_ID_NAMESPACE, key).hex


def payload(message: base.Message, target: base.Target) -> bytes:
    """The notification's JSON: the rendered alert, the data keys beside `aps` (Apple reserves `aps` itself)."""
    rendered = base.render(message, target)
    doc: dict[str, Any] = {"aps": {"alert": {"title": rendered.title, "body": rendered.body}}}
    doc.update((k, v) for k, v in rendered.data.items() if k != "aps")
    doc["pushd_key"] = target.key
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def request_headers(topic: str, token: str, message: base.Message, target: base.Target, now: float) -> dict[str, str]:
    return {
        "authorization": f"bearer {token}",
        "apns-topic": topic,
        "apns-push-type": "alert",
        "apns-priority": "10",
        # 0 tells APNs to try once and never store the notification, which is what a ttl of 0 means.
        "apns-expiration": str(int(now) + message.ttl) if message.ttl > 0 else "0",
        "apns-id": apns_id(target.key),
        "apns-collapse-id": collapse_id(target.key),
    }


def reason_of(body: bytes) -> str:
    """The `reason` of an APNs error body, if it has a plausible one."""
    try:
        reason = json.loads(body).get("reason") if body.strip() else None
    except (ValueError, AttributeError):
        return ""
    return reason if isinstance(reason, str) and _REASON.fullmatch(reason) else ""


def classify(status: int, reason: str) -> base.Result:
    """An APNs reply's status and reason as the target's Result (the table in the module docstring)."""
    named = reason or f"http-{status}"
    if status == 200:
        return base.SENT
    if status == 410:
        return base.Result(base.Outcome.INVALID, reason or "Unregistered")
    if status == 400 and reason in _DEAD_TOKEN:
        return base.Result(base.Outcome.INVALID, reason)
    if status == 403:
        return base.Result(base.Outcome.FAILED, "auth")
    if status == 413:
        return base.Result(base.Outcome.FAILED, "too-large")
    if status == 429 and reason == "TooManyProviderTokenUpdates":
        return base.Result(base.Outcome.RETRY, named, retry_after=TOO_MANY_REQUESTS_WAIT)
    if status == 429:
        # TooManyRequests is about one device token: that target backs off, the rest of the job goes on.
        return base.Result(base.Outcome.RETRY, named)
    if status >= 500:
        return base.Result(base.Outcome.RETRY, named)
    return base.Result(base.Outcome.FAILED, named)


def transport_failure(exc: httpx.HTTPError) -> base.Result:
    """No reply: a retry, named after what went wrong."""
    if isinstance(exc, httpx.TimeoutException):
        return base.Result(base.Outcome.RETRY, "timeout")
    if isinstance(exc, httpx.ConnectError):
        return base.Result(base.Outcome.RETRY, "connect")
    return base.Result(base.Outcome.RETRY, "connection")


def shares(targets: Sequence[base.Target], count: int) -> list[Sequence[base.Target]]:
    """`targets` cut into at most `count` contiguous runs of nearly equal length, in order."""
    count = max(1, min(count, len(targets)))
    size, extra = divmod(len(targets), count)
    runs: list[Sequence[base.Target]] = []
    start = 0
    for n in range(count):
        end = start + size + (1 if n < extra else 0)
        runs.append(targets[start:end])
        start = end
    return runs


class ProviderToken:
    """The ES256 provider token, shared by the task threads: signed once, reused, renewed every 40 minutes."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, key_id: str, team_id: str,
                 seconds: Callable[[], float] = time.time) -> None:
        self._key = key
        self._key_id = key_id
        self._team_id = team_id
        self._seconds = seconds
        self._lock = threading.Lock()
        self._token = ""
        self._issued = 0.0

    def current(self) -> str:
        with self._lock:
            now = self._seconds()
            if not self._token or now - self._issued >= TOKEN_RENEW_AFTER:
                self._sign(now)
            return self._token

    def refused(self, token: str) -> str:
        """A new token after APNs called `token` expired; threads that were refused the same one share it."""
        with self._lock:
            if token == self._token:
                self._sign(self._seconds())
            return self._token

    def _sign(self, now: float) -> None:
        self._token = jwt.encode({"iss": self._team_id, "iat": int(now)}, self._key, algorithm="ES256",
                                 headers={"kid": self._key_id})
        self._issued = now


class ThreadClients:
    """One httpx.Client, so one HTTP/2 connection, per task thread that sends.

    Not one client shared by the threads: httpx's synchronous HTTP/2 changes the connection's h2 and HPACK state
    from every thread without a lock, and threads sharing a connection fail at random ("deque mutated during
    iteration", StreamIDTooLowError: encode/httpx#3566, open). Each thread sends one request at a time, so its
    connection never needs more than one stream; Apple suggests several connections for throughput anyway.
    """

    def __init__(self, make: Callable[[], httpx.Client]) -> None:
        self._make = make
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[httpx.Client] = []

    def get(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None or client.is_closed:
            client = self._local.client = self._make()
            with self._lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        """Close every thread's client (any thread may call it: nothing sends any more at shutdown)."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


class ApnsGateway:
    """Sends a job's message to APNs device tokens from the task-worker pool, one HTTP/2 connection per thread."""

    name = "apns"

    def __init__(self, clients: ThreadClients, url: str, topic: str, token: ProviderToken, tasks: TaskRunner,
                 concurrency: int, seconds: Callable[[], float] = time.time) -> None:
        """`concurrency`: task calls a batch is split over (min(gateway-concurrency, task-workers) from build)."""
        self._clients = clients
        self._url = url.rstrip("/")
        self._topic = topic
        self._token = token
        self._tasks = tasks
        self._concurrency = concurrency
        self._seconds = seconds

    def send(self, message: base.Message, targets: Sequence[base.Target]) -> defer.Deferred[Sequence[base.Result]]:
        if not targets:
            return defer.succeed([])
        pending = []
        for share in shares(targets, self._concurrency):
            d = self._tasks.run(self.send_share, message, share)
            d.addErrback(self._share_failed, len(share))
            pending.append(d)
        gathered: defer.Deferred[list[list[base.Result]]] = defer.gatherResults(pending)
        return gathered.addCallback(
            lambda parts: base.misconfigured([result for part in parts for result in part], WRONG_SETTINGS))

    @staticmethod
    def _share_failed(failure: Any, count: int) -> list[base.Result]:
        # The pool stopping under us (worker shutdown), or a bug: either way the recipients are worth a retry.
        log.failure("apns: sending {count} notifications failed", failure, count=count)
        return [base.Result(base.Outcome.RETRY, "task")] * count

    def send_share(self, message: base.Message, targets: Sequence[base.Target]) -> list[base.Result]:
        """One task call's part of a batch, one request after another (blocking: runs in a task thread)."""
        now = self._seconds()
        client = self._clients.get()
        return [self._deliver(client, message, target, now) for target in targets]

    def _deliver(self, client: httpx.Client, message: base.Message, target: base.Target, now: float) -> base.Result:
        if not device_token_ok(target.address):
            return base.Result(base.Outcome.INVALID, "BadDeviceToken")
        body = payload(message, target)
        if len(body) > MAX_PAYLOAD:
            return base.Result(base.Outcome.FAILED, "too-large")
        token = self._token.current()
        try:
            status, reason = self._post(client, message, target, body, token, now)
            if status == 403 and reason == _EXPIRED_PROVIDER_TOKEN:
                status, reason = self._post(client, message, target, body, self._token.refused(token), now)
        except httpx.HTTPError as exc:
            return transport_failure(exc)
        return classify(status, reason)

    def _post(self, client: httpx.Client, message: base.Message, target: base.Target, body: bytes, token: str,
              now: float) -> tuple[int, str]:
        """(status, reason) of one request; raises httpx.HTTPError when no reply came."""
        response = client.post(f"{self._url}/3/device/{target.address}", content=body,
                                     headers=request_headers(self._topic, token, message, target, now))
        return response.status_code, reason_of(response.content) if response.status_code != 200 else ""

    def close(self) -> defer.Deferred[None]:
        closed: defer.Deferred[None] = self._tasks.run(self._clients.close)
        return closed.addErrback(lambda failure: log.failure("apns: closing the client failed", failure))


def load_key(path: str) -> ec.EllipticCurvePrivateKey:
    """The token-signing key from its .p8 file, or a ConfigError naming apns-key."""
    pem = base.read_setting_file("apns-key", path)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError(f"apns-key: {path} is not an unencrypted EC P-256 private key in PEM (the .p8 from Apple)")
    return key


def check_url(url: str) -> str:
    """apns-url without its trailing slash, or a ConfigError.

    https only, loopback included: APNs speaks HTTP/2 and this client does HTTP/2 only over TLS (ALPN), so a
    plain http:// URL could never work; a local stand-in serves TLS with a certificate given as gateway-ca.
    """
    try:
        parts = urlsplit(url)
        bad_port = parts.port == 0
    except ValueError:
        parts, bad_port = urlsplit(""), True
    if parts.scheme == "http":
        raise ConfigError(f"apns-url: {url[:80]!r} is plain http; APNs is HTTP/2 over TLS, a local stand-in too: "
                          "use https:// and give its certificate as gateway-ca")
    if parts.scheme != "https" or not parts.hostname or bad_port or parts.path not in ("", "/") or parts.query \
            or parts.fragment:
        raise ConfigError(f"apns-url: {url[:80]!r} is not an https:// base URL (https://api.push.apple.com, "
                          "https://api.sandbox.push.apple.com)")
    return url.rstrip("/")


def tls_context(ca: str) -> ssl.SSLContext:
    """The system's CAs, or exactly the gateway-ca file when it is set."""
    if not ca:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=ca)
    except OSError as exc:
        raise ConfigError(f"gateway-ca: cannot read {ca}: {exc.strerror}") from None
    except ssl.SSLError:
        raise ConfigError(f"gateway-ca: {ca} is not a PEM certificate") from None


def build(reactor: Any, config: Config, tasks: TaskRunner) -> ApnsGateway:
    if not config.apns_key:
        raise ConfigError("apns-key: set the .p8 file of the APNs token-signing key")
    key = load_key(config.apns_key)
    if not _APPLE_ID.fullmatch(config.apns_key_id):
        raise ConfigError(f"apns-key-id: {config.apns_key_id[:40]!r} is not a key ID (10 letters and digits, "
                          "shown beside the key in Apple's developer account)")
    if not _APPLE_ID.fullmatch(config.apns_team_id):
        raise ConfigError(f"apns-team-id: {config.apns_team_id[:40]!r} is not a Team ID (10 letters and digits)")
    topic = config.apns_topic
    if not topic or any(c.isspace() or not c.isprintable() for c in topic):
        raise ConfigError(f"apns-topic: {topic[:80]!r} is not a bundle ID (the app's, e.g. com.example.app)")
    url = check_url(config.apns_url)
    concurrency = max(1, min(config.gateway_concurrency, config.task_workers))
    verify = tls_context(config.gateway_ca)
    timeout = httpx.Timeout(float(config.gateway_timeout))

    def client() -> httpx.Client:
        return httpx.Client(
            http1=False,  # never fall back to HTTP/1.1, which APNs does not answer
            http2=True,
            verify=verify,
            timeout=timeout,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=KEEPALIVE),
            trust_env=False,  # like the other gateways: no proxy or CA bundle from the environment
        )

    token = ProviderToken(key, config.apns_key_id, config.apns_team_id)
    return ApnsGateway(ThreadClients(client), url, topic, token, tasks, concurrency)
