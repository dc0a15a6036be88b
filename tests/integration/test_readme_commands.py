"""The README's command lines, run as typed through `bash -c` in a fresh directory, and checked against what the
README says they do.

The lines come from README.md itself (its code blocks, as CommonMark reads them), so an edited README is what is
tested. They run through bash, never as an argv list, so a name that the shell takes over (bash and zsh have a
`pushd` builtin) fails here as it would fail a reader. Every line is either run or listed in EXCUSED with the
reason it cannot run here, and then at least its command word must be a program on PATH (`type -t` says
`file`); a line this test does not recognise fails it.

The node runs on its defaults (wss on 8443, the HTTP API on 127.0.0.1:8081), so this test can collide with
another run that uses those ports: re-run it if the node reports "Address already in use".
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from tests.integration.pushd_process import alive, eventually, stop_pid

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

#: Seconds any one wait may take: a node's start, a command, a client's next line.
TIMEOUT = 60
BASH = shutil.which("bash") or "/bin/bash"

#: Lines, or the part of a line before ` && `, that cannot run here as typed: pattern -> why.
EXCUSED = {
    r"pip install (\.|-e '\.\[test\]'|websockets)":
        "an install step: the environment running this test has installed pushd with its test extras "
        "(websockets among them) already",
    r"python -m pytest":
        "the whole test suite, which this test is a part of",
    r"twistd pushd --redis redis://10\.0\.0\.5:6379/0 .*":
        "production settings: a remote Redis (10.0.0.5), a certificate, key and JWT key under /etc/pushd, port "
        "443, an interface address of another machine and a hooks module of the reader's own",
}

#: Command words that are meant to be the shell's own, not a program.
SHELL_BUILTINS = {"kill"}

ANSI = re.compile(r"\x1b(?:[78]|\[[0-9;]*[A-Za-z])")


@dataclass
class Step:
    """One command line of the README (continuation lines included), with what the README shows around it."""

    line: int
    command: str
    shown: list[str] = field(default_factory=list)  # output lines the README shows under the command
    typed: list[str] = field(default_factory=list)  # lines the README types into it (`> ...`)


def readme_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every code block, indented or fenced."""
    blocks = []
    for token in MarkdownIt("commonmark").parse(text):
        if token.type in ("code_block", "fence") and token.map is not None:
            blocks.append((token.map[0] + 1, token.content.rstrip("\n").split("\n")))
    return blocks


def command_word(command: str) -> str:
    """The word bash looks up to run `command` (leading VAR=value assignments skipped)."""
    words = shlex.split(command.replace("\\\n", " "))
    return next(word for word in words if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", word))


def shell_type(word: str, env: dict[str, str]) -> str:
    result = subprocess.run([BASH, "-c", f"type -t {shlex.quote(word)}"], env=env, capture_output=True,
                            text=True, timeout=TIMEOUT, check=False)
    return result.stdout.strip() or "not found"


def example_pattern(shown: str) -> re.Pattern[str]:
    """A README output line as a pattern: its figures (offsets, epochs) stand for any figures."""
    return re.compile(re.sub(r"\d+", lambda _: r"\d+", re.escape(shown)))


class Output:
    """The lines a process prints, read in a thread; terminal escapes and prompts taken out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._queue.put(ANSI.sub("", raw).replace("\r", "").rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str], what: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"{what}: the process ended first; it printed:\n" + "\n".join(self.lines))
            self.lines.append(line)
            if pattern.search(line):
                return line
        raise AssertionError(f"{what}: nothing within {TIMEOUT}s; printed so far:\n" + "\n".join(self.lines))


class Reader:
    """Runs the README's steps in order, as a reader in one directory and three terminals would."""

    def __init__(self, workdir: Path, env: dict[str, str], readme: str) -> None:
        self.workdir = workdir
        self.env = env
        self.readme = readme
        self.node: subprocess.Popen[str] | None = None
        self.node_command = ""
        self.node_pid = 0
        self.client: subprocess.Popen[str] | None = None
        self.client_output: Output | None = None
        self.topics: list[str] = []  # what the client subscribed to
        self.positions: dict[str, str] = {}  # README example figure -> the one this run printed
        self.pids: list[int] = []  # every node started, for the cleanup
        self.ran: list[str] = []  # the commands run, in order
        self.handled: set[str] = set()  # the handlers and excuses used
        self.handlers: list[tuple[str, Callable[[Step, re.Match[str]], None]]] = [
            (r"twistd -n pushd", self.start_node),
            (r"SSL_CERT_FILE=\S+ python -m websockets (wss://\S+)", self.start_client),
            (r"pushctl publish (?:--pidfile \S+ )?(\S+) ('[^']*')", self.publish),
            (r"curl -s -H 'Content-Type: application/json' -d ('[^']*') \\\n\s*(http://\S+/api/(publish|broadcast))",
             self.curl),
            (r"pushctl stats(?: --pidfile \S+)?", self.stats),
            (r"twistd --pidfile (\S+) --logfile (\S+) pushd --config (\S+)", self.start_daemon),
            (r'kill "\$\(cat (\S+)\)"', self.stop_daemon),
        ]

    # -- reading the README -------------------------------------------------------------------------------

    def steps(self) -> list[Step | str]:
        """The README's code as steps; `< ...` lines (what the client shows next) stay lines of their own."""
        steps: list[Step | str] = []
        for first, lines in readme_blocks(self.readme):
            current: Step | None = None
            index = 0
            while index < len(lines):
                number, text = first + index, lines[index]
                while text.endswith("\\") and index + 1 < len(lines):
                    index += 1
                    text += "\n" + lines[index]
                index += 1
                if text.startswith("< "):
                    steps.append(text)
                elif text.startswith("> "):
                    assert current is not None, f"README.md:{number}: typed input {text!r} follows no command"
                    current.typed.append(text[2:])
                elif current is not None and current.command.startswith("pushctl publish") \
                        and text.startswith("published to "):
                    current.shown.append(text)
                else:
                    current = Step(number, text)
                    steps.append(current)
        return steps

    def run(self) -> None:
        for step in self.steps():
            if isinstance(step, str):
                self.client_shows(step)
                continue
            # `pip install . && twistd -n pushd`: the install is a step of its own (the environment running
            # this test did it); what follows the && runs on its own.
            for command in step.command.split(" && "):
                part = Step(step.line, command, step.shown, step.typed)
                if not self.excused(part):
                    self.dispatch(part)

    def excused(self, step: Step) -> bool:
        for pattern, reason in EXCUSED.items():
            if re.fullmatch(pattern, step.command, re.DOTALL):
                self.handled.add(pattern)
                word = command_word(step.command)
                assert shell_type(word, self.env) == "file", \
                    f"README.md:{step.line}: {word!r} is not a program on PATH for bash ({reason})"
                return True
        return False

    def dispatch(self, step: Step) -> None:
        for pattern, handler in self.handlers:
            match = re.fullmatch(pattern, step.command, re.DOTALL)
            if match:
                word = command_word(step.command)
                kind = shell_type(word, self.env)
                assert kind == ("builtin" if word in SHELL_BUILTINS else "file"), \
                    f"README.md:{step.line}: bash takes {word!r} as a {kind}, not the program the README means"
                assert not step.shown or handler == self.publish, \
                    f"README.md:{step.line}: output shown for {step.command!r} that this test does not check"
                assert not step.typed or handler == self.start_client, \
                    f"README.md:{step.line}: input typed into {step.command!r} that this test does not check"
                handler(step, match)
                self.ran.append(step.command)
                self.handled.add(pattern)
                return
        pytest.fail(f"README.md:{step.line}: a command line this test neither runs nor excuses: {step.command!r}; "
                    "run it in tests/integration/test_readme_commands.py or add it to EXCUSED with the reason")

    def bash(self, step: Step) -> subprocess.CompletedProcess[str]:
        return subprocess.run([BASH, "-c", step.command], cwd=self.workdir, env=self.env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT, check=False)

    # -- the steps ----------------------------------------------------------------------------------------

    def start_node(self, step: Step, match: re.Match[str]) -> None:
        """The README's first command and its one-minute tour start the same node: it runs once."""
        if self.node is not None:
            assert step.command == self.node_command
            assert self.node.poll() is None, "the node is not running any more"
            return
        claim = re.search(r"it logs `([^`]+)`", self.readme)
        assert claim, "README.md no longer says what the node logs when it is ready (it logs `...`)"
        ready = re.compile(".*".join(re.escape(part) for part in claim.group(1).split("...")))
        self.node_command = step.command
        self.node = subprocess.Popen([BASH, "-c", step.command], cwd=self.workdir, env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        output = Output(self.node)
        output.wait_for(ready, f"README.md:{step.line}: {step.command!r} logging {claim.group(1)!r}")
        self.node_pid = json.loads((self.workdir / "pushd.runtime.json").read_text())["pid"]
        self.pids.append(self.node_pid)

    def start_client(self, step: Step, match: re.Match[str]) -> None:
        self.client = subprocess.Popen([BASH, "-c", step.command], cwd=self.workdir, env=self.env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
        self.client_output = Output(self.client)
        self.client_output.wait_for(re.compile("^Connected to " + re.escape(match.group(1))),
                                    f"README.md:{step.line}: the client connecting")
        assert self.client.stdin is not None
        for typed in step.typed:
            frame = json.loads(typed)
            if frame.get("op") == "subscribe":
                self.topics += frame["topics"]
            self.client.stdin.write(typed + "\n")
            self.client.stdin.flush()

    def client_next(self, what: str) -> object:
        assert self.client_output is not None, f"{what}: no client is running"
        line = self.client_output.wait_for(re.compile("^< "), what)
        return json.loads(line[2:])

    def client_shows(self, shown: str) -> None:
        """A `< ...` line: the client's next message, with this run's offsets and epochs for the README's."""
        expected = json.loads(shown[2:], object_hook=lambda d: {k: self.positions.get(v, v) if isinstance(v, str)
                                                                else v for k, v in d.items()})
        assert self.client_next(f"the client showing {shown!r}") == expected

    def publish(self, step: Step, match: re.Match[str]) -> None:
        topic = match.group(1)
        result = self.bash(step)
        assert result.returncode == 0, result
        printed = result.stdout.strip()
        if not step.shown:
            assert re.fullmatch(rf"published to {re.escape(topic)} at offset \S+ \(epoch \d+\)", printed), printed
        for shown in step.shown:
            assert example_pattern(shown).fullmatch(printed), f"{step.command!r} printed {printed!r}, not {shown!r}"
            # the README's example figures stand for this run's in what the client shows next
            (readme_offset, readme_epoch), (offset, epoch) = \
                re.findall(r"offset (\S+) \(epoch (\d+)\)", shown + " " + printed)
            self.positions.update({readme_offset: offset, readme_epoch: epoch})

    def curl(self, step: Step, match: re.Match[str]) -> None:
        body = json.loads(shlex.split(match.group(1))[0])
        result = self.bash(step)
        assert result.returncode == 0, result
        answer = json.loads(result.stdout)
        assert isinstance(answer, dict) and "error" not in answer, answer
        received = self.client_next(f"the client receiving what {step.command!r} sent")
        if match.group(3) == "publish":
            assert isinstance(received, dict) and received["topic"] == body["topic"] == answer["topic"]
            assert received["data"] == body["data"] and received["offset"] == answer["offset"], received
        else:
            assert received == {"op": "broadcast", "broadcast": answer["id"], "data": body["data"]}, received

    def stats(self, step: Step, match: re.Match[str]) -> None:
        result = self.bash(step)
        assert result.returncode == 0, result
        assert "nodes: 1 " in result.stdout, result.stdout
        if self.client is not None and self.client.poll() is None:
            assert "connections: 1 " in result.stdout, result.stdout
            for topic in self.topics:
                assert re.search(rf"^{re.escape(topic)}\s+1$", result.stdout, re.MULTILINE), result.stdout

    def stop_node(self) -> None:
        """Ctrl-C, as the README says, and the client gets close code 1001."""
        assert "Stop the node with Ctrl-C" in self.readme
        assert self.node is not None
        os.kill(self.node_pid, signal.SIGINT)
        self.node.wait(TIMEOUT)
        eventually(lambda: not alive(self.node_pid), timeout=TIMEOUT)
        if self.client_output is not None:
            self.client_output.wait_for(re.compile(r"^Connection closed: 1001 "), "the client closed with 1001")

    def start_daemon(self, step: Step, match: re.Match[str]) -> None:
        if self.node is not None and self.node.poll() is None:
            self.stop_node()  # the README stops the first node before it starts the daemon
        shutil.copy(ROOT / match.group(3), self.workdir)  # the reader is in a checkout, where tap.conf is
        pidfile = self.workdir / match.group(1)
        result = self.bash(step)
        # twistd returned: the node is ready already (or it failed, with exit status 1 and the error on stderr)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result
        pid = int(pidfile.read_text())
        self.pids.append(pid)
        assert alive(pid)
        assert json.loads((self.workdir / "pushd.runtime.json").read_text())["pid"] == pid
        assert "pushd ready" in (self.workdir / match.group(2)).read_text()

    def stop_daemon(self, step: Step, match: re.Match[str]) -> None:
        pidfile = self.workdir / match.group(1)
        pid = int(pidfile.read_text())
        result = self.bash(step)
        assert result.returncode == 0, result
        eventually(lambda: not alive(pid), timeout=TIMEOUT)
        assert not pidfile.exists()
        assert not (self.workdir / "pushd.runtime.json").exists()

    def stop_everything(self) -> None:
        """Every node and client this run started, by PID, whatever state the test left them in."""
        for pid in self.pids:
            stop_pid(pid)
        for proc in (self.client, self.node):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def reader_env() -> dict[str, str]:
    env = dict(os.environ)
    # The programs of the environment running the tests come first: what pip installed is what is tested.
    env["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), os.path.dirname(sys.executable), env["PATH"]])
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[Reader]:
    started = Reader(tmp_path, reader_env(), README.read_text(encoding="utf-8"))
    try:
        yield started
    finally:
        started.stop_everything()


@pytest.mark.timeout(600)
def test_readme_command_lines_do_what_the_readme_says(reader: Reader) -> None:
    reader.run()
    # Every kind of line this test knows is in the README: none of its checks or excuses is left unused.
    known = {pattern for pattern, _ in reader.handlers} | set(EXCUSED)
    assert reader.handled == known, f"not in the README any more: {known - reader.handled}"


def test_a_line_the_test_does_not_know_fails_it(tmp_path: Path) -> None:
    unknown = Reader(tmp_path, reader_env(), "# x\n\n    pushd stats\n")
    with pytest.raises(pytest.fail.Exception, match=r"README.md:3: a command line this test neither runs nor"):
        unknown.run()


def test_an_excused_line_must_still_name_a_program(tmp_path: Path) -> None:
    shadowed = Reader(tmp_path, reader_env(), "# x\n\n    pip install . && pushd stats\n")
    with pytest.raises(pytest.fail.Exception, match="neither runs nor excuses: 'pushd stats'"):
        shadowed.run()
    env = {**os.environ, "PATH": str(tmp_path)}  # no pip on PATH
    missing = Reader(tmp_path, env, "# x\n\n    pip install websockets\n")
    with pytest.raises(AssertionError, match="'pip' is not a program on PATH for bash"):
        missing.run()
