"""Job workers: consumers of the job queues in Redis, sending batches through gateways (docs/jobs.md).

`JobWorkers` is one process's share of the work: `count` consumers, each with its own Redis connection for its
blocking XREADGROUP, and one housekeeper that, once a tick, reads the live jobs and does what they need (send a
job's test message, start it when its time comes, expand its audience into batches, move due retries back into
its queue) and announces the process in Redis. Any number of processes on any number of machines share the work
through the consumer group; a batch a dead consumer held is claimed (XAUTOCLAIM) after `visibility` seconds.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from pushd.gateways.base import AUTH, PAUSING, Gateway, Message, Outcome, Result, Target, idempotency_key
from pushd.jobs import model, scripts
from pushd.jobs.lag import ReactorLag
from pushd.jobs.store import JobStore
from pushd.redis.client import reply_text

#: Milliseconds one XREADGROUP waits for a batch before the consumer looks at the live jobs again.
BLOCK_MS = 1000
#: Batches one expansion step adds (one script: a few milliseconds of Redis time, so live traffic barely waits).
EXPAND_BATCHES = 4
#: Retry backoff: first wait and longest wait, in seconds; each wait is jittered by +-50 %.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0
#: A worker process's record counts as live this many ticks after its last update (pushctl job watch), and is
#: deleted 12 times that long after; records are pruned every WORKER_PRUNE_TICKS ticks.
WORKER_RECORD_TICKS = 5
WORKER_PRUNE_TICKS = 30


def backoff(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds before retry number `attempt` + 1: exponential, capped, with full-range jitter of +-50 %."""
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** attempt) * (0.5 + rng()))


@dataclass
class LiveJob:
    job_id: str
    state: str
    spec: model.JobSpec
    expanded: bool

    @property
    def message(self) -> Message:
        s = self.spec
        return Message(self.job_id, s.title, s.body, s.data, s.ttl, s.fallback)


@dataclass
class Tally:
    """What one batch's results add to its job, as the SETTLE script takes it."""

    sent: int = 0
    failed: int = 0
    invalid: int = 0
    retrying: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    via: Counter[str] = field(default_factory=Counter)
    delayed: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    hold: float = 0.0
    #: The gateway's own fault (base.PAUSING): the job is paused until someone fixes its settings and resumes it.
    pause: str = ""


def tally(results: Sequence[Result], targets: Sequence[Target], attempt: int, retries: int, now: float,
          rng: Callable[[], float] = random.random) -> Tally:
    """Classify one batch's results: counts, the retries (grouped into one delayed batch per wait), the
    permanent failures, the dead addresses, and how long the gateway asked everyone to hold off."""
    t = Tally()
    again: list[Target] = []
    pushed_back: list[Target] = []
    for target, result in zip(targets, results, strict=True):
        outcome = result.outcome
        if outcome is Outcome.SENT:
            t.sent += 1
            if result.reason:
                t.via[result.reason] += 1
            continue
        reason = result.reason or outcome.value
        t.errors[reason] += 1
        if outcome is Outcome.FAILED and reason in PAUSING:
            # Every other recipient would fail the same way: keep this one for after the fix, stop the job.
            pushed_back.append(target)
            t.pause = reason
        elif outcome is Outcome.RETRY and result.retry_after is not None:
            pushed_back.append(target)
            t.hold = max(t.hold, result.retry_after)
        elif outcome is Outcome.RETRY and attempt < retries:
            again.append(target)
        else:
            if outcome is Outcome.INVALID:
                t.invalid += 1
                t.dead.append(target.address)
            else:
                t.failed += 1
                if outcome is Outcome.RETRY:
                    reason = f"{reason} (gave up after {attempt + 1} attempts)"
            t.failures.append(json.dumps({"address": target.address, "outcome": outcome.value, "reason": reason,
                                          "at": round(now, 3)}, separators=(",", ":")))
    if pushed_back:
        # Back-pressure is the provider's limit, not the recipient's fault: the same attempt, after the hold.
        t.delayed.append((now + t.hold, _delayed_member(attempt, pushed_back)))
    if again:
        t.delayed.append((now + backoff(attempt, rng), _delayed_member(attempt + 1, again)))
    t.retrying = len(pushed_back) + len(again)
    return t


def _delayed_member(attempt: int, targets: Sequence[Target]) -> str:
    pairs: list[str] = []
    for target in targets:
        pairs += [target.address, json.dumps(dict(target.fields), separators=(",", ":")) if target.fields else "{}"]
    return f"{attempt} {len(targets)} {os.urandom(6).hex()} {json.dumps(pairs, separators=(',', ':'))}"


def targets_of(job_id: str, data: str) -> list[Target]:
    flat = json.loads(data)
    if isinstance(flat, dict):  # Lua's cjson writes an empty list as {}
        return []
    return [Target(address, json.loads(fields) if fields != "{}" else {}, idempotency_key(job_id, address))
            for address, fields in zip(flat[::2], flat[1::2], strict=True)]


def _entries(reply: Any) -> list[tuple[str, str, list[tuple[str, dict[str, str]]]]]:
    """XREADGROUP's reply as (stream, job id, [(entry id, fields)])."""
    out = []
    for stream, items in reply or ():
        stream = reply_text(stream)
        out.append((stream, stream.rsplit(":", 2)[-2], _items(items)))
    return out


def _items(items: Any) -> list[tuple[str, dict[str, str]]]:
    result: list[tuple[str, dict[str, str]]] = []
    for item in items or ():
        if not item:
            continue
        entry_id, flat = item
        if flat is None:  # deleted while pending
            result.append((reply_text(entry_id), {}))
            continue
        values = [reply_text(v) for v in flat]
        result.append((reply_text(entry_id), dict(zip(values[::2], values[1::2], strict=True))))
    return result


class JobWorkers(Service):
    """`count` job consumers of this process and their housekeeper."""

    log = Logger()

    def __init__(self, reactor: Any, store: JobStore, command_link: Any, blocking_link: Callable[[], Any],
                 gateways: Mapping[str, Gateway], count: int, *, visibility: float = 30.0, tick: float = 1.0,
                 gateway_rates: Mapping[str, float] | None = None, name: str = "",
                 gate: ReactorLag | None = None) -> None:
        """`gate`: on a node, what keeps batches off the reactor while the live traffic needs it (jobs/lag.py)."""
        self.reactor = reactor
        self.store = store
        self._link = command_link
        self._blocking_link = blocking_link
        self.gateways = dict(gateways)
        self.count = count
        self.visibility = visibility
        self.tick = tick
        self.gateway_rates = dict(gateway_rates or {})
        self.process_id = name or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.jobs: dict[str, LiveJob] = {}
        self.batches = 0
        self._stopping = False
        self._changed: list[defer.Deferred[None]] = []
        self._loops: list[defer.Deferred[None]] = []
        self._links: list[Any] = []
        self._expanding: set[str] = set()
        self._testing: set[str] = set()
        self._housekeeper = task.LoopingCall(self._housekeep)
        self._housekeeper.clock = reactor
        self._last_claim: dict[str, float] = {}
        self._failing_since: float | None = None
        self._ticks = 0
        self.gate = gate

    # -- lifetime -------------------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.gate is not None:
            self.gate.start()
        self._housekeeper.start(self.tick, now=True).addErrback(
            lambda f: self.log.failure("job housekeeping stopped", f))
        for n in range(self.count):
            link = self._blocking_link()
            self._links.append(link)
            consumer = f"{self.process_id}/{n}"
            self._loops.append(defer.ensureDeferred(self._consume(consumer, link)))

    async def _stop(self) -> None:
        self._stopping = True
        if self._housekeeper.running:
            self._housekeeper.stop()
        self._wake()
        if self.gate is not None:
            self.gate.stop()
        # Each consumer finishes the batch in its hands (SIGTERM); one blocked in XREADGROUP returns within
        # BLOCK_MS, and the batch it may then read stays pending for another worker to claim.
        await defer.DeferredList(self._loops)
        for link in self._links:
            link.disconnect()
        await self._link.call("hdel", self.store.keys.prefix + "job-workers", self.process_id).addErrback(
            lambda _: None)
        for gateway in self.gateways.values():
            await gateway.close()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    def _wake(self) -> None:
        waiting, self._changed = self._changed, []
        for d in waiting:
            d.callback(None)

    def _until_changed(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._changed.append(d)
        return d

    # -- housekeeping ----------------------------------------------------------------------------------------

    async def _housekeep(self) -> None:
        try:
            await self._look()
        except Exception as e:  # Redis away: the next tick tries again; one line when it starts, one when it ends
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                self.log.warn("job workers paused: Redis does not answer ({error}); trying every {tick:g} s",
                              error=e, tick=self.tick)
            return
        if self._failing_since is not None:
            self.log.info("job workers go on: Redis answers again after {seconds:.1f} s",
                          seconds=time.monotonic() - self._failing_since)
            self._failing_since = None

    async def _look(self) -> None:
        keys = self.store.keys
        flat = await self.store.eval(scripts.LIVE, [keys.live], [keys.prefix + "job:"])
        values = [reply_text(v) for v in flat or ()]
        jobs: dict[str, LiveJob] = {}
        for i in range(0, len(values), 4):
            job_id, state, spec, expanded = values[i:i + 4]
            known = self.jobs.get(job_id)
            jobs[job_id] = LiveJob(job_id, state, known.spec if known else model.JobSpec.from_json(spec),
                                   expanded == "1")
        self.jobs = {j: job for j, job in jobs.items() if job.spec.gateway in self.gateways}
        now = time.time()
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "consumers": self.count,
                             "gateways": sorted(self.gateways), "seen": round(now, 3), "batches": self.batches})
        await self._link.call("hset", keys.prefix + "job-workers", self.process_id, record)
        self._ticks += 1
        if self._ticks % WORKER_PRUNE_TICKS == 1:
            await self._prune_worker_records(now)
        for job in self.jobs.values():
            if job.state == model.TESTING and job.job_id not in self._testing:
                self._testing.add(job.job_id)
                defer.ensureDeferred(self._test(job)).addBoth(self._done_with, self._testing, job.job_id)
            elif job.state == model.SCHEDULED and job.spec.start_at <= now:
                await self.store.transition(job.job_id, "start").addErrback(lambda _: None)
            elif job.state == model.RUNNING:
                if not job.expanded and job.job_id not in self._expanding:
                    self._expanding.add(job.job_id)
                    defer.ensureDeferred(self._expand(job)).addBoth(self._done_with, self._expanding, job.job_id)
                await self.store.eval(scripts.PROMOTE, [keys.delayed(job.job_id), keys.queue(job.job_id),
                                                        keys.job(job.job_id)], [f"{now:.3f}", 100])
        self._wake()

    def _done_with(self, result: object, busy: set[str], job_id: str) -> None:
        busy.discard(job_id)
        if isinstance(result, Failure):
            self.log.warn("job {job}: {error}", job=job_id, error=result.value)

    async def _prune_worker_records(self, now: float) -> None:
        """Forget the records of worker processes that stopped without saying so (kill -9, a lost machine)."""
        key = self.store.keys.prefix + "job-workers"
        records = await self._link.call("hgetall", key)
        stale = []
        for name, value in (records or {}).items():
            try:
                seen = float(json.loads(reply_text(value)).get("seen", 0))
            except (ValueError, AttributeError):
                seen = 0.0
            if now - seen > WORKER_RECORD_TICKS * self.tick * 12:
                stale.append(reply_text(name))
        if stale:
            await self._link.call("hdel", key, *stale)

    async def _lease(self, job_id: str, renew: bool = False) -> bool:
        ms = str(int(self.visibility * 1000))
        if renew:
            ok = await self._link.call("execute_command", "SET", self.store.keys.lease(job_id), self.process_id,
                                       "XX", "PX", ms)
        else:
            ok = await self._link.call("execute_command", "SET", self.store.keys.lease(job_id), self.process_id,
                                       "NX", "PX", ms)
        return ok is not None and reply_text(ok) == "OK"

    async def _expand(self, job: LiveJob) -> None:
        """Turn the audience into batches in the job's queue, a few at a time, while this process holds the
        job's lease (a process that dies mid-way leaves the cursor in the job for the next one)."""
        if not await self._lease(job.job_id):
            return
        keys = self.store.keys
        try:
            while not self._stopping:
                cursor = await self._link.call("hget", keys.job(job.job_id), "cursor")
                result = await self.store.eval(scripts.EXPAND, [
                    keys.job(job.job_id), keys.audience(job.spec.audience), keys.queue(job.job_id)], [
                    reply_text(cursor or "0"), job.spec.batch, job.spec.batch, EXPAND_BATCHES])
                if int(result[0]) < 0 or int(result[2]) == 1:
                    if int(result[0]) >= 0:
                        self.log.info("job {job}: audience expanded", job=job.job_id)
                        await self._settle(job, "", Tally(), redelivered=0)  # an empty audience is done now
                    return
                await self._lease(job.job_id, renew=True)
        finally:
            await self._link.call("delete", keys.lease(job.job_id)).addErrback(lambda _: None)

    async def _test(self, job: LiveJob) -> None:
        """The job's one test message, before anyone confirms the real run."""
        if not await self._lease(job.job_id):
            return
        try:
            target = Target(job.spec.test_to, {}, f"{job.job_id}-test")
            result = (await self.gateways[job.spec.gateway].send(job.message, [target]))[0]
            report = {"address": job.spec.test_to, "outcome": result.outcome.value, "reason": result.reason,
                      "at": round(time.time(), 3)}
            await self.store.transition(job.job_id, "tested", test=report).addErrback(lambda _: None)
        finally:
            await self._link.call("delete", self.store.keys.lease(job.job_id)).addErrback(lambda _: None)
        self.log.info("job {job}: test message to {address}: {outcome}", job=job.job_id, address=job.spec.test_to,
                      outcome=result.outcome.value)

    # -- consuming --------------------------------------------------------------------------------------------

    def _running(self) -> list[LiveJob]:
        return [job for job in self.jobs.values() if job.state == model.RUNNING]

    async def _consume(self, consumer: str, link: Any) -> None:
        while not self._stopping:
            jobs = self._running()
            if not jobs:
                await self._until_changed()
                continue
            if self.gate is not None:
                await self.gate.clear()
                if self._stopping:
                    break
            try:
                work = await self._claim(consumer, link, jobs)
                if not work:
                    work = await self._read(consumer, link, jobs)
            except Exception as e:  # a queue deleted under us (job done), or Redis away: look again next tick
                if not self._stopping:
                    self.log.debug("job consumer {consumer}: {error}", consumer=consumer, error=e)
                    await self._until_changed()
                continue
            for job_id, entry_id, fields, redelivered in work:
                job = self.jobs.get(job_id)
                if job is None:
                    continue
                keeper = task.LoopingCall(self._keep, link, job, consumer, entry_id)
                keeper.clock = self.reactor
                keeper.start(self.visibility / 3, now=False)
                try:
                    await self._process(job, entry_id, fields, redelivered)
                except Exception as e:  # Redis away mid-batch: the batch stays pending and is claimed again
                    self.log.warn("job {job}: batch {entry} left for another try: {error}", job=job_id,
                                  entry=entry_id, error=e)
                finally:
                    keeper.stop()

    def _keep(self, link: Any, job: LiveJob, consumer: str, entry_id: str) -> defer.Deferred[Any]:
        """Still working on it (a slow rate, a long hold): reset the batch's idle time so nobody claims it."""
        d: defer.Deferred[Any] = link.call("execute_command", "XCLAIM", self.store.keys.queue(job.job_id), scripts.GROUP, consumer,
                         "0", entry_id, "JUSTID")
        return d.addErrback(lambda _: None)

    async def _claim(self, consumer: str, link: Any, jobs: list[LiveJob]) -> list[tuple[str, str, dict[str, str],
                                                                                      bool]]:
        """A batch whose consumer has held it past the visibility timeout (died, or hung), taken over."""
        now = time.monotonic()
        work = []
        for job in jobs:
            if now - self._last_claim.get(job.job_id, 0.0) < self.visibility / 4:
                continue
            self._last_claim[job.job_id] = now
            reply = await link.call("execute_command", "XAUTOCLAIM", self.store.keys.queue(job.job_id),
                                    scripts.GROUP, consumer, str(int(self.visibility * 1000)), "0-0", "COUNT", "1")
            for entry_id, fields in _items(reply[1] if reply else ()):
                work.append((job.job_id, entry_id, fields, True))
            if work:
                break
        return work

    async def _read(self, consumer: str, link: Any, jobs: list[LiveJob]) -> list[tuple[str, str, dict[str, str],
                                                                                     bool]]:
        streams = [self.store.keys.queue(job.job_id) for job in jobs]
        reply = await link.call("execute_command", "XREADGROUP", "GROUP", scripts.GROUP, consumer, "COUNT", "1",
                                "BLOCK", str(BLOCK_MS), "STREAMS", *streams, *([">"] * len(streams)),
                                timeout=BLOCK_MS / 1000 + 10)
        return [(job_id, entry_id, fields, False)
                for _, job_id, items in _entries(reply) for entry_id, fields in items]

    async def _process(self, job: LiveJob, entry_id: str, fields: dict[str, str], redelivered: bool) -> None:
        targets = targets_of(job.job_id, fields.get("d", "[]"))
        attempt = int(fields.get("a", "0") or 0)
        if targets:
            await self._take(job, len(targets))
            results = await self.gateways[job.spec.gateway].send(job.message, targets)
        else:
            results = []
        t = tally(results, targets, attempt, job.spec.retries, time.time())
        if t.hold > 0:
            await self.store.eval(scripts.HOLD, [self.store.keys.gateway_hold(job.spec.gateway)],
                                  [int(t.hold * 1000)])
        await self._settle(job, entry_id, t, redelivered=len(targets) if redelivered else 0)
        self.batches += 1
        if t.pause:
            why = "refused pushd's credentials" if t.pause == AUTH else "answers show a wrong setting"
            self.log.warn("job {job} paused: {gateway} {why} ({reason}); fix the gateway's settings, then pushctl "
                          "job resume {job}", job=job.job_id, gateway=job.spec.gateway, why=why, reason=t.pause)
            job.state = model.PAUSED
            await self.store.transition(job.job_id, "pause").addErrback(lambda _: None)

    async def _take(self, job: LiveJob, tokens: int) -> None:
        """Wait for the job's and the gateway's rate and for any hold the gateway asked for."""
        keys = self.store.keys
        gateway_rate = self.gateway_rates.get(job.spec.gateway, 0.0)
        while True:
            wait = int(await self.store.eval(scripts.TAKE, [
                keys.bucket(job.job_id), keys.gateway_bucket(job.spec.gateway), keys.gateway_hold(job.spec.gateway)],
                [tokens, job.spec.rate, gateway_rate]))
            if wait <= 0:
                return
            await task.deferLater(self.reactor, wait / 1000)

    async def _settle(self, job: LiveJob, entry_id: str, t: Tally, *, redelivered: int) -> None:
        keys, spec = self.store.keys, job.spec
        audience = keys.audience(spec.audience) if t.dead or spec.private else ""
        compact = (",", ":")
        await self.store.eval(scripts.SETTLE, [
            keys.job(job.job_id), keys.queue(job.job_id), keys.delayed(job.job_id), keys.failures(job.job_id),
            audience, keys.live], [
            entry_id, f"{time.time():.3f}", t.sent, t.failed, t.invalid, t.retrying, redelivered,
            json.dumps(t.errors or {}, separators=compact), json.dumps(t.via or {}, separators=compact),
            json.dumps(t.delayed, separators=compact), json.dumps(t.failures, separators=compact),
            json.dumps(t.dead, separators=compact), "1" if spec.private else "0"])
