"""The DSL's primitives: ``gen``, ``select`` and role blocks (``system``, ``user``,
``assistant``). Each is an ``Expr`` that a state runs when it is added: ``s += gen("x")``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Union

from radixrt.lang.backends import GenParams
from radixrt.lang.scoring import (
    CACHE_ONLY_START,
    CHOICES_METHODS,
    choice_start,
    lacks_choice_logprobs,
    pick,
    scoring_start,
)

if TYPE_CHECKING:
    from radixrt.lang.state import ProgramState

# What may be added to a state: text, a primitive, or a sequence of them.
Content = Union[str, "Expr", Sequence[Union[str, "Expr"]], None]


class Expr:
    def apply(self, s: ProgramState) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """How the call is named in error messages: ``gen('answer')``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Gen(Expr):
    """Generate text after the current state; stored under ``name`` when given."""

    name: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None

    def describe(self) -> str:
        return f"gen({self.name!r})"

    def params(self, defaults: GenParams) -> GenParams:
        # A field left unset here falls back to the program run's defaults.
        kw = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}
        return GenParams(**{k: (getattr(defaults, k) if v is None else v)
                            for k, v in kw.items()})

    def apply(self, s: ProgramState) -> None:
        params = self.params(s.defaults)
        prompt = s.text()
        if s.streaming:
            result = None
            for chunk in s.backend.stream(prompt, params):
                s._append(chunk.text)
                result = chunk.done or result
            assert result is not None, "a stream ends with its result"
        else:
            result = s.backend.generate(prompt, params)
            s._append(result.text)
        s._record(self.name, result.text, {
            "prompt_tokens": result.prompt_tokens, "cached_tokens": result.cached_tokens,
            "completion_tokens": result.completion_tokens,
            "finish_reason": result.finish_reason})


@dataclass(frozen=True)
class Select(Expr):
    """Append the choice whose tokens the model finds most likely after the current state."""

    name: str | None
    choices: tuple[str, ...]
    choices_method: str = "token_length_normalized"

    def __post_init__(self) -> None:
        if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
            raise ValueError("select needs a non-empty list of non-empty strings")
        if self.choices_method not in CHOICES_METHODS:
            raise ValueError(f"choices_method must be one of {CHOICES_METHODS}")

    def describe(self) -> str:
        return f"select({self.name!r})"

    def apply(self, s: ProgramState) -> None:
        stem = s.text()
        if not stem:
            raise ValueError("select needs a non-empty prompt before it")
        # The stem first, alone: its ids locate each choice's tokens, and it is left in the
        # prefix cache so the choices below compute only their last few stem tokens.
        (stem_scores,) = s.backend.prompt_logprobs([stem], logprob_start_len=CACHE_ONLY_START)
        stem_ids = stem_scores.token_ids
        fulls = [stem + c for c in self.choices]
        scored = s.backend.prompt_logprobs(fulls, logprob_start_len=scoring_start(len(stem_ids)))
        # A boundary merge reaching past the margin left choice tokens unscored: redo those
        # from where the choice starts (rare; still a cache hit up to there).
        for i, c in enumerate(self.choices):
            if lacks_choice_logprobs(stem_ids, scored[i], c):
                start = choice_start(stem_ids, scored[i], c)
                (scored[i],) = s.backend.prompt_logprobs([fulls[i]], logprob_start_len=start)
        res = pick(stem_ids, self.choices, scored, self.choices_method)
        choice = self.choices[res.best]
        s._append(choice)
        s._record(self.name, choice, {
            "normalized_prompt_logprobs": res.normalized, "sum_logprobs": res.sums,
            "num_tokens": res.num_tokens, "cached_tokens": res.cached_tokens,
            "prompt_tokens": [x.prompt_tokens for x in scored],
            "stem_tokens": len(stem_ids)})


@dataclass(frozen=True)
class RoleBegin(Expr):
    role: str

    def describe(self) -> str:
        return f"{self.role}_begin()"

    def apply(self, s: ProgramState) -> None:
        s._begin_role(self.role)


@dataclass(frozen=True)
class RoleEnd(Expr):
    role: str

    def describe(self) -> str:
        return f"{self.role}_end()"

    def apply(self, s: ProgramState) -> None:
        s._end_role(self.role)


@dataclass(frozen=True)
class Role(Expr):
    """A whole message: ``user("hi")`` or ``assistant(gen("answer"))``."""

    role: str
    content: Content

    def describe(self) -> str:
        return f"{self.role}(...)"

    def apply(self, s: ProgramState) -> None:
        s._begin_role(self.role)
        if self.content is not None:
            s += self.content
        s._end_role(self.role)


def _schema_text(schema: Any) -> str | None:
    """A JSON schema given as text, a dict, or a pydantic model class -> JSON text."""
    if schema is None or isinstance(schema, str):
        return schema
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return json.dumps(schema.model_json_schema())
    if isinstance(schema, (dict, bool)):
        return json.dumps(schema)
    raise ValueError(f"json_schema must be JSON text, a dict or a pydantic model, got "
                     f"{type(schema).__name__}")


def gen(name: str | None = None, max_tokens: int | None = None, *,
        stop: str | Sequence[str] | None = None, temperature: float | None = None,
        top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
        choices: Sequence[str] | None = None, regex: str | None = None,
        json_schema: Any = None, ebnf: str | None = None) -> Expr:
    """``gen(name, max_tokens=..., stop=..., temperature=...)``. ``regex`` / ``json_schema``
    (text, dict or pydantic model) / ``ebnf`` constrain the output to the grammar; with
    ``choices`` it is a ``select`` (each choice scored by the model, one picked)."""
    if choices is not None:
        if regex is not None or json_schema is not None or ebnf is not None:
            raise ValueError("gen takes choices or a grammar (regex, json_schema, ebnf), not both")
        return select(name, choices)
    stops = None if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop))
    return Gen(name, max_tokens, temperature, top_p, top_k, stops, seed, regex,
               _schema_text(json_schema), ebnf)


# An integer without leading zeros that fits in 64 bits; a JSON string literal.
INT_REGEX = r"-?(0|[1-9][0-9]{0,17})"
STRING_REGEX = r'"([^"\\\x00-\x1f]|\\["\\/bfnrt])*"'


def gen_int(name: str | None = None, max_tokens: int | None = 24, **kw: Any) -> Expr:
    """Generate a decimal integer (the text; ``int(state[name])`` reads it)."""
    return gen(name, max_tokens, regex=INT_REGEX, **kw)


def gen_string(name: str | None = None, max_tokens: int | None = None, **kw: Any) -> Expr:
    """Generate a double-quoted JSON string literal (``json.loads(state[name])`` reads it)."""
    return gen(name, max_tokens, regex=STRING_REGEX, **kw)


def select(name: str | None = None, choices: Sequence[str] = (),
           choices_method: str = "token_length_normalized") -> Select:
    return Select(name, tuple(choices), choices_method)


def system(content: Content = None) -> Role:
    return Role("system", content)


def user(content: Content = None) -> Role:
    return Role("user", content)


def assistant(content: Content = None) -> Role:
    return Role("assistant", content)


def system_begin() -> RoleBegin:
    return RoleBegin("system")


def system_end() -> RoleEnd:
    return RoleEnd("system")


def user_begin() -> RoleBegin:
    return RoleBegin("user")


def user_end() -> RoleEnd:
    return RoleEnd("user")


def assistant_begin() -> RoleBegin:
    return RoleBegin("assistant")


def assistant_end() -> RoleEnd:
    return RoleEnd("assistant")
