r"""Choice scoring for ``select``: which prompt tokens belong to a choice.

A choice is scored by the logprobs of *its* tokens given the stem. Tokenizing ``stem + choice``
may merge across the boundary (a trailing space of the stem joins the choice's first word), so
the choice's tokens are those after the longest common prefix of the stem's ids and the full ids:

    stem ids:  [The][ capital][ is][ ]
    full ids:  [The][ capital][ is][ Paris]
                \_______ common ______/ \___/  <- scored: its logprob is conditioned on the
                                                   common prefix only, as it should be

The stem is cached first; then the stem and every stem + choice are scored together from
``BOUNDARY_MARGIN`` tokens before the stem's end, so the rest of the stem is a cache hit:

    stem ids:  [t0 ... t65][t66 t67 t68 t69]          (70 tokens, margin 4)
    choice:    [  cached, not returned   ][ scored: logprob_start_len = 66 ... ]
                                               ^ a boundary merge may rewrite these

A server answering in SGLang's layout returns rows only from ``logprob_start_len`` on, so ids
before it are unknown (``known_from``). A choice whose tokens differ from the stem's right at
the first known row may differ earlier too: it is scored again from further back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# How many stem tokens before its end a choice's first token may merge into when the two are
# tokenized together; logprobs are computed from there on.
BOUNDARY_MARGIN = 4
UNKNOWN_ID = -1  # a token id the backend did not return (before known_from)


@dataclass(frozen=True)
class PromptScores:
    """One scored prompt: token ids and per-token logprobs (None: not computed, or the very
    first token). Ids before ``known_from`` were not returned and are ``UNKNOWN_ID``."""

    token_ids: list[int]
    logprobs: list[float | None]
    prompt_tokens: int
    cached_tokens: int
    known_from: int = 0
    token_texts: list[str | None] | None = None

    def __post_init__(self) -> None:
        assert len(self.token_ids) == len(self.logprobs), (
            f"{len(self.token_ids)} prompt tokens but {len(self.logprobs)} prompt logprobs"
        )

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[object]], start: int, prompt_tokens: int,
                  cached_tokens: int) -> PromptScores:
        """From SGLang ``input_token_logprobs`` rows ``[logprob, id, text?]``: one per prompt
        token from ``start`` on, or one per prompt token (then rows before ``start`` are
        ignored)."""
        if len(rows) == prompt_tokens and start > 0:
            rows = rows[start:]
        if len(rows) != prompt_tokens - start:
            raise ValueError(f"{len(rows)} logprob rows for a {prompt_tokens}-token prompt "
                             f"scored from token {start}")
        ids = [UNKNOWN_ID] * start + [int(r[1]) for r in rows]  # type: ignore[call-overload]
        lps: list[float | None] = [None] * start
        texts: list[str | None] = [None] * start
        for r in rows:
            lps.append(None if r[0] is None else float(r[0]))  # type: ignore[arg-type]
            texts.append(str(r[2]) if len(r) > 2 and r[2] is not None else None)
        return cls(ids, lps, prompt_tokens, cached_tokens, start, texts)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def scoring_start(num_stem_tokens: int) -> int:
    """The ``logprob_start_len`` for scoring choices after a stem of this many tokens."""
    return max(0, num_stem_tokens - BOUNDARY_MARGIN)


def choice_start(stem: PromptScores, full: PromptScores, choice: str) -> int:
    """Index in ``full`` (stem + choice) of the choice's first token."""
    start = common_prefix_len(stem.token_ids, full.token_ids)
    if start >= len(full.token_ids):
        raise ValueError(f"choice {choice!r} adds no tokens to the prompt")
    if start == 0:
        # The very first prompt token has no context, so it cannot be scored.
        raise ValueError("select needs a non-empty prompt before it")
    return start


def rescore_from(stem: PromptScores, full: PromptScores, choice: str) -> int | None:
    """Where to score ``full`` again from, or None when its choice tokens are all scored.

    Unscored choice tokens (a boundary merge reaching into the cached part) are rescored
    from where the choice starts; a start that may lie before the returned rows, from
    further back."""
    known = max(stem.known_from, full.known_from)
    shared = common_prefix_len(stem.token_ids, full.token_ids)
    if known > 0 and shared <= known:
        return max(0, known - 4 * BOUNDARY_MARGIN)
    start = choice_start(stem, full, choice)
    if any(x is None for x in full.logprobs[start:]):
        return start
    return None


@dataclass(frozen=True)
class ChoiceTokens:
    """A choice's own tokens within stem + choice: ids, logprobs and (maybe) texts."""

    token_ids: list[int]
    logprobs: list[float]
    texts: list[str | None]

    def rows(self) -> list[list[object]]:
        """SGLang's ``input_token_logprobs`` row shape: ``[logprob, id, text]``."""
        return [[lp, t, x] for lp, t, x in zip(self.logprobs, self.token_ids, self.texts)]


def choice_tokens(stem: PromptScores, full: PromptScores, choice: str) -> ChoiceTokens:
    start = choice_start(stem, full, choice)
    lps = full.logprobs[start:]
    missing = [start + j for j, x in enumerate(lps) if x is None]
    assert not missing, (f"choice {choice!r}: prompt tokens {missing} have no logprob (served "
                         "from the cache); score them with a smaller logprob_start_len")
    texts = (full.token_texts[start:] if full.token_texts is not None
             else [None] * len(lps))
    return ChoiceTokens(full.token_ids[start:], [float(x) for x in lps if x is not None],
                        list(texts))
