"""Page-granular radix tree over token prefixes (RadixAttention's prefix cache).

Each node owns a compressed edge: ``key`` (int32 tokens, a whole number of pages) and ``pages``
(one physical KV page per ``page_size`` tokens). Children are keyed by the bytes of their first
page of tokens, so siblings never share a first page and lookup is one dict probe per node;
comparing an edge is one vectorized numpy compare, never a per-token Python loop::

    root ─ [a b | c d] ─┬─ [e f]          page_size 2: every edge is whole pages;
                        └─ [x y | z w]    children of [a b|c d] keyed by b"e f", b"x y"

Reference semantics (the correctness core)
------------------------------------------
* A page's allocator refcount == (1 if a tree node holds it) + (number of ``SequencePages``
  holding it). The tree holds at most one reference per page and every tree page is in exactly
  one node.
* A request that matched a prefix increfs the matched pages into its ``SequencePages`` and
  ``lock``s the match handle; locking pins the node and all its ancestors (``lock_ref`` > 0), so
  locked pages are never evicted.
* Invariant the scheduler keeps: every tree page a running request holds lies on that request's
  locked path. Hence an unlocked node's pages have refcount exactly 1 and evicting it frees them.
* ``insert`` adopts (increfs) only the caller's pages for the part the tree did not have. For the
  part it already had, the caller's pages are *duplicates*: the tree never frees them (it never
  held them); they return to the free list when the request swaps them for the tree's pages
  (``SequencePages.replace_prefix_pages``) or releases. So nothing a page table still points at
  is ever freed.
* Eviction hands pages back: ``evict`` takes exactly the pages asked for from the tails of
  unlocked leaves (splitting the last leaf it touches) and *returns* their page ids with the
  tree's reference still on them; the caller (``SequenceMemory``) owns that reference from then
  on and frees it. A subclass may keep the evicted tokens in a lower tier (``tiered.py``): the
  ``_release_gpu`` hook decides what happens to a leaf's tail.
* LRU: every match/insert takes one tick of a deterministic clock and stamps it on each node of
  the path it touched. A match ending inside an edge splits it there, so touches are always
  whole-node and a parent's ``last_access`` >= its children's. Eviction pops the unlocked GPU
  leaf (no child on the GPU) with the smallest ``(last_access, id)`` from a ``SortedList``
  (O(log n)), cascading to parents that become unlocked GPU leaves.
* Namespaces (e.g. a tenant's ``cache_salt``) each get their own root, created lazily by insert
  and dropped when eviction empties it, so different namespaces never share an entry.
* Splitting keeps handles valid: the *original* node object keeps the lower part of the edge (the
  end of its span), and a new node takes the upper part, inheriting ``lock_ref``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
from sortedcontainers import SortedList

from radixrt.cache.allocator import PageAllocator
from radixrt.cache.node import EMPTY as _EMPTY
from radixrt.cache.node import (
    CacheStats,
    InsertResult,
    IntArray,
    MatchResult,
    Node,
    NoLowerTier,
    TokenIds,
)
from radixrt.cache.node import as_tokens as _as_tokens

__all__ = [
    "CacheStats", "InsertResult", "IntArray", "MatchResult", "Node", "RadixCache", "TokenIds",
    "_EMPTY", "_as_tokens",
]  # fmt: skip


class RadixCache(NoLowerTier):
    """Prefix cache: radix tree of token prefixes -> KV pages, with LRU eviction.

    Implements ``radixrt.cache.prefix_cache.PrefixCache``."""

    tiered = False

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        assert page_size >= 1, f"page_size must be >= 1, got {page_size}"
        self.allocator = allocator
        self.page_size = page_size
        self._ids = itertools.count()
        self._clock = 0
        self.root = self._new_root(None)
        self._roots: dict[str | None, Node] = {None: self.root}
        # Unlocked GPU leaves, keyed (last_access, id); the dict maps id -> node for the same set.
        self._lru: SortedList = SortedList()
        self._lru_nodes: dict[int, Node] = {}
        self._cached_tokens = 0  # tokens on the GPU
        self._locked_pages = 0
        self._num_nodes = 0
        self._hit_tokens = 0
        self._host_hit_tokens = 0
        self._query_tokens = 0
        self._evicted_pages = 0

    # ------------------------------------------------------------------ public API
    def match_prefix(
        self, tokens: TokenIds, namespace: str | None = None, *, record_stats: bool = True
    ) -> MatchResult:
        """Longest cached page-aligned prefix, leaving at least the last token uncached: its
        GPU-resident part, then (with a host tier) the host-only continuation."""
        toks = _as_tokens(tokens)
        if record_stats:
            self._query_tokens += len(toks)
        root = self._roots.get(namespace)
        if root is None or len(toks) == 0:
            return MatchResult([], 0, root if root is not None else self.root)
        # The model needs the last prompt token's logits, so it must be recomputed.
        limit = ((len(toks) - 1) // self.page_size) * self.page_size
        _, length, path = self._descend(root, toks[:limit])
        self._touch_path(path)
        on_gpu = 0
        while on_gpu < len(path) and path[on_gpu].on_gpu:
            on_gpu += 1
        gpu_path, host_path = path[:on_gpu], tuple(path[on_gpu:])
        host_length = sum(len(n.key) for n in host_path)
        if record_stats:
            self._hit_tokens += length
            self._host_hit_tokens += host_length
        return MatchResult(
            self._path_pages(gpu_path), length - host_length,
            gpu_path[-1] if gpu_path else root, host_length, host_path,
            ready=not any(n.load_seq for n in gpu_path),
        )  # fmt: skip

    def insert(
        self, tokens: TokenIds, pages: Sequence[int] | IntArray, namespace: str | None = None
    ) -> InsertResult:
        """Cache ``tokens`` (whole pages) backed by ``pages``, adopting only the new part."""
        toks = _as_tokens(tokens)
        ps = self.page_size
        assert len(toks) % ps == 0, f"insert of {len(toks)} tokens: not a multiple of page {ps}"
        assert len(pages) == len(toks) // ps, (
            f"insert of {len(toks)} tokens needs {len(toks) // ps} pages, got {len(pages)}"
        )
        if len(toks) == 0:
            return InsertResult(self._roots.get(namespace, self.root), [], 0, False)
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = self._new_root(namespace)
        node, pos, path = self._descend(root, toks)
        self._adopt_path(path, pages)
        if pos < len(toks):
            new_pages = np.array(pages[pos // ps :], dtype=np.int32)
            self.allocator.incref(new_pages)
            leaf = Node(toks[pos:].copy(), new_pages, node, next(self._ids), 0, namespace)
            self._lru_discard(node)  # gains a GPU child: no longer a GPU leaf
            node.children[leaf.key[:ps].tobytes()] = leaf
            self._lru_add(leaf)
            self._num_nodes += 1
            self._cached_tokens += len(leaf.key)
            path.append(leaf)
            node = leaf
        self._touch_path(path)
        tree_pages = self._path_pages(path)
        k = pos // ps
        return InsertResult(node, tree_pages, pos, k > 0 and tree_pages[:k] != list(pages[:k]))

    def lock(self, handle: Node) -> None:
        """Pin ``handle`` and its ancestors against eviction (no-op on a root)."""
        if handle.is_root:
            return
        assert handle.parent is not None, f"lock of node {handle.id}, which was evicted"
        assert handle.on_gpu, f"lock of node {handle.id}, which is not on the GPU"
        node = handle
        while not node.is_root:
            if node.lock_ref == 0:
                self._lru_discard(node)
                self._locked_pages += len(node.pages)
            node.lock_ref += 1
            assert node.parent is not None, f"node {node.id} is detached from its root"
            node = node.parent

    def unlock(self, handle: Node) -> None:
        if handle.is_root:
            return
        assert handle.lock_ref > 0, f"unlock of node {handle.id} below zero (not locked)"
        node = handle
        while not node.is_root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._locked_pages -= len(node.pages)
                if not self._has_gpu_child(node):
                    self._lru_add(node)
            assert node.parent is not None, f"node {node.id} is detached from its root"
            node = node.parent

    def evict(self, num_pages: int) -> IntArray:
        """Take ``num_pages`` GPU pages (or every evictable one) from the tails of unlocked
        leaves in LRU order. Returns those page ids, each still carrying the tree's reference:
        the caller now owns it and must decref it."""
        released: list[IntArray] = []
        count = 0
        while count < num_pages and self._lru:
            _, node_id = self._lru.pop(0)
            node = self._lru_nodes.pop(node_id)
            keep = len(node.pages) - (num_pages - count)
            if keep > 0:  # evict only the tail this call needs; the head stays cached
                self._split(node, keep * self.page_size)
            pages = self._release_gpu(node)
            released.append(pages)
            count += len(pages)
        self._evicted_pages += count
        return np.concatenate(released) if released else _EMPTY


    def flush(self) -> IntArray:
        """Drop every unlocked entry; returns the released GPU pages (the caller frees them)."""
        return self.evict(self.evictable_pages)

    # ------------------------------------------------------------------ accounting
    @property
    def cached_tokens(self) -> int:
        return self._cached_tokens

    @property
    def locked_pages(self) -> int:
        return self._locked_pages

    @property
    def evictable_pages(self) -> int:
        return self._cached_tokens // self.page_size - self._locked_pages

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    def stats(self) -> CacheStats:
        q = self._query_tokens
        return CacheStats(
            total_pages=self.allocator.num_total,
            free_pages=self.allocator.num_free,
            evictable_pages=self.evictable_pages,
            locked_pages=self._locked_pages,
            cached_tokens=self._cached_tokens,
            num_nodes=self._num_nodes,
            hit_tokens=self._hit_tokens,
            query_tokens=q,
            hit_rate=self._hit_tokens / q if q else 0.0,
            evictions=self._evicted_pages,
        )

    def tree_pages(self) -> set[int]:
        """All GPU pages the tree holds (debug/test helper; walks the whole tree)."""
        return {p for node in self._iter_nodes() for p in node.pages.tolist()}

    # ------------------------------------------------------------------ hooks for a lower tier
    def _adopt_path(self, path: list[Node], pages: Sequence[int] | IntArray) -> None:
        """Insert matched ``path`` (nodes already cached) for pages the caller computed; without
        a lower tier every cached node is on the GPU and there is nothing to adopt."""

    def _release_gpu(self, node: Node) -> IntArray:
        """Take an unlocked GPU leaf's pages out of the tree; without a lower tier the node
        goes. Returns the GPU pages (the caller frees them)."""
        return self._remove_leaf(node)

    # ------------------------------------------------------------------ internals
    def _new_root(self, namespace: str | None) -> Node:
        return Node(_EMPTY, _EMPTY, None, next(self._ids), 0, namespace, is_root=True)

    def _descend(self, root: Node, toks: IntArray) -> tuple[Node, int, list[Node]]:
        """Walk the longest page-aligned match of ``toks`` (a whole number of pages) from
        ``root``, splitting the last edge so the returned node ends exactly at the match.
        Returns (node, matched tokens, path of non-root nodes)."""
        ps = self.page_size
        node, pos, path = root, 0, []
        n = len(toks)
        while pos < n:
            child = node.children.get(toks[pos : pos + ps].tobytes())
            if child is None:
                break
            span = min(len(child.key), n - pos)
            a, b = child.key[:span], toks[pos : pos + span]
            if a.tobytes() == b.tobytes():  # memcmp: cheaper than a numpy ufunc on short edges
                m = span
            else:
                m = int(np.argmin(a == b))  # first mismatch
            m -= m % ps  # >= ps: the first page matched via the dict key
            if m < len(child.key):
                child = self._split(child, m)
            path.append(child)
            pos += m
            node = child
        return node, pos, path

    def _split(self, child: Node, m: int) -> Node:
        """Split ``child``'s edge after ``m`` tokens; the new upper node is returned.

        before:  parent ─[k0 .. k(m-1) | km .. kL]─ child
        after:   parent ─[k0 .. k(m-1)]─ upper ─[km .. kL]─ child   (child keeps its identity)

        Both tiers' pages split at the same page; transfer tickets apply to both halves.
        """
        ps = self.page_size
        parent = child.parent
        assert parent is not None, f"split of detached node {child.id}"
        cut = m // ps
        upper = Node(
            child.key[:m], child.pages[:cut], parent, next(self._ids), child.last_access,
            child.namespace,
        )  # fmt: skip
        upper.lock_ref = child.lock_ref
        upper.host_pages = child.host_pages[:cut]
        upper.load_seq, upper.write_seq = child.load_seq, child.write_seq
        upper.children[child.key[m : m + ps].tobytes()] = child
        parent.children[child.key[:ps].tobytes()] = upper  # same first page, same dict slot
        child.key = child.key[m:]
        child.pages = child.pages[cut:]
        child.host_pages = child.host_pages[cut:]
        child.parent = upper
        self._num_nodes += 1
        self._after_split(upper, child)
        return upper

    def _after_split(self, upper: Node, lower: Node) -> None:
        """Bookkeeping a lower tier keeps per node (none here)."""

    def _touch_path(self, path: list[Node]) -> None:
        self._clock += 1
        for node in path:
            if node.id in self._lru_nodes:  # re-key: SortedList entries are immutable tuples
                self._lru.remove((node.last_access, node.id))
                node.last_access = self._clock
                self._lru.add((node.last_access, node.id))
            else:
                node.last_access = self._clock

    @staticmethod
    def _path_pages(path: list[Node]) -> list[int]:
        if not path:
            return []
        return np.concatenate([node.pages for node in path]).tolist()  # type: ignore[no-any-return]

    @staticmethod
    def _has_gpu_child(node: Node) -> bool:
        return any(c.on_gpu for c in node.children.values())

    def _lru_add(self, node: Node) -> None:
        if node.is_root or node.id in self._lru_nodes:
            return
        self._lru.add((node.last_access, node.id))
        self._lru_nodes[node.id] = node

    def _lru_discard(self, node: Node) -> None:
        if self._lru_nodes.pop(node.id, None) is not None:
            self._lru.remove((node.last_access, node.id))

    def _gpu_leaf_released(self, parent: Node) -> None:
        """A child of ``parent`` left the GPU: the parent may now be an unlocked GPU leaf."""
        if not parent.is_root and parent.lock_ref == 0 and not self._has_gpu_child(parent):
            self._lru_add(parent)  # cascade

    def _detach(self, node: Node) -> Node:
        """Unlink a childless node from its parent (dropping an emptied namespace root)."""
        parent = node.parent
        assert parent is not None and not node.children, f"detach of node {node.id}"
        del parent.children[node.key[: self.page_size].tobytes()]
        node.parent = None
        self._num_nodes -= 1
        if parent.is_root and not parent.children and parent is not self.root:
            del self._roots[parent.namespace]
        return parent

    def _remove_leaf(self, node: Node) -> IntArray:
        assert node.parent is not None and not node.children and node.lock_ref == 0, (
            f"evicting node {node.id} that is detached, internal or locked"
        )
        self._cached_tokens -= len(node.key)
        self._gpu_leaf_released(self._detach(node))
        return node.pages

    def _iter_nodes(self) -> list[Node]:
        out: list[Node] = []
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if not node.is_root:
                out.append(node)
        return out

    def check_invariants(self, external_refs: Mapping[int, int] | None = None) -> None:
        """Assert the tree's structure and page accounting. ``external_refs`` maps page ->
        number of running-request references; when given, refcounts are checked exactly and
        any allocated page held by neither the tree nor a request is reported as a leak."""
        from radixrt.cache.invariants import check_tree

        check_tree(self, external_refs)
