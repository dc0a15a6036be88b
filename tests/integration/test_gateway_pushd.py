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


def test_offline_users_go_to_the_fallback_and_each_recipient_is_reached_once(tmp_path, redis_server):
    from tests.fakes.webhook import FakeWebhookProcess

    r = redis_server.client()
    with FakeWebhookProcess("fallback-secret") as hook:
        hook_args = ("--webhook-url", hook.url, "--webhook-secret", "fallback-secret")
        with PushdProcess(tmp_path / "a", "--jwt-secret", SECRET, *hook_args, redis=redis_server.url,
                          node_id="a") as node:
            alice = node.client()
            alice.request({"op": "auth", "token": token("alice"), "id": 1})
            add_audience(r, "people", {
                "alice": json.dumps({"phone": "+4711111111"}),   # online: not sent again through the fallback
                "carol": json.dumps({"phone": "+4722222222"}),   # offline: through the webhook
                "dave": "{}",                                    # offline, and nowhere to fall back to
            })
            job_id = create_job(r, gateway="pushd", fallback="webhook", audience="people", title="Hi")
            report = finished(r, job_id)
            assert alice.recv()["data"]["title"] == "Hi"
            stats = hook.stats()
    assert (report["sent"], report["failed"], report["total"]) == (2, 1, 3)
    assert report["sent_via"] == {"online": 1, "webhook": 1}
    assert report["errors"] == {"offline, no webhook address": 1}
    assert (stats["recipients"], stats["unique"]) == (1, 1)


def test_offline_users_fall_back_to_fcm_and_a_dead_token_does_not_remove_the_user(tmp_path, redis_server):
    from tests.fakes.fcm import FakeFcmProcess

    r = redis_server.client()
    with FakeFcmProcess(tmp_path / "fcm") as fcm, \
            PushdProcess(tmp_path / "a", "--jwt-secret", SECRET, *fcm.settings(), redis=redis_server.url,
                         node_id="a") as node:
        alice = node.client()
        alice.request({"op": "auth", "token": token("alice"), "id": 1})
        add_audience(r, "people", {
            "alice": json.dumps({"token": "tok-alice"}),   # online: FCM never hears of her
            "carol": json.dumps({"fcm": "tok-carol"}),     # offline: through FCM
            "erin": json.dumps({"token": "dead-erin"}),    # offline, and FCM says the token is gone
        })
        job_id = create_job(r, gateway="pushd", fallback="fcm", audience="people", title="Hi")
        report = finished(r, job_id)
        assert alice.recv()["data"]["title"] == "Hi"
        stats = fcm.stats()
    assert (report["total"], report["sent"]) == (3, 2)
    assert report["sent_via"] == {"online": 1, "fcm": 1}
    assert (stats["recipients"], stats["unique"], stats["duplicates"]) == (1, 1, 0)
    assert [f["address"] for f in failures(r, job_id)] == ["erin"]
    # The user id is the address of this job; only the fallback's token was dead.
    assert r.hexists("pushd:audience:people", "erin")
