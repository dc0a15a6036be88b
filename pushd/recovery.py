"""Stream offsets, positions and the recovery seam, as pure functions (no Redis, no reactor).

A reconnecting client is given what it missed from history, then live messages; `stitch` joins the two so
that nothing is lost or repeated where they overlap.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

#: Both halves of a Redis Stream id are unsigned 64-bit integers.
MAX_PART = 2**64 - 1

_OFFSET = re.compile(r"([0-9]{1,20})-([0-9]{1,20})", re.ASCII)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a message sits in its topic's history: the Redis Stream entry id and the history's epoch."""

    offset: str
    epoch: str


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


def stitch(since: str, replay: Sequence[tuple[str, bytes]],
           held: Sequence[tuple[str | None, bytes]]) -> list[bytes]:
    """The frames to write to a recovering connection, in order.

    replay: (offset, frame) read from history, strictly after `since`, in stream order.
    held: (offset or None, frame) of live messages that arrived for this topic while the history was being
    read, in arrival order; None = a message without history (a plain Redis PUBLISH).
    Result: all replay frames, then the held frames whose offset is after max(since, last replayed offset),
    plus the held frames with no offset, keeping arrival order. No frame twice, none lost.
    """
    seen = offset_key(since)
    if replay:
        seen = max(seen, offset_key(replay[-1][0]))
    frames = [frame for _, frame in replay]
    # The live hold starts before the read, so held messages up to `seen` are the ones the replay already has.
    frames.extend(frame for offset, frame in held if offset is None or offset_key(offset) > seen)
    return frames
