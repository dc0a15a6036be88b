"""Origin patterns and policies: what each pattern lets in, how the same-host default compares, and bad patterns
refused with a message that says what is wrong."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pushd.origins import SAME_HOST, Origin, parse_origin, parse_pattern, parse_policy, same_host


@pytest.mark.parametrize(("text", "origin"), [
    ("https://app.example.com", Origin("https", "app.example.com", 443)),
    ("HTTPS://App.Example.COM", Origin("https", "app.example.com", 443)),
    ("http://127.0.0.1:8000", Origin("http", "127.0.0.1", 8000)),
    ("http://[::1]:8000", Origin("http", "::1", 8000)),
    ("https://a.example:443", Origin("https", "a.example", 443)),
    ("chrome-extension://abcdef", Origin("chrome-extension", "abcdef", None)),
])
def test_an_origin_parses_to_scheme_host_and_port(text, origin):
    assert parse_origin(text) == origin


@pytest.mark.parametrize("text", ["null", "", "https://", "https://a.example/", "https://a.example/path",
                                  "https://user@a.example", "https://a.example:99999", "https://a.example:x",
                                  "a.example", "https://a.example https://b.example", "https://a.example?q"])
def test_what_is_not_a_serialized_origin_parses_to_none(text):
    assert parse_origin(text) is None


@pytest.mark.parametrize(("pattern", "allowed", "refused"), [
    ("https://*.example.com", ["https://a.example.com", "https://a.b.example.com", "https://A.Example.com:443"],
     ["https://example.com", "https://notexample.com", "https://a.example.com.evil.example", "http://a.example.com",
      "https://a.example.com:8443", "https://a.example.co"]),
    ("http://127.0.0.1:8000", ["http://127.0.0.1:8000"],
     ["http://127.0.0.1", "http://127.0.0.1:8001", "https://127.0.0.1:8000", "http://localhost:8000"]),
    ("http://localhost:*", ["http://localhost", "http://localhost:3000"], ["https://localhost:3000"]),
    ("https://app.example.com", ["https://app.example.com", "https://app.example.com:443"],
     ["https://app.example.com:444", "https://x.app.example.com", "null"]),
    ("http://[::1]:8000", ["http://[::1]:8000"], ["http://[::2]:8000", "http://127.0.0.1:8000"]),
])
def test_a_pattern_allows_its_origins_and_nothing_else(pattern, allowed, refused):
    policy = parse_policy(pattern)
    for origin in allowed:
        assert policy.matches(origin), origin
    for origin in refused:
        assert not policy.matches(origin), origin


@pytest.mark.parametrize(("pattern", "message"), [
    ("app.example.com", "is not an origin pattern (expected scheme://host[:port]"),
    ("https://app.example.com/", "an origin has no path, query or fragment"),
    ("https://app.example.com/login", "an origin has no path"),
    ("https://user@app.example.com", "no user name or password"),
    ("https://app.*.example.com", "'*' may only stand for whole labels at the start of the host"),
    ("https://*example.com", "'*' may only stand for whole labels"),
    ("https://*", "'*' may only stand for whole labels"),
    ("https://app example", "is not an origin pattern"),
    ("https://exa!mple.com", "the host is not a DNS name or IP address"),
    ("https://", "the host is not a DNS name or IP address"),
    ("https://a.example:0", "'0' is not a port"),
    ("https://a.example:65536", "is not a port"),
    ("https://a.example:http", "is not a port"),
    ("https://*.[::1]", "'*.' cannot stand before an IPv6 address"),
    ("1http://a.example", "is not an origin pattern"),
])
def test_a_bad_pattern_says_what_is_wrong(pattern, message):
    with pytest.raises(ValueError, match=None) as error:
        parse_policy(pattern)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_star_allows_everything_and_must_stand_alone():
    policy = parse_policy("*")
    assert policy.allow_any
    assert all(policy.matches(o) for o in ("null", "https://evil.example", "garbage"))
    assert policy.allows_handshake("null", "localhost")
    with pytest.raises(ValueError, match="give it alone"):
        parse_policy("* https://a.example")


def test_patterns_are_separated_by_spaces_commas_or_lines_and_duplicates_collapse():
    policy = parse_policy("https://a.example, https://b.example\nhttps://a.example:443")
    assert [p.host for p in policy.patterns] == ["a.example", "b.example"]
    assert parse_policy("") == parse_policy(" \n ") == SAME_HOST


# the WebSocket handshake's rule

@pytest.mark.parametrize(("origin", "host", "allowed"), [
    (None, "localhost:8443", True),  # not a browser
    ("https://localhost:8443", "localhost:8443", True),
    ("https://LOCALHOST:8443", "localhost:8443", True),
    ("https://example.com", "example.com", True),
    ("https://example.com", "example.com:443", True),
    ("http://example.com", "example.com", True),  # the same host (port 80 both, as the page would say)
    ("https://example.com:443", "example.com", True),
    ("http://[::1]:8000", "[::1]:8000", True),
    ("https://evil.example", "localhost:8443", False),
    ("https://localhost:8444", "localhost:8443", False),
    ("https://localhost", "localhost:8443", False),
    ("http://127.0.0.1:8443", "localhost:8443", False),
    ("https://a.localhost:8443", "localhost:8443", False),
    ("null", "localhost:8443", False),
    ("garbage", "localhost:8443", False),
    ("https://localhost:8443", "", False),
    ("https://localhost:8443", None, False),
    ("https://localhost:8443", "localhost:8443/x", False),
    ("https://localhost:8443", "localhost:port", False),
])
def test_by_default_a_handshake_is_let_in_from_its_own_host_only(origin, host, allowed):
    assert SAME_HOST.allows_handshake(origin, host) is allowed


def test_with_patterns_a_handshake_is_let_in_by_pattern_only():
    policy = parse_policy("http://127.0.0.1:8000")
    assert policy.allows_handshake("http://127.0.0.1:8000", "localhost:8443")
    assert policy.allows_handshake(None, "localhost:8443")
    assert not policy.allows_handshake("https://localhost:8443", "localhost:8443")
    assert not policy.allows_handshake("null", "localhost:8443")


# properties

LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
HOST = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
SCHEME = st.sampled_from(["http", "https"])
PORT = st.none() | st.integers(1, 65535)


def serialize(scheme: str, host: str, port: int | None) -> str:
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


@given(SCHEME, HOST, PORT)
def test_an_exact_pattern_allows_exactly_its_own_origin(scheme, host, port):
    pattern = serialize(scheme, host, port)
    policy = parse_policy(pattern)
    assert policy.matches(pattern)
    assert policy.matches(serialize(scheme.upper(), host.upper(), port))
    assert not policy.matches(serialize(scheme, "x" + host, port))
    assert not policy.matches(serialize(scheme, host + ".evil.example", port))
    assert not policy.matches(serialize("https" if scheme == "http" else "http", host, port))
    assert not policy.matches(serialize(scheme, host, 1 + (port or 0) % 65535 if port else 8443))


@given(SCHEME, HOST, st.lists(LABEL, min_size=1, max_size=3).map(".".join), PORT)
def test_a_wildcard_allows_every_subdomain_and_never_the_domain_or_a_lookalike(scheme, domain, sub, port):
    policy = parse_policy(serialize(scheme, "*." + domain, port))
    assert policy.matches(serialize(scheme, f"{sub}.{domain}", port))
    assert not policy.matches(serialize(scheme, domain, port))
    assert not policy.matches(serialize(scheme, f"{sub}{domain}", port))
    assert not policy.matches(serialize(scheme, f"{sub}.{domain}.evil-example", port))


@given(SCHEME, HOST, PORT, HOST, PORT)
def test_same_host_is_host_and_port_equality(scheme, origin_host, origin_port, host, port):
    origin = serialize(scheme, origin_host, origin_port)
    header = host + (f":{port}" if port is not None else "")
    default = 443 if scheme == "https" else 80
    expected = (origin_host, origin_port or default) == (host, port or default)
    assert same_host(origin, header) is expected


@given(st.text(max_size=40))
def test_any_header_value_gets_an_answer_and_no_exception(text):
    policy = parse_policy("https://*.example.com")
    assert isinstance(policy.matches(text), bool)
    assert isinstance(SAME_HOST.allows_handshake(text, text), bool)


@given(st.text(max_size=40))
def test_any_pattern_text_parses_or_raises_value_error(text):
    try:
        parse_pattern(text)
    except ValueError as e:
        assert "\n" not in str(e)
