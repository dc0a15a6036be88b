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

from pushd.recovery import Position, offset_key
from pushd.redis.history import (
    CATCH_UP_SCRIPT,
    PAGE_SCRIPT,
    PUBLISH_SCRIPT,
    RECOVER_SCRIPT,
    RECOVER_SEQ_SCRIPT,
    TOP_SCRIPT,
    HistoryKeys,
    parse_envelope,
)
from tests.integration.pushd_process import eventually
from tests.redis_server import RedisServer

KEYS = HistoryKeys("p:")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def r(redis_server):
    return redis_server.client(decode_responses=False)


def publish(r, topic, payload, maxlen=100, ttl=3600):
    """(offset, epoch, number) of one message published with the publish script."""
    offset, epoch, seq = r.eval(PUBLISH_SCRIPT, 2, KEYS.stream(topic), KEYS.meta(topic),
                                KEYS.channel(topic), payload, maxlen, ttl)
    return offset.decode(), epoch.decode(), seq


def recover(r, topic, since, count=10):
    return r.eval(RECOVER_SCRIPT, 2, KEYS.stream(topic), KEYS.meta(topic), since, count)


def recover_seq(r, topic, seq, limit=10, ttl=60):
    return r.eval(RECOVER_SEQ_SCRIPT, 2, KEYS.stream(topic), KEYS.meta(topic), seq, limit, ttl)


def top(r, topic, ttl=0):
    return r.eval(TOP_SCRIPT, 2, KEYS.stream(topic), KEYS.meta(topic), ttl)


def numbers(entries):
    """The message numbers (field n) of stream entries, in the order given."""
    return [int(dict(zip(fields[::2], fields[1::2]))[b"n"]) for _, fields in entries]


def page(r, topic, limit, since=-1, reverse=False):
    epoch, last, entries = r.eval(PAGE_SCRIPT, 2, KEYS.stream(topic), KEYS.meta(topic), limit,
                                  "1" if reverse else "0", since)
    return epoch, last, numbers(entries)


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


def test_publish_appends_numbers_and_publishes_the_envelope(r):
    pubsub = r.pubsub()
    pubsub.subscribe(KEYS.channel("A"))
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"

    offset, epoch, seq = publish(r, "A", b"\xff binary \n payload")

    offset_key(offset)
    assert epoch.isdigit() and len(epoch) >= 16  # seconds, then microseconds padded to 6 digits
    assert seq == 1
    message = next_message(pubsub)
    assert message["channel"] == b"p:pub:A"
    assert message["data"] == f"{offset} {epoch} 1\n".encode() + b"\xff binary \n payload"
    assert parse_envelope(message["data"]) == (Position(offset, epoch, 1), b"\xff binary \n payload")
    assert r.xrange("p:history:A") == [(offset.encode(), {b"d": b"\xff binary \n payload", b"n": b"1"})]
    assert r.hgetall("p:meta:A") == {b"epoch": epoch.encode(), b"seq": b"1"}
    assert [publish(r, "A", b"x")[2] for _ in range(3)] == [2, 3, 4]
    pubsub.close()


def test_publish_trims_to_maxlen_exactly(r):
    offsets = [publish(r, "A", b"%d" % i, maxlen=3)[0] for i in range(10)]
    entries = r.xrange("p:history:A")
    assert [e[0].decode() for e in entries] == offsets[-3:]
    assert [e[1][b"d"] for e in entries] == [b"7", b"8", b"9"]
    assert [e[1][b"n"] for e in entries] == [b"8", b"9", b"10"]
    assert [offset_key(o) for o in offsets] == sorted(offset_key(o) for o in offsets)


def test_publish_sets_the_ttl_of_both_keys_and_refreshes_it(r):
    publish(r, "A", b"1", ttl=100)
    assert 95 <= r.ttl("p:history:A") <= 100
    assert 95 <= r.ttl("p:meta:A") <= 100
    publish(r, "A", b"2", ttl=500)
    assert 495 <= r.ttl("p:history:A") <= 500
    assert 495 <= r.ttl("p:meta:A") <= 500


def test_ttl_0_keeps_the_history_without_expiry(r):
    publish(r, "A", b"1", ttl=0)
    assert r.ttl("p:history:A") == -1 and r.ttl("p:meta:A") == -1
    assert r.xlen("p:history:A") == 1


def test_the_epoch_is_kept_across_publishes_and_renewed_after_data_loss(r):
    epochs = {publish(r, "A", b"%d" % i)[1] for i in range(5)}
    assert len(epochs) == 1
    other = publish(r, "B", b"x")[1]
    assert r.hget("p:meta:A", "epoch").decode() in epochs and other
    # What a restart without persistence or a failover does; the new epoch comes from a later Redis TIME
    # (several round trips later, so a later microsecond), and numbering starts again.
    r.delete("p:history:A", "p:meta:A")
    _, renewed, seq = publish(r, "A", b"after")
    assert renewed not in epochs and seq == 1
    assert r.xlen("p:history:A") == 1


def test_numbers_never_repeat_in_an_epoch_when_the_stream_alone_is_lost(r):
    # maxmemory eviction or a DEL can take the stream and leave the meta hash: numbering goes on, so a client's
    # old number can never name a new message.
    _, epoch, _ = publish(r, "A", b"1")
    publish(r, "A", b"2")
    r.delete("p:history:A")
    _, same, seq = publish(r, "A", b"3")
    assert (same, seq) == (epoch, 3)
    # A client at 1 missed 2 and 3; only 3 is left, which History judges "no longer reaches back".
    got_epoch, last, entries = recover_seq(r, "A", 1)
    assert (got_epoch, last, numbers(entries)) == (epoch.encode(), 3, [3])


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
        offset, epoch, _ = publish(master, "fresh", b"1")
        top(master, "fresh-top", ttl=60)
        eventually(lambda: replica_client.hget("p:meta:fresh", "epoch") is not None)
        assert replica_client.hget("p:meta:fresh", "epoch").decode() == epoch
        assert replica_client.xrange("p:history:fresh") == [(offset.encode(), {b"d": b"1", b"n": b"1"})]
        eventually(lambda: replica_client.hget("p:meta:fresh-top", "epoch") is not None)
        assert replica_client.hget("p:meta:fresh-top", "epoch") == master.hget("p:meta:fresh-top", "epoch")


def test_recover_and_top_on_an_empty_history(r):
    assert recover(r, "none", "0-0") == [None, []]
    assert top(r, "none") == [None, 0, []]
    assert not r.exists("p:meta:none")


def test_recover_reads_from_the_offset_inclusive_with_a_count(r):
    offsets = [publish(r, "A", b"m%d" % i)[0] for i in range(6)]
    epoch = r.hget("p:meta:A", "epoch")
    got_epoch, entries = recover(r, "A", offsets[2], count=3)
    assert got_epoch == epoch
    assert [(e[0].decode(), e[1]) for e in entries] == [(offsets[i], [b"d", b"m%d" % i, b"n", b"%d" % (i + 1)])
                                                        for i in (2, 3, 4)]
    got_epoch, entries = recover(r, "A", offsets[5], count=10)
    assert [e[0].decode() for e in entries] == [offsets[5]]


def test_recover_by_number_returns_what_was_missed_newest_first(r):
    offsets = [publish(r, "A", b"m%d" % i)[0] for i in range(6)]
    epoch, last, entries = recover_seq(r, "A", 3)
    assert (epoch, last) == (r.hget("p:meta:A", "epoch"), 6)
    assert [e[0].decode() for e in entries] == offsets[5:2:-1]
    assert numbers(entries) == [6, 5, 4]
    assert recover_seq(r, "A", 6)[2] == []  # nothing missed
    assert recover_seq(r, "A", 1, limit=3)[2] == []  # too much missed: nothing read
    assert recover_seq(r, "A", 9)[1:] == [6, []]  # ahead of the history


def test_recover_by_number_starts_an_epoch_for_a_topic_without_one(r):
    epoch, last, entries = recover_seq(r, "new", 4, ttl=60)
    assert epoch and (last, entries) == (0, [])
    assert r.hgetall("p:meta:new") == {b"epoch": epoch, b"seq": b"0"}
    assert 55 <= r.ttl("p:meta:new") <= 60
    assert publish(r, "new", b"1")[1:] == (epoch.decode(), 1)


def test_top_names_the_newest_entry_and_can_start_an_epoch(r):
    offsets = [publish(r, "A", b"m%d" % i)[0] for i in range(3)]
    got_epoch, last, entries = top(r, "A")
    assert (got_epoch, last) == (r.hget("p:meta:A", "epoch"), 3)
    assert entries == [[offsets[-1].encode(), [b"d", b"m2", b"n", b"3"]]]
    epoch, last, entries = top(r, "B", ttl=30)
    assert epoch and (last, entries) == (0, [])
    assert 25 <= r.ttl("p:meta:B") <= 30
    # The first publish after keeps the epoch the subscriber was told.
    assert publish(r, "B", b"x")[1:] == (epoch.decode(), 1)


def test_pages_forward_backward_and_after_a_number(r):
    for i in range(8):
        publish(r, "A", b"m%d" % i, maxlen=6)  # numbers 3..8 kept
    epoch = r.hget("p:meta:A", "epoch")
    assert page(r, "A", 0) == (epoch, 8, [])
    assert page(r, "A", 2) == (epoch, 8, [3, 4])
    assert page(r, "A", 2, reverse=True) == (epoch, 8, [8, 7])
    assert page(r, "A", 3, since=4) == (epoch, 8, [5, 6, 7])
    assert page(r, "A", 10, since=4) == (epoch, 8, [5, 6, 7, 8])
    assert page(r, "A", 10, since=8) == (epoch, 8, [])
    assert page(r, "A", 2, since=6, reverse=True) == (epoch, 8, [5, 4])
    assert page(r, "A", 10, since=1) == (epoch, 8, [3, 4, 5, 6, 7, 8])  # history no longer reaches back to 2
    assert page(r, "none", 5) == (None, 0, [])


def test_decoded_replies_have_the_same_shape(redis_server):
    r = redis_server.client()  # decode_responses=True, as txredisapi with charset="utf-8"
    offset, epoch, seq = r.eval(PUBLISH_SCRIPT, 2, KEYS.stream("A"), KEYS.meta("A"), KEYS.channel("A"), "x", 10, 60)
    assert seq == 1
    assert r.eval(RECOVER_SCRIPT, 2, KEYS.stream("A"), KEYS.meta("A"), offset, 5) == [
        epoch, [[offset, ["d", "x", "n", "1"]]]]


CHILD = textwrap.dedent("""\
    import json, sys
    from twisted.internet import defer, task
    from pushd.recovery import OffsetSince, SeqSince
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
        since = OffsetSince(first.offset, first.epoch)
        recovered = await defer.gatherResults([history.recover("A", since), history.recover("A", since),
                                               history.recover("A", OffsetSince(first.offset, "other"))])
        reads = history.reads
        by_number = await history.recover("A", SeqSince(first.seq, first.epoch))
        newest = await history.latest("A")
        print(json.dumps({
            "same_epoch": first.epoch == mid.epoch == last.epoch, "plain": plain,
            "replay": [[got == p, payload.hex()] for (got, payload), p in zip(recovered[0].entries, (mid, last))],
            "by_number": by_number == recovered[0],
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
        "replay": [[True, "caf\u00e9".encode().hex()], [True, b"007".hex()]], "by_number": True,
        "merged": True, "other": "history epoch changed (Redis lost it)",
        "latest": [True, b"007".hex()], "missing": None,
    }


def test_one_eval_publishes_several_messages_in_order(r):
    pubsub = r.pubsub()
    pubsub.psubscribe("p:pub:*")
    next_message_or_subscribe = pubsub.get_message(timeout=5)
    assert next_message_or_subscribe["type"] == "psubscribe"
    reply = r.eval(PUBLISH_SCRIPT, 4, KEYS.stream("A"), KEYS.meta("A"), KEYS.stream("B"), KEYS.meta("B"),
                   KEYS.channel("A"), "a", 10, 60, KEYS.channel("B"), "b", 10, 60)
    assert len(reply) == 6
    got = [next_message(pubsub) for _ in range(2)]
    assert [(m["channel"], parse_envelope(m["data"])) for m in got] == [
        (b"p:pub:A", (Position(reply[0].decode(), reply[1].decode(), reply[2]), b"a")),
        (b"p:pub:B", (Position(reply[3].decode(), reply[4].decode(), reply[5]), b"b"))]
    assert r.xlen(KEYS.stream("A")) == 1 and r.ttl(KEYS.meta("B")) > 0


def test_the_catch_up_script_reads_after_a_position_or_the_whole_stream_of_another_epoch(r):
    first, epoch, _ = publish(r, "A", b"1")
    publish(r, "A", b"2")
    publish(r, "A", b"3")
    publish(r, "B", b"b1")
    count = 10
    reply = r.eval(CATCH_UP_SCRIPT, 6, KEYS.stream("A"), KEYS.meta("A"), KEYS.stream("B"), KEYS.meta("B"),
                   KEYS.stream("C"), KEYS.meta("C"), count, "(" + first, epoch, "(" + first, "another epoch",
                   "0-0", "")
    (a_epoch, a_top, a_entries), (b_epoch, _, b_entries), (c_epoch, c_top, c_entries) = reply
    assert (a_epoch.decode(), a_top) == (epoch, 3) and numbers(a_entries) == [2, 3]
    # B's epoch is not the one the node knew: all of it is read, even what lies before the start given.
    assert numbers(b_entries) == [1] and b_epoch is not None
    assert (c_epoch, c_top, c_entries) == (None, 0, [])
