"""Hostile clients over raw sockets, for the fault tests and bench/non_reader.py: clients that never read, and
upgrade requests whose headers never end."""

from __future__ import annotations

import base64
import os
import select
import socket
import ssl
import struct
import time
from urllib.parse import urlsplit

TEXT = 0x1
PING = 0x9
#: A native-protocol ping: the node answers every one with a pong frame carrying the same id.
APP_PING = b'{"op":"ping","id":"' + b"x" * 60 + b'"}'
#: The largest control-frame payload: the node's pong echoes it.
PING_PAYLOAD = b"p" * 125


def rss_kib(pid: int) -> int:
    """The resident set size of process `pid`, in KiB (VmRSS in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (payloads under 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + masked


def address(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url.replace("//localhost:", "//127.0.0.1:"))
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"


def request_head(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n").encode()


def open_non_reader(url: str, receive_buffer: int = 4096, cafile: str | None = None) -> socket.socket:
    """A plain ws:// connection that has done its opening handshake and will read nothing from now on.

    The small receive buffer (set before connecting, so the window is small too) keeps what the kernels hold for
    it small, so what piles up is what the node itself keeps.
    """
    host, port, path = address(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect((host, port))
    if url.startswith("wss"):
        sock = ssl.create_default_context(cafile=cafile).wrap_socket(sock, server_hostname="localhost")
    sock.sendall(request_head(host, port, path) + b"\r\n")
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError(f"connection closed during the handshake: {response!r}")
        response += chunk
    if not response.startswith(b"HTTP/1.1 101"):
        raise AssertionError(f"no upgrade: {response!r}")
    return sock


def flood(sock: socket.socket, opcode: int, payload: bytes, seconds: float, batch: int = 64) -> float | None:
    """Send frames without reading for at most `seconds`; the time the node cut the connection after, or None.

    A node that stops reading from the client makes `send` block; the short timeout keeps the loop bounded.
    """
    frames = frame(opcode, payload) * batch
    sock.settimeout(0.5)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            sock.sendall(frames)
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None


def endless_headers(url: str, limit: int, line: bytes = b"X-Filler: " + b"a" * 100 + b"\r\n") -> tuple[bytes, int]:
    """Send an upgrade request whose header lines never end, up to `limit` bytes; (what came back, bytes sent).

    Stops sending when the node answers or closes; what came back is read until the node closes the connection.
    """
    host, port, path = address(url)
    sock = socket.create_connection((host, port), timeout=10)
    sent = 0
    answer = b""
    try:
        sock.sendall(request_head(host, port, path))
        sock.setblocking(False)
        while sent < limit:
            try:
                answer += sock.recv(65536)
                break  # an answer, or the end of the connection
            except BlockingIOError:
                pass
            except OSError:
                break
            try:
                sent += sock.send(line)
            except BlockingIOError:
                # The node is not reading: wait (bounded) until it answers or takes more.
                select.select([sock], [sock], [], 1.0)
            except OSError:
                break
        sock.settimeout(10)
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
    finally:
        sock.close()
    return answer, sent
