"""NodeState's write discipline, driven through a fake Redis link on a fake clock.

The Lua scripts themselves run against a real redis-server in tests/integration/test_state_scripts.py.
"""

import json

from twisted.internet import defer
from twisted.internet.task import Clock

from pushd.redis.state import APPLY_SCRIPT, BATCH, PURGE_SCRIPT, Keys, NodeState


class FakeLink:
    """Answers commands from a script of results; records every call. `hold` leaves calls pending."""

    def __init__(self):
        self.calls = []
        self.hold = False
        self.pending = []
        self.fail_with = None

    def call(self, method, *args, **kwargs):
        self.calls.append((method, args, kwargs))
        if self.fail_with is not None:
            return defer.fail(self.fail_with)
        if self.hold:
            d = defer.Deferred()
            self.pending.append(d)
            return d
        if method == "eval" and args[0] == PURGE_SCRIPT:
            return defer.succeed(0)
        if method == "smembers":
            return defer.succeed(set())
        return defer.succeed(1)

    def applied(self):
        """The op batches sent with the APPLY script, in order."""
        return [json.loads(args[2][2]) for method, args, _ in self.calls
                if method == "eval" and args[0] == APPLY_SCRIPT]

    def purges(self):
        return [args[2] for method, args, _ in self.calls if method == "eval" and args[0] == PURGE_SCRIPT]


def make_state(snapshot=()):
    clock = Clock()
    link = FakeLink()
    state = NodeState(clock, link, Keys("p:"), "node-a", heartbeat_interval=5, heartbeat_ttl=15,
                      snapshot=lambda: list(snapshot))
    return clock, link, state


def test_start_purges_own_state_writes_snapshot_and_registers():
    _clock, link, state = make_state(snapshot=[("node-a:1", ("A", "B"), "alice"), ("node-a:2", (), None)])
    state.start()
    assert link.purges() == [["p:", "node-a", "500", "own"]]
    assert link.applied() == [[["o", "node-a:1"], ["i", "node-a:1", "alice"], ["s", "node-a:1", ["A", "B"]],
                               ["o", "node-a:2"]]]
    methods = [c[0] for c in link.calls]
    assert methods[-3:] == ["set", "sadd", "smembers"]
    set_call = next(c for c in link.calls if c[0] == "set")
    assert set_call[1][0] == "p:heartbeat:node-a" and set_call[2] == {"expire": 15}


def test_changes_in_one_reactor_turn_go_out_as_one_batch():
    clock, link, state = make_state()
    state.start()
    link.calls.clear()
    state.opened("node-a:1")
    state.subscribed("node-a:1", ("A",))
    state.unsubscribed("node-a:1", ("A",))
    state.closed("node-a:1")
    assert link.applied() == []
    clock.advance(0)
    assert link.applied() == [[["o", "node-a:1"], ["s", "node-a:1", ["A"]], ["u", "node-a:1", ["A"]],
                               ["c", "node-a:1"]]]


def test_large_bursts_are_split_into_batches_of_BATCH():
    clock, link, state = make_state()
    state.start()
    link.calls.clear()
    for i in range(BATCH * 2 + 5):
        state.opened(f"node-a:{i}")
    clock.advance(0)
    assert [len(b) for b in link.applied()] == [BATCH, BATCH, 5]


def test_one_batch_in_flight_at_a_time_and_order_is_kept():
    clock, link, state = make_state()
    state.start()
    link.calls.clear()
    link.hold = True
    state.opened("node-a:1")
    clock.advance(0)
    state.opened("node-a:2")
    clock.advance(0)
    assert len(link.applied()) == 1
    link.pending.pop(0).callback(1)
    assert link.applied() == [[["o", "node-a:1"]], [["o", "node-a:2"]]]


def test_a_failed_write_goes_offline_and_the_next_heartbeat_rewrites_from_the_index():
    index = {"node-a:1": ("A",)}
    clock = Clock()
    link = FakeLink()
    state = NodeState(clock, link, Keys("p:"), "node-a", heartbeat_interval=5, heartbeat_ttl=15,
                      snapshot=lambda: [(conn, topics, None) for conn, topics in index.items()])
    state.start()
    link.fail_with = TimeoutError("redis: EVAL got no answer")
    state.subscribed("node-a:1", ("B",))
    clock.advance(0)
    index["node-a:1"] = ("A", "B")
    link.fail_with = None
    link.calls.clear()
    state.opened("node-a:2")  # dropped while offline: the rewrite covers it
    index["node-a:2"] = ()
    clock.advance(0)
    assert link.applied() == []
    clock.advance(5)
    assert link.purges() == [["p:", "node-a", "500", "own"]]
    assert link.applied() == [[["o", "node-a:1"], ["s", "node-a:1", ["A", "B"]], ["o", "node-a:2"]]]
    assert state.resyncs == 2


def test_changes_during_a_rewrite_are_applied_after_the_snapshot():
    index = {"node-a:1": ()}
    clock = Clock()
    link = FakeLink()
    state = NodeState(clock, link, Keys("p:"), "node-a", heartbeat_interval=5, heartbeat_ttl=15,
                      snapshot=lambda: [(conn, topics, None) for conn, topics in index.items()])
    link.hold = True
    done = state.resync()
    state.opened("node-a:0")  # before the snapshot: the snapshot carries it
    link.pending.pop(0).callback(0)  # purge finished, snapshot taken, APPLY in flight
    state.opened("node-a:2")  # after the snapshot: must follow it
    link.pending.pop(0).callback(1)
    assert done.called
    link.hold = False
    clock.advance(0)
    assert link.applied() == [[["o", "node-a:1"]], [["o", "node-a:2"]]]


def test_concurrent_resyncs_share_one_rewrite():
    _clock, link, state = make_state()
    link.hold = True
    first, second = state.resync(), state.resync()
    assert len(link.pending) == 1
    link.pending.pop(0).callback(0)
    assert first.called and second.called


def test_connection_lost_then_ready_rewrites_at_once():
    clock, link, state = make_state(snapshot=[("node-a:1", ("A",), None)])
    state.start()
    state.connection_lost()
    state.subscribed("node-a:1", ("B",))
    clock.advance(0)
    link.calls.clear()
    state.connection_ready()
    assert link.purges() and link.applied() == [[["o", "node-a:1"], ["s", "node-a:1", ["A"]]]]


def test_reap_purges_only_nodes_without_heartbeat():
    _clock, link, state = make_state()
    state.start()
    link.calls.clear()

    def call(method, *args, **kwargs):
        link.calls.append((method, args, kwargs))
        if method == "smembers":
            return defer.succeed({"node-a", "node-b", "node-c"})
        if method == "exists":
            return defer.succeed(1 if args[0] == "p:heartbeat:node-b" else 0)
        return defer.succeed(0)

    link.call = call
    state.reap()
    assert link.purges() == [["p:", "node-c", "500", "dead"]]
    assert state.reaped_nodes == 1


def test_stop_removes_this_nodes_state_and_heartbeat():
    clock, link, state = make_state()
    state.start()
    link.calls.clear()
    state.stop()
    assert link.purges() == [["p:", "node-a", "500", "own"]]
    assert ("delete", ("p:heartbeat:node-a",), {}) in link.calls
    assert ("srem", ("p:nodes", "node-a"), {}) in link.calls
    state.opened("node-a:9")
    clock.advance(0)
    assert len(link.applied()) == 0
