"""Attention backend on Triton kernels: store K/V, then flash-decoding for pure-decode steps and
the ragged extend kernel for everything else (prefill chunks, and mixed batches whose decode
requests are extends of length 1).

CUDA-graph contract for decode steps: ``forward`` makes no host syncs and no data-dependent
allocations. The split partials live in buffers allocated once here, sized for the largest
``batch_size * num_splits`` any batch up to ``max_batch_size`` can use; ``prepare`` picks the
split count from the batch size alone (a host int), so a graph captured at a batch size replays
with the same grid whatever the sequence lengths.

With ``deterministic=True`` every step (prefill, mixed, decode) runs the batch-invariant kernel
instead, so a token's attention output never depends on the batch it was computed in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixrt.attention.base import AttentionBackend
from radixrt.kernels.decode_attention import choose_num_splits, decode_attention
from radixrt.kernels.extend_attention import extend_attention
from radixrt.kernels.invariant_attention import SplitBuffers, invariant_attention, invariant_chunk
from radixrt.kernels.store_kv import store_kv

if TYPE_CHECKING:
    from radixrt.cache.kv_pool import KVPool
    from radixrt.engine.batch import ForwardBatch


class TritonAttentionBackend(AttentionBackend):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        *,
        device: torch.device | str = "cuda",
        max_batch_size: int = 256,
        max_kv_splits: int = 32,
        min_split_len: int = 256,
        num_sms: int | None = None,
        deterministic: bool = False,
        max_context_len: int = 8192,
    ) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        assert max_batch_size >= 1 and max_kv_splits >= 1, "need a positive batch and split cap"
        assert min_split_len >= 1, "min_split_len must be positive"
        self.device = torch.device(device)
        if num_sms is None:
            on_cuda = self.device.type == "cuda"
            props = torch.cuda.get_device_properties(self.device) if on_cuda else None
            num_sms = props.multi_processor_count if props is not None else 8
        self.num_sms = num_sms
        self.max_batch_size = max_batch_size
        self.max_kv_splits = max_kv_splits
        self.min_split_len = min_split_len
        self.deterministic = deterministic
        rows = 0 if deterministic else max(
            b * self.num_splits_for(b) for b in range(1, max_batch_size + 1)
        )
        # Deterministic decode splits the KV into fixed chunks when the batch alone cannot fill
        # the SMs; the split never changes a result, so it may follow the batch size.
        self.chunk = invariant_chunk(max_context_len, self.device)
        split_max = min(max_batch_size, (num_sms - 1) // num_kv_heads)
        self._split_buffers = (
            SplitBuffers(split_max, num_kv_heads, num_heads // num_kv_heads, head_dim,
                         -(-max_context_len // self.chunk), self.device)
            if deterministic and split_max > 0 else None
        )
        self._split = False
        # Flat fp32 partials: viewed as [B, Hq, num_splits, (D)] by the decode kernels.
        self._part_out = torch.empty(
            rows * num_heads * head_dim, dtype=torch.float32, device=self.device
        )
        self._part_lse = torch.empty(rows * num_heads, dtype=torch.float32, device=self.device)
        self._num_splits = 1

    @property
    def kv_split(self) -> bool:
        """Whether the prepared (deterministic, decode) step splits the KV into chunks."""
        return self._split

    def num_splits_for(self, batch_size: int) -> int:
        """KV splits a decode step of this batch size uses (fixed per batch size)."""
        return choose_num_splits(batch_size, self.num_kv_heads, self.num_sms, self.max_kv_splits)

    def prepare(self, batch: ForwardBatch) -> None:
        buffers = self._split_buffers
        self._split = (batch.is_decode and buffers is not None
                       and batch.batch_size <= buffers.max_batch)
        if batch.is_decode:
            assert batch.batch_size <= self.max_batch_size, (
                f"decode batch {batch.batch_size} > max_batch_size {self.max_batch_size}"
            )
            self._num_splits = self.num_splits_for(batch.batch_size)

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        pool: KVPool,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, Hq, D]
        k_flat, v_flat = pool.k_flat(layer_id), pool.v_flat(layer_id)
        store_kv(k_flat, v_flat, batch.out_slots, k, v)
        if self.deterministic:
            return invariant_attention(
                q, k_flat, v_flat, batch.qo_indptr, batch.prefix_lens, batch.page_table,
                batch.req_rows, batch.page_size, batch.max_extend_len, self.scale, chunk=self.chunk,
                split=self._split_buffers if self._split else None, seq_lens=batch.seq_lens,
            )
        if batch.is_decode:
            return decode_attention(
                q,
                k_flat,
                v_flat,
                batch.seq_lens,
                batch.page_table,
                batch.req_rows,
                batch.page_size,
                self.scale,
                self._num_splits,
                self._part_out,
                self._part_lse,
                min_split_len=self.min_split_len,
            )
        return extend_attention(
            q,
            k_flat,
            v_flat,
            batch.qo_indptr,
            batch.prefix_lens,
            batch.page_table,
            batch.req_rows,
            batch.page_size,
            batch.max_extend_len,
            self.scale,
        )
