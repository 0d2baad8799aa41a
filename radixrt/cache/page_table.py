"""A running sequence's logical -> physical page map.

Token position ``p`` of the sequence lives in physical page ``pages[p // page_size]`` at offset
``p % page_size``; its flat KV-pool slot is ``pages[p // page_size] * page_size + p % page_size``::

    logical pos   0 1 2 3 | 4 5 6 7 | 8 9 . .      (page_size 4, num_tokens 10)
    pages         [  17   |   3     |   42  ]      -> slot(5) = 3*4 + 1 = 13
                                       ^^^ 2 wasted slots (reserved, not yet used)

Holding a page id in ``pages`` (an int32 array) == holding one allocator reference on it. Pages are allocated on
demand as the sequence grows (never reserved up front for the maximum length), so at most the last
page is partly filled.

``pages`` is also the host copy of the sequence's row in the ``DevicePageTable``
(device_pages.py): ``pages[:synced]`` are on the device except the indices in ``stale``::

    pages    [ 17 | 3 | 42 | 8 ]       synced = 3, stale = [1] (page 1 swapped for the tree's)
    device   [ 17 | 5 | 42 | . ]       next step writes entries 1 and 3 only
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from radixrt.cache.allocator import PageAllocator

if TYPE_CHECKING:
    from radixrt.cache.device_pages import DevicePageTable


_NO_PAGES = np.zeros(0, dtype=np.int32)
_NO_PAGES.setflags(write=False)


class SequencePages:
    """Page ids owned (one reference each) by one running sequence, as an int32 array.

    ``pages`` is a view of the first ``num_pages`` entries of a buffer that grows
    geometrically (appending a decode page copies nothing); pages cross to the allocator, the
    tree and the device table as int32 arrays, never as Python ints."""

    def __init__(self, page_size: int) -> None:
        assert page_size >= 1, f"page_size must be >= 1, got {page_size}"
        self.page_size = page_size
        self._buf: npt.NDArray[np.int32] = _NO_PAGES
        self._n = 0
        self.num_tokens = 0  # tokens whose slots are reserved (prefix + computed + pending)
        # Device mirror (see the module docstring): the bound row, 0 = none.
        self.row = 0
        self.synced = 0
        self.stale: list[int] = []
        self._table: DevicePageTable | None = None

    @property
    def pages(self) -> npt.NDArray[np.int32]:
        """The held page ids (a view: valid until the next append or release)."""
        return self._buf[: self._n]

    @pages.setter
    def pages(self, value: Sequence[int] | npt.NDArray[np.integer]) -> None:
        """Set the page list outright (pages given, not allocated: e.g. a one-off batch)."""
        arr = np.array(value, dtype=np.int32).reshape(-1)
        self._buf, self._n = arr, len(arr)

    def _reserve(self, n: int) -> None:
        if n > len(self._buf):
            grown = np.empty(max(n, 2 * len(self._buf), 16), dtype=np.int32)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown

    def append_pages(self, pages: Sequence[int] | npt.NDArray[np.integer]) -> None:
        """Add pages whose references the caller hands over (e.g. a fork's private copy)."""
        k = len(pages)
        self._reserve(self._n + k)
        self._buf[self._n : self._n + k] = pages
        self._n += k

    def bind(self, table: DevicePageTable, row: int) -> None:
        """Called by ``DevicePageTable`` when it gives this sequence a row: nothing mirrored yet."""
        assert self._table is None, f"already bound to row {self.row}"
        self._table, self.row, self.synced, self.stale = table, row, 0, []

    @property
    def num_pages(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        """Token slots covered by the held pages."""
        return self._n * self.page_size

    @property
    def wasted_slots(self) -> int:
        """Allocated slots beyond ``num_tokens`` (< page_size: only the last page is partial)."""
        return self.capacity - self.num_tokens

    def adopt_prefix(self, pages: Sequence[int] | npt.NDArray[np.int32],
                     allocator: PageAllocator) -> None:
        """Start the sequence with a cached prefix (e.g. ``MatchResult.pages``): one new
        reference per page, ``num_tokens`` = the prefix's tokens. The pages are copied (the
        caller's array may be another sequence's view)."""
        assert self._n == 0, f"adopt_prefix on a sequence that already holds {self._n} pages"
        allocator.incref(pages)
        k = len(pages)
        self._reserve(k + 1)  # + 1: the page the next token usually needs
        self._buf[:k] = pages
        self._n = k
        self.num_tokens = k * self.page_size
        self.synced, self.stale = 0, []

    def ensure_capacity(self, total_tokens: int, allocator: PageAllocator) -> bool:
        """Reserve slots for ``total_tokens`` tokens, allocating only the missing pages.

        Returns False (allocating nothing, state unchanged) if the allocator is short.
        """
        assert total_tokens >= 0, f"negative token count {total_tokens}"
        needed = -(-total_tokens // self.page_size) - self._n
        if needed > 0:
            fresh = allocator.alloc_array(needed)
            if fresh is None:
                return False
            self.append_pages(fresh)
        self.num_tokens = max(self.num_tokens, total_tokens)
        return True

    def slot(self, pos: int) -> int:
        assert 0 <= pos < self.capacity, f"position {pos} outside reserved {self.capacity} slots"
        return int(self._buf[pos // self.page_size]) * self.page_size + pos % self.page_size

    def slot_array(self, start: int, end: int) -> npt.NDArray[np.int64]:
        """Flat pool slots of positions ``start..end-1`` as an int64 array."""
        assert 0 <= start <= end <= self.capacity, (
            f"slots [{start}, {end}) outside reserved {self.capacity} slots"
        )
        pos = np.arange(start, end, dtype=np.int64)
        return self._buf[pos // self.page_size].astype(np.int64) * self.page_size + pos % self.page_size  # type: ignore[no-any-return]

    def slots(self, start: int, end: int) -> list[int]:
        return self.slot_array(start, end).tolist()  # type: ignore[no-any-return]

    def replace_prefix_pages(self, new_pages: Sequence[int] | npt.NDArray[np.int32],
                             allocator: PageAllocator) -> int:
        """Swap the first ``len(new_pages)`` pages for ``new_pages`` (the tree's copies of the
        same tokens, after an insert). Returns how many of the old pages became free.

        New pages are increfed before old ones are decrefed, so a page present in both lists
        never transiently drops to 0.
        """
        k = len(new_pages)
        assert k <= self._n, f"replacing {k} pages of a sequence holding {self._n}"
        new = np.asarray(new_pages, dtype=np.int32)
        idx = np.flatnonzero(self._buf[:k] != new)
        if idx.size == 0:
            return 0
        allocator.incref(new[idx])
        freed = allocator.decref(self._buf[idx])  # a fancy index: a copy, taken before the write
        self._buf[idx] = new[idx]
        # Entries the device already has must be rewritten; those past the watermark will be.
        self.stale.extend(idx[idx < self.synced].tolist())
        return freed

    def release(self, allocator: PageAllocator) -> int:
        """Drop every page reference and the device row; returns how many pages became free."""
        freed = allocator.decref(self._buf[: self._n])
        self._buf, self._n = _NO_PAGES, 0
        self.num_tokens = 0
        if self._table is not None:
            self._table.release(self.row)
        self._table, self.row, self.synced, self.stale = None, 0, 0, []
        return freed

    def __repr__(self) -> str:
        return (f"SequencePages(num_tokens={self.num_tokens}, row={self.row}, "
                f"pages={self.pages.tolist()})")
