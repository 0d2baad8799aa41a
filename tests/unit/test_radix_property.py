"""Stateful property test: RadixCache + SequencePages + PageAllocator against a reference model.

The model is deliberately naive: per namespace, a dict of every cached page-aligned prefix
(a token tuple) -> the physical page holding that prefix's last page, plus each prefix's last
access tick. Eviction in the model goes page by page: drop the unlocked leaf prefix with the
oldest access. The tree evicts whole nodes, but a node's pages always share one access time, so
the two orders agree page for page (the test asserts they do).

Simulated requests follow the scheduler's protocol: match -> hold pages + lock -> allocate the
rest -> (grow) -> insert -> dedupe (replace_prefix_pages) -> relock -> release + unlock.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from radixrt.cache import PageAllocator, SequencePages
from radixrt.cache.radix import Node
from tests.fixtures.radix_backends import NATIVE_SKIP, make_cache, pl

NAMESPACES = [None, "tenant-a", "tenant-b"]
Prefix = tuple[int, ...]


@dataclass
class SimReq:
    ns: str | None
    tokens: list[int]
    seq: SequencePages
    handle: Node
    locked_len: int  # tokens covered by the locked handle (all tree pages it holds)


class RadixMachine(RuleBasedStateMachine):
    backend = "python"

    @initialize(page_size=st.sampled_from([1, 2, 4, 16]), num_pages=st.integers(3, 24))
    def setup(self, page_size: int, num_pages: int) -> None:
        self.ps = page_size
        self.alloc = PageAllocator(num_pages)
        self.cache = make_cache(self.backend, self.alloc, page_size)
        self.model: dict[str | None, dict[Prefix, int]] = {ns: {} for ns in NAMESPACES}
        self.atime: dict[str | None, dict[Prefix, int]] = {ns: {} for ns in NAMESPACES}
        self.tick = 0
        self.reqs: list[SimReq] = []
        self.history: list[list[int]] = [[0] * (3 * page_size)]

    # ------------------------------------------------------------------ model helpers
    def _longest(self, ns: str | None, tokens: list[int], limit: int) -> int:
        n = 0
        while n + self.ps <= limit and tuple(tokens[: n + self.ps]) in self.model[ns]:
            n += self.ps
        return n

    def _model_pages(self, ns: str | None, tokens: list[int], n: int) -> list[int]:
        return [self.model[ns][tuple(tokens[:i])] for i in range(self.ps, n + 1, self.ps)]

    def _model_touch(self, ns: str | None, tokens: list[int], n: int) -> None:
        self.tick += 1
        for i in range(self.ps, n + 1, self.ps):
            self.atime[ns][tuple(tokens[:i])] = self.tick

    def _locked(self) -> set[tuple[str | None, Prefix]]:
        return {
            (r.ns, tuple(r.tokens[:i]))
            for r in self.reqs
            for i in range(self.ps, r.locked_len + 1, self.ps)
        }

    def _evictable_leaves(self) -> list[tuple[int, str | None, Prefix]]:
        locked = self._locked()
        out = []
        for ns, prefixes in self.model.items():
            parents = {p[: -self.ps] for p in prefixes}
            for p in prefixes:
                if p not in parents and (ns, p) not in locked:
                    out.append((self.atime[ns][p], ns, p))
        return out

    def _evict(self, n: int) -> None:
        locked = self._locked()
        evictable = sum(1 for ns, ps in self.model.items() for p in ps if (ns, p) not in locked)
        released = self.cache.evict(n)
        self.alloc.decref(released)  # the caller owns evicted pages (SequenceMemory frees them)
        freed = len(released)
        assert freed >= min(n, evictable), f"evict({n}) freed {freed} of {evictable} evictable"
        for _ in range(freed):
            leaves = sorted(self._evictable_leaves(), key=lambda x: x[0])
            assert leaves, "the tree evicted more pages than were unlocked (locked data lost)"
            assert len(leaves) == 1 or leaves[0][0] < leaves[1][0], "LRU tie between leaves"
            _, ns, p = leaves[0]
            page = self.model[ns].pop(p)
            del self.atime[ns][p]
            assert self.alloc.refcount(page) == 0, (
                f"LRU order broken: model expected page {page} (prefix {p}) to be evicted"
            )

    def _reserve(self, seq: SequencePages, total: int) -> bool:
        if seq.ensure_capacity(total, self.alloc):
            return True
        short = -(-total // self.ps) - seq.num_pages - self.alloc.num_free
        self._evict(short)
        return seq.ensure_capacity(total, self.alloc)

    def _held(self) -> Counter[int]:
        return Counter(p for r in self.reqs for p in r.seq.pages)

    # ------------------------------------------------------------------ rules
    @st.composite
    @staticmethod
    def _prompt(draw: st.DrawFn, history: list[list[int]], ps: int) -> list[int]:
        base = draw(st.sampled_from(history))
        cut = draw(st.integers(0, len(base)))
        ext = draw(st.lists(st.integers(0, 2), min_size=1 if cut == 0 else 0, max_size=2 * ps + 1))
        return (base[:cut] + ext)[: 6 * ps]

    def _match(self, ns: str | None, tokens: list[int]) -> Node:
        limit = ((len(tokens) - 1) // self.ps) * self.ps
        want = self._longest(ns, tokens, limit)
        m = self.cache.match_prefix(tokens, ns)
        assert m.length == want, f"match {m.length} tokens, true cached prefix {want}"
        assert pl(m.pages) == self._model_pages(ns, tokens, want), "matched wrong pages"
        if want:
            self._model_touch(ns, tokens, want)
        return m.handle

    @rule(data=st.data(), ns=st.sampled_from(NAMESPACES), prefill=st.booleans())
    def admit(self, data: st.DataObject, ns: str | None, prefill: bool) -> None:
        tokens = data.draw(self._prompt(self.history, self.ps))
        handle = self._match(ns, tokens)
        seq = SequencePages(self.ps)
        m_pages = self._model_pages(ns, tokens, self._longest(ns, tokens, len(tokens) - 1))
        seq.adopt_prefix(m_pages, self.alloc)
        self.cache.lock(handle)
        req = SimReq(ns, tokens, seq, handle, len(m_pages) * self.ps)
        self.reqs.append(req)
        self.history.append(list(tokens))  # later prompts branch off this one: shared prefixes
        if not self._reserve(seq, len(tokens)):  # pool exhausted: abort the request
            self._drop(req)
        elif prefill:  # the whole prompt was computed in this step: cache it now
            self._insert(req, len(tokens))

    @rule(data=st.data(), ns=st.sampled_from(NAMESPACES))
    def peek(self, data: st.DataObject, ns: str | None) -> None:
        """A match that admits nothing (e.g. a routing probe): only LRU times change."""
        self._match(ns, data.draw(self._prompt(self.history, self.ps)))

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), min_size=1, max_size=5))
    def grow(self, data: st.DataObject, extra: list[int]) -> None:
        """Decode: append tokens, allocating a page only on crossing a page boundary."""
        req = data.draw(st.sampled_from(self.reqs))
        if self._reserve(req.seq, len(req.tokens) + len(extra)):
            req.tokens.extend(extra)
        assert req.seq.num_tokens == len(req.tokens), "reserved slots != sequence length"
        assert 0 <= req.seq.wasted_slots < self.ps, "more than one partly filled page"

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def insert(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(self.reqs))
        upto = data.draw(st.integers(req.locked_len, len(req.tokens)))
        self._insert(req, upto)

    def _insert(self, req: SimReq, upto: int) -> None:
        k = upto // self.ps
        span = req.tokens[: k * self.ps]
        existing = self._longest(req.ns, span, len(span))
        want = self._model_pages(req.ns, span, existing) + pl(req.seq.pages[existing // self.ps : k])
        res = self.cache.insert(span, req.seq.pages[:k], req.ns)
        assert res.num_existing == existing, f"{res.num_existing} existing, model {existing}"
        assert pl(res.pages) == want, "insert returned pages other than tree's + adopted"
        for i in range(existing + self.ps, len(span) + 1, self.ps):
            self.model[req.ns][tuple(span[:i])] = int(req.seq.pages[i // self.ps - 1])
        self._model_touch(req.ns, span, len(span))
        req.seq.replace_prefix_pages(res.pages, self.alloc)
        self.cache.lock(res.handle)
        self.cache.unlock(req.handle)
        req.handle, req.locked_len = res.handle, len(span)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), cache_it=st.booleans())
    def finish(self, data: st.DataObject, cache_it: bool) -> None:
        req = data.draw(st.sampled_from(self.reqs))
        if cache_it:
            self._insert(req, len(req.tokens))
        self._drop(req)
        self.history.append(list(req.tokens))

    def _drop(self, req: SimReq) -> None:
        req.seq.release(self.alloc)
        self.cache.unlock(req.handle)
        self.reqs.remove(req)

    @rule(n=st.integers(1, 6))
    def evict(self, n: int) -> None:
        self._evict(n)

    # ------------------------------------------------------------------ checks
    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "cache"):
            return
        self.cache.check_invariants(self._held())
        model_pages = {p for prefixes in self.model.values() for p in prefixes.values()}
        assert self.cache.tree_pages() == model_pages, "tree holds different pages than model"
        n_prefixes = sum(len(p) for p in self.model.values())
        assert self.cache.cached_tokens == n_prefixes * self.ps
        for r in self.reqs:  # a running request's locked prefix is still cached and held
            assert self._longest(r.ns, r.tokens, r.locked_len) == r.locked_len

    def teardown(self) -> None:
        if not hasattr(self, "cache"):
            return
        for req in list(self.reqs):
            self._drop(req)
        self.alloc.decref(self.cache.evict(self.cache.evictable_pages))
        assert self.cache.num_nodes == 0, "nodes still locked after every request finished"
        assert self.alloc.num_free == self.alloc.num_total, "pages leaked"
        self.cache.check_invariants({})


RadixMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_radix_cache_against_model = RadixMachine.TestCase


class NativeRadixMachine(RadixMachine):
    backend = "native"


NativeRadixMachine.TestCase.settings = RadixMachine.TestCase.settings
test_native_radix_cache_against_model = NATIVE_SKIP(NativeRadixMachine.TestCase)
