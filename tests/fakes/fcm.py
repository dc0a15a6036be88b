"""A local FCM: Google's OAuth2 token endpoint for a service account it creates, and the HTTP v1 `messages:send`
API with its documented error shapes, counting every accepted message by `pushd_key` so duplicates show.

/token verifies the jwt-bearer assertion (RS256 signature with the account's public key, iss, scope, aud, a
lifetime of at most an hour) and issues random access tokens; `messages:send` checks the Bearer token (401
UNAUTHENTICATED), the project (403 PERMISSION_DENIED), the message (400 INVALID_ARGUMENT: no token, a data value
that is not a string, over 4096 bytes), and answers 404 UNREGISTERED for tokens starting with "dead", 400 "not a
valid FCM registration token" for tokens starting with "bad". Knobs: the first N sends 429 QUOTA_EXCEEDED
(Retry-After: 1) or 503 UNAVAILABLE, the token endpoint refusing the account (invalid_grant), a reply latency.

    python -m tests.fakes.fcm --port 0 --dir DIR [--latency MS] [--token-ttl S] [--quota-first N]
        [--fail-first N] [--refuse-credentials]

writes DIR/fcm-service-account.json, prints `{"url", "credentials", "port"}` once listening and serves until
SIGTERM; `GET /stats` answers the counters as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.web import server

from tests.fakes.process import FakeProcess
from tests.fakes.replies import DelayedReplies

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
MAX_PAYLOAD = 4096
CREDENTIALS_FILE = "fcm-service-account.json"

Reply = tuple[int, dict[bytes, bytes], dict[str, Any]]


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def google_error(code: int, status: str, message: str, error_code: str | None = None) -> dict[str, Any]:
    """Google's error body; with `error_code`, the FcmError detail FCM adds."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if error_code:
        error["details"] = [{"@type": FCM_ERROR, "errorCode": error_code}]
    return {"error": error}


def payload_size(message: dict[str, Any]) -> int:
    """What FCM counts against its 4096 bytes: data keys and values, notification title and body."""
    data = message.get("data") or {}
    notification = message.get("notification") or {}
    return sum(len(str(k).encode()) + len(str(v).encode()) for k, v in data.items()) + \
        sum(len(str(notification.get(k, "")).encode()) for k in ("title", "body"))


class FakeFcm(DelayedReplies):
    """The whole service as one Resource: POST /token, POST /v1/projects/<id>/messages:send, GET /stats."""

    isLeaf = True

    def __init__(self, base_url: str, *, key: rsa.RSAPrivateKey | None = None, project_id: str = "pushd-test",
                 clock: Any = None, token_ttl: int = 3600, quota_first: int = 0, fail_first: int = 0,
                 refuse_credentials: bool = False, latency_ms: int = 0) -> None:
        super().__init__(clock, latency_ms / 1000)
        self.base_url = base_url
        self.key = key or new_key()
        self.public_key = self.key.public_key()
        self.project_id = project_id
        self.client_email = f"pushd@{project_id}.iam.gserviceaccount.com"
        self.token_ttl = token_ttl
        self.quota_first = quota_first
        self.fail_first = fail_first
        self.refuse_credentials = refuse_credentials
        #: Access token -> when it expires: a send's check is a dict lookup, no crypto.
        self.tokens: dict[str, float] = {}
        #: Replies to give the next sends, before any check but the token's: (status, body, headers).
        self.fail_next: list[Reply] = []
        #: Every accepted message, when `keep_messages` (tests); the bench keeps only counts.
        self.messages: list[dict[str, Any]] = []
        self.keep_messages = False
        self.keys: set[str] = set()
        self.requests = 0
        self.refused = 0
        self.recipients = 0
        self.duplicates = 0
        self.token_requests = 0
        self.tokens_issued = 0
        self.errors: Counter[str] = Counter()

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    def now(self) -> float:
        return float(self.clock.seconds()) if self.clock is not None else time.time()

    def service_account(self) -> dict[str, str]:
        """The key file a Firebase console gives, for this service's account."""
        pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode("ascii")
        return {"type": "service_account", "project_id": self.project_id, "private_key_id": secrets.token_hex(20),
                "private_key": pem, "client_email": self.client_email, "client_id": "1" * 21,
                "auth_uri": f"{self.base_url}/auth", "token_uri": self.token_uri}

    def write_credentials(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CREDENTIALS_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.service_account(), f, indent=2)
        return os.path.abspath(path)

    def fail(self, count: int, status: int, error_status: str, error_code: str | None = None, message: str = "",
             retry_after: str | None = None) -> None:
        """Answer the next `count` sends with this Google error (and Retry-After when given)."""
        headers = {b"retry-after": retry_after.encode()} if retry_after else {}
        self.fail_next.extend([(status, headers, google_error(status, error_status, message or error_status,
                                                              error_code))] * count)

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "refused": self.refused, "recipients": self.recipients,
                "unique": len(self.keys), "duplicates": self.duplicates, "token_requests": self.token_requests,
                "tokens_issued": self.tokens_issued, "errors": dict(self.errors)}

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/stats":
            return json.dumps(self.stats()).encode()
        request.setResponseCode(404)
        return b"{}"

    def render_POST(self, request: server.Request) -> bytes | int:
        if request.path == b"/token":
            status, headers, body = self._token(request)
        else:
            status, headers, body = self._send(request)
            if status != 200:
                self.errors[self._error_name(status, body)] += 1
        return self.reply(request, status, {b"content-type": b"application/json; charset=UTF-8", **headers},
                          json.dumps(body).encode())

    @staticmethod
    def _error_name(status: int, body: dict[str, Any]) -> str:
        """The FcmError errorCode, else Google's status, else the HTTP status."""
        error = body.get("error")
        if not isinstance(error, dict):
            return str(status)
        details = error.get("details") or [{}]
        return str(details[0].get("errorCode") or error.get("status") or status)

    def _token(self, request: server.Request) -> Reply:
        """Google's OAuth2 token endpoint for a jwt-bearer grant (RFC 7523)."""
        self.token_requests += 1
        if self.refuse_credentials:
            return 400, {}, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        args = request.args or {}
        if args.get(b"grant_type") != [GRANT_TYPE.encode()]:
            return 400, {}, {"error": "unsupported_grant_type", "error_description": "Invalid grant_type."}
        assertion = (args.get(b"assertion") or [b""])[0].decode("ascii", "replace")
        try:
            claims = jwt.decode(assertion, self.public_key, algorithms=["RS256"], audience=self.token_uri,
                                options={"verify_exp": False, "verify_iat": False,
                                         "require": ["iss", "scope", "aud", "iat", "exp"]})
        except jwt.InvalidTokenError as exc:
            return 400, {}, {"error": "invalid_grant", "error_description": f"Invalid JWT: {exc}"}
        now = self.now()
        iat, exp = claims["iat"], claims["exp"]
        if not (isinstance(iat, int) and isinstance(exp, int) and iat <= now + 60 and now < exp <= iat + 3600):
            return 400, {}, {"error": "invalid_grant", "error_description": "Invalid JWT: Token must be a "
                             "short-lived token (60 minutes) and in a reasonable timeframe."}
        if claims["iss"] != self.client_email:
            return 401, {}, {"error": "invalid_client", "error_description": "The OAuth client was not found."}
        if SCOPE not in str(claims["scope"]).split():
            return 400, {}, {"error": "invalid_scope", "error_description": "Invalid OAuth scope."}
        token = "ya29." + secrets.token_urlsafe(48)
        self.tokens[token] = now + self.token_ttl
        self.tokens_issued += 1
        return 200, {}, {"access_token": token, "expires_in": self.token_ttl, "token_type": "Bearer"}

    def _send(self, request: server.Request) -> Reply:
        """One `messages:send`, checked as FCM documents it."""
        self.requests += 1
        authorization = request.getHeader(b"authorization") or b""
        expires = self.tokens.get(authorization[7:].decode("ascii", "replace")) \
            if authorization.startswith(b"Bearer ") else None
        if expires is None or self.now() >= expires:
            self.refused += 1
            return 401, {}, google_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials. "
                                         "Expected OAuth 2 access token, login cookie or other valid authentication "
                                         "credential.")
        parts = request.path.split(b"/")
        if len(parts) != 5 or parts[1:3] != [b"v1", b"projects"] or parts[4] != b"messages:send":
            return 404, {}, google_error(404, "NOT_FOUND", "Requested entity was not found.")
        if parts[3].decode("utf-8", "replace") != self.project_id:
            return 403, {}, google_error(403, "PERMISSION_DENIED", "Permission 'cloudmessaging.messages.create' "
                                         "denied on resource (or it may not exist).")
        if self.fail_next:
            return self.fail_next.pop(0)
        if self.quota_first > 0:
            self.quota_first -= 1
            return 429, {b"retry-after": b"1"}, google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.",
                                                             "QUOTA_EXCEEDED")
        if self.fail_first > 0:
            self.fail_first -= 1
            return 503, {}, google_error(503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE")
        try:
            message = json.loads(request.content.read())["message"]
            token = message["token"]
            data = message.get("data") or {}
            if not isinstance(token, str) or not token or not isinstance(data, dict):
                raise TypeError("message.token")
        except (ValueError, KeyError, TypeError):
            return 400, {}, google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received: a message with "
                                         "a token is required.")
        if not all(isinstance(v, str) for v in data.values()):
            return 400, {}, google_error(400, "INVALID_ARGUMENT", "Invalid value at 'message.data[0].value' "
                                         "(TYPE_STRING)")
        if payload_size(message) > MAX_PAYLOAD:
            return 400, {}, google_error(400, "INVALID_ARGUMENT", "Message is too big", "INVALID_ARGUMENT")
        if token.startswith("dead"):
            return 404, {}, google_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")
        if token.startswith("bad"):
            return 400, {}, google_error(400, "INVALID_ARGUMENT", "The registration token is not a valid FCM "
                                         "registration token", "INVALID_ARGUMENT")
        self.recipients += 1
        key = data.get("pushd_key") or token
        if key in self.keys:
            self.duplicates += 1
        self.keys.add(key)
        if self.keep_messages:
            self.messages.append(message)
        return 200, {}, {"name": f"projects/{self.project_id}/messages/{self.recipients}"}


class FakeFcmProcess(FakeProcess):
    """`python -m tests.fakes.fcm` as a child process (integration tests), stopped by its PID."""

    module = "tests.fakes.fcm"
    name = "FCM"

    def __init__(self, directory: str | Path, *args: str) -> None:
        super().__init__("--dir", str(directory), *args)
        self.url = ""
        self.credentials = ""

    def read_info(self, info: dict[str, Any]) -> None:
        self.url, self.credentials = info["url"], info["credentials"]

    def settings(self) -> list[str]:
        """The worker options that send through this fake."""
        return ["--fcm-url", self.url, "--fcm-credentials", self.credentials]

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/stats", timeout=10) as reply:
            return dict(json.load(reply))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", default=".", help="where to write the service-account JSON")
    parser.add_argument("--project", default="pushd-test", help="the project id")
    parser.add_argument("--latency", type=int, default=0, help="milliseconds before each reply")
    parser.add_argument("--token-ttl", type=int, default=3600, help="expires_in of the access tokens issued")
    parser.add_argument("--quota-first", type=int, default=0, help="answer the first N sends 429 QUOTA_EXCEEDED")
    parser.add_argument("--fail-first", type=int, default=0, help="answer the first N sends 503 UNAVAILABLE")
    parser.add_argument("--refuse-credentials", action="store_true", help="the token endpoint says invalid_grant")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    fake = FakeFcm("", project_id=args.project, clock=reactor, token_ttl=args.token_ttl,
                   quota_first=args.quota_first, fail_first=args.fail_first,
                   refuse_credentials=args.refuse_credentials, latency_ms=args.latency)
    site = server.Site(fake)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    port = reactor.listenTCP(args.port, site, interface="127.0.0.1", backlog=1024)  # type: ignore[attr-defined]
    number = port.getHost().port
    fake.base_url = f"http://127.0.0.1:{number}"
    credentials = fake.write_credentials(args.dir)
    print(json.dumps({"url": fake.base_url, "credentials": credentials, "port": number}), flush=True)
    reactor.run()  # type: ignore[attr-defined]  # Twisted's own SIGTERM handler stops it


if __name__ == "__main__":
    main()
