"""How ``select`` picks among scored choices: SGLang's three methods (same names, same
decisions) plus ``sum``. Each takes every choice's own token logprobs and returns the index of
the best one (the first on ties) with the scores it compared."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from radixrt.lang.scoring import ChoiceTokens


@dataclass(frozen=True)
class Decision:
    best: int
    meta: dict[str, Any]


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


class ChoicesMethod:
    """Base of the choice methods; ``needs_unconditional``: the method also wants each
    choice's tokens scored with no context before them."""

    name = ""
    needs_unconditional = False

    def decide(self, tokens: Sequence[ChoiceTokens],
               unconditional: Sequence[Sequence[float | None]] | None = None) -> Decision:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class TokenLengthNormalized(ChoicesMethod):
    """The highest mean logprob over the choice's tokens."""

    name = "token_length_normalized"

    def decide(self, tokens: Sequence[ChoiceTokens],
               unconditional: Sequence[Sequence[float | None]] | None = None) -> Decision:
        norm = [_mean(t.logprobs) for t in tokens]
        return Decision(_argmax(norm), {})


class SumLogprobs(ChoicesMethod):
    """The highest total logprob (favours short choices)."""

    name = "sum"

    def decide(self, tokens: Sequence[ChoiceTokens],
               unconditional: Sequence[Sequence[float | None]] | None = None) -> Decision:
        return Decision(_argmax([sum(t.logprobs) for t in tokens]), {})


class GreedyTokenSelection(ChoicesMethod):
    """Compare choices token by token: keep those with the best logprob at position 0, then
    1, ... A choice shorter than the others is padded with its own mean logprob."""

    name = "greedy_token_selection"

    def decide(self, tokens: Sequence[ChoiceTokens],
               unconditional: Sequence[Sequence[float | None]] | None = None) -> Decision:
        width = max(len(t.logprobs) for t in tokens)
        matrix = [list(t.logprobs) + [_mean(t.logprobs)] * (width - len(t.logprobs))
                  for t in tokens]
        alive = list(range(len(tokens)))
        for j in range(width):
            top = max(matrix[i][j] for i in alive)
            alive = [i for i in alive if matrix[i][j] == top]
            if len(alive) == 1:
                break
        return Decision(alive[0], {"greedy_logprob_matrix": matrix})


class UnconditionalLikelihoodNormalized(ChoicesMethod):
    """The highest mean of (logprob given the stem - logprob with no context) over the
    choice's tokens: discounts choices that are likely anywhere. The first token has no
    context when scored alone; its unconditional logprob counts as 0."""

    name = "unconditional_likelihood_normalized"
    needs_unconditional = True

    def decide(self, tokens: Sequence[ChoiceTokens],
               unconditional: Sequence[Sequence[float | None]] | None = None) -> Decision:
        if unconditional is None:
            raise ValueError(f"{self.name} needs the choices' unconditional logprobs")
        scores = []
        for t, u in zip(tokens, unconditional):
            assert len(u) == len(t.logprobs), "one unconditional logprob per choice token"
            scores.append(_mean([c - (x or 0.0) for c, x in zip(t.logprobs, u)]))
        return Decision(_argmax(scores), {
            "unconditional_token_logprobs": [list(u) for u in unconditional],
            "normalized_unconditional_prompt_logprobs": scores})


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
sum_logprobs = SumLogprobs()
METHODS: dict[str, ChoicesMethod] = {m.name: m for m in (
    token_length_normalized, greedy_token_selection, unconditional_likelihood_normalized,
    sum_logprobs)}


def resolve(method: str | ChoicesMethod) -> ChoicesMethod:
    if isinstance(method, ChoicesMethod):
        return method
    if isinstance(method, str) and method in METHODS:
        return METHODS[method]
    if callable(method):
        raise ValueError(f"choices_method {method!r} is not one of radixrt's methods: custom "
                         f"SGLang ChoicesSamplingMethod subclasses are not supported; use one "
                         f"of {sorted(METHODS)}")
    raise ValueError(f"choices_method must be one of {sorted(METHODS)}, got {method!r}")
