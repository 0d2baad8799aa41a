"""Per-step batch metadata handed to the model runner and the attention backends.

A step's batch is ragged: request ``i`` contributes ``extend_lens[i]`` new tokens (a prefill
chunk, or exactly one token when it is decoding), laid out back to back in request order::

    request        r0 (prefill chunk)   r1 (chunk)   r2 (decode)
    new tokens     a a a a a            b b b        c
    qo_indptr      0                    5            8            9
    prefix_lens    p0                   p1           p2          (tokens already in the KV pool)
    seq_lens       p0 + 5               p1 + 3       p2 + 1      (KV length after this step)
    req_rows       7                    2            5           (rows of the device page table)

Token ``j`` of request ``i`` sits at absolute position ``prefix_lens[i] + j``; its K/V is
written to pool slot ``out_slots[qo_indptr[i] + j]`` and it attends to KV positions
``0 .. prefix_lens[i] + j`` (causal). Pages are read through one indirection into the device
page table that outlives the step (radixrt/cache/device_pages.py)::

    page_table [R, max_pages] int32 (all rows; row 0 = scratch, all page 0)
                 row 2  [ 9 | 4 | . . . ]    <- r1
                 row 5  [ 1 | 8 | 3 | . ]    <- r2
                 row 7  [ 6 | . . . . . ]    <- r0

Position ``p`` of request ``i`` lives in physical page ``page_table[req_rows[i], p // page_size]``
at offset ``p % page_size``, i.e. flat slot ``page * page_size + p % page_size``. Entries past a
request's last page hold whatever an earlier owner left there: read nothing beyond ``seq_lens``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from radixrt.cache.device_pages import DevicePageTable
from radixrt.cache.page_table import SequencePages
from radixrt.engine.cascade_groups import CascadeGroups


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute positions
    qo_indptr: torch.Tensor  # [B+1] int32, start of each request's new tokens
    prefix_lens: torch.Tensor  # [B] int32, KV tokens already in the pool
    seq_lens: torch.Tensor  # [B] int32, prefix_lens + extend_lens
    page_table: torch.Tensor  # [R, max_pages] int32, the whole device table (0 = scratch page)
    req_rows: torch.Tensor  # [B] int32, each request's row of page_table
    out_slots: torch.Tensor  # [T] int64, flat pool slot of each new token's K/V
    logits_indices: torch.Tensor  # [N] int64, rows of the hidden states that need logits
    page_size: int
    is_decode: bool  # every request has exactly one new token
    max_extend_len: int  # host-side maxima, for kernel grids
    max_seq_len: int
    # Host copies (python ints) so reference paths never sync with the device.
    extend_lens_cpu: list[int]
    prefix_lens_cpu: list[int]
    req_rows_cpu: list[int]
    # Decode only: requests sharing a cached prefix (cascade_groups.py); None = no groups.
    cascade: CascadeGroups | None = None

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_lens_cpu(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens_cpu, self.extend_lens_cpu)]


def pack_forward_batch(
    *,
    input_ids: np.ndarray,  # [T] int64
    extend_lens: list[int],
    prefix_lens: list[int],
    req_rows: list[int],
    out_slots: np.ndarray,  # [T] int64
    logits_indices: np.ndarray,  # [N] int64
    table: DevicePageTable,
) -> ForwardBatch:
    """Per-request host values -> a ForwardBatch in two host->device copies (one int64 and one
    int32 buffer, sliced into views). Vectorized: no per-token Python loop."""
    bsz = len(extend_lens)
    extend = np.asarray(extend_lens, dtype=np.int64)
    prefix = np.asarray(prefix_lens, dtype=np.int64)
    assert bsz > 0 and bool((extend > 0).all()), "every request in a batch needs >= 1 new token"
    num_tokens = int(input_ids.shape[0])
    if num_tokens == bsz:  # pure decode: one token per request at position prefix
        indptr = np.arange(bsz + 1, dtype=np.int64)
        positions = prefix
    else:
        indptr = np.zeros(bsz + 1, dtype=np.int64)
        np.cumsum(extend, out=indptr[1:])
        owner = np.repeat(np.arange(bsz), extend)  # [T] request of each new token
        positions = prefix[owner] + np.arange(num_tokens) - indptr[owner]  # [T]
    seq_lens = prefix + extend
    input_ids_d, positions_d, out_slots_d, logits_d = pack_aligned(
        [input_ids, positions, out_slots, logits_indices], torch.int64, table.device)
    indptr_d, prefix_d, seq_lens_d, rows_d = pack_aligned(
        [indptr, prefix, seq_lens, np.asarray(req_rows)], torch.int32, table.device)
    return ForwardBatch(
        input_ids=input_ids_d, positions=positions_d, out_slots=out_slots_d,
        logits_indices=logits_d, qo_indptr=indptr_d, prefix_lens=prefix_d, seq_lens=seq_lens_d,
        req_rows=rows_d,
        page_table=table.table, page_size=table.page_size,
        is_decode=num_tokens == bsz, max_extend_len=int(extend.max()),
        max_seq_len=int(seq_lens.max()), extend_lens_cpu=list(extend_lens),
        prefix_lens_cpu=list(prefix_lens), req_rows_cpu=list(req_rows),
    )


def build_forward_batch(
    *,
    new_token_ids: list[list[int]],
    prefix_lens: list[int],
    page_tables: list[list[int]],
    page_size: int,
    logits_rows: list[list[int]] | None = None,
    device: torch.device | str = "cpu",
) -> ForwardBatch:
    """One self-contained step from explicit page lists, on a fresh device page table holding
    just these requests (tests, benchmarks, the tiny-model runner). The engine instead keeps
    one table across steps and writes only what changed (step_builder.py).

    Rows are handed out from the top, so request ``i`` lands in row ``B - i``: a reader that
    ignored ``req_rows`` would read another request's pages (or the scratch row) and fail.
    ``logits_rows[i]`` lists offsets (within request i's new tokens) that need logits; by default
    only each request's last new token does.
    """
    assert len(new_token_ids) == len(prefix_lens) == len(page_tables), "ragged inputs disagree"
    bsz = len(new_token_ids)
    assert bsz > 0, "a batch needs at least one request"
    extend = [len(t) for t in new_token_ids]
    table = DevicePageTable(num_rows=bsz, max_pages=max(1, max(len(pt) for pt in page_tables)),
                            page_size=page_size, device=device)
    rows, slots = [], []
    for i, pt in enumerate(page_tables):
        seq_len = prefix_lens[i] + extend[i]
        assert len(pt) * page_size >= seq_len, (
            f"request {i}: page table covers {len(pt) * page_size} slots < seq_len {seq_len}"
        )
        pages = SequencePages(page_size)
        pages.pages = list(pt)  # given, not allocated: no allocator holds them for this batch
        rows.append(table.stage(pages))
        pos = np.arange(prefix_lens[i], seq_len, dtype=np.int64)
        slots.append(np.asarray(pt, dtype=np.int64)[pos // page_size] * page_size + pos % page_size)
    table.flush()
    indptr = np.concatenate([[0], np.cumsum(extend)])
    if logits_rows is None:
        logits_idx = indptr[1:] - 1
    else:
        logits_idx = np.fromiter(
            (int(indptr[i]) + r for i, rows_i in enumerate(logits_rows) for r in rows_i),
            dtype=np.int64,
        )
    input_ids = np.fromiter(itertools.chain.from_iterable(new_token_ids), dtype=np.int64,
                            count=sum(extend))
    return pack_forward_batch(
        input_ids=input_ids, extend_lens=extend, prefix_lens=list(prefix_lens), req_rows=rows,
        out_slots=np.concatenate(slots), logits_indices=logits_idx.astype(np.int64), table=table,
    )


def pack_aligned(parts: Sequence[np.ndarray], dtype: torch.dtype,
                 device: torch.device | str) -> list[torch.Tensor]:
    """``parts`` on ``device`` in one host->device copy, as views of one buffer, each starting
    16 bytes aligned: Triton specializes pointer arguments on 16-byte alignment, so a view at an
    odd offset would compile (mid-traffic) a second variant of every kernel reading it."""
    assert dtype in (torch.int64, torch.int32), f"pack_aligned packs int64 or int32, not {dtype}"
    per = 16 // torch.empty((), dtype=dtype).element_size()
    offsets, total = [], 0
    for part in parts:
        offsets.append(total)
        total += -(-len(part) // per) * per
    host = np.zeros(total, dtype=np.int64 if dtype == torch.int64 else np.int32)
    for off, part in zip(offsets, parts):
        host[off : off + len(part)] = part
    buf = host_to_device(host, dtype, device)
    return [buf[off : off + len(part)] for off, part in zip(offsets, parts)]


def host_to_device(x: np.ndarray | Sequence[float], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Copy host data to ``device`` without making the host wait for queued GPU work.

    A plain copy from pageable memory synchronizes with the stream, which would stall the
    overlapped scheduler behind the running step; pinned memory + non_blocking does not.
    """
    t = torch.as_tensor(np.asarray(x)).to(dtype)
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
