"""Orders the waiting queue before admission.

``lpm``: requests that share a long cached stem go first and together. Each waiting request is
matched against the radix tree; requests are then visited in a depth-first walk of the tree of
their matched nodes, heavier subtrees (more waiting requests below) first, as in the SGLang
paper's DFS-weight order; ties keep arrival order.

    root (w=5)                 visit order:  A-subtree (w=3) before B (w=2);
     ├── A (w=3) ── A1 (w=2)   inside A: requests at A1 (w=2), then those at A itself
     └── B (w=2)

Matching every request each step costs O(queue x prompt); past ``LPM_MAX_QUEUE`` waiting requests
the policy falls back to fcfs (the same cut-off SGLang uses), keeping the step cheap.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from radixrt.engine.request import Sequence

if TYPE_CHECKING:
    from radixrt.cache.prefix_cache import PrefixCache
    from radixrt.cache.radix import Node

LPM_MAX_QUEUE = 128


def _fcfs(waiting: list[Sequence]) -> list[Sequence]:
    return sorted(waiting, key=lambda s: s.arrival)


def order_waiting(waiting: list[Sequence], cache: PrefixCache, policy: str) -> list[Sequence]:
    if policy == "fcfs" or len(waiting) > LPM_MAX_QUEUE or len(waiting) <= 1:
        return _fcfs(waiting)
    assert policy == "lpm", f"unknown schedule policy {policy!r}"

    # Path of (node) from the root to each request's deepest matched node.
    paths: dict[int, list[Node]] = {}
    weight: Counter[int] = Counter()  # node id -> waiting requests at or below it
    for seq in waiting:
        match = cache.match_prefix(seq.token_array(), seq.namespace, record_stats=False)
        path: list[Node] = []
        node: Node | None = match.handle
        while node is not None:
            path.append(node)
            weight[node.id] += 1
            node = node.parent
        path.reverse()
        paths[id(seq)] = path

    def key(seq: Sequence) -> tuple:
        # Lexicographic over the path: heavier subtrees first, then stable by node id; a request
        # sitting at a node sorts after the deeper requests below it (longer prefix first).
        path = paths[id(seq)]
        steps = tuple((-weight[n.id], n.id) for n in path)
        return (*steps, (1, 0), seq.arrival)

    return sorted(waiting, key=key)
