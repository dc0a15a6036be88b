"""What a Twisted server endpoint description will bind, read the way Twisted reads it.

`serverFromString` tokenizes a description with `twisted.internet.endpoints._parse` (backslash escapes, the last
of two equal keywords wins) and calls the endpoint type's parser with the pieces as positional and keyword
arguments (so `tcp:8081:0.0.0.0` binds 0.0.0.0 too). pushd decides whether an endpoint is loopback-only, and
adds its listen backlog, on exactly those arguments: Twisted's tokenizer, then the parser's own signature.
Nothing here opens a file or a socket, so it runs while the configuration is read.
"""

from __future__ import annotations

import inspect
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import endpoints

#: The parsers serverFromString calls, by endpoint type, for the types whose arguments pushd must understand.
#: The first three are Twisted's built-in types (their names are case-sensitive there); tcp6 and tls are
#: plugins (matched case-insensitively there, as here).
_PARSERS: dict[str, Callable[..., Any]] = {
    "tcp": endpoints._parseTCP,
    "ssl": endpoints._parseSSL,
    "unix": endpoints._parseUNIX,
}
_PLUGIN_PARSERS: dict[str, Callable[..., Any]] = {
    "tcp6": endpoints._TCP6ServerParser()._parseServer,
    "tls": endpoints._TLSServerEndpointParser()._actualParseStreamServer,
}
#: A wrapper type whose remaining description is another endpoint (Twisted's PROXY-protocol endpoint).
_WRAPPERS = ("haproxy",)


@dataclass(frozen=True, slots=True)
class ServerEndpoint:
    """A parsed description: its type, and the arguments its parser will get (None for a type pushd does not
    know, such as systemd: or a third-party plugin)."""

    kind: str
    args: tuple[str, ...]
    kwargs: Mapping[str, str]
    arguments: Mapping[str, Any] | None
    takes_backlog: bool
    #: The parser's parameters the description gives, by position or by keyword.
    given: frozenset[str] = frozenset()
    #: For a wrapper type: the endpoint it wraps.
    inner: ServerEndpoint | None = None


def parse(description: str) -> ServerEndpoint:
    """The endpoint `description` names; a ValueError says why Twisted would refuse it."""
    try:
        args, kwargs = endpoints._parse(description)
    except Exception as e:  # an empty description, a stray escape: whatever Twisted's tokenizer trips on
        raise ValueError(f"not an endpoint description ({type(e).__name__})") from None
    if not args or not args[0]:
        raise ValueError("not an endpoint description: it must start with a type such as tcp:, ssl: or unix:")
    name = args[0]
    rest = tuple(args[1:])
    parser = _PARSERS.get(name)
    kind = name if parser is not None else name.lower()
    if kind in _WRAPPERS:
        return ServerEndpoint(kind, rest, kwargs, None, False, inner=parse(unparse(rest, kwargs)))
    if parser is None:
        parser = _PLUGIN_PARSERS.get(kind)
    if parser is None:
        return ServerEndpoint(kind, rest, kwargs, None, False)
    signature = inspect.signature(parser)
    try:
        # The first parameter is the factory (built-in types) or the reactor (plugins); neither matters here.
        bound = signature.bind(None, *rest, **kwargs)
    except TypeError as e:
        raise ValueError(f"{kind}: {e}") from None
    given = frozenset(bound.arguments)
    bound.apply_defaults()
    return ServerEndpoint(kind, rest, kwargs, dict(bound.arguments), "backlog" in signature.parameters, given)


def unparse(args: tuple[str, ...], kwargs: Mapping[str, str]) -> str:
    """A description that Twisted parses back into `args` and `kwargs`."""
    quote = endpoints.quoteStringArgument
    return ":".join([quote(arg) for arg in args] + [f"{quote(key)}={quote(value)}" for key, value in kwargs.items()])


def is_loopback(description: str) -> bool:
    """True when the endpoint can only be reached from this machine: a unix socket, or a tcp/ssl/tcp6/tls
    endpoint bound to a loopback address (or `localhost`). Anything else, a type pushd does not know included,
    is not loopback."""
    try:
        endpoint = parse(description)
    except ValueError:
        return False
    while endpoint.inner is not None:
        endpoint = endpoint.inner
    if endpoint.kind == "unix":
        return True
    if endpoint.arguments is None or "interface" not in endpoint.arguments:
        return False
    interface = str(endpoint.arguments["interface"])
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def with_backlog(description: str, backlog: int) -> str:
    """`description` with `backlog=<backlog>` added when its type takes a backlog and it gives none itself."""
    endpoint = parse(description)
    if endpoint.inner is not None:
        wrapped = unparse(endpoint.args, endpoint.kwargs)
        inner = with_backlog(wrapped, backlog)
        return description if inner == wrapped else f"{endpoint.kind}:{inner}"
    if not endpoint.takes_backlog or "backlog" in endpoint.given:
        return description
    return unparse((endpoint.kind, *endpoint.args), {**endpoint.kwargs, "backlog": str(backlog)})
