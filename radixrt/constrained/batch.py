"""The step's token bitmask: filled on the CPU from each constrained row's matcher, copied to
the device without a sync, applied there in one pass (``kernels/token_bitmask``).

Rows without a grammar keep all-ones words. Many constrained rows are filled in parallel by
xgrammar's batch matcher (its own threads, outside the GIL). Host buffers are pinned and used
round-robin: by the time a buffer comes round again, the step that read it has been resolved.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

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
        self._pinned = self.device.type == "cuda"
        self._ring: list[torch.Tensor] = []
        self._next = 0
        self._batch = xgr.BatchGrammarMatcher(max_threads=threads or default_threads())

    def _host(self, rows: int) -> torch.Tensor:
        if len(self._ring) < _RING or self._ring[self._next].shape[0] < rows:
            buf = torch.empty((max(rows, 64), self.words), dtype=torch.int32,
                              pin_memory=self._pinned)
            if len(self._ring) < _RING:
                self._ring.append(buf)
            else:
                self._ring[self._next] = buf
        buf = self._ring[self._next]
        self._next = (self._next + 1) % _RING
        return buf[:rows]

    def fill(self, matchers: Sequence[Matcher | None]) -> torch.Tensor | None:
        """[B, W] int32 bitmask on the device, or None when no row is constrained."""
        idx = [i for i, m in enumerate(matchers) if m is not None]
        if not idx:
            return None
        host = self._host(len(matchers))
        host.fill_(-1)
        if len(idx) >= BATCH_FILL_MIN_ROWS:
            raw = [m.raw for m in matchers if m is not None]
            self._batch.batch_fill_next_token_bitmask(raw, host, indices=idx)
        else:
            for i in idx:
                m = matchers[i]
                assert m is not None
                m.fill(host, i)
        if self.device.type == "cpu":
            return host.clone()  # the ring buffer is reused two steps later
        return host.to(self.device, non_blocking=True)
