"""What finding a published message's pattern subscribers costs, next to an exact-topic dict lookup.

Single process, no network: 10,000 subscriptions (10 subscribers each on 1,000 distinct patterns, half `sym{i}*`,
half `grp.{i}.*`) in a `PatternIndex`, against 10,000 exact subscriptions (10 each on 1,000 topics) in a dict.
A stream of 200,000 published topics is drawn from 1,000 and from 100,000 distinct topics; the second makes
cache misses, and with a cache smaller than the topic count, cache clears. "cold" is a first pass over the
stream from an empty cache, "warm" a second pass over the same stream; both are µs per message, loop included
(the "loop only" row is that overhead), best of 3. Runs in about 10 s:

    python bench/patterns.py
"""

from __future__ import annotations

import datetime
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pushd.patterns import PatternIndex

MESSAGES = 200_000
PATTERNS = 1_000
SUBSCRIBERS_PER_KEY = 10
#: Each figure is the best of this many runs, each with a fresh index, so "cold" really starts empty.
REPEATS = 3


def topic(n: int) -> str:
    """The n-th distinct topic: a third `sym…`, a third `grp.….…`, a third matching no pattern at all."""
    kind, i = divmod(n, 3)[1], n // 3
    if kind == 0:
        return f"sym{i}"
    if kind == 1:
        return f"grp.{i % (2 * PATTERNS)}.{i}"
    return f"trade.{i}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def stream(distinct: int) -> list[str]:
    rng = random.Random(distinct)
    names = [topic(n) for n in range(distinct)]
    return [names[rng.randrange(distinct)] for _ in range(MESSAGES)]


def pattern_index(max_cached_topics: int) -> PatternIndex[int]:
    index: PatternIndex[int] = PatternIndex(max_cached_topics)
    subscriber = 0
    for i in range(PATTERNS // 2):
        for pattern in (f"sym{i}*", f"grp.{i}.*"):
            for _ in range(SUBSCRIBERS_PER_KEY):
                index.add(pattern, subscriber)
                subscriber += 1
    return index


def exact_index() -> dict[str, set[int]]:
    topics: dict[str, set[int]] = {}
    for n in range(PATTERNS):
        topics[topic(n)] = set(range(n * SUBSCRIBERS_PER_KEY, (n + 1) * SUBSCRIBERS_PER_KEY))
    return topics


def per_message(run: Callable[[list[str]], int], topics: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    found = run(topics)
    return (time.perf_counter() - start) / len(topics) * 1e6, found


def loop_only(topics: list[str]) -> int:
    found = 0
    for name in topics:
        if name:
            found += 1
    return found


def exact_run(index: dict[str, set[int]]) -> Callable[[list[str]], int]:
    def run(topics: list[str]) -> int:
        found = 0
        get = index.get
        for name in topics:
            subscribers = get(name)
            if subscribers:
                found += 1
        return found
    return run


def pattern_run(index: PatternIndex[int]) -> Callable[[list[str]], int]:
    def run(topics: list[str]) -> int:
        found = 0
        matching = index.matching
        for name in topics:
            if index and matching(name):
                found += 1
        return found
    return run


def main() -> None:
    started = time.perf_counter()
    build_start = time.perf_counter()
    pattern_index(100_000)
    build_ms = (time.perf_counter() - build_start) * 1e3

    rows: list[tuple[str, int, float, float, float]] = []
    for distinct in (1_000, 100_000):
        topics = stream(distinct)
        cases: list[tuple[str, Callable[[], Callable[[list[str]], int]]]] = [
            ("loop only", lambda: loop_only),
            ("exact: dict topic -> set", lambda: exact_run(exact_index())),
            ("patterns, cache 100,000", lambda: pattern_run(pattern_index(100_000))),
            ("patterns, cache 10,000", lambda: pattern_run(pattern_index(10_000))),
            ("patterns, no cache (every message a miss)", lambda: pattern_run(pattern_index(0))),
        ]
        for name, make in cases:
            colds, warms = [], []
            for _ in range(REPEATS):
                run = make()
                cold, found = per_message(run, topics)
                warm, _ = per_message(run, topics)
                colds.append(cold)
                warms.append(warm)
            rows.append((name, distinct, min(colds), min(warms), found / len(topics)))

    out = sys.stdout
    out.write(f"pushd pattern matching, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n")
    out.write(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, "
              f"{platform.system()} {platform.release()}; Python {platform.python_version()}\n")
    out.write(f"{PATTERNS * SUBSCRIBERS_PER_KEY:,} subscriptions on {PATTERNS:,} patterns (index built in "
              f"{build_ms:.0f} ms), {MESSAGES:,} messages per pass\n\n")
    out.write(f"{'case':<44} {'topics':>8} {'cold µs/msg':>12} {'warm µs/msg':>12} {'with recipients':>16}\n")
    for name, distinct, cold, warm, share in rows:
        out.write(f"{name:<44} {distinct:>8,} {cold:>12.3f} {warm:>12.3f} {share:>15.0%}\n")
    out.write(f"\ntotal {time.perf_counter() - started:.1f} s\n")


if __name__ == "__main__":
    main()
