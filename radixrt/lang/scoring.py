r"""Choice scoring for ``select``: which prompt tokens belong to a choice, and their score.

A choice is scored by the logprobs of *its* tokens given the stem. Tokenizing ``stem + choice``
may merge across the boundary (a trailing space of the stem joins the choice's first word), so
the choice's tokens are those after the longest common prefix of the stem's ids and the full ids:

    stem ids:  [The][ capital][ is][ ]
    full ids:  [The][ capital][ is][ Paris]
                \_______ common ______/ \___/  <- scored: its logprob is conditioned on the
                                                   common prefix only, as it should be

The stem is scored (and cached) first; the choices then ask for logprobs only from
``BOUNDARY_MARGIN`` tokens before the stem's end, so the server serves the rest of the stem
from its prefix cache:

    stem ids:  [t0 ... t65][t66 t67 t68 t69]          (70 tokens, margin 4)
    choice:    [  cached, logprobs None  ][ computed: logprob_start_len = 66 ... ]
                                               ^ a boundary merge may rewrite these
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

CHOICES_METHODS = ("token_length_normalized", "sum")
# How many stem tokens before its end a choice's first token may merge into when the two are
# tokenized together; logprobs are computed from there on.
BOUNDARY_MARGIN = 4
# A logprob_start_len past any prompt: the request only tokenizes and caches its prompt.
CACHE_ONLY_START = 1 << 30


@dataclass(frozen=True)
class PromptScores:
    """One scored prompt: its token ids and per-token logprobs (None for the first token)."""

    token_ids: list[int]
    logprobs: list[float | None]
    prompt_tokens: int
    cached_tokens: int

    def __post_init__(self) -> None:
        assert len(self.token_ids) == len(self.logprobs), (
            f"{len(self.token_ids)} prompt tokens but {len(self.logprobs)} prompt logprobs"
        )


@dataclass(frozen=True)
class ChoiceScores:
    """Per-choice results of one ``select``; ``best`` is the index picked."""

    choices: list[str]
    normalized: list[float]  # mean logprob over each choice's tokens
    sums: list[float]
    num_tokens: list[int]
    cached_tokens: list[int]
    best: int


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def scoring_start(num_stem_tokens: int) -> int:
    """The ``logprob_start_len`` for scoring choices after a stem of this many tokens."""
    return max(0, num_stem_tokens - BOUNDARY_MARGIN)


def choice_start(stem_ids: Sequence[int], full: PromptScores, choice: str) -> int:
    """Index in ``full`` (stem + choice) of the choice's first token."""
    start = common_prefix_len(stem_ids, full.token_ids)
    if start >= len(full.token_ids):
        raise ValueError(f"choice {choice!r} adds no tokens to the prompt")
    if start == 0:
        # The very first prompt token has no context, so it cannot be scored.
        raise ValueError("select needs a non-empty prompt before it")
    return start


def lacks_choice_logprobs(stem_ids: Sequence[int], full: PromptScores, choice: str) -> bool:
    """True when some of the choice's tokens came back unscored (a boundary merge reached
    further back than ``BOUNDARY_MARGIN``, into the cached part)."""
    return any(x is None for x in full.logprobs[choice_start(stem_ids, full, choice):])


def choice_logprobs(stem_ids: Sequence[int], full: PromptScores, choice: str) -> list[float]:
    """Logprobs of the tokens of ``full`` (stem + choice) that the choice contributed."""
    start = choice_start(stem_ids, full, choice)
    out = full.logprobs[start:]
    missing = [start + j for j, x in enumerate(out) if x is None]
    assert not missing, (f"choice {choice!r}: prompt tokens {missing} have no logprob (served "
                         "from the cache); score them with a smaller logprob_start_len")
    return [float(x) for x in out if x is not None]


def pick(stem_ids: Sequence[int], choices: Sequence[str], scored: Sequence[PromptScores],
         method: str = "token_length_normalized") -> ChoiceScores:
    """Score every choice and pick the best (the first one on ties)."""
    if method not in CHOICES_METHODS:
        raise ValueError(f"choices_method must be one of {CHOICES_METHODS}, got {method!r}")
    assert len(choices) == len(scored), "one scored prompt per choice"
    lps = [choice_logprobs(stem_ids, s, c) for c, s in zip(choices, scored)]
    sums = [sum(x) for x in lps]
    norm = [s / len(x) for s, x in zip(sums, lps)]
    key = norm if method == "token_length_normalized" else sums
    best = max(range(len(choices)), key=lambda i: (key[i], -i))
    return ChoiceScores(list(choices), norm, sums, [len(x) for x in lps],
                        [s.cached_tokens for s in scored], best)
