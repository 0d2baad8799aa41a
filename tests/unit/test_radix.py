"""RadixCache unit tests: splitting, alignment, last-token rule, dedupe, namespaces, eviction."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from radixrt.cache import PageAllocator, RadixCache, SequencePages
from radixrt.cache.prefix_cache import NoPrefixCache
from radixrt.cache.radix import Node
from tests.fixtures.radix_backends import ActiveBackend, each_backend, make_cache, pl  # noqa: F401 (fixture)


class Req:
    """A running request as the scheduler drives it: match -> hold + lock -> compute -> insert
    -> dedupe -> relock -> release."""

    def __init__(self, cache: RadixCache, tokens: list[int], ns: str | None = None) -> None:
        self.cache, self.tokens, self.ns = cache, tokens, ns
        self.seq = SequencePages(cache.page_size)
        m = cache.match_prefix(tokens, ns)
        self.matched = m.length
        self.seq.adopt_prefix(m.pages, cache.allocator)
        cache.lock(m.handle)
        self.handle: Node = m.handle
        assert self.seq.ensure_capacity(len(tokens), cache.allocator), "test pool too small"

    def insert(self, upto: int | None = None) -> int:
        """Cache the page-aligned part of the first ``upto`` tokens (default: all); returns the
        tokens that already existed."""
        k = (len(self.tokens) if upto is None else upto) // self.cache.page_size
        res = self.cache.insert(
            self.tokens[: k * self.cache.page_size], self.seq.pages[:k], self.ns
        )
        self.seq.replace_prefix_pages(res.pages, self.cache.allocator)
        self.cache.lock(res.handle)
        self.cache.unlock(self.handle)
        self.handle = res.handle
        return res.num_existing

    def finish(self, upto: int | None = None) -> None:
        self.insert(upto)
        self.seq.release(self.cache.allocator)
        self.cache.unlock(self.handle)


# Every test here runs on each radix backend (the Python reference and the native tree).
pytestmark = pytest.mark.usefixtures("each_backend")


def cache_with(num_pages: int, page_size: int) -> RadixCache:
    return make_cache(ActiveBackend.name, PageAllocator(num_pages), page_size)


def evict(cache: RadixCache, num_pages: int) -> int:
    """Evict as SequenceMemory does: the caller frees the pages the tree hands back."""
    pages = cache.evict(num_pages)
    cache.allocator.decref(pages)
    return len(pages)


def flush(cache: RadixCache) -> bool:
    evict(cache, cache.evictable_pages)
    return cache.num_nodes == 0


def held(*reqs: Req) -> Counter[int]:
    return Counter(p for r in reqs for p in r.seq.pages)


def put(cache: RadixCache, tokens: list[int], ns: str | None = None) -> list[int]:
    """Cache ``tokens`` (whole pages) as one finished request would; returns the tree pages."""
    req = Req(cache, tokens + [0], ns)  # + a last token the model still has to compute
    req.finish(upto=len(tokens))
    return pl(cache.match_prefix(tokens + [0], ns, record_stats=False).pages)


@pytest.mark.parametrize("page_size", [1, 2, 16])
def test_match_ending_mid_node_splits_it(page_size: int) -> None:
    cache = cache_with(64, page_size)
    ps = page_size
    toks = list(range(100, 100 + 4 * ps))
    pages = put(cache, toks)
    assert len(pages) == 4 and cache.num_nodes == 1
    m = cache.match_prefix(toks[: 2 * ps] + [7] * ps)
    assert m.length == 2 * ps and pl(m.pages) == pages[:2]
    assert cache.num_nodes == 2, "the 4-page edge was split after page 2"
    assert m.handle.pages.tolist() == pages[:2], "the handle covers exactly the returned pages"
    # The lower half kept its pages: the full prefix still matches.
    assert pl(cache.match_prefix(toks + [1]).pages) == pages
    cache.check_invariants({})


@pytest.mark.parametrize("page_size", [1, 4])
def test_insert_diverging_mid_node(page_size: int) -> None:
    cache = cache_with(64, page_size)
    ps = page_size
    a = [1] * (3 * ps)
    b = [1] * ps + [2] * (2 * ps)
    pa = put(cache, a)
    pb = put(cache, b)
    assert pb[0] == pa[0] and pb[1:] != pa[1:], "shared first page, diverging rest"
    assert cache.num_nodes == 3 and cache.cached_tokens == 5 * ps
    assert pl(cache.match_prefix(a + [0]).pages) == pa
    assert pl(cache.match_prefix(b + [0]).pages) == pb
    cache.check_invariants({})


def test_divergence_inside_a_page_matches_only_whole_pages() -> None:
    cache = cache_with(32, 4)
    toks = list(range(12))
    pages = put(cache, toks)
    # Differs at token 6 (inside page 1): only page 0 is reusable.
    probe = toks[:6] + [99] + toks[7:] + [0]
    m = cache.match_prefix(probe)
    assert m.length == 4 and pl(m.pages) == pages[:1]
    cache.check_invariants({})


def test_full_hit_leaves_last_token_uncached() -> None:
    cache = cache_with(32, 4)
    toks = list(range(12))  # exactly 3 pages
    pages = put(cache, toks)
    m = cache.match_prefix(toks)
    assert m.length == 8 and pl(m.pages) == pages[:2], "prompt fully cached -> (k-1) pages"
    assert cache.match_prefix(toks + [5]).length == 12, "one extra token -> all k pages"
    assert cache.match_prefix(toks[:1]).length == 0
    assert cache.match_prefix([]).length == 0


def test_page_size_1_matches_every_token_but_the_last() -> None:
    cache = cache_with(32, 1)
    pages = put(cache, [5, 6, 7, 8])
    assert pl(cache.match_prefix([5, 6, 7, 8]).pages) == pages[:3]
    assert pl(cache.match_prefix([5, 6, 9]).pages) == pages[:2]
    assert cache.match_prefix(np.array([5, 6, 7, 8, 9], dtype=np.int64)).length == 4


def test_insert_rejects_partial_pages() -> None:
    cache = cache_with(8, 4)
    with pytest.raises(AssertionError, match="multiple of page"):
        cache.insert([1, 2, 3], [1])
    with pytest.raises(AssertionError, match="needs 1 pages"):
        cache.insert([1, 2, 3, 4], [1, 2])


def test_duplicate_pages_live_while_held_and_free_on_replace() -> None:
    cache = cache_with(16, 2)
    alloc = cache.allocator
    toks = [1, 2, 3, 4, 5]
    a, b = Req(cache, toks), Req(cache, toks)  # both miss: they compute the same tokens
    assert a.matched == b.matched == 0
    assert a.insert() == 0
    dups = b.seq.pages[:2].tolist()  # a copy: pages is a live view
    # Insert without the dedupe step: the tree keeps a's pages, b's copies stay alive.
    res = cache.insert(toks[:4], dups, None)
    assert res.num_existing == 4 and pl(res.pages) == pl(a.seq.pages[:2]) != dups
    assert all(alloc.refcount(p) == 1 for p in dups), "the tree never adopts or frees them"
    cache.check_invariants(held(a, b))
    # Dedupe: b switches to the tree's pages, its duplicates go back to the free list.
    free_before = alloc.num_free
    b.seq.replace_prefix_pages(res.pages, alloc)
    cache.lock(res.handle)
    cache.unlock(b.handle)
    b.handle = res.handle
    assert alloc.num_free == free_before + 2
    assert all(alloc.refcount(p) == 0 for p in dups)
    assert all(alloc.refcount(p) == 3 for p in res.pages), "tree + a + b"
    cache.check_invariants(held(a, b))
    a.finish()
    b.finish()
    cache.check_invariants({})
    assert flush(cache) and alloc.num_free == alloc.num_total


def test_duplicates_freed_on_release_without_dedupe() -> None:
    cache = cache_with(16, 2)
    a, b = Req(cache, [1, 2, 3]), Req(cache, [1, 2, 3])
    a.insert()
    dup = int(b.seq.pages[0])
    b.seq.release(cache.allocator)
    cache.unlock(b.handle)
    assert cache.allocator.refcount(dup) == 0
    a.finish()
    cache.check_invariants({})


def test_namespaces_never_share_entries() -> None:
    cache = cache_with(32, 2)
    toks = [1, 2, 3, 4]
    p_default = put(cache, toks)
    assert cache.match_prefix(toks + [0], "tenant-a").length == 0
    p_a = put(cache, toks, "tenant-a")
    assert set(p_a).isdisjoint(p_default)
    assert pl(cache.match_prefix(toks + [0], "tenant-a").pages) == p_a
    assert cache.match_prefix(toks + [0], "tenant-b").length == 0
    assert pl(cache.match_prefix(toks + [0]).pages) == p_default
    cache.check_invariants({})
    assert flush(cache)
    assert cache.match_prefix(toks + [0], "tenant-a").length == 0
    assert cache.allocator.num_free == 32
    cache.check_invariants({})  # also checks the emptied namespace root was dropped


def test_eviction_cascades_to_parents_that_become_leaves() -> None:
    cache = cache_with(32, 1)
    put(cache, [1, 2, 3])
    put(cache, [1, 2, 4])  # tree: [1 2] -> {[3], [4]}
    assert cache.num_nodes == 3
    freed = evict(cache, 3)
    assert freed == 3 and cache.num_nodes == 1, "both leaves, then the parent's last page"
    assert cache.match_prefix([1, 2, 3]).length == 1, "the parent's head page stays cached"
    assert evict(cache, 5) == 1 and cache.num_nodes == 0
    assert cache.stats().evictions == 4
    cache.check_invariants({})


def test_lru_order_evicts_least_recently_used_leaf() -> None:
    cache = cache_with(32, 2)
    pa = put(cache, [1, 1, 1, 1])
    pb = put(cache, [2, 2, 2, 2])
    pc = put(cache, [3, 3, 3, 3])
    cache.match_prefix([1, 1, 1, 1, 0])  # a is now the most recent
    assert evict(cache, 1) == 1, "exactly the pages asked for, from the tail of a leaf"
    assert cache.allocator.refcount(pb[1]) == 0 and cache.allocator.refcount(pb[0]) == 1
    assert evict(cache, 1) == 1
    assert all(cache.allocator.refcount(p) == 0 for p in pb), "b was least recently used"
    assert evict(cache, 2) == 2
    assert all(cache.allocator.refcount(p) == 0 for p in pc)
    assert all(cache.allocator.refcount(p) == 1 for p in pa)
    cache.check_invariants({})


def test_partial_match_touches_only_the_matched_part() -> None:
    cache = cache_with(32, 1)
    put(cache, [1, 2, 3, 4])
    put(cache, [9, 9])
    cache.match_prefix([1, 2, 7])  # touches [1 2] only; splits off [3 4]
    # [3 4] keeps its old time, older than [9 9]: it goes first, tail page first.
    assert evict(cache, 1) == 1 and cache.cached_tokens == 5
    assert evict(cache, 1) == 1 and cache.cached_tokens == 4
    assert cache.match_prefix([1, 2, 3, 4, 0]).length == 2
    assert cache.match_prefix([9, 9, 0]).length == 2
    cache.check_invariants({})


def test_locked_path_is_never_evicted() -> None:
    cache = cache_with(32, 2)
    put(cache, [1, 2, 3, 4])
    req = Req(cache, [1, 2, 3, 4, 5, 6])  # holds + locks the cached [1 2 3 4]
    assert req.matched == 4
    put(cache, [7, 7])
    assert cache.locked_pages == 2 and cache.evictable_pages == 1
    assert evict(cache, 100) == 1
    assert cache.match_prefix([1, 2, 3, 4, 0]).length == 4
    assert not flush(cache), "locked nodes remain"
    cache.check_invariants(held(req))
    req.finish()
    assert flush(cache) and cache.allocator.num_free == 32


def test_unlock_below_zero_and_lock_of_evicted_node_fail() -> None:
    cache = cache_with(8, 1)
    res = cache.insert([1, 2], [*cache.allocator.alloc(2)])  # type: ignore[misc]
    with pytest.raises(AssertionError, match="below zero"):
        cache.unlock(res.handle)
    evict(cache, 2)
    with pytest.raises(AssertionError, match="evicted"):
        cache.lock(res.handle)


def test_split_keeps_locked_handles_consistent() -> None:
    cache = cache_with(32, 1)
    put(cache, [1, 2, 3, 4, 5])
    req = Req(cache, [1, 2, 3, 4, 5, 6])  # locks the whole 5-token node
    cache.match_prefix([1, 2, 9])  # splits the locked node under the request
    assert cache.locked_pages == 5
    cache.check_invariants(held(req))
    req.finish()
    assert cache.locked_pages == 0 and cache.evictable_pages == 6
    cache.check_invariants({})


def test_disabled_cache_matches_nothing_adopts_nothing() -> None:
    cache = NoPrefixCache(PageAllocator(16), 2)
    req = Req(cache, [1, 2, 3, 4, 5])  # type: ignore[arg-type]
    assert req.insert() == 0
    assert cache.cached_tokens == 0 and cache.stats().num_nodes == 0
    assert Req(cache, [1, 2, 3, 4, 5]).matched == 0
    st = cache.stats()
    assert st.query_tokens == 10 and st.hit_tokens == 0 and st.hit_rate == 0.0


def test_stats_count_hits_and_queries() -> None:
    cache = cache_with(16, 2)
    put(cache, [1, 2, 3, 4])
    base = cache.stats()
    cache.match_prefix([1, 2, 3, 4, 5, 6])
    cache.match_prefix([1, 2, 3, 4, 5, 6], record_stats=False)
    st = cache.stats()
    assert st.query_tokens - base.query_tokens == 6
    assert st.hit_tokens - base.hit_tokens == 4
    assert (st.num_nodes, st.cached_tokens, st.evictable_pages, st.locked_pages) == (1, 4, 2, 0)
    assert st.free_pages + st.evictable_pages == st.total_pages


def test_check_invariants_catches_a_leak_and_a_wrong_refcount() -> None:
    cache = cache_with(8, 1)
    put(cache, [1, 2])
    cache.allocator.alloc(1)  # allocated, held by nobody known
    with pytest.raises(AssertionError, match=r"\(1 held by no one\)"):
        cache.check_invariants({})
    tree_page = cache.match_prefix([1, 2, 0]).pages[0]
    cache.allocator.incref([tree_page])  # an unaccounted extra reference
    with pytest.raises(AssertionError, match=f"page {tree_page}"):
        cache.check_invariants({})
