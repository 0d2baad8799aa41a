"""What the scheduler reports after each step, per request sequence (token ids only, no text)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class SequenceDelta:
    """New tokens of one output sequence in one scheduler step.

    ``index`` tells the n > 1 samples of one request apart (0 for n == 1).
    """

    rid: str
    index: int
    new_token_ids: list[int]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache (final once prefill is done)
    completion_tokens: int  # generated so far, including these
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None  # set when finish_reason == "abort" because of a fault
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None  # sent once, with the first delta
    # With params.prompt_top_logprobs: per prompt position its top-k (None where not scored).
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    matched_stop_token: int | None = None


# How ModelRunner.forward ran a step: a decode CUDA graph, piecewise graphs, or eagerly
# (``extra["forward_steps_<path>"]``).
FORWARD_PATHS = ("decode_graph", "piecewise_graph", "eager")


def forward_steps_key(path: str) -> str:
    """The ``EngineStats.extra`` key counting the steps that ran on ``path`` (a FORWARD_PATHS)."""
    return f"forward_steps_{path}"


# EngineStats fields and ``extra`` keys that count since start; the others describe the present.
COUNTER_FIELDS = ("hit_tokens", "query_tokens", "evictions", "retractions", "prompt_tokens_total",
                  "generated_tokens_total")
COUNTER_EXTRAS = frozenset({
    "overlapped_steps", "host_hit_tokens", "host_loaded_tokens", "host_load_wasted_pages",
    "host_bytes_loaded", "host_bytes_written", "host_load_seconds", "host_write_fences",
    *(forward_steps_key(path) for path in FORWARD_PATHS)})


class EngineStats(msgspec.Struct, frozen=True):
    """Engine-wide counters; a msgspec Struct so workers send it to the router as it is."""

    running_requests: int
    queued_requests: int
    total_pages: int
    free_pages: int
    evictable_pages: int
    locked_pages: int
    private_pages: int
    wasted_slots: int
    cached_tokens: int
    hit_tokens: int
    query_tokens: int
    evictions: int
    retractions: int
    prompt_tokens_total: int
    generated_tokens_total: int
    extra: dict[str, float] = {}

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
