"""The `pushctl` command's own surface: its name in messages and usage, and pushd's version (not Twisted's)."""

from __future__ import annotations

import configparser
from importlib import metadata
from pathlib import Path

import pytest
from twisted.python.failure import Failure

import pushd
from pushd import cli

REPO = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[object, str, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_version_is_the_installed_distribution_s(capsys: pytest.CaptureFixture[str]) -> None:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg", encoding="utf-8")
    assert pushd.__version__ == metadata.version("pushd") == setup["metadata"]["version"]
    for argv in (["--version"], ["publish", "--version"], ["stats", "--version"]):
        assert run(capsys, *argv) == (0, f"pushctl (pushd) {pushd.__version__}\n", ""), argv


def test_console_script_is_pushctl() -> None:
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts") if ep.module == "pushd.cli"}
    assert scripts == {"pushctl": "pushd.cli:main"}


def test_usage_and_errors_name_pushctl(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and out.startswith("Usage: pushctl COMMAND [options]\n"), out
    assert "python -m pushd" in out

    code, _, _ = run(capsys)
    assert str(code).startswith("Usage: pushctl COMMAND [options]\n")
    assert str(code).endswith("\npushctl: name a command: publish, stats, audience, job or worker")

    code, _, _ = run(capsys, "publish", "AAPL")
    assert str(code).startswith("Usage: pushctl publish [options] TOPIC DATA\n")
    assert str(code).endswith("\npushctl: Wrong number of arguments.")


def test_no_server_hint_names_the_commands(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    options = cli.StatsOptions()
    options.parseOptions(["--pidfile", str(tmp_path / "twistd.pid")])
    with pytest.raises(cli.CommandError) as error:
        cli.locate_server(options)
    with pytest.raises(SystemExit) as exit_:
        cli._fail(Failure(error.value))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pushctl: no pushd server is running here (no live runtime file at {tmp_path}/"), err
    assert "start one with `twistd -n pushd`" in err
