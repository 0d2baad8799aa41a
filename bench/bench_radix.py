"""Radix cache micro-benchmark: match / insert / evict cost per token and per node.

Two workloads, each for page_size 1 and 16:
  * wide tree: ~100k nodes (1000 shared "system prompts" x ~100 distinct continuations);
    timed: insert (build), match (full hit / prefix hit), evict (one leaf per call).
  * 32k-token prompts: one 32k-token edge, and a 32k-token path of 512 nodes;
    timed: insert, match (full hit), with tokens given as a numpy array and as a Python list.

Usage:  .venv/bin/python bench/bench_radix.py [--nodes 100000] [--out bench/results/radix.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from radixrt.cache import PageAllocator, RadixCache

VOCAB = 32000
# CPU time of this process, not wall time: the 2-core dev box is shared with other jobs, and
# wall time there mostly measures their load. Single-threaded code, so CPU time == work done.
CLOCK = time.process_time



def _evict_and_free(cache: RadixCache, num_pages: int) -> np.ndarray:
    """Evict as SequenceMemory does: the caller frees the pages the tree hands back."""
    pages = cache.evict(num_pages)
    cache.allocator.decref(pages)
    return pages

def timed(fn: Callable[[], object], repeat: int) -> float:
    """Best-of-3 mean CPU seconds per call over ``repeat`` calls."""
    best = float("inf")
    for _ in range(3):
        t0 = CLOCK()
        for _ in range(repeat):
            fn()
        best = min(best, (CLOCK() - t0) / repeat)
    return best


def wide_tree(page_size: int, nodes: int, rng: np.random.Generator) -> list[dict[str, object]]:
    ps = page_size
    sys_len, tail_len, n_sys = 64, 32, 1000
    n_req = nodes - n_sys  # each request adds one leaf; each system prompt one split-off node
    sys_prompts = rng.integers(0, VOCAB, size=(n_sys, sys_len), dtype=np.int32)
    tails = rng.integers(0, VOCAB, size=(n_req, tail_len), dtype=np.int32)
    seqs = [np.concatenate([sys_prompts[i % n_sys], tails[i]]) for i in range(n_req)]
    pages_per_seq = (sys_len + tail_len) // ps
    alloc = PageAllocator(n_sys * sys_len // ps + n_req * tail_len // ps + 4 * pages_per_seq)
    cache = RadixCache(alloc, ps)

    t_insert = 0.0
    for s in seqs:
        pages = alloc.alloc(pages_per_seq)
        assert pages is not None
        t0 = CLOCK()
        cache.insert(s, pages)
        t_insert += CLOCK() - t0
        alloc.decref(pages)  # the "request" finishes; duplicates of the shared prefix free up
    n_nodes = cache.num_nodes
    rows: list[dict[str, object]] = []
    seq_tokens = sys_len + tail_len
    rows.append(_row("wide", ps, "insert (build)", t_insert / n_req, seq_tokens, 2, n_nodes))

    full = [np.append(s, 1).astype(np.int32) for s in seqs[:2000]]
    it = iter(range(10**9))
    t = timed(lambda: cache.match_prefix(full[next(it) % 2000]), 2000)
    rows.append(_row("wide", ps, "match full hit", t, seq_tokens + 1, 2, n_nodes))
    miss_tail = [np.concatenate([sys_prompts[i], tails[i][::-1]]) for i in range(1000)]
    it2 = iter(range(10**9))
    t = timed(lambda: cache.match_prefix(miss_tail[next(it2) % 1000]), 2000)
    rows.append(_row("wide", ps, "match prefix hit", t, seq_tokens, 1, n_nodes))
    cache.check_invariants({})

    n_evict = 20000
    t0 = CLOCK()
    freed = sum(len(_evict_and_free(cache, 1)) for _ in range(n_evict))
    t = (CLOCK() - t0) / n_evict
    rows.append(_row("wide", ps, "evict 1 leaf", t, freed * ps // n_evict, 1, n_nodes))
    t0 = CLOCK()
    before = cache.num_nodes
    _evict_and_free(cache, cache.evictable_pages)
    t = (CLOCK() - t0) / max(1, before)
    rows.append(_row("wide", ps, "flush (per node)", t, 0, 1, before))
    return rows


def long_prompts(page_size: int, rng: np.random.Generator) -> list[dict[str, object]]:
    ps, n = page_size, 32768
    rows: list[dict[str, object]] = []
    prompt = rng.integers(0, VOCAB, size=n, dtype=np.int32)
    query = np.append(prompt, 7).astype(np.int32)
    query_list = query.tolist()

    # One 32k-token edge.
    alloc = PageAllocator(2 * n // ps + 8)
    cache = RadixCache(alloc, ps)
    pages = alloc.alloc(n // ps)
    assert pages is not None
    t0 = CLOCK()
    cache.insert(prompt, pages)
    rows.append(_row("32k", ps, "insert 1 node", CLOCK() - t0, n, 1, 1))
    t = timed(lambda: cache.match_prefix(query), 50)
    rows.append(_row("32k", ps, "match 1 node (ndarray)", t, n + 1, 1, 1))
    t = timed(lambda: cache.match_prefix(query_list), 20)
    rows.append(_row("32k", ps, "match 1 node (list)", t, n + 1, 1, 1))

    # The same tokens as a 512-node path: prefixes inserted one chunk at a time.
    depth, chunk = 512, n // 512
    cache2 = RadixCache(PageAllocator(n // ps + 8), ps)
    all_pages = cache2.allocator.alloc(n // ps)
    assert all_pages is not None
    for d in range(1, depth + 1):
        cache2.insert(prompt[: d * chunk], all_pages[: d * chunk // ps])
    assert cache2.num_nodes == depth
    t = timed(lambda: cache2.match_prefix(query), 50)
    rows.append(_row("32k", ps, "match 512-node path", t, n + 1, depth, depth))
    t = timed(lambda: cache2.insert(prompt, all_pages), 50)
    rows.append(_row("32k", ps, "insert existing 512-node", t, n, depth, depth))
    return rows


def _row(
    workload: str, ps: int, op: str, sec: float, tokens: int, path_nodes: int, tree_nodes: int
) -> dict[str, object]:
    return {
        "workload": workload,
        "page_size": ps,
        "op": op,
        "us_per_call": sec * 1e6,
        "tokens_per_call": tokens,
        "ns_per_token": sec * 1e9 / tokens if tokens else None,
        "us_per_node": sec * 1e6 / path_nodes,
        "tree_nodes": tree_nodes,
    }


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, Python {platform.python_version()}, numpy {np.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=100_000, help="wide-tree size")
    ap.add_argument("--out", default="bench/results/radix.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows: list[dict[str, object]] = []
    t0 = time.perf_counter()
    for ps in (1, 16):
        rows += wide_tree(ps, args.nodes, rng)
        rows += long_prompts(ps, rng)
    wall = time.perf_counter() - t0

    hdr = f"{'workload':8} {'ps':>3} {'op':26} {'us/call':>10} {'ns/token':>9} {'us/node':>9} {'nodes':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        nspt = f"{r['ns_per_token']:.2f}" if r["ns_per_token"] is not None else "-"
        print(
            f"{r['workload']:8} {r['page_size']:>3} {r['op']:26} {r['us_per_call']:>10.1f} "
            f"{nspt:>9} {r['us_per_node']:>9.2f} {r['tree_nodes']:>7}"
        )
    print(f"machine: {machine()}; times are CPU time per call; total wall {wall:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "wall_s": wall, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
