"""Job workers as part of a node, or as a process of their own (`twistd pushd-worker`, `pushctl worker`).

A worker-only process needs nothing but the Redis the nodes share and the gateway settings, so a big job
scales out to as many processes and machines as there are cores, while the nodes keep their reactors for live
traffic (`--job-workers 0` on the nodes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from pushd.config import Config, ConfigError, Options, build_config
from pushd.daemon import StartupReport
from pushd.gateways.configured import build_gateways
from pushd.jobs.lag import ReactorLag
from pushd.jobs.store import JobStore
from pushd.jobs.worker import JobWorkers
from pushd.redis.client import RedisLink
from pushd.redis.target import RedisTarget, parse_redis_url
from pushd.tasks import TaskPool, TaskRunner


def job_workers(reactor: Any, config: Config, tasks: TaskRunner, link: RedisLink, on_node: bool = False) -> JobWorkers:
    """This process's job workers and the gateways they send through; ConfigError for a bad gateway setting.

    `on_node`: they share the reactor with live connections and give way to them (`job-yield-lag`)."""
    target = link.target

    def blocking_link() -> RedisLink:
        return RedisLink(reactor, target, timeout=config.redis_timeout)

    gateways = build_gateways(reactor, config, tasks, link, blocking_link)
    return JobWorkers(reactor, JobStore(link, config.key_prefix), link, blocking_link, gateways, config.job_workers,
                      visibility=config.job_visibility_timeout, gateway_rates=config.gateway_rates,
                      gate=ReactorLag(reactor, config.job_yield_lag / 1000) if on_node and config.job_yield_lag
                      else None)


def find_redis(config: Config, runtime_file: str) -> Config:
    """The config with its Redis, else with the Redis and key prefix of the node running here (its runtime file)."""
    if config.redis is not None:
        return config
    try:
        with open(runtime_file, encoding="utf-8") as f:
            info = json.load(f)
        os.kill(int(info["pid"]), 0)
        return dataclasses.replace(config, redis=parse_redis_url(info["redis"]),
                                   key_prefix=info.get("key_prefix", config.key_prefix))
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"redis: not given, and no pushd node is running here (no live {runtime_file}); "
                          "give --redis URL, the Redis the nodes use") from None


class WorkerProcess(MultiService):
    """Job workers and nothing else."""

    log = Logger()

    def __init__(self, reactor: Any, config: Config, startup: StartupReport | None = None,
                 stop_reactor: bool = True) -> None:
        """`config` with its Redis found (find_redis). `stop_reactor`: end the process when start-up fails
        (twistd); `pushctl worker` ends it itself."""
        super().__init__()
        assert config.redis is not None, "find_redis() first"
        self._stop_reactor = stop_reactor
        self.startup = startup or StartupReport(None)
        self.reactor = reactor
        self.config = config
        self.target: RedisTarget = config.redis
        self.tasks = TaskPool(reactor, config.task_workers)
        self.tasks.setServiceParent(self)
        self.link: RedisLink | None = None
        self.workers: JobWorkers | None = None
        self.ready: defer.Deferred[None] = defer.Deferred()

    def privilegedStartService(self) -> None:
        self.startup.take_over()
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self.ready.addCallback(lambda _: self.startup.succeeded())
        defer.ensureDeferred(self._start()).addCallbacks(self.ready.callback, self._failed)

    async def _start(self) -> None:
        self.link = RedisLink(self.reactor, self.target, timeout=self.config.redis_timeout)
        try:
            await self.link.call("ping")
        except Exception as e:
            raise ConfigError(f"redis: cannot reach {self.target.display}: {e}") from None
        self.workers = job_workers(self.reactor, self.config, self.tasks, self.link)
        self.workers.startService()
        self.log.info("pushd worker ready: {count} job workers, gateways {gateways}, Redis {redis}",
                      count=self.config.job_workers, gateways=" ".join(sorted(self.workers.gateways)),
                      redis=self.target.display)

    def _failed(self, failure: Any) -> None:
        if failure.check(ConfigError):
            message = str(failure.value)
        else:
            self.log.failure("unexpected start-up failure", failure)
            message = f"start-up failed: {failure.getErrorMessage()}"
        self.log.critical("pushd worker: {message}", message=message)
        self.ready.errback(failure)
        self.ready.addErrback(lambda _: None)
        if self._stop_reactor:
            self.startup.failed(message)
            self.reactor.callLater(0, self.reactor.stop)

    def stopService(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self.workers is not None and self.workers.running:
            await self.workers.stopService()
        if self.link is not None:
            await self.link.disconnect()
        await MultiService.stopService(self)
        self.log.info("pushd worker stopped")


def make_worker(options: Options, runtime_file: str, parent: Any = None) -> WorkerProcess:
    """The worker process from parsed options; a bad setting ends the process with one line on stderr."""
    from twisted.internet import reactor

    try:
        config = build_config(options.given(), options["config"])
        if config.job_workers == 0:
            raise ConfigError("job-workers: 0 here would run nothing; a worker process needs at least 1")
        config = find_redis(config, runtime_file)
    except ConfigError as e:
        sys.stderr.write(f"pushd-worker: {e}\n")
        raise SystemExit(1) from None
    return WorkerProcess(reactor, config, StartupReport(parent))
