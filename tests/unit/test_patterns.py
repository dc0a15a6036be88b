"""Topic patterns: their rules, their meaning, and the index that finds a topic's pattern subscribers."""

import fnmatch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pushd.patterns import PatternIndex, is_pattern, matches, pattern_error
from pushd.protocol import Limits, topic_error


def recipients(index, topic):
    return set().union(*index.matching(topic))


# -- rules ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["*", "sh600*", "orders.eu.*", "sh60051?", "?", "???", "a*b?c*", "x@y/=+~:_-*"])
def test_valid_patterns(pattern):
    assert pattern_error(pattern, 16) is None
    assert is_pattern(pattern)


@pytest.mark.parametrize("pattern, message", [
    ("a[b*", "pattern 'a[b*' has characters outside A-Z a-z 0-9 _ - . : @ / = + ~ * ?"),
    ("sh 600*", "pattern 'sh 600*' has characters outside A-Z a-z 0-9 _ - . : @ / = + ~ * ?"),
    ("é*", "pattern 'é*' has characters outside A-Z a-z 0-9 _ - . : @ / = + ~ * ?"),
    ("", "patterns must not be empty"),
    ("a" * 17 + "*", "pattern 'aaaaaaaaaaaaaaaaa*'... is longer than 16 characters"),
    ("sh600519", "pattern 'sh600519' has no * or ?; subscribe to it as a topic"),
    ("sh**", "pattern 'sh**' has '**'; one * already matches any run of characters"),
])
def test_invalid_patterns_say_why(pattern, message):
    assert pattern_error(pattern, 16) == message


def test_the_alphabet_is_the_topic_alphabet_plus_wildcards():
    limits = Limits(max_topic_length=16)
    for character in map(chr, range(32, 256)):
        expected = character in "*?" or topic_error(character, limits) is None
        assert (pattern_error(character + "?", 16) is None) is expected, character


def test_plain_topics_are_not_patterns():
    assert not is_pattern("sh600519")
    assert not is_pattern("orders.eu.fr")


# -- meaning --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, topic, expected", [
    ("sh600*", "sh600519", True),
    ("sh600*", "sh601", False),
    ("sh600*", "sh600", True),
    ("orders.eu.*", "orders.eu.fr", True),
    ("orders.eu.*", "orders.eu", False),
    ("orders.eu.*", "orders.eu.fr.paris", True),
    ("orders.eu.*", "ordersXeuXfr", False),
    ("sh60051?", "sh600519", True),
    ("sh60051?", "sh60051", False),
    ("sh60051?", "sh6005199", False),
    ("?", "a", True),
    ("?", "ab", False),
    ("a?c", "a.c", True),
    ("*", "anything.at:all", True),
    ("*b*b", "abab", True),
    ("*b*b", "abba", False),
    ("a+b*", "aab", False),
])
def test_matches(pattern, topic, expected):
    assert matches(pattern, topic) is expected


@given(st.text("ab.*?", max_size=8), st.text("ab.", max_size=8))
def test_matches_is_fnmatchcase(pattern, topic):
    assert matches(pattern, topic) is fnmatch.fnmatchcase(topic, pattern)


def test_many_stars_do_not_backtrack():
    assert not matches("*a*a*a*a*a*a*a*a*a*a*b", "a" * 120)


# -- index ----------------------------------------------------------------------------------------------------


def test_add_and_discard_say_when_a_pattern_appears_and_disappears():
    index = PatternIndex()
    assert not index
    assert index.add("sh600*", "c1") is True
    assert index.add("sh600*", "c2") is False
    assert index.add("sh600*", "c2") is False
    assert index and len(index) == 1
    assert index.subscribers("sh600*") == {"c1", "c2"}
    assert index.discard("sh600*", "c1") is False
    assert index.discard("sh600*", "nobody") is False
    assert index.discard("unknown*", "c2") is False
    assert index.discard("sh600*", "c2") is True
    assert not index and len(index) == 0
    assert index.subscribers("sh600*") == set()
    assert index.discard("sh600*", "c2") is False


def test_matching_follows_add_discard_and_re_add():
    index = PatternIndex()
    assert index.matching("sh600519") == ()
    index.add("sh600*", "c1")
    index.add("orders.eu.*", "c2")
    index.add("*", "c3")
    assert recipients(index, "sh600519") == {"c1", "c3"}
    assert recipients(index, "orders.eu.fr") == {"c2", "c3"}
    assert recipients(index, "orders.eu") == {"c3"}
    index.discard("*", "c3")
    assert recipients(index, "orders.eu") == set()
    assert index.matching("orders.eu") == ()
    index.discard("sh600*", "c1")
    assert recipients(index, "sh600519") == set()
    index.add("sh600*", "c4")
    assert recipients(index, "sh600519") == {"c4"}


def test_matching_returns_the_live_sets_so_existing_patterns_need_no_invalidation():
    index = PatternIndex()
    index.add("sh600*", "c1")
    cached = index.matching("sh600519")
    assert index.add("sh600*", "c2") is False
    assert index.matching("sh600519") is cached
    assert recipients(index, "sh600519") == {"c1", "c2"}
    index.discard("sh600*", "c1")
    assert recipients(index, "sh600519") == {"c2"}


def test_a_new_pattern_reaches_topics_already_cached():
    index = PatternIndex()
    index.add("sh600*", "c1")
    assert recipients(index, "sh600519") == {"c1"}
    index.add("sh6005??", "c2")
    assert recipients(index, "sh600519") == {"c1", "c2"}


def test_only_candidates_with_the_topics_prefix_are_tested():
    index = PatternIndex()
    for i in range(50):
        index.add(f"sym{i}*", i)
    assert recipients(index, "sym12x") == {1, 12}
    assert recipients(index, "sy") == set()


@pytest.mark.parametrize("max_cached_topics", [0, 1, 5])
def test_the_cache_stays_bounded(max_cached_topics):
    index = PatternIndex(max_cached_topics)
    index.add("t*", "c1")
    for i in range(100):
        assert recipients(index, f"t{i}") == {"c1"}
        assert recipients(index, f"u{i}") == set()
        assert len(index._cache) <= max_cached_topics


PATTERNS = ["*", "a*", "a?", "?b", "a*b", "*b", "ab*", "a.*", "??", "a?*", "*.b", "b*a"]
TOPICS = ["a", "b", "ab", "ba", "aa", "bb", "abb", "aab", "a.b", "a.", ".b", "bba", "abab"]


class IndexAgreesWithBruteForce(RuleBasedStateMachine):
    """Random add/discard sequences, with lookups in between so a stale cached answer would show."""

    @initialize(max_cached_topics=st.sampled_from([0, 3, 100_000]))
    def start(self, max_cached_topics):
        self.index = PatternIndex(max_cached_topics)
        self.model = {}

    @rule(pattern=st.sampled_from(PATTERNS), subscriber=st.integers(0, 3))
    def add(self, pattern, subscriber):
        assert self.index.add(pattern, subscriber) is (pattern not in self.model)
        self.model.setdefault(pattern, set()).add(subscriber)

    @rule(pattern=st.sampled_from(PATTERNS), subscriber=st.integers(0, 3))
    def discard(self, pattern, subscriber):
        subscribers = self.model.get(pattern, set())
        last = subscribers == {subscriber}
        subscribers.discard(subscriber)
        if last:
            del self.model[pattern]
        assert self.index.discard(pattern, subscriber) is last

    @rule(topic=st.sampled_from(TOPICS))
    def look_up(self, topic):
        self.check(topic)

    @invariant()
    def agrees(self):
        assert len(self.index) == len(self.model)
        assert bool(self.index) == bool(self.model)
        for pattern in PATTERNS:
            assert self.index.subscribers(pattern) == self.model.get(pattern, set())
        for topic in TOPICS[::3]:
            self.check(topic)

    def check(self, topic):
        expected = {s for pattern, subs in self.model.items() if matches(pattern, topic) for s in subs}
        assert recipients(self.index, topic) == expected
        assert all(self.index.matching(topic))


IndexAgreesWithBruteForce.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_index_agrees_with_brute_force = IndexAgreesWithBruteForce.TestCase
