"""How sequences get, share and give back KV pages: the glue between one sequence's page table,
the page allocator and the radix prefix cache.

Reference rule (see radixrt/cache/radix.py): a page's refcount = (1 if a tree node holds it) +
(number of sequences holding it). A sequence keeps its cache handle locked, and every tree page
it holds lies on that locked path, so eviction only ever frees pages nobody reads.

With a host tier (radixrt/cache/tiered.py) the cache writes evicted pages down before this
class frees them, ``prefix_ready`` starts loading a host-resident prefix back (the request waits
in the queue, nothing else does) and ``poll`` once per step retires finished copies.

A load is only worth its bytes if the request reads them, so (measured on an H200: unbounded
loads moved 7x the bytes the hits needed, each evicted and loaded again before admission)::

    prefix_ready(seq, room)  start a load only when the request fits ``room`` (what admission can
                             take within about a step: pages beyond what the running sequences
                             are owed, prefill tokens, running slots), counting what earlier
                             reserved loads still need; the loaded pages stay *reserved* (locked
                             for that waiting request) until it is admitted or ends
    poll()                   drops reservations of admitted/ended requests, and stale ones
    grow/_free_up            a running sequence short of pages takes reservations back before it
                             would have to retract anybody
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from radixrt.cache.allocator import PageAllocator
from radixrt.cache.node import Node
from radixrt.cache.prefix_cache import PrefixCache
from radixrt.engine.request import SeqStatus, Sequence

# A reservation not admitted after this many steps is given back (its pages stay cached,
# evictable): the request fell behind in the policy order, others need the room.
RESERVE_MAX_STEPS = 4


@dataclass(frozen=True)
class LoadRoom:
    """What admission can still take soon; a host load starts only for a request inside it."""

    pages: int  # GPU pages free or evictable beyond what the running sequences are owed
    tokens: int  # prefill tokens admission may still take (this step's budget left + one step)
    seqs: int  # running slots left

    def __post_init__(self) -> None:
        assert self.tokens >= 0 and self.seqs >= 0, f"negative load room {self}"


@dataclass
class _Reservation:
    seq: Sequence
    handle: Node  # deepest loaded node, locked once for ``seq``
    rest_pages: int  # pages the prompt still needs beyond the cached (incl. loaded) prefix
    rest_tokens: int  # prompt tokens still to compute
    age: int = 0


def load_waste_ratio(loaded_tokens: float, used_tokens: float) -> float:
    """Host tokens loaded per loaded token a sequence used (1.0: no load was wasted)."""
    return loaded_tokens / used_tokens if used_tokens else float(loaded_tokens > 0)


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
        self._reserved: dict[int, _Reservation] = {}  # id(seq) -> loaded prefix held for it

    @property
    def available_pages(self) -> int:
        """Pages a new allocation could get: free now, or freed by evicting unlocked cache."""
        return self.allocator.num_free + self.cache.evictable_pages

    def attach_prefix(self, seq: Sequence, max_tokens: int | None = None) -> int:
        """Start (or resume) a sequence on its longest cached prefix (at most ``max_tokens``
        tokens); returns matched tokens."""
        assert seq.pages.num_pages == 0 and seq.cache_handle is None, (
            f"{seq.rid} already holds memory")
        tokens = seq.token_array()
        if max_tokens is not None:
            tokens = tokens[: max_tokens + 1]  # match_prefix leaves the last token uncached
        if len(tokens) < 2:
            seq.kv_len = 0
            return 0
        match = self.cache.match_prefix(tokens, seq.namespace, record_stats=False)
        self.cache.lock(match.handle)
        self.cache.claim_loaded(match.handle)
        seq.cache_handle = match.handle
        seq.pages.adopt_prefix(match.pages, self.allocator)
        seq.kv_len = match.length
        return match.length

    def prefix_ready(self, seq: Sequence, max_tokens: int | None = None,
                     room: LoadRoom | None = None) -> bool:
        """False while part of the sequence's cached prefix is still being loaded from the host
        tier (this starts that load when it fits ``room``, or without ``room`` when the whole
        prompt fits the GPU): the caller skips the sequence this step and admits others. True
        when the prefix is usable now, or is to be computed (admission then decides)."""
        if not self.cache.tiered:
            return True  # one GPU tier: what matches is usable (and no second match per step)
        tokens = seq.token_array()
        if max_tokens is not None:
            tokens = tokens[: max_tokens + 1]
        if len(tokens) < 2:
            return True
        match = self.cache.match_prefix(tokens, seq.namespace, record_stats=False)
        if id(seq) in self._reserved or not match.host_nodes:
            return match.ready  # already loaded (or loading) for it, or nothing on the host
        host_pages = match.host_length // self.page_size
        rest_pages = max(0, -(-seq.num_tokens // self.page_size) - len(match.pages) - host_pages)
        if room is None:
            if host_pages + rest_pages > self.available_pages:
                return True  # would be evicted again before the sequence could use it
        else:
            if host_pages + rest_pages > room.pages:
                return True  # does not fit even alone: admission stops here (or computes it)
            owed = list(self._reserved.values())  # none: this request is the first to load
            compute = seq.num_tokens - match.length - match.host_length
            if owed and (host_pages + rest_pages + sum(r.rest_pages for r in owed) > room.pages
                         or sum(r.rest_tokens for r in owed) + compute > room.tokens
                         or len(owed) >= room.seqs):
                return False  # admission takes the earlier reservations first: wait
        if not self.cache.start_load(match, self._alloc_evicting):
            return True  # no GPU room for it now: the sequence computes it instead
        self.cache.poll()  # a copy that already ended (always, on plain CPU) is usable now
        match = self.cache.match_prefix(tokens, seq.namespace, record_stats=False)
        assert not match.host_nodes, f"{seq.rid}: a load left host nodes in its match"
        self.cache.lock(match.handle)  # reserved for seq: eviction cannot waste the load
        self._reserved[id(seq)] = _Reservation(
            seq, match.handle, rest_pages, max(0, seq.num_tokens - match.length))
        return match.ready

    @property
    def reserved_requests(self) -> int:
        return len(self._reserved)

    def _settle_reservations(self, age: bool) -> None:
        """Give back reservations of requests admitted (their own lock covers the path now),
        ended, or (``age``) waiting too many steps since the load finished."""
        for key, r in list(self._reserved.items()):
            r.age += age and r.handle.load_seq == 0  # steps counted once the load is done
            if r.seq.status is not SeqStatus.WAITING or r.age > RESERVE_MAX_STEPS:
                self._drop_reservation(key)

    def _drop_reservation(self, key: int) -> None:
        self.cache.unlock(self._reserved.pop(key).handle)

    def poll(self) -> None:
        """Once per step: retire finished host-tier copies and write the oldest GPU entries
        down ahead of need (so evicting them later waits for no copy)."""
        self.cache.poll()
        if self._reserved:
            self._settle_reservations(age=True)
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
        if short > 0 and self._reserved and self.cache.evictable_pages < short:
            self._settle_reservations(age=False)
            for key in reversed(list(self._reserved)):  # the newest reservations give way
                if self.cache.evictable_pages >= short:
                    break
                self._drop_reservation(key)
        if short > 0 and self.cache.evictable_pages >= short:
            self.allocator.decref(self.cache.evict(short))

    def flush_cache(self) -> bool:
        """Drop every unlocked cache entry (both tiers); False if locked entries remain."""
        self._settle_reservations(age=False)
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
        if result.differs:
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
            self._copy_pages([int(parent.pages.pages[full])], fresh)
        else:
            fresh = []
        child.pages.adopt_prefix(shared, self.allocator)
        child.pages.append_pages(fresh)
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
            "host_loading_pages": s.host_loading_pages,
            # host_hit_tokens: loaded tokens a sequence used; a load evicted before any sequence
            # read it is waste (waste ratio = loaded / used; 1.0 = every byte loaded was needed).
            "host_hit_tokens": s.load_used_tokens, "host_loaded_tokens": s.loaded_tokens,
            "host_load_wasted_pages": s.load_wasted_pages,
            "host_load_waste_ratio": load_waste_ratio(s.loaded_tokens, s.load_used_tokens),
            "host_bytes_loaded": s.bytes_loaded, "host_bytes_written": s.bytes_written,
            "host_load_seconds": s.load_seconds, "host_write_fences": s.write_fences,
        }

    @staticmethod
    def external_refs(seqs: Iterable[Sequence]) -> Counter[int]:
        refs: Counter[int] = Counter()
        for seq in seqs:
            refs.update(seq.pages.pages.tolist())
        return refs

    def check_invariants(self, seqs: Iterable[Sequence]) -> None:
        self.cache.check_invariants(self.external_refs(seqs))
        for r in self._reserved.values():
            assert r.handle.parent is not None and r.handle.on_gpu and r.handle.lock_ref > 0, (
                f"reservation of {r.seq.rid}: node {r.handle.id} is not a locked GPU node"
            )
