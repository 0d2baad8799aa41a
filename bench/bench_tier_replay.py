"""Hit rate of the tiered prefix cache alone (no model), replaying a workload's request stream.

Each request in arrival order: match (GPU prefix + host continuation), load the continuation,
hold the GPU prefix, allocate and "compute" the rest, insert prompt + output, release. Pools are
real (GPU layout and host layout) but one value wide, so the full-scale stream replays on a CPU.
Compares GPU-only and GPU + host tier at the same GPU size against the optimal hit rate (an
unbounded cache). Prints one JSON line per configuration.

    python bench/bench_tier_replay.py --scale 8 --gpu-tokens 150000 --host-tokens 800000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.metrics import optimal_hit_rate
from bench.workloads import expected_stream, make_workload
from radixrt.cache import PageAllocator, SequencePages
from radixrt.cache.kv_pool import KVPool
from radixrt.cache.prefix_cache import make_prefix_cache
from radixrt.cache.transfer import make_host_tier


def replay(stream: list[tuple[list[int], list[int]]], ps: int, gpu_tokens: int,
           host_tokens: int) -> dict[str, float | None]:
    pages = -(-gpu_tokens // ps)
    pool = KVPool(num_layers=1, num_pages=pages, page_size=ps, num_kv_heads=1, head_dim=1,
                  dtype=torch.float16, device="cpu")
    alloc = PageAllocator(pages)
    tier = make_host_tier(pool, host_tokens) if host_tokens else None
    cache = make_prefix_cache(alloc, ps, True, tier)

    def free_up(n: int) -> None:
        short = n - alloc.num_free
        if short > 0:
            alloc.decref(cache.evict(short))

    def alloc_pages(n: int) -> list[int] | None:
        free_up(n)
        return alloc.alloc(n)

    hit = total = 0
    t0 = time.perf_counter()
    for prompt, full in stream:
        total += len(prompt)
        m = cache.match_prefix(prompt)
        if m.host_nodes and cache.start_load(m, alloc_pages):
            cache.poll()  # CPU copies finish at once
            m = cache.match_prefix(prompt, record_stats=False)
        hit += m.length
        seq = SequencePages(ps)
        seq.adopt_prefix(m.pages, alloc)
        cache.lock(m.handle)
        if not seq.ensure_capacity(len(full), alloc):
            free_up(-(-len(full) // ps) - seq.num_pages)
            assert seq.ensure_capacity(len(full), alloc), "pool smaller than one request"
        k = len(full) // ps
        res = cache.insert(full[: k * ps], seq.pages[:k])
        seq.replace_prefix_pages(res.pages, alloc)
        cache.unlock(m.handle)
        seq.release(alloc)
        cache.backup_ahead(64)
    secs = time.perf_counter() - t0
    s = cache.stats()
    return {"gpu_tokens": gpu_tokens, "host_tokens": host_tokens, "hit_rate": round(hit / total, 4),
            "loaded_tokens": s.loaded_tokens,
            "written_tokens": s.bytes_written // tier.host.page_bytes * ps if tier else 0,
            "write_fences": s.write_fences, "replay_s": round(secs, 2), "us_per_request": round(secs / len(stream) * 1e6, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="chat")
    p.add_argument("--scale", type=float, default=8)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--gpu-tokens", type=int, default=150_000)
    p.add_argument("--host-tokens", type=int, default=800_000)
    p.add_argument("--vocab", type=int, default=128_256)
    args = p.parse_args()
    w = make_workload(args.workload, args.vocab, seed=0, scale=args.scale, len_scale=1.0)
    # (prompt, prompt + output); distinct stand-in outputs (as in expected_stream) keep the
    # sharing structure exact.
    stream, fresh = [], -1
    for prompt, out_len in expected_stream(w):
        stream.append((prompt, prompt + list(range(fresh, fresh - out_len, -1))))
        fresh -= out_len
    opt = optimal_hit_rate(stream, args.page_size)
    final: dict[int, int] = {}  # the longest prompt + output per first page: each history's end
    for prompt, full in stream:
        key = hash(tuple(prompt[: args.page_size]))
        final[key] = max(final.get(key, 0), len(full))
    print(json.dumps({"workload": w.name, "scale": args.scale, "requests": len(stream),
                      "optimal_hit_rate": round(opt, 4), "working_set_tokens": sum(final.values())}),
          flush=True)
    for host in (0, args.host_tokens):
        row = replay(stream, args.page_size, args.gpu_tokens, host)
        rate = row["hit_rate"]
        row["hit_over_optimal"] = round(rate / opt, 4) if opt and rate is not None else None
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
