"""The primitives that call the model: ``gen`` (and ``gen_int`` / ``gen_string``) and
``select``, with SGLang's signatures. Role blocks and ``+`` joining are in exprs.py."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from radixrt.lang.choices import ChoicesMethod, resolve, token_length_normalized
from radixrt.lang.exprs import (  # noqa: F401  (re-exported: the DSL's public names)
    Content,
    Expr,
    ExprList,
    Role,
    RoleBegin,
    RoleEnd,
    assistant,
    assistant_begin,
    assistant_end,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from radixrt.lang.params import PARAM_NAMES
from radixrt.lang.selection import run_select

if TYPE_CHECKING:
    from radixrt.lang.state import ProgramState

# An integer without leading zeros that fits in 64 bits; a decimal number; a JSON string
# literal; a Python bool (what SGLang's dtype=bool produces).
INT_REGEX = r"-?(0|[1-9][0-9]{0,17})"
FLOAT_REGEX = r"-?(0|[1-9][0-9]{0,17})(\.[0-9]{1,16})?([eE][-+]?[0-9]{1,3})?"
STRING_REGEX = r'"([^"\\\x00-\x1f]|\\["\\/bfnrt])*"'
BOOL_REGEX = r"(True|False)"
DTYPE_REGEX = {"int": INT_REGEX, "float": FLOAT_REGEX, "str": STRING_REGEX, "bool": BOOL_REGEX}


@dataclass(frozen=True, eq=False)
class Gen(Expr):
    """Generate text after the current state; stored under ``name`` when given. ``overrides``
    are the sampling settings given to this call (the rest come from the run's defaults)."""

    name: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"gen({self.name!r})"

    def apply(self, s: ProgramState) -> None:
        params = s.resolve_params(self.overrides)
        prompt = s.text()
        if s.streaming:
            if params.n > 1:
                raise ValueError("n > 1 is not supported on streamed programs")
            s._stream_var_begin(self.name)
            result = None
            for chunk in s.backend.stream(prompt, params):
                s._append(chunk.text, var=self.name, meta=chunk.meta)
                result = chunk.done or result
            assert result is not None, "a stream ends with its result"
        else:
            result = s.backend.generate(prompt, params)
            s._append(result.text)
        value: Any = result.texts if params.n > 1 else result.text
        s._record(self.name, value, {
            "prompt_tokens": result.prompt_tokens, "cached_tokens": result.cached_tokens,
            "completion_tokens": result.completion_tokens,
            "finish_reason": result.finish_reason, **result.meta})


@dataclass(frozen=True, eq=False)
class Select(Expr):
    """Append the choice whose tokens the model finds most likely after the current state."""

    name: str | None
    choices: tuple[str, ...]
    method: ChoicesMethod = token_length_normalized

    def __post_init__(self) -> None:
        if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
            raise ValueError("select needs a non-empty list of non-empty strings")

    def describe(self) -> str:
        return f"select({self.name!r})"

    def apply(self, s: ProgramState) -> None:
        choice, meta = run_select(s.backend, s.text(), self.choices, self.method)
        s._append(choice)
        s._record(self.name, choice, meta)




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


def _dtype_name(dtype: Any) -> str:
    name = dtype.__name__ if isinstance(dtype, type) else dtype
    if name not in DTYPE_REGEX:
        raise ValueError(f"dtype must be one of int, float, str, bool; got {dtype!r}")
    return str(name)


def gen(name: str | None = None, max_tokens: int | None = None, min_tokens: int | None = None,
        n: int | None = None, stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None, stop_regex: Any = None,
        temperature: float | None = None, top_p: float | None = None,
        top_k: int | None = None, min_p: float | None = None,
        frequency_penalty: float | None = None, presence_penalty: float | None = None,
        ignore_eos: bool | None = None, return_logprob: bool | None = None,
        logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool | None = None, dtype: Any = None,
        choices: Sequence[str] | None = None,
        choices_method: str | ChoicesMethod | None = None, regex: str | None = None,
        json_schema: Any = None, *, ebnf: str | None = None, seed: int | None = None,
        max_new_tokens: int | None = None) -> Expr:
    """SGLang's ``gen``: ``gen("answer", max_tokens=64, stop="\\n", temperature=0)``.

    ``regex`` / ``json_schema`` (text, dict or pydantic model) / ``ebnf`` / ``dtype`` (int,
    float, str, bool) constrain the output; with ``choices`` it is a ``select``.
    ``max_tokens=0`` generates nothing (the prompt is only prefilled and cached)."""
    given = {k: v for k, v in locals().items() if v is not None and k not in (
        "name", "choices", "choices_method", "dtype", "json_schema", "max_new_tokens")}
    if max_new_tokens is not None:
        if max_tokens is not None:
            raise ValueError("give max_tokens or max_new_tokens, not both")
        given["max_tokens"] = max_new_tokens
    grammar = [k for k in ("regex", "ebnf") if k in given] + (
        ["json_schema"] if json_schema is not None else []) + (["dtype"] if dtype else [])
    if choices is not None:
        if grammar:
            raise ValueError(f"gen takes choices or a grammar ({', '.join(grammar)}), not both")
        return select(name, choices, temperature=temperature or 0.0,
                      choices_method=choices_method or token_length_normalized)
    if choices_method is not None:
        raise ValueError("choices_method needs choices")
    if len(grammar) > 1:
        raise ValueError(f"gen takes one of regex, json_schema, ebnf, dtype; got {grammar}")
    if regex is not None:
        re.compile(regex)  # a bad pattern fails here, naming the call site
    if json_schema is not None:
        given["json_schema"] = _schema_text(json_schema)
    if dtype is not None:
        given["regex"] = DTYPE_REGEX[_dtype_name(dtype)]
    for k in ("stop", "stop_regex"):
        if k in given:
            given[k] = (given[k],) if isinstance(given[k], str) else tuple(given[k])
    if "stop_token_ids" in given:
        given["stop_token_ids"] = tuple(given["stop_token_ids"])
    for k in ("ignore_eos", "return_logprob", "return_text_in_logprobs"):
        if k in given:
            given[k] = bool(given[k])
    assert set(given) <= set(PARAM_NAMES), set(given) - set(PARAM_NAMES)
    return Gen(name, given)


def gen_int(name: str | None = None, max_tokens: int | None = None, **kw: Any) -> Expr:
    """Generate a decimal integer (the text; ``int(state[name])`` reads it)."""
    return gen(name, max_tokens, dtype=int, **kw)


def gen_string(name: str | None = None, max_tokens: int | None = None, **kw: Any) -> Expr:
    """Generate a double-quoted JSON string literal (``json.loads(state[name])`` reads it)."""
    return gen(name, max_tokens, dtype=str, **kw)


def select(name: str | None = None, choices: Sequence[str] | None = None,
           temperature: float = 0.0,
           choices_method: str | ChoicesMethod = token_length_normalized) -> Select:
    """Pick one of ``choices`` by the model's likelihood of it (greedy: ``temperature`` 0)."""
    if choices is None:
        raise ValueError("select needs choices")
    if temperature > 1e-5:
        raise ValueError(f"select(temperature={temperature}) is not supported: radixrt picks "
                         "the most likely choice (temperature 0)")
    return Select(name, tuple(choices), resolve(choices_method))
