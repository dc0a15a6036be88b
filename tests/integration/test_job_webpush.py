"""A push job to browser subscriptions end to end: `pushctl audience import` of subscriptions, `pushctl job
create`, a `pushctl worker` with a VAPID key, and a push service that decrypts every message it gets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

from tests.fakes.webpush import FakeWebPushProcess, vapid_key_file
from tests.integration.jobs import finished
from tests.integration.pushd_process import python_env, run_cli


def test_every_subscription_gets_its_own_decryptable_message_and_gone_ones_leave(tmp_path, redis_server):
    subscriptions = str(tmp_path / "subs.ndjson")
    service = FakeWebPushProcess(subscriptions, subscriptions=30, extra=["--gone", "3"]).start()
    worker = None
    try:
        imported = run_cli(tmp_path, "audience", "import", "--redis", redis_server.url, "browsers", subscriptions)
        assert imported.returncode == 0 and "30 added" in imported.stdout, imported.stderr
        key = vapid_key_file(str(tmp_path / "vapid.pem"))
        worker = subprocess.Popen([sys.executable, "-m", "pushd", "worker", "--redis", redis_server.url,
                                   "--webpush-vapid-key", key, "--webpush-subject", "mailto:ops@example.com"],
                                  cwd=tmp_path, env=python_env(), stdout=subprocess.DEVNULL)
        created = run_cli(tmp_path, "job", "create", "--redis", redis_server.url, "--audience", "browsers",
                          "--gateway", "webpush", "--title", "Sale", "--body", "50% off", "--data", "url=/sale",
                          "--batch", "10", "--json")
        job_id = json.loads(created.stdout)["id"]
        report = finished(redis_server.client(), job_id)
        with urllib.request.urlopen(service.url + "/stats", timeout=10) as reply:
            stats = json.load(reply)
        with urllib.request.urlopen(service.url + "/received", timeout=10) as reply:
            received = json.load(reply)
    finally:
        if worker is not None and worker.poll() is None:
            os.kill(worker.pid, signal.SIGTERM)
            worker.wait(30)
        service.stop()
    assert (report["state"], report["sent"], report["invalid"], report["removed"]) == ("done", 27, 3, 3)
    assert report["errors"] == {"http-410": 3}
    assert stats["decrypted"] == 27 and stats["decrypt_failures"] == 0
    plaintexts = [json.loads(text) for texts in received.values() for text in texts]
    assert len(plaintexts) == 27
    assert {(p["title"], p["body"], p["data"]["url"]) for p in plaintexts} == {("Sale", "50% off", "/sale")}
    assert redis_server.client().hlen("pushd:audience:browsers") == 27
