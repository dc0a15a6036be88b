"""A worker process finds the Redis and the key prefix of the node running here when not given them."""

from __future__ import annotations

import json
import os

import pytest

from pushd.config import ConfigError, build_config
from pushd.jobs.process import find_redis


def runtime_file(tmp_path, pid):
    path = tmp_path / "pushd.runtime.json"
    path.write_text(json.dumps({"pid": pid, "redis": "redis://127.0.0.1:6400/2", "key_prefix": "shop:"}))
    return str(path)


def test_the_redis_and_key_prefix_of_the_node_running_here(tmp_path):
    config = find_redis(build_config({}), runtime_file(tmp_path, os.getpid()))
    assert (config.redis.display, config.key_prefix) == ("redis://127.0.0.1:6400/2", "shop:")


def test_a_given_redis_keeps_the_configured_prefix(tmp_path):
    config = find_redis(build_config({"redis": "redis://127.0.0.1:6500"}), runtime_file(tmp_path, os.getpid()))
    assert (config.redis.port, config.key_prefix) == (6500, "pushd:")


def test_no_live_node_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^redis: not given, and no pushd node is running here"):
        find_redis(build_config({}), str(tmp_path / "missing.json"))
