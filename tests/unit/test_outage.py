"""Through a Redis outage on a fake clock: the hub's pause and catch-up, and what the node tells its clients."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.task import Clock

from pushd.hub import CATCH_UP_HOLD, Hub
from pushd.outage import NO_HISTORY, PATTERN, UNREADABLE, OutageRecovery
from pushd.recovery import Position
from pushd.redis.history import Missed
from pushd.testing import FakeSubscriber
from pushd.ws import NATIVE


def at(seq: int, epoch: str = "e") -> Position:
    return Position(f"{1000 + seq}-0", epoch, seq)


def data(conn: FakeSubscriber) -> bytes:
    """Every byte written to `conn` (a batch is one write of several frames)."""
    return b"".join(conn.written)


def frame(topic: str, payload: bytes, position: Position | None) -> bytes:
    return NATIVE.publication(topic, payload, position)


def subscribed(hub: Hub, conn_id: str, *topics: str) -> FakeSubscriber:
    conn = FakeSubscriber(conn_id)
    hub.add(conn)
    hub.subscribe(conn, topics)
    return conn


# -- the hub ------------------------------------------------------------------------------------------------------

def test_a_paused_topic_keeps_live_messages_until_caught_up_then_replays_and_joins_them_without_repeats():
    hub = Hub()
    conn = subscribed(hub, "n:1", "A")
    hub.publish("A", b"1", at(1))
    hub.pause(["A"])
    hub.publish("A", b"3", at(3))  # live, after the listener came back: the catch-up read has it too
    hub.publish("A", b"4", at(4))
    assert data(conn) == b"".join([frame("A", b"1", at(1))])
    assert hub.catch_up("A", [(at(2), b"2"), (at(3), b"3")]) == 2
    assert data(conn) == b"".join([frame("A", p, at(n)) for n, p in ((1, b"1"), (2, b"2"), (3, b"3"), (4, b"4"))])
    assert hub.gaps == 0 and conn.lost_topics == []
    hub.publish("A", b"5", at(5))
    assert data(conn).endswith(frame("A", b"5", at(5)))


def test_a_new_epoch_is_no_gap_but_lost_tells_and_numbers_start_afresh():
    hub = Hub()
    conn = subscribed(hub, "n:1", "A")
    hub.publish("A", b"9", at(9, "old"))
    hub.pause(["A"])
    hub.catch_up("A", [(at(1, "new"), b"1")], lost="history epoch changed (Redis lost it)")
    assert conn.lost_reasons == ["history epoch changed (Redis lost it)"]
    hub.publish("A", b"2", at(2, "new"))
    assert hub.gaps == 0 and len(conn.lost_topics) == 1
    assert data(conn).endswith(frame("A", b"1", at(1, "new")) + frame("A", b"2", at(2, "new")))


def test_a_gap_left_in_what_history_still_has_is_reported_as_a_gap():
    hub = Hub()
    conn = subscribed(hub, "n:1", "A")
    hub.publish("A", b"1", at(1))
    hub.pause(["A"])
    hub.catch_up("A", [(at(5), b"5")])  # 2..4 were trimmed away
    assert hub.gaps == 1 and conn.lost_topics == ["A"]


def test_too_many_live_messages_while_catching_up_are_dropped_and_told():
    hub = Hub()
    conn = subscribed(hub, "n:1", "A")
    hub.pause(["A"])
    for n in range(1, CATCH_UP_HOLD + 2):
        hub.publish("A", b"x", at(n))
    hub.catch_up("A", [])
    assert conn.written == [] and conn.lost_reasons == [f"more than {CATCH_UP_HOLD} messages arrived while catching up"]


def test_messages_without_a_position_kept_while_paused_are_all_delivered():
    hub = Hub()
    conn = subscribed(hub, "n:1", "A")
    hub.pause(["A"])
    hub.publish("A", b"plain", None)
    hub.catch_up("A", [(at(1), b"1")])
    assert data(conn) == b"".join([frame("A", b"1", at(1)), frame("A", b"plain", None)])


# -- the node through an outage -----------------------------------------------------------------------------------

class FakeHistory:
    def __init__(self, keeps: set[str]) -> None:
        self.keeps = keeps
        self.asked: list[list[tuple[str, Position | None, str]]] = []
        self.answers: list[defer.Deferred[list[Missed]]] = []

    def keeps_history(self, topic: str) -> bool:
        return topic in self.keeps

    def missed(self, topics):  # type: ignore[no-untyped-def]
        self.asked.append(list(topics))
        d: defer.Deferred[list[Missed]] = defer.Deferred()
        self.answers.append(d)
        return d


def make(keeps: set[str] = frozenset({"H"}), connected: bool = True):  # type: ignore[no-untyped-def, assignment]
    clock = Clock()
    clock.advance(1_700_000_000)
    hub = Hub()
    history = FakeHistory(set(keeps))
    outage = OutageRecovery(clock, hub, history, commands_connected=lambda: connected)
    outage.started()
    return SimpleNamespace(clock=clock, hub=hub, history=history, outage=outage)


def test_while_the_listener_is_down_the_node_refuses_to_acknowledge():
    node = make()
    assert node.outage.unavailable() is None
    node.outage.listener_lost()
    assert node.outage.unavailable() == "this node is not receiving from Redis (reconnecting)"
    node.outage.listener_back()
    assert node.outage.unavailable() is None
    assert make(connected=False).outage.unavailable() == "this node is not connected to Redis (reconnecting)"


def test_back_from_an_outage_topics_with_history_catch_up_and_the_others_are_told():
    node = make()
    h = subscribed(node.hub, "n:1", "H")
    plain = subscribed(node.hub, "n:2", "plain")
    node.hub.publish("H", b"1", at(1))
    node.outage.listener_lost()
    node.clock.advance(3)
    done = node.outage.listener_back()
    assert plain.lost_reasons == [NO_HISTORY]
    [[(topic, last, _)]] = node.history.asked
    assert (topic, last) == ("H", at(1))
    node.hub.publish("H", b"3", at(3))  # live again, kept until the read answers
    node.history.answers[0].callback([Missed(((at(2), b"2"), (at(3), b"3")))])
    assert done.called
    assert data(h) == b"".join([frame("H", p, at(n)) for n, p in ((1, b"1"), (2, b"2"), (3, b"3"))])
    assert node.outage.info() == {"outages": 1, "outage_seconds": 3.0, "listening": True, "caught_up_topics": 1,
                             "caught_up_messages": 2}


def test_a_topic_that_had_nothing_yet_starts_after_the_last_message_any_topic_had_or_just_before_the_outage():
    node = make(keeps={"H", "G"})
    subscribed(node.hub, "n:1", "H")
    node.outage.listener_lost()
    node.outage.listener_back()
    assert node.history.asked[0][0][2] == f"{(1_700_000_000 - 1) * 1000}-0"
    node.history.answers[0].callback([Missed(())])
    subscribed(node.hub, "n:2", "G")
    node.hub.publish("H", b"1", Position(f"{1_700_000_005_000}-3", "e", 1))
    node.outage.listener_lost()
    node.outage.listener_back()
    assert node.history.asked[1] == [("H", Position("1700000005000-3", "e", 1), "(1700000005000-3"),
                                 ("G", None, "(1700000005000-3")]


def test_patterns_are_told_they_may_have_lost_messages():
    node = make()
    conn = subscribed(node.hub, "n:1", "orders.*")
    node.outage.listener_lost()
    node.outage.listener_back()
    assert conn.lost_topics == ["orders.*"] and conn.lost_reasons == [PATTERN]


def test_a_read_that_keeps_failing_is_retried_then_told_lost():
    node = make()
    conn = subscribed(node.hub, "n:1", "H")
    node.outage.listener_lost()
    node.outage.listener_back()
    for attempt in range(3):
        node.history.answers[attempt].errback(TimeoutError("redis: EVAL got no answer"))
        node.clock.advance(1)
    assert len(node.history.asked) == 3
    assert conn.lost_reasons == [UNREADABLE]
    node.hub.publish("H", b"x", at(1))
    assert data(conn) == b"".join([frame("H", b"x", at(1))])


def test_an_outage_during_a_catch_up_leaves_its_topics_paused_for_the_next_one():
    node = make()
    conn = subscribed(node.hub, "n:1", "H")
    node.hub.publish("H", b"1", at(1))
    node.outage.listener_lost()
    node.outage.listener_back()
    node.hub.publish("H", b"2", at(2))
    node.outage.listener_lost()
    node.history.answers[0].callback([Missed(((at(2), b"2"),))])  # too late: a new node.outage began
    node.outage.listener_back()
    assert node.history.asked[1] == [("H", at(1), node.history.asked[1][0][2])]
    node.history.answers[1].callback([Missed(((at(2), b"2"), (at(3), b"3")))])
    assert data(conn) == b"".join([frame("H", p, at(n)) for n, p in ((1, b"1"), (2, b"2"), (3, b"3"))])
    assert node.outage.outages == 2


def test_a_topic_still_held_by_a_recovering_connection_is_caught_up_into_its_hold():
    hub = Hub()
    conn = FakeSubscriber("n:1")
    hub.add(conn)
    hub.subscribe(conn, ["A"], held=["A"])
    assert hub.topics() == ("A",)
    hub.pause(hub.topics())
    hub.catch_up("A", [(at(1), b"1")])
    assert hub.release(conn, "A") == [(at(1), frame("A", b"1", at(1)))]


def test_live_messages_of_a_new_epoch_kept_during_a_catch_up_are_no_gap_and_the_loss_is_told_once():
    hub = Hub()
    conn = subscribed(hub, "n:1", "A")
    hub.publish("A", b"9", at(9, "old"))
    hub.pause(["A"])
    hub.publish("A", b"1", at(1, "new"))  # acknowledged by the restarted Redis while the read was in flight
    hub.catch_up("A", [], lost="history was lost (Redis lost its data)")
    assert hub.gaps == 0 and conn.lost_reasons == ["history was lost (Redis lost its data)"]
    assert data(conn).endswith(frame("A", b"1", at(1, "new")))
    hub.publish("A", b"2", at(2, "new"))
    hub.pause(["A"])
    hub.publish("A", b"1", at(1, "newer"))
    hub.catch_up("A", [])
    assert hub.gaps == 0 and conn.lost_reasons[-1] == "history epoch changed (Redis lost it)"
