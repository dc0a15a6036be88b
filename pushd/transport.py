"""TCP connections that send at once: the socket end of pushd's write path.

Twisted's TCP transport queues every write and sends it when the reactor next finds the socket writable: an
epoll_ctl pair and a reactor turn per write, for a socket that almost always has room. pushd writes each
connection once per Redis read, so that cost is paid per delivery (docs/performance.md). `WriteThroughServer`
sends first and queues only what the socket did not take, as asyncio does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import abstract, tcp
from twisted.protocols.tls import TLSMemoryBIOProtocol


class WriteThroughServer(tcp.Server):
    """A server-side TCP connection whose writes go straight to the socket when nothing is queued before them.

    Anything already queued goes first, so bytes keep their order; a full socket queues the rest, so Twisted's
    producer pausing (slow consumers) works as before; errors are left to Twisted's own write path, which
    meets them and closes the connection as usual.
    """

    def write(self, data: bytes) -> None:
        if self._tempDataLen or len(self.dataBuffer) > self.offset or self.disconnecting or not self.connected:
            super().write(data)
            return
        try:
            sent = self.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            super().write(data)
            return
        if sent < len(data):
            super().write(data[sent:])


def write_through(port: Any) -> None:
    """Make the connections a listening port accepts from now on `WriteThroughServer`s (TCP ports only)."""
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = WriteThroughServer


def queued_bytes(transport: Any) -> Callable[[], int] | None:
    """A function telling how many bytes `transport` holds that its socket has not taken, if it can tell.

    A TLS layer passes its records on to the TCP transport below it at once, so that is where they wait. None for
    transports without a socket buffer of their own (test transports).
    """
    socket_end = transport.transport if isinstance(transport, TLSMemoryBIOProtocol) else transport
    if not isinstance(socket_end, abstract.FileDescriptor):
        return None
    fd = socket_end

    def queued() -> int:
        return fd._tempDataLen + len(fd.dataBuffer) - fd.offset

    return queued
