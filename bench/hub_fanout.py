#!/usr/bin/env python3
"""The hub's own CPU time per delivery, without sockets: what the hot path costs before any write.

N subscribers whose `write` does nothing get M messages through `Hub.publish`: all on one topic, one at a
time and in batches of 32 (`begin_batch`/`flush`, as the Redis listener hands them over); and spread over 32
topics, a batch holding one message of each (the latency scenario's shape: each subscriber gets one message
of the batch, the hub's per-connection path). The process CPU time per delivery is reported (median of
--repeat runs). `--source DIR` measures the pushd found in DIR, so two
commits compare on the same machine within a minute, e.g. before and after the Session/codec split:

    git worktree add /tmp/base 8b820c9
    python bench/hub_fanout.py --source /tmp/base
    python bench/hub_fanout.py
    python bench/hub_fanout.py --centrifugo-percent 50    # half the subscribers on Centrifugo's wire

Process CPU time, not wall time, so other load on a shared machine disturbs it less (it does not remove cache
effects). With `--centrifugo-percent`, the pushd measured must have `pushd.wire` (the Session/codec split).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class Subscriber:
    """The least a hub subscriber is: the write costs nothing, so only the hub's work is measured."""

    def __init__(self, conn_id: str, wire: Any) -> None:
        self.conn_id = conn_id
        self.topics: set[str] = set()
        self.wire = wire

    def write(self, data: bytes) -> bool:
        return True

    def drop(self, reason: str) -> None:
        raise AssertionError(f"dropped: {reason}")

    def lost(self, topic: str) -> None:
        raise AssertionError(f"lost {topic}")


def wires(percent: int) -> tuple[Any, Any]:
    """(pushd's own wire, Centrifugo's) of the measured pushd; (None, None) before wires existed."""
    try:
        from pushd.ws import CENTRIFUGO, NATIVE
    except ImportError:
        if percent:
            raise SystemExit("--centrifugo-percent: this pushd has no Centrifugo wire") from None
        return None, None
    return NATIVE, CENTRIFUGO


def measure(subscribers: int, messages: int, batch: int, percent: int, topics: int = 1) -> float:
    """CPU nanoseconds per delivery for `messages` publications to `subscribers` spread over `topics`."""
    from pushd.hub import Hub
    from pushd.recovery import Position

    native, centrifugo = wires(percent)
    hub = Hub()
    for i in range(subscribers):
        # percent% of the subscribers, spread evenly (as bench/loadgen.js does)
        wire = centrifugo if ((i + 1) * percent) // 100 > (i * percent) // 100 else native
        conn = Subscriber(f"n:{i}", wire)
        hub.add(conn)
        hub.subscribe(conn, [f"t{i % topics}"])
    payloads = [json.dumps({"s": s, "p": "x" * 40}).encode() for s in range(messages)]
    try:
        positions = [Position(f"1700000000000-{s}", "1700000000000000", s + 1) for s in range(messages)]
    except TypeError:  # a pushd from before message numbers: stream id and epoch only
        positions = [Position(f"1700000000000-{s}", "1700000000000000") for s in range(messages)]
    start = time.process_time()
    for first in range(0, messages, batch):
        if batch > 1:
            hub.begin_batch()
        for s in range(first, min(messages, first + batch)):
            hub.publish(f"t{s % topics}", payloads[s], positions[s // topics])
        if batch > 1:
            hub.flush()
    elapsed = time.process_time() - start
    deliveries = sum(hub.subscriber_count(f"t{s % topics}") for s in range(messages))
    assert hub.delivered == deliveries, (hub.delivered, deliveries)
    return elapsed / deliveries * 1e9


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=str(ROOT), help="directory holding the pushd package to measure")
    p.add_argument("--subscribers", type=int, default=10_000)
    p.add_argument("--messages", type=int, default=256, help="messages per run (a multiple of 32)")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--centrifugo-percent", type=int, default=0, choices=(0, 50, 100))
    args = p.parse_args(argv)
    sys.path.insert(0, args.source)
    import pushd

    results = {}
    cases = (("one topic, one message per write", 1, 1), ("one topic, 32 messages per write", 32, 1),
             ("32 topics, a batch of one message each", 32, 32))
    for name, batch, topics in cases:
        runs = [measure(args.subscribers, args.messages, batch, args.centrifugo_percent, topics)
                for _ in range(args.repeat)]
        results[name] = {"median_ns": round(statistics.median(runs), 1), "min_ns": round(min(runs), 1)}
    print(f"pushd from {Path(pushd.__file__).parent}, {args.subscribers} subscribers "
          f"({args.centrifugo_percent}% on Centrifugo's wire), {args.messages} messages, {args.repeat} runs:")
    for name, r in results.items():
        print(f"  {name}: {r['median_ns']} ns CPU per delivery (median; best {r['min_ns']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
