"""What a ``gen`` asks a backend for (``GenParams``) and what comes back (``GenResult``).

The field names and defaults follow SGLang's frontend (``max_new_tokens`` 128, temperature 1.0,
top_k -1 ...), so a program's sampling settings mean the same on either runtime.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

GRAMMARS = ("regex", "json_schema", "ebnf")


class BackendError(RuntimeError):
    """A backend (or the server behind it) refused or failed a request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message if status is None else f"server error {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class GenParams:
    """Sampling settings of one ``gen`` call, resolved against the program's defaults.

    ``max_tokens`` 0 generates nothing: the prompt is only prefilled (and so cached).
    """

    max_tokens: int = 128
    min_tokens: int = 0  # EOS / stop tokens are not drawn before this many tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    stop_regex: tuple[str, ...] = ()  # end once the output text matches one of these
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    # At most one grammar (the engine refuses more): the output must match it.
    regex: str | None = None
    json_schema: str | None = None  # JSON text
    ebnf: str | None = None
    # Logprobs, as SGLang's /generate returns them in meta_info.
    return_logprob: bool = False
    logprob_start_len: int | None = None  # prompt logprobs from this index (with return_logprob)
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False

    def __post_init__(self) -> None:
        given = [k for k in GRAMMARS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of regex, json_schema, ebnf; got {given}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got "
                             f"{self.min_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        for pattern in self.stop_regex:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"stop_regex {pattern!r} is not a valid regex: {e}") from None
        if self.max_tokens == 0 and self.n > 1:
            raise ValueError("max_tokens=0 (prefill only) cannot be combined with n > 1")
        if self.logprob_start_len is not None and self.logprob_start_len < 0:
            raise ValueError(f"logprob_start_len must be >= 0, got {self.logprob_start_len}")
        if self.top_logprobs_num < 0:
            raise ValueError(f"top_logprobs_num must be >= 0, got {self.top_logprobs_num}")

    @property
    def grammar(self) -> tuple[str, str] | None:
        for k in GRAMMARS:
            if getattr(self, k) is not None:
                return k, getattr(self, k)
        return None

    def sampling_dict(self) -> dict[str, Any]:
        """SGLang ``sampling_params``: always the length, temperature, top_p/top_k and stop;
        other keys only when they differ from SGLang's defaults, so the body is valid for
        any SGLang-compatible server."""
        d: dict[str, Any] = {"max_new_tokens": self.max_tokens, "temperature": self.temperature,
                             "top_p": self.top_p, "top_k": self.top_k, "stop": list(self.stop)}
        defaults = GenParams()
        for k in ("min_p", "frequency_penalty", "presence_penalty", "ignore_eos", "n", "seed",
                  *GRAMMARS):
            if getattr(self, k) != getattr(defaults, k):
                d[k] = getattr(self, k)
        if self.min_tokens:
            d["min_new_tokens"] = self.min_tokens
        if self.stop_token_ids:
            d["stop_token_ids"] = list(self.stop_token_ids)
        if self.stop_regex:
            d["stop_regex"] = list(self.stop_regex)
        return d

    def logprob_dict(self) -> dict[str, Any]:
        """The top-level logprob keys of an SGLang /generate body (empty when not asked)."""
        if not self.return_logprob:
            return {}
        d: dict[str, Any] = {"return_logprob": True}
        if self.logprob_start_len is not None:
            d["logprob_start_len"] = self.logprob_start_len
        if self.top_logprobs_num:
            d["top_logprobs_num"] = self.top_logprobs_num
        if self.return_text_in_logprobs:
            d["return_text_in_logprobs"] = True
        return d

    def as_dict(self) -> dict[str, Any]:
        return self.sampling_dict()


PARAM_NAMES = tuple(f.name for f in fields(GenParams))


@dataclass
class GenResult:
    """One ``gen``'s outcome. ``texts`` has every sample when n > 1; ``meta`` carries the
    logprob fields (``output_token_logprobs``, ``input_token_logprobs`` ...) when asked."""

    text: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None
    texts: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenChunk:
    """A streamed piece of text; the last chunk carries the whole result in ``done``."""

    text: str
    done: GenResult | None = None
    meta: dict[str, Any] | None = None  # the server's meta_info of this event, if any
