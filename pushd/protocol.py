"""The wire protocol as pure functions: client frame text -> command or error, events -> frame payloads.

Nothing here touches a socket, a reactor or Redis, so every rule of docs/protocol.md is tested directly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pushd.patterns import is_pattern, pattern_error
from pushd.recovery import Position, is_offset

#: What a topic name may contain. `*`, `?` and `[` stay reserved for pattern subscriptions.
TOPIC_ALPHABET = "A-Z a-z 0-9 _ - . : @ / = + ~"
_TOPIC_RE = re.compile(r"[A-Za-z0-9_\-.:@/=+~]+")
_MAX_ID_LENGTH = 64

RequestId = int | str | None


class ErrorCode:
    """The `code` values of error frames (docs/protocol.md has the table)."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    INVALID_TOPIC = "invalid_topic"
    TOO_MANY_TOPICS = "too_many_topics"
    FORBIDDEN = "forbidden"
    UNAUTHORIZED = "unauthorized"
    RECOVERY_FAILED = "recovery_failed"
    INTERNAL_ERROR = "internal_error"


class CloseCode:
    """pushd's own WebSocket close codes (docs/protocol.md has the table)."""

    DISCONNECTED = 4000
    INVALID_TOKEN = 4001
    TOKEN_EXPIRED = 4002
    AUTH_REQUIRED = 4003


@dataclass(frozen=True, slots=True)
class Limits:
    max_topic_length: int = 128
    max_topics_per_connection: int = 1000
    allow_patterns: bool = False


@dataclass(frozen=True, slots=True)
class Subscribe:
    topics: tuple[str, ...]
    id: RequestId = None
    #: Send each topic's latest message from history right after `subscribed`.
    last: bool = False
    #: Replay what each topic got after this position, then go on live.
    since: dict[str, Position] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topics: tuple[str, ...]
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Ping:
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Auth:
    token: str
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Error:
    """A request the server refuses; `encode_error` turns it into the error frame."""

    code: str
    message: str
    id: RequestId = None
    topics: tuple[str, ...] = ()


Command = Subscribe | Unsubscribe | Ping | Auth
MAX_TOKEN_LENGTH = 8192


def topic_error(topic: object, limits: Limits) -> str | None:
    """Why `topic` is not a valid topic name, or None when it is."""
    if not isinstance(topic, str):
        return "topic names must be strings"
    if not topic:
        return "topic names must not be empty"
    if len(topic) > limits.max_topic_length:
        return f"topic {topic[:32]!r}... is longer than {limits.max_topic_length} bytes"
    if _TOPIC_RE.fullmatch(topic) is None:
        return f"topic {topic[:64]!r} has characters outside {TOPIC_ALPHABET}"
    return None


def is_valid_topic(topic: str, limits: Limits) -> bool:
    return topic_error(topic, limits) is None


def subscription_error(topic: object, limits: Limits) -> str | None:
    """Why `topic` cannot be subscribed to: a topic name, or a pattern when `limits.allow_patterns`."""
    if isinstance(topic, str) and is_pattern(topic):
        if not limits.allow_patterns:
            return f"{topic[:64]!r} is a pattern and pattern subscriptions are off on this server"
        return pattern_error(topic, limits.max_topic_length)
    return topic_error(topic, limits)


def parse_command(text: str, limits: Limits) -> Command | Error:
    """Turn one client text frame into a command, or into the error to answer with."""
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        return Error(ErrorCode.BAD_REQUEST, "frame is not valid JSON")
    if not isinstance(frame, dict):
        return Error(ErrorCode.BAD_REQUEST, "frame must be a JSON object")

    request_id = frame.get("id")
    if request_id is not None and not _is_valid_id(request_id):
        return Error(ErrorCode.BAD_REQUEST, f"id must be an integer or a string of at most {_MAX_ID_LENGTH} characters")

    op = frame.get("op")
    if not isinstance(op, str):
        return Error(ErrorCode.BAD_REQUEST, "op is missing or not a string", request_id)
    if op == "ping":
        return Ping(request_id)
    if op == "auth":
        token = frame.get("token")
        if not isinstance(token, str) or not token:
            return Error(ErrorCode.BAD_REQUEST, "token must be a non-empty string", request_id)
        if len(token) > MAX_TOKEN_LENGTH:
            return Error(ErrorCode.BAD_REQUEST, f"token is longer than {MAX_TOKEN_LENGTH} bytes", request_id)
        return Auth(token, request_id)
    if op not in ("subscribe", "unsubscribe"):
        return Error(ErrorCode.UNKNOWN_OP, f"unknown op {op[:32]!r} (subscribe, unsubscribe, ping, auth)",
                     request_id)

    topics = frame.get("topics")
    if not isinstance(topics, list) or not topics:
        return Error(ErrorCode.BAD_REQUEST, "topics must be a non-empty list of topic names", request_id)
    if len(topics) > limits.max_topics_per_connection:
        return Error(
            ErrorCode.TOO_MANY_TOPICS,
            f"{len(topics)} topics in one frame; at most {limits.max_topics_per_connection} per connection",
            request_id,
        )
    for topic in topics:
        problem = subscription_error(topic, limits)
        if problem is not None:
            return Error(ErrorCode.INVALID_TOPIC, problem, request_id)
    unique = tuple(dict.fromkeys(topics))
    if op == "unsubscribe":
        return Unsubscribe(unique, request_id)
    return _subscribe_options(frame, unique, request_id)


def _subscribe_options(frame: dict[str, Any], topics: tuple[str, ...], request_id: RequestId) -> Subscribe | Error:
    last = frame.get("last", False)
    if not isinstance(last, bool):
        return Error(ErrorCode.BAD_REQUEST, "last must be true or false", request_id)
    raw_since = frame.get("since", {})
    if not isinstance(raw_since, dict):
        return Error(ErrorCode.BAD_REQUEST, 'since must be an object {"TOPIC": {"offset": ..., "epoch": ...}}',
                     request_id)
    since: dict[str, Position] = {}
    for topic, position in raw_since.items():
        if topic not in topics:
            return Error(ErrorCode.BAD_REQUEST, f"since.{topic[:64]}: not one of the topics subscribed to",
                         request_id)
        if not isinstance(position, dict) or not is_offset(position.get("offset")) \
                or not isinstance(position.get("epoch"), str) or not position["epoch"]:
            return Error(ErrorCode.BAD_REQUEST,
                         f'since.{topic[:64]}: must be {{"offset": "<ms>-<seq>", "epoch": "<epoch>"}}', request_id)
        since[topic] = Position(position["offset"], position["epoch"])
    if last or since:
        patterns = [t for t in topics if is_pattern(t)]
        if patterns:
            return Error(ErrorCode.BAD_REQUEST, "last and since apply to topics, not to patterns", request_id,
                         tuple(patterns))
    return Subscribe(topics, request_id, last, since)


def _is_valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**53) < value < 2**53
    return isinstance(value, str) and len(value) <= _MAX_ID_LENGTH


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode()


def _with_id(reply: dict[str, Any], request_id: RequestId) -> dict[str, Any]:
    if request_id is not None:
        reply["id"] = request_id
    return reply


def encode_subscribed(topics: tuple[str, ...], request_id: RequestId) -> bytes:
    return _encode(_with_id({"op": "subscribed", "topics": list(topics)}, request_id))


def encode_unsubscribed(topics: tuple[str, ...], request_id: RequestId) -> bytes:
    return _encode(_with_id({"op": "unsubscribed", "topics": list(topics)}, request_id))


def encode_pong(request_id: RequestId) -> bytes:
    return _encode(_with_id({"op": "pong"}, request_id))


def encode_authenticated(user: str, expires: float, request_id: RequestId) -> bytes:
    return _encode(_with_id({"op": "authenticated", "user": user, "expires": int(expires)}, request_id))


def encode_refresh() -> bytes:
    return b'{"op":"refresh"}'


def encode_error(error: Error) -> bytes:
    reply: dict[str, Any] = {"op": "error", "code": error.code, "message": error.message}
    if error.topics:
        reply["topics"] = list(error.topics)
    return _encode(_with_id(reply, error.id))


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def json_value(payload: bytes) -> bytes:
    """The published bytes as a JSON value: unchanged when they are JSON, else as a JSON string.

    Bytes that are not UTF-8 become a string with U+FFFD in place of each bad sequence, because a WebSocket
    text frame must be UTF-8.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return json.dumps(payload.decode("utf-8", "replace"), ensure_ascii=False).encode()
    try:
        json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return json.dumps(text, ensure_ascii=False).encode()
    return payload.strip()


def encode_data(topic: str, payload: bytes, position: Position | None = None) -> bytes:
    """The data frame text for one published message; built once per message, whatever the subscriber count."""
    # Valid topic names, offsets and epochs hold no character JSON would escape, so quoting is enough.
    head = b'{"topic":"' + topic.encode() + b'","data":' + json_value(payload)
    if position is None:
        return head + b"}"
    return head + b',"offset":"' + position.offset.encode() + b'","epoch":"' + position.epoch.encode() + b'"}'


def encode_message(payload: bytes) -> bytes:
    """A message sent to one user's connections (HTTP API `POST /api/users/<id>/publish`)."""
    return b'{"op":"message","data":' + json_value(payload) + b"}"


def encode_broadcast(broadcast_id: str, payload: bytes) -> bytes:
    """A site-wide broadcast, sent to every connection whatever its subscriptions."""
    return b'{"op":"broadcast","broadcast":' + json.dumps(broadcast_id).encode() + b',"data":' \
        + json_value(payload) + b"}"
