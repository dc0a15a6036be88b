#!/usr/bin/env python3
"""How many times a published message is encoded, per wire protocol, when its subscribers speak both.

The hub frames a message once per wire variant and writes the same bytes to every subscriber of that variant
(pushd/hub.py), so serving Centrifugo's protocol beside pushd's own should cost one more encode per message,
never one per subscriber. This counts it: N subscribers of one topic in memory (`pushd.testing.MemoryNode`,
the real factory, sessions and hub; no sockets), split between the two protocols, get M messages, one at a
time and in batches (as the Redis listener hands them over), with and without a history position; then a
broadcast to every connection. Every call of each codec's `publication` and `broadcast` is counted, and every
client's frames are checked: each got every message once, in its own protocol.

    python bench/encode_count.py                          # 1,000 subscribers, 100 messages per case
    python bench/encode_count.py --subscribers 10000 --messages 20
    python bench/encode_count.py --time                   # also: microseconds per encode, per wire

Exit status 0 when every case encoded exactly once per message per protocol present and every client got
everything; 1 otherwise.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import timeit
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import task

from pushd.broadcast import NodeBroadcast
from pushd.hub import FrameCache
from pushd.recovery import Position
from pushd.testing import MemoryClient, MemoryNode
from pushd.wire import centrifugo, native
from pushd.ws import CENTRIFUGO, NATIVE

TOPIC = "t0"
PATHS = {"pushd": "/ws", "centrifugo": "/connection/websocket"}


class EncodeCounter:
    """Counts calls of the codecs' per-message encoders (wrapped on the codec instances the wires use)."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        for codec in (native.CODEC, centrifugo.CODEC):
            for method in ("publication", "broadcast"):
                setattr(codec, method, self._counting(codec.name, method, getattr(codec, method)))

    def _counting(self, wire: str, method: str, encode: Callable[..., bytes]) -> Callable[..., bytes]:
        def counted(*args: Any) -> bytes:
            self.calls[wire, method] += 1
            return encode(*args)
        return counted

    def take(self) -> Counter[tuple[str, str]]:
        calls, self.calls = self.calls, Counter()
        return calls


def open_clients(node: MemoryNode, counts: dict[str, int]) -> list[tuple[str, MemoryClient]]:
    """Connected clients subscribed to TOPIC, `counts[wire]` of each wire."""
    clients = []
    for wire, count in counts.items():
        for _ in range(count):
            client = node.connect(PATHS[wire])
            if wire == "centrifugo":
                client.send({"id": 1, "connect": {}})
                client.send({"id": 2, "subscribe": {"channel": TOPIC}})
            else:
                client.send({"op": "subscribe", "topics": [TOPIC]})
            client.messages()
            clients.append((wire, client))
    return clients


def received(wire: str, client: MemoryClient) -> tuple[list[int], int]:
    """The sequence numbers of the publications `client` got, and how many broadcasts."""
    seqs, broadcasts = [], 0
    for message in client.messages():
        if wire == "pushd":
            if message.get("op") == "broadcast":
                broadcasts += 1
            elif message.get("topic") == TOPIC:
                seqs.append(message["data"]["s"])
        elif "pub" in message.get("push", {}):
            seqs.append(message["push"]["pub"]["data"]["s"])
        elif "message" in message.get("push", {}):
            broadcasts += 1
    return seqs, broadcasts


def publish_all(node: MemoryNode, messages: int, batch: int, positioned: bool, start: int) -> None:
    """`messages` publications of TOPIC, `batch` per listener read (1: each on its own)."""
    for first in range(0, messages, batch):
        if batch > 1:
            node.hub.begin_batch()
        for s in range(first, min(messages, first + batch)):
            seq = start + s + 1
            position = Position(f"1700000000000-{seq}", "1700000000000000", seq) if positioned else None
            node.publish(TOPIC, json.dumps({"s": s, "p": "x" * 40}).encode(), position)
        if batch > 1:
            node.hub.flush()


def broadcast(node: MemoryNode) -> None:
    """One broadcast to every connection, through the node's own broadcast writer, run to its end."""
    cooperator = task.Cooperator(terminationPredicateFactory=lambda: (lambda: True),
                                 scheduler=lambda step: node.clock.callLater(0, step))
    done = NodeBroadcast("b1", FrameCache(lambda wire: wire.broadcast("b1", b'{"note":"hello"}')), node.hub,
                         lambda _: None, cooperator).start()
    finished: list[object] = []
    done.addBoth(finished.append)
    while not finished:
        node.clock.advance(0)


def cases() -> Iterator[tuple[str, int, bool]]:
    yield "one message per read, no history", 1, False
    yield "one message per read, with a position", 1, True
    yield "batches of 32 per read, with a position", 32, True


def run(subscribers: int, messages: int) -> tuple[list[dict[str, Any]], bool]:
    counter = EncodeCounter()
    mixes = {"pushd only": {"pushd": subscribers}, "centrifugo only": {"centrifugo": subscribers},
             "half and half": {"pushd": subscribers // 2, "centrifugo": subscribers - subscribers // 2}}
    rows: list[dict[str, Any]] = []
    ok = True
    for mix, counts in mixes.items():
        node = MemoryNode()
        clients = open_clients(node, counts)
        counter.take()
        published = 0
        for case, batch, positioned in cases():
            publish_all(node, messages, batch, positioned, published)
            published += messages
            calls = counter.take()
            got = [received(wire, client) for wire, client in clients]
            complete = all(seqs == list(range(messages)) and not b for seqs, b in got)
            encodes = {wire: calls[wire, "publication"] for wire in counts}
            exact = all(n == messages for n in encodes.values()) and sum(calls.values()) == sum(encodes.values())
            ok = ok and complete and exact
            rows.append({"mix": mix, "case": case, "messages": messages, "subscribers": counts,
                         "encodes": encodes, "deliveries": sum(len(seqs) for seqs, _ in got),
                         "every_client_got_every_message": complete, "one_encode_per_message_per_wire": exact})
        broadcast(node)
        calls = counter.take()
        got = [received(wire, client) for wire, client in clients]
        complete = all(b == 1 and not seqs for seqs, b in got)
        encodes = {wire: calls[wire, "broadcast"] for wire in counts}
        exact = all(n == 1 for n in encodes.values()) and sum(calls.values()) == sum(encodes.values())
        ok = ok and complete and exact
        rows.append({"mix": mix, "case": "one broadcast to every connection", "messages": 1, "subscribers": counts,
                     "encodes": encodes, "deliveries": sum(b for _, b in got),
                     "every_client_got_every_message": complete, "one_encode_per_message_per_wire": exact})
    return rows, ok


def encode_cost(calls: int = 20_000, repeats: int = 7) -> dict[str, float]:
    """Microseconds one publication frame takes to make, per wire (median of `repeats` runs of `calls`)."""
    payload = json.dumps({"s": 1, "p": "x" * 40}).encode()
    position = Position("1700000000000-1", "1700000000000000", 1)
    costs = {}
    for wire in (NATIVE, CENTRIFUGO):
        runs = timeit.repeat(functools.partial(wire.publication, TOPIC, payload, position), number=calls,
                             repeat=repeats)
        costs[wire.name] = round(statistics.median(runs) / calls * 1e6, 2)
    return costs


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subscribers", type=int, default=1000, help="subscribers of the one topic (at least 2)")
    p.add_argument("--messages", type=int, default=100, help="messages per case")
    p.add_argument("--time", action="store_true",
                   help="also time one publication encode per wire (a 64-byte JSON payload with a position)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = p.parse_args(argv)
    if args.subscribers < 2 or args.messages < 1:
        p.error("--subscribers must be at least 2 and --messages at least 1")
    costs = encode_cost() if args.time else None  # before the counters wrap the encoders
    rows, ok = run(args.subscribers, args.messages)
    if args.json:
        print(json.dumps({"ok": ok, "rows": rows, "encode_us": costs}, indent=2))
        return 0 if ok else 1
    print(f"{'clients':<16} {'case':<52} {'subscribers':>22} {'encodes':>26} {'deliveries':>10}  ok")
    for row in rows:
        subs = " + ".join(f"{n} {wire}" for wire, n in row["subscribers"].items())
        encodes = " + ".join(f"{n} {wire}" for wire, n in row["encodes"].items())
        good = row["every_client_got_every_message"] and row["one_encode_per_message_per_wire"]
        print(f"{row['mix']:<16} {row['case']:<52} {subs:>22} {encodes:>26} {row['deliveries']:>10,}  "
              f"{'yes' if good else 'NO'}")
    if costs is not None:
        print("one publication frame (WebSocket header included): "
              + ", ".join(f"{wire} {us} µs" for wire, us in costs.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
