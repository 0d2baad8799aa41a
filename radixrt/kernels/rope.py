"""Rotary position embedding, neox / rotate-half style, applied in place to q and k.

For rotary dim R = cos_sin_cache.shape[1] (R <= D; R < D is partial rotary) and h = R / 2:

    cache[pos] = [ cos_0 .. cos_{h-1} | sin_0 .. sin_{h-1} ]           (fp32)
    x          = [ x1 (h) | x2 (h) | untouched (D - R) ]
    x1' = x1 * cos - x2 * sin,   x2' = x2 * cos + x1 * sin              (fp32, one rounding)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    X, tok, stride_t, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_r[None, :] < HALF)
    p1 = X + tok * stride_t + offs_h[:, None] * stride_h + offs_r[None, :]
    p2 = p1 + HALF
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos[None, :] - x2 * sin[None, :]).to(X.dtype.element_ty), mask=mask)
    tl.store(p2, (x2 * cos[None, :] + x1 * sin[None, :]).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q,  # [T, Hq, D]
    K,  # [T, Hkv, D]
    positions,  # [T] int64
    CosSin,  # [max_pos, R] fp32
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cs,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + tok).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_HALF)
    mask_r = offs_r < HALF
    cos = tl.load(CosSin + pos * stride_cs + offs_r, mask=mask_r, other=0.0)
    sin = tl.load(CosSin + pos * stride_cs + HALF + offs_r, mask=mask_r, other=0.0)
    _rotate_heads(Q, tok, stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(K, tok, stride_kt, stride_kh, cos, sin, NUM_K_HEADS, HALF, BLOCK_KH, BLOCK_HALF)


def apply_rope(
    q: torch.Tensor,  # [T, Hq, D] (rotated in place)
    k: torch.Tensor,  # [T, Hkv, D] (rotated in place)
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, R] fp32, R = rotary dim <= D, even
) -> tuple[torch.Tensor, torch.Tensor]:
    assert q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0], "q/k must be [T, H, D]"
    assert q.shape[2] == k.shape[2], "q and k head_dim differ"
    rot = cos_sin_cache.shape[1]
    assert rot % 2 == 0 and rot <= q.shape[2], f"rotary dim {rot} must be even and <= head_dim"
    assert positions.shape == (q.shape[0],), "one position per token"
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin_cache.stride(1) == 1, (
        "head_dim axes must be contiguous (rotation is in place)"
    )
    tokens = q.shape[0]
    if tokens == 0:
        return q, k
    half = rot // 2
    _rope_kernel[(tokens,)](
        q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=q.shape[1], NUM_K_HEADS=k.shape[1], HALF=half,
        BLOCK_QH=triton.next_power_of_2(q.shape[1]), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4 if q.device.type == "cuda" else 1,
    )  # fmt: skip
    return q, k
