"""Push jobs through the fcm gateway with a real worker process and the fake FCM: the OAuth2 flow, one send per
token, dead tokens leaving the audience, and QUOTA_EXCEEDED slowing the job without failing anyone."""

from __future__ import annotations

from tests.fakes.fcm import FakeFcmProcess
from tests.integration.jobs import JobWorkerProcess, add_audience, create_job, finished

LIVE = 300
DEAD = 20


def audience(r, live=LIVE, dead=DEAD):
    tokens = [f"tok-{i:05d}" for i in range(live)] + [f"dead-{i:05d}" for i in range(dead)]
    add_audience(r, "devices", {token: "{}" for token in tokens})


def test_every_live_token_gets_one_message_and_dead_ones_leave_the_audience(tmp_path, redis_server):
    r = redis_server.client()
    audience(r)
    with FakeFcmProcess(tmp_path) as service, \
            JobWorkerProcess(tmp_path / "w", *service.settings(), "--job-workers", "2", redis=redis_server.url):
        job_id = create_job(r, gateway="fcm", audience="devices", title="Sale", body="50% off", batch=50)
        report = finished(r, job_id)
        stats = service.stats()
    assert (report["state"], report["total"]) == ("done", LIVE + DEAD)
    assert (report["sent"], report["invalid"], report["failed"]) == (LIVE, DEAD, 0)
    assert report["sent"] + report["invalid"] == report["total"]
    assert report["errors"] == {"UNREGISTERED": DEAD}
    assert report["removed"] == DEAD
    assert sorted(r.hkeys("pushd:audience:devices")) == [f"tok-{i:05d}" for i in range(LIVE)]
    assert (stats["recipients"], stats["unique"], stats["duplicates"]) == (LIVE, LIVE, 0)
    assert stats["errors"] == {"UNREGISTERED": DEAD}
    assert (stats["tokens_issued"], stats["refused"]) == (1, 0), "one access token for the whole job"


def test_quota_exceeded_slows_the_job_and_everyone_is_still_sent(tmp_path, redis_server):
    r = redis_server.client()
    audience(r, dead=0)
    with FakeFcmProcess(tmp_path, "--quota-first", "30") as service, \
            JobWorkerProcess(tmp_path / "w", *service.settings(), "--job-workers", "2", redis=redis_server.url):
        # retries=0: an ordinary retry would fail the recipient at once; back-pressure must not.
        job_id = create_job(r, gateway="fcm", audience="devices", title="t", batch=50, retries=0)
        report = finished(r, job_id)
        stats = service.stats()
    assert (report["state"], report["sent"], report["failed"], report["invalid"]) == ("done", LIVE, 0, 0)
    assert report["errors"] == {"QUOTA_EXCEEDED": 30}
    assert (report["retried"], report["retrying"]) == (30, 0)
    # Retry-After: 1 held the gateway: a lower bound only (a slow machine makes it longer, never shorter).
    assert report["finished"] - report["started"] >= 1
    assert (stats["unique"], stats["duplicates"]) == (LIVE, 0)
    assert stats["errors"] == {"QUOTA_EXCEEDED": 30}
