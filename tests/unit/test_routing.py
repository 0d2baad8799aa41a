"""DP routing: approximate radix trees (native and Python), prefix affinity, load balance,
namespaces, and no tree at all with one worker."""

from __future__ import annotations

import numpy as np
import pytest

from radixrt.server.routing import ApproxRadixTree, NativeApproxTree, PrefixRouter, RoutingPolicy
from tests.fixtures.radix_backends import BACKENDS


def tree(backend: str, budget: int) -> ApproxRadixTree | NativeApproxTree:
    return NativeApproxTree(budget) if backend == "native" else ApproxRadixTree(budget)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_match_insert_split(backend: str) -> None:
    t = tree(backend, 1000)
    t.insert([1, 2, 3, 4])
    t.insert([1, 2, 9])
    assert t.match([1, 2, 3, 4, 5]) == 4
    assert t.match(np.array([1, 2, 9, 9], dtype=np.int32)) == 3
    assert t.match([1, 2]) == 2
    assert t.match([7]) == 0
    assert t.total_tokens == 5  # [1 2] shared, [3 4] and [9] branches
    t.insert([1, 2, 3], "tenant")
    assert t.match([1, 2, 3], "tenant") == 3 and t.match([1, 2, 9], "tenant") == 2
    assert t.match([1, 2, 3], "other") == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_evicts_least_recently_used_over_budget(backend: str) -> None:
    t = tree(backend, 10)
    t.insert(list(range(6)))
    t.insert(list(range(100, 106)))
    assert t.total_tokens <= 10
    assert t.match(list(range(100, 106))) == 6  # the newest survives
    # The oldest goes: whole leaves (Python) or exactly the excess from its tail (native).
    assert t.match(list(range(6))) == (4 if backend == "native" else 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_prefers_cached_prefix_then_least_loaded(backend: str) -> None:
    r = PrefixRouter(2, 10_000, RoutingPolicy(min_match_tokens=4), backend=backend)
    a, b = list(range(50)), list(range(500, 550))
    assert r.choose(a, None, [0, 0], [True, True]) == 0
    assert r.choose(b, None, [1, 0], [True, True]) == 1  # no match: least loaded
    assert r.choose(a + [1], None, [1, 3], [True, True]) == 0  # prefix affinity
    assert r.choose(b + [2], None, [0, 2], [True, True]) == 1
    # A short match is not worth it: least loaded wins.
    assert r.choose(a[:3] + [999], None, [2, 0], [True, True]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_rebalances_when_the_holder_is_overloaded(backend: str) -> None:
    r = PrefixRouter(2, 10_000, RoutingPolicy(min_match_tokens=4, balance_abs=4,
                                              balance_rel=1.5), backend=backend)
    a = list(range(40))
    assert r.choose(a, None, [0, 0], [True, True]) == 0
    assert r.choose(a + [1], None, [20, 1], [True, True]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_namespaces_do_not_share_prefixes_and_dead_workers_are_skipped(backend: str) -> None:
    r = PrefixRouter(2, 10_000, RoutingPolicy(min_match_tokens=4), backend=backend)
    a = list(range(40))
    assert r.choose(a, "tenant-a", [0, 0], [True, True]) == 0
    assert r.choose(a, "tenant-b", [1, 0], [True, True]) == 1  # no cross-namespace match
    assert r.choose(a, "tenant-a", [0, 0], [False, True]) == 1
    assert r.choose(a, None, [0, 0], [False, False]) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_worker_keeps_no_tree_and_a_joining_worker_takes_requests(backend: str) -> None:
    r = PrefixRouter(1, 1000, backend=backend)
    prompt = list(range(40))
    assert r.choose(prompt, None, [0], [True]) == 0
    assert r.trees == [], "--dp 1: nothing to choose, no tree kept"
    r.record(0, prompt + [1, 2], None)
    assert r.add_worker() == 1 and len(r.trees) == 2
    assert r.choose(prompt, None, [0, 0], [True, True]) == 0  # empty trees: least loaded
    assert r.choose(prompt + [5], None, [1, 0], [True, True]) == 0  # now it holds the prefix
    assert r.choose(list(range(100, 140)), None, [1, 0], [True, True]) == 1
