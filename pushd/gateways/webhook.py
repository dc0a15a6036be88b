"""The `webhook` gateway: each batch as one signed JSON POST to a URL, the generic way to plug in any SMS or push
provider (a small receiver translates it into the provider's API).

Request: `{"job": ID, "messages": [{"key", "address", "title", "body", "data"}, ...]}` with
`X-Pushd-Timestamp: <unix seconds>` and `X-Pushd-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." +
body)>`, the scheme Stripe and Slack use: the receiver recomputes the HMAC over the exact bytes and refuses a
timestamp older than its replay window (5 minutes is usual). `key` is the recipient's idempotency key, the same
on every attempt, so a receiver can drop what it has already sent.

Reply: 2xx with `{"results": [{"key", "status": "sent"|"retry"|"invalid"|"failed", "reason"}]}` classifies
recipients one by one (a key not listed, or a 2xx without results, is sent); 429/503 with Retry-After hold the
gateway; other 5xx, timeouts and connection errors are retried; 401/403 are failures "auth", 413 "too-large",
other 4xx `http-<status>` (docs/jobs.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import treq
from twisted.internet import defer
from twisted.web.client import Agent, HTTPConnectionPool

from pushd.config import Config, ConfigError
from pushd.gateways.base import SENT, Message, Outcome, Result, Target, parse_retry_after, render
from pushd.tasks import TaskRunner

STATUS = {"sent": Outcome.SENT, "retry": Outcome.RETRY, "invalid": Outcome.INVALID, "failed": Outcome.FAILED}


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def batch_body(message: Message, targets: Sequence[Target]) -> bytes:
    messages = []
    for target in targets:
        r = render(message, target)
        messages.append({"key": target.key, "address": target.address, "title": r.title, "body": r.body,
                         "data": dict(r.data)})
    return json.dumps({"job": message.job_id, "messages": messages}, separators=(",", ":"),
                      ensure_ascii=False).encode()


def classify(status: int, headers: Any, body: bytes, targets: Sequence[Target]) -> list[Result]:
    """One Result per target from the receiver's answer."""
    n = len(targets)
    if 200 <= status < 300:
        try:
            listed = json.loads(body).get("results") if body.strip() else None
        except (ValueError, AttributeError):
            listed = None
        if not isinstance(listed, list):
            return [SENT] * n
        by_key: dict[str, Result] = {}
        for item in listed:
            if isinstance(item, dict) and item.get("status") in STATUS and isinstance(item.get("key"), str):
                outcome = STATUS[item["status"]]
                by_key[item["key"]] = Result(outcome, str(item.get("reason") or "")[:64]) \
                    if outcome is not Outcome.SENT else SENT
        return [by_key.get(t.key, SENT) for t in targets]
    if status in (429, 503):
        retry_after = headers.getRawHeaders(b"retry-after", [None])[0] if headers is not None else None
        return [Result(Outcome.RETRY, f"http-{status}", parse_retry_after(retry_after))] * n
    if status >= 500:
        return [Result(Outcome.RETRY, f"http-{status}")] * n
    if status in (401, 403):
        return [Result(Outcome.FAILED, "auth")] * n
    if status == 413:
        return [Result(Outcome.FAILED, "too-large")] * n
    return [Result(Outcome.FAILED, f"http-{status}")] * n


def failure_reason(e: BaseException) -> str:
    name = type(e).__name__
    if "Timeout" in name or isinstance(e, (defer.CancelledError, defer.TimeoutError)):
        return "timeout"
    if "Refused" in name or "DNS" in name or "NoRoute" in name:
        return "connect"
    return "connection"


class WebhookGateway:
    name = "webhook"

    def __init__(self, reactor: Any, url: str, secret: str, *, http: Any, timeout: float,
                 concurrency: int, clock: Callable[[], float] = time.time) -> None:
        """`http`: a treq HTTPClient (tests give treq.testing.StubTreq)."""
        self._reactor = reactor
        self._url = url
        self._secret = secret.encode()
        self._http = http
        self._timeout = timeout
        self._limit = defer.DeferredSemaphore(concurrency)
        self._clock = clock
        self._pool: HTTPConnectionPool | None = None

    def send(self, message: Message, targets: Sequence[Target]) -> defer.Deferred[Sequence[Result]]:
        return self._limit.run(lambda: defer.ensureDeferred(self._post(message, targets)))

    async def _post(self, message: Message, targets: Sequence[Target]) -> Sequence[Result]:
        body = batch_body(message, targets)
        timestamp = str(int(self._clock()))
        headers = {"Content-Type": ["application/json"], "X-Pushd-Timestamp": [timestamp],
                   "X-Pushd-Signature": [sign(self._secret, timestamp, body)], "User-Agent": ["pushd"]}
        exchange = defer.ensureDeferred(self._exchange(body, headers))
        exchange.addTimeout(self._timeout, self._reactor)
        try:
            code, response_headers, content = await exchange
        except Exception as e:
            return [Result(Outcome.RETRY, failure_reason(e))] * len(targets)
        return classify(code, response_headers, content, targets)

    async def _exchange(self, body: bytes, headers: dict[str, list[str]]) -> tuple[int, Any, bytes]:
        response = await self._http.post(self._url, data=body, headers=headers)
        return response.code, response.headers, await treq.content(response)

    def close(self) -> defer.Deferred[None]:
        if self._pool is not None:
            closed: defer.Deferred[None] = self._pool.closeCachedConnections()
            return closed
        return defer.succeed(None)


def http_agent(reactor: Any, config: Config) -> tuple[Agent, HTTPConnectionPool]:
    """An Agent with a keep-alive pool of `gateway-concurrency` connections per host; `gateway-ca` trusted alone
    when set."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = config.gateway_concurrency
    pool.retryAutomatically = False  # a POST sent twice is a duplicate; the worker decides about retries
    if config.gateway_ca:
        from twisted.internet import ssl
        from twisted.web.client import BrowserLikePolicyForHTTPS

        try:
            with open(config.gateway_ca, "rb") as f:
                authority = ssl.Certificate.loadPEM(f.read())
        except (OSError, ValueError) as e:
            raise ConfigError(f"gateway-ca: cannot read {config.gateway_ca!r}: {e}") from None
        return Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=authority), pool=pool), pool
    return Agent(reactor, pool=pool), pool


def build(reactor: Any, config: Config, tasks: TaskRunner) -> WebhookGateway:
    url = config.webhook_url
    if not url.startswith(("https://", "http://")):
        raise ConfigError(f"webhook-url: {url[:80]!r} is not an http:// or https:// URL")
    if not config.webhook_secret:
        raise ConfigError("webhook-secret: required with webhook-url (the receiver checks the signature with it)")
    agent, pool = http_agent(reactor, config)
    gateway = WebhookGateway(reactor, url, config.webhook_secret, http=treq.client.HTTPClient(agent),  # type: ignore[arg-type]
                             timeout=config.gateway_timeout,
                             concurrency=config.gateway_concurrency)
    gateway._pool = pool
    return gateway
