#!/usr/bin/env python3
"""Faults under load: what clients of two pushd nodes lose while Redis crashes and a node stalls (issue 9).

    python bench/chaos.py                       # 1,000 clients, 200 topics, 200 API messages/s, about 2 minutes
    python bench/chaos.py --quick               # 100 clients, 20 topics, shorter gaps: about 1 minute
    python bench/chaos.py --clients 500 --rate 100 --seed 7
    python bench/chaos.py -- --replay-limit 1000          # arguments after -- go to both `twistd pushd` nodes

Starts one redis-server on a free 127.0.0.1 port (tests/redis_server.RedisServer: no persistence, restartable on
the same port) and two `twistd -n pushd` nodes on it (tests/integration/pushd_process.PushdProcess: plain ws or
--tls, the HTTP API on a free port, --heartbeat-interval 1 --heartbeat-ttl 3), the nodes pinned to the first core
and redis-server plus this script to the second. In this one asyncio process, --clients WebSocket clients
(`websockets`, pushd's native protocol) connect, half to each node, each subscribing to --per-client of the
--topics topics (with `last`: every topic gets one seed message first, so each client starts with a position), and
every tenth also to the topic `plain`. Clients that are cut off reconnect and subscribe again with `since` their
last offset and epoch per topic. Then, for the run:

- POST /api/publish batches ({"messages": [...]}, every 100 ms, alternating nodes): --rate messages/s over random
  topics, each payload carrying a unique sequence number and its send time;
- plain `PUBLISH push:plain` (no history) at --plain-rate/s from a redis-py client;
- faults: --outages times Redis killed with SIGKILL and restarted --down seconds later on the same port, empty,
  --spacing seconds apart; then node B stopped with SIGSTOP for heartbeat-ttl + 2 s, then SIGCONT.

Afterwards the clients get --drain seconds to reconnect and receive what is still on its way. The report: API
publishes acknowledged (200) and refused; deliveries missing per client for every acknowledged message on its
topics (all clients stay subscribed for the whole run), with and without a `recovery_failed` that told the client
so, duplicates and reordering; the loss window of the plain PUBLISH stream around each fault; the frames other
than data the clients got, by op; publish-to-delivery latency p50/p99 outside the faults (send times within 2 s
of a fault excluded); node RSS before and after; GET /api/nodes at the end. It prints the report and writes
bench/results/chaos-<UTC time>.json (unless --no-save).

Bounded: --time-limit seconds for the whole run (SIGALRM as a backstop), and every process it starts is stopped by
its pid in finally blocks. Exit status: 0 when no acknowledged message was missed, duplicated or reordered at any
client, 1 otherwise or when the run broke, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import json
import os
import random
import re
import signal
import ssl
import sys
import tempfile
import time
import urllib.error
from array import array
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import websockets
from broadcast import PinnedRedis, api_call, begin, finish, percentile, pushd_findings
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from run import BenchError, Pinning, cpu_seconds, rss_kib

from tests.integration.pushd_process import PushdProcess, alive

PLAIN = "plain"
#: seconds around a fault whose publishes are left out of the latency figures
FAULT_MARGIN = 2.0
#: seconds between two API batches (the batch holds what --rate makes due in that time)
TICK = 0.1
API_TIMEOUT = 10.0
#: pushd log lines about Redis and the cluster, kept in the JSON to read the faults' course from the nodes' side
REDIS_LINE = re.compile(r"[Rr]edis|heartbeat|purge|dead|membership|listener|subscri", re.ASCII)
#: handshakes in flight at once (Twisted listens with a backlog of 50)
HANDSHAKES = 32


def now() -> float:
    return time.monotonic()


@dataclass
class Plan:
    clients: int
    topics: int
    per_client: int
    rate: float
    plain_rate: float
    plain_every: int
    outages: int
    down: float
    spacing: float
    warmup: float
    tail: float
    drain: float
    heartbeat_interval: int
    heartbeat_ttl: int
    seed: int
    tls: bool
    time_limit: float

    @property
    def stall(self) -> float:
        return self.heartbeat_ttl + 2.0

    @property
    def publish_seconds(self) -> float:
        return self.warmup + self.outages * self.spacing + self.stall + self.tail


def position_key(offset: str) -> tuple[int, int]:
    ms, _, seq = offset.partition("-")
    return int(ms), int(seq or 0)


class Latencies:
    """Send time and publish-to-delivery ms of every first delivery, in arrays: nothing for the GC to scan."""

    def __init__(self) -> None:
        self.sent = array("d")
        self.ms = array("d")

    def add(self, sent: float, received: float) -> None:
        self.sent.append(sent)
        self.ms.append((received - sent) * 1000)


@dataclass
class Client:
    """One WebSocket client: subscribes, reconnects with `since`, and records every message it gets."""

    index: int
    url: str
    node: str
    topics: list[str]
    plain: bool
    positions: dict[str, tuple[str, str]] = field(default_factory=dict)
    got: Counter[int] = field(default_factory=Counter)
    plain_got: Counter[int] = field(default_factory=Counter)
    out_of_order: int = 0
    plain_out_of_order: int = 0
    last_plain: int = -1
    ops: Counter[str] = field(default_factory=Counter)
    told_loss: Counter[str] = field(default_factory=Counter)
    disconnects: list[tuple[float, str]] = field(default_factory=list)
    connected: bool = False
    subscribed_replies: int = 0
    frames_sent: int = 0
    last_frame: float = 0.0
    #: a subscribe was refused (not a recovery_failed): reconnect and subscribe again, as an application would
    refused: bool = False

    def subscribe_frames(self) -> list[dict[str, Any]]:
        history = self.topics
        known = {t: {"offset": o, "epoch": e} for t, (o, e) in self.positions.items()}
        frames: list[dict[str, Any]] = []
        if known:
            frames.append({"op": "subscribe", "topics": [t for t in history if t in known], "since": known})
        if unknown := [t for t in history if t not in known]:
            frames.append({"op": "subscribe", "topics": unknown, "last": True})
        if self.plain:
            frames.append({"op": "subscribe", "topics": [PLAIN]})
        return frames

    def on_frame(self, text: str | bytes, latencies: Latencies) -> None:
        received = now()
        self.last_frame = received
        msg = json.loads(text)
        if "topic" in msg and "op" not in msg:
            self._on_data(msg, received, latencies)
            return
        op = str(msg.get("op"))
        self.ops[f"error:{msg.get('code')}" if op == "error" else op] += 1
        if op == "subscribed":
            self.subscribed_replies += 1
        elif op == "error" and msg.get("code") == "recovery_failed":
            for topic in msg.get("topics") or []:
                self.told_loss[topic] += 1
                self.positions.pop(topic, None)
        elif op == "missed":
            # The node could not catch the topic up (docs/protocol.md, "Redis outages"): the client is told.
            self.told_loss[str(msg.get("topic"))] += 1
        elif op == "error":
            self.refused = True

    def _on_data(self, msg: dict[str, Any], received: float, latencies: Latencies) -> None:
        topic, data = msg["topic"], msg["data"]
        if topic == PLAIN:
            seq = int(data["s"])
            if seq < self.last_plain and seq not in self.plain_got:
                self.plain_out_of_order += 1
            self.plain_got[seq] += 1
            self.last_plain = max(self.last_plain, seq)
            return
        offset, epoch = msg.get("offset"), msg.get("epoch")
        if offset is not None and epoch is not None:
            previous = self.positions.get(topic)
            if previous is not None and previous[1] == epoch and position_key(offset) <= position_key(previous[0]):
                if "s" in data and data["s"] not in self.got:
                    self.out_of_order += 1
            else:
                self.positions[topic] = (offset, epoch)
        if "s" not in data:  # a seed message
            return
        seq = int(data["s"])
        self.got[seq] += 1
        if self.got[seq] == 1:
            latencies.add(float(data["t"]), received)

    async def run(self, handshakes: asyncio.Semaphore, latencies: Latencies,
                  context: ssl.SSLContext | None) -> None:
        tls: dict[str, Any] = {"ssl": context, "server_hostname": "localhost"} if context is not None else {}
        while True:
            reason = ""
            try:
                async with handshakes:
                    ws = await websockets.connect(self.url, open_timeout=10, ping_interval=None, close_timeout=2,
                                                  compression=None, max_size=2**22, **tls)
                try:
                    for frame in self.subscribe_frames():
                        await ws.send(json.dumps(frame))
                        self.frames_sent += 1
                    self.connected = True
                    async for text in ws:
                        self.on_frame(text, latencies)
                        if self.refused:
                            self.refused = False
                            reason = "subscribe refused: subscribing again"
                            break
                finally:
                    self.connected = False
                    reason = reason or f"close {ws.close_code}"
                    await ws.close()
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as e:
                reason = reason or f"connect failed: {type(e).__name__}"
            self.disconnects.append((now(), reason))
            await asyncio.sleep(0.2 + random.random() * 0.3)


@dataclass
class Published:
    seq: int
    topic: str
    sent: float
    node: str
    outcome: str = "pending"  # acked, refused:<status>, error:<kind>, no-position
    answered: float = 0.0


@dataclass
class PlainPublish:
    seq: int
    sent: float
    receivers: int | None  # None: PUBLISH failed


@dataclass
class Fault:
    kind: str
    start: float
    end: float = 0.0
    detail: str = ""


class Chaos:
    """One run: the processes, the clients, the publishers, the faults, and what they recorded."""

    def __init__(self, plan: Plan, pin: Pinning, workdir: Path, pushd_args: list[str]) -> None:
        self.plan = plan
        self.pin = pin
        self.workdir = workdir
        self.pushd_args = pushd_args
        self.rng = random.Random(plan.seed)
        self.topics = [f"t{i}" for i in range(plan.topics)]
        self.redis = PinnedRedis(pin)
        self.nodes: list[PushdProcess] = []
        self.clients: list[Client] = []
        self.published: list[Published] = []
        self.plain: list[PlainPublish] = []
        self.faults: list[Fault] = []
        self.latencies = Latencies()
        self.loop_lag_ms: list[float] = []
        #: API requests by node: status (or error) -> count
        self.requests: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.t0 = 0.0
        self.result: dict[str, Any] = {}
        self.executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="api")

    # -- processes ----------------------------------------------------------------------------------------

    def start_processes(self) -> None:
        self.redis.start()
        args = ["--heartbeat-interval", str(self.plan.heartbeat_interval),
                "--heartbeat-ttl", str(self.plan.heartbeat_ttl), *self.pushd_args]
        for name in ("a", "b"):
            node = PushdProcess(self.workdir / name, *args, redis=self.redis.url, node_id=f"chaos-{name}",
                                tls=self.plan.tls)
            node.argv = self.pin.server(node.argv)  # taskset execs pushd: the same pid
            self.nodes.append(node)
            node.start(timeout=60)

    def stop_processes(self) -> None:
        for node in self.nodes:
            if node.proc is not None and alive(node.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGCONT)  # a stalled node cannot handle SIGTERM
        codes = []
        for node in self.nodes:
            codes.append(node.stop(timeout=20) if node.proc is not None else None)
        self.result["pushd_exit"] = codes
        self.redis.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def rss(self) -> dict[str, int]:
        return {node.node_id: rss_kib(node.pid) for node in self.nodes}

    # -- the run ------------------------------------------------------------------------------------------

    def make_clients(self) -> None:
        for i in range(self.plan.clients):
            node = self.nodes[i % 2]
            url = node.url.replace("//localhost:", "//127.0.0.1:")
            topics = self.rng.sample(self.topics, self.plan.per_client)
            plain = (i // 2) % self.plan.plain_every == 0  # as many on each node
            self.clients.append(Client(i, url, node.node_id, topics, plain))

    async def main(self) -> None:
        plan = self.plan
        self.seed_topics()
        self.make_clients()
        # each node made its own certificate (in its work directory)
        contexts = {n.node_id: ssl.create_default_context(cafile=n.cert) if plan.tls else None for n in self.nodes}
        handshakes = asyncio.Semaphore(HANDSHAKES)
        tasks = [asyncio.create_task(c.run(handshakes, self.latencies, contexts[c.node])) for c in self.clients]
        lag = asyncio.create_task(self.watch_loop())
        try:
            started = now()
            await self.until(lambda: all(c.connected and c.subscribed_replies >= c.frames_sent > 0
                                         for c in self.clients), 120, "every client subscribed")
            self.result["connect_s"] = round(now() - started, 2)
            for c in self.clients:  # the seed messages of `last` were not the run's
                c.disconnects.clear()
            gc.collect()
            gc.freeze()  # the clients' long-lived state is not rescanned by every full collection
            await asyncio.sleep(1)
            self.result["rss_kib_before"] = self.rss()
            self.result["membership_before"] = await self.membership()
            self.result["cpu_s_before"] = self.cpu()
            self.t0 = now()
            stop_at = self.t0 + plan.publish_seconds
            await asyncio.gather(self.publish_api(stop_at), self.publish_plain(stop_at), self.inject_faults())
            self.result["publish_s"] = round(now() - self.t0, 2)
            drained_at = now()
            await self.until(lambda: all(c.connected for c in self.clients)
                             and now() - max(c.last_frame for c in self.clients) > 2, plan.drain, None)
            self.result["drain_s"] = round(now() - drained_at, 2)
            self.result["connected_at_end"] = sum(c.connected for c in self.clients)
            self.result["cpu_s_after"] = self.cpu()
            self.result["rss_kib_after"] = self.rss()
            self.result["membership_after"] = await self.membership()
            for node in self.nodes:
                status, body = await self.api_get(node, "/api/nodes")
                self.result.setdefault("api_nodes", {})[node.node_id] = {"status": status, "body": body}
        finally:
            lag.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, lag, return_exceptions=True)

    async def api_get(self, node: PushdProcess, path: str) -> tuple[int, Any]:
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: api_call(node.api_url, "GET", path, timeout=10))

    async def membership(self) -> dict[str, Any]:
        """What Redis records of who is subscribed (GET /api/topics), against the clients' real subscriptions."""
        actual: Counter[str] = Counter(t for c in self.clients for t in [*c.topics, *([PLAIN] if c.plain else [])])
        status, body = await self.api_get(self.nodes[0], "/api/topics")
        if status != 200 or not isinstance(body, dict):
            return {"status": status, "body": body}
        recorded = {t: int(n) for t, n in body.get("topics", {}).items()}
        wrong = {t: [recorded.get(t, 0), n] for t, n in actual.items() if recorded.get(t, 0) != n}
        return {"subscriptions": sum(actual.values()), "recorded": sum(recorded.values()),
                "topics_wrong": len(wrong), "sample_recorded_vs_actual": dict(list(wrong.items())[:5])}

    async def until(self, check: Any, timeout: float, what: str | None) -> None:
        deadline = now() + timeout
        while not check():
            if now() > deadline:
                if what is None:
                    return
                raise BenchError(f"not reached within {timeout:.0f} s: {what}")
            await asyncio.sleep(0.1)

    async def watch_loop(self) -> None:
        """How late this process's event loop runs (all clients and publishers share it)."""
        while True:
            before = now()
            await asyncio.sleep(0.05)
            self.loop_lag_ms.append((now() - before - 0.05) * 1000)

    def cpu(self) -> dict[str, float]:
        pids = {n.node_id: n.pid for n in self.nodes} | {"redis": self.redis.pid or 0, "clients": os.getpid()}
        return {name: round(cpu_seconds(pid), 2) for name, pid in pids.items()}

    def seed_topics(self) -> None:
        """One message per topic, so that `last` gives every client a position to recover from."""
        items = [{"topic": t, "data": {"seed": True}} for t in self.topics]
        status, body = api_call(self.nodes[0].api_url, "POST", "/api/publish", {"messages": items}, timeout=30)
        if status != 200:
            raise BenchError(f"seeding the topics: POST /api/publish answered {status}: {body}")

    async def publish_api(self, stop_at: float) -> None:
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Future[None]] = set()
        due, batch_no, tick_at = 0.0, 0, self.t0
        while now() < stop_at:
            due += self.plan.rate * TICK
            count, due = int(due), due - int(due)
            if count:
                node = self.nodes[batch_no % 2]
                batch_no += 1
                sent = now()
                batch = [Published(len(self.published) + k, self.rng.choice(self.topics), sent, node.node_id)
                         for k in range(count)]
                self.published.extend(batch)
                body = {"messages": [{"topic": p.topic, "data": {"s": p.seq, "t": round(sent, 6)}} for p in batch]}
                future = loop.run_in_executor(self.executor, self.post, node.api_url, body)
                task = asyncio.ensure_future(self.settle(future, batch))
                pending.add(task)
                task.add_done_callback(pending.discard)
            tick_at += TICK
            await asyncio.sleep(max(0.0, tick_at - now()))
        if pending:
            await asyncio.wait(pending, timeout=API_TIMEOUT + 5)

    @staticmethod
    def post(base: str, body: dict[str, Any]) -> tuple[int, Any]:
        try:
            return api_call(base, "POST", "/api/publish", body, timeout=API_TIMEOUT)
        except (OSError, ValueError, urllib.error.URLError) as e:
            reason = getattr(e, "reason", e)
            return -1, f"{type(reason).__name__}"

    async def settle(self, future: asyncio.Future[tuple[int, Any]], batch: list[Published]) -> None:
        status, body = await future
        self.requests[batch[0].node][str(status) if status > 0 else str(body)] += 1
        for p in batch:
            p.answered = now()
        if status == 200:
            for p, position in zip(batch, body["results"], strict=True):
                p.outcome = "acked" if position.get("offset") else "no-position"
        else:
            outcome = f"refused:{status}" if status > 0 else f"error:{body}"
            for p in batch:
                p.outcome = outcome

    async def publish_plain(self, stop_at: float) -> None:
        client = Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=0.5, socket_connect_timeout=0.5,
                       retry=Retry(NoBackoff(), 0))
        interval = 1.0 / self.plan.plain_rate
        at = self.t0
        try:
            while now() < stop_at:
                sent = now()
                seq = len(self.plain)
                try:
                    receivers: int | None = int(await client.publish(f"push:{PLAIN}",
                                                                     json.dumps({"s": seq, "t": round(sent, 6)})))
                except (RedisError, OSError):
                    receivers = None
                self.plain.append(PlainPublish(seq, sent, receivers))
                at = max(at + interval, now() - interval)  # late: skip ahead rather than burst
                await asyncio.sleep(max(0.0, at - now()))
        finally:
            await client.aclose()

    async def inject_faults(self) -> None:
        plan = self.plan
        for k in range(plan.outages):
            await asyncio.sleep(max(0.0, self.t0 + plan.warmup + k * plan.spacing - now()))
            fault = Fault("redis-restart", now(), detail=f"SIGKILL, down {plan.down:g} s, restarted on port "
                                                        f"{self.redis.port}")
            self.faults.append(fault)
            await asyncio.to_thread(self.redis.kill)
            await asyncio.sleep(plan.down)
            await asyncio.to_thread(self.redis.restart)
            fault.end = now()
        await asyncio.sleep(max(0.0, self.t0 + plan.warmup + plan.outages * plan.spacing - now()))
        stalled = self.nodes[1]
        fault = Fault("node-stall", now(), detail=f"{stalled.node_id} SIGSTOP for {plan.stall:g} s "
                                                  f"(heartbeat-ttl {plan.heartbeat_ttl} + 2)")
        self.faults.append(fault)
        os.kill(stalled.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(plan.stall)
        finally:
            os.kill(stalled.pid, signal.SIGCONT)
            fault.end = now()

    # -- analysis -----------------------------------------------------------------------------------------

    def analyze(self) -> dict[str, Any]:
        t0 = self.t0
        outcomes = Counter(p.outcome for p in self.published)
        by_topic: dict[str, list[int]] = defaultdict(list)
        for p in self.published:
            if p.outcome == "acked":
                by_topic[p.topic].append(p.seq)
        unacked = {p.seq for p in self.published if p.outcome != "acked"}
        per_client: list[dict[str, Any]] = []
        missing_by_fault: Counter[str] = Counter()
        missing_seqs: set[int] = set()
        for c in self.clients:
            expected = {s for t in c.topics for s in by_topic[t]}
            missing = expected - set(c.got)
            told = sum(1 for s in missing if c.told_loss[self.published[s].topic])
            missing_by_fault.update(self.fault_of(self.published[s].sent) for s in missing)
            missing_seqs |= missing
            per_client.append({
                "client": c.index, "node": c.node, "expected": len(expected), "missing": len(missing),
                "missing_told": told, "missing_silent": len(missing) - told,
                "duplicates": sum(n - 1 for n in c.got.values() if n > 1),
                "unacked_delivered": sum(1 for s in c.got if s in unacked),
                "out_of_order": c.out_of_order, "disconnects": len(c.disconnects),
                "missing_sample": sorted(missing)[:5]})
        total_expected = sum(r["expected"] for r in per_client)
        never_cut = [r for r in per_client if r["disconnects"] == 0]
        worst = sorted(per_client, key=lambda r: (-r["missing"], r["client"]))[:5]
        ops: Counter[str] = Counter()
        for c in self.clients:
            ops.update(c.ops)
        reasons = Counter(reason for c in self.clients for _, reason in c.disconnects)
        windows = [(f.start - FAULT_MARGIN, (f.end or f.start) + FAULT_MARGIN) for f in self.faults]
        pairs = list(zip(self.latencies.sent, self.latencies.ms, strict=True))
        calm = sorted(lat for sent, lat in pairs if not any(a <= sent <= b for a, b in windows))
        everything = sorted(lat for _, lat in pairs)
        lag = sorted(self.loop_lag_ms)
        return {
            "ok": total_expected > 0 and all(r["missing"] == 0 and r["duplicates"] == 0 and r["out_of_order"] == 0
                                             for r in per_client),
            "faults": [{"kind": f.kind, "start_s": round(f.start - t0, 2), "end_s": round(f.end - t0, 2),
                        "detail": f.detail} for f in self.faults],
            "api": {"messages": len(self.published), "outcomes": dict(outcomes), "acked": outcomes["acked"],
                    "requests": {node: dict(statuses) for node, statuses in sorted(self.requests.items())},
                    "answer_ms": self.answer_times()},
            "deliveries": {
                "clients": len(per_client), "expected": total_expected,
                "received": sum(len(c.got) for c in self.clients),
                "missing": sum(r["missing"] for r in per_client),
                "missing_told": sum(r["missing_told"] for r in per_client),
                "missing_silent": sum(r["missing_silent"] for r in per_client),
                "clients_missing": sum(1 for r in per_client if r["missing"]),
                "duplicates": sum(r["duplicates"] for r in per_client),
                "out_of_order": sum(r["out_of_order"] for r in per_client),
                "unacked_delivered": sum(r["unacked_delivered"] for r in per_client),
                "never_disconnected": {"clients": len(never_cut),
                                       "missing": sum(r["missing"] for r in never_cut),
                                       "clients_missing": sum(1 for r in never_cut if r["missing"])},
                "missing_by_fault": {name: {"deliveries": n, **self.missed_messages(name, missing_seqs)}
                                     for name, n in sorted(missing_by_fault.items())},
                "worst": worst,
            },
            "plain": self.plain_loss(),
            "frames_other_than_data": dict(sorted(ops.items())),
            "clients_told_of_loss": sum(1 for c in self.clients if c.told_loss),
            "disconnects": {"total": sum(reasons.values()), "clients": sum(1 for c in self.clients if c.disconnects),
                            "reasons": dict(reasons), "connected_at_end": self.result.get("connected_at_end"),
                            "by_fault": self.disconnects_by_fault()},
            "latency_ms": {"outside_faults": latency_summary(calm), "all": latency_summary(everything),
                           "excluded_margin_s": FAULT_MARGIN},
            "client_loop_lag_ms": {"p50": rounded(percentile(lag, 0.5)), "p99": rounded(percentile(lag, 0.99)),
                                   "max": rounded(lag[-1] if lag else None)},
        }

    def missed_messages(self, period: str, seqs: set[int]) -> dict[str, Any]:
        """The messages of one fault period that some client missed: how many, and when they were sent and
        answered, in ms from the fault's start."""
        mine = [self.published[s] for s in seqs if self.fault_of(self.published[s].sent) == period]
        if not mine or not period[:1].isdigit():
            return {"messages": len(mine)}
        start = self.faults[int(period.split(":")[0]) - 1].start
        return {"messages": len(mine),
                "sent_ms_from_fault": [round((min(p.sent for p in mine) - start) * 1000),
                                       round((max(p.sent for p in mine) - start) * 1000)],
                "answered_ms_from_fault": [round((min(p.answered for p in mine) - start) * 1000),
                                           round((max(p.answered for p in mine) - start) * 1000)]}

    def answer_times(self) -> dict[str, Any]:
        """How long POST /api/publish took to answer 200, outside the faults and overall (ms)."""
        windows = [(f.start - FAULT_MARGIN, (f.end or f.start) + FAULT_MARGIN) for f in self.faults]
        acked = [p for p in self.published if p.outcome == "acked"]
        calm = sorted((p.answered - p.sent) * 1000 for p in acked if not any(a <= p.sent <= b for a, b in windows))
        return {"outside_faults": latency_summary(calm),
                "all": latency_summary(sorted((p.answered - p.sent) * 1000 for p in acked))}

    def periods(self) -> list[tuple[str, float, float]]:
        """Each fault's period: from FAULT_MARGIN before it to FAULT_MARGIN before the next one (the last: to the
        end), so that what a fault costs, recovery included, is counted once."""
        starts = [f.start - FAULT_MARGIN for f in self.faults] + [float("inf")]
        return [(f"{k + 1}:{f.kind}", starts[k], starts[k + 1]) for k, f in enumerate(self.faults)]

    def fault_of(self, t: float) -> str:
        for name, start, end in self.periods():
            if start <= t < end:
                return name
        return "before faults"

    def disconnects_by_fault(self) -> dict[str, int]:
        return dict(Counter(self.fault_of(t) for c in self.clients for t, _ in c.disconnects))

    def plain_loss(self) -> dict[str, Any]:
        """The plain PUBLISH stream: which messages Redis accepted but a subscribed client never got, per fault."""
        ok = [p for p in self.plain if p.receivers is not None]
        subscribers = [c for c in self.clients if c.plain]
        interval_ms = 1000 / self.plan.plain_rate
        sent_at = [p.sent for p in ok]
        per_fault: dict[str, dict[str, Any]] = {}
        for (name, start, end), f in zip(self.periods(), self.faults, strict=True):
            window = ok[bisect.bisect_left(sent_at, start):bisect.bisect_left(sent_at, end)]
            refused = sum(1 for p in self.plain if p.receivers is None and start <= p.sent < end)
            missed_any: set[int] = set()
            spans = []
            for c in subscribers:
                missed = [p for p in window if p.seq not in c.plain_got]
                missed_any.update(p.seq for p in missed)
                if missed:
                    spans.append((missed[-1].sent - missed[0].sent) * 1000 + interval_ms)
            missed_sorted = sorted(missed_any)
            seq_time = {p.seq: p.sent for p in window}
            per_fault[name] = {
                "published_ok": len(window), "publish_failed": refused,
                "zero_receivers": sum(1 for p in window if p.receivers == 0),
                "missed_by_some_client": len(missed_sorted),
                "missed_seq_range": [missed_sorted[0], missed_sorted[-1]] if missed_sorted else None,
                "loss_window_ms": round((seq_time[missed_sorted[-1]] - seq_time[missed_sorted[0]]) * 1000
                                        + interval_ms, 1) if missed_sorted else 0.0,
                "loss_window_from_fault_start_ms": round((seq_time[missed_sorted[0]] - f.start) * 1000, 1)
                if missed_sorted else None,
                "clients_missing": len(spans),
                "worst_client_window_ms": round(max(spans), 1) if spans else 0.0,
            }
        got_total = sum(len(c.plain_got) for c in subscribers)
        return {"subscribers": len(subscribers), "published": len(self.plain), "published_ok": len(ok),
                "publish_failed": len(self.plain) - len(ok), "expected": len(ok) * len(subscribers),
                "received": got_total,
                "missing": sum(1 for c in subscribers for p in ok if p.seq not in c.plain_got),
                "duplicates": sum(n - 1 for c in subscribers for n in c.plain_got.values() if n > 1),
                "out_of_order": sum(c.plain_out_of_order for c in subscribers),
                "interval_ms": interval_ms, "per_fault": per_fault}


def latency_summary(values: list[float]) -> dict[str, Any]:
    return {"samples": len(values), "p50": rounded(percentile(values, 0.5)), "p99": rounded(percentile(values, 0.99)),
            "max": rounded(values[-1] if values else None)}


def rounded(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


# -- the report -----------------------------------------------------------------------------------------------


def print_report(doc: dict[str, Any]) -> None:
    r = doc["result"]
    if "deliveries" not in r:
        return
    p = doc["plan"]
    d, api, plain = r["deliveries"], r["api"], r["plain"]
    line = print
    line()
    line(f"{p['clients']:,} clients ({'wss' if p['tls'] else 'ws'}, half per node), {p['topics']} topics x "
         f"{p['per_client']} per client, {p['rate']:g} API messages/s in batches every {TICK * 1000:.0f} ms, "
         f"plain PUBLISH {p['plain_rate']:g}/s to {plain['subscribers']} clients; seed {p['seed']}")
    line(f"connected and subscribed in {r.get('connect_s')} s; published for {r.get('publish_s')} s; "
         f"drained {r.get('drain_s')} s")
    line("faults (s from the first publish):")
    for f in r["faults"]:
        line(f"  {f['kind']:<14} {f['start_s']:7.2f} -> {f['end_s']:7.2f}  {f['detail']}")
    line()
    line(f"API publishes: {api['messages']:,} messages; outcomes {api['outcomes']}")
    line(f"  requests by node and status: {api['requests']}")
    calm_answer, all_answer = api["answer_ms"]["outside_faults"], api["answer_ms"]["all"]
    line(f"  answer time of the 200s: outside faults p50 {calm_answer['p50']} / p99 {calm_answer['p99']} ms; all: p99 "
         f"{all_answer['p99']}, max {all_answer['max']} ms")
    line(f"deliveries to subscribed clients (every client stays subscribed for the whole run, reconnecting with "
         f"since): expected {d['expected']:,}, received {d['received']:,}")
    line(f"  missing {d['missing']:,} at {d['clients_missing']:,} of {d['clients']:,} clients "
         f"(target 0): told (recovery_failed or missed) {d['missing_told']:,}, silent {d['missing_silent']:,}")
    nd = d["never_disconnected"]
    line(f"  clients never disconnected: {nd['clients']:,}; their missing {nd['missing']:,} at "
         f"{nd['clients_missing']:,} clients")
    line(f"  missing by fault (by publish time, from {FAULT_MARGIN:g} s before a fault to {FAULT_MARGIN:g} s before "
         f"the next):" + ("" if d["missing_by_fault"] else " none"))
    for name, m in d["missing_by_fault"].items():
        when = (f", sent {m['sent_ms_from_fault'][0]:,} to {m['sent_ms_from_fault'][1]:,} ms after the fault began, "
                f"answered 200 {m['answered_ms_from_fault'][0]:,} to {m['answered_ms_from_fault'][1]:,} ms after it"
                if "sent_ms_from_fault" in m else "")
        line(f"    {name:<16} {m['deliveries']:>7,} deliveries of {m['messages']:,} messages{when}")
    line(f"  duplicates {d['duplicates']:,}, out of order {d['out_of_order']:,}, delivered though not "
         f"acknowledged {d['unacked_delivered']:,}")
    for w in d["worst"]:
        if w["missing"]:
            line(f"  worst: client {w['client']} on {w['node']}: missing {w['missing']:,} of {w['expected']:,} "
                 f"(silent {w['missing_silent']:,}), {w['disconnects']} disconnects, e.g. seq {w['missing_sample']}")
    line()
    line(f"plain PUBLISH (no history): {plain['published']:,} sent, {plain['publish_failed']:,} failed (Redis "
         f"down), {plain['published_ok']:,} accepted; missing {plain['missing']:,} of {plain['expected']:,} "
         f"deliveries, duplicates {plain['duplicates']}, out of order {plain['out_of_order']}")
    for name, f in plain["per_fault"].items():
        rng = f["missed_seq_range"]
        line(f"  {name:<16} accepted {f['published_ok']:>4} (0 receivers: {f['zero_receivers']:>3}), failed "
             f"{f['publish_failed']:>3}; missed by some client: {f['missed_by_some_client']:>4}"
             + (f" seq {rng[0]}..{rng[1]}, loss window {f['loss_window_ms']:,.0f} ms starting "
                f"{f['loss_window_from_fault_start_ms']:,.0f} ms after the fault; {f['clients_missing']} clients, "
                f"worst {f['worst_client_window_ms']:,.0f} ms" if rng else ""))
    line()
    lat = r["latency_ms"]
    calm, every = lat["outside_faults"], lat["all"]
    line(f"publish-to-delivery latency outside faults (±{FAULT_MARGIN:g} s excluded): p50 {calm['p50']} ms, p99 "
         f"{calm['p99']} ms, max {calm['max']} ms ({calm['samples']:,} deliveries); all: p50 {every['p50']}, p99 "
         f"{every['p99']}, max {every['max']} ms")
    lag = r["client_loop_lag_ms"]
    line(f"  (the clients' event loop ran late by p50 {lag['p50']} / p99 {lag['p99']} / max {lag['max']} ms)")
    line(f"frames other than data, all clients: {r['frames_other_than_data']}; clients told of loss: "
         f"{r['clients_told_of_loss']}")
    dis = r["disconnects"]
    line(f"disconnects: {dis['total']:,} at {dis['clients']:,} clients {dis['reasons']}; by fault "
         f"{dis['by_fault']}; connected at the end {dis['connected_at_end']:,}")
    for when in ("before", "after"):
        m = r.get(f"membership_{when}", {})
        if "recorded" in m:
            line(f"membership in Redis {when} the run (GET /api/topics): {m['recorded']:,} subscriptions recorded of "
                 f"{m['subscriptions']:,}; topics with a wrong count {m['topics_wrong']} "
                 f"{m['sample_recorded_vs_actual'] or ''}")
        elif m:
            line(f"membership in Redis {when} the run: GET /api/topics answered {m}")
    before, after = r.get("rss_kib_before", {}), r.get("rss_kib_after", {})
    line("node RSS (KiB): " + ", ".join(f"{n} {before.get(n, '-'):,} -> {after.get(n, '-'):,}" for n in before))
    cpu0, cpu1 = r.get("cpu_s_before", {}), r.get("cpu_s_after", {})
    line("CPU seconds during the run: " + ", ".join(f"{n} {cpu1[n] - cpu0.get(n, 0):.1f}" for n in cpu1))
    line("GET /api/nodes at the end:")
    for asked, answer in r.get("api_nodes", {}).items():
        nodes = answer["body"].get("nodes", answer["body"]) if isinstance(answer["body"], dict) else answer["body"]
        line(f"  from {asked} ({answer['status']}):")
        for n in nodes if isinstance(nodes, list) else [nodes]:
            line(f"    {json.dumps(n, sort_keys=True)}")
    for node, lines in r.get("pushd_log_findings", {}).items():
        if lines:
            line(f"pushd {node}: {r['pushd_log_findings_count'][node]} log lines flagged (Traceback, error, dropped...), by text:")
            texts = Counter((text.split(" ", 2)[-1] if text[:1].isdigit() else text).strip()[:160] for text in lines)
            for text, n in texts.most_common(8):
                line(f"    {n:>4} x {text}")


# -- the command --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    pushd_args = argv[argv.index("--") + 1:] if "--" in argv else []
    options = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100 clients, 20 topics, 8 s between faults")
    p.add_argument("--clients", type=int, help="WebSocket clients (1000; quick 100)")
    p.add_argument("--topics", type=int, help="topics with history (200; quick 20)")
    p.add_argument("--per-client", type=int, default=5, help="topics per client (5)")
    p.add_argument("--rate", type=float, help="API messages/s (200; quick 100)")
    p.add_argument("--plain-rate", type=float, default=50, help="plain PUBLISH messages/s (50)")
    p.add_argument("--plain-every", type=int, default=10, help="every Nth client subscribes to `plain` (10)")
    p.add_argument("--outages", type=int, default=3, help="Redis kill -9 + restarts (3)")
    p.add_argument("--down", type=float, default=3, help="seconds Redis stays down each time (3)")
    p.add_argument("--spacing", type=float, help="seconds between the starts of two faults (15; quick 8)")
    p.add_argument("--heartbeat-interval", type=int, default=1, help="the nodes' --heartbeat-interval (1)")
    p.add_argument("--heartbeat-ttl", type=int, default=3, help="the nodes' --heartbeat-ttl (3); the stall is +2 s")
    p.add_argument("--seed", type=int, default=1, help="random seed for topics and subscriptions (1)")
    p.add_argument("--tls", action="store_true", help="wss listeners instead of plain ws")
    p.add_argument("--time-limit", type=float, default=300, help="hard limit for the whole run, seconds (300)")
    p.add_argument("--json", action="store_true", help="print the results document (JSON) instead of the report")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/chaos-*.json")
    args = p.parse_args(options)
    if args.heartbeat_ttl <= args.heartbeat_interval:
        p.error("--heartbeat-ttl must be longer than --heartbeat-interval")
    return args, pushd_args


def make_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    plan = Plan(clients=args.clients or (100 if quick else 1000), topics=args.topics or (20 if quick else 200),
                per_client=args.per_client, rate=args.rate or (100 if quick else 200), plain_rate=args.plain_rate,
                plain_every=max(1, args.plain_every), outages=args.outages, down=args.down,
                spacing=args.spacing or (8 if quick else 15), warmup=3 if quick else 5, tail=5 if quick else 10,
                drain=10 if quick else 15, heartbeat_interval=args.heartbeat_interval,
                heartbeat_ttl=args.heartbeat_ttl, seed=args.seed, tls=args.tls, time_limit=args.time_limit)
    if plan.per_client > plan.topics or plan.clients < 2 or plan.rate <= 0 or plan.plain_rate <= 0:
        raise SystemExit("chaos.py: need --clients >= 2, --per-client <= --topics, rates > 0")
    if plan.spacing < plan.down + 1:
        raise SystemExit("chaos.py: --spacing must exceed --down by at least 1 s")
    return plan


class TimeLimit(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise TimeLimit("hard time limit reached")


def run(plan: Plan, pin: Pinning, workdir: Path, pushd_args: list[str]) -> dict[str, Any]:
    chaos = Chaos(plan, pin, workdir, pushd_args)
    try:
        chaos.start_processes()
        chaos.result["rss_kib_started"] = chaos.rss()
        if pin.active:
            os.sched_setaffinity(0, {pin.client_core})  # the clients beside redis-server, off the nodes' core
        asyncio.run(asyncio.wait_for(chaos.main(), timeout=max(10.0, plan.time_limit - 30)))
        chaos.result.update(chaos.analyze())
    finally:
        chaos.stop_processes()
        findings = {n.node_id: pushd_findings(n) for n in chaos.nodes}
        chaos.result["pushd_log_findings_count"] = {node: len(lines) for node, lines in findings.items()}
        chaos.result["pushd_log_findings"] = {node: lines[:50] for node, lines in findings.items()}
        chaos.result["pushd_log_redis"] = {n.node_id: [line for line in n.lines if REDIS_LINE.search(line)][:200]
                                           for n in chaos.nodes}
    return chaos.result


def main(argv: list[str]) -> int:
    args, pushd_args = parse_args(argv)
    plan = make_plan(args)
    stamp, pin, info, out = begin(args, f"chaos: {plan.clients:,} clients on 2 nodes, {plan.outages} Redis restarts "
                                        "and 1 node stall")
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(plan.time_limit))
    result: dict[str, Any] = {"ok": False}
    interrupted = False
    started = now()
    try:
        with tempfile.TemporaryDirectory(prefix="pushd-bench-chaos-") as workdir:
            result = run(plan, pin, Path(workdir), pushd_args)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted; every process started has been stopped", file=sys.stderr)
    except TimeoutError:
        result["error"] = f"the run took longer than --time-limit ({plan.time_limit:g} s, less 30 s to stop)"
        print(f"chaos: {result['error']}", file=sys.stderr)
    except (BenchError, AssertionError, RuntimeError, TimeLimit) as e:
        result["error"] = f"{type(e).__name__}: {e}"[-4000:]
        print(f"chaos: {result['error']}", file=sys.stderr)
    finally:
        signal.alarm(0)
    result["wall_s"] = round(now() - started, 1)
    doc = {"benchmark": "chaos", "interrupted": interrupted, "machine": info, "command": " ".join(sys.argv),
           "plan": vars(plan), "options": {**vars(args), "pushd_args": pushd_args}, "result": result}
    return finish(doc, args, lambda: print_report(doc), f"chaos-{stamp}.json", out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
