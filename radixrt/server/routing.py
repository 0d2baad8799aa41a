"""Data-parallel routing: send a request to the worker most likely to hold its prefix in cache.

The router cannot see the workers' real radix trees, so it keeps an *approximate* tree per
worker of the token ids it has sent there, bounded by a token budget with LRU eviction of
leaves (roughly what the worker itself evicts first). A request goes to the worker with the
longest match, unless that match is short or that worker is much busier than the idlest one; then
it goes to the least-loaded worker.

The approximate trees are the prefix cache's native radix tree (csrc/, page size 1, one per
worker: one implementation of the radix idea for the worker and the router), with the
Python ``ApproxRadixTree`` as the fallback where the extension is not built. With one worker
(--dp 1) there is nothing to choose and no tree is kept.

Namespaces (cache_salt / API key tenants) never share entries: the native tree gives each its
own root; the Python tree hashes the namespace into a negative sentinel token prepended to every
key, which no real token id (>= 0) can equal.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from radixrt.cache.native import native_module, resolve_backend

Tokens = Sequence[int] | np.ndarray


def namespace_token(namespace: str | None) -> int:
    if namespace is None:
        return -1
    digest = hashlib.blake2b(namespace.encode(), digest_size=7).digest()
    return -2 - int.from_bytes(digest, "little")  # always <= -2: distinct from None's -1


@dataclass(eq=False)
class _Node:
    key: tuple[int, ...]  # edge label from the parent
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)  # first token of edge -> child
    last_used: int = 0


class RoutingTree(Protocol):
    max_tokens: int

    @property
    def total_tokens(self) -> int: ...

    def match(self, tokens: Tokens, namespace: str | None = None) -> int: ...

    def insert(self, tokens: Tokens, namespace: str | None = None) -> None: ...

    def clear(self) -> None: ...


class NativeApproxTree:
    """The approximate tree on the native radix tree (page size 1; pages unused, all 0).
    Over budget, exactly the excess tokens go, from the tails of the least recently used
    leaves."""

    def __init__(self, max_tokens: int) -> None:
        assert max_tokens > 0, "the approximate tree needs a positive token budget"
        self.max_tokens = max_tokens
        self._tree = native_module().Tree(1)
        self._zeros = np.zeros(0, dtype=np.int32)

    @property
    def total_tokens(self) -> int:
        return self._tree.cached_tokens  # type: ignore[no-any-return]

    def match(self, tokens: Tokens, namespace: str | None = None) -> int:
        """Length of the longest stored prefix of ``tokens`` (touches the matched path)."""
        return self._tree.match_length(tokens, namespace, False)  # type: ignore[no-any-return]

    def insert(self, tokens: Tokens, namespace: str | None = None) -> None:
        if len(self._zeros) < len(tokens):
            self._zeros = np.zeros(2 * len(tokens), dtype=np.int32)
        self._tree.insert(tokens, self._zeros[: len(tokens)], namespace, False)
        over = self._tree.cached_tokens - self.max_tokens
        if over > 0:
            self._tree.evict(over)

    def clear(self) -> None:
        self._tree = native_module().Tree(1)


class ApproxRadixTree:
    """Token-id radix tree with a total-token budget; evicts least-recently-used leaves."""

    def __init__(self, max_tokens: int) -> None:
        assert max_tokens > 0, "the approximate tree needs a positive token budget"
        self.max_tokens = max_tokens
        self.root = _Node(key=(), parent=None)
        self.total_tokens = 0
        self._clock = itertools.count(1)

    def match(self, tokens: Tokens, namespace: str | None = None) -> int:
        """Length of the longest stored prefix of ``tokens`` (touches the matched path)."""
        if namespace is not None:
            return max(0, self._match([namespace_token(namespace), *tokens]) - 1)
        return self._match(tokens.tolist() if isinstance(tokens, np.ndarray) else tokens)

    def insert(self, tokens: Tokens, namespace: str | None = None) -> None:
        self._insert([namespace_token(namespace), *tokens] if namespace is not None
                     else list(tokens))

    def _match(self, tokens: Sequence[int]) -> int:
        node, pos, now = self.root, 0, next(self._clock)
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            k = _common_len(child.key, tokens, pos)
            pos += k
            child.last_used = now
            if k < len(child.key):
                break
            node = child
        return pos

    def _insert(self, tokens: Sequence[int]) -> None:
        node, pos, now = self.root, 0, next(self._clock)
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                leaf = _Node(key=tuple(tokens[pos:]), parent=node, last_used=now)
                node.children[tokens[pos]] = leaf
                self.total_tokens += len(leaf.key)
                break
            k = _common_len(child.key, tokens, pos)
            if k < len(child.key):  # split the edge at k
                #   node --[a b c d]--> child   becomes   node --[a b]--> mid --[c d]--> child
                mid = _Node(key=child.key[:k], parent=node, last_used=now)
                child.key = child.key[k:]
                child.parent = mid
                mid.children[child.key[0]] = child
                node.children[mid.key[0]] = mid
                child = mid
            child.last_used = now
            node = child
            pos += k
        self._evict()

    def clear(self) -> None:
        self.root = _Node(key=(), parent=None)
        self.total_tokens = 0

    def _evict(self) -> None:
        while self.total_tokens > self.max_tokens:
            leaves = [n for n in self._iter_nodes() if not n.children and n is not self.root]
            if not leaves:
                return
            leaves.sort(key=lambda n: n.last_used)
            # Evict a batch of the oldest leaves per scan so eviction stays O(n) amortized.
            for leaf in leaves[: max(1, len(leaves) // 8)]:
                if self.total_tokens <= self.max_tokens:
                    break
                assert leaf.parent is not None, "a leaf always has a parent"
                del leaf.parent.children[leaf.key[0]]
                self.total_tokens -= len(leaf.key)

    def _iter_nodes(self) -> list[_Node]:
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out


def _common_len(key: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
    n = min(len(key), len(tokens) - start)
    i = 0
    while i < n and key[i] == tokens[start + i]:
        i += 1
    return i


@dataclass(frozen=True)
class RoutingPolicy:
    # A match shorter than this many tokens is not worth unbalancing the load for.
    min_match_tokens: int = 16
    # Prefer the cache holder unless its load exceeds the idlest worker's by both of these.
    balance_abs: int = 8
    balance_rel: float = 1.5

    def __post_init__(self) -> None:
        assert self.min_match_tokens >= 1, "min_match_tokens must be >= 1"
        assert self.balance_abs >= 0 and self.balance_rel >= 1.0, "balance thresholds too small"


class PrefixRouter:
    """Picks a worker per request; the caller reports load via ``loads`` on every call.
    ``backend``: the trees' implementation (``native`` / ``python``, default as for the
    prefix cache: native when built)."""

    def __init__(self, num_workers: int, tokens_per_worker: int,
                 policy: RoutingPolicy | None = None, backend: str | None = None) -> None:
        assert num_workers >= 1, "need at least one worker"
        assert tokens_per_worker > 0, "the approximate trees need a positive token budget"
        self.tokens_per_worker = tokens_per_worker
        self.backend = resolve_backend(backend)
        self.num_workers = num_workers
        # One worker: every request goes there, no tree is kept (made when a second joins).
        self.trees: list[RoutingTree] = (
            [self._new_tree() for _ in range(num_workers)] if num_workers > 1 else [])
        self.policy = policy or RoutingPolicy()

    def _new_tree(self) -> RoutingTree:
        if self.backend == "native":
            return NativeApproxTree(self.tokens_per_worker)
        return ApproxRadixTree(self.tokens_per_worker)

    def choose(self, tokens: Tokens, namespace: str | None, loads: list[int],
               alive: list[bool]) -> int | None:
        """Worker index for ``tokens`` (and remember it went there); None if none is alive."""
        assert len(loads) == len(alive) == self.num_workers, "one load/alive entry per worker"
        candidates = [i for i, ok in enumerate(alive) if ok]
        if not candidates:
            return None
        least = min(candidates, key=lambda i: (loads[i], i))
        if not self.trees:
            return least  # --dp 1: nothing to choose
        key: Tokens = (native_module().as_int32(tokens) if self.backend == "native"
                       else tokens)  # converted once for all the trees
        if len(candidates) == 1:
            chosen = least
        else:
            matches = {i: self.trees[i].match(key, namespace) for i in candidates}
            best = max(candidates, key=lambda i: (matches[i], -loads[i], -i))
            p = self.policy
            unbalanced = (loads[best] - loads[least] > p.balance_abs
                          and loads[best] > p.balance_rel * loads[least])
            chosen = best if matches[best] >= p.min_match_tokens and not unbalanced else least
        self.trees[chosen].insert(key, namespace)
        return chosen

    def record(self, worker: int, tokens: Tokens, namespace: str | None) -> None:
        """Remember more tokens (e.g. prompt + output) as cached on ``worker``."""
        if self.trees:
            self.trees[worker].insert(tokens, namespace)

    def add_worker(self) -> int:
        """A worker joined (a remote replica): its index, with an empty tree."""
        self.num_workers += 1
        while len(self.trees) < self.num_workers:  # from one worker: the first tree too
            self.trees.append(self._new_tree())
        return self.num_workers - 1

    def forget_worker(self, worker: int) -> None:
        if self.trees:
            self.trees[worker].clear()

    def clear(self) -> None:
        for t in self.trees:
            t.clear()
