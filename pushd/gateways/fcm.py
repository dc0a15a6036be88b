"""The fcm gateway: one FCM HTTP v1 `messages:send` POST per device token, authorised by an OAuth2 access token
that the service account's own key obtains.

Auth is Google's service-account flow: an RS256 JWT (`iss` the account's email, `scope` firebase.messaging,
`aud` its `token_uri`, one hour) POSTed as a jwt-bearer grant to `token_uri`; the access token it returns is
reused by every send until 5 minutes before it expires (halfway, for tokens that live under 10 minutes), and
sends that need one at the same moment share one token request.

Request: `{"message": {"token", "notification": {"title", "body"}, "data": {..., "pushd_key"}, "android":
{"ttl": "<ttl>s"}, "apns": {"headers": {"apns-expiration": <unix time>}}}}`. `pushd_key` is the recipient's
idempotency key, the same on every attempt, so the app can drop a message it has already shown. A notification
with neither title nor body is left out (a data message). Payloads over FCM's 4096 bytes (data keys and values,
title and body) fail `too-large` without a request.

Replies are classified by the FcmError `errorCode` of Google's error body, then its `status`, then the HTTP code:
200 sent; UNREGISTERED (404) and SENDER_ID_MISMATCH (403) invalid, the token leaves the audience; INVALID_ARGUMENT
(400) failed, except "The registration token is not a valid FCM registration token", which is invalid
(`invalid-token`): pushd builds and sizes every payload itself, so an INVALID_ARGUMENT that names the token is the
token's fault, and Firebase's token guide says to delete such tokens when the payload is valid (gorush does the
same); QUOTA_EXCEEDED (429) holds the gateway for Retry-After, 60 s without one (FCM's documented minimum delay
after an exceeded message rate); UNAVAILABLE (503) retries, holding for Retry-After when given; INTERNAL and other
5xx retry; THIRD_PARTY_AUTH_ERROR (401: the project's APNs or web push credential) fails that target; any other
401 is our access token refused: dropped, fetched again, the target sent once more, and `auth` if refused again;
PERMISSION_DENIED (403) is `auth`; a batch of 10 or more that is all SENDER_ID_MISMATCH is the credentials of
another project, not dead tokens: `misconfigured`, which pauses the job (base.misconfigured); other 4xx `http-<status>` (a 404 without UNREGISTERED is a wrong fcm-url, not a
dead token). The token endpoint refusing the account (400/401, e.g. invalid_grant) fails every target of the send
`auth`, which pauses the job; its 5xx, timeouts and connection errors retry, as do the sends'.

HTTP is the keep-alive Agent of `gateway-concurrency` connections (webhook.http_agent, `gateway-ca` honoured),
used directly rather than through treq: at one request per message, treq's URL parsing, cookie jar and
redirect and decoder wrappers about doubled the worker's CPU per message (0.9 ms against 0.45 ms, measured
against the local fake on the 2-core dev machine).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseFailed, ResponseNeverReceived, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from pushd.config import Config, ConfigError
from pushd.gateways import base
from pushd.gateways.webhook import failure_reason, http_agent
from pushd.tasks import TaskRunner

log = Logger()

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Google accepts assertions of at most one hour.
ASSERTION_LIFETIME = 3600
RENEW_BEFORE = 300
#: What every token of a batch answers when fcm-credentials are another Firebase project's.
WRONG_SETTINGS = frozenset({"SENDER_ID_MISMATCH"})
#: FCM's limit for a message to a token: data keys and values, title and body.
MAX_PAYLOAD = 4096
#: FCM keeps a message for an offline Android device at most 4 weeks.
MAX_TTL = 2_419_200
QUOTA_DEFAULT_WAIT = 60.0
USER_AGENT = b"pushd"
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
FIELDS = ("project_id", "client_email", "private_key", "token_uri")

AUTH = base.Result(base.Outcome.FAILED, "auth")
TOO_LARGE = base.Result(base.Outcome.FAILED, "too-large")
INVALID_TOKEN = base.Result(base.Outcome.INVALID, "invalid-token")


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """What pushd needs of a Google service-account key file."""

    project_id: str
    client_email: str
    private_key: rsa.RSAPrivateKey
    token_uri: str


class TokenRefused(Exception):
    """The token endpoint refused the service account (a revoked key, a deleted account): nothing will send."""


class TokenUnavailable(Exception):
    """No access token this time (the endpoint failed or timed out); `reason` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RequestTimeout(Exception):
    pass


def assertion(account: ServiceAccount, now: float) -> str:
    """The signed JWT the token endpoint exchanges for an access token."""
    issued = int(now)
    claims = {"iss": account.client_email, "scope": SCOPE, "aud": account.token_uri, "iat": issued,
              "exp": issued + ASSERTION_LIFETIME}
    return jwt.encode(claims, account.private_key, algorithm="RS256")


def payload_size(notification: dict[str, str], data: dict[str, str]) -> int:
    """Bytes FCM counts against its 4096: every data key and value, and the notification's title and body."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in data.items()) + \
        sum(len(v.encode()) for v in notification.values())


def request_body(message: base.Message, target: base.Target, now: float) -> bytes | base.Result:
    """The target's `messages:send` body, or its final Result when it must not be sent."""
    rendered = base.render(message, target)
    data = {str(k): str(v) for k, v in rendered.data.items()}
    data["pushd_key"] = target.key
    notification = {k: v for k, v in (("title", rendered.title), ("body", rendered.body)) if v}
    if payload_size(notification, data) > MAX_PAYLOAD:
        return TOO_LARGE
    ttl = min(max(message.ttl, 0), MAX_TTL)
    fcm: dict[str, Any] = {"token": target.address, "data": data, "android": {"ttl": f"{ttl}s"},
                           # apns-expiration is a unix time; 0 tells APNs not to store the message at all.
                           "apns": {"headers": {"apns-expiration": str(int(now) + ttl if ttl else 0)}}}
    if notification:
        fcm["notification"] = notification
    return json.dumps({"message": fcm}, separators=(",", ":"), ensure_ascii=False).encode()


def google_error(body: bytes) -> tuple[str, str, str]:
    """(FcmError errorCode, status, message) of Google's error body; empty strings for what is not there."""
    try:
        error = json.loads(body)["error"]
        status, text = str(error.get("status") or ""), str(error.get("message") or "")
        details = error.get("details") or []
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", "", ""
    code = next((str(d.get("errorCode") or "") for d in details
                 if isinstance(d, dict) and d.get("@type") == FCM_ERROR), "")
    return code, status, text


def classify(status: int, retry_after: bytes | None, body: bytes) -> base.Result:
    """FCM's reply to one send as the target's Result (the module docstring has the table)."""
    if status == 200:
        return base.SENT
    code, error_status, text = google_error(body)
    name = code or error_status or f"http-{status}"
    if code == "UNREGISTERED":
        return base.Result(base.Outcome.INVALID, "UNREGISTERED")
    if code == "SENDER_ID_MISMATCH":
        return base.Result(base.Outcome.INVALID, "SENDER_ID_MISMATCH")
    if code == "THIRD_PARTY_AUTH_ERROR":
        return base.Result(base.Outcome.FAILED, "THIRD_PARTY_AUTH_ERROR")
    if code == "QUOTA_EXCEEDED" or status == 429:
        return base.Result(base.Outcome.RETRY, name, base.parse_retry_after(retry_after, QUOTA_DEFAULT_WAIT))
    if status == 503 and retry_after is not None:
        return base.Result(base.Outcome.RETRY, name, base.parse_retry_after(retry_after))
    if status >= 500:
        return base.Result(base.Outcome.RETRY, name)
    if status in (401, 403):
        return AUTH
    if status == 400 and (code or error_status) == "INVALID_ARGUMENT":
        lowered = text.lower()
        if "registration token" in lowered and "not a valid" in lowered:
            return INVALID_TOKEN
        if "too big" in lowered or "too large" in lowered:
            return TOO_LARGE
        return base.Result(base.Outcome.FAILED, "INVALID_ARGUMENT")
    return base.Result(base.Outcome.FAILED, f"http-{status}")


async def post(reactor: Any, agent: Any, url: bytes, body: bytes, headers: Headers,
               timeout: float) -> tuple[int, bytes | None, bytes]:
    """Status, Retry-After and body of one POST, all within `timeout` seconds (RequestTimeout otherwise)."""
    # One timer for the request and its reply body; cancelling surfaces as different errors depending on where
    # the request was, so the timer itself says it was a timeout.
    pending: defer.Deferred[Any] = agent.request(b"POST", url, headers, WholeBody(body))
    timer = reactor.callLater(timeout, lambda: pending.cancel())
    try:
        response = await pending
        pending = readBody(response)
        content: bytes = await pending
    except Exception as exc:
        if not timer.active():
            raise RequestTimeout() from exc
        raise
    finally:
        if timer.active():
            timer.cancel()
    return response.code, response.headers.getRawHeaders(b"retry-after", [None])[0], content


@implementer(IBodyProducer)
class WholeBody:
    """A request body written at once, with the headers.

    A few KB need no pacing; FileBodyProducer would write them through the global reactor's cooperator a turn
    later, which also keeps a test's Clock-driven requests from ever sending their body.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def connection_reason(exc: Exception, what: str) -> str:
    if isinstance(exc, RequestTimeout):
        return "timeout"
    if not isinstance(exc, (ConnectError, ConnectingCancelledError, DNSLookupError, ResponseNeverReceived,
                            ResponseFailed)):
        log.failure("fcm: {what} failed", what=what)
    return failure_reason(exc)


class AccessTokens:
    """The service account's OAuth2 access token: fetched when missing or close to expiry, and one request at a
    time, however many sends are waiting for it."""

    def __init__(self, reactor: Any, agent: Any, account: ServiceAccount, timeout: float) -> None:
        self._reactor = reactor
        self._agent = agent
        self._uri = account.token_uri.encode("ascii")
        self._account = account
        self._timeout = timeout
        self._token: str | None = None
        self._renew_at = 0.0
        self._waiting: list[defer.Deferred[str]] = []
        #: Token requests made (tests and logs).
        self.requests = 0

    def get(self) -> defer.Deferred[str]:
        """The access token; errbacks with TokenRefused or TokenUnavailable."""
        if self._token is not None and self._reactor.seconds() < self._renew_at:
            return defer.succeed(self._token)
        waiter: defer.Deferred[str] = defer.Deferred()
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            defer.ensureDeferred(self._fetch()).addBoth(self._fetched)
        return waiter

    def forget(self, token: str) -> None:
        """FCM refused `token`: fetch a new one next time (once, however many sends saw it refused)."""
        if self._token == token:
            self._token = None

    def _fetched(self, result: str | Failure) -> None:
        waiting, self._waiting = self._waiting, []
        if isinstance(result, Failure) and not result.check(TokenRefused, TokenUnavailable):
            log.failure("fcm: getting an access token failed", result)
            result = Failure(TokenUnavailable("token-error"))
        for waiter in waiting:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _fetch(self) -> str:
        self.requests += 1
        account = self._account
        now = self._reactor.seconds()
        body = urlencode({"grant_type": GRANT_TYPE, "assertion": assertion(account, now)}).encode()
        headers = Headers({b"content-type": [b"application/x-www-form-urlencoded"], b"user-agent": [USER_AGENT]})
        try:
            status, _, content = await post(self._reactor, self._agent, self._uri, body, headers, self._timeout)
        except Exception as exc:
            raise TokenUnavailable(f"token-{connection_reason(exc, 'token request')}") from None
        if status in (400, 401, 403):
            log.warn("fcm: {uri} refused the service account {email}: {status} {reply}", uri=account.token_uri,
                     email=account.client_email, status=status, reply=content[:200].decode("utf-8", "replace"))
            raise TokenRefused()
        if status != 200:
            raise TokenUnavailable(f"token-http-{status}")
        try:
            reply = json.loads(content)
            token, lifetime = str(reply["access_token"]), float(reply.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            log.warn("fcm: {uri} answered 200 without an access token", uri=account.token_uri)
            raise TokenUnavailable("token-reply") from None
        self._token = token
        self._renew_at = now + lifetime - min(RENEW_BEFORE, lifetime / 2)
        return token


class FcmGateway:
    """Sends a job's message to FCM registration tokens, at most `concurrency` requests in flight."""

    name = "fcm"

    def __init__(self, reactor: Any, agent: Any, account: ServiceAccount, *, url: str, concurrency: int,
                 timeout: float, pool: HTTPConnectionPool | None = None) -> None:
        """`agent`: an Agent with a keep-alive pool (tests give treq.testing.RequestTraversalAgent)."""
        self._reactor = reactor
        self._agent = agent
        self._timeout = timeout
        self._pool = pool
        self._semaphore = defer.DeferredSemaphore(concurrency)
        self.send_url = f"{url.rstrip('/')}/v1/projects/{quote(account.project_id, safe='')}/messages:send"
        self._send_uri = self.send_url.encode("ascii")
        self.tokens = AccessTokens(reactor, agent, account, timeout)

    def send(self, message: base.Message, targets: Sequence[base.Target]) -> defer.Deferred[Sequence[base.Result]]:
        return defer.ensureDeferred(self._send(message, targets))

    async def _send(self, message: base.Message, targets: Sequence[base.Target]) -> Sequence[base.Result]:
        now = self._reactor.seconds()
        prepared = [request_body(message, target, now) for target in targets]
        if any(isinstance(item, bytes) for item in prepared):
            # Before the first request: a refused account fails the whole send with one token request.
            failed = await self._token_failure()
            if failed is not None:
                return [failed if isinstance(item, bytes) else item for item in prepared]
        pending = [self._semaphore.run(self._post_now, item) if isinstance(item, bytes) else defer.succeed(item)
                   for item in prepared]
        results: list[base.Result] = await defer.gatherResults(pending)
        return base.misconfigured(results, WRONG_SETTINGS)

    async def _token_failure(self) -> base.Result | None:
        try:
            await self.tokens.get()
        except TokenRefused:
            return AUTH
        except TokenUnavailable as exc:
            return base.Result(base.Outcome.RETRY, exc.reason)
        return None

    def _post_now(self, body: bytes) -> defer.Deferred[base.Result]:
        return defer.ensureDeferred(self._post(body))

    async def _post(self, body: bytes) -> base.Result:
        for attempt in range(2):
            try:
                token = await self.tokens.get()
            except TokenRefused:
                return AUTH
            except TokenUnavailable as exc:
                return base.Result(base.Outcome.RETRY, exc.reason)
            headers = Headers({b"authorization": [b"Bearer " + token.encode("ascii")],
                               b"content-type": [b"application/json; charset=utf-8"], b"user-agent": [USER_AGENT]})
            try:
                status, retry_after, content = await post(self._reactor, self._agent, self._send_uri, body,
                                                          headers, self._timeout)
            except Exception as exc:
                return base.Result(base.Outcome.RETRY, connection_reason(exc, "send"))
            result = classify(status, retry_after, content)
            if status == 401 and result is AUTH:
                self.tokens.forget(token)
                if attempt == 0:
                    continue
            return result
        return AUTH

    def close(self) -> defer.Deferred[None]:
        if self._pool is None:
            return defer.succeed(None)
        closed: defer.Deferred[None] = self._pool.closeCachedConnections()
        return closed


def _http_url(url: str) -> bool:
    parts = urlsplit(url)
    return url.isascii() and parts.scheme in ("http", "https") and bool(parts.hostname)


def load_service_account(path: str) -> ServiceAccount:
    """The service account of the key file at `path`, or a ConfigError naming fcm-credentials and the fault."""
    raw = base.read_setting_file("fcm-credentials", path)
    try:
        doc = json.loads(raw)
    except ValueError:
        raise ConfigError(f"fcm-credentials: {path} is not JSON (expected a service-account key file)") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"fcm-credentials: {path} is not a service-account key (a JSON object)")
    for name in FIELDS:
        if not isinstance(doc.get(name), str) or not doc[name]:
            raise ConfigError(f"fcm-credentials: {path} has no {name} (a service-account key file has "
                              f"{', '.join(FIELDS)})")
    try:
        key = serialization.load_pem_private_key(doc["private_key"].encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"fcm-credentials: private_key in {path} is not an RSA private key in PEM")
    if not _http_url(doc["token_uri"]):
        raise ConfigError(f"fcm-credentials: token_uri {doc['token_uri'][:80]!r} in {path} is not an http:// or "
                          "https:// URL")
    return ServiceAccount(doc["project_id"], doc["client_email"], key, doc["token_uri"])


def build(reactor: Any, config: Config, tasks: TaskRunner) -> FcmGateway:
    account = load_service_account(config.fcm_credentials)
    if not _http_url(config.fcm_url):
        raise ConfigError(f"fcm-url: {config.fcm_url[:80]!r} is not an http:// or https:// URL")
    agent, pool = http_agent(reactor, config)
    return FcmGateway(reactor, agent, account, url=config.fcm_url,
                      concurrency=config.gateway_concurrency, timeout=config.gateway_timeout, pool=pool)
