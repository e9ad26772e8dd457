"""Stop strings: the search looks only at what each token adds, and finds what searching the
whole text for every stop string finds."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedkv.kvcache.sequence import Sequence, SequenceStatus
from pagedkv.runtime.engine.sampling_params import (
    MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SamplingParams
)
from pagedkv.runtime.engine.stop_strings import StopStrings
from pagedkv.runtime.engine.stopping import StopChecker


def reference(text: str, stops: list[str]) -> int:
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


@given(st.text("ab€c", max_size=40), st.lists(st.text("ab€c", min_size=1, max_size=5), min_size=1, max_size=6))
def test_find_over_the_whole_text_equals_searching_for_each_stop(text, stops):
    assert StopStrings(stops).find(text) == reference(text, stops)


@given(st.lists(st.text("abc", max_size=3), max_size=25),
       st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=6))
def test_find_past_what_was_searched_equals_searching_the_whole_text(pieces, stops):
    """Fed piece by piece, as tokens add text: the first hit and where it begins are the same."""
    matcher, text = StopStrings(stops), ""
    for piece in pieces:
        searched, text = len(text), text + piece
        found = matcher.find(text, searched)
        assert found == reference(text, stops)
        if found >= 0:
            return


class CountingSet(frozenset):
    """A frozenset that counts its membership tests: the matcher's unit of work."""

    lookups = 0

    def __contains__(self, item) -> bool:
        CountingSet.lookups += 1
        return frozenset.__contains__(self, item)


def test_the_cost_of_a_token_does_not_grow_with_the_text_or_the_stops():
    """A new token's text is looked at position by position, one slice per distinct stop length:
    neither the text before it nor the number of stop strings adds work."""
    for num_stops, length in ((1, 1_000), (MAX_STOP_STRINGS, 1_000), (MAX_STOP_STRINGS, 2_000_000)):
        matcher = StopStrings([f"stop{i:02d}" for i in range(num_stops)])
        matcher.strings = CountingSet(matcher.strings)
        CountingSet.lookups = 0
        assert matcher.find("x" * length, length - 3) == -1
        assert CountingSet.lookups == 3 * len(matcher.lengths)  # 3 new characters, one stop length


# -- the engine's checker -------------------------------------------------------------------------
VOCAB = {1: b"a", 2: b"b", 3: b"c", 4: "€".encode()[:1], 5: "€".encode()[1:], 6: b"X", 7: b"YZ", 8: b" ",
         9: b"\xe2\x82", 10: b"\xac", 11: b"cab"}


class Bytes:
    """A tokenizer whose tokens are byte strings; an incomplete character decodes as U+FFFD."""

    def decode(self, ids: list[int]) -> str:
        return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def run(tokens: list[int], **params) -> tuple[Sequence, SequenceStatus | None, str]:
    checker = StopChecker(Bytes(), SimpleNamespace(eos_token_ids=[0], max_position_embeddings=1000))
    params = SamplingParams(max_tokens=100, **params)
    seq = Sequence.from_prompt([1])
    status = None
    for t in tokens:
        seq.append(t)
        status = checker.check(seq, params)
        if status is not None:
            seq.status = status
            break
    return seq, status, checker.completion(0, seq, [], params).text


@pytest.mark.parametrize("tokens, stop, text", [
    ([1, 2, 3, 6, 7, 1], ["XYZ"], "abc"),
    ([6, 7], ["XYZ"], ""),                   # a stop string at the very beginning: nothing is returned
    ([1, 9, 10, 2], ["€"], "a"),             # completed by the token that completes the character
    ([1, 4, 5, 2], ["€b"], "a"),             # across tokens, after an incomplete character
    ([1, 2, 11], ["ca", "bcab"], "a"),       # one token completes both: the earliest beginning wins
])
def test_stop_strings_end_the_sequence_and_are_not_returned(tokens, stop, text):
    seq, status, final = run(tokens, stop=stop)
    assert status is SequenceStatus.FINISHED_STOPPED and final == text


def test_no_stop_string_leaves_the_text_whole():
    seq, status, _ = run([1, 2, 8, 3], stop=["zz"])
    assert status is None and seq.output_text is None and seq.searched_text == "ab c"


def test_stop_lists_are_bounded():
    with pytest.raises(ValueError, match=f"at most {MAX_STOP_STRINGS}"):
        SamplingParams(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)])
    with pytest.raises(ValueError, match=f"at most {MAX_STOP_CHARS}"):
        SamplingParams(stop=["x" * (MAX_STOP_CHARS + 1)])
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)))
    SamplingParams(stop=["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS)
