"""What `pushctl job ...` does, apart from parsing its options (pushd/cli.py): create, read, change and watch jobs.

The watch display is a pure function of the job's report, the samples taken so far and the live workers, so it
is tested without a terminal; `watch` only polls and draws.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import IO, Any

from twisted.internet import defer, task

from pushd.jobs import model
from pushd.jobs.store import JobStore
from pushd.redis.client import reply_text

#: Seconds between two looks while watching; the rate is measured over the last RATE_WINDOW seconds.
WATCH_INTERVAL = 0.25
RATE_WINDOW = 5.0
#: A worker process whose record is older than this is not shown as live.
WORKER_FRESH = 5.0


@defer.inlineCallbacks
def live_workers(link: Any, prefix: str, now: float | None = None) -> Any:
    """The worker processes that reported within WORKER_FRESH seconds."""
    now = time.time() if now is None else now
    flat = yield link.call("hgetall", f"{prefix}job-workers")
    records = []
    for value in (flat or {}).values():
        try:
            record = json.loads(reply_text(value))
        except ValueError:
            continue
        if now - float(record.get("seen", 0)) <= WORKER_FRESH:
            records.append(record)
    return records


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def format_report(report: Mapping[str, Any]) -> str:
    """`pushctl job show`: the job's spec, state, counts, timings, errors and test result."""
    spec = report["spec"]
    lines = [f"job {report['id']}: {report['state']}",
             f"  gateway {spec['gateway']}{' (fallback ' + spec['fallback'] + ')' if spec['fallback'] else ''}, "
             f"audience {spec['audience']}{' (its own)' if spec['private'] else ''}, batch {spec['batch']}"
             + (f", rate {spec['rate']:g}/s" if spec["rate"] else ""),
             f"  title {spec['title']!r}" + (f", body {spec['body']!r}" if spec["body"] else "")]
    if report.get("test"):
        test = report["test"]
        lines.append(f"  test to {test['address']}: {test['outcome']}" + (f" ({test['reason']})" if test["reason"]
                                                                         else ""))
    lines.append(f"  total {_n(report['total'])}{'' if report['expanded'] else ' so far'}: "
                 f"sent {_n(report['sent'])}, failed {_n(report['failed'])}, invalid {_n(report['invalid'])} "
                 f"(removed {_n(report['removed'])}), remaining "
                 f"{_n(report['remaining']) if report['remaining'] is not None else '?'}"
                 + (f", cancelled {_n(report['cancelled'])}" if report["cancelled"] else ""))
    lines.append(f"  retrying {_n(report['retrying'])}, retried {_n(report['retried'])}, redelivered "
                 f"{_n(report['redelivered'])}, duplicates {_n(report['duplicates'])}")
    if report["duration"] is not None:
        lines.append(f"  duration {report['duration']:.1f} s" + (
            f", {report['sent'] / report['duration']:,.0f} sent/s" if report["duration"] > 0 else ""))
    if report["sent_via"]:
        lines.append("  sent via: " + ", ".join(f"{k} {v:,}" for k, v in sorted(report["sent_via"].items())))
    if report["errors"]:
        ranked = sorted(report["errors"].items(), key=lambda item: -item[1])
        lines.append("  errors: " + ", ".join(f"{k} {v:,}" for k, v in ranked))
    if report.get("failures"):
        lines.append(f"  {report['failures']:,} permanent failures recorded (--failures FILE writes them)")
    return "\n".join(lines)


def rate(samples: Iterable[tuple[float, int]]) -> float | None:
    """Recipients per second over the samples (time, done)."""
    points = list(samples)
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def done_count(report: Mapping[str, Any]) -> int:
    return int(report["sent"] + report["failed"] + report["invalid"])


def watch_line(report: Mapping[str, Any], samples: Iterable[tuple[float, int]], workers: int) -> str:
    """One line of progress: counts, rate, ETA, workers and the top error reasons."""
    per_second = rate(samples)
    remaining = report["remaining"]
    eta = f"{remaining / per_second:,.0f} s" if per_second and remaining else "?"
    errors = sorted(report["errors"].items(), key=lambda item: -item[1])[:3]
    return (f"{report['state']}: {done_count(report):,}/{_n(report['total'])}{'' if report['expanded'] else '+'} "
            f"sent {report['sent']:,} failed {report['failed']:,} invalid {report['invalid']:,} "
            f"retrying {report['retrying']:,} remaining {_n(remaining) if remaining is not None else '?'} "
            f"rate {f'{per_second:,.0f}/s' if per_second is not None else '?'} eta {eta} workers {workers}"
            + (f" (none has the {report['gateway']} gateway)" if workers == 0 and report["state"] == "running" else "")
            + (" errors " + " ".join(f"{k}={v:,}" for k, v in errors) if errors else ""))


def list_line(report: Mapping[str, Any]) -> str:
    """`pushctl job list`: one job per line."""
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(report["created"])) if report["created"] else "?"
    return (f"{report['id']}  {created}Z  {report['state']:<21} {report['gateway']:<8} "
            f"{done_count(report):>11,}/{_n(report['total'])} done  sent {report['sent']:,} "
            f"failed {report['failed']:,} invalid {report['invalid']:,}")


class Watch:
    """Polls a job until it is finished, drawing a rich progress bar on a terminal or a line a second elsewhere."""

    def __init__(self, reactor: Any, link: Any, prefix: str, job_id: str, out: IO[str] | None = None) -> None:
        self.reactor = reactor
        self.link = link
        self.prefix = prefix
        self.store = JobStore(link, prefix)
        self.job_id = job_id
        self.out = out or sys.stdout
        self.samples: deque[tuple[float, int]] = deque()
        self.finished: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._last_line = 0.0
        self._progress: Any = None
        self._bars: Any = None
        self._bar: Any = None
        self._detail: Any = None

    def start(self) -> defer.Deferred[dict[str, Any]]:
        if self.out.isatty():
            from rich.console import Group
            from rich.live import Live
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            self._bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                                  MofNCompleteColumn(), TimeRemainingColumn())
            self._bar = self._bars.add_task(self.job_id, total=None)
            self._detail = Text("")
            # The bar, then the counts on lines of their own (they do not fit beside a bar in 80 columns).
            self._progress = Live(Group(self._bars, self._detail), refresh_per_second=4, transient=False)
            self._progress.start()
        self._loop = task.LoopingCall(self._look)
        self._loop.clock = self.reactor
        self._loop.start(WATCH_INTERVAL).addErrback(self._failed)
        return self.finished

    def _failed(self, failure: Any) -> None:
        self._stop_drawing()
        if not self.finished.called:
            self.finished.errback(failure)

    def _stop_drawing(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    @defer.inlineCallbacks
    def _look(self) -> Any:
        report = yield self.store.show(self.job_id)
        workers = [w for w in (yield live_workers(self.link, self.prefix))
                   if report["gateway"] in w.get("gateways", ())]
        now = self.reactor.seconds()
        self.samples.append((now, done_count(report)))
        while self.samples and self.samples[0][0] < now - RATE_WINDOW:
            self.samples.popleft()
        line = watch_line(report, self.samples, len(workers))
        if self._progress is not None:
            self._bars.update(self._bar, total=report["total"] if report["expanded"] else None,
                              completed=done_count(report))
            self._detail.plain = line.replace(" rate ", "\nrate ")
        elif now - self._last_line >= 1.0 or report["state"] in model.FINAL:
            self._last_line = now
            self.out.write(line + "\n")
            self.out.flush()
        if report["state"] in model.FINAL:
            self._loop.stop()
            self._stop_drawing()
            self.finished.callback(report)

    def stop(self) -> None:
        """Ctrl-C: stop drawing; the job goes on."""
        if self._loop.running:
            self._loop.stop()
        self._stop_drawing()


@defer.inlineCallbacks
def write_failures(store: JobStore, job_id: str, path: str, page: int = 5000) -> Any:
    """Every recorded permanent failure as NDJSON; how many."""
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while True:
            rows = yield store.failures(job_id, written, page)
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            written += len(rows)
            if len(rows) < page:
                return written
