"""A new user's first minutes: defaults (embedded Redis, generated certificate, wss on 8443), `pushctl publish`,
`pushctl stats`, and start-up errors that are one line naming the setting."""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.request

from tests.integration.pushd_process import PushdProcess, alive, run_cli, run_pushd
from tests.redis_server import free_port


def test_defaults_embedded_redis_generated_certificate_publish_and_stats(tmp_path):
    with PushdProcess(tmp_path, listen=False, api=False) as node:
        assert node.url == "wss://localhost:8443/ws"
        assert node.api_url == "http://127.0.0.1:8081"
        assert (tmp_path / "certs" / "localhost.pem").exists()
        started = next(line for line in node.lines if "redis-server" in line and "pid" in line)
        redis_pid = int(re.search(r"pid[= ](\d+)", started).group(1))
        assert alive(redis_pid)

        client = node.client()
        client.subscribe("AAPL")
        published = run_cli(tmp_path, "publish", "AAPL", '{"price":172.5}')
        assert published.returncode == 0, published.stderr
        offset, epoch = re.search(r"at offset (\S+) \(epoch (\S+)\)", published.stdout).groups()
        assert client.recv() == {"topic": "AAPL", "data": {"price": 172.5}, "offset": offset, "epoch": epoch}
        plain = run_cli(tmp_path, "publish", "--plain", "AAPL", '{"price":173}')
        assert "1 node(s)" in plain.stdout, plain.stderr
        assert client.recv() == {"topic": "AAPL", "data": {"price": 173}}

        api = urllib.request.Request("http://127.0.0.1:8081/api/publish", method="POST",
                                     data=b'{"topic":"AAPL","data":{"price":174}}',
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(api, timeout=10) as response:
            assert json.load(response)["topic"] == "AAPL"
        assert client.recv()["data"] == {"price": 174}

        stats = run_cli(tmp_path, "stats")
        assert stats.returncode == 0, stats.stderr
        assert "connections: 1" in stats.stdout
        assert re.search(r"^AAPL\s+1$", stats.stdout, re.MULTILINE)

        bad = run_cli(tmp_path, "publish", "AAPL", "{not json")
        assert bad.returncode == 1 and "DATA is not valid JSON" in bad.stderr

        # twistd ends by re-raising the signal that stopped it, so an orderly SIGTERM exit reads as -15
        assert node.stop() == -15, node.log
        assert "pushd stopped" in node.log
        assert not (tmp_path / "pushd.runtime.json").exists()
        assert not alive(redis_pid)

    gone = run_cli(tmp_path, "publish", "AAPL", "1")
    assert gone.returncode == 1
    assert "no pushd server is running" in gone.stderr


def one_error_line(result, start: str) -> str:
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stdout, result.stdout
    lines = [line for line in result.stdout.splitlines() if "pushd: " in line]
    assert len(lines) == 1, result.stdout
    assert start in lines[0], result.stdout
    return lines[0]


def test_bad_settings_stop_start_up_with_one_line(tmp_path):
    one_error_line(run_pushd(tmp_path, "--listen", "ssl:0:privateKey=nope.key:certKey=nope.pem"), "pushd: listen:")
    one_error_line(run_pushd(tmp_path, "--redis", "redis//x"), "pushd: redis: 'redis//x' is not a Redis URL")
    one_error_line(run_pushd(tmp_path, "--max-topics", "0"), "pushd: max-topics:")
    conf = tmp_path / "bad.conf"
    conf.write_text("[pushd]\nmax-topic = 5\n")
    one_error_line(run_pushd(tmp_path, "--config", str(conf)), "pushd: max-topic: unknown key")
    one_error_line(run_pushd(tmp_path, "--hooks", "no.such.module"), "pushd: hooks: cannot import")
    one_error_line(run_pushd(tmp_path, "--api-listen", "tcp:8081"), "pushd: api-listen: 'tcp:8081' is not loopback")
    one_error_line(run_pushd(tmp_path, "--auth", "required"), "pushd: auth: required needs one of jwt-secret")
    one_error_line(run_pushd(tmp_path, "--jwt-public-key", "nope.pem"), "pushd: jwt-public-key: cannot read")
    one_error_line(run_pushd(tmp_path, "--history-rules", "x*=1/"), "pushd: history-rules: ")


def test_port_in_use_stops_start_up_with_one_line(tmp_path, redis_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_pushd(tmp_path, "--redis", redis_server.url, "--listen", f"tcp:{port}:interface=127.0.0.1")
    line = one_error_line(result, "pushd: listen: cannot listen on")
    assert str(port) in line
    # the node registered itself before it failed to listen, and removed itself on the way out
    assert redis_server.client().keys("pushd:*") == []


def test_unreachable_redis_stops_start_up_with_one_line(tmp_path):
    port = free_port()
    result = run_pushd(tmp_path, "--redis", f"redis://127.0.0.1:{port}", "--redis-timeout", "2",
                       "--listen", "tcp:0:interface=127.0.0.1")
    one_error_line(result, f"pushd: redis: cannot reach redis://127.0.0.1:{port}")
    assert not os.path.exists(tmp_path / "pushd.runtime.json")
