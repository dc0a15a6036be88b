"""`makeService(options)`: the service that wires a pushd node together, in start-up order.

Start-up: Redis (the embedded one if none is configured) -> remove the state of an earlier run and of dead
nodes -> PSUBSCRIBE -> accept WebSocket connections. Shutdown runs it backwards: stop accepting, close
clients with 1001, remove this node's state, stop Redis. A failure at start-up is one log line naming the
setting, and the process exits with status 1; a daemonized node also tells the waiting twistd (pushd/daemon.py).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer, endpoints, task
from twisted.logger import Logger

from pushd import protocol
from pushd.api import api_site
from pushd.auth import Permissions, TokenVerifier
from pushd.broadcast import NodeBroadcast
from pushd.cluster import Cluster, parse_control
from pushd.config import Config, ConfigError, Options, build_config
from pushd.daemon import StartupReport
from pushd.endpoints import with_backlog
from pushd.hooks import Hooks, load_hooks
from pushd.hub import FrameCache, Hub
from pushd.jobs.process import job_workers
from pushd.jobs.worker import JobWorkers
from pushd.outage import OutageRecovery
from pushd.recovery import Position
from pushd.redis.client import RedisLink
from pushd.redis.embedded import EmbeddedRedis, EmbeddedRedisError, find_redis_server
from pushd.redis.history import History, HistoryKeys, HistoryPolicies, parse_envelope
from pushd.redis.listener import Listener, MessageHandler
from pushd.redis.state import Keys, NodeState, read_incarnation
from pushd.session import AuthPolicy, Services
from pushd.tasks import TaskPool
from pushd.tls import CertificateError, default_listen, ensure_localhost_certificate
from pushd.transport import write_through
from pushd.ws import CENTRIFUGO, NATIVE, PushFactory


class StartupError(Exception):
    """Start-up cannot go on; the message names the setting at fault."""


def runtime_dir(pidfile: str | None) -> str:
    """The runtime file lives beside the pidfile, so `pushctl publish --pidfile X` finds the server of X."""
    return os.path.dirname(os.path.abspath(pidfile)) if pidfile else os.getcwd()


def listen_endpoints(reactor: Any, config: Config) -> list[tuple[str, Any]]:
    """(description, endpoint) for every listen address; the default one gets a generated certificate."""
    descriptions = list(config.listen)
    if not descriptions:
        ensure_localhost_certificate(config.cert_dir)
        descriptions = [default_listen(config.cert_dir)]
    return [(description, server_endpoint(reactor, "listen", description, config.listen_backlog))
            for description in descriptions]


def server_endpoint(reactor: Any, setting: str, description: str, backlog: int) -> Any:
    """Twisted's endpoint for `description`, with the listen backlog unless the description gives its own."""
    try:
        return endpoints.serverFromString(reactor, with_backlog(description, backlog))
    except Exception as e:
        raise ConfigError(f"{setting}: {description!r}: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def auth_policy(config: Config) -> AuthPolicy:
    """The client-token rules of `config`; a bad key file is a ConfigError naming its setting."""
    try:
        verifier = TokenVerifier.from_settings(
            secret=config.jwt_secret, public_key_file=config.jwt_public_key, jwks_file=config.jwt_jwks,
            audience=config.jwt_audience, issuer=config.jwt_issuer)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return AuthPolicy(mode=config.auth, verifier=verifier, permissions=Permissions(config.public_topics),
                      auth_timeout=config.auth_timeout, refresh_grace=config.refresh_grace)


def history_policies(config: Config) -> HistoryPolicies:
    try:
        return HistoryPolicies.parse(config.history_size, config.history_ttl, config.history_rules)
    except ValueError as e:
        raise ConfigError(f"history-rules: {e}") from None


class PushdService(MultiService):
    """One pushd node."""

    log = Logger()

    def __init__(self, reactor: Any, config: Config, hooks: Hooks, listen: list[tuple[str, Any]],
                 api_listen: tuple[str, Any] | None = None, auth: AuthPolicy | None = None,
                 history: HistoryPolicies | None = None, startup: StartupReport | None = None) -> None:
        super().__init__()
        self.startup = startup or StartupReport(None)
        self.reactor = reactor
        self.config = config
        self.hooks = hooks
        self._listen = listen
        self._api_listen = api_listen
        self.auth = auth or AuthPolicy()
        self.history_policies = history or history_policies(config)
        self.tasks = TaskPool(reactor, config.task_workers)
        self.tasks.setServiceParent(self)
        self.hub = Hub()
        self.limits = protocol.Limits(config.max_topic_length, config.max_topics, config.allow_patterns)
        self.node_id = ""
        self.embedded: EmbeddedRedis | None = None
        self.redis: RedisLink | None = None
        self.state: NodeState | None = None
        self.listener: Listener | None = None
        self.factory: PushFactory | None = None
        self.history: History | None = None
        self.cluster: Cluster | None = None
        self.outage: OutageRecovery | None = None
        self.broadcasts: dict[str, NodeBroadcast] = {}
        #: Runs broadcasts in steps on this node's reactor (stopped at shutdown: clients are closed anyway).
        self.cooperator = task.Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        self.ports: list[Any] = []
        self.api_port: Any = None
        self.api_url = ""
        self.urls: list[str] = []
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.dropped_messages = 0
        self.job_workers: JobWorkers | None = None

    def privilegedStartService(self) -> None:
        self.startup.take_over()
        super().privilegedStartService()

    def startService(self) -> None:
        self.ready.addCallback(lambda _: self.startup.succeeded())
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

        incarnation = yield read_incarnation(self.redis)
        self.state = NodeState(self.reactor, self.redis, Keys(config.key_prefix), self.node_id,
                               heartbeat_interval=config.heartbeat_interval, heartbeat_ttl=config.heartbeat_ttl,
                               snapshot=self.hub.snapshot, info=self._info, count=self.hub.__len__,
                               incarnation=incarnation)
        self.hub.observer = self.state
        self.redis.on_lost(lambda conn: self.state.connection_lost() if self.state else None)
        self.redis.on_ready(lambda conn: self.state.connection_ready() if self.state else None)
        try:
            yield self.state.start()
        except Exception as e:
            raise StartupError(f"redis: cannot write this node's state to {target.display}: {_reason(e)}") \
                from None

        keys = Keys(config.key_prefix)
        history_keys = HistoryKeys(config.key_prefix)
        self.history = History(self.redis, history_keys, self.history_policies,
                               channel_prefix=config.channel_prefix, replay_limit=config.replay_limit)
        redis = self.redis
        self.outage = OutageRecovery(self.reactor, self.hub, self.history,
                                     commands_connected=lambda: redis.connected)
        self.cluster = Cluster(self.redis, keys, self.history, broadcast_window=config.broadcast_window,
                               unavailable=self.outage.unavailable)
        routes: dict[str, MessageHandler] = {
            config.channel_prefix: self.published,
            history_keys.channel(""): self.published_with_history,
            self.cluster.channels.user_prefix: self.user_message,
            self.cluster.channels.control: self.control_message,
        }
        self.listener = Listener(self.reactor, target, routes, timeout=config.redis_timeout,
                                 begin_batch=self.hub.begin_batch, flush=self.hub.flush,
                                 lost=self.outage.listener_lost, back=self._listener_back)
        try:
            yield self.listener.start().addTimeout(config.redis_timeout, self.reactor)
        except Exception as e:
            raise StartupError(f"redis: cannot PSUBSCRIBE on {target.display}: {_reason(e)}") from None
        self.outage.started()

        services = Services(clock=self.reactor, hub=self.hub, limits=self.limits, tasks=self.tasks, hooks=self.hooks,
                            auth=self.auth, history=self.history, presence=self.cluster,
                            bad_frame_limit=config.bad_frame_limit, ping_interval=config.ping_interval,
                            ping_timeout=config.ping_timeout)
        wires = {config.ws_path: NATIVE}
        if config.centrifugo_path:
            wires[config.centrifugo_path] = CENTRIFUGO
        self.factory = PushFactory(
            services=services, node_id=self.node_id, wires=wires, max_frame_size=config.max_frame_size,
            high_water_mark=config.high_water_mark, ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout, origins=config.allowed_origins,
            max_request_size=config.max_request_size, handshake_timeout=config.handshake_timeout,
            incarnation=incarnation)
        for description, endpoint in self._listen:
            try:
                port = yield endpoint.listen(self.factory)
            except Exception as e:
                raise StartupError(f"listen: cannot listen on {description!r}: {_reason(e)}") from None
            write_through(port)
            self.ports.append(port)
            self.urls.append(self._url(description, port))
        if self._api_listen is not None:
            description, endpoint = self._api_listen
            site = api_site(self.cluster, api_keys=config.api_key, max_body=config.api_max_body,
                            limits=self.limits, access_log=config.api_access_log, cors=config.api_cors_origins)
            try:
                self.api_port = yield endpoint.listen(site)
            except Exception as e:
                raise StartupError(f"api-listen: cannot listen on {description!r}: {_reason(e)}") from None
            address = self.api_port.getHost()
            self.api_url = f"http://{getattr(address, 'host', 'localhost')}:{getattr(address, 'port', '')}/api"
            self.log.info("HTTP API at {url} ({keys})", url=self.api_url,
                          keys="bearer keys required" if config.api_key
                          else "no api-key configured: loopback only, no key asked for")
        if config.job_workers:
            try:
                self.job_workers = job_workers(self.reactor, config, self.tasks, self.redis, on_node=True)
            except ConfigError as e:
                raise StartupError(str(e)) from None
            self.job_workers.startService()
        yield self.state.register()
        self._write_runtime_file(target.url())
        self.log.info("pushd ready: node {node}, WebSocket at {urls}, Redis {redis}", node=self.node_id,
                      urls=" ".join(self.urls), redis=target.display)

    def _listener_back(self) -> None:
        if self.outage is not None:
            self.outage.listener_back().addErrback(lambda f: self.log.failure("catch-up after an outage failed", f))

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
                "batched_frames": hub.batched_frames, "dropped_messages": self.dropped_messages,
                "api": self.api_url, "broadcasts_running": len(self.broadcasts), "gaps": hub.gaps,
                "told_lost": dict(hub.told_lost), **(self.outage.info() if self.outage is not None else {})}

    def _write_runtime_file(self, redis_url: str) -> None:
        info = {"pid": os.getpid(), "node_id": self.node_id, "redis": redis_url, "urls": self.urls,
                "api": self.api_url,
                "history": [self.config.history_size, self.config.history_ttl, self.config.history_rules],
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
        self.startup.failed(message)
        self.reactor.callLater(0, self.reactor.stop)

    # -- the hot path's entry ----------------------------------------------------------------------------

    def published_with_history(self, topic: str, envelope: bytes) -> None:
        """A message published with history (HTTP API, the publish script): it carries its position."""
        parsed = parse_envelope(envelope)
        if parsed is None:
            self.dropped_messages += 1
            return
        position, payload = parsed
        self.published(topic, payload, position)

    def published(self, topic: str, payload: bytes, position: Position | None = None) -> None:
        """A message arrived from Redis for `topic`."""
        if not protocol.is_valid_topic(topic, self.limits):
            self.dropped_messages += 1
            return
        if self.hooks.on_message is not None:
            rewritten = self.hooks.rewrite(topic, payload)
            if rewritten is None:
                self.dropped_messages += 1
                return
            payload = rewritten
        self.hub.publish(topic, payload, position)

    def user_message(self, user: str, payload: bytes) -> None:
        """A message for every local connection of `user` (HTTP API), framed once."""
        connections = self.hub.user_connections(user)
        if connections:
            frames = FrameCache(lambda wire: wire.message(payload))
            for conn in connections:
                conn.write(frames.frame(conn.wire))

    def control_message(self, rest: str, message: bytes) -> None:
        """A cluster-wide order from some node's HTTP API: broadcast, or disconnect."""
        parsed = parse_control(message) if rest == "" else None
        if parsed is None or self.factory is None:
            self.log.warn("ignored a malformed control message ({size} bytes)", size=len(message))
            return
        header, payload = parsed
        try:
            op = header["op"]
            if op == "broadcast":
                self._broadcast(str(header["id"]), payload)
            elif op == "disconnect":
                self.factory.disconnect(str(header["conn"]), int(header["code"]), str(header["reason"]))
            elif op == "disconnect_user":
                self.factory.disconnect_user(str(header["user"]), int(header["code"]), str(header["reason"]))
            elif op == "deliver_users":
                self._deliver_users(str(header["reply"]), [str(u) for u in header["users"]], payload)
        except (KeyError, TypeError, ValueError) as e:
            self.log.warn("ignored a control message with a bad field: {error!r}", error=e)

    def _deliver_users(self, reply: str, users: list[str], payload: bytes) -> None:
        """A push job's batch for pushd users (pushd/gateways/pushd.py): deliver to the ones connected here and
        answer which, so the job sends the others through its fallback."""
        frames = FrameCache(lambda wire: wire.message(payload))
        reached = []
        for user in users:
            connections = self.hub.user_connections(user)
            for conn in connections:
                conn.write(frames.frame(conn.wire))
            if connections:
                reached.append(user)
        assert self.redis is not None
        answer = json.dumps({"node": self.node_id, "users": reached}, separators=(",", ":"))
        d = self.redis.call("rpush", reply, answer)
        d.addCallback(lambda _: self.redis.call("expire", reply, 60) if self.redis else None)
        d.addErrback(lambda f: self.log.warn("could not answer a job batch: {error}", error=f.value))

    def _broadcast(self, broadcast_id: str, payload: bytes) -> None:
        cluster = self.cluster
        assert cluster is not None
        frames = FrameCache(lambda wire: wire.broadcast(broadcast_id, payload))

        def report(counts: dict[str, Any]) -> None:
            cluster.report_broadcast(broadcast_id, self.node_id, counts).addErrback(
                lambda f: self.log.warn("could not record broadcast {id} progress: {error}", id=broadcast_id,
                                        error=f.value))

        broadcast = NodeBroadcast(broadcast_id, frames, self.hub, report, self.cooperator)
        self.broadcasts[broadcast_id] = broadcast
        broadcast.start().addBoth(lambda _: self.broadcasts.pop(broadcast_id, None))

    # -- shutdown -----------------------------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[Any]:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        for port in self.ports:
            await port.stopListening()
        self.ports = []
        self.cooperator.stop()
        if self.api_port is not None:
            await self.api_port.stopListening()
            self.api_port = None
        if self.job_workers is not None and self.job_workers.running:
            # SIGTERM: the batches in the workers' hands are finished and recorded while Redis is still here.
            await self.job_workers.stopService()
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
        auth = auth_policy(config)
        history = history_policies(config)
        listen = listen_endpoints(reactor, config)
        api = api_endpoint(reactor, config)
    except (ConfigError, CertificateError) as e:
        sys.stderr.write(f"pushd: {e}\n")
        raise SystemExit(1) from None
    return PushdService(reactor, config, hooks, listen, api, auth, history, StartupReport(parent))


def api_endpoint(reactor: Any, config: Config) -> tuple[str, Any] | None:
    if not config.api_listen:
        return None
    return config.api_listen, server_endpoint(reactor, "api-listen", config.api_listen, config.listen_backlog)

