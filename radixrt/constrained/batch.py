"""The step's token bitmask: filled on the CPU from each constrained row's matcher, copied to
the device without a sync, applied there in one pass (``kernels/token_bitmask``).

Two ways to run the grammar work of a step (``RADIXRT_GRAMMAR_FUSED``, default on):
- fused: as soon as step N's tokens are on the host, a few persistent fill threads each take
  their shard of rows and, in one pass, advance those matchers by N's tokens and fill their
  rows of step N+1's mask (two calls into xgrammar per thread, each outside the GIL), while
  the scheduler thread runs the stop rules. A matcher stays on one thread for its whole life
  (``Matcher.shard``), so its state stays in that core's cache, and the scheduler thread does
  not call into xgrammar on the hot path at all.
- unfused (the earlier path, kept to measure against): the scheduler thread advances every
  matcher, then xgrammar's batch matcher fills the mask with its own threads (it starts and
  joins a thread pool per call) on one helper thread.
``RADIXRT_GRAMMAR_THREADS`` sets the thread count of either (default ``default_threads``);
``RADIXRT_GRAMMAR_SWITCH_INTERVAL_MS`` the GIL switch interval the fused path sets (default 0.5).

Rows without a grammar keep all-ones words. Host buffers are pinned, allocated once and used
round-robin; an event after each buffer's non-blocking copy guards its reuse.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xgrammar as xgr

from radixrt.constrained.matcher import Matcher

# Below this many rows of work a plain loop on the caller's thread beats the hand-off.
BATCH_FILL_MIN_ROWS = 8
_RING = 2
THREADS_ENV = "RADIXRT_GRAMMAR_THREADS"
FUSED_ENV = "RADIXRT_GRAMMAR_FUSED"
SWITCH_ENV = "RADIXRT_GRAMMAR_SWITCH_INTERVAL_MS"
# A fill thread waits for the GIL until the scheduler thread's Python lets go of it, up to
# Python's switch interval (5 ms by default) per wait, three waits a task: the fused path
# lowers it for the process (idle fill threads compete for nothing, so it costs nothing then).
DEFAULT_SWITCH_INTERVAL_MS = 0.5


# xgrammar's batch accept without its Python wrapper, which reads the result element by
# element: two FFI calls each, and every FFI call drops and retakes the GIL, so a fill thread
# could wait behind the scheduler thread's Python (up to the switch interval) ~130 times per
# step instead of about twice. None where the internals differ (the wrapper is used then).
_RAW_BATCH_ACCEPT: Callable[..., Any] | None
try:
    from xgrammar.base import _core as _xgr_core

    _RAW_BATCH_ACCEPT = _xgr_core.BatchGrammarMatcher.batch_accept_token
except (ImportError, AttributeError):  # pragma: no cover - other xgrammar versions
    _RAW_BATCH_ACCEPT = None


def batch_accept(matchers: Sequence[xgr.GrammarMatcher], tokens: list[int]) -> list[bool] | None:
    """Advance each matcher by its token (one call, outside the GIL); None if every token
    was accepted (the case under the mask, told by one more call), else per matcher whether
    it accepted."""
    if _RAW_BATCH_ACCEPT is None:
        res = xgr.BatchGrammarMatcher.batch_accept_token(list(matchers), tokens)
        return None if all(res) else res
    out = _RAW_BATCH_ACCEPT([m._handle for m in matchers], tokens, False)
    if 0 not in out:  # its elements are 0 / 1
        return None
    return [bool(out[i]) for i in range(len(out))]


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def default_threads(fused: bool = True) -> int:
    """Threads for a batch's grammar work. Fused: a quarter of the cores, at most 4 (each
    thread makes two xgrammar calls a step; more threads mostly add hand-offs). Unfused: half
    the cores, at most 8 (xgrammar's fill stops scaling past that)."""
    cores = os.cpu_count() or 2
    return max(1, min(4, cores // 4)) if fused else max(1, min(8, cores // 2))


def _env_threads() -> int | None:
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {raw!r}")
    return int(raw)


def _env_fused() -> bool:
    raw = os.environ.get(FUSED_ENV, "1").strip().lower()
    if raw not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(f"{FUSED_ENV} must be 0 or 1, got {raw!r}")
    return raw in ("1", "true", "yes", "on")


def _env_switch_interval_ms() -> float | None:
    """RADIXRT_GRAMMAR_SWITCH_INTERVAL_MS: ms, or "off" (leave Python's as it is)."""
    raw = os.environ.get(SWITCH_ENV, "").strip().lower()
    if raw == "off":
        return None
    if not raw:
        return DEFAULT_SWITCH_INTERVAL_MS
    try:
        ms = float(raw)
    except ValueError:
        ms = -1.0
    if not 0 < ms <= 1000:
        raise ValueError(f"{SWITCH_ENV} must be milliseconds in (0, 1000] or off, got {raw!r}")
    return ms


def allowed_in_mask(host: torch.Tensor, rows: Sequence[int], tokens: Sequence[int]) -> list[bool]:
    """Whether ``tokens[j]`` is allowed by row ``rows[j]`` of a filled host bitmask: the draw
    sampled under that mask, so this is what the grammar will accept, known without xgrammar."""
    t = np.fromiter(tokens, dtype=np.int64, count=len(tokens))
    words = host.numpy()[np.fromiter(rows, dtype=np.int64, count=len(rows)), t >> 5]
    return ((words.astype(np.int64) >> (t & 31)) & 1).astype(bool).tolist()


@dataclass
class FillStats:
    """Time spent on the fill threads (seconds, summed over threads and steps)."""

    accept_s: float = 0.0
    fill_s: float = 0.0
    cpu_s: float = 0.0  # the threads' CPU time in both (wall above it: waiting, e.g. the GIL)
    tasks: int = 0
    arrival_s: float = 0.0  # waiting for a step's tokens to land (advance_on_arrival)
    arrivals: int = 0  # tasks that advanced on arrival


class _Arrival:
    """A step's drawn tokens on the host, waited for once, by the first fill thread to ask
    (the others block on the lock, outside the GIL, rather than each spinning on the event)."""

    def __init__(self, wait: Callable[[], np.ndarray]) -> None:
        self._wait = wait
        self._lock = threading.Lock()
        self._tokens: np.ndarray | None = None

    def tokens(self) -> np.ndarray:
        with self._lock:
            if self._tokens is None:
                self._tokens = self._wait()
            return self._tokens


class MaskBuilder:
    lazy = False  # its matchers call xgrammar as they advance (proc_masks: lazy ones)

    def __init__(self, vocab_size: int, device: torch.device | str,
                 threads: int | None = None, fused: bool | None = None) -> None:
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        self.device = torch.device(device)
        self.fused = _env_fused() if fused is None else fused
        self.threads = threads or _env_threads() or default_threads(self.fused)
        self._cuda = self.device.type == "cuda"
        self._ring: list[torch.Tensor] = []
        # Per ring buffer, the event after its host-to-device copy: a buffer is refilled only
        # once the copy that read it has run (it almost always has: a step lies between).
        self._copied: list[torch.cuda.Event | None] = []
        self._copy_stream: torch.cuda.Stream | None = None
        self._next = 0
        # Per thread (each written by its own thread only); ``stats`` sums them.
        self._stats = [FillStats() for _ in range(self.threads)]
        self._outstanding: list[Future[None]] = []
        if self.fused:
            switch_ms = _env_switch_interval_ms()
            if switch_ms is not None:
                sys.setswitchinterval(switch_ms / 1e3)
            # One single-thread executor per shard: a shard's tasks always run on one thread,
            # in order (a matcher's advance precedes its fill without any lock).
            self._shards = [ThreadPoolExecutor(1, thread_name_prefix=f"radixrt-grammar{k}")
                            for k in range(self.threads)]
            self._serial = [xgr.BatchGrammarMatcher(max_threads=1) for _ in range(self.threads)]
        else:
            self._batch = xgr.BatchGrammarMatcher(max_threads=self.threads)
            # It only waits on xgrammar's fill (which runs outside the GIL).
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="radixrt-mask")

    def _host(self, rows: int) -> tuple[int, torch.Tensor]:
        """A host buffer of at least ``rows`` rows, free to overwrite."""
        if len(self._ring) < _RING:
            self._ring.append(self._alloc(rows))
            self._copied.append(None)
        k = self._next
        self._next = (k + 1) % _RING
        ev = self._copied[k]
        if ev is not None:
            ev.synchronize()
            self._copied[k] = None
        if self._ring[k].shape[0] < rows:
            self._ring[k] = self._alloc(rows)
        return k, self._ring[k][:rows]

    def _alloc(self, rows: int) -> torch.Tensor:
        return torch.empty((max(rows, 64), self.words), dtype=torch.int32, pin_memory=self._cuda)

    def fill(self, matchers: Sequence[Matcher | None]) -> torch.Tensor | None:
        """[B, W] int32 bitmask on the device, or None when no row is constrained."""
        return self.finish(self.start(matchers))

    def _host_for(self, matchers: Sequence[Matcher | None]) -> tuple[int, torch.Tensor]:
        k, host = self._host(len(matchers))
        free = [i for i, m in enumerate(matchers) if m is None or m.done]
        if free:
            # Only rows without a grammar need all-ones words: the fill writes every other
            # row whole (a full memset was the biggest host cost at 256 x 128k).
            host[torch.tensor(free)] = -1
        return k, host

    def start(self, matchers: Sequence[Matcher | None]) -> PendingMask | None:
        """Begin filling the mask off the caller's thread (xgrammar releases the GIL there),
        so the caller's Python work runs meanwhile; ``finish`` waits for it. None: no
        constrained row. The matchers must not advance until then."""
        if self.fused:
            return self.advance_and_start((), matchers)
        idx = [i for i, m in enumerate(matchers) if m is not None and not m.done]
        if not idx:
            return None
        k, host = self._host_for(matchers)
        if len(idx) < BATCH_FILL_MIN_ROWS:
            for i in idx:
                m = matchers[i]
                assert m is not None
                m.fill(host, i)
            return PendingMask(k, host, matchers=matchers)
        raw = [matchers[i].raw for i in idx]  # type: ignore[union-attr]
        # One worker, so fills run in order: a ring buffer is never written by two at once.
        fut = self._pool.submit(self._batch.batch_fill_next_token_bitmask, raw, host,
                                idx if len(idx) < len(matchers) else None)
        return PendingMask(k, host, [fut], matchers)

    def advance_and_start(self, accepts: Sequence[tuple[Matcher, int]],
                          matchers: Sequence[Matcher | None], *,
                          queued: bool = False) -> PendingMask | None:
        """Fused path: advance each ``(matcher, token)`` of ``accepts``, then fill the mask of
        ``matchers``, on the fill threads. The tokens were drawn under the grammar's mask, so
        the advance's outcome is known: the matchers' counts and flags are updated here, on
        the caller's thread, and a fill thread only makes its two xgrammar calls (it needs
        the GIL three times a task, and gets it only when the scheduler thread lets go of
        it). A refusal after all (never: it would be a grammar/mask mismatch) marks the
        matcher failed there. None: no row to fill (the advances still run: ``drain`` waits
        for them). ``queued``: earlier grammar work may still be running; this goes behind
        it (a matcher's work always runs on its own thread, in order)."""
        assert self.fused, "advance_and_start is the fused path"
        assert queued or not self._outstanding, "drain() before starting more grammar work"
        for m, t in accepts:
            m._record(t, True)
        idx = [i for i, m in enumerate(matchers) if m is not None and not m.done]
        if not idx and not accepts:
            return None
        k, host = self._host_for(matchers) if idx else (-1, torch.empty(0))
        n = self.threads
        acc: list[list[tuple[Matcher, int]]] = [[] for _ in range(n)]
        rows: list[list[int]] = [[] for _ in range(n)]
        for m, t in accepts:
            acc[m.shard % n].append((m, t))
        for i in idx:
            rows[matchers[i].shard % n].append(i)  # type: ignore[union-attr]
        tasks = [(s, [m for m, _ in acc[s]], [t for _, t in acc[s]],
                  [matchers[i].raw for i in rows[s]], rows[s])  # type: ignore[union-attr]
                 for s in range(n) if acc[s] or rows[s]]
        if len(idx) + len(accepts) < BATCH_FILL_MIN_ROWS and not self._outstanding:
            for task in tasks:
                self._run(*task, host)
            futs: list[Future[None]] = []
        else:
            futs = [self._shards[t[0]].submit(self._run, *t, host) for t in tasks]
        self._outstanding = self._outstanding + futs
        return PendingMask(k, host, futs, matchers) if idx else None

    def advance_on_arrival(self, pairs: Sequence[tuple[Matcher, int]],
                           host_tokens: Callable[[], np.ndarray]) -> None:
        """Fused path: advance each matcher of ``pairs`` by row ``r`` of the step's drawn
        tokens as soon as they are on the host (``host_tokens`` blocks until then), on the
        matcher's fill thread; the caller counts the accepts (``Matcher._record``) once it
        has read the tokens itself. The next mask's fill queues behind it
        (``advance_and_start(..., queued=True)``)."""
        assert self.fused, "advance_on_arrival is the fused path"
        assert not self._outstanding, "drain() before starting more grammar work"
        n = self.threads
        shards: list[list[tuple[Matcher, int]]] = [[] for _ in range(n)]
        for m, r in pairs:
            shards[m.shard % n].append((m, r))
        arrival = _Arrival(host_tokens)
        self._outstanding = [self._shards[k].submit(self._run_arrival, k, work, arrival)
                             for k, work in enumerate(shards) if work]

    def _run_arrival(self, shard: int, work: list[tuple[Matcher, int]],
                     arrival: _Arrival) -> None:
        t0 = time.perf_counter()
        toks = arrival.tokens()[np.fromiter((r for _, r in work), np.int64, len(work))]
        t1, c1 = time.perf_counter(), time.thread_time()
        acc = [m for m, _ in work]
        res = batch_accept([m.raw for m in acc], toks.tolist())
        if res is not None:  # a token outside the mask: the caller's verdict fails it too
            for m, ok in zip(acc, res):
                m.failed = m.failed or not ok
        st = self._stats[shard]
        st.arrival_s += t1 - t0
        st.accept_s += time.perf_counter() - t1
        st.cpu_s += time.thread_time() - c1
        st.tasks += 1
        st.arrivals += 1

    def _run(self, shard: int, acc: list[Matcher], toks: list[int],
             fill: list[xgr.GrammarMatcher], rows: list[int], host: torch.Tensor) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        if acc:
            res = batch_accept([m.raw for m in acc], toks)
            if res is not None:
                for m, ok in zip(acc, res):
                    m.failed = m.failed or not ok
        t1 = time.perf_counter()
        if fill:
            self._serial[shard].batch_fill_next_token_bitmask(fill, host, rows)
        st = self._stats[shard]
        st.accept_s += t1 - t0
        st.fill_s += time.perf_counter() - t1
        st.cpu_s += time.thread_time() - c0
        st.tasks += 1

    @property
    def stats(self) -> FillStats:
        return FillStats(*(sum(getattr(s, f) for s in self._stats)
                           for f in ("accept_s", "fill_s", "cpu_s", "tasks", "arrival_s", "arrivals")))

    def drain(self) -> None:
        """Wait for the grammar work started last (a matcher is read or synced next)."""
        futs, self._outstanding = self._outstanding, []
        for f in futs:
            f.result()

    def finish(self, pending: PendingMask | None) -> torch.Tensor | None:
        """The started mask on the device. On the CPU the host buffer itself: the draw reads
        it before that buffer comes round again (CPU work is eager)."""
        if pending is None:
            return None
        futs = pending.futures
        self._outstanding = [f for f in self._outstanding if f not in futs]
        for f in futs:
            f.result()
        if not self._cuda:
            return pending.host
        # On a side stream: the compute stream is still running the step's forward, and a copy
        # queued behind it would delay the draw by the copy's time (4 MB at B = 256 x 128k).
        compute = torch.cuda.current_stream(self.device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            dev = pending.host.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
        compute.wait_event(ev)
        dev.record_stream(compute)  # allocated on the side stream, read on the compute one
        self._copied[pending.slot] = ev
        return dev

    def close(self) -> None:
        for pool in (self._shards if self.fused else [self._pool]):
            pool.shutdown(wait=False)


@dataclass
class PendingMask:
    """A mask being filled into ring buffer ``slot`` from ``matchers`` (row by row)."""

    slot: int
    host: torch.Tensor
    futures: list[Future[None]] = field(default_factory=list)
    matchers: Sequence[Matcher | None] = ()
    ticket: int = 0  # the grammar process's fill (proc_masks); 0: filled in this process
