"""How sequences get, share and give back KV pages: the glue between one sequence's page table,
the page allocator and the radix prefix cache.

Reference rule (see radixrt/cache/radix.py): a page's refcount = (1 if a tree node holds it) +
(number of sequences holding it). A sequence keeps its cache handle locked, and every tree page
it holds lies on that locked path, so eviction only ever frees pages nobody reads.

With a host tier (radixrt/cache/tiered.py) the cache writes evicted pages down before this
class frees them, ``prefix_ready`` starts loading a host-resident prefix back (the request waits
in the queue, nothing else does) and ``poll`` once per step retires finished copies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from radixrt.cache.allocator import PageAllocator
from radixrt.cache.prefix_cache import PrefixCache
from radixrt.engine.request import Sequence


class SequenceMemory:
    def __init__(
        self,
        allocator: PageAllocator,
        cache: PrefixCache,
        page_size: int,
        copy_pages: Callable[[list[int], list[int]], None],
        *,
        backup_ahead_pages: int = 0,
    ) -> None:
        self.allocator = allocator
        self.cache = cache
        self.page_size = page_size
        self._copy_pages = copy_pages
        # Host tier: keep this many of the oldest evictable GPU pages written down ahead of need.
        self._backup_ahead = backup_ahead_pages

    @property
    def available_pages(self) -> int:
        """Pages a new allocation could get: free now, or freed by evicting unlocked cache."""
        return self.allocator.num_free + self.cache.evictable_pages

    def attach_prefix(self, seq: Sequence, max_tokens: int | None = None) -> int:
        """Start (or resume) a sequence on its longest cached prefix (at most ``max_tokens``
        tokens); returns matched tokens."""
        assert not seq.pages.pages and seq.cache_handle is None, f"{seq.rid} already holds memory"
        tokens = seq.token_array()
        if max_tokens is not None:
            tokens = tokens[: max_tokens + 1]  # match_prefix leaves the last token uncached
        if len(tokens) < 2:
            seq.kv_len = 0
            return 0
        match = self.cache.match_prefix(tokens, seq.namespace, record_stats=False)
        self.cache.lock(match.handle)
        seq.cache_handle = match.handle
        seq.pages.adopt_prefix(match.pages, self.allocator)
        seq.kv_len = match.length
        return match.length

    def prefix_ready(self, seq: Sequence, max_tokens: int | None = None) -> bool:
        """False while part of the sequence's cached prefix is still being loaded from the host
        tier (this starts that load when the GPU has room): the caller skips the sequence this
        step and admits others. True when the prefix is usable now, or is to be computed."""
        if not self.cache.tiered:
            return True  # one GPU tier: what matches is usable (and no second match per step)
        tokens = seq.token_array()
        if max_tokens is not None:
            tokens = tokens[: max_tokens + 1]
        if len(tokens) < 2:
            return True
        match = self.cache.match_prefix(tokens, seq.namespace, record_stats=False)
        if match.host_nodes:
            # Load only what admission can then keep: the whole prompt must fit beside it, else
            # the loaded pages would be evicted again before the sequence could use them.
            need = -(-seq.num_tokens // self.page_size) - len(match.pages)
            if need > self.available_pages:
                return True
            if not self.cache.start_load(match, self._alloc_evicting):
                return True  # no GPU room for it now: the sequence computes it instead
            self.cache.poll()  # a copy that already ended (always, on CPU) is usable now
            match = self.cache.match_prefix(tokens, seq.namespace, record_stats=False)
        return match.ready

    def poll(self) -> None:
        """Once per step: retire finished host-tier copies and write the oldest GPU entries
        down ahead of need (so evicting them later waits for no copy)."""
        self.cache.poll()
        if self._backup_ahead:
            self.cache.backup_ahead(self._backup_ahead)

    def _alloc_evicting(self, n: int) -> list[int] | None:
        self._free_up(n)
        return self.allocator.alloc(n)

    def grow(self, seq: Sequence, total_tokens: int) -> bool:
        """Reserve slots for ``total_tokens`` tokens of ``seq``, evicting LRU cache if short."""
        if seq.pages.ensure_capacity(total_tokens, self.allocator):
            return True
        self._free_up(-(-total_tokens // self.page_size) - seq.pages.num_pages)
        return seq.pages.ensure_capacity(total_tokens, self.allocator)

    def _free_up(self, pages: int) -> None:
        """Evict LRU cache so ``pages`` pages are free, if the evictable part can cover it."""
        short = pages - self.allocator.num_free
        if short > 0 and self.cache.evictable_pages >= short:
            self.allocator.decref(self.cache.evict(short))

    def flush_cache(self) -> bool:
        """Drop every unlocked cache entry (both tiers); False if locked entries remain."""
        self.allocator.decref(self.cache.flush())
        return self.cache.evictable_pages == 0 and self.cache.locked_pages == 0

    def commit_progress(self, seq: Sequence) -> None:
        """Insert the sequence's computed full pages into the tree so others can share them.

        Pages the tree already had are swapped into the sequence's page table and its duplicates
        dropped (freed once nothing references them); the lock moves to the deeper node.
        """
        # With overlap, KV may already exist for a token the host has not appended (or dropped,
        # e.g. a matched eos): only tokens both computed and known are shared.
        full_pages = min(seq.kv_len, seq.num_tokens) // self.page_size
        if full_pages == 0:
            return
        tokens = seq.token_array()[: full_pages * self.page_size]
        result = self.cache.insert(tokens, seq.pages.pages[:full_pages], seq.namespace)
        if result.pages != seq.pages.pages[:full_pages]:
            seq.pages.replace_prefix_pages(result.pages, self.allocator)
        self.cache.lock(result.handle)
        if seq.cache_handle is not None:
            self.cache.unlock(seq.cache_handle)
        seq.cache_handle = result.handle

    def release(self, seq: Sequence, *, keep_in_cache: bool = True) -> None:
        """Give back everything the sequence holds (its computed prefix stays in the tree)."""
        if keep_in_cache:
            self.commit_progress(seq)
        if seq.cache_handle is not None:
            self.cache.unlock(seq.cache_handle)
            seq.cache_handle = None
        seq.pages.release(self.allocator)

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """Give ``child`` the parent's KV: shared full pages, a private copy of the partial last page.

            parent pages  [ A | B | C(partial) ]
            child pages   [ A | B | C' ]          A, B shared (refcount +1); C' = copy of C
        """
        full = parent.kv_len // self.page_size
        partial = parent.kv_len % self.page_size
        shared = parent.pages.pages[:full]
        if partial:
            self._free_up(1)
            fresh = self.allocator.alloc(1)
            if fresh is None:
                return False
            self._copy_pages([parent.pages.pages[full]], fresh)
        else:
            fresh = []
        child.pages.adopt_prefix(shared, self.allocator)
        child.pages.pages.extend(fresh)
        child.pages.num_tokens = parent.kv_len
        child.kv_len = parent.kv_len
        if parent.cache_handle is not None:
            self.cache.lock(parent.cache_handle)
            child.cache_handle = parent.cache_handle
        return True

    def tier_stats(self) -> dict[str, float]:
        """The host tier's numbers for ``EngineStats.extra`` (empty without a tier)."""
        s = self.cache.stats()
        if not s.host_total_pages:
            return {}
        return {
            "host_total_pages": s.host_total_pages, "host_free_pages": s.host_free_pages,
            "host_only_pages": s.host_only_pages, "host_backup_pages": s.host_backup_pages,
            "host_loading_pages": s.host_loading_pages, "host_hit_tokens": s.loaded_tokens,
            "host_bytes_loaded": s.bytes_loaded, "host_bytes_written": s.bytes_written,
            "host_load_seconds": s.load_seconds, "host_write_fences": s.write_fences,
        }

    @staticmethod
    def external_refs(seqs: Iterable[Sequence]) -> Counter[int]:
        refs: Counter[int] = Counter()
        for seq in seqs:
            refs.update(seq.pages.pages)
        return refs

    def check_invariants(self, seqs: Iterable[Sequence]) -> None:
        self.cache.check_invariants(self.external_refs(seqs))
