"""Centrifugo's server HTTP API, the part pushd can serve, so a backend written for Centrifugo (the `cent` package,
its Go, PHP and Node clients) publishes to pushd by changing only its base URL to `/api/centrifugo`.

`POST /api/centrifugo/<method>` with the method's params as the JSON body, the key in `X-API-Key` (or
`Authorization: apikey <key>`, or pushd's own `Bearer`); the answer is `{"result": ...}`, or `{"error": {"code",
"message"}}` with HTTP 200 as Centrifugo answers a request it understood but refused. Methods: publish,
broadcast (one message to several channels), disconnect (a user, or one of its connections) and channels.
Everything else, and the fields pushd has no meaning for, get error 108 "not available" (docs/api.md).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from pushd import protocol
from pushd.patterns import is_pattern
from pushd.recovery import Position

if TYPE_CHECKING:
    from pushd.api import ApiBackend

#: Centrifugo's API error codes.
INTERNAL = 100
UNKNOWN_CHANNEL = 102
METHOD_NOT_FOUND = 104
BAD_REQUEST = 107
NOT_AVAILABLE = 108
#: A disconnect with no code of its own: pushd's "closed by the server" code, after which SDKs reconnect.
DEFAULT_DISCONNECT = (4000, "disconnected by the server")

Method = Callable[[Mapping[str, Any], "ApiBackend", protocol.Limits], "Deferred[dict[str, Any]]"]


class CentrifugoError(Exception):
    """A request refused with one of Centrifugo's API error codes."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def reply(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


def _fields(params: Mapping[str, Any], allowed: tuple[str, ...], ignored: tuple[str, ...] = ()) -> None:
    """Unknown fields are a bad request; known ones pushd cannot honour are "not available", unless empty."""
    for name, value in params.items():
        if name in ignored or name in allowed:
            continue
        if name in _NOT_AVAILABLE:
            if value in (None, False, "", [], {}):
                continue
            raise CentrifugoError(NOT_AVAILABLE, f"{name}: {_NOT_AVAILABLE[name]}")
        raise CentrifugoError(BAD_REQUEST, f"{name[:64]}: unknown field")


_NOT_AVAILABLE = {
    "skip_history": "pushd keeps every publication of a topic with history",
    "tags": "pushd publications carry no tags",
    "b64data": "pushd carries JSON data only",
    "idempotency_key": "pushd's publish has no idempotency key (its broadcast has one: POST /api/broadcast)",
    "session": "pushd connections have no sessions",
    "whitelist": "pushd has no disconnect whitelist",
}


def _channel(value: object, limits: protocol.Limits) -> str:
    if not isinstance(value, str):
        raise CentrifugoError(BAD_REQUEST, "channel: must be a string")
    problem = protocol.topic_error(value, limits)
    if problem is not None or is_pattern(value):
        raise CentrifugoError(UNKNOWN_CHANNEL, f"channel {value[:100]!r}: {problem or 'a pattern, not a channel'}")
    return value


def _data(params: Mapping[str, Any]) -> bytes:
    if "data" not in params:
        raise CentrifugoError(BAD_REQUEST, "data: required")
    try:
        return json.dumps(params["data"], separators=(",", ":"), ensure_ascii=False).encode()
    except (UnicodeEncodeError, RecursionError):
        raise CentrifugoError(BAD_REQUEST, "data: not encodable as UTF-8 JSON") from None


def _published(position: Position | None) -> dict[str, Any]:
    """Centrifugo's publish result: the publication's offset (its number in the topic) and the epoch."""
    return {} if position is None else {"offset": position.seq, "epoch": position.epoch}


def publish(params: Mapping[str, Any], backend: ApiBackend, limits: protocol.Limits) -> Deferred[dict[str, Any]]:
    _fields(params, ("channel", "data"))
    message = (_channel(params.get("channel"), limits), _data(params))
    return backend.publish([message]).addCallback(lambda positions: {"result": _published(positions[0])})


def broadcast(params: Mapping[str, Any], backend: ApiBackend, limits: protocol.Limits) -> Deferred[dict[str, Any]]:
    _fields(params, ("channels", "data"))
    channels = params.get("channels")
    if not isinstance(channels, list) or not channels:
        raise CentrifugoError(BAD_REQUEST, "channels: must be a non-empty list of channels")
    payload = _data(params)
    messages = [(_channel(channel, limits), payload) for channel in channels]
    return backend.publish(messages).addCallback(
        lambda positions: {"result": {"responses": [{"result": _published(p)} for p in positions]}})


def disconnect(params: Mapping[str, Any], backend: ApiBackend, limits: protocol.Limits) -> Deferred[dict[str, Any]]:
    _fields(params, ("user", "client", "disconnect"))
    user, client = params.get("user"), params.get("client")
    if not isinstance(user, str) or not user:
        raise CentrifugoError(BAD_REQUEST, "user: required")
    code, reason = _disconnect(params.get("disconnect"))
    if client in (None, ""):
        return backend.disconnect_user(user, code, reason).addCallback(lambda _: {"result": {}})
    if not isinstance(client, str):
        raise CentrifugoError(BAD_REQUEST, "client: must be a string")
    # Centrifugo closes nothing when the client is not the user's; pushd's ids name one connection cluster-wide.
    return backend.disconnect_connection(client, code, reason).addCallback(lambda _: {"result": {}})


def _disconnect(value: object) -> tuple[int, str]:
    if value is None:
        return DEFAULT_DISCONNECT
    if not isinstance(value, dict) or set(value) - {"code", "reason"}:
        raise CentrifugoError(BAD_REQUEST, "disconnect: must be an object with code and reason")
    code, reason = value.get("code", DEFAULT_DISCONNECT[0]), value.get("reason", DEFAULT_DISCONNECT[1])
    if not isinstance(code, int) or isinstance(code, bool) or not 4000 <= code <= 4999:
        raise CentrifugoError(BAD_REQUEST, "disconnect.code: must be an integer from 4000 to 4999")
    if not isinstance(reason, str) or len(reason.encode()) > 123:
        raise CentrifugoError(BAD_REQUEST, "disconnect.reason: must be a string of at most 123 UTF-8 bytes")
    return code, reason


def channels(params: Mapping[str, Any], backend: ApiBackend, limits: protocol.Limits) -> Deferred[dict[str, Any]]:
    _fields(params, ("pattern",))
    pattern = params.get("pattern") or "*"
    if not isinstance(pattern, str):
        raise CentrifugoError(BAD_REQUEST, "pattern: must be a string")
    return backend.topics().addCallback(lambda topics: {"result": {"channels": {
        topic: {"num_clients": count} for topic, count in topics.items() if fnmatch.fnmatchcase(topic, pattern)}}})


METHODS: dict[str, Method] = {"publish": publish, "broadcast": broadcast, "disconnect": disconnect,
                              "channels": channels}


def call(method: str, params: Mapping[str, Any], backend: ApiBackend, limits: protocol.Limits) -> Deferred[dict[str, Any]]:
    """The reply body for one call. Refusals are replies; a failing backend fails the Deferred (the API's 503)."""
    handler = METHODS.get(method)
    if handler is None:
        raise CentrifugoError(METHOD_NOT_FOUND, f"method {method[:64]!r} is not one pushd serves "
                                                f"(it serves {', '.join(sorted(METHODS))})")
    return handler(params, backend, limits)
