"""The radix tree's node and the small records its operations return.

A node's KV can live on the GPU, on the host, or both (the host tier, ``tiered.py``)::

    node.pages       [num_pages] GPU page ids   (empty: not on the GPU)
    node.host_pages  [num_pages] host page ids  (empty: not on the host)

A non-root node always holds its tokens in at least one tier. The GPU-resident nodes are closed
towards the root (a GPU node's parent is a GPU node or a root), so a match is a GPU prefix
followed by a host-only continuation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

TokenIds = Sequence[int] | npt.NDArray[np.integer]
IntArray = npt.NDArray[np.int32]
EMPTY = np.zeros(0, dtype=np.int32)
EMPTY.setflags(write=False)  # shared by every node without pages in a tier


class Node:
    """One compressed edge of the tree. Roots have an empty key and are never locked."""

    __slots__ = (
        "key", "pages", "host_pages", "children", "parent", "lock_ref", "last_access", "id",
        "is_root", "namespace", "load_seq", "write_seq", "load_unused",
    )  # fmt: skip

    def __init__(
        self, key: IntArray, pages: IntArray, parent: Node | None, node_id: int,
        last_access: int, namespace: str | None, is_root: bool = False,
    ) -> None:  # fmt: skip
        self.key = key  # [num_pages * page_size] int32 tokens
        self.pages = pages  # [num_pages] int32 GPU page ids, or empty
        self.host_pages: IntArray = EMPTY  # [num_pages] int32 host page ids, or empty
        self.children: dict[bytes, Node] = {}
        self.parent = parent
        self.lock_ref = 0  # locks on this node or any descendant
        self.last_access = last_access
        self.id = node_id
        self.is_root = is_root
        self.namespace = namespace
        # Host-tier transfer tickets (0 = none): a pending load means the GPU pages are not
        # filled yet; a pending write means the GPU pages must not be reused before it ends.
        # load_seq -1 pins the node's host copy while a load is being set up.
        self.load_seq = 0
        self.write_seq = 0
        # Loaded from the host and not yet claimed by a sequence: evicting it wastes the load.
        self.load_unused = False

    @property
    def on_gpu(self) -> bool:
        return len(self.pages) > 0

    @property
    def on_host(self) -> bool:
        return len(self.host_pages) > 0

    def __repr__(self) -> str:
        return (
            f"Node(id={self.id}, tokens={len(self.key)}, pages={self.pages.tolist()}, "
            f"host_pages={self.host_pages.tolist()}, lock_ref={self.lock_ref}, "
            f"last_access={self.last_access})"
        )


# Page ids as the Python tree returns them (a list) or the native tree does (an int32 array).
PageList = list[int] | IntArray


@dataclass(frozen=True)
class MatchResult:
    pages: PageList  # GPU pages of the GPU-resident part of the match
    length: int  # matched GPU-resident tokens, a multiple of page_size
    handle: Node  # deepest matched GPU node (a root when nothing matched on the GPU)
    # The host tier: tokens matched after ``length`` whose KV is on the host only, and their
    # nodes (root to leaf); ``ready`` is False while any GPU node of the match is still loading.
    host_length: int = 0
    host_nodes: tuple[Node, ...] = ()
    ready: bool = True


@dataclass(frozen=True)
class InsertResult:
    handle: Node  # node ending exactly at the inserted span (a root for an empty span)
    pages: PageList  # the tree's pages for the whole span
    num_existing: int  # tokens of the span that were already cached (in either tier)
    # The tree's pages for the already cached part differ from the caller's: the caller must
    # swap its duplicates for the tree's pages (SequencePages.replace_prefix_pages).
    differs: bool


@dataclass(frozen=True)
class CacheStats:
    total_pages: int
    free_pages: int
    evictable_pages: int
    locked_pages: int
    cached_tokens: int  # tokens on the GPU
    num_nodes: int
    hit_tokens: int  # matched tokens, both tiers
    query_tokens: int
    hit_rate: float
    evictions: int  # GPU pages evicted since creation
    # Host tier (all 0 without one).
    host_total_pages: int = 0
    host_free_pages: int = 0
    host_only_pages: int = 0  # the only copy of their tokens
    host_backup_pages: int = 0  # also on the GPU
    host_loading_pages: int = 0  # being copied to the GPU
    host_cached_tokens: int = 0
    host_hit_tokens: int = 0  # tokens matched on the host only (each needs a load)
    loaded_tokens: int = 0
    load_used_tokens: int = 0  # loaded tokens a sequence then used (first use of each load)
    load_wasted_pages: int = 0  # loaded pages evicted from the GPU before any sequence used them
    bytes_loaded: int = 0
    bytes_written: int = 0
    load_seconds: float = 0.0  # summed duration of finished loads
    write_fences: int = 0  # GPU evictions that had to wait (on the device) for a write


def as_tokens(tokens: TokenIds) -> IntArray:
    if isinstance(tokens, np.ndarray):
        arr = np.asarray(tokens, dtype=np.int32)
    else:  # fromiter is ~1.7x faster than asarray on a list of Python ints
        arr = np.fromiter(tokens, dtype=np.int32, count=len(tokens))
    assert arr.ndim == 1, f"tokens must be 1-D, got shape {arr.shape}"
    return arr


class NoLowerTier:
    """The lower-tier half of the PrefixCache interface for a cache with no tier below the GPU
    (RadixCache, NativeRadixCache); TieredRadixCache overrides all four."""

    def start_load(self, match: MatchResult, alloc: Callable[[int], list[int] | None]) -> int:
        assert not match.host_nodes, "a cache without a host tier matched host nodes"
        return 0

    def poll(self) -> None:
        """Retire finished transfers (there are none without a lower tier)."""

    def backup_ahead(self, num_pages: int) -> int:
        return 0

    def claim_loaded(self, handle: Node) -> int:
        return 0  # nothing is ever loaded
