"""Client tokens with real keys: what verifies, every way a token is refused, key settings, topic permissions."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from pushd.auth import MAX_REASON_BYTES, AuthError, Identity, Permissions, TokenVerifier, allowed

NOW = 1_700_000_000.0
SECRET = "a shared secret of at least 64 bytes, so that even HS512 signs without a warning"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())
DROP = object()


def public_pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_jwk(private_key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    algorithm = RSAAlgorithm if isinstance(private_key, rsa.RSAPrivateKey) else ECAlgorithm
    jwk = dict(algorithm.to_jwk(private_key.public_key(), as_dict=True))
    jwk["kid"] = kid
    jwk.update(extra)
    return jwk


def claims(**changes: Any) -> dict[str, Any]:
    """A valid payload ('alice', a minute to live) with `changes`; DROP removes a claim."""
    payload: dict[str, Any] = {"sub": "alice", "exp": NOW + 60}
    payload.update(changes)
    return {name: value for name, value in payload.items() if value is not DROP}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def by_hand(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(signature)}"


def hmac_by_hand(payload: dict[str, Any], key: bytes, header: dict[str, Any] | None = None) -> str:
    """An HS256 token made without PyJWT, which refuses to HMAC with a PEM: the algorithm-confusion attack."""
    signing_input = by_hand(header or {"alg": "HS256", "typ": "JWT"}, payload).rsplit(".", 1)[0]
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def hs256(payload: dict[str, Any], secret: str = SECRET, **options: Any) -> str:
    return jwt.encode(payload, secret, algorithm=options.pop("algorithm", "HS256"), **options)


def rs256(payload: dict[str, Any], key: Any = RSA_KEY, **options: Any) -> str:
    return jwt.encode(payload, key, algorithm=options.pop("algorithm", "RS256"), **options)


def es256(payload: dict[str, Any], key: Any = EC_KEY, **options: Any) -> str:
    return jwt.encode(payload, key, algorithm=options.pop("algorithm", "ES256"), **options)


JWKS = {"keys": [public_jwk(RSA_KEY, "rsa-1"), public_jwk(EC_KEY, "ec-1", alg="ES256", use="sig")]}
BY_SECRET = TokenVerifier(secret=SECRET)
BY_RSA = TokenVerifier(public_key_pem=public_pem(RSA_KEY))
BY_EC = TokenVerifier(public_key_pem=public_pem(EC_KEY))
BY_JWKS = TokenVerifier(jwks=JWKS)
VERIFIERS = pytest.mark.parametrize("verifier", [BY_SECRET, BY_RSA, BY_EC, BY_JWKS],
                                    ids=["secret", "rsa", "ec", "jwks"])


def refused(verifier: TokenVerifier, token: str, now: float = NOW) -> str:
    """The close reason `verifier` refuses `token` with, checked to fit a close frame."""
    with pytest.raises(AuthError) as caught:
        verifier.verify(token, now)
    reason = str(caught.value)
    assert reason.isascii() and len(reason.encode()) <= MAX_REASON_BYTES, reason
    assert reason.startswith("token"), reason
    return reason


def test_valid_hs256_rs256_es256_tokens():
    assert BY_SECRET.verify(hs256(claims()), NOW) == Identity("alice", NOW + 60, None)
    assert BY_RSA.verify(rs256(claims(sub="bob")), NOW) == Identity("bob", NOW + 60, None)
    assert BY_EC.verify(es256(claims(topics=["sh600*", "AAPL"])), NOW) == Identity("alice", NOW + 60,
                                                                                   ("sh600*", "AAPL"))


def test_valid_jwks_tokens_are_picked_by_kid():
    assert BY_JWKS.verify(rs256(claims(), headers={"kid": "rsa-1"}), NOW).user == "alice"
    assert BY_JWKS.verify(es256(claims(sub="bob"), headers={"kid": "ec-1"}), NOW).user == "bob"


def test_identity_fields():
    identity = BY_SECRET.verify(hs256(claims(sub="u" * 128, exp=NOW + 0.5, topics=[])), NOW)
    assert identity == Identity("u" * 128, NOW + 0.5, ())
    assert isinstance(identity.expires, float)


def test_expired_at_exp_and_after():
    assert refused(BY_SECRET, hs256(claims(exp=NOW))) == "token expired"
    assert refused(BY_SECRET, hs256(claims(exp=NOW - 1))) == "token expired"
    assert refused(BY_RSA, rs256(claims(exp=NOW - 3600))) == "token expired"
    assert BY_SECRET.verify(hs256(claims(exp=NOW + 1)), NOW).expires == NOW + 1


def test_leeway_stretches_exp_and_nbf():
    lenient = TokenVerifier(secret=SECRET, leeway=30)
    assert lenient.verify(hs256(claims(exp=NOW - 29)), NOW).user == "alice"
    assert refused(lenient, hs256(claims(exp=NOW - 30))) == "token expired"
    assert lenient.verify(hs256(claims(nbf=NOW + 30)), NOW).user == "alice"
    assert refused(lenient, hs256(claims(nbf=NOW + 31))) == "token is not valid yet (nbf)"


def test_nbf():
    assert BY_SECRET.verify(hs256(claims(nbf=NOW)), NOW).user == "alice"
    assert refused(BY_SECRET, hs256(claims(nbf=NOW + 1))) == "token is not valid yet (nbf)"
    assert refused(BY_SECRET, hs256(claims(nbf="later"))) == "token nbf claim is not a number"


def test_now_is_the_callers_clock():
    token = hs256(claims(exp=NOW + 60))
    assert BY_SECRET.verify(token, NOW + 59).user == "alice"
    assert refused(BY_SECRET, token, now=NOW + 60) == "token expired"


@pytest.mark.parametrize("verifier, token", [
    (BY_SECRET, hs256(claims(), secret=SECRET.upper())),
    (BY_RSA, rs256(claims(), key=OTHER_RSA_KEY)),
    (BY_EC, es256(claims(), key=OTHER_EC_KEY)),
    (BY_JWKS, rs256(claims(), key=OTHER_RSA_KEY, headers={"kid": "rsa-1"})),
    (BY_JWKS, es256(claims(), key=OTHER_EC_KEY, headers={"kid": "ec-1"})),
], ids=["secret", "rsa", "ec", "jwks-rsa", "jwks-ec"])
def test_wrong_key(verifier, token):
    assert refused(verifier, token) == "token signature is invalid"


@pytest.mark.parametrize("verifier, token", [
    (BY_SECRET, hs256(claims())),
    (BY_RSA, rs256(claims())),
    (BY_EC, es256(claims())),
    (BY_JWKS, rs256(claims(), headers={"kid": "rsa-1"})),
], ids=["secret", "rsa", "ec", "jwks"])
def test_tampered_payload(verifier, token):
    header, _, signature = token.split(".")
    forged = f"{header}.{b64(json.dumps(claims(sub='admin')).encode())}.{signature}"
    assert refused(verifier, forged) == "token signature is invalid"


@VERIFIERS
@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_unsigned_tokens_are_refused(verifier, alg):
    header = {"alg": alg, "typ": "JWT", "kid": "rsa-1"}
    reason = refused(verifier, by_hand(header, claims()))
    assert reason in (f"token algorithm {alg} is not accepted", "token header has no alg")
    assert refused(verifier, by_hand({"typ": "JWT"}, claims())) == "token header has no alg"


def test_hs256_signed_with_the_public_key_is_refused():
    """Algorithm confusion: the public key is public, so an HMAC made with it proves nothing."""
    for private_key, verifier in ((RSA_KEY, BY_RSA), (EC_KEY, BY_EC)):
        forged = hmac_by_hand(claims(), public_pem(private_key))
        assert refused(verifier, forged) == "token algorithm HS256 is not accepted"
    for kid, private_key in (("rsa-1", RSA_KEY), ("ec-1", EC_KEY)):
        header = {"alg": "HS256", "typ": "JWT", "kid": kid}
        for key in (public_pem(private_key), json.dumps(public_jwk(private_key, kid)).encode()):
            assert refused(BY_JWKS, hmac_by_hand(claims(), key, header)) == "token algorithm HS256 is not accepted"


@pytest.mark.parametrize("verifier, token, reason", [
    (BY_SECRET, hs256(claims(), algorithm="HS512"), "token algorithm HS512 is not accepted"),
    (BY_SECRET, hs256(claims(), algorithm="HS384"), "token algorithm HS384 is not accepted"),
    (BY_SECRET, rs256(claims()), "token algorithm RS256 is not accepted"),
    (BY_RSA, rs256(claims(), algorithm="RS512"), "token algorithm RS512 is not accepted"),
    (BY_RSA, rs256(claims(), algorithm="PS256"), "token algorithm PS256 is not accepted"),
    (BY_RSA, es256(claims()), "token algorithm ES256 is not accepted"),
    (BY_EC, rs256(claims()), "token algorithm RS256 is not accepted"),
    (BY_EC, es256(claims(), key=ec.generate_private_key(ec.SECP384R1()), algorithm="ES384"), "token algorithm ES384 is not accepted"),
    (BY_JWKS, rs256(claims(), algorithm="RS512", headers={"kid": "rsa-1"}), "token algorithm RS512 is not accepted"),
    (BY_JWKS, es256(claims(), headers={"kid": "rsa-1"}), "token algorithm ES256 is not accepted for kid 'rsa-1'"),
    (BY_JWKS, rs256(claims(), headers={"kid": "ec-1"}), "token algorithm RS256 is not accepted for kid 'ec-1'"),
    (BY_SECRET, by_hand({"alg": "HS256\u00e9" * 10}, claims()), None),
], ids=lambda value: value if isinstance(value, str) and len(value) < 40 else None)
def test_algorithms_other_than_the_configured_one(verifier, token, reason):
    got = refused(verifier, token)
    if reason is None:
        assert got.startswith("token algorithm ") and got.endswith(" is not accepted")
    else:
        assert got == reason


@pytest.mark.parametrize("payload, reason", [
    (claims(sub=DROP), "token has no sub claim"),
    (claims(sub=""), "token sub claim is empty"),
    (claims(sub=7), "token sub claim is not a string"),
    (claims(sub=None), "token sub claim is not a string"),
    (claims(sub=["alice"]), "token sub claim is not a string"),
    (claims(sub="u" * 129), "token sub claim is longer than 128 characters"),
    (claims(exp=DROP), "token has no exp claim"),
    (claims(exp="1700000060"), "token exp claim is not a number"),
    (claims(exp=None), "token exp claim is not a number"),
    (claims(exp=True), "token exp claim is not a number"),
    (claims(exp=10**400), "token exp claim is not a number"),
    (claims(exp=float("inf")), "token exp claim is not a number"),
    (claims(exp=float("nan")), "token exp claim is not a number"),
    (claims(topics="sh600*"), "token topics claim is not a list of non-empty strings"),
    (claims(topics=None), "token topics claim is not a list of non-empty strings"),
    (claims(topics=["AAPL", 7]), "token topics claim is not a list of non-empty strings"),
    (claims(topics=["AAPL", ""]), "token topics claim is not a list of non-empty strings"),
    (claims(topics={"AAPL": True}), "token topics claim is not a list of non-empty strings"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_bad_claims(payload, reason):
    assert refused(BY_SECRET, hs256(payload)) == reason


def test_audience_and_issuer_when_configured():
    strict = TokenVerifier(secret=SECRET, audience="pushd", issuer="https://id.example")
    good = claims(aud="pushd", iss="https://id.example")
    assert strict.verify(hs256(good), NOW).user == "alice"
    assert strict.verify(hs256(claims(aud=["other", "pushd"], iss="https://id.example")), NOW).user == "alice"
    assert refused(strict, hs256({**good, "aud": "other"})) == "token aud claim is not accepted"
    assert refused(strict, hs256({**good, "aud": ["other"]})) == "token aud claim is not accepted"
    assert refused(strict, hs256({**good, "aud": 5})) == "token aud claim is not accepted"
    assert refused(strict, hs256(claims(iss="https://id.example"))) == "token has no aud claim"
    assert refused(strict, hs256({**good, "iss": "https://evil.example"})) == "token iss claim is not accepted"
    assert refused(strict, hmac_by_hand({**good, "iss": 5}, SECRET.encode())) == "token iss claim is not accepted"
    assert refused(strict, hs256(claims(aud="pushd"))) == "token has no iss claim"


def test_audience_and_issuer_are_not_checked_when_not_configured():
    assert BY_SECRET.verify(hs256(claims(aud="anyone", iss="anybody")), NOW).user == "alice"


def test_jwks_kid():
    assert refused(BY_JWKS, rs256(claims(), headers={"kid": "nope"})) == "token kid 'nope' is unknown"
    assert refused(BY_JWKS, rs256(claims())) == "token header has no kid"
    assert refused(BY_JWKS, by_hand({"alg": "RS256", "kid": 7}, claims())) == "token is malformed"
    long_kid = refused(BY_JWKS, rs256(claims(), headers={"kid": "\u00e9\U0001f600" * 100}))
    assert long_kid.startswith("token kid '") and long_kid.endswith(" is unknown")


@VERIFIERS
@pytest.mark.parametrize("token", [
    "", "abc", "a.b.c", "a.b", "...", "a.b.c.d", "\u00e9.\u00e9.\u00e9", "W10.e30.", "e30.e30.", "bnVsbA.e30.",
    "eyJhbGciOiJIUzI1NiJ9.!!!!.sig", "x" * 10 * 1024,
], ids=lambda token: token if len(token) < 20 else f"{len(token)} chars")
def test_garbage_is_refused(verifier, token):
    refused(verifier, token)


def test_too_long_is_refused_before_parsing():
    assert refused(BY_SECRET, "x" * (8 * 1024 + 1)) == "token is too long"
    token = hs256(claims(pad="p" * (8 * 1024)))
    assert refused(BY_SECRET, token) == "token is too long"
    assert refused(BY_SECRET, "x" * (8 * 1024)) == "token is malformed"


def test_signed_but_malformed_payload():
    signing_input = f"{b64(json.dumps({'alg': 'HS256'}).encode())}.{b64(b'[1, 2]')}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    assert refused(BY_SECRET, f"{signing_input}.{b64(signature)}") == "token is malformed"


@given(st.text(max_size=300))
def test_any_text_is_an_auth_error_not_a_crash(text):
    for verifier in (BY_SECRET, BY_RSA, BY_JWKS):
        refused(verifier, text)


@given(st.lists(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=", max_size=60),
                min_size=1, max_size=5))
def test_any_base64ish_segments_are_an_auth_error_not_a_crash(segments):
    token = ".".join(segments)
    for verifier in (BY_SECRET, BY_EC, BY_JWKS):
        refused(verifier, token)


def test_constructor_wants_exactly_one_key_source():
    with pytest.raises(ValueError, match="exactly one"):
        TokenVerifier()
    with pytest.raises(ValueError, match="exactly one"):
        TokenVerifier(secret=SECRET, public_key_pem=public_pem(RSA_KEY))
    with pytest.raises(ValueError, match="exactly one"):
        TokenVerifier(public_key_pem=public_pem(RSA_KEY), jwks=JWKS)
    with pytest.raises(ValueError, match="leeway"):
        TokenVerifier(secret=SECRET, leeway=-1)


def _pem_of(key: Any, private: bool = False) -> bytes:
    if private:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return public_pem(key)


@pytest.mark.parametrize("pem, message", [
    (b"not a pem", "public key is not a PEM public key"),
    (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "public key is not a PEM public key"),
    (_pem_of(RSA_KEY, private=True), "public key holds a private key"),
    (_pem_of(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
     "public key is a 1024-bit RSA key; RS256 needs 2048 bits"),
    (_pem_of(ec.generate_private_key(ec.SECP384R1())), "public key is an EC key on curve secp384r1"),
    (_pem_of(ed25519.Ed25519PrivateKey.generate()), "public key is neither an RSA (RS256) nor an EC P-256"),
])
def test_unusable_public_keys(pem, message):
    with pytest.raises(ValueError) as caught:
        TokenVerifier(public_key_pem=pem)
    assert str(caught.value).startswith(message)


def test_secret_that_is_a_pem_key_is_refused():
    with pytest.raises(ValueError, match="secret looks like a PEM"):
        TokenVerifier(secret=public_pem(RSA_KEY).decode())


@pytest.mark.parametrize("document, message", [
    ({}, 'JWKS is not a JWKS document (a JSON object with a "keys" list)'),
    ({"keys": "x"}, 'JWKS is not a JWKS document (a JSON object with a "keys" list)'),
    ({"keys": [1]}, "JWKS is not a JWKS document (keys[0] is not an object)"),
    ({"keys": []}, "JWKS has no RSA (RS256) or EC P-256 (ES256) signing key with a kid"),
    ({"keys": [{"kty": "oct", "k": b64(SECRET.encode()), "kid": "hmac"}]}, "JWKS has no RSA"),
    ({"keys": [public_jwk(RSA_KEY, "r", alg="RS512")]}, "JWKS has no RSA"),
    ({"keys": [public_jwk(RSA_KEY, "r", alg="HS256")]}, "JWKS has no RSA"),
    ({"keys": [public_jwk(RSA_KEY, "r", use="enc")]}, "JWKS has no RSA"),
    ({"keys": [public_jwk(ec.generate_private_key(ec.SECP384R1()), "p384")]}, "JWKS has no RSA"),
    ({"keys": [{k: v for k, v in public_jwk(RSA_KEY, "r").items() if k != "kid"}]}, "JWKS has no RSA"),
    ({"keys": [public_jwk(RSA_KEY, "r"), public_jwk(OTHER_RSA_KEY, "r")]}, "JWKS has two keys with kid 'r'"),
    ({"keys": [{**public_jwk(RSA_KEY, "r"), "d": "AAAA"}]}, "JWKS key 'r' is a private key"),
    ({"keys": [{"kty": "RSA", "kid": "r", "n": "AAAA"}]}, "JWKS key 'r' is not a valid RSA public key"),
    ({"keys": [public_jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024), "small")]},
     "JWKS key 'small' is a 1024-bit RSA key"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_unusable_jwks(document, message):
    with pytest.raises(ValueError) as caught:
        TokenVerifier(jwks=document)
    assert str(caught.value).startswith(message)


def test_jwks_skips_keys_it_does_not_use():
    document = {"keys": [
        {"kty": "oct", "k": b64(SECRET.encode()), "kid": "hmac"},
        public_jwk(OTHER_RSA_KEY, "encryption", use="enc"),
        public_jwk(RSA_KEY, "rsa-1", alg="RS256"),
    ]}
    verifier = TokenVerifier(jwks=document)
    assert verifier.verify(rs256(claims(), headers={"kid": "rsa-1"}), NOW).user == "alice"
    assert refused(verifier, rs256(claims(), key=OTHER_RSA_KEY, headers={"kid": "encryption"})) == \
        "token kid 'encryption' is unknown"
    assert refused(verifier, hs256(claims(), headers={"kid": "hmac"})) == "token algorithm HS256 is not accepted"


def setting_values(**given: str) -> dict[str, str]:
    values = {"secret": "", "public_key_file": "", "jwks_file": "", "audience": "", "issuer": ""}
    values.update(given)
    return values


def settings_error(**given: str) -> str:
    with pytest.raises(ValueError) as caught:
        TokenVerifier.from_settings(**setting_values(**given))
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_from_settings_without_any_key_is_none():
    assert TokenVerifier.from_settings(**setting_values(audience="pushd")) is None


def test_from_settings_builds_each_kind(tmp_path: Path):
    pem_file = tmp_path / "key.pem"
    pem_file.write_bytes(public_pem(EC_KEY))
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(JWKS))
    by_secret = TokenVerifier.from_settings(**setting_values(secret=SECRET, audience="pushd"))
    by_pem = TokenVerifier.from_settings(**setting_values(public_key_file=str(pem_file), issuer="me"))
    by_jwks = TokenVerifier.from_settings(**setting_values(jwks_file=str(jwks_file)))
    assert by_secret is not None and by_pem is not None and by_jwks is not None
    assert by_secret.verify(hs256(claims(aud="pushd")), NOW).user == "alice"
    assert refused(by_secret, hs256(claims())) == "token has no aud claim"
    assert by_pem.verify(es256(claims(iss="me")), NOW).user == "alice"
    assert by_jwks.verify(es256(claims(), headers={"kid": "ec-1"}), NOW).user == "alice"


def test_from_settings_with_two_key_settings():
    message = "jwt-secret: set only one of jwt-secret, jwt-public-key, jwt-jwks"
    assert settings_error(secret=SECRET, public_key_file="/k.pem") == message
    assert settings_error(secret=SECRET, jwks_file="/k.json") == message
    assert settings_error(public_key_file="/k.pem", jwks_file="/k.json") == message


def test_from_settings_file_errors(tmp_path: Path):
    missing = str(tmp_path / "missing.pem")
    assert settings_error(public_key_file=missing) == \
        f"jwt-public-key: cannot read {missing!r}: No such file or directory"
    assert settings_error(jwks_file=missing) == f"jwt-jwks: cannot read {missing!r}: No such file or directory"
    assert settings_error(public_key_file=str(tmp_path)) == f"jwt-public-key: cannot read {str(tmp_path)!r}: " \
        "Is a directory"

    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    assert settings_error(public_key_file=str(empty)) == f"jwt-public-key: {str(empty)!r} is empty"

    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    assert settings_error(public_key_file=str(not_pem)).startswith(
        f"jwt-public-key: {str(not_pem)!r} is not a PEM public key")
    private = tmp_path / "private.pem"
    private.write_bytes(_pem_of(RSA_KEY, private=True))
    assert settings_error(public_key_file=str(private)).startswith(
        f"jwt-public-key: {str(private)!r} holds a private key")

    assert settings_error(secret=public_pem(RSA_KEY).decode()).startswith("jwt-secret: looks like a PEM")


@pytest.mark.parametrize("text, detail", [
    ("nope", "(not JSON: Expecting value: line 1 column 1 (char 0))"),
    ("", "(not JSON: "),
    ("[1, 2]", '(a JSON object with a "keys" list)'),
    ('{"a": 1}', '(a JSON object with a "keys" list)'),
    ('{"keys": {}}', '(a JSON object with a "keys" list)'),
    ("\xff", "(not JSON: "),
])
def test_from_settings_json_that_is_not_a_jwks(tmp_path: Path, text, detail):
    path = tmp_path / "jwks.json"
    path.write_bytes(text.encode("latin-1"))
    message = settings_error(jwks_file=str(path))
    assert message.startswith(f"jwt-jwks: {str(path)!r} is not a JWKS document {detail}")


def test_from_settings_jwks_without_usable_keys(tmp_path: Path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "AAAA", "kid": "x"}]}))
    assert settings_error(jwks_file=str(path)) == \
        f"jwt-jwks: {str(path)!r} has no RSA (RS256) or EC P-256 (ES256) signing key with a kid"


@pytest.mark.parametrize("topic, patterns, expected", [
    ("sh600519", ("*",), True),
    ("sh600519", ("sh600*",), True),
    ("sh600519", ("sh600?",), False),
    ("sh6005", ("sh600?",), True),
    ("sh600519", ("sh60051[0-9]",), True),
    ("SH600519", ("sh600*",), False),
    ("sh600519", ("sz*", "sh*"), True),
    ("sh600519", (), False),
    # Pattern subscriptions: allowed only when one allowed pattern covers every topic they match.
    ("sh600*", ("sh600*",), True),
    ("sh600*", ("*",), True),
    ("sh600*", ("sh*",), True),
    ("sh600*", ("sh600?",), False),
    ("sh600*", ("sh600??*",), False),
    ("sh600*", ("sh6001*",), False),
    ("sh600*", ("sh600[0-9]*",), False),
    ("sh600*", ("sh600[*]",), False),
    ("sh600*", ("sz*", "sh600*"), True),
    ("sz000*", ("sh600*",), False),
    ("sh600?", ("sh600?",), True),
    ("sh600?", ("sh600*",), True),
    ("sh600?", ("sh60??",), True),
    ("sh600?", ("sh600[0-9]",), False),
    ("sh600?*", ("sh600?*",), True),
    ("sh600?*", ("sh600*",), True),
    ("sh60[01]*", ("sh60[01]*",), True),
    ("sh60[01]*", ("sh60?*",), True),
    ("sh60[01]*", ("sh600*",), False),
    ("*", ("*",), True),
    ("*", ("sh*",), False),
    ("?", ("*",), True),
    ("?", ("?",), True),
])
def test_allowed(topic, patterns, expected):
    assert allowed(topic, patterns) is expected


TOPIC_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"


@given(st.text(TOPIC_CHARACTERS, min_size=1, max_size=64))
def test_star_allows_every_topic_and_a_topic_allows_itself(topic):
    assert allowed(topic, ("*",))
    assert allowed(topic, (topic,))


@given(st.text(TOPIC_CHARACTERS, min_size=1, max_size=16), st.text(TOPIC_CHARACTERS + "*?", max_size=16))
def test_plain_topics_are_fnmatchcase(topic, pattern):
    assert allowed(topic, (pattern,)) is fnmatchcase(topic, pattern)


@given(st.text("ab*?", min_size=1, max_size=6))
def test_a_pattern_allows_itself(pattern):
    assert allowed(pattern, (pattern,))


def _instance(data: st.DataObject, pattern: str) -> str:
    """One concrete string `pattern` matches, with '*' and '?' as possible literal characters too."""
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(data.draw(st.text("ab*?", max_size=3)))
        elif char == "?":
            parts.append(data.draw(st.sampled_from("ab*?")))
        else:
            parts.append(char)
    return "".join(parts)


@settings(max_examples=300)
@given(st.data(), st.text("ab*?", min_size=1, max_size=6))
def test_an_allowed_pattern_topic_only_reaches_allowed_topics(data, topic):
    # Allowed patterns made by loosening or changing the topic's own characters, so that many are close calls
    # (a plain fnmatchcase fails this within a few hundred examples).
    pattern = "".join(data.draw(st.sampled_from([char, "?", "*", "", char + "*", "[ab*?]"])) for char in topic)
    if allowed(topic, (pattern,)):
        for _ in range(5):
            instance = _instance(data, topic)
            assert fnmatchcase(instance, topic)
            assert fnmatchcase(instance, pattern), (topic, pattern, instance)


def test_permissions_for_anonymous_connections():
    assert Permissions().may_subscribe(None, "anything.at.all")
    public = Permissions(public_topics=("news.*", "status"))
    assert public.may_subscribe(None, "news.sports")
    assert public.may_subscribe(None, "status")
    assert public.may_subscribe(None, "news.*")
    assert not public.may_subscribe(None, "orders.1")
    assert not public.may_subscribe(None, "*")
    assert not public.may_subscribe(None, "n*")
    assert not Permissions(public_topics=()).may_subscribe(None, "news.sports")


def test_permissions_for_authenticated_connections():
    closed = Permissions(public_topics=())
    anyone = Identity("alice", NOW + 60, None)
    assert closed.may_subscribe(anyone, "orders.1")
    assert closed.may_subscribe(anyone, "*")
    alice = Identity("alice", NOW + 60, ("user.alice.*", "news"))
    assert closed.may_subscribe(alice, "user.alice.inbox")
    assert closed.may_subscribe(alice, "user.alice.*")
    assert closed.may_subscribe(alice, "news")
    assert not closed.may_subscribe(alice, "user.bob.inbox")
    assert not closed.may_subscribe(alice, "user.*")
    assert not Permissions().may_subscribe(alice, "public.feed"), "a topics claim replaces public-topics"
    assert not closed.may_subscribe(Identity("alice", NOW + 60, ()), "news")
