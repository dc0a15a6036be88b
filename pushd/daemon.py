"""How a node's start-up ended, told the way twistd expects: its exit status, and in daemon mode the status pipe.

In daemon mode (no `-n`) twistd forks, and the process you ran waits on a status pipe (`statusPipe` in twistd's
options, twisted/scripts/_twistd_unix.py) for b"0" or b"1 <message>", then exits 0 or 1. twistd writes b"0"
itself as soon as startService returns, but a node starts asynchronously (Redis, then listening), so a port in
use or an unreachable Redis used to reach only the log file while twistd exited 0. The node takes the pipe over
in privilegedStartService, which twistd calls after forking and before it writes, and writes the real result:
b"0" once the node is ready, or the failure once the node has shut down and twistd has removed its pidfile.

The waiting twistd shows a failure as a bytes repr of its first 98 bytes ("An error has occurred: b'...'"),
too short for a listen error with its certificate paths, so the node also keeps a duplicate of the terminal's
stderr from before the fork and writes the failure there in full, as the line `pushd: <message>` (the form of
every start-up error), just before the pipe's short message that points at it.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import MutableMapping
from typing import Any

from twisted.python.util import untilConcludes

#: twistd's parent reads at most this many bytes from the status pipe.
STATUS_SIZE = 100
#: What the pipe says when the full message went to stderr just before.
SEE_ABOVE = "pushd did not start: the line above says why"


def status_message(message: str) -> bytes:
    """The status pipe's b"1 <message>": ASCII, cut in the middle to fit twistd's read (setting and reason stay)."""
    text = message.encode("ascii", "backslashreplace")
    room = STATUS_SIZE - 2
    if len(text) > room:
        head = (room - 3) // 2
        text = text[:head] + b"..." + text[len(text) - (room - 3 - head):]
    return b"1 " + text


class StartupReport:
    """Where the outcome of start-up goes: the exit status, and twistd's status pipe when daemonized."""

    def __init__(self, server_options: MutableMapping[str, Any] | None, stderr: int = 2) -> None:
        """Make it before twistd daemonizes (in makeService): `server_options` are twistd's own options.

        Daemonizing points the process's stderr at /dev/null, so a duplicate of `stderr` is kept for the failure.
        """
        self._options = server_options
        self._pipe: int | None = None
        self._stderr: int | None = None
        self._failure: str | None = None
        if server_options is not None and not server_options.get("nodaemon", True):
            try:
                self._stderr = os.dup(stderr)
            except OSError:  # started with stderr closed: the status pipe alone will carry the message
                self._stderr = None

    def take_over(self) -> None:
        """Take twistd's status pipe (call from privilegedStartService) so that twistd does not write b"0"."""
        if self._options is None:
            return
        self._pipe = self._options.get("statusPipe")
        if self._pipe is None:
            self._close_stderr()
            return
        self._options["statusPipe"] = None
        # Should the process end without a result (a signal during start-up, an exception in twistd after this
        # point), the waiting twistd still hears that the node did not start.
        atexit.register(self._send_failure, "stopped before start-up finished; see the log file")

    def succeeded(self) -> None:
        """The node is ready: twistd's parent exits 0."""
        self._close_stderr()
        if self._pipe is not None:
            untilConcludes(os.write, self._pipe, b"0")
            self._close_pipe()

    def failed(self, message: str) -> None:
        """Start-up failed with the one-line `message`: the process exits 1 after twistd has shut down.

        twistd has no exit status of its own, and it removes its pidfile only after the reactor has stopped, so
        the report waits for the very end of the process: the command returns once the failed node is gone.
        """
        self._failure = message
        atexit.register(self._exit_failed)

    def _exit_failed(self) -> None:
        assert self._failure is not None
        self._send_failure(self._failure)
        os._exit(1)

    def _send_failure(self, message: str) -> None:
        shown = False
        if self._stderr is not None:
            try:
                untilConcludes(os.write, self._stderr, f"pushd: {message}\n".encode(errors="backslashreplace"))
                shown = True
            except OSError:
                pass
            self._close_stderr()
        if self._pipe is not None:
            try:
                untilConcludes(os.write, self._pipe, status_message(SEE_ABOVE if shown else message))
            except OSError:  # the waiting twistd is gone
                pass
            self._close_pipe()

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            os.close(self._stderr)
            self._stderr = None

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
