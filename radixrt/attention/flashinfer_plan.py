"""Host side of the FlashInfer backend: a step's requests (and shared-prefix groups) as
FlashInfer's CSR page lists, computed from host lengths so planning never waits on the device.

A *level* is a list of entries, each reading a run of whole pages from one page-table row::

    entry e reads  page_table[rows[e], first_page[e] : first_page[e] + num_pages[e]]
    kv_indptr      [0, n0, n0 + n1, ...]        (pages of each entry, back to back)
    last_page_len  tokens in each entry's last page (1 .. page_size)

Per-request decode is one level (first_page 0, every request's whole KV). Cascade decode has two,
over the batch permuted so each group's members sit together (FlashInfer's shared-prefix pass
takes a group's queries as one contiguous ragged row block)::

    groups  {A: 2048 tok, members 5, 1}  {B: 512 tok, members 0, 3}    ungrouped: 2, 4
    order   [5, 1, 0, 3, 2, 4]           (permuted position -> batch index)
    shared  qo_indptr [0, 2, 4]          entries A, B: pages [0, 128) / [0, 32) of a member's row
    own     6 entries in permuted order: members from their group's end page, the rest whole

A shared length that is not a whole number of pages is cut down to one (the own level must start
on a page boundary); a group left with no whole page is dissolved. Only the page ids themselves
are gathered on the device (``gather_pages``), from the page table the step already reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

if TYPE_CHECKING:
    from radixrt.engine.cascade_groups import CascadeGroups

I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class PagedLevel:
    rows: I64  # [N] page-table row of each entry
    first_page: I64  # [N] first page (index into the row) each entry reads
    kv_indptr: I64  # [N + 1] cumulative pages
    last_page_len: I64  # [N] tokens in each entry's last page

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])

    @property
    def total_pages(self) -> int:
        return int(self.kv_indptr[-1])

    def token_ranges(self, page_size: int) -> list[tuple[int, int, int]]:
        """(row, first token, end token) of each entry (tests compare these with other plans)."""
        pages = np.diff(self.kv_indptr)
        start = self.first_page * page_size
        end = start + (pages - 1) * page_size + self.last_page_len
        return [(int(r), int(s), int(e)) for r, s, e in zip(self.rows, start, end)]


def _level(rows: I64, first_page: I64, num_tokens: I64, page_size: int) -> PagedLevel:
    assert bool((num_tokens >= 1).all()), "every entry reads at least one token"
    pages = -(-num_tokens // page_size)
    indptr = np.zeros(pages.shape[0] + 1, dtype=np.int64)
    np.cumsum(pages, out=indptr[1:])
    return PagedLevel(rows=rows, first_page=first_page, kv_indptr=indptr,
                      last_page_len=num_tokens - (pages - 1) * page_size)


def decode_level(seq_lens: I64, rows: I64, page_size: int) -> PagedLevel:
    """Every request's whole KV (``seq_lens`` tokens) from its page-table row."""
    return _level(rows.astype(np.int64), np.zeros_like(seq_lens, dtype=np.int64),
                  seq_lens.astype(np.int64), page_size)


@dataclass(frozen=True)
class CascadeLayout:
    order: I64  # [B] batch index at each permuted position: grouped members first
    num_grouped: int  # M: permuted positions [0, M) belong to groups
    num_groups: int  # G: shared entries [0, G) are groups (any after them: graph padding)
    qo_indptr: I64  # [E + 1] entry e's queries are permuted positions qo_indptr[e] : [e + 1]
    shared: PagedLevel  # [E] each group's shared pages
    own: PagedLevel  # [B] in permuted order: each request's own suffix (whole KV if ungrouped)


def cascade_layout(groups: CascadeGroups, seq_lens: I64, rows: I64,
                   page_size: int) -> CascadeLayout | None:
    """The two levels for one decode step (see the module docstring); None when no group keeps
    a whole shared page."""
    seq_lens = seq_lens.astype(np.int64)
    rows = rows.astype(np.int64)
    shared_pages = groups.shared_lens // page_size
    sizes = np.diff(groups.indptr)
    kept = shared_pages >= 1
    if not bool(kept.any()):
        return None
    member_group = np.repeat(np.arange(sizes.shape[0]), sizes)
    members = groups.members[kept[member_group]]
    sizes, shared_pages, group_rows = sizes[kept], shared_pages[kept], groups.rows[kept]
    ungrouped = np.ones(seq_lens.shape[0], dtype=bool)
    ungrouped[members] = False
    order = np.concatenate([members, np.flatnonzero(ungrouped)]).astype(np.int64)
    # Each member's own suffix starts where its group's shared pages end.
    first = np.zeros(seq_lens.shape[0], dtype=np.int64)
    first[: members.shape[0]] = np.repeat(shared_pages, sizes)
    own_tokens = seq_lens[order] - first * page_size
    assert bool((own_tokens >= 1).all()), "a shared prefix reaches a member's newest token"
    qo_indptr = np.zeros(sizes.shape[0] + 1, dtype=np.int64)
    np.cumsum(sizes, out=qo_indptr[1:])
    return CascadeLayout(
        order=order, num_grouped=int(members.shape[0]), num_groups=int(sizes.shape[0]),
        qo_indptr=qo_indptr,
        shared=_level(group_rows.astype(np.int64), np.zeros_like(shared_pages),
                      shared_pages * page_size, page_size),
        own=_level(rows[order], first, own_tokens, page_size),
    )


def padded_cascade_layout(groups: CascadeGroups | None, seq_lens: I64, rows: I64,
                          page_size: int, num_entries: int) -> CascadeLayout:
    """``cascade_layout`` with exactly ``num_entries`` shared entries whose queries cover the
    whole batch, for a CUDA graph (FlashInfer's graph mode fixes the entry count and the row
    total): after the groups, entries of no query over one token of the scratch page 0, and
    the last of them takes the ungrouped rows, whose shared result the merge then masks out::

        groups A (2 rows), B (2 rows), 2 ungrouped, 5 entries
        qo_indptr  [0, 2, 4, 4, 4, 6]     entries C, D, E read page 0; E's rows 4, 5 masked
    """
    layout = None if groups is None else cascade_layout(groups, seq_lens, rows, page_size)
    if layout is None:
        n = seq_lens.shape[0]
        layout = CascadeLayout(order=np.arange(n, dtype=np.int64), num_grouped=0, num_groups=0,
                               qo_indptr=np.zeros(1, dtype=np.int64),
                               shared=_level(*(np.zeros(0, dtype=np.int64),) * 3, page_size),
                               own=decode_level(seq_lens, rows, page_size))
    pad = num_entries - layout.num_groups
    assert pad >= 1, f"{layout.num_groups} groups leave no padding entry of {num_entries}"
    tokens = np.concatenate([np.diff(layout.shared.kv_indptr) * page_size,
                             np.ones(pad, dtype=np.int64)])
    zeros = np.zeros(num_entries, dtype=np.int64)
    entry_rows = np.concatenate([layout.shared.rows, zeros[:pad]])
    qo = np.concatenate([layout.qo_indptr, np.full(pad, layout.num_grouped, dtype=np.int64)])
    qo[-1] = layout.order.shape[0]
    return dataclasses.replace(layout, qo_indptr=qo,
                               shared=_level(entry_rows, zeros, tokens, page_size))


def gather_pages(page_table: torch.Tensor,  # [R, max_pages] int32 (device)
                 rows: torch.Tensor,  # [N] int (device)
                 first_page: torch.Tensor,  # [N] int (device)
                 kv_indptr: torch.Tensor,  # [N + 1] int (device)
                 total_pages: int,  # kv_indptr[-1], known on the host
                 ) -> torch.Tensor:
    """The level's page ids, entry after entry: [total_pages] int32. No host sync:
    ``total_pages`` sizes the work."""
    dev = page_table.device
    indptr = kv_indptr.long()
    counts = indptr[1:] - indptr[:-1]
    # output_size keeps repeat_interleave from reading the counts back to the host.
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), counts,
                                    output_size=total_pages)
    col = first_page.long()[owner] + torch.arange(total_pages, device=dev) - indptr[owner]
    flat = rows.long()[owner] * page_table.shape[1] + col
    return page_table.reshape(-1).index_select(0, flat)


class PinnedRing:
    """Host staging for plan inputs: FlashInfer copies them to the device asynchronously (and its
    own pinned plan buffer too), so a slot is refilled only after the event recorded behind its
    last use has passed; with overlapped scheduling that copy may still be queued behind the
    running step when the next step is planned. On a CPU device: plain memory, no events."""

    def __init__(self, num_ints: int, device: torch.device, slots: int = 4) -> None:
        self.on_cuda = device.type == "cuda"
        self._bufs = [torch.zeros(num_ints, dtype=torch.int32, pin_memory=self.on_cuda)
                      for _ in range(slots if self.on_cuda else 1)]
        self._events: list[torch.cuda.Event | None] = [None] * len(self._bufs)
        self._turn = 0
        self._fill = 0

    @property
    def capacity(self) -> int:
        return int(self._bufs[0].numel())

    def begin(self) -> None:
        """Start filling the next slot (waits only if its previous copies have not run yet)."""
        self._turn = (self._turn + 1) % len(self._bufs)
        event = self._events[self._turn]
        if event is not None:
            event.synchronize()
        self._fill = 0

    def put(self, values: npt.ArrayLike) -> torch.Tensor:
        """An int32 host tensor (a view of the current slot) holding ``values``."""
        arr = np.asarray(values)
        n = int(arr.shape[0])
        assert self._fill + n <= self.capacity, f"plan staging holds {self.capacity} ints"
        view = self._bufs[self._turn][self._fill : self._fill + n]
        view.numpy()[:] = arr
        self._fill += n
        return view

    def end(self) -> None:
        """Mark the slot in use by everything enqueued so far (call after the plan's copies)."""
        if self.on_cuda:
            event = self._events[self._turn] or torch.cuda.Event()
            event.record()
            self._events[self._turn] = event


@dataclass(frozen=True)
class StagedLevel:
    """A level ready for FlashInfer's plan: CSR lengths on the host, page ids on the device."""

    kv_indptr: torch.Tensor  # [N + 1] int32, host
    kv_indices: torch.Tensor  # [total_pages] int32, device
    last_page_len: torch.Tensor  # [N] int32, host


def stage_level(level: PagedLevel, ring: PinnedRing, page_table: torch.Tensor) -> StagedLevel:
    """Copy the level's entries to the device in one transfer and gather its page ids there."""
    n = level.size
    host = ring.put(np.concatenate([level.rows, level.first_page, level.kv_indptr,
                                    level.last_page_len]))
    dev = host.to(page_table.device, non_blocking=True)
    indices = gather_pages(page_table, dev[:n], dev[n : 2 * n], dev[2 * n : 3 * n + 1],
                           level.total_pages)
    return StagedLevel(kv_indptr=host[2 * n : 3 * n + 1], kv_indices=indices,
                       last_page_len=host[3 * n + 1 :])
