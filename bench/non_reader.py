"""What one hostile client costs a pushd node: RSS growth and another client's round trip (docs/performance.md).

Starts a redis-server and one pushd node on plain ws (as the integration tests do), measures another client's
ping round trip, then lets a client that never reads send frames for SECONDS seconds (or until the node drops it),
sampling the node's RSS and the other client's round trip meanwhile. Extra arguments after `--` go to
`twistd pushd`.

    python bench/non_reader.py                    # {"op":"ping","id":...} text frames, 60 s at most
    python bench/non_reader.py --ws-ping 30       # WebSocket ping frames, 30 s at most
    python bench/non_reader.py --headers          # an upgrade request whose headers never end (8 in parallel)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.hostile import (
    APP_PING,
    PING,
    PING_PAYLOAD,
    TEXT,
    endless_headers,
    flood,
    open_non_reader,
    rss_kib,
)
from tests.integration.pushd_process import Client, PushdProcess
from tests.redis_server import RedisServer


def round_trip_ms(client: Client, count: int = 20) -> float:
    """The median time of `count` native pings answered."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        reply = client.request({"op": "ping"})
        assert reply.get("op") == "pong", reply
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv: list[str]) -> int:
    pushd_args = argv[argv.index("--") + 1:] if "--" in argv else []
    options = argv[:argv.index("--")] if "--" in argv else argv
    numbers = [float(o) for o in options if o.replace(".", "", 1).isdigit()]
    seconds = numbers[0] if numbers else 60.0
    with RedisServer() as redis, tempfile.TemporaryDirectory() as directory:
        # Heartbeats every second, so the node's record (its drop counters) is current when read at the end.
        node = PushdProcess(Path(directory), "--heartbeat-interval", "1", *pushd_args, redis=redis.url,
                            tls=False).start()
        try:
            other = node.client()
            start_rss, start_rtt = rss_kib(node.pid), round_trip_ms(other)
            samples: list[tuple[float, int, float]] = []
            outcome: dict[str, float | None] = {}
            stop = threading.Event()
            if "--headers" in options:
                requests = [0]

                def attack() -> None:
                    while not stop.is_set():
                        try:
                            endless_headers(node.url, 64 << 20)
                        except OSError:
                            return
                        requests[0] += 1
                workers = [threading.Thread(target=attack, daemon=True) for _ in range(8)]
                what = "8 clients sending endless upgrade headers"
            else:
                opcode, payload, what = (PING, PING_PAYLOAD, "WebSocket ping frames") if "--ws-ping" in options \
                    else (TEXT, APP_PING, '{"op":"ping","id":...} text frames')
                sock = open_non_reader(node.url)

                def attack() -> None:
                    outcome["dropped_after"] = flood(sock, opcode, payload, seconds)
                workers = [threading.Thread(target=attack, daemon=True)]
            started = time.monotonic()
            for worker in workers:
                worker.start()
            while any(w.is_alive() for w in workers) and time.monotonic() - started < seconds:
                time.sleep(1)
                samples.append((time.monotonic() - started, rss_kib(node.pid), round_trip_ms(other, 5)))
            stop.set()
            for worker in workers:
                worker.join(10)
            end_rss, end_rtt = rss_kib(node.pid), round_trip_ms(other)
            time.sleep(2)
            _, info = node.api("GET", "/api/nodes")
            dropped_counts = info["nodes"][0]["pruned"]
            other.close()
        finally:
            node.stop()
    peak = max((s[1] for s in samples), default=end_rss)
    during = statistics.median([s[2] for s in samples]) if samples else end_rtt
    sys.stdout.write(f"hostile client: {what} (pushd args: {' '.join(pushd_args) or 'none'})\n")
    for at, rss, rtt in samples:
        sys.stdout.write(f"  t={at:5.1f} s  RSS {rss / 1024:6.1f} MB  other client's round trip {rtt:6.2f} ms\n")
    dropped = outcome.get("dropped_after")
    if "--headers" in options:
        sys.stdout.write(f"  {requests[0]} requests ended (answered or cut) in {seconds:.0f} s\n")
    else:
        sys.stdout.write("  dropped after " + (f"{dropped:.1f} s" if dropped is not None else "never (gave up)") + "\n")
    sys.stdout.write(f"RSS: {start_rss / 1024:.1f} MB at start, {peak / 1024:.1f} MB peak, {end_rss / 1024:.1f} MB "
                     f"at the end\nother client's round trip: {start_rtt:.2f} ms before, {during:.2f} ms during "
                     f"(median), {end_rtt:.2f} ms after\ndropped (pruned): {dropped_counts}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
