"""The socket end of the write path: send at once, queue only what the socket does not take, keep the order."""

import socket

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor

from pushd.transport import WriteThroughServer, write_through


def connection():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    reactor = MemoryReactor()
    server = WriteThroughServer(ours, Protocol(), ("127.0.0.1", 1), None, 1, reactor)
    return server, theirs, reactor


def received(peer):
    chunks = []
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_a_write_with_nothing_queued_goes_straight_to_the_socket():
    server, peer, reactor = connection()
    server.write(b"hello")
    assert received(peer) == b"hello"
    assert server._tempDataLen == 0 and server not in reactor.getWriters()


def test_a_full_socket_queues_the_rest_and_later_writes_keep_their_order():
    server, peer, reactor = connection()
    big = bytes(range(256)) * 40000
    server.write(big)
    assert server._tempDataLen > 0 and server in reactor.getWriters()
    server.write(b"after")
    got = received(peer)
    while server._tempDataLen or len(server.dataBuffer) > server.offset:
        server.doWrite()
        got += received(peer)
    assert got == big + b"after"


def test_only_plain_tcp_ports_are_switched():
    class Port(tcp.Port):
        def __init__(self):
            pass

    port = Port()
    write_through(port)
    assert port.transport is WriteThroughServer
    other = object()
    write_through(other)


def test_queued_bytes_is_what_the_socket_did_not_take_and_test_transports_have_none():
    from twisted.internet.testing import StringTransport

    from pushd.transport import queued_bytes

    server, peer, _ = connection()
    queued = queued_bytes(server)
    assert queued is not None and queued() == 0
    big = bytes(range(256)) * 40000
    server.write(big)
    waiting = queued()
    assert 0 < waiting <= len(big)
    server.write(b"after")
    assert queued() == waiting + 5
    received(peer)
    server.doWrite()
    assert queued() < waiting + 5
    assert queued_bytes(StringTransport()) is None
