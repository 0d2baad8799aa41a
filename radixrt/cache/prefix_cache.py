"""The prefix cache's interface, and the cache that caches nothing (``enable_prefix_cache=False``).

The scheduler and ``SequenceMemory`` talk to a cache only through ``PrefixCache``: match the
longest cached prefix, insert computed pages, lock / unlock the path a running sequence reads,
evict (which hands the released page ids back to the caller, who frees them), stats and a
self-check. With a host tier a match may end in a host-only continuation: ``start_load`` gives it
GPU pages and copies it in, ``poll`` (once per step) retires finished copies, ``backup_ahead``
writes the oldest GPU entries down in the background. ``RadixCache`` is the GPU-only tree,
``TieredRadixCache`` adds the host tier (``NativeRadixCache`` / ``NativeTieredRadixCache``: the same
on the native tree), ``NoPrefixCache`` keeps the same code path with nothing
ever shared.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from radixrt.cache.allocator import PageAllocator
from radixrt.cache.radix import (
    CacheStats,
    InsertResult,
    IntArray,
    MatchResult,
    Node,
    RadixCache,
    TokenIds,
    _as_tokens,
)

if TYPE_CHECKING:
    from radixrt.cache.transfer import PageTransfer


class PrefixCache(Protocol):
    page_size: int
    allocator: PageAllocator
    tiered: bool  # has a host tier: matches may end on the host and need a load

    def match_prefix(
        self, tokens: TokenIds, namespace: str | None = None, *, record_stats: bool = True
    ) -> MatchResult: ...

    def insert(
        self, tokens: TokenIds, pages: Sequence[int] | IntArray, namespace: str | None = None
    ) -> InsertResult: ...

    def lock(self, handle: Node) -> None: ...

    def unlock(self, handle: Node) -> None: ...

    def evict(self, num_pages: int) -> IntArray: ...

    def flush(self) -> IntArray: ...

    def start_load(self, match: MatchResult, alloc: Callable[[int], list[int] | None]) -> int: ...

    def poll(self) -> None: ...

    def backup_ahead(self, num_pages: int) -> int: ...

    def claim_loaded(self, handle: Node) -> int: ...

    @property
    def evictable_pages(self) -> int: ...

    @property
    def locked_pages(self) -> int: ...

    @property
    def cached_tokens(self) -> int: ...

    def stats(self) -> CacheStats: ...

    def check_invariants(self, external_refs: Mapping[int, int] | None = None) -> None: ...


class NoPrefixCache:
    """Caches nothing: every match is empty and inserts keep the caller's own pages, so each
    sequence's pages are private and freed when it releases them."""

    tiered = False

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        assert page_size >= 1, f"page_size must be >= 1, got {page_size}"
        self.allocator = allocator
        self.page_size = page_size
        # Handles must be nodes the callers can pass back; a root is never locked.
        self._root = Node(np.zeros(0, np.int32), np.zeros(0, np.int32), None, 0, 0, None,
                          is_root=True)
        self._query_tokens = 0

    def match_prefix(
        self, tokens: TokenIds, namespace: str | None = None, *, record_stats: bool = True
    ) -> MatchResult:
        if record_stats:
            self._query_tokens += len(_as_tokens(tokens))
        return MatchResult([], 0, self._root)

    def insert(
        self, tokens: TokenIds, pages: Sequence[int] | IntArray, namespace: str | None = None
    ) -> InsertResult:
        return InsertResult(self._root, [int(p) for p in pages], 0, False)

    def lock(self, handle: Node) -> None:
        assert handle is self._root, "NoPrefixCache hands out only its root"

    def unlock(self, handle: Node) -> None:
        assert handle is self._root, "NoPrefixCache hands out only its root"

    def evict(self, num_pages: int) -> IntArray:
        return np.zeros(0, np.int32)

    def flush(self) -> IntArray:
        return np.zeros(0, np.int32)

    def start_load(self, match: MatchResult, alloc: Callable[[int], list[int] | None]) -> int:
        return 0

    def poll(self) -> None:
        """Nothing is ever copied."""

    def backup_ahead(self, num_pages: int) -> int:
        return 0

    def claim_loaded(self, handle: Node) -> int:
        return 0

    @property
    def evictable_pages(self) -> int:
        return 0

    @property
    def locked_pages(self) -> int:
        return 0

    @property
    def cached_tokens(self) -> int:
        return 0

    def stats(self) -> CacheStats:
        return CacheStats(
            total_pages=self.allocator.num_total, free_pages=self.allocator.num_free,
            evictable_pages=0, locked_pages=0, cached_tokens=0, num_nodes=0, hit_tokens=0,
            query_tokens=self._query_tokens, hit_rate=0.0, evictions=0,
        )

    def check_invariants(self, external_refs: Mapping[int, int] | None = None) -> None:
        """Every allocated page belongs to a running sequence (nothing is cached)."""
        if external_refs is not None:
            self.allocator.check_refcounts(external_refs, "requests")
        total = self.allocator.num_free + self.allocator.num_used
        assert total == self.allocator.num_total, (
            f"free + private = {total} != {self.allocator.num_total} pages"
        )


def make_prefix_cache(
    allocator: PageAllocator, page_size: int, enabled: bool, transfer: PageTransfer | None = None,
    backend: str | None = None,
) -> PrefixCache:
    """The cache for a config: none, the GPU tree, or the GPU tree over a host tier.

    ``backend`` (``native`` / ``python``; default $RADIXRT_RADIX_BACKEND, else native when
    built) picks the tree's implementation, with or without the host tier."""
    from radixrt.cache.backend import resolve_backend
    from radixrt.cache.native import NativeRadixCache

    if not enabled:
        assert transfer is None, "a host tier needs the prefix cache"
        return NoPrefixCache(allocator, page_size)
    native = resolve_backend(backend) == "native"
    if transfer is not None:
        if native:
            from radixrt.cache.native_tiered import NativeTieredRadixCache

            return cast(PrefixCache, NativeTieredRadixCache(allocator, page_size, transfer))
        from radixrt.cache.tiered import TieredRadixCache

        return TieredRadixCache(allocator, page_size, transfer)
    if native:
        return cast(PrefixCache, NativeRadixCache(allocator, page_size))
    return RadixCache(allocator, page_size)
