"""Memory one idle server-side TLS connection costs inside OpenSSL, as pyOpenSSL runs it for pushd.

Makes N server connections with memory BIOs (as Twisted does), completes each handshake with a client that is
then freed, exchanges one small message each way, and reports the heap growth per kept server connection
(glibc's mallinfo2, so only memory really in use counts). Run it with different `cryptography` versions to see
what each bundled OpenSSL costs:

    python bench/tls_memory.py            # the installed cryptography / OpenSSL
    python bench/tls_memory.py --tls12    # the same, TLS 1.2 only

With an older OpenSSL (cryptography 41 bundles OpenSSL 3.1, before the 3.2 record layer), in a venv of its own:

    python bench/tls_memory.py --write-cert /tmp/tlsmem     # once, with pushd installed
    python -m venv /tmp/old && /tmp/old/bin/pip install 'cryptography==41.0.7' 'pyopenssl==23.3.0'
    /tmp/old/bin/python bench/tls_memory.py --cert-dir /tmp/tlsmem
"""

from __future__ import annotations

import ctypes
import gc
import sys
import tempfile

from cryptography.hazmat.backends.openssl import backend
from OpenSSL import SSL


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ["arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"]]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap_in_use() -> int:
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _pump(a: SSL.Connection, b: SSL.Connection) -> None:
    moved = True
    while moved:
        moved = False
        for source, sink in ((a, b), (b, a)):
            try:
                data = source.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                sink.bio_write(data)
                moved = True


def server_connection(server: SSL.Context, client: SSL.Context) -> SSL.Connection:
    s = SSL.Connection(server, None)
    s.set_accept_state()
    c = SSL.Connection(client, None)
    c.set_connect_state()
    for _ in range(10):
        for conn in (c, s):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
        _pump(c, s)
    s.send(b"x" * 100)
    _pump(c, s)
    c.recv(1000)
    c.send(b"y" * 100)
    _pump(c, s)
    s.recv(1000)
    return s


def certificate(argv: list[str], directory: str) -> tuple[str, str]:
    """The localhost key and certificate pushd generates (made with pushd), or ready-made ones (--cert-dir)."""
    if "--cert-dir" in argv:
        given = argv[argv.index("--cert-dir") + 1]
        return f"{given}/localhost.key", f"{given}/localhost.pem"
    sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
    from pushd.tls import ensure_localhost_certificate

    return ensure_localhost_certificate(directory)


def main(argv: list[str]) -> None:
    count = 2000
    if "--write-cert" in argv:
        certificate([], argv[argv.index("--write-cert") + 1])
        return
    with tempfile.TemporaryDirectory() as directory:
        key, cert = certificate(argv, directory)
        server = SSL.Context(SSL.TLS_SERVER_METHOD)
        server.use_certificate_file(cert)
        server.use_privatekey_file(key)
        server.set_mode(SSL.MODE_RELEASE_BUFFERS)
        if "--tls12" in argv:
            server.set_max_proto_version(SSL.TLS1_2_VERSION)
        client = SSL.Context(SSL.TLS_CLIENT_METHOD)
        for _ in range(50):
            server_connection(server, client)
        gc.collect()
        before = heap_in_use()
        kept = [server_connection(server, client) for _ in range(count)]
        gc.collect()
        per = (heap_in_use() - before) / count / 1024
    version = "TLS 1.2" if "--tls12" in argv else "TLS 1.3"
    sys.stdout.write(f"{backend.openssl_version_text()}, {version}, MODE_RELEASE_BUFFERS: "
                     f"{per:.1f} KiB per idle server connection ({len(kept)} kept)\n")


if __name__ == "__main__":
    main(sys.argv[1:])
