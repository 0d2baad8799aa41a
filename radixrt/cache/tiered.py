"""The host tier behind the radix tree: residency, write-back, loads and the host LRU.

A node's KV is on the GPU, on the host, or both (``node.py``). The tree decides residency; the
pools only allocate::

    GPU eviction of an unlocked GPU leaf's tail  -> host copy exists?   free the GPU pages
                                                    no: allocate host pages (host LRU evicts
                                                    its own oldest entries), write, free
    match                                         -> GPU prefix + host-only continuation
    start_load(match, alloc)                      -> GPU pages for the continuation, one H2D
                                                    ticket; the nodes are on the GPU but not
                                                    ready (locked, ``load_seq``) until poll()
    backup_ahead(n)                               -> write the n oldest evictable GPU pages to
                                                    the host in the background, so a later
                                                    eviction frees them without waiting

A GPU page is reused only after its write-back finished: eviction of a page whose write is
still in flight fences the compute stream on it (a device-side wait; the host never blocks).
The host LRU holds host copies whose removal keeps every node in some tier: copies of nodes
also on the GPU, and host-only leaves (removing one cascades to its parent). Host pages have
one holder, the tree. All transfers share one side stream, so they finish in order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from sortedcontainers import SortedList

from radixrt.cache.allocator import PageAllocator
from radixrt.cache.node import EMPTY, CacheStats, IntArray, MatchResult, Node
from radixrt.cache.radix import RadixCache
from radixrt.cache.transfer import PageTransfer

AllocPages = Callable[[int], "list[int] | None"]


class TieredRadixCache(RadixCache):
    """``RadixCache`` with a host tier; implements ``PrefixCache``."""

    tiered = True

    def __init__(self, allocator: PageAllocator, page_size: int, transfer: PageTransfer) -> None:
        super().__init__(allocator, page_size)
        self.transfer = transfer
        self.host_allocator = transfer.host.allocator
        self._host_lru: SortedList = SortedList()  # (last_access, id) of evictable host copies
        self._host_lru_nodes: dict[int, Node] = {}
        self._host_tokens = 0  # tokens with a host copy
        self._host_only_tokens = 0  # ... and no GPU copy
        self._loads: list[tuple[int, Node]] = []  # (ticket, deepest loading node)
        self._loading_pages = 0
        self._loaded_tokens = 0
        self._load_used_tokens = 0
        self._load_wasted_pages = 0
        self._fences = 0
        self._writes_enabled = True

    # ------------------------------------------------------------------ loads
    def start_load(self, match: MatchResult, alloc: AllocPages) -> int:
        """Give ``match``'s host-only continuation GPU pages from ``alloc`` (which may evict)
        and start copying them in. Returns the tokens now loading (0 if ``alloc`` came up
        short); the match's nodes become ready at a later ``poll``."""
        nodes = match.host_nodes
        if not nodes:
            return 0
        assert nodes[0].parent is match.handle and all(not n.on_gpu for n in nodes), (
            "start_load of a match the tree changed since"
        )
        self.lock(match.handle)  # keeps the GPU path while alloc evicts
        for n in nodes:  # keeps the host copies while alloc writes back (and so evicts host)
            n.load_seq = -1
            self._host_sync(n)
        pages = alloc(match.host_length // self.page_size)
        for n in nodes:
            n.load_seq = 0
        if pages is None:
            for n in nodes:
                self._host_sync(n)
            self.unlock(match.handle)
            return 0
        gpu = np.asarray(pages, dtype=np.int32)
        host = np.concatenate([n.host_pages for n in nodes])
        ticket = self.transfer.load(host, gpu)
        off = 0
        for n in nodes:
            k = len(n.host_pages)
            self._to_gpu(n, gpu[off : off + k])
            n.load_seq = ticket
            n.load_unused = True
            self._host_sync(n)
            off += k
        self.lock(nodes[-1])
        self.unlock(match.handle)
        self._loads.append((ticket, nodes[-1]))
        self._loading_pages += len(gpu)
        self._loaded_tokens += match.host_length
        return match.host_length

    def poll(self) -> None:
        """Retire finished transfers: loaded nodes become ready (and unlocked)."""
        if not self._loads:
            return
        self.transfer.poll()
        keep: list[tuple[int, Node]] = []
        for ticket, deepest in self._loads:
            if not self.transfer.done(ticket):
                keep.append((ticket, deepest))
                continue
            node: Node | None = deepest
            while node is not None and not node.is_root and node.load_seq == ticket:
                node.load_seq = 0  # splits since the load put the ticket on each part
                self._loading_pages -= len(node.pages)
                self._host_sync(node)
                node = node.parent
            self.unlock(deepest)
        self._loads = keep

    def claim_loaded(self, handle: Node) -> int:
        """A sequence now reads the path ending at ``handle``: loads on it were used (not
        wasted). Returns the loaded tokens claimed for the first time."""
        node: Node | None = handle
        claimed = 0
        while node is not None and not node.is_root:
            if node.load_unused:
                node.load_unused = False
                claimed += len(node.key)
            node = node.parent
        self._load_used_tokens += claimed
        return claimed

    @property
    def loads_pending(self) -> int:
        return len(self._loads)

    # ------------------------------------------------------------------ write-back
    def backup_ahead(self, num_pages: int) -> int:
        """Start writing the oldest ``num_pages`` evictable GPU pages that have no host copy,
        evicting only host entries older than each; returns the pages now being written."""
        started = covered = 0
        for last_access, node_id in self._lru:
            if covered >= num_pages:
                break
            node = self._lru_nodes[node_id]
            covered += len(node.pages)
            if node.on_host:
                continue
            if not self._write_back(node, older_than=last_access):
                break
            started += len(node.pages)
        return started

    def _write_back(self, node: Node, older_than: int | None) -> bool:
        hp = self._host_alloc(len(node.pages), older_than)
        if hp is None:
            return False
        node.write_seq = self.transfer.write(node.pages, hp)
        node.host_pages = hp
        self._host_tokens += len(node.key)
        self._host_sync(node)
        return True

    def _release_gpu(self, node: Node) -> IntArray:
        if node.load_unused:  # loaded for a sequence that never read it: the copy was wasted
            node.load_unused = False
            self._load_wasted_pages += len(node.pages)
        if not node.on_host and not (self._writes_enabled and self._write_back(node, None)):
            self._drop_host_subtree(node)  # the host tier is full: the tokens leave the cache
            return self._remove_leaf(node)
        if node.write_seq and self.transfer.fence(node.write_seq):
            self._fences += 1
        pages = node.pages
        node.pages = EMPTY
        self._cached_tokens -= len(node.key)
        self._host_only_tokens += len(node.key)
        self._host_sync(node)
        assert node.parent is not None, f"GPU release of detached node {node.id}"
        self._gpu_leaf_released(node.parent)
        return pages

    def _adopt_path(self, path: list[Node], pages: Sequence[int] | IntArray) -> None:
        """An insert over host-only nodes: the caller computed those tokens on the GPU, so its
        pages become the nodes' GPU copies (no load needed)."""
        off = 0
        for n in path:
            k = len(n.key) // self.page_size
            if not n.on_gpu:
                gpu = np.array(pages[off : off + k], dtype=np.int32)  # a copy, not a caller's view
                self.allocator.incref(gpu)
                self._to_gpu(n, gpu)
                self._lru_add(n)  # a GPU leaf until the next node of the path joins the GPU
                self._host_sync(n)
            elif n.load_seq > 0:  # the caller will read the tree's pages: order after the load
                self.transfer.fence(n.load_seq)
            off += k

    def _to_gpu(self, node: Node, gpu: IntArray) -> None:
        assert node.parent is not None and not node.on_gpu and len(gpu) == len(node.host_pages)
        node.pages = gpu
        self._cached_tokens += len(node.key)
        self._host_only_tokens -= len(node.key)
        self._lru_discard(node.parent)  # gains a GPU child: no longer a GPU leaf

    # ------------------------------------------------------------------ host LRU
    def _host_alloc(self, n: int, older_than: int | None) -> IntArray | None:
        pages = self.host_allocator.alloc(n)
        if pages is None:
            self._evict_host(n - self.host_allocator.num_free, older_than)
            pages = self.host_allocator.alloc(n)
        return None if pages is None else np.asarray(pages, dtype=np.int32)

    def _evict_host(self, num_pages: int, older_than: int | None = None) -> int:
        freed = 0
        while freed < num_pages and self._host_lru:
            last_access, node_id = self._host_lru[0]
            if older_than is not None and last_access > older_than:
                break
            node = self._host_lru_nodes[node_id]
            freed += len(node.host_pages)
            self._drop_host_copy(node)
        return freed

    def _drop_host_copy(self, node: Node) -> None:
        self._host_discard(node)
        self.host_allocator.decref(node.host_pages)
        node.host_pages = EMPTY
        self._host_tokens -= len(node.key)
        if not node.on_gpu:  # its only copy: the node goes (a host-only leaf)
            self._host_only_tokens -= len(node.key)
            self._detach(node)

    def _drop_host_subtree(self, node: Node) -> None:
        """Drop the host-only descendants of a GPU node leaving the cache: deepest first (so
        children before parents), then by id, which the native tree does too (the host pages
        are freed in one order, so both hand them out again in one order)."""
        stack = [(c, 1) for c in node.children.values()]
        order: list[tuple[int, int, Node]] = []
        while stack:
            n, depth = stack.pop()
            assert not n.on_gpu and n.load_seq == 0, f"node {n.id} under a GPU leaf is busy"
            order.append((-depth, n.id, n))
            stack.extend((c, depth + 1) for c in n.children.values())
        for _, _, n in sorted(order, key=lambda e: (e[0], e[1])):
            self._drop_host_copy(n)

    def _host_evictable(self, node: Node) -> bool:
        return node.on_host and node.load_seq == 0 and (node.on_gpu or not node.children)

    def _host_sync(self, node: Node) -> None:
        if self._host_evictable(node):
            if node.id not in self._host_lru_nodes:
                self._host_lru.add((node.last_access, node.id))
                self._host_lru_nodes[node.id] = node
        else:
            self._host_discard(node)

    def _host_discard(self, node: Node) -> None:
        if self._host_lru_nodes.pop(node.id, None) is not None:
            self._host_lru.remove((node.last_access, node.id))

    # ------------------------------------------------------------------ RadixCache hooks
    def _after_split(self, upper: Node, lower: Node) -> None:
        upper.load_unused = lower.load_unused
        self._host_sync(upper)

    def _detach(self, node: Node) -> Node:
        self._host_discard(node)
        parent = super()._detach(node)
        if not parent.is_root:
            self._host_sync(parent)  # a host-only parent may now be a host leaf
        return parent

    def _touch_path(self, path: list[Node]) -> None:
        touched = [n for n in path if n.id in self._host_lru_nodes]
        for n in touched:
            self._host_lru.remove((n.last_access, n.id))
        super()._touch_path(path)
        for n in touched:
            self._host_lru.add((n.last_access, n.id))

    # ------------------------------------------------------------------ whole-cache operations
    def flush(self) -> IntArray:
        """Drop every unlocked entry of both tiers (no write-back); returns the GPU pages.
        An admin operation on an idle engine: it waits for copies in flight."""
        self.transfer.synchronize()
        self.poll()
        self._writes_enabled = False
        try:
            released = self.evict(self.evictable_pages)
        finally:
            self._writes_enabled = True
        self._evict_host(self.host_allocator.num_total)
        return released

    @property
    def host_cached_tokens(self) -> int:
        return self._host_tokens

    def stats(self) -> CacheStats:
        base = super().stats()
        ts = self.transfer.stats
        ps = self.page_size
        return CacheStats(
            **{**base.__dict__,
               "host_total_pages": self.host_allocator.num_total,
               "host_free_pages": self.host_allocator.num_free,
               "host_only_pages": self._host_only_tokens // ps,
               "host_backup_pages": (self._host_tokens - self._host_only_tokens) // ps,
               "host_loading_pages": self._loading_pages,
               "host_cached_tokens": self._host_tokens,
               "host_hit_tokens": self._host_hit_tokens,
               "loaded_tokens": self._loaded_tokens,
               "load_used_tokens": self._load_used_tokens,
               "load_wasted_pages": self._load_wasted_pages,
               "bytes_loaded": ts.bytes_loaded, "bytes_written": ts.bytes_written,
               "load_seconds": ts.load_seconds, "write_fences": self._fences},
        )  # fmt: skip

    def check_invariants(self, external_refs: Mapping[int, int] | None = None) -> None:
        from radixrt.cache.invariants import check_host_tier, check_tree

        check_tree(self, external_refs)
        check_host_tier(self)
