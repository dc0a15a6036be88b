"""A webhook receiver as pushd's webhook gateway expects one (pushd/gateways/webhook.py): it checks the signature
and the replay window, counts every recipient by idempotency key (so duplicates are visible), and can be told to
misbehave: report every Nth address invalid, answer 503 with Retry-After, be slow.

    python -m tests.fakes.webhook --port 0 --secret S [--invalid-every N] [--fail-first N] [--latency MS]
        [--slow-first N]

prints `{"url": "http://127.0.0.1:PORT/hook"}` once listening; `GET /stats` answers the counters as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import sys
import time
from typing import Any

from twisted.internet import defer, task
from twisted.web import resource, server

from tests.fakes.process import FakeProcess

#: Seconds a timestamp may be off, as a careful receiver would allow.
REPLAY_WINDOW = 300


class Receiver(resource.Resource):
    isLeaf = True

    def __init__(self, secret: str, *, clock: Any = None, invalid_every: int = 0, fail_first: int = 0,
                 latency_ms: int = 0, slow_first: int = 0, now: Any = time.time) -> None:
        super().__init__()
        self.secret = secret.encode()
        self.clock = clock
        self.invalid_every = invalid_every
        self.fail_first = fail_first
        self.latency = latency_ms / 1000
        #: Only the first N requests are slow (0: all of them).
        self.slow_first = slow_first
        self.now = now
        self.requests = 0
        self.refused = 0
        self.recipients = 0
        self.keys: set[str] = set()
        self.duplicates = 0
        self.bodies: list[dict[str, Any]] = []
        self.keep_bodies = False

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "refused": self.refused, "recipients": self.recipients,
                "unique": len(self.keys), "duplicates": self.duplicates}

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.stats()).encode()

    def render_POST(self, request: Any) -> Any:
        self.requests += 1
        body = request.content.read()
        timestamp = (request.getHeader(b"x-pushd-timestamp") or b"").decode()
        signature = (request.getHeader(b"x-pushd-signature") or b"").decode()
        expected = "sha256=" + hmac.new(self.secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature, expected) or not timestamp.isdigit() \
                or abs(self.now() - int(timestamp)) > REPLAY_WINDOW:
            self.refused += 1
            request.setResponseCode(401)
            return b'{"error": "bad signature or timestamp"}'
        if self.fail_first > 0:
            self.fail_first -= 1
            request.setResponseCode(503)
            request.setHeader(b"retry-after", b"1")
            return b""
        batch = json.loads(body)
        if self.keep_bodies:
            self.bodies.append(batch)
        results = []
        for message in batch["messages"]:
            self.recipients += 1
            key = message["key"]
            if key in self.keys:
                self.duplicates += 1
            self.keys.add(key)
            if self.invalid_every and self.recipients % self.invalid_every == 0:
                results.append({"key": key, "status": "invalid", "reason": "unknown-number"})
        reply = json.dumps({"results": results}).encode()
        request.setHeader(b"content-type", b"application/json")
        if not self.latency or self.clock is None or (self.slow_first and self.requests > self.slow_first):
            return reply

        def answer() -> None:
            if not request.finished and not getattr(request, "_disconnected", False):
                request.write(reply)
                request.finish()

        task.deferLater(self.clock, self.latency, answer).addErrback(lambda _: None)
        return server.NOT_DONE_YET


class FakeWebhookProcess(FakeProcess):
    """The receiver as a process of its own (bench, integration tests); stopped by PID."""

    module = "tests.fakes.webhook"
    name = "webhook"

    def __init__(self, secret: str, *args: str) -> None:
        self.secret = secret
        super().__init__("--secret", secret, *args)
        self.url = ""

    def read_info(self, info: dict[str, Any]) -> None:
        self.url = info["url"]

    def start_failure(self) -> str:
        assert self.proc is not None
        return f"the fake webhook exited with {self.proc.returncode}"

    def stats(self) -> dict[str, int]:
        import urllib.request

        with urllib.request.urlopen(re.sub(r"/hook$", "/stats", self.url), timeout=10) as reply:
            return dict(json.load(reply))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--secret", required=True)
    p.add_argument("--invalid-every", type=int, default=0)
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--latency", type=int, default=0, help="milliseconds before each answer")
    p.add_argument("--slow-first", type=int, default=0, help="only the first N requests get --latency (0: all)")
    args = p.parse_args(argv)

    def run(reactor: Any) -> defer.Deferred[None]:
        receiver = Receiver(args.secret, clock=reactor, invalid_every=args.invalid_every, fail_first=args.fail_first,
                            latency_ms=args.latency, slow_first=args.slow_first)
        site = server.Site(receiver)
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        port = reactor.listenTCP(args.port, site, interface="127.0.0.1", backlog=1024)
        print(json.dumps({"url": f"http://127.0.0.1:{port.getHost().port}/hook"}), flush=True)
        done: defer.Deferred[None] = defer.Deferred()
        reactor.addSystemEventTrigger("before", "shutdown", lambda: done.callback(None) if not done.called else None)
        return done

    task.react(run)


if __name__ == "__main__":
    main(sys.argv[1:])
