"""Shared by the paged attention kernels' launchers: input checks, the dot precision per dtype,
and whether Triton is interpreting (CPU) or compiling."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_paged_inputs(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, page_size: int
) -> None:
    assert q.dim() == 3 and k_flat.dim() == 3, "q is [T, Hq, D]; k/v are flat pool [S, Hkv, D]"
    assert q.shape[2] == k_flat.shape[2] == v_flat.shape[2], "head_dim mismatch between q and pool"
    assert k_flat.shape == v_flat.shape, "K and V pool tensors differ in shape"
    assert q.shape[1] % k_flat.shape[1] == 0, "query heads must be a multiple of KV heads"
    assert page_size >= 1 and page_size & (page_size - 1) == 0, f"page_size {page_size} not 2^k"
    assert q.stride(2) == 1 and k_flat.stride(2) == 1 and v_flat.stride(2) == 1, (
        "the head_dim axis must be contiguous"
    )


def check_rows(page_table: torch.Tensor, req_rows: torch.Tensor, per_request: torch.Tensor) -> None:
    assert page_table.dim() == 2 and page_table.stride(1) == 1, "page_table rows must be contiguous"
    assert req_rows.dim() == 1 and req_rows.shape == per_request.shape, "one table row per request"


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through TF32 (~3e-4 error); keep them exact.
    return "ieee" if dtype == torch.float32 else "tf32"
