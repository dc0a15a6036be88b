"""pushd.tls: the generated localhost certificate, its reuse and renewal, and the ssl: listen string."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from service_identity.pyopenssl import verify_hostname
from twisted.internet import reactor
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.logger import Logger, formatEvent

from pushd import tls
from pushd.tls import CertificateError, default_listen, ensure_localhost_certificate


def _later(days: int) -> Callable[[], datetime]:
    return lambda: datetime.now(UTC) + timedelta(days=days)


def _load(key_path: str, cert_path: str) -> tuple[Any, x509.Certificate]:
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    return key, x509.load_pem_x509_certificate(Path(cert_path).read_bytes())


def _spki(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _current_mode(context: SSL.Context) -> int:
    # set_mode ORs its argument in and returns the resulting bitmask (SSL_CTX_set_mode is
    # SSL_CTX_ctrl(ctx, SSL_CTRL_MODE, op, NULL) and SSL_CTX_get_mode the same call with op=0), so 0 reads it.
    return int(context.set_mode(0))


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    captured: list[dict[str, Any]] = []
    monkeypatch.setattr(tls, "log", Logger(namespace="pushd.tls", observer=captured.append))
    return captured


def test_generates_pair_in_empty_dir(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    cert_dir = tmp_path / "certs" / "nested"
    key_path, cert_path = ensure_localhost_certificate(str(cert_dir))

    assert (key_path, cert_path) == (str(cert_dir / "localhost.key"), str(cert_dir / "localhost.pem"))
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert sorted(os.listdir(cert_dir)) == ["localhost.key", "localhost.pem"]  # no temp files left behind

    key, cert = _load(key_path, cert_path)
    assert _spki(key.public_key()) == _spki(cert.public_key())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    assert cert.issuer == cert.subject
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    now = datetime.now(UTC)
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=397)

    assert len(events) == 1
    message = formatEvent(events[0])
    assert cert_path in message and cert.not_valid_after_utc.isoformat() in message


def test_second_call_reuses_files(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    key_path, cert_path = ensure_localhost_certificate(str(tmp_path))
    before = Path(key_path).read_bytes(), Path(cert_path).read_bytes()

    assert ensure_localhost_certificate(str(tmp_path)) == (key_path, cert_path)
    assert (Path(key_path).read_bytes(), Path(cert_path).read_bytes()) == before
    assert len(events) == 1  # only the first call generated (and logged)


def test_expired_certificate_is_replaced(tmp_path: Path) -> None:
    key_path, cert_path = ensure_localhost_certificate(str(tmp_path))
    old_cert = Path(cert_path).read_bytes()

    ensure_localhost_certificate(str(tmp_path), clock=_later(730))

    assert Path(cert_path).read_bytes() != old_cert
    _, cert = _load(key_path, cert_path)
    assert cert.not_valid_before_utc < _later(730)() < cert.not_valid_after_utc


def test_certificate_close_to_expiry_is_renewed(tmp_path: Path) -> None:
    _, cert_path = ensure_localhost_certificate(str(tmp_path))
    old_cert = Path(cert_path).read_bytes()

    ensure_localhost_certificate(str(tmp_path), clock=_later(360))  # 36 days left: keep
    assert Path(cert_path).read_bytes() == old_cert
    ensure_localhost_certificate(str(tmp_path), clock=_later(370))  # 26 days left: renew
    assert Path(cert_path).read_bytes() != old_cert


@pytest.mark.parametrize("which", ["localhost.key", "localhost.pem"])
def test_corrupt_file_is_replaced(tmp_path: Path, which: str) -> None:
    key_path, cert_path = ensure_localhost_certificate(str(tmp_path))
    (tmp_path / which).write_bytes(b"-----BEGIN GARBAGE-----\nnot pem\n")

    ensure_localhost_certificate(str(tmp_path))

    key, cert = _load(key_path, cert_path)
    assert _spki(key.public_key()) == _spki(cert.public_key())


def test_mismatched_key_is_replaced(tmp_path: Path) -> None:
    key_a, cert_a = ensure_localhost_certificate(str(tmp_path / "a"))
    key_b, _ = ensure_localhost_certificate(str(tmp_path / "b"))
    Path(key_a).write_bytes(Path(key_b).read_bytes())
    old_cert = Path(cert_a).read_bytes()

    ensure_localhost_certificate(str(tmp_path / "a"))

    key, cert = _load(key_a, cert_a)
    assert Path(cert_a).read_bytes() != old_cert
    assert _spki(key.public_key()) == _spki(cert.public_key())


def test_missing_one_file_is_replaced(tmp_path: Path) -> None:
    key_path, cert_path = ensure_localhost_certificate(str(tmp_path))
    os.unlink(cert_path)

    ensure_localhost_certificate(str(tmp_path))

    key, cert = _load(key_path, cert_path)
    assert _spki(key.public_key()) == _spki(cert.public_key())


def test_cert_dir_under_regular_file_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cert_dir = str(blocker / "certs")

    with pytest.raises(CertificateError) as caught:
        ensure_localhost_certificate(cert_dir)

    message = str(caught.value)
    assert message.startswith("cert-dir: cannot write ")
    assert repr(cert_dir) in message
    assert "\n" not in message


def test_failed_write_raises_and_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A read-only directory would not stop root; a refused rename of the key is the same failure for anyone.
    def refuse(source: str, target: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(CertificateError) as caught:
        ensure_localhost_certificate(str(tmp_path))

    key_path = str(tmp_path / "localhost.key")
    assert str(caught.value) == f"cert-dir: cannot write {key_path!r}: Permission denied"
    assert os.listdir(tmp_path) == []


def test_default_listen_quotes_paths(tmp_path: Path) -> None:
    cert_dir = tmp_path / "we:ird\\dir"
    description = default_listen(str(cert_dir), port=9443)

    assert description.startswith("ssl:9443:privateKey=")
    quoted = str(cert_dir).replace("\\", "\\\\").replace(":", "\\:")
    assert description == f"ssl:9443:privateKey={quoted}/localhost.key:certKey={quoted}/localhost.pem"
    assert default_listen(str(cert_dir)).startswith("ssl:8443:")

    ensure_localhost_certificate(str(cert_dir))
    endpoint = serverFromString(reactor, description)  # reads both files, so the paths must survive parsing
    assert isinstance(endpoint, SSL4ServerEndpoint)


def test_default_listen_endpoint_releases_idle_buffers(tmp_path: Path) -> None:
    # Twisted's CertificateOptions sets MODE_RELEASE_BUFFERS by default; pushd relies on it (docs/performance.md).
    cert_dir = tmp_path / "with:colon"
    ensure_localhost_certificate(str(cert_dir))

    endpoint = serverFromString(reactor, default_listen(str(cert_dir), port=0))

    assert isinstance(endpoint, SSL4ServerEndpoint)
    context = endpoint._sslContextFactory.getContext()
    assert _current_mode(context) & SSL.MODE_RELEASE_BUFFERS
    assert _current_mode(context) == _current_mode(context)  # reading the mode does not change it


def _pump(source: SSL.Connection, sink: SSL.Connection) -> bool:
    try:
        data = source.bio_read(65536)
    except SSL.WantReadError:
        return False
    sink.bio_write(data)
    return True


def test_generated_pair_completes_handshake_over_memory_bios(tmp_path: Path) -> None:
    _, cert_path = ensure_localhost_certificate(str(tmp_path / "a:b"))
    endpoint = serverFromString(reactor, default_listen(str(tmp_path / "a:b"), port=0))
    server = SSL.Connection(endpoint._sslContextFactory.getContext(), None)
    server.set_accept_state()

    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_context.set_verify(SSL.VERIFY_NONE)
    client = SSL.Connection(client_context, None)
    client.set_tlsext_host_name(b"localhost")
    client.set_connect_state()

    done = {"client": False, "server": False}
    for _ in range(20):
        for name, connection in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    connection.do_handshake()
                    done[name] = True
                except SSL.WantReadError:
                    pass
        moved = _pump(client, server) | _pump(server, client)
        if all(done.values()) and not moved:
            break
    assert all(done.values())

    peer = client.get_peer_certificate(as_cryptography=True)
    assert peer is not None
    assert peer == x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    verify_hostname(client, "localhost")  # the SAN satisfies RFC 6125 checking as browsers do it

    client.send(b"ping")
    _pump(client, server)
    assert server.recv(4) == b"ping"
    server.send(b"pong")
    _pump(server, client)
    assert client.recv(4) == b"pong"


def test_direct_writer_turns_off_small_write_aggregation_for_tls(tmp_path: Path) -> None:
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.ssl import PrivateCertificate
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

    from pushd.tls import direct_writer

    class Host:
        """What pushd's protocol sees as its transport under an ssl: endpoint (twisted.internet._newtls)."""

        TLS = True

        def __init__(self, tls: TLSMemoryBIOProtocol) -> None:
            self.protocol = tls

        def write(self, data: bytes) -> None:
            self.protocol.write(data)

    key_path, cert_path = ensure_localhost_certificate(str(tmp_path))
    with open(cert_path, "rb") as cert, open(key_path, "rb") as key:
        options = PrivateCertificate.loadPEM(cert.read() + key.read()).options()
    clock = Clock()
    factory = TLSMemoryBIOFactory(options, False, Factory.forProtocol(Protocol), clock=clock)
    tls = factory.buildProtocol(None)
    assert tls is not None
    tls.makeConnection(StringTransport())
    write = direct_writer(Host(tls))
    assert getattr(write, "__func__", None) is TLSMemoryBIOProtocol.write
    assert getattr(tls.write, "__func__", None) is TLSMemoryBIOProtocol.write
    write(b"hello")
    assert clock.getDelayedCalls() == []

    # what an ssl: endpoint gives the protocol: the TLS layer itself
    tls = factory.buildProtocol(None)
    assert tls is not None
    tls.makeConnection(StringTransport())
    write = direct_writer(tls)
    assert getattr(write, "__func__", None) is TLSMemoryBIOProtocol.write
    write(b"hello")
    assert clock.getDelayedCalls() == []


def test_direct_writer_leaves_plain_transports_alone() -> None:
    from twisted.internet.testing import StringTransport

    from pushd.tls import direct_writer

    transport = StringTransport()
    write = direct_writer(transport)
    write(b"x")
    assert transport.value() == b"x"



@pytest.mark.parametrize("offered", [["h2", "http/1.1"], ["http/1.1"]])
def test_wss_handshake_with_a_client_that_offers_alpn(tmp_path: Path, offered: list[str]) -> None:
    # Browsers, curl and Node offer ALPN; the listening context used to answer them with an internal-error alert.
    import ssl

    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from pushd.testing import MemoryNode

    _, cert_path = ensure_localhost_certificate(str(tmp_path))
    endpoint = serverFromString(reactor, default_listen(str(tmp_path), port=0))
    node = MemoryNode()
    server = TLSMemoryBIOFactory(endpoint._sslContextFactory, False, node.factory, clock=node.clock).buildProtocol(
        IPv4Address("TCP", "127.0.0.1", 40000))
    assert server is not None
    wire = StringTransport()
    server.makeConnection(wire)

    context = ssl.create_default_context(cafile=cert_path)
    context.set_alpn_protocols(offered)
    into_client, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(into_client, from_client, server_hostname="localhost")

    def pump() -> None:
        server.dataReceived(from_client.read())
        node.clock.advance(0)
        into_client.write(wire.value())
        wire.clear()

    for _ in range(10):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            pump()
    pump()
    assert client.selected_alpn_protocol() == "http/1.1"

    client.write(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    pump()
    assert client.read(4096).startswith(b"HTTP/1.1 101 ")


def test_direct_writer_sends_what_the_aggregator_holds_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A close sent as the connection opens must follow the 101 response, which Twisted still holds back."""
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.ssl import PrivateCertificate
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

    from pushd.tls import direct_writer

    written: list[bytes] = []

    def record(self: TLSMemoryBIOProtocol, data: bytes) -> None:
        written.append(data)

    monkeypatch.setattr(TLSMemoryBIOProtocol, "write", record)
    key_path, cert_path = ensure_localhost_certificate(str(tmp_path))
    with open(cert_path, "rb") as cert, open(key_path, "rb") as key:
        options = PrivateCertificate.loadPEM(cert.read() + key.read()).options()
    clock = Clock()
    tls = TLSMemoryBIOFactory(options, False, Factory.forProtocol(Protocol), clock=clock).buildProtocol(None)
    assert tls is not None
    tls.makeConnection(StringTransport())
    tls.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    assert written == []
    direct_writer(tls)(b"\x88\x02\x0f\xa1")
    assert written == [b"HTTP/1.1 101 Switching Protocols\r\n\r\n", b"\x88\x02\x0f\xa1"]
    clock.advance(0)
    assert len(written) == 2
