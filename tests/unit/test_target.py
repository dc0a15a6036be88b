"""Redis URL parsing."""

import pytest

from pushd.redis.target import RedisTarget, parse_redis_url


@pytest.mark.parametrize("url, target", [
    ("redis://localhost", RedisTarget("redis", host="localhost", port=6379)),
    ("redis://:s3cret@10.0.0.5:6380/2", RedisTarget("redis", host="10.0.0.5", port=6380, db=2, password="s3cret")),
    ("redis://app:pw@h:1", RedisTarget("redis", host="h", port=1, username="app", password="pw")),
    ("rediss://cache.example:6390", RedisTarget("rediss", host="cache.example", port=6390)),
    ("unix:///tmp/redis.sock?db=3", RedisTarget("unix", path="/tmp/redis.sock", db=3)),
    ("sentinel://s1:26379,s2:26380/mymaster",
     RedisTarget("sentinel", sentinels=(("s1", 26379), ("s2", 26380)), master="mymaster")),
    ("sentinel://s1/mymaster", RedisTarget("sentinel", sentinels=(("s1", 26379),), master="mymaster")),
])
def test_good_urls(url, target):
    assert parse_redis_url(url) == target


@pytest.mark.parametrize("url, message", [
    ("localhost:6379", "is not a Redis URL"),
    ("http://x", "is not a Redis URL"),
    ("redis://", "has no host"),
    ("redis://h:port", "has a bad port"),
    ("redis://h/x", "bad database number"),
    ("unix://", "has no socket path"),
    ("sentinel://s1:26379", "names no master"),
    ("sentinel:///m", "names no Sentinel"),
    ("sentinel://s1:0/m", "port out of range"),
])
def test_bad_urls(url, message):
    with pytest.raises(ValueError, match=message):
        parse_redis_url(url)


def test_display_hides_the_password_and_url_round_trips():
    for url in ["redis://:pw@h:6380/1", "unix:///s.sock?db=2&password=pw", "sentinel://:pw@a:1,b:2/m"]:
        target = parse_redis_url(url)
        assert "pw" not in target.display
        assert parse_redis_url(target.url()) == target


def test_client_endpoints_per_scheme():
    from twisted.internet import endpoints
    from twisted.internet.testing import MemoryReactorClock

    from pushd.redis.client import client_endpoint

    reactor = MemoryReactorClock()
    assert isinstance(client_endpoint(reactor, parse_redis_url("redis://h:1"), 5), endpoints.HostnameEndpoint)
    assert isinstance(client_endpoint(reactor, parse_redis_url("unix:///s.sock"), 5), endpoints.UNIXClientEndpoint)
    tls = client_endpoint(reactor, parse_redis_url("rediss://cache.example:6390"), 5)
    assert type(tls).__name__ == "_WrapperEndpoint"
