"""The waiting queue and the order admission visits it in.

``fcfs``: arrival order. ``lpm``: requests that share a long cached stem go first and together.
Each waiting request is placed at its deepest matched radix node; admission visits the tree of
those nodes depth-first, heavier subtrees (more waiting requests below) first, as in the SGLang
paper's DFS-weight order; a node's own requests come after its subtree's, in arrival order.

    root (w=5)                 visit order:  A-subtree (w=3) before B (w=2);
     ├── A (w=3) ── A1 (w=2)   inside A: requests at A1 (w=2), then those at A itself
     └── B (w=2)

Cost at any queue length: a request is matched once when it joins the queue, and again only
when the tree changed in a way that can change its match. Its deepest matched node ("handle")
ends exactly at its match (matching splits edges) and keeps that end when an edge is split
later, so its match can only

* shrink, when eviction detaches the handle (``parent`` None: leaves go first, so an attached
  handle has all its ancestors), or
* grow, when the handle gains a child keyed by the request's next page of tokens, or (for a
  namespace with no root yet) when the namespace's root appears.

Requests are grouped by handle and, inside a group, by that next page, so a step checks each
group with one set intersection, not each request. Ordering then walks only the nodes that
have waiting requests and their ancestors, lazily: admission usually takes the first few.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from radixrt.engine.request import Sequence

if TYPE_CHECKING:
    from radixrt.cache.prefix_cache import PrefixCache
    from radixrt.cache.radix import Node

_EMPTY = np.zeros(0, dtype=np.int32)


class _Group:
    """Waiting requests at one handle (or, ``rootless``, in a namespace without a root)."""

    __slots__ = ("node", "rootless", "seqs", "keys", "by_next")

    def __init__(self, node: Node, rootless: bool) -> None:
        self.node = node  # where the group sorts: its handle (a rootless group: the default root)
        self.rootless = rootless
        self.seqs: list[Sequence] = []  # arrival order
        self.keys: list[int] = []  # their arrivals (bisect on ints: no key callbacks)
        self.by_next: dict[bytes, list[Sequence]] = defaultdict(list)  # next page -> requests


class WaitingQueue:
    def __init__(self, cache: PrefixCache, policy: str) -> None:
        assert policy in ("lpm", "fcfs"), f"unknown schedule policy {policy!r}"
        self.cache = cache
        self.policy = policy
        self.page_size = cache.page_size
        self._fcfs: list[Sequence] = []  # every waiting request, arrival order
        self._fcfs_keys: list[int] = []  # their arrivals
        self._groups: dict[object, _Group] = {}  # handle node (or namespace, rootless) -> group
        self._where: dict[int, tuple[object, bytes | None]] = {}  # id(seq) -> (group key, next page)
        self.rematches = 0  # matches redone because the tree changed (for benchmarks)

    def __len__(self) -> int:
        return len(self._fcfs)

    def __bool__(self) -> bool:
        return bool(self._fcfs)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._fcfs)

    def push(self, seq: Sequence) -> None:
        _insert(self._fcfs, self._fcfs_keys, seq)  # a retracted request keeps its arrival
        if self.policy == "lpm":
            self._place(seq)

    def remove(self, seq: Sequence) -> None:
        _delete(self._fcfs, self._fcfs_keys, seq)
        if self.policy == "lpm":
            self._unplace(seq)

    def ordered(self) -> Iterator[Sequence]:
        """Waiting requests in admission order (a snapshot: admission may remove them)."""
        if self.policy == "fcfs" or len(self._fcfs) <= 1:
            return iter(list(self._fcfs))
        self._refresh()
        return self._dfs()

    # ---- lpm: one match per request, redone only when the tree changed under it ----------
    def _place(self, seq: Sequence) -> None:
        tokens = seq.token_array()
        match = self.cache.match_prefix(tokens, seq.namespace, record_stats=False)
        # With a host tier, the deepest node of either tier: a host hit is cheap to load, and
        # only detaching or gaining a child can change the match then, as without a tier.
        handle = match.host_nodes[-1] if match.host_nodes else match.handle
        rootless = handle.namespace != seq.namespace
        key: object = ("rootless", seq.namespace) if rootless else handle
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(handle, rootless)
        _insert(group.seqs, group.keys, seq)
        # The match leaves the last token uncached: a match that reached that limit never grows.
        limit = (len(tokens) - 1) // self.page_size * self.page_size
        nxt = None
        matched = match.length + match.host_length
        if matched < limit:
            nxt = tokens[matched : matched + self.page_size].tobytes()
            group.by_next[nxt].append(seq)
        self._where[id(seq)] = (key, nxt)

    def _unplace(self, seq: Sequence) -> None:
        key, nxt = self._where.pop(id(seq))
        group = self._groups[key]
        _delete(group.seqs, group.keys, seq)
        if nxt is not None:
            same = group.by_next[nxt]
            same.remove(seq)
            if not same:
                del group.by_next[nxt]
        if not group.seqs:
            del self._groups[key]

    def _refresh(self) -> None:
        stale: list[Sequence] = []
        roots: dict[str | None, Node] = {}

        def root_of(ns: str | None) -> Node:  # a namespace's root now (the default if none)
            if ns not in roots:
                roots[ns] = self.cache.match_prefix(_EMPTY, ns, record_stats=False).handle
            return roots[ns]

        for group in self._groups.values():
            node = group.node
            if group.rootless or node.is_root:
                # A namespace's root is created by its first insert and dropped when eviction
                # empties it: a request matched at a root re-checks which root is current.
                ns = group.seqs[0].namespace
                now = root_of(ns)
                # != (not "is not"): a native tree's handles are fresh objects per lookup
                if now.namespace == ns if group.rootless else now != node:
                    stale.extend(group.seqs)
                    continue
                if group.rootless:
                    continue  # never probe another namespace's children
            elif node.parent is None:  # evicted
                stale.extend(group.seqs)
                continue
            if node.children and group.by_next:
                for nxt in group.by_next.keys() & node.children.keys():
                    stale.extend(group.by_next[nxt])
        for seq in stale:
            self._unplace(seq)
            self._place(seq)
        self.rematches += len(stale)

    def _dfs(self) -> Iterator[Sequence]:
        native_order = getattr(self.cache, "lpm_order", None)
        if native_order is not None:  # the native tree walks its own nodes (same order)
            yield from self._dfs_native(native_order)
            return
        # Few allocations per step (ints and one set per internal node, no per-node tuples or
        # lists): with thousands of groups, garbage created here paces Python's full GC passes.
        weight: dict[Node, int] = defaultdict(int)  # waiting requests at or below a node
        kids: dict[Node, set[Node]] = defaultdict(set)
        at: dict[Node, _Group] = {}
        shared: dict[Node, list[_Group]] = {}  # the rare node with two groups (rootless ones)
        tops: set[Node] = set()
        for group in self._groups.values():
            node: Node | None = group.node
            if group.node in at:
                shared.setdefault(group.node, [at[group.node]]).append(group)
            else:
                at[group.node] = group
            n = len(group.seqs)
            while node is not None:
                weight[node] += n
                if node.parent is None:
                    tops.add(node)
                else:
                    kids[node.parent].add(node)
                node = node.parent

        def heaviest_first(nodes: set[Node]) -> Iterator[Node]:
            # (-weight, id) as one int key: node ids stay far below 2^40
            return iter(sorted(nodes, key=lambda x: (-weight[x] << 40) + x.id))

        # Iterative DFS (trees can be deeper than Python's recursion limit): each stack entry is
        # a node and the iterator over its children; a node's own requests follow its subtree.
        stack: list[tuple[Node | None, Iterator[Node]]] = [(None, heaviest_first(tops))]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is not None:
                stack.append((child, heaviest_first(kids[child]) if child in kids else iter(())))
                continue
            stack.pop()
            if node is None or node not in at:
                continue
            if node in shared:
                yield from sorted((s for g in shared[node] for s in g.seqs), key=_arrival)
            else:
                yield from list(at[node].seqs)


    def _dfs_native(self, lpm_order: Callable[[list[Node], list[int]], list[int]]
                    ) -> Iterator[Sequence]:
        """``_dfs`` with the tree walk in C++ (``NativeRadixCache.lpm_order``): groups at one
        node come out next to each other and are merged in arrival order, as in ``_dfs``."""
        groups = list(self._groups.values())
        order = lpm_order([g.node for g in groups], [len(g.seqs) for g in groups])
        i = 0
        while i < len(order):
            first = groups[order[i]]
            j = i + 1
            while j < len(order) and groups[order[j]].node == first.node:
                j += 1
            if j - i == 1:
                yield from list(first.seqs)
            else:
                same = [groups[k] for k in order[i:j]]
                yield from sorted((s for g in same for s in g.seqs), key=_arrival)
            i = j


def _arrival(seq: Sequence) -> int:
    return seq.arrival


def _insert(seqs: list[Sequence], keys: list[int], seq: Sequence) -> None:
    i = bisect.bisect_right(keys, seq.arrival)
    keys.insert(i, seq.arrival)
    seqs.insert(i, seq)


def _delete(seqs: list[Sequence], keys: list[int], seq: Sequence) -> None:
    i = bisect.bisect_left(keys, seq.arrival)
    assert i < len(seqs) and seqs[i] is seq, f"{seq.rid}/{seq.index} is not where it waits"
    del keys[i]
    del seqs[i]
