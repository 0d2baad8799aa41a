"""The step's token bitmask from a grammar process (``grammar_proc``): the engine's side.

``RADIXRT_GRAMMAR_PROCESS`` (auto, the default: off, measured slower on the H200; 1; 0) puts the per-step grammar
work -- advancing every constrained sequence's matcher by the step's token and filling the next
step's bitmask -- in a process of its own. In-process fill threads (``batch.MaskBuilder``)
share the scheduler thread's GIL: their Python between xgrammar calls stretched its wall time
by 4-5 ms a step on the H200 (bench/RESULTS.md). Here the scheduler thread only counts the
tokens (its matchers are ``lazy``: no xgrammar call on the hot path) and queues ops; a relay
thread waits for a step's drawn tokens to land (outside the GIL) and forwards them, so the
process advances and fills while the next step is planned. The mask rows land in a
shared-memory ring (memfds, page-locked on CUDA so the side-stream copy stays asynchronous).

The scheduler's matchers stay the truth: every op says where a mirror must stand, and when the
process is not there (starting up, died, an error, no answer within ``REPLY_TIMEOUT_S``) the
masks come from the in-process path (``MaskBuilder``, unfused: the lazy matchers catch up in
one batch accept) and serving goes on. ``RADIXRT_GRAMMAR_THREADS``: the process's fill threads
(default ``default_process_threads``).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import time
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch
import xgrammar as xgr

from radixrt.constrained import grammar_proc as gp
from radixrt.constrained.batch import (
    _RING,
    FillStats,
    MaskBuilder,
    PendingMask,
    _env_threads,
    bitmask_words,
)
from radixrt.constrained.matcher import Matcher, flush
from radixrt.constrained.proc_channel import Channel, Resources, Shared

logger = logging.getLogger(__name__)

# A fill takes a few ms; an answer this late means the process is stuck: serve without it.
REPLY_TIMEOUT_S = 10.0
START_TIMEOUT_S = 120.0  # importing xgrammar + torch in the process (seconds on a busy box)
NICE_ENV = "RADIXRT_GRAMMAR_PROCESS_NICE"
# A lower priority keeps a step's hand-off from preempting the scheduler thread (the eventfd
# wake-up, grammar_proc.main, already does) but, on a busy host, delays the process itself:
# a measurement knob, off by default.
DEFAULT_NICE = 0


def _env_nice() -> int:
    """RADIXRT_GRAMMAR_PROCESS_NICE: the process's niceness, 0..19 (default 0: as ours)."""
    raw = os.environ.get(NICE_ENV, "").strip()
    if not raw:
        return DEFAULT_NICE
    if not raw.isdigit() or int(raw) > 19:
        raise ValueError(f"{NICE_ENV} must be an integer in 0..19, got {raw!r}")
    return int(raw)


def default_process_threads() -> int:
    """xgrammar's fill threads in the process: half the cores, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))




def _gone(freed: collections.deque[int], mid: int, _ref: object) -> None:
    freed.append(mid)  # any thread (the GC's): a deque append is atomic


class ProcessMasks:
    """``MaskBuilder``'s interface (the fused one: the engine advances through it), served
    by the grammar process. Matchers made for it must be ``lazy``."""

    fused = True
    lazy = True

    def __init__(self, vocab_size: int, device: torch.device | str, info: xgr.TokenizerInfo,
                 threads: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        self.device = torch.device(device)
        self.threads = threads or _env_threads() or default_process_threads()
        self._cuda = self.device.type == "cuda"
        # Until the process is up, and for good if it fails: the in-process path.
        self.inner = MaskBuilder(vocab_size, device, self.threads, fused=False)
        self._res = Resources()
        self._finalizer = weakref.finalize(self, self._res.close)
        self._res.chan = Channel(info.serialize_json(), self.words, self.threads,
                                 REPLY_TIMEOUT_S, _env_nice(), START_TIMEOUT_S)
        self.failure: str | None = None  # why the process was given up
        self._ring: list[Shared | None] = [None] * _RING
        self._copied: list[torch.cuda.Event | None] = [None] * _RING
        self._slot_ticket = [0] * _RING  # the last fill written into each slot
        self._next = 0
        self._ticket = 0
        self._copy_stream: torch.cuda.Stream | None = None
        self._sent: dict[int, int] = {}  # matcher id -> tokens its mirror has
        self._gid_of: dict[int, int] = {}  # matcher id -> its grammar's id
        self._grammars: dict[int, tuple[xgr.CompiledGrammar, int, int]] = {}  # id(cg) -> (cg, gid, users)
        self._refs: dict[int, weakref.ref[Matcher]] = {}
        self._freed: collections.deque[int] = collections.deque()  # from weakref callbacks
        self._ops: list[gp.Op] = []
        self._fds: list[int] = []
        self._fills = self._arrivals = 0
        self.ahead_fills = 0  # masks started before the tokens ahead were counted
        self._next_gid = 0

    @property
    def live(self) -> bool:
        """Whether fills go to the process now (up, and not given up)."""
        chan = self._res.chan
        if chan is None or self.failure is not None:
            return False
        if chan.broken is not None:
            self._give_up(chan.broken)
            return False
        return chan.poll_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> bool:
        """Block until the process is up (tests, benchmarks); False if it failed."""
        deadline = time.monotonic() + timeout
        while not self.live and self.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.live

    @property
    def pid(self) -> int:
        chan = self._res.chan
        assert chan is not None, "no grammar process"
        return chan.proc.pid

    def _give_up(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
            logger.warning("grammar process given up, masks are filled in-process from now "
                           "on: %s", why)
            self._res.kill()  # waits for it: nothing writes the shared buffers after this

    # -- ops ----------------------------------------------------------------------------

    def _gid(self, m: Matcher) -> int:
        key = id(m.compiled)
        got = self._grammars.get(key)
        if got is None:
            self._next_gid += 1
            gid = self._next_gid
            self._ops.append(gp.Grammar(gid, m.compiled.serialize_json()))
            got = (m.compiled, gid, 0)
        self._grammars[key] = (got[0], got[1], got[2] + 1)
        self._gid_of[m.id] = got[1]
        self._refs[m.id] = weakref.ref(m, functools.partial(_gone, self._freed, m.id))
        return got[1]

    def _collect(self) -> None:
        """Free the mirrors (and grammars) of matchers that are gone."""
        ids: list[int] = []
        gids: list[int] = []
        while self._freed:
            i = self._freed.popleft()
            self._sent.pop(i, None)
            self._refs.pop(i, None)
            gid = self._gid_of.pop(i, None)
            ids.append(i)
            for key, (cg, g, users) in list(self._grammars.items()):
                if g == gid and users <= 1:  # nobody uses it any more
                    del self._grammars[key]
                    gids.append(g)
                elif g == gid:
                    self._grammars[key] = (cg, g, users - 1)
        if ids:
            self._ops.append(gp.Free(ids, gids))

    def _sync(self, ms: Sequence[Matcher]) -> None:
        """Queue what brings each matcher's mirror to its ``history``."""
        ids: list[int] = []
        gids: list[int] = []
        pos: list[int] = []
        counts: list[int] = []
        toks: list[int] = []
        sent = self._sent
        for m in ms:
            n = len(m.history)
            s = sent.get(m.id)
            if s == n and m.low >= n:  # in step (the hot path)
                continue
            if s is None:  # new to the process: made there and replayed from the start
                gid, p = self._gid(m), 0
            else:
                gid, p = 0, min(m.low, s, n)
            ids.append(m.id)
            gids.append(gid)
            pos.append(p)
            counts.append(n - p)
            toks.extend(m.history[p:])
            sent[m.id] = m.low = n
        if ids:
            self._ops.append(gp.Sync(ids, gids, pos, counts, toks))

    def _push(self, job: Callable[[], gp.Op] | None = None) -> None:
        chan = self._res.chan
        assert chan is not None, "pushed without a process"
        self._collect()
        ops, fds, self._ops, self._fds = self._ops, self._fds, [], []
        chan.push(ops, job, fds)

    # -- MaskBuilder's interface ----------------------------------------------------------

    def start(self, matchers: Sequence[Matcher | None]) -> PendingMask | None:
        return self.advance_and_start((), matchers)

    def fill(self, matchers: Sequence[Matcher | None]) -> torch.Tensor | None:
        return self.finish(self.start(matchers))

    def advance_and_start(self, accepts: Sequence[tuple[Matcher, int]],
                          matchers: Sequence[Matcher | None], *,
                          queued: bool = False) -> PendingMask | None:
        """Count ``accepts`` (the tokens were drawn under the mask) and start the mask of
        ``matchers``; the process catches up on the accepts first. None: no row to fill."""
        for a, t in accepts:
            a._record(t, True)
        idx: list[int] = []
        rows: list[Matcher] = []
        free: list[int] = []
        for i, m in enumerate(matchers):  # one pass: this runs on the scheduler thread
            if m is None or m.done:
                free.append(i)
            else:
                idx.append(i)
                rows.append(m)
        if not idx:
            return None
        if not self.live:
            flush(rows)  # one batch accept for the lot
            return self.inner.start(matchers)
        k, host = self._slot(len(matchers))
        if free:
            host[torch.tensor(free)] = -1
        self._sync(rows)
        self._ticket += 1
        self._slot_ticket[k] = self._ticket
        self._ops.append(gp.Fill(self._ticket, k, [m.id for m in rows], idx))
        self._push()
        return PendingMask(k, host, [], matchers, ticket=self._ticket)

    def start_ahead(self, matchers: Sequence[Matcher | None],
                    ahead: Sequence[bool]) -> tuple[bool, PendingMask | None]:
        """The next mask, started before this step's tokens are counted: ``ahead[i]``:
        matchers[i]'s token is on its way to the process (``advance_on_arrival``), which
        fills from its copy once it has it (a row it ended allows everything: that row's
        next token is dropped). (False, None) if that cannot be done here (not live, or a
        token was not relayed): the caller starts the mask after counting, as usual."""
        if not self.live:
            return False, None
        sent = self._sent
        idx: list[int] = []
        rows: list[Matcher] = []
        cold: list[Matcher] = []
        free: list[int] = []
        for i, (m, a) in enumerate(zip(matchers, ahead)):
            if m is None or m.done:
                free.append(i)
                continue
            if a and sent.get(m.id) != len(m.history) + 1:
                return False, None
            idx.append(i)
            rows.append(m)
            if not a:
                cold.append(m)
        if not idx:
            return True, None
        k, host = self._slot(len(matchers))
        if free:
            host[torch.tensor(free)] = -1
        self._sync(cold)
        self.ahead_fills += 1
        self._ticket += 1
        self._slot_ticket[k] = self._ticket
        self._ops.append(gp.Fill(self._ticket, k, [m.id for m in rows], idx))
        self._push()
        return True, PendingMask(k, host, [], matchers, ticket=self._ticket)

    def advance_on_arrival(self, pairs: Sequence[tuple[Matcher, int]],
                           host_tokens: Callable[[], np.ndarray]) -> None:
        """Each matcher of ``pairs`` advances by row ``r`` of the step's drawn tokens in the
        process as soon as they land (the relay thread waits for them); the caller counts
        them (``Matcher._record``) once it has read them itself."""
        if not pairs or not self.live:
            return  # in-process: the counted tokens catch up at the next fill
        ms = [m for m, _ in pairs]
        self._sync(ms)  # in step before the token
        pos: list[int] = []
        ids: list[int] = []
        sent = self._sent
        for m in ms:  # where each will stand once the caller has counted the token
            n = len(m.history)
            pos.append(n)
            ids.append(m.id)
            sent[m.id] = m.low = n + 1
        rows = np.fromiter((r for _, r in pairs), np.int64, len(pairs))
        chan = self._res.chan
        assert chan is not None
        self._arrivals += 1

        def job() -> gp.Op:
            t0 = time.perf_counter()
            toks = host_tokens()[rows].tolist()
            chan.arrival_s += time.perf_counter() - t0
            return gp.Sync(ids, [0] * len(ids), pos, [1] * len(ids), toks)

        self._push(job)

    def drain(self) -> None:
        """Nothing to wait for: the process works on its own copies (the in-process path's
        fills are waited for by ``finish``)."""
        self.inner.drain()

    def finish(self, pending: PendingMask | None) -> torch.Tensor | None:
        """The started mask on the device (the host buffer on the CPU)."""
        if pending is None:
            return None
        if pending.ticket <= 0:
            return self.inner.finish(pending)
        chan = self._res.chan
        answered = chan is not None and self.failure is None and \
            chan.wait(pending.ticket, REPLY_TIMEOUT_S)
        if not answered:
            self._give_up(chan.broken if chan is not None and chan.broken else "closed")
            self._fill_here(pending)
        self._fills += 1
        if not self._cuda:
            return pending.host
        compute = torch.cuda.current_stream(self.device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._copy_stream):  # as MaskBuilder.finish: beside the forward
            dev = pending.host.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
        compute.wait_event(ev)
        dev.record_stream(compute)
        self._copied[pending.slot] = ev
        return dev

    def _fill_here(self, pending: PendingMask) -> None:
        rows = [(i, m) for i, m in enumerate(pending.matchers) if m is not None and not m.done]
        flush([m for _, m in rows])
        rows = [(i, m) for i, m in rows if not m.done]
        pending.host.fill_(-1)  # every row: the process may have written any of them
        if rows:
            self.inner._batch.batch_fill_next_token_bitmask(
                [m._m for _, m in rows], pending.host, [i for i, _ in rows])

    def _slot(self, rows: int) -> tuple[int, torch.Tensor]:
        """A ring buffer of at least ``rows`` rows that nothing reads or writes any more."""
        k = self._next
        self._next = (k + 1) % _RING
        ev = self._copied[k]
        if ev is not None:
            ev.synchronize()
            self._copied[k] = None
        chan = self._res.chan
        if chan is not None and chan.acked < self._slot_ticket[k]:
            chan.wait(self._slot_ticket[k], REPLY_TIMEOUT_S)  # a fill nobody finished
        buf = self._ring[k]
        if buf is None or buf.rows < rows:
            buf = Shared(max(rows, 256, 2 * (buf.rows if buf else 0)), self.words, self._cuda)
            self._ring[k] = buf
            self._res.shared.append(buf)  # the old one stays mapped until close
            self._ops.append(gp.Buffer(k, buf.rows))
            self._fds.append(buf.fd)
        return k, buf.host[:rows]

    @property
    def stats(self) -> FillStats:
        """The process's time (accepts, fills, its CPU) and the relay's wait for tokens."""
        chan = self._res.chan
        last = chan.last if chan is not None else None
        return FillStats(last.accept_s if last else 0.0, last.fill_s if last else 0.0,
                         last.cpu_s if last else 0.0, self._fills,
                         chan.arrival_s if chan is not None else 0.0, self._arrivals)

    def close(self) -> None:
        self._finalizer()
        self.inner.close()
