"""Per-request records and the serving metrics computed from them.

Definitions follow SGLang's ``bench_serving`` (and vLLM's ``benchmark_serving``):

    arrival ─────► first chunk ──► chunk ──► chunk ... ──► last chunk
            TTFT               ITL       ITL          (e2e = last chunk - arrival)
    TPOT = (e2e - TTFT) / (output_tokens - 1)   per request, only when output_tokens > 1
    ITL  = gaps between consecutive chunks, pooled over all requests
    throughputs = totals / duration (first arrival to last finish)

Cache hit rate = cached prompt tokens / prompt tokens. The optimal hit rate replays the request
stream, in arrival order, into an unbounded page-aligned trie: request i can hit only what
requests before it computed (their prompts and generated tokens that got KV), page-aligned, and
never its own last prompt token (the model must compute it to produce logits), as the engine does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class RequestRecord:
    rid: str
    conversation: int
    turn: int
    prompt_ids: list[int]
    max_new_tokens: int
    arrival: float  # seconds since the run started
    output_ids: list[int] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # arrival of each output chunk
    cached_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_len(self) -> int:
        return len(self.output_ids)

    @property
    def ok(self) -> bool:
        return self.finish_reason in ("stop", "length") and self.error is None and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.arrival

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] - self.arrival

    @property
    def computed_tokens(self) -> list[int]:
        """Tokens whose KV this request computed: the last sampled token is never fed back,
        except when it was followed by a stop token (not part of the output)."""
        tokens = self.prompt_ids + self.output_ids
        return tokens if self.finish_reason == "stop" else tokens[:-1] if self.output_ids else tokens


@dataclass(frozen=True)
class Dist:
    mean: float
    p50: float
    p99: float

    @staticmethod
    def of(values: Sequence[float]) -> Dist:
        if not values:
            return Dist(0.0, 0.0, 0.0)
        a = np.asarray(values, dtype=np.float64)
        return Dist(float(a.mean()), float(np.median(a)), float(np.percentile(a, 99)))


@dataclass(frozen=True)
class Metrics:
    completed: int
    failed: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    request_throughput: float  # req/s
    input_throughput: float  # prompt tok/s
    output_throughput: float  # generated tok/s
    total_throughput: float  # (prompt + generated) tok/s
    ttft_s: Dist
    tpot_s: Dist
    itl_s: Dist
    e2e_s: Dist
    hit_rate: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_metrics(records: Sequence[RequestRecord], duration_s: float | None = None) -> Metrics:
    ok = [r for r in records if r.ok]
    if duration_s is None:
        duration_s = (max(r.chunk_times[-1] for r in ok) - min(r.arrival for r in ok)) if ok else 0.0
    dur = max(duration_s, 1e-9)
    prompt = sum(r.prompt_len for r in ok)
    output = sum(r.output_len for r in ok)
    tpots = [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    itls = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    return Metrics(
        completed=len(ok), failed=len(records) - len(ok), duration_s=duration_s,
        prompt_tokens=prompt, output_tokens=output, cached_tokens=sum(r.cached_tokens for r in ok),
        request_throughput=len(ok) / dur, input_throughput=prompt / dur,
        output_throughput=output / dur, total_throughput=(prompt + output) / dur,
        ttft_s=Dist.of([r.ttft for r in ok]), tpot_s=Dist.of(tpots), itl_s=Dist.of(itls),
        e2e_s=Dist.of([r.e2e for r in ok]), hit_rate=hit_rate(ok),
    )


def hit_rate(records: Iterable[RequestRecord]) -> float:
    recs = list(records)
    prompt = sum(r.prompt_len for r in recs)
    return sum(r.cached_tokens for r in recs) / prompt if prompt else 0.0


def ttft_by_turn(records: Sequence[RequestRecord]) -> dict[int, float]:
    """Mean TTFT per turn index (1-based), for multi-turn workloads."""
    by: dict[int, list[float]] = {}
    for r in records:
        if r.ok:
            by.setdefault(r.turn + 1, []).append(r.ttft)
    return {t: float(np.mean(v)) for t, v in sorted(by.items())}


class PageTrie:
    """Unbounded trie over whole pages of tokens: what an infinite prefix cache would hold."""

    def __init__(self, page_size: int) -> None:
        assert page_size >= 1, f"page_size must be >= 1, got {page_size}"
        self.page_size = page_size
        self.root: dict[tuple[int, ...], dict] = {}

    def match(self, tokens: Sequence[int], limit: int | None = None) -> int:
        """Length of the longest cached page-aligned prefix of ``tokens[:limit]``."""
        ps, node, n = self.page_size, self.root, 0
        end = len(tokens) if limit is None else min(limit, len(tokens))
        while n + ps <= end:
            child = node.get(tuple(tokens[n : n + ps]))
            if child is None:
                break
            node, n = child, n + ps
        return n

    def insert(self, tokens: Sequence[int]) -> None:
        ps, node = self.page_size, self.root
        for n in range(0, len(tokens) - len(tokens) % ps, ps):
            node = node.setdefault(tuple(tokens[n : n + ps]), {})


def optimal_hits(
    stream: Iterable[tuple[Sequence[int], Sequence[int]]], page_size: int
) -> list[int]:
    """Best-possible cached tokens per request of ``(prompt, computed tokens)`` in arrival order.

    A prompt of L tokens can reuse at most floor((L - 1) / page) pages: its last token is always
    recomputed. Then everything it computed (whole pages) becomes available to later requests.

        page 4, prompt  [a b c d|e f g h|i]     hit <= 8 (2 pages; 'i' is computed)
        prompt          [a b c d|e f g h]       hit <= 4 (the last page holds the last token)
    """
    trie = PageTrie(page_size)
    hits = []
    for prompt, computed in stream:
        limit = ((len(prompt) - 1) // page_size) * page_size
        hits.append(trie.match(prompt, limit))
        trie.insert(computed)
    return hits


def optimal_hit_rate(
    stream: Sequence[tuple[Sequence[int], Sequence[int]]], page_size: int
) -> float:
    hits = optimal_hits(stream, page_size)
    total = sum(len(p) for p, _ in stream)
    return sum(hits) / total if total else 0.0


def records_stream(records: Sequence[RequestRecord]) -> list[tuple[list[int], list[int]]]:
    """The measured request stream in arrival order (ties keep submission order)."""
    ordered = sorted(records, key=lambda r: r.arrival)
    return [(r.prompt_ids, r.computed_tokens) for r in ordered]
