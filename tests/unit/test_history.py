"""History's publishing, recovery verdicts and merged reads, driven through a fake Redis link.

The Lua scripts themselves run against a real redis-server in tests/integration/test_history_scripts.py.
"""

import pytest
from twisted.internet import defer

from pushd.recovery import OffsetSince, Position, SeqSince
from pushd.redis.history import (
    PAGE_SCRIPT,
    PUBLISH_SCRIPT,
    RECOVER_SCRIPT,
    RECOVER_SEQ_SCRIPT,
    TOP_SCRIPT,
    History,
    HistoryKeys,
    HistoryPolicies,
    HistoryPolicy,
    Missed,
    RecoveryFailed,
    Replay,
    StreamTop,
    encode_envelope,
    parse_envelope,
)


class FakeLink:
    """Records every call and answers each with a Deferred the test fires by hand."""

    def __init__(self):
        self.calls = []
        self.pending = []

    def call(self, method, *args, **kwargs):
        self.calls.append((method, args))
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def answer(self, *replies):
        for reply in replies:
            self.pending.pop(0).callback(reply)


def results(d):
    """The result a Deferred fired with (re-raising its failure)."""
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], defer.Failure):
        out[0].raiseException()
    return out[0]


POLICIES = HistoryPolicies(HistoryPolicy(100, 600), [("ticks.*", HistoryPolicy(0, 0))])


def make_history(replay_limit=3):
    link = FakeLink()
    history = History(link, HistoryKeys("p:"), POLICIES, channel_prefix="push:", replay_limit=replay_limit)
    return link, history


def entries(*offsets, encoding=None, seqs=None):
    """Stream entries as Redis returns them: [id, ["d", payload, "n", number]]; numbered 1, 2, ... unless `seqs`."""
    seqs = seqs or range(1, len(offsets) + 1)
    rows = [[o, ["d", f"m{o}", "n", str(n)]] for o, n in zip(offsets, seqs, strict=True)]
    if encoding:
        rows = [[o.encode(), [b"d", f[1].encode(), b"n", f[3].encode()]] for o, f in rows]
    return rows


def at(offset, epoch="e", seq=0):
    return Position(offset, epoch, seq)


# -- publish ------------------------------------------------------------------------------------------------

def test_publish_sends_every_command_before_any_answer_and_keeps_the_order():
    link, history = make_history()
    d = history.publish([("A", b"1"), ("ticks.x", b"2"), ("B", b"3")])
    assert [c[0] for c in link.calls] == ["eval", "publish", "eval"]
    assert link.calls[0][1] == (PUBLISH_SCRIPT, ["p:history:A", "p:meta:A"], ["p:pub:A", b"1", "100", "600"])
    assert link.calls[1][1] == ("push:ticks.x", b"2")
    assert link.calls[2][1] == (PUBLISH_SCRIPT, ["p:history:B", "p:meta:B"], ["p:pub:B", b"3", "100", "600"])
    link.pending[2].callback([b"7-0", b"e1", 1])
    link.pending[0].callback(["5-0", "e1", 4])
    assert not d.called
    link.pending[1].callback(3)
    assert results(d) == [Position("5-0", "e1", 4), None, Position("7-0", "e1", 1)]


def test_consecutive_history_messages_share_one_eval_of_at_most_publish_batch(monkeypatch):
    from pushd.redis import history as module

    monkeypatch.setattr(module, "PUBLISH_BATCH", 2)
    link, history = make_history()
    d = history.publish([("A", b"1"), ("B", b"2"), ("C", b"3"), ("ticks.x", b"4"), ("D", b"5")])
    assert [c[0] for c in link.calls] == ["eval", "eval", "publish", "eval"]
    assert link.calls[0][1] == (PUBLISH_SCRIPT, ["p:history:A", "p:meta:A", "p:history:B", "p:meta:B"],
                                ["p:pub:A", b"1", "100", "600", "p:pub:B", b"2", "100", "600"])
    link.pending[0].callback(["1-0", "e", 1, "1-1", "e", 1])
    link.pending[1].callback(["2-0", "e", 1])
    link.pending[2].callback(1)
    link.pending[3].callback(["3-0", "e", 1])
    assert results(d) == [at("1-0", seq=1), at("1-1", seq=1), at("2-0", seq=1), None, at("3-0", seq=1)]


def test_publish_of_nothing_is_an_empty_list():
    link, history = make_history()
    assert results(history.publish([])) == []
    assert link.calls == []


def test_a_failed_publish_fails_the_call_with_the_redis_error():
    link, history = make_history()
    d = history.publish([("A", b"1"), ("ticks.x", b"2"), ("B", b"3")])
    link.pending[0].callback(["1-0", "e", 1])
    link.pending[2].errback(TimeoutError("redis: EVAL got no answer"))
    with pytest.raises(TimeoutError, match="EVAL got no answer"):
        results(d)


# -- recover ------------------------------------------------------------------------------------------------

def recover(history, link, since, reply):
    d = history.recover("A", since)
    link.answer(reply)
    return results(d)


def test_recover_asks_from_since_inclusive_for_two_more_than_the_limit():
    link, history = make_history(replay_limit=3)
    history.recover("A", OffsetSince("5-0", "e"))
    assert link.calls == [("eval", (RECOVER_SCRIPT, ["p:history:A", "p:meta:A"], ["5-0", "5"]))]


@pytest.mark.parametrize("encoding", [None, "bytes"])
def test_a_good_replay_is_the_entries_after_since(encoding):
    link, history = make_history()
    epoch = b"e" if encoding else "e"
    reply = [epoch, entries("5-0", "6-0", "10-0", encoding=encoding, seqs=[4, 5, 6])]
    assert recover(history, link, OffsetSince("5-0", "e"), reply) == Replay(
        "e", ((at("6-0", seq=5), b"m6-0"), (at("10-0", seq=6), b"m10-0")), 6)


def test_nothing_missed_is_an_empty_replay():
    link, history = make_history()
    assert recover(history, link, OffsetSince("5-0", "e"), ["e", entries("5-0", seqs=[7])]) == Replay("e", (), 7)


def test_exactly_the_limit_is_replayed_one_more_fails():
    link, history = make_history(replay_limit=3)
    got = recover(history, link, OffsetSince("1-0", "e"), ["e", entries("1-0", "2-0", "3-0", "4-0")])
    assert isinstance(got, Replay) and len(got.entries) == 3
    got = recover(history, link, OffsetSince("1-0", "e"), ["e", entries("1-0", "2-0", "3-0", "4-0", "5-0")])
    assert got == RecoveryFailed("more than 3 messages missed")


def test_an_epoch_mismatch_fails():
    link, history = make_history()
    got = recover(history, link, OffsetSince("5-0", "old"), ["new", entries("5-0", "6-0")])
    assert got == RecoveryFailed("history epoch changed (Redis lost it)")


def test_a_missing_epoch_fails():
    link, history = make_history()
    got = recover(history, link, OffsetSince("5-0", "e"), [None, []])
    assert isinstance(got, RecoveryFailed) and "no longer reaches back to 5-0" in got.reason


@pytest.mark.parametrize("found", [[], entries("6-0", "7-0")])
def test_when_since_itself_is_gone_the_history_no_longer_reaches_back(found):
    link, history = make_history()
    got = recover(history, link, OffsetSince("5-0", "e"), ["e", found])
    assert got == RecoveryFailed("history no longer reaches back to 5-0")


def test_a_topic_without_history_or_a_bad_offset_fails_without_asking_redis():
    link, history = make_history()
    got = results(history.recover("ticks.x", OffsetSince("5-0", "e")))
    assert got == RecoveryFailed("topic 'ticks.x' keeps no history")
    got = results(history.recover("A", OffsetSince("five", "e")))
    assert got == RecoveryFailed("'five' is not a stream offset")
    assert link.calls == []


# -- recovery by message number (Centrifugo's offsets) -------------------------------------------------------

def newest_first(*rows):
    return list(reversed(rows))


def test_recover_by_number_asks_for_what_was_missed_with_the_ttl_of_the_topic():
    link, history = make_history(replay_limit=3)
    history.recover("A", SeqSince(5, "e"))
    assert link.calls == [("eval", (RECOVER_SEQ_SCRIPT, ["p:history:A", "p:meta:A"], ["5", "3", "600"]))]


def test_recover_by_number_replays_the_numbers_after_the_clients_in_order():
    link, history = make_history()
    reply = ["e", 7, newest_first(*entries("6-0", "7-0", seqs=[6, 7]))]
    assert recover(history, link, SeqSince(5, "e"), reply) == Replay(
        "e", ((at("6-0", seq=6), b"m6-0"), (at("7-0", seq=7), b"m7-0")), 7)


def test_recover_by_number_with_nothing_missed():
    link, history = make_history()
    assert recover(history, link, SeqSince(7, "e"), ["e", 7, []]) == Replay("e", (), 7)


def test_recover_by_number_fails_with_the_current_position():
    link, history = make_history(replay_limit=3)
    top = StreamTop("e", 9)
    assert recover(history, link, SeqSince(5, "e"), ["e", 9, []]) == RecoveryFailed("more than 3 messages missed", top)
    assert recover(history, link, SeqSince(5, "old"), ["e", 9, []]) == RecoveryFailed(
        "history epoch changed (Redis lost it)", top)
    assert recover(history, link, SeqSince(12, "e"), ["e", 9, []]) == RecoveryFailed(
        "position 12 is ahead of the history (9)", top)


def test_recover_by_number_fails_when_the_stream_lost_entries():
    # The numbers live in the meta hash, so an evicted or trimmed stream shows as missing entries.
    link, history = make_history()
    got = recover(history, link, SeqSince(5, "e"), ["e", 7, newest_first(*entries("7-0", seqs=[7]))])
    assert got == RecoveryFailed("history no longer reaches back to 5", StreamTop("e", 7))


def test_an_empty_epoch_recovers_from_any_epoch():
    link, history = make_history()
    got = recover(history, link, SeqSince(0, ""), ["e", 1, entries("1-0", seqs=[1])])
    assert got == Replay("e", ((at("1-0", seq=1), b"m1-0"),), 1)


# -- merged reads -------------------------------------------------------------------------------------------

def test_identical_reads_in_flight_share_one_call_each_judged_by_its_own_epoch():
    link, history = make_history()
    ds = [history.recover("A", OffsetSince("5-0", epoch)) for epoch in ("e", "e", "old")]
    assert len(link.calls) == 1
    link.answer(["e", entries("5-0", "6-0")])
    replay = Replay("e", ((at("6-0", seq=2), b"m6-0"),), 2)
    assert [results(d) for d in ds] == [replay, replay, RecoveryFailed("history epoch changed (Redis lost it)")]
    assert (history.reads, history.merged_reads) == (1, 2)


def test_reads_of_other_offsets_or_topics_are_separate_calls():
    link, history = make_history()
    history.recover("A", OffsetSince("5-0", "e"))
    history.recover("A", OffsetSince("6-0", "e"))
    history.recover("B", OffsetSince("5-0", "e"))
    history.recover("A", SeqSince(5, "e"))
    assert [c[1][2][0] for c in link.calls] == ["5-0", "6-0", "5-0", "5"]
    assert [c[1][1][0] for c in link.calls] == ["p:history:A", "p:history:A", "p:history:B", "p:history:A"]


def test_a_read_after_the_first_finished_is_a_new_call():
    link, history = make_history()
    first = history.recover("A", OffsetSince("5-0", "e"))
    link.answer(["e", entries("5-0")])
    assert results(first) == Replay("e", (), 1)
    second = history.recover("A", OffsetSince("5-0", "e"))
    assert len(link.calls) == 2
    link.answer(["e", entries("5-0", "6-0")])
    assert results(second) == Replay("e", ((at("6-0", seq=2), b"m6-0"),), 2)


def test_a_caller_asking_again_from_its_callback_starts_a_new_read():
    link, history = make_history()
    again = []
    history.recover("A", OffsetSince("5-0", "e")).addCallback(
        lambda _: again.append(history.recover("A", OffsetSince("5-0", "e"))))
    link.answer(["e", entries("5-0")])
    assert len(link.calls) == 2 and not again[0].called


def test_a_failing_read_errbacks_every_merged_caller():
    link, history = make_history()
    ds = [history.recover("A", OffsetSince("5-0", "e")) for _ in range(3)]
    link.pending.pop().errback(ConnectionError("lost"))
    for d in ds:
        with pytest.raises(ConnectionError, match="lost"):
            results(d)
    d = history.recover("A", OffsetSince("5-0", "e"))
    assert len(link.calls) == 2 and not d.called


def test_an_unreadable_reply_errbacks_instead_of_hanging():
    link, history = make_history()
    d = history.recover("A", OffsetSince("5-0", "e"))
    link.answer("not a reply")
    with pytest.raises(ValueError):
        results(d)


# -- latest and top -----------------------------------------------------------------------------------------

def test_latest_is_the_newest_entry_with_its_position():
    link, history = make_history()
    d = history.latest("A")
    assert link.calls == [("eval", (TOP_SCRIPT, ["p:history:A", "p:meta:A"], ["0"]))]
    link.answer([b"e", 4, entries("9-3", encoding="bytes", seqs=[4])])
    assert results(d) == (at("9-3", seq=4), b"m9-3")


@pytest.mark.parametrize("reply", [[None, 0, []], ["e", 0, []], [None, 0, entries("1-0")]])
def test_latest_of_an_empty_or_lost_history_is_none(reply):
    link, history = make_history()
    d = history.latest("A")
    link.answer(reply)
    assert results(d) is None


def test_latest_of_a_topic_without_history_is_none_without_asking_redis():
    link, history = make_history()
    assert results(history.latest("ticks.x")) is None
    assert results(history.top("ticks.x")) is None
    assert link.calls == []


def test_identical_latest_reads_in_flight_share_one_call():
    link, history = make_history()
    ds = [history.latest("A") for _ in range(3)]
    other = history.latest("B")
    assert len(link.calls) == 2
    link.answer(["e", 1, entries("2-0")], ["e", 0, []])
    assert [results(d) for d in ds] == [(at("2-0", seq=1), b"m2-0")] * 3
    assert results(other) is None
    history.latest("A")
    assert len(link.calls) == 3


def test_a_failing_latest_read_errbacks_every_merged_caller():
    link, history = make_history()
    ds = [history.latest("A") for _ in range(2)]
    link.pending.pop().errback(TimeoutError("slow"))
    for d in ds:
        with pytest.raises(TimeoutError):
            results(d)


def test_a_payload_the_link_decoded_comes_back_as_the_same_bytes():
    link, history = make_history()
    d = history.latest("A")
    link.answer(["e", 1, [["1-0", ["d", "caf\u00e9", "n", "1"]]]])
    assert results(d) == (at("1-0", seq=1), "caf\u00e9".encode())


def test_top_starts_an_epoch_with_the_topics_ttl_and_names_the_newest_entry():
    link, history = make_history()
    d = history.top("A")
    assert link.calls == [("eval", (TOP_SCRIPT, ["p:history:A", "p:meta:A"], ["600"]))]
    link.answer(["e", 4, entries("9-3", seqs=[4])])
    assert results(d) == StreamTop("e", 4, "9-3")
    d = history.top("A")
    link.answer(["fresh", 0, []])
    assert results(d) == StreamTop("fresh", 0, "0-0")


# -- pages (Centrifugo's history command) --------------------------------------------------------------------

def test_a_page_asks_for_the_limit_the_direction_and_the_start():
    link, history = make_history()
    history.page("A", 10, None, False)
    history.page("A", 5, SeqSince(3, "e"), True)
    assert link.calls == [("eval", (PAGE_SCRIPT, ["p:history:A", "p:meta:A"], ["10", "0", "-1"])),
                          ("eval", (PAGE_SCRIPT, ["p:history:A", "p:meta:A"], ["5", "1", "3"]))]


def test_a_page_is_the_entries_with_where_history_stands():
    link, history = make_history()
    d = history.page("A", 2, SeqSince(3, "e"), False)
    link.answer(["e", 9, entries("4-0", "5-0", seqs=[4, 5])])
    assert results(d) == (StreamTop("e", 9), [(at("4-0", seq=4), b"m4-0"), (at("5-0", seq=5), b"m5-0")])


def test_a_page_after_a_position_history_no_longer_has_fails():
    link, history = make_history()
    d = history.page("A", 2, SeqSince(3, "e"), False)
    link.answer(["e", 9, entries("6-0", seqs=[6])])
    assert results(d) == RecoveryFailed("history no longer reaches back to 3", StreamTop("e", 9))
    d = history.page("A", 2, SeqSince(3, "old"), False)
    link.answer(["e", 9, []])
    assert results(d) == RecoveryFailed("history epoch changed (Redis lost it)", StreamTop("e", 9))
    assert results(history.page("ticks.x", 2, None, False)) == RecoveryFailed("topic 'ticks.x' keeps no history")


# -- policies -----------------------------------------------------------------------------------------------

def test_policies_first_match_wins_else_the_default():
    policies = HistoryPolicies.parse(50, 60, "orders.eu.*=10/20\norders.*=1000/3600; ticks.*=0/0\n\n")
    assert policies.for_topic("orders.eu.1") == HistoryPolicy(10, 20)
    assert policies.for_topic("orders.us.1") == HistoryPolicy(1000, 3600)
    assert policies.for_topic("ticks.AAPL") == HistoryPolicy(0, 0)
    assert policies.for_topic("other") == HistoryPolicy(50, 60)
    assert policies.for_topic("ORDERS.x") == HistoryPolicy(50, 60)  # patterns are case-sensitive


def test_policies_without_rules():
    assert HistoryPolicies.parse(0, 0, "").for_topic("x") == HistoryPolicy(0, 0)
    assert HistoryPolicies(HistoryPolicy(1, 1)).for_topic("x") == HistoryPolicy(1, 1)


@pytest.mark.parametrize(("text", "message"), [
    ("orders.*=x/1", "'orders.*=x/1': size 'x' is not a whole number"),
    ("orders.*=1/x", "'orders.*=1/x': ttl 'x' is not a whole number"),
    ("orders.*=-1/1", "'orders.*=-1/1': size '-1' is not a whole number"),
    ("orders.*=100001/1", "'orders.*=100001/1': size 100001 is out of range (0..100000, 0 = no history)"),
    ("orders.*=1/0", "'orders.*=1/0': ttl 0 is out of range (1..2592000 seconds; 0 only with size 0)"),
    ("orders.*=1/2592001", "'orders.*=1/2592001': ttl 2592001 is out of range"),
    ("orders.*", "'orders.*': expected PATTERN=SIZE/TTL"),
    ("orders.*=100", "'orders.*=100': expected PATTERN=SIZE/TTL"),
    ("=1/1", "'=1/1': the topic pattern is empty"),
    ("a=1/1; b=2", "'b=2': expected PATTERN=SIZE/TTL"),
])
def test_a_bad_rule_is_named_in_a_one_line_error(text, message):
    with pytest.raises(ValueError) as error:
        HistoryPolicies.parse(10, 10, text)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_a_bad_default_is_an_error_too():
    with pytest.raises(ValueError, match="^default history 10/0: ttl 0 is out of range"):
        HistoryPolicies.parse(10, 0, "")
    assert HistoryPolicies.parse(0, 5, "").default == HistoryPolicy(0, 5)


def test_keys():
    keys = HistoryKeys("p:")
    assert (keys.stream("A"), keys.meta("A"), keys.channel("A")) == ("p:history:A", "p:meta:A", "p:pub:A")


# -- envelopes ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [b"", b"{}", b"\xff\n\nlines", b"1-0 e 5\nnested"])
def test_envelope_round_trip(payload):
    position = Position("1700000000000-3", "1700000000123456", 42)
    message = encode_envelope(position, payload)
    assert message == b"1700000000000-3 1700000000123456 42\n" + payload
    assert parse_envelope(message) == (position, payload)


def test_an_envelope_without_a_number_is_number_0():
    assert parse_envelope(b"1-0 e\nx") == (Position("1-0", "e", 0), b"x")
    assert parse_envelope(b"1-0 1700000000123456\nx") == (Position("1-0", "1700000000123456", 0), b"x")


@pytest.mark.parametrize("message", [
    b"", b"no newline", b"1-0 e", b"\n", b"1-0\npayload", b"1-0 \npayload", b" 1-0 e\n", b"1-0  e\n",
    b"1 e\n", b"x-0 e\n", b"-1-0 e\n", b"1-0 e e\n", b"1-0 \xff\n", b"18446744073709551616-0 e\n",
    b"0-18446744073709551616 e\n", b"1-0\te\n", b'{"plain": "json"}', b"1-0 e 5 6\n", b"1-0 e -5\n",
    b"1-0 e 5 \n",
])
def test_malformed_envelopes_are_none(message):
    assert parse_envelope(message) is None


def test_the_largest_offset_is_an_envelope():
    assert parse_envelope(b"18446744073709551615-18446744073709551615 e\nx") == (
        Position("18446744073709551615-18446744073709551615", "e"), b"x")


# -- catching up after an outage ------------------------------------------------------------------------------

def test_missed_reads_every_topic_in_one_script_from_its_last_position_or_the_floor():
    link, history = make_history(replay_limit=3)
    d = history.missed([("A", at("5-0", "e", 5), "(9-0"), ("B", None, "(9-0")])
    [(method, (_, keys, args))] = link.calls
    assert method == "eval"
    assert keys == ["p:history:A", "p:meta:A", "p:history:B", "p:meta:B"]
    assert args == ["4", "(5-0", "e", "(9-0", ""]
    link.answer([["e", "7", entries("6-0", "7-0", seqs=[6, 7])], ["f", "1", entries("10-0")]])
    a, b = results(d)
    assert [p.seq for p, _ in a.entries] == [6, 7] and a.lost is None
    assert [p.offset for p, _ in b.entries] == ["10-0"] and b.lost is None


def test_missed_from_another_epoch_is_delivered_and_told_lost():
    link, history = make_history()
    d = history.missed([("A", at("5-0", "old", 5), "0-0")])
    link.answer([["new", "2", entries("20-0", "21-0")]])
    [missed] = results(d)
    assert [(p.epoch, p.seq) for p, _ in missed.entries] == [("new", 1), ("new", 2)]
    assert missed.lost == "history epoch changed (Redis lost it)"


def test_missed_with_no_history_left_is_lost_only_for_a_topic_that_had_a_position():
    link, history = make_history()
    d = history.missed([("A", at("5-0", "e", 5), "0-0"), ("B", None, "0-0")])
    link.answer([[None, "0", []], [None, "0", []]])
    a, b = results(d)
    assert a.entries == () and a.lost == "history was lost (Redis lost its data)"
    assert b == Missed((), None)


def test_more_missed_than_the_replay_limit_delivers_the_limit_and_tells_lost():
    link, history = make_history(replay_limit=2)
    d = history.missed([("A", at("1-0", "e", 1), "0-0")])
    link.answer([["e", "4", entries("2-0", "3-0", "4-0", seqs=[2, 3, 4])]])
    [missed] = results(d)
    assert [p.seq for p, _ in missed.entries] == [2, 3]
    assert missed.lost == "more than 2 messages missed"
