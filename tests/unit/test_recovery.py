"""Offsets and the recovery seam: replayed history, then live messages, none lost, none twice."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pushd.recovery import MAX_PART, OffsetSince, Position, SeqSince, is_offset, offset_key, stitch


def test_offset_key_orders_like_redis_not_like_text():
    assert offset_key("1700000000000-0") == (1700000000000, 0)
    assert offset_key("0-0") == (0, 0)
    assert offset_key(f"{MAX_PART}-{MAX_PART}") == (MAX_PART, MAX_PART)
    assert offset_key("9-5") < offset_key("10-0") < offset_key("10-1")


@pytest.mark.parametrize("text", [
    "", "1", "1-", "-1", "-1-0", "1--1", "1-0-0", " 1-0", "1-0 ", "1-0\n", "+1-0", "1_0-0", "0x1-0", "1.5-0",
    "\uff11-0", f"{MAX_PART + 1}-0", f"0-{MAX_PART + 1}", "1" * 21 + "-0", "$", "+",
])
def test_offset_key_refuses_anything_else(text):
    with pytest.raises(ValueError, match="not a stream offset"):
        offset_key(text)
    assert not is_offset(text)


@pytest.mark.parametrize("value", [None, 1, b"1-0", ("1", "0"), Position("1-0", "e")])
def test_is_offset_is_false_for_non_strings(value):
    assert not is_offset(value)


def test_is_offset():
    assert is_offset("1700000000000-12")


def test_position_is_a_frozen_value():
    assert Position("1-0", "e") == Position("1-0", "e")
    with pytest.raises(AttributeError):
        Position("1-0", "e").offset = "2-0"  # type: ignore[misc]


def p(offset, seq=0):
    return Position(offset, "e", seq)


def test_stitch_keeps_held_after_the_last_replayed():
    held = [(p("6-0"), b"h6"), (p("7-0"), b"h7"), (p("8-0"), b"h8")]
    assert stitch(OffsetSince("4-0", "e"), [p("5-0"), p("6-0")], held) == [b"h7", b"h8"]


def test_stitch_with_nothing_to_replay_keeps_held_after_since():
    held = [(p("3-0"), b"h3"), (p("4-0"), b"h4"), (p("5-0"), b"h5")]
    assert stitch(OffsetSince("4-0", "e"), [], held) == [b"h5"]
    assert stitch(OffsetSince("4-0", "e"), [], []) == []


def test_stitch_compares_offsets_as_numbers():
    held = [(p("9-1"), b"old"), (p("10-0"), b"dup"), (p("10-1"), b"new")]
    assert stitch(OffsetSince("9-0", "e"), [p("10-0")], held) == [b"new"]


def test_stitch_keeps_frames_without_a_position_in_arrival_order():
    held = [(None, b"p1"), (p("5-0"), b"h5"), (None, b"p2"), (p("6-0"), b"h6"), (None, b"p3")]
    assert stitch(OffsetSince("4-0", "e"), [p("5-0")], held) == [b"p1", b"p2", b"h6", b"p3"]


def test_stitch_by_message_number():
    held = [(p("1-0", 5), b"h5"), (p("2-0", 6), b"h6"), (p("3-0", 0), b"unnumbered")]
    assert stitch(SeqSince(4, "e"), [p("1-0", 5)], held) == [b"h6", b"unnumbered"]
    assert stitch(SeqSince(6, "e"), [], held) == [b"unnumbered"]


def test_stitch_refuses_a_bad_offset():
    with pytest.raises(ValueError):
        stitch(OffsetSince("nope", "e"), [], [])


@st.composite
def seams(draw):
    """A topic's history, the client's last message k, the read's end r and where live delivery starts, m."""
    count = draw(st.integers(1, 40))
    ms, seq = draw(st.integers(0, 12)), draw(st.integers(0, 3))
    offsets = []
    for _ in range(count):
        offsets.append(f"{ms}-{seq}")
        # Same millisecond (next sequence) or a later one: crosses digit counts, where text order is wrong.
        if draw(st.booleans()):
            seq += 1
        else:
            ms, seq = ms + draw(st.integers(1, 50)), 0
    k = draw(st.integers(0, count - 1))
    r = draw(st.integers(k, count - 1))
    m = draw(st.integers(k + 1, r + 1))
    plain = draw(st.integers(0, 5))
    held = [(Position(offsets[i], "e", i + 1), b"live %d" % i) for i in range(m, count)]
    for j in range(plain):
        held.insert(draw(st.integers(0, len(held))), (None, b"plain %d" % j))
    by_number = draw(st.booleans())
    return offsets, k, r, held, plain, by_number


@given(seams())
def test_stitch_delivers_every_missed_message_once_in_order(seam):
    offsets, k, r, held, plain, by_number = seam
    replayed = [Position(offsets[i], "e", i + 1) for i in range(k + 1, r + 1)]
    since = SeqSince(k + 1, "e") if by_number else OffsetSince(offsets[k], "e")

    frames = [b"history %d" % (position.seq - 1) for position in replayed] + stitch(since, replayed, held)

    with_offset = [f for f in frames if not f.startswith(b"plain")]
    assert [int(f.split()[1]) for f in with_offset] == list(range(k + 1, len(offsets)))
    plain_arrivals = [frame for position, frame in held if position is None]
    assert len(plain_arrivals) == plain
    assert [f for f in frames if f.startswith(b"plain")] == plain_arrivals
    assert len(frames) == len(set(frames))
    # After the replay, everything comes from `held`, in arrival order.
    tail = frames[len(replayed):]
    arrival = [frame for _, frame in held]
    assert [arrival.index(f) for f in tail] == sorted(arrival.index(f) for f in tail)
