"""``select`` over a backend: cache the stem, score stem + each choice from just before the
stem's end (the rest is a cache hit), rescore the rare choice whose tokens merged further back,
and let the choice method decide. See scoring.py for the token bookkeeping."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from radixrt.lang.choices import ChoicesMethod
from radixrt.lang.scoring import (
    ChoiceTokens,
    PromptScores,
    choice_tokens,
    rescore_from,
    scoring_start,
)

if TYPE_CHECKING:
    from radixrt.lang.backends import Backend

MAX_RESCORES = 8  # each moves the start 4 margins back; a merge that deep is not a merge


def run_select(backend: Backend, stem: str, choices: Sequence[str],
               method: ChoicesMethod) -> tuple[str, dict[str, Any]]:
    if not stem:
        raise ValueError("select needs a non-empty prompt before it")
    # The stem first, alone: the choices below then compute only its last few tokens.
    n_stem = backend.cache_prefix(stem).prompt_tokens
    start = scoring_start(n_stem)
    fulls = [stem + c for c in choices]
    # The stem rides along: its ids (from the same start) locate each choice's tokens.
    stem_scores, *scored = backend.prompt_logprobs([stem, *fulls], logprob_start_len=start)
    stems = [stem_scores] * len(choices)
    for i, c in enumerate(choices):
        for _ in range(MAX_RESCORES):
            again = rescore_from(stems[i], scored[i], c)
            if again is None:
                break
            stems[i], scored[i] = backend.prompt_logprobs([stem, fulls[i]],
                                                          logprob_start_len=again)
        else:
            raise ValueError(f"choice {c!r}: its tokens could not be told from the stem's")
    tokens = [choice_tokens(st, sc, c) for st, sc, c in zip(stems, scored, choices)]
    unconditional = _unconditional(backend, tokens) if method.needs_unconditional else None
    decision = method.decide(tokens, unconditional)
    norm = [sum(t.logprobs) / len(t.logprobs) for t in tokens]
    meta = {
        # SGLang's keys first: what its programs read.
        "normalized_prompt_logprobs": norm,
        "input_token_logprobs": [t.rows() for t in tokens],
        "output_token_logprobs": [[] for _ in tokens],
        **decision.meta,
        "sum_logprobs": [sum(t.logprobs) for t in tokens],
        "num_tokens": [len(t.logprobs) for t in tokens],
        "cached_tokens": [x.cached_tokens for x in scored],
        "prompt_tokens": [x.prompt_tokens for x in scored],
        "stem_tokens": n_stem,
        "choices_method": method.name,
    }
    return choices[decision.best], meta


def _unconditional(backend: Backend, tokens: Sequence[ChoiceTokens]) -> list[list[float | None]]:
    """Each choice's tokens scored with nothing before them (the first has no logprob)."""
    scored: list[PromptScores] = backend.prompt_logprobs([list(t.token_ids) for t in tokens],
                                                         logprob_start_len=0)
    return [list(s.logprobs) for s in scored]
