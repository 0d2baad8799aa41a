"""Optional attention backend on FlashInfer's paged-KV kernels (``attention_backend="flashinfer"``).

The pool's per-layer tensors ``[num_pages + 1, page_size, kv_heads, head_dim]`` are FlashInfer's
"NHD" paged layout, so the kernels read the pool in place. Per step, the requests' rows of the
device page table turn into FlashInfer's CSR page lists, gathered on the device (no host sync:
the total page count comes from the host's sequence lengths):

    page_table  row 4 [7, 3, 9]   req_rows [4, 1]   seq_lens [20, 9]  (page_size 16)
                row 1 [5, 2, 6]   (entries past a request's last page are stale)
    kv_indptr   [0, 2, 3]         pages per request: ceil(seq_len / page_size)
    kv_indices  [7, 3, 5]         table[req_rows[owner], page - kv_indptr[owner]]
    last_page   [4, 9]            tokens in each request's last page

FlashInfer aligns the causal mask to the end of each request's KV (query j of an extend of length
E over L keys sees keys 0 .. L - E + j), which is our prefix + j rule. CUDA graphs are not used
with this backend (its plan() rebuilds device metadata each step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from radixrt.attention.base import AttentionBackend

if TYPE_CHECKING:
    from radixrt.cache.kv_pool import KVPool
    from radixrt.engine.batch import ForwardBatch

WORKSPACE_BYTES = 128 << 20


def paged_kv_csr(
    page_table: torch.Tensor,  # [R, max_pages] int32
    req_rows: torch.Tensor,  # [B] int32
    seq_lens: torch.Tensor,  # [B] int32
    page_size: int,
    total_pages: int,  # sum of ceil(seq_len / page_size), from the host's lengths
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kv_indptr [B+1], kv_indices [total_pages], kv_last_page_len [B]), all int32."""
    dev = page_table.device
    num_pages = (seq_lens.long() + page_size - 1) // page_size  # [B]
    indptr = torch.zeros(num_pages.numel() + 1, dtype=torch.long, device=dev)
    indptr[1:] = torch.cumsum(num_pages, 0)
    # output_size keeps repeat_interleave from reading the counts back to the host.
    owner = torch.repeat_interleave(torch.arange(num_pages.numel(), device=dev), num_pages,
                                    output_size=total_pages)  # [total_pages]
    col = torch.arange(total_pages, device=dev) - indptr[owner]
    indices = page_table[req_rows.long()[owner], col]  # request 0's pages, then 1's, ...
    last = (seq_lens.long() - (num_pages - 1) * page_size).to(torch.int32)
    return indptr.to(torch.int32), indices, last


def _import_flashinfer() -> Any:
    try:
        import flashinfer  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ValueError(
            "attention_backend='flashinfer' needs the flashinfer package "
            "(pip install flashinfer-python), which is not installed; use 'triton'"
        ) from exc
    return flashinfer


class FlashInferBackend(AttentionBackend):
    supports_cuda_graph = False

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        *,
        device: torch.device | str = "cuda",
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        flashinfer = _import_flashinfer()
        self.dtype = dtype
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=num_heads // num_kv_heads >= 4
        )
        self._active: Any = None

    def prepare(self, batch: ForwardBatch) -> None:
        ps = batch.page_size
        total = sum(-(-n // ps) for n in batch.seq_lens_cpu)
        indptr, indices, last = paged_kv_csr(batch.page_table, batch.req_rows, batch.seq_lens, ps,
                                             total)
        shape = (self.num_heads, self.num_kv_heads, self.head_dim, batch.page_size)
        if batch.is_decode:
            self.decode.plan(indptr, indices, last, *shape, sm_scale=self.scale,
                             q_data_type=self.dtype, kv_data_type=self.dtype)
            self._active = self.decode
        else:
            self.prefill.plan(batch.qo_indptr, indptr, indices, last, *shape, causal=True,
                              sm_scale=self.scale, q_data_type=self.dtype,
                              kv_data_type=self.dtype)
            self._active = self.prefill

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,
        pool: KVPool,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, Hq, D]
        assert self._active is not None, "prepare() must run before forward()"
        pool.store(layer_id, batch.out_slots, k, v)
        out = self._active.run(q.contiguous(), (pool.k(layer_id), pool.v(layer_id)))
        return out  # type: ignore[no-any-return]
