"""Endpoint descriptions read as Twisted reads them, and the listen backlog reaching what pushd listens on."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import endpoints as twisted_endpoints
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

from pushd.config import build_config
from pushd.endpoints import parse, unparse, with_backlog
from pushd.service import api_endpoint, listen_endpoints


@pytest.mark.parametrize(("description", "expected"), [
    ("tcp:8080", "tcp:8080:backlog=1024"),
    ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1:backlog=1024"),
    ("tcp:8080:backlog=5", "tcp:8080:backlog=5"),
    ("tcp:8080:127.0.0.1:7", "tcp:8080:127.0.0.1:7"),  # backlog given by position
    ("ssl:8443:privateKey=k.pem:certKey=c.pem", "ssl:8443:privateKey=k.pem:certKey=c.pem:backlog=1024"),
    ("unix:/run/a\\:b.sock", "unix:/run/a\\:b.sock:backlog=1024"),
    ("tcp6:8080:interface=\\:\\:1", "tcp6:8080:interface=\\:\\:1:backlog=1024"),
    ("haproxy:tcp:8080", "haproxy:tcp:8080:backlog=1024"),
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),  # the socket is made elsewhere
])
def test_the_backlog_is_added_where_the_type_takes_one_and_none_is_given(description, expected):
    assert with_backlog(description, 1024) == expected


def test_a_description_twisted_would_refuse_is_a_value_error():
    for description in ("", ":", "tcp:8080:nope=1", "tcp:8080:127.0.0.1:interface=::1"):
        with pytest.raises(ValueError):
            with_backlog(description, 1024)


PIECE = st.text(st.characters(codec="ascii", exclude_characters="\r\n"), min_size=1, max_size=12)


@given(st.lists(PIECE.filter(lambda p: "=" not in p), min_size=1, max_size=4),
       st.dictionaries(PIECE.filter(lambda p: "=" not in p), PIECE, max_size=3))
def test_unparse_is_what_twisted_parses_back(args, kwargs):
    assert twisted_endpoints._parse(unparse(tuple(args), kwargs)) == (args, kwargs)


def test_parse_binds_the_arguments_as_the_parser_gets_them():
    endpoint = parse("tcp:8081:interface=127.0.0.1:interface=0.0.0.0")
    assert endpoint.kind == "tcp" and endpoint.arguments is not None
    assert endpoint.arguments["interface"] == "0.0.0.0" and endpoint.arguments["backlog"] == 50
    assert "backlog" not in endpoint.given and endpoint.takes_backlog


def test_the_listen_backlog_reaches_every_websocket_endpoint_and_the_api(tmp_path):
    reactor = MemoryReactor()
    config = build_config({"listen": "tcp:8080\ntcp:8081:backlog=7", "listen-backlog": "900",
                           "api-listen": "tcp:8082:interface=127.0.0.1", "cert-dir": str(tmp_path)})
    listening = listen_endpoints(reactor, config)
    api = api_endpoint(reactor, config)
    assert api is not None
    for _, endpoint in [*listening, api]:
        endpoint.listen(Factory())
    assert [(port, backlog, interface) for port, _, backlog, interface in reactor.tcpServers] == [
        (8080, 900, ""), (8081, 7, ""), (8082, 900, "127.0.0.1")]
    # The descriptions pushd reports are the ones given.
    assert [description for description, _ in listening] == ["tcp:8080", "tcp:8081:backlog=7"]


def test_the_default_tls_endpoint_gets_the_default_backlog(tmp_path):
    reactor = MemoryReactor()
    [(description, endpoint)] = listen_endpoints(reactor, build_config({"cert-dir": str(tmp_path)}))
    endpoint.listen(Factory())
    [(port, _, _, backlog, _)] = reactor.sslServers
    assert description.startswith("ssl:8443:") and (port, backlog) == (8443, 1024)
