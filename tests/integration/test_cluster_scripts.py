"""The broadcast scripts on a real Redis: the dedup window's edges, and nothing outliving it."""

from __future__ import annotations

import json

from pushd.cluster import BROADCAST_SCRIPT, REPORT_SCRIPT, broadcast_key, broadcast_state_key
from tests.integration.pushd_process import eventually

PREFIX = "p:"


def broadcast(r, broadcast_id, key="", window=60):
    keys = [broadcast_key(PREFIX, key) if key else "", broadcast_state_key(PREFIX, broadcast_id)]
    return r.eval(BROADCAST_SCRIPT, 2, *keys, broadcast_id, window, "1.0", "p:control", "{}\n1")


def test_a_repeated_key_within_the_window_answers_the_first_id_and_publishes_nothing(redis_server):
    r = redis_server.client()
    pubsub = r.pubsub()
    pubsub.subscribe("p:control")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    assert broadcast(r, "b1", key="k") == ["b1", 1]
    assert broadcast(r, "b2", key="k") == ["b1", 0]
    assert broadcast(r, "b3", key="other") == ["b3", 1]
    assert broadcast(r, "b4") == ["b4", 1] and broadcast(r, "b5") == ["b5", 1]
    published = []
    while (message := pubsub.get_message(timeout=1)) is not None:
        published.append(message["data"])
    assert len(published) == 4
    assert not r.exists(broadcast_state_key(PREFIX, "b2"))
    assert r.hget(broadcast_state_key(PREFIX, "b1"), ".nodes") == "1"


def test_the_key_and_the_record_expire_with_the_window(redis_server):
    r = redis_server.client()
    assert broadcast(r, "b1", key="k", window=1) == ["b1", 1]
    assert 0 < r.pttl(broadcast_key(PREFIX, "k")) <= 1000
    assert 0 < r.pttl(broadcast_state_key(PREFIX, "b1")) <= 1000
    eventually(lambda: not r.exists(broadcast_key(PREFIX, "k"), broadcast_state_key(PREFIX, "b1")), timeout=5)
    assert broadcast(r, "b2", key="k", window=1) == ["b2", 1]


def test_a_late_node_report_does_not_bring_an_expired_record_back(redis_server):
    r = redis_server.client()
    broadcast(r, "b1", window=60)
    state = broadcast_state_key(PREFIX, "b1")
    r.eval(REPORT_SCRIPT, 1, state, "node-a", json.dumps({"state": "done", "sent": 3}))
    assert json.loads(r.hget(state, "node-a"))["sent"] == 3
    r.delete(state)
    r.eval(REPORT_SCRIPT, 1, state, "node-a", json.dumps({"state": "done", "sent": 3}))
    assert not r.exists(state)
