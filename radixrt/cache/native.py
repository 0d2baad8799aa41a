"""The prefix cache on the native radix tree (``csrc/``), behind the same ``PrefixCache`` API.

``RadixCache`` (radix.py) is the reference: ``NativeRadixCache`` gives the same matches, pages,
node ids, LRU order and counters for the same calls (``tests/unit/test_native_radix.py`` drives
both with hypothesis and compares their whole state after every operation). What differs is
the cost: the tree lives in C++ and pages cross as int32 arrays, with no Python object per node
or page. Handles are ``NativeNode`` objects, a (slot, id) reference into the tree that reads
like a ``Node``; two handles of the same node compare equal (they are not the same object).

Backend choice (``make_prefix_cache``): ``RADIXRT_RADIX_BACKEND=native|python`` or the
``backend`` argument; by default the native tree when the extension was built, else the Python
tree with one log line giving the reason (backend.py). The host tier on the native tree is
``NativeTieredRadixCache`` (native_tiered.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from radixrt.cache.allocator import PageAllocator, PageIds, check_refcounts
from radixrt.cache.backend import native_module, resolve_backend
from radixrt.cache.invariants import audit_pages
from radixrt.cache.node import (
    CacheStats,
    InsertResult,
    IntArray,
    MatchResult,
    Node,
    NoLowerTier,
    TokenIds,
)


class NativePageAllocator(PageAllocator):
    """``PageAllocator`` with its refcounts and free stack in C++ (``csrc/page_allocator.cpp``):
    the same pages in the same order for the same calls, without a numpy pass per call."""

    def __init__(self, num_pages: int) -> None:  # no PageAllocator.__init__: no numpy state
        self._core = native_module().Allocator(num_pages)

    @property
    def num_total(self) -> int:
        return self._core.num_total  # type: ignore[no-any-return]

    @property
    def num_free(self) -> int:
        return self._core.num_free  # type: ignore[no-any-return]

    @property
    def num_used(self) -> int:
        return self._core.num_total - self._core.num_free  # type: ignore[no-any-return]

    def refcount(self, page: int) -> int:
        return self._core.refcount(page)  # type: ignore[no-any-return]

    def refcounts(self) -> npt.NDArray[np.int32]:
        return self._core.refcounts()  # type: ignore[no-any-return]

    def check_refcounts(self, holders: Mapping[int, int], who: str = "holders") -> None:
        check_refcounts(self._core.refcounts(), self._core.free_stack(), holders, who)

    def alloc(self, n: int) -> list[int] | None:
        return self._core.alloc(n)  # type: ignore[no-any-return]

    def alloc_array(self, n: int) -> npt.NDArray[np.int32] | None:
        return self._core.alloc_array(n)  # type: ignore[no-any-return]

    def incref(self, pages: PageIds) -> None:
        self._core.incref(pages)

    def decref(self, pages: PageIds) -> int:
        return self._core.decref(pages)  # type: ignore[no-any-return]


def make_page_allocator(num_pages: int, backend: str | None = None) -> PageAllocator:
    """The page allocator for the radix backend (see ``resolve_backend``)."""
    if resolve_backend(backend) == "native":
        return NativePageAllocator(num_pages)
    return PageAllocator(num_pages)


class NativeNode(Node):
    """A handle on one node of a native tree: reads like ``Node`` (the fields the scheduler and
    the cache's users read); after the node was evicted it reads as detached and empty."""

    __slots__ = ("_tree", "_slot", "_nid")

    def __init__(self, tree: Any, slot: int, nid: int) -> None:  # no Node.__init__: no state
        self._tree = tree
        self._slot = slot
        self._nid = nid

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, NativeNode) and other._nid == self._nid
                and other._tree is self._tree)

    def __hash__(self) -> int:
        return self._nid

    @property
    def id(self) -> int:  # type: ignore[override]
        return self._nid

    @property
    def is_root(self) -> bool:  # type: ignore[override]
        return bool(self._tree.describe(self._slot, self._nid)[0])

    @property
    def namespace(self) -> str | None:  # type: ignore[override]
        return self._tree.describe(self._slot, self._nid)[1]

    @property
    def parent(self) -> NativeNode | None:  # type: ignore[override]
        p = self._tree.parent(self._slot, self._nid)
        return None if p is None else NativeNode(self._tree, p[0], p[1])

    @property
    def children(self) -> NativeChildren:  # type: ignore[override]
        return NativeChildren(self)

    @property
    def key(self) -> IntArray:  # type: ignore[override]
        return self._tree.key(self._slot, self._nid)

    @property
    def pages(self) -> IntArray:  # type: ignore[override]
        return self._tree.pages(self._slot, self._nid)

    @property
    def host_pages(self) -> IntArray:  # type: ignore[override]
        return self._tree.host_pages(self._slot, self._nid)  # type: ignore[no-any-return]

    @property
    def lock_ref(self) -> int:  # type: ignore[override]
        return self._tree.lock_ref(self._slot, self._nid)

    @property
    def last_access(self) -> int:  # type: ignore[override]
        return self._tree.last_access(self._slot, self._nid)

    @property
    def load_seq(self) -> int:  # type: ignore[override]
        return self._tree.tier_state(self._slot, self._nid)[0]  # type: ignore[no-any-return]

    @property
    def write_seq(self) -> int:  # type: ignore[override]
        return self._tree.tier_state(self._slot, self._nid)[1]  # type: ignore[no-any-return]

    @property
    def load_unused(self) -> bool:  # type: ignore[override]
        return self._tree.tier_state(self._slot, self._nid)[2]  # type: ignore[no-any-return]

    @property
    def on_gpu(self) -> bool:
        return len(self.pages) > 0

    @property
    def on_host(self) -> bool:
        return len(self.host_pages) > 0

    def __repr__(self) -> str:
        return (f"NativeNode(id={self._nid}, slot={self._slot}, pages={self.pages.tolist()}, "
                f"lock_ref={self.lock_ref}, last_access={self.last_access})")


class NativeChildren(Mapping[bytes, NativeNode]):
    """A node's children by first page of tokens, read from the tree on demand (``keys()`` is
    one call that returns a set, so the lpm queue's set intersection costs no handle per
    child)."""

    __slots__ = ("_node",)

    def __init__(self, node: NativeNode) -> None:
        self._node = node

    def __getitem__(self, first_page: bytes) -> NativeNode:
        n = self._node
        got = n._tree.child(n._slot, n._nid, first_page)
        if got is None:
            raise KeyError(first_page)
        return NativeNode(n._tree, got[0], got[1])

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.keys())

    def __len__(self) -> int:
        return self._node._tree.num_children(self._node._slot, self._node._nid)  # type: ignore[no-any-return]

    def keys(self) -> set[bytes]:  # type: ignore[override]
        return self._node._tree.child_keys(self._node._slot, self._node._nid)  # type: ignore[no-any-return]


class NativeRadixCache(NoLowerTier):
    """``RadixCache`` on the native tree (GPU tier only); implements ``PrefixCache``."""

    tiered = False

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        assert page_size >= 1, f"page_size must be >= 1, got {page_size}"
        self.allocator = allocator
        self.page_size = page_size
        self._tree = native_module().Tree(page_size)
        self._as_int32 = native_module().as_int32
        self.root = self._handle(self._tree.root(None))

    def _handle(self, slot_id: tuple[int, int]) -> NativeNode:
        return NativeNode(self._tree, slot_id[0], slot_id[1])

    # ------------------------------------------------------------------ PrefixCache
    def match_prefix(
        self, tokens: TokenIds, namespace: str | None = None, *, record_stats: bool = True
    ) -> MatchResult:
        pages, length, slot, nid = self._tree.match(tokens, namespace, record_stats)
        return MatchResult(pages, length, NativeNode(self._tree, slot, nid))

    def insert(
        self, tokens: TokenIds, pages: Sequence[int] | IntArray, namespace: str | None = None
    ) -> InsertResult:
        arr = self._as_int32(pages)
        slot, nid, existing, span_pages, differs = self._tree.insert(tokens, arr, namespace)
        if existing < len(arr) * self.page_size:  # the tree adopts only the part it lacked
            self.allocator.incref(arr[existing // self.page_size :])
        return InsertResult(NativeNode(self._tree, slot, nid), span_pages, existing, differs)

    def lock(self, handle: Node) -> None:
        assert isinstance(handle, NativeNode) and handle._tree is self._tree, (
            f"lock of {handle!r}, not a node of this tree")
        self._tree.lock(handle._slot, handle._nid)

    def unlock(self, handle: Node) -> None:
        assert isinstance(handle, NativeNode) and handle._tree is self._tree, (
            f"unlock of {handle!r}, not a node of this tree")
        self._tree.unlock(handle._slot, handle._nid)

    def evict(self, num_pages: int) -> IntArray:
        """Pages from the tails of unlocked leaves, LRU first; each still carries the tree's
        reference, which the caller now owns and must decref."""
        return self._tree.evict(num_pages)  # type: ignore[no-any-return]

    def flush(self) -> IntArray:
        return self.evict(self.evictable_pages)


    # ------------------------------------------------------------------ accounting
    @property
    def cached_tokens(self) -> int:
        return self._tree.cached_tokens  # type: ignore[no-any-return]

    @property
    def locked_pages(self) -> int:
        return self._tree.locked_pages  # type: ignore[no-any-return]

    @property
    def evictable_pages(self) -> int:
        return self._tree.evictable_pages  # type: ignore[no-any-return]

    @property
    def num_nodes(self) -> int:
        return self._tree.num_nodes  # type: ignore[no-any-return]

    def stats(self) -> CacheStats:
        c = self._tree.counters()
        q = c["query_tokens"]
        return CacheStats(
            total_pages=self.allocator.num_total, free_pages=self.allocator.num_free,
            evictable_pages=self.evictable_pages, locked_pages=c["locked_pages"],
            cached_tokens=c["cached_tokens"], num_nodes=c["num_nodes"],
            hit_tokens=c["hit_tokens"], query_tokens=q,
            hit_rate=c["hit_tokens"] / q if q else 0.0, evictions=c["evicted_pages"],
        )

    def tree_pages(self) -> set[int]:
        """All pages the tree holds (debug/test helper; walks the whole tree)."""
        return set(self._tree.all_pages().tolist())

    def snapshot(self) -> tuple[list[tuple[Any, ...]], list[int]]:
        """Every node as (id, parent id or -1, is_root, namespace, key, pages, lock_ref,
        last_access) by id, and the LRU as ids in eviction order (for differential tests)."""
        return self._tree.snapshot()  # type: ignore[no-any-return]

    def lpm_order(self, handles: Sequence[Node], counts: Sequence[int]) -> list[int]:
        """Indices of ``handles`` in the lpm DFS order (see engine/policy.py), computed in C++."""
        nodes = cast("Sequence[NativeNode]", handles)
        slots = np.fromiter((h._slot for h in nodes), np.int32, len(nodes))
        ids = np.fromiter((h._nid for h in nodes), np.int64, len(nodes))
        order = self._tree.lpm_order(slots, ids, np.asarray(counts, dtype=np.int64))
        return order.tolist()  # type: ignore[no-any-return]

    def check_invariants(self, external_refs: Mapping[int, int] | None = None) -> None:
        """The tree's structural self-check (in C++), then the same page audit as the Python
        tree's (``invariants.check_tree``): exact refcounts when ``external_refs`` is given."""
        problem = self._tree.check()
        assert not problem, problem
        nodes, _ = self.snapshot()
        owner: dict[int, int] = {}
        for nid, _parent, is_root, _ns, _key, pages, lock_ref, _t in nodes:
            if is_root:
                continue
            for p in pages:
                owner[p] = nid
                if external_refs is not None and lock_ref == 0:
                    assert external_refs.get(p, 0) == 0, (
                        f"page {p} of unlocked node {nid} is held by a running request")
        audit_pages(self.allocator, owner, external_refs, self.evictable_pages, self.locked_pages)
