"""Push jobs in Redis: creating, reading, listing and changing them (the scripts are pushd/jobs/scripts.py).

The CLI, the HTTP API and the workers all go through `JobStore`, so a job looks the same whoever asks.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from pushd.jobs import model, scripts
from pushd.jobs.audience import Audiences, Recipient, Rejected, audience_key
from pushd.redis.client import reply_text

#: Failures `show` returns inline; the rest are read with `failures()`.
FAILURES_PAGE = 1000


class JobNotFound(LookupError):
    pass


class JobConflict(ValueError):
    """The job's state does not allow the action (confirm a running job, resume a finished one)."""


@dataclass(frozen=True)
class JobKeys:
    prefix: str

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def queue(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:queue"

    def delayed(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:delayed"

    def failures(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:failures"

    def bucket(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:bucket"

    def lease(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:lease"

    def audience(self, name: str) -> str:
        return audience_key(self.prefix, name)

    @property
    def index(self) -> str:
        return f"{self.prefix}jobs"

    @property
    def live(self) -> str:
        return f"{self.prefix}jobs:live"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}job-key:{key}"

    def gateway_bucket(self, gateway: str) -> str:
        return f"{self.prefix}gateway:{gateway}:bucket"

    def gateway_hold(self, gateway: str) -> str:
        return f"{self.prefix}gateway:{gateway}:hold"


def _hash(flat: Any) -> dict[str, str]:
    items = [reply_text(v) for v in flat or ()]
    return dict(zip(items[::2], items[1::2], strict=True))


class JobStore:
    """Jobs through `link` (`RedisLink.call`)."""

    def __init__(self, link: Any, prefix: str) -> None:
        self._link = link
        self.keys = JobKeys(prefix)

    @property
    def link(self) -> Any:
        return self._link

    def eval(self, script: str, keys: list[str], args: list[Any]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self._link.call("eval", script, keys, [str(a) for a in args])
        return d

    @defer.inlineCallbacks
    def create(self, spec: model.JobSpec, now: float | None = None) -> Any:
        """(job id, created): created is False when `spec.key` named a job within the key window."""
        now = time.time() if now is None else now
        job_id = model.new_job_id(now)
        k = self.keys
        result = yield self.eval(scripts.CREATE, [
            k.job(job_id), k.index, k.live, k.idempotency(spec.key) if spec.key else "", k.queue(job_id),
            k.audience(spec.audience)], [
            job_id, spec.to_json(), model.first_state(spec, now), f"{now:.3f}", model.KEY_WINDOW,
            "0" if spec.private else "1"])
        first, created = reply_text(result[0]), int(result[1])
        if created < 0:
            raise model.JobError(f"audience: no audience {spec.audience!r} (import it with pushctl audience import)")
        return first, bool(created)

    @defer.inlineCallbacks
    def submit(self, fields: Mapping[str, Any], rows: Iterable[Recipient | Rejected] | None = None,
               rejected: Callable[[Rejected], None] | None = None) -> Any:
        """(job id, created, state) for a job from API or CLI fields; with `rows`, the recipients go into an
        audience of the job's own first (deleted when the job ends)."""
        fields = dict(fields)
        if rows is None:
            spec = model.parse_spec(fields)
        else:
            name = f"job-{os.urandom(8).hex()}"
            spec = model.parse_spec({**fields, "audience": name}, own_audience=True)  # before anything is written
            report = yield Audiences(self._link, self.keys.prefix).load(name, rows, rejected or (lambda row: None))
            if report.size == 0:
                yield self._link.call("delete", self.keys.audience(name))
                yield self._link.call("srem", f"{self.keys.prefix}audiences", name)
                raise model.JobError("recipients: no usable recipient")
        job_id, created = yield self.create(spec)
        state = (yield self.raw(job_id))["state"]
        return job_id, created, state

    @defer.inlineCallbacks
    def raw(self, job_id: str) -> Any:
        fields = _hash((yield self._link.call("execute_command", "HGETALL", self.keys.job(job_id))))
        if not fields:
            raise JobNotFound(job_id)
        return fields

    @defer.inlineCallbacks
    def show(self, job_id: str) -> Any:
        """The job's report (model.progress), with the count of recorded failures."""
        raw = yield self.raw(job_id)
        report = model.progress(raw)
        report["retrying"] = max(report["retrying"], 0)
        report["failures"] = int((yield self._link.call("execute_command", "LLEN", self.keys.failures(job_id))))
        return report

    @defer.inlineCallbacks
    def failures(self, job_id: str, start: int = 0, count: int = FAILURES_PAGE) -> Any:
        """Recorded permanent failures, as dicts {address, outcome, reason, at}."""
        yield self.raw(job_id)
        lines = yield self._link.call("execute_command", "LRANGE", self.keys.failures(job_id),
                                      str(start), str(start + count - 1))
        return [json.loads(reply_text(line)) for line in lines or ()]

    @defer.inlineCallbacks
    def list(self, limit: int = 50) -> Any:
        """The newest jobs first, as reports."""
        ids = yield self._link.call("execute_command", "ZREVRANGE", self.keys.index, "0", str(limit - 1))
        reports = []
        for job_id in ids or ():
            try:
                reports.append((yield self.show(reply_text(job_id))))
            except JobNotFound:
                continue
        return reports

    @defer.inlineCallbacks
    def transition(self, job_id: str, action: str, *, test: Mapping[str, Any] | None = None,
                   now: float | None = None) -> Any:
        """Confirm, pause, resume, cancel (users) or start, tested (workers); JobConflict when not allowed."""
        now = time.time() if now is None else now
        raw = yield self.raw(job_id)
        spec = model.JobSpec.from_json(raw["spec"])
        k = self.keys
        result = yield self.eval(scripts.TRANSITION, [
            k.job(job_id), k.live, k.queue(job_id), k.delayed(job_id), k.audience(spec.audience)], [
            action, f"{now:.3f}", model.after_confirmation(spec, now), json.dumps(test or {}),
            "1" if spec.private else "0"])
        changed, state = int(result[0]), reply_text(result[1])
        if not changed:
            raise JobConflict(f"job {job_id} is {state}: cannot {action} it")
        return state
