"""Centrifugo's client protocol (v2, JSON), so its official SDKs (centrifuge-js, centrifuge-python, Swift, Dart,
Java, Go) work against pushd unchanged (docs/clients.md).

Commands arrive as JSON objects, several per text frame separated by newlines (`{"id":1,"connect":{...}}`);
replies carry the command's id, pushes carry none. Channels are pushd topics; a publication's `offset` is the
message's number in its topic's history (`pushd.recovery.Position.seq`), the number the SDKs compare and
recover from. Pure functions, no state.
"""

from __future__ import annotations

import json
from typing import Any

from pushd import __version__
from pushd.patterns import is_pattern
from pushd.protocol import (
    Auth,
    Authenticated,
    Command,
    Connect,
    Connected,
    Disconnect,
    Error,
    ErrorCode,
    Event,
    HistoryPage,
    HistoryRead,
    Limits,
    Lost,
    Pong,
    Ponged,
    PresenceCount,
    PresenceStats,
    RefreshNeeded,
    RequestId,
    Revoked,
    Started,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    json_value,
    token_error,
    topic_error,
)
from pushd.recovery import Position, SeqSince, Since

#: Command ids are uint32, greater than 0.
MAX_ID = 2**32 - 1
#: History reads return at most this many publications (Centrifugo's own clients ask for a few hundred).
MAX_HISTORY_LIMIT = 1000
#: Offsets are uint64; JavaScript SDKs read them as numbers, exact below 2**53.
MAX_OFFSET = 2**53 - 1

#: Subscribe flag bits the SDKs send: 1 asks for numeric channel ids in pushes (pushd sends names, which the
#: SDKs take as well), 2 asks for error 112 when a recovery cannot be served.
FLAG_REJECT_UNRECOVERED = 2

#: Centrifugo's error codes (its "client protocol codes"): code -> the message its SDKs and docs use.
ERRORS = {
    ErrorCode.INTERNAL_ERROR: (100, "internal server error"),
    ErrorCode.UNAUTHORIZED: (101, "unauthorized"),
    ErrorCode.INVALID_TOPIC: (102, "unknown channel"),
    ErrorCode.FORBIDDEN: (103, "permission denied"),
    ErrorCode.UNKNOWN_OP: (104, "method not found"),
    ErrorCode.ALREADY_SUBSCRIBED: (105, "already subscribed"),
    ErrorCode.TOO_MANY_TOPICS: (106, "limit exceeded"),
    ErrorCode.BAD_REQUEST: (107, "bad request"),
    ErrorCode.NOT_AVAILABLE: (108, "not available"),
    ErrorCode.TOKEN_EXPIRED: (109, "token expired"),
    ErrorCode.RECOVERY_FAILED: (112, "unrecoverable position"),
}
#: Errors a client may retry after a while (Centrifugo marks them temporary).
TEMPORARY = frozenset({100})

#: Centrifugo's disconnect codes: 3000-3499 the SDK reconnects after, 3500-3999 it does not.
CLOSE_CODES = {
    Disconnect.SHUTDOWN: (3001, "shutdown"),
    Disconnect.TOKEN_EXPIRED: (3005, "connection expired"),
    Disconnect.STALE_TOKEN: (3005, "connection expired"),
    Disconnect.NO_PONG: (3012, "no pong"),
    Disconnect.SLOW: (3008, "slow"),
    Disconnect.INVALID_TOKEN: (3500, "invalid token"),
    Disconnect.BAD_REQUEST: (3501, "bad request"),
    Disconnect.AUTH_REQUIRED: (3502, "stale"),
}

#: The unsubscribe push code for subscriptions a refreshed token no longer allows: Centrifugo's "server
#: unsubscribe". Below 2500 the SDKs take it as final (the subscription goes to unsubscribed, no resubscribe).
REVOKED_CODE = 2000

_METHODS = ("connect", "subscribe", "unsubscribe", "publish", "presence", "presence_stats", "history", "rpc",
            "refresh", "sub_refresh", "send")


def parse_frame(payload: bytes, limits: Limits) -> list[Command | Error]:
    """The commands of one text frame: JSON objects, one per line."""
    commands: list[Command | Error] = []
    for line in payload.split(b"\n"):
        if line.strip():
            commands.append(parse_command(line, limits))
    return commands


def parse_command(line: bytes, limits: Limits) -> Command | Error:
    """One command, or the error to answer it with (fatal when there is no id to answer to)."""
    try:
        frame = json.loads(line)
    except (ValueError, RecursionError):
        return Error(ErrorCode.BAD_REQUEST, "command is not valid JSON", fatal=True)
    if not isinstance(frame, dict):
        return Error(ErrorCode.BAD_REQUEST, "command must be a JSON object", fatal=True)
    if not frame:
        return Pong()
    methods = [name for name in _METHODS if name in frame]
    request_id = frame.get("id", 0)
    if methods == ["send"]:
        return Pong()  # an asynchronous message to the server: pushd has no handler for it, and it needs no reply
    if isinstance(request_id, bool) or not isinstance(request_id, int) or not 0 < request_id <= MAX_ID:
        return Error(ErrorCode.BAD_REQUEST, "id must be an integer from 1 to 2^32-1", fatal=True)
    if len(methods) != 1:
        # Centrifugo disconnects a command it cannot dispatch (no method it knows, or several).
        return Error(ErrorCode.BAD_REQUEST, f"a command names one method of {', '.join(_METHODS)}", request_id,
                     fatal=True)
    method = methods[0]
    params = frame[method]
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return Error(ErrorCode.BAD_REQUEST, f"{method} must be an object", request_id)
    if method == "connect":
        token = params.get("token") or None
        if token is not None and token_error(token) is not None:
            return Error(ErrorCode.BAD_REQUEST, str(token_error(token)), request_id)
        return Connect(token, request_id)
    if method == "refresh":
        token = params.get("token")
        problem = token_error(token)
        if problem is not None:
            return Error(ErrorCode.BAD_REQUEST, problem, request_id)
        assert isinstance(token, str)
        return Auth(token, request_id)
    if method in ("publish", "rpc"):
        return Error(ErrorCode.FORBIDDEN if method == "publish" else ErrorCode.UNKNOWN_OP,
                     "clients cannot publish; publish through the HTTP API or Redis" if method == "publish"
                     else "pushd has no RPC methods", request_id)
    if method in ("presence", "sub_refresh"):
        return Error(ErrorCode.NOT_AVAILABLE, f"{method} is not available on pushd", request_id)
    channel = params.get("channel")
    if isinstance(channel, str) and is_pattern(channel):
        # The SDKs route a publication by its channel name, which would be the matched topic's, never the pattern.
        return Error(ErrorCode.INVALID_TOPIC, f"channel {channel[:64]!r} is a pattern: pattern subscriptions need "
                     "pushd's own protocol", request_id)
    problem = topic_error(channel, limits)
    if problem is not None:
        return Error(ErrorCode.INVALID_TOPIC, f"channel: {problem}", request_id)
    assert isinstance(channel, str)
    if method == "subscribe":
        return _subscribe(channel, params, request_id)
    if method == "unsubscribe":
        return Unsubscribe((channel,), request_id)
    if method == "presence_stats":
        return PresenceStats(channel, request_id)
    return _history(channel, params, request_id)


def _subscribe(channel: str, params: dict[str, Any], request_id: int) -> Subscribe | Error:
    since: dict[str, Since] = {}
    if params.get("recover"):
        position = _since(params, request_id, "")
        if isinstance(position, Error):
            return position
        since[channel] = position
    flag = params.get("flag", 0)
    if isinstance(flag, bool) or not isinstance(flag, int) or not 0 <= flag <= MAX_OFFSET:
        return Error(ErrorCode.BAD_REQUEST, "flag must be a whole number from 0", request_id)
    # An SDK with a getState callback asks for error 112 instead of `recovered: false`, to reload its state.
    return Subscribe((channel,), request_id, since=since, position=True, exclusive=True,
                     strict_recovery=bool(flag & FLAG_REJECT_UNRECOVERED))


def _since(params: dict[str, Any], request_id: int, where: str) -> SeqSince | Error:
    offset = params.get("offset", 0)
    epoch = params.get("epoch", "")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
        return Error(ErrorCode.BAD_REQUEST, f"{where}offset must be a whole number from 0", request_id)
    if not isinstance(epoch, str) or len(epoch) > 64:
        return Error(ErrorCode.BAD_REQUEST, f"{where}epoch must be a string", request_id)
    return SeqSince(offset, epoch)


def _history(channel: str, params: dict[str, Any], request_id: int) -> HistoryRead | Error:
    limit = params.get("limit", 0)
    reverse = params.get("reverse", False)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < -1:
        return Error(ErrorCode.BAD_REQUEST, "limit must be a whole number (-1: all, 0: only the position)",
                     request_id)
    if not isinstance(reverse, bool):
        return Error(ErrorCode.BAD_REQUEST, "reverse must be true or false", request_id)
    since = None
    raw_since = params.get("since")
    if raw_since is not None:
        if not isinstance(raw_since, dict):
            return Error(ErrorCode.BAD_REQUEST, "since must be an object {offset, epoch}", request_id)
        parsed = _since(raw_since, request_id, "since.")
        if isinstance(parsed, Error):
            return parsed
        since = parsed
    limit = MAX_HISTORY_LIMIT if limit == -1 else min(limit, MAX_HISTORY_LIMIT)
    return HistoryRead(channel, request_id, limit, since, reverse)


def _data(payload: bytes) -> bytes:
    """A payload as one line of JSON: the SDKs split each frame at newlines, one reply or push per line.

    A raw newline in JSON text is whitespace between tokens (strings hold it escaped), so a space can stand in.
    """
    value = json_value(payload)
    return value.replace(b"\n", b" ") if b"\n" in value else value


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode()


def _reply(request_id: RequestId, method: str, result: dict[str, Any]) -> bytes:
    return _encode({"id": request_id, method: result})


def _publication(position: Position | None, payload: bytes) -> bytes:
    """A Publication object: {"data": ..., "offset": N} (no offset for a message without history)."""
    data = b'{"data":' + _data(payload)
    if position is None or not position.seq:
        return data + b"}"
    return data + b',"offset":' + str(position.seq).encode() + b"}"


def _publications(entries: tuple[tuple[Position, bytes], ...]) -> bytes:
    return b"[" + b",".join(_publication(position, payload) for position, payload in entries) + b"]"


def encode_error(error: Error) -> bytes:
    code, _ = ERRORS.get(error.code, (100, "internal server error"))
    body: dict[str, Any] = {"code": code, "message": error.message}
    if code in TEMPORARY:
        body["temporary"] = True
    return _encode({"id": error.id, "error": body})


def _expiry(expires: float, ttl: int) -> dict[str, Any]:
    return {"expires": True, "ttl": ttl} if expires else {}


class CentrifugoCodec:
    """Centrifugo's client protocol v2 (JSON) as a `pushd.wire.Codec`."""

    name = "centrifugo"
    opens_with_connect = True
    #: Protocol v2 pings with an empty command; clients told `"pong": true` answer with one.
    ping: bytes | None = b"{}"
    positioned = True

    def decode(self, payload: bytes, limits: Limits) -> list[Command | Error]:
        return parse_frame(payload, limits)

    def encode(self, event: Event) -> list[bytes]:
        if isinstance(event, Connected):
            pings = {"ping": event.ping_interval, "pong": True} if event.ping_interval else {}
            return [_reply(event.id, "connect", {"client": event.client, "version": __version__, **pings,
                                                 **_expiry(event.expires, event.ttl)})]
        if isinstance(event, Subscribed):
            # A topic with history answers once its position is read (Started); one without answers now.
            return [] if event.pending else [_reply(event.command.id, "subscribe", {})]
        if isinstance(event, Started):
            return [self._subscribed(event)]
        if isinstance(event, Unsubscribed):
            return [_reply(event.command.id, "unsubscribe", {})]
        if isinstance(event, Authenticated):
            return [_reply(event.command.id, "refresh", {"client": event.client, "version": __version__,
                                                         **_expiry(event.expires, event.ttl)})]
        if isinstance(event, HistoryPage):
            return [b'{"id":' + str(event.command.id).encode() + b',"history":{"publications":'
                    + _publications(event.entries) + b',"epoch":' + json.dumps(event.epoch).encode()
                    + b',"offset":' + str(event.top).encode() + b"}}"]
        if isinstance(event, PresenceCount):
            return [_reply(event.command.id, "presence_stats", {"num_clients": event.clients,
                                                                "num_users": event.users})]
        if isinstance(event, Lost):
            # "Insufficient state": the SDKs subscribe again at once, recovering from their last offset.
            return [b'{"push":{"channel":"' + event.topic.encode()
                    + b'","unsubscribe":{"code":2500,"reason":"insufficient state"}}}']
        if isinstance(event, Revoked):
            reason = json.dumps({"code": REVOKED_CODE, "reason": event.reason}, separators=(",", ":")).encode()
            return [b'{"push":{"channel":"' + topic.encode() + b'","unsubscribe":' + reason + b"}}"
                    for topic in event.topics]
        if isinstance(event, Error):
            return [encode_error(event)] if event.id is not None else []
        if isinstance(event, (Ponged, RefreshNeeded)):
            # No such command; the SDKs refresh their token by themselves before the ttl they were told ends.
            return []
        raise TypeError(f"no frame for {event!r}")

    def _subscribed(self, event: Started) -> bytes:
        """The subscribe reply once history was read: the position, and what was recovered."""
        result = b'{"id":' + str(event.command.id).encode() + b',"subscribe":{'
        fields: list[bytes] = []
        if event.top is not None:
            epoch, seq = event.top
            fields += [b'"recoverable":true', b'"positioned":true', b'"epoch":' + json.dumps(epoch).encode(),
                       b'"offset":' + str(seq).encode()]
        if event.recovering:
            fields += [b'"was_recovering":true', b'"recovered":' + (b"false" if event.failure else b"true")]
        if event.replay:
            fields.append(b'"publications":' + _publications(event.replay))
        return result + b",".join(fields) + b"}}"

    def publication(self, topic: str, payload: bytes, position: Position | None) -> bytes:
        # Valid topic names hold no character JSON would escape, so quoting is enough.
        return b'{"push":{"channel":"' + topic.encode() + b'","pub":' + _publication(position, payload) + b"}}"

    def message(self, payload: bytes) -> bytes:
        return b'{"push":{"message":{"data":' + _data(payload) + b"}}}"

    def broadcast(self, broadcast_id: str, payload: bytes) -> bytes:
        # Centrifugo has no broadcast to every connection; its SDKs deliver this as a `message` event.
        return self.message(payload)

    def close(self, reason: Disconnect, detail: str) -> tuple[int, str]:
        code, text = CLOSE_CODES[reason]
        return code, text if not detail or detail == text else f"{text}: {detail}"


CODEC = CentrifugoCodec()
