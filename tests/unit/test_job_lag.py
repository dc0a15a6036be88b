"""The gate that keeps a node's job workers off the reactor while it runs late (pushd/jobs/lag.py)."""

from __future__ import annotations

from twisted.internet import task

from pushd.jobs.lag import ReactorLag


def running_gate(limit=0.01):
    clock = task.Clock()
    gate = ReactorLag(clock, limit, interval=0.01, window=3)
    gate.start()
    return clock, gate


def test_an_on_time_reactor_lets_every_batch_through_at_once():
    clock, gate = running_gate()
    clock.pump([0.01] * 5)
    assert gate.late == 0.0
    assert gate.clear().called
    assert gate.held == 0


def test_a_late_reactor_holds_batches_until_its_recent_timers_are_on_time_again():
    clock, gate = running_gate()
    clock.advance(0.01)
    clock.advance(0.05)  # the tick due at 0.02 runs at 0.06: 40 ms late
    assert round(gate.late, 3) == 0.04
    held = gate.clear()
    assert not held.called and gate.held == 1
    clock.pump([0.01, 0.01])
    assert not held.called, "the late tick is still among the last three"
    clock.advance(0.01)
    assert held.called


def test_stopping_the_gate_releases_whoever_waits_and_lets_everything_through():
    clock, gate = running_gate()
    clock.advance(0.01)
    clock.advance(0.1)
    held = gate.clear()
    gate.stop()
    assert held.called
    assert gate.clear().called
    assert not clock.getDelayedCalls()
