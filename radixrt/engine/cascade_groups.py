"""Which requests of a decode step share a cached prefix, from the radix tree's locks.

A running sequence holds its ``cache_handle`` locked, and its first pages ARE the tree's pages
of the path root .. handle (radix.py's reference rule), so two sequences whose paths share a
node hold the same physical pages for everything up to that node's end::

    root ─ S [system prompt, 128 pages] ─┬─ q1 ... <- handle of seq 1
                                         ├─ q2 ... <- handle of seq 2
                                         └─ q3 ... <- handle of seq 3
    group {1, 2, 3}: shared KV [0, 2048) read through seq 1's page-table row; each sequence's
    own suffix [2048, seq_len) through its own row

A sequence joins the group of the node on its path that spares the most reads, (sequences of the
step sharing it - 1) x its depth, among nodes at least ``min_group`` of them share that end at
least ``min_shared_pages`` pages in. Every sequence below a node compares it with its ancestors
the same way, so a subtree never splits between them (the two samples of a forked request join
their system prompt's group rather than pairing off over their whole prompt); groups left with
fewer than ``min_group`` members dissolve (their sequences take the per-request path), and a
step whose groups would spare under ``min_saved_share`` of its KV reads forms none.

Nodes are known by ``Node.id``, which the tree never reuses (a native tree hands out a fresh
Python handle per access, so object identity means nothing). Host cost per step is
O(batch x path depth), counted in one C-level pass: each handle's path (node ids and end
depths) is cached by the handle's id, and a step whose handles and rows equal the previous
step's reuses its groups. A node's end depth never changes while it is locked
(a split keeps the original node as the lower part), so a cached path stays true; a split above
it only hides the new upper node from the grouping, which can cost sharing, never correctness.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from radixrt.cache.node import Node
    from radixrt.engine.request import Sequence

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class CascadePolicy:
    min_shared_pages: int = 2  # a shorter shared prefix is not worth a second pass
    min_group: int = 2  # requests that must share it
    # No groups at all when they would spare less than this share of the step's KV reads (the
    # extra pass and merge would cost about what they save).
    min_saved_share: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_saved_share < 1.0:
            raise ValueError(f"cascade min_saved_share must be in [0, 1), got {self.min_saved_share}")
        if self.min_shared_pages < 1:
            raise ValueError(f"cascade min_shared_pages must be >= 1, got {self.min_shared_pages}")
        if self.min_group < 2:
            raise ValueError(f"cascade min_group must be >= 2, got {self.min_group}")


@dataclass(frozen=True)
class CascadeGroups:
    """One decode step's grouping (host arrays), carried by the ForwardBatch."""

    indptr: I64  # [G + 1] group g's members are members[indptr[g] : indptr[g + 1]]
    members: I64  # [M] batch indices, group by group, each at most once
    shared_lens: I64  # [G] tokens of the shared prefix, whole pages
    rows: I64  # [G] page-table row to read group g's shared pages from (a member's)

    def __post_init__(self) -> None:
        g = self.shared_lens.shape[0]
        assert self.indptr.shape == (g + 1,) and self.rows.shape == (g,), "ragged group arrays"
        assert self.indptr[0] == 0 and self.indptr[-1] == self.members.shape[0], "bad indptr"
        assert bool((np.diff(self.indptr) >= 1).all()), "every group needs a member"
        assert bool((self.shared_lens >= 1).all()), "a group shares at least one token"
        assert len(set(self.members.tolist())) == len(self.members), "a request in two groups"

    @property
    def num_groups(self) -> int:
        return int(self.shared_lens.shape[0])

    @staticmethod
    def empty() -> CascadeGroups:
        z = np.zeros(0, dtype=np.int64)
        return CascadeGroups(np.zeros(1, dtype=np.int64), z, z, z)

    @staticmethod
    def of(groups: Seq[tuple[int, Seq[int]]], rows: Seq[int]) -> CascadeGroups:
        """From (shared tokens, member batch indices) pairs; ``rows`` = each request's
        page-table row (tests, benchmarks)."""
        members = [list(m) for _, m in groups]
        indptr = np.zeros(len(groups) + 1, dtype=np.int64)
        np.cumsum([len(m) for m in members], out=indptr[1:])
        flat = np.array([b for m in members for b in m], dtype=np.int64)
        return CascadeGroups(indptr, flat, np.array([n for n, _ in groups], dtype=np.int64),
                             np.array([rows[m[0]] for m in members], dtype=np.int64))


# A handle's path, deepest first: (node ids, end depth of each in tokens).
_Path = tuple[list[int], list[int]]


class PrefixGrouper:
    """Groups a decode step's sequences by shared radix nodes (one per runner)."""

    def __init__(self, policy: CascadePolicy, page_size: int) -> None:
        self.policy = policy
        self.page_size = page_size
        self.min_tokens = policy.min_shared_pages * page_size
        self._paths: dict[int, _Path] = {}  # handle.id -> its path
        self.grouped_steps = 0  # decode steps that formed at least one group (benches, tests)
        self.grouped_requests = 0  # summed over those steps: requests in a group
        self._last_key: list[int] = []
        self._last_rows: list[int] = []
        self._last: CascadeGroups | None = None

    def _path(self, handle: Node) -> _Path:
        ids: list[int] = []
        depths: list[int] = []
        nodes = []
        node: Node | None = handle
        while node is not None and not node.is_root:
            nodes.append(node)
            node = node.parent
        depth = sum(len(n.key) for n in nodes)
        for n in nodes:
            if depth < self.min_tokens:
                break
            ids.append(n.id)
            depths.append(depth)
            depth -= len(n.key)
        return ids, depths

    def group(self, seqs: Seq[Sequence], rows: Seq[int], kv_lens: Seq[int]) -> CascadeGroups | None:
        """The step's groups, or None when no group forms. ``rows``/``kv_lens``: each
        sequence's page-table row and KV already in the pool (its shared prefix is within)."""
        need = self.policy.min_group
        if len(seqs) < need:
            return None
        # Same handles in the same rows as the previous step (most steps): same groups.
        key = [-1 if seq.cache_handle is None else seq.cache_handle.id for seq in seqs]
        if key == self._last_key and rows == self._last_rows:
            if self._last is not None:
                self.grouped_steps += 1
                self.grouped_requests += len(self._last.members)
            return self._last
        self._last_key, self._last_rows = key, list(rows)
        self._last = self._group(seqs, rows, kv_lens)
        return self._last

    def _group(self, seqs: Seq[Sequence], rows: Seq[int], kv_lens: Seq[int]) -> CascadeGroups | None:
        need = self.policy.min_group
        cache = self._paths
        if len(cache) > 2 * len(seqs) + 64:  # drop handles no longer decoding
            cache = self._paths = {}
        paths: list[_Path | None] = []
        every: list[int] = []
        for seq in seqs:
            handle = seq.cache_handle
            if handle is None:
                paths.append(None)
                continue
            path = cache.get(handle.id)
            if path is None:
                path = cache[handle.id] = self._path(handle)
            paths.append(path)
            every += path[0]
        counts = Counter(every)  # one C-level pass over every path node
        by_anchor: dict[int, tuple[int, list[int]]] = {}  # node id -> (depth, batch indices)
        for i, path in enumerate(paths):
            if not path:
                continue
            best, best_saved = -1, 0
            for j, node_id in enumerate(path[0]):  # deepest first: ties keep the deeper node
                c = counts[node_id]
                if c >= need and (c - 1) * path[1][j] > best_saved:
                    best, best_saved = j, (c - 1) * path[1][j]
            if best >= 0:
                depth = path[1][best]
                assert depth <= kv_lens[i], f"shared {depth} past KV {kv_lens[i]}"
                by_anchor.setdefault(path[0][best], (depth, []))[1].append(i)
        picked = [(d, m) for d, m in by_anchor.values() if len(m) >= need]
        saved = sum(d * (len(m) - 1) for d, m in picked)
        if not picked or saved < self.policy.min_saved_share * (sum(kv_lens) + len(seqs)):
            return None
        self.grouped_steps += 1
        self.grouped_requests += sum(len(m) for _, m in picked)
        return CascadeGroups.of(picked, rows)
