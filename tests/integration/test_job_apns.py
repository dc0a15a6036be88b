"""A push job to iPhones end to end: an audience of device tokens in a real redis-server, a real worker process
with an APNs key, and the fake APNs over real TLS + HTTP/2 on 127.0.0.1 checking the provider token of every
request and counting every notification by apns-id."""

from __future__ import annotations

import re
import time

from tests.fakes.apns import FakeApnsProcess
from tests.integration.jobs import JobWorkerProcess, add_audience, create_job, finished, job
from tests.integration.pushd_process import eventually


def device_tokens(live: int, dead: int) -> tuple[list[str], list[str]]:
    """`live` distinct hex tokens, and `dead` ones the fake answers 410 Unregistered."""
    return [f"{n:064x}" for n in range(1, live + 1)], [f"dead{n:060x}" for n in range(1, dead + 1)]


def test_every_live_token_gets_one_notification_over_http2_and_dead_ones_leave(tmp_path, redis_server):
    r = redis_server.client()
    live, dead = device_tokens(1900, 100)
    add_audience(r, "iphones", {token: "{}" for token in live + dead})
    with FakeApnsProcess(str(tmp_path / "apns")) as apns, \
            JobWorkerProcess(tmp_path, *apns.gateway_args(), redis=redis_server.url):
        started = time.monotonic()
        job_id = create_job(r, gateway="apns", audience="iphones", title="Sale", body="50% off",
                            data={"url": "/sale"}, batch=500)
        report = finished(r, job_id, timeout=180)
        waited = time.monotonic() - started
        stats = apns.stats()
        received = apns.get("/received")
        refused = apns.post_http1(f"/3/device/{live[0]}", b'{"aps": {}}')
    print(f"\napns job: {report['total']} recipients in {report['duration']:.2f} s (job duration; "
          f"{waited:.2f} s from create to seen done), {stats['requests']} HTTP/2 requests")
    assert (report["state"], report["total"], report["sent"], report["invalid"], report["removed"]) == \
        ("done", 2000, 1900, 100, 100)
    assert report["sent"] + report["invalid"] == report["total"]
    assert report["errors"] == {"Unregistered": 100}
    assert set(r.hkeys("pushd:audience:iphones")) == set(live)
    assert stats == {"requests": 2000, "refused": 100, "recipients": 1900, "unique": 1900, "duplicates": 0,
                     "http2_requests": 2000}
    assert refused == (505, "HTTP2Required")  # http2_requests counts what really came over HTTP/2
    assert set(received) == set(live)
    assert {len(payloads) for payloads in received.values()} == {1}
    first = received[live[0]][0]
    assert first["aps"] == {"alert": {"title": "Sale", "body": "50% off"}} and first["url"] == "/sale"
    assert first["pushd_key"].startswith(job_id + "-")


def test_devices_asked_too_often_back_off_and_everything_is_still_sent(tmp_path, redis_server):
    r = redis_server.client()
    live, _ = device_tokens(300, 0)
    add_audience(r, "iphones", {token: "{}" for token in live})
    with FakeApnsProcess(str(tmp_path / "apns"), "--busy-first", "40") as apns, \
            JobWorkerProcess(tmp_path, *apns.gateway_args(), redis=redis_server.url):
        job_id = create_job(r, gateway="apns", audience="iphones", title="Sale", batch=100)
        report = finished(r, job_id, timeout=120)
        stats = apns.stats()
    assert (report["state"], report["sent"], report["failed"], report["invalid"]) == ("done", 300, 0, 0)
    assert report["errors"] == {"TooManyRequests": 40}
    assert report["retried"] == 40
    # Backed off, then sent with the same apns-id: each token accepted exactly once.
    assert stats == {"requests": 340, "refused": 40, "recipients": 300, "unique": 300, "duplicates": 0,
                     "http2_requests": 340}


def test_tokens_of_the_other_environment_pause_the_job_and_leave_the_audience_alone(tmp_path, redis_server):
    r = redis_server.client()
    live, _ = device_tokens(200, 0)
    add_audience(r, "iphones", {token: "{}" for token in live})
    with FakeApnsProcess(str(tmp_path / "apns"), "--other-environment") as apns, \
            JobWorkerProcess(tmp_path, *apns.gateway_args(), redis=redis_server.url) as worker:
        job_id = create_job(r, gateway="apns", audience="iphones", title="Sale", batch=100)
        worker.wait_for(re.escape(f"job {job_id} paused: apns answers show a wrong setting (misconfigured)"),
                        timeout=60)
        report = eventually(lambda: job(r, job_id) if job(r, job_id)["state"] == "paused" else None)
    assert (report["invalid"], report["failed"], report["sent"]) == (0, 0, 0)
    assert report["errors"]["misconfigured"] >= 10
    assert r.hlen("pushd:audience:iphones") == 200, "no token was taken for dead"
