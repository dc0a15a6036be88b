"""What a node does with the messages on pushd's own channels: history envelopes, user messages, control."""

import jwt
from twisted.internet import defer

from pushd.auth import TokenVerifier
from pushd.cluster import encode_control
from pushd.config import build_config
from pushd.hooks import Hooks
from pushd.recovery import Position
from pushd.redis.history import encode_envelope
from pushd.service import PushdService
from pushd.session import AuthPolicy
from pushd.testing import OP_CLOSE, MemoryNode

SECRET = "a-test-secret-of-32-bytes-length"


class Reports:
    def __init__(self):
        self.reports = []

    def report_broadcast(self, broadcast_id, node_id, report):
        self.reports.append((broadcast_id, node_id, report))
        return defer.succeed(None)


def node_and_service():
    node = MemoryNode(auth=AuthPolicy(mode="optional", verifier=TokenVerifier(secret=SECRET)))
    service = PushdService(node.clock, build_config({}), Hooks(), [])
    service.hub, service.factory, service.node_id = node.hub, node.factory, "test-node"
    service.cluster = Reports()
    return node, service


def user_client(node, user):
    token = jwt.encode({"sub": user, "exp": 10**10}, SECRET, algorithm="HS256")
    return node.connect(f"/ws?token={token}")


def test_history_envelopes_become_data_frames_with_their_position_and_bad_ones_are_counted():
    node, service = node_and_service()
    client = node.connect()
    client.request({"op": "subscribe", "topics": ["A"]})
    service.published_with_history("A", encode_envelope(Position("7-0", "e1", 3), b'{"p":1}'))
    service.published_with_history("A", b"no newline here")
    assert client.messages() == [{"topic": "A", "data": {"p": 1}, "offset": "7-0", "epoch": "e1"}]
    assert service.dropped_messages == 1


def test_user_messages_reach_every_connection_of_that_user_only():
    node, service = node_and_service()
    alice, bob = user_client(node, "alice"), user_client(node, "bob")
    service.user_message("alice", b'"hi"')
    assert alice.messages() == [{"op": "message", "data": "hi"}]
    assert bob.messages() == []


def test_control_messages_disconnect_and_malformed_ones_are_ignored():
    node, service = node_and_service()
    alice, other = user_client(node, "alice"), node.connect()
    for bad in (b"no newline", b"[1]\n", b'{"op":"disconnect"}\n', b'{"op":"disconnect","conn":1,"code":"x"}\n',
                b'{"op":"what"}\n'):
        service.control_message("", bad)
    assert not alice.closed and not other.closed
    service.control_message("", encode_control({"op": "disconnect", "conn": other.conn_id, "code": 4000,
                                                "reason": "bye"}))
    service.control_message("", encode_control({"op": "disconnect_user", "user": "alice", "code": 4009,
                                                "reason": "banned"}))
    assert [f.close_code for f in other.frames() if f.opcode == OP_CLOSE] == [4000]
    assert [f.close_code for f in alice.frames() if f.opcode == OP_CLOSE] == [4009]


def test_a_broadcast_control_message_is_sent_to_every_connection_and_reported():
    node, service = node_and_service()
    clients = [node.connect() for _ in range(3)]
    service.control_message("", encode_control({"op": "broadcast", "id": "b1"}, b'{"m":1}'))
    for _ in range(10):
        node.clock.advance(0.02)
    for client in clients:
        assert client.messages() == [{"op": "broadcast", "broadcast": "b1", "data": {"m": 1}}]
    reports = service.cluster.reports
    assert reports[0][:2] == ("b1", "test-node") and reports[-1][2]["state"] == "done"
    assert reports[-1][2]["sent"] == 3 and service.broadcasts == {}
