"""The native radix tree against the Python one (the reference), operation by operation.

Hypothesis drives random sequences of match / insert / lock / unlock / evict / flush over
namespaces, at page sizes 1 and 16, through ``RadixCache`` and ``NativeRadixCache`` (each with
its own allocator); after every operation both must have returned the same thing and hold the
same state: every node (id, parent, namespace, key, pages, lock_ref, last_access), the LRU
order, the clock, the counters and the allocators' refcounts. Plus the lpm order of a waiting
queue on each tree, and the backend switch.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from radixrt.cache import (
    NativeRadixCache,
    PageAllocator,
    RadixCache,
    SequencePages,
)
from radixrt.cache.native import NativePageAllocator, make_page_allocator
from radixrt.cache.node import Node
from radixrt.cache.prefix_cache import make_prefix_cache
from radixrt.engine.policy import WaitingQueue
from radixrt.engine.request import Sequence
from radixrt.sampling_params import SamplingParams
from tests.fixtures.page_tokens import page_tokens
from tests.fixtures.radix_backends import NATIVE_SKIP, pl

pytestmark = NATIVE_SKIP

NAMESPACES = [None, "tenant-a", "tenant-b"]


def python_snapshot(cache: RadixCache) -> tuple[list[tuple[object, ...]], list[int]]:
    """The Python tree's state in the layout of ``NativeRadixCache.snapshot``."""
    nodes = [*cache._roots.values(), *cache._iter_nodes()]
    rows = [
        (n.id, n.parent.id if n.parent is not None else -1, n.is_root, n.namespace,
         n.key.tolist(), n.pages.tolist(), n.lock_ref, n.last_access)
        for n in sorted(nodes, key=lambda n: n.id)
    ]
    return rows, [node_id for _, node_id in cache._lru]


class DiffMachine(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([1, 16]), num_pages=st.integers(4, 40))
    def setup(self, page_size: int, num_pages: int) -> None:
        self.ps = page_size
        self.py = RadixCache(PageAllocator(num_pages), page_size)
        self.nat = NativeRadixCache(NativePageAllocator(num_pages), page_size)
        self.history: list[list[int]] = [[0] * page_size * 3]
        self.locks: list[tuple[Node, Node]] = []  # (python handle, native handle), locked once

    def _same_handles(self, a: Node, b: Node) -> None:
        assert a.id == b.id, f"handles differ: python node {a.id}, native node {b.id}"

    # ------------------------------------------------------------------ operations
    @rule(data=st.data(), ns=st.sampled_from(NAMESPACES), record=st.booleans(),
          as_array=st.booleans())
    def match(self, data: st.DataObject, ns: str | None, record: bool, as_array: bool) -> None:
        toks = data.draw(page_tokens(self.history, self.ps))
        arg = np.array(toks, dtype=np.int64) if as_array else toks
        a = self.py.match_prefix(arg, ns, record_stats=record)
        b = self.nat.match_prefix(arg, ns, record_stats=record)
        assert (a.length, pl(a.pages)) == (b.length, pl(b.pages)), "match results differ"
        assert b.pages.dtype == np.int32  # type: ignore[union-attr]
        self._same_handles(a.handle, b.handle)
        if data.draw(st.booleans()):
            self.py.lock(a.handle)
            self.nat.lock(b.handle)
            self.locks.append((a.handle, b.handle))

    @rule(data=st.data(), ns=st.sampled_from(NAMESPACES), lock=st.booleans())
    def insert(self, data: st.DataObject, ns: str | None, lock: bool) -> None:
        toks = data.draw(page_tokens(self.history, self.ps))
        toks = toks[: len(toks) // self.ps * self.ps]
        k = len(toks) // self.ps
        pa, pb = self.py.allocator.alloc(k), self.nat.allocator.alloc(k)
        assert pa == pb, "allocators diverged"
        if pa is None:
            return
        a = self.py.insert(toks, pa, ns)
        b = self.nat.insert(np.array(toks, dtype=np.int32), np.array(pb, np.int32), ns)
        assert (a.num_existing, pl(a.pages), a.differs) == (b.num_existing, pl(b.pages),
                                                            b.differs), "insert results differ"
        self._same_handles(a.handle, b.handle)
        if lock:
            self.py.lock(a.handle)
            self.nat.lock(b.handle)
            self.locks.append((a.handle, b.handle))
        # The "request" ends: its own references go (its duplicates of cached pages free up).
        self.py.allocator.decref(pa)
        self.nat.allocator.decref(pb)
        self.history.append(toks)

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        a, b = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.py.unlock(a)
        self.nat.unlock(b)

    @rule(n=st.integers(0, 12))
    def evict(self, n: int) -> None:
        a, b = self.py.evict(n), self.nat.evict(n)
        assert pl(a) == pl(b), "evicted pages differ"
        self.py.allocator.decref(a)
        self.nat.allocator.decref(b)

    @rule()
    def flush(self) -> None:
        a, b = self.py.flush(), self.nat.flush()
        assert pl(a) == pl(b), "flushed pages differ"
        self.py.allocator.decref(a)
        self.nat.allocator.decref(b)

    @rule(data=st.data())
    def stale_handle(self, data: st.DataObject) -> None:
        """Locking a handle whose node was evicted fails on both; a root's is a no-op."""
        if not self.locks:
            return
        a, b = self.locks[data.draw(st.integers(0, len(self.locks) - 1))]
        assert (a.parent is None) == (b.parent is None) and a.is_root == b.is_root
        assert a.namespace == b.namespace
        assert set(a.children) == set(b.children)

    # ------------------------------------------------------------------ the comparison
    @invariant()
    def same_state(self) -> None:
        if not hasattr(self, "py"):
            return
        assert python_snapshot(self.py) == self.nat.snapshot(), "tree states differ"
        assert self.py._clock == self.nat._tree.counters()["clock"]
        assert self.py.stats() == self.nat.stats()
        assert np.array_equal(self.py.allocator.refcounts(), self.nat.allocator.refcounts())
        assert self.py.tree_pages() == self.nat.tree_pages()
        self.py.check_invariants()
        self.nat.check_invariants()

    def teardown(self) -> None:
        if not hasattr(self, "py"):
            return
        for a, b in self.locks:
            self.py.unlock(a)
            self.nat.unlock(b)
        self.locks = []
        self.flush()
        self.same_state()
        assert self.nat.num_nodes == 0 and self.nat.allocator.num_free == self.nat.allocator.num_total


DiffMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_native_tree_matches_python_tree = DiffMachine.TestCase


def _outcome(fn: object, *args: object) -> object:
    try:
        out = fn(*args)  # type: ignore[operator]
    except AssertionError as e:
        return ("error", str(e))
    return pl(out) if isinstance(out, (list, np.ndarray)) else out


@settings(max_examples=150, deadline=None)
@given(num_pages=st.integers(1, 12), ops=st.lists(st.tuples(
    st.sampled_from(["alloc", "alloc_array", "incref", "decref", "refcount"]),
    st.lists(st.integers(-1, 13), max_size=6), st.booleans()), max_size=30))
def test_native_allocator_matches_python_allocator(
        num_pages: int, ops: list[tuple[str, list[int], bool]]) -> None:
    """Same pages, refcounts, free order and errors for the same calls (duplicates included)."""
    py, nat = PageAllocator(num_pages), NativePageAllocator(num_pages)
    for op, pages, as_array in ops:
        if op in ("alloc", "alloc_array"):
            args: tuple[object, ...] = (len(pages),)
        elif op == "refcount":
            args = (pages[0] if pages else 1,)
        else:
            args = (np.array(pages, dtype=np.int32) if as_array else pages,)
        assert _outcome(getattr(py, op), *args) == _outcome(getattr(nat, op), *args), op
        assert np.array_equal(py.refcounts(), nat.refcounts())
        assert (py.num_free, py.num_used) == (nat.num_free, nat.num_used)
        assert pl(py._stack[: py._top]) == pl(nat._core.free_stack()), "free stacks differ"
    held = {p: int(c) for p, c in enumerate(py.refcounts().tolist()) if c}
    py.check_refcounts(held)
    nat.check_refcounts(held)
    assert type(make_page_allocator(4, "native")) is NativePageAllocator
    assert type(make_page_allocator(4, "python")) is PageAllocator


@st.composite
def _page_runs(draw: st.DrawFn, num_pages: int) -> list[int]:
    """A page list as the engine makes them: runs of consecutive ids (up and down, some long
    enough for the native allocator's contiguous path), loose pages, repeats, out-of-range."""
    out: list[int] = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["up", "down", "loose", "repeat"]))
        start = draw(st.integers(0, num_pages + 1))
        length = draw(st.integers(1, 90))
        if kind == "up":
            out += range(start, min(start + length, num_pages + 2))
        elif kind == "down":
            out += range(start, max(start - length, -1), -1)
        elif kind == "loose":
            out += draw(st.lists(st.integers(1, num_pages), max_size=20))
        elif out:
            out += out[-draw(st.integers(1, len(out))):]
    return out


@settings(max_examples=300, deadline=None)
@given(data=st.data(), num_pages=st.integers(20, 160))
def test_native_allocator_matches_python_on_long_runs(data: st.DataObject, num_pages: int) -> None:
    """Long lists (the native allocator's run path): same refcounts, free order and errors."""
    py, nat = PageAllocator(num_pages), NativePageAllocator(num_pages)
    held: list[np.ndarray] = []
    for _ in range(data.draw(st.integers(1, 25))):
        op = data.draw(st.sampled_from(["alloc", "incref", "decref", "release"]))
        if op == "alloc":
            n = data.draw(st.integers(0, num_pages))
            a, b = _outcome(py.alloc_array, n), _outcome(nat.alloc_array, n)
            assert a == b
            if isinstance(a, list):
                held.append(np.array(a, dtype=np.int32))
        elif op == "release":  # a holder gives back what it got (often freeing it)
            if not held:
                continue
            pages = held.pop(data.draw(st.integers(0, len(held) - 1)))
            assert _outcome(py.decref, pages) == _outcome(nat.decref, pages)
        else:
            pages = np.array(data.draw(_page_runs(num_pages)), dtype=np.int32)
            assert _outcome(getattr(py, op), pages) == _outcome(getattr(nat, op), pages), op
        assert np.array_equal(py.refcounts(), nat.refcounts())
        assert pl(py._stack[: py._top]) == pl(nat._core.free_stack()), "free stacks differ"


def test_lock_of_evicted_node_and_dropped_namespace_root() -> None:
    cache = NativeRadixCache(PageAllocator(8), 1)
    pages = cache.allocator.alloc(2)
    assert pages is not None
    res = cache.insert([1, 2], pages, "t")
    cache.allocator.decref(pages)  # the inserting request ended
    miss = cache.match_prefix([5, 6, 7], "t")  # matched nothing: the namespace's root
    assert miss.handle.is_root and miss.handle.namespace == "t"
    cache.lock(miss.handle)
    cache.allocator.decref(cache.evict(2))
    assert res.handle.parent is None, "an evicted handle reads as detached"
    with pytest.raises(AssertionError, match="evicted"):
        cache.lock(res.handle)
    cache.unlock(miss.handle)  # the namespace root is gone: still a no-op, as in Python
    assert miss.handle.is_root and miss.handle.namespace == "t"
    cache.check_invariants({})


def _seq(tokens: list[int], arrival: int, ns: str | None) -> Sequence:
    return Sequence(rid=f"r{arrival}", index=0, prompt_ids=tokens,
                    params=SamplingParams(), namespace=ns, arrival=arrival,
                    pages=SequencePages(2))


@pytest.mark.parametrize("seed", range(8))
def test_lpm_order_is_the_same_on_both_trees(seed: int) -> None:
    """The native lpm walk (C++) orders a waiting queue exactly as the Python walk does."""
    rng = np.random.default_rng(seed)
    ps = 2
    queues = []
    caches: list[RadixCache] = [RadixCache(PageAllocator(400), ps),
                                NativeRadixCache(PageAllocator(400), ps)]  # type: ignore[list-item]
    stems = [rng.integers(0, 4, size=12).tolist() for _ in range(4)]
    prompts = [(stems[rng.integers(4)][: rng.integers(0, 13)]
                + rng.integers(0, 4, size=rng.integers(1, 6)).tolist(),
                [None, "a"][rng.integers(2)]) for _ in range(60)]
    for cache in caches:
        q = WaitingQueue(cache, "lpm")
        for toks, ns in prompts[:20]:  # cached: what earlier requests computed
            n = len(toks) // ps * ps
            pages = cache.allocator.alloc(n // ps)
            assert pages is not None
            cache.insert(toks[:n], pages, ns)
            cache.allocator.decref(pages)
        for i, (toks, ns) in enumerate(prompts[20:]):
            q.push(_seq(toks, i, ns))
        queues.append(q)
    orders = [[s.arrival for s in q.ordered()] for q in queues]
    assert orders[0] == orders[1]
    for cache in caches:  # the tree changes under the queues: still the same order
        cache.allocator.decref(cache.evict(7))
        toks, ns = prompts[25]
        n = len(toks) // ps * ps
        pages = cache.allocator.alloc(n // ps)
        assert pages is not None
        cache.insert(toks[:n], pages, ns)
        cache.allocator.decref(pages)
    orders = [[s.arrival for s in q.ordered()] for q in queues]
    assert orders[0] == orders[1]


def test_backend_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    alloc = PageAllocator(8)
    monkeypatch.delenv("RADIXRT_RADIX_BACKEND", raising=False)
    assert isinstance(make_prefix_cache(alloc, 1, True), NativeRadixCache), "native by default"
    assert type(make_prefix_cache(alloc, 1, True, backend="python")) is RadixCache
    monkeypatch.setenv("RADIXRT_RADIX_BACKEND", "python")
    assert type(make_prefix_cache(alloc, 1, True)) is RadixCache
    assert isinstance(make_prefix_cache(alloc, 1, True, backend="native"), NativeRadixCache)
    monkeypatch.setenv("RADIXRT_RADIX_BACKEND", "rust")
    with pytest.raises(ValueError, match="radix backend 'rust'"):
        make_prefix_cache(alloc, 1, True)
