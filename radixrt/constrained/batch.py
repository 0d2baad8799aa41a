"""The step's token bitmask: filled on the CPU from each constrained row's matcher, copied to
the device without a sync, applied there in one pass (``kernels/token_bitmask``).

Rows without a grammar keep all-ones words. Many constrained rows are filled in parallel by
xgrammar's batch matcher (its own threads, outside the GIL). Host buffers are pinned, allocated
once and used round-robin; an event after each buffer's non-blocking copy guards its reuse.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import xgrammar as xgr

from radixrt.constrained.matcher import Matcher

# Below this many constrained rows a plain loop beats the batch matcher's thread hand-off.
BATCH_FILL_MIN_ROWS = 8
_RING = 2


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def default_threads() -> int:
    """Threads for filling a batch's masks: half the cores (the scheduler's own thread and the
    tokenizer pools need the rest), at most 8 (xgrammar's fill stops scaling past that)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class MaskBuilder:
    def __init__(self, vocab_size: int, device: torch.device | str,
                 threads: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._ring: list[torch.Tensor] = []
        # Per ring buffer, the event after its host-to-device copy: a buffer is refilled only
        # once the copy that read it has run (it almost always has: a step lies between).
        self._copied: list[torch.cuda.Event | None] = []
        self._next = 0
        self._batch = xgr.BatchGrammarMatcher(max_threads=threads or default_threads())
        # Started once; it only waits on xgrammar's fill (which runs outside the GIL).
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

    def start(self, matchers: Sequence[Matcher | None]) -> PendingMask | None:
        """Begin filling the mask on the fill thread (xgrammar releases the GIL there), so the
        caller's Python work runs meanwhile; ``finish`` waits for it. None: no constrained row.
        The matchers must not advance until then."""
        idx = [i for i, m in enumerate(matchers) if m is not None]
        if not idx:
            return None
        k, host = self._host(len(matchers))
        if len(idx) < len(matchers):
            # Only rows without a grammar need all-ones words: the fill writes every other
            # row whole (a full memset was the biggest host cost at 256 x 128k).
            free = [i for i, m in enumerate(matchers) if m is None]
            host[torch.tensor(free)] = -1
        if len(idx) < BATCH_FILL_MIN_ROWS:
            for i in idx:
                m = matchers[i]
                assert m is not None
                m.fill(host, i)
            return PendingMask(k, host, None)
        raw = [m.raw for m in matchers if m is not None]
        # One worker, so fills run in order: a ring buffer is never written by two at once.
        fut = self._pool.submit(self._batch.batch_fill_next_token_bitmask, raw, host,
                                idx if len(idx) < len(matchers) else None)
        return PendingMask(k, host, fut)

    def finish(self, pending: PendingMask | None) -> torch.Tensor | None:
        """The started mask on the device. On the CPU the host buffer itself: the draw reads
        it before that buffer comes round again (CPU work is eager)."""
        if pending is None:
            return None
        if pending.future is not None:
            pending.future.result()
        if not self._cuda:
            return pending.host
        dev = pending.host.to(self.device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._copied[pending.slot] = ev
        return dev


@dataclass
class PendingMask:
    """A mask being filled into ring buffer ``slot``."""

    slot: int
    host: torch.Tensor
    future: Future[None] | None
