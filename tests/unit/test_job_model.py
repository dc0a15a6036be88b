"""Job specs, rates, start times and the classification of a batch's results (pure functions)."""

from __future__ import annotations

import json

import pytest

from pushd.gateways.base import Message, Outcome, Result, Target, idempotency_key, parse_retry_after, render
from pushd.jobs import model
from pushd.jobs.worker import _delayed_member, backoff, tally, targets_of

BASE = {"gateway": "webhook", "audience": "a", "title": "Hi $name"}


@pytest.mark.parametrize("fields, message", [
    ({"gateway": "sms", "audience": "a", "title": "t"}, "gateway: 'sms' is not one of"),
    ({"gateway": "webhook", "title": "t"}, "audience: required"),
    ({"gateway": "webhook", "audience": "a"}, "title: required"),
    ({**BASE, "batch": 0}, "batch: must be a whole number from 1 to 10000"),
    ({**BASE, "batch": True}, "batch: must be a whole number"),
    ({**BASE, "rate": "fast"}, "rate: 'fast' is not N/s"),
    ({**BASE, "rate": "0/s"}, "rate: must be more than 0"),
    ({**BASE, "start_at": "tomorrow"}, "start_at: 'tomorrow' is not an ISO 8601 time"),
    ({**BASE, "data": {"k": 1}}, "data: 'k' must map a name to a string"),
    ({**BASE, "data": [1]}, "data: must be an object of strings"),
    ({**BASE, "fallback": "fcm"}, "fallback: only the pushd gateway has a fallback"),
    ({**BASE, "gateway": "pushd", "fallback": "sms"}, "fallback: 'sms' is not one of"),
    ({**BASE, "key": "has space"}, "key: 1 to 200 printable ASCII characters"),
    ({**BASE, "colour": "red"}, "colour: unknown field"),
    ({**BASE, "title": "x" * 5000}, "title: longer than 4096 bytes"),
])
def test_bad_fields_are_named(fields, message):
    with pytest.raises(model.JobError) as e:
        model.parse_spec(fields, now=0)
    assert str(e.value).startswith(message)


def test_a_full_spec_round_trips_through_json():
    spec = model.parse_spec({**BASE, "gateway": "pushd", "fallback": "fcm", "data": {"k": "v"}, "batch": "250",
                             "rate": "120/min", "test_to": "me", "start_at": "+10m", "key": "k-1", "ttl": 60,
                             "retries": 2}, now=1000)
    assert (spec.batch, spec.rate, spec.start_at, spec.retries) == (250, 2.0, 1600, 2)
    assert model.JobSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("text, per_second", [("2000/s", 2000), ("60/min", 1), ("3600/h", 1), (5, 5), ("2.5", 2.5)])
def test_rates(text, per_second):
    assert model.parse_rate(text) == per_second


def test_start_times():
    assert model.parse_start_at("2026-12-02T10:00:00Z", 0) == model.parse_start_at("2026-12-02T10:00:00", 0)
    assert model.parse_start_at("2026-12-02T11:00:00+01:00", 0) == model.parse_start_at("2026-12-02T10:00:00", 0)
    assert model.parse_start_at("+30s", 100) == 130
    assert model.parse_start_at("1700000000", 0) == 1700000000


def test_states_a_job_starts_in():
    now = 1000.0
    assert model.first_state(model.parse_spec(BASE, now), now) == model.RUNNING
    assert model.first_state(model.parse_spec({**BASE, "start_at": "+1h"}, now), now) == model.SCHEDULED
    tested = model.parse_spec({**BASE, "test_to": "me", "start_at": "+1h"}, now)
    assert model.first_state(tested, now) == model.TESTING
    assert model.after_confirmation(tested, now) == model.SCHEDULED
    assert model.after_confirmation(tested, now + 7200) == model.RUNNING


def test_job_ids_sort_by_creation_time():
    assert model.new_job_id(1000.0) < model.new_job_id(2000.0)
    assert model.new_job_id(1.0) != model.new_job_id(1.0)


def test_progress_adds_up():
    spec = model.parse_spec(BASE, 0)
    raw = {"id": "j1", "state": "running", "spec": spec.to_json(), "total": "10", "sent": "5", "failed": "1",
           "invalid": "2", "expanded": "1", "e:UNREGISTERED": "2", "v:online": "3", "started": "100",
           "created": "99"}
    report = model.progress(raw)
    assert report["remaining"] == 2 and report["errors"] == {"UNREGISTERED": 2} and report["sent_via"] == {"online": 3}
    assert model.progress({**raw, "expanded": "0"})["remaining"] is None


def targets(n):
    return [Target(f"t{i}", {}, f"k{i}") for i in range(n)]


def test_tally_classifies_each_result_once():
    results = [Result(Outcome.SENT), Result(Outcome.SENT, "online"), Result(Outcome.INVALID, "UNREGISTERED"),
               Result(Outcome.FAILED, "too-large"), Result(Outcome.RETRY, "http-503"),
               Result(Outcome.RETRY, "http-429", retry_after=7)]
    t = tally(results, targets(6), attempt=0, retries=5, now=100.0, rng=lambda: 0.5)
    assert (t.sent, t.invalid, t.failed, t.retrying) == (2, 1, 1, 2)
    assert t.via == {"online": 1}
    assert t.errors == {"UNREGISTERED": 1, "too-large": 1, "http-503": 1, "http-429": 1}
    assert t.dead == ["t2"] and t.hold == 7
    assert [json.loads(line)["address"] for line in t.failures] == ["t2", "t3"]
    (retry_due, retry), (held_due, held) = sorted(t.delayed)
    assert (retry_due, held_due) == (101.0, 107.0)   # backoff(0) is 1 s at rng 0.5; the hold is Retry-After's 7 s
    # The back-pressured target keeps its attempt; the transient one is on its next.
    assert held.startswith("0 1 ") and json.loads(held.split(" ", 3)[3]) == ["t5", "{}"]
    assert retry.startswith("1 1 ") and json.loads(retry.split(" ", 3)[3]) == ["t4", "{}"]


def test_a_transient_error_past_the_retry_limit_is_a_failure():
    t = tally([Result(Outcome.RETRY, "timeout")], targets(1), attempt=3, retries=3, now=0.0)
    assert (t.failed, t.retrying, t.delayed) == (1, 0, [])
    assert json.loads(t.failures[0])["reason"] == "timeout (gave up after 4 attempts)"


def test_backoff_doubles_with_jitter_and_a_cap():
    assert backoff(0, lambda: 0.0) == 0.5 and backoff(0, lambda: 1.0) == 1.5
    assert backoff(3, lambda: 0.5) == 8
    assert backoff(30, lambda: 0.5) == 300


def test_a_delayed_batch_reads_back_as_the_same_targets():
    original = [Target("a", {"name": "Ann"}, idempotency_key("j", "a")), Target("b", {}, idempotency_key("j", "b"))]
    member = _delayed_member(2, original)
    attempt, count, _nonce, pairs = member.split(" ", 3)
    assert (attempt, count) == ("2", "2")
    assert targets_of("j", pairs) == original
    assert targets_of("j", "{}") == []


def test_idempotency_keys_are_stable_and_bounded():
    long = json.dumps({"endpoint": "https://push.example/" + "x" * 500, "keys": {}})
    assert idempotency_key("j1", long) == idempotency_key("j1", long) != idempotency_key("j2", long)
    assert len(idempotency_key("j1", long)) == len("j1-") + 24


def test_render_fills_fields_and_leaves_unknown_ones():
    message = Message("j", "Hi $name", "${city} ${missing}", {"u": "$name"})
    rendered = render(message, Target("a", {"name": "Ann", "city": "Oslo"}, "k"))
    assert (rendered.title, rendered.body, dict(rendered.data)) == ("Hi Ann", "Oslo ${missing}", {"u": "Ann"})
    assert render(message, Target("a", {}, "k")).title == "Hi $name"


def test_retry_after_seconds_and_dates():
    assert parse_retry_after(b"7") == 7
    assert parse_retry_after(None, default=2) == 2
    assert parse_retry_after("soon", default=3) == 3
    assert parse_retry_after("999999") == 3600
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0


def test_refused_credentials_pause_the_job_and_keep_the_recipients():
    results = [Result(Outcome.FAILED, "auth"), Result(Outcome.SENT)]
    t = tally(results, targets(2), attempt=2, retries=5, now=10.0)
    assert t.pause == "auth" and (t.failed, t.sent, t.retrying) == (0, 1, 1)
    (due, member), = t.delayed
    assert due == 10.0 and member.startswith("2 1 ")   # the same attempt, due at once: sent after the resume


def test_answers_that_show_a_wrong_setting_pause_the_job_too():
    t = tally([Result(Outcome.FAILED, "misconfigured")] * 3, targets(3), attempt=0, retries=5, now=10.0)
    assert t.pause == "misconfigured" and (t.failed, t.invalid, t.retrying, t.dead) == (0, 0, 3, [])
