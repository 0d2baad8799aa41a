"""Write a step's new K/V rows into the paged pool at their flat slots, casting to the pool dtype.

One program per new token copies that token's [Hkv, D] K and V rows (K and V in one launch):

    k[t] : [Hkv, D] (model dtype) --cast--> k_flat[out_slots[t]] : [Hkv, D] (pool dtype)

No host syncs and a fixed grid per token count, so it can live inside a captured CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    K_in,  # [T, Hkv, D]
    V_in,  # [T, Hkv, D]
    K_cache,  # [S, Hkv, D]
    V_cache,  # [S, Hkv, D]
    slots,  # [T] int64
    stride_kit,
    stride_kih,
    stride_vit,
    stride_vih,
    stride_kct,
    stride_kch,
    stride_vct,
    stride_vch,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots + tok).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K_in + tok * stride_kit + offs_h[:, None] * stride_kih + offs_d[None, :], mask=mask)
    v = tl.load(V_in + tok * stride_vit + offs_h[:, None] * stride_vih + offs_d[None, :], mask=mask)
    k_dst = K_cache + slot * stride_kct + offs_h[:, None] * stride_kch + offs_d[None, :]
    v_dst = V_cache + slot * stride_vct + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(k_dst, k.to(K_cache.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(V_cache.dtype.element_ty), mask=mask)


def store_kv(
    k_flat: torch.Tensor,  # [S, Hkv, D] pool layer (written in place)
    v_flat: torch.Tensor,  # [S, Hkv, D]
    slots: torch.Tensor,  # [T] int64 flat slots
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
) -> None:
    assert k.shape == v.shape and k.dim() == 3, "k and v must both be [T, Hkv, D]"
    assert k_flat.shape == v_flat.shape and k_flat.shape[1:] == k.shape[1:], (
        f"pool rows {tuple(k_flat.shape[1:])} != new rows {tuple(k.shape[1:])}"
    )
    assert slots.shape == (k.shape[0],), "one slot per new token"
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    for t in (k, v, k_flat, v_flat):
        assert t.stride(2) == 1, "the head_dim axis must be contiguous"
    _store_kv_kernel[(num_tokens,)](
        k, v, k_flat, v_flat, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_flat.stride(0), k_flat.stride(1), v_flat.stride(0), v_flat.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4 if k.device.type == "cuda" else 1,
    )  # fmt: skip
