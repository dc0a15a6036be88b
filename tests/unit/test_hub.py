"""The in-memory index and the fan-out: one frame per message, written to every subscriber."""

from pushd.hub import Hub
from pushd.testing import FakeSubscriber as FakeConn
from pushd.testing import RecordingObserver
from pushd.ws import NATIVE


def frame_bytes(topic, payload, position=None):
    """The frame pushd's own protocol sends over WebSocket for one published message."""
    return NATIVE.publication(topic, payload, position)


def test_index_changes_are_reported_in_order():
    observer = RecordingObserver()
    hub = Hub(observer)
    a = FakeConn("n:1")
    hub.add(a)
    assert hub.subscribe(a, ["X", "Y", "X"]) == ("X", "Y")
    assert hub.subscribe(a, ["X"]) == ()
    assert hub.unsubscribe(a, ["Y", "Z"]) == ("Y",)
    hub.remove(a)
    hub.remove(a)
    assert observer.events == [
        ("opened", "n:1"), ("subscribed", "n:1", ("X", "Y")), ("unsubscribed", "n:1", ("Y",)), ("closed", "n:1")]
    assert hub.topic_count() == 0 and len(hub) == 0


def test_subscribe_of_an_unknown_connection_is_ignored():
    hub = Hub()
    assert hub.subscribe(FakeConn("n:9"), ["X"]) == ()
    assert hub.topic_count() == 0


def test_publish_writes_the_same_bytes_object_to_every_subscriber():
    hub = Hub()
    conns = [FakeConn(f"n:{i}") for i in range(5)]
    for c in conns:
        hub.add(c)
        hub.subscribe(c, ["AAPL"])
    other = FakeConn("n:other")
    hub.add(other)
    hub.subscribe(other, ["MSFT"])
    assert hub.publish("AAPL", b'{"p":1}') == 5
    frames = [c.written[0] for c in conns]
    assert all(f is frames[0] for f in frames)
    assert frames[0] == frame_bytes("AAPL", b'{"p":1}')
    assert other.written == []
    assert hub.publish("NOBODY", b"1") == 0
    assert hub.delivered == 5


def test_a_batch_becomes_one_write_per_connection_in_arrival_order():
    hub = Hub()
    a, b = FakeConn("n:a"), FakeConn("n:b")
    for c in (a, b):
        hub.add(c)
    hub.subscribe(a, ["X", "Y"])
    hub.subscribe(b, ["Y"])
    hub.begin_batch()
    hub.publish("X", b"1")
    hub.publish("Y", b"2")
    hub.publish("X", b"3")
    assert a.written == [] and b.written == []
    hub.flush()
    assert a.written == [frame_bytes("X", b"1") + frame_bytes("Y", b"2") + frame_bytes("X", b"3")]
    assert b.written == [frame_bytes("Y", b"2")]
    assert hub.delivered == 4


def test_single_topic_batch_is_joined_once():
    hub = Hub()
    conns = [FakeConn(f"n:{i}") for i in range(3)]
    for c in conns:
        hub.add(c)
        hub.subscribe(c, ["X"])
    hub.begin_batch()
    hub.publish("X", b"1")
    hub.publish("X", b"2")
    hub.flush()
    assert all(len(c.written) == 1 and c.written[0] is conns[0].written[0] for c in conns)
    hub.flush()  # nothing held: nothing written
    assert all(len(c.written) == 1 for c in conns)


def test_failed_writes_are_not_counted_as_deliveries():
    hub = Hub()
    good, bad = FakeConn("n:g"), FakeConn("n:b", accept=False)
    for c in (good, bad):
        hub.add(c)
        hub.subscribe(c, ["X"])
    hub.publish("X", b"1")
    assert hub.delivered == 1


def test_removing_during_fan_out_is_safe():
    hub = Hub()

    class Leaver(FakeConn):
        def write(self, data):
            hub.remove(self)
            return False

    conns = [Leaver("n:l")] + [FakeConn(f"n:{i}") for i in range(3)]
    for c in conns:
        hub.add(c)
        hub.subscribe(c, ["X"])
    hub.publish("X", b"1")
    assert hub.subscriber_count("X") == 3
    assert all(len(c.written) == 1 for c in conns[1:])


def test_snapshot_lists_every_connection_with_its_topics():
    hub = Hub()
    a, b = FakeConn("n:a"), FakeConn("n:b")
    hub.add(a)
    hub.add(b)
    hub.subscribe(a, ["X"])
    assert {conn_id: topics for conn_id, topics, _ in hub.snapshot()} == {"n:a": ("X",), "n:b": ()}


# -- holds (recovery), patterns, users ------------------------------------------------------------------------

def test_a_held_subscription_keeps_live_messages_until_released():
    from pushd.recovery import Position

    observer = RecordingObserver()
    hub = Hub(observer)
    a, b = FakeConn("n:1"), FakeConn("n:2")
    hub.add(a)
    hub.add(b)
    hub.subscribe(b, ["X"])
    assert hub.subscribe(a, ["X"], held=["X"]) == ("X",)
    assert ("subscribed", "n:1", ("X",)) in observer.events
    hub.publish("X", b"1", Position("5-0", "e"))
    hub.publish("X", b"2")
    assert a.written == [] and len(b.written) == 2
    held = hub.release(a, "X")
    assert held == [(Position("5-0", "e"), frame_bytes("X", b"1", Position("5-0", "e"))), (None, frame_bytes("X", b"2"))]
    hub.publish("X", b"3")
    assert a.written == [frame_bytes("X", b"3")]
    assert hub.release(a, "X") is None


def test_a_held_subscription_dropped_before_release_is_gone():
    hub = Hub()
    a = FakeConn("n:1")
    hub.add(a)
    hub.subscribe(a, ["X"], held=["X"])
    hub.unsubscribe(a, ["X"])
    hub.publish("X", b"1")
    assert hub.release(a, "X") is None
    hub.subscribe(a, ["Y"], held=["Y"])
    hub.remove(a)
    assert hub.release(a, "Y") is None
    hub.publish("Y", b"1")
    assert a.written == []


def test_pattern_subscribers_get_each_message_once():
    hub = Hub()
    a, b = FakeConn("n:1"), FakeConn("n:2")
    hub.add(a)
    hub.add(b)
    hub.subscribe(a, ["sh600*", "sh600519", "sh*"])
    hub.subscribe(b, ["orders.eu.*"])
    assert hub.publish("sh600519", b"1") == 1
    assert hub.publish("orders.eu.fr", b"2") == 1
    assert hub.publish("orders.us.ny", b"3") == 0
    assert a.written == [frame_bytes("sh600519", b"1")]
    assert b.written == [frame_bytes("orders.eu.fr", b"2")]
    hub.begin_batch()
    hub.publish("sh600000", b"4")
    hub.publish("orders.eu.de", b"5")
    hub.flush()
    assert a.written[-1] == frame_bytes("sh600000", b"4")
    assert b.written[-1] == frame_bytes("orders.eu.de", b"5")
    hub.unsubscribe(a, ["sh600*", "sh*"])
    hub.publish("sh600001", b"6")
    assert len(a.written) == 2
    assert hub.subscriber_count("orders.eu.*") == 1
    hub.remove(b)
    assert hub.publish("orders.eu.fr", b"7") == 0


def test_users_and_their_connections():
    hub = Hub()
    a, b, c = FakeConn("n:1"), FakeConn("n:2"), FakeConn("n:3")
    for conn in (a, b, c):
        hub.add(conn)
    hub.identify(a, "alice")
    hub.identify(b, "alice")
    hub.identify(c, "bob")
    assert set(hub.user_connections("alice")) == {a, b}
    hub.identify(b, "bob")
    assert hub.user_connections("alice") == (a,)
    hub.remove(a)
    assert hub.user_connections("alice") == ()
    assert set(hub.user_connections("bob")) == {b, c}
    hub.identify(a, "ghost")
    assert hub.user_connections("ghost") == ()


def test_a_connection_recovering_a_topic_gets_it_from_the_hold_not_also_through_a_pattern():
    hub = Hub()
    a = FakeConn("n:1")
    hub.add(a)
    hub.subscribe(a, ["sh*"])
    hub.subscribe(a, ["sh600519"], held=["sh600519"])
    hub.publish("sh600519", b"1")
    hub.publish("sh000001", b"2")
    assert a.written == [frame_bytes("sh000001", b"2")]
    assert hub.release(a, "sh600519") == [(None, frame_bytes("sh600519", b"1"))]
    hub.publish("sh600519", b"3")
    assert a.written[-1] == frame_bytes("sh600519", b"3") and len(a.written) == 2
