"""How long a burst of back-to-back connects takes, by listen backlog: what a node meets when many clients
reconnect at once (after a restart or a network blip).

For each backlog, starts one pushd node as the README does (`twistd -n pushd`, its private redis-server, a
generated localhost certificate; here on a free port of 127.0.0.1 so it collides with nothing) with
`--listen-backlog B`, then starts COUNT TCP connects to it at once, each followed by its TLS handshake as a client's would be, and
reports when the last TCP connect and the last TLS handshake completed, with the kernel's counts of connects
that found the accept queue full and of SYNs sent again (/proc/net/netstat, system-wide). A connect the kernel could not queue
(the accept queue holds `backlog` connections, capped at net.core.somaxconn) is dropped and retried by the
client's kernel after 1 s, 3 s, 7 s...: that is where a small backlog loses its time.

    python bench/connect_burst.py                          # 1,000 connects, backlog 50 then 1024
    python bench/connect_burst.py --tcp-only               # the TCP connects alone, no TLS handshakes
    python bench/connect_burst.py --count 2000 --backlogs 128,4096
    python bench/connect_burst.py --target 127.0.0.1:8443  # a node that is already running (its own backlog)

Each burst is bounded by --timeout seconds; connects still unfinished then count as failed. Exit status 0 when
every connect of every burst completed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.pushd_process import PushdProcess

SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


@dataclass
class Burst:
    backlog: str
    count: int
    tcp_done_s: float | None
    tls_done_s: float | None
    failed: int
    #: The kernel's counts during the burst (system-wide): connects that found the accept queue full, and SYNs
    #: the clients' kernel sent again because the first got no answer.
    listen_overflows: int
    syn_retransmits: int


async def burst(host: str, port: int, count: int, context: ssl.SSLContext | None,
                timeout: float) -> tuple[list[float], list[float], int]:
    """COUNT connects at once, each followed by its TLS handshake as a client would; seconds from the first
    connect (the sockets are made before the clock starts) to each TCP connect and each handshake."""
    loop = asyncio.get_running_loop()
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    for sock in sockets:
        sock.setblocking(False)
    tcp_times: list[float] = []
    tls_times: list[float] = []
    writers: list[asyncio.StreamWriter] = []
    started = time.monotonic()

    async def one(sock: socket.socket) -> None:
        await loop.sock_connect(sock, (host, port))
        tcp_times.append(time.monotonic() - started)
        if context is None:
            return
        _, writer = await asyncio.open_connection(sock=sock, ssl=context, server_hostname="localhost",
                                                  ssl_handshake_timeout=timeout)
        writers.append(writer)
        tls_times.append(time.monotonic() - started)

    tasks = [asyncio.create_task(one(sock)) for sock in sockets]
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    failed = sum(1 for task in tasks if task.cancelled() or task.exception() is not None)
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    for sock in sockets:
        sock.close()
    return tcp_times, tls_times, failed


def tcp_counters() -> dict[str, int]:
    """The kernel's TcpExt counters (/proc/net/netstat): listen-queue overflows and SYNs sent again."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=True))
    return {}


def measure(label: str, host: str, port: int, count: int, cafile: str | None, timeout: float,
            tls: bool = True) -> Burst:
    context = ssl.create_default_context(cafile=cafile) if tls else None
    if context is not None and cafile is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    before = tcp_counters()
    tcp, tls, failed = asyncio.run(burst(host, port, count, context, timeout))
    after = tcp_counters()
    change = {name: after.get(name, 0) - before.get(name, 0) for name in ("ListenOverflows", "TCPSynRetrans")}
    return Burst(label, count, round(max(tcp), 3) if len(tcp) == count else None,
                 round(max(tls), 3) if len(tls) == count else None, failed, change["ListenOverflows"],
                 change["TCPSynRetrans"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="connects per burst (default 1000)")
    parser.add_argument("--backlogs", default="50,1024", help="listen-backlog values, one node each (default 50,1024)")
    parser.add_argument("--timeout", type=float, default=90, help="seconds a burst may take (default 90)")
    parser.add_argument("--tcp-only", action="store_true",
                        help="TCP connects alone, no TLS handshakes: the kernel's part without the CPU's")
    parser.add_argument("--target", help="host:port of a running wss node instead (its certificate is not checked)")
    options = parser.parse_args(argv)
    somaxconn = SOMAXCONN.read_text().strip() if SOMAXCONN.exists() else "unknown"
    results: list[Burst] = []
    if options.target:
        host, _, port = options.target.rpartition(":")
        results.append(measure("(the node's)", host, int(port), options.count, None, options.timeout,
                               not options.tcp_only))
    else:
        for backlog in options.backlogs.split(","):
            with tempfile.TemporaryDirectory() as directory:
                node = PushdProcess(Path(directory), "--listen-backlog", backlog, "--api-listen", "",
                                    api=False).start(timeout=60)
                try:
                    port = int(node.url.rsplit(":", 1)[1].split("/", 1)[0])
                    results.append(measure(backlog, "127.0.0.1", port, options.count, node.cert, options.timeout,
                                           not options.tcp_only))
                finally:
                    node.stop()
    sys.stdout.write(f"{options.count} back-to-back {'TCP' if options.tcp_only else 'TCP+TLS'} connects to "
                     f"127.0.0.1; net.core.somaxconn = "
                     f"{somaxconn}; {platform.machine()}, {platform.python_implementation()} "
                     f"{platform.python_version()}\n\n")
    sys.stdout.write("| listen-backlog | last TCP connect | last TLS handshake | accept queue full | SYNs sent "
                     "again | failed |\n| --- | --- | --- | --- | --- | --- |\n")
    for r in results:
        sys.stdout.write(f"| {r.backlog} | {_seconds(r.tcp_done_s)} | {_seconds(r.tls_done_s)} "
                         f"| {r.listen_overflows} | {r.syn_retransmits} | {r.failed} |\n")
    sys.stdout.write("\n" + json.dumps({"somaxconn": somaxconn, "bursts": [asdict(r) for r in results]}) + "\n")
    return 0 if all(r.failed == 0 for r in results) else 1


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
