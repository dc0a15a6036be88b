"""Count wss opening handshakes to one pushd node that stall (README, "Known issues").

Starts a redis-server and one pushd node (as the integration tests do), then opens and closes COUNT WebSocket
connections one after another with Python's `websockets` client, each with a 3-second opening deadline, and
prints every stall and the total. Extra arguments after `--` go to `twistd pushd`.

    python bench/handshake_stall.py 1500                          # wss, default settings
    python bench/handshake_stall.py 1500 --plain                  # ws over plain TCP
    python bench/handshake_stall.py 1500 -- --ping-interval 0     # wss without server pings
    python bench/handshake_stall.py 20000 --threaded-reader       # the stock client: shows the client-side race
"""

from __future__ import annotations

import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from websockets.sync.client import connect

from tests.integration.pushd_process import PushdProcess, RequestFirstConnection
from tests.redis_server import RedisServer


def main(argv: list[str]) -> int:
    pushd_args = argv[argv.index("--") + 1:] if "--" in argv else []
    options = argv[:argv.index("--")] if "--" in argv else argv
    count = int(options[0]) if options else 600
    plain = "--plain" in options
    # --threaded-reader: the stock sync client, whose reader thread may be in SSL_read while the request is written
    client = {} if "--threaded-reader" in options else {"create_connection": RequestFirstConnection}
    stalls = 0
    with RedisServer() as redis, tempfile.TemporaryDirectory() as directory:
        node = PushdProcess(Path(directory), *pushd_args, redis=redis.url, tls=not plain).start()
        url = node.url.replace("//localhost:", "//127.0.0.1:")
        tls = {} if plain else {"ssl": ssl.create_default_context(cafile=node.cert), "server_hostname": "localhost"}
        try:
            for attempt in range(count):
                started = time.monotonic()
                try:
                    connect(url, open_timeout=3, legacy=True, **client, **tls).close()
                except Exception as e:
                    stalls += 1
                    sys.stdout.write(f"stall at connection {attempt}: {type(e).__name__}: {e} "
                                     f"after {time.monotonic() - started:.2f} s\n")
        finally:
            node.stop()
    sys.stdout.write(f"{stalls} of {count} {'ws' if plain else 'wss'} opening handshakes stalled "
                     f"(pushd args: {' '.join(pushd_args) or 'none'})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
