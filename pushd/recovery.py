"""Stream offsets, positions and the recovery seam, as pure functions (no Redis, no reactor).

A reconnecting client is given what it missed from history, then live messages; `stitch` joins the two so
that nothing is lost or repeated where they overlap. A client names where it stopped by stream offset (pushd's
own protocol) or by message number (Centrifugo's); both orders are the stream's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

#: Both halves of a Redis Stream id are unsigned 64-bit integers.
MAX_PART = 2**64 - 1

T = TypeVar("T")

_OFFSET = re.compile(r"([0-9]{1,20})-([0-9]{1,20})", re.ASCII)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a message sits in its topic's history: its stream entry id, the history's epoch and its number."""

    offset: str
    epoch: str
    #: The message's number in this epoch of the topic's history: 1, 2, 3, ... without gaps, what Centrifugo's
    #: protocol calls an offset. 0 when unknown (an envelope from a publisher that does not number messages).
    seq: int = 0


@dataclass(frozen=True, slots=True)
class OffsetSince:
    """A client's last position as pushd's own protocol names it: a stream entry id and its epoch."""

    offset: str
    epoch: str


@dataclass(frozen=True, slots=True)
class SeqSince:
    """A client's last position as Centrifugo's protocol names it: a message number and its epoch."""

    seq: int
    epoch: str


#: Where a recovering client says it stopped.
Since = OffsetSince | SeqSince


def offset_key(offset: str) -> tuple[int, int]:
    """(ms, seq) of an "ms-seq" offset, which orders offsets the way Redis does; ValueError for anything else."""
    match = _OFFSET.fullmatch(offset) if isinstance(offset, str) else None
    if match is None:
        raise ValueError(f"{offset!r} is not a stream offset (MILLISECONDS-SEQUENCE, e.g. '1700000000000-0')")
    ms, seq = int(match[1]), int(match[2])
    if ms > MAX_PART or seq > MAX_PART:
        raise ValueError(f"{offset!r} is not a stream offset (each part is at most {MAX_PART})")
    return ms, seq


def is_offset(text: object) -> bool:
    """True if `text` is a string `offset_key` accepts."""
    if not isinstance(text, str):
        return False
    try:
        offset_key(text)
    except ValueError:
        return False
    return True


def order_key(since: Since) -> Callable[[Position | None], tuple[int, int] | None]:
    """How positions compare for a client recovering from `since`: by stream offset or by message number.

    None for a position that cannot be placed (no history, or no number): such a message is always new.
    """
    if isinstance(since, SeqSince):
        return lambda p: (p.seq, 0) if p is not None and p.seq else None
    return lambda p: offset_key(p.offset) if p is not None else None


def since_key(since: Since) -> tuple[int, int]:
    """`since` in the order `order_key` gives positions."""
    return (since.seq, 0) if isinstance(since, SeqSince) else offset_key(since.offset)


def stitch(since: Since, replayed: Sequence[Position], held: Sequence[tuple[Position | None, T]]) -> list[T]:
    """The live messages to write after the replay to a recovering connection, in arrival order.

    replayed: the positions of what history gave, strictly after `since`, in stream order (written first).
    held: (position or None, item) of live messages that arrived for this topic while the history was being
    read, in arrival order; None = a message without history (a plain Redis PUBLISH).
    Result: the held items whose position is after max(since, last replayed), plus those that cannot be placed,
    keeping arrival order. Together with the replay: no message twice, none lost.
    """
    key = order_key(since)
    seen = since_key(since)
    if replayed:
        last = key(replayed[-1])
        if last is not None:
            seen = max(seen, last)
    # The live hold starts before the read, so held messages up to `seen` are the ones the replay already has.
    fresh = []
    for position, item in held:
        placed = key(position)
        if placed is None or placed > seen:
            fresh.append(item)
    return fresh
