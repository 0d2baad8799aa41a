"""CPU cost of ordering the waiting queue (lpm: a radix match per waiting request per step).

    .venv/bin/python bench/bench_policy.py [--waiting 128] [--prompt 8000]

Prints the mean time of one ``order_waiting`` call over a queue of long prompts that share four
cached stems (the RAG / system-prompt shape), the per-step cost a long queue adds.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from radixrt.attention.torch_ref import TorchReferenceBackend
from radixrt.cache.allocator import PageAllocator
from radixrt.cache.kv_pool import KVPool
from radixrt.cache.radix import RadixCache
from radixrt.config import EngineConfig
from radixrt.engine.memory import SequenceMemory
from radixrt.engine.policy import order_waiting
from radixrt.engine.runner import ModelRunner
from radixrt.engine.sampler import Sampler
from radixrt.engine.scheduler import Scheduler
from radixrt.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--waiting", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=8000)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    ps, pages = 16, 4 * a.prompt // 16 + 64
    pool = KVPool(num_layers=1, num_pages=pages, page_size=ps, num_kv_heads=1, head_dim=2,
                  dtype=torch.float32, device="cpu")
    allocator = PageAllocator(pages)
    cache = RadixCache(allocator, ps)
    sched = Scheduler(
        EngineConfig(page_size=ps, kv_cache_tokens=pages * ps),
        ModelRunner(torch.nn.Identity(), pool, TorchReferenceBackend(1, 1, 2, 1.0)),
        SequenceMemory(allocator, cache, ps, pool.copy_pages), Sampler(),
        vocab_size=1000, max_context_len=10 * a.prompt, eos_token_ids=(),
    )
    rng = random.Random(0)
    stems = [[rng.randrange(1000) for _ in range(a.prompt)] for _ in range(4)]
    for stem in stems:  # the stems are cached, as after the first request of each family
        n = len(stem) // ps
        got = allocator.alloc(n)
        assert got is not None
        cache.insert(stem[: n * ps], got)
        allocator.decref(got)
    for i in range(a.waiting):
        tail = [rng.randrange(1000) for _ in range(50)]
        sched.add_request(f"r{i}", stems[i % 4] + tail, SamplingParams(max_new_tokens=4))
    order_waiting(sched.waiting, cache, "lpm")
    t = time.perf_counter()
    for _ in range(a.reps):
        order_waiting(sched.waiting, cache, "lpm")
    ms = (time.perf_counter() - t) / a.reps * 1e3
    print(f"order_waiting(lpm): {a.waiting} waiting x {a.prompt + 50} tokens: {ms:.2f} ms/step")


if __name__ == "__main__":
    main()
