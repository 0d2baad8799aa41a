"""DP routing: approximate radix trees, prefix affinity, load balance, namespaces."""

from __future__ import annotations

from radixrt.server.routing import ApproxRadixTree, PrefixRouter, RoutingPolicy


def test_tree_match_insert_split() -> None:
    t = ApproxRadixTree(1000)
    t.insert([1, 2, 3, 4])
    t.insert([1, 2, 9])
    assert t.match([1, 2, 3, 4, 5]) == 4
    assert t.match([1, 2, 9, 9]) == 3
    assert t.match([1, 2]) == 2
    assert t.match([7]) == 0
    assert t.total_tokens == 5  # [1 2] shared, [3 4] and [9] branches


def test_tree_evicts_least_recently_used_over_budget() -> None:
    t = ApproxRadixTree(10)
    t.insert(list(range(6)))
    t.insert(list(range(100, 106)))
    assert t.total_tokens <= 10
    assert t.match(list(range(100, 106))) == 6  # the newest survives
    assert t.match(list(range(6))) == 0


def test_router_prefers_cached_prefix_then_least_loaded() -> None:
    r = PrefixRouter(2, 10_000, RoutingPolicy(min_match_tokens=4))
    a, b = list(range(50)), list(range(500, 550))
    assert r.choose(a, None, [0, 0], [True, True]) == 0
    assert r.choose(b, None, [1, 0], [True, True]) == 1  # no match: least loaded
    assert r.choose(a + [1], None, [1, 3], [True, True]) == 0  # prefix affinity
    assert r.choose(b + [2], None, [0, 2], [True, True]) == 1
    # A short match is not worth it: least loaded wins.
    assert r.choose(a[:3] + [999], None, [2, 0], [True, True]) == 1


def test_router_rebalances_when_the_holder_is_overloaded() -> None:
    r = PrefixRouter(2, 10_000, RoutingPolicy(min_match_tokens=4, balance_abs=4,
                                              balance_rel=1.5))
    a = list(range(40))
    assert r.choose(a, None, [0, 0], [True, True]) == 0
    assert r.choose(a + [1], None, [20, 1], [True, True]) == 1


def test_namespaces_do_not_share_prefixes_and_dead_workers_are_skipped() -> None:
    r = PrefixRouter(2, 10_000, RoutingPolicy(min_match_tokens=4))
    a = list(range(40))
    assert r.choose(a, "tenant-a", [0, 0], [True, True]) == 0
    assert r.choose(a, "tenant-b", [1, 0], [True, True]) == 1  # no cross-namespace match
    assert r.choose(a, "tenant-a", [0, 0], [False, True]) == 1
    assert r.choose(a, None, [0, 0], [False, False]) is None


def test_a_joining_worker_gets_an_empty_tree_and_takes_requests() -> None:
    r = PrefixRouter(1, 1000)
    prompt = list(range(40))
    assert r.choose(prompt, None, [0], [True]) == 0
    assert r.add_worker() == 1
    # The cache holder keeps its prefix; an unrelated prompt goes to the idle newcomer.
    assert r.choose(prompt, None, [1, 0], [True, True]) == 0
    assert r.choose(list(range(100, 140)), None, [1, 0], [True, True]) == 1
