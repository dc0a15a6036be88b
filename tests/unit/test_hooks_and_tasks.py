"""Loading user hooks, the worked example in docs/, and the task-worker pool."""

import json
import queue
import sys
import threading
from pathlib import Path

import pytest
from twisted.python.failure import Failure

from pushd.config import ConfigError
from pushd.hooks import apply_on_message, load_hooks
from pushd.tasks import TaskPool
from pushd.testing import MemoryNode

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


@pytest.fixture
def example_hooks(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("pushd_hooks_example", None)
    return load_hooks("pushd_hooks_example")


def test_no_hooks_configured():
    hooks = load_hooks("")
    assert hooks.authorize is None and hooks.on_message is None


def test_bad_hook_modules_are_config_errors(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "empty_hooks.py").write_text("x = 1\n")
    (tmp_path / "broken_hooks.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "odd_hooks.py").write_text("authorize = 5\n")
    with pytest.raises(ConfigError, match="^hooks: 'empty_hooks' defines neither"):
        load_hooks("empty_hooks")
    with pytest.raises(ConfigError, match="^hooks: cannot import 'broken_hooks': RuntimeError: boom"):
        load_hooks("broken_hooks")
    with pytest.raises(ConfigError, match="^hooks: odd_hooks.authorize is not callable"):
        load_hooks("odd_hooks")


def test_on_message_results():
    assert apply_on_message(lambda t, p: p, "T", b"1") == b"1"
    assert apply_on_message(lambda t, p: "caf\u00e9", "T", b"1") == "caf\u00e9".encode()
    assert apply_on_message(lambda t, p: None, "T", b"1") is None
    with pytest.raises(TypeError, match="on_message returned int"):
        apply_on_message(lambda t, p: 5, "T", b"1")


def test_worked_example_authorize(example_hooks):
    node = MemoryNode(hooks=example_hooks)
    client = node.connect("/ws?user=17")
    assert client.status == 101
    assert client.request({"op": "subscribe", "topics": ["user.17", "AAPL"]})[0]["op"] == "subscribed"
    [refused] = client.request({"op": "subscribe", "topics": ["user.18", "admin.x", "MSFT"]})
    assert refused["code"] == "forbidden" and refused["topics"] == ["user.18", "admin.x"]


def test_worked_example_on_message(example_hooks):
    hook = example_hooks.on_message
    assert apply_on_message(hook, "AAPL", b'{"internal":true}') is None
    stamped = json.loads(apply_on_message(hook, "AAPL", b'{"price":1}'))
    assert stamped["price"] == 1 and "ts" in stamped
    assert apply_on_message(hook, "AAPL", b"plain") == b"plain"


class ThreadHopReactor:
    """Just enough reactor for deferToThreadPool: results hop back through a queue the test drains."""

    def __init__(self):
        self.calls = queue.Queue()

    def callFromThread(self, f, *args, **kwargs):
        self.calls.put((f, args, kwargs))

    def run_one(self, timeout=10):
        f, args, kwargs = self.calls.get(timeout=timeout)
        f(*args, **kwargs)


def test_task_pool_runs_work_in_a_worker_thread_and_returns_on_the_callers_thread():
    reactor = ThreadHopReactor()
    pool = TaskPool(reactor, 2)
    pool.startService()
    try:
        main = threading.get_ident()
        d = pool.run(lambda a, b=0: (threading.get_ident(), a + b), 2, b=3)
        results = []
        d.addCallback(results.append)
        reactor.run_one()
        worker, value = results[0]
        assert value == 5 and worker != main

        failures = []
        pool.run(lambda: 1 / 0).addErrback(failures.append)
        reactor.run_one()
        assert isinstance(failures[0], Failure) and failures[0].check(ZeroDivisionError)
    finally:
        pool._pool.stop()
