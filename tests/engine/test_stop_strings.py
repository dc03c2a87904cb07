from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from ladle.engine.stop_strings import StopStringMatcher


def feed(stop: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopStringMatcher(stop)
    out = "".join(m.push(p) for p in pieces)
    return out + m.flush(), m.stopped


def test_stop_split_across_pieces_is_never_emitted() -> None:
    out, stopped = feed(["<|end|>"], ["Hello", " world<", "|en", "d|> trailing"])
    assert out == "Hello world"
    assert stopped


def test_partial_match_released_when_it_stops_matching() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.push("go ST") == "go "
    assert m.push("ART") == "START"
    assert not m.stopped


def test_earliest_of_several_stops_wins() -> None:
    out, _ = feed(["bb", "a"], ["xxbba"])
    assert out == "xx"


def test_held_text_released_on_flush_without_stop() -> None:
    out, stopped = feed(["###"], ["a#", "#"])
    assert (out, stopped) == ("a##", False)


@given(
    text=st.text(alphabet="ab<|>", max_size=40),
    stop=st.text(alphabet="ab<|>", min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
)
def test_any_split_equals_cutting_the_whole_text(text: str, stop: str, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out, stopped = feed([stop], pieces)
    i = text.find(stop)
    assert out == (text[:i] if i != -1 else text)
    assert stopped == (i != -1)
