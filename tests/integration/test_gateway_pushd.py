"""The pushd gateway: a job's message reaches users over their live connections on any node; users connected
nowhere are counted offline (or go to a fallback), each recipient once."""

from __future__ import annotations

import json

from tests.integration.jobs import add_audience, create_job, failures, finished
from tests.integration.pushd_process import PushdProcess
from tests.integration.test_api_cluster import SECRET, token


def test_online_users_on_two_nodes_get_the_message_and_the_others_are_offline(tmp_path, redis_server):
    auth = ("--jwt-secret", SECRET, "--auth", "required")
    r = redis_server.client()
    with PushdProcess(tmp_path / "a", *auth, redis=redis_server.url, node_id="a") as node_a, \
            PushdProcess(tmp_path / "b", *auth, redis=redis_server.url, node_id="b") as node_b:
        alice, bob = node_a.client(), node_b.client()
        alice.request({"op": "auth", "token": token("alice"), "id": 1})
        bob.request({"op": "auth", "token": token("bob"), "id": 1})
        add_audience(r, "people", {"alice": json.dumps({"name": "Alice"}), "bob": json.dumps({"name": "Bob"}),
                                   "carol": "{}"})
        job_id = create_job(r, gateway="pushd", audience="people", title="Hello $name", body="news",
                            data={"k": "v"})
        report = finished(r, job_id)
        assert alice.recv() == {"op": "message", "data": {"job": job_id, "title": "Hello Alice", "body": "news",
                                                          "data": {"k": "v"}}}
        assert bob.recv()["data"]["title"] == "Hello Bob"
        assert (report["state"], report["total"], report["sent"], report["failed"]) == ("done", 3, 2, 1)
        assert report["sent_via"] == {"online": 2} and report["errors"] == {"offline": 1}
        assert [f["address"] for f in failures(r, job_id)] == ["carol"]
        # An offline user is a failure of this message, not a dead address: carol stays in the audience.
        assert r.hexists("pushd:audience:people", "carol")
