"""The device-resident page table: one row per running sequence, written incrementally.

    table [num_rows + 1, max_pages] int32, on the pool's device
      row 0       all zeros, never bound: the scratch row (page 0); CUDA-graph padding reads it
      row r >= 1  page ids of the sequence bound to row r; entries past its last page are
                  stale leftovers of earlier owners that no kernel reads (they stop at seq_len)
    req_rows [B] int32, per step: the row of request i     -> page of position p of request i
                                                              = table[req_rows[i], p // page_size]

Each sequence's ``SequencePages`` is the host copy of its row and remembers how much of it the
device already has: ``pages[:synced]`` are mirrored except the indices in ``stale`` (prefix pages
swapped for the tree's copies). A step ``stage``s only what changed since the previous step
(normally nothing, or the one page a decoding sequence just crossed into) and ``flush`` writes
the staged entries with ONE host->device copy and ONE ``index_copy_`` on the current stream, so
host work per decode step is O(batch), not O(context).

Ordering: every write goes on the stream the forward passes run on, after any step already
queued, so an in-flight step (overlap launches N+1 before N finishes) still reads the values it
was built with, exactly as if it had its own copy. The staging buffer is a fresh pinned tensor
per flush (the caching host allocator keeps it until its copy has run), never a reused one.

Rows are bound lazily, when a sequence first enters a batch, and returned when its pages are
released (``SequencePages.release``: finish, abort, retraction); a retracted sequence resumes in
whatever row is free then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from radixrt.cache.page_table import SequencePages


def rows_needed(max_running_requests: int) -> int:
    """Rows for a scheduler running at most ``max_running_requests`` sequences.

    The scheduler counts n > 1 forks against the cap when it admits their parent, and a
    sequence gives its row back in the same call that removes it from the running set, so the
    cap suffices; the slack absorbs sequences that are done but not yet released (overlap)."""
    assert max_running_requests >= 1, f"max_running_requests must be >= 1, got {max_running_requests}"
    return max_running_requests + 16 + max_running_requests // 8


class DevicePageTable:
    """Owns the device page table and which row each sequence holds."""

    def __init__(
        self, *, num_rows: int, max_pages: int, page_size: int, device: torch.device | str
    ) -> None:
        assert num_rows >= 1 and max_pages >= 1, f"bad device page table {num_rows=} {max_pages=}"
        self.num_rows = num_rows
        self.max_pages = max_pages
        self.page_size = page_size
        self.device = torch.device(device)
        self.table = torch.zeros(num_rows + 1, max_pages, dtype=torch.int32, device=self.device)
        self._flat = self.table.view(-1)
        # A stack: the most recently released row is reused first (its row is likely cached).
        self._free: list[int] = list(range(1, num_rows + 1))
        self._bound: set[int] = set()
        self._idx: list[int] = []  # flat table index of each staged entry
        self._val: list[int] = []  # its page id
        self.entries_written = 0  # table entries written to the device so far (tests, benches)
        self.flushes = 0  # host->device writes issued so far

    @property
    def num_free(self) -> int:
        return len(self._free)

    def stage(self, pages: SequencePages) -> int:
        """Bind ``pages`` to a row if it has none and queue its changed entries; returns the
        row. Nothing reaches the device before ``flush``."""
        row = pages.row
        if row == 0:
            row = self._bind(pages)
        if pages.synced < pages.num_pages or pages.stale:
            self._stage_changes(pages, row)
        return row

    def _bind(self, pages: SequencePages) -> int:
        assert self._free, (
            f"all {self.num_rows} rows are bound: more sequences hold pages than the "
            "scheduler's max_running_requests allows"
        )
        row = self._free.pop()
        self._bound.add(row)
        pages.bind(self, row)
        return row

    def _stage_changes(self, pages: SequencePages, row: int) -> None:
        table, n = pages.pages, pages.num_pages
        assert n <= self.max_pages, (
            f"a sequence holds {n} pages > the device page table's {self.max_pages} columns"
        )
        base = row * self.max_pages
        for j in pages.stale:
            if j < pages.synced:  # entries at or past the watermark are written below anyway
                self._idx.append(base + j)
                self._val.append(int(table[j]))
        pages.stale = []
        start = min(pages.synced, n)
        self._idx.extend(range(base + start, base + n))
        self._val.extend(table[start:n].tolist())
        pages.synced = n

    def release(self, row: int) -> None:
        """Return a row (called by ``SequencePages.release``). It keeps stale page ids
        until the next owner overwrites them; no kernel reads past a sequence's length."""
        assert row in self._bound, f"row {row} released but not bound"
        self._bound.remove(row)
        self._free.append(row)
        if self._idx:  # staged but never flushed (a step that raised): the next owner's now
            lo, hi = row * self.max_pages, (row + 1) * self.max_pages
            keep = [k for k, i in enumerate(self._idx) if not lo <= i < hi]
            self._idx = [self._idx[k] for k in keep]
            self._val = [self._val[k] for k in keep]

    def flush(self) -> int:
        """Write every staged entry to the device table; returns how many were written."""
        count = len(self._idx)
        if count == 0:
            return 0
        staged = np.empty((2, count), dtype=np.int64)
        staged[0] = self._idx
        staged[1] = self._val
        self._idx, self._val = [], []
        host = torch.from_numpy(staged)
        if self.device.type == "cuda":
            buf = host.pin_memory().to(self.device, non_blocking=True)
        else:
            buf = host
        self._flat.index_copy_(0, buf[0], buf[1].to(torch.int32))
        self.entries_written += count
        self.flushes += 1
        return count

    def read_row(self, row: int) -> list[int]:
        """Device row ``row`` as a host list (tests and debugging: syncs the device)."""
        return self.table[row].tolist()  # type: ignore[no-any-return]
