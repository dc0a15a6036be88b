"""A self-signed ``localhost`` certificate and the ``ssl:`` listen string for it, so pushd serves TLS out of the box.

Browsers only allow secure WebSockets (``wss://``) from secure pages, so even a local development run needs a
certificate; this module makes and renews one in the cert dir instead of asking every developer to run openssl.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.endpoints import quoteStringArgument
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol

log = Logger()

KEY_FILENAME = "localhost.key"
CERT_FILENAME = "localhost.pem"

# 397 days is the longest lifetime the CA/Browser Forum allows for TLS server certificates; Apple's clients
# reject server certificates valid for longer, even self-signed ones the user chose to trust.
VALIDITY = timedelta(days=397)
# Start an hour in the past so a client whose clock is a little behind ours does not see "not yet valid".
BACKDATE = timedelta(hours=1)
# Renew this long before expiry, so a long-running server is not restarted onto a certificate about to lapse.
RENEW_BEFORE = timedelta(days=30)


class CertificateError(Exception):
    """The cert dir cannot be created or written; the message starts with "cert-dir:" and is the one line shown."""


def _utcnow() -> datetime:
    """The real clock, as an aware UTC datetime to compare with the certificate's *_utc dates."""
    return datetime.now(UTC)


def _as_utc(moment: datetime) -> datetime:
    """Treat a naive datetime from an injected clock as UTC, so comparisons with the certificate's dates work."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def certificate_paths(cert_dir: str) -> tuple[str, str]:
    """The (key_path, cert_path) pushd uses in `cert_dir`, computed in one place so generator and listener agree."""
    return os.path.join(cert_dir, KEY_FILENAME), os.path.join(cert_dir, CERT_FILENAME)


def _public_der(public_key: PublicKeyTypes) -> bytes:
    """DER SubjectPublicKeyInfo of a public key, the form in which a key and a certificate can be compared."""
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _reusable(key_path: str, cert_path: str, now: datetime) -> bool:
    """True if the files parse, the key belongs to the certificate, and it is valid for more than RENEW_BEFORE."""
    try:
        with open(cert_path, "rb") as cert_file:
            cert = x509.load_pem_x509_certificate(cert_file.read())
        with open(key_path, "rb") as key_file:
            key = serialization.load_pem_private_key(key_file.read(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        # Missing, unreadable, corrupt, encrypted or an unsupported key type: all mean "make a new pair".
        return False
    if not cert.not_valid_before_utc <= now or cert.not_valid_after_utc - now <= RENEW_BEFORE:
        return False
    return _public_der(cert.public_key()) == _public_der(key.public_key())


def _generate(now: datetime) -> tuple[bytes, bytes, datetime]:
    """A new (key PEM, certificate PEM, expiry) for localhost, self-signed."""
    # EC P-256 rather than RSA 2048: generation takes milliseconds instead of up to a second, the handshake is
    # cheaper, and every browser and TLS library pushd's clients use supports it. It also needs only the
    # digitalSignature key usage (RSA key transport, which needs keyEncipherment, does not apply to EC keys).
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    # Certificates hold whole seconds; drop the microseconds so the expiry we log is the one in the file.
    not_before = (now - BACKDATE).replace(microsecond=0)
    not_after = not_before + VALIDITY
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM), not_after


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    """Write `data` to `path` via a temp file in the same dir and os.replace, so readers never see half a file."""
    directory = os.path.dirname(path) or "."
    try:
        # mkstemp creates the file 0600, so the private key is never readable by others, not even briefly.
        fd, temp_path = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    except OSError as error:
        raise CertificateError(f"cert-dir: cannot write {path!r}: {error.strerror or error}") from error
    try:
        with os.fdopen(fd, "wb") as temp_file:
            os.fchmod(temp_file.fileno(), mode)
            temp_file.write(data)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_path, path)
    except OSError as error:
        try:
            os.unlink(temp_path)
        except OSError:
            pass
        raise CertificateError(f"cert-dir: cannot write {path!r}: {error.strerror or error}") from error


def ensure_localhost_certificate(cert_dir: str, clock: Callable[[], datetime] = _utcnow) -> tuple[str, str]:
    """Return (key_path, cert_path) in `cert_dir`, reusing a good pair there or writing a new one.

    Reuse keeps the certificate a developer told their browser to trust across restarts; anything missing,
    corrupt, mismatched, expired or within 30 days of expiry is replaced, so a stale pair never stops start-up.
    `clock` returns the current time (aware, UTC) and exists so tests can move time. Raises CertificateError
    if `cert_dir` cannot be created or written.
    """
    key_path, cert_path = certificate_paths(cert_dir)
    try:
        os.makedirs(cert_dir, exist_ok=True)
    except OSError as error:
        raise CertificateError(f"cert-dir: cannot write {cert_dir!r}: {error.strerror or error}") from error
    now = _as_utc(clock())
    if _reusable(key_path, cert_path, now):
        return key_path, cert_path
    key_pem, cert_pem, expiry = _generate(now)
    # Key first: if we die between the two writes, the next start sees a mismatched pair and regenerates.
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert_pem, 0o644)
    log.info(
        "Generated a self-signed certificate for localhost at {cert_path} (expires {expiry})",
        cert_path=cert_path,
        expiry=expiry.isoformat(),
    )
    return key_path, cert_path


def default_listen(cert_dir: str, port: int = 8443) -> str:
    """The ``ssl:`` server endpoint string for the localhost pair in `cert_dir` (the files are not touched).

    Paths are quoted with Twisted's quoteStringArgument, because ':' and '\\' are syntax in endpoint strings
    and a cert dir containing them would otherwise be split into bogus arguments.
    """
    key_path, cert_path = certificate_paths(cert_dir)
    quoted_key: str = quoteStringArgument(key_path)
    quoted_cert: str = quoteStringArgument(cert_path)
    return f"ssl:{port}:privateKey={quoted_key}:certKey={quoted_cert}"


def direct_writer(transport: Any) -> Callable[[bytes], None]:
    """The cheapest correct way to write application bytes to `transport`, TLS or not.

    Twisted's TLS transport holds every small write until the next reactor iteration, at the price of one
    `callLater` per write. pushd already gives each connection one write per Redis read, so for its connections
    that aggregation is pure overhead on the hot path (measured in docs/performance.md). This switches it off
    for the connection, for every writer alike (Autobahn's replies included), so the order of bytes is kept:
    what the aggregator still holds (the handshake's 101 response) goes out first.
    """
    # ssl: endpoints hand the protocol the TLS layer itself; reactor.listenSSL-style ports (twisted.internet._newtls)
    # hand it a socket transport whose `protocol` is the TLS layer.
    tls = transport
    if not isinstance(tls, BufferingTLSTransport) and getattr(transport, "TLS", False):
        tls = getattr(transport, "protocol", None)
    if isinstance(tls, BufferingTLSTransport):
        tls._aggregator.close()  # flush now, and cancel the flush it scheduled
        write: Callable[[bytes], None] = TLSMemoryBIOProtocol.write.__get__(tls)
        tls.write = write  # type: ignore[method-assign]
        return write
    plain: Callable[[bytes], None] = transport.write
    return plain

