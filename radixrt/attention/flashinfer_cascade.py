"""Shared-prefix (cascade) decode on FlashInfer: the second implementation of issue 18 item 2,
built from FlashInfer's cascade pieces (the batch prefill kernel over a group's shared pages,
tensor-core batch decode over each request's own pages, ``merge_state_in_place``).

    permuted q      [ group A members | group B members | ungrouped ]      (layout.order)
    shared level    prefill, non-causal: group g's query rows x its shared pages  -> (o_s, lse_s)
    own level       decode: every request x its own suffix (whole KV if ungrouped) -> (o, lse)
    merge           o[:M], lse[:M] <- merge(o[:M], lse[:M], o_s, lse_s)
    output          o un-permuted (layout.order's inverse)

FlashInfer's ``MultiLevelCascadeAttentionWrapper`` composes the same kernels, but runs every level
over every query, so an ungrouped request would need an empty shared entry; running the shared
pass over the grouped rows only avoids that, and the own level stays the per-request decode.

Eager only: the shared pass's plan picks its query tile from the group sizes (and FlashInfer's
graph mode fixes the number of groups), so a captured graph could not replay another grouping.
Grouped steps therefore run outside CUDA graphs (``cascade_in_cuda_graph = False``); steps
without groups keep their graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from radixrt.attention.flashinfer_plan import CascadeLayout, PinnedRing, stage_level

PlanFn = Callable[..., None]  # (wrapper, *plan args, **plan kwargs): a guarded wrapper.plan


class FlashInferCascade:
    def __init__(self, flashinfer: Any, workspace: torch.Tensor, *, num_heads: int,
                 num_kv_heads: int, head_dim: int, scale: float, dtype: torch.dtype,
                 use_tensor_cores: bool, shared_backend: str = "fa2") -> None:
        """``shared_backend``: FlashInfer's kernel family for the shared pass; fa2 is the one
        tensor-core decode runs (the same compiled module, and the same LSE convention for the
        merge); benchmarks may try "fa3"."""
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.dtype = scale, dtype
        self.own = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_tensor_cores=use_tensor_cores)
        self.shared = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD",
                                                                     backend=shared_backend)
        self._merge = flashinfer.merge_state_in_place
        self._order: torch.Tensor | None = None  # [B] device: permuted position -> batch index
        self._inverse: torch.Tensor | None = None  # [B] device: batch index -> permuted position
        self._num_grouped = 0

    def plan(self, layout: CascadeLayout, page_table: torch.Tensor, page_size: int,
             ring: PinnedRing, plan: PlanFn) -> None:
        """Both levels' metadata for one step (``ring.begin()`` already called)."""
        inverse = np.empty_like(layout.order)
        inverse[layout.order] = np.arange(layout.order.shape[0])
        perm = ring.put(np.concatenate([layout.order, inverse])).to(page_table.device,
                                                                   non_blocking=True)
        b = layout.order.shape[0]
        self._order, self._inverse = perm[:b], perm[b:]
        self._num_grouped = layout.num_grouped
        dims = (self.num_heads, self.num_kv_heads, self.head_dim, page_size)
        types = dict(sm_scale=self.scale, q_data_type=self.dtype, kv_data_type=self.dtype)
        own = stage_level(layout.own, ring, page_table)
        plan(self.own, own.kv_indptr, own.kv_indices, own.last_page_len, *dims, **types)
        shared = stage_level(layout.shared, ring, page_table)
        qo_indptr = ring.put(layout.qo_indptr)
        # Every shared token precedes every member's query: no causal mask in this pass.
        plan(self.shared, qo_indptr, shared.kv_indptr, shared.kv_indices, shared.last_page_len,
             *dims, causal=False, **types)

    def run(self, q: torch.Tensor,  # [B, Hq, D]
            kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # [B, Hq, D]
        assert self._order is not None and self._inverse is not None, "plan() must run first"
        m = self._num_grouped
        qp = q.index_select(0, self._order)
        out, lse = self.own.run(qp, kv, return_lse=True)
        shared_out, shared_lse = self.shared.run(qp[:m], kv, return_lse=True)
        self._merge(out[:m], lse[:m], shared_out, shared_lse)
        return out.index_select(0, self._inverse)
