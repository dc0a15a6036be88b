"""The one small interface every gateway implements, and what the job worker and gateways share.

A job worker hands a gateway a `Message` and a batch of `Target`s; the gateway sends them however its provider
wants (one request for the batch, or one per target with bounded concurrency) and classifies each target's
result as one `Outcome`. The worker alone decides what follows: retry with backoff, slow down, remove an address,
record a failure. A gateway never raises for one target's problem, and a whole-batch failure (connection
refused, timeout) is a `RETRY` for each target, so a gateway never loses or double-counts a recipient.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import string
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple, Protocol

from twisted.internet import defer

from pushd.config import ConfigError


class Outcome(enum.Enum):
    #: The provider took it.
    SENT = "sent"
    #: Transient (timeout, 5xx, 429): sent again later, with backoff, up to the job's retry limit.
    RETRY = "retry"
    #: Permanent, and the address is dead (FCM UNREGISTERED, Web Push 404/410, APNs 410): removed from the audience.
    INVALID = "invalid"
    #: Permanent for this message (payload too large, bad request, auth refused): recorded once, never retried.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    #: Short machine-readable reason, counted per gateway in the job's report ("UNREGISTERED", "http-503", "timeout").
    reason: str = ""
    #: Back-pressure: seconds the provider asked us to wait (Retry-After). A RETRY with this set slows the whole
    #: job on this gateway instead of counting against the target's retry limit.
    retry_after: float | None = None


SENT = Result(Outcome.SENT)
#: FAILED reasons that are the gateway's fault, not the recipient's: the worker pauses the job and keeps the
#: recipients for after the fix. AUTH: the provider refused pushd's credentials. MISCONFIGURED: the answers
#: show a setting is wrong (every token of a batch refused for the wrong environment or topic).
AUTH = "auth"
MISCONFIGURED = "misconfigured"
PAUSING = frozenset({AUTH, MISCONFIGURED})
#: A batch this big whose every answer names one of a gateway's `wrong_settings` reasons is MISCONFIGURED.
MISCONFIGURED_AT = 10


def misconfigured(results: Sequence[Result], wrong_settings: frozenset[str]) -> Sequence[Result]:
    """A whole batch of "not for this sender" answers is the gateway's settings, not the audience.

    APNs sandbox tokens sent to production (or a wrong topic), FCM tokens of another Firebase project: every token
    answers as if dead, and taken for dead they would empty the audience in one run. Real dead tokens come
    scattered. So such a batch is MISCONFIGURED, which pauses the job and removes nothing.
    """
    if len(results) >= MISCONFIGURED_AT and all(
            r.outcome is Outcome.INVALID and r.reason in wrong_settings for r in results):
        return [Result(Outcome.FAILED, MISCONFIGURED)] * len(results)
    return results


@dataclass(frozen=True, slots=True)
class Message:
    """What a job sends, before per-recipient templating."""

    job_id: str
    title: str
    body: str
    data: Mapping[str, str] = field(default_factory=dict)
    #: Seconds a provider may keep the message for an offline device (FCM/APNs/Web Push TTL).
    ttl: int = 86400
    #: The pushd gateway only: the gateway that takes the recipients with no live connection ("" = none).
    fallback: str = ""


class Target(NamedTuple):
    """One recipient of one job (a tuple: a worker makes one per recipient, millions per job)."""

    #: The gateway address: a device token, a phone number, a Web Push subscription (canonical JSON), a user id.
    address: str
    #: The recipient's own fields from the audience, for templating ($name in title/body/data values).
    fields: Mapping[str, Any]
    #: Stable across retries and workers: pass it to providers that deduplicate (webhook, APNs apns-id...).
    key: str


@dataclass(frozen=True, slots=True)
class Rendered:
    title: str
    body: str
    data: Mapping[str, str]


def idempotency_key(job_id: str, address: str) -> str:
    """Job id + recipient, fixed-length whatever the address (Web Push subscriptions are long)."""
    return f"{job_id}-{hashlib.sha256(address.encode('utf-8')).hexdigest()[:24]}"


def render(message: Message, target: Target) -> Rendered:
    """`$field` / `${field}` in the title, body and data values replaced by the recipient's fields.

    string.Template, not str.format: a template can only name fields, never reach attributes or indexes, and a
    field the recipient lacks stays as written instead of failing the recipient.
    """
    if not target.fields:
        return Rendered(message.title, message.body, message.data)
    values = {k: str(v) for k, v in target.fields.items()}

    def fill(text: str) -> str:
        return _template(text).safe_substitute(values) if "$" in text else text

    return Rendered(fill(message.title), fill(message.body), {k: fill(v) for k, v in message.data.items()})


@functools.lru_cache(maxsize=256)
def _template(text: str) -> string.Template:
    return string.Template(text)


class Gateway(Protocol):
    """A third-party service that delivers messages to addresses."""

    #: The name jobs use (`--gateway NAME`) and the report's per-gateway counts are keyed by.
    name: str

    def send(self, message: Message, targets: Sequence[Target]) -> defer.Deferred[Sequence[Result]]:
        """Send `message` to every target; fires with one Result per target, in order. Never errbacks."""
        raise NotImplementedError

    def close(self) -> defer.Deferred[None]:
        """Drop kept-alive connections and stop timers (worker shutdown)."""
        raise NotImplementedError


def parse_retry_after(value: bytes | str | None, default: float = 1.0, limit: float = 3600.0) -> float:
    """A Retry-After header's seconds (delta-seconds or an HTTP date), clamped to [0, limit]; `default` if unreadable."""
    if value is None:
        return default
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(text).timestamp() - time.time()
        except (TypeError, ValueError):
            return default
    return min(max(seconds, 0.0), limit)


def read_setting_file(setting: str, path: str) -> bytes:
    """The bytes of the file a setting names, or a ConfigError naming the setting, the file and why."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None
