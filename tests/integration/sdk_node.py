"""A real pushd node for the tests that run Centrifugo's official SDKs against it (centrifuge-python, centrifuge-js).

The node listens with TLS on a port the test picks (so a restarted node comes back where its clients reconnect),
uses the test's own redis-server, checks HS256 tokens signed with `SECRET`, and keeps history for every topic.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt

from pushd.redis.history import PUBLISH_SCRIPT
from tests.integration.pushd_process import PushdProcess
from tests.redis_server import free_port

SECRET = "an-sdk-test-secret-of-32-bytes!!"
#: pushd's default key prefix, and the history every API publish gets here.
PREFIX = "pushd:"
HISTORY = ("--history-size", "100", "--history-ttl", "300")


def token(sub: str = "alice", ttl: float = 3600, **claims: Any) -> str:
    """A connection token for `sub` that expires `ttl` seconds from now (in the past when negative)."""
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl), **claims}, SECRET, algorithm="HS256")


class SdkNode(PushdProcess):
    """A node on 127.0.0.1:`port` (a free one when None), with tokens and history; a restart keeps the port."""

    def __init__(self, workdir: Path, redis_url: str, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        super().__init__(workdir, "--jwt-secret", SECRET, *HISTORY, *args, redis=redis_url, listen=False)
        self.argv += ["--listen", f"ssl:{self.port}:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"]

    @property
    def centrifugo_url(self) -> str:
        """The Centrifugo endpoint, by the name the node's certificate holds."""
        return f"wss://localhost:{self.port}/connection/websocket"


def publish_in_redis(redis_client: Any, topic: str, payload: str) -> int:
    """Publish with history straight through Redis, as a publisher without pushd's API does; returns the offset."""
    _, _, seq = redis_client.eval(PUBLISH_SCRIPT, 2, f"{PREFIX}history:{topic}", f"{PREFIX}meta:{topic}",
                                  f"{PREFIX}pub:{topic}", payload, "100", "300")
    return int(seq)


def forget_history(redis_client: Any, topic: str) -> None:
    """What a Redis that lost its data does to a topic: its stream and its epoch are gone."""
    redis_client.delete(f"{PREFIX}history:{topic}", f"{PREFIX}meta:{topic}")


def append_unpublished(redis_client: Any, topic: str, payload: str) -> int:
    """A message that reached history but never the nodes (a publisher that died between the two, a lost
    PUBLISH): the next message's offset jumps past it. Returns its offset."""
    seq = int(redis_client.hincrby(f"{PREFIX}meta:{topic}", "seq", 1))
    redis_client.xadd(f"{PREFIX}history:{topic}", {"d": payload, "n": seq})
    return seq
