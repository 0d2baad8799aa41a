"""The radix cache's self-check: tree structure, residency, LRU bookkeeping and page accounting.

Kept beside radix.py (it reads the cache's private fields) so the tree module stays about the
tree. Called by tests after every operation and by the scheduler when idle in debug mode.
Per pool the rule is the same: every page is free, held by exactly one tree node, or held by
running sequences (GPU pool only); nothing is lost and nothing is held twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from radixrt.cache.allocator import PageAllocator
    from radixrt.cache.radix import RadixCache
    from radixrt.cache.tiered import TieredRadixCache


def check_tree(cache: RadixCache, external_refs: Mapping[int, int] | None = None) -> None:
    """See RadixCache.check_invariants."""
    ps = cache.page_size
    owner: dict[int, int] = {}  # GPU page -> id of the node holding it
    locked_pages = tokens = 0
    unlocked_leaves: set[int] = set()
    for ns, root in cache._roots.items():
        assert root.is_root and root.namespace == ns and root.lock_ref == 0, (
            f"root of namespace {ns!r} is malformed: {root}"
        )
        assert root is cache.root or root.children, f"empty namespace root {ns!r} not removed"
    nodes = cache._iter_nodes()
    for node in nodes:
        parent = node.parent
        assert parent is not None, f"node {node.id} reachable but detached"
        assert parent.children.get(node.key[:ps].tobytes()) is node, (
            f"node {node.id} not filed under its first page in parent {parent.id}"
        )
        assert node.namespace == parent.namespace, f"node {node.id} crosses namespaces"
        n_tok = len(node.key)
        assert n_tok > 0 and n_tok % ps == 0 and node.key.dtype == np.int32, (
            f"node {node.id}: key of {n_tok} tokens ({node.key.dtype}) with page {ps}"
        )
        assert len(node.pages) in (0, n_tok // ps) and len(node.host_pages) in (0, n_tok // ps), (
            f"node {node.id}: {len(node.pages)} GPU / {len(node.host_pages)} host pages for "
            f"{n_tok} tokens"
        )
        assert node.on_gpu or node.on_host, f"node {node.id} holds its tokens in no tier"
        assert not node.on_gpu or parent.is_root or parent.on_gpu, (
            f"node {node.id} is on the GPU but its parent {parent.id} is not"
        )
        assert node.on_gpu or node.lock_ref == 0, f"host-only node {node.id} is locked"
        child_locks = sum(c.lock_ref for c in node.children.values())
        assert node.lock_ref >= child_locks, (
            f"node {node.id}: lock_ref {node.lock_ref} < children's total {child_locks}"
        )
        assert parent.is_root or parent.last_access >= node.last_access, (
            f"node {node.id} accessed after its parent {parent.id}: LRU cascade order broken"
        )
        if not node.on_gpu:
            continue
        tokens += n_tok
        for p in node.pages.tolist():
            assert p not in owner, f"page {p} held by nodes {owner[p]} and {node.id}"
            owner[p] = node.id
            if external_refs is not None and node.lock_ref == 0:
                assert external_refs.get(p, 0) == 0, (
                    f"page {p} of unlocked node {node.id} is held by a running request"
                )
        if node.lock_ref:
            locked_pages += len(node.pages)
        elif not any(c.on_gpu for c in node.children.values()):
            unlocked_leaves.add(node.id)
    assert len(nodes) == cache._num_nodes, f"num_nodes {cache._num_nodes} != {len(nodes)}"
    assert tokens == cache._cached_tokens, f"cached_tokens {cache._cached_tokens} != {tokens}"
    assert locked_pages == cache._locked_pages, (
        f"locked_pages {cache._locked_pages} != {locked_pages}"
    )
    assert set(cache._lru_nodes) == unlocked_leaves, (
        f"evictable set {sorted(cache._lru_nodes)} != unlocked leaves {sorted(unlocked_leaves)}"
    )
    keys = sorted((n.last_access, n.id) for n in cache._lru_nodes.values())
    assert list(cache._lru) == keys, "LRU keys out of date with nodes' last_access"

    audit_pages(cache.allocator, owner, external_refs, cache.evictable_pages, cache._locked_pages)


def audit_pages(allocator: PageAllocator, owner: Mapping[int, int],
                external_refs: Mapping[int, int] | None, evictable: int, locked: int) -> None:
    """The page audit shared by the Python and the native tree: ``owner`` maps each page the
    tree holds to its node; refcounts exact when ``external_refs`` is given, else only alive;
    free + evictable + locked + private (held by sequences alone) == total."""
    if external_refs is not None:  # exact audit: every reference has a known holder
        holders = Counter(external_refs)
        holders.update(owner.keys())
        allocator.check_refcounts(holders, "tree + requests")
    else:
        refs = allocator.refcounts()
        dead = [p for p in owner if refs[p] < 1]
        assert not dead, f"tree pages with refcount 0 (freed under the tree): {dead[:10]}"
    private = allocator.num_used - len(owner)
    total = allocator.num_free + evictable + locked + private
    assert total == allocator.num_total, (
        f"free + evictable + locked + private = {total} != {allocator.num_total} pages"
    )


def check_host_tier(cache: TieredRadixCache) -> None:
    """The host pool's half of the audit: host pages, host LRU, pending loads."""
    owner: dict[int, int] = {}
    host_tokens = host_only_tokens = 0
    evictable: set[int] = set()
    loading = {ticket: node for ticket, node in cache._loads}
    for node in cache._iter_nodes():
        if node.load_seq:
            assert node.load_seq > 0, f"node {node.id} still pinned for a load set-up"
            assert node.on_gpu and node.lock_ref > 0, (
                f"loading node {node.id} must be on the GPU and locked"
            )
            deepest = loading.get(node.load_seq)
            assert deepest is not None, f"node {node.id} loads under unknown ticket"
        if not node.on_host:
            continue
        host_tokens += len(node.key)
        if not node.on_gpu:
            host_only_tokens += len(node.key)
        for p in node.host_pages.tolist():
            assert p not in owner, f"host page {p} held by nodes {owner[p]} and {node.id}"
            owner[p] = node.id
        if cache._host_evictable(node):
            evictable.add(node.id)
    assert host_tokens == cache._host_tokens, f"host tokens {cache._host_tokens} != {host_tokens}"
    assert host_only_tokens == cache._host_only_tokens, (
        f"host-only tokens {cache._host_only_tokens} != {host_only_tokens}"
    )
    cache.host_allocator.check_refcounts(dict.fromkeys(owner, 1), "tree (host pool)")
    assert set(cache._host_lru_nodes) == evictable, (
        f"host evictable set {sorted(cache._host_lru_nodes)} != {sorted(evictable)}"
    )
    keys = sorted((n.last_access, n.id) for n in cache._host_lru_nodes.values())
    assert list(cache._host_lru) == keys, "host LRU keys out of date with nodes' last_access"
