"""Shared-prefix (cascade) decode on FlashInfer: the second implementation of issue 18 item 2,
built from FlashInfer's cascade pieces (the batch prefill kernel over a group's shared pages,
tensor-core batch decode over each request's own pages, ``merge_state_in_place``).

    permuted q      [ group A members | group B members | ungrouped ]      (layout.order)
    shared level    prefill, non-causal: group g's query rows x its shared pages  -> (o_s, lse_s)
    own level       decode: every request x its own suffix (whole KV if ungrouped) -> (o, lse)
    merge           o[:M], lse[:M] <- merge(o[:M], lse[:M], o_s, lse_s)
    output          o un-permuted (layout.order's inverse)

FlashInfer's ``MultiLevelCascadeAttentionWrapper`` composes the same kernels, but runs every level
over every query, so an ungrouped request would need an empty shared entry; eagerly the shared
pass runs over the grouped rows only, and the own level stays the per-request decode.

Under CUDA graphs (a captured batch size) both passes use FlashInfer's graph-mode wrappers: the
own pass is the batch size's decode graph wrapper (the same fixed buffers as the plain graph:
each replay's plan rewrites them), the shared pass a graph-mode prefill wrapper over a fixed
number of entries (padded_cascade_layout: groups, then empty entries; the last takes the
ungrouped rows so the entries' rows cover the batch, a fixed row total as graph mode requires),
and the merge skips the rows past M by a mask computed on the device from M. The permutation and
M live in one fixed buffer per size, so a graph captured with no groups replays any grouping.
Graph mode plans the shared pass for the worst case of its row total (query tile of up to 128
rows), where an eager plan sizes the tile to the groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from radixrt.attention.flashinfer_plan import CascadeLayout, PinnedRing, stage_level

PlanFn = Callable[..., None]  # (wrapper, *plan args, **plan kwargs): a guarded wrapper.plan


@dataclass(frozen=True)
class GraphSlot:
    """One captured batch size's fixed cascade state."""

    own: Any  # the size's decode graph wrapper
    shared: Any  # graph-mode prefill wrapper over a fixed number of shared entries
    perm: torch.Tensor  # [2 * size + 1] int32: order | inverse | M


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
        self._fi, self._workspace, self._shared_backend = flashinfer, workspace, shared_backend
        self._slots: dict[int, GraphSlot] = {}
        self._slot: GraphSlot | None = None  # the planned step's, when it runs in graph mode
        self._perm: torch.Tensor | None = None  # [2B + 1] device: order | inverse | M
        self._num_grouped = 0

    def graph_slot(self, size: int, num_entries: int, own: Any,
                   shared_indices: torch.Tensor) -> GraphSlot:
        """The batch size's graph state (made on first use); ``own``: its decode graph wrapper,
        ``shared_indices``: the page-id buffer the shared entries' wrappers share."""
        slot = self._slots.get(size)
        if slot is None:
            dev = shared_indices.device

            def ints(n: int) -> torch.Tensor:
                return torch.zeros(n, dtype=torch.int32, device=dev)

            shared = self._fi.BatchPrefillWithPagedKVCacheWrapper(
                self._workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=ints(num_entries + 1),
                paged_kv_indptr_buf=ints(num_entries + 1), paged_kv_indices_buf=shared_indices,
                paged_kv_last_page_len_buf=ints(num_entries), backend=self._shared_backend)
            slot = self._slots[size] = GraphSlot(own=own, shared=shared, perm=ints(2 * size + 1))
        assert slot.own is own, "a size's decode graph wrapper never changes"
        return slot

    def plan(self, layout: CascadeLayout, page_table: torch.Tensor, page_size: int,
             ring: PinnedRing, plan: PlanFn, slot: GraphSlot | None = None) -> None:
        """Both levels' metadata for one step (``ring.begin()`` already called); into the fixed
        buffers of ``slot`` when given (the layout then padded to its entry count)."""
        inverse = np.empty_like(layout.order)
        inverse[layout.order] = np.arange(layout.order.shape[0])
        host = ring.put(np.concatenate([layout.order, inverse, [layout.num_grouped]]))
        if slot is None:
            self._perm = host.to(page_table.device, non_blocking=True)
            own_wrapper, shared_wrapper = self.own, self.shared
        else:
            self._perm = slot.perm
            slot.perm.copy_(host, non_blocking=True)
            own_wrapper, shared_wrapper = slot.own, slot.shared
        self._slot, self._num_grouped = slot, layout.num_grouped
        dims = (self.num_heads, self.num_kv_heads, self.head_dim, page_size)
        types = dict(sm_scale=self.scale, q_data_type=self.dtype, kv_data_type=self.dtype)
        own = stage_level(layout.own, ring, page_table)
        plan(own_wrapper, own.kv_indptr, own.kv_indices, own.last_page_len, *dims, **types)
        shared = stage_level(layout.shared, ring, page_table)
        qo_indptr = ring.put(layout.qo_indptr)
        # Every shared token precedes every member's query: no causal mask in this pass.
        plan(shared_wrapper, qo_indptr, shared.kv_indptr, shared.kv_indices,
             shared.last_page_len, *dims, causal=False, **types)

    def run(self, q: torch.Tensor,  # [B, Hq, D]
            kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # [B, Hq, D]
        assert self._perm is not None, "plan() must run first"
        b = q.shape[0]
        order, inverse = self._perm[:b], self._perm[b : 2 * b]
        qp = q.index_select(0, order)
        slot = self._slot
        if slot is None:
            m = self._num_grouped
            out, lse = self.own.run(qp, kv, return_lse=True)
            shared_out, shared_lse = self.shared.run(qp[:m], kv, return_lse=True)
            self._merge(out[:m], lse[:m], shared_out, shared_lse)
        else:  # fixed shapes: every row through both passes, rows past M not merged
            out, lse = slot.own.run(qp, kv, return_lse=True)
            shared_out, shared_lse = slot.shared.run(qp, kv, return_lse=True)
            grouped = torch.arange(b, device=q.device) < self._perm[2 * b :]
            self._merge(out, lse, shared_out, shared_lse, mask=grouped)
        return out.index_select(0, inverse)
