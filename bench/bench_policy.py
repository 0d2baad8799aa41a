"""Scheduler planning time per step with a long waiting queue (lpm: cache-aware order).

    .venv/bin/python bench/bench_policy.py [--waiting 4096] [--prompt 8192] [--steps 40]
        [--policy lpm] [--stems cached|cold]

Queues ``--waiting`` requests of ``--prompt`` tokens that share four stems (the RAG /
system-prompt shape: a stem of ``prompt - 192`` tokens plus a unique 192-token tail), then runs
real scheduler steps on a model that computes nothing (zero logits; the forward is not timed)
and times the planning half of each step: decode slots, chunk continuation, waiting-queue order
and admission. ``cached``: the stems are in the tree when the queue forms (after the first
request of each family); ``cold``: nothing is cached; ``unique``: every request has its own
cached history (multi-turn chat: one radix node per waiting request). Prints one JSON line per run with the mean
/ p50 / p95 / max planning ms over the measured steps (wall, and this thread's CPU time, which
other processes on a shared machine disturb less), and how many matches were redone.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import torch

from radixrt.attention.torch_ref import TorchReferenceBackend
from radixrt.cache.allocator import PageAllocator
from radixrt.cache.kv_pool import KVPool
from radixrt.cache.radix import RadixCache
from radixrt.config import EngineConfig
from radixrt.engine.memory import SequenceMemory
from radixrt.engine.runner import ModelRunner
from radixrt.engine.sampler import Sampler
from radixrt.engine.scheduler import Scheduler
from radixrt.sampling_params import SamplingParams

VOCAB = 1000
TAIL = 192


class NullModel(torch.nn.Module):
    """No compute: the scheduler's host work is what is measured."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Any) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], 1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros(hidden.shape[0], VOCAB)


def run(waiting: int, prompt: int, steps: int, policy: str, stems: str) -> dict[str, Any]:
    ps = 16
    stem_len = (prompt - TAIL) // ps * ps
    max_running = 256
    # The stems, plus every running request's tail and output, with room to spare.
    families = waiting if stems == "unique" else 4
    pages = families * stem_len // ps + (max_running + 64) * (-(-(prompt - stem_len + 16) // ps)) + 4096
    pool = KVPool(num_layers=1, num_pages=pages, page_size=ps, num_kv_heads=1, head_dim=2,
                  dtype=torch.float32, device="cpu")
    allocator = PageAllocator(pages)
    cache = RadixCache(allocator, ps)
    config = EngineConfig(page_size=ps, kv_cache_tokens=pages * ps, schedule_policy=policy,  # type: ignore[arg-type]
                          max_running_requests=max_running, overlap_schedule=False)
    sched = Scheduler(
        config, ModelRunner(NullModel(), pool, TorchReferenceBackend(1, 1, 2, 1.0),
                            max_running_requests=max_running),
        SequenceMemory(allocator, cache, ps, pool.copy_pages), Sampler(),
        vocab_size=VOCAB, max_context_len=4 * prompt, eos_token_ids=(),
    )
    rng = random.Random(0)
    heads = [[rng.randrange(VOCAB) for _ in range(stem_len)] for _ in range(families)]
    if stems != "cold":  # as after the first request of each family (unique: a chat's history)
        for stem in heads:
            got = allocator.alloc(stem_len // ps)
            assert got is not None, "pool too small for the stems"
            cache.insert(stem, got)
            allocator.decref(got)
    params = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    for i in range(waiting):
        tail = [rng.randrange(VOCAB) for _ in range(prompt - stem_len)]
        sched.add_request(f"r{i}", heads[i % families] + tail, params)

    timed: list[float] = []
    cpu: list[float] = []  # this thread's CPU time: steadier than wall time on a shared box
    plan = sched._schedule

    def timed_plan(deltas: list) -> list:  # type: ignore[type-arg]
        t, c = time.perf_counter(), time.thread_time()
        work = plan(deltas)
        timed.append((time.perf_counter() - t) * 1e3)
        cpu.append((time.thread_time() - c) * 1e3)
        return work

    sched._schedule = timed_plan  # type: ignore[method-assign]
    for _ in range(steps):
        sched.step()
    ms, cms = sorted(timed), sorted(cpu)
    return {
        "bench": "scheduler_planning", "policy": policy, "stems": stems,
        "waiting": waiting, "prompt_tokens": prompt, "steps": len(ms),
        "still_waiting": len(sched.waiting), "running": len(sched.running),
        "plan_ms_mean": round(statistics.fmean(ms), 3), "plan_ms_p50": round(ms[len(ms) // 2], 3),
        "plan_ms_p95": round(ms[int(len(ms) * 0.95)], 3), "plan_ms_max": round(ms[-1], 3),
        "plan_cpu_ms_mean": round(statistics.fmean(cms), 3),
        "plan_cpu_ms_p50": round(cms[len(cms) // 2], 3),
        "plan_cpu_ms_p95": round(cms[int(len(cms) * 0.95)], 3),
        "rematches": getattr(sched.waiting, "rematches", None),  # None: a build without it
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--waiting", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--policy", choices=["lpm", "fcfs"], default="lpm")
    ap.add_argument("--stems", choices=["cached", "cold", "unique"], default="cached")
    a = ap.parse_args()
    print(json.dumps(run(a.waiting, a.prompt, a.steps, a.policy, a.stems)), flush=True)


if __name__ == "__main__":
    main()
