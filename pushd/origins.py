"""Which web pages may talk to pushd: origin patterns (`https://*.example.com`, `http://127.0.0.1:8000`, `*`).

A browser names the page behind every WebSocket handshake and every cross-site HTTP request in its `Origin`
header, and a page cannot lie about it. Without a check any site a user visits can open a WebSocket to pushd in
the user's name (cross-site WebSocket hijacking) or POST to a key-less API on loopback. The patterns are parsed
once, when the configuration is read, into an `OriginPolicy` that answers with string work only.

Origins compare as browsers compare them: scheme, host and port, the port being the scheme's default when none
is written (`https://a.example` is `https://a.example:443`). Hosts compare case-insensitively.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

#: Ports an origin leaves out: browsers never write these.
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*")
# A host label (a DNS name's, or an IPv4 address's digits), and a bracketed IPv6 literal.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_\-]*[a-z0-9_])?")
_IPV6 = re.compile(r"\[[0-9a-f:.]+\]")
_PORT = re.compile(r"[0-9]{1,5}")

#: The port of a pattern that allows every port (`http://localhost:*`).
ANY_PORT = -1


@dataclass(frozen=True, slots=True)
class Origin:
    """A parsed origin: lower-case scheme and host, and the port (the scheme's default when none was written)."""

    scheme: str
    host: str
    port: int | None


@dataclass(frozen=True, slots=True)
class OriginPattern:
    """`scheme://host[:port]`, where the host may start with `*.` (one or more labels) and the port may be `*`."""

    scheme: str
    #: The host after `*.` when `wildcard`, else the whole host.
    host: str
    wildcard: bool
    port: int | None

    def matches(self, origin: Origin) -> bool:
        if origin.scheme != self.scheme or (self.port != ANY_PORT and origin.port != self.port):
            return False
        if not self.wildcard:
            return origin.host == self.host
        # `*.` stands for one or more whole labels: a.example.com and a.b.example.com, never example.com itself
        # or notexample.com.
        return origin.host.endswith("." + self.host) and len(origin.host) > len(self.host) + 1


@dataclass(frozen=True, slots=True)
class OriginPolicy:
    """The origins allowed by one setting. Empty: none by pattern (a WebSocket handshake falls back on same-host)."""

    patterns: tuple[OriginPattern, ...] = ()
    #: `*` was given: every origin, `null` included.
    allow_any: bool = False

    def matches(self, origin: str) -> bool:
        """True when the `Origin` header's value is allowed by a pattern (`null` and garbage only by `*`)."""
        if self.allow_any:
            return True
        parsed = parse_origin(origin)
        return parsed is not None and any(pattern.matches(parsed) for pattern in self.patterns)

    def allows_handshake(self, origin: str | None, host: str | None) -> bool:
        """The WebSocket rule: no `Origin` (not a browser) passes; with no patterns the page must be served from
        the host and port the request was sent to (its `Host` header); with patterns one must match."""
        if origin is None:
            return True
        if self.allow_any or self.patterns:
            return self.matches(origin)
        return same_host(origin, host)


def parse_origin(text: str) -> Origin | None:
    """An `Origin` header's value as an `Origin`, or None when it is `null` or not a serialized origin."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if (not _SCHEME.fullmatch(scheme) or not host or parts.path or parts.query or parts.fragment
            or parts.username is not None or parts.password is not None):
        return None
    return Origin(scheme, host, port if port is not None else DEFAULT_PORTS.get(scheme))


def same_host(origin: str, host: str | None) -> bool:
    """True when the page's host and port are those of the `Host` header (whose port, when left out, is the
    default of the page's scheme, as the page would have left it out too)."""
    parsed = parse_origin(origin)
    if parsed is None or not host:
        return False
    try:
        target = urlsplit("//" + host.strip())
        port = target.port
    except ValueError:
        return False
    if target.hostname is None or target.path or target.query or target.fragment or target.username is not None:
        return False
    return (target.hostname, port if port is not None else DEFAULT_PORTS.get(parsed.scheme)) == \
        (parsed.host, parsed.port)


def parse_pattern(text: str) -> OriginPattern:
    """One pattern; a ValueError says what is wrong with it."""
    scheme, separator, authority = text.partition("://")
    scheme = scheme.lower()
    if not separator or not _SCHEME.fullmatch(scheme):
        raise ValueError(f"{text!r} is not an origin pattern (expected scheme://host[:port], e.g. "
                         "https://*.example.com or http://127.0.0.1:8000, or * alone)")
    if "/" in authority or "?" in authority or "#" in authority:
        raise ValueError(f"{text!r}: an origin has no path, query or fragment (write {scheme}://host[:port])")
    if "@" in authority:
        raise ValueError(f"{text!r}: an origin has no user name or password")
    host, port = _split_port(text, authority.lower())
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    if _IPV6.fullmatch(host):
        if wildcard:
            raise ValueError(f"{text!r}: '*.' cannot stand before an IPv6 address")
        host = host[1:-1]
    elif not all(_LABEL.fullmatch(label) for label in host.split(".")):
        problem = "'*' may only stand for whole labels at the start of the host, as in *.example.com" \
            if "*" in host else "the host is not a DNS name or IP address"
        raise ValueError(f"{text!r}: {problem}")
    if port is None:
        port = DEFAULT_PORTS.get(scheme)
    return OriginPattern(scheme, host, wildcard, port)


def _split_port(text: str, authority: str) -> tuple[str, int | None]:
    host, colon, port = authority.rpartition(":")
    if not colon or host.endswith(":") or (authority.startswith("[") and not host.endswith("]")):
        return authority, None  # no port (an IPv6 literal's own colons are inside its brackets)
    if port == "*":
        return host, ANY_PORT
    if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: {port!r} is not a port (1-65535, or * for any)")
    return host, int(port)


def parse_policy(text: str) -> OriginPolicy:
    """A setting's value: patterns separated by spaces, commas or lines; `*` alone allows every origin."""
    items = tuple(item for item in text.replace(",", " ").split() if item)
    if "*" in items:
        if len(items) > 1:
            raise ValueError("* allows every origin; give it alone or not at all")
        return OriginPolicy(allow_any=True)
    return OriginPolicy(tuple(dict.fromkeys(parse_pattern(item) for item in items)))


#: No patterns (an empty setting): the API lets no page in, and a WebSocket handshake is let in from pages
#: served from the host and port it was sent to.
EMPTY = OriginPolicy()
#: The WebSocket default, by what it means there.
SAME_HOST = EMPTY
