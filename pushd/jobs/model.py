"""What a push job is, as pure values: its validated spec, its states, and its progress as numbers.

Both ways of creating a job (`pushctl job create`, `POST /api/jobs`) build a `JobSpec` through `parse_spec`,
so they accept the same fields with the same one-line errors. Nothing here touches Redis or a reactor.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

#: Gateways a job may name; each is a module of pushd/gateways/.
GATEWAYS = ("webhook", "fcm", "webpush", "apns", "pushd")
#: Gateways `pushd` may hand offline recipients to.
FALLBACKS = ("fcm", "webpush", "apns", "webhook")

SCHEDULED = "scheduled"
TESTING = "testing"
AWAITING_CONFIRMATION = "awaiting_confirmation"
RUNNING = "running"
PAUSED = "paused"
DONE = "done"
CANCELLED = "cancelled"
#: States a job never leaves.
FINAL = (DONE, CANCELLED)

MAX_TEXT = 4096
MAX_DATA_FIELDS = 100
MAX_BATCH = 10000
DEFAULT_BATCH = 500
DEFAULT_RETRIES = 5
DEFAULT_TTL = 86400
#: Seconds a --key names its first job (the same key later makes a new job).
KEY_WINDOW = 86400
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|second|m|min|minute|h|hour))?\s*")
_KEY = re.compile(r"[\x21-\x7e]{1,200}")


class JobError(ValueError):
    """A bad job field; the message starts with the field's name."""


@dataclass(frozen=True)
class JobSpec:
    gateway: str
    title: str
    body: str
    audience: str = ""
    data: Mapping[str, str] = field(default_factory=dict)
    batch: int = DEFAULT_BATCH
    #: Recipients per second across every worker, or 0 for as fast as the gateway takes them.
    rate: float = 0.0
    test_to: str = ""
    #: Unix time the job starts at; 0 for now.
    start_at: float = 0.0
    key: str = ""
    fallback: str = ""
    ttl: int = DEFAULT_TTL
    retries: int = DEFAULT_RETRIES
    #: The audience was made for this job alone (--recipients) and is deleted when it ends.
    private: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"data": dict(self.data)}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        return cls(**json.loads(text))


def parse_rate(text: str | float) -> float:
    """'2000/s', '100/min', '3600/h' or a bare number (per second) -> recipients per second."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), "s"
    else:
        m = _RATE.fullmatch(str(text))
        if not m:
            raise JobError(f"rate: {str(text)[:40]!r} is not N/s, N/min or N/h")
        value, unit = float(m.group(1)), (m.group(2) or "s")[0]
    per_second = value / {"s": 1, "m": 60, "h": 3600}[unit]
    if per_second <= 0:
        raise JobError("rate: must be more than 0")
    return per_second


def parse_start_at(text: str | float, now: float) -> float:
    """ISO 8601 (a time without zone is UTC), unix seconds, or +N s/m/h from now."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    value = str(text).strip()
    m = re.fullmatch(r"\+(\d+)([smh]?)", value)
    if m:
        return now + int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise JobError(f"start_at: {value[:40]!r} is not an ISO 8601 time, unix seconds or +N[s|m|h]") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _text(fields: Mapping[str, Any], name: str, required: bool = False) -> str:
    value = fields.get(name, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise JobError(f"{name}: must be a string")
    if required and not value:
        raise JobError(f"{name}: required")
    if len(value.encode("utf-8")) > MAX_TEXT:
        raise JobError(f"{name}: longer than {MAX_TEXT} bytes")
    return value


def _whole(fields: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = fields.get(name, default)
    if value is None:
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise JobError(f"{name}: must be a whole number from {low} to {high}")
    return value


def parse_data(value: Any) -> dict[str, str]:
    """A flat object of strings (FCM's data must be string to string, so every gateway gets the same)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise JobError("data: must be an object of strings")
    if len(value) > MAX_DATA_FIELDS:
        raise JobError(f"data: more than {MAX_DATA_FIELDS} fields")
    for k, v in value.items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise JobError(f"data: {str(k)[:40]!r} must map a name to a string")
    return dict(value)


def parse_spec(fields: Mapping[str, Any], now: float | None = None, *, own_audience: bool = False) -> JobSpec:
    """A JobSpec from API JSON or CLI options; raises JobError naming the first bad field.

    `own_audience`: the audience was made for this job (deleted when it ends); never something a caller says.
    """
    known = {"gateway", "title", "body", "audience", "data", "batch", "rate", "test_to", "start_at", "key",
             "fallback", "ttl", "retries"}
    for name in fields:
        if name not in known:
            raise JobError(f"{str(name)[:40]}: unknown field (expected {', '.join(sorted(known))})")
    now = time.time() if now is None else now
    gateway = _text(fields, "gateway", required=True)
    if gateway not in GATEWAYS:
        raise JobError(f"gateway: {gateway[:40]!r} is not one of {', '.join(GATEWAYS)}")
    fallback = _text(fields, "fallback")
    if fallback and gateway != "pushd":
        raise JobError("fallback: only the pushd gateway has a fallback")
    if fallback and fallback not in FALLBACKS:
        raise JobError(f"fallback: {fallback[:40]!r} is not one of {', '.join(FALLBACKS)}")
    audience = _text(fields, "audience", required=True)
    key = _text(fields, "key")
    if key and not _KEY.fullmatch(key):
        raise JobError("key: 1 to 200 printable ASCII characters, no spaces")
    rate = fields.get("rate")
    start_at = fields.get("start_at")
    return JobSpec(
        gateway=gateway, fallback=fallback, audience=audience, key=key,
        title=_text(fields, "title", required=True), body=_text(fields, "body"),
        data=parse_data(fields.get("data")),
        batch=_whole(fields, "batch", DEFAULT_BATCH, 1, MAX_BATCH),
        rate=parse_rate(rate) if rate not in (None, "", 0) else 0.0,
        test_to=_text(fields, "test_to"),
        start_at=parse_start_at(start_at, now) if start_at not in (None, "", 0) else 0.0,
        ttl=_whole(fields, "ttl", DEFAULT_TTL, 0, 28 * 86400),
        retries=_whole(fields, "retries", DEFAULT_RETRIES, 0, 50),
        private=own_audience,
    )


def new_job_id(now: float | None = None) -> str:
    """Sortable by creation time (base 36 milliseconds), unique by 40 random bits."""
    ms = int((time.time() if now is None else now) * 1000)
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    stamp = ""
    while ms:
        ms, r = divmod(ms, 36)
        stamp = digits[r] + stamp
    return f"j{stamp:0>9}{os.urandom(5).hex()}"


def first_state(spec: JobSpec, now: float) -> str:
    if spec.test_to:
        return TESTING
    return SCHEDULED if spec.start_at > now else RUNNING


def after_confirmation(spec: JobSpec, now: float) -> str:
    return SCHEDULED if spec.start_at > now else RUNNING


#: Counters of the job hash shown as numbers.
COUNTERS = ("total", "sent", "failed", "invalid", "removed", "retrying", "retried", "redelivered", "duplicates",
            "cancelled")


def progress(raw: Mapping[str, str]) -> dict[str, Any]:
    """The job hash as the JSON `GET /api/jobs/ID` and `pushctl job show` give."""
    spec = JobSpec.from_json(raw["spec"])
    counts = {name: int(raw.get(name, "0") or 0) for name in COUNTERS}
    done = counts["sent"] + counts["failed"] + counts["invalid"] + counts["cancelled"]
    expanded = raw.get("expanded") == "1"
    errors = {k[2:]: int(v) for k, v in raw.items() if k.startswith("e:")}
    via = {k[2:]: int(v) for k, v in raw.items() if k.startswith("v:")}
    created, started, finished = (float(raw[k]) if raw.get(k) else None for k in ("created", "started", "finished"))
    report: dict[str, Any] = {
        "id": raw["id"], "state": raw["state"], "gateway": spec.gateway, "audience": spec.audience,
        "spec": json.loads(spec.to_json()),
        **counts,
        "remaining": max(counts["total"] - done, 0) if expanded else None,
        "expanded": expanded,
        "errors": errors,
        "sent_via": via,
        "created": created, "started": started, "finished": finished,
        "duration": (finished or time.time()) - started if started else None,
    }
    if raw.get("test"):
        report["test"] = json.loads(raw["test"])
    return report
