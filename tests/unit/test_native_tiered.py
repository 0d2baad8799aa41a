"""The native host tier against the Python one (the reference), operation by operation.

Hypothesis drives random sequences of the tiered cache's operations through ``TieredRadixCache``
and ``NativeTieredRadixCache``, each over its own GPU pool, host pool and transfer: match (hits
ending on host-only nodes, then ``start_load`` with an evicting allocation), insert (over
host-only and loading nodes too), lock / unlock, evict (write-back to the host, host LRU
eviction when it is full, the host-full drop), ``backup_ahead``, transfers finishing and
``poll``, ``claim_loaded``, flush. Transfers are deferred (copies run when the test completes
them or the cache fences) or immediate (the plain CPU ``PageTransfer``). After every operation
both must have returned the same and hold the same state: every node in both tiers (pages, host
pages, tickets, lock_ref, last_access), both LRUs, pending loads, counters and stats, both pools'
refcounts and free stacks, the copies issued (same tickets), and both pools' contents.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from radixrt.cache import PageAllocator
from radixrt.cache.host_pool import HostKVPool
from radixrt.cache.kv_pool import KVPool
from radixrt.cache.native import NativePageAllocator
from radixrt.cache.native_tiered import NativeTieredRadixCache
from radixrt.cache.node import MatchResult, Node
from radixrt.cache.tiered import TieredRadixCache
from radixrt.cache.transfer import PageTransfer
from tests.fixtures.page_tokens import page_tokens
from tests.fixtures.radix_backends import NATIVE_SKIP, DeferredTransfer, pl

pytestmark = NATIVE_SKIP

NAMESPACES = [None, "tenant-a"]


def python_state(cache: TieredRadixCache) -> tuple[Any, ...]:
    """The Python cache's state in the layout of the native snapshots."""
    nodes = sorted([*cache._roots.values(), *cache._iter_nodes()], key=lambda n: n.id)
    gpu = [(n.id, n.parent.id if n.parent is not None else -1, n.is_root, n.namespace,
            n.key.tolist(), n.pages.tolist(), n.lock_ref, n.last_access) for n in nodes]
    host = [(n.id, n.host_pages.tolist(), n.load_seq, n.write_seq, n.load_unused) for n in nodes]
    return (gpu, [i for _, i in cache._lru], host, [i for _, i in cache._host_lru],
            [(t, n.id) for t, n in cache._loads], cache._clock)


def native_state(cache: NativeTieredRadixCache) -> tuple[Any, ...]:
    gpu, lru = cache.snapshot()
    host, host_lru, loads = cache.tier_snapshot()
    return (gpu, lru, host, host_lru, [tuple(x) for x in loads],
            cache._tree.counters()["clock"])


class Side:
    """One system: pools, transfer, allocator and cache."""

    def __init__(self, native: bool, ps: int, gpu_pages: int, host_pages: int,
                 deferred: bool) -> None:
        self.pool = KVPool(num_layers=1, num_pages=gpu_pages, page_size=ps, num_kv_heads=1,
                           head_dim=1, dtype=torch.float32, device="cpu")
        self.host = HostKVPool(num_pages=host_pages, num_layers=1, page_size=ps, num_kv_heads=1,
                               head_dim=1, dtype=torch.float32, pin=False)
        self.host.data.zero_()  # allocated uninitialized: both sides start equal
        for kv in self.pool.all_layers():
            kv.zero_()
        self.xfer = (DeferredTransfer(self.pool, self.host) if deferred
                     else PageTransfer(self.pool, self.host, staging_pages=3))
        if native:
            self.alloc: PageAllocator = NativePageAllocator(gpu_pages)
            self.cache: Any = NativeTieredRadixCache(self.alloc, ps, self.xfer)
        else:
            self.alloc = PageAllocator(gpu_pages)
            self.cache = TieredRadixCache(self.alloc, ps, self.xfer)

    def alloc_evicting(self, n: int) -> list[int] | None:
        short = n - self.alloc.num_free
        if short > 0:
            self.alloc.decref(self.cache.evict(short))
        return self.alloc.alloc(n)

    def compute(self, pages: list[int], tokens: list[int]) -> None:
        """The model's forward: K/V of each position from its token (deterministic)."""
        if not pages:
            return
        k, v = self.pool.all_layers()
        vals = torch.tensor(tokens, dtype=torch.float32).reshape(len(pages), -1)
        k[0, pages, :, 0, 0] = vals
        v[0, pages, :, 0, 0] = -vals

    def complete(self, n: int) -> None:
        if isinstance(self.xfer, DeferredTransfer):
            self.xfer.complete(n)


class TieredDiffMachine(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([1, 2, 4]), gpu_pages=st.integers(3, 14),
                host_pages=st.integers(1, 32), deferred=st.booleans())
    def setup(self, page_size: int, gpu_pages: int, host_pages: int, deferred: bool) -> None:
        self.ps = page_size
        self.py = Side(False, page_size, gpu_pages, host_pages, deferred)
        self.nat = Side(True, page_size, gpu_pages, host_pages, deferred)
        self.history: list[list[int]] = [[0] * page_size * 3]
        self.locks: list[tuple[Node, Node]] = []  # (python handle, native handle), locked once
        self.inserted: list[tuple[str | None, list[int]]] = []

    def _same_match(self, a: MatchResult, b: MatchResult) -> None:
        assert (a.length, pl(a.pages), a.handle.id, a.host_length, a.ready) == (
            b.length, pl(b.pages), b.handle.id, b.host_length, b.ready), "match results differ"
        assert [n.id for n in a.host_nodes] == [n.id for n in b.host_nodes], "host nodes differ"

    # ------------------------------------------------------------------ operations
    @rule(data=st.data(), ns=st.sampled_from(NAMESPACES), record=st.booleans(),
          then=st.sampled_from(["nothing", "lock", "load", "claim"]))
    def match(self, data: st.DataObject, ns: str | None, record: bool, then: str) -> None:
        toks = data.draw(page_tokens(self.history, self.ps))
        a = self.py.cache.match_prefix(toks, ns, record_stats=record)
        b = self.nat.cache.match_prefix(np.array(toks, dtype=np.int32), ns, record_stats=record)
        self._same_match(a, b)
        if then == "lock":
            self.py.cache.lock(a.handle)
            self.nat.cache.lock(b.handle)
            self.locks.append((a.handle, b.handle))
        elif then == "load":  # a host hit: give it GPU pages (evicting) and copy it in
            got = (self.py.cache.start_load(a, self.py.alloc_evicting),
                   self.nat.cache.start_load(b, self.nat.alloc_evicting))
            assert got[0] == got[1], f"start_load loaded {got[0]} vs {got[1]} tokens"
        elif then == "claim":
            assert self.py.cache.claim_loaded(a.handle) == self.nat.cache.claim_loaded(b.handle)

    @rule(data=st.data(), ns=st.sampled_from(NAMESPACES), lock=st.booleans())
    def insert(self, data: st.DataObject, ns: str | None, lock: bool) -> None:
        toks = data.draw(page_tokens(self.history, self.ps))
        toks = toks[: len(toks) // self.ps * self.ps]
        k = len(toks) // self.ps
        pa, pb = self.py.alloc_evicting(k), self.nat.alloc_evicting(k)
        assert pa == pb, "allocations diverged"
        if pa is None or pb is None:
            return
        self.py.compute(pa, toks)
        self.nat.compute(pb, toks)
        a = self.py.cache.insert(toks, pa, ns)
        b = self.nat.cache.insert(np.array(toks, dtype=np.int32), np.array(pb, np.int32), ns)
        assert (a.num_existing, pl(a.pages), a.differs, a.handle.id) == (
            b.num_existing, pl(b.pages), b.differs, b.handle.id), "insert results differ"
        if lock:
            self.py.cache.lock(a.handle)
            self.nat.cache.lock(b.handle)
            self.locks.append((a.handle, b.handle))
        self.py.alloc.decref(pa)  # the inserting request ends: its own references go
        self.nat.alloc.decref(pb)
        self.history.append(toks)
        if toks:
            self.inserted.append((ns, toks))

    @precondition(lambda self: self.inserted)
    @rule(data=st.data(), repeat=st.integers(1, 3))
    def request(self, data: st.DataObject, repeat: int) -> None:
        for _ in range(repeat):  # weighs requests up: they drive the loads
            self._request(data)

    @precondition(lambda self: self.inserted)
    @rule(data=st.data(), n=st.integers(1, 16))
    def evict_then_request(self, data: st.DataObject, n: int) -> None:
        """A prompt comes back after its KV was pushed down to the host."""
        self.evict(n)
        self._request(data)

    def _request(self, data: st.DataObject) -> None:
        """What the scheduler does with a request whose prompt extends a cached one: a host hit
        starts its load; a ready prefix is locked and its loads claimed."""
        ns, toks = data.draw(st.sampled_from(self.inserted))
        toks = toks + [9]
        a = self.py.cache.match_prefix(toks, ns)
        b = self.nat.cache.match_prefix(toks, ns)
        self._same_match(a, b)
        if a.host_nodes:
            got = (self.py.cache.start_load(a, self.py.alloc_evicting),
                   self.nat.cache.start_load(b, self.nat.alloc_evicting))
            assert got[0] == got[1], f"start_load loaded {got[0]} vs {got[1]} tokens"
        elif a.ready:
            self.py.cache.lock(a.handle)
            self.nat.cache.lock(b.handle)
            self.locks.append((a.handle, b.handle))
            assert self.py.cache.claim_loaded(a.handle) == self.nat.cache.claim_loaded(b.handle)

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        a, b = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.py.cache.unlock(a)
        self.nat.cache.unlock(b)

    @rule(n=st.integers(0, 16))
    def evict(self, n: int) -> None:
        a, b = self.py.cache.evict(n), self.nat.cache.evict(n)
        assert pl(a) == pl(b), "evicted pages differ"
        self.py.alloc.decref(a)
        self.nat.alloc.decref(b)

    @rule(n=st.integers(0, 8))
    def backup_ahead(self, n: int) -> None:
        assert self.py.cache.backup_ahead(n) == self.nat.cache.backup_ahead(n)

    @rule(n=st.integers(0, 3))
    def transfers_finish(self, n: int) -> None:
        """The side stream finishes ``n`` more copies, then a step polls."""
        self.py.complete(n)
        self.nat.complete(n)
        self.py.cache.poll()
        self.nat.cache.poll()
        assert self.py.cache.loads_pending == self.nat.cache.loads_pending

    @rule()
    def flush(self) -> None:
        a, b = self.py.cache.flush(), self.nat.cache.flush()
        assert pl(a) == pl(b), "flushed pages differ"
        self.py.alloc.decref(a)
        self.nat.alloc.decref(b)

    # ------------------------------------------------------------------ the comparison
    @invariant()
    def same_state(self) -> None:
        if not hasattr(self, "py"):
            return
        pc, nc = self.py.cache, self.nat.cache
        assert python_state(pc) == native_state(nc), "tree states differ"
        # Wall-clock copy time is the one stat that may differ.
        assert replace(pc.stats(), load_seconds=0.0) == replace(nc.stats(), load_seconds=0.0)
        assert pc.host_cached_tokens == nc.host_cached_tokens
        for a, b in ((self.py.alloc, self.nat.alloc), (pc.host_allocator, nc.host_allocator)):
            assert np.array_equal(a.refcounts(), b.refcounts()), "refcounts differ"
            assert (a.num_free, a.num_used) == (b.num_free, b.num_used)
        assert pl(pc.host_allocator._stack[: pc.host_allocator._top]) == pl(
            nc.host_allocator._core.free_stack()), "host free stacks differ"
        assert self.py.xfer._next == self.nat.xfer._next, "different numbers of copies issued"
        assert torch.equal(self.py.pool.all_layers()[0], self.nat.pool.all_layers()[0])
        assert torch.equal(self.py.host.data, self.nat.host.data), "host pools differ"
        pc.check_invariants()
        nc.check_invariants()

    def teardown(self) -> None:
        if not hasattr(self, "py"):
            return
        for a, b in self.locks:
            self.py.cache.unlock(a)
            self.nat.cache.unlock(b)
        self.locks = []
        self.transfers_finish(1 << 20)  # every copy, so no load holds its nodes
        self.flush()
        self.same_state()
        for side in (self.py, self.nat):
            assert side.cache.num_nodes == 0 and side.alloc.num_free == side.alloc.num_total
            assert side.cache.host_allocator.num_free == side.cache.host_allocator.num_total


TieredDiffMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_native_tiered_cache_matches_python = TieredDiffMachine.TestCase
