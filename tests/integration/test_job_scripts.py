"""The push-job Lua scripts run by a real redis-server: each step keeps the counts adding up (docs/jobs.md)."""

from __future__ import annotations

import json

import pytest

from pushd.jobs import model, scripts
from pushd.jobs.store import JobKeys

K = JobKeys("p:")


@pytest.fixture
def r(redis_server):
    client = redis_server.client()
    client.flushall()
    return client


def create(r, job_id="j1", audience="a", state="running", key="", private=False, **fields):
    spec = model.parse_spec({"gateway": "webhook", "audience": audience, "title": "t", **fields}, own_audience=private)
    return r.eval(scripts.CREATE, 6, K.job(job_id), K.index, K.live, K.idempotency(key) if key else "",
                  K.queue(job_id), K.audience(audience), job_id, spec.to_json(), state, "100.000", "60",
                  "0" if private else "1")


def expand(r, job_id="j1", audience="a", batch=3, most=4):
    cursor = r.hget(K.job(job_id), "cursor")
    return r.eval(scripts.EXPAND, 3, K.job(job_id), K.audience(audience), K.queue(job_id), cursor, str(batch),
                  str(batch), str(most))


def read_all(r, job_id="j1"):
    reply = r.xreadgroup(scripts.GROUP, "c", {K.queue(job_id): ">"}, count=10000) or []
    return [(entry_id, fields) for _, entries in reply for entry_id, fields in entries]


def settle(r, entry_id, job_id="j1", sent=0, failed=0, invalid=0, retrying=0, redelivered=0, errors=None,
           delayed=(), failures=(), dead=(), audience="a", private=False):
    return r.eval(scripts.SETTLE, 6, K.job(job_id), K.queue(job_id), K.delayed(job_id), K.failures(job_id),
                  K.audience(audience), K.live, entry_id, "200.000", sent, failed, invalid, retrying, redelivered,
                  json.dumps(errors or {}), "{}", json.dumps(list(delayed)), json.dumps(list(failures)),
                  json.dumps(list(dead)), "1" if private else "0")


def test_create_refuses_an_unknown_audience_and_returns_the_first_job_of_a_key(r):
    assert create(r) == ["", -1]
    r.hset(K.audience("a"), "x", "{}")
    assert create(r, "j1", key="k") == ["j1", 1]
    assert create(r, "j2", key="k") == ["j1", 0]
    assert not r.exists(K.job("j2"))
    assert r.smembers(K.live) == {"j1"}
    assert r.xinfo_groups(K.queue("j1"))[0]["name"] == scripts.GROUP


def test_expansion_makes_exact_batches_and_adds_every_recipient_once(r):
    r.hset(K.audience("a"), mapping={f"u{i}": json.dumps({"n": i}) for i in range(1000)})
    create(r)
    while True:
        *_, complete = expand(r, batch=7)
        if complete:
            break
    entries = read_all(r)
    sizes = [len(json.loads(fields["d"])) // 2 for _, fields in entries]
    assert all(size == 7 for size in sizes[:-1]) and 0 < sizes[-1] <= 7
    addresses = [a for _, fields in entries for a in json.loads(fields["d"])[::2]]
    assert sorted(addresses) == sorted(f"u{i}" for i in range(1000))
    assert r.hget(K.job("j1"), "total") == "1000" and r.hget(K.job("j1"), "expanded") == "1"
    assert expand(r) == [-1]


def test_expansion_stops_for_a_paused_job_and_refuses_a_moved_cursor(r):
    r.hset(K.audience("a"), mapping={f"u{i}": "{}" for i in range(500)})
    create(r)
    assert r.eval(scripts.EXPAND, 3, K.job("j1"), K.audience("a"), K.queue("j1"), "12345", "3", "3", "1") == [-2]
    r.hset(K.job("j1"), "state", "paused")
    assert expand(r) == [-1]


def test_settle_counts_once_and_finishes_the_job(r):
    r.hset(K.audience("a"), mapping={"u1": "{}", "u2": "{}", "u3": "{}"})
    create(r)
    expand(r, batch=3)
    (entry_id, _), = read_all(r)
    failure = json.dumps({"address": "u3", "outcome": "invalid", "reason": "UNREGISTERED"})
    assert settle(r, entry_id, sent=1, failed=1, invalid=1, errors={"UNREGISTERED": 1, "http-400": 1},
                  failures=[failure], dead=["u3"]) == [1, "done"]
    job = r.hgetall(K.job("j1"))
    assert (job["sent"], job["failed"], job["invalid"], job["removed"]) == ("1", "1", "1", "1")
    assert job["e:UNREGISTERED"] == "1" and job["state"] == "done"
    assert sorted(r.hkeys(K.audience("a"))) == ["u1", "u2"]
    assert r.lrange(K.failures("j1"), 0, -1) == [failure]
    assert not r.sismember(K.live, "j1")
    # The same batch settled again (a second worker that had claimed it): only counted as duplicates.
    assert settle(r, entry_id, sent=3) == [0, "done"]
    assert r.hget(K.job("j1"), "sent") == "1" and r.hget(K.job("j1"), "duplicates") == "3"


def test_a_job_with_retries_waiting_is_not_done_until_they_are_promoted_and_settled(r):
    r.hset(K.audience("a"), mapping={"u1": "{}", "u2": "{}"})
    create(r)
    expand(r, batch=2)
    (entry_id, _), = read_all(r)
    member = '1 1 abc ["u2","{}"]'
    assert settle(r, entry_id, sent=1, retrying=1, delayed=[[150.0, member]], errors={"http-503": 1}) == [1, "running"]
    assert r.hget(K.job("j1"), "retrying") == "1"
    assert r.eval(scripts.PROMOTE, 3, K.delayed("j1"), K.queue("j1"), K.job("j1"), "149", "10") == 0
    assert r.eval(scripts.PROMOTE, 3, K.delayed("j1"), K.queue("j1"), K.job("j1"), "151", "10") == 1
    (retry_id, fields), = read_all(r)
    assert fields == {"d": '["u2","{}"]', "a": "1"}
    assert r.hget(K.job("j1"), "retrying") == "0"
    assert settle(r, retry_id, sent=1) == [1, "done"]
    assert r.hget(K.job("j1"), "sent") == "2" and r.hget(K.job("j1"), "retried") == "1"


def test_transitions_only_from_the_states_that_allow_them(r):
    r.hset(K.audience("a"), "u", "{}")
    create(r, state="testing")

    def transition(action, next_state="running", test="{}"):
        return r.eval(scripts.TRANSITION, 5, K.job("j1"), K.live, K.queue("j1"), K.delayed("j1"), K.audience("a"),
                      action, "300.000", next_state, test, "0")

    assert transition("confirm") == [0, "testing"]
    assert transition("tested", test='{"outcome":"sent"}') == [1, "awaiting_confirmation"]
    assert transition("confirm") == [1, "running"]
    assert r.hget(K.job("j1"), "started") == "300.000"
    assert transition("pause") == [1, "paused"]
    assert transition("pause") == [0, "paused"]
    assert transition("resume") == [1, "running"]
    expand(r)
    assert transition("cancel") == [1, "cancelled"]
    assert r.hget(K.job("j1"), "cancelled") == "1"
    assert not r.exists(K.queue("j1")) and not r.sismember(K.live, "j1")
    assert transition("resume") == [0, "cancelled"]


def test_the_token_bucket_grants_a_batch_then_says_how_long_to_wait(r):
    take = lambda n, rate: r.eval(scripts.TAKE, 3, "b:job", "b:gw", "b:hold", str(n), str(rate), "0")
    assert take(100, 100) == 0            # a full bucket: one batch at once
    wait = take(100, 100)
    assert 900 <= wait <= 1000            # then about a second for the next 100 at 100/s
    assert take(100, 0) == 0              # no rate: never waits
    r.set("b:hold", "1", px=5000)
    assert 4000 < take(1, 0) <= 5000      # a gateway's Retry-After holds everyone


def test_the_gateway_hold_only_grows(r):
    r.eval(scripts.HOLD, 1, "h", "5000")
    r.eval(scripts.HOLD, 1, "h", "100")
    assert r.pttl("h") > 4000
