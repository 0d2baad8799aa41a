"""stop_regex matching: first match over the newest text, patterns checked up front, and a
backtracking pattern ends its request instead of stalling the router."""

from __future__ import annotations

import pytest

from radixrt.sampling_params import SamplingParams
from radixrt.server.stop_regex import WINDOW, StopRegexMatcher, StopRegexTimeout


def test_matches_across_pieces_and_names_the_pattern() -> None:
    m = StopRegexMatcher(("[0-9]{3}", "END"))
    assert m.feed("abc 1") is None and m.feed("2") is None
    assert m.feed("3 more") == "[0-9]{3}"
    assert StopRegexMatcher(("END",)).feed("the END") == "END"


def test_only_the_newest_window_is_searched() -> None:
    m = StopRegexMatcher(("^start",))
    assert m.feed("start" + "x" * WINDOW) is None  # the anchor left the window with its text


def test_backtracking_pattern_times_out() -> None:
    m = StopRegexMatcher((r"(\w+\s?)*$",))
    with pytest.raises(StopRegexTimeout, match="stop_regex"):
        m.feed("a" * 3000 + "!")


@pytest.mark.parametrize("value", ["(", ["ok", "["], [""], 5, [f"x{i}" for i in range(17)]])
def test_bad_patterns_are_refused_naming_stop_regex(value: object) -> None:
    with pytest.raises(ValueError, match="stop_regex"):
        SamplingParams(stop_regex=value)  # type: ignore[arg-type]


def test_patterns_normalize() -> None:
    assert SamplingParams(stop_regex="a+").stop_regex == ("a+",)
    assert SamplingParams(stop_regex=["a", "a"]).stop_regex == ("a",)  # type: ignore[arg-type]
    assert SamplingParams(stop_regex="").stop_regex == ()
