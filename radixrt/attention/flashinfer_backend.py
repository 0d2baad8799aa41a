"""Optional attention backend on FlashInfer's paged-KV kernels (``attention_backend="flashinfer"``).

The pool's per-layer tensors ``[num_pages + 1, page_size, kv_heads, head_dim]`` are FlashInfer's
"NHD" paged layout, so the kernels read the pool in place. Per step, the requests' rows of the
device page table turn into FlashInfer's CSR page lists (attention/flashinfer_plan.py): lengths
from the host's sequence lengths, page ids gathered on the device, so planning never syncs::

    page_table  row 4 [7, 3, 9]   req_rows [4, 1]   seq_lens [20, 9]  (page_size 16)
                row 1 [5, 2, 6]   (entries past a request's last page are stale)
    kv_indptr   [0, 2, 3]         pages per request: ceil(seq_len / page_size)
    kv_indices  [7, 3, 5]         table[req_rows[owner], page - kv_indptr[owner]]
    last_page   [4, 9]            tokens in each request's last page

FlashInfer aligns the causal mask to the end of each request's KV (query j of an extend of length
E over L keys sees keys 0 .. L - E + j), which is our prefix + j rule.

CUDA graphs (decode): ``prepare_graph_sizes`` names the batch sizes the runner captures; each gets
its own ``BatchDecodeWithPagedKVCacheWrapper(use_cuda_graph=True)`` over fixed indptr /
last_page_len buffers and one shared page-id buffer (FlashInfer fixes a graph wrapper's batch
size). ``prepare`` runs the wrapper's plan outside the graph, before each replay: it copies the
step's lists into those buffers and rewrites the plan (work split) in the wrapper's fixed int
workspace, which the captured kernels read; graph mode keeps the grid fixed whatever the lengths.

Cascade decode (``cascade`` set, steps carrying groups): attention/flashinfer_cascade.py, eagerly
or, at a captured batch size, through graph-mode wrappers sharing the decode graph's buffers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radixrt.attention.base import AttentionBackend
from radixrt.attention.flashinfer_cascade import FlashInferCascade
from radixrt.attention.flashinfer_plan import (
    PinnedRing,
    cascade_layout,
    decode_level,
    padded_cascade_layout,
    stage_level,
)

if TYPE_CHECKING:
    from radixrt.cache.kv_pool import KVPool
    from radixrt.engine.batch import ForwardBatch
    from radixrt.engine.cascade_groups import CascadeGroups, CascadePolicy

WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace (split-KV partials)


def cascade_graph_entries(batch_size: int, min_group: int, per_tile: int) -> int:
    """Shared entries of a captured size's cascade step: every group of ``min_group`` members
    plus a padding entry, and enough that graph mode's bound on one entry's rows (rows -
    entries + 1) stays within ``per_tile`` rows."""
    return max(batch_size // min_group + 1, batch_size + 1 - per_tile)


def cascade_graph_workspace(max_batch: int, min_group: int, num_heads: int, num_kv_heads: int,
                            head_dim: int, tile: int) -> int:
    """Float workspace bytes the graph-mode shared pass needs at the largest batch: graph mode
    reserves fp32 partials for (query tiles + entries - 1) work tiles of ``tile`` rows, each
    for every query head (FlashInfer's PrefillPlan), plus room for alignment."""
    gqa = num_heads // num_kv_heads
    entries = cascade_graph_entries(max_batch, min_group, max(1, tile // gqa))
    tiles = -(-max_batch * gqa // tile) + entries - 1
    # ... or its split-KV grid bound, 2 CTAs per SM over the KV heads (200 SMs: above any GPU).
    tiles = max(tiles, 2 * 200 // num_kv_heads)
    return num_heads * tiles * tile * (head_dim + 1) * 4 + (16 << 20)


def import_flashinfer() -> Any:
    try:
        import flashinfer  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ValueError(
            "attention_backend='flashinfer' needs the flashinfer package "
            "(pip install flashinfer-python), which is not installed; use 'triton'"
        ) from exc
    return flashinfer


class FlashInferBackend(AttentionBackend):
    supports_cuda_graph = True

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        *,
        device: torch.device | str = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        max_batch_size: int = 256,
        max_context_len: int = 8192,
        cascade: CascadePolicy | None = None,
        cascade_graph_tile: int = 64,
    ) -> None:
        """``cascade_graph_tile``: query rows (x GQA heads) of the graph-mode shared pass's tile
        (16, 64 or 128): FlashInfer's graph mode sizes the tile for the longest entry its row
        total allows, so the padded layout gets enough entries to bound that by the tile."""
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        self._fi = import_flashinfer()
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.max_context_len = max_context_len
        # FlashInfer's split-KV partials; zeroed as its docs ask for the first use. A captured
        # cascade step's shared pass needs more at large batches (268 MB at 256 x 32 heads).
        workspace = WORKSPACE_BYTES
        if cascade is not None:
            workspace = max(workspace, cascade_graph_workspace(
                max_batch_size, cascade.min_group, num_heads, num_kv_heads, head_dim,
                cascade_graph_tile))
        self.workspace = torch.zeros(workspace, dtype=torch.uint8, device=self.device)
        # Tensor-core decode (the prefill kernel with one query per request) wins once a KV
        # head serves >= 4 query heads.
        self.use_tensor_cores = num_heads // num_kv_heads >= 4
        self.prefill = self._fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode = self._fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.use_tensor_cores)
        self._graph_sizes: set[int] = set()
        self._graph_decode: dict[int, Any] = {}  # batch size -> its cuda-graph wrapper
        self._graph_indices: torch.Tensor | None = None  # page ids, shared by those wrappers
        self._graph_shared_indices: torch.Tensor | None = None  # the cascade's shared pass's
        # Cascade steps stage the most: (own + shared level) entries, the permutation, qo_indptr.
        self._ring = PinnedRing(12 * max_batch_size + 64, self.device)
        self._planned: dict[int, torch.cuda.Event] = {}  # id(wrapper) -> after its last plan
        self.cascade_policy = cascade
        self.cascade_graph_tile = cascade_graph_tile
        self._cascade = None if cascade is None else FlashInferCascade(
            self._fi, self.workspace, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, scale=scale, dtype=dtype, use_tensor_cores=self.use_tensor_cores)
        self._active: Any = None  # the wrapper (or cascade) forward() runs

    def prepare_graph_sizes(self, sizes: list[int]) -> None:
        self._graph_sizes = set(sizes)

    def _graph_wrapper(self, batch: ForwardBatch, total_pages: int) -> Any:
        """The batch size's cuda-graph wrapper (made on first use), or None when the size is not
        captured. A captured size must not fall back to another wrapper (its graph would replay
        a stale plan), so a step too large for the shared page-id buffer is an error."""
        size = batch.batch_size
        if size not in self._graph_sizes:
            return None
        if self._graph_indices is None:  # sized on first use, when the page size is known
            per_seq = max(batch.page_table.shape[1], -(-self.max_context_len // batch.page_size))
            self._graph_indices = torch.zeros(max(self._graph_sizes) * per_seq,
                                              dtype=torch.int32, device=self.device)
            self._graph_shared_indices = torch.zeros_like(self._graph_indices)
        if total_pages > self._graph_indices.numel():
            raise ValueError(f"decode step of {size} requests reads {total_pages} pages; the "
                             f"CUDA-graph page list holds {self._graph_indices.numel()} "
                             f"(max_context_len {self.max_context_len})")
        wrapper = self._graph_decode.get(size)
        if wrapper is None:
            wrapper = self._graph_decode[size] = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=True,
                use_tensor_cores=self.use_tensor_cores,
                paged_kv_indptr_buffer=torch.zeros(size + 1, dtype=torch.int32,
                                                   device=self.device),
                paged_kv_indices_buffer=self._graph_indices,
                paged_kv_last_page_len_buffer=torch.zeros(size, dtype=torch.int32,
                                                          device=self.device))
        return wrapper

    def _plan(self, wrapper: Any, *args: Any, **kwargs: Any) -> None:
        """``wrapper.plan``, after the copies of its previous plan have run: FlashInfer stages
        the plan in a pinned buffer of the wrapper's and copies it asynchronously."""
        done = self._planned.get(id(wrapper))
        if done is not None:
            done.synchronize()
        wrapper.plan(*args, **kwargs)
        if self.device.type == "cuda":
            done = done or torch.cuda.Event()
            done.record()
            self._planned[id(wrapper)] = done

    def prepare(self, batch: ForwardBatch) -> None:
        ps = batch.page_size
        seq_lens = np.asarray(batch.seq_lens_cpu, dtype=np.int64)
        rows = np.asarray(batch.req_rows_cpu, dtype=np.int64)
        ring = self._ring
        ring.begin()
        groups = batch.cascade if batch.is_decode else None
        cascade = self._cascade
        if cascade is not None and groups is not None and batch.batch_size in self._graph_sizes:
            self._plan_cascade_graph(cascade, groups, batch, seq_lens, rows)
        elif cascade is not None and groups is not None and (
                layout := cascade_layout(groups, seq_lens, rows, ps)) is not None:
            cascade.plan(layout, batch.page_table, ps, ring, self._plan)
            self._active = cascade
        else:
            self._plan_per_request(batch, seq_lens, rows)
        ring.end()

    def _plan_per_request(self, batch: ForwardBatch, seq_lens: np.ndarray,
                          rows: np.ndarray) -> None:
        ps, ring = batch.page_size, self._ring
        dims = (self.num_heads, self.num_kv_heads, self.head_dim, ps)
        types = dict(sm_scale=self.scale, q_data_type=self.dtype, kv_data_type=self.dtype)
        level = decode_level(seq_lens, rows, ps)
        staged = stage_level(level, ring, batch.page_table)
        csr = (staged.kv_indptr, staged.kv_indices, staged.last_page_len)
        if batch.is_decode:
            graph = self._graph_wrapper(batch, level.total_pages)
            self._active = self.decode if graph is None else graph
            self._plan(self._active, *csr, *dims, **types)
        else:
            qo_indptr = np.zeros(batch.batch_size + 1, dtype=np.int64)
            np.cumsum(batch.extend_lens_cpu, out=qo_indptr[1:])
            self._plan(self.prefill, ring.put(qo_indptr), *csr, *dims, causal=True, **types)
            self._active = self.prefill

    def _plan_cascade_graph(self, cascade: FlashInferCascade, groups: CascadeGroups,
                            batch: ForwardBatch, seq_lens: np.ndarray, rows: np.ndarray) -> None:
        """A captured size's fixed-shape cascade step (a graph captured with no groups replays
        any grouping), over ``cascade_graph_entries`` shared entries."""
        assert self.cascade_policy is not None
        size = batch.batch_size
        per_tile = max(1, self.cascade_graph_tile // (self.num_heads // self.num_kv_heads))
        entries = cascade_graph_entries(size, self.cascade_policy.min_group, per_tile)
        layout = padded_cascade_layout(groups, seq_lens, rows, batch.page_size, entries)
        own = self._graph_wrapper(batch, layout.own.total_pages)
        shared_ids = self._graph_shared_indices
        assert shared_ids is not None, "made with the decode graph wrapper's page ids"
        if layout.shared.total_pages > shared_ids.numel():
            raise ValueError(f"cascade step reads {layout.shared.total_pages} shared pages; the "
                             f"CUDA-graph page list holds {shared_ids.numel()}")
        slot = cascade.graph_slot(size, entries, own, shared_ids)
        cascade.plan(layout, batch.page_table, batch.page_size, self._ring, self._plan, slot)
        self._active = cascade

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,
        pool: KVPool,
        batch: ForwardBatch,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [T, Hq, D]
        assert self._active is not None, "prepare() must run before forward()"
        pool.store(layer_id, batch.out_slots, k, v)
        result = self.attend(q, (pool.k(layer_id), pool.v(layer_id)))
        return result if out is None else out.copy_(result)

    def attend(self, q: torch.Tensor,
               kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # [T, Hq, D]
        """The attention of ``forward`` over a paged layer already holding the step's K/V
        (benchmarks call it directly)."""
        return self._active.run(q.contiguous(), kv)  # type: ignore[no-any-return]
