"""The HTTP API's push-job routes against a fake backend: validation, answers, and the jobs' own refusals."""

from __future__ import annotations

import pytest
from twisted.internet.defer import fail

from pushd.jobs.audience import Recipient
from pushd.jobs.model import JobError
from pushd.jobs.store import JobConflict, JobNotFound
from tests.unit.test_api import Api

JOB = {"gateway": "webhook", "audience": "daily", "title": "Hi $name"}


@pytest.fixture
def api():
    return Api()


def test_a_job_is_created_and_a_known_key_answers_the_first_job(api):
    answer = api.request("POST", "/api/jobs", {**JOB, "key": "k", "rate": "100/s"})
    assert answer.status == 201 and answer.json == {"id": "j1", "state": "running", "duplicate": False}
    assert api.backend.calls == [("submit_job", {**JOB, "key": "k", "rate": "100/s"}, None)]
    api.backend.answers["submit_job"] = ("j0", False, "done")
    answer = api.request("POST", "/api/jobs", {**JOB, "key": "k"})
    assert answer.status == 200 and answer.json == {"id": "j0", "state": "done", "duplicate": True}


def test_inline_recipients_become_rows_of_the_jobs_own_audience(api):
    body = {"gateway": "pushd", "title": "t", "recipients": ["alice", {"address": "bob", "name": "Bob"}]}
    assert api.request("POST", "/api/jobs", body).status == 201
    (_, fields, rows), = api.backend.calls
    assert "recipients" not in fields and "audience" not in fields
    assert rows == [Recipient("alice", "{}"), Recipient("bob", '{"name":"Bob"}')]


@pytest.mark.parametrize("body, message", [
    ({**JOB, "gateway": "sms"}, "gateway: 'sms' is not one of"),
    ({**JOB, "colour": "red"}, "colour: unknown field"),
    ({**JOB, "private": True}, "private: unknown field"),
    ({**JOB, "batch": 0}, "batch: must be a whole number from 1 to 10000"),
    ({"gateway": "webhook", "title": "t"}, "audience: required"),
    ({"gateway": "pushd", "title": "t", "recipients": []}, "recipients: must be a non-empty list"),
    ({"gateway": "pushd", "title": "t", "recipients": [1]}, "recipients[0]: must be an address or an object"),
    ({"gateway": "pushd", "title": "t", "recipients": [{"name": "x"}]}, "recipients[0]: no address"),
    ({"gateway": "pushd", "title": "t", "recipients": ["a"], "audience": "x"}, "recipients: give recipients or"),
    ({"gateway": "pushd", "title": "t", "recipients": ["a"] * 10001}, "recipients: 10001 recipients; at most"),
])
def test_bad_jobs_are_refused_naming_the_field_and_nothing_is_asked(body, message):
    api = Api(max_body=1024 * 1024)
    answer = api.request("POST", "/api/jobs", body)
    assert answer.status == 400 and answer.error()[1].startswith(message), answer.error()
    assert api.backend.calls == []


def test_an_unknown_audience_is_a_bad_request(api):
    api.backend.answers["submit_job"] = fail(JobError("audience: no audience 'daily'"))
    assert api.request("POST", "/api/jobs", JOB).error() == ("bad_request", "audience: no audience 'daily'")


def test_reading_and_changing_jobs(api):
    assert api.request("GET", "/api/jobs/j1").json == {"id": "j1", "state": "running"}
    assert api.request("GET", "/api/jobs?limit=5").json == {"jobs": []}
    assert api.request("POST", "/api/jobs/j1/pause").json == {"id": "j1", "state": "paused"}
    api.backend.answers["job_failures"] = lambda job_id, start, count: [{"address": "a"}] * count
    assert api.request("GET", "/api/jobs/j1/failures?start=10&count=2").json == {
        "failures": [{"address": "a"}] * 2, "next": 12}
    assert api.backend.calls[1] == ("list_jobs", 5)
    assert api.backend.calls[-1] == ("job_failures", "j1", 10, 2)


def test_unknown_jobs_actions_and_conflicts(api):
    api.backend.answers["show_job"] = fail(JobNotFound("nope"))
    assert api.request("GET", "/api/jobs/nope").error() == ("not_found", "no job 'nope'")
    api.backend.answers["transition_job"] = fail(JobConflict("job j1 is done: cannot resume it"))
    answer = api.request("POST", "/api/jobs/j1/resume")
    assert answer.status == 409 and answer.error() == ("conflict", "job j1 is done: cannot resume it")
    answer = api.request("POST", "/api/jobs/j1/explode")
    assert answer.status == 404 and answer.error()[1].startswith("no job action 'explode'")
    assert api.request("GET", "/api/jobs?limit=0").error()[1] == "limit: must be from 1 to 500"
