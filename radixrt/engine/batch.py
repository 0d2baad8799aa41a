"""Per-step batch metadata handed to the model runner and the attention backends.

A step's batch is ragged: request ``i`` contributes ``extend_lens[i]`` new tokens (a prefill
chunk, or exactly one token when it is decoding), laid out back to back in request order::

    request        r0 (prefill chunk)   r1 (chunk)   r2 (decode)
    new tokens     a a a a a            b b b        c
    qo_indptr      0                    5            8            9
    prefix_lens    p0                   p1           p2          (tokens already in the KV pool)
    seq_lens       p0 + 5               p1 + 3       p2 + 1      (KV length after this step)

Token ``j`` of request ``i`` sits at absolute position ``prefix_lens[i] + j``; its K/V is
written to pool slot ``out_slots[qo_indptr[i] + j]`` and it attends to KV positions
``0 .. prefix_lens[i] + j`` (causal). Position ``p`` of request ``i`` lives in physical page
``page_table[i, p // page_size]`` at offset ``p % page_size``, i.e. flat slot
``page_table[i, p // page_size] * page_size + p % page_size``. Unused page-table entries hold
page 0, the pool's scratch page, which no request owns.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute positions
    qo_indptr: torch.Tensor  # [B+1] int32, start of each request's new tokens
    prefix_lens: torch.Tensor  # [B] int32, KV tokens already in the pool
    seq_lens: torch.Tensor  # [B] int32, prefix_lens + extend_lens
    page_table: torch.Tensor  # [B, max_pages] int32, physical page ids (0 = scratch)
    out_slots: torch.Tensor  # [T] int64, flat pool slot of each new token's K/V
    logits_indices: torch.Tensor  # [N] int64, rows of the hidden states that need logits
    page_size: int
    is_decode: bool  # every request has exactly one new token
    max_extend_len: int  # host-side maxima, for kernel grids
    max_seq_len: int
    # Host copies (python ints) so reference paths never sync with the device.
    extend_lens_cpu: list[int]
    prefix_lens_cpu: list[int]

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_lens_cpu(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens_cpu, self.extend_lens_cpu)]


def build_forward_batch(
    *,
    new_token_ids: list[list[int]],
    prefix_lens: list[int],
    page_tables: list[list[int]],
    page_size: int,
    logits_rows: list[list[int]] | None = None,
    device: torch.device | str = "cpu",
) -> ForwardBatch:
    """Assemble a ForwardBatch from per-request host lists (vectorized: no per-token loop).

    ``logits_rows[i]`` lists offsets (within request i's new tokens) that need logits; by default
    only each request's last new token does.
    """
    assert len(new_token_ids) == len(prefix_lens) == len(page_tables), "ragged inputs disagree"
    bsz = len(new_token_ids)
    extend = np.fromiter((len(t) for t in new_token_ids), dtype=np.int64, count=bsz)
    assert bsz > 0 and bool((extend > 0).all()), "every request in a batch needs >= 1 new token"
    prefix = np.asarray(prefix_lens, dtype=np.int64)
    seq_lens = prefix + extend
    indptr = np.zeros(bsz + 1, dtype=np.int64)
    np.cumsum(extend, out=indptr[1:])
    num_tokens = int(indptr[-1])
    input_ids = np.fromiter(itertools.chain.from_iterable(new_token_ids), dtype=np.int64,
                            count=num_tokens)
    owner = np.repeat(np.arange(bsz), extend)  # [T] request of each new token
    positions = prefix[owner] + np.arange(num_tokens) - indptr[owner]  # [T]
    max_pages = max(1, max(len(pt) for pt in page_tables))
    table = np.zeros((bsz, max_pages), dtype=np.int32)
    for i, pt in enumerate(page_tables):
        assert len(pt) * page_size >= seq_lens[i], (
            f"request {i}: page table covers {len(pt) * page_size} slots < seq_len {seq_lens[i]}"
        )
        table[i, : len(pt)] = pt
    out_slots = table[owner, positions // page_size].astype(np.int64) * page_size + positions % page_size
    if logits_rows is None:
        logits_idx = indptr[1:] - 1
    else:
        logits_idx = np.fromiter(
            (int(indptr[i]) + r for i, rows in enumerate(logits_rows) for r in rows), dtype=np.int64
        )

    def dev(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return host_to_device(x, dtype, device)

    extend_list = extend.tolist()
    return ForwardBatch(
        input_ids=dev(input_ids, torch.int64),
        positions=dev(positions, torch.int64),
        qo_indptr=dev(indptr, torch.int32),
        prefix_lens=dev(prefix, torch.int32),
        seq_lens=dev(seq_lens, torch.int32),
        page_table=dev(table, torch.int32),
        out_slots=dev(out_slots, torch.int64),
        logits_indices=dev(logits_idx, torch.int64),
        page_size=page_size,
        is_decode=bool((extend == 1).all()),
        max_extend_len=int(extend.max()),
        max_seq_len=int(seq_lens.max()),
        extend_lens_cpu=extend_list,
        prefix_lens_cpu=list(prefix_lens),
    )


def host_to_device(x: np.ndarray | Sequence[float], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Copy host data to ``device`` without making the host wait for queued GPU work.

    A plain copy from pageable memory synchronizes with the stream, which would stall the
    overlapped scheduler behind the running step; pinned memory + non_blocking does not.
    """
    t = torch.as_tensor(np.asarray(x)).to(dtype)
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
