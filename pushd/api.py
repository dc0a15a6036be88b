"""The HTTP API: publish, broadcast, inspect and disconnect with JSON over HTTP, in front of an `ApiBackend`.

Only the web layer lives here (routing, bearer keys, body limits, validation, JSON replies); what a request does
to the cluster is the backend's job, so every rule of this module is tested against a fake backend.
"""

from __future__ import annotations

import hmac
import io
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import unquote_to_bytes

import txredisapi
from twisted.internet import error
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from pushd import api_centrifugo, protocol
from pushd.jobs.audience import Recipient, Rejected, recipient_of
from pushd.jobs.model import JobError, parse_spec
from pushd.jobs.store import JobConflict, JobNotFound, JobStore
from pushd.origins import EMPTY, OriginPolicy
from pushd.recovery import Position

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


class ApiBackend(Protocol):
    """What the API asks of the cluster (`pushd.cluster.Cluster` in a node; a fake in the tests)."""

    def publish(self, messages: Sequence[tuple[str, bytes]]) -> Deferred[list[Position | None]]:
        """Publish (topic, compact JSON payload) pairs; a position each, None for a topic without history."""

    def publish_to_user(self, user: str, payload: bytes) -> Deferred[int]:
        """Send to every connection of `user`; the number of nodes that received it."""

    def broadcast(self, payload: bytes, key: str | None) -> Deferred[tuple[str, bool]]:
        """(broadcast id, created); not created when `key` was seen within the window (the first id then)."""

    def broadcast_status(self, broadcast_id: str) -> Deferred[dict[str, Any] | None]:
        """A JSON-ready report of a broadcast, or None for an unknown id."""

    def topics(self) -> Deferred[dict[str, int]]:
        """topic -> subscribers, cluster-wide."""

    def topic(self, topic: str) -> Deferred[dict[str, int]]:
        """node id -> subscribers of `topic`."""

    def nodes(self) -> Deferred[list[dict[str, Any]]]:
        """Every node's record."""

    def disconnect_connection(self, conn_id: str, code: int, reason: str) -> Deferred[bool]:
        """Close one connection; False when there is no such connection."""

    def disconnect_user(self, user: str, code: int, reason: str) -> Deferred[int]:
        """Close every connection of `user`; the number of nodes told."""

    #: Push jobs (pushd/jobs/store.py).
    jobs: JobStore


_T = TypeVar("_T")

MAX_ID_LENGTH = 128
MAX_KEY_LENGTH = 200
MAX_REASON_BYTES = 120
DEFAULT_CLOSE_CODE = 4000
DEFAULT_REASON = "disconnected by the server API"
#: Close codes the API may send: the range RFC 6455 leaves to applications.
CLOSE_CODES = range(4000, 5000)
#: Seconds an HTTP connection may stay silent before the API closes it.
IDLE_TIMEOUT = 60
#: What a browser may send cross-site once api-cors-origins allows its page, and how long it may remember that.
CORS_ALLOW_HEADERS = "Authorization, Content-Type"
CORS_MAX_AGE = 600

_log = Logger()


class ErrorCode:
    """The `code` values of error replies (docs/openapi.json lists them in the Error schema)."""

    BAD_REQUEST = "bad_request"
    INVALID_TOPIC = "invalid_topic"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"
    INTERNAL_ERROR = "internal_error"

    ALL = (BAD_REQUEST, INVALID_TOPIC, UNAUTHORIZED, FORBIDDEN, NOT_FOUND, METHOD_NOT_ALLOWED, CONFLICT,
           PAYLOAD_TOO_LARGE, UNSUPPORTED_MEDIA_TYPE, UNAVAILABLE, INTERNAL_ERROR)


class ApiError(Exception):
    """A request the API refuses: becomes the reply `{"error": {"code", "message"}}` with `status`."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def _bad(message: str) -> ApiError:
    return ApiError(400, ErrorCode.BAD_REQUEST, message)


#: A handler's answer: the status and the JSON-ready body.
Reply = tuple[int, Any]


@dataclass(frozen=True, slots=True)
class Call:
    """What a handler is given: the backend and limits, decoded path parameters, the query and the JSON body."""

    backend: ApiBackend
    limits: protocol.Limits
    max_batch: int
    params: Mapping[str, str]
    query: Mapping[bytes, Sequence[bytes]]
    body: dict[str, Any]
    health: BackendHealth


Handler = Callable[[Call], "Reply | Deferred[Reply]"]


@dataclass(frozen=True, slots=True)
class Route:
    """One operation: `path` is the OpenAPI path template, `pattern` the regex the dispatcher matches it with."""

    method: str
    path: str
    name: str
    handler: Handler
    summary: str
    auth: bool = True
    #: A POST whose body may be empty (an action on a thing named by the path); it still needs the JSON type.
    body: bool = True
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", _path_pattern(self.path))

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(self.pattern.groupindex)


#: Path parameters that may span segments: topic names may contain '/'.
_MULTI_SEGMENT_PARAMS = frozenset({"topic"})


def _path_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_param_regex(part)})"
                    for i, part in enumerate(parts))
    return re.compile(regex)


def _param_regex(name: str) -> str:
    # Empty segments match, so that an empty id is refused with a message rather than a 404.
    return ".*" if name in _MULTI_SEGMENT_PARAMS else "[^/]*"


# Handlers. Each validates what it was given (raising ApiError naming the field) before it asks the backend.


def _publish(call: Call) -> Deferred[Reply]:
    body = call.body
    if "messages" in body:
        _only_fields(body, ("messages",), "", "give either messages, or topic and data")
        items = body["messages"]
        if not isinstance(items, list):
            raise _bad("messages: must be a list of {topic, data} objects")
        if not items:
            raise _bad("messages: must not be empty")
        if len(items) > call.max_batch:
            raise _bad(f"messages: {len(items)} messages; at most {call.max_batch} per request")
        messages = [_message(item, f"messages[{i}].", call.limits) for i, item in enumerate(items)]
    else:
        _only_fields(body, ("topic", "data"), "", "expected topic and data, or messages")
        messages = [_message(body, "", call.limits)]

    def reply(positions: list[Position | None]) -> Reply:
        results = [_position(topic, position) for (topic, _), position in zip(messages, positions, strict=True)]
        return 200, ({"results": results} if "messages" in body else results[0])

    return _ask(call, "publish", call.backend.publish, messages).addCallback(reply)


def _publish_to_user(call: Call) -> Deferred[Reply]:
    user = _identifier(call.params, "user")
    _only_fields(call.body, ("data",), "", "expected data")
    payload = _payload(call.body, "")
    return _ask(call, "publish_to_user", call.backend.publish_to_user, user, payload).addCallback(
        lambda nodes: (200, {"user": user, "nodes": nodes}))


#: Recipients a job may bring in its request (more: import an audience first).
MAX_INLINE_RECIPIENTS = 10000
JOB_ACTIONS = ("confirm", "pause", "resume", "cancel")
MAX_FAILURES_PAGE = 10000


def _ask_jobs(call: Call, what: str, method: Callable[..., Deferred[_T]], *args: Any) -> Deferred[_T]:
    """As `_ask`, with the jobs' own refusals as 400, 404 and 409."""

    def refused(failure: Failure) -> Failure:
        if failure.check(JobError):
            return Failure(_bad(str(failure.value)))
        if failure.check(JobNotFound):
            return Failure(ApiError(404, ErrorCode.NOT_FOUND, f"no job {str(failure.value)[:128]!r}"))
        if failure.check(JobConflict):
            return Failure(ApiError(409, ErrorCode.CONFLICT, str(failure.value)))
        return call.health.failed(failure, what)

    return maybeDeferred(method, *args).addCallbacks(call.health.answered, refused)


def _inline_recipients(items: Any) -> list[Recipient]:
    if not isinstance(items, list) or not items:
        raise _bad("recipients: must be a non-empty list of addresses or {address, ...fields} objects")
    if len(items) > MAX_INLINE_RECIPIENTS:
        raise _bad(f"recipients: {len(items)} recipients; at most {MAX_INLINE_RECIPIENTS} in a request (import an "
                   "audience for more)")
    rows: list[Recipient] = []
    for i, item in enumerate(items):
        row = {"address": item} if isinstance(item, str) else item
        if not isinstance(row, dict):
            raise _bad(f"recipients[{i}]: must be an address or an object with an address")
        recipient = recipient_of(i, row)
        if isinstance(recipient, Rejected):
            raise _bad(f"recipients[{i}]: {recipient.reason}")
        rows.append(recipient)
    return rows


def _create_job(call: Call) -> Deferred[Reply]:
    fields = dict(call.body)
    rows = _inline_recipients(fields.pop("recipients")) if "recipients" in fields else None
    if rows is not None and "audience" in fields:
        raise _bad("recipients: give recipients or audience, not both")
    try:
        # Checked before anything is written; inline recipients get an audience of the job's own.
        parse_spec({**fields, "audience": "-"} if rows is not None else fields)
    except JobError as e:
        raise _bad(str(e)) from None
    store = call.backend.jobs

    def reply(created: tuple[str, bool, str]) -> Reply:
        job_id, new, state = created
        return (201 if new else 200), {"id": job_id, "state": state, "duplicate": not new}

    return _ask_jobs(call, "create_job", store.submit, fields, rows).addCallback(reply)


def _list_jobs(call: Call) -> Deferred[Reply]:
    limit = _query_count(call.query, "limit", 50, 500)
    return _ask_jobs(call, "list_jobs", call.backend.jobs.list, limit).addCallback(lambda jobs: (200, {"jobs": jobs}))


def _job(call: Call) -> Deferred[Reply]:
    job_id = _identifier(call.params, "job")
    return _ask_jobs(call, "job", call.backend.jobs.show, job_id).addCallback(lambda report: (200, report))


def _job_action(call: Call) -> Deferred[Reply]:
    job_id = _identifier(call.params, "job")
    action = _decoded(call.params, "action")
    if action not in JOB_ACTIONS:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no job action {action[:32]!r} ({', '.join(JOB_ACTIONS)})")
    return _ask_jobs(call, f"{action}_job", call.backend.jobs.transition, job_id, action).addCallback(
        lambda state: (200, {"id": job_id, "state": state}))


def _job_failures(call: Call) -> Deferred[Reply]:
    job_id = _identifier(call.params, "job")
    start = _query_count(call.query, "start", 0, 2**40, low=0)
    count = _query_count(call.query, "count", 1000, MAX_FAILURES_PAGE)

    def reply(rows: list[dict[str, Any]]) -> Reply:
        return 200, {"failures": rows, "next": start + len(rows) if len(rows) == count else None}

    return _ask_jobs(call, "job_failures", call.backend.jobs.failures, job_id, start, count).addCallback(reply)


def _query_count(query: Mapping[bytes, Sequence[bytes]], name: str, default: int, high: int, low: int = 1) -> int:
    raw = _query_value(query, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad(f"{name}: {raw[:20]!r} is not a whole number") from None
    if not low <= value <= high:
        raise _bad(f"{name}: must be from {low} to {high}")
    return value


def _broadcast(call: Call) -> Deferred[Reply]:
    _only_fields(call.body, ("data", "key"), "", "expected data and an optional key")
    payload = _payload(call.body, "")
    key = call.body.get("key")
    if key is not None and (not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH
                            or not _is_utf8(key)):
        raise _bad(f"key: must be a non-empty string of at most {MAX_KEY_LENGTH} characters, or null")

    def reply(result: tuple[str, bool]) -> Reply:
        broadcast_id, created = result
        return (202, {"id": broadcast_id, "duplicate": False}) if created else \
            (200, {"id": broadcast_id, "duplicate": True})

    return _ask(call, "broadcast", call.backend.broadcast, payload, key).addCallback(reply)


def _broadcast_status(call: Call) -> Deferred[Reply]:
    broadcast_id = _identifier(call.params, "id")

    def reply(status: dict[str, Any] | None) -> Reply:
        if status is None:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no broadcast {broadcast_id!r}")
        return 200, status

    return _ask(call, "broadcast_status", call.backend.broadcast_status, broadcast_id).addCallback(reply)


def _topics(call: Call) -> Deferred[Reply]:
    return _ask(call, "topics", call.backend.topics).addCallback(lambda topics: (200, {"topics": topics}))


def _topic(call: Call) -> Deferred[Reply]:
    topic = _decoded(call.params, "topic")
    problem = protocol.topic_error(topic, call.limits)
    if problem is not None:
        raise ApiError(400, ErrorCode.INVALID_TOPIC, f"topic: {problem}")
    return _ask(call, "topic", call.backend.topic, topic).addCallback(
        lambda nodes: (200, {"topic": topic, "nodes": nodes, "subscribers": sum(nodes.values())}))


def _nodes(call: Call) -> Deferred[Reply]:
    return _ask(call, "nodes", call.backend.nodes).addCallback(lambda nodes: (200, {"nodes": nodes}))


def _disconnect_connection(call: Call) -> Deferred[Reply]:
    conn_id = _identifier(call.params, "conn_id")
    code, reason = _close_code(call.query), _close_reason(call.query)

    def reply(found: bool) -> Reply:
        if not found:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no connection {conn_id!r} on any node")
        return 200, {"disconnected": True}

    return _ask(call, "disconnect_connection", call.backend.disconnect_connection, conn_id, code, reason).addCallback(reply)


def _disconnect_user(call: Call) -> Deferred[Reply]:
    user = _identifier(call.params, "user")
    code, reason = _close_code(call.query), _close_reason(call.query)
    return _ask(call, "disconnect_user", call.backend.disconnect_user, user, code, reason).addCallback(
        lambda nodes: (200, {"user": user, "nodes": nodes}))


def _centrifugo(call: Call) -> Deferred[Reply]:
    method = _identifier(call.params, "method")

    def refused(failure: Failure) -> Reply:
        failure.trap(api_centrifugo.CentrifugoError)
        refusal: api_centrifugo.CentrifugoError = failure.value  # type: ignore[assignment]
        return 200, refusal.reply()

    return maybeDeferred(api_centrifugo.call, method, call.body, call.backend, call.limits).addCallbacks(
        lambda reply: (200, reply), refused).addCallbacks(call.health.answered, call.health.failed,
                                                          errbackArgs=(f"centrifugo {method}",))


def _openapi_document(call: Call) -> Reply:
    # Imported here because pushd.openapi builds its document from ROUTES, defined below.
    from pushd.openapi import document

    return 200, document()


ROUTES: tuple[Route, ...] = (
    Route("POST", "/api/publish", "publish", _publish,
          "Publish one message to a topic, or a batch of messages"),
    Route("POST", "/api/users/{user}/publish", "publishToUser", _publish_to_user,
          "Send a message to every connection of one user, on every node"),
    Route("POST", "/api/broadcast", "broadcast", _broadcast,
          "Send a message to every connection on every node, at most once per key within the dedup window"),
    Route("GET", "/api/broadcasts/{id}", "broadcastStatus", _broadcast_status,
          "The delivery status of a broadcast"),
    Route("GET", "/api/topics", "topics", _topics, "Every topic with subscribers, and how many, cluster-wide"),
    Route("GET", "/api/topics/{topic}", "topic", _topic, "The subscribers of one topic, node by node"),
    Route("GET", "/api/nodes", "nodes", _nodes, "The nodes of the cluster"),
    Route("DELETE", "/api/connections/{conn_id}", "disconnectConnection", _disconnect_connection,
          "Close one connection, wherever it is"),
    Route("DELETE", "/api/users/{user}/connections", "disconnectUser", _disconnect_user,
          "Close every connection of one user, on every node"),
    Route("POST", "/api/centrifugo/{method}", "centrifugo", _centrifugo,
          "Centrifugo's server API (publish, broadcast, disconnect, channels), for clients written for Centrifugo"),
    Route("POST", "/api/jobs", "createJob", _create_job,
          "Create a push job: one message to an audience (or to the recipients given) through a gateway"),
    Route("GET", "/api/jobs", "listJobs", _list_jobs, "The newest push jobs and their progress"),
    Route("GET", "/api/jobs/{job}", "job", _job, "One push job's progress and report"),
    Route("GET", "/api/jobs/{job}/failures", "jobFailures", _job_failures,
          "The permanent failures of a push job, a page at a time"),
    Route("POST", "/api/jobs/{job}/{action}", "jobAction", _job_action,
          "Confirm (after its test message), pause, resume or cancel a push job", body=False),
    Route("GET", "/api/openapi.json", "openapi", _openapi_document,
          "This API's OpenAPI document (no key needed)", auth=False),
)


# Validation, pure functions of the parsed request.


def _only_fields(obj: Mapping[str, Any], allowed: tuple[str, ...], prefix: str, expected: str) -> None:
    for name in obj:
        if name not in allowed:
            raise _bad(f"{prefix}{name[:64]}: unknown field ({expected})")


def _message(item: object, prefix: str, limits: protocol.Limits) -> tuple[str, bytes]:
    if not isinstance(item, dict):
        raise _bad(f"{prefix.rstrip('.')}: must be an object with topic and data")
    if prefix:
        _only_fields(item, ("topic", "data"), prefix, "expected topic and data")
    if "topic" not in item:
        raise _bad(f"{prefix}topic: required")
    topic = item["topic"]
    problem = protocol.topic_error(topic, limits)
    if problem is not None:
        raise ApiError(400, ErrorCode.INVALID_TOPIC, f"{prefix}topic: {problem}")
    return topic, _payload(item, prefix)


def _payload(obj: Mapping[str, Any], prefix: str) -> bytes:
    """The compact JSON text of `data`, the bytes subscribers receive."""
    if "data" not in obj:
        raise _bad(f"{prefix}data: required (null is a value, but the key must be present)")
    try:
        return json.dumps(obj["data"], separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise _bad(f"{prefix}data: contains a lone UTF-16 surrogate (\\ud800-\\udfff), not valid UTF-8") from None
    except RecursionError:
        raise _bad(f"{prefix}data: nested too deeply") from None


def _position(topic: str, position: Position | None) -> dict[str, Any]:
    if position is None:
        return {"topic": topic, "offset": None, "epoch": None}
    return {"topic": topic, "offset": position.offset, "epoch": position.epoch}


def _decoded(params: Mapping[str, str], name: str) -> str:
    try:
        return unquote_to_bytes(params[name].encode("latin-1")).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"{name}: is not UTF-8 once percent-decoded") from None


def _identifier(params: Mapping[str, str], name: str) -> str:
    """A user, connection or broadcast id from the path: non-empty, short, no '/' and no control characters."""
    value = _decoded(params, name)
    if not value:
        raise _bad(f"{name}: must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise _bad(f"{name}: longer than {MAX_ID_LENGTH} characters")
    if "/" in value:
        raise _bad(f"{name}: must not contain '/'")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value):
        raise _bad(f"{name}: must not contain control characters")
    return value


def _query_value(query: Mapping[bytes, Sequence[bytes]], name: str) -> bytes | None:
    values = query.get(name.encode(), [])
    if len(values) > 1:
        raise _bad(f"{name}: given {len(values)} times; give it once")
    return values[0] if values else None


def _close_code(query: Mapping[bytes, Sequence[bytes]]) -> int:
    raw = _query_value(query, "code")
    if raw is None:
        return DEFAULT_CLOSE_CODE
    if re.fullmatch(rb"[0-9]{1,5}", raw) is None or int(raw) not in CLOSE_CODES:
        raise _bad(f"code: must be an integer from {CLOSE_CODES.start} to {CLOSE_CODES.stop - 1}")
    return int(raw)


def _close_reason(query: Mapping[bytes, Sequence[bytes]]) -> str:
    raw = _query_value(query, "reason")
    if raw is None:
        return DEFAULT_REASON
    if len(raw) > MAX_REASON_BYTES:
        raise _bad(f"reason: {len(raw)} bytes; at most {MAX_REASON_BYTES} UTF-8 bytes (the close frame's limit)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("reason: is not UTF-8 once percent-decoded") from None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise _bad("the request body is empty; expected a JSON object")
    try:
        parsed = json.loads(body.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise _bad("the request body is not valid JSON: it is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise _bad(f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise _bad(f"the request body is not valid JSON: {exc}"[:200]) from None
    if not isinstance(parsed, dict):
        raise _bad("the request body must be a JSON object")
    return parsed


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    # Python reads 1e999 as infinity, which json.dumps would write back as the non-JSON `Infinity`.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:32]} is out of range")
    return value


def _ask(call: Call, what: str, method: Callable[..., Deferred[_T]], *args: Any) -> Deferred[_T]:
    """Call the backend; a failure (raised or in the Deferred) becomes 503 unavailable."""
    return maybeDeferred(method, *args).addCallbacks(call.health.answered, call.health.failed, errbackArgs=(what,))


class Unavailable(Exception):
    """Raised by a backend that cannot deliver what it would acknowledge now (Redis is out of reach)."""


#: Failures that mean the backend is out of reach, not that pushd is wrong: logged once per outage.
_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, ConnectionError,
                                                   txredisapi.ConnectionError, error.ConnectionDone,
                                                   error.ConnectionLost, txredisapi.ResponseError)


class BackendHealth:
    """Turns backend failures into 503s, logging one line when an outage begins and one when it ends instead of
    a traceback per request; a failure that is not an outage (a bug) is still logged in full."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failing_since: float | None = None
        self.refused = 0

    def answered(self, result: _T) -> _T:
        if self._failing_since is not None:
            _log.info("API: the push cluster answers again after {seconds:.1f} s; {refused} requests got 503",
                      seconds=self._clock() - self._failing_since, refused=self.refused)
            self._failing_since, self.refused = None, 0
        return result

    def failed(self, failure: Failure, what: str) -> Failure:
        self.refused += 1
        if failure.check(Unavailable):
            # The backend knows it cannot deliver now, and has said so in its own log.
            return Failure(ApiError(503, ErrorCode.UNAVAILABLE, str(failure.value), {"Retry-After": "1"}))
        if not failure.check(*_OUTAGE_ERRORS):
            _log.failure("API backend call {what} failed", failure, what=what)
        elif self._failing_since is None:
            self._failing_since = self._clock()
            _log.warn("API: the push cluster cannot take requests ({what}: {error}); answering 503 until it can",
                      what=what.replace("_", " "), error=failure.getErrorMessage())
        return Failure(ApiError(503, ErrorCode.UNAVAILABLE,
                                f"the push cluster did not answer ({what.replace('_', ' ')}); try again",
                                {"Retry-After": "1"}))


# The web layer: one leaf resource that matches ROUTES, checks keys and limits, and writes JSON.


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


def _json(status: int, body: Any, headers: Mapping[str, str] | None = None) -> _Response:
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return _Response(status, text.encode("utf-8", "backslashreplace"), headers or {})


def _error(error: ApiError) -> _Response:
    return _json(error.status, {"error": {"code": error.code, "message": error.message}}, error.headers)


class _BoundedBody(io.BytesIO):
    """A request body that keeps at most `limit` bytes: an oversized upload costs no memory, the API says 413."""

    def __init__(self, limit: int, declared: int | None) -> None:
        super().__init__()
        self.limit = limit
        self.too_large = declared is not None and declared > limit

    def write(self, data: ReadableBuffer, /) -> int:
        size = memoryview(data).nbytes
        if not self.too_large and self.tell() + size > self.limit:
            self.too_large = True
            self.seek(0)
            self.truncate()
        if self.too_large:
            return size
        return super().write(data)


class _ApiSite(server.Site):
    def __init__(self, resource: ApiResource, max_body: int, access_log: str) -> None:
        # Twisted's default idle timeout is 12 hours; an API client that says nothing for a minute is gone.
        super().__init__(resource, parsePOSTFormSubmission=False, timeout=IDLE_TIMEOUT,
                         logPath=access_log or None)
        self.max_body = max_body
        self._access_log = bool(access_log)

    def log(self, request: Any) -> None:
        # Without a file of its own, Site logs every request into the node's log: thousands of lines a second
        # from a busy publisher, and measurable CPU. An access log is written only where it was asked for.
        if self._access_log:
            super().log(request)

    def getContentFile(self, length: int | None) -> _BoundedBody:
        # twisted.web.server.Request asks its site for the file a body is written to, if the site has this method.
        return _BoundedBody(self.max_body, length)


class ApiResource(Resource):
    """The whole API as one leaf: every path under it is matched against ROUTES.

    A request with an `Origin` header comes from a web page, and is refused unless `cors` allows that page: a
    key-less API on loopback trusts whoever can reach it, and every page the user's browser shows can. POSTs
    must say `Content-Type: application/json`, which no page can send cross-site without the browser asking
    first (a CORS preflight) and which an HTML form cannot send at all.
    """

    isLeaf = True

    def __init__(self, backend: ApiBackend, *, api_keys: tuple[str, ...], max_body: int, limits: protocol.Limits,
                 max_batch: int, cors: OriginPolicy = EMPTY) -> None:
        super().__init__()
        if any(not key for key in api_keys):
            raise ValueError("api_keys: an API key must not be empty")
        self._backend = backend
        self._keys = tuple(key.encode("utf-8") for key in api_keys)
        self._max_body = max_body
        self._limits = limits
        self._max_batch = max_batch
        self._cors = cors
        self.health = BackendHealth()

    def render(self, request: server.Request) -> int:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        d = maybeDeferred(self._respond, request)
        d.addErrback(self._failed, request)
        d.addCallback(self._write, request, gone)
        d.addErrback(lambda failure: _log.failure("could not write the API response", failure))
        return server.NOT_DONE_YET

    def _respond(self, request: server.Request) -> Deferred[_Response]:
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("latin-1")
        origin = request.getHeader(b"origin")
        if origin is not None:
            if not self._cors.matches(origin.decode("latin-1")):
                raise ApiError(403, ErrorCode.FORBIDDEN,
                               f"requests from web pages are refused unless api-cors-origins allows their origin "
                               f"({origin[:100].decode('latin-1')!r} is not allowed)")
            if method == "OPTIONS" and request.getHeader(b"access-control-request-method") is not None:
                return succeed(_preflight(path))
        route, params = _match(method, path)
        if route.auth:
            self._authorize(request)
        body = self._body(request, route)
        call = Call(self._backend, self._limits, self._max_batch, params, request.args or {}, body, self.health)
        return maybeDeferred(route.handler, call).addCallback(lambda reply: _json(*reply))

    def _authorize(self, request: server.Request) -> None:
        if not self._keys:
            return
        token = _presented_key(request)
        if token is None:
            raise ApiError(401, ErrorCode.UNAUTHORIZED, "an API key is required: send Authorization: Bearer <key>",
                           {"WWW-Authenticate": 'Bearer realm="pushd"'})
        # Compare with every key, so the time taken does not tell which key came close.
        matches = [hmac.compare_digest(token, key) for key in self._keys]
        if not any(matches):
            raise ApiError(401, ErrorCode.UNAUTHORIZED, "the API key is not valid",
                           {"WWW-Authenticate": 'Bearer realm="pushd", error="invalid_token"'})

    def _body(self, request: server.Request, route: Route) -> dict[str, Any]:
        too_large = ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE, f"the request body is over {self._max_body} bytes")
        declared = request.getHeader(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self._max_body:
            raise too_large
        content = request.content
        if isinstance(content, _BoundedBody) and content.too_large:
            raise too_large
        body = b""
        if content is not None:
            content.seek(0)
            body = content.read(self._max_body + 1)
        if len(body) > self._max_body:
            raise too_large
        if route.method != "POST":
            return {}
        content_type = request.getHeader(b"content-type")
        if content_type is None:
            raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, "a POST needs Content-Type: application/json")
        if content_type.split(b";")[0].strip().lower() != b"application/json":
            raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Type {content_type[:64].decode('latin-1')!r} is not application/json")
        if not body.strip() and not route.body:
            return {}
        return _parse_body(body)

    def _failed(self, failure: Failure, request: server.Request) -> _Response:
        if isinstance(failure.value, ApiError):
            return _error(failure.value)
        _log.failure("API {method} {path} failed", failure, method=request.method, path=request.path)
        return _error(ApiError(500, ErrorCode.INTERNAL_ERROR, "the server failed to answer; see its log"))

    def _write(self, response: _Response, request: server.Request, gone: list[Failure]) -> None:
        if gone:
            return
        request.setResponseCode(response.status)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        # Every answer depends on the Origin header (refused, or allowed for that origin alone).
        request.setHeader(b"vary", b"Origin")
        origin = request.getHeader(b"origin")
        if origin is not None and self._cors.matches(origin.decode("latin-1")):
            request.setHeader(b"access-control-allow-origin", origin)
        for name, value in response.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        if response.status != 204:
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", str(len(response.body)).encode("ascii"))
            request.write(response.body)
        request.finish()


def _preflight(path: str) -> _Response:
    """The answer to a CORS preflight from an allowed origin: which methods the path has, which headers a page
    may send; the browser then sends the request itself, or not."""
    methods = sorted({route.method for route in ROUTES if route.pattern.fullmatch(path)})
    if not methods:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no API route {path[:128]!r} (see /api/openapi.json)")
    return _Response(204, b"", {"Access-Control-Allow-Methods": ", ".join(methods),
                                "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
                                "Access-Control-Max-Age": str(CORS_MAX_AGE)})


def _presented_key(request: server.Request) -> bytes | None:
    """The key a request presents: `Authorization: Bearer <key>`, or as Centrifugo's clients send it
    (`Authorization: apikey <key>`, `X-API-Key: <key>`; pushd/api_centrifugo.py)."""
    header = request.getHeader(b"authorization")
    if header is None:
        header = b"bearer " + (request.getHeader(b"x-api-key") or b"")
    scheme, _, key = header.partition(b" ")
    return key.strip() or None if scheme.lower() in (b"bearer", b"apikey") else None


def _match(method: str, path: str) -> tuple[Route, dict[str, str]]:
    allowed: list[str] = []
    for route in ROUTES:
        found = route.pattern.fullmatch(path)
        if found is None:
            continue
        if route.method == method:
            return route, found.groupdict()
        allowed.append(route.method)
    if allowed:
        methods = ", ".join(sorted(set(allowed)))
        raise ApiError(405, ErrorCode.METHOD_NOT_ALLOWED, f"{method[:16]} is not allowed here; use {methods}",
                       {"Allow": methods})
    raise ApiError(404, ErrorCode.NOT_FOUND, f"no API route {path[:128]!r} (see /api/openapi.json)")


def api_site(backend: ApiBackend, *, api_keys: tuple[str, ...], max_body: int, limits: protocol.Limits,
             max_batch: int = 1000, access_log: str = "", cors: OriginPolicy = EMPTY) -> server.Site:
    """The HTTP API as a Site to listen with. With no `api_keys` nobody is asked for a key: listen on loopback.
    `access_log` is a file for one line per request (combined log format); empty: none. `cors`: the web pages
    whose browser requests are answered (none by default)."""
    resource = ApiResource(backend, api_keys=api_keys, max_body=max_body, limits=limits, max_batch=max_batch,
                           cors=cors)
    site = _ApiSite(resource, max_body, access_log)
    site.noisy = False
    site.displayTracebacks = False
    return site
