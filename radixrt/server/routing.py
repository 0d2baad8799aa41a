"""Data-parallel routing: send a request to the worker most likely to hold its prefix in cache.

The router cannot see the workers' real radix trees, so it keeps an *approximate* tree per
worker of the token ids it has sent there, bounded by a token budget with LRU eviction of
leaves (roughly what the worker itself evicts first). A request goes to the worker with the
longest match, unless that match is short or that worker is much busier than the idlest one; then
it goes to the least-loaded worker.

Namespaces (cache_salt / API key tenants) never share entries: the namespace is hashed into a
negative sentinel token prepended to every key, which no real token id (>= 0) can equal.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field


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


class ApproxRadixTree:
    """Token-id radix tree with a total-token budget; evicts least-recently-used leaves."""

    def __init__(self, max_tokens: int) -> None:
        assert max_tokens > 0, "the approximate tree needs a positive token budget"
        self.max_tokens = max_tokens
        self.root = _Node(key=(), parent=None)
        self.total_tokens = 0
        self._clock = itertools.count(1)

    def match(self, tokens: list[int] | tuple[int, ...]) -> int:
        """Length of the longest stored prefix of ``tokens`` (touches the matched path)."""
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

    def insert(self, tokens: list[int] | tuple[int, ...]) -> None:
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


def _common_len(key: tuple[int, ...], tokens: list[int] | tuple[int, ...], start: int) -> int:
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
    """Picks a worker per request; the caller reports load via ``loads`` on every call."""

    def __init__(self, num_workers: int, tokens_per_worker: int,
                 policy: RoutingPolicy | None = None) -> None:
        assert num_workers >= 1, "need at least one worker"
        self.trees = [ApproxRadixTree(tokens_per_worker) for _ in range(num_workers)]
        self.policy = policy or RoutingPolicy()

    def choose(self, tokens: list[int], namespace: str | None, loads: list[int],
               alive: list[bool]) -> int | None:
        """Worker index for ``tokens`` (and remember it went there); None if none is alive."""
        assert len(loads) == len(alive) == len(self.trees), "one load/alive entry per worker"
        candidates = [i for i, ok in enumerate(alive) if ok]
        if not candidates:
            return None
        key = [namespace_token(namespace), *tokens]
        least = min(candidates, key=lambda i: (loads[i], i))
        if len(candidates) == 1:
            chosen = least
        else:
            matches = {i: max(0, self.trees[i].match(key) - 1) for i in candidates}  # -1: sentinel
            best = max(candidates, key=lambda i: (matches[i], -loads[i], -i))
            p = self.policy
            unbalanced = (loads[best] - loads[least] > p.balance_abs
                          and loads[best] > p.balance_rel * loads[least])
            chosen = best if matches[best] >= p.min_match_tokens and not unbalanced else least
        self.trees[chosen].insert(key)
        return chosen

    def record(self, worker: int, tokens: list[int], namespace: str | None) -> None:
        """Remember more tokens (e.g. prompt + output) as cached on ``worker``."""
        self.trees[worker].insert([namespace_token(namespace), *tokens])

    def add_worker(self) -> int:
        """A worker joined (a remote replica): its index, with an empty tree."""
        self.trees.append(ApproxRadixTree(self.trees[0].max_tokens))
        return len(self.trees) - 1

    def forget_worker(self, worker: int) -> None:
        self.trees[worker].clear()

    def clear(self) -> None:
        for t in self.trees:
            t.clear()
