"""A node's part of a broadcast: every connection once, in cooperative steps, with counts and reports."""

from twisted.internet import task

from pushd import broadcast
from pushd.broadcast import NodeBroadcast
from pushd.hub import FrameCache, Hub
from pushd.testing import FakeSubscriber as Conn


class Turns:
    """A scheduler whose turns the test runs one at a time."""

    def __init__(self):
        self.pending = []

    def schedule(self, work):
        self.pending.append(work)

        class Call:
            def cancel(call):
                self.pending.remove(work)

        return Call()

    def advance(self):
        pending, self.pending = self.pending, []
        for work in pending:
            work()


def stepping_cooperator(turns):
    """One step per turn, so the test can look between steps."""
    return task.Cooperator(terminationPredicateFactory=lambda: (lambda: True), scheduler=turns.schedule)


def test_every_connection_once_in_steps_with_counts(monkeypatch):
    monkeypatch.setattr(broadcast, "STEP", 2)
    monkeypatch.setattr(broadcast, "REPORT_EVERY", 4)
    clock = Turns()
    hub = Hub()
    conns = [Conn(f"n:{i}") for i in range(7)]
    conns[3].accept = False
    for conn in conns:
        hub.add(conn)
    reports = []
    run = NodeBroadcast("b1", FrameCache(lambda wire: b"FRAME"), hub, reports.append, stepping_cooperator(clock))
    done = run.start()
    assert reports == [{"targeted": 7, "sent": 0, "dropped_slow": 0, "dropped_gone": 0, "state": "running"}]
    clock.advance()
    assert sum(len(c.written) for c in conns) == 2
    hub.remove(conns[6])
    hub.add(Conn("n:late"))
    for _ in range(10):
        clock.advance()
    assert done.called
    assert [len(c.written) for c in conns] == [1, 1, 1, 0, 1, 1, 0]
    assert reports[-1] == {"targeted": 7, "sent": 5, "dropped_slow": 1, "dropped_gone": 1, "state": "done"}
    assert any(r["state"] == "running" and r["sent"] > 0 for r in reports[1:-1])
    assert hub.connection("n:late").written == []


def test_an_empty_node_reports_done():
    clock = Turns()
    reports = []
    done = NodeBroadcast("b2", b"F", Hub(), reports.append, stepping_cooperator(clock)).start()
    for _ in range(3):
        clock.advance()
    assert done.called and reports[-1]["state"] == "done" and reports[-1]["targeted"] == 0
