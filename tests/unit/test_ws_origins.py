"""WebSocket handshakes from web pages: 403 for a page of another site, before anything else is looked at."""

import pytest

from pushd.origins import parse_policy
from pushd.testing import MemoryNode

PATHS = ["/ws", "/connection/websocket"]


@pytest.mark.parametrize("path", PATHS)
def test_by_default_a_page_of_another_site_is_refused_with_403_and_gets_no_session(path):
    node = MemoryNode()
    client = node.connect(path, origin="https://evil.example")
    assert client.status == 403
    assert client.protocol.session is None and len(node.hub) == 0
    assert client.transport.disconnecting


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("origin", "host"), [
    (None, "localhost"),  # no Origin: not a browser
    ("https://localhost", "localhost"),
    ("http://localhost", "localhost"),
    ("https://localhost:8443", "localhost:8443"),
    ("https://push.example.com", "PUSH.example.com:443"),
])
def test_by_default_a_client_without_origin_or_a_page_of_the_same_host_gets_in(path, origin, host):
    client = MemoryNode().connect(path, origin=origin, headers={"Host": host})
    assert client.status == 101 and client.session is not None


@pytest.mark.parametrize(("origin", "host"), [
    ("https://localhost:8444", "localhost:8443"),
    ("http://127.0.0.1:8443", "localhost:8443"),
    ("null", "localhost"),
    ("https://localhost/path", "localhost"),
])
def test_by_default_another_host_or_port_or_a_null_origin_is_refused(origin, host):
    assert MemoryNode().connect(origin=origin, headers={"Host": host}).status == 403


def test_an_origin_autobahn_cannot_parse_is_refused_by_autobahn_first():
    assert MemoryNode().connect(origin="not an origin").status == 400


def test_the_origin_is_checked_before_the_path():
    node = MemoryNode()
    assert node.connect("/other", origin="https://evil.example").status == 403
    assert node.connect("/other").status == 404


def test_allowed_origins_let_in_the_listed_pages_only():
    # The browser suite's page: served from http://127.0.0.1:<port>, connecting to wss://localhost:<port2>/ws.
    node = MemoryNode(origins=parse_policy("http://127.0.0.1:8000 https://*.example.com"))
    host = {"Host": "localhost:8443"}
    assert node.connect(origin="http://127.0.0.1:8000", headers=host).status == 101
    assert node.connect("/connection/websocket", origin="https://app.example.com", headers=host).status == 101
    assert node.connect(origin="https://localhost:8443", headers=host).status == 403
    assert node.connect(origin="http://127.0.0.1:8001", headers=host).status == 403
    assert node.connect(origin="null", headers=host).status == 403
    assert node.connect(headers=host).status == 101


def test_star_lets_every_page_in_null_included():
    node = MemoryNode(origins=parse_policy("*"))
    for origin in ("https://evil.example", "null"):
        assert node.connect(origin=origin).status == 101
