"""Topic patterns (`sh600*`, `orders.eu.*`, `sh60051?`): their rules, and the index from a published topic to the
subscribers of every pattern matching it.

Finding recipients runs once per published message, so it must not scan all patterns: patterns are indexed by
their literal prefix (a miss costs one dict lookup per distinct prefix length), and each topic's answer is cached
as a tuple of the patterns' live subscriber sets, so subscribing to a pattern that already exists changes no
cached answer.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from functools import lru_cache
from typing import Generic, TypeAlias, TypeVar

#: The wildcards: `*` is any run of characters (possibly none, `.` included), `?` is exactly one character.
PATTERN_CHARACTERS = "*?"
# pushd.protocol's topic alphabet plus the wildcards, spelled out here because protocol imports this module.
_ALPHABET = "A-Z a-z 0-9 _ - . : @ / = + ~ * ?"
_PATTERN_RE = re.compile(r"[A-Za-z0-9_\-.:@/=+~*?]+")

T = TypeVar("T")

#: fullmatch of a compiled pattern, or None when the literal prefix alone decides (the pattern is `prefix*`).
_Matcher: TypeAlias = Callable[[str], re.Match[str] | None] | None


def is_pattern(topic: str) -> bool:
    """True when `topic` holds a wildcard, so it names a pattern subscription and not one topic."""
    return "*" in topic or "?" in topic


def pattern_error(pattern: str, max_length: int) -> str | None:
    """Why `pattern` is not a valid pattern, or None when it is.

    `*` alone is valid (every topic): permissions, not syntax, decide who may use broad patterns. `**` is refused
    because it means the same as `*`, and one meaning should be one pattern in the index.
    """
    if not pattern:
        return "patterns must not be empty"
    if len(pattern) > max_length:
        return f"pattern {pattern[:32]!r}... is longer than {max_length} characters"
    if _PATTERN_RE.fullmatch(pattern) is None:
        return f"pattern {pattern[:64]!r} has characters outside {_ALPHABET}"
    if not is_pattern(pattern):
        return f"pattern {pattern!r} has no * or ?; subscribe to it as a topic"
    if "**" in pattern:
        return f"pattern {pattern[:64]!r} has '**'; one * already matches any run of characters"
    return None


def matches(pattern: str, topic: str) -> bool:
    """Whether `topic` matches `pattern`: fnmatch.fnmatchcase with only `*` and `?` special."""
    return _compile(pattern)(topic) is not None


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> Callable[[str], re.Match[str] | None]:
    # Every piece between stars has a fixed length, so its leftmost occurrence is always a right choice: the
    # atomic group commits to it, which keeps `*a*a*a*b` linear instead of backtracking polynomially.
    pieces = [re.escape(piece).replace(r"\?", ".") for piece in pattern.split("*")]
    if len(pieces) == 1:
        return re.compile(pieces[0], re.DOTALL).fullmatch
    middle = "".join(f"(?>.*?{piece})" for piece in pieces[1:-1] if piece)
    return re.compile(f"{pieces[0]}{middle}.*{pieces[-1]}", re.DOTALL).fullmatch


def _literal_prefix(pattern: str) -> str:
    """The text before the first wildcard: every topic the pattern matches starts with it."""
    for i, character in enumerate(pattern):
        if character in PATTERN_CHARACTERS:
            return pattern[:i]
    return pattern


class PatternIndex(Generic[T]):
    """pattern -> subscribers, and topic -> the subscriber sets of every pattern matching it.

    Patterns are expected to have passed `pattern_error`. The per-topic cache is cleared whenever a pattern
    appears or disappears: patching it in place would test the new pattern against every cached topic (up to
    `max_cached_topics` regex calls inside one subscribe), while clearing costs each later topic one miss, which
    the prefix index keeps cheap. When the cache is full it is cleared too, so high-cardinality topic streams
    cost bounded memory.
    """

    def __init__(self, max_cached_topics: int = 100_000) -> None:
        self.max_cached_topics = max_cached_topics
        self._subscribers: dict[str, set[T]] = {}
        self._by_prefix: dict[str, dict[str, tuple[_Matcher, set[T]]]] = {}
        self._prefix_lengths: Counter[int] = Counter()
        #: Distinct prefix lengths, ascending: a miss looks up only these prefixes of the topic.
        self._lengths: tuple[int, ...] = ()
        self._cache: dict[str, tuple[set[T], ...]] = {}

    def add(self, pattern: str, subscriber: T) -> bool:
        """Subscribe `subscriber` to `pattern`; True when the pattern was new to the index."""
        subscribers = self._subscribers.get(pattern)
        if subscribers is not None:
            subscribers.add(subscriber)
            return False
        subscribers = {subscriber}
        self._subscribers[pattern] = subscribers
        prefix = _literal_prefix(pattern)
        matcher: _Matcher = None if pattern == prefix + "*" else _compile(pattern)
        self._by_prefix.setdefault(prefix, {})[pattern] = (matcher, subscribers)
        if self._prefix_lengths[len(prefix)] == 0:
            self._lengths = tuple(sorted((*self._lengths, len(prefix))))
        self._prefix_lengths[len(prefix)] += 1
        self._cache.clear()
        return True

    def discard(self, pattern: str, subscriber: T) -> bool:
        """Unsubscribe `subscriber` from `pattern`; True when it was the last one and the pattern is gone."""
        subscribers = self._subscribers.get(pattern)
        if subscribers is None or subscriber not in subscribers:
            return False
        subscribers.discard(subscriber)
        if subscribers:
            return False
        del self._subscribers[pattern]
        prefix = _literal_prefix(pattern)
        group = self._by_prefix[prefix]
        del group[pattern]
        if not group:
            del self._by_prefix[prefix]
        self._prefix_lengths[len(prefix)] -= 1
        if self._prefix_lengths[len(prefix)] == 0:
            del self._prefix_lengths[len(prefix)]
            self._lengths = tuple(n for n in self._lengths if n != len(prefix))
        self._cache.clear()
        return True

    def matching(self, topic: str) -> tuple[set[T], ...]:
        """The live subscriber sets of all patterns matching `topic`; () when none do.

        The sets are the index's own: read them, never change them.
        """
        found = self._cache.get(topic)
        if found is not None:
            return found
        found = self._find(topic)
        if self.max_cached_topics > 0:
            if len(self._cache) >= self.max_cached_topics:
                self._cache.clear()
            self._cache[topic] = found
        return found

    def _find(self, topic: str) -> tuple[set[T], ...]:
        found: list[set[T]] = []
        by_prefix = self._by_prefix
        size = len(topic)
        for length in self._lengths:
            if length > size:
                break
            group = by_prefix.get(topic[:length])
            if group is not None:
                for matcher, subscribers in group.values():
                    if matcher is None or matcher(topic) is not None:
                        found.append(subscribers)
        return tuple(found) if found else ()

    def subscribers(self, pattern: str) -> AbstractSet[T]:
        """Who is subscribed to exactly `pattern` (not to patterns it overlaps); empty when nobody is."""
        return self._subscribers.get(pattern, frozenset())

    def patterns(self) -> tuple[str, ...]:
        """Every pattern someone is subscribed to."""
        return tuple(self._subscribers)

    def __bool__(self) -> bool:
        return bool(self._subscribers)

    def __len__(self) -> int:
        return len(self._subscribers)
