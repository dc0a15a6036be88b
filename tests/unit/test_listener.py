"""The Redis listener: every message of one socket read reaches the hub as one batch."""

import txredisapi

from pushd.redis.listener import Listener, ListenerProtocol
from pushd.redis.target import RedisTarget


def pmessage(channel: bytes, payload: bytes) -> bytes:
    parts = [b"pmessage", b"push:*", channel, payload]
    return b"*4\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class Recorder:
    def __init__(self):
        self.events = []

    def begin(self):
        self.events.append("begin")

    def flush(self):
        self.events.append("flush")

    def message(self, topic, payload):
        self.events.append((topic, payload))

    def user(self, user, payload):
        self.events.append(("user", user, payload))


def make_listener(recorder):
    listener = Listener(None, RedisTarget("redis", host="h"),
                        {"push:": recorder.message, "pushd:user:": recorder.user}, timeout=1,
                        begin_batch=recorder.begin, flush=recorder.flush)
    protocol = ListenerProtocol(charset=None, convertNumbers=False)

    class Factory:
        pass

    protocol.factory = Factory()
    protocol.factory.listener = listener
    return listener, protocol


def test_txredisapi_parses_with_hiredis():
    assert txredisapi.SubscriberProtocol.__mro__[1] is txredisapi.HiredisProtocol


def test_one_read_is_one_batch_with_every_message_in_order():
    recorder = Recorder()
    listener, protocol = make_listener(recorder)
    protocol.dataReceived(pmessage(b"push:AAPL", b'{"p":1}') + pmessage(b"push:MSFT", b"007")
                          + pmessage(b"push:AAPL", b"\xff raw"))
    assert recorder.events == ["begin", ("AAPL", b'{"p":1}'), ("MSFT", b"007"), ("AAPL", b"\xff raw"), "flush"]
    assert listener.messages == 3


def test_a_message_split_across_reads_is_delivered_once_complete():
    recorder = Recorder()
    _, protocol = make_listener(recorder)
    data = pmessage(b"push:AAPL", b"1")
    protocol.dataReceived(data[:10])
    protocol.dataReceived(data[10:])
    assert recorder.events == ["begin", "flush", "begin", ("AAPL", b"1"), "flush"]


def test_channels_that_are_not_topics_are_counted_and_skipped():
    recorder = Recorder()
    listener, protocol = make_listener(recorder)
    protocol.dataReceived(pmessage(b"other:AAPL", b"1") + pmessage(b"push:\xff", b"1"))
    assert [e for e in recorder.events if isinstance(e, tuple)] == []
    assert listener.bad_channels == 2


def test_each_route_gets_the_channel_name_without_its_prefix():
    recorder = Recorder()
    listener, protocol = make_listener(recorder)
    protocol.dataReceived(pmessage(b"pushd:user:42", b"hi") + pmessage(b"push:AAPL", b"1"))
    assert recorder.events == ["begin", ("user", "42", b"hi"), ("AAPL", b"1"), "flush"]
    assert listener.patterns == ["push:*", "pushd:user:*"]
