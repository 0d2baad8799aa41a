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

from dataclasses import dataclass

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

    def to(self, device: torch.device | str) -> ForwardBatch:
        moved = {
            name: (value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value)
            for name, value in self.__dict__.items()
        }
        return ForwardBatch(**moved)


def build_forward_batch(
    *,
    new_token_ids: list[list[int]],
    prefix_lens: list[int],
    page_tables: list[list[int]],
    page_size: int,
    logits_rows: list[list[int]] | None = None,
    device: torch.device | str = "cpu",
) -> ForwardBatch:
    """Assemble a ForwardBatch from per-request host lists.

    ``logits_rows[i]`` lists offsets (within request i's new tokens) that need logits; by default
    only each request's last new token does.
    """
    assert len(new_token_ids) == len(prefix_lens) == len(page_tables), "ragged inputs disagree"
    extend_lens = [len(t) for t in new_token_ids]
    assert all(n > 0 for n in extend_lens), "every request in a batch needs >= 1 new token"
    input_ids: list[int] = []
    positions: list[int] = []
    out_slots: list[int] = []
    logits_indices: list[int] = []
    qo_indptr = [0]
    max_pages = max(1, max(len(pt) for pt in page_tables))
    for i, tokens in enumerate(new_token_ids):
        start = qo_indptr[-1]
        table = page_tables[i]
        seq_len = prefix_lens[i] + len(tokens)
        assert len(table) * page_size >= seq_len, (
            f"request {i}: page table covers {len(table) * page_size} slots < seq_len {seq_len}"
        )
        for j, tok in enumerate(tokens):
            pos = prefix_lens[i] + j
            input_ids.append(tok)
            positions.append(pos)
            out_slots.append(table[pos // page_size] * page_size + pos % page_size)
        rows = logits_rows[i] if logits_rows is not None else [len(tokens) - 1]
        logits_indices.extend(start + r for r in rows)
        qo_indptr.append(start + len(tokens))
    padded = [pt + [0] * (max_pages - len(pt)) for pt in page_tables]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]

    def i32(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int32, device=device)

    def i64(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int64, device=device)

    return ForwardBatch(
        input_ids=i64(input_ids),
        positions=i64(positions),
        qo_indptr=i32(qo_indptr),
        prefix_lens=i32(prefix_lens),
        seq_lens=i32(seq_lens),
        page_table=torch.tensor(padded, dtype=torch.int32, device=device),
        out_slots=i64(out_slots),
        logits_indices=i64(logits_indices),
        page_size=page_size,
        is_decode=all(n == 1 for n in extend_lens),
        max_extend_len=max(extend_lens),
        max_seq_len=max(seq_lens),
        extend_lens_cpu=extend_lens,
        prefix_lens_cpu=list(prefix_lens),
    )
