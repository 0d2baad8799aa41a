"""Attention backend on Triton kernels: store K/V, then flash-decoding for pure-decode steps and
the ragged extend kernel for everything else (prefill chunks, and mixed batches whose decode
requests are extends of length 1).

CUDA-graph contract for decode steps: ``forward`` makes no host syncs and no data-dependent
allocations. The split partials live in buffers allocated once here, sized for the largest
``batch_size * num_splits`` any batch up to ``max_batch_size`` can use; ``prepare`` picks the
split count from the batch size alone (a host int), so a graph captured at a batch size replays
with the same grid whatever the sequence lengths.

With ``cascade`` set, a decode step whose batch carries shared-prefix groups
(``ForwardBatch.cascade``) runs the cascade kernels instead (kernels/cascade_decode.py): each
group's prefix read once per tile of members, each request's suffix, an LSE merge. Its metadata
goes to fixed device buffers (attention/cascade_plan.py) and pass 1 loops over a device-side item
count, so a graph captured with groups replays any grouping; ungrouped requests ride along.

With ``deterministic=True`` every step (prefill, mixed, decode) runs the batch-invariant kernel
instead, so a token's attention output never depends on the batch it was computed in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixrt.attention.base import AttentionBackend, ExtendDelegate
from radixrt.attention.cascade_plan import CascadeBuffers, ItemBudget
from radixrt.kernels.cascade_decode import cascade_decode
from radixrt.kernels.cascade_meta import CascadeMeta, PrefixTiling
from radixrt.kernels.decode_attention import decode_attention
from radixrt.kernels.decode_plan import (
    SHORT_CONTEXT,
    choose_num_splits,
    choose_short_splits,
    decode_block_n,
    decode_launch,
)
from radixrt.kernels.extend_attention import extend_attention
from radixrt.kernels.extend_dense import dense_extend, use_dense_extend
from radixrt.kernels.extend_runs import ExtendReuse
from radixrt.kernels.invariant_attention import SplitBuffers, invariant_attention, invariant_chunk
from radixrt.kernels.store_kv import store_kv

if TYPE_CHECKING:
    from radixrt.cache.kv_pool import KVPool
    from radixrt.engine.batch import ForwardBatch
    from radixrt.engine.cascade_groups import CascadePolicy


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
        cascade: CascadePolicy | None = None,
        cascade_tile_reqs: int | None = None,
        cascade_item_target: int | None = None,
        cascade_side_stream: bool = True,
        extend_delegate: ExtendDelegate | None = None,
    ) -> None:
        """``extend_delegate``: a backend whose ``prepare`` / ``attend(q, (k_pages, v_pages))``
        run the extend steps the dense path does not take (FlashInfer's FA3 prefill:
        ``EngineConfig.prefill_attention``); decode steps stay on this backend's kernels."""
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        assert extend_delegate is None or not deterministic, "a delegate is not batch-invariant"
        self.extend_delegate = extend_delegate
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
        self._decode_launch = decode_launch(1, num_kv_heads, num_sms, 1, self.device)
        # Prefix tile lists and pool TMA descriptors shared by a step's layers.
        self._extend_reuse = ExtendReuse()
        assert cascade is None or not deterministic, "cascade decode is not batch-invariant"
        self.cascade_policy = cascade
        self._cascade: CascadeBuffers | None = None
        self._meta: CascadeMeta | None = None  # the prepared step's, when it has groups
        # Pass 1 of a cascade step runs on this stream beside pass 2 (kernels/cascade_decode.py).
        self._side_stream: torch.cuda.Stream | None = None
        if cascade is not None:
            self._cascade = self._cascade_buffers(cascade_tile_reqs, cascade_item_target)
            if self.device.type == "cuda" and cascade_side_stream:
                self._side_stream = torch.cuda.Stream(device=self.device)

    def _cascade_buffers(self, tile_reqs: int | None, item_target: int | None) -> CascadeBuffers:
        tiling = PrefixTiling.make(self.num_heads // self.num_kv_heads, self.device, tile_reqs)
        on_gpu = self.device.type == "cuda"
        # Pass 1: ~2 programs per SM, each looping over items (KV chunks of a tile); the H200
        # sweep (bench/RESULTS.md, session 4) had 2 per SM 4% faster than 4 and 8% than 8.
        target = item_target or max(1, -(-2 * self.num_sms // self.num_kv_heads))
        block_n = decode_block_n(self.device)
        budget = ItemBudget(item_target=target,
                            item_cap=max(target, -(-self.max_batch_size // 2)),
                            min_chunk=256 if on_gpu else block_n, block_n=block_n)
        return CascadeBuffers(tiling, budget, max_batch=self.max_batch_size,
                              num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                              device=self.device)

    @property
    def kv_split(self) -> bool:
        """Whether the prepared (deterministic, decode) step splits the KV into chunks."""
        return self._split

    @property
    def decode_context_bounds(self) -> tuple[int, ...]:
        return () if self.deterministic else (SHORT_CONTEXT,)

    def decode_graph_variant(self, batch_size: int, max_seq_len: int) -> int:
        return 0 if self.deterministic else self.num_splits_for(batch_size, max_seq_len)

    def num_splits_for(self, batch_size: int, max_seq_len: int | None = None) -> int:
        """KV splits of a decode step of this batch size: fewer when its longest KV is known to
        be at most SHORT_CONTEXT tokens (``max_seq_len``; None: any length)."""
        if max_seq_len is not None and max_seq_len <= SHORT_CONTEXT:
            return choose_short_splits(batch_size, self.num_kv_heads, self.num_sms,
                                       self.max_kv_splits, self.min_split_len)  # fmt: skip
        return choose_num_splits(batch_size, self.num_kv_heads, self.num_sms, self.max_kv_splits)

    def prepare(self, batch: ForwardBatch) -> None:
        buffers = self._split_buffers
        self._split = (batch.is_decode and buffers is not None
                       and batch.batch_size <= buffers.max_batch)
        if batch.is_decode:
            assert batch.batch_size <= self.max_batch_size, (
                f"decode batch {batch.batch_size} > max_batch_size {self.max_batch_size}"
            )
            self._num_splits = self.num_splits_for(batch.batch_size, batch.max_seq_len)
            self._decode_launch = decode_launch(batch.batch_size, self.num_kv_heads,
                                                self.num_sms, self._num_splits, self.device)
        self._meta = None
        self._extend_reuse.new_step()
        if not batch.is_decode and self.extend_delegate is not None:
            self.extend_delegate.prepare(batch)
        if batch.is_decode and self._cascade is not None and batch.cascade is not None:
            self._meta = self._cascade.upload(batch.cascade, batch.batch_size)

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        pool: KVPool,
        batch: ForwardBatch,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [T, Hq, D]
        k_flat, v_flat = pool.k_flat(layer_id), pool.v_flat(layer_id)
        store_kv(k_flat, v_flat, batch.out_slots, k, v)
        return self.attend(q, k_flat, v_flat, batch, k_new=k, v_new=v, out=out)

    @property
    def cascade_buffers(self) -> CascadeBuffers | None:
        return self._cascade

    def attend(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k_flat: torch.Tensor,  # [S, Hkv, D] a pool layer, already holding the step's K/V
        v_flat: torch.Tensor,
        batch: ForwardBatch,
        k_new: torch.Tensor | None = None,  # [T, Hkv, D] the step's K/V (also in the pool):
        v_new: torch.Tensor | None = None,  # extends read their new x new part from these
        out: torch.Tensor | None = None,  # [T, Hq, D]: write the result here (and return it)
    ) -> torch.Tensor:  # [T, Hq, D]
        """The attention of ``forward`` without the K/V store (benchmarks call it directly)."""
        result = self._attend(q, k_flat, v_flat, batch, k_new, v_new, out)
        return result if out is None or result is out else out.copy_(result)

    def _attend(
        self, q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, batch: ForwardBatch,
        k_new: torch.Tensor | None, v_new: torch.Tensor | None, out: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """``attend``'s kernels; the extend and decode kernels write ``out`` directly."""
        if self.deterministic:
            return invariant_attention(
                q, k_flat, v_flat, batch.qo_indptr, batch.prefix_lens, batch.page_table,
                batch.req_rows, batch.page_size, batch.max_extend_len, self.scale, chunk=self.chunk,
                split=self._split_buffers if self._split else None, seq_lens=batch.seq_lens,
            )
        if batch.is_decode and self._meta is not None:
            assert self._cascade is not None
            buffers = self._cascade
            return cascade_decode(
                q, k_flat, v_flat, batch.seq_lens, batch.page_table, batch.req_rows,
                batch.page_size, self.scale, self._meta, buffers.tiling,
                num_splits=self._num_splits, prefix_programs=buffers.budget.item_target,
                suf_out=self._part_out, suf_lse=self._part_lse, pre_out=buffers.pre_out,
                pre_lse=buffers.pre_lse, min_split_len=self.min_split_len,
                side_stream=self._side_stream,
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
                out=out,
                min_split_len=self.min_split_len,
                launch=self._decode_launch,
            )
        if k_new is not None and v_new is not None and use_dense_extend(q, batch.extend_lens_cpu):
            return dense_extend(
                q, k_flat, v_flat, k_new, v_new, batch.page_table, batch.page_size, self.scale,
                batch.extend_lens_cpu, batch.prefix_lens_cpu, batch.req_rows_cpu,
                torch.empty_like(q) if out is None else out,
            )  # fmt: skip
        if self.extend_delegate is not None:
            pages = (-1, batch.page_size, self.num_kv_heads, self.head_dim)
            return self.extend_delegate.attend(q, (k_flat.view(pages), v_flat.view(pages)))
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
            out,
            # Known lengths let one short extend over a long prefix split its KV across programs.
            max_seq_len=batch.max_seq_len,
            k_new=k_new,
            v_new=v_new,
            reuse=self._extend_reuse,
        )
