"""Stream offsets, positions and the recovery seam, as pure functions (no Redis, no reactor)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Position:
    """Where a message sits in its topic's history: the Redis Stream entry id and the history's epoch."""

    offset: str
    epoch: str
