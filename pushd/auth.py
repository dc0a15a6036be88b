"""Client tokens and topic permissions: verify a JWT into an Identity, and decide which topics it may subscribe to.

Pure logic with no reactor and no sockets, so every refusal (expired, forged, wrong algorithm, bad claims) is
tested directly with real keys. Time is a parameter (`now`), never read from a clock here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import HMACAlgorithm
from jwt.types import Options

#: Tokens longer than this are refused before any parsing: a real token is well under 2 KiB, and the limit
#: bounds the work an unauthenticated client can ask for.
MAX_TOKEN_LENGTH = 8 * 1024
#: A WebSocket close frame has room for 123 bytes of reason; an AuthError's text is sent as that reason.
MAX_REASON_BYTES = 120
MAX_USER_LENGTH = 128
#: RFC 7518 section 3.3: RS256 keys must be 2048 bits or larger.
MIN_RSA_BITS = 2048

_WILDCARDS = frozenset("*?[")
_PLAIN_ALGORITHM_RE = re.compile(r"[A-Za-z0-9_.+-]{1,16}")
# Claims pushd checks itself (against the caller's `now`, with its own messages); PyJWT checks the signature,
# and aud / iss when they are configured.
_DECODE_OPTIONS: Options = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_sub": False,
    "verify_jti": False,
}


class AuthError(Exception):
    """A token that is refused; str(error) is the close reason sent to the client.

    The text says what is wrong ('token expired', 'token signature is invalid', ...), and is always plain ASCII
    of at most MAX_REASON_BYTES bytes, whatever the token held, so it fits a close frame as it is.
    """

    def __init__(self, reason: str) -> None:
        ascii_reason = reason.encode("ascii", "backslashreplace").decode("ascii")
        super().__init__(ascii_reason[:MAX_REASON_BYTES])


class TokenExpired(AuthError):
    """A token that was good but has expired: the client should fetch a fresh one."""

    def __init__(self) -> None:
        super().__init__("token expired")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token speaks for, until when, and which topic patterns it allows (None: any)."""

    user: str
    expires: float
    topics: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class _Key:
    """One verification key and the single algorithm it accepts."""

    key: Any  # the HS256 secret, an RSA / EC public key object, or a jwt.PyJWK
    algorithm: str


class _UnusableKey(ValueError):
    """A configured key or key file that cannot verify tokens; `predicate` ends a sentence about its source."""

    def __init__(self, subject: str, predicate: str) -> None:
        super().__init__(f"{subject} {predicate}")
        self.predicate = predicate


class TokenVerifier:
    """Verifies client JWTs against one configured key source: an HS256 secret, a public key, or a JWKS.

    Each key accepts exactly one algorithm, fixed by configuration and never by the token: 'none' is never
    accepted, and HS* never with a public key, so a token HMAC-signed with the public key PEM is refused.
    """

    def __init__(self, *, secret: str = "", public_key_pem: bytes = b"", jwks: dict[str, Any] | None = None,
                 audience: str = "", issuer: str = "", leeway: int = 0) -> None:
        sources = [bool(secret), bool(public_key_pem), jwks is not None]
        if sources.count(True) != 1:
            raise ValueError("give exactly one of secret, public_key_pem, jwks")
        if leeway < 0:
            raise ValueError(f"leeway must not be negative, not {leeway}")
        self._audience = audience or None
        self._issuer = issuer or None
        self._leeway = leeway
        self._key: _Key | None = None
        self._keys_by_kid: dict[str, _Key] = {}
        if secret:
            self._key = _secret_key(secret)
        elif public_key_pem:
            self._key = _public_key(public_key_pem)
        elif jwks is not None:
            self._keys_by_kid = _jwks_keys(jwks)

    @classmethod
    def from_settings(cls, *, secret: str, public_key_file: str, jwks_file: str, audience: str,
                      issuer: str) -> TokenVerifier | None:
        """The verifier the jwt-* settings describe, or None when none of them is set.

        Errors are one-line ValueErrors that start with the setting's name, ready to be a ConfigError.
        """
        given = [value for value in (secret, public_key_file, jwks_file) if value]
        if len(given) > 1:
            raise ValueError("jwt-secret: set only one of jwt-secret, jwt-public-key, jwt-jwks")
        if not given:
            return None
        if secret:
            try:
                return cls(secret=secret, audience=audience, issuer=issuer)
            except _UnusableKey as error:
                raise ValueError(f"jwt-secret: {error.predicate}") from None
        if public_key_file:
            pem = _read_file("jwt-public-key", public_key_file)
            if not pem:
                raise ValueError(f"jwt-public-key: {public_key_file!r} is empty")
            try:
                return cls(public_key_pem=pem, audience=audience, issuer=issuer)
            except _UnusableKey as error:
                raise ValueError(f"jwt-public-key: {public_key_file!r} {error.predicate}") from None
        document = _json_document("jwt-jwks", jwks_file, _read_file("jwt-jwks", jwks_file))
        try:
            return cls(jwks=document, audience=audience, issuer=issuer)
        except _UnusableKey as error:
            raise ValueError(f"jwt-jwks: {jwks_file!r} {error.predicate}") from None

    def verify(self, token: str, now: float) -> Identity:
        """The Identity `token` proves at time `now` (epoch seconds); AuthError says why it is refused."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("token is malformed") from None
        key = self._key_for(header)
        claims = self._decode(token, key)
        return _identity(claims, now, self._leeway)

    def _key_for(self, header: dict[str, Any]) -> _Key:
        """The configured key the token names, refusing any algorithm that key does not take."""
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or not algorithm:
            raise AuthError("token header has no alg")
        if self._key is not None:
            if algorithm != self._key.algorithm:
                raise AuthError(f"token algorithm {_shown_algorithm(algorithm)} is not accepted")
            return self._key
        if algorithm not in ("RS256", "ES256"):
            raise AuthError(f"token algorithm {_shown_algorithm(algorithm)} is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise AuthError("token header has no kid")
        key = self._keys_by_kid.get(kid)
        if key is None:
            raise AuthError(f"token kid {_shown(kid, 48)} is unknown")
        if algorithm != key.algorithm:
            raise AuthError(f"token algorithm {algorithm} is not accepted for kid {_shown(kid, 48)}")
        return key

    def _decode(self, token: str, key: _Key) -> dict[str, Any]:
        options: Options = {
            **_DECODE_OPTIONS,
            "verify_aud": self._audience is not None,
            "verify_iss": self._issuer is not None,
        }
        try:
            return jwt.decode(token, key.key, algorithms=[key.algorithm], options=options,
                              audience=self._audience, issuer=self._issuer)
        except jwt.InvalidSignatureError:
            raise AuthError("token signature is invalid") from None
        except jwt.MissingRequiredClaimError as error:
            raise AuthError(f"token has no {error.claim} claim") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token aud claim is not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token iss claim is not accepted") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(f"token algorithm is not accepted (only {key.algorithm})") from None
        except jwt.DecodeError:
            raise AuthError("token is malformed") from None
        except jwt.PyJWTError:
            raise AuthError("token is invalid") from None


def allowed(topic: str, patterns: tuple[str, ...]) -> bool:
    """True if every topic `topic` names matches one of `patterns` (fnmatch style, case-sensitive).

    A plain topic is checked with fnmatch.fnmatchcase. `topic` may itself be a subscription pattern such as
    'sh600*'; then it is allowed only if one allowed pattern covers all the topics it can match: 'sh600*' is
    allowed by 'sh600*', 'sh*' and '*' (a '*' there covers the literal '*'), but not by 'sh600?', 'sh6001*' or
    'sh600[0-9]*'. fnmatchcase alone would be wrong here, since '?' or '[*]' in an allowed pattern match the
    literal '*' too. The check is safe but not complete: it may refuse a pattern that only a combination of
    patterns, or an unusual equivalent spelling ('*?' for '?*'), covers.
    """
    if _WILDCARDS.isdisjoint(topic):
        return any(fnmatchcase(topic, pattern) for pattern in patterns)
    wanted = _glob_tokens(topic)
    return any(_covers(_glob_tokens(pattern), wanted) for pattern in patterns)


@dataclass(frozen=True, slots=True)
class Permissions:
    """Which topics a connection may subscribe to: public_topics when anonymous, the token's topics claim if not."""

    public_topics: tuple[str, ...] = ("*",)

    def may_subscribe(self, identity: Identity | None, topic: str) -> bool:
        if identity is None:
            return allowed(topic, self.public_topics)
        if identity.topics is None:
            return True
        return allowed(topic, identity.topics)


def _identity(claims: dict[str, Any], now: float, leeway: int) -> Identity:
    """The Identity of verified claims, refusing what pushd needs and cannot use."""
    if "sub" not in claims:
        raise AuthError("token has no sub claim")
    user = claims["sub"]
    if not isinstance(user, str):
        raise AuthError("token sub claim is not a string")
    if not user:
        raise AuthError("token sub claim is empty")
    if len(user) > MAX_USER_LENGTH:
        raise AuthError(f"token sub claim is longer than {MAX_USER_LENGTH} characters")
    expires = _seconds(claims, "exp")
    if expires is None:
        raise AuthError("token has no exp claim")
    if expires <= now - leeway:
        raise TokenExpired()
    not_before = _seconds(claims, "nbf")
    if not_before is not None and not_before > now + leeway:
        raise AuthError("token is not valid yet (nbf)")
    return Identity(user, expires, _topics(claims))


def _seconds(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate claim as epoch seconds, or None when it is absent."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthError(f"token {name} claim is not a number")
    try:
        seconds = float(value)
    except OverflowError:
        raise AuthError(f"token {name} claim is not a number") from None
    if not math.isfinite(seconds):
        raise AuthError(f"token {name} claim is not a number")
    return seconds


def _topics(claims: dict[str, Any]) -> tuple[str, ...] | None:
    """The topic patterns a token allows: its `topics` claim, or `channels` (the name Centrifugo's tokens use)."""
    given = [name for name in ("topics", "channels") if name in claims]
    if not given:
        return None
    if len(given) > 1:
        raise AuthError("token has both topics and channels claims; give one")
    name = given[0]
    topics = claims[name]
    if not isinstance(topics, list) or not all(isinstance(topic, str) and topic for topic in topics):
        raise AuthError(f"token {name} claim is not a list of non-empty strings")
    return tuple(topics)


def _shown(text: str, limit: int) -> str:
    """`text` quoted as ASCII and cut to `limit` characters, to name client input in a close reason."""
    quoted = ascii(text)
    return quoted if len(quoted) <= limit else quoted[:limit - 3] + "..."


def _shown_algorithm(algorithm: str) -> str:
    return algorithm if _PLAIN_ALGORITHM_RE.fullmatch(algorithm) else _shown(algorithm, 24)


def _secret_key(secret: str) -> _Key:
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except jwt.InvalidKeyError:
        raise _UnusableKey("secret", "looks like a PEM or SSH key; an HS256 secret is a shared string") from None
    return _Key(secret, "HS256")


def _public_key(pem: bytes) -> _Key:
    """The RS256 or ES256 key of a PEM public key; the key type decides the algorithm."""
    if b"PRIVATE KEY-----" in pem:
        raise _UnusableKey("public key", "holds a private key; give pushd the public key only")
    if b"-----BEGIN CERTIFICATE-----" in pem:
        raise _UnusableKey("public key", "is a certificate; give its public key (openssl x509 -pubkey -noout)")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise _UnusableKey("public key", "is not a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise _UnusableKey("public key", f"is a {key.key_size}-bit RSA key; RS256 needs {MIN_RSA_BITS} bits")
        return _Key(key, "RS256")
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return _Key(key, "ES256")
        raise _UnusableKey("public key", f"is an EC key on curve {key.curve.name}; only P-256 (ES256) is accepted")
    raise _UnusableKey("public key", "is neither an RSA (RS256) nor an EC P-256 (ES256) public key")


def _jwks_keys(document: dict[str, Any]) -> dict[str, _Key]:
    """kid -> key of the RS256 / ES256 signing keys of a JWKS document.

    Keys of other kinds (symmetric, other curves, encryption keys, or an "alg" other than the one their type
    gives) are skipped, as identity providers publish them side by side; a broken key of an accepted kind is
    an error rather than a key that silently never matches. PyJWKSet is not used for the set because it would
    take an "oct" key as HS256 and drop broken keys without a word; PyJWK builds each key.
    """
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise _UnusableKey("JWKS", 'is not a JWKS document (a JSON object with a "keys" list)')
    keys: dict[str, _Key] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _UnusableKey("JWKS", f"is not a JWKS document (keys[{index}] is not an object)")
        algorithm = _jwk_algorithm(entry)
        kid = entry.get("kid")
        if algorithm is None or not isinstance(kid, str) or not kid:
            continue
        if kid in keys:
            raise _UnusableKey("JWKS", f"has two keys with kid {_shown(kid, 48)}")
        if "d" in entry:
            raise _UnusableKey("JWKS", f"key {_shown(kid, 48)} is a private key; publish public keys only")
        try:
            key = jwt.PyJWK(entry, algorithm)
        except jwt.PyJWTError:
            raise _UnusableKey("JWKS", f"key {_shown(kid, 48)} is not a valid {entry['kty']} public key") from None
        if isinstance(key.key, rsa.RSAPublicKey) and key.key.key_size < MIN_RSA_BITS:
            raise _UnusableKey("JWKS", f"key {_shown(kid, 48)} is a {key.key.key_size}-bit RSA key; RS256 needs "
                                       f"{MIN_RSA_BITS} bits")
        keys[kid] = _Key(key, algorithm)
    if not keys:
        raise _UnusableKey("JWKS", "has no RSA (RS256) or EC P-256 (ES256) signing key with a kid")
    return keys


def _jwk_algorithm(entry: dict[str, Any]) -> str | None:
    """The one algorithm a JWK may verify, or None when pushd does not use such a key."""
    if entry.get("kty") == "RSA":
        algorithm = "RS256"
    elif entry.get("kty") == "EC" and entry.get("crv") == "P-256":
        algorithm = "ES256"
    else:
        return None
    if entry.get("use", "sig") != "sig" or entry.get("alg", algorithm) != algorithm:
        return None
    return algorithm


def _read_file(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ValueError(f"{setting}: cannot read {path!r}: {error.strerror or error}") from None


def _json_document(setting: str, path: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{setting}: {path!r} is not a JWKS document (not JSON: {reason})") from None


# Glob tokens: a literal character, "?" (any one character), "*" (any run), or a "[...]" class (its text).
_ANY_ONE = ("?",)
_ANY_RUN = ("*",)


def _glob_tokens(pattern: str) -> list[tuple[str, ...]]:
    """`pattern` split the way fnmatch reads it: ('c', literal), ('?',), ('*',) or ('[', class text)."""
    tokens: list[tuple[str, ...]] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        i += 1
        if char == "*":
            if not tokens or tokens[-1] != _ANY_RUN:
                tokens.append(_ANY_RUN)
        elif char == "?":
            tokens.append(_ANY_ONE)
        elif char == "[":
            end = i
            if end < n and pattern[end] == "!":
                end += 1
            if end < n and pattern[end] == "]":
                end += 1
            while end < n and pattern[end] != "]":
                end += 1
            if end >= n:
                tokens.append(("c", char))
            else:
                tokens.append(("[", pattern[i - 1:end + 1]))
                i = end + 1
        else:
            tokens.append(("c", char))
    return tokens


def _covers(allowing: list[tuple[str, ...]], wanted: list[tuple[str, ...]]) -> bool:
    """True if every string `wanted` matches is matched by `allowing` (a sufficient, not necessary, test).

    Glob matching over tokens instead of characters: an allowed '*' absorbs any run of wanted tokens, an
    allowed '?' one wanted literal, '?' or class, an allowed class one literal it contains or the same class,
    an allowed literal only the same literal.
    """
    rows, columns = len(allowing), len(wanted)
    # covered[i][j]: allowing[i:] covers wanted[j:]; filled from the end.
    covered = [[False] * (columns + 1) for _ in range(rows + 1)]
    covered[rows][columns] = True
    for i in range(rows - 1, -1, -1):
        token = allowing[i]
        for j in range(columns, -1, -1):
            if token == _ANY_RUN:
                covered[i][j] = covered[i + 1][j] or (j < columns and covered[i][j + 1])
            elif j < columns and _covers_one(token, wanted[j]):
                covered[i][j] = covered[i + 1][j + 1]
    return covered[0][0]


def _covers_one(allowing: tuple[str, ...], wanted: tuple[str, ...]) -> bool:
    if allowing == _ANY_ONE:
        return wanted != _ANY_RUN
    if allowing[0] == "[":
        return wanted == allowing or (wanted[0] == "c" and fnmatchcase(wanted[1], allowing[1]))
    return wanted == allowing
