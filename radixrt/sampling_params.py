"""Per-request sampling parameters (OpenAI / vLLM-style), validated on construction."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# OpenAI caps the number of alternatives returned per position at 20.
MAX_TOP_LOGPROBS = 20
MAX_N = 64
_PENALTY_RANGE = (-2.0, 2.0)
# Integer fields end up in msgspec IPC messages (64-bit) and device tensors (int32 for top_k
# and lengths): anything larger is a client error, never an OverflowError deep in the stack.
MAX_INT32 = 2**31 - 1
# Sample i of an n>1 request uses seed + i, and torch generators take seeds in [0, 2^64).
MAX_SEED = 2**64 - 1
# 0 < temperature below this would turn logits / temperature into inf (NaN probabilities);
# temperature 0 is the way to ask for greedy decoding.
MIN_TEMPERATURE = 1e-6
# repetition_penalty divides or multiplies logits: outside this range it overflows them.
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
# Stop strings are matched against every new piece of text of every sample, so their number
# and length bound the per-token work of the router's detokenizer.
MAX_STOP_STRINGS = 64
MAX_STOP_LEN = 1024
MAX_STOP_TOKEN_IDS = 1024
# logit_bias: OpenAI accepts at most 300 entries, each in [-100, 100]; we allow a few more
# entries (tool-call and DSL users build them programmatically), same value range.
MAX_LOGIT_BIAS = 1024
LOGIT_BIAS_RANGE = (-100.0, 100.0)
# A grammar (regex / JSON schema / EBNF) is parsed in the router and compiled in the worker;
# its text size bounds both. A schema's nesting is bounded separately (the JSON-schema
# converter recurses over it).
MAX_GRAMMAR_CHARS = 64 * 1024
MAX_SCHEMA_DEPTH = 32
CONSTRAINT_FIELDS = ("regex", "json_schema", "ebnf")


def _is_int(x: Any) -> bool:
    # bool is a subclass of int; `top_k=True` is a caller bug, not a 1.
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float))) and not isinstance(x, bool)


def _normalize_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        items: Iterable[Any] = (stop,)
    elif isinstance(stop, (list, tuple)):
        items = stop
    else:
        raise ValueError(f"stop must be a str or a list of str, got {type(stop).__name__}")
    out: list[str] = []
    for s in items:
        if not isinstance(s, str):
            raise ValueError(f"stop entries must be str, got {type(s).__name__}")
        if s == "":
            raise ValueError("stop must not contain empty strings")
        if len(s) > MAX_STOP_LEN:
            raise ValueError(f"stop strings must be at most {MAX_STOP_LEN} characters, got one "
                             f"of {len(s)}")
        if s not in out:  # duplicates only cost matching time
            out.append(s)
    if len(out) > MAX_STOP_STRINGS:
        raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(out)}")
    return tuple(out)


def _normalize_stop_regex(patterns: Any) -> tuple[str, ...]:
    if patterns is None or patterns == "":
        return ()
    items = (patterns,) if isinstance(patterns, str) else patterns
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"stop_regex must be a str or a list of str, got "
                         f"{type(patterns).__name__}")
    out = tuple(dict.fromkeys(items))
    if out:
        from radixrt.server.stop_regex import check_patterns

        check_patterns(out)
    return out


def _normalize_ids(ids: Any) -> tuple[int, ...]:
    if ids is None:
        return ()
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"stop_token_ids must be a list of int, got {type(ids).__name__}")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
    for t in ids:
        if not _is_int(t) or not 0 <= t <= MAX_INT32:
            raise ValueError(f"stop_token_ids entries must be int in [0, {MAX_INT32}], "
                             f"got {t!r}")
    return tuple(ids)


def _normalize_bias(bias: Any) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs; a dict may have str keys (JSON)."""
    if bias is None:
        return ()
    if isinstance(bias, dict):
        items: Iterable[Any] = bias.items()
    elif isinstance(bias, (list, tuple)):
        items = bias
    else:
        raise ValueError(f"logit_bias must be a map of token id to bias, got {type(bias).__name__}")
    out: dict[int, float] = {}
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError("logit_bias entries must be (token id, bias) pairs")
        tok, val = item
        if isinstance(tok, str) and tok.isascii() and tok.isdigit() and len(tok) <= 10:
            tok = int(tok)
        if not _is_int(tok) or not 0 <= tok <= MAX_INT32:
            raise ValueError(f"logit_bias keys must be token ids in [0, {MAX_INT32}], got {tok!r}")
        lo, hi = LOGIT_BIAS_RANGE
        if not _is_number(val) or not math.isfinite(float(val)) or not lo <= val <= hi:
            raise ValueError(f"logit_bias values must be numbers in [{lo}, {hi}], got {val!r}")
        out[tok] = float(val)
    if len(out) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(out)}")
    return tuple(sorted(out.items()))


def _json_depth(x: Any) -> int:
    """Nesting depth of decoded JSON, iteratively (a hostile schema never hits recursion)."""
    depth, stack = 0, [(x, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            depth = max(depth, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return depth


def _check_grammar(name: str, text: Any) -> None:
    if text is None:
        return
    if not isinstance(text, str) or not text:
        raise ValueError(f"{name} must be a non-empty string")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise ValueError(f"{name} must be at most {MAX_GRAMMAR_CHARS} characters, got {len(text)}")
    if name == "json_schema":
        import json

        try:
            schema = json.loads(text)
        except ValueError:
            raise ValueError("json_schema must be a JSON schema (an object, as JSON text)") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("json_schema must be a JSON object (or true/false)")
        if _json_depth(schema) > MAX_SCHEMA_DEPTH:
            raise ValueError(f"json_schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request and when to stop.

    temperature == 0 means greedy. top_k in (-1, 0) means off. Penalties follow OpenAI
    (frequency/presence, over generated tokens) and Hugging Face (repetition, over prompt +
    generated tokens).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    # With prompt_logprobs: the first prompt index whose logprob is wanted. Tokens before it may
    # be served from the prefix cache (their logprobs may come back as None).
    logprob_start_len: int = 0
    n: int = 1
    skip_special_tokens: bool = True
    # Structured output: at most one of these (radixrt/constrained compiles it in the worker).
    # json_schema is JSON text; "json_object" output is json_schema '{"type": "object"}'.
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    # Added to the logits (before penalties and temperature) on the device.
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    # EOS and stop_token_ids are masked out of the draw until this many tokens are generated.
    min_new_tokens: int = 0
    # Keep a matched stop string / stop token in the output text (stop strings are matched
    # where the text is made: the router, or Engine).
    no_stop_trim: bool = False
    # End a sample once its text matches one of these (kept whole; radixrt/server/stop_regex).
    stop_regex: tuple[str, ...] = field(default=())
    # With prompt_logprobs: also the top-k alternatives at each scored prompt position.
    prompt_top_logprobs: int = 0

    def __post_init__(self) -> None:
        # frozen: normalization goes through object.__setattr__.
        object.__setattr__(self, "stop", _normalize_stop(self.stop))
        object.__setattr__(self, "logit_bias", _normalize_bias(self.logit_bias))
        object.__setattr__(self, "stop_regex", _normalize_stop_regex(self.stop_regex))
        for name in CONSTRAINT_FIELDS:
            _check_grammar(name, getattr(self, name))
        given = [name for name in CONSTRAINT_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"{given[0]} and {given[1]} are exclusive: give at most one of "
                             f"{', '.join(CONSTRAINT_FIELDS)}")
        if given and self.ignore_eos:
            # The grammar ends with the stop token; generating past it has no grammar state.
            raise ValueError(f"ignore_eos cannot be combined with {given[0]}")
        object.__setattr__(self, "stop_token_ids", _normalize_ids(self.stop_token_ids))
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "frequency_penalty",
            "presence_penalty",
            "repetition_penalty",
        ):
            v = getattr(self, name)
            try:  # float() of a huge int overflows: not finite either
                finite = _is_number(v) and math.isfinite(float(v))
            except OverflowError:
                finite = False
            if not finite:
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        for name in ("max_new_tokens", "top_k", "top_logprobs", "logprob_start_len", "n",
                     "min_new_tokens", "prompt_top_logprobs"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        for name in ("ignore_eos", "logprobs", "prompt_logprobs", "skip_special_tokens",
                     "no_stop_trim"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        for name in ("max_new_tokens", "top_k", "logprob_start_len", "min_new_tokens"):
            if getattr(self, name) > MAX_INT32:
                raise ValueError(f"{name} must be at most {MAX_INT32}, got {getattr(self, name)}")

        # 0 = prefill only: the prompt is computed and cached, nothing is generated.
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}]"
                             f", got {self.min_new_tokens}")
        if self.min_new_tokens and given:
            # Masking the stop token could leave a grammar's accepting state nothing to draw.
            raise ValueError(f"min_new_tokens cannot be combined with {given[0]}")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got "
                             f"{self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        lo, hi = _PENALTY_RANGE
        for name in ("frequency_penalty", "presence_penalty"):
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {getattr(self, name)}")
        lo, hi = REPETITION_PENALTY_RANGE
        if not lo <= self.repetition_penalty <= hi:
            raise ValueError(f"repetition_penalty must be in [{lo}, {hi}], got "
                             f"{self.repetition_penalty}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )
        if not 0 <= self.prompt_top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"prompt_top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got "
                             f"{self.prompt_top_logprobs}")
        if self.prompt_top_logprobs and not self.prompt_logprobs:
            raise ValueError("prompt_top_logprobs requires prompt_logprobs")
        if self.logprob_start_len < 0:
            raise ValueError(f"logprob_start_len must be >= 0, got {self.logprob_start_len}")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED - (self.n - 1):
            # Sample i uses seed + i: the last one must still be a valid 64-bit seed.
            raise ValueError(f"seed must be in [0, 2^64 - n] = [0, {MAX_SEED - (self.n - 1)}] "
                             f"(sample i uses seed + i), got {self.seed}")

    @property
    def is_greedy(self) -> bool:
        # top_k == 1 picks the argmax too; route it through the cheap path.
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k >= 1

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, text) of the grammar this request is constrained by, if any."""
        for name in CONSTRAINT_FIELDS:
            text = getattr(self, name)
            if text is not None:
                return name, text
        return None

    def validate_for_model(self, vocab_size: int, max_context: int, prompt_len: int) -> None:
        """Checks that need the model: token ids in range, room to generate at least one token."""
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise ValueError(
                    f"stop_token_ids contains {t}, outside the vocabulary (size {vocab_size})"
                )
        for t, _ in self.logit_bias:
            if t >= vocab_size:
                raise ValueError(
                    f"logit_bias has token id {t}, outside the vocabulary (size {vocab_size})"
                )
        if prompt_len < 1:
            raise ValueError(f"prompt must have at least one token, got {prompt_len}")
        if prompt_len >= max_context:
            raise ValueError(
                f"prompt_len ({prompt_len}) leaves no room to generate within "
                f"max_context ({max_context})"
            )
        # max_new_tokens beyond the context is not an error: generation stops at the context
        # limit (finish_reason "length"), as OpenAI-compatible servers do.

    def with_seed_offset(self, i: int) -> SamplingParams:
        """Params for child ``i`` of an n>1 request: distinct but reproducible seeds, n=1."""
        seed = None if self.seed is None else self.seed + i
        return dataclasses.replace(self, seed=seed, n=1)
