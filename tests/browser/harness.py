"""What the browser tests need besides Chromium: the pin that makes it trust pushd's certificate, the HTTP server
its pages come from, and a way to wait for what a page saw.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.sync_api import Page, WebSocket
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.integration.pushd_process import PushdProcess
from tests.redis_server import RedisServer

#: The `open_page` fixture: open_page("native.html") -> (page, Seen).
OpenPage = Callable[[str], tuple[Page, "Seen"]]
PAGES = Path(__file__).resolve().parent / "pages"
#: The HS256 secret of the connection tokens the page server hands out (`/token`) and the nodes check.
JWT_SECRET = "browser-tests-secret-not-for-production"


def spki_pin(cert_path: str) -> str:
    """The base64 SHA-256 of a certificate's SubjectPublicKeyInfo: what `--ignore-certificate-errors-spki-list` takes.

    Chromium then accepts that one key's self-signed certificate and still refuses every other bad certificate,
    so the tests trust pushd's generated certificate without turning certificate checks off.
    """
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def token(user: str, ttl: float) -> str:
    """A connection JWT for `user` that expires in `ttl` seconds (docs/protocol.md, "Client tokens")."""
    return jwt.encode({"sub": user, "exp": int(time.time() + ttl)}, JWT_SECRET, algorithm="HS256")


class PageServer:
    """Plain HTTP on 127.0.0.1 (port 0) in a thread: the test pages, files added with `add`, and `/token`.

    `/token?sub=alice&ttl=3` plays the application backend that signs a page's connection tokens.
    """

    def __init__(self) -> None:
        self.files = files = {f"/{path.name}": path for path in PAGES.iterdir() if path.suffix in (".html", ".js")}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/token":
                    query = urllib.parse.parse_qs(url.query)
                    self._send(200, "text/plain", token(query["sub"][0], float(query["ttl"][0])).encode())
                elif url.path in files:
                    kind = "text/html" if url.path.endswith(".html") else "text/javascript"
                    self._send(200, f"{kind}; charset=utf-8", files[url.path].read_bytes())
                else:
                    self._send(404, "text/plain", b"not found")

            def _send(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="page-server", daemon=True)

    def add(self, url_path: str, path: Path) -> None:
        """Serve `path` at `url_path` too (the centrifuge bundle, which only the SDK's tests need)."""
        self.files[url_path] = path

    def start(self) -> PageServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


class Seen:
    """The events a page recorded (`record()` in pages/harness.js), read in order as they come.

    Each wait is bounded; a wait that runs out fails with everything the page saw, the WebSocket frames on the wire
    (`frames`, from Playwright's frame events: what the server really sent) and the page's uncaught exceptions,
    which is what explains it.
    """

    def __init__(self, page: Page) -> None:
        self.page = page
        self.cursor = 0
        #: ("<" received or ">" sent, payload) of every WebSocket frame of the page, in order.
        self.frames: list[tuple[str, str]] = []
        #: Uncaught exceptions of the page's scripts.
        self.errors: list[str] = []
        page.on("websocket", self._watch)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _watch(self, ws: WebSocket) -> None:
        ws.on("framereceived", lambda payload: self.frames.append(("<", str(payload))))
        ws.on("framesent", lambda payload: self.frames.append((">", str(payload))))

    def received(self) -> list[dict[str, Any]]:
        """The JSON commands and replies the page received, one per line of each frame (Centrifugo batches them)."""
        return [json.loads(line) for way, payload in self.frames if way == "<"
                for line in payload.splitlines() if line.strip()]

    def until(self, pattern: dict[str, Any], timeout: float = 10) -> list[dict[str, Any]]:
        """Every event from the last one read up to the first that matches `pattern` (a partial match), inclusive."""
        try:
            found = self.page.wait_for_function("([from, pattern]) => findEvent(from, pattern)",
                                                arg=[self.cursor, pattern], timeout=timeout * 1000).json_value()
        except PlaywrightTimeout:
            raise AssertionError(f"the page saw nothing matching {pattern} within {timeout}s; it saw:\n"
                                 + self.dump()) from None
        events: list[dict[str, Any]] = self.page.evaluate("([a, b]) => seen.slice(a, b)", [self.cursor, found])
        self.cursor = found
        return events

    def expect(self, pattern: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        """The first event from the last one read that matches `pattern`."""
        return self.until(pattern, timeout)[-1]

    def dump(self) -> str:
        events = self.page.evaluate("seen")
        return "\n".join([*(f"{'  ' if index < self.cursor else '> '}{json.dumps(event)}"
                            for index, event in enumerate(events)),
                          "the last WebSocket frames:", *(f"  {way} {payload}" for way, payload in self.frames[-40:]),
                          *(f"uncaught in the page: {error}" for error in self.errors)])


@dataclass
class SharedNode:
    """The node most tests share (each on topics of its own), and its Redis."""

    node: PushdProcess
    redis: RedisServer


def publish(node: PushdProcess, topic: str, data: object) -> dict[str, Any]:
    """Publish with history through the HTTP API; the frame a subscriber of pushd's own protocol gets for it."""
    status, body = node.api("POST", "/api/publish", {"topic": topic, "data": data})
    assert status == 200, body
    return {"topic": topic, "data": data, "offset": body["offset"], "epoch": body["epoch"]}


def disconnect(node: PushdProcess, conn_id: str, code: int, reason: str) -> None:
    """Close one connection from the server's side: `DELETE /api/connections/<id>` (docs/api.md)."""
    query = urllib.parse.urlencode({"code": code, "reason": reason})
    status, body = node.api("DELETE", f"/api/connections/{urllib.parse.quote(conn_id, safe='')}?{query}")
    assert status == 200, body
