"""The host KV tier in the engine (CPU: both pools in RAM, so every path runs here).

A GPU pool far smaller than the working set plus a host tier holding all of it must give the
same greedy tokens as an unbounded pool, with a hit rate near that optimum, while the same small
pool without the tier loses most of its hits (LRU evicts each history just before its next turn).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from radixrt import Engine, SamplingParams

OUT = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


def chat(eng: Engine, convs: int = 6, turns: int = 4, seed: int = 0) -> tuple[list[list[int]], float]:
    """Round-robin multi-turn chat: every conversation's turn t, then every turn t + 1.
    Returns each answer's tokens and the share of prompt tokens served from the cache."""
    rng = random.Random(seed)
    hist: list[list[int]] = [[rng.randrange(3, 500) for _ in range(24)] for _ in range(convs)]
    answers: list[list[int]] = []
    cached = total = 0
    for _ in range(turns):
        prompts = [h + [rng.randrange(3, 500) for _ in range(rng.randrange(20, 40))] for h in hist]
        outs = eng.generate(prompts, OUT)
        for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
            answers.append(o.token_ids)
            hist[i] = p + o.token_ids
            cached += o.cached_tokens
            total += len(p)
    return answers, cached / total


def test_small_gpu_pool_plus_host_tier_matches_an_unbounded_pool(llama_dir):
    ref = Engine(str(llama_dir), page_size=16, kv_cache_tokens=8192)
    want, best = chat(ref)
    off = Engine(str(llama_dir), page_size=16, kv_cache_tokens=224, debug_invariants=True)
    got_off, rate_off = chat(off)
    tier = Engine(str(llama_dir), page_size=16, kv_cache_tokens=224, host_kv_cache_tokens=4096,
                  debug_invariants=True)
    got, rate = chat(tier)
    assert got == want and got_off == want, "the cache tiers never change an answer"
    assert rate >= 0.95 * best, f"hit rate {rate:.3f} with the tier, {best:.3f} unbounded"
    assert rate_off < 0.7 * best, f"without the tier {rate_off:.3f} (unbounded {best:.3f})"
    st = tier.stats()
    assert st.extra["host_hit_tokens"] > 0 and st.extra["host_bytes_loaded"] > 0
    assert st.extra["host_bytes_written"] > 0, "what was loaded was written down first"
    print(f"hit rate: unbounded {best:.3f}, small pool + host tier {rate:.3f}, small pool "
          f"alone {rate_off:.3f}; loaded {st.extra['host_bytes_loaded']:.0f} B")
    tier.check_invariants()
    assert st.free_pages + st.evictable_pages == st.total_pages, "GPU pages leaked at idle"
    assert tier.flush_cache()
    st = tier.stats()
    assert st.extra["host_free_pages"] == st.extra["host_total_pages"], "host pages left"


def test_cached_tokens_count_a_host_hit(llama_dir):
    eng = Engine(str(llama_dir), page_size=16, kv_cache_tokens=256, host_kv_cache_tokens=2048,
                 debug_invariants=True)
    rng = random.Random(3)
    doc = [rng.randrange(3, 500) for _ in range(160)]
    first = eng.generate([doc + [7, 8]], OUT)[0]
    for _ in range(3):  # other documents push it off the GPU
        eng.generate([[rng.randrange(3, 500) for _ in range(200)]], OUT)
    before = eng.stats().extra["host_hit_tokens"]
    again = eng.generate([doc + [9, 10]], OUT)[0]
    assert again.cached_tokens == 160, f"cached_tokens {again.cached_tokens}: host hit expected"
    assert eng.stats().extra["host_hit_tokens"] - before >= 144, "served by a load from the host"
    cold = Engine(str(llama_dir), page_size=16, kv_cache_tokens=4096)
    assert cold.generate([doc + [9, 10]], OUT)[0].token_ids == again.token_ids
    assert first.cached_tokens == 0
    eng.check_invariants()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tier_with_overlap_matches_an_unbounded_pool(llama_dir):
    """The real asynchronous path: pinned host pages, side-stream copies, events, fences, with
    the overlap schedule; batch-invariant kernels make tokens comparable bitwise across runs."""
    kw = dict(device="cuda", page_size=16, deterministic_inference=True)
    want, best = chat(Engine(str(llama_dir), kv_cache_tokens=8192, **kw), convs=12, turns=5)
    tier = Engine(str(llama_dir), kv_cache_tokens=256, host_kv_cache_tokens=16384,
                  debug_invariants=True, **kw)
    got, rate = chat(tier, convs=12, turns=5)
    assert got == want, "the host tier changed an answer on CUDA"
    assert rate >= 0.95 * best, f"hit rate {rate:.3f} with the tier, {best:.3f} unbounded"
    st = tier.stats()
    assert st.extra["host_hit_tokens"] > 0 and st.extra["host_load_seconds"] > 0
    tier.check_invariants()
    assert tier.flush_cache()
