"""The host tier on the native radix tree: ``TieredRadixCache``'s interface and behaviour (the
same matches, node ids, host pages, tickets and counters for the same calls), with residency,
the host LRU, write-back decisions and load bookkeeping in C++ (``csrc/tier.cpp``).

Python keeps what only it can do, the page copies (``PageTransfer``: a CUDA side stream and its
tickets), and drives them from the tree's per-node state as int32 arrays::

    evict / backup_ahead -> C++ picks the nodes, allocates their host pages (evicting host
                            copies) and records one write per node; Python issues the writes
                            (one ticket each), hands the tickets back (resolve_writes), then
                            fences the compute stream on the writes the released pages wait for
    start_load           -> C++ pins the host copies and returns their pages; Python gets GPU
                            pages from the caller's ``alloc`` (which may evict) and starts one
                            load; C++ makes the nodes GPU residents loading under its ticket
    poll                 -> Python asks the transfer which load tickets ended; C++ retires them

There is no Python object per page, and none per node except the handles a match returns. The
host pool's allocator moves into C++ with the tree: the tree is its only holder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from radixrt.cache.allocator import PageAllocator
from radixrt.cache.native import NativeNode, NativePageAllocator, NativeRadixCache
from radixrt.cache.node import CacheStats, InsertResult, IntArray, MatchResult, Node, TokenIds
from radixrt.cache.transfer import PageTransfer

AllocPages = Callable[[int], "list[int] | None"]


class NativeTieredRadixCache(NativeRadixCache):
    """``TieredRadixCache`` on the native tree; implements ``PrefixCache``."""

    tiered = True  # type: ignore[assignment]

    def __init__(self, allocator: PageAllocator, page_size: int, transfer: PageTransfer) -> None:
        super().__init__(allocator, page_size)
        self.transfer = transfer
        host = transfer.host
        if not isinstance(host.allocator, NativePageAllocator):
            unused = host.allocator
            assert unused.num_free == unused.num_total, (
                "the host pool's pages belong to the tree alone: hand it over unused")
            host.allocator = NativePageAllocator(unused.num_total)
        self.host_allocator: NativePageAllocator = host.allocator
        self._tree.attach_host(self.host_allocator._core)
        self._fences = 0
        # Every ticket up to this one is known finished (tickets end in order): no fence needed.
        self._finished_upto = 0

    # ------------------------------------------------------------------ PrefixCache
    def match_prefix(
        self, tokens: TokenIds, namespace: str | None = None, *, record_stats: bool = True
    ) -> MatchResult:
        pages, length, slot, nid, host_slots, host_ids, host_length, ready = (
            self._tree.match_tiered(tokens, namespace, record_stats))
        handle = NativeNode(self._tree, slot, nid)
        if not host_length:
            return MatchResult(pages, length, handle, ready=ready)
        host_nodes = tuple(NativeNode(self._tree, s, i)
                           for s, i in zip(host_slots.tolist(), host_ids.tolist(), strict=True))
        return MatchResult(pages, length, handle, host_length, host_nodes, ready)

    def insert(
        self, tokens: TokenIds, pages: Sequence[int] | IntArray, namespace: str | None = None
    ) -> InsertResult:
        res = super().insert(tokens, pages, namespace)
        extras = self._tree.insert_extras()
        if extras is not None:  # the insert ran over host-only or loading nodes
            adopted, load_tickets = extras
            if len(adopted):
                self.allocator.incref(adopted)  # the nodes' new GPU copies: the caller's pages
            for ticket in load_tickets.tolist():  # the caller reads the tree's pages: after the load
                self._fence(ticket)
        return res

    def evict(self, num_pages: int) -> IntArray:
        """Pages from the tails of unlocked GPU leaves, LRU first, their tokens written down to
        the host first where they fit; each page still carries the tree's reference, which the
        caller now owns and must decref."""
        pages: IntArray = self._tree.evict(num_pages)
        if self._tree.io_pending:
            self._issue_io()
        return pages

    def flush(self) -> IntArray:
        """Drop every unlocked entry of both tiers (no write-back); returns the GPU pages.
        An admin operation on an idle engine: it waits for copies in flight."""
        self.transfer.synchronize()
        self.poll()
        self._tree.set_writes_enabled(False)
        try:
            released = self.evict(self.evictable_pages)
        finally:
            self._tree.set_writes_enabled(True)
        self._tree.evict_host(self.host_allocator.num_total)
        return released

    # ------------------------------------------------------------------ loads
    def start_load(self, match: MatchResult, alloc: AllocPages) -> int:
        """Give ``match``'s host-only continuation GPU pages from ``alloc`` (which may evict)
        and start copying them in. Returns the tokens now loading (0 if ``alloc`` came up
        short); the match's nodes become ready at a later ``poll``."""
        nodes = match.host_nodes
        if not nodes:
            return 0
        handles = [self._own(n, "start_load") for n in (match.handle, *nodes)]
        slots = np.fromiter((n._slot for n in handles[1:]), np.int32, len(nodes))
        ids = np.fromiter((n._nid for n in handles[1:]), np.int64, len(nodes))
        at = (handles[0]._slot, handles[0]._nid)
        host = self._tree.begin_load(slots, ids, *at)  # pins the host copies, locks the handle
        pages = alloc(match.host_length // self.page_size)
        if pages is None:
            self._tree.abort_load(slots, ids, *at)
            return 0
        gpu = self._as_int32(pages)
        ticket = self.transfer.load(host, gpu)
        return self._tree.finish_load(slots, ids, *at, gpu, ticket)  # type: ignore[no-any-return]

    def poll(self) -> None:
        """Retire finished transfers: loaded nodes become ready (and unlocked)."""
        if not self._tree.num_loads:
            return
        self.transfer.poll()
        self._tree.retire_loads([self.transfer.done(t) for t in self._tree.load_tickets()])

    def claim_loaded(self, handle: Node) -> int:
        """A sequence now reads the path ending at ``handle``: loads on it were used (not
        wasted). Returns the loaded tokens claimed for the first time."""
        h = self._own(handle, "claim_loaded")
        return self._tree.claim_loaded(h._slot, h._nid)  # type: ignore[no-any-return]

    @property
    def loads_pending(self) -> int:
        return self._tree.num_loads  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ write-back
    def backup_ahead(self, num_pages: int) -> int:
        """Start writing the oldest ``num_pages`` evictable GPU pages that have no host copy,
        evicting only host entries older than each; returns the pages now being written."""
        started: int = self._tree.backup_ahead(num_pages)
        if self._tree.io_pending:
            self._issue_io()
        return started

    def _issue_io(self) -> None:
        """Issue the writes the last tree operation decided on, in its order (one ticket per
        node), then fence on the writes the GPU pages it released still wait for."""
        gpu, host, offsets, fences = self._tree.take_io()
        bounds = offsets.tolist()
        tickets = [self.transfer.write(gpu[a:b], host[a:b])
                   for a, b in zip(bounds, bounds[1:], strict=False)]
        self._tree.resolve_writes(np.array(tickets, dtype=np.int64))
        for ref in fences.tolist():
            if self._fence(tickets[-ref - 1] if ref < 0 else ref):
                self._fences += 1

    def _fence(self, ticket: int) -> bool:
        if ticket <= self._finished_upto:
            return False
        if self.transfer.fence(ticket):
            return True
        self._finished_upto = ticket  # not running: finished, and so is every earlier one
        return False

    def _own(self, handle: Node, op: str) -> NativeNode:
        assert isinstance(handle, NativeNode) and handle._tree is self._tree, (
            f"{op} of {handle!r}, not a node of this tree")
        return handle

    # ------------------------------------------------------------------ accounting
    @property
    def host_cached_tokens(self) -> int:
        return self._tree.counters()["host_tokens"]  # type: ignore[no-any-return]

    def stats(self) -> CacheStats:
        c = self._tree.counters()
        ts = self.transfer.stats
        ps = self.page_size
        return CacheStats(
            **{**super().stats().__dict__,
               "host_total_pages": self.host_allocator.num_total,
               "host_free_pages": self.host_allocator.num_free,
               "host_only_pages": c["host_only_tokens"] // ps,
               "host_backup_pages": (c["host_tokens"] - c["host_only_tokens"]) // ps,
               "host_loading_pages": c["loading_pages"],
               "host_cached_tokens": c["host_tokens"],
               "host_hit_tokens": c["host_hit_tokens"],
               "loaded_tokens": c["loaded_tokens"],
               "load_used_tokens": c["load_used_tokens"],
               "load_wasted_pages": c["load_wasted_pages"],
               "bytes_loaded": ts.bytes_loaded, "bytes_written": ts.bytes_written,
               "load_seconds": ts.load_seconds, "write_fences": self._fences},
        )  # fmt: skip

    def tier_snapshot(self) -> tuple[list[tuple[int, list[int], int, int, bool]], list[int],
                                     list[tuple[int, int]]]:
        """Every node's host state as (id, host pages, load_seq, write_seq, load_unused) by id,
        the host LRU as ids in eviction order, pending loads as (ticket, deepest node id)."""
        return self._tree.tier_snapshot()  # type: ignore[no-any-return]

    def _iter_nodes(self) -> list[NativeNode]:
        """Every non-root node as a handle (the test helper RadixCache has too)."""
        slots, ids = self._tree.node_handles()
        return [NativeNode(self._tree, s, i)
                for s, i in zip(slots.tolist(), ids.tolist(), strict=True)]

    def check_invariants(self, external_refs: Mapping[int, int] | None = None) -> None:
        """The tree's self-check (both tiers, in C++), the GPU page audit, and the host pool's:
        every allocated host page is held by exactly one node."""
        super().check_invariants(external_refs)
        owner: dict[int, int] = {}
        for nid, host_pages, *_ in self.tier_snapshot()[0]:
            for p in host_pages:
                assert p not in owner, f"host page {p} held by nodes {owner[p]} and {nid}"
                owner[p] = nid
        self.host_allocator.check_refcounts(dict.fromkeys(owner, 1), "tree (host pool)")
