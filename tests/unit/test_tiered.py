"""The host tier, case by case: write-back on eviction, host hits and loads, the host LRU,
flush, stats; and the page copies themselves (CPU here, CUDA under the gpu mark)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radixrt.cache import SequencePages
from radixrt.cache.host_pool import HostKVPool
from radixrt.cache.kv_pool import KVPool
from radixrt.cache.native import make_page_allocator
from radixrt.cache.tiered import TieredRadixCache
from radixrt.cache.transfer import PageTransfer, page_runs
from tests.fixtures.radix_backends import ActiveBackend, each_backend, make_tiered, pl  # noqa: F401 (fixture)

PS = 2


# Every test here runs on each radix backend (the Python reference and the native tree).
pytestmark = pytest.mark.usefixtures("each_backend")


def make(gpu_pages: int = 8, host_pages: int = 16, device: str = "cpu") -> TieredRadixCache:
    pool = KVPool(num_layers=2, num_pages=gpu_pages, page_size=PS, num_kv_heads=1, head_dim=4,
                  dtype=torch.float32, device=device)
    host = HostKVPool(num_pages=host_pages, num_layers=2, page_size=PS, num_kv_heads=1,
                      head_dim=4, dtype=torch.float32, pin=device != "cpu")
    return make_tiered(ActiveBackend.name, make_page_allocator(gpu_pages, ActiveBackend.name), PS,
                       PageTransfer(pool, host))


def put(cache: TieredRadixCache, tokens: list[int]) -> list[int]:
    """Compute ``tokens`` (K = token id + position, V = -K) in fresh pages and cache them."""
    seq = SequencePages(PS)
    short = len(tokens) // PS - cache.allocator.num_free
    if short > 0:
        cache.allocator.decref(cache.evict(short))
    assert seq.ensure_capacity(len(tokens), cache.allocator)
    k, v = cache.transfer.pool.all_layers()
    for i, t in enumerate(tokens):
        k[:, seq.pages[i // PS], i % PS] = float(t * 100 + i)
        v[:, seq.pages[i // PS], i % PS] = -float(t * 100 + i)
    res = cache.insert(tokens, seq.pages)
    seq.replace_prefix_pages(res.pages, cache.allocator)
    seq.release(cache.allocator)
    return res.pages


def kv_ok(cache: TieredRadixCache, tokens: list[int], pages: list[int]) -> bool:
    k, v = cache.transfer.pool.all_layers()
    want = torch.tensor([float(t * 100 + i) for i, t in enumerate(tokens[: len(pages) * PS])])
    got_k = k[:, pages, :, 0, 0].reshape(2, -1).cpu()
    got_v = v[:, pages, :, 0, 3].reshape(2, -1).cpu()
    return bool(torch.equal(got_k, want.expand(2, -1)) and torch.equal(got_v, -want.expand(2, -1)))


def load(cache: TieredRadixCache, tokens: list[int]) -> int:
    m = cache.match_prefix(tokens + [0])
    def alloc(n: int) -> list[int] | None:
        short = n - cache.allocator.num_free
        if short > 0:
            cache.allocator.decref(cache.evict(short))
        return cache.allocator.alloc(n)
    n = cache.start_load(m, alloc)
    cache.transfer.synchronize()
    cache.poll()
    return n


def test_gpu_eviction_writes_back_and_a_host_hit_loads_it_again() -> None:
    cache = make()
    a = [1, 2, 3, 4, 5, 6]
    put(cache, a)
    released = cache.evict(3)
    assert len(released) == 3
    cache.allocator.decref(released)
    m = cache.match_prefix(a + [0], record_stats=False)
    assert (m.length, m.host_length) == (0, 6) and cache.stats().host_only_pages == 3
    assert load(cache, a) == 6
    m = cache.match_prefix(a + [0], record_stats=False)
    assert (m.length, m.host_length, m.ready) == (6, 0, True)
    assert kv_ok(cache, a, m.pages), "the loaded pages hold the evicted KV"
    s = cache.stats()
    assert s.host_backup_pages == 3 and s.host_only_pages == 0, "the host keeps its copy"
    assert s.bytes_loaded == s.bytes_written == 3 * cache.transfer.host.page_bytes
    assert s.host_hit_tokens == 6 and s.loaded_tokens == 6
    cache.check_invariants({})
    # Evicting it again needs no copy: the host copy is still there.
    cache.allocator.decref(cache.evict(3))
    assert cache.transfer.stats.writes == 1
    cache.check_invariants({})


def test_a_load_evicted_before_use_counts_as_wasted() -> None:
    cache = make()
    a = [1, 2, 3, 4, 5, 6]
    put(cache, a)
    cache.allocator.decref(cache.evict(3))
    assert load(cache, a) == 6
    cache.allocator.decref(cache.evict(3))  # nobody claimed it: the copy was for nothing
    s = cache.stats()
    assert (s.loaded_tokens, s.load_used_tokens, s.load_wasted_pages) == (6, 0, 3)
    assert load(cache, a) == 6
    m = cache.match_prefix(a + [0], record_stats=False)
    assert cache.claim_loaded(m.handle) == 6 and cache.claim_loaded(m.handle) == 0, "once each"
    cache.allocator.decref(cache.evict(3))  # used, then evicted: not waste
    s = cache.stats()
    assert (s.loaded_tokens, s.load_used_tokens, s.load_wasted_pages) == (12, 6, 3)
    cache.check_invariants({})


def test_eviction_takes_exactly_the_tail_it_needs() -> None:
    cache = make()
    a = [1, 1, 2, 2, 3, 3, 4, 4]
    put(cache, a)
    cache.allocator.decref(cache.evict(1))
    m = cache.match_prefix(a + [0])
    assert (m.length, m.host_length) == (6, 2), "head on the GPU, tail on the host"
    assert kv_ok(cache, a, m.pages)
    cache.check_invariants({})


def test_host_lru_evicts_its_oldest_entries_when_full() -> None:
    cache = make(gpu_pages=4, host_pages=4)
    a, b, c = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
    put(cache, a)
    put(cache, b)  # a is the GPU LRU leaf
    put(cache, c)  # a -> host (2 host pages), GPU holds b, c
    put(cache, [4, 4, 4, 4])  # b -> host; host full (a, b)
    put(cache, [5, 5, 5, 5])  # c -> host: the host evicts a, its oldest
    assert cache.match_prefix(a + [0]).host_length == 0, "a left both tiers"
    assert cache.match_prefix(b + [0]).host_length == 4
    assert cache.match_prefix(c + [0]).host_length == 4
    cache.check_invariants({})


def test_a_full_host_tier_drops_the_evicted_tokens() -> None:
    cache = make(gpu_pages=4, host_pages=1)
    put(cache, [1, 1, 1, 1])
    put(cache, [2, 2, 2, 2])
    put(cache, [3, 3, 3, 3])  # needs 2 pages: [1 1 1 1] goes, and 2 pages do not fit 1 host page
    m = cache.match_prefix([1, 1, 1, 1, 0])
    assert m.length + m.host_length < 4
    cache.check_invariants({})


def test_insert_over_host_only_nodes_adopts_the_callers_pages() -> None:
    cache = make()
    a = [1, 2, 3, 4]
    put(cache, a)
    cache.allocator.decref(cache.evict(2))
    pages = put(cache, a + [5, 6])  # recomputed instead of loaded: the GPU copy is back
    m = cache.match_prefix(a + [5, 6, 0])
    assert (m.length, m.host_length) == (6, 0) and pl(m.pages) == pl(pages)
    assert cache.stats().host_backup_pages == 2
    cache.check_invariants({})


def test_adopted_gpu_pages_are_a_copy_of_the_callers_array() -> None:
    """A host-only node adopting a sequence's pages keeps its own copy: the sequence's buffer
    is rewritten later (dedupe, release), the node's page ids must not follow it."""
    cache = make()
    a = [1, 2, 3, 4]
    put(cache, a)
    cache.allocator.decref(cache.evict(2))  # host-only now
    seq = SequencePages(PS)
    assert seq.ensure_capacity(len(a), cache.allocator)
    mine = seq.pages.tolist()
    res = cache.insert(a, seq.pages)  # adopts the sequence's pages as the node's GPU copy
    assert pl(res.pages) == mine
    seq.pages[:] = 0  # the sequence's buffer changes under the tree's feet
    assert pl(cache.match_prefix(a + [0]).pages) == mine, "the node aliased the caller's buffer"
    seq.pages = mine
    seq.release(cache.allocator)
    cache.check_invariants({})


def test_flush_empties_both_tiers() -> None:
    cache = make()
    put(cache, [1, 2, 3, 4])
    cache.allocator.decref(cache.evict(1))
    put(cache, [7, 7])
    cache.allocator.decref(cache.flush())
    assert cache.num_nodes == 0 and cache.host_cached_tokens == 0
    assert cache.allocator.num_free == cache.allocator.num_total
    assert cache.host_allocator.num_free == cache.host_allocator.num_total
    cache.check_invariants({})


def test_backup_ahead_makes_the_next_eviction_copy_free() -> None:
    cache = make()
    put(cache, [1, 2, 3, 4])
    assert cache.backup_ahead(2) == 2
    assert cache.stats().host_backup_pages == 2
    cache.allocator.decref(cache.evict(2))
    assert cache.transfer.stats.writes == 1, "eviction found the host copy made ahead"
    cache.check_invariants({})


def test_page_runs() -> None:
    assert page_runs(np.array([3, 4, 5, 9, 2, 3], np.int32)) == [(3, 0, 3), (9, 3, 1), (2, 4, 2)]
    assert page_runs(np.zeros(0, np.int32)) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip_through_pinned_memory() -> None:
    cache = make(gpu_pages=64, host_pages=96, device="cuda")
    assert cache.transfer.host.pinned
    toks = [t % 7 for t in range(40)]
    put(cache, toks)
    cache.allocator.decref(cache.evict(20))
    put(cache, [9] * 80)  # reuses the evicted GPU pages right away: the fence must order it
    assert load(cache, toks) == 40
    m = cache.match_prefix(toks + [0])
    assert m.length == 40 and kv_ok(cache, toks, m.pages)
    cache.check_invariants({})


def test_host_tier_sizing() -> None:
    from radixrt.cache.transfer import available_ram_bytes, host_tier_pages, make_host_tier

    cpu = torch.device("cpu")
    assert host_tier_pages(0, 16, 1 << 20, 100, cpu) == 0
    assert host_tier_pages("auto", 16, 1 << 20, 100, cpu) == 0, "auto is off on CPU"
    assert host_tier_pages(33, 16, 1 << 20, 100, cpu) == 3
    huge = 2 * available_ram_bytes()  # tokens at 1 byte each (16-byte pages): twice the RAM
    with pytest.raises(ValueError, match="GiB of RAM"):
        host_tier_pages(huge, 16, 16, 100, cpu)
    pool = KVPool(num_layers=1, num_pages=4, page_size=PS, num_kv_heads=1, head_dim=4,
                  dtype=torch.float32, device="cpu")
    assert make_host_tier(pool, 0) is None
    tier = make_host_tier(pool, 10)
    assert tier is not None and tier.host.num_pages == 5 and not tier.host.pinned
