"""What clients may ask and what they are told, whatever the wire: commands in, events out, and the topic rules.

A wire protocol (`pushd.wire`) turns frames into these commands and these events into frames; the session
(`pushd.session`) runs the commands. Nothing here touches a socket, a reactor or Redis, and nothing here knows
how a frame is spelled, so a second protocol is a second codec, not branches in the session or the hub.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum

from pushd.patterns import is_pattern, pattern_error
from pushd.recovery import Position, SeqSince, Since

#: What a topic name may contain. `*`, `?` and `[` stay reserved for pattern subscriptions.
TOPIC_ALPHABET = "A-Z a-z 0-9 _ - . : @ / = + ~"
_TOPIC_RE = re.compile(r"[A-Za-z0-9_\-.:@/=+~]+")

RequestId = int | str | None


class ErrorCode:
    """Why a command was refused; each codec spells these its own way (docs/protocol.md, docs/clients.md)."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    INVALID_TOPIC = "invalid_topic"
    TOO_MANY_TOPICS = "too_many_topics"
    FORBIDDEN = "forbidden"
    UNAUTHORIZED = "unauthorized"
    RECOVERY_FAILED = "recovery_failed"
    INTERNAL_ERROR = "internal_error"
    ALREADY_SUBSCRIBED = "already_subscribed"
    NOT_AVAILABLE = "not_available"
    TOKEN_EXPIRED = "token_expired"


class Disconnect(Enum):
    """Why the server closes a connection; each codec maps these to its close codes."""

    #: The server is shutting down; come back (to another node).
    SHUTDOWN = "shutdown"
    #: The token is malformed, forged, expired at connect, or for another user.
    INVALID_TOKEN = "invalid_token"
    #: The token expired and no fresh one came in time.
    TOKEN_EXPIRED = "token_expired"
    #: A token that has already expired was presented to refresh the session.
    STALE_TOKEN = "stale_token"
    #: No token (or no connect command) came within the auth timeout.
    AUTH_REQUIRED = "auth_required"
    #: Too many refused frames, or a frame the protocol cannot go on after.
    BAD_REQUEST = "bad_request"
    #: The client did not answer an application-level ping in time.
    NO_PONG = "no_pong"
    #: The client does not read: more than the high-water mark waited for it, or it read nothing for ping-timeout.
    SLOW = "slow"


@dataclass(frozen=True, slots=True)
class Limits:
    max_topic_length: int = 128
    max_topics_per_connection: int = 1000
    allow_patterns: bool = False


# -- commands: what a client asks -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subscribe:
    topics: tuple[str, ...]
    id: RequestId = None
    #: Send each topic's latest message from history right after the subscription.
    last: bool = False
    #: Replay what each topic got after this position, then go on live.
    since: dict[str, Since] = field(default_factory=dict)
    #: Tell the client where each topic's history stands (its epoch and newest number), so it can recover.
    position: bool = False
    #: Subscribing to a topic the connection already has is an error, not a no-op.
    exclusive: bool = False
    #: A recovery history cannot serve refuses the subscription (the client reloads its state and subscribes
    #: again) instead of going live without what was missed.
    strict_recovery: bool = False


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topics: tuple[str, ...]
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Ping:
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Pong:
    """The client's answer to an application-level ping from the server."""


@dataclass(frozen=True, slots=True)
class Connect:
    """The first command of a protocol that opens a session explicitly; `token` may be absent (anonymous)."""

    token: str | None
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Auth:
    """Authenticate, or refresh the token of, an open session."""

    token: str
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class HistoryRead:
    """Read a topic's history: up to `limit` messages after `since` (or the newest, or the oldest first)."""

    topic: str
    id: RequestId = None
    limit: int = 0
    since: SeqSince | None = None
    reverse: bool = False


@dataclass(frozen=True, slots=True)
class PresenceStats:
    """How many connections are subscribed to a topic, cluster-wide."""

    topic: str
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Error:
    """A request the server refuses; codecs turn it into their error reply."""

    code: str
    message: str
    id: RequestId = None
    topics: tuple[str, ...] = ()
    #: The protocol cannot go on after this frame (Centrifugo's, with no id to answer to): close the connection.
    fatal: bool = False


Command = Subscribe | Unsubscribe | Ping | Pong | Connect | Auth | HistoryRead | PresenceStats
MAX_TOKEN_LENGTH = 8192


# -- events: what a client is told ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """A session is open: who it is (None: anonymous), its id, and when its token expires (0: never)."""

    id: RequestId
    client: str
    user: str | None
    expires: float
    #: Seconds until the token expires, counted when the reply is made (0: no expiry).
    ttl: int
    ping_interval: int


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The subscription is in place; `pending` topics are still reading their history."""

    command: Subscribe
    pending: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Started:
    """A held subscription has read its history and goes live.

    `replay`: the messages the client gets from history before live ones (recovered, or the latest).
    `top`: the client's position (epoch and number) before the replay, when known: where it recovered from, or
    where history stands when it is not recovering or could not recover.
    `failure`: why a recovery could not be served (the subscription goes on live from now).
    """

    command: Subscribe
    topic: str
    replay: tuple[tuple[Position, bytes], ...] = ()
    top: tuple[str, int] | None = None
    recovering: bool = False
    failure: str | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    command: Unsubscribe


@dataclass(frozen=True, slots=True)
class Ponged:
    command: Ping


@dataclass(frozen=True, slots=True)
class Authenticated:
    command: Auth
    client: str
    user: str
    expires: float
    ttl: int


@dataclass(frozen=True, slots=True)
class RefreshNeeded:
    """The token expired: a fresh one is wanted within the grace period."""


@dataclass(frozen=True, slots=True)
class Lost:
    """Messages of `topic` may never have reached the node (a gap in its numbers, history Redis lost, or an
    outage of Redis for a topic without history): the client must recover or refetch to go on."""

    topic: str
    reason: str = "messages were lost"


@dataclass(frozen=True, slots=True)
class Revoked:
    """A refreshed token no longer allows these subscriptions: the server has unsubscribed them, for good."""

    topics: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class HistoryPage:
    command: HistoryRead
    entries: tuple[tuple[Position, bytes], ...]
    epoch: str
    top: int


@dataclass(frozen=True, slots=True)
class PresenceCount:
    command: PresenceStats
    clients: int
    users: int


Event = (Connected | Subscribed | Started | Unsubscribed | Ponged | Authenticated | RefreshNeeded | Lost
         | Revoked | HistoryPage | PresenceCount | Error)


# -- topic rules --------------------------------------------------------------------------------------------


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


def token_error(token: object) -> str | None:
    """Why `token` cannot be a client token (checked before any JWT parsing), or None."""
    if not isinstance(token, str) or not token:
        return "token must be a non-empty string"
    if len(token) > MAX_TOKEN_LENGTH:
        return f"token is longer than {MAX_TOKEN_LENGTH} bytes"
    return None


# -- payloads -----------------------------------------------------------------------------------------------


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
