"""Offline driver: run a workload through an in-process EngineCore and time every token.

Imports nothing from radixrt.server (the GPU image lacks its dependencies). All conversations
start at t=0; a conversation's next turn arrives the moment its previous turn finishes (closed
loop, like a chat client). A step's deltas are stamped when ``step()`` returns: sampled token ids
are already on the host then, so the stamp is when a streaming client could have seen them.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from bench.metrics import RequestRecord
from bench.workloads import Histories, Workload
from radixrt.config import EngineConfig
from radixrt.engine.core import EngineCore
from radixrt.engine.warmup import freeze_startup_objects
from radixrt.sampling_params import SamplingParams

STATS_EVERY = 16  # steps between engine-stats polls (for peak KV pages); stats() is O(pages)

_run_ids = itertools.count()


@dataclass
class RunOutput:
    records: list[RequestRecord]
    duration_s: float
    dropped_turns: int
    peak_pages_used: int  # pages not free (running requests + cached tree)
    peak_pages_pinned: int  # pages running requests need (not evictable)
    total_pages: int
    engine: dict[str, Any]


def build_core(model: str, *, device: str, dtype: str, load_format: str, page_size: int,
               kv_cache_tokens: int | None, enable_prefix_cache: bool, schedule_policy: str,
               max_running_requests: int, mem_fraction: float, seed: int,
               host_kv_cache_tokens: int = 0, max_prefill_tokens: int | None = None,
               engine_warmup: bool | None = None,
               piecewise_max_tokens: int | None = None,
               prefill_attention: str = "triton") -> EngineCore:
    # max_prefill_tokens (None: the engine default) also caps the chunk, which may not exceed it.
    overrides: dict[str, int] = {} if max_prefill_tokens is None else {
        "max_prefill_tokens": max_prefill_tokens,
        "chunked_prefill_size": min(EngineConfig.chunked_prefill_size, max_prefill_tokens)}
    if piecewise_max_tokens is not None:  # None: the engine default
        overrides["piecewise_cuda_graph_max_tokens"] = piecewise_max_tokens
    cfg = EngineConfig(
        model=model, device=device, dtype=dtype, load_format=load_format,  # type: ignore[arg-type]
        page_size=page_size, kv_cache_tokens=kv_cache_tokens,
        enable_prefix_cache=enable_prefix_cache, schedule_policy=schedule_policy,  # type: ignore[arg-type]
        max_running_requests=max_running_requests, mem_fraction=mem_fraction, seed=seed,
        host_kv_cache_tokens=host_kv_cache_tokens, warmup=engine_warmup,
        prefill_attention=prefill_attention,  # type: ignore[arg-type]
        **overrides,  # type: ignore[arg-type]
    )
    core = EngineCore(cfg)
    freeze_startup_objects()  # as the server's worker process does after start-up
    return core


def params_for(max_new_tokens: int) -> SamplingParams:
    # Greedy, exact lengths: the benchmark measures the engine, not the sampler or EOS luck.
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)


def warmup(core: EngineCore, vocab_size: int, prompt_lens: tuple[int, ...] = (1024, 300, 64)) -> None:
    """Compile kernels / fill allocator caches outside the timed runs, then empty the cache."""
    hi = max(4, int(vocab_size * 0.9))
    limit = core.model_info.max_context_len - 16
    for i, n in enumerate(prompt_lens):
        n = max(2, min(n, limit))
        core.add_request(f"warmup-{next(_run_ids)}-{i}", [3 + (j * 7919 + i) % (hi - 3) for j in range(n)],
                         params_for(8))
    while core.has_work():
        core.step()
    core.flush_cache()


def step_summary(step_s: list[float]) -> dict[str, Any]:
    """Wall ms of the engine's steps: median, p99, sum, and the five slowest with their index
    (a stall, such as a kernel compile, shows as one step far above the rest)."""
    if not step_s:
        return {}
    ms = sorted(x * 1e3 for x in step_s)
    slowest = sorted(range(len(step_s)), key=lambda i: -step_s[i])[:5]
    return {"p50": round(ms[len(ms) // 2], 2), "p99": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
            "sum": round(sum(ms), 1), "slowest": [[i, round(step_s[i] * 1e3, 1)] for i in slowest]}


def run_offline(core: EngineCore, workload: Workload, *, progress: bool = True,
                desc: str = "") -> RunOutput:
    run = next(_run_ids)
    hist = Histories(workload, core.model_info.max_context_len)
    records: dict[str, RequestRecord] = {}
    order: list[RequestRecord] = []
    dropped = 0
    bar = tqdm(total=workload.num_requests, desc=desc or workload.name, unit="req",
               disable=not progress, mininterval=1.0)

    def submit(conv: int, turn: int, now: float) -> None:
        nonlocal dropped
        prompt = hist.prompt(conv, turn)
        if prompt is None:  # would not fit the context: the conversation ends here
            dropped += len(workload.conversations[conv].turns) - turn
            bar.update(len(workload.conversations[conv].turns) - turn)
            return
        t = workload.conversations[conv].turns[turn]
        rec = RequestRecord(f"b{run}-{conv}-{turn}", conv, turn, prompt, t.max_new_tokens, now)
        core.add_request(rec.rid, prompt, params_for(t.max_new_tokens))
        records[rec.rid] = rec
        order.append(rec)

    stats = core.stats()
    total_pages = stats.total_pages
    peak_used = peak_pinned = 0
    t0 = time.perf_counter()
    for c in range(len(workload.conversations)):
        submit(c, 0, 0.0)
    steps = 0
    step_s: list[float] = []
    while core.has_work():
        t_step = time.perf_counter()
        deltas = core.step()
        now = time.perf_counter() - t0
        step_s.append(time.perf_counter() - t_step)
        for d in deltas:
            rec = records[d.rid]
            if d.new_token_ids:
                rec.output_ids.extend(d.new_token_ids)
                rec.chunk_times.append(now)
            rec.cached_tokens = d.cached_tokens
            if d.finished:
                rec.finish_reason, rec.error = d.finish_reason, d.error
                bar.update(1)
                hist.finish(rec.conversation, rec.prompt_ids, rec.output_ids)
                if hist.has_turn(rec.conversation, rec.turn + 1):
                    submit(rec.conversation, rec.turn + 1, now)
        steps += 1
        if steps % STATS_EVERY == 1:
            s = core.stats()
            peak_used = max(peak_used, s.total_pages - s.free_pages)
            peak_pinned = max(peak_pinned, s.total_pages - s.free_pages - s.evictable_pages)
    duration = time.perf_counter() - t0
    bar.close()
    s = core.stats()
    engine = {"steps": steps, "evictions": s.evictions - stats.evictions,
              "retractions": s.retractions - stats.retractions, "total_pages": s.total_pages,
              "step_ms": step_summary(step_s)}
    # Host tier (engine totals since start; absent with the tier off).
    engine.update({k: v for k, v in s.extra.items() if k.startswith("host_")})
    return RunOutput(order, duration, dropped, peak_used, peak_pinned, total_pages, engine)
