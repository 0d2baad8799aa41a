"""A sequence the scheduler runs: its tokens, how many of them have KV in the pool, its pages.

One request with ``n > 1`` becomes n sequences after its prompt is prefilled once (a fork).

    all tokens   [ p p p p p p p p p | o o o ]      (prompt | generated output)
    kv_len       ---------------------------^         KV computed and stored for these
    to compute   tokens[kv_len:]  (a prefill chunk, or the one newest token when decoding)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from radixrt.cache.page_table import SequencePages
from radixrt.engine.outputs import FinishReason, SequenceDelta
from radixrt.sampling_params import SamplingParams

if TYPE_CHECKING:
    from radixrt.cache.radix import Node


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    rid: str
    index: int  # sample index within its request (0 .. n-1)
    prompt_ids: list[int]
    params: SamplingParams
    namespace: str | None
    arrival: int  # monotonically increasing admission-order key
    pages: SequencePages
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    kv_len: int = 0
    cache_handle: Node | None = None  # locked radix node covering the tree pages we hold
    cached_tokens: int = -1  # prompt tokens served by the cache (set on first admission)
    num_forks: int = 1  # >1 until the prompt is prefilled; then the sequence forks
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    sent_tokens: int = 0  # output tokens already reported in a delta
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None  # same positions
    prompt_logprobs_sent: bool = False
    matched_stop_token: int | None = None
    _array: np.ndarray | None = field(default=None, repr=False)  # token_array() cache

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_array(self) -> np.ndarray:
        """prompt + output as int32, rebuilt only when tokens were appended: radix matching of
        long prompts (policy probes every step, admission) then skips list conversion."""
        if self._array is None or len(self._array) != self.num_tokens:
            self._array = np.asarray(self.token_ids(), dtype=np.int32)
        return self._array

    @property
    def num_to_compute(self) -> int:
        return self.num_tokens - self.kv_len

    @property
    def in_prefill(self) -> bool:
        """True while more than the newest token still lacks KV (prompt, or resumed after retraction)."""
        return self.num_to_compute > 1 or not self.output_ids

    def prefix_cap(self) -> int | None:
        """Most prompt tokens a cached prefix may cover when (re)admitted, or None for no cap.

        Prompt logprobs need the logits of every position from the first unscored entry - 1
        on, so those positions must be computed, on the first admission and on every resume
        after a retraction (whatever more of the prompt the tree holds by then)."""
        if not self.params.prompt_logprobs:
            return None
        if self.prompt_logprobs is None:
            return self.params.logprob_start_len - 1
        if len(self.prompt_logprobs) >= len(self.prompt_ids):
            return None  # every entry is scored: resume on the longest prefix
        return len(self.prompt_logprobs) - 1

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def take_delta(self) -> SequenceDelta:
        """What this sequence has to report since its last delta (and mark it reported)."""
        new = self.output_ids[self.sent_tokens :]
        delta = SequenceDelta(
            rid=self.rid, index=self.index, new_token_ids=new,
            prompt_tokens=len(self.prompt_ids), cached_tokens=max(self.cached_tokens, 0),
            completion_tokens=len(self.output_ids) + (self.matched_stop_token is not None),
            finished=self.finished, finish_reason=self.finish_reason, error=self.error,
            matched_stop_token=self.matched_stop_token,
        )
        if self.params.logprobs or self.params.top_logprobs:
            delta.new_logprobs = self.logprobs[self.sent_tokens :]
            if self.params.top_logprobs:
                delta.new_top_logprobs = self.top_logprobs[self.sent_tokens :]
        pl = self.prompt_logprobs
        # Sent once, complete (a request aborted mid-prefill has only part of them: none sent).
        if pl is not None and not self.prompt_logprobs_sent and len(pl) >= len(self.prompt_ids):
            delta.prompt_logprobs = pl
            delta.prompt_top_logprobs = self.prompt_top_logprobs
            self.prompt_logprobs_sent = True
        self.sent_tokens = len(self.output_ids)
        return delta
