"""The history Lua scripts run by a real redis-server (6.2): append + publish, trimming, TTL, epochs, reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pushd.recovery import offset_key
from pushd.redis.history import LATEST_SCRIPT, PUBLISH_SCRIPT, RECOVER_SCRIPT, HistoryKeys, parse_envelope
from tests.integration.pushd_process import eventually
from tests.redis_server import RedisServer

KEYS = HistoryKeys("p:")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def r(redis_server):
    return redis_server.client(decode_responses=False)


def publish(r, topic, payload, maxlen=100, ttl=3600):
    offset, epoch = r.eval(PUBLISH_SCRIPT, 2, KEYS.stream(topic), KEYS.epoch(topic),
                           KEYS.channel(topic), payload, maxlen, ttl)
    return offset.decode(), epoch.decode()


def recover(r, topic, since, count=10):
    return r.eval(RECOVER_SCRIPT, 2, KEYS.stream(topic), KEYS.epoch(topic), since, count)


def latest(r, topic):
    return r.eval(LATEST_SCRIPT, 2, KEYS.stream(topic), KEYS.epoch(topic))


def next_message(pubsub, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            return message
    raise AssertionError("no message published")


def test_the_redis_under_test_is_6_2_or_later(r):
    version = r.info("server")["redis_version"]
    assert tuple(int(part) for part in version.split(".")[:2]) >= (6, 2)


def test_publish_appends_and_publishes_the_envelope(r):
    pubsub = r.pubsub()
    pubsub.subscribe(KEYS.channel("A"))
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"

    offset, epoch = publish(r, "A", b"\xff binary \n payload")

    offset_key(offset)
    assert epoch.isdigit() and len(epoch) >= 16  # seconds, then microseconds padded to 6 digits
    message = next_message(pubsub)
    assert message["channel"] == b"p:pub:A"
    assert message["data"] == f"{offset} {epoch}\n".encode() + b"\xff binary \n payload"
    assert parse_envelope(message["data"]) == (offset, epoch, b"\xff binary \n payload")
    assert r.xrange("p:history:A") == [(offset.encode(), {b"d": b"\xff binary \n payload"})]
    assert r.get("p:epoch:A") == epoch.encode()
    pubsub.close()


def test_publish_trims_to_maxlen_exactly(r):
    offsets = [publish(r, "A", b"%d" % i, maxlen=3)[0] for i in range(10)]
    entries = r.xrange("p:history:A")
    assert [e[0].decode() for e in entries] == offsets[-3:]
    assert [e[1][b"d"] for e in entries] == [b"7", b"8", b"9"]
    assert [offset_key(o) for o in offsets] == sorted(offset_key(o) for o in offsets)


def test_publish_sets_the_ttl_of_both_keys_and_refreshes_it(r):
    publish(r, "A", b"1", ttl=100)
    assert 95 <= r.ttl("p:history:A") <= 100
    assert 95 <= r.ttl("p:epoch:A") <= 100
    publish(r, "A", b"2", ttl=500)
    assert 495 <= r.ttl("p:history:A") <= 500
    assert 495 <= r.ttl("p:epoch:A") <= 500


def test_ttl_0_keeps_the_history_without_expiry(r):
    publish(r, "A", b"1", ttl=0)
    assert r.ttl("p:history:A") == -1 and r.ttl("p:epoch:A") == -1
    assert r.xlen("p:history:A") == 1


def test_the_epoch_is_kept_across_publishes_and_renewed_after_data_loss(r):
    epochs = {publish(r, "A", b"%d" % i)[1] for i in range(5)}
    assert len(epochs) == 1
    other = publish(r, "B", b"x")[1]
    assert r.get("p:epoch:A").decode() in epochs and other
    # What a restart without persistence or a failover does; the new epoch comes from a later Redis TIME
    # (several round trips later, so a later microsecond).
    r.delete("p:history:A", "p:epoch:A")
    _, renewed = publish(r, "A", b"after")
    assert renewed not in epochs
    assert r.xlen("p:history:A") == 1


@pytest.mark.parametrize("replicate_commands", ["yes", "no"])
def test_time_before_writes_is_accepted_and_replicas_get_the_same_epoch(redis_server, redis_binary,
                                                                         replicate_commands):
    # Writes after TIME need effects replication (a replica stores the master's epoch and stream ids, not its
    # own). 6.2 does that by default; with `lua-replicate-commands no` the script asks for it itself.
    redis_server.client().config_set("lua-replicate-commands", replicate_commands)
    with RedisServer(redis_binary) as replica:
        replica_client = replica.client(decode_responses=False)
        replica_client.execute_command("REPLICAOF", redis_server.host, redis_server.port)
        eventually(lambda: replica_client.info("replication")["master_link_status"] == "up")
        master = redis_server.client(decode_responses=False)
        offset, epoch = publish(master, "fresh", b"1")
        eventually(lambda: replica_client.get("p:epoch:fresh") is not None)
        assert replica_client.get("p:epoch:fresh").decode() == epoch
        assert replica_client.xrange("p:history:fresh") == [(offset.encode(), {b"d": b"1"})]


def test_recover_and_latest_on_an_empty_history(r):
    assert recover(r, "none", "0-0") == [None, []]
    assert latest(r, "none") == [None, []]


def test_recover_reads_from_the_offset_inclusive_with_a_count(r):
    offsets = [publish(r, "A", b"m%d" % i)[0] for i in range(6)]
    epoch = r.get("p:epoch:A")
    got_epoch, entries = recover(r, "A", offsets[2], count=3)
    assert got_epoch == epoch
    assert [(e[0].decode(), e[1]) for e in entries] == [(offsets[i], [b"d", b"m%d" % i]) for i in (2, 3, 4)]
    got_epoch, entries = recover(r, "A", offsets[5], count=10)
    assert [e[0].decode() for e in entries] == [offsets[5]]


def test_latest_is_the_newest_entry_with_the_epoch(r):
    offsets = [publish(r, "A", b"m%d" % i)[0] for i in range(3)]
    got_epoch, entries = latest(r, "A")
    assert got_epoch == r.get("p:epoch:A")
    assert entries == [[offsets[-1].encode(), [b"d", b"m2"]]]


def test_decoded_replies_have_the_same_shape(redis_server):
    r = redis_server.client()  # decode_responses=True, as txredisapi with charset="utf-8"
    offset, epoch = r.eval(PUBLISH_SCRIPT, 2, KEYS.stream("A"), KEYS.epoch("A"), KEYS.channel("A"), "x", 10, 60)
    assert r.eval(RECOVER_SCRIPT, 2, KEYS.stream("A"), KEYS.epoch("A"), offset, 5) == [epoch, [[offset, ["d", "x"]]]]


CHILD = textwrap.dedent("""\
    import json, sys
    from twisted.internet import defer, task
    from pushd.recovery import Position
    from pushd.redis.client import RedisLink
    from pushd.redis.history import History, HistoryKeys, HistoryPolicies, HistoryPolicy
    from pushd.redis.target import RedisTarget

    async def main(reactor):
        target = RedisTarget("redis", host="127.0.0.1", port=int(sys.argv[1]))
        link = RedisLink(reactor, target, timeout=5, raw=sys.argv[2] == "raw")
        policies = HistoryPolicies(HistoryPolicy(100, 60), [("plain.*", HistoryPolicy(0, 0))])
        history = History(link, HistoryKeys(sys.argv[2] + ":"), policies, channel_prefix="push:", replay_limit=5)
        first, mid, plain, last = await history.publish(
            [("A", b"\\\\xff"), ("A", "caf\\u00e9".encode()), ("plain.x", b"p"), ("A", b"007")])
        recovered = await defer.gatherResults([history.recover("A", first), history.recover("A", first),
                                               history.recover("A", Position(first.offset, "other"))])
        reads = history.reads
        newest = await history.latest("A")
        print(json.dumps({
            "same_epoch": first.epoch == mid.epoch == last.epoch, "plain": plain,
            "replay": [[o == p.offset, payload.hex()] for (o, payload), p in zip(recovered[0].entries, (mid, last))],
            "merged": recovered[0] == recovered[1] and reads == 1, "other": recovered[2].reason,
            "latest": [newest[0] == last, newest[1].hex()], "missing": await history.latest("none"),
        }), flush=True)
        await link.disconnect()

    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
""")


@pytest.mark.parametrize("mode", ["raw", "decoded"])
def test_history_over_a_real_txredisapi_link(redis_server, tmp_path, mode):
    # txredisapi (with hiredis) is what pushd runs: its replies are bytes or decoded str, nested lists.
    script = tmp_path / "history_child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(script), str(redis_server.port), mode], capture_output=True,
                            text=True, timeout=60, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, f"child failed:\n{result.stdout}\n{result.stderr}"
    assert json.loads(result.stdout) == {
        "same_epoch": True, "plain": None,
        "replay": [[True, "caf\u00e9".encode().hex()], [True, b"007".hex()]],
        "merged": True, "other": "history epoch changed (Redis lost it)",
        "latest": [True, b"007".hex()], "missing": None,
    }


def test_one_eval_publishes_several_messages_in_order(r):
    pubsub = r.pubsub()
    pubsub.psubscribe("p:pub:*")
    next_message_or_subscribe = pubsub.get_message(timeout=5)
    assert next_message_or_subscribe["type"] == "psubscribe"
    reply = [v.decode() for v in r.eval(PUBLISH_SCRIPT, 4, KEYS.stream("A"), KEYS.epoch("A"), KEYS.stream("B"),
                                        KEYS.epoch("B"), KEYS.channel("A"), "a", 10, 60, KEYS.channel("B"), "b",
                                        10, 60)]
    assert len(reply) == 4
    got = [next_message(pubsub) for _ in range(2)]
    assert [(m["channel"], parse_envelope(m["data"])) for m in got] == [
        (b"p:pub:A", (reply[0], reply[1], b"a")), (b"p:pub:B", (reply[2], reply[3], b"b"))]
    assert r.xlen(KEYS.stream("A")) == 1 and r.ttl(KEYS.epoch("B")) > 0
