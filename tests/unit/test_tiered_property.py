"""Stateful property test of the two-tier cache: TieredRadixCache (and NativeTieredRadixCache,
the same on the native tree) over a real GPU-layout pool and host pool (both in RAM), with every
page's *contents* checked, not only its bookkeeping.

Each token's K/V is a function of its whole prefix, so a page holds the right data exactly when
it holds the value this test computes for it. Transfers are deferred: a copy runs only when the
test completes it (in ticket order, like the side stream) or when the cache fences on it (the
compute stream waiting for it). So a request that read a page whose load had not finished, or a
GPU page reused before its write-back copied it, shows up as wrong data.

Simulated requests follow the scheduler's protocol (see test_radix_property.py) plus the tier:
match -> a host continuation starts a load and the request waits; a match through a loading
node waits; else hold + lock, compute the rest (writing its K/V), insert, release. While every
prefix ever inserted fits the host tier, nothing may be lost: each one still matches in full
(GPU + host), i.e. the hit rate of a working set that fits the host is the optimal one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from radixrt.cache import SequencePages
from radixrt.cache.host_pool import HostKVPool
from radixrt.cache.kv_pool import KVPool
from radixrt.cache.native import make_page_allocator
from radixrt.cache.node import Node
from tests.fixtures.radix_backends import NATIVE_SKIP, DeferredTransfer, make_tiered

NAMESPACES = [None, "tenant-a"]
LAYERS = 2


def kv_value(prefix_hash: int) -> float:
    return float(prefix_hash % 1_000_003)


def token_values(tokens: list[int]) -> list[float]:
    """The K value every layer stores for each position (V is its negation)."""
    out, h = [], 7
    for t in tokens:
        h = (h * 31 + t + 1) % 1_000_000_007
        out.append(kv_value(h))
    return out


@dataclass
class SimReq:
    ns: str | None
    tokens: list[int]
    seq: SequencePages
    handle: Node
    locked_len: int


class TieredMachine(RuleBasedStateMachine):
    backend = "python"

    @initialize(
        page_size=st.sampled_from([1, 2, 4]), gpu_pages=st.integers(3, 16),
        host_pages=st.integers(1, 48),
    )  # fmt: skip
    def setup(self, page_size: int, gpu_pages: int, host_pages: int) -> None:
        self.ps = page_size
        self.pool = KVPool(num_layers=LAYERS, num_pages=gpu_pages, page_size=page_size,
                           num_kv_heads=1, head_dim=2, dtype=torch.float64, device="cpu")
        self.host = HostKVPool(num_pages=host_pages, num_layers=LAYERS, page_size=page_size,
                               num_kv_heads=1, head_dim=2, dtype=torch.float64, pin=False)
        self.xfer = DeferredTransfer(self.pool, self.host)
        self.alloc = make_page_allocator(gpu_pages, self.backend)
        self.cache = make_tiered(self.backend, self.alloc, page_size, self.xfer)
        self.reqs: list[SimReq] = []
        self.waiting: list[tuple[str | None, list[int]]] = []
        self.history: list[list[int]] = [[0] * (3 * page_size)]
        # Every page-aligned prefix ever inserted, per namespace; None once it outgrew the host.
        self.inserted: dict[str | None, set[tuple[int, ...]]] | None = {ns: set() for ns in NAMESPACES}

    # ------------------------------------------------------------------ helpers
    def _free_up(self, pages: int) -> None:
        short = pages - self.alloc.num_free
        if short > 0:
            self.alloc.decref(self.cache.evict(short))

    def _alloc(self, n: int) -> list[int] | None:
        self._free_up(n)
        return self.alloc.alloc(n)

    def _reserve(self, seq: SequencePages, total: int) -> bool:
        if seq.ensure_capacity(total, self.alloc):
            return True
        self._free_up(-(-total // self.ps) - seq.num_pages)
        return seq.ensure_capacity(total, self.alloc)

    def _check_pages(self, pages: Sequence[int] | np.ndarray, tokens: list[int], what: str,
                     start: int = 0) -> None:
        """``pages`` hold positions [start, start + len(pages) * ps) of ``tokens``."""
        if len(pages) == 0:
            return
        vals = token_values(tokens[: start + len(pages) * self.ps])[start:]
        want = torch.tensor(vals, dtype=torch.float64)
        k, v = self.pool.all_layers()
        got = k[:, pages, :, 0, 0].reshape(LAYERS, -1)  # [L, tokens]
        assert torch.equal(got, want.expand(LAYERS, -1)), f"{what}: K holds wrong data"
        assert torch.equal(v[:, pages, :, 0, 1].reshape(LAYERS, -1), -want.expand(LAYERS, -1))

    def _compute(self, seq: SequencePages, tokens: list[int], start: int, end: int) -> None:
        """The model's forward: write K/V of positions [start, end) into the sequence's slots."""
        if end <= start:
            return
        vals = torch.tensor(token_values(tokens[:end])[start:], dtype=torch.float64)
        slots = torch.from_numpy(seq.slot_array(start, end))
        for layer in range(LAYERS):
            k = torch.stack([vals, vals], dim=-1).unsqueeze(1)  # dim 0 is read for K
            v = torch.stack([-vals, -vals], dim=-1).unsqueeze(1)  # dim 1 is read for V
            self.pool.store(layer, slots, k, v)

    def _held(self) -> Counter[int]:
        return Counter(p for r in self.reqs for p in r.seq.pages)

    def _track_insert(self, ns: str | None, span: list[int]) -> None:
        if self.inserted is None:
            return
        for i in range(self.ps, len(span) + 1, self.ps):
            self.inserted[ns].add(tuple(span[:i]))
        if sum(len(s) for s in self.inserted.values()) > self.host.num_pages:
            self.inserted = None  # the working set outgrew the host tier: losses are allowed

    # ------------------------------------------------------------------ rules
    @st.composite
    @staticmethod
    def _prompt(draw: st.DrawFn, history: list[list[int]], ps: int) -> list[int]:
        base = draw(st.sampled_from(history))
        cut = draw(st.integers(0, len(base)))
        ext = draw(st.lists(st.integers(0, 2), min_size=1 if cut == 0 else 0, max_size=2 * ps + 1))
        return (base[:cut] + ext)[: 6 * ps]

    @rule(data=st.data(), ns=st.sampled_from(NAMESPACES), prefill=st.booleans())
    def admit(self, data: st.DataObject, ns: str | None, prefill: bool) -> None:
        tokens = data.draw(self._prompt(self.history, self.ps))
        self.history.append(list(tokens))
        self._admit(ns, tokens, prefill)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data(), prefill=st.booleans())
    def resume(self, data: st.DataObject, prefill: bool) -> None:
        """A request that waited for a load comes back."""
        ns, tokens = self.waiting.pop(data.draw(st.integers(0, len(self.waiting) - 1)))
        self._admit(ns, tokens, prefill)

    def _admit(self, ns: str | None, tokens: list[int], prefill: bool) -> None:
        m = self.cache.match_prefix(tokens, ns)
        if m.host_nodes:
            if self.cache.start_load(m, self._alloc):
                self.waiting.append((ns, tokens))  # it waits for the load; nothing else does
            return
        if not m.ready:
            self.waiting.append((ns, tokens))  # its prefix is still loading
            return
        self._check_pages(m.pages, tokens, "matched GPU prefix")
        seq = SequencePages(self.ps)
        seq.adopt_prefix(m.pages, self.alloc)
        self.cache.lock(m.handle)
        self.cache.claim_loaded(m.handle)
        req = SimReq(ns, tokens, seq, m.handle, m.length)
        self.reqs.append(req)
        if not self._reserve(seq, len(tokens)):
            self._drop(req)
            return
        self._compute(seq, tokens, m.length, len(tokens))
        if prefill:
            self._insert(req, len(tokens))

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), min_size=1, max_size=5))
    def decode(self, data: st.DataObject, extra: list[int]) -> None:
        req = data.draw(st.sampled_from(self.reqs))
        n = len(req.tokens)
        if self._reserve(req.seq, n + len(extra)):
            req.tokens.extend(extra)
            self._compute(req.seq, req.tokens, n, len(req.tokens))

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def insert(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(self.reqs))
        self._insert(req, data.draw(st.integers(req.locked_len, len(req.tokens))))

    def _insert(self, req: SimReq, upto: int) -> None:
        k = upto // self.ps
        span = req.tokens[: k * self.ps]
        res = self.cache.insert(span, req.seq.pages[:k], req.ns)
        req.seq.replace_prefix_pages(res.pages, self.alloc)
        self._check_pages(req.seq.pages[:k], span, "pages after insert")
        self.cache.lock(res.handle)
        self.cache.unlock(req.handle)
        req.handle, req.locked_len = res.handle, len(span)
        self._track_insert(req.ns, span)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), cache_it=st.booleans())
    def finish(self, data: st.DataObject, cache_it: bool) -> None:
        req = data.draw(st.sampled_from(self.reqs))
        if cache_it:
            self._insert(req, len(req.tokens))
        self._drop(req)

    def _drop(self, req: SimReq) -> None:
        req.seq.release(self.alloc)
        self.cache.unlock(req.handle)
        self.reqs.remove(req)

    @rule(n=st.integers(1, 6))
    def evict(self, n: int) -> None:
        before = self.cache.evictable_pages
        released = self.cache.evict(n)
        assert len(released) == min(n, before), f"evict({n}) released {len(released)} of {before}"
        self.alloc.decref(released)

    @rule(n=st.integers(0, 3))
    def complete_transfers(self, n: int) -> None:
        """The side stream finishes ``n`` more copies (0: a step polls before any finished)."""
        self.xfer.complete(n)
        self.cache.poll()

    @rule(n=st.integers(1, 8))
    def backup_ahead(self, n: int) -> None:
        self.cache.backup_ahead(n)

    # ------------------------------------------------------------------ checks
    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "cache"):
            return
        self.cache.check_invariants(self._held())
        s = self.cache.stats()  # each loaded token is used once, wasted once, or still loaded
        assert s.load_used_tokens + s.load_wasted_pages * self.ps <= s.loaded_tokens, (
            f"used {s.load_used_tokens} + wasted {s.load_wasted_pages} pages > {s.loaded_tokens}")
        hdata = self.host.data
        for node in self.cache._iter_nodes():
            tokens = self._path_tokens(node)
            if node.on_gpu and node.load_seq == 0:
                self._check_pages(node.pages.tolist(), tokens, f"GPU pages of node {node.id}",
                                  start=len(tokens) - len(node.key))
            if node.on_host and node.write_seq <= self.xfer._completed:
                vals = torch.tensor(token_values(tokens)[-len(node.key):], dtype=torch.float64)
                got = hdata[node.host_pages.tolist()]  # [n, 2, L, ps, 1, 2]
                assert torch.equal(got[:, 0, :, :, 0, 0].permute(1, 0, 2).reshape(LAYERS, -1),
                                   vals.expand(LAYERS, -1)), f"host copy of node {node.id} wrong"
        if self.inserted is not None:  # lossless: every inserted prefix still matches in full
            for ns, prefixes in self.inserted.items():
                for p in prefixes:
                    m = self.cache.match_prefix([*p, 0], ns, record_stats=False)
                    assert m.length + m.host_length == len(p), (
                        f"prefix of {len(p)} tokens lost ({m.length} GPU + {m.host_length} host)"
                    )
        for r in self.reqs:
            assert r.seq.num_tokens == len(r.tokens)
            self._check_pages(r.seq.pages[: len(r.tokens) // self.ps], r.tokens, "running request")

    def _path_tokens(self, node: Node) -> list[int]:
        parts = []
        n: Node | None = node
        while n is not None and not n.is_root:
            parts.append(n.key.tolist())
            n = n.parent
        return [t for part in reversed(parts) for t in part]

    def teardown(self) -> None:
        if not hasattr(self, "cache"):
            return
        for req in list(self.reqs):
            self._drop(req)
        self.xfer.complete(len(self.xfer.queue))
        self.cache.poll()
        self.alloc.decref(self.cache.flush())
        assert self.cache.num_nodes == 0, "nodes left after every request finished and a flush"
        assert self.alloc.num_free == self.alloc.num_total, "GPU pages leaked"
        assert self.host.allocator.num_free == self.host.allocator.num_total, "host pages leaked"
        self.cache.check_invariants({})


TieredMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_tiered_cache_against_contents = TieredMachine.TestCase


class NativeTieredMachine(TieredMachine):
    backend = "native"


NativeTieredMachine.TestCase.settings = TieredMachine.TestCase.settings
test_native_tiered_cache_against_contents = NATIVE_SKIP(NativeTieredMachine.TestCase)
