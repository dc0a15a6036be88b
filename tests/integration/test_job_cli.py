"""`pushctl job ...` and `pushctl worker` as a user runs them: real processes, a real redis-server and the fake
webhook receiver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.fakes.webhook import FakeWebhookProcess
from tests.integration.jobs import job
from tests.integration.pushd_process import eventually, python_env, run_cli

SECRET = "job-cli-tests"


@pytest.fixture
def hook():
    with FakeWebhookProcess(SECRET, "--invalid-every", "50") as receiver:
        yield receiver


@pytest.fixture
def ctl(tmp_path, redis_server):
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command, rest = args[0], args[1:]
        if command == "job":
            return run_cli(tmp_path, "job", rest[0], "--redis", redis_server.url, *rest[1:])
        return run_cli(tmp_path, *args)
    return run


@pytest.fixture
def worker(tmp_path, redis_server, hook):
    proc = subprocess.Popen([sys.executable, "-m", "pushd", "worker", "--redis", redis_server.url, "--webhook-url",
                             hook.url, "--webhook-secret", SECRET], cwd=tmp_path, env=python_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)


def recipients(tmp_path, n=3000):
    path = tmp_path / "r.csv"
    path.write_text("phone,name\n" + "".join(f"+47{i:08d},N{i}\n" for i in range(n)) + "not,a,row\n")
    return str(path)


def test_bad_jobs_are_refused_with_one_line(ctl, tmp_path):
    cases = [
        (("--gateway", "webhook", "--title", "x"), "pushctl: give --audience NAME or --recipients FILE (one of them)"),
        (("--audience", "nope", "--gateway", "webhook", "--title", "x"),
         "pushctl: audience: no audience 'nope' (import it with pushctl audience import)"),
        (("--audience", "a", "--gateway", "sms", "--title", "x"),
         "pushctl: gateway: 'sms' is not one of webhook, fcm, webpush, apns, pushd"),
        (("--audience", "a", "--gateway", "webhook", "--title", "x", "--rate", "fast"),
         "pushctl: rate: 'fast' is not N/s, N/min or N/h"),
        (("--audience", "a", "--gateway", "webhook", "--title", "x", "--data", "novalue"),
         "pushctl: --data 'novalue': expected NAME=VALUE"),
        (("--recipients", str(tmp_path / "missing.csv"), "--gateway", "webhook", "--title", "x"),
         f"pushctl: {tmp_path / 'missing.csv'}: No such file or directory"),
    ]
    for args, message in cases:
        done = ctl("job", "create", *args)
        assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == message, (args, done.stderr)
    assert ctl("job", "show", "j-none").stderr.strip() == "pushctl: no job 'j-none'"


def test_test_message_first_then_confirm_watch_show_and_the_failures_file(ctl, tmp_path, redis_server, worker, hook):
    r = redis_server.client()
    created = ctl("job", "create", "--recipients", recipients(tmp_path), "--gateway", "webhook", "--title",
                  "Hi $name", "--data", "kind=promo", "--test-to", "+4799999999", "--key", "spring-sale", "--json")
    assert created.returncode == 0, created.stderr
    answer = json.loads(created.stdout)
    assert (answer["state"], answer["duplicate"]) == ("testing", False)
    job_id = answer["id"]
    assert json.loads((tmp_path / "r.csv.rejected").read_text())["reason"] == "3 columns where the header has 2"

    again = ctl("job", "create", "--recipients", recipients(tmp_path), "--gateway", "webhook", "--title", "x",
                "--key", "spring-sale")
    assert again.stdout.strip() == f"{job_id} (the job key 'spring-sale' already named; nothing new)"

    eventually(lambda: job(r, job_id)["state"] == "awaiting_confirmation")
    shown = ctl("job", "show", job_id).stdout
    assert "test to +4799999999: sent" in shown and "awaiting_confirmation" in shown
    assert hook.stats()["recipients"] == 1, "only the test message before the confirmation"
    assert ctl("job", "resume", job_id).stderr.strip() == \
        f"pushctl: job {job_id} is awaiting_confirmation: cannot resume it"
    assert ctl("job", "confirm", job_id).stdout.strip() == f"job {job_id}: running"

    watched = ctl("job", "watch", job_id)
    assert watched.returncode == 0
    # A line a second while it runs (the job may be done before the first look), the final one last.
    final = [line for line in watched.stdout.splitlines() if not line.startswith("running: ")]
    assert final[0].startswith("done: 3,000/3,000 sent 2,940 failed 0 invalid 60"), watched.stdout
    assert "errors: unknown-number 60" in watched.stdout

    shown = ctl("job", "show", "--failures", str(tmp_path / "failures.ndjson"), job_id)
    assert shown.stdout.strip().endswith(f"60 failures written to {tmp_path / 'failures.ndjson'}")
    lines = (tmp_path / "failures.ndjson").read_text().splitlines()
    assert len(lines) == 60 and json.loads(lines[0])["reason"] == "unknown-number"
    report = json.loads(ctl("job", "show", "--json", job_id).stdout)
    assert (report["sent"], report["invalid"], report["total"]) == (2940, 60, 3000)
    assert job_id in ctl("job", "list").stdout
    # The job's own audience is gone with it.
    assert not r.exists(f"pushd:audience:{report['audience']}")


def test_pause_resume_cancel_and_a_scheduled_start(ctl, tmp_path, redis_server, worker):
    r = redis_server.client()
    later = json.loads(ctl("job", "create", "--recipients", recipients(tmp_path, 100), "--gateway", "webhook",
                           "--title", "t", "--start-at", "+1h", "--json").stdout)
    assert later["state"] == "scheduled"
    assert ctl("job", "pause", later["id"]).stdout.strip() == f"job {later['id']}: paused"
    assert ctl("job", "resume", later["id"]).stdout.strip() == f"job {later['id']}: scheduled"
    assert ctl("job", "cancel", later["id"]).stdout.strip() == f"job {later['id']}: cancelled"
    assert job(r, later["id"])["cancelled"] == 0 and job(r, later["id"])["sent"] == 0

    soon = json.loads(ctl("job", "create", "--recipients", recipients(tmp_path, 100), "--gateway", "webhook",
                          "--title", "t", "--start-at", "+1s", "--json").stdout)
    assert soon["state"] == "scheduled"
    eventually(lambda: job(r, soon["id"])["state"] == "done")
    assert job(r, soon["id"])["sent"] == 98


def test_a_worker_without_the_gateway_settings_stops_with_one_line(tmp_path, redis_server):
    done = run_cli(tmp_path, "worker", "--redis", redis_server.url, "--webhook-url", "https://x.example/hook")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == \
        "pushctl: webhook-secret: required with webhook-url (the receiver checks the signature with it)"
