"""Push jobs through the webhook gateway with real worker processes and a real receiver: kill -9 mid-batch,
SIGTERM mid-batch, back-pressure, dead addresses. Every recipient is accounted for, none is lost."""

from __future__ import annotations

import os
import signal

from pushd.jobs import scripts
from tests.fakes.webhook import FakeWebhookProcess
from tests.integration.jobs import JobWorkerProcess, add_audience, create_job, finished, job
from tests.integration.pushd_process import eventually

SECRET = "job-fault-tests"


def worker(tmp_path, name, redis, hook, *args):
    return JobWorkerProcess(tmp_path / name, "--webhook-url", hook.url, "--webhook-secret", SECRET, *args,
                            redis=redis)


def audience(r, n=1000):
    add_audience(r, "people", {f"+47{i:08d}": "{}" for i in range(n)})


def test_a_worker_killed_mid_batch_leaves_its_batches_to_another_after_the_visibility_timeout(tmp_path, redis_server):
    r = redis_server.client()
    audience(r)
    with FakeWebhookProcess(SECRET, "--latency", "30000", "--slow-first", "2") as hook:
        first = worker(tmp_path, "w1", redis_server.url, hook, "--job-workers", "2",
                       "--job-visibility-timeout", "2").start()
        job_id = create_job(r, gateway="webhook", audience="people", title="t", batch=100)
        eventually(lambda: hook.stats()["requests"] == 2)   # both consumers hold a batch the receiver sits on
        os.kill(first.pid, signal.SIGKILL)
        first.proc.wait(10)
        with worker(tmp_path, "w2", redis_server.url, hook, "--job-workers", "2", "--job-visibility-timeout", "2"):
            report = finished(r, job_id)
        stats = hook.stats()
    assert (report["state"], report["total"], report["sent"], report["failed"]) == ("done", 1000, 1000, 0)
    assert report["redelivered"] == 200, report   # the two batches the dead worker held, sent again
    assert stats["unique"] == 1000                # nobody lost
    assert stats["duplicates"] == 200             # at most one batch per consumer of the dead process
    assert not r.exists(f"pushd:job:{job_id}:queue")   # a finished job's queue is gone, nothing left pending


def test_sigterm_finishes_the_batch_in_hand_and_another_worker_resumes_the_job(tmp_path, redis_server):
    r = redis_server.client()
    audience(r)
    with FakeWebhookProcess(SECRET, "--latency", "3000", "--slow-first", "1") as hook:
        first = worker(tmp_path, "w1", redis_server.url, hook, "--job-workers", "1").start()
        job_id = create_job(r, gateway="webhook", audience="people", title="t", batch=100)
        eventually(lambda: hook.stats()["requests"] == 1)
        assert first.stop() == -15
        assert "pushd worker stopped" in first.log
        # The batch in its hands was answered (3 s later) and recorded before it exited.
        assert int(r.hget(f"pushd:job:{job_id}", "sent")) == 100
        with worker(tmp_path, "w2", redis_server.url, hook, "--job-workers", "2"):
            report = finished(r, job_id)
        stats = hook.stats()
    assert (report["sent"], report["redelivered"], report["duplicates"]) == (1000, 0, 0)
    assert (stats["unique"], stats["duplicates"]) == (1000, 0)


def test_back_pressure_slows_the_job_and_dead_addresses_leave_the_audience(tmp_path, redis_server):
    r = redis_server.client()
    audience(r)
    with FakeWebhookProcess(SECRET, "--fail-first", "3", "--invalid-every", "10") as hook, \
            worker(tmp_path, "w", redis_server.url, hook, "--job-workers", "2"):
        # retries=0: a transient error would fail the recipient at once; back-pressure must not.
        job_id = create_job(r, gateway="webhook", audience="people", title="t", batch=100, retries=0)
        report = finished(r, job_id)
        refused = hook.stats()["refused"]
    assert (report["state"], report["sent"], report["invalid"], report["failed"]) == ("done", 900, 100, 0)
    assert report["errors"] == {"http-503": 300, "unknown-number": 100}
    assert report["removed"] == 100 and r.hlen("pushd:audience:people") == 900
    assert report["retrying"] == 0 and report["retried"] == 300   # held back and sent again, not failed
    assert refused == 0


def test_the_rate_holds_across_two_worker_processes(tmp_path, redis_server):
    r = redis_server.client()
    audience(r, 600)
    with FakeWebhookProcess(SECRET) as hook, \
            worker(tmp_path, "w1", redis_server.url, hook, "--job-workers", "2"), \
            worker(tmp_path, "w2", redis_server.url, hook, "--job-workers", "2"):
        job_id = create_job(r, gateway="webhook", audience="people", title="t", batch=50, rate="200/s")
        report = finished(r, job_id)
    assert (report["sent"], report["total"]) == (600, 600)
    # A bucket of one second's worth (200) is spent at once; the other 400 need 2 s at 200/s, whoever sends them.
    # A lower bound only: a slow machine makes it longer, never shorter.
    assert report["finished"] - report["started"] >= 1.9


def test_a_job_goes_on_after_redis_stops_answering_for_a_while(tmp_path, redis_server):
    r = redis_server.client()
    audience(r, 3000)
    with FakeWebhookProcess(SECRET, "--latency", "50") as hook, \
            worker(tmp_path, "w", redis_server.url, hook, "--job-workers", "2", "--job-visibility-timeout", "3",
                   "--redis-timeout", "1") as w:
        job_id = create_job(r, gateway="webhook", audience="people", title="t", batch=100)
        eventually(lambda: int(r.hget(f"pushd:job:{job_id}", "sent") or 0) >= 500)
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            w.wait_for("job workers paused: Redis does not answer", timeout=30)
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        w.wait_for("job workers go on: Redis answers again", timeout=30)
        report = finished(r, job_id)
        stats = hook.stats()
    assert (report["state"], report["total"], report["sent"], report["failed"]) == ("done", 3000, 3000, 0)
    assert stats["unique"] == 3000
    # A batch sent while its result could not be recorded is sent again: at most one per consumer.
    assert stats["duplicates"] <= 2 * 100


def test_refused_credentials_pause_the_job_until_the_settings_are_fixed(tmp_path, redis_server):
    r = redis_server.client()
    audience(r, 500)
    with FakeWebhookProcess(SECRET) as hook:
        job_id = create_job(r, gateway="webhook", audience="people", title="t", batch=100)
        wrong = JobWorkerProcess(tmp_path / "wrong", "--webhook-url", hook.url, "--webhook-secret", "not-the-secret",
                                 redis=redis_server.url).start()
        wrong.wait_for(f"job {job_id} paused: webhook refused pushd's credentials", timeout=30)
        wrong.stop()
        paused = job(r, job_id)
        assert (paused["state"], paused["failed"], paused["sent"]) == ("paused", 0, 0)
        with worker(tmp_path, "right", redis_server.url, hook, "--job-workers", "2"):
            assert job(r, job_id)["state"] == "paused"
            r.eval(scripts.TRANSITION, 5, f"pushd:job:{job_id}", "pushd:jobs:live", f"pushd:job:{job_id}:queue",
                   f"pushd:job:{job_id}:delayed", "pushd:audience:people", "resume", "0", "running", "{}", "0")
            report = finished(r, job_id)
        stats = hook.stats()
    assert (report["state"], report["sent"], report["failed"]) == ("done", 500, 0)
    assert stats["unique"] == 500 and stats["refused"] >= 1
