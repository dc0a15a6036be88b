"""Fixtures of the browser tests: one headless Chromium per run (Debian's, driven by Playwright), a fresh page per
test served over HTTP from 127.0.0.1, and pushd nodes it reaches at wss://localhost on their generated certificate.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pushd.tls import ensure_localhost_certificate
from tests.browser.harness import JWT_SECRET, OpenPage, PageServer, Seen, SharedNode, spki_pin
from tests.integration.pushd_process import RUNNING, PushdProcess
from tests.js import missing, node_modules
from tests.redis_server import RedisServer

INSTALL_CHROMIUM = "apt-get install -y chromium"


def node_args(page_origin: str) -> list[str]:
    """The settings every node of the browser tests gets, beside its listener and Redis.

    The pages come from `page_origin` (http://127.0.0.1:PORT) and connect to wss://localhost:OTHER-PORT: a
    cross-origin WebSocket handshake, which pushd refuses with 403 unless `allowed-origins` names the page's origin
    (docs/security.md). It is allowed here, and only here.
    """
    return ["--allowed-origins", page_origin]


@pytest.fixture(scope="package", autouse=True)
def chromium() -> str:
    """Path of the system Chromium; a missing one skips (fails with CI=true) naming the command that installs it.

    Autouse, so that a missing browser stops each test before anything else (nodes, Redis) is started for it.
    """
    path = shutil.which("chromium")
    if path is None:
        missing("Chromium", INSTALL_CHROMIUM)
    assert path is not None
    return path


@pytest.fixture(scope="package")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(key, cert): the certificate pushd generates for localhost, shared by every node of the run.

    One certificate for the run because Chromium is told its key once, when it starts.
    """
    return ensure_localhost_certificate(str(tmp_path_factory.mktemp("browser-certs")))


@pytest.fixture(scope="package")
def browser(chromium: str, certificate: tuple[str, str]) -> Iterator[Any]:
    """One headless Chromium for the browser tests, trusting pushd's certificate key and nothing else that is bad.

    Package scope, not session: Playwright's sync API keeps an asyncio loop running in this thread until it stops,
    and the tests after these run loops of their own (asyncio.run refuses to start inside a running one).
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright's own browser downloads are never used: executable_path is Debian's Chromium.
        launched = playwright.chromium.launch(executable_path=chromium, headless=True,
                                              args=[f"--ignore-certificate-errors-spki-list={spki_pin(certificate[1])}"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="package")
def page_server() -> Iterator[PageServer]:
    """The HTTP server of the test pages."""
    server = PageServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="package")
def centrifuge_bundle(page_server: PageServer) -> None:
    """The official centrifuge SDK's browser bundle from tests/js (npm ci on first use), at /centrifuge.js."""
    page_server.add("/centrifuge.js", node_modules() / "centrifuge" / "dist" / "centrifuge.js")


@pytest.fixture
def open_page(browser: Any, page_server: PageServer) -> Iterator[OpenPage]:
    """open_page("native.html") -> (page, Seen): a page in a fresh browser context, closed after the test."""
    contexts: list[Any] = []

    def open_page(name: str) -> tuple[Any, Seen]:
        context = browser.new_context()
        contexts.append(context)
        page = context.new_page()
        page.goto(f"{page_server.origin}/{name}")
        return page, Seen(page)

    yield open_page
    for context in contexts:
        context.close()


def node_process(workdir: Path, certificate: tuple[str, str], page_origin: str, redis: RedisServer, *args: str,
                 port: int = 0) -> PushdProcess:
    """A node at wss://localhost:PORT on the run's certificate, with its Redis at `redis`, not started yet."""
    key, cert = certificate
    listen = f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    return PushdProcess(workdir, "--listen", listen, "--jwt-secret", JWT_SECRET, *node_args(page_origin), *args,
                        redis=redis.url, listen=False)


@pytest.fixture(scope="package")
def shared(tmp_path_factory: pytest.TempPathFactory, certificate: tuple[str, str], page_server: PageServer,
           redis_binary: str) -> Iterator[SharedNode]:
    """One node and Redis for the tests that neither stop the node nor need settings of their own.

    A node start is most of a browser test's time; sharing one keeps the run short. The node is kept out of
    `RUNNING`, which the suite empties after every test, and stopped here at the end of the run.
    """
    with RedisServer(redis_binary) as redis:
        node = node_process(tmp_path_factory.mktemp("shared-node"), certificate, page_server.origin, redis)
        RUNNING.remove(node)
        node.start()
        try:
            yield SharedNode(node, redis)
        finally:
            node.stop()


@pytest.fixture
def start_node(tmp_path: Path, certificate: tuple[str, str], page_server: PageServer,
               redis_server: RedisServer) -> Callable[..., PushdProcess]:
    """start_node(*args, port=0) -> a started node of the test's own, on the test's own Redis.

    Every node of a test shares that Redis (history survives a node restart) and its work directory; `port` lets a
    restarted node listen where the pages expect it.
    """

    def start_node(*args: str, port: int = 0) -> PushdProcess:
        return node_process(tmp_path / "node", certificate, page_server.origin, redis_server, *args,
                            port=port).start()

    return start_node
