"""The wire protocol as pure functions: client frame text -> command or error, events -> frame payloads.

Nothing here touches a socket, a reactor or Redis, so every rule of docs/protocol.md is tested directly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

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
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class Limits:
    max_topic_length: int = 128
    max_topics_per_connection: int = 1000


@dataclass(frozen=True, slots=True)
class Subscribe:
    topics: tuple[str, ...]
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topics: tuple[str, ...]
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Ping:
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Error:
    """A request the server refuses; `encode_error` turns it into the error frame."""

    code: str
    message: str
    id: RequestId = None
    topics: tuple[str, ...] = ()


Command = Subscribe | Unsubscribe | Ping


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
    if op not in ("subscribe", "unsubscribe"):
        return Error(ErrorCode.UNKNOWN_OP, f"unknown op {op[:32]!r} (subscribe, unsubscribe, ping)", request_id)

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
        problem = topic_error(topic, limits)
        if problem is not None:
            return Error(ErrorCode.INVALID_TOPIC, problem, request_id)
    unique = tuple(dict.fromkeys(topics))
    if op == "subscribe":
        return Subscribe(unique, request_id)
    return Unsubscribe(unique, request_id)


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


def encode_data(topic: str, payload: bytes) -> bytes:
    """The data frame text for one published message; built once per message, whatever the subscriber count."""
    # Valid topic names hold no character JSON would escape, so quoting is enough.
    return b'{"topic":"' + topic.encode() + b'","data":' + json_value(payload) + b"}"
