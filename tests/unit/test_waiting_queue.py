"""The lpm waiting queue keeps each request's match between steps and redoes it only when the
tree changed under it. Whatever inserts, evictions, edge splits and namespace roots come and go,
its order must equal the DFS-weight order computed from scratch (a fresh match of every waiting
request), which is what the scheduler did every step before."""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixrt.cache.allocator import PageAllocator
from radixrt.cache.page_table import SequencePages
from radixrt.cache.radix import Node, RadixCache
from radixrt.engine.policy import WaitingQueue
from radixrt.engine.request import Sequence
from radixrt.sampling_params import SamplingParams

PS = 2
STEMS = [[1] * 8, [1] * 4 + [2] * 6, [3] * 10]


def fresh_order(waiting: list[Sequence], cache: RadixCache) -> list[Sequence]:
    """The reference: match every request now, sort by its path of (-weight, node id)."""
    paths: dict[int, list[Node]] = {}
    weight: Counter[int] = Counter()
    for seq in waiting:
        node: Node | None = cache.match_prefix(seq.token_array(), seq.namespace,
                                               record_stats=False).handle
        path: list[Node] = []
        while node is not None:
            path.append(node)
            weight[node.id] += 1
            node = node.parent
        paths[id(seq)] = path[::-1]

    def key(seq: Sequence) -> tuple:
        return (*((-weight[n.id], n.id) for n in paths[id(seq)]), (1, 0), seq.arrival)

    return sorted(waiting, key=key)


token_lists = st.builds(
    lambda stem, cut, tail: STEMS[stem][:cut] + tail,
    st.integers(0, len(STEMS) - 1), st.integers(0, 10), st.lists(st.integers(1, 3), max_size=6),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), token_lists, st.sampled_from([None, None, "a"])),
        st.tuples(st.just("insert"), token_lists, st.sampled_from([None, None, "a"])),
        st.tuples(st.just("evict"), st.integers(1, 6)),
        st.tuples(st.just("remove"), st.integers(0, 50)),
        st.tuples(st.just("probe"), token_lists, st.sampled_from([None, "a"])),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops)
def test_incremental_lpm_order_equals_a_fresh_match_of_every_request(ops) -> None:
    allocator = PageAllocator(64)
    cache = RadixCache(allocator, PS)
    queue = WaitingQueue(cache, "lpm")
    waiting: list[Sequence] = []
    arrival = itertools.count()
    for op in ops:
        if op[0] == "push" and len(op[1]) >= 1:
            seq = Sequence(rid=f"r{len(waiting)}", index=0, prompt_ids=op[1],
                           params=SamplingParams(), namespace=op[2], arrival=next(arrival),
                           pages=SequencePages(PS))
            queue.push(seq)
            waiting.append(seq)
        elif op[0] == "insert":
            tokens = op[1][: len(op[1]) // PS * PS]
            pages = allocator.alloc(len(tokens) // PS)
            if pages is not None:
                cache.insert(tokens, pages, op[2])
                allocator.decref(pages)  # only the tree holds them: evictable
        elif op[0] == "evict":
            allocator.decref(cache.evict(op[1]))
        elif op[0] == "remove" and waiting:
            seq = waiting.pop(op[1] % len(waiting))
            queue.remove(seq)
        elif op[0] == "probe":  # a match elsewhere (admission) splits edges under the queue
            cache.match_prefix(op[1], op[2], record_stats=False)
        want = fresh_order(waiting, cache)
        got = list(queue.ordered())
        assert [s.rid for s in got] == [s.rid for s in want]
        assert len(queue) == len(waiting)
    cache.check_invariants()


def test_fcfs_is_arrival_order_including_a_retracted_request() -> None:
    cache = RadixCache(PageAllocator(8), PS)
    queue = WaitingQueue(cache, "fcfs")
    seqs = [Sequence(rid=f"r{i}", index=0, prompt_ids=[1, 2, 3], params=SamplingParams(),
                     namespace=None, arrival=i, pages=SequencePages(PS)) for i in range(4)]
    for seq in (seqs[1], seqs[3], seqs[0]):
        queue.push(seq)
    queue.push(seqs[2])  # a retracted request comes back with its old arrival
    assert [s.rid for s in queue.ordered()] == ["r0", "r1", "r2", "r3"]
