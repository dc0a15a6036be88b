"""NodeState's write discipline, driven through a fake Redis link on a fake clock.

The Lua scripts themselves run against a real redis-server in tests/integration/test_state_scripts.py.
"""

import json

from twisted.internet import defer
from twisted.internet.task import Clock

from pushd.redis.state import (
    APPLY_SCRIPT,
    BATCH,
    HEARTBEAT_SCRIPT,
    PURGE_SCRIPT,
    Keys,
    NodeState,
    base36,
    local_incarnation,
    read_incarnation,
)


class FakeLink:
    """Answers commands like a Redis holding one node's connection set; records every call. `hold` leaves calls
    pending; `lose()` forgets everything, as a reaper (or a Redis restarted without data) would."""

    def __init__(self):
        self.calls = []
        self.hold = False
        self.pending = []
        self.fail_with = None
        self.held = set()
        self.heartbeat = False

    def call(self, method, *args, **kwargs):
        self.calls.append((method, args, kwargs))
        if self.fail_with is not None:
            return defer.fail(self.fail_with)
        if self.hold:
            d = defer.Deferred()
            d.call = (method, args[0] if method == "eval" else None)
            self.pending.append(d)
            return d
        if method == "eval" and args[0] == PURGE_SCRIPT:
            self.held.clear()
            return defer.succeed(0)
        if method == "eval" and args[0] == APPLY_SCRIPT:
            for op in json.loads(args[2][2]):
                if op[0] == "o":
                    self.held.add(op[1])
                elif op[0] == "c":
                    self.held.discard(op[1])
        if method == "eval" and args[0] == HEARTBEAT_SCRIPT:
            existed, self.heartbeat = self.heartbeat, True
            return defer.succeed([int(existed), len(self.held)])
        if method == "smembers":
            return defer.succeed(set())
        return defer.succeed(1)

    def answer(self, method, script, value):
        """Fire the first pending call of `method` (and `script`, for EVAL) with `value`."""
        d = next(d for d in self.pending if d.call == (method, script))
        self.pending.remove(d)
        d.callback(value)

    def lose(self):
        self.held.clear()
        self.heartbeat = False

    def heartbeats(self):
        return [args[2] for method, args, _ in self.calls if method == "eval" and args[0] == HEARTBEAT_SCRIPT]

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
    # the heartbeat is set before the rewrite, so a reaper cannot purge half of it
    assert link.calls[0][1][0] == HEARTBEAT_SCRIPT
    methods = [c[0] for c in link.calls]
    assert methods[-2:] == ["eval", "smembers"]
    prefix, node, record, ttl = link.heartbeats()[-1]
    assert (prefix, node, ttl) == ("p:", "node-a", "15")
    assert json.loads(record)["host"] and json.loads(record)["repairs"] == 0


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
    link.pending.pop(0).callback([0, 0])  # heartbeat set
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
    link.pending.pop(0).callback([0, 0])
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
    # "leave": with the last chunk the script also deletes the heartbeat and leaves pushd:nodes
    assert link.purges() == [["p:", "node-a", "500", "leave"]]
    state.opened("node-a:9")
    clock.advance(0)
    assert len(link.applied()) == 0


def logged(state):
    from twisted.logger import Logger, formatEvent

    events = []
    state.log = Logger(observer=lambda e: events.append((e["log_level"].name, formatEvent(e))))
    return events


def make_repairing_state(index):
    clock = Clock()
    link = FakeLink()
    state = NodeState(clock, link, Keys("p:"), "node-a", heartbeat_interval=5, heartbeat_ttl=15,
                      snapshot=lambda: [(conn, topics, None) for conn, topics in index.items()],
                      count=lambda: len(index))
    return clock, link, state


def test_a_heartbeat_that_finds_its_key_gone_rewrites_the_state_and_counts_a_repair():
    index = {"node-a:x.1": ("A",)}
    clock, link, state = make_repairing_state(index)
    state.start()
    events = logged(state)
    clock.advance(5)
    assert state.repairs == 0
    link.lose()  # reaped by a peer while this node was stopped
    link.calls.clear()
    clock.advance(5)
    assert state.repairs == 1
    assert link.purges() == [["p:", "node-a", "500", "own"]]
    assert link.applied() == [[["o", "node-a:x.1"], ["s", "node-a:x.1", ["A"]]]]
    assert link.held == {"node-a:x.1"}
    [repair] = [text for level, text in events if level == "warn"]
    assert "heartbeat had expired" in repair and "repair 1" in repair
    clock.advance(5)
    assert state.repairs == 1 and json.loads(link.heartbeats()[-1][2])["repairs"] == 1


def test_a_count_that_differs_while_nothing_is_queued_rewrites_the_state():
    index = {"node-a:x.1": (), "node-a:x.2": ()}
    clock, link, state = make_repairing_state(index)
    state.start()
    events = logged(state)
    link.held.discard("node-a:x.2")  # a replica that lost a write
    clock.advance(5)
    assert state.repairs == 1 and link.held == {"node-a:x.1", "node-a:x.2"}
    assert "Redis held 1 of its 2 connections" in next(text for level, text in events if level == "warn")


def test_no_repair_while_changes_are_queued_or_in_flight():
    index = {"node-a:x.1": ()}
    clock, link, state = make_repairing_state(index)
    state.start()
    link.hold = True
    index["node-a:x.2"] = ()
    state.opened("node-a:x.2")
    clock.advance(0)  # the APPLY is in flight: Redis's count is behind ours
    clock.advance(5)
    link.answer("eval", APPLY_SCRIPT, 1)
    link.answer("eval", HEARTBEAT_SCRIPT, [1, 1])
    link.hold = False
    assert state.repairs == 0


def test_losing_the_state_again_during_a_rewrite_rewrites_once_more():
    index = {"node-a:x.1": ()}
    clock, link, state = make_repairing_state(index)
    state.start()
    link.lose()
    link.hold = True
    clock.advance(5)
    link.answer("eval", HEARTBEAT_SCRIPT, [0, 0])  # the beat: key gone, a repair starts in the background
    link.answer("smembers", None, set())  # the beat's reap: the beat is over
    link.answer("eval", HEARTBEAT_SCRIPT, [1, 0])  # the rewrite's own heartbeat; its purge is in flight
    clock.advance(5)  # the heartbeat goes on during the rewrite, and finds the key gone again
    link.answer("eval", HEARTBEAT_SCRIPT, [0, 0])
    link.answer("smembers", None, set())
    link.hold = False
    link.calls.clear()
    link.answer("eval", PURGE_SCRIPT, 0)  # the first pass goes on: its APPLY, then a second pass
    assert len(link.purges()) == 1 and len(link.applied()) == 2
    assert state.repairs == 1 and link.held == {"node-a:x.1"} and state.resyncs == 2


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends():
    clock, link, state = make_state()
    state.start()
    events = logged(state)
    link.fail_with = TimeoutError("redis: EVAL got no answer")
    for _ in range(4):
        clock.advance(5)
    link.fail_with = None
    clock.advance(5)
    clock.advance(5)
    assert [level for level, _ in events if level in ("warn", "info")][:2] == ["warn", "info"]
    warns = [text for level, text in events if level == "warn"]
    assert len(warns) == 1 and "heartbeat to Redis failed" in warns[0]
    assert [text for level, text in events if "works again" in text] == ["heartbeat to Redis works again after 20 s"]


def start_with_peers(records, **kwargs):
    clock = Clock()
    link = FakeLink()
    state = NodeState(clock, link, Keys("p:"), "node-a", heartbeat_interval=5, heartbeat_ttl=15,
                      snapshot=list, host="h1", pid=100, **kwargs)
    call = link.call

    def answer(method, *args, **kw):
        if method == "smembers":
            link.calls.append((method, args, kw))
            return defer.succeed(set(records) | {"node-a"})
        if method == "get":
            link.calls.append((method, args, kw))
            return defer.succeed(records.get(args[0].removeprefix("p:heartbeat:")))
        return call(method, *args, **kw)

    link.call = answer
    state.start()
    return link, state


def test_start_reaps_nodes_of_this_host_whose_process_is_gone_before_their_ttl(monkeypatch):
    monkeypatch.setattr("pushd.redis.state.process_running", lambda pid: pid == 7)
    records = {"gone": json.dumps({"host": "h1", "pid": 8}), "running": json.dumps({"host": "h1", "pid": 7}),
               "elsewhere": json.dumps({"host": "h2", "pid": 8}), "expired": None,
               "odd": "not json"}
    link, state = start_with_peers(records)
    assert link.purges()[1:] == [["p:", "expired", "500", "dead"], ["p:", "gone", "500", "gone", records["gone"]]]
    assert state.reaped_nodes == 2


def test_heartbeat_reaps_only_expired_nodes(monkeypatch):
    monkeypatch.setattr("pushd.redis.state.process_running", lambda pid: False)
    link, state = start_with_peers({"gone": json.dumps({"host": "h1", "pid": 8})})
    link.calls.clear()
    state._heartbeat.clock.advance(5)
    assert link.purges() == []


def test_incarnations_are_redis_time_in_base_36_or_the_local_clock():
    assert base36(0) == "0" and base36(35) == "z" and base36(36) == "10"
    assert int(base36(1795465234004986), 36) == 1795465234004986

    class TimeLink:
        def __init__(self, reply):
            self.reply = reply

        def call(self, method):
            assert method == "time"
            return defer.succeed(self.reply) if not isinstance(self.reply, Exception) else defer.fail(self.reply)

    assert read_incarnation(TimeLink(["1795465234", "004986"])).result == base36(1795465234004986)
    fallback = read_incarnation(TimeLink(TimeoutError("no answer"))).result
    assert int(fallback, 36) > 1795465234004986 // 2 and len(fallback) == len(local_incarnation())
