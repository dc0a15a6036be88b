"""pushd.daemon: the status pipe twistd's waiting parent reads, and the exit status of a failed start-up."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pushd import daemon
from pushd.daemon import StartupReport, status_message


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


class Daemonized:
    """twistd's options after it forked (statusPipe set) and the two ends the test reads: pipe and stderr."""

    def __init__(self) -> None:
        self.status_r, status_w = os.pipe()
        self.stderr_r, self.stderr_w = os.pipe()
        self.options: dict[str, Any] = {"nodaemon": False}
        self.report = StartupReport(self.options, stderr=self.stderr_w)
        os.close(self.stderr_w)  # the report keeps its own duplicate, as of the terminal's stderr before the fork
        self.options["statusPipe"] = status_w

    def results(self) -> tuple[bytes, bytes]:
        return read_all(self.status_r), read_all(self.stderr_r)


@pytest.fixture
def exit_handlers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Callable[..., Any]]]:
    """atexit handlers the report registers, kept for the test to run; os._exit raises SystemExit instead."""
    handlers: list[Callable[..., Any]] = []
    monkeypatch.setattr(daemon.atexit, "register", lambda f, *a: handlers.append(lambda: f(*a)))

    def fake_exit(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(daemon.os, "_exit", fake_exit)
    yield handlers


def run_at_exit(handlers: list[Callable[..., Any]]) -> int | None:
    """Run the handlers as the interpreter does (last registered first); the exit code, if one ends the process."""
    for handler in reversed(handlers):
        try:
            handler()
        except SystemExit as e:
            return int(e.code or 0)
    return None


def test_short_message_goes_as_it_is() -> None:
    assert status_message("redis: cannot reach redis://127.0.0.1:1: refused") == \
        b"1 redis: cannot reach redis://127.0.0.1:1: refused"


def test_long_message_keeps_its_setting_and_its_reason_within_twistd_s_read() -> None:
    message = ("listen: cannot listen on 'ssl:8443:privateKey=" + "/very/long/path" * 10 + "/localhost.key': "
               "Couldn't listen on any:8443: [Errno 98] Address already in use.")
    sent = status_message(message)
    assert len(sent) == daemon.STATUS_SIZE
    assert sent.startswith(b"1 listen: cannot listen on 'ssl:8443:")
    assert sent.endswith(b"[Errno 98] Address already in use.")
    assert b"..." in sent


def test_non_ascii_is_escaped() -> None:
    assert status_message("hooks: cannot import 'caf\u00e9'") == b"1 hooks: cannot import 'caf\\xe9'"


def test_ready_node_writes_0_and_keeps_no_terminal(exit_handlers: list[Callable[..., Any]]) -> None:
    node = Daemonized()
    node.report.take_over()
    assert node.options["statusPipe"] is None, "twistd must not write its own b'0'"
    node.report.succeeded()
    assert node.results() == (b"0", b"")
    assert run_at_exit(exit_handlers) is None


def test_failed_start_up_reports_after_shutdown_and_exits_1(exit_handlers: list[Callable[..., Any]]) -> None:
    node = Daemonized()
    node.report.take_over()
    message = "listen: cannot listen on 'tcp:8443': Couldn't listen on any:8443: [Errno 98] Address already in use."
    node.report.failed(message)
    assert run_at_exit(exit_handlers) == 1
    status, stderr = node.results()
    assert stderr == f"pushd: {message}\n".encode()
    assert status == b"1 " + daemon.SEE_ABOVE.encode()


def test_without_the_terminal_the_pipe_carries_the_message(exit_handlers: list[Callable[..., Any]]) -> None:
    status_r, status_w = os.pipe()
    options: dict[str, Any] = {"nodaemon": False}
    closed = os.open(os.devnull, os.O_WRONLY)
    os.close(closed)  # a descriptor number that is not open: twistd was started with stderr closed
    report = StartupReport(options, stderr=closed)
    options["statusPipe"] = status_w
    report.take_over()
    report.failed("redis: cannot reach redis://127.0.0.1:1: refused")
    assert run_at_exit(exit_handlers) == 1
    assert read_all(status_r) == b"1 redis: cannot reach redis://127.0.0.1:1: refused"


def test_ending_without_a_result_still_says_the_node_did_not_start(exit_handlers: list[Callable[..., Any]]) -> None:
    node = Daemonized()
    node.report.take_over()
    assert run_at_exit(exit_handlers) is None  # the process ends as it would (a signal during start-up)
    status, stderr = node.results()
    assert status == b"1 " + daemon.SEE_ABOVE.encode()
    assert stderr == b"pushd: stopped before start-up finished; see the log file\n"


def test_twistd_n_only_gets_the_exit_status(exit_handlers: list[Callable[..., Any]]) -> None:
    options: dict[str, Any] = {"nodaemon": True}
    report = StartupReport(options)
    report.take_over()
    report.failed("listen: cannot listen on 'tcp:8443': in use")
    assert options == {"nodaemon": True}
    assert run_at_exit(exit_handlers) == 1


def test_outside_twistd_nothing_is_reported(exit_handlers: list[Callable[..., Any]]) -> None:
    report = StartupReport(None)
    report.take_over()
    report.succeeded()
    assert run_at_exit(exit_handlers) is None
