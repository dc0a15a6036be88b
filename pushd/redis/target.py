"""Redis URLs (`redis://`, `rediss://`, `unix://`, `sentinel://`) parsed into a `RedisTarget`.

Pure parsing, so a bad `--redis` value is refused at start-up with one line that says what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

SCHEMES = "redis://, rediss://, unix://, sentinel://"


@dataclass(frozen=True)
class RedisTarget:
    scheme: str
    host: str = ""
    port: int = 6379
    path: str = ""
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int | None = None
    username: str | None = None
    password: str | None = None

    @property
    def display(self) -> str:
        """The URL without its password, for logs and error messages."""
        db = f"/{self.db}" if self.db is not None else ""
        if self.scheme == "unix":
            return f"unix://{self.path}" + (f"?db={self.db}" if self.db is not None else "")
        if self.scheme == "sentinel":
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel://{hosts}/{self.master}"
        return f"{self.scheme}://{self.host}:{self.port}{db}"

    def url(self) -> str:
        """The full URL, password included (for the runtime file that `pushctl publish` reads)."""
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:{self.password}@"
        if self.scheme == "unix":
            query = []
            if self.db is not None:
                query.append(f"db={self.db}")
            if self.password is not None:
                query.append(f"password={self.password}")
            return f"unix://{self.path}" + ("?" + "&".join(query) if query else "")
        if self.scheme == "sentinel":
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel://{auth}{hosts}/{self.master}" + (f"?db={self.db}" if self.db is not None else "")
        db = f"/{self.db}" if self.db is not None else ""
        return f"{self.scheme}://{auth}{self.host}:{self.port}{db}"


def _port(text: str, url: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"{url!r} has a bad port {text!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"{url!r} has a port out of range ({port})")
    return port


def _db(text: str | None, url: str) -> int | None:
    if text in (None, ""):
        return None
    assert text is not None
    if not text.isdigit():
        raise ValueError(f"{url!r} has a bad database number {text!r}")
    return int(text)


def _host_port(item: str, url: str) -> tuple[str, int]:
    host, sep, port = item.rpartition(":")
    if not sep:
        return item, 26379
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"{url!r} has an empty host")
    return host, _port(port, url)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a Redis URL; raises ValueError with a message naming what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss", "unix", "sentinel"):
        raise ValueError(f"{url!r} is not a Redis URL ({SCHEMES})")
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else query.get("password")

    if scheme == "unix":
        if not parts.path:
            raise ValueError(f"{url!r} has no socket path (unix:///path/to/redis.sock)")
        return RedisTarget("unix", path=parts.path, db=_db(query.get("db"), url), password=password)

    if scheme == "sentinel":
        netloc = rest.split("/", 1)[0].rpartition("@")[2]
        master = parts.path.strip("/")
        if not netloc:
            raise ValueError(f"{url!r} names no Sentinel (sentinel://host:port[,host:port]/master-name)")
        if not master:
            raise ValueError(f"{url!r} names no master (sentinel://host:port[,host:port]/master-name)")
        sentinels = tuple(_host_port(item, url) for item in netloc.split(",") if item)
        return RedisTarget("sentinel", sentinels=sentinels, master=master, db=_db(query.get("db"), url),
                           username=username, password=password)

    try:
        host = parts.hostname
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} has a bad port") from None
    if not host:
        raise ValueError(f"{url!r} has no host")
    return RedisTarget(scheme, host=host, port=port or 6379, db=_db(parts.path.strip("/"), url),
                       username=username, password=password)
