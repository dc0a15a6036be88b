"""Redis faults against a real node: what the API acknowledged reaches every connected subscriber, or they are told.

Real processes only: a `twistd -n pushd` node, a redis-server killed with -9 and restarted on the same port (it
keeps no data), or the node's PSUBSCRIBE connection killed by Redis itself (`CLIENT KILL TYPE pubsub`, what
Redis does to a subscriber over its output buffer limit) while the command connection stays up.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.integration.pushd_process import Client, PushdProcess, eventually

CLIENTS = 8
#: Messages acknowledged before the fault, and after the node takes requests again.
BEFORE, AFTER = 50, 150


class Collector:
    """Reads every frame one client gets, on a thread, until stopped."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.frames: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = self.client.ws.recv(timeout=0.2)
            except TimeoutError:
                continue
            except Exception:
                return
            self.received(str(text))

    def received(self, text: str) -> None:
        self.frames.append(json.loads(text))

    def numbers(self, topic: str) -> list[int]:
        return [f["data"]["n"] for f in list(self.frames) if f.get("topic") == topic and "op" not in f]

    def missed(self) -> list[dict[str, Any]]:
        return [f for f in list(self.frames) if f.get("op") == "missed"]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


class CentrifugoCollector(Collector):
    """The same over Centrifugo's protocol (raw frames, as its SDKs send them); answers the server's pings."""

    def __init__(self, node: PushdProcess) -> None:
        ws = connect(node.url.replace("/ws", "/connection/websocket"), open_timeout=5, close_timeout=5,
                     legacy=True)
        ws.send(json.dumps({"id": 1, "connect": {}}))
        assert "connect" in json.loads(ws.recv(5))
        for n, channel in enumerate(("T", "P"), start=2):
            ws.send(json.dumps({"id": n, "subscribe": {"channel": channel}}))
            assert "subscribe" in json.loads(ws.recv(5))
        super().__init__(Client(ws))

    def received(self, text: str) -> None:
        for line in text.splitlines():
            if line == "{}":
                self.client.ws.send("{}")
            else:
                self.frames.append(json.loads(line))

    def numbers(self, topic: str) -> list[int]:
        return [f["push"]["pub"]["data"]["n"] for f in self.pubs(topic)]

    def pubs(self, topic: str) -> list[dict[str, Any]]:
        return [f for f in list(self.frames) if f.get("push", {}).get("channel") == topic and "pub" in f["push"]]

    def missed(self) -> list[dict[str, Any]]:
        return [{"topic": f["push"]["channel"], **f["push"]["unsubscribe"]} for f in list(self.frames)
                if "unsubscribe" in f.get("push", {})]


class Publisher:
    """Publishes {"n": 0, 1, 2, ...} to a topic through the API every 10 ms; remembers what was acknowledged."""

    def __init__(self, node: PushdProcess, topic: str) -> None:
        self.node = node
        self.topic = topic
        self.acknowledged: list[int] = []
        self.refused: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                status, _ = self.node.api("POST", "/api/publish", {"topic": self.topic, "data": {"n": n}}, timeout=3)
            except Exception:
                status = -1
            if status == 200:
                self.acknowledged.append(n)
            else:
                self.refused[status] = self.refused.get(status, 0) + 1
            n += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def run_fault(node: PushdProcess, fault: Callable[[], None], centrifugo: int = 0,
              started: Callable[[Publisher], None] = lambda _: None) -> tuple[Publisher, list[Collector]]:
    collectors: list[Collector] = []
    for _ in range(CLIENTS):
        client = node.client()
        client.subscribe("T", "P")
        collectors.append(Collector(client))
    collectors += [CentrifugoCollector(node) for _ in range(centrifugo)]
    publisher = Publisher(node, "T")
    started(publisher)
    try:
        eventually(lambda: len(publisher.acknowledged) >= BEFORE, timeout=30)
        fault()
        eventually(lambda: node.api("GET", "/api/nodes")[0] == 200 and len(publisher.acknowledged) > 0, timeout=30)
        # Steady publishing again, now that the node takes requests.
        back = len(publisher.acknowledged)
        eventually(lambda: len(publisher.acknowledged) > back + AFTER, timeout=30)
    finally:
        publisher.stop()
    acknowledged = set(publisher.acknowledged)
    for collector in collectors:
        eventually(lambda c=collector: acknowledged <= set(c.numbers("T")), timeout=20)  # type: ignore[misc]
    return publisher, collectors


def assert_delivered_once_in_order(publisher: Publisher, collectors: list[Collector]) -> None:
    acknowledged = set(publisher.acknowledged)
    for collector in collectors:
        got = collector.numbers("T")
        assert acknowledged <= set(got), sorted(acknowledged - set(got))
        assert len(got) == len(set(got)), "a message arrived twice"
        assert got == sorted(got), "messages arrived out of order"


def assert_one_line_per_outage(node: PushdProcess, outages: int) -> None:
    node.drain()
    assert node.log.count("Redis outage:") == outages, node.log
    assert node.log.count("API: the push cluster cannot take requests") <= outages, node.log
    assert "Traceback" not in node.log, node.log


@pytest.fixture
def node(tmp_path: Any, redis_server: Any) -> Any:
    with PushdProcess(tmp_path, "--history-rules", "P=0/0", redis=redis_server.url, tls=False,
                      node_id="faulty") as node:
        yield node


def test_a_lost_listener_catches_up_what_the_api_acknowledged_meanwhile(node: PushdProcess,
                                                                       redis_server: Any) -> None:
    """Redis cuts the node's PSUBSCRIBE connection; the command connection stays up and the API keeps answering.

    Before: every publish acknowledged until the listener was back (about a second) reached nobody.
    """
    redis = redis_server.client()
    publisher, collectors = run_fault(node, lambda: redis.client_kill_filter(_type="pubsub"), centrifugo=2)
    for collector in collectors:
        collector.stop()
    assert_delivered_once_in_order(publisher, collectors)
    # The plain-PUBLISH topic P cannot be caught up: its subscribers are told (Centrifugo's SDKs subscribe again).
    assert all([m["topic"] for m in c.missed()] == ["P"] for c in collectors), [c.missed() for c in collectors]
    for collector in collectors:
        if isinstance(collector, CentrifugoCollector):
            offsets = [f["push"]["pub"]["offset"] for f in collector.pubs("T")]
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), "a gap in the offsets"
            assert collector.missed() == [{"topic": "P", "code": 2500, "reason": "insufficient state"}]
    assert_one_line_per_outage(node, 1)

    def node_info() -> dict[str, Any] | None:
        # The record is the node's last heartbeat (every 5 s by default).
        status, body = node.api("GET", "/api/nodes")
        return body["nodes"][0] if status == 200 and body["nodes"][0].get("outages") else None

    info = eventually(node_info, timeout=15)
    assert info["outages"] == 1 and info["listening"] is True and info["caught_up_topics"] == 1


def test_a_redis_restart_loses_no_acknowledged_publish_and_tells_what_it_cannot_know(node: PushdProcess,
                                                                                    redis_server: Any) -> None:
    """Redis is killed with -9 and comes back empty: the API says 503 while the node cannot deliver, and
    the history the node knew is gone, so subscribers are told of both topics (what was acknowledged just before
    the crash may be lost with Redis' data)."""

    def crash() -> None:
        redis_server.kill()
        # Redis stays down until the API has refused a good number of publishes, then comes back empty.
        eventually(lambda: publisher_of[0].refused.get(503, 0) >= 50, timeout=30)
        redis_server.start_again()

    publisher_of: list[Publisher] = []
    publisher, collectors = run_fault(node, crash, started=publisher_of.append)
    for collector in collectors:
        collector.stop()
    assert_delivered_once_in_order(publisher, collectors)
    assert publisher.refused.get(503, 0) > 0, publisher.refused
    assert set(publisher.refused) <= {503}, publisher.refused
    for collector in collectors:
        assert sorted(m["topic"] for m in collector.missed()) == ["P", "T"], collector.missed()
    assert_one_line_per_outage(node, 1)
