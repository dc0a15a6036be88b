"""`makeService(options)`: the service that wires a pushd node together, in start-up order.

Start-up: Redis (the embedded one if none is configured) -> remove the state of an earlier run and of dead
nodes -> PSUBSCRIBE -> accept WebSocket connections. Shutdown runs it backwards: stop accepting, close
clients with 1001, remove this node's state, stop Redis. A failure at start-up is one log line naming the
setting, and the process exits with status 1.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer, endpoints
from twisted.logger import Logger

from pushd import protocol
from pushd.config import Config, ConfigError, Options, build_config
from pushd.hooks import Hooks, apply_on_message, load_hooks
from pushd.hub import Hub
from pushd.redis.client import RedisLink
from pushd.redis.embedded import EmbeddedRedis, EmbeddedRedisError, find_redis_server
from pushd.redis.listener import Listener
from pushd.redis.state import Keys, NodeState
from pushd.tasks import TaskPool
from pushd.tls import CertificateError, default_listen, ensure_localhost_certificate
from pushd.ws import PushFactory


class StartupError(Exception):
    """Start-up cannot go on; the message names the setting at fault."""


def runtime_dir(pidfile: str | None) -> str:
    """The runtime file lives beside the pidfile, so `pushd publish --pidfile X` finds the server of X."""
    return os.path.dirname(os.path.abspath(pidfile)) if pidfile else os.getcwd()


def listen_endpoints(reactor: Any, config: Config) -> list[tuple[str, Any]]:
    """(description, endpoint) for every listen address; the default one gets a generated certificate."""
    descriptions = list(config.listen)
    if not descriptions:
        ensure_localhost_certificate(config.cert_dir)
        descriptions = [default_listen(config.cert_dir)]
    result = []
    for description in descriptions:
        try:
            endpoint = endpoints.serverFromString(reactor, description)
        except Exception as e:
            raise ConfigError(f"listen: {description!r}: {_reason(e)}") from None
        result.append((description, endpoint))
    return result


def _reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


class PushdService(MultiService):
    """One pushd node."""

    log = Logger()

    def __init__(self, reactor: Any, config: Config, hooks: Hooks, listen: list[tuple[str, Any]]) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.hooks = hooks
        self._listen = listen
        self.tasks = TaskPool(reactor, config.task_workers)
        self.tasks.setServiceParent(self)
        self.hub = Hub()
        self.limits = protocol.Limits(config.max_topic_length, config.max_topics)
        self.node_id = ""
        self.embedded: EmbeddedRedis | None = None
        self.redis: RedisLink | None = None
        self.state: NodeState | None = None
        self.listener: Listener | None = None
        self.factory: PushFactory | None = None
        self.ports: list[Any] = []
        self.urls: list[str] = []
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.dropped_messages = 0

    def startService(self) -> None:
        super().startService()
        self._starting = self._start()
        self._starting.addCallbacks(self.ready.callback, self._startup_failed)

    @defer.inlineCallbacks
    def _start(self) -> Any:
        config = self.config
        self.node_id = config.node_id or f"{socket.gethostname()}:{os.getpid()}"
        target = config.redis
        if target is None:
            try:
                self.embedded = EmbeddedRedis(self.reactor, find_redis_server(config.redis_server))
                target = yield self.embedded.start()
            except EmbeddedRedisError as e:
                raise StartupError(str(e)) from None
        assert target is not None
        self.redis = RedisLink(self.reactor, target, timeout=config.redis_timeout)
        try:
            yield self.redis.call("ping")
        except Exception as e:
            raise StartupError(f"redis: cannot reach {target.display}: {_reason(e)}") from None

        self.state = NodeState(self.reactor, self.redis, Keys(config.key_prefix), self.node_id,
                               heartbeat_interval=config.heartbeat_interval, heartbeat_ttl=config.heartbeat_ttl,
                               snapshot=self.hub.snapshot, info=self._info)
        self.hub.observer = self.state
        self.redis.on_lost(lambda conn: self.state.connection_lost() if self.state else None)
        self.redis.on_ready(lambda conn: self.state.connection_ready() if self.state else None)
        try:
            yield self.state.start()
        except Exception as e:
            raise StartupError(f"redis: cannot write this node's state to {target.display}: {_reason(e)}") \
                from None

        self.listener = Listener(self.reactor, target, config.channel_prefix, timeout=config.redis_timeout,
                                 on_message=self.published, begin_batch=self.hub.begin_batch,
                                 flush=self.hub.flush)
        try:
            yield self.listener.start().addTimeout(config.redis_timeout, self.reactor)
        except Exception as e:
            raise StartupError(f"redis: cannot PSUBSCRIBE on {target.display}: {_reason(e)}") from None

        self.factory = PushFactory(
            clock=self.reactor, hub=self.hub, node_id=self.node_id, ws_path=config.ws_path, limits=self.limits,
            max_frame_size=config.max_frame_size, high_water_mark=config.high_water_mark,
            bad_frame_limit=config.bad_frame_limit, ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout, tasks=self.tasks, hooks=self.hooks)
        for description, endpoint in self._listen:
            try:
                port = yield endpoint.listen(self.factory)
            except Exception as e:
                raise StartupError(f"listen: cannot listen on {description!r}: {_reason(e)}") from None
            self.ports.append(port)
            self.urls.append(self._url(description, port))
        yield self.state.register()
        self._write_runtime_file(target.url())
        self.log.info("pushd ready: node {node}, WebSocket at {urls}, Redis {redis}", node=self.node_id,
                      urls=" ".join(self.urls), redis=target.display)

    def _url(self, description: str, port: Any) -> str:
        scheme = "wss" if description.split(":", 1)[0] in ("ssl", "tls") else "ws"
        address = port.getHost()
        host = getattr(address, "host", "localhost")
        if host in ("0.0.0.0", "::", "") or scheme == "wss":
            host = "localhost"
        return f"{scheme}://{host}:{getattr(address, 'port', '')}{self.config.ws_path}"

    def _info(self) -> dict[str, Any]:
        hub = self.hub
        return {"pid": os.getpid(), "urls": self.urls, "connections": len(hub), "pruned": dict(hub.pruned),
                "published": hub.published, "delivered": hub.delivered, "batches": hub.batches,
                "batched_frames": hub.batched_frames, "dropped_messages": self.dropped_messages}

    def _write_runtime_file(self, redis_url: str) -> None:
        info = {"pid": os.getpid(), "node_id": self.node_id, "redis": redis_url, "urls": self.urls,
                "key_prefix": self.config.key_prefix, "channel_prefix": self.config.channel_prefix}
        tmp = self.config.runtime_file + ".tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(info, f)
        os.replace(tmp, self.config.runtime_file)

    def _startup_failed(self, failure: Any) -> None:
        if failure.check(StartupError):
            message = str(failure.value)
        else:
            self.log.failure("unexpected start-up failure", failure)
            message = f"start-up failed: {_reason(failure.value)}"
        self.log.critical("pushd: {message}", message=message)
        if self.ready.called is False:
            self.ready.errback(failure)
            self.ready.addErrback(lambda _: None)
        # twistd has no exit status of its own: leave with 1 once it has shut down and removed its pidfile.
        atexit.register(os._exit, 1)
        self.reactor.callLater(0, self.reactor.stop)

    # -- the hot path's entry ----------------------------------------------------------------------------

    def published(self, topic: str, payload: bytes) -> None:
        """A message arrived from Redis for `topic`."""
        if not protocol.is_valid_topic(topic, self.limits):
            self.dropped_messages += 1
            return
        hook = self.hooks.on_message
        if hook is not None:
            try:
                rewritten = apply_on_message(hook, topic, payload)
            except Exception:
                self.log.failure("on_message hook raised; message on {topic} dropped", topic=topic)
                self.dropped_messages += 1
                return
            if rewritten is None:
                self.dropped_messages += 1
                return
            payload = rewritten
        self.hub.publish(topic, payload)

    # -- shutdown -----------------------------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[Any]:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        for port in self.ports:
            await port.stopListening()
        self.ports = []
        if self.factory is not None:
            await self.factory.close_all("server shutting down", self.config.shutdown_timeout)
        if self.state is not None and self.redis is not None and self.redis.connected:
            try:
                await self.state.stop()
            except Exception as e:
                self.log.warn("could not remove this node's state from Redis: {error}", error=_reason(e))
        if self.listener is not None:
            await self.listener.stop()
        if self.redis is not None:
            await self.redis.disconnect()
        if self.embedded is not None:
            await self.embedded.stop()
        try:
            os.remove(self.config.runtime_file)
        except FileNotFoundError:
            pass
        await MultiService.stopService(self)
        self.log.info("pushd stopped: node {node}", node=self.node_id)


def makeService(options: Options) -> PushdService:
    """Build the node from parsed options; a bad setting ends the process with one line on stderr."""
    from twisted.internet import reactor

    parent = getattr(options, "parent", None)
    pidfile = parent.get("pidfile") if parent is not None else None
    try:
        config = build_config(options.given(), options["config"], runtime_dir=runtime_dir(pidfile))
        hooks = load_hooks(config.hooks)
        listen = listen_endpoints(reactor, config)
    except (ConfigError, CertificateError) as e:
        sys.stderr.write(f"pushd: {e}\n")
        raise SystemExit(1) from None
    return PushdService(reactor, config, hooks, listen)

