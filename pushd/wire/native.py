"""pushd's own wire protocol (docs/protocol.md): one JSON object per text frame, `op` names the command.

Pure functions over `pushd.protocol`'s commands and events, so every rule of docs/protocol.md is tested without
a socket.
"""

from __future__ import annotations

import json
from typing import Any

from pushd.patterns import is_pattern
from pushd.protocol import (
    Auth,
    Authenticated,
    Command,
    Connected,
    Disconnect,
    Error,
    ErrorCode,
    Event,
    HistoryPage,
    Limits,
    Lost,
    Ping,
    Ponged,
    PresenceCount,
    RefreshNeeded,
    RequestId,
    Revoked,
    Started,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    json_value,
    subscription_error,
    token_error,
)
from pushd.recovery import OffsetSince, Position, Since, is_offset

_MAX_ID_LENGTH = 64


class CloseCode:
    """pushd's own WebSocket close codes (docs/protocol.md has the table)."""

    DISCONNECTED = 4000
    INVALID_TOKEN = 4001
    TOKEN_EXPIRED = 4002
    AUTH_REQUIRED = 4003
    SLOW_CONSUMER = 4004


GOING_AWAY = 1001
POLICY_VIOLATION = 1008

_CLOSE_CODES = {
    Disconnect.SHUTDOWN: GOING_AWAY,
    Disconnect.INVALID_TOKEN: CloseCode.INVALID_TOKEN,
    Disconnect.TOKEN_EXPIRED: CloseCode.TOKEN_EXPIRED,
    Disconnect.STALE_TOKEN: CloseCode.INVALID_TOKEN,
    Disconnect.AUTH_REQUIRED: CloseCode.AUTH_REQUIRED,
    Disconnect.BAD_REQUEST: POLICY_VIOLATION,
    Disconnect.NO_PONG: GOING_AWAY,
    Disconnect.SLOW: CloseCode.SLOW_CONSUMER,
}


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
        problem = token_error(token)
        if problem is not None:
            return Error(ErrorCode.BAD_REQUEST, problem, request_id)
        assert isinstance(token, str)
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
    since: dict[str, Since] = {}
    for topic, position in raw_since.items():
        if topic not in topics:
            return Error(ErrorCode.BAD_REQUEST, f"since.{topic[:64]}: not one of the topics subscribed to",
                         request_id)
        if not isinstance(position, dict) or not is_offset(position.get("offset")) \
                or not isinstance(position.get("epoch"), str) or not position["epoch"]:
            return Error(ErrorCode.BAD_REQUEST,
                         f'since.{topic[:64]}: must be {{"offset": "<ms>-<seq>", "epoch": "<epoch>"}}', request_id)
        since[topic] = OffsetSince(position["offset"], position["epoch"])
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


def encode_missed(topic: str, reason: str) -> bytes:
    """The node may have missed messages of `topic`: the client refetches, or subscribes again with `since`."""
    return _encode({"op": "missed", "topic": topic, "reason": reason})


def encode_revoked(topics: tuple[str, ...], reason: str) -> bytes:
    """Subscriptions the server ended (no id: no request asked for it); a client drops them as for `unsubscribed`."""
    return _encode({"op": "unsubscribed", "topics": list(topics), "reason": reason})


def encode_refresh() -> bytes:
    return b'{"op":"refresh"}'


def encode_error(error: Error) -> bytes:
    reply: dict[str, Any] = {"op": "error", "code": error.code, "message": error.message}
    if error.topics:
        reply["topics"] = list(error.topics)
    return _encode(_with_id(reply, error.id))


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


class NativeCodec:
    """pushd's own protocol as a `pushd.wire.Codec`."""

    name = "pushd"
    opens_with_connect = False
    ping: bytes | None = None
    positioned = False

    def decode(self, payload: bytes, limits: Limits) -> list[Command | Error]:
        return [parse_command(payload.decode("utf-8"), limits)]

    def encode(self, event: Event) -> list[bytes]:
        if isinstance(event, Subscribed):
            return [encode_subscribed(event.command.topics, event.command.id)]
        if isinstance(event, Started):
            return self._started(event)
        if isinstance(event, Unsubscribed):
            return [encode_unsubscribed(event.command.topics, event.command.id)]
        if isinstance(event, Ponged):
            return [encode_pong(event.command.id)]
        if isinstance(event, Authenticated):
            return [encode_authenticated(event.user, event.expires, event.command.id)]
        if isinstance(event, RefreshNeeded):
            return [encode_refresh()]
        if isinstance(event, Revoked):
            return [encode_revoked(event.topics, event.reason)]
        if isinstance(event, Error):
            return [encode_error(event)]
        if isinstance(event, Lost):
            return [encode_missed(event.topic, event.reason)]
        if isinstance(event, (Connected, HistoryPage, PresenceCount)):
            return []  # this protocol has no connect command, history reads or presence
        raise TypeError(f"no frame for {event!r}")

    def _started(self, event: Started) -> list[bytes]:
        texts = [encode_data(event.topic, payload, position) for position, payload in event.replay]
        if event.failure is not None:
            texts.insert(0, encode_error(Error(ErrorCode.RECOVERY_FAILED, event.failure, event.command.id,
                                               (event.topic,))))
        return texts

    def publication(self, topic: str, payload: bytes, position: Position | None) -> bytes:
        return encode_data(topic, payload, position)

    def message(self, payload: bytes) -> bytes:
        return encode_message(payload)

    def broadcast(self, broadcast_id: str, payload: bytes) -> bytes:
        return encode_broadcast(broadcast_id, payload)

    def close(self, reason: Disconnect, detail: str) -> tuple[int, str]:
        return _CLOSE_CODES[reason], detail


CODEC = NativeCodec()
