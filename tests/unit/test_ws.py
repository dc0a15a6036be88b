"""Whole client sessions in memory: handshake, commands, errors, limits, pruning, hooks, shutdown."""

import json

from twisted.internet import defer
from twisted.internet.address import IPv4Address

from pushd.cluster import node_of
from pushd.hooks import Hooks
from pushd.protocol import Limits
from pushd.testing import OP_CLOSE, OP_PING, OP_TEXT, MemoryClient, MemoryNode, MemoryTransport, RecordingObserver
from pushd.ws import SLOW_CLOSE_GRACE


def close_codes(client):
    return [f.close_code for f in client.frames() if f.opcode == OP_CLOSE]


def test_handshake_on_the_ws_path_only():
    node = MemoryNode()
    assert node.connect("/ws").status == 101
    assert node.connect("/other").status == 404


def test_nagle_is_off_for_every_connection():
    assert MemoryNode().connect().transport.no_delay is True


def test_connection_ids_are_node_scoped_and_unique_across_restarts():
    node = MemoryNode(node_id="host:42")
    a, b = node.connect(), node.connect()
    incarnation = node.factory.incarnation
    assert incarnation.isalnum()
    assert a.conn_id == f"host:42:{incarnation}.1" and b.conn_id == f"host:42:{incarnation}.2"
    assert node_of(a.conn_id) == "host:42"
    again = MemoryNode(node_id="host:42")  # the same node id, started again: its serials restart
    assert again.factory.incarnation != incarnation
    assert again.connect().conn_id == f"host:42:{again.factory.incarnation}.1" != a.conn_id


def test_subscribe_receive_unsubscribe():
    node = MemoryNode()
    client = node.connect()
    assert client.request({"op": "subscribe", "topics": ["AAPL", "sh600519"], "id": 7}) == [
        {"op": "subscribed", "topics": ["AAPL", "sh600519"], "id": 7}]
    node.publish("AAPL", b'{"price":172.5}')
    node.publish("MSFT", b"1")
    assert client.messages() == [{"topic": "AAPL", "data": {"price": 172.5}}]
    assert client.request({"op": "unsubscribe", "topics": ["AAPL"], "id": 8}) == [
        {"op": "unsubscribed", "topics": ["AAPL"], "id": 8}]
    node.publish("AAPL", b"2")
    assert client.messages() == []
    assert client.request({"op": "ping", "id": 9}) == [{"op": "pong", "id": 9}]


def test_bad_frames_get_error_frames_and_the_connection_stays_usable():
    node = MemoryNode()
    client = node.connect()
    for frame in ["{", "[]", json.dumps({"op": "dance"}), json.dumps({"op": "subscribe", "topics": ["a b"]})]:
        [reply] = client.request(frame)
        assert reply["op"] == "error"
    assert client.request({"op": "subscribe", "topics": ["A"]}) == [{"op": "subscribed", "topics": ["A"]}]
    node.publish("A", b"1")
    assert client.messages() == [{"topic": "A", "data": 1}]


def test_topic_limit_counts_the_connections_existing_topics():
    node = MemoryNode(limits=Limits(max_topics_per_connection=2))
    client = node.connect()
    client.request({"op": "subscribe", "topics": ["A", "B"]})
    assert client.request({"op": "subscribe", "topics": ["A"]}) == [{"op": "subscribed", "topics": ["A"]}]
    [reply] = client.request({"op": "subscribe", "topics": ["C"], "id": 1})
    assert reply["code"] == "too_many_topics" and reply["id"] == 1
    assert node.hub.subscriber_count("C") == 0


def test_binary_frame_closes_with_1003():
    node = MemoryNode()
    client = node.connect()
    client.send_frame(0x2, b"\x00\x01")
    assert close_codes(client) == [1003]
    assert len(node.hub) == 0


def test_oversized_frame_closes_with_1009():
    node = MemoryNode(max_frame_size=1024)
    client = node.connect()
    client.send("x" * 2000)
    assert close_codes(client) == [1009]


def test_invalid_utf8_closes_with_1007():
    node = MemoryNode()
    client = node.connect()
    client.send_frame(OP_TEXT, b'{"op":"ping","id":"\xff"}')
    assert close_codes(client) == [1007]


def test_a_flood_of_bad_frames_closes_with_1008_and_a_trickle_does_not():
    node = MemoryNode(bad_frame_limit=5)
    patient = node.connect()
    for _ in range(5):
        patient.send("{")
        node.clock.advance(61)
    assert close_codes(patient) == []
    flooder = node.connect()
    for _ in range(6):
        flooder.send("{")
    assert close_codes(flooder) == [1008]
    assert node.hub.pruned["bad_frames"] == 1


def test_other_clients_are_untouched_by_a_bad_one():
    node = MemoryNode(bad_frame_limit=1)
    good, bad = node.connect(), node.connect()
    good.request({"op": "subscribe", "topics": ["A"]})
    bad.request({"op": "subscribe", "topics": ["A"]})
    bad.send("{")
    bad.send("{")
    bad.send_frame(0x2, b"x")
    node.publish("A", b"1")
    assert good.messages() == [{"topic": "A", "data": 1}]


def test_slow_consumer_is_dropped_counted_and_unindexed():
    node = MemoryNode(high_water_mark=4096)
    slow, fast = node.connect(), node.connect()
    for c in (slow, fast):
        c.request({"op": "subscribe", "topics": ["A"]})
    slow.protocol.pauseProducing()
    for _ in range(3):
        node.publish("A", b'"' + b"x" * 2000 + b'"')
    assert node.hub.pruned["slow_consumer"] == 1
    assert node.hub.subscriber_count("A") == 1
    assert len(fast.messages()) == 3
    # Told why, in its protocol's code, then cut after a short grace whether it read that or not.
    assert close_codes(slow) == [4004]
    assert not slow.transport.disconnecting
    node.clock.advance(SLOW_CLOSE_GRACE)
    assert slow.transport.disconnecting


def test_a_paused_client_is_not_read_from_until_it_reads_again():
    node = MemoryNode()
    client = node.connect()
    client.protocol.pauseProducing()
    assert client.transport.producerState == "paused"
    client.protocol.resumeProducing()
    assert client.transport.producerState == "producing"


def test_replies_to_a_client_that_does_not_read_count_against_its_limit():
    node = MemoryNode(high_water_mark=4096)
    client = node.connect()
    client.protocol.pauseProducing()
    for n in range(200):
        client.send({"op": "ping", "id": "x" * 60})
    assert node.hub.pruned["slow_consumer"] == 1
    assert len(node.hub) == 0


def test_autobahns_own_pongs_count_against_the_limit_too():
    node = MemoryNode(high_water_mark=4096)
    client = node.connect()
    client.protocol.pauseProducing()
    for _ in range(100):
        client.send_frame(OP_PING, b"p" * 125)
    assert node.hub.pruned["slow_consumer"] == 1
    written = len(client.transport.value())
    for _ in range(100):
        client.send_frame(OP_PING, b"p" * 125)
    assert len(client.transport.value()) == written, "nothing more is written once it is dropped"


def test_a_client_that_reads_nothing_for_ping_timeout_is_dropped_with_centrifugos_code():
    node = MemoryNode(ping_timeout=10)
    client = node.connect("/connection/websocket")
    client.request({"id": 1, "connect": {}})
    client.protocol.pauseProducing()
    node.clock.advance(9)
    client.protocol.resumeProducing()
    client.protocol.pauseProducing()
    node.clock.advance(9)
    assert node.hub.pruned["slow_consumer"] == 0
    node.clock.advance(1)
    assert node.hub.pruned["slow_consumer"] == 1
    [close] = [f for f in client.frames() if f.opcode == OP_CLOSE]
    assert close.close_code == 3008 and close.payload[2:] == b"slow: not reading"
    node.clock.advance(SLOW_CLOSE_GRACE)
    assert client.transport.disconnecting


def test_an_upgrade_request_over_max_request_size_gets_431_before_it_is_buffered():
    node = MemoryNode()
    cookie = "c" * 12000  # big cookies, as browsers send, still fit the default 16 KiB
    assert node.connect(headers={"Cookie": cookie}).status == 101
    assert node.connect(headers={"Cookie": cookie * 2}).status == 431
    endless = MemoryClient.__new__(MemoryClient)
    endless.transport = MemoryTransport()
    endless.protocol = node.factory.buildProtocol(None)
    endless.protocol.makeConnection(endless.transport)
    endless.protocol.dataReceived(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n")
    for _ in range(1000):
        endless.protocol.dataReceived(b"X-Filler: " + b"a" * 100 + b"\r\n")
        assert len(endless.protocol.data) <= node.factory.max_request_size
    assert endless.transport.value().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert endless.transport.disconnecting


def test_an_upgrade_request_not_complete_within_the_handshake_timeout_gets_408():
    node = MemoryNode()
    transport = MemoryTransport()
    protocol = node.factory.buildProtocol(None)
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n")
    node.clock.advance(5)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert transport.disconnecting


def test_paused_then_resumed_consumer_is_kept():
    node = MemoryNode(high_water_mark=4096)
    client = node.connect()
    client.request({"op": "subscribe", "topics": ["A"]})
    client.protocol.pauseProducing()
    node.publish("A", b'"' + b"x" * 3000 + b'"')
    client.protocol.resumeProducing()
    node.publish("A", b'"' + b"x" * 3000 + b'"')
    assert node.hub.pruned["slow_consumer"] == 0
    assert len(client.messages()) == 2


def test_failing_write_drops_the_connection():
    node = MemoryNode()
    client = node.connect()
    client.request({"op": "subscribe", "topics": ["A"]})

    def broken(data):
        raise OSError("broken pipe")

    client.protocol._transport_write = broken
    node.publish("A", b"1")
    assert node.hub.pruned["write_failed"] == 1
    assert node.hub.subscriber_count("A") == 0


def test_missed_pongs_drop_the_connection():
    node = MemoryNode(ping_interval=2, ping_timeout=3)
    lively, silent = node.connect(), node.connect()
    silent.request({"op": "subscribe", "topics": ["A"]})
    for _ in range(10):
        node.clock.advance(0.5)
        for frame in lively.frames():
            if frame.opcode == OP_PING:
                lively.send_frame(0xA, frame.payload)
    assert node.hub.pruned["ping_timeout"] == 1
    assert silent.transport.disconnecting
    assert node.hub.connection(lively.conn_id) is lively.session


def test_peer_vanishing_removes_it_and_reports_to_the_observer():
    observer = RecordingObserver()
    node = MemoryNode(observer=observer)
    client = node.connect()
    client.request({"op": "subscribe", "topics": ["A"]})
    client.disconnect()
    assert len(node.hub) == 0 and node.hub.topic_count() == 0
    assert observer.events == [("opened", client.conn_id), ("subscribed", client.conn_id, ("A",)),
                               ("closed", client.conn_id)]


def test_authorize_hook_refuses_the_whole_frame_with_forbidden():
    seen = []

    def authorize(request, topic):
        seen.append((request.path, topic))
        return topic.startswith("public.")

    node = MemoryNode(hooks=Hooks(authorize=authorize))
    client = node.connect()
    [reply] = client.request({"op": "subscribe", "topics": ["public.a", "secret.b"], "id": 4})
    assert reply["code"] == "forbidden" and reply["topics"] == ["secret.b"] and reply["id"] == 4
    assert node.hub.subscriber_count("public.a") == 0
    assert client.request({"op": "subscribe", "topics": ["public.a"]}) == [
        {"op": "subscribed", "topics": ["public.a"]}]
    assert ("/ws", "secret.b") in seen


def test_authorize_hook_that_raises_refuses_with_internal_error():
    def authorize(request, topic):
        raise RuntimeError("database down")

    node = MemoryNode(hooks=Hooks(authorize=authorize))
    client = node.connect()
    [reply] = client.request({"op": "subscribe", "topics": ["A"]})
    assert reply["code"] == "internal_error"
    assert client.request({"op": "ping"}) == [{"op": "pong"}]


def test_commands_wait_for_a_pending_authorization_and_keep_their_order():
    pending = []

    class ManualTasks:
        def run(self, f, *args):
            d = defer.Deferred()
            pending.append((d, f, args))
            return d

    node = MemoryNode(hooks=Hooks(authorize=lambda request, topic: True), tasks=ManualTasks())
    client = node.connect()
    client.send({"op": "subscribe", "topics": ["A"], "id": 1})
    client.send({"op": "unsubscribe", "topics": ["A"], "id": 2})
    client.send({"op": "ping", "id": 3})
    assert client.messages() == []
    d, f, args = pending.pop()
    d.callback(f(*args))
    assert [m["id"] for m in client.messages()] == [1, 2, 3]
    assert node.hub.subscriber_count("A") == 0


def test_authorization_that_finishes_after_close_subscribes_nothing():
    pending = []

    class ManualTasks:
        def run(self, f, *args):
            d = defer.Deferred()
            pending.append((d, f, args))
            return d

    node = MemoryNode(hooks=Hooks(authorize=lambda request, topic: True), tasks=ManualTasks())
    client = node.connect()
    client.send({"op": "subscribe", "topics": ["A"]})
    client.disconnect()
    d, f, args = pending.pop()
    d.callback(f(*args))
    assert node.hub.subscriber_count("A") == 0


def test_close_all_sends_1001_and_fires_when_clients_answer():
    node = MemoryNode()
    a, b = node.connect(), node.connect()
    done = node.factory.close_all("server shutting down", timeout=5)
    assert close_codes(a) == [1001] and close_codes(b) == [1001]
    assert not done.called
    a.disconnect()
    b.disconnect()
    assert done.called


def test_close_all_gives_up_after_the_timeout():
    node = MemoryNode()
    client = node.connect()
    done = node.factory.close_all("bye", timeout=5)
    node.clock.advance(5)
    assert done.called
    assert client.transport.disconnecting


def test_a_plain_http_request_gets_426_and_no_redirect():
    node = MemoryNode()
    transport = MemoryTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    conn = node.factory.buildProtocol(transport.getPeer())
    conn.makeConnection(transport)
    conn.dataReceived(b"GET /ws?redirect=https://evil.example/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
    response = transport.value()
    assert response.startswith(b"HTTP/1.1 426 "), response[:80]
    assert b"evil.example" not in response and b"Autobahn" not in response
